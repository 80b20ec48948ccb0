"""
Reproduce the paper's findings at small scale, as a paired experiment: offline → iterative →
semi-online → online DPO, GRPO, GroupDPO (+ α·GRPO), reference sync, entropy and NLL terms,
and the multi-task Table 3 (math only, chat only, both).

    python experiments/reproduce.py                     # CPU default: SmolLM2-135M, built-in
    arithmetic, ~2.5 h on 2 cores with bf16
    python experiments/reproduce.py --quick             # a first look: online vs offline DPO only,
    3 seeds (~25 min)
    python experiments/reproduce.py --model Qwen/Qwen2.5-0.5B-Instruct --train-data
    data/math_train.jsonl \
        --steps 400 --batch-prompts 32 --max-new-tokens 512 --out runs/reproduce-gpu   # on a GPU
          box

Design (README "Reproducing the paper" states the verdict rules, fixed before the run):
- Paired: for a given seed every arm trains on the same prompts in the same order from the same
  seed model and is scored on the same held-out rows (one file for every arm and seed); the
  seed model's score is computed once and shared. Findings are paired differences of arms:
  per seed, then mean ± SE over seeds (one seed: the SE of the per-problem differences).
- Metric: held-out greedy accuracy and sampled accuracy (--eval-samples responses per problem
  at the training temperature, the quantity RL optimizes).
- Offline: responses generated once by the seed model, one fixed pair per prompt, reused on
  every pass. Arms that train on the current policy's samples sync πref every
  --ref-sync-every steps (the paper's Fig. 2); offline DPO keeps the seed model as πref, and
  one online arm runs without sync for Fig. 2.

Each arm is one `train.py` process (honest wall-clock). Finished arms, and the seed model's
score, are reused after a kill: rerun the same command. Outputs in --out: results.md (tables,
paired differences, verdicts), fig2_ref_sync.png, fig3_regimes.png, fig_accuracy.png,
fig_table3.png, runs/ (per-run logs).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

# the reference's files
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flags import COUNT, HelpFormatter, POSITIVE_INT, existing_file, make_writable, number, out_dir
from data import arithmetic_problems, load_jsonl
from host import console
from reproduce_report import figures, quick_finding, report

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository root
# 4 responses a prompt: half the rollout time of train.py's 8 (README: the pilot)
TRAIN_DEFAULTS = ["--n", "4"]
# --quick: the paper's strongest effect, online ≫ offline, in ~25 min on 2 cores: the s-curve's task
#   and held-out design (s_curve.py), its lr doubled and its horizon halved (its pilot: at 5e-6 the
#   gap opens after step 64 of 128), three paired seeds
QUICK = dict(arms="offline,online_dpo", seeds=3, steps=64, pool=256, eval_problems=128,
             eval_samples=2, ref_sync_every=16)
QUICK_TRAIN = ["--lr", "1e-5"]


def arms(a):
    """arm -> (train.py flags, held-out set, seeds). Headline arms run every seed, the rest seed
    0."""
    ref = ["--ref-sync-every", str(a.ref_sync_every)]
    s1, s2 = a.s_values
    dpo = lambda s: ["--loss", "dpo", "--sync-every", s]
    table = {
        # the seed model's responses, πref = seed model
        "offline": (dpo("inf"), "math"),
        "iterative": (dpo("epoch") + ref, "math"),
        f"semi_online_s{s1}": (dpo(str(s1)) + ref, "math"),
        f"semi_online_s{s2}": (dpo(str(s2)) + ref, "math"),
        "online_dpo": (dpo("1") + ref, "math"),             # seed 0 is also Table 3's "math only"
        "grpo": (["--loss", "grpo", "--sync-every", "1"], "math"),   # β = 0: no πref
        "group_dpo": (["--loss", "group_dpo", "--sync-every", "1"] + ref, "math"),
        "group_dpo+grpo": (["--loss", "combined", "--sync-every", "1"] + ref, "math"),
        "online_dpo_no_ref_sync": (dpo("1"), "math"),
        "online_dpo+entropy": (dpo("1") + ref + ["--entropy-coef", str(a.entropy_coef)], "math"),
        "online_dpo+nll": (dpo("1") + ref + ["--nll-coef", str(a.nll_coef)], "math"),
        "chat_only": (dpo("1") + ref, "mix"),
        "math+chat": (dpo("1") + ref, "mix"),
    }
    headline = {"offline", f"semi_online_s{s1}", "online_dpo", "grpo"}
    return {name: (flags, evalset, range(a.seeds) if name in headline else range(1))
            for name, (flags, evalset) in table.items() if a.arms is None or name in a.arms}


def held_out_set(name, evalset, seed, a):
    """Table 3's arms are scored on math and chat; so is seed 0 of online DPO (its "math only" row)
    when the sweep has Table 3's arms."""
    if name != "online_dpo" or seed != 0:
        return evalset
    return "mix" if a.arms is None or {"chat_only", "math+chat"} & set(a.arms) else evalset


