"""Pilot 4's arms (run at commit 5ea1b32, from the repository root):
    python experiments/memory-growth/pilots/pilot4/arms.py --out OUT --steps 32 \
        --arms default,grads-kept,awake,trim-sync --decode-matmul <the pinned plan>"""
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 4))
sys.path[:0] = [os.path.join(ROOT, "experiments"), ROOT]
import memory_growth as m  # noqa: E402

m.ARMS["grads-kept"] = (
    "import torch; Z = torch.optim.Optimizer.zero_grad; "
    "torch.optim.Optimizer.zero_grad = lambda self, set_to_none=True: Z(self, set_to_none=False)")
m.ARMS["awake"] = ("import rollout; "
                   "rollout.HFEngine.sleep = lambda self: self.fast and self.fast.stale()")
m.ARMS["trim-sync"] = m.RELEASE
m.main(sys.argv[1:])
