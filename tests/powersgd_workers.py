"""Rank functions for tests/test_powersgd.py (spawned processes import them from here)."""

from __future__ import annotations

import io

import dist_utils
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import ggcomm.exchange
from ggcomm.errors import FrameError
from ggcomm.powersgd import PowerSGDEGState, powersgd_eg_hook


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 96), nn.ReLU(), nn.LayerNorm(96),
                                  nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 10))

    def forward(self, x):
        return self.body(x)


def make(state, hook, bucket_cap_mb=0.02):
    torch.manual_seed(0)
    model = Net()
    ddp = DDP(model, bucket_cap_mb=bucket_cap_mb)
    if hook is powersgd_eg_hook:
        state.register(ddp)
    else:
        ddp.register_comm_hook(state, hook)
    return model, ddp, torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)


def train(ddp, opt, g, steps):
    losses = []
    for _ in range(steps):
        x, y = torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
        loss = nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def replicas(rank, world, steps, rank_r):
    """Train; return the parameters, the hook's byte count and the bytes torch.distributed
    was handed over the compressed iterations."""
    state = PowerSGDEGState(matrix_approximation_rank=rank_r, start_powerSGD_iter=3, rate=4.0)
    model, ddp, opt = make(state, powersgd_eg_hook)
    g = torch.Generator().manual_seed(10 + rank)
    train(ddp, opt, g, 4)  # DDP's bucket rebuild and PowerSGD's warm-up, uncounted
    before = state.stats.total["bytes_sent"], state.stats.total["bytes_received"]
    with dist_utils.ByteCounter(world) as counter:
        losses = train(ddp, opt, g, steps)
    after = state.stats.total
    return dict(params=flat(model), losses=losses, iters=state.iter,
                counted=(after["bytes_sent"] - before[0], after["bytes_received"] - before[1]),
                moved=(counter.sent, counter.received),
                fp32=sum(p.numel() for p in model.parameters()) * 4,
                summary=state.stats.summary())


def against_torch(rank, world):
    """One compressed iteration of each hook on the same gradients, fine steps: the
    composed hook is torch's algorithm with a near-lossless wire."""
    out = {}
    for name in ("torch", "eg"):
        if name == "torch":
            state = powerSGD_hook.PowerSGDState(None, matrix_approximation_rank=2,
                                                start_powerSGD_iter=2)
            hook = powerSGD_hook.powerSGD_hook
        else:
            state = PowerSGDEGState(None, matrix_approximation_rank=2, start_powerSGD_iter=2,
                                    rel_step=2.0 ** -14)
            hook = powersgd_eg_hook
        # one bucket: torch's hook waits on a gloo future inside a gloo callback, which
        # hangs when several buckets are in flight
        model, ddp, opt = make(state, hook, bucket_cap_mb=25.0)
        g = torch.Generator().manual_seed(10 + rank)
        train(ddp, opt, g, 4)
        out[name] = [p.grad.detach().clone() for p in model.parameters()]
    return out


def checkpoints(rank, world, split, total, bucket_caps):
    return [checkpoint(rank, world, split, total, cap) for cap in bucket_caps]


def replicas_and_torch(rank, world, steps, rank_r):
    return replicas(rank, world, steps, rank_r), against_torch(rank, world)


def checkpoint(rank, world, split, total, bucket_cap_mb):
    """Train ``total`` steps straight, and again with a save and load after ``split``."""
    def run(resume_at):
        state = PowerSGDEGState(matrix_approximation_rank=2, start_powerSGD_iter=2, rate=3.0)
        model, ddp, opt = make(state, powersgd_eg_hook, bucket_cap_mb)
        g = torch.Generator().manual_seed(10 + rank)
        if resume_at is None:
            train(ddp, opt, g, total)
            return flat(model), state.stats.total["bytes_sent"]
        train(ddp, opt, g, resume_at)
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                    "hook": state.state_dict(), "g": g.get_state()}, buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
        state2 = PowerSGDEGState(matrix_approximation_rank=2, start_powerSGD_iter=2, rate=3.0)
        model2, ddp2, opt2 = make(state2, powersgd_eg_hook, bucket_cap_mb)
        model2.load_state_dict(saved["model"])
        opt2.load_state_dict(saved["opt"])
        state2.load_state_dict(saved["hook"])
        g.set_state(saved["g"])
        train(ddp2, opt2, g, total - resume_at)
        return flat(model2), state2.stats.total["bytes_sent"]

    return run(None), run(split)


def hostile(rank, world):
    """A corrupt frame, then (with a fresh model) a lying size, in one process group."""
    return corrupt_frame(rank, world, 1), lying_size(rank, world)


def corrupt_frame(rank, world, bad_rank):
    """``bad_rank`` flips a byte of every frame it sends; every rank's backward raises
    FrameError (its own type), and nothing hangs."""
    state = PowerSGDEGState(matrix_approximation_rank=1, start_powerSGD_iter=2)
    model, ddp, opt = make(state, powersgd_eg_hook)
    g = torch.Generator().manual_seed(10 + rank)
    train(ddp, opt, g, 3)
    if rank == bad_rank:
        orig = dist.all_to_all_single

        def flipping(out, inp, *a, **kw):
            inp = inp.clone()
            if inp.numel() > 40:
                inp[30] ^= 0x5A
            return orig(out, inp, *a, **kw)

        dist.all_to_all_single = flipping
    try:
        train(ddp, opt, g, 1)
    except FrameError as e:
        return ("FrameError", str(e))
    finally:
        if rank == bad_rank:
            dist.all_to_all_single = orig
    return ("no error", None)


def lying_size(rank, world):
    """Rank 1 announces a frame size no valid frame has: every rank raises FrameError
    before any receive is sized from it."""
    state = PowerSGDEGState(matrix_approximation_rank=1, start_powerSGD_iter=2)
    model, ddp, opt = make(state, powersgd_eg_hook)
    g = torch.Generator().manual_seed(10 + rank)
    train(ddp, opt, g, 3)
    orig = ggcomm.exchange.all_gather
    calls = [0]

    def lying(t, group, dev):
        calls[0] += 1
        if rank == 1 and calls[0] == 2:  # the sizes of the first coded sum
            t = t.clone()
            t[0] = 1 << 40
        return orig(t, group, dev)

    ggcomm.exchange.all_gather = lying
    try:
        train(ddp, opt, g, 1)
    except FrameError as e:
        return ("FrameError", str(e))
    finally:
        ggcomm.exchange.all_gather = orig
    return ("no error", None)


def rans_pair(rank, world, steps):
    """rans=False then rans=True at a step of 1.8 RMS, on a net wide enough for factors of
    several thousand elements: the parameters and the bytes the hook counted."""
    out = {}
    for rans in (False, True):
        state = PowerSGDEGState(matrix_approximation_rank=4, start_powerSGD_iter=2,
                                rel_step=1.8, rans=rans)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 4096), nn.ReLU(), nn.Linear(4096, 10))
        ddp = DDP(model, bucket_cap_mb=1)
        state.register(ddp)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(10 + rank)
        train(ddp, opt, g, steps)
        out[rans] = dict(params=flat(model), sent=state.stats.total["bytes_sent"])
    return out
