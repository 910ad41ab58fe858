"""Rank functions for tests/test_pipelining.py (spawned processes import them from here)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from ggcomm.pipeline import PipeComm
from ggcomm.pipelining import CompressedPipelineStage, LinkOutOfStepError, compress_stage

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
MULTI = {"interleaved": ScheduleInterleaved1F1B}  # two stages a rank: 0 and 2, 1 and 3
STEPS = 20
MULTI_STEPS = 5
MICROBATCHES = 4
BATCH = 64  # 16 rows a micro-batch: 16 x 128 = 2048 elements an activation
IN, HIDDEN, OUT = 16, 128, 4
# where model() is cut into 2 or 4 stages (each cut carries a HIDDEN-wide activation)
CUTS = {2: (0, 2, 7), 4: (0, 2, 4, 6, 7)}


def model(num_stages: int) -> list[nn.Module]:
    """The same seeded MLP, cut into num_stages stage modules."""
    torch.manual_seed(0)
    full = nn.Sequential(
        nn.Linear(IN, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, OUT),
    )
    cuts = CUTS[num_stages]
    return [full[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def batches(steps: int = STEPS):
    """A regression task the model learns within STEPS steps: y = tanh(x A), A fixed."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(IN, OUT, generator=g) / 4
    for _ in range(steps):
        x = torch.randn(BATCH, IN, generator=g)
        yield x, torch.tanh(x @ a)


def count_wire(counter: dict) -> None:
    """Count the bytes of every tensor this process hands to torch.distributed p2p.

    As pipeline_workers.count_wire, with two differences that torch's internals need:
    distributed_c10d's own names are wrapped too (P2POp, which the stages build, accepts
    only the functions it finds there), and only the outermost call counts (c10d's send
    and recv are isend and irecv plus a wait).
    """
    depth = [0]
    for name in ("send", "isend", "recv", "irecv"):
        orig = getattr(c10d, name)

        def wrapped(tensor, *a, _orig=orig, _name=name, **kw):
            if depth[0] == 0:
                key = "sent" if _name in ("send", "isend") else "received"
                counter[key] = counter.get(key, 0) + tensor.numel() * tensor.element_size()
            depth[0] += 1
            try:
                return _orig(tensor, *a, **kw)
            finally:
                depth[0] -= 1

        setattr(dist, name, wrapped)
        setattr(c10d, name, wrapped)


def wire_totals(counter: dict, comm: PipeComm) -> dict:
    """Bytes handed to torch.distributed so far, and what comm.stats says it sent/received."""
    c = comm.stats.counts
    stats = {
        side: sum(c[d][f"bytes_{side}"] + c[d][f"passthrough_bytes_{side}"] for d in c)
        for side in ("sent", "received")
    }
    return {"wire": {side: counter.get(side, 0) for side in ("sent", "received")}, "stats": stats}


