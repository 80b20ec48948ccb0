"""Math-Verify reward and data loading.  Run: pytest tests/test_rewards.py"""
import os
import signal
import threading
import time

import pytest

from data import arithmetic_problems, load_jsonl
import rewards
from rewards import math_reward


@pytest.mark.parametrize("response,answer,expect", [
    ("so the answer is \\boxed{42}", "42", 1.0),
    # no \boxed{}: Math-Verify takes the last expression
    ("17 + 25 = 42", "42", 1.0),
    ("The answer is \\boxed{41}", "42", 0.0),
    ("I have no idea", "42", 0.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\frac{\\pi}{2}}", "\\frac{\\pi}{2}", 1.0),
    ("first 42, finally \\boxed{7}", "42", 0.0),        # the boxed answer wins over other numbers
    ("", "3", 0.0),
])
def test_math_reward_known_cases(response, answer, expect):
    assert math_reward(response, answer) == expect


@pytest.mark.parametrize("evil,answer", [
    # sympy spends hours in one C-level integer power on these on some CPUs and finishes in time
    # on others; either way the response scores 0 within the limit (SIGALRM could not stop it)
    ("\\boxed{9^{9^{9^{9}}}}", "1"),
    # a symbolic reference: the power is evaluated (a numeric one rejects it first)
    ("\\boxed{9^{9^{9^{9}}}}", "\\sqrt{2}"),
    ("\\boxed{" + "9^{" * 30 + "9" + "}" * 30 + "}", "9^{9^{9}}"),
])
def test_adversarial_latex_scores_zero_in_bounded_time(evil, answer):
    """A response costs at most the time limit plus bringing up a grader (the warm spare may still
    be importing), measured here on this machine as it is loaded now: no absolute bound."""
    t = time.time()
    rewards._ready(rewards._spawn_grader()).kill()
    respawn = time.time() - t
    math_reward("\\boxed{1}", "1")                  # grader process started outside the timing
    t = time.time()
    assert math_reward(evil, answer, time_limit=0.5) == 0.0
    # a hang would be hours
    assert time.time() - t < 0.5 + 2 * respawn + 1.0, f"respawn {respawn:.1f}s"
    # whether it timed out or not, the next response is graded as usual
    assert math_reward("so \\boxed{42}", "42") == 1.0


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="stops the grader with SIGSTOP (POSIX)")
def test_timeout_kills_the_grader_and_the_warm_spare_takes_over():
    math_reward("\\boxed{1}", "1")
    stuck, spare = rewards._grader, rewards._spare
    os.kill(stuck.pid, signal.SIGSTOP)                # a response that never finishes, on any CPU
    before = dict(rewards.stats)
    assert math_reward("\\boxed{2}", "2", time_limit=0.3) == 0.0
    assert rewards.stats["timeouts"] == before["timeouts"] + 1
    assert stuck.poll() is not None                   # killed
    # the spare, started before the timeout: no restart waited for
    assert rewards._grader is spare
    assert rewards._spare is not None and rewards._spare is not spare
    assert math_reward("so \\boxed{42}", "42") == 1.0


def test_a_dead_grader_scores_zero_is_counted_and_restarted(monkeypatch):
    monkeypatch.setattr(rewards, "grade", None)       # the parent never grades in-process
    assert math_reward("\\boxed{3}", "3") == 1.0
    before = dict(rewards.stats)
    killer = threading.Timer(0.3, rewards._grader.kill)  # dies in the middle of a response
    killer.start()
    # seconds to hours of sympy
    assert math_reward("\\boxed{9^{9^{9^{9}}}}", "\\sqrt{2}", time_limit=30) == 0.0
    killer.join()
    assert rewards.stats["errors"] == before["errors"] + 1 and rewards.stats["timeouts"] == before[
        "timeouts"]
    rewards._grader.kill()                            # and one that died between calls
    rewards._grader.wait()
    assert math_reward("\\boxed{3}", "3") == 1.0


def test_arithmetic_problems_reproducible_and_correct():
    a, b = arithmetic_problems(50, 1, seed=3), arithmetic_problems(50, 1, seed=3)
    assert a == b and a != arithmetic_problems(50, 1, seed=4)
    for r in a:
        nums = [int(t) for t in r["problem"].replace("?", " ").split() if t.isdigit()]
        assert int(r["answer"]) == sum(nums) and max(nums) <= 10
    assert all("\\boxed{}" in r["problem"] for r in a)


@pytest.mark.parametrize("d", [5, 10, 20, 40])
def test_harder_arithmetic_tiers_have_right_answers(d):
    """d >= 5 mixes in a − c, d >= 20 products a × b; below 20 no products, and the product tier
    leaves the problems of lower difficulties as they were (they draw no extra random numbers)."""
    rows = arithmetic_problems(300, d, seed=1)
    kinds = {"×" if "×" in r["problem"] else "-" if " - " in r["problem"] else "+" for r in rows}
    assert kinds == ({"+", "-", "×"} if d >= 20 else {"+", "-"})
    for r in rows:
        nums = [int(t) for t in r["problem"].replace("?", " ").split() if t.isdigit()]
        want = nums[0] * nums[1] if "×" in r["problem"] else nums[0] + nums[1] - (
            nums[2] if " - " in r["problem"] else 0)
        assert int(r["answer"]) == want, r
        if "×" in r["problem"]:
            assert 11 <= nums[0] <= 99 and 2 <= nums[1] <= d // 2


