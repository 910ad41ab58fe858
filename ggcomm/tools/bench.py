"""``ggcomm bench``: gradient-communication methods side by side, over real links.

Trains the same model for the same steps with every method, on every link and number of ranks
asked for, and reports what each method costs and gains::

    ggcomm bench                                   # the full matrix (as root for shaped links)
    ggcomm bench --quick                           # smoke test, well under a minute
    ggcomm bench --links localhost 1gbit --methods fp32 fp16 gg3-allgather --ranks 2

Methods (:data:`METHODS`): ``fp32`` (no hook: DDP's own fp32 allreduce), ``fp16``
(``fp16_compress_hook``), ``quant8`` (``quantization_pertensor_hook``: uint8, allgather),
``powersgd-r1`` / ``powersgd-r4`` (``powerSGD_hook`` at rank 1 and 4 after ``--psgd-start`` fp32
warm-up steps), ``psgd-eg-r1`` / ``psgd-eg-r4`` (the same with EG-coded factors,
:mod:`ggcomm.powersgd`), and ggcomm at 1.5, 2, 2.5, 3 and 4 bits per element with each exchange
(``gg3-allgather``, ``gg2.5-reduce_scatter``, ...). Workloads (:data:`WORKLOADS`): ``gpt``, the
byte-level GPT, whose step is mostly compute on a CPU; ``mlp``, the wide MLP, whose step is mostly
gradient exchange. Links (:data:`LINKS`): ``localhost`` (loopback), and ``10gbit``, ``1gbit``,
``100mbit``: one network namespace per rank, joined by a bridge, every link shaped with ``tc tbf``
(:mod:`ggcomm.tools.testhosts`; needs root, and without it the benchmark says why and runs on
localhost only). Ranks: ``--ranks 2 4``.

Measured per run (see ``ggcomm.tools.train_ddp`` for how bytes are counted): median step time;
bytes each rank sends per step (ggcomm: the real frames; built-in hooks: computed from the
tensors they pass, ring collectives); ggcomm's encode and decode time as a share of the step;
the validation loss after the fixed number of steps. Step time and bytes are taken over the
steady-state steps: every method's first step (DDP rebuilds its buckets, ggcomm sends it
uncompressed), PowerSGD's fp32 warm-up and ggcomm's rate warm-up are left out.

This module is the runner: options, launching the groups of ranks, collecting each run's
summary. :mod:`ggcomm.tools.report` turns what it measured into the result and its files:
how bytes per rank grow from 2 to 4 ranks, whether the targets in
:data:`ggcomm.tools.report.TARGETS` are met, ``ddp_bench.json`` (every run, per-step series
included), ``ddp_bench.md`` and two plots, under ``--out``: ``benchmarks/results`` when this
module runs from a source checkout, else ``ggcomm-bench`` in the current directory
(:func:`default_out_dir`); ``--quick`` names end in ``-quick`` and are not committed.

How it runs: one launch per (workload, link, ranks) group. Each rank is a process
(``python -m ggcomm.tools.bench --worker SPEC`` with this interpreter, in its own test host on
shaped links, in the launch's scratch folder: neither a checkout nor the current directory
matters) that joins one process group and trains every method of the group in turn through
:func:`ggcomm.tools.train_ddp.train`, so the start-up (interpreter, torch and numba imports,
process group) is paid once per group rather than once per run. Localhost ranks meet through
a file store (no port to pick) over the loopback interface. With CUDA (``--backend auto``
finds it) the ranks run NCCL, one GPU each, and time steps with CUDA events; on test hosts
NCCL is confined to the shaped link (its peer-to-peer and shared-memory transports off). The
CUDA path is untested.

Costs: the full default matrix is 176 runs in 16 launches; on a quiet 2-core machine it should
take about 20-25 minutes (estimated from per-run CPU time: about 4 s per GPT run and 3 s per
MLP run at 2 ranks on localhost, twice that at 4 ranks; 5-10 s of start-up and 5-10 s of
step-model solves per launch; plus the exchanges themselves at 100 Mbit/s). The GPT runs on
4 ranks are the largest part, then the MLP at 100 Mbit/s. ``--steps``, ``--mlp-width`` and
the subset options trade coverage for time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import BenchError

# The source checkout this file sits in, when it does (an installed package sits in
# site-packages instead): there results go to its benchmarks/results, where they are committed.
ROOT = Path(__file__).resolve().parents[2]
# Results folder outside a checkout, in the current directory (as `ggcomm demo`'s ggcomm-demo).
LOCAL_OUT_DIR = Path("ggcomm-bench")

# Steps per run. Every step costs its full exchange, and the GPT runs their full compute, so
# steps set most of the benchmark's length: 14 leave 12 or 13 steady-state steps per run for
# the medians and finish the full matrix in about 20-25 minutes on 2 cores. More steps tighten
# the medians and let the final losses separate further.
DEFAULT_STEPS = 14
# Learning-rate warm-up of every run as a share of its steps (train_ddp's --warmup, whose
# default of 20 steps is longer than a benchmark run): a quarter leaves the rest of the run at
# full rate and then cosine decay, so the final losses reflect real training.
LR_WARMUP_FRACTION = 0.25
# PowerSGD's warm-up (start_powerSGD_iter) as a share of the steps: the hook's own advice is
# to start from 10% of training and raise it until accuracy is satisfactory (its default,
# 1000 iterations, is for full-length training, which a short run would never leave).
# Longer warm-ups give PowerSGD a better start and cost that many fp32 exchanges.
PSGD_START_FRACTION = 0.1
# powerSGD_hook refuses to compress before DDP's third iteration.
PSGD_MIN_START = 2
# ggcomm's rate warm-up (GGCommState.warmup_iters) as a share of the steps: its target falls
# from 8 bits per element to the method's rate over these iterations, which seeds AdamW's
# second moments with near-exact gradients (see ggcomm.ddp). The same share as PowerSGD's
# warm-up, so both compressors start alike; longer warm-ups converge more safely at low rates
# and send more bytes early on.
GG_WARMUP_FRACTION = PSGD_START_FRACTION
# GPT batch per rank (sequences of 128 tokens). Gradients, hence bytes, do not depend on it;
# 8 halves train_ddp's default compute per step so that the full matrix stays affordable.
GPT_BATCH = 8
# Width of the MLP workload (3 square layers: 3 (w^2 + w) parameters, 3.15M at 1024 = 12.6 MB
# of fp32 gradients). Wide enough that its fp32 exchange (0.1 s per step at 1 Gbit/s, 2 ranks)
# takes over twice its compute on one core, narrow enough that one fp32 step at 100 Mbit/s
# takes ~1 s rather than 16 s at the workload's own default width of 4096.
MLP_WIDTH = 1024
# Fixed validation batches behind the final loss: more average out more batch noise, each
# costs one forward pass of the model.
EVAL_BATCHES = 4
# Steady-state steps a run must have at least (steps after every method's warm-up).
MIN_STEADY_STEPS = 2
# Wall-clock limit of one launch (a group of runs); a rank that hangs in a collective would
# otherwise wait for gloo's 30-minute timeout.
GROUP_TIMEOUT_S = 3600.0
# How often the launcher polls its ranks and the finished runs.
POLL_S = 0.2
# Test-host name prefix: distinct from testhosts' default so that the benchmark never touches
# hosts someone brought up by hand.
HOSTS_PREFIX = "ggcbench"

# --quick: enough to see every code path work, not to measure anything (nor is the step model
# solved up front).
QUICK_STEPS = 4
QUICK_MLP_WIDTH = 256
QUICK_EVAL_BATCHES = 1
QUICK_GPT = ("--batch-size", "4", "--block-size", "32", "--corpus-bytes", "200000")
QUICK_METHODS = ("fp32", "fp16", "quant8", "powersgd-r1", "gg3-allgather", "gg3-reduce_scatter")
QUICK_WORKLOADS = ("mlp",)
QUICK_LINKS = ("localhost",)
QUICK_RANKS = (2,)


@dataclass(frozen=True)
class Method:
    """A gradient-communication method: :mod:`ggcomm.tools.train_ddp` options and its label."""

    name: str
    label: str
    argv: tuple[str, ...]

    @property
    def hook(self) -> str:
        """``train_ddp``'s ``--hook``."""
        return self.argv[1]

    @property
    def rate(self) -> float | None:
        """ggcomm's target bits per element (``None`` for other methods)."""
        return float(self.argv[self.argv.index("--rate") + 1]) if "--rate" in self.argv else None

    def train_argv(self, psgd_start: int, gg_warmup: int) -> list[str]:
        extra: list[str] = []
        if self.hook in ("powersgd", "psgd-eg"):
            extra = ["--psgd-start", str(psgd_start)]
        elif self.hook == "gg" and gg_warmup:
            extra = ["--gg-warmup-iters", str(gg_warmup)]
        return [*self.argv, *extra]

    def warmup_steps(self, psgd_start: int, gg_warmup: int) -> int:
        """Leading steps that are not steady state: step 1 for every method (DDP rebuilds its
        buckets; ggcomm sends it uncompressed), PowerSGD's fp32 warm-up, ggcomm's rate
        warm-up."""
        if self.hook in ("powersgd", "psgd-eg"):
            return max(1, psgd_start)
        if self.hook == "gg":
            return 1 + gg_warmup
        return 1


