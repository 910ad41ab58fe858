"""DeepShape and RF8 on the GPT's weights: bits per weight and accuracy against bf16, fp8
e4m3 and int8, with and without GG initialization + BackSlash (the earlier version of
arXiv 2506.00486).

For each seed the built-in byte-level GPT is trained twice: conventionally (its own GPT-2
initialization, AdamW) and with GG initialization (shape ``--gg-shape``) plus BackSlash
after every AdamW step. The weight matrices of each trained model (Linear and Embedding,
the weights GG init and BackSlash touch) are then stored every way below, and the model is
evaluated with the stored weights (biases and LayerNorm stay in fp32 throughout):

* ``fp32``, ``bf16``; ``fp8 e4m3`` (``torch.float8_e4m3fn``, one fp32 scale per tensor,
  amax to 448); ``int8`` (symmetric, one fp32 scale per output row, amax to 127);
* ``RF8`` (:mod:`ggcomm.rf8`: the bytes of ``rf8.encode`` counted);
* ``EG`` at DeepShape's grid (fixed point with 13 fractional bits, no remap): the paper's
  EG bits (one best order for all weights) and ggcomm's frame bits (``codec.encode`` at
  step 2^-13, every block its own code);
* ``DeepShape + EG`` (:func:`ggcomm.methods.deepshape.deepshape_`, the authors' settings,
  its count threshold scaled to the model's size), and the same after a short fine-tune
  (``--finetune-steps`` of AdamW at ``--finetune-lr``, the weights then put back on the
  grid).

    python benchmarks/paper/deepshape_rf8.py            # results/paper/deepshape_rf8.*
    python benchmarks/paper/deepshape_rf8.py --quick    # smoke run: deepshape_rf8-quick.*
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import _common as common
import matplotlib.pyplot as plt
import numpy as np
import torch

from ggcomm import codec, gg, rate, rf8
from ggcomm.methods.backslash import BackSlash
from ggcomm.methods.deepshape import deepshape_, scaled_min_count
from ggcomm.methods.init import apply_gg_init
from ggcomm.tools.workload import GPT

DEFAULT_STEPS = 1200
QUICK_STEPS = 10
SEEDS = (0, 1, 2)
METHODS = ("conventional", "gg+backslash")
GG_SHAPE = 1.0
"""GG-init shape of the gg+backslash runs (init_backslash.md: the shape with BackSlash's
best accuracy at this scale)."""
STRENGTH, CLIP = 1e-4, 0.1
"""BackSlash settings, as in init_backslash.py."""
FRAC_BITS = (13, 10)
"""DeepShape's fixed-point grids: the authors' 13 fractional bits, and a 3-bit coarser one
whose error is between int8's and fp8's on these weights."""
FINETUNE_STEPS = 100
QUICK_FINETUNE_STEPS = 3
FINETUNE_LR = 3e-4
FORMATS = ("fp32", "bf16", "fp8 e4m3", "int8", "RF8", *[
    f"{what} (2^-{f})" for f in FRAC_BITS
    for what in ("EG", "DeepShape + EG", "DeepShape + fine-tune + EG")])
LOSS_LOG_EVERY = 10


def weight_matrices(model: GPT) -> dict[str, torch.nn.Parameter]:
    """The Linear and Embedding weights (every 2-d parameter of the GPT)."""
    return {n: p for n, p in model.named_parameters() if p.dim() == 2}


def train(setup: common.Setup, data: Any, method: str, steps: int, seed: int) -> GPT:
    torch.manual_seed(seed)
    model = GPT(setup.gpt)
    after = []
    if method == "gg+backslash":
        touched = apply_gg_init(model, GG_SHAPE, generator=torch.Generator().manual_seed(seed))
        assert set(touched.weights) == set(weight_matrices(model))
        bs = BackSlash(touched.weights.items(), strength=STRENGTH, clip=CLIP)
        after = [lambda step: bs.step()]
    common.train_gpt(model, data, setup, steps, seed + 1, after_step=after)
    return model


def _fixed_point(w: torch.Tensor, frac_bits: int) -> torch.Tensor:
    return torch.round(w.double() * 2.0**frac_bits)


def _eg_bits(weights: list[torch.Tensor], frac_bits: int) -> dict[str, float]:
    """Bits per weight of weights on the 2^-frac_bits grid: the paper's EG (one best order)
    and the codec's frames."""
    n = sum(w.numel() for w in weights)
    q = torch.cat([_fixed_point(w, frac_bits).reshape(-1) for w in weights]).long()
    frame = sum(codec.encode(w.detach(), 2.0**-frac_bits).nbytes for w in weights)
    return {"bits": 8.0 * frame / n, "eg_paper": rate.summary(q)["eg"]}


