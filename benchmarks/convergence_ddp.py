"""Convergence with and without ggcomm: the GPT workload on 2 gloo ranks, side by side.

Runs :mod:`ggcomm.tools.train_ddp` under torchrun (as a module) once per method, same seed,
data and steps, and writes ``benchmarks/results/convergence_ddp.md`` and ``.json``: final
training loss (mean of the last 20 steps), validation loss and accuracy, bytes sent per rank
per step (ggcomm: measured; built-in hooks: computed from the tensors they pass), and step
time.

    python benchmarks/convergence_ddp.py [--steps 300] [--methods none gg3 ...]
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

from ggcomm.tools.workload import free_port

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = {
    "none": ["--hook", "none"],
    "fp16": ["--hook", "fp16"],
    "quant8": ["--hook", "quant8"],
    "powersgd-r4": ["--hook", "powersgd", "--psgd-rank", "4"],
    "gg-rate3": ["--hook", "gg", "--rate", "3"],
    "gg-rate2.9": ["--hook", "gg", "--rate", "2.9"],
    "gg-rate2.5": ["--hook", "gg", "--rate", "2.5"],
    "gg-rate2.75-w20": ["--hook", "gg", "--rate", "2.75", "--gg-warmup-iters", "20"],
}


def run(method: str, steps: int, out: Path, seed: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", "-m", "ggcomm.tools.train_ddp", *METHODS[method],
           "--steps", str(steps), "--seed", str(seed), "--threads", "1", "--log-every", "50",
           "--json", str(out)]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--methods", nargs="+", default=["none", "fp16", "gg-rate3"],
                   choices=sorted(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--name", default="convergence_ddp", help="results file name (no suffix)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    runs: dict[int, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for m in args.methods:
                t = time.time()
                runs.setdefault(seed, {})[m] = run(m, args.steps, Path(tmp) / f"{m}.json", seed)
                print(f"{m} seed {seed}: {time.time() - t:.0f} s", file=sys.stderr)
    base = runs[args.seeds[0]].get("none")
    def final(r: dict) -> float:
        losses = r["steps"]["loss"]
        return sum(losses[-20:]) / len(losses[-20:])

    lines = [
        "# DDP convergence: GPT workload, 2 gloo ranks on localhost",
        "",
        f"Command: `python benchmarks/convergence_ddp.py --steps {args.steps} --methods "
        f"{' '.join(args.methods)} --seeds {' '.join(map(str, args.seeds))} --name "
        f"{args.name}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}.  ",
        f"Model: byte-level GPT, {base['num_parameters'] if base else '?'} parameters; "
        f"{args.steps} steps, batch 16 x 128 tokens per rank, AdamW lr 3e-3 (20 warm-up "
        f"steps, cosine decay to 10%); seeds "
        f"{', '.join(map(str, args.seeds))} (model init and data both follow the seed).",
        "",
        "Final train loss is the mean of the last 20 steps; 'vs fp32' compares it with the "
        "no-hook run of the same seed, and the summary row of each method averages over seeds.",
        "",
        "| method | seed | final train loss | vs fp32 | val loss | val acc | "
        "bytes/rank/step | fewer bytes than fp32 | wire bits/elem | median step ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary: dict[str, dict] = {}
    for m in args.methods:
        gaps, vals, fewer_all, bits_all, finals = [], [], [], [], []
        for seed in args.seeds:
            r = runs[seed][m]
            ref = runs[seed].get("none")
            f = final(r)
            gap = f / final(ref) - 1 if ref else float("nan")
            sent = r["steps"]["bytes_sent_per_rank"][5:]  # after ggcomm's first plain step
            mean_sent = sum(sent) / len(sent)
            fewer = r["fp32_allreduce_bytes_per_rank"] / mean_sent
            bits = 8 * mean_sent / r["num_parameters"]
            gaps.append(gap)
            vals.append(r["val_loss"])
            fewer_all.append(fewer)
            bits_all.append(bits)
            finals.append(f)
            lines.append(f"| {m} | {seed} | {f:.4f} | {100 * gap:+.2f}% | {r['val_loss']:.4f} | "
                         f"{r['val_accuracy']:.4f} | {mean_sent / 1e3:.1f} kB | {fewer:.1f}x | "
                         f"{bits:.2f} | {1e3 * r['median_step_time_s']:.0f} |")
        k = len(args.seeds)
        summary[m] = dict(final_train_loss=sum(finals) / k, vs_fp32=sum(gaps) / k,
                          val_loss=sum(vals) / k, fewer_than_fp32=sum(fewer_all) / k,
                          wire_bits_per_element=sum(bits_all) / k)
        s_ = summary[m]
        lines.append(f"| **{m}** | mean | {s_['final_train_loss']:.4f} | "
                     f"{100 * s_['vs_fp32']:+.2f}% | {s_['val_loss']:.4f} | | | "
                     f"{s_['fewer_than_fp32']:.1f}x | {s_['wire_bits_per_element']:.2f} | |")
    lines += [
        "",
        "Bytes per step are averaged over steps 6 onwards (ggcomm's first step is a plain "
        "allreduce while DDP rebuilds its buckets). Wire bits per element count every byte "
        "the hook hands to torch.distributed (frames, headers, size and statistics "
        "exchanges) over the model's parameter count.",
    ]
    rows = {"summary": summary, "runs": {str(k): v for k, v in runs.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
