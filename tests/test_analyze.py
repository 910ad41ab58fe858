"""Tests for ggcomm.tools.analyze: the GG / code-length report of a GPT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ggcomm import gg
from ggcomm.tools import analyze, cli
from ggcomm.tools.workload import GPT, GPTConfig

TINY = [
    "--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
    "--batch-size", "4", "--grad-batches", "1", "--max-samples", "20000",
    "--corpus-bytes", "100000",
]  # fmt: skip


def test_measure_recovers_a_known_shape() -> None:
    x = gg.sample(100_000, 0.7, std=2.0, generator=torch.Generator().manual_seed(0))
    r = analyze.measure(x, rel_step=0.05)
    assert r["gg"]["beta"] == pytest.approx(0.7, abs=0.05)
    assert r["gaussian"]["std"] == pytest.approx(2.0, rel=0.05)
    assert r["ll_gain"] > 0.05  # a shape-0.7 sample is far from Gaussian
    assert r["step"] == pytest.approx(0.05 * float(x.square().mean().sqrt()), rel=1e-6)
    assert r["entropy"] <= r["hm"] <= r["entropy"] + 1.0
    assert r["eg"] >= r["entropy"] - 1e-9
    # the codec sends EG or, where cheaper, Golomb-Rice blocks; frame overhead is small here
    assert r["entropy"] <= r["codec"] <= 1.02 * r["eg"]
    at4 = analyze.measure(x, bits=4.0)
    assert at4["codec"] == pytest.approx(4.0, abs=0.1)  # the GG fit predicts the codec
    with pytest.raises(ValueError):
        analyze.measure(x, rel_step=0.05, bits=4.0)
    with pytest.raises(ValueError):
        analyze.measure(torch.zeros(100), rel_step=0.05)


def test_weight_measures_report_rf8_and_deepshape() -> None:
    x = gg.sample(50_000, 1.0, std=0.05, generator=torch.Generator().manual_seed(1))
    before = x.clone()
    r = analyze.weight_measures(x)
    assert torch.equal(x, before)  # measured on a copy
    assert 8.0 < r["rf8_bits"] < 8.05
    assert 0.03 < r["rf8_rel_err"] < 0.05  # RF8's documented ~4% RMS relative error
    # DeepShape sharpens the body (shape x 0.8, scale x 0.6): fewer EG bits on its grid
    assert r["ds_eg_after"] < r["ds_eg_before"] - 0.3
    assert 0.1 < r["ds_rel_change"] < 1.0
    flat = analyze.weight_measures(torch.ones(1000))  # one value: nothing to reshape
    assert "ds_skipped" in flat and "ds_eg_after" not in flat


def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.COMMANDS["analyze"][0] == "ggcomm.tools.analyze"
    out = tmp_path / "report.json"
    plots = tmp_path / "plots"
    argv = ["analyze", *TINY, "--train-steps", "3", "--json", str(out), "--plot-dir", str(plots)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "GG shape" in printed and "activation/block1" in printed and "DS EG13" in printed

    report = json.loads(out.read_text())
    assert report["model"]["n_layer"] == 2 and report["model"]["train_steps"] == 3
    assert report["quantization"] == {"rel_step": analyze.DEFAULT_REL_STEP, "bits": None}
    groups = report["groups"]
    for name in (
        "weight/embedding", "weight/attention", "weight/mlp", "weight/head", "weight/all",
        "activation/block0", "activation/block1", "activation/all",
        "gradient/attention", "gradient/mlp", "gradient/all",
    ):  # fmt: skip
        r = groups[name]
        assert gg.BETA_MIN <= r["gg"]["beta"] <= gg.BETA_MAX, name
        assert r["ll_gain"] > -1e-6, name  # the GG family contains the Gaussian
        assert 1.0 <= r["eg"] < 32 and r["hm"] <= r["eg"] + 1e-9 and r["fl"] >= 1, name
        assert r["codec"] > 0 and r["step"] > 0, name
        assert ("rf8_rel_err" in r) == name.startswith("weight/"), name
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16))
    per_group = [r["n"] for k, r in groups.items() if k.startswith("weight/") and k != "weight/all"]
    assert sum(per_group) == model.num_parameters()
    assert groups["activation/block0"]["n"] == 4 * 16 * 16

    written = sorted(p.name for p in plots.iterdir())
    assert written == ["activation.png", "gradient.png", "overview.png", "weight.png"]
    for name in written:
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_state_dict_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(1)
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # no all-zero group left to skip
    path = tmp_path / "gpt.pt"
    torch.save(model.state_dict(), path)
    out = tmp_path / "r.json"
    argv = [*TINY, "--n-layer", "1", "--state-dict", str(path), "--bits", "3", "--json", str(out)]
    assert analyze.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["model"]["n_layer"] == 3  # read from the state dict, not the flag
    assert report["quantization"] == {"rel_step": None, "bits": 3.0}
    groups = report["groups"]
    assert "skipped" not in groups["weight/bias"]
    # the frame of these 3072 elements carries ~0.2 bits per element of header and CRC
    assert groups["weight/attention"]["codec"] == pytest.approx(3.0 + 0.2, abs=0.15)
    attention = [p for n, p in model.named_parameters() if ".attn." in n and "bias" not in n]
    assert groups["weight/attention"]["n"] == sum(p.numel() for p in attention)

    bad = tmp_path / "bad.pt"
    torch.save({"x": torch.zeros(2)}, bad)
    assert analyze.main([*TINY, "--state-dict", str(bad)]) == 2
    assert "not a ggcomm GPT state dict" in capsys.readouterr().err
