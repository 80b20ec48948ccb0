"""
Held-out accuracy as a function of s (--sync-every), from online (s = 1) through semi-online to
offline (s = ∞): the paper's central picture (§2.3, Table 1: s = 1 ≈ 10 ≈ 100 ≫ ∞) at small
scale, as a paired experiment with common random numbers.

    python experiments/s_curve.py --pilot          # the noise first: 3 arms × 4 seeds, with and
    without CRN
    python experiments/s_curve.py                  # the sweep: s ∈ {1, 2, 4, 8, 16, ∞, epoch},
    GRPO, no πref sync
    python experiments/s_curve.py --report-only    # tables and figures from the runs finished so
    far

Design (README "The s-curve" states the verdict rules, fixed before the run):
- Paired: for a given seed every arm trains on the same prompts in the same order from the same
  seed model and is scored on the same held-out rows. With common random numbers (train.py's
  default) arms with equal weights also draw the same rollouts and the same held-out samples, so
  two arms differ only through what they learned; --no-crn arms draw from one stream instead.
- Metric: held-out greedy and sampled accuracy at every 1/8 of the run (train.py --eval-every),
  reported as the final value and as the mean over the second half of the run (an area under the
  curve, which averages out a single endpoint's luck). Differences are paired per seed, then mean
  ± SE over seeds (one shared seed: over the per-problem differences).
- Each run is one train.py process, resumable; finished runs are skipped on a rerun.
Outputs in --out: s_curve.md (or pilot.md), fig_s_curve.png, fig_ref_sync.png, fig_curves.png
(or fig_pilot_curves.png), runs/.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

# the reference's files
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flags import POSITIVE_INT, HelpFormatter, make_writable, number, out_dir
from host import console
from logs import mean_se
from reproduce import run_arm, write_data
from reproduce_report import MARGIN, paired_scores, summary, trend, verdict

METRICS = (("math", "final"), ("math", "second half"), ("math_sampled", "final"), ("math_sampled",
                                                                                   "second half"))
# the pilot's two designs and their arms' name suffix
DESIGNS = (("CRN", ""), ("no CRN", "_nocrn"))
# The paper's Table 1, MATH500 accuracy (%) of Llama-3.1-8B-Instruct trained on NuminaMath: the seed
# model, DPO by s, GRPO (s = 1). ../shared/PAPER_NOTES.md does not carry Table 1; these are as
# transcribed in a public summary of the paper, which has no s = 10 row (left out here).
TABLE1_MATH500 = {"seed": 47.4, "1": 58.7, "100": 58.9, "inf": 53.7, "grpo": 58.1}


def arms(a):
    """arm -> (train.py flags, seeds). DPO arms sync πref every --ref-sync-every steps, except
    offline (πref = the seed model, as the paper's offline DPO); the pilot's are also run without
    CRN."""
    ref = ["--ref-sync-every", str(a.ref_sync_every)]
    dpo = lambda s: ["--loss", "dpo", "--sync-every", s] + (ref if s != "inf" else [])
    headline = {"dpo_s1", f"dpo_s{a.middle}", "dpo_sinf"}
    table = {f"dpo_s{s}": dpo(s) for s in [*map(str, a.s_values), "inf", "epoch"]}
    if a.pilot:
        table = {n: f for n, f in table.items() if n in headline}
        table.update({f"{n}_nocrn": f + ["--no-crn"] for n, f in table.items()})
    else:
        table.update({
            "grpo_s1": ["--loss", "grpo", "--sync-every", "1"],
            "dpo_s1_no_ref_sync": ["--loss", "dpo", "--sync-every", "1"]})
    return {
        n: (f, range(a.seeds) if n.removesuffix("_nocrn") in headline else range(a.side_seeds))
        for n, f in table.items()}


def load(a, name, seed):
    """One finished run: its log, held-out results per scored step (0 = the seed model), wall
    time."""
    out = os.path.join(a.out, "runs", f"{name}-seed{seed}")
    points = {0: json.load(open(os.path.join(a.out, "runs", "before-math.json"))),
              a.steps: json.load(open(os.path.join(out, "heldout_after.json")))}
    for f in os.listdir(out):
        if f.startswith("heldout_step"):
            points[int(f[len("heldout_step"):-len(".json")])] = json.load(open(os.path.join(out,
                                                                                            f)))
    return {
        "records": [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))],
        "points": dict(sorted(points.items())), **json.load(open(os.path.join(out, "wall.json")))}


def row_scores(run, metric, kind):
    """{held-out row: score} of one run: at the last step ("final"), or averaged over the scored
    steps of the second half of the run ("second half", steps ≥ half of the run, the end
    included)."""
    last = max(run["points"])
    steps = [k for k in run["points"] if k >= last / 2] if kind == "second half" else [last]
    rows = run["points"][last][metric]["scores"]
    return {i: sum(run["points"][k][metric]["scores"][i] for k in steps) / len(steps) for i in rows}


def arm(runs, metric, kind):
    """(mean, SE) of an arm's runs {seed: run}: over seeds when there are several, else over
    rows."""
    return summary([row_scores(r, metric, kind) for r in runs.values()])


def paired(runs_a, runs_b, metric, kind):
    """A − B: (mean, SE, SD over seeds or None, how) over the seeds both arms have
    (reproduce.paired_scores)."""
    return paired_scores(*({s: row_scores(r, metric, kind)
                            for s, r in runs.items()} for runs in (runs_a, runs_b)))


def s_value(name, a):
    """The arm's s as a number for the x axis: epoch at its steps per pass over the pool, ∞ right of
    everything."""
    s = name.removeprefix("dpo_s").split("_")[0]   # dpo_s4_nocrn, dpo_s1_no_ref_sync: 4, 1
    return {"inf": 2 * max(*a.s_values, a.epoch_s), "epoch": a.epoch_s}.get(s) or int(s)


def slope(s, means, ses):
    """Least-squares slope of accuracy against log2 s, per doubling of s, and its SE taking the arms
    as independent: b = Σ (x − x̄)(y − ȳ) / Σ (x − x̄)², Var b = Σ (x − x̄)² SE² / (Σ (x − x̄)²)², x
    = log2 s.
    (The arms share seeds and random numbers, so independent SEs overstate the slope's:
    conservative.)"""
    x = [math.log2(v) for v in s]
    xm, ym = sum(x) / len(x), sum(means) / len(means)
    sxx = sum((v - xm) ** 2 for v in x)
    b = sum((v - xm) * (y - ym) for v, y in zip(x, means)) / sxx
    return b, math.sqrt(sum((v - xm) ** 2 * e ** 2 for v, e in zip(x, ses))) / sxx


def shape_verdicts(res, a):
    """The two verdicts fixed in README that are not one paired difference: the trend in s (greedy
    second-half accuracy does not rise with s among the finite s, and ∞ is lowest) and the length
    collapse without πref sync (its rollout length ends below half its start and below the synced
    arm's)."""
    L = ["| finding | measured | verdict |", "|---|---|---|"]
    finite = sorted([
        n for n in res
        if n.startswith("dpo_s") and n.removeprefix("dpo_s") in [*map(str, a.s_values), "epoch"]
    ], key=lambda n: s_value(n, a))
    if len(finite) >= 2 and "dpo_sinf" in res:
        ms = [arm(res[n], "math", "second half") for n in finite]
        b, se = slope([s_value(n, a) for n in finite], [m for m, _ in ms], [e for _, e in ms])
        inf, low = arm(res["dpo_sinf"], "math", "second half")[0], min(m for m, _ in ms)
        lowest = inf < low
        v = ("rises with s (not the paper's)" if b > 2 *
             se else "as the paper: not rising with s, ∞ lowest"
             if lowest else "not rising with s, but ∞ not lowest")
        L.append(f"| trend in s | greedy 2nd half {100 * b:+.1f} ± "
                 f"{100 * se:.1f} points per doubling of s over "
                 f"{', '.join(n.removeprefix('dpo_s') for n in finite)}; "
                 f"∞ lowest: {'yes' if lowest else 'no'} "
                 f"(∞ {100 * inf:.1f} %, lowest finite {100 * low:.1f} %) | {v} |")
    # set against the synced arm on the same seeds (paired, as every difference here)
    free = res.get("dpo_s1_no_ref_sync", {})
    synced = {s: r for s, r in res.get("dpo_s1", {}).items() if s in free}
    if synced:
        (f0, f1), (s0, s1) = trend(free, "length"), trend(synced, "length")
        seen = f1 < f0 / 2 and f1 < s1
        L.append(f"| length collapse without πref sync | {f0:.1f} → "
                 f"{f1:.1f} (synced, same seeds: {s0:.1f} → {s1:.1f}) | "
                 f"{'seen' if seen else 'not seen'} |")
    return L


def pilot_report(res, a, commit):
    pct = lambda x: f"{100 * x:.1f}"
    L = [
        f"# s-curve pilot (commit {commit})", "", a.note, "",
        "The paired difference of two arms per seed; its SD over "
        "seeds is the noise a sweep of this design has to beat "
        "(the SE of a k-seed mean is SD/√k). CRN: common random "
        "numbers (train.py's default); no CRN: one random stream.", "",
        "| difference | metric | design | seeds "
        "| mean (points) | SD over seeds | SE |", "|---|---|---|---|---|---|---|"]
    pairs, ratios = [("dpo_s1", "dpo_sinf"), (f"dpo_s{a.middle}", "dpo_s1"),
                     (f"dpo_s{a.middle}", "dpo_sinf")], []
    for x, y in pairs:
        for metric, kind in METRICS:
            sd = {}
            for design, suffix in DESIGNS:
                p = paired(res.get(x + suffix, {}), res.get(y + suffix, {}), metric, kind)
                if p:
                    sd[design] = p[2]
                    L.append(f"| {x} − {y} | {metric} {kind} | {design} | {p[3]} | {pct(p[0])} "
                             f"| {pct(p[2]) if p[2] is not None else '–'} | {pct(p[1])} |")
            if None not in sd.values() and len(sd) == 2 and sd["CRN"] > 0:
                ratios.append(sd["no CRN"] / sd["CRN"])
    if ratios:
        r = statistics.median(ratios)
        L += [
            "", f"SD without CRN ÷ SD with CRN, over the {len(ratios)} "
            f"rows measured in both: median {r:.2f} (range "
            f"{min(ratios):.2f}–{max(ratios):.2f}; CRN lower in "
            f"{sum(x > 1 for x in ratios)}); the seeds for a given SE "
            f"scale with its square, {r ** 2:.1f}×."]
    walls = {
        d: [
            r["wall_s"] for n, runs in res.items() if n.endswith("_nocrn") == bool(suffix)
            for r in runs.values()]
        for d, suffix in DESIGNS}
    cost = lambda w: (f"{len(w)} runs × {statistics.median(w) / 60:.1f} min = "
                      f"{len(w) * statistics.median(w) / 3600:.2f} h" if w else "none yet")
    L += [
        "", f"Cost on this machine, runs × the median wall time of "
        f"a run (a run resumed before its wall.json summed "
        f"its segments counted only its last): CRN "
        f"{cost(walls['CRN'])}; no CRN {cost(walls['no CRN'])}.", "", "## The choice of design", "",
        *design_choice(res, a, walls)]
    return "\n".join(L) + "\n"


def design_choice(res, a, walls):
    """Which design decides semi-online ≈ online cheaper: the seeds k each needs for SE = SD/√k ≤
    MARGIN/2 on the verdict's difference (middle s − s = 1, greedy second half), so that d ≈ 0 reads
    equivalent, and the CPU hours of k seeds of the three headline arms at that design's median
    run."""
    L, need = ["| design | SD of middle s − s = 1 (greedy 2nd half) | over | seeds for SE ≤ "
               f"{50 * MARGIN:.1f} | CPU hours for them (3 arms) |", "|---|---|---|---|---|"], {}
    for design, suffix in DESIGNS:
        p = paired(res.get(f"dpo_s{a.middle}{suffix}", {}), res.get(f"dpo_s1{suffix}", {}), "math",
                   "second half")
        if not p or p[2] is None or not walls[design]:
            L.append(f"| {design} | – | {p[3] if p else 'no runs'} | – | – |")
            continue
        k = max(2, math.ceil((p[2] / (MARGIN / 2)) ** 2))
        need[design] = k * 3 * statistics.median(walls[design]) / 3600
        L.append(f"| {design} | {100 * p[2]:.1f} points | {p[3]} | {k} | {need[design]:.1f} |")
    if len(need) == 2:
        best = min(need, key=need.get)
        L += [
            "", f"**Choice: {best}** — it reaches that SE for {need[best]:.1f} CPU hours against "
            f"{max(need.values()):.1f}. An SD from a few seeds is "
            f"itself rough (from 4 seeds its 95 % interval spans "
            "about 0.57× to 3.7× the estimate; from fewer, wider), so "
            "the sweep reports the SE it reached beside each verdict."]
    else:
        L += [
            "", "No choice yet: each design needs at least "
            "2 paired seeds of the middle s and s = 1."]
    return L


def seed_model(res):
    """The seed model's held-out scores: step 0 of any run (every run starts from it, scored on the
    same rows)."""
    return next(iter(next(iter(res.values())).values()))["points"][0]


def sweep_report(res, a, commit):
    pct = lambda m, se: f"{100 * m:.1f} ± {100 * se:.1f}"
    b = seed_model(res)
    L = [
        f"# s-curve sweep (commit {commit})", "", a.note, "",
        f"Seed model: greedy {pct(b['math']['mean'], b['math']['se'])} %, "
        f"sampled {pct(b['math_sampled']['mean'], b['math_sampled']['se'])} %.", "",
        "| arm | syncs | seeds | greedy final | greedy 2nd half | sampled final | "
        "sampled 2nd half | length, first → last quarter | wall (min, median) |",
        "|---|---|---|---|---|---|---|---|---|"]
    for name, runs in sorted(
            res.items(), key=lambda kv: (not kv[0].startswith("dpo_s"), s_value(kv[0], a)
                                         if kv[0].startswith("dpo_s") else 0)):
        rv = list(runs.values())
        cells = [pct(*arm(runs, m, k)) for m, k in METRICS]
        first, last = trend(runs, "length")   # mean over seeds, as the other columns
        syncs = len({x["step"] - x["staleness"] for x in rv[0]["records"]})
        L.append(f"| {name} | {syncs} | {len(rv)} | "
                 f"{' | '.join(cells)} | {first:.1f} → {last:.1f} | "
                 f"{statistics.median(r['wall_s'] for r in rv) / 60:.1f} |")
    mid = f"dpo_s{a.middle}"
    rows = [("online ≫ offline", "dpo_s1", "dpo_sinf", ">"),
            ("semi-online ≈ online", mid, "dpo_s1", "≈"),
            ("semi-online ≫ offline", mid, "dpo_sinf", ">"),
            ("online DPO ≳ GRPO", "dpo_s1", "grpo_s1", "≳"),
            ("πref sync helps", "dpo_s1", "dpo_s1_no_ref_sync", ">")]
    L += [
        "", "## Paired differences (percentage points) and verdicts", "",
        f"**reproduced**: the paper's sign beyond 2 SE; **equivalent**: "
        f"|d| + 2 SE < {100 * MARGIN:.0f} points; **reversed**: the other "
        "sign beyond 2 SE; **different**: the paper's "
        "≈ with |d| > 2 SE; else **inconclusive**.", "", "| finding | difference | paper | "
        "metric | d ± SE | over | verdict |", "|---|---|---|---|---|---|---|"]
    for label, x, y, expect in rows:
        for metric, kind in METRICS:
            p = paired(res.get(x, {}), res.get(y, {}), metric, kind)
            if p:
                L.append(f"| {label} | {x} − {y} | {expect} | {metric} {kind} | "
                         f"{pct(*p[:2])} | {p[3]} | {verdict(p[0], p[1], expect)} |")
    L += [
        "", "## The shape of the curve, "
        "and length without πref sync", "", *shape_verdicts(res, a)]
    return "\n".join(L) + "\n"


def figures(res, a):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [3, 3, 2]})
    dpo = sorted(
        [n for n in res if n.startswith("dpo_s") and not n.endswith(("_nocrn", "no_ref_sync"))],
        key=lambda n: s_value(n, a))
    for ax, kind in zip(axes, ("final", "second half")):
        for metric, label in (("math", "greedy"), ("math_sampled", "sampled")):
            xs = [s_value(n, a) for n in dpo]
            ms = [arm(res[n], metric, kind) for n in dpo]
            m, se = [100 * x for x, _ in ms], [100 * e for _, e in ms]
            line = ax.errorbar(xs, m, yerr=se, marker="o", capsize=3, label=f"DPO, {label}")
            ax.axhline(100 * seed_model(res)[metric]["mean"], ls=":", color=line[0].get_color(),
                       label=f"seed model, {label}")
            ax.fill_between(xs, [v - e for v, e in zip(m, se)], [v + e for v, e in zip(m, se)],
                            alpha=0.15)
            if "grpo_s1" in res:
                ax.scatter([1], [100 * arm(res["grpo_s1"], metric, kind)[0]], marker="*", s=90,
                           zorder=3, label=f"GRPO (s = 1), {label}")
        ax.set_xscale("log", base=2)
        ax.set_xticks([s_value(n, a) for n in dpo],
                      [n.removeprefix("dpo_s").replace("inf", "∞") for n in dpo])
        ax.set_xlabel("s: optimizer steps between syncs (log axis)")
        ax.set_ylabel(f"held-out accuracy (%), {kind}, ± SE")
        ax.set_title(f"this repository: {kind}", fontsize=9)
    axes[1].legend(fontsize=7)
    paper_panel(axes[2])
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "fig_s_curve.png"), dpi=110)
    plt.close(fig)
    if "dpo_s1" in res and "dpo_s1_no_ref_sync" in res:   # Fig. 2 analogue
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for ax, key in zip(axes, ("length", "reward")):
            for n in ("dpo_s1", "dpo_s1_no_ref_sync"):
                run = res[n][min(res[n])]
                ax.plot([x["step"] for x in run["records"]], [x[key] for x in run["records"]],
                        label=f"{n} (seed {min(res[n])})")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(f"rollout {key}")
            ax.legend(fontsize=7)
        fig.suptitle("Fig. 2 analogue: online DPO with and without πref sync")
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, "fig_ref_sync.png"), dpi=110)
        plt.close(fig)


