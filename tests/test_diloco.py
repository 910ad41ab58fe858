"""DiLoCo outer steps with EG-coded pseudo-gradients (ggcomm.diloco) on gloo ranks."""

from __future__ import annotations

import diloco_workers as w
import dist_utils
import pytest
import torch
import torch.nn as nn

from ggcomm.diloco import DiLoCo


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_ends_each_outer_step_with_the_same_parameters(world):
    wires = ["gg", "gg-seg", "int8", "fp32"] if world == 2 else ["gg", "gg-seg"]
    out = dist_utils.values(dist_utils.run(w.replicas, world, wires, 8, 4))
    for wire in wires:
        for r in out[1:]:
            assert torch.equal(r[wire]["params"], out[0][wire]["params"]), wire
        for r in out:
            assert r[wire]["outer"] == 2
            assert r[wire]["counted"][0] == r[wire]["moved"][0], wire
    # 2 outer steps of a ring all-reduce of float32; int8 about a quarter; 3 bits far less
    fp32 = 2 * 2 * (world - 1) / world * 4 * out[0]["gg"]["numel"]
    if world == 2:
        assert out[0]["fp32"]["moved"][0] == pytest.approx(fp32)
        assert out[0]["int8"]["moved"][0] < 0.3 * fp32
    # ggcomm sends its frame to every other rank: (N - 1) frames against a ring's 2 (N - 1) / N
    assert out[0]["gg"]["moved"][0] < 0.15 * fp32 * world / 2


def test_rans_frames_keep_replicas_identical_and_send_fewer_bytes():
    a, b = dist_utils.values(dist_utils.run(w.rans_replicas, 2))
    for rans in (False, True):
        assert a[rans]["outer"] == 2 and torch.equal(a[rans]["params"], b[rans]["params"])
    # the same steps code the same integers: the same training; at about 1.5 bits per
    # element rANS blocks take 5-15% fewer bits than the prefix codes
    assert torch.equal(a[True]["params"], a[False]["params"])
    assert a[True]["moved"] < 0.97 * a[False]["moved"]


def test_resume_is_bit_exact_and_bad_input_raises_typed_errors():
    out = dist_utils.values(dist_utils.run(w.resume_and_hostile, 2, timeout=180))
    for r in out:
        assert torch.equal(r["straight"], r["resumed"])
        assert r["corrupt"].startswith("FrameError"), r["corrupt"]
        assert r["apart"].startswith("SettingsMismatchError"), r["apart"]
        assert "different parameters" in r["apart"]


def test_one_shared_step_comes_from_the_moments_pooled_over_every_segment():
    import numpy as np

    from ggcomm.exchange import Stream, _steps
    from ggcomm.step_policy import StepControl

    # three segments whose scales differ 1 : 4 : 16, and Laplace-like moments
    rms = np.array([1.0, 4.0, 16.0])
    n = np.array([100.0, 100.0, 50.0])
    total = np.stack([n * rms**2, n * rms / np.sqrt(2), np.zeros(3)], axis=1)
    each = _steps(StepControl(rate=2.0), "k", Stream(250, 1, 100, False), total, n)
    shared = _steps(StepControl(rate=2.0), "k", Stream(250, 1, 100, False), total, n,
                    shared=True)
    assert np.all(np.diff(each) > 0)  # a step per segment follows its scale
    pooled = StepControl(rate=2.0).step("k", total[:, 0].sum() / n.sum(),
                                        total[:, 1].sum() / n.sum())
    assert np.all(shared == pooled) and each[0] < pooled < each[2]


def test_arguments_are_checked():
    model = nn.Linear(4, 4)
    for bad in ({"wire": "fp8"}, {"sync_every": 0}, {"rate": 2.0, "step": 0.1},
                {"block_size": 0}, {"rans": "yes"}):
        with pytest.raises(ValueError):
            DiLoCo(model, **bad)


@pytest.mark.parametrize("wire", ["gg", "ddp"])
def test_the_training_tool_runs_in_process(wire, tmp_path):
    import json

    import torch.distributed as dist

    from ggcomm.tools import train_diloco

    if dist.is_initialized():
        pytest.skip("needs its own 1-rank process group")
    out = tmp_path / "s.json"
    train_diloco.main(["--wire", wire, "--sync-every", "2", "--steps", "4", "--batch-size", "2",
                       "--block-size", "16", "--corpus-bytes", "50000", "--eval-batches", "1",
                       "--json", str(out), *(["--rans"] if wire == "gg" else [])])
    s = json.loads(out.read_text())
    assert s["config"]["rans"] is (wire == "gg")
    assert len(s["steps"]["loss"]) == 4 and s["val_loss"] > 0
    if wire == "gg":  # alone, nothing crosses; the shapes of the first and last outer step
        assert s["total_bytes_sent_per_rank"] == 0
        assert set(s["pseudo_gradient_gg_shape"]) == {"first", "last"}
    with pytest.raises(SystemExit):
        train_diloco.parse_args(["--steps", "5", "--sync-every", "2"])
