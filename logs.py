"""
A run's record: what a training step logs of its rollouts (log.jsonl), a few prompts' responses
with their rewards and what the loss did with them (samples.jsonl; `python logs.py RUN --samples
STEP` prints a step's), the lines a run ends with, its curves with the syncs marked (curves.png)
and the comparison of several runs (`python eval.py --plot RUN...`), and the optional trackers.
"""
import json
import math
import os

import torch

from distributed import all_max, all_sum
from grpo import grpo_advantages
from heap import free_bytes
from host import console, rss_bytes
from losses import pairwise
from memory import GB, peak_bytes

# the log's fields that time or memory fill, not the run's numbers (two equal runs differ there)
MEASURED = ("time", "step_s", "rollout_tok_s", "peak_gb", "rss_gb", "heap_free_gb")


def mean_se(scores):
    """(mean, standard error of the mean) with the N-1 sample variance; SE 0 for N < 2."""
    n = len(scores)
    m = sum(scores) / n
    if n < 2:
        return m, 0.0
    return m, math.sqrt(sum((s - m) ** 2 for s in scores) / (n - 1) / n)


def memory_metrics(device):
    """The largest process's memory in GB: its peak so far (as memory.py plans it), its resident
    memory now and glibc's free bytes in its heap (heap.py); None where the OS does not tell
    (sent as -1 to the ranks' max)."""
    mem = all_max([-1.0 if x is None else x / GB for x in (
        peak_bytes(device), rss_bytes(), free_bytes())], device)
    return dict(zip(("peak_gb", "rss_gb", "heap_free_gb"),
                    (round(x, 3) if x >= 0 else None for x in mem)))


def rollout_metrics(batch, tasks, device):
    """The step's rollouts, summed over ranks: mean reward, math accuracy (None without math),
    length and entropy per token, the share cut at --max-new-tokens; with several tasks also
    reward_<task> and length_<task> (None when the step had none of that task)."""
    groups = [""] + (tasks if len(tasks) > 1 else [])
    keys = ("reward", "scored", "correct", "math", "tokens", "entropy", "responses", "cut")
    # the same keys on every rank
    sums = dict.fromkeys([(t, k) for t in groups for k in keys], 0.0)
    for r, g in batch:
        for x, t in ((x, t) for x in g for t in groups if t in ("", r["task"])):
            # a NaN reward was skipped, not scored
            ok, is_math = math.isfinite(x.reward), r["task"] == "math"
            for k, v in (("reward", x.reward if ok else 0.0), ("scored", ok),
                         ("correct", is_math and
                          x.reward > 0.5), ("math", is_math), ("tokens", len(x.completion_ids)),
                         ("entropy", sum(x.entropy)), ("responses",
                                                       1), ("cut", x.finish_reason == "length")):
                sums[t, k] += v
    total = dict(zip(sums, all_sum(list(sums.values()), device)))
    mean = lambda t, k, n: total[t, k] / total[t, n] if total[t, n] else None
    rec = {
        "reward": mean("", "reward", "scored") or 0.0, "accuracy": mean("", "correct", "math"),
        "length": mean("", "tokens", "responses") or 0.0,
        "truncated": mean("", "cut", "responses") or 0.0,
        "entropy": mean("", "entropy", "tokens") or 0.0}
    for t in groups[1:]:
        rec[f"reward_{t}"], rec[f"length_{t}"] = mean(t, "reward",
                                                      "scored"), mean(t, "tokens", "responses")
    return rec


