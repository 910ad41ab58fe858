"""PowerSGD with EG-coded factors: a DDP communication hook where ggcomm codes what
PowerSGD sends.

PowerSGD (Vogels et al., arXiv 1905.13727; torch's ``powerSGD_hook``) replaces each
gradient matrix ``M`` by a rank-``r`` product ``P Q^T`` and all-reduces only the factors
(and, uncompressed, the tensors too small to factor). :func:`powersgd_eg_hook` runs the same
algorithm, step for step as ``torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook``
(warm start, error feedback, orthogonalization, ``min_compression_rate``), and sends its
three all-reduces (the uncompressed tensors, then ``P``, then ``Q``) through
:func:`ggcomm.exchange.coded_sum`: quantized with steps every rank derives from the same
all-gathered moments, EG-coded, exchanged as variable-length frames and summed as exact
integers, so every replica gets the same bits::

    from ggcomm.powersgd import PowerSGDEGState, powersgd_eg_hook

    state = PowerSGDEGState(process_group=None, matrix_approximation_rank=4,
                            start_powerSGD_iter=10, rate=4.0)
    state.register(ddp_model)  # = register_comm_hook(state, powersgd_eg_hook), with names
    ...  # train; state.stats counts the bytes, state.state_dict() checkpoints

**Error feedback.** PowerSGD's own error feedback (``use_error_feedback``, always on here)
keeps ``M - P Q^T`` per rank and adds it to the next gradient (kept per parameter, as are
the warm-start ``Q`` factors, so DDP's bucket rebuild at the start of every run, resumed
ones included, does not mix them up; ``batch_tensors_with_same_shape`` is not offered).
The approximation it subtracts is built from the decoded sums, so the codec's rounding of
``Q`` and of the uncompressed tensors is carried into the next iteration with PowerSGD's
own error: the codec adds no residual of its own. ``P`` is orthogonalized after its sum,
so its rounding only tilts the subspace the next ``Q`` is projected on.

Before ``start_powerSGD_iter`` (PowerSGD's warm-up) the bucket is all-reduced in fp32, as
torch's hook does. Costs: the hook runs its collectives in the backward pass's thread (no
overlap with the rest of the backward), four small ones and one frame exchange per coded
sum (:mod:`ggcomm.exchange`).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

from . import __version__, codec
from ._host import to_host
from .errors import GGCommError, StateLoadError
from .exchange import DEFAULT_SEGMENT, Stream, coded_sum
from .kernels import eg
from .step_policy import TRANSPORT_RANS, StepControl, StepSettings
from .transport import (
    TrafficStats,
    check_state_header,
    fingerprint,
    raise_after_backward,
    state_header,
)

__all__ = ["POWERSGD_RATE", "PowerSGDEGState", "powersgd_eg_hook"]

POWERSGD_RATE = 4.0
"""Default bits per element of PowerSGD's factors: each factor element stands for a whole
row or column of a gradient matrix, and ``P``'s rounding is not fed back (it is
orthogonalized), so they get a bit more than a plain gradient's 3 (``DEFAULT_RATE``)."""

_STATE_VERSION = 1
_COUNTERS = ("bytes_sent", "bytes_received", "raw_bytes", "elements", "payload_bits",
             "seconds")
_PARTS = ("uncompressed", "p", "q")


