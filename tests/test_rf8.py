"""RF8 (ggcomm.rf8): the value model, the byte layout of docs/FORMAT.md ("RF8 tensors"),
special values, and every malformed input rejected with FrameError."""

from __future__ import annotations

import math
import struct
import zlib

import pytest
import torch

import ggcomm
from ggcomm import FrameError, rf8
from ggcomm.kernels import reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _reference_decode(buf: bytes) -> torch.Tensor:
    """A decoder written from docs/FORMAT.md alone (one value at a time)."""
    magic, version, dcode, ndim, _, block, n_exc = struct.unpack_from("<4sBBBBII", buf, 0)
    assert magic == b"GGR8" and version == 1
    assert zlib.crc32(buf[:-4]) == struct.unpack_from("<I", buf, len(buf) - 4)[0]
    dtype = {1: torch.float32, 2: torch.float16, 3: torch.bfloat16, 4: torch.float64}[dcode]
    shape = struct.unpack_from(f"<{ndim}Q", buf, 16)
    numel = math.prod(shape)
    at = 16 + 8 * ndim
    n_blocks = -(-numel // block)
    bases = struct.unpack_from(f"<{n_blocks}h", buf, at)
    at += 2 * n_blocks
    values = []
    for i in range(numel):
        c = buf[at + i]
        s, e, t = c >> 7, (c >> 3) & 15, c & 7
        if e == 0:
            assert t == 0
            values.append(-0.0 if s else 0.0)
            continue
        e1 = bases[i // block] + e
        if t == 0:
            mag = 2.0**e1
        elif t == 1:
            mag = 2.0**e1 + 2.0 ** (e1 - 1)
        else:
            mag = 2.0**e1 + (1 if t % 2 == 0 else -1) * 2.0 ** (e1 - (2 + (t - 2) // 2))
        values.append(-mag if s else mag)
    out = torch.tensor(values, dtype=torch.float64).to(dtype)
    at += numel
    pos = struct.unpack_from(f"<{n_exc}Q", buf, at)
    at += 8 * n_exc
    itemsize = out.element_size()
    if n_exc:
        raw = torch.frombuffer(bytearray(buf[at: at + itemsize * n_exc]), dtype=torch.uint8)
        out[list(pos)] = raw.view(dtype)
    return out.view(shape)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def _recrc(b: torch.Tensor) -> torch.Tensor:
    b = b.clone()
    o = b.numpy()
    struct.pack_into("<I", o, o.size - 4, zlib.crc32(o[:-4]))
    return b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,block", [((1000, 37), 1024), ((5, 7, 11), 7), ((), 1),
                                         ((0, 3), 1024), ((3000,), 1)])
def test_decode_of_encode_is_quantize_and_matches_the_documented_layout(dtype, shape, block):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * torch.exp2(torch.randint(-8, 8, shape, generator=g))
         ).to(dtype)
    buf = rf8.encode(x, block_size=block)
    y = rf8.decode(buf)
    assert _same_bits(y, rf8.quantize(x, block_size=block))
    assert _same_bits(y, _reference_decode(buf.numpy().tobytes()))
    assert buf.numel() == rf8.encoded_bytes(x.numel(), x.dim(), block, 0, x.element_size())


def test_threads_do_not_change_the_result(monkeypatch):
    x = torch.randn(10_000) * torch.exp2(torch.randint(-20, 20, (10_000,)).float())
    whole = rf8.encode(x, block_size=64)
    monkeypatch.setattr(rf8, "_MIN_BLOCKS_PER_TASK", 64)  # one block per task
    threads = ggcomm.get_num_threads()
    ggcomm.set_num_threads(2)
    try:
        assert torch.equal(rf8.encode(x, block_size=64), whole)
        assert _same_bits(rf8.decode(whole), rf8.quantize(x, block_size=64))
    finally:
        ggcomm.set_num_threads(threads)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_match_the_pure_python_reference(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3000, generator=g, dtype=torch.float64) * torch.exp2(
        torch.randint(-30, 30, (3000,), generator=g).double())
    x[::97] = 0.0
    x[1::101] = -0.0
    x[2::103] = float("nan")
    x[3::107] = -float("inf")
    x = x.to(dtype)
    block = 37
    over = rf8._OVERFLOW_AT[dtype]
    vals = x.double().tolist()
    codes, bases, exc = reference.rf8_encode(vals, block, over)
    buf = rf8.encode(x, block_size=block).numpy().tobytes()
    at = 16 + 8
    n_blocks = -(-x.numel() // block)
    assert list(struct.unpack_from(f"<{n_blocks}h", buf, at)) == bases
    assert list(buf[at + 2 * n_blocks: at + 2 * n_blocks + x.numel()]) == codes
    assert list(struct.unpack_from(f"<{len(exc)}Q", buf, at + 2 * n_blocks + x.numel())) == exc
    want = [(-1 if c >> 7 else 1) * (0.0 if (c >> 3) & 15 == 0 else
            reference.rf8_value(bases[i // block] + ((c >> 3) & 15), c & 7))
            for i, c in enumerate(codes)]
    got = rf8.decode(buf)
    keep = torch.ones(x.numel(), dtype=torch.bool)
    keep[exc] = False
    assert _same_bits(got[keep], torch.tensor(want, dtype=torch.float64).to(dtype)[keep])


@pytest.mark.parametrize("dtype", DTYPES)
def test_representable_values_round_trip_exactly(dtype):
    """Random codes with E in 2..14 (so that re-encoding keeps every value inside its
    block's window) decode to values that encode back to themselves."""
    g = torch.Generator().manual_seed(1)
    n, block = 4096, 256
    e = torch.randint(2, 15, (n,), generator=g)
    t = torch.randint(0, 8, (n,), generator=g)
    s = torch.randint(0, 2, (n,), generator=g)
    codes = ((s << 7) | (e << 3) | t).to(torch.uint8)
    bases = torch.randint(-20, 5, (n // block,), generator=g)
    if dtype == torch.float16:
        bases = torch.randint(-10, -4, (n // block,), generator=g)  # float16 tops at 2^15
    header = struct.pack("<4sBBBBII", b"GGR8", 1, {torch.float32: 1, torch.float16: 2,
                         torch.bfloat16: 3, torch.float64: 4}[dtype], 1, 0, block, 0)
    body = header + struct.pack("<Q", n) + struct.pack(f"<{n // block}h", *bases.tolist()) \
        + codes.numpy().tobytes()
    buf = body + struct.pack("<I", zlib.crc32(body))
    v = rf8.decode(buf)
    assert _same_bits(v, _reference_decode(buf))
    assert _same_bits(rf8.quantize(v, block_size=block), v)
    assert _same_bits(rf8.decode(rf8.encode(v, block_size=block)), v)


def test_error_is_within_the_documented_bound():
    g = torch.Generator().manual_seed(2)
    w = torch.exp2(torch.rand(1_000_000, generator=g, dtype=torch.float64) * 6 - 3)
    w = torch.where(torch.rand(w.shape, generator=g) < 0.5, -w, w)
    q = rf8.quantize(w, block_size=1 << 20)
    rel = (q - w).abs() / w.abs()
    assert float(rel.max()) <= 0.109
    assert 0.038 < float(rel.pow(2).mean().sqrt()) < 0.042  # documented: 4.0% RMS
    assert bool((torch.sign(q) == torch.sign(w)).all())


def test_value_model_examples():
    x = torch.tensor([1.0, 1.5, 1.25, 0.75, 1 + 2**-4, 1 + 2**-5, 1 - 2**-4, 1.36, 1.0 - 2**-6],
                     dtype=torch.float64)
    want = [1.0, 1.5, 1.25, 0.75, 1 + 2**-4, 1.0, 1 - 2**-4, 1.5, 1.0]
    assert rf8.quantize(x).tolist() == want


def test_special_values():
    x = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 3.4e38, -3.0e38,
                      1.0, 2.0**-149, -(2.0**-140)])
    buf = rf8.encode(x, block_size=2)
    y = rf8.decode(buf)
    assert _same_bits(y, rf8.quantize(x, block_size=2))
    assert _same_bits(y[:2], x[:2])  # signed zeros kept
    assert _same_bits(y[2:6], x[2:6])  # non-finite and overflowing values: exact exceptions
    assert float(y[6]) == -(2.0**128 - 2.0**125)  # 3e38: 2^128 rounded down by 2^125
    assert float(y[8]) == 2.0**-149 and float(y[9]) == -(2.0**-140)  # subnormals coded
    assert _same_bits(rf8.decode(buf)[2:3], x[2:3])  # the NaN's payload bits too
    # a block spans 15 octaves below its largest value: smaller values become zero
    z = rf8.quantize(torch.tensor([1.0, 2.0**-14, 2.0**-15, -(2.0**-16)]))
    assert z.tolist() == [1.0, 2.0**-14, 0.0, -0.0] and torch.signbit(z[3])


def test_quantize_in_place_on_a_module():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Linear(30, 5).to(torch.bfloat16))
    want = [rf8.quantize(p) for p in m.parameters()]
    assert rf8.quantize_(m) == sum(p.numel() for p in m.parameters())
    for p, w in zip(m.parameters(), want, strict=True):
        assert _same_bits(p.detach(), w)


def test_decode_into_out_and_limits():
    x = torch.randn(100)
    buf = rf8.encode(x)
    out = torch.empty(100)
    assert rf8.decode(buf, out=out) is out and _same_bits(out, rf8.quantize(x))
    with pytest.raises(FrameError, match="max_numel=99"):
        rf8.decode(buf, max_numel=99)
    assert rf8.max_encoded_bytes((100,), torch.float32) >= buf.numel()
    with pytest.raises(ValueError):
        rf8.decode(buf, out=torch.empty(99))
    with pytest.raises(TypeError):
        rf8.encode(torch.arange(3))
    with pytest.raises(ValueError):
        rf8.encode(x, block_size=0)


def _corrupt_cases():
    x = torch.tensor([1.0, -2.0, float("nan"), 0.5, float("inf"), 3.0])
    good = rf8.encode(x, block_size=4)
    n = good.numel()
    # layout: 16 header, 8 shape, 4 bases (2 blocks), 6 codes, 16 positions, 8 values, 4 crc
    codes_at, pos_at = 16 + 8 + 4, 16 + 8 + 4 + 6

    def patched(offset, fmt, value, crc=True):
        b = good.clone()
        struct.pack_into(fmt, b.numpy(), offset, value)
        return _recrc(b) if crc else b

    return {
        "truncated": (good[:10], "truncated"),
        "cut short": (_recrc(good[: n - 5]), "header describes"),
        "checksum": (patched(codes_at, "<B", 0x08, crc=False), "checksum"),
        "magic": (patched(0, "<4s", b"GGEG"), "magic"),
        "version": (patched(4, "<B", 2), "version 2"),
        "dtype": (patched(5, "<B", 9), "dtype code"),
        "reserved": (patched(7, "<B", 1), "header"),
        "block size 0": (patched(8, "<I", 0), "header"),
        "exceptions > numel": (patched(12, "<I", 7), "exceptions"),
        "huge shape": (patched(16, "<Q", 1 << 60), "claims more values"),
        "positions order": (patched(pos_at, "<Q", 4), "increasing"),
        "position past end": (patched(pos_at + 8, "<Q", 6), "increasing"),
        "code at exception": (patched(codes_at + 2, "<B", 0x08), "exception list"),
        "zero with a tail": (patched(codes_at, "<B", 0x03), "E = 0"),
        "base out of range": (patched(16 + 8, "<h", 200), "finite range"),
    }


@pytest.mark.parametrize("case", sorted(_corrupt_cases()))
def test_malformed_bytes_raise_frame_error_and_leave_out_alone(case):
    buf, message = _corrupt_cases()[case]
    out = torch.full((6,), 7.0)
    with pytest.raises(FrameError, match=message):
        rf8.decode(buf, out=out)
    assert bool((out == 7.0).all())
