"""
rollout.HFEngine, faster on a CPU: the same engine and interface, its decode step decode.py's
hand-written one (Llama-family models) instead of Hugging Face's forward. Nothing else changes:
the same prefill, the same sampling and keyed draws, the same tokens to rounding
(tests/test_decode.py: test_engine_samples_what_the_hf_forward_samples).

What makes it faster, and what it costs in memory, lives here and in decode.py:
- a matmul plan: which form multiplies the weights for how many rows (decode.choose), measured
  once per machine and kept in plans_file(); a resumed run decodes by the plan it began with;
- the weights some forms lay out anew (oneDNN's, MKL's packing), prepared once per sync (the
  engine's weights change only there) and kept until the next update_weights or sleep;
- those copies reserve more than they hold, so they are made inside heap.mapped(): their memory
  goes back to the OS whole when they are dropped.
"""
import os

from decode import fuse, matmul_plan, prepared, static_decoder, supported
from heap import mapped
from models import cache_root
from rollout import HFEngine


def plans_file():
    """Where decode plans measured on this machine are kept (decode.stored), or None."""
    root = cache_root()
    return os.path.join(root, "decode-plans.json") if root else None


class FastDecode:
    """decode.py's step for an engine's model: its fused weights (q|k|v and gate|up, views of the
    model's own: no extra memory), its matmul plan, and the plan's prepared weights."""

    def __init__(self, model, shared, matmul="auto", max_batch=64, horizon=64, rows=None):
        """matmul: a plan (--decode-matmul), or auto: measured on a CPU (once per machine),
        W @ xᵀ elsewhere. horizon: the decode steps expected between two syncs (what a form that
        lays the weights out anew is worth); rows: the most rows a sync decodes at once, where
        known (the plan covers up to min(rows, max_batch)). shared: the model is the trained
        policy itself (its weights change every step): fused copies are made per generate call
        and the model is left as it is."""
        self.model, self.shared, self.max_batch = model, shared, max_batch
        self.layers = None if shared else fuse(model)
        layers = self.layers or fuse(model, views=False)
        with mapped():   # its trial layouts as the generate calls' (their page faults timed too)
            self.plan = matmul_plan(matmul, layers, model.lm_head.weight.detach(),
                                    min(rows or max_batch, max_batch), horizon, plans_file())
        self.forms = None   # the plan's prepared weights, kept until the weights change

    def stale(self):
        """The weights changed (a sync) or were freed (sleep): prepare them again when needed."""
        self.forms = None

    def decoder(self, cache, attn, max_new_tokens):
        """(step, drop) for one batch after prefill, as rollout.hf_decoder's."""
        forms = self.forms
        if forms is None:
            layers = self.layers or fuse(self.model, views=False)   # the same sizes every call
            with mapped():   # copies larger than what they hold: returned whole when dropped
                forms = prepared(layers, self.model.lm_head.weight.detach(), self.plan,
                                 self.max_batch)
            self.forms = None if self.shared else forms
        return static_decoder(self.model, forms, cache, attn, max_new_tokens)


def fast_engine(model, tokenizer, max_batch=64, dtype=None, share=False, own=False,
                matmul="auto", horizon=64, rows=None):
    """An HFEngine (arguments as its own) that decodes by decode.py's step where the model's
    architecture allows (decode.supported), else by the HF forward; matmul, horizon, rows:
    FastDecode's."""
    engine = HFEngine(model, tokenizer, max_batch=max_batch, dtype=dtype, share=share, own=own)
    if supported(engine.model):
        engine.fast = FastDecode(engine.model, share, matmul, max_batch, horizon, rows)
    return engine
