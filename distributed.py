"""
The distributed plumbing of train.py, out of the training loop's way: the process group,
building a run's models (load once, then shard: build_models), FSDP2 sharding (`fully_shard`,
used directly), gathers of parameters and metrics over ranks, the lockstep rule FSDP's
collectives need (checkpoints: checkpoint.py).

A plain `python train.py` is one process with no process group: every helper here is then
the identity (or a plain save/load), so the single-process path reads the same code.
"""
import copy
import math
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from data import row_prompt
from heap import keep_freed_memory
from models import chat_prompt_ids, collate, load_model, response_logps
from rewards import make_scalar_reward
from rollout import HFEngine, Sample, VLLMEngine

def setup_distributed(device):
    """torchrun sets RANK, WORLD_SIZE, LOCAL_RANK: join the process group (nccl on CUDA, gloo
    on CPU). A plain `python train.py` stays a single process with no group and no FSDP."""
    if not device.startswith("cuda") and "RANK" not in os.environ:
        keep_freed_memory()
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def mixed_precision(device, train_dtype):
    """FSDP's precision for --train-dtype: on CUDA with bfloat16, bf16 compute over fp32 master
    weights with fp32 gradient reduction; otherwise none (fp32, or on a CPU bf16 by autocast)."""
    if device.startswith("cuda") and train_dtype == "bfloat16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(device, train_dtype, *models):
    """FSDP2 over the training processes (the identity on one): one shard group per decoder layer,
    then the root, for each model given (None: skipped). The root reshards after every forward
    too: the reference (and the policy at a πθ_old stamp) runs forwards with no backward, after
    which FSDP's default would leave the root's parameters unsharded (plain tensors that a
    πref ← πθ copy or an optimizer-state checkpoint cannot take)."""
    mp = mixed_precision(device, train_dtype)
    for model in models if multiprocess() else []:
        if model is not None:
            for layer in getattr(getattr(model, "model", None), "layers", []):
                fully_shard(layer, mp_policy=mp)
            fully_shard(model, mp_policy=mp, reshard_after_forward=True)


def from_rank0(full, blueprint, device, train_dtype=None, dtype=None, checkpointing=False):
    """This rank's copy of rank 0's model `full` (on the CPU; None on the other ranks), built empty
    on the meta device and filled by broadcast one tensor at a time: no rank but 0 reads the
    weights, and the peak is one full tensor. With train_dtype, sharded by FSDP before it is filled
    (the policy and the reference: no rank ever holds them whole, as torchtitan loads); else whole,
    in `dtype` (the rollout engine's copy, the judge). blueprint = (class, config, generation
    config), the same on every rank (blueprint_of)."""
    cls, config, generation = blueprint
    with torch.device("meta"):
        model = cls(config)
    model.generation_config = generation
    if checkpointing:
        checkpoint_activations(model)
    if train_dtype is not None:
        shard(device, train_dtype, model)
    model.to_empty(device=device)
    # to_empty unties an unsharded model's tied embedding and LM head (FSDP keeps them tied)
    model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    src = {**full.state_dict(keep_vars=True), **dict(full.named_buffers())
           } if full is not None else {}
    with torch.no_grad():
        # buffers too: rotary tables are not in state_dict
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            whole = src[name].to(device, torch.float32) if src else torch.empty(
                t.shape, dtype=torch.float32, device=device)
            dist.broadcast(whole, 0)
            if isinstance(t, DTensor):   # this rank's shard of it
                whole = distribute_tensor(whole, t.device_mesh, t.placements,
                                          src_data_rank=None).to_local()
            (t.to_local() if isinstance(t, DTensor) else t).copy_(whole)
    return model.eval()


def checkpoint_activations(model):
    """Recompute activations in backward (--grad-checkpointing), whichever name the Transformers
    version uses."""
    (getattr(model, "activation_checkpointing_enable", None) or
     model.gradient_checkpointing_enable)()


def blueprint_of(full):
    """(class, config, generation config) of rank 0's model, on every rank."""
    box = [(type(full), full.config, full.generation_config) if full is not None else None]
    dist.broadcast_object_list(box, 0)
    return box[0]


def from0(obj):
    """Rank 0's `obj` (picklable: a tokenizer) on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def multiprocess():
    """More than one training process (torchrun). A plain run has no process group, or the
    one-process group that vLLM's engine makes for itself."""
    return dist.is_initialized() and dist.get_world_size() > 1


