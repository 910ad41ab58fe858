"""FSDP2 with EG-coded gradients: a custom reduce-scatter for ``fully_shard`` models.

PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) reduce-scatters every unit's
gradients in full precision (or ``MixedPrecisionPolicy.reduce_dtype``); :func:`compress`
installs ggcomm's reduce-scatter on every ``FSDPModule`` of a model instead
(``FSDPModule.set_custom_reduce_scatter``)::

    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    gg = ggcomm.fsdp.compress(model, rate=3.0, warmup_iters=20)
    ...  # train as usual; gg.stats counts the bytes, gg.state_dict() checkpoints

Use the rate warm-up: on the GPT benchmark (``benchmarks/results/convergence_fsdp.md``)
rate 3 with 20 warm-up iterations ended within 2% of fp32 on every seed, and without it
one seed ended 15% above.

What one unit's reduce-scatter does, on every rank of the group (``N`` ranks): FSDP hands
it the flat input of ``N`` chunks, chunk ``r`` destined for rank ``r``.

1. **Steps.** Each chunk is cut into segments of ``segment`` elements; the per-segment
   moments of ``input + residual`` (one pass, :func:`ggcomm.codec.moments`) are all-gathered
   and summed in rank order, so every rank derives the same step for every segment from
   the same numbers (:class:`~ggcomm.step_policy.StepControl`: ``rate``, ``step`` or
   ``rel_step``, rate feedback on the payload bits the unit's last frames took, warm-up).
2. **Encode.** Each chunk is quantized with those steps and EG-coded into one frame
   (:func:`ggcomm.codec.encode_feedback`: error feedback, so what a rank's quantization
   drops is added to its next gradient); the frame's tag is the settings fingerprint.
3. **Exchange.** An all-gather of the frame sizes and payload bits (each size checked
   against the largest valid frame before any receive is sized from it), then one uneven
   ``all_to_all_single`` of the frames.
4. **Sum.** The owner checks every frame (layout, steps, tag) and sums the ``N`` integer
   chunks exactly (:func:`ggcomm.codec.sum_frames`); the output is ``sum * step``, the same
   bits whatever the order the frames arrived in. An all-gather of each rank's outcome
   makes a bad frame raise :class:`~ggcomm.errors.FrameError` on every rank.

FSDP itself divides: :func:`compress` sets ``set_force_sum_reduction_for_comms(True)``, so
FSDP applies its gradient divide factor (``1/N``, or ``set_gradient_divide_factor``) around
the sum, and ``MixedPrecisionPolicy(reduce_dtype=...)`` sets the dtype the chunks arrive
in and the output leaves in (the codec works in float32). Gradient accumulation with
``set_requires_gradient_sync(False)`` needs nothing: FSDP then does not reduce-scatter.
CUDA gradients are staged through host memory.

**Weights** (``weights="rf8"`` or ``"eg"``, optional): the parameter all-gathers of forward
and backward send each rank's shard as RF8 bytes (:mod:`ggcomm.rf8`) or as an EG frame at
``weights_rel_step`` times each segment's RMS (``set_custom_all_gather``): every rank,
the sender included, computes with the same rounded weights, while the sharded fp32 master
weights and the optimizer stay exact. Three collectives each (sizes, frames, outcomes).

Costs: four collectives per unit and iteration (statistics, sizes, frames, outcomes), and,
with error feedback, one float32 residual per unit as large as the unit's unsharded
gradients (4 bytes per parameter per rank, not sharded). ``stats`` counts the gradient
and weight traffic as two streams.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import torch
import torch.distributed as dist

from . import __version__, codec, rf8
from ._host import to_host
from .errors import FrameError, SettingsMismatchError, StateLoadError
from .exchange import DEFAULT_SEGMENT, Stream, agree, all_gather, coded_sum, device_for, segments
from .kernels import eg
from .step_policy import DEFAULT_RATE, TRANSPORT_RANS, StepControl, StepSettings
from .transport import TrafficStats, check_state_header, fingerprint, rank_and_world, state_header

try:  # the protocol classes live in a private module of torch 2.13
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather as _GatherComm
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter as _Comm
except ImportError:  # pragma: no cover - other torch versions: duck typing suffices
    _Comm = _GatherComm = object

__all__ = ["DEFAULT_SEGMENT", "GGFSDP", "WEIGHTS", "compress"]

WEIGHTS = (None, "rf8", "eg")
"""How the parameter all-gathers travel: FSDP's own (None), RF8 (8 bits per weight) or
EG-coded at ``weights_rel_step`` times each segment's RMS."""

