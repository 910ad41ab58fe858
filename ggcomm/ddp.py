"""DDP communication hook: gradients quantized and Exp-Golomb-coded on the wire.

Two lines on a ``DistributedDataParallel`` model::

    from ggcomm.ddp import GGCommState, gg_hook
    state = GGCommState(process_group=None, rate=3.0)
    ddp_model.register_comm_hook(state, gg_hook)

(``state.register(ddp_model)`` does the same and also learns the parameter names, which
``state_dict`` uses as keys: do that when you checkpoint the hook's state.)

What goes over the wire, per bucket and iteration:

1. a tiny all-gather of per-parameter statistics (sum of squares, sum of magnitudes, and
   last iteration's coded bits), so that every rank picks the same step per parameter;
2. one frame per rank (``allgather``) or per rank and destination (``reduce_scatter``):
   the bucket's gradients plus the error-feedback residual, quantized with those steps and
   Exp-Golomb coded, exchanged with their exact variable lengths (sizes first, then the
   bytes, through ``all_to_all_single`` with uneven splits: gloo rejects uneven
   all-gathers, and padding would waste the bandwidth this saves).

Every rank decodes every frame to integers and sums them exactly, so every rank ends with
bit-identical averaged gradients. ``state.stats`` counts the bytes of every tensor handed
to torch.distributed (see :class:`GGCommStats` for the convention).
"""


# No `from __future__ import annotations` here: DDP checks the hook's `bucket` annotation
# against dist.GradBucket at registration, and a postponed (string) annotation fails it.
import functools
import json
import math
import queue
import threading
import time
import zlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import __version__, codec
from . import stepping as _stepping
from .codec import DEFAULT_BLOCK_SIZE, encode

__all__ = ["GGCommState", "GGCommStats", "SettingsMismatchError", "gg_hook"]

_STATE_VERSION = 1


class SettingsMismatchError(RuntimeError):
    """Ranks were configured differently (settings or ggcomm versions disagree)."""


# --------------------------------------------------------------------------- stats

_COUNTERS = ("bytes_sent", "bytes_received", "raw_bytes", "elements", "payload_bits",
             "encode_s", "decode_s", "comm_s")


class GGCommStats:
    """Byte and time counters, cumulative (``total``) and for the last iteration.

    Bytes are those of the tensors this rank hands to torch.distributed, counted the way
    the bandwidth-optimal algorithm moves them: for ``all_to_all_single`` exactly the
    splits sent to (received from) other ranks; for an all-gather of ``b`` bytes per rank,
    ``(N - 1) b`` each way. ``raw_bytes`` is what a ring all-reduce of the same gradients
    in float32 would send: ``2 (N - 1) / N * 4 * elements``. Size exchanges and frame
    headers are included in ``bytes_sent``.
    """

    def __init__(self) -> None:
        self.total = self._zero()
        self.last_step = self._zero()
        self._current = self._zero()

    @staticmethod
    def _zero() -> dict[str, float]:
        d = {name: 0.0 for name in _COUNTERS}
        d["steps"] = 0
        return d

    @staticmethod
    def _derived(d: dict[str, float]) -> dict[str, float]:
        out = dict(d)
        out["ratio"] = d["raw_bytes"] / d["bytes_sent"] if d["bytes_sent"] else float("nan")
        out["bits_per_element"] = (8.0 * d["bytes_sent"] / d["elements"] if d["elements"]
                                   else float("nan"))
        out["payload_bits_per_element"] = (d["payload_bits"] / d["elements"] if d["elements"]
                                           else float("nan"))
        return out

    def add(self, **counts: float) -> None:
        for name, value in counts.items():
            self._current[name] += value

    def end_step(self) -> dict[str, float]:
        self._current["steps"] = 1
        self.last_step = self._current
        for name in _COUNTERS + ("steps",):
            self.total[name] += self._current[name]
        self._current = self._zero()
        return self._derived(self.last_step)

    def summary(self) -> dict[str, dict[str, float]]:
        """``{"total": ..., "last_step": ...}`` with ratio and bits per element."""
        return {"total": self._derived(self.total), "last_step": self._derived(self.last_step)}

    def __getitem__(self, key: str) -> dict[str, float]:
        return self.summary()[key]