def all_sum(values, device, op="sum"):
    """Sum (or max) a list of numbers over ranks; the identity on one process."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if multiprocess():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not multiprocess():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def full_params(model):
    """(name, full tensor) per parameter, all-gathering one parameter at a time so the peak is
    one unsharded parameter, never the whole model. Every rank must iterate it together."""
    for name, p in model.named_parameters():
        yield name, (p.full_tensor() if isinstance(p, DTensor) else p).detach()


@torch.no_grad()
def copy_params(dst, src):
    """dst ← src, parameter by parameter (πref ← πθ at a reference sync); shards copy shards."""
    for p_dst, p in zip(dst.parameters(), src.parameters()):
        p_dst.copy_(p)


def merge_metrics(parts):
    """One step's metrics from per-micro-batch {name: (value, weight)} of all ranks: the loss is
    summed (each part is already its share of the step), *_min / *_max reduce by min / max,
    the rest are weighted means."""
    out = {}
    for k in sorted({k for p in parts for k in p}):
        vw = [p[k] for p in parts if k in p]
        if k == "loss":
            out[k] = sum(v for v, _ in vw)
        elif k.endswith(("_min", "_max")):
            out[k] = (min if k.endswith("_min") else max)(v for v, _ in vw)
        else:
            out[k] = sum(v * w for v, w in vw) / max(1e-12, sum(w for _, w in vw))
    return out


def spare_unit(batch, tok):
    """A one-response unit for a rank with nothing to train on, so that it still runs FSDP's
    collectives in step with the others (its loss is multiplied by zero)."""
    return [[x] for _, g in batch for x in g
            ][:1] or [[Sample([tok.eos_token_id], [tok.eos_token_id], [0.0], [0.0], "", "stop")]]


@torch.no_grad()
def stamp_old_logps(model, groups, temperature, chunk, device, tok):
    """At a sync πθ is πθ_old: store the trainer's own log πθ_old(y_t | x, y_<t) in each response
    of `groups` (Sample.old_logps), for the steps that train on these rollouts once πθ has moved.
    Every rank runs the same number of forwards (FSDP). In eval mode: with gradient checkpointing
    on, a model in train mode turns its KV cache off, which the shared-prompt pass needs."""
    n = int(all_sum([math.ceil(len(groups) / chunk)], device, op="max")[0])
    training = model.training
    model.eval()
    for i in range(n):
        part = groups[i * chunk:(i + 1) * chunk]
        lp = response_logps(model, collate(part or spare_unit([], tok), device), temperature)
        for x, row in zip([x for g in part for x in g], lp):
            x.old_logps = row[:len(x.completion_ids)].tolist()
    model.train(training)


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


# -----------------------------------------------------------------------------
# Building a run's models: load once, then shard

def build_models(a, s, ckpt, rows, rank, world, with_ref):
    """(πθ, πref, tokenizer, chat reward, rollout engine). πθ comes from the checkpoint when
    resuming, πref and the LLM judge from the seed model (πref then takes a synced copy the
    checkpoint saved). with_ref False (GRPO without its KL term never looks at πref, as TRL at β =
    0): none. The engine keeps its own copy (at s = 1 on one process the HF engine samples from πθ
    itself); offline, of the seed model. One process loads each model. Under torchrun rank 0 reads
    the weights and every rank receives them by broadcast, πθ and πref straight into FSDP shards (no
    rank holds either whole), the engine's and the judge's copies whole (distributed.from_rank0)."""
    start, needs_chat = a.init_from or a.model, any(r["task"] == "chat" for r in rows)
    # offline samples the seed model, after a resume too
    sampled = start if s == math.inf else ckpt or start
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
        a.reward_model, judge=(judge, tok) if judge is not None else None) if needs_chat else None
    if a.engine == "vllm":   # loads its weights itself; synced from πθ like the HF engine
        # its KV cache sized for the longest prompt + --max-new-tokens, not the model's whole
        # context (131k for Llama-3.1)
        longest = max(len(chat_prompt_ids(tok, row_prompt(r))) for r in rows) + a.max_new_tokens
        context = getattr(policy.config, "max_position_embeddings", None) or longest
        engine = VLLMEngine(sampled, memory=a.vllm_memory, seed=a.seed + rank, device=a.device,
                            dtype=a.rollout_dtype, max_model_len=min(longest, context))
    else:
        dtype = getattr(torch, a.rollout_dtype)
        # decode steps between two syncs: batches of --gen-batch rows, each up to --max-new-tokens
        rows = a.batch_prompts // world * a.n * (a.steps if s == math.inf else s)
        engine = HFEngine(
            engine_model, tok, max_batch=a.gen_batch, dtype=dtype, own=engine_model is not policy,
            share=s == 1 and world == 1 and dtype == policy.dtype and engine_model is policy,
            matmul=a.decode_matmul, horizon=a.max_new_tokens * math.ceil(rows / a.gen_batch),
            rows=rows)
        if world > 1:   # every rank decodes by rank 0's measured plan: one run, one rounding
            engine.plan = from0(engine.plan)
    return policy, ref, tok, chat_reward, engine
