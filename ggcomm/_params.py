"""The one reader of a "params" argument: a module, or tensors, or (name, tensor) pairs."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["float_tensors"]


def float_tensors(params: Any) -> list[torch.Tensor]:
    """The tensors ``params`` names: a ``torch.nn.Module`` (its floating-point parameters)
    or an iterable of floating-point tensors or ``(name, tensor)`` pairs.

    Raises:
        TypeError: an item that is not a floating-point tensor.
        ValueError: no tensors, or the same tensor twice.
    """
    if isinstance(params, torch.nn.Module):
        params = [p for p in params.parameters() if p.is_floating_point()]
    out: list[torch.Tensor] = []
    for i, t in enumerate(params):
        if isinstance(t, tuple) and len(t) == 2 and isinstance(t[0], str):
            t = t[1]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(
                "params must be floating-point tensors or (name, tensor) pairs, "
                f"got {getattr(t, 'dtype', type(t).__name__)} at position {i}"
            )
        out.append(t)
    if not out:
        raise ValueError("params is empty")
    if len({id(t) for t in out}) != len(out):
        raise ValueError("params lists the same tensor twice")
    return out
