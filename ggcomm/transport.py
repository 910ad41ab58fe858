"""What every transport shares: its settings fingerprint and its traffic counters.

The DDP hook (:mod:`ggcomm.ddp`) and pipeline send/recv (:mod:`ggcomm.pipeline`, under the
DeepSpeed plugin and ``torch.distributed.pipelining`` stages) both

* hash the settings the two ends must agree on into a 32-bit :func:`fingerprint` that
  travels with every message (a frame's tag, a pipeline preamble), so that differently
  configured peers raise :class:`~ggcomm.errors.SettingsMismatchError` instead of decoding
  each other's bytes wrongly;
* count what they hand to ``torch.distributed`` in one :class:`TrafficStats`.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from typing import Any

import torch

from . import __version__, codec
from .errors import SettingsMismatchError, StateLoadError

__all__ = ["TrafficStats", "check_saved_settings", "check_state_header", "fingerprint",
           "raise_after_backward", "rank_and_world", "state_header"]


def fingerprint(settings: dict[str, Any]) -> int:
    """32-bit hash (CRC-32 of the sorted JSON) of ``settings`` plus the ggcomm and frame
    format versions: what two ends compare before trusting each other's bytes."""
    tagged = {"ggcomm": __version__, "format": codec.VERSION, **settings}
    return zlib.crc32(json.dumps(tagged, sort_keys=True).encode())


def check_saved_settings(mine: dict[str, Any], saved: dict[str, Any]) -> None:
    """Raise :class:`~ggcomm.errors.SettingsMismatchError` unless a checkpoint's settings
    equal the loader's, apart from the package version and the frame format: those are wire
    properties, so residuals and steps carry over an upgrade (the frames' fingerprints
    still keep ranks on different versions apart)."""
    wire = ("ggcomm", "format")
    a = {k: v for k, v in mine.items() if k not in wire}
    b = {k: v for k, v in saved.items() if k not in wire}
    if a != b:
        raise SettingsMismatchError(f"state_dict was saved with settings {b}, this one has {a}")


