"""
Training and evaluation problems: the built-in arithmetic task and JSON Lines files.

Every math row is {"problem": str, "answer": str} (extra fields such as "id" are kept); chat
rows are {"prompt": str}. A bad file fails with the file, line and field named.
"""
import json
import random

PROMPT_SUFFIX = " Put your final answer in \\boxed{}."

_WORD = [
    "{name} has {a} apples and buys {b} more. How many apples does {name} have now?",
    "A box holds {a} pens. {name} adds {b} pens. How many pens are in the box?",
    "{name} walked {a} meters in the morning and {b} meters in the evening. How many meters in total?",
]
_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana"]


def arithmetic_problems(num, difficulty=2, seed=0):
    """The built-in verifiable task: procedurally generated sums and word problems.

    difficulty d: operands go up to 10·d; d >= 5 also mixes in a third, subtracted term.
    Problems are a pure function of (num, difficulty, seed), so splits are reproducible.
    """
    rng = random.Random(f"arith-{difficulty}-{seed}")
    hi = 10 * difficulty
    rows = []
    for i in range(num):
        a, b = rng.randint(2, hi), rng.randint(2, hi)
        if difficulty >= 5 and rng.random() < 0.5:
            c = rng.randint(2, hi // 10 + 2)
            problem, answer = f"What is {a} + {b} - {c}?", a + b - c
        elif rng.random() < 0.5:
            problem, answer = f"What is {a} + {b}?", a + b
        else:
            problem, answer = rng.choice(_WORD).format(name=rng.choice(_NAMES), a=a, b=b), a + b
        rows.append({"id": f"arith-d{difficulty}-s{seed}-{i}", "problem": problem + PROMPT_SUFFIX,
                     "answer": str(answer)})
    return rows


def load_jsonl(path, fields=("problem", "answer")):
    """Rows of a JSON Lines file; each must be an object with string `fields`.

    Raises ValueError naming file, line and field on malformed JSON, a missing or non-string
    field, bytes that are not UTF-8, duplicate ids, or an empty file.
    """
    rows, seen = [], set()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for k in fields:
                if k not in row:
                    raise ValueError(f"{path}:{lineno}: missing field {k!r}")
                if isinstance(row[k], (int, float)) and k == "answer":
                    row[k] = str(row[k])
                if not isinstance(row[k], str):
                    raise ValueError(f"{path}:{lineno}: field {k!r} must be a string, got {type(row[k]).__name__}")
            rid = row.setdefault("id", f"{path}:{lineno}")
            if rid in seen:
                raise ValueError(f"{path}:{lineno}: duplicate id {rid!r}")
            seen.add(rid)
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: empty file, no rows")
    return rows
