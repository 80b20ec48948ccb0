"""End-to-end tests of train.py on a tiny random Llama.  Run: pytest tests/test_train.py

The tiny model cannot do arithmetic, so most tests swap in a toy reward (even response length
scores 1) to exercise pairs, groups and updates; the math reward has its own tests.
"""
import json
import math

import pytest
import torch

import rewards
import train
from rollout import HFEngine, chat_prompt_ids


def toy_reward(text, answer):
    return float(len(text) % 2 == 0)


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps({"problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(8)))
    return str(p)


def run(tiny_model_dir, data_file, tmp_path, *extra, name="run"):
    argv = ["--model", tiny_model_dir, "--train-data", data_file, "--eval-problems", "2", "--batch-prompts", "2",
            "--n", "4", "--max-new-tokens", "8", "--lr", "1e-3", "--out", str(tmp_path / name), *extra]
    return train.main(argv)


@pytest.mark.parametrize("loss", list(train.LOSSES))
@pytest.mark.parametrize("s", ["1", "3", "inf"])
def test_each_loss_and_regime_trains(tiny_model_dir, data_file, tmp_path, monkeypatch, loss, s):
    monkeypatch.setattr(rewards, "math_reward", toy_reward)
    before = {k: v.clone() for k, v in train.load_model(tiny_model_dir)[0].state_dict().items()}
    out = run(tiny_model_dir, data_file, tmp_path, "--loss", loss, "--sync-every", s, "--steps", "3",
              "--kl-coef", "0.1", "--nll-coef", "0.1", "--entropy-coef", "0.01")
    recs = out["records"]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(r["loss"] is None or torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    assert any(r["loss"] is not None for r in recs), "no step had a pair/group to train on"
    after = out["policy"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "weights did not change"
    assert [r["staleness"] for r in recs] == {"1": [0, 0, 0], "3": [0, 1, 2], "inf": [0, 1, 2]}[s]


def spy_generate(monkeypatch, holder):
    """Record, at each generate call, whether the engine's weights equal the policy's."""
    calls, orig_gen, orig_load = [], HFEngine.generate, train.load_model

    def load(*a, **k):
        m, t = orig_load(*a, **k)
        holder.setdefault("policy", m)
        return m, t

    def gen(self, *a, **k):
        p = holder["policy"].state_dict()
        calls.append(all(torch.equal(v, p[k]) for k, v in self.model.state_dict().items()))
        return orig_gen(self, *a, **k)
    monkeypatch.setattr(train, "load_model", load)
    monkeypatch.setattr(HFEngine, "generate", gen)
    return calls


@pytest.mark.parametrize("s,steps,n_calls", [("2", 5, 3), ("inf", 5, 1), ("epoch", 6, 2)])
def test_sync_schedule(tiny_model_dir, data_file, tmp_path, monkeypatch, s, steps, n_calls):
    monkeypatch.setattr(rewards, "math_reward", toy_reward)
    holder = {}
    calls = spy_generate(monkeypatch, holder)
    # 8 training rows, 2 per step: 4 steps per epoch, so s=epoch generates at steps 0 and 4
    out = run(tiny_model_dir, data_file, tmp_path, "--sync-every", s, "--steps", str(steps), "--eval-problems", "0")
    # every rollout batch is generated right after a sync: the engine's weights equal the policy's ...
    assert len(calls) == n_calls and all(calls)
    # ... and between syncs the engine is stale: the policy has moved on since the last sync
    p = out["policy"].state_dict()
    assert any(not torch.equal(v, p[k]) for k, v in out["engine"].model.state_dict().items())


def test_sampling_logps_match_policy_forward(tiny_model_dir):
    """Left padding + positions: πθ_old log-probs from sampling equal a training forward pass."""
    model, tok = train.load_model(tiny_model_dir)
    engine = HFEngine(model, tok)
    prompts = [chat_prompt_ids(tok, "hi"), chat_prompt_ids(tok, "What is 12 + 30? Explain it please.")]
    groups = engine.generate(prompts, n=3, max_new_tokens=10)
    samples = [x for g in groups for x in g]
    assert len(samples) == 6 and all(len(x.logps) == len(x.completion_ids) > 0 for x in samples)
    b = train.collate(groups, "cpu")
    with torch.no_grad():
        lp = train.response_logps(model, b)
    assert torch.allclose(lp, b["old"], atol=1e-4)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shared_prompt_forward_equals_one_row_per_response(tiny_model_dir, k):
    """The prompt computed once and its KV cache repeated for the k responses gives the same
    log-probs, logits and gradients as repeating the prompt in every row (prompts of different
    lengths, responses of different lengths, one of a single token)."""
    model, tok = train.load_model(tiny_model_dir)
    prompts = [chat_prompt_ids(tok, "hi"), chat_prompt_ids(tok, "What is 12 + 30? Explain it please.")]
    groups = HFEngine(model, tok).generate(prompts, n=k, max_new_tokens=12)
    groups[0][0].completion_ids, groups[0][0].logps = groups[0][0].completion_ids[:1], groups[0][0].logps[:1]
    b = train.collate(groups, "cpu")
    assert b["prompt"].shape[0] == 2 and b["ids"].shape[0] == 2 * k
    model.train()
    out = {}
    for share in (True, False):
        model.zero_grad()
        lp, logits = train.response_logps(model, b, with_logits=True, share_prompt=share)
        (lp.sum() + logits[b["mask"].bool()].logsumexp(-1).sum()).backward()
        out[share] = lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    assert torch.allclose(out[True][0], out[False][0], atol=1e-5)
    assert torch.allclose(out[True][0], b["old"], atol=1e-4)
    for n, g in out[True][1].items():
        assert torch.allclose(g, out[False][1][n], atol=1e-5, rtol=1e-4), n


def test_collate_rejects_mixed_units(tiny_model_dir):
    model, tok = train.load_model(tiny_model_dir)
    groups = HFEngine(model, tok).generate([chat_prompt_ids(tok, "hi"), chat_prompt_ids(tok, "yo")], n=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="same number of responses to one prompt"):
        train.collate([groups[0], [groups[0][0], groups[1][0]]], "cpu")


def test_all_tied_prompts_are_skipped_and_counted(tiny_model_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.setattr(rewards, "math_reward", lambda text, answer: 1.0)
    recs = run(tiny_model_dir, data_file, tmp_path, "--steps", "2")["records"]
    assert all(r["skipped"] == 2 and r["pairs_used"] == 0 and r["loss"] is None for r in recs)


def test_resume_matches_uninterrupted(tiny_model_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.setattr(rewards, "math_reward", toy_reward)
    common = ["--sync-every", "2", "--save-every", "2", "--eval-problems", "0"]
    straight = run(tiny_model_dir, data_file, tmp_path, *common, "--steps", "4", name="a")
    run(tiny_model_dir, data_file, tmp_path, *common, "--steps", "2", name="b")
    resumed = run(tiny_model_dir, data_file, tmp_path, *common, "--steps", "4", "--resume", name="b")
    assert [r["loss"] for r in straight["records"]] == pytest.approx(
        [json.loads(l)["loss"] for l in open(tmp_path / "b" / "log.jsonl")], rel=1e-5)
    for k, v in straight["policy"].state_dict().items():
        assert torch.allclose(v, resumed["policy"].state_dict()[k], atol=1e-6), k


def test_bad_flags_exit_with_message(tiny_model_dir, data_file, tmp_path):
    for flags, msg in [(["--sync-every", "0"], "sync-every"), (["--n", "1"], "--n 1"), (["--loss", "ppo"], "--loss")]:
        with pytest.raises(SystemExit):
            run(tiny_model_dir, data_file, tmp_path, *flags)
    with pytest.raises(SystemExit, match="no such directory"):
        train.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])


def test_resume_with_reference_sync(tiny_model_dir, data_file, tmp_path, monkeypatch):
    """The synced reference πref is part of the checkpoint: resuming restores it exactly."""
    monkeypatch.setattr(rewards, "math_reward", toy_reward)
    common = ["--sync-every", "1", "--ref-sync-every", "1", "--save-every", "2", "--eval-problems", "0"]
    straight = run(tiny_model_dir, data_file, tmp_path, *common, "--steps", "4", name="a")
    run(tiny_model_dir, data_file, tmp_path, *common, "--steps", "2", name="b")
    resumed = run(tiny_model_dir, data_file, tmp_path, *common, "--steps", "4", "--resume", name="b")
    for k, v in straight["ref"].state_dict().items():
        assert torch.allclose(v, resumed["ref"].state_dict()[k], atol=1e-6), k


def test_grad_checkpointing_trains_the_same(tiny_model_dir, data_file, tmp_path, monkeypatch):
    """--grad-checkpointing repeats the prompt per row (no shared KV cache): same losses, same weights."""
    monkeypatch.setattr(rewards, "math_reward", toy_reward)
    common = ["--loss", "grpo", "--sync-every", "1", "--steps", "2", "--eval-problems", "0", "--kl-coef", "0.1"]
    plain = run(tiny_model_dir, data_file, tmp_path, *common, name="plain")
    ckpt = run(tiny_model_dir, data_file, tmp_path, *common, "--grad-checkpointing", name="gc")
    for key in ("loss", "kl", "grad_norm"):
        assert [r[key] for r in plain["records"]] == pytest.approx([r[key] for r in ckpt["records"]], rel=1e-4, abs=1e-6), key
    assert all(r["grad_norm"] for r in plain["records"])
    for k, v in plain["policy"].state_dict().items():
        assert torch.allclose(v, ckpt["policy"].state_dict()[k], atol=1e-5), k


def test_engine_prefills_once_drops_finished_rows_and_matches_plain_generate(tiny_model_dir, monkeypatch):
    """Greedy rollouts of our decode loop equal Hugging Face generate on the repeated, left-padded
    prompts; the prefill sees each distinct prompt once; a finished sequence leaves the batch."""
    from rollout import left_pad
    model, tok = train.load_model(tiny_model_dir)
    engine = HFEngine(model, tok)
    torch.manual_seed(0)
    with torch.no_grad():   # larger random weights: greedy outputs vary (the tiny model's repeat one token)
        for p in engine.model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    prompts = [chat_prompt_ids(tok, "hi"), chat_prompt_ids(tok, "What is 12 + 30? Explain it please.")]
    first = [g[0].completion_ids for g in engine.generate(prompts, n=1, max_new_tokens=12, greedy=True)]
    # a stop token that ends the first prompt's responses early and never comes in the second's
    engine.stop_ids = {next(t for t in first[0][1:] if t not in first[1])}
    rows = []
    orig = type(engine.model).forward
    monkeypatch.setattr(type(engine.model), "forward", lambda self, *a, **k: rows.append(k["input_ids"].shape) or orig(self, *a, **k))
    groups = engine.generate(prompts, n=3, max_new_tokens=12, greedy=True)
    monkeypatch.undo()
    assert rows[0][0] == 2 and rows[1][0] == 6   # prefill: 2 distinct prompts; then 6 sequences
    assert rows[-1][0] == 3 and len(rows) == 12   # once the first prompt's 3 stopped: 3 rows
    assert all(len(x.completion_ids) < 12 and x.finish_reason == "stop" for x in groups[0])
    assert all(len(x.completion_ids) == 12 and x.finish_reason == "length" for x in groups[1])
    ids, attn = left_pad([p for p in prompts for _ in range(3)], engine.pad_id)
    plain = engine.model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=12, do_sample=False,
                                  pad_token_id=engine.pad_id, eos_token_id=sorted(engine.stop_ids))[:, ids.shape[1]:]
    for r, x in enumerate(x for g in groups for x in g):
        assert x.completion_ids == plain[r, :len(x.completion_ids)].tolist()


def test_inverse_cdf_sampler_draws_from_the_distribution():
    """The engine's sampler: frequencies match softmax(scores); a -inf (top-p removed) token never comes up."""
    from rollout import sample_token
    torch.manual_seed(0)
    scores = torch.tensor([[0.0, 1.0, -math.inf, 2.0, -1.0]]).repeat(20000, 1)
    freq = torch.bincount(sample_token(scores), minlength=5) / 20000
    p = torch.softmax(scores[0], -1)
    assert freq[2] == 0 and torch.allclose(freq, p, atol=0.015), (freq, p)
