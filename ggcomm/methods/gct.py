"""GCT, gradient-constrained training (arXiv 2506.00486, section 4.3, Eq. 9-14).

GCT trains with the objective ``D(w) + lam * R(g(w))``: the task loss plus ``lam`` times the
Exp-Golomb rate ``R`` (bits per element) of the gradient ``g = dD/dw`` itself, so that
training drifts towards weights whose gradients are cheap to send. The gradient of that
objective, ``g + lam * H dR/dg``, needs the Hessian ``H``; GCT keeps its diagonal and
estimates it from the previous step (a secant, no extra backward pass)::

    h_i  = (g_t,i - g_t-1,i) / clip(w_t,i - w_t-1,i, eps)
    g^_i = g_t,i + lam * h_i * dR/dg_i                     (the "equivalent gradient")

``clip`` moves denominators smaller than ``eps`` in magnitude to ``+-eps`` (zero counts as
positive). ``w_t - w_t-1`` is the real change the optimizer made, so any optimizer works
(SGD, AdamW, ...): it receives ``g^`` in place of ``g``. ``lam`` decays by ``gamma`` per
epoch (``lam_e = lam_0 * gamma^e``); the paper reports that a constant ``lam`` makes late
training oscillate.

``R`` is :func:`ggcomm.rate.eg_rate_surrogate` (the one differentiable rate model of the
project) of every gradient tensor, quantized with its step and weighted by its element
count: the average bits per element of all the gradients, the quantity the wire carries.

Usage, with any optimizer and after DDP has written the averaged gradients::

    gct = GCT(model.named_parameters(), lam=0.01, gamma=0.9)
    loss.backward()
    gct.apply_()              # rewrites p.grad in place
    optimizer.step()
    ...
    gct.epoch_end()           # at the end of each epoch: lam *= gamma

With ``torch.amp.GradScaler`` call ``scaler.unscale_(optimizer)`` before ``gct.apply_()``
(so the gradients are in true units) and ``scaler.step(optimizer)`` after it. Gradient
clipping, if any, goes after ``apply_()``.

What it costs: two extra copies of the parameters (``w_t-1`` and ``g_t-1``), about ten
elementwise passes over the gradients per step and two host synchronizations (finiteness
and RMS of the gradients, then the rate). No extra forward or backward pass, no communication: under
DDP every rank computes the same ``g^`` from the same averaged gradients.

What it gains, and when: where the diagonal secant tracks the curvature (nearly separable
losses, large or full batches) GCT is gradient descent on ``D + lam R`` and lowers the
gradient bits at equal steps (full-batch linear regression: 0.14-0.18 bits per element
fewer, at a lower loss). With small minibatches the difference ``g_t - g_t-1`` is dominated
by minibatch noise rather than by curvature, ``h`` is then mostly noise, and the correction
acts as noise on the update: on the small GPT of ``benchmarks/paper/gct_sweep.py`` (16 x 64
bytes per batch) no ``lam`` lowered the gradient bits at unchanged accuracy (results and
discussion in ``benchmarks/results/paper/``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import GCTStateError
from ..rate import check_k, eg_rate_surrogate
from ..step_policy import GCT_REL_STEP, StepControl

__all__ = ["DEFAULT_REL_STEP", "GCT", "GCTStateError"]

DEFAULT_REL_STEP = GCT_REL_STEP
"""Default step as a fraction of each gradient tensor's RMS
(:data:`ggcomm.step_policy.GCT_REL_STEP`, where its reason is given)."""

_STATE_VERSION = 1
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _named(params: Iterable[Any]) -> list[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` pairs from tensors (keyed by position) or ``(name, tensor)`` pairs."""
    out: list[tuple[str, torch.Tensor]] = []
    for i, item in enumerate(params):
        if isinstance(item, torch.Tensor):
            out.append((str(i), item))
        elif (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], torch.Tensor)
        ):
            out.append(item)
        else:
            raise TypeError(
                "params must be tensors or (name, tensor) pairs such as "
                f"model.named_parameters(), got {type(item).__name__} at position {i}"
            )
    if not out:
        raise ValueError("params is empty")
    keys = [k for k, _ in out]
    if len(set(keys)) != len(keys):
        raise ValueError("params has duplicate names")
    if len({id(p) for _, p in out}) != len(out):
        raise ValueError("params lists the same tensor twice")
    return out


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


