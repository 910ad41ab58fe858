"""numba kernels: quantize, choose codes, and bit-pack blocks of Exp-Golomb and Golomb-Rice
codewords.

The wire format is specified in ``docs/FORMAT.md``; ``ggcomm.kernels.reference`` is a
slow pure-Python implementation of the same format that the tests hold these kernels to,
bit for bit.

Every kernel works on a range of blocks ``[b_lo, b_hi)`` and releases the GIL, so callers
run disjoint block ranges on several threads. numba does not check array bounds: every
read of untrusted bytes here goes through :func:`_peek`, which never reads outside the
buffer, and every length read from the stream is checked before it is used.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.extending import register_jitable

from ._intrinsics import (
    clz64,
    data_ptr,
    load_be64,
    load_i64,
    load_le64,
    load_u8,
    lshr,
    store_be64,
    store_i32,
    store_u16x4_i32,
)

# Largest |q| the code carries; larger magnitudes (and non-finite values) travel in the
# frame's exception list. With |q| <= 2**30 - 1 the mapped u is at most 2**31 - 2, so
# with k <= K_MAX every codeword value u + 2**k fits in 32 bits. The encoders take, per
# block, a limit `lim` on |x / step| (ggcomm.codec computes it: QMAX, or less where q * step
# would pass the frame dtype's largest finite value); |x / step| > lim is an exception.
QMAX = (1 << 30) - 1
UMAX = (1 << 31) - 2
K_MAX = 30
MAX_BLOCK_SIZE = 1 << 22

MODE_EG = 0  # each element: EG_k(u)
MODE_ZERO_RUNS = 1  # (EG_krun(run of zeros), EG_k(u - 1)) pairs, see FORMAT.md
MODE_RICE = 2  # each element: Golomb-Rice_k(u), EG_k(u) escape after RICE_ESC zeros
MODE_ZERO_RUNS_RICE = 3  # mode 1 with the nonzero values in mode 2's code
RICE_ESC = 16  # unary prefixes of this many zeros start an escape (FORMAT.md, mode 2)
MODE_RANS = 4  # rANS over a per-block frequency table of the symbols below RANS_ALPHABET
# Mode 4's constants (FORMAT.md): frequencies out of RANS_M (12 bits), states in
# [RANS_L, 2**32) renormalized by 16-bit words, RANS_STATES interleaved states.
RANS_SCALE_BITS = 12
RANS_M = 1 << RANS_SCALE_BITS
RANS_L = 1 << 16
RANS_STATES = 4
RANS_ALPHABET = 64  # mode 4 codes blocks whose symbols are all below this (k = n - 1)
RANS_MARGIN = 32  # mode 4 is used where it saves more than 1/RANS_MARGIN of a block's bits
NO_RANS = 4  # flag added to the encoders' zero_runs argument: never use mode 4
RANS_FRAC = 16  # the encoder's size estimate counts 1/2**RANS_FRAC bits
# RANS_LOG[f] = round(2**RANS_FRAC * log2(RANS_M / f)): a symbol's cost at frequency f, in
# the estimate's units (entry 0 unused)
RANS_LOG = np.zeros(RANS_M + 1, np.int64)
RANS_LOG[1:] = np.floor((1 << RANS_FRAC) * np.log2(RANS_M / np.arange(1, RANS_M + 1,
                                                                       dtype=np.float64))
                        + 0.5).astype(np.int64)


@register_jitable
def is_zero_runs(mode):
    """Whether a block mode codes runs of zeros (modes 1 and 3)."""
    return (mode == MODE_ZERO_RUNS) | (mode == MODE_ZERO_RUNS_RICE)


@register_jitable
def zero_runs_considered(zeros, count):
    """With ``zero_runs="auto"``, whether a block of ``count`` symbols, ``zeros`` of them 0,
    is tried in zero-run mode (at least a third zeros). Plain Python, numba and elementwise
    on numpy arrays or torch tensors alike."""
    return (3 * zeros >= count) & (count > 0)

# Decoder error codes (0 = ok). ggcomm.codec turns them into FrameError messages.
ERR_CODE_TOO_LONG = 1
ERR_OVERRUN = 2
ERR_VALUE_RANGE = 3
ERR_RUN_LENGTH = 4
ERR_LENGTH_MISMATCH = 5
ERR_PADDING = 6
ERR_EXCEPTION_CODE = 7
ERR_TABLE = 8
ERR_RANS_TABLE = 9
ERR_RANS_STATE = 10

_QMAXF = float(QMAX)
NBINS = 33  # bit lengths 0..32: every code value (symbols below 2**31, zero runs below 2**23)
_NBINS = NBINS
# Columns of a block histogram H: the (m, t) histogram, row total, suffix sums (see
# _summarize), then _TOP columns counting the top 4 bits of u per bit length m (Rice costs)
_TOP = 16
_GCOL = 2 * _NBINS + 1
_HCOLS = _GCOL + _TOP
_SMALL = 256  # symbols below this are histogrammed by table (a power of two)
_BOUND_SMALL = 64  # _zero_runs_bound's values below this are exact (its loops' length)
# One table per lane, _LANE apart: a cache line more than _SMALL, as tables a power of two
# apart would put a symbol's four counters in the same L1 cache set.
_LANE = _SMALL + 8
_EXTENT = _SMALL  # a spare slot of the first table: how far the tables may hold counts


# --------------------------------------------------------------------------- helpers


@njit(nogil=True, cache=True)
def _quantize(x, start, cnt, inv, scratch):
    """_quantize_to at the code's whole range (lim = QMAX)."""
    return _quantize_to(x, start, cnt, inv, _QMAXF, scratch)


@njit(nogil=True, cache=True)
def _quantize_to(x, start, cnt, inv, lim, scratch):
    """u-symbols of x[start:start+cnt] into scratch[:cnt]; returns the exception count.

    q = rint(float64(x) * inv_step); values with |x * inv| > lim (<= QMAX) or non-finite
    get u = 0 here and travel in the frame's exception list.
    """
    nexc = 0
    xs = x[start:start + cnt]
    for j in range(cnt):  # indices from 0: no wraparound checks, so it vectorizes
        v = np.float64(xs[j]) * inv
        ok = abs(v) <= lim  # False for NaN and +-inf too
        nexc += np.int64(not ok)
        q = np.int32(np.rint(v if ok else 0.0))
        scratch[j] = 2 * q - 1 if q > 0 else -2 * q
    return nexc


@njit(nogil=True, cache=True)
def _hist_add(H, u):
    """Histogram of (bit length m of u, leading one bits t of u); see _eg_cost. Also the
    top four bits of u per m (u shifted to 4 bits, see _rice_cost)."""
    if u == 0:
        H[0, 0] += 1
        H[0, _GCOL] += 1
    else:
        m = 64 - clz64(u)
        y = u << (64 - m)
        H[m, clz64(~y)] += 1
        H[m, _GCOL + lshr(y, 60)] += 1


@njit(nogil=True, cache=True)
def _histogram(scratch, cnt, H, T):
    """H := the (m, t) histogram of scratch[:cnt].

    Small symbols, the common case, are counted in four interleaved tables T (so that
    repeats of one value do not serialise on one counter) and folded into H at the end;
    four at a time where all four are small (one test for the four).
    """
    H[:, :] = 0
    _clear_small(T)
    top = np.uint64(0)  # the OR of the symbols: _fold_small reads only below its bit length
    j = 0
    while j + 3 < cnt:
        a = np.uint64(scratch[j])  # u >= 0; unsigned indices skip wraparound checks
        b = np.uint64(scratch[j + 1])
        c = np.uint64(scratch[j + 2])
        d = np.uint64(scratch[j + 3])
        abcd = a | b | c | d
        top |= abcd
        if abcd < _SMALL:  # _SMALL is a power of two
            T[a] += 1
            T[np.uint64(_LANE) + b] += 1
            T[np.uint64(2 * _LANE) + c] += 1
            T[np.uint64(3 * _LANE) + d] += 1
        else:
            for i in range(j, j + 4):
                _hist_one(H, T, np.uint64(scratch[i]))
        j += 4
    while j < cnt:
        top |= np.uint64(scratch[j])
        _hist_one(H, T, np.uint64(scratch[j]))
        j += 1
    _fold_small(T, H, top)


@njit(nogil=True, cache=True)
def _hist_one(H, T, u):
    """Count one symbol u (uint64): in T's first table if small, else in H."""
    if u < _SMALL:
        T[u] += 1
    else:
        _hist_add(H, np.int64(u))


@njit(nogil=True, cache=True)
def _clear_small(T):
    """Zero the small-symbol tables T (as _fold_small left them: only as far as they may
    hold counts, so a block of small symbols does not sweep all of T through the cache)."""
    n = T[_EXTENT]
    for lane in range(4):
        T[lane * _LANE:lane * _LANE + n] = 0
    T[_EXTENT] = 0


@njit(nogil=True, cache=True)
def _fold_small(T, H, top):
    """Add the four interleaved small-symbol tables T into the (m, t) histogram H; top is
    the OR of (at least) the symbols counted in T, which are below 2**bit_length(top).

    Records in T how far its tables may hold counts, for _clear_small. Branch-free: a
    symbol's bucket in each column group of H is a run of consecutive u, so running totals
    of the counts give every bucket by one subtraction (see _hist_add for the buckets).
    """
    n = min(np.int64(1) << (64 - clz64(top)), _SMALL)
    T[_EXTENT] = max(T[_EXTENT], n)
    P = np.empty(n + 1, np.int64)  # P[u] = count of the symbols below u
    acc = np.int64(0)
    for u in range(n):
        P[u] = acc
        acc += T[u] + T[_LANE + u] + T[2 * _LANE + u] + T[3 * _LANE + u]
    P[n] = acc
    H[0, 0] += P[1]
    H[0, _GCOL] += P[1]
    for m in range(1, 64 - clz64(n - 1) + 1):  # bit lengths of 1..n-1
        hi = np.int64(1) << m
        for t in range(1, m):  # t leading ones: u in [hi - 2**(m-t), hi - 2**(m-t-1))
            H[m, t] += P[hi - (hi >> (t + 1))] - P[hi - (hi >> t)]
        H[m, m] += P[hi] - P[hi - 1]  # all ones
        if m >= 4:  # top four bits j: u in [j * 2**(m-4), (j + 1) * 2**(m-4))
            w = np.int64(1) << (m - 4)
            for j in range(8, 16):
                H[m, _GCOL + j] += P[(j + 1) * w] - P[j * w]
        else:  # u itself, shifted to four bits
            for u in range(hi >> 1, hi):
                H[m, _GCOL + (u << (4 - m))] += P[u + 1] - P[u]


@njit(nogil=True, cache=True)
def _eg_cost(H, k, maxm):
    """Exact bits of EG_k over the symbols histogrammed in H (see _summarize), whose
    largest bit length is maxm.

    For u with bit length m: if m <= k the codeword has k + 1 bits. Otherwise
    floor(log2(u + 2**k)) is m - 1, or m when the top m - k bits of u are all ones,
    i.e. when the leading-ones count t >= m - k; the length is 2*floor(log2(u+2**k)) - k + 1.
    H[m, 33] holds the row total and H[m, 34 + j] the count with t >= j.
    """
    total = 0
    for m in range(maxm + 1):
        total += _eg_row_cost(H, m, k)
    return total


@njit(nogil=True, cache=True)
def _eg_row_cost(H, m, k):
    """EG_k bits of the symbols of bit length m histogrammed in H (see _eg_cost)."""
    c = H[m, _NBINS]
    if m <= k:
        return c * (k + 1)
    return c * (2 * m - k - 1) + 2 * H[m, _NBINS + 1 + m - k]


