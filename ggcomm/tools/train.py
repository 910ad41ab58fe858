"""The training loop every ggcomm tool and benchmark runs.

:func:`fit` runs ``steps`` optimizer steps of a model on batches from an iterable, and
returns one record (a dict) per step. What differs between the tools is plugged in, not
written into the loop:

* ``loss_fn(model, batch) -> (output, loss)``: the forward pass. The default,
  :func:`model_loss`, is the :mod:`~ggcomm.tools.workload` models' convention
  ``model(*batch)``.
* ``schedule``: the learning-rate multiplier per step (``LambdaLR``'s function, e.g.
  :func:`ggcomm.tools.workload.lr_factor`).
* ``penalties``: terms added to the loss before the backward pass and left out of the
  recorded loss (ACT's :meth:`~ggcomm.methods.act.ACT.penalty`).
* ``after_backward``: callbacks between the backward pass and the optimizer step, while
  the gradients are there to read or rewrite (GCT's ``apply_()``, gradient measurements,
  clipping).
* ``after_step``: callbacks after the optimizer and learning-rate steps (BackSlash's
  ``step()``, DDP-hook byte accounting, logging). They may add entries to the step's
  record, or set ``Step.stop`` to end training after this step.
* ``timer``: what the record's ``time_s`` measures (:class:`StepTimer`: wall time on the
  CPU, CUDA events on a GPU).

A step draws its batch, then (timed) zeroes the gradients, runs ``loss_fn``, adds the
penalties, runs the backward pass and the ``after_backward`` callbacks in order, steps
the optimizer and the learning rate; then records ``loss`` and ``time_s`` and runs the
``after_step`` callbacks in order. Every record starts as ``{"step": i, "lr": ...}``
(``i`` from 0; the learning rate the step used). Nothing in the loop draws random
numbers, so a seeded model and batch source give the same records every run.

:func:`evaluate` is the matching evaluation loop: mean loss (and a metric) over fixed
batches, in eval mode, without gradients.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .workload import next_token_accuracy

__all__ = [
    "Step",
    "StepTimer",
    "draws",
    "evaluate",
    "fit",
    "in_process_group",
    "join_process_group",
    "model_loss",
    "rank_generator",
    "token_accuracy",
    "add_gpt_run_args",
    "train_gpt",
    "write_summary",
]

Batch = Any
"""What the batch source yields and ``loss_fn`` takes: for the workload models a tuple
``(inputs, targets)``."""

LossFn = Callable[[nn.Module, Batch], tuple[Any, torch.Tensor]]
Callback = Callable[["Step"], None]


def model_loss(model: nn.Module, batch: Batch) -> tuple[Any, torch.Tensor]:
    """``model(*batch)``: the workload models return ``(output, loss)`` given targets."""
    return model(*batch)


def token_accuracy(output: torch.Tensor, batch: Batch) -> float:
    """Next-token accuracy of a GPT's logits against the batch's targets (its last item)."""
    return next_token_accuracy(output.detach(), batch[-1])


def draws(draw: Callable[[], Batch]) -> Iterator[Batch]:
    """An endless batch source from a function that draws one batch, e.g.
    ``draws(lambda: data.batch("train", 16, generator))``."""
    while True:
        yield draw()


def join_process_group(backend: str) -> bool:
    """Join torchrun's process group (``RANK`` and ``WORLD_SIZE`` set), or make a 1-rank one;
    True if this call created it (the caller then destroys it). Nothing if one exists."""
    if dist.is_initialized():
        return False
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def add_gpt_run_args(p: Any, steps: int, codec_group: str) -> Any:
    """The command-line options of a GPT training tool (what :func:`train_gpt` reads, and
    the tool's seed, threads, logging and summary), and a ``codec_group`` group with the
    mutually exclusive ``--rate`` / ``--step`` / ``--rel-step``."""
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=16, help="per rank")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=20, help="linear learning-rate warm-up steps")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay's end / --lr")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--json", metavar="PATH", help="rank 0 writes its summary here")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--block-size", type=int, default=128, help="GPT context length")
    p.add_argument("--corpus-bytes", type=int, default=8_000_000)
    g = p.add_argument_group(codec_group)
    rate = g.add_mutually_exclusive_group()
    rate.add_argument("--rate", type=float, help="target bits per element (default 3.0)")
    rate.add_argument("--step", type=float, help="absolute quantization step")
    rate.add_argument("--rel-step", type=float, help="quantization step as a multiple of RMS")
    g.add_argument("--no-error-feedback", action="store_true")
    return g


GPT_EVAL_SEED = 12345
"""Seed of the GPT tools' validation batches: the same on every rank and in every run."""


def train_gpt(
    trained: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, data: Any,
    args: Any, generator: torch.Generator, after_step: Sequence[Callback] = (),
) -> tuple[list[dict[str, Any]], float, float, float | None]:
    """The GPT tools' run (``train_fsdp``, ``train_diloco``): ``args.steps`` steps of
    ``args.batch_size`` sequences from ``data`` (a ``ByteDataset``) drawn with
    ``generator``, the learning rate warming up over ``args.warmup`` steps and decaying to
    ``args.min_lr_ratio`` (cosine), then the validation loss and next-byte accuracy of
    ``model`` on ``args.eval_batches`` fixed batches. ``trained`` is what the loop calls
    (``model`` or its wrapper). Returns the records, the training seconds, the validation
    loss and accuracy."""
    from .workload import lr_factor

    t0 = time.perf_counter()
    records = fit(trained, optimizer,
                  draws(lambda: data.batch("train", args.batch_size, generator)), args.steps,
                  schedule=lr_factor(args.steps, args.warmup, args.min_lr_ratio),
                  after_step=after_step)
    seconds = time.perf_counter() - t0
    vgen = torch.Generator().manual_seed(GPT_EVAL_SEED)
    val_loss, val_acc = evaluate(
        model, (data.batch("val", args.batch_size, vgen) for _ in range(args.eval_batches)),
        metric=token_accuracy)
    return records, seconds, val_loss, val_acc


def write_summary(summary: dict[str, Any], path: str | None) -> None:
    """Write a training tool's summary as JSON to ``path`` (its folder made if missing;
    nothing if ``path`` is None). The rank that writes is the caller's to choose."""
    if not path:
        return
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)


