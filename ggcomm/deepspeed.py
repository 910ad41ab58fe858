"""DeepSpeed pipeline plugin: a ``PipelineEngine``'s stage-to-stage traffic, EG-coded.

DeepSpeed's pipeline engine moves activations forward and activation gradients backward
with ``deepspeed.runtime.pipe.p2p.send`` / ``recv``; ``recv`` fills a receive buffer it
preallocated from the tensor metadata the stages exchange first. :func:`enable` routes
those two functions through a :class:`ggcomm.pipeline.PipeComm`: float tensors are
quantized and Exp-Golomb coded, sent with their real variable length, and decoded into
DeepSpeed's buffer; integer tensors (the shape metadata) pass through untouched. Every
stage must enable it (both ends of each link decode what the other encodes)::

    engine, *_ = deepspeed.initialize(model=pipeline_module, config=cfg, ...)
    plugin = ggcomm.deepspeed.enable(engine, rate=4.0)
    for _ in range(steps):
        engine.train_batch(data_iter)
    print(plugin.stats.summary())          # bytes each way, ratio, bits per element
    plugin.disable()                       # DeepSpeed's own send/recv again

or, scoped: ``with ggcomm.deepspeed.compressed(engine, rate=4.0) as plugin: ...``.

The functions are module globals of DeepSpeed, so the plugin acts on every pipeline engine
in the process; one plugin may be enabled at a time. Activations come back with an error
of at most half a quantization step per element; see :mod:`ggcomm.pipeline` for the step
rules and what travels uncompressed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .pipeline import PipeComm
from .transport import TrafficStats

__all__ = ["DeepSpeedPlugin", "compressed", "disable", "enable"]

_active: DeepSpeedPlugin | None = None


def _p2p():
    try:
        from deepspeed.runtime.pipe import p2p
    except ImportError as e:  # pragma: no cover - exercised only without DeepSpeed
        raise ImportError("ggcomm.deepspeed needs DeepSpeed: pip install 'ggcomm[deepspeed]' "
                          "(DS_BUILD_OPS=0 for a CPU-only install)") from e
    return p2p


class DeepSpeedPlugin:
    """An enabled plugin: its :class:`PipeComm`, statistics, and :meth:`disable`."""

    def __init__(self, engine: Any, comm: PipeComm):
        self.engine = engine
        self.comm = comm
        p2p = _p2p()
        self._p2p = p2p
        self._original = (p2p.send, p2p.recv)
        self.enabled = False

    @property
    def stats(self) -> TrafficStats:
        """Bytes sent and received per direction (``summary()["forward"]``, ...)."""
        return self.comm.stats

    def _rank(self, stage: int) -> tuple[int, int]:
        grid = self._p2p._grid
        if grid is None:
            raise RuntimeError("DeepSpeed's pipeline p2p module is not initialised "
                               "(enable the plugin after deepspeed.initialize)")
        me = grid.get_stage_id()
        self._p2p._is_valid_send_recv(me, stage)
        return me, grid.stage_to_global(stage_id=stage)

    def send(self, tensor: torch.Tensor, dest_stage: int, async_op: bool = False):
        """Replacement for ``deepspeed.runtime.pipe.p2p.send``."""
        me, dst = self._rank(dest_stage)
        direction = "forward" if dest_stage == me + 1 else "backward"
        if async_op:
            handle = self.comm.isend(tensor, dst, direction=direction)
            self._p2p._async.append(handle)
            return handle
        self.comm.send(tensor, dst, direction=direction)
        return None

    def recv(self, tensor: torch.Tensor, src_stage: int, async_op: bool = False):
        """Replacement for ``deepspeed.runtime.pipe.p2p.recv``: decodes into ``tensor``."""
        me, src = self._rank(src_stage)
        direction = "forward" if src_stage == me - 1 else "backward"
        if async_op:
            handle = self.comm.irecv(src, out=tensor, direction=direction)
            self._p2p._async.append(handle)
            return handle
        self.comm.recv(src, out=tensor, direction=direction)
        return None

    def _install(self) -> None:
        self._p2p.send, self._p2p.recv = self.send, self.recv
        self.enabled = True

    def disable(self) -> None:
        """Restore DeepSpeed's own ``send`` / ``recv`` (idempotent)."""
        global _active
        if self.enabled:
            self._p2p.send, self._p2p.recv = self._original
            self.enabled = False
        if _active is self:
            _active = None


def enable(engine: Any, *, comm: PipeComm | None = None, **comm_kwargs: Any) -> DeepSpeedPlugin:
    """Make ``engine`` (a DeepSpeed ``PipelineEngine``) send its activations and
    activation gradients through the ggcomm codec; returns the plugin.

    Call it on every stage, after ``deepspeed.initialize`` and before training. Keyword
    arguments build the :class:`PipeComm` (``rate=4.0`` by default; ``step``, ``rel_step``,
    ``k``, ``block_size``, ``min_numel``), or pass ``comm=`` one of your own.

    Raises:
        TypeError: ``engine`` is not a pipeline engine.
        RuntimeError: a plugin is already enabled in this process.
    """
    global _active
    from deepspeed.runtime.pipe.engine import PipelineEngine

    if not isinstance(engine, PipelineEngine):
        raise TypeError(f"ggcomm.deepspeed.enable needs a deepspeed PipelineEngine "
                        f"(deepspeed.initialize of a PipelineModule), got "
                        f"{type(engine).__name__}")
    if _active is not None:
        raise RuntimeError("a ggcomm DeepSpeed plugin is already enabled in this process; "
                           "disable() it first")
    if comm is not None and comm_kwargs:
        raise ValueError("pass either comm= or PipeComm arguments, not both")
    plugin = DeepSpeedPlugin(engine, comm or PipeComm(**comm_kwargs))
    plugin._install()
    _active = plugin
    return plugin


def disable(engine: Any = None) -> None:
    """Disable the active plugin (if ``engine`` is given, only if it belongs to it)."""
    if _active is not None and (engine is None or _active.engine is engine):
        _active.disable()


@contextlib.contextmanager
def compressed(engine: Any, **kwargs: Any) -> Iterator[DeepSpeedPlugin]:
    """``with compressed(engine, rate=4.0) as plugin:``: :func:`enable` for the block."""
    plugin = enable(engine, **kwargs)
    try:
        yield plugin
    finally:
        plugin.disable()
