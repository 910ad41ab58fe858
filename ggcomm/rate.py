"""Rate accounting: quantization, signed mapping and Exp-Golomb / Huffman / entropy bit counts.

Definitions (PAPER-NOTES section 3):

* Quantization with step ``Delta``: ``q = round_half_even(x * (1 / Delta))`` in float64.
  :func:`quantize` is the single definition of this formula; the wire codec quantizes the
  same way, so bits predicted here are bits sent there.
* Signed -> unsigned map as H.264 ``se(v)``: ``u = 2q - 1`` if ``q > 0`` else ``u = -2q``
  (0 -> 0, 1 -> 1, -1 -> 2, 2 -> 3, -2 -> 4, ...).
* k-th order Exp-Golomb length: ``L_k(u) = 2 floor(log2(u + 2^k)) - k + 1`` bits.

Measured rates (bits per element) of an integer tensor: :func:`fl_bits` (fixed length for the
range, the paper's FL column), :func:`eg_bits` (EG), :func:`huffman_bits` (HM) and
:func:`entropy_bits`; :func:`summary` collects them. Model-based rates for GG data:
:func:`predict_eg_bits`, :func:`predict_entropy_bits` and the inverse :func:`step_for_rate`.
:func:`eg_rate_surrogate` is the differentiable training-time rate.

Integer functions accept numpy arrays, torch tensors or Python sequences; torch inputs give
torch outputs (same device) where the result is elementwise.
"""

from __future__ import annotations

import heapq
import math
from typing import Any, Literal, overload

import numpy as np
import torch
from scipy import optimize, stats

from ggcomm.gg import GGFit

__all__ = [
    "MAX_AUTO_K",
    "eg_bits",
    "eg_length",
    "eg_rate_surrogate",
    "entropy_bits",
    "fl_bits",
    "huffman_bits",
    "huffman_code_lengths",
    "predict_eg_bits",
    "predict_entropy_bits",
    "quantize",
    "signed_to_unsigned",
    "step_for_rate",
    "summary",
    "unsigned_to_signed",
]

MAX_AUTO_K = 30
"""Largest Exp-Golomb order tried when ``k="auto"``."""

_MAX_K = 62
_ENTROPY_TAIL = 1e-12
_MAX_ENTROPY_CELLS = 4_000_000

KArg = int | Literal["auto"]


def _check_step(step: float) -> float:
    step = float(step)
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"step must be a positive finite number, got {step!r}")
    return step


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 0 <= k <= _MAX_K:
        raise ValueError(f"k must be in [0, {_MAX_K}], got {k}")
    return int(k)


def _int_numpy(q: Any) -> np.ndarray:
    """Integer numpy view of ``q`` (torch tensors are moved to the CPU)."""
    if isinstance(q, torch.Tensor):
        if q.is_floating_point() or q.is_complex():
            raise TypeError(f"expected an integer tensor, got {q.dtype}")
        return q.detach().cpu().numpy()
    arr = np.asarray(q)
    if arr.dtype == object or (arr.size == 0 and arr.dtype.kind == "f"):
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"expected integers, got dtype {arr.dtype}")
    return arr


# --------------------------------------------------------------------------- quantization


@overload
def quantize(x: torch.Tensor, step: float) -> torch.Tensor: ...
@overload
def quantize(x: Any, step: float) -> np.ndarray: ...
def quantize(x: Any, step: float) -> np.ndarray | torch.Tensor:
    """Quantize: ``q = round_half_even(x * (1.0 / step))`` computed in float64, as int64.

    Exactly this expression (multiplication by the float64 reciprocal, not division) is the
    contract shared with the wire codec.
    """
    inv = 1.0 / _check_step(step)
    if isinstance(x, torch.Tensor):
        return torch.round(x.detach().to(torch.float64) * inv).to(torch.int64)
    return np.rint(np.asarray(x, dtype=np.float64) * inv).astype(np.int64)


