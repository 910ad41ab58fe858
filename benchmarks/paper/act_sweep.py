"""ACT lambda sweep: accuracy against activation bits (paper Fig. 3) and loss and bits per
step against conventional training (paper Fig. 4a-b).

The built-in byte-level GPT is cut into two pipeline stages after block ``SPLIT``; the
boundary activation (the residual stream stage 0 would send to stage 1, one tensor of
batch x sequence x width per micro-batch) is what ACT constrains, through a forward hook
(:meth:`ggcomm.methods.act.ACT.attach`). Every run starts from the same weights and sees the same
batches; lambda = 0 is conventional training, with the same hook only measuring.

Recorded per run:

* every step: training loss and the codec's bits per element for that step's boundary
  activation (the exact frame size of :func:`ggcomm.codec.encode`, from ACT's rate model);
* after training, on fixed validation batches: loss and next-token accuracy with the
  boundary activation passed on as is, and passed through the codec (encoded and decoded
  at the same step, what a pipeline sending it with ggcomm computes); the boundary
  activation's FL / EG / HM / codec bits per element, fitted GG shape, RMS, max |a| and
  max |a| / RMS (outliers), and fraction of zeros.

Conventional training is repeated with ``NOISE_SEEDS`` to show the seed-to-seed spread the
differences should be read against.

Quantization: one fixed step, ``STEP``, for every run (the paper quantizes activations
with one step; with this one, conventional training's activations take 10-15 bits per
element, the paper's "unconstrained" range).

    python benchmarks/paper/act_sweep.py            # results/paper/act_sweep.{md,json,png}
    python benchmarks/paper/act_sweep.py --quick    # smoke run: act_sweep-quick.*
"""

from __future__ import annotations

import math
import time
from typing import Any

import _common as common
import matplotlib.pyplot as plt
import numpy as np
import torch

from ggcomm import codec, gg, rate
from ggcomm.methods.act import ACT
from ggcomm.tools.train import Step
from ggcomm.tools.workload import GPT, ByteDataset

SETUP = common.Setup(common.small_gpt(n_layer=4, n_head=4))
QUICK_SETUP = common.Setup(common.small_gpt(n_embd=32), eval_batches=2)
SPLIT = 1
"""Stage 0 is blocks 0..SPLIT; the boundary is the output of block SPLIT (the middle of the
4-block model)."""
STEP = 2.0**-9
"""Fixed quantization step of the boundary activation (noise RMS 5.6e-4). Conventional
training's boundary RMS grows from about 0.03 at initialization to about 0.8 here, so the
codec round trip's error stays below 0.1% of the trained signal, and conventional
training's activations take about 11 bits per element."""
LAMBDAS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
QUICK_LAMBDAS = (0.0, 0.3)
DEFAULT_STEPS = 400
QUICK_STEPS = 8
WARMUP = 0.3
"""Lambda ramps up linearly over the first 30% of the steps (the progressive schedule)."""
REL_STEP = 0.05
"""Second reading of the same activations: step 0.05 x their RMS (fixed precision relative
to the signal), which separates bits saved by reshaping the distribution from bits saved
by shrinking its scale under the fixed step."""
NOISE_SEEDS = (1, 2)
"""Conventional training is repeated with these seeds (other initialization and batch
order) to show how much accuracy and bits move from seed to seed alone."""
LOG_EVERY = 5
"""History resolution stored in the JSON (every step is measured; means of blocks of 5)."""

PAPER = "activation EG bits 10-18 (unconstrained) -> 3-8 (ACT), small accuracy loss"

GAP_SHAPES = (0.5, 1.0, 1.5, 2.0)
GAP_RATES = (1.2, 1.6, 2.0, 3.0, 4.0, 6.0, 8.0)
GAP_ELEMENTS = 1 << 16
"""Grid on which the training-time rate models are held to the codec: GG samples of these
shapes and size, each at the step where the GG predicts these EG bits per element."""


