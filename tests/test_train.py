"""Tests for ggcomm.tools.train: the one training loop, and that the tools train through it."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ggcomm.tools import analyze, demo, train, train_ddp
from ggcomm.tools.train import Step, StepTimer, draws, evaluate, fit, model_loss
from ggcomm.tools.workload import GPT, ByteDataset, GPTConfig, lr_factor, stdlib_corpus

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PAPER = BENCHMARKS / "paper"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run single-threaded: on a small shared machine, torch's threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Regression(nn.Module):
    """A linear model in the workload convention: ``forward(x, y) -> (output, loss)``."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.linear(x)
        return out, nn.functional.mse_loss(out, y)


def regression_batches(seed: int, width: int = 4) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    truth = torch.arange(1.0, width + 1.0)[:, None]

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(8, width, generator=gen)
        return x, x @ truth

    return draws(draw)


def run_regression(seed: int, steps: int = 20, **kwargs: object) -> tuple[Regression, list]:
    torch.manual_seed(seed)
    model = Regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return model, fit(model, opt, regression_batches(seed), steps, **kwargs)


@contextmanager
def fit_calls() -> Iterator[list[list[dict]]]:
    """The records of every :func:`fit` call that returns inside the block.

    Watched through the profiler, by fit's code object: whatever name or module the caller
    reached it by, the records are those that fit itself returned.
    """
    calls: list[list[dict]] = []
    code = train.fit.__code__

    def profile(frame, event, arg):  # noqa: ANN001, ANN202
        if event == "return" and frame.f_code is code and arg is not None:
            calls.append(arg)

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield calls
    finally:
        sys.setprofile(previous)


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    """A 1-rank gloo process group for code that trains under DDP."""
    if dist.is_initialized():
        pytest.skip("needs its own 1-rank process group")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# --- the loop -----------------------------------------------------------------------------------


def test_tiny_gpt_learns() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64))
    data = ByteDataset(stdlib_corpus(300_000), block_size=32)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    records = fit(model, opt, draws(lambda: data.batch("train", 16, gen)), 30)
    assert [r["step"] for r in records] == list(range(30))
    losses = [r["loss"] for r in records]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 1.0, losses
    assert all(r["time_s"] > 0 for r in records)


def test_callbacks_run_in_order_with_step_numbers() -> None:
    events: list[tuple[str, int]] = []
    weights: list[torch.Tensor] = []
    torch.manual_seed(0)
    model = Regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def penalty() -> torch.Tensor:
        events.append(("penalty", -1))
        return torch.zeros(())

    def backward_a(step: Step) -> None:
        assert model.linear.weight.grad is not None  # the gradients are there
        weights.append(model.linear.weight.detach().clone())
        events.append(("backward a", step.index))

    def backward_b(step: Step) -> None:
        events.append(("backward b", step.index))

    def after(step: Step) -> None:
        assert not torch.equal(model.linear.weight, weights[-1])  # the optimizer has stepped
        assert step.record["loss"] == step.loss.item() and "time_s" in step.record
        step.record["seen"] = step.index
        events.append(("step", step.index))

    records = fit(model, opt, regression_batches(0), 3, penalties=[penalty],
                  after_backward=[backward_a, backward_b], after_step=[after])  # fmt: skip
    expected = []
    for i in range(3):
        expected += [("penalty", -1), ("backward a", i), ("backward b", i), ("step", i)]
    assert events == expected
    assert [(r["step"], r["seen"]) for r in records] == [(0, 0), (1, 1), (2, 2)]


def test_penalty_moves_the_gradient_not_the_recorded_loss() -> None:
    plain, plain_records = run_regression(0, steps=1)
    torch.manual_seed(0)
    model = Regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    start = model.linear.weight.detach().clone()
    c = 0.5
    grads = []
    records = fit(model, opt, regression_batches(0), 1,
                  penalties=[lambda: c * model.linear.weight.square().sum()],
                  after_backward=[lambda s: grads.append(model.linear.weight.grad.clone())])
    assert records[0]["loss"] == plain_records[0]["loss"]  # the model's loss alone
    plain_grad = (start - plain.linear.weight.detach()) / 0.05
    assert torch.allclose(grads[0], plain_grad + 2 * c * start, atol=1e-5)


def test_after_backward_rewrites_gradients_before_the_step() -> None:
    # clipping: the update is bounded by lr * max_norm
    torch.manual_seed(0)
    model = Regression()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    norms = []

    def clip(step: Step) -> None:
        norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.01)))

    fit(model, opt, regression_batches(0), 1, after_backward=[clip])
    after = [p.detach().clone() for p in model.parameters()]
    update = torch.cat([(b - a).reshape(-1) for b, a in zip(before, after, strict=True)])
    assert norms[0] > 0.01  # the raw gradient was larger
    assert float(update.norm()) == pytest.approx(0.05 * 0.01, rel=1e-4)
    # zeroed gradients: no update at all
    fit(model, opt, regression_batches(1), 2,
        after_backward=[lambda s: [p.grad.zero_() for p in model.parameters()]])
    assert all(torch.equal(p, a) for p, a in zip(model.parameters(), after, strict=True))


def test_deterministic_for_a_seed() -> None:
    a, ra = run_regression(3)
    b, rb = run_regression(3)
    c, rc = run_regression(4)
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert [r["loss"] for r in ra] != [r["loss"] for r in rc]
    assert ra[-1]["loss"] < ra[0]["loss"] / 10  # and it learns


