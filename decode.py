"""
The decode step written out by hand for Llama-family models (Llama, Qwen2, SmolLM2): the next
token's logits for B rows over a static KV cache, the loop fast_engine.py's engine runs once per
new token.

Why by hand: a decode step of a few rows reads every weight once and does ~2 FLOPs per weight per
row, so its ceiling is the memory bandwidth (bench.py --parts decode measures both). Three things
bring it closer than Hugging Face's forward:
- each weight matmul in the form that is fastest on this machine for that many rows: W @ xᵀ (the
  activations as columns), x @ Wᵀ (F.linear), oneDNN's linear on weights it has laid out for
  itself, or MKL's fp32 product on weights packed for one row count (fewer rows padded to it).
  Which wins differs by CPU, dtype and rows (experiments/bench/speed-cpu.md), so the engine
  measures them once at start-up (choose) and keeps the plan for the run; every form equals
  F.linear to rounding (tests/test_decode.py), and a run resumed decodes by the plan it began with;
- q|k|v and gate|up as one matrix each (HF's modules become views of them: no extra memory), and
  the residual adds fused into the matmuls (addmm);
- a KV cache allocated once for prompt + max_new_tokens: no per-token concatenation, and a row
  that finishes leaves by moving the last live row into its place (HF's cache copies every row).
  On a CPU the cache and the attention are fp32 whatever the weights: a bf16 bmm copies each
  strided cache slice first and runs ~3x slower than fp32 (bench: 8 rows, 8 % of a step); the
  keys and values are rounded to the weights' dtype before they are stored, so only the attention
  sums are more precise than HF's. On a GPU both stay in the weights' dtype.
The HF forward stays the definition: tests/test_decode.py checks these logits and the engine's
samples against it; any other architecture (not `supported`) the engine decodes
with the HF forward. Prefill (the prompt, many tokens at once, compute-bound) stays HF's.
"""
import functools
import hashlib
import json
import os
import time

import torch
import torch.nn.functional as F

from host import cpu

# RMSNorm, rotary q/k, GQA attention, SiLU-gated MLP; q/k/v biases allowed
FAMILY = ("llama", "qwen2")


def supported(model):
    """Whether decode_step computes this model's forward: of FAMILY, without a feature it does not
    implement (sliding window, o/MLP biases, q/k norms, another activation)."""
    c, inner = model.config, getattr(model, "model", None)
    if (c.model_type not in FAMILY or getattr(c, "hidden_act", None) != "silu"
            or getattr(c, "use_sliding_window", False) or inner is None
            or not hasattr(inner, "rotary_emb")):
        return False
    return not any(
        hasattr(l.self_attn, "q_norm") or any(
            m.bias is not None
            for m in (l.self_attn.o_proj, l.mlp.gate_proj, l.mlp.up_proj, l.mlp.down_proj))
        for l in inner.layers)


def fuse(model, views=True):
    """The weights one decode step reads, per layer: (input norm, W_qkv, b_qkv or None, W_o,
    post-attention norm, W_gate|up, W_down), with q|k|v and gate|up each one contiguous matrix.
    views=True makes the model's own q/k/v and gate/up weights views of them (no extra memory; a
    sync that copies into the parameters updates them); views=False copies, leaving the model as it
    is (a policy that is training). None when the model is not `supported`."""
    if not supported(model):
        return None
    inner = model.model
    out = []
    for layer in inner.layers:
        a, mlp = layer.self_attn, layer.mlp
        qkv = concat([a.q_proj, a.k_proj, a.v_proj], "weight", views)
        bias = concat([a.q_proj, a.k_proj, a.v_proj], "bias",
                      views) if a.q_proj.bias is not None else None
        out.append(
            (layer.input_layernorm, qkv, bias, a.o_proj.weight.detach(),
             layer.post_attention_layernorm, concat([mlp.gate_proj, mlp.up_proj], "weight",
                                                    views), mlp.down_proj.weight.detach()))
    return out


def concat(modules, name, views):
    """One tensor holding the modules' `name` tensors stacked on dim 0; with views, each module's
    tensor becomes a view of its slice (a parameter still, so load_state_dict and .copy_ write into
    the fused one)."""
    whole = torch.cat([getattr(m, name).detach() for m in modules])
    if not views:
        return whole
    start = 0
    for m in modules:
        n = getattr(m, name).shape[0]
        setattr(m, name, torch.nn.Parameter(whole[start:start + n], requires_grad=False))
        start += n
    return whole


