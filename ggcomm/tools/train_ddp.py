"""DDP training with a choice of gradient-communication hook: the end-to-end ggcomm benchmark.

Trains one of the :mod:`ggcomm.tools.workload` models with ``DistributedDataParallel`` and one of
these comm hooks, and records loss, next-token accuracy, step time and the bytes each rank
sends per step, so compression can be judged on both traffic and training quality::

    torchrun --nproc_per_node=2 launch/train_ddp.py --hook gg --rate 3 --json out.json

``--hook``:

* ``none``: no hook, DDP's own fp32 allreduce.
* ``fp16``: ``default_hooks.fp16_compress_hook`` (cast to fp16, allreduce, cast back).
* ``quant8``: torch's ``quantization_hooks.quantization_pertensor_hook`` (uint8, allgather),
  as :func:`quant8_pertensor_hook`: the same algorithm, but the upstream function fails under
  gloo in torch 2.13 (it indexes the allgather future's value as ``[[t_0, ..., t_W-1]]``;
  gloo's future holds the flat ``[t_0, ..., t_W-1]``), so the copy reads its own output lists.
* ``powersgd``: ``powerSGD_hook.powerSGD_hook`` with
  ``PowerSGDState(matrix_approximation_rank=--psgd-rank, start_powerSGD_iter=--psgd-start)``.
* ``psgd-eg``: :func:`ggcomm.powersgd.powersgd_eg_hook`, PowerSGD with EG-coded factors:
  ``PowerSGDEGState(matrix_approximation_rank=--psgd-rank, start_powerSGD_iter=--psgd-start,
  rate=--rate | step=--step | rel_step=--rel-step, warmup_iters=--gg-warmup-iters)``.
* ``gg``: :func:`ggcomm.ddp.gg_hook` with ``GGCommState(rate=--rate | step=--step |
  rel_step=--rel-step, exchange=--exchange, ...)``.

Bytes sent per rank per step
----------------------------
``gg`` and ``psgd-eg`` report their own count (``state.stats.last_step["bytes_sent"]``: the
real frame sizes).
For the built-in hooks the count is computed from the tensors each hook communicates, with
``W`` the world size and collectives assumed bandwidth-optimal (ring), as NCCL and gloo
implement them for large messages:

* an allreduce of ``B`` bytes sends ``2 (W - 1) / W * B`` bytes per rank (reduce-scatter then
  allgather of ``B / W`` chunks);
* an allgather of ``B`` bytes per rank sends ``(W - 1) * B`` bytes per rank.

Per DDP bucket of ``N`` fp32 gradient elements:

* ``none``: allreduce of ``4 N`` bytes. Counted from the parameter sizes (no hook is
  registered, so the baseline is exactly stock DDP); buckets partition the parameters, and the
  formula is linear, so the sum over buckets is the same.
* ``fp16``: allreduce of ``2 N`` bytes.
* ``quant8``: the hook allgathers its ``(scale, zero_point)`` pair as 2 float32 (8 bytes), then
  the bucket quantized to ``N`` uint8: allgathers of ``8`` and ``N`` bytes.
* ``powersgd``: before ``start_powerSGD_iter`` an allreduce of ``4 N`` bytes. After it, each
  gradient is viewed as an ``n x m`` matrix (``shape[0] x rest``), ``r = min(n, m, rank)``;
  it is compressed when ``(n + m) r * min_compression_rate < n m`` (the hook's own test), and
  then contributes ``n r`` elements to the P allreduce and ``m r`` to the Q allreduce;
  otherwise its ``n m`` elements go to the allreduce of uncompressed tensors. Three fp32
  allreduces per bucket: uncompressed, P, Q.

Not counted: DDP's one-time parameter broadcast at construction and the end-of-run barrier
(the loop itself exchanges nothing else: the losses logged are rank 0's own).

Logged and reported
-------------------
Rank 0 prints its training loss, next-token accuracy (GPT only), bytes sent and step time every
``--log-every`` steps, evaluates the final model on ``--eval-batches`` fixed validation batches
(the same for every hook and seed), and with ``--json PATH`` writes a summary: the
configuration, per-step ``loss`` / ``accuracy`` / ``step_time_s`` / ``bytes_sent_per_rank``
(and for ``gg`` the hook's ``encode_s`` / ``decode_s``), their means, the fp32-allreduce bytes
for reference, the final validation loss and accuracy, and for ``gg`` the hook's cumulative
statistics. Step time is the wall time of forward, backward (which waits for the gradient
exchange) and the optimizer step: ``time.perf_counter`` on the CPU, CUDA events under
``--backend nccl`` (:class:`ggcomm.tools.train.StepTimer`). The loop is
:func:`ggcomm.tools.train.fit`; the byte accounting and the log are its after-step callbacks.

All ranks build the model from the same ``--seed``; each draws its batches from its own
generator (seeded from ``--seed`` and the rank). ``train(args)`` runs in-process (it creates the
process group from torchrun's environment, or a 1-rank group without one, unless one
already exists) so tests and benchmarks can call it from their own workers.
"""

