"""
Where a long default run's memory goes, and whether it stays flat: `python train.py --steps N
--eval-problems 0` (the rest as README's command) in each arm below, one after another, each a
process of its own; the same seed, prompts and draws in every arm (the arms differ only in what
memory a process keeps between steps, so their logs are equal record for record but for memory and
time: the report checks it).

    python experiments/memory_growth.py --out experiments/memory-growth --steps 300 \
        --arms before,kept,ideep-1024,caches-64,default
    python experiments/memory_growth.py --out experiments/memory-growth --report-only
    (any other flag goes to train.py)

Arms (the same code, a different handling of freed memory):
  before      as kept, and oneDNN's primitive cache at its own default, 1024 (the code before #53)
  kept        every freed block kept in glibc's heap (heap.MAP_FROM None), token_logps' fp32 chunk
              of 2**25 logits (128 MB), ideep's cache of primitives at 1024 (oneDNN's at 64): the
              code before heap mapped the largest blocks
  ideep-1024  caches-64, but ideep's cache of primitives (LRU_CACHE_CAPACITY) at its own default,
              1024: the code before heap bounded it
  caches-64   default, but both caches of primitives at 64: the code before they were 32
  default     train.py as it is: blocks of 32 MB or more mapped on their own (heap.MAP_FROM), the
              fp32 chunk 2**22 logits (16 MB, models.CHUNK_LOGITS), both caches of primitives at 32
  release     kept, and heap.release (malloc_trim) at each switch between rollouts and training
  every-step  kept, and heap.release after every optimizer step
  map-32mb    kept, but blocks of 32 MB or more (glibc's largest threshold) mapped on their own
  map-4mb     kept, but blocks of 4 MB or more mapped on their own
  thp         kept, torch's blocks of 2 MB or more in transparent huge pages (THP_MEM_ALLOC_ENABLE)
  map-32mb-thp  map-32mb and thp
  chunk16mb   kept, with the fp32 chunk of 2**22 logits
  trim-4.3gb  kept, and heap.release after an optimizer step that ends with over 4.3 GB resident
Per step the log has peak_gb (the process's peak so far), rss_gb (resident at the step's end)
and heap_free_gb (glibc's free bytes in its heap). A finished arm is kept: rerun the same command
after a kill. Writes report.md and fig_memory.png in --out, the arms' logs in runs/.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flags import POSITIVE_INT, HelpFormatter, make_writable, out_dir  # noqa: E402
from host import console, cpu  # noqa: E402
from logs import MEASURED  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository root
# each arm: what its process runs before train.main (the arm's heap handling)
CACHES = ("import os; os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'] = '{}'; "
          "os.environ['LRU_CACHE_CAPACITY'] = '{}'")   # oneDNN's, ideep's
IDEEP = CACHES.format(64, 1024)
KEEP = "; import heap, models; heap.MAP_FROM = None; models.CHUNK_LOGITS['cpu'] = 2**25"
KEPT = IDEEP + KEEP
RELEASE = ("import heap, rollout; E = rollout.HFEngine; sleep, wake = E.sleep, E.update_weights; "
           "E.sleep = lambda self: (sleep(self), heap.release())[0]; "
           "E.update_weights = lambda self, s: (heap.release(), wake(self, s))[1]")
EVERY_STEP = ("import heap, train; step = train.optimizer_step; "
              "train.optimizer_step = lambda *x: (step(*x), heap.release())[0]")
ARMS = {"before": CACHES.format(1024, 1024) + KEEP,
        "kept": KEPT,
        "ideep-1024": IDEEP,
        "caches-64": CACHES.format(64, 64),
        "default": "",
        "release": KEPT + "; " + RELEASE,
        "every-step": KEPT + "; " + EVERY_STEP,
        "map-32mb": KEPT + "; heap.MAP_FROM = 32 << 20",
        "map-4mb": KEPT + "; heap.MAP_FROM = 4 << 20",
        "thp": KEPT + "; import os; os.environ['THP_MEM_ALLOC_ENABLE'] = '1'",
        "map-32mb-thp": KEPT + "; import os; os.environ['THP_MEM_ALLOC_ENABLE'] = '1'; "
                               "heap.MAP_FROM = 32 << 20",
        "chunk16mb": KEPT + "; models.CHUNK_LOGITS['cpu'] = 2**22",
        "trim-4.3gb": KEPT + "; import host, train; step = train.optimizer_step; "
                             "train.optimizer_step = lambda *x: (step(*x), "
                             "host.rss_bytes() > 4.3e9 and heap.release())[0]"}


def run_arm(arm, a, passthrough):
    """One train.py process for `arm` (skipped when its log is whole, begun anew when it is not);
    its output in train.out."""
    out = os.path.join(a.out, "runs", arm)
    log = os.path.join(out, "log.jsonl")
    if os.path.exists(log) and sum(1 for _ in open(log)) >= a.steps:
        return
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    code = "; ".join(x for x in ("import sys", "sys.argv[0] = 'train.py'", ARMS[arm],
                                 "import train", "train.main(sys.argv[1:])") if x)
    argv = [sys.executable, "-c", code, "--steps", str(a.steps), "--eval-problems", "0",
            "--save-every", "0", "--keep", "1", "--out", out, *passthrough]
    t = time.time()
    with open(os.path.join(out, "train.out"), "w", encoding="utf-8") as f:
        subprocess.run(argv, cwd=HERE, check=True, stdout=f, stderr=subprocess.STDOUT)
    json.dump({"wall_s": time.time() - t}, open(os.path.join(out, "wall.json"), "w"))
    for name in os.listdir(out):   # the checkpoint (1.6 GB): not what is studied
        if name.startswith("ckpt-"):
            shutil.rmtree(os.path.join(out, name))


def load(arm, a):
    """(records, the plan's peak in GB printed at the start, wall seconds) of a finished arm."""
    out = os.path.join(a.out, "runs", arm)
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    text = open(os.path.join(out, "train.out"), encoding="utf-8").read()
    plan = next(float(line.split(":")[-1].split()[0]) for line in text.splitlines()
                if line.strip().startswith("peak = resident"))
    return records, plan, json.load(open(os.path.join(out, "wall.json")))["wall_s"]


def growth(records, s=4):
    """peak_gb's growth after the first two syncs: (peak at the end − peak at step 2s) / the
    latter."""
    at = records[min(2 * s, len(records)) - 1]["peak_gb"]
    return (records[-1]["peak_gb"] - at) / at


def held(rec):
    """What a process holds at a step's end besides glibc's free bytes: resident − heap free."""
    return "-" if rec["heap_free_gb"] is None else f"{rec['rss_gb'] - rec['heap_free_gb']:.2f}"


def report(a, arms):
    """report.md and fig_memory.png from the finished arms."""
    runs = {arm: load(arm, a) for arm in arms}
    strip = lambda rec: {k: v for k, v in rec.items() if k not in MEASURED}   # noqa: E731
    base = [strip(r) for r in runs[arms[0]][0]]
    lines = [f"# Memory over a {a.steps}-step default run", "",
             f"`python experiments/memory_growth.py --out {a.out} --steps {a.steps}`, on "
             f"{cpu()[0]}, {os.cpu_count()} cores. Each arm is `python train.py --steps {a.steps} "
             "--eval-problems 0`; the logs of all arms are equal record for record but for memory "
             f"and time: {all([strip(r) for r in runs[x][0]] == base for x in arms)}.", "",
             "| arm | plan (GB) | peak at step 1 | step 8 | step 32 | end | growth after 2 syncs "
             "| end ÷ plan | rss at the end | heap free at the end | held at step 8 → end "
             "| mean step (s) | wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, (rec, plan, wall) in runs.items():
        peak = lambda step: rec[min(step, len(rec)) - 1]["peak_gb"]   # noqa: E731
        free = rec[-1]["heap_free_gb"]
        lines.append(
            f"| {arm} | {plan:.2f} | {peak(1):.2f} | {peak(8):.2f} | {peak(32):.2f} | "
            f"{peak(len(rec)):.2f} | {100 * growth(rec):+.1f} % | {peak(len(rec)) / plan:.2f} | "
            f"{rec[-1]['rss_gb']:.2f} | {'-' if free is None else f'{free:.2f}'} | "
            f"{held(rec[min(8, len(rec)) - 1])} → {held(rec[-1])} | "
            f"{statistics.mean(r['step_s'] for r in rec):.2f} | {wall / 60:.1f} min |")
    lines += ["", "held: resident minus glibc's free bytes at a step's end (rss_gb − "
              "heap_free_gb): tensors, the libraries' caches, code."]
    with open(os.path.join(a.out, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    figure(runs, os.path.join(a.out, "fig_memory.png"))
    print("\n".join(lines))


def figure(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for (arm, (rec, plan, _)), color in zip(runs.items(), ("C3", "C0", "C1", "C4", "C2")):
        steps = [r["step"] for r in rec]
        ax.plot(steps, [r["peak_gb"] for r in rec], color=color, label=f"{arm}: peak")
        ax.plot(steps, [r["rss_gb"] for r in rec], color=color, alpha=0.4, lw=0.8,
                label=f"{arm}: resident at the step's end")
        ax.axhline(plan, color=color, ls=":", lw=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("GB")
    ax.set_title("memory of the default run (dotted: the printed plan)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    console()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", type=out_dir, default="experiments/memory-growth")
    p.add_argument("--steps", type=POSITIVE_INT, default=300)
    p.add_argument("--arms", default="before,kept,ideep-1024,caches-64,default",
                   help=f"of {', '.join(ARMS)}")
    p.add_argument("--report-only", action="store_true")
    a, passthrough = p.parse_known_args(argv)   # the rest: train.py's flags
    arms = a.arms.split(",")
    if any(x not in ARMS for x in arms):
        p.error(f"argument --arms: {a.arms}: each of {', '.join(ARMS)}")
    make_writable(a.out, "--out")
    if not a.report_only:
        for arm in arms:
            run_arm(arm, a, passthrough)
    report(a, arms)


if __name__ == "__main__":
    main()