def rank_and_world(group: Any = None) -> tuple[int, int]:
    """This process's rank and the world size in ``group`` (0 and 1 without a process
    group): whose state a checkpoint holds."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def state_header(version: int, settings: dict[str, Any], group: Any = None) -> dict[str, Any]:
    """The fields every transport's ``state_dict`` starts with: format version, settings,
    and the rank and world size it belongs to (each rank saves its own)."""
    rank, world = rank_and_world(group)
    return {"version": version, "settings": settings, "rank": rank, "world_size": world}


def check_state_header(sd: Any, version: int, settings: dict[str, Any], what: str,
                       group: Any = None) -> None:
    """Raise :class:`~ggcomm.errors.StateLoadError` unless ``sd`` is a ``what`` state of
    ``version`` saved by this rank at this world size, and
    :class:`~ggcomm.errors.SettingsMismatchError` unless its settings are these."""
    if not isinstance(sd, dict) or sd.get("version") != version:
        raise StateLoadError(f"not a {what} state_dict (or another version)")
    check_saved_settings(settings, sd["settings"])
    rank, world = rank_and_world(group)
    if (sd["rank"], sd["world_size"]) != (rank, world):
        raise StateLoadError(f"this state was saved by rank {sd['rank']} of "
                             f"{sd['world_size']}, and is loaded on rank {rank} of {world}: "
                             "each rank saves and loads its own (at the same world size)")


class TrafficStats:
    """Byte, element and time counters of one transport, per stream and per iteration.

    ``counters`` names what is counted, ``streams`` the separate ledgers (the DDP hook has
    one; a pipeline link counts ``"forward"`` activations apart from ``"backward"``
    gradients). Counts accumulate into ``counts[stream]`` for the whole run and into the
    current iteration, which :meth:`end_iteration` closes (the DDP hook does, once per backward
    pass); ``last_buckets`` keeps the per-bucket records of the last closed iteration.

    :meth:`summary` derives the ratios from the counters present, one rule for every
    transport: for each side (``""`` for what the DDP hook moves, ``"_sent"`` and
    ``"_received"`` for a link) ``ratio = raw_bytes / bytes`` (what the same tensors would
    cost uncompressed over what crossed) and ``bits_per_element = 8 bytes / elements``.
    """

    def __init__(self, counters: Sequence[str], streams: Sequence[str] = ("all",)) -> None:
        self.counters = tuple(counters)
        self.streams = tuple(streams)
        self.reset()

    def _zero(self) -> dict[str, dict[str, float]]:
        return {s: {**dict.fromkeys(self.counters, 0.0), "steps": 0} for s in self.streams}

    def reset(self) -> None:
        """Zero every counter and forget the iterations."""
        self.counts = self._zero()
        self._last = self._zero()
        self._current = self._zero()
        self.closed = 0  # iterations closed by end_iteration
        self.buckets: list[dict] = []  # per-bucket records of the current iteration
        self.last_buckets: list[dict] = []

    def add(self, stream: str | None = None, **counts: float) -> None:
        """Add ``counts`` to ``stream`` (may be left out when there is one stream)."""
        if stream is None:
            if len(self.streams) != 1:
                raise ValueError(f"name the stream, one of {self.streams}")
            stream = self.streams[0]
        total, current = self.counts[stream], self._current[stream]
        for name, value in counts.items():
            total[name] += value
            current[name] += value

    def end_iteration(self) -> dict[str, float]:
        """Close the current iteration; returns its derived counts."""
        for stream in self.streams:
            self._current[stream]["steps"] = 1
            self.counts[stream]["steps"] += 1
        self._last, self._current = self._current, self._zero()
        self.last_buckets, self.buckets = self.buckets, []
        self.closed += 1
        return self.derived(self._merged(self._last))

    @property
    def total(self) -> dict[str, float]:
        """Every counter over the whole run, all streams together."""
        return self._merged(self.counts)

    @property
    def last_step(self) -> dict[str, float]:
        """Every counter of the last closed iteration, all streams together."""
        return self._merged(self._last)

    def _merged(self, per_stream: dict[str, dict[str, float]]) -> dict[str, float]:
        out = dict.fromkeys([*self.counters, "steps"], 0.0)
        for d in per_stream.values():
            for name, value in d.items():
                out[name] += value
        if len(self.streams) > 1:
            out["steps"] /= len(self.streams)
        return out

    def load_totals(self, totals: dict[str, float], stream: str | None = None) -> None:
        """Restore the run's counters of ``stream`` (from a checkpoint)."""
        self.counts[stream or self.streams[0]].update(totals)

    @staticmethod
    def derived(d: dict[str, float]) -> dict[str, float]:
        """``d`` with ``ratio*`` and ``bits_per_element*`` added (see the class docstring)."""
        out = dict(d)
        nan = float("nan")
        for side, wire in (("", "bytes_sent"), ("_sent", "bytes_sent"),
                           ("_received", "bytes_received")):
            raw, n = d.get(f"raw_bytes{side}"), d.get(f"elements{side}")
            if raw is None or n is None:
                continue
            out[f"ratio{side}"] = raw / d[wire] if d[wire] else nan
            out[f"bits_per_element{side}"] = 8.0 * d[wire] / n if n else nan
        if "payload_bits" in d:
            n = d["elements"]
            out["payload_bits_per_element"] = d["payload_bits"] / n if n else nan
        return out

    def summary(self) -> dict[str, dict[str, float]]:
        """``"total"`` (the whole run), ``"last_step"`` (the last closed iteration, once
        there is one) and, with several streams, each stream's total; all derived."""
        out = {"total": self.derived(self.total)}
        if self.closed:
            out["last_step"] = self.derived(self.last_step)
        if len(self.streams) > 1:
            out.update({s: self.derived(self.counts[s]) for s in self.streams})
        return out

    def __getitem__(self, key: str) -> dict[str, float]:
        return self.summary()[key]


def raise_after_backward(error: BaseException) -> None:
    """Raise ``error`` on the training thread once the backward pass in progress (and DDP's
    end-of-backward callback, queued after the hook that calls this returns) has finished:
    the error keeps its type, and DDP's reducer closes the iteration, so the next one works.
    Outside a backward pass it is raised now."""
    engine = torch.autograd.Variable._execution_engine

    def check() -> None:
        raise error

    try:
        engine.queue_callback(lambda: engine.queue_callback(check))
    except RuntimeError:  # not inside a backward pass
        raise error from None