def rate_model_gap(shapes: tuple[float, ...], rates: tuple[float, ...]) -> list[dict]:
    """Relative error of three training-time rates against the codec's frame bits.

    ``smooth``: :func:`ggcomm.rate.eg_rate_surrogate` (smooth bound, best whole-tensor
    order); ``exact_forward``: the same with the exact EG length of the rounded symbols as
    its value (no frame overhead, no zero-run blocks); ``eg_rate``: :func:`ggcomm.rate.eg_rate`,
    ACT's rate model.
    """
    rows = []
    gen = torch.Generator().manual_seed(0)
    for beta in shapes:
        x = gg.sample(GAP_ELEMENTS, beta, generator=gen)
        fit = gg.fit(x)
        for target in rates:
            step = rate.step_for_rate(fit, target)
            sent = codec.encode(x, step).bits_per_element
            _, k = rate.eg_bits(rate.signed_to_unsigned(rate.quantize(x, step)))
            models = {
                "smooth": rate.eg_rate_surrogate(x, step, k),
                "exact_forward": rate.eg_rate_surrogate(x, step, k, exact_forward=True),
                "eg_rate": rate.eg_rate(x, step),
            }
            rows.append(
                {"beta": beta, "target": target, "codec": sent}
                | {name: float(v) / sent - 1.0 for name, v in models.items()}
            )
    return rows


def gap_report(rows: list[dict]) -> list[str]:
    lines = [
        "",
        "## Training-time rate against the bits the codec sends",
        "",
        f"GG samples of {GAP_ELEMENTS} elements at the step where the GG predicts the "
        "target EG bits; relative error of each rate's value against the codec's frame "
        "bits per element (headers included). smooth: the smooth EG-length bound; "
        "exact forward: exact EG lengths of the rounded symbols at the best whole-tensor "
        "order; eg_rate: ACT's rate model.",
        "",
    ]
    table = []
    for r in rows:
        table.append(
            [f"{r['beta']:g}", f"{r['target']:g}", f"{r['codec']:.3f}"]
            + [f"{100 * r[m]:+.2f}%" for m in ("smooth", "exact_forward", "eg_rate")]
        )
    lines += common.markdown_table(
        ["GG shape", "target bits", "codec bits", "smooth", "exact forward", "eg_rate"], table
    )
    usual = [r for r in rows if r["target"] >= 2.0]
    lines.append("")
    for name in ("smooth", "exact_forward", "eg_rate"):
        errs = [100 * r[name] for r in usual]
        lines.append(
            f"- {name}: {min(errs):+.2f}% to {max(errs):+.2f}% at 2-8 bits; "
            f"at most {max(abs(100 * r[name]) for r in rows):.1f}% off over all rows"
        )
    return lines


def boundary(model: GPT) -> torch.nn.Module:
    return model.blocks[SPLIT]


def train(
    setup: common.Setup, data: ByteDataset, lam: float, steps: int, seed: int
) -> tuple[GPT, dict[str, list[float]]]:
    """Train one run; returns the model and its per-step history (cut short if the loss
    stops being finite)."""
    torch.manual_seed(seed)
    model = GPT(setup.gpt)
    act = ACT(lam, step=STEP, warmup_steps=max(1, round(WARMUP * steps)))
    act.attach({"boundary": boundary(model)})

    def record(step: Step) -> None:
        step.record["bits"] = act.stats()["boundary"].bits
        step.record["lam"] = act.current_lam
        act.step()
        step.stop = not math.isfinite(step.record["loss"])

    records, _ = common.train_gpt(model, data, setup, steps, seed, penalties=[act.penalty],
                           after_step=[record])  # fmt: skip
    act.remove()
    return model, {key: [r[key] for r in records] for key in ("loss", "bits", "lam")}


@torch.no_grad()
def boundary_batch(model: GPT, data: ByteDataset, setup: common.Setup, seed: int) -> torch.Tensor:
    """The boundary activations of the validation batches ``common.evaluate`` uses, concatenated."""
    captured: list[torch.Tensor] = []
    handle = boundary(model).register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        common.evaluate(model, data, setup, seed)
    finally:
        handle.remove()
    return torch.cat([a.reshape(-1) for a in captured])


def evaluate_through_codec(model: GPT, data: ByteDataset, setup: common.Setup, seed: int) -> dict:
    """``common.evaluate`` with the boundary activation encoded and decoded at ``STEP``."""
    handle = boundary(model).register_forward_hook(
        lambda m, i, o: codec.decode(codec.encode(o, STEP))
    )
    try:
        return common.evaluate(model, data, setup, seed)
    finally:
        handle.remove()


