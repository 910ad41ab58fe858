"""PyTorch Lightning with ggcomm's DDP hook, on CPU or CUDA.

    torchrun --nproc_per_node=2 launch/lightning_ddp.py --accelerator cpu --devices 2
    python launch/lightning_ddp.py --accelerator cpu --devices 2   # Lightning starts the ranks
    torchrun --nproc_per_node=8 launch/lightning_ddp.py --accelerator gpu --devices 8

``DDPStrategy(ddp_comm_state=..., ddp_comm_hook=...)`` registers a hook only when the device is
CUDA (``DDPStrategy._register_ddp_hooks``) and trains uncompressed elsewhere, silently. The
callback below registers ggcomm's hook on the DDP module Lightning built, whatever the device:
Lightning calls ``on_fit_start`` after it has wrapped the model and before the first backward.
"""

import argparse

import lightning as L
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ggcomm.ddp import GGCommState
from ggcomm.tools.workload import recipe_report
from ggcomm.tools.workload import regression_dataset as dataset


class GGCommCallback(L.Callback):
    """Register ggcomm's DDP hook on the model Lightning wrapped in DDP (CPU and CUDA)."""

    def __init__(self, state: GGCommState):
        self.state = state

    def on_fit_start(self, trainer, pl_module):  # after the DDP wrap, before any backward
        if isinstance(trainer.strategy.model, DistributedDataParallel):
            self.state.register(trainer.strategy.model)


class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                                 nn.Linear(256, 1))
        self.losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="auto")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rate", type=float, default=3.0)
    p.add_argument("--json", metavar="DIR", help="write each rank's losses and stats there")
    args = p.parse_args()
    devices = int(args.devices) if args.devices.isdigit() else args.devices

    L.seed_everything(0)
    state = GGCommState(rate=args.rate)
    trainer = L.Trainer(accelerator=args.accelerator, devices=devices, strategy="ddp",
                        max_steps=args.steps, callbacks=[GGCommCallback(state)], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)
    model = Regression()
    trainer.fit(model, torch.utils.data.DataLoader(dataset(), batch_size=64, shuffle=True))

    recipe_report(state.stats.summary()["total"], trainer.global_rank, model.losses, args.json,
                  world=trainer.world_size, device=str(trainer.strategy.root_device))

if __name__ == "__main__":
    main()