GG_RATES = (1.5, 2, 2.5, 3, 4)
"""ggcomm's target bits per element in the matrix (each with both exchanges)."""


def _methods() -> dict[str, Method]:
    methods = [
        Method("fp32", "no hook (fp32 allreduce)", ("--hook", "none")),
        Method("fp16", "fp16_compress_hook", ("--hook", "fp16")),
        Method("quant8", "quantization_pertensor_hook (uint8)", ("--hook", "quant8")),
    ]
    for hook, label in (
        ("powersgd", "powerSGD_hook rank {}"),
        ("psgd-eg", "PowerSGD rank {}, factors EG-coded (ggcomm.powersgd)"),
    ):
        for rank in (1, 4):
            methods.append(
                Method(f"{hook}-r{rank}", label.format(rank),
                       ("--hook", hook, "--psgd-rank", str(rank)))
            )
    for bits in GG_RATES:
        for exchange in ("allgather", "reduce_scatter"):
            methods.append(
                Method(
                    f"gg{bits:g}-{exchange}",
                    f"ggcomm {bits:g} bits/element, {exchange}",
                    ("--hook", "gg", "--rate", f"{bits:g}", "--exchange", exchange),
                )
            )
    return {m.name: m for m in methods}


METHODS = _methods()
WORKLOADS = {
    "gpt": "byte-level GPT (4 layers, width 128)",
    "mlp": "wide MLP (3 square layers)",
}
LINKS = ("localhost", "10gbit", "1gbit", "100mbit")


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


