r"""
Semi-online DPO / GRPO training (Lanchantin et al. 2025, "Bridging Offline and Online
Reinforcement Learning for LLMs", arXiv 2506.21495).

One knob, s = --sync-every: optimizer steps between syncs of the rollout (generation) weights
with the trained weights. s=1 is online, s=inf offline (every response sampled from the seed
model), s=epoch is iterative DPO; at each sync the rollouts of the next s steps are generated
together in one batch.

main() reads as the paper's §2, after start.setup(): sync → generate the rollouts of the next s
steps → score → pairs (DPO) or groups (the rest) → loss → optimizer step → log (and checkpoint).
The objectives are pure functions in dpo.py and grpo.py, picked from losses.LOSSES; flags.py holds
the flags, start.py builds the run, rollout.py samples, distributed.py holds the plumbing (FSDP2
sharding, gathers over ranks), checkpoint.py the checkpoints.

Run (CPU, default SmolLM2-135M-Instruct on built-in arithmetic, ~2.5 min on 2 cores with bf16):
    python train.py
Other regimes and losses:
    python train.py --loss grpo --sync-every 1
    python train.py --loss dpo --sync-every inf          # offline DPO
    python train.py --model Qwen/Qwen2.5-0.5B-Instruct --train-data data/math_train.jsonl
Resume a killed run:
    python train.py --out runs/x --resume
Several GPUs (or CPU processes), FSDP (the 8B recipe's flags and memory: README):
    torchrun --standalone --nproc_per_node 8 train.py --model meta-llama/Llama-3.1-8B-Instruct ...
"""
import math
import random
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import flags
from checkpoint import save_checkpoint
from data import row_prompt, step_rows
from distributed import (all_max, all_sum, copy_params, full_params, gather, merge_metrics,
                         multiprocess, spare_unit)
from dpo import entropy_regularizer, nll_loss, select_pair, token_entropy
from eval import score_heldout
from grpo import kl_k3
from logs import (memory_metrics, open_outputs, plot_run, rollout_metrics, run_summary,
                  write_step)
from losses import LOSSES, has_ratio, kl_term, pairwise
from host import console, stop_signals
from models import chat_prompt_ids, collate, response_logps
from rewards import score, stats as grading
from rollout import sample_key
from start import setup


def parse_args(argv=None):
    """train.py's flags (flags.py: each flag, its default, its check), checked before anything
    loads."""
    return flags.parse(argv, __doc__)


# -----------------------------------------------------------------------------
# The loop's parts: rollouts → units → loss and gradient → update; then main() (setup: start.py)
def rollouts(engine, window, first, a, offline, chat_reward, spent):
    """Generate → score, for every step of the window at once: `window` has one list of (row,
    prompt ids) per step, from step `first` on. Returns one list of (row, responses) per step, and
    the tokens generated. Common random numbers: a prompt's responses at step k are drawn with
    uniforms keyed by (seed, k, row), so arms (and any number of ranks) with equal weights sample
    the same.
    Offline (s = ∞): each distinct prompt is answered once, by the seed model, at the step it first
    appears, and reused on every pass over the data (the paper's offline DPO: one fixed set)."""
    todo, seen = [(k, row, ids) for k, p in enumerate(window, first) for row, ids in p], set()
    if offline:
        todo = [(k, row, ids) for k, row, ids in todo
                if not (row["id"] in seen or seen.add(row["id"]))]
    tick = time.time()
    groups = engine.generate(
        [ids for _, _, ids in todo], a.n, a.temperature, a.top_p, a.max_new_tokens,
        keys=None if a.no_crn else [sample_key(a.seed, k, row["id"]) for k, row, _ in todo])
    tick = clock(spent, "generate", tick)
    # math: 1/0 by Math-Verify; chat: the reward model (or the judge)
    score([row for _, row, _ in todo for _ in range(a.n)], [x for g in groups for x in g],
          chat_reward, a.length_penalty, a.cut_responses)
    clock(spent, "score", tick)
    made, it = {row["id"]: g for (_, row, _), g in zip(todo, groups)}, iter(groups)
    return [[(row, made[row["id"]] if offline else next(it)) for row, _ in p] for p in window], \
        sum(len(x.completion_ids) for g in groups for x in g)


