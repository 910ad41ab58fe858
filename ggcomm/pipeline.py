"""Pipeline-parallel send/recv with Exp-Golomb-coded tensors on the wire.

In pipeline parallelism every micro-batch's activations cross a stage boundary forward and
their gradients cross it backward. These functions are drop-in replacements for
``torch.distributed.send`` / ``recv`` / ``isend`` / ``irecv`` that quantize a floating-point
tensor, encode it with :func:`ggcomm.encode`, send the real variable-length frame and decode
it on the receiving rank::

    from ggcomm.pipeline import PipeComm
    comm = PipeComm(rate=4.0)                    # or step=..., rel_step=...
    comm.send(activations, dst=next_rank)        # on one stage
    x = comm.recv(src=prev_rank, out=buffer)     # on the next
    print(comm.stats.summary())

(The module-level :func:`send`, :func:`recv`, :func:`isend`, :func:`irecv` use one default
:class:`PipeComm`, set up with :func:`configure`.)

What goes over the wire, per floating-point tensor: a 16-byte preamble (the payload's
length and a fingerprint of the sender's protocol settings) and then the payload, which is
a ggcomm frame, or the raw bytes for tensors below ``min_numel`` elements (a frame's
header would cost more than it saves, and small tensors such as a pipeline's loss scalar
stay exact). Non-float tensors (masks, indices, the integer metadata pipeline engines
exchange) go through ``torch.distributed`` untouched, as one message, and are counted
apart as ``passthrough``.

The receiver needs nothing but the source rank: a frame carries its shape and dtype. With
``out`` it checks that the frame fits (shape and dtype) and decodes into it, which is how
engines with preallocated receive buffers (DeepSpeed, ``torch.distributed.pipelining``)
use it. Anything wrong with a message (a corrupt or truncated frame, a frame that does not
fit ``out``, a peer configured differently) raises a typed error naming the peer.

A preamble's length is a claim the receiver must allocate before it can look at the
payload, so it is bounded: by the largest valid message of the expected size when the
receiver knows it (``out``, or ``shape`` with ``dtype``), else by ``max_message_bytes``;
a frame may hold at most ``max_numel`` elements. A payload that cannot be taken off the
link (its claim is out of bounds, or allocating or receiving it fails) leaves the peers out
of step: the link to that peer is then broken, and every later call on it raises
:class:`PipeLinkError` instead of reaching ``torch.distributed``. Only the claim can be
checked: a payload longer than its preamble says still aborts the receiver inside gloo.

Quantization is lossy: activations and activation gradients come back with an error of
at most half a step per element (exact for non-finite values, which travel raw). There is
no error feedback here (an activation is sent once), so choose the rate for the accuracy
the model tolerates; ACT (:mod:`ggcomm.methods.act`) trains models whose activations need fewer
bits.
"""

from __future__ import annotations

import collections
import functools
import math
import time
from typing import Any

import torch
import torch.distributed as dist

from . import __version__, codec
from ._host import to_host
from .codec import DEFAULT_BLOCK_SIZE, FrameError
from .errors import GGCommError, PipeLinkError, PipeSettingsError, SettingsMismatchError
from .step_policy import PIPELINE_RATE, TRANSPORT_RANS, StepControl, StepSettings
from .transport import TrafficStats, fingerprint

__all__ = [
    "PipeComm",
    "PipeLinkError",
    "PipeSettingsError",
    "RecvHandle",
    "SendHandle",
    "configure",
    "default_comm",
    "irecv",
    "isend",
    "recv",
    "send",
]

DEFAULT_MIN_NUMEL = 1024
DEFAULT_MAX_NUMEL = 1 << 31  # elements of one received tensor, unless the receiver says
_PREAMBLE_WORDS = 2  # int64 payload length, int64 (fingerprint << 1) | compressed
DIRECTIONS = ("forward", "backward")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # what frames hold


# --------------------------------------------------------------------------- raw messages
#
# A tensor below min_numel travels raw, behind a small header of int64 words: the dtype's
# frame code, ndim, then the dims; the receiver needs no shape, as with a frame.


