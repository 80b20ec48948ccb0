"""decode.py's hand-written decode step against the HF forward it replaces: the same logits, the
same samples through the engine, finished rows leaving, syncs reaching the fused weights, and the
HF forward kept for architectures the step does not cover."""
import json
import os
import time

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import decode
from conftest import make_model, make_tokenizer
from models import chat_prompt_ids, left_pad, prefill
from fast_engine import fast_engine
from rollout import HFEngine, hf_decoder

pytestmark = pytest.mark.slow   # the whole suite only: -m "not slow" leaves it out


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def qwen2(tok):
    """A tiny random Qwen2: q/k/v biases, untied head."""
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(
        Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=False, eos_token_id=tok.eos_token_id))
    with torch.no_grad():   # biases start at zero: make them count
        for layer in model.model.layers:
            for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                m.bias.normal_(0, 0.5)
    return model


def prompts(tok):
    return [
        chat_prompt_ids(tok, t)
        for t in ("hi", "What is 3 + 4? Explain.", "Ana has 5 apples and buys 2 more.")]


def decoders(model, tok, max_new, drop_at=None, steps=6, feed=None, plan=((1, "weight-first"),)):
    """Next-token logits [steps + 1, B, V] (the prefill's first) from the HF decoder and decode.py's
    (its matmuls by `plan`) on the same tokens (the first row's greedy choice fed to every row, or
    the tokens `feed`); with drop_at, rows 1 and 2 of 4 leave at that step."""
    ps = prompts(tok) + [prompts(tok)[0]]
    ids, attn = left_pad(ps, tok.pad_token_id)
    out = []
    with torch.inference_mode():
        layers = decode.fuse(model)
        for make in (lambda c: hf_decoder(model, c, attn),
                     lambda c: decode.static_decoder(
                         model, decode.prepared(layers, model.lm_head.weight, plan, 4), c, attn,
                         max_new)):
            cache, logits = prefill(model, ids, attn, torch.arange(len(ps)))
            step, drop = make(cache)
            seen, live = [logits], torch.arange(len(ps))
            for t in range(steps):
                y = torch.full((len(live),), int(seen[-1][0].argmax()) if feed is None else feed[t])
                if t == drop_at:
                    order = drop(torch.tensor([True, False, False, True]))
                    live, y = live[order], y[order]
                full = torch.full((len(ps), logits.shape[-1]), float("nan"), dtype=logits.dtype)
                full[live] = step(y)   # back in the original row order, NaN for rows that left
                seen.append(full)
            out.append(torch.stack(seen))
    return out


@pytest.mark.parametrize("matmul", decode.available("cpu"))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decode_step_matches_the_hf_forward(tok, arch, matmul):
    model = (make_model(tok) if arch == "llama" else qwen2(tok)).eval()
    hf, ours = decoders(model, tok, max_new=8, plan=[(1, matmul)])
    assert torch.allclose(hf, ours, atol=1e-5), (hf - ours).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("matmul", decode.available("cpu"))
