"""Compressed weight transfer (ggcomm.weights) on real gloo ranks."""

from __future__ import annotations

import dist_utils
import pytest
import weights_workers as w


@pytest.mark.parametrize("world,fmt,src", [(3, "rf8", 2), (2, "eg", 1)])
def test_every_rank_ends_with_the_senders_rounded_weights(world, fmt, src):
    res = dist_utils.values(dist_utils.run(w.transfer, world, fmt, src, True))
    want = res[src]["expected"]
    for r in res:
        assert all(w.same_bits(a, b) for a, b in zip(r["params"], want, strict=True))
        assert r["counted"] == r["reported"]  # bytes counted equal bytes moved
    assert not all(w.same_bits(a, b) for a, b in zip(res[src]["before"], want, strict=True))
    bits = res[0]["bits"]
    assert (8.0 < bits < 9.0) if fmt == "rf8" else (3.0 < bits < 8.0)


def test_the_sender_can_keep_its_exact_weights():
    res = dist_utils.values(dist_utils.run(w.transfer, 2, "rf8", 0, False))
    assert all(w.same_bits(a, b) for a, b in zip(res[0]["params"], res[0]["before"],
                                                 strict=True))
    assert all(w.same_bits(a, b) for a, b in zip(res[1]["params"], res[0]["expected"],
                                                 strict=True))


def test_ranks_with_other_shapes_raise_settings_mismatch_on_every_rank():
    res = dist_utils.values(dist_utils.run(w.mismatch, 3))
    assert all(r is not None and r[0] == "SettingsMismatchError" and "[2]" in r[1]
               for r in res)


@pytest.mark.parametrize("how", ["flip", "oversize"])
def test_a_bad_message_raises_frame_error_everywhere_and_changes_nothing(how):
    res = dist_utils.values(dist_utils.run(w.hostile, 3, how))
    for r in res:
        assert r is not None and r[0] == "FrameError" and r[2], r
    if how == "oversize":
        assert all("announced" in r[1] for r in res)


def test_weights_bench_quick(tmp_path):
    import importlib
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        mod = importlib.import_module("weights_bench")
        mod.main(["--n-layer", "1", "--n-embd", "64", "--repeats", "1",
                  "--out", str(tmp_path / "weights")])
    finally:
        sys.path.remove(str(bench))
    md = (tmp_path / "weights.md").read_text()
    assert "| rf8 | 8.0" in md and "| eg 1/16 |" in md and "## GG initialization" in md
