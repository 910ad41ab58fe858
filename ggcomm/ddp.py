"""DDP communication hook: gradients quantized and Exp-Golomb-coded on the wire.

Two lines on a ``DistributedDataParallel`` model::

    from ggcomm.ddp import GGCommState
    state = GGCommState(process_group=None, rate=3.0)
    state.register(ddp_model)

(``ddp_model.register_comm_hook(state, gg_hook)`` registers the same hook without learning
the parameter names, which ``state_dict`` needs as keys: it then refuses to save.)

What goes over the wire, per bucket and iteration (steady state):

1. one small all-gather of each rank's frame size(s) and per-parameter statistics of this
   iteration's gradients (sum of squares, sum of magnitudes, non-finite count, coded bits):
   every rank computes every parameter's step for the *next* iteration from the same
   gathered numbers, so the steps agree bit for bit without a round trip of their own;
2. the frames, with their exact variable lengths, through ``all_to_all_single`` with uneven
   splits (gloo rejects uneven all-gathers, and padding would waste the bandwidth this
   saves): one frame per rank (``allgather``), or one per rank and destination chunk
   (``reduce_scatter``), whose owner sums the chunk exactly, re-encodes it losslessly and
   sends it to every rank in a third exchange (its sizes ride on the next bucket's step 1).

Each pass over the data is one fused kernel: error feedback, statistics, quantization and
coding in one pass (the residual is written as the block is coded); peers' frames decoded
straight into an exact integer sum and written into the bucket as the average (this rank's
own integers come from the encoder, never decoded). Every rank sums the same integers, so
every rank ends with bit-identical averaged gradients. ``state.stats`` counts the bytes of
every tensor handed to torch.distributed (see ``_COUNTERS`` for the convention) and
times every pass (``state.stats.last_buckets``).
"""


# No `from __future__ import annotations` here: DDP checks the hook's `bucket` annotation
# against dist.GradBucket at registration, and a postponed (string) annotation fails it.
import dataclasses
import datetime
import functools
import json
import math
import queue
import threading
import time
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import __version__, codec
from ._host import to_host
from .codec import DEFAULT_BLOCK_SIZE
from .errors import FrameError, GGCommError, SettingsMismatchError, StateLoadError
from .exchange import all_gather, all_to_all, device_for
from .step_policy import TRANSPORT_RANS, StepControl, StepSettings
from .transport import TrafficStats, check_saved_settings, fingerprint

__all__ = ["GGCommState", "SettingsMismatchError", "gg_hook"]

_STATE_VERSION = 3


# --------------------------------------------------------------------------- stats

# What the hook counts (see ggcomm.transport.TrafficStats). Bytes are those of the tensors
# this rank hands to torch.distributed, counted the way the bandwidth-optimal algorithm moves
# them: for all_to_all_single exactly the splits sent to (received from) other ranks; for an
# all-gather of b bytes per rank, (N - 1) b each way. raw_bytes is what a ring all-reduce of
# the same gradients in float32 would send: 2 (N - 1) / N * 4 * elements. Size exchanges and
# frame headers are included in bytes_sent. Per bucket, stats.last_buckets keeps the element
# count, exchange and wall seconds of each pass (copy_in, agree_steps, encode, c1_info,
# c2_frames, decode, c3_sizes, c3_reduced, finish).
_COUNTERS = ("bytes_sent", "bytes_received", "raw_bytes", "elements", "payload_bits",
             "encode_s", "decode_s", "comm_s", "hook_s")


# --------------------------------------------------------------------------- state


