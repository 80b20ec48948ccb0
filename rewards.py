"""
Rewards. The paper's verifiable task scores a response 1 if its final answer matches the
reference under Math-Verify, else 0 (§3, NuminaMath). Math-Verify extracts the answer the way
its defaults do: the last \\boxed{...} first, else the last LaTeX or plain expression.

Grading symbolic answers can explode (sympy deciding whether 9^{9^{9^{...}}} is an integer
spends hours inside one C-level integer power, where no signal handler ever runs, so
Math-Verify's own SIGALRM timeouts cannot stop it). Grading therefore runs in a child process
(`python rewards.py --grader`) with a hard wall-clock budget per response: one that runs out
scores 0, is counted, and the child is killed and replaced by a warm spare (already started), so
no response can stall a step and a timeout costs the limit, not a restart too. The budget is a
wait on a queue that a thread fills from the child's output: the same on every OS (select() on a
pipe is POSIX only).
We never eval or sympify raw text ourselves; all parsing goes through Math-Verify.

The non-verifiable task scores (prompt, response) with a reward model: any Hugging Face
sequence-classification RM (`reward_model`), or, on a CPU with nothing to download, a small
local LLM judge (`llm_judge`), a weak stand-in. `make_scalar_reward` picks one.
"""
import itertools
import json
import logging
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading

import torch
from math_verify import parse, verify

logging.getLogger("math_verify").setLevel(logging.ERROR)
TIME_LIMIT_S = 2.0      # per response, parsing + verification together
stats = {"graded": 0, "timeouts": 0, "errors": 0}
_grader, _spare, _grader_lock = None, None, threading.Lock()   # the grader, its warm spare


# A number as written: 12, -0.5, 1,234, 6.72 \times 10^{-5}, 10^{6}, 1011_2 (a base), 3:5 (a ratio);
# or a fraction in lowest terms, proper after a whole part: \frac{1}{2}, \frac{-7}{23}, 3/4,
# 2\frac{1}{2}
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)((\\times|\\cdot)10\^(\{[-+]?\d+\}|\d))?(_\{?\d+\}?)?"
                     r"|10\^(\{[-+]?\d+\}|\d)|\d+:\d+")
_FRACTION = re.compile(r"[-+]?(\d+)?(\\frac\{([-+]?\d+)\}\{(\d+)\}|\\frac(\d)(\d)|(\d+)/(\d+))")
_DROP = re.compile(r"\\[,!;: ]|\\%|%|\\\$|\$|\s|\\left|\\right|\^\{?\\circ\}?|(?<=\d),(?=\d{3})")


