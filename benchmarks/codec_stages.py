"""Where the codec's time goes: each stage of encode and decode timed on its own, one thread.

The codec's kernels (``ggcomm.kernels.eg``) run each block through a few stages. This
benchmark drives every stage separately over all blocks of one tensor, on one thread, with
the same choices the codec made for that tensor (read back from its frame), and times them
against the whole kernel, the whole Python call and ``x.half()`` on the same tensor:

- encode: ``quantize`` (x -> symbols, exceptions counted), ``choose`` (the per-block
  histograms the exact code choice reads, from the nonzeros alone in mostly-zero blocks,
  and the choice: EG and Golomb-Rice orders, the zero-run bound and, where considered, the
  run histograms), ``write`` (the bit writer);
- decode: ``read`` (codewords -> symbols: the table decoder and its checks), ``dequantize``
  (symbols -> ``q * step`` as float32).

Every stage's output is checked against the codec's (the writer's bytes are the frame's
payload, the reader's symbols the quantized ones), so the stages are the codec's own work.

    python benchmarks/codec_stages.py            # 16 MiB tensors -> results/codec_stages.{md,json}
    python benchmarks/codec_stages.py --quick    # 1 MiB, 1 rep -> codec_stages-quick.{md,json}
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch
from numba import njit

import ggcomm
from ggcomm import codec, gg, rate
from ggcomm.kernels import eg

RESULTS = Path(__file__).resolve().parent / "results"
DATA = ((0.5, 3.0), (1.0, 3.0), (2.0, 3.0), (3.0, 2.0), (3.0, 3.0), (2.0, 4.5))  # (shape, bits)
SPARSE = (0.9, 4.5)  # zero fraction, bits of the Gaussian nonzeros
EQUAL_BITS = ((1.0, 1.5, 2.0, 3.0), (1.5, 2.0, 2.5, 3.0))  # shapes and rates of that table


# --------------------------------------------------------------------------- stage drivers
# Each runs one stage over every block, as encode_blocks / decode_blocks do, and nothing else.


@njit(nogil=True)
def _quantize(x, starts, counts, invs, lims, scratch):
    nexc = 0
    for b in range(starts.size):
        nexc += eg._quantize_to(x, starts[b], counts[b], invs[b], lims[b], scratch)
    return nexc


@njit(nogil=True)
def _symbols(x, starts, counts, invs, lims, u):
    for b in range(starts.size):
        s = starts[b]
        eg._quantize_to(x, s, counts[b], invs[b], lims[b], u[s:s + counts[b]])


@njit(nogil=True)
def _choose(u, starts, counts, prefix_bits, T):
    """What _code_block does before it writes, up to mode 4: the histograms and the exact
    choice among modes 0-3 (zero runs considered as with the codec's default,
    zero_runs="auto"); each block's bits go to prefix_bits, its small-symbol tables to T."""
    _, H, Hrun, Hval, Ts, pos, _, _, _ = eg._work_arrays(counts, 0, starts.size)
    bits = 0
    hint = eg.RUNS_WON
    for b in range(starts.size):
        s = starts[b]
        choice = eg._choose_code(u[s:s + counts[b]], counts[b], -1, 1, H, Hrun, Hval, Ts, pos,
                                 hint)
        prefix_bits[b] = choice[3]
        hint = choice[5]
        T[b] = Ts[0]
        bits += prefix_bits[b]
    return bits


@njit(nogil=True)
def _rans(u, starts, counts, prefix_bits, T, Rs, Ws, nws):
    """Mode 4's part of _code_block: its table and estimate for every block, and the coding
    itself where the estimate passes (_rans_try); each block's table and states go to Rs[b],
    its words to Ws[b] (nws[b] of them, 0 where mode 4 is not used). Returns the blocks'
    bits with mode 4 where it is used."""
    bits = 0
    for b in range(starts.size):
        s = starts[b]
        n, nws[b], rbits = eg._rans_try(u[s:s + counts[b]], counts[b], -1, 1, T[b], Rs[b],
                                        Ws[b], prefix_bits[b])
        bits += rbits if n else prefix_bits[b]
    return bits


