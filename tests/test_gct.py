"""Tests for ggcomm.methods.gct: gradient-constrained training."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from ggcomm import rate
from ggcomm.methods.gct import DEFAULT_REL_STEP, GCT, GCTStateError
from ggcomm.tools.workload import make_mlp_workload, mlp_batch

WIDTH = 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Models this small train fastest on one thread (and far faster on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _grad_bits(params: list[nn.Parameter], rel_step: float = DEFAULT_REL_STEP) -> float:
    """Average order-0 EG bits per element of the gradients, step = rel_step x RMS (the
    rate GCT constrains with its defaults)."""
    total_bits = 0.0
    total = 0
    for p in params:
        g = p.grad
        step = rel_step * g.pow(2).mean().sqrt().item()
        bits, _ = rate.eg_bits(rate.signed_to_unsigned(rate.quantize(g, step)), k=0)
        total_bits += bits * g.numel()
        total += g.numel()
    return total_bits / total


def _train(
    opt_name: str, lam: float | None, steps: int, measured: int
) -> tuple[nn.Module, list[float], list[float]]:
    """Seeded full-batch regression with the one-layer MLP workload (512 samples); GCT
    when ``lam`` is not None. Returns (model, gradient bits of the last ``measured``
    steps, losses)."""
    torch.manual_seed(0)
    model = make_mlp_workload(WIDTH, 1)
    params = list(model.parameters())
    if opt_name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=0.05)
    else:
        opt = torch.optim.AdamW(params, lr=1e-3)
    gct = GCT(model.named_parameters(), lam=lam or 0.0, gamma=1.0) if lam is not None else None
    gen = torch.Generator().manual_seed(1)
    x, y = mlp_batch(512, WIDTH, gen)
    bits, losses = [], []
    for i in range(steps):
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        if i >= steps - measured:
            bits.append(_grad_bits(params))
        losses.append(loss.item())
        if gct is not None:
            gct.apply_()
        opt.step()
    return model, bits, losses


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_gct_lowers_gradient_bits(opt_name: str) -> None:
    """Full-batch linear regression: the diagonal secant tracks the (near-diagonal)
    Hessian, so GCT descends D + lam R and the gradients it produces cost fewer bits than
    those of plain training at the same step count, without a worse loss."""
    steps, tail = 60, 20
    _, plain_bits, plain_loss = _train(opt_name, None, steps, tail)
    _, gct_bits, gct_loss = _train(opt_name, 0.1, steps, tail)
    plain = sum(plain_bits) / tail
    constrained = sum(gct_bits) / tail
    assert constrained < plain - 0.1, (constrained, plain)
    assert gct_loss[-1] <= plain_loss[-1] * 1.02
    # lam = 0 is exactly plain training
    _, zero_bits, zero_loss = _train(opt_name, 0.0, 5, 5)
    _, ref_bits, ref_loss = _train(opt_name, None, 5, 5)
    assert zero_bits == ref_bits and zero_loss == ref_loss


def _rate_derivative(g: torch.Tensor, step: float, n_total: int) -> torch.Tensor:
    """d/dg of the k=0 smooth EG length 2 log2(u + 1) + 1, u = 2|q| - [q > 0], averaged
    over n_total elements (written out, independently of the library)."""
    q = torch.round(g / step)
    u = 2 * q.abs() - (q > 0).float()
    return 2 / (math.log(2) * (u + 1)) * 2 * torch.sign(q) / step / n_total


def test_equivalent_gradient_formula() -> None:
    a = nn.Parameter(torch.tensor([0.5, -0.2, 0.1, 0.3]))
    b = nn.Parameter(torch.tensor([1.0, 2.0]))
    lam, eps = 0.3, 1e-3
    gct = GCT([("a", a), ("b", b)], lam=lam, eps=eps, rel_step=0.5)
    g1a, g1b = torch.tensor([0.4, -0.3, 0.2, 0.05]), torch.tensor([0.1, -0.1])
    a.grad, b.grad = g1a.clone(), g1b.clone()
    bits = gct.apply_()
    assert torch.equal(a.grad, g1a) and torch.equal(b.grad, g1b)  # first step: plain
    assert bits is not None and bits >= 1.0
    w1a, w1b = a.detach().clone(), b.detach().clone()
    with torch.no_grad():  # what an optimizer might do: zero, tiny negative, normal moves
        a += torch.tensor([0.0, -1e-5, -0.25, 0.125])
        b += torch.tensor([0.5, 2e-4])
    g2a, g2b = torch.tensor([0.3, -0.35, 0.25, 0.01]), torch.tensor([0.12, -0.3])
    a.grad, b.grad = g2a.clone(), g2b.clone()
    gct.apply_()
    dw_a = torch.tensor([eps, -eps, -0.25, 0.125])  # 0 -> +eps, -1e-5 -> -eps
    dw_b = torch.tensor([0.5, eps])
    for g2, g1, dw, got in ((g2a, g1a, dw_a, a.grad), (g2b, g1b, dw_b, b.grad)):
        step = 0.5 * g2.pow(2).mean().sqrt().item()
        h = (g2 - g1) / dw
        expected = g2 + lam * h * _rate_derivative(g2, step, n_total=6)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    # the stored state is this step's weights and raw gradients
    state = gct.state_dict()
    assert torch.equal(state["w_prev"]["a"], a.detach())
    assert torch.equal(state["g_prev"]["a"], g2a)
    assert not torch.equal(state["w_prev"]["a"], w1a) and state["w_prev"]["b"][0] != w1b[0]


def test_fixed_step_rate_and_returned_bits() -> None:
    p = nn.Parameter(torch.zeros(1000))
    gct = GCT([p], lam=1.0, step=0.01)
    p.grad = torch.linspace(-0.1, 0.1, 1000)
    bits = gct.apply_()
    g = torch.linspace(-0.1, 0.1, 1000)
    assert bits == pytest.approx(rate.eg_rate_surrogate(g, 0.01).item())
    exact, _ = rate.eg_bits(rate.signed_to_unsigned(rate.quantize(g, 0.01)), k=0)
    assert exact <= bits < exact + 2  # the smooth bound is within 2 bits per element
    assert gct.last_bits == bits


def test_lambda_decay() -> None:
    p = nn.Parameter(torch.zeros(3))
    gct = GCT([p], lam=0.5, gamma=0.8)
    assert gct.lam == 0.5
    assert gct.epoch_end() == pytest.approx(0.4)
    gct.epoch_end()
    assert gct.epoch == 2 and gct.lam == pytest.approx(0.5 * 0.8**2)
    flat = GCT([p], lam=0.5, gamma=1.0)
    for _ in range(5):
        flat.epoch_end()
    assert flat.lam == 0.5


def test_non_finite_gradients_pass_through() -> None:
    a = nn.Parameter(torch.ones(4))
    b = nn.Parameter(torch.ones(3))
    gct = GCT([a, b], lam=1.0)
    a.grad, b.grad = torch.full((4,), 0.1), torch.full((3,), -0.2)
    gct.apply_()
    with torch.no_grad():
        a -= 0.01
        b += 0.01
    before = gct.state_dict()
    bad = torch.tensor([0.1, float("inf"), 0.2, 0.3])
    a.grad, b.grad = bad.clone(), torch.tensor([float("nan"), 1.0, 2.0])
    assert gct.apply_() is None
    assert torch.equal(a.grad, bad) and b.grad.isnan()[0] and b.grad[1:].tolist() == [1.0, 2.0]
    after = gct.state_dict()
    assert gct.skipped == 1 == after["skipped"]
    for key in ("w_prev", "g_prev"):
        for name in before[key]:
            assert torch.equal(before[key][name], after[key][name])


def test_grad_scaler_still_skips_the_step() -> None:
    torch.manual_seed(0)
    model = make_mlp_workload(16, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    gct = GCT(model.named_parameters(), lam=0.1)
    x, y = mlp_batch(8, 16, torch.Generator().manual_seed(0))
    for poison in (False, True):
        opt.zero_grad()
        _, loss = model(x, y)
        scaler.scale(loss).backward()
        if poison:
            model.net[0].weight.grad[0, 0] = float("inf")
        scaler.unscale_(opt)
        before = [p.detach().clone() for p in model.parameters()]
        bits = gct.apply_()
        scaler.step(opt)
        scaler.update()
        moved = any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
        assert (bits is None) == poison and moved != poison
    assert scaler.get_scale() == 2.0**7  # the overflow was seen and the scale backed off


def _resume_run(
    opt_name: str, steps: int, split: int | None, lam: float = 0.05
) -> list[torch.Tensor]:
    """AdamW/SGD + GCT on fresh minibatches, optionally checkpointed and resumed at split."""

    def build() -> tuple[nn.Module, torch.optim.Optimizer, GCT, torch.Generator]:
        torch.manual_seed(0)
        model = make_mlp_workload(32, 2)
        if opt_name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gct = GCT(model.named_parameters(), lam=lam, gamma=0.5, eps=1e-5)
        return model, opt, gct, torch.Generator().manual_seed(1)

    model, opt, gct, gen = build()
    for i in range(steps):
        if i == split:
            buf = io.BytesIO()
            torch.save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "gct": gct.state_dict(),
                    "gen": gen.get_state(),
                },
                buf,
            )
            buf.seek(0)
            ckpt = torch.load(buf)
            model, opt, gct, gen = build()
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            gct.load_state_dict(ckpt["gct"])
            gen.set_state(ckpt["gen"])
        x, y = mlp_batch(16, 32, gen)
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        gct.apply_()
        opt.step()
        if i % 3 == 2:
            gct.epoch_end()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_resume_is_bit_exact(opt_name: str) -> None:
    straight = _resume_run(opt_name, 10, None)
    resumed = _resume_run(opt_name, 10, 5)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed, strict=True))
    # the constraint did act: plain training ends elsewhere
    plain = _resume_run(opt_name, 10, None, lam=0.0)
    assert not torch.equal(straight[0], plain[0])


def test_state_dict_roundtrip_and_errors() -> None:
    a, b = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(2, 2))
    gct = GCT([("a", a), ("b", b)], lam=0.2, gamma=0.5)
    a.grad, b.grad = torch.ones(4), torch.ones(2, 2)
    gct.apply_()
    gct.epoch_end()
    state = gct.state_dict()
    other = GCT([("a", a), ("b", b)], lam=1.0, gamma=0.9)
    other.load_state_dict(state)
    assert other.lam == pytest.approx(0.1) and other.epoch == 1
    assert other.state_dict()["w_prev"].keys() == {"a", "b"}
    state["w_prev"]["a"] += 1  # the loaded state is a copy
    assert torch.equal(other.state_dict()["w_prev"]["a"], torch.ones(4))

    with pytest.raises(GCTStateError, match="does not have"):
        GCT([("a", a)]).load_state_dict(gct.state_dict())
    with pytest.raises(GCTStateError, match="shape"):
        GCT([("a", nn.Parameter(torch.ones(5))), ("b", b)]).load_state_dict(gct.state_dict())
    with pytest.raises(GCTStateError, match="version"):
        GCT([a]).load_state_dict({**gct.state_dict(), "version": 99})


def test_constructor_errors_and_unused_parameters() -> None:
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="choose one of"):
        GCT([p], step=0.1, rel_step=0.1)
    with pytest.raises(ValueError, match="lam"):
        GCT([p], lam=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        GCT([p], gamma=1.5)
    with pytest.raises(ValueError, match="eps"):
        GCT([p], eps=0.0)
    with pytest.raises(ValueError, match="empty"):
        GCT([])
    with pytest.raises(ValueError, match="twice"):
        GCT([p, p])
    with pytest.raises(TypeError, match="named_parameters"):
        GCT([p.detach().numpy()])
    with pytest.raises(ValueError):
        GCT([p], k=-1)
    # parameters without a gradient are left alone
    q = nn.Parameter(torch.ones(2))
    gct = GCT([p, q])
    assert gct.apply_() is None
    q.grad = torch.tensor([0.5, -0.5])
    assert gct.apply_() is not None and p.grad is None
    assert gct.state_dict()["w_prev"].keys() == {"1"}
