"""DeepShape: remap trained weights to a sharper generalized Gaussian (arXiv 2506.00486,
earlier version).

A post-training step that reshapes the weight distribution towards a GG with a smaller
shape and scale, so the weights cost fewer Exp-Golomb bits. All the given parameters are
treated together:

1. Fixed point: ``q = round(w * 2**frac_bits)`` (float64, round half to even).
2. Body bound ``param_max``: the smallest integer ``v >= 1`` that at most ``min_count``
   weights take (``max |q|`` if every positive value up to ``max(q)`` is more frequent).
   The body is ``|q| <= param_max``; the tails keep their fixed-point value.
3. The body (integer units) is fitted with :func:`ggcomm.gg.fit` (moment ratio).
4. Target: ``GG(loc, scale * scale_scale, beta * shape_scale)``.
5. Rank-preserving remap: the levels ``-param_max .. param_max`` get integer counts by
   cumulative rounding of ``n_body`` times the target's masses, and the body's values,
   sorted (stably, so ties keep their index order), fill them from the lowest level up.
6. ``w = level / 2**frac_bits`` is written back in place, in each parameter's dtype.

The defaults are those of the authors' public code (shape x 0.8, scale x 0.6, 13 fractional
bits, count threshold 1000), tuned for models of ~100M parameters. The body is where every
level holds more than ``min_count`` weights, so a smaller model should pass a smaller
``min_count``: :func:`scaled_min_count` scales the authors' threshold to its size. The
output lies on the grid of step ``2**-frac_bits``: it pairs with EG coding
at that step (e.g. ``ggcomm.rate.eg_bits(ggcomm.rate.signed_to_unsigned(q))``). The remap
moves weights, so a short fine-tune afterwards fits (the paper calls the step post-training
regularization).

Memory: about 24 bytes per parameter on the CPU (float64 values, int64 sort indices and
int64-valued levels), whatever the parameters' device.

Usage::

    report = deepshape_(model, min_count=100)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ggcomm import gg
from ggcomm._params import float_tensors

__all__ = ["AUTHORS_MIN_COUNT", "AUTHORS_MODEL_SIZE", "DeepShapeReport", "deepshape_",
           "scaled_min_count"]

AUTHORS_MIN_COUNT = 1000
"""The authors' body threshold (weights per level), set for BERT-base-sized models."""
AUTHORS_MODEL_SIZE = 110_000_000
"""BERT-base's parameter count, the size the authors' threshold was set at."""

_MAX_PARAM_MAX = 2**26  # beyond this the level table itself would take gigabytes


@dataclass(frozen=True)
class DeepShapeReport:
    """What :func:`deepshape_` did. ``fitted`` and ``target_scale`` are in weight units."""

    frac_bits: int
    param_max: int  # body bound in integer units
    n_body: int
    n_tail: int
    fitted: gg.GGFit  # the body's fit before the remap (n = n_body)
    target_beta: float
    target_scale: float
    moved: int  # elements whose value changed (vs their fixed-point value)


