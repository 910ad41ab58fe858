"""Train the GPT workload as a DeepSpeed pipeline, with or without ggcomm on the stage links.

One pipeline stage per rank (``--nproc_per_node`` stages), gloo on CPU or NCCL on GPUs::

    torchrun --nproc_per_node=2 launch/train_pipe.py --compress gg --rate 3
    torchrun --nproc_per_node=2 launch/train_pipe.py --compress none
    torchrun --nproc_per_node=2 launch/train_pipe.py --rel-step 0.05 --act-lam 0.03

``--act-lam`` puts an ACT tap (:class:`ggcomm.methods.act.ACT`, ``inject=True``: each stage
applies its own boundary's rate gradient, arXiv 2506.00486 section 4.2) on every stage
boundary, the last layer of each stage but the last, so training lowers the bits the link
then sends. ACT's step is relative to the activation's RMS (``--act-rel-step``); it lowers
the link's bits when the link's step is too (``--rel-step``), not under rate control, which
holds the bits and spends ACT's gain on a finer step.

Every step runs ``--micro-batches`` micro-batches through DeepSpeed's pipeline schedule
(``engine.train_batch``). Rank 0 prints the loss, the step time and the bytes per
micro-batch each way across the first stage boundary (activations forward, their gradients
backward), and writes a JSON summary with ``--json``. With ``--compress none`` the bytes
are those of the tensors DeepSpeed sends (counted at ``deepspeed.runtime.pipe.p2p.send``);
with ``gg`` they are what the plugin handed to torch.distributed, headers included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ggcomm.methods.act import ACT
from ggcomm.step_policy import ACT_REL_STEP
from ggcomm.tools.train import draws
from ggcomm.tools.workload import GPT, ByteDataset, GPTConfig, gpt_layers, lm_loss


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compress", choices=("none", "gg"), default="gg")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--rate", type=float, help="target bits per element (default 4)")
    rate.add_argument("--step", type=float, help="fixed quantization step")
    rate.add_argument("--rel-step", type=float, help="step as a multiple of each tensor's RMS")
    p.add_argument("--model", choices=("gpt", "gpt-small"), default="gpt")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--micro-batches", type=int, default=4, help="per step (pipeline depth)")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: as is)")
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--json", metavar="PATH", help="rank 0 writes its summary here")
    g = p.add_argument_group("ACT on the stage boundaries")
    g.add_argument("--act-lam", type=float, default=0.0, help="ACT's lambda (0: no ACT)")
    g.add_argument("--act-rel-step", type=float, default=ACT_REL_STEP,
                   help="ACT's step as a multiple of the activation's RMS")
    g.add_argument("--act-warmup-steps", type=int, default=0,
                   help="steps over which lambda rises from 0")
    return p.parse_args(argv)


def _init_deepspeed(backend: str):
    import deepspeed
    import deepspeed.comm.torch

    # The shared-memory op DeepSpeed JIT-compiles on first init (~50 s) serves CPU
    # collectives within one node; the pipeline's point-to-point traffic does not use it.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=backend)
    return deepspeed


class _CountingSend:
    """Wraps ``p2p.send`` to count the float bytes DeepSpeed sends itself (no plugin)."""

    def __init__(self, p2p: Any):
        self.p2p, self.original = p2p, p2p.send
        self.counts = {"forward": 0.0, "backward": 0.0}

    def __call__(self, tensor: torch.Tensor, dest_stage: int, async_op: bool = False):
        if tensor.is_floating_point():
            me = self.p2p._grid.get_stage_id()
            key = "forward" if dest_stage == me + 1 else "backward"
            self.counts[key] += tensor.numel() * tensor.element_size()
        return self.original(tensor, dest_stage, async_op)


def _engine(args: argparse.Namespace, deepspeed: Any) -> tuple[Any, GPTConfig, ACT | None]:
    """The GPT cut into one pipeline stage per rank, in a DeepSpeed engine with AdamW, and
    the ACT whose taps end every stage but the last (``--act-lam``; else None)."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.utils import partition_uniform

    torch.manual_seed(args.seed)
    config = GPTConfig.small() if args.model == "gpt-small" else GPTConfig()
    config.block_size = args.block_size
    gpt = GPT(config)
    layers = gpt_layers(gpt)
    stages = dist.get_world_size()
    act = None
    if args.act_lam > 0:
        # DeepSpeed divides each micro-batch's loss by the accumulation steps: so does the
        # injected rate gradient
        act = ACT(args.act_lam, rel_step=args.act_rel_step, inject=True,
                  inject_scale=1.0 / args.micro_batches, warmup_steps=args.act_warmup_steps)
        # the same layer count (so the same "uniform" cut), each boundary layer tapped
        bounds = partition_uniform(len(layers), stages)
        for i, end in enumerate(bounds[1:-1]):
            layers[end - 1] = torch.nn.Sequential(layers[end - 1], act.tap(f"stage{i}"))
    module = PipelineModule(layers=layers, num_stages=stages,
                            loss_fn=lm_loss, partition_method="uniform")
    ds_config = {
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": args.micro_batches,
        "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "torch_adam": True}},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(
        model=module, config=ds_config,
        model_parameters=[p for p in module.parameters() if p.requires_grad])
    return engine, config, act


