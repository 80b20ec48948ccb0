"""Tests of the DPO objectives in dpo.py, against hand arithmetic.  Run: pytest tests/test_dpo.py"""
import math
import random

import pytest
import torch

from dpo import (dpo_loss, entropy_regularizer, group_dpo_loss, implicit_reward, ipo_loss, nll_loss,
                 select_pair, token_entropy)
from models import sequence_logps, token_logps


@pytest.mark.parametrize("T,chunk,dtype", [(1.0, 4, torch.float32), (0.7, 3, torch.float32),
                                           (0.7, None, torch.float32), (0.8, 5, torch.bfloat16)])
def test_token_logps_and_its_gradient_match_log_softmax_gather(T, chunk, dtype):
    """The chunked log-probs with their own backward equal log_softmax(z / T)[y] and its autograd
    gradient."""
    torch.manual_seed(0)
    logits, labels, g = torch.randn(5, 7, 11).to(dtype), torch.randint(0, 11,
                                                                       (5, 7)), torch.randn(5, 7)
    z1, z2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ref = torch.log_softmax(z1.float() / T, -1).gather(-1, labels[..., None]).squeeze(-1)
    got = token_logps(z2, labels, T, chunk=chunk)
    assert got.dtype == torch.float32 and torch.allclose(got, ref, atol=1e-6)
    (ref * g).sum().backward()
    (got * g).sum().backward()
    assert z2.grad.dtype == dtype and torch.allclose(z2.grad.float(), z1.grad.float(),
                                                     atol=1e-6 if dtype == torch.float32 else 1e-2)


def test_sequence_logps_hand():
    # uniform logits over 4 tokens: every token has log-prob log(1/4); 2 masked tokens -> 2·log(1/4)
    logits = torch.zeros(1, 3, 4)
    out = sequence_logps(logits, torch.tensor([[1, 2, 3]]), torch.tensor([[1.0, 1.0, 0.0]]))
    assert out.item() == pytest.approx(2 * math.log(0.25))


def test_dpo_loss_hand():
    # margin = (-1 - -2) - (-3 - -2) = 1 - (-1) = 2; β = 0.5 -> -log σ(1) = log(1 + e^-1)
    loss = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                    torch.tensor([-2.0]), 0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    # mean over pairs: second pair has margin 0 -> log 2
    loss2 = dpo_loss(torch.tensor([-1.0, 0.0]), torch.tensor([-3.0, 0.0]), torch.tensor([-2.0,
                                                                                         0.0]),
                     torch.tensor([-2.0, 0.0]), 0.5)
    assert loss2.item() == pytest.approx((math.log(1 + math.exp(-1)) + math.log(2)) / 2)
    assert implicit_reward(torch.tensor([-1.0]), torch.tensor([-2.0]),
                           0.5).item() == pytest.approx(0.5)


def test_dpo_loss_falls_when_chosen_logp_rises():
    ref = torch.tensor([-5.0])
    losses = [
        dpo_loss(torch.tensor([c]), torch.tensor([-5.0]), ref, ref, 0.1).item()
        for c in (-6, -5, -4, -3)]
    assert losses == sorted(losses, reverse=True) and losses[0] > losses[-1]
    pi_c = torch.tensor([-5.0], requires_grad=True)
    dpo_loss(pi_c, torch.tensor([-5.0]), ref, ref, 0.1).backward()
    assert pi_c.grad.item() < 0   # gradient descent raises the chosen log-prob


def test_dpo_beta_to_zero_limit():
    # β -> 0: loss -> log 2 for any margin, and d loss / d margin -> -β/2
    args = [torch.tensor([-1.0]), torch.tensor([-9.0]), torch.tensor([-4.0]), torch.tensor([-2.0])]
    assert dpo_loss(*args, beta=1e-8).item() == pytest.approx(math.log(2))
    pi_c = args[0].clone().requires_grad_()
    dpo_loss(pi_c, *args[1:], beta=1e-4).backward()
    assert pi_c.grad.item() == pytest.approx(-0.5e-4, rel=1e-3)


def test_group_dpo_equals_double_loop():
    torch.manual_seed(1)
    pi, ref = torch.randn(6), torch.randn(6)
    correct = torch.tensor([True, False, True, False, False, True])
    loss, n = group_dpo_loss(pi, ref, correct, 0.3)
    C, R = [i for i in range(6) if correct[i]], [i for i in range(6) if not correct[i]]
    expect = sum(
        dpo_loss(pi[i:i + 1], pi[j:j + 1], ref[i:i + 1], ref[j:j + 1], 0.3) for i in C
        for j in R) / (len(C) * len(R))
    assert n == 1 and loss.item() == pytest.approx(expect.item(), rel=1e-6)


