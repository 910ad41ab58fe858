"""Train the GPT workload with DiLoCo outer steps (a torchrun entry point), or with DDP's
fp32 all-reduce every step for comparison.

    torchrun --nproc_per_node=2 launch/train_diloco.py --wire gg --rate 2 --sync-every 50
    torchrun --nproc_per_node=2 launch/train_diloco.py --wire ddp

``--wire gg | int8 | fp32``: :class:`ggcomm.diloco.DiLoCo` with that wire (inner AdamW with
warm-up and cosine decay on every rank alone, an outer step every ``--sync-every`` steps);
``--wire ddp``: the same model, data and schedule under plain DDP (an fp32 all-reduce of the
gradients every step). Rank 0 writes ``--json``: per-step loss, bytes this rank sent, step
time; the validation loss and next-byte accuracy of the final parameters (the same on every
rank: ``--steps`` must be a multiple of ``--sync-every``); the GG shape of the
pseudo-gradients of the first and the last outer step (``--wire gg``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .train import (
    Step,
    add_gpt_run_args,
    in_process_group,
    rank_generator,
    train_gpt,
    write_summary,
)
from .workload import GPT, ByteDataset, GPTConfig

__all__ = ["WIRES", "main", "parse_args", "train"]

WIRES = ("ddp", "fp32", "int8", "gg")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wire", choices=WIRES, default="gg")
    p.add_argument("--sync-every", type=int, default=50, help="inner steps per outer step")
    p.add_argument("--outer-lr", type=float, default=0.7)
    p.add_argument("--outer-momentum", type=float, default=0.9)
    p.add_argument("--per-segment-steps", action="store_true",
                   help="--wire gg: a step per 64k-element segment, each aiming at the rate "
                   "(default: one step for the whole pseudo-gradient)")
    p.add_argument("--rans", action="store_true",
                   help="--wire gg: let the frames code blocks in the codec's rANS mode "
                   "where that saves bits (ggcomm.encode(rans=True))")
    add_gpt_run_args(p, 600, "gg (ggcomm.diloco)")
    args = p.parse_args(argv)
    if args.wire != "ddp" and args.steps % args.sync_every:
        p.error("--steps must be a multiple of --sync-every (the run ends on an outer step)")
    return args


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train on this rank (inside torchrun's process group, or a 1-rank one)."""
    return in_process_group(_train, args)


def _shape(x: torch.Tensor) -> float:
    """The GG shape of ``x`` by moment ratio (:func:`ggcomm.gg.fit`)."""
    from ggcomm.gg import fit as gg_fit

    return float(gg_fit(x.detach().reshape(-1).double().numpy()).beta)


def _train(args: argparse.Namespace) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = GPTConfig()
    config.block_size = args.block_size
    model = GPT(config)
    n_params = sum(p.numel() for p in model.parameters())
    fp32_allreduce = 2.0 * (world - 1) / world * 4 * n_params
    diloco = None
    shapes: list[float] = []
    if args.wire == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        trained: torch.nn.Module = DDP(model)
    else:
        import ggcomm
        from ggcomm.diloco import DiLoCo

        ggcomm.set_num_threads(1)
        mode = {k: getattr(args, k) for k in ("rate", "step", "rel_step")
                if getattr(args, k) is not None}
        diloco = DiLoCo(model, sync_every=args.sync_every, wire=args.wire,
                        outer_lr=args.outer_lr, outer_momentum=args.outer_momentum,
                        error_feedback=not args.no_error_feedback,
                        shared_step=not args.per_segment_steps, rans=args.rans, **mode)
        trained = model
    data = ByteDataset.from_stdlib(args.block_size, args.corpus_bytes)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = rank_generator(args.seed, rank)

    def record(step: Step) -> None:
        r = step.record
        if diloco is None:
            r["bytes_sent"] = fp32_allreduce
        else:
            t = time.perf_counter()
            outer_now = (diloco.inner_steps + 1) % args.sync_every == 0
            if outer_now and (diloco.outer_steps == 0 or diloco.inner_steps + 1 == args.steps):
                delta = torch.cat([(g - p.detach().float()).reshape(-1) for g, p in
                                   zip(diloco.global_params, diloco.params, strict=True)])
                shapes.append(_shape(delta))
            before = diloco.stats.total["bytes_sent"]
            diloco.step()
            r["bytes_sent"] = diloco.stats.total["bytes_sent"] - before
            r["outer_s"] = time.perf_counter() - t if outer_now else 0.0
        n = step.index + 1
        if rank == 0 and (n == 1 or n % args.log_every == 0 or n == args.steps):
            print(f"step {n:5d}/{args.steps}  loss {r['loss']:.4f}  sent "
                  f"{r['bytes_sent'] / 1e3:.1f} kB/rank  {r['time_s'] * 1e3:.0f} ms",
                  flush=True)

    records, total_time, val_loss, val_acc = train_gpt(trained, model, opt, data, args, gen,
                                                       after_step=[record])
    losses = [r["loss"] for r in records]
    sent = [r["bytes_sent"] for r in records]
    summary = {
        "config": vars(args), "world_size": world, "num_parameters": n_params,
        "wire": args.wire, "fp32_allreduce_bytes_per_rank": fp32_allreduce,
        "steps": {"loss": losses, "bytes_sent_per_rank": sent,
                  "step_time_s": [r["time_s"] for r in records],
                  "outer_s": [r.get("outer_s", 0.0) for r in records]},
        "final_train_loss": statistics.fmean(losses[-20:]) if losses else None,
        "val_loss": val_loss, "val_accuracy": val_acc,
        "total_bytes_sent_per_rank": sum(sent),
        "median_step_time_s": statistics.median(r["time_s"] for r in records)
        if records else None,
        "total_time_s": total_time,
        "pseudo_gradient_gg_shape": {"first": shapes[0], "last": shapes[-1]}
        if shapes else None,
        "stats": diloco.stats.summary() if diloco is not None else None,
    }
    if rank == 0:
        print(f"final: val loss {val_loss:.4f}  val acc {val_acc:.4f}  sent "
              f"{sum(sent) / 1e6:.2f} MB/rank", flush=True)
        write_summary(summary, args.json)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
