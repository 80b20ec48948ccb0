import sys
sys.path.insert(0, "/work/wt/experiments"); sys.path.insert(0, "/work/wt")
import memory_growth as m
LRU = "import os; os.environ['LRU_CACHE_CAPACITY'] = '64'"
m.ARMS["lru64"] = LRU
m.ARMS["lru64-rollout-mapped"] = LRU + "; " + ("import heap, train; G = train.sync_and_generate; "
    "train.sync_and_generate = lambda *x: (lambda cm: (cm.__enter__(), G(*x), cm.__exit__(None, None, None))[1])(heap.mapped())")
m.ARMS["lru64-moments"] = LRU + "; " + ("import torch, start, train; S = start.setup; "
    "init = lambda r: [r.opt.state.__setitem__(p, {'step': torch.zeros((), dtype=torch.float32, device=p.device), "
    "'exp_avg': torch.zeros_like(p), 'exp_avg_sq': torch.zeros_like(p)}) for g in r.opt.param_groups for p in g['params']]; "
    "train.setup = lambda a: (lambda r: (init(r), r)[1])(S(a))")
m.main(sys.argv[1:])