def activation_stats(a: torch.Tensor) -> dict[str, float]:
    """Code lengths at ``STEP`` and shape statistics of boundary activations ``a``."""
    q = rate.quantize(a, STEP)
    codes = rate.summary(q)
    rms = rate.rms(a)
    peak = float(a.abs().max())
    return {
        "fl": float(codes["fl"]),
        "eg": codes["eg"],
        "hm": codes["hm"],
        "codec": rate.codec_bits(a, STEP) / a.numel(),
        "codec_rel": rate.codec_bits(a, REL_STEP * rms) / a.numel(),
        "beta": gg.fit(a).beta,
        "rms": rms,
        "max_abs": peak,
        "peak_to_rms": peak / rms,
        "zeros": float((q == 0).double().mean()),
    }


def run(
    setup: common.Setup, data: ByteDataset, lam: float, steps: int, seed: int
) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, history = train(setup, data, lam, steps, seed)
    seconds = time.perf_counter() - t0
    if len(history["loss"]) < steps:
        return {"lam": lam, "seed": seed, "diverged_at": len(history["loss"])}
    a = boundary_batch(model, data, setup, seed)
    plain = common.evaluate(model, data, setup, seed)
    coded = evaluate_through_codec(model, data, setup, seed)
    blocks = max(1, LOG_EVERY if steps >= 4 * LOG_EVERY else 1)
    n = len(history["loss"]) // blocks * blocks

    def coarse(values: list[float]) -> list[float]:
        return np.asarray(values[:n]).reshape(-1, blocks).mean(axis=1).round(5).tolist()

    return {
        "lam": lam,
        "seed": seed,
        "val_loss": plain["val_loss"],
        "accuracy": plain["accuracy"],
        "val_loss_codec": coded["val_loss"],
        "accuracy_codec": coded["accuracy"],
        "activation": activation_stats(a),
        "train_seconds": seconds,
        "history": {
            "every": blocks,
            "loss": coarse(history["loss"]),
            "bits": coarse(history["bits"]),
            "lam": coarse(history["lam"]),
        },
    }


def report(
    runs: list[dict[str, Any]], noise: list[dict[str, Any]], setup: common.Setup, steps: int
) -> list[str]:
    base = runs[0]
    lines = [
        "# ACT: activation-constrained training, lambda sweep",
        "",
        f"GPT {setup.gpt.n_layer} blocks x width {setup.gpt.n_embd}, split into two stages after "
        f"block {SPLIT}; {steps} steps of batch {setup.batch_size} x {setup.gpt.block_size} "
        f"bytes of standard-library source, AdamW lr {setup.lr} (warm-up, cosine). ACT on "
        f"the boundary activation with fixed step {STEP:g}; lambda ramps in over the first "
        f"{WARMUP:.0%} of the steps. Evaluation: {setup.eval_batches} x "
        f"{setup.eval_batch_size} held-out sequences.",
        "",
        "Accuracy: next-token accuracy with the boundary activation as is / through the "
        "codec (encoded and decoded at the step). Bits per element of the boundary "
        "activation on the evaluation batches: FL (fixed length for the range), EG (best "
        "order, whole tensor), HM (Huffman), codec (ggcomm frame); codec@RMS: the codec's "
        f"bits at step {REL_STEP:g} x RMS instead (fixed precision relative to the signal). "
        "Peak/RMS: max |a| / RMS.",
        "",
    ]
    lines += _run_table(runs)
    lines += _seed_spread(base, noise)
    lines += ["", "Versus conventional training (lambda 0, same seed):", ""]
    if "diverged_at" not in base:
        lines += [_versus(r, base) for r in runs[1:] if "diverged_at" not in r]
    lines += ["", f"Paper (BERT/GPT/LLaMA/DeepSeek, Table 4 and Fig. 3-4): {PAPER}."]
    return lines


