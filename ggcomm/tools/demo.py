"""``ggcomm demo``: plain DDP against ggcomm on 2 local ranks, side by side.

Spawns 2 ranks on this machine (gloo over localhost) and trains the built-in byte-level GPT
on the Python standard library's sources three times from the same seed and data: with
DDP's own fp32 allreduce; with the ggcomm hook alone (the Exp-Golomb DDP hook at 3 bits
per element, the same initialization, nothing else changed: the wire codec's own effect);
and with the full method (GG initialization, GCT and the hook). Prints a table of what each
sent and how well it trained, and writes a plot of loss and wire bits per step. Nothing is
downloaded::

    ggcomm demo                      # about 4 minutes on 2 cores
    ggcomm demo --steps 400 --rate 2.5 --out-dir my-demo
"""

from __future__ import annotations

import argparse
import json
import os
import queue as queue_mod
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .train import Step, draws, evaluate, fit, rank_generator, token_accuracy
from .workload import GPT, ByteDataset, free_port, lr_factor

__all__ = ["main", "run", "train_rank"]

WORLD = 2

RATE_WARMUP_ITERS = 20
"""ggcomm's rate warm-up: its first compressed iterations start at 8 bits per element and
fall to ``--rate`` over this many. At 3 bits most small gradients are sent as zeros and then,
through error feedback, as an occasional whole quantization step; an AdamW second moment
that never saw their real size turns those bursts into updates several times the learning
rate, and the loss spikes early. In the convergence benchmark (README, "Use a rate warm-up
with Adam-type optimizers"; benchmarks/results/convergence_ddp_300.json) the train loss rose
0.17-0.32 above fp32's around steps 17-25 without the warm-up and never more than 0.05 with
20 iterations of it."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ggcomm demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150, help="training steps per run")
    p.add_argument("--rate", type=float, default=3.0, help="ggcomm bits per element")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per rank and step")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate")
    p.add_argument("--init-beta", "--init-shape", dest="init_beta", type=float, default=1.0,
                   help="GG shape of the initial weights in the ggcomm run (2: Gaussian)")
    p.add_argument("--gct-lam", type=float, default=0.001,
                   help="GCT multiplier (0: off); benchmarks/results/paper has the sweep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="ggcomm-demo", help="where the plot and JSON go")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    return args


def _worker(rank: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    """One rank of the demo: the three trainings, one after the other, on one process
    group (each starts from its own seed; the hook's thread and group end with its run)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    import ggcomm

    torch.set_num_threads(1)  # two ranks share the machine's cores
    ggcomm.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mode = MODES[0]
    try:
        for mode in MODES:
            def progress(step: int, row: tuple, mode: str = mode) -> None:
                queue.put(("step", mode, step, row))

            result = train_rank(args, mode, progress if rank == 0 else None)
            if rank == 0:
                queue.put(("done", mode, result))
            dist.barrier()
    except BaseException as e:
        queue.put(("error", mode, f"rank {rank}: {type(e).__name__}: {e}"))
        raise
    finally:
        dist.destroy_process_group()


def train_rank(
    args: argparse.Namespace, mode: str, progress: Callable[[int, tuple], None] | None = None
) -> dict[str, Any]:
    """This rank's training in ``mode`` (one of :data:`MODES`) on the current process group.

    Returns ``rows`` (per step, see :func:`_row`), ``num_parameters`` and the validation
    loss and accuracy; ``progress(step, row)`` sees each row as it comes.
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from .train_ddp import allreduce_bytes

    torch.manual_seed(args.seed)
    model = GPT()
    n_params = model.num_parameters()
    fp32_bytes = allreduce_bytes(4 * n_params, dist.get_world_size())
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    full, hooked = mode == MODES[2], mode != MODES[0]
    gct = state = None
    if full:
        from ggcomm.methods.init import apply_gg_init

        apply_gg_init(model, args.init_beta, nonlinearity="linear",
                      generator=torch.Generator().manual_seed(args.seed))
    ddp = DDP(model)
    if hooked:
        from ggcomm.ddp import GGCommState

        state = GGCommState(rate=args.rate, warmup_iters=RATE_WARMUP_ITERS)
        state.register(ddp)
    if full and args.gct_lam > 0:
        from ggcomm.methods.gct import GCT

        gct = GCT(model.named_parameters(), lam=args.gct_lam)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    data = ByteDataset.from_stdlib(128)
    gen = rank_generator(args.seed, dist.get_rank())

    def account(step: Step) -> None:
        r = step.record
        r["accuracy"] = token_accuracy(step.output, step.batch)
        r["bytes_sent"] = fp32_bytes if state is None else state.stats.last_step["bytes_sent"]
        if progress is not None:
            progress(step.index, _row(r))

    records = fit(ddp, opt, draws(lambda: data.batch("train", args.batch_size, gen)),
                  args.steps, schedule=lr_factor(args.steps),
                  after_backward=[lambda step: gct.apply_()] if gct is not None else [],
                  after_step=[account])
    if state is not None:  # the hook's thread and private group end with the training
        state.close()
    val_gen = torch.Generator().manual_seed(12345)
    val_loss, val_acc = evaluate(model, (data.batch("val", 32, val_gen) for _ in range(4)),
                                 metric=token_accuracy)
    return {"rows": [_row(r) for r in records], "num_parameters": n_params,
            "val_loss": val_loss, "val_accuracy": val_acc}


def _row(record: dict[str, Any]) -> tuple[float, float, float, float]:
    """A step's row: training loss, next-token accuracy, bytes this rank sent, seconds."""
    return record["loss"], record["accuracy"], record["bytes_sent"], record["time_s"]


MODES = ("plain DDP", "ggcomm hook", "ggcomm full")
"""The three runs: DDP's fp32 allreduce; the same model and initialization with the ggcomm
hook (the wire codec alone); GG initialization, GCT and the hook (the whole method)."""


def run(args: argparse.Namespace) -> dict[str, dict]:
    """The three trainings, one after the other in one pair of rank processes; returns
    rank 0's results per mode."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(MODES) * args.steps, unit="step", file=sys.stderr)
    results: dict[str, dict] = {}
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, args, queue)) for r in range(WORLD)]
    for proc in procs:
        proc.start()
    try:
        while len(results) < len(MODES):
            try:
                kind, mode, *payload = queue.get(timeout=5.0)
            except queue_mod.Empty:  # check that the ranks are still alive
                if any(p.exitcode not in (None, 0) for p in procs):
                    codes = [p.exitcode for p in procs]
                    raise RuntimeError(f"a rank exited with {codes}") from None
                continue
            if kind == "error":
                raise RuntimeError(f"{mode} failed on {payload[0]}")
            if kind == "step" and bar is not None:
                step, (loss, _, sent, _) = payload
                bar.set_description(f"{mode}: loss {loss:.3f}")
                bar.update(1)
            elif kind == "done":
                results[mode] = payload[0]
        for proc in procs:
            proc.join(timeout=60)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        if bar is not None:
            bar.close()
    return results


def _summary(r: dict) -> dict[str, float]:
    loss, acc, sent, secs = (list(c) for c in zip(*r["rows"], strict=True))
    tail = max(1, len(loss) // 10)
    after_first = sent[1:] or sent
    return {
        "bits_per_element": 8 * statistics.fmean(after_first) / r["num_parameters"],
        "mb_sent": sum(sent) / 1e6,
        "median_step_ms": 1e3 * statistics.median(secs[1:] or secs),
        "final_loss": statistics.fmean(loss[-tail:]),
        "final_accuracy": statistics.fmean(acc[-tail:]),
        "val_loss": r["val_loss"],
        "val_accuracy": r["val_accuracy"],
    }


def _table(summaries: dict[str, dict[str, float]]) -> str:
    plain = summaries[MODES[0]]
    rows = [
        ("bits per element on the wire", "bits_per_element", "{:.2f}"),
        ("MB sent per rank", "mb_sent", "{:.1f}"),
        ("median step time (ms)", "median_step_ms", "{:.0f}"),
        ("final train loss", "final_loss", "{:.4f}"),
        ("final next-token accuracy", "final_accuracy", "{:.4f}"),
        ("validation loss", "val_loss", "{:.4f}"),
        ("validation accuracy", "val_accuracy", "{:.4f}"),
    ]
    width = max(len(label) for label, _, _ in rows)
    lines = [f"{'':<{width}}" + "".join(f"  {m:>12}" for m in MODES)]
    for label, key, fmt in rows:
        lines.append(f"{label:<{width}}" + "".join(f"  {fmt.format(summaries[m][key]):>12}"
                                                   for m in MODES))
    lines.append("")
    for m, what in ((MODES[1], "the wire codec alone"), (MODES[2], "the whole method")):
        ratio = plain["mb_sent"] / summaries[m]["mb_sent"]
        gap = 100 * (summaries[m]["val_loss"] / plain["val_loss"] - 1)
        lines.append(f"{m} ({what}): {ratio:.1f}x fewer bytes, validation loss {gap:+.2f}% "
                     "against plain DDP.")
    return "\n".join(lines)


def _plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_bits) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, r in results.items():
        loss, _, sent, _ = zip(*r["rows"], strict=True)
        ax_loss.plot(loss, label=mode, lw=1)
        ax_bits.plot([8 * b / r["num_parameters"] for b in sent], label=mode, lw=1)
    ax_loss.set(xlabel="step", ylabel="training loss", title="Loss")
    ax_bits.set(xlabel="step", ylabel="bits per element sent", yscale="log",
                title="Gradient bits on the wire, per rank")
    for ax in (ax_loss, ax_bits):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    print(f"ggcomm demo: 2 ranks on localhost (gloo), byte-level GPT on the standard "
          f"library's sources, {args.steps} steps per run: plain DDP; the ggcomm hook "
          f"alone (EG at {args.rate:g} bits per element); the full method (GG init beta "
          f"{args.init_beta:g}, GCT lam {args.gct_lam:g}, the hook).", flush=True)
    t0 = time.perf_counter()
    results = run(args)
    summaries = {m: _summary(results[m]) for m in MODES}
    print()
    print(_table(summaries))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _plot(results, out / "demo.png")
    (out / "demo.json").write_text(json.dumps(
        {"config": vars(args), "summary": summaries, "runs": results}, indent=1))
    print(f"\nPlot: {out / 'demo.png'}  Data: {out / 'demo.json'}  "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0