def default_out_dir() -> Path:
    """Where results go without ``--out``: ``benchmarks/results`` of the source checkout this
    module runs from (:data:`ROOT`, when it holds ``pyproject.toml`` and that folder), else
    :data:`LOCAL_OUT_DIR` in the current directory (an installed package)."""
    results = ROOT / "benchmarks" / "results"
    return results if (ROOT / "pyproject.toml").is_file() and results.is_dir() else LOCAL_OUT_DIR


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ggcomm bench",
        description="DDP gradient-communication methods side by side: step time, bytes per "
        "rank, encode/decode share and final loss, on localhost and shaped test-host links.",
    )
    for option, choices, default in (
        ("--links", LINKS, "all; shaped links need root"),
        ("--methods", tuple(METHODS), "all"),
        ("--workloads", tuple(WORKLOADS), "both"),
    ):
        p.add_argument(
            option,
            nargs="+",
            choices=choices,
            metavar=option[2:-1].upper(),
            help=f"any of {', '.join(choices)} (default: {default})",
        )
    p.add_argument(
        "--ranks", nargs="+", type=int, metavar="N", help="numbers of ranks (default: 2 4)"
    )
    p.add_argument("--steps", type=int, help=f"steps per run (default {DEFAULT_STEPS})")
    p.add_argument(
        "--psgd-start",
        type=int,
        help=f"PowerSGD's fp32 warm-up steps (default {100 * PSGD_START_FRACTION:g}%% of the "
        f"steps, at least {PSGD_MIN_START})",
    )
    p.add_argument(
        "--gg-warmup",
        type=int,
        help=f"ggcomm's rate warm-up iterations, 0 for none (default "
        f"{100 * GG_WARMUP_FRACTION:g}%% of the steps)",
    )
    p.add_argument("--mlp-width", type=int, help=f"MLP workload width (default {MLP_WIDTH})")
    p.add_argument(
        "--eval-batches",
        type=int,
        help=f"validation batches behind the final loss (default {EVAL_BATCHES})",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch and codec threads per rank (default 0: CPUs / ranks, at least 1)",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "gloo", "nccl"),
        default="auto",
        help="auto: nccl when CUDA is available, else gloo",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK_STEPS} steps, a small matrix and model, results "
        "named *-quick.* (options given explicitly still apply)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=default_out_dir(),
        help="results folder (default: benchmarks/results in a source checkout, else "
        f"./{LOCAL_OUT_DIR}; here %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=GROUP_TIMEOUT_S,
        help=f"seconds one launch may take (default {GROUP_TIMEOUT_S:g})",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Options with the defaults filled in (``--quick`` picks its own); exits with status 2
    and a message saying what is wrong on invalid ones."""
    p = _parser()
    args = p.parse_args(argv)
    if args.worker:
        return args
    quick = args.quick
    defaults = {
        "links": QUICK_LINKS if quick else LINKS,
        "methods": QUICK_METHODS if quick else tuple(METHODS),
        "workloads": QUICK_WORKLOADS if quick else tuple(WORKLOADS),
        "ranks": QUICK_RANKS if quick else (2, 4),
        "steps": QUICK_STEPS if quick else DEFAULT_STEPS,
        "mlp_width": QUICK_MLP_WIDTH if quick else MLP_WIDTH,
        "eval_batches": QUICK_EVAL_BATCHES if quick else EVAL_BATCHES,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.psgd_start is None:
        args.psgd_start = max(PSGD_MIN_START, round(PSGD_START_FRACTION * args.steps))
    if args.gg_warmup is None:
        args.gg_warmup = round(GG_WARMUP_FRACTION * args.steps)
    # keep the matrix's canonical order whatever order the options were given in
    args.links = [x for x in LINKS if x in args.links]
    args.methods = [x for x in METHODS if x in args.methods]
    args.workloads = [x for x in WORKLOADS if x in args.workloads]
    args.ranks = sorted(set(args.ranks))
    _check_args(p, args)
    return args


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit through ``p.error`` (status 2) on the first invalid option, saying why."""
    if any(r < 2 for r in args.ranks):
        p.error(f"--ranks must all be at least 2 (one rank exchanges nothing), got {args.ranks}")
    if args.psgd_start < PSGD_MIN_START:
        p.error(
            f"--psgd-start must be >= {PSGD_MIN_START} (powerSGD_hook compresses only after "
            f"DDP's first two iterations), got {args.psgd_start}"
        )
    if args.gg_warmup < 0:
        p.error(f"--gg-warmup must be >= 0, got {args.gg_warmup}")
    longest = max(
        args.methods, key=lambda m: METHODS[m].warmup_steps(args.psgd_start, args.gg_warmup)
    )
    warmup = METHODS[longest].warmup_steps(args.psgd_start, args.gg_warmup)
    if args.steps < warmup + MIN_STEADY_STEPS:
        p.error(
            f"--steps {args.steps} leaves fewer than {MIN_STEADY_STEPS} steady-state steps after "
            f"the longest warm-up ({warmup} steps, {longest}); use --steps "
            f"{warmup + MIN_STEADY_STEPS} or more, or shorter --psgd-start / --gg-warmup"
        )
    if args.mlp_width < 1:
        p.error(f"--mlp-width must be positive, got {args.mlp_width}")
    if args.eval_batches < 1:
        p.error(f"--eval-batches must be positive, got {args.eval_batches}")
    if args.threads < 0:
        p.error(f"--threads must be >= 0 (0: automatic), got {args.threads}")
    if not args.timeout > 0:
        p.error(f"--timeout must be positive, got {args.timeout}")


