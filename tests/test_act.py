"""Tests for ggcomm.methods.act: the activation rate penalty, its taps, schedule and state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ggcomm import codec, gg, rate
from ggcomm.methods.act import ACT, RateTap
from ggcomm.step_policy import TRANSPORT_RANS
from ggcomm.tools.workload import GPT, ByteDataset, GPTConfig


def codec_bpe(x: torch.Tensor, step: float) -> float:
    """The frame's bits per element as ACT's default settings (the transports') code it."""
    return codec.encode(x.detach(), step, rans=TRANSPORT_RANS).bits_per_element


@pytest.mark.parametrize("beta", (0.5, 1.0, 2.0))
def test_rate_tracks_codec_bits(beta: float) -> None:
    """On GG data at 2-8 bits per element the recorded rate is the codec's frame bits."""
    x = gg.sample((256, 256), beta, std=1.0, generator=torch.Generator().manual_seed(3))
    fit = gg.fit(x)
    for target in (2.0, 4.0, 6.0, 8.0):
        step = rate.step_for_rate(fit, target)
        act = ACT(1.0, step=step) if target < 8 else ACT(1.0, rel_step=step / rate.rms(x))
        act.record("a", x.clone().requires_grad_(True))
        got = act.rate().item()
        want = codec_bpe(x, step)
        assert abs(got / want - 1.0) < 0.05, (beta, target, got, want)
        assert got == pytest.approx(want, rel=1e-6)  # the frame, bit for bit


@pytest.mark.parametrize("block_size,rans,mode", [(16384, True, "rans"),
                                                 (16384, False, "zero_runs"),
                                                 (512, True, "zero_runs")])
def test_rate_tracks_codec_on_sparse_blocks(block_size: int, rans: bool, mode: str) -> None:
    """Below 2 bits the codec codes rANS (large blocks of small symbols, where allowed) or
    zero runs; the rate follows it there too."""
    x = gg.sample(1 << 16, 0.5, generator=torch.Generator().manual_seed(4))
    step = rate.step_for_rate(gg.fit(x), 1.2)
    act = ACT(1.0, step=step, block_size=block_size, rans=rans)
    act.record("a", x.requires_grad_(True))
    frame = codec.encode(x.detach(), step, block_size=block_size, rans=rans)
    assert codec.inspect(frame).blocks[0].mode.startswith(mode)
    assert act.rate().item() == pytest.approx(8 * frame.nbytes / x.numel(), rel=1e-6)
    act.penalty().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    coded = torch.round(x.detach() / step) != 0
    assert (torch.sign(x.grad[coded]) == torch.sign(x.detach()[coded])).all()
    assert (x.grad[~coded] == 0).all()


def test_gradient_shrinks_activations() -> None:
    x = gg.sample(4096, 1.0, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    act = ACT(0.5, step=0.05)
    act.record("a", x)
    penalty = act.penalty()
    assert penalty.requires_grad
    assert float(penalty.detach()) == pytest.approx(0.5 * codec_bpe(x, 0.05))
    penalty.backward()
    g = x.grad
    assert g is not None and torch.isfinite(g).all()
    coded = torch.round(x.detach() / 0.05) != 0
    assert (torch.sign(g[coded]) == torch.sign(x.detach()[coded])).all()
    assert (g[~coded] == 0).all()
    # Descending lambda * R moves every coded element towards zero and lowers the bits.
    y = x.detach() - (0.5 * 0.05 / float(g.abs().max())) * g  # at most half a step
    assert (y.abs()[coded] < x.detach().abs()[coded]).all()
    assert codec_bpe(y, 0.05) < codec_bpe(x, 0.05)


def test_relative_step_gradient_has_no_rescaling_part() -> None:
    x = (3.0 * torch.randn(64, 64, generator=torch.Generator().manual_seed(6))).requires_grad_()
    act = ACT(1.0, rel_step=0.1)
    act.record("a", x)
    act.penalty().backward()
    g = x.grad
    assert g is not None and g.abs().sum() > 0
    assert float((g * x.detach()).sum()) == pytest.approx(
        0.0, abs=1e-6 * float(g.norm() * x.detach().norm())
    )


def _train(lam: float, steps: int, seed: int = 0) -> tuple[float, float]:
    """Train a tiny GPT; returns (codec bits of the block-0 output on a fixed batch, loss)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32))
    data = ByteDataset.from_stdlib(block_size=32, max_bytes=200_000)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    step = 2e-3
    act = ACT(lam, step=step, warmup_steps=5)
    act.attach({"boundary": model.blocks[0]})
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = data.batch("train", 8, gen)
        _, loss = model(x, y)
        (loss + act.penalty()).backward()
        opt.step()
        opt.zero_grad()
        act.step()
    act.remove()
    captured: list[torch.Tensor] = []
    handle = model.blocks[0].register_forward_hook(lambda m, i, o: captured.append(o))
    x, y = data.batch("val", 16, torch.Generator().manual_seed(99))
    with torch.no_grad():
        _, loss = model(x, y)
    handle.remove()
    return codec_bpe(captured[0], step), float(loss)


def test_training_with_act_lowers_codec_bits() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread beats two contended ones
    try:
        bits_plain, _ = _train(0.0, 25)
        bits_act, loss_act = _train(0.2, 25)
    finally:
        torch.set_num_threads(threads)
    assert bits_act < bits_plain - 1.0, (bits_act, bits_plain)
    assert math.isfinite(loss_act) and loss_act < 5.0  # still learning (uniform is 5.55)


def test_schedule_and_state_dict() -> None:
    act = ACT(2.0, warmup_steps=4, start_step=2)
    seen = []
    for _ in range(8):
        seen.append(act.current_lam)
        act.step()
    assert seen == [0.0, 0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert ACT(0.3).current_lam == 0.3  # no warm-up: full strength at once

    state = act.state_dict()
    other = ACT(9.0)
    other.load_state_dict(state)
    assert other.state_dict() == state and other.current_lam == act.current_lam == 2.0
    resumed = ACT(2.0, warmup_steps=4, start_step=2)
    resumed.load_state_dict({**state, "num_steps": 4})
    assert resumed.current_lam == 1.0
    with pytest.raises(KeyError):
        other.load_state_dict({"lam": 1.0})
    with pytest.raises(ValueError):
        other.load_state_dict({**state, "num_steps": -1})
    with pytest.raises(ValueError):
        ACT(-1.0)
    with pytest.raises(ValueError):
        ACT(1.0, warmup_steps=-2)
    with pytest.raises(ValueError):
        ACT(1.0, step=0.1, rel_step=0.1)
    with pytest.raises(ValueError):
        ACT(1.0, k=31)
    with pytest.raises(ValueError):
        ACT(1.0, inject=True, reduction="mean")


def test_hooks_attach_and_remove_cleanly() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    act = ACT(1.0, step=0.01)
    act.attach([model[0], model[2]])
    x = torch.randn(5, 8)
    ref = model(x)
    assert torch.equal(ref, nn.Sequential(*model)(x))  # outputs are untouched
    assert set(act.stats()) == {"tap0", "tap1"}
    assert act.rate().item() > 0
    act.remove()
    assert all(not m._forward_hooks for m in model)
    act.penalty()
    model(x)
    assert act.rate().item() == 0.0


def test_rate_tap_in_sequential_and_reduction() -> None:
    mean_act = ACT(1.0, step=0.01)
    sum_act = ACT(1.0, step=0.01, reduction="sum")
    model = nn.Sequential(nn.Linear(8, 64), mean_act.tap("s0"), sum_act.tap("s0"))
    big = nn.Sequential(nn.Linear(64, 512), mean_act.tap("s1"), sum_act.tap("s1"))
    assert isinstance(model[1], RateTap)
    x = torch.randn(16, 8)
    h = model(x)
    assert torch.equal(h, model[0](x))
    big(h)
    stats = mean_act.stats()
    n0, n1 = stats["s0"].numel, stats["s1"].numel
    b0, b1 = stats["s0"].bits, stats["s1"].bits
    assert mean_act.rate().item() == pytest.approx((b0 * n0 + b1 * n1) / (n0 + n1), rel=1e-5)
    assert sum_act.rate().item() == pytest.approx(b0 + b1, rel=1e-5)
    with pytest.raises(ValueError):
        mean_act.tap("s0")
    with torch.no_grad():  # evaluation records nothing
        mean_act.penalty()
        model(x)
    assert mean_act.rate().item() == 0.0


def test_bfloat16_and_non_finite() -> None:
    a = torch.randn(32, 64, generator=torch.Generator().manual_seed(7))
    a[0, 0], a[1, 1], a[2, 2] = float("nan"), float("inf"), -float("inf")
    x = a.to(torch.bfloat16).requires_grad_(True)
    act = ACT(0.1, rel_step=0.05)
    act.record("a", x)
    penalty = act.penalty()
    assert penalty.dtype == torch.float32 and math.isfinite(float(penalty.detach()))
    step = act.stats()["a"].step
    assert step == pytest.approx(0.05 * rate.rms(x))
    assert float(penalty.detach()) == pytest.approx(0.1 * codec_bpe(x, step), rel=1e-6)
    penalty.backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    assert torch.isfinite(x.grad).all()
    assert x.grad[0, 0] == 0 and x.grad[1, 1] == 0 and x.grad[2, 2] == 0
    # A tensor with no finite scale is skipped, not recorded as NaN.
    empty = torch.full((10,), float("nan"), requires_grad=True)
    act.record("a", empty)
    assert act.skipped == 1 and act.rate().item() == 0.0


def test_inject_matches_penalty_gradient() -> None:
    torch.manual_seed(8)
    layer = nn.Linear(16, 32)
    x = torch.randn(64, 16)

    plain = ACT(0.3, step=0.02)
    layer.zero_grad()
    h = plain.record("h", layer(x))
    (h.square().mean() + plain.penalty()).backward()
    want = layer.weight.grad.clone()

    injected = ACT(0.3, step=0.02, inject=True)
    layer.zero_grad()
    h = injected.record("h", layer(x))
    penalty = injected.penalty()
    assert not penalty.requires_grad and float(penalty) > 0
    h.square().mean().backward()
    torch.testing.assert_close(layer.weight.grad, want)


def test_quantize_forward_passes_decoded_values() -> None:
    x = torch.randn(1000).requires_grad_(True)
    act = ACT(1.0, step=0.1, quantize_forward=True)
    out = act.record("a", x)
    decoded = codec.decode(codec.encode(x.detach(), 0.1))
    assert torch.equal(out.detach(), decoded)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight through
    with torch.no_grad():
        assert torch.equal(act.record("a", x), decoded)


def test_hook_on_tuple_outputs() -> None:
    from collections import namedtuple

    Pair = namedtuple("Pair", "hidden cache")

    class Block(nn.Module):
        def __init__(self, wrap) -> None:
            super().__init__()
            self.wrap = wrap

        def forward(self, x: torch.Tensor):
            return self.wrap(x * 3.0, "cache")

    x = torch.randn(50, requires_grad=True)
    for wrap in (lambda h, c: (h, c), lambda h, c: [h, c], Pair):
        act = ACT(1.0, step=0.5, quantize_forward=True)
        block = Block(wrap)
        act.attach(block)
        out = block(x)
        assert type(out) is type(wrap(x, "c")) and out[1] == "cache"
        assert torch.equal(out[0].detach(), codec.decode(codec.encode(3.0 * x.detach(), 0.5)))
        assert act.stats()["tap0"].numel == 50
