"""ggcomm.pipeline: compressed send/recv between real gloo ranks (spawned on localhost)."""

from __future__ import annotations

import dist_utils
import pipeline_workers as w
import pytest
import torch

import ggcomm
from ggcomm.pipeline import PipeComm


def test_round_trips_dtypes_shapes_and_byte_counts():
    r0, r1 = dist_utils.values(dist_utils.run(w.round_trips, 2))
    received = r1["got"]
    for (i, shape, dtype), (x, y) in zip(w.cases(), received, strict=False):
        assert y.dtype == dtype and y.shape == torch.Size(shape), (i, shape, dtype)
        xf, yf = x.double(), y.double()
        if x.numel() < 1024:
            assert torch.equal(x, y)  # small tensors travel raw, exact
        else:
            rms = float(xf.square().mean().sqrt())
            # half a step (0.05 RMS) plus the dtype's own rounding of the result
            tol = 0.025 * rms + torch.finfo(dtype).eps * xf.abs()
            assert bool(((xf - yf).abs() <= tol + 1e-12).all()), (i, shape, dtype)
    n = len(list(w.cases()))
    special = received[n][1]
    assert torch.isnan(special[3]) and special[70] == float("inf") and special[4000] == -float(
        "inf")
    assert torch.equal(received[n + 1][1], torch.arange(100))
    assert torch.equal(received[n + 2][1], torch.tensor([True, False, True]))
    for j, y in enumerate(received[n + 3][1]):
        x = w.payload(100 + j, (2048,), torch.float32)
        assert (x - y).abs().max() <= 0.026 * float(x.square().mean().sqrt())
    # what the stats say crossed equals what was handed to torch.distributed, both ways
    for r in (r0, r1):
        s = r["stats"]
        for side in ("sent", "received"):
            total = sum(s[d][f"bytes_{side}"] + s[d][f"passthrough_bytes_{side}"]
                        for d in ("forward", "backward"))
            assert total == r["wire"][side], (side, total, r["wire"])
    assert r0["stats"]["forward"]["bytes_sent"] == r1["stats"]["forward"]["bytes_received"]
    assert r1["stats"]["backward"]["bytes_sent"] == r0["stats"]["backward"]["bytes_received"]
    assert r1["stats"]["backward"]["messages_sent"] == 3
    assert r0["stats"]["forward"]["passthrough_bytes_sent"] == 800 + 3
    fwd = r0["stats"]["forward"]
    assert fwd["ratio_sent"] > 2 and fwd["bits_per_element_sent"] < 16


def test_corrupt_mismatched_and_misconfigured_messages_raise_and_the_link_survives():
    _, out = dist_utils.values(dist_utils.run(w.corrupt_frames, 2))
    kinds = [k for k, _ in out[:-1]]
    assert kinds == ["FrameError", "FrameError", "FrameError", "FrameError", "ok",
                     "SettingsMismatchError", "ok"], out
    for _, msg in out[:4]:
        assert "rank 0" in msg
    assert "float16" in out[2][1] and "(64, 64)" in out[3][1]
    x = out[-1][1]
    for _, y in (out[4], out[6]):
        assert y.shape == x.shape and (x - y).abs().max() <= 0.051 * x.square().mean().sqrt()


def test_rate_mode_settles_on_the_target():
    (state, _), (_, bits) = dist_utils.values(dist_utils.run(w.rate_control, 2, 4.0))
    # wire bits per element of each message (preamble and frame header included): the
    # scale jumps 100x between messages, the GG model follows it, the loop trims its error
    assert all(3.6 < b < 4.6 for b in bits[3:]), bits
    assert state["mode"] == "rate" and state["rate_corr"]


def test_rans_setting_reaches_the_frames():
    """rans=True lets the sender code light-tailed activations in rANS blocks (mode 4);
    the default, TRANSPORT_RANS, leaves them out. Either frame decodes to the same values."""
    x = ggcomm.gg.sample((65536,), 3.0, generator=torch.Generator().manual_seed(1))
    frames = {r: PipeComm(rans=r)._encode(x, "forward:1:0")[0] for r in (False, True)}
    modes = {r: [b.mode for b in ggcomm.inspect(f).blocks] for r, f in frames.items()}
    assert "rans" in modes[True] and "rans" not in modes[False]
    assert frames[True].numel() < frames[False].numel()
    assert torch.equal(ggcomm.decode(frames[True]), ggcomm.decode(frames[False]))


def test_settings_validation_and_state_dict_round_trip():
    with pytest.raises(ValueError, match="choose one"):
        PipeComm(rate=3.0, step=0.1)
    with pytest.raises(ValueError, match="rate must be above"):
        PipeComm(rate=1.0)
    with pytest.raises(ValueError, match="min_numel"):
        PipeComm(min_numel=-1)
    with pytest.raises(ValueError, match="rans"):
        PipeComm(rans="yes")
    assert PipeComm().rans is False and PipeComm(rans=True).rans is True  # TRANSPORT_RANS
    a = PipeComm(rate=3.0)
    a.rate_corr["forward:1:0"] = 0.25
    b = PipeComm(rate=3.0)
    b.load_state_dict(a.state_dict())
    assert b.rate_corr == a.rate_corr
    with pytest.raises(ValueError, match="saved with rate=3.0"):
        PipeComm(rate=2.0).load_state_dict(a.state_dict())
    assert PipeComm().mode == "rate" and PipeComm().value == 4.0