def write_data(a):
    """The sweep's files: training pools (math; chat; both) and two held-out sets (math; math +
    chat), disjoint from every pool. The built-in task, or --train-data's rows."""
    paths = {
        k: os.path.join(a.out, f"{k}.jsonl")
        for k in ("train_math", "train_chat", "train_mix", "heldout_math", "heldout_mix")}
    if a.train_data:
        rows = load_jsonl(a.train_data, fields=None)
        math_rows = [r for r in rows if r["task"] == "math"]
    else:   # distinct problems (the generator repeats small sums), held-out first
        math_rows = list({
            r["problem"]: r
            for r in arithmetic_problems(3 * (a.eval_problems + a.pool), a.difficulty, seed=123)
        }.values())
    math_rows = math_rows[:a.eval_problems + a.pool]
    chat = [
        r for r in load_jsonl(os.path.join(HERE, "data", "chat_train.jsonl"), fields=("prompt", ))
        if len(r["prompt"]) <= a.chat_max_chars
    ][:a.chat_problems + a.pool]
    held_m, pool_m = math_rows[:a.eval_problems], math_rows[a.eval_problems:]
    held_c, pool_c = chat[:a.chat_problems], chat[a.chat_problems:]
    for k, rows in {"train_math": pool_m, "train_chat": pool_c, "train_mix": pool_m + pool_c,
                    "heldout_math": held_m, "heldout_mix": held_m + held_c}.items():
        with open(paths[k], "w") as f:
            f.writelines(
                json.dumps({x: r[x]
                            for x in ("id", "problem", "answer", "prompt") if x in r}) + "\n"
                for r in rows)
    return paths


