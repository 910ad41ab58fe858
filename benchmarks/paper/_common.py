"""Shared set-up of the small-scale paper reproductions (GG init, BackSlash, GCT).

One workload for all of them: the built-in byte-level GPT (:class:`ggcomm.tools.workload.GPT`)
trained on the interpreter's standard-library sources, single process on the CPU. Every
run is seeded (model, data order, evaluation batches), so a rerun on the same machine and
library versions reproduces the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import torch

from ggcomm import gg, rate
from ggcomm.tools.train import draws, fit, token_accuracy
from ggcomm.tools.train import evaluate as evaluate_batches
from ggcomm.tools.workload import GPT, ByteDataset, GPTConfig, lr_factor

matplotlib.use("Agg")  # the benchmarks only write figures to files

RESULTS = Path(__file__).resolve().parents[1] / "results" / "paper"

CORPUS_BYTES = 4_000_000
"""Bytes of standard-library source used (train 95%, val 5%); more than the runs consume."""


def small_gpt(n_layer: int = 2, n_head: int = 2, n_embd: int = 64) -> GPTConfig:
    """The benchmarks' GPT shape: a few narrow blocks over 64-byte windows."""
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=64)


@dataclass(frozen=True)
class Setup:
    """Model, data and optimizer settings shared by a benchmark's runs (AdamW)."""

    gpt: GPTConfig = field(default_factory=small_gpt)
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: float = 0.05
    """Linear learning-rate warm-up, as a share of the steps; then cosine decay to 0."""
    eval_batches: int = 16
    eval_batch_size: int = 32

    def schedule(self, steps: int) -> Callable[[int], float]:
        """The learning-rate multiplier of a run of ``steps`` steps."""
        return lr_factor(steps, warmup=max(1, round(self.warmup * steps)), floor=0.0)


def parser(description: str, default_steps: int, quick_steps: int) -> argparse.ArgumentParser:
    """Arguments every paper benchmark takes; :func:`start` reads them."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps per run (default {default_steps}; {quick_steps} with "
                   "--quick)")  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="smoke run: few steps, results written to *-quick files")  # fmt: skip
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is fastest for models this small)")  # fmt: skip
    p.set_defaults(default_steps=default_steps, quick_steps=quick_steps)
    return p


def start(
    args: argparse.Namespace, setup: Setup, quick_setup: Setup
) -> tuple[int, Setup, ByteDataset]:
    """Apply ``--threads``; the steps and setup of a full or ``--quick`` run, and the data."""
    torch.set_num_threads(args.threads)
    steps = args.steps or (args.quick_steps if args.quick else args.default_steps)
    setup = quick_setup if args.quick else setup
    return steps, setup, ByteDataset.from_stdlib(setup.gpt.block_size, max_bytes=CORPUS_BYTES)


def train_gpt(
    model: GPT, data: ByteDataset, setup: Setup, steps: int, batch_seed: int, **callbacks: Any
) -> tuple[list[dict[str, Any]], float]:
    """Train ``model`` with AdamW and ``setup``'s schedule on training batches drawn with
    ``batch_seed``; ``callbacks`` go to :func:`ggcomm.tools.train.fit` (``penalties``,
    ``after_backward``, ``after_step``). Returns fit's per-step records and the seconds
    the training took."""
    opt = torch.optim.AdamW(model.parameters(), lr=setup.lr, weight_decay=setup.weight_decay)
    gen = torch.Generator().manual_seed(batch_seed)
    batches = draws(lambda: data.batch("train", setup.batch_size, gen))
    t0 = time.perf_counter()
    records = fit(model, opt, batches, steps, schedule=setup.schedule(steps), **callbacks)
    return records, time.perf_counter() - t0


def evaluate(model: GPT, data: ByteDataset, setup: Setup, seed: int) -> dict[str, float]:
    """Mean validation loss and next-token accuracy over fixed, seeded validation batches."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    batches = (data.batch("val", setup.eval_batch_size, gen) for _ in range(setup.eval_batches))
    val_loss, accuracy = evaluate_batches(model, batches, metric=token_accuracy)
    return {"val_loss": val_loss, "accuracy": accuracy}


def flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def weight_stats(weights: torch.Tensor, step: float) -> dict[str, float]:
    """Code lengths of ``weights`` quantized with ``step`` (the paper's FL / EG / HM columns,
    entropy, the fraction of zeros) and the fitted GG shape of the raw weights."""
    q = rate.quantize(weights, step)
    s = rate.summary(q)
    return {
        "entropy": s["entropy"],
        "fl": float(s["fl"]),
        "eg": s["eg"],
        "eg_k": float(s["eg_k"]),
        "hm": s["hm"],
        "zeros": float((q == 0).double().mean()),
        "beta": gg.fit(weights).beta,
    }


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def environment() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
    }


def write(
    args: argparse.Namespace,
    benchmark: str,
    markdown: list[str],
    payload: dict[str, Any],
    figure: Any,
) -> list[Path]:
    """Write ``NAME.md``, ``NAME.json`` and ``NAME.png`` under ``--out`` (the figure laid out,
    then closed), ``NAME`` being ``benchmark``, or ``benchmark-quick`` for a ``--quick`` run;
    return the paths."""
    out, name = args.out, benchmark + ("-quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.md", out / f"{name}.json", out / f"{name}.png"]
    paths[0].write_text("\n".join(markdown) + "\n")
    paths[1].write_text(json.dumps(payload, indent=1) + "\n")
    figure.tight_layout()
    figure.savefig(paths[2], dpi=110, bbox_inches="tight")
    plt.close(figure)
    return paths


def setup_dict(setup: Setup) -> dict[str, Any]:
    """``setup`` as flat JSON: the GPT's shape, then the training settings."""
    gpt = setup.gpt
    shape = {"n_layer": gpt.n_layer, "n_head": gpt.n_head, "n_embd": gpt.n_embd,
             "block_size": gpt.block_size}  # fmt: skip
    return shape | {f.name: getattr(setup, f.name) for f in fields(setup) if f.name != "gpt"}