class _Links:
    """What crosses this rank's stage links: ggcomm's plugin (``--compress gg``) or a
    count of DeepSpeed's own sends (``none``)."""

    def __init__(self, args: argparse.Namespace, engine: Any) -> None:
        from deepspeed.runtime.pipe import p2p

        self.p2p = p2p
        self.plugin = self.counter = None
        if args.compress == "gg":
            import ggcomm.deepspeed as ggds

            kw = {k: v for k, v in (("rate", args.rate), ("step", args.step),
                                    ("rel_step", args.rel_step)) if v is not None}
            self.plugin = ggds.enable(engine, **kw)
        else:
            self.counter = _CountingSend(p2p)
            p2p.send = self.counter

    def sent(self) -> dict[str, float]:
        """Bytes this rank has sent so far, per direction."""
        if self.plugin is not None:
            s = self.plugin.stats.counts
            return {d: s[d]["bytes_sent"] for d in ("forward", "backward")}
        return dict(self.counter.counts)

    def close(self, summary: dict[str, Any]) -> None:
        """Restore DeepSpeed's sends; the plugin's statistics go into ``summary``."""
        if self.plugin is not None:
            summary["plugin_stats"] = self.plugin.stats.summary()
            self.plugin.disable()
        else:
            self.p2p.send = self.counter.original


def _train_steps(
    args: argparse.Namespace, engine: Any, links: _Links, batches: Any, act: ACT | None = None
) -> dict[str, list[float]]:
    """``--steps`` pipeline steps: per step the loss, seconds and bytes per micro-batch sent
    each way (``fwd``: activations, ``bwd``: their gradients)."""
    rank = dist.get_rank()
    history: dict[str, list[float]] = {"loss": [], "time_s": [], "fwd": [], "bwd": []}
    for step in range(1, args.steps + 1):
        before = links.sent()
        dist.barrier()
        t0 = time.perf_counter()
        loss = engine.train_batch(data_iter=batches)
        history["time_s"].append(time.perf_counter() - t0)
        if act is not None:
            act.step()
        after = links.sent()
        history["loss"].append(float(loss))
        for key, direction in (("fwd", "forward"), ("bwd", "backward")):
            history[key].append((after[direction] - before[direction]) / args.micro_batches)
        if rank == 0 and (step % args.log_every == 0 or step in (1, args.steps)):
            print(f"step {step:4d}/{args.steps}  loss {history['loss'][-1]:.4f}  "
                  f"{history['time_s'][-1] * 1e3:.0f} ms  per micro-batch: activations "
                  f"{history['fwd'][-1] / 1e3:.1f} kB", flush=True)
    return history


def _validate(args: argparse.Namespace, engine: Any, data: ByteDataset
              ) -> tuple[list[float], float]:
    """Loss of ``--eval-batches`` x ``--micro-batches`` fixed validation micro-batches, one
    per ``eval_batch`` so the last stage's logits are each batch's, and the next-token
    accuracy over them (computed on the last stage, shared with every rank)."""
    gen = torch.Generator().manual_seed(12345)
    losses, correct, total = [], 0, 0
    for _ in range(args.eval_batches * args.micro_batches):
        x, y = data.batch("val", args.micro_batch_size, gen)
        loss, logits = engine.eval_batch(data_iter=iter([(x, y)]), return_logits=True,
                                         num_micro_batches=1)
        losses.append(float(loss))
        if engine.is_last_stage():
            correct += int((logits.argmax(-1) == y.to(logits.device)).sum())
            total += y.numel()
    mine = torch.tensor([correct, total], dtype=torch.float64)
    parts = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    last = parts[-1]
    return losses, float(last[0] / last[1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    deepspeed = _init_deepspeed(args.backend)
    world, rank = dist.get_world_size(), dist.get_rank()
    engine, config, act = _engine(args, deepspeed)
    links = _Links(args, engine)
    data = ByteDataset.from_stdlib(args.block_size)
    gen = torch.Generator().manual_seed(args.seed)
    history = _train_steps(args, engine, links,
                           draws(lambda: data.batch("train", args.micro_batch_size, gen)),
                           act)
    val, val_acc = _validate(args, engine, data)

    # Stage 0 sends the activations; the last stage sends the gradients back. Gather both.
    fwd, bwd, times = history["fwd"], history["bwd"], history["time_s"]
    mine = torch.tensor([statistics.fmean(fwd[1:] or fwd), statistics.fmean(bwd[1:] or bwd)],
                        dtype=torch.float64)
    parts = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    act_bytes, grad_bytes = float(parts[0][0]), float(parts[1][1])
    elements = args.micro_batch_size * args.block_size * config.n_embd
    summary = {
        "config": vars(args),
        "world_size": world,
        "stages": world,
        "boundary_elements": elements,
        "raw_bytes_per_microbatch": elements * 4,
        "activation_bytes_per_microbatch": act_bytes,
        "gradient_bytes_per_microbatch": grad_bytes,
        "activation_bits_per_element": 8 * act_bytes / elements,
        "gradient_bits_per_element": 8 * grad_bytes / elements,
        "median_step_time_s": statistics.median(times[1:] or times),
        "final_train_loss": statistics.fmean(history["loss"][-10:]),
        "val_loss": statistics.fmean(val),
        "val_accuracy": val_acc,
        "steps": {"loss": history["loss"], "time_s": times, "activation_bytes": fwd},
    }
    links.close(summary)
    if rank == 0:
        print(f"final: train loss {summary['final_train_loss']:.4f}  val loss "
              f"{summary['val_loss']:.4f}  val acc {summary['val_accuracy']:.4f}  median step "
              f"{summary['median_step_time_s'] * 1e3:.0f}"
              f" ms  activations {summary['activation_bits_per_element']:.2f} bits/elem  "
              f"gradients {summary['gradient_bits_per_element']:.2f} bits/elem", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1))
    dist.barrier()
    return summary


def entry(argv: list[str] | None = None) -> int:
    """The torchrun entry (``launch/train_pipe.py``): train, then leave the process group."""
    main(argv)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(entry())