def _check_args(frac_bits: Any, min_count: Any, shape_scale: Any, scale_scale: Any) -> None:
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, int) or not 0 <= frac_bits <= 30:
        raise ValueError(f"frac_bits must be an int in 0..30, got {frac_bits!r}")
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count must be an int >= 1, got {min_count!r}")
    for name, value in (("shape_scale", shape_scale), ("scale_scale", scale_scale)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not (math.isfinite(number) and number > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _param_max(q: torch.Tensor, min_count: int) -> int:
    """Smallest ``v >= 1`` taken by at most ``min_count`` elements, else ``max |q|``."""
    # every v below the answer holds > min_count elements, so it is at most n // (m + 1) + 1
    bound = q.numel() // (min_count + 1) + 1
    small = q[(q > 0) & (q <= bound)].long()
    counts = torch.bincount(small, minlength=bound + 1)[1:]
    first = int(torch.nonzero(counts <= min_count)[0, 0]) + 1
    return first if first <= float(q.max()) else int(q.abs().max())


def scaled_min_count(n: int) -> int:
    """The authors' threshold scaled in proportion to a model of ``n`` weights (at least 1):
    the same share of the weights per level marks the body's edge at any size."""
    return max(1, round(AUTHORS_MIN_COUNT * n / AUTHORS_MODEL_SIZE))


@torch.no_grad()
def deepshape_(
    params: nn.Module | Iterable[Any],
    *,
    frac_bits: int = 13,
    min_count: int = AUTHORS_MIN_COUNT,
    shape_scale: float = 0.8,
    scale_scale: float = 0.6,
) -> DeepShapeReport:
    """Remap ``params`` in place to a GG of shape ``beta * shape_scale`` and scale
    ``alpha * scale_scale`` (see the module docstring); returns a :class:`DeepShapeReport`.

    ``params``: an ``nn.Module`` (all its floating-point parameters) or tensors or
    ``(name, tensor)`` pairs, on any device. Nothing is written unless the call succeeds.

    Raises:
        ValueError: for bad arguments, no parameters, non-finite values, or weights that
            leave nothing to reshape (all zero, or a body with a single value).
        TypeError: for a non-floating-point tensor.
    """
    _check_args(frac_bits, min_count, shape_scale, scale_scale)
    tensors = float_tensors(params)
    n = sum(p.numel() for p in tensors)
    if n == 0:
        raise ValueError("deepshape_: the parameters have no elements")
    q = torch.empty(n, dtype=torch.float64)
    offset = 0
    for p in tensors:
        q[offset : offset + p.numel()].copy_(p.detach().reshape(-1))
        offset += p.numel()
    if not torch.isfinite(q).all():
        raise ValueError("deepshape_: the parameters contain NaN or infinite values")
    unit = 2.0**frac_bits
    q.mul_(unit).round_()
    if not q.any():
        raise ValueError("deepshape_: every weight rounds to zero; nothing to reshape")
    param_max = _param_max(q, min_count)
    if param_max > _MAX_PARAM_MAX:
        raise ValueError(
            f"deepshape_: the body would span {2 * param_max + 1} levels; lower frac_bits"
        )

    body = q[(q >= -param_max) & (q <= param_max)].numpy()
    n_body = body.size
    if n_body == 0 or body.min() == body.max():
        raise ValueError(f"deepshape_: the body (|q| <= {param_max}) holds fewer than 2 values")
    fit = gg.fit(body, max_samples=n_body)
    old_hist = np.bincount((body + param_max).astype(np.int64), minlength=2 * param_max + 1)
    del body
    beta_t, alpha_t = fit.beta * float(shape_scale), fit.scale * float(scale_scale)

    levels = np.arange(-param_max, param_max + 1, dtype=np.float64)
    with np.errstate(over="ignore"):
        logp = -((np.abs(levels - fit.loc) / alpha_t) ** beta_t)
    mass = np.exp(logp - logp.max())
    cum = np.round(n_body * np.cumsum(mass) / mass.sum()).astype(np.int64)
    cum[-1] = n_body
    counts = np.diff(cum, prepend=0)
    assert (counts >= 0).all()

    # the stable sort puts the low tail first, the body (values then index order), the high tail
    order = torch.argsort(q, stable=True)
    n_low = int((q < -param_max).sum())
    body_idx = order[n_low : n_low + n_body]
    q[body_idx] = torch.repeat_interleave(torch.from_numpy(levels), torch.from_numpy(counts))
    del order, body_idx
    # element i of the sorted body kept its value iff both sequences hold one level there
    old_cum = np.cumsum(old_hist)
    kept = np.minimum(old_cum, cum) - np.maximum(old_cum - old_hist, cum - counts)
    moved = n_body - int(np.clip(kept, 0, None).sum())

    q.div_(unit)
    offset = 0
    for p in tensors:
        p.copy_(q[offset : offset + p.numel()].view(p.shape))
        offset += p.numel()
    return DeepShapeReport(
        frac_bits=frac_bits,
        param_max=param_max,
        n_body=n_body,
        n_tail=n - n_body,
        fitted=gg.GGFit(loc=fit.loc / unit, scale=fit.scale / unit, beta=fit.beta, n=n_body),
        target_beta=beta_t,
        target_scale=alpha_t / unit,
        moved=moved,
    )