def pairs_or_groups(batch, a, pair_key, stats):
    """The step's training units: one (chosen, rejected) pair per prompt for DPO (§2: a random
    correct vs a random incorrect response; best vs worst for scalar rewards), the whole group
    for the rest. A prompt whose responses all tie carries no preference and is skipped; GRPO
    still counts it in its mean (A = 0, as DeepSeekMath and TRL) and trains on it only when the
    KL term gives it a gradient. Returns (units, responses, tokens): the counts over the scored
    responses are GRPO's denominators."""
    units, n_resp, n_tok = [], 0, 0
    for row, g in batch:
        # the same pair on any number of ranks
        rng = random.Random(f"{a.seed}-pairs-{pair_key}-{row['id']}")
        rw = [x.reward for x in g]
        if not all(map(math.isfinite, rw)):   # a reward model returned NaN/inf: skip, counted
            stats["bad_rewards"] += 1
            continue
        n_resp, n_tok = n_resp + len(g), n_tok + sum(len(x.completion_ids) for x in g)
        if pairwise(a):
            pair = select_pair(rw, verifiable=row["task"] == "math", rng=rng)
            if pair:
                units.append([g[pair[0]], g[pair[1]]])
        elif max(rw) > min(rw) or (kl_term(a.loss) and a.kl_coef):   # the KL has a gradient
            units.append(g)
    return units, n_resp, n_tok


def loss_and_backward(units, n_resp, n_tok, batch, a, policy, ref, staleness, world, tok, spent):
    """The step's loss and its gradient, over micro-batches of whole units. Each micro-batch's loss
    is its part of the step's (shares over all ranks' units; FSDP averages gradients over ranks,
    hence the factor `world`), so the gradient is the step's whatever the micro-batching. Every
    rank runs the same number of micro-batches so FSDP's collectives line up: a rank out of units
    runs a zero-weight pass. Returns (the step's metrics over all ranks, units over all ranks)."""
    prefers = [max(x.reward for x in u) > min(x.reward for x in u) for u in units]
    policy.train()
    n_micro = all_max([math.ceil(len(units) / a.micro_groups)], a.device)[0]
    total_units, total_pref, total_resp, total_tok = all_sum(
        [len(units), sum(prefers), n_resp, n_tok], a.device)
    parts = []   # per micro-batch {metric: (value, weight)}
    for i in range(int(n_micro) if total_units else 0):
        mb = units[i * a.micro_groups:(i + 1) * a.micro_groups]
        b = collate(mb or spare_unit(batch, tok), a.device)
        tick = time.time()
        with autocast(a):
            b["pi"], logits = response_logps(policy, b, a.temperature, with_logits=True,
                                             share_prompt=not a.grad_checkpointing)
        tick = clock(spent, "policy", tick)
        with torch.no_grad(), autocast(a):
            b["ref"] = response_logps(ref, b, a.temperature) if ref is not None else None
        tick = clock(spent, "ref", tick)
        if not mb:
            (b["pi"].sum() * 0).backward()
            continue
        b["rewards"] = torch.tensor([[x.reward for x in u] for u in mb], device=a.device)
        b["share"] = sum(prefers[i * a.micro_groups:(i + 1) * a.micro_groups]) / max(1, total_pref)
        b["responses"], b["tokens"] = total_resp, total_tok   # the step's, over all ranks
        tokens = b["mask"].sum().item()
        b["old"], b["is_w"], m = old_policy(b, staleness, a)
        loss, extra = LOSSES[a.loss]["fn"](b, a)
        loss = loss + regularizers(b, logits, a, len(mb) / total_units)
        (loss * world).backward()
        tick = clock(spent, "policy", tick)
        m["loss"] = (loss.item(), 1)
        if ref is not None:
            # k3 = exp(d) - d - 1, d = log πref - log πθ, over the tokens trained this step:
            # KL(πθ‖πref) only where they are πθ's own samples (GRPO, nothing stale); on DPO's old,
            # pushed-down rejected ones single tokens dominate
            m["k3_trained"] = (((kl_k3(b["pi"].detach(), b["ref"]) * b["mask"]).sum() /
                                tokens).item(), tokens)
        # GRPO's ratio stats per token, the DPO margins per unit (kl: above)
        for k, v in extra.items():
            if k != "kl":
                m[k] = (float(v), 1 if k.endswith(
                    ("_min", "_max")) else tokens if k in ("ratio_mean", "clip_frac") else len(mb))
        parts.append(m)
    return {"loss": None, "k3_trained": None} | merge_metrics(
        [p for ps in gather(parts) for p in ps]), total_units