def weight_first(x, w, add=None):
    """x [B, in] @ wᵀ (+ add: a bias [out] or a residual [B, out]) computed as w @ xᵀ, the weights
    streamed row by row, the activations as columns; the result is a transposed view."""
    if add is None:
        return (w @ x.t()).t()
    return torch.addmm(add.t() if add.dim() == 2 else add[:, None], w, x.t()).t()


def linear(x, w, add=None):
    """x [B, in] @ wᵀ (+ add), the activations as rows: torch's F.linear."""
    return F.linear(x, w) if add is None else torch.addmm(add, x, w.t())


def onednn(x, packed, add=None):
    """x [B, in] @ wᵀ (+ add) by oneDNN on weights it has laid out for itself (onednn_pack)."""
    if add is None or add.dim() == 1:
        return torch.ops.mkldnn._linear_pointwise(x, packed, add, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise(x, add, packed, None, "add")


def onednn_pack(w, rows):
    """w [out, in] in oneDNN's blocked layout for its linear, for any number of rows (a copy: the
    engine makes it again after each sync and frees it when it sleeps)."""
    return torch.ops.mkldnn._reorder_linear_weight(w, None)


def mkl(x, packed, add=None):
    """x [B, in] @ wᵀ (+ add) by MKL's sgemm on weights packed for R rows (mkl_pack): fewer rows
    are padded with zeros to R, more taken R at a time. A decode step reads every weight whatever
    the rows, and at a few fp32 rows the packed R-row product beats every form at B (bench: 8 rows
    31 vs 43-51 ms for the model's matmuls)."""
    p, shape, R = packed
    B, residual = len(x), add is not None and add.dim() == 2
    if B > R:   # beyond the plan's rows (a plan ending in mkl packs for the engine's largest batch)
        return torch.cat([mkl(x[i:i + R], packed, add[i:i + R] if residual else add)
                          for i in range(0, B, R)])
    y = torch.ops.mkl._mkl_linear(F.pad(x, (0, 0, 0, R - B)) if B < R else x, p, shape,
                                  None if residual else add, R)[:B]
    return y + add if residual else y


def mkl_pack(w, rows):
    """w [out, in] packed by MKL for products of exactly `rows` rows, fp32 only (a copy, as
    oneDNN's), with a stand-in of w's shape (MKL reads only its size at that many rows)."""
    stand_in = torch.zeros((), dtype=w.dtype, device=w.device).expand(w.shape)
    return torch.ops.mkl._mkl_reorder_linear_weight(w, rows), stand_in, rows


# the forms of a decode step's weight matmul: name -> (how the weights are prepared for a number of
# rows, once a sync; the matmul). Each equals F.linear to rounding; which is fastest depends on the
# machine, the dtype and the rows (weight_first at 8 bf16 rows on an AMX Xeon, oneDNN's at 8 fp32
# rows on an AVX2 EPYC: experiments/bench/speed-cpu.md), so the engine measures them (choose).
MATMULS = {"weight-first": (None, weight_first), "linear": (None, linear),
           "onednn": (onednn_pack, onednn), "mkl": (mkl_pack, mkl)}
PADS = {"mkl"}   # prepared for one row count, the largest of its part of a plan; fewer are padded
# a plan's row counts: each choice holds from its count to the next, so its parts end at powers of 2
ROWS = (1, 2, 3, 5, 9, 17, 33, 65)
_CHOSEN = {}     # this process's measurements, by model shape, dtype, rows and horizon


def available(device, dtype=torch.float32):
    """The MATMULS this device runs in this dtype: a form that lays the weights out anew only where
    it can (oneDNN's needs a CPU build of torch with it, and for bf16 AVX-512 or AVX-NE-CONVERT:
    an AVX2 CPU raises; MKL's, an x86 build and fp32), tried once on a small matrix."""
    return [m for m, (prep, _) in MATMULS.items()
            if prep is None or prepares(prep, str(torch.device(device)), dtype)]


@functools.lru_cache(maxsize=None)
def prepares(prep, device, dtype):
    """Whether prep lays out a weight matrix of this dtype on this device."""
    try:
        prep(torch.zeros(8, 8, dtype=dtype, device=device), 8)
        return True
    except (RuntimeError, AttributeError):   # no such path here, or no such operator in torch
        return False


def packed(layers, head, name, rows):
    """(layers, head) with every weight matrix prepared for MATMULS[name] at `rows` rows (the same
    when the form needs no preparation)."""
    prep = MATMULS[name][0]
    if prep is None:
        return layers, head
    return [(n1, prep(qkv, rows), b, prep(wo, rows), n2, prep(gu, rows), prep(down, rows))
            for n1, qkv, b, wo, n2, gu, down in layers], prep(head, rows)


def plan_text(plan):
    """A plan [(rows from, matmul name)] as `1:onednn,16:weight-first` (--decode-matmul's form)."""
    return ",".join(f"{r}:{m}" for r, m in plan)


def parse_plan(text, device="cpu", dtype=torch.float32):
    """--decode-matmul's value as a plan: one MATMULS name (every row count) or `rows:name,...`
    from 1 row up. Raises ValueError naming what is wrong."""
    parts = [p.split(":") if ":" in p else ("1", p) for p in text.split(",")]
    plan = [(int(r) if r.isdigit() else -1, m) for r, m in parts]
    for r, m in plan:
        if m not in available(device, dtype):
            raise ValueError(f"{m!r} is not a matmul this machine runs in {dtype} "
                             f"(one of {', '.join(available(device, dtype))})")
        if r < 1:
            raise ValueError(f"{text!r}: each part is rows:name, rows a positive integer")
    if plan[0][0] != 1 or [r for r, _ in plan] != sorted({r for r, _ in plan}):
        raise ValueError(f"{text!r}: the row counts must start at 1 and increase")
    return plan


def tops(plan, max_rows):
    """The largest row count of each part of a plan: the next part's first − 1, the last's
    max_rows (a form in PADS is prepared for it)."""
    return [r - 1 for r, _ in plan[1:]] + [max(max_rows, plan[-1][0])]


def matrices(layers, head):
    """The weight matrices one decode step multiplies by, in order (4 a layer, then the head)."""
    return [w for l in layers for w in (l[1], l[3], l[5], l[6])] + [head]


def seconds(matmul, ready, xs):
    """Wall time of one `matmul` by each prepared weight in ready, each of the activations xs."""
    t = time.perf_counter()
    for w, x in zip(ready, xs):
        matmul(x, w)
    return time.perf_counter() - t


def timings(layers, head, starts, ends, reps=2):
    """{(form, rows): (seconds of a decode step's weight products, seconds to prepare the
    weights)}: each form at the first row count of each part of a plan (starts), a form in PADS at
    the last (ends), prepared for it. All the weights, as a step reads them (a part of them can sit
    in a large cache and time faster than the step would). Best of reps after a warm-up, forms
    interleaved. A form that fails to prepare or run here is dropped, with one line saying so."""
    forms, out, ready = available(head.device, head.dtype), {}, {}

    def prepare(m, rows):   # timed the second time: the first in a process pays one-off costs
        for _ in range(2 if MATMULS[m][0] else 1):
            ready.pop(m, None)
            t = time.perf_counter()
            ready[m] = matrices(*packed(layers, head, m, rows))
        return time.perf_counter() - t if MATMULS[m][0] else 0.0

    def attempt(m, f, *args):   # f(*args), or None with m dropped where it fails
        try:
            return f(*args)
        except (RuntimeError, AttributeError, NotImplementedError) as e:
            print(f"decode: the {m!r} matmul fails on this machine "
                  f"({e.__class__.__name__}: {str(e)[:100]}): dropped")
            forms.remove(m)
            ready.pop(m, None)
    prep = {m: attempt(m, prepare, m, None) for m in list(forms) if m not in PADS}
    for rows in sorted(set(starts) | set(ends)):
        here = [m for m in forms if rows in (ends if m in PADS else starts)]
        prep |= {m: attempt(m, prepare, m, rows) for m in here if m in PADS}   # a copy at a time
        xs = [torch.randn(rows, w.shape[1], dtype=head.dtype, device=head.device)
              for w in matrices(layers, head)]
        for m in [m for m in here if m in forms]:   # round 0 warms up, and tries each form
            attempt(m, seconds, MATMULS[m][1], ready[m], xs)
        here = [m for m in here if m in forms]
        rounds = [[seconds(MATMULS[m][1], ready[m], xs) for m in here] for _ in range(reps)]
        out |= {(m, rows): (min(r[k] for r in rounds), prep[m]) for k, m in enumerate(here)}
    return out


@torch.inference_mode()
def choose(layers, head, max_rows, horizon=64, reps=2, store=None):
    """The plan for decoding up to max_rows rows at once, measured here on the model's weights
    (timings): per part of the plan (ROWS), the fastest form at its first row count, and the one
    stretch of parts where a form in PADS, prepared for the stretch's largest count and padding
    fewer rows to it, saves most (at most one more copy of the weights). A form that lays the
    weights out anew pays that once per `horizon` decode steps (the engine prepares them again
    after each sync); each row count counts alike. Measured once per process for a model shape,
    dtype, max_rows and horizon, and with store (a JSON file) once per machine (stored)."""
    key = (head.shape, head.dtype, head.device, len(layers), layers[0][1].shape, max_rows, horizon)
    if key not in _CHOSEN:
        _CHOSEN[key] = stored(store, key, lambda: measure(layers, head, max_rows, horizon, reps))
    return _CHOSEN[key]


def stored(store, key, measure_now):
    """measure_now()'s plan, kept in the JSON file `store` under this machine (the CPU, its threads,
    torch, the instruction sets the environment allows it) and decode.py's own text: a later
    process on this machine reads it instead of measuring again (and so decodes as this one did).
    The file is written whole and renamed; one that cannot be read or written is measured past."""
    with open(__file__, "rb") as f:
        this = hashlib.sha1(repr((
            cpu(), torch.get_num_threads(), torch.__version__, f.read(),
            [os.environ.get(v) for v in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                         "MKL_ENABLE_INSTRUCTIONS")], key)).encode()).hexdigest()
    try:
        with open(store) as f:
            plans = json.load(f)
    except (OSError, TypeError, ValueError):   # no store, none yet, or not JSON
        plans = {}
    if this in plans and all(m in MATMULS for _, m in plans[this]):
        return [(int(rows), m) for rows, m in plans[this]]
    plan = measure_now()
    if store:
        try:
            os.makedirs(os.path.dirname(store) or ".", exist_ok=True)
            with open(f"{store}.{os.getpid()}", "w") as f:
                json.dump(plans | {this: plan}, f)
            os.replace(f"{store}.{os.getpid()}", store)
        except OSError:
            pass
    return plan


