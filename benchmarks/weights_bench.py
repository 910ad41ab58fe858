"""Compressed weight broadcast (``ggcomm.weights.broadcast``): bytes, error and time.

Two gloo ranks on this machine; rank 0 sends a GPT's parameters (``--n-layer``,
``--n-embd``; initialized GPT-2 style, or GG-initialized with shape 1 as
``ggcomm.methods.init.apply_gg_init`` does) to rank 1, as replica initialization does:

* ``fp32`` and ``bf16``: ``torch.distributed.broadcast`` of every parameter (bf16: cast
  first), what a user does without ggcomm;
* ``rf8``: ``weights.broadcast(format="rf8")``;
* ``eg``: ``weights.broadcast(format="eg")`` at ``rel_step`` 1/16 (the default) and 1/8.

Reported per method: bits per weight on the wire, the relative error of the weights rank 1
ends with (``||w1 - w0|| / ||w0||``), the median wall time of the whole call on localhost
(``--repeats`` calls), and the time the same bytes take on a 1 Gbit/s and a 100 Mbit/s link
(bytes x 8 / rate) added to the measured localhost time: a lower bound on a shaped link.

    python benchmarks/weights_bench.py     # -> benchmarks/results/weights.md, .json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("fp32", "bf16", "rf8", "eg 1/16", "eg 1/8")
INITS = ("gpt2", "gg1")
LINKS = {"1 Gbit/s": 1e9, "100 Mbit/s": 1e8}


def build(n_layer: int, n_embd: int, init: str, seed: int) -> torch.nn.Module:
    from ggcomm.methods.init import apply_gg_init
    from ggcomm.tools.workload import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=n_layer, n_head=max(1, n_embd // 64), n_embd=n_embd,
                          block_size=256))
    if init == "gg1":
        apply_gg_init(model, 1.0, generator=torch.Generator().manual_seed(seed))
    return model


def send(model: torch.nn.Module, method: str) -> float:
    """One transfer from rank 0; returns the message bytes."""
    from ggcomm import weights

    if method in ("fp32", "bf16"):
        total = 0
        for p in model.parameters():
            t = p.detach() if method == "fp32" else p.detach().bfloat16()
            dist.broadcast(t, 0)
            if method == "bf16":
                p.data.copy_(t.float())
            total += t.numel() * t.element_size()
        return float(total)
    if method == "rf8":
        return weights.broadcast(model, 0, format="rf8")["message_bytes"]
    rel = {"eg 1/16": 1 / 16, "eg 1/8": 1 / 8}[method]
    return weights.broadcast(model, 0, format="eg", rel_step=rel)["message_bytes"]


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import ggcomm

    ggcomm.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for method in METHODS:  # untimed: numba's kernels load on their first call
        send(build(1, 64, "gpt2", rank), method)
    rows = []
    for init in INITS:
        ref = build(args.n_layer, args.n_embd, init, 0)
        w0 = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
        for method in METHODS:
            times, nbytes, err = [], 0.0, 0.0
            for _ in range(args.repeats):
                model = build(args.n_layer, args.n_embd, init, 0 if rank == 0 else 1)
                dist.barrier()
                t0 = time.perf_counter()
                nbytes = send(model, method)
                times.append(time.perf_counter() - t0)
                w1 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
                err = float((w1 - w0).norm() / w0.norm())
            rows.append({"init": init, "method": method, "n": int(w0.numel()),
                         "bytes": nbytes, "seconds": statistics.median(times), "rel_err": err})
    if rank == 1:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def report(rows: list[dict], args: argparse.Namespace) -> list[str]:
    n = rows[0]["n"]
    lines = [
        "# Compressed weight broadcast",
        "",
        f"`python benchmarks/weights_bench.py --n-layer {args.n_layer} --n-embd {args.n_embd}`"
        f": a GPT of {n:,} parameters sent from rank 0 to rank 1 (2 gloo ranks, localhost, "
        f"one thread each), median of {args.repeats} calls. Error: ||w1 - w0|| / ||w0|| of "
        "all parameters on the receiver. Link columns: the localhost time plus the "
        "message's bytes at that rate (a lower bound for a real link).",
        "",
    ]
    for init in INITS:
        mine = [r for r in rows if r["init"] == init]
        fp32 = next(r for r in mine if r["method"] == "fp32")
        title = "GPT-2 initialization" if init == "gpt2" else "GG initialization, shape 1"
        lines += [f"## {title}",
                  "", "| method | bits / weight | bytes vs fp32 | rel. error | localhost | "
                  + " | ".join(LINKS) + " |", "|---|---|---|---|---|" + "---|" * len(LINKS)]
        for r in mine:
            links = [r["seconds"] + 8 * r["bytes"] / rate for rate in LINKS.values()]
            base = [fp32["seconds"] + 8 * fp32["bytes"] / rate for rate in LINKS.values()]
            lines.append(
                f"| {r['method']} | {8 * r['bytes'] / n:.2f} | {fp32['bytes'] / r['bytes']:.1f}x "
                f"fewer | {r['rel_err']:.4f} | {r['seconds']:.2f} s | "
                + " | ".join(f"{t:.2f} s ({b / t:.1f}x)" for t, b in zip(links, base,
                                                                         strict=True)) + " |")
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-embd", type=int, default=384)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS / "weights")
    args = p.parse_args(argv)
    from ggcomm.tools.workload import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.json")
        mp.spawn(worker, args=(2, free_port(), args, out), nprocs=2, join=True)
        rows = json.loads(Path(out).read_text())
    lines = report(rows, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({
        "benchmark": "weights", "args": {k: str(v) for k, v in vars(args).items()},
        "python": sys.version.split()[0], "torch": torch.__version__,
        "platform": platform.platform(), "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
