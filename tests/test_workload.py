"""Tests for ggcomm.tools.workload (GPT, corpus, dataset, MLP) and train_ddp end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from ggcomm.tools.workload import (
    GPT,
    ByteDataset,
    GPTConfig,
    free_port,
    make_mlp_workload,
    mlp_batch,
    next_token_accuracy,
    stdlib_corpus,
)

ROOT = Path(__file__).resolve().parents[1]
TRAIN_DDP = ROOT / "launch" / "train_ddp.py"


def tiny_config(**overrides: int) -> GPTConfig:
    params = {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 64}
    params.update(overrides)
    return GPTConfig(**params)


def load_train_ddp() -> ModuleType:
    from ggcomm.tools import train_ddp

    return train_ddp


# --- GPT ----------------------------------------------------------------------------------------


def test_gpt_forward_backward_shapes() -> None:
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 256, (3, 20))
    logits, loss = model(idx)
    assert logits.shape == (3, 20, 256) and loss is None
    logits, loss = model(idx, torch.randint(0, 256, (3, 20)))
    assert loss is not None and loss.ndim == 0
    assert loss.item() == pytest.approx(math.log(256), abs=0.3)  # near-uniform at init
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert torch.isfinite(p.grad).all(), name
    with pytest.raises(ValueError):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_gpt_parameter_counts() -> None:
    default = GPT(GPTConfig()).num_parameters()
    small = GPT(GPTConfig.small()).num_parameters()
    assert 700_000 <= default <= 1_000_000
    assert 2_500_000 <= small <= 3_500_000
    assert GPTConfig.small(block_size=64).block_size == 64
    with pytest.raises(ValueError):
        GPTConfig(n_embd=100, n_head=3)


def test_gpt_deterministic_init() -> None:
    def build(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return GPT(tiny_config()).state_dict()

    a, b, c = build(7), build(7), build(8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_next_token_accuracy() -> None:
    logits = torch.zeros(2, 3, 5)
    logits[0, :, 1] = 1.0
    logits[1, :, 4] = 1.0
    targets = torch.tensor([[1, 1, 0], [4, 2, 2]])
    assert next_token_accuracy(logits, targets) == pytest.approx(3 / 6)


# --- Data ---------------------------------------------------------------------------------------


def test_stdlib_corpus_deterministic() -> None:
    a = stdlib_corpus(300_000)
    assert len(a) == 300_000
    assert a == stdlib_corpus(300_000)
    assert stdlib_corpus(400_000)[:300_000] == a
    assert b"def " in a and b"import " in a
    with pytest.raises(ValueError):
        stdlib_corpus(0)


def test_byte_dataset_batches() -> None:
    data = stdlib_corpus(100_000)
    ds = ByteDataset(data, block_size=32)
    assert len(ds.train) + len(ds.val) == len(data)
    assert len(ds.val) == int(len(data) * 0.05)
    assert bytes(ds.val.tolist()) == data[-len(ds.val) :]

    x, y = ds.batch("train", 6, torch.Generator().manual_seed(1))
    x2, y2 = ds.batch("train", 6, torch.Generator().manual_seed(1))
    x3, _ = ds.batch("train", 6, torch.Generator().manual_seed(2))
    assert x.shape == y.shape == (6, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
    assert torch.equal(y[:, :-1], x[:, 1:])

    train_bytes, val_bytes = data[: len(ds.train)], data[len(ds.train) :]
    xv, yv = ds.batch("val", 4, torch.Generator().manual_seed(0))
    for row_x, row_y in zip(xv.tolist(), yv.tolist(), strict=True):
        assert bytes(row_x + row_y[-1:]) in val_bytes
    assert bytes(x[0].tolist()) in train_bytes
    with pytest.raises(ValueError):
        ds.batch("test", 1)  # type: ignore[arg-type]


def test_mlp_workload() -> None:
    torch.manual_seed(0)
    model = make_mlp_workload(width=64, depth=3)
    assert model.num_parameters() == 3 * (64 * 64 + 64)
    x, y = mlp_batch(5, 64, torch.Generator().manual_seed(0))
    x2, y2 = mlp_batch(5, 64, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 64) and torch.equal(x, x2) and torch.equal(y, y2)
    out, loss = model(x, y)
    assert out.shape == (5, 64) and loss is not None and loss.ndim == 0


# --- Training -----------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Run single-threaded: on a small shared machine, torch's threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_parse_args() -> None:
    train_ddp = load_train_ddp()
    args = train_ddp.parse_args(["--hook", "gg"])
    assert args.rate == 3.0 and args.step is None
    args = train_ddp.parse_args(["--hook", "gg", "--rel-step", "0.25"])
    assert args.rate is None and args.rel_step == 0.25
    with pytest.raises(SystemExit):
        train_ddp.parse_args(["--rate", "2", "--step", "0.1"])
    assert train_ddp.allreduce_bytes(1000, 4) == 1500.0
    assert train_ddp.allgather_bytes(1000, 4) == 3000.0


def run_torchrun(hook: str, out: Path, steps: int = 5, *extra: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(TRAIN_DDP),
        f"--hook={hook}",
        f"--steps={steps}",
        "--batch-size=4",
        "--block-size=32",
        "--corpus-bytes=200000",
        "--eval-batches=2",
        "--log-every=1",
        f"--json={out}",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step" in proc.stdout and "loss" in proc.stdout
    return json.loads(out.read_text())


def test_train_ddp_two_ranks(tmp_path: Path) -> None:
    none = run_torchrun("none", tmp_path / "none.json")
    fp16 = run_torchrun("fp16", tmp_path / "fp16.json")
    for summary, factor in ((none, 1.0), (fp16, 0.5)):
        assert summary["world_size"] == 2
        steps = summary["steps"]
        assert len(steps["loss"]) == len(steps["step_time_s"]) == 5
        assert all(0.0 <= a <= 1.0 for a in steps["accuracy"])
        # Ring allreduce with W = 2 sends half the buffer: grad_bytes for fp32, half for fp16.
        expected = factor * summary["grad_bytes"]
        assert summary["fp32_allreduce_bytes_per_rank"] == summary["grad_bytes"]
        assert steps["bytes_sent_per_rank"] == [expected] * 5
        assert math.isfinite(summary["val_loss"]) and 0.0 <= summary["val_accuracy"] <= 1.0
    # Same init and data: the first loss (before any exchange) is identical, later ones close.
    assert none["steps"]["loss"][0] == fp16["steps"]["loss"][0]
    assert none["steps"]["loss"][-1] == pytest.approx(fp16["steps"]["loss"][-1], abs=0.05)
    assert none["steps"]["loss"][-1] < none["steps"]["loss"][0]


class FakeBucket:
    """What the byte counters and hooks read from a ``dist.GradBucket``."""

    def __init__(self, grads: list[torch.Tensor]) -> None:
        self._buffer = torch.cat([g.reshape(-1) for g in grads])
        self._grads = grads

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def gradients(self) -> list[torch.Tensor]:
        return self._grads


def test_byte_counters() -> None:
    train_ddp = load_train_ddp()
    grads = [torch.zeros(64, 32), torch.zeros(64), torch.zeros(3, 4, 5), torch.zeros(2, 2)]
    bucket = FakeBucket(grads)
    n = 64 * 32 + 64 + 60 + 4
    assert train_ddp._fp16_bytes(None, bucket, 4) == 1.5 * 2 * n
    assert train_ddp._quant8_bytes(None, bucket, 4) == 3 * (8 + n)

    state = SimpleNamespace(
        iter=0, start_powerSGD_iter=2, matrix_approximation_rank=2, min_compression_rate=2
    )
    assert train_ddp._powersgd_bytes(state, bucket, 2) == 4 * n  # before the start: fp32
    state.iter = 2
    # 64x32 at rank 2: P 128 + Q 64. 3x20: (3 + 20) * 2 * 2 = 92 > 60, and 64 (bias, 64x1)
    # and 2x2 do not pass either: uncompressed.
    assert train_ddp._powersgd_bytes(state, bucket, 2) == 4 * (128 + 64 + 64 + 60 + 4)


def test_quant8_hook_single_rank() -> None:
    if dist.is_initialized():
        pytest.skip("needs its own 1-rank process group")
    train_ddp = load_train_ddp()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        g = torch.randn(1000, generator=torch.Generator().manual_seed(0))
        bucket = FakeBucket([g.clone()])
        out = train_ddp.quant8_pertensor_hook(None, bucket).wait()  # type: ignore[arg-type]
        assert out.shape == g.shape and out.dtype == g.dtype
        step = float(g.max() - g.min()) / 255
        assert (out - g).abs().max().item() <= step
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("hook", ["powersgd", "gg"])
def test_train_in_process_single_rank(hook: str, tmp_path: Path, one_thread: None) -> None:
    if hook == "gg":
        pytest.importorskip("ggcomm.ddp")
    if dist.is_initialized():
        pytest.skip("needs train() to make its own 1-rank process group")
    import threading

    def hook_threads():
        return {t for t in threading.enumerate() if t.name == "ggcomm-ddp"}

    before = hook_threads()  # other in-process tests may have left theirs
    train_ddp = load_train_ddp()
    argv = [
        f"--hook={hook}",
        "--steps=4",
        "--batch-size=2",
        "--block-size=16",
        "--corpus-bytes=50000",
        "--eval-batches=1",
        "--log-every=100",
        "--psgd-start=2",
        "--gg-start-iter=1",
        f"--json={tmp_path / 'out.json'}",
    ]
    summary = train_ddp.train(train_ddp.parse_args(argv))
    assert not dist.is_initialized()  # the group train() made is gone
    assert summary == json.loads((tmp_path / "out.json").read_text())
    assert summary["world_size"] == 1 and len(summary["steps"]["loss"]) == 4
    assert summary["steps"]["bytes_sent_per_rank"] == [0.0] * 4  # nothing to send alone
    assert math.isfinite(summary["val_loss"])
    if hook == "gg":
        assert summary["gg_stats"]["total"]["steps"] == 4
    # the hook's worker thread ended with the run (state.close()), before its group did
    assert hook_threads() <= before