def written_as_number(side: str) -> bool:
    """Whether one side of an answer is a number as written (the forms above), its text/bold
    wrappers, units (words, %, $, degrees), spacing and thousands commas aside."""
    side = re.sub(r"\\(?:text|textbf|mathbf|mathrm)\{([^{}]*)\}", lambda m: m[1]
                  if re.search(r"\d", m[1]) else "", side)
    side = _DROP.sub("", side.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")).rstrip(".")
    while side.startswith("(") and side.endswith(")"):
        side = side[1:-1]
    if _NUMBER.fullmatch(side):
        return True
    f = _FRACTION.fullmatch(side)
    if not f:
        return False
    num, den = (abs(int(x)) for x in next((f[i], f[i + 1]) for i in (3, 5, 7) if f[i] is not None))
    return den > 1 and math.gcd(num, den) == 1 and (f[1] is None or num < den)


def grade(response: str, answer: str) -> float:
    """1.0 if the final answer of `response` equals `answer` (a LaTeX string) under Math-Verify,
    else 0.0. A number as the reference must be answered with a number as written, alone or as one
    side of an equation (`x = 7`, `799 = 47 \\times 17`): Math-Verify also accepts an unevaluated
    expression equal to it, \\boxed{47 \\times 17} or \\boxed{100/10}, which on the built-in
    arithmetic is the question copied into the box, and RL learns that instead of the arithmetic.
    No time limit: call `math_reward`, which runs this in the grader process."""
    gold = parse(f"${answer}$", parsing_timeout=None) or parse(answer, parsing_timeout=None)
    pred = parse(response, parsing_timeout=None)
    if not (gold and pred):
        return 0.0
    if written_as_number(answer):
        # Math-Verify's extracted text
        written = pred[-1] if isinstance(pred[-1], str) else str(pred[0])
        if not any(written_as_number(side) for side in re.split(r"=|\\approx", written)):
            return 0.0
    return float(bool(verify(gold, pred, timeout_seconds=None)))


def _grader_main():
    """The grader process: one JSON [response, answer] per line in, one JSON result per line out."""
    # Ctrl-C is the parent's; we end when stdin closes
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the first parse imports and builds Math-Verify's parsers: off the clock
    grade("\\boxed{1}", "1")
    try:
        print('"ready"', flush=True)
        for line in sys.stdin:
            try:
                out = grade(*json.loads(line))
            # a line grade() cannot take (Math-Verify itself returns [] on odd input): scored 0,
            # counted
            except Exception as e:
                out = f"{e.__class__.__name__}: {e}"
            print(json.dumps(out), flush=True)
    except BrokenPipeError:   # the parent left without reading (a short script): end quietly
        # Python's exit flush must not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _spawn_grader():
    """A grader process, started but not waited for: it imports Math-Verify (~1 s) in the
    background. Its output lines arrive in p.lines (a queue; "" when it ends)."""
    p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--grader"], text=True,
                         encoding="utf-8", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8"))
    p.lines = queue.Queue()
    threading.Thread(target=_read_lines, args=(p.stdout, p.lines), daemon=True).start()
    return p


def _read_lines(stream, lines):
    """Each line of stream into the queue, then "" (the end), however the process ended."""
    try:
        for line in stream:
            lines.put(line)
    except (OSError, ValueError):   # the pipe closed under us (the process was killed)
        pass
    lines.put("")


def _ready(p):
    """Wait until grader `p` has imported Math-Verify; returns it."""
    if p.lines.get().strip() != '"ready"':
        raise RuntimeError(f"the Math-Verify grader process ({sys.executable} "
                           f"{__file__} --grader) failed to start")
    return p


def _next_grader():
    """The warm spare becomes the grader and a new spare starts importing, so a response after a
    timeout (or a dead grader) waits for no restart: a timeout costs its limit, not limit + ~1 s."""
    global _spare
    p = _ready(_spare) if _spare is not None and _spare.poll() is None else _ready(_spawn_grader())
    _spare = _spawn_grader()
    return p


def math_reward(response: str, answer: str, time_limit: float | None = None) -> float:
    """`grade(response, answer)` with a hard wall-clock limit (default TIME_LIMIT_S): 0.0 when it
    runs out."""
    global _grader
    with _grader_lock:
        stats["graded"] += 1
        if _grader is None or _grader.poll() is not None:
            _grader = _next_grader()
        try:
            _grader.stdin.write(json.dumps([response, answer]) + "\n")
            _grader.stdin.flush()
            line = _grader.lines.get(timeout=time_limit or TIME_LIMIT_S)
        except queue.Empty:
            _grader.kill()          # the only way out of a C-level computation
            _grader.wait()
            _grader = _next_grader()
            stats["timeouts"] += 1
            return 0.0
        except OSError:   # the grader had died: its pipe is closed
            line = ""
        out = json.loads(line) if line else "grader process died"
        if isinstance(out, float):
            return out
        stats["errors"] += 1
        return 0.0


def score(rows, samples, chat_reward, length_penalty=0.0, cut="grade"):
    """Rewards of responses, routed by each row's task: math -> Math-Verify 0/1, chat -> the
    scalar reward (RM or judge) minus an optional length penalty. Sets sample.reward.
    cut="fail": a math response cut at the length cap scores 0, ungraded (train.py's default)."""
    for r, x in zip(rows, samples):
        if r["task"] == "math":
            cut_off = cut == "fail" and x.finish_reason == "length"
            x.reward = 0.0 if cut_off else math_reward(x.text, r["answer"])
    chat = [(r, x) for r, x in zip(rows, samples) if r["task"] == "chat"]
    if chat:
        try:
            scores = chat_reward([r["prompt"] for r, _ in chat], [x.text for _, x in chat])
        # a failing reward model costs this batch's chat prompts, not the run
        except Exception as e:
            print(f"reward model raised {e.__class__.__name__}: "
                  f"{e}; {len(chat)} responses scored NaN (skipped)")
            scores = [math.nan] * len(chat)
        for (_, x), v in zip(chat, scores):
            x.reward = float(v) - length_penalty * len(x.completion_ids) if math.isfinite(
                v) else math.nan


# -----------------------------------------------------------------------------
# Non-verifiable rewards (§3, WildChat + Athene-RM-8B): a scalar score per (prompt, response).

JUDGE_TEMPLATE = ("Rate the response to the instruction below "
                  "on a scale of 1 to 5 for helpfulness, "
                  "correctness and clarity (1 = useless, 5 = "
                  "excellent).\n\n### Instruction\n{prompt}\n\n"
                  "### Response\n{response}\n\nAnswer with a single digit from 1 to 5.")


def judge_score(digit_logits):
    """Expected rating E[k] = Σ_k k · softmax(z)_k over the logits z of the tokens "1".."5"
    (Self-Rewarding LMs read the rating off the judge's next-token distribution): [B, 5] -> [B]."""
    p = torch.softmax(digit_logits.float(), dim=-1)
    return (p * torch.arange(1, p.shape[-1] + 1, dtype=p.dtype, device=p.device)).sum(-1)


def _batched(fn, items, batch_size):
    out = []
    for i in range(0, len(items), batch_size):
        out.extend(fn(items[i:i + batch_size]))
    return out


def llm_judge(model, tok, batch_size=8, max_response_tokens=384):
    """A weak stand-in for a reward model that needs no download: a local chat LM (by default
    the policy's own seed model) asked to rate the response 1-5, scored from the log-probs of
    the rating tokens. It is far noisier and more length-biased than a trained RM."""
    digits = [tok.convert_tokens_to_ids(str(k)) for k in range(1, 6)]
    if any(d is None or d == tok.unk_token_id for d in digits):
        raise ValueError("judge tokenizer has no single tokens for the digits 1-5")
    from models import chat_prompt_ids
    dev = next(model.parameters()).device

    @torch.inference_mode()
    def score(pairs):
        ids = []
        for prompt, response in pairs:
            cut = tok.decode(
                tok(response, add_special_tokens=False)["input_ids"][:max_response_tokens])
            ids.append(
                chat_prompt_ids(tok, JUDGE_TEMPLATE.format(prompt=prompt[:2000], response=cut)))
        width = max(map(len, ids))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        x = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=dev)
        attn = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=dev)
        logits = model(
            input_ids=x,
            attention_mask=attn,
            position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
            logits_to_keep=1).logits[:, -1]   # the rating's position only: the LM head once a row
        return judge_score(logits[:, digits]).tolist()

    return lambda prompts, responses: _batched(score, list(zip(prompts, responses)), batch_size)


