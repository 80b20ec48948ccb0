"""The default run on ten seeds: `python train.py --seed k --out RUNS/seedk` (each run's stdout in
RUNS/seedk.log, under `/usr/bin/time -v`), summarized as a markdown table.

    python experiments/default-run/seeds.py RUNS

Learns: held-out after - before >= 2 SE of the paired difference (the same 128 problems, greedy)."""
import json
import math
import os
import re
import sys


def paired(before, after):
    """(mean, SE) of after_i - before_i over the rows both scored."""
    d = [after[k] - before[k] for k in before]
    m = sum(d) / len(d)
    return m, math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d))


def row(runs, k):
    out = os.path.join(runs, f"seed{k}")
    b, a = (json.load(open(os.path.join(out, f"heldout_{t}.json")))["math"]
            for t in ("before", "after"))
    recs = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    log = open(os.path.join(runs, f"seed{k}.log"), errors="replace").read()
    q = len(recs) // 4
    cut = lambda rs: sum(r["truncated"] for r in rs) / len(rs)
    chosen = re.search(r"chosen responses cut at the cap: (\d+) of (\d+)", log)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", log)[1]
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", log)[1]) / 1e6
    d, se = paired(b["scores"], a["scores"])
    return (f"| {k} | {b['mean']:.3f} | {a['mean']:.3f} ± "
            f"{a['se']:.3f} | {d:+.3f} ± {se:.3f} | {d / se:.1f} | "
            f"{'yes' if d >= 2 * se else '**no**'} | {cut(recs[:q]):.2f} → {cut(recs[-q:]):.2f} | "
            f"{chosen[1] if chosen else 0} of "
            f"{chosen[2] if chosen else 0} | {wall} | {rss:.2f} |"), d >= 2 * se


def main(runs):
    seeds = sorted(int(d[4:]) for d in os.listdir(runs) if re.fullmatch(r"seed\d+", d)
                   and os.path.exists(os.path.join(runs, d, "heldout_after.json")))
    print("| seed | held-out before | after ± SE | after − before ± SE (paired) | ÷ SE | learns "
          "| cut at the cap, first → last quarter | chosen responses cut | wall | peak RSS (GB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = [row(runs, k) for k in seeds]
    print("\n".join(r for r, _ in rows))
    print(f"\n{sum(ok for _, ok in rows)} of {len(rows)} seeds learn.")


if __name__ == "__main__":
    main(sys.argv[1])