def measure(layers, head, max_rows, horizon, reps):
    """choose's plan, measured now."""
    starts = [r for r in ROWS if r <= max_rows] or [1]
    ends = tops([(r, None) for r in starts], max_rows)
    t = timings(layers, head, starts, ends, reps)
    cost = lambda m, rows: t[m, rows][0] + t[m, rows][1] / horizon
    plain = [min((m for m, r in t if r == s and m not in PADS), key=lambda m: cost(m, s))
             for s in starts]
    base = [cost(m, s) for m, s in zip(plain, starts)]
    width = [e - s + 1 for s, e in zip(starts, ends)]
    # (saving, form, first part, last part) of each stretch a padding form could take
    stretches = [(sum(width[k] * (base[k] - cost(m, ends[j])) for k in range(i, j + 1)), m, i, j)
                 for m in {m for m, _ in t if m in PADS} for j in range(len(starts))
                 for i in range(j + 1)]
    gain, m, i, j = max(stretches, default=(0, None, 0, -1))
    forms = plain[:i] + [m] * (j - i + 1) + plain[j + 1:] if gain > 0 else plain
    plan = []
    for s, f in zip(starts, forms):
        if not plan or plan[-1][1] != f:
            plan.append((s, f))
    if plan[-1][1] in PADS:   # packed for max_rows: more rows (an eval's) by one needing no copy
        free = [m for m, r in t if r == starts[-1] and m not in PADS and MATMULS[m][0] is None]
        plan.append((max_rows + 1, min(free, key=lambda m: t[m, starts[-1]][0])))
    return plan