# ---------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """One launch: every method of the benchmark for one workload, link and number of ranks."""

    workload: str
    link: str
    ranks: int

    def __str__(self) -> str:
        return f"{self.workload}/{self.link}/{self.ranks} ranks"


def load_testhosts() -> ModuleType:
    """:mod:`ggcomm.tools.testhosts` (imported on first use: it is only needed for shaped links)."""
    from . import testhosts

    return testhosts


def _train_argv(method: Method, workload: str, args: argparse.Namespace, out: Path) -> list[str]:
    """:mod:`ggcomm.tools.train_ddp` options of one run."""
    argv = [*method.train_argv(args.psgd_start, args.gg_warmup), "--model", workload]
    argv += f"--steps {args.steps} --seed {args.seed} --log-every {args.steps}".split()
    argv += f"--eval-batches {args.eval_batches} --backend {args.backend}".split()
    argv += ["--warmup", str(max(1, round(LR_WARMUP_FRACTION * args.steps)))]
    argv += ["--threads", str(args.threads), "--json", str(out)]
    if workload == "mlp":
        argv += ["--mlp-width", str(args.mlp_width)]
    else:
        argv += ["--batch-size", str(GPT_BATCH), *(QUICK_GPT if args.quick else ())]
    return argv


def _resolve_backend(args: argparse.Namespace) -> list[str]:
    """Fix ``args.backend`` and ``args.threads``; returns notes on rank counts left out."""
    notes = []
    gpus = 0
    if args.backend != "gloo":
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if args.backend == "nccl" and not gpus:
            raise BenchError("--backend nccl needs CUDA, and no GPU is visible")
        args.backend = "nccl" if gpus else "gloo"
    if args.backend == "nccl":
        fit = [r for r in args.ranks if r <= gpus]
        if len(fit) < len(args.ranks):
            left = [r for r in args.ranks if r > gpus]
            notes.append(
                f"{', '.join(map(str, left))} ranks left out: NCCL needs one GPU per rank and "
                f"{gpus} are visible"
            )
        if not fit:
            raise BenchError(f"no rank count of {args.ranks} fits on {gpus} GPU(s)")
        args.ranks = fit
    if args.threads == 0:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        args.threads = max(1, (cpus or 1) // max(args.ranks))
    return notes


# ---------------------------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------------------------


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [d.strip() for d in visible.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _rank_env(rank: int, world: int, threads: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": str(threads),
    }


def _nccl_host_env(hosts: Any, i: int) -> dict[str, str]:
    """NCCL in test host ``i``: its own GPU, sockets over its shaped link only."""
    return {
        "CUDA_VISIBLE_DEVICES": _visible_gpus()[i],
        "LOCAL_RANK": "0",
        "NCCL_SOCKET_IFNAME": hosts.interfaces[i],
        "NCCL_NET": "Socket",
        "NCCL_IB_DISABLE": "1",
        "NCCL_P2P_DISABLE": "1",
        "NCCL_SHM_DISABLE": "1",
        "NCCL_NVLS_ENABLE": "0",
    }


def worker_command(spec_path: Path) -> list[str]:
    """The command line of one rank: this module's worker, reading ``spec_path``."""
    return [sys.executable, "-m", "ggcomm.tools.bench", "--worker", str(spec_path)]


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def run_group(
    group: Group,
    runs: Sequence[tuple[Method, list[str], Path]],
    args: argparse.Namespace,
    workdir: Path,
    hosts: Any = None,
    on_run_done: Any = None,
) -> None:
    """Launch ``group.ranks`` workers (in ``hosts`` when given, else on localhost) that train
    every run of ``runs`` in turn, each in ``workdir`` (its spec, logs and file store are
    there); calls ``on_run_done(method)`` as each result appears. Raises :class:`BenchError`
    with the failing rank's log when a rank fails or the launch takes longer than
    ``args.timeout``."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = {
        "backend": args.backend,
        "threads": args.threads,
        "init_method": "env://" if hosts else f"file://{workdir / 'store'}",
        "runs": [{"method": m.name, "argv": argv} for m, argv, _ in runs],
        "step_model": any(m.rate is not None for m, _, _ in runs),
    }
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    cmd = worker_command(spec_path)
    procs: list[subprocess.Popen] = []
    logs = [workdir / f"rank{r}.log" for r in range(group.ranks)]
    try:
        for r in range(group.ranks):
            with open(logs[r], "w") as log:
                procs.append(_start_rank(group, r, cmd, args, workdir, log, hosts))
        _wait_for_runs(group, runs, procs, logs, args.timeout, on_run_done)
    finally:
        _stop(procs)


def _start_rank(
    group: Group,
    r: int,
    cmd: list[str],
    args: argparse.Namespace,
    workdir: Path,
    log: Any,
    hosts: Any,
) -> subprocess.Popen:
    """Rank ``r`` of ``group``: ``cmd`` in test host ``r`` when ``hosts`` are given, else on
    localhost; in ``workdir``, its output to ``log``."""
    env = _rank_env(r, group.ranks, args.threads)
    io = {"cwd": workdir, "stdout": log, "stderr": subprocess.STDOUT}
    if hosts is not None:
        env.pop("RANK")  # the hosts set their own, with MASTER_ADDR and ifname
        env.pop("WORLD_SIZE")
        env.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        if args.backend == "nccl":
            env.update(_nccl_host_env(hosts, r))
        return hosts.popen(r, cmd, env=env, **io)
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return subprocess.Popen(cmd, env={**os.environ, **env}, **io)


def _wait_for_runs(
    group: Group,
    runs: Sequence[tuple[Method, list[str], Path]],
    procs: Sequence[subprocess.Popen],
    logs: Sequence[Path],
    timeout: float,
    on_run_done: Any,
) -> None:
    """Poll the ranks until all exit with status 0 and every run's result is there; raise
    :class:`BenchError` (after stopping the others) when a rank fails, when ``timeout``
    seconds pass first, or when a result is missing."""
    done = 0
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        while done < len(runs) and runs[done][2].exists():
            if on_run_done is not None:
                on_run_done(runs[done][0])
            done += 1
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            _stop(procs)
            r = failed[0]
            raise BenchError(
                f"{group}: rank {r} exited with status {codes[r]} during "
                f"{runs[min(done, len(runs) - 1)][0].name}; its log ends:\n"
                f"{_tail(logs[r])}"
            )
        if all(c == 0 for c in codes):
            break
        if time.monotonic() > deadline:
            _stop(procs)
            raise BenchError(
                f"{group}: no result after {timeout:g} s (--timeout); rank 0's log "
                f"ends:\n{_tail(logs[0])}"
            )
        time.sleep(POLL_S)
    missing = [m.name for m, _, out in runs if not out.exists()]
    if missing:
        raise BenchError(f"{group}: ranks exited without results for {', '.join(missing)}")


def _worker(spec_path: str) -> int:
    """One rank of a group: join the process group, train every run of the spec in turn."""
    import torch
    import torch.distributed as dist

    from .. import set_num_threads, stepping

    spec = json.loads(Path(spec_path).read_text())
    from . import train_ddp
    set_num_threads(spec["threads"])
    torch.set_num_threads(spec["threads"])
    backend = spec["backend"]
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if spec["init_method"] == "env://":
        dist.init_process_group(backend)
    else:
        dist.init_process_group(
            backend,
            init_method=spec["init_method"],
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
        )
    try:
        if spec["step_model"]:
            # rate mode's step table, built here rather than inside a run's first steps
            t0 = time.perf_counter()
            stepping.prepare()
            print(f"step model built in {time.perf_counter() - t0:.2f} s", flush=True)
        for run in spec["runs"]:
            train_ddp.train(train_ddp.parse_args(run["argv"]))
    finally:
        dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def summarize_run(
    summary: dict[str, Any], method: Method, group: Group, psgd_start: int, gg_warmup: int
) -> dict[str, Any]:
    """The benchmark's record of one run, from ``train_ddp``'s summary: steady-state figures
    (warm-up steps left out) and the per-step series."""
    steps = summary["steps"]
    warmup = method.warmup_steps(psgd_start, gg_warmup)
    times = steps["step_time_s"][warmup:]
    sent = steps["bytes_sent_per_rank"][warmup:]
    fp32 = summary["fp32_allreduce_bytes_per_rank"]
    bytes_per_rank = statistics.fmean(sent)
    record: dict[str, Any] = {
        "workload": group.workload,
        "link": group.link,
        "ranks": group.ranks,
        "method": method.name,
        "backend": summary["backend"],
        "num_parameters": summary["num_parameters"],
        "steps": len(steps["step_time_s"]),
        "warmup_steps": warmup,
        "median_step_s": statistics.median(times),
        "mean_step_s": statistics.fmean(times),
        "bytes_per_rank": bytes_per_rank,
        "fp32_bytes_per_rank": fp32,
        "bytes_vs_fp32": bytes_per_rank / fp32 if fp32 else None,
        "run_bytes_per_rank": float(sum(steps["bytes_sent_per_rank"])),
        "encode_s_per_step": None,
        "decode_s_per_step": None,
        "codec_share": None,
        "final_loss": _finite(summary["val_loss"]),
        "final_train_loss": _finite(steps["loss"][-1]),
        "series": {
            k: steps[k]
            for k in ("loss", "step_time_s", "bytes_sent_per_rank", "encode_s", "decode_s")
            if steps.get(k) is not None
        },
    }
    if steps.get("encode_s") is not None:
        enc = steps["encode_s"][warmup:]
        dec = steps["decode_s"][warmup:]
        record["encode_s_per_step"] = statistics.fmean(enc)
        record["decode_s_per_step"] = statistics.fmean(dec)
        record["codec_share"] = (sum(enc) + sum(dec)) / sum(times) if sum(times) > 0 else None
    return record


def _machine(backend: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "backend": backend,
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if backend == "nccl":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def _children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _usable_links(args: argparse.Namespace, notes: list[str]) -> tuple[list[str], Any]:
    """The links of ``args`` that this machine can run, and :mod:`ggcomm.tools.testhosts`
    when shaped links are among them (else ``None``). Without test hosts the shaped links are
    left out, with a note saying why."""
    shaped = [x for x in args.links if x != "localhost"]
    if not shaped:
        return list(args.links), None
    testhosts = load_testhosts()
    if why := testhosts.unavailable_reason(HOSTS_PREFIX):
        msg = (
            f"test hosts unavailable ({why}); shaped links {', '.join(shaped)} left out, "
            "running on localhost only"
        )
        print(f"ggcomm bench: {msg}", file=sys.stderr)
        notes.append(msg)
        return ["localhost"], None
    return list(args.links), testhosts


def _run_groups(
    args: argparse.Namespace, groups: Sequence[Group], testhosts: Any
) -> tuple[list[dict], list[dict], list[dict]]:
    """Launch every group in turn, in scratch folders; returns the records of the runs that
    finished (:func:`summarize_run`), the failed launches and every launch's wall and CPU
    time."""
    from tqdm import tqdm

    methods = [METHODS[m] for m in args.methods]
    records: list[dict] = []
    failures: list[dict] = []
    launches: list[dict] = []
    errors = (BenchError, testhosts.HostsError) if testhosts else (BenchError,)
    bar = tqdm(total=len(groups) * len(methods), unit="run", disable=args.no_progress)
    with tempfile.TemporaryDirectory(prefix="ggcomm-bench-") as tmp:
        for gi, group in enumerate(groups):
            workdir = Path(tmp) / f"group{gi}"
            outs = [workdir / f"{m.name}.json" for m in methods]
            runs = [
                (m, _train_argv(m, group.workload, args, out), out)
                for m, out in zip(methods, outs, strict=True)
            ]
            bar.set_description(str(group))
            t0, cpu0 = time.monotonic(), _children_cpu_s()
            try:
                if group.link == "localhost":
                    run_group(group, runs, args, workdir, on_run_done=lambda m: bar.update())
                else:
                    with testhosts.TestHosts(group.ranks, group.link, HOSTS_PREFIX) as hosts:
                        run_group(group, runs, args, workdir, hosts, lambda m: bar.update())
            except errors as e:
                failures.append({"group": str(group), "error": str(e)})
                bar.write(f"ggcomm bench: {e}", file=sys.stderr)
            for m, _, out in runs:
                if out.exists():
                    summary = json.loads(out.read_text())
                    records.append(
                        summarize_run(summary, m, group, args.psgd_start, args.gg_warmup)
                    )
            wall, cpu = time.monotonic() - t0, _children_cpu_s() - cpu0
            launches.append({"group": str(group), "runs": len(runs), "wall_s": wall, "cpu_s": cpu})
            bar.update((gi + 1) * len(methods) - bar.n)  # failed runs count as done
            bar.write(f"{group}: {wall:.0f} s, {cpu:.0f} CPU s", file=sys.stderr)
    bar.close()
    return records, failures, launches


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Run the benchmark described by ``args`` (from :func:`parse_args`) and write its files
    under ``args.out`` (:func:`ggcomm.tools.report.write`); returns the result (what
    ``ddp_bench.json`` holds)."""
    from . import report  # it reads this module's matrix, so it is imported once that exists

    started = time.time()
    notes = _resolve_backend(args)
    args.links_run, testhosts = _usable_links(args, notes)
    groups = [
        Group(w, link, n) for w in args.workloads for link in args.links_run for n in args.ranks
    ]
    machine = _machine(args.backend)
    records, failures, launches = _run_groups(args, groups, testhosts)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "worker")}
    measured: dict[str, Any] = {
        "config": {**config, "command": command},
        "machine": machine,
        "date": time.strftime("%Y-%m-%d"),
        "wall_s": time.time() - started,
        "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "notes": notes,
        "failures": failures,
        "launches": launches,
        "runs": records,
    }
    return report.write(measured, args.out, args.quick)


def main(argv: Sequence[str] | None = None) -> int:
    """``ggcomm bench``: parse ``argv``, run, print the markdown; status 1 if a launch failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    try:
        result = run(args, " ".join(["ggcomm bench", *argv]))
    except BenchError as e:
        print(f"ggcomm bench: {e}", file=sys.stderr)
        return 1
    from . import report

    print(report.markdown(result), end="")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
