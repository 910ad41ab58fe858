"""RF8: weights as one or two signed powers of two, in 8 bits each.

RF8 ("residual floating point", from the earlier version of arXiv 2506.00486, proposed
there for GG-initialized, BackSlash-trained weights) keeps each weight as

    w ~ s1 * 2^e1 + s2 * 2^e2,   e1 = round(log2 |w|),   e2 = round(log2 |w - s1 2^e1|),

the second term only when it lies at most ``MAX_GAP`` (4) octaves below the first. The
rounding is the paper's greedy one, term by term, as in the authors' code: each term is
the power of two nearest in log2 to what is left. A multiply by an RF8 weight is two shifts
and an add.

The 8-bit code (docs/FORMAT.md, "RF8 tensors") is the sign, a 4-bit exponent offset ``E``
from a per-block base and a 3-bit tail code ``T``::

    bit 7: sign of w     bits 6-3: E      bits 2-0: T
    E = 0:      zero (T = 0; the sign bit keeps -0.0)
    E = 1..15:  e1 = base + E;  T = 0: one term;  T = 1: + 2^(e1-1);
                T = 2..7: d = 2 + (T - 2) // 2, the second term 2^(e1-d), of the same sign
                as the first for even T and of the opposite sign for odd T.

(d = 1 with an opposite sign cannot occur: ``|w - 2^e1| < 2^(e1-1.5)`` when ``|w| <
2^e1``.) Each block of ``block_size`` values has one base, ``max(e1) - 15`` over its coded
values, so a block spans 15 octaves below its largest value; smaller values (``|w| <
2^(base + 1/2)``, at most ``2^-14.5`` of the block's largest) are coded as zero. Values
whose RF8 form is not finite in the tensor's dtype, and non-finite values, travel exactly in
an exception list.

Error (greedy rounding, values not flushed): at most 0.109 |w|, at a mantissa of about
1.354, whose residual 0.354 2^e1 is rounded up to 2^(e1-1); the RMS relative error over
log-uniform mantissas is 4.0%. ``benchmarks/paper/deepshape_rf8.py`` compares it with
bf16, fp8 e4m3 and int8 on a GPT's weights.

``encode`` gives a self-describing uint8 tensor (ready for torch.distributed); ``decode``
reads it back, checking every field against the bytes received (``FrameError`` otherwise);
``quantize`` is ``decode(encode(x))`` without the bytes, and ``quantize_`` rounds a model's
parameters in place. The work is done by numba kernels (``ggcomm.kernels.rf8``) over
blocks, on the codec's threads (``ggcomm.set_num_threads``).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from . import _parallel
from .codec import DTYPE_CODES, DTYPES, MAX_NDIM, MAX_NUMEL, byte_tensor, crc32
from .errors import FrameError
from .kernels import rf8 as kr

__all__ = [
    "BLOCK_SIZE",
    "MAX_GAP",
    "decode",
    "encode",
    "encoded_bytes",
    "max_encoded_bytes",
    "quantize",
    "quantize_",
]

MAGIC = b"GGR8"
VERSION = 1
MAX_GAP = kr.MAX_GAP
"""n: the second term is kept only when it is at most this many octaves below the first."""
WINDOW = kr.WINDOW
"""Octaves a block spans below its largest value (E = 1..15)."""
BLOCK_SIZE = 1024
"""Values per shared exponent base (2 bytes per block: 0.016 bits per value)."""
MAX_BLOCK_SIZE = (1 << 31) - 1

_FIXED = struct.Struct("<4sBBBBII")
_CRC = struct.Struct("<I")
_RAW_INT = {torch.float32: torch.int32, torch.float16: torch.int16,
            torch.bfloat16: torch.int16, torch.float64: torch.int64}
# Where each dtype rounds a float64 value to infinity: (2 - 2^-p) 2^emax, p its precision.
_OVERFLOW_AT = {torch.float32: (2.0 - 2.0**-24) * 2.0**127,
                torch.float16: (2.0 - 2.0**-11) * 2.0**15,
                torch.bfloat16: (2.0 - 2.0**-8) * 2.0**127,
                torch.float64: math.inf}
_MIN_BLOCKS_PER_TASK = 64 * 1024  # values per thread task, at least
_ERRORS = {kr.ERR_ZERO_TAIL: "a zero code (E = 0) with a nonzero tail code",
           kr.ERR_RANGE: "a code outside the dtype's finite range (its block base is out "
                         "of range)"}


def _check_block_size(block_size: Any) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or \
            not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be an int in 1..{MAX_BLOCK_SIZE}, got {block_size!r}")
    return block_size


def _check_tensor(x: Any) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"RF8 takes a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"RF8 supports float32/float16/bfloat16/float64, not {x.dtype}")
    if x.dim() > MAX_NDIM:
        raise ValueError(f"at most {MAX_NDIM} dimensions")


def _tasks(numel: int, block_size: int) -> tuple[int, list[tuple[int, int]]]:
    n_blocks = -(-numel // block_size)
    per_task = max(1, _MIN_BLOCKS_PER_TASK // block_size)
    return n_blocks, _parallel.split(n_blocks, per_task)


def _codes(x: torch.Tensor, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes (uint8), block bases (int64) and exception positions (int64) of flat ``x``."""
    flat = x.detach().reshape(-1).cpu()
    xs = (flat if flat.dtype in (torch.float32, torch.float64) else flat.float()).numpy()
    n_blocks, tasks = _tasks(xs.size, block_size)
    codes = np.empty(xs.size, np.uint8)
    bases = np.empty(n_blocks, np.int64)
    exc = np.empty(xs.size, np.uint8)
    over = _OVERFLOW_AT[x.dtype]
    _parallel.run(lambda lo, hi: kr.encode_blocks(xs, block_size, over, lo, hi, codes,
                                                  bases, exc), tasks)
    return codes, bases, np.flatnonzero(exc)


