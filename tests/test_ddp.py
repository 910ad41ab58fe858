"""The DDP hook on real gloo ranks (spawned processes on localhost)."""

from __future__ import annotations

import json
import pickle

import ddp_workers as w
import dist_utils
import pytest
import torch
import torch.nn as nn

from ggcomm.ddp import GGCommState, SettingsMismatchError


@pytest.mark.parametrize("world", [2, 4])
def test_parameters_bit_identical_on_all_ranks_after_50_steps(world):
    exchanges = ("allgather", "reduce_scatter")  # one process group runs both
    per_rank = dist_utils.values(dist_utils.run(
        w.identical_params_many, world, [(ex, 50, True, "float32") for ex in exchanges]))
    for i in range(len(exchanges)):
        res = [r[i] for r in per_rank]
        params = [r[0] for r in res]
        assert all(torch.equal(params[0], p) for p in params[1:])
        losses = res[0][1]
        assert sum(losses[-10:]) < sum(losses[:10])  # it trains
        total = res[0][2]["total"]
        assert total["ratio"] > 4  # a tiny model: headers and statistics weigh in
        assert 2.0 < total["payload_bits_per_element"] < 4.0  # rate 3 target
        assert res[0][3] == 0  # rANS blocks are off by default (TRANSPORT_RANS)


def test_rans_blocks_keep_replicas_bit_identical():
    """With rans=True some of the hook's blocks are rANS-coded (mode 4); every rank still
    decodes the same exact sums."""
    cases = [(ex, 20, {"rans": True, "rel_step": 2.0, "block_size": 4096}, "float32")
             for ex in ("allgather", "reduce_scatter")]
    per_rank = dist_utils.values(dist_utils.run(w.identical_params_many, 2, cases))
    for i in range(len(cases)):
        res = [r[i] for r in per_rank]
        assert torch.equal(res[0][0], res[1][0])
        assert sum(r[3] for r in res) > 0  # mode 4 was used


def test_training_tracks_plain_allreduce_and_half_precision_gradients():
    base, gg, bf16, fp16 = dist_utils.values(dist_utils.run(
        w.identical_params_many, 2, [("allgather", 40, False, "float32"),
                                     ("allgather", 40, True, "float32"),
                                     ("allgather", 10, True, "bfloat16"),
                                     ("allgather", 10, True, "float16")]))[0]
    b, g = sum(base[1][-10:]) / 10, sum(gg[1][-10:]) / 10
    assert abs(g - b) < 0.05 * b
    for params, losses, _, _ in (bf16, fp16):
        assert torch.isfinite(params).all() and all(map(torch.isfinite, map(torch.tensor,
                                                                             losses)))


def test_half_precision_gradients_identical_on_ranks():
    res = dist_utils.values(dist_utils.run(w.identical_params_many, 2,
                                           [("allgather", 5, True, "bfloat16"),
                                            ("reduce_scatter", 5, True, "float16")]))
    for case in range(2):
        assert torch.equal(res[0][case][0], res[1][case][0])


@pytest.mark.parametrize("world", [2, 4])
def test_average_is_the_mean_of_the_ranks_gradients_within_half_a_step(world):
    # iteration 0 (plain all-reduce) to float rounding; iteration 1 (compressed, zero
    # residuals) within step / 2 per element: the quantization error averaged over ranks
    for per_rank in dist_utils.values(dist_utils.run(w.exact_average, world,
                                                     ["allgather", "reduce_scatter"])):
        for exchange, iterations in zip(["allgather", "reduce_scatter"], per_rank, strict=True):
            for it, (worst, resolved) in enumerate(iterations):
                assert worst <= 1.0, (exchange, it, worst)
                assert resolved > 1000, (exchange, it, resolved)  # a wrong scale would show


def test_bytes_counted_equal_bytes_handed_to_torch_distributed():
    for per_rank in dist_utils.values(dist_utils.run(w.bytes_counted, 3,
                                                     ["allgather", "reduce_scatter"])):
        for sent, received, counted_sent, counted_received in per_rank:
            assert counted_sent == pytest.approx(sent, rel=1e-12)
            assert counted_received == pytest.approx(received, rel=1e-12)


@pytest.mark.parametrize("exchange,drift,per_bucket,per_step", [
    ("allgather", float("inf"), 2, 1), ("reduce_scatter", float("inf"), 3, 2),
    ("allgather", 0.0, 3, 1), ("reduce_scatter", 0.0, 4, 2)])
def test_collectives_per_bucket(exchange, drift, per_bucket, per_step):
    # sizes and statistics ride one all-gather, and steps come from the previous
    # iteration's statistics; a bucket whose statistics drift agrees on fresh ones first;
    # per iteration, one 8-byte all-gather tells every rank whether any rank's frames failed
    for rank_steps in dist_utils.values(dist_utils.run(w.collectives_per_step, 3, exchange,
                                                       drift)):
        for calls, buckets in rank_steps:
            assert buckets > 1
            assert calls == per_bucket * buckets + per_step


def test_error_feedback_carries_the_residual_and_stats_are_logged(tmp_path):
    log = tmp_path / "ggcomm.jsonl"
    res = dist_utils.values(dist_utils.run(w.error_feedback, 2, str(log)))
    for checks, _ in res:
        for max_err, scale, resid in checks:
            assert max_err <= 1e-5 * scale
            assert resid > 0  # quantization did leave something to carry
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [d["iteration"] for d in lines] == [1, 2, 3]  # rank 0 only, one per iteration
    assert all(d["bytes_sent"] > 0 and d["ratio"] > 1 for d in lines)
    board0, board1 = res[0][1], res[1][1]
    assert {t for t, _, _ in board0} >= {"ggcomm/bytes_sent", "ggcomm/ratio"} and not board1


