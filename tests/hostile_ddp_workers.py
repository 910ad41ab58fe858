"""Rank functions for tests/test_hostile_ddp.py (spawned processes import them from here)."""

from __future__ import annotations

import io
import os
import signal
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from ddp_workers import batch, flat_params, make, train

import ggcomm.ddp
from ggcomm.ddp import GGCommState, gg_hook
from ggcomm.errors import GGCommError, StateLoadError


def _identical_on_all_ranks(model: nn.Module) -> bool:
    mine = flat_params(model)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return all(torch.equal(parts[0], p) for p in parts)


def _inject(kind: str, state: GGCommState):
    """A patch of the hook's exchange on the rank that misbehaves; returns an undo."""
    if kind == "corrupt":  # one byte of what this rank sends flips on the way
        real = ggcomm.ddp.all_to_all

        def corrupt(send, send_sizes, recv_sizes, group, dev):
            if send.numel():  # a payload byte of the last frame (the CRC-32 is its last 4)
                send = send.clone()
                send[-5] ^= 0x10
            return real(send, send_sizes, recv_sizes, group, dev)

        ggcomm.ddp.all_to_all = corrupt
        return lambda: setattr(ggcomm.ddp, "all_to_all", real)
    if kind == "tag":  # this rank's frames carry another settings fingerprint
        real_print = state.fingerprint
        state.__dict__["fingerprint"] = real_print ^ 0x5A5A

        def undo():
            state.__dict__["fingerprint"] = real_print
        return undo
    if kind == "steps":  # this rank codes at other steps than the ranks agreed on
        for key in state.steps:
            state.steps[key] *= 2.0
        return lambda: None  # the next steps come from statistics every rank shares
    raise ValueError(kind)


def bad_frames(rank, world, exchange, kinds):
    return [bad_frame_reaches_the_loop(rank, world, exchange, kind) for kind in kinds]


def bad_frame_reaches_the_loop(rank, world, exchange, kind):
    """Rank 1 sends one bad frame; every rank's training loop catches the typed error,
    skips that step, and trains on; the replicas stay identical."""
    model, ddp = make(rank, bucket_cap_mb=0.01)
    # steps from the last iteration's statistics only, so that injected steps are used
    state = GGCommState(rate=3.0, exchange=exchange, step_drift=float("inf"))
    state.register(ddp)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(rank)
    train(ddp, opt, g, 3)
    caught = []
    undo = _inject(kind, state) if rank == 1 else (lambda: None)
    for step in range(4):
        x, y = batch(g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ddp(x), y)
        try:
            loss.backward()
        except GGCommError as e:  # what a training loop would catch
            caught.append((step, type(e).__name__, str(e)))
            opt.zero_grad()
            continue
        finally:
            if step == 0:
                undo()
        opt.step()
    return caught, _identical_on_all_ranks(model), state.iteration


def stalled_peer(rank, world, exchange):
    """Rank 1 stops (SIGSTOP) inside the hook's exchange; rank 0 must raise by itself,
    within the process group's timeout, then kills rank 1."""
    pids = [None] * world
    dist.all_gather_object(pids, os.getpid())
    model, ddp = make(rank, bucket_cap_mb=0.01)
    state = GGCommState(rate=3.0, exchange=exchange)
    state.register(ddp)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(rank)
    train(ddp, opt, g, 2)
    if rank == 1:
        def stop(*a, **kw):
            os.kill(os.getpid(), signal.SIGSTOP)
        ggcomm.ddp.all_to_all = stop
    t0 = time.monotonic()
    error = None
    try:
        train(ddp, opt, g, 1)
    except Exception as e:  # noqa: BLE001 - reported to the test
        error = (type(e).__name__, str(e)[:300])
    elapsed = time.monotonic() - t0
    os.kill(pids[1], signal.SIGKILL)
    return error, elapsed


def log_path_unwritable(rank, world, path):
    model, ddp = make(rank)
    state = GGCommState(rate=3.0, log_path=path)
    state.register(ddp)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    try:
        train(ddp, opt, torch.Generator().manual_seed(rank), 1)
    except OSError as e:
        return type(e).__name__, str(e)
    return None


def state_dict_checks(rank, world):
    """What load_state_dict refuses, and that a plain torch.load reads a state dict."""
    out = {}
    model, ddp = make(rank)
    state = GGCommState(rate=3.0)
    state.register(ddp)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    train(ddp, opt, torch.Generator().manual_seed(rank), 3)
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    raw = buf.getvalue()
    sd = torch.load(io.BytesIO(raw))  # default arguments: weights_only=True
    out["weights_only_load"] = (sd["rank"], sd["world_size"], len(sd["residuals"]))

    def refused(fn) -> str | None:
        try:
            fn()
        except StateLoadError as e:
            return str(e)
        return None

    # another rank's file (the save-on-rank-0, load-everywhere mistake)
    files = [None] * world
    dist.all_gather_object(files, raw)
    other = torch.load(io.BytesIO(files[(rank + 1) % world]))
    out["other_rank"] = refused(lambda: GGCommState(rate=3.0).load_state_dict(other))
    # another world size
    sd_world = dict(sd, world_size=world + 1)
    out["other_world"] = refused(lambda: GGCommState(rate=3.0).load_state_dict(sd_world))
    # a model whose parameters differ in size, and one that lacks a parameter
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.LayerNorm(128), nn.Linear(128, 10))
    wrapped = nn.Module()
    wrapped.body = wide
    ddp_w = nn.parallel.DistributedDataParallel(wrapped)
    st_w = GGCommState(rate=3.0)
    st_w.register(ddp_w)
    out["other_shapes"] = refused(lambda: st_w.load_state_dict(sd))
    sd_extra = dict(sd, residuals={**sd["residuals"], "no.such.param": torch.zeros(3)})
    st_ok = GGCommState(rate=3.0)
    st_ok.register(make(rank)[1])
    out["unknown_name"] = refused(lambda: st_ok.load_state_dict(sd_extra))
    st_ok.load_state_dict(sd)  # the right file loads
    out["loaded_iteration"] = st_ok.iteration
    # positional keys: registered with ddp.register_comm_hook, the state refuses to save
    model_p, ddp_p = make(rank)
    st_p = GGCommState(rate=3.0)
    ddp_p.register_comm_hook(st_p, gg_hook)
    train(ddp_p, torch.optim.SGD(ddp_p.parameters(), lr=0.05),
          torch.Generator().manual_seed(rank), 2)
    out["positional"] = refused(st_p.state_dict)
    return out