def _run_table(runs: list[dict[str, Any]]) -> list[str]:
    """One row per run: validation, accuracy and the boundary activation's statistics."""
    header = [
        "lambda",
        "val loss",
        "accuracy (as is / codec)",
        "FL",
        "EG",
        "HM",
        "codec",
        "codec@RMS",
        "GG shape",
        "RMS",
        "max abs",
        "peak/RMS",
        "zeros",
    ]
    rows = []
    for r in runs:
        label = "0 (conventional)" if r["lam"] == 0 else f"{r['lam']:g}"
        if "diverged_at" in r:
            rows.append([label, f"diverged at step {r['diverged_at']}"] + [""] * 11)
            continue
        a = r["activation"]
        rows.append(
            [
                label,
                f"{r['val_loss']:.3f}",
                f"{100 * r['accuracy']:.2f}% / {100 * r['accuracy_codec']:.2f}%",
                f"{a['fl']:.0f}",
                f"{a['eg']:.2f}",
                f"{a['hm']:.2f}",
                f"{a['codec']:.2f}",
                f"{a['codec_rel']:.2f}",
                f"{a['beta']:.2f}",
                f"{a['rms']:.3g}",
                f"{a['max_abs']:.3g}",
                f"{a['peak_to_rms']:.1f}",
                f"{100 * a['zeros']:.1f}%",
            ]
        )
    return common.markdown_table(header, rows)


def _seed_spread(base: dict[str, Any], noise: list[dict[str, Any]]) -> list[str]:
    """How much conventional training alone moves from seed to seed (none with one seed)."""
    finished = [r for r in [base, *noise] if "diverged_at" not in r]
    if len(finished) < 2:
        return []
    acc = np.array([100 * r["accuracy"] for r in finished])
    eg = np.array([r["activation"]["eg"] for r in finished])
    loss = np.array([r["val_loss"] for r in finished])
    seeds = ", ".join(str(r["seed"]) for r in finished)
    return [
        "",
        f"Seed to seed, conventional training alone (seeds {seeds}): accuracy "
        f"{acc.mean():.2f}% +- {acc.std(ddof=1):.2f} (range {acc.min():.2f}-{acc.max():.2f}),"
        f" val loss {loss.mean():.3f} +- {loss.std(ddof=1):.3f}, activation EG bits "
        f"{eg.mean():.2f} +- {eg.std(ddof=1):.2f}. The sweep's runs use seed {base['seed']}.",
    ]


def _versus(r: dict[str, Any], base: dict[str, Any]) -> str:
    """Run ``r`` against conventional training ``base`` of the same seed, as a list item."""
    a, b = r["activation"], base["activation"]
    return (
        f"- lambda {r['lam']:g}: activation EG bits {b['eg']:.2f} -> {a['eg']:.2f} "
        f"({100 * (1 - a['eg'] / b['eg']):.0f}% fewer; at {REL_STEP:g} x RMS "
        f"{b['codec_rel']:.2f} -> {a['codec_rel']:.2f}), accuracy "
        f"{100 * (r['accuracy'] - base['accuracy']):+.2f} points (through the codec "
        f"{100 * (r['accuracy_codec'] - base['accuracy_codec']):+.2f}), max |a| "
        f"{b['max_abs']:.3g} -> {a['max_abs']:.3g}, peak/RMS {b['peak_to_rms']:.1f} -> "
        f"{a['peak_to_rms']:.1f}"
    )


