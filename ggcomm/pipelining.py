"""``torch.distributed.pipelining`` stages whose stage-to-stage traffic is EG-coded.

Activations forward and their gradients backward cross every stage boundary once per
micro-batch; this module sends them through :class:`ggcomm.pipeline.PipeComm` instead of
plain ``isend`` / ``irecv``, and leaves the schedules untouched::

    from torch.distributed.pipelining import Schedule1F1B
    from ggcomm.pipeline import PipeComm
    from ggcomm.pipelining import CompressedPipelineStage

    stage = CompressedPipelineStage(submod, rank, world, device, comm=PipeComm(rate=4.0))
    schedule = Schedule1F1B(stage, n_microbatches=8, loss_fn=loss_fn)
    ...                                    # schedule.step(...) as usual
    print(stage.comm.stats.summary())      # "forward": activations, "backward": gradients

:func:`compress_stage` does the same to a stage that already exists (a ``PipelineStage``,
or the traced frontend's stage from ``build_stage``).

How it fits the schedules. A schedule asks the stage for lists of ``dist.P2POp`` (one
preallocated receive buffer per tensor, sized from shape inference), fires them (plain
``isend`` / ``irecv``, or ``batch_isend_irecv`` for a list mixing both) and waits. A
compressed message's size is unknown until its preamble arrives, so no fixed-size receive
can be posted for it (and a gloo receive whose buffer size does not match the message
aborts the process). Instead:

* ``get_fwd_send_ops`` / ``get_bwd_send_ops`` encode each tensor and fire the real
  asynchronous sends (preamble, then payload) at once, and return an empty list. Sends
  are never later than the schedule would have fired them and never block, so they cannot
  add a wait the uncompressed schedule did not have.
* ``get_fwd_recv_ops`` / ``get_bwd_recv_ops`` only note which micro-batch's tensors are
  expected, and return an empty list.
* The receive itself (preamble, then payload, decoded into the preallocated buffer) runs
  where the stage consumes the tensors, at the start of ``forward_one_chunk`` /
  ``backward_one_chunk``: the point the schedule waited for its receives anyway. A rank
  therefore blocks only where the uncompressed schedule blocked (and, at the start of a
  step, on the previous step's sends, which the peers have taken by then), which keeps
  every deadlock-free schedule deadlock-free.
* Each stream has a tag of its own (``tag_base + 2 * source stage``, plus one for
  gradients), so activations and gradients between the same two ranks, and torch's own
  tag-0 messages, never match each other's receives. Within a stream, messages are
  consumed in the order they were sent: every torch schedule runs a stage's forwards, and
  its backwards, in micro-batch order.

Shape inference (the warm-up vote and the metadata objects stages exchange on the first
step) goes through ``torch.distributed`` directly and is not touched. A step's sends are
all taken by their receivers within that step; the stage waits for them at the start of
the next step, not earlier (with several stages per rank, a wait at the end of one stage's
work could hold up a peer that still needs this rank's other stages). Call
``stage.wait_sends()`` after the last step.

What it costs: the sender encodes before its send leaves (on the CPU, in the schedule's
thread), the receiver decodes before its forward or backward starts, and a preamble adds a
message per tensor. What it gains: at ``rate=4`` a float32 activation of 2048 elements
crosses in about 4.4 bits an element, preamble and frame header included: a seventh of its
bytes (``comm.stats`` counts them). Quantization is lossy (at most half a step per
element; no error feedback): pick ``rate`` / ``rel_step`` for the accuracy the model needs.

With NCCL, which ignores tags, two streams between the same pair of ranks (only in
schedules with several stages per rank) stay in step only if both ranks post them in the
same order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.stage import _PipelineStageBase

from .errors import LinkOutOfStepError
from .pipeline import PipeComm, SendHandle

__all__ = [
    "DEFAULT_TAG_BASE",
    "CompressedPipelineStage",
    "LinkOutOfStepError",
    "compress_stage",
]

# Tags of the compressed streams start here: away from the tag 0 that torch's pipelining
# metadata exchange and most user code use, and with room for 3000 stages below 32767, the
# largest tag every MPI implementation must accept. Change it only if your own
# point-to-point messages on the same group use tags in [tag_base, tag_base + 2 * stages).
DEFAULT_TAG_BASE = 0x6767


class _CompressedP2P(_PipelineStageBase):
    """The overrides shared by :class:`CompressedPipelineStage` and :func:`compress_stage`.

    Placed before a concrete stage class in the bases; relies on it for what to send (the
    tensors, their peers, zero gradients for unused inputs: ``get_*_send_ops``) and for
    what the stage does with received tensors (``_retrieve_recv_*``). Deriving from the
    stages' common base (rather than from ``object``) keeps the instance layout the same,
    which is what lets :func:`compress_stage` swap an existing stage's class.
    """

    comm: PipeComm
    tag_base: int

    def _setup_compression(self, comm: PipeComm | None, tag_base: int) -> None:
        group = self.group
        if comm is None:
            comm = PipeComm(group)
        if not isinstance(comm, PipeComm):
            raise TypeError(f"comm must be a ggcomm.pipeline.PipeComm, got {type(comm).__name__}")
        if comm.group is not group and not (
            {comm.group, group} <= {None, dist.distributed_c10d._get_default_group()}
        ):
            raise ValueError(
                "comm.group must be the stage's process group: make the "
                "PipeComm with PipeComm(group=stage_group, ...)"
            )
        if isinstance(tag_base, bool) or not isinstance(tag_base, int) or tag_base < 0:
            raise ValueError(f"tag_base must be a non-negative int, got {tag_base!r}")
        self.comm = comm
        self.tag_base = tag_base
        self._sends: list[SendHandle] = []
        self._expected: dict[str, set[int]] = {"forward": set(), "backward": set()}

    def _tag(self, src_stage: int, direction: str) -> int:
        return self.tag_base + 2 * src_stage + (direction == "backward")

    # ------------------------------------------------------------------ sends

    def _post_sends(self, ops: list[dist.P2POp], direction: str) -> list[dist.P2POp]:
        self._sends = [h for h in self._sends if not h.is_completed()]
        tag = self._tag(self.stage_index, direction)
        for op in ops:
            self._sends.append(self.comm.isend(op.tensor, op.peer, tag=tag, direction=direction))
        return []

    def get_fwd_send_ops(self, fwd_chunk_id: int) -> list[dist.P2POp]:
        """Encodes and sends this micro-batch's activations now; returns no ops."""
        return self._post_sends(super().get_fwd_send_ops(fwd_chunk_id), "forward")

    def get_bwd_send_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        """Encodes and sends this micro-batch's input gradients now; returns no ops."""
        return self._post_sends(super().get_bwd_send_ops(bwd_chunk_id), "backward")

    def wait_sends(self) -> None:
        """Block until every send this stage has fired has been taken by its receiver."""
        for h in self._sends:
            h.wait()
        self._sends = []

    # ------------------------------------------------------------------ receives

    def _expect(self, ops: list[dist.P2POp], chunk_id: int, direction: str) -> list:
        if ops:
            self._expected[direction].add(chunk_id)
        return []

    def get_fwd_recv_ops(self, fwd_chunk_id: int) -> list[dist.P2POp]:
        """Notes that this micro-batch's activations are to be received; returns no ops."""
        return self._expect(super().get_fwd_recv_ops(fwd_chunk_id), fwd_chunk_id, "forward")

    def get_bwd_recv_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        """Notes that this micro-batch's output gradients are to be received; no ops."""
        return self._expect(super().get_bwd_recv_ops(bwd_chunk_id), bwd_chunk_id, "backward")

    def _receive(self, recv_infos: tuple, chunk_id: int, direction: str) -> None:
        if chunk_id not in self._expected[direction]:
            return  # filled locally (a same-rank neighbour) or nothing to receive
        self._expected[direction].discard(chunk_id)
        for info in recv_infos:
            if info.is_root_arg or info.buffer is None:
                continue  # the same ops torch's _get_recv_ops skips
            src = self._resolve_peer_global_rank(info.source)
            with torch.no_grad():  # the buffer is an autograd leaf; fill its storage
                self.comm.recv(
                    src,
                    out=info.buffer.detach(),
                    tag=self._tag(info.source, direction),
                    direction=direction,
                )

    def _retrieve_recv_activations(self, fwd_chunk_id: int):
        self._receive(self.args_recv_info[fwd_chunk_id], fwd_chunk_id, "forward")
        return super()._retrieve_recv_activations(fwd_chunk_id)

    def _retrieve_recv_grads(self, bwd_chunk_id: int):
        self._receive(self.grad_recv_info[bwd_chunk_id], bwd_chunk_id, "backward")
        return super()._retrieve_recv_grads(bwd_chunk_id)

    # ------------------------------------------------------------------ step boundaries

    def clear_runtime_states(self) -> None:
        left = {d: sorted(c) for d, c in self._expected.items() if c}
        if left:
            raise LinkOutOfStepError(
                f"stage {self.stage_index}: receives for micro-batches {left} were asked "
                f"for but never consumed; their messages are still on the link, so the "
                f"next step would read them as its own"
            )
        self.wait_sends()
        super().clear_runtime_states()


