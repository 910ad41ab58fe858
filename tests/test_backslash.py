"""Tests for ggcomm.methods.backslash: the weight-rate constraint."""

from __future__ import annotations

import io
from collections.abc import Iterator
from functools import cache

import pytest
import torch
from torch import nn

from ggcomm import gg, rate
from ggcomm.methods.backslash import BackSlash
from ggcomm.methods.init import apply_gg_init
from ggcomm.tools.workload import GPT, ByteDataset, GPTConfig

CONFIG = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Models this small train fastest on one thread (and far faster on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@cache
def _data() -> ByteDataset:
    return ByteDataset.from_stdlib(block_size=CONFIG.block_size, max_bytes=300_000)


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2]


def test_update_formula_and_stop_at_zero() -> None:
    w = gg.sample(5000, 0.7, std=0.05, generator=torch.Generator().manual_seed(0))
    p = nn.Parameter(w.clone())
    bs = BackSlash([p], strength=0.02, clip=0.05)
    bs.step()
    fit = gg.fit(w.double().numpy())
    assert bs.beta == pytest.approx(fit.beta) and bs.scale == pytest.approx(fit.scale)
    beta, alpha, sigma = bs.beta, bs.scale, fit.std
    shrink = 0.02 * beta * sigma**2 / alpha**beta * (w.abs() + 0.05 * sigma) ** (beta - 1)
    expected = torch.sign(w) * (w.abs() - shrink).clamp_min(0)
    torch.testing.assert_close(p.detach(), expected)
    zeroed = (w.abs() <= shrink) & (w != 0)
    assert zeroed.sum() > 100 and not p[zeroed].any()
    assert ((p.detach() * w) >= 0).all()  # no weight changed sign
    assert (p.detach().abs() <= w.abs()).all()  # every weight shrank (or stayed at zero)
    assert bs.steps == 1


@pytest.mark.parametrize("beta", [0.3, 1.0, 2.0])
def test_strength_means_the_same_at_every_shape(beta: float) -> None:
    """At beta = 2 the step is decoupled weight decay with factor ``strength``; at any
    shape a weight of one standard deviation loses 1-2 x ``strength`` of it."""
    w = gg.sample(200_000, beta, std=0.02, generator=torch.Generator().manual_seed(1))
    p = nn.Parameter(w.clone())
    bs = BackSlash([p], strength=1e-3, clip=1e-6)
    bs.step()
    sigma = gg.GGFit(0.0, bs.scale, bs.beta, 1).std
    assert bs.beta == pytest.approx(beta, rel=0.05) and sigma == pytest.approx(0.02, rel=0.02)
    shrink = (w.abs() - p.detach().abs()) / (1e-3 * sigma)
    near_sigma = (w.abs() / sigma - 1).abs() < 0.05
    assert 0.95 <= shrink[near_sigma].mean().item() <= 2.0
    if beta == 2.0:
        big = w.abs() > 0.5 * sigma
        ratio = (w - p.detach())[big] / w[big]
        assert ratio.mean().item() == pytest.approx(1e-3, rel=0.1)


def test_refit_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_fit = gg.fit

    def counting_fit(x, **kw):  # noqa: ANN001, ANN003
        calls.append(1)
        return real_fit(x, **kw)

    monkeypatch.setattr("ggcomm.methods.backslash.gg.fit", counting_fit)
    p = nn.Parameter(torch.randn(100, 10))
    bs = BackSlash([("w", p)], strength=1e-3, refit_every=3)
    seen = []
    for _ in range(7):
        bs.step()
        seen.append(len(calls))
    assert seen == [1, 1, 1, 2, 2, 2, 3]


