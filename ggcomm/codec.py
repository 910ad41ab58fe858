"""The wire codec: tensor -> quantize -> coded blocks -> one self-describing frame.

Each block is coded with Exp-Golomb or Golomb-Rice codewords, or as runs of zeros,
whichever takes the fewest bits (frame format 2).

``encode`` turns a floating-point tensor into a :class:`Frame` (a uint8 tensor ready for
torch.distributed), ``decode`` turns a frame (or any buffer holding one) back into the
tensor ``q * step`` with the original dtype and shape, and ``inspect`` returns the header
as data. The byte layout is specified in ``docs/FORMAT.md``.

Anything that is not a valid frame raises :class:`FrameError` naming what is wrong; the
CRC-32 over header and payload catches corruption, and the kernels bound-check every
length they read, so no input can crash, hang or read out of bounds. Every size a frame
claims is checked against its bytes before it is allocated (each block needs a minimum
number of bits for its elements); zero-run blocks still let a few bytes validly describe
millions of zeros, so receivers of untrusted frames pass ``max_numel``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import mmap
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import _parallel
from ._host import to_host
from .errors import FrameError
from .kernels import eg

try:  # ISA-L's CRC-32: zlib's function (the same values), 4x its speed on x86-64
    from isal.isal_zlib import crc32
except ImportError:  # a platform without an isal wheel
    from zlib import crc32

__all__ = [
    "CRC_BYTES",
    "DEFAULT_BLOCK_SIZE",
    "DTYPES",
    "DTYPE_CODES",
    "BlockInfo",
    "Frame",
    "FrameError",
    "FrameInfo",
    "byte_tensor",
    "decode",
    "decode_symbols",
    "encode",
    "header_bytes",
    "inspect",
]

MAGIC = b"GGEG"
VERSION = 3  # the version ggcomm writes
# Versions ggcomm reads, with the largest block mode each may use: version 1 has no modes
# 2 and 3, version 2 no mode 4.
READ_VERSIONS = {1: eg.MODE_ZERO_RUNS, 2: eg.MODE_ZERO_RUNS_RICE, 3: eg.MODE_RANS}
DEFAULT_BLOCK_SIZE = 16384
MAX_NDIM = 64
# Largest element count, and dimension, a frame may claim: element indices and sums of a
# few of them stay exact in int64.
MAX_NUMEL = (1 << 62) - 1

# code -> torch dtype; the code travels in the header (docs/FORMAT.md).
DTYPES = {1: torch.float32, 2: torch.float16, 3: torch.bfloat16, 4: torch.float64}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
# Integer views used to move raw bit patterns of exceptional values.
_RAW_INT = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float64: torch.int64,
}

_FIXED = struct.Struct("<4sBBBBIIQIIQQ")
_SEGMENT = np.dtype([("length", "<u8"), ("step", "<f8")])
_BLOCK = np.dtype([("mode", "u1"), ("k", "u1"), ("k_run", "u1"), ("reserved", "u1"),
                   ("bits", "<u4")])
_CRC = struct.Struct("<I")
CRC_BYTES = _CRC.size


def header_bytes(ndim: int, n_segments: int, n_blocks, n_exceptions, itemsize: int):
    """Bytes of a frame before its payload: the fixed header, shape, segment table, block
    table and exception list (positions and raw values of ``itemsize`` bytes). A frame is
    ``header_bytes(...) + payload bytes + CRC_BYTES`` long. ``n_blocks`` and
    ``n_exceptions`` may be integer tensors or arrays (the result then is one too)."""
    return (_FIXED.size + 8 * ndim + _SEGMENT.itemsize * n_segments + _BLOCK.itemsize * n_blocks
            + n_exceptions * (8 + itemsize))

_MODE_NAMES = {eg.MODE_EG: "eg", eg.MODE_ZERO_RUNS: "zero_runs", eg.MODE_RICE: "rice",
               eg.MODE_ZERO_RUNS_RICE: "zero_runs_rice", eg.MODE_RANS: "rans"}

# Below this many blocks a task, threads cost more than they save.
_MIN_BLOCKS_PER_TASK = 4

_ERRORS = {
    eg.ERR_CODE_TOO_LONG: "a codeword's zero prefix is longer than any valid codeword",
    eg.ERR_OVERRUN: "a codeword runs past the end of the block",
    eg.ERR_VALUE_RANGE: "a decoded value is outside the code's range",
    eg.ERR_RUN_LENGTH: "a run of zeros runs past the end of the block",
    eg.ERR_LENGTH_MISMATCH: "the codewords do not fill the block's stated bit length",
    eg.ERR_PADDING: "the padding bits after the block are not zero",
    eg.ERR_EXCEPTION_CODE: "an exception position holds a nonzero code",
    eg.ERR_TABLE: "the block table places a block outside the payload or the output",
    eg.ERR_RANS_TABLE: "the rANS frequencies add up to more than the scale",
    eg.ERR_RANS_STATE: "a rANS state is out of range or does not end where the encoder "
                       "starts it",
}


@dataclass(frozen=True)
class BlockInfo:
    """One block of the payload, as ``inspect`` reports it."""

    first: int  # index of the block's first element in the flattened tensor
    count: int  # elements in the block
    segment: int  # the segment the block belongs to (blocks never span segments)
    mode: str  # "eg", "zero_runs", "rice", "zero_runs_rice", "rans" (modes 0-4, FORMAT.md)
    k: int  # Exp-Golomb order (Golomb-Rice parameter in "rice" mode; "rans": alphabet - 1)
    k_run: int  # order of the zero-run lengths (zero_runs mode only)
    bit_offset: int  # first bit of the block within the payload
    bit_length: int  # bits of codewords (the block is then zero-padded to a byte)


@dataclass(frozen=True)
class FrameInfo:
    """A frame's header as data, and its payload bytes."""

    version: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    numel: int
    tag: int
    block_size: int
    segment_lengths: tuple[int, ...]
    steps: tuple[float, ...]
    blocks: tuple[BlockInfo, ...]
    exception_positions: tuple[int, ...]
    header_bytes: int
    payload: bytes
    nbytes: int

    @property
    def bits_per_element(self) -> float:
        """Total frame bits over elements (headers, exceptions and checksum included)."""
        return 8.0 * self.nbytes / self.numel if self.numel else float("nan")


@dataclass(frozen=True)
class _Header:
    dtype: torch.dtype
    shape: tuple[int, ...]
    numel: int
    tag: int
    block_size: int
    seg_bounds: np.ndarray  # int64, n_segments + 1 cumulative bounds
    steps: np.ndarray  # float64, one per segment
    layout: tuple[np.ndarray, np.ndarray, np.ndarray]  # per block: start, count, segment
    blocks: np.ndarray  # _BLOCK records
    exc_pos: np.ndarray  # int64 positions
    exc_off: int  # byte offset of the raw exception values
    payload_off: int
    payload_len: int
    nbytes: int
    version: int = VERSION


