"""Faults lose nothing and nothing hangs: kills, signals, NaNs, bad input.
Run: pytest tests/test_reliability.py"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import start as run_start
import rewards
import train
from models import load_model
from conftest import toy_score

pytestmark = pytest.mark.slow   # the whole suite only: -m "not slow" leaves it out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the tiny model cannot do arithmetic: train it on a toy reward (the shortest response of a group
# scores 1)
RUNNER = ("import sys; sys.path.insert(0, 'tests'); import train; "
          "from conftest import toy_score; train.score = toy_score; "
          "train.main(sys.argv[1:])")


def args(model, data, out, steps=6):
    return [
        "--model", model, "--train-data", data, "--eval-problems", "0", "--batch-prompts", "2",
        "--n", "4", "--max-new-tokens", "8", "--lr", "1e-3", "--sync-every", "3", "--save-every",
        "1", "--steps",
        str(steps), "--keep", "2", "--out", out]


def start(argv):
    return subprocess.Popen([sys.executable, "-c", RUNNER, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def final_weights(out):
    from transformers import AutoModelForCausalLM
    ckpt = os.path.join(out, open(os.path.join(out, "latest")).read().strip())
    return AutoModelForCausalLM.from_pretrained(ckpt).state_dict(), [
        json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]


def wait_for_checkpoint(out, at_least, proc, timeout=120):
    t = time.time()
    while time.time() - t < timeout:
        latest = os.path.join(out, "latest")
        if os.path.exists(latest) and int(open(latest).read().strip().split("-")[1]) >= at_least:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.02)
    raise TimeoutError


def assert_same_run(a, b):
    (wa, la), (wb, lb) = a, b
    assert [r["step"] for r in lb] == [r["step"] for r in la]
    # a step may have no pair (loss null): null in the same places, the numbers close
    assert [r["loss"] is None for r in lb] == [r["loss"] is None for r in la]
    assert [r["loss"] for r in lb if r["loss"] is not None
            ] == pytest.approx([r["loss"] for r in la if r["loss"] is not None], rel=1e-5)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX")
def test_sigkill_at_random_moments_then_resume_matches_uninterrupted(tiny_model_dir, data_file,
                                                                     tmp_path):
    ref_out = str(tmp_path / "straight")
    p = start(args(tiny_model_dir, data_file, ref_out))
    assert p.wait(timeout=300) == 0, p.stdout.read()
    straight = final_weights(ref_out)
    rng = random.Random(0)
    for trial in range(2):
        out = str(tmp_path / f"killed{trial}")
        p = start(args(tiny_model_dir, data_file, out))
        wait_for_checkpoint(out, 1 + trial, p)
        time.sleep(rng.uniform(0.0, 0.3))   # somewhere in a step, a generation or a save
        p.send_signal(signal.SIGKILL)
        p.wait()
        r = start(args(tiny_model_dir, data_file, out) + ["--resume"])
        assert r.wait(timeout=300) == 0, r.stdout.read()
        assert_same_run(straight, final_weights(out))


@pytest.mark.skipif(sys.platform == "win32", reason="Windows ends a process at SIGTERM: no handler")
def test_sigterm_saves_and_exits_cleanly(tiny_model_dir, data_file, tmp_path):
    out = str(tmp_path / "term")
    argv = args(tiny_model_dir, data_file, out)
    argv[argv.index("--save-every") + 1] = "0"   # only the signal and the end save
    p = start(argv)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(out, "log.jsonl")) or not open(
            os.path.join(out, "log.jsonl")).read():
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    text = p.communicate(timeout=120)[0]
    assert p.returncode == 0 and "checkpoint saved" in text
    r = start(argv + ["--resume"])
    assert r.wait(timeout=300) == 0
    assert final_weights(out)[1][-1]["step"] == 6


def test_half_written_checkpoint_is_ignored(tiny_model_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "score", toy_score)
    out = tmp_path / "run"
    train.main(args(tiny_model_dir, data_file, str(out), steps=2))
    os.makedirs(out / "ckpt-000003.tmp")   # a save killed half-way
    (out / "ckpt-000003.tmp" / "config.json").write_text("{")
    res = train.main(args(tiny_model_dir, data_file, str(out), steps=3) + ["--resume"])
    assert [r["step"] for r in res["records"]] == [3]
    assert open(out / "latest").read() == "ckpt-000003" and not (out / "ckpt-000003.tmp").exists()


def test_nan_loss_skips_update_then_stops(tiny_model_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "score", toy_score)
    monkeypatch.setitem(train.LOSSES, "dpo",
                        {"fn": lambda b, a: (b["pi"].sum() * float("nan"), {}), "takes": "pairs"})
    before = {k: v.clone() for k, v in load_model(tiny_model_dir)[0].state_dict().items()}
    argv = args(tiny_model_dir, data_file, str(tmp_path / "nan"),
                steps=6) + ["--max-bad-steps", "100"]
    out = train.main(argv)
    # no update applied
    assert all(torch.equal(before[k], v) for k, v in out["policy"].state_dict().items())
    with pytest.raises(SystemExit, match="non-finite losses/gradients in a row"):
        train.main(
            args(tiny_model_dir, data_file, str(tmp_path / "nan2"), steps=6) +
            ["--max-bad-steps", "2"])


def test_failing_or_nan_reward_model_is_counted_not_fatal(tiny_model_dir, tmp_path, monkeypatch):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i}"}) + "\n" for i in range(6)))
    calls = []

    def flaky(name=None, judge=None, device=None, **kw):
        def rm(prompts, responses):
            calls.append(len(prompts))
            if len(calls) == 1:
                raise RuntimeError("RM server down")
            return [float("nan")] * len(prompts)
        return rm
    monkeypatch.setattr(run_start, "make_scalar_reward", flaky)
    out = train.main([
        "--model", tiny_model_dir, "--train-data",
        str(data), "--eval-problems", "0", "--batch-prompts", "2", "--n", "2", "--max-new-tokens",
        "4", "--steps", "4", "--sync-every", "2", "--out",
        str(tmp_path / "o")])
    assert all(r["loss"] is None and r["skipped"] == 2 for r in out["records"]) and len(calls) == 2


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="stops the grader with SIGSTOP (POSIX)")
def test_grading_timeouts_score_zero_and_are_reported(tiny_model_dir, data_file, tmp_path,
                                                      monkeypatch, capsys):
    # every response finds the grader stopped (SIGSTOP: it never answers, on any CPU); the 0.3 s
    # limit is real
    grade = rewards.math_reward

    def stalled(text, answer):
        grade("\\boxed{1}", "1")
        os.kill(rewards._grader.pid, signal.SIGSTOP)
        return grade(text, answer, time_limit=0.3)
    monkeypatch.setattr(rewards, "math_reward", stalled)
    monkeypatch.setitem(rewards.stats, "timeouts", 0)
    # grade: every response goes to the grader, cut at the cap or not
    out = train.main(
        args(tiny_model_dir, data_file, str(tmp_path / "o"), steps=1) +
        ["--n", "2", "--cut-responses", "grade"])
    r = out["records"][0]
    assert r["reward"] == 0.0 and r["pairs_used"] == 0 and r["skipped"] == 2
    assert rewards.stats["timeouts"] == 4
    assert "4 ran out of time" in capsys.readouterr().out


def test_long_prompts_skip_or_truncate(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "score", toy_score)
    data = tmp_path / "long.jsonl"
    rows = [{"problem": "What is 1 + 1?", "answer": "2"}, {"problem": "word " * 600, "answer": "1"}
            ] * 2
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [
        "--model", tiny_model_dir, "--train-data",
        str(data), "--eval-problems", "0", "--batch-prompts", "4", "--n", "2", "--max-new-tokens",
        "8", "--steps", "1"]
    out = train.main(base + ["--out", str(tmp_path / "s")])   # tiny model context: 512 positions
    r = out["records"][0]
    assert r["pairs_used"] + r["skipped"] == 2   # the two long prompts never reached the model
    out = train.main(base + ["--long-prompts", "truncate", "--out", str(tmp_path / "t")])
    r = out["records"][0]
    assert r["pairs_used"] + r["skipped"] == 4


def test_bad_model_and_out_paths(tiny_model_dir, tmp_path):
    (tmp_path / "notlm").mkdir()
    (tmp_path / "notlm" / "config.json").write_text('{"model_type": "not-a-model"}')
    with pytest.raises(SystemExit, match="cannot load a causal LM"):
        train.main(["--model", str(tmp_path / "notlm"), "--out", str(tmp_path / "o")])
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "file").write_text("")
    with pytest.raises(SystemExit, match="not writable"):
        train.main(["--model", tiny_model_dir, "--out", str(ro / "file" / "sub")])


def test_bad_train_data_names_file_and_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: missing field 'answer'"):
        train.main(
            ["--model", tiny_model_dir, "--train-data",
             str(bad), "--out",
             str(tmp_path / "o")])


@pytest.mark.parametrize("s", ["inf", "4"])
def test_resume_from_the_command_line(tiny_model_dir, data_file, tmp_path, s):
    """`python train.py ... --resume` as a user types it (no monkeypatch): 2 steps, then resumed to
    4, in fp32, where the engine's copy of the seed model keeps the storage the checkpoint loader
    memory-mapped (offline; sleep could not free it)."""
    argv = [
        sys.executable, "train.py", "--model", tiny_model_dir, "--train-data", data_file,
        "--eval-problems", "0", "--batch-prompts", "2", "--n", "4", "--max-new-tokens", "8",
        "--sync-every", s, "--rollout-dtype", "float32", "--train-dtype", "float32", "--out",
        str(tmp_path / "o")]
    for extra in (["--steps", "2"], ["--steps", "4", "--resume"]):
        p = subprocess.run(argv + extra, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"{extra}: exit {p.returncode}\n{p.stderr[-3000:]}"
    assert [json.loads(line)["step"] for line in open(tmp_path / "o" / "log.jsonl")] == [1, 2, 3, 4]
