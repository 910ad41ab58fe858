"""Differentiable rates, for rate-constrained training (ACT, GCT; arXiv 2506.00486, Sec. 4).

:func:`eg_rate_surrogate` is a smooth bound of the EG rate through a straight-through
quantizer; :func:`eg_rate` is the differentiable rate whose value is exactly what
:func:`ggcomm.codec.encode` sends (:func:`ggcomm.rate.bits.codec_bits`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import codec as _codec
from ..quant import check_step, finite_values, rms
from .bits import (
    CodecPlan,
    KArg,
    check_coded_args,
    check_k,
    codec_plan,
    eg_length,
    signed_to_unsigned,
)

__all__ = ["eg_rate", "eg_rate_surrogate"]


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
    step = check_step(step)
    s = x / step
    q = s + (torch.round(s) - s).detach()
    positive = (q.detach() > 0).to(q.dtype)
    u = 2.0 * q.abs() - positive
    length = 2.0 * torch.log2(u / float(1 << k) + 1.0) + (k + 1)
    if exact_forward:
        exact = eg_length(signed_to_unsigned(torch.round(s.detach()).to(torch.int64)), k)
        length = length + (exact.to(length.dtype) - length).detach()
    return length.mean()


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


def _smooth_gradient(x: torch.Tensor, step: float, plan: CodecPlan) -> torch.Tensor:
    """d(mean smooth codeword length)/dx, flattened, in float32 (float64 for float64 x).

    With ``u = 2|q| - [q > 0] = |2q - 1/2| - 1/2`` (``- 1`` for a nonzero in a zero-run
    block) and the block's order ``k``, in an EG block the bound
    ``2 log2(u / 2^k + 1) + k + 1`` has slope ``4 sign(q) / (ln 2 step (u + 2^k))`` through
    the straight-through quantizer. The zero-run shift is applied to every element of such a
    block: where ``q = 0`` the slope is 0 anyway (the denominator is kept positive there),
    and so it is for non-finite elements (coded as 0).
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    q = torch.round(finite_values(x, dtype).mul_(1.0 / step))
    base = torch.pow(2.0, plan.order.to(dtype)) - plan.zero_run.to(dtype) - 0.5
    if bool((base == base[0]).all()):
        offset: torch.Tensor | float = float(base[0])
    else:
        offset = base.to(q.device).repeat_interleave(plan.count.to(q.device), output_size=q.numel())
    # u + 2^k >= 1 wherever q != 0; the clamp only keeps q = 0 of a zero-run block (whose
    # shifted u + 2^k is 0) from 0 / 0.
    denom = torch.abs(q * 2.0 - 0.5).add_(offset).clamp_(min=0.5)
    coef = torch.sign(q).div_(denom).mul_(4.0 / (math.log(2.0) * step * q.numel()))
    if bool(plan.rice.any()):
        # Golomb-Rice blocks: the length u / 2^k + 1 + k (the unary part smoothed) has the
        # slope 2 sign(q) / (2^k step)
        n = q.numel()
        rice = plan.rice.to(q.device).repeat_interleave(plan.count.to(q.device), output_size=n)
        scale = torch.pow(2.0, -plan.order.to(dtype)).to(q.device)
        scale = scale.repeat_interleave(plan.count.to(q.device), output_size=n)
        coef = torch.where(rice, torch.sign(q) * scale * (2.0 / (step * n)), coef)
    return coef


def eg_rate(
    x: torch.Tensor,
    step: float | None = None,
    *,
    rel_step: float | None = None,
    k: KArg = "auto",
    block_size: int = _codec.DEFAULT_BLOCK_SIZE,
    zero_runs: bool | str = "auto",
    overhead: bool = True,
    rans: bool = True,
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
    check_coded_args(x, k, block_size, zero_runs, rans)
    if (step is None) == (rel_step is None):
        raise ValueError("give exactly one of step and rel_step")
    if rel_step is not None:
        scale = rms(x)
        if not scale > 0.0:
            raise ValueError("rel_step needs a tensor whose finite elements are not all zero")
        step = check_step(rel_step) * scale
    step = check_step(step)
    plan = codec_plan(x, step, k, int(block_size), zero_runs, rans)
    coef = _smooth_gradient(x, step, plan)
    if rel_step is not None:
        xs = finite_values(x, coef.dtype)
        coef = coef.sub_(xs * ((coef @ xs) / (xs @ xs)))
    bits = plan.frame_bits if overhead else plan.payload_bits
    value = (bits.to(coef.device) / x.numel()).to(coef.dtype)
    return _CodedRate.apply(x, value, coef)