def figure(runs: list[dict[str, Any]], noise: list[dict[str, Any]]) -> Any:
    done = [r for r in runs if "diverged_at" not in r]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    ax = axes[0]
    bits = [r["activation"]["codec"] for r in done]
    ax.plot(bits, [100 * r["accuracy"] for r in done], "o-", label="as is")
    ax.plot(bits, [100 * r["accuracy_codec"] for r in done], "s--", label="through the codec")
    for r, b in zip(done, bits, strict=True):
        ax.annotate(f"λ={r['lam']:g}", (b, 100 * r["accuracy"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 4))  # fmt: skip
    spread = [r for r in noise if "diverged_at" not in r]
    if spread:
        ax.plot([r["activation"]["codec"] for r in spread],
                [100 * r["accuracy"] for r in spread], "kx",
                label="conventional, other seeds")  # fmt: skip
    ax.set_xlabel("boundary activation, codec bits / element")
    ax.set_ylabel("next-token accuracy, %")
    ax.set_title("(a) accuracy vs activation bits (Fig. 3)")
    ax.legend(fontsize=8)
    for ax, key, title in (
        (axes[1], "loss", "(b) training loss (Fig. 4a)"),
        (axes[2], "bits", "(c) activation bits per step (Fig. 4b)"),
    ):
        for r in done:
            h = r["history"]
            x = (np.arange(len(h[key])) + 0.5) * h["every"]
            label = "conventional" if r["lam"] == 0 else f"ACT λ={r['lam']:g}"
            ax.plot(x, h[key], lw=1.2, label=label)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend(fontsize=7)
    axes[1].set_ylabel("cross-entropy")
    axes[2].set_ylabel("codec bits / element")
    ax = axes[3]
    pos = np.arange(len(done))
    ax.bar(pos - 0.2, [r["activation"]["peak_to_rms"] for r in done], 0.4, label="max|a| / RMS")
    ax.bar(pos + 0.2, [r["activation"]["max_abs"] for r in done], 0.4, label="max|a|")
    ax.set_xticks(pos, [f"{r['lam']:g}" for r in done])
    ax.set_xlabel("lambda")
    ax.set_title("(d) outliers of the boundary activation")
    ax.legend(fontsize=8)
    return fig


def _summary_line(run: dict[str, Any]) -> str:
    if "diverged_at" in run:
        return f"lambda {run['lam']:g} (seed {run['seed']}): diverged at step {run['diverged_at']}"
    a = run["activation"]
    return (
        f"lambda {run['lam']:g} (seed {run['seed']}): val loss {run['val_loss']:.3f}, "
        f"accuracy {100 * run['accuracy']:.2f}% ({100 * run['accuracy_codec']:.2f}% through "
        f"the codec), activation {a['codec']:.2f} codec bits/elem, peak/RMS "
        f"{a['peak_to_rms']:.1f} ({run['train_seconds']:.0f} s)"
    )


def main(argv: list[str] | None = None) -> list[Any]:
    p = common.parser(__doc__.splitlines()[0], DEFAULT_STEPS, QUICK_STEPS)
    p.add_argument("--lambdas", type=float, nargs="+",
                   help=f"lambda values, 0 = conventional (default {' '.join(map(str, LAMBDAS))})")
    p.add_argument("--noise-seeds", type=int, nargs="*",
                   help="extra seeds for conventional training alone "
                   f"(default {' '.join(map(str, NOISE_SEEDS))}; none with --quick)")
    args = p.parse_args(argv)
    steps, setup, data = common.start(args, SETUP, QUICK_SETUP)
    lambdas = sorted({0.0, *(args.lambdas or (QUICK_LAMBDAS if args.quick else LAMBDAS))})
    noise_seeds = args.noise_seeds
    if noise_seeds is None:
        noise_seeds = [] if args.quick else list(NOISE_SEEDS)
    runs, noise = [], []
    for lam in lambdas:
        runs.append(run(setup, data, lam, steps, args.seed))
        print(_summary_line(runs[-1]), flush=True)
    for seed in noise_seeds:
        noise.append(run(setup, data, 0.0, steps, seed))
        print(_summary_line(noise[-1]), flush=True)
    gap = rate_model_gap(GAP_SHAPES[-1:] if args.quick else GAP_SHAPES,
                         GAP_RATES[::3] if args.quick else GAP_RATES)  # fmt: skip
    payload = {
        "setup": common.setup_dict(setup),
        "split_after_block": SPLIT,
        "step": STEP,
        "rel_step": REL_STEP,
        "warmup_fraction": WARMUP,
        "steps": steps,
        "seed": args.seed,
        "environment": common.environment(),
        "runs": runs,
        "conventional_other_seeds": noise,
        "rate_model_gap": gap,
    }
    fig = figure(runs, noise)
    markdown = report(runs, noise, setup, steps) + gap_report(gap)
    paths = common.write(args, "act_sweep", markdown, payload, fig)
    for path in paths:
        print(f"wrote {path}")
    return runs


if __name__ == "__main__":
    main()