class PowerSGDEGState(powerSGD_hook.PowerSGDState, StepSettings):
    """torch's ``PowerSGDState`` plus the codec's settings, per-stream rate control and
    the traffic counters (``stats``).

    PowerSGD's arguments mean what they mean to torch (``use_error_feedback`` is always on:
    it carries the codec's rounding too). ``rate`` (default :data:`POWERSGD_RATE`),
    ``step`` or ``rel_step`` choose the factors' steps as for the DDP hook, with
    ``rate_gain``, ``warmup_iters`` and ``warmup_rate``; ``block_size`` and ``segment``
    (elements per step) shape the frames; ``rans`` lets them code blocks in the codec's
    rANS mode where that saves bits (default ``TRANSPORT_RANS``, off).
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None,
                 matrix_approximation_rank: int = 1, start_powerSGD_iter: int = 10,
                 min_compression_rate: float = 2, warm_start: bool = True,
                 orthogonalization_epsilon: float = 0, random_seed: int = 0, *,
                 rate: float | None = None, step: float | None = None,
                 rel_step: float | None = None, rate_gain: float = 0.5,
                 warmup_iters: int = 0, warmup_rate: float = 8.0,
                 block_size: int = codec.DEFAULT_BLOCK_SIZE,
                 segment: int = DEFAULT_SEGMENT, rans: bool = TRANSPORT_RANS) -> None:
        super().__init__(process_group, matrix_approximation_rank, start_powerSGD_iter,
                         min_compression_rate, use_error_feedback=True,
                         warm_start=warm_start,
                         orthogonalization_epsilon=orthogonalization_epsilon,
                         random_seed=random_seed,
                         compression_stats_logging_frequency=1 << 62)
        self.control = StepControl(rate, step, rel_step, default=("rate", POWERSGD_RATE),
                                   rate_gain=rate_gain, warmup_iters=warmup_iters,
                                   warmup_rate=warmup_rate)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or \
                not 1 <= block_size <= eg.MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be an int in 1..{eg.MAX_BLOCK_SIZE}")
        if isinstance(segment, bool) or not isinstance(segment, int) or segment < 1:
            raise ValueError(f"segment must be a positive int, got {segment!r}")
        codec.check_code_args(rans=rans)
        self.block_size, self.segment, self.rans = block_size, segment, rans
        self.streams: dict[str, Stream] = {}
        self.stats = TrafficStats(_COUNTERS)
        self._names: dict[int, str] = {}

    def register(self, ddp_model: torch.nn.parallel.DistributedDataParallel) -> None:
        """Register :func:`powersgd_eg_hook` on ``ddp_model`` and learn its parameter
        names, which key the error-feedback and warm-start memories (else a parameter is
        known by its place in DDP's buckets, which a resumed run does not share)."""
        self._names = {id(p): name for name, p in ddp_model.module.named_parameters()}
        ddp_model.register_comm_hook(self, powersgd_eg_hook)

    def _key(self, p: torch.Tensor, bucket: int, i: int) -> str:
        return self._names.get(id(p)) or f"#{bucket}.{i}"

    def settings(self) -> dict[str, Any]:
        """What every rank must share (its hash is every frame's tag)."""
        return {"transport": "powersgd", "ggcomm": __version__, "format": codec.VERSION,
                **self.control.settings(), "block_size": self.block_size,
                "segment": self.segment, "rank": self.matrix_approximation_rank,
                "start_iter": self.start_powerSGD_iter,
                "min_compression_rate": self.min_compression_rate,
                "warm_start": self.warm_start}

    @functools.cached_property
    def fingerprint(self) -> int:
        return fingerprint(self.settings())

    def maybe_increase_iter(self, bucket: dist.GradBucket) -> None:
        """torch's iteration count, and the end of the counters' iteration."""
        if bucket.is_last():
            self.stats.end_iteration()
        super().maybe_increase_iter(bucket)

    def _group(self) -> dist.ProcessGroup:
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def _sum(self, bucket_index: int, part: str, t: torch.Tensor) -> None:
        """Replace ``t`` (flat) by its exact sum over the group, EG-coded on the wire."""
        t0 = time.perf_counter()
        group = self._group()
        world = dist.get_world_size(group)
        key = f"{bucket_index}/{part}"
        x = to_host(t.detach()).to(torch.float32).contiguous().numpy()
        stream = self.streams.get(key)
        if stream is None or stream.numel != x.size:
            stream = self.streams[key] = Stream(x.size, 1, self.segment, feedback=False)
        out, counts = coded_sum(x, stream, self.control, key, group,
                                block_size=self.block_size, tag=self.fingerprint,
                                describe=str(self.settings()),
                                what=f"ggcomm PowerSGD all-reduce of {key}", rans=self.rans)
        t.copy_(torch.from_numpy(out).to(t.device, t.dtype))
        self.stats.add(**counts, raw_bytes=float((world - 1) * x.size * t.element_size()),
                       elements=float((world - 1) * x.size), seconds=time.perf_counter() - t0)

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """This rank's PowerSGD memory (error feedback, warm-start factors, iteration, the
        random generator), rate-control state and counters; tensors and Python scalars
        only, so ``torch.load`` reads it with ``weights_only=True``."""
        rng = self.rng.get_state()
        return {
            **state_header(_STATE_VERSION, self.settings(), self.process_group),
            "iter": self.iter,
            "rng": [rng[0], [int(v) for v in rng[1]], int(rng[2]), int(rng[3]),
                    float(rng[4])],
            "error": {k: v.detach().cpu().clone() for k, v in self.error_dict.items()},
            "q": {k: v.detach().cpu().clone() for k, v in self.q_memory_dict.items()},
            "streams": {k: s.state_dict() for k, s in self.streams.items()},
            "rate_corr": {k: float(v) for k, v in self.control.corr.items()},
            "stats_total": {k: float(v) for k, v in self.stats.counts["all"].items()},
        }

    def load_state_dict(self, sd: dict[str, Any], device: torch.device | str = "cpu") -> None:
        """Resume from :meth:`state_dict` (the same rank and world size and settings: else
        :class:`StateLoadError` / :class:`SettingsMismatchError`); ``device``: where the
        gradients live."""
        check_state_header(sd, _STATE_VERSION, self.settings(), "ggcomm PowerSGD",
                           self.process_group)
        streams = {}
        for key, s in sd["streams"].items():
            streams[key] = Stream(int(s["numel"]), 1, self.segment, feedback=False)
            streams[key].load(s, f"stream {key!r}")
        self.streams = streams
        self.iter = int(sd["iter"])
        r = sd["rng"]
        self.rng.set_state((r[0], np.array(r[1], np.uint32), int(r[2]), int(r[3]),
                            float(r[4])))
        for name, target in (("error", self.error_dict), ("q", self.q_memory_dict)):
            target.clear()
            target.update({str(k): v.to(device) for k, v in sd[name].items()})
        self.control.corr.clear()
        self.control.corr.update({k: float(v) for k, v in sd["rate_corr"].items()})
        self.stats.reset()
        self.stats.load_totals(dict(sd["stats_total"]))

    def __getstate__(self) -> dict[str, Any]:
        d = super().__getstate__()
        d.pop("fingerprint", None)
        return d


def powersgd_eg_hook(state: PowerSGDEGState,
                     bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """PowerSGD on ``bucket`` with its all-reduces EG-coded (see the module docstring).
    Register with ``ddp_model.register_comm_hook(state, powersgd_eg_hook)``."""
    group = state._group()
    world = dist.get_world_size(group)
    input_tensor = bucket.buffer()
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    if state.iter < state.start_powerSGD_iter:  # PowerSGD's warm-up: fp32, as torch's
        t0 = time.perf_counter()
        dist.all_reduce(input_tensor, group=group)
        input_tensor.div_(world)
        b = float(2 * (world - 1) * input_tensor.numel() * input_tensor.element_size() / world)
        state.stats.add(bytes_sent=b, bytes_received=b, raw_bytes=b,
                        elements=float(2 * (world - 1) * input_tensor.numel() / world),
                        seconds=time.perf_counter() - t0)
        state.maybe_increase_iter(bucket)
        fut.set_result(input_tensor)
        return fut

    try:
        _compress(state, bucket, world)
    except GGCommError as e:  # every rank has one (coded_sum agrees on the outcome)
        raise_after_backward(e)
    fut.set_result(input_tensor)
    return fut


def _compress(state: PowerSGDEGState, bucket: dist.GradBucket, world: int) -> None:
    index = bucket.index()
    grads = bucket.gradients()
    keys = [state._key(p, index, i) for i, p in enumerate(bucket.parameters())]
    # PowerSGD's error feedback, kept per parameter (DDP's bucket layout changes once in
    # every run: names keep the memories where they belong, across a resume too)
    for k, g in zip(keys, grads, strict=True):
        e = state.error_dict.get(k)
        if e is not None:
            if e.shape != g.shape:
                raise StateLoadError(f"the error feedback of {k!r} has shape "
                                     f"{tuple(e.shape)}, its gradient {tuple(g.shape)}")
            g.add_(e)
    before = [g.detach().clone() for g in grads]

    rank_r = state.matrix_approximation_rank
    factored, plain = [], []
    for k, g in zip(keys, grads, strict=True):
        matrix = g.view(g.shape[0], -1)
        n, m = matrix.shape
        r = min(n, m, rank_r)
        if (n + m) * r * state.min_compression_rate < n * m:  # torch's _should_compress
            factored.append((k, matrix, r))
        else:
            plain.append(g)

    # 1. the tensors PowerSGD does not factor: one coded sum, then the mean
    if plain:
        flat = torch.cat([t.reshape(-1) for t in plain])
        state._sum(index, "uncompressed", flat)
        flat.div_(world)
        at = 0
        for t in plain:
            t.copy_(flat[at: at + t.numel()].view_as(t))
            at += t.numel()

    if factored:
        device, dtype = grads[0].device, grads[0].dtype
        p_flat = torch.empty(sum(mt.shape[0] * r for _, mt, r in factored), device=device,
                             dtype=dtype)
        q_flat = torch.empty(sum(mt.shape[1] * r for _, mt, r in factored), device=device,
                             dtype=dtype)
        ps, qs = [], []
        p_at = q_at = 0
        for _, mt, r in factored:
            n, m = mt.shape
            ps.append(p_flat[p_at: p_at + n * r].view(1, n, r))
            qs.append(q_flat[q_at: q_at + m * r].view(1, m, r))
            p_at, q_at = p_at + n * r, q_at + m * r
        # Q: the last iteration's (warm start), else standard normal from the state's
        # generator, the same on every rank; then orthogonalized, as torch does
        fresh = [state.warm_start is False or k not in state.q_memory_dict
                 or state.q_memory_dict[k].shape != q.shape[1:]
                 for (k, _, _), q in zip(factored, qs, strict=True)]
        if any(fresh):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(state.rng.randint(1_000_000_000))
                for new, q in zip(fresh, qs, strict=True):
                    if new:
                        q.copy_(torch.randn(*q.shape, device="cpu", dtype=dtype))
        for new, (k, _, _), q in zip(fresh, factored, qs, strict=True):
            if not new:
                q.copy_(state.q_memory_dict[k].unsqueeze(0))
            powerSGD_hook._orthogonalize(q, state.orthogonalization_epsilon)
        # 2. P = M Q, summed (PowerSGD orthogonalizes the sum: no division)
        for (_, mt, _), q, p in zip(factored, qs, ps, strict=True):
            torch.bmm(mt.unsqueeze(0), q, out=p)
        state._sum(index, "p", p_flat)
        for p in ps:
            powerSGD_hook._orthogonalize(p, state.orthogonalization_epsilon)
        # 3. Q = M^T P, averaged; M ~ P Q^T
        for (_, mt, _), p, q in zip(factored, ps, qs, strict=True):
            torch.bmm(mt.unsqueeze(0).transpose(1, 2), p, out=q)
        state._sum(index, "q", q_flat)
        q_flat.div_(world)
        for (k, mt, _), p, q in zip(factored, ps, qs, strict=True):
            torch.bmm(p, q.transpose(1, 2), out=mt.unsqueeze(0))
            if state.warm_start:
                state.q_memory_dict[k] = q[0].clone()

    for k, g, b in zip(keys, grads, before, strict=True):
        state.error_dict[k] = b - g
    state.maybe_increase_iter(bucket)


# DDP's register_comm_hook checks the annotations themselves, not their names as strings
powersgd_eg_hook.__annotations__ = {"state": PowerSGDEGState, "bucket": dist.GradBucket,
                                    "return": torch.futures.Future[torch.Tensor]}
