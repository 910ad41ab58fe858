"""Rank functions for tests/test_fsdp.py (spawned processes import them from here)."""

from __future__ import annotations

import dist_utils
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import ggcomm.fsdp
from ggcomm import codec

WIDTH = 48


def model(seed: int = 0, mp: MixedPrecisionPolicy | None = None) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(16, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH), nn.GELU(),
                      nn.Linear(WIDTH, 4))
    kw = {} if mp is None else {"mp_policy": mp}
    for layer in (m[0], m[2], m[4]):
        fully_shard(layer, **kw)
    fully_shard(m, **kw)
    return m


TEACHER = torch.randn(16, 4, generator=torch.Generator().manual_seed(12345))


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable task: targets from a fixed linear teacher."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(32, 16, generator=g)
    return x, torch.tanh(x @ TEACHER)


def record(handle: ggcomm.fsdp.GGFSDP) -> list:
    """Wrap the handle's reduce-scatter to keep (key, input, output) of every call."""
    calls = []
    real = handle.reduce_scatter

    def wrapped(key, output, input, group):
        x = input.detach().float().clone()
        real(key, output, input, group)
        calls.append((key, x, output.detach().float().clone()))

    handle.reduce_scatter = wrapped
    return calls


def exact_sums(rank, world, step):
    """Step mode without error feedback: every reduce-scatter output must be
    float32(sum of rint(x / step) over ranks * step); returns the calls to check. Then
    gradient accumulation: two micro-batches per step with set_requires_gradient_sync(False)
    on the first, one reduce-scatter per unit of the accumulated gradient."""
    m = model()
    gg = ggcomm.fsdp.compress(m, step=step, error_feedback=False)
    calls = record(gg)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    with dist_utils.ByteCounter(world) as counter:
        for i in range(3):
            x, y = batch(rank, i)
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
            opt.zero_grad()
        x, y = batch(rank, 99)
        nn.functional.mse_loss(m(x), y).backward()
    shard = m[0].weight.grad.to_local().clone()
    stats = gg.stats.summary()["total"]
    stats["counted"] = (counter.sent, counter.received)
    opt.zero_grad()
    calls = list(calls)  # the wrapper below records into its own list (and this one's)
    accumulated = record(gg)
    for i in range(2):
        m.set_requires_gradient_sync(i == 1)
        x, y = batch(rank, 200 + i)
        nn.functional.mse_loss(m(x), y).backward()
    # non-finite gradients travel exactly and propagate: NaN and inf from rank 0
    chunk = 8
    probe = torch.full((world * chunk,), 0.25)
    if rank == 0:
        probe[1] = float("nan")
        probe[chunk + 2] = float("inf")
    out = torch.empty(chunk)
    gg.reduce_scatter("probe", out, probe, dist.group.WORLD)
    return {"calls": calls, "first_shard": shard, "stats": stats,
            "accumulated": [c for c in accumulated if c[0] != "probe"], "probe": out}