@njit(nogil=True)
def _write(u, starts, counts, modes, ks, kruns, Rs, Ws, nws, out):
    """The bit writer (mode 4: the table, states and words coded by the _rans stage);
    zero-run blocks also find their nonzeros' positions here (in the codec the choice stage
    already has them)."""
    p = 0
    pos = np.empty(max(1, counts.max()), np.int32)
    quads = eg._work_arrays(counts, 0, starts.size)[-1]
    for b in range(starts.size):
        s = starts[b]
        us = u[s:s + counts[b]]
        if modes[b] == eg.MODE_RANS:
            p = eg._write_rans(out, p, ks[b] + 1, Rs[b], Ws[b], nws[b])
            continue
        nnz = eg._nonzero_positions(us, counts[b], pos) if eg.is_zero_runs(modes[b]) else 0
        p, _ = eg._write_block(us, counts[b], modes[b], ks[b], kruns[b], out, p, pos, nnz,
                               quads)
    return p


@njit(nogil=True)
def _read(payload, starts, counts, modes, ks, kruns, bits, offsets, luts, u):
    """The codec's reader, eg.LANES blocks at a time, each group straight into u (the
    blocks of one segment of equal blocks lie one block length apart there)."""
    for b0 in range(0, counts.size, eg.LANES):
        g = min(eg.LANES, counts.size - b0)
        err, _ = eg._decode_group(payload, b0, g, counts, modes, ks, kruns, bits, offsets, luts,
                                  u[starts[b0]:], counts[b0])
        if err:
            return err
    return 0


@njit(nogil=True)
def _dequantize(u, starts, counts, steps, out):
    for b in range(starts.size):
        s = starts[b]
        eg._dequantize(u[s:s + counts[b]], s, counts[b], steps[b], out)


# --------------------------------------------------------------------------- measurement


def median_ns_per_element(fn, n: int, reps: int) -> float:
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) / n * 1e9


def make(beta: float | None, bits: float, numel: int, seed: int) -> tuple[str, torch.Tensor,
                                                                          float]:
    gen = torch.Generator().manual_seed(seed)
    if beta is None:  # sparse: Gaussian nonzeros
        zeros, _ = SPARSE
        step = rate.step_for_rate(gg.fit(torch.randn(1 << 20, generator=gen)), bits)
        x = torch.randn(numel, generator=gen)
        x[torch.rand(numel, generator=gen) < zeros] = 0.0
        return f"sparse {zeros:.0%} zeros @{bits:g}b", x, step
    x = gg.sample(numel, beta, generator=gen)
    step = rate.step_for_rate(gg.fit(x[: 1 << 20]), bits)
    return f"GG beta={beta:g} @{bits:g}b", x, step


