"""Shared fixtures: a tiny random Llama with a tiny byte-level BPE tokenizer, built in seconds.

The suite runs on the CPU. SEMIONLINE_TEST_DEVICE=cuda (a GPU box) leaves CUDA visible, so the
in-process train.py runs take their default device, CUDA; the multi-process tests stay on CPU
processes with gloo either way (ranks cannot share one GPU under NCCL)."""
import json
import os
import shutil

if os.environ.get("SEMIONLINE_TEST_DEVICE", "cpu") != "cuda":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""   # before torch looks for a GPU

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import start
from rollout import HFEngine, free_port  # noqa: F401  (free_port: the tests' rendezvous port)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "What is 3 + 4? Put your "
        "final answer in \\boxed{7}.", "Ana has 5 apples and buys 2 more."
    ] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def make_model(tok, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """The default model's de-quantized copy and the decode plans (models.cache_root) go to a
    folder of this session, not the user's cache, removed at its end."""
    os.environ["SEMIONLINE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield os.environ["SEMIONLINE_CACHE"]
    shutil.rmtree(os.environ.pop("SEMIONLINE_CACHE"), ignore_errors=True)   # 0.5 GB with the model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tokenizer()
    make_model(tok).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture
def data_file(tmp_path):
    """The tests' training file: 8 rows "What is i + 1?"."""
    p = tmp_path / "train.jsonl"
    write_sums(p, 8, 1)
    return str(p)


@pytest.fixture
def mp_env(tmp_path, tiny_model_dir):
    """What a multi-process test launches with: the tiny model, 16 training rows, and the path its
    runner script (a module's RUNNER: train.main behind its patches) is written to."""
    data = tmp_path / "mp-train.jsonl"
    write_sums(data, 16, 3)
    return {"tmp": tmp_path, "model": tiny_model_dir, "data": str(data),
            "runner": str(tmp_path / "runner.py")}


def toy_score(rows, samples, chat_reward=None, length_penalty=0.0, cut="grade"):
    """Math rewards for the tiny random models (they cannot do arithmetic) that hold on any CPU and
    for any draw: among one prompt's responses (consecutive in `rows`) the shortest scores 1 (the
    first of ties), the others 0, so every group of two or more has a pair; a lone response scores
    1 when its length is even. Chat rows go to rewards.score. Patch it as train.score."""
    import rewards
    i = 0
    while i < len(rows):
        j = i
        while j < len(rows) and rows[j] is rows[i]:
            j += 1
        if rows[i]["task"] == "math":
            group = samples[i:j]
            best = min(range(len(group)), key=lambda k: len(group[k].text))
            for k, x in enumerate(group):
                x.reward = float(k == best) if len(group) > 1 else float(len(x.text) % 2 == 0)
        else:
            rewards.score(rows[i:j], samples[i:j], chat_reward, length_penalty, cut)
        i = j


def assert_close(a, b, key, rel=1e-5, abs=1e-8):
    """Logged values of two runs agree: None at the same places (a step with nothing of that kind,
    e.g. groups_used of a pairwise loss), the rest to the tolerance. pytest.approx itself refuses
    None with a relative tolerance (pytest >= 9)."""
    assert [x is None for x in a] == [x is None for x in b], f"{key}: {a} vs {b}"
    assert [x for x in a if x is not None] == pytest.approx([x for x in b if x is not None],
                                                            rel=rel, abs=abs), key


def fixed_generate(self, prompts, n=1, temperature=1.0, top_p=1.0, max_new_tokens=8, greedy=False,
                   desc=None, keys=None):
    """HFEngine.generate's stand-in where a test needs the same rollouts on any CPU and in any
    session
    (sampling a random model follows float rounding, which differs between CPU kinds): responses of
    2-7 tokens, some cut at max_new_tokens, a function of the prompt and the draw's key alone."""
    from rollout import Sample
    V, eos = self.model.config.vocab_size, self.tokenizer.eos_token_id
    out = []
    for i, p in enumerate(prompts):
        key = sum(p) if keys is None else keys[i] % 1000
        group = []
        for j in range(n):
            length = min(2 + (key + 3 * j) % 6, max_new_tokens)
            ids = [(key * (j + 3) + 7 * t) % (V - 3) + 3 for t in range(length)]
            stop = length < max_new_tokens
            ids = ids[:-1] + [eos] if stop else ids
            group.append(
                Sample(p, ids, [-1.0] * len(ids), [0.5] * len(ids),
                       self.tokenizer.decode(ids, skip_special_tokens=True),
                       "stop" if stop else "length"))
        out.append(group)
    return out


def write_sums(path, n, plus):
    """A training file of n math rows "What is i + plus?" with their answers (JSONL)."""
    path.write_text("".join(
        json.dumps({"problem": f"What is {i} + {plus}?", "answer": str(i + plus)}) + "\n"
        for i in range(n)))


def spy_generate(monkeypatch, holder):
    """Record, at each generate call, whether the engine's weights equal the policy's (the first
    model load_model built), and keep the last call's weights in holder["sampled_with"]."""
    calls, orig_gen, orig_load = [], HFEngine.generate, start.load_model

    def load(*a, **k):
        m, t = orig_load(*a, **k)
        holder.setdefault("policy", m)
        return m, t

    def gen(self, *a, **k):
        p = holder["policy"].state_dict()
        # the last call's
        holder["sampled_with"] = {k: v.clone() for k, v in self.model.state_dict().items()}
        calls.append(all(torch.equal(v, p[k]) for k, v in holder["sampled_with"].items()))
        return orig_gen(self, *a, **k)
    monkeypatch.setattr(start, "load_model", load)
    monkeypatch.setattr(HFEngine, "generate", gen)
    return calls