def store(name: str, model: GPT, setup: common.Setup, data: Any, seed: int,
          finetune_steps: int = FINETUNE_STEPS) -> dict[str, Any]:
    """Replace ``model``'s weight matrices by their ``name`` form; returns bits per weight
    (what the stored form takes) and what else was measured."""
    ws = list(weight_matrices(model).values())
    n = sum(w.numel() for w in ws)
    out: dict[str, Any] = {}
    with torch.no_grad():
        if name == "fp32":
            out["bits"] = 32.0
        elif name == "bf16":
            for w in ws:
                w.copy_(w.bfloat16().float())
            out["bits"] = 16.0
        elif name == "fp8 e4m3":
            for w in ws:
                scale = w.abs().amax().clamp_min(1e-30) / 448.0
                w.copy_((w / scale).to(torch.float8_e4m3fn).float() * scale)
            out["bits"] = 8.0 + 32.0 * len(ws) / n
        elif name == "int8":
            rows = 0
            for w in ws:
                scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 127.0
                w.copy_(torch.round(w / scale).clamp(-127, 127) * scale)
                rows += w.shape[0]
            out["bits"] = 8.0 + 32.0 * rows / n
        elif name == "RF8":
            out["bits"] = 8.0 * sum(rf8.encode(w).numel() for w in ws) / n
            rf8.quantize_(ws)
        elif name.startswith("EG"):
            frac = _frac_bits(name)
            for w in ws:
                w.copy_(_fixed_point(w, frac) / 2.0**frac)
            out.update(_eg_bits(ws, frac))
        elif name.startswith("DeepShape"):
            frac = _frac_bits(name)
            report = deepshape_(ws, frac_bits=frac, min_count=scaled_min_count(n))
            out["deepshape"] = {
                "param_max": report.param_max, "n_body": report.n_body,
                "n_tail": report.n_tail, "fitted_beta": report.fitted.beta,
                "fitted_scale": report.fitted.scale, "target_beta": report.target_beta,
                "target_scale": report.target_scale, "moved": report.moved,
                "min_count": scaled_min_count(n),
            }
            out["body_beta_after"] = gg.fit(torch.cat([
                w.reshape(-1) for w in ws])[_body_mask(ws, report.param_max, frac)]).beta
            if "fine-tune" in name:
                ft = dataclasses.replace(setup, lr=FINETUNE_LR, warmup=0.0)
                with torch.enable_grad():
                    common.train_gpt(model, data, ft, finetune_steps, 20_000 + seed)
                for w in ws:
                    w.copy_(_fixed_point(w, frac) / 2.0**frac)
            out.update(_eg_bits(ws, frac))
        else:
            raise ValueError(name)
    return out


def _frac_bits(name: str) -> int:
    return int(name.rsplit("2^-", 1)[1].rstrip(")"))


def _body_mask(ws: list[torch.Tensor], param_max: int, frac_bits: int) -> torch.Tensor:
    return torch.cat([_fixed_point(w, frac_bits).reshape(-1).abs() <= param_max for w in ws])


def run_seed(setup: common.Setup, data: Any, method: str, steps: int, seed: int,
             finetune_steps: int = FINETUNE_STEPS) -> dict[str, Any]:
    trained = train(setup, data, method, steps, seed)
    ref = torch.cat([w.detach().reshape(-1) for w in weight_matrices(trained).values()])
    rows = {}
    for name in FORMATS:
        model = copy.deepcopy(trained)  # every format starts from the trained weights
        r = store(name, model, setup, data, seed, finetune_steps)
        got = torch.cat([w.detach().reshape(-1) for w in weight_matrices(model).values()])
        r["rel_err"] = float((got - ref).norm() / ref.norm())
        r.update(common.evaluate(model, data, setup, seed))
        rows[name] = r
    return {"method": method, "seed": seed, "n_weights": int(ref.numel()),
            "beta": gg.fit(ref).beta, "formats": rows}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def report(runs: list[dict[str, Any]], setup: common.Setup, steps: int,
           finetune_steps: int = FINETUNE_STEPS) -> list[str]:
    seeds = sorted({r["seed"] for r in runs})
    n = runs[0]["n_weights"]
    lines = [
        "# DeepShape and RF8: bits per weight and accuracy (small scale)",
        "",
        f"Byte-level GPT ({setup.gpt.n_layer} layers, width {setup.gpt.n_embd}; {n:,} weights "
        f"in its Linear and Embedding matrices), {steps} training steps per run, seeds "
        f"{', '.join(map(str, seeds))}. conventional: GPT-2 initialization, AdamW; "
        f"gg+backslash: GG initialization (shape {GG_SHAPE:g}) and BackSlash (strength "
        f"{STRENGTH:g}, clip {CLIP:g}) after every AdamW step. Each trained model's weight "
        "matrices are stored in each format and the model evaluated with them (next-byte "
        f"accuracy on {setup.eval_batches * setup.eval_batch_size} held-out windows). "
        f"DeepShape: {' and '.join(map(str, FRAC_BITS))} fractional bits, shape x 0.8, "
        "scale x 0.6, count threshold "
        f"{scaled_min_count(n)} (the authors' 1000 scaled to {n:,} weights); fine-tune: "
        f"{finetune_steps} AdamW steps at lr {FINETUNE_LR:g}.",
        "",
        "bits: what the stored form takes per weight (scales, bases and frame headers "
        "included; EG rows: ggcomm frames at the grid's step, and in brackets the paper's EG with "
        "one best order). rel. error: ||w_stored - w|| / ||w||. Mean over seeds, +- the "
        "standard deviation between them.",
        "",
    ]
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        beta = _mean_sd([r["beta"] for r in mine])[0]
        lines += [f"## {method} (trained weights: fitted GG shape {beta:.2f})", ""]
        header = ["format", "bits / weight", "rel. error", "val loss", "accuracy",
                  "accuracy vs fp32"]
        rows = []
        base = [r["formats"]["fp32"]["accuracy"] for r in mine]
        for name in FORMATS:
            f = [r["formats"][name] for r in mine]
            bits = _mean_sd([x["bits"] for x in f])[0]
            paper = f" ({_mean_sd([x['eg_paper'] for x in f])[0]:.2f})" if "eg_paper" in f[0] \
                else ""
            err = _mean_sd([x["rel_err"] for x in f])[0]
            loss, loss_sd = _mean_sd([x["val_loss"] for x in f])
            acc, acc_sd = _mean_sd([x["accuracy"] for x in f])
            delta, delta_sd = _mean_sd([x["accuracy"] - b for x, b in zip(f, base,
                                                                           strict=True)])
            rows.append([name, f"{bits:.2f}{paper}", f"{err:.4f}", f"{loss:.4f} +- {loss_sd:.4f}",
                         f"{acc:.2%} +- {acc_sd:.2%}",
                         f"{100 * delta:+.2f} +- {100 * delta_sd:.2f} pt"])
        lines += common.markdown_table(header, rows) + [""]
        for frac in FRAC_BITS:
            lines += _deepshape_line(mine, frac, n)
    return lines


