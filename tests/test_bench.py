"""bench.py in its CI smoke mode: 2 steps per measurement on a tiny random model, TRL skipped
(the numbers mean nothing here; the real table comes from `python bench.py`)."""
import json

import bench


def test_bench_smoke(tiny_model_dir, tmp_path):
    rows, s_rows, gen = bench.main(["--smoke", "--model", tiny_model_dir, "--out", str(tmp_path), "--n", "2",
                                    "--batch-prompts", "2", "--max-new-tokens", "4"])
    assert [r["what"] for r in rows] == ["online GRPO step (n=2)", "online DPO step (n=2)"]
    assert all(r["ours_s"] > 0 and r["ours_mb"] > 50 and "trl_s" not in r for r in rows)
    assert [r["s"] for r in s_rows] == ["1", "2"]
    assert all(r["total_s"] > 0 and r["rollouts_per_s"] > 0 for r in s_rows)
    assert gen["ours_tok_s"] > 0 and gen["plain_tok_s"] > 0 and gen["ours_8x_tok_s"] > 0
    table = open(tmp_path / "bench.md").read()
    assert "online GRPO step" in table and "| 2 |" in table and "plain `generate`" in table and "at once" in table
    raw = json.load(open(tmp_path / "bench.json"))
    assert len(raw["s=2"]["step_s"]) == 2
