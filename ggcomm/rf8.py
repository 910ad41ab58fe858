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
parameters in place. Computation is vectorised torch in float64, in chunks of ``CHUNK``
elements, so the working memory stays near 100 bytes per chunk element.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from .codec import DTYPE_CODES, DTYPES, MAX_NDIM, MAX_NUMEL, byte_tensor
from .errors import FrameError

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
MAX_GAP = 4
"""n: the second term is kept only when it is at most this many octaves below the first."""
WINDOW = 15
"""Octaves a block spans below its largest value (E = 1..15)."""
BLOCK_SIZE = 1024
"""Values per shared exponent base (2 bytes per block: 0.016 bits per value)."""
MAX_BLOCK_SIZE = (1 << 31) - 1
CHUNK = 1 << 20
"""Elements processed at once (a multiple of any power-of-two block size up to it)."""

_FIXED = struct.Struct("<4sBBBBII")
_CRC = struct.Struct("<I")
_SQRT_HALF = math.sqrt(0.5)  # |w| >= 2^(e + 1/2) <=> frexp mantissa >= sqrt(1/2)
_RAW_INT = {torch.float32: torch.int32, torch.float16: torch.int16,
            torch.bfloat16: torch.int16, torch.float64: torch.int64}


def _check_block_size(block_size: Any) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or \
            not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be an int in 1..{MAX_BLOCK_SIZE}, got {block_size!r}")
    return block_size


def _round_log2(a: torch.Tensor) -> torch.Tensor:
    """round(log2 a) for a > 0 (int64): the exponent e with 2^(e-1/2) <= a < 2^(e+1/2)."""
    m, ex = torch.frexp(a)  # a = m 2^ex, m in [0.5, 1)
    return ex.long() - 1 + (m >= _SQRT_HALF).long()


