"""Smoke test of the hook profile benchmark: a tiny model, every table filled in."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_hook_profile_writes_its_tables(tmp_path: Path) -> None:
    if str(BENCHMARKS) not in sys.path:  # spawned ranks import the script by name
        sys.path.insert(0, str(BENCHMARKS))
    mod = importlib.import_module("hook_profile")
    assert mod.main(["--width", "96", "--depth", "2", "--steps", "4", "--skip", "2",
                     "--bucket-cap-mb", "0.02", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "hook_profile.md").read_text()
    res = json.loads((tmp_path / "hook_profile.json").read_text())
    assert set(res["times"]) == {"fp32", "fp16", "gg"}
    assert all(len(t) == 2 and min(t) > 0 for t in res["times"].values())
    buckets = res["buckets"][0]
    assert len(buckets) > 1 and all(b["encode"] > 0 and b["decode"] > 0 for b in buckets)
    assert len(res["bare"]) == len(buckets) == len(res["bare_busy"])
    assert all(sum(row["modes"].values()) > 0 for row in res["bare"])
    # the hook's own passes, timed alone on the same data (their frame is the bare encode's,
    # which the benchmark checks byte for byte)
    assert all(row["hook_encode_s"] > 0 and row["hook_sum_s"] > 0 for row in res["bare"])
    for needle in ("| plain DDP (fp32 allreduce) |", "| ggcomm rate 3 (auto, step_drift 0.1) |",
                   "hook / bare", "encode CPU / bare encode", "All buckets: hook",
                   "bare, others computing", "while the other rank(s) compute",
                   "hook passes alone | alone / bare", "alone like the bare kernels"):
        assert needle in md
    assert "nan" not in md
    # the command shown repeats the run (its options that are not at their defaults)
    assert ("Command: `python benchmarks/hook_profile.py --steps 4 --skip 2 --width 96 "
            f"--depth 2 --bucket-cap-mb 0.02 --out {tmp_path}`") in md
