"""Tests of GRPO and the combined objective in grpo.py.  Run: pytest tests/test_grpo.py"""
import math

import pytest
import torch

from dpo import group_dpo_loss
from grpo import combined_loss, grpo_advantages, grpo_loss, kl_k3


def test_advantages_hand():
    # r = [1, 0, 0, 1]: mean 0.5, unbiased std = sqrt(4·0.25/3) = 0.57735
    A = grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), eps=0.0)
    assert torch.allclose(A, torch.tensor([[1, -1, -1, 1]]) * 0.5 / math.sqrt(1 / 3))
    A = grpo_advantages(torch.tensor([[3.0, 1.0]]), scale_std=False)   # Dr. GRPO: r - mean
    assert A.tolist() == [[1.0, -1.0]]


def test_all_equal_rewards_zero_advantage_and_gradient():
    A = grpo_advantages(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(A, torch.zeros(2, 3))
    logps = torch.randn(6, 5, requires_grad=True)
    loss, _ = grpo_loss(logps, logps.detach(), None, A.flatten(), torch.ones(6, 5))
    loss.backward()
    assert not torch.isnan(loss) and torch.count_nonzero(logps.grad) == 0
    with pytest.raises(ValueError, match="G >= 2"):
        grpo_advantages(torch.tensor([[1.0]]))


def test_clipping_stops_gradient_outside_trust_region():
    old = torch.zeros(1, 1)
    for adv, lp, has_grad in [(1.0, 0.5, False),   # ratio e^.5 > 1.2, A > 0: clipped, no gradient
                              # ratio < 0.8, A > 0: min picks unclipped, gradient
                              (1.0, -0.5, True),
                              (-1.0, -0.5, False),  # ratio < 0.8, A < 0: clipped, no gradient
                              (-1.0, 0.5, True)]:  # ratio > 1.2, A < 0: unclipped, gradient
        logps = torch.full((1, 1), lp, requires_grad=True)
        loss, _ = grpo_loss(logps, old, None, torch.tensor([adv]), torch.ones(1, 1), clip_eps=0.2)
        loss.backward()
        assert (logps.grad.abs().item() > 0) == has_grad, (adv, lp)


def test_on_policy_gradient_is_reinforce_with_baseline():
    torch.manual_seed(0)
    logps = torch.randn(4, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]]).float()
    A = torch.tensor([0.5, -1.0, 2.0, -0.3])
    loss, _ = grpo_loss(logps, logps.detach(), None, A, mask)   # ratio == 1
    loss.backward()
    # REINFORCE with baseline: -1/B Σ_i A_i/|y_i| Σ_t ∇ log π(y_i,t)
    #   -> d/d logp_it = -A_i / (B |y_i|)
    expect = -A[:, None] * mask / mask.sum(-1, keepdim=True) / 4
    assert torch.allclose(logps.grad, expect, atol=1e-7)


def test_token_average_options_and_kl():
    logps = torch.zeros(2, 2)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    A = torch.tensor([1.0, -1.0])
    # sequence: mean(-1, +1) = 0; token: (-1 -1 +1) / 3 = -1/3
    assert grpo_loss(logps, logps, None, A, mask)[0].item() == pytest.approx(0.0)
    assert grpo_loss(logps, logps, None, A, mask,
                     token_average="token")[0].item() == pytest.approx(-1 / 3)
    with pytest.raises(ValueError, match="token_average"):
        grpo_loss(logps, logps, None, A, mask, token_average="bogus")
    # k3 with d = log πref - log πθ = 1: e - 2
    ref = torch.ones(2, 2)
    assert kl_k3(logps, ref)[0, 0].item() == pytest.approx(math.e - 2)
    loss, st = grpo_loss(logps, logps, ref, torch.zeros(2), mask, kl_coef=0.5)
    assert st["kl"].item() == pytest.approx(math.e - 2) and loss.item() == pytest.approx(
        0.5 * (math.e - 2))


def test_combined_is_group_dpo_plus_alpha_grpo():
    torch.manual_seed(2)
    r = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    lp, old, ref = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    mask = torch.ones(4, 3)
    pi_seq, ref_seq = lp.sum(-1)[None], ref.sum(-1)[None]
    got, _ = combined_loss(pi_seq, ref_seq, r, lp, old, ref, mask, beta=0.1, alpha=0.7)
    g, _ = group_dpo_loss(pi_seq, ref_seq, r, 0.1)
    p, _ = grpo_loss(lp, old, ref, grpo_advantages(r).flatten(), mask)
    assert got.item() == pytest.approx((g + 0.7 * p).item(), rel=1e-6)


def test_tied_groups_count_in_the_mean_and_denominators():
    """A group whose rewards tie has A = 0 and adds nothing but counts in the mean (DeepSeekMath):
    GRPO over [tied, mixed] equals GRPO over [mixed] with the denominator of both."""
    torch.manual_seed(3)
    r = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    lp, old, mask = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([[1, 1, 1], [1, 0, 0],
                                                                        [1, 1, 0], [1, 1,
                                                                                    1]]).float()
    A = grpo_advantages(r).flatten()
    for avg, denom in (("sequence", 4), ("token", mask.sum())):
        both, _ = grpo_loss(lp, old, None, A, mask, token_average=avg)
        mixed, _ = grpo_loss(lp[2:], old[2:], None, A[2:], mask[2:], token_average=avg, denom=denom)
        assert both.item() == pytest.approx(mixed.item(), rel=1e-6), avg


def test_ratio_stats_and_importance_weights():
    old, mask = torch.zeros(1, 3), torch.ones(1, 3)
    lp = torch.tensor([[0.5, 0.0, -0.5]])   # ratios e^.5 (clipped for A > 0), 1, e^-.5
    loss, st = grpo_loss(lp, old, None, torch.tensor([1.0]), mask)
    assert st["ratio_max"].item() == pytest.approx(
        math.exp(0.5)) and st["ratio_min"].item() == pytest.approx(math.exp(-0.5))
    assert st["clip_frac"].item() == pytest.approx(1 / 3)
    w = torch.tensor([[2.0, 0.5, 1.0]])   # truncated importance weights scale each token's term
    weighted, _ = grpo_loss(lp, old, None, torch.tensor([1.0]), mask, is_weight=w)
    assert weighted.item() == pytest.approx(-(2 * 1.2 + 0.5 * 1 + math.exp(-0.5)) / 3)


def test_combined_respects_no_std():
    r = torch.tensor([[3.0, 1.0, 0.0]])
    lp, old, ref, mask = torch.randn(3, 2), torch.randn(3, 2), torch.randn(3, 2), torch.ones(3, 2)
    pi_seq, ref_seq = lp.sum(-1)[None], ref.sum(-1)[None]
    got, _ = combined_loss(pi_seq, ref_seq, r, lp, old, ref, mask, beta=0.1, alpha=1.0,
                           scale_std=False)
    p, _ = grpo_loss(lp, old, ref, grpo_advantages(r, scale_std=False).flatten(), mask)
    assert got.item() == pytest.approx((group_dpo_loss(pi_seq, ref_seq, r, 0.1)[0] + p).item(),
                                       rel=1e-6)
