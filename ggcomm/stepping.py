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

import bisect
import functools
import math
from dataclasses import dataclass

import numpy as np

from . import rate as _rate

__all__ = ["DEFAULT_RATE", "StepControl", "correct", "model_step", "parse_mode", "prepare",
           "step_for"]

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


# The step for a target rate: predicted EG bits (ggcomm.rate.predict_eg_bits, best order) of
# a unit-variance GG of each shape, tabulated once per process and inverted by interpolation;
# ggcomm.rate.step_for_rate solves the same equation, at 40-150 ms a solve.
# Orders tabulated: order k costs at least k + 1 bits, so none past 16 is best below 17 bits.
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
    from scipy.special import gammainccinv, gammaln

    from .gg import GGFit, scale_for_std

    scale = scale_for_std(1.0, beta)
    fit = GGFit(loc=0.0, scale=scale, beta=beta, n=1)
    entropy_bits = (1 / beta - math.log(beta / 2) + gammaln(1 / beta) + math.log(scale)) / _LN2
    top = (entropy_bits - _TOP_BITS) * _LN2
    floor = math.log(2.0 * scale * gammainccinv(1 / beta, _FLOOR_TAIL) ** (1 / beta))
    fine = np.linspace(floor, top, 4096)
    warped = fine + (np.exp(fine) / (2.0 * scale)) ** beta
    grid = np.arange(warped[0], warped[-1], -_SPACING)
    log_step = np.append(np.interp(grid, warped[::-1], fine[::-1]), top)
    steps = np.exp(log_step)
    # The best order is 1 or 2 above log2(median |X| / step) all over the table: evaluate 4
    # orders from that guess. The bits are unimodal in the order, so a best order with both
    # neighbours evaluated is the best of all; rows where one is missing get every order.
    median = scale * gammainccinv(1 / beta, 0.5) ** (1 / beta)
    guess = np.maximum(np.floor(np.log2(median / steps)), 0.0)[:, None]
    k = np.arange(len(_ORDERS))
    only = (k >= guess) & (k <= guess + 3)
    bits, slopes = _rate.eg_order_bits(fit, steps, _ORDERS, tail=_TAIL, only=only, slopes=True)
    best = np.argmin(bits, axis=1)
    rows = np.arange(best.size)
    redo = ~(only[rows, np.maximum(best - 1, 0)] & only[rows, np.minimum(best + 1, k[-1])])
    if redo.any():
        bits[redo], slopes[redo] = _rate.eg_order_bits(
            fit, steps[redo], _ORDERS, tail=_TAIL, slopes=True
        )
        best = np.argmin(bits, axis=1)
    ends = np.stack([rows[:-1], rows[1:]], axis=1)[:, None, :]  # (cells, 1, 2 ends)
    pair = np.stack([best[:-1], best[1:]], axis=1)[:, :, None]  # (cells, 2 orders, 1)
    cells = np.concatenate([bits[ends, pair], slopes[ends, pair]], axis=2)
    if not np.isfinite(cells).all():
        raise RuntimeError(f"step table, shape {beta:g}: a best order was left out")
    return _Curve(log_step.tolist(), bits[rows, best].tolist(), cells.tolist())


