"""The s-curve sweep and its pilot end to end, 2 steps a run on a tiny random model (a smoke test:
the numbers mean nothing here), and its over-training metric by hand.  Run: pytest
tests/test_s_curve.py"""
import json
import os

import pytest

import s_curve

pytestmark = pytest.mark.slow   # the whole suite only: -m "not slow" leaves it out

TINY = [
    "--steps", "2", "--points", "2", "--eval-problems", "3", "--eval-samples", "2", "--pool", "8",
    "--quiet", "--n", "2", "--batch-prompts", "2", "--max-new-tokens", "4", "--difficulty", "1"]


def test_pilot_and_sweep_smoke(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sc"
    argv = [
        "--out",
        str(out), "--model", tiny_model_dir, *TINY, "--s-values", "1,2", "--middle", "2", "--seeds",
        "2"]
    pilot = s_curve.main(argv +
                         ["--pilot", "--arms", "dpo_s1,dpo_sinf,dpo_s1_nocrn,dpo_sinf_nocrn"])
    assert sorted(pilot) == ["dpo_s1", "dpo_s1_nocrn", "dpo_sinf", "dpo_sinf_nocrn"] and all(
        list(r) == [0, 1] for r in pilot.values())
    text = open(out / "pilot.md").read()
    assert "| dpo_s1 − dpo_sinf | math final | CRN | 2 seeds |" in text
    assert "| no CRN | 2 seeds |" in text
    run = out / "runs" / "dpo_s1-seed0"
    assert (run / "heldout_step1.json").exists() and json.load(open(run / "wall.json"))["commit"]
    # the pilot's CRN runs are the sweep's: reused, not rerun
    res = s_curve.main(argv + ["--side-seeds", "1"])
    assert sorted(res) == sorted(
        ["dpo_s1", "dpo_s2", "dpo_sinf", "dpo_sepoch", "grpo_s1", "dpo_s1_no_ref_sync"])
    assert list(res["dpo_s1"]) == [0, 1] and list(res["dpo_s2"]) == [0, 1] and list(
        res["grpo_s1"]) == [0]
    assert res["dpo_s1"][0]["wall_s"] == pilot["dpo_s1"][0]["wall_s"]
    text = open(out / "s_curve.md").read()
    assert "online ≫ offline" in text and "semi-online ≈ online" in text and "dpo_sepoch" in text
    for fig in ("fig_s_curve.png", "fig_ref_sync.png", "fig_curves.png"):
        assert os.path.getsize(out / fig) > 5000
    # the pilot's report again: its curves beside the sweep's, not over them
    sweep_curves = (out / "fig_curves.png").read_bytes()
    s_curve.main(argv + ["--pilot", "--arms", "dpo_s1,dpo_sinf,dpo_s1_nocrn,dpo_sinf_nocrn",
                         "--report-only"])
    assert (out / "fig_curves.png").read_bytes() == sweep_curves
    assert os.path.getsize(out / "fig_pilot_curves.png") > 5000
    assert not list((out / "runs").glob("*/ckpt-*"))


def fake(points):
    """A loaded run with held-out per-row scores at the given steps."""
    sc = lambda xs: {"scores": {f"r{i}": x for i, x in enumerate(xs)}}
    return {"points": {k: {"math": sc(xs)} for k, xs in points.items()}, "records": [], "wall_s": 1}


def test_final_and_second_half_scores_by_hand():
    run = fake({0: [0, 0], 2: [0, 0], 4: [1, 0], 6: [1, 1], 8: [0, 1]})
    assert s_curve.row_scores(run, "math", "final") == {"r0": 0, "r1": 1}
    # steps 4, 6, 8
    assert s_curve.row_scores(
        run, "math", "second half") == {"r0": pytest.approx(2 / 3), "r1": pytest.approx(2 / 3)}
    a = {0: fake({0: [0, 0], 2: [1, 1]}), 1: fake({0: [0, 0], 2: [1, 0]})}
    b = {0: fake({0: [0, 0], 2: [0, 1]}), 1: fake({0: [0, 0], 2: [0, 0]})}
    d, se, sd, how = s_curve.paired(a, b, "math", "final")   # per seed 0.5 and 0.5
    assert (d, se, sd, how) == (pytest.approx(0.5), pytest.approx(0.0), pytest.approx(0.0),
                                "2 seeds")
    d, se, sd, how = s_curve.paired({0: a[0]}, {0: b[0]}, "math", "final")   # one seed: rows 1, 0
    assert d == pytest.approx(0.5) and se == pytest.approx(
        0.5) and sd is None and how == "seed 0, 2 rows"


def test_bad_flags(tmp_path):
    with pytest.raises(SystemExit, match="2"):
        s_curve.main(["--out", str(tmp_path), "--middle", "3"])
    with pytest.raises(SystemExit, match="2"):
        s_curve.main(["--out", str(tmp_path), "--steps", "10", "--points", "4"])


def test_slope_against_log2_s_by_hand():
    # accuracies 0.6, 0.5, 0.4 at s = 1, 2, 4: −0.1 per doubling; SEs 0.02 each
    b, se = s_curve.slope([1, 2, 4], [0.6, 0.5, 0.4], [0.02, 0.02, 0.02])
    assert b == pytest.approx(-0.1) and se == pytest.approx((2 * 0.02 ** 2) ** 0.5 / 2)


def test_trend_and_length_verdicts():
    a = type("A", (), {"s_values": [1, 2, 4], "epoch_s": 8})()
    flat = lambda x: {0: fake({0: [0] * 4, 8: x})}
    res = {
        "dpo_s1": flat([1, 1, 1, 0]), "dpo_s2": flat([1, 1, 0, 1]), "dpo_s4": flat([1, 0, 1, 1]),
        "dpo_sinf": flat([0, 0, 0, 1])}
    lines = "\n".join(s_curve.shape_verdicts(res, a))
    assert "∞ lowest: yes" in lines and "| trend in s |" in lines and "not rising" in lines
    res["dpo_sinf"] = flat([1, 1, 1, 1])   # offline on top: the paper's shape not seen
    assert "∞ lowest: no" in "\n".join(s_curve.shape_verdicts(res, a))
    lengths = lambda xs: {0: {**fake({0: [0], 8: [0]}), "records": [{"length": x} for x in xs]}}
    res.update(dpo_s1=lengths([20] * 8), dpo_s1_no_ref_sync=lengths([20, 20, 12, 10, 8, 6, 5, 4]))
    assert ("| length collapse without πref sync | 20.0 → 4.5 (synced, same seeds: 20.0 → 20.0) "
            "| seen |") in "\n".join(s_curve.shape_verdicts(res, a))
    res["dpo_s1_no_ref_sync"] = lengths([20] * 8)
    assert "| not seen |" in "\n".join(s_curve.shape_verdicts(res, a))


def test_design_choice_picks_the_cheaper_design_for_the_equivalence_se():
    a = type("A", (), {"middle": 4})()
    one = lambda x: fake({0: [0] * 2, 8: x})
    # seeds k = (SD / 0.025)², never on an integer boundary, where float rounding would decide the
    # ceiling: CRN differences 0, 0.025 (SD 1.8 points: k 0.5, so the floor of 2); no CRN 0, 0, 0.5
    # (SD 28.9 points: k 133.3, so 134)
    res = {
        "dpo_s1": {0: one([0, 0]), 1: one([0, 0])}, "dpo_s4": {0: one([0, 0]), 1: one([0.05, 0])},
        "dpo_s1_nocrn": {s: one([0, 0])
                         for s in range(3)},
        "dpo_s4_nocrn": {0: one([0, 0]), 1: one([0, 0]), 2: one([1, 0])}}
    text = "\n".join(s_curve.design_choice(res, a, {"CRN": [600, 600], "no CRN": [300]}))
    assert "| CRN | 1.8 points | 2 seeds | 2 | 1.0 |" in text
    assert "| no CRN | 28.9 points | 3 seeds | 134 | 33.5 |" in text
    assert "**Choice: CRN**" in text
    del res["dpo_s4_nocrn"]
    assert "No choice yet" in "\n".join(
        s_curve.design_choice(res, a, {"CRN": [600], "no CRN": [300]}))


def test_pilot_report_compares_the_noise_of_the_two_designs():
    a = type("A", (), {"middle": 4, "note": "note"})()

    def one(x):   # greedy and sampled scored alike
        run = fake({0: [0] * 2, 8: x})
        for point in run["points"].values():
            point["math_sampled"] = point["math"]
        return run
    # greedy final s4 − s1 per seed: CRN 0, 0.5 (SD 0.354); no CRN 0, 1 (SD 0.707): ratio 2
    res = {
        "dpo_s1": {0: one([0, 0]), 1: one([0, 0])}, "dpo_s4": {0: one([0, 0]), 1: one([1, 0])},
        "dpo_s1_nocrn": {0: one([0, 0]),
                         1: one([0, 0])}, "dpo_s4_nocrn": {0: one([0, 0]), 1: one([1, 1])}}
    text = s_curve.pilot_report(res, a, "abc")
    assert "| dpo_s4 − dpo_s1 | math final | CRN | 2 seeds | 25.0 | 35.4 | 25.0 |" in text
    assert "over the 4 rows measured in both: median 2.00 (range 2.00–2.00; CRN lower in 4)" in text
    assert "4.0×" in text


def test_lengths_are_seed_means_and_the_collapse_verdict_is_paired():
    """Review (session 19): the table's length column showed the first seed only while the other
    columns are seed means, and the collapse verdict set one no-sync seed against the synced arm's
    mean over all its seeds: a synced seed 1 with short responses hid a collapse seen against seed
    0."""
    a = type("A", (), {"s_values": [1], "epoch_s": 8, "middle": 1, "note": "note"})()

    def run(xs):
        r = {
            **fake({0: [0], 8: [1]}), "records": [{"length": x, "step": i + 1, "staleness": 0}
                                                  for i, x in enumerate(xs)]}
        for point in r["points"].values():
            point["math"].update(mean=0.0, se=0.0)
            point["math_sampled"] = point["math"]
        return r
    # without sync 40 → 12 on seed 0: below half its start and below the synced seed 0's 20, though
    # above the synced arm's mean over both its seeds (20 and 2: 11), which the unpaired verdict
    # compared it with
    res = {
        "dpo_s1": {0: run([20] * 8), 1: run([2] * 8)},
        "dpo_s1_no_ref_sync": {0: run([40, 40, 30, 25, 20, 16, 12, 12])}}
    table = s_curve.sweep_report(res, a, "abc")
    # the mean of 20 and 2, not seed 0's 20
    assert "| dpo_s1 | 8 | 2 |" in table and "| 11.0 → 11.0 |" in table
    verdict = "\n".join(s_curve.shape_verdicts(res, a))
    assert ("| length collapse without πref sync | 40.0 → 12.0 (synced, same seeds: 20.0 → 20.0) "
            "| seen |") in verdict