@njit(nogil=True, cache=True)
def _rice_cost(H, k, maxm):
    """Exact bits of mode 2 (Golomb-Rice_k, EG_k escape) over the symbols histogrammed in H
    (summarized; largest bit length maxm).

    For u of bit length m: m <= k costs k + 1 bits; k < m <= k + 4 costs (u >> k) + 1 + k,
    where u >> k is the top m - k bits of u, read off the top-4-bits columns; m > k + 4
    means u >= 16 * 2**k, an escape: RICE_ESC + EG_k(u), as in _eg_cost.
    """
    total = 0
    for m in range(maxm + 1):
        if m <= k or H[m, _NBINS] == 0:
            total += H[m, _NBINS] * (k + 1)
        elif m <= k + 4:
            sh = 4 - (m - k)
            for j in range(_TOP):
                total += H[m, _GCOL + j] * ((j >> sh) + 1 + k)
        else:
            total += H[m, _NBINS] * RICE_ESC + _eg_row_cost(H, m, k)
    return total


@njit(nogil=True, cache=True)
def _best_order(H, maxm, rice):
    """(k, bits) minimising EG_k bits (mode 2's with rice) for the summarized histogram;
    ties go to the smaller k. Orders past maxm (the largest bit length) only add bits."""
    best_k = 0
    best = _rice_cost(H, 0, maxm) if rice else _eg_cost(H, 0, maxm)
    for k in range(1, min(maxm, K_MAX) + 1):
        c = _rice_cost(H, k, maxm) if rice else _eg_cost(H, k, maxm)
        if c < best:
            best = c
            best_k = k
    return best_k, best


@njit(nogil=True, cache=True)
def _summarize(H):
    """Row totals and suffix sums of H[:, :33] into H[:, 33:]; returns the largest m seen.

    Row m counts symbols of m bits, whose leading ones t are at most m: its suffix sums
    past t = m stay as they are, zero in a cleared H."""
    maxm = 0
    for m in range(_NBINS):
        acc = 0
        for t in range(m, -1, -1):
            acc += H[m, t]
            H[m, _NBINS + 1 + t] = acc
        H[m, _NBINS] = acc
        if acc:
            maxm = m
    return maxm


@njit(nogil=True, cache=True)
def _best_k(H):
    """(k, bits, largest bit length) minimising EG_k bits for the histogram; ties go to the
    smaller k."""
    maxm = _summarize(H)
    best_k, best = _best_order(H, maxm, False)
    return best_k, best, maxm


@njit(nogil=True, cache=True)
def _nonzero_positions(scratch, cnt, pos):
    """pos[:m] := the positions of the nonzero symbols of scratch[:cnt], in order; returns
    m. Branch-free (always store, advance on nonzero): zeros and nonzeros are unpredictable.
    """
    m = np.uint64(0)  # unsigned indices: no wraparound checks
    for j in range(cnt):
        pos[m] = j
        m += np.uint64(scratch[j] != 0)
    return np.int64(m)


# Which way a block is histogrammed (_choose_code). From its nonzeros alone (_zero_run_hists
# with H, every code's histograms in one pass) when a sample of it (SAMPLE_RUNS runs of
# SAMPLE_RUN symbols, evenly spaced) says zero runs are likely to be tried and pay: the
# sample is at least SURE_SHARE zeros; or it is at least SPARSE_SHARE zeros and the last
# block this thread tried in zero runs came within 1/RUNS_CLOSE of its best other code's
# bits in that mode (RUNS_CLOSE, a tensor's blocks are alike); or it is at least WON_SHARE
# zeros (just below the third of zeros that "auto" asks of a zero-run block) and zero runs
# won that block (RUNS_WON: ReLU gradients with wide values win in zero runs with 40%
# zeros). Else the plain histogram first, then the run histograms only where the zero-run
# bound says that mode could win: cheaper where it cannot (a GG tensor of shape 1 at 2 bits
# per element is 40% zeros, and zero runs never win there, though they come close). Both
# ways give the same histograms, so these guesses move time, never bits.
SAMPLE_RUNS = 16
SAMPLE_RUN = 16
SPARSE_SHARE = 0.5
WON_SHARE = 0.3
SURE_SHARE = 0.75
RUNS_FAR = 0  # verdicts on a block's zero runs: not tried, or far from its best other code
RUNS_CLOSE = 1  # within 1/CLOSE_FRACTION of it
RUNS_WON = 2  # cheaper: the block was coded in zero runs
CLOSE_FRACTION = 8


@njit(nogil=True, cache=True)
def _sample_zero_share(scratch, cnt):
    """The share of zeros in a sample of scratch[:cnt] (all of it when short), 0 if empty."""
    if cnt < SAMPLE_RUNS * SAMPLE_RUN:
        n = cnt
        z = 0
        for j in range(cnt):
            z += np.int64(scratch[j] == 0)
    else:
        n = SAMPLE_RUNS * SAMPLE_RUN
        z = 0
        gap = cnt // SAMPLE_RUNS
        for r in range(SAMPLE_RUNS):
            run = scratch[r * gap:r * gap + SAMPLE_RUN]
            for j in range(SAMPLE_RUN):
                z += np.int64(run[j] == 0)
    return z / n if n > 0 else 0.0


@njit(nogil=True, cache=True)
def _zero_run_hists(scratch, cnt, Hrun, Hval, pos, Trun, Tval, H, T, with_h):
    """Histograms of the zero-run mode's two symbol streams; with with_h, also the block's
    plain histogram H (as _histogram makes it, T its small-symbol tables). Returns the
    count of nonzeros, whose positions are left in pos.

    Branch-free where the data is unpredictable: the nonzero positions are compacted
    first (always store, advance on nonzero), then runs are their gaps; only the nonzeros
    are visited after that, which makes this the cheap way to histogram a sparse block.
    """
    Hrun[:, :] = 0
    Hval[:, :] = 0
    _clear_small(Trun)
    _clear_small(Tval)
    if with_h:
        H[:, :] = 0
        _clear_small(T)
    m = np.uint64(_nonzero_positions(scratch, cnt, pos))
    prev = -1
    top_run = np.uint64(0)  # the ORs of what the tables count (see _fold_small)
    top_u = np.uint64(0)
    for i in range(m):
        p = np.int64(pos[i])
        run = np.uint64(p - prev - 1)
        u = np.uint64(scratch[np.uint64(p)])
        v = u - np.uint64(1)
        top_run |= run
        top_u |= u
        lane = (np.uint64(i) & np.uint64(3)) * np.uint64(_LANE)
        if run < _SMALL:
            Trun[lane + run] += 1
        else:
            _hist_add(Hrun, np.int64(run))
        if v < _SMALL:
            Tval[lane + v] += 1
        else:
            _hist_add(Hval, np.int64(v))
        if with_h:
            if u < _SMALL:
                T[lane + u] += 1
            else:
                _hist_add(H, np.int64(u))
        prev = p
    if cnt - 1 - prev > 0:
        _hist_add(Hrun, cnt - 1 - prev)
    _fold_small(Trun, Hrun, top_run)
    _fold_small(Tval, Hval, top_u)  # v < u
    if with_h:
        T[0] = cnt - np.int64(m)
        _fold_small(T, H, top_u)
    return np.int64(m)


# --------------------------------------------------------------------------- writer


@njit(nogil=True, cache=True)
def _put(ptr, p, acc, nacc, val, nbits):
    """Append nbits (1..56) bits of val, MSB first, at byte p holding nacc (< 8) bits.

    Branch-free: the pending bits are stored as a whole 64-bit word every time and the
    partial last byte is rewritten by the next store, so out needs 8 bytes of slack.
    """
    acc = (acc << nbits) | val
    nacc += nbits
    store_be64(ptr, p, acc << (64 - nacc))
    p += nacc >> 3
    return p, acc, nacc & 7


@njit(nogil=True, cache=True)
def _put_eg(ptr, p, acc, nacc, u, k):
    """Append the order-k Exp-Golomb codeword of u: (nb - 1 - k) zeros, then u + 2**k."""
    c = u + (np.int64(1) << k)
    nb = 64 - clz64(c)
    length = 2 * nb - 1 - k
    if length <= 32:
        return _put(ptr, p, acc, nacc, c, length)
    p, acc, nacc = _put(ptr, p, acc, nacc, np.int64(0), length - nb)
    return _put(ptr, p, acc, nacc, c, nb)


@njit(nogil=True, cache=True)
def _put_rice(ptr, p, acc, nacc, u, k):
    """Append u's mode-2 codeword: q = u >> k zeros, then 2**k + (u mod 2**k) in k + 1 bits
    (q < RICE_ESC); else RICE_ESC zeros and the order-k EG codeword of u."""
    q = u >> k
    if q >= RICE_ESC:
        p, acc, nacc = _put(ptr, p, acc, nacc, np.int64(0), RICE_ESC)
        return _put_eg(ptr, p, acc, nacc, u, k)
    one_k = np.int64(1) << k
    c = one_k | (u & (one_k - 1))
    length = q + 1 + k
    if length <= 32:
        return _put(ptr, p, acc, nacc, c, length)
    p, acc, nacc = _put(ptr, p, acc, nacc, np.int64(0), q)  # q > 0 here: k + 1 <= 31
    return _put(ptr, p, acc, nacc, c, k + 1)


@njit(nogil=True, cache=True, inline="always")
def _zr_pair(run, v, krun, k, rice):
    """A zero-run block's pair (EG_krun(run), then v's codeword) as one codeword:
    (bits, length, whether it fits in 56 bits; bits are only valid where it does)."""
    one_k = np.int64(1) << k
    l_run = _eg_len(run, krun)
    if rice:
        q = v >> k
        c_val = one_k | (v & (one_k - 1))
        l_val = q + 1 + k
        fits = q < RICE_ESC
    else:
        c_val = v + one_k
        l_val = _eg_len(v, k)
        fits = l_val <= 32  # c_val then holds the whole codeword
    n = l_run + l_val
    fits = fits & (n <= 56)
    return (((run + (np.int64(1) << krun)) << l_val) | c_val) if fits else np.int64(0), n, fits


@njit(nogil=True, cache=True)
def _put_pair(ptr, p, acc, nacc, run, v, krun, k, rice):
    """Append a zero-run block's pair (run, value v = u - 1): one store where it fits."""
    c, n, fits = _zr_pair(run, v, krun, k, rice)
    if fits:
        return _put(ptr, p, acc, nacc, c, n)
    p, acc, nacc = _put_eg(ptr, p, acc, nacc, run, krun)
    if rice:
        return _put_rice(ptr, p, acc, nacc, v, k)
    return _put_eg(ptr, p, acc, nacc, v, k)


@njit(nogil=True, cache=True)
def _rice_quads(scratch, cnt, k, C, L):
    """C[i], L[i] := the mode-2 codewords of symbols 4i .. 4i+3 of scratch joined, and their
    total bits, for every whole group of four; L[i] := 64 where one of them is an escape.
    C[i] is meaningful only where L[i] <= 56. No branch and no call: LLVM vectorizes the
    loop (variable 64-bit shifts, masked so that every shift is defined)."""
    one_k = np.int64(1) << k
    mask = one_k - 1
    kp1 = k + 1
    for i in range(cnt >> 2):
        u0 = np.int64(scratch[4 * i])
        u1 = np.int64(scratch[4 * i + 1])
        u2 = np.int64(scratch[4 * i + 2])
        u3 = np.int64(scratch[4 * i + 3])
        l1 = (u1 >> k) + kp1
        l2 = (u2 >> k) + kp1
        l3 = (u3 >> k) + kp1
        C[i] = (((((((one_k | (u0 & mask)) << (l1 & 63)) | one_k | (u1 & mask)) << (l2 & 63))
                  | one_k | (u2 & mask)) << (l3 & 63)) | one_k | (u3 & mask))
        escape = ((u0 | u1 | u2 | u3) >> k) >= RICE_ESC  # RICE_ESC is a power of two
        L[i] = 64 if escape else (u0 >> k) + kp1 + l1 + l2 + l3