def fit(rank, m, steps):
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for i in range(steps):
        x, y = batch(rank, i)
        loss = nn.functional.mse_loss(m(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def train(rank, world, steps, settings, mp=None, seed=0, plain=False):
    """Train a few steps; the local shards of every parameter and the handle's counters
    (and, with ``plain``, the losses of the same training with FSDP's own reduce-scatter)."""
    policy = None if mp is None else MixedPrecisionPolicy(param_dtype=getattr(torch, mp),
                                                          reduce_dtype=getattr(torch, mp))
    m = model(seed, policy)
    gg = ggcomm.fsdp.compress(m, **settings)
    with dist_utils.ByteCounter(world) as c:
        losses = fit(rank, m, steps)
    total = gg.stats.summary()["total"]
    return {"losses": losses, "counted": (c.sent, c.received),
            "reported": (total["bytes_sent"], total["bytes_received"]), "total": total,
            "shards": [p.to_local().detach().clone() for p in m.parameters()],
            "plain": fit(rank, model(seed), steps) if plain else None}


def resume(rank, world, path, split):
    """Train `split` steps, checkpoint (model and optimizer with torch.distributed.checkpoint,
    the handle with torch.save per rank), train 3 more; then a fresh model and handle load
    the checkpoint and train the same 3: both runs' shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def run(m, opt, steps, start):
        for i in range(start, start + steps):
            x, y = batch(rank, i)
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
            opt.zero_grad()

    settings = {"rate": 3.0, "warmup_iters": 2}
    m = model()
    gg = ggcomm.fsdp.compress(m, **settings)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    run(m, opt, split, 0)
    msd, osd = get_state_dict(m, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    torch.save(gg.state_dict(), f"{path}/ggcomm-rank{rank}.pt")
    run(m, opt, 3, split)
    first = [p.to_local().detach().clone() for p in m.parameters()]

    m2 = model(seed=5)  # other initial weights: everything must come from the checkpoint
    gg2 = ggcomm.fsdp.compress(m2, **settings)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    msd2, osd2 = get_state_dict(m2, opt2)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(m2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    gg2.load_state_dict(torch.load(f"{path}/ggcomm-rank{rank}.pt", weights_only=True))
    run(m2, opt2, 3, split)
    second = [p.to_local().detach().clone() for p in m2.parameters()]
    return first, second


def _step_error(m, rank):
    """(type name, message) of what a training step of m raises, None if nothing."""
    x, y = batch(rank, 0)
    try:
        nn.functional.mse_loss(m(x), y).backward()
    except Exception as e:  # noqa: BLE001 - the type goes back to the test
        return type(e).__name__, str(e)
    return None


def corrupt(rank, world):
    """Rank 0 flips a payload byte of the frame it sends to rank 1: every rank raises
    FrameError from backward (the type reaches the training loop)."""
    m = model()
    ggcomm.fsdp.compress(m, rate=3.0)
    if rank == 0:
        real = codec.encode_feedback
        calls = []

        def bad(*args, **kw):
            frame, st = real(*args, **kw)
            calls.append(1)
            if len(calls) == 2:  # the frame for rank 1
                b = frame.buffer.clone()
                b[len(b) - 10] ^= 0x55
                frame = codec.Frame(b, frame._h)
            return frame, st

        codec.encode_feedback = bad
    return _step_error(m, rank)


def corrupt_weights(rank, world, how):
    """With compressed weights, rank 0's all-gather frame is corrupt ("flip": a payload byte)
    or of another dtype ("float64"): every rank raises FrameError from the forward pass."""
    m = model()
    ggcomm.fsdp.compress(m, rate=3.0, weights="eg")
    if rank == 0:
        real = codec.encode

        def bad(x, *args, **kw):
            if how == "float64":
                return real(x.double(), *args, **kw)
            frame = real(x, *args, **kw)
            b = frame.buffer.clone()
            b[len(b) - 10] ^= 0x55
            return codec.Frame(b, frame._h)

        codec.encode = bad
    return _step_error(m, rank)


def train_script(rank, world, reduce):
    """launch/train_fsdp.py's code, a few steps of the GPT."""
    from ggcomm.tools import train_fsdp

    args = train_fsdp.parse_args(["--reduce", reduce, "--steps", "3", "--block-size", "32",
                                  "--corpus-bytes", "200000", "--eval-batches", "1",
                                  "--batch-size", "4"])
    return train_fsdp.train(args)


def weights_rounded(rank, world, formats):
    return {fmt: _weights_rounded(rank, world, fmt) for fmt in formats}


def _weights_rounded(rank, world, fmt):
    """With compressed weights: after a step the forward pass sees every rank's shard rounded
    (RF8: exactly rf8.quantize of the full parameter), and the master shards stay exact."""
    from ggcomm import rf8

    m = model()
    gg = ggcomm.fsdp.compress(m, rate=3.0, weights=fmt)
    seen = {}
    m[2].register_forward_pre_hook(lambda mod, inp: seen.__setitem__(
        "w", mod.weight.detach().clone() if not hasattr(mod.weight, "to_local")
        else mod.weight.full_tensor().detach().clone()))
    with dist_utils.ByteCounter(world) as c:
        losses = fit(rank, m, 3)
    total = gg.stats.summary()
    full = m[2].weight.full_tensor().detach().clone()  # the exact master weights
    bias = m[2].bias.full_tensor().detach().clone()
    x, _ = batch(rank, 0)
    m(x)  # forward sees the current masters, rounded
    out = {"seen": seen["w"], "master": full, "losses": losses,
           "counted": (c.sent, c.received),
           "reported": (total["total"]["bytes_sent"], total["total"]["bytes_received"]),
           "weights": total["weights"], "gradients": total["gradients"]}
    if fmt == "rf8":  # each rank's all-gather input: its weight rows, then its bias part
        parts = []
        for w, b in zip(full.chunk(world), bias.chunk(world), strict=True):
            flat = rf8.quantize(torch.cat([w.reshape(-1), b]))
            parts.append(flat[: w.numel()].view(w.shape))
        out["want"] = torch.cat(parts)
    return out
