"""Non-verifiable rewards and multi-task training.  Run: pytest tests/test_chat.py"""
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

import rewards
import train
from rewards import judge_score, llm_judge, make_scalar_reward
from models import load_model
from rollout import Sample

pytestmark = pytest.mark.slow   # the whole suite only: -m "not slow" leaves it out


def test_judge_score_from_fixed_logits():
    z = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0], [-1e4, -1e4, -1e4, -1e4, 0.0],
                      [0.0, math.log(3), -1e4, -1e4, -1e4]])
    # uniform -> 3; all mass on "5" -> 5; p(1)=1/4, p(2)=3/4 -> 1.75
    assert judge_score(z).tolist() == pytest.approx([3.0, 5.0, 1.75])


def test_llm_judge_runs_on_tiny_model(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    judge = llm_judge(model, tok, batch_size=2)
    s = judge(["say hi", "add 2 and 2", "x"], ["hi", "4", "a much longer answer " * 5])
    assert len(s) == 3 and all(1.0 <= v <= 5.0 for v in s)
    # batching and padding do not change a score
    assert judge(["add 2 and 2"], ["4"])[0] == pytest.approx(s[1], abs=1e-4)
    # the plain way: logits at every position, the last one read (the judge keeps only that one)
    from rewards import JUDGE_TEMPLATE
    from models import chat_prompt_ids
    ids = torch.tensor(
        [chat_prompt_ids(tok, JUDGE_TEMPLATE.format(prompt="say hi", response="hi"))])
    digits = [tok.convert_tokens_to_ids(str(k)) for k in range(1, 6)]
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
    assert judge_score(full[:, digits]).item() == pytest.approx(s[0], abs=1e-4)


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory, tiny_model_dir):
    from conftest import make_tokenizer
    tok = make_tokenizer()
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      num_labels=1, pad_token_id=tok.pad_token_id)
    d = tmp_path_factory.mktemp("tiny-rm")
    LlamaForSequenceClassification(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def test_reward_model_scorer_on_tiny_rm(tiny_rm_dir):
    rm = make_scalar_reward(tiny_rm_dir, device="cpu")
    s = rm(["hi", "what is 2+2", "tell me a story"],
           ["hello", "4", "once upon a time there was a cat"])
    assert len(s) == 3 and all(isinstance(v, float) and math.isfinite(v) for v in s)
    assert rm(["what is 2+2"], ["4"])[0] == pytest.approx(s[1], abs=1e-4)   # padding-invariant
    assert len(set(s)) == 3


def test_routing_on_mixed_batch():
    rows = [{"task": "math", "answer": "4"}, {"task": "chat", "prompt": "p1"},
            {"task": "math", "answer": "5"}, {"task": "chat", "prompt": "p2"}]
    samples = [
        Sample([], [1] * n, [], [], t, "stop")
        for n, t in [(2, "\\boxed{4}"), (3, "aaa"), (2, "\\boxed{4}"), (10, "b")]]
    seen = []

    def fake_rm(prompts, responses):
        seen.append((prompts, responses))
        return [10.0, float("nan")]
    rewards.score(rows, samples, fake_rm, length_penalty=0.5)
    assert seen == [(["p1", "p2"], ["aaa", "b"])]   # only chat rows reach the RM, in one batch
    assert samples[0].reward == 1.0 and samples[2].reward == 0.0   # math rows by Math-Verify
    assert samples[1].reward == 10.0 - 0.5 * 3 and math.isnan(samples[3].reward)


def test_mixed_task_training_run(tiny_model_dir, tiny_rm_dir, tmp_path):
    data = tmp_path / "mix.jsonl"
    rows = [{"problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(6)] + \
           [{"prompt": f"Write a line about the number {i}."} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = train.main([
        "--model", tiny_model_dir, "--task", "mix", "--train-data",
        str(data), "--reward-model", tiny_rm_dir, "--eval-problems", "4", "--batch-prompts", "4",
        "--n", "3", "--max-new-tokens", "6", "--steps", "3", "--out",
        str(tmp_path / "run")])
    recs = out["records"]
    assert len(recs) == 3 and any(r["loss"] is not None for r in recs)
    assert any("reward_chat" in r for r in recs)
    held = json.load(open(tmp_path / "run" / "heldout_after.json"))
    assert set(held) <= {"math", "chat"} and held


def test_chat_task_with_default_judge_builds(tiny_model_dir, tmp_path):
    out = train.main([
        "--model", tiny_model_dir, "--task", "chat", "--eval-problems", "2", "--batch-prompts", "2",
        "--n", "2", "--max-new-tokens", "4", "--steps", "1", "--out",
        str(tmp_path / "c")])
    assert out["records"][0]["pairs_used"] + out["records"][0]["skipped"] == 2


def test_eval_win_rate_against_reference_outputs(tiny_model_dir, tiny_rm_dir, tmp_path):
    import eval as ev
    d = tmp_path / "data"
    d.mkdir()
    (d / "alpaca_eval.jsonl").write_text("".join(
        json.dumps(
            {"id": f"a{i}", "prompt": f"Tell me about {i}.", "reference_output": "x" *
                                                                                 (5 + 7 * i)}) +
        "\n" for i in range(6)))
    res = ev.main([
        "--model", tiny_model_dir, "--bench", "alpaca_eval", "--data-dir",
        str(d), "--reward-model", tiny_rm_dir, "--max-new-tokens", "6", "--out",
        str(tmp_path / "out")])
    r = res[tiny_model_dir]["alpaca_eval"]
    assert 0 <= r["mean"] <= 1 and 0 <= r["lc"] <= 1 and r["se"] >= 0 and r[
        "baseline_chars"] == pytest.approx(22.5)
    per = [
        json.loads(line)
        for line in open(next((tmp_path / "out").glob("*.alpaca_eval.results.jsonl")))]
    assert len(per) == 6 and all(p["win"] in (0.0, 0.5, 1.0) for p in per)