@njit(nogil=True, cache=True)
def _write_block(scratch, cnt, mode, k, krun, out, p, pos, nnz, quads):
    """Write one block's codewords at byte p of out; returns (new p, bits written).

    Zero-run modes take the nonzeros' positions, pos[:nnz] (_nonzero_positions); mode 2
    uses quads (int64, 2 rows of at least cnt // 4) as work space.
    """
    p0 = p
    ptr = data_ptr(out)
    acc = np.int64(0)
    nacc = np.int64(0)
    one_k = np.int64(1) << k
    j = 0
    # Four codewords per store when together they fit in 56 bits (the common case at a
    # few bits per element): the store and its bookkeeping are the cost. 56 bits and the
    # < 8 pending ones fit the 64-bit accumulator.
    if mode == MODE_EG:
        while j + 3 < cnt:
            c0 = np.int64(scratch[j]) + one_k
            c1 = np.int64(scratch[j + 1]) + one_k
            c2 = np.int64(scratch[j + 2]) + one_k
            c3 = np.int64(scratch[j + 3]) + one_k
            l0 = _eg_len(c0 - one_k, k)
            l1 = _eg_len(c1 - one_k, k)
            l2 = _eg_len(c2 - one_k, k)
            l3 = _eg_len(c3 - one_k, k)
            n = l0 + l1 + l2 + l3
            if n <= 56:
                p, acc, nacc = _put(ptr, p, acc, nacc,
                                    (((((c0 << l1) | c1) << l2) | c2) << l3) | c3, n)
            else:
                p, acc, nacc = _put_eg(ptr, p, acc, nacc, c0 - one_k, k)
                p, acc, nacc = _put_eg(ptr, p, acc, nacc, c1 - one_k, k)
                p, acc, nacc = _put_eg(ptr, p, acc, nacc, c2 - one_k, k)
                p, acc, nacc = _put_eg(ptr, p, acc, nacc, c3 - one_k, k)
            j += 4
        while j < cnt:
            p, acc, nacc = _put_eg(ptr, p, acc, nacc, np.int64(scratch[j]), k)
            j += 1
    elif mode == MODE_RICE:
        # the groups' codewords and lengths first, in a loop that vectorizes
        C, L = quads[0], quads[1]
        _rice_quads(scratch, cnt, k, C, L)
        for i in range(cnt >> 2):
            n = L[i]
            if n <= 56:
                p, acc, nacc = _put(ptr, p, acc, nacc, C[i], n)
            else:
                for j in range(4 * i, 4 * i + 4):
                    p, acc, nacc = _put_rice(ptr, p, acc, nacc, np.int64(scratch[j]), k)
        for j in range(cnt & ~3, cnt):
            p, acc, nacc = _put_rice(ptr, p, acc, nacc, np.int64(scratch[j]), k)
    else:  # the nonzeros, from their positions pos[:nnz]: (run, value) pairs
        rice = mode == MODE_ZERO_RUNS_RICE
        prev = np.int64(-1)
        i = 0
        # two pairs per store when together they fit (the common case)
        while i + 1 < nnz:
            j0 = np.int64(pos[i])
            j1 = np.int64(pos[i + 1])
            c0, l0, f0 = _zr_pair(j0 - prev - 1, np.int64(scratch[j0]) - 1, krun, k, rice)
            c1, l1, f1 = _zr_pair(j1 - j0 - 1, np.int64(scratch[j1]) - 1, krun, k, rice)
            if f0 & f1 & (l0 + l1 <= 56):
                p, acc, nacc = _put(ptr, p, acc, nacc, (c0 << l1) | c1, l0 + l1)
            else:
                p, acc, nacc = _put_pair(ptr, p, acc, nacc, j0 - prev - 1,
                                         np.int64(scratch[j0]) - 1, krun, k, rice)
                p, acc, nacc = _put_pair(ptr, p, acc, nacc, j1 - j0 - 1,
                                         np.int64(scratch[j1]) - 1, krun, k, rice)
            prev = j1
            i += 2
        if i < nnz:
            j = np.int64(pos[i])
            p, acc, nacc = _put_pair(ptr, p, acc, nacc, j - prev - 1, np.int64(scratch[j]) - 1,
                                     krun, k, rice)
            prev = j
        if cnt - 1 - prev > 0:
            p, acc, nacc = _put_eg(ptr, p, acc, nacc, cnt - 1 - prev, krun)
    bits = (p - p0) * 8 + nacc
    # The last store already wrote the partial byte, zero-padded.
    return p + (nacc > 0), bits


@njit(nogil=True, cache=True)
def worst_case_bytes(cnt, zero_runs):
    """Upper bound of one block's bytes, padding included.

    An EG codeword has at most 63 bits. In zero-run mode a nonzero costs its value
    codeword (<= 63 bits) plus the run before it (runs <= MAX_BLOCK_SIZE: <= 45 bits);
    the mode is only chosen automatically when it is no longer than plain EG.
    """
    per = 108 if (zero_runs & 3) == 2 else 63  # NO_RANS may be added to zero_runs
    return (cnt * per + 7) // 8 + 8


@njit(nogil=True, cache=True)
def _eg_len(v, k):
    """Bits of the order-k Exp-Golomb codeword of v >= 0."""
    return 2 * (63 - clz64(v + (np.int64(1) << k))) - k + 1


@njit(nogil=True, cache=True)
def _rice_len(v, k):
    """Bits of the mode-2 codeword of v >= 0 (non-decreasing in v)."""
    q = v >> k
    return q + 1 + k if q < RICE_ESC else RICE_ESC + _eg_len(v, k)


@njit(nogil=True, cache=True)
def _zero_runs_bound(scratch, cnt, T, H, zeros):
    """A lower bound of the zero-run mode's bits for the block, in one light pass.

    The mode is chosen only when its exact bits (run codewords plus value codewords) are
    below plain EG's, so where this bound already reaches EG's bits the run histograms
    (the costliest part of choosing a block's code) need not be built: the choice is the
    same. Runs: there is one run codeword per nonzero, plus one for trailing zeros; counting
    the maximal runs of zeros of length >= 1, 2 and 3 bounds their EG lengths for every
    order (k_run = 0: 1, 3, 5 bits from lengths 0, 1, 3; k_run = 1: 2, 4 bits from 0, 2;
    k_run >= 2: 3 bits or more). Values: nonzero u is sent as u - 1 in EG or mode 2's code,
    whichever is smaller; u below 64 is exact from the small-symbol tables T of the
    histogram pass, larger u costs at least what 63 costs (both lengths grow with u). H
    must be summarized (row totals in column 33).
    """
    # Windows of 2, 3, 4 consecutive zeros (P2, P3, P4): a maximal run of length L holds
    # L - 1, L - 2, L - 3 of them, so zeros - P2 runs have length >= 1, P2 - P3 length
    # >= 2, P3 - P4 length >= 3. Branch-free 32-bit counts: the loop vectorizes.
    p2 = np.uint32(0)
    p3 = np.uint32(0)
    p4 = np.uint32(0)
    for j in range(cnt - 3):
        ab = np.uint32(scratch[j] == 0) & np.uint32(scratch[j + 1] == 0)
        abc = ab & np.uint32(scratch[j + 2] == 0)
        p2 = np.uint32(p2 + ab)
        p3 = np.uint32(p3 + abc)
        p4 = np.uint32(p4 + (abc & np.uint32(scratch[j + 3] == 0)))
    for j in range(max(cnt - 3, 0), cnt - 1):  # windows that end in the last positions
        ab = np.uint32(scratch[j] == 0) & np.uint32(scratch[j + 1] == 0)
        p2 = np.uint32(p2 + ab)
        if j + 2 < cnt:
            p3 = np.uint32(p3 + (ab & np.uint32(scratch[j + 2] == 0)))
    r1 = zeros - np.int64(p2)
    r2 = np.int64(p2) - np.int64(p3)
    r3 = np.int64(p3) - np.int64(p4)
    nnz = cnt - zeros
    runs = nnz + np.int64(cnt > 0 and scratch[cnt - 1] == 0)
    run_lb = min(runs + 2 * r1 + 2 * r3, 2 * runs + 2 * r2, 3 * runs)
    maxm = 0
    for m in range(_NBINS):
        if H[m, _NBINS]:
            maxm = m
    small = 0
    for u in range(1, _BOUND_SMALL):
        small += T[u] + T[_LANE + u] + T[2 * _LANE + u] + T[3 * _LANE + u]
    large = nnz - small
    best = np.int64(-1)
    for k in range(min(maxm, K_MAX) + 1):
        c = large * _eg_len(np.int64(_BOUND_SMALL - 1), k)
        cr = large * _rice_len(np.int64(_BOUND_SMALL - 1), k)  # the values in mode 2's code
        for u in range(1, _BOUND_SMALL):
            n = T[u] + T[_LANE + u] + T[2 * _LANE + u] + T[3 * _LANE + u]
            if n:
                c += n * _eg_len(np.int64(u - 1), k)
                cr += n * _rice_len(np.int64(u - 1), k)
        c = min(c, cr)
        if best < 0 or c < best:
            best = c
    return run_lb + best


@njit(nogil=True, cache=True)
def _best_code(H, k_fixed):
    """(Golomb-Rice?, k, bits) for the symbols histogrammed in H: EG at a fixed order
    (k_fixed >= 0), else the cheaper of EG and mode 2's code at their best orders (ties to
    EG)."""
    if k_fixed >= 0:
        return False, k_fixed, _eg_cost(H, k_fixed, _summarize(H))
    k, bits, maxm = _best_k(H)
    kr, rice_bits = _best_order(H, maxm, True)
    if rice_bits < bits:
        return True, kr, rice_bits
    return False, k, bits


@njit(nogil=True, cache=True)
def _choose_code(scratch, cnt, k_fixed, zero_runs, H, Hrun, Hval, Ts, pos, runs_hint):
    """The code of one block of u-symbols (scratch[:cnt]): (mode, k, k_run, bits, zeros,
    runs_hint for the next block), zeros being the block's count of 0 symbols.

    Exact, whichever way the histograms are made (see SPARSE_SHARE): a block that looks
    sparse, where runs_hint (the previous block's verdict: RUNS_FAR, RUNS_CLOSE or
    RUNS_WON) or its sample says zero runs may pay, is histogrammed from its nonzeros
    alone, every code's at once; others get the plain histogram, and the run histograms
    only where the zero-run bound says that mode could win. Zero-run modes leave the
    nonzeros' positions in pos. Ts: three small-symbol tables (see _work_arrays).
    """
    T, Trun, Tval = Ts[0], Ts[1], Ts[2]
    runs = zero_runs == 2
    if zero_runs == 1:
        share = _sample_zero_share(scratch, cnt)
        runs = (share >= SURE_SHARE or (runs_hint >= RUNS_CLOSE and share >= SPARSE_SHARE)
                or (runs_hint == RUNS_WON and share >= WON_SHARE))
    if runs:
        zeros = cnt - _zero_run_hists(scratch, cnt, Hrun, Hval, pos, Trun, Tval, H, T, True)
    else:
        _histogram(scratch, cnt, H, T)
        zeros = H[0, 0]
    rice, k, bits = _best_code(H, k_fixed)
    mode = MODE_RICE if rice else MODE_EG
    krun = 0
    if zero_runs == 1 and not runs:
        runs_hint = RUNS_FAR
        if zero_runs_considered(zeros, cnt) and _zero_runs_bound(scratch, cnt, T, H, zeros) < bits:
            _zero_run_hists(scratch, cnt, Hrun, Hval, pos, Trun, Tval, H, T, False)
            runs = True
    if runs:
        krun, run_bits, _ = _best_k(Hrun)
        rice, kv, val_bits = _best_code(Hval, k_fixed)
        # "auto" considers zero runs only for blocks a third zeros or more, however the
        # histograms were made (a sample can look sparser than its block)
        tried = zero_runs == 2 or zero_runs_considered(zeros, cnt)
        close = CLOSE_FRACTION * (run_bits + val_bits) < (CLOSE_FRACTION + 1) * bits
        if tried and (zero_runs == 2 or run_bits + val_bits < bits):
            mode = MODE_ZERO_RUNS_RICE if rice else MODE_ZERO_RUNS
            k = kv
            bits = run_bits + val_bits
            runs_hint = RUNS_WON
        else:
            krun = 0  # mode 0 and 2 blocks carry k_run = 0
            runs_hint = RUNS_CLOSE if tried and close else RUNS_FAR
    return mode, k, krun, bits, zeros, runs_hint