def _raw_message(host: torch.Tensor) -> torch.Tensor:
    head = torch.tensor([codec.DTYPE_CODES[host.dtype], host.dim(), *host.shape],
                        dtype=torch.int64)
    return torch.cat([head.view(torch.uint8), host.reshape(-1).view(torch.uint8)])


def _parse_raw(buf: torch.Tensor, src: int, tag: int, max_numel: int) -> torch.Tensor:
    def bad(why: str) -> FrameError:
        return FrameError(f"raw message from rank {src} (tag {tag}): {why}")

    if buf.numel() < 16:
        raise bad(f"{buf.numel()} bytes is shorter than its header")
    code, ndim = (int(v) for v in buf[:16].view(torch.int64))
    if code not in codec.DTYPES or not 0 <= ndim <= codec.MAX_NDIM or \
            buf.numel() < 8 * (2 + ndim):
        raise bad(f"corrupt header (dtype code {code}, ndim {ndim})")
    shape = [int(v) for v in buf[16:8 * (2 + ndim)].view(torch.int64)]
    dtype = codec.DTYPES[code]
    data = buf[8 * (2 + ndim):]
    if any(d < 0 for d in shape) or math.prod(shape) > max_numel:
        raise bad(f"shape {tuple(shape)} is negative or holds more than {max_numel} elements")
    if data.numel() != math.prod(shape) * dtype.itemsize:
        raise bad(f"{data.numel()} data bytes do not hold a {dtype} tensor of shape "
                  f"{tuple(shape)}")
    return data.clone().view(dtype).view(shape)


def _check_fits(what: str, got_dtype, got_shape, dtype, shape, src: int, tag: int) -> None:
    """The receiver asked for ``dtype`` / ``shape`` (None: anything); the message must fit."""
    if (shape is not None and got_shape != shape) or (dtype is not None and got_dtype != dtype):
        raise FrameError(
            f"{what} from rank {src} (tag {tag}) holds a {got_dtype} tensor of shape "
            f"{tuple(got_shape)}, expected {dtype or got_dtype} of shape "
            f"{tuple(shape) if shape is not None else tuple(got_shape)}")


@functools.lru_cache(maxsize=256)
def _max_message_bytes(numel: int, block_size: int, itemsize: int) -> int:
    """The largest payload a sender with this ``block_size`` sends for a tensor of ``numel``
    elements of ``itemsize`` bytes: :func:`ggcomm.codec.max_frame_bytes` plus the shape
    words of up to ``MAX_NDIM`` dimensions (a raw message is smaller still).

    ``max_frame_bytes`` walks the block layout, so it is called on one full block and on
    the tail only: the worst case of a single segment grows by the same amount per full
    block, and a receiver's ceiling (or a large ``out``) costs no numel-sized arrays.
    """
    full, rest = divmod(numel, block_size)
    empty = codec.max_frame_bytes([0], block_size, itemsize)
    per_block = codec.max_frame_bytes([block_size], block_size, itemsize) - empty
    return (codec.max_frame_bytes([rest], block_size, itemsize) + full * per_block
            + 8 * (codec.MAX_NDIM - 1))


# --------------------------------------------------------------------------- stats

# What a link counts per direction (see ggcomm.transport.TrafficStats): bytes_sent /
# bytes_received count every byte of the float traffic handed to torch.distributed
# (preambles and frame headers included); raw_bytes_* are what the same tensors would have
# cost uncompressed (elements x element size). Non-float tensors are counted in
# passthrough_bytes_* only.
_COUNTERS = ("messages_sent", "messages_received", "bytes_sent", "bytes_received",
             "raw_bytes_sent", "raw_bytes_received", "elements_sent", "elements_received",
             "passthrough_bytes_sent", "passthrough_bytes_received", "encode_s", "decode_s")


# --------------------------------------------------------------------------- handles


class SendHandle:
    """What :meth:`PipeComm.isend` returns: ``wait()`` blocks until the tensor has left."""

    def __init__(self, works: list[Any]):
        self._works = works

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self._works)

    def wait(self) -> None:
        for w in self._works:
            w.wait()
        self._works = []


