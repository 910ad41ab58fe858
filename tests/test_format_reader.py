"""An independent ggcomm frame reader, written from docs/FORMAT.md alone.

The reader below uses nothing from ggcomm: it parses the header, tables and payload with
``struct`` and ``zlib``, decodes every Exp-Golomb and Golomb-Rice codeword bit by bit and
every rANS block state by state, and reconstructs the values as the spec describes. It
reads frame versions 1 to 3 (the spec's version 2 adds block modes 2 and 3, which a
version 1 frame must not use; version 3 adds block mode 4, rANS, which a version 1 or 2
frame must not use). ggcomm is used only to produce frames and as a comparison.
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import ggcomm

# --------------------------------------------------------------------------------------
# The reader (spec: docs/FORMAT.md)
# --------------------------------------------------------------------------------------

HEADER = struct.Struct("<4sBBBBIIQIIQQ")
assert HEADER.size == 48

MAGIC = b"GGEG"
VERSION = 3  # what ggcomm writes
# the versions a reader accepts, and the block modes each allows
MODES_BY_VERSION = {1: (0, 1), 2: (0, 1, 2, 3), 3: (0, 1, 2, 3, 4)}
ZERO_RUN_MODES = (1, 3)  # runs of zeros, with EG (mode 1) or mode-2 (mode 3) value codewords
GR_ESCAPE_ZEROS = 16  # modes 2, 3: q < 16 is a Golomb-Rice codeword, 16 zeros an escape
MAX_SYMBOL = 2**31 - 2
MAX_Q = 2**30 - 1
MAX_BLOCK_SIZE = 2**22
# mode 4 (rANS): k = n - 1 with the alphabet size n in 1..64; 12-bit frequencies out of
# 4096; four interleaved states in 2^16 .. 2^32 - 1, renormalised by 16-bit words
RANS_MODE = 4
RANS_MAX_K = 63
RANS_FREQ_BITS = 12
RANS_M = 1 << RANS_FREQ_BITS
RANS_L = 1 << 16
RANS_STATES = 4
RANS_STATE_BYTES = 4 * RANS_STATES

# dtype code -> (torch dtype, itemsize, integer torch dtype of the same size)
DTYPES = {
    1: (torch.float32, 4, torch.int32),
    2: (torch.float16, 2, torch.int16),
    3: (torch.bfloat16, 2, torch.int16),
    4: (torch.float64, 8, torch.int64),
}
DTYPE_CODE = {v[0]: code for code, v in DTYPES.items()}
INT_VIEW = {v[0]: v[2] for v in DTYPES.values()}


@dataclass
class Block:
    mode: int
    k: int
    k_run: int
    reserved: int
    bit_length: int
    offset: int = 0  # payload byte offset
    symbols: list[int] = field(default_factory=list)
    freqs: list[int] = field(default_factory=list)  # mode 4: f[0] .. f[n-1]


@dataclass
class ParsedFrame:
    version: int
    dtype_code: int
    flags: int
    tag: int
    block_size: int
    numel: int
    shape: tuple[int, ...]
    segments: list[tuple[int, float]]
    blocks: list[Block]
    exc_positions: list[int]
    exc_raw: bytes
    payload: bytes
    symbols: list[int]  # u for every element
    crc: int


class BitReader:
    """MSB-first reader over exactly ``nbits`` bits of ``data``."""

    def __init__(self, data: bytes, nbits: int) -> None:
        self.bits = format(int.from_bytes(data, "big"), f"0{8 * len(data)}b") if data else ""
        assert len(self.bits) == 8 * len(data)
        self.n = nbits
        self.pos = 0

    def eg(self, k: int) -> int:
        """One order-k Exp-Golomb codeword."""
        one = self.bits.find("1", self.pos, self.n)
        if one < 0:
            raise ValueError("codeword overruns the block's bit length")
        z = one - self.pos
        if z > 31 - k:
            raise ValueError(f"EG prefix of {z} zeros is too long for k={k}")
        end = one + z + k + 1
        if end > self.n:
            raise ValueError("codeword overruns the block's bit length")
        c = int(self.bits[one:end], 2)
        self.pos = end
        return c - (1 << k)

    def gr(self, k: int) -> int:
        """One mode-2 codeword (also mode 3's value codewords): Golomb-Rice of parameter k,
        or 16 zeros and an EG-k escape."""
        one = self.bits.find("1", self.pos, self.n)
        if one < 0:
            raise ValueError("codeword overruns the block's bit length")
        z = one - self.pos
        if z < GR_ESCAPE_ZEROS:
            end = one + 1 + k
            if end > self.n:
                raise ValueError("codeword overruns the block's bit length")
            r = int(self.bits[one + 1 : end], 2) if k else 0
            self.pos = end
            return (z << k) + r
        # an escape: skip the first 16 zeros, then an order-k EG codeword whose own prefix
        # (z - 16 zeros) eg() bounds by 31 - k
        self.pos += GR_ESCAPE_ZEROS
        u = self.eg(k)
        if u < GR_ESCAPE_ZEROS << k:
            # that value has a Golomb-Rice codeword: the escape is not canonical
            raise ValueError(f"escape holds {u}, below 16 * 2^{k}")
        return u

    def padding_is_zero(self) -> bool:
        return "1" not in self.bits[self.n :]


def rans_table_bytes(n: int) -> int:
    """TB = ceil(12 (n - 1) / 8): mode 4's frequency table and its padding, in bytes."""
    return -(-RANS_FREQ_BITS * (n - 1) // 8)


def rans_words(k: int, bit_length: int) -> tuple[int, int]:
    """(TB, 2 * the word count) of a mode-4 block: its bytes after the table and states."""
    tb = rans_table_bytes(k + 1)
    return tb, bit_length // 8 - tb - RANS_STATE_BYTES


def decode_rans_block(blk: Block, data: bytes, count: int) -> list[int]:
    """Mode 4: the table, four little-endian u32 states, little-endian u16 words, then the
    spec's decoding loop and its end checks."""
    if blk.bit_length % 8:
        raise ValueError(f"mode-4 bit_length {blk.bit_length} not a multiple of 8")
    n = blk.k + 1
    tb, word_bytes = rans_words(blk.k, blk.bit_length)
    if word_bytes < 0 or word_bytes % 2:
        raise ValueError(f"mode-4 block: {word_bytes} bytes after the table and states is not "
                         "a whole number of words")
    assert len(data) == blk.bit_length // 8
    # the table: n - 1 frequencies of 12 bits, MSB first, then zero bits to a byte boundary
    table = int.from_bytes(data[:tb], "big")
    pad = 8 * tb - RANS_FREQ_BITS * (n - 1)
    if table & ((1 << pad) - 1):
        raise ValueError("nonzero table padding in a mode-4 block")
    table >>= pad
    freqs = [(table >> (RANS_FREQ_BITS * (n - 2 - s))) & (RANS_M - 1) for s in range(n - 1)]
    if sum(freqs) > RANS_M - 1:
        raise ValueError(f"mode-4 stored frequencies add up to {sum(freqs)}, above 4095")
    freqs.append(RANS_M - sum(freqs))
    cum = [0]
    for f in freqs:
        cum.append(cum[-1] + f)
    slot_symbol = [s for s, f in enumerate(freqs) for _ in range(f)]
    assert len(slot_symbol) == RANS_M
    x = list(struct.unpack_from(f"<{RANS_STATES}I", data, tb))
    if min(x) < RANS_L:
        raise ValueError(f"mode-4 state {min(x)} below 2^16")
    words = struct.unpack_from(f"<{word_bytes // 2}H", data, tb + RANS_STATE_BYTES)
    w = 0
    out = []
    for j in range(count):
        i = j % RANS_STATES
        slot = x[i] % RANS_M
        s = slot_symbol[slot]
        x[i] = freqs[s] * (x[i] // RANS_M) + slot - cum[s]
        if x[i] < RANS_L:
            if w == len(words):
                raise ValueError("mode-4 block needs a word past its last one")
            x[i] = x[i] * RANS_L + words[w]
            w += 1
        assert RANS_L <= x[i] < 2**32
        out.append(s)
    if x != [RANS_L] * RANS_STATES or w != len(words):
        raise ValueError(f"mode-4 block does not end with every state at 2^16 and every word "
                         f"read (states {x}, {len(words) - w} words unread)")
    blk.freqs = freqs
    return out


def decode_block(blk: Block, data: bytes, count: int) -> list[int]:
    if blk.mode == RANS_MODE:
        return decode_rans_block(blk, data, count)
    br = BitReader(data, blk.bit_length)
    out: list[int] = []
    if blk.mode == 0:
        for _ in range(count):
            u = br.eg(blk.k)
            if u > MAX_SYMBOL:
                raise ValueError(f"symbol {u} out of range")
            out.append(u)
    elif blk.mode in ZERO_RUN_MODES:
        # mode 3 is mode 1 with each value codeword a mode-2 one (its escape rule included)
        value = br.eg if blk.mode == 1 else br.gr
        i = 0
        while i < count:
            r = br.eg(blk.k_run)
            if r > count - i:
                raise ValueError(f"run {r} overruns the block ({count - i} left)")
            out.extend([0] * r)
            i += r
            if i == count:
                break
            v = value(blk.k)
            if v + 1 > MAX_SYMBOL:
                raise ValueError(f"symbol {v + 1} out of range")
            out.append(v + 1)
            i += 1
    elif blk.mode == 2:
        for _ in range(count):
            # the Golomb-Rice branch reaches 16 * 2^k - 1, above 2^31 - 2 when k >= 27
            u = br.gr(blk.k)
            if u > MAX_SYMBOL:
                raise ValueError(f"symbol {u} out of range")
            out.append(u)
    else:
        raise ValueError(f"unknown block mode {blk.mode}")
    if br.pos != blk.bit_length:
        raise ValueError("block leaves bits unread")
    if not br.padding_is_zero():
        raise ValueError("nonzero padding")
    assert len(out) == count
    return out


def eg_len(v: int, k: int) -> int:
    """len(EG_k(v)) = 2 floor(log2(v + 2^k)) + 1 - k."""
    return 2 * (v + (1 << k)).bit_length() - 1 - k


def min_block_bits(mode: int, k: int, k_run: int, count: int) -> int:
    """The fewest bits a block of ``count`` elements can take (FORMAT.md, "Blocks")."""
    if mode in (0, 2):
        return count * (k + 1)  # every codeword of either mode has at least k + 1 bits
    if mode == RANS_MODE:
        return 8 * (rans_table_bytes(k + 1) + RANS_STATE_BYTES)  # the table and the states
    # modes 1 and 3: one run of all the zeros, or a run and the symbol 1 (k + 1 bits in
    # EG-k and in mode 2's code alike)
    return min(eg_len(count, k_run), eg_len(count - 1, k_run) + k + 1)


def u_to_q(u: int) -> int:
    return (u + 1) // 2 if u & 1 else -(u // 2)


def q_to_u(q: int) -> int:
    return 2 * q - 1 if q > 0 else -2 * q


def parse_frame(data: bytes) -> ParsedFrame:
    data = bytes(data)
    if len(data) < HEADER.size + 4:
        raise ValueError("frame too short")
    (magic, version, dtype_code, ndim, flags, tag, block_size, numel, n_seg, n_blocks,
     n_exc, payload_len) = HEADER.unpack_from(data, 0)  # fmt: skip
    if magic != MAGIC:
        raise ValueError(f"bad magic {magic!r}")
    if version not in MODES_BY_VERSION:
        raise ValueError(f"unknown version {version}")
    if dtype_code not in DTYPES:
        raise ValueError(f"unknown dtype {dtype_code}")
    if ndim > 64:
        raise ValueError(f"ndim {ndim} > 64")
    if flags != 0:
        raise ValueError(f"unknown flags {flags}")
    if not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"block_size {block_size} out of range")
    if n_seg < 1:
        raise ValueError("no segments")
    if n_exc > numel:
        raise ValueError("more exceptions than elements")
    itemsize = DTYPES[dtype_code][1]
    expected_len = (HEADER.size + 8 * ndim + 16 * n_seg + 8 * n_blocks + 8 * n_exc
                    + itemsize * n_exc + payload_len + 4)  # fmt: skip
    if len(data) != expected_len:
        raise ValueError(f"frame length {len(data)} != {expected_len} from the header")
    (crc,) = struct.unpack_from("<I", data, len(data) - 4)
    if zlib.crc32(data[:-4]) != crc:
        raise ValueError("checksum mismatch")

    off = HEADER.size
    shape = struct.unpack_from(f"<{ndim}Q", data, off)
    off += 8 * ndim
    if math.prod(shape) != numel:
        raise ValueError("shape disagrees with numel")

    segments = []
    for _ in range(n_seg):
        length, step = struct.unpack_from("<Qd", data, off)
        off += 16
        if not (math.isfinite(step) and step > 0 and math.isfinite(1.0 / step)):
            raise ValueError(f"bad step {step!r}")
        segments.append((length, step))
    if sum(s[0] for s in segments) != numel:
        raise ValueError("segments disagree with numel")

    blocks = []
    pos = 0
    for _ in range(n_blocks):
        mode, k, k_run, reserved, bit_length = struct.unpack_from("<BBBBI", data, off)
        off += 8
        if reserved != 0:
            raise ValueError("nonzero reserved byte in the block table")
        if mode not in MODES_BY_VERSION[version]:
            raise ValueError(f"block mode {mode} is not valid in a version {version} frame")
        if mode == RANS_MODE:
            if k > RANS_MAX_K:
                raise ValueError(f"mode-4 k {k} above 63 (an alphabet above 64)")
        elif k > 30 or k_run > 30:
            raise ValueError("EG order above 30")
        if mode in (0, 2, RANS_MODE) and k_run != 0:
            raise ValueError(f"mode-{mode} block with nonzero k_run")
        if mode == RANS_MODE:
            if bit_length % 8:
                raise ValueError(f"mode-4 bit_length {bit_length} not a multiple of 8")
            _, word_bytes = rans_words(k, bit_length)
            if word_bytes % 2:  # (a negative count is below the fewest bits, checked below)
                raise ValueError(f"mode-4 block: {word_bytes} bytes after the table and "
                                 "states is not a whole number of words")
        blocks.append(Block(mode, k, k_run, reserved, bit_length, offset=pos))
        pos += -(-bit_length // 8)
    if pos != payload_len:
        raise ValueError("block lengths disagree with payload_len")

    exc_positions = list(struct.unpack_from(f"<{n_exc}Q", data, off))
    off += 8 * n_exc
    for a, b in zip(exc_positions, exc_positions[1:], strict=False):
        if b <= a:
            raise ValueError("exception positions not strictly increasing")
    if exc_positions and exc_positions[-1] >= numel:
        raise ValueError("exception position out of range")
    exc_raw = data[off : off + itemsize * n_exc]
    off += itemsize * n_exc
    payload = data[off : off + payload_len]
    off += payload_len
    assert off == len(data) - 4

    # each segment, in order, is cut into blocks of block_size; blocks never span segments
    counts = [min(block_size, seg_len - i) for seg_len, _ in segments
              for i in range(0, seg_len, block_size)]
    if len(counts) != n_blocks:
        raise ValueError("n_blocks disagrees with the segments and block_size")
    for blk, count in zip(blocks, counts, strict=True):
        # decoding would find these too (as an overrun); the spec lists the rule on its own
        if blk.bit_length < min_block_bits(blk.mode, blk.k, blk.k_run, count):
            raise ValueError(f"bit_length {blk.bit_length} below the fewest bits of the block")
    symbols: list[int] = []
    for blk, count in zip(blocks, counts, strict=True):
        nbytes = -(-blk.bit_length // 8)
        blk.symbols = decode_block(blk, payload[blk.offset : blk.offset + nbytes], count)
        symbols.extend(blk.symbols)
    assert len(symbols) == numel
    for p in exc_positions:
        if symbols[p] != 0:
            raise ValueError("nonzero code at an exception position")

    return ParsedFrame(version, dtype_code, flags, tag, block_size, numel, tuple(shape),
                       segments, blocks, exc_positions, exc_raw, payload, symbols, crc)  # fmt: skip


def reconstruct(pf: ParsedFrame) -> torch.Tensor:
    dtype, itemsize, int_dtype = DTYPES[pf.dtype_code]
    q = np.array([u_to_q(u) for u in pf.symbols], dtype=np.float64)  # |q| < 2^30: exact
    steps = np.concatenate([np.full(n, s, dtype=np.float64) for n, s in pf.segments])
    prod = q * steps  # binary64 multiply
    if dtype == torch.float64:
        out = torch.from_numpy(prod.copy())
    else:
        out = torch.from_numpy(prod.astype(np.float32)).to(dtype)  # RNE twice
    if pf.exc_positions:
        np_int = {2: "<i2", 4: "<i4", 8: "<i8"}[itemsize]
        raw = torch.from_numpy(np.frombuffer(pf.exc_raw, dtype=np_int).copy())
        out.view(int_dtype)[torch.tensor(pf.exc_positions, dtype=torch.int64)] = raw
    return out.reshape(pf.shape)


def read_frame(data: bytes) -> torch.Tensor:
    """Decode a ggcomm frame from its bytes, following docs/FORMAT.md only."""
    return reconstruct(parse_frame(data))


# --------------------------------------------------------------------------------------
# Spec-side helpers: expected values and canonical codewords
# --------------------------------------------------------------------------------------


def eg_bits(v: int, k: int) -> str:
    c = v + (1 << k)
    nb = c.bit_length()
    return "0" * (nb - 1 - k) + format(c, "b")


def bits_to_bytes(bits: str) -> bytes:
    if not bits:
        return b""
    bits += "0" * (-len(bits) % 8)
    return int(bits, 2).to_bytes(len(bits) // 8, "big")


def gr_bits(u: int, k: int) -> str:
    """Mode 2's codeword of u: Golomb-Rice below 16 * 2^k, else 16 zeros and EG-k of u."""
    q = u >> k
    if q < GR_ESCAPE_ZEROS:
        return "0" * q + "1" + (format(u & ((1 << k) - 1), f"0{k}b") if k else "")
    return "0" * GR_ESCAPE_ZEROS + eg_bits(u, k)


def bytes_to_bits(data: bytes) -> str:
    return format(int.from_bytes(data, "big"), f"0{8 * len(data)}b") if data else ""


def rans_block(symbols: list[int], freqs: list[int]) -> bytes:
    """A mode-4 block's bytes, by the spec's encoder steps: the four states start at 2^16;
    for j = count - 1 down to 0 (state i = j mod 4, s = u_j) emit the word x mod 2^16 and
    divide x by 2^16 when x >= 2^20 f[s], then x = floor(x / f[s]) 4096 + (x mod f[s]) +
    cum[s]. The block is the table (f[0] .. f[n-2], 12 bits MSB first, zero padding to a
    byte), the final states (u32, little-endian), then the words in the reverse order of
    their emission (u16, little-endian)."""
    n = len(freqs)
    assert 1 <= n <= RANS_MAX_K + 1 and sum(freqs) == RANS_M and freqs[-1] >= 1
    cum = [sum(freqs[:s]) for s in range(n)]
    x = [RANS_L] * RANS_STATES
    words = []
    for j in range(len(symbols) - 1, -1, -1):
        i, s = j % RANS_STATES, symbols[j]
        f = freqs[s]
        assert f > 0, f"symbol {s} has frequency 0"
        if x[i] >= 2**20 * f:
            words.append(x[i] % 2**16)
            x[i] //= 2**16
        x[i] = x[i] // f * RANS_M + x[i] % f + cum[s]
        assert RANS_L <= x[i] < 2**32
    table = bits_to_bytes("".join(format(f, "012b") for f in freqs[:-1]))
    assert len(table) == rans_table_bytes(n)
    return (table + struct.pack(f"<{RANS_STATES}I", *x)
            + struct.pack(f"<{len(words)}H", *reversed(words)))


# L[f] = floor(65536 log2(4096 / f) + 1/2) in binary64, f = 1 .. 4096 (entry 0 unused):
# the encoder's estimate of a symbol's cost at frequency f, in 1/65536 bits
RANS_COST = np.zeros(RANS_M + 1, dtype=np.int64)
RANS_COST[1:] = np.floor(65536 * np.log2(RANS_M / np.arange(1, RANS_M + 1, dtype=np.float64))
                         + 0.5).astype(np.int64)


def rans_freqs(symbols: list[int]) -> list[int]:
    """ggcomm's table for a block (FORMAT.md, "Choices"): n = max(u) + 1, f[s] = max(1,
    floor(4096 c[s] / count)) for the symbols that occur (else 0), then 4096 - sum(f) added
    to the largest f[s] (the smallest such s on ties)."""
    us = np.asarray(symbols, dtype=np.int64)
    c = np.bincount(us, minlength=int(us.max()) + 1)
    f = np.where(c > 0, np.maximum(1, RANS_M * c // len(us)), 0)
    f[int(np.argmax(f))] += RANS_M - int(f.sum())  # argmax: the first of the largest
    assert f.min(initial=RANS_M) >= 0 and all(f[c > 0] >= 1) and f.sum() == RANS_M
    return f.tolist()


def rans_estimate(symbols: list[int], freqs: list[int]) -> int:
    """E = sum_s c[s] L[f[s]] + 65536 * 8 (TB + 16), in 1/65536 bits."""
    c = np.bincount(np.asarray(symbols, dtype=np.int64), minlength=len(freqs))
    tb = rans_table_bytes(len(freqs))
    return int((c * RANS_COST[np.asarray(freqs)]).sum()) + 65536 * 8 * (tb + RANS_STATE_BYTES)


def block_bits(mode: int, k: int, k_run: int, symbols: list[int],
               freqs: list[int] | None = None) -> str:
    """The codewords the spec says an encoder emits for a block (mode 4: for the table
    ``freqs``, with k = len(freqs) - 1)."""
    if mode == RANS_MODE:
        assert freqs is not None and k == len(freqs) - 1 and k_run == 0
        return bytes_to_bits(rans_block(symbols, freqs))
    if mode == 0:
        return "".join(eg_bits(u, k) for u in symbols)
    if mode == 2:
        return "".join(gr_bits(u, k) for u in symbols)
    assert mode in ZERO_RUN_MODES
    value_bits = eg_bits if mode == 1 else gr_bits  # mode 3: v = u - 1 in mode 2's code
    out = []
    run = 0
    for u in symbols:
        if u == 0:
            run += 1
        else:
            out.append(eg_bits(run, k_run) + value_bits(u - 1, k))
            run = 0
    if run or not symbols:
        out.append(eg_bits(run, k_run))
    return "".join(out)


def expected_from_input(x: torch.Tensor, steps: list[float], seg_lens: list[int]):
    """(values, exception mask, q) straight from the spec's quantization rule."""
    xf = x.detach().reshape(-1).to(torch.float64).numpy()
    pairs = zip(seg_lens, steps, strict=True)
    st = np.concatenate([np.full(n, s, dtype=np.float64) for n, s in pairs])
    inv = 1.0 / st
    with np.errstate(over="ignore", invalid="ignore"):
        p = xf * inv
        exc = ~np.isfinite(xf) | (np.abs(p) > MAX_Q)
    # rint: ties to even; + 0.0 because q is an integer (no -0): float64(0) is +0.0
    q = np.where(exc, 0.0, np.rint(np.where(exc, 0.0, p))) + 0.0
    prod = q * st
    if x.dtype == torch.float64:
        vals = torch.from_numpy(prod.copy())
    else:
        vals = torch.from_numpy(prod.astype(np.float32)).to(x.dtype)
    vi = vals.view(INT_VIEW[x.dtype])
    xi = x.detach().reshape(-1).contiguous().view(INT_VIEW[x.dtype])
    m = torch.from_numpy(exc)
    vi[m] = xi[m]
    return vals.reshape(x.shape), exc, q.astype(np.int64)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    it = INT_VIEW[a.dtype]
    return torch.equal(a.contiguous().view(it), b.contiguous().view(it))


# --------------------------------------------------------------------------------------
# Test data
# --------------------------------------------------------------------------------------


def make_data(kind: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    if kind == "laplace":
        x = x * torch.rand(n, generator=g, dtype=torch.float64).log()
    elif kind == "sparse":
        x = x * (torch.rand(n, generator=g) < 0.1)
    elif kind == "special":
        if n:
            big = {torch.float16: 6e4, torch.bfloat16: 1e30, torch.float32: 1e30}.get(dtype, 1e300)
            specials = torch.tensor([math.nan, math.inf, -math.inf, big, -big, -0.0, 0.0],
                                    dtype=torch.float64)  # fmt: skip
            idx = torch.randint(0, n, (max(1, n // 20),), generator=g)
            x[idx] = specials[torch.randint(0, len(specials), idx.shape, generator=g)]
    elif kind == "ties":
        # multiples of step/2: exercises round half to even (used with step 0.5)
        x = torch.randint(-40, 41, (n,), generator=g).to(torch.float64) * 0.25
    x = x.to(dtype).reshape(shape)
    if kind == "special" and n and dtype != torch.float64:  # 0xFFC3 for bfloat16
        # a NaN with a non-default payload must survive bit for bit
        xi = x.reshape(-1).view(INT_VIEW[dtype])
        xi[0] = {torch.float32: 0x7FC12345, torch.float16: 0x7E01, torch.bfloat16: -61}[dtype]
    if kind == "special" and n and dtype == torch.float64:
        x.reshape(-1).view(torch.int64)[0] = 0x7FF0000000000001  # signalling NaN
    return x


DTYPE_LIST = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

CASES = [
    # (shape, kind, step, kwargs)
    ((), "gauss", 0.01, {}),
    ((0,), "gauss", 0.01, {}),
    ((7,), "gauss", 0.1, {"k": 0, "block_size": 1}),
    ((7,), "special", 1e-3, {"block_size": 7}),
    ((3, 5, 17), "laplace", 0.05, {}),
    ((3, 5, 17), "laplace", 0.003, {"k": 3, "block_size": 64, "zero_runs": False}),
    ((3, 5, 17), "sparse", 0.01, {"block_size": 64, "zero_runs": "auto"}),
    ((3, 5, 17), "sparse", 0.01, {"block_size": 7, "zero_runs": True}),
    ((3, 5, 17), "special", 0.02, {"block_size": 64}),
    ((3, 5, 17), "special", 1e-5, {}),
    ((2000,), "sparse", 0.001, {"block_size": 16384, "zero_runs": True, "k": 2}),
    ((2000,), "special", 0.5, {"block_size": 16384}),
    ((40, 50), "ties", 0.5, {"block_size": 64, "zero_runs": False}),
    ((1500,), "gauss", 1e-4, {"block_size": 7, "zero_runs": True}),
    # about 3 bits per element: light-tailed blocks, coded in mode 2 (Golomb-Rice)
    ((4096,), "gauss", 0.5, {"block_size": 512}),
    ((4096,), "gauss", 0.5, {"block_size": 512, "zero_runs": False}),
    # 90% zeros, Gaussian values of about 10-20 steps: zero runs with Golomb-Rice values
    ((8192,), "sparse", 0.05, {"block_size": 4096}),
    ((8192,), "sparse", 0.05, {"block_size": 4096, "zero_runs": True}),
    ((8192,), "sparse", 0.05, {"block_size": 4096, "k": 3}),
]


def check_frame(x, steps, seg_lens, frame_bytes, *, tag=0, block_size=16384):
    ours = read_frame(frame_bytes)
    theirs = ggcomm.decode(frame_bytes)
    assert bits_equal(ours, theirs), "independent reader disagrees with ggcomm.decode"
    exp, exc, q = expected_from_input(x, steps, seg_lens)
    assert bits_equal(ours, exp), "reader output disagrees with the spec's quantization"

    pf = parse_frame(frame_bytes)
    assert pf.tag == tag
    assert pf.shape == tuple(x.shape)
    assert pf.dtype_code == DTYPE_CODE[x.dtype]
    assert pf.numel == x.numel()
    assert pf.block_size == block_size
    assert len(pf.blocks) == sum(-(-n // block_size) for n in seg_lens)
    assert pf.segments == [(n, float(s)) for n, s in zip(seg_lens, steps, strict=True)]
    assert pf.exc_positions == np.flatnonzero(exc).tolist()
    assert [u_to_q(u) for u in pf.symbols] == q.tolist()
    # the payload is exactly the canonical codewords of the decoded symbols
    for blk in pf.blocks:
        # mode 4: the spec's encoder steps for the block's own table
        bits = block_bits(blk.mode, blk.k, blk.k_run, blk.symbols, blk.freqs)
        assert len(bits) == blk.bit_length
        nbytes = -(-blk.bit_length // 8)
        assert pf.payload[blk.offset : blk.offset + nbytes] == bits_to_bytes(bits)
    return pf


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPE_LIST, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_reader_matches_ggcomm_and_spec(dtype: torch.dtype, case: int) -> None:
    shape, kind, step, kw = CASES[case]
    x = make_data(kind, shape, dtype, seed=case)
    tag = 0x9E3779B9 ^ case
    frame = ggcomm.encode(x, step, tag=tag, **kw)
    data = frame.tobytes()
    assert data == bytes(frame.buffer.numpy())
    pf = check_frame(x, [step], [x.numel()], data, tag=tag,
                     block_size=kw.get("block_size", 16384))  # fmt: skip
    assert pf.version == VERSION
    if isinstance(kw.get("k"), int):
        assert all(b.k == kw["k"] for b in pf.blocks)
        # FORMAT.md: a user-fixed k asks for the EG-k code and turns modes 2, 3 and 4 off
        assert all(b.mode in (0, 1) for b in pf.blocks)
    if kw.get("zero_runs") is True:
        assert all(b.mode in ZERO_RUN_MODES for b in pf.blocks)
    if kw.get("zero_runs") is False:
        # no zero runs; with an auto k the Golomb-Rice mode and rANS are still allowed
        assert all(b.mode in (0, 2, 4) and b.k_run == 0 for b in pf.blocks)


@pytest.mark.parametrize("dtype", DTYPE_LIST, ids=str)
@pytest.mark.parametrize("zero_runs", [True, False, "auto"])
def test_segments_with_different_steps(dtype: torch.dtype, zero_runs) -> None:
    g = torch.Generator().manual_seed(7)
    seg_lens = [100, 0, 333, 1, 250, 316]
    scales = [1e-3, 1.0, 10.0, 0.2, 1e-2, 3.0]
    steps = [1e-5, 0.5, 0.25, 0.01, 1e-4, 0.03]
    pairs = zip(seg_lens, scales, strict=True)
    parts = [torch.randn(n, generator=g, dtype=torch.float64) * s for n, s in pairs]
    x = torch.cat(parts)
    x[torch.rand(x.numel(), generator=g) < 0.5] = 0.0
    x[5] = math.nan
    x[500] = math.inf
    x = x.to(dtype).reshape(10, 100)
    frame = ggcomm.encode(x, steps, segments=seg_lens, block_size=64, zero_runs=zero_runs, tag=3)
    check_frame(x, steps, seg_lens, frame.tobytes(), tag=3, block_size=64)


def test_quantization_threshold_edges() -> None:
    """|x/step| exactly at 2^30 - 1 is coded; anything above travels as an exception."""
    step = 2.0**-10
    qs = [MAX_Q, -MAX_Q, MAX_Q - 0.5, MAX_Q + 0.25, -(MAX_Q + 0.25), MAX_Q + 0.5, 2.0**30]
    x = torch.tensor([q * step for q in qs] + [0.0, 1.5 * step, 2.5 * step], dtype=torch.float64)
    frame = ggcomm.encode(x, step, block_size=4, zero_runs=False)
    pf = check_frame(x, [step], [x.numel()], frame.tobytes(), block_size=4)
    assert pf.exc_positions == [3, 4, 5, 6]
    assert [u_to_q(u) for u in pf.symbols[:3]] == [MAX_Q, -MAX_Q, MAX_Q - 1]
    assert [u_to_q(u) for u in pf.symbols[7:]] == [0, 2, 2]  # ties to even


@pytest.mark.parametrize("zero_runs", ["auto", False])
@pytest.mark.parametrize("n", [3, 4, 64])
def test_mode0_blocks_have_k_run_zero(n: int, zero_runs) -> None:
    """FORMAT.md, modes 0 and 2: "k_run is 0". In an all-zero block the zero-run code can
    tie with mode 0 (3 zeros: 3 bits either way with k_run = 2; 4 zeros: 4 bits with
    k_run = 1), and so does mode 2 (one bit per zero with k = 0); the block is then mode 0
    and its k_run must still be 0."""
    x = torch.zeros(n, dtype=torch.float32)
    if n > 4:
        x[0] = 2.0  # first block not all zero, the others are
    data = ggcomm.encode(x, 1.0, block_size=4, zero_runs=zero_runs).tobytes()
    fields = HEADER.unpack_from(data, 0)
    ndim, n_seg, n_blocks = fields[3], fields[8], fields[9]
    off = HEADER.size + 8 * ndim + 16 * n_seg
    rows = [struct.unpack_from("<BBBBI", data, off + 8 * i) for i in range(n_blocks)]
    bad = [(i, r) for i, r in enumerate(rows) if r[0] in (0, 2) and r[2] != 0]
    assert not bad, f"mode-0/2 blocks (mode, k, k_run, reserved, bit_length) with k_run != 0: {bad}"
    # ties go to mode 0: an all-zero block is never mode 2
    assert all(r[0] != 2 for r in rows[1 if n > 4 else 0 :])
    assert bits_equal(read_frame(data), x)


def test_float32_huge_and_tiny_steps() -> None:
    x = torch.tensor([2.0**30 - 64, 2.0**30, -(2.0**30), 3.0, 1e38, -1e-38], dtype=torch.float32)
    check_frame(x, [1.0], [6], ggcomm.encode(x, 1.0).tobytes())
    y = torch.tensor([1e-300, -3e-300, 1e-290, 0.0], dtype=torch.float64)
    check_frame(y, [1e-300], [4], ggcomm.encode(y, 1e-300).tobytes())


@pytest.mark.parametrize("block_size", [1, 5, 64])
def test_k0_mode0_is_h264_ue(block_size: int) -> None:
    """k = 0, mode 0 codewords are exactly H.264 ue(v) of u = se(v) mapping of q."""
    ue = {0: "1", 1: "010", 2: "011", 3: "00100", 4: "00101", 5: "00110", 6: "00111",
          7: "0001000", 8: "0001001", 14: "0001111", 15: "000010000",
          MAX_SYMBOL: "0" * 30 + "1" * 31}  # fmt: skip
    qs = [0, 1, -1, 2, -2, 3, -3, 4, -4, -7, 8, -MAX_Q, 0, 2, 0]
    us = [q_to_u(q) for q in qs]
    assert us == [0, 1, 2, 3, 4, 5, 6, 7, 8, 14, 15, MAX_SYMBOL, 0, 3, 0]
    step = 0.125
    x = torch.tensor([q * step for q in qs], dtype=torch.float64)
    frame = ggcomm.encode(x, step, k=0, zero_runs=False, block_size=block_size)
    data = frame.tobytes()
    pf = parse_frame(data)
    assert not pf.exc_positions
    payload = b""
    for b in range(0, len(us), block_size):
        bits = "".join(ue[u] for u in us[b : b + block_size])
        blk = pf.blocks[b // block_size]
        assert (blk.mode, blk.k, blk.k_run, blk.reserved) == (0, 0, 0, 0)
        assert blk.bit_length == len(bits)
        payload += bits_to_bytes(bits)
    assert pf.payload == payload
    assert bits_equal(read_frame(data), x)
    assert bits_equal(ggcomm.decode(data), x)


def test_k0_ue_hand_built_bytes() -> None:
    """Spelled out: q = 0, 1, -1, 2 -> ue '1' '010' '011' '00100' -> 0xA6 0x40, 12 bits."""
    x = torch.tensor([0.0, 1.0, -1.0, 2.0], dtype=torch.float32)
    data = ggcomm.encode(x, 1.0, k=0, zero_runs=False).tobytes()
    pf = parse_frame(data)
    assert [(b.mode, b.k, b.bit_length) for b in pf.blocks] == [(0, 0, 12)]
    assert pf.payload == bytes([0b10100110, 0b01000000])


def test_header_fields() -> None:
    x = torch.arange(3 * 4 * 5, dtype=torch.float32).reshape(3, 4, 5) * 0.1
    data = ggcomm.encode(x, [0.5, 0.25], segments=[11, 49], block_size=7, tag=0xDEADBEEF).tobytes()
    fields = HEADER.unpack_from(data, 0)
    assert fields[:5] == (b"GGEG", VERSION, 1, 3, 0)
    assert fields[5] == 0xDEADBEEF  # tag
    assert fields[6] == 7  # block_size
    assert fields[7] == 60  # numel
    assert fields[8] == 2  # n_segments
    assert fields[9] == 9  # n_blocks = ceil(60 / 7)
    assert fields[10] == 0  # n_exceptions
    assert struct.unpack_from("<3Q", data, 48) == (3, 4, 5)
    assert struct.unpack_from("<QdQd", data, 72) == (11, 0.5, 49, 0.25)
    assert struct.unpack_from("<I", data, len(data) - 4)[0] == zlib.crc32(data[:-4])
    for code, dt in [(2, torch.float16), (3, torch.bfloat16), (4, torch.float64)]:
        assert ggcomm.encode(x.to(dt), 0.5).tobytes()[5] == code
    scalar = ggcomm.encode(torch.tensor(2.0), 1.0).tobytes()
    assert scalar[6] == 0 and HEADER.unpack_from(scalar, 0)[7] == 1
    assert read_frame(scalar).shape == ()


def test_flipped_payload_bit_is_rejected() -> None:
    x = make_data("laplace", (500,), torch.float32, seed=11)
    data = ggcomm.encode(x, 0.01, block_size=64).tobytes()
    pf = parse_frame(data)
    start = len(data) - 4 - len(pf.payload)
    for pos in (start, start + len(pf.payload) // 2, len(data) - 5):
        for bit in (0, 5):
            bad = bytearray(data)
            bad[pos] ^= 1 << bit
            with pytest.raises(ValueError, match="checksum"):
                read_frame(bytes(bad))
            with pytest.raises(ggcomm.FrameError):
                ggcomm.decode(bytes(bad))


def _with_crc(buf: bytearray) -> bytes:
    buf[-4:] = struct.pack("<I", zlib.crc32(bytes(buf[:-4])))
    return bytes(buf)


def _tamper_cases():
    """Frames broken in one way each, with a valid checksum (so structure is checked)."""
    x = torch.tensor([0.0, 1.0, 0.0, -2.0, math.nan, 0.0, 3.0, 0.5, 0.0, 0.0], dtype=torch.float32)
    base = ggcomm.encode(x, 0.5, block_size=4, zero_runs=False, k=0).tobytes()
    pf = parse_frame(base)
    assert pf.exc_positions == [4]
    seg_off = 48 + 8
    bt_off = seg_off + 16
    exc_off = bt_off + 8 * len(pf.blocks)
    pay_off = len(base) - 4 - len(pf.payload)

    def patch(off: int, fmt: str, *vals) -> bytes:
        b = bytearray(base)
        struct.pack_into(fmt, b, off, *vals)
        return _with_crc(b)

    # a block whose bit_length is not a multiple of 8, for padding / overrun cases
    pad_blk = next(i for i, b in enumerate(pf.blocks) if b.bit_length % 8)
    pad_byte = pay_off + pf.blocks[pad_blk].offset + pf.blocks[pad_blk].bit_length // 8
    shift = 7 - pf.blocks[pad_blk].bit_length % 8
    cases = {
        "magic": patch(0, "4s", b"GGEH"),
        # 1, 2 and 3 are the known versions (base is ggcomm's own, version 3)
        "version_4": patch(4, "B", 4),
        "version_0": patch(4, "B", 0),
        "version_255": patch(4, "B", 255),
        "dtype": patch(5, "B", 5),
        "flags": patch(7, "B", 1),
        "block_size_0": patch(12, "I", 0),
        "numel": patch(16, "Q", 11),
        "n_blocks": patch(28, "I", 2),
        "shape": patch(48, "Q", 9),
        "segment_len": patch(seg_off, "Q", 9),
        "step_zero": patch(seg_off + 8, "d", 0.0),
        "step_neg": patch(seg_off + 8, "d", -0.5),
        "step_inf": patch(seg_off + 8, "d", math.inf),
        "step_nan": patch(seg_off + 8, "d", math.nan),
        # 0..4 are the modes of a version 3 frame
        "mode_5": patch(bt_off, "B", 5),
        "mode_255": patch(bt_off, "B", 255),
        "k_31": patch(bt_off + 1, "B", 31),
        "reserved": patch(bt_off + 3, "B", 1),
        "bit_length": patch(bt_off + 4, "I", pf.blocks[0].bit_length + 8),
        "exc_pos": patch(exc_off, "Q", 10),
        "padding": patch(pad_byte, "B", base[pad_byte] | (1 << shift)),
        "trailing": _with_crc(bytearray(base) + b"\0\0\0\0"),
        "truncated": _with_crc(bytearray(base[:-5]) + b"\0\0\0\0"),
        "n_exceptions": patch(32, "Q", 0),
    }
    # a subnormal step has an infinite reciprocal
    cases["step_subnormal"] = patch(seg_off + 8, "d", 5e-324)
    # a block that decodes to too few bits: shorten bit_length by one (leaves a codeword cut)
    cases["overrun"] = patch(bt_off + 8 * pad_blk + 4, "I", pf.blocks[pad_blk].bit_length - 1)
    # nonzero code at the exception position: exception moved onto element 3 (q = -2)
    cases["exc_on_nonzero"] = patch(exc_off, "Q", 3)
    # valid variants of base: labelled version 1 or 2 (it uses modes 0 and 1 only), and block 0
    # recoded in mode 2 (k = 0: 15 bits for its 14 of EG-0, still 2 bytes of payload)
    v1 = bytearray(base)
    v1[4] = 1
    m2_bits = block_bits(2, 0, 0, pf.blocks[0].symbols)
    assert -(-len(m2_bits) // 8) == -(-pf.blocks[0].bit_length // 8)
    m2 = bytearray(base)
    struct.pack_into("<BBBBI", m2, bt_off, 2, 0, 0, 0, len(m2_bits))
    m2[pay_off : pay_off + len(bits_to_bytes(m2_bits))] = bits_to_bytes(m2_bits)
    v2 = bytearray(base)
    v2[4] = 2
    valid = {"version_1": _with_crc(v1), "version_2": _with_crc(v2), "block0_mode2": _with_crc(m2)}
    # ... and broken from the mode-2 variant: mode 2 in a version 1 frame, nonzero k_run
    m2_v1 = bytearray(m2)
    m2_v1[4] = 1
    cases["mode2_in_version1"] = _with_crc(m2_v1)
    # block 0 recoded in mode 4 (its own normalised table) and labelled version 2 or 1
    m4_bytes = rans_block(pf.blocks[0].symbols, rans_freqs(pf.blocks[0].symbols))
    n0 = -(-pf.blocks[0].bit_length // 8)  # block 0's bytes, at the payload's start
    m4 = bytearray(base[:pay_off]) + m4_bytes + base[pay_off + n0 :]
    struct.pack_into("<BBBBI", m4, bt_off, 4, max(pf.blocks[0].symbols), 0, 0, 8 * len(m4_bytes))
    struct.pack_into("<Q", m4, 40, len(pf.payload) - n0 + len(m4_bytes))  # payload_len
    valid["block0_mode4"] = _with_crc(m4)
    for version in (1, 2):
        m4_old = bytearray(m4)
        m4_old[4] = version
        cases[f"mode4_in_version{version}"] = _with_crc(m4_old)
    m2_k_run = bytearray(m2)
    m2_k_run[bt_off + 2] = 1
    cases["mode2_k_run"] = _with_crc(m2_k_run)
    return base, cases, valid


def test_tampered_frames_are_rejected_by_both() -> None:
    base, cases, valid = _tamper_cases()
    want = read_frame(base)
    assert bits_equal(ggcomm.decode(base), want)
    for name, data in valid.items():
        assert bits_equal(read_frame(data), want), name
        assert bits_equal(ggcomm.decode(data), want), name
    _rejected_by_both(cases)


@pytest.mark.parametrize("version", [0, 4, 255])
def test_unknown_version_is_named(version: int) -> None:
    """FORMAT.md: 1, 2 and 3 are the known versions; any other is rejected with an error
    that names it."""
    data = bytearray(ggcomm.encode(torch.ones(5), 1.0).tobytes())
    data[4] = version
    data = _with_crc(data)
    with pytest.raises(ValueError, match=f"version {version}"):
        read_frame(data)
    with pytest.raises(ggcomm.FrameError, match=f"version {version}"):
        ggcomm.decode(data)


def hand_frame(
    mode: int,
    k: int,
    k_run: int,
    bits: str,
    numel: int,
    *,
    version: int = VERSION,
    bit_length: int | None = None,
) -> bytes:
    """A frame built byte by byte from the spec: float64, shape (numel,), one segment of
    step 1.0 (so each value is its q), one block of ``numel`` elements coded by ``bits``."""
    payload = bits_to_bytes(bits)
    nbits = len(bits) if bit_length is None else bit_length
    assert -(-nbits // 8) == len(payload)
    head = HEADER.pack(MAGIC, version, 4, 1, 0, 0, numel, numel, 1, 1, 0, len(payload))
    body = (head + struct.pack("<Q", numel) + struct.pack("<Qd", numel, 1.0)
            + struct.pack("<BBBBI", mode, k, k_run, 0, nbits) + payload)  # fmt: skip
    return body + struct.pack("<I", zlib.crc32(body))


def _rejected_by_both(bad: dict[str, bytes]) -> None:
    """Each frame raises ValueError in the reader and FrameError in ggcomm."""
    accepted = []
    for name, data in bad.items():
        with pytest.raises(ValueError):
            read_frame(data)
        try:
            ggcomm.decode(data)
        except ggcomm.FrameError:
            pass
        else:
            accepted.append(name)
    assert not accepted, f"ggcomm.decode accepted frames the spec rejects: {accepted}"


@pytest.mark.parametrize("version", [1, 2, 3])
def test_reader_rejects_out_of_range_codewords(version: int) -> None:
    """Hand-built frames: too-long EG prefix, symbol above 2^31 - 2, run past the block
    (modes 0 and 1, so the same in frames of every version)."""

    def frame(mode: int, k: int, k_run: int, bits: str, numel: int) -> bytes:
        return hand_frame(mode, k, k_run, bits, numel, version=version)

    ok = frame(0, 0, 0, "1" + "010" + "011", 3)
    assert read_frame(ok).tolist() == [0.0, 1.0, -1.0]
    assert ggcomm.decode(ok).tolist() == [0.0, 1.0, -1.0]
    bad = {
        "prefix_32_k0": frame(0, 0, 0, "0" * 32 + "1" + "0" * 32, 1),
        "prefix_30_k2": frame(0, 2, 0, "0" * 30 + "1" + "0" * 32, 1),
        "u_2^31-1": frame(0, 0, 0, eg_bits(2**31 - 1, 0), 1),
        "u_2^32-2": frame(0, 0, 0, eg_bits(2**32 - 2, 0), 1),
        "run_past_end": frame(1, 0, 0, eg_bits(4, 0), 3),
        "mode1_v_too_big": frame(1, 0, 0, eg_bits(0, 0) + eg_bits(2**31 - 2, 0), 1),
        "unread_bits": frame(0, 0, 0, "1" + "1", 1),
    }
    _rejected_by_both(bad)


# Mode-2 codewords spelled out from FORMAT.md, independently of gr_bits: (k, u, bits).
# q = floor(u / 2^k) < 16: q zeros, a one, the k low bits of u; u >= 16 * 2^k: 16 zeros,
# then EG_k(u) (c = u + 2^k: nb - 1 - k zeros and the nb bits of c).
MODE2_CODEWORDS = [
    (0, 0, "1"),
    (0, 1, "01"),
    (0, 15, "0" * 15 + "1"),
    (0, 16, "0" * 16 + "0000" + "10001"),  # first escape: c = 17, nb = 5
    (0, 300, "0" * 16 + "00000000" + "100101101"),  # c = 301, nb = 9
    (0, MAX_SYMBOL, "0" * 16 + "0" * 30 + "1" * 31),  # c = 2^31 - 1, nb = 31
    (1, 3, "01" + "1"),
    (1, 31, "0" * 15 + "1" + "1"),  # q = 15, the last Golomb-Rice codeword
    (1, 32, "0" * 16 + "0000" + "100010"),  # c = 34, nb = 6
    # c = 2^31, nb = 32: the EG prefix is 30 = 31 - k, the longest allowed
    (1, MAX_SYMBOL, "0" * 16 + "0" * 30 + "1" + "0" * 31),
    (3, 0, "1" + "000"),
    (3, 13, "01" + "101"),
    (3, 127, "0" * 15 + "1" + "111"),
    (3, 128, "0" * 16 + "0000" + "10001000"),  # c = 136, nb = 8
    (3, 1000, "0" * 16 + "000000" + "1111110000"),  # c = 1008, nb = 10
    (26, 2**30 - 1, "0" * 15 + "1" + "1" * 26),
    (26, 2**30, "0" * 16 + "0000" + "10001" + "0" * 26),  # c = 2^30 + 2^26, nb = 31
    (30, 5, "1" + "0" * 27 + "101"),
    (30, MAX_SYMBOL, "01" + "1" * 29 + "0"),  # q = 1, r = 2^30 - 2
]
MODE2_KS = sorted({k for k, _, _ in MODE2_CODEWORDS})


def _mode2_block(k: int) -> tuple[list[int], str]:
    """All of MODE2_CODEWORDS' symbols of order k, as one block: (symbols, bits)."""
    rows = [(u, bits) for kk, u, bits in MODE2_CODEWORDS if kk == k]
    return [u for u, _ in rows], "".join(bits for _, bits in rows)


def test_mode2_codewords_spelled_out() -> None:
    """The table above is what the test-side encoder (gr_bits) emits, and the reader reads
    every codeword back, alone and in a stream."""
    for k, u, bits in MODE2_CODEWORDS:
        assert gr_bits(u, k) == bits, (k, u)
        assert len(bits) >= k + 1
        blk = Block(2, k, 0, 0, len(bits))
        assert decode_block(blk, bits_to_bytes(bits), 1) == [u], (k, u)
    for k in MODE2_KS:
        us, bits = _mode2_block(k)
        assert block_bits(2, k, 0, us) == bits
        assert decode_block(Block(2, k, 0, 0, len(bits)), bits_to_bytes(bits), len(us)) == us


@pytest.mark.parametrize("k", MODE2_KS)
def test_reader_decodes_hand_built_mode2_frames(k: int) -> None:
    """Hand-built version 3 frames with one mode-2 block: Golomb-Rice codewords (q < 16)
    and escapes, including u = 16 * 2^k exactly and the largest symbol."""
    us, bits = _mode2_block(k)
    data = hand_frame(2, k, 0, bits, len(us))
    pf = parse_frame(data)
    assert pf.version == VERSION
    assert [(b.mode, b.k, b.k_run, b.bit_length) for b in pf.blocks] == [(2, k, 0, len(bits))]
    assert pf.symbols == us
    want = torch.tensor([float(u_to_q(u)) for u in us], dtype=torch.float64)
    assert bits_equal(read_frame(data), want)


@pytest.mark.parametrize("k", MODE2_KS)
def test_ggcomm_decodes_hand_built_mode2_frames(k: int) -> None:
    """The same frames through ggcomm (its mode 2 and escape decoder)."""
    us, bits = _mode2_block(k)
    data = hand_frame(2, k, 0, bits, len(us))
    want = torch.tensor([float(u_to_q(u)) for u in us], dtype=torch.float64)
    assert bits_equal(ggcomm.codec.decode(data), want)
    assert bits_equal(ggcomm.codec.decode(data), read_frame(data))
    q, pos, _ = ggcomm.codec.decode_symbols(data)
    assert q.tolist() == want.tolist() and pos.numel() == 0


def _bad_mode2_frames() -> dict[str, bytes]:
    """Version 3 frames with one mode-2 block each, invalid in one way each."""
    f = hand_frame
    return {
        # an escape must hold u >= 16 * 2^k: these values have Golomb-Rice codewords
        "escape_u_15_k0": f(2, 0, 0, "0" * 16 + eg_bits(15, 0), 1),
        "escape_u_0_k0": f(2, 0, 0, "0" * 16 + "1", 1),
        "escape_u_0_k3": f(2, 3, 0, "0" * 16 + "1000", 1),
        "escape_u_127_k3": f(2, 3, 0, "0" * 16 + eg_bits(127, 3), 1),
        # k = 27: 16 * 2^k = 2^31 is above every valid symbol, so no escape is valid
        "escape_max_k27": f(2, 27, 0, "0" * 16 + eg_bits(MAX_SYMBOL, 27), 1),
        # the escape's own EG prefix (after the first 16 zeros) above 31 - k
        "escape_prefix_32_k0": f(2, 0, 0, "0" * 16 + "0" * 32 + "1" + "0" * 32, 1),
        "escape_prefix_31_k1": f(2, 1, 0, "0" * 16 + "0" * 31 + "1" + "0" * 32, 1),
        "escape_prefix_28_k4": f(2, 4, 0, "0" * 16 + "0" * 28 + "1" + "0" * 32, 1),
        # symbols above 2^31 - 2, from an escape and from the Golomb-Rice branch
        "escape_u_2^31-1_k0": f(2, 0, 0, "0" * 16 + eg_bits(2**31 - 1, 0), 1),
        "gr_u_2^31-1_k27": f(2, 27, 0, "0" * 15 + "1" + "1" * 27, 1),
        "gr_u_2^31-1_k30": f(2, 30, 0, "01" + "1" * 30, 1),
        # codewords cut by the block's end, bits left over, padding
        "gr_overrun": f(2, 3, 0, "01" + "10", 1),
        "escape_overrun": f(2, 0, 0, "0" * 16 + "0001", 1),
        "zeros_only": f(2, 0, 0, "0" * 20, 1),
        "unread_bits": f(2, 0, 0, "1" + "1", 1),
        "nonzero_padding": f(2, 0, 0, "11", 1, bit_length=1),
        # the block table: k_run must be 0, k at most 30, bit_length >= count * (k + 1)
        "k_run_1": f(2, 0, 1, "1", 1),
        "k_31": f(2, 31, 0, "1" + "0" * 31, 1),
        "below_min_bits": f(2, 3, 0, "1000", 2),
    }


def test_reader_rejects_bad_mode2_blocks() -> None:
    bad = _bad_mode2_frames()
    for data in bad.values():
        with pytest.raises(ValueError):
            read_frame(data)
    # the escape and table rules by their message (not some other check failing first)
    for name in ("escape_u_15_k0", "escape_u_0_k3", "escape_u_127_k3", "escape_max_k27"):
        with pytest.raises(ValueError, match="below 16"):
            read_frame(bad[name])
    for name in ("escape_prefix_32_k0", "escape_prefix_31_k1", "escape_prefix_28_k4"):
        with pytest.raises(ValueError, match="prefix"):
            read_frame(bad[name])
    with pytest.raises(ValueError, match="fewest bits"):
        read_frame(bad["below_min_bits"])
    with pytest.raises(ValueError, match="k_run"):
        read_frame(bad["k_run_1"])


def test_ggcomm_rejects_bad_mode2_blocks() -> None:
    _rejected_by_both(_bad_mode2_frames())


def _mode2_frame_pair() -> tuple[list[int], bytes, bytes]:
    """(symbols, version 1 frame, version 2 frame): the same mode-2 block, k = 3."""
    us, bits = _mode2_block(3)
    return (us, hand_frame(2, 3, 0, bits, len(us), version=1),
            hand_frame(2, 3, 0, bits, len(us), version=2))


def test_reader_mode2_needs_version_2() -> None:
    """FORMAT.md: a mode-2 block in a version 1 frame is invalid; the same bytes labelled
    version 2 (and with their CRC recomputed) are a valid frame."""
    us, v1, v2 = _mode2_frame_pair()
    assert v1[4] == 1 and v2[4] == 2 and v1[5:-4] == v2[5:-4]
    with pytest.raises(ValueError, match="version 1"):
        parse_frame(v1)
    assert parse_frame(v2).symbols == us
    # modes 0 and 1 are read in every version
    for version in (1, 2, 3):
        for mode, bits in ((0, eg_bits(0, 0) + eg_bits(3, 0)), (1, eg_bits(1, 0) + eg_bits(2, 0))):
            assert parse_frame(hand_frame(mode, 0, 0, bits, 2, version=version)).symbols == [0, 3]


def test_ggcomm_mode2_needs_version_2() -> None:
    us, v1, v2 = _mode2_frame_pair()
    with pytest.raises(ggcomm.FrameError, match="version"):
        ggcomm.codec.decode(v1)
    want = torch.tensor([float(u_to_q(u)) for u in us], dtype=torch.float64)
    assert bits_equal(ggcomm.codec.decode(v2), want)
    assert bits_equal(read_frame(v2), want)


@pytest.mark.parametrize("dtype", DTYPE_LIST, ids=str)
@pytest.mark.parametrize("outliers", [False, True])
def test_ggcomm_uses_mode2_for_gaussian_data(dtype: torch.dtype, outliers: bool) -> None:
    """Gaussian data at about 3 bits per element (sigma = 2 steps): with the default auto
    k, mode 2 is smaller than EG-k in every block (see expected_choice), so ggcomm's frame
    has mode-2 blocks; the reader, ggcomm and the spec's quantization agree, and the payload
    is the canonical codewords. With outliers, some of those blocks carry escapes."""
    x = make_data("gauss", (4096,), dtype, seed=21)
    step = 0.5
    if outliers:
        x[::97] = torch.tensor(3000.0, dtype=dtype)  # q = 6000, u = 11999: escapes for k < 10
    data = ggcomm.codec.encode(x, step, block_size=512).tobytes()
    pf = check_frame(x, [step], [x.numel()], data, block_size=512)
    assert pf.version == VERSION
    modes = [b.mode for b in pf.blocks]
    assert 2 in modes, f"no mode-2 block: modes {modes}"
    for blk in pf.blocks:
        assert (blk.mode, blk.k, blk.k_run, blk.bit_length) == expected_choice(blk.symbols)
    if outliers:
        escapes = [u for b in pf.blocks if b.mode == 2 for u in b.symbols
                   if u >= GR_ESCAPE_ZEROS << b.k]  # fmt: skip
        assert escapes, "expected escapes in the mode-2 blocks"


def _eg_lens(us: np.ndarray, k: int) -> np.ndarray:
    """len(EG_k(u)) per element: 2 nb - 1 - k with nb the bit length of u + 2^k."""
    nb = np.floor(np.log2(us.astype(np.float64) + 2.0**k)).astype(np.int64) + 1
    return 2 * nb - 1 - k


def _mode0_bits(us: np.ndarray, k: int) -> int:
    return int(_eg_lens(us, k).sum())


def _mode2_bits(us: np.ndarray, k: int) -> int:
    """Mode 2: q + 1 + k bits while q = floor(u / 2^k) < 16, else 16 + len(EG_k(u))."""
    q = us >> k
    return int(np.where(q < GR_ESCAPE_ZEROS, q + 1 + k, GR_ESCAPE_ZEROS + _eg_lens(us, k)).sum())


def _zero_run_parts(symbols: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(runs, values) that modes 1 and 3 code for a block: the zeros before each nonzero
    symbol and its v = u - 1, then the trailing zeros when there are any (an all-zero block,
    or an empty one, is one run)."""
    runs, vals, run = [], [], 0
    for u in symbols:
        if u == 0:
            run += 1
        else:
            runs.append(run)
            vals.append(u - 1)
            run = 0
    if run or not symbols:
        runs.append(run)
    return np.array(runs, dtype=np.int64), np.array(vals, dtype=np.int64)


def _zero_run_bits(mode: int, k: int, k_run: int, symbols: list[int]) -> int:
    """Mode 1 or 3: EG_krun of each run plus, per value v, EG_k(v) (mode 1) or mode 2's
    codeword of v (mode 3)."""
    runs, vals = _zero_run_parts(symbols)
    value_bits = _mode0_bits if mode == 1 else _mode2_bits
    return _mode0_bits(runs, k_run) + value_bits(vals, k)


def expected_choice(
    symbols: list[int], k_fixed: int | None = None, zero_runs: bool | str = "auto"
) -> tuple[int, int, int, int]:
    """(mode, k, k_run, bit_length) that FORMAT.md's "Choices the format leaves to the
    encoder" gives a block with zero_runs "auto" (or False: no zero runs): the prefix-code
    choice (see prefix_code_choice), then mode 4 when k is left to the encoder, zero runs
    are not forced, every symbol is below 64, 32 E < 31 * 65536 B and 32 R < 31 B (B the
    bits of the prefix-code choice, E the estimate and R the exact bit_length with the
    normalised table). (FORMAT.md says "with k and zero_runs both left to the encoder";
    ggcomm also considers mode 4 with zero_runs=False, as it does mode 2.)"""
    choice = prefix_code_choice(symbols, k_fixed, zero_runs)
    b = choice[3]
    if k_fixed is None and max(symbols) <= RANS_MAX_K:
        freqs = rans_freqs(symbols)
        if 32 * rans_estimate(symbols, freqs) < 31 * 65536 * b:
            r = 8 * len(rans_block(symbols, freqs))
            if 32 * r < 31 * b:
                choice = (RANS_MODE, len(freqs) - 1, 0, r)
    return choice


def choice_mismatches(pf: ParsedFrame, k_fixed: int | None = None) -> list:
    """(block index, (mode, k, k_run, bits) read, documented choice) of every block whose
    mode, orders and length are not what expected_choice gives for its symbols."""
    wrong = []
    for i, blk in enumerate(pf.blocks):
        got = (blk.mode, blk.k, blk.k_run, blk.bit_length)
        want = expected_choice(blk.symbols, k_fixed)
        if got != want:
            wrong.append((i, got, want))
    return wrong


def mode4_tests(symbols: list[int], b: int) -> tuple[bool, int, bool]:
    """(32 E < 31 * 65536 B, R, 32 R < 31 B) for a block of symbols below 64 with the
    normalised table: E the estimate, R the exact mode-4 bit_length, B = ``b``."""
    freqs = rans_freqs(symbols)
    r = 8 * len(rans_block(symbols, freqs))
    return 32 * rans_estimate(symbols, freqs) < 31 * 65536 * b, r, 32 * r < 31 * b


def prefix_code_choice(
    symbols: list[int], k_fixed: int | None = None, zero_runs: bool | str = "auto"
) -> tuple[int, int, int, int]:
    """The choice among modes 0 to 3: the best k of mode 0 and of mode 2, mode 2 when
    strictly smaller than mode 0, then zero runs (unless zero_runs is False) when strictly
    smaller than the better of the two (and at least a third of the symbols are zero), with
    k_run the best order of the runs and the values in mode 3 (Golomb-Rice) when their bits
    at the best k are strictly fewer than their EG bits at the best k (else mode 1); ties to
    mode 0, then mode 2, mode 1 before mode 3, then the smaller k (list.index finds the
    first minimum). A fixed k turns modes 2 and 3 off and is the k of modes 0 and 1."""
    assert zero_runs in ("auto", False)
    us = np.array(symbols, dtype=np.int64)
    ks = range(31) if k_fixed is None else [k_fixed]
    costs0 = {k: _mode0_bits(us, k) for k in ks}
    k0 = min(costs0, key=lambda k: (costs0[k], k))
    choice = (0, k0, 0, costs0[k0])
    if k_fixed is None:
        costs2 = [_mode2_bits(us, k) for k in range(31)]
        k2 = costs2.index(min(costs2))
        if costs2[k2] < choice[3]:
            choice = (2, k2, 0, costs2[k2])
    runs, vals = _zero_run_parts(symbols)
    r_costs = [_mode0_bits(runs, k) for k in range(31)]
    k_run = r_costs.index(min(r_costs))
    v_costs = {k: _mode0_bits(vals, k) for k in ks}
    k_val = min(v_costs, key=lambda k: (v_costs[k], k))
    zr = (1, k_val, k_run, r_costs[k_run] + v_costs[k_val])
    if k_fixed is None:
        gr_costs = [_mode2_bits(vals, k) for k in range(31)]
        k3 = gr_costs.index(min(gr_costs))
        if gr_costs[k3] < v_costs[k_val]:
            zr = (3, k3, k_run, r_costs[k_run] + gr_costs[k3])
    if zero_runs == "auto" and 3 * int((us == 0).sum()) >= len(us) and zr[3] < choice[3]:
        choice = zr
    return choice


def test_mode2_bits_helper_matches_codewords() -> None:
    """The cost helpers agree with the codewords they count."""
    us = np.array([0, 1, 5, 15, 16, 17, 63, 64, 1000, 2**20, MAX_SYMBOL], dtype=np.int64)
    for k in range(31):
        assert _mode0_bits(us, k) == len(block_bits(0, k, 0, us.tolist()))
        assert _mode2_bits(us, k) == len(block_bits(2, k, 0, us.tolist()))
    # modes 1 and 3: runs (leading, between, trailing) and values, escapes included
    blocks = [[0, 0, 3, 1, 0, 40, 0, 0, 0], [5, 0, MAX_SYMBOL], [0] * 7, [1], []]
    for symbols in blocks:
        for mode in ZERO_RUN_MODES:
            for k in (0, 1, 3, 30):
                for k_run in (0, 2):
                    want = len(block_bits(mode, k, k_run, symbols))
                    assert _zero_run_bits(mode, k, k_run, symbols) == want, (symbols, mode, k)


# (kind, step): "gauss" at step 0.5 is about 3 bits per element, a light-tailed body that
# mode 2 codes in fewer bits than EG; "sparse" (90% zeros) at 0.05 and 0.1 has Gaussian
# values of 10-20 steps, which zero runs code with Golomb-Rice values (mode 3)
CHOICE_CASES = [("laplace", 0.01), ("sparse", 0.01), ("sparse", 0.05), ("sparse", 0.1),
                ("gauss", 0.5), ("gauss", 0.05)]  # fmt: skip


@pytest.mark.parametrize("k", ["auto", 2])
@pytest.mark.parametrize("case", CHOICE_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_encoder_choices_documented(case, k) -> None:
    """The spec's description of ggcomm's per-block choices (not needed by readers)."""
    kind, step = case
    x = make_data(kind, (2048,), torch.float32, seed=5)
    pf = parse_frame(ggcomm.encode(x, step, block_size=256, k=k).tobytes())
    wrong = choice_mismatches(pf, None if k == "auto" else k)
    assert not wrong, f"blocks (index, (mode, k, k_run, bits), documented): {wrong}"


# --------------------------------------------------------------------------------------
# Mode 3: zero runs with Golomb-Rice values
# --------------------------------------------------------------------------------------

# Mode-3 blocks spelled out from FORMAT.md, independently of block_bits: (k, k_run,
# symbols, bits). Runs are EG of order k_run (c = r + 2^k_run: nb - 1 - k_run zeros and the
# nb bits of c); each nonzero u is v = u - 1 in mode 2's code of parameter k (q =
# floor(v / 2^k) < 16: q zeros, a one, the k low bits of v; else 16 zeros and EG_k(v)).
# fmt: off
MODE3_BLOCKS = [
    # all zeros: one run, EG_0(4) (c = 5)
    (0, 0, [0, 0, 0, 0], "00101"),
    # one element, the symbol 1: run 0, then v = 0 (k + 1 bits): the fewest bits, 2
    (0, 0, [1], "1" + "1"),
    (
        1, 0, [0, 0, 3, 40, 0, 0, 0],
        "011"  # run 2: c = 3
        + "01" + "0"  # u = 3, v = 2: q = 1, low bit 0
        + "1"  # run 0
        + "0" * 16 + "0000" + "101001"  # u = 40, v = 39: q = 19, an escape; c = 41, nb = 6
        + "00100",  # trailing run 3: c = 4
    ),
    (
        0, 1, [16, 17, 0, 0, 0],
        "10"  # run 0 (k_run = 1: c = 2)
        + "0" * 15 + "1"  # u = 16, v = 15: the last Golomb-Rice codeword of k = 0
        + "10"  # run 0
        + "0" * 16 + "0000" + "10001"  # u = 17, v = 16 = 16 * 2^0: the first escape, c = 17
        + "0101",  # trailing run 3: c = 5
    ),
    (
        2, 2, [0] * 5 + [1, 0, 7, MAX_SYMBOL] + [0] * 10,
        "01001"  # run 5: c = 9, nb = 4
        + "1" + "00"  # u = 1, v = 0
        + "101"  # run 1: c = 5
        + "01" + "10"  # u = 7, v = 6: q = 1, low bits 10
        + "100"  # run 0: c = 4
        # u = 2^31 - 2, v = 2^31 - 3: an escape, c = 2^31 + 1, nb = 32, prefix 29 = 31 - k
        + "0" * 16 + "0" * 29 + "1" + "0" * 30 + "1"
        + "01110",  # trailing run 10: c = 14
    ),
    # k = 30: u = 2^31 - 2 without an escape (v = 2^31 - 3: q = 1, r = 2^30 - 3)
    (30, 0, [MAX_SYMBOL, 0], "1" + "01" + format(2**30 - 3, "030b") + "010"),
]
# fmt: on
MODE3_IDS = [f"k{k}-krun{kr}-n{len(us)}" for k, kr, us, _ in MODE3_BLOCKS]


def _values(symbols: list[int]) -> torch.Tensor:
    """What a hand-built frame (step 1.0, float64) of these symbols decodes to."""
    return torch.tensor([float(u_to_q(u)) for u in symbols], dtype=torch.float64)


def test_mode3_blocks_spelled_out() -> None:
    """The table above is what the test-side encoder emits, its lengths are what the cost
    helper counts, and the reader reads every block back. Blocks with a value above 1
    differ from mode 1's bits (v = 0 is a one and k zero bits in either code)."""
    for k, k_run, us, bits in MODE3_BLOCKS:
        assert block_bits(3, k, k_run, us) == bits, (k, k_run, us)
        assert _zero_run_bits(3, k, k_run, us) == len(bits)
        assert len(bits) >= min_block_bits(3, k, k_run, len(us))
        blk = Block(3, k, k_run, 0, len(bits))
        assert decode_block(blk, bits_to_bytes(bits), len(us)) == us
        assert (block_bits(1, k, k_run, us) == bits) == all(u <= 1 for u in us)
    # the fewest bits of a mode-3 block are mode 1's: [1] with k = k_run = 0 takes 2
    assert min_block_bits(3, 0, 0, 1) == min_block_bits(1, 0, 0, 1) == 2


@pytest.mark.parametrize("row", MODE3_BLOCKS, ids=MODE3_IDS)
def test_reader_and_ggcomm_decode_hand_built_mode3_frames(row) -> None:
    """Hand-built version 3 frames with one mode-3 block: runs (leading, between, trailing,
    all zeros, with k_run 0, 1, 2), Golomb-Rice values and escapes (v = 16 * 2^k exactly and
    the largest symbol)."""
    k, k_run, us, bits = row
    data = hand_frame(3, k, k_run, bits, len(us))
    pf = parse_frame(data)
    assert pf.version == VERSION
    assert [(b.mode, b.k, b.k_run, b.bit_length) for b in pf.blocks] == [(3, k, k_run, len(bits))]
    assert pf.symbols == us
    want = _values(us)
    assert bits_equal(read_frame(data), want)
    assert bits_equal(ggcomm.codec.decode(data), want)
    q, pos, _ = ggcomm.codec.decode_symbols(data)
    assert q.tolist() == want.tolist() and pos.numel() == 0
    info = ggcomm.codec.inspect(data)
    assert [(b.mode, b.k, b.k_run, b.bit_length) for b in info.blocks] == [
        ("zero_runs_rice", k, k_run, len(bits))
    ]


def _bad_mode3_frames() -> dict[str, bytes]:
    """Version 3 frames with one mode-3 block each, invalid in one way each. "1" is the run
    codeword 0 of k_run = 0 (a value follows at once)."""
    f = hand_frame
    esc = "0" * 16  # the start of a mode-2 escape
    return {
        # mode 1's rule: a run past the end of the block, first or after a value
        "run_past_end": f(3, 0, 0, eg_bits(4, 0), 3),
        "run_past_end_after_value": f(3, 0, 0, "1" + "1" + eg_bits(2, 0), 2),
        "run_past_end_k_run_2": f(3, 0, 2, eg_bits(2, 2) + "1" + eg_bits(2, 2), 4),
        # mode 2's rule: an escape must hold v >= 16 * 2^k
        "escape_v_15_k0": f(3, 0, 0, "1" + esc + eg_bits(15, 0), 1),
        "escape_v_0_k0": f(3, 0, 0, "1" + esc + "1", 1),
        "escape_v_0_k3": f(3, 3, 0, "1" + esc + "1000", 1),
        "escape_v_127_k3": f(3, 3, 1, "10" + esc + eg_bits(127, 3), 1),
        # k = 27: 16 * 2^k = 2^31, so an escape's v + 1 is above 2^31 - 2 or it is below 2^31
        "escape_max_k27": f(3, 27, 0, "1" + esc + eg_bits(MAX_SYMBOL - 1, 27), 1),
        # the escape's own EG prefix (after the first 16 zeros) above 31 - k
        "escape_prefix_32_k0": f(3, 0, 0, "1" + esc + "0" * 32 + "1" + "0" * 32, 1),
        "escape_prefix_30_k2": f(3, 2, 0, "1" + esc + "0" * 30 + "1" + "0" * 33, 1),
        # the run codeword's prefix above 31 - k_run
        "run_prefix_32": f(3, 0, 0, "0" * 32 + "1" + "0" * 32, 1),
        # v + 1 above 2^31 - 2, from an escape and from the Golomb-Rice branch
        "escape_v+1_2^31-1_k0": f(3, 0, 0, "1" + esc + eg_bits(MAX_SYMBOL, 0), 1),
        "escape_v+1_2^31_k0": f(3, 0, 0, "1" + esc + eg_bits(2**31 - 1, 0), 1),
        "gr_v+1_2^31_k27": f(3, 27, 0, "1" + "0" * 15 + "1" + "1" * 27, 1),
        "gr_v+1_2^31-1_k30": f(3, 30, 0, "1" + "01" + format(2**30 - 2, "030b"), 1),
        # codewords cut by the block's end, bits left over, padding
        "gr_overrun": f(3, 3, 0, "1" + "01" + "10", 1),
        "escape_overrun": f(3, 0, 0, "1" + esc + "0001", 1),
        "run_overrun": f(3, 0, 0, "00" + "1", 2),
        "zeros_only": f(3, 0, 0, "1" + "0" * 20, 1),
        "unread_bits": f(3, 0, 0, "1" + "1" + "1", 1),
        "nonzero_padding": f(3, 0, 0, "11" + "1", 1, bit_length=2),
        # the block table: k and k_run at most 30, bit_length at least the fewest bits
        "k_31": f(3, 31, 0, "1" + "1" + "0" * 31, 1),
        "k_run_31": f(3, 0, 31, "1" + "0" * 31 + "1", 1),
        "below_min_bits_1": f(3, 0, 0, "1", 1),
        # 100 elements, k = 5: min(len(EG_0(100)), len(EG_0(99)) + 6) = 13
        "below_min_bits_100": f(3, 5, 0, "0" * 6 + "1100101", 100, bit_length=12),
    }


def test_reader_rejects_bad_mode3_blocks() -> None:
    bad = _bad_mode3_frames()
    for data in bad.values():
        with pytest.raises(ValueError):
            read_frame(data)
    # each rule by its message (not some other check failing first)
    by_message = {
        "overruns the block (": ["run_past_end", "run_past_end_after_value",
                                 "run_past_end_k_run_2"],
        "below 16": ["escape_v_15_k0", "escape_v_0_k0", "escape_v_0_k3", "escape_v_127_k3",
                     "escape_max_k27"],
        "prefix": ["escape_prefix_32_k0", "escape_prefix_30_k2", "run_prefix_32"],
        "out of range": ["escape_v+1_2^31-1_k0", "escape_v+1_2^31_k0", "gr_v+1_2^31_k27",
                         "gr_v+1_2^31-1_k30"],
        "bit length": ["gr_overrun", "escape_overrun", "run_overrun", "zeros_only"],
        "unread": ["unread_bits"],
        "padding": ["nonzero_padding"],
        "above 30": ["k_31", "k_run_31"],
        "fewest bits": ["below_min_bits_1", "below_min_bits_100"],
    }  # fmt: skip
    assert sorted(n for names in by_message.values() for n in names) == sorted(bad)
    for message, names in by_message.items():
        for name in names:
            with pytest.raises(ValueError, match=re.escape(message)):
                read_frame(bad[name])


def test_ggcomm_rejects_bad_mode3_blocks() -> None:
    _rejected_by_both(_bad_mode3_frames())


def test_mode3_needs_version_2() -> None:
    """FORMAT.md: a mode-3 block in a version 1 frame is invalid (reader and ggcomm); the
    same bytes labelled version 2 are a valid frame."""
    rejected = {}
    for k, k_run, us, bits in MODE3_BLOCKS:
        v1 = hand_frame(3, k, k_run, bits, len(us), version=1)
        v2 = hand_frame(3, k, k_run, bits, len(us), version=2)
        assert v1[4] == 1 and v2[4] == 2 and v1[5:-4] == v2[5:-4]
        with pytest.raises(ValueError, match="version 1"):
            parse_frame(v1)
        with pytest.raises(ggcomm.FrameError, match="version"):
            ggcomm.codec.decode(v1)
        assert parse_frame(v2).symbols == us
        assert bits_equal(ggcomm.codec.decode(v2), _values(us))
        rejected[f"v1_{k}_{k_run}_{len(us)}"] = v1
    _rejected_by_both(rejected)


def sparse_gauss(n: int, dtype: torch.dtype, seed: int, density: float = 0.1) -> torch.Tensor:
    """About (1 - density) of the elements exact zeros, the others N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    x = x * (torch.rand(n, generator=g, dtype=torch.float64) < density)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPE_LIST, ids=str)
@pytest.mark.parametrize("step", [0.05, 0.1])
def test_ggcomm_uses_mode3_for_sparse_gaussian_data(dtype: torch.dtype, step: float) -> None:
    """90% exact zeros and N(0, 1) values at 10-20 steps, default settings, block_size 4096:
    zero runs beat modes 0 and 2, and the Golomb-Rice code beats EG on the values, so
    ggcomm's frame has mode-3 blocks. The reader, ggcomm and the spec's quantization agree
    on every value, the payload is the canonical codewords, and every block is the one
    expected_choice gives."""
    n, bs = 4 * 4096 + 1000, 4096
    x = sparse_gauss(n, dtype, seed=31)
    assert 0.85 < float((x == 0).double().mean()) < 0.95
    data = ggcomm.codec.encode(x, step, block_size=bs).tobytes()
    pf = check_frame(x, [step], [n], data, block_size=bs)
    assert pf.version == VERSION
    modes = [b.mode for b in pf.blocks]
    assert modes.count(3) >= 4, f"expected mode-3 blocks, got modes {modes}"
    wrong = choice_mismatches(pf)
    assert not wrong, f"blocks (index, (mode, k, k_run, bits), documented): {wrong}"
    info = ggcomm.codec.inspect(data)
    names = {0: "eg", 1: "zero_runs", 2: "rice", 3: "zero_runs_rice"}
    assert [b.mode for b in info.blocks] == [names[m] for m in modes]
    assert [(b.k, b.k_run, b.bit_length) for b in info.blocks] == [
        (b.k, b.k_run, b.bit_length) for b in pf.blocks
    ]
    q, _, _ = ggcomm.codec.decode_symbols(data)
    assert q.tolist() == [u_to_q(u) for u in pf.symbols]


@pytest.mark.parametrize("k", [0, 4])
def test_fixed_k_turns_mode3_off(k: int) -> None:
    """The same sparse data with a user-fixed k: zero runs with EG values (mode 1) at that
    k, never mode 2 or 3, as expected_choice gives."""
    x = sparse_gauss(2 * 4096, torch.float32, seed=32)
    data = ggcomm.codec.encode(x, 0.05, block_size=4096, k=k).tobytes()
    pf = check_frame(x, [0.05], [x.numel()], data, block_size=4096)
    assert [b.mode for b in pf.blocks] == [1, 1]
    for blk in pf.blocks:
        assert blk.k == k
        assert (blk.mode, blk.k, blk.k_run, blk.bit_length) == expected_choice(blk.symbols, k)
    # with the auto k the same data is mode 3
    auto = parse_frame(ggcomm.codec.encode(x, 0.05, block_size=4096).tobytes())
    assert [b.mode for b in auto.blocks] == [3, 3]


def _zero_run_case(case: str) -> tuple[torch.Tensor, float, int, int]:
    """(x, step, block_size, the zero-run mode its blocks must use)."""
    if case == "outliers":
        # sparse Gaussian plus values of 1000 steps (v = 1999): escapes in mode 3 (k = 4)
        x = sparse_gauss(4 * 4096, torch.float32, seed=33)
        x[100::1500] = 50.0
        return x, 0.05, 4096, 3
    if case == "heavy_tailed":
        # 90% zeros, values with a heavy tail (N(0, 1) times log(U)^2): EG beats
        # Golomb-Rice on the values, so the block is mode 1
        g = torch.Generator().manual_seed(3)
        n = 2 * 4096
        x = torch.randn(n, generator=g, dtype=torch.float64)
        x = x * torch.rand(n, generator=g, dtype=torch.float64).log() ** 2
        x = x * (torch.rand(n, generator=g, dtype=torch.float64) < 0.1)
        return x.to(torch.float32), 0.05, 4096, 1
    assert case == "tie"
    # every value u = 1 (v = 0): k + 1 bits in EG and Golomb-Rice alike, and mode 1 goes
    # before mode 3 on a tie
    x = torch.zeros(64, dtype=torch.float32)
    x[::5] = 1.0
    return x, 1.0, 64, 1


@pytest.mark.parametrize("case", ["outliers", "heavy_tailed", "tie"])
def test_zero_run_value_code_choice(case: str) -> None:
    """FORMAT.md: zero-run values go in mode 3 only when their Golomb-Rice bits at the best
    k are strictly fewer than their EG bits at the best k. ggcomm's blocks are the ones
    expected_choice gives, read back by the reader as by ggcomm (escapes included)."""
    x, step, bs, want_mode = _zero_run_case(case)
    data = ggcomm.codec.encode(x, step, block_size=bs).tobytes()
    pf = check_frame(x, [step], [x.numel()], data, block_size=bs)
    assert [b.mode for b in pf.blocks] == [want_mode] * len(pf.blocks)
    for blk in pf.blocks:
        assert (blk.mode, blk.k, blk.k_run, blk.bit_length) == expected_choice(blk.symbols)
        if case == "outliers":
            escapes = [u for u in blk.symbols if u and u - 1 >= GR_ESCAPE_ZEROS << blk.k]
            assert escapes, "expected escapes in every mode-3 block"
        if case == "tie":
            _, vals = _zero_run_parts(blk.symbols)
            eg_best = min(_mode0_bits(vals, k) for k in range(31))
            assert eg_best == min(_mode2_bits(vals, k) for k in range(31))


# --------------------------------------------------------------------------------------
# Mode 4: rANS
# --------------------------------------------------------------------------------------

MODE_NAMES = {0: "eg", 1: "zero_runs", 2: "rice", 3: "zero_runs_rice", 4: "rans"}


def _drawn(freqs: list[int], count: int, seed: int) -> list[int]:
    """``count`` symbols drawn with the table's probabilities f[s] / 4096."""
    p = np.asarray(freqs, dtype=np.float64) / RANS_M
    return np.random.default_rng(seed).choice(len(freqs), size=count, p=p).tolist()


def _table64() -> list[int]:
    """64 frequencies with zeros in the middle (symbols 10..49 but 20, 30 and 40 never
    occur) and some of 1; f[63] = 1."""
    f = [0] * 64
    for s in range(10):
        f[s] = 300 - 25 * s
    f[20], f[30], f[40] = 1, 7, 1
    for s in range(50, 63):
        f[s] = 30 + s
    f[63] = 1
    f[0] += RANS_M - sum(f)
    return f


# (name, frequency table f[0] .. f[n-1], symbols) for hand-built mode-4 blocks
MODE4_BLOCKS = [
    # n = 1: no table, nothing but the four states at 2^16
    ("n1_count1", [4096], [0]),
    ("n1_count5", [4096], [0] * 5),
    ("n1_count3000", [4096], [0] * 3000),
    ("n2_count1", [2048, 2048], [1]),
    ("n2_count2", [2048, 2048], [0, 1]),
    # f = 1: 12 bits a symbol, words from the second symbol on one state
    ("n2_rare_count9", [1, 4095], [0, 1, 1, 1, 0, 1, 1, 1, 1]),
    ("n2_rare_count3000", [1, 4095], [0] * 3000),
    # zeros in the middle of the table, f[n-1] = 1
    ("n3_zero_mid_count3", [1000, 0, 3096], [2, 0, 2]),
    ("n3_count4", [4094, 0, 2], [2, 2, 0, 2]),
    ("n5_zero_mid_count2000", [1500, 0, 0, 2000, 596], _drawn([1500, 0, 0, 2000, 596], 2000, 1)),
    # 12 (n - 1) not a multiple of 8: 4 bits of table padding
    ("n10_count5", [409] * 9 + [415], [9, 0, 3, 9, 5]),
    ("n64_uniform_count4000", [64] * 64, _drawn([64] * 64, 4000, 2)),
    ("n64_zeros_count5", _table64(), [63, 20, 0, 40, 62]),
    ("n64_zeros_count3000", _table64(), _drawn(_table64(), 3000, 3)),
    # symbols that do not follow the table: the rare ones, many words
    ("n64_rare_count2500", _table64(), [20, 40, 63, 30] * 625),
]
MODE4_IDS = [name for name, _, _ in MODE4_BLOCKS]


def _mode4_frame(freqs: list[int], symbols: list[int], **kw) -> bytes:
    """A hand-built frame (see hand_frame) of one mode-4 block, k = n - 1."""
    data = rans_block(symbols, freqs)
    return hand_frame(RANS_MODE, len(freqs) - 1, 0, bytes_to_bits(data), len(symbols), **kw)


def test_mode4_blocks_spelled_out() -> None:
    """Two mode-4 blocks worked by hand from FORMAT.md, as the test-side encoder writes
    them and the reader reads them back.

    f = [2048, 2048], u = [1]: the table is f[0] = 0x800 and 4 zero bits (80 00); the
    encoder takes x[0] = 2^16 to floor(2^16 / 2048) 4096 + 0 + 2048 = 133120 = 0x20800 (no
    word: 2^16 < 2^20 2048); the other states stay 2^16.

    f = [1, 4095], u = [0, 1, 1, 1, 0, 1, 1, 1, 1]: the table is 0x001 and 4 zero bits
    (00 10). Backwards: j = 8 (state 0, s = 1): 2^16 -> 16 * 4096 + 16 + 1 = 65553; j = 7, 6,
    5 likewise on states 3, 2, 1; j = 4 (state 0, s = 0, f = 1): 65553 -> 65553 * 4096 =
    0x10011000; j = 3, 2, 1 (s = 1): 65553 -> 16 * 4096 + 33 + 1 = 65570 = 0x10022; j = 0
    (state 0, s = 0): 0x10011000 >= 2^20, so the word 0x1000 is emitted and x = 0x1001, then
    x = 0x1001 * 4096 = 0x1001000."""
    one = rans_block([1], [2048, 2048])
    assert one == bytes.fromhex("8000" + "00080200" + "00000100" * 3)
    nine_symbols = [0, 1, 1, 1, 0, 1, 1, 1, 1]
    nine = rans_block(nine_symbols, [1, 4095])
    assert nine == bytes.fromhex("0010" + "00100001" + "22000100" * 3 + "0010")
    for freqs, us, data in (([2048, 2048], [1], one), ([1, 4095], nine_symbols, nine)):
        blk = Block(RANS_MODE, len(freqs) - 1, 0, 0, 8 * len(data))
        assert decode_block(blk, data, len(us)) == us
        assert blk.freqs == freqs
        assert block_bits(RANS_MODE, len(freqs) - 1, 0, us, freqs) == bytes_to_bits(data)
    # n = 1: no table and no word, whatever the count; the fewest bits are the states'
    assert rans_block([0] * 3000, [4096]) == struct.pack("<4I", *[RANS_L] * 4)
    assert min_block_bits(RANS_MODE, 0, 0, 3000) == 8 * 16
    assert min_block_bits(RANS_MODE, 63, 0, 1) == 8 * (95 + 16)  # TB = ceil(12 * 63 / 8)


@pytest.mark.parametrize("row", MODE4_BLOCKS, ids=MODE4_IDS)
def test_reader_decodes_hand_built_mode4_frames(row) -> None:
    """Hand-built version 3 frames with one mode-4 block, written by the spec's encoder
    steps (rans_block): alphabets of 1 to 64 symbols, frequencies of 0 in the middle and of
    1, blocks of 1 to 5 elements and of thousands."""
    name, freqs, us = row
    data = _mode4_frame(freqs, us)
    pf = parse_frame(data)
    assert pf.version == VERSION == 3
    (blk,) = pf.blocks
    assert (blk.mode, blk.k, blk.k_run) == (RANS_MODE, len(freqs) - 1, 0)
    assert blk.bit_length % 8 == 0 and blk.bit_length >= min_block_bits(4, blk.k, 0, len(us))
    assert blk.freqs == freqs
    assert pf.symbols == us
    assert bits_equal(read_frame(data), _values(us))
    if name == "n64_rare_count2500":
        # 2500 symbols of 9 to 12 bits each (f = 1, 1, 1, 7): over a thousand words
        assert (blk.bit_length - 8 * (95 + 16)) // 16 > 1000


@pytest.mark.parametrize("row", MODE4_BLOCKS, ids=MODE4_IDS)
def test_ggcomm_decodes_hand_built_mode4_frames(row) -> None:
    """The same frames through ggcomm's mode-4 decoder."""
    _, freqs, us = row
    data = _mode4_frame(freqs, us)
    want = _values(us)
    assert bits_equal(ggcomm.codec.decode(data), want)
    q, pos, _ = ggcomm.codec.decode_symbols(data)
    assert q.tolist() == want.tolist() and pos.numel() == 0
    info = ggcomm.codec.inspect(data)
    assert [(b.mode, b.k, b.k_run, b.bit_length) for b in info.blocks] == [
        ("rans", len(freqs) - 1, 0, 8 * len(rans_block(us, freqs)))
    ]


def _bad_mode4_frames() -> dict[str, bytes]:
    """Version 3 frames with one mode-4 block each, invalid in one way each (hand_frame
    computes the CRC, so the failure is the block's)."""
    nine_symbols = [0, 1, 1, 1, 0, 1, 1, 1, 1]
    nine = rans_block(nine_symbols, [1, 4095])  # a table, four states, one word (0x1000)
    assert len(nine) == 2 + 16 + 2
    states = struct.pack("<4I", *[RANS_L] * 4)  # n = 1: a valid block of any count

    def f(k: int, data: bytes, count: int, *, k_run: int = 0, bit_length: int | None = None):
        return hand_frame(RANS_MODE, k, k_run, bytes_to_bits(data), count, bit_length=bit_length)

    def with_state(i: int, value: int) -> bytes:
        b = bytearray(states)
        struct.pack_into("<I", b, 4 * i, value)
        return bytes(b)

    return {
        # the block table: k at most 63, k_run 0, whole bytes, whole words
        "k_64": f(64, bytes(96) + states, 1),
        "k_run_1": f(1, nine, 9, k_run=1),
        "bit_length_not_bytes": f(1, nine, 9, bit_length=8 * len(nine) - 4),
        "odd_word_bytes": f(1, nine + b"\0", 9),
        # below 8 (TB + 16) bits: 14 bytes for n = 1, 16 bytes (TB = 2) for n = 2
        "below_min_bits": f(0, states[:14], 1),
        # the table: stored frequencies adding up to more than 4095 (f[2] would be 0),
        # nonzero padding
        "freq_sum_4096": f(2, bytes.fromhex("800800") + states, 1),
        "table_padding": f(1, nine[:1] + bytes([nine[1] | 1]) + nine[2:], 9),
        # a state below 2^16 (state 2 of 4, read by the third symbol)
        "state_below_2^16": f(0, with_state(2, RANS_L - 1), 5),
        # the stream: a word needed after the last one, a word left unread, a state that
        # does not end at 2^16 (state 1 unchanged by n = 1's steps)
        "word_past_end": f(1, nine[:-2], 9),
        "word_unread": f(1, nine + b"\0\0", 9),
        "final_state": f(0, with_state(1, RANS_L + 1), 5),
    }


def test_reader_rejects_bad_mode4_blocks() -> None:
    bad = _bad_mode4_frames()
    # each rule by its message (not some other check failing first)
    by_message = {
        "above 63": ["k_64"],
        "k_run": ["k_run_1"],
        "multiple of 8": ["bit_length_not_bytes"],
        "whole number of words": ["odd_word_bytes"],
        "fewest bits": ["below_min_bits"],
        "above 4095": ["freq_sum_4096"],
        "table padding": ["table_padding"],
        "below 2^16": ["state_below_2^16"],
        "past its last": ["word_past_end"],
        "every state at 2^16 and every word read": ["word_unread", "final_state"],
    }
    assert sorted(n for names in by_message.values() for n in names) == sorted(bad)
    for message, names in by_message.items():
        for name in names:
            with pytest.raises(ValueError, match=re.escape(message)):
                read_frame(bad[name])
    # the same blocks, fixed, are valid
    nine = rans_block([0, 1, 1, 1, 0, 1, 1, 1, 1], [1, 4095])
    assert parse_frame(hand_frame(4, 1, 0, bytes_to_bits(nine), 9)).symbols[:2] == [0, 1]
    states = bytes_to_bits(struct.pack("<4I", *[RANS_L] * 4))
    assert states == ("0" * 23 + "1" + "0" * 8) * 4  # 00 00 01 00: 2^16, little-endian
    assert parse_frame(hand_frame(4, 0, 0, states, 5)).symbols == [0] * 5


def test_ggcomm_rejects_bad_mode4_blocks() -> None:
    _rejected_by_both(_bad_mode4_frames())


def test_mode4_needs_version_3() -> None:
    """FORMAT.md: a mode-4 block in a version 1 or 2 frame is invalid (reader and ggcomm);
    the same bytes labelled version 3 are a valid frame."""
    rejected = {}
    for name, freqs, us in MODE4_BLOCKS[:11]:
        v3 = _mode4_frame(freqs, us)
        assert parse_frame(v3).symbols == us
        for version in (1, 2):
            old = _mode4_frame(freqs, us, version=version)
            assert old[4] == version and v3[4] == 3 and old[5:-4] == v3[5:-4]
            with pytest.raises(ValueError, match=f"version {version}"):
                parse_frame(old)
            with pytest.raises(ggcomm.FrameError, match="version"):
                ggcomm.codec.decode(old)
            rejected[f"v{version}_{name}"] = old
    _rejected_by_both(rejected)


def light_tailed(n: int, dtype: torch.dtype, kind: str, seed: int) -> torch.Tensor:
    """Generalized Gaussian samples of shape 3 (scipy.stats.gennorm, density ~ exp(-|x|^3))
    or N(0, 1)."""
    rng = np.random.default_rng(seed)
    if kind == "gennorm3":
        import scipy.stats

        x = scipy.stats.gennorm.rvs(3, size=n, random_state=rng)
    else:
        x = rng.standard_normal(n)
    return torch.from_numpy(x).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(("kind", "step"), [("gennorm3", 0.35), ("gennorm3", 0.5),
                                            ("gauss", 0.5)])  # fmt: skip
def test_ggcomm_uses_mode4_for_light_tailed_data(dtype: torch.dtype, kind: str,
                                                 step: float) -> None:  # fmt: skip
    """Light-tailed values at about 2.4-3.1 bits per element, default settings, blocks of
    16384 (and a last one of 3000), a few NaNs and an infinity: every prefix code spends a
    fraction of a bit per element above the entropy, so ggcomm codes blocks in mode 4.
    The reader, ggcomm and the
    spec's quantization agree bit for bit, each mode-4 block is the spec's encoder output
    for its table, the table is the normalised one, and every block is the one
    expected_choice gives."""
    n, bs = 4 * 16384 + 3000, 16384
    x = light_tailed(n, dtype, kind, seed=41)
    x[100::7919] = math.nan  # exceptions: u = 0 at their positions, in mode-4 blocks too
    x[5000] = -math.inf
    data = ggcomm.codec.encode(x, step, block_size=bs).tobytes()
    pf = check_frame(x, [step], [n], data, block_size=bs)
    assert pf.version == VERSION
    assert len(pf.exc_positions) == 10
    modes = [b.mode for b in pf.blocks]
    assert RANS_MODE in modes, f"no mode-4 block: modes {modes}"
    wrong = choice_mismatches(pf)
    for i, blk in enumerate(pf.blocks):
        if blk.mode == RANS_MODE:
            assert blk.freqs == rans_freqs(blk.symbols), f"block {i}: not the normalised table"
    assert not wrong, f"blocks (index, (mode, k, k_run, bits), documented): {wrong}"
    info = ggcomm.codec.inspect(data)
    assert [b.mode for b in info.blocks] == [MODE_NAMES[m] for m in modes]
    assert [(b.k, b.k_run, b.bit_length) for b in info.blocks] == [
        (b.k, b.k_run, b.bit_length) for b in pf.blocks
    ]
    q, _, _ = ggcomm.codec.decode_symbols(data)
    assert q.tolist() == [u_to_q(u) for u in pf.symbols]


def test_mode4_choice_uses_the_estimate() -> None:
    """Blocks of 1024 near the 1/32 margin: FORMAT.md's rule is 32 E < 31 * 65536 B (the
    estimate, with the integer table L) and then 32 R < 31 B. Some of these blocks would
    pass on their exact size R but not on the estimate, so they keep their prefix code;
    others use mode 4. Every block is the one expected_choice gives."""
    n, bs, step = 40 * 1024, 1024, 0.5
    x = light_tailed(n, torch.float32, "gennorm3", seed=7)
    data = ggcomm.codec.encode(x, step, block_size=bs).tobytes()
    pf = check_frame(x, [step], [n], data, block_size=bs)
    kinds = {"mode4": 0, "R_only": 0}
    wrong = choice_mismatches(pf)
    for blk in pf.blocks:
        if max(blk.symbols) <= RANS_MAX_K:
            est_ok, _, r_ok = mode4_tests(blk.symbols, prefix_code_choice(blk.symbols)[3])
            kinds["mode4"] += est_ok and r_ok
            kinds["R_only"] += r_ok and not est_ok
    assert not wrong, f"blocks (index, (mode, k, k_run, bits), documented): {wrong}"
    assert kinds["mode4"] and kinds["R_only"], kinds


def test_mode4_table_normalisation() -> None:
    """rans_freqs follows FORMAT.md: max(1, floor(4096 c / count)) for the symbols that
    occur, 0 for the others, the remainder on the largest (the first of equal ones)."""
    # 3 elements: floor(4096 / 3) = 1365 each, 1 left over, to symbol 0 (the first largest)
    assert rans_freqs([0, 2, 4]) == [1366, 0, 1365, 0, 1365]
    # one symbol in 10000: floor(4096 / 10000) = 0, raised to 1; the deficit is taken from
    # the largest
    us = [1] * 9999 + [3]
    assert rans_freqs(us) == [0, 4095, 0, 1]
    # all zeros: n = 1
    assert rans_freqs([0] * 7) == [4096]
    # 63 rare symbols and a common one: the common one pays for the raises to 1
    us = [5] * 100000 + list(range(64))
    f = rans_freqs(us)
    assert len(f) == 64 and f[5] == 4096 - 63 and all(f[s] == 1 for s in range(64) if s != 5)
    # L: 0 bits at f = 4096, 12 bits at f = 1, 1 bit at f = 2048, rounded to 1/65536
    assert RANS_COST[4096] == 0 and RANS_COST[1] == 12 * 65536 and RANS_COST[2048] == 65536
    assert RANS_COST[3] == math.floor(65536 * math.log2(4096 / 3) + 0.5)


def test_mode4_with_zero_runs_false_and_fixed_k() -> None:
    """The light-tailed data with zero_runs=False still uses mode 4 (it is not a zero-run
    mode; ggcomm's reading, see expected_choice), with zero_runs=True every block is a
    zero-run block, and a user-fixed k turns mode 4 off (FORMAT.md)."""
    n, bs, step = 3 * 16384, 16384, 0.5
    x = light_tailed(n, torch.float32, "gennorm3", seed=41)
    no_runs = check_frame(x, [step], [n], ggcomm.codec.encode(
        x, step, block_size=bs, zero_runs=False).tobytes(), block_size=bs)  # fmt: skip
    for blk in no_runs.blocks:
        assert (blk.mode, blk.k, blk.k_run, blk.bit_length) == expected_choice(
            blk.symbols, zero_runs=False)  # fmt: skip
    assert RANS_MODE in [b.mode for b in no_runs.blocks]
    runs = check_frame(x, [step], [n], ggcomm.codec.encode(
        x, step, block_size=bs, zero_runs=True).tobytes(), block_size=bs)  # fmt: skip
    assert all(b.mode in ZERO_RUN_MODES for b in runs.blocks)
    fixed = check_frame(x, [step], [n], ggcomm.codec.encode(
        x, step, block_size=bs, k=2).tobytes(), block_size=bs)  # fmt: skip
    for blk in fixed.blocks:
        assert (blk.mode, blk.k, blk.k_run, blk.bit_length) == expected_choice(blk.symbols, 2)
        assert blk.mode in (0, 1)
