"""The codec benchmark's pcodec comparison: bits and round trip on quantized symbols, and
the report with and without pcodec installed."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ggcomm import quant

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import codec_bench  # noqa: E402


def gaussian_symbols(n: int, step: float, seed: int = 0) -> np.ndarray:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return quant.quantize(x, step).numpy()


def small_row() -> codec_bench.CodecRow:
    """One benchmark row measured end to end on 16384 GG(beta=1) elements."""
    spec = codec_bench.DataSpec(
        "gg", "GG beta=1", lambda n: torch.randn(n), [codec_bench.Setting("GG @3b", 3.0, 0.3)],
        beta=1.0)
    x = codec_bench.gg.sample(1 << 14, 1.0, generator=torch.Generator().manual_seed(1))
    cfg = codec_bench.Config([0.0625], reps=1, quick=True, seed=0, zstd_threads=0)
    base = codec_bench.measure_baselines(x, cfg.reps, cfg.zstd_threads)
    return codec_bench.measure_codec(spec, spec.settings[0], x, 0.0625, base, cfg)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int8])
def test_pcodec_bits_near_entropy_exact_round_trip(dtype: type) -> None:
    pytest.importorskip("pcodec")
    q = gaussian_symbols(100_000, 0.3).astype(dtype)
    entropy = codec_bench.empirical_entropy(q)
    res = codec_bench.measure_pcodec(q, reps=1)
    assert res is not None
    assert res.dtype == ("int16" if dtype is np.int8 else np.dtype(dtype).name)
    # a static code over the whole chunk cannot go below the empirical entropy
    assert entropy < res.bits < 1.05 * entropy, (res.bits, entropy)
    assert math.isfinite(res.c_gbps) and res.c_gbps > 0
    assert math.isfinite(res.d_gbps) and res.d_gbps > 0


def test_pcodec_round_trip_mismatch_stops_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pcodec")
    real = codec_bench.pco_standalone

    def corrupt(blob: bytes) -> np.ndarray:
        back = real.simple_decompress(blob)
        back[123] += 1
        return back

    fake = SimpleNamespace(simple_compress=real.simple_compress, simple_decompress=corrupt)
    monkeypatch.setattr(codec_bench, "pco_standalone", fake)
    with pytest.raises(RuntimeError, match="not exact"):
        codec_bench.measure_pcodec(gaussian_symbols(10_000, 0.5), reps=1)


def test_report_has_pcodec_columns() -> None:
    pytest.importorskip("pcodec")
    row = small_row()
    assert row.roundtrip_ok and row.pcodec is not None
    assert row.pcodec.bits < 1.05 * row.entropy_bits
    throughput, bits = codec_bench._throughput([row]), codec_bench._bits([row])
    assert "| pco c | pco d |" in throughput[5] and "| pcodec q |" in bits[5]
    assert f"| {row.pcodec.c_gbps:.2f} | {row.pcodec.d_gbps:.2f} |" in throughput[-1]
    assert f"| {row.pcodec.bits:.3f} |" in bits[-1]
    assert "n/a" not in "\n".join(throughput + bits)


def test_report_without_pcodec(monkeypatch: pytest.MonkeyPatch) -> None:
    reason = "pcodec is not installed (No module named 'pcodec')"
    monkeypatch.setattr(codec_bench, "pco_standalone", None)
    monkeypatch.setattr(codec_bench, "PCODEC_MISSING", reason)
    assert codec_bench.measure_pcodec(gaussian_symbols(1000, 0.5), reps=1) is None
    row = small_row()
    assert row.pcodec is None and row.roundtrip_ok
    for section in (codec_bench._throughput([row]), codec_bench._bits([row])):
        assert f"pcodec columns: n/a, {reason}." in section[3]
        assert "| n/a |" in section[-1]


def test_codec_stages_are_the_codecs_work(tmp_path: Path) -> None:
    """The per-stage profile runs each stage with the codec's choices and checks its output
    against the frame (payload bytes, symbols, values) before timing it."""
    import codec_stages

    assert codec_stages.main(["--quick", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "codec_stages-quick.md").read_text()
    assert "| GG beta=3 @3b |" in report and "rice" in report
    assert "zero_runs_rice" in report  # the sparse tensor's blocks
    # the light-tailed tensors have rANS blocks, and their trade-off against rans=False
    assert "rans" in report and "## rANS blocks: bits against time" in report
    trade = report.split("## rANS blocks: bits against time")[1]
    assert "| GG beta=3 @2b |" in trade and ("Mbit/s |" in trade or "| any |" in trade)
    # at equal bits: each side's step codes the rate, and rANS never costs squared error
    rows = codec_stages.equal_bits(1 << 14, seed=0)
    assert len(rows) == 16
    for r in rows:
        for rans in (False, True):
            assert abs(r[rans]["bits"] - r["bits"]) < 0.01, r
        assert r[True]["mse"] <= r[False]["mse"] * 1.001, r
    assert max(1 - r[True]["mse"] / r[False]["mse"] for r in rows if r["bits"] == 1.5) > 0.1
    assert "## rANS blocks at equal bits" in report


def test_prefix_bounds() -> None:
    # dyadic probabilities (1/2, 1/4, 1/8, 1/8): Huffman is exactly the entropy, per symbol
    # and per pair
    q = np.repeat(np.array([0, 1, -1, 2]), [4000, 2000, 1000, 1000])
    q = np.random.default_rng(0).permutation(q)
    single, pair = codec_bench.prefix_bounds(q)
    assert single == pytest.approx(1.0, abs=1e-12)
    assert pair == pytest.approx(1.0, abs=5e-3)  # the sample's pair histogram is not exact
    # a skewed source (one symbol at 0.9): one codeword per symbol costs at least a bit, far
    # above its 0.57-bit entropy; pairs halve the waste
    q = (np.random.default_rng(1).random(100_000) > 0.9).astype(np.int64)
    single, pair = codec_bench.prefix_bounds(q)
    entropy = codec_bench.empirical_entropy(q)
    assert single == pytest.approx(1.0 / entropy, rel=1e-9)
    assert 1.0 < pair < single
    row = small_row()
    assert 1.0 <= row.huffman_over_entropy <= row.bits_over_entropy + 1e-9
    # (16384 symbols make a sparse pair histogram: the pair code fits it below 1.0 here)
    assert row.pair_huffman_over_entropy <= row.huffman_over_entropy
    assert f"| {row.huffman_over_entropy:.4f} | {row.pair_huffman_over_entropy:.4f} |" in \
        codec_bench._bits([row])[-1]


def test_kernel_ab_compares_two_revisions_kernels(tmp_path: Path, monkeypatch) -> None:
    """The A/B loads another revision's kernels from git as their own module, times both
    (encode and decode) on the same tensors in turn and reports rows whose frames and
    values are the same; a revision one of whose low-level intrinsics has changed since is
    refused."""
    import kernel_ab

    assert kernel_ab.main(["--base", "HEAD", "--mib", "0.0625", "--reps", "1",
                           "--out", str(tmp_path)]) == 0
    report = (tmp_path / "kernel_ab.md").read_text()
    data = json.loads((tmp_path / "kernel_ab.json").read_text())
    assert len(data["rows"]) == len(kernel_ab.GG) + 2
    assert all(r[f"{w}_{k}_ns"] > 0 for r in data["rows"] for w in ("base", "this")
               for k in ("encode", "decode"))
    assert all(r["encode_speedup"] > 0 and r["decode_speedup"] > 0 for r in data["rows"])
    assert "| GG beta=3 @3b |" in report and "zeros, GG beta=1 nonzeros" in report
    wide = data["rows"][-1]  # half zeros and wide symbols: zero runs, most symbols past 63
    assert any(m.startswith("zero_runs") for m in wide["modes"]) and wide["bits"] > 4

    real_git = kernel_ab._git
    edit = {}

    def other_intrinsics(*args: str) -> str:
        out = real_git(*args)
        return edit.get("f", str)(out) if args[-1].endswith("_intrinsics.py") else out

    monkeypatch.setattr(kernel_ab, "_git", other_intrinsics)
    # an intrinsic added since that revision (here: one it lacks) leaves it comparable
    edit["f"] = lambda src: src[:src.index("@intrinsic\ndef f64_from_bits")]
    assert kernel_ab.load_kernels("HEAD", tmp_path).clz64 is kernel_ab.eg.clz64
    edit["f"] = lambda src: src + "# a comment changes no definition\n"
    kernel_ab.load_kernels("HEAD", tmp_path)
    edit["f"] = lambda src: src.replace("llvm.ctlz.i64", "llvm.cttz.i64")  # one that changed
    with pytest.raises(ValueError, match=r"_intrinsics.py differs at HEAD \(clz64\)"):
        kernel_ab.load_kernels("HEAD", tmp_path)