class GCT:
    """Gradient-constrained training: rewrites ``p.grad`` into the equivalent gradient.

    Args:
        params: the parameters the optimizer updates, as tensors or as ``(name, tensor)``
            pairs (``model.named_parameters()``); names key :meth:`state_dict`, which then
            survives a change in parameter order.
        lam: initial Lagrange multiplier, in loss units per bit per element. Larger trades
            more task loss for fewer gradient bits; too large destabilizes training,
            because the secant curvature it multiplies is noisy.
        gamma: factor applied to ``lam`` by each :meth:`epoch_end`. Below 1 the constraint
            fades so late training converges as conventional training does; 1 keeps it
            constant (the paper reports late-training oscillation then).
        eps: smallest weight change (in weight units) the secant divides by; smaller
            changes are moved to ``+-eps``, keeping their sign. Smaller trusts tiny weight
            changes (a sharper but noisier curvature estimate); larger caps ``|h|`` at
            ``|g_t - g_t-1| / eps``. Set it below the typical per-step weight change.
        step: a fixed quantization step for the rate, in gradient units. Bits then track
            the gradient's magnitude and the constraint favours weights with small
            gradients; one step cannot suit tensors (or training phases) whose gradient
            scales differ by orders of magnitude.
        rel_step: step = ``rel_step`` x RMS of each gradient tensor (the default,
            ``DEFAULT_REL_STEP``, unless ``step`` is given). Scale-free and the same rule
            as the DDP hook's ``rel_step`` mode; the bits then depend only on the shape
            of each gradient's distribution, so they fall only if training makes the
            gradients peakier. The step is held constant when differentiating ``R``, as
            the codec treats it: side information, not a function of the data.
        k: Exp-Golomb order of the rate model. 0 suits peaked (low-shape) gradients at a
            few bits per element; higher orders suit finer steps.
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lam: float = 0.01,
        gamma: float = 0.9,
        eps: float = 1e-6,
        step: float | None = None,
        rel_step: float | None = None,
        k: int = 0,
    ) -> None:
        self._params = _named(params)
        lam = float(lam)
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam must be a non-negative finite number, got {lam!r}")
        self.lam0 = lam
        gamma = float(gamma)
        if not (0 < gamma <= 1):
            raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
        self.gamma = gamma
        self.eps = _positive("eps", eps)
        self._policy = StepControl(step=step, rel_step=rel_step,
                                  default=("rel_step", DEFAULT_REL_STEP),
                                  modes=("step", "rel_step"))
        self.step_mode, self.step_value = self._policy.mode, self._policy.value
        self.k = check_k(k)
        self.epoch = 0
        self.skipped = 0
        self.last_bits: float | None = None
        self._prev: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ schedule

    @property
    def lam(self) -> float:
        """The current multiplier, ``lam0 * gamma ** epoch``."""
        return self.lam0 * self.gamma**self.epoch

    def epoch_end(self) -> float:
        """Count one epoch: ``lam`` becomes ``lam0 * gamma ** epoch``. Returns the new ``lam``."""
        self.epoch += 1
        return self.lam

    # ------------------------------------------------------------------ the step

    def _steps(self, mean_sq: list[float]) -> list[float]:
        """Quantization steps of the gradients with mean squares ``mean_sq``."""
        # an all-zero gradient (no scale: None) is coded exactly by any step
        steps = (self._policy.step("gradient", m) for m in mean_sq)
        return [1.0 if s is None else s for s in steps]

    def _rate_gradients(
        self, grads: list[torch.Tensor], steps: list[float]
    ) -> tuple[float, list[torch.Tensor]]:
        """The rate ``R`` of all ``grads`` (bits per element) and ``dR/dg`` for each.

        Each gradient is divided by its own step and all are rated as one tensor with unit
        step: the mean over the concatenation is the element-weighted mean of the
        per-tensor rates, in one call instead of one per tensor.
        """
        pairs = zip(grads, steps, strict=True)
        scaled = torch.cat([g.detach().float().reshape(-1) / s for g, s in pairs])
        with torch.enable_grad():
            scaled.requires_grad_()
            rate = eg_rate_surrogate(scaled, 1.0, self.k)
            (d_scaled,) = torch.autograd.grad(rate, scaled)
        pieces = d_scaled.split([g.numel() for g in grads])
        d_rate = [d.view(g.shape) / s for d, g, s in zip(pieces, grads, steps, strict=True)]
        return float(rate), d_rate

    @torch.no_grad()
    def apply_(self) -> float | None:
        """Replace each ``p.grad`` by its equivalent gradient ``g + lam * h * dR/dg``.

        Parameters without a gradient are skipped. A parameter seen for the first time
        keeps its plain gradient (there is no previous step to take a secant from). The
        raw gradients and current weights are stored for the next call.

        If any gradient holds a NaN or an infinity, nothing is changed (gradients and
        state alike) so that ``GradScaler`` still sees them and skips the step, and the
        next secant spans the last real weight change.

        Returns:
            The rate ``R`` of the gradients received (bits per element: the smooth bound
            :func:`ggcomm.rate.eg_rate_surrogate`, at most 2 bits and typically a few
            tenths above the exact order-``k`` EG length), or ``None`` if the gradients
            were passed through.
        """
        items = [(key, p) for key, p in self._params if p.grad is not None]
        if not items:
            return None
        grads = [p.grad for _, p in items]
        sparse = [key for key, p in items if p.grad.layout != torch.strided]
        if sparse:
            raise TypeError(f"GCT needs dense gradients; sparse for {sparse[:5]}")
        # one host synchronization for the finiteness check and the mean squares
        stats = torch.stack(
            [torch.stack((torch.isfinite(g).all().float(), g.float().pow(2).mean())) for g in grads]
        ).tolist()
        if not all(finite == 1.0 for finite, _ in stats):
            self.skipped += 1
            return None
        steps = self._steps([mean_sq for _, mean_sq in stats])
        bits, d_rate = self._rate_gradients(grads, steps)
        lam = self.lam
        for (key, p), d in zip(items, d_rate, strict=True):
            g = p.grad
            work = torch.float32 if p.dtype in _LOW_PRECISION else p.dtype
            prev = self._prev.get(key)
            correction = None
            if prev is not None and lam != 0.0:
                w_prev, g_prev = prev
                dw = p.to(work) - w_prev.to(work)
                small = dw.abs() < self.eps
                dw = torch.where(small, torch.where(dw < 0, -self.eps, self.eps), dw)
                h = (g.to(work) - g_prev.to(work)) / dw
                correction = (lam * h * d.to(work)).to(g.dtype)
            if prev is None:
                self._prev[key] = (p.detach().clone(), g.detach().clone())
            else:
                prev[0].copy_(p)
                prev[1].copy_(g)
            if correction is not None:
                g.add_(correction)
        self.last_bits = bits
        return bits

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """The schedule (``lam0``, ``gamma``, ``epoch``) and the stored ``w_t-1``, ``g_t-1``."""
        return {
            "version": _STATE_VERSION,
            "lam0": self.lam0,
            "gamma": self.gamma,
            "epoch": self.epoch,
            "skipped": self.skipped,
            "w_prev": {key: w.clone() for key, (w, _) in self._prev.items()},
            "g_prev": {key: g.clone() for key, (_, g) in self._prev.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; a resumed run then matches an unbroken one.

        Raises:
            GCTStateError: if the version, the keys or a tensor's shape do not match.
        """
        if state.get("version") != _STATE_VERSION:
            raise GCTStateError(
                f"unsupported GCT state version {state.get('version')!r} "
                f"(expected {_STATE_VERSION})"
            )
        params = dict(self._params)
        w_prev, g_prev = state["w_prev"], state["g_prev"]
        if set(w_prev) != set(g_prev):
            raise GCTStateError("state has w_prev and g_prev for different parameters")
        unknown = sorted(set(w_prev) - set(params))
        if unknown:
            raise GCTStateError(
                f"state has entries for parameters this GCT does not have: {unknown[:5]}"
            )
        prev: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key in w_prev:
            p = params[key]
            for name, t in (("w_prev", w_prev[key]), ("g_prev", g_prev[key])):
                if tuple(t.shape) != tuple(p.shape):
                    raise GCTStateError(
                        f"{name}[{key!r}] has shape {tuple(t.shape)}, "
                        f"the parameter {tuple(p.shape)}"
                    )
            prev[key] = (
                w_prev[key].detach().to(p.device, p.dtype, copy=True),
                g_prev[key].detach().to(p.device, p.dtype, copy=True),
            )
        self.lam0 = float(state["lam0"])
        self.gamma = float(state["gamma"])
        self.epoch = int(state["epoch"])
        self.skipped = int(state.get("skipped", 0))
        self._prev = prev