def measure(label: str, x: torch.Tensor, step: float, reps: int) -> dict:
    n = x.numel()
    xs = x.numpy()
    frame = codec.encode(x, step)
    buf, h = codec._frame_and_header(frame)
    starts, counts, seg = h.layout
    modes, ks, kruns, bits, offsets = codec._block_arrays(h)
    invs = 1.0 / h.steps[seg]
    lims = codec._code_limits(h.steps, torch.float32)[0][seg]
    payload = buf[h.payload_off:h.payload_off + h.payload_len]
    luts = codec._luts()

    u = np.empty(n, np.int32)
    _symbols(xs, starts, counts, invs, lims, u)
    nb = starts.size
    prefix_bits = np.empty(nb, np.int64)
    tables = np.empty((nb, 4 * eg._LANE), np.int64)
    rs = np.zeros((nb, 4, eg.RANS_ALPHABET), np.int64)
    ws = np.empty((nb, int(counts.max()) + 8), np.uint16)
    nws = np.zeros(nb, np.int64)
    _choose(u, starts, counts, prefix_bits, tables)
    if _rans(u, starts, counts, prefix_bits, tables, rs, ws, nws) != int(bits.sum()):
        raise RuntimeError(f"{label}: the choose and rANS stages' bits are not the frame's")
    out = np.zeros(h.payload_len + 64, np.uint8)
    written = _write(u, starts, counts, modes, ks, kruns, rs, ws, nws, out)
    decoded = np.empty(n, np.int32)
    values = np.empty(n, np.float32)
    # the stages are the codec's own work: same bytes, same symbols, same values
    if written != h.payload_len or not np.array_equal(out[:written], payload):
        raise RuntimeError(f"{label}: the write stage's bytes are not the frame's payload")
    if _read(payload, starts, counts, modes, ks, kruns, bits, offsets, luts, decoded) != 0 or \
            not np.array_equal(decoded, u):
        raise RuntimeError(f"{label}: the read stage's symbols are not the quantized ones")
    _dequantize(decoded, starts, counts, h.steps[seg], values)
    if not torch.equal(torch.from_numpy(values), codec.decode(frame)):
        raise RuntimeError(f"{label}: the dequantize stage's values are not decode's")

    scratch = np.empty(int(counts.max()), np.int32)
    t = {
        "quantize": median_ns_per_element(
            lambda: _quantize(xs, starts, counts, invs, lims, scratch), n, reps),
        "choose": median_ns_per_element(
            lambda: _choose(u, starts, counts, prefix_bits, tables), n, reps),
        "rANS": median_ns_per_element(
            lambda: _rans(u, starts, counts, prefix_bits, tables, rs, ws, nws), n, reps),
        "write": median_ns_per_element(
            lambda: _write(u, starts, counts, modes, ks, kruns, rs, ws, nws, out), n, reps),
        "encode kernel": median_ns_per_element(
            lambda: eg.encode_blocks(xs, starts, counts, invs, lims, 0, starts.size, -1, 1,
                                     np.empty(sum(eg.worst_case_bytes(int(c), 1)
                                                  for c in counts), np.uint8),
                                     np.zeros((starts.size, 5), np.int64)), n, reps),
        "ggcomm.encode": median_ns_per_element(lambda: codec.encode(x, step), n, reps),
        "read": median_ns_per_element(
            lambda: _read(payload, starts, counts, modes, ks, kruns, bits, offsets, luts, decoded),
            n, reps),
        "dequantize": median_ns_per_element(
            lambda: _dequantize(decoded, starts, counts, h.steps[seg], values), n, reps),
        "decode kernel": median_ns_per_element(
            lambda: eg.decode_blocks(payload, starts, counts, h.steps[seg], 0, starts.size,
                                     modes, ks, kruns, bits, offsets, luts, h.exc_pos, values),
            n, reps),
        "ggcomm.decode(out=)": median_ns_per_element(
            lambda: codec.decode(frame, out=torch.from_numpy(values)), n, reps),
        "ggcomm.decode(out=, keep_out=False)": median_ns_per_element(
            lambda: codec.decode(frame, out=torch.from_numpy(values), keep_out=False), n,
            reps),
        "ggcomm.decode": median_ns_per_element(lambda: codec.decode(frame), n, reps),
        "x.half()": median_ns_per_element(lambda: x.half(), n, reps),
    }
    names = [b.mode for b in codec.inspect(frame).blocks]
    row = {"label": label, "numel": n, "step": step, "bits": frame.bits_per_element,
           "modes": {m: names.count(m) for m in sorted(set(names))}, "ns_per_element": t}
    if "rans" in names:  # the same tensor without mode 4 (the transports' default)
        plain = codec.encode(x, step, rans=False)
        row["without_rans"] = {
            "bits": plain.bits_per_element,
            "ggcomm.encode": median_ns_per_element(
                lambda: codec.encode(x, step, rans=False), n, reps),
            "ggcomm.decode": median_ns_per_element(lambda: codec.decode(plain), n, reps)}
    return row


def step_at_bits(x: torch.Tensor, bits: float, rans: bool) -> float:
    """The step at which ``ggcomm.encode(x, step, rans=rans)`` codes ``bits`` per element
    (bisection on the log step over the frame's own bits, which fall as the step grows)."""
    lo, hi = 1e-6, 1e3
    for _ in range(48):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if codec.encode(x, mid, rans=rans).bits_per_element > bits \
            else (lo, mid)
    return (lo * hi) ** 0.5


def equal_bits(numel: int, seed: int) -> list[dict]:
    """For GG samples, the squared error with and without rANS blocks at the same frame
    bits: where mode 4 saves bits, the rate spends them on a finer step."""
    rows = []
    for i, beta in enumerate(EQUAL_BITS[0]):
        x = gg.sample(numel, beta, generator=torch.Generator().manual_seed(seed + i))
        for bits in EQUAL_BITS[1]:
            row = {"beta": beta, "bits": bits}
            for rans in (False, True):
                step = step_at_bits(x, bits, rans)
                frame = codec.encode(x, step, rans=rans)
                row[rans] = {"step": step, "bits": frame.bits_per_element,
                             "mse": float((codec.decode(frame) - x).double().pow(2).mean())}
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- report

