"""Tests for the step table (ggcomm.rate.model) against the rate solver, and the step policy
(ggcomm.step_policy) that every transport and training method uses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import gammaln

from ggcomm import rate, step_policy
from ggcomm.gg import GGFit, scale_for_std
from ggcomm.rate import model


def _moments(beta: float, std: float) -> tuple[float, float]:
    """``E[x^2]``, ``E[|x|]`` of a zero-mean GG of shape ``beta`` and standard deviation ``std``."""
    ratio = math.exp(gammaln(1 / beta) + gammaln(3 / beta) - 2 * gammaln(2 / beta))
    return std**2, std / math.sqrt(ratio)


def _unit_fit(beta: float) -> GGFit:
    return GGFit(loc=0.0, scale=scale_for_std(1.0, beta), beta=beta, n=1)


@pytest.mark.parametrize("index", [0, 21, 40, 59])
def test_model_step_matches_step_for_rate(index: int) -> None:
    beta = float(model.BETA_GRID[index])
    for target, std in ((1.2, 1.0), (2.0, 3e-4), (4.5, 1.0), (8.25, 17.0), (12.0, 1.0)):
        step = model.model_step(*_moments(beta, std), target)
        solved = std * rate.step_for_rate(_unit_fit(beta), target, rans=False)
        assert step == pytest.approx(solved, rel=1e-3), (beta, target)


def test_table_is_the_predicted_bits() -> None:
    model.prepare()
    for index in (0, 30, 59):
        beta = float(model.BETA_GRID[index])
        curve = model._curves()[index]
        assert curve.bits[0] < 1 + 1e-6 and curve.bits[-1] > 17
        for i in range(0, len(curve.log_step), 37):
            bits, _, _ = rate.predict_bits(_unit_fit(beta), math.exp(curve.log_step[i]),
                                           rans=False)
            assert curve.bits[i] == pytest.approx(bits, abs=1e-7)


def test_model_step_costs_no_solve(monkeypatch) -> None:
    model.prepare()

    def solve(*args, **kwargs):
        raise AssertionError("the table should answer without the rate model")

    for name in ("step_for_rate", "predict_bits", "predict_eg_bits", "eg_order_bits"):
        monkeypatch.setattr(model, name, solve)
    targets = np.linspace(1.0 + 1e-9, 24.0, 200)
    for beta in (0.1, 0.3, 1.0, 2.0, 4.0):
        mean_sq, mean_abs = _moments(beta, 2.0)
        steps = np.array([model.model_step(mean_sq, mean_abs, t) for t in targets])
        assert np.isfinite(steps).all() and (steps > 0).all()
        assert (np.diff(steps) < 0).all()
        # past the table the high-rate law: each extra bit halves the step
        high = [model.model_step(mean_sq, mean_abs, t) for t in (20.0, 21.0, 23.5)]
        assert high[1] / high[0] == pytest.approx(0.5)
        assert high[2] / high[1] == pytest.approx(2**-2.5)
    assert step_policy.step_for("rate", 3.0, 4.0, 1.5) == model.model_step(4.0, 1.5, 3.0)


@pytest.mark.parametrize("target", [1.0, 0.5, -2.0, float("nan"), float("inf")])
def test_model_step_needs_more_than_one_bit(target: float) -> None:
    with pytest.raises(ValueError, match="exceed 1"):
        model.model_step(1.0, 0.8, target)


def test_one_policy_parses_every_callers_arguments() -> None:
    from ggcomm.methods.act import ACT
    from ggcomm.methods.gct import GCT
    from ggcomm.pipeline import PipeComm

    assert step_policy.parse_mode(None, None, None) == ("rate", step_policy.DEFAULT_RATE)
    assert PipeComm().control.settings()["value"] == step_policy.PIPELINE_RATE
    assert ACT(0.1).rel_step == step_policy.ACT_REL_STEP
    assert GCT([torch.nn.Parameter(torch.ones(2))]).step_value == step_policy.GCT_REL_STEP
    # the same argument is refused with the same message everywhere
    for make in (lambda **kw: PipeComm(**kw), lambda **kw: ACT(0.1, **kw),
                 lambda **kw: GCT([torch.nn.Parameter(torch.ones(2))], **kw)):
        with pytest.raises(ValueError, match="step must be a positive finite number"):
            make(step=-1.0)
        with pytest.raises(ValueError, match="choose one of"):
            make(step=0.1, rel_step=0.1)
        with pytest.raises(ValueError, match="rel_step must be a positive finite number"):
            make(rel_step=float("nan"))
    # training methods take a step or a relative step, not a rate
    with pytest.raises(ValueError, match="rate is not supported"):
        step_policy.parse_mode(3.0, None, None, modes=("step", "rel_step"))


def test_steps_from_moments() -> None:
    control = step_policy.StepControl(rel_step=0.5)
    assert control.step("s", 4.0) == pytest.approx(1.0)
    assert control.step("s", 0.0) is None  # no scale: any step codes zeros
    assert step_policy.StepControl(step=0.25).step("s", 0.0) == 0.25
    rate_control = step_policy.StepControl(rate=3.0)
    assert rate_control.step("s", 4.0, 1.5) == pytest.approx(model.model_step(4.0, 1.5, 3.0))
