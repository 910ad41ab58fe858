"""DiLoCo across slow links: DDP every step against DiLoCo outer steps with fp32, int8 and
EG-coded pseudo-gradients, on the GPT workload, the same tokens for every method.

For each link (localhost; test hosts joined by links shaped with ``tc tbf`` to 1 Gbit/s and
100 Mbit/s, :mod:`ggcomm.tools.testhosts`, root only), rank count and method, runs
:mod:`ggcomm.tools.train_diloco` (under torchrun on localhost, one rank per host on shaped
links) and records the loss per step, the step times (outer steps included), the bytes
each rank sent and the validation loss. Writes ``benchmarks/results/<name>.md``, ``.json``
and ``.png``: per method the validation loss against DiLoCo fp32 at the same H, bytes
against int8 and fp32 DiLoCo, the wall time, the GG shape of the pseudo-gradients, and the
time to a target loss (DDP fp32's final training loss +2%, and fp32 DiLoCo's at each H).
Runs are kept in the JSON as they finish; a second call runs only what is missing::

    python benchmarks/diloco_bench.py                        # as root, for the shaped links
    python benchmarks/diloco_bench.py --links localhost --ranks 2 --steps 100 --name t
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

from _runs import LINKS, launch, resumable, trailing_mean

from ggcomm.tools import testhosts

RESULTS = Path(__file__).resolve().parent / "results"
TRAIN = ["-m", "ggcomm.tools.train_diloco"]
TAIL = 20
MARGIN = 0.02
"""A target is a reference run's final 20-step mean training loss plus 2%: DiLoCo's loss
falls in stairs at its outer steps and flattens at the end, so at +1% the 20-step mean of
one rank's batches (which scatters about 0.5%) decides between stairs 150 steps apart."""


def methods(hs: list[int], rates: list[float],
            seg_rates: list[float] = ()) -> dict[str, list[str]]:
    """``gg<rate>``: one step for the whole pseudo-gradient (DiLoCo's default);
    ``gg<rate>seg``: a step per 64k-element segment (``--per-segment-steps``)."""
    out = {"ddp": ["--wire", "ddp"]}
    for h in hs:
        out[f"fp32-H{h}"] = ["--wire", "fp32", "--sync-every", str(h)]
        out[f"int8-H{h}"] = ["--wire", "int8", "--sync-every", str(h)]
        for r in rates:
            out[f"gg{r:g}-H{h}"] = ["--wire", "gg", "--rate", str(r), "--sync-every", str(h)]
        for r in seg_rates:
            out[f"gg{r:g}seg-H{h}"] = ["--wire", "gg", "--rate", str(r), "--sync-every", str(h),
                                      "--per-segment-steps"]
    return out