def test_lower_difficulties_keep_their_problems():
    """Adding the product tier (d >= 20) changed no problem of d < 20: the hashes of the problems
    before it (commit 6fbd6a7's data.py), so earlier runs and sweeps stay comparable."""
    import hashlib
    import json
    got = {
        d: hashlib.sha1(json.dumps(arithmetic_problems(60, d, seed=1)).encode()).hexdigest()[:12]
        for d in (1, 2, 5, 10)}
    assert got == {1: "50898f004dcb", 2: "19bebb7013df", 5: "d97e489b0716", 10: "f844dbb2c06c"}


@pytest.mark.parametrize("content,msg", [
    (b'{"problem": "x", "answer": "1"}\n{"problem": "y"\n', "bad.jsonl:2: malformed JSON"),
    (b'{"problem": "x"}\n', "bad.jsonl:1: missing field 'answer'"),
    (b'{"problem": 3, "answer": "1"}\n', "bad.jsonl:1: field 'problem' must be a string"),
    (b'\n\n', "bad.jsonl: empty file"),
    (b'{"problem": "\xff", "answer": "1"}\n', "bad.jsonl:1: not UTF-8"),
    (b'[1, 2]\n', "bad.jsonl:1: expected a JSON object"),
    (b'{"id": 1, "problem": "a", "answer": "1"}\n{"id": 1, "problem": "b", "answer": "2"}\n',
     "bad.jsonl:2: duplicate id"),
])
def test_load_jsonl_errors_name_file_line_field(tmp_path, content, msg):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(ValueError) as e:
        load_jsonl(str(p))
    assert msg in str(e.value)


def test_load_jsonl_accepts_numeric_answers(tmp_path):
    p = tmp_path / "ok.jsonl"
    p.write_text('{"problem": "1+1", "answer": 2}\n')
    assert load_jsonl(str(p))[0]["answer"] == "2"


def test_shipped_data_files_load():
    for f in ["math500", "gsm8k_test", "gsm8k_train", "math_train", "amc23", "aime24"]:
        assert len(load_jsonl(f"data/{f}.jsonl")) >= 30


@pytest.mark.parametrize(
    "response,answer,expected",
    [
        (r"\boxed{47 \times 17}", "799", 0.0),   # the problem copied into the box: not an answer
        (r"\boxed{181 + 303 - 23}", "461", 0.0),
        (r"181 + 303 - 23 = \boxed{461}", "461", 1.0),
        (r"\boxed{799}", "799", 1.0),
        (r"\boxed{x = 799}", "799", 1.0),
        (r"\boxed{1,234}", "1234", 1.0),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", 1.0),
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
   # a symbolic reference keeps Math-Verify's equivalence
        (r"\boxed{\sqrt{2}}", r"\sqrt{2}", 1.0),
   # every correct form of a number (Math-Verify accepts them; the copied-question rule must not
   # reject them)
        (r"\boxed{50\%}", "50", 1.0),
        (r"\boxed{6.72 \times 10^{-5}}", ".0000672", 1.0),
        (r"\boxed{10^{6}}", "1000000", 1.0),
        (r"\boxed{2 \times 10^3}", "2000", 1.0),
        (r"\boxed{\text{6}}", "6", 1.0),
        (r"\boxed{\textbf{2}}", "2", 1.0),
        (r"\boxed{\mathbf{2}}", "2", 1.0),
        (r"\boxed{799 = 47 \times 17}", "799", 1.0),   # the number, then how it came
        (r"\boxed{-\dfrac{3}{4}}", "-0.75", 1.0),
        (r"\boxed{10001_2}", "10001_2", 1.0),   # MATH's reference solutions write these forms
        (r"\boxed{10\frac{1}{12}}", r"10\frac{1}{12}", 1.0),
        (r"\boxed{\frac{-7}{23}}", r"-\frac{7}{23}", 1.0),
        (r"\boxed{3:5}", "3:5", 1.0),
        (r"\boxed{7\text{ hours}.}", r"7\text{ hours}.", 1.0),
        (
            r"\boxed{\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}.}",
   # a reference that is no number: Math-Verify alone
            r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}.",
            1.0),
   # a copied question still scores 0, a division too
        (r"\boxed{100/10}", "10", 0.0),
        (r"\boxed{\frac{100}{10}}", "10", 0.0),
        (r"\boxed{x = 47 \times 17}", "799", 0.0),
        (r"\boxed{3 \cdot 4}", "12", 0.0),
    ])
def test_a_numeric_answer_must_be_a_number(response, answer, expected):
    """Math-Verify counts an unevaluated expression equal to the reference as right (\\boxed{47 ×
    17} for 799): on the built-in arithmetic, copying the question into \\boxed{} then earns full
    reward, and RL learns that instead of the arithmetic (s_curve.py's probes: two-digit products at
    100 %)."""
    assert math_reward(response, answer) == expected


def test_a_grader_whose_parent_left_exits_quietly():
    """A parent that exits before reading "ready" (a 1-second script) closes the grader's stdout:
    the grader ends without a BrokenPipeError traceback on the terminal."""
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, rewards.__file__, "--grader"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    p.stdin.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 0 and "Error" not in err, err


def test_a_cut_math_response_fails_unless_graded():
    """--cut-responses: a right answer cut at the cap scores 0 under "fail", 1 under "grade"; a
    response that stopped is graded either way."""
    from rollout import Sample
    rows = [{"task": "math", "answer": "7"}] * 2
    for cut, expect in (("fail", [0.0, 1.0]), ("grade", [1.0, 1.0])):
        xs = [Sample([1], [2], [0.0], [0.0], "3 + 4 = 7", reason) for reason in ("length", "stop")]
        rewards.score(rows, xs, None, cut=cut)
        assert [x.reward for x in xs] == expect, cut
