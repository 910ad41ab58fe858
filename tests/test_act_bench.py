"""Smoke test of the ACT paper benchmark (benchmarks/paper/act_sweep.py) in quick mode."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "paper"))

import act_sweep  # noqa: E402


def test_quick_sweep_writes_results(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        runs = act_sweep.main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["act_sweep-quick.json", "act_sweep-quick.md", "act_sweep-quick.png"]
    payload = json.loads((tmp_path / "act_sweep-quick.json").read_text())
    assert [r["lam"] for r in payload["runs"]] == list(act_sweep.QUICK_LAMBDAS)
    assert payload["steps"] == act_sweep.QUICK_STEPS
    for r in runs:
        a = r["activation"]
        assert 0.0 < r["accuracy"] < 1.0 and 0.0 < r["accuracy_codec"] < 1.0
        assert 1.0 <= a["hm"] <= a["eg"] + 1e-9 and a["codec"] > 0 and a["peak_to_rms"] >= 1.0
        h = r["history"]
        assert len(h["loss"]) == len(h["bits"]) == len(h["lam"]) > 0
    conventional, act = runs
    assert conventional["history"]["lam"] == [0.0] * len(conventional["history"]["lam"])
    assert max(act["history"]["lam"]) > 0
    # Even a few steps of a strong constraint take bits off the boundary activation.
    assert act["activation"]["codec"] < conventional["activation"]["codec"]
    table = (tmp_path / "act_sweep-quick.md").read_text()
    assert "| 0 (conventional) |" in table and "Paper" in table
    gap = payload["rate_model_gap"]
    assert gap and all(abs(row["eg_rate"]) < 1e-6 for row in gap)  # the codec's own bits
    assert all(row["smooth"] > 0.05 for row in gap)  # the smooth bound alone is well above
