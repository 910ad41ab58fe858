"""The transports and the codec with CUDA tensors. Skipped without a CUDA device (CI has
none); run on a GPU machine with ``python -m pytest -q tests/test_cuda.py``."""

from __future__ import annotations

import cuda_workers as w
import dist_utils
import pytest
import torch

import ggcomm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_codec_round_trip_from_a_cuda_tensor() -> None:
    x = torch.randn(4096, 257, device="cuda")
    frame = ggcomm.encode(x, step=0.02)
    y = ggcomm.decode(frame.buffer.cuda())
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float((y.to(x.device) - x).abs().max()) <= 0.01 + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ddp_hook_on_cuda_buckets(dtype: torch.dtype) -> None:
    a, b = dist_utils.values(dist_utils.run(w.ddp_on_device, 2, 4, dtype, "cuda:0",
                                            timeout=600))
    assert a["grad_device"] == "cuda:0"
    assert torch.equal(a["grads"], b["grads"]) and torch.equal(a["params"], b["params"])
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in (a, b))
    # the same run with the model on the CPU: the same path after staging, the same traffic
    # up to the gradients' last bits (cuBLAS and the CPU sum in other orders)
    cpu, _ = dist_utils.values(dist_utils.run(w.ddp_on_device, 2, 4, dtype, "cpu",
                                              timeout=600))
    assert a["stats"]["elements"] == cpu["stats"]["elements"]
    assert a["stats"]["bytes_sent"] == pytest.approx(cpu["stats"]["bytes_sent"], rel=0.05)
    assert a["stats"]["ratio"] > 2
    assert torch.allclose(a["params"], cpu["params"], rtol=0, atol=1e-2)


def test_pipeline_send_recv_of_cuda_tensors() -> None:
    a, b = dist_utils.values(dist_utils.run(w.pipe_on_cuda, 2, timeout=600))
    assert b["same_buffer"] and b["err"] <= 0.2 * b["rms"]
    assert b["stats"]["ratio_received"] > 4
    assert a["device"] == "cpu"  # gloo and no out=: a host tensor
    assert float((a["back"] - 2 * b["got"]).abs().max()) <= 0.2 * 2 * b["rms"]


def test_to_host_copies_cuda_tensors_into_pinned_memory() -> None:
    from ggcomm._host import to_host

    x = torch.randn(300, 257, device="cuda")[:, 1:]  # not contiguous
    h = to_host(x)
    assert h.device.type == "cpu" and h.is_pinned() and torch.equal(h, x.cpu())
    out = torch.empty(x.numel(), pin_memory=True)
    assert to_host(x, out=out) is out and torch.equal(out.view(x.shape), x.cpu())
    # the codec stages through it: the same frame as from the host copy, bit for bit
    assert torch.equal(ggcomm.encode(x, 0.05).buffer, ggcomm.encode(x.cpu(), 0.05).buffer)
    b = x.to(torch.bfloat16)
    assert torch.equal(ggcomm.encode(b, 0.05).buffer, ggcomm.encode(b.cpu(), 0.05).buffer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_onto_cuda_through_pinned_memory(dtype: torch.dtype) -> None:
    x = torch.randn(70_000).to(dtype)
    x[[3, 500, 69_999]] = torch.tensor([float("nan"), float("inf"), 3e38]).to(dtype)
    frame = ggcomm.encode(x, 0.01)
    assert frame.exceptions()[0].size == 3
    want = ggcomm.decode(frame)
    got = ggcomm.decode(frame, device="cuda")
    assert got.device.type == "cuda" and got.dtype == dtype
    assert torch.equal(got.cpu().view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       want.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    out = torch.zeros(2 * 70_000, dtype=dtype, device="cuda")[::2]  # not contiguous
    assert ggcomm.decode(frame, out=out, device="cuda") is out  # "cuda" is out's device
    assert torch.equal(out.cpu().nan_to_num(), want.nan_to_num())
    # a corrupt frame: FrameError, and out is left as it was
    bad = frame.buffer.clone()
    bad[-1] ^= 0xFF
    before = out.clone()
    with pytest.raises(ggcomm.FrameError):
        ggcomm.decode(bad, out=out)
    assert torch.equal(out.nan_to_num(), before.nan_to_num())
