"""`torchrun train.py` as a GPU user runs it, on CPU processes (gloo), with the real rollout path
(our HF decode loop, sampling, scoring) on the tiny model: every arm of the paper runs to the end
on 2 processes, and the multi-process defects stay fixed (πref resharding, FSDP lockstep with
uneven ranks, resume on another number of processes, gradient checkpointing).
Run: pytest tests/test_torchrun.py
"""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import train
from conftest import assert_close, free_port, write_sums

pytestmark = pytest.mark.slow   # the whole suite only: -m "not slow" leaves it out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# train.py as it is, with rewards a tiny random model can earn (tests/conftest.toy_score), optional
# all-tied rewards, and an optional kill -9 right after the checkpoint of a given step
RUNNER = r'''
import os, sys
sys.path.insert(0, os.path.join(os.environ["SEMIONLINE_ROOT"], "tests"))
import train
from conftest import toy_score

def tied(rows, samples, chat_reward=None, length_penalty=0.0, cut="grade"):
    for x in samples:
        x.reward = 1.0
train.score = tied if os.environ.get("TOY") == "tied" else toy_score
die = int(os.environ.get("DIE_AFTER_CHECKPOINT", "0"))
if die:
    save = train.save_checkpoint
    def save_then_die(out, step, *a, **k):
        path = save(out, step, *a, **k)
        if step == die:
            os._exit(9)   # as kill -9: nothing after the checkpoint is written
        return path
    train.save_checkpoint = save_then_die
train.main(sys.argv[1:])
'''


@pytest.fixture
def env(mp_env):
    open(mp_env["runner"], "w").write(RUNNER)
    return mp_env


def launch(env, name, procs, *extra, toy="short", die_after=0, expect_rc=0, timeout=240):
    """train.py on `procs` processes (torchrun when 2+); returns (log records, rank 0's
    stdout+stderr)."""
    out = env["tmp"] / name
    argv = [
        "--model", env["model"], "--train-data", env["data"], "--eval-problems", "0",
        "--batch-prompts", "4", "--group-size", "4", "--max-new-tokens", "8", "--micro-groups", "1",
        "--lr", "1e-3", "--out",
        str(out), *extra]
    run_env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT,
                   SEMIONLINE_ROOT=ROOT, TOY=toy, DIE_AFTER_CHECKPOINT=str(die_after))
    cmd = [sys.executable, env["runner"], *argv] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
         "--master_port", str(free_port()), env["runner"], *argv]
    p = subprocess.Popen(cmd, cwd=ROOT, env=run_env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)   # a hang is killed with all its ranks
    try:
        text = p.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"{name}: no end after {timeout} s (ranks out "
                    f"of lockstep?)\n{p.communicate()[0][-4000:]}")
    assert p.returncode != 0 if expect_rc is None else p.returncode == expect_rc, \
        f"{name}: exit {p.returncode}\n{text[-4000:]}"
    log = out / "log.jsonl"
    return [json.loads(line) for line in open(log)] if log.exists() else [], text


def final_weights(out):
    ckpt = out / open(out / "latest").read().strip()
    return AutoModelForCausalLM.from_pretrained(ckpt).state_dict()


# ---------------------------------------------------------------------------------------------
# The paper's arms on 2 processes sample, score and train as on 1. Common random numbers (a prompt's
# draws keyed by seed, step and row) make the rollouts independent of which rank samples them; fp32
# throughout so that the batch's shape cannot move a draw. Each arm: 4 steps, 4 prompts x 4.

ARMS = {
    "offline": ["--sync-every", "inf"],
    "iterative": ["--sync-every", "epoch", "--batch-prompts", "8"],
    "semi-online": ["--sync-every", "2"],
    "online-ref-sync": ["--sync-every", "1", "--ref-sync-every", "2"],
    "group-dpo": ["--loss", "group_dpo", "--sync-every", "2"],
    "combined": ["--loss", "combined", "--sync-every", "2"],
    "grpo-tis": ["--loss", "grpo", "--sync-every", "2", "--tis-cap", "2"],
    "grpo-kl-grad-checkpointing": [
        "--loss", "grpo", "--sync-every", "2", "--tis-cap", "2", "--kl-coef", "0.1",
        "--grad-checkpointing"],
    "nll": ["--nll-coef", "0.1"],
    "entropy": ["--entropy-coef", "0.01"],
    "chat-judge": ["--task", "chat"],
    "mix": ["--task", "mix"],
}


@pytest.mark.parametrize("arm", list(ARMS))
def test_arm_on_two_processes_matches_one(env, arm):
    if arm in ("chat-judge", "mix"):
        rows = [{"prompt": f"Say something nice about the number {i}."} for i in range(8)]
        rows += [{"problem": f"What is {i} + 3?", "answer": str(i + 3)}
                 for i in range(8)] if arm == "mix" else rows
        data = env["tmp"] / f"{arm}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        env = dict(env, data=str(data))
    one_vs_two(env, arm, ARMS[arm])