def in_process_group(fn: Callable[[Any], Any], args: Any, backend: str = "gloo") -> Any:
    """``fn(args)`` inside torchrun's process group, or a 1-rank one made (and destroyed)
    for it: the GPT training tools' ``train``."""
    created = join_process_group(backend)
    try:
        return fn(args)
    finally:
        if created:
            dist.destroy_process_group()


def rank_generator(seed: int, rank: int) -> torch.Generator:
    """The batch generator of one data-parallel rank: seeded from ``seed`` and the rank, so
    the ranks draw different batches, and a rerun draws the same ones."""
    return torch.Generator().manual_seed(seed + 1_000_003 * (rank + 1))


class StepTimer:
    """Time of one training step, in seconds.

    On the CPU (the default): ``time.perf_counter`` around the step. On CUDA: a pair of CUDA
    events on the current stream, recorded after a device synchronize (so batch preparation
    is not counted) and read after the end event completes: the GPU-side time from the start
    of the forward pass to the end of the optimizer step, gradient exchange included (a DDP
    backward returns only after every bucket's future, so the end event is queued after it).
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.cuda = device is not None and device.type == "cuda"
        if self.cuda:
            self._begin = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
        self._t0 = 0.0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._begin.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            return self._begin.elapsed_time(self._end) / 1e3  # elapsed_time is in ms
        return time.perf_counter() - self._t0


@dataclass
class Step:
    """One training step as the callbacks see it.

    ``index`` counts from 0; ``output`` and ``loss`` are what ``loss_fn`` returned (the loss
    without penalties, still attached to the graph). ``record`` is the dict :func:`fit`
    returns for this step: callbacks may add entries. Setting ``stop`` ends training after
    this step's ``after_step`` callbacks.
    """

    index: int
    batch: Batch
    output: Any
    loss: torch.Tensor
    record: dict[str, Any]
    stop: bool = False


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    steps: int,
    *,
    schedule: Callable[[int], float] | None = None,
    loss_fn: LossFn = model_loss,
    penalties: Sequence[Callable[[], torch.Tensor]] = (),
    after_backward: Sequence[Callback] = (),
    after_step: Sequence[Callback] = (),
    timer: StepTimer | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` for ``steps`` optimizer steps; returns one record per step.

    Args:
        model: what ``loss_fn`` calls (a ``DistributedDataParallel`` wrapper under DDP). Put
            in training mode first.
        optimizer: stepped once per step; its gradients are zeroed (set to ``None``) before
            each forward pass.
        batches: one batch per step, in order; training ends early if it runs out.
        steps: the number of steps.
        schedule: learning-rate multiplier of step ``i`` (from 0), applied through
            ``torch.optim.lr_scheduler.LambdaLR``; ``None`` keeps the optimizer's rate.
        loss_fn: ``(model, batch) -> (output, loss)``.
        penalties: zero-argument callables whose results are added to the loss for the
            backward pass (after the forward pass, which they may depend on).
        after_backward, after_step: callbacks taking the :class:`Step`, run in order (see the
            module docstring for where).
        timer: measures each step's ``time_s``; a CPU :class:`StepTimer` by default.

    Returns:
        Per step, the dict ``{"step", "lr", "time_s", "loss", ...}`` with whatever the
        callbacks added.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    scheduler = None
    if schedule is not None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    timer = timer if timer is not None else StepTimer()
    source = iter(batches)
    records: list[dict[str, Any]] = []
    model.train()
    for index in range(steps):
        try:
            batch = next(source)
        except StopIteration:
            break
        record: dict[str, Any] = {"step": index, "lr": optimizer.param_groups[0]["lr"]}
        timer.start()
        optimizer.zero_grad(set_to_none=True)
        output, loss = loss_fn(model, batch)
        objective = loss
        for penalty in penalties:
            objective = objective + penalty()
        objective.backward()
        step = Step(index, batch, output, loss, record)
        for callback in after_backward:
            callback(step)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        record["time_s"] = timer.stop()
        record["loss"] = loss.item()
        for callback in after_step:
            callback(step)
        records.append(record)
        if step.stop:
            break
    return records


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    loss_fn: LossFn = model_loss,
    metric: Callable[[Any, Batch], float] | None = None,
) -> tuple[float, float | None]:
    """Mean loss over ``batches`` (and mean ``metric(output, batch)``, or ``None``).

    Runs in eval mode without gradients, and puts the model back in the mode it was in.
    """
    was_training = model.training
    model.eval()
    losses: list[float] = []
    values: list[float] = []
    try:
        for batch in batches:
            output, loss = loss_fn(model, batch)
            losses.append(loss.item())
            if metric is not None:
                values.append(metric(output, batch))
    finally:
        model.train(was_training)
    if not losses:
        raise ValueError("evaluate needs at least one batch")
    return statistics.fmean(losses), statistics.fmean(values) if values else None