def run_summary(records, grading, seconds, out, stats=None):
    """The lines a run ends with: rollout reward and the share cut at the length cap in the first vs
    the last quarter of the steps (with at least 8), how many chosen responses (a pair's first, a
    group's above its mean) were cut, Math-Verify's timeouts and failures if any, the wall time and
    the log's path."""
    lines, stats = [], stats or {}
    if len(records) >= 8:
        first, last = records[:len(records) // 4], records[-(len(records) // 4):]
        for key, name in (("reward", "rollout reward"), ("truncated", "cut at the cap")):
            lines.append(f"{name}: first quarter {sum(r[key] for r in first) / len(first):.3f}"
                         f" -> last quarter {sum(r[key] for r in last) / len(last):.3f}")
    if stats.get("chosen"):
        lines.append(f"chosen responses cut at the cap: {stats['chosen_cut']} of {stats['chosen']}")
    if grading["timeouts"] or grading["errors"]:
        lines.append(f"Math-Verify: {grading['graded']} responses graded "
                     f"on rank 0, {grading['timeouts']} ran out of time "
                     f"and {grading['errors']} failed (all scored 0)")
    return "\n".join(lines + [f"done in {seconds:.0f}s; log: {os.path.join(out, 'log.jsonl')}"])


def samples_record(step, sampled_at, row, group, unit, advantages=None):
    """One prompt's rollouts of a step, for samples.jsonl: the prompt, each response's text,
    reward, length, whether it was cut at the cap, and what the loss did with it: "chosen",
    "rejected" or "unused" for a pairwise loss (unit: the pair, or None), else its advantage."""
    def role(i, x):
        if advantages is not None:
            return {"advantage": round(float(advantages[i]), 4)}
        picked = {id(y): name for y, name in zip(unit or (), ("chosen", "rejected"))}
        return {"role": picked.get(id(x), "unused")}
    responses = [{"text": x.text, "reward": x.reward, "tokens": len(x.completion_ids),
                  "cut": x.finish_reason == "length", **role(i, x)} for i, x in enumerate(group)]
    return {"step": step, "sampled_at": sampled_at, "task": row["task"],
            "prompt": row.get("problem") or row.get("prompt"), "answer": row.get("answer"),
            "responses": responses}


def samples_lines(batch, units, a, step, sampled_at):
    """samples.jsonl's lines for the first --log-samples prompts of this rank's step."""
    lines = []
    for row, group in batch[:a.log_samples]:
        unit = next((u for u in units if any(u[0] is x for x in group)), None)
        rewards = torch.tensor([[x.reward for x in group]])
        adv = None if pairwise(a) else grpo_advantages(rewards, scale_std=not a.no_std)[0].tolist()
        lines.append(json.dumps(samples_record(step, sampled_at, row, group, unit, adv)) + "\n")
    return lines


def show_samples(run, step):
    """A step's samples.jsonl entries as text: each prompt, then its responses, chosen first."""
    entries = [json.loads(line) for line in open(os.path.join(run, "samples.jsonl"))]
    here = [e for e in entries if e["step"] == step]
    if not here:
        steps = sorted({e["step"] for e in entries}) or ["none"]
        return f"{run}: no samples at step {step} (steps {steps[0]}-{steps[-1]})"
    order = {"chosen": 0, "rejected": 1, "unused": 2}
    lines = []
    for e in here:
        staleness = e["step"] - 1 - e["sampled_at"]
        answer = f" -> {e['answer']}" if e["answer"] else ""
        lines.append(f"step {e['step']}, sampled at step "
                     f"{e['sampled_at']} (staleness {staleness}): "
                     f"{e['prompt']!r}{answer}")
        for x in sorted(e["responses"],
                        key=lambda x: order.get(x.get("role"), -x.get("advantage", 0))):
            what = x["role"] if "role" in x else f"A {x['advantage']:+.2f}"
            cut = " CUT" if x["cut"] else "    "
            lines.append(f"  {what:>9}  reward {x['reward']:.2f}  "
                         f"{x['tokens']:>3} tokens{cut}  {x['text']!r}")
    return "\n".join(lines)


def sync_steps(recs):
    """The steps whose rollouts were generated right before them, after πθ_old ← πθ (staleness
    0)."""
    return [r["step"] for r in recs if r.get("staleness") == 0]


PANELS = [("reward", "rollout reward (mean)"), ("accuracy", "rollout accuracy (math)"),
          (None, "held-out accuracy (greedy) ± SE"), ("length", "rollout length (tokens)"),
          ("entropy", "rollout entropy (nats/token)"), ("loss", "loss (symlog)"),
          ("margin", "implicit reward margin, chosen - rejected"),
          ("k3_trained", "k3 of πθ‖πref on trained responses (symlog)"),
          ("grad_norm_pre_clip", "gradient norm before clipping (symlog)")]
# IPO's 25 and DPO's 0.69 on one axis; k3's spikes; 0 allowed
SCALES = {"loss": "symlog", "k3_trained": "symlog", "grad_norm_pre_clip": "symlog"}


def curve(recs, key):
    """(steps, values) of one logged metric; margin = chosen_reward - rejected_reward (preference
    losses)."""
    get = (lambda r: r["chosen_reward"] - r["rejected_reward"]
           if r.get("chosen_reward") is not None else None) \
        if key == "margin" else (lambda r: r.get(key))
    pts = [(r["step"], v) for r in recs if (v := get(r)) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def heldout(run):
    """{(task, "before" | "after"): its heldout_<tag>.json entry} of a run."""
    out = {}
    for tag in ("before", "after"):
        f = os.path.join(run, f"heldout_{tag}.json")
        if os.path.exists(f):
            out.update({(task, tag): h for task, h in json.load(open(f)).items()})
    return out


def plot_runs(runs, path):
    """Training curves of one or more runs (their log.jsonl), one panel per metric, one colour per
    run and one legend outside the panels; held-out accuracy before (hollow) and after (filled)
    training in a panel of its own, one column per run, so that no run's markers hide another's."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(3, 3, figsize=(14, 10), layout="constrained")
    names = [os.path.basename(os.path.normpath(run)) for run in runs]
    logs = [[json.loads(line) for line in open(os.path.join(run, "log.jsonl"))] for run in runs]
    panels = PANELS
    # math only: reward and accuracy are one curve, drawn once
    if all(r.get("accuracy") == r["reward"] for recs in logs for r in recs):
        panels = [("reward", "rollout reward = accuracy (math)")] + PANELS[2:]
        axes.flat[-1].set_axis_off()
    for i, (run, recs) in enumerate(zip(runs, logs)):
        h = heldout(run)
        for ax, (key, label) in zip(axes.flat, panels):
            ax.set_ylabel(label, fontsize=9)
            if key is None:   # held-out: x = the run
                for dx, (tag, fill) in zip((-0.12, 0.12), (("before", "none"), ("after", f"C{i}"))):
                    if ("math", tag) in h:
                        ax.errorbar([i + dx], [h["math", tag]["mean"]], yerr=[h["math", tag]["se"]],
                                    fmt="os"[dx > 0], color=f"C{i}", mfc=fill, capsize=3)
                ax.set_xticks(range(len(runs)), names, rotation=30, ha="right", fontsize=8)
                continue
            # a run without the metric (a margin without pairs) draws nothing there
            if (xy := curve(recs, key))[0]:
                ax.plot(*xy, color=f"C{i}", label=names[i] if ax is axes.flat[0] else None)
            # the syncs πθ_old ← πθ (light lines) and πref ← πθ (dashed) at the steps they came
            # before
            for k in sync_steps(recs):
                ax.axvline(k - 0.5, color=f"C{i}", alpha=0.3, lw=0.8)
            for k in (r["step"] for r in recs if r.get("ref_synced")):
                ax.axvline(k + 0.5, color=f"C{i}", alpha=0.4, lw=0.8, ls="--")
            ax.set_xlabel("optimizer step", fontsize=9)
            if key in SCALES and ax.lines:
                ax.set_yscale(SCALES[key], linthresh=0.01)
    fig.legend(loc="outside lower center", ncol=min(len(runs), 4), fontsize=9,
               title="runs (held-out panel: hollow before, filled after training; light lines: "
               "rollout-weight syncs, dashed: πref syncs)")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def heldout_table(runs):
    """Held-out numbers of each run as a markdown table: before and after ± SE, and the paired
    change over the same problems (mean and SE of the per-problem differences)."""
    lines = [
        "| run | task | before | after | "
        "after - before (paired) | n |", "|---|---|---|---|---|---|"]
    for run in runs:
        h = heldout(run)
        for task in sorted({t for t, _ in h}):
            b, a = h.get((task, "before")), h.get((task, "after"))
            cell = lambda x: f"{x['mean']:.3f} ± {x['se']:.3f}" if x else "-"
            diff = "-"
            if a and b:
                common = sorted(set(a["scores"]) & set(b["scores"]))
                m, se = mean_se([a["scores"][k] - b["scores"][k]
                                 for k in common]) if len(common) > 1 else (float("nan"), ) * 2
                diff = f"{m:+.3f} ± {se:.3f}"
            lines.append(f"| {os.path.basename(os.path.normpath(run))} | {task} "
                         f"| {cell(b)} | {cell(a)} | {diff} | {(a or b)['n']} |")
    return "\n".join(lines)


def plot_run(out):
    """The run's own picture, left in its directory when it ends: out/curves.png."""
    return plot_runs([out], os.path.join(out, "curves.png"))


def open_outputs(a, master, resumed):
    """(log.jsonl, samples.jsonl or None, the tracker or None) of a run in a.out, opened on rank 0
    (None elsewhere): a resumed run appends to its files, a fresh run in an old directory starts
    new ones."""
    if not master:
        return None, None, None
    mode = "a" if resumed else "w"
    return (open(os.path.join(a.out, "log.jsonl"), mode),
            open(os.path.join(a.out, "samples.jsonl"), mode) if a.log_samples else None,
            tracker(a.report_to, a.out, vars(a)))


def write_step(outputs, rec, batch, units, a, step, sampled_at):
    """A step's line in log.jsonl, what it trained on in samples.jsonl (samples_lines), its point
    in the tracker; nothing off rank 0."""
    log, samples, track = outputs
    if log is None:
        return
    log.write(json.dumps(rec) + "\n")
    log.flush()
    if samples:
        samples.writelines(samples_lines(batch, units, a, step, sampled_at))
        samples.flush()
    if track:
        track[0](rec)


def tracker(kind, out, config):
    """train.py --report-to: (log(record), close()) sending each step's numbers to an experiment
    tracker, or None for "none". The packages are optional and imported only when asked for; both
    run without a network (tensorboard writes out/tensorboard; wandb with WANDB_MODE=offline
    writes out/wandb, `wandb sync` uploads it later)."""
    if kind == "none":
        return None

    # flat {name: number}: the time breakdown as time/<part>, None and strings dropped
    def numbers(rec):
        flat = {f"time/{k}": v for k, v in rec.get("time", {}).items()} | rec
        return {
            k: v
            for k, v in flat.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    if kind == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        w = SummaryWriter(os.path.join(out, "tensorboard"))
        return lambda rec: [w.add_scalar(k, v, rec["step"])
                            for k, v in numbers(rec).items()], w.close
    import wandb
    run = wandb.init(project="semionline", name=os.path.basename(os.path.normpath(out)), dir=out,
                     config=config)
    return lambda rec: run.log(numbers(rec), step=rec["step"]), run.finish


def main(argv=None):
    """python logs.py RUN --samples STEP: that step's prompts, responses, rewards and pairs."""
    console()   # the responses' text, in any code page
    import argparse
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("run", help="a run directory (train.py --out)")
    p.add_argument("--samples", type=int, required=True, metavar="STEP", help="the optimizer step")
    a = p.parse_args(argv)
    if not os.path.exists(os.path.join(a.run, "samples.jsonl")):
        p.error(f"{a.run}: no samples.jsonl (train.py --log-samples 0?)")
    print(show_samples(a.run, a.samples))


if __name__ == "__main__":
    main()
