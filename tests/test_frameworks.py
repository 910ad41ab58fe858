"""The README's framework recipes, each run on 2 gloo CPU ranks as the README runs it.

PyTorch Lightning (launch/lightning_ddp.py), Hugging Face Accelerate (launch/accelerate_ddp.py)
and a plain torchrun script (framework_workers.TORCHRUN_SCRIPT): the hook ran on every
iteration and sent fewer bytes than fp32 allreduce, and the loss fell. Also what the
frameworks' own comm-hook options do with gg_hook on CPU: nothing, silently.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import framework_workers
import pytest
import torch

from ggcomm.tools.workload import free_port

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(framework_workers.__file__).resolve()
STEPS = 20


def _run(cmd: list[str], cwd: Path, timeout: float = 240) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} exited {p.returncode}:\n{p.stdout[-6000:]}"
    return p.stdout


def _torchrun(*args: str, cwd: Path = ROOT) -> str:
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                 "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args], cwd)


def _accelerate_launch(*args: str) -> str:
    return _run([sys.executable, "-m", "accelerate.commands.launch", "--num_machines=1",
                 "--mixed_precision=no", "--dynamo_backend=no", *args], ROOT)


def _reports(out: Path, world: int = 2) -> list[dict]:
    assert sorted(p.name for p in out.iterdir()) == [f"rank{r}.json" for r in range(world)]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _assert_compressed_training(reports: list[dict], steps: int = STEPS) -> None:
    for r in reports:
        assert r["world"] == 2
        s = r["stats"]
        # the hook ran on every iteration: the first as fp32 allreduce (start_iter=1), then
        # compressed; ratio counts all of them
        assert s["steps"] == steps, s
        assert s["bytes_sent"] > 0 and s["ratio"] > 4, s
        losses = r["losses"]
        assert len(losses) == steps
        assert _mean(losses[-5:]) < 0.6 * _mean(losses[:5]), losses
    # both ranks reduced the same buckets
    assert reports[0]["stats"]["elements"] == reports[1]["stats"]["elements"]


# --------------------------------------------------------------------------- Lightning


def test_lightning_callback_under_torchrun(tmp_path):
    pytest.importorskip("lightning")
    out = _torchrun("launch/lightning_ddp.py", "--accelerator=cpu", "--devices=2",
                    f"--steps={STEPS}", f"--json={tmp_path}")
    reports = _reports(tmp_path)
    _assert_compressed_training(reports)
    assert all(r["device"] == "cpu" for r in reports)
    assert re.search(rf"rank 0: loss .* {STEPS} steps through ggcomm, [\d.]+x fewer", out), out


def test_lightning_callback_with_lightnings_own_launcher(tmp_path):
    pytest.importorskip("lightning")
    # no torchrun: Lightning starts rank 1 itself by running the script again
    _run([sys.executable, "launch/lightning_ddp.py", "--accelerator=cpu", "--devices=2",
          f"--steps={STEPS}", f"--json={tmp_path}"], ROOT)
    _assert_compressed_training(_reports(tmp_path))


def test_lightning_ddp_strategy_comm_hook_does_nothing_on_cpu(tmp_path):
    """DDPStrategy(ddp_comm_hook=gg_hook) trains on CPU, uncompressed and without a word."""
    pytest.importorskip("lightning")
    _torchrun(str(WORKERS), "lightning-strategy-kwargs", str(tmp_path))
    for r in _reports(tmp_path):
        assert r["device"] == "cpu" and r["world"] == 2
        assert len(r["losses"]) == 5  # it trained ...
        assert r["comm_hooks"] == 0  # ... with no hook on the DDP module
        assert r["stats"]["steps"] == 0 and r["stats"]["bytes_sent"] == 0, r["stats"]


# --------------------------------------------------------------------------- Accelerate


def test_accelerate_register_on_prepared_model_with_accelerate_launch(tmp_path):
    pytest.importorskip("accelerate")
    _accelerate_launch("--multi_gpu", "--num_processes=2", f"--main_process_port={free_port()}",
                       "launch/accelerate_ddp.py", "--cpu", f"--steps={STEPS}",
                       f"--json={tmp_path}")
    reports = _reports(tmp_path)
    _assert_compressed_training(reports)
    assert all(r["distributed_type"] == "DistributedType.MULTI_CPU" for r in reports)


def test_accelerate_register_on_prepared_model_under_torchrun(tmp_path):
    pytest.importorskip("accelerate")
    _torchrun("launch/accelerate_ddp.py", "--cpu", f"--steps={STEPS}", f"--json={tmp_path}")
    reports = _reports(tmp_path)
    _assert_compressed_training(reports)
    assert all(r["distributed_type"] == "DistributedType.MULTI_CPU" for r in reports)


def test_accelerate_launch_cpu_flag_starts_one_process(tmp_path):
    """`accelerate launch --cpu --num_processes 2` runs the script once: nothing to reduce."""
    pytest.importorskip("accelerate")
    _accelerate_launch("--cpu", "--num_processes=2", "launch/accelerate_ddp.py", "--cpu",
                       "--steps=3", f"--json={tmp_path}")
    (r,) = _reports(tmp_path, world=1)
    assert r["world"] == 1 and r["distributed_type"] == "DistributedType.NO"
    assert r["stats"]["steps"] == 0


def test_accelerate_without_cpu_flag_on_a_cpu_machine_trains_each_rank_alone(tmp_path):
    """Under torchrun on a machine without CUDA, Accelerator() (no cpu=True) sets up no DDP."""
    pytest.importorskip("accelerate")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: Accelerator() picks it")
    out = _torchrun("launch/accelerate_ddp.py", "--steps=3")
    # both processes are rank 0 (of 1), and no hook ran in either
    found = re.findall(r"rank (\d+): loss \d+\.\d+ -> \d+\.\d+, (\d+) steps through ggcomm", out)
    assert found == [("0", "0"), ("0", "0")], out


def test_accelerate_ddp_kwargs_comm_hook_does_nothing(tmp_path):
    """DistributedDataParallelKwargs(comm_hook=gg_hook) is accepted and registers nothing."""
    pytest.importorskip("accelerate")
    _torchrun(str(WORKERS), "accelerate-kwargs", str(tmp_path))
    for r in _reports(tmp_path):
        assert r["ddp"] and r["world"] == 2 and len(r["losses"]) == 5
        assert r["comm_hooks"] == 0
        assert r["stats"]["steps"] == 0 and r["stats"]["bytes_sent"] == 0, r["stats"]


# --------------------------------------------------------------------------- plain torchrun


def _losses(out: str, rank: int) -> dict[int, float]:
    # unanchored: two ranks' prints can share a line (each print may be two writes)
    return {int(s): float(v) for s, v in re.findall(rf"rank {rank} step (\d+) loss (\d+\.\d+)",
                                                   out)}


@pytest.fixture(scope="module")
def torchrun_script_30_steps(tmp_path_factory) -> tuple[Path, Path, str]:
    """The README's torchrun script, 30 steps on 2 ranks: (script, its folder, output)."""
    tmp = tmp_path_factory.mktemp("torchrun")
    script = tmp / "train.py"
    script.write_text(framework_workers.TORCHRUN_SCRIPT)
    whole = tmp / "whole"
    whole.mkdir()
    return script, whole, _torchrun(str(script), "30", cwd=whole)


