"""The vLLM rollout engine: same interface as the HF engine, weights synced in place.
Runs wherever vllm and CUDA are present; skipped, with the reason, elsewhere (CPU CI)."""
import importlib.util

import pytest
import torch

import train

needs_vllm = pytest.mark.skipif(not (importlib.util.find_spec("vllm") and torch.cuda.is_available()),
                                reason="vllm is a GPU-only optional extra: needs `pip install vllm` and CUDA")


def test_engine_vllm_refused_without_vllm_or_cuda(monkeypatch):
    if importlib.util.find_spec("vllm") and torch.cuda.is_available():
        pytest.skip("vllm and CUDA are both present")
    with pytest.raises(SystemExit):
        train.parse_args(["--engine", "vllm", "--model", "some/model"])


def test_engine_vllm_refuses_gguf_default(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else None)
    with pytest.raises(SystemExit):
        train.parse_args(["--engine", "vllm", "--device", "cuda"])


@needs_vllm
def test_vllm_engine_generates_and_syncs(tiny_model_dir):
    from rollout import HFEngine, VLLMEngine, load_model
    model, tok = load_model(tiny_model_dir, "cuda")
    eng = VLLMEngine(tiny_model_dir, memory=0.2, seed=0)
    prompt = tok("What is 3 + 4?")["input_ids"]
    g = eng.generate([prompt, prompt[:3]], n=3, temperature=1.0, max_new_tokens=5)
    assert [len(x) for x in g] == [3, 3]
    assert all(0 < len(s.completion_ids) <= 5 and len(s.logps) == len(s.completion_ids) for x in g for s in x)
    # greedy output follows the pushed weights: scrambled weights change it, the original ones restore it
    before = eng.generate([prompt], greedy=True, max_new_tokens=5)[0][0].completion_ids
    torch.manual_seed(1)
    eng.update_weights({n: torch.randn_like(p) for n, p in model.named_parameters()})
    assert eng.generate([prompt], greedy=True, max_new_tokens=5)[0][0].completion_ids != before
    eng.update_weights(dict(model.named_parameters()))
    assert eng.generate([prompt], greedy=True, max_new_tokens=5)[0][0].completion_ids == before
    hf = HFEngine(model, tok).generate([prompt], greedy=True, max_new_tokens=5)[0][0].completion_ids
    assert hf[:2] == before[:2], "vLLM (bf16) and HF (fp32) greedy agree on the first tokens"
    # sampled log-probs are those of the raw logits: compare with a forward pass
    s = eng.generate([prompt], n=1, temperature=1.0, max_new_tokens=5)[0][0]
    ids = torch.tensor([prompt + s.completion_ids], device="cuda")
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1:-1].float(), -1)
    ref = lp.gather(-1, ids[0, len(prompt):, None]).squeeze(-1).cpu()
    assert torch.allclose(torch.tensor(s.logps), ref, atol=0.05)
