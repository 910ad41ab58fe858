"""Loss per byte: every DDP gradient method over full training runs on the GPT workload.

Runs :mod:`ggcomm.tools.train_ddp` under torchrun (as a module) once per method and seed,
same data and steps, and writes ``benchmarks/results/<name>.md``, ``.json`` and ``.png``:

* per method and seed: final training loss (mean of the last 20 steps), validation loss and
  accuracy, each against fp32 of the same seed; bytes each rank sent per step (the run's
  total over its steps, warm-ups included; ggcomm: measured by the hook; built-in hooks:
  computed from the tensors they pass) and how many times fewer than fp32;
* which methods stay within 1% of fp32's validation loss on every seed, and the fewest
  bytes per step among them;
* steps to reach fp32's final training loss (+1%), and with ``--time-links`` (root) the
  time that takes at 100 Mbit/s and 1 Gbit/s: each method's steady-state step timed in a
  short run of the same training on test hosts joined by shaped links;
* a plot: training loss against cumulative bytes sent per rank, and final validation loss
  against bytes per step (the Pareto front).

Runs are kept in the JSON as they finish; a second call with the same ``--name`` runs only
what is missing (add methods or seeds later, or resume an interrupted study).

    python benchmarks/convergence_ddp.py [--steps 600] [--ranks 2] [--methods ...]
    python benchmarks/convergence_ddp.py --report-only --time-links 100mbit 1gbit  # as root
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _runs import launch, resumable, trailing_mean

from ggcomm.tools import testhosts

RESULTS = Path(__file__).resolve().parent / "results"
_GG_WARMUP = ["--gg-warmup-iters", "20"]  # the README's recommendation for Adam-type runs
METHODS = {
    "fp32": ["--hook", "none"],
    "fp16": ["--hook", "fp16"],
    "quant8": ["--hook", "quant8"],
    "powersgd-r1": ["--hook", "powersgd", "--psgd-rank", "1"],
    "powersgd-r4": ["--hook", "powersgd", "--psgd-rank", "4"],
    "psgd-eg-r1": ["--hook", "psgd-eg", "--psgd-rank", "1"],
    "psgd-eg-r4": ["--hook", "psgd-eg", "--psgd-rank", "4"],
    "gg-rate1.5": ["--hook", "gg", "--rate", "1.5", *_GG_WARMUP],
    "gg-rate2": ["--hook", "gg", "--rate", "2", *_GG_WARMUP],
    "gg-rate2.5": ["--hook", "gg", "--rate", "2.5", *_GG_WARMUP],
    "gg-rate3": ["--hook", "gg", "--rate", "3", *_GG_WARMUP],
    "gg-rate4": ["--hook", "gg", "--rate", "4", *_GG_WARMUP],
    "gg-rate3-nowarmup": ["--hook", "gg", "--rate", "3"],
}
LABELS = {
    "fp32": "fp32 allreduce (no hook)", "fp16": "fp16_compress_hook",
    "quant8": "quantization_pertensor_hook (uint8)",
    "powersgd-r1": "PowerSGD rank 1", "powersgd-r4": "PowerSGD rank 4",
    "psgd-eg-r1": "PowerSGD rank 1, factors EG-coded", "psgd-eg-r4":
    "PowerSGD rank 4, factors EG-coded",
    "gg-rate1.5": "ggcomm 1.5 bits", "gg-rate2": "ggcomm 2 bits",
    "gg-rate2.5": "ggcomm 2.5 bits", "gg-rate3": "ggcomm 3 bits",
    "gg-rate4": "ggcomm 4 bits", "gg-rate3-nowarmup": "ggcomm 3 bits, no rate warm-up",
}
TIME_LINKS = ("100mbit", "1gbit")
WITHIN = 0.01  # "the same model": within 1% of fp32's loss
TAIL = 20  # final training loss: mean of the last TAIL steps


def _train(method: str, steps: int, ranks: int, seed: int, out: Path, link: str) -> dict:
    argv = ["-m", "ggcomm.tools.train_ddp", *METHODS[method], "--steps", str(steps), "--seed",
            str(seed), "--threads", "1", "--log-every", "100", "--json", str(out)]
    launch(link, ranks, argv, prefix="ggcconv")
    return json.loads(out.read_text())


def run(method: str, steps: int, ranks: int, seed: int, out: Path) -> dict:
    """One training run of the study, on localhost."""
    r = _train(method, steps, ranks, seed, out, "localhost")
    # keep what the report reads: the per-step series it plots, not the hook's internals
    keep = ("num_parameters", "world_size", "fp32_allreduce_bytes_per_rank",
            "median_step_time_s", "val_loss", "val_accuracy")
    return {**{k: r[k] for k in keep},
            "loss": r["steps"]["loss"], "bytes_sent_per_rank": r["steps"]["bytes_sent_per_rank"]}


def time_step(method: str, link: str, steps: int, ranks: int, out: Path) -> float:
    """Median seconds of a steady-state step (after every warm-up, :data:`STEADY_FROM`) of
    the study's training on test hosts joined by ``link``: a short run of ``steps`` steps."""
    times = _train(method, steps, ranks, 0, out, link)["steps"]["step_time_s"]
    return statistics.median(times[STEADY_FROM:])


