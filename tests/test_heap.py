"""heap.py: what a CPU process keeps between steps. Run: pytest tests/test_heap.py"""
import os
import platform
import subprocess
import sys

import pytest

from models import cpu_has_bf16

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# bf16 matmuls of as many shapes as a long run's training steps have token counts, the process's
# resident memory before and after, with heap imported first as train.py imports it
SHAPES = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch
import heap
from host import rss_bytes
torch.set_num_threads(1)
w = torch.randn(576, 576, dtype=torch.bfloat16)
before = rss_bytes()
for m in range(1, 400):
    x = torch.randn(m, 576, dtype=torch.bfloat16) @ w
print(rss_bytes() - before)
"""


def growth(tmp_path, env):
    probe = tmp_path / "shapes.py"
    probe.write_text(SHAPES)
    out = subprocess.run([sys.executable, str(probe), ROOT], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64"
                         and cpu_has_bf16()),
                    reason="measured where bf16 matmuls are oneDNN's on x86; /proc")
def test_a_new_shape_each_step_leaves_no_growing_cache(tmp_path):
    """oneDNN keeps a primitive per matmul shape; a training step's shapes follow its token count.
    heap bounds the cache on import (64): 400 shapes grow the process by less than with oneDNN's
    default of 1024 (here 211 MB against 376), and a user's own capacity is kept."""
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    bounded = growth(tmp_path, env)
    default = growth(tmp_path, dict(env, ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024"))
    assert bounded < 0.8 * default, (bounded >> 20, default >> 20)


def test_the_users_primitive_cache_capacity_is_kept():
    code = "import heap, os; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    run = lambda e: subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e,   # noqa: E731
                                   capture_output=True, text=True).stdout.strip()
    assert run(env) == "64" and run(dict(env, ONEDNN_PRIMITIVE_CACHE_CAPACITY="8")) == "8"


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
