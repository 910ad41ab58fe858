"""The report of ``ggcomm bench``: growth of bytes with ranks, target verdicts, markdown, plots.

Everything here reads the benchmark's result, the dict that :func:`ggcomm.tools.bench.run`
returns and writes as ``ddp_bench.json``, and nothing else: a committed result renders again
without running anything::

    from ggcomm.tools import report
    result = json.loads(Path("benchmarks/results/ddp_bench.json").read_text())
    print(report.markdown(result))

:func:`write` turns the runner's measurements into the result (targets' verdicts, bytes growth
and plot names added) and writes its four files: ``ddp_bench.json``, ``ddp_bench.md`` (tables
and the targets' verdicts), ``ddp_bench-step_time.png`` (step time against link speed, per
method) and ``ddp_bench-loss_vs_bytes.png`` (final loss against bytes sent); ``--quick`` names
end in ``-quick``. The targets (:data:`TARGETS`) are reported, not enforced.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .bench import GPT_BATCH, LINKS, LR_WARMUP_FRACTION, METHODS, WORKLOADS
from .testhosts import parse_rate

NAME = "ddp_bench"

# What the markdown checks the results against (reported, not enforced).
TARGET_WORKLOAD = "mlp"
TARGET_BITS = 3
# per link: (speed-up over fp32 allreduce, must it also beat the fp16 hook)
TARGET_SPEEDUPS = {"1gbit": (1.8, True), "100mbit": (5.0, False)}
TARGET_GROWTH = 1.2
# Two final losses this close (relative) count as equal for the bytes-at-equal-loss target:
# runs of a few dozen steps differ by about this much from batch noise alone.
EQUAL_LOSS_REL_TOL = 0.01


def _speed_statement(link: str) -> str:
    speedup, vs_fp16 = TARGET_SPEEDUPS[link]
    return (f"at {link} on the {TARGET_WORKLOAD} workload, ggcomm at {TARGET_BITS} bits gives a "
            f"step >= {speedup:g}x faster than fp32 allreduce"
            + (" and faster than the fp16 hook" if vs_fp16 else ""))


TARGETS = {
    **{f"speed_{link}": _speed_statement(link) for link in TARGET_SPEEDUPS},
    "bytes_at_equal_loss": "at equal final loss ggcomm sends fewer bytes than the uint8 "
    "quantization hook",
    "reduce_scatter_growth": f"with reduce_scatter, bytes per rank at 4 ranks within "
    f"{TARGET_GROWTH:g}x of those at 2 ranks",
}


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def output_paths(out: Path, quick: bool) -> dict[str, Path]:
    """The benchmark's files under ``out``: ``json``, ``md``, ``step_time`` and
    ``loss_vs_bytes`` (the plots); ``quick`` names end in ``-quick``."""
    suffix = "-quick" if quick else ""
    return {
        "json": out / f"{NAME}{suffix}.json",
        "md": out / f"{NAME}{suffix}.md",
        "step_time": out / f"{NAME}-step_time{suffix}.png",
        "loss_vs_bytes": out / f"{NAME}-loss_vs_bytes{suffix}.png",
    }


def write(measured: dict[str, Any], out: Path, quick: bool) -> dict[str, Any]:
    """The result of a benchmark: ``measured`` (the runner's record, its runs under ``runs``)
    with the targets' verdicts, bytes growth and plot names added ahead of the runs; written
    under ``out`` as JSON, markdown and two plots (none when no run finished)."""
    paths = output_paths(out, quick)
    records = measured["runs"]
    result = {k: v for k, v in measured.items() if k != "runs"}
    result.update(
        targets=evaluate_targets(records),
        growth=growth(records),
        plots={k: paths[k].name for k in ("step_time", "loss_vs_bytes")},
        runs=records,
    )
    out.mkdir(parents=True, exist_ok=True)
    if records:
        plot(result, paths["step_time"], paths["loss_vs_bytes"])
    paths["md"].write_text(markdown(result))
    paths["json"].write_text(json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------------------------------------
# Across runs
# ---------------------------------------------------------------------------------------------


def _index(records: Sequence[dict]) -> dict[tuple[str, str, int, str], dict]:
    return {(r["workload"], r["link"], r["ranks"], r["method"]): r for r in records}


def _reference_link(records: Sequence[dict], workload: str, ranks: int) -> str | None:
    """The link whose runs stand for bytes and loss (they do not depend on the link):
    the fastest one measured, localhost when it ran."""
    links = {r["link"] for r in records if r["workload"] == workload and r["ranks"] == ranks}
    return next((link for link in LINKS if link in links), None)


def growth(records: Sequence[dict]) -> list[dict[str, Any]]:
    """Bytes per rank per step at the most and the fewest ranks measured, per workload and
    method, and their ratio (on each one's reference link)."""
    idx = _index(records)
    out = []
    for workload in WORKLOADS:
        ranks = sorted({r["ranks"] for r in records if r["workload"] == workload})
        if len(ranks) < 2:
            continue
        lo, hi = ranks[0], ranks[-1]
        link_lo, link_hi = (
            _reference_link(records, workload, lo),
            _reference_link(records, workload, hi),
        )
        for m in METHODS:
            a, b = idx.get((workload, link_lo, lo, m)), idx.get((workload, link_hi, hi, m))
            if a and b:
                out.append(
                    {
                        "workload": workload,
                        "method": m,
                        "ranks": [lo, hi],
                        "bytes_per_rank": [a["bytes_per_rank"], b["bytes_per_rank"]],
                        "ratio": b["bytes_per_rank"] / a["bytes_per_rank"],
                    }
                )
    return out


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------


def _target(name: str, details: list[str], verdicts: list[bool], missing: str) -> dict[str, Any]:
    """A target's entry: what was measured (``missing`` when nothing was) and whether it is
    met everywhere it was measured (``None``: nowhere)."""
    return {
        "target": name,
        "statement": TARGETS[name],
        "measured": "; ".join(details) or missing,
        "met": all(verdicts) if verdicts else None,
    }


def _speed_target(idx: dict, records: Sequence[dict], link: str) -> dict[str, Any]:
    """Speed on ``link``: per rank count, the faster of the two exchanges."""
    target, vs_fp16 = TARGET_SPEEDUPS[link]
    details, verdicts = [], []
    for ranks in sorted({r["ranks"] for r in records}):
        key = (TARGET_WORKLOAD, link, ranks)
        fp32, fp16 = idx.get((*key, "fp32")), idx.get((*key, "fp16"))
        ggs = [idx.get((*key, f"gg{TARGET_BITS}-{x}")) for x in ("allgather", "reduce_scatter")]
        ggs = [g for g in ggs if g]
        if not (fp32 and ggs and (fp16 or not vs_fp16)):
            continue
        best = min(ggs, key=lambda g: g["median_step_s"])
        speedup = fp32["median_step_s"] / best["median_step_s"]
        verdicts.append(
            speedup >= target and (not vs_fp16 or best["median_step_s"] < fp16["median_step_s"])
        )
        details.append(
            f"{ranks} ranks: {best['method']} {1e3 * best['median_step_s']:.0f} ms vs fp32 "
            f"{1e3 * fp32['median_step_s']:.0f} ms ({speedup:.2f}x)"
            + (f" and fp16 {1e3 * fp16['median_step_s']:.0f} ms" if fp16 else "")
            + ("" if verdicts[-1] else _speed_limit(
                idx, best, min(fp32["median_step_s"] / target,
                               fp16["median_step_s"] if vs_fp16 else math.inf)))
        )
    missing = (f"needs fp32{', fp16' if vs_fp16 else ''} and a gg{TARGET_BITS} method on "
               f"{link}, {TARGET_WORKLOAD} workload")
    return _target(f"speed_{link}", details, verdicts, missing)


def _speed_limit(idx: dict, best: dict, need_s: float) -> str:
    """What keeps ``best`` (a gg run that missed its speed target) from a step of ``need_s``,
    from the same benchmark's runs: its step on loopback, where no link is in the way, and
    the time its bytes take to cross the link at the link's rate."""
    loop = idx.get((best["workload"], "localhost", best["ranks"], best["method"]))
    rate = parse_rate(best["link"])
    if loop is None or rate is None:
        return ""
    loop_s = loop["median_step_s"]
    wire_s = 8 * best["bytes_per_rank"] / rate
    notes = []
    if loop.get("encode_s_per_step") is not None and loop.get("decode_s_per_step") is not None:
        notes.append(f"encode {1e3 * loop['encode_s_per_step']:.0f} ms and decode "
                     f"{1e3 * loop['decode_s_per_step']:.0f} ms of it")
    fp32_loop = idx.get((best["workload"], "localhost", best["ranks"], "fp32"))
    if fp32_loop:
        notes.append(f"fp32 takes {1e3 * fp32_loop['median_step_s']:.0f} ms there")
    notes_text = f" ({'; '.join(notes)})" if notes else ""
    text = (f"; what limits it: the target needs a step of at most {1e3 * need_s:.0f} ms, "
            f"{best['method']} takes {1e3 * loop_s:.0f} ms on loopback{notes_text} and its "
            f"{best['bytes_per_rank'] / 1e6:.2f} MB per rank take {1e3 * wire_s:.0f} ms to cross "
            f"{best['link']}")
    if loop_s >= need_s:
        return text + (", so the step is over the target with no link at all: compute and "
                       "the codec, on the CPUs the ranks share, limit it")
    rest = best["median_step_s"] - loop_s - wire_s
    return text + (f", {1e3 * (loop_s + wire_s):.0f} ms together; the other "
                   f"{1e3 * max(rest, 0.0):.0f} ms are time on the link beyond its bytes' "
                   "transfer time, which this benchmark does not split further")


def _equal_loss_target(idx: dict, records: Sequence[dict]) -> dict[str, Any]:
    """Bytes at equal loss: per workload and rank count, on the reference link."""
    details, verdicts = [], []
    for workload in WORKLOADS:
        for ranks in sorted({r["ranks"] for r in records if r["workload"] == workload}):
            link = _reference_link(records, workload, ranks)
            q = idx.get((workload, link, ranks, "quant8"))
            ggs = [
                r
                for (w, lk, n, m), r in idx.items()
                if (w, lk, n) == (workload, link, ranks) and m.startswith("gg")
            ]
            if not q or not ggs or q["final_loss"] is None:
                continue
            limit = q["final_loss"] * (1 + EQUAL_LOSS_REL_TOL)
            equal = [g for g in ggs if g["final_loss"] is not None and g["final_loss"] <= limit]
            if not equal:
                verdicts.append(False)
                details.append(
                    f"{workload}, {ranks} ranks: no ggcomm run reaches quant8's loss "
                    f"{q['final_loss']:.4f} (+{100 * EQUAL_LOSS_REL_TOL:g}%)"
                )
                continue
            best = min(equal, key=lambda g: g["bytes_per_rank"])
            verdicts.append(best["bytes_per_rank"] < q["bytes_per_rank"])
            details.append(
                f"{workload}, {ranks} ranks: {best['method']} loss {best['final_loss']:.4f}, "
                f"{best['bytes_per_rank'] / 1e3:.1f} kB vs quant8 loss {q['final_loss']:.4f}, "
                f"{q['bytes_per_rank'] / 1e3:.1f} kB "
                f"({q['bytes_per_rank'] / best['bytes_per_rank']:.2f}x fewer)"
            )
    return _target("bytes_at_equal_loss", details, verdicts, "needs quant8 and ggcomm runs")


def _growth_target(records: Sequence[dict]) -> dict[str, Any]:
    """reduce_scatter's growth of bytes per rank from 2 to 4 ranks."""
    details, verdicts = [], []
    for g in growth(records):
        if g["method"].endswith("reduce_scatter") and g["ranks"] == [2, 4]:
            verdicts.append(g["ratio"] <= TARGET_GROWTH)
            details.append(f"{g['workload']} {g['method']}: {g['ratio']:.2f}x")
    missing = "needs a gg reduce_scatter method at 2 and 4 ranks"
    return _target("reduce_scatter_growth", details, verdicts, missing)


def evaluate_targets(records: Sequence[dict]) -> list[dict[str, Any]]:
    """Each target of :data:`TARGETS`: what was measured, and whether it is met (``None``: the
    runs it needs were not in the benchmark)."""
    idx = _index(records)
    return [
        *(_speed_target(idx, records, link) for link in TARGET_SPEEDUPS),
        _equal_loss_target(idx, records),
        _growth_target(records),
    ]


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "not measured"}[met]


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _methods_run(result: dict[str, Any]) -> list[str]:
    """The methods asked for that have at least one run, in the matrix's order."""
    records = result["runs"]
    return [m for m in result["config"]["methods"] if any(r["method"] == m for r in records)]


def _setup_lines(result: dict[str, Any]) -> list[str]:
    """Title, command, machine, run length, workloads, methods and links."""
    cfg, machine, records = result["config"], result["machine"], result["runs"]
    gpus = f", GPUs: {', '.join(machine['gpus'])}" if machine.get("gpus") else ""
    lines = [
        "# DDP gradient communication: methods side by side",
        "",
        f"Command: `{cfg['command']}`  ",
        f"Machine: {machine['processor']}, {machine['cpus']} logical CPUs; Python "
        f"{machine['python']}, torch {machine['torch']}; backend {machine['backend']}{gpus}; "
        f"{cfg['threads']} torch and codec thread(s) per rank; load average "
        f"{', '.join(f'{x:.1f}' for x in machine['load_average_start'] or [])} at the start, "
        f"{', '.join(f'{x:.1f}' for x in result.get('load_average_end') or [])} at the end; "
        f"{result['date']}; {result['wall_s'] / 60:.1f} min.  ",
        f"Runs: {cfg['steps']} steps each (AdamW lr 3e-3: linear warm-up over the first "
        f"{LR_WARMUP_FRACTION:.0%} of the steps, then cosine decay; `launch/train_ddp.py`), "
        f"seed {cfg['seed']}; medians and means over the steady steps: "
        f"step 1 left out for every method (DDP's bucket rebuild; ggcomm sends it "
        "uncompressed)"
        + (
            f", PowerSGD's first {cfg['psgd_start']} steps (its fp32 warm-up)"
            if any(m.startswith(("powersgd", "psgd-eg")) for m in cfg["methods"])
            else ""
        )
        + (
            f" and, after step 1, ggcomm's rate warm-up of {cfg['gg_warmup']} step(s) (from 8 "
            "bits per element down to its rate, for AdamW).  "
            if cfg["gg_warmup"]
            else ".  "
        ),
    ]
    for w in _workloads_run(result):
        n = next(r["num_parameters"] for r in records if r["workload"] == w)
        if w == "mlp":
            desc = f"{WORKLOADS[w]}, width {cfg['mlp_width']}, batch 16 per rank"
        elif cfg["quick"]:
            desc = f"{WORKLOADS[w]}, batch 4 x 32 tokens per rank"
        else:
            desc = f"{WORKLOADS[w]}, batch {GPT_BATCH} x 128 tokens per rank"
        lines.append(
            f"Workload `{w}`: {desc}; {n / 1e6:.2f}M parameters, "
            f"{_fmt_bytes(4 * n)} of fp32 gradients.  "
        )
    ran = _methods_run(result)
    lines.append(
        "Methods: " + "; ".join(f"`{m}` {METHODS[m].label}" for m in ran) + ".  "
        if ran
        else "Methods: none finished.  "
    )
    lines.append(
        "Links: `localhost` is loopback; shaped links are one network namespace per rank joined "
        "by a bridge, each link shaped with `tc tbf` both ways (`launch/testhosts.py`; no latency "
        "emulation; every byte crosses the kernel on the same CPUs that train)."
    )
    for note in result["notes"]:
        lines += ["", f"Note: {note}"]
    for f in result["failures"]:
        lines += ["", f"**Failed:** {f['error'].splitlines()[0]}"]
    return lines


def _workloads_run(result: dict[str, Any]) -> list[str]:
    records = result["runs"]
    return [w for w in result["config"]["workloads"] if any(r["workload"] == w for r in records)]


def _target_lines(result: dict[str, Any]) -> list[str]:
    lines = ["", "## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['statement']} | {t['measured']} | {_verdict(t['met'])} |")
    lines += [
        "",
        "Speed: the faster of the two exchanges per rank count. Equal loss: ggcomm runs whose "
        f"final loss is at most {100 * EQUAL_LOSS_REL_TOL:g}% above quant8's, the cheapest of "
        "them. Growth: any bandwidth-optimal allreduce sends 2 (N - 1) / N times its "
        "message per rank, 1.5x more at 4 ranks than at 2 (fp32's own growth below), so "
        "growth under 1.5x needs a message that shrinks with the number of ranks.",
    ]
    return lines


def _bytes_lines(result: dict[str, Any], w: str, idx: dict) -> list[str]:
    """Workload ``w``'s bytes per rank, fewer than fp32 and final loss per rank count (on the
    reference links), and the growth of bytes from the fewest to the most ranks."""
    cfg, records = result["config"], result["runs"]
    ranks = [n for n in cfg["ranks"] if _reference_link(records, w, n)]
    grow = {g["method"]: g for g in result["growth"] if g["workload"] == w}
    head = ["method"]
    for n in ranks:
        head += [
            f"bytes/rank/step, {n} ranks",
            f"fewer than fp32, {n} ranks",
            f"final loss, {n} ranks",
        ]
    if grow:
        head.append(f"bytes growth {ranks[0]} -> {ranks[-1]} ranks")
    refs = ", ".join(f"{n} ranks: {_reference_link(records, w, n)}" for n in ranks)
    lines = [
        "",
        f"## `{w}`: bytes each rank sends per step, and final loss",
        "",
        f"From the runs on the fastest link measured ({refs}); neither depends on the link.",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---|" * (len(head) - 1),
    ]
    for m in _methods_run(result):
        cells = [m]
        for n in ranks:
            r = idx.get((w, _reference_link(records, w, n), n, m))
            if not r:
                cells += ["", "", ""]
                continue
            fewer = 1 / r["bytes_vs_fp32"] if r["bytes_vs_fp32"] else float("nan")
            loss = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "n/a"
            cells += [_fmt_bytes(r["bytes_per_rank"]), f"{fewer:.1f}x", loss]
        if grow:
            cells.append(f"{grow[m]['ratio']:.2f}x" if m in grow else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _workload_lines(result: dict[str, Any], w: str, idx: dict) -> list[str]:
    """Workload ``w``'s step times, bytes and loss, and ggcomm's codec time."""
    cfg, records = result["config"], result["runs"]

    def step_cell(r: dict) -> str:
        base = idx.get((r["workload"], r["link"], r["ranks"], "fp32"))
        speed = f" ({base['median_step_s'] / r['median_step_s']:.2f}x)" if base else ""
        return f"{1e3 * r['median_step_s']:.0f}{speed}"

    def codec_cell(r: dict) -> str:
        if r["codec_share"] is None:
            return ""
        codec = r["encode_s_per_step"] + r["decode_s_per_step"]
        return f"{1e3 * codec:.1f} ({100 * r['codec_share']:.0f}%)"

    cols = [
        (n, link)
        for n in cfg["ranks"]
        for link in cfg["links_run"]
        if any((w, link, n) == (r["workload"], r["link"], r["ranks"]) for r in records)
    ]
    if not cols:
        return []
    methods = _methods_run(result)
    title = f"`{w}`: median step time, ms (speed-up vs fp32 on the same link)"
    lines = _link_table(title, w, cols, methods, idx, step_cell)
    lines += _bytes_lines(result, w, idx)
    gg = [m for m in methods if m.startswith("gg")]
    if gg:
        title = f"`{w}`: ggcomm encode + decode per step, ms (share of the step time)"
        lines += _link_table(title, w, cols, gg, idx, codec_cell)
    return lines


def _link_table(
    title: str, workload: str, cols: list[tuple[int, str]], methods: list[str], idx: dict, cell: Any
) -> list[str]:
    """A markdown section: one row per method, one column per (ranks, link), cells from
    ``cell(record)`` (empty where the run is missing)."""
    lines = [
        "",
        f"## {title}",
        "",
        "| method | " + " | ".join(f"{n} ranks, {link}" for n, link in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for m in methods:
        cells = []
        for n, link in cols:
            r = idx.get((workload, link, n, m))
            cells.append(cell(r) if r else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    """The results as markdown: set-up, targets, step times, bytes and loss, codec share."""
    idx = _index(result["runs"])
    lines = _setup_lines(result) + _target_lines(result)
    for w in _workloads_run(result):
        lines += _workload_lines(result, w, idx)
    lines += [
        "",
        "Bytes: what each rank hands to torch.distributed per step, as a bandwidth-optimal "
        "(ring) collective moves it: ggcomm counts its real frames, size and statistics "
        "exchanges; the built-in hooks are counted from the tensors they pass "
        "(`launch/train_ddp.py` explains each). Final loss: validation loss on "
        f"{result['config']['eval_batches']} fixed batches after the last step. Encode + "
        "decode: time the ggcomm hook spends coding (it runs on a background thread, partly "
        "under the rest of backward); the share is that time over the step time.",
        "",
        f"Plots: `{result['plots']['step_time']}` (step time against link speed, per method), "
        f"`{result['plots']['loss_vs_bytes']}` (final loss against bytes sent).",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _link_order(links: Sequence[str]) -> list[str]:
    """Slowest link first, localhost last (:data:`LINKS` lists them fastest first)."""
    shaped = [x for x in reversed(LINKS) if x in links and x != "localhost"]
    return shaped + (["localhost"] if "localhost" in links else [])


# Plot colours: built-in hooks in greys and browns, PowerSGD in purples, ggcomm one hue per
# rate with allgather solid and reduce_scatter dashed.
_COLORS = {
    "fp32": "black",
    "fp16": "tab:gray",
    "quant8": "tab:brown",
    "powersgd-r1": "tab:purple",
    "powersgd-r4": "tab:pink",
    "psgd-eg-r1": "darkviolet",
    "psgd-eg-r4": "violet",
    "gg1.5": "tab:red",
    "gg2": "tab:blue",
    "gg2.5": "tab:cyan",
    "gg3": "tab:green",
    "gg4": "tab:orange",
}


def _style(method: str) -> tuple[str, str, str]:
    """(colour, marker, line style) of a method in the plots."""
    base, _, exchange = method.partition("-")
    if base.startswith("gg"):
        return (
            _COLORS[base],
            "o" if exchange == "allgather" else "^",
            ("-" if exchange == "allgather" else "--"),
        )
    return _COLORS[method], "s", ":"


def plot(result: dict[str, Any], step_time_path: Path, loss_path: Path) -> None:
    """Two PNGs: median step time against link speed per method; final loss against bytes
    per rank per step. One panel per workload and rank count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = result["runs"]
    panels = [
        (w, n)
        for w in WORKLOADS
        for n in sorted({r["ranks"] for r in records})
        if any(r["workload"] == w and r["ranks"] == n for r in records)
    ]
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    style = {m: _style(m) for m in methods}
    links = _link_order(sorted({r["link"] for r in records}))
    idx = _index(records)

    def step_times(ax: Any, w: str, n: int) -> None:
        for m in methods:
            pts = [
                (i, idx[(w, link, n, m)]["median_step_s"])
                for i, link in enumerate(links)
                if (w, link, n, m) in idx
            ]
            if pts:
                color, marker, line = style[m]
                ax.plot(*zip(*pts, strict=True), marker=marker, ls=line, color=color, label=m)
        ax.set_xticks(range(len(links)), links)
        _log_axis(ax, "y", "s")
        ax.set_xlabel("link")
        ax.set_ylabel("median step time")
        ax.set_title(f"{w}, {n} ranks")

    def loss_vs_bytes(ax: Any, w: str, n: int) -> None:
        link = _reference_link(records, w, n)
        for m in methods:
            r = idx.get((w, link, n, m))
            if r and r["final_loss"] is not None:
                color, marker, _ = style[m]
                ax.scatter(
                    r["bytes_per_rank"], r["final_loss"], color=color, marker=marker, label=m
                )
        _log_axis(ax, "x", "B")
        ax.set_xlabel("bytes per rank per step")
        ax.set_ylabel("final validation loss")
        ax.set_title(f"{w}, {n} ranks ({link})")

    for draw, path in ((step_times, step_time_path), (loss_vs_bytes, loss_path)):
        _panel_figure(plt, panels, draw, methods, path)


def _log_axis(ax: Any, which: str, unit: str) -> None:
    """Axis ``which`` ("x" or "y") of ``ax`` on a log scale, labelled at 1, 2 and 5 times
    powers of ten in SI units."""
    from matplotlib import ticker

    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.EngFormatter(unit=unit))
    axis.set_minor_formatter(ticker.NullFormatter())


def _panel_figure(plt: Any, panels: list, draw: Any, methods: list[str], path: Path) -> None:
    """One panel per (workload, ranks), a column per rank count; one legend for all."""
    cols = len({n for _, n in panels}) or 1
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    legend: dict[str, Any] = {}
    for ax, (w, n) in zip(axes.flat, panels, strict=False):
        draw(ax, w, n)
        ax.grid(True, which="both", alpha=0.3)
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    labels = [m for m in methods if m in legend]
    fig.legend([legend[m] for m in labels], labels, loc="center right", fontsize="small")
    fig.tight_layout(rect=(0, 0, 0.82, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