def test_each_matmul_form_is_f_linear(matmul, dtype):
    """Every form decode.py may pick computes x @ Wᵀ (+ a bias or a residual) as F.linear does, to
    the dtype's rounding, at the row counts a decode runs."""
    if matmul not in decode.available("cpu", dtype):   # oneDNN's bf16 on an AVX2 CPU
        pytest.skip(f"{matmul} has no {dtype} path on this CPU (decode.available leaves it out)")
    torch.manual_seed(0)
    prep, mm = decode.MATMULS[matmul]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for rows in (1, 3, 8, 64):
        # weights at a model's scale (std 1/sqrt(in)): outputs of order 1, where bf16's rounding of
        # a product before the residual add stays inside the tolerance on every CPU
        w, x = torch.randn(48, 40, dtype=dtype) / 40**0.5, torch.randn(rows, 40, dtype=dtype)
        bias, res = torch.randn(48, dtype=dtype), torch.randn(rows, 48, dtype=dtype)
        # prepared for these rows, for more (padded) and for fewer (MKL's: a part at a time)
        for packed_for in (rows, rows + 5, max(1, rows // 2)):
            ready = prep(w, packed_for) if prep else w
            for add, want in ((None, F.linear(x, w)), (bias, F.linear(x, w, bias)),
                              (res, res + F.linear(x, w))):
                got = mm(x, ready, add)
                assert got.shape == want.shape and got.dtype == dtype
                assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol), (rows, add)


def test_a_plan_of_several_forms_decodes_as_the_hf_forward(tok):
    """Rows leave mid-decode (4 → 2), crossing from one form to the next: every step's logits stay
    the HF forward's, whichever form ran it."""
    forms = decode.available("cpu")
    plan = [(1, forms[-1]), (3, forms[0])]
    hf, ours = decoders(make_model(tok).eval(), tok, max_new=8, drop_at=2, plan=plan)
    assert torch.allclose(hf.nan_to_num(), ours.nan_to_num(), atol=1e-5)


@pytest.mark.parametrize("form", sorted(decode.PADS & set(decode.available("cpu"))))
def test_a_form_packed_for_more_rows_decodes_as_the_hf_forward(tok, form):
    """MKL's packing is for one row count, the largest of its part of the plan: 4 rows decode by it,
    then 2 (rows leaving) padded to 4, with the HF forward's logits throughout."""
    hf, ours = decoders(make_model(tok).eval(), tok, max_new=8, drop_at=2, plan=[(1, form)])
    assert torch.allclose(hf.nan_to_num(), ours.nan_to_num(), atol=1e-5)


def test_choose_gives_a_padding_form_the_stretch_where_it_saves_most(monkeypatch):
    """From the timings: per part of the plan the fastest plain form; a form in PADS (one copy of
    the weights, packed for its stretch's largest row count) takes the stretch of parts it saves
    most on, counting each row count alike and its preparation once per horizon; none where it
    saves nothing."""
    def plan_from(table, horizon=64):
        monkeypatch.setattr(decode, "timings", lambda layers, head, starts, ends, reps: table)
        monkeypatch.setattr(decode, "_CHOSEN", {})
        monkeypatch.setattr(decode, "PADS", {"pad"})
        return decode.plan_text(decode.choose([(None, torch.zeros(4, 4))], torch.zeros(8, 4), 8,
                                              horizon))
    ms = 1e-3
    # starts 1, 2, 3, 5 (parts 1, 2, 3-4, 5-8); "pad" is timed at their ends 1, 2, 4, 8
    plain = {(m, r): (t * ms, 0) for m, ts in (("linear", (20, 40, 40, 45)),
                                               ("weight-first", (30, 30, 50, 50)))
             for r, t in zip((1, 2, 3, 5), ts)}
    pads = lambda t1, t2, t4, t8, prep=0: {("pad", 1): (t1 * ms, prep), ("pad", 2): (t2 * ms, prep),
                                           ("pad", 4): (t4 * ms, prep), ("pad", 8): (t8 * ms, prep)}
    assert plan_from(plain | pads(25, 35, 45, 50)) == "1:linear,2:weight-first,3:linear"
    # packed for 8 at 31 ms: 3-8 rows save 2 × 9 + 4 × 14 ms (3-4 alone packed for 4: 2 × 7); not
    # 2 rows (weight-first: 30 ms)
    # (more rows than the plan's 8, an eval's batch, by the fastest form of 5-8 that needs no copy)
    assert plan_from(plain | pads(25, 35, 33, 31)) == "1:linear,2:weight-first,3:pad,9:linear"
    assert plan_from(plain | pads(25, 35, 33, 25)) == "1:linear,2:pad,9:linear"
    # rows 2-4 packed for 4 save most
    assert plan_from(plain | pads(25, 35, 20, 44)) == "1:linear,2:pad,5:linear"
    # prepared in 2 s once per 64 steps: 31 ms a step more, more than it saves
    assert plan_from(plain | pads(25, 35, 33, 25, prep=2.0)) == "1:linear,2:weight-first,3:linear"
    assert plan_from(plain | pads(25, 35, 33, 25, prep=2.0),
                     horizon=10**6) == "1:linear,2:pad,9:linear"


def test_the_engine_measures_its_plan_once(tiny_model_dir, monkeypatch):
    """auto: the engine times the available forms here, starts its plan at 1 row with row counts
    up to its batch, and a second engine on the same shapes reuses the measurement; a plan given
    is taken as it is."""
    from models import load_model
    model, t = load_model(tiny_model_dir)
    monkeypatch.setattr(decode, "_CHOSEN", {})
    plan = fast_engine(model, t, max_batch=16).fast.plan
    assert plan[0][0] == 1 and all(m in decode.available("cpu") for _, m in plan)
    assert [r for r, _ in plan] == sorted({r for r, _ in plan})
    assert all(r <= 16 for r, _ in plan) and len(decode._CHOSEN) == 1
    calls = []
    monkeypatch.setattr(decode.time, "perf_counter", lambda: calls.append(1) or 0.0)
    assert fast_engine(model, t, max_batch=16).fast.plan == plan and not calls
    assert fast_engine(model, t, matmul="1:linear,4:weight-first").fast.plan == [
        (1, "linear"), (4, "weight-first")]


def test_a_plan_is_measured_once_per_machine(tmp_path, monkeypatch):
    """With a store, a plan measured here is read back by a later process (the same machine, shapes
    and rows) instead of measured again; another machine's environment, row count or a file that
    cannot be read or written is measured past, never an error."""
    measured = []
    monkeypatch.setattr(decode, "measure", lambda *args: measured.append(args[2]) or [
        (1, "linear"), (4, "weight-first")])
    store, weights = str(tmp_path / "plans.json"), ([(None, torch.zeros(4, 4))], torch.zeros(8, 4))

    def plan(rows=8, store=store):
        monkeypatch.setattr(decode, "_CHOSEN", {})   # a new process
        return decode.choose(*weights, rows, store=store)
    assert plan() == [(1, "linear"), (4, "weight-first")] and measured == [8]
    assert plan() == [(1, "linear"), (4, "weight-first")] and measured == [8]   # read back
    plan(16)
    # another kind of CPU, emulated (another than the one this test may already run as)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY",
                       "default" if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2" else "avx2")
    plan()
    with open(store) as f:
        assert measured == [8, 16, 8] and len(json.load(f)) == 3
    with open(store, "w") as f:
        f.write("{not json")
    assert plan() == [(1, "linear"), (4, "weight-first")] and len(measured) == 4
    assert plan(store=str(tmp_path / "plans.json" / "x")) and len(measured) == 5


def test_prepared_weights_last_until_the_weights_change(tiny_model_dir):
    """A form that lays the weights out anew (oneDNN's, where torch has it) does so once per sync:
    the engine keeps its prepared weights between generate calls and drops them at update_weights
    and sleep, so after a sync it samples what an engine made from the new weights samples."""
    from models import load_model
    model, t = load_model(tiny_model_dir)
    form = decode.available("cpu")[-1]
    engine = fast_engine(model, t, matmul=form)
    greedy = lambda e: [[x.completion_ids for x in g]
                        for g in e.generate(prompts(t), n=1, max_new_tokens=6, greedy=True)]
    greedy(engine)
    kept = engine.fast.forms
    greedy(engine)
    assert kept is not None and engine.fast.forms is kept
    moved = load_model(tiny_model_dir)[0]
    with torch.no_grad():
        for p in moved.parameters():
            p.mul_(1.5)
    engine.update_weights(moved.state_dict())
    assert engine.fast.forms is None
    assert greedy(engine) == greedy(fast_engine(moved, t, matmul=form))
    engine.sleep()
    assert engine.fast.forms is None


def test_a_layout_that_costs_more_than_it_saves_is_not_chosen(tiny_model_dir, monkeypatch):
    """choose charges a form's preparation to the decode steps between two syncs (horizon): one
    that takes 10 ms a matrix to prepare loses at a horizon of 1 step."""
    from models import load_model
    model, t = load_model(tiny_model_dir)
    slow = (lambda w, rows: time.sleep(0.01) or w, decode.linear)
    monkeypatch.setattr(decode, "MATMULS", {**decode.MATMULS, "slow-layout": slow})
    monkeypatch.setattr(decode, "_CHOSEN", {})
    plan = decode.choose(decode.fuse(model, views=False), model.lm_head.weight.detach(), 16,
                         horizon=1)
    assert "slow-layout" not in {m for _, m in plan}


def test_a_form_this_cpu_cannot_prepare_in_the_dtype_is_left_out(tiny_model_dir, monkeypatch):
    """oneDNN's bf16 layout needs AVX-512 or AVX-NE-CONVERT (an AVX2 CPU raises): such a form is
    not offered, measured or accepted as a plan in that dtype, and the engine starts with the
    others."""
    from models import load_model
    model, t = load_model(tiny_model_dir)

    def fp32_only(w, rows):
        if w.dtype != torch.float32:
            raise RuntimeError("no bf16 path on this cpu")
        return w
    monkeypatch.setattr(decode, "MATMULS", {**decode.MATMULS, "fp32-only": (fp32_only,
                                                                             decode.linear)})
    monkeypatch.setattr(decode, "_CHOSEN", {})
    assert "fp32-only" in decode.available("cpu", torch.float32)
    assert "fp32-only" not in decode.available("cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="not a matmul"):
        decode.parse_plan("fp32-only", "cpu", torch.bfloat16)
    engine = fast_engine(model, t, dtype=torch.bfloat16)
    assert "fp32-only" not in {m for _, m in engine.fast.plan}
    assert len(engine.generate(prompts(t), n=2, max_new_tokens=3, keys=[1, 2, 3])[0]) == 2


@pytest.mark.parametrize("text, why", [("cublas", "not a matmul"), ("4:linear", "start at 1"),
                                       ("1:linear,x:weight-first", "positive integer"),
                                       ("1:linear,8:linear,4:weight-first", "increase")])
def test_a_bad_plan_is_refused(text, why, capsys):
    """By decode.parse_plan, and by the flag before anything loads, naming it."""
    with pytest.raises(ValueError, match=why):
        decode.parse_plan(text, "cpu")
    from train import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--decode-matmul", text])
    assert "--decode-matmul" in capsys.readouterr().err


def test_bf16_logits_are_as_close_to_fp32_as_the_hf_forwards(tok):
    """In bf16 (on a CPU decode.py's cache and attention stay fp32): its logits are no further from
    the fp32 HF forward's than the bf16 HF forward's are, up to rounding noise, on the same
    tokens."""
    model, feed = make_model(tok).eval(), [5, 40, 41, 7, 100, 3]
    exact, _ = decoders(model, tok, max_new=8, feed=feed)
    hf, ours = decoders(model.to(torch.bfloat16), tok, max_new=8, feed=feed)
    err_hf, err_ours = ((x.float() - exact).abs().mean().item() for x in (hf, ours))
    assert 0 < err_hf and err_ours <= 1.5 * err_hf + 1e-4, (err_ours, err_hf)


def test_rows_leave_the_static_cache(tok):
    """Rows 1 and 2 of 4 finish at step 2: the last row moves into the hole, and every remaining
    row's logits stay equal to the HF decoder's, which drops rows by copying its whole cache."""
    hf, ours = decoders(make_model(tok).eval(), tok, max_new=8, drop_at=2)
    assert torch.isnan(ours[-1, 1]).all() and torch.isnan(
        ours[-1, 2]).all() and not torch.isnan(ours[-1, 3]).any()
    assert torch.allclose(hf.nan_to_num(), ours.nan_to_num(), atol=1e-5)


@pytest.mark.parametrize("greedy", [False, True])
def test_engine_samples_what_the_hf_forward_samples(tiny_model_dir, greedy):
    """The fast engine's agreement with the plain one: same weights and draws (common random
    numbers), fp32, the two decode steps give the same responses, log-probs and entropies (to
    1e-4), with rows stopping whenever they emit an end token."""
    from models import load_model
    model, t = load_model(tiny_model_dir)
    ps = prompts(t)
    got = {}
    for fast in (False, True):
        engine = (fast_engine if fast else HFEngine)(model, t)
        assert (engine.fast is not None) == fast
        # more end tokens: rows stop at different steps
        engine.stop_ids |= {int(i) for i in torch.arange(40, 60)}
        got[fast] = [
            x for g in engine.generate(ps, n=4, temperature=0.9, max_new_tokens=12, greedy=greedy,
                                       keys=[3, 4, 5]) for x in g]
    for a, b in zip(got[False], got[True]):
        assert a.completion_ids == b.completion_ids and a.finish_reason == b.finish_reason
        assert a.logps == pytest.approx(b.logps, abs=1e-4) and a.entropy == pytest.approx(
            b.entropy, abs=1e-4)


def test_sync_reaches_the_fused_weights(tiny_model_dir):
    """The engine's q/k/v and gate/up weights are views of the fused matrices (no second copy), so
    update_weights, by state dict or parameter by parameter, changes what decode.py reads."""
    from models import load_model
    model, t = load_model(tiny_model_dir)
    engine = fast_engine(model, t)
    layer, (_, qkv, _, _, _, gate_up, _) = engine.model.model.layers[0], engine.fast.layers[0]
    assert layer.self_attn.k_proj.weight.data_ptr() == qkv[layer.self_attn.q_proj.weight.
                                                           shape[0]:].data_ptr()
    moved = load_model(tiny_model_dir)[0]
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.1)
    for state in (moved.state_dict(), moved.named_parameters()):
        engine.update_weights(state if isinstance(state, dict) else list(state))
        m = moved.model.layers[0]
        assert torch.equal(
            qkv,
            torch.cat(
                [m.self_attn.q_proj.weight, m.self_attn.k_proj.weight, m.self_attn.v_proj.weight]))
        assert torch.equal(gate_up, torch.cat([m.mlp.gate_proj.weight, m.mlp.up_proj.weight]))


@pytest.mark.parametrize("fast", [True, False])
def test_sleep_frees_the_copy_and_the_sync_brings_it_back(tiny_model_dir, fast):
    """HFEngine.sleep frees its private copy's weights (the fused matrices once, the rest each
    once); update_weights, by state dict or parameter by parameter, brings them back, and the engine
    then samples exactly what an engine that never slept samples. Generating while asleep is an
    error."""
    from models import load_model
    model, t = load_model(tiny_model_dir)
    make = fast_engine if fast else HFEngine
    awake, slept = make(model, t), make(model, t)
    weights = lambda e: sum(p.untyped_storage().nbytes() for p in
                            {p.untyped_storage().data_ptr(): p
                             for p in e.model.parameters()}.values())
    full = weights(slept)
    assert full >= sum(p.numel() * p.element_size() for p in model.parameters())
    for state in (model.state_dict(), model.named_parameters()):
        slept.sleep()
        assert weights(slept) == 0
        with pytest.raises(RuntimeError, match="asleep"):
            slept.generate(prompts(t), n=1, max_new_tokens=2)
        slept.update_weights(state if isinstance(state, dict) else list(state))
        assert weights(slept) == full
        for a, b in zip(*(e.generate(prompts(t), n=2, max_new_tokens=5, keys=[1, 2, 3])
                          for e in (awake, slept))):
            assert [x.completion_ids for x in a] == [x.completion_ids for x in b]
            assert [x.logps for x in a] == [x.logps for x in b]


def test_a_shared_policy_is_left_as_it_is(tiny_model_dir):
    """share=True (online, the policy samples itself): the fused weights are copies made per
    generate call; the policy's parameters (which an optimizer holds) stay the same tensors."""
    from models import load_model
    model, t = load_model(tiny_model_dir)
    before = [p for p in model.parameters()]
    engine = fast_engine(model, t, share=True)
    assert engine.fast.layers is None
    engine.generate(prompts(t), n=2, max_new_tokens=4, keys=[1, 2, 3])
    engine.sleep()   # the policy's weights are not the engine's to free
    assert all(a is b for a, b in zip(before, model.parameters())) and not engine.asleep
    assert all(p.untyped_storage().nbytes() > 0 for p in model.parameters())


def test_other_architectures_keep_the_hf_forward(tok):
    """A feature decode.py does not implement (here MLP biases) leaves the model untouched and the
    engine on the HF forward."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, mlp_bias=True,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    engine = fast_engine(model, tok, own=True)
    assert engine.fast is None
    assert len(engine.generate(prompts(tok), n=2, max_new_tokens=3, keys=[1, 2, 3])[0]) == 2
