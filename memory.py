r"""
Memory per process of a train.py run, planned from the model's config alone: the model is built
on the meta device (no weights, nothing downloaded but config.json), its parameters counted, and
every buffer sized from train.py's flags and the number of processes. Takes train.py's flags:

    python memory.py --nproc 8 --gpu-gb 80 --model meta-llama/Llama-3.1-8B-Instruct \
        --group-size 8 --batch-prompts 64 --micro-groups 2 --max-new-tokens 1024
          --grad-checkpointing

What a process holds (P parameters, W processes; per process):
  resident   πθ in fp32, its gradient and AdamW's two moments, sharded by FSDP: (4 + 4 + 8)·P/W;
             πref in fp32, sharded: 4·P/W (when the loss uses it); the chat judge's whole fp32
             copy; the runtime (on CPU the process after its imports, measured; on CUDA 1 GiB for
             the context).
  training   one micro-batch's forward and backward (train.loss_and_backward): the activations a
             decoder layer keeps for backward (activation_bytes), or with --grad-checkpointing each
             layer's input plus one layer recomputed; the response tokens' logits and their
             gradient in the compute dtype plus one fp32 chunk (models.token_logps); under FSDP the
             gathered root (embeddings, head) and two decoder layers, with their unreduced fp32
             gradients; on a CPU with bf16 autocast, autocast's bf16 copy of every weight.
  rollout    the HF engine's whole copy of the weights in the rollout dtype (freed while πθ trains:
             rollout.HFEngine.sleep) and its KV cache for --gen-batch rows of prompt +
             --max-new-tokens; or vLLM's --vllm-memory share of the GPU (weights, KV cache), asleep
             (on the host) while πθ trains.
The plan's peak is resident + max(training, rollout): the two phases do not overlap in time.
It is a planning figure (an upper bound where a pair-less prompt leaves a micro-batch short),
checked against the measured per-process peak on CPU (experiments/memory-cpu.md); train.py prints it
at the start and logs the measured peak as `peak_gb` every step.
"""
import argparse
import math
import os
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import flags
from losses import pairwise, uses_reference
from host import console, rss_bytes
from models import CHUNK_LOGITS, DEFAULT_MODEL, default_source, resolve_dtype

GB = 1e9
CUDA_CONTEXT = 2 ** 30   # the CUDA context and NCCL's buffers: outside PyTorch's allocator


def model_config(name):
    """The model's config without its weights: a hub id or a folder with config.json, or the
    default's (its cached copy's, or the GGUF's metadata: models.default_source)."""
    try:
        name, kw = default_source() if name == DEFAULT_MODEL else (name, {})
        return AutoConfig.from_pretrained(name, **kw)
    except (OSError, ValueError, AttributeError) as e:
        sys.exit(f"--model {name}: no config.json to plan from "
                 f"({e.__class__.__name__}: {str(e)[:200]})")


