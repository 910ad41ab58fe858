"""Tests for ggcomm.methods.deepshape: the post-training remap to a sharper GG."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from ggcomm import gg
from ggcomm.methods.deepshape import DeepShapeReport, deepshape_

Remapped = tuple[torch.Tensor, torch.Tensor, DeepShapeReport]


def _gg(
    n: int, beta: float, std: float, seed: int, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    return gg.sample(n, beta, std=std, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _fixed(w: torch.Tensor, frac_bits: int = 13) -> torch.Tensor:
    """Integer fixed-point values (float64) of ``w``."""
    return torch.round(w.double() * 2.0**frac_bits)


def _expected_param_max(q: np.ndarray, min_count: int) -> int:
    v = 1
    while v <= q.max() and (q == v).sum() > min_count:
        v += 1
    return v if v <= q.max() else int(np.abs(q).max())


@pytest.fixture(scope="module")
def remapped() -> Remapped:
    """(old fixed-point values, new values, report) for 50k GG(0.8) float32 weights."""
    w = _gg(50_000, 0.8, 0.02, seed=1, dtype=torch.float32)
    q = _fixed(w)
    report = deepshape_([w], min_count=20)
    return q, w.double(), report


def test_rank_order_is_preserved(remapped: Remapped) -> None:
    q, new, report = remapped
    assert report.moved > 0.5 * report.n_body  # the remap did something
    order = torch.argsort(q, stable=True)
    assert (torch.diff(new[order]) >= 0).all()
    assert report.param_max == _expected_param_max(q.numpy(), 20)
    # the body went onto the levels -param_max .. param_max
    body = q.abs() <= report.param_max
    assert (new[body].abs() * 2**13 <= report.param_max).all()
    assert report.n_body == int(body.sum()) and report.n_tail == int((~body).sum())


def test_tails_keep_their_fixed_point_value(remapped: Remapped) -> None:
    q, new, report = remapped
    tail = q.abs() > report.param_max
    assert report.n_tail == int(tail.sum()) > 50
    assert torch.equal(new[tail], q[tail] / 2**13)


def test_everything_lies_on_the_grid(remapped: Remapped) -> None:
    _, new, _ = remapped
    scaled = new * 2**13
    assert torch.equal(scaled, torch.round(scaled))


def test_counts_are_the_cumulative_rounding_of_the_target(remapped: Remapped) -> None:
    q, new, report = remapped
    unit, pm = 2.0**13, report.param_max
    body = q.abs() <= pm
    fit = gg.fit(q[body].numpy())
    assert report.fitted.beta == pytest.approx(fit.beta, rel=1e-12)
    assert report.fitted.scale * unit == pytest.approx(fit.scale, rel=1e-12)
    assert report.fitted.loc * unit == pytest.approx(fit.loc, rel=1e-9, abs=1e-12)
    assert report.fitted.n == report.n_body
    assert report.target_beta == pytest.approx(0.8 * fit.beta)
    assert report.target_scale * unit == pytest.approx(0.6 * fit.scale)
    levels = np.arange(-pm, pm + 1, dtype=np.float64)
    logp = -((np.abs(levels - fit.loc) / (0.6 * fit.scale)) ** (0.8 * fit.beta))
    mass = np.exp(logp - logp.max())
    cum = np.round(report.n_body * np.cumsum(mass) / mass.sum()).astype(np.int64)
    cum[-1] = report.n_body
    got = np.bincount((new[body] * unit + pm).numpy().astype(np.int64), minlength=2 * pm + 1)
    np.testing.assert_array_equal(got, np.diff(cum, prepend=0))
    assert report.moved == int((new[body] * unit != q[body]).sum())


def test_body_hits_the_target_gg() -> None:
    w = _gg(400_000, 1.5, 0.05, seed=2)
    q = _fixed(w)
    report = deepshape_([w], min_count=5)
    body = q.abs() <= report.param_max
    assert report.n_body > 0.95 * w.numel() and report.param_max > 500
    values = w[body].numpy()[::4]  # ~100k
    beta, _, scale = stats.gennorm.fit(values, floc=report.fitted.loc)
    assert beta == pytest.approx(report.target_beta, rel=0.05)
    assert scale == pytest.approx(report.target_scale, rel=0.05)
    assert report.target_beta < report.fitted.beta and report.target_scale < report.fitted.scale


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ({-2: 5, -1: 9, 0: 9, 1: 9, 2: 3, 3: 9, 7: 1}, 2),  # first small count
        ({-1: 9, 0: 9, 1: 9, 2: 9, 4: 9}, 3),  # a missing value counts 0
        ({-9: 2, -1: 9, 0: 9, 1: 9, 2: 9}, 9),  # every positive value frequent: max |q|
        ({-6: 1, -1: 9, 0: 9}, 6),  # no positive value
    ],
)
def test_param_max(counts: dict[int, int], expected: int) -> None:
    q = np.concatenate([np.full(c, v, dtype=np.float64) for v, c in counts.items()])
    assert _expected_param_max(q, 4) == expected
    w = torch.from_numpy(q / 2**13)
    report = deepshape_([w], min_count=4)
    assert report.param_max == expected
    assert report.n_tail == int((np.abs(q) > expected).sum())


class _TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 32).double()
        self.c = nn.Parameter(torch.zeros(100, dtype=torch.bfloat16))
        self.ids = nn.Parameter(torch.arange(5), requires_grad=False)  # not floating: skipped
        with torch.no_grad():
            for i, p in enumerate(self.parameters()):
                if p.is_floating_point():
                    p.copy_(_gg(p.numel(), 0.9, 0.01, seed=10 + i).view(p.shape))


def test_several_parameters_are_remapped_jointly() -> None:
    model = _TwoLayers()
    floats = [p for p in model.parameters() if p.is_floating_point()]
    joint = torch.cat([p.detach().double().reshape(-1) for p in floats])
    alone = model.a.weight.detach().clone()
    expected = deepshape_([joint], frac_bits=10, min_count=10)
    report = deepshape_(model, frac_bits=10, min_count=10)
    assert report == expected
    assert report.n_body + report.n_tail == joint.numel()
    offset = 0
    dtypes = [torch.bfloat16] + [torch.float32] * 2 + [torch.float64] * 2  # own params first
    for p, dtype in zip(floats, dtypes, strict=True):
        assert p.dtype == dtype
        assert torch.equal(p.detach(), joint[offset : offset + p.numel()].view(p.shape).to(dtype))
        offset += p.numel()
    assert torch.equal(model.ids, torch.arange(5))
    # a tensor remapped on its own comes out differently: the counts really are joint
    deepshape_([alone], frac_bits=10, min_count=10)
    assert not torch.equal(alone, model.a.weight.detach())


def test_deterministic_and_named_pairs() -> None:
    model = _TwoLayers()
    copy = _TwoLayers()
    copy.load_state_dict(model.state_dict())
    before = [p.detach().clone() for p in model.parameters() if p.is_floating_point()]
    with pytest.raises(TypeError, match="floating"):  # the integer parameter
        deepshape_(model.named_parameters(), frac_bits=10, min_count=10)
    named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    first = deepshape_(named, frac_bits=10, min_count=10)
    second = deepshape_(copy, frac_bits=10, min_count=10)
    assert first == second
    for p, r in zip(model.parameters(), copy.parameters(), strict=True):
        assert torch.equal(p, r)
    assert any(not torch.equal(p.detach(), t) for (_, p), t in zip(named, before, strict=True))


def test_bad_input_leaves_the_parameters_untouched() -> None:
    w = _gg(1000, 1.0, 0.02, seed=3, dtype=torch.float32)
    w[17] = math.nan
    other = _gg(1000, 1.0, 0.02, seed=4)
    before = w.clone(), other.clone()
    with pytest.raises(ValueError, match="NaN"):
        deepshape_([other, w], min_count=5)
    assert torch.equal(w.view(torch.int32), before[0].view(torch.int32))
    assert torch.equal(other, before[1])
    with pytest.raises(TypeError, match="floating"):
        deepshape_([torch.arange(10)])
    with pytest.raises(ValueError, match="every weight rounds to zero"):
        deepshape_([torch.zeros(10)])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_count": 0}, "min_count"),
        ({"min_count": 2.5}, "min_count"),
        ({"frac_bits": 31}, "frac_bits"),
        ({"frac_bits": -1}, "frac_bits"),
        ({"frac_bits": True}, "frac_bits"),
        ({"shape_scale": 0.0}, "shape_scale"),
        ({"scale_scale": math.inf}, "scale_scale"),
        ({"scale_scale": "x"}, "scale_scale"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    w = _gg(1000, 1.0, 0.02, seed=5)
    before = w.clone()
    with pytest.raises(ValueError, match=match):
        deepshape_([w], **kwargs)
    assert torch.equal(w, before)


def test_nothing_to_reshape() -> None:
    with pytest.raises(ValueError, match="empty"):
        deepshape_([])
    with pytest.raises(ValueError, match="empty"):
        deepshape_(nn.ReLU())
    w = torch.ones(10)
    with pytest.raises(ValueError, match="twice"):
        deepshape_([w, ("w", w)])
    with pytest.raises(ValueError, match="no elements"):
        deepshape_([torch.zeros(0)])
    with pytest.raises(ValueError, match="fewer than 2 values"):
        deepshape_([torch.ones(10)])
