"""Codec benchmark: ggcomm encode/decode speed and bits per element, side by side with the
fp16 cast, zstd level 1 and lz4 measured in the same run on the same tensors, and pcodec on
the same quantized symbols ggcomm codes (its columns say why they are empty when the
``pcodec`` package is not installed).

Data: generalized-Gaussian samples (beta 0.5, 1, 2, 3) at about 2, 3 and 4.5 bits per element,
real gradients of a tiny transformer-like model, and a 90%-zeros sparse tensor.

    python benchmarks/codec_bench.py                 # 1, 16, 256 MiB -> results/codec.{md,json}
    python benchmarks/codec_bench.py --quick         # 1, 4 MiB, 1 rep -> codec-quick.{md,json}
    python benchmarks/codec_bench.py --sizes-mib 1 16 --reps 3 --out /tmp/bench

Throughput is GB/s (1e9 bytes) of float32 input: 4 * numel / median seconds, the median of
``--reps`` timed calls after one untimed warm-up call.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lz4
import lz4.frame
import numba
import numpy as np
import torch
import zstandard
from torch import nn
from tqdm import tqdm

import ggcomm
from ggcomm import gg, rate
from ggcomm.tools.train import Step, draws, fit
from ggcomm.tools.workload import lm_loss

try:
    import pcodec
    from pcodec import standalone as pco_standalone
except ImportError as err:  # optional: the pcodec columns then say why they are empty
    pcodec = pco_standalone = None
    PCODEC_MISSING = f"pcodec is not installed ({err})"
else:
    PCODEC_MISSING = ""

MIB = 1 << 20
KIB = 1 << 10
GG_BETAS = (0.5, 1.0, 2.0, 3.0)
GG_TARGET_BITS = (2.0, 3.0, 4.5)
GRAD_TARGET_BITS = 3.0
SPARSE_ZERO_FRACTION = 0.9
SPARSE_TARGET_BITS = (3.0, 4.5)  # bits per element predicted for the Gaussian (nonzero) part
FIT_SAMPLE = 1 << 20
OVERHEAD_SIZES_KIB = (4, 64, 256, 1024)
MIN_SAMPLE_SECONDS = 0.02  # shorter calls are looped inside one timed sample

# Targets (see the "Targets" section of the report).
TARGET_GBPS = 4.0
TARGET_SPEED_MIN_MIB = 16
# frame bits / entropy at most this at each GG target rate (the lowest rate gets more: a
# prefix code spends at least one bit on the most frequent symbol)
TARGET_ENTROPY_SLACK = {2.0: 1.08, 3.0: 1.05, 4.5: 1.05}
TARGET_HEADER_PCT = 1.0
TARGET_HEADER_MIN_BYTES = 256 * KIB
TARGET_SPARSE_BITS = 0.9


# --------------------------------------------------------------------------- records


@dataclass
class Baselines:
    """What the non-ggcomm paths cost on one float32 tensor (shared by its codec rows)."""

    fp16_gbps: float  # x.half()
    zstd_c_gbps: float  # zstd level 1 compress of the raw float32 bytes
    zstd_d_gbps: float
    lz4_c_gbps: float  # lz4.frame (default level) compress of the raw float32 bytes
    lz4_d_gbps: float
    zstd_raw_bits: float  # bits per element of zstd level 1 on the raw float32 bytes
    lz4_raw_bits: float


@dataclass
class PcodecResult:
    """pcodec's standalone format (default ChunkConfig) on one row's quantized symbols."""

    dtype: str  # integer type the symbols were handed to pcodec as
    bits: float  # bits per element of the whole standalone file
    c_gbps: float  # simple_compress, GB/s of the float32 input the symbols stand for
    d_gbps: float  # simple_decompress (allocating), same unit


@dataclass
class CodecRow:
    """One (data, step, size) measurement."""

    data: str  # "gg", "grad" or "sparse"
    label: str
    size_mib: float
    numel: int
    step: float
    target_bits: float  # the rate the step was chosen for
    beta: float | None  # GG shape the data was drawn with (gg only)
    fit_beta: float | None  # shape fitted on the sample the step came from
    threads_ggcomm: int
    threads_torch: int
    encode_gbps: float
    decode_out_gbps: float  # decode(frame, out=preallocated)
    decode_alloc_gbps: float  # decode(frame), allocating its result
    frame_bits: float  # all frame bytes
    payload_bits: float
    header_pct: float  # (frame - payload) bytes as % of the frame (header + CRC)
    entropy_bits: float  # empirical entropy of the quantized symbols
    bits_over_entropy: float  # frame_bits / entropy_bits
    # what the best prefix codes reach on the same symbols (a sample, see prefix_bounds):
    # Huffman's bits / entropy, one codeword per symbol and one per pair of symbols
    huffman_over_entropy: float
    pair_huffman_over_entropy: float
    zero_symbol_fraction: float
    zero_run_block_fraction: float
    rice_block_fraction: float  # blocks in Golomb-Rice mode (FORMAT.md mode 2)
    rans_block_fraction: float  # blocks in rANS mode (FORMAT.md mode 4)
    mean_k: float  # mean Exp-Golomb order over "eg" blocks (nan if none)
    mean_k_rice: float  # mean Golomb-Rice parameter over "rice" blocks (nan if none)
    q_dtype: str  # integer type the quantized symbols were stored as for zstd / lz4
    zstd_q_bits: float
    lz4_q_bits: float
    roundtrip_ok: bool  # decode == float32(float64(q) * step), bit for bit
    baselines: Baselines
    pcodec: PcodecResult | None  # None when pcodec cannot be imported (PCODEC_MISSING)


@dataclass
class OverheadRow:
    """Header overhead of one small GG frame."""

    input_bytes: int
    numel: int
    blocks: int
    frame_bytes: int
    payload_bytes: int
    header_bytes: int  # everything before the payload
    overhead_pct: float  # (frame - payload) / frame, the 4-byte CRC included
    frame_bits: float
    payload_bits: float


@dataclass
class TargetResult:
    name: str
    met: bool
    detail: str


@dataclass
class DataSpec:
    """A family of tensors: ``make(numel)`` gives the data, each setting a (label, step)."""

    data: str
    name: str
    make: Callable[[int], torch.Tensor]
    settings: list[Setting]
    beta: float | None = None


@dataclass
class Setting:
    """One quantization step for a data family: fixed, or ``rms_factor * rms(x)``."""

    label: str
    target_bits: float
    fixed_step: float | None = None
    rms_factor: float | None = None
    fit_beta: float | None = None

    def step_for(self, x: torch.Tensor) -> float:
        if self.fixed_step is not None:
            return self.fixed_step
        return self.rms_factor * rms(x)


@dataclass
class Config:
    sizes_mib: list[float]
    reps: int
    quick: bool
    seed: int
    zstd_threads: int


# --------------------------------------------------------------------------- helpers


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    """Median seconds per call of ``fn`` over ``reps`` timed samples after a warm-up call.

    A call shorter than ``MIN_SAMPLE_SECONDS`` (judged by the warm-up) is repeated in a loop
    inside each sample, so microsecond calls are not lost in timer and scheduling noise.
    """
    t0 = time.perf_counter()
    fn()
    warm = time.perf_counter() - t0
    loops = max(1, math.ceil(MIN_SAMPLE_SECONDS / max(warm, 1e-9)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        times.append((time.perf_counter() - t0) / loops)
    return statistics.median(times)


def gbps(numel: int, seconds: float) -> float:
    return 4.0 * numel / seconds / 1e9


def bits_per_element(nbytes: int, numel: int) -> float:
    return 8.0 * nbytes / numel


def empirical_entropy(q: np.ndarray) -> float:
    """Zeroth-order entropy of integer symbols (bits/element); a histogram, not a sort."""
    lo, hi = int(q.min()), int(q.max())
    if hi - lo > 1 << 24:
        return rate.entropy_bits(q)
    counts = np.bincount((q - lo).ravel())
    p = counts[counts > 0] / q.size
    return float(-(p * np.log2(p)).sum())


# symbols the prefix-code bounds are computed on (the tensor's first ones): enough for
# three decimals of the ratio, and np.unique of pairs stays cheap at 256 MiB
PREFIX_BOUND_SAMPLE = 1 << 22


def prefix_bounds(q: np.ndarray) -> tuple[float, float]:
    """(Huffman bits / entropy, pair-Huffman bits / entropy) of the first
    PREFIX_BOUND_SAMPLE symbols: the best any code with one codeword per symbol (per pair of
    symbols) can do on them, from their own histogram (table cost not counted)."""
    s = q.ravel()[:PREFIX_BOUND_SAMPLE].astype(np.int64)
    s = s[: s.size // 2 * 2]
    h = empirical_entropy(s)
    if s.size == 0 or h <= 0:
        return math.nan, math.nan
    u = np.where(s > 0, 2 * s - 1, -2 * s)
    pairs = u[0::2] * (int(u.max()) + 1) + u[1::2]
    return rate.huffman_bits(s) / h, rate.huffman_bits(pairs) / 2 / h


def narrowest_int(lo: int, hi: int) -> np.dtype:
    for dt in (np.int8, np.int16, np.int32):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dt)
    return np.dtype(np.int64)


def free_memory() -> None:
    gc.collect()


# --------------------------------------------------------------------------- data


class TinyLM(nn.Module):
    """Token + position embedding, one pre-norm attention block, an MLP 256->1024->256, head."""

    def __init__(self, vocab: int = 2048, dim: int = 256, hidden: int = 1024, seq: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads=4, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.head = nn.Linear(dim, vocab)
        mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)
        self.register_buffer("causal", mask)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logits, loss)``, the loss (next-token cross-entropy) given ``targets``."""
        seq = idx.shape[1]
        h = self.tok(idx) + self.pos(torch.arange(seq))
        a = self.norm1(h)
        h = h + self.attn(a, a, a, attn_mask=self.causal[:seq, :seq], need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        logits = self.head(h)
        return logits, None if targets is None else lm_loss(logits, targets)


def model_gradients(seed: int, steps: int = 4, batch: int = 16) -> list[torch.Tensor]:
    """Flat float32 gradients of every parameter over ``steps`` SGD steps on random tokens,
    in order (step, parameter). Deterministic for a seed."""
    torch.manual_seed(seed)
    model = TinyLM()
    gen = torch.Generator().manual_seed(seed)
    vocab, seq = model.tok.num_embeddings, model.pos.num_embeddings

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, vocab, (batch, seq), generator=gen)
        return idx, torch.randint(0, vocab, (batch, seq), generator=gen)

    pieces: list[torch.Tensor] = []

    def collect(step: Step) -> None:
        pieces.extend(p.grad.detach().reshape(-1).float().clone() for p in model.parameters())

    fit(model, torch.optim.SGD(model.parameters(), lr=0.05), draws(draw), steps,
        after_backward=[collect])  # fmt: skip
    return pieces