# No `from __future__ import annotations`: DDP's register_comm_hook checks the hook's
# annotations against the real dist.GradBucket / Future types, not strings.
import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from ggcomm.tools.train import (
    Step,
    StepTimer,
    draws,
    evaluate,
    fit,
    in_process_group,
    rank_generator,
    token_accuracy,
    write_summary,
)
from ggcomm.tools.workload import GPT, ByteDataset, GPTConfig, Split, make_mlp_workload, mlp_batch
from ggcomm.tools.workload import lr_factor as workload_lr_factor

HOOKS = ("none", "fp16", "quant8", "powersgd", "psgd-eg", "gg")
MODELS = ("gpt", "gpt-small", "mlp")
EVAL_SEED = 1234
"""Seed of the validation batches: the same for every run, so runs compare."""

Hook = Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# Byte accounting
# ---------------------------------------------------------------------------------------------


def allreduce_bytes(nbytes: int, world_size: int) -> float:
    """Bytes one rank sends in a ring allreduce of ``nbytes``: ``2 (W - 1) / W * nbytes``."""
    return 2.0 * (world_size - 1) / world_size * nbytes


def allgather_bytes(nbytes: int, world_size: int) -> float:
    """Bytes one rank sends in a ring allgather of ``nbytes`` per rank: ``(W - 1) * nbytes``."""
    return float((world_size - 1) * nbytes)


def _fp16_bytes(state: Any, bucket: dist.GradBucket, world_size: int) -> float:
    return allreduce_bytes(bucket.buffer().numel() * 2, world_size)


def _quant8_bytes(state: Any, bucket: dist.GradBucket, world_size: int) -> float:
    # (scale, zero_point) as 2 float32, then N uint8.
    return allgather_bytes(8, world_size) + allgather_bytes(bucket.buffer().numel(), world_size)


def _powersgd_bytes(
    state: powerSGD_hook.PowerSGDState, bucket: dist.GradBucket, world_size: int
) -> float:
    buffer = bucket.buffer()
    itemsize = buffer.element_size()
    # Must be evaluated before the hook runs: the hook advances state.iter.
    if state.iter < state.start_powerSGD_iter:
        return allreduce_bytes(buffer.numel() * itemsize, world_size)
    uncompressed = p_size = q_size = 0
    for grad in bucket.gradients():
        n = grad.shape[0]
        m = grad.numel() // n
        r = min(n, m, state.matrix_approximation_rank)
        if (n + m) * r * state.min_compression_rate < n * m:
            p_size += n * r
            q_size += m * r
        else:
            uncompressed += n * m
    return sum(allreduce_bytes(k * itemsize, world_size) for k in (uncompressed, p_size, q_size))


