"""memory.py: a run's memory planned from a config alone (the model built on the meta device), the
README's 8B recipe checked against 80 GB GPUs, and the plan's terms checked against real tensors."""
import json
import math
import os
import re
import shlex

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import memory
import train

pytestmark = pytest.mark.slow   # the whole suite only: -m "not slow" leaves it out

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# meta-llama/Llama-3.1-8B-Instruct's config.json, written here: nothing is downloaded
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008,
                                             128009], "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": {
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3"
    }, "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256}


def readme_recipe():
    """(processes, train.py flags) of README's multi-GPU command."""
    text = open(os.path.join(REPO, "README.md")).read()
    cmd = re.search(r"torchrun --nproc_per_node (\d+) train.py (.*?)\n```", text, re.S)
    assert cmd, "README: no `torchrun --nproc_per_node N train.py ...` command"
    return int(cmd.group(1)), shlex.split(cmd.group(2).replace("\\\n", " "))


def with_model(flags, model):
    out = list(flags)
    out[out.index("--model") + 1] = model
    return out


@pytest.fixture
def llama8b(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)   # README's relative --train-data
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_31_8B))
    return str(tmp_path)


def test_readme_8b_recipe_fits_80gb_gpus(llama8b, capsys):
    nproc, flags = readme_recipe()
    assert "meta-llama/Llama-3.1-8B-Instruct" in flags
    plan, shape = memory.main(
        ["--nproc", str(nproc), "--gpu-gb", "80", *with_model(flags, llama8b)])
    assert shape["params"] == 8_030_261_248   # Llama-3.1-8B, counted on the meta device
    assert plan["resident", "πθ (fp32, 1/W)"] == 4 * shape["params"] / nproc
    assert plan["resident", "AdamW moments (1/W)"] == 8 * shape["params"] / nproc
    # CUDA with a hub model: the colocated vLLM engine
    assert any(what.startswith("vLLM") for _, what in plan)
    assert memory.peak(plan) <= 80e9
    assert "fits in 80 GB" in capsys.readouterr().out


def test_plan_says_when_a_recipe_does_not_fit(llama8b, capsys):
    """GRPO groups of 8, every group in one micro-batch, no checkpointing: hundreds of GB of
    activations."""
    nproc, flags = readme_recipe()
    flags = [f for f in with_model(flags, llama8b) if f != "--grad-checkpointing"]
    plan, _ = memory.main(
        ["--nproc",
         str(nproc), "--gpu-gb", "80", *flags, "--loss", "grpo", "--micro-groups", "8"])
    assert memory.peak(plan) > 80e9
    assert "does NOT fit in 80 GB" in capsys.readouterr().out
    fewer, _ = memory.main([
        "--nproc",
        str(nproc), "--gpu-gb", "80", *flags, "--loss", "grpo", "--micro-groups", "1",
        "--grad-checkpointing"])
    assert memory.peak(fewer) < memory.peak(plan) / 4


def test_resident_terms_are_the_tensors_bytes(tiny_model_dir):
    """πθ, its gradient and AdamW's moments on one process: the plan's bytes are the tensors'
    bytes."""
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    params = list(model.parameters())
    a = train.parse_args(["--model", tiny_model_dir, "--device", "cpu"])
    plan = memory.plan(memory.shape_of(model.config), a, 1, 16, runtime=0)
    assert plan["resident", "πθ (fp32, 1/W)"] == size(params)
    assert plan["resident", "its gradient (1/W)"] == size(p.grad for p in params)
    assert plan["resident", "AdamW moments (1/W)"] == size(v for p in params
                                                           for k, v in opt.state[p].items()
                                                           if k != "step")


@pytest.mark.parametrize("mode", ["float32", "bfloat16", "autocast"])
def test_activation_bytes_match_a_real_forward(mode):
    """What a decoder layer saves for backward per token (storage bytes, weights and autocast's
    weight copies excluded), measured on a real CPU forward, against activation_bytes: within 15
    %."""
    cfg = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16 if mode == "bfloat16" else torch.float32)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {s for p in model.parameters() for s in (tuple(p.shape), tuple(p.shape[::-1]))}
    saved = {}

    def pack(t):
        autocast_copy = (mode == "autocast" and t.dtype == torch.bfloat16
                         and tuple(t.shape) in shapes)
        if t.dtype.is_floating_point and t.untyped_storage().data_ptr() not in weights \
                and not autocast_copy:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    B, T = 2, 48
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        model.model(input_ids=torch.randint(0, 300, (B, T)))
    measured = sum(saved.values()) / (B * T * cfg.num_hidden_layers)
    planned = memory.activation_bytes(memory.shape_of(cfg), 4 if mode == "float32" else 2,
                                      autocast=mode == "autocast")
    assert abs(planned - measured) <= 0.15 * measured, (planned, measured)