def _deepshape_line(mine: list[dict[str, Any]], frac: int, n: int) -> list[str]:
    name = f"DeepShape + EG (2^-{frac})"
    ds = [r["formats"][name]["deepshape"] for r in mine]

    def mean(key: str, scale: float = 1.0) -> float:
        return _mean_sd([d[key] / scale for d in ds])[0]

    after = _mean_sd([r["formats"][name]["body_beta_after"] for r in mine])[0]
    return [
        f"DeepShape at 2^-{frac}, body: |q| <= {mean('param_max'):.0f} levels on average "
        f"({mean('n_body', n):.1%} of the weights), fitted shape {mean('fitted_beta'):.2f} -> "
        f"target {mean('target_beta'):.2f}, measured after the remap {after:.2f}.",
        "",
    ]


def figure(runs: list[dict[str, Any]]) -> Any:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for ax, method in zip(axes, METHODS, strict=True):
        mine = [r for r in runs if r["method"] == method]
        for i, name in enumerate(FORMATS):
            if not mine:
                continue
            bits = np.mean([r["formats"][name]["bits"] for r in mine])
            acc = [r["formats"][name]["accuracy"] for r in mine]
            ax.errorbar(bits, np.mean(acc), yerr=np.std(acc), fmt="osD^v<>"[i % 7], capsize=3,
                        color=plt.cm.tab20(i / len(FORMATS)), label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bits per weight (log scale)")
        ax.set_title(method)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("next-byte accuracy")
    axes[1].legend(fontsize=8, loc="lower right")
    return fig


def main(argv: list[str] | None = None) -> list[Any]:
    p = common.parser(__doc__.splitlines()[0], DEFAULT_STEPS, QUICK_STEPS)
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = p.parse_args(argv)
    steps, setup, data = common.start(args, common.Setup(), common.Setup(eval_batches=2))
    seeds = args.seeds[:1] if args.quick else args.seeds
    finetune = QUICK_FINETUNE_STEPS if args.quick else FINETUNE_STEPS
    runs = []
    for seed in seeds:
        for method in args.methods:
            r = run_seed(setup, data, method, steps, seed, finetune)
            runs.append(r)
            f = r["formats"]
            print(f"{method:13s} seed {seed}: acc fp32 {f['fp32']['accuracy']:.4f}  " + "  ".join(
                f"{k} {v['bits']:.2f}b {v['accuracy']:.4f}" for k, v in f.items()
                if k != "fp32"), flush=True)
    payload = {
        "benchmark": "deepshape_rf8", "steps": steps, "seeds": seeds,
        "setup": common.setup_dict(setup), "gg_shape": GG_SHAPE,
        "backslash": {"strength": STRENGTH, "clip": CLIP}, "frac_bits": list(FRAC_BITS),
        "finetune": {"steps": finetune, "lr": FINETUNE_LR},
        "environment": common.environment(), "runs": runs,
    }
    paths = common.write(args, "deepshape_rf8", report(runs, setup, steps, finetune), payload,
                         figure(runs))
    print("wrote", *map(str, paths))
    return paths


if __name__ == "__main__":
    main()