def quant8_pertensor_hook(
    process_group: dist.ProcessGroup | None, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """torch's ``quantization_pertensor_hook``, working on every backend.

    Each rank computes a per-tensor ``(scale, zero_point)`` for its bucket with a
    ``MinMaxObserver``, allgathers them, quantizes its bucket to uint8 with its own pair,
    allgathers the uint8 tensors, then dequantizes every rank's tensor with that rank's pair and
    returns the mean. Unlike upstream, the gathered tensors are read from the output lists
    passed to ``all_gather`` rather than from the future's value, whose layout differs between
    backends.
    """
    group = process_group if process_group is not None else dist.group.WORLD
    assert group is not None
    rank, world_size = group.rank(), group.size()
    tensor = bucket.buffer()

    observer = torch.ao.quantization.MinMaxObserver().to(tensor.device)
    observer(tensor)
    scale, zero_point = observer.calculate_qparams()
    s_and_z = torch.cat([scale.reshape(1).float(), zero_point.reshape(1).float()]).to(tensor.device)
    all_s_and_z = [torch.zeros_like(s_and_z) for _ in range(world_size)]
    all_quantized = [
        torch.zeros(tensor.numel(), dtype=torch.uint8, device=tensor.device)
        for _ in range(world_size)
    ]

    def quantize_and_allgather(fut: torch.futures.Future) -> Any:
        fut.wait()
        s, z = all_s_and_z[rank]
        quantized = torch.clamp(torch.round(tensor / s) + z, 0, 255).to(torch.uint8)
        work = dist.all_gather(all_quantized, quantized, group=group, async_op=True)
        return work.get_future().wait()

    def dequantize_and_aggregate(fut: torch.futures.Future) -> torch.Tensor:
        fut.wait()
        total = torch.zeros_like(tensor, dtype=torch.float32)
        for (s, z), quantized in zip(all_s_and_z, all_quantized, strict=True):
            total += s * (quantized.to(torch.float32) - z)
        return total / world_size

    fut = dist.all_gather(all_s_and_z, s_and_z, group=group, async_op=True).get_future()
    return fut.then(quantize_and_allgather).then(dequantize_and_aggregate)


class ByteCounter:
    """Wraps a built-in comm hook and adds up the bytes it sends (see the module docstring)."""

    def __init__(
        self, hook: Hook, count: Callable[[Any, dist.GradBucket, int], float], world_size: int
    ) -> None:
        self.hook = hook
        self.count = count
        self.world_size = world_size
        self.bytes_sent = 0.0

    def reset(self) -> float:
        """Return the bytes counted since the last reset and start again from zero."""
        sent, self.bytes_sent = self.bytes_sent, 0.0
        return sent

    def as_hook(self) -> Hook:
        """The counting hook to register with ``DDP.register_comm_hook``."""

        def counted_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
            self.bytes_sent += self.count(state, bucket, self.world_size)
            return self.hook(state, bucket)

        return counted_hook


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--hook", choices=HOOKS, default="none", help="gradient comm hook")
    p.add_argument("--model", choices=MODELS, default="gpt")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16, help="per rank")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument(
        "--schedule",
        choices=("cosine", "constant"),
        default="cosine",
        help="learning-rate schedule after warm-up: cosine decay to --min-lr-ratio, or constant",
    )
    p.add_argument("--warmup", type=int, default=20, help="linear learning-rate warm-up steps")
    p.add_argument(
        "--min-lr-ratio", type=float, default=0.1, help="cosine schedule's final lr / --lr"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--json", metavar="PATH", help="rank 0 writes its summary here")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches at the end")
    p.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP bucket size")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: as is)")
    g = p.add_argument_group("model")
    g.add_argument("--block-size", type=int, default=128, help="GPT context length")
    g.add_argument("--corpus-bytes", type=int, default=8_000_000, help="GPT training text")
    g.add_argument("--mlp-width", type=int, default=4096)
    g.add_argument("--mlp-depth", type=int, default=3)
    g = p.add_argument_group("powersgd")
    g.add_argument("--psgd-rank", type=int, default=1, help="matrix_approximation_rank")
    g.add_argument("--psgd-start", type=int, default=10, help="start_powerSGD_iter")
    g = p.add_argument_group("gg (ggcomm.ddp); unset options take GGCommState's defaults")
    rate = g.add_mutually_exclusive_group()
    rate.add_argument("--rate", type=float, help="target bits per element (default 3.0)")
    rate.add_argument("--step", type=float, help="absolute quantization step")
    rate.add_argument("--rel-step", type=float, help="quantization step as a multiple of RMS")
    g.add_argument("--exchange", choices=("auto", "allgather", "reduce_scatter"))
    g.add_argument("--no-error-feedback", action="store_true")
    g.add_argument("--gg-start-iter", type=int, help="plain allreduce before this iteration")
    g.add_argument("--gg-warmup-iters", type=int, help="rate warm-up iterations (rate mode)")
    g.add_argument("--gg-warmup-rate", type=float, help="rate at the start of the warm-up")
    g.add_argument("--gg-step-drift", type=float,
                   help="RMS change (log2) beyond which a bucket agrees on fresh steps")
    args = p.parse_args(argv)
    if args.hook == "gg" and args.rate is None and args.step is None and args.rel_step is None:
        args.rate = 3.0
    return args


