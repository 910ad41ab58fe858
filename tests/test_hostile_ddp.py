"""The DDP hook against bad frames, stalled peers, unwritable logs and wrong checkpoints:
each ends in one typed error on every rank, in bounded time, and training can go on."""

from __future__ import annotations

import dist_utils
import hostile_ddp_workers as w
import pytest

PG_TIMEOUT = 4.0  # seconds: the user's init_process_group timeout in the stall test


KINDS = {"corrupt": ("FrameError", "checksum"),  # a byte flipped on the wire
         "tag": ("SettingsMismatchError", "fingerprint"),  # another settings fingerprint
         "steps": ("FrameError", "agreed steps")}  # coded at steps the ranks did not agree on


@pytest.mark.parametrize("exchange,world", [("allgather", 2), ("reduce_scatter", 3)])
def test_a_bad_frame_reaches_every_training_loop_with_its_type(exchange, world):
    per_rank = dist_utils.values(dist_utils.run(w.bad_frames, world, exchange, list(KINDS)))
    for i, (kind, (error, what)) in enumerate(KINDS.items()):
        messages = []
        for rank, results in enumerate(per_rank):
            caught, identical, iteration = results[i]
            # one error, on the step with the bad frame, on every rank (also those whose
            # own frames all decoded), and the three steps after it train normally
            assert [(step, name) for step, name, _ in caught] == [(0, error)], (kind, rank,
                                                                             caught)
            assert identical, (kind, rank)
            assert iteration == 3 + 4, (kind, rank)
            messages.append(caught[0][2])
        # a rank that received the bad frame names what was wrong with it and who sent it
        assert any(what in m and "rank 1" in m for m in messages), (kind, messages)


def test_a_stalled_peer_fails_the_survivor_within_its_timeout():
    results = dist_utils.run(w.stalled_peer, 2, "allgather", pg_timeout=PG_TIMEOUT,
                             timeout=120)
    kind, value = results[0]
    assert kind == "ok", value
    error, elapsed = value
    assert error is not None, "the survivor finished a step without its peer"
    assert elapsed < 2 * PG_TIMEOUT, (elapsed, error)
    assert results[1][0] == "error"  # killed by rank 0 once it had raised


def test_an_unwritable_log_path_fails_every_rank_on_the_first_call(tmp_path):
    path = str(tmp_path / "missing" / "ggcomm.jsonl")
    for name, msg in dist_utils.values(dist_utils.run(w.log_path_unwritable, 2, path)):
        assert name.endswith("Error") and "log_path" in msg and "missing" in msg


def test_state_dicts_load_with_torch_load_and_refuse_what_does_not_fit():
    for rank, out in enumerate(dist_utils.values(dist_utils.run(w.state_dict_checks, 2))):
        assert out["weights_only_load"][:2] == (rank, 2) and out["weights_only_load"][2] > 0
        assert "saved by rank" in out["other_rank"]
        assert "world size" in out["other_world"]
        assert "elements" in out["other_shapes"]
        assert "no.such.param" in out["unknown_name"]
        assert out["loaded_iteration"] == 3
        assert "state.register" in out["positional"]