# -----------------------------------------------------------------------------
# πθ_old: the policy that sampled, and what GRPO's ratio divides by (§2.3)

def old_policy(b, staleness, a):
    """πθ_old in GRPO's ratio πθ/πθ_old, and the truncated importance weight: the one place the
    loop decides them. Each sampled token has three log-probs:
    - log μ (b["mu"]): the sampler's, recorded while the engine sampled (rollout.Sample.logps).
      The engine holds the weights of the last sync, πθ_old's, but may compute them otherwise
      than the trainer: in bf16 (--rollout-dtype), in vLLM's kernels, renormalized to a top-p
      nucleus.
    - log πθ_old: the trainer's own πθ as it was at the last sync. The step right after a sync
      (staleness 0) has it for free, sg[πθ]: the ratio is exactly 1. A later step of the same
      window (s > 1) needs it kept: where μ is not the trainer's (needs_stamp) the sync stamps it
      on every response (stamp_old_logps: b["old_stamped"]); elsewhere (an fp32 HF engine,
      the trainer's to float rounding) log μ stands in.
    - w = min(πθ_old/μ, C), C = --tis-cap (truncated importance sampling; default 2 where the
      sampler is bf16 or vLLM, else 0: off): each token's loss weighted by it, for the
      sampler/trainer gap.
    Returns (log πθ_old, w or None, {the sampler/trainer gap on equal weights where measurable})."""
    sampler, on, gap = b["mu"], b["mask"].bool(), {}
    if staleness == 0:
        old = b["pi"].detach()
        d = (sampler - old).abs()[on]   # the same weights, other numerics
        gap = {
            "mismatch_mean": (d.mean().item(), on.sum().item()), "mismatch_max": (d.max().item(), 1)
        }
    else:
        old = b["old_stamped"]
    tis = has_ratio(a) and a.tis_cap > 0
    return old, (old - sampler).exp().clamp(max=a.tis_cap) * b["mask"] if tis else None, gap


def needs_stamp(a):
    """Whether a sync keeps the trainer's log πθ_old on its rollouts for the window's later steps
    (old_policy): a ratio loss whose sampler is not the trainer (TIS on, or a top-p nucleus)."""
    return has_ratio(a) and (a.tis_cap > 0 or a.top_p < 1)


@torch.no_grad()
def stamp_old_logps(model, groups, temperature, chunk, device, tok):
    """At a sync πθ is πθ_old: store the trainer's own log πθ_old(y_t | x, y_<t) in each response
    of `groups` (Sample.old_logps; old_policy says why), for the steps that train on these rollouts
    once πθ has moved.
    Every rank runs the same number of forwards (FSDP). In eval mode: with gradient checkpointing
    on, a model in train mode turns its KV cache off, which the shared-prompt pass needs."""
    n = int(all_max([math.ceil(len(groups) / chunk)], device)[0])
    training = model.training
    model.eval()
    for i in range(n):
        part = groups[i * chunk:(i + 1) * chunk]
        lp = response_logps(model, collate(part or spare_unit([], tok), device), temperature)
        for x, row in zip([x for g in part for x in g], lp):
            x.old_logps = row[:len(x.completion_ids)].tolist()
    model.train(training)


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
        extra = extra + unit_share * entropy_regularizer(
            token_entropy(logits, b["mask"], a.temperature), a.entropy_coef)
    return extra


def optimizer_step(policy, opt, a, loss, total_units, stats, say, step):
    """Clip the gradient and step AdamW; a non-finite loss or gradient skips the update (counted),
    and --max-bad-steps of them in a row stop the run. Returns the gradient norm (None without
    units)."""
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
            say(f"step {step}: non-finite loss/gradient, "
                f"update skipped ({stats['nan_skips']} so far)")
            if stats["bad_in_a_row"] >= a.max_bad_steps:
                sys.exit(f"stopping: {a.max_bad_steps} non-finite "
                         f"losses/gradients in a row (lower --lr? "
                         f"check the reward model); the last checkpoint in {a.out} is intact")
        opt.zero_grad(set_to_none=True)
    return grad_norm