@functools.cache
def _curves() -> tuple[_Curve, ...]:
    return tuple(_shape_curve(float(b)) for b in _BETA_GRID)


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
    the RMS. The step is read off the shape's table of predicted bits (built once per process,
    see :func:`prepare`) in microseconds, within 0.1% of :func:`ggcomm.rate.step_for_rate`'s
    for the unit-variance GG of that shape from 1 + 1e-7 to 17 bits; above the table each
    extra bit halves the step (the high-rate law, about 3% off the solver at 20 bits).

    Raises:
        ValueError: if ``target_bits`` is not above 1 (an EG code's minimum).
    """
    if not (math.isfinite(target_bits) and target_bits > 1.0):
        raise ValueError(f"target_bits must exceed 1 (the EG minimum), got {target_bits!r}")
    curve = _curves()[_beta_index(mean_sq, mean_abs)]
    return math.sqrt(mean_sq) * math.exp(_unit_log_step(curve, float(target_bits)))


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


class StepControl:
    """How a transport picks its quantization steps: one object for the DDP hook and
    :class:`ggcomm.pipeline.PipeComm`.

    Holds the mode (``rate`` / ``step`` / ``rel_step``, see :func:`parse_mode`), the rate
    feedback loop (a log2 step correction per stream, ``rate_gain`` log2 units per bit of
    error) and the optional rate warm-up (``warmup_iters`` iterations falling linearly from
    ``warmup_rate`` to ``rate``). Building one in rate mode builds the step model's table
    (:func:`prepare`), so no step costs a solve on the training path.
    """

    def __init__(self, rate: float | None = None, step: float | None = None,
                 rel_step: float | None = None, *, default_rate: float = DEFAULT_RATE,
                 rate_gain: float = 0.5, warmup_iters: int = 0, warmup_rate: float = 8.0):
        self.mode, self.value = parse_mode(rate, step, rel_step, default_rate)
        if isinstance(rate_gain, bool) or not (isinstance(rate_gain, (int, float))
                                               and math.isfinite(rate_gain) and rate_gain >= 0):
            raise ValueError(f"rate_gain must be a non-negative number, got {rate_gain!r}")
        self.rate_gain = float(rate_gain)
        if not (isinstance(warmup_iters, int) and warmup_iters >= 0):
            raise ValueError(f"warmup_iters must be a non-negative int, got {warmup_iters!r}")
        if warmup_iters and self.mode != "rate":
            raise ValueError("warmup_iters needs rate mode (a target rate to warm up to)")
        if warmup_iters and not (math.isfinite(warmup_rate) and warmup_rate > self.value):
            raise ValueError(f"warmup_rate ({warmup_rate!r}) must be above rate ({self.value})")
        self.warmup_iters = warmup_iters
        self.warmup_rate = float(warmup_rate) if warmup_iters else None
        self.corr: dict[str, float] = {}  # per stream: log2 step correction (rate mode)
        if self.mode == "rate":
            prepare()

    def settings(self) -> dict[str, object]:
        """What every rank (or both ends of a link) must agree on."""
        return {"mode": self.mode, "value": self.value, "rate_gain": self.rate_gain,
                "warmup_iters": self.warmup_iters, "warmup_rate": self.warmup_rate}

    def target(self, done: int = 0) -> float:
        """The rate target after ``done`` compressed iterations (the warm-up's schedule)."""
        if self.mode != "rate" or done >= self.warmup_iters:
            return self.value
        return self.warmup_rate + (self.value - self.warmup_rate) * done / self.warmup_iters

    def step(self, stream: str, mean_sq: float, mean_abs: float, *,
             measured_bits: float = math.nan, measured_target: float | None = None,
             target: float | None = None) -> float | None:
        """The step for ``stream``'s next tensor, with moments ``E[x^2]``, ``E[|x|]`` of
        its finite values; ``None`` when they carry no scale (all zero or non-finite: any
        step codes zeros exactly, so a caller keeps its previous step or takes 1).

        In rate mode ``measured_bits`` (payload bits per element the stream's last tensor
        took, coded aiming at ``measured_target``) first moves the stream's correction, and
        the step aims at ``target`` (both default to the rate): above the rate each extra
        bit halves the step (the high-rate law; the loop trims what it misses), so a warm-up
        needs no other model.
        """
        if self.mode == "step":
            return self.value
        if not (mean_sq > 0 and math.isfinite(mean_sq)):
            return None
        corr = self.corr.get(stream, 0.0)
        if self.mode == "rate":
            aimed = self.value if measured_target is None else measured_target
            corr = self.corr[stream] = correct(corr, measured_bits, aimed, self.rate_gain)
        extra = 0.0 if target is None else target - self.value
        return step_for(self.mode, self.value, mean_sq, mean_abs, corr - extra)
