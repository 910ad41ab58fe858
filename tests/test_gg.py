"""Tests for ggcomm.gg: sampling, density, fitting and the GG-vs-Gaussian comparison."""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import gamma

from ggcomm.gg import (
    GGFit,
    compare,
    fit,
    gaussian_fit,
    logpdf,
    sample,
    scale_for_std,
    variance,
)

BETAS = (0.3, 0.5, 1.0, 2.0, 3.0)


@cache
def gennorm_data(beta: float, n: int = 1_000_000, seed: int = 1234) -> np.ndarray:
    """Reference GG samples (scale 1, loc 0) from scipy."""
    return stats.gennorm.rvs(beta, size=n, random_state=seed)


def test_variance_and_scale_for_std() -> None:
    assert variance(1.0, 2.0) == pytest.approx(0.5)
    assert variance(1.0, 1.0) == pytest.approx(2.0)
    for beta in BETAS:
        expected = 1.7**2 * gamma(3 / beta) / gamma(1 / beta)
        assert variance(1.7, beta) == pytest.approx(expected, rel=1e-12)
        assert variance(scale_for_std(0.3, beta), beta) == pytest.approx(0.09, rel=1e-12)
        assert stats.gennorm.std(beta, scale=scale_for_std(2.5, beta)) == pytest.approx(2.5)
    with pytest.raises(ValueError):
        variance(1.0, 0.0)
    with pytest.raises(ValueError):
        scale_for_std(-1.0, 2.0)


@pytest.mark.parametrize("beta", BETAS)
def test_fit_recovers_beta(beta: float) -> None:
    x = gennorm_data(beta)
    f = fit(x)
    assert f.beta == pytest.approx(beta, rel=0.03)
    assert f.scale == pytest.approx(1.0, rel=0.03)
    assert f.std == pytest.approx(stats.gennorm.std(beta), rel=0.03)
    assert abs(f.loc) < 0.01 * f.std
    assert f.n == x.size


@pytest.mark.parametrize("beta", (0.5, 1.0, 2.0))
def test_fit_mle_refinement(beta: float) -> None:
    x = 0.25 + 3.0 * gennorm_data(beta, n=200_000, seed=7)
    moment = fit(x)
    mle = fit(x, refine="mle")
    assert mle.beta == pytest.approx(beta, rel=0.03)
    assert mle.scale == pytest.approx(3.0, rel=0.03)
    assert mle.loc == pytest.approx(0.25, abs=0.05)
    # The refinement never lowers the likelihood of the moment estimate.
    assert mle.logpdf(x).mean() >= moment.logpdf(x).mean() - 1e-12
    # Within optimiser noise of scipy's generic ML fit (which starts from our estimate).
    ref = stats.gennorm.fit(x, beta, loc=mle.loc, scale=mle.scale)
    assert mle.logpdf(x).mean() >= stats.gennorm.logpdf(x, *ref).mean() - 1e-5


