"""The reproduction sweep end to end, 2 steps per arm on a tiny random model (a smoke test:
the numbers mean nothing here).  Run: pytest tests/test_reproduce.py"""
import os

import reproduce


def test_sweep_smoke(tiny_model_dir, tmp_path):
    out = tmp_path / "sweep"
    res = reproduce.main(["--out", str(out), "--steps", "2", "--eval-problems", "2", "--pool", "8", "--seeds", "2",
                          "--quiet", "--model", tiny_model_dir, "--n", "2", "--batch-prompts", "2", "--max-new-tokens", "4"])
    assert set(res) == set(reproduce.ARMS)
    assert all(len(runs) == (2 if name in reproduce.HEADLINE else 1) for name, runs in res.items())
    table = open(out / "results.md").read()
    assert all(name in table for name in reproduce.ARMS)
    for fig in ("fig2_ref_sync.png", "fig3_regimes.png"):
        assert os.path.getsize(out / fig) > 5000
