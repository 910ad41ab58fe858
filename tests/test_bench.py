"""ggcomm bench: the runner (ggcomm.tools.bench: options, the launcher, run summaries, the
results folder) and its report (ggcomm.tools.report: target verdicts, markdown, plots), and a
--quick run of an installed package."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ggcomm
import ggcomm.kernels
from ggcomm.tools import bench, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


# ---------------------------------------------------------------------------------------------
# Options


def test_defaults_full_and_quick() -> None:
    full = bench.parse_args([])
    assert full.methods == list(bench.METHODS) and len(full.methods) == 17
    assert full.links == list(bench.LINKS) and full.workloads == ["gpt", "mlp"]
    assert full.ranks == [2, 4] and full.steps == bench.DEFAULT_STEPS
    assert full.psgd_start == max(bench.PSGD_MIN_START, round(0.1 * full.steps))
    assert full.gg_warmup == round(0.1 * full.steps)
    quick = bench.parse_args(["--quick"])
    assert quick.steps == bench.QUICK_STEPS and quick.links == ["localhost"]
    assert quick.methods == list(bench.QUICK_METHODS) and quick.ranks == [2]
    # explicit options win over --quick's, and the matrix keeps its canonical order
    mixed = bench.parse_args(
        ["--quick", "--methods", "gg3-allgather", "fp32", "--ranks", "4", "2", "2"]
    )
    assert mixed.methods == ["fp32", "gg3-allgather"] and mixed.ranks == [2, 4]


def test_help_lists_every_choice(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in [*bench.METHODS, *bench.LINKS, *bench.WORKLOADS]:
        assert name in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ranks", "1", "2"], "at least 2"),
        (["--methods", "fp64"], "invalid choice"),
        (["--links", "2gbit"], "invalid choice"),
        (["--workloads", "resnet"], "invalid choice"),
        (["--psgd-start", "1"], "--psgd-start must be >= 2"),
        (["--methods", "powersgd-r4", "--steps", "8", "--psgd-start", "7"], "steady-state"),
        (["--methods", "gg2-allgather", "--steps", "4", "--gg-warmup", "2"], "gg2-allgather"),
        (["--gg-warmup", "-1"], "--gg-warmup"),
        (["--mlp-width", "0"], "--mlp-width"),
        (["--eval-batches", "0"], "--eval-batches"),
        (["--threads", "-2"], "--threads"),
        (["--timeout", "0"], "--timeout"),
    ],
)
def test_invalid_options_exit_2_with_a_reason(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_methods_map_to_train_ddp_options() -> None:
    psgd, gg, fp32 = (
        bench.METHODS["powersgd-r4"],
        bench.METHODS["gg2-reduce_scatter"],
        (bench.METHODS["fp32"]),
    )
    assert psgd.train_argv(5, 1) == ["--hook", "powersgd", "--psgd-rank", "4", "--psgd-start", "5"]
    assert gg.train_argv(5, 3) == [
        "--hook", "gg", "--rate", "2", "--exchange", "reduce_scatter", "--gg-warmup-iters", "3",
    ]  # fmt: skip
    assert "--gg-warmup-iters" not in gg.train_argv(5, 0)
    assert fp32.train_argv(5, 3) == ["--hook", "none"]
    assert (psgd.warmup_steps(5, 3), gg.warmup_steps(5, 3), fp32.warmup_steps(5, 3)) == (5, 4, 1)


# ---------------------------------------------------------------------------------------------
# Launcher failures (fake ranks: no torch start-up)


def _launch_args(timeout: float = 60.0) -> argparse.Namespace:
    return argparse.Namespace(backend="gloo", threads=1, timeout=timeout, quick=False)


def test_a_failing_rank_stops_the_others_and_its_log_is_reported(tmp_path, monkeypatch) -> None:
    script = (
        "import os, sys, time\n"
        "if os.environ['RANK'] == '1':\n"
        "    print('rank one gives up', flush=True); sys.exit(3)\n"
        "time.sleep(60)\n"
    )
    monkeypatch.setattr(bench, "worker_command", lambda spec: [sys.executable, "-c", script])
    group = bench.Group("mlp", "localhost", 2)
    runs = [(bench.METHODS["fp32"], [], tmp_path / "fp32.json")]
    with pytest.raises(bench.BenchError, match="rank 1 exited with status 3") as e:
        bench.run_group(group, runs, _launch_args(), tmp_path / "g")
    assert "rank one gives up" in str(e.value) and "mlp/localhost/2 ranks" in str(e.value)


def test_a_launch_past_its_timeout_is_stopped(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(
        bench, "worker_command", lambda spec: [sys.executable, "-c", "import time; time.sleep(60)"]
    )
    group = bench.Group("gpt", "localhost", 2)
    runs = [(bench.METHODS["fp16"], [], tmp_path / "fp16.json")]
    with pytest.raises(bench.BenchError, match="no result after 0.5 s"):
        bench.run_group(group, runs, _launch_args(timeout=0.5), tmp_path / "g")


def test_ranks_that_exit_without_results_are_an_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(bench, "worker_command", lambda spec: [sys.executable, "-c", "pass"])
    runs = [(bench.METHODS["quant8"], [], tmp_path / "quant8.json")]
    with pytest.raises(bench.BenchError, match="without results for quant8"):
        bench.run_group(bench.Group("mlp", "localhost", 2), runs, _launch_args(), tmp_path)


# ---------------------------------------------------------------------------------------------
# Step model built before the first run


@pytest.mark.parametrize(("method", "wanted"), [("gg2-reduce_scatter", True), ("fp32", False)])
def test_ranks_build_the_step_model_when_a_run_asks_for_a_rate(
    tmp_path, monkeypatch, method, wanted
) -> None:
    monkeypatch.setattr(bench, "worker_command", lambda spec: [sys.executable, "-c", "pass"])
    runs = [(bench.METHODS[method], [], tmp_path / f"{method}.json")]
    with pytest.raises(bench.BenchError, match="without results"):
        bench.run_group(bench.Group("mlp", "localhost", 2), runs, _launch_args(), tmp_path)
    assert json.loads((tmp_path / "spec.json").read_text())["step_model"] is wanted


# ---------------------------------------------------------------------------------------------
# Summaries and verdicts


def _train_summary(times, sent, encode=None, decode=None) -> dict:
    n = len(times)
    return {
        "backend": "gloo",
        "num_parameters": 1000,
        "fp32_allreduce_bytes_per_rank": 4000.0,
        "val_loss": 1.5,
        "steps": {
            "loss": [2.0] * n,
            "step_time_s": times,
            "bytes_sent_per_rank": sent,
            "encode_s": encode,
            "decode_s": decode,
        },
    }


def test_summarize_run_leaves_warm_up_steps_out() -> None:
    group = bench.Group("mlp", "1gbit", 2)
    gg = _train_summary(
        [9.0, 5.0, 2.0, 3.0, 4.0],
        [4000.0, 2000.0, 100.0, 110.0, 120.0],
        [0.0, 0.5, 0.1, 0.1, 0.1],
        [0.0, 0.5, 0.2, 0.2, 0.2],
    )
    r = bench.summarize_run(gg, bench.METHODS["gg3-allgather"], group, psgd_start=2, gg_warmup=1)
    assert r["warmup_steps"] == 2 and r["median_step_s"] == 3.0 and r["mean_step_s"] == 3.0
    assert r["bytes_per_rank"] == pytest.approx(110.0)
    assert r["bytes_vs_fp32"] == pytest.approx(110.0 / 4000.0)
    assert r["run_bytes_per_rank"] == pytest.approx(6330.0)
    assert r["codec_share"] == pytest.approx(0.9 / 9.0)
    assert r["encode_s_per_step"] == pytest.approx(0.1)
    assert (r["link"], r["ranks"], r["final_loss"]) == ("1gbit", 2, 1.5)
    psgd = _train_summary([9.0, 8.0, 7.0, 1.0, 2.0], [4000.0, 4000.0, 4000.0, 10.0, 30.0])
    r = bench.summarize_run(psgd, bench.METHODS["powersgd-r1"], group, psgd_start=3, gg_warmup=1)
    assert r["median_step_s"] == 1.5 and r["bytes_per_rank"] == 20.0
    assert r["codec_share"] is None and "encode_s" not in r["series"]


def _record(workload, link, ranks, method, step_s=1.0, nbytes=1000.0, loss=1.0) -> dict:
    return {
        "workload": workload, "link": link, "ranks": ranks, "method": method,
        "median_step_s": step_s, "bytes_per_rank": nbytes, "final_loss": loss,
    }  # fmt: skip


def _verdicts(records) -> dict:
    return {t["target"]: t["met"] for t in report.evaluate_targets(records)}


def test_speed_targets() -> None:
    base = [
        _record("mlp", "1gbit", 2, "fp32", step_s=0.300),
        _record("mlp", "1gbit", 2, "fp16", step_s=0.150),
        _record("mlp", "1gbit", 2, "gg3-reduce_scatter", step_s=0.180),
    ]
    fast = _record("mlp", "1gbit", 2, "gg3-allgather", step_s=0.145)
    assert _verdicts([*base, fast])["speed_1gbit"] is True  # 2.07x, and faster than fp16
    assert _verdicts(base)["speed_1gbit"] is False  # 1.67x, and slower than fp16
    slow_link = [_record("mlp", "100mbit", 4, "fp32", step_s=1.0),
                 _record("mlp", "100mbit", 4, "gg3-reduce_scatter", step_s=0.19)]
    assert _verdicts(slow_link)["speed_100mbit"] is True  # 5.3x; fp16 is not required
    slow_link[1]["median_step_s"] = 0.25
    assert _verdicts(slow_link)["speed_100mbit"] is False  # 4x
    assert _verdicts([_record("mlp", "localhost", 2, "fp32")])["speed_1gbit"] is None


def test_a_missed_speed_target_says_what_limits_it() -> None:
    def measured(loop_s: float) -> str:
        records = [
            _record("mlp", "1gbit", 2, "fp32", step_s=0.300),
            _record("mlp", "1gbit", 2, "fp16", step_s=0.150),
            _record("mlp", "1gbit", 2, "gg3-allgather", step_s=0.180, nbytes=1.25e6),
            _record("mlp", "localhost", 2, "fp32", step_s=0.060),
            {**_record("mlp", "localhost", 2, "gg3-allgather", step_s=loop_s, nbytes=1.25e6),
             "encode_s_per_step": 0.020, "decode_s_per_step": 0.010},
        ]
        target = next(t for t in report.evaluate_targets(records) if t["target"] == "speed_1gbit")
        assert target["met"] is False
        return target["measured"]

    # 1.8x needs 167 ms, beating fp16 150 ms; 1.25 MB take 10 ms at 1 Gbit/s
    over = measured(0.170)
    assert "the target needs a step of at most 150 ms" in over  # fp16 is faster than 1.8x
    assert ("gg3-allgather takes 170 ms on loopback (encode 20 ms and decode 10 ms of it; "
            "fp32 takes 60 ms there) and its 1.25 MB per rank take 10 ms to cross 1gbit") in over
    assert "over the target with no link at all" in over
    under = measured(0.120)
    assert "130 ms together; the other 50 ms are time on the link" in under
    # met: nothing to explain; no loopback run: nothing measured to say it with
    fast = [_record("mlp", "1gbit", 2, "fp32", step_s=0.300),
            _record("mlp", "1gbit", 2, "fp16", step_s=0.150),
            _record("mlp", "1gbit", 2, "gg3-allgather", step_s=0.145)]
    assert "what limits it" not in report.evaluate_targets(fast)[0]["measured"]
    fast[2]["median_step_s"] = 0.2
    assert "what limits it" not in report.evaluate_targets(fast)[0]["measured"]


def test_bytes_at_equal_loss_target() -> None:
    q = _record("gpt", "localhost", 2, "quant8", nbytes=1000.0, loss=2.0)
    cheap_but_worse = _record("gpt", "localhost", 2, "gg2-allgather", nbytes=100.0, loss=2.1)
    equal = _record("gpt", "localhost", 2, "gg3-allgather", nbytes=400.0, loss=2.01)
    assert _verdicts([q, cheap_but_worse, equal])["bytes_at_equal_loss"] is True
    assert _verdicts([q, cheap_but_worse])["bytes_at_equal_loss"] is False
    heavy = _record("gpt", "localhost", 2, "gg4-allgather", nbytes=1200.0, loss=1.9)
    assert _verdicts([q, heavy])["bytes_at_equal_loss"] is False
    # loss and bytes come from the fastest link measured, whatever else ran
    slow = _record("gpt", "100mbit", 2, "gg2-allgather", nbytes=10.0, loss=1.0)
    assert _verdicts([q, cheap_but_worse, slow])["bytes_at_equal_loss"] is False


def test_growth_and_its_target() -> None:
    records = [
        _record("mlp", "localhost", 2, "gg3-reduce_scatter", nbytes=1000.0),
        _record("mlp", "localhost", 4, "gg3-reduce_scatter", nbytes=1150.0),
        _record("mlp", "localhost", 2, "gg3-allgather", nbytes=1000.0),
        _record("mlp", "localhost", 4, "gg3-allgather", nbytes=3000.0),
    ]
    growth = {g["method"]: g["ratio"] for g in report.growth(records)}
    assert growth == pytest.approx({"gg3-allgather": 3.0, "gg3-reduce_scatter": 1.15})
    assert _verdicts(records)["reduce_scatter_growth"] is True  # allgather is not judged
    records[1] = _record("mlp", "localhost", 4, "gg3-reduce_scatter", nbytes=1500.0)
    assert _verdicts(records)["reduce_scatter_growth"] is False
    assert _verdicts(records[:1])["reduce_scatter_growth"] is None


# ---------------------------------------------------------------------------------------------
# The report reads results only


@pytest.mark.parametrize("name", ["ddp_bench", "ddp_speed/ddp_bench"])
def test_the_report_renders_committed_results_from_their_json_alone(name) -> None:
    result = json.loads((RESULTS / f"{name}.json").read_text())
    assert report.markdown(result) == (RESULTS / f"{name}.md").read_text()


# ---------------------------------------------------------------------------------------------
# Where results go, and where ranks run


def test_results_go_to_benchmarks_results_in_a_checkout_else_to_ggcomm_bench(
    tmp_path, monkeypatch
) -> None:
    checkout = tmp_path / "checkout"
    (checkout / "benchmarks" / "results").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("[project]\n")
    monkeypatch.setattr(bench, "ROOT", checkout)
    assert bench.parse_args([]).out == checkout / "benchmarks" / "results"
    assert bench.parse_args(["--quick", "--out", "mine"]).out == Path("mine")
    # installed: the folder two levels above ggcomm/tools is site-packages' parent
    monkeypatch.setattr(bench, "ROOT", tmp_path / "lib" / "python3")
    assert bench.parse_args(["--quick"]).out == Path("ggcomm-bench") == bench.LOCAL_OUT_DIR
    # a results folder alone is not a checkout
    (checkout / "pyproject.toml").unlink()
    monkeypatch.setattr(bench, "ROOT", checkout)
    assert bench.parse_args([]).out == Path("ggcomm-bench")


def test_ranks_run_in_their_launch_folder(tmp_path, monkeypatch) -> None:
    out = tmp_path / "fp32.json"
    script = f"import os, pathlib; pathlib.Path({str(out)!r}).write_text(os.getcwd())"
    monkeypatch.setattr(bench, "worker_command", lambda spec: [sys.executable, "-c", script])
    runs = [(bench.METHODS["fp32"], [], out)]
    workdir = tmp_path / "group0"
    bench.run_group(bench.Group("mlp", "localhost", 2), runs, _launch_args(), workdir)
    assert out.read_text() == str(workdir)


# ---------------------------------------------------------------------------------------------
# A real --quick run (two gloo ranks on localhost) of the package laid out as installed


def installed_copy(site: Path) -> Path:
    """A copy of the package as an installer lays it out (``kernels/`` as ``ggcomm/kernels``)
    in ``site``, away from any checkout; returns ``site``, for PYTHONPATH. Compiled caches come
    along, so the kernels are not compiled again."""
    shutil.copytree(Path(ggcomm.__file__).parent, site / "ggcomm")
    shutil.copytree(Path(ggcomm.kernels.__file__).parent, site / "ggcomm" / "kernels")
    return site


# Runs `ggcomm bench` with its arguments after the first, which is the folder the package must
# come from; on a machine that cannot build test hosts, whether or not this one can.
NO_HOSTS_BENCH = """
import sys
from ggcomm.tools import bench, testhosts
assert bench.__file__.startswith(sys.argv[1]), bench.__file__
testhosts.unavailable_reason = lambda *a, **k: "no root in this test"

