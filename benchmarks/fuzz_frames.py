"""Fuzz the frame decoder: mutated and forged frames may only ever raise FrameError.

Valid frames of several dtypes, shapes, sparsities, block sizes and segmentations are
mutated (truncated, extended, bit-flipped with and without the CRC recomputed, header,
shape, segment, block-table and exception fields set to edge values with the CRC
recomputed, payload bytes rewritten, random bytes, spliced frames, frames forged from
random fields, including valid zero-run frames claiming far more elements than
``--max-numel``) and handed to ``inspect``, ``Frame.from_buffer``, ``decode`` (with and
without ``out=``, with ``max_numel``) and ``decode_symbols``. It is a failure when

- anything but FrameError is raised (TypeError, MemoryError, IndexError, ...);
- the entry points disagree (one accepts a frame another rejects);
- a frame that decodes is not what its own header and codes describe: dtype, shape and
  numel from the header, every value ``float64(q) * step`` rounded as FORMAT.md says
  (``q`` from ``decode_symbols``), exceptions bit for bit, nothing non-finite except
  exceptions and products that overflow the dtype (valid per FORMAT.md; counted apart);
- a failed ``decode(out=...)`` changed ``out``;
- resident memory grows by more than ``RSS_BOUND_MB``.

A crash ends the process, so no result file is written. The report goes to ``--out``.

    python benchmarks/fuzz_frames.py --count 100000 --seed 0 \\
        --out benchmarks/results/fuzz_frames.md
"""

from __future__ import annotations

import argparse
import collections
import datetime
import itertools
import math
import platform
import re
import resource
import struct
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import ggcomm
from ggcomm import FrameError, codec
from ggcomm.kernels import eg, reference

MAX_NUMEL = 1 << 18  # the receiver's limit passed as max_numel
RSS_BOUND_MB = 64.0  # allowed growth of peak RSS over the run

HEAD = struct.Struct("<4sBBBBIIQIIQQ")
# fixed-header fields: name -> (offset, struct format)
HEADER_FIELDS = {
    "magic": (0, "4s"), "version": (4, "B"), "dtype": (5, "B"), "ndim": (6, "B"),
    "flags": (7, "B"), "tag": (8, "<I"), "block_size": (12, "<I"), "numel": (16, "<Q"),
    "n_segments": (24, "<I"), "n_blocks": (28, "<I"), "n_exceptions": (32, "<Q"),
    "payload_len": (40, "<Q"),
}
ITEMSIZE = {1: 4, 2: 2, 3: 2, 4: 8}
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16,
            torch.bfloat16: torch.int16, torch.float64: torch.int64}
EDGE_INTS = [0, 1, 2, 3, 7, 8, 30, 31, 64, 65, 255, 256, 1 << 22, (1 << 22) + 1, 2**31 - 2,
             2**31 - 1, 2**32 - 1, 2**62 - 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
EDGE_STEPS = [0.0, -0.0, -1.0, math.nan, math.inf, -math.inf, 5e-324, 2.2e-308, 1e-300,
              1e-30, 1e-3, 0.5, 1.0, 1000.0, 65504.0, 3.4e38, 1e300, 1.7976931348623157e308]


def _fit(value: int, fmt: str) -> int:
    bits = 8 * struct.calcsize(fmt)
    return int(value) % (1 << bits)


def with_crc(body: bytes | bytearray) -> bytes:
    """``body`` followed by its CRC-32 (FORMAT.md: the frame's last 4 bytes)."""
    return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))


def recrc(data: bytes | bytearray) -> bytes:
    """The frame with its last 4 bytes replaced by the CRC-32 of the rest."""
    return with_crc(bytes(data[:-4])) if len(data) >= 4 else bytes(data)


@dataclass
class Layout:
    """Where the parts of a (valid) frame are."""

    ndim: int
    n_seg: int
    n_blocks: int
    n_exc: int
    itemsize: int
    shape: int
    seg: int
    blk: int
    exc: int
    exc_val: int
    payload: int
    end: int  # the CRC's offset


def layout(data: bytes) -> Layout:
    f = HEAD.unpack_from(data, 0)
    ndim, dcode, n_seg, n_blocks, n_exc = f[3], f[2], f[8], f[9], f[10]
    itemsize = ITEMSIZE.get(dcode, 4)
    shape = HEAD.size
    seg = shape + 8 * ndim
    blk = seg + 16 * n_seg
    exc = blk + 8 * n_blocks
    exc_val = exc + 8 * n_exc
    payload = exc_val + itemsize * n_exc
    return Layout(ndim, n_seg, n_blocks, n_exc, itemsize, shape, seg, blk, exc, exc_val,
                  payload, len(data) - 4)


