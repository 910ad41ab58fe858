"""Pipeline parallelism over shaped links: the GPT workload as a 2-stage DeepSpeed pipeline,
stage links uncompressed and through ggcomm at several rates, side by side.

For each link (localhost; and two test hosts joined by a link shaped with ``tc tbf`` to
1 Gbit/s and 100 Mbit/s, made by :mod:`ggcomm.tools.testhosts`, which needs root) and each
method, runs :mod:`ggcomm.tools.train_pipe` on 2 ranks (``python -m``: under torchrun on
localhost, one rank per host on shaped links) and records the median step time, the bytes per
micro-batch each way across the stage boundary (activations forward, their gradients
backward), and the final training and validation loss. Writes
``benchmarks/results/pipeline.md`` and ``.json`` (``--quick``: ``pipeline-quick.*``)::

    python benchmarks/pipeline_bench.py                      # as root, for the shaped links
    python benchmarks/pipeline_bench.py --links localhost --quick
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

from ggcomm.tools import testhosts
from ggcomm.tools.workload import free_port

RESULTS = Path(__file__).resolve().parent / "results"
TRAIN = ["-m", "ggcomm.tools.train_pipe"]
METHODS = {
    "none": ["--compress", "none"],
    "gg-rate6": ["--compress", "gg", "--rate", "6"],
    "gg-rate4": ["--compress", "gg", "--rate", "4"],
    "gg-rate3": ["--compress", "gg", "--rate", "3"],
}
LINKS = ("localhost", "1gbit", "100mbit")


def _train_args(method: str, args: argparse.Namespace, out: Path) -> list[str]:
    return [*TRAIN, *METHODS[method], "--steps", str(args.steps), "--threads", "1",
            "--micro-batches", str(args.micro_batches), "--log-every", str(args.steps),
            "--seed", str(args.seed), "--json", str(out)]


def run_localhost(method: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", *_train_args(method, args, out)]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def run_hosts(hosts, method: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, *_train_args(method, args, out)]
    procs = [hosts.popen(i, cmd) for i in range(2)]
    codes = [p.wait(timeout=1800) for p in procs]
    if any(codes):
        raise RuntimeError(f"{method} on {hosts.rate}: ranks exited with {codes}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--links", nargs="+", default=list(LINKS), choices=LINKS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="6 steps, results to pipeline-quick.*")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.quick:
        args.steps = 6

    links = list(args.links)
    shaped = [link for link in links if link != "localhost"]
    if shaped and (why := testhosts.unavailable_reason()):
        print(f"pipeline_bench: no test hosts ({why}); running on localhost only",
              file=sys.stderr)
        links = ["localhost"]

    runs: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for link in links:
            for m in args.methods:
                out = Path(tmp) / f"{link}-{m}.json"
                t = time.time()
                if link == "localhost":
                    r = run_localhost(m, args, out)
                else:
                    with testhosts.TestHosts(2, rate=link, prefix="ggcpipe") as hosts:
                        r = run_hosts(hosts, m, args, out)
                runs.setdefault(link, {})[m] = r
                print(f"{link} {m}: {time.time() - t:.0f} s", file=sys.stderr)

    any_run = next(iter(next(iter(runs.values())).values()))
    elements = any_run["boundary_elements"]
    cmd = "python benchmarks/pipeline_bench.py" + (" --quick" if args.quick else "")
    lines = [
        "# Pipeline parallelism over shaped links: 2-stage DeepSpeed pipeline, GPT workload",
        "",
        f"Command: `{cmd}` (as root for the shaped links)  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs shared by both ranks "
        f"(one torch thread each); Python {platform.python_version()}; "
        f"{time.strftime('%Y-%m-%d')}.  ",
        f"Workload: byte-level GPT (4 layers, width 128) cut into 2 stages after block 2; "
        f"{args.steps} steps of {args.micro_batches} micro-batches of 8 x 128 tokens; AdamW "
        f"lr 3e-3; seed {args.seed}. Each micro-batch sends one {elements}-element float32 "
        f"activation forward and its gradient backward ({4 * elements / 1e3:.0f} kB raw).  ",
        "Links: `localhost` is loopback; `1gbit` and `100mbit` are two network namespaces "
        "joined through a bridge, every link shaped with `tc tbf` (`launch/testhosts.py`; no "
        "latency emulation).",
        "",
        "| link | method | median step ms | speed-up vs none | activations kB/micro-batch | "
        "gradients kB/micro-batch | act bits/elem | grad bits/elem | fewer bytes | "
        "final train loss | val loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for link, by_method in runs.items():
        base = by_method.get("none")
        for m, r in by_method.items():
            t = r["median_step_time_s"]
            speed = f"{base['median_step_time_s'] / t:.2f}x" if base else ""
            raw = 2 * r["raw_bytes_per_microbatch"]
            wire = r["activation_bytes_per_microbatch"] + r["gradient_bytes_per_microbatch"]
            lines.append(
                f"| {link} | {m} | {1e3 * t:.0f} | {speed} | "
                f"{r['activation_bytes_per_microbatch'] / 1e3:.1f} | "
                f"{r['gradient_bytes_per_microbatch'] / 1e3:.1f} | "
                f"{r['activation_bits_per_element']:.2f} | {r['gradient_bits_per_element']:.2f} | "
                f"{raw / wire:.1f}x | {r['final_train_loss']:.4f} | {r['val_loss']:.4f} |")
    lines += [
        "",
        "Bytes are what crossed the stage boundary per micro-batch (`none`: the float tensors "
        "DeepSpeed sends; ggcomm: every byte handed to torch.distributed, 16-byte preambles and "
        "frame headers included), averaged over steps 2 onwards. Final train loss is the mean "
        "over the last 10 steps; validation loss over 4 fixed batches. Activations and their "
        "gradients are quantized without error feedback, so lower rates trade loss for bytes.",
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "pipeline-quick" if args.quick else "pipeline"
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps(runs, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