class Frame:
    """An encoded tensor: one contiguous uint8 buffer, validated on construction.

    ``frame.buffer`` is a 1-D ``torch.uint8`` CPU tensor holding exactly the frame's
    bytes, ready for ``torch.distributed`` send or all-gather; ``Frame.from_buffer``
    rebuilds (and validates) a frame from such a buffer on the receiving side.
    """

    __slots__ = ("buffer", "_h")

    def __init__(self, buffer: torch.Tensor, header: _Header):
        self.buffer = buffer
        self._h = header

    @classmethod
    def from_buffer(cls, buffer, *, max_numel: int | None = None) -> Frame:
        """Validate and wrap a frame held in a uint8 tensor, numpy array or bytes-like.

        Raises FrameError if the bytes are not exactly one valid frame, or if the frame
        holds more than ``max_numel`` elements (see :func:`decode`).
        """
        _check_max_numel(max_numel)
        t = byte_tensor(buffer)
        return cls(t, _parse(t.numpy(), max_numel))

    @property
    def nbytes(self) -> int:
        """Size of the frame on the wire, in bytes."""
        return self._h.nbytes

    def __len__(self) -> int:
        return self._h.nbytes

    @property
    def numel(self) -> int:
        return self._h.numel

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._h.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self._h.dtype

    @property
    def tag(self) -> int:
        """The 32-bit tag the encoder was given (ggcomm.ddp stores a settings fingerprint)."""
        return self._h.tag

    @property
    def steps(self) -> tuple[float, ...]:
        return tuple(float(s) for s in self._h.steps)

    @property
    def block_size(self) -> int:
        return self._h.block_size

    def segment_lengths(self) -> np.ndarray:
        """Element count of each segment (int64)."""
        return np.diff(self._h.seg_bounds)

    def exceptions(self) -> tuple[np.ndarray, np.ndarray]:
        """The elements that travel raw: sorted positions (int64) and values (float64)."""
        h = self._h
        if not h.exc_pos.size:
            return h.exc_pos, np.empty(0, np.float64)
        return h.exc_pos, _exception_values(self.buffer.numpy(), h).double().numpy()

    @property
    def bits_per_element(self) -> float:
        """Frame bits per tensor element, everything included."""
        return 8.0 * self._h.nbytes / self._h.numel if self._h.numel else float("nan")

    def segment_bits(self) -> np.ndarray:
        """Payload bits of each segment (its blocks' codewords; headers excluded).

        Blocks never span segments, so this is exact per segment and does not depend on
        how segments were grouped into frames.
        """
        seg = self._h.layout[2]
        return np.bincount(seg, weights=self._h.blocks["bits"].astype(np.float64),
                           minlength=self._h.steps.size).astype(np.int64)

    def tobytes(self) -> bytes:
        return self.buffer.numpy().tobytes()

    def __repr__(self) -> str:
        return (f"Frame(shape={tuple(self._h.shape)}, dtype={self._h.dtype}, "
                f"nbytes={self._h.nbytes}, bits_per_element={self.bits_per_element:.3f})")


# --------------------------------------------------------------------------- encode

_scratch = threading.local()


def _chunk_buffer(i: int, size: int) -> np.ndarray:
    """A reusable per-calling-thread output buffer for chunk i (avoids page faults)."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = []
    while len(bufs) <= i:
        bufs.append(np.empty(0, np.uint8))
    if bufs[i].size < size:
        bufs[i] = np.empty(size, np.uint8)
    return bufs[i]


def _steps_and_bounds(step, segments, numel: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(step, torch.Tensor):
        step = step.detach().cpu().double().reshape(-1).tolist()
    if isinstance(step, (int, float, np.floating, np.integer)):
        steps = [float(step)]
        if segments is None:
            segments = [numel]
    else:
        steps = [float(s) for s in step]
        if segments is None:
            if len(steps) != 1:
                raise ValueError("several steps need `segments`: the element count of each")
            segments = [numel]
    lengths = [int(n) for n in segments]
    if len(lengths) != len(steps):
        raise ValueError(f"{len(steps)} steps for {len(lengths)} segments")
    if len(lengths) == 0:
        raise ValueError("at least one segment is needed")
    if any(n < 0 for n in lengths) or sum(lengths) != numel:
        raise ValueError(f"segment lengths {lengths[:8]}... must be >= 0 and sum to {numel}")
    for s in steps:
        if not (math.isfinite(s) and s > 0.0 and math.isfinite(1.0 / s)):
            raise ValueError(f"quantization step must be finite and > 0, got {s!r}")
    bounds = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=bounds[1:])
    return np.asarray(steps, np.float64), bounds


# Largest finite value of each frame dtype (exact in float64).
_VMAX = {dt: float(torch.finfo(dt).max) for dt in DTYPES.values()}


def _code_limits(steps: np.ndarray, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Per step, the largest |x / step| coded rather than sent as an exception.

    QMAX, the code's range, or less where a coded value could come back infinite: with
    M = floor(vmax / step) (exact; vmax the dtype's largest finite value), |x / step| must
    stay below M + 1/2 so that |q| <= M and |q| * step <= vmax. Every rounding after that
    (to binary64, binary32, then float16/bfloat16) is monotone and vmax is representable in
    each, so the value stays at most vmax: finite. Returns (float limits for x / step,
    int64 limits for integers q).
    """
    vmax = _VMAX[dtype]
    lims = np.full(steps.size, float(eg.QMAX))
    qlims = np.full(steps.size, eg.QMAX, np.int64)
    with np.errstate(over="ignore"):
        near = np.flatnonzero(vmax / steps < 2.0**31)  # a superset: float64 rounding
    a, b = vmax.as_integer_ratio()
    for i in near:
        c, d = float(steps[i]).as_integer_ratio()
        m = (a * d) // (b * c)  # floor(vmax / step) in integers: exact
        if m < eg.QMAX:
            lims[i] = np.nextafter(m + 0.5, 0.0)  # |v| < m + 1/2: rint(v) <= m
            qlims[i] = m
    return lims, qlims