def paper_panel(ax):
    """The paper's Table 1 (MATH500) on the same kind of axis: DPO at s = 1, 100 and ∞, GRPO at s =
    1, the seed model."""
    t, xs = TABLE1_MATH500, {"1": 1, "100": 100, "inf": 1000}
    ax.plot(list(xs.values()), [t[k] for k in xs], marker="o", color="k", label="DPO")
    ax.scatter([1], [t["grpo"]], marker="*", s=90, color="k", zorder=3, label="GRPO (s = 1)")
    ax.axhline(t["seed"], ls=":", color="grey", label="seed model")
    ax.set_xscale("log")
    ax.set_xticks(list(xs.values()), ["1", "100", "∞"])
    ax.set_xlabel("s")
    ax.set_ylabel("MATH500 (%)")
    ax.set_title("paper, Table 1: Llama-3.1-8B, ~1000 steps", fontsize=9)
    ax.legend(fontsize=7)


def curves(res, a):
    """fig_curves.png (the pilot's: fig_pilot_curves.png, beside the sweep's): held-out accuracy
    against step per arm (mean ± SE over seeds; no CRN dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    # an arm and its no-CRN twin share a colour
    bases = sorted({n.removesuffix("_nocrn") for n in res})
    for ax, (metric, label) in zip(axes, (("math", "greedy"), ("math_sampled", "sampled"))):
        for n, runs in sorted(res.items()):
            steps = sorted(set.intersection(*(set(r["points"]) for r in runs.values())))
            ms = [mean_se([r["points"][k][metric]["mean"] for r in runs.values()]) for k in steps]
            m, se = [100 * x for x, _ in ms], [100 * e for _, e in ms]
            style = dict(ls="--" if n.endswith("_nocrn") else "-",
                         color=f"C{bases.index(n.removesuffix('_nocrn')) % 10}")
            ax.plot(steps, m, marker=".", label=f"{n} ({len(runs)} seed{'s' * (len(runs) > 1)})",
                    **style)
            ax.fill_between(steps, [v - e for v, e in zip(m, se)], [v + e for v, e in zip(m, se)],
                            alpha=0.12, color=style["color"])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"held-out accuracy (%), {label}")
        ax.set_title("mean ± SE over seeds; dashed: no common random numbers", fontsize=9)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "fig_pilot_curves.png" if a.pilot else "fig_curves.png"),
                dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    """(the sweep's flags, the train.py flags every run gets, the arms to run); train.py's are
    checked here, before the first run's process."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", type=out_dir, default="experiments/s-curve",
                   help="where runs, tables and figures go")
    p.add_argument("--pilot", action="store_true", help="the noise pilot: s = 1, the middle "
                   "s and ∞, each with and without CRN")
    p.add_argument("--steps", type=POSITIVE_INT, default=128, help="optimizer steps per run (the "
                   "largest s syncs steps/s times)")
    p.add_argument("--s-values", type=lambda t: [POSITIVE_INT(x) for x in t.split(",")],
                   default=[1, 2, 4, 8, 16],
                   help="the finite s of the sweep, comma-separated (∞ and epoch are always added)")
    p.add_argument("--middle", type=POSITIVE_INT, default=4, help="the semi-online s run with "
                   "every seed, as s = 1 and ∞ are")
    p.add_argument("--seeds", type=POSITIVE_INT, default=4,
                   help="seeds of s = 1, the middle s and ∞")
    p.add_argument("--side-seeds", type=POSITIVE_INT, default=1, help="seeds of the other arms")
    p.add_argument("--points", type=POSITIVE_INT, default=8, help="held-out scores per run, evenly "
                   "spaced (the last at the end)")
    p.add_argument("--ref-sync-every", type=POSITIVE_INT, default=16,
                   help="πref := πθ every k steps in "
                   "the DPO arms but offline")
    p.add_argument("--eval-problems", type=POSITIVE_INT, default=128,
                   help="held-out problems (the same "
                   "for every arm and seed)")
    p.add_argument("--eval-samples", type=POSITIVE_INT, default=2,
                   help="sampled responses per held-out problem")
    p.add_argument("--pool", type=number(int, 2), default=256, help="training prompts")
    p.add_argument("--difficulty", type=POSITIVE_INT, default=2,
                   help="built-in task difficulty (2: "
                   "sums of operands up to 20)")
    p.add_argument("--arms", default=None, help="comma-separated subset of arms (default: all)")
    p.add_argument("--quiet", action="store_true", help="hide train.py output")
    p.add_argument("--report-only", action="store_true", help="write the report and figures "
                   "from the runs finished so far")
    a, passthrough = p.parse_known_args(argv)   # unknown flags go to every train.py run
    if a.middle not in a.s_values:
        p.error(f"argument --middle: {a.middle} is not one of --s-values {a.s_values}")
    if a.steps % a.points:
        p.error(f"argument --points: {a.points} does not divide --steps {a.steps}")
    # lr 5e-6 (experiments/s-curve/probes.md): at difficulty 2 and 1e-5 online DPO was at 84 %
    # greedy by step 64 and 89 % by 96; half the rate to stretch that climb over the 128 steps
    passthrough = [
        "--n", "4", "--lr", "5e-6", "--eval-every",
        str(a.steps // a.points), *passthrough]
    table = arms(a)
    if a.arms:
        unknown = set(a.arms.split(",")) - set(table)
        if unknown:
            p.error(f"argument --arms: unknown {sorted(unknown)}; choose from {', '.join(table)}")
        table = {n: v for n, v in table.items() if n in a.arms.split(",")}
    # the flags passed through are train.py's: check them now, not in the first run's process
    import train
    try:
        ta = train.parse_args(passthrough + ["--out", os.path.join(a.out, "runs", "check")])
    except SystemExit as e:
        sys.exit(e.code)
    a.note = (f"{a.steps} optimizer steps a run, {ta.batch_prompts} prompts "
              f"× {ta.n} responses a step, lr {ta.lr:g}, temperature "
              f"{ta.temperature:g}, ≤ {ta.max_new_tokens} new tokens, β "
              f"{ta.beta:g}, πref synced every {a.ref_sync_every} steps (DPO "
              f"but offline); built-in arithmetic at difficulty {a.difficulty}, "
              f"{a.pool} training prompts; held-out: {a.eval_problems} "
              f"problems, greedy and {a.eval_samples} samples "
              f"each, scored every {a.steps // a.points} steps.")
    a.epoch_s = math.ceil(a.pool / ta.batch_prompts)
    return a, passthrough, table


def main(argv=None):
    console()
    a, passthrough, table = parse_args(argv)
    make_writable(a.out, "--out")
    os.makedirs(os.path.join(a.out, "runs"), exist_ok=True)
    # reproduce.write_data's math files (the chat ones unused)
    a.train_data, a.chat_problems, a.chat_max_chars = None, 1, 300
    paths = write_data(a)
    # seed 0 of every arm first
    plan = sorted([(n, f, s) for n, (f, seeds) in table.items() for s in seeds], key=lambda x: x[2])
    t0, done_now = time.time(), 0
    for i, (name, flags, seed) in enumerate([] if a.report_only else plan):
        print(f"[{i + 1}/{len(plan)}] {name} seed {seed}", flush=True)
        if run_arm(name, flags, "math", seed, a, paths, passthrough):
            done_now += 1   # its wall.json records the code's commit (reproduce.run_arm)
            print(
                f"  {(time.time() - t0) / 60:.0f} min so far; about "
                f"{(time.time() - t0) / done_now * (len(plan) - i - 1) / 60:.0f} min left",
                flush=True)
    done = lambda n, s: os.path.exists(os.path.join(a.out, "runs", f"{n}-seed{s}", "wall.json"))
    res = {n: {s: load(a, n, s) for s in seeds if done(n, s)} for n, (_, seeds) in table.items()}
    res = {n: runs for n, runs in res.items() if runs}
    if not res:
        sys.exit(f"{a.out}: no finished runs yet")
    commits = sorted({r.get("commit", "?") for runs in res.values() for r in runs.values()})
    text = (pilot_report if a.pilot else sweep_report)(res, a, ", ".join(commits))
    with open(os.path.join(a.out, "pilot.md" if a.pilot else "s_curve.md"), "w",
              encoding="utf-8") as f:
        f.write(text)
    curves(res, a)
    if not a.pilot:
        figures(res, a)
    print(text)
    return res


if __name__ == "__main__":
    main()