def shape_of(config):
    """The model built on the meta device: total parameters P (tied embeddings once), the largest
    decoder layer's, the rest (embeddings, head, final norm: FSDP's root), and the sizes the
    activations depend on. Any causal LM whose decoder layers form one ModuleList."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
    total = sum(p.numel() for p in model.parameters())
    in_layers = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    h = config.hidden_size
    return {
        "params": total, "layer": max(in_layers), "root": total - sum(in_layers),
        "layers": len(layers), "hidden": h, "inter": getattr(config, "intermediate_size", None)
                                                     or getattr(config, "n_inner", None) or 4 * h,
        "vocab": config.vocab_size, "kv": kv_width(config)}


def kv_width(config):
    """Width of one layer's keys (and of its values) per token: key/value heads x head dim
    (grouped-query attention has fewer key/value heads than query heads)."""
    heads = config.num_attention_heads
    return (getattr(config, "num_key_value_heads", None) or
            heads) * (getattr(config, "head_dim", None) or config.hidden_size // heads)


def activation_bytes(shape, b, autocast=False):
    """Bytes one decoder layer keeps for backward per token, Llama-style with a fused attention
    kernel (no T x T scores kept), b bytes per element of the compute dtype: the two norms' outputs,
    q, k, v, the attention output and o_proj's input, and the MLP's gate, up, activation and
    product,
    (7h + 2kv + 4I)·b; plus the norms' fp32 inputs, 8h, or under a CPU's bf16 autocast (an fp32
    residual stream) 24h. Within ~10 % of what a real forward saves (tests/test_memory.py)."""
    h, kv, inter = shape["hidden"], shape["kv"], shape["inter"]
    return b * (7 * h + 2 * kv + 4 * inter) + (24 if autocast else 8) * h


def plan(shape, a, world, prompt_tokens, gpu_bytes=None, runtime=None, s=None):
    """Bytes per process by (phase, what), for train.py's parsed flags `a` on `world` processes,
    prompts of up to `prompt_tokens` tokens. gpu_bytes: the GPU's memory (vLLM takes a share).
    s: the run's steps between syncs (default --sync-every; 'epoch' is then taken as --steps)."""
    s = a.sync_every if s is None else s
    P, L, V, h = shape["params"], shape["layers"], shape["vocab"], shape["hidden"]
    cuda = a.device.startswith("cuda")
    b = 2 if a.train_dtype == "bfloat16" else 4        # compute dtype of the training passes
    # gathered parameters: FSDP bf16 on CUDA, else fp32 (CPU autocast)
    bp = 2 if cuda and b == 2 else 4
    br = 2 if a.rollout_dtype == "bfloat16" else 4
    s = min(a.steps if s == "epoch" else s, a.steps)   # epoch: at most the run
    # None: CUDA's context, or a CPU whose OS does not tell a process's memory (host.rss_bytes)
    known = runtime is not None or cuda
    runtime = runtime if runtime is not None else CUDA_CONTEXT if cuda else 0.4 * GB
    out = {("resident", "πθ (fp32, 1/W)"): 4 * P / world,
           ("resident", "its gradient (1/W)"): 4 * P / world,
           ("resident", "AdamW moments (1/W)"): 8 * P / world,
           ("resident", "runtime" if known else "runtime (not measured here: an estimate)"):
               runtime}
    if uses_reference(a):
        out["resident", "πref (fp32, 1/W)"] = 4 * P / world
    if a.task != "math" and not a.reward_model:
        out["resident", "chat judge (whole, fp32)"] = 4 * P
    # training: one micro-batch of m units of k responses (pairs: 2), prompts once per unit unless
    # checkpointing
    k = 2 if pairwise(a) else a.n
    m = min(a.micro_groups, math.ceil(a.batch_prompts / world))
    responses = m * k * a.max_new_tokens
    tokens = responses + m * prompt_tokens * (k if a.grad_checkpointing else 1)
    act = activation_bytes(shape, b, autocast=not cuda and b == 2)
    if a.grad_checkpointing:
        out["training", f"layer inputs ({tokens} tokens) + 1 layer"] = tokens * (L * h * bp + act)
    else:
        out["training", f"activations ({tokens} tokens x {L} layers)"] = tokens * L * act
    chunk = CHUNK_LOGITS["cuda" if cuda else "cpu"] * 4   # models.token_logps' fp32 working set
    out["training", "logits + gradient + fp32 chunk"] = 2 * responses * V * b + 2 * chunk
    if world > 1:
        out["training",
            "FSDP gathers (root + 2 layers)"] = (shape["root"] + 2 * shape["layer"]) * (bp + 4)
    if not cuda and b == 2:
        out["training", "autocast bf16 weight copies"] = 2 * P
    # rollout
    if a.engine == "vllm" and cuda:
        out["rollout",
            f"vLLM ({a.vllm_memory:g} of the GPU)"] = a.vllm_memory * (gpu_bytes or 80 * GB)
    elif a.engine == "vllm":
        out["resident", "vLLM weights + VLLM_CPU_KVCACHE_SPACE"] = br * P + float(
            os.environ.get("VLLM_CPU_KVCACHE_SPACE", 1)) * 2**30
    else:
        # at s = 1 on one fp32 process the engine samples πθ itself
        if not (s == 1 and world == 1 and br == 4):
            out["rollout", "rollout engine copy (whole)"] = br * P
        forms = [p.split(":")[-1] for p in getattr(a, "decode_matmul", "").split(",")]
        if "onednn" in forms:   # a plan with it: decode.onednn_pack
            out["rollout", "oneDNN's layout of the matrices"] = br * P
        if "mkl" in forms:   # decode.mkl_pack, once per part of the plan that has it
            out["rollout", "MKL's packed matrices"] = forms.count("mkl") * br * P
        rows = min(a.gen_batch, math.ceil(a.batch_prompts / world) * a.n * s)
        kv_bytes = br if cuda else 4   # decode.py keeps a CPU cache in fp32 whatever the weights
        out["rollout",
            f"KV cache ({rows} rows)"] = rows * (prompt_tokens +
                                                 a.max_new_tokens) * L * 2 * shape["kv"] * kv_bytes
    if cuda:   # the host's RAM, not the GPU's: not in the peak
        out["host", "rank 0 reads the weights (fp32, while loading)"] = 4 * P
        if a.engine == "vllm":
            out["host", "vLLM's weights while asleep"] = br * P
    return out