def _block_layout(bounds: np.ndarray, block_size: int):
    """Per block (start, count, segment): each segment is cut into blocks of block_size."""
    lengths = np.diff(bounds)
    per_seg = -(-lengths // block_size)
    seg = np.repeat(np.arange(lengths.size, dtype=np.int64), per_seg)
    first_block = np.cumsum(per_seg) - per_seg
    local = np.arange(seg.size, dtype=np.int64) - np.repeat(first_block, per_seg)
    starts = bounds[seg] + local * block_size
    counts = np.minimum(block_size, bounds[seg + 1] - starts)
    return starts, counts, seg


def check_code_args(*, k="auto", block_size=DEFAULT_BLOCK_SIZE, rans=True) -> None:
    """ValueError unless ``k``, ``block_size`` and ``rans`` are valid arguments of
    :func:`encode`: what a transport checks once, when it is configured."""
    _code_args(k, block_size, "auto", 0, rans)


def _code_args(k, block_size, zero_runs, tag, rans=True) -> tuple[int, int]:
    """Validate the coding arguments: (k_fixed, zero-runs mode with the mode-4 flag) for the
    kernels."""
    if k != "auto" and not (isinstance(k, (int, np.integer)) and 0 <= int(k) <= eg.K_MAX):
        raise ValueError(f"k must be 'auto' or an int in 0..{eg.K_MAX}, got {k!r}")
    if not (isinstance(block_size, (int, np.integer))
            and 1 <= int(block_size) <= eg.MAX_BLOCK_SIZE):
        raise ValueError(f"block_size must be an int in 1..{eg.MAX_BLOCK_SIZE}, "
                         f"got {block_size!r}")
    zr = {"auto": 1, False: 0, True: 2}.get(zero_runs) if isinstance(zero_runs, (str, bool)) \
        else None
    if zr is None:
        raise ValueError(f"zero_runs must be 'auto', True or False, got {zero_runs!r}")
    if not (isinstance(tag, (int, np.integer)) and 0 <= int(tag) < 2**32):
        raise ValueError(f"tag must be an int in 0..2**32-1, got {tag!r}")
    if not isinstance(rans, bool):
        raise ValueError(f"rans must be True or False, got {rans!r}")
    return (-1 if k == "auto" else int(k)), zr | (0 if rans else eg.NO_RANS)


def encode(
    x: torch.Tensor,
    step,
    *,
    k: int | str = "auto",
    block_size: int = DEFAULT_BLOCK_SIZE,
    zero_runs: bool | str = "auto",
    segments: Sequence[int] | None = None,
    tag: int = 0,
    rans: bool = True,
) -> Frame:
    """Quantize ``x`` with ``step`` and Exp-Golomb-code it into a :class:`Frame`.

    Args:
        x: float32, float16, bfloat16 or float64 tensor of any shape (empty and 0-d too).
            Non-finite values, values too large for the code, and values whose ``q * step``
            would pass the dtype's largest finite value travel exactly in the frame's
            exception list.
        step: quantization step, or one step per segment (with ``segments``): a DDP bucket
            holds parameters whose gradients differ in scale by orders of magnitude.
        k: Exp-Golomb order 0..30, or "auto" to pick, per block, the order that minimises
            that block's bits (exact, from a histogram; costs one pass over the block).
        block_size: elements per block (1 .. 2**22). Blocks are coded independently, so
            they run in parallel and adapt k locally; each costs 8 header bytes.
        zero_runs: "auto" codes a block as runs of zeros when that is smaller (sparse
            data then goes below 1 bit per element); False never, True always.
        segments: element counts of consecutive segments of the flattened tensor, one
            per step.
        tag: any 32-bit value carried in the header (for example a settings fingerprint).
        rans: with ``k="auto"`` and ``zero_runs`` not True, code a block with rANS over its
            own frequency table (FORMAT.md, mode 4) where that saves more than 1/32 of its
            bits: blocks of small symbols with light tails, where it comes within about 1%
            of the entropy and every one-codeword-per-symbol code stays 2-9% above it. It
            costs about twice the time of the other modes on those blocks, so it pays for
            that time only on slow links (see the README); False leaves it out.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"encode expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"encode supports float32/float16/bfloat16/float64, not {x.dtype}")
    k_fixed, zr = _code_args(k, block_size, zero_runs, tag, rans)
    if x.dim() > MAX_NDIM:
        raise ValueError(f"at most {MAX_NDIM} dimensions")

    dtype = x.dtype
    shape = tuple(x.shape)
    src = to_host(x.detach()).contiguous().reshape(-1)
    numel = src.numel()
    work = src if dtype in (torch.float32, torch.float64) else src.float()
    xs = work.numpy()
    steps, bounds = _steps_and_bounds(step, segments, numel)
    invs = 1.0 / steps
    block_size = int(block_size)

    layout = _block_layout(bounds, block_size)
    block_invs = invs[layout[2]]
    block_lims = _code_limits(steps, dtype)[0][layout[2]]
    starts, counts = layout[0], layout[1]

    def kernel(buf, meta, lo, hi):
        return eg.encode_blocks(xs, starts, counts, block_invs, block_lims, lo, hi, k_fixed, zr,
                                buf, meta)

    meta, chunks = _encode_ranges(kernel, counts, zr)
    exc_pos = _exception_positions(xs, meta, starts, counts, block_invs, block_lims)
    raw = src.view(_RAW_INT[dtype])[torch.from_numpy(exc_pos)].numpy() if exc_pos.size \
        else None
    return _assemble(dtype, shape, int(tag), block_size, bounds, steps, layout, meta, chunks,
                     exc_pos, raw)


def _encode_ranges(kernel, counts: np.ndarray, zr: int):
    """Run ``kernel(buf, meta, lo, hi)`` over block ranges in parallel: (meta, chunks)."""
    n_blocks = counts.size
    meta = np.zeros((n_blocks, 5), np.int64)
    ranges = _parallel.split(n_blocks, _MIN_BLOCKS_PER_TASK)

    def capacity(lo: int, hi: int) -> int:
        return int(eg.worst_case_bytes(counts[lo:hi], zr).sum())  # elementwise over blocks

    # Buffers are picked on the calling thread: pool threads serve every caller.
    work_items = [(_chunk_buffer(i, capacity(lo, hi)), lo, hi) for i, (lo, hi) in
                  enumerate(ranges) if hi > lo]

    def encode_range(buf: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, int]:
        used = kernel(buf, meta, lo, hi)
        if used < 0:
            raise RuntimeError("ggcomm internal error: encode buffer too small")
        return buf, used

    chunks = _parallel.run(encode_range, work_items) if work_items else []
    if n_blocks and (meta[:, 3] < 0).any():
        raise RuntimeError("ggcomm internal error: block bit count disagrees with its cost")
    return meta, chunks


def _exception_positions(xs: np.ndarray, meta: np.ndarray, starts, counts, invs,
                         lims) -> np.ndarray:
    """Sorted positions of the values the code cannot carry, scanning only blocks that have
    them (``meta[:, 4]`` counts them per block)."""
    n_exc = int(meta[:, 4].sum()) if meta.size else 0
    exc_pos = np.empty(n_exc, np.int64)
    if n_exc:
        has = np.flatnonzero(meta[:, 4])
        found = eg.find_exceptions(xs, starts[has], counts[has], invs[has], lims[has], exc_pos)
        assert found == n_exc
    return exc_pos


def _assemble(dtype, shape, tag, block_size, bounds, steps, layout, meta, chunks, exc_pos,
              exc_raw) -> Frame:
    """The frame's bytes from the encoded block ranges and the exceptions' raw values."""
    n_blocks = meta.shape[0]
    n_exc = exc_pos.size
    numel = int(bounds[-1])
    payload_len = sum(used for _, used in chunks)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    header_len = header_bytes(len(shape), len(steps), n_blocks, n_exc, itemsize)
    total = header_len + payload_len + CRC_BYTES
    out_t = torch.empty(total, dtype=torch.uint8)
    out = out_t.numpy()
    _FIXED.pack_into(out, 0, MAGIC, VERSION, DTYPE_CODES[dtype], len(shape), 0, int(tag),
                     block_size, numel, len(steps), n_blocks, n_exc, payload_len)
    o = _FIXED.size
    out[o:o + 8 * len(shape)] = np.asarray(shape, "<u8").view(np.uint8)
    o += 8 * len(shape)
    seg = np.empty(len(steps), _SEGMENT)
    seg["length"] = np.diff(bounds)
    seg["step"] = steps
    out[o:o + seg.nbytes] = seg.view(np.uint8)
    o += seg.nbytes
    blk = np.zeros(n_blocks, _BLOCK)
    if n_blocks:
        blk["mode"] = meta[:, 0]
        blk["k"] = meta[:, 1]
        blk["k_run"] = meta[:, 2]
        blk["bits"] = meta[:, 3]
    out[o:o + blk.nbytes] = blk.view(np.uint8)
    o += blk.nbytes
    if n_exc:
        out[o:o + 8 * n_exc] = exc_pos.astype("<u8").view(np.uint8)
        o += 8 * n_exc
        raw = np.asarray(exc_raw)
        out[o:o + n_exc * itemsize] = raw.astype(raw.dtype.newbyteorder("<")).view(np.uint8)
        o += n_exc * itemsize
    for buf, used in chunks:
        out[o:o + used] = buf[:used]
        o += used
    _CRC.pack_into(out, o, crc32(out[:o]))

    header = _Header(dtype, tuple(shape), numel, int(tag), block_size, bounds, steps, layout,
                     blk, exc_pos, header_len - n_exc * itemsize, header_len, payload_len,
                     total)
    return Frame(out_t, header)


# --------------------------------------------------------------------------- parse


def byte_tensor(buffer) -> torch.Tensor:
    """``buffer`` (a :class:`Frame`, uint8 tensor or array, bytes-like) as a flat, contiguous
    uint8 CPU tensor, without a copy where it already is one. TypeError for anything else."""
    if isinstance(buffer, Frame):
        return buffer.buffer
    if isinstance(buffer, torch.Tensor):
        if buffer.dtype != torch.uint8:
            raise TypeError(f"a frame buffer is a uint8 tensor, got {buffer.dtype}")
        return to_host(buffer.detach()).contiguous().reshape(-1)
    if isinstance(buffer, np.ndarray):
        if buffer.dtype != np.uint8:
            raise TypeError(f"a frame buffer is a uint8 array, got {buffer.dtype}")
        return torch.from_numpy(np.ascontiguousarray(buffer).reshape(-1))
    if isinstance(buffer, (bytes, bytearray, memoryview)):
        arr = np.frombuffer(bytes(buffer), np.uint8).copy()
        return torch.from_numpy(arr)
    raise TypeError(f"cannot read a frame from {type(buffer).__name__}")


def _check_max_numel(max_numel) -> None:
    if max_numel is not None and (not isinstance(max_numel, (int, np.integer))
                                  or isinstance(max_numel, bool) or max_numel < 0):
        raise ValueError(f"max_numel must be None or an int >= 0, got {max_numel!r}")


def _eg_lengths(v: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Bits of the order-k EG codewords of v (int64 arrays, v + 2**k < 2**53)."""
    nb = np.frexp((v + (np.int64(1) << k)).astype(np.float64))[1]  # exact bit length
    return 2 * nb.astype(np.int64) - 1 - k


def _min_block_bits(mode: np.ndarray, k: np.ndarray, k_run: np.ndarray,
                    counts: np.ndarray) -> np.ndarray:
    """The fewest bits a valid block of ``counts`` elements can have (FORMAT.md, Blocks).

    Mode 4: its table and four states. Modes 0 and 2: one codeword of at least k + 1 bits
    per element. Modes 1 and 3: the
    cheapest parse is one run of all ``count`` zeros, or a run of ``count - 1`` zeros and
    the value 1 (k + 1 bits in either value code; merging two runs around a value never
    costs bits: EG_krun(a + b + 1) <= EG_krun(max) + 2, and the run and value codewords it
    removes take at least 2), so the minimum is the smaller of the two.
    """
    eg_bits = np.where(mode == eg.MODE_RANS, 8 * (eg.rans_table_bytes(k + 1) + 16),
                       counts * (k + 1))
    one_run = _eg_lengths(counts, k_run)
    run_and_one = _eg_lengths(np.maximum(counts - 1, 0), k_run) + k + 1
    return np.where(eg.is_zero_runs(mode), np.minimum(one_run, run_and_one), eg_bits)


def _fixed_fields(buf: np.ndarray, max_numel: int | None) -> tuple:
    """The fixed header's fields, checked against each other, the checksum and the frame's
    size: (dtype, itemsize, ndim, tag, block_size, numel, n_seg, n_blocks, n_exc,
    payload_len)."""
    n = buf.size
    if n < _FIXED.size + _CRC.size:
        raise FrameError(f"truncated frame: {n} bytes, a frame has at least "
                         f"{_FIXED.size + _CRC.size}")
    magic, version, dcode, ndim, flags, tag, block_size, numel, n_seg, n_blocks, n_exc, \
        payload_len = _FIXED.unpack_from(buf, 0)
    if magic != MAGIC:
        raise FrameError(f"not a ggcomm frame: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version not in READ_VERSIONS:
        raise FrameError(f"frame version {version}, this ggcomm reads versions "
                         f"{', '.join(map(str, READ_VERSIONS))}")
    (crc,) = _CRC.unpack_from(buf, n - _CRC.size)
    if crc32(buf[: n - _CRC.size]) != crc:
        raise FrameError(f"checksum mismatch: the {n}-byte frame is corrupt or truncated")
    if dcode not in DTYPES:
        raise FrameError(f"unknown dtype code {dcode}")
    if ndim > MAX_NDIM:
        raise FrameError(f"{ndim} dimensions, at most {MAX_NDIM}")
    if flags != 0:
        raise FrameError(f"unknown flags {flags:#x}")
    if not 1 <= block_size <= eg.MAX_BLOCK_SIZE:
        raise FrameError(f"block size {block_size} outside 1..{eg.MAX_BLOCK_SIZE}")
    if numel > MAX_NUMEL:
        raise FrameError(f"the frame claims {numel} elements, at most {MAX_NUMEL} are valid")
    if max_numel is not None and numel > max_numel:
        raise FrameError(f"the frame holds {numel} elements, more than the receiver's "
                         f"max_numel={max_numel}")
    dtype = DTYPES[dcode]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if n_seg < 1:
        raise FrameError("a frame has at least one segment")
    if n_exc > numel:
        raise FrameError(f"{n_exc} exceptions for {numel} elements")
    header_len = header_bytes(ndim, n_seg, n_blocks, n_exc, itemsize)
    expected = header_len + payload_len + CRC_BYTES
    if expected != n:
        raise FrameError(f"frame is {n} bytes but its header describes {expected}")

    return (dtype, itemsize, ndim, tag, block_size, numel, n_seg, n_blocks, n_exc, payload_len,
            version)


def _check_block_table(buf: np.ndarray, payload_at: int, blocks: np.ndarray,
                       bits: np.ndarray, nbytes: np.ndarray, counts: np.ndarray,
                       version: int) -> None:
    """Modes, orders, reserved bytes, each block's minimum bit budget and its padding."""
    if (blocks["mode"] > READ_VERSIONS[version]).any():
        raise FrameError(f"unknown block mode {int(blocks['mode'].max())} in a version "
                         f"{version} frame")
    rans = blocks["mode"] == eg.MODE_RANS
    if (blocks["k"] > np.where(rans, eg.RANS_ALPHABET - 1, eg.K_MAX)).any() \
            or (blocks["k_run"] > eg.K_MAX).any():
        raise FrameError(f"Exp-Golomb order above {eg.K_MAX} (or a rANS alphabet above "
                         f"{eg.RANS_ALPHABET})")
    if (blocks["reserved"] != 0).any():
        raise FrameError("reserved block-table bytes are not zero")
    if ((~eg.is_zero_runs(blocks["mode"])) & (blocks["k_run"] != 0)).any():
        raise FrameError("a block that codes no zero runs has a nonzero k_run")
    # mode 4: whole bytes, a table, four states and whole 16-bit words
    words = bits // 8 - eg.rans_table_bytes(blocks["k"].astype(np.int64) + 1) - 16
    odd = np.flatnonzero(rans & (((bits & 7) != 0) | ((words > 0) & (words & 1 == 1))))
    if odd.size:
        b = int(odd[0])
        raise FrameError(f"block {b}: a rANS block of {int(bits[b])} bits is not a table, "
                         "four states and whole 16-bit words")
    need = _min_block_bits(blocks["mode"], blocks["k"].astype(np.int64),
                           blocks["k_run"].astype(np.int64), counts)
    short = np.flatnonzero(bits < need)
    if short.size:
        b = int(short[0])
        raise FrameError(f"block {b}: {int(bits[b])} bits cannot hold its "
                         f"{int(counts[b])} elements (at least {int(need[b])})")
    # padding: the unused low bits of each block's last byte
    rem = bits & 7
    part = np.flatnonzero(rem)
    if part.size:
        last = payload_at + np.cumsum(nbytes)[part] - 1
        mask = (1 << (8 - rem[part])) - 1
        bad = np.flatnonzero(buf[last] & mask)
        if bad.size:
            b = int(part[bad[0]])
            raise FrameError(f"block {b}: nonzero padding after its {int(bits[b])} bits")


def _parse(buf: np.ndarray, max_numel: int | None = None) -> _Header:
    """Validate a frame's structure (everything but the codewords) and return its header.

    Nothing here allocates memory in proportion to the element count the frame claims;
    the per-block bit budgets bound that count by the payload's size (except zero-run
    blocks, which hold up to block_size zeros in a few bits), and ``max_numel`` by the
    caller's limit.
    """
    n = buf.size
    dtype, itemsize, ndim, tag, block_size, numel, n_seg, n_blocks, n_exc, payload_len, \
        version = _fixed_fields(buf, max_numel)

    o = _FIXED.size
    shape = tuple(int(d) for d in buf[o:o + 8 * ndim].view("<u8"))
    o += 8 * ndim
    if any(d > MAX_NUMEL for d in shape):
        raise FrameError(f"shape {shape}: a dimension above {MAX_NUMEL}")
    if math.prod(shape) != numel:  # Python ints: no overflow
        raise FrameError(f"shape {shape} does not hold {numel} elements")
    seg = buf[o:o + _SEGMENT.itemsize * n_seg].view(_SEGMENT)
    o += seg.nbytes
    if (seg["length"] > numel).any():
        raise FrameError(f"segment lengths do not add up to {numel} elements")
    lengths = seg["length"].astype(np.int64)  # each <= numel < 2**62
    bounds = np.zeros(n_seg + 1, np.int64)
    np.cumsum(lengths, out=bounds[1:])
    # int64 cannot wrap before a partial sum exceeds numel (every length is below 2**62)
    if (bounds > numel).any() or int(bounds[-1]) != numel:
        raise FrameError(f"segment lengths do not add up to {numel} elements")
    steps = seg["step"].astype(np.float64)
    with np.errstate(divide="ignore", over="ignore"):
        ok = np.isfinite(steps) & (steps > 0) & np.isfinite(1.0 / steps)
    if not ok.all():
        raise FrameError(f"invalid quantization step {steps[~ok][0]!r}")
    implied = int((-(-lengths // block_size)).sum())  # before any per-block allocation
    if implied != n_blocks:
        raise FrameError(f"{n_blocks} blocks, but the segments in blocks of {block_size} "
                         f"make {implied}")
    layout = _block_layout(bounds, block_size)
    blocks = buf[o:o + _BLOCK.itemsize * n_blocks].view(_BLOCK)
    o += blocks.nbytes
    exc_pos = buf[o:o + 8 * n_exc].view("<u8").astype(np.int64)
    o += 8 * n_exc
    exc_off = o
    o += n_exc * itemsize
    bits = blocks["bits"].astype(np.int64)
    nbytes = (bits + 7) >> 3
    if int(nbytes.sum()) != payload_len:  # no blocks: no payload
        raise FrameError(f"block lengths do not add up to the {payload_len}-byte payload")
    if n_blocks:
        _check_block_table(buf, o, blocks, bits, nbytes, layout[1], version)
    if n_exc and ((exc_pos < 0).any() or (exc_pos >= numel).any()
                  or (np.diff(exc_pos) <= 0).any()):
        raise FrameError("exception positions are not increasing positions inside the tensor")
    return _Header(dtype, shape, numel, tag, block_size, bounds, steps, layout, blocks,
                   exc_pos, exc_off, o, payload_len, n, version)


# --------------------------------------------------------------------------- decode


@functools.cache
def _luts() -> np.ndarray:
    return eg.build_luts()



def _frame_and_header(frame, max_numel: int | None = None) -> tuple[np.ndarray, _Header]:
    _check_max_numel(max_numel)
    if isinstance(frame, Frame):
        if max_numel is not None and frame._h.numel > max_numel:
            raise FrameError(f"the frame holds {frame._h.numel} elements, more than the "
                             f"receiver's max_numel={max_numel}")
        return frame.buffer.numpy(), frame._h
    buf_t = byte_tensor(frame)
    buf = buf_t.numpy()
    return buf, _parse(buf, max_numel)


def _block_arrays(h: _Header) -> tuple[np.ndarray, ...]:
    """Per block, as int64: mode, k, k_run, bit length and first payload byte."""
    blocks = h.blocks
    bits = blocks["bits"].astype(np.int64)
    offsets = np.zeros(bits.size, np.int64)
    if bits.size:
        np.cumsum((bits[:-1] + 7) >> 3, out=offsets[1:])
    return (blocks["mode"].astype(np.int64), blocks["k"].astype(np.int64),
            blocks["k_run"].astype(np.int64), bits, offsets)


def _decode_into(buf: np.ndarray, h: _Header, w: np.ndarray, steps: np.ndarray) -> None:
    """Decode every block into w (float32/float64), block b scaled by steps[segment of b]."""
    if not h.numel:
        return
    modes, ks, kruns, bits, offsets = _block_arrays(h)
    payload = buf[h.payload_off:h.payload_off + h.payload_len]
    ranges = _parallel.split(bits.size, _MIN_BLOCKS_PER_TASK)
    luts = _luts()
    starts, counts, seg = h.layout
    block_steps = steps[seg]
    results = _parallel.run(
        lambda lo, hi: eg.decode_blocks(payload, starts, counts, block_steps, lo, hi, modes, ks,
                                        kruns, bits, offsets, luts, h.exc_pos, w),
        ranges)
    for err, b in results:
        if err:
            raise FrameError(f"block {b}: {_ERRORS[err]}")


def _exception_values(buf: np.ndarray, h: _Header) -> torch.Tensor:
    """The raw exceptional values, in the frame's dtype."""
    itemsize = torch.empty(0, dtype=h.dtype).element_size()
    n = h.exc_pos.size
    raw = np.frombuffer(buf[h.exc_off:h.exc_off + n * itemsize].tobytes(),
                        np.dtype(f"<i{itemsize}"))
    return torch.from_numpy(raw.astype(raw.dtype.newbyteorder("="))).view(h.dtype)


# Fresh outputs at least this large go on transparent huge pages where the OS offers them.
# Smaller ones are left to malloc: glibc serves requests up to its largest dynamic mmap
# threshold (32 MiB on 64-bit) from memory that earlier results freed, already faulted in,
# where a new mapping is faulted again on every call (16 MiB decodes into a new tensor
# 1.08-1.19x as fast, alternating A/B; not in a results file).
_HUGE_PAGE_MIN_BYTES = 32 << 20


def _fresh(n: int, dtype: np.dtype) -> np.ndarray:
    """An uninitialized array of n elements for a decode's result.

    A fresh allocation's first touch costs one page fault per 4 KiB page: at 256 MiB, as
    long as decoding itself. Arrays of _HUGE_PAGE_MIN_BYTES and more are mapped privately
    and advised onto 2 MiB transparent huge pages (``MADV_HUGEPAGE``, Linux; 512 times fewer
    faults) where the OS offers them, else allocated as usual. The array owns its mapping,
    which is unmapped when the last reference (a tensor made from it) goes.
    """
    dtype = np.dtype(dtype)
    nbytes = n * dtype.itemsize
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if nbytes < _HUGE_PAGE_MIN_BYTES or advice is None:
        return np.empty(n, dtype)
    try:
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(advice)
    except (OSError, ValueError, AttributeError):  # not offered here: ordinary pages
        return np.empty(n, dtype)
    return np.frombuffer(region, dtype, count=n)


def _decode_scratch(n: int, dtype: torch.dtype) -> np.ndarray:
    """A reusable per-calling-thread array of n elements for ``decode(out=)`` (it keeps the
    largest size decoded so far on that thread)."""
    name = "decode_f64" if dtype == torch.float64 else "decode_f32"
    a = getattr(_scratch, name, None)
    if a is None or a.size < n:
        a = np.empty(n, np.float64 if dtype == torch.float64 else np.float32)
        setattr(_scratch, name, a)
    return a[:n]


def decode(frame, *, out: torch.Tensor | None = None, max_numel: int | None = None,
           device: torch.device | str | None = None, keep_out: bool = True) -> torch.Tensor:
    """Decode a frame (a :class:`Frame`, or a buffer holding one) into a tensor.

    Returns ``q * step`` with the frame's dtype and shape: ``float64(q) * step`` rounded
    to float32 (float64 for float64 frames), then to the dtype. Values that travelled as
    exceptions come back bit for bit. With ``out`` (a tensor of the frame's dtype and
    element count, on the CPU or a CUDA device) the result is written there and ``out`` is
    returned; ``out`` is written only once the whole frame has decoded, so on a FrameError
    it is left as it was (on the CPU the frame is decoded into a scratch array the calling
    thread keeps for the next call, and copied: one extra pass over the output, far cheaper
    than decoding twice to validate first).

    ``keep_out=False`` gives that guarantee up for speed where out is a receive buffer
    whose old values no one needs: a contiguous CPU ``out`` of float32 (float64 for float64
    frames) not sharing memory with the frame is decoded into directly, with no scratch
    and no copy; a frame that fails to decode still raises FrameError, but may have written
    part of ``out`` first, as a failed ``torch.distributed.recv`` leaves its tensor
    undefined. :class:`ggcomm.pipeline.PipeComm` receives this way.

    ``device``: where a new result goes (default the CPU); with ``out``, out's device. For a
    CUDA device the frame is decoded into pinned host memory, copied to the device on its
    current stream without blocking (as ``Tensor.to(device, non_blocking=True)`` from
    pinned memory: work queued on that stream sees the values), and cast to the frame's
    dtype and given its exceptions there.

    ``max_numel``: the most elements the caller accepts. A frame claiming more raises
    FrameError before anything in proportion to its size is allocated. None (the default)
    sets no limit of the caller's: the frame is then bounded only by its own bits, and a
    few hundred bytes of zero-run blocks can validly claim 2**26 elements. Receivers of
    frames they do not trust should pass the size they expect.

    Raises FrameError if the buffer is not a valid frame.
    """
    target = _decode_device(out, device)
    buf, h = _frame_and_header(frame, max_numel)
    if out is not None:
        if out.dtype != h.dtype or out.numel() != h.numel:
            raise ValueError(f"out must be a {h.dtype} tensor of {h.numel} elements")
    work_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    if target.type != "cpu":
        return _decode_to_device(buf, h, work_dtype, target, out)
    direct = out is not None and not keep_out and _decodes_in_place(out, work_dtype, buf)
    if out is None:
        work = torch.from_numpy(_fresh(h.numel, np.float64 if h.dtype == torch.float64
                                       else np.float32))
    elif direct:
        work = out.detach().view(-1)
    else:  # the calling thread's reusable scratch: no fresh pages (and page faults) per call
        work = torch.from_numpy(_decode_scratch(h.numel, work_dtype))
    _decode_into(buf, h, work.numpy(), h.steps)  # every FrameError is raised here
    result = work if work.dtype == h.dtype else work.to(h.dtype)
    if h.exc_pos.size:
        result[torch.from_numpy(h.exc_pos)] = _exception_values(buf, h)
    if out is not None:
        if not direct:
            out.copy_(result.view(out.shape))
        return out
    return result.view(h.shape)


def _decodes_in_place(out: torch.Tensor, work_dtype: torch.dtype, buf: np.ndarray) -> bool:
    """Whether decode(keep_out=False) can write straight into out: a contiguous CPU tensor
    of the work dtype whose memory does not overlap the frame's bytes (and that autograd
    does not track: such an out goes through copy_, which autograd checks)."""
    if (out.device.type != "cpu" or out.dtype != work_dtype or not out.is_contiguous()
            or out.requires_grad):
        return False
    lo, n = out.data_ptr(), out.numel() * out.element_size()
    b_lo = buf.__array_interface__["data"][0]
    return lo + n <= b_lo or b_lo + buf.nbytes <= lo


def _decode_device(out, device) -> torch.device:
    """Where decode's result goes: out's device, else ``device``, else the CPU."""
    target = None
    if device is not None:
        try:
            target = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must name a torch device, got {device!r}") from e
        if target.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {device!r}: no CUDA device here")
            if target.index is None:
                target = torch.device("cuda", torch.cuda.current_device())
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.device.type not in ("cpu", "cuda"):
            raise ValueError("out must be a CPU or CUDA tensor")
        if target is not None and target != out.device:
            raise ValueError(f"device {device} is not out's device, {out.device}")
        return out.device
    return target if target is not None else torch.device("cpu")


def _decode_to_device(buf, h: _Header, work_dtype: torch.dtype, target: torch.device,
                      out: torch.Tensor | None) -> torch.Tensor:
    """decode for a result on a device: decoded on the host (pinned memory for CUDA), then
    copied, cast and given its exceptions on the device."""
    cuda = target.type == "cuda"
    work = torch.empty(h.numel, dtype=work_dtype, pin_memory=cuda)
    _decode_into(buf, h, work.numpy(), h.steps)  # every FrameError is raised here
    with torch.cuda.device(target) if cuda else contextlib.nullcontext():
        result = work.to(target, non_blocking=cuda)
        result = result if result.dtype == h.dtype else result.to(h.dtype)
        if h.exc_pos.size:
            result[torch.from_numpy(h.exc_pos).to(target)] = \
                _exception_values(buf, h).to(target)
        result = result.view(h.shape)
        if out is not None:
            out.copy_(result.view(out.shape))
            return out
    return result


def decode_symbols(frame, *, max_numel: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The frame's integers: (q as float64, exception positions, exception values).

    q is exact (|q| < 2**30) and 0 at exception positions; the exceptional values come
    back as float64. Summing the q of several frames that share steps is exact, which is
    how ggcomm.ddp gives every rank bit-identical averages. ``max_numel`` as in
    :func:`decode`.
    """
    buf, h = _frame_and_header(frame, max_numel)
    q = torch.from_numpy(_fresh(h.numel, np.float64))
    _decode_into(buf, h, q.numpy(), np.ones_like(h.steps))
    pos = torch.from_numpy(h.exc_pos)
    vals = _exception_values(buf, h).double() if h.exc_pos.size else \
        torch.empty(0, dtype=torch.float64)
    return q, pos, vals


def inspect(frame, *, max_numel: int | None = None) -> FrameInfo:
    """The frame's header as data (validating it as ``Frame.from_buffer`` does).

    Allocates nothing in proportion to the element count; ``max_numel`` as in
    :func:`decode`.
    """
    buf, h = _frame_and_header(frame, max_numel)
    blocks = []
    bit_off = 0
    starts, counts, seg = h.layout
    for b, rec in enumerate(h.blocks):
        nbits = int(rec["bits"])
        blocks.append(BlockInfo(int(starts[b]), int(counts[b]), int(seg[b]),
                                _MODE_NAMES[int(rec["mode"])],
                                int(rec["k"]), int(rec["k_run"]), bit_off, nbits))
        bit_off += (nbits + 7) // 8 * 8
    return FrameInfo(
        version=h.version, dtype=h.dtype, shape=h.shape, numel=h.numel, tag=h.tag,
        block_size=h.block_size,
        segment_lengths=tuple(int(v) for v in np.diff(h.seg_bounds)),
        steps=tuple(float(s) for s in h.steps), blocks=tuple(blocks),
        exception_positions=tuple(int(p) for p in h.exc_pos),
        header_bytes=h.payload_off,
        payload=buf[h.payload_off:h.payload_off + h.payload_len].tobytes(),
        nbytes=h.nbytes)


# --------------------------------------------------------------------------- exact sums
#
# What a gradient collective needs, fused so that the data is touched as few times as
# possible: encode with error feedback and statistics in one pass, decode several frames
# straight into their exact integer sum (block by block, never a full-size intermediate),
# and re-encode an integer sum losslessly. Used by ggcomm.ddp; the frames are ordinary
# frames, decodable by :func:`decode`.


def moments(x: np.ndarray, resid: np.ndarray | None = None,
            segments: Sequence[int] | None = None) -> np.ndarray:
    """Per segment ``(sum of x^2, sum of |x|, non-finite count)`` over the finite values of
    ``x (+ resid)`` (flat float32/float64 arrays), in one parallel pass: what a step rule
    needs (:mod:`ggcomm.step_policy`). Sums are float64; their order is not specified."""
    r = resid if resid is not None else np.empty(0, x.dtype)
    lengths = [x.size] if segments is None else [int(v) for v in segments]
    bounds = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=bounds[1:])
    if bounds[-1] != x.size:
        raise ValueError(f"segments add up to {int(bounds[-1])}, not {x.size}")
    starts, counts, seg = _block_layout(bounds, DEFAULT_BLOCK_SIZE)
    stats = np.zeros((starts.size, 3), np.float64)
    _parallel.run(lambda lo, hi: eg.block_moments(x, r, starts, counts, lo, hi, stats),
                  _parallel.split(starts.size, _MIN_BLOCKS_PER_TASK))
    out = np.zeros((len(lengths), 3), np.float64)
    np.add.at(out, seg, stats)
    return out


def max_frame_bytes(segments: Sequence[int], block_size: int, itemsize: int) -> int:
    """The largest valid frame of a flat tensor with these segment lengths and block size
    (``itemsize``: bytes per element of the frame's dtype), every element an exception and
    every block at its worst case: what a receiver may accept for such a frame, at most."""
    bounds = np.zeros(len(segments) + 1, np.int64)
    np.cumsum([int(v) for v in segments], out=bounds[1:])
    numel = int(bounds[-1])
    counts = _block_layout(bounds, int(block_size))[1]
    payload = int(eg.worst_case_bytes(counts, 1).sum()) if counts.size else 0
    return header_bytes(1, len(segments), counts.size, numel, itemsize) + payload + CRC_BYTES


def encode_feedback(
    g: np.ndarray,
    resid: np.ndarray | None,
    steps: np.ndarray,
    segments: Sequence[int],
    *,
    k: int | str = "auto",
    block_size: int = DEFAULT_BLOCK_SIZE,
    tag: int = 0,
    q_out: np.ndarray | None = None,
    rans: bool = True,
) -> tuple[Frame, np.ndarray]:
    """Encode ``x = g + resid`` and update the residual, in one pass over the data.

    ``g`` and ``resid`` are flat float32 arrays of one length (``resid`` None: no error
    feedback). The frame is exactly ``encode(x, steps, segments=segments, ...)`` of the
    float32 ``x``; ``resid`` becomes ``x - q * step`` (0 where ``x`` travels as an
    exception); ``q_out`` (int32, same length), if given, receives ``q``. Returns the frame
    and, per segment, ``(sum of x^2, sum of |x|, non-finite count)`` over the finite ``x``.
    """
    k_fixed, zr = _code_args(k, block_size, "auto", tag, rans)
    n = g.size
    steps, bounds = _steps_and_bounds(steps, segments, n)
    layout = _block_layout(bounds, int(block_size))
    starts, counts, seg = layout
    block_steps = steps[seg]
    block_invs = 1.0 / block_steps
    block_lims = _code_limits(steps, torch.float32)[0][seg]
    stats = np.zeros((starts.size, 3), np.float64)
    r = resid if resid is not None else np.empty(0, np.float32)
    q = q_out if q_out is not None else np.empty(0, np.int32)

    def kernel(buf, meta, lo, hi):
        return eg.encode_blocks_feedback(g, r, starts, counts, block_invs, block_steps,
                                         block_lims, lo, hi, k_fixed, zr, buf, meta, stats, q)

    meta, chunks = _encode_ranges(kernel, counts, zr)
    # with feedback the residual holds x itself where x is an exception (see the kernel)
    exc_pos = _exception_positions(r if resid is not None else g, meta, starts, counts,
                                   block_invs, block_lims)
    raw = None
    if exc_pos.size:
        src = r if resid is not None else g
        raw = src[exc_pos].view(np.int32)
        if resid is not None:
            raw = raw.copy()
            resid[exc_pos] = 0.0
    frame = _assemble(torch.float32, (n,), int(tag), int(block_size), bounds, steps, layout,
                      meta, chunks, exc_pos, raw)
    seg_stats = np.zeros((steps.size, 3), np.float64)
    np.add.at(seg_stats, seg, stats)
    return frame, seg_stats


def encode_integers(
    s: np.ndarray,
    steps: np.ndarray,
    segments: Sequence[int],
    extra_pos: np.ndarray,
    extra_val: np.ndarray,
    *,
    k: int | str = "auto",
    block_size: int = DEFAULT_BLOCK_SIZE,
    tag: int = 0,
    rans: bool = True,
) -> Frame:
    """Losslessly encode the tensor ``s * step + extra`` given as integers ``s`` (int64).

    The frame (float64) codes ``s`` at each segment's step; positions where ``|s|`` exceeds
    the code's range (or where ``s * step`` would pass float64's largest finite value),
    and the sorted ``extra_pos`` (where ``extra_val`` is added: values that travelled as
    exceptions), carry ``s * step + extra`` exactly in the exception list. ``s`` is
    modified (set to 0 at ``extra_pos``).
    """
    k_fixed, zr = _code_args(k, block_size, "auto", tag, rans)
    steps, bounds = _steps_and_bounds(steps, segments, s.size)
    layout = _block_layout(bounds, int(block_size))
    starts, counts, seg = layout
    seg_of = np.repeat(np.arange(steps.size), np.diff(bounds)) if extra_pos.size else None
    ex_val = None
    if extra_pos.size:
        ex_val = s[extra_pos] * steps[seg_of[extra_pos]] + extra_val
        s[extra_pos] = 0

    lims, qlims = _code_limits(steps, torch.float64)
    block_qlims = qlims[seg]

    def kernel(buf, meta, lo, hi):
        return eg.encode_blocks_int(s, starts, counts, block_qlims, lo, hi, k_fixed, zr, buf,
                                    meta)

    meta, chunks = _encode_ranges(kernel, counts, zr)
    # |s| > qlim: find_exceptions reads s as float64 at step 1 (|float64(s)| <= lim exactly
    # when |s| <= qlim, for integers s)
    big = _exception_positions(s, meta, starts, counts, np.ones(starts.size), lims[seg])
    pos = extra_pos
    vals = ex_val if ex_val is not None else np.empty(0, np.float64)
    if big.size:
        seg_big = np.searchsorted(bounds, big, side="right") - 1
        pos = np.concatenate([pos, big])
        with np.errstate(over="ignore"):  # s * step past float64's range: it is +-inf
            vals = np.concatenate([vals, s[big] * steps[seg_big]])
        order = np.argsort(pos, kind="stable")
        pos, vals = pos[order], vals[order]
    return _assemble(torch.float64, (s.size,), int(tag), int(block_size), bounds, steps, layout,
                     meta, chunks, pos.astype(np.int64), vals.astype(np.float64).view(np.int64))


def _check_same_layout(peers: list[tuple[int, int, Frame]], ref: _Header) -> None:
    """FrameError unless every frame has ``ref``'s segments, block size and steps."""
    for i, _, f in peers[1:]:
        h = f._h
        if (h.numel != ref.numel or h.block_size != ref.block_size
                or not np.array_equal(h.seg_bounds, ref.seg_bounds)):
            raise FrameError(f"frame {i}: its segments or block size differ from frame "
                             f"{peers[0][0]}'s")
        if not np.array_equal(h.steps, ref.steps):
            raise FrameError(f"frame {i}: its steps differ from frame {peers[0][0]}'s")


def _summed_exceptions(frames: Sequence[tuple[int, Frame] | None],
                       own_exceptions: tuple[np.ndarray, np.ndarray] | None,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Exceptional values of all contributions, summed per position in the given order:
    (sorted positions, float64 sums)."""
    pos_parts, val_parts = [], []
    for item in frames:
        if item is None:
            if own_exceptions is not None and own_exceptions[0].size:
                pos_parts.append(own_exceptions[0])
                val_parts.append(np.asarray(own_exceptions[1], np.float64))
        elif item[1]._h.exc_pos.size:
            f = item[1]
            pos_parts.append(f._h.exc_pos)
            val_parts.append(_exception_values(f.buffer.numpy(), f._h).double().numpy())
    if not pos_parts:
        return np.empty(0, np.int64), np.empty(0, np.float64)
    xpos, inverse = np.unique(np.concatenate(pos_parts), return_inverse=True)
    xval = np.zeros(xpos.size, np.float64)
    np.add.at(xval, inverse, np.concatenate(val_parts))  # sequential: in the given order
    return xpos, xval


def sum_frames(
    buffer: torch.Tensor,
    frames: Sequence[tuple[int, Frame] | None],
    *,
    own: np.ndarray | None = None,
    own_exceptions: tuple[np.ndarray, np.ndarray] | None = None,
    divisor: float = 1.0,
    out: np.ndarray,
    like: Frame | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact sum of the integers of several frames that share block layout and steps.

    ``frames`` lists, in summation order, ``(offset, frame)`` with each frame's bytes at
    ``buffer[offset:]``, or None for the one contribution already known as integers:
    ``own`` (int32/int64 per element) with its exceptions ``own_exceptions`` (positions,
    float64 values). Exceptional values are summed per position in that order, so every
    rank that sums the same frames gets the same bits.

    ``out`` float32: receives ``sum * (step / divisor)``, and ``(sum * step + exceptions) /
    divisor`` where exceptional values were added; ``out`` int64:
    receives the integer sum, and the summed exceptions are returned for the caller to
    carry. Returns the exceptions (sorted positions, float64 sums). Raises FrameError for a
    corrupt frame or one whose layout or steps differ from the first (naming its index).
    ``like``: a frame whose layout and steps to use when ``frames`` holds no frame.
    """
    peers = [(i, o, f) for i, item in enumerate(frames) if item is not None
             for o, f in (item,)]
    ref = peers[0][2]._h if peers else (like._h if like is not None else None)
    n_frames = len(peers)
    if ref is None:
        raise ValueError("sum_frames needs at least one frame, or `like`")
    _check_same_layout(peers, ref)
    if out.size != ref.numel or (own is not None and own.size != ref.numel):
        raise ValueError(f"out and own must have {ref.numel} elements")
    buf = buffer.numpy()
    arrays = [_block_arrays(f._h) for _, _, f in peers]
    n_blocks = ref.layout[0].size
    modes, ks, kruns, bits, offsets = (np.stack([a[j] for a in arrays]) if n_frames
                                       else np.zeros((0, n_blocks), np.int64)
                                       for j in range(5))
    pay_lo = np.array([o + f._h.payload_off for _, o, f in peers], np.int64)
    pay_hi = pay_lo + np.array([f._h.payload_len for _, _, f in peers], np.int64)
    exc_ptr = np.zeros(n_frames + 1, np.int64)
    np.cumsum([f._h.exc_pos.size for _, _, f in peers], out=exc_ptr[1:])
    exc_pos = np.concatenate([f._h.exc_pos for _, _, f in peers]) if exc_ptr[-1] else \
        np.empty(0, np.int64)
    xpos, xval = _summed_exceptions(frames, own_exceptions)
    starts, counts, seg = ref.layout
    block_steps = ref.steps[seg]
    own_arr = own if own is not None else np.empty(0, np.int32)
    out_f = out if out.dtype == np.float32 else np.empty(0, np.float32)
    out_i = out if out.dtype == np.int64 else np.empty(0, np.int64)
    if out_f.size == 0 and out_i.size == 0 and out.size:
        raise TypeError(f"out must be float32 or int64, not {out.dtype}")
    luts = _luts()
    results = _parallel.run(
        lambda lo, hi: eg.reduce_blocks(buf, pay_lo, pay_hi, modes, ks, kruns, bits, offsets,
                                        starts, counts, block_steps, lo, hi, luts, own_arr,
                                        exc_pos, exc_ptr, xpos, xval, float(divisor), out_f,
                                        out_i),
        _parallel.split(starts.size, _MIN_BLOCKS_PER_TASK))
    for err, b, f in results:
        if err:
            raise FrameError(f"frame {peers[f][0]}, block {b}: {_ERRORS[err]}")
    return xpos, xval
