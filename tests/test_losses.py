"""The conformance test of every objective in losses.LOSSES: a new entry is checked here with no
test of its own. For each loss, with the run's own flags and the same rollouts on any machine:
the step does not depend on --micro-groups (its share of the step is applied), a "pairs" loss
receives (chosen, rejected) in that order and a "groups" loss does not depend on the order of a
group's responses (so a pairwise loss declared as "groups" fails), the logged step-1 loss is the
objective evaluated on independently computed log-probs, the gradients are finite, and one
gradient step where πθ = πref = πθ_old raises the log-probability of the higher-reward responses
relative to the lower ones (a flipped sign fails: "the loss goes down" cannot catch it).
tests/test_torchrun.py runs every entry on 2 processes against 1. Below the conformance tests:
the checks failing for the classic mistakes, then properties of single losses.
Run: pytest tests/test_losses.py"""
import math

import pytest
import torch

import losses
import train
from conftest import fixed_generate, toy_score
from dpo import ipo_loss, simpo_loss
from models import chat_prompt_ids, collate, load_model, response_logps
from rollout import HFEngine, Sample

LR = 1e-3


@pytest.fixture
def data(data_file, monkeypatch):
    """The training file, with toy rewards and the same rollouts on any machine."""
    monkeypatch.setattr(train, "score", toy_score)
    monkeypatch.setattr(HFEngine, "generate", fixed_generate)
    return data_file


def argv(model, data, out, loss, *extra):
    return [
        "--model", model, "--train-data", data, "--eval-problems", "0", "--batch-prompts", "4",
        "--group-size", "4", "--max-new-tokens", "6", "--lr",
        str(LR), "--rollout-dtype", "float32", "--train-dtype", "float32", "--sync-every", "1",
        "--steps", "2", "--loss", loss, "--out",
        str(out), *extra]


def run(*args):
    """(the run's result, its parsed flags)."""
    return train.main(argv(*args)), train.parse_args(argv(*args))


def spy(monkeypatch, loss):
    """Record every micro-batch the objective receives and what it returns."""
    calls, fn = [], train.LOSSES[loss]["fn"]

    def recorded(b, a):
        out = fn(b, a)
        calls.append(({k: v.detach().clone() if torch.is_tensor(v) else v
                       for k, v in b.items()}, out[0].item()))
        return out
    monkeypatch.setitem(train.LOSSES, loss, dict(train.LOSSES[loss], fn=recorded))
    return calls, fn


def check_micro_batch_invariance(model, data, tmp_path, loss):
    """One group per micro-batch trains the step that all four in one micro-batch do."""
    whole, _ = run(model, data, tmp_path / f"{loss}-whole", loss, "--micro-groups", "4")
    split, _ = run(model, data, tmp_path / f"{loss}-split", loss, "--micro-groups", "1")
    for key in ("loss", "grad_norm_pre_clip"):
        a, b = [r[key] for r in whole["records"]], [r[key] for r in split["records"]]
        assert None not in a and b == pytest.approx(a, rel=1e-4, abs=1e-6), \
            f"{loss}: {key} {b} with --micro-groups 1 vs {a} with 4: does the loss take its " \
            "share (b['share'], or b['responses'] / b['tokens'])?"
    # AdamW: float noise moves a weight by a fraction of lr
    for k, v in whole["policy"].state_dict().items():
        assert torch.allclose(v, split["policy"].state_dict()[k], atol=0.1 * LR), k


def check_units(model, data, tmp_path, monkeypatch, loss):
    """Pairs arrive chosen first; a group loss is the same whatever the order of a group's
    responses."""
    calls, fn = spy(monkeypatch, loss)
    res, a = run(model, data, tmp_path / f"{loss}-units", loss, "--micro-groups", "4")
    for b, _ in calls:
        P, K = b["rewards"].shape
        if train.LOSSES[loss]["takes"] == "pairs":
            assert K == 2 and (b["rewards"][:, 0] > b["rewards"][:, 1]
                               ).all(), f"{loss}: pairs must come (chosen, rejected)"
            continue
        assert K == 4
        perm = torch.tensor([3, 0, 2, 1])
        rows = (torch.arange(P)[:, None] * K + perm).flatten()
        shuffled = {
            k: v[rows] if torch.is_tensor(v) and v.dim() == 2 and v.shape[0] == P * K else v
            for k, v in b.items()}
        shuffled["rewards"] = b["rewards"][:, perm]
        assert fn(shuffled, a)[0].item() == pytest.approx(fn(b, a)[0].item(), rel=1e-5, abs=1e-7), \
            f"{loss}: the loss of a group depends on the order of its responses: a pairwise " \
            "loss declared as 'groups'?"
    assert all(math.isfinite(r["grad_norm_pre_clip"]) for r in res["records"])