def matmul_plan(text, layers, head, max_rows, horizon=64, store=None):
    """--decode-matmul resolved: auto measures on a CPU (choose; store: where plans measured on
    this machine are kept) and keeps W @ xᵀ elsewhere (a GPU runs vLLM for speed); anything else
    is parsed (parse_plan)."""
    if text != "auto":
        return parse_plan(text, head.device, head.dtype)
    if head.device.type != "cpu":
        return [(1, "weight-first")]
    return choose(layers, head, max_rows, horizon, store=store)


def rms_norm(x, norm):
    """Llama's RMSNorm, w · (x / sqrt(mean(x²) + ε)), over the features of x [B, features], rounded
    where HF rounds (normalized in fp32, cast back, then scaled)."""
    xf = x.float()
    return norm.weight * (
        xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).to(x.dtype)


def rotate(x, cos, sin):
    """Rotary position embedding of x [B, heads, D] (HF's half-split convention): x·cos +
    rot(x)·sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def decode_step(model, layers, head, linear, y, pos, K, V, n, bias):
    """Next-token logits [B, vocab] of B rows whose newest tokens y [B] sit at positions pos [B]. K,
    V [layers, B, kv heads, slots, D]: the cache, filled up to slot n (exclusive), into which this
    step writes slot n; bias [B, heads, slots]: 0 where a row may attend, -inf at its left padding.
    layers and head: the weights in `linear`'s form (a MATMULS path). Attention over slots 0..n,
    scaled by D^-1/2, softmax in fp32, as HF's eager attention."""
    # the cache's shape holds the kv heads and head dim
    (_, _, KVH, _, D), H = K.shape, model.config.num_attention_heads
    B, G = len(y), H // KVH
    x = model.model.embed_tokens.weight[y]                              # the residual [B, hidden]
    cos, sin = model.model.rotary_emb(x, pos[:, None])                 # [B, 1, D]
    mask = bias[:, :, :n + 1].reshape(B * KVH, G, n + 1)
    for i, (norm1, qkv, b, wo, norm2, gate_up, down) in enumerate(layers):
        t = linear(rms_norm(x, norm1), qkv, b).reshape(B, H + 2 * KVH, D)
        qk = rotate(t[:, :H + KVH], cos, sin)
        K[i, :, :, n], V[i, :, :, n] = qk[:, H:], t[:, H + KVH:]
        k = K[i, :, :, :n + 1].reshape(B * KVH, n + 1, D)
        v = V[i, :, :, :n + 1].reshape(B * KVH, n + 1, D)
        scores = torch.baddbmm(mask, qk[:, :H].reshape(B * KVH, G, D).to(k.dtype),
                               k.transpose(1, 2), alpha=D**-0.5)
        att = torch.bmm(torch.softmax(scores, -1, dtype=torch.float32).to(v.dtype),
                        v).reshape(B, H * D).to(x.dtype)
        x = linear(att, wo, x)
        g = linear(rms_norm(x, norm2), gate_up)
        half = g.shape[1] // 2
        x = linear(F.silu(g[:, :half]) * g[:, half:], down, x)
    return linear(rms_norm(x, model.model.norm), head).contiguous()


