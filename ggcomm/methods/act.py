"""ACT, activation-constrained training (arXiv 2506.00486, section 4.2, Eq. 6-8).

    loss = D(theta) + lambda_t * R

``R`` is the rate, in bits per element, that :func:`ggcomm.codec.encode` spends on the
activations that cross a stage boundary of a model-parallel split (a pipeline stage's
output). The rate model is :func:`ggcomm.rate.eg_rate`: its value is the codec's frame
bits for the tensor at the chosen step (per-block best order, zero-run blocks, headers), to
the bit; its gradient is that of the smooth Exp-Golomb length bound through a
straight-through quantizer. This module only collects those rates and adds them, the way a
rate-distortion loss adds its entropy model's rate:

    act = ACT(lam=0.02, rel_step=0.05, warmup_steps=500)
    act.attach(model.blocks[1])                 # forward hook on the stage's last module
    for x, y in batches:
        _, loss = model(x, y)
        (loss + act.penalty()).backward()       # lambda_t * R of this forward
        opt.step(); opt.zero_grad(); act.step() # advance the lambda schedule

or place ``act.tap("stage0")``, an identity module, as the last layer of a stage (an
``nn.Sequential``, a ``deepspeed.pipe.PipelineModule`` layer list). In a real pipeline the
loss lives on the last stage only; ``ACT(..., inject=True)`` then adds ``lambda_t * dR/da``
to the activation's gradient inside the tap's backward, so each stage applies its own
boundary's penalty with no loss plumbing (``penalty()`` is then only a logged value).

Several taps, or one tap called several times before :meth:`ACT.penalty` (micro-batches),
combine by ``reduction``: ``"mean"`` (default) is the element-weighted mean, total bits
over total elements, i.e. bits per element of everything sent, so ``lam`` keeps its
meaning whatever the number and size of the boundaries; ``"sum"`` adds the per-tensor bits
per element, the paper's Eq. 6 literally (each boundary counts equally, whatever its size).

Non-finite activations: the codec sends them raw in its exception list, and the rate's
value counts them so; they are left out of the step's RMS and get no rate gradient, so
one overflow never turns the penalty or its gradient into NaN. With a relative step, a
tensor with no finite nonzero element has no scale to set the step from: it is not
recorded and is counted in :attr:`ACT.skipped`.

Schedule ("progressive" ACT): lambda is 0 before ``start_step``, then rises linearly to
``lam`` over ``warmup_steps`` calls of :meth:`ACT.step`; :meth:`ACT.state_dict` keeps the
position so a resumed run continues the ramp.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .. import rate as _rate
from ..codec import DEFAULT_BLOCK_SIZE
from ..quant import fake_quantize, rms
from ..step_policy import ACT_REL_STEP, TRANSPORT_RANS, StepControl

__all__ = ["ACT", "DEFAULT_REL_STEP", "RateTap", "TapStats"]

DEFAULT_REL_STEP = ACT_REL_STEP
"""Default step, relative to the activation's RMS (:data:`ggcomm.step_policy.ACT_REL_STEP`,
where its reason is given)."""

Reduction = Literal["mean", "sum"]


@dataclass(frozen=True)
class TapStats:
    """The last tensor a tap recorded: what the codec would send for it."""

    bits: float  # codec bits per element (frame included) at the step below
    numel: int
    step: float
    peak_to_rms: float  # max |a| / RMS over finite elements: how far the outliers reach


@dataclass
class _Record:
    name: str
    rate: torch.Tensor  # differentiable bits per element
    numel: int


class _InjectRateGradient(torch.autograd.Function):
    """Identity on ``x``; backward also sends gradient 1 into ``penalty`` (a scalar whose
    graph leads back to ``x``), so ``d penalty / dx`` is added to ``x``'s gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
        ctx.penalty_meta = (penalty.shape, penalty.dtype, penalty.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        shape, dtype, device = ctx.penalty_meta
        return grad, torch.ones(shape, dtype=dtype, device=device)


class RateTap(nn.Module):
    """Identity module that records the rate of what passes through into its :class:`ACT`.

    Place it where a tensor leaves a pipeline stage (the stage's last layer). Build it with
    :meth:`ACT.tap`. Holds no parameters or buffers, so model state dicts are unchanged.
    """

    def __init__(self, act: ACT, name: str) -> None:
        super().__init__()
        self.act = act
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act.record(self.name, x)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class ACT:
    """Activation rate penalty ``lambda_t * R`` with a warm-up schedule.

    Args:
        lam: the Lagrange multiplier at full strength, in loss units per bit per element.
            Larger trades task loss for fewer bits; compare it with the task loss's scale
            (cross-entropy of a few nats: 0.01-0.1 moves bits by several per element).
        step: fixed quantization step. Bits are then those of a transport with that fixed
            step: the penalty can lower them by shrinking the activations' scale as well as
            by reshaping them, and the fixed step's distortion grows relative to a shrinking
            signal. Suits a transport configured with one fixed step.
        rel_step: step as a multiple of each tensor's RMS (the default, ``DEFAULT_REL_STEP``,
            when neither is given). The distortion relative to the signal is then fixed and
            the rate does not depend on scale (its gradient has no rescaling component), so
            bits fall only by changing the distribution's shape: fewer outliers, more mass
            near zero. Suits a transport that sets its step from the RMS.
        k: Exp-Golomb order, or "auto" for the codec's per-block choice.
        block_size, zero_runs, rans: as :func:`ggcomm.codec.encode`; match the transport's
            (``rans`` defaults to the transports' ``TRANSPORT_RANS``).
        warmup_steps: lambda rises linearly from 0 to ``lam`` over this many calls of
            :meth:`step` (0: full strength at once). A ramp lets the task loss settle before
            the rate pulls on the activations, which costs less accuracy than a cold start.
        start_step: lambda is 0 before this step (the ramp starts here). Training without
            the constraint first gives the model its features; starting late shortens the
            time the constraint has to reshape them.
        reduction: how several recorded tensors combine (module docstring): "mean" by
            default, "sum" with ``inject`` (the only one it allows).
        inject: add the gradient of ``lambda_t * R`` inside each tap's backward instead of
            through :meth:`penalty` (for pipelines, where the loss is on another stage).
        inject_scale: factor on the injected gradient: ``1 / gradient_accumulation_steps``
            when the engine divides the loss by it, times the loss scale under fp16 loss
            scaling; 1 otherwise.
        quantize_forward: pass the activation on as the receiver decodes it
            (``round(a / step) * step``, straight-through gradient), so training sees the
            transport's distortion. Applies with or without gradients (evaluation too).

    Tensors are recorded only while gradients are enabled (so evaluation passes add nothing)
    and are held, with their graph, until :meth:`penalty` or :meth:`step` clears them. Under
    reentrant activation checkpointing, put taps outside the checkpointed region: inside it
    they would record again during the backward recomputation.
    """

    def __init__(
        self,
        lam: float,
        *,
        step: float | None = None,
        rel_step: float | None = None,
        k: int | Literal["auto"] = "auto",
        block_size: int = DEFAULT_BLOCK_SIZE,
        zero_runs: bool | Literal["auto"] = "auto",
        rans: bool = TRANSPORT_RANS,
        warmup_steps: int = 0,
        start_step: int = 0,
        reduction: Reduction | None = None,
        inject: bool = False,
        inject_scale: float = 1.0,
        quantize_forward: bool = False,
    ) -> None:
        self._policy = StepControl(step=step, rel_step=rel_step,
                                  default=("rel_step", DEFAULT_REL_STEP),
                                  modes=("step", "rel_step"))
        if reduction is None:
            reduction = "sum" if inject else "mean"
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if inject and reduction != "sum":
            raise ValueError(
                "with inject=True each tensor's penalty is applied in its own backward, "
                "which is reduction='sum'"
            )
        if not math.isfinite(inject_scale):
            raise ValueError(f"inject_scale must be finite, got {inject_scale!r}")
        _rate.check_coded_args(torch.zeros(1), k, block_size, zero_runs, rans)
        fixed = self._policy.mode == "step"
        self.quant_step = self._policy.value if fixed else None
        self.rel_step = None if fixed else self._policy.value
        self.k = k
        self.block_size = int(block_size)
        self.zero_runs = zero_runs
        self.rans = rans
        self.reduction: Reduction = reduction
        self.inject = bool(inject)
        self.inject_scale = float(inject_scale)
        self.quantize_forward = bool(quantize_forward)
        self.enabled = True
        self.lam = 0.0
        self.warmup_steps = 0
        self.start_step = 0
        self.num_steps = 0
        self.skipped = 0
        self._set_schedule(lam, warmup_steps, start_step)
        self._records: list[_Record] = []
        self._last: dict[str, tuple[torch.Tensor, int, float, torch.Tensor]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._names: set[str] = set()

    def _set_schedule(self, lam: float, warmup_steps: int, start_step: int) -> None:
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        for label, value in (("warmup_steps", warmup_steps), ("start_step", start_step)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{label} must be an int >= 0, got {value!r}")
        self.lam = float(lam)
        self.warmup_steps = warmup_steps
        self.start_step = start_step

    # ------------------------------------------------------------------ schedule

    @property
    def current_lam(self) -> float:
        """Lambda at the current step: 0 before ``start_step``, then a linear ramp reaching
        ``lam`` after ``warmup_steps`` more steps."""
        t = self.num_steps - self.start_step
        if t < 0:
            return 0.0
        if self.warmup_steps == 0:
            return self.lam
        return self.lam * min(1.0, t / self.warmup_steps)

    def step(self) -> None:
        """Advance the schedule by one training step and drop unconsumed records."""
        self.num_steps += 1
        self._records.clear()

    def state_dict(self) -> dict[str, Any]:
        """The schedule and its position (quantization settings are constructor arguments)."""
        return {
            "lam": self.lam,
            "warmup_steps": self.warmup_steps,
            "start_step": self.start_step,
            "num_steps": self.num_steps,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the schedule resumes where it was)."""
        missing = {"lam", "warmup_steps", "start_step", "num_steps"} - set(state)
        if missing:
            raise KeyError(f"ACT state is missing {sorted(missing)}")
        num_steps = state["num_steps"]
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"num_steps must be an int >= 0, got {num_steps!r}")
        self._set_schedule(float(state["lam"]), state["warmup_steps"], state["start_step"])
        self.num_steps = num_steps
        self.skipped = int(state.get("skipped", 0))
        self._records.clear()

    # ------------------------------------------------------------------ taps

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"a tap named {name!r} already exists")
        self._names.add(name)
        return name

    def tap(self, name: str | None = None) -> RateTap:
        """A new identity module recording into this ACT (names must be unique)."""
        return RateTap(self, self._claim(name or f"tap{len(self._names)}"))

    def attach(self, modules: nn.Module | Iterable[nn.Module] | Mapping[str, nn.Module]) -> None:
        """Record the outputs of ``modules`` through forward hooks.

        A mapping gives the taps' names; otherwise they are ``tap0``, ``tap1``, .... An
        output that is a tuple or list is tapped at its first element (as transformer
        blocks that also return caches do). :meth:`remove` takes the hooks off.
        """
        if isinstance(modules, nn.Module):
            items = [(None, modules)]
        elif isinstance(modules, Mapping):
            items = list(modules.items())
        else:
            items = [(None, m) for m in modules]
        for name, module in items:
            if not isinstance(module, nn.Module):
                raise TypeError(f"expected nn.Module, got {type(module).__name__}")
            tap_name = self._claim(name or f"tap{len(self._names)}")
            self._handles.append(module.register_forward_hook(self._hook(tap_name)))

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            if isinstance(output, (tuple, list)):
                if not output or not isinstance(output[0], torch.Tensor):
                    raise TypeError(f"tap {name!r}: output's first element is not a tensor")
                first = self.record(name, output[0])
                if first is output[0]:
                    return None
                items = [first, *output[1:]]
                return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"tap {name!r}: output is a {type(output).__name__}")
            out = self.record(name, output)
            return out if out is not output else None

        return hook

    def remove(self) -> None:
        """Take off every forward hook :meth:`attach` put on (taps built by :meth:`tap`
        stay in their models and keep recording; set ``enabled = False`` to stop them)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._records.clear()

    # ------------------------------------------------------------------ rates

    def _step_for(self, a: torch.Tensor) -> tuple[float | None, float]:
        """(step, RMS of the finite elements); step is None when there is no scale."""
        scale = rms(a)
        return self._policy.step("activation", scale * scale), scale

    def record(self, name: str, a: torch.Tensor) -> torch.Tensor:
        """Record the rate of ``a`` under ``name``; returns what to pass on (``a`` itself,
        or its decoded/injecting stand-in). Taps and hooks call this."""
        if not isinstance(a, torch.Tensor) or not a.is_floating_point():
            raise TypeError(f"tap {name!r}: expected a floating-point tensor")
        recording = self.enabled and torch.is_grad_enabled() and a.numel() > 0
        if not (recording or self.quantize_forward):
            return a
        step, scale = self._step_for(a)
        if step is None:
            self.skipped += int(recording)
            return a
        out = fake_quantize(a, step) if self.quantize_forward else a
        if not recording:
            return out
        kwargs = {"k": self.k, "block_size": self.block_size, "zero_runs": self.zero_runs,
                  "rans": self.rans}
        if self.quant_step is not None:
            r = _rate.eg_rate(a, self.quant_step, **kwargs)
        else:
            r = _rate.eg_rate(a, rel_step=self.rel_step, **kwargs)
        peak = torch.nan_to_num(a.detach().abs(), posinf=0.0).max()
        self._last[name] = (r.detach(), a.numel(), step, peak / scale if scale > 0 else peak)
        if self.inject:
            lam = self.current_lam * self.inject_scale
            if lam != 0.0 and a.requires_grad:
                out = _InjectRateGradient.apply(out, lam * r)
            r = r.detach()
        self._records.append(_Record(name, r, a.numel()))
        return out

    def rate(self) -> torch.Tensor:
        """``R`` over the tensors recorded since the last :meth:`penalty` / :meth:`step`
        (bits per element, combined by ``reduction``; 0 when nothing was recorded)."""
        if not self._records:
            return torch.zeros(())
        rates = torch.stack([r.rate for r in self._records])
        if self.reduction == "sum":
            return rates.sum()
        weights = torch.tensor(
            [float(r.numel) for r in self._records], dtype=rates.dtype, device=rates.device
        )
        return (rates * weights).sum() / weights.sum()

    def penalty(self) -> torch.Tensor:
        """``lambda_t * R`` to add to the loss; consumes the records.

        With ``inject=True`` the gradient was already applied in the taps' backward, and
        this returns the penalty's value detached (adding it to the loss changes nothing
        but the logged number).
        """
        out = self.current_lam * self.rate()
        self._records.clear()
        return out.detach() if self.inject else out

    def stats(self) -> dict[str, TapStats]:
        """Per tap, what the codec would send for the last tensor it recorded."""
        return {
            name: TapStats(float(bits), numel, step, float(peak))
            for name, (bits, numel, step, peak) in self._last.items()
        }