def test_bad_input_is_named():
    with pytest.raises(SystemExit, match="--model"):
        memory.model_config(os.path.join(REPO, "data"))   # a folder with no config.json


def test_plan_reads_other_architectures(tmp_path):
    """GPT-2 (no num_key_value_heads, no intermediate_size, layers under transformer.h) and Qwen2
    plan too; an unknown config gives a line saying so, not an exception in train.py."""
    from transformers import GPT2Config, Qwen2Config
    gpt2 = memory.shape_of(GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=100))
    assert gpt2["layers"] == 3 and gpt2["kv"] == 64 and gpt2["inter"] == 256 and gpt2["params"] > 0
    qwen = memory.shape_of(
        Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    assert qwen["layers"] == 2 and qwen["kv"] == 32 and qwen["inter"] == 128
    a = train.parse_args(["--device", "cpu"])
    assert memory.for_run(object(), a, 1, 16, 0, 4).startswith("memory plan: not available")


def test_explicit_flags_are_kept_for_a_gpu_plan(llama8b):
    """--gpu-gb plans CUDA's defaults (bf16, vLLM) only for flags not given, in either spelling."""
    plan, _ = memory.main([
        "--nproc", "8", "--gpu-gb", "80", "--model", llama8b, "--engine=hf", "--train-dtype=float32"
    ])
    assert not any(what.startswith("vLLM")
                   for _, what in plan) and any(what.startswith("KV cache") for _, what in plan)
    fp32, _ = memory.main([
        "--nproc", "8", "--gpu-gb", "80", "--model", llama8b, "--engine", "hf", "--train-dtype",
        "float32"])
    assert plan == fp32


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_cache_term_is_the_bytes_decode_allocates(tiny_model_dir, monkeypatch, dtype):
    """The plan's KV cache for one sync's rows equals what decode.py's static cache holds (on a CPU
    its keys and values are fp32 whatever the rollout dtype)."""
    from models import load_model
    from fast_engine import fast_engine
    model, tok = load_model(tiny_model_dir)
    a = train.parse_args([
        "--model", tiny_model_dir, "--device", "cpu", "--rollout-dtype", dtype, "--n", "2",
        "--batch-prompts", "2", "--sync-every", "1", "--max-new-tokens", "5", "--gen-batch", "4"])
    prompt = [5, 6, 7]
    plan = memory.plan(memory.shape_of(model.config), a, 1, len(prompt), runtime=0)
    planned = [v for (phase, what), v in plan.items() if what.startswith("KV cache")]
    sizes = []
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda t, *s, **k: sizes.append(
        (s, k)) or torch.empty(*s, **k))
    engine = fast_engine(model, tok, dtype=getattr(torch, dtype))
    engine.generate([prompt, prompt], n=2, max_new_tokens=5)
    # K [L, B, KVH, P + T, D]; V is its like
    (shape, kw), = [(s, k) for s, k in sizes if len(s) == 5]
    assert planned == [2 * math.prod(shape) * kw["dtype"].itemsize]


def test_prepared_layouts_are_counted_per_copy(tiny_model_dir):
    """A decode plan with oneDNN's layout holds one more copy of the rollout weights, MKL's packing
    one per part of the plan that has it (decode.prepared); a plan of plain forms none. The count
    is read from the plan's text, whether or not this build has the forms (macOS, ARM lack MKL)."""
    from transformers import AutoConfig
    shape = memory.shape_of(AutoConfig.from_pretrained(tiny_model_dir))
    a = train.parse_args(["--model", tiny_model_dir, "--device", "cpu", "--rollout-dtype",
                          "float32"])

    def copy(plan):
        a.decode_matmul = plan
        return sum(v for (phase, what), v in memory.plan(shape, a, 1, 16, runtime=0).items()
                   if "layout" in what or "packed" in what)
    weights = 4 * shape["params"]
    assert copy("1:linear,4:weight-first") == 0
    assert copy("1:onednn,4:weight-first") == weights
    assert copy("1:mkl,2:linear,5:mkl") == 2 * weights