def check_logged_loss_is_the_objective(model, data, tmp_path, monkeypatch, loss):
    """At step 1 (one micro-batch, nothing stale) the logged loss is the objective evaluated on
    log-probs computed here, from the seed model, for the same responses: the loop feeds it πθ, πref
    and πθ_old right."""
    calls, fn = spy(monkeypatch, loss)
    res, a = run(model, data, tmp_path / f"{loss}-hand", loss, "--micro-groups", "4", "--steps",
                 "1")
    (b, returned), = calls
    seed = load_model(model)[0].eval()
    with torch.no_grad():
        fresh = response_logps(seed, b, temperature=a.temperature)
    assert torch.allclose(b["pi"], fresh, atol=1e-5) and (b["ref"] is None or torch.allclose(
        b["ref"], fresh, atol=1e-5))
    assert (b["ref"] is not None) == losses.uses_reference(
        a), f"{loss}: πref given {b['ref'] is not None}, " f"declared otherwise"
    by_hand = fn(dict(b, pi=fresh, ref=None if b["ref"] is None else fresh, old=fresh), a)[0].item()
    extra = res["records"][0]["loss"]
    assert returned == pytest.approx(by_hand, rel=1e-4, abs=1e-6) and extra == pytest.approx(
        returned, rel=1e-6, abs=1e-7)


def direction_flags(loss):
    """The flag sets check_direction tries: the defaults; each hyperparameter the loss declares
    (its params) at 10x its default, where a term with a flipped sign that a larger term hid at
    the default shows; --kl-coef 0.1 where the loss has a KL term (0 is the default)."""
    params = train.LOSSES[loss].get("params", {})
    return [[]] + [[f"--{k.replace('_', '-')}", str(10 * d)] for k, (d, _) in params.items()] + (
        [["--kl-coef", "0.1"]] if losses.kl_term(loss) else [])


def check_direction(model_dir, loss):
    """Where πθ = πref = πθ_old, one small gradient step on the loss raises the mean log-probability
    of the higher-reward responses of a unit relative to the lower-reward ones (responses of equal
    length, so that no loss's length normalization decides the sign), with each of
    direction_flags."""
    for flags in direction_flags(loss):
        check_direction_with(model_dir, loss, flags)


def check_direction_with(model_dir, loss, flags):
    model, tok = load_model(model_dir)
    a = train.parse_args([
        "--model", model_dir, "--loss", loss, "--rollout-dtype", "float32", "--train-dtype",
        "float32", *flags])
    pairs = train.LOSSES[loss]["takes"] == "pairs"
    rewards = [1.0, 0.0] if pairs else [1.0, 0.0, 0.0, 1.0]
    prompt = chat_prompt_ids(tok, "What is 2 + 3?")
    units = [[Sample(prompt, [5 + 7 * j + t for t in range(4)], [0.0] * 4, [0.0] * 4, "", "stop", r)
              for j, r in enumerate(rewards)]]
    b = collate(units, "cpu")
    b.update(rewards=torch.tensor([rewards]), share=1.0, responses=len(rewards),
             tokens=4 * len(rewards), is_w=None)
    high = torch.tensor(rewards) > 0.5

    def margin():
        lp = losses.seq(dict(b, pi=response_logps(model, b, a.temperature)), "pi")[0]
        return lp[high].mean() - lp[~high].mean()
    with torch.no_grad():
        before = margin()
        b["old"] = b["ref"] = response_logps(model, b, a.temperature)
    b["ref"] = b["ref"] if losses.uses_reference(a) else None
    b["pi"] = response_logps(model, b, a.temperature)
    train.LOSSES[loss]["fn"](b, a)[0].backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 1e-3 * p.grad
        after = margin()
    assert after > before, f"{loss}: a gradient step lowered the higher-reward responses' " \
        f"log-probability against the lower ones ({before:.6f} -> {after:.6f}) with flags " \
        f"{flags or 'at their defaults'}: is the sign of the loss, or of one of its terms, flipped?"


@pytest.mark.parametrize("loss", list(train.LOSSES))
def test_loss_is_wired_right(tiny_model_dir, data, tmp_path, monkeypatch, loss):
    check_micro_batch_invariance(tiny_model_dir, data, tmp_path, loss)
    with monkeypatch.context() as m:
        check_units(tiny_model_dir, data, tmp_path, m, loss)
    check_logged_loss_is_the_objective(tiny_model_dir, data, tmp_path, monkeypatch, loss)
    check_direction(tiny_model_dir, loss)


# -----------------------------------------------------------------------------
# The checks catch the classic mistakes


