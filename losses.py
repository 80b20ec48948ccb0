"""
The objectives train.py can optimize: --loss picks one entry of LOSSES, which maps a micro-batch
to (loss, metrics) through the pure functions of dpo.py and grpo.py.

A micro-batch b holds, unit by unit: b["pi"], b["ref"], b["old"], b["mask"], [P*K, T] token
log-probs of πθ, πref (None when the loss needs none), πθ_old, and the response mask;
b["rewards"] [P, K]. A loss that takes "pairs" gets one (chosen, rejected) pair per prompt (K = 2,
chosen first); one that takes "groups" all K = G responses of each prompt. Every log-prob is of
π_T = softmax(logits / T), T = --temperature, the distribution the rollouts were drawn from
(grpo.py says why); a loss written for T = 1 log-probs (SimPO's paper) gets them at --temperature 1.

The loss is this micro-batch's part of the step's, so the step is the same at any --micro-groups
and on any number of processes: b["share"] is its share of the step's preference units (pairs, or
groups with a preference); b["responses"] and b["tokens"] count the whole step's scored responses
and their tokens (per-response or per-token means divide by them).

A new loss is one function and one entry; tests/test_losses.py then checks its wiring and that a
gradient step moves toward the higher-reward responses (README: "Add your own loss"). An entry:
    fn         the objective (b, a) -> (loss, {metric: value}); a: train.py's flags
    takes      "pairs" or "groups"
    reference  "always" (default), "never", or "kl": only with --kl-coef > 0; no πref is built
               or run where it is not needed
    kl         True if it has a --kl-coef term (implied by reference "kl"); a loss without one
               refuses --kl-coef > 0, and one with it trains on tied groups while the term is on
    ratio      True if it uses GRPO's ratio πθ/πθ_old (the loop supplies b["old"], b["is_w"]:
               train.old_policy)
    params     its own hyperparameters {name: (default, help)}: flags --name, shown in --help
               under the loss and checked with the others before anything loads
    check      a -> None or what is wrong with these flags for this loss (also before loading)
"""
from dpo import dpo_loss, group_dpo_loss, implicit_reward, ipo_loss, simpo_loss
from grpo import combined_loss, grpo_advantages, grpo_loss


def seq(b, key):
    """Sequence log-probs log π(y|x) = Σ_t log π(y_t|x, y_<t), shaped [P, K]."""
    return (b[key] * b["mask"]).sum(-1).view(b["rewards"].shape)


def pair_rewards(pi, ref, a):
    """The implicit rewards β·log π(y|x)/πref(y|x) of the chosen and rejected responses (logged;
    the plot shows their margin)."""
    return {f"{k}_reward": implicit_reward(pi[:, i], ref[:, i], a.beta).mean().item()
            for i, k in enumerate(("chosen", "rejected"))}


def grpo_denom(b, a):
    """GRPO's --token-average: the step's responses ("sequence") or tokens ("token")."""
    return b["responses"] if a.token_average == "sequence" else b["tokens"]


def dpo_objective(b, a):
    pi, ref = seq(b, "pi"), seq(b, "ref")
    return dpo_loss(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], a.beta) * b["share"], pair_rewards(
        pi, ref, a)


def ipo_objective(b, a):
    pi, ref = seq(b, "pi"), seq(b, "ref")
    return ipo_loss(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], a.beta) * b["share"], pair_rewards(
        pi, ref, a)


def simpo_objective(b, a):
    pi, n = seq(b, "pi"), b["mask"].sum(-1).view(b["rewards"].shape)
    return simpo_loss(pi[:, 0], pi[:, 1], n[:, 0], n[:, 1], a.simpo_beta,
                      a.simpo_gamma) * b["share"], {}


def group_dpo_objective(b, a):
    loss, _ = group_dpo_loss(seq(b, "pi"), seq(b, "ref"), b["rewards"], a.beta)
    return loss * b["share"], {}


def grpo_objective(b, a):
    adv = grpo_advantages(b["rewards"], scale_std=not a.no_std).flatten()
    return grpo_loss(b["pi"], b["old"], b["ref"], adv, b["mask"], a.clip_eps, a.kl_coef,
                     a.token_average, denom=grpo_denom(b, a), is_weight=b["is_w"])


def dr_grpo_objective(b, a):
    """Dr. GRPO (Liu et al. 2025, arXiv 2503.20783): A = r - mean(r), no std; every token's term
    summed and divided by a constant, the step's responses × --max-new-tokens, not by lengths."""
    adv = grpo_advantages(b["rewards"], scale_std=False).flatten()
    return grpo_loss(b["pi"], b["old"], b["ref"], adv, b["mask"], a.clip_eps, a.kl_coef, "token",
                     denom=b["responses"] * a.max_new_tokens, is_weight=b["is_w"])


def combined_objective(b, a):
    return combined_loss(seq(b, "pi"), seq(b, "ref"), b["rewards"], b["pi"], b["old"], b["ref"],
                         b["mask"], a.beta, a.alpha, scale_std=not a.no_std, dpo_weight=b["share"],
                         clip_eps=a.clip_eps, kl_coef=a.kl_coef, token_average=a.token_average,
                         denom=grpo_denom(b, a), is_weight=b["is_w"])


def constant_denominator(a):
    if a.token_average != "sequence":
        return "--token-average does not apply: it divides by a constant"
    return None


LOSSES = {
    "dpo": {"fn": dpo_objective, "takes": "pairs"},
    "ipo": {"fn": ipo_objective, "takes": "pairs"},
    "simpo": {"fn": simpo_objective, "takes": "pairs", "reference": "never",
              "params": {"simpo_beta": (2.0, "SimPO's β"), "simpo_gamma": (0.5, "SimPO's margin")}},
    "group_dpo": {"fn": group_dpo_objective, "takes": "groups"},
    "grpo": {"fn": grpo_objective, "takes": "groups", "ratio": True, "reference": "kl"},
    "dr_grpo": {"fn": dr_grpo_objective, "takes": "groups", "ratio": True, "reference": "kl",
                "check": constant_denominator},
    "combined": {"fn": combined_objective, "takes": "groups", "ratio": True, "kl": True},
}


def pairwise(a):
    """Whether --loss trains on one (chosen, rejected) pair per prompt (else on whole groups)."""
    return LOSSES[a.loss]["takes"] == "pairs"


def has_ratio(a):
    """Whether --loss has GRPO's importance ratio πθ/πθ_old."""
    return LOSSES[a.loss].get("ratio", False)


def kl_term(name):
    """Whether LOSSES[name] has a --kl-coef term (GRPO's k3 KL to πref)."""
    return LOSSES[name].get("reference") == "kl" or LOSSES[name].get("kl", False)


def uses_reference(a):
    """Whether the objective looks at πref (GRPO only with its KL term, as TRL at β = 0)."""
    need = LOSSES[a.loss].get("reference", "always")
    return need == "always" or (need == "kl" and a.kl_coef > 0)
