"""Host copies of device tensors: the codec runs on the CPU.

A CUDA tensor's ``.cpu()`` copies into freshly allocated pageable memory: the driver stages
the bytes through a pinned buffer of its own, and the new pages fault in as they are first
touched. On an H200 that moved 64 MiB (16 Mi float32) in 38 ms, 1.8 GB/s, twice the
time ``ggcomm.encode`` then took to code the host copy (``benchmarks/results/gpu_check``).
:func:`to_host` copies into pinned memory instead, a DMA transfer that the caching host
allocator's blocks (or the caller's own buffer) make cheap to repeat, and waits for that
copy alone.
"""

from __future__ import annotations

import torch

__all__ = ["to_host"]


def to_host(t: torch.Tensor, *, out: torch.Tensor | None = None,
            after: torch.cuda.Event | None = None) -> torch.Tensor:
    """``t`` in host memory: ``t`` itself when it is there (and ``out`` is None).

    A CUDA tensor is copied into ``out`` (a pinned CPU tensor of ``t``'s element count, any
    shape) or else a new pinned tensor of ``t``'s shape, on the current stream of ``t``'s
    device, once ``after`` (an event recorded when ``t`` was ready, for callers on another
    thread than the one that produced it) has passed; it returns when that copy is done.
    Other devices go through ``Tensor.cpu``.
    """
    if out is None and t.device.type == "cpu":
        return t
    if t.is_cuda:
        host = out if out is not None else torch.empty(t.shape, dtype=t.dtype,
                                                       pin_memory=True)
        with torch.cuda.device(t.device):
            stream = torch.cuda.current_stream()
            if after is not None:
                stream.wait_event(after)
            host.view(t.shape).copy_(t, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        copied.synchronize()
        return host
    if out is None:
        return t.cpu()
    out.view(t.shape).copy_(t)
    return out