def smoothed(losses: list[float], window: int = TAIL) -> list[float]:
    """Trailing mean over ``window`` steps (shorter at the start)."""
    return trailing_mean(losses, window)


def final(r: dict) -> float:
    return smoothed(r["loss"])[-1]


def bytes_per_step(r: dict) -> float:
    return sum(r["bytes_sent_per_rank"]) / len(r["bytes_sent_per_rank"])


STEADY_FROM = 25
"""Steady state: the steps after every method's warm-up (PowerSGD's 10 fp32 steps,
ggcomm's 20-step rate warm-up)."""


def steady_bytes_per_step(r: dict) -> float:
    tail = r["bytes_sent_per_rank"][STEADY_FROM:] or r["bytes_sent_per_rank"]
    return sum(tail) / len(tail)


def steps_to(r: dict, target: float) -> int | None:
    """First step (1-based) whose trailing-mean training loss is at most ``target``."""
    for i, v in enumerate(smoothed(r["loss"])):
        if i + 1 >= TAIL and v <= target:
            return i + 1
    return None


def summarize(runs: dict, methods: list[str], seeds: list[int]) -> dict[str, dict]:
    """Per method, over the seeds that have both it and fp32 (a study still running, or
    extended, may have fewer seeds for some methods: the tables say how many)."""
    out = {}
    for m in methods:
        rows = []
        for s in seeds:
            have = runs.get(str(s), {})
            if m not in have or "fp32" not in have:
                continue
            r, ref = have[m], have["fp32"]
            b = bytes_per_step(r)
            rows.append(dict(
                seed=s, final_train_loss=final(r), train_vs_fp32=final(r) / final(ref) - 1,
                val_loss=r["val_loss"], val_vs_fp32=r["val_loss"] / ref["val_loss"] - 1,
                val_accuracy=r["val_accuracy"], bytes_per_step=b,
                steady_bytes_per_step=steady_bytes_per_step(r),
                fewer_than_fp32=bytes_per_step(ref) / b,
                steps_to_target=steps_to(r, final(ref) * (1 + WITHIN)),
                median_step_s=r["median_step_time_s"]))
        k = len(rows)
        mean = {key: sum(x[key] for x in rows) / k for key in
                ("final_train_loss", "train_vs_fp32", "val_loss", "val_vs_fp32",
                 "bytes_per_step", "steady_bytes_per_step", "fewer_than_fp32")}
        reached = [x["steps_to_target"] for x in rows]
        out[m] = dict(per_seed=rows, mean=mean, seeds=[x["seed"] for x in rows],
                      within_on_every_seed=all(x["val_vs_fp32"] <= WITHIN for x in rows),
                      worst_val_vs_fp32=max(x["val_vs_fp32"] for x in rows),
                      steps_to_target=None if None in reached else sum(reached) / k)
    return out


