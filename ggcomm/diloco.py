"""DiLoCo with EG-coded pseudo-gradients: training across sites with one exchange every
``sync_every`` steps.

DiLoCo (Douillard et al., arXiv 2311.08105) lets every rank train alone for ``H`` inner
steps, then averages the *pseudo-gradient* ``theta_global - theta_local`` over ranks and
applies an outer optimizer (Nesterov SGD, lr 0.7, momentum 0.9) to the global parameters,
which every rank then takes as its own. Per-step all-reduce becomes one all-reduce every
``H`` steps; :class:`DiLoCo` also codes that one with ggcomm::

    model = GPT(); inner = torch.optim.AdamW(model.parameters(), lr=3e-3)
    diloco = DiLoCo(model, sync_every=50, wire="gg", rate=2.0)
    for x, y in batches:
        loss = model(x, y)[1]; loss.backward(); inner.step(); inner.zero_grad()
        diloco.step()           # every 50th call: the outer step, on every rank

``wire`` chooses how the pseudo-gradient crosses:

* ``"gg"``: :func:`ggcomm.exchange.coded_sum`, the exchange of ggcomm's other summing
  transports: steps every rank derives from the same all-gathered moments (``rate``,
  ``step`` or ``rel_step``, with the rate loop and warm-up of
  :class:`~ggcomm.step_policy.StepControl`), EG frames of variable length, exact integer
  sums, and error feedback carried from one outer step to the next (what one outer step's
  rounding drops is added to the next pseudo-gradient). By default one step serves the
  whole pseudo-gradient (``shared_step``): the outer optimizer is SGD, so every element's
  error counts alike, and the same step everywhere gives the least squared error for the
  bits (``shared_step=False``: a step per ``segment`` elements, each aiming at the rate; on
  the project's GPT that ended 1.7-5% above fp32 DiLoCo where one step stayed within 0.1%,
  at the same bytes: ``benchmarks/results/diloco.md``). ``rans=True`` lets the frames
  code blocks in the codec's rANS mode where that saves bits, the most at the fractional
  rates DiLoCo runs at (GG data of shape 1-2 at a step that gives 1.5 bits per element:
  10-15% fewer bits; under ``rate`` the loop spends them on a finer step), for about
  twice the codec time on those blocks, once per outer step;
* ``"int8"``: per-tensor absmax int8 (INTELLECT-1's choice, arXiv 2412.01152): an
  all-gather of each rank's int8 tensors and scales, summed in rank order;
* ``"fp32"``: ``all_reduce`` of the float32 pseudo-gradient.

Every rank ends each outer step with the same parameters, bit for bit: the sums are the
same on every rank (exact integers, rank-ordered sums, or an all-reduce's single result),
and the outer optimizer runs on them identically; nothing else is sent. The constructor
checks, in one small all-gather, that every rank has the same settings and the same
starting parameters (start them alike, as DDP would: the same seed, or a broadcast).
Inner optimizer state stays per rank (DiLoCo keeps it local). ``state_dict`` checkpoints
the global parameters, the outer optimizer, the inner-step count and the codec's residual
and rate loop. Streaming DiLoCo (fragments synced on a staggered schedule) is not offered.
"""

from __future__ import annotations

import functools
import time
import zlib
from typing import Any

import torch
import torch.distributed as dist

from . import __version__, codec
from ._host import to_host
from ._params import float_tensors
from .errors import SettingsMismatchError, StateLoadError
from .exchange import DEFAULT_SEGMENT, Stream, all_gather, coded_sum, device_for
from .kernels import eg
from .step_policy import DEFAULT_RATE, TRANSPORT_RANS, StepControl, StepSettings
from .transport import TrafficStats, check_state_header, fingerprint, state_header

__all__ = ["OUTER_LR", "OUTER_MOMENTUM", "WIRES", "DiLoCo"]

WIRES = ("gg", "int8", "fp32")
OUTER_LR = 0.7
"""The DiLoCo paper's outer learning rate (Nesterov SGD)."""
OUTER_MOMENTUM = 0.9
"""The DiLoCo paper's outer momentum."""

_STATE_VERSION = 1
_COUNTERS = ("bytes_sent", "bytes_received", "raw_bytes", "elements", "payload_bits",
             "seconds")


