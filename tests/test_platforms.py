"""Another OS's differences, one at a time (tests/simulate_os.py), under the tiny end-to-end run:
train.py on the tiny model, 2 steps, the real Math-Verify grader, held-out scoring on. A failure
names the difference that broke it. Run: pytest tests/test_platforms.py"""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow   # a subprocess run each: the whole suite only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIMULATE = os.path.join(ROOT, "tests", "simulate_os.py")
SWITCHES = ["no-proc", "no-libc", "select-sockets", "no-resource", "no-sigterm", "packed-fail",
            "no-packed", "cp1252"]


def simulate(switch, *argv, cache=None):
    """argv (a script and its flags, or -m module ...) run under one switch; (exit code, output).
    cache: the run's SEMIONLINE_CACHE (a fresh one: the decode plan measured under the switch)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", **{"SEMIONLINE_CACHE": str(cache)} if cache
               else {})
    if switch == "cp1252":   # a Windows console or pipe in the ANSI code page
        env["PYTHONIOENCODING"] = "cp1252"
        cmd = [sys.executable, *argv]
    else:
        cmd = [sys.executable, SIMULATE, switch, *argv]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=600)
    return p.returncode, (p.stdout + p.stderr).decode("utf-8", "replace")


@pytest.mark.parametrize("switch", SWITCHES)
def test_tiny_run_under_each_difference(switch, tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    rc, text = simulate(switch, "train.py", "--model", tiny_model_dir, "--train-data", data_file,
                        "--eval-problems", "2", "--batch-prompts", "2", "--n", "2",
                        "--max-new-tokens", "8", "--steps", "2", "--out", str(out),
                        cache=tmp_path / "cache")
    assert rc == 0, text[-3000:]
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2]
    # a peak this OS can tell (getrusage where there is no /proc): never a made-up 0
    assert all(r["peak_gb"] is None or r["peak_gb"] > 0 for r in log), log
    if switch != "no-resource":   # every simulated OS here still has one way to tell it
        assert all(r["peak_gb"] > 0 for r in log), log
    # resident memory now: unknown without /proc (getrusage has only the peak); glibc's free
    # bytes: unknown without its libc
    assert all((r["rss_gb"] is None) == (switch == "no-proc") for r in log), log
    assert all((r["heap_free_gb"] is None) == (switch == "no-libc") for r in log), log
    assert (out / "heldout_after.json").exists()
    if switch == "packed-fail":   # each form that failed to run: one line, and the run goes on
        assert "dropped" in text, text[-3000:]


@pytest.mark.parametrize("switch", ["no-resource", "no-libc", "no-sigterm", "no-packed"])
def test_the_suite_collects(switch):
    """Every test module imports there (Windows collected nothing: a module-level `import
    resource`)."""
    rc, text = simulate(switch, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider")
    assert rc == 0 and " error" not in text, text[-3000:]


def test_help_prints_in_a_cp1252_console():
    for script in ("train.py", "eval.py", "memory.py"):
        rc, text = simulate("cp1252", script, "--help")
        assert rc == 0 and "usage" in text, (script, text[-2000:])


def test_memory_plan_says_where_the_runtime_is_not_measured(tiny_model_dir):
    """Without /proc the plan's runtime is an estimate said as one, not a measured 0."""
    rc, text = simulate("no-proc", "memory.py", "--model", tiny_model_dir)
    runtime = [line for line in text.splitlines() if "runtime" in line]
    assert rc == 0 and runtime and "estimate" in runtime[0] and " 0.00 GB" not in runtime[0], text


def test_decode_and_memory_tests_take_the_forms_this_build_has():
    """A build without oneDNN's or MKL's packed matmuls (macOS, ARM) passes the tests that pick
    decode forms: they take the ones it has, not a pinned `1:onednn`."""
    rc, text = simulate("no-packed", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_memory.py", "tests/test_decode.py")
    assert rc == 0, text[-3000:]