@pytest.mark.parametrize(
    "loss", [name for name in train.LOSSES if name not in ("dpo", "group_dpo", "grpo", "combined")])
def test_every_other_loss_on_two_processes_matches_one(env, loss):
    """The conformance test's multi-process part (tests/test_losses.py has the rest): a new LOSSES
    entry, semi-online, on 2 processes trains as on 1. (The built-in ones are arms above.)"""
    one_vs_two(env, loss, ["--loss", loss, "--sync-every", "2"])


def one_vs_two(env, arm, flags):
    argv = [
        "--steps", "4", "--rollout-dtype", "float32", "--train-dtype", "float32", "--seed", "1",
        *flags]
    one, _ = launch(env, f"{arm}-1", 1, *argv)
    two, _ = launch(env, f"{arm}-2", 2, *argv)
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    samples = [json.loads(line) for line in open(env["tmp"] / f"{arm}-2" / "samples.jsonl")]
    # rank 0's 2 prompts a step, once
    assert [e["step"] for e in samples] == [1, 1, 2, 2, 3, 3, 4, 4]
    for key in ("reward", "length", "entropy", "pairs_used", "groups_used", "skipped", "staleness"):
        assert_close([r.get(key) for r in two], [r.get(key) for r in one], key)
    # null where a step had nothing to train on, in both
    for key in ("loss", "grad_norm_pre_clip"):
        assert_close([r[key] for r in two], [r[key] for r in one], key, rel=1e-3, abs=1e-5)
    # k3 of weights that float noise, through AdamW, moved by up to 1e-4 (the weights' check below):
    # ~1e-3 values differed by 2.4e-5 at step 4 in one run of the group-dpo arm out of four
    assert_close([r["k3_trained"] for r in two], [r["k3_trained"] for r in one], "k3_trained",
                 rel=1e-3, abs=1e-4)
    assert any(r["loss"] is not None for r in two)
    wa, wb = final_weights(env["tmp"] / f"{arm}-1"), final_weights(env["tmp"] / f"{arm}-2")
    # AdamW: float noise moves a weight by < 0.1 lr
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)
    if "--ref-sync-every" in argv:   # πref synced at step 4 = the final policy, on both
        ref = torch.load(env["tmp"] / f"{arm}-2" / "ckpt-000004" / "ref.pt")
        assert all(torch.equal(t, wb[k]) for k, t in ref.items())


# ---------------------------------------------------------------------------------------------
# Defects found in review, each failing before its fix


def test_reference_sync_under_torchrun(env):
    """πref ← πθ on sharded models: the reference only runs no-grad forwards, so its root-level
    parameters were left unsharded (plain tensors) and the copy crashed at the first sync. The
    synced πref saved at the end equals the final policy (the sync is at the last step)."""
    recs, _ = launch(env, "refsync", 2, "--steps", "4", "--sync-every", "2", "--ref-sync-every",
                     "2")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    ckpt = env["tmp"] / "refsync" / "ckpt-000004"
    ref, policy = torch.load(ckpt /
                             "ref.pt"), AutoModelForCausalLM.from_pretrained(ckpt).state_dict()
    assert all(torch.equal(t, policy[k]) for k, t in ref.items())


def test_checkpoint_after_a_no_grad_forward(env):
    """A sync step stamps πθ_old (a no-grad policy forward) and then has nothing to train on (every
    reward tied, GRPO without KL): the checkpoint that follows read an unsharded root and failed
    (KeyError in get_optimizer_state_dict)."""
    recs, _ = launch(env, "stamp", 2, "--loss", "grpo", "--rollout-dtype", "bfloat16",
                     "--sync-every", "2", "--steps", "2", "--save-every", "1", toy="tied")
    assert [r["groups_used"] for r in recs] == [0, 0]


