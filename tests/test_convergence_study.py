"""benchmarks/convergence_ddp.py's arithmetic: bytes per step, the 1% verdict, steps to the
target, the report and the plot, on synthetic runs (no training)."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest


@pytest.fixture
def study(benchmark_script):
    return benchmark_script("convergence_ddp")


def _run(losses, sent, val):
    return {"num_parameters": 1000, "world_size": 2, "fp32_allreduce_bytes_per_rank": 4000.0,
            "median_step_time_s": 0.1, "val_loss": val, "val_accuracy": 0.5,
            "loss": losses, "bytes_sent_per_rank": sent}


def test_summary_verdicts_and_report(study, tmp_path):
    n = 60
    fp32 = [3.0 - 1.0 * i / n for i in range(n)]          # ends near 2.0
    slow = [3.0 - 0.9 * i / n for i in range(n)]          # ends ~5% above
    runs = {str(s): {"fp32": _run(fp32, [4000.0] * n, 2.0),
                     "gg-rate3": _run(fp32, [4000.0] + [100.0] * (n - 1), 2.0 * (1.005 + s / 1e3)),
                     "powersgd-r1": _run(slow, [50.0] * n, 2.1)} for s in (0, 1)}
    methods = ["fp32", "gg-rate3", "powersgd-r1"]
    summary = study.summarize(runs, methods, [0, 1])
    gg = summary["gg-rate3"]
    assert gg["mean"]["bytes_per_step"] == pytest.approx((4000 + 100 * (n - 1)) / n)
    assert gg["within_on_every_seed"] and not summary["powersgd-r1"]["within_on_every_seed"]
    assert gg["worst_val_vs_fp32"] == pytest.approx(0.006)
    # the target is fp32's final 20-step mean +1%, reached on the same step as fp32
    assert gg["steps_to_target"] == summary["fp32"]["steps_to_target"] <= n
    assert summary["powersgd-r1"]["steps_to_target"] is None
    data = {"runs": runs, "summary": summary}
    args = Namespace(ranks=2, steps=n, name="t")
    text = "\n".join(study.report(data, methods, [0, 1], args))
    assert "**gg-rate3**" in text and "not reached" in text
    assert "Not measured" in text  # no step times yet
    # timed on one link: time to target = steps to target x the measured step
    data.update(step_times={"100mbit": {"fp32": 0.5, "gg-rate3": 0.25}}, time_steps=45)
    text = "\n".join(study.report(data, methods, [0, 1], args))
    steps = summary["gg-rate3"]["steps_to_target"]
    assert f"| gg-rate3 | {steps:.0f} | 250 ms | {steps * 0.25:.0f} s |" in text
    assert "| powersgd-r1 | not reached | - | - |" in text and "1gbit" not in text
    study.figure(data, methods, [0, 1]).savefig(tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 10_000
    json.dumps(data)  # what main() writes


def test_steps_to_target_needs_a_full_window(study):
    assert study.steps_to({"loss": [0.0] * 30}, 1.0) == study.TAIL
    assert study.smoothed([1.0, 3.0, 5.0], window=2) == [1.0, 2.0, 4.0]


def test_step_time_is_the_median_after_every_warm_up(study, monkeypatch):
    times = [9.0] * study.STEADY_FROM + [0.3, 0.1, 0.2]
    monkeypatch.setattr(study, "_train", lambda *a: {"steps": {"step_time_s": times}})
    assert study.time_step("fp32", "100mbit", len(times), 2, Path("unused")) == 0.2
