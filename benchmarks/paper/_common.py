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
import math
import platform
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ggcomm import gg, rate
from ggcomm.tools.workload import GPT, ByteDataset, GPTConfig, next_token_accuracy

RESULTS = Path(__file__).resolve().parents[1] / "results" / "paper"

CORPUS_BYTES = 4_000_000
"""Bytes of standard-library source used (train 95%, val 5%); more than the runs consume."""


@dataclass(frozen=True)
class Setup:
    """Model, data and optimizer settings shared by a benchmark's runs."""

    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    block_size: int = 64
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: float = 0.05
    eval_batches: int = 16
    eval_batch_size: int = 32

    def config(self) -> GPTConfig:
        return GPTConfig(
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
            block_size=self.block_size,
        )


def parser(description: str, default_steps: int, quick_steps: int) -> argparse.ArgumentParser:
    """Arguments every paper benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps per run (default {default_steps}; {quick_steps} with --quick)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: few steps, results written to *-quick files",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 is fastest for models this small)",
    )
    return p


def load_data(setup: Setup) -> ByteDataset:
    return ByteDataset.from_stdlib(block_size=setup.block_size, max_bytes=CORPUS_BYTES)


def optimizer(
    model: torch.nn.Module, setup: Setup, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with a linear warm-up over ``warmup`` of the steps, then cosine decay to zero
    (call the scheduler's ``step()`` after each optimizer step)."""
    opt = torch.optim.AdamW(model.parameters(), lr=setup.lr, weight_decay=setup.weight_decay)
    warm = max(1, round(setup.warmup * steps))

    def factor(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (i - warm) / max(1, steps - warm))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def evaluate(model: GPT, data: ByteDataset, setup: Setup, seed: int) -> dict[str, float]:
    """Mean validation loss and next-token accuracy over fixed, seeded validation batches."""
    model.eval()
    gen = torch.Generator().manual_seed(10_000 + seed)
    losses, accs = [], []
    for _ in range(setup.eval_batches):
        x, y = data.batch("val", setup.eval_batch_size, gen)
        logits, loss = model(x, y)
        losses.append(float(loss))
        accs.append(next_token_accuracy(logits, y))
    model.train()
    return {"val_loss": float(np.mean(losses)), "accuracy": float(np.mean(accs))}


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


def grad_eg_bits(grads: Sequence[torch.Tensor], rel_step: float) -> float:
    """Best-order EG bits per element of the gradients, each quantized with
    ``rel_step`` x its own RMS (the rule the DDP hook's ``rel_step`` mode sends with)."""
    total_bits = 0.0
    total = 0
    for g in grads:
        rms = float(g.double().pow(2).mean().sqrt())
        step = rel_step * rms if rms > 0 else 1.0
        bits, _ = rate.eg_bits(rate.signed_to_unsigned(rate.quantize(g, step)))
        total_bits += bits * g.numel()
        total += g.numel()
    return total_bits / total


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
    out: Path, name: str, markdown: list[str], payload: dict[str, Any], figure: Any
) -> list[Path]:
    """Write ``name``.md, ``name``.json and ``name``.png under ``out``; return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.md", out / f"{name}.json", out / f"{name}.png"]
    paths[0].write_text("\n".join(markdown) + "\n")
    paths[1].write_text(json.dumps(payload, indent=1) + "\n")
    figure.savefig(paths[2], dpi=110, bbox_inches="tight")
    return paths


def setup_dict(setup: Setup) -> dict[str, Any]:
    return asdict(setup)
