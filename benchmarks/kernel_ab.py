"""The codec kernels of this checkout against another revision's, called in turn in one
process.

On this shared machine one call's time moves by up to 2x between runs, so two runs of
``codec_bench.py`` cannot show a change of 10-30%. Here the other revision's
``kernels/eg.py`` is loaded from git as a module of its own (the kernels need nothing else
from the package but ``kernels/_intrinsics.py``, whose intrinsics it uses must be unchanged), and
``ggcomm.encode`` and ``ggcomm.decode(out=)`` run on the same tensor with the base kernels
and with this checkout's, alternating, one thread; the medians and their ratios are
reported. The frames (and decoded values) must be the same: this measures changes that
move time, never bits.

    python benchmarks/kernel_ab.py --base abb6364   # -> results/kernel_ab.{md,json}
    python benchmarks/kernel_ab.py --base HEAD --mib 0.25 --reps 3 --out /tmp/ab
"""

from __future__ import annotations

import argparse
import ast
import datetime
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import ggcomm
from ggcomm import codec, gg
from ggcomm.kernels import eg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import codec_stages  # noqa: E402  (the same data makers and machine line)

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
GG = ((0.5, 2.0), (0.5, 3.0), (0.5, 4.5), (1.0, 2.0), (1.0, 3.0), (1.0, 4.5), (2.0, 2.0),
      (2.0, 3.0), (2.0, 4.5), (3.0, 2.0), (3.0, 3.0), (3.0, 4.5))  # (shape, bits)
HALF_ZEROS = (0.5, 1 / 48)  # zero share, step of the unit Laplace nonzeros (wide symbols)


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True,
                          text=True).stdout


def _definitions(source: str) -> dict[str, str]:
    """Each top-level statement of a module's source that defines a name (functions,
    classes, assignments, imports), as its dumped syntax tree, by name."""
    defs = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defs[node.name] = ast.dump(node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.Import, ast.ImportFrom)):
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, ast.AnnAssign) else node.names)
            for t in targets:
                name = getattr(t, "id", None) or getattr(t, "asname", None) or \
                    getattr(t, "name", None)
                if name:
                    defs[name] = ast.dump(node)
    return defs


def load_kernels(rev: str, where: Path):
    """Revision ``rev``'s ``kernels/eg.py`` as a module of its own, compiled into ``where``.
    Raises ValueError if an intrinsic that revision's ``kernels/_intrinsics.py`` defines is
    missing or defined differently in this checkout's (its kernels would not be what ran
    then); intrinsics added since are allowed."""
    ours = _definitions((REPO / "kernels" / "_intrinsics.py").read_text())
    theirs = _definitions(_git("show", f"{rev}:kernels/_intrinsics.py"))
    changed = sorted(n for n, d in theirs.items() if ours.get(n) != d)
    if changed:
        raise ValueError(f"kernels/_intrinsics.py differs at {rev} ({', '.join(changed)}): "
                         "not comparable this way")
    src = _git("show", f"{rev}:kernels/eg.py")
    name = "eg_base_" + _git("rev-parse", "--short", rev).strip()
    path = where / f"{name}.py"
    path.write_text(src.replace("from ._intrinsics import",
                                "from ggcomm.kernels._intrinsics import"))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def data(numel: int) -> list[tuple[str, torch.Tensor, float]]:
    """(label, tensor, step) per row: GG shapes at 2-4.5 bits, 90% zeros (codec_stages'
    rows), and half exact zeros with wide nonzeros (like the DDP hook's gradient buckets
    of a ReLU MLP: most symbols past 63)."""
    rows = [codec_stages.make(beta, bits, numel, seed=i) for i, (beta, bits) in enumerate(GG)]
    rows.append(codec_stages.make(None, 3.0, numel, seed=len(GG)))
    zeros, step = HALF_ZEROS
    gen = torch.Generator().manual_seed(len(GG) + 1)
    x = gg.sample(numel, 1.0, generator=gen)
    x[torch.rand(numel, generator=gen) < zeros] = 0.0
    rows.append((f"{zeros:.0%} zeros, GG beta=1 nonzeros at step 1/{1 / step:g}", x, step))
    return rows


