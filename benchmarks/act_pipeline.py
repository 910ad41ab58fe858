"""ACT on a real pipeline link: the GPT as a 2-stage DeepSpeed pipeline, ggcomm on the link,
with and without ACT on the stage boundary.

Runs :mod:`ggcomm.tools.train_pipe` under torchrun once per lambda and seed. Every run sends
its boundary activations (and their gradients) through the ggcomm DeepSpeed plugin at a
step relative to each tensor's RMS (``--rel-step``, the same as ACT's), so bits fall when
ACT reshapes the activations; lambda 0 is the same run without ACT, and ``fp32`` the run
with DeepSpeed's own uncompressed sends, for the loss the codec itself costs. Writes
``benchmarks/results/act_pipeline.md``, ``.json`` and ``.png``: activation bits per element
actually sent over the link, training and validation loss, validation next-token accuracy.

    python benchmarks/act_pipeline.py [--steps 300] [--lams 0 0.01 0.03 0.1] [--seeds 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _runs import resumable, trailing_mean

from ggcomm.tools.workload import free_port

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def run(lam: float | None, args: argparse.Namespace, seed: int, out: Path) -> dict:
    """One pipeline training; ``lam`` None: DeepSpeed's own fp32 sends, no ACT."""
    link = ["--compress", "none"] if lam is None else \
        ["--compress", "gg", "--rel-step", str(args.rel_step)]
    act = [] if not lam else ["--act-lam", str(lam), "--act-rel-step", str(args.rel_step),
                              "--act-warmup-steps", str(args.steps // 4)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(ROOT / "launch" / "train_pipe.py"), *link,
           *act, "--steps", str(args.steps), "--seed", str(seed), "--threads", "1",
           "--log-every", "50", "--json", str(out)]
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    subprocess.run(cmd, check=True, env=env)
    r = json.loads(out.read_text())
    return {k: r[k] for k in ("activation_bits_per_element", "gradient_bits_per_element",
                              "final_train_loss", "val_loss", "val_accuracy",
                              "median_step_time_s", "boundary_elements", "steps")}


def label(lam: float | None) -> str:
    return "fp32 link (no codec)" if lam is None else \
        ("ggcomm link, no ACT" if lam == 0 else f"ggcomm link, ACT lambda {lam:g}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lams", type=float, nargs="+", default=[0.0, 0.01, 0.03, 0.1])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--rel-step", type=float, default=0.05,
                   help="the link's and ACT's step, times each tensor's RMS")
    p.add_argument("--name", default="act_pipeline")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if 0.0 not in args.lams:
        p.error("--lams needs 0 (the run without ACT every other one is compared with)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    data = resumable(path, {"steps": args.steps, "rel_step": args.rel_step})
    keys = [None, *args.lams]
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for lam in keys:
                have = data["runs"].setdefault(str(seed), {})
                if str(lam) in have:
                    continue
                t = time.time()
                have[str(lam)] = run(lam, args, seed, Path(tmp) / "run.json")
                print(f"{label(lam)}, seed {seed}: {time.time() - t:.0f} s", file=sys.stderr)
                path.write_text(json.dumps(data))

    lines = [
        "# ACT on a pipeline link: GPT in 2 DeepSpeed stages, ggcomm on the boundary",
        "",
        f"Command: `python benchmarks/act_pipeline.py --steps {args.steps} --lams "
        f"{' '.join(f'{v:g}' for v in args.lams)} --seeds {' '.join(map(str, args.seeds))}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}.  ",
        f"Training: `launch/train_pipe.py`, byte-level GPT (4 layers, width 128) cut into 2 "
        f"stages by DeepSpeed's PipelineModule (gloo, one rank per stage), {args.steps} steps "
        "of 4 micro-batches x 8 sequences x 128 tokens, AdamW lr 3e-3. The link: the ggcomm "
        f"DeepSpeed plugin (`ggcomm.deepspeed.enable`) at step {args.rel_step:g} x each "
        "tensor's RMS, both ways; ACT (`ggcomm.methods.act.ACT`, `inject=True`) taps the "
        "last layer of stage 0 with the same relative step, its lambda rising from 0 over "
        f"the first {args.steps // 4} steps.",
        "",
        "Activation bits per element: the bytes the plugin handed to torch.distributed for "
        "the boundary activations (frames and headers), per element, mean over steps 2 "
        "onwards and over the last 50 steps. Final train loss: mean of the last 10 steps; "
        "validation over 16 fixed micro-batches.",
        "",
        "| link | seed | activation bits/elem (run) | (last 50 steps) | vs no ACT | gradient "
        "bits/elem | final train loss | val loss | vs no ACT | val acc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary: dict[str, dict] = {}
    for seed in args.seeds:
        runs = data["runs"][str(seed)]
        base = runs.get("0.0") or runs.get("0")
        for lam in keys:
            r = runs[str(lam)]
            tail = [8 * b / r["boundary_elements"] for b in r["steps"]["activation_bytes"][-50:]]
            last = statistics.fmean(tail)
            if lam is None:
                bits_vs = val_vs = "-"
            else:
                base_tail = statistics.fmean(
                    8 * b / base["boundary_elements"]
                    for b in base["steps"]["activation_bytes"][-50:])
                bits_vs = f"{last / base_tail:.2f}x"
                val_vs = f"{100 * (r['val_loss'] / base['val_loss'] - 1):+.2f}%"
            lines.append(
                f"| {label(lam)} | {seed} | {r['activation_bits_per_element']:.2f} | "
                f"{last:.2f} | {bits_vs} | {r['gradient_bits_per_element']:.2f} | "
                f"{r['final_train_loss']:.4f} | {r['val_loss']:.4f} | {val_vs} | "
                f"{r['val_accuracy']:.4f} |")
            summary.setdefault(str(lam), {})[str(seed)] = {"last50_bits": last}
    lines += ["", f"Plot: `{args.name}.png` (activation bits per element sent, per step; "
              "training loss)."]
    data["summary"] = summary
    path.write_text(json.dumps(data))
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    runs = data["runs"][str(args.seeds[0])]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, lam in enumerate(keys):
        r, c = runs[str(lam)], colors[i % len(colors)]
        if lam is not None:
            a.plot([8 * v / r["boundary_elements"] for v in r["steps"]["activation_bytes"]],
                   label=label(lam), lw=1, color=c)
        loss = r["steps"]["loss"]
        b.plot(trailing_mean(loss, 10),
               label=label(lam), lw=1, color=c)
    a.set(xlabel="step", ylabel="activation bits per element sent",
          title="Boundary activations on the wire")
    b.set(xlabel="step", ylabel="training loss (10-step mean)", title="Loss", ylim=(None, 3.5))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{args.name}.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
