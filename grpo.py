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
  - `scale_std=False` drops the std division (Dr. GRPO, Liu et al. 2025).
  - `token_average`: "sequence" (default) averages each response's tokens, then the
    responses, as in DeepSeekMath's GRPO that the paper cites; "token" averages over all
    tokens of the batch (DAPO), which weighs long responses more. We keep the paper's form.
  - KL uses the k3 estimator  exp(d) - d - 1,  d = log πref - log πθ  (unbiased, ≥ 0).
πθ_old is the stale rollout model: with semi-online sync (s > 1) the ratio ρ_t corrects for it
exactly, because the rollout engine returns the log-probs it sampled with.
"""
import torch

from dpo import _check, group_dpo_loss

TOKEN_AVERAGES = ("sequence", "token")


def grpo_advantages(rewards, eps=1e-4, scale_std=True):
    """A_i = (r_i - mean(r)) / (std(r) + eps), per group. rewards: [num_prompts, G].

    A group whose rewards are all equal gets A = 0 (never NaN): it carries no signal.
    """
    if rewards.dim() != 2 or rewards.shape[-1] < 2:
        raise ValueError(f"rewards must be [num_prompts, G] with G >= 2, got {tuple(rewards.shape)}")
    adv = rewards - rewards.mean(-1, keepdim=True)
    if scale_std:
        adv = adv / (rewards.std(-1, keepdim=True) + eps)
    return adv


def kl_k3(logps, ref_logps):
    """Per-token KL(πθ || πref) estimate k3 = exp(d) - d - 1, d = log πref - log πθ (Schulman 2020)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, clip_eps=0.2, kl_coef=0.0,
              token_average="sequence"):
    """L = -mean[ min(ρ_t A, clip(ρ_t, 1-ε, 1+ε) A) ] + kl_coef · KL_k3(πθ || πref).

    logps, old_logps, ref_logps, mask: [B, T] per-token log-probs of the sampled responses
    (ref_logps may be None when kl_coef == 0); advantages: [B], one per response.
    Returns (loss, mean KL over response tokens).
    """
    _check(logps, old_logps, mask)
    if token_average not in TOKEN_AVERAGES:
        raise ValueError(f"token_average must be one of {TOKEN_AVERAGES}, got {token_average!r}")
    ratio = torch.exp(logps - old_logps)
    A = advantages.unsqueeze(-1)
    per_token = -torch.min(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)
    kl = torch.zeros((), device=logps.device)
    if ref_logps is not None:
        kl_t = kl_k3(logps, ref_logps)
        kl = (kl_t * mask).sum() / mask.sum().clamp(min=1)
        per_token = per_token + kl_coef * kl_t
    if token_average == "sequence":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    else:
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    return loss, kl.detach()


def combined_loss(pi_seq, ref_seq, rewards, logps, old_logps, ref_logps, mask, beta, alpha,
                  **grpo_kwargs):
    """§4.2: L_combined = L_GroupDPO(x, 𝒴c, 𝒴r) + α · L_GRPO(x, 𝒴c ∪ 𝒴r).

    pi_seq, ref_seq, rewards: [P, G] (sequence log-probs and rewards of P groups);
    logps, old_logps, ref_logps, mask: [P*G, T] token log-probs of the same responses.
    """
    dpo, _ = group_dpo_loss(pi_seq, ref_seq, rewards, beta)
    grpo, _ = grpo_loss(logps, old_logps, ref_logps, grpo_advantages(rewards).flatten(), mask,
                        **grpo_kwargs)
    return dpo + alpha * grpo