def prepared(layers, head, plan, max_rows):
    """A plan's forms, ready for static_decoder: [(rows from, matmul, layers, head)], each form's
    weights prepared once however many parts use it (a form in PADS once per part: for its
    largest row count, tops)."""
    keys = [(m, top if m in PADS else None) for (_, m), top in zip(plan, tops(plan, max_rows))]
    ready = {k: packed(layers, head, k[0], k[1]) for k in set(keys)}
    return [(rows, MATMULS[m][1], *ready[k]) for (rows, m), k in zip(plan, keys)]


def static_decoder(model, forms, cache, attn, max_new_tokens):
    """The decode loop's state after prefill: (step, drop). step(y) appends the tokens y [B] (one
    per live row) and returns the next logits, by the form of `forms` (prepared) for that many
    rows; drop(going) lets the rows where `going` is False leave and returns, for each remaining
    row, the row it was before (the last live rows fill the holes, so only they are copied).
    cache: HF's prefill cache; attn [B, P]: the prompts' attention mask."""
    B, P = attn.shape
    L, (_, KVH, _, D) = len(forms[0][2]), cache.layers[0].keys.shape
    keys = cache.layers[0].keys
    K = keys.new_empty(L, B, KVH, P + max_new_tokens, D,
                       dtype=torch.float32 if keys.device.type == "cpu" else keys.dtype)
    V = torch.empty_like(K)
    for i, layer in enumerate(cache.layers):
        K[i, :, :, :P], V[i, :, :, :P] = layer.keys, layer.values
    bias = torch.zeros(B, model.config.num_attention_heads, P + max_new_tokens, dtype=K.dtype,
                       device=K.device)
    bias[:, :, :P].masked_fill_(attn[:, None, :] == 0, float("-inf"))
    st = {"n": P, "pos": attn.sum(-1), "live": B}

    def step(y):
        m, n = st["live"], st["n"]
        _, matmul, layers, head = [f for f in forms if f[0] <= m][-1]
        logits = decode_step(model, layers, head, matmul, y, st["pos"], K[:, :m], V[:, :m], n,
                             bias[:m])
        st["n"], st["pos"] = n + 1, st["pos"] + 1
        return logits

    def drop(going):
        m = int(going.sum())
        order = torch.arange(m, device=going.device)
        holes, movers = (~going[:m]).nonzero().squeeze(-1), going[m:].nonzero().squeeze(-1) + m
        if len(holes):
            n = st["n"]
            K[:, holes, :, :n], V[:, holes, :, :n] = K[:, movers, :, :n], V[:, movers, :, :n]
            bias[holes], order[holes] = bias[movers], movers
            st["pos"][holes] = st["pos"][movers]
        st["live"], st["pos"] = m, st["pos"][:m]
        return order
    return step, drop
