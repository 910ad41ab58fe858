"""PowerSGD with EG-coded factors (ggcomm.powersgd) on gloo ranks."""

from __future__ import annotations

import dist_utils
import powersgd_workers as w
import pytest
import torch

from ggcomm.powersgd import POWERSGD_RATE, PowerSGDEGState


def _check_replicas(out, world):
    for r in out[1:]:
        assert torch.equal(r["params"], out[0]["params"])
    for r in out:
        assert r["iters"] == 10
        assert r["counted"] == r["moved"]
        assert r["moved"][0] > 0
        # factors at ~4 bits: far below fp32's ring allreduce of every gradient
        assert r["moved"][0] / 6 < 0.1 * 2 * (world - 1) / world * r["fp32"]


def test_replicas_bit_identical_bytes_counted_and_torchs_algorithm():
    out = dist_utils.values(dist_utils.run(w.replicas_and_torch, 2, 6, 2))
    _check_replicas([r for r, _ in out], 2)
    # at fine steps the composed hook is torch's PowerSGD with a near-lossless wire
    for _, r in out:
        for a, b in zip(r["torch"], r["eg"], strict=True):
            assert torch.allclose(a, b, rtol=1e-2, atol=1e-3 * float(a.abs().max()))
    for a, b in zip(out[0][1]["eg"], out[1][1]["eg"], strict=True):
        assert torch.equal(a, b)  # and the two ranks hold the same averaged gradients


def test_rans_frames_sum_the_same_integers_in_fewer_bytes():
    a, b = dist_utils.values(dist_utils.run(w.rans_pair, 2, 6))
    # the same steps code the same integers: training is bit-identical, the frames smaller
    for r in (a, b):
        assert torch.equal(r[True]["params"], r[False]["params"])
        assert r[True]["sent"] < r[False]["sent"]
    assert torch.equal(a[True]["params"], b[True]["params"])


def test_resume_is_bit_exact_with_one_bucket_and_close_with_several():
    for one, several in dist_utils.values(dist_utils.run(w.checkpoints, 2, 5, 9, [25.0, 0.02])):
        # one bucket: DDP's first-iteration layout is its rebuilt one, so a resumed run
        # codes the same tensors with the same steps
        assert torch.equal(one[0][0], one[1][0]) and one[0][1] == one[1][1]
        # several: the resumed run's first iteration groups the parameters as a fresh DDP
        # does (other coded sums, other steps), then goes on with the restored memories
        assert torch.allclose(several[0][0], several[1][0], rtol=0, atol=0.02)


def test_corrupt_frames_and_lying_sizes_raise_frame_error_on_every_rank():
    out = dist_utils.values(dist_utils.run(w.hostile, 2, timeout=180))
    corrupt, lying = zip(*out, strict=True)
    assert [kind for kind, _ in corrupt] == ["FrameError", "FrameError"]
    assert [kind for kind, _ in lying] == ["FrameError", "FrameError"]
    assert "announced frame sizes" in lying[0][1]


def test_settings_and_defaults():
    s = PowerSGDEGState(matrix_approximation_rank=4, start_powerSGD_iter=10)
    assert (s.mode, s.value) == ("rate", POWERSGD_RATE)
    assert s.use_error_feedback
    assert PowerSGDEGState(rate=2.5).fingerprint != s.fingerprint
    with pytest.raises(ValueError):
        PowerSGDEGState(rate=2.0, step=0.1)
    with pytest.raises(ValueError):
        PowerSGDEGState(block_size=0)
    with pytest.raises(ValueError):
        PowerSGDEGState(rans=1)


def test_state_dict_refuses_other_settings_versions_and_ranks():
    from ggcomm.errors import SettingsMismatchError, StateLoadError

    sd = PowerSGDEGState(matrix_approximation_rank=2, rate=3.0).state_dict()
    PowerSGDEGState(matrix_approximation_rank=2, rate=3.0).load_state_dict(sd)
    with pytest.raises(SettingsMismatchError):
        PowerSGDEGState(matrix_approximation_rank=4, rate=3.0).load_state_dict(sd)
    for bad in ({**sd, "version": 99}, {**sd, "rank": 1}, "not a state"):
        with pytest.raises(StateLoadError):
            PowerSGDEGState(matrix_approximation_rank=2, rate=3.0).load_state_dict(bad)
