"""Slow, obviously-correct reference of the block coder in ``ggcomm.kernels.eg``.

Written from ``docs/FORMAT.md`` with Python integers and bit strings; the tests hold the
numba kernels to it bit for bit. Not used on any hot path.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from .eg import (
    K_MAX,
    MODE_EG,
    MODE_RANS,
    MODE_RICE,
    MODE_ZERO_RUNS,
    MODE_ZERO_RUNS_RICE,
    QMAX,
    RANS_ALPHABET,
    RANS_L,
    RANS_M,
    RANS_MARGIN,
    RICE_ESC,
    UMAX,
    zero_runs_considered,
)


def coded(v: float, step: float, vmax: float) -> bool:
    """Whether v = x / step is coded (FORMAT.md: else an exception): finite, |v| <= 2**30 - 1,
    and |v| < M + 1/2 with M = floor(vmax / step), vmax the frame dtype's largest finite
    value (so |q| * step <= vmax: the value comes back finite)."""
    m = math.floor(Fraction(vmax) / Fraction(step))
    return math.isfinite(v) and abs(v) <= QMAX and abs(Fraction(v)) < m + Fraction(1, 2)


def quantize(x: np.ndarray, seg_bounds: np.ndarray, steps: np.ndarray,
             vmax: float | None = None) -> tuple[list, list]:
    """(u symbols, exception positions) for a flat float array, per FORMAT.md.

    vmax: the frame dtype's largest finite value (default: x's dtype's; pass it when x is
    the float32 form of float16 or bfloat16 data).
    """
    vmax = float(np.finfo(x.dtype).max) if vmax is None else float(vmax)
    us, exc = [], []
    for s in range(len(steps)):
        inv = 1.0 / float(steps[s])
        for i in range(int(seg_bounds[s]), int(seg_bounds[s + 1])):
            with np.errstate(over="ignore"):  # an infinite v is an exception
                v = float(np.float64(x[i]) * inv)
            if coded(v, float(steps[s]), vmax):
                q = int(np.rint(v))
                us.append(2 * q - 1 if q > 0 else -2 * q)
            else:
                us.append(0)
                exc.append(i)
    return us, exc


def block_layout(seg_bounds, block_size: int) -> list[tuple[int, int]]:
    """(start, count) of every block: each segment is cut into blocks of block_size."""
    out = []
    for s in range(len(seg_bounds) - 1):
        for start in range(int(seg_bounds[s]), int(seg_bounds[s + 1]), block_size):
            out.append((start, min(block_size, int(seg_bounds[s + 1]) - start)))
    return out


def eg_codeword(u: int, k: int) -> str:
    """The order-k Exp-Golomb codeword of u >= 0 as a string of '0'/'1'."""
    c = u + (1 << k)
    body = bin(c)[2:]
    return "0" * (len(body) - 1 - k) + body


def eg_len(u: int, k: int) -> int:
    return len(eg_codeword(u, k))


def rice_codeword(u: int, k: int) -> str:
    """The mode-2 codeword of u >= 0 with parameter k: Golomb-Rice, or an escape."""
    q = u >> k
    if q >= RICE_ESC:
        return "0" * RICE_ESC + eg_codeword(u, k)
    return "0" * q + "1" + (format(u & ((1 << k) - 1), f"0{k}b") if k else "")


def rice_len(u: int, k: int) -> int:
    return len(rice_codeword(u, k))


def _runs_and_values(us: list) -> tuple[list, list]:
    runs, vals, run = [], [], 0
    for u in us:
        if u == 0:
            run += 1
        else:
            runs.append(run)
            vals.append(u - 1)
            run = 0
    if run > 0:
        runs.append(run)
    return runs, vals


def _best(symbols: list, length=eg_len) -> tuple[int, int]:
    """(k, bits) minimising the bits of symbols in a code (EG_k by default); ties to the
    smaller k."""
    top = max(symbols, default=0).bit_length()
    costs = [sum(length(s, k) for s in symbols) for k in range(min(top, K_MAX) + 1)]
    k = min(range(len(costs)), key=lambda i: (costs[i], i))
    return k, costs[k]


def rans_log(f: int) -> int:
    """FORMAT.md's L[f]: a symbol's cost at frequency f in 1/65536 bits."""
    return math.floor(65536 * math.log2(RANS_M / f) + 0.5)


def rans_table(us: list) -> tuple[list, list]:
    """(counts, frequencies) of mode 4's table for a block whose symbols are all below
    RANS_ALPHABET (FORMAT.md, "Choices")."""
    n = max(us) + 1
    counts = [0] * n
    for u in us:
        counts[u] += 1
    freq = [max(1, c * RANS_M // len(us)) if c else 0 for c in counts]
    big = max(range(n), key=lambda s: (freq[s], -s))
    freq[big] += RANS_M - sum(freq)
    return counts, freq


def _rans_table_bytes(n: int) -> int:
    return (12 * (n - 1) + 7) // 8


def _bits_to_bytes(bits: str) -> bytes:
    padded = bits + "0" * (-len(bits) % 8)
    return bytes(int(padded[i : i + 8], 2) for i in range(0, len(padded), 8))


def rans_encode(us: list, freq: list) -> bytes:
    """A mode-4 block's bytes (FORMAT.md, mode 4: the encoder's steps, one at a time)."""
    cum = [sum(freq[:s]) for s in range(len(freq))]
    x = [RANS_L] * 4
    words = []
    for j in range(len(us) - 1, -1, -1):
        i, s = j % 4, us[j]
        if x[i] >= (freq[s] << 20):
            words.append(x[i] % 65536)
            x[i] //= 65536
        x[i] = (x[i] // freq[s]) * RANS_M + x[i] % freq[s] + cum[s]
    table = _bits_to_bytes("".join(f"{f:012b}" for f in freq[:-1]))
    return (table + b"".join(v.to_bytes(4, "little") for v in x)
            + b"".join(w.to_bytes(2, "little") for w in reversed(words)))


def rans_decode(data: bytes, count: int, n: int) -> list:
    """The symbols of a mode-4 block of alphabet n; raises ValueError on anything
    malformed."""
    tb = _rans_table_bytes(n)
    if len(data) < tb + 16 or (len(data) - tb - 16) % 2:
        raise ValueError("not a table, four states and whole words")
    bits = "".join(f"{b:08b}" for b in data[:tb])
    freq = [int(bits[12 * s : 12 * s + 12], 2) for s in range(n - 1)]
    if sum(freq) > RANS_M - 1:
        raise ValueError("frequencies above the scale")
    if bits[12 * (n - 1):].strip("0"):
        raise ValueError("nonzero table padding")
    freq.append(RANS_M - sum(freq))
    cum = [sum(freq[:s]) for s in range(n)]
    x = [int.from_bytes(data[tb + 4 * i : tb + 4 * i + 4], "little") for i in range(4)]
    if min(x) < RANS_L:
        raise ValueError("state below 2**16")
    words = [int.from_bytes(data[o : o + 2], "little") for o in range(tb + 16, len(data), 2)]
    w = 0
    us = []
    for j in range(count):
        i = j % 4
        slot = x[i] % RANS_M
        s = next(t for t in range(n) if cum[t] <= slot < cum[t] + freq[t])
        x[i] = freq[s] * (x[i] // RANS_M) + slot - cum[s]
        if x[i] < RANS_L:
            if w == len(words):
                raise ValueError("a word past the last")
            x[i] = x[i] * 65536 + words[w]
            w += 1
        us.append(s)
    if w != len(words) or x != [RANS_L] * 4:
        raise ValueError("the states do not end at 2**16 with every word read")
    return us


def choose(us: list, k_fixed: int = -1, zero_runs: int = 1) -> tuple[int, int, int]:
    """(mode, k, k_run) the encoder picks for a block; same rules as encode_blocks."""
    mode, krun = MODE_EG, 0
    if k_fixed >= 0:
        k, bits = k_fixed, sum(eg_len(u, k_fixed) for u in us)
    else:
        k, bits = _best(us)
        kr, rice_bits = _best(us, rice_len)
        if rice_bits < bits:
            mode, k, bits = MODE_RICE, kr, rice_bits
    zeros = sum(1 for u in us if u == 0)
    if zero_runs == 2 or (zero_runs == 1 and zero_runs_considered(zeros, len(us))):
        runs, vals = _runs_and_values(us)
        krun, run_bits = _best(runs)
        zr_mode = MODE_ZERO_RUNS
        if k_fixed >= 0:
            kv, val_bits = k_fixed, sum(eg_len(v, k_fixed) for v in vals)
        else:
            kv, val_bits = _best(vals)
            kvr, val_rice = _best(vals, rice_len)
            if val_rice < val_bits:
                zr_mode, kv, val_bits = MODE_ZERO_RUNS_RICE, kvr, val_rice
        if zero_runs == 2 or run_bits + val_bits < bits:
            mode, k, bits = zr_mode, kv, run_bits + val_bits
        else:
            krun = 0
    if k_fixed < 0 and zero_runs != 2 and us and max(us) < RANS_ALPHABET:
        counts, freq = rans_table(us)
        n = len(freq)
        est = sum(c * rans_log(f) for c, f in zip(counts, freq, strict=True) if c) \
            + 65536 * 8 * (_rans_table_bytes(n) + 16)
        if RANS_MARGIN * est < (RANS_MARGIN - 1) * 65536 * bits:
            exact = 8 * len(rans_encode(us, freq))
            if RANS_MARGIN * exact < (RANS_MARGIN - 1) * bits:
                mode, k, krun = MODE_RANS, n - 1, 0
    return mode, k, krun


def encode_block(us: list, mode: int, k: int, krun: int) -> tuple[bytes, int]:
    """(bytes, bit length) of one block."""
    if mode == MODE_RANS:
        data = rans_encode(us, rans_table(us)[1])
        return data, 8 * len(data)
    if mode == MODE_EG:
        bits = "".join(eg_codeword(u, k) for u in us)
    elif mode == MODE_RICE:
        bits = "".join(rice_codeword(u, k) for u in us)
    else:
        parts = []
        run = 0
        for u in us:
            if u == 0:
                run += 1
            else:
                parts.append(eg_codeword(run, krun))
                parts.append((rice_codeword if mode == MODE_ZERO_RUNS_RICE else eg_codeword)(
                    u - 1, k))
                run = 0
        if run > 0:
            parts.append(eg_codeword(run, krun))
        bits = "".join(parts)
    return _bits_to_bytes(bits), len(bits)


class _Reader:
    def __init__(self, data: bytes, nbits: int):
        self.bits = "".join(f"{b:08b}" for b in data)[:nbits]
        self.pos = 0

    def eg(self, k: int) -> int:
        z = 0
        while self.pos + z < len(self.bits) and self.bits[self.pos + z] == "0":
            z += 1
        if z > 31 - k:
            raise ValueError("codeword prefix too long")
        length = 2 * z + k + 1
        if self.pos + length > len(self.bits):
            raise ValueError("codeword runs past the block")
        c = int(self.bits[self.pos + z : self.pos + length], 2)
        self.pos += length
        return c - (1 << k)

    def rice(self, k: int) -> int:
        z = 0
        while self.pos + z < len(self.bits) and z < RICE_ESC and self.bits[self.pos + z] == "0":
            z += 1
        if z == RICE_ESC:
            self.pos += RICE_ESC
            u = self.eg(k)
            if u < RICE_ESC << k:
                raise ValueError("escape holds a value with a shorter codeword")
            return u
        length = z + 1 + k
        if self.pos + length > len(self.bits):
            raise ValueError("codeword runs past the block")
        r = int(self.bits[self.pos + z + 1 : self.pos + length] or "0", 2)
        self.pos += length
        return (z << k) + r


def decode_block(data: bytes, nbits: int, count: int, mode: int, k: int, krun: int) -> list:
    """u symbols of one block; raises ValueError on anything malformed."""
    if mode == MODE_RANS:
        if nbits % 8 or len(data) != nbits // 8:
            raise ValueError("a rANS block is whole bytes")
        return rans_decode(data, count, k + 1)
    r = _Reader(data, nbits)
    us: list = []
    if mode in (MODE_EG, MODE_RICE):
        for _ in range(count):
            u = r.eg(k) if mode == MODE_EG else r.rice(k)
            if u > UMAX:
                raise ValueError("value out of range")
            us.append(u)
    else:
        while len(us) < count:
            run = r.eg(krun)
            if run > count - len(us):
                raise ValueError("zero run past the block")
            us.extend([0] * run)
            if len(us) == count:
                break
            v = r.rice(k) if mode == MODE_ZERO_RUNS_RICE else r.eg(k)
            if v + 1 > UMAX:
                raise ValueError("value out of range")
            us.append(v + 1)
    if r.pos != nbits:
        raise ValueError("block length mismatch")
    return us


def q_of_u(u: int) -> int:
    return (u + 1) >> 1 if u & 1 else -(u >> 1)


def feedback(g: np.ndarray, r: np.ndarray | None, seg_bounds: np.ndarray, steps: np.ndarray):
    """What encode_blocks_feedback computes, element by element.

    Returns (x, new residual, q, per-segment [sum x^2, sum |x|, non-finite count]) with
    x = float32(g + r); the residual is float32(x - q * step), 0 where x is an exception.
    """
    x = (g + r).astype(np.float32) if r is not None else g.astype(np.float32)
    new_r = np.zeros(x.size, np.float32)
    q = np.zeros(x.size, np.int64)
    stats = np.zeros((len(steps), 3))
    for s in range(len(steps)):
        step = float(steps[s])
        inv = 1.0 / step
        for i in range(int(seg_bounds[s]), int(seg_bounds[s + 1])):
            v = float(x[i])
            if np.isfinite(v):
                stats[s, 0] += v * v
                stats[s, 1] += abs(v)
            else:
                stats[s, 2] += 1
            if coded(v * inv, step, float(np.finfo(np.float32).max)):
                q[i] = int(np.rint(v * inv))
                new_r[i] = np.float32(v - float(q[i]) * step)
    return x, new_r, q, stats


def frame_sum(us_per_frame: list, extra: dict, seg_bounds, steps, divisor: float) -> np.ndarray:
    """What reduce_blocks writes as float32: sum of q * (step / divisor), or
    (sum of q * step + extra) / divisor where an exceptional value was added."""
    out = np.empty(len(us_per_frame[0]), np.float32)
    for s in range(len(steps)):
        for i in range(int(seg_bounds[s]), int(seg_bounds[s + 1])):
            total = float(sum(q_of_u(us[i]) for us in us_per_frame))
            if i in extra:
                out[i] = np.float32((total * float(steps[s]) + extra[i]) / divisor)
            else:
                out[i] = np.float32(total * (float(steps[s]) / divisor))
    return out


# --------------------------------------------------------------------------- RF8


def _pow2(e: int) -> float:
    """2^e as a float (inf above the float64 range, as C's ldexp gives)."""
    return math.inf if e > 1023 else math.ldexp(1.0, e)


def rf8_split(a: float) -> tuple[int, int]:
    """(e1, T) of a finite a > 0 (FORMAT.md, "RF8 tensors": what the encoder chooses)."""
    m, e = math.frexp(a)
    e1 = e - 1 + (m >= math.sqrt(0.5))
    r = a - _pow2(e1)
    if r == 0.0:
        return e1, 0
    m2, e2 = math.frexp(abs(r))
    d = e1 - (e2 - 1 + (m2 >= math.sqrt(0.5)))
    if d > 4:
        return e1, 0
    return e1, 1 if d == 1 else 2 + 2 * (d - 2) + (r < 0)


def rf8_value(e1: int, t: int) -> float:
    """|value| of the code (e1, T), per FORMAT.md's table."""
    if t == 0:
        return _pow2(e1)
    if t == 1:
        return _pow2(e1) + _pow2(e1 - 1)
    d = 2 + (t - 2) // 2
    return _pow2(e1) + (1 if t % 2 == 0 else -1) * _pow2(e1 - d)


def rf8_encode(x: list[float], block: int, overflow_at: float
               ) -> tuple[list[int], list[int], list[int]]:
    """(codes, block bases, exception positions) of the values x, one element at a time."""
    codes, bases, exc = [], [], []
    for lo in range(0, len(x), block):
        split = {}
        for i, v in enumerate(x[lo: lo + block], lo):
            if not math.isfinite(v):
                exc.append(i)
            elif v != 0.0:
                e1, t = rf8_split(abs(v))
                if rf8_value(e1, t) >= overflow_at:
                    exc.append(i)
                else:
                    split[i] = (e1, t)
        base = max(e1 for e1, _ in split.values()) - 15 if split else 0
        bases.append(base)
        for i, v in enumerate(x[lo: lo + block], lo):
            code = 0
            if i in split and split[i][0] - base >= 1:
                code = ((split[i][0] - base) << 3) | split[i][1]
            if math.isfinite(v) and i not in exc[-block:] and math.copysign(1.0, v) < 0:
                code |= 128
            codes.append(code)
    return codes, bases, exc
