"""Choosing the quantization step: fixed, relative to the RMS, or for a target rate.

Shared by every transport (the DDP hook, pipeline send/recv) so that the same argument means
the same thing everywhere:

* ``step``: one fixed step. Cheapest (no statistics), but one step cannot suit tensors whose
  scales differ.
* ``rel_step``: step = ``rel_step`` x RMS of the tensor. Around 0.25 gives ~4-5 bits per
  element on GG data; each halving adds about one bit.
* ``rate``: target bits per element. The GG model picks the step from the tensor's shape
  (its moment ratio) and scale; a feedback loop on the bits actually coded corrects the
  model's error, per stream.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from . import rate as _rate

__all__ = ["DEFAULT_RATE", "correct", "model_step", "parse_mode", "step_for"]

DEFAULT_RATE = 3.0
# log2 step corrections are clamped to +-CORR_LIMIT: a stream whose statistics change
# abruptly recovers within a few updates instead of chasing an extreme.
CORR_LIMIT = 8.0

# log-spaced grid of GG shapes for the rate model's step table
_BETA_GRID = np.exp(np.linspace(math.log(0.1), math.log(4.0), 60))


def parse_mode(
    rate: float | None, step: float | None, rel_step: float | None,
    default_rate: float = DEFAULT_RATE,
) -> tuple[str, float]:
    """``(mode, value)`` from the three mutually exclusive arguments; ``rate`` by default."""
    chosen = [name for name, v in (("rate", rate), ("step", step), ("rel_step", rel_step))
              if v is not None]
    if len(chosen) > 1:
        raise ValueError(f"choose one of rate, step, rel_step (got {', '.join(chosen)})")
    if not chosen:
        return "rate", float(default_rate)
    mode = chosen[0]
    value = {"rate": rate, "step": step, "rel_step": rel_step}[mode]
    if isinstance(value, bool) or not (
        isinstance(value, (int, float)) and math.isfinite(value) and value > 0
    ):
        raise ValueError(f"{mode} must be a positive number, got {value!r}")
    if mode == "rate" and value <= 1.0:
        raise ValueError("rate must be above 1 bit per element (an EG code's minimum)")
    return mode, float(value)


@functools.cache
def _unit_step(beta_index: int, target_bits: float) -> float:
    """Step that gives target_bits EG bits per element for a unit-variance GG source."""
    from .gg import GGFit, scale_for_std

    beta = float(_BETA_GRID[beta_index])
    fit = GGFit(loc=0.0, scale=scale_for_std(1.0, beta), beta=beta, n=1)
    return float(_rate.step_for_rate(fit, target_bits))


@functools.cache
def _ratio_table() -> tuple[np.ndarray, np.ndarray]:
    from scipy.special import gammaln

    b = _BETA_GRID
    log_rho = gammaln(1 / b) + gammaln(3 / b) - 2 * gammaln(2 / b)
    return log_rho[::-1].copy(), np.arange(b.size)[::-1].astype(np.float64)


def _beta_index(mean_sq: float, mean_abs: float) -> int:
    """Nearest grid shape from the moment ratio E[x^2] / E[|x|]^2 (see ggcomm.gg.fit)."""
    if not (mean_abs > 0 and mean_sq > 0):
        return int(np.argmin(np.abs(_BETA_GRID - 1.0)))
    log_rho, idx = _ratio_table()
    return int(round(float(np.interp(math.log(mean_sq / mean_abs**2), log_rho, idx))))


def model_step(mean_sq: float, mean_abs: float, target_bits: float) -> float:
    """The GG model's step for ``target_bits`` EG bits per element, from two moments.

    The shape comes from the moment ratio (nearest of 60 tabulated shapes), the scale from
    the RMS; each (shape, rate) pair is solved once with :func:`ggcomm.rate.step_for_rate`
    and cached, so this costs microseconds per call.
    """
    return math.sqrt(mean_sq) * _unit_step(_beta_index(mean_sq, mean_abs), target_bits)


def correct(corr: float, measured_bits: float, target_bits: float, gain: float) -> float:
    """Next log2 step correction after a stream coded ``measured_bits`` per element."""
    if not math.isfinite(measured_bits):
        return corr
    return min(CORR_LIMIT, max(-CORR_LIMIT, corr + gain * (measured_bits - target_bits)))


def step_for(mode: str, value: float, mean_sq: float, mean_abs: float,
             corr: float = 0.0) -> float:
    """The step for one tensor with moments ``E[x^2]``, ``E[|x|]`` of its finite values.

    A tensor of zeros (or without finite values) gets step 1: any step codes zeros exactly.
    """
    if mode == "step":
        return value
    rms = math.sqrt(mean_sq) if mean_sq >= 0 else float("nan")
    if not (rms > 0 and math.isfinite(rms)):
        return 1.0
    if mode == "rel_step":
        s = value * rms
    elif mode == "rate":
        s = model_step(mean_sq, mean_abs, value) * 2.0**corr
    else:
        raise ValueError(f"unknown step mode {mode!r}")
    return min(max(s, 1e-30), 1e30)
