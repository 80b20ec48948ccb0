"""Pilot 6's arms (run at commit 20585c6, from the repository root, 32 steps each):
    python experiments/memory-growth/pilots/pilot6/arms.py --out OUT --steps 32 --arms ARMS \
        --decode-matmul 1:onednn,2:weight-first,17:onednn,33:weight-first
pad32, pad64   a micro-batch's prompt width and response length padded up to a multiple of 32 (64)
               tokens: fewer distinct matmul shapes
ref-first      the reference pass before the policy's forward
grads-first    πθ's gradients made (zeros) before the forward: the step frees in reverse order
both           ref-first and grads-first
caches16 ... caches48  both caches of primitives at 16 ... 48 (heap's default then: 64)"""
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 4))
sys.path[:0] = [os.path.join(ROOT, "experiments"), ROOT]
import memory_growth as m  # noqa: E402

PAD = """import torch, train, models
C = models.collate
def collate(units, device, C=C, R={R}):
    b = C(units, device)
    up = lambda n: -(-n // R) * R
    T, P = b['ids'].shape[1], b['prompt'].shape[1]
    for k in ('ids', 'mask', 'mu', 'old_stamped'):
        b[k] = torch.nn.functional.pad(b[k], (0, up(T) - T))
    for k in ('prompt', 'pattn'):
        b[k] = torch.nn.functional.pad(b[k], (up(P) - P, 0))
    return b
train.collate = collate"""
REF_FIRST = '''import inspect, train
src = inspect.getsource(train.loss_and_backward)
pol = """        with autocast(a):
            b["pi"], logits = response_logps(policy, b, a.temperature, with_logits=True,
                                             share_prompt=not a.grad_checkpointing)
        tick = clock(spent, "policy", tick)
"""
ref = """        with torch.no_grad(), autocast(a):
            b["ref"] = response_logps(ref, b, a.temperature) if ref is not None else None
        tick = clock(spent, "ref", tick)
"""
assert pol + ref in src
exec(compile(src.replace(pol + ref, ref + pol), train.__file__, "exec"), train.__dict__)'''
GRADS_FIRST = """import torch, train
L = train.loss_and_backward
def loss_and_backward(units, n_resp, n_tok, batch, a, policy, *rest):
    for p in policy.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    return L(units, n_resp, n_tok, batch, a, policy, *rest)
train.loss_and_backward = loss_and_backward"""
m.ARMS.update({"pad32": f"exec({PAD.format(R=32)!r})", "pad64": f"exec({PAD.format(R=64)!r})",
               "ref-first": f"exec({REF_FIRST!r})", "grads-first": f"exec({GRADS_FIRST!r})",
               "both": f"exec({REF_FIRST!r}); exec({GRADS_FIRST!r})"})
for c in (16, 24, 32, 48):
    m.ARMS[f"caches{c}"] = (f"import os; os.environ['LRU_CACHE_CAPACITY'] = '{c}'; "
                            f"os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'] = '{c}'")
m.main(sys.argv[1:])
