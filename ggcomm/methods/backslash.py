"""BackSlash: rate-constrained training of the weights (Wu et al., ICML 2025; the
baseline arXiv 2506.00486 builds on).

BackSlash (Wu et al., 2025) models the weights as generalized Gaussian, ``GG(0, alpha,
beta)``, whose code length per weight is ``(|w| / alpha)^beta`` nats plus a constant, and
adds that rate to the training objective. It is applied as a separate step after each
optimizer step: a gradient step on the code length, of size ``strength * sigma^2``::

    w <- w - strength * beta * sigma^2 / alpha^beta * sign(w) * (|w| + clip * sigma)^(beta - 1)

with ``beta``, ``alpha`` and the standard deviation ``sigma`` fitted to all the constrained
weights together (:func:`ggcomm.gg.fit`) and refitted every ``refit_every`` steps. A weight
never crosses zero: one whose shrink exceeds its magnitude is set to exactly zero.

How this relates to the reference code, ``w <- w - c * beta / n * sign(w) * (|w| +
clip)^(beta - 1)`` with ``n`` the number of weights: that is a step on the *mean* of
``|w|^beta``, so ``c`` has to grow with the model size, and its effect depends on the units
of the weights and, through ``alpha^beta``, steeply on the shape. Here
``c / n = strength * sigma^2 / alpha^beta`` and the absolute clip is ``clip * sigma``, which
makes ``strength`` independent of all three: for ``beta = 2`` the update is exactly
decoupled weight decay, ``w <- (1 - strength) w`` (up to the clip); for ``beta = 1`` a
soft threshold of ``sqrt(2) * strength * sigma``; for ``beta < 1`` small weights are pushed
hardest, so the weights become sparse. At ``|w| = sigma`` the shrink is between 1 and 2
times ``strength * sigma`` for every shape from 0.1 to 2. Stopping at zero (the reference
code lets weights overshoot and oscillate around it) is the proximal form of the same step;
it produces exact zeros, which cost the fewest bits.

Usage, after :func:`ggcomm.methods.init.apply_gg_init` or any initialization::

    bs = BackSlash(model_weights, strength=1e-4)
    loss.backward(); optimizer.step(); bs.step()

What it costs: one elementwise pass over the weights per step, and every ``refit_every``
steps a strided sample of at most ``max_fit_samples`` weights copied to the CPU and fitted
(a few milliseconds). What it gains: weights whose quantized entropy and Exp-Golomb bits
are lower at a given step, the more so the lower the fitted shape.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ggcomm import gg
from ggcomm._params import float_tensors

__all__ = ["BackSlash"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class BackSlash:
    """Weight-rate constraint applied after each optimizer step.

    Args:
        params: the weights to constrain (tensors or ``(name, tensor)`` pairs), usually
            the weight matrices and embeddings, not biases or normalization parameters.
        strength: step size on the per-weight GG code length in units of the weight
            variance (see the module docstring); at ``beta = 2`` the fraction of every
            weight removed per step, like decoupled weight decay (the default is of the
            order of AdamW's ``lr * weight_decay``). Larger compresses more and sooner;
            too large shrinks weights faster than the task gradient can hold them, and
            because the fitted shape falls as the weights sparsify, which strengthens the
            push on small weights, the collapse is abrupt: on the small GPT of
            ``benchmarks/paper/init_backslash.py`` 1e-4 compressed at no accuracy cost,
            1e-3 zeroed 87% of the weights and cost 17 points of next-byte accuracy.
        clip: added to ``|w| / sigma`` before the power, so that for ``beta < 1`` the
            push near zero stays finite (at most ``clip^(beta - 1)`` times that at
            ``|w| = sigma``). Smaller zeroes small weights more aggressively, which matters
            most at low shapes.
        refit_every: steps between refits of ``beta`` and ``alpha``. The distribution moves
            slowly, so refitting rarely costs little accuracy; 1 refits every step.
        max_fit_samples: at most this many weights (an even stride through each tensor)
            are used for a fit. More gives a steadier ``beta`` at a proportional cost.
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        strength: float = 1e-4,
        clip: float = 0.1,
        refit_every: int = 100,
        max_fit_samples: int = 200_000,
    ) -> None:
        self._params = float_tensors(params)
        self.strength = float(strength)
        if not (math.isfinite(self.strength) and self.strength >= 0):
            raise ValueError(f"strength must be a non-negative finite number, got {strength!r}")
        self.clip = float(clip)
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a positive finite number, got {clip!r}")
        for name, value in (("refit_every", refit_every), ("max_fit_samples", max_fit_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.refit_every = refit_every
        self.max_fit_samples = max_fit_samples
        self.steps = 0
        self.beta: float | None = None
        self.scale: float | None = None

    @torch.no_grad()
    def refit(self) -> gg.GGFit | None:
        """Fit ``beta`` and ``alpha`` to the weights now; ``None`` if they are all zero.

        Raises:
            ValueError: if a weight is NaN or infinite.
        """
        total = sum(p.numel() for p in self._params)
        stride = max(1, -(-total // self.max_fit_samples))
        sample = torch.cat([p.detach().reshape(-1)[::stride].double().cpu() for p in self._params])
        if not torch.isfinite(sample).all():
            raise ValueError("BackSlash: the weights contain NaN or infinite values")
        if sample.numel() == 0 or not sample.any():
            self.beta = self.scale = None
            return None
        fit = gg.fit(sample.numpy())
        self.beta, self.scale = fit.beta, fit.scale
        return fit

    @torch.no_grad()
    def step(self) -> None:
        """Shrink every weight towards zero by its GG rate gradient (refitting when due)."""
        if self.steps % self.refit_every == 0 or self.beta is None:
            self.refit()
        self.steps += 1
        if self.beta is None or self.scale is None or self.strength == 0.0:
            return
        beta, alpha = self.beta, self.scale
        sigma = math.sqrt(gg.variance(alpha, beta))
        # strength * beta * sigma^2 / alpha^beta * (|w| + clip sigma)^(beta - 1), written in
        # units of sigma: alpha^beta underflows for small shapes, (sigma / alpha)^beta not
        coef = self.strength * beta * sigma * math.exp(beta * math.log(sigma / alpha))
        for p in self._params:
            w = p.float() if p.dtype in _LOW_PRECISION else p
            mag = w.abs()
            shrink = coef * (mag / sigma + self.clip).pow(beta - 1.0)
            p.copy_(torch.sign(w) * (mag - shrink).clamp_min(0.0))

    def state_dict(self) -> dict[str, Any]:
        """Step count and the current fit (no tensors: the fit is two numbers)."""
        return {"steps": self.steps, "beta": self.beta, "scale": self.scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; a resumed run matches an unbroken one."""
        missing = {"steps", "beta", "scale"} - set(state)
        if missing:
            raise ValueError(f"BackSlash state is missing {sorted(missing)}")
        self.steps = int(state["steps"])
        self.beta = None if state["beta"] is None else float(state["beta"])
        self.scale = None if state["scale"] is None else float(state["scale"])
