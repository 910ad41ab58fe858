"""Rank functions for tests/test_ddp.py (spawned processes import them from here)."""

from __future__ import annotations

import io
import pickle

import dist_utils
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ggcomm.codec
from ggcomm.ddp import GGCommState, SettingsMismatchError, gg_hook


class Net(nn.Module):
    def __init__(self, dtype=torch.float32, unused_branch: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.LayerNorm(256),
                                  nn.Linear(256, 10)).to(dtype)
        self.unused = nn.Linear(10, 10).to(dtype) if unused_branch else None

    def forward(self, x):
        return self.body(x)


def make(rank: int, dtype=torch.float32, unused_branch=False, bucket_cap_mb=0.05, **ddp_kw):
    torch.manual_seed(0)
    model = Net(dtype, unused_branch)
    ddp = DDP(model, bucket_cap_mb=bucket_cap_mb, **ddp_kw)
    return model, ddp


def batch(g: torch.Generator, dtype=torch.float32):
    return torch.randn(64, 32, generator=g).to(dtype), torch.randint(0, 10, (64,), generator=g)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def train(ddp, opt, g, steps, dtype=torch.float32):
    losses = []
    for _ in range(steps):
        x, y = batch(g, dtype)
        loss = nn.functional.cross_entropy(ddp(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# --------------------------------------------------------------------------- workers


def identical_params_many(rank, world, cases):
    return [identical_params(rank, world, *c) for c in cases]


def identical_params(rank, world, exchange, steps, hook, dtype_name):
    """hook: False (plain DDP), True (the gg hook at rate 3) or the hook's settings;
    the last item returned counts the rANS (mode 4) blocks of the frames this rank sent."""
    dtype = getattr(torch, dtype_name)
    model, ddp = make(rank, dtype)
    state = None
    if hook:
        state = GGCommState(exchange=exchange, **({"rate": 3.0} if hook is True else hook))
        state.register(ddp)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(100 + rank)
    encode_feedback, modes = ggcomm.codec.encode_feedback, []

    def recording_encode(*args, **kw):
        frame, stats = encode_feedback(*args, **kw)
        modes.extend(b.mode for b in ggcomm.codec.inspect(frame).blocks)
        return frame, stats

    ggcomm.codec.encode_feedback = recording_encode
    try:
        losses = train(ddp, opt, g, steps, dtype)
    finally:
        ggcomm.codec.encode_feedback = encode_feedback
    return (flat_params(model), losses, state.stats.summary() if state else None,
            modes.count("rans"))


def bytes_counted(rank, world, exchanges):
    return [_bytes_counted(rank, world, ex) for ex in exchanges]


def _bytes_counted(rank, world, exchange):
    model, ddp = make(rank)
    counter = dist_utils.ByteCounter(world)
    counter.install()
    try:
        state = GGCommState(rel_step=0.3, exchange=exchange, overlap=False)
        state.register(ddp)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        train(ddp, opt, torch.Generator().manual_seed(rank), 6)
    finally:
        counter.uninstall()
    total = state.stats.summary()["total"]
    return counter.sent, counter.received, total["bytes_sent"], total["bytes_received"]


def collectives_per_step(rank, world, exchange, step_drift):
    """(collective calls, buckets) in each of steps 3-5: the steady state."""
    model, ddp = make(rank, bucket_cap_mb=0.01)  # several buckets
    state = GGCommState(rate=3.0, exchange=exchange, step_drift=step_drift)
    state.register(ddp)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(rank)
    train(ddp, opt, g, 2)  # iteration 0 uncompressed, 1 agrees on the first steps
    counter = dist_utils.ByteCounter(world)
    counter.install()
    out = []
    try:
        for _ in range(3):
            counter.calls = 0
            train(ddp, opt, g, 1)
            out.append((counter.calls, len(state.stats.last_buckets)))
    finally:
        counter.uninstall()
    return out


def error_feedback(rank, world, log_path):
    """One gg step: n * average == sum over ranks of (gradient + old residual - new residual)."""
    model, ddp = make(rank)

    class Board:  # the add_scalar interface of a TensorBoard SummaryWriter
        def __init__(self):
            self.scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

    board = Board()
    state = GGCommState(rel_step=0.5, start_iter=0, log_path=log_path, tb_writer=board)
    state.register(ddp)
    g = torch.Generator().manual_seed(rank)
    checks = []
    for _ in range(3):
        x, y = batch(g)
        old = {k: v.clone() for k, v in state.residuals.items()}
        # the local gradient, computed without DDP's reduction
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        local = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        lhs, rhs = [], []
        for name, p in model.named_parameters():
            resid_new = state.residuals[name]
            resid_old = old.get(name, torch.zeros_like(resid_new))
            contrib = local[name].reshape(-1) + resid_old - resid_new
            parts = [torch.empty_like(contrib) for _ in range(world)]
            dist.all_gather(parts, contrib)
            lhs.append(p.grad.reshape(-1) * world)
            rhs.append(torch.stack(parts).double().sum(0).float())
        lhs, rhs = torch.cat(lhs), torch.cat(rhs)
        nonzero_resid = sum(float(v.abs().sum()) for v in state.residuals.values())
        checks.append((float((lhs - rhs).abs().max()), float(rhs.abs().max()), nonzero_resid))
    return checks, board.scalars


def exact_average(rank, world, exchanges):
    return [_exact_average(rank, world, ex) for ex in exchanges]


def _exact_average(rank, world, exchange):
    """The hook's average against the exact mean of the ranks' bucket gradients.

    Iteration 0 is a plain all-reduce (start_iter=1): the bound is float rounding only.
    Iteration 1 is the first compressed one, with zero residuals: each rank sends its
    gradient g_r quantized at the step agreed for its parameter (the same on every rank),
    |g_r - q_r * step| <= step / 2, and the hook writes sum_r(q_r) * step / N, so
    |average - mean_r(g_r)| <= sum_r (step / 2) / N = step / 2 per element.
    Per iteration: (worst error / bound, elements where half the mean exceeds the bound,
    i.e. where an average of the wrong scale would show).
    """
    model, ddp = make(rank, bucket_cap_mb=0.01)  # several buckets
    state = GGCommState(rate=3.0, exchange=exchange, overlap=False)
    steps_coded = []  # per encode call: the step of each element it coded
    encode_feedback = ggcomm.codec.encode_feedback

    def recording_encode(g, resid, steps, segments, **kw):
        steps_coded.append(np.repeat(np.asarray(steps, np.float64), segments))
        return encode_feedback(g, resid, steps, segments, **kw)

    seen = {}  # bucket index: (its local gradients, per-element steps, the hook's average)

    def hook(st, bucket):
        local = bucket.buffer().detach().clone()
        first = len(steps_coded)
        fut = gg_hook(st, bucket)  # overlap=False: the bucket is encoded within this call
        steps = np.concatenate(steps_coded[first:]) if steps_coded[first:] else None
        index = bucket.index()

        def keep(f):
            out = f.value()
            seen[index] = (local, steps, out.detach().clone())
            return out

        return fut.then(keep)

    ddp.register_comm_hook(state, hook)
    g = torch.Generator().manual_seed(11 + rank)
    ggcomm.codec.encode_feedback = recording_encode
    out = []
    try:
        for it in range(2):
            seen.clear()
            x, y = batch(g)
            nn.functional.cross_entropy(ddp(x), y).backward()
            assert state.iteration == it + 1
            assert sum(v[0].numel() for v in seen.values()) == sum(
                p.numel() for p in model.parameters())  # every gradient, in some bucket
            worst, resolved = 0.0, 0
            for index in sorted(seen):
                local, steps, avg = seen[index]
                parts = [torch.empty_like(local) for _ in range(world)]
                dist.all_gather(parts, local)
                grads = torch.stack(parts).double()
                mean, mean_abs = grads.mean(0).numpy(), grads.abs().mean(0).numpy()
                half_step = np.zeros_like(mean) if steps is None else steps / 2
                assert (steps is None) == (it == 0) and half_step.shape == mean.shape
                bound = half_step * (1 + 1e-6) + 1e-6 * mean_abs + 1e-30  # + float rounding
                err = np.abs(avg.double().numpy() - mean)
                worst = max(worst, float(np.max(err / bound)))
                resolved += int(np.sum(np.abs(mean) / 2 > bound))
            out.append((worst, resolved))
    finally:
        ggcomm.codec.encode_feedback = encode_feedback
    return out


def foreign_tag(rank, world, exchanges):
    return [_foreign_tag(rank, world, ex) for ex in exchanges]


def _foreign_tag(rank, world, exchange):
    """Rank 1's frames carry another settings fingerprint than the one the ranks agreed on
    (changed after the first step's agreement): every rank must refuse them rather than sum
    them. Returns the error this rank's backward raised (None if none)."""
    model, ddp = make(rank)
    state = GGCommState(rate=3.0, exchange=exchange, overlap=False)
    state.register(ddp)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(rank)
    train(ddp, opt, g, 1)  # iteration 0: settings agreed, then a plain all-reduce
    assert state.iteration == 1
    if rank == 1:
        state.fingerprint ^= 0x5A5A5A5A  # the tag its frames carry from now on
    x, y = batch(g)
    try:
        nn.functional.cross_entropy(ddp(x), y).backward()
    except Exception as e:  # noqa: BLE001 - the test reads the message
        return f"{type(e).__name__}: {e}"
    return None


def resume(rank, world, cases):
    return [_resume(rank, world, ex, mode) for ex, mode in cases]


def _resume(rank, world, exchange, mode):
    kw = {mode: {"rate": 3.0, "rel_step": 0.3, "step": 0.002}[mode]}
    g = torch.Generator().manual_seed(7 + rank)

    # uninterrupted: 10 steps
    model_a, ddp_a = make(rank)
    st_a = GGCommState(exchange=exchange, **kw)
    st_a.register(ddp_a)
    opt_a = torch.optim.Adam(ddp_a.parameters(), lr=1e-3)
    batches = [batch(g) for _ in range(10)]

    def run(ddp, opt, bs):
        for x, y in bs:
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()

    run(ddp_a, opt_a, batches)

    # 5 steps, checkpoint, a fresh DDP + state + optimizer from it, 5 more steps
    model_b, ddp_b = make(rank)
    st_b = GGCommState(exchange=exchange, **kw)
    st_b.register(ddp_b)
    opt_b = torch.optim.Adam(ddp_b.parameters(), lr=1e-3)
    run(ddp_b, opt_b, batches[:5])
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(),
                "ggcomm": st_b.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf)  # default arguments: weights_only=True
    model_c, ddp_c = make(rank)
    model_c.load_state_dict(ck["model"])
    opt_c = torch.optim.Adam(ddp_c.parameters(), lr=1e-3)
    opt_c.load_state_dict(ck["opt"])
    st_c = GGCommState(exchange=exchange, **kw)
    st_c.load_state_dict(ck["ggcomm"])
    st_c.register(ddp_c)
    run(ddp_c, opt_c, batches[5:])
    # pickling keeps what matters and drops the process group
    st_p = pickle.loads(pickle.dumps(st_b))
    pickled_ok = (st_p.iteration == st_b.iteration and st_p.process_group is None
                  and all(torch.equal(st_p.residuals[k], v) for k, v in st_b.residuals.items()))
    return (torch.equal(flat_params(model_a), flat_params(model_c)),
            float((flat_params(model_a) - flat_params(model_c)).abs().max()), pickled_ok)


def mismatch(rank, world):
    model, ddp = make(rank)
    state = GGCommState(rate=3.0 if rank == 0 else 4.0)
    state.register(ddp)
    x, y = batch(torch.Generator().manual_seed(rank))
    try:
        nn.functional.cross_entropy(ddp(x), y).backward()
    except SettingsMismatchError as e:
        return str(e)
    except RuntimeError as e:  # DDP may wrap the future's exception
        if "settings differ" in str(e):
            return str(e)
        raise
    return None


def nonfinite(rank, world):
    model, ddp = make(rank)
    state = GGCommState(rate=3.0, start_iter=0)
    state.register(ddp)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(rank)
    x, y = batch(g)
    if rank == 0:
        x[0, 0] = float("inf")
    opt.zero_grad()
    nn.functional.cross_entropy(ddp(x), y).backward()
    bad = all(not torch.isfinite(p.grad).all() for p in model.parameters()
              if p.grad is not None and p.dim() > 1)
    scaler_like = any(not torch.isfinite(p.grad).all() for p in model.parameters())
    # the next, clean step is finite again: the residual did not keep the poison
    x, y = batch(g)
    opt.zero_grad()
    nn.functional.cross_entropy(ddp(x), y).backward()
    clean = all(torch.isfinite(p.grad).all() for p in model.parameters())
    return bad, scaler_like, clean


def accumulation_and_unused(rank, world, as_view):
    model, ddp = make(rank, unused_branch=True, find_unused_parameters=True,
                      gradient_as_bucket_view=as_view)
    state = GGCommState(rate=3.0)
    state.register(ddp)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(rank)
    for _ in range(4):
        opt.zero_grad()
        with ddp.no_sync():
            for _ in range(2):
                x, y = batch(g)
                nn.functional.cross_entropy(ddp(x), y).backward()
        x, y = batch(g)
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    return flat_params(model), state.iteration


def static_graph(rank, world):
    model, ddp = make(rank, static_graph=True, gradient_as_bucket_view=True)
    state = GGCommState(rate=3.0)
    state.register(ddp)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    train(ddp, opt, torch.Generator().manual_seed(rank), 5)
    return flat_params(model), state.iteration


def expect_error(fn, *args):
    try:
        fn(*args)
    except (SettingsMismatchError, ValueError) as e:
        return type(e).__name__
    return None


def rate_warmup(rank, world, log_path):
    """Rate mode with a warm-up: the coded bits per element follow the falling target."""
    model, ddp = make(rank, bucket_cap_mb=25)
    state = GGCommState(rate=3.0, warmup_iters=8, warmup_rate=7.0, log_path=log_path)
    state.register(ddp)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    train(ddp, opt, torch.Generator().manual_seed(rank), 20, torch.float32)
    return [state.target_rate(i) for i in range(12)]


def hostile_size(rank, world, exchange):
    """Rank 1 announces a frame of 2**40 bytes: every rank refuses it before receiving."""
    import ggcomm.ddp as ddp_mod

    model, ddp = make(rank)
    state = GGCommState(rate=3.0, exchange=exchange, start_iter=0, overlap=False)
    state.register(ddp)
    if rank == 1:
        orig = ddp_mod.all_gather

        def lying(t, group, dev):
            if t.dtype == torch.float64 and t.numel() > 2:
                t = t.clone()
                t[0] = 2.0**40
            return orig(t, group, dev)

        ddp_mod.all_gather = lying
    x, y = batch(torch.Generator().manual_seed(rank))
    try:
        nn.functional.cross_entropy(ddp(x), y).backward()
    except Exception as e:  # noqa: BLE001 - the test checks the type
        return type(e).__name__, str(e)
    return None, None
