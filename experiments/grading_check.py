"""Grading checked on the training data: each GSM8K and MATH training row whose reference is a
number has its own reference answer (GSM8K: the reference boxed; MATH: the last \\boxed{} of the
reference solution) graded against the reference by rewards.grade, under the rule that a number
must be answered with a number as written; the rows whose answer scores 0 are listed.

    python experiments/grading_check.py
"""
import collections
import json
import os
import signal
import sys

# the reference's files
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from math_verify import parse  # noqa: E402

import rewards  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def last_boxed(text):
    """The last \\boxed{...} of a solution, braces balanced; None without one."""
    i = text.rfind("\\boxed{")
    if i < 0:
        return None
    depth = 0
    for k in range(i + 6, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[i:k + 1]
    return None


def main():
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError()))
    for name in ("gsm8k_train", "math_train"):
        counts, failed = collections.Counter(), []
        for line in open(os.path.join(DATA, f"{name}.jsonl")):
            row = json.loads(line)
            answer = f"\\boxed{{{row['answer']}}}" if name.startswith("gsm8k") else last_boxed(
                row.get("solution", ""))
            signal.alarm(3)
            try:
                gold = parse(f"${row['answer']}$")
                if answer is None or not (gold and getattr(gold[0], "is_Number", False)):
                    continue
                counts["numeric"] += 1
                counts["written as a number"] += rewards.written_as_number(row["answer"])
                score = rewards.grade(answer, row["answer"])
            except TimeoutError:
                counts["timed out"] += 1
                continue
            finally:
                signal.alarm(0)
            counts["graded 1"] += score
            if not score:
                failed.append(f"{row.get('id')}: {answer[:60]!r} for {row['answer'][:40]!r}")
        print(f"{name}: {dict(counts)}")
        print("".join(f"  scored 0: {f}\n" for f in failed), end="")


if __name__ == "__main__":
    main()
