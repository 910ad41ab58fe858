"""Compressed weight transfer: broadcast a model's parameters in RF8 or Exp-Golomb form.

Weights travel too: replicas are initialised from one rank, a trainer pushes parameter
updates to inference workers, a checkpoint moves between machines. :func:`broadcast` sends
one rank's parameters to every rank of a process group as

* ``format="rf8"``: one byte per weight (:mod:`ggcomm.rf8`, one or two powers of two per
  value, the earlier version of arXiv 2506.00486), or
* ``format="eg"``: quantized and coded by :mod:`ggcomm.codec` (a few bits per weight), with
  the step chosen per tensor by the step policy (``rel_step``, ``step`` or ``rate``).

Every rank ends with the sender's *rounded* weights, bit for bit: receivers decode the
bytes, and the sender decodes its own (``round_source=True``, the default; with False the
sender keeps its exact weights, e.g. a trainer's master copy). Nothing is written anywhere
until every rank has decoded everything and all agree it went well: on any error every
rank raises and every rank keeps the weights it had.

What crosses, in three collectives on the group: an all-gather of each rank's settings
fingerprint (which covers the format, the step settings and every parameter's shape and
dtype) and of the message length the sender announces; one broadcast of the message; an
all-gather of each rank's outcome. The message is ``u32 n, n x u64 lengths`` followed by
the ``n`` tensors' encodings, each a flat tensor in the chosen format. A length is
checked against the largest valid encoding of the receiver's own parameter before
anything is sized from it, so a sender cannot make a receiver allocate more than its own
model's worst case.
"""

from __future__ import annotations

import math
import struct
import time
from typing import Any

import torch
import torch.distributed as dist

from . import codec, rf8
from ._host import to_host
from ._params import float_tensors
from .errors import FrameError, SettingsMismatchError
from .step_policy import TRANSPORT_RANS, StepControl
from .transport import TrafficStats, fingerprint

__all__ = ["FORMATS", "WEIGHTS_REL_STEP", "broadcast", "traffic_stats"]

FORMATS = ("rf8", "eg")

WEIGHTS_REL_STEP = 1 / 16
"""Default EG step for weights, relative to each tensor's RMS: quantization noise
``1/16 / sqrt(12)``, 1.8% of the RMS (35 dB), at about 5-6 bits per weight on Gaussian
weights; RF8's per-value relative error (4% RMS) is of the same order."""

_COUNTERS = ("bytes_sent", "bytes_received", "raw_bytes", "elements", "seconds")
_INDEX = struct.Struct("<I")


def _bound(t: torch.Tensor, fmt: str, block_size: int) -> int:
    """The largest valid encoding of ``t`` (flattened) in ``fmt``."""
    if fmt == "rf8":
        return rf8.max_encoded_bytes((t.numel(),), t.dtype, block_size)
    return codec.max_frame_bytes([t.numel()], block_size, t.element_size())


def _encode(t: torch.Tensor, fmt: str, control: StepControl | None, block_size: int,
            tag: int) -> torch.Tensor:
    flat = t.detach().reshape(-1)
    if fmt == "rf8":
        return rf8.encode(flat, block_size=block_size)
    work = to_host(flat)
    work = work if work.dtype in (torch.float32, torch.float64) else work.float()
    sum_sq, sum_abs, non_finite = codec.moments(work.numpy())[0]
    finite = work.numel() - non_finite
    mean_sq = sum_sq / finite if finite else 0.0
    mean_abs = sum_abs / finite if finite else 0.0
    step = control.step("weights", mean_sq, mean_abs) or 1.0
    return codec.encode(flat, step, block_size=block_size, tag=tag, rans=TRANSPORT_RANS).buffer