def autocast(a):
    """The policy and reference passes in --train-dtype: bf16 matmuls (about 1.5x fp32 on a CPU with
    avx512_bf16), while weights, gradients and AdamW's state stay fp32 and log-probs are taken in
    fp32."""
    return torch.autocast(
        a.device.split(":")[0], dtype=torch.bfloat16, enabled=a.train_dtype == "bfloat16")


def clock(spent, what, since):
    """Add the seconds since `since` to spent[what]; returns now (the step's time breakdown)."""
    spent[what] += (now := time.time()) - since
    return now


def prompt_ids(row, r, a):
    """x as token ids; None when it leaves no room for a response in the context (--long-prompts
    skip)."""
    ids = chat_prompt_ids(r.tok, row_prompt(row))
    room = (getattr(r.policy.config, "max_position_embeddings", None) or 1 << 30) - a.max_new_tokens
    if len(ids) <= room:
        return ids
    r.stats["long_prompts"] += 1
    return ids[-room:] if a.long_prompts == "truncate" and room > 0 else None


def sync_and_generate(r, a, spent):
    """The sync (§2.3): refresh the engine's πθ_old from πθ (never offline), then generate and score
    the rollouts of the next s steps at once into r.buffer; for a ratio loss, stamp the trainer's
    πθ_old on the responses the later, stale steps will train on. Returns rollout tokens per
    second."""
    tick = time.time()
    if r.step > 0 and r.s != math.inf:
        r.engine.update_weights(full_params(r.policy))
    r.last_sync = r.step
    upto = min(a.steps, r.step + r.s) if r.s != math.inf else a.steps
    window = [[(row, ids) for row in step_rows(r.train, k, a.batch_prompts, a.seed)[r.rank::r.world]
             if (ids := prompt_ids(row, r, a)) is not None] for k in range(r.step, upto)]
    tick = clock(spent, "sync", tick)
    r.buffer, generated = rollouts(r.engine, window, r.step, a, r.s == math.inf, r.chat_reward,
                                   spent)
    # its weights are next read after a sync or evaluation's update_weights refills them
    r.engine.sleep()
    gen_tok_s, tick = generated / spent["generate"], time.time()
    if needs_stamp(a) and len(r.buffer) > 1:
        with autocast(a):
            stamp_old_logps(r.policy, [g for p in r.buffer[1:] for _, g in p], a.temperature,
                            a.micro_groups, a.device, r.tok)
        clock(spent, "old_logps", tick)
    return gen_tok_s


def score_now(r, a):
    """Held-out scores of πθ as it is now (--eval-every): the engine takes πθ's weights and goes
    back to sleep while πθ trains, as after a sync's rollouts (the next sync refreshes it
    anyway)."""
    r.engine.update_weights(full_params(r.policy))
    score_heldout(r.engine, r.tok, r.heldout[r.rank::r.world], r.chat_reward, a, f"step{r.step}")
    r.engine.sleep()


def checkpoint(r, a):
    """πθ (HF format), the optimizer state, πref if synced, each rank's rollouts and RNG."""
    rng = (torch.get_rng_state(),
           torch.cuda.get_rng_state() if a.device.startswith("cuda") else None)
    state = {"step": r.step, "ranks": (r.buffer, *rng), "last_sync": r.last_sync,
             "stats": r.stats, "args": vars(a)}
    save_checkpoint(a.out, r.step, r.policy, r.opt, r.shell, r.tok,
                    r.ref if a.ref_sync_every else None, state, a.keep, a.keep_optimizer,
                    r.master)


