"""Pilot 6's heap walk (run at commit 20585c6, from the repository root):
    python experiments/memory-growth/pilots/pilot6/walk.py --steps 12 --eval-problems 0 \
        --decode-matmul 1:onednn,2:weight-first,17:onednn,33:weight-first --out OUT
(the caches' arms: LRU_CACHE_CAPACITY=1 and/or ONEDNN_PRIMITIVE_CACHE_CAPACITY=1 before it).
After optimizer steps 4 and 12 it walks glibc's main heap ([heap] in /proc/self/maps) chunk by
chunk (each chunk's size word; in use where the next chunk's PREV_INUSE bit is set, so tcache and
fastbin chunks count as in use) and prints the free holes of 256 KB or more and the runs of in-use
chunks between two of them (the separators), by their size: a run of small live objects keeps
two holes from joining into one."""
import collections
import ctypes
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 4))
sys.path.insert(0, ROOT)
sys.argv[0] = "train.py"
import train  # noqa: E402

HOLE = 256 << 10


def chunks():
    """(size, in use) of each chunk of the main heap, the top chunk last (in use None)."""
    start, end = next(tuple(int(x, 16) for x in line.split()[0].split("-"))
                      for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]"))
    p, found = (start + 15) & ~15, []
    while p < end - 16:
        size = ctypes.c_size_t.from_address(p + 8).value & ~7
        if size == 0 or p + size > end:
            break
        found.append((p, size))
        p += size
    word = lambda q: ctypes.c_size_t.from_address(q + 8).value   # noqa: E731
    return [(s, bool(word(found[i + 1][0]) & 1)) for i, (_, s) in enumerate(found[:-1])] + \
        [(found[-1][1], None)], end - start


def walk(tag):
    heap, size = chunks()
    holes = [s for s, used in heap if used is False and s >= HOLE]
    runs, run, seen = [], [], False
    for s, used in heap:
        if used is False and s >= HOLE:
            if seen and run:
                runs.append(run)
            run, seen = [], True
        elif used:
            run.append(s)
    by = collections.Counter("<4KB" if sum(r) < 4096 else "<64KB" if sum(r) < 65536 else
                             "<1MB" if sum(r) < 2**20 else ">=1MB" for r in runs)
    small = collections.Counter(s for r in runs if sum(r) < 65536 for s in r)
    print(f"WALK {tag}: heap {size / 1e9:.3f} GB, {len(holes)} holes = {sum(holes) / 1e9:.3f} GB, "
          f"top {heap[-1][0] / 1e6:.1f} MB; separators by size {dict(by)}", flush=True)
    print("   chunk sizes in separators under 64 KB:", small.most_common(12), flush=True)


step, done = train.optimizer_step, [0]


def optimizer_step(*args):
    out = step(*args)
    done[0] += 1
    if done[0] in (4, 12):
        walk(f"after step {done[0]}")
    return out


train.optimizer_step = optimizer_step
train.main(sys.argv[1:])
