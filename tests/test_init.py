"""Tests for ggcomm.methods.init: GG weight initialization."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import gammaln
from torch import nn

from ggcomm import gg
from ggcomm.methods.init import DEFAULT_LAYERS, apply_gg_init, fan, gg_, init_std
from ggcomm.tools.workload import GPT, GPTConfig

SHAPES = (0.1, 0.5, 1.0, 2.0)
NONLINEARITIES = (("linear", 0.0, 1.0), ("relu", 0.0, 2.0), ("leaky_relu", 0.2, 2.0 / 1.04))


def _draw(
    shape: float,
    nonlinearity: str = "relu",
    a: float = 0.0,
    seed: int = 0,
    size: tuple[int, int] = (1000, 1000),
) -> tuple[np.ndarray, float]:
    w = torch.empty(size)
    gg_(w, shape, nonlinearity=nonlinearity, a=a, generator=torch.Generator().manual_seed(seed))
    return w.double().numpy().ravel(), init_std(w, nonlinearity=nonlinearity, a=a) ** 2


def _known_shape_variance(x: np.ndarray, beta: float) -> float:
    """Variance implied by the maximum-likelihood scale of a GG with known shape.

    ``|X / alpha|^beta`` is Gamma(1/beta, 1)-distributed, so ``beta * mean(|x|^beta)``
    estimates ``alpha^beta`` with relative error ``sqrt(beta / n)``: at ``beta = 0.1`` and
    a million draws the implied variance is good to about 0.6%, whereas the plain sample
    variance (kurtosis ~3e6) would need ~10^10 draws for 2%.
    """
    log_alpha = (math.log(beta) + math.log(np.mean(np.abs(x) ** beta))) / beta
    return math.exp(2 * log_alpha + gammaln(3 / beta) - gammaln(1 / beta))


def test_init_std_is_kaimings() -> None:
    w = torch.empty(300, 50, 3, 3)
    for nonlinearity, a, xi in NONLINEARITIES:
        for mode in ("fan_in", "fan_out"):
            expected = nn.init.calculate_gain(nonlinearity, a) / math.sqrt(
                nn.init._calculate_correct_fan(w, mode)
            )
            assert init_std(w, nonlinearity=nonlinearity, a=a, mode=mode) == expected
        assert init_std(w, nonlinearity=nonlinearity, a=a) ** 2 == pytest.approx(xi / 450)
    assert fan(w) == 450 and fan(w, "fan_out") == 2700
    assert fan(torch.empty(7, 5)) == 5  # nn.Linear(5, 7)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("nonlinearity", "a", "xi"), NONLINEARITIES)
def test_variance_matches_target(shape: float, nonlinearity: str, a: float, xi: float) -> None:
    x, target = _draw(shape, nonlinearity, a, seed=int(10 * shape))
    assert target == pytest.approx(xi / 1000)
    assert _known_shape_variance(x, shape) == pytest.approx(target, rel=0.02)
    if shape >= 0.5:  # kurtosis <= 25: the sample variance itself is good to ~0.5%
        assert x.var() == pytest.approx(target, rel=0.02)
    assert abs(x.mean()) < 0.01 * math.sqrt(target)


@pytest.mark.parametrize("shape", SHAPES)
def test_fitted_shape_and_distribution(shape: float) -> None:
    x, target = _draw(shape, seed=100 + int(10 * shape))
    f = gg.fit(x, refine="mle")
    assert f.beta == pytest.approx(shape, rel=0.05)
    # scipy's gennorm is the reference density: the draws follow it
    alpha = gg.scale_for_std(math.sqrt(target), shape)
    ks = stats.kstest(x[:200_000], stats.gennorm(shape, scale=alpha).cdf)
    assert ks.pvalue > 1e-3


def test_shape_two_is_kaiming_normal() -> None:
    w = torch.empty(2000, 500)
    g = gg_(w.clone(), 2.0, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(3)
    k = nn.init.kaiming_normal_(w.clone())  # defaults: fan_in, leaky_relu with a=0 (= relu)
    target = 2.0 / 500
    assert init_std(w) ** 2 == pytest.approx(target, rel=1e-15)
    assert g.var().item() == pytest.approx(target, rel=0.01)
    assert k.var().item() == pytest.approx(target, rel=0.01)
    assert g.var().item() == pytest.approx(k.var().item(), rel=0.015)
    # both normal: equal kurtosis (3) as well
    assert stats.kurtosis(g.numpy().ravel(), fisher=False) == pytest.approx(3.0, abs=0.05)


def test_gg_in_place_reproducible_and_leaves_global_rng() -> None:
    w = torch.empty(64, 32, requires_grad=True)
    state = torch.get_rng_state()
    out = gg_(w, 0.5, generator=torch.Generator().manual_seed(7))
    assert out is w and w.requires_grad and w.grad_fn is None
    assert torch.equal(torch.get_rng_state(), state)
    again = gg_(torch.empty(64, 32), 0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(w.detach(), again)
    other = gg_(torch.empty(64, 32), 0.5, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(again, other)
    half = gg_(torch.empty(64, 32, dtype=torch.float16), 0.5, generator=torch.Generator())
    assert half.dtype == torch.float16 and torch.isfinite(half).all()


def test_fan_out_mode() -> None:
    w = gg_(torch.empty(500, 2000), 1.0, mode="fan_out", generator=torch.Generator())
    assert w.var().item() == pytest.approx(2.0 / 500, rel=0.02)


def test_gg_errors() -> None:
    with pytest.raises(ValueError, match="positive"):
        gg_(torch.empty(4, 4), 0.0)
    with pytest.raises(ValueError, match="positive"):
        gg_(torch.empty(4, 4), float("nan"))
    with pytest.raises(ValueError, match="dimension"):
        gg_(torch.empty(4), 1.0)
    with pytest.raises(ValueError, match="mode"):
        gg_(torch.empty(4, 4), 1.0, mode="fan_avg")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating"):
        gg_(torch.empty(4, 4, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="nonlinearity"):
        gg_(torch.empty(4, 4), 1.0, nonlinearity="swish")
    with pytest.raises(ValueError, match="zero"):
        gg_(torch.empty(4, 0), 1.0)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_apply_gg_init_touches_only_layer_weights_and_biases() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16))
    before = _snapshot(model)
    result = apply_gg_init(model, 0.5, generator=torch.Generator().manual_seed(0))
    params = dict(model.named_parameters())
    expected_weights = {
        f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))
    }
    expected_biases = {
        f"{n}.bias"
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.bias is not None
    }
    assert set(result.weights) == expected_weights
    assert set(result.biases) == expected_biases
    assert result.names() == [*result.weights, *result.biases]
    for name, p in result.weights.items():
        assert p is params[name]
        assert not torch.equal(p, before[name])
        assert init_std(p) ** 2 == pytest.approx(2.0 / p.shape[1])
    for name, p in result.biases.items():
        assert p is params[name] and not p.any()
    untouched = set(params) - set(result.names())
    assert untouched and all(".ln" in n or n.startswith("ln_f") for n in untouched)
    for name in untouched:
        assert torch.equal(params[name], before[name])
    # the largest layer (fc, 32 -> 128 = 4096 draws) is near its target variance
    fc = result.weights["blocks.0.mlp.fc.weight"]
    assert fc.var().item() == pytest.approx(2.0 / 32, rel=0.15)
    # one generator fixes the whole model
    again = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16))
    apply_gg_init(again, 0.5, generator=torch.Generator().manual_seed(0))
    for name, p in again.named_parameters():
        assert torch.equal(p, params[name])


def test_apply_gg_init_include_convs_embeddings_and_tied_weights() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 16, padding_idx=3)
            self.conv = nn.Conv1d(16, 8, 3)
            self.conv3 = nn.Conv3d(2, 4, 2, bias=False)
            self.bn = nn.BatchNorm1d(8)
            self.head = nn.Linear(16, 50)
            self.head.weight = self.emb.weight  # tied

    net = Net()
    before = _snapshot(net)
    result = apply_gg_init(net, 1.0, nonlinearity="linear", generator=torch.Generator())
    assert list(result.weights) == ["emb.weight", "conv.weight", "conv3.weight"]
    assert list(result.biases) == ["conv.bias", "head.bias"]
    assert not net.emb.weight[3].any() and net.emb.weight[4].any()
    assert torch.equal(net.bn.weight, before["bn.weight"])
    assert torch.equal(net.bn.bias, before["bn.bias"])

    net = Net()
    before = _snapshot(net)
    result = apply_gg_init(net, 1.0, include=(nn.Conv1d,), generator=torch.Generator())
    assert list(result.weights) == ["conv.weight"] and list(result.biases) == ["conv.bias"]
    assert torch.equal(net.emb.weight, before["emb.weight"])
    assert nn.Linear in DEFAULT_LAYERS and nn.LayerNorm not in DEFAULT_LAYERS


def test_apply_gg_init_errors_leave_model_untouched() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    before = _snapshot(model)
    with pytest.raises(ValueError):
        apply_gg_init(model, -1.0)
    with pytest.raises(TypeError):
        apply_gg_init(model, 1.0, include=("Linear",))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        apply_gg_init(model, 1.0, include=())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])


def test_the_shape_is_beta_and_shape_is_its_former_keyword() -> None:
    a = gg_(torch.empty(16, 8), beta=0.5, generator=torch.Generator().manual_seed(1))
    b = gg_(torch.empty(16, 8), shape=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="once"):
        gg_(torch.empty(4, 4), 0.5, shape=0.5)
    with pytest.raises(TypeError, match="once"):
        apply_gg_init(torch.nn.Linear(4, 4))
