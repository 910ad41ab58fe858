"""Rank functions for tests/test_diloco.py (spawned processes import them from here)."""

from __future__ import annotations

import io

import dist_utils
import torch
import torch.distributed as dist
import torch.nn as nn

from ggcomm.diloco import DiLoCo
from ggcomm.errors import FrameError, SettingsMismatchError


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.LayerNorm(64), nn.Linear(64, 4))


def _train(model, inner, diloco, g, steps):
    for _ in range(steps):
        x, y = torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        inner.step()
        inner.zero_grad()
        diloco.step()


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def replicas(rank, world, wires, steps, sync_every):
    """Per wire: the parameters after the outer steps, the bytes counted and moved."""
    out = {}
    for wire in wires:
        model = _model()
        inner = torch.optim.AdamW(model.parameters(), lr=3e-3)
        # "gg-seg": a step per 512-element segment; "gg": one step for all of them
        diloco = DiLoCo(model, sync_every=sync_every, wire=wire.removesuffix("-seg"), rate=3.0,
                        segment=512, shared_step=not wire.endswith("-seg"))
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        before = diloco.stats.total["bytes_sent"]
        with dist_utils.ByteCounter(world) as c:
            _train(model, inner, diloco, g, steps)
        out[wire] = dict(params=_flat(model), outer=diloco.outer_steps,
                         counted=(diloco.stats.total["bytes_sent"] - before,
                                  diloco.stats.total["bytes_received"]),
                         moved=(c.sent, c.received), numel=diloco.numel)
    return out


def resume_and_hostile(rank, world):
    """Resume bit-exact; a corrupt frame raises FrameError on every rank; ranks that start
    apart are refused."""
    def fresh():
        model = _model()
        inner = torch.optim.AdamW(model.parameters(), lr=3e-3)
        return model, inner, DiLoCo(model, sync_every=3, wire="gg", rate=2.5)

    model, inner, d = fresh()
    g = torch.Generator().manual_seed(100 + rank)
    _train(model, inner, d, g, 12)
    straight = _flat(model)

    model, inner, d = fresh()
    g = torch.Generator().manual_seed(100 + rank)
    _train(model, inner, d, g, 7)  # mid-way between outer steps
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "inner": inner.state_dict(),
                "diloco": d.state_dict(), "g": g.get_state()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model, inner, d = fresh()
    model.load_state_dict(saved["model"])
    inner.load_state_dict(saved["inner"])
    d.load_state_dict(saved["diloco"])
    g.set_state(saved["g"])
    _train(model, inner, d, g, 5)
    resumed = _flat(model)

    # a corrupt frame from rank 1
    model, inner, d = fresh()
    if rank == 1:
        orig = dist.all_to_all_single

        def flipping(out, inp, *a, **kw):
            inp = inp.clone()
            inp[inp.numel() // 2] ^= 0x5A
            return orig(out, inp, *a, **kw)

        dist.all_to_all_single = flipping
    try:
        _train(model, inner, d, g, 3)
        corrupt = "no error"
    except FrameError as e:
        corrupt = f"FrameError: {e}"
    finally:
        if rank == 1:
            dist.all_to_all_single = orig

    # ranks that start from other parameters
    model = _model()
    if rank == 1:
        with torch.no_grad():
            model[0].weight[0, 0] += 1
    try:
        DiLoCo(model)
        apart = "no error"
    except SettingsMismatchError as e:
        apart = f"SettingsMismatchError: {e}"
    return dict(straight=straight, resumed=resumed, corrupt=corrupt, apart=apart)


def rans_replicas(rank, world):
    """rans=False then rans=True at a step of 1.8 RMS (about 1.5 bits per element, where
    the prefix codes waste the most): the parameters after 2 outer steps and the bytes
    moved."""
    out = {}
    for rans in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 512), nn.ReLU(), nn.Linear(512, 4))
        inner = torch.optim.AdamW(model.parameters(), lr=3e-3)
        diloco = DiLoCo(model, sync_every=4, wire="gg", rel_step=1.8, rans=rans)
        g = torch.Generator().manual_seed(100 + rank)
        with dist_utils.ByteCounter(world) as c:
            _train(model, inner, diloco, g, 8)
        out[rans] = dict(params=_flat(model), moved=c.sent, outer=diloco.outer_steps)
    return out
