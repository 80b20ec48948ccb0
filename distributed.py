"""
The distributed plumbing of train.py, out of the training loop's way: the process group,
loading a model once and sending it to every rank (from_rank0), FSDP2 sharding (`fully_shard`,
used directly), gathers of parameters and metrics over ranks, the lockstep rule FSDP's
collectives need (checkpoints: checkpoint.py).

A plain `python train.py` is one process with no process group: every helper here is then
the identity (or a plain save/load), so the single-process path reads the same code.
"""
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from rollout import Sample


def setup_distributed(device):
    """torchrun sets RANK, WORLD_SIZE, LOCAL_RANK: join the process group (nccl on CUDA, gloo
    on CPU). A plain `python train.py` stays a single process with no group and no FSDP."""
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


def all_sum(values, device):
    """A list of numbers, each summed over ranks; the identity on one process."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if multiprocess():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_max(values, device):
    """A list of numbers, each the largest over ranks (e.g. how many passes every rank must run);
    the identity on one process."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if multiprocess():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
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
