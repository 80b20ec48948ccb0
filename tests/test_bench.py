"""bench.py in its CI smoke mode: 2 steps per measurement on a tiny random model, TRL skipped
(the numbers mean nothing here; the real table comes from `python bench.py`)."""
import json

import pytest
import torch

import bench
import decode
from models import resolve_dtype

pytestmark = pytest.mark.slow   # the whole suite only: -m "not slow" leaves it out


def test_bench_smoke(tiny_model_dir, tmp_path):
    rows, s_rows, gen = bench.main([
        "--smoke", "--model", tiny_model_dir, "--out",
        str(tmp_path), "--n", "2", "--batch-prompts", "2", "--max-new-tokens", "4", "--shapes",
        "1x2,2x2"])
    assert [r["what"] for r in rows] == ["online GRPO 1x2", "online GRPO 2x2", "online DPO 2x2"]
    assert all(r["ours_s"] > 0 and r["ours_mb"] > 50 and r["ours_tok"] > 0 and "trl_s" not in r
               for r in rows)
    assert all(set(r["time"]) >= {"generate", "score", "policy", "ref", "optimizer"} for r in rows)
    assert [r["s"] for r in s_rows] == ["1", "2"]
    assert all(r["total_s"] > 0 and r["rollouts_per_s"] > 0 for r in s_rows)
    assert gen["ours_tok_s"] > 0 and gen["plain_tok_s"] > 0 and gen["ours_8x_tok_s"] > 0
    table = open(tmp_path / "bench.md").read()
    assert "online GRPO 2x2" in table and "| 2 |" in table
    assert "plain `generate`" in table and "at once" in table
    assert "Roofline" in table and "of the 64-row roofline" in table and "| hf-bfloat16 |" in table
    raw = json.load(open(tmp_path / "bench.json"))
    assert len(raw["s=2"]["step_s"]) == 2 and raw["roofline"]["gflops_64"] > 0
    dec = raw["decode"]   # the decode step against the memory-bandwidth roofline, per batch size
    assert dec["bandwidth_gbs"] > 0 and set(dec["rows"]) == {"1", "8", "64"}
    assert all(r["step_s"] > 0 and 0 < r["fraction"] for by in dec["rows"].values()
               for r in by.values())
    # the HF forward, decode.py in each matmul form and by its measured plan, each form's ceiling
    forms = decode.available("cpu", getattr(torch, resolve_dtype("auto", "cpu")))
    assert all(set(by) == {"hf", "decode.py auto"} | {f"decode.py {m}" for m in forms}
               | {f"{m}, matmuls only" for m in forms} for by in dec["rows"].values())
    assert set(dec["plan"]) == {"1", "8", "64"}   # the plan auto measured for each batch
    assert all(decode.parse_plan(p) and f"{r}: {p}" in table for r, p in dec["plan"].items())
    assert "Decode against memory bandwidth" in table and "fraction of the bandwidth" in table
