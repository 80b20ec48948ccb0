"""
A run's start, everything train.py's loop needs before its first sync: the process group, the
data (training prompts and a disjoint held-out set), the models (πθ, πref, the judge of chat
rewards, the rollout engine with its own πθ_old), AdamW, the memory plan, and a resumed run's
state. One process loads each model; under torchrun rank 0 reads the weights and the others
receive them (distributed.from_rank0), πθ and πref straight into FSDP2 shards.
"""
import copy
import math
import os
import random
import sys
from types import SimpleNamespace

import torch

import flags
from checkpoint import latest_checkpoint, load_checkpoint, saved_args
from data import epoch_steps, row_prompt, split_task, step_rows
from decode import plan_text
from distributed import (blueprint_of, checkpoint_activations, from0, from_rank0, multiprocess,
                         setup_distributed)
from fast_engine import fast_engine, plans_file
from heap import set_malloc
from host import rss_bytes
from losses import uses_reference
from memory import for_run
from models import chat_prompt_ids, load_model
from rewards import make_scalar_reward
from rollout import VLLMEngine


def setup(a):
    """Everything before the loop: the process group, the data (training prompts and a disjoint
    held-out set of the same task), the models (πθ, πref, the rollout engine with its stale πθ_old),
    AdamW, and a resumed run's state. Returns the run: a namespace the loop reads and updates."""
    runtime = rss_bytes()   # the process before any model: the memory plan's runtime on CPU
    rank, world, a.device = setup_distributed(a.device)
    set_malloc(a.device, world)   # on a CPU: malloc set for the loop (one process or torchrun)
    r = SimpleNamespace(rank=rank, world=world, master=rank == 0, say=print if rank == 0 else
                        (lambda *args, **kw: None))
    if a.batch_prompts % world:
        sys.exit(f"--batch-prompts {a.batch_prompts} must be a "
                 f"multiple of the number of processes ({world})")
    random.seed(a.seed)
    # held-out sampling; training rollouts draw keyed numbers (rollouts)
    torch.manual_seed(a.seed + rank)
    flags.make_writable(a.out, "--out")   # before any model loads
    try:
        r.train, r.heldout = split_task(a.task, a.train_data, a.difficulty, a.eval_problems, a.seed,
                                        eval_data=a.eval_data)
    except (OSError, ValueError) as e:
        sys.exit(str(e))
    if not r.train:
        sys.exit(f"--train-data {a.train_data}: every row went "
                 f"to the held-out set; lower --eval-problems")
    if a.batch_prompts > len(r.train):
        sys.exit(f"--batch-prompts {a.batch_prompts}: more "
                 f"than the {len(r.train)} training prompts")
    r.tasks = sorted({row["task"] for row in r.train})
    r.s = epoch_steps(r.train, a.batch_prompts) if a.sync_every == "epoch" else a.sync_every
    r.ckpt = latest_checkpoint(a.out) if a.resume else None
    if r.ckpt and not os.path.isdir(os.path.join(r.ckpt, "optimizer")):
        sys.exit(f"--resume: {r.ckpt} holds weights only (--keep-optimizer "
                 f"none); start from it with --init-from {r.ckpt}")
    if r.ckpt and a.decode_matmul == "auto":   # a resumed run decodes as it did (its rounding)
        a.decode_matmul = saved_args(r.ckpt).get("decode_matmul", "auto")
    rows = r.train + r.heldout   # what the run's models will see: chat rows need a judge
    r.policy, r.ref, r.tok, r.chat_reward, engine_model = build_models(
        a, r.s, r.ckpt, rows, rank, world, uses_reference(a))
    r.engine = build_engine(a, r.s, r.ckpt, r.policy, engine_model, r.tok, rows, rank, world,
                            r.say)
    # memory.py: what this run should take per process; `peak_gb` in the log is what it took
    if r.master:
        longest = max(len(chat_prompt_ids(r.tok, row_prompt(row))) for row in r.train[:512])
        print(for_run(r.policy.config, a, world, longest, runtime, r.s))
    # an empty model of πθ's class and config, to write checkpoints through
    with torch.device("meta"):
        r.shell = type(r.policy)(r.policy.config)
    # one kernel: 6x faster on CPU
    r.opt = torch.optim.AdamW(r.policy.parameters(), lr=a.lr, weight_decay=a.weight_decay,
                              fused=True)
    r.step, r.buffer, r.last_sync, r.stats = 0, [], 0, {
        "nan_skips": 0, "bad_in_a_row": 0, "long_prompts": 0, "bad_rewards": 0}
    if r.ckpt:
        my_rows = lambda k: [
            row["id"] for row in step_rows(r.train, k, a.batch_prompts, a.seed)[rank::world]]
        r.step, r.last_sync, r.stats, r.buffer = load_checkpoint(r.ckpt, r.policy, r.opt, world,
                                                                 rank,
                                                                 os.path.join(a.out, "log.jsonl"),
                                                                 a.seed, my_rows)
        r.say(f"resumed from {r.ckpt} at step {r.step}")
    elif a.resume:
        r.say(f"--resume: no checkpoint in {a.out}, starting fresh")
    return r