def _run(
    steps: int,
    strength: float | None,
    split: int | None = None,
    shape: float = 1.0,
) -> tuple[GPT, list[float]]:
    """Tiny GPT with GG init, AdamW, optionally BackSlash; optionally checkpointed and
    resumed at ``split``. Returns the model and its losses."""

    def build() -> tuple[GPT, torch.optim.Optimizer, BackSlash | None, torch.Generator]:
        torch.manual_seed(0)
        model = GPT(CONFIG)
        touched = apply_gg_init(model, shape, generator=torch.Generator().manual_seed(0))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        bs = None
        if strength is not None:
            bs = BackSlash(touched.weights.items(), strength=strength, refit_every=4)
        return model, opt, bs, torch.Generator().manual_seed(1)

    model, opt, bs, gen = build()
    losses = []
    for i in range(steps):
        if i == split:
            buf = io.BytesIO()
            parts = {"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state()}
            if bs is not None:
                parts["bs"] = bs.state_dict()
            torch.save(parts, buf)
            buf.seek(0)
            ckpt = torch.load(buf)
            model, opt, bs, gen = build()
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            gen.set_state(ckpt["gen"])
            if bs is not None:
                bs.load_state_dict(ckpt["bs"])
        x, y = _data().batch("train", 8, gen)
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        if bs is not None:
            bs.step()
        losses.append(loss.item())
    return model, losses


def test_lowers_weight_bits_and_entropy() -> None:
    steps = 40
    plain, plain_loss = _run(steps, None)
    constrained, bs_loss = _run(steps, 0.03)
    step = 0.02 * (2.0 / CONFIG.n_embd) ** 0.5  # 1/50 of the He standard deviation

    def bits(model: GPT) -> dict[str, float]:
        w = torch.cat([p.detach().flatten() for p in _weights(model)])
        return rate.summary(rate.quantize(w, step))

    a, b = bits(plain), bits(constrained)
    assert b["entropy"] < a["entropy"] - 0.5, (a, b)
    assert b["eg"] < a["eg"] - 0.3, (a, b)
    # still trains: the loss fell well below its start
    assert bs_loss[-1] < bs_loss[0] - 0.5 and plain_loss[-1] < plain_loss[0] - 0.5


def test_resume_is_bit_exact() -> None:
    straight, _ = _run(10, 0.01)
    resumed, _ = _run(10, 0.01, split=6)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_composes_with_gg_init() -> None:
    torch.manual_seed(0)
    model = GPT(CONFIG)
    touched = apply_gg_init(model, 0.5, generator=torch.Generator().manual_seed(0))
    bs = BackSlash(touched.weights.values(), strength=1e-3)
    fit = bs.refit()
    assert fit is not None and fit.n == sum(p.numel() for p in touched.weights.values())
    # layers of different fan-in mix different scales, which only lowers the shape
    assert 0.3 < bs.beta <= 0.55
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bs.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (name in touched.weights), name


def test_state_dict_and_edge_cases() -> None:
    p = nn.Parameter(torch.randn(50))
    bs = BackSlash([p])
    assert bs.state_dict() == {"steps": 0, "beta": None, "scale": None}
    bs.step()
    other = BackSlash([p])
    other.load_state_dict(bs.state_dict())
    assert other.state_dict() == bs.state_dict() and other.beta is not None
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"steps": 1})

    zero = nn.Parameter(torch.zeros(10))
    bz = BackSlash([zero])
    bz.step()
    assert bz.beta is None and not zero.any()

    half = nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    start = half.detach().clone()
    BackSlash([half], strength=0.05).step()
    assert half.dtype == torch.bfloat16 and (half.detach().abs() <= start.abs()).all()

    bad = nn.Parameter(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="NaN"):
        BackSlash([bad]).step()
    with pytest.raises(ValueError, match="strength"):
        BackSlash([p], strength=-1.0)
    with pytest.raises(ValueError, match="clip"):
        BackSlash([p], clip=0.0)
    with pytest.raises(ValueError, match="refit_every"):
        BackSlash([p], refit_every=0)
    with pytest.raises(ValueError, match="empty"):
        BackSlash([])
    with pytest.raises(ValueError, match="twice"):
        BackSlash([p, p])
    with pytest.raises(TypeError):
        BackSlash([torch.zeros(3, dtype=torch.int64)])