def lr_factor(args: argparse.Namespace):
    """The schedule as a multiplier of ``--lr`` for ``LambdaLR`` (``workload.lr_factor``)."""
    return workload_lr_factor(args.steps, args.warmup, args.min_lr_ratio,
                              cosine=args.schedule == "cosine")


def _device(backend: str) -> torch.device:
    if backend != "nccl":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--backend nccl needs CUDA")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def _build_model(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(args.seed)
    if args.model == "mlp":
        return make_mlp_workload(args.mlp_width, args.mlp_depth)
    config = GPTConfig.small() if args.model == "gpt-small" else GPTConfig()
    config.block_size = args.block_size
    return GPT(config)


def _register_hook(
    args: argparse.Namespace, ddp_model: DDP, world_size: int
) -> tuple[ByteCounter | None, Any]:
    """Register ``args.hook``; returns its byte counter (built-in hooks) and its state."""
    if args.hook == "none":
        return None, None
    if args.hook == "gg":
        from ggcomm.ddp import GGCommState

        kwargs: dict[str, Any] = {}
        for name in ("rate", "step", "rel_step", "exchange"):
            if getattr(args, name) is not None:
                kwargs[name] = getattr(args, name)
        if args.no_error_feedback:
            kwargs["error_feedback"] = False
        if args.gg_start_iter is not None:
            kwargs["start_iter"] = args.gg_start_iter
        if args.gg_warmup_iters is not None:
            kwargs["warmup_iters"] = args.gg_warmup_iters
        if args.gg_warmup_rate is not None:
            kwargs["warmup_rate"] = args.gg_warmup_rate
        if args.gg_step_drift is not None:
            kwargs["step_drift"] = args.gg_step_drift
        state = GGCommState(process_group=None, **kwargs)
        state.register(ddp_model)
        return None, state
    if args.hook == "psgd-eg":
        from ggcomm.powersgd import PowerSGDEGState

        kwargs = {name: getattr(args, name) for name in ("rate", "step", "rel_step")
                  if getattr(args, name) is not None}
        if args.gg_warmup_iters is not None:
            kwargs["warmup_iters"] = args.gg_warmup_iters
        if args.gg_warmup_rate is not None:
            kwargs["warmup_rate"] = args.gg_warmup_rate
        state = PowerSGDEGState(process_group=None, matrix_approximation_rank=args.psgd_rank,
                                start_powerSGD_iter=args.psgd_start, **kwargs)
        state.register(ddp_model)
        return None, state
    state: Any = None
    if args.hook == "fp16":
        counter = ByteCounter(default_hooks.fp16_compress_hook, _fp16_bytes, world_size)
    elif args.hook == "quant8":
        counter = ByteCounter(quant8_pertensor_hook, _quant8_bytes, world_size)
    elif args.hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=args.psgd_rank,
            start_powerSGD_iter=args.psgd_start,
        )
        counter = ByteCounter(powerSGD_hook.powerSGD_hook, _powersgd_bytes, world_size)
    else:
        raise ValueError(f"unknown hook {args.hook!r}")
    ddp_model.register_comm_hook(state, counter.as_hook())
    return counter, state


