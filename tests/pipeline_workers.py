"""Rank functions for tests/test_pipeline.py (spawned processes import them from here)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ggcomm import FrameError, codec
from ggcomm.pipeline import PipeComm, PipeSettingsError

FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SHAPES = ((4096,), (3, 64, 64), (17, 1000), (2, 0, 5), (10,), ())


def count_wire(counter: dict) -> None:
    """Count the bytes of every tensor this process hands to torch.distributed p2p."""
    for name in ("send", "isend", "recv", "irecv"):
        orig = getattr(dist, name)

        def wrapped(tensor, *a, _orig=orig, _name=name, **kw):
            key = "sent" if _name in ("send", "isend") else "received"
            counter[key] = counter.get(key, 0) + tensor.numel() * tensor.element_size()
            return _orig(tensor, *a, **kw)

        setattr(dist, name, wrapped)


def payload(i: int, shape, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    # heavier-tailed than a Gaussian, like activations and their gradients
    return (torch.randn(shape, generator=g) * torch.randn(shape, generator=g).abs()).to(dtype)


def cases():
    i = 0
    for dtype in FLOATS:
        for shape in SHAPES:
            yield i, shape, dtype
            i += 1


def round_trips(rank: int, world: int) -> dict:
    counter: dict = {}
    count_wire(counter)
    comm = PipeComm(rel_step=0.05)
    got = []
    if rank == 0:
        for i, shape, dtype in cases():
            x = payload(i, shape, dtype)
            if i % 2:
                comm.send(x, 1)
            else:
                comm.isend(x, 1).wait()
        special = torch.randn(5000)
        special[[3, 70, 4000]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        comm.send(special, 1)
        comm.send(torch.arange(100, dtype=torch.int64), 1)  # passthrough
        comm.send(torch.tensor([True, False, True]), 1)  # passthrough
        # several messages in flight at once, received by irecv in order
        handles = [comm.isend(payload(100 + j, (2048,), torch.float32), 1) for j in range(4)]
        for h in handles:
            h.wait()
        # gradients come back: a message to a lower rank counts as backward
        for _ in range(3):
            got.append(comm.recv(1))
    else:
        for i, shape, dtype in cases():
            x = payload(i, shape, dtype)
            if i % 3 == 0:
                y = comm.recv(0)
            elif i % 3 == 1:
                y = comm.recv(0, out=torch.empty(shape, dtype=dtype))
            else:
                y = comm.irecv(0, shape=shape, dtype=dtype).wait()
            got.append((x, y))
        got.append((None, comm.recv(0)))
        got.append((None, comm.recv(0, dtype=torch.int64, shape=(100,))))
        got.append((None, comm.recv(0, out=torch.empty(3, dtype=torch.bool))))
        handles = [comm.irecv(0) for _ in range(4)]
        got.append((None, [h.wait() for h in reversed(handles)][::-1]))
        for j in range(3):
            comm.send(payload(200 + j, (4096,), torch.float32), 0)
    dist.barrier()
    return {"got": got, "stats": comm.stats.summary(), "wire": counter}


def corrupt_frames(rank: int, world: int) -> list:
    comm = PipeComm(rel_step=0.1)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(5))
    outcomes = []
    if rank == 0:
        frame = codec.encode(x, 0.1 * float(x.square().mean().sqrt()), tag=comm.fingerprint)
        bad = frame.buffer.clone()
        bad[len(bad) // 2] ^= 0x40
        comm._send_payload(bad, True, 1, 0, False)  # flipped bit
        comm._send_payload(frame.buffer[:-9].clone(), True, 1, 0, False)  # truncated
        comm.send(x, 1)  # fits nothing the receiver offers
        comm.send(x.view(64, 64), 1)  # a different shape, same element count
        comm.send(x, 1)  # still in sync: a good message after the bad ones
        other = PipeComm(rel_step=0.1, min_numel=7)
        other.send(x, 1)  # a differently configured sender
        comm.send(x, 1)
    else:
        for kw in ({}, {}, {"out": torch.empty(4096, dtype=torch.float16)},
                   {"out": torch.empty(4096)}, {}, {}, {}):
            try:
                y = comm.recv(0, **kw)
                outcomes.append(("ok", y))
            except (FrameError, PipeSettingsError) as e:
                outcomes.append((type(e).__name__, str(e)))
        outcomes.append(("x", x))
    dist.barrier()
    return outcomes


def rate_control(rank: int, world: int, target: float) -> list:
    comm = PipeComm(rate=target)
    bits = []
    for i in range(25):
        g = torch.Generator().manual_seed(i)
        scale = 10.0 ** (i % 3 - 1)  # the scale jumps by 100x between messages
        x = (torch.randn(1 << 15, generator=g) ** 3) * scale
        if rank == 0:
            comm.send(x, 1)
        else:
            before = comm.stats.counts["forward"]["bytes_received"]
            comm.recv(0)
            bits.append(8 * (comm.stats.counts["forward"]["bytes_received"] - before) / x.numel())
    return [comm.state_dict(), bits]