def test_uneven_ranks_stay_in_lockstep(env):
    """One rank's prompts are all skipped as too long at some step: it trains on a one-token spare
    unit while the other trains on real ones. Both must run the same FSDP forwards (the spare's
    T = 1 used to skip the second forward: a hang under NCCL, a gloo timeout here)."""
    data = env["tmp"] / "uneven.jsonl"
    rows = [{"problem": f"What is {i} + 3?" if i % 2 else "word " * 600, "answer": str(i + 3)}
            for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = dict(env, data=str(data))
    recs, _ = launch(env, "uneven", 2, "--steps", "4", "--sync-every", "2", "--batch-prompts", "2",
                     "--loss", "grpo", "--rollout-dtype", "bfloat16", timeout=180)
    assert len(recs) == 4 and all(r["skipped"] >= 0 for r in recs)


def test_grad_checkpointing_stamps_old_logps_with_the_kv_cache(tiny_model_dir, tmp_path,
                                                               monkeypatch):
    """--grad-checkpointing: πθ_old is stamped at a sync with the policy in train mode, where
    Transformers turns the KV cache off; the stamp must still be the policy's log-probs."""
    import train
    from conftest import toy_score
    from train import stamp_old_logps
    from models import collate, response_logps
    monkeypatch.setattr(train, "score", toy_score)
    stamped = []
    monkeypatch.setattr(
        train, "stamp_old_logps", lambda model, groups, *a:
        (stamp_old_logps(model, groups, *a), stamped.append((model, groups))))
    data = tmp_path / "d.jsonl"
    write_sums(data, 8, 3)
    train.main([
        "--model", tiny_model_dir, "--train-data",
        str(data), "--eval-problems", "0", "--batch-prompts", "2", "--group-size", "4",
        "--max-new-tokens", "8", "--lr", "0", "--loss", "grpo", "--rollout-dtype", "bfloat16",
        "--train-dtype", "float32", "--sync-every", "2", "--steps", "2", "--grad-checkpointing",
        "--out",
        str(tmp_path / "o")])
    model, groups = stamped[0]
    model.eval()
    with torch.no_grad():
        fresh = response_logps(model, collate(groups, "cpu"), 0.8, share_prompt=False)
    for x, row in zip([x for g in groups for x in g], fresh):
        assert x.old_logps == pytest.approx(row[:len(x.completion_ids)].tolist(), abs=1e-5)


def test_mixed_precision_follows_train_dtype():
    """--train-dtype float32 under FSDP on CUDA was ignored (the policy was always bf16)."""
    from distributed import mixed_precision
    assert mixed_precision("cuda", "float32").param_dtype is None
    assert mixed_precision("cuda", "bfloat16").param_dtype == torch.bfloat16
    assert mixed_precision("cuda", "bfloat16").reduce_dtype == torch.float32
    # CPU: autocast does the bf16 matmuls
    assert mixed_precision("cpu", "bfloat16").param_dtype is None


@pytest.mark.parametrize("regime", ["inf", "4"])
@pytest.mark.parametrize("procs", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_processes_keeps_the_rollouts(env, regime, procs):
    """kill -9 after the step-2 checkpoint, resume on another number of processes: the remaining
    steps of the rollout window (offline: every step) train on the rollouts the checkpoint saved,
    redistributed over the new ranks, so their rollout metrics are the uninterrupted run's. (Before:
    the window was regenerated, offline from the trained weights instead of the seed model.)"""
    a, b = procs
    common = [
        "--steps", "4", "--sync-every", regime, "--save-every", "2", "--loss", "dpo",
        "--train-dtype", "float32"]
    straight, _ = launch(env, f"straight-{regime}-{a}", a, *common)
    launch(env, f"cut-{regime}-{a}{b}", a, *common, die_after=2, expect_rc=None if a > 1 else 9)
    resumed, text = launch(env, f"cut-{regime}-{a}{b}", b, *common, "--resume")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for key in ("reward", "length", "entropy", "pairs_used"):
        assert [r[key] for r in resumed[2:]] == pytest.approx([r[key] for r in straight[2:]],
                                                              rel=1e-5), key
    # the same pairs
    assert [r["loss"] for r in resumed[2:]] == pytest.approx([r["loss"] for r in straight[2:]],
                                                             rel=1e-4)


def test_offline_resumed_past_its_window_samples_the_seed_model(tiny_model_dir, tmp_path,
                                                                monkeypatch):
    """Offline (s = ∞) resumed with more --steps: the new rollouts come from the seed model, not
    from the checkpoint's trained weights (the engine was built from the checkpoint)."""
    import train
    from conftest import spy_generate, toy_score
    monkeypatch.setattr(train, "score", toy_score)
    data = tmp_path / "d.jsonl"
    write_sums(data, 8, 3)
    argv = [
        "--model", tiny_model_dir, "--train-data",
        str(data), "--eval-problems", "0", "--batch-prompts", "2", "--group-size", "4",
        "--max-new-tokens", "8", "--lr", "1e-2", "--sync-every", "inf", "--out",
        str(tmp_path / "o")]
    first = train.main(argv + ["--steps", "2"])
    seed = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    # it trained
    assert any(not torch.equal(v, seed[k]) for k, v in first["policy"].state_dict().items())
    holder = {}
    # the weights the resumed run's one generate call sampled with
    calls = spy_generate(monkeypatch, holder)
    resumed = train.main(argv + ["--steps", "4", "--resume"])
    assert [r["step"] for r in resumed["records"]] == [3, 4] and len(calls) == 1
    assert all(
        torch.equal(v, seed[k].to(v.dtype)) for k, v in holder["sampled_with"].items() if k in seed)
