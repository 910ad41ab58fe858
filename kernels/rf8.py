"""numba kernels of RF8 (``ggcomm.rf8``): each weight as one or two signed powers of two.

The byte layout and the rounding rule are specified in ``docs/FORMAT.md`` ("RF8
tensors"); ``ggcomm.kernels.reference`` (``rf8_*``) is a pure-Python version of the same
rule that the tests hold these kernels to, bit for bit. Each kernel works on a range of
blocks ``[b_lo, b_hi)`` and releases the GIL, so callers split a tensor's blocks over
threads. Values are computed in float64: every RF8 value is exact there.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._intrinsics import f64_bits, f64_from_bits, lshr

MAX_GAP = 4  # the second term is kept at most this many octaves below the first
WINDOW = 15  # octaves a block spans below its largest value (E = 1..15)
SQRT_HALF = math.sqrt(0.5)  # |w| >= 2^(e + 1/2) <=> the frexp mantissa >= sqrt(1/2)
_NONE = -(1 << 30)  # scratch mark: no coded value here
_FRAC = (1 << 52) - 1
# round(log2 a) goes up when the frexp mantissa m >= fl(sqrt(1/2)), i.e. when a's 52 fraction
# bits are >= those of fl(sqrt(2)) = 2 fl(sqrt(1/2)) (the same comparison, scaled by 2)
_SQRT2_FRAC = int(np.float64(math.sqrt(2.0)).view(np.int64)) & _FRAC

ERR_ZERO_TAIL = 1  # a code with E = 0 and T != 0
ERR_RANGE = 2  # a code whose value is not finite in the dtype


@njit(nogil=True, cache=True)
def round_log2(a):
    """round(log2 a) for finite a > 0: the e with 2^(e - 1/2) <= a < 2^(e + 1/2)."""
    bits = f64_bits(a)
    field = (bits >> 52) & 0x7FF
    if field == 0:  # subnormal: the library's frexp
        m, e = math.frexp(a)
        return e - 1 + (1 if m >= SQRT_HALF else 0)
    return field - 1023 + (1 if (bits & _FRAC) >= _SQRT2_FRAC else 0)


@njit(nogil=True, cache=True)
def pow2(e):
    """2.0 ** e (0 below the float64 range, inf above it)."""
    if -1022 <= e <= 1023:
        return f64_from_bits(np.int64(e + 1023) << 52)
    return math.ldexp(1.0, e)


@njit(nogil=True, cache=True)
def split(a):
    """(e1, T) of a finite a > 0: the first term's exponent and the tail code."""
    e1 = round_log2(a)
    r = a - pow2(e1)  # exact: a and 2^e1 are within a factor sqrt(2)
    t = 0
    if r != 0.0:
        d = e1 - round_log2(abs(r))
        if d <= MAX_GAP:
            t = 1 if d == 1 else 2 + 2 * (d - 2) + (1 if r < 0.0 else 0)
    return e1, t


@njit(nogil=True, cache=True)
def value(e1, t):
    """|value| of a first exponent e1 and a tail code t, in float64."""
    first = pow2(e1)
    if t == 0:
        return first
    if t == 1:
        return first + pow2(e1 - 1)
    second = pow2(e1 - (2 + (t - 2) // 2))
    return first - second if t & 1 else first + second


_D = np.array([0, 1, 2, 2, 3, 3, 4, 4], np.int64)  # T -> d (T = 0: unused)
_S = np.array([0.0, 1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0])  # T -> sign of the second term


@njit(nogil=True, cache=True)
def encode_blocks(x, block, overflow_at, b_lo, b_hi, codes, bases, exc):
    """Codes, block bases and the exception mask of blocks [b_lo, b_hi) of flat x
    (float32 or float64). A value whose RF8 form reaches ``overflow_at`` (where the dtype
    rounds to infinity) or that is not finite is an exception: code 0, exc 1.

    Written without data-dependent branches in the common path (signs, zeros and tail
    codes are selects), since weights' signs and tails are unpredictable."""
    n = x.size
    e1s = np.empty(min(block, n), np.int64)
    for b in range(b_lo, b_hi):
        lo = b * block
        hi = min(n, lo + block)
        emax = _NONE
        for i in range(lo, hi):
            v = np.float64(x[i])
            a = abs(v)
            exc[i] = 0
            if not a <= 1.7976931348623157e308:  # NaN or inf
                exc[i] = 1
                e1s[i - lo] = _NONE
                continue
            nz = a > 0.0
            a1 = a if nz else 1.0
            e1 = round_log2(a1)
            r = a1 - pow2(e1)
            ra = abs(r)
            d = e1 - round_log2(ra if ra > 0.0 else 1.0)
            t = 2 * d - 2 + (1 if r < 0.0 else 0) + (1 if d == 1 else 0)
            t = t if (ra > 0.0) & (d <= MAX_GAP) else 0
            if e1 >= 1000 or (overflow_at < 1e300 and e1 >= 10):  # near the dtype's top
                if value(e1, t) >= overflow_at:
                    exc[i] = 1
                    e1s[i - lo] = _NONE
                    continue
            e1s[i - lo] = (e1 << 3) | t if nz else _NONE
            emax = max(emax, e1 if nz else _NONE)
        base = emax - WINDOW if emax != _NONE else 0
        bases[b] = base
        for i in range(lo, hi):
            packed = e1s[i - lo]
            eo = (packed >> 3) - base
            code = (eo << 3) | (packed & 7)
            code = code if (packed != _NONE) & (eo >= 1) else 0
            sign = lshr(f64_bits(np.float64(x[i])), 63) & (1 - exc[i])
            codes[i] = code | (sign << 7)


@njit(nogil=True, cache=True)
def decode_blocks(codes, bases, block, overflow_at, b_lo, b_hi, out):
    """Values of blocks [b_lo, b_hi) into out (float32 or float64). Returns (error code,
    index), (0, -1) if every code is valid."""
    n = codes.size
    for b in range(b_lo, b_hi):
        base = np.int64(bases[b])
        lo = b * block
        hi = min(n, lo + block)
        bad = False
        for i in range(lo, hi):
            c = np.int64(codes[i])
            e = (c >> 3) & 15
            t = c & 7
            e1 = base + e
            mag = pow2(e1) + _S[t] * pow2(e1 - _D[t])
            bad |= ((e == 0) & (t != 0)) | (mag >= overflow_at) & (e != 0)
            mag = mag if e != 0 else 0.0
            out[i] = f64_from_bits(f64_bits(mag) | (c >> 7) << 63)
        if bad:  # find the first bad code
            for i in range(lo, hi):
                c = np.int64(codes[i])
                e = (c >> 3) & 15
                if e == 0 and c & 7 != 0:
                    return ERR_ZERO_TAIL, i
                if e != 0 and value(base + e, c & 7) >= overflow_at:
                    return ERR_RANGE, i
    return 0, -1
