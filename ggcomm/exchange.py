"""Exact sums of EG-coded tensors across a process group, for the transports that sum.

:func:`coded_sum` is the one collective behind FSDP's reduce-scatter (:mod:`ggcomm.fsdp`),
the PowerSGD hook's factor all-reduces (:mod:`ggcomm.powersgd`) and DiLoCo's outer steps
(:mod:`ggcomm.diloco`). On every rank of
``group`` (``N`` ranks), for a flat float32 tensor ``x`` cut into ``parts`` chunks (``N``
for a reduce-scatter, chunk ``r`` to rank ``r``; 1 for an all-reduce, the whole tensor to
every rank):

1. **Steps.** The per-segment moments of ``x + residual`` (one pass,
   :func:`ggcomm.codec.moments`) are all-gathered and summed in rank order, so every rank
   derives the same step for every segment from the same numbers
   (:class:`~ggcomm.step_policy.StepControl`: ``rate``, ``step`` or ``rel_step``, the rate
   loop on the payload bits the stream's last frames took, warm-up).
2. **Encode.** Each chunk is quantized with those steps and EG-coded into one frame
   (:func:`ggcomm.codec.encode_feedback`, with error feedback when the stream keeps a
   residual); the frame's tag is the caller's settings fingerprint.
3. **Exchange.** An all-gather of the frame sizes and payload bits, each size checked
   against the largest valid frame before any receive is sized from it, then one uneven
   ``all_to_all_single`` of the frames.
4. **Sum.** Every frame is checked (layout, steps, tag) and the integers summed exactly
   (:func:`ggcomm.codec.sum_frames`): the result is ``sum * step``, the same bits on every
   rank whatever the order the frames arrived in. An all-gather of each rank's outcome
   (:func:`agree`) makes a bad frame raise :class:`~ggcomm.errors.FrameError` on every rank.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import codec
from .errors import FrameError, SettingsMismatchError, StateLoadError
from .step_policy import TRANSPORT_RANS, StepControl

__all__ = ["DEFAULT_SEGMENT", "Stream", "agree", "all_gather", "all_to_all", "coded_sum",
           "device_for", "segments"]

DEFAULT_SEGMENT = 1 << 16
"""Elements per step segment: a step adapts to the scale of 64k values (a flat tensor of
many parameters does not say where one ends)."""


def segments(n: int, segment: int) -> list[int]:
    """n elements cut into segments of ``segment`` (the last one shorter; one if n is 0)."""
    full, rest = divmod(n, segment)
    return [segment] * full + ([rest] if rest or not full else [])


class Stream:
    """What one summed tensor keeps between iterations: its layout (``parts`` chunks of
    ``segment``-element step segments), the error-feedback residual (``feedback``), and the
    rate loop's iteration count and last measured payload bits per element."""

    def __init__(self, numel: int, parts: int, segment: int, feedback: bool) -> None:
        if numel % parts:
            raise ValueError(f"{numel} elements do not split into {parts} chunks")
        self.numel = numel
        self.parts = parts
        self.chunk = numel // parts
        self.row_segments = segments(self.chunk, segment)
        self.residual = np.zeros(numel if feedback else 0, np.float32)
        self.iteration = 0
        self.last_bits = math.nan

    def state_dict(self) -> dict[str, Any]:
        return {"residual": torch.from_numpy(self.residual.copy()), "numel": self.numel,
                "iteration": self.iteration, "last_bits": self.last_bits}

    def load(self, sd: dict[str, Any], what: str) -> None:
        """Take a saved stream's residual and rate-loop state (``what`` names it in errors)."""
        res = sd["residual"].numpy().astype(np.float32)
        if int(sd["numel"]) != self.numel or res.size != self.residual.size:
            raise StateLoadError(f"{what}: saved for {int(sd['numel'])} elements and a "
                                 f"residual of {res.size}, this one has {self.numel} and "
                                 f"{self.residual.size}")
        self.residual[:] = res
        self.iteration, self.last_bits = int(sd["iteration"]), float(sd["last_bits"])


def device_for(group: Any) -> torch.device:
    """Where a collective's tensors live for ``group``'s backend (NCCL: the current GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather(t: torch.Tensor, group: Any, dev: torch.device) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape everywhere), on the CPU, in rank order."""
    parts = [torch.empty_like(t, device=dev) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.to(dev), group=group)
    return [p.cpu() for p in parts]


