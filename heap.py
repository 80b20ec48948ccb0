"""
The memory a CPU process keeps between steps. glibc's malloc, set for a training loop (set_malloc):
one process frees and allocates the same large tensors at every step, and a kept block is handed
out again with its pages in place; under torchrun FSDP's buffers are returned at their free.
Blocks that should not stay resident after their free go back whole (mapped); free_bytes and
release for measuring and returning what it keeps.
Linux/glibc only; elsewhere, or where the user set a malloc variable, nothing changes. And
oneDNN's caches of primitives, bounded on import (below).
"""
import contextlib
import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
KEPT = []   # [the libc whose malloc set_malloc set, its mapping size] (empty: glibc's default)
MAP_FROM = 32 << 20   # bytes, one process: blocks this large or larger mapped (None: none)
MAP_FROM_TORCHRUN = 64 << 10   # bytes, under torchrun: blocks this large or larger mapped


class _Mallinfo2(ctypes.Structure):   # glibc's mallinfo2(): what its malloc holds, in bytes
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


# oneDNN (bf16 matmuls on a CPU, the decode's packed forms) keeps each primitive it builds, one per
# matmul shape, and a training step's shapes follow its token count, new step after step: two
# caches of 1024 by default, oneDNN's own and that of PyTorch's bridge to it (ideep,
# LRU_CACHE_CAPACITY), grew a long run's memory for its first ~100 steps (0.3 GB at 135M). Smaller,
# they also hold fewer of the small blocks that, made mid-step and kept across steps, split the
# kept heap's free memory into pieces (experiments/memory-growth). 32 holds a pass's shapes (every
# layer has the same ones); at 1, every matmul builds its primitive anew (3x slower). Read at the
# first bf16 matmul, so set on import; a value of the user's is kept.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "32")
os.environ.setdefault("LRU_CACHE_CAPACITY", "32")
if os.environ["LRU_CACHE_CAPACITY"].strip() == "0":   # ideep's cache cannot be turned off
    sys.exit("LRU_CACHE_CAPACITY=0: PyTorch's CPU bf16 matmuls crash with ideep's cache of "
             "primitives at 0 (a segfault, torch 2.13); unset it or give 1 or more")


def set_malloc(device, world):
    """glibc's malloc set for a CPU training loop of `world` processes (`device` "cpu"; anything
    else is left as it is, as is a malloc variable of the user's). Linux/glibc only; numbers
    unchanged either way.

    One process: keep the memory torch frees, to hand it out again. By default glibc maps every
    block over its adaptive threshold (up to 32 MB) on its own and unmaps it at the free, so the
    next tensor of that size page-faults in every 4 KiB page anew (a training step frees and
    re-allocates blocks of 1-30 MB hundreds of times). Here blocks under MAP_FROM come from the heap
    and stay there (its free top is trimmed only past 2 GB): the fp32 policy pass ~20 % faster
    (experiments/bench/speed-cpu.md). Blocks of MAP_FROM or more (32 MB, glibc's largest threshold:
    the embedding's gradient and autocast copy, the logits) are still mapped on their own: a few
    a step, and kept in a heap whose other blocks change size with every step's token count they
    left it fragmented, the peak growing over a long run (experiments/memory-growth).

    Under torchrun: every block of MAP_FROM_TORCHRUN or more mapped on its own and returned at its
    free. FSDP gathers and reduces each layer through buffers of its own, and glibc's default heap
    kept the freed ones in fragments: twice the plan per process, climbing every step. Mapped, the
    peak is the plan's, flat; each step pays the page faults (the default run on 2 processes ~30 %
    slower on a 2-core CPU; blocks of 4 MB or more: 1.2x the plan, ~20 % slower;
    experiments/memory-growth). On a CPU, torchrun proves the multi-process path, where memory is
    what runs out."""
    if device != "cpu" or any(k.startswith("MALLOC_") for k in os.environ) or \
            "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    if hasattr(libc, "mallinfo2"):   # glibc >= 2.33: free_bytes
        libc.mallinfo2.restype = _Mallinfo2
    if world == 1:
        libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)   # bytes; mallopt takes a C int
    KEPT[:] = [libc, MAP_FROM if world == 1 else MAP_FROM_TORCHRUN]
    _map_largest()


def _map_largest():
    """No block mapped on its own, or only those of KEPT[1] bytes or more."""
    libc, limit = KEPT
    if limit is None:
        libc.mallopt(M_MMAP_MAX, 0)
    else:
        libc.mallopt(M_MMAP_THRESHOLD, limit)
        libc.mallopt(M_MMAP_MAX, 2**16)


@contextlib.contextmanager
def mapped():
    """Inside: every block of 1 MB or more mapped on its own, unmapped (its pages returned) at its
    free, where set_malloc keeps the rest (one process; under torchrun they are mapped anyway).
    For copies made and dropped once a sync, larger than what they hold: MKL's packing
    (decode.mkl_pack) reserves 2-5x the bytes it writes, and from the kept heap those blocks' pages
    stayed resident after the free, ~0.4 GB over a DPO step's peak
    (experiments/bench/speed-cpu.md); mapped, their first touch costs page faults."""
    if not KEPT or KEPT[1] is not None and KEPT[1] <= 2**20:
        yield
        return
    KEPT[0].mallopt(M_MMAP_THRESHOLD, 2**20)
    KEPT[0].mallopt(M_MMAP_MAX, 2**16)
    try:
        yield
    finally:
        _map_largest()


def release():
    """Return the free pages inside the kept heap to the OS (glibc's malloc_trim(0): from its middle
    too, not only its top). Not called by a run: experiments/memory_growth.py measures where it
    would help and what it costs (each page it returns is faulted in again at its next use)."""
    if KEPT:
        KEPT[0].malloc_trim(0)


def free_bytes():
    """Bytes glibc's malloc holds free in its main heap (mallinfo2's fordblks: resident where
    touched and not released); None without set_malloc's libc or glibc >= 2.33."""
    if not KEPT or not hasattr(KEPT[0], "mallinfo2"):
        return None
    return KEPT[0].mallinfo2().fordblks