def _args(method: list[str], args: argparse.Namespace, out: Path) -> list[str]:
    return [*TRAIN, *method, "--steps", str(args.steps), "--seed", str(args.seed),
            "--threads", "1", "--log-every", str(max(1, args.steps // 4)), "--json", str(out)]


def run(link: str, ranks: int, method: list[str], args: argparse.Namespace, out: Path) -> dict:
    launch(link, ranks, _args(method, args, out), prefix="ggcdilo")
    r = json.loads(out.read_text())
    keep = ("num_parameters", "val_loss", "val_accuracy", "total_bytes_sent_per_rank",
            "total_time_s", "pseudo_gradient_gg_shape", "fp32_allreduce_bytes_per_rank")
    return {**{k: r[k] for k in keep}, "loss": r["steps"]["loss"],
            "step_time_s": r["steps"]["step_time_s"],
            "bytes_sent_per_rank": r["steps"]["bytes_sent_per_rank"]}


def smoothed(losses: list[float]) -> list[float]:
    return trailing_mean(losses, TAIL)


def reach(r: dict, target: float) -> tuple[float, int] | None:
    """Seconds of training (the run's own step times, outer steps included) and steps until
    the trailing-mean training loss first reaches ``target``; None if it never does."""
    t = 0.0
    for i, (v, dt) in enumerate(zip(smoothed(r["loss"]), r["step_time_s"], strict=True)):
        t += dt
        if i + 1 >= TAIL and v <= target:
            return t, i + 1
    return None


def _h(method: str) -> str | None:
    """``"H50"`` for ``"gg2-H50"``; None for ``"ddp"``."""
    return method.rsplit("-", 1)[1] if "-H" in method else None


def ordered(runs: dict) -> dict:
    """``runs`` as the tables show them: DDP, then per H (ascending) fp32, int8 and ggcomm
    by rate, per-segment ablations last."""
    def key(m: str) -> tuple:
        h = _h(m)
        if h is None:
            return (0,)
        name = m.rsplit("-", 1)[0]
        kind = {"fp32": 0, "int8": 1}.get(name, 3 if name.endswith("seg") else 2)
        rate = float(name.removeprefix("gg").removesuffix("seg")) if kind >= 2 else 0.0
        return (1, int(h[1:]), kind, rate)
    return {m: runs[m] for m in sorted(runs, key=key)}


def targets(runs: dict) -> dict[str, float]:
    """The losses a run is timed to: DDP's final 20-step mean training loss + ``MARGIN``,
    and each fp32 DiLoCo run's (one per H)."""
    out = {}
    for m, r in runs.items():
        if m == "ddp" or m.startswith("fp32-"):
            out[m] = smoothed(r["loss"])[-1] * (1 + MARGIN)
    return out


def _without_out(argv: list[str]) -> list[str]:
    """``argv`` less ``--out DIR`` (where this machine kept the results)."""
    out, it = [], iter(argv)
    for a in it:
        if a == "--out":
            next(it, None)  # and its value
        elif not a.startswith("--out="):
            out.append(a)
    return out


def commands(data: dict, args: argparse.Namespace) -> str:
    """The invocations that made ``data``'s runs."""
    cmds = data.get("commands") or [" ".join(
        ["--links", *args.links, "--ranks", *map(str, args.ranks), "--hs", *map(str, args.hs),
         "--rates", *(f"{r:g}" for r in args.rates),
         *(["--seg-rates", *(f"{r:g}" for r in args.seg_rates)] if args.seg_rates else [])])]
    return ", ".join(f"`python benchmarks/diloco_bench.py {c}`" for c in cmds)


def report(data: dict, args: argparse.Namespace) -> list[str]:
    lines = [
        "# DiLoCo across slow links: GPT workload, the same tokens for every method",
        "",
        "Commands (as root for the shaped links; each adds the runs it lacks to the same "
        f"file): {commands(data, args)}  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs shared by all ranks "
        f"(one torch thread each); Python {platform.python_version()}; "
        f"{time.strftime('%Y-%m-%d')}.  ",
        f"Training: `launch/train_diloco.py`, byte-level GPT, {args.steps} steps of 16 x 128 "
        "tokens per rank, inner AdamW lr 3e-3 with warm-up and cosine decay; DiLoCo's outer "
        "Nesterov SGD lr 0.7, momentum 0.9, every H steps; `ddp` is plain DDP (an fp32 "
        f"all-reduce every step). Seed {args.seed}. Methods: `ggR` codes the pseudo-gradient "
        "at R bits per element with one step for all of it (the default), `ggRseg` with a "
        "step per 64k-element segment (`--per-segment-steps`).",
        "",
        "Bytes: what each rank handed to torch.distributed over the run. Step ms: the median "
        "step (an inner step's compute; DDP's includes its all-reduce).",
        "",
        "| link | ranks | method | val loss | vs fp32 DiLoCo, same H | MB sent per rank | "
        "fewer than int8, same H | fewer than DDP | step ms | wall s | "
        "pseudo-gradient GG shape (first, last) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, runs in data["runs"].items():
        link, ranks = key.split("/")
        ddp = runs.get("ddp")
        for m, r in ordered(runs).items():
            h = _h(m)
            fp32 = runs.get(f"fp32-{h}") if h else None
            int8 = runs.get(f"int8-{h}") if h else None
            b = r["total_bytes_sent_per_rank"]
            vs = f"{100 * (r['val_loss'] / fp32['val_loss'] - 1):+.2f}%" if fp32 else "-"
            vs_int8 = f"{int8['total_bytes_sent_per_rank'] / b:.1f}x" if int8 and b else "-"
            vs_ddp = f"{ddp['total_bytes_sent_per_rank'] / b:.0f}x" if ddp and b else "-"
            shape = r.get("pseudo_gradient_gg_shape")
            sh = f"{shape['first']:.2f}, {shape['last']:.2f}" if shape else "-"
            lines.append(f"| {link} | {ranks} | {m} | {r['val_loss']:.4f} | {vs} | "
                         f"{b / 1e6:.2f} | {vs_int8} | {vs_ddp} | "
                         f"{1e3 * statistics.median(r['step_time_s']):.0f} | "
                         f"{r['total_time_s']:.0f} | {sh} |")
    lines += [
        "",
        "## Time to a target loss",
        "",
        "Seconds of training (each run's own step times, outer steps included) and steps "
        "until the 20-step mean training loss first reaches the target: DDP's final loss "
        f"+{100 * MARGIN:g}%, or fp32 DiLoCo's at one H, on the same link and rank count "
        "(not +1%: DiLoCo's loss falls in stairs at its outer steps, and on the "
        "flat end the 20-step mean's scatter of about 0.5% decides). `-`: not "
        "reached within the run.",
    ]
    for key, runs in data["runs"].items():
        link, ranks = key.split("/")
        goal = targets(runs)
        if not goal:
            continue
        lines += ["", f"{link}, {ranks} ranks:", "",
                  "| method | " + " | ".join(f"to {m}'s final +{100 * MARGIN:g}% ({v:.3f})"
                                           for m, v in goal.items()) + " |",
                  "|---|" + "---|" * len(goal)]
        for m, r in ordered(runs).items():
            cells = []
            for v in goal.values():
                got = reach(r, v)
                cells.append("-" if got is None else f"{got[0]:.0f} s ({got[1]} steps)")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", f"Plot: `{args.name}.png`."]
    return lines


def figure(data: dict):
    """Per link, rank count and H, the training loss against wall time (top) and against
    the bytes each rank sent (bottom), DDP in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for key, runs in data["runs"].items():
        runs = ordered(runs)
        for h in dict.fromkeys(_h(m) for m in runs if _h(m)) or [None]:
            panels.append((f"{key}, {h}" if h else key,
                           {m: r for m, r in runs.items() if _h(m) in (h, None)}))
    fig, axes = plt.subplots(2, len(panels), figsize=(6 * len(panels), 9), squeeze=False)
    for col, (title, runs) in enumerate(panels):
        # the view starts a tenth of the way in, past the first steps' fall
        top = max(smoothed(r["loss"])[len(r["loss"]) // 10] for r in runs.values())
        for m, r in runs.items():
            loss = smoothed(r["loss"])
            for ax, per_step, scale in ((axes[0][col], r["step_time_s"], 1.0),
                                        (axes[1][col], r["bytes_sent_per_rank"], 1e-6)):
                x, acc = [], 0.0
                for v in per_step:
                    acc += v * scale
                    x.append(acc)
                ax.plot(x, loss, label=m, lw=1, ls="--" if "seg-H" in m else "-")
        axes[0][col].set(xlabel="wall seconds", title=title)
        axes[1][col].set(xlabel="MB sent per rank (cumulative)", xscale="symlog")
        for ax in axes[:, col]:
            ax.set(ylabel="training loss (20-step mean)", ylim=(None, top))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--links", nargs="+", default=["localhost", "1gbit", "100mbit"],
                   choices=LINKS)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--hs", type=int, nargs="+", default=[10, 50])
    p.add_argument("--rates", type=float, nargs="*", default=[2.0, 2.5, 3.0])
    p.add_argument("--seg-rates", type=float, nargs="*", default=[],
                   help="also ggcomm with a step per segment at these rates (an ablation)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="diloco")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    links = list(args.links)
    if any(lk != "localhost" for lk in links) and (why := testhosts.unavailable_reason()):
        print(f"diloco_bench: no test hosts ({why}); localhost only", file=sys.stderr)
        links = ["localhost"]
    args.links = links
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    data = resumable(path, {"steps": args.steps, "seed": args.seed})
    table = methods(args.hs, args.rates, args.seg_rates)
    with tempfile.TemporaryDirectory() as tmp:
        for link in links:
            for ranks in args.ranks:
                have = data["runs"].setdefault(f"{link}/{ranks}", {})
                for m, margs in table.items():
                    if m in have:
                        continue
                    t = time.time()
                    have[m] = run(link, ranks, margs, args, Path(tmp) / "run.json")
                    print(f"{link} {ranks} ranks {m}: {time.time() - t:.0f} s", file=sys.stderr)
                    cmd = " ".join(_without_out(sys.argv[1:] if argv is None else argv))
                    if cmd not in data.setdefault("commands", []):
                        data["commands"].append(cmd)
                    path.write_text(json.dumps(data))
    lines = report(data, args)
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    figure(data).savefig(out / f"{args.name}.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
