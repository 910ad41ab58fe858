"""Rank functions for tests/test_hostile_pipeline.py: rank 0 is a peer that lies, rank 1 a
PipeComm receiver that must neither allocate what the peer claims nor abort in gloo."""

from __future__ import annotations

import math
import resource

import torch
import torch.distributed as dist
from pipeline_workers import count_wire

from ggcomm import FrameError, codec
from ggcomm.errors import PipeLinkError
from ggcomm.pipeline import PipeComm, _raw_message

# (name, claimed payload bytes, receiver's PipeComm arguments, recv arguments, bytes the
# liar really sends after its preamble); each case on its own tag, with a fresh receiver
PREAMBLE_CASES = (
    ("2^40", 1 << 40, {}, {}, 300),
    ("2^62", 1 << 62, {}, {}, 300),
    ("-1", -1, {}, {}, 300),
    ("2^33 into out", 1 << 33, {}, {"out": (4096,)}, 300),
    ("2^33 for shape and dtype", 1 << 33, {}, {"shape": (64, 64), "dtype": torch.float16}, 300),
    ("2^33 above max_numel", 1 << 33, {"max_numel": 1 << 20}, {}, 300),
    ("ceiling + 1", 4097, {"max_message_bytes": 4096}, {}, 4097),
    ("2^40 to a pending irecv", 1 << 40, {}, {"irecv": True}, 300),
)
GOOD_TAG = 100  # a healthy exchange after all the broken links, on a tag of its own
MAX_NUMEL = 1 << 20  # the frame receiver's ceiling
ZERO_FRAME_NUMEL = 1 << 26  # what the tiny frame claims: 64 Mi elements in ~250 bytes


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def spy_empty(requests: list) -> None:
    """Record the bytes of every torch.empty request (before it is attempted)."""
    orig = torch.empty

    def empty(*size, **kw):
        dims = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
        itemsize = orig(0, dtype=kw.get("dtype")).element_size()
        requests.append(math.prod(int(d) for d in dims) * itemsize)
        return orig(*size, **kw)

    torch.empty = empty


def _expect_link_error(fn) -> str:
    try:
        fn()
    except PipeLinkError as e:
        return str(e)
    raise AssertionError(f"{fn} did not raise PipeLinkError")


def hostile(rank: int, world: int) -> dict:
    """Both phases in one pair of processes (spawning one costs more than the checks)."""
    wire: dict = {}
    requests: list = []
    if rank == 1:
        count_wire(wire)
        spy_empty(requests)
    return {"preambles": hostile_preambles(rank, wire, requests),
            "frames": hostile_frames(rank, requests)}