def run_arm(name, flags, evalset, seed, a, paths, passthrough):
    """One train.py run (skipped when finished). The seed model's score on a held-out set is made by
    the first arm scored on that set and shared by all the others (every seed has the same rows)."""
    out = os.path.join(a.out, "runs", f"{name}-seed{seed}")
    evalset = held_out_set(name, evalset, seed, a)
    # the same rows for every seed: scored once
    before = os.path.join(a.out, "runs", f"before-{evalset}.json")
    if os.path.exists(os.path.join(out, "heldout_after.json")):
        return False
    data = paths["train_" + {"chat_only": "chat", "math+chat": "mix"}.get(name, "math")]
    argv = [
        sys.executable,
        os.path.join(HERE, "train.py"),
        *flags,
        "--seed",
        str(seed),
        "--steps",
        str(a.steps),
        "--out",
        out,
        "--train-data",
        data,
        "--eval-data",
        paths["heldout_" + evalset],
        "--eval-samples",
        str(a.eval_samples),
        "--resume",
        "--save-every",
        "16",
        "--keep",
        "1",
    # grade: the rule the committed results were measured with; weight-first: the matmul form they
    # decoded with (another form rounds differently, so it samples other tokens)
        "--cut-responses",
        "grade",
        "--decode-matmul",
        "weight-first",
        *passthrough]
    if os.path.exists(before):
        argv.append("--no-eval-before")
    # a resumed run costs every segment, not its last
    segments = os.path.join(out, "segments.jsonl")
    # the previous segment was stopped: it ended at the last file it wrote
    if os.path.exists(segments):
        last = max((os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs),
                   default=0)
        open(segments, "a").write(json.dumps({"end": last}) + "\n")
    os.makedirs(out, exist_ok=True)
    open(segments, "a").write(json.dumps({"start": time.time()}) + "\n")
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL if a.quiet else None)
    marks = [json.loads(line) for line in open(segments)] + [{"end": time.time()}]
    starts, ends = [m["start"] for m in marks
                    if "start" in m], [m["end"] for m in marks if "end" in m]
    json.dump({"wall_s": sum(e - s for s, e in zip(starts, ends)), "segments": len(starts),
               "commit": head_commit()}, open(os.path.join(out, "wall.json"), "w"))
    os.remove(segments)
    if not os.path.exists(before):
        shutil.copy(os.path.join(out, "heldout_before.json"), before)
    # the sweep keeps logs, not 0.5 GB of weights
    for ckpt in [d for d in os.listdir(out) if d.startswith("ckpt-")]:
        shutil.rmtree(os.path.join(out, ckpt))
    return True


def head_commit():
    """The code's commit, which a finished run records and its report names."""
    git = subprocess.Popen(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return git.communicate()[0].strip() or "?"


def load_run(a, name, evalset, seed):
    evalset = held_out_set(name, evalset, seed, a)
    out = os.path.join(a.out, "runs", f"{name}-seed{seed}")
    wall = json.load(open(os.path.join(out, "wall.json")))
    return {"records": [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))],
            "after": json.load(open(os.path.join(out, "heldout_after.json"))),
            "before": json.load(open(os.path.join(a.out, "runs", f"before-{evalset}.json"))),
            "wall_s": wall["wall_s"], "commit": wall.get("commit", "?")}


