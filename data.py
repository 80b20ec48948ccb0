"""
Training and evaluation problems: the built-in arithmetic task and JSON Lines files.

Every math row is {"problem": str, "answer": str} (extra fields such as "id" are kept); chat
rows are {"prompt": str}. A bad file fails with the file, line and field named.
"""
import json
import os
import random

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
PROMPT_SUFFIX = " Put your final answer in \\boxed{}."

_WORD = [
    "{name} has {a} apples and buys {b} more. How many apples does {name} have now?",
    "A box holds {a} pens. {name} adds {b} pens. How many pens are in the box?",
    "{name} walked {a} meters in the morning and {b} "
    "meters in the evening. How many meters in total?",
]
_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana"]


def arithmetic_problems(num, difficulty=2, seed=0):
    """The built-in verifiable task: procedurally generated sums and word problems.

    difficulty d: operands go up to 10·d; d >= 5 also mixes in a third, subtracted term; d >= 20
    makes a third of the problems products a × b (a two-digit, b up to d / 2): a harder task, where
    a 135M model's arithmetic limits it (experiments/s-curve/probes.md). Problems are a pure
    function of (num, difficulty, seed), so splits are reproducible.
    """
    rng = random.Random(f"arith-{difficulty}-{seed}")
    hi = 10 * difficulty
    rows = []
    for i in range(num):
        a, b = rng.randint(2, hi), rng.randint(2, hi)
        if difficulty >= 20 and rng.random() < 1 / 3:
            a, b = rng.randint(11, 99), rng.randint(2, difficulty // 2)
            problem, answer = f"What is {a} × {b}?", a * b
        elif difficulty >= 5 and rng.random() < 0.5:
            c = rng.randint(2, hi // 10 + 2)
            problem, answer = f"What is {a} + {b} - {c}?", a + b - c
        elif rng.random() < 0.5:
            problem, answer = f"What is {a} + {b}?", a + b
        else:
            problem, answer = rng.choice(_WORD).format(name=rng.choice(_NAMES), a=a, b=b), a + b
        rows.append({"id": f"arith-d{difficulty}-s{seed}-{i}", "problem": problem + PROMPT_SUFFIX,
                     "answer": str(answer), "task": "math"})
    return rows


def math_prompt(problem):
    """The prompt x for a math problem: the problem, asked to box its final answer."""
    return problem if "\\boxed" in problem else problem + PROMPT_SUFFIX


def row_prompt(row):
    return row["prompt"] if row["task"] == "chat" else math_prompt(row["problem"])


def split_task(task, train_data, difficulty, eval_problems, seed, data_dir=DATA_DIR,
               eval_data=None):
    """(train rows, held-out rows) for --task math | chat | mix. With --train-data the file's
    rows (math and/or chat) are shuffled and the first `eval_problems` held out; otherwise math
    is the built-in arithmetic (held-out problems excluded from training) and chat the shipped
    chat_train.jsonl prompts; mix holds out `eval_problems` of each. With eval_data the held-out
    rows are that file's instead, and training rows with the same prompt are dropped."""
    if eval_data:
        heldout = load_jsonl(eval_data, fields=None)
        seen = {row_prompt(h) for h in heldout}
        return [
            r for r in split_task(task, train_data, difficulty, 0, seed, data_dir)[0]
            if row_prompt(r) not in seen
        ], heldout
    if train_data:
        rows = load_jsonl(train_data, fields=None)
        random.Random(seed).shuffle(rows)
        return rows[eval_problems:], rows[:eval_problems]
    train, heldout = [], []
    if task in ("math", "mix"):
        held = arithmetic_problems(eval_problems, difficulty, seed=10_000 + seed)
        seen = {r["problem"] for r in held}
        train += [
            r for r in arithmetic_problems(4000, difficulty, seed=seed) if r["problem"] not in seen]
        heldout += held
    if task in ("chat", "mix"):
        rows = load_jsonl(f"{data_dir}/chat_train.jsonl", fields=("prompt",))
        random.Random(seed).shuffle(rows)
        train += rows[eval_problems:]
        heldout += rows[:eval_problems]
    return train, heldout



def epoch_steps(rows, per_step):
    """Optimizer steps in one pass over `rows` at `per_step` prompts a step (s = epoch syncs this
    often)."""
    return max(1, len(rows) // per_step)


def step_rows(rows, step, per_step, seed):
    """The prompts of optimizer step `step`: `per_step` rows in a fresh shuffle of `rows` every
    epoch, a function of (seed, epoch) only, so every arm run with a seed sees the same prompts in
    the same order (reproduce.py's paired design)."""
    epoch, i = divmod(step, epoch_steps(rows, per_step))
    order = list(range(len(rows)))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    return [rows[j] for j in order[i * per_step:(i + 1) * per_step]]

def load_jsonl(path, fields=("problem", "answer")):
    """Rows of a JSON Lines file; each must be an object with string `fields`. With
    fields=None each row is a math row (problem, answer) or a chat row (prompt), by its keys.
    Every row gets "task": "math" or "chat".

    Raises ValueError naming file, line and field on malformed JSON, a missing or non-string
    field, bytes that are not UTF-8, duplicate ids, or an empty file.
    """
    rows, seen = [], set()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 "
                                 f"({e.reason} at byte {e.start})") from None
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON "
                                 f"({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON "
                                 f"object, got {type(row).__name__}")
            need = fields or (("prompt",) if "prompt" in row else ("problem", "answer"))
            row.setdefault("task", "chat" if "prompt" in need else "math")
            for k in need:
                if k not in row:
                    raise ValueError(f"{path}:{lineno}: missing field {k!r}")
                if isinstance(row[k], (int, float)) and k == "answer":
                    row[k] = str(row[k])
                if not isinstance(row[k], str):
                    raise ValueError(f"{path}:{lineno}: field {k!r} must be "
                                     f"a string, got {type(row[k]).__name__}")
            rid = row.setdefault("id", f"{path}:{lineno}")
            if rid in seen:
                raise ValueError(f"{path}:{lineno}: duplicate id {rid!r}")
            seen.add(rid)
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: empty file, no rows")
    return rows