ENCODE = ("quantize", "choose", "rANS", "write")
DECODE = ("read", "dequantize")


def _rans_tradeoff(rows: list[dict]) -> list[str]:
    """The rANS blocks' bits against their time: the tensors with mode-4 blocks, coded with
    and without them (``rans=False``), and the link rate below which the bits saved are
    worth the codec time spent (both sides, one thread each)."""
    rows = [r for r in rows if "without_rans" in r]
    if not rows:
        return []
    lines = [
        "",
        "## rANS blocks: bits against time",
        "",
        "The tensors above that have rANS (mode 4) blocks, coded again with `rans=False` "
        "(the transports' default, `TRANSPORT_RANS`). `break-even link` is the link rate at "
        "which the bits saved take as long to send as the extra encode and decode time "
        "(one thread each side): on a faster link mode 4 makes a transfer slower.",
        "",
        "| data | bits | bits, rans=False | saved | encode ns | encode ns, rans=False | "
        "decode ns | decode ns, rans=False | break-even link |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w, t = r["without_rans"], r["ns_per_element"]
        saved = w["bits"] - r["bits"]
        extra = (t["ggcomm.encode"] - w["ggcomm.encode"]) + (t["ggcomm.decode"]
                                                              - w["ggcomm.decode"])
        link = f"{1000.0 * saved / extra:.0f} Mbit/s" if extra > 0 else "any"
        lines.append(
            f"| {r['label']} | {r['bits']:.3f} | {w['bits']:.3f} | "
            f"{100.0 * saved / w['bits']:.1f}% | {t['ggcomm.encode']:.2f} | "
            f"{w['ggcomm.encode']:.2f} | {t['ggcomm.decode']:.2f} | {w['ggcomm.decode']:.2f} | "
            f"{link} |")
    return lines


def _equal_bits_table(rows: list[dict], numel: int) -> list[str]:
    lines = [
        "",
        "## rANS blocks at equal bits: the squared error",
        "",
        f"GG samples (unit variance, {numel} elements) coded at the same frame bits with "
        "and without rANS blocks: each column's step is the one at which the frame codes "
        "the rate (bisection on the codec's own bits), so the bits mode 4 saves go into a "
        "finer step, as the transports' rate loops spend them. One codeword per symbol "
        "costs the most at fractional rates (at whole bits a Golomb-Rice order fits).",
        "",
        "| GG shape | bits | step, rans=False | step, rans=True | squared error, rans=False "
        "| squared error, rans=True | less error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r[False], r[True]
        gain = 10.0 * np.log10(a["mse"] / b["mse"])
        lines.append(
            f"| {r['beta']:g} | {r['bits']:g} ({a['bits']:.3f} / {b['bits']:.3f}) | "
            f"{a['step']:.4f} | {b['step']:.4f} | {a['mse']:.5f} | {b['mse']:.5f} | "
            f"{100.0 * (1 - b['mse'] / a['mse']):.1f}% ({gain:.2f} dB) |")
    return lines


def render(rows: list[dict], args: argparse.Namespace, machine: str,
           eq_rows: list[dict], eq_numel: int) -> str:
    lines = [
        "# Codec stages: where encode and decode spend their time",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}; "
        f"command: `python benchmarks/codec_stages.py{' --quick' if args.quick else ''}`",
        f"- {machine}",
        f"- one thread (`ggcomm.set_num_threads(1)`, `torch.set_num_threads(1)`); "
        f"{args.mib:g} MiB of float32 per tensor; median of {args.reps} timed runs after a "
        "warm-up; ns per element (divide 4 by it for GB/s of float32)",
        "",
        "Each stage runs alone over every block with the codec's own choices for the tensor "
        "(its outputs are checked against the frame: the same payload bytes, symbols and "
        "values). `choose` is the exact code choice with the histograms it reads (EG and "
        "Golomb-Rice orders, the zero-run bound and run histograms where considered; a "
        "mostly-zero block is histogrammed from its nonzeros alone). `rANS` is mode 4's "
        "part: its frequency table and size estimate for every block, and the rANS coding "
        "itself where the estimate passes (the coded words are kept, so `write` only copies "
        "them for mode-4 blocks). `encode kernel` / "
        "`decode kernel` are the codec's fused kernels over all blocks; `ggcomm.encode` / "
        "`ggcomm.decode` the whole calls (frame assembly, CRC, exceptions, allocation; "
        "`decode(out=)` decodes into scratch and copies, so a corrupt frame leaves `out` "
        "untouched; `keep_out=False`, for receive buffers such as `PipeComm`'s, decodes "
        "straight into `out`).",
        "",
        "| data | bits | blocks | " + " | ".join(ENCODE) + " | sum | encode kernel | "
        "ggcomm.encode | " + " | ".join(DECODE) + " | sum | decode kernel | "
        "ggcomm.decode(out=) | decode(out=, keep_out=False) | ggcomm.decode | x.half() |",
        "|---" * (13 + len(ENCODE) + len(DECODE)) + "|",
    ]
    for r in rows:
        t = r["ns_per_element"]
        enc = [t[k] for k in ENCODE]
        dec = [t[k] for k in DECODE]
        modes = ", ".join(f"{m} {c}" for m, c in r["modes"].items())
        lines.append(
            f"| {r['label']} | {r['bits']:.3f} | {modes} | "
            + " | ".join(f"{v:.2f}" for v in enc) + f" | {sum(enc):.2f} | "
            f"{t['encode kernel']:.2f} | {t['ggcomm.encode']:.2f} | "
            + " | ".join(f"{v:.2f}" for v in dec) + f" | {sum(dec):.2f} | "
            f"{t['decode kernel']:.2f} | {t['ggcomm.decode(out=)']:.2f} | "
            f"{t['ggcomm.decode(out=, keep_out=False)']:.2f} | "
            f"{t['ggcomm.decode']:.2f} | {t['x.half()']:.2f} |")
    lines += _rans_tradeoff(rows)
    lines += _equal_bits_table(eq_rows, eq_numel)
    need = 4.0 / (4.0 / 1.5)  # ns/element per thread: 4 GB/s on 2 threads scaling 1.5x
    worst_enc = max(rows, key=lambda r: r["ns_per_element"]["ggcomm.encode"])
    worst_dec = max(rows, key=lambda r: r["ns_per_element"]["ggcomm.decode"])
    lines += [
        "",
        "## What limits the 4 GB/s target",
        "",
        f"4 GB/s of float32 on 2 threads that scale about 1.5x (this machine's two threads "
        f"share one core) needs about {need:.2f} ns per element per thread for the whole "
        f"call. Measured here: encode up to {worst_enc['ns_per_element']['ggcomm.encode']:.2f} "
        f"ns ({worst_enc['label']}), decode up to "
        f"{worst_dec['ns_per_element']['ggcomm.decode']:.2f} ns ({worst_dec['label']}); "
        "the table shows which stages hold the rest.",
        "",
    ]
    return "\n".join(lines)


def machine_line() -> str:
    """The machine and versions, as the results' header gives them."""
    return (f"{platform.machine()}, {os.cpu_count()} logical CPUs; Python "
            f"{platform.python_version()}, torch {torch.__version__}, numpy "
            f"{np.__version__}, numba {numba.__version__}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=float, default=16.0)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="1 MiB, 1 rep")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.mib, args.reps = 1.0, 1
    out_dir = args.out or RESULTS
    torch.set_num_threads(1)
    ggcomm.set_num_threads(1)
    numel = int(args.mib * (1 << 20)) // 4
    rows = []
    for i, (beta, bits) in enumerate([*DATA, (None, SPARSE[1])]):
        label, x, step = make(beta, bits, numel, seed=i)
        rows.append(measure(label, x, step, args.reps))
        print(f"{label}: done", file=sys.stderr)
    eq_numel = 1 << (16 if args.quick else 20)
    eq_rows = equal_bits(eq_numel, seed=100)
    machine = machine_line()
    name = "codec_stages" + ("-quick" if args.quick else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text(render(rows, args, machine, eq_rows, eq_numel))
    (out_dir / f"{name}.json").write_text(json.dumps(
        {"machine": machine, "rows": rows,
         "equal_bits": [{"beta": r["beta"], "bits": r["bits"], "rans=False": r[False],
                         "rans=True": r[True]} for r in eq_rows]}, indent=1))
    print(f"wrote {out_dir / name}.md and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
