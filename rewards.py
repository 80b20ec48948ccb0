"""
Rewards. The paper's verifiable task scores a response 1 if its final answer matches the
reference under Math-Verify, else 0 (§3, NuminaMath). Math-Verify extracts the answer the way
its defaults do: the last \\boxed{...} first, else the last LaTeX or plain expression.

Grading symbolic answers can explode (huge powers, nested radicals): every response gets a
hard wall-clock budget, and one that runs out scores 0 and is counted, so no response can
stall a step. We never eval or sympify raw text ourselves; all parsing goes through Math-Verify.
"""
import signal
import threading
from contextlib import contextmanager

from math_verify import parse, verify

TIME_LIMIT_S = 2.0      # per response, parsing + verification together
stats = {"graded": 0, "timeouts": 0, "errors": 0}


class GradingTimeout(Exception):
    pass


@contextmanager
def _time_limit(seconds):
    """A hard limit via SIGALRM (interval timer, sub-second). Signals only reach the main
    thread, so elsewhere we rely on Math-Verify's own (whole-second) timeouts instead."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise GradingTimeout()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def math_reward(response: str, answer: str, time_limit: float = TIME_LIMIT_S) -> float:
    """1.0 if the final answer of `response` equals `answer` (a LaTeX string) under Math-Verify, else 0.0."""
    stats["graded"] += 1
    in_main = threading.current_thread() is threading.main_thread()
    own_timeout = None if in_main else max(1, round(time_limit))
    try:
        with _time_limit(time_limit):
            gold = parse(f"${answer}$", parsing_timeout=own_timeout) or parse(answer, parsing_timeout=own_timeout)
            pred = parse(response, parsing_timeout=own_timeout)
            return float(bool(gold and pred and verify(gold, pred, timeout_seconds=own_timeout)))
    except GradingTimeout:
        stats["timeouts"] += 1
    except Exception:   # Math-Verify raising on odd input: scored incorrect, counted
        stats["errors"] += 1
    return 0.0
