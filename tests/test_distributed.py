"""FSDP across processes on CPU (gloo): 2 ranks train like 1, syncs gather full weights, and
checkpoints move between world sizes.  Run: pytest tests/test_distributed.py

Sampling differs with the number of processes (each rank has its own RNG stream), so these
runs replace generation with a deterministic function of the prompt: what is compared is the
training math (sharding, gradient averaging, loss weighting), which must not depend on it.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_close, free_port
from heap import MAP_FROM

pytestmark = pytest.mark.slow   # the whole suite only: -m "not slow" leaves it out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = r'''
import json, os, sys, torch
import rewards, train
from rollout import HFEngine, Sample
rewards.math_reward = lambda text, answer: float(len(text) % 2 == 0)
import start
holder, orig_build = {}, start.build_models
def build(*a, **k):
    models = orig_build(*a, **k)
    holder["policy"] = models[0]   # the (sharded) policy
    return models
def fake_generate(self, prompts, n=1, temperature=1.0, top_p=1.0, max_new_tokens=8, greedy=False,
                  keys=None):
    # every sync hands the engine the full weights: check against the (sharded) policy
    full = dict(train.full_params(holder["policy"]))
    # bf16 rollouts: cast
    ok = all(torch.equal(p, full[k].to(p.dtype)) for k, p in self.model.named_parameters())
    with open(os.path.join(os.environ["SYNC_LOG"], f"rank{os.environ.get('RANK', '0')}"), "a") as f:
        f.write(f"{ok}\n")
    V, eos = self.model.config.vocab_size, self.tokenizer.eos_token_id
    out = []
    for p in prompts:
        g = []
        for j in range(n):
            L = 2 + (j + sum(p)) % 5
            ids = [(sum(p) * (j + 3) + 7 * t) % (V - 3) + 3 for t in range(L)] + [eos]
            g.append(Sample(p, ids, [-1.0] * len(ids), [0.5] * len(ids), "x" * (L + j), "stop"))
        out.append(g)
    return out
start.build_models, HFEngine.generate = build, fake_generate
train.main(sys.argv[1:])
'''


@pytest.fixture
def setup(mp_env):
    open(mp_env["runner"], "w").write(RUNNER)
    return mp_env["tmp"], mp_env["model"], mp_env["data"], mp_env["runner"]


def launch(setup, name, procs, steps, loss="dpo", extra=()):
    tmp, model, data, runner = setup
    out = tmp / name
    argv = [
        "--model", model, "--train-data", data, "--eval-problems", "0", "--batch-prompts", "4",
        "--group-size", "4", "--micro-groups", "1", "--lr", "1e-3", "--sync-every", "2",
        "--save-every", "2", "--steps",
        str(steps), "--loss", loss, "--train-dtype", "float32", "--out",
        str(out), *extra]
    os.makedirs(tmp / f"sync-{name}", exist_ok=True)
    env = dict(os.environ, SYNC_LOG=str(tmp / f"sync-{name}"), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    cmd = [sys.executable, runner, *argv] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
         "--master_port", str(free_port()), runner, *argv]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ckpt = out / open(out / "latest").read().strip()
    weights = AutoModelForCausalLM.from_pretrained(ckpt).state_dict()
    logs = [json.loads(line) for line in open(out / "log.jsonl")]
    syncs = {
        f: open(tmp / f"sync-{name}" / f).read().split()
        for f in os.listdir(tmp / f"sync-{name}")}
    return weights, logs, syncs


def assert_runs_close(a, b):
    (wa, la, _), (wb, lb, _) = a, b
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for key in ("loss", "reward", "length", "pairs_used", "groups_used", "k3_trained"):
        assert_close([r.get(key) for r in la], [r.get(key) for r in lb], key, rel=1e-4, abs=1e-6)
    for k in wa:
        # AdamW (lr 1e-3): float noise moves a weight by < 0.1 lr
        assert torch.allclose(wa[k], wb[k], atol=1e-4), k


@pytest.mark.parametrize("loss", ["dpo", "grpo"])
def test_two_processes_match_one(setup, loss):
    one = launch(setup, f"one-{loss}", 1, 4, loss)
    two = launch(setup, f"two-{loss}", 2, 4, loss)
    assert_runs_close(one, two)
    # rollouts were generated at steps 0 and 2 on each rank, both times right after a sync
    assert two[2] == {"rank0": ["True", "True"], "rank1": ["True", "True"]}


def test_checkpoint_moves_between_world_sizes(setup):
    straight = launch(setup, "straight", 1, 4)
    launch(setup, "a", 2, 2)
    tmp = setup[0]
    # the optimizer state was written sharded: one torch.distributed.checkpoint file per rank
    shards = sorted(os.listdir(tmp / "a" / "ckpt-000002" / "optimizer"))
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"], shards
    os.rename(tmp / "a", tmp / "b")
    two_then_one = launch(setup, "b", 1, 4, extra=["--resume"])
    assert_runs_close(straight, two_then_one)
    launch(setup, "c", 1, 2)
    os.rename(tmp / "c", tmp / "d")
    one_then_two = launch(setup, "d", 2, 4, extra=["--resume"])
    assert_runs_close(straight, one_then_two)


FREED_PROBE = r"""
import ctypes, sys, torch
sys.path.insert(0, sys.argv[1])
from heap import set_malloc

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
set_malloc("cpu", int(sys.argv[3]))   # as start.setup on a CPU run of that many processes
before = libc.mallinfo2().hblkhd     # bytes in blocks mmapped on their own
x = torch.ones(int(sys.argv[2]))     # fp32
mapped = libc.mallinfo2().hblkhd - before
del x
held = libc.mallinfo2().arena        # the heap kept after the free
print(mapped, held)
"""


def malloc_probe(tmp_path, source, *argv, **env):
    """The integers a probe `source` prints, run in a process of its own (ROOT, then `argv`) with
    glibc's malloc as a user who set nothing, plus `env`; skipped where glibc has no mallinfo2."""
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    clean = {
        k: v
        for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, str(probe), ROOT, *argv], capture_output=True,
                         text=True, env=clean | env)
    if "mallinfo2" in out.stderr:   # not glibc ≥ 2.33
        pytest.skip("no mallinfo2 in this libc")
    assert out.returncode == 0, out.stderr[-2000:]
    return [int(x) for x in out.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("mb", [12, 31, 113])
def test_cpu_runs_keep_freed_tensor_memory(tmp_path, mb):
    """On a CPU, heap.set_malloc (start.setup, one process) has malloc serve a tensor under
    heap.MAP_FROM (32 MB) from its heap and keep it after the free: glibc's default maps a block
    over 128 KB on its own and unmaps it at the free, so the next step's tensor of that size
    page-faults in anew. 12 MB: a layer's activations (experiments/bench/speed-cpu.md measures
    what they cost a training step). 113 MB, SmolLM2's embedding gradient, is mapped on its own
    and returned at its free (kept, such blocks fragmented the heap: experiments/memory-growth)."""
    n = str(mb * 2**20 // 4)
    mapped, held = malloc_probe(tmp_path, FREED_PROBE, n, "1")
    if mb * 2**20 >= MAP_FROM:
        assert mapped >= mb * 2**20 and held < mb * 2**20, (mapped, held)
    else:
        assert mapped < 2 ** 20, f"a {mb} MB tensor was mmapped on its own ({mapped} bytes)"
        assert held >= mb * 2 ** 20, f"the heap gave the freed {mb} MB back ({held} bytes kept)"
    # a malloc setting of the user's own is left as it is
    assert malloc_probe(tmp_path, FREED_PROBE, n, "1", MALLOC_MMAP_THRESHOLD_="65536")[0] >= \
        mb * 2**20, "the user's MALLOC_MMAP_THRESHOLD_ was overridden"


GATHER_PROBE = FREED_PROBE.split("set_malloc(")[0] + r"""
set_malloc(sys.argv[2], 2)           # as start.setup under torchrun on that device
y = torch.ones(2**20)                # 4 MB, freed: glibc's own threshold rises past it
del y
before = libc.mallinfo2().hblkhd
x = torch.ones(2**18)                # 1 MB: a layer's gathered weights are 1-14 MB
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_torchrun_processes_return_freed_blocks(tmp_path):
    """Under torchrun heap.set_malloc maps every block of MAP_FROM_TORCHRUN (64 KB) or more on its
    own, returned at its free; glibc's own threshold rises to the largest block freed, and the
    heap kept FSDP's freed buffers in fragments (experiments/memory-growth). Left as it is on
    another device."""
    mapped = {device: malloc_probe(tmp_path, GATHER_PROBE, device)[-1]
              for device in ("cpu", "cuda")}
    assert mapped["cpu"] >= 2**20 and mapped["cuda"] < 2**20, mapped


MAPPED_PROBE = FREED_PROBE.split("before = ")[0] + r"""
from heap import mapped
base = libc.mallinfo2().hblkhd       # bytes in blocks mmapped on their own
with mapped():
    x = torch.ones(3 * 2**20)        # 12 MB, made inside
inside = libc.mallinfo2().hblkhd - base
del x
after_free = libc.mallinfo2().hblkhd - base
y = torch.ones(3 * 2**20)            # made outside again
print(inside, after_free, libc.mallinfo2().hblkhd - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_blocks_made_inside_mapped_go_back_whole(tmp_path):
    """heap.mapped: where set_malloc keeps every block in the heap, one made inside (MKL's
    packed weights, which reserve more than they write) is mapped on its own and unmapped at its
    free; outside, blocks come from the kept heap again."""
    inside, after_free, outside = malloc_probe(tmp_path, MAPPED_PROBE, "0", "1")
    assert inside >= 12 * 2**20 and after_free < 2**20 and outside < 2**20, (inside, after_free,
                                                                              outside)
