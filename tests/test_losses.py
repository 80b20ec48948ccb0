"""The conformance test of every objective in train.LOSSES: a new entry is checked here with no
test of its own. For each loss: the step does not depend on --micro-groups (its share of the step is
applied), a "pairs" loss receives (chosen, rejected) in that order and a "groups" loss does not
depend on the order of a group's responses (so a pairwise loss declared as "groups" fails), the
logged step-1 loss is the objective evaluated on independently computed log-probs, and the
gradients are finite. tests/test_torchrun.py runs every entry on 2 processes against 1.
The last two tests show the checks failing for the two classic wiring mistakes.
Run: pytest tests/test_losses.py"""
import math

import pytest
import torch

import train
from conftest import toy_score, write_sums
from dpo import ipo_loss
from rollout import load_model, response_logps

LR = 1e-3


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "d.jsonl"
    write_sums(p, 8, 1)
    return str(p)


def run(model, data, out, loss, *extra):
    return train.main(["--model", model, "--train-data", data, "--eval-problems", "0", "--batch-prompts", "4", "--group-size", "4",
                       "--max-new-tokens", "8", "--lr", str(LR), "--rollout-dtype", "float32", "--train-dtype", "float32",
                       "--sync-every", "1", "--steps", "2", "--loss", loss, "--out", str(out), *extra])


def spy(monkeypatch, loss):
    """Record every micro-batch the objective receives and what it returns."""
    calls, fn = [], train.LOSSES[loss]["fn"]

    def recorded(b, a):
        out = fn(b, a)
        calls.append(({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in b.items()}, out[0].item()))
        return out
    monkeypatch.setitem(train.LOSSES, loss, dict(train.LOSSES[loss], fn=recorded))
    return calls, fn


def check_micro_batch_invariance(model, data, tmp_path, loss):
    """One group per micro-batch trains the step that all four in one micro-batch do."""
    whole = run(model, data, tmp_path / f"{loss}-whole", loss, "--micro-groups", "4")
    split = run(model, data, tmp_path / f"{loss}-split", loss, "--micro-groups", "1")
    for key in ("loss", "grad_norm_pre_clip"):
        a, b = [r[key] for r in whole["records"]], [r[key] for r in split["records"]]
        assert None not in a and b == pytest.approx(a, rel=1e-4, abs=1e-6), \
            f"{loss}: {key} {b} with --micro-groups 1 vs {a} with 4: does the loss take its share (b['share'] / b['denom'])?"
    for k, v in whole["policy"].state_dict().items():   # AdamW: float noise moves a weight by a fraction of lr
        assert torch.allclose(v, split["policy"].state_dict()[k], atol=0.1 * LR), k


def check_units(model, data, tmp_path, monkeypatch, loss):
    """Pairs arrive chosen first; a group loss is the same whatever the order of a group's responses."""
    calls, fn = spy(monkeypatch, loss)
    res = run(model, data, tmp_path / f"{loss}-units", loss, "--micro-groups", "4")
    a = train.parse_args(["--loss", loss])
    for b, _ in calls:
        P, K = b["rewards"].shape
        if train.LOSSES[loss]["takes"] == "pairs":
            assert K == 2 and (b["rewards"][:, 0] > b["rewards"][:, 1]).all(), f"{loss}: pairs must come (chosen, rejected)"
            continue
        assert K == 4
        perm = torch.tensor([3, 0, 2, 1])
        rows = (torch.arange(P)[:, None] * K + perm).flatten()
        shuffled = {k: v[rows] if torch.is_tensor(v) and v.dim() == 2 and v.shape[0] == P * K else v for k, v in b.items()}
        shuffled["rewards"] = b["rewards"][:, perm]
        assert fn(shuffled, a)[0].item() == pytest.approx(fn(b, a)[0].item(), rel=1e-5, abs=1e-7), \
            f"{loss}: the loss of a group depends on the order of its responses: a pairwise loss declared as 'groups'?"
    assert all(math.isfinite(r["grad_norm_pre_clip"]) for r in res["records"])


def check_logged_loss_is_the_objective(model, data, tmp_path, monkeypatch, loss):
    """At step 1 (one micro-batch, nothing stale) the logged loss is the objective evaluated on log-probs
    computed here, from the seed model, for the same responses: the loop feeds it πθ, πref and πθ_old right."""
    calls, fn = spy(monkeypatch, loss)
    res = run(model, data, tmp_path / f"{loss}-hand", loss, "--micro-groups", "4", "--steps", "1")
    (b, returned), = calls
    seed = load_model(model)[0].eval()
    with torch.no_grad():
        fresh = response_logps(seed, b, temperature=0.8)
    assert torch.allclose(b["pi"], fresh, atol=1e-5) and (b["ref"] is None or torch.allclose(b["ref"], fresh, atol=1e-5))
    a = train.parse_args(["--loss", loss])
    by_hand = fn(dict(b, pi=fresh, ref=None if b["ref"] is None else fresh, old=fresh), a)[0].item()
    extra = res["records"][0]["loss"]
    assert returned == pytest.approx(by_hand, rel=1e-4, abs=1e-6) and extra == pytest.approx(returned, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("loss", list(train.LOSSES))
def test_loss_is_wired_right(tiny_model_dir, data, tmp_path, monkeypatch, loss):
    monkeypatch.setattr(train, "score", toy_score)
    check_micro_batch_invariance(tiny_model_dir, data, tmp_path, loss)
    with monkeypatch.context() as m:
        check_units(tiny_model_dir, data, tmp_path, m, loss)
    check_logged_loss_is_the_objective(tiny_model_dir, data, tmp_path, monkeypatch, loss)


def unscaled_ipo(b, a):
    """IPO that forgets its share of the step (the mistake README warns about)."""
    pi, ref = train.seq(b, "pi"), train.seq(b, "ref")
    return ipo_loss(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], a.beta), {}


def test_conformance_fails_for_a_loss_missing_its_scaling(tiny_model_dir, data, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "score", toy_score)
    monkeypatch.setitem(train.LOSSES, "ipo_unscaled", {"fn": unscaled_ipo, "takes": "pairs"})
    with pytest.raises(AssertionError, match="share"):
        check_micro_batch_invariance(tiny_model_dir, data, tmp_path, "ipo_unscaled")


def test_conformance_fails_for_a_pairwise_loss_declared_as_groups(tiny_model_dir, data, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "score", toy_score)
    monkeypatch.setitem(train.LOSSES, "ipo_on_groups", {"fn": train.ipo_objective, "takes": "groups"})
    with pytest.raises(AssertionError, match="order of its responses"):
        check_units(tiny_model_dir, data, tmp_path, monkeypatch, "ipo_on_groups")


def test_a_malformed_entry_is_refused_before_anything_loads(monkeypatch, capsys):
    monkeypatch.setitem(train.LOSSES, "mine", {"fn": train.ipo_objective, "takes": "pair"})
    with pytest.raises(SystemExit):
        train.parse_args([])
    assert "LOSSES['mine']" in capsys.readouterr().err
