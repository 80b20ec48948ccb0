"""bench.py's measurements, each run by bench.py's worker in a process of its own (its peak memory
is its own): our step and TRL's at equal work, rollout throughput and engines, the roofline, the
decode step, the log-probs' memory. Each returns a dict bench.py prints as one JSON line."""
import os
import shutil
import sys
import tempfile
import time

import torch

# the reference's files
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from host import rss_bytes  # noqa: E402


def peak_memory_mb(device):
    """This process's peak: CUDA's allocated memory, or the peak RSS (None where the OS does not
    tell it)."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    peak = rss_bytes(peak=True)
    return peak and peak / 2**20


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
    from fast_engine import fast_engine
    model, tok = load_model(a.model, a.device)
    engine = fast_engine(model, tok, max_batch=8 * a.batch_prompts * n)
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
    from fast_engine import fast_engine
    from rollout import VLLMEngine
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
        engine = fast_engine(model, tok, max_batch=a.batch_prompts * n,
                             dtype=getattr(torch, dtype))
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
        gap = (response_logps(model, b, a.temperature) - b["mu"]).abs()[b["mask"].bool()]
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
    """The decode step of our engine against the bandwidth roofline: the HF forward (the plain
    HFEngine), decode.py's step (fast_engine) with each matmul form pinned, and with the plan
    here; same weights, prompt and draws. Per batch size: the seconds of one step (all rows decode
    `steps` tokens, no row stops: (time of `steps` tokens − time of 1) / (steps − 1), so the
    prefill cancels) and the bytes it must read (every weight once, plus the KV cache at the mean
    context, in the cache's dtype), as a fraction of read_bandwidth; and each form's weight
    matmuls alone, the ceiling of a step built on it."""
    import decode as dec
    from data import row_prompt, split_task
    from memory import kv_width
    from models import chat_prompt_ids, load_model
    from fast_engine import fast_engine
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
    paths = [("hf", {})] + forms + [("decode.py auto", {})]
    for path, kw in paths:
        for rows in rows_list:   # an engine per batch: a plan, and MKL's packing, are per rows
            engine = (HFEngine if path == "hf" else fast_engine)(model, tok, max_batch=rows,
                                                                 dtype=dt, **kw)
            fast = engine.fast
            engine.stop_ids = {-1}   # no row stops: every step decodes all rows
            if path == "decode.py auto":
                out.setdefault("plan", {})[rows] = dec.plan_text(fast.plan)
            timed = {}
            for n_tok in (1, steps, 1, steps):   # twice each; the second of each kept (warm)
                t = time.time()
                engine.generate([prompt], n=rows, temperature=a.temperature, max_new_tokens=n_tok,
                                keys=[0])
                timed[n_tok] = time.time() - t
            # decode.py's cache is fp32 on a CPU
            kv_item = 4 if fast and a.device == "cpu" else dt.itemsize
            nbytes = weights + rows * (len(prompt) + steps / 2) * kv * kv_item
            step_s = (timed[steps] - timed[1]) / (steps - 1)
            out["rows"].setdefault(rows, {})[path] = fraction(nbytes, step_s)
            # the ceiling of any step made of this form's matmuls: the step's weight matmuls alone
            if fast and path != "decode.py auto":
                m, head = kw["matmul"], engine.model.lm_head.weight
                plain = dec.matrices(fast.layers, head)
                mats = dec.matrices(*dec.packed(fast.layers, head, m, rows))
                xs = [torch.ones(rows, w.shape[1], device=a.device, dtype=dt) for w in plain]
                nbytes = sum(w.numel() for w in plain) * dt.itemsize
                step_s = 1 / calls_per_second(
                    lambda: [dec.MATMULS[m][1](x, w) for x, w in zip(xs, mats)], a.device, 0.5)
                out["rows"][rows][f"{m}, matmuls only"] = fraction(nbytes, step_s)
            del engine
    return out


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
