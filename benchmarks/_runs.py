"""What the training-run benchmarks share: launching a training tool on localhost or on
shaped test-host links, resumable results files and trailing means."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ggcomm.tools import testhosts
from ggcomm.tools.workload import free_port

LINKS = ("localhost", "1gbit", "100mbit")


def launch(link: str, ranks: int, argv: list[str], *, prefix: str,
           timeout: float = 7200.0) -> None:
    """``python <argv>`` on ``ranks`` ranks: under torchrun on ``localhost``, else one rank
    per test host, the hosts joined by links shaped to ``link`` (``1gbit``, ``100mbit``; root,
    :mod:`ggcomm.tools.testhosts`, host names starting with ``prefix``). Raises if a rank
    fails."""
    if link == "localhost":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
               f"--master_port={free_port()}", *argv]
        subprocess.run(cmd, check=True, timeout=timeout)
        return
    with testhosts.TestHosts(ranks, rate=link, prefix=prefix) as hosts:
        procs = [hosts.popen(i, [sys.executable, *argv]) for i in range(ranks)]
        codes = [p.wait(timeout=timeout) for p in procs]
    if any(codes):
        raise RuntimeError(f"{argv} on {link}: ranks exited with {codes}")


def resumable(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The results kept in ``path`` (``{"runs": {}}`` when there are none yet), refusing
    a file made with other ``settings``: runs are added to it as they finish, and a second
    call runs only what is missing."""
    data = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    data.setdefault("runs", {})
    if data.get("config", settings) != settings:
        raise SystemExit(f"{path} holds runs with other settings: {data['config']}")
    data["config"] = settings
    return data


def trailing_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each position (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out
