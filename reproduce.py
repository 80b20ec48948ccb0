"""
Reproduce the paper's comparisons at small scale: offline → semi-online → online DPO, GRPO,
GroupDPO, GroupDPO + α·GRPO, reference sync, entropy regularization (Tables 1-2, Figs 2-3).

    python reproduce.py                                  # CPU default, SmolLM2-135M, arithmetic
    python reproduce.py --seeds 3 --steps 40 --out results/cpu
    python reproduce.py --model Qwen/Qwen2.5-0.5B-Instruct --train-data data/math_train.jsonl \
        --steps 200 --batch-prompts 32 --max-new-tokens 512 --out results/gpu   # on a GPU box

Every arm trains on the same prompts for the same number of optimizer steps from the same
seed model; headline arms run --seeds seeds. Each arm is one `train.py` run in its own
process (so its wall-clock is honest); results land in --out: results.md (held-out accuracy,
mean (SE), per arm, with wall-clock), fig2_ref_sync.png and fig3_regimes.png.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from data import HelpFormatter, POSITIVE_INT, existing_file, names_from, number

from eval import mean_se

HERE = os.path.dirname(os.path.abspath(__file__))
# arm -> train.py flags. The data loop is 48 prompts, so s=epoch syncs every 12 steps at 4 prompts a step.
ARMS = {
    "dpo_offline (s=inf)": ["--loss", "dpo", "--sync-every", "inf"],
    "dpo_iterative (s=epoch)": ["--loss", "dpo", "--sync-every", "epoch"],
    "dpo_semi_online (s=4)": ["--loss", "dpo", "--sync-every", "4"],
    "dpo_online (s=1)": ["--loss", "dpo", "--sync-every", "1"],
    "grpo_online (s=1)": ["--loss", "grpo", "--sync-every", "1"],
    "group_dpo_online": ["--loss", "group_dpo", "--sync-every", "1"],
    "group_dpo+grpo_online": ["--loss", "combined", "--sync-every", "1"],
    "dpo_online_ref_sync": ["--loss", "dpo", "--sync-every", "1", "--ref-sync-every", "4"],
    "dpo_online_entropy_reg": ["--loss", "dpo", "--sync-every", "1", "--entropy-coef", "0.01"],
}
HEADLINE = {"dpo_offline (s=inf)", "dpo_semi_online (s=4)", "dpo_online (s=1)", "grpo_online (s=1)"}


def run_arm(name, flags, seed, a, passthrough):
    out = os.path.join(a.out, "runs", f"{name.split(' ')[0]}-seed{seed}")
    if not os.path.exists(os.path.join(out, "heldout_after.json")):   # finished arms are not rerun
        argv = [sys.executable, os.path.join(HERE, "train.py"), *flags, "--seed", str(seed), "--steps", str(a.steps),
                "--out", out, "--eval-problems", str(a.eval_problems), "--no-eval-before",
                "--resume", "--save-every", "4", "--keep", "1", *passthrough]   # a killed sweep continues where it stopped
        if not a.train_data:
            argv += ["--train-data", make_loop_data(a)]
        t = time.time()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL if a.quiet else None)
        json.dump({"wall_s": time.time() - t}, open(os.path.join(out, "wall.json"), "w"))
    else:
        print(f"{out}: done already")
    recs = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    after = json.load(open(os.path.join(out, "heldout_after.json")))["math"]
    return {"out": out, "acc": after["mean"], "se": after["se"], "records": recs,
            "wall_s": json.load(open(os.path.join(out, "wall.json")))["wall_s"]}


def make_loop_data(a):
    """A fixed pool of built-in arithmetic problems (plus the held-out ones, which train.py
    sets aside), so that 'epoch' is a real pass over the data for the iterative arm."""
    from data import arithmetic_problems
    path = os.path.join(a.out, "train_pool.jsonl")
    rows = list({r["problem"]: r for r in arithmetic_problems(3 * (a.eval_problems + a.pool), a.difficulty, seed=123)}.values())
    rows = rows[:a.eval_problems + a.pool]   # distinct problems, so held-out never leaks into training
    with open(path, "w") as f:
        f.writelines(json.dumps({"id": r["id"], "problem": r["problem"], "answer": r["answer"]}) + "\n" for r in rows)
    return path


def figures(results, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curves(ax, names, key, title):
        for n in names:
            if n in results:
                r = results[n][0]["records"]
                ax.plot([x["step"] for x in r], [x[key] for x in r], label=n)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    pair = ["dpo_online (s=1)", "dpo_online_ref_sync"]
    curves(ax[0], pair, "length", "Fig. 2 (left): response length")
    curves(ax[1], pair, "reward", "Fig. 2 (right): rollout reward")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "fig2_ref_sync.png"), dpi=100)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    regimes = ["dpo_offline (s=inf)", "dpo_iterative (s=epoch)", "dpo_semi_online (s=4)", "dpo_online (s=1)", "grpo_online (s=1)"]
    curves(ax[0], regimes, "entropy", "Fig. 3 (left): rollout entropy")
    curves(ax[1], regimes, "length", "Fig. 3 (right): response length")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "fig3_regimes.png"), dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default="results/cpu", help="where runs, table and figures go")
    p.add_argument("--seeds", type=POSITIVE_INT, default=1, help="seeds for the headline arms (others run seed 0)")
    p.add_argument("--steps", type=POSITIVE_INT, default=16, help="optimizer steps per arm")
    p.add_argument("--eval-problems", type=POSITIVE_INT, default=64, help="held-out problems per arm")
    p.add_argument("--pool", type=number(int, 2), default=48, help="training prompts (built-in task)")
    p.add_argument("--difficulty", type=POSITIVE_INT, default=1, help="built-in task difficulty")
    p.add_argument("--train-data", default=None, type=existing_file, help="use this JSONL instead of the built-in pool")
    p.add_argument("--arms", default=",".join(ARMS), type=names_from(ARMS), help="comma-separated subset of arms")
    p.add_argument("--quiet", action="store_true", help="hide train.py output")
    a, passthrough = p.parse_known_args(argv)   # unknown flags go to every train.py run
    import train   # the flags passed through are train.py's: check them now, not in the first arm's process
    try:
        train.parse_args(passthrough + ["--out", os.path.join(a.out, "runs", "check")])
    except SystemExit as e:
        sys.exit(e.code)
    if a.train_data:
        passthrough += ["--train-data", a.train_data]
    os.makedirs(a.out, exist_ok=True)
    results = {}
    for name in a.arms:
        seeds = range(a.seeds) if name in HEADLINE else range(1)
        results[name] = [run_arm(name, ARMS[name], seed, a, passthrough) for seed in seeds]
    lines = ["| arm | held-out accuracy, mean (SE) | seeds | rollout reward, first → last 4 steps | "
             "response length, first → last 4 | rollout entropy, first → last 4 | wall-clock (s), fastest seed |",
             "|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        if len(runs) > 1:   # SE across seeds
            m, se = mean_se([r["acc"] for r in runs])
        else:               # one seed: the binomial SE over held-out problems
            m, se = runs[0]["acc"], runs[0]["se"]

        def trend(key):   # mean over seeds of the first and of the last 4 steps
            first = sum(x[key] for r in runs for x in r["records"][:4]) / sum(len(r["records"][:4]) for r in runs)
            last = sum(x[key] for r in runs for x in r["records"][-4:]) / sum(len(r["records"][-4:]) for r in runs)
            return f"{first:.3g} → {last:.3g}"
        lines.append(f"| {name} | {100 * m:.1f} ({100 * se:.1f}) | {len(runs)} | {trend('reward')} | {trend('length')} | "
                     f"{trend('entropy')} | {min(r['wall_s'] for r in runs):.0f} |")
    table = "\n".join(lines) + "\n"
    open(os.path.join(a.out, "results.md"), "w").write(table)
    figures(results, a.out)
    print(table)
    return results


if __name__ == "__main__":
    main()