@overload
def signed_to_unsigned(q: torch.Tensor) -> torch.Tensor: ...
@overload
def signed_to_unsigned(q: Any) -> np.ndarray: ...
def signed_to_unsigned(q: Any) -> np.ndarray | torch.Tensor:
    """H.264 ``se(v)`` map: ``u = 2q - 1`` for ``q > 0``, ``u = -2q`` for ``q <= 0``."""
    if isinstance(q, torch.Tensor):
        q = q.to(torch.int64)
        return torch.where(q > 0, 2 * q - 1, -2 * q)
    q = _int_numpy(q).astype(np.int64)
    return np.where(q > 0, 2 * q - 1, -2 * q)


@overload
def unsigned_to_signed(u: torch.Tensor) -> torch.Tensor: ...
@overload
def unsigned_to_signed(u: Any) -> np.ndarray: ...
def unsigned_to_signed(u: Any) -> np.ndarray | torch.Tensor:
    """Inverse of :func:`signed_to_unsigned`: odd ``u`` -> ``(u + 1) / 2``, even -> ``-u / 2``."""
    if isinstance(u, torch.Tensor):
        u = u.to(torch.int64)
        return torch.where(u % 2 == 1, (u + 1) // 2, -(u // 2))
    u = _int_numpy(u).astype(np.int64)
    return np.where(u % 2 == 1, (u + 1) // 2, -(u // 2))


# --------------------------------------------------------------------------- Exp-Golomb


def _bit_length_np(c: np.ndarray) -> np.ndarray:
    """Exact ``int.bit_length`` of a uint64 array by binary search on shifts."""
    v = c.copy()
    n = np.zeros(c.shape, dtype=np.int64)
    for s in (32, 16, 8, 4, 2, 1):
        big = v >= np.uint64(1 << s)
        n += s * big
        v = np.where(big, v >> np.uint64(s), v)
    return n + (v > 0)


def _bit_length_torch(c: torch.Tensor) -> torch.Tensor:
    """Exact ``int.bit_length`` of a non-negative int64 tensor by binary search on shifts."""
    v = c.clone()
    n = torch.zeros_like(c)
    for s in (32, 16, 8, 4, 2, 1):
        big = v >= (1 << s)
        n += s * big
        v = torch.where(big, v >> s, v)
    return n + (v > 0)


@overload
def eg_length(u: torch.Tensor, k: int = 0) -> torch.Tensor: ...
@overload
def eg_length(u: Any, k: int = 0) -> np.ndarray: ...
def eg_length(u: Any, k: int = 0) -> np.ndarray | torch.Tensor:
    """Exact k-th order Exp-Golomb codeword lengths ``2 floor(log2(u + 2^k)) - k + 1``.

    Computed with integer arithmetic only (``floor(log2 c) = bit_length(c) - 1``), so it is
    exact for every ``u`` representable in the input dtype (numpy: ``u + 2^k < 2^64``; torch:
    int64, ``u + 2^k < 2^63``). Returns int64 lengths with the shape of ``u``.

    Raises:
        TypeError: for non-integer input. ValueError: for negative ``u`` or bad ``k``.
        OverflowError: if ``u + 2^k`` does not fit.
    """
    k = _check_k(k)
    if isinstance(u, torch.Tensor):
        if u.is_floating_point() or u.is_complex():
            raise TypeError(f"eg_length expects an integer tensor, got {u.dtype}")
        u = u.to(torch.int64)
        if u.numel():
            if int(u.min()) < 0:
                raise ValueError("eg_length expects non-negative u")
            if int(u.max()) > (1 << 63) - 1 - (1 << k):
                raise OverflowError(f"u + 2^{k} does not fit in int64")
        return 2 * _bit_length_torch(u + (1 << k)) - k - 1
    arr = _int_numpy(u)
    if arr.size:
        if arr.dtype.kind == "i" and int(arr.min()) < 0:
            raise ValueError("eg_length expects non-negative u")
        if int(arr.max()) > (1 << 64) - 1 - (1 << k):
            raise OverflowError(f"u + 2^{k} does not fit in uint64")
    c = arr.astype(np.uint64) + np.uint64(1 << k)
    return 2 * _bit_length_np(c) - k - 1


def _histogram(q: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """Distinct values, their counts and the element count of an integer array/tensor."""
    arr = _int_numpy(q).ravel()
    if arr.size == 0:
        raise ValueError("cannot compute a rate for an empty input")
    values, counts = np.unique(arr, return_counts=True)
    return values, counts, arr.size


def _best_k(avg_bits: Any, k: KArg) -> tuple[float, int]:
    """Evaluate ``avg_bits(k)`` at ``k`` or minimise it over 0..MAX_AUTO_K (smallest k wins)."""
    if k == "auto":
        best = min((avg_bits(kk), kk) for kk in range(MAX_AUTO_K + 1))
        return float(best[0]), best[1]
    k = _check_k(k)
    return float(avg_bits(k)), k


def eg_bits(u: Any, k: KArg = "auto") -> tuple[float, int]:
    """Average k-th order Exp-Golomb bits per element of unsigned symbols ``u``.

    With ``k="auto"`` the order minimising the average over ``0..MAX_AUTO_K`` is chosen
    (ties go to the smallest k). Returns ``(bits_per_element, k)``.
    """
    values, counts, n = _histogram(u)
    return _best_k(lambda kk: float(np.dot(eg_length(values, kk), counts)) / n, k)


def eg_rate_surrogate(
    x: torch.Tensor, step: float, k: int = 0, *, exact_forward: bool = False
) -> torch.Tensor:
    """Differentiable EG rate (bits per element, scalar tensor) for training.

    Quantizes with a straight-through estimator ``q = x/step + (round(x/step) - x/step)``
    (the correction detached), forms ``u = 2|q| - [q > 0]`` (the indicator is treated as a
    constant) and replaces ``floor`` in the EG length by its argument:
    ``2 log2(u / 2^k + 1) + k + 1``, averaged over elements.

    The forward value uses the rounded ``q``, so each element's term is ``>=`` its exact
    ``L_k(u)`` and equal to it when ``u + 2^k`` is a power of two (the excess is < 2 bits).
    Gradients reach ``x`` through ``|q|`` (``2 sign(q) / step`` times the log-derivative);
    elements quantized to zero get zero gradient from ``|q|``.

    The smoothing costs a systematic overhead (about 10-20% above the exact EG bits on GG
    data at 2-6 bits per element). With ``exact_forward=True`` the forward value is instead
    the exact mean ``L_k(u)`` of the rounded symbols (the bits the codec sends) while the
    gradient stays that of the smooth bound (a straight-through floor).

    Note: the forward uses ``x / step`` in the input dtype, which can differ from
    :func:`quantize` (float64 ``x * (1/step)``) on exact rounding ties.
    """
    k = _check_k(k)
    step = _check_step(step)
    s = x / step
    q = s + (torch.round(s) - s).detach()
    positive = (q.detach() > 0).to(q.dtype)
    u = 2.0 * q.abs() - positive
    length = 2.0 * torch.log2(u / float(1 << k) + 1.0) + (k + 1)
    if exact_forward:
        exact = eg_length(signed_to_unsigned(torch.round(s.detach()).to(torch.int64)), k)
        length = length + (exact.to(length.dtype) - length).detach()
    return length.mean()


# --------------------------------------------------------------------------- other codes


def fl_bits(q: Any) -> int:
    """Fixed-length bits per element for the value range: ``ceil(log2(max - min + 1))``.

    A constant input needs 0 bits (the paper's FL column; the value itself is side info).
    """
    values, _, _ = _histogram(q)
    return (int(values[-1]) - int(values[0])).bit_length()


def entropy_bits(q: Any) -> float:
    """Empirical (zeroth-order) entropy of the symbols, bits per element."""
    _, counts, n = _histogram(q)
    p = counts / n
    return float(-(p * np.log2(p)).sum())


def huffman_code_lengths(counts: Any) -> np.ndarray:
    """Codeword lengths of an optimal prefix (Huffman) code for the given symbol counts.

    Symbols with count 0 get length 0 (not coded). A single used symbol gets a 1-bit
    codeword (a prefix code needs at least one bit). Returns int64 lengths aligned with
    ``counts``.
    """
    c = np.asarray(counts)
    if c.ndim != 1:
        raise ValueError("counts must be one-dimensional")
    if c.size and (c.min() < 0 or not np.isfinite(c).all()):
        raise ValueError("counts must be finite and non-negative")
    lengths = np.zeros(c.size, dtype=np.int64)
    used = np.flatnonzero(c > 0)
    if used.size == 1:
        lengths[used] = 1
    if used.size <= 1:
        return lengths
    # Nodes 0..m-1 are leaves; each merge appends a node. parent[i] is the node above i.
    m = used.size
    parent = np.full(2 * m - 1, -1, dtype=np.int64)
    heap = [(c[i].item(), j) for j, i in enumerate(used)]
    heapq.heapify(heap)
    node = m
    while len(heap) > 1:
        w1, a = heapq.heappop(heap)
        w2, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (w1 + w2, node))
        node += 1
    depth = np.zeros(2 * m - 1, dtype=np.int64)
    for i in range(2 * m - 3, -1, -1):  # parents are created after children
        depth[i] = depth[parent[i]] + 1
    lengths[used] = depth[:m]
    return lengths


def huffman_bits(q: Any) -> float:
    """Average bits per element of a Huffman code built from the histogram of ``q``.

    The code table is not counted. A single distinct symbol costs 1 bit per element.
    """
    _, counts, n = _histogram(q)
    return float(np.dot(huffman_code_lengths(counts), counts)) / n


def summary(q: Any) -> dict[str, float | int]:
    """Bits per element of signed integers ``q`` under the paper's codes.

    Keys: ``fl`` (fixed length for the range), ``eg`` (Exp-Golomb of the ``se(v)``-mapped
    symbols, best order), ``eg_k`` (that order), ``hm`` (Huffman), ``entropy`` and ``n``
    (element count).
    """
    values, counts, n = _histogram(q)
    u = signed_to_unsigned(values)
    eg, k = _best_k(lambda kk: float(np.dot(eg_length(u, kk), counts)) / n, "auto")
    p = counts / n
    return {
        "fl": (int(values[-1]) - int(values[0])).bit_length(),
        "eg": eg,
        "eg_k": k,
        "hm": float(np.dot(huffman_code_lengths(counts), counts)) / n,
        "entropy": float(-(p * np.log2(p)).sum()),
        "n": n,
    }


# --------------------------------------------------------------------------- GG model rates


def _interval_prob(fit: GGFit, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``P(a <= X < b)`` under the fit (elementwise, ``a <= b``).

    Differences of the CDF are used left of ``loc`` and of the survival function right of it,
    so tail cells keep their relative precision.
    """
    dist = stats.gennorm(fit.beta, loc=fit.loc, scale=fit.scale)
    return _masses(fit.loc, a, b, dist.cdf(a), dist.cdf(b), dist.sf(a), dist.sf(b))


def _masses(
    loc: float,
    a: np.ndarray,
    b: np.ndarray,
    cdf_a: np.ndarray,
    cdf_b: np.ndarray,
    sf_a: np.ndarray,
    sf_b: np.ndarray,
) -> np.ndarray:
    """Interval masses from CDF/SF values at the interval ends (see :func:`_interval_prob`)."""
    p = np.where(b <= loc, cdf_b - cdf_a, np.where(a >= loc, sf_a - sf_b, 1.0 - cdf_a - sf_b))
    return np.clip(p, 0.0, 1.0)


def _expected_eg_lengths(fit: GGFit, step: float, ks: list[int]) -> np.ndarray:
    """Expected EG codeword length under the quantized GG, for each order in ``ks``.

    For order ``k``, length class ``m >= k`` holds ``u`` in ``[2^m - 2^k, 2^(m+1) - 2^k - 1]``
    (length ``2m - k + 1``). Its ``q`` values form one contiguous positive run
    (``u = 2q - 1``) and one non-positive run (``u = -2q``), so the class probability is two
    GG interval masses. All orders are evaluated in one vectorized pass.
    """
    k_idx, lo, hi, length = [], [], [], []
    for i, k in enumerate(ks):
        for m in range(k, 64):
            k_idx.append(i)
            lo.append(float((1 << m) - (1 << k)))
            hi.append(float((1 << (m + 1)) - (1 << k) - 1))
            length.append(2 * m - k + 1)
    lo_u, hi_u = np.array(lo), np.array(hi)
    runs_lo = np.concatenate([np.maximum(np.ceil((lo_u + 1) / 2), 1.0), -np.floor(hi_u / 2)])
    runs_hi = np.concatenate([np.floor((hi_u + 1) / 2), -np.ceil(lo_u / 2)])
    nonempty = runs_hi >= runs_lo
    mass = _interval_prob(fit, (runs_lo - 0.5) * step, (runs_hi + 0.5) * step)
    mass = np.where(nonempty, mass, 0.0)
    weights = (mass[: lo_u.size] + mass[lo_u.size :]) * np.array(length, dtype=np.float64)
    return np.bincount(np.array(k_idx), weights=weights, minlength=len(ks))


def predict_eg_bits(fit: GGFit, step: float, k: KArg = "auto") -> tuple[float, int]:
    """Expected EG bits per element for ``X ~ GG(fit)`` quantized with ``step``.

    Integrates the GG density over the quantization cells ``[(q - 1/2) step, (q + 1/2) step)``
    and sums ``P(q) L_k(u(q))``. Cells with equal codeword length form two contiguous runs of
    ``q``, so the sum is evaluated exactly per length class (a few dozen CDF evaluations per
    order, for any step; no truncation of the range). Returns ``(bits, k)``; ``k="auto"``
    picks the order in ``0..MAX_AUTO_K`` with the fewest bits (smallest on ties).
    """
    step = _check_step(step)
    if k == "auto":
        bits = _expected_eg_lengths(fit, step, list(range(MAX_AUTO_K + 1)))
        best = int(np.argmin(bits))
        return float(bits[best]), best
    k = _check_k(k)
    return float(_expected_eg_lengths(fit, step, [k])[0]), k


def predict_entropy_bits(fit: GGFit, step: float) -> float:
    """Entropy (bits per element) of ``round(X / step)`` for ``X ~ GG(fit)``.

    Sums ``-P(q) log2 P(q)`` over the cells covering all but ``1e-12`` of the mass. When that
    would take more than four million cells (``step`` tiny against the spread), the
    high-resolution approximation ``h(X) - log2(step)`` is returned instead (``h`` the
    differential entropy), whose error vanishes as ``step -> 0``.
    """
    step = _check_step(step)
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


def step_for_rate(fit: GGFit, target_bits: float, k: KArg = "auto") -> float:
    """Quantization step whose predicted EG bits per element (:func:`predict_eg_bits`) equal
    ``target_bits``.

    The predicted rate falls as the step grows, towards ``k + 1`` bits (1 bit with
    ``k="auto"``), so ``target_bits`` must exceed that floor. The root is bracketed by
    expanding from ``step = fit.std`` and found with Brent's method on ``log(step)``.

    Raises:
        ValueError: if ``target_bits`` is not above the floor or no bracket is found.
    """
    floor_bits = 1.0 if k == "auto" else _check_k(k) + 1.0
    if not (math.isfinite(target_bits) and target_bits > floor_bits):
        raise ValueError(
            f"target_bits must exceed {floor_bits:g} (the EG minimum for k={k}), "
            f"got {target_bits!r}"
        )

    def excess(log_step: float) -> float:
        return predict_eg_bits(fit, math.exp(log_step), k)[0] - target_bits

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
