"""Per-rank code for test_frameworks.py, run under torchrun: ``framework_workers.py MODE DIR ...``.

Each mode trains a few steps the way a framework's own option for comm hooks suggests and
writes ``DIR/rank{r}.json``: what ggcomm's state counted and whether DDP holds a comm hook.
``TORCHRUN_SCRIPT`` is the plain torchrun recipe of the README (``launch/torchrun_ddp.py``),
run as it stands.
"""

import json
import os
import sys
from pathlib import Path

LAUNCH = Path(__file__).resolve().parent.parent / "launch"

TORCHRUN_SCRIPT = (LAUNCH / "torchrun_ddp.py").read_text()


def _report(out: str, rank: int, **fields) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump({"rank": rank, **fields}, fh)


def lightning_strategy_kwargs(out: str, accelerator: str = "cpu", devices: str = "2",
                              with_callback: str = "", steps: int = 5) -> None:
    """Lightning's own option: DDPStrategy(ddp_comm_state=..., ddp_comm_hook=gg_hook), and with
    ``with_callback`` the recipe's GGCommCallback on the same state as well."""
    import lightning as L
    import torch
    from lightning.pytorch.strategies import DDPStrategy

    sys.path.insert(0, str(LAUNCH))
    from lightning_ddp import GGCommCallback, Regression, dataset

    from ggcomm.ddp import GGCommState, gg_hook

    class CountHooks(L.Callback):
        """How many comm hooks the DDP module holds (DDP's private list, read in tests only)."""

        hooks = None

        def on_train_batch_end(self, trainer, *args):
            self.hooks = len(trainer.strategy.model._comm_hooks)

    L.seed_everything(0)
    state = GGCommState(rate=3.0)
    strategy = DDPStrategy(ddp_comm_state=state, ddp_comm_hook=gg_hook)
    count = CountHooks()
    callbacks = [GGCommCallback(state), count] if with_callback else [count]
    trainer = L.Trainer(accelerator=accelerator, devices=int(devices), strategy=strategy,
                        max_steps=steps, callbacks=callbacks, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    model = Regression()
    trainer.fit(model, torch.utils.data.DataLoader(dataset(), batch_size=64, shuffle=True))
    _report(out, trainer.global_rank, world=trainer.world_size,
            device=str(trainer.strategy.root_device), losses=model.losses,
            stats=state.stats.summary()["total"], comm_hooks=count.hooks)


def accelerate_kwargs(out: str, steps: int = 5) -> None:
    """Accelerate's own option: DistributedDataParallelKwargs(comm_hook=gg_hook)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from torch import nn

    from ggcomm.ddp import GGCommState, gg_hook

    sys.path.insert(0, str(LAUNCH))
    from accelerate_ddp import dataset

    torch.manual_seed(0)
    state = GGCommState(rate=3.0)  # nowhere to pass it: comm_state_option is for PowerSGD
    accelerator = Accelerator(cpu=True, kwargs_handlers=[
        DistributedDataParallelKwargs(comm_hook=gg_hook)])
    model = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(dataset(), batch_size=64, shuffle=True)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    losses = []
    for _, (x, y) in zip(range(steps), loader, strict=False):
        loss = nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    _report(out, accelerator.process_index, world=accelerator.num_processes,
            ddp=isinstance(model, torch.nn.parallel.DistributedDataParallel), losses=losses,
            stats=state.stats.summary()["total"], comm_hooks=len(model._comm_hooks))  # private
    accelerator.end_training()


MODES = {"lightning-strategy-kwargs": lightning_strategy_kwargs,
         "accelerate-kwargs": accelerate_kwargs}

if __name__ == "__main__":
    MODES[sys.argv[1]](*sys.argv[2:])
