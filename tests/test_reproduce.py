"""The reproduction sweep end to end, 2 steps per arm on a tiny random model (a smoke test: the
numbers mean nothing here), and its paired statistics by hand.  Run: pytest
tests/test_reproduce.py"""
import json
import os
import time

import pytest

import reproduce
import reproduce_report

pytestmark = pytest.mark.slow   # the whole suite only: -m "not slow" leaves it out


def test_sweep_smoke(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = [
        "--out",
        str(out), "--steps", "2", "--eval-problems", "3", "--eval-samples", "2", "--chat-problems",
        "2", "--pool", "8", "--seeds", "2", "--s-values", "1,2", "--quiet", "--model",
        tiny_model_dir, "--n", "2", "--batch-prompts", "2", "--max-new-tokens", "4"]
    res = reproduce.main(argv)
    names = [
        "offline", "iterative", "semi_online_s1", "semi_online_s2", "online_dpo", "grpo",
        "group_dpo", "group_dpo+grpo", "online_dpo_no_ref_sync", "online_dpo+entropy",
        "online_dpo+nll", "chat_only", "math+chat"]
    assert list(res) == names
    headline = {"offline", "semi_online_s1", "online_dpo", "grpo"}
    assert all(list(runs) == ([0, 1] if name in headline else [0]) for name, runs in res.items())
    runs = out / "runs"
    # the seed model's score is made once per held-out set and shared: only the first arm on each
    # set scored it
    assert sorted(p.name for p in runs.glob("before-*")) == ["before-math.json", "before-mix.json"]
    # offline and online_dpo
    assert sum((runs / f"{n}-seed0" / "heldout_before.json").exists() for n in names) == 2
    # every arm of a seed was scored on the same held-out rows; the sweep keeps no checkpoints
    ids = {frozenset(r[0]["after"]["math"]["scores"]) for r in res.values()}
    assert len(ids) == 1 and len(next(iter(ids))) == 3
    assert not list(runs.glob("*/ckpt-*"))
    table = open(out / "results.md").read()
    assert all(name in table
               for name in names) and "Paired differences" in table and "Table 3" in table
    for fig in ("fig2_ref_sync.png", "fig3_regimes.png", "fig_accuracy.png", "fig_table3.png"):
        assert os.path.getsize(out / fig) > 5000
    # a rerun reuses every finished arm: nothing trains again
    mtimes = {p: p.stat().st_mtime for p in runs.glob("*/log.jsonl")}
    capsys.readouterr()
    reproduce.main(argv)
    assert {p: p.stat().st_mtime for p in runs.glob("*/log.jsonl")} == mtimes


def fake_run(math, before=None, chat=None, chat_before=None):
    """A loaded run whose per-row scores are given."""
    sc = lambda xs: {
        "scores": {f"r{i}": x
                   for i, x in enumerate(xs)}, "n": len(xs), "mean": sum(xs) / len(xs)}
    r = {
        "after": {"math": sc(math), "math_sampled": sc(math)},
        "before": {"math": sc(before or math)}}
    if chat:
        r["after"]["chat"], r["before"]["chat"] = sc(chat), sc(chat_before)
    return r


def test_paired_differences_and_verdicts():
    a = {0: fake_run([1, 1, 0, 1]), 1: fake_run([1, 0, 0, 1])}
    b = {0: fake_run([0, 1, 0, 0]), 1: fake_run([0, 0, 0, 1])}
    d, se, how = reproduce_report.paired(a, b, "math")   # per seed: 0.5 and 0.25
    assert (d, how) == (pytest.approx(0.375), "2 seeds") and se == pytest.approx(0.125)
    # one seed: per-row differences 1, 0, 0, 1
    d, se, how = reproduce_report.paired({0: a[0]}, {0: b[0]}, "math")
    assert d == pytest.approx(0.5) and se == pytest.approx(0.2887,
                                                           abs=1e-4) and how == "seed 0, 4 rows"
    assert reproduce_report.verdict(0.10, 0.02, ">") == "reproduced"
    assert reproduce_report.verdict(-0.10, 0.02, ">") == "reversed"
    assert reproduce_report.verdict(0.01, 0.01, "≈") == "equivalent"
    assert reproduce_report.verdict(0.01, 0.03, "≈") == "inconclusive"
    # beyond 2 SE: the paper's ≈ not seen
    assert reproduce_report.verdict(-0.29, 0.11, "≈") == "different"
    assert reproduce_report.verdict(0.05, 0.03, ">") == "inconclusive"
    assert reproduce_report.verdict(0.01, 0.01, "≳") == "equivalent"
    assert reproduce_report.verdict(0.10, 0.02, "≳") == "reproduced"
    w = reproduce_report.chat_wins(fake_run([1], chat=[0.9, 0.2, 0.5], chat_before=[0.1, 0.4, 0.5]))
    assert list(w.values()) == [1.0, 0.0, 0.5]


def test_bad_flags_refused_before_any_run(tmp_path, capsys):
    for argv, flag in ((["--arms", "offline,nope"], "--arms"), (["--s-values", "4"], "--s-values"),
                       (["--s-values", "4,x"], "--s-values"), (["--lr", "-1"], "--lr")):
        with pytest.raises(SystemExit):
            reproduce.main(["--out", str(tmp_path / "o"), *argv])
        assert flag in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_wall_time_of_a_resumed_run_counts_every_segment(tmp_path, monkeypatch):
    """A run stopped (SIGTERM: train.py checkpoints and exits; SIGKILL: it just dies) and resumed
    costs both segments: wall.json sums them, the stopped one ending at its last file written."""
    import subprocess as sp
    from types import SimpleNamespace
    a = SimpleNamespace(out=str(tmp_path), quiet=True, steps=2, eval_samples=1)
    out = tmp_path / "runs" / "dpo-seed0"
    calls = []

    def fake_train(argv, check, stdout):
        calls.append(argv)
        out.mkdir(parents=True, exist_ok=True)
        (out / "heldout_before.json").write_text("{}")
        (out / "log.jsonl").write_text("{}\n")
        if len(calls) == 1:   # the first segment: 100 s of work, then killed
            t = time.time() + 100
            os.utime(out / "log.jsonl", (t, t))
            raise sp.CalledProcessError(-9, argv)
        (out / "heldout_after.json").write_text("{}")

    monkeypatch.setattr(reproduce.subprocess, "run", fake_train)
    paths = {"train_math": "t.jsonl", "heldout_math": "h.jsonl"}
    with pytest.raises(sp.CalledProcessError):
        reproduce.run_arm("dpo", [], "math", 0, a, paths, [])
    assert reproduce.run_arm("dpo", [], "math", 0, a, paths, [])
    wall = json.load(open(out / "wall.json"))
    assert wall["wall_s"] >= 100 and wall["segments"] == 2
    # the committed runs' decode, bit for bit: not a plan measured on whatever machine reruns them
    assert " --decode-matmul weight-first " in " ".join(calls[0]) + " "
    assert not reproduce.run_arm("dpo", [], "math", 0, a, paths, [])   # finished: skipped


def test_quick_says_whether_it_showed_online_over_offline(tmp_path, monkeypatch):
    """--quick runs online vs offline DPO on its own defaults (flags given still win) and states its
    one finding: reproduced, or in words that this run could not show it."""
    seen = []
    monkeypatch.setattr(
        reproduce, "run_arm", lambda name, flags, evalset, seed, a, paths, passthrough: seen.append(
            (name, seed, a, passthrough)) or False)
    with pytest.raises(SystemExit, match="no finished runs yet"):
        reproduce.main(["--out", str(tmp_path), "--quick", "--steps", "8"])
    assert sorted({(n, s)
                   for n, s, _, _ in seen}) == [(n, s) for n in ("offline", "online_dpo")
                                                for s in range(3)]
    a, passthrough = seen[0][2], seen[0][3]
    assert (a.steps, a.pool, a.eval_problems, a.ref_sync_every) == (8, 256, 128, 16)
    assert passthrough[passthrough.index("--lr") + 1] == "1e-5"
    big = {s: fake_run([1, 1, 1, 0] if s else [1, 1, 1, 1]) for s in range(3)}
    small = {s: fake_run([0, 0, 1, 0]) for s in range(3)}
    text = reproduce_report.quick_finding({"online_dpo": big, "offline": small})
    assert text.count("**reproduced**") == 2 and "not" not in text
    # d per seed 0, +¼, −¼
    noisy = {0: fake_run([1, 0, 0, 0]), 1: fake_run([0, 0, 1, 1]), 2: fake_run([0, 0, 0, 0])}
    text = reproduce_report.quick_finding({"online_dpo": noisy, "offline": small})
    assert "**inconclusive**" in text and "does **not** show online ≫ offline" in text


def test_quick_end_to_end(tiny_model_dir, tmp_path, capsys):
    """--quick on a tiny model: two arms × its seeds, then its report, figures and finding (the
    numbers mean nothing here); online DPO seed 0 is scored on math only, without Table 3's arms."""
    out = tmp_path / "quick"
    res = reproduce.main([
        "--quick", "--out",
        str(out), "--steps", "2", "--seeds", "2", "--eval-problems", "3", "--pool", "8", "--quiet",
        "--model", tiny_model_dir, "--n", "2", "--batch-prompts", "2", "--max-new-tokens", "4"])
    assert sorted(res) == ["offline", "online_dpo"] and all(list(r) == [0, 1] for r in res.values())
    assert "chat" not in res["online_dpo"][0]["after"] and not (out / "fig_table3.png").exists()
    text = open(out / "results.md").read()
    assert "## The quick look: online ≫ offline?" in text and "online DPO − offline DPO" in text
    assert "The quick look" in capsys.readouterr().out