def hostile_preambles(rank: int, wire: dict, requests: list) -> dict:
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1))
    fp = PipeComm().fingerprint  # the liar speaks the protocol, only its lengths lie
    if rank == 0:
        stuck = []  # payloads nobody takes off the link: these sends never complete
        for i, (_, claim, _, _, nbytes) in enumerate(PREAMBLE_CASES):
            dist.send(torch.tensor([claim, (fp << 1) | 1], dtype=torch.int64), 1, tag=i + 1)
            stuck.append(dist.isend(torch.zeros(nbytes, dtype=torch.uint8), 1, tag=i + 1))
        PipeComm(rel_step=0.1).send(x, 1, tag=GOOD_TAG)
        dist.barrier()
        return {"stuck_completed": [w.is_completed() for w in stuck]}

    del requests[:]
    rss0 = peak_rss_bytes()
    report = {}
    for i, (name, _, cfg, kw, _) in enumerate(PREAMBLE_CASES):
        tag = i + 1
        comm = PipeComm(**cfg)
        kw = dict(kw)
        if "out" in kw:
            kw["out"] = torch.zeros(kw["out"])
        later = []
        if kw.pop("irecv", False):
            handle = comm.irecv(0, tag=tag)
            # the next receive drains the pending one first, which breaks the link
            later.append(_expect_link_error(lambda c=comm, t=tag: c.recv(0, tag=t)))
            first = _expect_link_error(handle.wait)  # the handle keeps its own error
            later.append(_expect_link_error(handle.wait))
            report[name + " completed"] = handle.is_completed()
        else:
            first = _expect_link_error(lambda c=comm, t=tag, k=kw: c.recv(0, tag=t, **k))
        before = dict(wire)
        later += [
            _expect_link_error(lambda c=comm, t=tag: c.recv(0, tag=t)),
            _expect_link_error(lambda c=comm, t=tag: c.irecv(0, tag=t)),
            _expect_link_error(lambda c=comm: c.recv(0, tag=GOOD_TAG + 1)),  # any tag
            _expect_link_error(lambda c=comm, t=tag: c.send(x, 0, tag=t)),
            _expect_link_error(lambda c=comm, t=tag: c.isend(x, 0, tag=t)),
        ]
        report[name] = {"first": first, "later": later, "gloo_calls_after": wire != before,
                        "max_request": max(requests)}
    y = PipeComm(rel_step=0.1).recv(0, tag=GOOD_TAG)
    report["good"] = float((x - y).abs().max() / x.square().mean().sqrt())
    report["rss_growth"] = peak_rss_bytes() - rss0
    report["max_request"] = max(requests)
    dist.barrier()
    return report


def hostile_frames(rank: int, requests: list) -> list:
    x = torch.randn(4096, generator=torch.Generator().manual_seed(2))
    if rank == 0:
        comm = PipeComm(rel_step=0.1)
        # a valid frame of 64 Mi zeros: a few hundred bytes that decode to 256 MiB
        tiny = codec.encode(torch.zeros(ZERO_FRAME_NUMEL), 1.0, block_size=1 << 22,
                            tag=comm.fingerprint).buffer
        flipped = codec.encode(x, 0.01, tag=comm.fingerprint).buffer.clone()
        flipped[len(flipped) // 2] ^= 0x10
        wide = _raw_message(torch.zeros(MAX_NUMEL + 1, dtype=torch.float16))
        comm._send_payload(tiny, True, 1, 0, False)
        comm.send(x, 1)
        comm._send_payload(flipped, True, 1, 0, False)
        comm.send(x, 1)
        comm._send_payload(wide, False, 1, 0, False)
        comm.send(x, 1)
        comm.send(torch.full((4096,), float("nan")), 1)  # every element an exception
        comm._send_payload(tiny, True, 1, 0, False)  # to a pending irecv
        comm.send(x, 1)
        dist.barrier()
        return [len(tiny)]

    comm = PipeComm(rel_step=0.1, max_numel=MAX_NUMEL)
    del requests[:]
    rss0 = peak_rss_bytes()
    out = []

    def attempt(name, fn):
        try:
            y = fn()
            out.append((name, "ok", float((x - y).abs().max() / x.square().mean().sqrt())
                        if y.shape == x.shape else f"a tensor of shape {tuple(y.shape)}"))
        except FrameError as e:
            out.append((name, "FrameError", str(e)))

    attempt("tiny frame", lambda: comm.recv(0))
    attempt("after tiny frame", lambda: comm.recv(0))
    attempt("bit flip", lambda: comm.recv(0))
    attempt("after bit flip", lambda: comm.recv(0))
    attempt("wide raw message", lambda: comm.recv(0))
    attempt("after wide raw message", lambda: comm.recv(0))
    nan = comm.recv(0, out=torch.empty(4096))
    out.append(("all exceptions into out", "ok", bool(torch.isnan(nan).all())))
    handle = comm.irecv(0)
    attempt("after a pending tiny frame", lambda: comm.recv(0))  # drains the handle first
    attempt("pending tiny frame", handle.wait)
    dist.barrier()
    return [out, peak_rss_bytes() - rss0, max(requests)]
