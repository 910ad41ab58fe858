"""Quantization: the one quantizer and the scale it is set from.

``q = round_half_even(x * (1 / step))`` computed in float64 (arXiv 2506.00486, Eq. 7):
:func:`quantize` is the single definition of this formula in Python, and the wire codec's
kernels (``ggcomm.kernels.eg``) quantize the same way, so bits predicted in
:mod:`ggcomm.rate` are bits sent by :mod:`ggcomm.codec`. Magnitudes above ``QMAX`` and
non-finite values are not quantized: the codec sends them raw in its exception list
(:func:`fake_quantize` returns what the receiver decodes, exceptions included). Steps are
set from :func:`rms`, the scale of a tensor's finite values; how a step is chosen (fixed,
relative to the RMS, or for a target rate) is :mod:`ggcomm.step_policy`.
"""

from __future__ import annotations

import math
from typing import Any, overload

import numpy as np
import torch

from .kernels.eg import QMAX

__all__ = ["QMAX", "check_step", "fake_quantize", "finite_values", "quantize", "quantize_coded",
           "rms"]


def check_step(step: float, name: str = "step") -> float:
    """``step`` as a float if it is a positive finite number, else ValueError naming it."""
    try:
        value = float(step)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(step, bool) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {step!r}")
    return value


@overload
def quantize(x: torch.Tensor, step: float) -> torch.Tensor: ...
@overload
def quantize(x: Any, step: float) -> np.ndarray: ...
def quantize(x: Any, step: float) -> np.ndarray | torch.Tensor:
    """Quantize: ``q = round_half_even(x * (1.0 / step))`` computed in float64, as int64.

    Exactly this expression (multiplication by the float64 reciprocal, not division) is the
    contract shared with the wire codec.
    """
    inv = 1.0 / check_step(step)
    if isinstance(x, torch.Tensor):
        return torch.round(x.detach().to(torch.float64) * inv).to(torch.int64)
    return np.rint(np.asarray(x, dtype=np.float64) * inv).astype(np.int64)


def quantize_coded(x: torch.Tensor, step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What the codec codes of ``x`` (on ``x``'s device): ``(q, coded)``, ``q`` the
    float64 symbols of :func:`quantize` where ``coded`` and 0 where not (non-finite values
    and ``|x / step| > QMAX`` travel in the exception list)."""
    v = x.detach().to(torch.float64) * (1.0 / check_step(step))
    coded = torch.isfinite(v) & (v.abs() <= QMAX)
    return torch.where(coded, torch.round(v), torch.zeros_like(v)), coded


def fake_quantize(x: torch.Tensor, step: float) -> torch.Tensor:
    """``x`` as the receiver decodes it (``round(x / step) * step``, exceptions raw), with
    a straight-through gradient."""
    q, coded = quantize_coded(x, step)
    deq = torch.where(coded, q * step, x.detach().to(torch.float64))
    return x + (deq.to(x.dtype) - x).detach()


def finite_values(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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
    v = finite_values(x, torch.float64)
    return math.sqrt(float(v @ v) / n)