class GGCommState(StepSettings):
    """Everything the gg hook remembers between iterations, and its settings.

    Args:
        process_group: the group to reduce over (default: the whole world). The hook runs
            its own collectives on a private copy of this group, created on first use, so
            that they never interleave with DDP's or the training loop's.
        rate: target bits per element on the wire (the default, 3.0). The GG model picks
            each parameter's step from its shape and scale (measured on the previous
            iteration's gradients, summed over ranks, so the steps cost no round trip),
            and a feedback loop corrects it from the bits actually coded. Lower rates send
            less and add quantization noise (error feedback carries it into the next step,
            so it is not lost).
        step: a fixed quantization step for every parameter, instead of ``rate``.
            Simplest and cheapest (no statistics exchange), but one step cannot suit
            parameters whose gradients differ in scale.
        rel_step: step = ``rel_step`` x RMS of each parameter's gradient (the previous
            iteration's, as for ``rate``), instead of ``rate``. Around 0.25 gives ~4-5 bits
            per element on GG gradients; each halving adds about one bit.
        exchange: ``"allgather"`` (every rank receives every frame: fewest messages, bytes
            per rank grow with the number of ranks), ``"reduce_scatter"`` (each rank sums
            one chunk exactly, re-encodes it losslessly and all-gathers it: bytes per rank
            grow much less with N, 1.6x from 2 to 4 ranks against allgather's 3x in
            ``benchmarks/results/ddp_speed``, where a ring would grow 1.5x; the summed
            chunks code at more bits than one rank's), or ``"auto"`` (allgather up to 2
            ranks).
        error_feedback: add each parameter's quantization residual to its next gradient
            (on by default; without it, small gradients below half a step are lost).
        start_iter: plain all-reduce for the first ``start_iter`` iterations (DDP rebuilds
            its buckets after the first).
        block_size, k: passed to :func:`ggcomm.encode`.
        rans: passed to :func:`ggcomm.encode` (default ``TRANSPORT_RANS``, off: rANS blocks
            cost about twice the codec time for 3-8% fewer bits on light-tailed blocks,
            which pays only on links slower than a few tens of Mbit/s).
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
        step_drift: the steps of iteration t+1 come from iteration t's statistics (no round
            trip of their own) while the bucket's gradient RMS moved by at most this much
            (log2 units; 0.1 = 7%) from the iteration before; a bucket that moved more
            agrees on its steps from its own statistics at t+1 (one more small all-gather),
            as early training and learning-rate warm-ups need, and reuses those statistics
            at t+2, so a bucket whose scale keeps moving agrees afresh every other
            iteration. 0: every iteration agrees afresh; ``inf``: none after the first
            compressed iteration.
        log_path: if given, rank 0 appends one JSON line of per-iteration stats there.
            Rank 0 checks that it can write there on the first call, and every rank raises
            ``OSError`` alike if it cannot (no rank goes on alone).
        tb_writer: an object with ``add_scalar(tag, value, step)`` (e.g. a TensorBoard
            SummaryWriter) that rank 0 sends the per-iteration stats to.
        overlap: run encoding, exchange and decoding on a background thread so they
            overlap with the rest of backward (the kernels release the GIL).
        timeout: how long the hook's collectives wait for a peer (a ``timedelta`` or
            seconds) before they raise; default: the timeout of ``process_group`` (the one
            given to ``init_process_group``), so a stalled peer fails the hook as soon as it
            would fail plain DDP.

    Errors: a frame that does not decode (:class:`~ggcomm.errors.FrameError`) or carries
    other settings (:class:`~ggcomm.errors.SettingsMismatchError`) on any rank makes every
    rank raise that error from ``loss.backward()`` of that iteration, with its type, after
    DDP has finished the iteration. That iteration's gradients are then not an average (in
    part this rank's own values): a training loop that catches the error, zeroes the
    gradients and skips ``optimizer.step()`` keeps every replica identical and can go on.
    A collective that fails (a peer stalled past ``timeout``, or died) is raised the same
    way, with torch.distributed's own error.
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
        rans: bool = TRANSPORT_RANS,
        rate_gain: float = 0.5,
        warmup_iters: int = 0,
        warmup_rate: float = 8.0,
        step_drift: float = 0.1,
        log_path: str | None = None,
        tb_writer: Any = None,
        overlap: bool = True,
        timeout: datetime.timedelta | float | None = None,
    ):
        self.control = StepControl(rate, step, rel_step, rate_gain=rate_gain,
                                             warmup_iters=warmup_iters, warmup_rate=warmup_rate)
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
        self.rans = rans
        codec.check_code_args(k=k, block_size=self.block_size, rans=rans)
        if isinstance(step_drift, bool) or not (isinstance(step_drift, (int, float))
                                                and step_drift >= 0):
            raise ValueError(f"step_drift must be a number >= 0, got {step_drift!r}")
        self.step_drift = float(step_drift)
        self.log_path = log_path
        self.tb_writer = tb_writer
        self.overlap = bool(overlap)
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
            timeout = datetime.timedelta(seconds=float(timeout))
        if timeout is not None and not (isinstance(timeout, datetime.timedelta)
                                        and timeout.total_seconds() > 0):
            raise ValueError(f"timeout must be a positive timedelta or seconds, got {timeout!r}")
        self.timeout = timeout

        self.process_group = process_group
        self.iteration = 0
        self.stats = TrafficStats(_COUNTERS)
        self.residuals: dict[str, torch.Tensor] = {}
        self.last_bits: dict[str, float] = {}  # bits per element coded last iteration
        self.steps: dict[str, float] = {}  # the step each parameter is coded at next
        self.rms: dict[str, float] = {}  # each parameter's RMS over ranks, last iteration
        self._names: dict[int, str] = {}
        self._numels: dict[str, int] = {}
        self._first_seen: dict[int, str] = {}
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._group: dist.ProcessGroup | None = None
        self._comm_device = torch.device("cpu")
        self._checked = False
        self._queue: queue.Queue | None = None
        self._worker: threading.Thread | None = None
        self._plans: dict[tuple[str, ...], _Plan] = {}
        self._pending: _Pending | None = None
        self._scratch: dict[str, Any] = {}  # reusable arrays and host staging buffers
        self._flip = 0
        # this iteration's first error (raised on the training thread when DDP is done), and
        # whether the collectives stopped (a failed collective, or a refusal every rank made)
        self._failure: BaseException | None = None
        self._halted = False
        self._check_queued = False  # a callback will raise this iteration's error
        self._stale_failure: BaseException | None = None

    # ------------------------------------------------------------------ settings

    def settings(self) -> dict[str, Any]:
        """The settings every rank must share (their hash travels in every frame)."""
        return {"ggcomm": __version__, "format": codec.VERSION, **self.control.settings(),
                "exchange": self.exchange, "error_feedback": self.error_feedback,
                "start_iter": self.start_iter, "block_size": self.block_size, "k": self.k,
                "step_drift": self.step_drift}

    def target_rate(self, iteration: int | None = None) -> float:
        """The rate-mode target (bits per element) at ``iteration`` (default: this one)."""
        it = self.iteration if iteration is None else iteration
        return self.control.target(max(it - self.start_iter, 0))

    @functools.cached_property
    def fingerprint(self) -> int:
        """32-bit hash of :meth:`settings`, carried as every frame's tag."""
        return fingerprint(self.settings())

    def code_args(self) -> dict[str, Any]:
        """The codec arguments of this hook's frames (``k``, ``block_size``, ``tag``,
        ``rans``), as ``ggcomm.encode`` and ``codec.encode_feedback`` take them."""
        return {"k": self.k, "block_size": self.block_size, "tag": self.fingerprint,
                "rans": self.rans}

    def register(self, ddp_model: torch.nn.parallel.DistributedDataParallel) -> None:
        """Register :func:`gg_hook` on ``ddp_model`` and learn its parameter names.

        The names key ``state_dict()``, so a checkpoint resumes bit for bit even though
        DDP's bucket layout differs between a fresh start and a long run.
        """
        self._names = {id(p): name for name, p in ddp_model.module.named_parameters()}
        self._numels = {name: p.numel() for name, p in ddp_model.module.named_parameters()}
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

    def _rank_and_world(self) -> tuple[int, int]:
        if not dist.is_initialized():
            return 0, 1
        group = self.process_group or dist.group.WORLD
        return dist.get_rank(group), dist.get_world_size(group)

    def state_dict(self) -> dict[str, Any]:
        """This rank's residuals, rate-control state, iteration and counters.

        Holds only tensors and Python scalars (``torch.load`` reads it with its default
        ``weights_only=True``), and the rank and world size it belongs to: each rank saves
        and loads its own (the residuals are per rank). Refuses to save residuals keyed by
        position (the hook registered with ``ddp.register_comm_hook`` instead of
        ``state.register(ddp)``): positions follow DDP's bucket order, which a resumed run
        does not share, so such a checkpoint would resume the residuals on the wrong
        parameters.
        """
        if self._first_seen:
            raise StateLoadError(
                f"{len(self._first_seen)} parameters have no name (the hook was registered "
                f"with ddp.register_comm_hook): register it with state.register(ddp_model) "
                f"so that the state dict is keyed by parameter name and resumes exactly")
        rank, world = self._rank_and_world()
        scalars = lambda d: {str(k): float(v) for k, v in d.items()}  # noqa: E731
        return {
            "version": _STATE_VERSION,
            "settings": self.settings(),
            "rank": rank,
            "world_size": world,
            "iteration": int(self.iteration),
            "residuals": {k: v.detach().clone() for k, v in self.residuals.items()},
            "rate_corr": scalars(self.rate_corr),
            "last_bits": scalars(self.last_bits),
            "steps": scalars(self.steps),
            "rms": scalars(self.rms),
            "stats_total": scalars(self.stats.total),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; call it after :meth:`register` to have the
        residuals' names and sizes checked against the model.

        Raises :class:`~ggcomm.errors.StateLoadError` if the state was saved by another
        rank or at another world size, or names parameters the model lacks or has in
        another size, and :class:`~ggcomm.errors.SettingsMismatchError` if it was saved
        with other settings.
        """
        if not isinstance(sd, dict) or sd.get("version") not in (1, 2, _STATE_VERSION):
            raise StateLoadError(f"unsupported GGCommState state_dict version "
                                 f"{sd.get('version') if isinstance(sd, dict) else sd!r}")
        check_saved_settings(self.settings(), sd["settings"])
        rank, world = self._rank_and_world()
        if "rank" in sd and (sd["rank"], sd["world_size"]) != (rank, world):
            raise StateLoadError(
                f"this state was saved by rank {sd['rank']} of {sd['world_size']}, and is "
                f"loaded on rank {rank} of {world}: residuals are per rank, so each rank "
                f"saves and loads its own file (and the world size must not change)")
        residuals = sd["residuals"]
        if self._numels:
            unknown = sorted(set(residuals) - set(self._numels))
            if unknown:
                raise StateLoadError(f"the state has residuals for parameters this model "
                                     f"lacks: {unknown[:5]}")
            for key, v in residuals.items():
                if v.numel() != self._numels[key]:
                    raise StateLoadError(
                        f"parameter {key!r} has {self._numels[key]} elements, its saved "
                        f"residual {v.numel()}: the model's shapes changed")
        elif any(k.startswith("#") for k in residuals):
            raise StateLoadError("the state keys residuals by position; register the hook "
                                 "with state.register(ddp_model) and save it again")
        self.iteration = int(sd["iteration"])
        self.residuals = {k: v.clone() for k, v in residuals.items()}
        self.control.corr = dict(sd["rate_corr"])
        self.last_bits = dict(sd["last_bits"])
        # version 1 kept no steps: the first iteration after loading one agrees on them anew
        self.steps = dict(sd.get("steps", {}))
        self.rms = dict(sd.get("rms", {}))
        self.stats.load_totals(sd["stats_total"])
        self._plans = {}

    def __getstate__(self) -> dict[str, Any]:
        # Like PowerSGDState: no process group, no thread; unpickled, the state reduces
        # over the default group.
        d = {k: v for k, v in self.__dict__.items()
             if k not in ("process_group", "_group", "_queue", "_worker", "_checked",
                          "_comm_device", "_plans", "_pending", "_scratch", "_flip",
                          "tb_writer", "_names", "_numels", "_first_seen", "fingerprint",
                          "_failure", "_halted", "_check_queued", "_stale_failure")}
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self.process_group = None
        self.tb_writer = None
        self._names = {}
        self._numels = {}
        self._first_seen = {}
        self._init_runtime()

    # ------------------------------------------------------------------ plumbing

    def _comm_timeout(self) -> datetime.timedelta | None:
        """``timeout``, else the timeout of the group the hook reduces over."""
        if self.timeout is not None:
            return self.timeout
        parent = self.process_group or dist.group.WORLD
        try:
            dev = torch.device("cuda") if dist.get_backend(parent) == "nccl" else \
                torch.device("cpu")
            return parent._get_backend(dev).options._timeout
        except (AttributeError, RuntimeError):  # a backend without options: torch's default
            return None

    def _comm_group(self) -> dist.ProcessGroup:
        if self._group is None:
            ranks = dist.get_process_group_ranks(self.process_group or dist.group.WORLD)
            self._group = dist.new_group(ranks=ranks, timeout=self._comm_timeout())
            # NCCL moves only CUDA tensors: frames are staged through the current device.
            self._comm_device = device_for(self._group)
        return self._group

    def _submit(self, job: "_BucketJob") -> None:
        group = self._comm_group()
        if not self.overlap:
            _run_job(self, group, job)
            return
        if self._worker is None:
            self._queue = queue.Queue()
            self._worker = threading.Thread(target=self._serve, name="ggcomm-ddp", daemon=True)
            self._worker.start()
        self._queue.put((group, job))

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:  # close()
                return
            _run_job(self, *item)

    def close(self) -> None:
        """Stop the hook's background thread and release its private process group: call
        it on every rank when training is over, before ``destroy_process_group``, so no
        thread or gloo group outlives the process group it was made from. The state keeps
        its residuals (``state_dict`` still works); a later hook call starts both again."""
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = self._queue = None
        if self._group is not None:
            group, self._group = self._group, None
            if dist.is_initialized():
                dist.destroy_process_group(group)

    def _fail(self, e: BaseException) -> None:
        if self._failure is None:
            self._failure = e

    def _raise_failure(self, job: "_BucketJob") -> None:
        """On the training thread, once the iteration's last bucket is done: raise the
        iteration's error, if any, with its own type."""
        job.fut.wait()
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure


class _BucketJob:
    """What the hook needs from a GradBucket, captured on the calling thread."""

    __slots__ = ("buffer", "params", "lengths", "is_last", "event", "fut")

    @classmethod
    def capture(cls, bucket: dist.GradBucket, fut: torch.futures.Future) -> "_BucketJob":
        job = cls()
        job.buffer = bucket.buffer()
        job.params = list(bucket.parameters())
        job.lengths = [g.numel() for g in bucket.gradients()]
        job.is_last = bucket.is_last()
        job.event = None
        job.fut = fut
        if job.buffer.is_cuda:  # the worker's copy waits for the gradients on this event
            job.event = torch.cuda.Event()
            job.event.record()
        return job


def _run_job(state: GGCommState, group, job: _BucketJob) -> None:
    """Reduce one bucket; resolve every future whose bucket is now complete.

    With ``reduce_scatter`` a bucket's second phase rides on the next bucket's first
    collective, so its future resolves one bucket later (the last bucket of an iteration
    finishes at once). DDP waits on the futures only after launching every bucket.

    Errors never travel on a future (DDP would take the exception for the result and
    raise ``Unable to cast ... to Tensor``): the iteration's first error is kept and raised
    on the training thread once DDP has finished the iteration (see :func:`gg_hook`). That
    iteration's gradients are not one average on every rank (ranks whose frames decoded hold
    the average; a frame refused before decoding leaves the local gradients; one that fails
    in a later block leaves the blocks summed before it), so the step must be skipped, as
    the error says. A bucket whose frames did not decode on this rank
    still takes part in every exchange, so that every rank reaches the end of the
    iteration, where the ranks agree on whether any failed. A failed collective, or a
    refusal every rank made alike, stops this iteration's collectives.
    """
    done: list[_BucketJob] = []
    if not state._halted:
        try:
            done = _reduce_bucket(state, group, job)
        except BaseException as e:  # noqa: BLE001 - raised on the training thread instead
            state._fail(e)
            state._halted = True
    if state._halted:  # resolve whatever waits: this bucket and a pending one
        pending, state._pending = state._pending, None
        done = ([pending.job] if pending is not None and pending.job is not job else []) + \
            [job]
    for j in done:
        if j.is_last:
            if not state._halted:
                try:
                    _agree_on_failures(state, group)
                except BaseException as e:  # noqa: BLE001
                    state._fail(e)
            state._halted = False
            if state._failure is not None and not state._check_queued:
                state._stale_failure, state._failure = state._failure, None
            _end_iteration(state)
        if not j.fut.done():
            j.fut.set_result(j.buffer)


def gg_hook(state: GGCommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average a bucket's gradients over ranks through quantized, EG-coded frames.

    Costs per bucket, in steady state: one small all-gather (sizes and statistics) and one
    all-to-all of the frames (``allgather``), plus one all-to-all of the reduced chunks
    (``reduce_scatter``); one fused encode pass and one decode-and-accumulate pass, in numba
    kernels with the GIL released. Gains: gradients at ``state``'s rate (3 bits per element
    by default) instead of 32, with error feedback keeping training on track.

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
    if state._stale_failure is not None:
        # an error its iteration could not raise (no end-of-backward callback ran): raise
        # it now, before anything more is exchanged
        failure, state._stale_failure = state._stale_failure, None
        raise failure
    job = _BucketJob.capture(bucket, torch.futures.Future())
    if job.is_last:
        _raise_after_ddp(state, job)
    state._submit(job)
    return job.fut


def _raise_after_ddp(state: GGCommState, job: "_BucketJob") -> None:
    """Raise the iteration's error on the training thread after DDP's own end-of-backward
    callback (which waits for every bucket's future): errors keep their type, and DDP's
    reducer finishes the iteration, so the next one works. A callback queued now runs
    before DDP queues its own (DDP does that after this hook returns); it queues the check
    behind DDP's."""
    engine = torch.autograd.Variable._execution_engine

    def check() -> None:
        state._check_queued = False
        state._raise_failure(job)

    try:
        engine.queue_callback(lambda: engine.queue_callback(check))
        state._check_queued = True
    except RuntimeError:  # not inside a backward pass: the next hook call raises it
        state._check_queued = False


# --------------------------------------------------------------------------- the reduction
#
# Per bucket and iteration, in steady state (every parameter already has a step):
#
#   allgather:       encode (fused: feedback + statistics + quantize + code, one pass)
#                    c1 all_gather of [frame size, per-parameter statistics and bits]
#                    c2 all_to_all of the frames (exact lengths)
#                    decode-and-accumulate every peer's frame into the bucket (one pass)
#   reduce_scatter:  encode one frame per destination chunk (same fused pass)
#                    c1 all_gather of [frame sizes, previous bucket's reduced-frame size,
#                       statistics and bits]; then c3 for the previous bucket
#                    c2 all_to_all of the chunk frames
#                    decode-and-accumulate this rank's chunk to exact integers and re-encode
#                    them losslessly; c3 (all_to_all of the reduced frames) rides the next
#                    bucket's c1 for its sizes (the last bucket of an iteration pays one
#                    8-byte all_gather instead)
#
# The statistics gathered in c1 set every parameter's step for the next iteration, so the
# steps are agreed without a round trip of their own and are bit-identical on every rank
# (each rank computes them from the same gathered numbers in the same order). A parameter
# seen for the first time has no step yet: its bucket first agrees on one from statistics
# of this iteration (one more all_gather, on the first compressed iteration only).


class _Plan:
    """Per bucket layout (keyed by its parameters): segments, residual buffer, chunks."""

    def __init__(self, state: GGCommState, keys: tuple[str, ...], lengths: list[int], n: int):
        self.keys = keys
        self.lengths = lengths
        self.numel = int(sum(lengths))
        self.seg_bounds = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=self.seg_bounds[1:])
        self.chunk_bounds = [self.numel * r // n for r in range(n + 1)]
        self.chunk_segments = [
            np.diff(np.clip(self.seg_bounds, lo, hi)).tolist()
            for lo, hi in zip(self.chunk_bounds[:-1], self.chunk_bounds[1:], strict=True)]
        self.resid: torch.Tensor | None = None
        if state.error_feedback:
            # one flat float32 buffer per bucket; state.residuals holds views into it
            self.resid = torch.zeros(self.numel, dtype=torch.float32)
            o = 0
            for key, length in zip(keys, lengths, strict=True):
                old = state.residuals.get(key)
                view = self.resid[o:o + length]
                if old is not None and old.numel() == length:
                    view.copy_(old.reshape(-1))
                state.residuals[key] = view
                o += length


class _Pending:
    """A reduce_scatter bucket whose reduced frame waits for its exchange."""

    __slots__ = ("job", "plan", "frame", "own", "own_exc", "out")

    def __init__(self, job, plan, frame, own, own_exc, out):
        self.job, self.plan, self.frame, self.own, self.own_exc = job, plan, frame, own, own_exc
        self.out = out


def _scratch(state: GGCommState, name: str, n: int, dtype) -> np.ndarray:
    """A reusable array of at least n elements (buckets are reduced one at a time)."""
    a = state._scratch.get(name)
    if a is None or a.size < n or a.dtype != np.dtype(dtype):
        a = state._scratch[name] = np.empty(max(n, 1), dtype)
    return a[:n]


def _ring_allgather_bytes(nbytes: int, n: int) -> float:
    return float((n - 1) * nbytes)


def _is_writer() -> bool:
    """The rank that logs (global rank 0)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def _check_settings(state: GGCommState, group) -> None:
    """First call, every rank: the settings agree, and the logging rank can write its log
    (else every rank raises alike, instead of one rank failing while the others go on)."""
    n = dist.get_world_size(group)
    log_error = ""
    if state.log_path and _is_writer():
        try:
            with open(state.log_path, "a"):
                pass
        except OSError as e:
            log_error = f"{type(e).__name__}: {e}"
    mine = torch.tensor([state.fingerprint, int(bool(log_error))], dtype=torch.int64)
    gathered = all_gather(mine, group, state._comm_device)
    prints = [int(p[0]) for p in gathered]
    state.stats.add(bytes_sent=_ring_allgather_bytes(16, n),
                    bytes_received=_ring_allgather_bytes(16, n))
    if len(set(prints)) > 1:
        raise SettingsMismatchError(
            f"ggcomm settings differ between ranks (fingerprints by rank: "
            f"{[hex(p) for p in prints]}); this rank has {state.settings()}")
    if any(int(p[1]) for p in gathered):
        raise OSError(f"GGCommState(log_path={state.log_path!r}): the logging rank cannot "
                      f"write there ({log_error or 'see its error'})")
    state._checked = True


class _Timer:
    """Per-pass times of one bucket (seconds), kept in ``stats.buckets``: wall time, and
    the CPU time of the thread running the hook (``cpu_<pass>``; with one codec thread that
    is all the pass's CPU time, and wall minus CPU is time the thread waited or was
    descheduled)."""

    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.c = time.thread_time()
        self.times: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        self.times[name] = self.times.get(name, 0.0) + now - self.t
        self.times["cpu_" + name] = self.times.get("cpu_" + name, 0.0) + cpu - self.c
        self.t, self.c = now, cpu


def _is_host_f32(flat: torch.Tensor) -> bool:
    return flat.dtype == torch.float32 and flat.device.type == "cpu" and flat.is_contiguous()


def _staging(state: GGCommState, name: str, flat: torch.Tensor) -> torch.Tensor:
    """A reusable float32 host buffer for the bucket; pinned for CUDA buckets, so that the
    copies are DMA transfers that need not block the device."""
    t = state._scratch.get(name)
    n = flat.numel()
    if t is None or t.numel() < n:
        t = torch.empty(max(n, 1), dtype=torch.float32, pin_memory=flat.is_cuda)
        state._scratch[name] = t
    return t[:n]


def _host_input(state: GGCommState, job: _BucketJob) -> np.ndarray:
    """The bucket as a flat float32 CPU array: the bucket itself when it is one.

    A CUDA bucket is copied device-to-host into pinned memory without blocking, after the
    event recorded when the hook was called (its gradients are ready), and waited for on
    that copy's event alone: one PCIe transfer of the bucket each way per iteration.
    """
    flat = job.buffer.detach().reshape(-1)
    if _is_host_f32(flat):
        return flat.numpy()
    return to_host(flat, out=_staging(state, "input", flat), after=job.event).numpy()


def _host_output(state: GGCommState, job: _BucketJob, g: np.ndarray) -> np.ndarray:
    """Where the averaged bucket is written: the bucket itself when it is float32 CPU."""
    flat = job.buffer.detach().reshape(-1)
    if _is_host_f32(flat):
        return g  # the same memory: encoding has read it before decoding writes it
    return _staging(state, "output", flat).numpy()


def _store_output(job: _BucketJob, out: np.ndarray) -> None:
    """Copy the averaged bucket into a bucket that is not float32 host memory."""
    flat = job.buffer.detach().reshape(-1)
    if _is_host_f32(flat):
        return
    src = torch.from_numpy(out)
    if flat.is_cuda:  # from pinned memory; done before the future resolves
        with torch.cuda.device(flat.device):
            flat.copy_(src, non_blocking=True)
            torch.cuda.current_stream().synchronize()
    else:
        flat.copy_(src)


def _plan(state: GGCommState, job: _BucketJob, n: int) -> _Plan:
    keys = tuple(state._key(p) for p in job.params)
    plan = state._plans.get(keys)
    if plan is None or plan.lengths != job.lengths or len(plan.chunk_bounds) != n + 1:
        plan = state._plans[keys] = _Plan(state, keys, list(job.lengths), n)
    return plan


def _moments(plan: _Plan, stats: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean of x^2, mean of |x|) per parameter from statistics summed over ranks."""
    count = n * np.maximum(np.asarray(plan.lengths, np.float64), 1.0)
    return stats[:, 0] / count, stats[:, 1] / count


def _agree_steps_now(state: GGCommState, group, plan: _Plan, g: np.ndarray, timer) -> None:
    """First sight of a parameter: agree on steps from this iteration's statistics."""
    if state.mode == "step":  # one fixed step: nothing to agree on
        for key in plan.keys:
            state.steps[key] = state.value
        return
    n = dist.get_world_size(group)
    resid = plan.resid.numpy() if plan.resid is not None else None
    local = np.ascontiguousarray(codec.moments(g, resid, plan.lengths)[:, :2])
    parts = all_gather(torch.from_numpy(local), group, state._comm_device)
    state.stats.add(bytes_sent=_ring_allgather_bytes(local.nbytes, n),
                    bytes_received=_ring_allgather_bytes(local.nbytes, n))
    total = parts[0].numpy().copy()
    for p in parts[1:]:  # rank order: every rank adds in the same order, bit-identical
        total += p.numpy()
    mean_sq, mean_abs = _moments(plan, total, n)
    target = state.target_rate()
    for i, key in enumerate(plan.keys):
        step = state.control.step(key, float(mean_sq[i]), float(mean_abs[i]), target=target)
        state.steps[key] = 1.0 if step is None else step  # zeros: any step codes them
        state.rms[key] = math.sqrt(max(float(mean_sq[i]), 0.0))
    timer.lap("agree_steps")


def _next_steps(state: GGCommState, plan: _Plan, infos: np.ndarray, n: int) -> None:
    """Every parameter's step for the next iteration, from statistics gathered in c1.

    ``infos[r]`` holds rank r's per-parameter (sum x^2, sum |x|, non-finite count, payload
    bits) of this iteration, coded at this iteration's target. A parameter whose finite
    values were all zero keeps its step (zeros code exactly at any step).
    """
    total = infos[0].copy()
    for p in infos[1:]:  # rank order: bit-identical on every rank
        total += p
    mean_sq, mean_abs = _moments(plan, total, n)
    target, next_target = state.target_rate(), state.target_rate(state.iteration + 1)
    for i, key in enumerate(plan.keys):
        length = max(plan.lengths[i], 1)
        measured = float(total[i, 3]) / (n * length)
        state.last_bits[key] = measured
        step = state.control.step(key, float(mean_sq[i]), float(mean_abs[i]),
                                  measured_bits=measured, measured_target=target,
                                  target=next_target)
        if step is not None:  # else all zeros: they coded exactly, the step stays
            state.steps[key] = step
    # the bucket's RMS (over all its elements) against the previous iteration's
    before = _bucket_rms(state, plan)
    for i, key in enumerate(plan.keys):
        state.rms[key] = math.sqrt(max(float(mean_sq[i]), 0.0))
    now = _bucket_rms(state, plan)
    if state.mode != "step" and plan.numel and (state.step_drift == 0 or (
            now != before and not (now > 0 and before > 0
                                   and abs(math.log2(now / before)) <= state.step_drift))):
        # statistics on the move: the next iteration agrees on its own steps
        for key in plan.keys:
            state.steps.pop(key, None)


def _bucket_rms(state: GGCommState, plan: _Plan) -> float:
    """RMS over the bucket's elements from its parameters' last RMS (0 if one is unknown)."""
    total = count = 0.0
    for key, length in zip(plan.keys, plan.lengths, strict=True):
        r = state.rms.get(key)
        if r is None:
            return 0.0
        total += length * r * r
        count += length
    return math.sqrt(total / count) if count else 0.0


def _check_tag(frame: codec.Frame, state: GGCommState, src: int) -> None:
    if frame.tag != state.fingerprint:
        raise SettingsMismatchError(
            f"a frame from rank {src} carries settings fingerprint {frame.tag:#010x}, this "
            f"rank's is {state.fingerprint:#010x}: ranks run different ggcomm settings")


def _peer_frames(recv: torch.Tensor, sizes: list[int], rank: int, state: GGCommState,
                 steps: np.ndarray, segments, dtype: torch.dtype,
                 ) -> list[tuple[int, codec.Frame] | None]:
    """Parse the frames of every other rank out of one receive buffer (None for ours).

    Each must be exactly the frame this rank expects from that rank: ``segments(src)``
    (its segment lengths, hence its element count), ``dtype``, this hook's block size and
    the agreed ``steps``; anything else is a FrameError naming the rank, before any decode
    (a frame of another shape would be summed onto the wrong elements).
    """
    out: list[tuple[int, codec.Frame] | None] = []
    o = 0
    for src, size in enumerate(sizes):
        if src == rank:
            out.append(None)
            continue
        expected = segments(src)
        try:
            f = codec.Frame.from_buffer(recv[o:o + size], max_numel=int(sum(expected)))
        except codec.FrameError as e:
            raise codec.FrameError(f"the frame from rank {src}: {e}") from None
        _check_tag(f, state, src)
        if (f.dtype != dtype or f.block_size != state.block_size
                or f.segment_lengths().tolist() != list(expected)
                or not np.array_equal(f.steps, steps)):
            raise codec.FrameError(
                f"the frame from rank {src} is not the one expected: {f.numel} {f.dtype} "
                f"elements in {len(f.steps)} segments at block size {f.block_size}, expected "
                f"{int(sum(expected))} {dtype} in {len(expected)} at {state.block_size}, "
                f"with the agreed steps")
        out.append((o, f))
        o += size
    return out


def _summed(recv, frames, **kw):
    try:
        return codec.sum_frames(recv, frames, **kw)
    except codec.FrameError as e:
        # sum_frames names frames by their index, which is the sending rank here
        raise codec.FrameError(f"rank {str(e).removeprefix('frame ')}") from None


def _check_infos(infos: np.ndarray, limits: list[int], what: list[str]) -> None:
    """Refuse what ranks announced before anything is sized from it.

    Every rank holds the same gathered ``infos`` and runs the same checks, so a bad value
    raises FrameError on every rank alike, before any receive is posted (a receive buffer
    sized from a lie would abort gloo, or allocate what the header claims). The first
    ``len(limits)`` columns are byte counts (whole numbers in 0..limit), the rest statistics
    (finite, >= 0).
    """
    k = len(limits)
    for r, row in enumerate(infos):
        for c in range(k):
            v = row[c]
            if not (math.isfinite(v) and v == int(v) and 0 <= v <= limits[c]):
                raise codec.FrameError(
                    f"rank {r} announced {float(v):g} bytes for {what[c]}, outside 0..{limits[c]} "
                    f"(the largest valid frame): corrupt statistics or a hostile peer")
        stats = row[k:]
        if not (np.isfinite(stats).all() and (stats >= 0).all()):
            raise codec.FrameError(f"rank {r} announced non-finite or negative statistics")


def _info(n_sizes: int, plan: _Plan) -> np.ndarray:
    return np.zeros(n_sizes + 4 * len(plan.keys), np.float64)


_FAILURE_CODES = {FrameError: 1, SettingsMismatchError: 2}


def _agree_on_failures(state: GGCommState, group) -> None:
    """End of an iteration: every rank learns whether any rank's frames failed to decode,
    so that all raise alike (one 8-byte all-gather per iteration)."""
    n = dist.get_world_size(group)
    code = 0
    if state._failure is not None:
        code = next((c for t, c in _FAILURE_CODES.items() if isinstance(state._failure, t)), 3)
    codes = [int(v) for v in all_gather(torch.tensor([code], dtype=torch.int64), group,
                                         state._comm_device)]
    state.stats.add(bytes_sent=_ring_allgather_bytes(8, n),
                    bytes_received=_ring_allgather_bytes(8, n))
    bad = [r for r, c in enumerate(codes) if c]
    if bad and state._failure is None:
        kind = {1: FrameError, 2: SettingsMismatchError}.get(codes[bad[0]], GGCommError)
        state._failure = kind(
            f"rank(s) {bad} could not reduce this iteration's gradients ({kind.__name__} "
            f"there; see that rank's error): every rank raises; this iteration's gradients "
            f"are not the same average on every rank, so skip this optimizer step "
            f"(zero_grad and go on) and the replicas stay identical")


def _decoding(state: GGCommState, fn) -> tuple[bool, Any]:
    """``(True, fn())``; a frame that fails to decode is this rank's error for the
    iteration, and gives ``(False, None)``: the exchange goes on (see :func:`_run_job`)."""
    try:
        return True, fn()
    except (FrameError, SettingsMismatchError) as e:
        state._fail(e)
        return False, None


def _reduce_bucket(state: GGCommState, group, job: _BucketJob) -> list[_BucketJob]:
    """Reduce one bucket; returns the jobs (this one and/or a pending one) now complete."""
    n = dist.get_world_size(group)
    rank = dist.get_rank(group)
    timer = _Timer()
    t_start = timer.t
    plan = _plan(state, job, n)
    g = _host_input(state, job)
    timer.lap("copy_in")
    if any(key not in state.steps for key in plan.keys):
        _agree_steps_now(state, group, plan, g, timer)
    steps = np.array([state.steps[key] for key in plan.keys], np.float64)
    exchange = state.exchange
    if exchange == "auto":
        exchange = "allgather" if n <= 2 else "reduce_scatter"
    resid = plan.resid.numpy() if plan.resid is not None else None
    code = state.code_args()
    dev = state._comm_device
    b = _Bucket(state, group, job, n, rank, timer, plan, g, steps, resid, code, dev)
    reduce = _allgather_bucket if exchange == "allgather" else _reduce_scatter_bucket
    done, payload = reduce(b)
    state.stats.add(bytes_sent=b.sent, bytes_received=b.received,
                    raw_bytes=2 * (n - 1) / n * 4 * plan.numel, elements=plan.numel,
                    payload_bits=payload,
                    encode_s=timer.times.get("encode", 0.0),
                    decode_s=timer.times.get("decode", 0.0),
                    comm_s=sum(v for k, v in timer.times.items() if k[:3] in ("c1_", "c2_", "c3_")),
                    hook_s=time.perf_counter() - t_start)
    state.stats.buckets.append({"numel": plan.numel, "exchange": exchange, **timer.times})
    return done


@dataclasses.dataclass
class _Bucket:
    """One bucket's pass through the hook: what every exchange needs, and its byte counts."""

    state: GGCommState
    group: Any
    job: _BucketJob
    n: int
    rank: int
    timer: _Timer
    plan: _Plan
    g: np.ndarray
    steps: np.ndarray
    resid: np.ndarray | None
    code: dict[str, Any]
    dev: torch.device
    sent: float = 0.0
    received: float = 0.0


def _allgather_bucket(b: _Bucket) -> tuple[list[_BucketJob], float]:
    """Every rank gets every frame and sums them all; returns (jobs done, payload bits)."""
    state, group, job, n, rank, timer = b.state, b.group, b.job, b.n, b.rank, b.timer
    plan, g, steps, resid, code, dev = b.plan, b.g, b.steps, b.resid, b.code, b.dev
    done: list[_BucketJob] = []
    own_q = _scratch(state, "own_q", plan.numel, np.int32)
    frame, seg_stats = codec.encode_feedback(g, resid, steps, plan.lengths, q_out=own_q,
                                             **code)
    seg_bits = frame.segment_bits()
    timer.lap("encode")
    info = _info(1, plan)
    info[0] = frame.nbytes
    info[1:] = np.column_stack([seg_stats, seg_bits]).reshape(-1)
    infos = torch.stack(all_gather(torch.from_numpy(info), group, dev)).numpy()
    b.sent += _ring_allgather_bytes(info.nbytes, n)
    b.received += _ring_allgather_bytes(info.nbytes, n)
    timer.lap("c1_info")
    _check_infos(infos, [codec.max_frame_bytes(plan.lengths, state.block_size, 4)],
                 ["its frame"])
    sizes = [int(v) for v in infos[:, 0]]
    send_sizes = [0 if d == rank else frame.nbytes for d in range(n)]
    recv_sizes = [0 if s == rank else sizes[s] for s in range(n)]
    recv = all_to_all(frame.buffer.repeat(n - 1) if n > 1 else frame.buffer[:0],
                       send_sizes, recv_sizes, group, dev)
    b.sent += sum(send_sizes)
    b.received += sum(recv_sizes)
    timer.lap("c2_frames")
    out = _host_output(state, job, g)

    def average():
        if n == 1:
            return codec.sum_frames(frame.buffer, [(0, frame)], divisor=1.0, out=out)
        frames = _peer_frames(recv, recv_sizes, rank, state, steps,
                              lambda src: plan.lengths, torch.float32)
        return _summed(recv, frames, own=own_q, own_exceptions=frame.exceptions(),
                       divisor=float(n), out=out)

    ok, _ = _decoding(state, average)
    timer.lap("decode")
    if ok:
        _store_output(job, out)
    _next_steps(state, plan, infos[:, 1:].reshape(n, -1, 4), n)
    timer.lap("finish")
    done.append(job)
    return done, float(np.sum(seg_bits))


def _encode_chunks(b: _Bucket) -> tuple[list[tuple[codec.Frame, np.ndarray]], np.ndarray]:
    """One frame per rank's chunk (with its statistics), and this rank's own integers."""
    frames_out, own_q = [], None
    for r in range(b.n):
        lo, hi = b.plan.chunk_bounds[r], b.plan.chunk_bounds[r + 1]
        q = _scratch(b.state, "own_q", hi - lo, np.int32) if r == b.rank else None
        resid = b.resid[lo:hi] if b.resid is not None else None
        f, st = codec.encode_feedback(b.g[lo:hi], resid, b.steps, b.plan.chunk_segments[r],
                                      q_out=q, **b.code)
        frames_out.append((f, st))
        if r == b.rank:
            own_q = q
    return frames_out, own_q


def _finish_last(b: _Bucket, mine: _Pending) -> None:
    """The iteration's last bucket: no later bucket carries the sizes of its reduced
    chunks, so gather them in one small exchange and finish it now."""
    size = torch.tensor([float(mine.frame.nbytes)], dtype=torch.float64)
    gathered = torch.stack(all_gather(size, b.group, b.dev)).numpy()
    _check_infos(gathered, [max(codec.max_frame_bytes(segs, b.state.block_size, 8)
                                for segs in b.plan.chunk_segments)],
                 ["its reduced chunk"])
    b.sent += _ring_allgather_bytes(8, b.n)
    b.received += _ring_allgather_bytes(8, b.n)
    b.timer.lap("c3_sizes")
    s_, r_ = _finish_reduced(b.state, b.group, mine, [int(v) for v in gathered[:, 0]],
                             b.timer)
    b.sent += s_
    b.received += r_


def _reduce_scatter_bucket(b: _Bucket) -> tuple[list[_BucketJob], float]:
    """Each rank sums its chunk exactly, re-encodes it and the reduced chunks are
    all-gathered (with the next bucket's sizes); returns (jobs done, payload bits)."""
    state, group, job, n, rank, timer = b.state, b.group, b.job, b.n, b.rank, b.timer
    plan, g, steps, code, dev = b.plan, b.g, b.steps, b.code, b.dev
    done: list[_BucketJob] = []
    frames_out, own_q = _encode_chunks(b)
    seg_stats = np.sum([st for _, st in frames_out], axis=0)
    seg_bits = np.sum([f.segment_bits() for f, _ in frames_out], axis=0)
    timer.lap("encode")
    pending = state._pending
    info = _info(n + 1, plan)
    info[:n] = [f.nbytes for f, _ in frames_out]
    info[n] = pending.frame.nbytes if pending is not None else 0
    info[n + 1:] = np.column_stack([seg_stats, seg_bits]).reshape(-1)
    infos = torch.stack(all_gather(torch.from_numpy(info), group, dev)).numpy()
    b.sent += _ring_allgather_bytes(info.nbytes, n)
    b.received += _ring_allgather_bytes(info.nbytes, n)
    timer.lap("c1_info")
    limits = [codec.max_frame_bytes(plan.chunk_segments[d], state.block_size, 4)
              for d in range(n)]
    # the previous bucket's reduced frames (float64) are announced in column n
    limits.append(0 if pending is None else max(
        codec.max_frame_bytes(segs, state.block_size, 8)
        for segs in pending.plan.chunk_segments))
    _check_infos(infos, limits, [f"its chunk frame for rank {d}" for d in range(n)]
                 + ["its reduced chunk"])
    if pending is not None:
        state._pending = None
        s_, r_ = _finish_reduced(state, group, pending, [int(v) for v in infos[:, n]],
                                 timer)
        b.sent += s_
        b.received += r_
        done.append(pending.job)
    send_sizes = [0 if d == rank else frames_out[d][0].nbytes for d in range(n)]
    recv_sizes = [0 if s == rank else int(infos[s, rank]) for s in range(n)]
    send = torch.cat([frames_out[d][0].buffer for d in range(n) if d != rank]) if n > 1 \
        else torch.empty(0, dtype=torch.uint8)
    recv = all_to_all(send, send_sizes, recv_sizes, group, dev)
    b.sent += sum(send_sizes)
    b.received += sum(recv_sizes)
    timer.lap("c2_frames")
    lo, hi = plan.chunk_bounds[rank], plan.chunk_bounds[rank + 1]
    # two alternating buffers: the previous bucket's sums wait for its exchange in one
    state._flip ^= 1
    ssum = _scratch(state, f"sum{state._flip}", hi - lo, np.int64)
    own_frame = frames_out[rank][0]
    own_exc = own_frame.exceptions()

    def chunk_sum():
        if n == 1:
            return codec.sum_frames(own_frame.buffer, [(0, own_frame)], out=ssum)
        frames = _peer_frames(recv, recv_sizes, rank, state, steps,
                              lambda src: plan.chunk_segments[rank], torch.float32)
        return _summed(recv, frames, own=own_q, own_exceptions=own_exc, out=ssum)

    ok, sums = _decoding(state, chunk_sum)
    if not ok:  # still send a valid reduced chunk (this rank's own): peers wait for it
        sums = codec.sum_frames(recv, [None], own=own_q, own_exceptions=own_exc,
                                out=ssum, like=own_frame)
    xpos, xval = sums
    timer.lap("decode")
    reduced = codec.encode_integers(ssum, steps, plan.chunk_segments[rank], xpos, xval,
                                    **code)
    timer.lap("encode")
    _next_steps(state, plan, infos[:, n + 1:].reshape(n, -1, 4), n)
    out = _host_output(state, job, g)
    mine = _Pending(job, plan, reduced, ssum, reduced.exceptions(), out)
    if job.is_last:  # nothing follows to carry the sizes: one small exchange
        _finish_last(b, mine)
        done.append(job)
    else:
        state._pending = mine
    timer.lap("finish")
    return done, float(np.sum(seg_bits))


def _finish_reduced(state: GGCommState, group, p: _Pending, sizes: list[int], timer,
                    ) -> tuple[float, float]:
    """c3 of a reduce_scatter bucket: exchange the reduced chunks, write the average."""
    n = dist.get_world_size(group)
    rank = dist.get_rank(group)
    send_sizes = [0 if d == rank else p.frame.nbytes for d in range(n)]
    recv_sizes = [0 if s == rank else sizes[s] for s in range(n)]
    recv = all_to_all(p.frame.buffer.repeat(n - 1) if n > 1 else p.frame.buffer[:0],
                       send_sizes, recv_sizes, group, state._comm_device)
    timer.lap("c3_reduced")
    bounds = p.plan.chunk_bounds

    def average():
        frames = _peer_frames(recv, recv_sizes, rank, state, np.asarray(p.frame.steps),
                              lambda src: p.plan.chunk_segments[src], torch.float64)
        for src in range(n):
            lo, hi = bounds[src], bounds[src + 1]
            if src == rank:  # this rank's chunk: from the integers it summed, not decoded
                codec.sum_frames(recv, [None], own=p.own, own_exceptions=p.own_exc,
                                 divisor=float(n), out=p.out[lo:hi], like=p.frame)
            else:
                _summed(recv, [None if i != src else frames[src] for i in range(n)],
                        divisor=float(n), out=p.out[lo:hi])

    ok, _ = _decoding(state, average)
    timer.lap("decode")
    if ok:
        _store_output(p.job, p.out)
    return float(sum(send_sizes)), float(sum(recv_sizes))


def _end_iteration(state: GGCommState) -> None:
    summary = state.stats.end_iteration()
    state.iteration += 1
    if not _is_writer():
        return
    summary["iteration"] = state.iteration
    # Logging is a side channel: a failure to log (a full disk, a closed writer) must not
    # stop one rank while the others train on, so it warns once and logging stops.
    if state.log_path:
        try:
            with open(state.log_path, "a") as fh:
                fh.write(json.dumps(summary) + "\n")
        except OSError as e:
            warnings.warn(f"ggcomm: cannot write {state.log_path!r} ({e}); logging stops",
                          RuntimeWarning, stacklevel=1)
            state.log_path = None
    if state.tb_writer is not None:
        try:
            for name in ("bytes_sent", "ratio", "bits_per_element", "encode_s", "decode_s"):
                state.tb_writer.add_scalar(f"ggcomm/{name}", summary[name], state.iteration)
        except Exception as e:  # noqa: BLE001 - any writer's error, see above
            warnings.warn(f"ggcomm: tb_writer failed ({type(e).__name__}: {e}); it is "
                          f"dropped", RuntimeWarning, stacklevel=1)
            state.tb_writer = None
