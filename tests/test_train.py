"""End-to-end tests of train.py on a tiny random Llama.  Run: pytest tests/test_train.py

The tiny model cannot do arithmetic, so most tests swap in a toy reward (even response length
scores 1) to exercise pairs, groups and updates; the math reward has its own tests.
"""
import argparse
import contextlib
import json
import math

import pytest
import torch

import rewards
import train
from data import step_rows
from conftest import spy_generate, toy_score
from logs import MEASURED
from models import chat_prompt_ids, cpu_has_bf16, load_model
from checkpoint import saved_args
from decode import plan_text
from fast_engine import fast_engine
from rollout import HFEngine

pytestmark = pytest.mark.slow   # the whole suite only: -m "not slow" leaves it out


def run(tiny_model_dir, data_file, tmp_path, *extra, name="run"):
    argv = [
        "--model", tiny_model_dir, "--train-data", data_file, "--eval-problems", "2",
        "--batch-prompts", "2", "--n", "4", "--max-new-tokens", "8", "--lr", "1e-3",
        "--rollout-dtype", "float32", "--train-dtype", "float32", "--out",
        str(tmp_path / name), *extra]
    return train.main(argv)


@pytest.mark.parametrize("loss", list(train.LOSSES))
@pytest.mark.parametrize("s", ["1", "3", "inf"])
def test_each_loss_and_regime_trains(tiny_model_dir, data_file, tmp_path, monkeypatch, loss, s):
    monkeypatch.setattr(train, "score", toy_score)
    before = {k: v.clone() for k, v in load_model(tiny_model_dir)[0].state_dict().items()}
    kl = ["--kl-coef", "0.1"] if train.kl_term(loss) else []
    out = run(tiny_model_dir, data_file, tmp_path, "--loss", loss, "--sync-every", s, "--steps",
              "3", *kl, "--nll-coef", "0.1", "--entropy-coef", "0.01")
    recs = out["records"]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(r["loss"] is None or torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    assert any(r["loss"] is not None for r in recs), "no step had a pair/group to train on"
    after = out["policy"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "weights did not change"
    assert [r["staleness"] for r in recs] == {"1": [0, 0, 0], "3": [0, 1, 2], "inf": [0, 1, 2]}[s]
    # 8-token cap
    assert all(0 <= r["truncated"] <= 1 for r in recs) and any(r["truncated"] > 0 for r in recs)


@pytest.mark.parametrize("s,steps,n_calls", [("2", 5, 3), ("inf", 5, 1), ("epoch", 6, 2)])
def test_sync_schedule(tiny_model_dir, data_file, tmp_path, monkeypatch, s, steps, n_calls):
    monkeypatch.setattr(train, "score", toy_score)
    holder = {}
    calls = spy_generate(monkeypatch, holder)
    # 8 training rows, 2 per step: 4 steps per epoch, so s=epoch generates at steps 0 and 4
    out = run(tiny_model_dir, data_file, tmp_path, "--sync-every", s, "--steps", str(steps),
              "--eval-problems", "0")
    # every rollout batch is generated right after a sync: the engine's weights equal the policy's
    # ...
    assert len(calls) == n_calls and all(calls)
    # ... and between syncs the engine is stale: the policy has moved on since the last sync
    p = out["policy"].state_dict()
    assert any(not torch.equal(v, p[k]) for k, v in holder["sampled_with"].items())
    # the engine slept between its rollouts and the next sync; the run returns it awake, holding πθ
    assert not out["engine"].asleep and all(
        torch.equal(v, p[k]) for k, v in out["engine"].model.state_dict().items())


def test_step_rows_one_order_per_seed_and_a_fresh_shuffle_each_epoch():
    """Every arm run with a seed trains on the same prompts in the same order (reproduce.py pairs
    arms on it)."""
    rows = [{"id": i} for i in range(10)]
    order = lambda steps, seed: [r["id"] for k in steps for r in step_rows(rows, k, 2, seed)]
    assert sorted(order(range(5), 3)) == list(range(10))   # an epoch is every row once
    assert order(range(5), 3) == order(range(5), 3) != order(range(5), 4)
    assert sorted(order(range(5, 10), 3)) == list(range(10)) and order(range(5, 10), 3) != order(
        range(5), 3)


def test_offline_generates_each_prompt_once_and_reuses_it(tiny_model_dir, data_file, tmp_path,
                                                          monkeypatch):
    """s = inf is offline DPO: the seed model answers each training prompt once (n responses), and
    every later pass over the data trains on those same responses and the same pair."""
    monkeypatch.setattr(train, "score", toy_score)
    prompts, orig = [], HFEngine.generate

    def gen(self, batch, *a, **k):
        prompts.append(len(batch))
        groups = orig(self, batch, *a, **k)
        # one response shorter than the rest, whatever the draw: lengths differ across steps
        x = groups[0][0]
        x.completion_ids, x.logps, x.entropy = x.completion_ids[:3], x.logps[:3], x.entropy[:3]
        return groups
    monkeypatch.setattr(HFEngine, "generate", gen)
    # 6 training rows (2 held out), 2 per step: 3 steps an epoch, 9 steps = 3 passes
    out = run(tiny_model_dir, data_file, tmp_path, "--sync-every", "inf", "--steps", "9",
              "--eval-problems", "2", "--no-eval-before", "--lr", "0")
    assert prompts[0] == 6, "offline generated more than one set of responses per prompt"
    # the same responses on each pass (in a new order): equal sums over each epoch's steps
    recs = out["records"]
    # 8 responses every step
    per_epoch = lambda f: [sum(f(r) for r in recs[i:i + 3]) for i in (0, 3, 6)]
    for key, f in (("reward", lambda r: r["reward"]), ("length", lambda r: r["length"]),
                   # entropy is per token: weigh by tokens
                   ("entropy", lambda r: r["entropy"] * r["length"])):
        sums = per_epoch(f)
        assert sums[0] == pytest.approx(sums[1], rel=1e-9) == pytest.approx(sums[2], rel=1e-9), key
    # the sums compare different steps, not one repeated number
    assert len({r["entropy"] for r in recs}) > 1


def test_heldout_sampled_accuracy(tiny_model_dir, data_file, tmp_path, monkeypatch):
    """--eval-samples k adds the sampled accuracy (k responses per problem at --temperature) beside
    greedy."""
    monkeypatch.setattr(train, "score", toy_score)
    run(tiny_model_dir, data_file, tmp_path, "--steps", "1", "--eval-samples", "3", name="k")
    res = json.load(open(tmp_path / "k" / "heldout_after.json"))
    assert res["math"]["n"] == res["math_sampled"]["n"] == 2
    # k·n = 6 draws of 0/1
    assert res["math_sampled"]["mean"] * 6 == pytest.approx(round(res["math_sampled"]["mean"] * 6))


@pytest.mark.parametrize("T", [1.0, 0.7])
def test_sampling_logps_match_policy_forward(tiny_model_dir, T):
    """Left padding + positions: πθ_old log-probs from sampling at temperature T equal a training
    forward pass of π_T = softmax(logits / T), and differ from the raw logits' when T != 1."""
    model, tok = load_model(tiny_model_dir)
    engine = HFEngine(model, tok)
    prompts = [
        chat_prompt_ids(tok, "hi"),
        chat_prompt_ids(tok, "What is 12 + 30? Explain it please.")]
    groups = engine.generate(prompts, n=3, temperature=T, max_new_tokens=10)
    samples = [x for g in groups for x in g]
    assert len(samples) == 6 and all(len(x.logps) == len(x.completion_ids) > 0 for x in samples)
    b = train.collate(groups, "cpu")
    with torch.no_grad():
        lp = train.response_logps(model, b, T)
        raw = train.response_logps(model, b)
    assert torch.allclose(lp, b["mu"], atol=1e-5)
    assert (T == 1.0) == torch.allclose(raw, b["mu"], atol=1e-3)


def test_stale_ratio_is_new_over_old_of_the_sampling_distribution(tiny_model_dir):
    """Rollouts sampled at T from weights W0, policy moved to W1: the trainer's ratio
    exp(log πθ - old) is π_T(W1) / π_T(W0) of each sampled token, computed here independently
    with plain full-sequence forwards."""
    model, tok = load_model(tiny_model_dir)
    T, prompt = 0.6, chat_prompt_ids(tok, "What is 2 + 2?")
    groups = HFEngine(model, tok).generate([prompt], n=4, temperature=T, max_new_tokens=6)
    moved = load_model(tiny_model_dir)[0]
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn_like(p))
        ratio = (train.response_logps(moved, train.collate(groups, "cpu"), T) -
                 train.collate(groups, "cpu")["mu"]).exp()

        def logp_T(m, x):
            ids = torch.tensor([prompt + x.completion_ids])
            z = m(ids).logits[0, len(prompt) - 1:-1] / T
            return torch.log_softmax(z, -1).gather(-1, ids[0, len(prompt):, None]).squeeze(-1)
    for i, x in enumerate(groups[0]):
        expect = (logp_T(moved, x) - logp_T(model, x)).exp()
        assert torch.allclose(ratio[i, :len(x.completion_ids)], expect, atol=1e-4)
    # the weights did move
    assert (ratio[train.collate(groups, "cpu")["mask"].bool()] - 1).abs().max() > 1e-3


def test_online_grpo_ratio_is_exactly_one_at_temperature(tiny_model_dir, data_file, tmp_path,
                                                         monkeypatch):
    """s = 1, T = 0.7, fp32 engine: nothing is stale, so the ratio is exactly 1 and nothing is
    clipped; the sampler's log-probs equal the trainer's to float rounding."""
    monkeypatch.setattr(train, "score", toy_score)
    out = run(tiny_model_dir, data_file, tmp_path, "--loss", "grpo", "--sync-every", "1", "--steps",
              "3", "--temperature", "0.7", "--eval-problems", "0")
    recs = out["records"]
    # online: the engine samples from the policy itself, and GRPO without KL holds no reference
    # model
    assert out["engine"].model is out["policy"] and out["ref"] is None
    trained = [r for r in recs if r["loss"] is not None]
    assert trained and all(r["ratio_min"] == r["ratio_max"] == 1.0 and r["clip_frac"] == 0
                           for r in trained)
    assert all(r["mismatch_max"] < 1e-5 for r in trained)
    assert all(r["k3_trained"] is None
               for r in recs), "GRPO without a KL term " "runs no reference forward"


@pytest.mark.parametrize("average", ["sequence", "token"])
def test_micro_batching_does_not_change_the_step(tiny_model_dir, data_file, tmp_path, monkeypatch,
                                                 average):
    """The step's loss is the batch-wide mean (per response, or per token with --token-average
    token), whatever the micro-batch split: one group per micro-batch trains as one micro-batch."""
    monkeypatch.setattr(train, "score", toy_score)
    common = [
        "--loss", "grpo", "--sync-every", "1", "--steps", "2", "--eval-problems", "0",
        "--token-average", average, "--batch-prompts", "4"]
    whole = run(tiny_model_dir, data_file, tmp_path, *common, "--micro-groups", "4", name="whole")
    split = run(tiny_model_dir, data_file, tmp_path, *common, "--micro-groups", "1", name="split")
    assert any(r["groups_used"] > 1 for r in whole["records"])
    for key in ("loss", "grad_norm_pre_clip"):
        assert [r[key]
                for r in whole["records"]] == pytest.approx([r[key] for r in split["records"]],
                                                            rel=1e-4, abs=1e-7)
    for k, v in whole["policy"].state_dict().items():
        # AdamW divides by sqrt(v): a near-zero gradient's float noise can move a weight by a
        # fraction of lr
        assert torch.allclose(v, split["policy"].state_dict()[k], atol=0.1 * 1e-3), k


@pytest.mark.parametrize("s", ["1", "2"])
def test_bf16_rollouts_with_truncated_importance_sampling(tiny_model_dir, data_file, tmp_path,
                                                          monkeypatch, s):
    """A bf16 sampler beside an fp32 trainer: the mismatch is logged after each sync, TIS is on by
    default (cap 2), steps on stale rollouts take the trainer's own πθ_old stamped at the sync."""
    monkeypatch.setattr(train, "score", toy_score)
    stamped = []
    orig = train.stamp_old_logps
    monkeypatch.setattr(train, "stamp_old_logps",
                        lambda *a, **k: stamped.append(len(a[1])) or orig(*a, **k))
    out = run(tiny_model_dir, data_file, tmp_path, "--loss", "grpo", "--sync-every", s, "--steps",
              "4", "--rollout-dtype", "bfloat16", "--eval-problems", "0")
    assert out["engine"].model.dtype == torch.bfloat16 and train.parse_args(
        ["--rollout-dtype", "bfloat16"]).tis_cap == 2.0
    recs = [r for r in out["records"] if r["loss"] is not None]
    assert recs and all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    fresh = [r for r in recs if r["staleness"] == 0]
    assert fresh and all(0 < r["mismatch_max"] < 1 for r in fresh)
    assert all(r["ratio_min"] == r["ratio_max"] == 1.0 for r in fresh)
    assert stamped == ([] if s == "1" else [2, 2])   # one stale step (2 prompts) per window of 2


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shared_prompt_forward_equals_one_row_per_response(tiny_model_dir, k):
    """The prompt computed once and its KV cache repeated for the k responses gives the same
    log-probs, logits and gradients as repeating the prompt in every row (prompts of different
    lengths, responses of different lengths, one of a single token)."""
    model, tok = load_model(tiny_model_dir)
    prompts = [
        chat_prompt_ids(tok, "hi"),
        chat_prompt_ids(tok, "What is 12 + 30? Explain it please.")]
    groups = HFEngine(model, tok).generate(prompts, n=k, max_new_tokens=12)
    groups[0][0].completion_ids, groups[0][0].logps = groups[0][0].completion_ids[:1], groups[0][
        0].logps[:1]
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
    assert torch.allclose(out[True][0], b["mu"], atol=1e-4)
    for n, g in out[True][1].items():
        assert torch.allclose(g, out[False][1][n], atol=1e-5, rtol=1e-4), n


def test_bf16_training_pass_close_to_fp32(tiny_model_dir, data_file, tmp_path, monkeypatch):
    """--train-dtype bfloat16 autocasts the policy pass: log-probs and gradients come out fp32 and
    close to the fp32 pass (bf16 rounding), float32 is the plain pass exactly; a run trains with
    it."""
    model, tok = load_model(tiny_model_dir)
    groups = HFEngine(model, tok).generate(
        [chat_prompt_ids(tok, "hi"),
         chat_prompt_ids(tok, "What is 12 + 30?")], n=3, max_new_tokens=12)
    b = train.collate(groups, "cpu")
    out = {}
    for dtype in ("float32", "bfloat16", None):
        model.zero_grad()
        with train.autocast(argparse.Namespace(
                device="cpu", train_dtype=dtype)) if dtype else contextlib.nullcontext():
            lp = train.response_logps(model, b)
        lp.sum().backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        out[dtype] = lp.detach(), grad
        assert lp.dtype == grad.dtype == torch.float32
    assert torch.equal(out["float32"][0], out[None][0]) and torch.equal(
        out["float32"][1], out[None][1])
    (lp16, g16), (lp32, g32) = out["bfloat16"], out["float32"]
    assert not torch.equal(lp16, lp32) and torch.allclose(lp16, lp32, atol=0.1)
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99
    monkeypatch.setattr(train, "score", toy_score)
    res = run(tiny_model_dir, data_file, tmp_path, "--loss", "dpo", "--steps", "2", "--train-dtype",
              "bfloat16")
    assert all(v.dtype == torch.float32 for v in res["policy"].state_dict().values())
    assert any(r["loss"] is not None and math.isfinite(r["loss"]) for r in res["records"])
    monkeypatch.delenv("SEMIONLINE_DTYPE", raising=False)
    assert train.parse_args([]).train_dtype == ("bfloat16" if cpu_has_bf16() else "float32")
    for forced in ("float32", "bfloat16"):   # the suite can run as a CPU of the other kind would
        monkeypatch.setenv("SEMIONLINE_DTYPE", forced)
        a = train.parse_args([])
        assert (a.train_dtype, a.rollout_dtype) == (forced, forced)
        # a flag wins
        assert train.parse_args(["--train-dtype", "float32"]).train_dtype == "float32"
    monkeypatch.setenv("SEMIONLINE_DTYPE", "fp16")
    with pytest.raises(SystemExit):
        train.parse_args([])


def test_collate_rejects_mixed_units(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    groups = HFEngine(model, tok).generate(
        [chat_prompt_ids(tok, "hi"), chat_prompt_ids(tok, "yo")], n=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="same number of responses to one prompt"):
        train.collate([groups[0], [groups[0][0], groups[1][0]]], "cpu")


def test_all_tied_prompts_are_skipped_and_counted(tiny_model_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.setattr(rewards, "math_reward", lambda text, answer: 1.0)
    # grade: a response cut at the cap scores 1 too (under "fail" it would score 0: no tie)
    recs = run(tiny_model_dir, data_file, tmp_path, "--steps", "2", "--cut-responses",
               "grade")["records"]
    assert all(r["skipped"] == 2 and r["pairs_used"] == 0 and r["loss"] is None for r in recs)


def test_resume_matches_uninterrupted(tiny_model_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "score", toy_score)
    common = ["--sync-every", "2", "--save-every", "2", "--eval-problems", "0"]
    straight = run(tiny_model_dir, data_file, tmp_path, *common, "--steps", "4", name="a")
    run(tiny_model_dir, data_file, tmp_path, *common, "--steps", "2", name="b")
    resumed = run(tiny_model_dir, data_file, tmp_path, *common, "--steps", "4", "--resume",
                  name="b")
    assert [r["loss"] for r in straight["records"]] == pytest.approx(
        [json.loads(l)["loss"] for l in open(tmp_path / "b" / "log.jsonl")], rel=1e-5)
    for k, v in straight["policy"].state_dict().items():
        assert torch.allclose(v, resumed["policy"].state_dict()[k], atol=1e-6), k


def test_a_resumed_run_decodes_by_its_saved_plan(tiny_model_dir, data_file, tmp_path, monkeypatch,
                                                 capsys):
    """The matmul plan a run decoded with (measured or given) is printed and saved with its
    checkpoints; --resume with auto takes it back rather than measuring anew (another plan rounds
    differently and samples other tokens)."""
    monkeypatch.setattr(train, "score", toy_score)
    common = ["--sync-every", "2", "--save-every", "2", "--eval-problems", "0"]
    plan = "1:linear,4:weight-first"
    run(tiny_model_dir, data_file, tmp_path, *common, "--steps", "2", "--decode-matmul", plan)
    assert f"decode matmuls (rows from:form; --decode-matmul): {plan}\n" in capsys.readouterr().out
    assert saved_args(str(tmp_path / "run" / "ckpt-000002"))["decode_matmul"] == plan
    resumed = run(tiny_model_dir, data_file, tmp_path, *common, "--steps", "4", "--resume")
    assert plan_text(resumed["engine"].fast.plan) == plan
    fresh = run(tiny_model_dir, data_file, tmp_path, *common, "--steps", "2", name="auto")
    assert "(measured on this machine, kept in " in capsys.readouterr().out
    assert saved_args(str(tmp_path / "auto" / "ckpt-000002"))["decode_matmul"] == \
        plan_text(fresh["engine"].fast.plan)


def test_bad_flags_exit_with_message(tiny_model_dir, data_file, tmp_path, capsys):
    """(Every flag's range: tests/test_flags.py.)"""
    for flags, msg in [(["--sync-every", "0"], "--sync-every"), (["--n", "1"], "--n"),
                       (["--loss", "ppo"], "--loss")]:
        with pytest.raises(SystemExit):
            run(tiny_model_dir, data_file, tmp_path, *flags)
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert "no such directory" in capsys.readouterr().err


def test_resume_with_reference_sync(tiny_model_dir, data_file, tmp_path, monkeypatch):
    """The synced reference πref is part of the checkpoint: resuming restores it exactly."""
    monkeypatch.setattr(train, "score", toy_score)
    common = [
        "--sync-every", "1", "--ref-sync-every", "1", "--save-every", "2", "--eval-problems", "0"]
    straight = run(tiny_model_dir, data_file, tmp_path, *common, "--steps", "4", name="a")
    run(tiny_model_dir, data_file, tmp_path, *common, "--steps", "2", name="b")
    resumed = run(tiny_model_dir, data_file, tmp_path, *common, "--steps", "4", "--resume",
                  name="b")
    for k, v in straight["ref"].state_dict().items():
        assert torch.allclose(v, resumed["ref"].state_dict()[k], atol=1e-6), k
    for k, v in straight["policy"].state_dict().items():   # synced after the last step: πref = πθ
        assert torch.equal(v, straight["ref"].state_dict()[k]), k


def test_grad_checkpointing_trains_the_same(tiny_model_dir, data_file, tmp_path, monkeypatch):
    """--grad-checkpointing repeats the prompt per row (no shared KV cache): same losses, same
    weights."""
    monkeypatch.setattr(train, "score", toy_score)
    common = [
        "--loss", "grpo", "--sync-every", "1", "--steps", "2", "--eval-problems", "0", "--kl-coef",
        "0.1"]
    plain = run(tiny_model_dir, data_file, tmp_path, *common, name="plain")
    ckpt = run(tiny_model_dir, data_file, tmp_path, *common, "--grad-checkpointing", name="gc")
    for key in ("loss", "k3_trained", "grad_norm_pre_clip"):
        assert [r[key]
                for r in plain["records"]] == pytest.approx([r[key] for r in ckpt["records"]],
                                                            rel=1e-4, abs=1e-6), key
    assert all(r["grad_norm_pre_clip"] for r in plain["records"])
    for k, v in plain["policy"].state_dict().items():
        # AdamW: float noise moves a weight by < 0.1 lr
        assert torch.allclose(v, ckpt["policy"].state_dict()[k], atol=0.1 * 1e-3), k


@pytest.mark.parametrize("fast", [False, True])
def test_engine_prefills_once_drops_finished_rows_and_matches_plain_generate(
        tiny_model_dir, monkeypatch, fast):
    """Greedy rollouts of our decode loop (decode.py's step, or the HF forward) equal Hugging Face
    generate on the repeated, left-padded prompts; the prefill sees each distinct prompt once; a
    finished sequence leaves the batch."""
    import decode
    from models import left_pad
    model, tok = load_model(tiny_model_dir)
    engine = (fast_engine if fast else HFEngine)(model, tok)
    torch.manual_seed(0)
    # larger random weights: greedy outputs vary (the tiny model's repeat one token)
    with torch.no_grad():
        for p in engine.model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    prompts = [
        chat_prompt_ids(tok, "hi"),
        chat_prompt_ids(tok, "What is 12 + 30? Explain it please.")]
    first = [
        g[0].completion_ids for g in engine.generate(prompts, n=1, max_new_tokens=12, greedy=True)]
    # a stop token that ends the first prompt's responses early and never comes in the second's
    engine.stop_ids = {next(t for t in first[0][1:] if t not in first[1])}
    rows = []
    orig, orig_step = type(engine.model).forward, decode.decode_step
    monkeypatch.setattr(
        type(engine.model), "forward",
        lambda self, *a, **k: rows.append(k["input_ids"].shape) or orig(self, *a, **k))
    monkeypatch.setattr(
        decode, "decode_step",
        lambda m, layers, head, mm, y, *a: rows.append(y[:, None].shape) or orig_step(
            m, layers, head, mm, y, *a))
    groups = engine.generate(prompts, n=3, max_new_tokens=12, greedy=True)
    monkeypatch.undo()
    assert rows[0][0] == 2 and rows[1][0] == 6   # prefill: 2 distinct prompts; then 6 sequences
    assert rows[-1][0] == 3 and len(rows) == 12   # once the first prompt's 3 stopped: 3 rows
    assert all(len(x.completion_ids) < 12 and x.finish_reason == "stop" for x in groups[0])
    assert all(len(x.completion_ids) == 12 and x.finish_reason == "length" for x in groups[1])
    ids, attn = left_pad([p for p in prompts for _ in range(3)], engine.pad_id)
    plain = engine.model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=12,
                                  do_sample=False, pad_token_id=engine.pad_id,
                                  eos_token_id=sorted(engine.stop_ids))[:, ids.shape[1]:]
    for r, x in enumerate(x for g in groups for x in g):
        assert x.completion_ids == plain[r, :len(x.completion_ids)].tolist()


def test_inverse_cdf_sampler_draws_from_the_distribution():
    """The engine's sampler: frequencies match softmax(scores); a -inf (top-p removed) token never
    comes up."""
    from rollout import sample_token
    torch.manual_seed(0)
    scores = torch.tensor([[0.0, 1.0, -math.inf, 2.0, -1.0]]).repeat(20000, 1)
    freq = torch.bincount(sample_token(scores), minlength=5) / 20000
    p = torch.softmax(scores[0], -1)
    assert freq[2] == 0 and torch.allclose(freq, p, atol=0.015), (freq, p)


def test_pairs_or_groups_by_hand():
    """DPO: one pair per prompt with a preference, chosen first; ties skipped; a NaN reward skips
    the prompt (counted) and leaves GRPO's denominators. GRPO keeps tied groups only with a KL
    term."""
    from argparse import Namespace
    from rollout import Sample

    def group(*rewards):
        return [
            Sample([1], [2] * (i + 1), [0.0] * (i + 1), [0.0] * (i + 1), "", "stop", reward=r)
            for i, r in enumerate(rewards)]

    batch = [({"id": "a", "task": "math"}, group(1.0, 0.0, 0.0)),
             ({"id": "b", "task": "math"}, group(1.0, 1.0, 1.0)),
             ({"id": "c", "task": "math"}, group(float("nan"), 0.0, 1.0))]
    stats = {"bad_rewards": 0}
    units, n_resp, n_tok = train.pairs_or_groups(batch, Namespace(seed=0, loss="dpo", kl_coef=0.0),
                                                 0, stats)
    assert len(units) == 1 and [x.reward for x in units[0]] == [1.0, 0.0]
    assert (n_resp, n_tok, stats["bad_rewards"]) == (6, 12, 1)
    units, _, _ = train.pairs_or_groups(batch, Namespace(seed=0, loss="grpo", kl_coef=0.0), 0,
                                        stats)
    assert [len(u) for u in units] == [3]
    units, _, _ = train.pairs_or_groups(batch, Namespace(seed=0, loss="grpo", kl_coef=0.1), 0,
                                        stats)
    assert [len(u) for u in units] == [3, 3]


def test_common_random_numbers_make_a_prompts_draw_independent_of_the_batch(tiny_model_dir):
    """A keyed draw: the responses to a prompt depend on its key (and the weights), not on what else
    is decoded beside it or in which order; an unkeyed draw uses the global generator."""
    model, tok = load_model(tiny_model_dir)
    eng = HFEngine(model, tok, max_batch=3)
    p, q = chat_prompt_ids(tok, "What is 1 + 2?"), chat_prompt_ids(
        tok, "Ana has 5 apples and buys two more.")
    alone = eng.generate([p], n=4, temperature=1.0, max_new_tokens=8, keys=[11])[0]
    crowd = eng.generate([q, p, q], n=4, temperature=1.0, max_new_tokens=8, keys=[12, 11, 13])[1]
    assert [x.completion_ids for x in alone] == [x.completion_ids for x in crowd]
    assert sum([x.logps for x in alone], []) == pytest.approx(sum([x.logps for x in crowd], []),
                                                              abs=1e-5)
    assert len({tuple(x.completion_ids) for x in alone}) > 1   # j = 0..3 draw differently
    other = eng.generate([p], n=4, temperature=1.0, max_new_tokens=8, keys=[99])[0]
    assert [x.completion_ids for x in other] != [x.completion_ids for x in alone]


def test_arms_with_equal_weights_sample_equal_rollouts(tiny_model_dir, data_file, tmp_path,
                                                       monkeypatch):
    """Arms that share a seed differ only through what they learned: at lr 0 (weights never move) s
    = 1 and s = 3 log the same rollouts at every step, and an arm run twice logs the same lines."""
    monkeypatch.setattr(train, "score", toy_score)
    common = ["--steps", "3", "--eval-problems", "0", "--lr", "0"]
    online = run(tiny_model_dir, data_file, tmp_path, *common, "--sync-every", "1",
                 name="s1")["records"]
    semi = run(tiny_model_dir, data_file, tmp_path, *common, "--sync-every", "3",
               name="s3")["records"]
    for key in ("reward", "length", "entropy", "pairs_used"):
        assert [r[key] for r in online] == pytest.approx([r[key] for r in semi], rel=1e-6), key
    again = run(tiny_model_dir, data_file, tmp_path, *common, "--sync-every", "3",
                name="s3b")["records"]
    # timing and the process's peak memory (it grows over the tests a process runs) aside
    strip = lambda recs: [  # noqa: E731
        {k: v for k, v in r.items() if k not in MEASURED} for r in recs]
    assert strip(again) == strip(semi)


@pytest.mark.parametrize("crn", [[], ["--no-crn"]])
def test_eval_every_scores_mid_run_without_changing_the_run(tiny_model_dir, data_file, tmp_path,
                                                            monkeypatch, crn):
    """--eval-every 1 writes heldout_step<k>.json at each step but the last (heldout_after covers
    it), on the held-out rows of the after file, and the run's log is the same line for line as
    without it
    (scoring in the middle of a semi-online window must not leak into its rollouts, nor, without
    common random numbers, draw from the training rollouts' random stream)."""
    monkeypatch.setattr(train, "score", toy_score)
    common = ["--steps", "3", "--sync-every", "2", "--eval-samples", "2", "--no-eval-before", *crn]
    plain = run(tiny_model_dir, data_file, tmp_path, *common, name="plain")["records"]
    every = run(tiny_model_dir, data_file, tmp_path, *common, "--eval-every", "1",
                name="every")["records"]
    strip = lambda recs: [{
        k: v
        for k, v in r.items() if k not in MEASURED
    } for r in recs]
    assert strip(every) == strip(plain)
    out = tmp_path / "every"
    assert sorted(p.name for p in out.glob("heldout_*.json")) == [
        "heldout_after.json", "heldout_step1.json", "heldout_step2.json"]
    after = json.load(open(out / "heldout_after.json"))
    for k in (1, 2):
        mid = json.load(open(out / f"heldout_step{k}.json"))
        assert mid["math"]["scores"].keys() == after["math"]["scores"].keys()
        assert mid["math_sampled"]["n"] == after["math_sampled"]["n"] == 2


def test_held_out_samples_are_common_random_numbers(tiny_model_dir, monkeypatch):
    """Sampled held-out scoring draws row i's samples from uniforms keyed by its id: the same
    responses whatever the other rows and their order; --no-crn passes no keys."""
    import eval as ev
    monkeypatch.setattr(
        ev, "score", lambda rows, samples, chat_reward:
        [setattr(x, "reward", float(len(x.completion_ids))) for x in samples])
    model, tok = load_model(tiny_model_dir)
    eng = HFEngine(model, tok, max_batch=8)
    rows = [{"id": f"r{i}", "task": "math", "problem": f"What is {i} + 2?", "answer": str(i + 2)}
            for i in range(3)]
    fwd = ev.heldout_eval(eng, tok, rows, None, 8, samples=3, temperature=1.0)
    rev = ev.heldout_eval(eng, tok, rows[::-1][:2], None, 8, samples=3, temperature=1.0)
    by_id = lambda res: {i: (rw, n) for rw, n, i in res["math_sampled"]}
    assert {i: v for i, v in by_id(fwd).items() if i != "r0"} == by_id(rev)
    seen, orig = [], HFEngine.generate
    monkeypatch.setattr(HFEngine, "generate",
                        lambda self, *a, **k: seen.append(k.get("keys")) or orig(self, *a, **k))
    ev.heldout_eval(eng, tok, rows, None, 8, samples=3, temperature=1.0, crn=False)
    assert seen[-1] is None


def test_no_crn_draws_training_rollouts_from_one_stream(tiny_model_dir, data_file, tmp_path,
                                                        monkeypatch):
    """--no-crn: the engine gets no keys (reproduce.py's pilot compares the two designs)."""
    monkeypatch.setattr(train, "score", toy_score)
    keys = []
    orig = HFEngine.generate
    monkeypatch.setattr(HFEngine, "generate",
                        lambda self, *a, **k: keys.append(k.get("keys")) or orig(self, *a, **k))
    run(tiny_model_dir, data_file, tmp_path, "--steps", "2", "--eval-problems", "0", "--no-crn",
        name="nocrn")
    assert keys and all(k is None for k in keys)
    keys.clear()
    run(tiny_model_dir, data_file, tmp_path, "--steps", "2", "--eval-problems", "0", name="crn")
    assert keys and all(k is not None for k in keys)


@pytest.mark.parametrize("cut", ["fail", "grade"])
def test_cut_responses_rule_reaches_the_rewards_and_the_log(tiny_model_dir, data_file, tmp_path,
                                                            monkeypatch, cut):
    """Every response graded right: under --cut-responses fail a step's reward is its uncut share,
    under grade 1; chosen_truncated is logged and the run's stats count the chosen responses."""
    import rewards
    monkeypatch.setattr(rewards, "math_reward", lambda text, answer: 1.0)
    out = run(tiny_model_dir, data_file, tmp_path, "--steps", "3", "--max-new-tokens", "3",
              "--cut-responses", cut)
    recs = out["records"]
    assert any(r["truncated"] > 0 for r in recs)
    for r in recs:
        assert r["reward"] == pytest.approx(1 - r["truncated"] if cut == "fail" else 1.0)
        assert "chosen_truncated" in r
        # a chosen response is one that scored above the rest
        assert r["chosen_truncated"] in (None, 0.0)


def test_engine_sleeps_through_training_after_a_mid_run_evaluation(tiny_model_dir, data_file,
                                                                   tmp_path, monkeypatch):
    """--eval-every not a multiple of s: the evaluation wakes the engine (it needs πθ's weights);
    the steps after it train with the engine asleep again, as the memory plan assumes."""
    monkeypatch.setattr(train, "score", toy_score)
    holder, asleep, orig_setup, orig_step = {}, [], train.setup, train.optimizer_step
    monkeypatch.setattr(train, "setup", lambda a: holder.setdefault("r", orig_setup(a)))
    monkeypatch.setattr(train, "optimizer_step", lambda *args: asleep.append(
        bool(holder["r"].engine.asleep)) or orig_step(*args))
    run(tiny_model_dir, data_file, tmp_path, "--steps", "4", "--sync-every", "4", "--eval-every",
        "1")
    assert asleep == [True] * 4


@pytest.mark.parametrize("s,syncs", [("1", [1, 2, 3, 4, 5, 6]), ("4", [1, 5]), ("epoch", [1, 5]),
                                     ("inf", [1])])
def test_curves_mark_the_syncs_where_they_were(tiny_model_dir, data_file, tmp_path, monkeypatch, s,
                                               syncs):
    """The curves' sync marks (logs.sync_steps): the steps right after πθ_old ← πθ, for s = 1, 4,
    epoch (8 rows, 2 a step: 4 steps) and ∞ (one generation, before step 1); πref syncs where
    --ref-sync-every says."""
    import logs
    monkeypatch.setattr(train, "score", toy_score)
    out = run(tiny_model_dir, data_file, tmp_path, "--sync-every", s, "--steps", "6",
              "--eval-problems", "0", "--ref-sync-every", "2", "--loss", "dpo")
    assert logs.sync_steps(out["records"]) == syncs
    assert [r["step"] for r in out["records"] if r.get("ref_synced")] == [2, 4, 6]

