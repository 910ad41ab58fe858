"""Train the GPT workload under FSDP2 with ggcomm's reduce-scatter or FSDP's own (a torchrun
entry point).

Every transformer block and the model are wrapped with ``fully_shard``; gradients are
reduce-scattered in fp32 (``--reduce fp32``), in bf16 (``--reduce bf16``:
``MixedPrecisionPolicy(reduce_dtype=torch.bfloat16)``), or EG-coded by
:func:`ggcomm.fsdp.compress` (``--reduce gg``, ``--rate`` / ``--step`` / ``--rel-step``).

    torchrun --nproc_per_node=2 launch/train_fsdp.py --reduce gg --rate 3 --steps 300

Rank 0 writes ``--json``: per-step loss, gradient bytes this rank sent in the reduce-scatters
(fp32/bf16: a ring reduce-scatter's ``(N - 1) / N`` of the gradients), step time, and the
validation loss and next-byte accuracy at the end. With ``--weights rf8`` (or ``eg``) the
parameter all-gathers are compressed too, and their bytes are recorded next to what the
same all-gathers take uncompressed; otherwise they are the same for every ``--reduce`` and
not counted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .train import (
    Step,
    add_gpt_run_args,
    in_process_group,
    rank_generator,
    train_gpt,
    write_summary,
)
from .workload import GPT, ByteDataset, GPTConfig

__all__ = ["REDUCES", "main", "parse_args", "train"]

REDUCES = ("fp32", "bf16", "gg")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reduce", choices=REDUCES, default="gg", help="gradient reduce-scatter")
    g = add_gpt_run_args(p, 300, "gg (ggcomm.fsdp)")
    g.add_argument("--gg-warmup-iters", type=int, default=0, help="rate warm-up iterations")
    g.add_argument("--weights", choices=("none", "rf8", "eg"), default="none",
                   help="compress the parameter all-gathers too")
    args = p.parse_args(argv)
    if args.weights != "none" and args.reduce != "gg":
        p.error("--weights needs --reduce gg")
    return args


def _model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    config = GPTConfig()
    config.block_size = args.block_size
    model = GPT(config)
    kw = {}
    if args.reduce == "bf16":
        kw["mp_policy"] = MixedPrecisionPolicy(reduce_dtype=torch.bfloat16)
    for block in model.blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train on this rank (inside torchrun's process group, or a 1-rank one)."""
    return in_process_group(_train, args)


def _train(args: argparse.Namespace) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads)
    n_params = sum(p.numel() for p in GPT(GPTConfig(block_size=args.block_size)).parameters())
    model = _model(args)
    handle = None
    if args.reduce == "gg":
        import ggcomm
        from ggcomm.fsdp import compress

        ggcomm.set_num_threads(1)
        mode = {k: getattr(args, k) for k in ("rate", "step", "rel_step")
                if getattr(args, k) is not None}
        handle = compress(model, **mode, warmup_iters=args.gg_warmup_iters,
                          error_feedback=not args.no_error_feedback,
                          weights=None if args.weights == "none" else args.weights)
    itemsize = 2 if args.reduce == "bf16" else 4
    plain_bytes = (world - 1) / world * n_params * itemsize
    data = ByteDataset.from_stdlib(args.block_size, args.corpus_bytes)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = rank_generator(args.seed, rank)
    last = {"gradients": 0.0, "weights": 0.0, "weights_raw": 0.0}

    def record(step: Step) -> None:
        if handle is None:
            step.record["bytes_sent"] = plain_bytes
            return _log(step)
        now = {"gradients": handle.stats.counts["gradients"]["bytes_sent"],
               "weights": handle.stats.counts["weights"]["bytes_sent"],
               "weights_raw": handle.stats.counts["weights"]["raw_bytes"]}
        step.record["bytes_sent"] = now["gradients"] - last["gradients"]
        step.record["weight_bytes_sent"] = now["weights"] - last["weights"]
        step.record["weight_raw_bytes"] = now["weights_raw"] - last["weights_raw"]
        last.update(now)
        _log(step)

    def _log(step: Step) -> None:
        n = step.index + 1
        if rank == 0 and (n == 1 or n % args.log_every == 0 or n == args.steps):
            print(f"step {n:5d}/{args.steps}  loss {step.record['loss']:.4f}  sent "
                  f"{step.record['bytes_sent'] / 1e3:.1f} kB/rank  "
                  f"{step.record['time_s'] * 1e3:.0f} ms", flush=True)

    records, total_time, val_loss, val_acc = train_gpt(model, model, opt, data, args, gen,
                                                       after_step=[record])
    losses = [r["loss"] for r in records]
    sent_per_step = [r["bytes_sent"] for r in records]
    summary = {
        "config": vars(args), "world_size": world, "num_parameters": n_params,
        "reduce": args.reduce,
        "fp32_reduce_scatter_bytes_per_rank": (world - 1) / world * n_params * 4,
        "steps": {"loss": losses, "bytes_sent_per_rank": sent_per_step,
                  "weight_bytes_sent_per_rank": [r.get("weight_bytes_sent", 0.0)
                                                 for r in records],
                  "weight_fp32_bytes_per_rank": [r.get("weight_raw_bytes", 0.0)
                                                 for r in records],
                  "step_time_s": [r["time_s"] for r in records]},
        "final_train_loss": statistics.fmean(losses[-20:]) if losses else None,
        "val_loss": val_loss, "val_accuracy": val_acc,
        "mean_bytes_sent_per_rank": statistics.fmean(sent_per_step) if records else None,
        "median_step_time_s": statistics.median(r["time_s"] for r in records)
        if records else None,
        "total_time_s": total_time,
        "gg_stats": handle.stats.summary() if handle is not None else None,
    }
    if rank == 0:
        print(f"final: val loss {val_loss:.4f}  val acc {val_acc:.4f}", flush=True)
        write_summary(summary, args.json)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