# --------------------------------------------------------------------------- state


class GGCommState:
    """Everything the gg hook remembers between iterations, and its settings.

    Args:
        process_group: the group to reduce over (default: the whole world). The hook runs
            its own collectives on a private copy of this group, created on first use, so
            that they never interleave with DDP's or the training loop's.
        rate: target bits per element on the wire (the default, 3.0). The GG model picks
            each parameter's step from its shape and scale, and a feedback loop corrects
            it from the bits actually coded. Lower rates send less and add quantization
            noise (error feedback carries it into the next step, so it is not lost).
        step: a fixed quantization step for every parameter, instead of ``rate``.
            Simplest and cheapest (no statistics exchange), but one step cannot suit
            parameters whose gradients differ in scale.
        rel_step: step = ``rel_step`` x RMS of each parameter's gradient, instead of
            ``rate``. Around 0.25 gives ~4-5 bits per element on GG gradients; each
            halving adds about one bit.
        exchange: ``"allgather"`` (every rank receives every frame: fewest messages, bytes
            per rank grow with the number of ranks), ``"reduce_scatter"`` (each rank sums
            one chunk exactly, re-encodes it losslessly and all-gathers it: bytes per rank
            stay about 2 (N - 1) / N times a frame), or ``"auto"`` (allgather up to 2 ranks).
        error_feedback: add each parameter's quantization residual to its next gradient
            (on by default; without it, small gradients below half a step are lost).
        start_iter: plain all-reduce for the first ``start_iter`` iterations (DDP rebuilds
            its buckets after the first).
        block_size, k: passed to :func:`ggcomm.encode`.
        rate_gain: how strongly the feedback loop corrects the step (log2 units per bit of
            error per iteration): higher tracks the target faster but oscillates more.
        warmup_iters, warmup_rate: in rate mode, the target starts at ``warmup_rate`` bits
            per element on the first compressed iteration and falls linearly to ``rate``
            over ``warmup_iters`` iterations (0, the default, disables it). Adam-type
            optimizers need it: at a low rate most small gradients are sent as zeros and
            then, through error feedback, as an occasional whole quantization step, and an
            Adam second moment that never saw their real size turns those bursts into
            updates several times the learning rate. A few iterations at a high rate seed
            the second moments with the real early gradients (PowerSGD's uncompressed
            warm-up does the same at full cost). Costs about ``warmup_iters *
            (warmup_rate - rate) / 2`` extra bits per element in total.
        log_path: if given, rank 0 appends one JSON line of per-iteration stats there.
        tb_writer: an object with ``add_scalar(tag, value, step)`` (e.g. a TensorBoard
            SummaryWriter) that rank 0 sends the per-iteration stats to.
        overlap: run encoding, exchange and decoding on a background thread so they
            overlap with the rest of backward (the kernels release the GIL).
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        *,
        rate: float | None = None,
        step: float | None = None,
        rel_step: float | None = None,
        exchange: str = "auto",
        error_feedback: bool = True,
        start_iter: int = 1,
        block_size: int = DEFAULT_BLOCK_SIZE,
        k: int | str = "auto",
        rate_gain: float = 0.5,
        warmup_iters: int = 0,
        warmup_rate: float = 8.0,
        log_path: str | None = None,
        tb_writer: Any = None,
        overlap: bool = True,
    ):
        self.mode, self.value = _stepping.parse_mode(rate, step, rel_step)
        if exchange not in ("auto", "allgather", "reduce_scatter"):
            raise ValueError(f"exchange must be auto, allgather or reduce_scatter, "
                             f"not {exchange!r}")
        self.exchange = exchange
        self.error_feedback = bool(error_feedback)
        if not (isinstance(start_iter, int) and start_iter >= 0):
            raise ValueError("start_iter must be a non-negative int")
        self.start_iter = start_iter
        self.block_size = int(block_size)
        self.k = k
        codec.encode(torch.zeros(1), 1.0, k=k, block_size=self.block_size)  # validate
        self.rate_gain = float(rate_gain)
        if not (isinstance(warmup_iters, int) and warmup_iters >= 0):
            raise ValueError(f"warmup_iters must be a non-negative int, got {warmup_iters!r}")
        if warmup_iters and self.mode != "rate":
            raise ValueError("warmup_iters needs rate mode (a target rate to warm up to)")
        if warmup_iters and not (math.isfinite(warmup_rate) and warmup_rate > self.value):
            raise ValueError(f"warmup_rate ({warmup_rate!r}) must be above rate ({self.value})")
        self.warmup_iters = warmup_iters
        self.warmup_rate = float(warmup_rate) if warmup_iters else None
        self.log_path = log_path
        self.tb_writer = tb_writer
        self.overlap = bool(overlap)

        self.process_group = process_group
        self.iteration = 0
        self.stats = GGCommStats()
        self.residuals: dict[str, torch.Tensor] = {}
        self.rate_corr: dict[str, float] = {}  # log2 step corrections (rate mode)
        self.last_bits: dict[str, float] = {}  # bits per element coded last iteration
        self._names: dict[int, str] = {}
        self._first_seen: dict[int, str] = {}
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._group: dist.ProcessGroup | None = None
        self._comm_device = torch.device("cpu")
        self._checked = False
        self._queue: queue.Queue | None = None
        self._worker: threading.Thread | None = None

    # ------------------------------------------------------------------ settings

    def settings(self) -> dict[str, Any]:
        """The settings every rank must share (their hash travels in every frame)."""
        return {"ggcomm": __version__, "format": codec.VERSION, "mode": self.mode,
                "value": self.value, "exchange": self.exchange,
                "error_feedback": self.error_feedback, "start_iter": self.start_iter,
                "block_size": self.block_size, "k": self.k, "rate_gain": self.rate_gain,
                "warmup_iters": self.warmup_iters, "warmup_rate": self.warmup_rate}

    def target_rate(self, iteration: int | None = None) -> float:
        """The rate-mode target (bits per element) at ``iteration`` (default: this one)."""
        it = self.iteration if iteration is None else iteration
        done = max(it - self.start_iter, 0)
        if self.mode != "rate" or done >= self.warmup_iters:
            return self.value
        return self.warmup_rate + (self.value - self.warmup_rate) * done / self.warmup_iters

    @functools.cached_property
    def fingerprint(self) -> int:
        """32-bit hash of :meth:`settings`, carried as every frame's tag."""
        return zlib.crc32(json.dumps(self.settings(), sort_keys=True).encode())

    def register(self, ddp_model: torch.nn.parallel.DistributedDataParallel) -> None:
        """Register :func:`gg_hook` on ``ddp_model`` and learn its parameter names.

        The names key ``state_dict()``, so a checkpoint resumes bit for bit even though
        DDP's bucket layout differs between a fresh start and a long run.
        """
        self._names = {id(p): name for name, p in ddp_model.module.named_parameters()}
        ddp_model.register_comm_hook(self, gg_hook)

    def _key(self, p: torch.Tensor) -> str:
        name = self._names.get(id(p))
        if name is not None:
            return name
        key = self._first_seen.get(id(p))
        if key is None:
            key = self._first_seen[id(p)] = f"#{len(self._first_seen)}"
        return key

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Residuals, rate-control state, iteration and counters (no process group)."""
        return {
            "version": _STATE_VERSION,
            "settings": self.settings(),
            "iteration": self.iteration,
            "residuals": {k: v.clone() for k, v in self.residuals.items()},
            "rate_corr": dict(self.rate_corr),
            "last_bits": dict(self.last_bits),
            "stats_total": dict(self.stats.total),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported GGCommState state_dict version {sd.get('version')}")
        mine = {k: v for k, v in self.settings().items() if k != "ggcomm"}
        theirs = {k: v for k, v in sd["settings"].items() if k != "ggcomm"}
        if mine != theirs:
            raise SettingsMismatchError(f"state_dict was saved with settings {theirs}, "
                                        f"this state has {mine}")
        self.iteration = int(sd["iteration"])
        self.residuals = {k: v.clone() for k, v in sd["residuals"].items()}
        self.rate_corr = dict(sd["rate_corr"])
        self.last_bits = dict(sd["last_bits"])
        self.stats.total.update(sd["stats_total"])

    def __getstate__(self) -> dict[str, Any]:
        # Like PowerSGDState: no process group, no thread; unpickled, the state reduces
        # over the default group.
        d = {k: v for k, v in self.__dict__.items()
             if k not in ("process_group", "_group", "_queue", "_worker", "_checked",
                          "_comm_device",
                          "tb_writer", "_names", "_first_seen", "fingerprint")}
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self.process_group = None
        self.tb_writer = None
        self._names = {}
        self._first_seen = {}
        self._init_runtime()

    # ------------------------------------------------------------------ plumbing

    def _comm_group(self) -> dist.ProcessGroup:
        if self._group is None:
            ranks = dist.get_process_group_ranks(self.process_group or dist.group.WORLD)
            self._group = dist.new_group(ranks=ranks)
            # NCCL moves only CUDA tensors: frames are staged through the current device.
            if dist.get_backend(self._group) == "nccl":
                self._comm_device = torch.device("cuda", torch.cuda.current_device())
        return self._group

    def _submit(self, bucket: dist.GradBucket) -> torch.futures.Future:
        fut: torch.futures.Future = torch.futures.Future()
        group = self._comm_group()
        job = _BucketJob.capture(bucket)
        if not self.overlap:
            _run_job(self, group, job, fut)
            return fut
        if self._worker is None:
            self._queue = queue.Queue()
            self._worker = threading.Thread(target=self._serve, name="ggcomm-ddp", daemon=True)
            self._worker.start()
        self._queue.put((group, job, fut))
        return fut

    def _serve(self) -> None:
        while True:
            group, job, fut = self._queue.get()
            _run_job(self, group, job, fut)


class _BucketJob:
    """What the hook needs from a GradBucket, captured on the calling thread."""

    __slots__ = ("buffer", "params", "lengths", "is_last", "event")

    @classmethod
    def capture(cls, bucket: dist.GradBucket) -> "_BucketJob":
        job = cls()
        job.buffer = bucket.buffer()
        job.params = list(bucket.parameters())
        job.lengths = [g.numel() for g in bucket.gradients()]
        job.is_last = bucket.is_last()
        job.event = None
        if job.buffer.is_cuda:
            job.event = torch.cuda.Event()
            job.event.record()
        return job


def _run_job(state: GGCommState, group, job: _BucketJob, fut: torch.futures.Future) -> None:
    try:
        _reduce_bucket(state, group, job)
        if job.is_last:
            _end_iteration(state)
        fut.set_result(job.buffer)
    except BaseException as e:  # noqa: BLE001 - the future carries it to DDP
        fut.set_exception(e)


def gg_hook(state: GGCommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average a bucket's gradients over ranks through quantized, EG-coded frames.

    Costs: per bucket one tiny statistics all-gather (rate and rel_step modes), two small
    size exchanges and the frames themselves; encode and decode run in numba kernels with
    the GIL released. Gains: gradients at ``state``'s rate (3 bits per element by default)
    instead of 32, with error feedback keeping training on track.

    Example::

        state = GGCommState(process_group=None, rate=3.0)
        ddp_model.register_comm_hook(state, gg_hook)
    """
    group = state._comm_group()
    if not state._checked:  # first call, on every rank, before any path can diverge
        _check_settings(state, group)
    if state.iteration < state.start_iter:
        buf = bucket.buffer()
        buf.div_(dist.get_world_size(group))
        work = dist.all_reduce(buf, group=group, async_op=True)
        n = dist.get_world_size(group)
        state.stats.add(bytes_sent=2 * (n - 1) / n * buf.numel() * buf.element_size(),
                        bytes_received=2 * (n - 1) / n * buf.numel() * buf.element_size(),
                        raw_bytes=2 * (n - 1) / n * 4 * buf.numel(), elements=buf.numel())
        is_last = bucket.is_last()

        def done(f):
            if is_last:
                _end_iteration(state)
            return f.value()[0]

        return work.get_future().then(done)
    return state._submit(bucket)