class DiLoCo(StepSettings):
    """The outer loop of DiLoCo over ``model``'s floating-point parameters (see the module
    docstring). Call :meth:`step` after every inner optimizer step; every ``sync_every``-th
    call runs :meth:`outer_step` on every rank of ``process_group`` (default: the world).
    ``stats`` counts what crossed."""

    def __init__(self, model: torch.nn.Module, *, sync_every: int = 50,
                 outer_lr: float = OUTER_LR, outer_momentum: float = OUTER_MOMENTUM,
                 nesterov: bool = True, wire: str = "gg", rate: float | None = None,
                 step: float | None = None, rel_step: float | None = None,
                 error_feedback: bool = True, rate_gain: float = 0.5, warmup_iters: int = 0,
                 warmup_rate: float = 8.0, block_size: int = codec.DEFAULT_BLOCK_SIZE,
                 segment: int = DEFAULT_SEGMENT, shared_step: bool = True,
                 rans: bool = TRANSPORT_RANS,
                 process_group: dist.ProcessGroup | None = None) -> None:
        if wire not in WIRES:
            raise ValueError(f"wire must be one of {WIRES}, got {wire!r}")
        if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"sync_every must be a positive int, got {sync_every!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or \
                not 1 <= block_size <= eg.MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be an int in 1..{eg.MAX_BLOCK_SIZE}")
        if isinstance(segment, bool) or not isinstance(segment, int) or segment < 1:
            raise ValueError(f"segment must be a positive int, got {segment!r}")
        codec.check_code_args(rans=rans)
        self.wire = wire
        self.rans = rans
        self.sync_every = sync_every
        self.control = StepControl(rate, step, rel_step, default=("rate", DEFAULT_RATE),
                                   rate_gain=rate_gain, warmup_iters=warmup_iters,
                                   warmup_rate=warmup_rate)
        self.error_feedback = bool(error_feedback) and wire == "gg"
        self.block_size, self.segment = block_size, segment
        self.shared_step = bool(shared_step)
        self.process_group = process_group
        self.params = [p for p in float_tensors(model) if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable floating-point parameters")
        # the global parameters (float32, where the model lives) and the outer optimizer
        self.global_params = [p.detach().to(torch.float32).clone() for p in self.params]
        self.outer = torch.optim.SGD(self.global_params, lr=outer_lr,
                                     momentum=outer_momentum, nesterov=nesterov)
        self.numel = sum(p.numel() for p in self.params)
        self.stream = Stream(self.numel, 1, segment, self.error_feedback)
        self.inner_steps = 0
        self.outer_steps = 0
        self.stats = TrafficStats(_COUNTERS)
        self._check_start()

    def settings(self) -> dict[str, Any]:
        """What every rank must share (its hash tags every frame)."""
        return {"transport": "diloco", "ggcomm": __version__, "format": codec.VERSION,
                "wire": self.wire, **self.control.settings(),
                "error_feedback": self.error_feedback, "sync_every": self.sync_every,
                "outer": {k: self.outer.defaults[k] for k in ("lr", "momentum", "nesterov")},
                "block_size": self.block_size, "segment": self.segment,
                "shared_step": self.shared_step,
                "shapes": [list(p.shape) for p in self.params]}

    @functools.cached_property
    def fingerprint(self) -> int:
        return fingerprint(self.settings())

    def _group(self) -> dist.ProcessGroup:
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def _check_start(self) -> None:
        """Every rank: the same settings and the same starting parameters."""
        crc = 0
        for p in self.global_params:
            crc = zlib.crc32(p.detach().cpu().numpy().tobytes(), crc)
        group = self._group()
        mine = torch.tensor([self.fingerprint, crc], dtype=torch.int64)
        got = all_gather(mine, group, device_for(group))
        n = len(got) - 1
        self.stats.add(bytes_sent=float(n * mine.nbytes), bytes_received=float(n * mine.nbytes))
        if len({int(g[0]) for g in got}) > 1:
            raise SettingsMismatchError(f"DiLoCo settings differ between ranks (fingerprints "
                                        f"{[hex(int(g[0])) for g in got]}); this rank has "
                                        f"{self.settings()}")
        if len({int(g[1]) for g in got}) > 1:
            raise SettingsMismatchError("the ranks start from different parameters (CRC-32 "
                                        f"by rank: {[hex(int(g[1])) for g in got]}): start "
                                        "them alike (the same seed, or a broadcast)")

    # ------------------------------------------------------------------ the outer loop

    def step(self) -> bool:
        """Count one inner step; every ``sync_every``-th runs :meth:`outer_step`. Returns
        whether it did."""
        self.inner_steps += 1
        if self.inner_steps % self.sync_every:
            return False
        self.outer_step()
        return True

    @torch.no_grad()
    def outer_step(self) -> None:
        """Average the pseudo-gradients over ranks (through ``wire``), step the global
        parameters with the outer optimizer, and give them to the model."""
        t0 = time.perf_counter()
        group = self._group()
        world = dist.get_world_size(group)
        delta = to_host(torch.cat([(g - p.detach().to(torch.float32)).reshape(-1)
                                   for g, p in zip(self.global_params, self.params,
                                                   strict=True)]))
        if self.wire == "gg":
            total, counts = coded_sum(delta.numpy(), self.stream, self.control, "outer", group,
                                      block_size=self.block_size, tag=self.fingerprint,
                                      describe=str(self.settings()),
                                      what="ggcomm DiLoCo outer step",
                                      shared_step=self.shared_step, rans=self.rans)
            mean = torch.from_numpy(total) / world
        elif self.wire == "int8":
            mean, counts = self._int8_mean(delta, group)
        else:
            dist.all_reduce(delta, group=group)
            mean = delta / world
            b = 2.0 * (world - 1) / world * delta.nbytes
            counts = {"bytes_sent": b, "bytes_received": b, "payload_bits": 8 * b}
        at = 0
        for g in self.global_params:
            g.grad = mean[at: at + g.numel()].view_as(g).to(g.device)
            at += g.numel()
        self.outer.step()
        self.outer.zero_grad(set_to_none=True)
        for g, p in zip(self.global_params, self.params, strict=True):
            p.copy_(g)
        self.outer_steps += 1
        self.stats.add(**counts, raw_bytes=float((world - 1) * 4 * self.numel),
                       elements=float((world - 1) * self.numel),
                       seconds=time.perf_counter() - t0)
        self.stats.end_iteration()

    def _int8_mean(self, delta: torch.Tensor, group: Any) -> tuple[torch.Tensor, dict]:
        """Per-tensor absmax int8: every rank's int8 tensors and scales, all-gathered and
        summed in rank order (the same sum on every rank)."""
        dev = device_for(group)
        world = dist.get_world_size(group)
        lengths = [g.numel() for g in self.global_params]
        parts = torch.split(delta, lengths)
        scales = torch.stack([x.abs().max() / 127 if x.numel() else torch.zeros(())
                              for x in parts]).to(torch.float32)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.cat([torch.round(x / s).clamp(-127, 127) for x, s in zip(parts, safe,
                                                                              strict=True)])
        q = q.to(torch.int8)
        qs = all_gather(q, group, dev)
        ss = all_gather(scales, group, dev)
        total = torch.zeros_like(delta)
        for qj, sj in zip(qs, ss, strict=True):  # rank order
            total += qj.to(torch.float32) * torch.repeat_interleave(
                sj, torch.tensor(lengths))
        n = world - 1
        b = float(n * (q.nbytes + scales.nbytes))
        return total / world, {"bytes_sent": b, "bytes_received": b, "payload_bits": 8 * b}

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """This rank's outer state: global parameters, outer optimizer, step counts, the
        codec's residual and rate loop, the counters (tensors and Python scalars only:
        ``torch.load(..., weights_only=True)`` reads it). The inner optimizer and the model
        are the caller's to save."""
        return {
            **state_header(_STATE_VERSION, self.settings(), self.process_group),
            "global": [g.detach().cpu().clone() for g in self.global_params],
            "outer": self.outer.state_dict(),
            "inner_steps": self.inner_steps, "outer_steps": self.outer_steps,
            "stream": self.stream.state_dict(),
            "rate_corr": {k: float(v) for k, v in self.control.corr.items()},
            "stats_total": {k: float(v) for k, v in self.stats.counts["all"].items()},
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (the same rank, world size and settings: else
        :class:`~ggcomm.errors.StateLoadError` / :class:`SettingsMismatchError`)."""
        check_state_header(sd, _STATE_VERSION, self.settings(), "ggcomm DiLoCo",
                           self.process_group)
        saved = sd["global"]
        if len(saved) != len(self.global_params) or any(
                tuple(s.shape) != tuple(g.shape) for s, g in zip(saved, self.global_params,
                                                                 strict=True)):
            raise StateLoadError("the saved global parameters do not match this model's")
        for g, s in zip(self.global_params, saved, strict=True):
            g.copy_(s.to(g.device, g.dtype))
        self.outer.load_state_dict(sd["outer"])
        self.inner_steps, self.outer_steps = int(sd["inner_steps"]), int(sd["outer_steps"])
        self.stream.load(sd["stream"], "the DiLoCo stream")
        self.control.corr.clear()
        self.control.corr.update({k: float(v) for k, v in sd["rate_corr"].items()})
        self.stats.reset()
        self.stats.load_totals(dict(sd["stats_total"]))

