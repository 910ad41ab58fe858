"""Spawn a few gloo ranks on localhost and collect what each returns."""

from __future__ import annotations

import datetime
import os
import time
import traceback

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


def run(fn, world: int, *args, timeout: float = 240.0, pg_timeout: float | None = None) -> list:
    """fn(rank, world, *args) on `world` gloo ranks; returns the per-rank results.

    A rank that raised comes back as ("error", message); a hang fails after `timeout`.
    `pg_timeout`: seconds, the process group's timeout (torch's default if None).
    """
    ctx = mp.get_context("spawn")
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
