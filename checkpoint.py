"""
Atomic checkpoints: πθ as a plain Hugging Face folder, the optimizer state sharded (any number of
processes loads it back), a synced πref, and each rank's rollouts and RNG, so that `--resume`
continues a killed run with the same weights and losses as an uninterrupted one.
"""
import glob
import json
import os
import shutil
import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from distributed import full_params, gather, multiprocess

# dcp in a single process: intended
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def save_checkpoint(out, step, policy, opt, shell, tok, ref, state, keep, optimizers, master):
    """Atomic: write into a temporary folder, rename it, then repoint `latest` by rename too.
    A kill at any moment leaves the previous checkpoint complete and `latest` pointing at it.

    Every rank calls this. πθ is saved as a consolidated Hugging Face checkpoint usable anywhere
    (gathered a parameter at a time onto rank 0's CPU and written through `shell`, an empty model
    of its class); the optimizer state sharded by torch.distributed.checkpoint (each rank writes
    its own shards; any number of processes can load it back); πref when given (a synced one);
    `state` with state["ranks"] gathered from every rank (its rollouts and RNG). `keep`
    checkpoints stay on disk; optimizers (--keep-optimizer): "last", only the newest keeps its
    optimizer state (twice the weights' size under AdamW; --resume needs only the newest), "all",
    or "none": weights only, for runs that will not be resumed."""
    weights = {n: t.cpu() for n, t in full_params(policy) if master}
    ref_params = {n: t.cpu() for n, t in full_params(ref) if master} if ref is not None else None
    state = {**state, "ranks": gather(state["ranks"])}
    final = os.path.join(out, f"ckpt-{step:06d}")
    tmp = final + ".tmp"
    # disk full or unwritable: drop the half-written folder, keep the previous checkpoint, stop
    try:
        if master:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        if multiprocess():
            dist.barrier()
        if optimizers != "none":
            dcp.save({"optimizer": get_optimizer_state_dict(policy, opt)},
                     checkpoint_id=os.path.join(tmp, "optimizer"), no_dist=not multiprocess())
        if master:
            shell.save_pretrained(tmp, state_dict=weights)
            tok.save_pretrained(tmp)
            if ref_params is not None:
                torch.save(ref_params, os.path.join(tmp, "ref.pt"))
            torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    except (OSError, RuntimeError) as e:   # torch.save reports a full disk as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        latest = os.path.join(out, "latest")
        kept = open(latest).read().strip() if os.path.exists(latest) else None
        sys.exit(f"--out {out}: the checkpoint of step {step} could not be written ({e}); " +
                 (f"the previous checkpoint {kept} is "
                  f"intact (--resume continues from it)" if kept else "no earlier checkpoint"))
    if master:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(out, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(out, "latest.tmp"), os.path.join(out, "latest"))
        older = sorted(glob.glob(os.path.join(out, "ckpt-??????")))[:-1]
        for old in older[:len(older) + 1 - keep]:
            shutil.rmtree(old, ignore_errors=True)
        for old in older[len(older) + 1 - keep:] if optimizers != "all" else []:
            shutil.rmtree(os.path.join(old, "optimizer"), ignore_errors=True)
    if multiprocess():
        dist.barrier()
    return final



def latest_checkpoint(out):
    """The newest complete checkpoint in `out` (the one its `latest` file names), or None."""
    f = os.path.join(out, "latest")
    return os.path.join(out, open(f).read().strip()) if os.path.exists(f) else None


def saved_args(ckpt):
    """The flags the run that wrote `ckpt` ran with (after `auto`s were resolved), as a dict."""
    return torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False).get("args", {})


def load_checkpoint(ckpt, policy, opt, world, rank, log, seed, my_rows):
    """Resume from `ckpt`: the optimizer state (saved sharded; loaded into this run's layout, any
    number of processes) and the trainer state; the `log` (rank 0's log.jsonl) loses the lines a
    killed run wrote after the checkpoint. Returns (step, last sync step, stats, this rank's rollout
    buffer). On another number of processes the saved rollouts of the window (every rank's) are
    split anew: this rank takes, for each remaining step k, the responses to its rows my_rows(k)
    (row ids), so the window trains on what was sampled before, and sampling goes on with a
    fresh seed per rank."""
    st = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False)
    # this run's (sharded) layout, filled from the saved shards
    osd = get_optimizer_state_dict(policy, opt)
    dcp.load({"optimizer": osd}, checkpoint_id=os.path.join(ckpt, "optimizer"),
             no_dist=not multiprocess())
    set_optimizer_state_dict(policy, opt, osd)
    # rank 0's step files (log.jsonl, samples.jsonl) lose what a killed run wrote after it
    for path in [log, os.path.join(os.path.dirname(log), "samples.jsonl")] if rank == 0 else []:
        if os.path.exists(path):
            keep = [line for line in open(path) if json.loads(line)["step"] <= st["step"]]
            with open(path, "w") as f:
                f.writelines(keep)
    # same number of processes: each rank takes back its rollouts and RNG
    if len(st["ranks"]) == world:
        buffer, rng_state, *cuda_rng = st["ranks"][rank]   # CUDA's RNG too where there was one
        torch.set_rng_state(rng_state)
        if cuda_rng and cuda_rng[0] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda_rng[0])
    else:
        saved = [buf for buf, *_ in st["ranks"]]
        made = [{r["id"]: (r, g) for buf in saved for r, g in buf[j]} for j in range(len(saved[0]))]
        buffer = [[made[j][i] for i in my_rows(st["step"] + j) if i in made[j]]
                  for j in range(len(made))]
        torch.manual_seed(seed + rank + 7919 * st["step"])
        if rank == 0:
            print(f"resuming on {world} processes from a checkpoint of "
                  f"{len(st['ranks'])}: the saved rollouts split anew")
    return st["step"], st["last_sync"], st["stats"], buffer
