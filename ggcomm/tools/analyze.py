"""``ggcomm analyze``: how generalized-Gaussian a model's weights, activations and gradients are.

Builds the GPT of :mod:`ggcomm.tools.workload` (optionally trained for a few steps on the stdlib
corpus first, or loaded from a saved state dict), then for each group of tensors (weights
by kind: embeddings, attention, MLP, norms, biases, head; each block's output activation;
the gradients of the same weight groups over a few batches) fits a GG and a Gaussian
(:func:`ggcomm.gg.compare`) and measures, at one stated quantization, the paper's code
lengths: FL (fixed length for the range), EG (Exp-Golomb, best order), HM (Huffman) and
the bits the ggcomm codec actually sends (frame included). Weight groups also get the
weight-side methods' effects (:func:`weight_measures`): RF8's relative error, and EG bits
on DeepShape's fixed-point grid before and after its remap. The printed table is the
paper's Tables 1-4 and Fig. 1 for this model; ``--json`` keeps the numbers and
``--plot-dir`` draws each group's histogram with both fits on a log axis.

    ggcomm analyze --train-steps 200 --rel-step 0.05 --json out.json --plot-dir plots/

Costs: one forward per activation batch, one forward and backward per gradient batch, and
one ML fit per group on at most ``--max-samples`` elements; tens of seconds on two cores
at the defaults. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import codec, gg, rate, rf8
from ..methods.deepshape import deepshape_, scaled_min_count
from .train import draws, fit
from .workload import GPT, ByteDataset, GPTConfig

__all__ = ["GROUP_RULES", "analyze_model", "collect", "main", "measure", "weight_measures"]

DEFAULT_REL_STEP = 0.05
"""Quantization step relative to each group's RMS: fine enough (noise 1.4% of the RMS)
that the code lengths describe the distribution's shape, not the rounding; each halving
adds about one bit per element to every column."""

DEFAULT_MAX_SAMPLES = 200_000
"""Elements per group used for fitting (an even stride through the group). The ML fit's
cost grows linearly with it; 2e5 pins the shape to about +-0.01."""

DEFAULT_BATCH_SIZE = 8
DEFAULT_GRAD_BATCHES = 2
"""Backward passes whose gradients are pooled: one batch's gradient is what a data-parallel
rank sends; a few keep one odd batch from setting the shape."""

DEFAULT_THREADS = 1
"""torch CPU threads. The default model's matrices are small: a second thread gains little
on an idle machine, and on a busy one threads that wait for each other run several times
slower than one."""

DEEPSHAPE_FRAC_BITS = 13
"""DeepShape's fixed-point grid (the authors' 13 fractional bits)."""

HIST_BINS = 201
PLOT_COLUMNS = 4

# (group, pattern on the parameter name); the first match wins.
GROUP_RULES: tuple[tuple[str, str], ...] = (
    ("embedding", r"^(tok|pos)_emb\."),
    ("norm", r"(^|\.)ln(1|2|_f)\."),
    ("bias", r"\.bias$"),
    ("attention", r"\.attn\."),
    ("mlp", r"\.mlp\."),
    ("head", r"^head\."),
)
"""How GPT parameters are grouped: embeddings, LayerNorm gains and shifts, Linear biases,
attention (qkv and output projections), MLP (both projections), and the output head."""

KINDS = ("weight", "activation", "gradient")
UNPOOLED = frozenset({"norm", "bias"})
"""Groups left out of the pooled ``kind/all`` rows: LayerNorm gains sit around 1 and biases
start at 0, so pooled with the weight matrices they would be a second mode, not a tail."""


def _group_of(name: str) -> str:
    for group, pattern in GROUP_RULES:
        if re.search(pattern, name):
            return group
    return "other"


def _flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().float().reshape(-1) for t in tensors])


def collect(
    model: GPT, data: ByteDataset, *, batch_size: int, grad_batches: int, seed: int
) -> dict[str, torch.Tensor]:
    """Flattened float32 tensors per group, named ``kind/group``.

    Weights and gradients are grouped by :data:`GROUP_RULES` (gradients pooled over
    ``grad_batches`` batches, each its own backward); activations are each block's output
    (``activation/block<i>``, the tensor a pipeline split after that block would send) on
    one batch. Pooled ``kind/all`` rows hold every element of a kind except the
    :data:`UNPOOLED` groups.
    """
    params = dict(model.named_parameters())
    groups: dict[str, list[str]] = {}
    for name in params:
        groups.setdefault(_group_of(name), []).append(name)
    out = {f"weight/{g}": _flat(params[n] for n in names) for g, names in groups.items()}

    gen = torch.Generator().manual_seed(seed)
    captured: dict[int, torch.Tensor] = {}
    handles = [
        block.register_forward_hook(lambda m, i, o, idx=idx: captured.__setitem__(idx, o))
        for idx, block in enumerate(model.blocks)
    ]
    try:
        model.eval()
        with torch.no_grad():
            model(data.batch("val", batch_size, gen)[0])
    finally:
        for h in handles:
            h.remove()
    for idx in sorted(captured):
        out[f"activation/block{idx}"] = _flat([captured[idx]])

    grads: dict[str, list[torch.Tensor]] = {}
    model.train()
    for _ in range(grad_batches):
        model.zero_grad(set_to_none=True)
        x, y = data.batch("train", batch_size, gen)
        _, loss = model(x, y)
        loss.backward()
        for g, names in groups.items():
            grads.setdefault(g, []).append(_flat(params[n].grad for n in names))
    model.zero_grad(set_to_none=True)
    for g, parts in grads.items():
        out[f"gradient/{g}"] = torch.cat(parts)

    for kind in KINDS:
        members = [
            t
            for name, t in out.items()
            if name.startswith(kind + "/") and name.split("/")[1] not in UNPOOLED
        ]
        if len(members) > 1:
            out[f"{kind}/all"] = torch.cat(members)
    return out


def measure(
    x: torch.Tensor,
    *,
    rel_step: float | None = None,
    bits: float | None = None,
    max_samples: int = DEFAULT_MAX_SAMPLES,
) -> dict[str, Any]:
    """GG and Gaussian fits of ``x`` and its code lengths at one quantization.

    The step is ``rel_step`` times the RMS of ``x``, or (``bits``) the one at which the
    fitted GG predicts that many bits per element of the codec's blocks (EG or Golomb-Rice,
    :func:`ggcomm.rate.step_for_rate`).
    Returns plain numbers: ``n``, ``gg`` / ``gaussian`` parameters, ``ll_gg``,
    ``ll_gauss`` and ``ll_gain`` (mean log-likelihood per element in nats, on the fitting
    sample), ``step`` and the bits per element ``fl``, ``eg`` (with its order ``eg_k``),
    ``hm``, ``entropy`` and ``codec`` (frame bits of :func:`ggcomm.codec.encode`).

    Raises:
        ValueError: for a tensor with zero variance (nothing to fit) or a bad quantization.
    """
    if (rel_step is None) == (bits is None):
        raise ValueError("give exactly one of rel_step and bits")
    fits = gg.compare(x, refine="mle", max_samples=max_samples)
    fit = fits["gg"]
    if bits is not None:
        # A large-shape fit's far tail overflows to probability 0 inside scipy: correct.
        with np.errstate(over="ignore"):
            step = rate.step_for_rate(fit, bits)
    else:
        if not (math.isfinite(rel_step) and rel_step > 0):
            raise ValueError(f"rel_step must be a positive number, got {rel_step!r}")
        step = rel_step * rate.rms(x)
    codes = rate.summary(rate.quantize(x, step))
    return {
        "n": int(x.numel()),
        "gg": {"loc": fit.loc, "scale": fit.scale, "beta": fit.beta},
        "gaussian": {"loc": fits["gaussian"].loc, "std": fits["gaussian"].std},
        "ll_gg": fits["ll_gg"],
        "ll_gauss": fits["ll_gauss"],
        "ll_gain": fits["ll_gain"],
        "step": step,
        "fl": codes["fl"],
        "eg": codes["eg"],
        "eg_k": codes["eg_k"],
        "hm": codes["hm"],
        "entropy": codes["entropy"],
        "codec": codec.encode(x, step).bits_per_element,
    }


def weight_measures(x: torch.Tensor, *, frac_bits: int = DEEPSHAPE_FRAC_BITS
                    ) -> dict[str, Any]:
    """RF8 and DeepShape on one group of weights (a copy; ``x`` is not changed).

    Returns ``rf8_bits`` (bits per weight of :func:`ggcomm.rf8.encode`, bases and header
    included) and ``rf8_rel_err`` (``||rf8(x) - x|| / ||x||``); on the grid of step
    ``2**-frac_bits``, the paper's EG bits per weight of ``x`` (``ds_eg_before``) and of
    :func:`ggcomm.methods.deepshape.deepshape_` applied to the group alone with the
    authors' settings and their count threshold scaled to the group's size
    (``ds_eg_after``), and the remap's relative change ``ds_rel_change``. A group DeepShape
    cannot reshape (no body: e.g. LayerNorm gains, all near one value) gets
    ``ds_skipped`` with the reason instead.
    """
    w = x.detach().reshape(-1).float()
    norm = float(w.norm())
    out: dict[str, Any] = {
        "rf8_bits": 8.0 * rf8.encode(w).numel() / w.numel(),
        "rf8_rel_err": float((rf8.quantize(w) - w).norm()) / norm if norm else 0.0,
    }
    scale = 2.0**frac_bits
    fixed = torch.round(w.double() * scale)
    out["ds_eg_before"] = rate.summary(fixed.long())["eg"]
    y = (fixed / scale).clone()
    try:
        deepshape_([y], frac_bits=frac_bits, min_count=scaled_min_count(w.numel()))
    except ValueError as err:
        out["ds_skipped"] = str(err)
        return out
    out["ds_eg_after"] = rate.summary(torch.round(y * scale).long())["eg"]
    ref = float((fixed / scale).norm())
    out["ds_rel_change"] = float((y - fixed / scale).norm()) / ref if ref else 0.0
    return out


def analyze_model(
    model: GPT,
    data: ByteDataset,
    *,
    rel_step: float | None = DEFAULT_REL_STEP,
    bits: float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    grad_batches: int = DEFAULT_GRAD_BATCHES,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    seed: int = 0,
) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """:func:`measure` on every group :func:`collect` finds; returns (results, tensors).

    A group with zero variance (an untrained bias, all zeros) gets ``{"skipped": reason}``.
    """
    tensors = collect(model, data, batch_size=batch_size, grad_batches=grad_batches, seed=seed)
    results: dict[str, dict[str, Any]] = {}
    for name, x in tensors.items():
        try:
            results[name] = measure(x, rel_step=rel_step, bits=bits, max_samples=max_samples)
        except ValueError as err:
            results[name] = {"n": int(x.numel()), "skipped": str(err)}
            continue
        if name.startswith("weight/"):
            results[name].update(weight_measures(x))
    return results, tensors


def train(model: GPT, data: ByteDataset, steps: int, *, batch_size: int, seed: int) -> float:
    """A few AdamW steps at a constant learning rate, so the distributions are trained ones;
    returns the last loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed + 1)
    records = fit(model, opt, draws(lambda: data.batch("train", batch_size, gen)), steps)
    return records[-1]["loss"] if records else math.nan


