"""ggcomm.deepspeed: a real 2-stage DeepSpeed PipelineModule on 2 gloo ranks."""

from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("DeepSpeed is not installed (pip install 'ggcomm[deepspeed]' with "
                "DS_BUILD_OPS=0); these tests need it", allow_module_level=True)

import deepspeed_workers as w  # noqa: E402
import dist_utils  # noqa: E402

STEPS = 12


def test_two_stage_pipeline_trains_with_the_plugin_and_sends_4x_fewer_bytes():
    plain, gg = (dist_utils.values(dist_utils.run(w.train, 2, mode, STEPS, timeout=400))
                 for mode in ("plain", "gg"))
    last = {r["stage"]: r for r in gg}[1]
    first = {r["stage"]: r for r in gg}[0]
    losses = last["losses"]
    # the last stage sees the loss: it decreases, and tracks DeepSpeed's own run
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    ref = {r["stage"]: r for r in plain}[1]["losses"]
    assert abs(losses[-1] - ref[-1]) < 0.05 * ref[-1], (losses, ref)
    # activations forward, their gradients backward, both compressed >= 4x at rate 4
    fwd, bwd = first["stats"]["forward"], first["stats"]["backward"]
    assert fwd["ratio_sent"] >= 4 and bwd["ratio_received"] >= 4, (fwd, bwd)
    assert fwd["messages_sent"] >= STEPS * 4  # one per micro-batch (plus the loss scalar)
    assert fwd["bytes_sent"] == last["stats"]["forward"]["bytes_received"]
    assert bwd["bytes_received"] == last["stats"]["backward"]["bytes_sent"]
    assert fwd["passthrough_bytes_sent"] > 0  # the shape metadata went through untouched
    # disable restores DeepSpeed's p2p, which trains on from where the plugin left off: the
    # next batch's loss (every stage receives it) is near the last one and below the first
    assert all(r["restored"] for r in gg)
    assert first["after"] == last["after"]
    assert abs(last["after"] - losses[-1]) < 0.1 * losses[-1], (last["after"], losses)
    assert last["after"] < 0.8 * sum(losses[:3]) / 3, (last["after"], losses)


def test_enable_rejects_misuse_and_the_context_manager_restores():
    res = dist_utils.values(dist_utils.run(w.misuse, 2, timeout=400))
    for errors in res:
        assert "PipelineEngine" in errors[0]
        assert "already enabled" in errors[1]
        assert errors[2:] == ["enabled=True", "enabled=False"]