def _mean_over(s: dict, seeds: list[int]) -> dict[str, float]:
    rows = [x for x in s["per_seed"] if x["seed"] in seeds]
    return {k: sum(x[k] for x in rows) / len(rows)
            for k in ("bytes_per_step", "steady_bytes_per_step", "val_vs_fp32")}


def report(data: dict, methods: list[str], seeds: list[int], args) -> list[str]:
    summary = data["summary"]
    ranks, steps = args.ranks, args.steps
    any_run = data["runs"][str(seeds[0])]["fp32"]
    lines = [
        f"# Loss per byte: DDP gradient methods on the GPT workload, {ranks} gloo ranks",
        "",
        f"Command: `python benchmarks/convergence_ddp.py --steps {steps} --ranks {ranks} "
        f"--methods {' '.join(methods)} --seeds {' '.join(map(str, seeds))} --name "
        f"{args.name}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}.  ",
        f"Model: byte-level GPT, {any_run['num_parameters']} parameters; {steps} steps, batch "
        f"16 x 128 tokens per rank, AdamW lr 3e-3 (20 warm-up steps, cosine decay to 10%); "
        f"seeds {', '.join(map(str, seeds))} (model init and data follow the seed).  ",
        "Methods: " + "; ".join(f"`{m}` {LABELS[m]}" for m in methods) + ". PowerSGD "
        "(both kinds) sends fp32 allreduces for its first 10 iterations "
        "(`start_powerSGD_iter`); ggcomm runs start at 8 bits per element and fall to their "
        "rate over 20 iterations (`warmup_iters=20`) unless named otherwise.",
        "",
        "Final train loss is the mean of the last 20 steps. Bytes per step: what each rank "
        "handed to torch.distributed over the whole run (warm-ups included), divided by the "
        f"steps; steady: the mean from step {STEADY_FROM + 1} on, after every warm-up. "
        "'vs fp32' compares with the no-hook run of the same seed.",
        "",
        "## Summary: mean over seeds",
        "",
        "| method | seeds | bytes/rank/step | fewer than fp32 | steady bytes/step | final "
        "train loss vs fp32 | val loss vs fp32 | worst seed, val | within 1% of fp32 (val) on "
        "every seed | steps to fp32's final train loss +1% |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        s = summary[m]
        mean = s["mean"]
        stt = "not reached" if s["steps_to_target"] is None else f"{s['steps_to_target']:.0f}"
        lines.append(
            f"| {m} | {len(s['seeds'])} | {mean['bytes_per_step'] / 1e3:.1f} kB | "
            f"{mean['fewer_than_fp32']:.1f}x | {mean['steady_bytes_per_step'] / 1e3:.1f} kB | "
            f"{100 * mean['train_vs_fp32']:+.2f}% | {100 * mean['val_vs_fp32']:+.2f}% | "
            f"{100 * s['worst_val_vs_fp32']:+.2f}% | "
            f"{'yes' if s['within_on_every_seed'] else 'no'}"
            f"{'' if len(s['seeds']) == len(seeds) else ' (so far)'} | {stt} |")
    ok = [m for m in methods if summary[m]["within_on_every_seed"] and m != "fp32"
          and len(summary[m]["seeds"]) == len(seeds)]
    if ok:
        best = max(ok, key=lambda m: summary[m]["mean"]["fewer_than_fp32"])
        lines += ["", f"Fewest bytes within 1% of fp32's validation loss on every seed: "
                      f"**{best}**, {summary[best]['mean']['fewer_than_fp32']:.1f}x fewer "
                      "bytes per step than fp32."]
    pairs = [(f"powersgd-r{k}", f"psgd-eg-r{k}") for k in (1, 4)
             if f"powersgd-r{k}" in summary and f"psgd-eg-r{k}" in summary]
    if pairs:
        lines += ["", "## PowerSGD with EG-coded factors against plain PowerSGD", "",
                  "Same rank, same warm-up, the seeds both have; the EG hook codes the "
                  "factors at 4 bits per element (`ggcomm.powersgd`, rate control with "
                  "PowerSGD's own error feedback carrying the rounding).", "",
                  "| rank | PowerSGD bytes/step (steady) | with EG factors (steady) | fewer "
                  "bytes (steady) | PowerSGD val vs fp32 | with EG factors |",
                  "|---|---|---|---|---|---|"]
        for plain, coded in pairs:
            common = sorted(set(summary[plain]["seeds"]) & set(summary[coded]["seeds"]))
            a, b = (_mean_over(summary[m], common) for m in (plain, coded))
            lines.append(f"| {plain.rsplit('r', 1)[1]} | {a['bytes_per_step'] / 1e3:.1f} kB "
                         f"({a['steady_bytes_per_step'] / 1e3:.1f} kB) | "
                         f"{b['bytes_per_step'] / 1e3:.1f} kB "
                         f"({b['steady_bytes_per_step'] / 1e3:.1f} kB) | "
                         f"{a['bytes_per_step'] / b['bytes_per_step']:.1f}x "
                         f"({a['steady_bytes_per_step'] / b['steady_bytes_per_step']:.1f}x) | "
                         f"{100 * a['val_vs_fp32']:+.2f}% | {100 * b['val_vs_fp32']:+.2f}% |")
    times = data.get("step_times", {})
    links = [lk for lk in TIME_LINKS if lk in times]
    lines += ["", "## Time to fp32's final training loss (+1%) on shaped links", ""]
    if not links:
        lines.append("Not measured: step times come from `--time-links` (root, test hosts).")
    else:
        lines += [
            "Steps to the target (mean over seeds, from the runs above) times the median "
            f"steady-state step (steps {STEADY_FROM + 1} on) of a {data['time_steps']}-step "
            f"run of the same training at {ranks} ranks, one rank per test host, the hosts "
            "joined by links shaped with `tc tbf` (`ggcomm.tools.testhosts`; every byte "
            "crosses the kernel on the same CPUs that train; as root: `python "
            f"benchmarks/convergence_ddp.py --report-only --time-links {' '.join(links)} "
            f"--time-steps {data['time_steps']}` with the options above).",
            "",
            "| method | steps to target | " + " | ".join(f"step at {lk} | time at {lk}"
                                                       for lk in links) + " |",
            "|---|---|" + "---|---|" * len(links),
        ]
        for m in methods:
            n = summary[m]["steps_to_target"]
            cells = []
            for lk in links:
                t = times[lk].get(m)
                cells.append("-" if t is None else f"{1e3 * t:.0f} ms")
                cells.append("-" if t is None or n is None else f"{n * t:.0f} s")
            lines.append(f"| {m} | {'not reached' if n is None else f'{n:.0f}'} | "
                         + " | ".join(cells) + " |")
    lines += ["", "## Per seed", "",
              "| method | seed | final train loss | vs fp32 | val loss | vs fp32 | val acc | "
              "bytes/rank/step | fewer than fp32 | steps to target |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        for x in summary[m]["per_seed"]:
            stt = "-" if x["steps_to_target"] is None else str(x["steps_to_target"])
            lines.append(
                f"| {m} | {x['seed']} | {x['final_train_loss']:.4f} | "
                f"{100 * x['train_vs_fp32']:+.2f}% | {x['val_loss']:.4f} | "
                f"{100 * x['val_vs_fp32']:+.2f}% | {x['val_accuracy']:.4f} | "
                f"{x['bytes_per_step'] / 1e3:.1f} kB | {x['fewer_than_fp32']:.1f}x | {stt} |")
    lines += ["", f"Plot: `{args.name}.png`."]
    return lines


def figure(data: dict, methods: list[str], seeds: list[int]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.get_cmap("tab20").colors
    for i, m in enumerate(methods):
        c = colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20]
        r = data["runs"][str(seeds[0])][m]
        cum, acc = [], 0.0
        for v in r["bytes_sent_per_rank"]:
            acc += v
            cum.append(acc / 1e6)
        a.plot(cum, smoothed(r["loss"]), color=c, label=m, lw=1.2)
        s = data["summary"][m]
        xs = [x["bytes_per_step"] / 1e3 for x in s["per_seed"]]
        ys = [100 * x["val_vs_fp32"] for x in s["per_seed"]]
        b.scatter(xs, ys, color=c, s=18, alpha=0.6)
        b.scatter([s["mean"]["bytes_per_step"] / 1e3], [100 * s["mean"]["val_vs_fp32"]],
                  color=c, marker="D", s=50, label=f"{m} ({len(s['seeds'])} seeds)",
                  edgecolor="k")
    a.set(xscale="log", xlabel="cumulative MB sent per rank", ylabel="training loss (20-step "
          f"mean), seed {seeds[0]}", title="Loss against bytes sent")
    a.set_ylim(top=3.2)
    a.legend(fontsize=7)
    # the Pareto front of the means: nothing else has fewer bytes and a lower loss
    pts = sorted((data["summary"][m]["mean"]["bytes_per_step"] / 1e3,
                  100 * data["summary"][m]["mean"]["val_vs_fp32"]) for m in methods)
    front, best = [], math.inf
    for x, y in pts:
        if y < best:
            front.append((x, y))
            best = y
    b.plot(*zip(*front, strict=True), "k--", lw=0.8, label="Pareto front (means)")
    b.axhspan(-1, 1, color="0.9", zorder=0, label="within 1% of fp32")
    b.set(xscale="log", xlabel="bytes per rank per step (kB)",
          ylabel="validation loss vs fp32 of the same seed (%)",
          title="Final validation loss against bytes (dots: seeds, diamonds: means)")
    b.legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--name", default="convergence_ddp", help="results file name (no suffix)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--report-only", action="store_true",
                   help="run no training: report the runs already in the JSON "
                   "(--time-links still times)")
    p.add_argument("--time-links", nargs="+", default=[], choices=TIME_LINKS,
                   help="also time each method's step on test hosts joined by these shaped "
                   "links (root)")
    p.add_argument("--time-steps", type=int, default=45,
                   help=f"steps of each timing run (the median is over steps "
                   f"{STEADY_FROM + 1} on)")
    args = p.parse_args(argv)
    if args.time_links and (why := testhosts.unavailable_reason()):
        p.error(f"--time-links needs test hosts: {why}")
    methods = ["fp32"] + [m for m in args.methods if m != "fp32"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    data = resumable(path, {"steps": args.steps, "ranks": args.ranks})
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for m in methods:
                have = data["runs"].setdefault(str(seed), {})
                if m in have or args.report_only:
                    continue
                t = time.time()
                have[m] = run(m, args.steps, args.ranks, seed, Path(tmp) / f"{m}.json")
                print(f"{m} seed {seed}: {time.time() - t:.0f} s", file=sys.stderr)
                path.write_text(json.dumps(data))  # kept as it goes: resumable
        times = data.setdefault("step_times", {})
        for link in args.time_links:
            if data.get("time_steps", args.time_steps) != args.time_steps:
                raise SystemExit(f"{path}: step times were measured over {data['time_steps']} "
                                 f"steps, not {args.time_steps}")
            data["time_steps"] = args.time_steps
            for m in methods:
                if m in times.setdefault(link, {}):
                    continue
                times[link][m] = time_step(m, link, args.time_steps, args.ranks,
                                           Path(tmp) / f"time-{m}.json")
                print(f"{m} on {link}: {1e3 * times[link][m]:.0f} ms per step", file=sys.stderr)
                path.write_text(json.dumps(data))
    done = [m for m in methods if any(m in data["runs"].get(str(s), {}) and "fp32" in
                                      data["runs"][str(s)] for s in args.seeds)]
    data["summary"] = summarize(data["runs"], done, args.seeds)
    path.write_text(json.dumps(data))
    lines = report(data, done, args.seeds, args)
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    figure(data, done, args.seeds).savefig(out / f"{args.name}.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