_STATE_VERSION = 1
_COUNTERS = ("bytes_sent", "bytes_received", "raw_bytes", "elements", "payload_bits",
             "seconds")


def _check_shard(rank: int, dtype: torch.dtype, numel: int, want_dtype: torch.dtype,
                 n: int) -> None:
    """A peer's all-gather part must be a shard of n weights of this rank's dtype."""
    if dtype != want_dtype or numel != n:
        raise FrameError(f"rank {rank} sent {numel} {dtype} weights for a shard of {n} "
                         f"{want_dtype}")


class GGFSDP(StepSettings):
    """ggcomm's reduce-scatter state for one FSDP2 model: settings, per-unit residuals and
    rate control, and the traffic counters (``stats``). Made by :func:`compress`."""

    def __init__(self, rate: float | None = None, step: float | None = None,
                 rel_step: float | None = None, *, error_feedback: bool = True,
                 block_size: int = codec.DEFAULT_BLOCK_SIZE, segment: int = DEFAULT_SEGMENT,
                 rate_gain: float = 0.5, warmup_iters: int = 0, warmup_rate: float = 8.0,
                 weights: str | None = None, weights_rel_step: float = 1 / 16,
                 rans: bool = TRANSPORT_RANS):
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
        if not (isinstance(weights_rel_step, (int, float)) and math.isfinite(weights_rel_step)
                and weights_rel_step > 0):
            raise ValueError(f"weights_rel_step must be a positive number, got "
                             f"{weights_rel_step!r}")
        codec.check_code_args(rans=rans)
        self.rans = rans
        self.weights = weights
        self.weights_rel_step = float(weights_rel_step)
        self.control = StepControl(rate, step, rel_step, default=("rate", DEFAULT_RATE),
                                   rate_gain=rate_gain, warmup_iters=warmup_iters,
                                   warmup_rate=warmup_rate)
        if isinstance(segment, bool) or not isinstance(segment, int) or segment < 1:
            raise ValueError(f"segment must be a positive int, got {segment!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or \
                not 1 <= block_size <= eg.MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be an int in 1..{eg.MAX_BLOCK_SIZE}")
        self.error_feedback = bool(error_feedback)
        self.block_size = block_size
        self.segment = segment
        self.stats = TrafficStats(_COUNTERS, streams=("gradients", "weights"))
        self.units: dict[str, Stream] = {}

    def settings(self) -> dict[str, Any]:
        """What every rank must share (its hash is every frame's tag)."""
        return {"transport": "fsdp", "ggcomm": __version__, "format": codec.VERSION,
                **self.control.settings(), "error_feedback": self.error_feedback,
                "block_size": self.block_size, "segment": self.segment,
                "weights": self.weights, "weights_rel_step": self.weights_rel_step}

    @functools.cached_property
    def fingerprint(self) -> int:
        return fingerprint(self.settings())

    # ------------------------------------------------------------------ the collective

    def reduce_scatter(self, key: str, output: torch.Tensor, input: torch.Tensor,
                       group: Any) -> None:
        """Sum ``input``'s chunks across ``group`` into ``output`` (this rank's chunk),
        EG-coded on the wire (:func:`ggcomm.exchange.coded_sum`); see the module docstring."""
        t0 = time.perf_counter()
        world = dist.get_world_size(group)
        flat = input.detach().reshape(-1)
        if flat.numel() % world or output.numel() * world != flat.numel():
            raise ValueError(f"reduce-scatter of {flat.numel()} elements into "
                             f"{output.numel()} on {world} ranks")
        x = to_host(flat).to(torch.float32).contiguous().numpy()
        unit = self.units.get(key)
        if unit is None or unit.numel != x.size:  # new, or FSDP's set of grads changed
            unit = self.units[key] = Stream(x.size, world, self.segment, self.error_feedback)
        out, counts = coded_sum(x, unit, self.control, key, group, block_size=self.block_size,
                                tag=self.fingerprint, describe=str(self.settings()),
                                what=f"ggcomm FSDP reduce-scatter of {key!r}", rans=self.rans)
        output.copy_(torch.from_numpy(out).view(output.shape))
        c = unit.chunk
        self.stats.add("gradients", **counts,
                       raw_bytes=float((world - 1) * c * input.element_size()),
                       elements=float((world - 1) * c), seconds=time.perf_counter() - t0)

    def all_gather(self, key: str, output: torch.Tensor, input: torch.Tensor,
                   group: Any) -> None:
        """Every rank's parameter shard into ``output``, sent compressed (``weights``):
        every rank, this one included, gets the same rounded shards; the sharded master
        weights are not touched."""
        t0 = time.perf_counter()
        world, me = dist.get_world_size(group), dist.get_rank(group)
        dev = device_for(group)
        shard = input.detach().reshape(-1)
        n = shard.numel()
        if output.numel() != n * world:
            raise ValueError(f"all-gather of {n} elements into {output.numel()} on {world}")
        if shard.dtype not in codec.DTYPE_CODES:  # FSDP's uint8 mix of dtypes: as it is
            dist.all_gather_into_tensor(output, input, group=group)
            b = float((world - 1) * n * shard.element_size())
            self.stats.add("weights", bytes_sent=b, bytes_received=b, raw_bytes=b,
                           elements=float((world - 1) * n), seconds=time.perf_counter() - t0)
            return
        segs = segments(n, self.segment)
        if self.weights == "rf8":
            mine = rf8.encode(shard)
            bound = rf8.max_encoded_bytes((n,), shard.dtype)
        else:
            host = to_host(shard).contiguous()
            x = host.to(torch.float32).numpy()
            mom = codec.moments(x, segments=segs)
            steps = [self.weights_rel_step * math.sqrt(sq / (length - bad))
                     if length > bad and sq > 0 else 1.0
                     for (sq, _, bad), length in zip(mom, segs, strict=True)]
            mine = codec.encode(host, steps, segments=segs, block_size=self.block_size,
                                tag=self.fingerprint, rans=TRANSPORT_RANS).buffer
            bound = codec.max_frame_bytes(segs, self.block_size, shard.element_size())
        size = torch.tensor([mine.numel()], dtype=torch.int64)
        sizes = [int(t.item()) for t in all_gather(size, group, dev)]
        sent = received = (world - 1) * size.nbytes
        lying = [j for j, v in enumerate(sizes) if not 0 <= v <= bound]
        if lying:
            raise FrameError(f"ranks {lying} announced weight frames outside 0..{bound} bytes")
        recv = torch.empty(sum(sizes), dtype=torch.uint8, device=dev)
        dist.all_to_all_single(recv, mine.repeat(world).to(dev), output_split_sizes=sizes,
                               input_split_sizes=[mine.numel()] * world, group=group)
        recv = recv.cpu()
        sent += (world - 1) * mine.numel()
        received += sum(sizes) - sizes[me]
        gathered = torch.empty(n * world, dtype=shard.dtype)
        error: BaseException | None = None
        at = 0
        try:
            for j, length in enumerate(sizes):
                part = recv[at: at + length]
                at += length
                if self.weights == "rf8":
                    v = rf8.decode(part, max_numel=n)
                    _check_shard(j, v.dtype, v.numel(), shard.dtype, n)
                    gathered[j * n: (j + 1) * n] = v.reshape(-1)
                    continue
                f = codec.Frame.from_buffer(part, max_numel=n)
                if f.tag != self.fingerprint:
                    raise SettingsMismatchError(f"rank {j}'s weight frame carries "
                                                f"fingerprint {f.tag:#x}, this rank has "
                                                f"{self.fingerprint:#x}")
                _check_shard(j, f.dtype, f.numel, shard.dtype, n)
                # straight into its slice of gathered (this call's own buffer; a failure
                # discards it): no result tensor, no copy
                codec.decode(f, out=gathered[j * n: (j + 1) * n], keep_out=False)
        except (FrameError, SettingsMismatchError) as e:
            error = e
        n_bytes = agree(error, group, dev, f"ggcomm FSDP all-gather of {key!r}")
        sent, received = sent + n_bytes, received + n_bytes
        output.copy_(gathered.view(output.shape))
        self.stats.add("weights", bytes_sent=float(sent), bytes_received=float(received),
                       raw_bytes=float((world - 1) * n * shard.element_size()),
                       elements=float((world - 1) * n),
                       payload_bits=float(8 * (world - 1) * mine.numel()),
                       seconds=time.perf_counter() - t0)

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """This rank's residuals, rate-control state and counters (each rank saves its
        own; tensors and Python scalars only, so ``torch.load`` reads it with
        ``weights_only=True``)."""
        return {
            **state_header(_STATE_VERSION, self.settings()),
            "units": {k: u.state_dict() for k, u in self.units.items()},
            "rate_corr": {k: float(v) for k, v in self.control.corr.items()},
            "stats_total": {stream: {k: float(v) for k, v in counts.items()}
                            for stream, counts in self.stats.counts.items()},
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (the same rank and world size, the same
        settings: else :class:`StateLoadError` / :class:`SettingsMismatchError`)."""
        check_state_header(sd, _STATE_VERSION, self.settings(), "ggcomm FSDP")
        world = rank_and_world()[1]
        units = {}
        for key, u in sd["units"].items():
            numel = int(u["numel"])
            if numel < 0 or numel % world:
                raise StateLoadError(f"unit {key!r}: {numel} elements on {world} ranks")
            units[key] = Stream(numel, world, self.segment, self.error_feedback)
            units[key].load(u, f"unit {key!r}")
        self.units = units
        self.control.corr.clear()
        self.control.corr.update({k: float(v) for k, v in sd["rate_corr"].items()})
        self.stats.reset()
        for stream, counts in sd["stats_total"].items():
            self.stats.load_totals(dict(counts), stream)


class _Installed:
    """What FSDP's comm objects share: the handle and unit they serve, and buffers from
    the default allocator."""

    def __init__(self, handle: GGFSDP, key: str) -> None:
        self.handle, self.key = handle, key

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)


class _ReduceScatter(_Installed, _Comm):
    """The object FSDP calls (the ``ReduceScatter`` protocol of torch 2.13)."""

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any,
                 op: Any, async_op: bool = False) -> None:
        if op != dist.ReduceOp.SUM:
            raise ValueError("ggcomm's FSDP reduce-scatter sums; compress() asks FSDP for "
                             "sum reductions (set_force_sum_reduction_for_comms)")
        self.handle.reduce_scatter(self.key, output_tensor, input_tensor, group)
        return None


class _AllGather(_Installed, _GatherComm):
    """The parameter all-gather FSDP calls (the ``AllGather`` protocol of torch 2.13)."""

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any,
                 async_op: bool = False) -> None:
        self.handle.all_gather(self.key, output_tensor, input_tensor, group)
        return None  # done: FSDP waits only on a Work


def compress(model: torch.nn.Module, rate: float | None = None, *, step: float | None = None,
             rel_step: float | None = None, **settings: Any) -> GGFSDP:
    """Install ggcomm's EG-coded reduce-scatter on every ``FSDPModule`` in ``model``
    (call after ``fully_shard``); returns the :class:`GGFSDP` handle (``.stats``,
    ``.state_dict()``). ``rate`` (default 3 bits per element), ``step`` or ``rel_step``
    choose the steps; ``settings``: ``error_feedback``, ``block_size``, ``segment``,
    ``rate_gain``, ``warmup_iters``, ``warmup_rate``, ``rans`` (the gradients' frames code
    blocks in the codec's rANS mode where it saves bits; default ``TRANSPORT_RANS``), and
    ``weights`` (None, ``"rf8"`` or ``"eg"``: the parameter all-gathers compressed too, see
    :meth:`GGFSDP.all_gather`) with ``weights_rel_step``."""
    from torch.distributed.fsdp import FSDPModule

    handle = GGFSDP(rate, step, rel_step, **settings)
    units = [(name or "<root>", m) for name, m in model.named_modules()
             if isinstance(m, FSDPModule)]
    if not units:
        raise ValueError("the model has no FSDPModule: call fully_shard on it first")
    for name, m in units:
        m.set_custom_reduce_scatter(_ReduceScatter(handle, name))
        m.set_force_sum_reduction_for_comms(True)
        if handle.weights is not None:
            m.set_custom_all_gather(_AllGather(handle, name))
    return handle