def test_group_dpo_one_pair_equals_dpo_and_batches_groups():
    pi, ref = torch.tensor([[-1.0, -3.0], [-2.0, -2.5]]), torch.tensor([[-2.0, -2.0], [-2.0, -2.0]])
    correct = torch.tensor([[True, False], [False, True]])
    loss, n = group_dpo_loss(pi, ref, correct, 0.5)
    d0 = dpo_loss(pi[0, :1], pi[0, 1:], ref[0, :1], ref[0, 1:], 0.5)
    d1 = dpo_loss(pi[1, 1:], pi[1, :1], ref[1, 1:], ref[1, :1], 0.5)
    assert n == 2 and loss.item() == pytest.approx(((d0 + d1) / 2).item())


def test_group_dpo_without_pairs_is_zero_and_counted():
    pi = torch.randn(2, 4, requires_grad=True)
    loss, n = group_dpo_loss(pi, torch.zeros(2, 4),
                             torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]).bool(), 0.1)
    assert n == 0 and loss.item() == 0.0 and not loss.requires_grad
    # a group without pairs next to one with pairs does not dilute the mean
    loss, n = group_dpo_loss(pi, torch.zeros(2, 4),
                             torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]).bool(), 0.1)
    l0, _ = group_dpo_loss(pi[:1], torch.zeros(1, 4), torch.tensor([[1, 0, 0, 0]]).bool(), 0.1)
    assert n == 1 and loss.item() == pytest.approx(l0.item())


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), 0.1)
    with pytest.raises(ValueError, match="empty"):
        dpo_loss(*(torch.zeros(0),) * 4, 0.1)
    with pytest.raises(ValueError, match="same shape"):
        group_dpo_loss(torch.zeros(4), torch.zeros(4), torch.zeros(3).bool(), 0.1)


def test_nll_and_entropy_hand():
    # token log-probs -1, -3 on a 2-token response and -2 on a 1-token one: NLL = mean(2, 2) = 2
    lp = torch.tensor([[-1.0, -3.0], [-2.0, 0.0]])
    assert nll_loss(lp, torch.tensor([[1.0, 1.0], [1.0, 0.0]])).item() == pytest.approx(2.0)
    # uniform over 4 -> H = log 4; a one-hot-ish row -> H ≈ 0; mean over the two masked tokens
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    H = token_entropy(logits, torch.ones(1, 2))
    assert H.item() == pytest.approx(math.log(4) / 2, abs=1e-5)
    assert entropy_regularizer(H, 0.1).item() == pytest.approx(-0.1 * math.log(4) / 2, abs=1e-6)


def test_select_pair():
    rng = random.Random(0)
    assert select_pair([1, 1, 1], True, rng) is None and select_pair([0.0, 0.0], True, rng) is None
    for _ in range(20):
        c, r = select_pair([0, 1, 0, 1], True, rng)
        assert c in (1, 3) and r in (0, 2)
    picks = {select_pair([0, 1, 0, 1], True, rng)[0] for _ in range(50)}
    assert picks == {1, 3}   # random among correct ones, not always the first
    assert select_pair([0.2, 0.9, -0.5, 0.9], False, rng) == (1, 2)   # best vs worst, first of ties


def test_token_logps_agrees_with_trl():
    """Independent cross-check against TRL's selective_log_softmax (test-only dependency)."""
    try:
        from trl.trainer.utils import selective_log_softmax
    except Exception as e:   # not installed, or its own dependencies missing
        pytest.skip(f"TRL not importable ({e.__class__.__name__}: "
                    f"{e}); pip install trl to run this cross-check")
    torch.manual_seed(3)
    logits, labels = torch.randn(4, 9, 50), torch.randint(0, 50, (4, 9))
    assert torch.allclose(token_logps(logits, labels), selective_log_softmax(logits, labels),
                          atol=1e-6)


def test_ipo_loss_known_values():
    """(h - 1/(2β))²: h = 0 gives 1/(4β²); the minimum, 0 with zero gradient, is at h = 1/(2β)."""
    z = torch.zeros(2)
    assert ipo_loss(z, z, z, z, beta=0.5).item() == pytest.approx(1.0)
    pc = torch.tensor([2.0], requires_grad=True)   # h = (2 - 0) - (1 - 0) = 1 = 1/(2·0.5)
    loss = ipo_loss(pc, torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=0.5)
    loss.backward()
    assert loss.item() == pytest.approx(0.0) and pc.grad.item() == pytest.approx(0.0)