def _parameter_sizes(model: nn.Module) -> tuple[int, int]:
    """Trainable parameters of ``model`` and the bytes of their gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _jsonable(obj: Any) -> Any:
    """Plain JSON types from stats objects (dicts, numpy / torch scalars, NaN -> None)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        obj = obj.item()
    if hasattr(obj, "item") and not isinstance(obj, int | float | str | bool):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _gg_stats(state: Any) -> dict[str, Any]:
    """The gg hook's cumulative statistics (with ratio and bits per element when offered)."""
    stats = state.stats
    if hasattr(stats, "summary"):
        return stats.summary()
    return {"total": stats.total, "last_step": stats.last_step}


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _batch_draw(
    args: argparse.Namespace,
    dataset: ByteDataset | None,
    split: Split,
    generator: torch.Generator,
    device: torch.device,
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """A function that draws one ``(x, y)`` batch of ``--batch-size`` onto ``device``."""

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        if dataset is not None:
            x, y = dataset.batch(split, args.batch_size, generator)
        else:
            x, y = mlp_batch(args.batch_size, args.mlp_width, generator)
        return x.to(device), y.to(device)

    return draw


def _step_records(
    args: argparse.Namespace, counter: ByteCounter | None, hook_state: Any, fp32_bytes: float
) -> Callable[[Step], None]:
    """``after_step`` callback: the step's next-token ``accuracy`` (GPT; ``None`` for the MLP),
    the bytes this rank sent (``bytes_sent``) and, for ``gg``, the hook's ``encode_s`` and
    ``decode_s``."""
    is_gpt = args.model != "mlp"

    def record(step: Step) -> None:
        r = step.record
        r["accuracy"] = token_accuracy(step.output, step.batch) if is_gpt else None
        if args.hook == "none":
            r["bytes_sent"] = fp32_bytes
        elif args.hook == "psgd-eg":
            last = hook_state.stats.last_step
            r["bytes_sent"] = float(last["bytes_sent"]) if last else 0.0
        elif args.hook == "gg":
            last = hook_state.stats.last_step
            r["bytes_sent"] = float(last["bytes_sent"]) if last else 0.0
            r["encode_s"] = float(last["encode_s"]) if last else 0.0
            r["decode_s"] = float(last["decode_s"]) if last else 0.0
        else:
            assert counter is not None
            r["bytes_sent"] = counter.reset()

    return record


def _progress_log(args: argparse.Namespace, fp32_bytes: float) -> Callable[[Step], None]:
    """``after_step`` callback printing the first step, every ``--log-every``-th and the last."""

    def log(step: Step) -> None:
        n, r = step.index + 1, step.record
        if not (n % args.log_every == 0 or n == args.steps or n == 1):
            return
        acc = f"  acc {r['accuracy']:.4f}" if r["accuracy"] is not None else ""
        ratio = f" ({r['bytes_sent'] / fp32_bytes:.3f} of fp32)" if fp32_bytes else ""
        print(
            f"step {n:5d}/{args.steps}  loss {r['loss']:.4f}{acc}  "
            f"sent {_fmt_bytes(r['bytes_sent'])}/rank{ratio}  "
            f"{r['time_s'] * 1e3:.1f} ms",
            flush=True,
        )

    return log


def _validate(
    model: nn.Module,
    args: argparse.Namespace,
    dataset: ByteDataset | None,
    device: torch.device,
) -> tuple[float, float | None]:
    """Mean loss (and next-token accuracy for GPT) over ``args.eval_batches`` fixed batches."""
    draw = _batch_draw(args, dataset, "val", torch.Generator().manual_seed(EVAL_SEED), device)
    batches = (draw() for _ in range(args.eval_batches))
    return evaluate(model, batches, metric=token_accuracy if dataset is not None else None)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the training described by ``args`` (from :func:`parse_args`) on this rank.

    Returns the summary dict (validation results only on rank 0, ``None`` elsewhere); rank 0
    also writes it to ``args.json`` if set.
    """
    return in_process_group(_train, args, args.backend)


def _train(args: argparse.Namespace) -> dict[str, Any]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = _device(args.backend)
    model = _build_model(args).to(device)
    n_params, grad_bytes = _parameter_sizes(model)
    fp32_bytes = allreduce_bytes(grad_bytes, world_size)
    dataset = None
    if args.model != "mlp":
        dataset = ByteDataset.from_stdlib(args.block_size, args.corpus_bytes)

    ddp_model = DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        bucket_cap_mb=args.bucket_cap_mb,
    )
    counter, hook_state = _register_hook(args, ddp_model, world_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = rank_generator(args.seed, rank)
    callbacks = [_step_records(args, counter, hook_state, fp32_bytes)]
    if rank == 0:
        print(
            f"train_ddp: model={args.model} ({n_params / 1e6:.2f}M params) hook={args.hook} "
            f"world_size={world_size} backend={args.backend} device={device} "
            f"fp32 allreduce={_fmt_bytes(fp32_bytes)}/rank/step",
            flush=True,
        )
        callbacks.append(_progress_log(args, fp32_bytes))

    t_start = time.perf_counter()
    records = fit(
        ddp_model,
        optimizer,
        draws(_batch_draw(args, dataset, "train", gen, device)),
        args.steps,
        schedule=lr_factor(args),
        after_step=callbacks,
        timer=StepTimer(device),
    )
    total_time = time.perf_counter() - t_start

    val: tuple[float | None, float | None] = (None, None)
    if rank == 0:
        val = _validate(model, args, dataset, device)
        print(
            f"final: val loss {val[0]:.4f}"
            + (f"  val acc {val[1]:.4f}" if val[1] is not None else ""),
            flush=True,
        )
    # Keep the others in the group until rank 0 has finished evaluating.
    dist.barrier()

    if hasattr(hook_state, "close"):  # the gg hook's thread and group end with the run
        hook_state.close()
    summary = _summary(args, model, records, world_size, device, total_time, val, hook_state)
    if rank == 0:
        write_summary(summary, args.json)
    return summary


def _summary(
    args: argparse.Namespace,
    model: nn.Module,
    records: list[dict[str, Any]],
    world_size: int,
    device: torch.device,
    total_time: float,
    val: tuple[float | None, float | None],
    hook_state: Any,
) -> dict[str, Any]:
    """The summary :func:`train` returns, in plain JSON types (see the module docstring)."""
    n_params, grad_bytes = _parameter_sizes(model)
    fp32_bytes = allreduce_bytes(grad_bytes, world_size)
    losses = [r["loss"] for r in records]
    step_times = [r["time_s"] for r in records]
    sent = [r["bytes_sent"] for r in records]
    gg = args.hook == "gg"
    # Mean step time leaves out the first steps (DDP bucket rebuild, allocator warm-up).
    skip = min(2, len(step_times) - 1)
    mean_sent = statistics.fmean(sent) if sent else 0.0
    summary: dict[str, Any] = {
        "config": vars(args),
        "world_size": world_size,
        "backend": args.backend,
        "device": str(device),
        "model": args.model,
        "hook": args.hook,
        "num_parameters": n_params,
        "grad_bytes": grad_bytes,
        "fp32_allreduce_bytes_per_rank": fp32_bytes,
        "steps": {
            "loss": losses,
            "accuracy": [r["accuracy"] for r in records],
            "step_time_s": step_times,
            "bytes_sent_per_rank": sent,
            "encode_s": [r["encode_s"] for r in records] if gg else None,
            "decode_s": [r["decode_s"] for r in records] if gg else None,
        },
        "mean_step_time_s": statistics.fmean(step_times[skip:]) if step_times else None,
        "median_step_time_s": statistics.median(step_times) if step_times else None,
        "total_time_s": total_time,
        "mean_bytes_sent_per_rank": mean_sent,
        "bytes_vs_fp32": mean_sent / fp32_bytes if fp32_bytes else None,
        "final_train_loss": losses[-1] if losses else None,
        "val_loss": val[0],
        "val_accuracy": val[1],
        "gg_stats": _gg_stats(hook_state) if gg or args.hook == "psgd-eg" else None,
    }
    return _jsonable(summary)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv`` (default ``sys.argv[1:]``) and train."""
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
