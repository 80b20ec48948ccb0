"""What a run leaves behind: its directory (log, held-out scores, curves, checkpoints), the
optional trackers in offline mode, and --help.  Run: pytest tests/test_outputs.py"""
import glob
import json
import os
import subprocess
import sys

import pytest

import logs
import train
from conftest import toy_score

pytestmark = pytest.mark.slow   # the whole suite only: -m "not slow" leaves it out

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_run(model, data, out, *extra):
    return train.main([
        "--model", model, "--train-data", data, "--eval-problems", "2", "--batch-prompts", "2",
        "--n", "2", "--max-new-tokens", "4", "--lr", "1e-3", "--out",
        str(out), *extra])


def test_run_directory_explains_itself(tiny_model_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "score", toy_score)
    out = tmp_path / "run"
    tiny_run(tiny_model_dir, data_file, out, "--steps", "3", "--save-every", "1", "--keep", "2")
    names = set(os.listdir(out))
    assert {"log.jsonl", "samples.jsonl", "heldout_before.json", "heldout_after.json", "curves.png",
            "latest", "ckpt-000002", "ckpt-000003"} == names
    assert os.path.getsize(out / "curves.png") > 20_000
    # --keep 2, --keep-optimizer last: the older kept checkpoint holds weights only
    assert not (out / "ckpt-000002" / "optimizer").exists() and (out / "ckpt-000003" /
                                                                 "optimizer").is_dir()
    assert glob.glob(str(out / "ckpt-000002" / "*.safetensors"))
    tiny_run(tiny_model_dir, data_file, tmp_path / "all", "--steps", "2", "--save-every", "1",
             "--keep-optimizer", "all", "--eval-problems", "0")
    assert (tmp_path / "all" / "ckpt-000001" / "optimizer").is_dir()


@pytest.mark.parametrize("loss", ["dpo", "grpo"])
def test_samples_show_what_the_loss_trained_on(tiny_model_dir, data_file, tmp_path, monkeypatch,
                                               capsys, loss):
    """samples.jsonl: --log-samples prompts a step, each response with its reward, length and cut,
    and its role in the pair (DPO) or its advantage (GRPO); `python logs.py RUN --samples STEP`."""
    monkeypatch.setattr(train, "score", toy_score)   # a group's shortest response scores 1: a pair
    out = tmp_path / loss
    tiny_run(tiny_model_dir, data_file, out, "--steps", "3", "--loss", loss, "--sync-every", "2",
             "--eval-problems", "0", "--batch-prompts", "4", "--log-samples", "2")
    entries = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert [(e["step"], e["sampled_at"]) for e in entries] == [
        (1, 0), (1, 0), (2, 0), (2, 0), (3, 2), (3, 2)]
    for e in entries:
        assert e["task"] == "math" and e["prompt"].startswith("What is") and e["answer"]
        xs = e["responses"]
        assert len(xs) == 2 and all({"text", "reward", "tokens", "cut"} <= set(x) for x in xs)
        best = max(xs, key=lambda x: x["reward"])
        if loss == "dpo":
            assert sorted(x["role"] for x in xs) == ["chosen", "rejected"]
            assert best["role"] == "chosen"
        else:
            assert sum(x["advantage"] for x in xs) == pytest.approx(0, abs=1e-3)
            assert best["advantage"] > 0
    capsys.readouterr()
    logs.main([str(out), "--samples", "3"])
    text = capsys.readouterr().out
    assert text.startswith("step 3, sampled at step 2 (staleness 0)")
    assert text.count(" reward ") == 4
    assert ("chosen" in text) == (loss == "dpo")


def test_resumed_samples_are_not_written_twice(tiny_model_dir, data_file, tmp_path, monkeypatch):
    """A run killed after step 3's log but before its checkpoint resumes from step 2: the steps
    after the checkpoint are written once, in log.jsonl and samples.jsonl alike."""
    monkeypatch.setattr(train, "score", toy_score)
    out = tmp_path / "run"
    tiny_run(tiny_model_dir, data_file, out, "--steps", "3", "--save-every", "2", "--eval-problems",
             "0", "--keep-optimizer", "all")
    (out / "latest").write_text("ckpt-000002")   # as if killed before step 3's checkpoint
    tiny_run(tiny_model_dir, data_file, out, "--steps", "4", "--resume", "--eval-problems", "0")
    steps = lambda f: [json.loads(line)["step"] for line in open(out / f)]   # noqa: E731
    assert steps("log.jsonl") == [1, 2, 3, 4] and steps("samples.jsonl") == [1, 1, 2, 2, 3, 3, 4, 4]


def test_weights_only_checkpoints(tiny_model_dir, data_file, tmp_path, capsys):
    """--keep-optimizer none (throwaway runs): no optimizer state on disk; --resume then says why it
    cannot."""
    out = tmp_path / "w"
    tiny_run(tiny_model_dir, data_file, out, "--steps", "2", "--keep-optimizer", "none",
             "--eval-problems", "0")
    assert glob.glob(str(out / "ckpt-000002" /
                         "*.safetensors")) and not (out / "ckpt-000002" / "optimizer").exists()
    with pytest.raises(SystemExit, match="--keep-optimizer none.*--init-from"):
        tiny_run(tiny_model_dir, data_file, out, "--steps", "3", "--resume", "--eval-problems", "0")


def test_tensorboard_offline(tiny_model_dir, data_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tiny_run(tiny_model_dir, data_file, tmp_path / "tb", "--steps", "2", "--eval-problems", "0",
             "--report-to", "tensorboard")
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    logged = [json.loads(line) for line in open(tmp_path / "tb" / "log.jsonl")]
    assert {"reward", "length", "entropy", "time/generate"} <= set(acc.Tags()["scalars"])
    assert [e.value for e in acc.Scalars("length")] == pytest.approx([r["length"] for r in logged])


def test_wandb_offline(tiny_model_dir, data_file, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tiny_run(tiny_model_dir, data_file, tmp_path / "wb", "--steps", "2", "--eval-problems", "0",
             "--report-to", "wandb")
    runs = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1 and os.path.getsize(runs[0]) > 0


def test_help_shows_defaults_and_choices():
    # argparse wraps to the terminal: a fixed width, so no default is split
    env = dict(os.environ, COLUMNS="200")
    text = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--help"],
                          capture_output=True, text=True, env=env).stdout
    assert "(default: 24)" in text and "{none,tensorboard,wandb}" in text
    assert "{dpo,ipo,simpo,group_dpo,grpo,dr_grpo,combined}" in text
    # the docstring's examples keep their lines
    assert "torchrun --standalone --nproc_per_node 8 train.py" in text
