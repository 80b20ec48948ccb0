"""eval.py: statistics against hand calculation, scoring, caching, tables, plots, selection.
Run: pytest tests/test_eval.py"""
import json
import math
import os

import pytest
import torch

import eval as ev
import logs
import rewards
import train
from conftest import write_sums
from models import load_model
from rollout import HFEngine

pytestmark = pytest.mark.slow   # the whole suite only: -m "not slow" leaves it out


def test_mean_se_hand():
    # [1, 0, 1, 1]: mean 0.75, sample variance (3·0.0625 + 0.5625)/3 = 0.25, SE = sqrt(0.25/4) =
    # 0.25
    assert logs.mean_se([1, 0, 1, 1]) == pytest.approx((0.75, 0.25))
    assert logs.mean_se([0.5]) == (0.5, 0.0)


def test_pass_at_k_hand():
    assert ev.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert ev.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)   # 1 - C(3,2)/C(5,2)
    assert ev.pass_at_k(5, 0, 3) == 0.0 and ev.pass_at_k(5, 3, 3) == 1.0


def test_win_rate_ties_count_half():
    wins, (m, se) = ev.win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 5.0, -1.0])
    assert wins == [1.0, 0.5, 0.0, 1.0] and m == pytest.approx(0.625)


def test_lc_win_rate_recovers_known_intercept():
    # wins drawn from P(win) = σ(0.5 + 2z) with the model ~1 std longer on average: raw win rate is
    # inflated by length, the length-controlled one should be σ(0.5) = 0.622
    g = torch.Generator().manual_seed(0)
    d = torch.randn(4000, generator=g) + 1.0
    z = d / d.std()
    wins = (torch.rand(4000, generator=g) < torch.sigmoid(0.5 + 2 * z)).float().tolist()
    lc = ev.lc_win_rate(wins, (d + 100).tolist(), [100.0] * 4000)
    raw = sum(wins) / len(wins)
    assert lc == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.03) and raw > lc + 0.1


def test_length_normalized_selection_discounts_length():
    # ckpt A: reward grows only with length (long responses); ckpt B: higher reward at equal length
    Lb = [10, 50, 90, 130]
    ra = [0.1 * l / 10 for l in [100, 140, 180, 220]]   # long and rewarded for it
    rb = [0.1 * l / 10 + 0.5 for l in Lb]
    norm = ev.length_normalized([ra, rb], [[100, 140, 180, 220], Lb])
    assert sum(ra) / 4 > sum(rb) / 4 and norm[1] > norm[0]


def test_render_table():
    t = ev.render_table({"seed": {"math500": {"mean": 0.474, "se": 0.012}}, "ours": {}},
                        ["math500", "amc23"])
    assert "| seed | 47.4 (1.2) |  |" in t and t.startswith("| model | math500 | amc23 |")


def test_score_math_known_responses():
    rows = [{"id": "a", "answer": "4"}, {"id": "b", "answer": "\\frac{1}{2}"}]
    gens = {"a": [{"text": "\\boxed{4}", "length": 3}, {"text": "\\boxed{5}", "length": 3}],
            "b": [{"text": "it is 0.5", "length": 4}, {"text": "no idea", "length": 2}]}
    per, summary = ev.score_math(rows, gens, 2)
    assert [p["correct"] for p in per] == [[1.0, 0.0], [1.0, 0.0]]
    assert summary["mean"] == 0.5 and summary["se"] == 0.0 and summary["pass@2"] == 1.0