# --------------------------------------------------------------------------- the reduction


def _ring_allgather_bytes(nbytes: int, n: int) -> float:
    return float((n - 1) * nbytes)


def _all_gather(t: torch.Tensor, group, dev: torch.device) -> list[torch.Tensor]:
    """Equal-size all-gather of a CPU tensor; results on the CPU."""
    n = dist.get_world_size(group)
    src = t.to(dev)
    parts = [torch.empty_like(src) for _ in range(n)]
    dist.all_gather(parts, src, group=group)
    return [p.cpu() for p in parts]


def _all_to_all(send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int], group,
                dev: torch.device) -> torch.Tensor:
    """Uneven all_to_all_single of CPU tensors (staged through dev); result on the CPU."""
    recv = torch.empty(sum(recv_sizes), dtype=send.dtype, device=dev)
    dist.all_to_all_single(recv, send.to(dev), output_split_sizes=recv_sizes,
                           input_split_sizes=send_sizes, group=group)
    return recv.cpu()


def _exchange_sizes(sizes: torch.Tensor, group, all_to_all: bool,
                    dev: torch.device) -> torch.Tensor:
    """all_to_all (sizes[d] goes to rank d) or all_gather of one size per rank."""
    n = dist.get_world_size(group)
    if all_to_all:
        return _all_to_all(sizes, [1] * n, [1] * n, group, dev)
    return torch.cat(_all_gather(sizes, group, dev))


