"""Wrong results in edge cases found in review, each pinned by a test that failed before its fix.
Run: pytest tests/test_edge_cases.py"""
import argparse
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForSequenceClassification

import eval as ev
import logs
import rewards
import start
import train
from conftest import make_tokenizer, toy_score, write_sums

pytestmark = pytest.mark.slow   # the whole suite only: -m "not slow" leaves it out


def math_data(tmp_path, n=8):
    p = tmp_path / "d.jsonl"
    write_sums(p, n, 3)
    return str(p)


def base(model, data, out):
    return [
        "--model", model, "--train-data", data, "--eval-problems", "0", "--batch-prompts", "2",
        "--group-size", "4", "--max-new-tokens", "8", "--rollout-dtype", "float32", "--train-dtype",
        "float32", "--out",
        str(out)]


def test_judge_is_the_seed_model_after_a_resume(tiny_model_dir, tmp_path, monkeypatch):
    """The LLM judge is the seed model for the whole run: after --resume of a run that syncs πref it
    was built from the *synced* reference, so the reward function changed at the resume."""
    judges = []
    real = start.make_scalar_reward
    monkeypatch.setattr(
        start, "make_scalar_reward", lambda name=None, judge=None, device=None, **kw:
        (judges.append(judge), real(name, judge, device, **kw))[1])
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(
        json.dumps({"prompt": f"Say something about {i}."}) + "\n" for i in range(8)))
    argv = base(tiny_model_dir, str(data), tmp_path / "o") + [
        "--task", "chat", "--lr", "1e-2", "--ref-sync-every", "1", "--sync-every", "1"]
    train.main(argv + ["--steps", "2"])
    train.main(argv + ["--steps", "3", "--resume"])
    seed = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    for judge, _ in judges:
        assert all(torch.equal(v, seed[k]) for k, v in judge.state_dict().items())


def test_stale_grpo_with_top_p_compares_with_the_trainers_old_policy(tiny_model_dir, tmp_path,
                                                                     monkeypatch):
    """GRPO at s > 1 with --top-p < 1 and TIS off: with unchanged weights (lr 0) the ratio on a
    stale step must be 1 (πθ vs the trainer's πθ_old), not πθ / the sampler's nucleus-renormalized
    log-prob
    (the nucleus mass, < 1, which clipped the negative-advantage tokens)."""
    monkeypatch.setattr(train, "score", toy_score)
    out = train.main(
        base(tiny_model_dir, math_data(tmp_path), tmp_path / "o") + [
            "--loss", "grpo", "--sync-every", "2", "--steps", "2", "--top-p", "0.5", "--tis-cap",
            "0", "--lr", "0"])
    stale = [r for r in out["records"] if r["staleness"] == 1]
    assert stale and all(r["ratio_mean"] == pytest.approx(1.0, abs=1e-4) and r["clip_frac"] == 0
                         for r in stale)


def test_nll_term_never_trains_on_a_tied_group(tiny_model_dir, tmp_path, monkeypatch):
    """GRPO + KL + NLL: a group whose rewards all tie (all wrong) trains through its KL term, but
    it has no chosen response: the NLL term must not count its responses as chosen."""
    def tied(rows, samples, chat_reward=None, length_penalty=0.0, cut="grade"):
        for x in samples:
            x.reward = 0.0
    monkeypatch.setattr(train, "score", tied)
    flags = ["--loss", "grpo", "--kl-coef", "0.1", "--sync-every", "1", "--steps", "1", "--lr", "0"]
    plain = train.main(base(tiny_model_dir, math_data(tmp_path), tmp_path / "o") +
                       flags)["records"][0]
    with_nll = train.main(
        base(tiny_model_dir, math_data(tmp_path), tmp_path / "nll") + flags +
        ["--nll-coef", "1.0"])["records"][0]
    assert plain["groups_used"] == 2 and plain["loss"] == pytest.approx(with_nll["loss"], abs=1e-6)


@pytest.fixture
def rm_without_pad(tmp_path):
    """A tiny reward model whose tokenizer has no pad token and whose chat template ends the
    conversation with the end-of-turn token (= eos), as Llama-3 RMs do."""
    tok = make_tokenizer()
    tok.pad_token = None
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "<|im_end|>{% endfor %}")
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      num_labels=1, pad_token_id=None, eos_token_id=tok.eos_token_id)
    d = tmp_path / "rm"
    LlamaForSequenceClassification(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d), tok


def unpadded_score(d, tok, prompt, response, keep=None):
    """The RM's score read at the conversation's true last token, one sequence at a time (no
    padding)."""
    model = LlamaForSequenceClassification.from_pretrained(d).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    ids = ids[-keep:] if keep else ids
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


def test_reward_model_without_pad_token_scores_the_last_token(rm_without_pad):
    """pad = eos made the score come from *before* the final end-of-turn token (it looked like
    padding), and right-truncation cut the end-of-turn off long conversations."""
    d, tok = rm_without_pad
    rm = rewards.reward_model(d, device="cpu", max_length=4096)
    prompts, responses = ["hi", "what is 2+2"], ["hello there, friend", "4"]
    got = rm(prompts, responses)
    assert got == pytest.approx([unpadded_score(d, tok, p, r) for p, r in zip(prompts, responses)],
                                abs=1e-4)
    short = rewards.reward_model(d, device="cpu", max_length=12)(["tell me " * 20],
                                                                 ["a story " * 20])[0]
    assert short == pytest.approx(unpadded_score(d, tok, "tell me " * 20, "a story " * 20, keep=12),
                                  abs=1e-4)


def test_select_validation_rows_never_overlap_training(tmp_path):
    """eval.py --select with --select-problems > the run's --eval-problems took validation rows from
    the training rows (the built-in task's first 64 problems, not the run's 4 held-out ones)."""
    run = tmp_path / "run"
    (run / "ckpt-000001").mkdir(parents=True)
    (run / "latest").write_text("ckpt-000001")
    args = {
        "task": "math", "train_data": None, "difficulty": 1, "eval_problems": 4, "seed": 0,
        "eval_data": None}
    torch.save({"args": args}, run / "ckpt-000001" / "trainer_state.pt")
    rows = ev.validation_rows(argparse.Namespace(select=str(run), select_problems=64))
    from data import split_task
    training, heldout = split_task("math", None, 1, 4, 0)
    assert {r["problem"] for r in rows} <= {r["problem"] for r in heldout}
    assert not {r["problem"] for r in rows} & {r["problem"] for r in training}


def test_k3_metric_says_what_it_estimates(tiny_model_dir, tmp_path, monkeypatch):
    """The logged `kl` was the k3 estimator on the step's trained responses, which for DPO are stale
    chosen/rejected samples (107 at one step of the default run, 0.3-1.1 at the others): it is named
    for what it is, and its panel has a log axis so that one spike does not flatten the rest."""
    monkeypatch.setattr(train, "score", toy_score)
    recs = train.main(base(tiny_model_dir, math_data(tmp_path), tmp_path / "o") +
                      ["--steps", "1"])["records"]
    assert "kl" not in recs[0] and recs[0]["k3_trained"] is not None
    import matplotlib.axes
    scales = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_yscale", lambda self, s, **k: scales.append(s))
    logs.plot_runs([str(tmp_path / "o")], str(tmp_path / "p.png"))
    # loss, k3, grad norm
    assert scales == ["symlog", "symlog", "symlog"] and logs.SCALES["k3_trained"] == "symlog"