def test_torchrun_script_trains_and_saves_per_rank_checkpoints(torchrun_script_30_steps):
    _, whole, out = torchrun_script_30_steps
    for rank in range(2):
        losses = _losses(out, rank)
        assert sorted(losses) == [0, 10, 20, 29], out
        assert losses[29] < 0.5 * losses[0], out
        m = re.search(rf"rank {rank}: (\d+) bytes sent, (\d+\.\d)x fewer than fp32 allreduce",
                      out)
        assert m and int(m[1]) > 0 and float(m[2]) > 4, out
        ck = torch.load(whole / f"ckpt-rank{rank}.pt")  # torch.load's defaults read it
        assert ck["step"] == 30
        assert ck["ggcomm"]["rank"] == rank and ck["ggcomm"]["world_size"] == 2
        assert ck["ggcomm"]["iteration"] == 30 and ck["ggcomm"]["residuals"]
    # the replicas agree: every rank averaged the same integers
    r0, r1 = (torch.load(whole / f"ckpt-rank{r}.pt")["model"] for r in range(2))
    assert all(torch.equal(t, r1[name]) for name, t in r0.items())


def test_torchrun_script_resumes_bit_for_bit(torchrun_script_30_steps):
    script, whole, _ = torchrun_script_30_steps
    split = whole.parent / "split"
    split.mkdir()
    # 12 steps, stop, resume to 30 from the per-rank checkpoints: the same run, bit for bit
    _torchrun(str(script), "12", cwd=split)
    resumed = _torchrun(str(script), "30", cwd=split)
    assert sorted(_losses(resumed, 0)) == [20, 29], resumed  # it went on from step 12
    for rank in range(2):
        a = torch.load(whole / f"ckpt-rank{rank}.pt")
        b = torch.load(split / f"ckpt-rank{rank}.pt")
        assert b["step"] == 30 and b["ggcomm"]["iteration"] == 30
        ta, tb = a["ggcomm"]["stats_total"], b["ggcomm"]["stats_total"]  # counters resume
        for counter in ("elements", "payload_bits", "steps"):
            assert ta[counter] == tb[counter], counter
        # plus one settings check (16 bytes to the peer) that each new process makes first
        assert tb["bytes_sent"] == ta["bytes_sent"] + 16
        for name, t in a["model"].items():
            assert torch.equal(t, b["model"][name]), name
        for name, t in a["ggcomm"]["residuals"].items():
            assert torch.equal(t, b["ggcomm"]["residuals"][name]), name
        assert a["ggcomm"]["steps"] == b["ggcomm"]["steps"]
