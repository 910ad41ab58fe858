"""The codec on CUDA-resident tensors, staging included: one part of ``gpu_check.sh``.

Times, for float32 and bfloat16 tensors living on the GPU, the whole path a transport takes:
copy to host (a pageable ``.cpu()``, and the pinned copy the codec stages through),
encode, (the frame crosses), decode, copy back, against the same tensor already on the host;
checks the round trip's error bound. Writes ``codec_cuda.json`` in
``--out`` and prints a table.

    python benchmarks/gpu_check.py --out gpu-check [--numel 16777216]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import ggcomm
from ggcomm._host import to_host


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _row(dtype: torch.dtype, args: argparse.Namespace) -> dict:
    """One dtype's round trip and timings."""
    x = torch.randn(args.numel, device="cuda").to(dtype)
    step = args.rel_step * float(x.float().pow(2).mean().sqrt())
    host = x.cpu()
    frame = ggcomm.encode(x, step)
    y = ggcomm.decode(frame.buffer.cuda(), device=x.device)
    err = float((y.float() - x.float()).abs().max())
    # half a step, plus the rounding of a bfloat16 result
    bound = step / 2 + (float(x.float().abs().max()) * 2 ** -7 if dtype != torch.float32
                        else 1e-6)
    row = {
        "dtype": str(dtype).removeprefix("torch."), "numel": args.numel,
        "bits_per_element": frame.bits_per_element, "max_error": err,
        "error_bound": bound, "round_trip_ok": err <= bound,
        "d2h_pageable_s": _timed(lambda: x.cpu(), args.repeats),
        "d2h_pinned_s": _timed(lambda: to_host(x), args.repeats),  # what encode stages with
        "encode_from_cuda_s": _timed(lambda: ggcomm.encode(x, step), args.repeats),
        "encode_from_host_s": _timed(lambda: ggcomm.encode(host, step), args.repeats),
        "decode_then_to_cuda_s": _timed(lambda: ggcomm.decode(frame.buffer).to("cuda"),
                                        args.repeats),
        # through pinned memory, cast and exceptions on the device
        "decode_to_cuda_s": _timed(lambda: ggcomm.decode(frame.buffer, device="cuda"),
                                   args.repeats),
        "decode_on_host_s": _timed(lambda: ggcomm.decode(frame.buffer), args.repeats),
    }
    row["staging_share_of_encode"] = 1 - row["encode_from_host_s"] / row["encode_from_cuda_s"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu-check")
    p.add_argument("--numel", type=int, default=1 << 24)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rel-step", type=float, default=0.25)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check.py: no CUDA device; nothing measured", file=sys.stderr)
        return 0
    rows = [_row(dtype, args) for dtype in (torch.float32, torch.bfloat16)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "ggcomm": ggcomm.__version__, "threads": ggcomm.get_num_threads()
              if hasattr(ggcomm, "get_num_threads") else None, "rows": rows}
    (out / "codec_cuda.json").write_text(json.dumps(result, indent=1))
    print(f"{'dtype':>9} {'bits/el':>8} {'D2H ms':>8} {'pinned':>7} {'enc cuda':>9} "
          f"{'enc host':>9} {'dec .to':>8} {'dec->cuda':>10} {'dec host':>9} ok")
    for r in rows:
        print(f"{r['dtype']:>9} {r['bits_per_element']:8.2f} {1e3 * r['d2h_pageable_s']:8.1f} "
              f"{1e3 * r['d2h_pinned_s']:7.1f} "
              f"{1e3 * r['encode_from_cuda_s']:9.1f} {1e3 * r['encode_from_host_s']:9.1f} "
              f"{1e3 * r['decode_then_to_cuda_s']:8.1f} "
              f"{1e3 * r['decode_to_cuda_s']:10.1f} {1e3 * r['decode_on_host_s']:9.1f} "
              f"{r['round_trip_ok']}")
    return 0 if all(r["round_trip_ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