class RecvHandle:
    """What :meth:`PipeComm.irecv` returns: ``wait()`` returns the received tensor.

    The preamble's receive is posted at once; the payload's, whose size the preamble gives,
    when the handle is waited on (or when a later receive from the same peer needs the link
    in order). If the message is refused, ``wait()`` raises that error, now and on every
    later call.
    """

    def __init__(self, comm: PipeComm, src: int, tag: int, direction: str, out, shape, dtype):
        self._comm, self._src, self._tag, self._direction = comm, src, tag, direction
        self._out, self._shape, self._dtype = out, shape, dtype
        self._result: torch.Tensor | None = None
        self._error: BaseException | None = None
        self._done = False
        self._preamble = torch.empty(_PREAMBLE_WORDS, dtype=torch.int64,
                                     device=comm._device())
        self._work = dist.irecv(self._preamble, src, group=comm.group, tag=tag)

    def wait(self) -> torch.Tensor:
        if not self._done:
            self._done = True
            pending = self._comm._pending[self._src]
            if self in pending:
                pending.remove(self)
            try:
                try:
                    self._work.wait()
                except RuntimeError as e:  # the transport failed: the link is lost
                    raise self._comm._break_link(
                        self._src, f"receiving a preamble (tag {self._tag}) failed: {e}") from e
                self._result = self._comm._finish_recv(
                    self._preamble, self._src, self._tag, self._direction, self._out,
                    self._shape, self._dtype)
            except BaseException as e:
                self._error = e
                raise
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def is_completed(self) -> bool:
        return self._done


class _PassthroughRecv:
    """Receive of an uncompressed tensor; copies into ``target`` if it was staged."""

    def __init__(self, work: Any, buf: torch.Tensor, target: torch.Tensor):
        self._work, self._buf, self._target = work, buf, target

    def wait(self) -> torch.Tensor:
        self._work.wait()
        if self._buf is not self._target:
            self._target.copy_(self._buf)
            self._buf = self._target
        return self._target

    def is_completed(self) -> bool:
        return self._work.is_completed()


# --------------------------------------------------------------------------- comm


