"""`ggcomm demo`, the main job: both trainings run and the table, plot and JSON appear."""

from __future__ import annotations

import json

import pytest

from ggcomm import cli, demo


def test_demo_runs_both_trainings_and_writes_its_results(tmp_path, capsys):
    assert cli.main(["demo", "--steps", "10", "--no-progress", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for label in ("bits per element on the wire", "MB sent per rank", "median step time",
                  "final train loss", "validation accuracy", "fewer bytes"):
        assert label in out
    data = json.loads((tmp_path / "demo.json").read_text())
    plain, gg = data["summary"]["plain DDP"], data["summary"]["ggcomm"]
    assert plain["bits_per_element"] == pytest.approx(32.0)
    assert gg["bits_per_element"] < 10  # rate warm-up from 8 bits, then 3
    assert gg["mb_sent"] < plain["mb_sent"] / 3
    for r in data["runs"].values():
        losses = [row[0] for row in r["rows"]]
        assert len(losses) == 10 and losses[-1] < losses[0]
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_demo_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        demo.main(["--steps", "3"])