def resize_pieces(pieces: list[torch.Tensor], numel: int) -> torch.Tensor:
    """``numel`` elements with the same mix of parameters as the concatenated pieces.

    Longer: the concatenation tiled. Shorter: a prefix of each piece in proportion to its
    size, so a small tensor still holds every layer (and its scale) in order.
    """
    total = sum(p.numel() for p in pieces)
    if numel >= total:
        return torch.cat(pieces).repeat(-(-numel // total))[:numel].contiguous()
    takes = [p.numel() * numel // total for p in pieces]
    largest = max(range(len(pieces)), key=lambda i: pieces[i].numel())
    takes[largest] += numel - sum(takes)
    return torch.cat([p[:t] for p, t in zip(pieces, takes, strict=True)])


def calibrate_rms_factor(sample: torch.Tensor, target_bits: float) -> float:
    """``c`` such that ggcomm codes ``sample`` at ``target_bits`` with step ``rms * c``
    (bisection on log c; the frame's bits fall as the step grows)."""
    scale = rms(sample)
    lo, hi = math.log(1e-4), math.log(1e2)

    def bits(log_c: float) -> float:
        return ggcomm.encode(sample, scale * math.exp(log_c)).bits_per_element

    if not bits(lo) > target_bits > bits(hi):
        raise RuntimeError(f"cannot bracket {target_bits} bits for the gradient step")
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if bits(mid) > target_bits else (lo, mid)
    return math.exp(0.5 * (lo + hi))


def rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt())


def gg_spec(beta: float, seed: int) -> DataSpec:
    fit = gg.fit(gg.sample(FIT_SAMPLE, beta, generator=torch.Generator().manual_seed(seed)))
    settings = []
    for target in GG_TARGET_BITS:
        step = rate.step_for_rate(fit, target)
        settings.append(Setting(f"GG beta={beta:g} @{target:g}b", target, fixed_step=step,
                                fit_beta=fit.beta))

    def make(numel: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed + 1 + numel)
        return gg.sample(numel, beta, generator=gen)

    return DataSpec("gg", f"GG beta={beta:g}", make, settings, beta=beta)


def grad_spec(seed: int) -> DataSpec:
    pieces = model_gradients(seed)
    sample = resize_pieces(pieces, min(FIT_SAMPLE, sum(p.numel() for p in pieces)))
    c = calibrate_rms_factor(sample, GRAD_TARGET_BITS)
    setting = Setting(f"grad @{GRAD_TARGET_BITS:g}b (step={c:.4f}*rms)", GRAD_TARGET_BITS,
                      rms_factor=c, fit_beta=gg.fit(sample).beta)
    return DataSpec("grad", "TinyLM gradients", lambda n: resize_pieces(pieces, n), [setting])


def sparse_spec(seed: int) -> DataSpec:
    fit = gg.fit(torch.randn(FIT_SAMPLE, generator=torch.Generator().manual_seed(seed)))
    settings = []
    for target in SPARSE_TARGET_BITS:
        step = rate.step_for_rate(fit, target)
        label = f"sparse {SPARSE_ZERO_FRACTION:.0%} zeros, nonzeros @{target:g}b"
        settings.append(Setting(label, target, fixed_step=step, fit_beta=fit.beta))

    def make(numel: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed + 1 + numel)
        x = torch.randn(numel, generator=gen)
        x[torch.rand(numel, generator=gen) < SPARSE_ZERO_FRACTION] = 0.0
        return x

    return DataSpec("sparse", "sparse", make, settings)


# --------------------------------------------------------------------------- measurement


def measure_baselines(x: torch.Tensor, reps: int, zstd_threads: int) -> Baselines:
    n = x.numel()
    raw = x.numpy()
    cctx = zstandard.ZstdCompressor(level=1, threads=zstd_threads)
    dctx = zstandard.ZstdDecompressor()
    z = cctx.compress(raw)
    lz = lz4.frame.compress(raw)
    assert dctx.decompress(z) == raw.tobytes() and lz4.frame.decompress(lz) == raw.tobytes()
    return Baselines(
        fp16_gbps=gbps(n, median_seconds(x.half, reps)),
        zstd_c_gbps=gbps(n, median_seconds(lambda: cctx.compress(raw), reps)),
        zstd_d_gbps=gbps(n, median_seconds(lambda: dctx.decompress(z), reps)),
        lz4_c_gbps=gbps(n, median_seconds(lambda: lz4.frame.compress(raw), reps)),
        lz4_d_gbps=gbps(n, median_seconds(lambda: lz4.frame.decompress(lz), reps)),
        zstd_raw_bits=bits_per_element(len(z), n),
        lz4_raw_bits=bits_per_element(len(lz), n),
    )


def measure_pcodec(q: np.ndarray, reps: int) -> PcodecResult | None:
    """pcodec at its default level on integer symbols ``q`` (int8 is widened to int16: pcodec
    refuses 8-bit input unless told otherwise), timed like the other codecs; it runs on one
    thread. Raises if decompressing does not give back ``q`` exactly. None without pcodec."""
    if pco_standalone is None:
        return None
    if q.dtype.itemsize < 2:
        q = q.astype(np.int16)
    config = pcodec.ChunkConfig()
    blob = pco_standalone.simple_compress(q, config)
    back = pco_standalone.simple_decompress(blob)
    if back is None or back.dtype != q.dtype or not np.array_equal(back, q):
        raise RuntimeError(f"pcodec round trip of {q.size} {q.dtype} symbols is not exact")
    n = q.size
    return PcodecResult(
        dtype=q.dtype.name, bits=bits_per_element(len(blob), n),
        c_gbps=gbps(n, median_seconds(lambda: pco_standalone.simple_compress(q, config), reps)),
        d_gbps=gbps(n, median_seconds(lambda: pco_standalone.simple_decompress(blob), reps)))


def measure_codec(spec: DataSpec, setting: Setting, x: torch.Tensor, size_mib: float,
                  base: Baselines, cfg: Config) -> CodecRow:
    n = x.numel()
    step = setting.step_for(x)
    out = torch.empty_like(x)
    t_enc = median_seconds(lambda: ggcomm.encode(x, step), cfg.reps)
    frame = ggcomm.encode(x, step)
    t_dec_out = median_seconds(lambda: ggcomm.decode(frame, out=out), cfg.reps)
    t_dec_alloc = median_seconds(lambda: ggcomm.decode(frame), cfg.reps)
    info = ggcomm.inspect(frame)

    q = rate.quantize(x, step)
    ggcomm.decode(frame, out=out)
    roundtrip_ok = torch.equal(out, (q.double() * step).float())
    qn = q.numpy()
    del q
    entropy = empirical_entropy(qn)
    huffman, pair_huffman = prefix_bounds(qn)
    q_dtype = narrowest_int(int(qn.min()), int(qn.max()))
    zero_fraction = float(np.count_nonzero(qn == 0)) / n
    q_bytes = qn.astype(q_dtype)
    del qn
    zstd_q = zstandard.ZstdCompressor(level=1, threads=cfg.zstd_threads).compress(q_bytes)
    lz4_q = lz4.frame.compress(q_bytes)
    pco = measure_pcodec(q_bytes, cfg.reps)
    del q_bytes

    eg_ks = [b.k for b in info.blocks if b.mode == "eg"]
    rice_ks = [b.k for b in info.blocks if b.mode == "rice"]
    payload = len(info.payload)
    return CodecRow(
        data=spec.data, label=setting.label, size_mib=size_mib, numel=n, step=step,
        target_bits=setting.target_bits, beta=spec.beta, fit_beta=setting.fit_beta,
        threads_ggcomm=ggcomm.get_num_threads(), threads_torch=torch.get_num_threads(),
        encode_gbps=gbps(n, t_enc), decode_out_gbps=gbps(n, t_dec_out),
        decode_alloc_gbps=gbps(n, t_dec_alloc),
        frame_bits=frame.bits_per_element, payload_bits=bits_per_element(payload, n),
        header_pct=100.0 * (frame.nbytes - payload) / frame.nbytes,
        entropy_bits=entropy,
        bits_over_entropy=frame.bits_per_element / entropy if entropy > 0 else math.inf,
        huffman_over_entropy=huffman, pair_huffman_over_entropy=pair_huffman,
        zero_symbol_fraction=zero_fraction,
        zero_run_block_fraction=sum(b.mode in ("zero_runs", "zero_runs_rice")
                                    for b in info.blocks)
        / len(info.blocks),
        rice_block_fraction=len(rice_ks) / len(info.blocks),
        rans_block_fraction=sum(b.mode == "rans" for b in info.blocks) / len(info.blocks),
        mean_k=statistics.fmean(eg_ks) if eg_ks else math.nan,
        mean_k_rice=statistics.fmean(rice_ks) if rice_ks else math.nan,
        q_dtype=q_dtype.name,
        zstd_q_bits=bits_per_element(len(zstd_q), n),
        lz4_q_bits=bits_per_element(len(lz4_q), n),
        roundtrip_ok=roundtrip_ok, baselines=base, pcodec=pco,
    )


def measure_overhead(beta: float, step: float, seed: int) -> list[OverheadRow]:
    rows = []
    for kib in OVERHEAD_SIZES_KIB:
        n = kib * KIB // 4
        x = gg.sample(n, beta, generator=torch.Generator().manual_seed(seed + n))
        frame = ggcomm.encode(x, step)
        info = ggcomm.inspect(frame)
        payload = len(info.payload)
        rows.append(OverheadRow(
            input_bytes=kib * KIB, numel=n, blocks=len(info.blocks), frame_bytes=frame.nbytes,
            payload_bytes=payload, header_bytes=info.header_bytes,
            overhead_pct=100.0 * (frame.nbytes - payload) / frame.nbytes,
            frame_bits=frame.bits_per_element, payload_bits=bits_per_element(payload, n)))
    return rows


def warm_up_kernels() -> None:
    """Compile (or load) the numba kernels before anything is timed."""
    x = torch.randn(1 << 16)
    x[: 1 << 15] = 0.0
    for zero_runs in ("auto", True, False):
        frame = ggcomm.encode(x, 0.1, zero_runs=zero_runs)
        ggcomm.decode(frame)
        ggcomm.decode(frame, out=torch.empty_like(x))


def run_codec(specs: list[DataSpec], cfg: Config) -> list[CodecRow]:
    rows = []
    total = len(cfg.sizes_mib) * sum(len(s.settings) for s in specs)
    with tqdm(total=total, desc="codec", unit="row", file=sys.stderr) as bar:
        for size_mib in cfg.sizes_mib:
            n = int(size_mib * MIB) // 4
            for spec in specs:
                bar.set_postfix_str(f"{spec.name}, {size_mib:g} MiB: data + baselines")
                x = spec.make(n)
                base = measure_baselines(x, cfg.reps, cfg.zstd_threads)
                for setting in spec.settings:
                    bar.set_postfix_str(f"{setting.label}, {size_mib:g} MiB")
                    rows.append(measure_codec(spec, setting, x, size_mib, base, cfg))
                    bar.update()
                    free_memory()
                del x
                free_memory()
    return rows


# --------------------------------------------------------------------------- targets


def _where(row: CodecRow) -> str:
    return f"{row.label}, {row.size_mib:g} MiB"


def evaluate_targets(rows: list[CodecRow], overhead: list[OverheadRow]) -> list[TargetResult]:
    results = []
    all_rows = rows
    # speed targets: tensors of 16 MiB and more (the cast comparison at the largest size)
    rows = [r for r in all_rows if r.size_mib >= TARGET_SPEED_MIN_MIB] or all_rows
    largest = [r for r in rows if r.size_mib == max(r.size_mib for r in rows)]
    for attr, name in (("encode_gbps", "encode"), ("decode_out_gbps", "decode (out=)"),
                       ("decode_alloc_gbps", "decode (allocating)")):
        worst = min(rows, key=lambda r: getattr(r, attr))
        met = sum(getattr(r, attr) >= TARGET_GBPS for r in rows)
        per_size = ", ".join(
            f"{s:g} MiB: {min(getattr(r, attr) for r in rows if r.size_mib == s):.2f}"
            for s in sorted({r.size_mib for r in rows}))
        results.append(TargetResult(
            f"{name} >= {TARGET_GBPS:g} GB/s of float32 input, tensors of "
            f"{TARGET_SPEED_MIN_MIB:g} MiB and more", met == len(rows),
            f"{met}/{len(rows)} rows; min {getattr(worst, attr):.2f} GB/s ({_where(worst)}); "
            f"min per size: {per_size}"))

    for attr, name in (("encode_gbps", "encode"), ("decode_out_gbps", "decode (out=)"),
                       ("decode_alloc_gbps", "decode (allocating)")):
        ratios = [(getattr(r, attr) / r.baselines.fp16_gbps, r) for r in largest]
        worst_ratio, worst = min(ratios, key=lambda t: t[0])
        met = sum(ratio >= 1.0 for ratio, _ in ratios)
        results.append(TargetResult(
            f"{name} no slower than x.half() on the same tensor, {largest[0].size_mib:g} MiB",
            met == len(largest),
            f"{met}/{len(largest)} rows; worst {name} / fp16 throughput {worst_ratio:.2f} "
            f"({_where(worst)})"))

    rows = all_rows
    gg_rows = [r for r in rows if r.data == "gg"]
    for beta in sorted({r.beta for r in gg_rows}):
        for target in sorted({r.target_bits for r in gg_rows if r.beta == beta}):
            group = [r for r in gg_rows if r.beta == beta and r.target_bits == target]
            worst = max(group, key=lambda r: r.bits_over_entropy)
            slack = TARGET_ENTROPY_SLACK[target]
            results.append(TargetResult(
                f"GG beta={beta:g} @~{target:g}b: frame bits <= {slack:g} x "
                "entropy", worst.bits_over_entropy <= slack,
                f"worst over sizes {worst.bits_over_entropy:.4f} "
                f"({worst.frame_bits:.3f} vs {worst.entropy_bits:.3f} b/e, "
                f"{worst.size_mib:g} MiB); the best prefix code on its symbols: "
                f"{worst.huffman_over_entropy:.4f} one codeword per symbol (Huffman), "
                f"{worst.pair_huffman_over_entropy:.4f} per pair"))

    header_sets = (
        ("GG beta=1 @~3b (overhead table)",
         [(o.overhead_pct, f"{o.input_bytes // KIB} KiB") for o in overhead
          if o.input_bytes >= TARGET_HEADER_MIN_BYTES]),
        ("every frame of the main tables",
         [(r.header_pct, _where(r)) for r in rows if 4 * r.numel >= TARGET_HEADER_MIN_BYTES]),
    )
    for which, candidates in header_sets:
        if not candidates:
            continue
        worst_pct, where = max(candidates)
        met = sum(pct < TARGET_HEADER_PCT for pct, _ in candidates)
        results.append(TargetResult(
            f"header overhead < {TARGET_HEADER_PCT:g}% of the frame for inputs >= 256 KiB: "
            f"{which}", met == len(candidates),
            f"{met}/{len(candidates)} frames; worst {worst_pct:.3f}% ({where})"))

    for r in (r for r in rows if r.data == "sparse"):
        results.append(TargetResult(
            f"< {TARGET_SPARSE_BITS:g} bit/element with ~90% zero symbols ({_where(r)})",
            r.frame_bits < TARGET_SPARSE_BITS,
            f"{r.frame_bits:.3f} b/e with {r.zero_symbol_fraction:.1%} zero symbols "
            f"(entropy {r.entropy_bits:.3f}); {r.zero_run_block_fraction:.0%} of blocks in "
            "zero-run mode"))
    return results


# --------------------------------------------------------------------------- report


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = math.nan
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / MIB
                break
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_gib, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "numba": numba.__version__,
        "zstandard": zstandard.__version__,
        "lz4": lz4.version.version,
        "pcodec": importlib.metadata.version("pcodec") if pcodec else "not installed",
        "ggcomm": ggcomm.__version__,
        "ggcomm_threads": ggcomm.get_num_threads(),
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": os.getloadavg(),
    }


def md_section(title: str, text: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown section: a blank line, ``## title``, the paragraph ``text`` (if any), a table."""
    lines = ["", f"## {title}", ""] + ([text, ""] if text else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render_markdown(machine: dict[str, Any], cfg: Config, rows: list[CodecRow],
                    overhead: list[OverheadRow], targets: list[TargetResult]) -> str:
    out = _intro(machine, cfg) + _throughput(rows) + _bits(rows)
    out += md_section(
        "Header overhead vs frame size (GG beta=1, ~3 bits per element)", "",
        ["input", "elements", "blocks", "frame B", "payload B", "header B", "overhead %",
         "frame b/e", "payload b/e"],
        [[f"{o.input_bytes // KIB} KiB", str(o.numel), str(o.blocks), str(o.frame_bytes),
          str(o.payload_bytes), str(o.header_bytes), f"{o.overhead_pct:.3f}",
          f"{o.frame_bits:.3f}", f"{o.payload_bits:.3f}"] for o in overhead])
    n_met = sum(t.met for t in targets)
    out += md_section("Targets", f"Computed from the numbers above: {n_met} of {len(targets)} met.",
                      ["target", "met", "measured"],
                      [[t.name, "yes" if t.met else "**no**", t.detail] for t in targets])
    if cfg.quick:
        out += ["", "Quick run: small sizes and one repetition; timings are indicative only."]
    return "\n".join(out) + "\n"


def _intro(m: dict[str, Any], cfg: Config) -> list[str]:
    """Title, machine, settings and what the data are."""
    return [
        "# ggcomm codec benchmark" + (" (quick run)" if cfg.quick else ""),
        "",
        f"- date: {m['date']}; command: `{m['command']}`",
        f"- CPU: {m['cpu']}, {m['logical_cpus']} logical CPUs ({m['usable_cpus']} usable), "
        f"{m['memory_gib']} GiB memory; {m['platform']}",
        f"- Python {m['python']}, torch {m['torch']}, numpy {m['numpy']}, numba {m['numba']}, "
        f"zstandard {m['zstandard']}, lz4 {m['lz4']}, pcodec {m['pcodec']}, "
        f"ggcomm {m['ggcomm']}",
        f"- threads: ggcomm {m['ggcomm_threads']}, torch {m['torch_threads']}, zstd compress "
        f"{cfg.zstd_threads} (0 = single-threaded; zstd decompress, lz4 and pcodec are "
        "single-threaded)",
        f"- load average (1, 5, 15 min) at start {m['loadavg_start']}, "
        f"at end {m['loadavg_end']}",
        f"- sizes {', '.join(f'{s:g}' for s in cfg.sizes_mib)} MiB of float32; median of "
        f"{cfg.reps} timed sample(s) after one warm-up call (calls under "
        f"{MIN_SAMPLE_SECONDS * 1e3:g} ms are looped within a sample); GB/s = 1e9 bytes of "
        "float32 input per second",
        "",
        "Data: `GG beta=b @Tb` are generalized-Gaussian samples (std 1) with the step from "
        "`rate.step_for_rate(gg.fit(1M-element sample), T)`; `grad` are the gradients of a "
        "tiny transformer-like model (embeddings, one attention block, MLP 256->1024->256, "
        "head; 4 SGD steps on random tokens), per-layer prefixes below the base size and "
        f"tiled above it, step = c * rms(x) with c calibrated to {GRAD_TARGET_BITS:g} frame "
        f"bits; `sparse` is {SPARSE_ZERO_FRACTION:.0%} exact zeros and standard normal "
        "elsewhere, the step chosen for the normal part at the stated rate.",
    ]


def _pco(row: CodecRow, attr: str, fmt: str) -> str:
    """One pcodec cell: ``fmt`` of the row's pcodec ``attr``, or n/a without pcodec."""
    return "n/a" if row.pcodec is None else format(getattr(row.pcodec, attr), fmt)


def _pco_note() -> str:
    return f" pcodec columns: n/a, {PCODEC_MISSING}." if PCODEC_MISSING else ""


def _throughput(rows: list[CodecRow]) -> list[str]:
    """Encode and decode speed next to fp16, zstd, lz4 and pcodec on the same tensors."""
    return md_section(
        "Throughput (GB/s of float32 input)",
        "`dec out=` decodes into a preallocated tensor, `dec alloc` allocates its result. "
        "zstd-1 and lz4 work on the raw float32 bytes. `pco c` / `pco d` are pcodec's "
        "standalone compress and decompress (default level, one thread) of the quantized "
        "symbols of the bits table (`pcodec q`), quantization not included, in GB/s of the "
        "float32 input those symbols stand for. Looped calls re-use one input, so sizes that "
        "fit in the CPU caches are measured cache-hot, for every method alike." + _pco_note(),
        ["data", "MiB", "enc", "dec out=", "dec alloc", "fp16 cast", "enc / fp16",
         "zstd-1 c", "zstd-1 d", "lz4 c", "lz4 d", "pco c", "pco d"],
        [[r.label, f"{r.size_mib:g}", f"{r.encode_gbps:.2f}", f"{r.decode_out_gbps:.2f}",
          f"{r.decode_alloc_gbps:.2f}", f"{r.baselines.fp16_gbps:.2f}",
          f"{r.encode_gbps / r.baselines.fp16_gbps:.2f}", f"{r.baselines.zstd_c_gbps:.2f}",
          f"{r.baselines.zstd_d_gbps:.2f}", f"{r.baselines.lz4_c_gbps:.2f}",
          f"{r.baselines.lz4_d_gbps:.2f}", _pco(r, "c_gbps", ".2f"), _pco(r, "d_gbps", ".2f")]
         for r in rows])


def _bits(rows: list[CodecRow]) -> list[str]:
    """Bits per element of the frame, its parts, the entropy and the other compressors."""
    return md_section(
        "Bits per element",
        "`frame` counts every byte of the frame; `hdr %` is (frame - payload) / frame (block "
        "table, shape, segment and CRC). `H` is the empirical entropy of the quantized "
        "symbols over the whole tensor (zeroth order: per-block adaptation can beat it on "
        "non-stationary data such as gradients). `zstd-1 q` / `lz4 q` compress those symbols "
        "stored as the `q as` integer type, `pcodec q` the same symbols with pcodec's "
        "standalone format at its default level (as int16 where `q as` is int8; decompressed "
        "exactly, else the run stops); `f32` columns compress the raw float32 input. "
        "`ZR blk` is the share of blocks coded as zero runs, `GR blk` in Golomb-Rice mode "
        "(FORMAT.md's mode 2) and `rANS blk` in rANS mode (mode 4, frame format 3), `mean k` "
        "the mean Exp-Golomb order of the EG blocks and "
        "`GR k` the mean Golomb-Rice parameter; `rt` says decode returned exactly "
        "float32(q * step). `HM / H` and `HM2 / H` are what the best prefix codes reach "
        "on the first 4M symbols, over their entropy: Huffman codes built from their own "
        "histogram (no table cost) with one codeword per symbol, and one per pair of "
        "symbols. Every block mode but rANS codes one symbol per codeword, so `HM / H` bounds "
        "what they could reach (the pair histogram of a 1 MiB tensor is "
        "sparse enough that `HM2 / H` is a little optimistic there); rANS is not bound by it."
        + _pco_note(),
        ["data", "MiB", "step", "frame", "payload", "hdr %", "H", "frame / H", "HM / H",
         "HM2 / H", "zero sym",
         "ZR blk", "GR blk", "rANS blk", "mean k", "GR k", "q as", "zstd-1 q", "lz4 q",
         "pcodec q",
         "zstd-1 f32", "lz4 f32", "rt"],
        [[r.label, f"{r.size_mib:g}", f"{r.step:.4g}", f"{r.frame_bits:.3f}",
          f"{r.payload_bits:.3f}", f"{r.header_pct:.3f}", f"{r.entropy_bits:.3f}",
          f"{r.bits_over_entropy:.4f}", f"{r.huffman_over_entropy:.4f}",
          f"{r.pair_huffman_over_entropy:.4f}", f"{r.zero_symbol_fraction:.1%}",
          f"{r.zero_run_block_fraction:.0%}", f"{r.rice_block_fraction:.0%}",
          f"{r.rans_block_fraction:.0%}",
          f"{r.mean_k:.2f}" if math.isfinite(r.mean_k) else "-",
          f"{r.mean_k_rice:.2f}" if math.isfinite(r.mean_k_rice) else "-", r.q_dtype,
          f"{r.zstd_q_bits:.3f}", f"{r.lz4_q_bits:.3f}", _pco(r, "bits", ".3f"),
          f"{r.baselines.zstd_raw_bits:.3f}",
          f"{r.baselines.lz4_raw_bits:.3f}", "ok" if r.roundtrip_ok else "MISMATCH"]
         for r in rows])


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="1 and 4 MiB, 1 repetition; writes codec-quick.{md,json}")
    p.add_argument("--sizes-mib", type=float, nargs="+", default=None,
                   help="input sizes in MiB of float32 (default 1 16 256; quick: 1 4)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions per measurement (default 5; quick: 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="ggcomm.set_num_threads(N) before measuring (default: library default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        ggcomm.set_num_threads(args.threads)
    cfg = Config(
        sizes_mib=args.sizes_mib or ([1.0, 4.0] if args.quick else [1.0, 16.0, 256.0]),
        reps=args.reps or (1 if args.quick else 5),
        quick=args.quick,
        seed=args.seed,
        zstd_threads=ggcomm.get_num_threads() if ggcomm.get_num_threads() > 1 else 0,
    )
    machine = machine_info()
    machine["command"] = " ".join(["python", *sys.argv])

    print("preparing data (GG fits, model gradients) and compiling kernels ...", file=sys.stderr)
    warm_up_kernels()
    specs = [gg_spec(beta, cfg.seed + 1000 * i) for i, beta in enumerate(GG_BETAS)]
    specs += [grad_spec(cfg.seed + 5000), sparse_spec(cfg.seed + 6000)]

    rows = run_codec(specs, cfg)
    gg1 = next(s for s in specs if s.data == "gg" and s.beta == 1.0)
    gg1_3b = next(st for st in gg1.settings if st.target_bits == 3.0)
    overhead = measure_overhead(1.0, gg1_3b.fixed_step, cfg.seed + 7000)
    targets = evaluate_targets(rows, overhead)
    machine["loadavg_end"] = os.getloadavg()

    args.out.mkdir(parents=True, exist_ok=True)
    stem = "codec-quick" if cfg.quick else "codec"
    md = render_markdown(machine, cfg, rows, overhead, targets)
    (args.out / f"{stem}.md").write_text(md)
    payload = {
        "machine": machine,
        "config": asdict(cfg),
        "codec_rows": [asdict(r) for r in rows],
        "overhead_rows": [asdict(o) for o in overhead],
        "targets": [asdict(t) for t in targets],
    }
    (args.out / f"{stem}.json").write_text(json.dumps(_jsonable(payload), indent=2) + "\n")
    print(md)
    print(f"wrote {args.out / (stem + '.md')} and {args.out / (stem + '.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
