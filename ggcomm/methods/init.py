"""Generalized-Gaussian (GG) weight initialization (arXiv 2506.00486,
section 4.1, Eq. 3-5).

He initialization draws ``w ~ N(0, xi / n)`` so that a layer with fan-in ``n`` keeps the
variance of its output; ``xi`` corrects for the nonlinearity that follows (1 for none or
sigmoid, 2 for ReLU, ``2 / (1 + a^2)`` for LeakyReLU with slope ``a``; in general
``torch.nn.init.calculate_gain(nonlinearity, a) ** 2``). The variance argument never uses
normality, so any zero-mean distribution with that variance preserves it. GG
initialization draws from a generalized Gaussian of shape ``beta`` instead:

    alpha = sqrt(xi / n * Gamma(1/beta) / Gamma(3/beta)),   w ~ GG(0, alpha, beta).

``beta = 2`` is Kaiming-normal initialization. A smaller ``beta`` keeps the variance but puts
most weights much closer to zero and a few far out, so the quantized weights start with a
much lower entropy (and, the paper reports, stay lower after training).

What it costs: nothing at run time. The draw is done on the CPU in float64 (two draws per
element: a Gamma variate and a sign) and copied to the tensor's device, a one-off that is
slower than ``kaiming_normal_`` but negligible next to training.

Usage::

    from ggcomm.methods.init import apply_gg_init
    touched = apply_gg_init(model, 0.5, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ggcomm import gg

__all__ = ["DEFAULT_LAYERS", "GGInitResult", "apply_gg_init", "fan", "gg_", "init_std"]

Mode = Literal["fan_in", "fan_out"]

DEFAULT_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Embedding,
)
"""Layer types whose ``weight`` :func:`apply_gg_init` initializes by default."""


def fan(tensor: torch.Tensor, mode: Mode = "fan_in") -> int:
    """Fan-in or fan-out of a weight tensor, with the same convention as ``torch.nn.init``.

    For a ``(out, in, *kernel)`` weight (``nn.Linear``, ``nn.ConvNd``) the fan-in is
    ``in * prod(kernel)`` and the fan-out ``out * prod(kernel)``. For ``nn.Embedding``,
    whose weight is ``(num_embeddings, embedding_dim)``, the same rule reads
    ``embedding_dim`` as the fan-in; see :func:`apply_gg_init` for why that is the
    variance this module keeps.

    Raises:
        ValueError: for tensors with fewer than two dimensions or an unknown ``mode``.
    """
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
    if tensor.dim() < 2:
        raise ValueError(
            f"fan is undefined for a tensor with {tensor.dim()} dimension(s); "
            "GG initialization applies to weight matrices and kernels"
        )
    receptive = math.prod(tensor.shape[2:])
    return (tensor.shape[1] if mode == "fan_in" else tensor.shape[0]) * receptive


def init_std(
    tensor: torch.Tensor,
    *,
    nonlinearity: str = "relu",
    a: float = 0.0,
    mode: Mode = "fan_in",
) -> float:
    """Standard deviation :func:`gg_` gives ``tensor``: ``sqrt(xi / fan)``.

    ``xi = torch.nn.init.calculate_gain(nonlinearity, a) ** 2``. This is exactly the
    standard deviation ``torch.nn.init.kaiming_normal_`` uses with the same arguments.
    """
    n = fan(tensor, mode)
    if n == 0:
        raise ValueError(
            f"cannot initialize a tensor with zero {mode}: shape {tuple(tensor.shape)}"
        )
    gain = nn.init.calculate_gain(nonlinearity, a)  # type: ignore[arg-type]
    return gain / math.sqrt(n)


def _beta(beta: float | None, shape: float | None) -> float:
    """The GG shape ``beta``, given as ``beta`` or under its former keyword ``shape``."""
    if (beta is None) == (shape is None):
        raise TypeError("give the GG shape once, as beta (shape= is its former name)")
    return gg.check_beta(beta if beta is not None else shape)


def _check_generator(generator: torch.Generator | None) -> None:
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU torch.Generator (the draw is made on the CPU and "
            f"copied to the tensor's device), got one on {generator.device}"
        )


def gg_(
    tensor: torch.Tensor,
    beta: float | None = None,
    *,
    nonlinearity: str = "relu",
    a: float = 0.0,
    mode: Mode = "fan_in",
    generator: torch.Generator | None = None,
    shape: float | None = None,
) -> torch.Tensor:
    """Fill ``tensor`` in place with GG(0, alpha, ``beta``) draws of variance ``xi / fan``.

    The counterpart of ``torch.nn.init.kaiming_normal_`` (same ``nonlinearity``, ``a`` and
    ``mode`` arguments, same variance; ``beta=2`` is a Kaiming-normal draw). ``beta`` is
    the GG shape (``shape=`` is its former keyword): lower means more weights near zero and
    heavier tails at the same variance, hence a lower quantized entropy. Samples come from
    ``generator`` (a CPU ``torch.Generator``; the global RNG when ``None``) through
    :func:`ggcomm.gg.sample`, so a seeded generator gives the same weights on every machine.
    Runs under ``no_grad`` and
    returns ``tensor``.

    Fan-in is the default, as the variance derivation requires (the output variance of a
    layer sums over its inputs). The reference code released with the paper used
    ``weight.shape[0]`` (``out_features``) instead; pass ``mode="fan_out"`` to reproduce
    that.

    Very small shapes have enormous kurtosis (about ``3e6`` at ``beta=0.1``): the variance
    is right in expectation, but the sample variance of a single layer can be far from it,
    dominated by a handful of large weights.

    Raises:
        ValueError: for ``beta <= 0``, tensors with fewer than two dimensions, an unknown
            ``mode`` or a non-CPU generator. TypeError: for non-floating-point tensors.
    """
    if not tensor.is_floating_point():
        raise TypeError(f"gg_ needs a floating-point tensor, got {tensor.dtype}")
    beta = _beta(beta, shape)
    _check_generator(generator)
    std = init_std(tensor, nonlinearity=nonlinearity, a=a, mode=mode)
    draw = gg.sample(tensor.shape, beta, std=std, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        tensor.copy_(draw)
    return tensor


@dataclass(frozen=True)
class GGInitResult:
    """What :func:`apply_gg_init` wrote, keyed by qualified parameter name.

    ``weights`` holds the GG-initialized weight tensors (the natural argument for
    :class:`ggcomm.methods.backslash.BackSlash`), ``biases`` the biases it set to zero.
    """

    weights: dict[str, nn.Parameter] = field(default_factory=dict)
    biases: dict[str, nn.Parameter] = field(default_factory=dict)

    def names(self) -> list[str]:
        """All parameter names written, weights first."""
        return [*self.weights, *self.biases]


def apply_gg_init(
    model: nn.Module,
    beta: float | None = None,
    *,
    nonlinearity: str = "relu",
    a: float = 0.0,
    mode: Mode = "fan_in",
    generator: torch.Generator | None = None,
    include: Iterable[type[nn.Module]] = DEFAULT_LAYERS,
    shape: float | None = None,
) -> GGInitResult:
    """GG-initialize the weights of every ``include`` layer of ``model``; zero their biases.

    Layers are visited in ``model.named_modules()`` order and drawn from one ``generator``,
    so a seed fixes the whole model. Parameters shared between layers (tied embeddings)
    are written once, by the first layer that owns them. Normalization layers and any
    parameter of a layer type not in ``include`` keep their values. An ``nn.Embedding``
    with a ``padding_idx`` gets that row zeroed again, as its own initializer does.

    What fan means for ``nn.Embedding``: the weight is ``(num_embeddings, embedding_dim)``
    and, as in ``torch.nn.init``, ``embedding_dim`` is read as the fan-in. A lookup is a
    product with a one-hot vector, so its literal fan-in is a single input and variance
    preservation would ask for ``Var(w) = xi`` (PyTorch's ``N(0, 1)`` default). That makes
    the token vector ``sqrt(embedding_dim)`` times larger than the ``xi / d``-variance
    activations the linear layers of a width-``d`` model are scaled for; with
    ``embedding_dim`` as the fan each embedding row has squared norm ``xi``, the same as a
    layer output, which keeps the residual stream of a transformer on one scale.

    Note that this replaces any model-specific scheme, for example GPT-2's down-scaling of
    residual projections: with ``beta=2`` the model gets plain Kaiming-normal weights.

    Returns:
        A :class:`GGInitResult` naming the weights initialized and the biases zeroed.
    """
    include = tuple(include)
    if not include or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in include):
        raise TypeError(f"include must be a non-empty sequence of nn.Module types, got {include}")
    # validate once up front so an error leaves the model untouched
    beta = _beta(beta, shape)
    _check_generator(generator)
    result = GGInitResult()
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, include):
            continue
        prefix = f"{name}." if name else ""
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and id(weight) not in seen:
            seen.add(id(weight))
            gg_(weight, beta, nonlinearity=nonlinearity, a=a, mode=mode, generator=generator)
            padding_idx = getattr(module, "padding_idx", None)
            if isinstance(module, nn.Embedding) and padding_idx is not None:
                with torch.no_grad():
                    weight[padding_idx].zero_()
            result.weights[prefix + "weight"] = weight
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and id(bias) not in seen:
            seen.add(id(bias))
            with torch.no_grad():
                bias.zero_()
            result.biases[prefix + "bias"] = bias
    return result