def _check_settings(state: GGCommState, group) -> None:
    n = dist.get_world_size(group)
    mine = torch.tensor([state.fingerprint], dtype=torch.int64)
    prints = [int(p) for p in _all_gather(mine, group, state._comm_device)]
    state.stats.add(bytes_sent=_ring_allgather_bytes(8, n),
                    bytes_received=_ring_allgather_bytes(8, n))
    if len(set(prints)) > 1:
        raise SettingsMismatchError(
            f"ggcomm settings differ between ranks (fingerprints by rank: "
            f"{[hex(p) for p in prints]}); this rank has {state.settings()}")
    state._checked = True


def _param_steps(state: GGCommState, keys: list[str], lengths: list[int], x: torch.Tensor,
                 group) -> np.ndarray:
    """Per-parameter steps, identical on every rank."""
    n_params = len(keys)
    if state.mode == "step":
        return np.full(n_params, state.value)
    n = dist.get_world_size(group)
    finite = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).double()
    stats = torch.empty(3 * n_params, dtype=torch.float64)
    o = 0
    for i, length in enumerate(lengths):
        seg = finite[o:o + length]
        stats[3 * i] = seg.square().sum()
        stats[3 * i + 1] = seg.abs().sum()
        stats[3 * i + 2] = state.last_bits.get(keys[i], float("nan"))
        o += length
    parts = _all_gather(stats, group, state._comm_device)
    state.stats.add(bytes_sent=_ring_allgather_bytes(stats.nbytes, n),
                    bytes_received=_ring_allgather_bytes(stats.nbytes, n))
    total = parts[0].clone()
    for p in parts[1:]:  # rank order: every rank adds in the same order, bit-identical
        total += p
    total = total.view(n_params, 3).numpy()
    steps = np.empty(n_params)
    target = state.target_rate()
    previous_target = state.target_rate(state.iteration - 1)
    for i, length in enumerate(lengths):
        count = n * max(length, 1)
        mean_sq, mean_abs = total[i, 0] / count, total[i, 1] / count
        corr = 0.0
        if state.mode == "rate" and math.sqrt(mean_sq) > 0 and math.isfinite(mean_sq):
            measured = total[i, 2] / n  # mean over ranks of last iteration's bits
            corr = _stepping.correct(state.rate_corr.get(keys[i], 0.0), measured,
                                     previous_target, state.rate_gain)
            state.rate_corr[keys[i]] = corr
        # Above the target, each extra bit halves the step (the high-rate law; the feedback
        # loop trims what it misses), so a warm-up needs no new solve of the GG model.
        steps[i] = _stepping.step_for(state.mode, state.value, mean_sq, mean_abs,
                                      corr - (target - state.value))
    return steps


