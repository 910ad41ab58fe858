"""ggcomm's FSDP2 reduce-scatter (ggcomm.fsdp) on real gloo ranks."""

from __future__ import annotations

import dist_utils
import fsdp_workers as w
import numpy as np
import pytest
import torch

STEP = 2.0**-12


@pytest.mark.parametrize("world", [2, 4])
def test_every_chunk_is_the_exact_integer_sum(world):
    res = dist_utils.values(dist_utils.run(w.exact_sums, world, STEP))
    n_calls = len(res[0]["calls"])
    assert n_calls == 3 * 4  # 3 units (the root holds no parameters of its own), 4 passes
    for i in range(n_calls):
        key = res[0]["calls"][i][0]
        inputs = [r["calls"][i][1] for r in res]
        assert all(r["calls"][i][0] == key for r in res)
        for rank in range(world):
            chunk = inputs[0].numel() // world
            q = sum(torch.from_numpy(np.rint(x[rank * chunk:(rank + 1) * chunk].double()
                                             .numpy() * (1 / STEP))).long() for x in inputs)
            want = (q.double() * STEP).float()
            assert torch.equal(res[rank]["calls"][i][2], want), (key, rank)
    # FSDP divides the sum by the world size: the first layer's weight shard (48 x 16
    # splits evenly) is the first part of the last call on that unit, / world
    last = [c for c in res[0]["calls"] if c[0] == "0"][-1]
    for rank in range(world):
        out = [c for c in res[rank]["calls"] if c[0] == "0"][-1][2]
        shard = res[rank]["first_shard"].reshape(-1)
        assert torch.equal(shard, out[: shard.numel()] / world)
    assert last is not None
    for r in res:  # bytes counted equal bytes moved
        assert r["stats"]["counted"] == (r["stats"]["bytes_sent"], r["stats"]["bytes_received"])
    # non-finite values propagate to the owner's sum; the rest stays exact
    assert torch.isnan(res[0]["probe"][1]) and torch.isinf(res[1]["probe"][2])
    assert float(res[0]["probe"][0]) == 0.25 * world
    # gradient accumulation: one call per unit, last layer first, of the summed micro-batches
    assert [c[0] for c in res[0]["accumulated"]] == ["4", "2", "0"]
    for i in range(3):
        inputs = [r["accumulated"][i][1] for r in res]
        chunk = inputs[0].numel() // world
        for rank in range(world):
            q = sum(torch.from_numpy(np.rint(x[rank * chunk:(rank + 1) * chunk].double()
                                             .numpy() * (1 / STEP))).long() for x in inputs)
            assert torch.equal(res[rank]["accumulated"][i][2], (q.double() * STEP).float())


def test_it_trains_like_fp32_and_counts_the_bytes_it_moves():
    world = 2  # (4 ranks: the exact-sum test; convergence: benchmarks/convergence_fsdp.py)
    gg = dist_utils.values(dist_utils.run(w.train, world, 30, {"rate": 3.0}, None, 0, True))
    ref = [r["plain"] for r in gg]
    for r in gg:
        assert r["counted"] == r["reported"]  # bytes counted equal bytes moved
    losses = np.mean([r["losses"] for r in gg], axis=0)
    fp32 = np.mean(ref, axis=0)
    assert losses[-5:].mean() < 0.5 * losses[:5].mean()  # it trains
    assert abs(losses[-5:].mean() / fp32[-5:].mean() - 1) < 0.1
    total = gg[0]["total"]
    assert total["ratio"] > 3  # tiny chunks: headers and statistics weigh in


def test_rans_frames_train_bit_identically_in_fewer_bytes():
    runs = {rans: dist_utils.values(dist_utils.run(w.train, 2, 6, {"rel_step": 1.8,
                                                                    "rans": rans}))
            for rans in (False, True)}
    for plain, coded in zip(runs[False], runs[True], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(plain["shards"], coded["shards"],
                                                     strict=True))
        assert coded["total"]["bytes_sent"] < plain["total"]["bytes_sent"]
        assert coded["counted"] == coded["reported"]


def test_bf16_parameters_and_reduce_dtype():
    res = dist_utils.values(dist_utils.run(w.train, 2, 10, {"rate": 4.0}, "bfloat16"))
    assert all(np.isfinite(r["losses"]).all() for r in res)
    assert res[0]["losses"][-1] < res[0]["losses"][0]


def test_resume_from_a_distributed_checkpoint_is_bit_exact(tmp_path):
    res = dist_utils.values(dist_utils.run(w.resume, 2, str(tmp_path / "ckpt"), 4))
    for first, second in res:
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_a_corrupt_frame_raises_frame_error_on_every_rank():
    res = dist_utils.values(dist_utils.run(w.corrupt, 2))
    assert all(r is not None and r[0] == "FrameError" for r in res), res


@pytest.mark.parametrize("how,says", [("flip", "checksum"), ("float64", "weights for a shard")])
def test_a_bad_weight_frame_raises_frame_error_on_every_rank(how, says):
    res = dist_utils.values(dist_utils.run(w.corrupt_weights, 2, how))
    assert all(r is not None and r[0] == "FrameError" and says in r[1] for r in res), res


def test_the_training_script_runs():
    for reduce in ("gg",):  # fp32 and bf16 are FSDP's own reduce-scatter
        res = dist_utils.values(dist_utils.run(w.train_script, 2, reduce))
        r = res[0]
        assert len(r["steps"]["loss"]) == 3 and np.isfinite(r["val_loss"])
        fp32 = r["fp32_reduce_scatter_bytes_per_rank"]
        if reduce == "gg":  # measured, and far below fp32's
            assert 0 < r["mean_bytes_sent_per_rank"] < fp32 / 4
            assert r["gg_stats"]["gradients"]["bytes_sent"] == \
                sum(r["steps"]["bytes_sent_per_rank"])
        else:
            assert r["mean_bytes_sent_per_rank"] == fp32


def test_compressed_weights_round_what_forward_sees_and_keep_the_masters():
    both = dist_utils.values(dist_utils.run(w.weights_rounded, 2, ["rf8", "eg"]))
    for fmt in ("rf8", "eg"):
        res = [b[fmt] for b in both]
        for r in res:
            assert r["counted"] == r["reported"]
            assert not torch.equal(r["seen"], r["master"])  # forward used rounded weights
            rel = float((r["seen"] - r["master"]).norm() / r["master"].norm())
            assert rel < (0.05 if fmt == "rf8" else 0.03)
            if fmt == "rf8":
                assert torch.equal(r["seen"], r["want"])
            assert r["weights"]["ratio"] > (3.5 if fmt == "rf8" else 4.0)
        assert torch.equal(res[0]["seen"], res[1]["seen"])  # the same weights everywhere
        assert res[0]["losses"][-1] < res[0]["losses"][0]


def test_settings_are_checked():
    from ggcomm.fsdp import GGFSDP

    for bad in ({"rans": "yes"}, {"weights": "fp8"}, {"weights_rel_step": 0},
                {"segment": 0}, {"block_size": 0}, {"rate": 2.0, "step": 0.1}):
        with pytest.raises(ValueError):
            GGFSDP(**bad)
    assert GGFSDP(rans=True).rans and not GGFSDP().rans
