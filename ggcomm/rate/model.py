"""The GG rate model: expected bits of generalized-Gaussian data, and the step table.

:func:`predict_eg_bits` and :func:`predict_entropy_bits` are the expected Exp-Golomb bits
and entropy per element of ``X ~ GG(fit)`` quantized with a step (sums of GG tail
probabilities, as ``scipy.stats.gennorm``); :func:`step_for_rate` inverts the first with a
root finder (40-150 ms a solve). :func:`model_step` answers the same question on the
training path in microseconds, from two moments of a tensor: the shape from the moment
ratio, the step read off a table of predicted bits built once per process
(:func:`prepare`). arXiv 2506.00486, Sec. 3 (the GG model of gradients and activations).
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

from ..codec import DEFAULT_BLOCK_SIZE
from ..gg import GGFit, scale_for_std
from ..kernels import eg as _eg
from ..quant import check_step
from .bits import MAX_AUTO_K, KArg, check_k

__all__ = ["BETA_GRID", "eg_order_bits", "model_step", "predict_bits", "predict_eg_bits",
           "predict_entropy_bits", "predict_rans_bits", "prepare", "step_for_rate"]

_RICE_ESC = 16  # docs/FORMAT.md, mode 2: an escape after 16 zeros

_ENTROPY_TAIL = 1e-12
_MAX_ENTROPY_CELLS = 4_000_000

# log-spaced grid of GG shapes for the step table
BETA_GRID = np.exp(np.linspace(math.log(0.1), math.log(4.0), 60))


def _masses(
    loc: float,
    a: np.ndarray,
    b: np.ndarray,
    cdf_a: np.ndarray,
    cdf_b: np.ndarray,
    sf_a: np.ndarray,
    sf_b: np.ndarray,
) -> np.ndarray:
    """Interval masses ``P(a <= X < b)`` from CDF/SF values at the interval ends.

    Differences of the CDF are used left of ``loc`` and of the survival function right of it,
    so tail cells keep their relative precision.
    """
    p = np.where(b <= loc, cdf_b - cdf_a, np.where(a >= loc, sf_a - sf_b, 1.0 - cdf_a - sf_b))
    return np.clip(p, 0.0, 1.0)


@functools.cache
def _eg_terms(orders: tuple[int, ...], rice: bool = False) -> tuple[np.ndarray, ...]:
    """The tail-probability terms of the expected EG length of each order in ``orders``
    (with ``rice``, of the codec's Golomb-Rice mode, see below).

    ``L_k(u) = k + 1 + 2 #{m > k : u >= 2^m - 2^k}``, so ``E[L_k] = k + 1 + 2 sum_m P(u >= t)``
    with ``t = 2^m - 2^k``. Under the ``se(v)`` map ``u >= t`` exactly when
    ``q >= floor(t/2) + 1`` or ``q <= -floor((t-1)/2) - 1``: when ``X >= right * step`` or
    ``X < -left * step`` with ``right = floor(t/2) + 1/2`` and ``left = floor((t-1)/2) + 1/2``.
    The terms run over ``m = k+1..63``; the one at ``m = 64`` (weight ``-(127 - k)/2``) takes
    out the values past the longest codeword class (``u + 2^k >= 2^64``), which are not
    counted. Returns per term (grouped by order, in the order of ``orders``): its order's
    position in ``orders``, weight, ``right`` and ``left``; per order its first term and
    its number of terms.

    Golomb-Rice with parameter k and an EG escape (docs/FORMAT.md, mode 2): the length is
    ``k + 1`` plus one bit for each ``i = 1..15`` with ``u >= i 2^k``, plus 9 bits when
    ``u >= 16 2^k`` (the 16th unary zero and the escape's EG prefix and suffix through
    ``m = k + 4``), plus 2 for each ``m >= k + 5`` with ``u >= 2^m - 2^k``: terms of weight
    1/2, 9/2 and 1 (the weights are halved, as the sum is doubled).
    """
    col, weight, thresholds, count = [], [], [], []
    for i, k in enumerate(orders):
        if rice:
            terms = [(j << k, 0.5) for j in range(1, _RICE_ESC)]
            terms.append((_RICE_ESC << k, 4.5))
            terms += [((1 << m) - (1 << k), 1.0) for m in range(k + 5, 64)]
            terms.append(((1 << 64) - (1 << k), (k - 143) / 2))  # as EG's m = 64 term
        else:
            terms = [((1 << m) - (1 << k), 1.0 if m < 64 else (k - 127) / 2)
                     for m in range(k + 1, 65)]
        for t, w in terms:
            col.append(i)
            weight.append(w)
            thresholds.append(t)
        count.append(len(terms))
    right = [t // 2 + 0.5 for t in thresholds]
    left = [(t - 1) // 2 + 0.5 for t in thresholds]
    count = np.array(count)
    first = np.cumsum(count) - count
    return (np.array(col), np.array(weight), np.array(right), np.array(left), first, count)


def eg_order_bits(
    fit: GGFit,
    steps: np.ndarray,
    orders: tuple[int, ...],
    *,
    tail: float = 0.0,
    only: np.ndarray | None = None,
    slopes: bool = False,
    rice: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Expected EG bits per element of each order (columns) at each step (rows) for
    ``X ~ GG(fit)``, and with ``slopes`` their derivatives in ``log(step)``; with ``rice``
    those of the codec's Golomb-Rice mode with each parameter (docs/FORMAT.md, mode 2).

    Sums the terms of :func:`_eg_terms`: two GG tail probabilities per codeword length (a few
    dozen per order, for any step), ``P(Z >= y) = gammaincc(1/beta, |y|^beta) / 2`` for
    ``y >= 0`` as in ``scipy.stats.gennorm.sf``. For a table of many steps two shortcuts are
    available: ``tail > 0`` leaves out each tail probability known to be below ``tail`` (one
    beyond the point where it is ``tail``; each order's result moves by less than
    ``512 tail``), and ``only``, a boolean ``(steps, orders)`` mask, evaluates just those
    entries (the rest are returned as inf).
    """
    col, weight, right, left, first, n_terms = _eg_terms(tuple(orders), rice)
    steps = np.asarray(steps, dtype=np.float64)
    beta, scale, loc = fit.beta, fit.scale, fit.loc
    y_cut = special.gammainccinv(1.0 / beta, 2.0 * tail) ** (1.0 / beta) if tail > 0 else np.inf
    # every term of every (step, order) wanted
    wanted = np.ones((steps.size, len(orders)), dtype=bool) if only is None else only
    row, order = np.nonzero(wanted)
    count = n_terms[order]
    start = np.cumsum(count) - count
    row = np.repeat(row, count)
    term = np.arange(row.size) + np.repeat(first[order] - start, count)
    # left <= right: a term whose nearer threshold is past the cut has nothing left
    live = steps[row] * left[term] < y_cut * scale + abs(loc)
    row, term = row[live], term[live]
    cell = row * len(orders) + col[term]
    bits = np.zeros(steps.size * len(orders))
    slope = np.zeros_like(bits) if slopes else None
    for edge, sign in ((right, -1.0), (left, 1.0)):
        # P(X >= right * step) = P(Z >= (right * step - loc) / scale) and
        # P(X < -left * step) = P(Z >= (left * step + loc) / scale), Z a standard GG
        y = (steps[row] * edge[term] + sign * loc) / scale
        keep = y < y_cut
        y, w, at = y[keep], weight[term[keep]], cell[keep]
        with np.errstate(over="ignore"):  # far past the scale: P = 0, as in scipy
            z = np.abs(y) ** beta
        upper = 0.5 * special.gammaincc(1.0 / beta, z)
        upper = np.where(y >= 0, upper, 1.0 - upper)
        bits += np.bincount(at, upper * w, bits.size)
        if slope is not None:
            # d/dlog(step) P(Z >= y) = -pdf(y) * (y - sign * loc / scale)
            pdf = 0.5 * beta * np.exp(-z - special.gammaln(1.0 / beta))
            slope -= np.bincount(at, pdf * (y - sign * loc / scale) * w, bits.size)
    shape = (steps.size, len(orders))
    bits = np.asarray(orders, dtype=np.float64) + 1.0 + 2.0 * bits.reshape(shape)
    if only is not None:
        bits[~only] = np.inf
    return bits, None if slope is None else 2.0 * slope.reshape(shape)


def predict_eg_bits(fit: GGFit, step: float, k: KArg = "auto") -> tuple[float, int]:
    """Expected EG bits per element for ``X ~ GG(fit)`` quantized with ``step``.

    The exact expectation of ``L_k(u(q))`` over the quantization cells
    ``[(q - 1/2) step, (q + 1/2) step)``: ``E[L_k]`` is ``k + 1`` plus two bits for each
    codeword length ``u`` reaches, so it is a sum of GG tail probabilities, two per length
    (a few dozen CDF evaluations per order, for any step; no truncation of the range). Returns
    ``(bits, k)``; ``k="auto"`` picks the order in ``0..MAX_AUTO_K`` with the fewest bits
    (smallest on ties).
    """
    step = check_step(step)
    if k == "auto":
        bits = eg_order_bits(fit, np.array([step]), tuple(range(MAX_AUTO_K + 1)))[0][0]
        best = int(np.argmin(bits))
        return float(bits[best]), best
    k = check_k(k)
    return float(eg_order_bits(fit, np.array([step]), (k,))[0][0, 0]), k


def predict_rans_bits(fit: GGFit, step: float,
                      block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[float, float]:
    """Expected bits per element of the codec's rANS blocks (docs/FORMAT.md, mode 4) for
    ``X ~ GG(fit)`` quantized with ``step``, and the share of blocks of ``block_size``
    elements that mode 4 can code at all (all symbols below 64: ``-31 <= q <= 32``):
    ``(bits, share)``.

    The bits are the cross-entropy of the symbols' distribution (within that range) against
    the 12-bit table the encoder would build from a block's expected counts, plus the
    table and the four states spread over the block.
    """
    step = check_step(step)
    dist = stats.gennorm(fit.beta, loc=fit.loc, scale=fit.scale)
    q = np.arange(-31, 33)
    edges = (np.arange(-31, 34) - 0.5) * step
    cdf, sf = dist.cdf(edges), dist.sf(edges)
    p = _masses(fit.loc, edges[:-1], edges[1:], cdf[:-1], cdf[1:], sf[:-1], sf[1:])
    small = float(p.sum())
    if not small > 0.0:
        return math.inf, 0.0
    pu = np.zeros(_eg.RANS_ALPHABET)
    pu[np.where(q > 0, 2 * q - 1, -2 * q)] = p / small
    m = _eg.RANS_M
    freq = np.where(pu > 0, np.maximum(1, np.floor(pu * m)), 0).astype(np.int64)
    freq[int(np.argmax(freq))] += m - int(freq.sum())  # as the encoder, the largest
    used = pu > 0
    cost = float((pu[used] * np.log2(m / freq[used])).sum())
    counts = np.rint(pu * block_size)
    n = int(np.flatnonzero(counts)[-1]) + 1 if counts.any() else 1
    overhead = 8.0 * (_eg.rans_table_bytes(n) + 16) / block_size
    return cost + overhead, small ** block_size


def predict_bits(fit: GGFit, step: float, k: KArg = "auto", *, rans: bool = True,
                 block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[float, str, int]:
    """Expected bits per element the codec's blocks take for ``X ~ GG(fit)`` quantized with
    ``step``: ``(bits, mode, k)``.

    With ``k="auto"`` the codec picks, per block, the cheaper of EG (mode ``"eg"``) and
    Golomb-Rice (``"rice"``) at their best orders (docs/FORMAT.md); this is the cheaper of
    the two expectations (:func:`predict_eg_bits` and its Golomb-Rice counterpart), ties to
    EG. With ``rans`` (as :func:`ggcomm.encode`'s default) the blocks mode 4 can code take
    it where it saves more than 1/32 (:func:`predict_rans_bits`; mode ``"rans"`` when that
    is most blocks, ``k`` then the prefix code's). A fixed ``k`` means EG at that order, as
    in the codec. Zero-run blocks (sparse data) and the frame's header are not modelled.
    """
    step = check_step(step)
    if k != "auto":
        bits, k = predict_eg_bits(fit, step, k)
        return bits, "eg", k
    orders = tuple(range(MAX_AUTO_K + 1))
    eg = eg_order_bits(fit, np.array([step]), orders)[0][0]
    rice = eg_order_bits(fit, np.array([step]), orders, rice=True)[0][0]
    ke, kr = int(np.argmin(eg)), int(np.argmin(rice))
    bits, mode, k = (float(rice[kr]), "rice", kr) if rice[kr] < eg[ke] else \
        (float(eg[ke]), "eg", ke)
    if rans:
        r_bits, share = predict_rans_bits(fit, step, block_size)
        if _eg.RANS_MARGIN * r_bits < (_eg.RANS_MARGIN - 1) * bits:
            bits = share * r_bits + (1.0 - share) * bits
            mode = "rans" if share > 0.5 else mode
    return bits, mode, k


def predict_entropy_bits(fit: GGFit, step: float) -> float:
    """Entropy (bits per element) of ``round(X / step)`` for ``X ~ GG(fit)``.

    Sums ``-P(q) log2 P(q)`` over the cells covering all but ``1e-12`` of the mass. When that
    would take more than four million cells (``step`` tiny against the spread), the
    high-resolution approximation ``h(X) - log2(step)`` is returned instead (``h`` the
    differential entropy), whose error vanishes as ``step -> 0``.
    """
    step = check_step(step)
    dist = stats.gennorm(fit.beta, loc=fit.loc, scale=fit.scale)
    x_lo, x_hi = dist.ppf(_ENTROPY_TAIL / 2), dist.isf(_ENTROPY_TAIL / 2)
    q_lo, q_hi = math.floor(x_lo / step), math.ceil(x_hi / step)
    if q_hi - q_lo + 1 > _MAX_ENTROPY_CELLS:
        return float(dist.entropy()) / math.log(2.0) - math.log2(step)
    edges = (np.arange(q_lo, q_hi + 2, dtype=np.float64) - 0.5) * step
    cdf, sf = dist.cdf(edges), dist.sf(edges)
    p = _masses(fit.loc, edges[:-1], edges[1:], cdf[:-1], cdf[1:], sf[:-1], sf[1:])
    p = p[p > 0]
    return max(0.0, float(-(p * np.log2(p)).sum()))


def step_for_rate(fit: GGFit, target_bits: float, k: KArg = "auto", *, rans: bool = True,
                  block_size: int = DEFAULT_BLOCK_SIZE) -> float:
    """Quantization step whose predicted bits per element (:func:`predict_bits`: the codec's
    EG or Golomb-Rice blocks, and rANS blocks with ``rans`` as :func:`ggcomm.encode`'s
    default; EG alone at a fixed ``k``) equal ``target_bits``.

    The predicted rate falls as the step grows, towards ``k + 1`` bits (1 bit with
    ``k="auto"`` and no rANS blocks), so ``target_bits`` must exceed that floor. The root
    is bracketed by expanding from ``step = fit.std`` and found with Brent's method on
    ``log(step)``.

    Raises:
        ValueError: if ``target_bits`` is not above the floor or no bracket is found.
    """
    floor_bits = 1.0 if k == "auto" else check_k(k) + 1.0
    if not (math.isfinite(target_bits) and target_bits > floor_bits):
        raise ValueError(
            f"target_bits must exceed {floor_bits:g} (the EG minimum for k={k}), "
            f"got {target_bits!r}"
        )

    def excess(log_step: float) -> float:
        return predict_bits(fit, math.exp(log_step), k, rans=rans,
                            block_size=block_size)[0] - target_bits

    lo = hi = math.log(fit.std)
    for _ in range(64):
        if excess(lo) > 0:
            break
        lo -= math.log(4.0)
    else:
        raise ValueError("could not bracket the step from below")
    for _ in range(64):
        if excess(hi) < 0:
            break
        hi += math.log(4.0)
    else:
        raise ValueError("could not bracket the step from above")
    return math.exp(optimize.brentq(excess, lo, hi, xtol=1e-10, rtol=1e-10))


# The step table


# The step for a target rate: predicted bits (predict_bits: the codec's EG or Golomb-Rice
# blocks, best order) of a unit-variance GG of each shape, tabulated once per process and
# inverted by interpolation; step_for_rate solves the same equation, at 40-150 ms a solve.
# Orders tabulated: order k costs at least k + 1 bits in either mode, so none past 16 is
# best below 17 bits.
_ORDERS = tuple(range(17))
# The table runs from the step with P(|X| > step / 2) = _FLOOR_TAIL (1 + ~4e-8 bits) to the one
# where the entropy bound alone exceeds _TOP_BITS (17.7 bits or more in fact); past it, the
# high-rate law: each extra bit halves the step.
_FLOOR_TAIL = 1e-8
_TOP_BITS = 17.5
# Table points lie _SPACING apart in log(step) + (step / (2 scale))^beta: 0.2 in log(step) at
# high rates, closer where the bits near 1 fall with the tail P(|X| > step / 2), whose log
# falls like (step / (2 scale))^beta.
_SPACING = 0.2
# Tail probabilities below _TAIL are left out of the sums (moves the bits by < 1e-7).
_TAIL = 1e-10
_LN2 = math.log(2.0)


@dataclass(frozen=True)
class _Curve:
    """One shape's table: the predicted bits ``bits`` (increasing) at ``log_step``
    (decreasing), and per cell between neighbouring points, for the order best at each of
    its ends, ``(bits, bits at the next point, d bits / d log step, the same at the next)``.
    """

    log_step: list[float]
    bits: list[float]
    cells: list[list[list[float]]]


def _shape_curve(beta: float) -> _Curve:
    scale = scale_for_std(1.0, beta)
    fit = GGFit(loc=0.0, scale=scale, beta=beta, n=1)
    log_scale = math.log(scale)
    entropy_bits = (1 / beta - math.log(beta / 2) + special.gammaln(1 / beta) + log_scale) / _LN2
    top = (entropy_bits - _TOP_BITS) * _LN2
    floor = math.log(2.0 * scale * special.gammainccinv(1 / beta, _FLOOR_TAIL) ** (1 / beta))
    fine = np.linspace(floor, top, 4096)
    warped = fine + (np.exp(fine) / (2.0 * scale)) ** beta
    grid = np.arange(warped[0], warped[-1], -_SPACING)
    log_step = np.append(np.interp(grid, warped[::-1], fine[::-1]), top)
    steps = np.exp(log_step)
    # The best order is 1 or 2 above log2(median |X| / step) all over the table: evaluate 4
    # orders from that guess (either mode). The bits are unimodal in the order, so a best
    # order with both neighbours evaluated is the best of all; rows where one is missing get
    # the other orders too.
    median = scale * special.gammainccinv(1 / beta, 0.5) ** (1 / beta)
    guess = np.maximum(np.floor(np.log2(median / steps)), 0.0)[:, None]
    k = np.arange(len(_ORDERS))
    rows = np.arange(steps.size)
    only = (k >= guess) & (k <= guess + 3)
    per_mode = []
    for rice in (False, True):
        bits, slopes = eg_order_bits(fit, steps, _ORDERS, tail=_TAIL, only=only, slopes=True,
                                     rice=rice)
        best = np.argmin(bits, axis=1)
        redo = ~(only[rows, np.maximum(best - 1, 0)] & only[rows, np.minimum(best + 1, k[-1])])
        if redo.any():  # those rows' other orders
            rest = ~only[redo]
            more, more_slopes = eg_order_bits(fit, steps[redo], _ORDERS, tail=_TAIL, only=rest,
                                              slopes=True, rice=rice)
            bits[redo] = np.where(rest, more, bits[redo])
            slopes[redo] = np.where(rest, more_slopes, slopes[redo])
        per_mode.append((bits, slopes))
    # The codec codes each block in the cheaper mode: columns are EG's orders, then
    # Golomb-Rice's (ties to EG, as the codec)
    bits = np.concatenate([per_mode[0][0], per_mode[1][0]], axis=1)
    slopes = np.concatenate([per_mode[0][1], per_mode[1][1]], axis=1)
    best = np.argmin(bits, axis=1)
    ends = np.stack([rows[:-1], rows[1:]], axis=1)[:, None, :]  # (cells, 1, 2 ends)
    pair = np.stack([best[:-1], best[1:]], axis=1)[:, :, None]  # (cells, 2 orders, 1)
    cells = np.concatenate([bits[ends, pair], slopes[ends, pair]], axis=2)
    if not np.isfinite(cells).all():
        raise RuntimeError(f"step table, shape {beta:g}: a best order was left out")
    return _Curve(log_step.tolist(), bits[rows, best].tolist(), cells.tolist())


@functools.cache
def _curves() -> tuple[_Curve, ...]:
    return tuple(_shape_curve(float(b)) for b in BETA_GRID)


def prepare() -> None:
    """Build the rate model's step table now (a fraction of a second, once per process)
    rather than in the first :func:`model_step` call."""
    _curves()


def _unit_log_step(curve: _Curve, target_bits: float) -> float:
    """log(step) at which a unit-variance GG of the curve's shape takes ``target_bits``."""
    log_step, bits = curve.log_step, curve.bits
    if target_bits >= bits[-1]:  # past the table: each extra bit halves the step
        return log_step[-1] - (target_bits - bits[-1]) * _LN2
    if target_bits <= bits[0]:  # under 1 + 4e-8 bits: log(bits - 1) linear in log(step)
        rate = curve.cells[0][0][2] / (bits[0] - 1.0)
        return log_step[0] + math.log((target_bits - 1.0) / (bits[0] - 1.0)) / rate
    i = bisect.bisect_left(bits, target_bits) - 1  # bits[i] < target_bits <= bits[i + 1]
    x0, x1 = log_step[i], log_step[i + 1]
    # The step is the smallest of the orders' own steps for the target, so the least over
    # the orders best at the cell's ends whose bits cross the target in the cell.
    found = x0
    for b0, b1, d0, d1 in curve.cells[i]:
        if not b0 < target_bits <= b1:
            continue
        h = b1 - b0
        t = (target_bits - b0) / h
        x = x0 + t * (x1 - x0)
        if d0 < 0 and d1 < 0:  # cubic Hermite in the bits, with slopes d log step / d bits
            cubic = ((2 * t - 3) * t * t + 1) * x0 + (3 - 2 * t) * t * t * x1
            cubic += t * (t - 1) * ((t - 1) * h / d0 + t * h / d1)
            x = cubic if x1 <= cubic <= x0 else x
        found = min(found, x)
    return found


@functools.cache
def _ratio_table() -> tuple[np.ndarray, np.ndarray]:
    b = BETA_GRID
    log_rho = special.gammaln(1 / b) + special.gammaln(3 / b) - 2 * special.gammaln(2 / b)
    return log_rho[::-1].copy(), np.arange(b.size)[::-1].astype(np.float64)


def _beta_index(mean_sq: float, mean_abs: float) -> int:
    """Nearest grid shape from the moment ratio E[x^2] / E[|x|]^2 (see ggcomm.gg.fit)."""
    if not (mean_abs > 0 and mean_sq > 0):
        return int(np.argmin(np.abs(BETA_GRID - 1.0)))
    log_rho, idx = _ratio_table()
    return int(round(float(np.interp(math.log(mean_sq / mean_abs**2), log_rho, idx))))


def model_step(mean_sq: float, mean_abs: float, target_bits: float) -> float:
    """The GG model's step for ``target_bits`` bits per element (the codec's EG or
    Golomb-Rice blocks, :func:`predict_bits`), from two moments.

    The shape comes from the moment ratio (nearest of 60 tabulated shapes), the scale from
    the RMS. The step is read off the shape's table of predicted bits (built once per process,
    see :func:`prepare`) in microseconds, within 0.1% of :func:`step_for_rate`'s
    for the unit-variance GG of that shape from 1 + 1e-7 to 17 bits; above the table each
    extra bit halves the step (the high-rate law, about 3% off the solver at 20 bits).

    Raises:
        ValueError: if ``target_bits`` is not above 1 (an EG code's minimum).
    """
    if not (math.isfinite(target_bits) and target_bits > 1.0):
        raise ValueError(f"target_bits must exceed 1 (the EG minimum), got {target_bits!r}")
    curve = _curves()[_beta_index(mean_sq, mean_abs)]
    return math.sqrt(mean_sq) * math.exp(_unit_log_step(curve, float(target_bits)))
