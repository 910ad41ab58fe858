"""Rank functions for tests/test_cuda.py: the transports with CUDA tensors (two gloo ranks
may share one GPU; the frames travel through host memory)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ddp_workers import Net, batch
from torch.nn.parallel import DistributedDataParallel as DDP

from ggcomm.ddp import GGCommState
from ggcomm.pipeline import PipeComm


def ddp_on_device(rank: int, world: int, steps: int, dtype: torch.dtype, device: str) -> dict:
    dev = torch.device(device)
    torch.manual_seed(0)
    model = Net(dtype).to(dev)
    ddp = DDP(model, device_ids=[0] if dev.type == "cuda" else None, bucket_cap_mb=0.05)
    state = GGCommState(rate=4.0)
    state.register(ddp)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(100 + rank)
    losses, grads = [], None
    for _ in range(steps):
        x, y = batch(g, dtype)
        loss = F.cross_entropy(ddp(x.to(dev)).float(), y.to(dev))
        opt.zero_grad()
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters()]).cpu()
        opt.step()
        losses.append(loss.item())
    params = torch.cat([p.detach().float().flatten() for p in model.parameters()]).cpu()
    return {"grads": grads, "params": params, "losses": losses,
            "grad_device": str(next(model.parameters()).grad.device),
            "stats": state.stats.summary()["total"]}


def pipe_on_cuda(rank: int, world: int) -> dict:
    dev = torch.device("cuda", 0)
    comm = PipeComm(rate=4.0)
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)).to(dev)
    if rank == 0:
        comm.send(x, dst=1)
        y = comm.recv(src=1)
        return {"back": y, "device": str(y.device)}  # no out=: decoded on the host (gloo)
    out = torch.empty_like(x)
    got = comm.recv(src=0, out=out)
    comm.send(got * 2, dst=0)
    return {"got": got.cpu(), "same_buffer": got.data_ptr() == out.data_ptr(),
            "err": float((got - x).abs().max()), "rms": float(x.square().mean().sqrt()),
            "stats": comm.stats.summary()["forward"]}
