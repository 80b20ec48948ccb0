"""Bad input to every entry point: refused at once, by name, exit code 2 for flags, no traceback.
Run: pytest tests/test_flags.py"""
import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import eval as ev
import reproduce
import train
from conftest import toy_score
from models import load_model
from rollout import HFEngine

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def refused(parse, argv, flag, capsys):
    """parse(argv) exits 2 before doing anything, and the message names `flag`."""
    with pytest.raises(SystemExit) as e:
        parse(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and flag in err, (argv, e.value.code, err)
    return err


TRAIN_BAD = [
    (["--batch-prompts", "0"], "--batch-prompts"),
    (["--micro-groups", "0"], "--micro-groups"),
    (["--steps", "-1"], "--steps"),
    (["--steps", "1.5"], "--steps"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "0"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "-1e-5"], "--lr"),
    (["--beta", "0"], "--beta"),
    (["--beta", "inf"], "--beta"),
    (["--alpha", "-1"], "--alpha"),
    (["--clip-eps", "1"], "--clip-eps"),
    (["--kl-coef", "-0.1"], "--kl-coef"),
    (["--nll-coef", "-1"], "--nll-coef"),
    (["--entropy-coef", "x"], "--entropy-coef"),
    (["--tis-cap", "-1"], "--tis-cap"),
    (["--length-penalty", "-1"], "--length-penalty"),
    (["--n", "1"], "--n"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--gen-batch", "0"], "--gen-batch"),
    (["--vllm-memory", "2"], "--vllm-memory"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--grad-clip", "-1"], "--grad-clip"),
    (["--max-bad-steps", "0"], "--max-bad-steps"),
    (["--save-every", "-1"], "--save-every"),
    (["--keep", "0"], "--keep"),
    (["--eval-problems", "-1"], "--eval-problems"),
    (["--difficulty", "0"], "--difficulty"),
    (["--sync-every", "0"], "--sync-every"),
    (["--sync-every", "often"], "--sync-every"),
    (["--ref-sync-every", "-2"], "--ref-sync-every"),
    (["--loss", "ppo"], "--loss"),
    (["--task", "code"], "--task"),
    (["--device", "tpu"], "--device"),
    (["--device", "cuda:x"], "--device"),
    (["--train-data", "no/such/file.jsonl"], "--train-data"),
    (["--model", "./no-such-model"], "--model"),
    (["--init-from", "/no/such/ckpt"], "--init-from"),
    (["--reward-model", "./no-such-rm"], "--reward-model"),
   # GRPO without KL holds no reference
    (["--loss", "grpo", "--ref-sync-every", "2"], "--ref-sync-every"),
   # the GGUF default is not a vLLM model (and here vllm is not installed)
    (["--engine", "vllm"], "--engine"),
]


@pytest.mark.parametrize("argv,flag", TRAIN_BAD, ids=[" ".join(a) for a, _ in TRAIN_BAD])
def test_train_flags_refused(argv, flag, capsys):
    refused(train.parse_args, argv, flag, capsys)


def test_apples_gpu_is_refused_naming_the_cpu(capsys):
    """--device mps was never run here: refused, with what to use on a Mac."""
    assert "--device cpu" in refused(train.parse_args, ["--device", "mps"], "--device", capsys)


def test_train_out_is_a_file_and_a_model_folder_without_config(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    refused(train.parse_args, ["--out", str(tmp_path / "f")], "--out", capsys)
    (tmp_path / "empty").mkdir()
    assert "config.json" in refused(train.parse_args,
                                    ["--model", str(tmp_path / "empty")], "--model", capsys)


def test_train_batch_larger_than_the_data(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(
        json.dumps({"problem": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(4)))
    with pytest.raises(SystemExit, match="--batch-prompts 9: more than the 2 training prompts"):
        train.main([
            "--model", tiny_model_dir, "--train-data",
            str(data), "--eval-problems", "2", "--batch-prompts", "9", "--out",
            str(tmp_path / "o")])


EVAL_BAD = [(["--limit", "0"], "--limit"), (["--bench", "math500,mmlu"], "--bench"),
            (["--k", "4"], "--k"), (["--k", "0"], "--k"),
            (["--temperature", "-0.5"], "--temperature"),
            (["--max-new-tokens", "0"], "--max-new-tokens"),
            (["--model", "./no-such-ckpt"], "--model"),
            (["--data-dir", "/no/such/dir"], "--data-dir"),
            (["--select", "/no/such/run"], "--select"), (["--plot", "/no/such/run"], "--plot"),
            (["--select-problems", "0"], "--select-problems"),
            (["--baseline-model", "./nope"], "--baseline-model")]


@pytest.mark.parametrize("argv,flag", EVAL_BAD, ids=[" ".join(a) for a, _ in EVAL_BAD])
def test_eval_flags_refused(argv, flag, capsys, tmp_path):
    refused(ev.main, argv + ["--out", str(tmp_path / "o")], flag, capsys)


def test_eval_checkpoint_without_weights_and_bad_benchmark_rows(tiny_model_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt-000004"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(open(os.path.join(tiny_model_dir, "config.json")).read())
    assert "no weights" in refused(
        ev.main, ["--model", str(ckpt), "--out", str(tmp_path / "o")], "--model", capsys)
    data = tmp_path / "data"
    data.mkdir()
    (data / "math500.jsonl").write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?"}\n')
    with pytest.raises(SystemExit, match=r"--bench math500: .*math500.jsonl:2: "
                       r"missing field 'answer'"):
        ev.main(["--model", tiny_model_dir, "--data-dir", str(data), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--arms", "dpo_offline,ppo"], "--arms"),
        (["--seeds", "0"], "--seeds"),
        (["--pool", "1"], "--pool"),
        (["--train-data", "nope.jsonl"], "--train-data"),
   # passed through to train.py, checked first
        (["--batch-prompts", "0"], "--batch-prompts")])
def test_reproduce_flags_refused(argv, flag, capsys, tmp_path):
    refused(reproduce.main, argv + ["--out", str(tmp_path / "o")], flag, capsys)


@pytest.mark.parametrize("argv,flag", [(["--shapes", "4x1"], "--shapes"),
                                       (["--shapes", "four"], "--shapes"),
                                       (["--parts", "grpo,fast"], "--parts"),
                                       (["--steps", "1"], "--steps"),
                                       (["--s-values", "1,0"], "--s-values"),
                                       (["--lr", "-1"], "--lr"), (["--n", "1"], "--n"),
                                       (["--device", "tpu"], "--device")])
def test_bench_flags_refused(argv, flag, capsys, tmp_path):
    refused(bench.main, argv + ["--out", str(tmp_path / "o")], flag, capsys)


def test_out_is_a_file_for_every_script(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    for parse in (ev.main, reproduce.main, bench.main):
        assert "is a file" in refused(parse, ["--out", str(tmp_path / "f")], "--out", capsys)
    assert (tmp_path / "f").read_text() == "x"   # nothing written over it


@pytest.mark.parametrize("script,argv,flag",
                         [("train.py", ["--batch-prompts", "0"], "--batch-prompts"),
                          ("eval.py", ["--limit", "0"], "--limit")])
def test_command_line_prints_no_traceback(script, argv, flag):
    p = subprocess.run([sys.executable, os.path.join(HERE, script), *argv], capture_output=True,
                       text=True, cwd=HERE)
    assert p.returncode == 2 and flag in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_checkpoint_on_a_full_disk_keeps_the_previous_one(tiny_model_dir, tmp_path, monkeypatch):
    """The disk fills while the step-2 checkpoint is written: the run stops saying so, the
    half-written folder is gone, and `latest` still points at the intact step-1 checkpoint."""
    monkeypatch.setattr(train, "score", toy_score)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(
        json.dumps({"problem": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(8)))
    out, saves, orig = tmp_path / "run", [], torch.save

    def save(obj, f, *a, **k):
        if str(f).endswith("trainer_state.pt"):
            saves.append(f)
            if len(saves) == 2:
                raise OSError(28, "No space left on device")
        return orig(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(
            SystemExit, match=r"step 2 could not be written .*No "
            r"space left.*ckpt-000001 is intact"):
        train.main([
            "--model", tiny_model_dir, "--train-data",
            str(data), "--eval-problems", "0", "--batch-prompts", "2", "--n", "2",
            "--max-new-tokens", "4", "--steps", "3", "--save-every", "1", "--rollout-dtype",
            "float32", "--out",
            str(out)])
    assert sorted(os.listdir(out)) == ["ckpt-000001", "latest", "log.jsonl", "samples.jsonl"]
    assert open(out / "latest").read() == "ckpt-000001"


def test_rollouts_out_of_memory_name_the_flag(tiny_model_dir, monkeypatch):
    model, tok = load_model(tiny_model_dir)
    engine = HFEngine(model, tok, max_batch=16)

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(engine, "_generate_batch", oom)
    with pytest.raises(SystemExit, match=r"lower --gen-batch \(now 16\)"):
        engine.generate([[1, 2, 3]], n=4)


def test_out_not_writable_for_every_script(tmp_path):
    """A folder that cannot be made (a path through a file) is refused by name before any model
    loads."""
    (tmp_path / "f").write_text("x")
    for main, extra in ((ev.main, []), (reproduce.main, ["--quick"]), (bench.main, ["--smoke"])):
        with pytest.raises(SystemExit, match="--out .*: not writable"):
            main(["--out", str(tmp_path / "f" / "sub")] + extra)