# --------------------------------------------------------------------------- mode 4


@register_jitable
def rans_table_bytes(n):
    """Bytes of a mode-4 block's frequency table for an alphabet of n symbols."""
    return (12 * (n - 1) + 7) // 8


@njit(nogil=True, cache=True)
def _rans_freqs(T, cnt, R):
    """Mode 4's frequency table of a block of cnt symbols from its small-symbol tables T
    (see _histogram): R[0] := the counts, R[1] := the frequencies, R[2] := their prefix sums
    (FORMAT.md, "Choices"). Returns the alphabet size n, 0 if a symbol is not below
    RANS_ALPHABET (mode 4 cannot code the block)."""
    total = 0
    n = 0
    fsum = 0
    big = 0
    for s in range(RANS_ALPHABET):
        c = T[s] + T[_LANE + s] + T[2 * _LANE + s] + T[3 * _LANE + s]
        R[0, s] = c
        total += c
        f = 0
        if c > 0:
            f = max(1, (c * RANS_M) // cnt)
            n = s + 1
        R[1, s] = f
        fsum += f
        if f > R[1, big]:
            big = s
    if total != cnt or cnt == 0:
        return 0
    R[1, big] += RANS_M - fsum
    c = 0
    for s in range(RANS_ALPHABET):
        R[2, s] = c
        c += R[1, s]
    return n


@njit(nogil=True, cache=True)
def _rans_estimate(R, n):
    """Mode 4's estimated bits in 1/2**RANS_FRAC (FORMAT.md, "Choices")."""
    e = np.int64(8 * (rans_table_bytes(n) + 16)) << RANS_FRAC
    for s in range(n):
        e += R[0, s] * RANS_LOG[R[1, s]]
    return e


@njit(nogil=True, cache=True)
def _rans_divisors(freq, cum, tab):
    """tab[s] := what the encoder's step needs for symbol s of frequency freq[s] > 0: (the
    state bound f << 20 above which a word is emitted, the reciprocal m's low 32 bits, a
    mask standing for its 33rd bit, the shift l, cum[s], RANS_M - f).

    floor(x / f) for 0 <= x < 2**32 is floor(x * m / 2**(32 + l)) with l = ceil(log2 f)
    and m = ceil(2**(32 + l) / f) < 2**33 (Granlund and Montgomery, "Division by invariant
    integers using multiplication", 1994, theorem 4.2); with m = 2**32 * m_hi + m_lo that is
    ((x * m_lo >> 32) + m_hi * x) >> l in 64-bit integers.
    """
    for s in range(RANS_ALPHABET):
        f = freq[s]
        if f == 0:
            tab[s, :] = 0
            continue
        sh = 0
        while (1 << sh) < f:
            sh += 1
        m = ((np.int64(1) << (32 + sh)) + f - 1) // f
        tab[s, 0] = np.uint64(f << 20)
        tab[s, 1] = np.uint64(m & 0xFFFFFFFF)
        tab[s, 2] = np.uint64(0xFFFFFFFF) if m >> 32 else np.uint64(0)
        tab[s, 3] = np.uint64(sh)
        tab[s, 4] = np.uint64(cum[s])
        tab[s, 5] = np.uint64(RANS_M - f)


@njit(nogil=True, cache=True, inline="always")
def _rans_put(x, u, tab, W, nw):
    """One encoder step of a state x (uint64) on symbol u (FORMAT.md, mode 4): (new x, new
    word count), the emitted word stored at W[W.size - 1 - nw].

    Branch-free and division-free: the word is always stored (W has a spare slot below its
    words) and counted only when emitted; the quotient by f is a multiply and shifts
    (_rans_divisors).
    """
    t = tab[u]
    emit = x >= t[0]
    W[np.uint64(W.size - 1) - nw] = np.uint16(x & np.uint64(0xFFFF))
    nw += np.uint64(emit)
    x = (x >> np.uint64(16)) if emit else x
    q = (((x * t[1]) >> np.uint64(32)) + (x & t[2])) >> t[3]
    return q * t[5] + x + t[4], nw  # q * RANS_M + (x - q * f) + cum


@njit(nogil=True, cache=True)
def _rans_encode(scratch, cnt, R, W):
    """Code scratch[:cnt] with the table in R (_rans_freqs): the words go to the end of W
    (W[W.size - nw:], in reading order), the final states to R[3, :4]. Returns nw."""
    tab = np.empty((RANS_ALPHABET, 6), np.uint64)
    _rans_divisors(R[1], R[2], tab)
    x0 = np.uint64(RANS_L)
    x1 = np.uint64(RANS_L)
    x2 = np.uint64(RANS_L)
    x3 = np.uint64(RANS_L)
    nw = np.uint64(0)
    j = cnt - 1
    while j >= 0 and (j & 3) != 3:  # the last partial group, state j & 3
        u = np.uint64(scratch[j])
        if (j & 3) == 2:
            x2, nw = _rans_put(x2, u, tab, W, nw)
        elif (j & 3) == 1:
            x1, nw = _rans_put(x1, u, tab, W, nw)
        else:
            x0, nw = _rans_put(x0, u, tab, W, nw)
        j -= 1
    while j >= 3:  # symbols are below RANS_ALPHABET: unsigned indices skip wraparound checks
        x3, nw = _rans_put(x3, np.uint64(scratch[j]), tab, W, nw)
        x2, nw = _rans_put(x2, np.uint64(scratch[j - 1]), tab, W, nw)
        x1, nw = _rans_put(x1, np.uint64(scratch[j - 2]), tab, W, nw)
        x0, nw = _rans_put(x0, np.uint64(scratch[j - 3]), tab, W, nw)
        j -= 4
    R[3, 0] = np.int64(x0)
    R[3, 1] = np.int64(x1)
    R[3, 2] = np.int64(x2)
    R[3, 3] = np.int64(x3)
    return np.int64(nw)


@njit(nogil=True, cache=True)
def _rans_try(scratch, cnt, k_fixed, zero_runs, T, R, W, bits):
    """Mode 4 for a block whose other modes' best is bits: (alphabet size n, words nw,
    bit length) where mode 4 is used (FORMAT.md, "Choices"), else (0, 0, 0). Leaves the
    table in R and the words in W."""
    if k_fixed >= 0 or (zero_runs & 3) == 2 or (zero_runs & NO_RANS) != 0:
        return 0, 0, 0
    n = _rans_freqs(T, cnt, R)
    if n == 0 or RANS_MARGIN * _rans_estimate(R, n) >= (RANS_MARGIN - 1) * (bits << RANS_FRAC):
        return 0, 0, 0
    nw = _rans_encode(scratch, cnt, R, W)
    rbits = 8 * (rans_table_bytes(n) + 16 + 2 * nw)
    if RANS_MARGIN * rbits >= (RANS_MARGIN - 1) * bits:
        return 0, 0, 0
    return n, nw, rbits


@njit(nogil=True, cache=True)
def rans_bits(s, counts, out):
    """out[b] := the bit length mode 4 gives block b, whose symbols are the next counts[b]
    of s (int32, all below RANS_ALPHABET): what the encoder compares against the other
    modes (the rate's mirror of the codec on devices other than the CPU uses it)."""
    n_max = max(1, counts.max()) if counts.size else 1
    T = np.zeros(4 * _LANE, np.int64)
    R = np.zeros((4, RANS_ALPHABET), np.int64)
    W = np.empty(n_max + 8, np.uint16)
    a = 0
    for b in range(counts.size):
        cnt = counts[b]
        blk = s[a:a + cnt]
        T[:] = 0
        for j in range(cnt):
            T[blk[j]] += 1
        n = _rans_freqs(T, cnt, R)
        out[b] = 8 * (rans_table_bytes(n) + 16 + 2 * _rans_encode(blk, cnt, R, W)) if n else -1
        a += cnt


@njit(nogil=True, cache=True)
def _write_rans(out, p, n, R, W, nw):
    """Write a mode-4 block (the table and states in R, the words at the end of W) at byte
    p of out; returns the new byte position."""
    ptr = data_ptr(out)
    q = p
    acc = np.int64(0)
    nacc = np.int64(0)
    for s in range(n - 1):
        q, acc, nacc = _put(ptr, q, acc, nacc, R[1, s], 12)
    q = p + rans_table_bytes(n)
    for i in range(RANS_STATES):
        x = R[3, i]
        for b in range(4):
            out[q + b] = np.uint8((x >> (8 * b)) & 0xFF)
        q += 4
    for w in range(W.size - nw, W.size):  # little-endian u16 words
        out[q] = np.uint8(W[w] & 0xFF)
        out[q + 1] = np.uint8(W[w] >> 8)
        q += 2
    return q


@njit(nogil=True, cache=True)
def _code_block(scratch, cnt, k_fixed, zero_runs, H, Hrun, Hval, Ts, pos, R, W, quads, out, p,
                meta, b, nexc, runs_hint):
    """Choose the codes of one block of u-symbols (scratch[:cnt]) and write it at byte p.

    meta[b] receives (mode, k, k_run, bit length, exception count). Returns the new byte
    position, or -1 if out is too small (nothing is written past its end), and the
    runs_hint for the next block (_choose_code). R and W are mode 4's work arrays, quads
    the mode-2 writer's (_work_arrays).
    """
    mode, k, krun, bits, zeros, runs_hint = _choose_code(scratch, cnt, k_fixed, zero_runs & 3,
                                                         H, Hrun, Hval, Ts, pos, runs_hint)
    if p + worst_case_bytes(cnt, zero_runs) > out.size:
        return -1, runs_hint
    n, nw, rbits = _rans_try(scratch, cnt, k_fixed, zero_runs, Ts[0], R, W, bits)
    if n > 0:
        mode, k, krun, bits = MODE_RANS, n - 1, 0, rbits
        p0 = p
        p = _write_rans(out, p, n, R, W, nw)
        written = 8 * (p - p0)
    else:
        p, written = _write_block(scratch, cnt, mode, k, krun, out, p, pos, cnt - zeros,
                                  quads)
    meta[b, 0] = mode
    meta[b, 1] = k
    meta[b, 2] = krun
    meta[b, 3] = written
    meta[b, 4] = nexc
    if written != bits:  # the cost model and the writer disagree: a bug, never data
        meta[b, 3] = -1
    return p, runs_hint


@njit(nogil=True, cache=True)
def _work_arrays(counts, b_lo, b_hi):
    """An encoder's per-thread work arrays: (u-symbols, H, Hrun, Hval, three small-symbol
    tables, positions, mode 4's table rows R and its words W, the mode-2 writer's groups)."""
    n = max(1, counts[b_lo:b_hi].max()) if b_hi > b_lo else 1
    return (np.empty(n, np.int32), np.zeros((_NBINS, _HCOLS), np.int64),
            np.zeros((_NBINS, _HCOLS), np.int64), np.zeros((_NBINS, _HCOLS), np.int64),
            np.zeros((3, 4 * _LANE), np.int64), np.empty(n, np.int32),
            np.zeros((4, RANS_ALPHABET), np.int64), np.empty(n + 8, np.uint16),
            np.empty((2, n // 4 + 1), np.int64))


@njit(nogil=True, cache=True)
def encode_blocks(x, starts, counts, invs, lims, b_lo, b_hi, k_fixed, zero_runs, out, meta):
    """Quantize and encode blocks [b_lo, b_hi) of x back to back into out.

    Block b holds x[starts[b] : starts[b] + counts[b]], quantized with step 1 / invs[b];
    |x * invs[b]| > lims[b] is an exception.

    k_fixed: -1 picks each block's k; 0..K_MAX forces it (for values; runs always auto).
    zero_runs: 0 never, 1 when it saves bits, 2 always; plus NO_RANS to leave mode 4 out.
    With k_fixed = -1 and zero_runs 0 or 1, mode 4 is used where it saves more than
    1/RANS_MARGIN of a block's bits.
    meta[b] receives (mode, k, k_run, bit length, exception count).
    out must hold sum(worst_case_bytes(count, zero_runs)) over the blocks. Returns bytes
    written, or -1 if out is too small (nothing is written past its end).
    """
    scratch, H, Hrun, Hval, Ts, pos, R, W, quads = _work_arrays(counts, b_lo, b_hi)
    p = 0
    hint = RUNS_WON  # the first block looks at its sample
    for b in range(b_lo, b_hi):
        cnt = counts[b]
        nexc = _quantize_to(x, starts[b], cnt, invs[b], lims[b], scratch)
        p, hint = _code_block(scratch, cnt, k_fixed, zero_runs, H, Hrun, Hval, Ts, pos, R, W,
                              quads, out, p, meta, b, nexc, hint)
        if p < 0:
            return -1
    return p


@njit(nogil=True, cache=True, inline="always")
def _finite_abs(xd):
    """(|xd|, 0) for finite xd, else (0.0, 1): one term of a block's statistics."""
    fin = np.isfinite(xd)
    return (abs(xd) if fin else 0.0), np.int64(not fin)


# Reassociation lets LLVM vectorize the sums (each rank's sums are only ever gathered and
# added in rank order, so their rounding need not match across machines). No other
# fast-math flag: non-finite values must be seen as such.
@njit(nogil=True, cache=True, fastmath={"reassoc"})
def _block_stats(gs, rs, feedback):
    """(sum of x^2, sum of |x|, non-finite count) of the finite x = g (+ r) of a block."""
    sumsq = 0.0
    sumabs = 0.0
    nonfinite = 0
    for j in range(gs.size):
        xd = np.float64(gs[j] + rs[j] if feedback else gs[j])
        a, bad = _finite_abs(xd)
        sumsq += a * a
        sumabs += a
        nonfinite += bad
    return sumsq, sumabs, nonfinite


@njit(nogil=True, cache=True)
def block_moments(x, r, starts, counts, b_lo, b_hi, stats):
    """stats[b] := _block_stats of block b of x (+ r, if r is not empty), for [b_lo, b_hi)."""
    feedback = r.size > 0
    for b in range(b_lo, b_hi):
        lo = starts[b]
        hi = lo + counts[b]
        sumsq, sumabs, nonfinite = _block_stats(x[lo:hi], r[lo:hi] if feedback else r,
                                                feedback)
        stats[b, 0] = sumsq
        stats[b, 1] = sumabs
        stats[b, 2] = nonfinite


@njit(nogil=True, cache=True)
def _quantize_feedback(g, r, start, cnt, inv, step, lim, scratch, q_out, q_sink, stats, b):
    """Error feedback, statistics and quantization of one block.

    x = g + r (float32; r is the error-feedback residual, or empty for none). Writes the
    u-symbols of rint(x / step) into scratch[:cnt], the new residual x - q * step into r
    (x itself where x is an exception: non-finite or |x / step| > lim), q into q_out (if
    not empty), and the block's statistics of the finite x (sum of squares, sum of
    magnitudes, count of non-finite values) into stats[b]. With feedback this is one pass
    over the block; without, the block is read twice, the second time from cache. q_sink
    (int32, at least cnt) is scratch. Returns the exception count.
    """
    feedback = r.size > 0
    gs = g[start:start + cnt]
    if feedback:  # q goes to q_out in the same pass, or to q_sink (block-sized scratch)
        rs = r[start:start + cnt]
        qs = q_out[start:start + cnt] if q_out.size > 0 else q_sink[:cnt]
        nexc, sumsq, sumabs, nonfinite = _quantize_residual(gs, rs, inv, step, lim, scratch,
                                                            qs)
        stats[b, 0] = sumsq
        stats[b, 1] = sumabs
        stats[b, 2] = nonfinite
        return nexc
    sumsq, sumabs, nonfinite = _block_stats(gs, r, False)
    stats[b, 0] = sumsq
    stats[b, 1] = sumabs
    stats[b, 2] = nonfinite
    nexc = _quantize_to(g, start, cnt, inv, lim, scratch)
    if q_out.size > 0:
        qs = q_out[start:start + cnt]
        for j in range(cnt):  # from the symbols: q = (u + 1) / 2 (odd u), -u / 2 (even u)
            u = scratch[j]
            h = (u + 1) >> 1
            sgn = (u & 1) - 1
            qs[j] = (h ^ sgn) - sgn
    return nexc


# Reassociation lets LLVM vectorize the statistics' sums (see _block_stats); the per-element
# arithmetic has nothing to reassociate, so q and the residual are what they would be
# without it (the tests compare them with the reference bit for bit).
@njit(nogil=True, cache=True, fastmath={"reassoc"})
def _quantize_residual(gs, rs, inv, step, lim, scratch, qs):
    """u-symbols of x = gs + rs into scratch, q into qs; rs := x - q * step (x at
    exceptions, where q = 0). Returns (exception count, sum of x^2, sum of |x|, count of
    non-finite x), the sums over the finite x."""
    nexc = 0
    sumsq = 0.0
    sumabs = 0.0
    nonfinite = 0
    for j in range(gs.size):  # indices from 0: no wraparound checks, so it vectorizes
        xv = gs[j] + rs[j]
        xd = np.float64(xv)
        a, bad = _finite_abs(xd)
        sumsq += a * a
        sumabs += a
        nonfinite += bad
        v = xd * inv
        ok = abs(v) <= lim  # False for NaN and +-inf too
        nexc += np.int64(not ok)
        qf = np.rint(v if ok else 0.0)
        q = np.int32(qf)
        qs[j] = q
        scratch[j] = 2 * q - 1 if q > 0 else -2 * q
        rs[j] = np.float32(xd - qf * step) if ok else xv
    return nexc, sumsq, sumabs, nonfinite


@njit(nogil=True, cache=True)
def encode_blocks_feedback(g, r, starts, counts, invs, steps, lims, b_lo, b_hi, k_fixed,
                           zero_runs, out, meta, stats, q_out):
    """encode_blocks over x = g + r, fused with error feedback and statistics.

    One pass per block (see _quantize_feedback): the residual r is updated in place, q is
    kept in q_out if it is not empty, stats[b] gets the block's statistics. The frame bits
    are exactly those encode_blocks writes for x.
    """
    scratch, H, Hrun, Hval, Ts, pos, R, W, quads = _work_arrays(counts, b_lo, b_hi)
    p = 0
    hint = RUNS_WON  # the first block looks at its sample
    for b in range(b_lo, b_hi):
        cnt = counts[b]
        nexc = _quantize_feedback(g, r, starts[b], cnt, invs[b], steps[b], lims[b],
                                  scratch, q_out, pos, stats, b)
        p, hint = _code_block(scratch, cnt, k_fixed, zero_runs, H, Hrun, Hval, Ts, pos, R, W,
                              quads, out, p, meta, b, nexc, hint)
        if p < 0:
            return -1
    return p


@njit(nogil=True, cache=True)
def encode_blocks_int(s, starts, counts, qlims, b_lo, b_hi, k_fixed, zero_runs, out, meta):
    """encode_blocks of integers s (int64) at step 1: |s| > qlims[b] (int64, <= QMAX) become
    exceptions (u = 0)."""
    scratch, H, Hrun, Hval, Ts, pos, R, W, quads = _work_arrays(counts, b_lo, b_hi)
    p = 0
    hint = RUNS_WON  # the first block looks at its sample
    for b in range(b_lo, b_hi):
        cnt = counts[b]
        ss = s[starts[b]:starts[b] + cnt]
        qlim = qlims[b]
        nexc = 0
        for j in range(cnt):
            q = ss[j]
            ok = abs(q) <= qlim
            nexc += np.int64(not ok)
            q = q if ok else 0
            scratch[j] = 2 * q - 1 if q > 0 else -2 * q
        p, hint = _code_block(scratch, cnt, k_fixed, zero_runs, H, Hrun, Hval, Ts, pos, R, W,
                              quads, out, p, meta, b, nexc, hint)
        if p < 0:
            return -1
    return p


@njit(nogil=True, cache=True)
def find_exceptions(x, starts, counts, invs, lims, positions):
    """Positions of the values the code cannot carry (|x * invs[b]| > lims[b], or not
    finite), in increasing order."""
    m = 0
    for b in range(starts.size):
        inv = invs[b]
        lim = lims[b]
        for i in range(starts[b], starts[b] + counts[b]):
            if not abs(np.float64(x[i]) * inv) <= lim:
                positions[m] = i
                m += 1
    return m


# --------------------------------------------------------------------------- reader


@njit(nogil=True, cache=True)
def _peek(ptr, nbuf, pos):
    """The 64 bits of the nbuf-byte buffer at ptr from bit pos, MSB first.

    Bits past the buffer read as 0: nothing outside it is ever read.
    """
    byte = pos >> 3
    if byte + 8 <= nbuf:
        w = load_be64(ptr, byte)
    else:
        w = np.int64(0)
        for j in range(8):
            w = w << 8
            if byte + j < nbuf:
                w |= load_u8(ptr, byte + j)
    return w << (pos & 7)


@njit(nogil=True, cache=True)
def _read_eg(ptr, nbuf, pos, k):
    """Read one EG_k codeword at bit pos: (value, new pos, error code)."""
    w = _peek(ptr, nbuf, pos)
    z = clz64(w)
    if z > 31 - k:
        return np.int64(0), pos, ERR_CODE_TOO_LONG
    length = 2 * z + k + 1
    nb = z + k + 1
    if length <= 57:
        c = lshr(w, 64 - length)
    else:
        c = lshr(_peek(ptr, nbuf, pos + z), 64 - nb)
    return c - (np.int64(1) << k), pos + length, 0


@njit(nogil=True, cache=True)
def _read_rice(ptr, nbuf, pos, k):
    """Read one mode-2 codeword at bit pos: (value, new pos, error code)."""
    w = _peek(ptr, nbuf, pos)
    z = clz64(w)
    if z < RICE_ESC:
        length = z + 1 + k  # <= 46 bits: within the 64 peeked
        u = (np.int64(z) << k) + lshr(w, 64 - length) - (np.int64(1) << k)
        return u, pos + length, 0
    u, pos, err = _read_eg(ptr, nbuf, pos + RICE_ESC, k)
    if err == 0 and u < (np.int64(RICE_ESC) << k):  # has a shorter codeword: not canonical
        return u, pos, ERR_VALUE_RANGE
    return u, pos, err


# Table-driven decoding: for orders k <= LUT_K_MAX, the top LUT_BITS bits of the stream
# index a table entry holding up to four whole codewords found there (their symbols) and a
# byte beside the entries (their count and total length). One lookup then decodes ~2-4
# symbols at the 2-5 bits per element that gradients take.
LUT_BITS = 12
LUT_K_MAX = 8
LUT_SLOTS = 4
LUT_META = (1 << LUT_BITS) * 8  # a table's byte offset of its meta bytes, one per entry
LUT_SIZE = (1 << LUT_BITS) + (1 << LUT_BITS) // 8  # int64 words: entries, then meta bytes


@njit(nogil=True, cache=True)
def build_lut(k, table, rice=False):
    """Fill table[:LUT_SIZE] for order k (EG codewords; mode-2 ones with rice).

    Entry table[pat] (pat: the next LUT_BITS bits of the stream): the symbols of the
    whole codewords there, at most LUT_SLOTS, at bits 0, 16, 32, 48 (store_u16x4_i32
    widens the four 16-bit fields into four int32 at once; every symbol a codeword of at
    most LUT_BITS bits codes with k <= LUT_K_MAX is below 2**12). Byte LUT_META + pat of
    the table: their count (bits 0-2) and total bits (bits 3-6). Count 0 means the first
    codeword is longer than LUT_BITS bits (or the bits are all zero, which no valid stream
    has there): the caller decodes it the slow way.
    """
    meta = table.view(np.uint8)[LUT_META:]
    for pat in range(1 << LUT_BITS):
        used = 0
        n = 0
        entry = np.int64(0)
        while n < LUT_SLOTS:
            z = 0
            while used + z < LUT_BITS and (pat >> (LUT_BITS - 1 - used - z)) & 1 == 0:
                z += 1
            if rice:
                length = z + k + 1
                if used + length > LUT_BITS:
                    break
                c = (pat >> (LUT_BITS - used - length)) & ((1 << (k + 1)) - 1)
                sym = (z << k) + c - (1 << k)
            else:
                length = 2 * z + k + 1
                if used + length > LUT_BITS:
                    break
                nb = z + k + 1
                c = (pat >> (LUT_BITS - used - length)) & ((1 << nb) - 1)
                sym = c - (1 << k)
            entry |= np.int64(sym) << (16 * n)
            n += 1
            used += length
        table[pat] = entry
        meta[pat] = n | (used << 3)


@njit(nogil=True, cache=True)
def _read_symbol(ptr, nbuf, pos, k, rice):
    """Read one mode-0 (EG) or mode-2 (rice) codeword, checked: (u, new pos, error code)."""
    if rice:
        u, pos, err = _read_rice(ptr, nbuf, pos, k)
    else:
        u, pos, err = _read_eg(ptr, nbuf, pos, k)
    if err == 0 and u > UMAX:
        return u, pos, ERR_VALUE_RANGE
    return u, pos, err


@njit(nogil=True, cache=True)
def _decode_eg_slow(ptr, nbuf, pos, k, scratch, j0, cnt, rice):
    """Decode symbols j0..cnt-1 one codeword at a time: (new pos, error code)."""
    for j in range(j0, cnt):
        u, pos, err = _read_symbol(ptr, nbuf, pos, k, rice)
        if err:
            return pos, err
        scratch[j] = u
    return pos, 0


@njit(nogil=True, cache=True)
def _decode_eg(ptr, nbuf, pos, cnt, k, lut, scratch, rice):
    """Decode cnt EG_k symbols (mode-2 ones with rice) from bit pos into scratch: (new pos,
    error code).

    A 64-bit bit buffer is refilled without branches (an unaligned 8-byte load every
    iteration, F. Giesen's "variant 4"), so the serial dependency per step is a table
    lookup or a clz, not a load. Within 8 bytes of the buffer's end, and for codewords
    the fast paths do not cover, _read_eg (bounds-checked) takes over.
    """
    assert scratch.itemsize == 4  # int32 symbols: the table path stores them by address
    j = 0
    jlim = cnt - LUT_SLOTS  # the table path stores four slots at a time
    dst = data_ptr(scratch)
    tab = data_ptr(lut)
    blim = nbuf - 8  # last byte an 8-byte load may start at
    zfast = (31 - k) >> 1
    kp1 = k + 1
    one_k = np.int64(1) << k
    while j <= jlim and (pos >> 3) <= blim:
        # 8 * bytep == pos + bitcount, and bitcount < 64, hold from here on
        bytep = pos >> 3
        bitbuf = load_be64(ptr, bytep) << (pos & 7)
        bitcount = 56 - (pos & 7)
        bytep += 7
        if k <= LUT_K_MAX:
            while j <= jlim and bytep <= blim:
                bitbuf |= lshr(load_be64(ptr, bytep), bitcount)
                bytep += (63 - bitcount) >> 3
                bitcount |= 56
                idx = lshr(bitbuf, 64 - LUT_BITS)
                m = load_u8(tab, LUT_META + idx)
                n = m & 7
                if n == 0:
                    break
                used = m >> 3
                store_u16x4_i32(dst, j * 4, load_i64(tab, idx * 8))
                j += n
                bitbuf <<= used
                bitcount -= used
                pos += used
            if j > jlim:
                break
        z = clz64(bitbuf)
        if rice:
            length = z + kp1
            if z < RICE_ESC and length <= bitcount:
                u = (np.int64(z) << k) + lshr(bitbuf, 64 - length) - one_k
                if u <= UMAX:
                    scratch[j] = u
                    j += 1
                    pos += length
                    continue
            # an escape, a short window or a value out of range: the checked reader
            pos, err = _decode_eg_slow(ptr, nbuf, pos, k, scratch, j, j + 1, rice)
            if err:
                return pos, err
            j += 1
            continue
        if z > zfast or bitcount < 32:  # long (or corrupt) codeword, or a short window
            pos, err = _decode_eg_slow(ptr, nbuf, pos, k, scratch, j, j + 1, rice)
            if err:
                return pos, err
            j += 1
            continue
        length = 2 * z + kp1
        scratch[j] = lshr(bitbuf, 64 - length) - one_k
        j += 1
        pos += length
    return _decode_eg_slow(ptr, nbuf, pos, k, scratch, j, cnt, rice)


@njit(nogil=True, cache=True)
def _decode_zero_runs(ptr, nbuf, pos, cnt, k, krun, scratch, rice):
    """Decode a zero-run block's cnt symbols from bit pos into scratch: (new pos, error).

    Where 8 bytes can be loaded, one load serves the run and value codewords that lie
    whole in its bits (the common case); anything else (an escape, a long codeword, the
    buffer's end) goes through the checked readers.
    """
    one_run = np.int64(1) << krun
    one_k = np.int64(1) << k
    zrun = 31 - krun  # longest valid zero prefix of a run codeword
    blim = nbuf - 8  # last byte an 8-byte load may start at
    scratch[:cnt] = 0  # one vectorised fill; then only the nonzeros are written
    i = 0
    while i < cnt:
        if (pos >> 3) <= blim:
            # one load serves the codewords that lie whole in its 57 or more valid bits
            w = load_be64(ptr, pos >> 3) << (pos & 7)
            avail = 57
            while True:
                z = clz64(w)
                n = 2 * z + krun + 1
                if z > zrun or n > avail:
                    break
                run = lshr(w, 64 - n) - one_run
                if run > cnt - i:
                    return pos + n, ERR_RUN_LENGTH
                i += run
                pos += n
                if i == cnt:
                    return pos, 0
                avail -= n
                w <<= n
                v, n, fast = _zr_value_bits(w, avail, k, one_k, rice)
                if not fast:
                    v, pos, err = _read_zero_run_value(ptr, nbuf, pos, k, rice)
                    if err:
                        return pos, err
                    scratch[i] = v + 1
                    i += 1
                    avail = -1  # w is spent
                    break
                if v >= UMAX:
                    return pos + n, ERR_VALUE_RANGE
                scratch[i] = v + 1
                i += 1
                pos += n
                avail -= n
                w <<= n
                if i == cnt:
                    break
            if avail < 57:  # progress: load again at pos
                continue
        pos, i, err = _zero_run_pair(ptr, nbuf, pos, i, cnt, k, krun, scratch, rice)
        if err:
            return pos, err
    return pos, 0


@njit(nogil=True, cache=True, inline="always")
def _zr_value_bits(w, avail, k, one_k, rice):
    """A zero-run value codeword at the top of w, if it lies whole in its first avail bits:
    (v, length, whether it does). v is only meaningful where it does (the shift is masked
    so that it is defined either way)."""
    z = clz64(w)
    if rice:
        n = z + 1 + k
        fast = (z < RICE_ESC) & (n <= avail)
        v = (np.int64(z) << k) + lshr(w, (64 - n) & 63) - one_k
    else:
        n = 2 * z + k + 1
        fast = (z <= 31 - k) & (n <= avail)
        v = lshr(w, (64 - n) & 63) - one_k
    return v, n, fast


@njit(nogil=True, cache=True)
def _zero_run_pair(ptr, nbuf, pos, i, cnt, k, krun, scratch, rice):
    """One (run, value) pair of a zero-run block at symbol i, through the checked readers:
    (new pos, new i, error). A run that reaches the block's end has no value after it."""
    run, pos, err = _read_eg(ptr, nbuf, pos, krun)
    if err:
        return pos, i, err
    if run > cnt - i:
        return pos, i, ERR_RUN_LENGTH
    i += run
    if i == cnt:
        return pos, i, 0
    v, pos, err = _read_zero_run_value(ptr, nbuf, pos, k, rice)
    if err:
        return pos, i, err
    scratch[i] = v + 1
    return pos, i + 1, 0


@njit(nogil=True, cache=True)
def _read_zero_run_value(ptr, nbuf, pos, k, rice):
    """A zero-run block's value codeword v (the symbol is v + 1), checked: (v, pos, err)."""
    v, pos, err = _read_symbol(ptr, nbuf, pos, k, rice)
    if err == 0 and v == UMAX:  # v + 1 past the range (v > UMAX is refused there)
        return v, pos, ERR_VALUE_RANGE
    return v, pos, err


@njit(nogil=True, cache=True)
def _block_end(payload, pos, stop):
    """Error code of a block whose codewords ended at bit pos: it must be its stop, and
    the padding after it zero."""
    if pos != stop:
        return ERR_LENGTH_MISMATCH
    pad = (8 - (stop & 7)) & 7
    if pad and (payload[(stop - 1) >> 3] & ((1 << pad) - 1)) != 0:
        return ERR_PADDING
    return 0


@njit(nogil=True, cache=True, inline="always")
def _rans_step(x, slots):
    """A decoder step before renormalization (FORMAT.md, mode 4): (symbol, new x).

    slots[x mod 4096] packs the slot's symbol (bits 0-5), frequency (6-18) and its offset
    in the symbol's slots (19-30).
    """
    e = np.int64(slots[np.uint64(x) & np.uint64(RANS_M - 1)])
    return e & 63, ((e >> 6) & 0x1FFF) * (x >> RANS_SCALE_BITS) + (e >> 19)


@njit(nogil=True, cache=True, inline="always")
def _rans_steps4(x0, x1, x2, x3, slots, scratch, j):
    """_rans_step on the four states, their symbols stored at scratch[j:j+4]: the four
    states before renormalization."""
    u0, x0 = _rans_step(x0, slots)
    u1, x1 = _rans_step(x1, slots)
    u2, x2 = _rans_step(x2, slots)
    u3, x3 = _rans_step(x3, slots)
    scratch[j] = u0
    scratch[j + 1] = u1
    scratch[j + 2] = u2
    scratch[j + 3] = u3
    return x0, x1, x2, x3


@njit(nogil=True, cache=True, inline="always")
def _rans_word(payload, p, last):
    """The little-endian u16 at byte min(p, last) of payload."""
    a = np.uint64(min(p, last))
    return np.int64(payload[a]) | (np.int64(payload[a + np.uint64(1)]) << 8)


@njit(nogil=True, cache=True, inline="always")
def _rans_renorm(x, p, payload, last):
    """(x renormalized with the word at byte p, 1 if it read one, 1 if it needed one past
    the last word at byte `last`). Branch-free: the word is loaded whatever x needs."""
    need = x < RANS_L
    w = _rans_word(payload, p, last)
    return ((x << 16) | w) if need else x, np.int64(need), np.int64(need & (p > last))


@njit(nogil=True, cache=True)
def _decode_rans(payload, pos, stop, cnt, n, scratch):
    """Decode a mode-4 block of alphabet n at bits [pos, stop) of payload into
    scratch[:cnt], checking its table, states, words and end (FORMAT.md, mode 4)."""
    if (pos & 7) or (stop & 7) or n < 1 or n > RANS_ALPHABET:
        return ERR_LENGTH_MISMATCH
    b0 = pos >> 3
    end = stop >> 3
    tb = rans_table_bytes(n)
    if b0 + tb + 16 > end or end > payload.size:
        return ERR_OVERRUN
    if ((end - b0 - tb - 16) & 1) != 0:
        return ERR_LENGTH_MISMATCH
    slots = np.empty(RANS_M, np.uint32)
    c = 0
    for s in range(n):
        if s < n - 1:
            a = b0 + (12 * s >> 3)
            if s & 1:
                f = ((np.int64(payload[a]) & 15) << 8) | np.int64(payload[a + 1])
            else:
                f = (np.int64(payload[a]) << 4) | (np.int64(payload[a + 1]) >> 4)
            if c + f >= RANS_M:
                return ERR_RANS_TABLE
        else:
            f = RANS_M - c
        for t in range(f):
            slots[c + t] = np.uint32(s | (f << 6) | (t << 19))
        c += f
    if (n - 1) & 1 and (payload[b0 + tb - 1] & 15) != 0:
        return ERR_PADDING
    q = b0 + tb
    st = np.empty(RANS_STATES, np.int64)
    for i in range(RANS_STATES):
        st[i] = (np.int64(payload[q]) | (np.int64(payload[q + 1]) << 8)
                 | (np.int64(payload[q + 2]) << 16) | (np.int64(payload[q + 3]) << 24))
        if st[i] < RANS_L:
            return ERR_RANS_STATE
        q += 4
    x0 = st[0]
    x1 = st[1]
    x2 = st[2]
    x3 = st[3]
    wp = q
    last = end - 2  # the last word's first byte (>= q - 2 >= b0: always inside payload)
    bad = np.int64(0)
    j = 0
    ptr = data_ptr(payload)
    # Four states at a time while the next 8 bytes are in the block: the four words they can
    # need come in one load, and each state takes the one after those its predecessors took
    # (the same words as one state after another, with no load on the chain between states).
    while j + 3 < cnt and wp + 8 <= end:
        x0, x1, x2, x3 = _rans_steps4(x0, x1, x2, x3, slots, scratch, j)
        w = load_le64(ptr, wp)
        n0 = np.int64(x0 < RANS_L)
        n1 = np.int64(x1 < RANS_L)
        n2 = np.int64(x2 < RANS_L)
        n3 = np.int64(x3 < RANS_L)
        x0 = ((x0 << 16) | (w & 0xFFFF)) if n0 else x0
        s1 = 16 * n0
        x1 = ((x1 << 16) | (lshr(w, s1) & 0xFFFF)) if n1 else x1
        s2 = s1 + 16 * n1
        x2 = ((x2 << 16) | (lshr(w, s2) & 0xFFFF)) if n2 else x2
        s3 = s2 + 16 * n2
        x3 = ((x3 << 16) | (lshr(w, s3) & 0xFFFF)) if n3 else x3
        wp += (s3 + 16 * n3) >> 3
        j += 4
    # the rest: four states at a time, each word checked against the block's end
    while j + 3 < cnt:
        x0, x1, x2, x3 = _rans_steps4(x0, x1, x2, x3, slots, scratch, j)
        x0, n0, e0 = _rans_renorm(x0, wp, payload, last)
        p1 = wp + 2 * n0
        x1, n1, e1 = _rans_renorm(x1, p1, payload, last)
        p2 = p1 + 2 * n1
        x2, n2, e2 = _rans_renorm(x2, p2, payload, last)
        p3 = p2 + 2 * n2
        x3, n3, e3 = _rans_renorm(x3, p3, payload, last)
        wp = p3 + 2 * n3
        bad |= e0 | e1 | e2 | e3
        j += 4
    while j < cnt:
        i = j & 3
        x = x0 if i == 0 else (x1 if i == 1 else x2)
        u, x = _rans_step(x, slots)
        x, n_, e = _rans_renorm(x, wp, payload, last)
        wp += 2 * n_
        bad |= e
        scratch[j] = u
        if i == 0:
            x0 = x
        elif i == 1:
            x1 = x
        else:
            x2 = x
        j += 1
    if bad:
        return ERR_OVERRUN
    if wp != end:
        return ERR_LENGTH_MISMATCH
    if x0 != RANS_L or x1 != RANS_L or x2 != RANS_L or x3 != RANS_L:
        return ERR_RANS_STATE
    return 0


@njit(nogil=True, cache=True)
def _decode_block(payload, pos, stop, cnt, mode, k, krun, luts, scratch):
    """Decode one block's symbols into scratch[:cnt] and check its length and padding."""
    ptr = data_ptr(payload)
    nbuf = payload.size
    if mode == MODE_RANS:
        return _decode_rans(payload, pos, stop, cnt, k + 1, scratch)
    if not is_zero_runs(mode):
        rice = mode == MODE_RICE
        pos, err = _decode_eg(ptr, nbuf, pos, cnt, k, luts[np.int64(rice), min(k, LUT_K_MAX)],
                              scratch, rice)
    else:
        pos, err = _decode_zero_runs(ptr, nbuf, pos, cnt, k, krun, scratch,
                                     mode == MODE_ZERO_RUNS_RICE)
    if err:
        return err
    return _block_end(payload, pos, stop)


# Blocks decode LANES at a time: one table lookup per block per iteration gives the core
# LANES independent dependency chains (bit position -> load -> lookup -> bit position) to
# overlap, where one block's chain leaves it waiting on loads. Blocks are independent in
# the format, so this changes no frame and no result.
LANES = 4


@njit(nogil=True, cache=True, inline="always")
def _lane_lookup(ptr, table, pos, dst, j):
    """Look up the LUT_BITS stream bits at pos (8 bytes readable there) in the table at
    address table, store the entry's four 16-bit fields at symbols j..j+3 of the int32
    array at dst (its symbols, then slots that the lane's next codewords overwrite: every
    symbol below the block's count is written in order); returns the entry's meta byte."""
    idx = lshr(load_be64(ptr, pos >> 3) << (pos & 7), 64 - LUT_BITS)
    store_u16x4_i32(dst, j * 4, load_i64(table, idx * 8))
    return load_u8(table, LUT_META + idx)


@njit(nogil=True, cache=True, inline="always")
def _lane_step(ptr, nbuf, pos, j, m, k, rice, dst):
    """Advance a lane past the codewords of an entry with meta byte m, or past one checked
    codeword where it holds none: (new pos, new j, error code)."""
    n = m & 7
    if n:
        return pos + (m >> 3), j + n, 0
    u, pos, err = _read_symbol(ptr, nbuf, pos, k, rice)
    store_i32(dst, j * 4, u)
    return pos, j + 1, err


@njit(nogil=True, cache=True)
def _decode_lanes(ptr, nbuf, pos, table, dst, done, cnt, ks, rice):
    """The table path of _decode_eg on LANES mode-0/2 blocks (k <= LUT_K_MAX) at once.

    Lane l reads from bit pos[l] with the table at address table[l], writing int32 symbols
    at address dst[l]. It runs while every lane has LUT_SLOTS or more of its cnt[l]
    symbols to go (an entry's store writes that many slots) and 8 readable bytes; a
    codeword the table does not hold is read by the checked reader. pos and done (symbols
    written) are updated for _decode_eg to finish each lane. Returns an error code
    (nonzero: some lane's stream is invalid).
    """
    p0 = pos[0]
    p1 = pos[1]
    p2 = pos[2]
    p3 = pos[3]
    j0 = done[0]
    j1 = done[1]
    j2 = done[2]
    j3 = done[3]
    m0 = cnt[0] - LUT_SLOTS
    m1 = cnt[1] - LUT_SLOTS
    m2 = cnt[2] - LUT_SLOTS
    m3 = cnt[3] - LUT_SLOTS
    plim = (nbuf - 8) * 8  # pos <= plim: the 8 bytes at pos >> 3 are in the buffer
    err = 0
    while ((j0 <= m0) & (j1 <= m1) & (j2 <= m2) & (j3 <= m3)
           & (max(max(p0, p1), max(p2, p3)) <= plim)):
        e0 = _lane_lookup(ptr, table[0], p0, dst[0], j0)
        e1 = _lane_lookup(ptr, table[1], p1, dst[1], j1)
        e2 = _lane_lookup(ptr, table[2], p2, dst[2], j2)
        e3 = _lane_lookup(ptr, table[3], p3, dst[3], j3)
        if ((e0 & 7) == 0) | ((e1 & 7) == 0) | ((e2 & 7) == 0) | ((e3 & 7) == 0):
            p0, j0, err0 = _lane_step(ptr, nbuf, p0, j0, e0, ks[0], rice[0], dst[0])
            p1, j1, err1 = _lane_step(ptr, nbuf, p1, j1, e1, ks[1], rice[1], dst[1])
            p2, j2, err2 = _lane_step(ptr, nbuf, p2, j2, e2, ks[2], rice[2], dst[2])
            p3, j3, err3 = _lane_step(ptr, nbuf, p3, j3, e3, ks[3], rice[3], dst[3])
            err = err0 | err1 | err2 | err3
            if err:
                break
            continue
        j0 += e0 & 7
        j1 += e1 & 7
        j2 += e2 & 7
        j3 += e3 & 7
        p0 += e0 >> 3
        p1 += e1 >> 3
        p2 += e2 >> 3
        p3 += e3 >> 3
    pos[0] = p0
    pos[1] = p1
    pos[2] = p2
    pos[3] = p3
    done[0] = j0
    done[1] = j1
    done[2] = j2
    done[3] = j3
    return err


@njit(nogil=True, cache=True)
def _decode_group(payload, b0, g, counts, modes, ks, kruns, bits, offsets, luts, scratch,
                  stride):
    """Decode blocks b0 .. b0+g-1 (g <= LANES) of payload, block b0+l's symbols into
    scratch[l*stride : l*stride + counts[b0+l]]: (error code, l of the first invalid block).

    Groups of LANES table-coded blocks go through _decode_lanes; any failure there, and
    every other group, is decoded block by block with _decode_block, which finds the first
    invalid block and its error exactly as a sequential decoder would.
    """
    ptr = data_ptr(payload)
    nbuf = payload.size
    lanes = g == LANES
    for l in range(g):
        b = b0 + l
        lanes = lanes and (modes[b] == MODE_EG or modes[b] == MODE_RICE) and ks[b] <= LUT_K_MAX
    if lanes:
        pos = np.empty(LANES, np.int64)
        table = np.empty(LANES, np.int64)
        dst = np.empty(LANES, np.int64)
        done = np.zeros(LANES, np.int64)
        cnt = np.empty(LANES, np.int64)
        kk = np.empty(LANES, np.int64)
        rice = np.empty(LANES, np.bool_)
        for l in range(LANES):
            b = b0 + l
            rice[l] = modes[b] == MODE_RICE
            kk[l] = ks[b]
            pos[l] = offsets[b] * 8
            table[l] = data_ptr(luts[np.int64(rice[l]), ks[b]])
            dst[l] = data_ptr(scratch[l * stride:(l + 1) * stride])
            cnt[l] = counts[b]
        ok = _decode_lanes(ptr, nbuf, pos, table, dst, done, cnt, kk, rice) == 0
        for l in range(LANES):
            if not ok:
                break
            b = b0 + l
            rest = scratch[l * stride + done[l]:l * stride + counts[b]]
            p, err = _decode_eg(ptr, nbuf, pos[l], counts[b] - done[l], ks[b],
                                luts[np.int64(rice[l]), ks[b]], rest, rice[l])
            p0 = offsets[b] * 8
            ok = err == 0 and _block_end(payload, p, p0 + bits[b]) == 0
        if ok:
            return 0, 0
    for l in range(g):
        b = b0 + l
        p0 = offsets[b] * 8
        err = _decode_block(payload, p0, p0 + bits[b], counts[b], modes[b], ks[b], kruns[b],
                            luts, scratch[l * stride:l * stride + counts[b]])
        if err:
            return err, l
    return 0, 0


@njit(nogil=True, cache=True)
def _dequantize(scratch, start, cnt, step, out):
    """out[start:start+cnt] = float64(q) * step, from the block's symbols in scratch."""
    o = out[start:start + cnt]
    for j in range(cnt):  # indices from 0: no wraparound checks, so it vectorizes
        o[j] = _q_of_u(scratch[j]) * step


@njit(nogil=True, cache=True, inline="always")
def _q_of_u(u):
    """q of the symbol u (int32), in float64 (exact below 2**53).

    Computed in float64: AVX2 has no packed int64 -> float64 conversion, so an integer
    form of the u -> q map would not vectorize.
    """
    half = np.float64(u) * 0.5
    fl = np.floor(half)
    return fl + 1.0 if half != fl else 0.0 - half  # 0.0 - 0.0 is +0.0, -0.0 is not


@njit(nogil=True, cache=True)
def _table_error(starts, counts, bits, offsets, b_lo, b_hi, nbuf, n_out):
    """The first block in [b_lo, b_hi) whose bits [8*offsets[b], 8*offsets[b] + bits[b])
    are not inside a payload of nbuf bytes, or whose elements [starts[b], starts[b] +
    counts[b]) are not inside an output of n_out; -1 if none. The readers are bounded by
    the payload, but a block table is what places them in it: one that does not fit must
    not reach them (ggcomm.codec validates the table; direct callers of the kernels get
    ERR_TABLE)."""
    for b in range(b_lo, b_hi):
        if (offsets[b] < 0 or bits[b] < 0 or offsets[b] > nbuf
                or bits[b] > 8 * (nbuf - offsets[b])
                or starts[b] < 0 or counts[b] < 0 or counts[b] > MAX_BLOCK_SIZE
                or starts[b] > n_out - counts[b]):
            return b
    return -1


@njit(nogil=True, cache=True)
def decode_blocks(payload, starts, counts, steps, b_lo, b_hi, modes, ks, kruns, bits, offsets,
                  luts, exc_pos, out):
    """Decode blocks [b_lo, b_hi) into out (float32 or float64).

    Block b fills out[starts[b] : starts[b] + counts[b]] with q * steps[b].

    offsets[b] is the block's first byte in payload; its bits are
    [8*offsets[b], 8*offsets[b] + bits[b]). The code at every position of exc_pos (sorted)
    must be u = 0 (checked on the symbols: a value q * step can round to 0). Returns (error
    code, block), (0, -1) if ok. The block table itself (modes, ks, lengths adding up) is
    validated by the caller. luts is build_luts()' tables. A table that places a block
    outside payload or out is refused (ERR_TABLE) before anything is read.
    """
    bad = _table_error(starts, counts, bits, offsets, b_lo, b_hi, payload.size, out.size)
    if bad >= 0:
        return ERR_TABLE, bad
    stride = max(1, counts[b_lo:b_hi].max()) if b_hi > b_lo else 1
    lanes = min(LANES, max(1, b_hi - b_lo))  # no more rows than blocks
    group = np.empty(lanes * stride, np.int32)
    for b0 in range(b_lo, b_hi, LANES):
        g = min(LANES, b_hi - b0)
        err, l = _decode_group(payload, b0, g, counts, modes, ks, kruns, bits, offsets, luts,
                               group, stride)
        if err:
            return err, b0 + l
        for l in range(g):
            b = b0 + l
            cnt = counts[b]
            start = starts[b]
            scratch = group[l * stride:l * stride + cnt]
            for e in range(np.searchsorted(exc_pos, start), exc_pos.size):
                i = exc_pos[e]
                if i >= start + cnt:
                    break
                if scratch[i - start] != 0:
                    return ERR_EXCEPTION_CODE, b
            _dequantize(scratch, start, cnt, steps[b], out)
    return 0, -1


@njit(nogil=True, cache=True)
def reduce_blocks(buf, pay_lo, pay_hi, modes, ks, kruns, bits, offsets, starts, counts, steps,
                  b_lo, b_hi, luts, own, exc_pos, exc_ptr, xpos, xval, divisor, out_f, out_i):
    """Decode-and-accumulate: the exact integer sum of several frames, block by block.

    Frame f's payload is buf[pay_lo[f]:pay_hi[f]]; its block b has mode modes[f, b], orders
    ks[f, b] / kruns[f, b], bits[f, b] bits from byte offsets[f, b] of the payload. Every
    frame shares the block layout (starts, counts) and the per-block steps. own (int32 or
    int64, one per element, or empty) holds integers that need no decoding: this rank's own
    q, straight from the encoder. Positions exc_pos[exc_ptr[f]:exc_ptr[f + 1]] (sorted) are
    frame f's exceptions, where its code must be 0.

    With out_f (float32) not empty, out_f[i] = float32(sum_i * (step / divisor)), or
    float32((sum_i * step + xval[j]) / divisor) where xpos[j] == i (sorted positions of
    exceptional values); otherwise out_i[i] = sum_i (int64). The integers of LANES blocks
    at a time (decoded together, see _decode_group) are summed in accumulators of that size
    (float64: exact), so no full-size intermediate is written.
    A table that places a block outside its frame's payload (or outside buf, or the output)
    is refused (ERR_TABLE) before anything is read.
    Returns (error code, block, frame) of an invalid frame (the first one found, going
    through groups of LANES blocks, frames in order), (0, -1, -1) if every frame is valid.
    """
    n_frames = pay_lo.size
    n_out = out_f.size if out_f.size > 0 else out_i.size
    for f in range(n_frames):  # tables that place blocks outside the payloads or the output
        nbuf = pay_hi[f] - pay_lo[f]
        bad = _table_error(starts, counts, bits[f], offsets[f], b_lo, b_hi, max(nbuf, 0),
                           n_out)
        if bad >= 0 or pay_lo[f] < 0 or nbuf < 0 or pay_hi[f] > buf.size:
            return ERR_TABLE, max(bad, b_lo), f
    if own.size > 0 and own.size != n_out:
        return ERR_TABLE, b_lo, 0
    stride = max(1, counts[b_lo:b_hi].max()) if b_hi > b_lo else 1
    lanes = min(LANES, max(1, b_hi - b_lo))  # no more rows than blocks
    group = np.empty(lanes * stride, np.int32)
    # float64 holds every sum exactly (|sum| < frames * 2**30 < 2**53) and, unlike int64,
    # converts to and from the other types in vector instructions
    accs = np.empty(lanes * stride, np.float64)
    have_own = own.size > 0
    finalize = out_f.size > 0
    for b0 in range(b_lo, b_hi, LANES):
        g = min(LANES, b_hi - b0)
        if n_frames == 0:
            for l in range(g):
                b = b0 + l
                a = accs[l * stride:l * stride + counts[b]]
                os_ = own[starts[b]:starts[b] + counts[b]] if have_own else own
                for j in range(counts[b]):
                    a[j] = np.float64(os_[j]) if have_own else 0.0
        for f in range(n_frames):
            payload = buf[pay_lo[f]:pay_hi[f]]
            err, l = _decode_group(payload, b0, g, counts, modes[f], ks[f], kruns[f], bits[f],
                                   offsets[f], luts, group, stride)
            if err:
                return err, b0 + l, f
            for l in range(g):
                b = b0 + l
                cnt = counts[b]
                start = starts[b]
                scratch = group[l * stride:l * stride + cnt]
                a = accs[l * stride:l * stride + cnt]
                os_ = own[start:start + cnt] if have_own else own
                e_lo = exc_ptr[f] + np.searchsorted(exc_pos[exc_ptr[f]:exc_ptr[f + 1]], start)
                for e in range(e_lo, exc_ptr[f + 1]):
                    i = exc_pos[e]
                    if i >= start + cnt:
                        break
                    if scratch[i - start] != 0:
                        return ERR_EXCEPTION_CODE, b, f
                    # q from u in float64, as in _dequantize; the first frame also brings in
                # own. The last frame's pass writes the result itself when finalizing.
                if finalize and f == n_frames - 1:
                    scale = steps[b] / divisor
                    o = out_f[start:start + cnt]
                    if f > 0:
                        for j in range(cnt):
                            o[j] = np.float32((a[j] + _q_of_u(scratch[j])) * scale)
                    elif have_own:
                        for j in range(cnt):
                            o[j] = np.float32((np.float64(os_[j]) + _q_of_u(scratch[j]))
                                              * scale)
                    else:
                        for j in range(cnt):
                            o[j] = np.float32(_q_of_u(scratch[j]) * scale)
                    x_lo = np.searchsorted(xpos, start)
                    for e in range(x_lo, xpos.size):
                        i = xpos[e]
                        if i >= start + cnt:
                            break
                        base = a[i - start] if f > 0 else (
                            np.float64(os_[i - start]) if have_own else 0.0)
                        out_f[i] = np.float32(((base + _q_of_u(scratch[i - start])) * steps[b]
                                               + xval[e]) / divisor)
                elif f > 0:
                    for j in range(cnt):
                        a[j] += _q_of_u(scratch[j])
                elif have_own:
                    for j in range(cnt):
                        a[j] = np.float64(os_[j]) + _q_of_u(scratch[j])
                else:
                    for j in range(cnt):
                        a[j] = _q_of_u(scratch[j])
        if finalize and n_frames > 0:
            continue  # written by the last frame's pass
        for l in range(g):
            b = b0 + l
            cnt = counts[b]
            start = starts[b]
            a = accs[l * stride:l * stride + cnt]
            if finalize:
                step = steps[b]
                scale = step / divisor
                o = out_f[start:start + cnt]
                for j in range(cnt):
                    o[j] = np.float32(a[j] * scale)
                x_lo = np.searchsorted(xpos, start)
                for e in range(x_lo, xpos.size):
                    i = xpos[e]
                    if i >= start + cnt:
                        break
                    out_f[i] = np.float32((a[i - start] * step + xval[e]) / divisor)
            else:
                oi = out_i[start:start + cnt]
                for j in range(cnt):
                    oi[j] = np.int64(a[j])
    return 0, -1, -1


def build_luts():
    """Decoding tables for every order the table path covers, EG codewords ([0, k]) and
    mode-2 ones ([1, k]), 36 KiB each."""
    luts = np.empty((2, LUT_K_MAX + 1, LUT_SIZE), np.int64)
    for k in range(LUT_K_MAX + 1):
        build_lut(k, luts[0, k], False)
        build_lut(k, luts[1, k], True)
    return luts
