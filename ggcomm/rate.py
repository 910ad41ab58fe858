"""Rate accounting: quantization, signed mapping and Exp-Golomb / Huffman / entropy bit counts.

Definitions (arXiv 2506.00486, Eq. 7-8):

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
:func:`eg_rate_surrogate` is a smooth differentiable bound of the EG rate;
:func:`eg_rate` is the differentiable rate whose value is exactly what
:func:`ggcomm.codec.encode` sends (:func:`codec_bits`), the training-time rate of ACT.

Integer functions accept numpy arrays, torch tensors or Python sequences; torch inputs give
torch outputs (same device) where the result is elementwise.
"""

from __future__ import annotations

import functools
import heapq
import math
from dataclasses import dataclass
from typing import Any, Literal, overload

import numpy as np
import torch
from scipy import optimize, special, stats

from ggcomm import codec as _codec
from ggcomm.gg import GGFit
from ggcomm.kernels import eg as _eg_kernels

__all__ = [
    "MAX_AUTO_K",
    "check_coded_args",
    "check_k",
    "codec_bits",
    "eg_bits",
    "eg_length",
    "eg_order_bits",
    "eg_rate",
    "eg_rate_surrogate",
    "entropy_bits",
    "fl_bits",
    "huffman_bits",
    "huffman_code_lengths",
    "predict_eg_bits",
    "predict_entropy_bits",
    "quantize",
    "rms",
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


def check_k(k: int) -> int:
    """``k`` as an int if it is an Exp-Golomb order this module counts (0..62), else the
    error (TypeError, ValueError) saying why."""
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
    k = check_k(k)
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
    k = check_k(k)
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
    k = check_k(k)
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


# --------------------------------------------------------------------------- codec-matched rate

_NBITS = 33
"""Bit lengths 0..32 cover every code value (symbols below 2^31, zero runs below 2^23)."""

_N_ORDERS = _eg_kernels.K_MAX + 1


def _length_table(device: torch.device) -> torch.Tensor:
    """``(orders, 33 * 33)`` float64 EG lengths for every order and ``(m, j)`` class.

    A value ``u > 0`` of bit length ``m`` has ``floor(log2(u + 2^k))`` equal to ``k`` when
    ``k >= m``, to ``m`` when ``j <= k < m`` and to ``m - 1`` when ``k < j``, where
    ``j = bit_length(2^m - u - 1)`` (so ``u + 2^k >= 2^m`` exactly when ``k >= j``); ``u = 0``
    is class ``(0, 0)``. The bits of any set of values at every order are then one matrix
    product of its ``(m, j)`` histogram with this table.
    """
    k = torch.arange(_N_ORDERS, dtype=torch.float64, device=device)[:, None, None]
    m = torch.arange(_NBITS, dtype=torch.float64, device=device)[None, :, None]
    j = torch.arange(_NBITS, dtype=torch.float64, device=device)[None, None, :]
    length = torch.where(k >= m, k + 1, torch.where(k >= j, 2 * m - k + 1, 2 * m - k - 1))
    return length.reshape(_N_ORDERS, _NBITS * _NBITS)


def _bit_length_exact(v: torch.Tensor) -> torch.Tensor:
    """``bit_length`` of non-negative int64 values below 2^53 (exact through float64)."""
    return torch.frexp(v.to(torch.float64))[1].to(torch.int64)


def _order_costs(values: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``(n_groups, orders)`` exact EG bits of the non-negative ``values`` of each group.

    One histogram pass over the values plus a small matrix product, whatever the number of
    orders; the codec's kernels count the same classes.
    """
    table = _length_table(values.device)
    if values.numel() == 0:
        return torch.zeros(n_groups, _N_ORDERS, dtype=torch.float64, device=values.device)
    m = _bit_length_exact(values)
    j = _bit_length_exact(torch.clamp((1 << m) - values - 1, min=0))
    cell = (group * _NBITS + m) * _NBITS + j
    hist = torch.bincount(cell, minlength=n_groups * _NBITS * _NBITS)
    return hist.reshape(n_groups, _NBITS * _NBITS).to(torch.float64) @ table.T


def _pick_order(costs: torch.Tensor, k: KArg) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group ``(bits, order)``: the cheapest order (smallest on ties) or the fixed one."""
    if k == "auto":
        bits, order = costs.min(dim=1)  # min returns the first minimum: the smallest order
        return bits, order
    order = torch.full((costs.shape[0],), k, dtype=torch.int64, device=costs.device)
    return costs[:, k], order


def _run_lengths(
    u: torch.Tensor, block: torch.Tensor, block_size: int, n_blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero runs of the zero-run mode, with their blocks: one before each nonzero symbol
    (possibly 0) and the trailing run of a block when it is above zero (FORMAT.md)."""
    n = u.numel()
    pos = torch.nonzero(u, as_tuple=True)[0]
    pos_block = block[pos]
    block_start = torch.arange(n_blocks, device=u.device) * block_size
    prev = torch.cat([pos.new_full((1,), -1), pos[:-1]])[: pos.numel()]
    first_in_block = torch.cat(
        [pos.new_ones(1, dtype=torch.bool), pos_block[1:] != pos_block[:-1]]
    )[: pos.numel()]
    prev = torch.where(first_in_block, block_start[pos_block] - 1, prev)
    before = pos - prev - 1
    last = (block_start - 1).scatter_reduce(0, pos_block, pos, reduce="amax")
    block_end = torch.clamp(block_start + block_size, max=n)
    trailing = block_end - 1 - last
    has_trailing = trailing > 0
    runs = torch.cat([before, trailing[has_trailing]])
    run_block = torch.cat([pos_block, torch.nonzero(has_trailing, as_tuple=True)[0]])
    return runs, run_block


@dataclass(frozen=True)
class _Plan:
    """How :func:`ggcomm.codec.encode` codes a tensor at one step.

    ``frame_bits``: the whole frame (headers, block table, exceptions, padded payload,
    checksum); ``payload_bits``: the blocks' codewords without padding (float64 0-d
    tensors). Per block: ``order`` (its EG order), ``zero_run`` (coded in zero-run mode,
    where nonzero symbols are coded as ``u - 1``) and ``count`` (its elements).
    """

    order: torch.Tensor
    zero_run: torch.Tensor
    count: torch.Tensor
    frame_bits: torch.Tensor
    payload_bits: torch.Tensor


def _plan_codec(
    x: torch.Tensor, step: float, k: KArg, block_size: int, zero_runs: bool | str
) -> _Plan:
    """The plan read off the frame the codec itself encodes (the fast path on the CPU)."""
    info = _codec.inspect(
        _codec.encode(x.detach(), step, k=k, block_size=block_size, zero_runs=zero_runs)
    )
    return _Plan(
        order=torch.tensor([b.k for b in info.blocks], dtype=torch.int64),
        zero_run=torch.tensor([b.mode == "zero_runs" for b in info.blocks], dtype=torch.bool),
        count=torch.tensor([b.count for b in info.blocks], dtype=torch.int64),
        frame_bits=torch.tensor(8.0 * info.nbytes, dtype=torch.float64),
        payload_bits=torch.tensor(
            float(sum(b.bit_length for b in info.blocks)), dtype=torch.float64
        ),
    )


def _plan_torch(
    x: torch.Tensor, step: float, k: KArg, block_size: int, zero_runs: bool | str
) -> _Plan:
    """The codec's choices reproduced with torch ops on ``x``'s device (no copy to the CPU).

    Quantization as the codec does it (float64 ``x * (1 / step)`` rounded half to even;
    non-finite values and ``|q| > QMAX`` are exceptions, coded as 0). Per block: the order
    with the fewest bits (or the fixed one) and, where the zero-run mode is allowed
    (``zero_runs=True``, or "auto" with at least a third of the symbols zero), that mode
    when it is strictly smaller; see docs/FORMAT.md.
    """
    v = x.detach().reshape(-1).to(torch.float64) * (1.0 / step)
    ok = torch.isfinite(v) & (v.abs() <= _eg_kernels.QMAX)
    q = torch.where(ok, torch.round(v), torch.zeros_like(v)).to(torch.int64)
    u = torch.where(q > 0, 2 * q - 1, -2 * q)
    n = u.numel()
    n_blocks = -(-n // block_size)
    block = torch.arange(n, device=u.device) // block_size
    counts = torch.clamp(n - torch.arange(n_blocks, device=u.device) * block_size, max=block_size)

    bits, order = _pick_order(_order_costs(u, block, n_blocks), k)
    zero_run = torch.zeros(n_blocks, dtype=torch.bool, device=u.device)
    if zero_runs is True:
        zero_run = ~zero_run
    elif zero_runs == "auto":
        zero_run = 3 * torch.bincount(block[u == 0], minlength=n_blocks) >= counts
    if bool(zero_run.any()):
        nz = u != 0
        val_bits, val_order = _pick_order(_order_costs(u[nz] - 1, block[nz], n_blocks), k)
        runs, run_block = _run_lengths(u, block, block_size, n_blocks)
        run_bits, _ = _pick_order(_order_costs(runs, run_block, n_blocks), "auto")
        alt = val_bits + run_bits
        if zero_runs == "auto":
            zero_run &= alt < bits
        bits = torch.where(zero_run, alt, bits)
        order = torch.where(zero_run, val_order, order)
    n_exceptions = (~ok).sum()
    header = _codec.header_bytes(x.dim(), 1, n_blocks, n_exceptions, x.element_size())
    frame = 8 * (header + _codec.CRC_BYTES) + 8 * torch.ceil(bits / 8).sum()
    return _Plan(
        order=order,
        zero_run=zero_run,
        count=counts,
        frame_bits=frame.to(torch.float64),
        payload_bits=bits.sum(),
    )


def _plan(x: torch.Tensor, step: float, k: KArg, block_size: int, zero_runs: bool | str) -> _Plan:
    """The codec's own kernels on CPU tensors (fastest there); torch ops elsewhere."""
    make = _plan_codec if x.device.type == "cpu" else _plan_torch
    return make(x, step, k, block_size, zero_runs)


def check_coded_args(x: Any, k: KArg, block_size: int, zero_runs: bool | str) -> None:
    """Raise if ``x``, ``k``, ``block_size`` and ``zero_runs`` are not arguments the wire
    codec takes (as :func:`codec_bits` and the rate surrogates need)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(
            f"expected a floating-point torch.Tensor, got {type(x).__name__}"
            + (f" of {x.dtype}" if isinstance(x, torch.Tensor) else "")
        )
    if x.numel() == 0:
        raise ValueError("cannot compute a rate for an empty tensor")
    if k != "auto":
        check_k(k)
        if k > _eg_kernels.K_MAX:
            raise ValueError(f"the codec's k is at most {_eg_kernels.K_MAX}, got {k}")
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, (int, np.integer))
        or not (1 <= block_size <= _eg_kernels.MAX_BLOCK_SIZE)
    ):
        raise ValueError(
            f"block_size must be an int in 1..{_eg_kernels.MAX_BLOCK_SIZE}, got {block_size!r}"
        )
    if zero_runs not in ("auto", True, False):
        raise ValueError(f"zero_runs must be 'auto', True or False, got {zero_runs!r}")


def codec_bits(
    x: torch.Tensor,
    step: float,
    *,
    k: KArg = "auto",
    block_size: int = _codec.DEFAULT_BLOCK_SIZE,
    zero_runs: bool | str = "auto",
) -> int:
    """Size in bits of the frame ``ggcomm.codec.encode(x, step, ...)`` returns, without
    encoding.

    The codec's choices (per-block order, zero-run mode, exceptions, byte padding, header
    and block table) are reproduced with torch ops on ``x``'s device, so this equals
    ``8 * encode(x, step, k=k, block_size=block_size, zero_runs=zero_runs).nbytes``. Costs
    a few passes over ``x`` and one histogram; useful where the tensor lives on a GPU and
    copying it to the CPU to encode it would cost more.
    """
    step = _check_step(step)
    check_coded_args(x, k, block_size, zero_runs)
    return int(_plan(x, step, k, int(block_size), zero_runs).frame_bits)


def _finite(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` flattened, detached, in ``dtype``, with non-finite values replaced by 0."""
    return torch.nan_to_num(x.detach().reshape(-1).to(dtype), nan=0.0, posinf=0.0, neginf=0.0)


def rms(x: torch.Tensor) -> float:
    """Root mean square of the finite elements of ``x`` (0.0 when none is finite).

    Non-finite values travel raw in the codec's exception list, so they do not set the
    scale; one pass in float64.
    """
    n = int(torch.isfinite(x).sum())
    if n == 0:
        return 0.0
    v = _finite(x, torch.float64)
    return math.sqrt(float(v @ v) / n)


class _CodedRate(torch.autograd.Function):
    """Forward: a precomputed rate value. Backward: ``grad * coef`` into ``x``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, value: torch.Tensor, coef: torch.Tensor) -> Any:
        ctx.save_for_backward(coef)
        ctx.x_meta = (x.shape, x.dtype)
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        (coef,) = ctx.saved_tensors
        shape, dtype = ctx.x_meta
        return (grad * coef).reshape(shape).to(dtype), None, None


def _smooth_gradient(x: torch.Tensor, step: float, plan: _Plan) -> torch.Tensor:
    """d(mean smooth codeword length)/dx, flattened, in float32 (float64 for float64 x).

    With ``u = 2|q| - [q > 0] = |2q - 1/2| - 1/2`` (``- 1`` for a nonzero in a zero-run
    block) and the block's order ``k``, the bound ``2 log2(u / 2^k + 1) + k + 1`` has slope
    ``4 sign(q) / (ln 2 step (u + 2^k))`` through the straight-through quantizer. The
    zero-run shift is applied to every element of such a block: where ``q = 0`` the slope
    is 0 anyway (the denominator is kept positive there), and so it is for non-finite
    elements (coded as 0).
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    q = torch.round(_finite(x, dtype).mul_(1.0 / step))
    base = torch.pow(2.0, plan.order.to(dtype)) - plan.zero_run.to(dtype) - 0.5
    if bool((base == base[0]).all()):
        offset: torch.Tensor | float = float(base[0])
    else:
        offset = base.to(q.device).repeat_interleave(plan.count.to(q.device), output_size=q.numel())
    # u + 2^k >= 1 wherever q != 0; the clamp only keeps q = 0 of a zero-run block (whose
    # shifted u + 2^k is 0) from 0 / 0.
    denom = torch.abs(q * 2.0 - 0.5).add_(offset).clamp_(min=0.5)
    return torch.sign(q).div_(denom).mul_(4.0 / (math.log(2.0) * step * q.numel()))


def eg_rate(
    x: torch.Tensor,
    step: float | None = None,
    *,
    rel_step: float | None = None,
    k: KArg = "auto",
    block_size: int = _codec.DEFAULT_BLOCK_SIZE,
    zero_runs: bool | str = "auto",
    overhead: bool = True,
) -> torch.Tensor:
    """Differentiable rate (bits per element, 0-d tensor) whose value is what the codec sends.

    Forward value: :func:`codec_bits` over ``x.numel()`` with ``overhead=True`` (headers,
    block table, padding and checksum included), or the blocks' codeword bits alone with
    ``overhead=False``. The arguments mean what they mean to :func:`ggcomm.codec.encode`;
    give the step either as ``step`` or as ``rel_step``, a multiple of :func:`rms` of ``x``.

    Gradient: that of the smooth bound ``2 log2(u / 2^k + 1) + k + 1`` of each element's
    codeword (see :func:`eg_rate_surrogate`), at the order the codec picked for the
    element's block and with ``u - 1`` for the nonzero symbols of zero-run blocks, through
    a straight-through quantizer (a straight-through floor: the value is exact, the slope
    smooth). The bound is tight at powers of two, so its slope is the codeword length's
    average slope: it pushes each element towards zero with a force that falls off like
    ``1 / |x|``. Elements that quantize to zero and non-finite elements get no gradient
    (exceptions beyond the code's range, ``|x / step| > 2^30 - 1``, get the bound's
    vanishing slope there, below ``2^-29`` per step). With ``rel_step`` the step moves with
    ``x``'s scale and the rate does not depend on it, so the gradient's component along
    ``x`` (the one that would only rescale it) is removed: what is left changes the
    distribution's shape, which is what lowers bits at a relative step.

    Costs :func:`codec_bits` plus a few elementwise passes; the backward is one multiply
    by a float32 (float64 for float64 ``x``) coefficient saved in the forward, so the
    memory held until backward is one such tensor the size of ``x``. The result is float32
    (float64 for float64 ``x``). Gains over :func:`eg_rate_surrogate`: the value is the
    codec's bits to the bit (the smooth bound alone is 10-20% high), with the per-block
    order and zero-run choices the codec makes.
    """
    check_coded_args(x, k, block_size, zero_runs)
    if (step is None) == (rel_step is None):
        raise ValueError("give exactly one of step and rel_step")
    if rel_step is not None:
        scale = rms(x)
        if not scale > 0.0:
            raise ValueError("rel_step needs a tensor whose finite elements are not all zero")
        step = _check_step(rel_step) * scale
    step = _check_step(step)
    plan = _plan(x, step, k, int(block_size), zero_runs)
    coef = _smooth_gradient(x, step, plan)
    if rel_step is not None:
        xs = _finite(x, coef.dtype)
        coef = coef.sub_(xs * ((coef @ xs) / (xs @ xs)))
    bits = plan.frame_bits if overhead else plan.payload_bits
    value = (bits.to(coef.device) / x.numel()).to(coef.dtype)
    return _CodedRate.apply(x, value, coef)


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
def _eg_terms(orders: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """The tail-probability terms of the expected EG length of each order in ``orders``.

    ``L_k(u) = k + 1 + 2 #{m > k : u >= 2^m - 2^k}``, so ``E[L_k] = k + 1 + 2 sum_m P(u >= t)``
    with ``t = 2^m - 2^k``. Under the ``se(v)`` map ``u >= t`` exactly when
    ``q >= floor(t/2) + 1`` or ``q <= -floor((t-1)/2) - 1``: when ``X >= right * step`` or
    ``X < -left * step`` with ``right = floor(t/2) + 1/2`` and ``left = floor((t-1)/2) + 1/2``.
    The terms run over ``m = k+1..63``; the one at ``m = 64`` (weight ``-(127 - k)/2``) takes
    out the values past the longest codeword class (``u + 2^k >= 2^64``), which are not
    counted. Returns per term (grouped by order, in the order of ``orders``): its order's
    position in ``orders``, weight, ``right`` and ``left``; and per order its first term.
    """
    col, weight, right, left = [], [], [], []
    for i, k in enumerate(orders):
        for m in range(k + 1, 65):
            t = (1 << m) - (1 << k)
            col.append(i)
            weight.append(1.0 if m < 64 else (k - 127) / 2)
            right.append(t // 2 + 0.5)
            left.append((t - 1) // 2 + 0.5)
    first = np.cumsum([0] + [64 - k for k in orders[:-1]])
    return np.array(col), np.array(weight), np.array(right), np.array(left), first


def eg_order_bits(
    fit: GGFit,
    steps: np.ndarray,
    orders: tuple[int, ...],
    *,
    tail: float = 0.0,
    only: np.ndarray | None = None,
    slopes: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Expected EG bits per element of each order (columns) at each step (rows) for
    ``X ~ GG(fit)``, and with ``slopes`` their derivatives in ``log(step)``.

    Sums the terms of :func:`_eg_terms`: two GG tail probabilities per codeword length (a few
    dozen per order, for any step), ``P(Z >= y) = gammaincc(1/beta, |y|^beta) / 2`` for
    ``y >= 0`` as in ``scipy.stats.gennorm.sf``. For a table of many steps two shortcuts are
    available: ``tail > 0`` leaves out each tail probability known to be below ``tail`` (one
    beyond the point where it is ``tail``; each order's result moves by less than
    ``512 tail``), and ``only``, a boolean ``(steps, orders)`` mask, evaluates just those
    entries (the rest are returned as inf).
    """
    col, weight, right, left, first = _eg_terms(orders)
    steps = np.asarray(steps, dtype=np.float64)
    beta, scale, loc = fit.beta, fit.scale, fit.loc
    y_cut = special.gammainccinv(1.0 / beta, 2.0 * tail) ** (1.0 / beta) if tail > 0 else np.inf
    # every term of every (step, order) wanted
    wanted = np.ones((steps.size, len(orders)), dtype=bool) if only is None else only
    row, order = np.nonzero(wanted)
    count = 64 - np.asarray(orders)[order]
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
    step = _check_step(step)
    if k == "auto":
        bits = eg_order_bits(fit, np.array([step]), tuple(range(MAX_AUTO_K + 1)))[0][0]
        best = int(np.argmin(bits))
        return float(bits[best]), best
    k = check_k(k)
    return float(eg_order_bits(fit, np.array([step]), (k,))[0][0, 0]), k


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
    floor_bits = 1.0 if k == "auto" else check_k(k) + 1.0
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