def all_to_all(send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int], group: Any,
               dev: torch.device) -> torch.Tensor:
    """Uneven ``all_to_all_single`` of a CPU tensor, staged through ``dev``: ``send_sizes[d]``
    elements to rank ``d``, ``recv_sizes[s]`` from rank ``s`` (exact lengths, which every
    receiver knows beforehand); the received elements on the CPU, in rank order."""
    recv = torch.empty(sum(recv_sizes), dtype=send.dtype, device=dev)
    dist.all_to_all_single(recv, send.to(dev), output_split_sizes=recv_sizes,
                           input_split_sizes=send_sizes, group=group)
    return recv.cpu()


def agree(error: BaseException | None, group: Any, dev: torch.device, what: str) -> int:
    """All ranks share whether they decoded what they were sent: this rank's error is raised
    here, and a FrameError naming the failed ranks on every other rank. Returns the bytes
    this rank sent (and received) for it."""
    ok = torch.tensor([0 if error else 1], dtype=torch.int64)
    outcome = all_gather(ok, group, dev)
    if error is not None:
        raise error
    failed = [j for j, o in enumerate(outcome) if int(o.item()) != 1]
    if failed:
        raise FrameError(f"{what}: ranks {failed} could not decode what they were sent")
    return (len(outcome) - 1) * ok.nbytes


def _steps(control: StepControl, key: str, stream: Stream, total: np.ndarray,
           seg_len: np.ndarray, shared: bool = False) -> np.ndarray:
    """One step per segment of every chunk, from the summed moments (identical on every
    rank: the same numbers, the same rule). ``shared``: one step for every segment, from
    the moments pooled over all of them (the rate loop trims the pooled model's miss)."""
    if shared:
        pooled = _steps(control, key, stream, total.sum(axis=0, keepdims=True),
                        np.array([seg_len.sum()]))
        return np.full(total.shape[0], pooled[0])
    counts = seg_len - total[:, 2]
    steps = np.ones(total.shape[0], np.float64)
    target = control.target(stream.iteration)
    for i in range(total.shape[0]):
        n = counts[i]
        mean_sq = total[i, 0] / n if n > 0 else 0.0
        mean_abs = total[i, 1] / n if n > 0 else 0.0
        # the stream's rate loop moves once per iteration, on its first segment
        measured = stream.last_bits if i == 0 else math.nan
        step = control.step(key, mean_sq, mean_abs, measured_bits=measured,
                            measured_target=control.target(stream.iteration - 1)
                            if stream.iteration else None, target=target)
        steps[i] = 1.0 if step is None else step
    return steps


def _sum(recv: torch.Tensor, sizes: list[int], steps: np.ndarray, out: np.ndarray,
         tag: int, describe: str) -> None:
    frames = []
    at = 0
    for j, size in enumerate(sizes):
        try:
            f = codec.Frame.from_buffer(recv[at: at + size], max_numel=out.size)
        except FrameError as e:
            raise FrameError(f"the frame from rank {j}: {e}") from None
        if f.tag != tag:
            raise SettingsMismatchError(
                f"rank {j}'s frame carries settings fingerprint {f.tag:#x}, this rank has "
                f"{tag:#x} ({describe})")
        if f.numel != out.size or not np.array_equal(np.asarray(f.steps), steps):
            raise FrameError(f"the frame from rank {j} has another layout or other steps "
                             "than the ones every rank agreed on")
        frames.append((at, f))
        at += size
    codec.sum_frames(recv, frames, out=out)


