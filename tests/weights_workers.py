"""Rank functions for tests/test_weights.py (spawned processes import them from here)."""

from __future__ import annotations

import dist_utils
import torch
import torch.nn as nn

from ggcomm import codec, rf8, weights


def model(seed: int, width: int = 48) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(32, width), nn.GELU(), nn.Linear(width, 8))
    with torch.no_grad():  # a non-finite weight and a bf16 tensor travel too
        m[0].weight[0, 0] = float("nan")
    m[2].bias.data = m[2].bias.data.to(torch.bfloat16)
    return m


def flat(m: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(ints), b.view(ints))


def expected(m: nn.Module, fmt: str, rel_step: float | None) -> list[torch.Tensor]:
    """The sender's weights rounded locally, without any communication."""
    out = []
    for p in m.parameters():
        if fmt == "rf8":
            out.append(rf8.quantize(p.detach().reshape(-1)).view(p.shape))
            continue
        flat = p.detach().reshape(-1)
        sum_sq, _, bad = codec.moments(flat.float().numpy())[0]
        step = rel_step * (sum_sq / (flat.numel() - bad)) ** 0.5
        out.append(codec.decode(codec.encode(p.detach().reshape(-1), step)).view(p.shape))
    return out


def transfer(rank, world, fmt, src, round_source):
    m = model(100 + rank)
    want = expected(m, fmt, weights.WEIGHTS_REL_STEP)
    before = flat(m)
    with dist_utils.ByteCounter(world) as c:
        got = weights.broadcast(m, src, format=fmt, round_source=round_source)
    return {"params": flat(m), "expected": want, "before": before,
            "counted": (c.sent, c.received), "reported": (got["bytes_sent"],
                                                          got["bytes_received"]),
            "bits": got["bits_per_element"], "ratio": got["ratio"]}


def mismatch(rank, world):
    m = model(rank, width=48 if rank != world - 1 else 40)
    try:
        weights.broadcast(m, 0)
    except Exception as e:  # noqa: BLE001 - the type goes back to the test
        return type(e).__name__, str(e)
    return None


def hostile(rank, world, how):
    """The sender's message is corrupt (a flipped byte) or announces more than any valid
    message: every rank raises FrameError and keeps its weights."""
    m = model(rank)
    before = flat(m)
    if rank == 0:
        real = weights._encode

        def bad(t, *args):
            b = real(t, *args)
            if how == "flip":
                b = b.clone()
                b[len(b) // 2] ^= 0x40
            else:
                b = torch.cat([b, torch.zeros(10 * len(b) + 4096, dtype=torch.uint8)])
            return b

        weights._encode = bad
    try:
        weights.broadcast(m, 0, format="rf8")
    except Exception as e:  # noqa: BLE001 - the type goes back to the test
        same = all(same_bits(a, b) for a, b in zip(flat(m), before, strict=True))
        return type(e).__name__, str(e), bool(same)
    return None
