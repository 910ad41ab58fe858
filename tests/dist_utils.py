"""Spawn a few gloo ranks on localhost and collect what each returns."""

from __future__ import annotations

import datetime
import os
import time
import traceback
from multiprocessing import forkserver

import torch.distributed as dist
import torch.multiprocessing as mp

from ggcomm.tools.workload import free_port


def _entry(rank: int, world: int, port: int, fn, args, results, pg_timeout=None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    import ggcomm

    torch.set_num_threads(1)  # several ranks share two cores
    ggcomm.set_num_threads(1)
    try:
        kw = {} if pg_timeout is None else {"timeout": datetime.timedelta(seconds=pg_timeout)}
        dist.init_process_group("gloo", rank=rank, world_size=world, **kw)
        results[rank] = ("ok", fn(rank, world, *args))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        results[rank] = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# Ranks start from a fork server that imported torch and ggcomm once per test session
# (tests/rank_preload.py): a fresh interpreter per rank would spend seconds importing on
# every spawn, more than most tests' checks. The ranks are still separate processes, as
# torchrun's are, and forking after importing torch is what DataLoader workers do.
_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["rank_preload"])


def _start_fork_server() -> None:
    # The server imports its preload from the PYTHONPATH it starts with (this folder is
    # only on the test process's sys.path, which the server does not take over)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(__file__), old) if p)
    try:
        forkserver.ensure_running()
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


def run(fn, world: int, *args, timeout: float = 240.0, pg_timeout: float | None = None) -> list:
    """fn(rank, world, *args) on `world` gloo ranks; returns the per-rank results.

    A rank that raised comes back as ("error", message); a hang fails after `timeout`.
    `pg_timeout`: seconds, the process group's timeout (torch's default if None).
    """
    _start_fork_server()
    ctx = _CTX
    port = free_port()
    with ctx.Manager() as manager:
        results = manager.dict()
        procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, results, pg_timeout))
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        if hung:
            raise TimeoutError(f"ranks {hung} did not finish within {timeout} s")
        return [results.get(r, ("error", f"rank {r} died with exit code "
                                          f"{procs[r].exitcode}")) for r in range(world)]


def values(results: list) -> list:
    """The per-rank return values; raises if any rank failed."""
    errors = [f"rank {r}: {msg}" for r, (kind, msg) in enumerate(results) if kind != "ok"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [v for _, v in results]


class ByteCounter:
    """Wraps the torch.distributed calls ggcomm's transports make and counts the bytes each
    rank hands out and takes in (all-gather: (n - 1) x the tensor each way; all-to-all: the
    splits to and from the other ranks; broadcast: (n - 1) x from the source, once to each
    other rank; all-reduce: a ring's 2 (n - 1) / n x). Use as a context manager, or
    install() / uninstall()."""

    NAMES = ("all_gather", "all_to_all_single", "all_reduce", "broadcast")

    def __init__(self, world: int):
        self.n = world
        self.sent = 0.0
        self.received = 0.0
        self.calls = 0
        self._orig = {}

    def install(self):
        for name in self.NAMES:
            self._orig[name] = getattr(dist, name)
            setattr(dist, name, getattr(self, name))

    def uninstall(self):
        for name, fn in self._orig.items():
            setattr(dist, name, fn)

    def __enter__(self):
        self.install()
        return self

    def __exit__(self, *exc):
        self.uninstall()

    def all_gather(self, parts, t, group=None, async_op=False):
        self.calls += 1
        self.sent += (self.n - 1) * t.numel() * t.element_size()
        self.received += (self.n - 1) * t.numel() * t.element_size()
        return self._orig["all_gather"](parts, t, group=group, async_op=async_op)

    def all_to_all_single(self, out, inp, output_split_sizes=None, input_split_sizes=None,
                          group=None, async_op=False):
        self.calls += 1
        rank = dist.get_rank(group)
        item = inp.element_size()
        ins = input_split_sizes or [inp.numel() // self.n] * self.n
        outs = output_split_sizes or [out.numel() // self.n] * self.n
        self.sent += (sum(ins) - ins[rank]) * item
        self.received += (sum(outs) - outs[rank]) * item
        return self._orig["all_to_all_single"](out, inp, output_split_sizes=output_split_sizes,
                                               input_split_sizes=input_split_sizes,
                                               group=group, async_op=async_op)

    def all_reduce(self, t, op=dist.ReduceOp.SUM, group=None, async_op=False):
        self.calls += 1
        b = t.numel() * t.element_size()
        self.sent += 2 * (self.n - 1) / self.n * b
        self.received += 2 * (self.n - 1) / self.n * b
        return self._orig["all_reduce"](t, op=op, group=group, async_op=async_op)

    def broadcast(self, t, src, group=None, async_op=False):
        self.calls += 1
        b = t.numel() * t.element_size()
        if dist.get_rank() == src:
            self.sent += (self.n - 1) * b
        else:
            self.received += b
        return self._orig["broadcast"](t, src, group=group, async_op=async_op)