def coded_sum(x: np.ndarray, stream: Stream, control: StepControl, key: str, group: Any, *,
              block_size: int, tag: int, describe: str = "",
              what: str = "ggcomm coded sum",
              shared_step: bool = False,
              rans: bool = TRANSPORT_RANS) -> tuple[np.ndarray, dict[str, float]]:
    """The exact sum over ``group`` of every rank's ``x`` (flat float32, ``stream.numel``
    elements), EG-coded on the wire: this rank's chunk of it (``stream.parts`` equal to the
    group's size: a reduce-scatter) or all of it (``parts`` 1: an all-reduce). See the
    module docstring for the four steps.

    ``key`` names the stream's rate loop in ``control``; ``tag`` is the settings
    fingerprint every frame must carry (``describe``: the settings, for the error message);
    ``what`` names the collective in errors. ``shared_step``: one step for all of ``x``
    instead of one per segment (the same step everywhere spends the bits where the
    squared error is largest: the least total squared error for the bits, where every
    element's error counts alike). ``rans``: code blocks in the codec's rANS mode where it
    saves bits (``ggcomm.encode``'s argument; default ``TRANSPORT_RANS``). Returns the sum
    and this call's counts (``bytes_sent``, ``bytes_received``, ``payload_bits``: the frame
    bits this rank sent).

    Raises:
        FrameError: a peer announced a frame size no valid frame has, or a frame (this
            rank's or, through :func:`agree`, any rank's) did not decode.
        SettingsMismatchError: a frame carries another settings fingerprint.
    """
    world, me = dist.get_world_size(group), dist.get_rank(group)
    parts = stream.parts
    if parts not in (1, world) or x.size != stream.numel:
        raise ValueError(f"a stream of {stream.numel} elements in {parts} chunks cannot sum "
                         f"{x.size} elements on {world} ranks")
    resid = stream.residual if stream.residual.size else None
    dev = device_for(group)
    sent = received = 0

    # 1. steps from every rank's moments of each segment
    segs = stream.row_segments * parts
    mine = torch.from_numpy(codec.moments(x, resid, segments=segs).reshape(-1))
    gathered = all_gather(mine, group, dev)
    sent, received = sent + (world - 1) * mine.nbytes, received + (world - 1) * mine.nbytes
    total = gathered[0].numpy().reshape(-1, 3).copy()
    for p in gathered[1:]:  # in rank order: the same sum on every rank
        total += p.numpy().reshape(-1, 3)
    steps = _steps(control, key, stream, total, np.array(segs, np.float64) * world,
                   shared_step)

    # 2. one frame per chunk
    c, s = stream.chunk, len(stream.row_segments)
    frames = []
    for r in range(parts):
        lo = r * c
        frame, _ = codec.encode_feedback(
            x[lo: lo + c], None if resid is None else resid[lo: lo + c],
            steps[r * s: (r + 1) * s], stream.row_segments, block_size=block_size, tag=tag,
            rans=rans)
        frames.append(frame)

    # 3. sizes and payload bits (the rate loop's measure, the same everywhere), then frames
    mine = torch.tensor([f.nbytes for f in frames] +
                        [int(f.segment_bits().sum()) for f in frames], dtype=torch.int64)
    table = torch.stack(all_gather(mine, group, dev))
    sizes, payload = table[:, :parts], table[:, parts:]  # [sender, chunk]
    sent, received = sent + (world - 1) * mine.nbytes, received + (world - 1) * mine.nbytes
    bound = codec.max_frame_bytes(stream.row_segments, block_size, 4)
    lying = [j for j in range(world) if not bool(((sizes[j] >= 0) & (sizes[j] <= bound))
                                                .all())]
    if lying:
        raise FrameError(f"{what}: ranks {lying} announced frame sizes outside 0..{bound} "
                         "bytes (the largest valid frame for this chunk)")
    own = [int(v) for v in mine[:parts]]
    if parts == 1:  # the same frame to every rank
        send, send_sizes, mine_at = frames[0].buffer.repeat(world), own * world, 0
    else:
        send, send_sizes, mine_at = torch.cat([f.buffer for f in frames]), own, me
    recv_sizes = [int(v) for v in sizes[:, mine_at]]
    recv = all_to_all(send, send_sizes, recv_sizes, group, dev)
    frame_bytes = sum(send_sizes) - send_sizes[me]
    sent += frame_bytes
    received += sum(recv_sizes) - recv_sizes[me]

    # 4. the exact sum, and every rank's outcome
    out = np.empty(c, np.float32)
    error: BaseException | None = None
    try:
        _sum(recv, recv_sizes, steps[mine_at * s: (mine_at + 1) * s], out, tag, describe)
    except (FrameError, SettingsMismatchError) as e:
        error = e
    n_bytes = agree(error, group, dev, what)
    sent, received = sent + n_bytes, received + n_bytes

    stream.last_bits = float(payload.sum()) / (world * x.size) if x.size else math.nan
    stream.iteration += 1
    return out, {"bytes_sent": float(sent), "bytes_received": float(received),
                 "payload_bits": float(8 * frame_bytes)}
