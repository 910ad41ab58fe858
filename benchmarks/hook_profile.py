"""Where the DDP hook's time goes: per bucket and pass, against the bare kernels and DDP.

One run, on gloo ranks on this machine, of the 50M-parameter MLP workload
(``ggcomm.tools.workload.make_mlp_workload(4096, 3)``, batch 16 per rank, AdamW), with three
models trained side by side in round-robin (so that every method sees the same machine
load): plain DDP (fp32 allreduce), PyTorch's ``fp16_compress_hook`` and ``ggcomm.ddp`` at
``--rate``. It reports

* the median step time of each method, and its ratio to plain DDP;
* for ggcomm, per DDP bucket, the median wall time of each pass of the hook (its own
  counters, ``state.stats.last_buckets``): copy in, encode (fused error feedback +
  statistics + quantization + coding), ``c1`` statistics/size all-gather, ``c2`` frame
  all-to-all, decode-and-accumulate into the bucket, ``c3`` (reduce_scatter's second phase),
  and the rest;
* the bare kernels on the same bucket (its gradients and error-feedback residual captured
  at the last step, at the steps the hook agrees on for them): ``ggcomm.encode`` once plus
  ``ggcomm.decode`` of one frame per peer, the codec work an ideal hook could not avoid;
  and the hook's time over that;
* the hook's own two passes on the same data, alone like the bare kernels: what its code
  costs, apart from the cores it shares with backward and the waits for other ranks.

    python benchmarks/hook_profile.py [--world 2] [--steps 12] [--rate 3]

Writes ``benchmarks/results/hook_profile.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

import ggcomm
from ggcomm.ddp import GGCommState, gg_hook
from ggcomm.tools.workload import make_mlp_workload, mlp_batch

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("fp32", "fp16", "gg")
PASSES = ("copy_in", "agree_steps", "encode", "c1_info", "c2_frames", "decode", "c3_sizes",
          "c3_reduced", "finish")


def _worker(rank: int, world: int, store: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads)
    ggcomm.set_num_threads(args.codec_threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    models, opts = {}, {}
    state = GGCommState(rate=args.rate, exchange=args.exchange, step_drift=args.step_drift)
    captured: dict[int, tuple[torch.Tensor, list[int], list[str], torch.Tensor | None]] = {}
    capture = [False]

    def gg_capturing(st, bucket):
        if capture[0]:  # the gradients, and the residual the hook is about to add to them
            keys = [st._key(p) for p in bucket.parameters()]
            resid = (torch.cat([st.residuals[k].reshape(-1) for k in keys])
                     if all(k in st.residuals for k in keys) else None)
            captured[bucket.index()] = (bucket.buffer().clone(),
                                        [g.numel() for g in bucket.gradients()], keys, resid)
        return gg_hook(st, bucket)

    for m in METHODS:
        torch.manual_seed(0)
        model = make_mlp_workload(args.width, args.depth)
        ddp = DDP(model, bucket_cap_mb=args.bucket_cap_mb)
        if m == "fp16":
            ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif m == "gg":
            state._names = {id(p): n for n, p in model.named_parameters()}
            ddp.register_comm_hook(state, gg_capturing)
        models[m] = ddp
        opts[m] = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(rank)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    buckets: list[list[dict]] = []
    for step in range(args.steps):
        x, y = mlp_batch(args.batch, args.width, gen)
        capture[0] = step == args.steps - 1
        for m in METHODS:
            ddp, opt = models[m], opts[m]
            dist.barrier()
            t0 = time.perf_counter()
            _, loss = ddp(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times[m].append(time.perf_counter() - t0)
            if m == "gg" and step >= args.skip:
                buckets.append(list(state.stats.last_buckets))
    result = {"times": {m: t[args.skip:] for m, t in times.items()}, "buckets": buckets,
              "bytes_per_step": state.stats.last_step["bytes_sent"],
              "bits_per_element": state.stats.summary()["last_step"]["bits_per_element"]}
    if rank == 0:
        result["bare"] = _bare_kernels(state, captured, world, args)
    # the same bare kernels again while the other ranks compute (their model's forward and
    # backward in a loop, no communication): the machine as the hook finds it in training
    done = out + ".busy-done"  # rank 0 creates it when it has measured
    dist.barrier()
    if rank == 0:
        time.sleep(0.5)  # the others are computing by now
        result["bare_busy"] = _bare_kernels(state, captured, world, args)
        with open(out, "w") as f:
            json.dump(result, f)
        Path(done).touch()
    else:
        module = models["fp32"].module
        while not os.path.exists(done):
            x, y = mlp_batch(args.batch, args.width, gen)
            _, loss = module(x, y)
            loss.backward()
        module.zero_grad(set_to_none=True)
    dist.barrier()
    dist.destroy_process_group()


def _bare_kernels(state, captured, world, args) -> list[dict]:
    """Per captured bucket, median of 5: the bare kernels (``ggcomm.encode`` once plus
    ``ggcomm.decode`` of one frame per peer) and the hook's own two passes on the same data
    (``codec.encode_feedback`` with the residual and q, ``codec.sum_frames`` of the peers'
    frames onto the own q), both on this rank alone."""
    rows = []
    for index in sorted(captured):
        buf, lengths, keys, resid = captured[index]
        x = buf + resid if resid is not None else buf  # what the hook's frame codes
        # the steps the hook would agree on for these values (the GG model at the rate,
        # with the corrections its feedback loop learned)
        mom = ggcomm.codec.moments(x.numpy(), None, lengths)
        steps = []
        for key, length, (sumsq, sumabs, _) in zip(keys, lengths, mom, strict=True):
            step = state.control.step(key, sumsq / max(length, 1), sumabs / max(length, 1))
            steps.append(1.0 if step is None else step)
        code = state.code_args()
        enc, dec, fenc, fsum = [], [], [], []
        out = torch.zeros_like(buf)  # touched once here: no page faults in the timings
        own_q = np.zeros(buf.numel(), np.int32)
        r = np.zeros(buf.numel(), np.float32)
        for _ in range(5):
            t0 = time.perf_counter()
            frame = ggcomm.encode(x, steps, segments=lengths, **code)
            t1 = time.perf_counter()
            for _ in range(world - 1):
                ggcomm.decode(frame, out=out)
            t2 = time.perf_counter()
            enc.append(t1 - t0)
            dec.append(t2 - t1)
            # the hook's passes: the same frame, the residual updated, q kept, peers summed
            if resid is not None:
                r[:] = resid.numpy()
            t0 = time.perf_counter()
            mine, _ = ggcomm.codec.encode_feedback(buf.numpy(), r if resid is not None
                                                   else None, np.array(steps), lengths,
                                                   q_out=own_q, **code)
            t1 = time.perf_counter()
            recv = mine.buffer.repeat(world - 1)
            frames = [None] + [(i * mine.nbytes, ggcomm.codec.Frame.from_buffer(
                recv[i * mine.nbytes:(i + 1) * mine.nbytes], max_numel=buf.numel()))
                for i in range(world - 1)]
            t2 = time.perf_counter()
            ggcomm.codec.sum_frames(recv, frames, own=own_q, own_exceptions=mine.exceptions(),
                                    divisor=float(world), out=out.numpy())
            t3 = time.perf_counter()
            fenc.append(t1 - t0)
            fsum.append(t3 - t2)
            if mine.nbytes != frame.nbytes or not torch.equal(mine.buffer, frame.buffer):
                raise AssertionError(f"bucket {index}: the hook's frame differs from encode's")
        modes = [b.mode for b in ggcomm.inspect(frame).blocks]
        rows.append({"bucket": index, "numel": buf.numel(), "encode_s": statistics.median(enc),
                     "decode_s": statistics.median(dec), "frame_bytes": frame.nbytes,
                     "hook_encode_s": statistics.median(fenc),
                     "hook_sum_s": statistics.median(fsum),
                     "modes": {m: modes.count(m) for m in sorted(set(modes))}})
    return rows


def _command(args: argparse.Namespace, defaults: dict) -> str:
    """The command that repeats this run: every option that is not at its default."""
    parts = ["python benchmarks/hook_profile.py"]
    for key, value in vars(args).items():
        if key == "command" or value == defaults.get(key):
            continue
        if isinstance(value, Path) and value.resolve().is_relative_to(RESULTS.parents[1]):
            value = value.resolve().relative_to(RESULTS.parents[1])  # as run from the repo
        parts.append(f"--{key.replace('_', '-')} {value:g}" if isinstance(value, float)
                     else f"--{key.replace('_', '-')} {value}")
    return " ".join(parts)


def _table(res: dict, args: argparse.Namespace) -> str:
    med = {m: statistics.median(t) for m, t in res["times"].items()}
    lines = [
        "# The DDP hook's time: per bucket and pass, against the bare kernels and plain DDP",
        "",
        f"Command: `{args.command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs; Python "
        f"{platform.python_version()}, torch {torch.__version__}; gloo on localhost; "
        f"{args.threads} torch and {args.codec_threads} codec thread(s) per rank; load "
        f"average {res['load'][0]:.1f} at the start, {res['load'][1]:.1f} at the end; "
        f"{time.strftime('%Y-%m-%d')}.  ",
        f"Workload: MLP width {args.width}, depth {args.depth} ({res['params'] / 1e6:.1f}M "
        f"parameters), batch {args.batch} per rank, AdamW; DDP buckets of "
        f"{args.bucket_cap_mb:g} MB; {args.world} ranks. The three models train in "
        f"round-robin in one run; medians over steps {args.skip + 1}-{args.steps}.",
        "",
        "## Whole step",
        "",
        "| method | median step, ms | vs fp32 |",
        "|---|---|---|",
    ]
    names = {"fp32": "plain DDP (fp32 allreduce)", "fp16": "fp16_compress_hook",
             "gg": f"ggcomm rate {args.rate:g} ({args.exchange}, step_drift {args.step_drift:g})"}
    for m in METHODS:
        lines.append(f"| {names[m]} | {med[m] * 1e3:.0f} | {med[m] / med['fp32']:.2f}x |")
    lines += ["", f"ggcomm sent {res['bytes_per_step'] / 1e6:.2f} MB per rank per step "
              f"({res['bits_per_element']:.2f} bits per element, everything counted).", ""]
    # per bucket
    per_bucket: dict[int, dict[str, list[float]]] = {}
    numel: dict[int, int] = {}
    for step in res["buckets"]:
        for i, b in enumerate(step):
            d = per_bucket.setdefault(i, {})
            numel[i] = b["numel"]
            for p in PASSES:
                d.setdefault(p, []).append(b.get(p, 0.0))
            d.setdefault("hook", []).append(sum(b.get(p, 0.0) for p in PASSES))
            d.setdefault("cpu", []).append(sum(b.get("cpu_" + p, 0.0) for p in PASSES))
            d.setdefault("cpu_encode", []).append(b.get("cpu_encode", 0.0))
            d.setdefault("cpu_decode", []).append(b.get("cpu_decode", 0.0))
    bare = {row["bucket"]: row for row in res["bare"]}  # DDP reduces buckets in index order
    shown = [p for p in PASSES if any(statistics.median(d[p]) > 0 for d in per_bucket.values())]
    lines += ["## Per bucket, ms (hook passes in the order they run)", "",
              "| bucket | elements | " + " | ".join(shown)
              + " | hook total | hook CPU | encode CPU | decode CPU | bare encode | bare decode"
              " | encode CPU / bare encode | decode CPU / bare decode | bare total | hook / bare"
              " | hook CPU / bare | bare, others computing | hook CPU / that"
              " | hook passes alone | alone / bare | blocks |",
              "|---" * (len(shown) + 18) + "|"]
    busy = {row["bucket"]: row for row in res.get("bare_busy", [])}
    tot_hook = tot_bare = tot_cpu = tot_busy = tot_alone = 0.0
    for i in sorted(per_bucket):
        d = per_bucket[i]
        hook = statistics.median(d["hook"])
        b = bare.get(i)
        bt = (b["encode_s"] + b["decode_s"]) if b else float("nan")
        cpu = statistics.median(d["cpu"])
        enc_cpu, dec_cpu = statistics.median(d["cpu_encode"]), statistics.median(d["cpu_decode"])
        bb = busy.get(i)
        bbt = (bb["encode_s"] + bb["decode_s"]) if bb else float("nan")
        tot_hook += hook
        tot_bare += bt
        tot_cpu += cpu
        tot_busy += bbt
        alone = (b["hook_encode_s"] + b["hook_sum_s"]) if b and "hook_sum_s" in b else float("nan")
        tot_alone += alone
        modes = ", ".join(f"{m} {c}" for m, c in b["modes"].items()) if b else "-"
        lines.append(
            f"| {i} | {numel[i]:,} | "
            + " | ".join(f"{statistics.median(d[p]) * 1e3:.1f}" for p in shown)
            + f" | {hook * 1e3:.1f} | {cpu * 1e3:.1f} | {enc_cpu * 1e3:.1f} | "
            f"{dec_cpu * 1e3:.1f} | {b['encode_s'] * 1e3:.1f} | {b['decode_s'] * 1e3:.1f} | "
            f"{enc_cpu / b['encode_s']:.2f}x | {dec_cpu / b['decode_s']:.2f}x | "
            f"{bt * 1e3:.1f} | {hook / bt:.2f}x | {cpu / bt:.2f}x | {bbt * 1e3:.1f} | "
            f"{cpu / bbt:.2f}x | {alone * 1e3:.1f} | {alone / bt:.2f}x | {modes} |")
    lines += ["", f"All buckets: hook {tot_hook * 1e3:.0f} ms of wall time and "
              f"{tot_cpu * 1e3:.0f} ms of CPU time, bare kernels {tot_bare * 1e3:.0f} ms: "
              f"**{tot_hook / tot_bare:.2f}x** (wall), **{tot_cpu / tot_bare:.2f}x** (CPU). "
              f"The same bare kernels while the other rank(s) compute: {tot_busy * 1e3:.0f} ms "
              f"({tot_busy / tot_bare:.2f}x their time on an idle machine); the hook's CPU time "
              f"is {tot_cpu / tot_busy:.2f}x that. The hook's own passes on the same data, "
              f"alone like the bare kernels: {tot_alone * 1e3:.0f} ms "
              f"(**{tot_alone / tot_bare:.2f}x** the bare kernels).", "",
              "Hook CPU: the CPU time of the thread that runs the hook (`time.thread_time`; "
              "with one codec thread, all the hook's own work); wall minus CPU is time it "
              "waited for the other rank or was descheduled by this rank's backward pass, "
              "which shares its core. `encode CPU` / `decode CPU`: the same for those two "
              "passes alone (the encode pass also adds the error-feedback residual, gathers "
              "the statistics and keeps q; the decode pass sums exactly and writes the "
              "average).", "",
              "Bare kernels: `ggcomm.encode` of the bucket's captured gradients plus their "
              "error-feedback residual (the values the hook's frame codes) at the hook's rate "
              "steps, plus `ggcomm.decode` of the frame once per peer into a tensor touched "
              "before the timings, on rank 0 after training (the other rank idle). The "
              "hook's passes run while the other rank computes, on "
              "the same cores: `c1`/`c2`/`c3` include waiting for the slower rank. `bare, "
              "others computing` times the same calls again while every other rank runs its "
              "model's forward and backward in a loop: the machine as the hook finds it during "
              "training (this machine's two logical CPUs share one physical core). `blocks`: "
              "the block modes of the bucket's frame.", "",
              "Hook passes alone: the hook's encode pass (`codec.encode_feedback` of the "
              "captured gradients with the residual captured beside them: error feedback, "
              "statistics, q kept, the same frame as the bare encode) plus its decode pass "
              "(`codec.sum_frames` of one copy of that frame per peer onto the own q, the "
              "average written into a tensor touched before), timed like the bare kernels: "
              "on rank 0 after training, the other rank idle. So `alone / bare` is the "
              "hook's own code against the bare kernels, and the hook's time in training over "
              "`hook passes alone` is what sharing the core with backward and waiting for the "
              "other rank add.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=3, help="first steps left out of the medians")
    p.add_argument("--rate", type=float, default=3.0)
    p.add_argument("--exchange", default="auto")
    p.add_argument("--step-drift", type=float, default=0.1,
                   help="GGCommState(step_drift=...): inf always reuses the last statistics")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--bucket-cap-mb", type=float, default=25.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--codec-threads", type=int, default=1, help="codec threads per rank")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.command = _command(args, vars(p.parse_args([])))
    if args.skip >= args.steps:
        p.error("--skip must be below --steps")
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        store, out = os.path.join(tmp, "store"), os.path.join(tmp, "rank0.json")
        mp.start_processes(_worker, args=(args.world, store, args, out), nprocs=args.world,
                           start_method="spawn")
        with open(out) as f:
            res = json.load(f)
    res["load"] = (load0, os.getloadavg()[0])
    res["params"] = sum(p.numel() for p in make_mlp_workload(args.width, args.depth)
                        .parameters())
    res["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    md = _table(res, args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "hook_profile" + ("" if args.world == 2 else f"_{args.world}ranks") + (
        "" if args.step_drift == 0.1 else f"_drift{args.step_drift:g}")
    (args.out / f"{stem}.md").write_text(md)
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
