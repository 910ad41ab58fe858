"""What the training-run benchmarks share: resumable results files and trailing means."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