class PipeComm(StepSettings):
    """Compressed point-to-point messages between pipeline stages, and their statistics.

    Args:
        group: the process group the ranks belong to (default: the whole world); ``dst``
            and ``src`` are global ranks, as in ``torch.distributed.send``.
        rate: target bits per element (default ``PIPELINE_RATE``, 4.0). The GG model picks each
            tensor's step from its shape and scale, and a feedback loop per stream (peer,
            tag and direction) corrects it from the bits actually coded. Activations
            change slowly between micro-batches, so the loop settles within a few.
        step: a fixed quantization step for every tensor, instead of ``rate``: the
            maximum error is known in advance (``step / 2``), the rate is not.
        rel_step: step = ``rel_step`` x RMS of each tensor, instead of ``rate``: error
            proportional to the tensor's scale, no statistics kept.
        k, block_size: passed to :func:`ggcomm.encode` (``k="auto"`` picks the
            Exp-Golomb order per block).
        rans: passed to :func:`ggcomm.encode` (default ``TRANSPORT_RANS``, off): activations
            are light-tailed, where rANS blocks send 3-8% fewer bits for about twice the
            codec time; turn it on for links slower than a few tens of Mbit/s.
        min_numel: float tensors with fewer elements travel raw (exact); a frame's
            48-byte header and block table only pay off on larger tensors.
        rate_gain: how strongly the rate loop corrects the step (log2 units per bit of
            error): higher tracks the target faster but oscillates more.
        max_numel: the most elements a received tensor may have when the receiver does
            not say (no ``out``, no ``shape``): a frame or raw message claiming more raises
            :class:`FrameError` before anything of that size is allocated.
        max_message_bytes: the largest payload this rank allocates when it does not know
            the tensor's size (default: the largest valid message of ``max_numel``
            elements). With ``out``, or ``shape`` and ``dtype``, the bound is the largest
            valid message of that size instead. A claim above the bound breaks the link
            (:class:`PipeLinkError`).

    Both ends must be configured alike (the preamble carries a fingerprint of ``min_numel``,
    ``block_size`` and the versions, and a mismatch raises
    :class:`~ggcomm.errors.SettingsMismatchError`); the step rule is the sender's own
    business, since every frame carries its steps. The ceilings are each receiver's own.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        rate: float | None = None,
        step: float | None = None,
        rel_step: float | None = None,
        k: int | str = "auto",
        block_size: int = DEFAULT_BLOCK_SIZE,
        rans: bool = TRANSPORT_RANS,
        min_numel: int = DEFAULT_MIN_NUMEL,
        rate_gain: float = 0.5,
        max_numel: int = DEFAULT_MAX_NUMEL,
        max_message_bytes: int | None = None,
    ):
        self.group = group
        self.control = StepControl(rate, step, rel_step, default=("rate", PIPELINE_RATE),
                                   rate_gain=rate_gain)
        codec.check_code_args(k=k, block_size=block_size, rans=rans)
        self.k, self.block_size, self.rans = k, int(block_size), rans
        if not (isinstance(min_numel, int) and min_numel >= 0):
            raise ValueError(f"min_numel must be a non-negative int, got {min_numel!r}")
        self.min_numel = min_numel
        if not (isinstance(max_numel, int) and not isinstance(max_numel, bool)
                and max_numel >= 1):
            raise ValueError(f"max_numel must be a positive int, got {max_numel!r}")
        self.max_numel = max_numel
        if max_message_bytes is None:
            max_message_bytes = _max_message_bytes(max_numel, self.block_size, 8)
        elif not (isinstance(max_message_bytes, int) and not isinstance(max_message_bytes, bool)
                  and max_message_bytes >= 1):
            raise ValueError(f"max_message_bytes must be a positive int, got "
                             f"{max_message_bytes!r}")
        self.max_message_bytes = max_message_bytes
        self._broken: dict[int, str] = {}  # peer -> why its link is out of step
        self.stats = TrafficStats(_COUNTERS, DIRECTIONS)
        self.last_bits: dict[str, float] = {}  # per stream: payload bits per element
        self._pending: dict[int, collections.deque[RecvHandle]] = collections.defaultdict(
            collections.deque)

    # ------------------------------------------------------------------ settings

    def protocol_settings(self) -> dict[str, Any]:
        """What both ends of a link must agree on (hashed into every preamble)."""
        return {"ggcomm": __version__, "format": codec.VERSION, "min_numel": self.min_numel,
                "block_size": self.block_size}

    @property
    def fingerprint(self) -> int:
        """32-bit hash of :meth:`protocol_settings`, carried in every preamble and frame."""
        return fingerprint(self.protocol_settings())

    def state_dict(self) -> dict[str, Any]:
        """The rate loop's per-stream state (settings are constructor arguments)."""
        return {"version": 1, "mode": self.mode, "value": self.value,
                "rate_corr": dict(self.rate_corr), "last_bits": dict(self.last_bits)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("version") != 1:
            raise ValueError(f"unsupported PipeComm state version {sd.get('version')!r}")
        if (sd["mode"], sd["value"]) != (self.mode, self.value):
            raise ValueError(f"state was saved with {sd['mode']}={sd['value']}, this PipeComm "
                             f"uses {self.mode}={self.value}")
        self.control.corr = dict(sd["rate_corr"])
        self.last_bits = dict(sd["last_bits"])

    # ------------------------------------------------------------------ helpers

    def _device(self) -> torch.device:
        """Where tensors handed to torch.distributed must live (NCCL: the current GPU)."""
        backend = dist.get_backend(self.group)
        if backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _direction(self, peer: int, sending: bool, direction: str | None) -> str:
        if direction is not None:
            if direction not in DIRECTIONS:
                raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
            return direction
        me = dist.get_rank()
        return "forward" if (peer > me) == sending else "backward"

    def _stream(self, peer: int, tag: int, direction: str) -> str:
        return f"{direction}:{peer}:{tag}"

    def _step(self, x: torch.Tensor, stream: str) -> float:
        if self.mode == "step":
            return self.value
        flat = x.detach().reshape(-1)
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()
        sumsq, sumabs, _ = codec.moments(flat.numpy())[0]  # one pass, finite values only
        n = max(flat.numel(), 1)
        step = self.control.step(stream, sumsq / n, sumabs / n,
                                 measured_bits=self.last_bits.get(stream, float("nan")))
        return 1.0 if step is None else step  # zeros: any step codes them exactly

    def _encode(self, tensor: torch.Tensor, stream: str) -> tuple[torch.Tensor, bool, float]:
        """(payload on the host, compressed?, encode seconds)."""
        t0 = time.perf_counter()
        host = to_host(tensor.detach()).contiguous()
        if host.numel() < self.min_numel:
            return _raw_message(host), False, time.perf_counter() - t0
        step = self._step(host, stream)
        frame = codec.encode(host, step, k=self.k, block_size=self.block_size,
                             tag=self.fingerprint, rans=self.rans)
        if self.mode == "rate":
            self.last_bits[stream] = float(frame.segment_bits().sum()) / host.numel()
        return frame.buffer, True, time.perf_counter() - t0

    def _send_payload(self, payload: torch.Tensor, compressed: bool, dst: int, tag: int,
                      async_op: bool) -> list[Any]:
        dev = self._device()
        preamble = torch.tensor([payload.numel(), (self.fingerprint << 1) | int(compressed)],
                                dtype=torch.int64, device=dev)
        payload = payload.to(dev)
        if async_op:
            return [dist.isend(preamble, dst, group=self.group, tag=tag),
                    dist.isend(payload, dst, group=self.group, tag=tag)]
        dist.send(preamble, dst, group=self.group, tag=tag)
        dist.send(payload, dst, group=self.group, tag=tag)
        return []

    def _drain(self, src: int) -> None:
        """Finish earlier receives from ``src``: messages on a link arrive in order.

        An earlier receive's error is kept for its own handle's ``wait()``; a broken link
        is then reported by :meth:`_check_link`.
        """
        pending = self._pending[src]
        while pending:
            try:
                pending[0].wait()
            except GGCommError:
                pass

    def _break_link(self, peer: int, why: str) -> PipeLinkError:
        """Mark the link to ``peer`` broken (a message is stuck on it); the error to raise.

        The whole peer, not one tag: messages between two ranks share one ordered channel
        (NCCL ignores tags), and receives from a peer are drained in order across tags.
        """
        self._broken[peer] = why
        return PipeLinkError(f"link to rank {peer} is broken: {why}")

    def _check_link(self, peer: int) -> None:
        if peer in self._broken:
            raise PipeLinkError(f"link to rank {peer} is broken (an earlier message could not "
                                f"be taken off it: {self._broken[peer]}); the peers are out "
                                f"of step, restart the process group")

    # ------------------------------------------------------------------ send

    def _send(self, tensor: torch.Tensor, dst: int, tag: int, direction: str | None,
              async_op: bool) -> list[Any]:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"expected a tensor, got {type(tensor).__name__}")
        direction = self._direction(dst, True, direction)
        self._check_link(dst)
        if tensor.dtype not in _FLOAT_DTYPES:
            t = tensor.contiguous().to(self._device())
            self.stats.add(direction, passthrough_bytes_sent=t.numel() * t.element_size())
            if async_op:
                return [dist.isend(t, dst, group=self.group, tag=tag)]
            dist.send(t, dst, group=self.group, tag=tag)
            return []
        payload, compressed, enc_s = self._encode(tensor, self._stream(dst, tag, direction))
        works = self._send_payload(payload, compressed, dst, tag, async_op)
        self.stats.add(direction, messages_sent=1,
                       bytes_sent=8 * _PREAMBLE_WORDS + payload.numel(),
                       raw_bytes_sent=tensor.numel() * tensor.element_size(),
                       elements_sent=tensor.numel(), encode_s=enc_s)
        return works

    def send(self, tensor: torch.Tensor, dst: int, *, tag: int = 0,
             direction: str | None = None) -> None:
        """Send ``tensor`` to rank ``dst``; returns when it has been handed over.

        ``direction`` (``"forward"`` or ``"backward"``) only picks the statistics counter;
        by default a message to a higher rank is forward.
        """
        self._send(tensor, dst, tag, direction, async_op=False)

    def isend(self, tensor: torch.Tensor, dst: int, *, tag: int = 0,
              direction: str | None = None) -> SendHandle:
        """Like :meth:`send`, but returns at once; ``handle.wait()`` completes it.

        The tensor is encoded before this returns, so it may be modified afterwards.
        """
        return SendHandle(self._send(tensor, dst, tag, direction, async_op=True))

    # ------------------------------------------------------------------ recv

    @staticmethod
    def _check_target(out, shape, dtype) -> tuple[Any, Any]:
        if out is not None:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"out must be a tensor, got {type(out).__name__}")
            if shape is not None and torch.Size(shape) != out.shape:
                raise ValueError(f"shape {tuple(shape)} disagrees with out {tuple(out.shape)}")
            if dtype is not None and dtype != out.dtype:
                raise ValueError(f"dtype {dtype} disagrees with out {out.dtype}")
            return out.shape, out.dtype
        return (torch.Size(shape) if shape is not None else None), dtype

    def _passthrough(self, src: int, tag: int, direction: str, out, shape, dtype,
                     async_op: bool):
        if out is None and shape is None:
            raise ValueError(f"receiving a {dtype} tensor (passed through uncompressed) "
                             f"needs out= or shape=")
        target = out if out is not None else torch.empty(shape, dtype=dtype)
        buf = target if target.device == self._device() and target.is_contiguous() else \
            torch.empty(target.shape, dtype=target.dtype, device=self._device())
        self.stats.add(direction, passthrough_bytes_received=buf.numel() * buf.element_size())
        handle = _PassthroughRecv(dist.irecv(buf, src, group=self.group, tag=tag), buf, target)
        return handle if async_op else handle.wait()

    def _recv(self, src, tag, direction, out, shape, dtype, async_op):
        direction = self._direction(src, False, direction)
        shape, dtype = self._check_target(out, shape, dtype)
        self._drain(src)
        self._check_link(src)
        if dtype is not None and dtype not in _FLOAT_DTYPES:
            return self._passthrough(src, tag, direction, out, shape, dtype, async_op)
        handle = RecvHandle(self, src, tag, direction, out, shape, dtype)
        if not async_op:
            return handle.wait()
        self._pending[src].append(handle)
        return handle

    def recv(self, src: int, *, out: torch.Tensor | None = None,
             shape: torch.Size | tuple[int, ...] | None = None,
             dtype: torch.dtype | None = None, tag: int = 0,
             direction: str | None = None) -> torch.Tensor:
        """Receive the next tensor from rank ``src`` and return it.

        A float tensor's frame carries its shape and dtype, so none of ``out``, ``shape``,
        ``dtype`` is needed; if given, the frame must match them (else :class:`FrameError`).
        With ``out`` the tensor is decoded into it (any device) and ``out`` is returned.
        Non-float tensors (``dtype`` or ``out`` of an integer or bool type) are received
        untouched, and need ``out`` or ``shape``.

        Raises:
            FrameError: the frame is corrupt, truncated or does not fit; names the peer.
            SettingsMismatchError: the sender was configured differently.
        """
        return self._recv(src, tag, direction, out, shape, dtype, async_op=False)

    def irecv(self, src: int, *, out: torch.Tensor | None = None,
              shape: torch.Size | tuple[int, ...] | None = None,
              dtype: torch.dtype | None = None, tag: int = 0,
              direction: str | None = None) -> RecvHandle:
        """Like :meth:`recv`, but returns a handle whose ``wait()`` returns the tensor."""
        return self._recv(src, tag, direction, out, shape, dtype, async_op=True)

    def _finish_recv(self, preamble: torch.Tensor, src: int, tag: int, direction: str,
                     out, shape, dtype) -> torch.Tensor:
        length, word = (int(v) for v in preamble.cpu().tolist())
        fingerprint, compressed = word >> 1, word & 1
        # The length is the peer's claim: bound it before allocating. A receive buffer must
        # match the message's size, so a claim that is not taken off the link leaves the
        # peers out of step for good.
        known = math.prod(shape) if shape is not None else None
        if known is not None and fingerprint == self.fingerprint:
            limit = _max_message_bytes(known, self.block_size,
                                       dtype.itemsize if dtype is not None else 8)
            bound = f"{limit} bytes, the largest message of {known} elements"
        else:
            limit = self.max_message_bytes
            bound = f"max_message_bytes {limit}"
        if not 0 <= length <= limit:
            raise self._break_link(
                src, f"its preamble (tag {tag}) announces a {length}-byte payload, outside "
                     f"0..{bound}; the payload was left on the link")
        try:
            payload = torch.empty(length, dtype=torch.uint8, device=self._device())
            # Take the payload off the link before judging it, so that after any error
            # below the next message is received in step.
            dist.recv(payload, src, group=self.group, tag=tag)
        except (RuntimeError, MemoryError) as e:
            raise self._break_link(
                src, f"taking its {length}-byte payload (tag {tag}) off the link failed: "
                     f"{e}") from e
        max_numel = known if known is not None else self.max_numel
        if fingerprint != self.fingerprint:
            raise SettingsMismatchError(
                f"rank {src} sent a message with settings fingerprint {fingerprint:#010x}, "
                f"this rank expects {self.fingerprint:#010x} ({self.protocol_settings()}): "
                f"configure both ends of the link alike")
        t0 = time.perf_counter()
        host = to_host(payload)
        if compressed:
            try:
                frame = codec.Frame.from_buffer(host, max_numel=max_numel)
            except FrameError as e:
                raise FrameError(f"frame from rank {src} (tag {tag}): {e}") from e
            _check_fits("frame", frame.dtype, frame.shape, dtype, shape, src, tag)
            if frame.tag != self.fingerprint:
                raise SettingsMismatchError(f"frame from rank {src} carries tag {frame.tag:#010x}, "
                                        f"expected {self.fingerprint:#010x}")
            # into out on the CPU or a CUDA device (through pinned memory), else on the host;
            # out is a receive buffer: straight into it, no scratch copy (keep_out=False)
            dev_out = out if out is not None and out.device.type in ("cpu", "cuda") else None
            result = codec.decode(frame, out=dev_out, keep_out=False)
            numel, nbytes_raw = frame.numel, frame.numel * frame.dtype.itemsize
        else:
            result = _parse_raw(host, src, tag, max_numel)
            numel, nbytes_raw = result.numel(), result.numel() * result.element_size()
            _check_fits("raw message", result.dtype, result.shape, dtype, shape, src, tag)
        if out is not None and result is not out:
            out.copy_(result.view(out.shape))
            result = out
        self.stats.add(direction, messages_received=1,
                       bytes_received=8 * _PREAMBLE_WORDS + length, raw_bytes_received=nbytes_raw,
                       elements_received=numel, decode_s=time.perf_counter() - t0)
        return result