def main(argv=None):
    console()   # a console in any code page prints what follows (π, θ, β)
    a, t_start = parse_args(argv), time.time()
    r = setup(a)
    if not r.ckpt and r.heldout and not a.no_eval_before:
        score_heldout(r.engine, r.tok, r.heldout[r.rank::r.world], r.chat_reward, a, "before")
    out, records = open_outputs(a, r.master, bool(r.ckpt)), []
    stop = []   # Ctrl-C, SIGTERM (not on Windows): finish the step, checkpoint, exit
    handlers = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                for sig in stop_signals()}
    bar = tqdm(total=a.steps, initial=r.step, desc="train", dynamic_ncols=True,
               disable=not r.master)
    while r.step < a.steps:
        t0, spent = time.time(), dict.fromkeys(
            ("sync", "generate", "score", "old_logps", "policy", "ref", "optimizer"), 0.0)
        # ---------------------------------------------------------------------
        # Rollout on stale weights: at a sync, refresh πθ_old and sample the next s steps at once
        gen_tok_s = sync_and_generate(r, a, spent) if not r.buffer else None
        batch = r.buffer.pop(0)
        staleness = r.step - r.last_sync

        # ---------------------------------------------------------------------
        # Pairs (DPO) or groups (the rest)
        units, n_resp, n_tok = pairs_or_groups(batch, a, "offline" if r.s == math.inf else r.step,
                                               r.stats)

        # ---------------------------------------------------------------------
        # Loss → gradient → optimizer step
        metrics, total_units = loss_and_backward(units, n_resp, n_tok, batch, a, r.policy, r.ref,
                                                 staleness, r.world, r.tok, spent)
        tick = time.time()
        grad_norm = optimizer_step(r.policy, r.opt, a, metrics["loss"], total_units, r.stats, r.say,
                                   r.step)
        clock(spent, "optimizer", tick)
        r.step += 1
        ref_synced = bool(a.ref_sync_every) and r.step % a.ref_sync_every == 0
        if ref_synced:   # πref ← πθ
            copy_params(r.ref, r.policy)

        # ---------------------------------------------------------------------
        # Log: one JSON line per step, summed over ranks (chosen: a pair's first, a group's best)
        chosen = [x for u in units for x in u if x.reward > sum(y.reward for y in u) / len(u)]
        sums = [len(units), len(batch) - len(units), len(stop), len(chosen),
                sum(x.finish_reason == "length" for x in chosen)]
        names = ("units", "skipped", "stop", "chosen", "chosen_cut")
        counts = dict(zip(names, all_sum(sums, a.device)))
        for k in ("chosen", "chosen_cut"):
            r.stats[k] = r.stats.get(k, 0) + int(counts[k])
        rec = {"step": r.step, **rollout_metrics(batch, r.tasks, a.device), **metrics,
               "pairs_used" if pairwise(a) else "groups_used": int(counts["units"]),
               "skipped": int(counts["skipped"]),
               "chosen_truncated":
                   counts["chosen_cut"] / counts["chosen"] if counts["chosen"] else None,
               "grad_norm_pre_clip": grad_norm, "staleness": staleness,
               "rollout_tok_s": gen_tok_s and gen_tok_s * r.world, **memory_metrics(a.device),
               "step_s": time.time() - t0, "time": {k: round(v, 4) for k, v in spent.items()}}
        if ref_synced:
            rec["ref_synced"] = True
        records.append(rec)
        write_step(out, rec, batch, units, a, r.step, r.last_sync)
        bar.set_postfix(reward=f"{rec['reward']:.3f}", len=f"{rec['length']:.0f}")
        bar.update(1)
        if a.eval_every and r.step % a.eval_every == 0 and r.step < a.steps and r.heldout:
            score_now(r, a)

        # ---------------------------------------------------------------------
        # Checkpoint
        if (a.save_every and r.step % a.save_every == 0) or r.step == a.steps or counts["stop"]:
            checkpoint(r, a)
        if counts["stop"]:
            r.say(f"\nsignal received: checkpoint saved at step {r.step}; continue with --resume")
            break
    for sig, h in handlers.items():
        signal.signal(sig, h)
    bar.close()
    return finish(r, a, records, out[2], bool(stop), t_start)


def finish(r, a, records, track, stopped, t_start):
    """After the last step: held-out scores of the trained πθ, the run's plot and summary, and the
    engine shut down before the process group (a colocated vLLM's groups live inside torchrun's)."""
    # the engine returned holds πθ, awake (one process: under torchrun the processes end here, no
    # gather)
    if (r.heldout and not stopped) or (getattr(r.engine, "asleep", False) and not multiprocess()):
        r.engine.update_weights(full_params(r.policy))
    if r.heldout and not stopped:
        score_heldout(r.engine, r.tok, r.heldout[r.rank::r.world], r.chat_reward, a, "after")
    if r.master and records:
        r.say(f"curves: {plot_run(a.out)}")
    if track:
        track[1]()
    r.say(run_summary(records, grading, time.time() - t_start, a.out, r.stats))
    if multiprocess():
        r.engine.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    return {
        "policy": r.policy, "ref": r.ref, "engine": r.engine, "records": records, "stopped": stopped
    }


if __name__ == "__main__":
    main()
