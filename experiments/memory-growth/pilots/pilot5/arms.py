"""Pilot 5's arms (run at commit 5ea1b32, from the repository root):
    python experiments/memory-growth/pilots/pilot5/arms.py --out OUT --steps 32 \
        --arms default,lru64,lru64-rollout-mapped,lru64-moments --decode-matmul <the pinned plan>"""
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 4))
sys.path[:0] = [os.path.join(ROOT, "experiments"), ROOT]
import memory_growth as m  # noqa: E402

LRU = "import os; os.environ['LRU_CACHE_CAPACITY'] = '64'"
m.ARMS["lru64"] = LRU
m.ARMS["lru64-rollout-mapped"] = LRU + "; " + (
    "import heap, train; G = train.sync_and_generate; "
    "train.sync_and_generate = lambda *x: (lambda cm: (cm.__enter__(), G(*x), "
    "cm.__exit__(None, None, None))[1])(heap.mapped())")
m.ARMS["lru64-moments"] = LRU + "; " + (
    "import torch, start, train; S = start.setup; "
    "init = lambda r: [r.opt.state.__setitem__(p, {"
    "'step': torch.zeros((), dtype=torch.float32, device=p.device), "
    "'exp_avg': torch.zeros_like(p), 'exp_avg_sq': torch.zeros_like(p)}) "
    "for g in r.opt.param_groups for p in g['params']]; "
    "train.setup = lambda a: (lambda r: (init(r), r)[1])(S(a))")
m.main(sys.argv[1:])
