"""
Benchmark (not a test): our loop against TRL at equal settings, and the cost side of `s`.

    python bench.py                         # CPU default: SmolLM2-135M, 4 prompts x 8, 48 new tokens
    python bench.py --model Qwen/Qwen2.5-0.5B-Instruct --device cuda --batch-prompts 16 \
        --max-new-tokens 256 --out results/bench-gpu                          # on a GPU box
    python bench.py --smoke --model <tiny model dir>                          # CI: 2 steps, no TRL

Four measurements, each in a fresh process of its own (so peak memory is its own):
  1. online GRPO step: ours (train.py --loss grpo --sync-every 1) vs TRL's GRPOTrainer;
  2. online DPO step: ours (--loss dpo --n 2) vs TRL's OnlineDPOTrainer (2 samples per prompt);
  3. ours for s = 1, 2, 4, 8, inf on the same work (--s-steps optimizer steps of the same batch);
  4. rollout throughput: our engine vs plain `model.generate` on the same batch.
Settings shared by both sides: model, fp32 (single process: no FSDP mixed precision), prompts (built-in arithmetic), group size n,
max new tokens, temperature, lr, batch (prompts x n sequences per optimizer step, one micro-batch),
reward (Math-Verify), β = 0 for GRPO, σ-scaled group advantages, sequence-mean token average.
Step time is the median over steps after the first (warm-up); the table goes to --out/bench.md.
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def peak_memory_mb(device):
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


# -----------------------------------------------------------------------------
# Workers: each runs in its own process and prints one JSON line starting with BENCH.

def ours(a, loss, n, sync, steps):
    import train
    out = tempfile.mkdtemp(prefix="bench-ours-")
    argv = ["--model", a.model, "--loss", loss, "--n", str(n), "--sync-every", str(sync), "--steps", str(steps),
            "--batch-prompts", str(a.batch_prompts), "--micro-groups", str(a.batch_prompts),
            "--max-new-tokens", str(a.max_new_tokens), "--temperature", str(a.temperature), "--lr", str(a.lr),
            "--gen-batch", str(a.batch_prompts * n * 8), "--eval-problems", "0", "--device", a.device,
            "--out", out, "--seed", "0"]
    recs = train.main(argv)["records"]
    shutil.rmtree(out, ignore_errors=True)   # its final checkpoint is not needed
    return {"step_s": [r["step_s"] for r in recs], "tokens": [r["length"] * a.batch_prompts * n for r in recs],
            "reward": [r["reward"] for r in recs], "trained": [r.get("pairs_used", r.get("groups_used")) for r in recs]}


def trl_dataset(a):
    from datasets import Dataset
    from data import row_prompt, split_task
    rows = split_task("math", None, 1, 0, 0)[0][:a.batch_prompts * 64]
    return Dataset.from_list([{"prompt": [{"role": "user", "content": row_prompt(r)}], "answer": r["answer"]} for r in rows])


def trl_reward(completions, answer, **kw):
    from rewards import math_reward
    return [math_reward(c[0]["content"] if isinstance(c, list) else c, ans) for c, ans in zip(completions, answer)]


def trl(a, loss, n, steps):
    from transformers import TrainerCallback
    from rollout import load_model
    model, tok = load_model(a.model, a.device)
    times, last = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            last.append(time.time())

        def on_step_end(self, args, state, control, **kw):
            times.append(time.time() - last[-1])
    common = dict(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), max_steps=steps, learning_rate=a.lr,
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                  gradient_accumulation_steps=1, logging_steps=1, save_strategy="no", report_to=[],
                  use_cpu=a.device == "cpu", bf16=False, seed=0, temperature=a.temperature,
                  top_p=1.0, disable_tqdm=True, dataloader_num_workers=0)
    if loss == "grpo":
        from trl import GRPOConfig, GRPOTrainer
        cfg = GRPOConfig(per_device_train_batch_size=a.batch_prompts * n, num_generations=n,
                         max_completion_length=a.max_new_tokens, beta=0.0, loss_type="grpo",
                         scale_rewards="group", epsilon=0.2, num_iterations=1, **common)
        trainer = GRPOTrainer(model=model, reward_funcs=trl_reward, args=cfg, train_dataset=trl_dataset(a),
                              processing_class=tok, callbacks=[Clock()])
    else:
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
        cfg = OnlineDPOConfig(per_device_train_batch_size=a.batch_prompts, max_new_tokens=a.max_new_tokens,
                              beta=0.1, loss_type="sigmoid", **common)
        trainer = OnlineDPOTrainer(model=model, reward_funcs=[trl_reward], args=cfg, train_dataset=trl_dataset(a),
                                   processing_class=tok, callbacks=[Clock()])
    trainer.train()
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    return {"step_s": times}


def generate(a, n, reps=2):
    """Rollout tokens/s: our engine (which also records log-probs and entropy) vs plain
    `generate` on the same batch and sampling, and our engine on an 8x larger batch (what s=8
    generates at once)."""
    from transformers import set_seed
    from data import row_prompt, split_task
    from rollout import HFEngine, chat_prompt_ids, left_pad, load_model
    model, tok = load_model(a.model, a.device)
    engine = HFEngine(model, tok, max_batch=8 * a.batch_prompts * n)
    rows = split_task("math", None, 1, 0, 0)[0]
    prompts = [chat_prompt_ids(tok, row_prompt(r)) for r in rows[:8 * a.batch_prompts]]
    flat = sorted(p for p in prompts[:a.batch_prompts] for _ in range(n))
    ids, attn = (t.to(a.device) for t in left_pad(flat, tok.pad_token_id))
    width = ids.shape[1]

    def plain():
        with torch.inference_mode():
            seqs = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=a.temperature,
                                  top_p=1.0, top_k=0, max_new_tokens=a.max_new_tokens, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id)
        c = seqs[:, width:]
        stopped = (c == tok.eos_token_id).cumsum(1) - (c == tok.eos_token_id).long()   # tokens after the first eos
        return int((stopped == 0).sum())

    def ours(k):
        return sum(len(x.completion_ids) for g in engine.generate(prompts[:k], n, a.temperature, 1.0, a.max_new_tokens) for x in g)

    def tok_s(fn, times):
        set_seed(0)
        t = time.time()
        return sum(fn() for _ in range(times)) / (time.time() - t)
    ours(a.batch_prompts)   # warm-up
    return {"plain_tok_s": tok_s(plain, reps), "ours_tok_s": tok_s(lambda: ours(a.batch_prompts), reps),
            "ours_8x_tok_s": tok_s(lambda: ours(8 * a.batch_prompts), 1)}


def worker(spec, a):
    kind = spec["kind"]
    if kind == "ours":
        r = ours(a, spec["loss"], spec["n"], spec["sync"], spec["steps"])
    elif kind == "trl":
        r = trl(a, spec["loss"], spec["n"], spec["steps"])
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="as train.py --model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-prompts", type=int, default=4, help="prompts per optimizer step")
    p.add_argument("--n", type=int, default=8, help="samples per prompt (GRPO, s sweep); online DPO uses 2")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per ours-vs-TRL measurement")
    p.add_argument("--s-steps", type=int, default=16, help="optimizer steps per s value (a multiple of 8)")
    p.add_argument("--s-values", default="1,2,4,8,inf")
    p.add_argument("--parts", default="grpo,dpo,s,generate", help="which measurements to run")
    p.add_argument("--smoke", action="store_true", help="2 steps each, s in {1,2}, TRL skipped (CI)")
    p.add_argument("--out", default="results/bench", help="bench.md and bench.json go here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(json.loads(a.worker), a)
    if a.smoke:
        a.steps, a.s_steps, a.s_values = 2, 2, "1,2"
    passthrough = [x for k, v in vars(a).items() if k not in ("worker", "parts", "out", "smoke", "s_values")
                   for x in (f"--{k.replace('_', '-')}", str(v))]
    parts = a.parts.split(",")
    try:
        import trl  # noqa: F401  (only the benchmark uses TRL; it is not in requirements.txt)
        have_trl = not a.smoke
    except ImportError:
        have_trl = False
    os.makedirs(a.out, exist_ok=True)
    env = f"{a.device}, {torch.get_num_threads()} threads, fp32, torch {torch.__version__}"
    if a.device == "cpu":
        env += f", {os.cpu_count()} cores"
    else:
        env += f", {torch.cuda.get_device_name()}"
    rows, raw = [], {}
    say = lambda *x: print(*x, flush=True)   # noqa: E731
    say(f"bench: {a.model}, {a.batch_prompts} prompts x n per step, {a.max_new_tokens} new tokens, {env}")

    for loss, n in (("grpo", a.n), ("dpo", 2)):
        if loss not in parts:
            continue
        mine = raw[f"ours_{loss}"] = run({"kind": "ours", "loss": loss, "n": n, "sync": 1, "steps": a.steps}, a, passthrough)
        row = {"what": f"online {loss.upper()} step (n={n})", "ours_s": median_step(mine), "ours_mb": mine["peak_mb"],
               "trained": statistics.mean(mine["trained"][1:] or mine["trained"])}
        if have_trl:
            theirs = raw[f"trl_{loss}"] = run({"kind": "trl", "loss": loss, "n": n, "steps": a.steps}, a, passthrough)
            row |= {"trl_s": median_step(theirs), "trl_mb": theirs["peak_mb"]}
        rows.append(row)
        say(row)

    s_rows = []
    if "s" in parts:
        for s in a.s_values.split(","):
            r = raw[f"s={s}"] = run({"kind": "ours", "loss": "dpo", "n": a.n, "sync": s, "steps": a.s_steps}, a, passthrough)
            total = sum(r["step_s"])
            samples = a.s_steps * a.batch_prompts * a.n
            s_rows.append({"s": s, "total_s": total, "steps_per_s": a.s_steps / total, "rollouts_per_s": samples / total,
                           "s_per_100": 100 * total / samples, "peak_mb": r["peak_mb"]})
            say(s_rows[-1])
    gen = raw["generate"] = run({"kind": "generate", "n": a.n}, a, passthrough) if "generate" in parts else None

    lines = [f"Hardware: {env}. Model {a.model}; {a.batch_prompts} prompts per step, {a.max_new_tokens} new tokens, "
             f"T={a.temperature}, lr {a.lr}; median step time over steps 2..{a.steps}.", ""]
    if rows:
        lines += ["| step | ours: pairs/groups trained per step | ours (s) | TRL (s) | ours steps/s ÷ TRL steps/s | ours peak MB | TRL peak MB |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            if "trl_s" in r:
                theirs = f"{r['trl_s']:.2f} | {r['trl_s'] / r['ours_s']:.2f}x | {r['ours_mb']:.0f} | {r['trl_mb']:.0f}"
            else:
                theirs = f"n/a (TRL not installed) | - | {r['ours_mb']:.0f} | -"
            lines.append(f"| {r['what']} | {r['trained']:.1f} of {a.batch_prompts} | {r['ours_s']:.2f} | {theirs} |")
        lines.append("")
    if s_rows:
        base = s_rows[0]["total_s"]
        lines += [f"DPO, n={a.n}, {a.s_steps} optimizer steps per row (same prompts, same work):", "",
                  "| s | total (s) | step time ÷ s=1 | optimizer steps/s | rollouts/s | s per 100 samples | peak MB |",
                  "|---|---|---|---|---|---|---|"]
        for r in s_rows:
            lines.append(f"| {r['s']} | {r['total_s']:.1f} | {r['total_s'] / base:.2f} | {r['steps_per_s']:.3f} | "
                         f"{r['rollouts_per_s']:.1f} | {r['s_per_100']:.1f} | {r['peak_mb']:.0f} |")
        lines.append("")
    if gen:
        lines += [f"Rollout throughput, {a.batch_prompts * a.n} sequences in one batch: our engine {gen['ours_tok_s']:.0f} tok/s, "
                  f"plain `generate` {gen['plain_tok_s']:.0f} tok/s (ratio {gen['ours_tok_s'] / gen['plain_tok_s']:.2f}); "
                  f"our engine on {8 * a.batch_prompts * a.n} sequences at once (what s=8 generates per sync): "
                  f"{gen['ours_8x_tok_s']:.0f} tok/s ({gen['ours_8x_tok_s'] / gen['ours_tok_s']:.2f}x).", ""]
    table = "\n".join(lines)
    open(os.path.join(a.out, "bench.md"), "w").write(table)
    json.dump(raw, open(os.path.join(a.out, "bench.json"), "w"), indent=1)
    say("\n" + table)
    return rows, s_rows, gen


if __name__ == "__main__":
    main()