def _values(codes: np.ndarray, bases: np.ndarray, block_size: int,
            dtype: torch.dtype) -> torch.Tensor:
    """The values of the codes as a flat tensor of ``dtype`` (FrameError for a bad code)."""
    # computed in float64 and rounded once: float32 and float64 directly, float16 and
    # bfloat16 through a float64 array (rounding through float32 first could differ)
    work = np.empty(codes.size, np.float32 if dtype == torch.float32 else np.float64)
    _, tasks = _tasks(codes.size, block_size)
    over = _OVERFLOW_AT[dtype]
    for err, _ in _parallel.run(lambda lo, hi: kr.decode_blocks(
            codes, bases, block_size, over, lo, hi, work), tasks):
        if err:
            raise FrameError(_ERRORS[err])
    out = torch.from_numpy(work)
    return out if out.dtype == dtype else out.to(dtype)


def quantize(x: torch.Tensor, *, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """``x`` rounded to RF8: bit for bit what ``decode(encode(x, block_size=...))`` gives
    (same dtype, shape and device), computed without the bytes."""
    _check_tensor(x)
    block_size = _check_block_size(block_size)
    codes, bases, pos = _codes(x, block_size)
    out = _values(codes, bases, block_size, x.dtype)
    if pos.size:  # exceptions keep their exact bits (NaN payloads too)
        p = torch.from_numpy(pos)
        out[p] = x.detach().reshape(-1).cpu()[p]
    return out.view(x.shape).to(x.device)


def quantize_(params: Any, *, block_size: int = BLOCK_SIZE) -> int:
    """Round parameters to RF8 in place: a ``torch.nn.Module`` (its floating-point
    parameters) or an iterable of tensors. Returns the number of values rounded."""
    tensors = params.parameters() if isinstance(params, torch.nn.Module) else params
    n = 0
    with torch.no_grad():
        for p in tensors:
            if isinstance(p, torch.Tensor) and p.is_floating_point():
                p.copy_(quantize(p, block_size=block_size))
                n += p.numel()
    return n


def encoded_bytes(numel: int, ndim: int, block_size: int, n_exceptions: int,
                  itemsize: int) -> int:
    """Size of an encoded tensor: header, bases, one byte per value, exceptions, CRC."""
    n_blocks = -(-numel // block_size)
    return (_FIXED.size + 8 * ndim + 2 * n_blocks + numel + n_exceptions * (8 + itemsize)
            + _CRC.size)


def max_encoded_bytes(shape: Iterable[int], dtype: torch.dtype,
                      block_size: int = BLOCK_SIZE) -> int:
    """The largest valid encoding of a tensor of this shape and dtype (every value an
    exception): what a receiver may size a buffer by before it trusts a sender."""
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return encoded_bytes(numel, len(shape), _check_block_size(block_size), numel, itemsize)


def encode(x: torch.Tensor, *, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """``x`` (float32/float16/bfloat16/float64, any shape and device) as RF8 bytes: a
    uint8 CPU tensor laid out as docs/FORMAT.md, "RF8 tensors", specifies."""
    _check_tensor(x)
    block_size = _check_block_size(block_size)
    numel = x.numel()
    codes, bases, pos = _codes(x, block_size)
    if bases.size and not (-32768 <= int(bases.min()) and int(bases.max()) <= 32767):
        raise AssertionError("an exponent base outside int16")  # float64 bounds it to +-1100
    itemsize = x.element_size()
    raw = x.detach().reshape(-1).cpu()[torch.from_numpy(pos)].view(_RAW_INT[x.dtype]).numpy()
    head = (_FIXED.pack(MAGIC, VERSION, DTYPE_CODES[x.dtype], x.dim(), 0, block_size, pos.size)
            + struct.pack(f"<{x.dim()}Q", *x.shape) + bases.astype("<i2").tobytes())
    tail = pos.astype("<u8").tobytes() + raw.astype(raw.dtype.newbyteorder("<")).tobytes()
    size = encoded_bytes(numel, x.dim(), block_size, pos.size, itemsize)
    out = torch.empty(size, dtype=torch.uint8)
    o = out.numpy()
    o[: len(head)] = np.frombuffer(head, np.uint8)
    o[len(head): len(head) + numel] = codes
    o[len(head) + numel: size - _CRC.size] = np.frombuffer(tail, np.uint8)
    _CRC.pack_into(o, size - _CRC.size, crc32(o[: size - _CRC.size]))
    return out


def decode(buffer: Any, *, max_numel: int | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """RF8 bytes back to the tensor (dtype and shape from the bytes).

    Every field is checked against the bytes received before anything is allocated from
    it: a claimed size must match the buffer exactly (one byte per value at least), so
    memory is bounded by what arrived; ``max_numel`` bounds it further. With ``out`` (a CPU
    tensor of the same dtype and element count) the values are written there only once
    the whole buffer has decoded. Raises :class:`FrameError` for anything that is not a
    valid RF8 tensor.
    """
    if max_numel is not None and (isinstance(max_numel, bool) or not isinstance(max_numel, int)
                                  or max_numel < 0):
        raise ValueError(f"max_numel must be None or an int >= 0, got {max_numel!r}")
    buf = byte_tensor(buffer)
    b = buf.numpy()
    n = b.size
    if n < _FIXED.size + _CRC.size:
        raise FrameError(f"truncated RF8 tensor: {n} bytes, at least "
                         f"{_FIXED.size + _CRC.size} needed")
    magic, version, dcode, ndim, reserved, block_size, n_exc = _FIXED.unpack_from(b, 0)
    if magic != MAGIC:
        raise FrameError(f"not an RF8 tensor: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise FrameError(f"RF8 version {version}, this ggcomm reads version {VERSION}")
    (crc,) = _CRC.unpack_from(b, n - _CRC.size)
    if crc32(b[: n - _CRC.size]) != crc:
        raise FrameError(f"checksum mismatch: the {n}-byte RF8 tensor is corrupt or truncated")
    if dcode not in DTYPES:
        raise FrameError(f"unknown dtype code {dcode}")
    if ndim > MAX_NDIM or reserved != 0 or not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise FrameError(f"bad RF8 header: ndim {ndim}, reserved {reserved}, "
                         f"block size {block_size}")
    if n < _FIXED.size + 8 * ndim + _CRC.size:
        raise FrameError(f"RF8 tensor of {n} bytes cannot hold its {ndim}-d shape")
    shape = struct.unpack_from(f"<{ndim}Q", b, _FIXED.size)
    numel = 1
    for s in shape:  # each value takes a byte: a claim past the buffer fails early
        numel *= s
        if numel > n:
            break
    if numel > min(n, MAX_NUMEL):
        raise FrameError(f"shape {shape} claims more values than the {n}-byte buffer holds")
    if max_numel is not None and numel > max_numel:
        raise FrameError(f"the RF8 tensor holds {numel} values, more than the receiver's "
                         f"max_numel={max_numel}")
    if n_exc > numel:
        raise FrameError(f"{n_exc} exceptions for {numel} values")
    dtype = DTYPES[dcode]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    expected = encoded_bytes(numel, ndim, block_size, n_exc, itemsize)
    if expected != n:
        raise FrameError(f"RF8 tensor is {n} bytes but its header describes {expected}")
    if out is not None and (not isinstance(out, torch.Tensor) or out.dtype != dtype
                            or out.numel() != numel or out.device.type != "cpu"):
        raise ValueError(f"out must be a CPU {dtype} tensor of {numel} elements")

    at = _FIXED.size + 8 * ndim
    n_blocks = -(-numel // block_size)
    base = torch.from_numpy(b[at: at + 2 * n_blocks].view("<i2").astype("int64"))
    at += 2 * n_blocks
    codes = buf[at: at + numel]
    at += numel
    pos = torch.from_numpy(b[at: at + 8 * n_exc].view("<u8").astype("int64"))
    at += 8 * n_exc
    raw = torch.from_numpy(b[at: at + itemsize * n_exc].copy().view(f"<i{itemsize}")
                           .astype(f"=i{itemsize}"))
    if n_exc and not (bool((pos[1:] > pos[:-1]).all()) and 0 <= int(pos[0])
                      and int(pos[-1]) < numel):
        raise FrameError("exception positions must be increasing and within the tensor")
    if n_exc and bool((codes[pos] != 0).any()):
        raise FrameError("a value in the exception list has a nonzero code")

    result = _values(codes.numpy(), base.numpy(), block_size, dtype)
    if n_exc:
        result[pos] = raw.view(dtype)  # the exact bits sent
    result = result.view(shape)
    if out is not None:
        out.copy_(result.view(out.shape))
        return out
    return result
