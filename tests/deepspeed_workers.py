"""Rank functions for tests/test_deepspeed.py: a 2-stage DeepSpeed pipeline on gloo."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from ggcomm.tools.workload import GPT, ByteDataset, GPTConfig, gpt_layers, lm_loss


def init_deepspeed(rank: int, world: int):
    os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE="1")
    import deepspeed
    import deepspeed.comm.torch

    # DeepSpeed's first init JIT-compiles a shared-memory op (~50 s) that gloo on CPU
    # does not use.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed


def pipeline_engine(deepspeed, seed: int = 0, micro_batches: int = 4):
    from deepspeed.pipe import PipelineModule

    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32))
    module = PipelineModule(layers=gpt_layers(gpt), num_stages=2, loss_fn=lm_loss,
                            partition_method="uniform")
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": micro_batches,
        "optimizer": {"type": "Adam", "params": {"lr": 3e-3, "torch_adam": True}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(model=module, config=config,
                                      model_parameters=[p for p in module.parameters()
                                                        if p.requires_grad])
    return engine


def batches(seed: int = 0):
    data = ByteDataset.from_stdlib(block_size=32, max_bytes=400_000)
    g = torch.Generator().manual_seed(seed)
    while True:
        yield data.batch("train", 4, g)


def train(rank: int, world: int, mode: str, steps: int) -> dict:
    """mode: "plain" (DeepSpeed's own p2p) or "gg" (the plugin, default rate)."""
    deepspeed = init_deepspeed(rank, world)
    from deepspeed.runtime.pipe import p2p

    import ggcomm.deepspeed as ggds

    engine = pipeline_engine(deepspeed)
    original = (p2p.send, p2p.recv)
    plugin = ggds.enable(engine) if mode == "gg" else None
    it = batches()
    losses = [float(engine.train_batch(data_iter=it)) for _ in range(steps)]
    out = {"losses": losses, "stage": engine.stage_id}
    if plugin is not None:
        out["stats"] = plugin.stats.summary()
        plugin.disable()
        out["restored"] = (p2p.send, p2p.recv) == original
        # DeepSpeed's own path still trains after disabling
        out["after"] = float(engine.train_batch(data_iter=it))
    dist.barrier()
    return out


def misuse(rank: int, world: int) -> list[str]:
    deepspeed = init_deepspeed(rank, world)
    import ggcomm.deepspeed as ggds

    engine = pipeline_engine(deepspeed)
    errors = []
    try:
        ggds.enable(torch.nn.Linear(2, 2))
    except TypeError as e:
        errors.append(str(e))
    with ggds.compressed(engine, rel_step=0.1) as plugin:
        try:
            ggds.enable(engine)
        except RuntimeError as e:
            errors.append(str(e))
        engine.train_batch(data_iter=batches())
        errors.append(f"enabled={plugin.enabled}")
    errors.append(f"enabled={plugin.enabled}")
    dist.barrier()
    return errors
