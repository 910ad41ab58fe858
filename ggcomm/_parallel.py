"""The thread pool the codec kernels run on.

The numba kernels release the GIL, so plain threads give real parallelism without numba's
own threading layers (whose default, workqueue, aborts when two Python threads enter a
parallel kernel at once: a DDP hook and a pipeline stage may well do that).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_threads = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


def get_num_threads() -> int:
    """Threads the codec splits one tensor's blocks over."""
    return _threads


def set_num_threads(n: int) -> None:
    """Set the codec's thread count (default: the CPUs this process may run on).

    More threads encode and decode large tensors faster but compete with the training
    process's own compute threads; 1 runs every kernel on the calling thread.
    """
    global _threads, _pool
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"number of threads must be a positive int, got {n!r}")
    with _lock:
        _threads = n
        # Not shut down: a run() on another thread may hold the old pool and still submit
        # to it. Its workers exit once the last such run() lets go of it (an executor that
        # is collected wakes its idle workers, which then stop).
        _pool = None


def split(n_blocks: int, min_per_task: int) -> list[tuple[int, int]]:
    """Contiguous block ranges, one per task, at least min_per_task blocks each."""
    tasks = max(1, min(_threads, n_blocks // max(1, min_per_task)))
    bounds = [n_blocks * i // tasks for i in range(tasks + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(tasks)]


def run(fn, items: list) -> list:
    """fn(*item) for each item, in parallel when there are several; results in order."""
    if len(items) == 1:
        return [fn(*items[0])]
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_threads, thread_name_prefix="ggcomm-codec")
        pool = _pool
    futures = [pool.submit(fn, *item) for item in items[1:]]
    first = fn(*items[0])
    return [first] + [f.result() for f in futures]