# --------------------------------------------------------------------------- module level

_default: PipeComm | None = None


def configure(**kwargs: Any) -> PipeComm:
    """Replace the default :class:`PipeComm` (same arguments) used by the module functions."""
    global _default
    _default = PipeComm(**kwargs)
    return _default


def default_comm() -> PipeComm:
    """The :class:`PipeComm` behind :func:`send` and friends (made on first use)."""
    global _default
    if _default is None:
        _default = PipeComm()
    return _default


def _with_group(group):
    comm = default_comm()
    if group is not None and group is not comm.group:
        raise ValueError("the module-level functions use the default PipeComm's group; "
                         "call configure(group=...) or use a PipeComm of your own")
    return comm


def send(tensor: torch.Tensor, dst: int, group: dist.ProcessGroup | None = None, *,
         tag: int = 0, direction: str | None = None) -> None:
    """:meth:`PipeComm.send` on the default comm."""
    _with_group(group).send(tensor, dst, tag=tag, direction=direction)


def isend(tensor: torch.Tensor, dst: int, group: dist.ProcessGroup | None = None, *,
          tag: int = 0, direction: str | None = None) -> SendHandle:
    """:meth:`PipeComm.isend` on the default comm."""
    return _with_group(group).isend(tensor, dst, tag=tag, direction=direction)


def recv(src: int, group: dist.ProcessGroup | None = None, *, out=None, shape=None,
         dtype=None, tag: int = 0, direction: str | None = None) -> torch.Tensor:
    """:meth:`PipeComm.recv` on the default comm."""
    return _with_group(group).recv(src, out=out, shape=shape, dtype=dtype, tag=tag,
                                   direction=direction)


def irecv(src: int, group: dist.ProcessGroup | None = None, *, out=None, shape=None,
          dtype=None, tag: int = 0, direction: str | None = None) -> RecvHandle:
    """:meth:`PipeComm.irecv` on the default comm."""
    return _with_group(group).irecv(src, out=out, shape=shape, dtype=dtype, tag=tag,
                                    direction=direction)
