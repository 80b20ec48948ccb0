import sys
sys.path.insert(0, "/work/wt/experiments"); sys.path.insert(0, "/work/wt")
import memory_growth as m
m.ARMS["grads-kept"] = ("import torch; Z = torch.optim.Optimizer.zero_grad; "
    "torch.optim.Optimizer.zero_grad = lambda self, set_to_none=True: Z(self, set_to_none=False)")
m.ARMS["awake"] = "import rollout; rollout.HFEngine.sleep = lambda self: self.fast and self.fast.stale()"
m.ARMS["trim-sync"] = m.RELEASE
m.main(sys.argv[1:])