def _sum_frames(frames: Iterable, n_elem: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Exact integer sum of frames sharing steps: (sum of q, sum of exceptions, decode s)."""
    t0 = time.perf_counter()
    total = torch.zeros(n_elem, dtype=torch.float64)
    extra = torch.zeros(n_elem, dtype=torch.float64)
    for f in frames:
        q, pos, vals = codec.decode_symbols(f)
        total += q
        if pos.numel():
            extra.index_add_(0, pos, vals)
    return total, extra, time.perf_counter() - t0


def _check_tag(frame: codec.Frame, state: GGCommState, src: int) -> None:
    if frame.tag != state.fingerprint:
        raise SettingsMismatchError(
            f"a frame from rank {src} carries settings fingerprint {frame.tag:#010x}, this "
            f"rank's is {state.fingerprint:#010x}: ranks run different ggcomm settings")


def _split_frames(buf: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    out, o = [], 0
    for s in sizes:
        out.append(buf[o:o + s])
        o += s
    return out


def _reduce_bucket(state: GGCommState, group, job: _BucketJob) -> None:
    n = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if job.event is not None:
        job.event.synchronize()
    buf = job.buffer
    keys = [state._key(p) for p in job.params]
    lengths = job.lengths
    n_elem = buf.numel()
    x = buf.detach().reshape(-1).to("cpu", torch.float32, copy=True)
    if state.error_feedback:
        o = 0
        for key, length in zip(keys, lengths, strict=True):
            r = state.residuals.get(key)
            if r is not None and r.numel() == length:
                x[o:o + length] += r
            o += length
    steps = _param_steps(state, keys, lengths, x, group)
    step_el = torch.from_numpy(np.repeat(steps, lengths))  # float64, one per element

    exchange = state.exchange
    if exchange == "auto":
        exchange = "allgather" if n <= 2 else "reduce_scatter"
    t0 = time.perf_counter()
    enc_s = dec_s = 0.0
    sent = received = 0.0
    if exchange == "allgather":
        frame = encode(x, steps, segments=lengths, k=state.k, block_size=state.block_size,
                       tag=state.fingerprint)
        enc_s += time.perf_counter() - t0
        own = [frame]
        seg_bits = frame.segment_bits()
        frames = _allgather_frames(frame.buffer, group, state._comm_device)
        sent += _ring_allgather_bytes(8, n) + (n - 1) * frame.nbytes
        received += _ring_allgather_bytes(8, n) + sum(
            f.numel() for i, f in enumerate(frames) if i != rank)
        decoded = []
        for src, fb in enumerate(frames):
            f = frame if src == rank else codec.Frame.from_buffer(fb)
            _check_tag(f, state, src)
            decoded.append(f)
        total, extra, d = _sum_frames(decoded, n_elem)
        dec_s += d
        result = total * step_el + extra
    else:
        bounds = [n_elem * r // n for r in range(n + 1)]
        seg_bounds = np.concatenate([[0], np.cumsum(lengths)])
        own = []
        for r in range(n):
            lo, hi = bounds[r], bounds[r + 1]
            cuts = np.clip(seg_bounds, lo, hi)
            seg_len = np.diff(cuts)
            own.append(encode(x[lo:hi], steps, segments=seg_len.tolist(), k=state.k,
                              block_size=state.block_size, tag=state.fingerprint))
        enc_s += time.perf_counter() - t0
        seg_bits = np.sum([f.segment_bits() for f in own], axis=0)
        sizes = torch.tensor([f.nbytes for f in own], dtype=torch.int64)
        recv_sizes = _exchange_sizes(sizes, group, True, state._comm_device)
        send = torch.cat([f.buffer for f in own])
        recv = _all_to_all(send, sizes.tolist(), recv_sizes.tolist(), group, state._comm_device)
        sent += 8 * (n - 1) + float(sizes.sum() - sizes[rank])
        received += 8 * (n - 1) + float(recv_sizes.sum() - recv_sizes[rank])
        # this rank owns chunk `rank`: sum the integers exactly, re-encode losslessly
        lo, hi = bounds[rank], bounds[rank + 1]
        chunk_frames = []
        for src, fb in enumerate(_split_frames(recv, recv_sizes.tolist())):
            f = codec.Frame.from_buffer(fb)
            _check_tag(f, state, src)
            chunk_frames.append(f)
        total, extra, d = _sum_frames(chunk_frames, hi - lo)
        dec_s += d
        chunk_steps = step_el[lo:hi]
        chunk_sum = total * chunk_steps + extra
        t1 = time.perf_counter()
        cuts = np.clip(seg_bounds, lo, hi)
        reduced = encode(chunk_sum, steps, segments=np.diff(cuts).tolist(), k=state.k,
                         block_size=state.block_size, tag=state.fingerprint)
        enc_s += time.perf_counter() - t1
        frames = _allgather_frames(reduced.buffer, group, state._comm_device)
        sent += _ring_allgather_bytes(8, n) + (n - 1) * reduced.nbytes
        received += _ring_allgather_bytes(8, n) + sum(
            f.numel() for i, f in enumerate(frames) if i != rank)
        pieces = []
        t2 = time.perf_counter()
        for src, fb in enumerate(frames):
            f = reduced if src == rank else codec.Frame.from_buffer(fb)
            _check_tag(f, state, src)
            q, pos, vals = codec.decode_symbols(f)
            piece = q * step_el[bounds[src]:bounds[src + 1]]
            if pos.numel():
                piece.index_put_((pos,), vals)  # q is 0 there
            pieces.append(piece)
        dec_s += time.perf_counter() - t2
        result = torch.cat(pieces)

    if state.error_feedback:
        t3 = time.perf_counter()
        mine = torch.cat([codec.decode(f).reshape(-1) for f in own]).double()
        dec_s += time.perf_counter() - t3
        resid = (x.double() - mine).float()
        resid = torch.where(torch.isfinite(resid), resid, torch.zeros_like(resid))
        o = 0
        for key, length in zip(keys, lengths, strict=True):
            state.residuals[key] = resid[o:o + length].clone()
            o += length
    for key, length, bits in zip(keys, lengths, seg_bits, strict=True):
        state.last_bits[key] = float(bits) / max(length, 1)
    result /= n
    buf.copy_(result.to(buf.dtype).view_as(buf))
    elapsed = time.perf_counter() - t0
    state.stats.add(bytes_sent=sent, bytes_received=received,
                    raw_bytes=2 * (n - 1) / n * 4 * n_elem, elements=n_elem,
                    payload_bits=float(np.sum(seg_bits)), encode_s=enc_s, decode_s=dec_s,
                    comm_s=max(0.0, elapsed - enc_s - dec_s))


def _allgather_frames(frame_buf: torch.Tensor, group, dev: torch.device) -> list[torch.Tensor]:
    """Every rank's frame, exact lengths: sizes first, then one uneven all_to_all."""
    n = dist.get_world_size(group)
    size = torch.tensor([frame_buf.numel()], dtype=torch.int64)
    sizes = _exchange_sizes(size, group, False, dev).tolist()
    recv = _all_to_all(frame_buf.repeat(n), [frame_buf.numel()] * n, sizes, group, dev)
    return _split_frames(recv, sizes)


def _end_iteration(state: GGCommState) -> None:
    summary = state.stats.end_step()
    state.iteration += 1
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if not rank0:
        return
    summary["iteration"] = state.iteration
    if state.log_path:
        with open(state.log_path, "a") as fh:
            fh.write(json.dumps(summary) + "\n")
    if state.tb_writer is not None:
        for name in ("bytes_sent", "ratio", "bits_per_element", "encode_s", "decode_s"):
            state.tb_writer.add_scalar(f"ggcomm/{name}", summary[name], state.iteration)