def peak(p):
    """resident + the larger of the two phases."""
    phase = lambda name: sum(v for (ph, _), v in p.items() if ph == name)
    return phase("resident") + max(phase("training"), phase("rollout"))


def describe(p, shape, world, device, gpu_bytes=None):
    """The plan as a table of GB per process."""
    lines = [
        f"memory plan per process: {shape['params'] / 1e9:.3g}B "
        f"parameters, {world} process(es), {device}"]
    for (phase, what), v in sorted(
            p.items(), key=lambda kv: ("resident", "training", "rollout", "host").index(kv[0][0])):
        lines.append(f"  {phase:9s} {what:42s} {v / GB:7.2f} GB")
    total = peak(p)
    lines.append(f"  peak = resident + max(training, "
                 f"rollout): {total / GB:.2f} GB" +
                 (" (host RAM not included)" if any(ph == "host" for ph, _ in p) else ""))
    if gpu_bytes:
        lines.append(f"  {'fits' if total <= gpu_bytes else 'does NOT fit'} "
                     f"in {gpu_bytes / GB:.0f} GB" +
                     ("" if total <= gpu_bytes else ": --micro-groups 1, --grad-checkpointing, "
                      "a smaller --vllm-memory or more processes"))
    return "\n".join(lines)


def for_run(config, a, world, prompt_tokens, runtime, s):
    """train.py's plan for its own run, as text (the GPU's size read from the device)."""
    cuda = a.device.startswith("cuda")
    gpu = torch.cuda.get_device_properties(a.device).total_memory if cuda else None
    try:
        shape = shape_of(config)
    # an architecture the plan does not understand: say so, never stop the run for it
    except Exception as e:
        return (f"memory plan: not available for {type(config).__name__} "
                f"({e.__class__.__name__}: {str(e)[:120]})")
    text = describe(plan(shape, a, world, prompt_tokens, gpu, None if cuda else runtime, s), shape,
                    world, a.device, gpu)
    if not cuda and world == 1:   # a term the config cannot size: named, measured where it was
        text += ("\n  not planned: the freed blocks the C allocator keeps for reuse (heap.py), "
                 "fragments\n  between blocks of other sizes; measured in "
                 "experiments/memory-growth")
    return text


def peak_bytes(device):
    """The measured peak of this process: PyTorch's reserved CUDA memory (vLLM's pool excluded), or
    the peak RSS on CPU (None where the OS does not tell it: host.rss_bytes)."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_reserved()
    return rss_bytes(peak=True)


def main(argv=None):
    console()   # a console in any code page prints the plan (π, θ)
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=1,
                   help="processes (GPUs), as torchrun --nproc_per_node")
    p.add_argument("--gpu-gb", type=float, default=None, help="plan for CUDA GPUs of this many "
                   "GB (default: a CPU run here)")
    p.add_argument("--prompt-tokens", type=int, default=256, help="the longest prompt, in tokens")
    mine, rest = p.parse_known_args(argv)
    if mine.nproc < 1 or mine.prompt_tokens < 1:
        p.error("--nproc and --prompt-tokens must be positive")
    a = flags.parse(rest + ["--device", "cpu"], None)   # train.py's own checks, on any machine
    if mine.gpu_gb:   # what train.py resolves "auto" to on CUDA (where vLLM is assumed installed)
        given = lambda flag: any(x == flag or x.startswith(flag + "=") for x in rest)   # noqa: E731
        a.device = "cuda"
        a.train_dtype = a.train_dtype if given("--train-dtype") else resolve_dtype("auto", "cuda")
        a.rollout_dtype = a.rollout_dtype if given("--rollout-dtype") else resolve_dtype(
            "auto", "cuda")
        if not given("--engine") and (a.init_from or a.model) != DEFAULT_MODEL:
            a.engine = "vllm"
    shape = shape_of(model_config(a.init_from or a.model))
    gpu = mine.gpu_gb and mine.gpu_gb * GB
    result = plan(shape, a, mine.nproc, mine.prompt_tokens, gpu,
                  None if mine.gpu_gb else rss_bytes())
    print(describe(result, shape, mine.nproc, a.device, gpu))
    return result, shape


if __name__ == "__main__":
    main()