def test_plot_writes_png(tmp_path):
    for name in ("a", "b"):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "log.jsonl", "w") as f:
            for s in range(1, 4):
                f.write(
                    json.dumps({
                        "step": s, "reward": s / 4, "accuracy": s / 4, "length": 10 + s,
                        "entropy": 1 / s, "k3_trained": None if s == 1 else 0.1 * s
                    }) + "\n")
    path = logs.plot_runs([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "fig.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 5000


def test_generation_cache_continues_interrupted_eval(tiny_model_dir, tmp_path, monkeypatch):
    model, tok = load_model(tiny_model_dir)
    engine = HFEngine(model, tok)
    rows = [{"id": str(i), "problem": f"What is {i}+1?", "answer": str(i + 1), "task": "math"}
            for i in range(5)]
    cache = str(tmp_path / "c.jsonl")
    ev.generate_cached(engine, tok, rows[:2], cache, 1, 0.0, 4)
    with open(cache, "a") as f:
        f.write('{"id": "2", "respo')   # a line cut by a kill
    asked = []
    orig = HFEngine.generate
    monkeypatch.setattr(HFEngine, "generate",
                        lambda self, p, **k: asked.append(len(p)) or orig(self, p, **k))
    gens = ev.generate_cached(engine, tok, rows, cache, 1, 0.0, 4)
    assert asked == [3] and sorted(gens) == ["0", "1", "2", "3", "4"]


def test_eval_main_prints_table(tiny_model_dir, tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    (d / "math500.jsonl").write_text("".join(
        json.dumps({"id": f"m{i}", "problem": f"{i}+{i}?", "answer": str(2 * i)}) + "\n"
        for i in range(6)))
    res = ev.main([
        "--model", tiny_model_dir, "--bench", "math500", "--limit", "4", "--data-dir",
        str(d), "--max-new-tokens", "4", "--k", "2", "--temperature", "1.0", "--out",
        str(tmp_path / "out")])
    r = res[tiny_model_dir]["math500"]
    assert 0 <= r["mean"] <= 1 and "pass@2" in r
    assert "| model | math500 |" in capsys.readouterr().out
    assert len(open(tmp_path / "out" / "table.md").read()) > 0
    per = [json.loads(l) for l in open(next((tmp_path / "out").glob("*.results.jsonl")))]
    assert len(per) == 4 and all(len(p["correct"]) == 2 for p in per)


def test_select_picks_a_checkpoint(tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "t.jsonl"
    write_sums(data, 8, 1)
    monkeypatch.setattr(rewards, "math_reward", lambda text, answer: float(len(text) % 2 == 0))
    run = tmp_path / "run"
    train.main([
        "--model", tiny_model_dir, "--train-data",
        str(data), "--eval-problems", "2", "--batch-prompts", "2", "--n", "4", "--max-new-tokens",
        "6", "--steps", "2", "--save-every", "1", "--out",
        str(run)])
    best = ev.main(["--select", str(run), "--max-new-tokens", "6", "--out", str(tmp_path / "sel")])
    out = capsys.readouterr().out
    assert best.endswith(("ckpt-000001", "ckpt-000002")) and "length-normalized reward" in out
    assert "picked on 1 validation rows; its reward on the other 1, which did not pick it" in out


def test_cache_tag_changes_when_checkpoint_is_rewritten(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"a" * 10)
    t1 = ev.cache_tag(str(d))
    os.utime(d / "model.safetensors", (1, 1))
    assert ev.cache_tag(str(d)) != t1 and ev.cache_tag("org/model") == "org_model"


def test_run_summary_reports_quarters_grading_failures_and_time():
    records = [{"reward": r, "truncated": 1 - r} for r in (0.0, 0.5, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0)]
    lines = logs.run_summary(records, {"graded": 8, "timeouts": 1, "errors": 0}, 12.4, "runs/x",
                             {"chosen": 20, "chosen_cut": 3}).splitlines()
    assert lines == [
        "rollout reward: first quarter 0.250 -> last quarter 1.000",
        "cut at the cap: first quarter 0.750 -> last quarter 0.000",
        "chosen responses cut at the cap: 3 of 20", "Math-Verify: 8 responses graded on rank 0, 1 "
        "ran out of time and 0 failed (all scored 0)",
        f"done in 12s; log: {os.path.join('runs/x', 'log.jsonl')}"]
    assert logs.run_summary(records[:3], {"graded": 3, "timeouts": 0, "errors": 0}, 1,
                            "o").startswith("done in 1s")


def test_eval_on_two_processes_scores_as_one(tiny_model_dir, tmp_path):
    """eval.py under torchrun: each rank generates its share of the rows (greedy), rank 0 gathers,
    scores and writes the same per-problem results and table as one process."""
    import os
    import subprocess
    import sys
    d = tmp_path / "data"
    d.mkdir()
    (d / "math500.jsonl").write_text("".join(
        json.dumps({"id": f"m{i}", "problem": f"{i}+{i}?", "answer": str(2 * i)}) + "\n"
        for i in range(7)))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [
        "eval.py", "--model", tiny_model_dir, "--bench", "math500", "--data-dir",
        str(d), "--max-new-tokens", "6", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    from conftest import free_port
    port = free_port()
    for procs, out in ((1, "one"), (2, "two")):
        cmd = [sys.executable, *argv, "--out", str(tmp_path / out)] if procs == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             "--master_port", str(port), *argv, "--out", str(tmp_path / out)]
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    per = {
        out: [json.loads(line) for line in open(next((tmp_path / out).glob("*.results.jsonl")))]
        for out in ("one", "two")}
    assert len(per["one"]) == 7 and per["two"] == per["one"]
    assert open(tmp_path / "two" / "table.md").read() == open(tmp_path / "one" / "table.md").read()


def test_four_runs_compare_at_a_glance(tmp_path, monkeypatch):
    """eval.py --plot of four runs: every run's held-out markers visible (none on top of another),
    one legend outside the panels, losses of different scales on one axis, a margin panel for the
    two preference runs, and a printed table of held-out numbers with SE and the paired change."""
    import matplotlib.pyplot as plt
    losses = {"dpo-s1": 0.69, "ipo-s1": 25.0, "dpo-s4": 0.69, "grpo-s1": 0.001}
    for i, (name, loss) in enumerate(losses.items()):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "log.jsonl", "w") as f:
            for s in range(1, 5):
                rec = {
                    "step": s, "reward": s / 5, "accuracy": s / 5, "length": 20 - s,
                    "entropy": 1 / s, "loss": loss / s, "k3_trained": 0.1 * s,
                    "grad_norm_pre_clip": 10.0 / s}
                if name.startswith(("dpo", "ipo")):
                    rec |= {"chosen_reward": 0.1 * s, "rejected_reward": -0.1 * s}
                f.write(json.dumps(rec) + "\n")
        for tag, scores in (("before", {"a": 1.0, "b": 0.0, "c": 0.0}),
                            ("after", {"a": 1.0, "b": 1.0, "c": float(i % 2)})):
            mean = sum(scores.values()) / 3   # every run scored on the same rows: the same "before"
            json.dump(
                {"math": {"mean": mean, "se": 0.27, "length": 10.0, "n": 3, "scores": scores}},
                open(tmp_path / name / f"heldout_{tag}.json", "w"))
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    runs = [str(tmp_path / n) for n in losses]
    logs.plot_runs(runs, str(tmp_path / "cmp.png"))
    fig = figs[0]
    panel = lambda label: next(  # noqa: E731
        ax for ax in fig.axes if ax.get_ylabel().startswith(label))
    held = panel("held-out")
    xs = [x for c in held.containers for x in c.lines[0].get_xdata()]   # one errorbar per marker
    # 4 runs x before/after, each at its own place
    assert len(xs) == 8 and len({round(float(x), 3) for x in xs}) == 8
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    # loss axis; margins of the three preference runs, none of grpo
    assert panel("loss").get_yscale() == "symlog"
    assert len(panel("implicit reward margin").lines) == 3
    assert panel("rollout reward = accuracy")   # math only: one panel for both
    table = logs.heldout_table(runs)
    assert "| dpo-s1 | math | 0.333 ± 0.270 | 0.667 ± 0.270 | +0.333 ± 0.333 | 3 |" in table
    assert "| ipo-s1 | math | 0.333 ± 0.270 | 1.000 ± 0.270 | +0.667 ± 0.333 | 3 |" in table
