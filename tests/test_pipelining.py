"""ggcomm.pipelining: torch's pipeline schedules over compressed stage-to-stage traffic.

One spawn of 2 gloo ranks trains the same model with torch's own stages and with the
compressed ones, under ScheduleGPipe and Schedule1F1B (2 stages) and
ScheduleInterleaved1F1B (4 stages, two a rank); the tests read its results.
"""

from __future__ import annotations

import dist_utils
import pipelining_workers as w
import pytest
import torch

SCHEDULES = list(w.SCHEDULES)


@pytest.fixture(scope="module")
def runs():
    return dist_utils.values(dist_utils.run(w.train_all, 2))


def _max_rel_loss_gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / y for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_compressed_training_learns(runs, schedule):
    losses = runs[1]["rate"][schedule]["losses"]  # rate=4: about 4.4 bits an element
    assert len(losses) == w.STEPS
    assert sum(losses[-3:]) < 0.2 * sum(losses[:3]), losses
    assert runs[0]["rate"][schedule]["class"] == "CompressedPipelineStage"


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_fine_step_follows_the_uncompressed_schedule(runs, schedule):
    # rel_step=0.01: every activation and gradient within 0.005 RMS of its exact value
    for r in runs:
        close, plain = r["close"][schedule], r["plain"][schedule]
        assert close["class"] == "CompressedPipelineStage"  # 1f1b: via compress_stage
        for p, q in zip(close["params"], plain["params"], strict=True):
            assert (p - q).abs().max() <= 5e-3 * q.abs().max()
    close, plain = runs[1]["close"][schedule], runs[1]["plain"][schedule]
    assert _max_rel_loss_gap(close["losses"], plain["losses"]) < 2e-3
    # the comparison is sharp enough to see quantization: 4 bits an element drift further
    rate = runs[1]["rate"][schedule]
    assert _max_rel_loss_gap(rate["losses"], plain["losses"]) > 1e-2


def test_two_stages_a_rank_follow_the_uncompressed_schedule(runs):
    # Interleaved 1F1B: both ranks send activations and gradients to each other, in
    # separate tagged streams; the fine step tracks torch's own stages as above
    close, plain = runs[1]["close"]["interleaved"], runs[1]["plain"]["interleaved"]
    assert len(close["losses"]) == w.MULTI_STEPS
    assert _max_rel_loss_gap(close["losses"], plain["losses"]) < 2e-3
    for r in runs:
        close, plain = r["close"]["interleaved"], r["plain"]["interleaved"]
        for p, q in zip(close["params"], plain["params"], strict=True):
            assert (p - q).abs().max() <= 5e-3 * q.abs().max()
        s = close["stats"]
        # each rank sends activations (stages 0->1, 2->3 or 1->2) and gradients
        messages = {"forward": (2 if r is runs[0] else 1), "backward": (1 if r is runs[0] else 2)}
        for d, n in messages.items():
            assert s[d]["messages_sent"] == n * w.MULTI_STEPS * w.MICROBATCHES, (d, s[d])


def test_both_schedules_send_the_same_messages(runs):
    # GPipe and 1F1B order the micro-batches differently but compute the same step
    for r in runs:
        for kind in ("plain", "close", "rate"):
            a, b = (r[kind][s] for s in SCHEDULES)
            assert a["losses"] == b["losses"]
            assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"], strict=True))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_stats_count_what_crossed_and_it_is_several_times_smaller(runs, schedule):
    r0, r1 = (r["rate"][schedule] for r in runs)
    for r in (r0, r1):
        # every byte handed to torch.distributed (steps 2..20) is a byte the stats count
        assert r["counted"]["wire"] == r["counted"]["stats"], r["counted"]
        assert r["counted"]["wire"]["sent"] > 0
    # activations forward on rank 0, their gradients backward on rank 1
    fwd, bwd = r0["stats"]["forward"], r1["stats"]["backward"]
    messages = w.STEPS * w.MICROBATCHES
    assert fwd["messages_sent"] == messages == bwd["messages_sent"]
    assert fwd["bytes_sent"] == r1["stats"]["forward"]["bytes_received"]
    assert bwd["bytes_sent"] == r0["stats"]["backward"]["bytes_received"]
    for d in (fwd, bwd):
        assert d["raw_bytes_sent"] == messages * (w.BATCH // w.MICROBATCHES) * w.HIDDEN * 4
        assert d["ratio_sent"] > 5, d
        assert d["passthrough_bytes_sent"] == 0


def test_misuse_raises_typed_errors(runs):
    for rank, r in enumerate(runs):
        errors = r["misuse"]
        assert errors[0].startswith("TypeError") and "pipelining stage" in errors[0]
        assert errors[1].startswith("TypeError") and "PipeComm" in errors[1]
        assert errors[2].startswith("ValueError") and "process group" in errors[2]
        assert errors[3].startswith("ValueError") and "tag_base" in errors[3]
        assert errors[4].startswith("ValueError") and "process group" in errors[4]
        assert errors[5] == "class after a failed conversion: PipelineStage"
        assert errors[6].startswith("ValueError") and "already" in errors[6]
        assert errors[7].startswith("LinkOutOfStepError"), errors[7]
        assert f"stage {rank}" in errors[7] and ("forward" if rank else "backward") in errors[7]
