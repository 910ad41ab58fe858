"""The step policy: how every transport and training method chooses quantization steps.

One place for the three ways of giving a step, so that the same argument means the same
thing to the DDP hook, pipeline send/recv, ACT and GCT:

* ``step``: one fixed step. Cheapest (no statistics), but one step cannot suit tensors whose
  scales differ.
* ``rel_step``: step = ``rel_step`` x RMS of the tensor's finite values. Around 0.25 gives
  ~4-5 bits per element on GG data; each halving adds about one bit.
* ``rate``: target bits per element. The GG rate model (:func:`ggcomm.rate.model_step`)
  picks the step from the tensor's shape (its moment ratio) and scale; a feedback loop on
  the bits actually coded corrects the model's error, per stream.

:func:`parse_mode` validates the arguments, :func:`step_for` turns a tensor's moments into
its step, :func:`correct` is the feedback rule, and :class:`StepControl` holds them for one
transport or method. The defaults differ by what is sent, each named here with its reason.
"""

from __future__ import annotations

import math

from .quant import check_step
from .rate.model import model_step, prepare

__all__ = ["ACT_REL_STEP", "CORR_LIMIT", "DEFAULT_RATE", "GCT_REL_STEP", "MODES",
           "PIPELINE_RATE", "TRANSPORT_RANS", "StepControl", "StepSettings", "correct",
           "parse_mode", "step_for"]

MODES = ("rate", "step", "rel_step")

DEFAULT_RATE = 3.0
"""Bits per element for DDP gradients: error feedback carries what quantization drops into
the next iteration, so a low rate costs little accuracy (README, convergence benchmark)."""

PIPELINE_RATE = 4.0
"""Bits per element for activations and activation gradients between pipeline stages: each
is sent once, with no error feedback, so the error of every element stays."""

ACT_REL_STEP = 0.05
"""ACT's step relative to the activation's RMS: quantization noise ``0.05 / sqrt(12)``,
about 1.4% of the RMS (37 dB SNR), at 6-7 bits per element on Gaussian data; halving it
costs about one more bit per element and halves the noise."""

GCT_REL_STEP = 0.25
"""GCT's step relative to each gradient tensor's RMS: about 4-5 bits per element on
GG-shaped gradients (each halving adds about one bit), the range the DDP hook codes at."""

TRANSPORT_RANS = False
"""Whether the transports (the DDP hook, pipeline send/recv, the exact-sum exchanges of the
PowerSGD, DiLoCo and FSDP transports, the weight broadcast) and ACT's rate code blocks in
the codec's rANS mode (``rans=True``, FORMAT.md mode 4). Off: on light-tailed blocks it sends
3-8% fewer bits but takes about twice the codec time there (encode and decode;
``benchmarks/results/codec_stages.md``), which pays only where the link is slower than the
codec, 17-59 Mbit/s per coding core on this machine (README). ``ggcomm.encode`` itself
uses it by default: the fewest bits."""

# log2 step corrections are clamped to +-CORR_LIMIT: a stream whose statistics change
# abruptly recovers within a few updates instead of chasing an extreme.
CORR_LIMIT = 8.0


def parse_mode(
    rate: float | None, step: float | None, rel_step: float | None,
    default: tuple[str, float] = ("rate", DEFAULT_RATE), *, modes: tuple[str, ...] = MODES,
) -> tuple[str, float]:
    """``(mode, value)`` from the three mutually exclusive arguments, ``default`` when none
    is given; ``modes`` lists the ones the caller supports.

    Raises:
        ValueError: more than one given, a mode the caller does not support, a value that is
            not a positive finite number, or a rate not above 1 bit (an EG code's minimum).
    """
    given = {"rate": rate, "step": step, "rel_step": rel_step}
    chosen = [name for name, v in given.items() if v is not None]
    if len(chosen) > 1:
        raise ValueError(f"choose one of {', '.join(modes)} (got {', '.join(chosen)})")
    mode, value = (chosen[0], given[chosen[0]]) if chosen else default
    if mode not in modes:
        raise ValueError(f"{mode} is not supported here (choose one of {', '.join(modes)})")
    value = check_step(value, mode)
    if mode == "rate" and value <= 1.0:
        raise ValueError("rate must be above 1 bit per element (an EG code's minimum)")
    return mode, value


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
    """How a transport or training method picks its quantization steps: one object each
    for the DDP hook, :class:`ggcomm.pipeline.PipeComm`, ACT and GCT.

    Holds the mode (``rate`` / ``step`` / ``rel_step``, see :func:`parse_mode`), the rate
    feedback loop (a log2 step correction per stream, ``rate_gain`` log2 units per bit of
    error) and the optional rate warm-up (``warmup_iters`` iterations falling linearly from
    ``warmup_rate`` to ``rate``). Building one in rate mode builds the step model's table
    (:func:`prepare`), so no step costs a solve on the training path.
    """

    def __init__(self, rate: float | None = None, step: float | None = None,
                 rel_step: float | None = None, *,
                 default: tuple[str, float] = ("rate", DEFAULT_RATE),
                 modes: tuple[str, ...] = MODES,
                 rate_gain: float = 0.5, warmup_iters: int = 0, warmup_rate: float = 8.0):
        self.mode, self.value = parse_mode(rate, step, rel_step, default, modes=modes)
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

    def step(self, stream: str, mean_sq: float, mean_abs: float = math.nan, *,
             measured_bits: float = math.nan, measured_target: float | None = None,
             target: float | None = None) -> float | None:
        """The step for ``stream``'s next tensor, with moments ``E[x^2]``, ``E[|x|]`` of
        its finite values (``E[|x|]`` only matters in rate mode); ``None`` when they carry
        no scale (all zero or non-finite: any step codes zeros exactly, so a caller keeps
        its previous step or takes 1).

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


class StepSettings:
    """A transport's step settings as attributes (``mode``, ``value``, ``rate_gain``,
    ``warmup_iters``, ``warmup_rate``, ``rate_corr``), read from its :class:`StepControl`
    in ``self.control``."""

    control: StepControl
    mode = property(lambda self: self.control.mode)
    value = property(lambda self: self.control.value)
    rate_gain = property(lambda self: self.control.rate_gain)
    warmup_iters = property(lambda self: self.control.warmup_iters)
    warmup_rate = property(lambda self: self.control.warmup_rate)

    @property
    def rate_corr(self) -> dict[str, float]:
        """Per stream (a DDP parameter; a link's peer, tag and direction): the rate loop's
        log2 step correction."""
        return self.control.corr