def _decode(part: torch.Tensor, t: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "rf8":
        v = rf8.decode(part, max_numel=t.numel())
    else:
        v = codec.decode(part, max_numel=t.numel())
    if v.dtype != t.dtype or v.numel() != t.numel():
        raise FrameError(f"a {v.dtype} tensor of {v.numel()} values arrived for a {t.dtype} "
                         f"parameter of {t.numel()}")
    return v.view(t.shape)


def _split(msg: torch.Tensor, tensors: list[torch.Tensor], bounds: list[int]
           ) -> list[torch.Tensor]:
    """The message's per-tensor parts, every length checked against the receiver's own
    bounds before it is used."""
    n = len(tensors)
    b = msg.numpy()
    head = _INDEX.size + 8 * n
    if b.size < head or _INDEX.unpack_from(b, 0)[0] != n:
        raise FrameError(f"the weights message does not start with an index of {n} tensors")
    lengths = struct.unpack_from(f"<{n}Q", b, _INDEX.size)
    for i, (length, bound) in enumerate(zip(lengths, bounds, strict=True)):
        if length > bound:
            raise FrameError(f"parameter {i}: {length} bytes announced, the largest valid "
                             f"encoding of it is {bound}")
    if head + sum(lengths) != b.size:
        raise FrameError(f"the weights message is {b.size} bytes, its index describes "
                         f"{head + sum(lengths)}")
    parts, at = [], head
    for length in lengths:
        parts.append(msg[at: at + length])
        at += length
    return parts


def broadcast(
    params: Any,
    src: int = 0,
    *,
    format: str = "rf8",
    rate: float | None = None,
    step: float | None = None,
    rel_step: float | None = None,
    block_size: int | None = None,
    round_source: bool = True,
    group: Any = None,
    stats: TrafficStats | None = None,
) -> dict[str, float]:
    """Send ``src``'s parameters to every rank of ``group``, compressed; every rank calls
    it with the same arguments and parameters of the same shapes and dtypes.

    Args:
        params: a ``torch.nn.Module`` (its floating-point parameters) or an iterable of
            tensors (or ``(name, tensor)`` pairs), in the same order on every rank.
        src: the sending rank (a global rank, as in ``torch.distributed.broadcast``).
        format: ``"rf8"`` (8 bits per weight) or ``"eg"`` (quantize and Exp-Golomb code).
        rate, step, rel_step: with ``format="eg"``, how each tensor's step is chosen (see
            :mod:`ggcomm.step_policy`; default ``rel_step=WEIGHTS_REL_STEP``).
        block_size: values per block of the format (default: the format's own).
        round_source: also replace ``src``'s weights by the rounded ones, so that every
            rank holds identical weights afterwards.
        stats: a :class:`~ggcomm.transport.TrafficStats` with the counters ``bytes_sent``,
            ``bytes_received``, ``raw_bytes``, ``elements``, ``seconds`` to add to.

    Returns this call's counts (bytes this rank handed to and received from
    ``torch.distributed``, the uncompressed size of the weights, and the ratio and bits
    per weight of the message), the same on every rank but for the byte counts.

    Raises:
        SettingsMismatchError: ranks disagree on the settings or the parameters' shapes.
        FrameError: the message (or its announced length) is not valid; raised on every
            rank, and no rank's weights change.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    control = None
    if format == "eg":
        control = StepControl(rate, step, rel_step, default=("rel_step", WEIGHTS_REL_STEP))
    elif (rate, step, rel_step) != (None, None, None):
        raise ValueError("rate, step and rel_step apply to format='eg' only")
    if block_size is None:
        block_size = rf8.BLOCK_SIZE if format == "rf8" else codec.DEFAULT_BLOCK_SIZE
    tensors = float_tensors(params)
    for i, t in enumerate(tensors):
        if t.dtype not in codec.DTYPE_CODES:
            raise TypeError(f"parameter {i} has dtype {t.dtype}, which ggcomm cannot code")
    t0 = time.perf_counter()
    world = dist.get_world_size(group)
    me = dist.get_rank(group)
    src_index = src if group is None else dist.get_group_rank(group, src)
    dev = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend(group) == "nccl" else torch.device("cpu")
    settings = {"weights_format": format, "block_size": block_size,
                "steps": control.settings() if control else None,
                "layout": [[list(t.shape), str(t.dtype)] for t in tensors]}
    tag = fingerprint(settings)
    bounds = [_bound(t, format, block_size) for t in tensors]
    limit = _INDEX.size + 8 * len(tensors) + sum(bounds)

    msg = None
    if me == src_index:
        parts = [_encode(t, format, control, block_size, tag) for t in tensors]
        index = _INDEX.pack(len(parts)) + struct.pack(f"<{len(parts)}Q",
                                                      *[p.numel() for p in parts])
        msg = torch.cat([torch.frombuffer(bytearray(index), dtype=torch.uint8), *parts])

    hello = torch.tensor([tag, msg.numel() if msg is not None else 0], dtype=torch.int64)
    gathered = [torch.empty_like(hello, device=dev) for _ in range(world)]
    dist.all_gather(gathered, hello.to(dev), group=group)
    gathered = [g.cpu() for g in gathered]
    sent = received = (world - 1) * hello.numel() * hello.element_size()
    differ = [r for r, g in enumerate(gathered) if int(g[0]) != int(gathered[src_index][0])]
    if differ:
        raise SettingsMismatchError(
            f"weights broadcast: ranks {differ} differ from rank {src} in format, step "
            "settings or parameter shapes/dtypes")
    length = int(gathered[src_index][1])
    if not 0 <= length <= limit:
        raise FrameError(f"weights broadcast: rank {src} announced a {length}-byte message; "
                         f"the largest valid one for these parameters is {limit} bytes")

    buf = msg.to(dev) if msg is not None else torch.empty(length, dtype=torch.uint8, device=dev)
    dist.broadcast(buf, src, group=group)
    if me == src_index:
        sent += (world - 1) * length
    else:
        received += length

    decoded, error = None, None
    if me != src_index or round_source:
        try:
            parts = _split(buf.cpu(), tensors, bounds)
            decoded = [_decode(p, t, format) for p, t in zip(parts, tensors, strict=True)]
        except FrameError as e:
            error = e
    ok = torch.tensor([0 if error else 1], dtype=torch.int64)
    outcome = [torch.empty_like(ok, device=dev) for _ in range(world)]
    dist.all_gather(outcome, ok.to(dev), group=group)
    sent += (world - 1) * ok.element_size()
    received += (world - 1) * ok.element_size()
    failed = [r for r, o in enumerate(outcome) if int(o.item()) != 1]
    if error is not None:
        raise error
    if failed:
        raise FrameError(f"weights broadcast: ranks {failed} could not decode the message "
                         f"from rank {src}; no rank's weights were changed")
    if decoded is not None:
        with torch.no_grad():
            for t, v in zip(tensors, decoded, strict=True):
                t.copy_(v)

    elements = sum(t.numel() for t in tensors)
    raw = sum(t.numel() * t.element_size() for t in tensors)
    counts = {"bytes_sent": float(sent), "bytes_received": float(received),
              "raw_bytes": float(raw), "elements": float(elements),
              "seconds": time.perf_counter() - t0}
    if stats is not None:
        stats.add(**counts)
    return {**counts, "message_bytes": float(length),
            "ratio": raw / length if length else math.nan,
            "bits_per_element": 8.0 * length / elements if elements else math.nan}


def traffic_stats() -> TrafficStats:
    """A :class:`TrafficStats` with the counters :func:`broadcast` adds to."""
    return TrafficStats(_COUNTERS)