def reward_model(name, device=None, batch_size=8, max_length=4096, trust_remote_code=False):
    """A Hugging Face sequence-classification reward model (e.g. Skywork-Reward-Llama-3.1-8B):
    the conversation [user: prompt, assistant: response] through its chat template, logit 0 as
    the reward. bf16 on GPU. One that ships its own modeling code (Athene-RM-8B, the paper's RM)
    loads only with trust_remote_code (--trust-remote-code: that code runs here); whether its
    logit 0 is its score is for its card to say (never run here)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    kw = {"trust_remote_code": True} if trust_remote_code else {}
    tok = AutoTokenizer.from_pretrained(name, **kw)
    model = AutoModelForSequenceClassification.from_pretrained(name, dtype=dtype, **kw).to(
        device).eval()

    @torch.inference_mode()
    def score(pairs):
        """The RM reads its score at the rightmost token that is not padding. Each conversation
        keeps its last max_length tokens (the end-of-turn token included) and is padded with an id
        that no conversation of the batch ends with (pad = eos would make a final end-of-turn look
        like padding)."""
        ids = [
            tok(
                tok.apply_chat_template(
                    [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                    tokenize=False), add_special_tokens=False)["input_ids"][-max_length:]
            for p, r in pairs]
        ends = {x[-1] for x in ids}
        pad = next(t for t in itertools.chain([tok.pad_token_id], range(len(tok)))
                   if t is not None and t not in ends)
        model.config.pad_token_id = model.config.get_text_config().pad_token_id = pad
        width = max(map(len, ids))
        x = torch.tensor([i + [pad] * (width - len(i)) for i in ids], device=device)
        attn = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids], device=device)
        return model(input_ids=x, attention_mask=attn).logits[:, 0].float().tolist()

    return lambda prompts, responses: _batched(score, list(zip(prompts, responses)), batch_size)


def make_scalar_reward(name=None, judge=None, device=None, trust_remote_code=False):
    """prompts, responses -> list of float rewards: `name` an RM id/path (reward_model), else an
    LLM judge (`judge` = (model, tokenizer), by default the seed model SmolLM2-135M-Instruct)."""
    if name:
        return reward_model(name, device, trust_remote_code=trust_remote_code)
    if judge is None:
        from models import DEFAULT_MODEL, load_model
        judge = load_model(DEFAULT_MODEL, device or "cpu")
    return llm_judge(*judge)


if __name__ == "__main__" and sys.argv[1:] == ["--grader"]:
    _grader_main()
