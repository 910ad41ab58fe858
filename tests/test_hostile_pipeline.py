"""ggcomm.pipeline against a lying peer: claims are bounded before anything is allocated, a
message that cannot be taken off the link breaks that link (PipeLinkError, never a gloo
abort), and a bad message that was taken off leaves the link usable."""

from __future__ import annotations

import math

import dist_utils
import hostile_pipeline_workers as w
import pytest
import torch

from ggcomm import codec
from ggcomm.pipeline import PipeComm, _max_message_bytes, _raw_message

MiB = 1 << 20


def _bound(cfg: dict, kw: dict) -> int:
    """The ceiling the receiver of a PREAMBLE_CASES entry applies."""
    if "out" in kw:
        return _max_message_bytes(math.prod(kw["out"]), codec.DEFAULT_BLOCK_SIZE, 4)
    if "shape" in kw:
        return _max_message_bytes(math.prod(kw["shape"]), codec.DEFAULT_BLOCK_SIZE,
                                  kw["dtype"].itemsize)
    return PipeComm(**cfg).max_message_bytes


@pytest.fixture(scope="module")
def hostile_run() -> list:
    """Rank 0 lies to rank 1 (both tests' phases, one spawn); each rank's report."""
    return dist_utils.values(dist_utils.run(w.hostile, 2, timeout=240))


def test_lying_preambles_break_the_link_without_allocating_or_aborting(hostile_run):
    r0, r1 = (r["preambles"] for r in hostile_run)
    for name, claim, cfg, kw, _ in w.PREAMBLE_CASES:
        rep = r1[name]
        first = rep["first"]
        # refused by the bound (not by a failed allocation), naming peer, claim and ceiling
        assert "rank 0" in first and f"{claim}-byte" in first and "outside" in first, first
        assert str(_bound(cfg, kw)) in first, (first, _bound(cfg, kw))
        assert all("rank 0" in m and "broken" in m for m in rep["later"]), rep["later"]
        assert not rep["gloo_calls_after"], name  # later calls never reached gloo
        assert rep["max_request"] < 64 * 1024, (name, rep["max_request"])
    assert r1["2^40 to a pending irecv completed"]
    assert r1["good"] < 0.051  # other tags between the same ranks still work
    assert r1["rss_growth"] < 64 * MiB, r1["rss_growth"]
    assert not any(r0["stuck_completed"])  # the lies' payloads really are still on the link


def test_tiny_frame_bit_flip_and_wide_raw_message_are_refused_and_the_link_survives(
        hostile_run):
    sizes, (out, rss_growth, max_request) = (r["frames"] for r in hostile_run)
    assert sizes[0] < 300  # the tiny frame is tiny
    assert [(name, kind) for name, kind, _ in out] == [
        ("tiny frame", "FrameError"), ("after tiny frame", "ok"),
        ("bit flip", "FrameError"), ("after bit flip", "ok"),
        ("wide raw message", "FrameError"), ("after wide raw message", "ok"),
        ("all exceptions into out", "ok"),
        ("after a pending tiny frame", "ok"), ("pending tiny frame", "FrameError"),
    ], out
    for _, kind, detail in out:
        if kind == "FrameError":
            assert "rank 0" in detail, detail
        elif isinstance(detail, float):
            assert detail < 0.051, out
    assert str(w.ZERO_FRAME_NUMEL) in out[0][2] and str(w.MAX_NUMEL) in out[0][2]
    assert "checksum" in out[2][2]
    assert str(w.MAX_NUMEL) in out[4][2]
    assert out[6][2] is True  # a legal worst-case frame fits the bound for its size
    # nothing of the claimed 64 Mi elements (256 MiB) was allocated
    assert max_request < 16 * MiB, max_request
    assert rss_growth < 64 * MiB, rss_growth


def test_message_bound_is_the_codecs_worst_case_and_ceilings_are_validated():
    for numel, block, itemsize in ((0, 16384, 4), (1, 16384, 2), (16384, 16384, 8),
                                   (100_003, 16384, 4), (1000, 7, 4)):
        assert _max_message_bytes(numel, block, itemsize) == \
            codec.max_frame_bytes([numel], block, itemsize) + 8 * (codec.MAX_NDIM - 1)
    # real messages of a size fit that size's bound, the worst kinds included
    for x in (torch.full((5000,), float("nan")), torch.randn(3, 7000) ** 9):
        frame = codec.encode(x, 1e-3)
        assert frame.nbytes <= _max_message_bytes(x.numel(), codec.DEFAULT_BLOCK_SIZE, 4)
    one = torch.zeros((1,) * codec.MAX_NDIM)
    assert _raw_message(one).numel() <= _max_message_bytes(1, codec.DEFAULT_BLOCK_SIZE, 4)
    # the default byte ceiling follows max_numel; a 2^33-byte claim is refused under 2^20
    assert PipeComm(max_numel=1 << 20).max_message_bytes == \
        _max_message_bytes(1 << 20, codec.DEFAULT_BLOCK_SIZE, 8) < 1 << 33
    assert PipeComm(max_message_bytes=4096).max_message_bytes == 4096
    for bad in ({"max_numel": 0}, {"max_numel": True}, {"max_numel": 2.0},
                {"max_message_bytes": 0}, {"max_message_bytes": "1e9"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PipeComm(**bad)
    # the exact bound assumes the sender's block size, so both ends must agree on it
    assert PipeComm(block_size=4096).fingerprint != PipeComm().fingerprint