def test_schedule_sets_each_steps_learning_rate() -> None:
    factor = lr_factor(10, warmup=3, floor=0.1)
    _, records = run_regression(0, steps=10, schedule=factor)
    assert [r["lr"] for r in records] == pytest.approx([0.05 * factor(i) for i in range(10)])
    assert records[0]["lr"] == pytest.approx(0.05 / 3)
    _, constant = run_regression(0, steps=3)
    assert [r["lr"] for r in constant] == [0.05] * 3


def test_stop_and_a_short_batch_source() -> None:
    torch.manual_seed(0)
    model = Regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = [next(regression_batches(0)) for _ in range(3)]
    assert len(fit(model, opt, batches, 5)) == 3  # ends when the batches do

    def stop_at_1(step: Step) -> None:
        step.stop = step.index == 1

    assert [r["step"] for r in fit(model, opt, batches, 5, after_step=[stop_at_1])] == [0, 1]
    assert fit(model, opt, batches, 0) == []
    with pytest.raises(ValueError):
        fit(model, opt, batches, -1)


def test_custom_loss_fn_and_evaluate() -> None:
    torch.manual_seed(0)
    net = nn.Linear(4, 1)

    def loss_fn(model: nn.Module, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(batch[0])
        return out, nn.functional.mse_loss(out, batch[1])

    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    records = fit(net, opt, regression_batches(0), 20, loss_fn=loss_fn)
    assert records[-1]["loss"] < records[0]["loss"]

    batches = [next(regression_batches(5)) for _ in range(3)]
    net.train()
    loss, metric = evaluate(net, batches, loss_fn=loss_fn, metric=lambda out, b: float(out.mean()))
    assert net.training  # the mode is restored
    with torch.no_grad():
        expected = [float(nn.functional.mse_loss(net(x), y)) for x, y in batches]
        means = [float(net(x).mean()) for x, _ in batches]
    assert loss == pytest.approx(sum(expected) / 3) and metric == pytest.approx(sum(means) / 3)
    model = Regression()
    model.eval()
    assert evaluate(model, batches)[1] is None and not model.training
    with pytest.raises(ValueError):
        evaluate(model, [])
    assert model_loss(model, batches[0])[1].ndim == 0


def test_step_timer_on_the_cpu() -> None:
    timer = StepTimer()
    timer.start()
    sum(range(10_000))
    assert 0 < timer.stop() < 10


# --- the tools train through it -----------------------------------------------------------------


def test_train_ddp_trains_through_fit(tmp_path: Path, one_rank_group: None) -> None:
    argv = ["--steps=3", "--batch-size=2", "--block-size=16", "--corpus-bytes=50000",
            "--eval-batches=1", "--log-every=100"]  # fmt: skip
    with fit_calls() as calls:
        summary = train_ddp.train(train_ddp.parse_args(argv))
    assert len(calls) == 1
    records = calls[0]
    assert summary["steps"]["loss"] == [r["loss"] for r in records]
    assert summary["steps"]["step_time_s"] == [r["time_s"] for r in records]
    assert summary["steps"]["accuracy"] == [r["accuracy"] for r in records]


def test_demo_trains_through_fit(one_rank_group: None) -> None:
    import threading

    def hook_threads():
        return {t for t in threading.enumerate() if t.name == "ggcomm-ddp"}

    before = hook_threads()
    args = demo._parse(["--steps", "10", "--batch-size", "2", "--no-progress"])
    rows = []
    with fit_calls() as calls:
        result = demo.train_rank(args, "ggcomm full", lambda step, row: rows.append((step, row)))
    assert len(calls) == 1 and len(calls[0]) == 10
    losses = [r["loss"] for r in calls[0]]
    assert [row[0] for row in result["rows"]] == losses
    assert [step for step, _ in rows] == list(range(10))
    assert math.isfinite(result["val_loss"]) and 0 <= result["val_accuracy"] <= 1
    assert hook_threads() <= before  # the hook's worker thread ended with the training


def test_analyze_trains_through_fit() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16))
    data = ByteDataset(stdlib_corpus(50_000), block_size=16)
    with fit_calls() as calls:
        last = analyze.train(model, data, 3, batch_size=2, seed=0)
    assert len(calls) == 1 and [r["step"] for r in calls[0]] == [0, 1, 2]
    assert last == calls[0][-1]["loss"]


def test_paper_sweeps_train_through_fit() -> None:
    if str(PAPER) not in sys.path:
        sys.path.insert(0, str(PAPER))
    import _common
    import act_sweep

    setup = _common.Setup(_common.small_gpt(n_embd=16), eval_batches=1)
    data = ByteDataset(stdlib_corpus(100_000), block_size=setup.gpt.block_size)
    with fit_calls() as calls:
        _, history = act_sweep.train(setup, data, 0.3, 3, seed=0)
    assert len(calls) == 1
    assert history["loss"] == [r["loss"] for r in calls[0]]
    assert history["bits"] == [r["bits"] for r in calls[0]] and len(history["bits"]) == 3


def test_codec_bench_gradients_come_from_fit() -> None:
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import codec_bench

    with fit_calls() as calls:
        pieces = codec_bench.model_gradients(0, steps=2, batch=2)
    assert len(calls) == 1 and [r["step"] for r in calls[0]] == [0, 1]
    n_params = len(list(codec_bench.TinyLM().parameters()))
    assert len(pieces) == 2 * n_params and all(p.ndim == 1 for p in pieces)
    assert all(math.isfinite(r["loss"]) for r in calls[0])
