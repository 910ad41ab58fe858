"""Hugging Face Accelerate with ggcomm's DDP hook.

    accelerate launch --multi_gpu --num_processes 8 launch/accelerate_ddp.py        # GPUs
    torchrun --nproc_per_node=2 launch/accelerate_ddp.py --cpu                       # CPU, gloo

``DistributedDataParallelKwargs(comm_hook=...)`` takes only Accelerate's names for PyTorch's
built-in hooks (``DDPCommunicationHookType``); any other value registers nothing. On a
multi-process run ``accelerator.prepare`` returns the model wrapped in DDP: register on that.
Without ``cpu=True`` a CPU-only machine gets ``DistributedType.NO``: every process trains alone.
"""

import argparse

import torch
from accelerate import Accelerator
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ggcomm.ddp import GGCommState
from ggcomm.tools.workload import recipe_report
from ggcomm.tools.workload import regression_dataset as dataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="train on CPU (gloo)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rate", type=float, default=3.0)
    p.add_argument("--json", metavar="DIR", help="write each rank's losses and stats there")
    args = p.parse_args()

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=args.cpu)
    model = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                          nn.Linear(256, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=64, shuffle=True)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    state = GGCommState(rate=args.rate)
    if isinstance(model, DistributedDataParallel):  # a multi-process run
        state.register(model)

    losses = []
    while len(losses) < args.steps:
        for x, y in loader:
            loss = nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            if len(losses) == args.steps:
                break

    recipe_report(state.stats.summary()["total"], accelerator.process_index, losses, args.json,
                  world=accelerator.num_processes,
                  distributed_type=str(accelerator.distributed_type),
                  device=str(accelerator.device))
    accelerator.end_training()


if __name__ == "__main__":
    main()
