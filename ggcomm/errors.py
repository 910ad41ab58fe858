"""Every exception ggcomm raises on purpose, under one base class.

Catch :class:`GGCommError` to handle anything ggcomm refuses; each subclass also derives
from the built-in type a caller would expect (``ValueError`` for bad bytes or state,
``RuntimeError`` for peers and links), so existing ``except`` clauses keep working.
"""

from __future__ import annotations

__all__ = [
    "BenchError",
    "FrameError",
    "GCTStateError",
    "GGCommError",
    "LinkOutOfStepError",
    "PipeLinkError",
    "PipeSettingsError",
    "SettingsMismatchError",
    "StateLoadError",
]


class GGCommError(Exception):
    """Base of every error ggcomm raises on purpose."""


class FrameError(GGCommError, ValueError):
    """The bytes are not a valid ggcomm frame (corrupt, truncated, oversized or mismatched)."""


class SettingsMismatchError(GGCommError, RuntimeError):
    """Peers were configured differently: DDP ranks, or the two ends of a pipeline link
    (settings or ggcomm versions disagree)."""


class StateLoadError(GGCommError, ValueError):
    """A saved state does not fit what it is loaded into (names, shapes, rank, world size)."""


class PipeLinkError(GGCommError, RuntimeError):
    """A pipeline link is broken: a message could not be taken off it, so every later
    call on it fails instead of desynchronising the peers."""


class LinkOutOfStepError(GGCommError, RuntimeError):
    """A stage was asked for receives it never consumed, so the link is out of step."""


class GCTStateError(GGCommError, ValueError):
    """A GCT state dict does not match the parameters it is loaded into."""


PipeSettingsError = SettingsMismatchError
"""The former name of :class:`SettingsMismatchError` on pipeline links (the same class)."""


class BenchError(GGCommError, RuntimeError):
    """A launch failed or could not start; the message names the group and what went wrong."""