def set_field(data: bytes, offset: int, fmt: str, value, *, crc: bool = True) -> bytes:
    """Write one field (a struct format at a byte offset), then recompute the CRC."""
    b = bytearray(data)
    if fmt in ("<d",):
        struct.pack_into(fmt, b, offset, float(value))
    elif fmt == "4s":
        struct.pack_into(fmt, b, offset, bytes(value))
    else:
        struct.pack_into(fmt, b, offset, _fit(value, fmt))
    return recrc(b) if crc else bytes(b)


# --------------------------------------------------------------------------- base frames


def base_frames(seed: int) -> list[bytes]:
    """Valid frames: dtypes x shapes x sparsity x block sizes x segments x exceptions."""
    g = torch.Generator().manual_seed(seed)
    out = []
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    shapes = [(), (0,), (1,), (7,), (3, 5, 17), (2000,), (4, 0, 3), (40, 50)]
    for i, (dt, shape) in enumerate((d, s) for d in dtypes for s in shapes):
        n = math.prod(shape)
        x = torch.randn(n, generator=g, dtype=torch.float64) * 3
        kind = i % 4
        if kind == 1 and n:
            x[torch.rand(n, generator=g) < 0.9] = 0.0  # sparse
        elif kind == 2 and n:
            x.zero_()
        elif kind == 3 and n:  # specials and the dtype's extremes
            vmax = float(torch.finfo(dt).max)
            sp = torch.tensor([math.nan, math.inf, -math.inf, vmax, -vmax, 1e30, -0.0],
                              dtype=torch.float64)
            idx = torch.randint(0, n, (max(1, n // 10),), generator=g)
            x[idx] = sp[torch.randint(0, len(sp), idx.shape, generator=g)]
        x = x.to(dt).reshape(shape)
        bs = [1, 7, 64, 256, 16384][i % 5]
        zr = ["auto", True, False][i % 3]
        k = "auto" if i % 4 else i % 9
        if n >= 3 and i % 2:
            lens = [n // 3, 0, n - n // 3]
            steps = [0.01, 1.0, 0.3]
            f = ggcomm.encode(x, steps, segments=lens, block_size=bs, zero_runs=zr, k=k,
                              tag=i)
        else:
            f = ggcomm.encode(x, [0.05, 0.5, 1000.0][i % 3], block_size=bs, zero_runs=zr, k=k,
                              tag=i)
        out.append(f.tobytes())
    # the DDP paths' frames
    rng = np.random.default_rng(seed)
    gr = rng.laplace(size=3000).astype(np.float32)
    gr[[5, 77]] = [np.nan, np.inf]
    f, _ = codec.encode_feedback(gr, np.zeros(3000, np.float32), np.array([0.1, 0.3]),
                                 [1000, 2000], block_size=256)
    out.append(f.tobytes())
    s = rng.integers(-50, 50, 2000).astype(np.int64)
    s[3] = 2**40
    out.append(codec.encode_integers(s, np.array([0.25]), [2000], np.array([9]),
                                     np.array([np.nan]), block_size=300).tobytes())
    return out


# --------------------------------------------------------------------------- mutators


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def m_truncate(rng, data, lay):
    return data[:int(rng.integers(0, len(data)))]


def m_extend(rng, data, lay):
    return data + rng.bytes(int(rng.integers(1, 17)))


def m_extend_recrc(rng, data, lay):
    at = int(rng.integers(0, len(data) - 3))
    return recrc(data[:at] + rng.bytes(int(rng.integers(1, 17))) + data[at:])


def m_cut_recrc(rng, data, lay):
    at = int(rng.integers(0, max(1, len(data) - 4)))
    n = int(rng.integers(1, 9))
    return recrc(data[:at] + data[at + n:])


def m_bitflip(rng, data, lay):
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        i = int(rng.integers(len(b) * 8))
        b[i // 8] ^= 1 << (i % 8)
    return bytes(b)


def m_bitflip_recrc(rng, data, lay):
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        i = int(rng.integers(max(1, (len(b) - 4) * 8)))
        b[i // 8] ^= 1 << (i % 8)
    return recrc(b)


def m_bytes_recrc(rng, data, lay):
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        b[int(rng.integers(max(1, len(b) - 4)))] = int(rng.integers(256))
    return recrc(b)


def _edge_int(rng, current: int) -> int:
    r = rng.random()
    if r < 0.5:
        return _pick(rng, EDGE_INTS)
    if r < 0.8:
        return current + int(rng.integers(-3, 4))
    return int(rng.integers(0, 2**63)) >> int(rng.integers(0, 63))


def m_header(rng, data, lay):
    name = _pick(rng, list(HEADER_FIELDS))
    off, fmt = HEADER_FIELDS[name]
    if fmt == "4s":
        return set_field(data, off, fmt, _pick(rng, [b"GGEH", b"\0\0\0\0", b"gGEG"]))
    cur = struct.unpack_from(fmt, data, off)[0]
    return set_field(data, off, fmt, _edge_int(rng, cur))


def m_shape(rng, data, lay):
    if lay.ndim == 0:
        return set_field(data, 16, "<Q", _edge_int(rng, 1))
    i = int(rng.integers(lay.ndim))
    v = _edge_int(rng, struct.unpack_from("<Q", data, lay.shape + 8 * i)[0])
    out = set_field(data, lay.shape + 8 * i, "<Q", v, crc=False)
    if rng.random() < 0.5:  # keep numel consistent with the new shape
        dims = struct.unpack_from(f"<{lay.ndim}Q", out, lay.shape)
        out = set_field(out, 16, "<Q", math.prod(dims), crc=False)
    return recrc(out)


def m_segment(rng, data, lay):
    i = int(rng.integers(lay.n_seg))
    off = lay.seg + 16 * i
    r = rng.random()
    if r < 0.4:
        return set_field(data, off + 8, "<d", _pick(rng, EDGE_STEPS))
    if r < 0.7 or lay.n_seg < 2:
        return set_field(data, off, "<Q", _edge_int(rng, struct.unpack_from("<Q", data, off)[0]))
    # move elements between two segments: the sum still matches numel
    j = int(rng.integers(lay.n_seg))
    d = int(rng.integers(-5, 6))
    out = set_field(data, off, "<Q", struct.unpack_from("<Q", data, off)[0] + d, crc=False)
    off2 = lay.seg + 16 * j
    return set_field(out, off2, "<Q", struct.unpack_from("<Q", out, off2)[0] - d)


def m_block(rng, data, lay):
    if lay.n_blocks == 0:
        return m_header(rng, data, lay)
    i = int(rng.integers(lay.n_blocks))
    off = lay.blk + 8 * i
    r = rng.random()
    if r < 0.6:
        j = int(rng.integers(4))  # mode, k, k_run, reserved
        return set_field(data, off + j, "B", _pick(rng, [0, 1, 2, 3, 8, 29, 30, 31, 255]))
    bits = struct.unpack_from("<I", data, off + 4)[0]
    if r < 0.85:  # same byte count: only the padding boundary moves
        nb = bits + int(rng.integers(-7, 8))
        return set_field(data, off + 4, "<I", nb)
    return set_field(data, off + 4, "<I", _edge_int(rng, bits))


def m_exceptions(rng, data, lay):
    if lay.n_exc == 0:
        return m_bytes_recrc(rng, data, lay)
    i = int(rng.integers(lay.n_exc))
    off = lay.exc + 8 * i
    r = rng.random()
    if r < 0.3 and lay.n_exc > 1:  # swap two positions (their values stay)
        j = int(rng.integers(lay.n_exc))
        a = struct.unpack_from("<Q", data, off)[0]
        b = struct.unpack_from("<Q", data, lay.exc + 8 * j)[0]
        out = set_field(data, off, "<Q", b, crc=False)
        return set_field(out, lay.exc + 8 * j, "<Q", a)
    if r < 0.8:
        return set_field(data, off, "<Q", _edge_int(rng, struct.unpack_from("<Q", data, off)[0]))
    b = bytearray(data)  # the raw value
    o = lay.exc_val + lay.itemsize * i
    b[o:o + lay.itemsize] = rng.bytes(lay.itemsize)
    return recrc(b)


def m_payload(rng, data, lay):
    if lay.end <= lay.payload:
        return m_block(rng, data, lay)
    b = bytearray(data)
    lo = int(rng.integers(lay.payload, lay.end))
    hi = min(lay.end, lo + int(rng.integers(1, 9)))
    r = rng.random()
    b[lo:hi] = b"\0" * (hi - lo) if r < 0.3 else b"\xff" * (hi - lo) if r < 0.5 else \
        rng.bytes(hi - lo)
    return recrc(b)


def m_random(rng, data, lay):
    n = int(rng.integers(0, 400))
    body = bytearray(rng.bytes(n))
    if rng.random() < 0.5 and n >= HEAD.size:
        body[:6] = b"GGEG\x01" + bytes([int(rng.integers(1, 5))])
    return recrc(body) if rng.random() < 0.5 else bytes(body)


def m_splice(rng, data, lay, frames=None):
    other = _pick(rng, frames) if frames else data
    at = int(rng.integers(0, min(len(data), len(other))))
    return recrc(data[:at] + other[at:])


def m_combo(rng, data, lay):
    for _ in range(int(rng.integers(2, 4))):
        fn = _pick(rng, [m_header, m_shape, m_segment, m_block, m_exceptions, m_payload])
        try:
            lay = layout(data)
        except struct.error:
            break
        if lay.end < lay.payload or lay.n_seg < 1:  # no longer a layout to edit
            break
        data = fn(rng, data, lay)
    return data


def _eg_bits(v: int, k: int) -> str:
    return reference.eg_codeword(v, k)


def forge(rng) -> bytes:
    """A frame built from random fields (CRC valid): sometimes consistent, sometimes not,
    sometimes a valid zero-run frame claiming far more elements than MAX_NUMEL, sometimes
    blocks claiming more elements than their bits can hold."""
    r = rng.random()
    dcode = int(_pick(rng, [1, 2, 3, 4])) if rng.random() < 0.95 else int(rng.integers(256))
    if r < 0.25:  # huge claims: zero-run blocks (valid) or mode-0 blocks with too few bits
        bs = int(_pick(rng, [1 << 22, 1 << 20, 65536]))
        n_blocks = int(rng.integers(1, 65))
        numel = bs * n_blocks
        valid_runs = rng.random() < 0.5
        blocks, payload = [], b""
        for _ in range(n_blocks):
            if valid_runs:
                krun = int(rng.integers(0, 31))
                bits = _eg_bits(bs, krun)
                blocks.append((1, int(rng.integers(0, 31)), krun, 0, len(bits)))
            else:
                k = int(rng.integers(0, 4))
                bits = "1" * int(rng.integers(0, 64))
                blocks.append((0, k, 0, 0, len(bits)))
            padded = bits + "0" * (-len(bits) % 8)
            payload += bytes(int(padded[i:i + 8], 2) for i in range(0, len(padded), 8))
        return craft(dcode=dcode, shape=(numel,), numel=numel, segments=[(numel, 0.5)],
                     block_size=bs, blocks=blocks, payload=payload)
    ndim = int(rng.integers(0, 4))
    shape = tuple(int(rng.integers(0, 30)) for _ in range(ndim))
    numel = math.prod(shape)
    if rng.random() < 0.1:
        numel = _edge_int(rng, numel)
    bs = int(_pick(rng, [1, 2, 3, 7, 64, 1000, 1 << 22])) if rng.random() < 0.9 else \
        _edge_int(rng, 5)
    n_seg = int(rng.integers(1, 4))
    total = max(0, min(numel, 2**40))
    cuts = sorted(int(c) for c in rng.integers(0, total + 1, n_seg - 1))
    lengths = np.diff([0, *cuts, total]).tolist()
    steps = [float(_pick(rng, EDGE_STEPS[6:] + [0.1, 0.25])) for _ in range(n_seg)]
    # blocks as the segments make them, at most 300 (more: a count mismatch to reject)
    counts = list(itertools.islice((min(bs, n - i) for n in lengths
                                    for i in range(0, n, max(1, bs))), 300))
    blocks, payload, zeros, n = [], b"", [], 0  # zeros: positions coded u = 0
    for c in counts:
        mode = int(rng.choice([eg.MODE_EG, eg.MODE_ZERO_RUNS, eg.MODE_RICE,
                               eg.MODE_ZERO_RUNS_RICE, eg.MODE_RANS],
                              p=[0.3, 0.2, 0.2, 0.15, 0.15]))
        k = int(rng.integers(0, 5)) if rng.random() < 0.9 else int(rng.integers(0, 32))
        krun = int(rng.integers(0, 4)) if eg.is_zero_runs(mode) else 0
        # (a block of no symbols has no rANS table to build: the forged one below instead)
        if rng.random() < 0.7 and c <= 4096 and k <= 30 and krun <= 30 and (
                c > 0 or mode != eg.MODE_RANS):
            us = [0 if rng.random() < 0.6 else int(rng.integers(1, 50)) for _ in range(c)]
            if mode == eg.MODE_RANS:
                k = max(us)  # the alphabet size minus one
            data, nbits = reference.encode_block(us, mode, k, krun)
            zeros += [n + j for j, u in enumerate(us) if u == 0]
        elif mode == eg.MODE_RANS:  # a table and states, then random words or bytes
            k = int(rng.integers(0, 64))
            nbits = 8 * (eg.rans_table_bytes(k + 1) + 16 + int(rng.integers(0, 12)))
            data = rng.bytes(nbits // 8)
        else:  # random bits
            nbits = int(rng.integers(0, 64))
            data = bytearray(rng.bytes((nbits + 7) // 8))
            if nbits % 8 and rng.random() < 0.8:
                data[-1] &= (0xFF << (8 - nbits % 8)) & 0xFF
            data = bytes(data)
        n += c
        blocks.append((mode, k, krun, 0, nbits))
        payload += data
    m = int(rng.integers(0, min(5, len(zeros)) + 1)) if zeros else 0
    exc = sorted(int(p) for p in rng.choice(zeros, m, replace=False)) if m else []
    if exc and rng.random() < 0.2:
        exc = exc[::-1] if rng.random() < 0.5 else [exc[0]] * len(exc)
    if rng.random() < 0.05 and n:
        exc.append(n + int(rng.integers(0, 3)))
    return craft(dcode=dcode, shape=shape, numel=numel,
                 segments=list(zip(lengths, steps, strict=True)), block_size=bs,
                 blocks=blocks, exc_pos=exc, exc_raw=rng.bytes(ITEMSIZE.get(dcode, 4) * len(exc)),
                 payload=payload)


def craft(*, numel: int, shape=None, segments=None, block_size: int = 16384, blocks=(),
          exc_pos=(), exc_raw: bytes = b"", payload: bytes = b"", dcode: int = 1,
          magic: bytes = b"GGEG", version: int = 3, flags: int = 0, tag: int = 0,
          ndim=None, n_segments=None, n_blocks=None, n_exceptions=None,
          payload_len=None) -> bytes:
    """A frame from its fields (FORMAT.md, Layout) with a valid CRC; the counts in the
    fixed header default to the lists' lengths."""
    shape = (numel,) if shape is None else tuple(shape)
    segments = [(numel, 1.0)] if segments is None else segments
    body = HEAD.pack(magic, version, dcode, len(shape) if ndim is None else ndim, flags, tag,
                     _fit(block_size, "<I"), _fit(numel, "<Q"),
                     len(segments) if n_segments is None else n_segments,
                     len(blocks) if n_blocks is None else n_blocks,
                     len(exc_pos) if n_exceptions is None else n_exceptions,
                     len(payload) if payload_len is None else payload_len)
    body += b"".join(struct.pack("<Q", _fit(d, "<Q")) for d in shape)
    body += b"".join(struct.pack("<Qd", _fit(n, "<Q"), s) for n, s in segments)
    body += b"".join(struct.pack("<BBBBI", *b) for b in blocks)
    body += b"".join(struct.pack("<Q", _fit(p, "<Q")) for p in exc_pos) + exc_raw + payload
    return with_crc(body)


MUTATORS = {
    "truncate": m_truncate, "extend": m_extend, "extend_recrc": m_extend_recrc,
    "cut_recrc": m_cut_recrc, "bitflip": m_bitflip, "bitflip_recrc": m_bitflip_recrc,
    "bytes_recrc": m_bytes_recrc, "header_field": m_header, "shape": m_shape,
    "segment": m_segment, "block_table": m_block, "exceptions": m_exceptions,
    "payload": m_payload, "random_bytes": m_random, "splice": m_splice, "combo": m_combo,
}


# --------------------------------------------------------------------------- checks


class Violation(AssertionError):
    pass


def kind(e: BaseException) -> str:
    """An error message with its numbers and values taken out: the kind of rejection."""
    msg = str(e)
    msg = re.sub(r"\(.*?\)|b'[^']*'|b\"[^\"]*\"|\[.*?\]", "(..)", msg)
    msg = re.sub(r"0x[0-9a-f]+|-?\b(nan|inf)\b|-?\d+(\.\d+)?(e[-+]?\d+)?", "N", msg)
    return msg[:90]


def _expect_frame_error(fn, *args, **kwargs) -> FrameError:
    try:
        fn(*args, **kwargs)
    except FrameError as e:
        return e
    raise Violation(f"{getattr(fn, '__name__', fn)} accepted a frame another entry point "
                    f"rejected")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(INT_VIEW[t.dtype])


def _expected(data: bytes, info: codec.FrameInfo, q: torch.Tensor) -> tuple[torch.Tensor, int]:
    """What the frame describes (FORMAT.md): (tensor, count of values that overflow)."""
    steps = np.repeat(np.asarray(info.steps, np.float64), info.segment_lengths)
    with np.errstate(over="ignore"):  # an overflowing product is valid: +-inf
        prod = q.numpy() * steps
        if info.dtype == torch.float64:
            vals = torch.from_numpy(prod)
        else:
            vals = torch.from_numpy(prod.astype(np.float32)).to(info.dtype)
    pos = np.asarray(info.exception_positions, np.int64)
    isz = vals.element_size()
    if pos.size:
        off = info.header_bytes - isz * pos.size
        raw = np.frombuffer(data[off:off + isz * pos.size], f"<i{isz}").astype(f"=i{isz}")
        _bits(vals)[torch.from_numpy(pos)] = torch.from_numpy(raw)
    coded = np.ones(q.numel(), bool)
    coded[pos] = False
    overflow = int((~np.isfinite(vals.double().numpy()) & coded).sum())
    return vals.reshape(info.shape), overflow


_MODES = {"eg": eg.MODE_EG, "zero_runs": eg.MODE_ZERO_RUNS, "rice": eg.MODE_RICE,
          "zero_runs_rice": eg.MODE_ZERO_RUNS_RICE, "rans": eg.MODE_RANS}
# the largest block mode of each version
_VERSION_MODES = {1: eg.MODE_ZERO_RUNS, 2: eg.MODE_ZERO_RUNS_RICE, 3: eg.MODE_RANS}


def _spec_valid(data: bytes, info: codec.FrameInfo) -> None:
    """A frame that decodes must obey FORMAT.md's rules on its header and tables."""
    problems = []
    magic, version, dcode, ndim, flags = HEAD.unpack_from(data, 0)[:5]
    if (magic, flags) != (b"GGEG", 0) or version not in _VERSION_MODES or dcode not in ITEMSIZE \
            or ndim > 64:
        problems.append("magic, version, dtype, ndim or flags")
    lay = layout(data)
    if any(data[lay.blk + 8 * i + 3] for i in range(lay.n_blocks)):
        problems.append("reserved block-table bytes")
    if not (1 <= info.block_size <= eg.MAX_BLOCK_SIZE and info.numel < 2**62
            and all(d < 2**62 for d in info.shape) and len(info.shape) <= 64):
        problems.append("a header field out of range")
    if sum(info.segment_lengths) != info.numel or not info.segment_lengths:
        problems.append("segments")
    if not all(math.isfinite(s) and s > 0 and math.isfinite(1.0 / s) for s in info.steps):
        problems.append("steps")
    pos = info.exception_positions
    if any(b <= a for a, b in zip(pos, pos[1:], strict=False)) or (
            pos and not 0 <= pos[0] <= pos[-1] < info.numel):
        problems.append("exception positions")
    for b in info.blocks:
        need = codec._min_block_bits(np.array([_MODES[b.mode]]),
                                     np.array([b.k]), np.array([b.k_run]),
                                     np.array([b.count]))[0]
        zero_runs = b.mode in ("zero_runs", "zero_runs_rice")
        rans = b.mode == "rans"
        if b.k > (63 if rans else 30) or b.k_run > 30 or (not zero_runs and b.k_run) \
                or b.bit_length < need or (rans and b.bit_length % 16 != need % 16) \
                or _MODES[b.mode] > _VERSION_MODES.get(version, -1):
            problems.append(f"block {b}")
            break
    if problems:
        raise Violation(f"decoded a frame FORMAT.md rejects: {problems}")


REFERENCE_NUMEL = 4096  # decoded frames up to this size are re-read by the reference


def _reference_symbols(info: codec.FrameInfo) -> np.ndarray:
    """q of every element from ggcomm.kernels.reference's bit-string decoder (independent of
    the numba kernels), padding checked; raises Violation where it rejects a block."""
    q = np.empty(info.numel, np.float64)
    for b in info.blocks:
        lo, hi = b.bit_offset // 8, (b.bit_offset + b.bit_length + 7) // 8
        chunk = info.payload[lo:hi]
        try:
            us = reference.decode_block(chunk, b.bit_length, b.count, _MODES[b.mode],
                                        b.k, b.k_run)
        except ValueError as e:
            raise Violation(f"decoded a block the reference rejects: {e}") from None
        if b.bit_length % 8 and chunk[-1] & ((1 << (8 - b.bit_length % 8)) - 1):
            raise Violation("decoded a block with nonzero padding")
        q[b.first:b.first + b.count] = [reference.q_of_u(u) for u in us]
    return q


def check(data: bytes, rng: np.random.Generator) -> str:
    """Run every entry point on data; returns the outcome, raises Violation on a failure."""
    try:
        info = codec.inspect(data)  # nothing in proportion to numel
    except FrameError as e:
        _expect_frame_error(codec.Frame.from_buffer, data, max_numel=MAX_NUMEL)
        _expect_frame_error(codec.decode, data, max_numel=MAX_NUMEL)
        _expect_frame_error(codec.decode_symbols, data, max_numel=MAX_NUMEL)
        return "rejected: " + kind(e)
    if info.numel > MAX_NUMEL:
        for fn in (codec.Frame.from_buffer, codec.decode, codec.decode_symbols, codec.inspect):
            e = _expect_frame_error(fn, data, max_numel=MAX_NUMEL)
            if "max_numel" not in str(e):
                raise Violation(f"{fn.__name__}: {e}")
        return "rejected: above max_numel"
    if info.numel != math.prod(info.shape):
        raise Violation(f"shape {info.shape} vs numel {info.numel}")
    frame = codec.Frame.from_buffer(data, max_numel=MAX_NUMEL)
    strided = rng.random() < 0.3
    out = torch.empty(info.numel * (2 if strided else 1), dtype=info.dtype)
    out = out[::2] if strided else out
    noise = torch.randint(-(2**15), 2**15, (info.numel,), dtype=INT_VIEW[info.dtype])
    out.copy_(noise.view(info.dtype))  # random bits, NaNs included
    before = _bits(out.contiguous()).clone()
    try:
        y = codec.decode(data, max_numel=MAX_NUMEL)
    except FrameError as e:
        _expect_frame_error(codec.decode, frame)
        _expect_frame_error(codec.decode_symbols, data)
        _expect_frame_error(codec.decode, data, out=out)
        if not torch.equal(_bits(out.contiguous()), before):
            raise Violation("a failed decode changed out") from None
        _expect_frame_error(codec.decode, data, out=out.clone(), keep_out=False)
        return "rejected: " + kind(e)
    q, pos, vals = codec.decode_symbols(data, max_numel=MAX_NUMEL)
    if y.dtype != info.dtype or tuple(y.shape) != info.shape or y.numel() != info.numel:
        raise Violation(f"decoded {y.dtype} {tuple(y.shape)}, header {info.dtype} {info.shape}")
    if tuple(pos.tolist()) != info.exception_positions or q.numel() != info.numel:
        raise Violation("decode_symbols disagrees with the header")
    if pos.numel() and (q[pos] != 0).any():
        raise Violation("nonzero code at an exception position")
    if q.numel() and q.abs().max() > eg.QMAX:
        raise Violation("a code above the code's range")
    if info.numel <= REFERENCE_NUMEL and not np.array_equal(_reference_symbols(info), q.numpy()):
        raise Violation("the reference decoder reads other symbols")
    exp, overflow = _expected(data, info, q)
    if not torch.equal(_bits(y), _bits(exp)):
        raise Violation("decoded values differ from q * step (FORMAT.md)")
    _spec_valid(data, info)
    for other in (codec.decode(data), codec.decode(frame),
                  codec.decode(data, out=out, max_numel=info.numel),
                  codec.decode(frame, out=torch.empty(info.shape, dtype=info.dtype),
                               keep_out=False)):
        if not torch.equal(_bits(other.contiguous()), _bits(y)):
            raise Violation("the entry points decode to different values")
    if info.numel:
        _expect_frame_error(codec.inspect, data, max_numel=info.numel - 1)
    return "decoded, q * step overflows (as specified)" if overflow else "decoded"


# --------------------------------------------------------------------------- driver


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


@dataclass
class Result:
    count: int
    seed: int
    seconds: float
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    by_mutator: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)
    rss_start_mb: float = 0.0
    rss_peak_mb: float = 0.0
    slowest: tuple = (0.0, "", "")  # seconds, mutation, outcome

    @property
    def rss_growth_mb(self) -> float:
        return self.rss_peak_mb - self.rss_start_mb


def run(count: int, seed: int = 0, *, progress: bool = False) -> Result:
    """Mutate and check ``count`` frames; failures are collected, not raised."""
    rng = np.random.default_rng(seed)
    frames = base_frames(seed)
    for f in frames:  # warm up (numba compiles, pools start) before measuring memory
        check(f, rng)
    res = Result(count, seed, 0.0, rss_start_mb=_rss_mb())
    names = list(MUTATORS) + ["forge"]
    t0 = time.perf_counter()
    for i in range(count):
        name = names[i % len(names)]
        base = _pick(rng, frames)
        try:
            if name == "forge":
                data = forge(rng)
            elif name == "splice":
                data = m_splice(rng, base, layout(base), frames)
            else:
                data = MUTATORS[name](rng, base, layout(base))
        except Exception as e:  # a bug of the fuzzer, not of the codec
            raise RuntimeError(f"mutator {name} failed") from e
        per = res.by_mutator.setdefault(name, collections.Counter())
        rss0, t1 = _rss_mb(), time.perf_counter()
        try:
            outcome = check(data, rng)
        except Exception as e:  # anything but FrameError, or a violated invariant
            outcome = f"FAILURE {type(e).__name__}"
            res.failures.append((name, f"{type(e).__name__}: {str(e)[:200]}",
                                 data[:160].hex() if len(res.failures) < 20 else ""))
        dt = time.perf_counter() - t1
        if dt > res.slowest[0]:
            res.slowest = (dt, name, outcome)
        if _rss_mb() - rss0 > RSS_BOUND_MB:
            res.failures.append((name, f"one frame raised peak RSS by {_rss_mb() - rss0:.0f} "
                                       f"MB ({outcome})", data[:160].hex()))
        res.outcomes[outcome] += 1
        per["decoded" if outcome.startswith("decoded") else
            "failure" if outcome.startswith("FAILURE") else "rejected"] += 1
        if progress and (i + 1) % 10000 == 0:
            print(f"{i + 1}/{count} {time.perf_counter() - t0:.0f}s "
                  f"failures={len(res.failures)} rss={_rss_mb():.0f}MB", flush=True)
    res.seconds = time.perf_counter() - t0
    res.rss_peak_mb = _rss_mb()
    if res.rss_growth_mb > RSS_BOUND_MB:
        res.failures.append(("memory", f"peak RSS grew {res.rss_growth_mb:.1f} MB", ""))
    return res


def report(res: Result, argv: list[str]) -> str:
    lines = [
        "# Frame decoder fuzzing",
        "",
        f"`python benchmarks/fuzz_frames.py {' '.join(argv)}` on "
        f"{datetime.date.today().isoformat()}: Python {platform.python_version()}, "
        f"numpy {np.__version__}, torch {torch.__version__}, {ggcomm.get_num_threads()} "
        f"codec threads.",
        "",
        f"- mutated or forged frames: **{res.count}** (seed {res.seed}), "
        f"{res.seconds:.1f} s ({res.count / max(res.seconds, 1e-9):.0f} frames/s)",
        f"- failures (an exception other than FrameError, entry points disagreeing, a "
        f"decoded frame other than its header and codes describe, `out` changed by a failed "
        f"decode, memory): **{len(res.failures)}**",
        f"- peak RSS: {res.rss_start_mb:.0f} MB after warm-up, {res.rss_peak_mb:.0f} MB at "
        f"the end (growth {res.rss_growth_mb:.1f} MB, bound {RSS_BOUND_MB:.0f} MB); "
        f"max_numel {MAX_NUMEL}",
        f"- slowest frame: {res.slowest[0] * 1e3:.1f} ms ({res.slowest[1]}: {res.slowest[2]})",
        "",
        "## Outcomes",
        "",
        "| outcome | frames |",
        "|---|---:|",
    ]
    for k, v in sorted(res.outcomes.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"| {k.replace('|', '/')} | {v} |")
    lines += ["", "## By mutation", "", "| mutation | rejected | decoded | failures |",
              "|---|---:|---:|---:|"]
    for name, c in res.by_mutator.items():
        lines.append(f"| {name} | {c['rejected']} | {c['decoded']} | {c['failure']} |")
    if res.failures:
        lines += ["", "## Failures (first 20)", ""]
        lines += [f"- {n}: {m} `{h}`" for n, m, h in res.failures[:20]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=20000, help="frames to mutate and check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="markdown report (default: stdout)")
    args = p.parse_args(argv)
    res = run(args.count, args.seed, progress=True)
    text = report(res, argv)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 1 if res.failures else 0


if __name__ == "__main__":
    sys.exit(main())
