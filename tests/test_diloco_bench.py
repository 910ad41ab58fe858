"""benchmarks/diloco_bench.py's arithmetic: time to target, the comparisons in its table and
the plot, on synthetic runs (no training)."""

from __future__ import annotations

from argparse import Namespace

import pytest


@pytest.fixture
def bench(benchmark_script):
    return benchmark_script("diloco_bench")


def _run(losses, step_s, total_bytes, val, shape=None):
    return {"num_parameters": 1000, "val_loss": val, "val_accuracy": 0.5,
            "total_bytes_sent_per_rank": total_bytes, "total_time_s": sum(step_s),
            "pseudo_gradient_gg_shape": shape, "fp32_allreduce_bytes_per_rank": 4000.0,
            "loss": losses, "step_time_s": step_s, "bytes_sent_per_rank": [0.0] * len(losses)}


def test_time_to_target_and_the_table(bench, tmp_path):
    n = 40
    falling = [3.0 - i / n for i in range(n)]
    runs = {
        "ddp": _run(falling, [1.0] * n, 4e6, 2.0),
        "fp32-H10": _run(falling, [0.25] * n, 4e5, 2.0, {"first": 20.0, "last": 1.6}),
        "int8-H10": _run(falling, [0.25] * n, 1e5, 2.02, {"first": 20.0, "last": 1.6}),
        "gg3-H10": _run([v + 1 for v in falling], [0.25] * n, 2.5e4, 1.98,
                        {"first": 20.0, "last": 1.5}),
    }
    target = bench.smoothed(falling)[-1] * (1 + bench.MARGIN)
    assert bench.targets(runs) == {"ddp": pytest.approx(target),
                                   "fp32-H10": pytest.approx(target)}
    # DDP's own curve reaches its final loss + MARGIN at the same step as every same-loss run
    t_ddp, steps = bench.reach(runs["ddp"], target)
    assert bench.reach(runs["fp32-H10"], target) == (pytest.approx(t_ddp / 4), steps)
    mean = bench.smoothed(falling)
    assert mean[steps - 1] <= target < mean[steps - 2]  # the first step at the target
    assert bench.reach(runs["gg3-H10"], target) is None
    data = {"runs": {"localhost/2": runs}, "commands": ["--links localhost --hs 10"]}
    args = Namespace(steps=n, hs=[10], rates=[3.0], seg_rates=[2.0], ranks=[2],
                     links=["localhost"], seed=0, name="t")
    assert bench.commands({}, args) == ("`python benchmarks/diloco_bench.py --links localhost "
                                        "--ranks 2 --hs 10 --rates 3 --seg-rates 2`")
    text = "\n".join(bench.report(data, args))
    assert "`python benchmarks/diloco_bench.py --links localhost --hs 10`" in text
    rows = {line.split(" | ")[2]: line.split(" | ") for line in text.splitlines()
            if line.startswith("| localhost |")}
    assert rows["int8-H10"][4] == "+1.00%" and rows["gg3-H10"][4] == "-1.00%"
    assert rows["gg3-H10"][6] == "4.0x" and rows["gg3-H10"][7] == "160x"
    assert rows["gg3-H10"][8] == "250" and rows["ddp"][8] == "1000"
    assert rows["gg3-H10"][10] == "20.00, 1.50 |"
    assert rows["ddp"][4] == "-" and rows["ddp"][10] == "- |"
    after = text.split("## Time to a target loss")[1].splitlines()
    timed = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in after
             if line.startswith("| ") and not line.startswith("| method")}
    assert timed["ddp"][0] == f"{t_ddp:.0f} s ({steps} steps)"
    assert timed["gg3-H10"] == ["-", "- |"]
    bench.figure(data).savefig(tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_the_commands_kept_leave_out_where_the_results_went(bench):
    assert bench._without_out(["--steps", "600", "--out", "/x", "--hs", "10"]) == \
        ["--steps", "600", "--hs", "10"]
    assert bench._without_out(["--out=/x", "--rates", "2"]) == ["--rates", "2"]