def ab(x: torch.Tensor, step: float, base, reps: int) -> dict:
    """Median seconds of ``ggcomm.encode(x, step)`` and of ``ggcomm.decode(frame, out=)``
    with the base kernels and with this checkout's, called in turn (a warm-up call each
    first); the frames and the decoded values must be the same."""
    kernels = {"base": base, "this": eg}
    luts = {k: m.build_luts() for k, m in kernels.items()}  # each decoder its own tables
    frames, outs = {}, {k: torch.empty_like(x) for k in kernels}
    enc, dec = {k: [] for k in kernels}, {k: [] for k in kernels}
    luts_fn = codec._luts

    def use(k: str) -> None:  # the codec calls kernels[k] and decodes with its tables
        codec.eg, codec._luts = kernels[k], (lambda: luts[k])

    try:
        for k in kernels:
            use(k)
            frames[k] = codec.encode(x, step)
            codec.decode(frames[k], out=outs[k])
        if not torch.equal(frames["base"].buffer, frames["this"].buffer):
            raise RuntimeError("the two revisions' frames differ: this compares speed only")
        if not torch.equal(outs["base"].view(torch.int32), outs["this"].view(torch.int32)):
            raise RuntimeError("the two revisions decode the frame differently")
        for _ in range(reps):
            for k in kernels:
                use(k)
                t0 = time.perf_counter()
                codec.encode(x, step)
                t1 = time.perf_counter()
                codec.decode(frames[k], out=outs[k])
                enc[k].append(t1 - t0)
                dec[k].append(time.perf_counter() - t1)
    finally:
        codec.eg, codec._luts = eg, luts_fn
    ns = {f"{k}_{what}_ns": statistics.median(t[k]) / x.numel() * 1e9
          for what, t in (("encode", enc), ("decode", dec)) for k in kernels}
    names = [b.mode for b in codec.inspect(frames["this"]).blocks]
    return {"bits": frames["this"].bits_per_element, **ns,
            "encode_speedup": ns["base_encode_ns"] / ns["this_encode_ns"],
            "decode_speedup": ns["base_decode_ns"] / ns["this_decode_ns"],
            "modes": {m: names.count(m) for m in sorted(set(names))}}


def render(rows: list[dict], args: argparse.Namespace, base_rev: str, this_rev: str) -> str:
    lines = [
        "# Codec A/B: this checkout's kernels against another revision's, alternating",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}; "
        f"command: `python benchmarks/kernel_ab.py --base {args.base}"
        + (f" --mib {args.mib:g}" if args.mib != 16.0 else "")
        + (f" --reps {args.reps}" if args.reps != 15 else "") + "`",
        f"- base {base_rev}, this checkout {this_rev}",
        f"- {codec_stages.machine_line()}",
        f"- one thread; {args.mib:g} MiB of float32 per tensor; `ggcomm.encode(x, step)` "
        "and `ggcomm.decode(frame, out=)` with the base kernels and with this checkout's in "
        f"turn, {args.reps} times each after a warm-up; medians in ns per element. Every "
        "row's frames are byte for byte the same, and so are the decoded values.",
        "",
        "| data | bits | blocks | encode, base | encode, this | encode speedup "
        "| decode, base | decode, this | decode speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        modes = ", ".join(f"{m} {c}" for m, c in r["modes"].items())
        lines.append(f"| {r['label']} | {r['bits']:.3f} | {modes} | "
                     f"{r['base_encode_ns']:.2f} | {r['this_encode_ns']:.2f} | "
                     f"{r['encode_speedup']:.2f}x | {r['base_decode_ns']:.2f} | "
                     f"{r['this_decode_ns']:.2f} | {r['decode_speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the git revision to compare against")
    p.add_argument("--mib", type=float, default=16.0)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ggcomm.set_num_threads(1)
    numel = int(args.mib * (1 << 20)) // 4
    base_rev = _git("rev-parse", "--short", args.base).strip()
    this_rev = _git("rev-parse", "--short", "HEAD").strip()
    if _git("status", "--porcelain", "--", "kernels"):
        this_rev += " with uncommitted kernel changes"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = load_kernels(args.base, Path(tmp))
        for label, x, step in data(numel):
            rows.append({"label": label, **ab(x, step, base, args.reps)})
            print(f"{label}: encode {rows[-1]['encode_speedup']:.2f}x, decode "
                  f"{rows[-1]['decode_speedup']:.2f}x", file=sys.stderr)
    out_dir = args.out or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kernel_ab.md").write_text(render(rows, args, base_rev, this_rev))
    (out_dir / "kernel_ab.json").write_text(json.dumps(
        {"base": base_rev, "this": this_rev, "mib": args.mib, "reps": args.reps,
         "machine": codec_stages.machine_line(), "rows": rows}, indent=1))
    print(f"wrote {out_dir / 'kernel_ab'}.md and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