class CompressedPipelineStage(_CompressedP2P, PipelineStage):
    """A ``torch.distributed.pipelining.PipelineStage`` whose activations and gradients
    travel EG-coded through ``comm``.

    Takes ``PipelineStage``'s arguments (``submodule, stage_index, num_stages, device``,
    then ``input_args``, ``output_args``, ``group``, ...), plus:

    Args:
        comm: the :class:`~ggcomm.pipeline.PipeComm` that sends and receives (its settings
            pick the rate; its ``stats`` count the bytes). Default: ``PipeComm(group)``,
            4 bits per element. Its group must be the stage's. Every rank of the pipeline
            must configure its comm alike (checked on every message).
        tag_base: first tag of the compressed streams (see :data:`DEFAULT_TAG_BASE`).
    """

    def __init__(
        self,
        submodule: torch.nn.Module,
        stage_index: int,
        num_stages: int,
        device: torch.device,
        *args: Any,
        comm: PipeComm | None = None,
        tag_base: int = DEFAULT_TAG_BASE,
        **kwargs: Any,
    ):
        super().__init__(submodule, stage_index, num_stages, device, *args, **kwargs)
        self._setup_compression(comm, tag_base)


_CLASSES: dict[type, type] = {PipelineStage: CompressedPipelineStage}


def compress_stage(
    stage: _PipelineStageBase, comm: PipeComm | None = None, *, tag_base: int = DEFAULT_TAG_BASE
) -> _PipelineStageBase:
    """Make an existing pipeline stage send and receive through ``comm``; returns it.

    The stage is converted in place (its class becomes a subclass of its own class with
    the compressed send and receive), so a schedule built on it before or after the call
    uses the codec. Arguments as for :class:`CompressedPipelineStage`; call it before the
    first step, on every rank.
    """
    if not isinstance(stage, _PipelineStageBase):
        raise TypeError(
            f"expected a torch.distributed.pipelining stage, got {type(stage).__name__}"
        )
    if isinstance(stage, _CompressedP2P):
        raise ValueError("the stage already sends through a PipeComm")
    cls = type(stage)
    if cls not in _CLASSES:
        _CLASSES[cls] = type(
            f"Compressed{cls.__name__}",
            (_CompressedP2P, cls),
            {"__module__": __name__, "__doc__": cls.__doc__},
        )
    stage.__class__ = _CLASSES[cls]
    try:
        stage._setup_compression(comm, tag_base)
    except BaseException:
        stage.__class__ = cls
        raise
    return stage