def test_rate_warmup_starts_high_and_settles_on_the_target(tmp_path):
    log = tmp_path / "ggcomm.jsonl"
    targets = dist_utils.values(dist_utils.run(w.rate_warmup, 2, str(log)))[0]
    # iteration 0 is a plain allreduce (start_iter=1); then 7 bits falling to 3 over 8
    assert targets[:3] == [7.0, 7.0, 6.5] and targets[9:] == [3.0, 3.0, 3.0]
    assert GGCommState(rate=3.0).target_rate(0) == 3.0
    bits = [json.loads(line)["payload_bits_per_element"] for line in log.read_text().splitlines()]
    assert bits[1] > 5.0 and all(2.5 < b < 3.6 for b in bits[12:]), bits


def test_checkpoint_resume_is_bit_exact():
    cases = [("allgather", "rate"), ("reduce_scatter", "rate"), ("allgather", "rel_step"),
             ("allgather", "step")]
    for per_rank in dist_utils.values(dist_utils.run(w.resume, 2, cases)):
        for case, (same, diff, pickled_ok) in zip(cases, per_rank, strict=True):
            assert same, f"{case}: resumed run differs by {diff}"
            assert pickled_ok


def test_mismatched_settings_raise_on_every_rank():
    msgs = dist_utils.values(dist_utils.run(w.mismatch, 2, timeout=120))
    assert all(m is not None and "settings differ" in m for m in msgs)


def test_frames_tagged_with_other_settings_are_refused_on_every_rank():
    # the settings agreed on the first step; afterwards rank 1's frames carry another
    # fingerprint: no rank may sum them (the error may arrive wrapped by DDP)
    exchanges = ["allgather", "reduce_scatter"]
    for per_rank in dist_utils.values(dist_utils.run(w.foreign_tag, 2, exchanges,
                                                     timeout=180)):
        for exchange, msg in zip(exchanges, per_rank, strict=True):
            assert msg is not None and "carries settings fingerprint" in msg, (exchange, msg)
            assert "ranks run different ggcomm settings" in msg, (exchange, msg)


@pytest.mark.parametrize("exchange", ["allgather", "reduce_scatter"])
def test_a_lying_frame_size_is_refused_on_every_rank(exchange):
    # sizes are checked against the largest valid frame before any receive is posted
    for kind, msg in dist_utils.values(dist_utils.run(w.hostile_size, 2, exchange,
                                                      timeout=120)):
        assert kind == "FrameError" and "rank 1 announced" in msg and "bytes" in msg, (kind, msg)


def test_nonfinite_gradients_propagate_then_clear():
    for bad, any_nonfinite, clean in dist_utils.values(dist_utils.run(w.nonfinite, 2)):
        assert bad and any_nonfinite  # GradScaler would see them and skip the step
        assert clean


@pytest.mark.parametrize("as_view", [False, True])
def test_no_sync_accumulation_and_unused_parameters(as_view):
    res = dist_utils.values(dist_utils.run(w.accumulation_and_unused, 2, as_view))
    assert torch.equal(res[0][0], res[1][0])
    assert res[0][1] == 4  # one reduction per synchronised step, none in no_sync


def test_static_graph():
    res = dist_utils.values(dist_utils.run(w.static_graph, 2))
    assert torch.equal(res[0][0], res[1][0]) and res[0][1] == 5


def test_state_validates_settings():
    with pytest.raises(ValueError):
        GGCommState(rate=3.0, step=0.1)
    with pytest.raises(ValueError):
        GGCommState(rate=0.5)
    with pytest.raises(ValueError):
        GGCommState(step=-1.0)
    with pytest.raises(ValueError):
        GGCommState(exchange="ring")
    with pytest.raises(ValueError):
        GGCommState(k=99)
    with pytest.raises(ValueError, match="rate mode"):
        GGCommState(rel_step=0.2, warmup_iters=5)
    with pytest.raises(ValueError, match="above rate"):
        GGCommState(rate=3.0, warmup_iters=5, warmup_rate=2.0)
    with pytest.raises(ValueError, match="step_drift"):
        GGCommState(step_drift=-0.1)
    with pytest.raises(ValueError, match="rans"):
        GGCommState(rans=1)
    assert GGCommState().code_args()["rans"] is False  # TRANSPORT_RANS
    assert GGCommState(rans=True).code_args()["rans"] is True
    assert GGCommState(rate=3, warmup_iters=4).fingerprint != GGCommState(rate=3).fingerprint
    s = GGCommState(rel_step=0.2)
    assert GGCommState(rel_step=0.2).fingerprint == s.fingerprint
    assert GGCommState(rel_step=0.3).fingerprint != s.fingerprint
    other = GGCommState(rate=4.0)
    with pytest.raises(SettingsMismatchError):
        other.load_state_dict(s.state_dict())
    # a state saved under frame format 1 resumes under format 2: the format is the wire's
    old = s.state_dict()
    old["settings"] = {**old["settings"], "format": 1}
    GGCommState(rel_step=0.2).load_state_dict(old)
    restored = pickle.loads(pickle.dumps(s))
    assert restored.settings() == s.settings() and restored.process_group is None


def test_register_needs_a_ddp_model():
    with pytest.raises(AttributeError):
        GGCommState().register(nn.Linear(2, 2))
