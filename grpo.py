"""
GRPO (Shao et al. 2024) and the paper's combined objective, as pure functions over tensors.

What the paper optimizes (arXiv 2506.21495, §2 and §4.2):
  For each prompt x sample a group G = {y_1..y_N} from the rollout model πθ_old, score it,
      A_i = (r_i - mean(r)) / std(r)
  and minimize the PPO-style clipped surrogate per token
      L_GRPO = -E[ min(ρ_t A_i, clip(ρ_t, 1-ε, 1+ε) A_i) ] + β_KL · KL(πθ || πref),
      ρ_t = πθ(y_i,t | x, y_i,<t) / πθ_old(y_i,t | x, y_i,<t).
  Combined (§4.2): L = L_GroupDPO(x, 𝒴c, 𝒴r) + α · L_GRPO(x, 𝒴c ∪ 𝒴r).

What this file implements: those three functions. Choices the paper leaves open are flags:
  - `scale_std=False` drops the std division (Dr. GRPO, Liu et al. 2025), in GRPO and in the
    combined loss alike.
  - `token_average`: "sequence" (default) averages each response's tokens, then the
    responses, as in DeepSeekMath's GRPO that the paper cites; "token" averages over all
    tokens of the step (DAPO), which weighs long responses more. The caller says how many
    responses / tokens the whole optimizer step has (`denom`), so a step split into
    micro-batches (or ranks) gets the batch-wide mean, not a mean of micro-batch means.
  - Groups whose rewards all tie have A = 0: they add nothing to the policy-gradient term
    but count in the mean (DeepSeekMath, TRL), so a step where most groups tie is a small step.
  - KL uses the k3 estimator  exp(d) - d - 1,  d = log πref - log πθ  (unbiased, ≥ 0).

Which distribution the log-probs are of. Rollouts are sampled at temperature T, so the policy
that acts is π_T = softmax(z / T), z the model's logits. Every log-prob here (sampler,
πθ_old, πθ, πref) and the entropy metric are of π_T, as TRL and verl divide the logits by T
before the log-softmax: the ratio then compares the distribution the tokens came from, and at
s = 1 it is exactly 1 (the trainer uses πθ_old = sg[πθ] when nothing is stale). With
--top-p < 1 the sampler draws from π_T renormalized over the nucleus; the trainer cannot see
the nucleus, so it trains π_T, and the sampler's log-probs (of what it drew from) make the
truncated importance weight below correct for the difference.

πθ_old is the stale rollout model; train.py passes the log-probs of the sampler μ that drew
the tokens (with an fp32 HF engine, the trainer's to float rounding). A bf16 or vLLM sampler
differs from the trainer's πθ_old (the same weights, other numerics); truncated importance
sampling (Yao et al. 2025; TRL's vllm_importance_sampling_correction) then takes the PPO
ratio against the trainer's own πθ_old (computed at the sync) and weights each token by
w = min(πθ_old / μ, C), detached: the `is_weight` argument.
"""
import torch

from dpo import _check, group_dpo_loss

TOKEN_AVERAGES = ("sequence", "token")


def grpo_advantages(rewards, eps=1e-4, scale_std=True):
    """A_i = (r_i - mean(r)) / (std(r) + eps), per group. rewards: [num_prompts, G].

    A group whose rewards are all equal gets A = 0 (never NaN): it carries no signal.
    """
    if rewards.dim() != 2 or rewards.shape[-1] < 2:
        raise ValueError(f"rewards must be [num_prompts, G] with "
                         f"G >= 2, got {tuple(rewards.shape)}")
    adv = rewards - rewards.mean(-1, keepdim=True)
    if scale_std:
        adv = adv / (rewards.std(-1, keepdim=True) + eps)
    return adv


def kl_k3(logps, ref_logps):
    """Per-token KL(πθ || πref) estimate k3 = exp(d) - d - 1, d = log πref - log πθ (Schulman
    2020)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, clip_eps=0.2, kl_coef=0.0,
              token_average="sequence", denom=None, is_weight=None):
    """L = -1/denom Σ[ w_t · min(ρ_t A, clip(ρ_t, 1-ε, 1+ε) A) ] + kl_coef · KL_k3(πθ || πref).

    logps, old_logps, ref_logps, mask: [B, T] per-token log-probs of the sampled responses
    (ref_logps may be None when kl_coef == 0); advantages: [B], one per response.
    token_average "sequence": each response's token mean, summed over responses / denom
    (default B); "token": every token summed / denom (default the mask's token count).
    is_weight: optional [B, T] truncated importance weights w_t (default 1).
    Returns (loss, stats): the mean KL over response tokens and the ratio's mean/min/max and
    clipped fraction (tokens where the clip stops the gradient), all detached.
    """
    _check(logps, old_logps, mask)
    if token_average not in TOKEN_AVERAGES:
        raise ValueError(f"token_average must be one of {TOKEN_AVERAGES}, got {token_average!r}")
    ratio = torch.exp(logps - old_logps)
    A = advantages.unsqueeze(-1)
    per_token = -torch.min(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)
    if is_weight is not None:
        per_token = per_token * is_weight
    kl = torch.zeros((), device=logps.device)
    if ref_logps is not None:
        kl_t = kl_k3(logps, ref_logps)
        kl = (kl_t * mask).sum() / mask.sum().clamp(min=1)
        per_token = per_token + kl_coef * kl_t
    if token_average == "sequence":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / (denom or len(mask))
    else:
        loss = (per_token * mask).sum() / (denom or mask.sum().clamp(min=1))
    on = mask.bool()
    r = ratio.detach()[on]
    clipped = ((A > 0) & (ratio > 1 + clip_eps)) | ((A < 0) & (ratio < 1 - clip_eps))
    stats = {"kl": kl.detach(), "ratio_mean": r.mean(), "ratio_min": r.min(), "ratio_max": r.max(),
             "clip_frac": clipped[on].float().mean()}
    return loss, stats


def combined_loss(pi_seq, ref_seq, rewards, logps, old_logps, ref_logps, mask, beta, alpha,
                  scale_std=True, dpo_weight=1.0, **grpo_kwargs):
    """§4.2: L_combined = L_GroupDPO(x, 𝒴c, 𝒴r) + α · L_GRPO(x, 𝒴c ∪ 𝒴r).

    pi_seq, ref_seq, rewards: [P, G] (sequence log-probs and rewards of P groups);
    logps, old_logps, ref_logps, mask: [P*G, T] token log-probs of the same responses.
    dpo_weight: this batch's share of the step's GroupDPO mean when a step is split into
    micro-batches (GRPO's share is its `denom`). Returns (loss, GRPO's stats).
    """
    dpo = group_dpo_loss(pi_seq, ref_seq, rewards, beta)[0] * dpo_weight
    grpo, stats = grpo_loss(logps, old_logps, ref_logps,
                            grpo_advantages(rewards, scale_std=scale_std).flatten(), mask,
                            **grpo_kwargs)
    return dpo + alpha * grpo, stats