def build_models(a, s, ckpt, rows, rank, world, with_ref):
    """(πθ, πref, tokenizer, chat reward, the rollout engine's model). πθ comes from the checkpoint
    when resuming, πref and the LLM judge from the seed model (πref then takes a synced copy the
    checkpoint saved). with_ref False (GRPO without its KL term never looks at πref, as TRL at
    β = 0): none. The engine's model is its own copy (at s = 1 on one process the HF engine samples
    from πθ itself; vLLM loads its own: None); offline, of the seed model. One process loads each
    model. Under torchrun rank 0 reads the weights and every rank receives them by broadcast, πθ
    and πref straight into FSDP shards (no rank holds either whole), the engine's and the judge's
    copies whole (distributed.from_rank0)."""
    start, needs_chat = a.init_from or a.model, any(r["task"] == "chat" for r in rows)
    sampled = sampled_model(a, s, ckpt)
    if not multiprocess():
        policy, tok = load_model(ckpt or start, a.device)
        ref = (
            load_model(start, a.device)[0] if ckpt else copy.deepcopy(policy)) if with_ref else None
        judge = (copy.deepcopy(ref) if ref is not None else load_model(
            start, a.device)[0]) if needs_chat and not a.reward_model else None
        load_ref(ckpt, ref)   # a synced πref, after the judge was copied from the seed
        engine_model = None if a.engine == "vllm" else policy if sampled == (
            ckpt or start) else load_model(sampled, a.device)[0]
        if a.grad_checkpointing:
            checkpoint_activations(policy)
    else:
        # on the CPU, rank 0 only
        seed, tok = load_model(start, "cpu") if rank == 0 else (None, None)
        trained = load_model(ckpt, "cpu")[0] if rank == 0 and ckpt else seed
        tok, shape = from0(tok), blueprint_of(seed)
        policy = from_rank0(trained, shape, a.device, a.train_dtype,
                            checkpointing=a.grad_checkpointing)
        # the judge and an offline engine keep the seed itself
        synced = copy.deepcopy(seed) if rank == 0 and ckpt else seed
        if rank == 0:
            load_ref(ckpt, synced)
        ref = from_rank0(synced, shape, a.device, a.train_dtype) if with_ref else None
        judge = from_rank0(seed, shape, a.device) if needs_chat and not a.reward_model else None
        engine_model = from_rank0(
            seed if sampled == start else trained, shape, a.device,
            dtype=getattr(torch, a.rollout_dtype)) if a.engine != "vllm" else None
        del seed, trained, synced
    if ref is not None:
        ref.eval().requires_grad_(False)
    chat_reward = make_scalar_reward(
        a.reward_model, judge=(judge, tok) if judge is not None else None,
        trust_remote_code=a.trust_remote_code) if needs_chat else None
    return policy, ref, tok, chat_reward, engine_model


def sampled_model(a, s, ckpt):
    """The model the engine starts from: πθ's (the checkpoint's when resuming); offline the seed
    model, after a resume too."""
    start = a.init_from or a.model
    return start if s == math.inf else ckpt or start


def build_engine(a, s, ckpt, policy, model, tok, rows, rank, world, say):
    """The rollout engine (rollout.py) on `model` (build_models): vLLM (--engine vllm), or our HF
    loop with decode.py's step where it applies (fast_engine.py). The decode plan it measured (or
    was given) goes into the run's args, so the checkpoints keep it and a resumed run decodes as
    it began (its rounding)."""
    if a.engine == "vllm":   # loads its weights itself; synced from πθ like the HF engine
        # its KV cache sized for the longest prompt + --max-new-tokens, not the model's whole
        # context (131k for Llama-3.1)
        longest = max(len(chat_prompt_ids(tok, row_prompt(r))) for r in rows) + a.max_new_tokens
        context = getattr(policy.config, "max_position_embeddings", None) or longest
        return VLLMEngine(sampled_model(a, s, ckpt), memory=a.vllm_memory, seed=a.seed + rank,
                          device=a.device, dtype=a.rollout_dtype,
                          max_model_len=min(longest, context))
    dtype = getattr(torch, a.rollout_dtype)
    # decode steps between two syncs: batches of --gen-batch rows, each up to --max-new-tokens
    sequences = a.batch_prompts // world * a.n * (a.steps if s == math.inf else s)
    engine = fast_engine(
        model, tok, max_batch=a.gen_batch, dtype=dtype, own=model is not policy,
        share=s == 1 and world == 1 and dtype == policy.dtype and model is policy,
        matmul=a.decode_matmul, horizon=a.max_new_tokens * math.ceil(sequences / a.gen_batch),
        rows=sequences)
    if engine.fast:
        if world > 1:   # every rank decodes by rank 0's plan: one run, one rounding
            engine.fast.plan = from0(engine.fast.plan)
        measured, a.decode_matmul = a.decode_matmul == "auto", plan_text(engine.fast.plan)
        kept = plans_file()
        say(f"decode matmuls (rows from:form; --decode-matmul): {a.decode_matmul}" + (
            f" (measured on this machine, kept in {kept}: delete it to measure again)" if kept
            else " (measured here)") * measured)
    return engine


def load_ref(ckpt, ref):
    """πref as a checkpoint saved it (only runs that sync πref save it), before sharding."""
    if ckpt is None or ref is None or not os.path.exists(os.path.join(ckpt, "ref.pt")):
        return
    saved = torch.load(os.path.join(ckpt, "ref.pt"))   # parameters only (tied ones once)
    params = dict(ref.named_parameters())
    if set(saved) != set(params):
        sys.exit(f"{ckpt}/ref.pt does not match the model's parameters")
    with torch.no_grad():
        for name, t in saved.items():
            params[name].copy_(t)