def unscaled_ipo(b, a):
    """IPO that forgets its share of the step (the mistake README warns about)."""
    pi, ref = losses.seq(b, "pi"), losses.seq(b, "ref")
    return ipo_loss(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], a.beta), {}


def flipped_simpo(b, a):
    """SimPO with its sign flipped: it lowers its own value too, by pushing the wrong way."""
    loss, metrics = losses.simpo_objective(b, a)
    return -loss, metrics


def test_conformance_fails_for_a_loss_missing_its_scaling(tiny_model_dir, data, tmp_path,
                                                          monkeypatch):
    monkeypatch.setitem(train.LOSSES, "ipo_unscaled", {"fn": unscaled_ipo, "takes": "pairs"})
    with pytest.raises(AssertionError, match="share"):
        check_micro_batch_invariance(tiny_model_dir, data, tmp_path, "ipo_unscaled")


def test_conformance_fails_for_a_pairwise_loss_declared_as_groups(tiny_model_dir, data, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setitem(train.LOSSES, "ipo_on_groups",
                        {"fn": losses.ipo_objective, "takes": "groups"})
    with pytest.raises(AssertionError, match="order of its responses"):
        check_units(tiny_model_dir, data, tmp_path, monkeypatch, "ipo_on_groups")


def test_conformance_fails_for_a_flipped_sign(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(train.LOSSES, "simpo_flipped", dict(train.LOSSES["simpo"],
                                                            fn=flipped_simpo))
    with pytest.raises(AssertionError, match="simpo_flipped: a gradient step lowered"):
        check_direction(tiny_model_dir, "simpo_flipped")


def orpo_objective(b, a, sign=1.0):
    """ORPO (Hong et al. 2024; not in the paper), as a student would add it: the chosen response's
    mean-token NLL + λ · -log σ(log odds(yc) - log odds(yr)), odds(y) = p/(1 - p), p the mean-token
    probability. sign=-1: the odds-ratio term's sign flipped, a mistake the NLL hides at λ = 0.1."""
    n = b["mask"].sum(-1).view(b["rewards"].shape)
    avg = losses.seq(b, "pi") / n
    log_odds = avg - torch.log1p(-avg.exp())
    odds_term = -torch.nn.functional.logsigmoid(sign * (log_odds[:, 0] - log_odds[:, 1]))
    return (-avg[:, 0] + a.orpo_lambda * odds_term).mean() * b["share"], {}


ORPO = {"fn": orpo_objective, "takes": "pairs", "reference": "never",
        "params": {"orpo_lambda": (0.1, "ORPO's λ")}}


def test_conformance_finds_a_flipped_term_that_a_larger_one_hides(tiny_model_dir, monkeypatch):
    """ORPO with its odds-ratio term's sign flipped passes the direction check at λ = 0.1 (its NLL
    term still points the step the right way) and fails it at 10x λ, naming the flag."""
    monkeypatch.setitem(train.LOSSES, "orpo", ORPO)
    monkeypatch.setitem(train.LOSSES, "orpo_flipped",
                        dict(ORPO, fn=lambda b, a: orpo_objective(b, a, sign=-1.0)))
    check_direction(tiny_model_dir, "orpo")
    check_direction_with(tiny_model_dir, "orpo_flipped", [])
    with pytest.raises(AssertionError, match="--orpo-lambda"):
        check_direction(tiny_model_dir, "orpo_flipped")


def test_a_kl_weight_the_loss_cannot_use_is_refused(capsys):
    """--kl-coef > 0 for a loss without a KL term (reference "never", or DPO's) stops before
    anything loads, naming the flag and the losses that have one; 0 is taken."""
    for loss in ("simpo", "dpo"):
        with pytest.raises(SystemExit):
            train.parse_args(["--loss", loss, "--kl-coef", "0.1"])
        err = capsys.readouterr().err
        assert f"argument --kl-coef: 0.1: --loss {loss} has no KL term" in err
        assert "grpo" in err
        assert train.parse_args(["--loss", loss, "--kl-coef", "0"]).kl_coef == 0
    assert train.parse_args(["--loss", "combined", "--kl-coef", "0.1"]).kl_coef == 0.1


def test_tied_groups_train_while_a_kl_term_is_on(monkeypatch):
    """A group whose rewards all tie has no advantage but a KL gradient: a loss with a KL term
    (declared, with or without GRPO's ratio) keeps it while --kl-coef > 0, not at 0."""
    from argparse import Namespace
    monkeypatch.setitem(train.LOSSES, "kl_no_ratio", {"fn": losses.grpo_objective,
                                                      "takes": "groups", "reference": "kl"})
    tied = [({"id": 0, "task": "math"}, [Sample([1], [2], [0.0], [0.0], "", "stop", 1.0)] * 2)]
    for loss in ("grpo", "kl_no_ratio"):
        for kl, kept in ((0.0, 0), (0.1, 1)):
            units, _, _ = train.pairs_or_groups(tied, Namespace(seed=0, loss=loss, kl_coef=kl), 0,
                                                {"bad_rewards": 0})
            assert len(units) == kept, (loss, kl)


def test_conformance_fails_for_a_loss_that_misdeclares_its_reference(tiny_model_dir, data, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setitem(train.LOSSES, "dpo_no_ref", dict(train.LOSSES["dpo"], reference="never"))
    # DPO reads b["ref"], which a loss declared reference-free does not get
    with pytest.raises(TypeError):
        check_logged_loss_is_the_objective(tiny_model_dir, data, tmp_path, monkeypatch,
                                           "dpo_no_ref")


def test_a_malformed_entry_is_refused_before_anything_loads(monkeypatch, capsys):
    monkeypatch.setitem(train.LOSSES, "mine", {"fn": losses.ipo_objective, "takes": "pair"})
    with pytest.raises(SystemExit):
        train.parse_args([])
    assert "LOSSES['mine']" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# A loss's own flags and checks, before anything loads


def test_a_loss_takes_its_own_hyperparameters_and_checks_them_first(capsys):
    a = train.parse_args(["--loss", "simpo", "--simpo-beta", "2.5"])
    assert (a.simpo_beta, a.simpo_gamma) == (2.5, 0.5)
    with pytest.raises(SystemExit):
        train.parse_args(["--loss", "simpo", "--simpo-gamma", "x"])
    assert "argument --simpo-gamma: x: not a number" in capsys.readouterr().err
    with pytest.raises(SystemExit):   # Dr. GRPO's own check: it divides by a constant
        train.parse_args(["--loss", "dr_grpo", "--token-average", "token"])
    assert "argument --loss: dr_grpo: --token-average does not apply" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--simpo-beta SIMPO_BETA" in text[text.index("--loss simpo:"):]


def test_a_reference_free_loss_builds_no_reference(tiny_model_dir, data, tmp_path):
    res, a = run(tiny_model_dir, data, tmp_path / "simpo", "simpo")
    assert res["ref"] is None and not losses.uses_reference(a)
    assert train.parse_args([
        "--loss", "grpo"
    ]).kl_coef == 0 and not losses.uses_reference(train.parse_args(["--loss", "grpo"]))
    assert losses.uses_reference(train.parse_args(["--loss", "dr_grpo", "--kl-coef", "0.1"]))


# -----------------------------------------------------------------------------
# Properties of single losses: a loss's own tests go here, next to the conformance test


def group_batch(rewards):
    """A micro-batch of one group with random log-probs, πθ near πθ_old (ratios inside the clip)."""
    g = len(rewards)
    torch.manual_seed(0)
    old = -torch.rand(g, 5)
    return dict(pi=old + 0.05 * torch.randn(g, 5), old=old, ref=None, mask=torch.ones(g, 5),
                rewards=torch.tensor([rewards]), share=1.0, responses=g, tokens=5 * g, is_w=None)


def test_dr_grpo_loss_scales_with_the_rewards_and_grpo_does_not():
    """Dr. GRPO's advantage r - mean(r) has no std: rewards × 3 make its loss × 3; GRPO's is
    unchanged."""
    r = [1.0, 0.0, 0.0, 0.5]
    b, b3 = group_batch(r), group_batch([3 * x for x in r])
    dr, grpo = (train.parse_args(["--loss", name]) for name in ("dr_grpo", "grpo"))
    assert losses.dr_grpo_objective(b3, dr)[0].item() == pytest.approx(
        3 * losses.dr_grpo_objective(b, dr)[0].item(), rel=1e-4)
    assert losses.grpo_objective(b3, grpo)[0].item() == pytest.approx(
        losses.grpo_objective(b, grpo)[0].item(), rel=1e-3)


def test_simpo_is_dpo_free_of_the_reference_and_normalized_by_length():
    """SimPO by hand: -log σ(β(lc/|yc| - lr/|yr|) - γ); twice the length at twice the log-prob:
    the same."""
    pc, pr, n = torch.tensor([-4.0]), torch.tensor([-6.0]), torch.tensor([2.0])
    expect = -torch.nn.functional.logsigmoid(torch.tensor(2.0 * (-2 + 3) - 0.5))
    assert simpo_loss(pc, pr, n, n, 2.0, 0.5).item() == pytest.approx(expect.item())
    assert simpo_loss(2 * pc, pr, 2 * n, n, 2.0, 0.5).item() == pytest.approx(expect.item())