def train(
    rank: int,
    schedule: str,
    comm: PipeComm | None,
    wrap: bool = False,
    counter: dict | None = None,
    keep: list | None = None,
    steps: int = STEPS,
    static: bool = False,
) -> dict:
    """Train model() cut into stages for `steps` steps; comm=None: torch's own stages.

    wrap: build torch's stages and convert them with compress_stage (else build
    CompressedPipelineStage). counter: a count_wire counter to compare with comm.stats.
    keep: a list to append this rank's stages to. static: give the stages example inputs
    and outputs (torch's static mode: no metadata exchange on the first step).
    """
    multi = schedule in MULTI
    num_stages = 4 if multi else 2
    parts = model(num_stages)
    mine = [rank, rank + 2] if multi else [rank]
    device = torch.device("cpu")
    stages = []
    rows = BATCH // MICROBATCHES
    for i in mine:
        meta = {}
        if static:
            widths = [IN] + [HIDDEN] * (num_stages - 1) + [OUT]
            meta = {
                "input_args": torch.empty(rows, widths[i], requires_grad=i > 0),
                "output_args": torch.empty(rows, widths[i + 1], requires_grad=True),
            }
        if comm is None or wrap:
            stage = PipelineStage(parts[i], i, num_stages, device, **meta)
            if wrap:
                stage = compress_stage(stage, comm)
        else:
            stage = CompressedPipelineStage(parts[i], i, num_stages, device, comm=comm, **meta)
        stages.append(stage)
    if multi:
        sched = MULTI[schedule](stages, MICROBATCHES, loss_fn=nn.MSELoss())
    else:
        sched = SCHEDULES[schedule](stages[0], MICROBATCHES, loss_fn=nn.MSELoss())
    params = [p for i in mine for p in parts[i].parameters()]
    opt = torch.optim.SGD(params, lr=0.2)
    losses, first = [], None
    for i, (x, y) in enumerate(batches(steps)):
        opt.zero_grad()
        mb_losses: list = []
        if rank == 0:
            sched.step(x)
        else:
            sched.step(target=y, losses=mb_losses)
            losses.append(float(torch.stack(mb_losses).detach().mean()))
        opt.step()
        if i == 0 and counter is not None:
            # the first step also runs shape inference (a warm-up vote and metadata
            # objects, straight through torch.distributed): count from the second on
            first = wire_totals(counter, comm)
    out = {
        "losses": losses,
        "params": [p.detach().clone() for p in params],
        "class": type(stages[0]).__name__,
    }
    if comm is not None:
        for stage in stages:
            stage.wait_sends()
        out["stats"] = comm.stats.summary()
    if counter is not None:
        last = wire_totals(counter, comm)
        out["counted"] = {
            k: {side: last[k][side] - first[k][side] for side in last[k]} for k in last
        }
    if keep is not None:
        keep.extend(stages)
    return out


def misuse(rank: int, stage: PipelineStage) -> list[str]:
    """What the adapter says to misuse, one error line each (stage: a trained stage)."""
    errors = []

    def expect(exc: type, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except exc as e:
            errors.append(f"{type(e).__name__}: {e}")
        else:
            errors.append(f"no {exc.__name__}")

    submod = model(2)[rank]
    cpu = torch.device("cpu")
    other = dist.new_group([0, 1])  # a group of its own: every rank calls this
    expect(TypeError, compress_stage, submod)
    expect(TypeError, CompressedPipelineStage, submod, rank, 2, cpu, comm="rate=4")
    expect(ValueError, CompressedPipelineStage, submod, rank, 2, cpu, comm=PipeComm(other))
    expect(ValueError, CompressedPipelineStage, submod, rank, 2, cpu, tag_base=-1)
    plain = PipelineStage(submod, rank, 2, cpu)
    expect(ValueError, compress_stage, plain, PipeComm(other))
    errors.append(f"class after a failed conversion: {type(plain).__name__}")
    expect(ValueError, compress_stage, compress_stage(plain))
    # a receive asked for and never consumed: the next step must not start
    if stage.is_last:
        stage.get_fwd_recv_ops(1)
    else:
        stage.get_bwd_recv_ops(2)
    expect(LinkOutOfStepError, stage.clear_runtime_states)
    return errors


def train_all(rank: int, world: int) -> dict:
    out: dict = {"plain": {}, "close": {}, "rate": {}}
    for name in SCHEDULES:  # the reference: torch's own stages
        out["plain"][name] = train(rank, name, None)
    for name in SCHEDULES:  # a fine step: should follow the reference closely
        out["close"][name] = train(rank, name, PipeComm(rel_step=0.01), wrap=name == "1f1b")
    # two stages a rank: activations and gradients cross between the same two ranks both
    # ways, in streams of their own
    for name in MULTI:
        out["plain"][name] = train(rank, name, None, steps=MULTI_STEPS)
        out["close"][name] = train(rank, name, PipeComm(rel_step=0.01), steps=MULTI_STEPS)
    counter: dict = {}
    count_wire(counter)
    kept: list = []
    for name in SCHEDULES:  # GPipe in torch's static mode, 1F1B with shape inference
        out["rate"][name] = train(
            rank, name, PipeComm(rate=4.0), counter=counter, keep=kept, static=name == "gpipe"
        )
    out["misuse"] = misuse(rank, kept[0])
    return out
