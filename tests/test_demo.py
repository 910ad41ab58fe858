"""`ggcomm demo`, the main job: both trainings run and the table, plot and JSON appear."""

from __future__ import annotations

import json

import pytest

from ggcomm.tools import cli, demo

# The demo's ggcomm run: step 0 a plain allreduce, then a rate warm-up from 8 bits per
# element falling to --rate over demo.RATE_WARMUP_ITERS steps.
WARMUP = demo.RATE_WARMUP_ITERS
STEPS = WARMUP + 12


def test_demo_runs_the_three_trainings_and_writes_its_results(tmp_path, capsys):
    assert cli.main(["demo", "--steps", str(STEPS), "--batch-size", "4", "--no-progress",
                     "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for label in ("bits per element on the wire", "MB sent per rank", "median step time",
                  "final train loss", "validation accuracy", "fewer bytes", *demo.MODES,
                  "the wire codec alone", "the whole method"):
        assert label in out
    data = json.loads((tmp_path / "demo.json").read_text())
    plain = data["summary"]["plain DDP"]
    hook, full = data["summary"]["ggcomm hook"], data["summary"]["ggcomm full"]
    assert plain["bits_per_element"] == pytest.approx(32.0)
    for gg in (hook, full):
        assert gg["bits_per_element"] < 10  # rate warm-up from 8 bits, then 3
        assert gg["mb_sent"] < plain["mb_sent"] / 3
    # the hook alone starts from the same weights as plain DDP: step 1's loss is the same
    first = {m: r["rows"][0][0] for m, r in data["runs"].items()}
    assert first["ggcomm hook"] == pytest.approx(first["plain DDP"], abs=1e-6)
    assert first["ggcomm full"] != pytest.approx(first["plain DDP"], abs=1e-6)
    # every byte the hook hands to torch.distributed, per parameter: the warm-up starts near
    # 8 bits, and after it the rate loop holds the wire near the 3-bit target (per step it
    # swings by up to ~0.7 bits; frame headers and the statistics exchange add ~0.05)
    run = data["runs"]["ggcomm hook"]
    wire = [8 * row[2] / run["num_parameters"] for row in run["rows"]]
    assert wire[0] == pytest.approx(32.0, rel=1e-3) and wire[1] > 6, wire
    after = wire[WARMUP + 1:]
    assert abs(sum(after) / len(after) - 3.0) < 0.4, wire
    for r in data["runs"].values():
        losses = [row[0] for row in r["rows"]]
        assert len(losses) == STEPS and losses[-1] < losses[0]
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_demo_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        demo.main(["--steps", "0"])