def no_hosts(*a, **k):
    raise AssertionError("test hosts must not be built when unavailable")

testhosts.TestHosts = no_hosts
sys.exit(bench.main(sys.argv[2:]))
"""


def test_quick_run_of_an_installed_package_without_test_hosts(tmp_path) -> None:
    site = installed_copy(tmp_path / "site")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    pythonpath = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    argv = ["--quick", "--links", "localhost", "100mbit", "--methods", "fp32", "gg3-allgather"]
    proc = subprocess.run(
        [sys.executable, "-c", NO_HOSTS_BENCH, str(site), *argv, "--no-progress"],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        timeout=600,
    )
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, err[-3000:]
    assert "no root in this test" in err and "running on localhost only" in err
    results = cwd / "ggcomm-bench"  # no checkout around the package: the current directory
    assert sorted(p.name for p in cwd.iterdir()) == ["ggcomm-bench"]

    result = json.loads((results / "ddp_bench-quick.json").read_text())
    assert result["config"]["links_run"] == ["localhost"] and not result["failures"]
    assert list(result)[-4:] == ["targets", "growth", "plots", "runs"]
    runs = {r["method"]: r for r in result["runs"]}
    assert set(runs) == {"fp32", "gg3-allgather"}
    for r in runs.values():
        assert (r["workload"], r["link"], r["ranks"]) == ("mlp", "localhost", 2)
        assert len(r["series"]["step_time_s"]) == bench.QUICK_STEPS
        assert r["median_step_s"] > 0 and r["final_loss"] > 0
    fp32, gg = runs["fp32"], runs["gg3-allgather"]
    assert fp32["bytes_per_rank"] == fp32["fp32_bytes_per_rank"]  # 2 ranks: the whole buffer
    assert gg["bytes_per_rank"] < fp32["bytes_per_rank"] / 4  # 3 bits/element and headers
    assert fp32["codec_share"] is None and 0 < gg["codec_share"]
    verdicts = {t["target"]: t["met"] for t in result["targets"]}
    assert verdicts == {"speed_1gbit": None, "speed_100mbit": None, "bytes_at_equal_loss": None,
                        "reduce_scatter_growth": None}

    md = (results / "ddp_bench-quick.md").read_text()
    assert md == out == report.markdown(result)
    assert "no root in this test" in md and md.count("not measured") == 4
    for method in ("fp32", "gg3-allgather"):
        assert md.count(f"| {method} |") == (3 if method.startswith("gg") else 2)
    for name in ("ddp_bench-step_time-quick.png", "ddp_bench-loss_vs_bytes-quick.png"):
        data = (results / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert sorted(p.name for p in results.iterdir()) == sorted(
        [
            "ddp_bench-quick.json",
            "ddp_bench-quick.md",
            "ddp_bench-step_time-quick.png",
            "ddp_bench-loss_vs_bytes-quick.png",
        ]
    )