def parse_args(argv=None):
    """(the sweep's flags, the train.py flags every run gets); train.py's are checked here, before
    the first arm's process."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", type=out_dir, default="runs/reproduce",
                   help="where runs, table and figures go")
    p.add_argument(
        "--quick", action="store_true", help="a first look, ~25 min: online vs offline "
        "DPO, 3 seeds, 64 steps at lr 1e-5")
    p.add_argument("--seeds", type=POSITIVE_INT, default=4,
                   help="seeds of the headline arms (offline, "
                   "semi-online, online DPO, GRPO)")
    p.add_argument("--steps", type=POSITIVE_INT, default=32, help="optimizer steps per arm")
    p.add_argument("--s-values", type=lambda t: [POSITIVE_INT(x) for x in t.split(",")],
                   default=[4, 16],
                   help="the two semi-online s, comma-separated (the first is a headline arm)")
    p.add_argument("--ref-sync-every", type=POSITIVE_INT, default=8,
                   help="πref := πθ every k steps "
                   "in the arms that sync it")
    p.add_argument("--entropy-coef", type=number(float, 0, lo_open=True), default=0.01,
                   help="the entropy-regularized arm's coefficient")
    p.add_argument("--nll-coef", type=number(float, 0, lo_open=True), default=0.1,
                   help="the NLL arm's coefficient")
    p.add_argument("--eval-problems", type=POSITIVE_INT, default=192,
                   help="held-out math problems (the "
                   "same for every arm and seed)")
    p.add_argument("--eval-samples", type=COUNT, default=3,
                   help="sampled responses per held-out problem")
    p.add_argument("--chat-problems", type=POSITIVE_INT, default=48,
                   help="held-out chat prompts (Table 3 arms)")
    p.add_argument("--chat-max-chars", type=POSITIVE_INT, default=300,
                   help="chat prompts up to this long (a CPU's budget)")
    p.add_argument("--pool", type=number(int, 2), default=96, help="training prompts of each task "
                   "(built-in math, shipped chat)")
    p.add_argument("--difficulty", type=POSITIVE_INT, default=2,
                   help="built-in task difficulty (2: operands up to 20)")
    p.add_argument("--train-data", default=None, type=existing_file,
                   help="math rows from this JSONL "
                   "instead of the built-in task")
    p.add_argument("--arms", default=None, help="comma-separated subset of arms (default: all)")
    p.add_argument("--quiet", action="store_true", help="hide train.py output")
    p.add_argument("--report-only", action="store_true", help="write results.md and figures "
                   "from the runs finished so far")
    a, passthrough = p.parse_known_args(argv)   # unknown flags go to every train.py run
    if a.quick:   # its own defaults; flags given still win
        p.set_defaults(**QUICK)
        a, passthrough = p.parse_known_args(argv)
    # a flag given here wins (argparse keeps the last)
    passthrough = TRAIN_DEFAULTS + (QUICK_TRAIN if a.quick else []) + passthrough
    if len(a.s_values) != 2:
        p.error(f"argument --s-values: {a.s_values}: give two values, e.g. 4,16")
    names = list(arms(argparse.Namespace(**{**vars(a), "arms": None})))
    a.arms = a.arms and a.arms.split(",")
    if a.arms and set(a.arms) - set(names):
        p.error(f"argument --arms: unknown {sorted(set(a.arms) - set(names))}; "
                f"choose from {', '.join(names)}")
    # the flags passed through are train.py's: check them now, not in the first arm's process
    import train
    try:
        ta = train.parse_args(passthrough + ["--out", os.path.join(a.out, "runs", "check")])
    except SystemExit as e:
        sys.exit(e.code)
    a.batch_prompts_note = (f"{ta.batch_prompts} prompts × {ta.n} responses a step, lr {ta.lr:g}, "
                            f"temperature {ta.temperature:g}, {ta.max_new_tokens} new tokens at "
                            f"most, {a.pool} training prompts per task")
    return a, passthrough


def main(argv=None):
    console()
    a, passthrough = parse_args(argv)
    make_writable(a.out, "--out")
    os.makedirs(os.path.join(a.out, "runs"), exist_ok=True)
    paths = write_data(a)
    plan = sorted(
        [(name, flags, evalset, seed) for name, (flags, evalset, seeds) in arms(a).items()
         for seed in seeds],
    # seed 0 of every arm first: a partial sweep already speaks to every finding
        key=lambda x: x[3])
    t0, done_now = time.time(), 0
    for i, (name, flags, evalset, seed) in enumerate([] if a.report_only else plan):
        print(f"[{i + 1}/{len(plan)}] {name} seed {seed}", flush=True)
        done_now += run_arm(name, flags, evalset, seed, a, paths, passthrough)
        if done_now:
            left = (time.time() - t0) / done_now * (len(plan) - i - 1)
            print(f"  {(time.time() - t0) / 60:.0f} min so "
                  f"far; about {left / 60:.0f} min left", flush=True)
    done = lambda name, seed: os.path.exists(
        os.path.join(a.out, "runs", f"{name}-seed{seed}", "wall.json"))
    res = {
        name: {seed: load_run(a, name, evalset, seed)
               for seed in seeds if done(name, seed)}
        for name, (_, evalset, seeds) in arms(a).items()}
    res = {name: runs for name, runs in res.items() if runs}
    if not res:
        sys.exit(f"{a.out}: no finished runs yet")
    # the runs' code, so that --report-only writes the same report at any later commit
    commits = sorted({r["commit"] for runs in res.values() for r in runs.values()})
    text = report(res, a, ", ".join(commits))
    if a.quick:
        text = text.replace("\n\n", "\n\n" + quick_finding(res), 1)   # after the title
    open(os.path.join(a.out, "results.md"), "w", encoding="utf-8").write(text)
    figures(res, a)
    print(text)
    return res


if __name__ == "__main__":
    main()
