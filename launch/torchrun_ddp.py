"""The plain torchrun recipe of the README: DDP with ggcomm's hook and per-rank checkpoints.

    torchrun --nproc_per_node=2 launch/torchrun_ddp.py 30   # again with 60: resumes
"""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ggcomm.ddp import GGCommState

dist.init_process_group("gloo")  # "nccl" on GPUs (and model.to(device) before DDP)
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = DDP(nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 1)))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
state = GGCommState(rate=3.0)
state.register(model)

start, steps = 0, int(sys.argv[1])
ckpt = f"ckpt-rank{rank}.pt"  # residuals are per rank: each rank saves and loads its own
if os.path.exists(ckpt):
    ck = torch.load(ckpt)
    model.module.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    state.load_state_dict(ck["ggcomm"])  # after state.register(model)
    start = ck["step"]

w = torch.randn(32, 1, generator=torch.Generator().manual_seed(1))
for step in range(start, steps):
    g = torch.Generator().manual_seed(step * world + rank)  # this rank's batch
    x = torch.randn(64, 32, generator=g)
    loss = nn.functional.mse_loss(model(x), torch.tanh(x @ w))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 10 == 0 or step == steps - 1:
        print(f"rank {rank} step {step} loss {loss.item():.4f}", flush=True)

torch.save({"model": model.module.state_dict(), "opt": opt.state_dict(),
            "ggcomm": state.state_dict(), "step": steps}, ckpt)
total = state.stats.summary()["total"]
print(f"rank {rank}: {total['bytes_sent']:.0f} bytes sent, "
      f"{total['ratio']:.1f}x fewer than fp32 allreduce", flush=True)
dist.destroy_process_group()
