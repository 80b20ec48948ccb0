"""
DPO objectives of the paper, as pure functions over log-probability tensors.

What the paper optimizes (arXiv 2506.21495, §2):
  DPO (Rafailov et al. 2023), one preference pair (yc, yr) per prompt x:
      L_DPO = -log σ( β[ (log πθ(yc|x) - log πref(yc|x)) - (log πθ(yr|x) - log πref(yr|x)) ] )
  Verifiable task: yc is a random correct response, yr a random incorrect one.
  Non-verifiable task: yc is the highest-scored response, yr the lowest.
  GroupDPO (eq. 4) averages L_DPO over every (correct, incorrect) pair of a prompt's group.
  Optional extras studied in §4.2: NLL on yc (no benefit in the paper) and entropy
  regularization (the mean negative next-token entropy added with a coefficient).

What this file implements: exactly those, one function each. Nothing here knows about
models, tokenizers or distributed training: inputs are tensors, outputs are tensors.
Deviation: `group_dpo_loss` also accepts real-valued rewards; then the pairs are every
(i, j) with r_i > r_j, which is eq. 4 when rewards are 0/1 (correct/incorrect).

Inputs: log πθ(y|x) and log πref(y|x) summed over a response's tokens, or per-token log-probs
with `mask` 1 on response tokens and 0 on padding, as models.response_logps computes them.
"""
import torch
import torch.nn.functional as F


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):
    """Eq. (2): L = -log σ(β[(log πθ(yc|x) - log πref(yc|x)) - (log πθ(yr|x) - log πref(yr|x))]).

    Inputs are summed sequence log-probs, shape [B] (one pair per entry); returns the mean.
    """
    _check(pi_chosen, pi_rejected, ref_chosen, ref_rejected)
    margin = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


def ipo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):
    """IPO (Azar et al. 2023, not in the paper; README's worked example of adding a loss):
    L = (h - 1/(2β))², h = (log πθ(yc|x) - log πref(yc|x)) - (log πθ(yr|x) - log πref(yr|x)).

    A squared loss that pulls the log-ratio margin h to 1/(2β) instead of pushing it to infinity.
    Inputs are summed sequence log-probs, shape [B] (one pair per entry); returns the mean.
    """
    _check(pi_chosen, pi_rejected, ref_chosen, ref_rejected)
    h = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    return ((h - 1 / (2 * beta)) ** 2).mean()


def simpo_loss(pi_chosen, pi_rejected, len_chosen, len_rejected, beta, gamma):
    """SimPO (Meng et al. 2024, arXiv 2405.14734; not in the paper): reference-free, each response's
    log-probability normalized by its length, with a target margin γ:
    L = -log σ(β/|yc| · log πθ(yc|x) - β/|yr| · log πθ(yr|x) - γ). Inputs [B]; returns the mean."""
    _check(pi_chosen, pi_rejected, len_chosen, len_rejected)
    return -F.logsigmoid(beta * pi_chosen / len_chosen - beta * pi_rejected / len_rejected -
                         gamma).mean()


def implicit_reward(pi_logps, ref_logps, beta):
    """DPO's implicit reward r̂(x, y) = β (log πθ(y|x) - log πref(y|x)); logged, not optimized."""
    return (beta * (pi_logps - ref_logps)).detach()


def group_dpo_loss(pi_logps, ref_logps, correct, beta):
    """Eq. (4): L_GroupDPO = 1/(|𝒴c|·|𝒴r|) Σ_{yc∈𝒴c} Σ_{yr∈𝒴r} L_DPO(x, yc, yr).

    pi_logps, ref_logps, correct: [..., G], one prompt's group of G responses per leading
    index. `correct` is bool (𝒴c = True, 𝒴r = False) or a real reward (pairs: r_i > r_j).
    Returns (loss, num_groups): the mean of eq. 4 over the groups that have at least one pair,
    and how many did. With no such group the loss is a zero with no gradient.
    """
    _check(pi_logps, ref_logps, correct)
    h = pi_logps - ref_logps                                  # log πθ/πref per response
    r = correct.float()
    pairs = (r.unsqueeze(-1) > r.unsqueeze(-2)).float()       # [..., G(chosen), G(rejected)]
    losses = -F.logsigmoid(beta * (h.unsqueeze(-1) - h.unsqueeze(-2)))
    n_pairs = pairs.sum((-1, -2))
    has_pairs = n_pairs > 0
    if not has_pairs.any():
        return torch.zeros((), device=h.device), 0
    per_group = (losses * pairs).sum((-1, -2)) / n_pairs.clamp(min=1)
    return per_group[has_pairs].mean(), int(has_pairs.sum())


def nll_loss(chosen_token_logps, mask):
    """Length-normalized NLL of the chosen response: -1/|yc| Σ_t log πθ(yc_t | x, yc_<t).

    chosen_token_logps, mask: [B, T]; returns the mean over the B chosen responses.
    """
    _check(chosen_token_logps, mask)
    return (-(chosen_token_logps * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def token_entropy(logits, mask, temperature=1.0, chunk_rows=8):
    """Mean next-token entropy H = -Σ_v π(v) log π(v) of π = softmax(logits / T), averaged over
    masked tokens.

    logits [B, T, V], mask [B, T]. Computed a few rows at a time to bound the temporaries.
    """
    total = logits.new_zeros((), dtype=torch.float32)
    for z, m in zip(logits.split(chunk_rows), mask.split(chunk_rows)):
        logp = torch.log_softmax(z.float() / temperature, dim=-1)
        total = total + (-(logp.exp() * logp).sum(-1) * m).sum()
    return total / mask.sum().clamp(min=1)


def entropy_regularizer(entropy, coef):
    """§4.2: the objective adds the mean negative next-token entropy times a coefficient,
    L_ent = coef · (-H). Minimizing it raises entropy when coef > 0."""
    return -coef * entropy


def select_pair(rewards, verifiable, rng):
    """Which two responses make the DPO pair (§2), as (chosen, rejected) indices or None.

    verifiable (0/1 rewards): a random correct vs a random incorrect response.
    scalar rewards: the highest- vs the lowest-scored response (first of ties).
    None when all rewards are equal: the prompt carries no preference and is skipped.
    """
    if max(rewards) == min(rewards):
        return None
    if verifiable:
        good = [i for i, r in enumerate(rewards) if r > 0.5]
        bad = [i for i, r in enumerate(rewards) if r <= 0.5]
        return rng.choice(good), rng.choice(bad)
    return max(range(len(rewards)), key=rewards.__getitem__), min(range(len(rewards)),
                                                                  key=rewards.__getitem__)


def _check(*tensors):
    """Every loss's inputs: log-prob tensors of one shape, not empty."""
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"log-prob tensors must have the same shape, got {sorted(shapes)}")
    if tensors[0].numel() == 0:
        raise ValueError("empty batch: no sequences to compute a loss on")
