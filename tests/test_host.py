"""ggcomm._host.to_host on the CPU (its CUDA path is in tests/test_cuda.py)."""

from __future__ import annotations

import pytest
import torch

import ggcomm
from ggcomm._host import to_host


def test_to_host_returns_host_tensors_themselves_or_fills_out() -> None:
    x = torch.randn(6, 5)
    assert to_host(x) is x
    out = torch.empty(30)
    assert to_host(x.t(), out=out) is out
    assert torch.equal(out.view(5, 6), x.t())


def test_decode_device_argument_on_the_cpu() -> None:
    x = torch.randn(100, 7)
    frame = ggcomm.encode(x, 0.01)
    assert torch.equal(ggcomm.decode(frame, device="cpu"), ggcomm.decode(frame))
    with pytest.raises(ValueError, match="torch device"):
        ggcomm.decode(frame, device="not a device")
    with pytest.raises(ValueError, match="not out's device"):
        ggcomm.decode(frame, out=torch.empty(700), device="meta")
    with pytest.raises(ValueError, match="CPU or CUDA"):
        ggcomm.decode(frame, out=torch.empty(700, device="meta"))
    assert ggcomm.decode(frame, out=torch.empty(700), device="cpu").shape == (700,)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            ggcomm.decode(frame, device="cuda")
