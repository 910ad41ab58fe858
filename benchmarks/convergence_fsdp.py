"""FSDP2 convergence with and without ggcomm: the GPT workload on 2 gloo ranks.

Runs :mod:`ggcomm.tools.train_fsdp` under torchrun once per method and seed (same data,
steps and initialization per seed): FSDP's fp32 reduce-scatter, its bf16 ``reduce_dtype``,
and ggcomm's EG-coded reduce-scatter (``ggcomm.fsdp.compress``). Writes
``benchmarks/results/convergence_fsdp.{md,json,png}``: final training loss (mean of the last
20 steps) and validation loss per seed, gradient bytes per rank per step, step time, and the
loss curves against steps and against cumulative gradient bytes.

    python benchmarks/convergence_fsdp.py [--steps 300] [--seeds 0 1 2] [--methods ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib
import numpy as np

from ggcomm.tools.workload import free_port

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = {
    "fp32": ["--reduce", "fp32"],
    "bf16": ["--reduce", "bf16"],
    "gg-rate3": ["--reduce", "gg", "--rate", "3"],
    "gg-rate3-w20": ["--reduce", "gg", "--rate", "3", "--gg-warmup-iters", "20"],
    "gg-rate3-w20-rf8": ["--reduce", "gg", "--rate", "3", "--gg-warmup-iters", "20",
                         "--weights", "rf8"],
}


def run(method: str, steps: int, out: Path, seed: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", "-m", "ggcomm.tools.train_fsdp", *METHODS[method],
           "--steps", str(steps), "--seed", str(seed), "--threads", "1", "--log-every", "100",
           "--json", str(out)]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def report(runs: dict[int, dict[str, dict]], args: argparse.Namespace) -> list[str]:
    seeds, methods = sorted(runs), args.methods
    any_run = runs[seeds[0]][methods[0]]
    fp32_bytes = any_run["fp32_reduce_scatter_bytes_per_rank"]
    lines = [
        "# FSDP2 convergence: GPT workload, 2 gloo ranks on localhost",
        "",
        f"Command: `python benchmarks/convergence_fsdp.py --steps {args.steps} --methods "
        f"{' '.join(methods)} --seeds {' '.join(map(str, seeds))}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; Python "
        f"{platform.python_version()}; {time.strftime('%Y-%m-%d')}.  ",
        f"Model: byte-level GPT, {any_run['num_parameters']:,} parameters, every block and "
        f"the model wrapped with `fully_shard`; {args.steps} steps, batch 16 x 128 bytes per "
        "rank, AdamW lr 3e-3 (20 warm-up steps, cosine decay to 10%). Gradient bytes: what "
        "one rank sends in the reduce-scatters per step (fp32/bf16: a ring's (N-1)/N of the "
        "gradients; ggcomm: measured, statistics and sizes included); the parameter "
        "all-gathers are not counted in this table (see the one below for compressed "
        "weights).",
        "",
        "| method | final train loss per seed | vs fp32 per seed | val loss (mean) | "
        "gradient bytes / rank / step | fewer than fp32 | median step |",
        "|---|---|---|---|---|---|---|",
    ]
    def compressed_weights(m: str) -> bool:
        return any(sum(runs[s][m]["steps"].get("weight_bytes_sent_per_rank") or [0])
                   for s in seeds)

    weighted = [m for m in methods if compressed_weights(m)]
    for m in methods:
        finals = [runs[s][m]["final_train_loss"] for s in seeds]
        rel = [runs[s][m]["final_train_loss"] / runs[s]["fp32"]["final_train_loss"] - 1
               for s in seeds] if "fp32" in methods else []
        sent = np.mean([runs[s][m]["mean_bytes_sent_per_rank"] for s in seeds])
        step = np.median([runs[s][m]["median_step_time_s"] for s in seeds])
        lines.append(
            f"| {m} | {' / '.join(f'{v:.4f}' for v in finals)} | "
            f"{' / '.join(f'{100 * v:+.2f}%' for v in rel) or '-'} | "
            f"{np.mean([runs[s][m]['val_loss'] for s in seeds]):.4f} | {sent / 1e3:.1f} kB | "
            f"{fp32_bytes / sent:.1f}x | {1e3 * step:.0f} ms |")
    if weighted:
        lines += [
            "",
            "With the parameter all-gathers compressed too (forward and backward use the "
            "rounded weights; the sharded fp32 master weights stay exact): bytes one rank "
            "sends per step, gradients plus weights, against the same collectives in fp32 "
            "(the all-gathers' fp32 size is what the run's own counters record as raw bytes).",
            "",
            "| method | gradients / step | weights / step | total / step | fp32 total / step "
            "| fewer than fp32 | final loss vs fp32 per seed |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in weighted:
            grads = np.mean([runs[s][m]["mean_bytes_sent_per_rank"] for s in seeds])
            wts = np.mean([np.mean(runs[s][m]["steps"]["weight_bytes_sent_per_rank"])
                           for s in seeds])
            wfp32 = np.mean([np.mean(runs[s][m]["steps"]["weight_fp32_bytes_per_rank"])
                             for s in seeds])
            rel = [runs[s][m]["final_train_loss"] / runs[s]["fp32"]["final_train_loss"] - 1
                   for s in seeds] if "fp32" in methods else []
            total, fp32_total = grads + wts, fp32_bytes + wfp32
            lines.append(
                f"| {m} | {grads / 1e3:.1f} kB | {wts / 1e3:.1f} kB | {total / 1e3:.1f} kB"
                f" | {fp32_total / 1e3:.1f} kB | {fp32_total / total:.1f}x"
                f" | {' / '.join(f'{100 * v:+.2f}%' for v in rel) or '-'} |")
    return lines


def figure(runs: dict[int, dict[str, dict]], methods: list[str]) -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, m in enumerate(methods):
        color = f"C{i}"
        for j, s in enumerate(sorted(runs)):
            r = runs[s][m]["steps"]
            loss = np.convolve(r["loss"], np.ones(10) / 10, mode="valid")
            label = m if j == 0 else None
            axes[0].plot(np.arange(loss.size) + 10, loss, color=color, alpha=0.8, label=label)
            cum = np.cumsum(r["bytes_sent_per_rank"])[9:] / 1e6
            axes[1].plot(cum, loss, color=color, alpha=0.8, label=label)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("cumulative gradient MB sent per rank (log scale)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("training loss (10-step mean)")
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--methods", nargs="+", default=["fp32", "bf16", "gg-rate3"],
                   choices=sorted(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--name", default="convergence_fsdp")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--merge", type=Path,
                   help="a results JSON of this benchmark whose runs are reported alongside "
                        "(the same steps and seeds; its methods are not run again)")
    args = p.parse_args(argv)
    runs: dict[int, dict[str, dict]] = {}
    if args.merge is not None:
        for seed, by in json.loads(args.merge.read_text())["runs"].items():
            if int(seed) in args.seeds:
                runs.setdefault(int(seed), {}).update(by)
        merged = [m for m in runs[args.seeds[0]] if m not in args.methods]
        args.methods = merged + [m for m in args.methods if m not in merged]
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for m in args.methods:
                if m in runs.get(seed, {}):
                    continue
                t = time.time()
                runs.setdefault(seed, {})[m] = run(m, args.steps, Path(tmp) / f"{m}.json", seed)
                print(f"{m} seed {seed}: {time.time() - t:.0f} s", file=sys.stderr)
    lines = report(runs, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"{args.name}.json").write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    fig = figure(runs, args.methods)
    fig.tight_layout()
    fig.savefig(args.out / f"{args.name}.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