def test_fit_accepts_torch_and_subsamples() -> None:
    x = gennorm_data(1.0)[:100_000]
    t = torch.from_numpy(x).to(torch.float32).reshape(100, 1000)
    f_t = fit(t)
    f_np = fit(x.astype(np.float32))
    assert f_t == f_np
    sub = fit(x, max_samples=10_000)
    assert sub.n == x.size
    assert sub == fit(x, max_samples=10_000)
    assert sub.beta == pytest.approx(1.0, rel=0.1)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.array([]), "empty"),
        (np.array([1.0, np.nan, 2.0]), "non-finite"),
        (np.array([1.0, np.inf]), "non-finite"),
        (np.full(10, 3.0), "zero variance"),
        (np.array([5.0]), "zero variance"),
    ],
)
def test_fit_rejects_bad_input(bad: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fit(bad)
    with pytest.raises(ValueError, match=match):
        compare(bad)


def test_fit_rejects_unknown_refine() -> None:
    with pytest.raises(ValueError, match="refine"):
        fit(np.arange(10.0), refine="bayes")  # type: ignore[arg-type]


@pytest.mark.parametrize("beta", BETAS)
def test_sample_matches_gennorm(beta: float) -> None:
    g = torch.Generator().manual_seed(int(beta * 100))
    std, loc = 0.7, -0.2
    x = sample((200_000,), beta, std=std, loc=loc, generator=g, dtype=torch.float64)
    assert x.shape == (200_000,) and x.dtype == torch.float64
    alpha = scale_for_std(std, beta)
    ks = stats.kstest(x.numpy(), stats.gennorm(beta, loc=loc, scale=alpha).cdf)
    assert ks.pvalue > 1e-3


@pytest.mark.parametrize("beta", (0.5, 1.0, 2.0, 3.0))
def test_sample_moments(beta: float) -> None:
    g = torch.Generator().manual_seed(99)
    x = sample(1_000_000, beta, std=2.0, loc=1.0, generator=g, dtype=torch.float64)
    assert float(x.mean()) == pytest.approx(1.0, abs=0.01)
    assert float(x.std()) == pytest.approx(2.0, rel=0.01)
    assert float(x.var()) == pytest.approx(4.0, rel=0.01)


def test_sample_reproducible() -> None:
    a = sample((3, 4), 0.8, generator=torch.Generator().manual_seed(5))
    b = sample((3, 4), 0.8, generator=torch.Generator().manual_seed(5))
    c = sample((3, 4), 0.8, generator=torch.Generator().manual_seed(6))
    assert a.shape == (3, 4) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(sample(0, 1.0), torch.empty(0))


def test_logpdf_matches_gennorm_and_formula() -> None:
    x = np.linspace(-6, 6, 101)
    for beta in BETAS:
        got = logpdf(x, 0.3, 1.4, beta)
        np.testing.assert_allclose(got, stats.gennorm.logpdf(x, beta, 0.3, 1.4), rtol=1e-12)
        direct = math.log(beta / (2 * 1.4 * gamma(1 / beta))) - (np.abs(x - 0.3) / 1.4) ** beta
        np.testing.assert_allclose(got, direct, rtol=1e-10, atol=1e-12)
    t = torch.from_numpy(x).reshape(101, 1)
    np.testing.assert_array_equal(logpdf(t, 0.0, 1.0, 1.0), logpdf(x, 0.0, 1.0, 1.0)[:, None])
    f = GGFit(loc=0.3, scale=1.4, beta=0.7, n=1)
    np.testing.assert_array_equal(f.logpdf(x), logpdf(x, 0.3, 1.4, 0.7))


def test_gaussian_fit() -> None:
    x = gennorm_data(1.0)[:100_000]
    g = gaussian_fit(x)
    assert g.beta == 2.0
    assert g.loc == pytest.approx(x.mean())
    assert g.std == pytest.approx(x.std(), rel=1e-12)


def test_compare_prefers_gg_on_laplacian() -> None:
    result = compare(gennorm_data(1.0)[:200_000])
    assert set(result) == {"gg", "gaussian", "ll_gg", "ll_gauss", "ll_gain"}
    assert result["gg"].beta == pytest.approx(1.0, rel=0.03)
    assert result["ll_gain"] == pytest.approx(result["ll_gg"] - result["ll_gauss"])
    # h(Gaussian, var 2) - h(Laplace, scale 1) = 0.5 log(4 pi e) - (1 + log 2) = 0.0724 nats.
    assert result["ll_gain"] == pytest.approx(0.5 * math.log(math.pi * math.e) - 1, abs=0.01)


def test_compare_neutral_on_gaussian() -> None:
    result = compare(gennorm_data(2.0)[:200_000])
    assert result["gg"].beta == pytest.approx(2.0, rel=0.03)
    assert -1e-9 <= result["ll_gain"] < 1e-3