def config_from_state_dict(state: dict[str, torch.Tensor], n_head: int) -> GPTConfig:
    """The :class:`GPTConfig` a GPT state dict was saved from (``n_head`` is not in it)."""
    try:
        vocab_size, n_embd = state["tok_emb.weight"].shape
        block_size = state["pos_emb.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"not a ggcomm GPT state dict: no {err.args[0]!r}") from None
    layers = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    return GPTConfig(
        vocab_size=vocab_size,
        block_size=block_size,
        n_layer=len(layers),
        n_head=n_head,
        n_embd=n_embd,
    )


# --------------------------------------------------------------------------- output


def format_table(results: dict[str, dict[str, Any]], quantization: str) -> str:
    """The results as a fixed-width text table (one row per group)."""
    head = (
        f"{'group':<22}{'elements':>10}{'GG shape':>10}{'LL gain':>10}"
        f"{'step':>11}{'FL':>5}{'EG':>7}{'HM':>7}{'codec':>7}{'RF8 err':>9}"
        f"{'EG13':>7}{'DS EG13':>9}"
    )
    lines = [
        f"Quantization: {quantization}. LL gain: mean log-likelihood of the GG fit minus the "
        "Gaussian fit's, nats per element. FL / EG / HM / codec: bits per element.",
        f"Weights only: RF8 err = relative RMS error of RF8 (8 bits per weight); EG13 / DS "
        f"EG13 = EG bits per weight on the 2^-{DEEPSHAPE_FRAC_BITS} grid before / after "
        "DeepShape (on the group alone).",
        "",
        head,
        "-" * len(head),
    ]
    for name, r in results.items():
        if "skipped" in r:
            lines.append(f"{name:<22}{r['n']:>10}  skipped: {r['skipped']}")
            continue
        weights = ""
        if "rf8_rel_err" in r:
            after = f"{r['ds_eg_after']:>9.2f}" if "ds_eg_after" in r else f"{'-':>9}"
            weights = f"{r['rf8_rel_err']:>9.4f}{r['ds_eg_before']:>7.2f}{after}"
        lines.append(
            f"{name:<22}{r['n']:>10}{r['gg']['beta']:>10.3f}{r['ll_gain']:>10.4f}"
            f"{r['step']:>11.3g}{r['fl']:>5d}{r['eg']:>7.2f}{r['hm']:>7.2f}{r['codec']:>7.2f}"
            f"{weights}"
        )
    return "\n".join(lines)


def plot(
    results: dict[str, dict[str, Any]], tensors: dict[str, torch.Tensor], out: Path
) -> list[Path]:
    """Histograms with the GG and Gaussian fits on a log y axis (the tails are where the
    fits differ): ``weight.png``, ``activation.png`` and ``gradient.png`` with one panel per
    group, and ``overview.png`` with the pooled row of each kind side by side (paper
    Fig. 1). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullLocator

    out.mkdir(parents=True, exist_ok=True)

    def draw(ax: Any, name: str) -> None:
        r = results[name]
        x = tensors[name].numpy()
        x = x[:: max(1, x.size // DEFAULT_MAX_SAMPLES)]
        lo, hi = np.quantile(x, [1e-4, 1 - 1e-4])
        density, edges = np.histogram(x, bins=HIST_BINS, range=(lo, hi), density=True)
        centers = 0.5 * (edges[:-1] + edges[1:])
        ax.semilogy(centers, np.where(density > 0, density, np.nan), ".", ms=3, label="data")
        fit = gg.GGFit(r["gg"]["loc"], r["gg"]["scale"], r["gg"]["beta"], r["n"])
        gauss = gg.GGFit(
            r["gaussian"]["loc"], gg.scale_for_std(r["gaussian"]["std"], 2.0), 2.0, r["n"]
        )
        grid = np.linspace(lo, hi, 600)
        ax.semilogy(grid, np.exp(fit.logpdf(grid)), label=f"GG, shape {fit.beta:.2f}")
        ax.semilogy(grid, np.exp(gauss.logpdf(grid)), "--", label="Gaussian")
        seen = density[density > 0]
        if seen.size:
            ax.set_ylim(0.3 * seen.min(), 3.0 * seen.max())
        ax.set_title(f"{name}  (LL gain {r['ll_gain']:.3f} nats/elem)", fontsize=9)
        ax.yaxis.set_major_locator(LogLocator(numticks=6))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("value")
        ax.legend(fontsize=7, loc="upper right")

    def figure(names: list[str], path: Path) -> Path:
        cols = min(PLOT_COLUMNS, len(names))
        rows = -(-len(names) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names, strict=False):
            draw(ax, name)
        for ax in list(axes.flat)[len(names) :]:
            ax.set_visible(False)
        for ax in axes[:, 0]:
            ax.set_ylabel("density")
        # Fixed margins: an automatic layout measures every log-axis tick label.
        fig.subplots_adjust(
            left=0.08 / cols**0.5,
            right=0.98,
            bottom=0.12 / rows**0.5,
            top=1 - 0.08 / rows**0.5,
            wspace=0.25,
            hspace=0.45,
        )
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path

    fitted = [n for n, r in results.items() if "skipped" not in r]
    written = []
    for kind in KINDS:
        names = [n for n in fitted if n.startswith(kind + "/")]
        if names:
            written.append(figure(names, out / f"{kind}.png"))
    overview = [f"{k}/all" for k in KINDS if f"{k}/all" in fitted]
    if overview:
        written.append(figure(overview, out / "overview.png"))
    return written


# --------------------------------------------------------------------------- command line


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ggcomm analyze",
        description="GG vs Gaussian fits and FL/EG/Huffman/codec bits per element of a "
        "GPT's weights, activations and gradients.",
    )
    src = p.add_argument_group("model")
    src.add_argument("--state-dict", type=Path, help="a saved ggcomm GPT state dict (torch.save)")
    src.add_argument("--train-steps", type=int, default=0, help="train this many steps first")
    src.add_argument("--n-layer", type=_positive(int), default=GPTConfig.n_layer)
    src.add_argument("--n-head", type=_positive(int), default=GPTConfig.n_head)
    src.add_argument("--n-embd", type=_positive(int), default=GPTConfig.n_embd)
    src.add_argument("--block-size", type=_positive(int), default=GPTConfig.block_size)
    src.add_argument("--seed", type=int, default=0)
    q = p.add_mutually_exclusive_group()
    q.add_argument(
        "--rel-step",
        type=_positive(float),
        help=f"quantization step relative to each group's RMS (default {DEFAULT_REL_STEP})",
    )
    q.add_argument(
        "--bits",
        type=_positive(float),
        help="instead, the step at which each group's GG fit predicts the codec sends this "
             "many bits per element",
    )
    p.add_argument("--batch-size", type=_positive(int), default=DEFAULT_BATCH_SIZE)
    p.add_argument(
        "--grad-batches",
        type=_positive(int),
        default=DEFAULT_GRAD_BATCHES,
        help="backward passes pooled for the gradient rows",
    )
    p.add_argument("--max-samples", type=_positive(int), default=DEFAULT_MAX_SAMPLES)
    p.add_argument(
        "--corpus-bytes",
        type=_positive(int),
        default=4_000_000,
        help="bytes of the stdlib corpus to read (training and batches)",
    )
    p.add_argument(
        "--threads",
        type=_positive(int),
        default=DEFAULT_THREADS,
        help="torch CPU threads (default %(default)s)",
    )
    p.add_argument("--json", type=Path, help="write the numbers here")
    p.add_argument("--plot-dir", type=Path, help="write histogram-with-fits PNGs here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.train_steps < 0:
        print("ggcomm analyze: --train-steps must be >= 0", file=sys.stderr)
        return 2
    if args.bits is not None and args.bits <= 1.0:
        print("ggcomm analyze: --bits must be above 1 (the EG minimum)", file=sys.stderr)
        return 2
    rel_step = (args.rel_step or DEFAULT_REL_STEP) if args.bits is None else None
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    if args.state_dict is not None:
        state = torch.load(args.state_dict, map_location="cpu", weights_only=True)
        try:
            config = config_from_state_dict(state, args.n_head)
            model = GPT(config)
            model.load_state_dict(state)
        except (ValueError, RuntimeError) as err:
            print(f"ggcomm analyze: {args.state_dict}: {err}", file=sys.stderr)
            return 2
    else:
        config = GPTConfig(
            n_layer=args.n_layer,
            n_head=args.n_head,
            n_embd=args.n_embd,
            block_size=args.block_size,
        )
        model = GPT(config)
    data = ByteDataset.from_stdlib(block_size=config.block_size, max_bytes=args.corpus_bytes)
    final_loss = None
    if args.train_steps:
        final_loss = train(
            model, data, args.train_steps, batch_size=args.batch_size, seed=args.seed
        )
    results, tensors = analyze_model(
        model,
        data,
        rel_step=rel_step,
        bits=args.bits,
        batch_size=args.batch_size,
        grad_batches=args.grad_batches,
        max_samples=args.max_samples,
        seed=args.seed,
    )
    quantization = (
        f"step = {rel_step:g} x RMS of each group"
        if rel_step is not None
        else f"step where the GG fit predicts {args.bits:g} codec bits per element"
    )
    trained = ""
    if final_loss is not None:
        trained = f", trained {args.train_steps} steps (last loss {final_loss:.3f})"
    source = f" from {args.state_dict}" if args.state_dict else trained
    print(f"GPT {model.num_parameters():,} parameters{source}\n")
    print(format_table(results, quantization))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "model": {
                **asdict(config),
                "parameters": model.num_parameters(),
                "state_dict": str(args.state_dict) if args.state_dict else None,
                "train_steps": args.train_steps,
                "final_loss": final_loss,
            },
            "quantization": {"rel_step": rel_step, "bits": args.bits},
            "groups": results,
        }
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    if args.plot_dir is not None:
        files = plot(results, tensors, args.plot_dir)
        print(f"wrote {len(files)} plots to {args.plot_dir}")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0
