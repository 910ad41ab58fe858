"""Smoke tests of the paper-reproduction benchmarks: each runs in quick mode and writes its
table, JSON and plot."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

PAPER = Path(__file__).resolve().parents[1] / "benchmarks" / "paper"


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _script(name: str):  # noqa: ANN202
    if str(PAPER) not in sys.path:
        sys.path.insert(0, str(PAPER))
    return importlib.import_module(name)


def _outputs(paths: list[Path], stem: str) -> tuple[str, dict]:
    assert [p.name for p in paths] == [f"{stem}-quick.{ext}" for ext in ("md", "json", "png")]
    assert paths[2].stat().st_size > 10_000  # a rendered figure, not an empty file
    return paths[0].read_text(), json.loads(paths[1].read_text())


def test_init_backslash_quick(tmp_path: Path) -> None:
    mod = _script("init_backslash")
    md, payload = _outputs(mod.main(["--quick", "--steps", "3", "--out", str(tmp_path)]),
                           "init_backslash")  # fmt: skip
    assert "## Table 1" in md and "## Table 2" in md
    assert "| initial, paper | 2.62 | 6.79 | 7.22 | 7.38 |" in md
    runs = payload["runs"]
    assert [(r["shape"], r["method"]) for r in runs] == [
        (s, m) for s in (0.1, 0.5, 1.0, 2.0) for m in ("conventional", "backslash")
    ]
    # the step is calibrated on the shape-2 initialization: 7.38 bits there
    gaussian = next(r for r in runs if r["shape"] == 2.0)
    assert gaussian["initial"]["entropy"] == pytest.approx(7.38, abs=0.01)
    # lower shapes start with lower entropy at the same variance
    initial = [r["initial"]["entropy"] for r in runs[::2]]
    assert initial == sorted(initial)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in runs)


def test_gct_sweep_quick(tmp_path: Path) -> None:
    mod = _script("gct_sweep")
    md, payload = _outputs(mod.main(["--quick", "--steps", "3", "--out", str(tmp_path)]),
                           "gct_sweep")  # fmt: skip
    assert "## Lambda sweep" in md and "| conventional |" in md
    runs = payload["runs"]
    assert [r["lam0"] for r in runs] == [None, *mod.LAMS, mod.NO_DECAY_LAM, None]
    assert [r["seed"] for r in runs] == [0] * (len(runs) - 1) + [1]
    for r in runs:
        assert len(r["loss"]) == len(r["grad_bits"]) == 3
        assert all(1.0 <= b < 32.0 for b in r["grad_bits"])
    # the first step has no secant yet: every run of one seed computes the same gradient
    assert len({r["grad_bits"][0] for r in runs[:-1]}) == 1


def test_deepshape_rf8_quick(tmp_path: Path) -> None:
    mod = _script("deepshape_rf8")
    md, payload = _outputs(mod.main(["--quick", "--steps", "3", "--out", str(tmp_path)]),
                           "deepshape_rf8")  # fmt: skip
    assert "## conventional" in md and "## gg+backslash" in md and "| RF8 | 8.04 |" in md
    runs = payload["runs"]
    assert [(r["method"], r["seed"]) for r in runs] == [("conventional", 0), ("gg+backslash", 0)]
    for r in runs:
        f = r["formats"]
        assert list(f) == list(mod.FORMATS)
        assert f["fp32"]["rel_err"] == 0.0 and f["bf16"]["bits"] == 16.0
        assert 0.035 < f["RF8"]["rel_err"] < 0.045  # RF8's documented 4% RMS error
        for frac in mod.FRAC_BITS:  # DeepShape sharpens the weights: fewer EG bits
            assert f[f"DeepShape + EG (2^-{frac})"]["bits"] < f[f"EG (2^-{frac})"]["bits"]
        assert all(0.0 <= v["accuracy"] <= 1.0 for v in f.values())
