"""heap.py: what a CPU process keeps between steps. Run: pytest tests/test_heap.py"""
import os
import platform
import subprocess
import sys

import pytest

from models import cpu_has_bf16

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A training step on a tiny model 576 wide (SmolLM2-135M's width, one layer), under bf16 autocast as
# train.py's, each step a new token count as each real step's: (resident - glibc's kept free
# bytes) after steps 10 and 100, with heap imported first as train.py imports it
STEPS = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch
import heap
from host import rss_bytes
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
torch.set_num_threads(1)
heap.set_malloc("cpu", 1)
model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=576, intermediate_size=1536,
                                     num_hidden_layers=1, num_attention_heads=9,
                                     num_key_value_heads=3))
held = {}
for t in range(1, 101):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randint(0, 512, (1, t))).logits.float().logsumexp(-1).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    held[t] = rss_bytes() - (heap.free_bytes() or 0)
print(held[100] - held[10])
"""
CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def growth(tmp_path, **env):
    """Bytes the tiny model's steps 11-100 add, the caches as heap sets them unless given."""
    probe = tmp_path / "steps.py"
    probe.write_text(STEPS)
    env = {k: v for k, v in os.environ.items() if k not in CACHES} | env
    out = subprocess.run([sys.executable, str(probe), ROOT], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64"
                         and cpu_has_bf16()),
                    reason="measured where bf16 matmuls are oneDNN's on x86; /proc, glibc")
def test_a_new_token_count_each_step_leaves_memory_flat(tmp_path):
    """oneDNN keeps a primitive per matmul shape, in two caches (its own and PyTorch's ideep's),
    and a step's shapes follow its token count: at their default of 1024 each, memory climbs step
    over step for the first ~100 steps of a run (here +267 MB with ideep's, +400 with oneDNN's,
    over steps 11-100). heap bounds both (32): +13 MB here. Each cache left at 1024 in turn shows
    that the measurement sees the climb."""
    assert growth(tmp_path) < 64 << 20
    for name in CACHES:
        assert growth(tmp_path, **{name: "1024"}) > 128 << 20, name


def test_the_users_primitive_cache_capacity_is_kept():
    code = f"import heap, os; print(*(os.environ[k] for k in {CACHES!r}))"
    env = {k: v for k, v in os.environ.items() if k not in CACHES}
    run = lambda e: subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e,   # noqa: E731
                                   capture_output=True, text=True).stdout.split()
    assert run(env) == ["32", "32"]
    assert run(env | {CACHES[0]: "8", CACHES[1]: "16"}) == ["8", "16"]


def test_ideeps_cache_at_zero_is_refused_by_name():
    """LRU_CACHE_CAPACITY=0 (a user turning ideep's cache off) kills torch 2.13 at its first CPU
    bf16 matmul with a segfault: heap, imported before any model, refuses it and says why."""
    env = {k: v for k, v in os.environ.items() if k not in CACHES} | {"LRU_CACHE_CAPACITY": "0"}
    out = subprocess.run([sys.executable, "-c", "import heap"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 1 and "LRU_CACHE_CAPACITY=0" in out.stderr, out.stderr[-500:]


def test_every_memory_growth_arm_is_python():
    """Each arm's code, as memory_growth.run_arm joins it before train.main, compiles."""
    import memory_growth
    for arm, code in memory_growth.ARMS.items():
        compile("; ".join(x for x in ("import sys", code, "import train") if x), arm, "exec")


@pytest.mark.slow
def test_memory_growth_study_runs_its_arms(tiny_model_dir, data_file, tmp_path):
    """experiments/memory_growth.py on the tiny model: two arms, their logs equal but for memory
    and time, the report and the figure written."""
    import memory_growth
    out = tmp_path / "study"
    memory_growth.main(["--out", str(out), "--steps", "2", "--arms", "default,release",
                        "--model", tiny_model_dir, "--train-data", data_file,
                        "--batch-prompts", "2", "--n", "2", "--max-new-tokens", "8",
                        "--rollout-dtype", "bfloat16"])
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "but for memory and time: True" in report and "| release |" in report
    assert (out / "fig_memory.png").exists()