def _chunk_codes(v: torch.Tensor, dtype: torch.dtype, block_size: int):
    """Codes (uint8), block bases (int64) and the exception mask of a block-aligned chunk."""
    a = v.abs()
    nz = torch.isfinite(v) & (a > 0)
    e1 = _round_log2(torch.where(nz, a, 1.0))
    r = a - torch.ldexp(torch.ones_like(a), e1)  # exact: within a factor 2 of a
    rabs = r.abs()
    e2 = _round_log2(torch.where(rabs > 0, rabs, 1.0))
    d = e1 - e2
    second = (rabs > 0) & (d <= MAX_GAP)
    t = torch.where(d == 1, 1, 2 + 2 * (d - 2) + (r < 0).long())
    t = torch.where(second, t, 0)
    value = _value(e1, t, torch.ones_like(a))
    with torch.no_grad():
        overflow = nz & ~torch.isfinite(value.to(dtype))
    exc = ~torch.isfinite(v) | overflow
    coded = nz & ~overflow
    nblocks = -(-v.numel() // block_size)
    pad = nblocks * block_size - v.numel()
    lowest = torch.iinfo(torch.int64).min
    emax = torch.nn.functional.pad(torch.where(coded, e1, lowest), (0, pad), value=lowest)
    emax = emax.view(nblocks, block_size).amax(dim=1)
    base = torch.where(emax == lowest, 0, emax - WINDOW)
    e_off = e1 - base.repeat_interleave(block_size)[: v.numel()]
    keep = coded & (e_off >= 1)
    code = torch.where(keep, (e_off.clamp(0, WINDOW) << 3) | t, 0)
    code |= (torch.signbit(v) & ~exc).long() << 7
    return code.to(torch.uint8), base, exc


def _value(e1: torch.Tensor, t: torch.Tensor, one: torch.Tensor) -> torch.Tensor:
    """|value| in float64 of first exponents e1 and tail codes t (t = 0: one term)."""
    d = torch.where(t == 1, 1, 2 + (t - 2) // 2)
    s2 = torch.where((t >= 2) & ((t & 1) == 1), -1.0, 1.0)
    first = torch.ldexp(one, e1)
    return torch.where(t == 0, first, first + s2 * torch.ldexp(one, e1 - d))


def _chunk_values(code: torch.Tensor, base: torch.Tensor, block_size: int) -> torch.Tensor:
    """float64 values of the codes of a block-aligned chunk with its blocks' bases."""
    c = code.long()
    e = (c >> 3) & 15
    t = c & 7
    e1 = base.repeat_interleave(block_size)[: c.numel()] + e
    mag = torch.where(e == 0, 0.0, _value(e1, t, torch.ones(c.shape, dtype=torch.float64)))
    return torch.where((c >> 7) == 1, -mag, mag)


def _flat_float64_chunks(x: torch.Tensor, block_size: int):
    flat = x.detach().reshape(-1)
    step = max(block_size, CHUNK - CHUNK % block_size)
    for lo in range(0, flat.numel(), step):
        yield lo, flat[lo: lo + step].to("cpu", torch.float64)


def _check_tensor(x: Any) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"RF8 takes a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"RF8 supports float32/float16/bfloat16/float64, not {x.dtype}")
    if x.dim() > MAX_NDIM:
        raise ValueError(f"at most {MAX_NDIM} dimensions")


def quantize(x: torch.Tensor, *, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """``x`` rounded to RF8: bit for bit what ``decode(encode(x, block_size=...))`` gives
    (same dtype, shape and device), computed without the bytes."""
    _check_tensor(x)
    block_size = _check_block_size(block_size)
    out = torch.empty(x.shape, dtype=x.dtype)
    flat = out.view(-1)
    for lo, v in _flat_float64_chunks(x, block_size):
        code, base, exc = _chunk_codes(v, x.dtype, block_size)
        value = _chunk_values(code, base, block_size)
        flat[lo: lo + v.numel()] = torch.where(exc, v, value).to(x.dtype)
        if exc.any():  # exceptions keep their exact bits (NaN payloads too)
            src = x.detach().reshape(-1)[lo: lo + v.numel()].cpu()
            flat[lo: lo + v.numel()][exc] = src[exc]
    return out.to(x.device)


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
    codes = torch.empty(numel, dtype=torch.uint8)
    bases, exc_pos = [], []
    for lo, v in _flat_float64_chunks(x, block_size):
        code, base, exc = _chunk_codes(v, x.dtype, block_size)
        codes[lo: lo + v.numel()] = code
        bases.append(base)
        exc_pos.append(torch.nonzero(exc).reshape(-1) + lo)
    base = torch.cat(bases) if bases else torch.zeros(0, dtype=torch.int64)
    pos = torch.cat(exc_pos) if exc_pos else torch.zeros(0, dtype=torch.int64)
    if base.numel() and not (-32768 <= int(base.min()) and int(base.max()) <= 32767):
        raise AssertionError("an exponent base outside int16")  # float64 bounds it to +-1100
    src = x.detach().reshape(-1)
    raw = (src[pos.to(src.device)].cpu() if pos.numel() else
           torch.zeros(0, dtype=x.dtype)).view(_RAW_INT[x.dtype])
    itemsize = x.element_size()
    parts = [
        _FIXED.pack(MAGIC, VERSION, DTYPE_CODES[x.dtype], x.dim(), 0, block_size, pos.numel()),
        struct.pack(f"<{x.dim()}Q", *x.shape),
        base.to(torch.int16).numpy().astype("<i2").tobytes(),
    ]
    body = b"".join(parts)
    tail = pos.numpy().astype("<u8").tobytes() + raw.numpy().astype(
        raw.numpy().dtype.newbyteorder("<")).tobytes()
    size = encoded_bytes(numel, x.dim(), block_size, pos.numel(), itemsize)
    out = torch.empty(size, dtype=torch.uint8)
    o = out.numpy()
    o[: len(body)] = np.frombuffer(body, np.uint8)
    o[len(body): len(body) + numel] = codes.numpy()
    o[len(body) + numel: size - _CRC.size] = np.frombuffer(tail, np.uint8)
    _CRC.pack_into(o, size - _CRC.size, zlib.crc32(o[: size - _CRC.size]))
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
    if zlib.crc32(b[: n - _CRC.size]) != crc:
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

    result = torch.empty(numel, dtype=dtype)
    step = max(block_size, CHUNK - CHUNK % block_size)
    for lo in range(0, numel, step):
        c = codes[lo: lo + step]
        cl = c.long()
        if bool(((((cl >> 3) & 15) == 0) & ((cl & 7) != 0)).any()):
            raise FrameError("a zero code (E = 0) with a nonzero tail code")
        blocks = base[lo // block_size: lo // block_size + -(-c.numel() // block_size)]
        v = _chunk_values(c, blocks, block_size).to(dtype)
        if not bool(torch.isfinite(v).all()):
            raise FrameError("a code outside the dtype's finite range (its block base is "
                             "out of range)")
        result[lo: lo + c.numel()] = v
    if n_exc:
        result[pos] = raw.view(dtype)  # the exact bits sent
    result = result.view(shape)
    if out is not None:
        out.copy_(result.view(out.shape))
        return out
    return result
