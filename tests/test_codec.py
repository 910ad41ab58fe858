"""The wire codec: round trips, kernels against the pure reference, robustness."""

from __future__ import annotations

import math
import struct
import zlib
from fractions import Fraction

import numba
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ggcomm
from ggcomm import FrameError, codec, decode, encode, inspect
from ggcomm.kernels import eg, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16,
            torch.bfloat16: torch.int16, torch.float64: torch.int64}


def coded_limit(step: float, dtype: torch.dtype) -> float:
    """FORMAT.md: |v| = |x / step| is coded when <= 2**30 - 1 and < M + 1/2, with
    M = floor(vmax / step) exactly; returned as the largest coded |v| (the half-open bound
    M + 1/2 becomes the float just below it)."""
    m = math.floor(Fraction(float(torch.finfo(dtype).max)) / Fraction(step))
    return float(eg.QMAX) if m >= eg.QMAX else float(np.nextafter(m + 0.5, 0.0))


def expected(x: torch.Tensor, steps, lengths) -> torch.Tensor:
    """What decode must return, computed straight from FORMAT.md's rules."""
    flat = x.detach().reshape(-1)
    xd = flat.double().numpy()
    out = np.empty(xd.size, np.float64)
    ok = np.empty(xd.size, bool)
    o = 0
    for step, n in zip(steps, lengths, strict=True):
        with np.errstate(over="ignore", invalid="ignore"):
            v = xd[o:o + n] * (1.0 / step)
            ok[o:o + n] = np.abs(v) <= coded_limit(step, x.dtype)  # False for NaN, inf
        q = np.rint(np.where(ok[o:o + n], v, 0.0)).astype(np.int64)  # an integer: no -0.0
        out[o:o + n] = q.astype(np.float64) * step
        o += n
    if x.dtype == torch.float64:
        res = torch.from_numpy(out)
    else:
        res = torch.from_numpy(out.astype(np.float32)).to(x.dtype)
    bad = ~torch.from_numpy(ok)
    res = res.clone()
    res.view(INT_VIEW[x.dtype])[bad] = flat.view(INT_VIEW[x.dtype])[bad]
    return res.reshape(x.shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(INT_VIEW[a.dtype]), b.reshape(-1).view(INT_VIEW[b.dtype]))


# --------------------------------------------------------------------------- strategies

special = st.sampled_from([float("nan"), float("inf"), float("-inf"), 3e38, -3e38, 1e30, 0.0,
                           -0.0, 1e-30])


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.sampled_from([(), (0,), (1,), (5,), (3, 7), (2, 3, 11), (257,), (1000,),
                                  (4, 0, 3), (2500,)]))
    n = math.prod(shape)
    beta = draw(st.sampled_from([0.5, 1.0, 2.0]))
    scale = draw(st.sampled_from([1e-6, 1e-2, 1.0, 1e3]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = ggcomm.gg.sample((n,), beta, std=scale, generator=g, dtype=torch.float64)
    if n and draw(st.booleans()):  # sparse
        x[torch.rand(n, generator=g) < 0.9] = 0.0
    if n and draw(st.booleans()):  # specials and outliers
        m = draw(st.integers(1, max(1, n // 4)))
        pos = torch.randint(0, n, (m,), generator=g)
        vals = draw(st.lists(special, min_size=m, max_size=m))
        x[pos] = torch.tensor(vals, dtype=torch.float64)
    return x.to(dtype).reshape(shape), scale


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=tensors(), rel_step=st.sampled_from([0.01, 0.1, 0.5, 2.0, 1e6]),
       k=st.one_of(st.just("auto"), st.integers(0, eg.K_MAX)),
       block_size=st.sampled_from([1, 3, 64, 1000, 16384]),
       zero_runs=st.sampled_from(["auto", True, False]),
       n_seg=st.integers(1, 4))
def test_round_trip_property(data, rel_step, k, block_size, zero_runs, n_seg):
    x, scale = data
    n = x.numel()
    step = rel_step * scale
    if n_seg > 1 and n >= n_seg:
        lengths = [n // n_seg] * (n_seg - 1)
        lengths.append(n - sum(lengths))
        steps = [step * (i + 1) for i in range(n_seg)]
        frame = encode(x, steps, segments=lengths, k=k, block_size=block_size,
                       zero_runs=zero_runs)
    else:
        lengths, steps = [n], [step]
        frame = encode(x, step, k=k, block_size=block_size, zero_runs=zero_runs)
    y = decode(frame)
    assert same_bits(y, expected(x, steps, lengths))
    # and again from the raw bytes, as a receiving rank sees them
    assert same_bits(decode(frame.tobytes()), y)
    info = inspect(frame)
    assert info.numel == n and info.shape == tuple(x.shape) and info.dtype == x.dtype
    if k != "auto":
        assert all(b.k == k for b in info.blocks)
    if zero_runs is False:
        # Rice and rANS blocks only where the encoder picks the order
        assert all(b.mode in (("eg", "rice", "rans") if k == "auto" else ("eg",))
                   for b in info.blocks)
    if zero_runs is True:  # values in Golomb-Rice codewords only where k is picked
        assert all(b.mode in ("zero_runs", "zero_runs_rice" if k == "auto" else "zero_runs")
                   for b in info.blocks)


# --------------------------------------------------------------------------- reference


def reference_frame_parts(x: torch.Tensor, steps, lengths, block_size, k_fixed, zr):
    """Per block (mode, k, k_run, bytes, bits) from the pure-Python reference."""
    xs = x.reshape(-1)
    xs = (xs if x.dtype in (torch.float32, torch.float64) else xs.float()).numpy()
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    us, exc = reference.quantize(xs, bounds, np.asarray(steps, np.float64))
    parts = []
    for start, count in reference.block_layout(bounds, block_size):
        blk = us[start:start + count]
        mode, k, krun = reference.choose(blk, k_fixed, zr)
        data, nbits = reference.encode_block(blk, mode, k, krun)
        parts.append((mode, k, krun, data, nbits))
    return parts, exc


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(0, 700),
       beta=st.sampled_from([0.3, 0.7, 1.0, 2.0]), rel_step=st.sampled_from([0.05, 0.3, 1.5]),
       block_size=st.sampled_from([1, 2, 3, 4, 5, 100, 256]),
       k=st.sampled_from([-1, 0, 2, 7, 8, 9]),
       zr=st.sampled_from([0, 1, 2]), sparse=st.booleans())
def test_kernels_equal_reference_bit_for_bit(seed, n, beta, rel_step, block_size, k, zr,
                                             sparse):
    g = torch.Generator().manual_seed(seed)
    x = ggcomm.gg.sample((n,), beta, generator=g)
    if sparse and n:
        x[torch.rand(n, generator=g) < 0.8] = 0.0
    if n > 3:
        x[1] = float("nan")
        x[3] = 1e12
    frame = encode(x, rel_step, k="auto" if k < 0 else k, block_size=block_size,
                   zero_runs={0: False, 1: "auto", 2: True}[zr])
    info = inspect(frame)
    parts, exc = reference_frame_parts(x, [rel_step], [n], block_size, k, zr)
    assert list(info.exception_positions) == exc
    modes = {"eg": 0, "zero_runs": 1, "rice": 2, "zero_runs_rice": 3}
    assert [(modes[b.mode], b.k, b.k_run, b.bit_length) for b in info.blocks] == \
        [(m, kk, kr, nb) for m, kk, kr, _, nb in parts]
    assert info.payload == b"".join(p[3] for p in parts)
    # the reference decoder reads the kernels' payload back to the same symbols
    off = 0
    xs = x.numpy()
    us, _ = reference.quantize(xs, np.array([0, n], np.int64), np.array([rel_step]))
    for b, (mode, kk, kr, data, nb) in zip(info.blocks, parts, strict=True):
        got = reference.decode_block(info.payload[off:off + len(data)], nb, b.count, mode, kk,
                                     kr)
        assert got == us[b.first:b.first + b.count]
        off += len(data)


@pytest.mark.parametrize("beta,rel_step,block_size,n", [
    (3.0, 0.6, 4096, 9000), (2.0, 0.3, 2048, 5000), (2.0, 1.2, 1000, 3001),
    (2.0, 0.8, 8192, 17000),
    (8.0, 0.2, 4096, 8192), (1.0, 0.5, 4096, 8192),
])
def test_kernels_equal_reference_bit_for_bit_with_rans(beta, rel_step, block_size, n):
    """Light-tailed data at a few bits per element: the kernels' mode-4 (rANS) blocks, and
    their choice of mode, equal the reference's bit for bit."""
    g = torch.Generator().manual_seed(int(10 * beta + block_size))
    x = ggcomm.gg.sample((n,), beta, generator=g)
    for k, zr in ((-1, 1), (-1, 0), (-1, 2), (3, 1)):
        frame = encode(x, rel_step, k="auto" if k < 0 else k, block_size=block_size,
                       zero_runs={0: False, 1: "auto", 2: True}[zr])
        info = inspect(frame)
        parts, _ = reference_frame_parts(x, [rel_step], [n], block_size, k, zr)
        modes = {"eg": 0, "zero_runs": 1, "rice": 2, "zero_runs_rice": 3, "rans": 4}
        assert [(modes[b.mode], b.k, b.k_run, b.bit_length) for b in info.blocks] == \
            [(m, kk, kr, nb) for m, kk, kr, _, nb in parts]
        assert info.payload == b"".join(p[3] for p in parts)
        if k >= 0 or zr == 2:  # a fixed k or forced zero runs turn mode 4 off
            assert all(b.mode != "rans" for b in info.blocks)
        off = 0
        us, _ = reference.quantize(x.numpy(), np.array([0, n], np.int64), np.array([rel_step]))
        for b, (mode, kk, kr, data, nb) in zip(info.blocks, parts, strict=True):
            got = reference.decode_block(info.payload[off:off + len(data)], nb, b.count, mode,
                                         kk, kr)
            assert got == us[b.first:b.first + b.count]
            off += len(data)
        # the same values as an EG-coded frame of x
        assert same_bits(decode(frame), decode(encode(x, rel_step, k=3, block_size=block_size)))
    if beta >= 2.0 and rel_step >= 0.6 and block_size >= 2048:  # light tails, 2-3 bits
        frame = encode(x, rel_step, block_size=block_size)
        assert any(b.mode == "rans" for b in inspect(frame).blocks)


def test_rans_divisors_give_the_exact_quotient():
    """The encoder's step (its quotient by f from a multiply and shifts) equals the exact
    one, x // f * 4096 + x % f + cum, for every frequency, at both ends of each quotient's
    range of x (the quotient is monotonic in x), for the lowest and highest quotients the
    state bound x < f * 2**20 allows and every 61st between; states at the bound emit a
    word first. (All 2**20 quotients pass too; that sweep takes a minute.)"""
    qs = np.unique(np.concatenate([np.arange(4096), np.arange(0, 1 << 20, 61),
                                   np.arange((1 << 20) - 4096, 1 << 20)])).astype(np.int64)
    assert _rans_steps(np.arange(1, eg.RANS_M + 1, dtype=np.int64), qs) == 0


def _rans_steps(freqs, qs):
    """How many (f, x) of the sweep the kernel's step gets wrong."""
    bad = 0
    for lo in range(0, freqs.size, eg.RANS_ALPHABET):
        f = freqs[lo:lo + eg.RANS_ALPHABET]
        freq = np.zeros(eg.RANS_ALPHABET, np.int64)
        freq[:f.size] = f
        cum = np.arange(eg.RANS_ALPHABET, dtype=np.int64) * 7
        tab = np.empty((eg.RANS_ALPHABET, 6), np.uint64)
        eg._rans_divisors(freq, cum, tab)
        bad += _rans_step_errors(tab, freq, cum, f.size, qs)
    return bad


@numba.njit(cache=False)
def _rans_step_errors(tab, freq, cum, n, qs):
    W = np.zeros(4, np.uint16)
    bad = 0
    for s in range(n):
        f = freq[s]
        for q in qs:
            for x in (q * f, q * f + f - 1):
                if x >= f << 20:
                    continue
                y, nw = eg._rans_put(np.uint64(x), np.uint64(s), tab, W, np.uint64(0))
                bad += np.int64(nw != 0) + np.int64(
                    np.int64(y) != (x // f) * eg.RANS_M + x % f + cum[s])
        y, nw = eg._rans_put(np.uint64(f << 20), np.uint64(s), tab, W, np.uint64(0))
        x = (f << 20) >> 16
        bad += np.int64(nw != 1) + np.int64(
            np.int64(y) != (x // f) * eg.RANS_M + x % f + cum[s])
    return bad


def test_zero_run_histogram_path_never_changes_the_bits():
    """Blocks alike and unlike their neighbours take either way of histogramming (from the
    nonzeros, or the plain histogram then the run histograms), whichever the previous
    block's verdict and the sample say: the codes and bytes are the reference's either way.
    """
    g = torch.Generator().manual_seed(11)
    bs = 1024
    gauss = torch.randn(bs, generator=g)
    kinds = {
        "runs win": torch.where(torch.rand(bs, generator=g) < 0.6, 0.0, gauss),
        "half zeros, runs lose": ggcomm.gg.sample((bs,), 1.0, generator=g),
        "very sparse": torch.where(torch.rand(bs, generator=g) < 0.9, 0.0, gauss),
        "dense": ggcomm.gg.sample((bs,), 2.0, generator=g),
        # 40% zeros and wide values (like ReLU gradients): zero runs win, below SPARSE_SHARE
        "wide, runs win": torch.where(torch.rand(bs, generator=g) < 0.4, 0.0,
                                      (gauss * 1000.0).round() + 7.0),
        # under a third zeros, so "auto" leaves zero runs out, though they would be cheaper
        # (wide values): every sampled symbol is zero, the block looks sparse
        "sampled zeros": torch.where((torch.arange(bs) % (bs // eg.SAMPLE_RUNS) < eg.SAMPLE_RUN)
                                     | (torch.rand(bs, generator=g) < 0.05), 0.0,
                                     (gauss * 1000.0).round() + 7.0),
    }
    order = ["half zeros, runs lose", "runs win", "runs win", "half zeros, runs lose",
             "half zeros, runs lose", "very sparse", "half zeros, runs lose", "dense",
             "runs win", "dense", "very sparse", "sampled zeros", "runs win", "sampled zeros",
             "wide, runs win", "wide, runs win", "half zeros, runs lose", "wide, runs win"]
    x = torch.cat([kinds[k] for k in order])
    before = ggcomm.get_num_threads()
    try:
        ggcomm.set_num_threads(1)  # one thread: each block's verdict passes to the next
        frame = encode(x, 1.0, block_size=bs)
    finally:
        ggcomm.set_num_threads(before)
    parts, _ = reference_frame_parts(x, [1.0], [x.numel()], bs, -1, 1)
    info = inspect(frame)
    modes = {"eg": 0, "zero_runs": 1, "rice": 2, "zero_runs_rice": 3, "rans": 4}
    assert [(modes[b.mode], b.k, b.k_run, b.bit_length) for b in info.blocks] == \
        [(m, kk, kr, nb) for m, kk, kr, _, nb in parts]
    assert info.payload == b"".join(p[3] for p in parts)
    # each block alone, with any verdict from its neighbour: the same choice, and the
    # verdict it passes on says whether zero runs won (whether they came close may depend
    # on the way taken: the plain way stops where the zero-run bound already loses)
    _, H, Hrun, Hval, Ts, pos, _, _, _ = eg._work_arrays(np.array([bs]), 0, 1)
    for kind, blk in kinds.items():
        u = np.empty(bs, np.int32)
        eg._quantize_to(blk.double().numpy(), 0, bs, 1.0, float(eg.QMAX), u)
        got = [eg._choose_code(u, bs, -1, 1, H, Hrun, Hval, Ts, pos, hint)
               for hint in (eg.RUNS_WON, eg.RUNS_CLOSE, eg.RUNS_FAR)]
        assert got[0][:5] == got[1][:5] == got[2][:5], kind
        won = kind in ("runs win", "very sparse", "wide, runs win")
        assert [g[5] == eg.RUNS_WON for g in got] == [won] * 3, kind
    sampled = kinds["sampled zeros"]
    zeros = int((sampled == 0).sum())
    assert 0.25 < zeros / bs < 1 / 3  # not considered for zero runs ...
    def block_bits(zero_runs):
        return inspect(encode(sampled, 1.0, block_size=bs, zero_runs=zero_runs)).blocks[0]

    assert block_bits(True).bit_length < block_bits(False).bit_length  # ... though cheaper
    assert block_bits("auto") == block_bits(False)


def test_rans_false_leaves_mode_4_out():
    """rans=False (the transports' default) codes the same values without mode-4 blocks."""
    x = ggcomm.gg.sample((40000,), 3.0, generator=torch.Generator().manual_seed(3))
    with_rans, without = encode(x, 0.5), encode(x, 0.5, rans=False)
    assert any(b.mode == "rans" for b in inspect(with_rans).blocks)
    assert all(b.mode != "rans" for b in inspect(without).blocks)
    assert same_bits(decode(with_rans), decode(without))
    assert with_rans.nbytes < without.nbytes
    f, _ = codec.encode_feedback(x.numpy(), None, np.array([0.5]), [x.numel()], rans=False)
    assert f.tobytes() == without.tobytes()
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="rans"):
            encode(x, 0.5, rans=bad)


def test_rans_cost_table_is_the_formats():
    """The kernels' estimate table is FORMAT.md's L[f] = floor(65536 log2(4096 / f) + 1/2)."""
    assert [int(v) for v in eg.RANS_LOG[1:]] == [reference.rans_log(f) for f in range(1, 4097)]


def test_reference_codewords_are_h264_ue():
    # k = 0 is H.264 ue(v): 1, 010, 011, 00100, 00101, ...
    assert [reference.eg_codeword(u, 0) for u in range(7)] == \
        ["1", "010", "011", "00100", "00101", "00110", "00111"]
    assert reference.eg_codeword(0, 2) == "100" and reference.eg_codeword(4, 2) == "01000"


# --------------------------------------------------------------------------- semantics


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_shapes_and_edge_sizes(dtype):
    for shape in [(), (0,), (1,), (2, 0), (3, 4, 5), (16385,)]:
        x = torch.randn(shape, dtype=torch.float64).to(dtype)
        f = encode(x, 0.01)
        y = decode(f)
        assert y.dtype == dtype and y.shape == x.shape
        assert same_bits(y, expected(x, [0.01], [x.numel()]))


def test_quantization_matches_rate_module():
    x = torch.randn(10000, dtype=torch.float64) * 3
    q = ggcomm.rate.quantize(x, 0.37)
    assert torch.equal(decode(encode(x, 0.37)), q.double() * 0.37)


def test_code_range_boundary_and_exceptions():
    step = 1.0
    qmax = float(eg.QMAX)
    x = torch.tensor([qmax, -qmax, qmax + 1, -(qmax + 1), float("nan"), float("inf"),
                      -float("inf"), 0.5, 1.5], dtype=torch.float64)
    f = encode(x, step)
    info = inspect(f)
    assert info.exception_positions == (2, 3, 4, 5, 6)
    y = decode(f)
    assert y[0] == qmax and y[1] == -qmax and y[2] == qmax + 1 and y[3] == -(qmax + 1)
    assert math.isnan(y[4]) and y[5] == math.inf and y[6] == -math.inf
    assert y[7] == 0.0 and y[8] == 2.0  # round half to even
    # NaN payload bits survive
    nan_bits = torch.tensor([0x7FC01234], dtype=torch.int32).view(torch.float32)
    assert torch.equal(decode(encode(nan_bits, 1.0)).view(torch.int32),
                       torch.tensor([0x7FC01234], dtype=torch.int32))


def test_segments_use_their_own_steps():
    x = torch.cat([torch.randn(1000) * 1e-4, torch.randn(10) * 10, torch.randn(3000)])
    steps, lengths = [1e-5, 0.1, 0.01], [1000, 10, 3000]
    f = encode(x, steps, segments=lengths, block_size=512)
    assert inspect(f).segment_lengths == tuple(lengths)
    assert inspect(f).steps == tuple(steps)
    assert same_bits(decode(f), expected(x, steps, lengths))
    # one step for everything would have zeroed the small segment out
    assert decode(encode(x, 0.01))[:1000].abs().max() == 0


def test_sparse_data_goes_below_one_bit():
    # 90% of the quantized symbols are zero, the rest are small GG-like integers
    g = torch.Generator().manual_seed(0)
    q = torch.round(ggcomm.gg.sample((1 << 18,), 1.0, std=3.0, generator=g))
    q[q == 0] = 1
    q[torch.rand(q.numel(), generator=g) < 0.9] = 0
    step = 0.01
    x = q * step
    sparse = encode(x, step)
    assert sparse.bits_per_element < 1.0
    assert all(b.mode in ("zero_runs", "zero_runs_rice") for b in inspect(sparse).blocks)
    # one prefix codeword per element takes at least a bit each
    plain = encode(x, step, zero_runs=False, k=0)
    assert plain.bits_per_element >= 1.0
    assert torch.equal(decode(sparse), decode(plain))
    # rANS (mode 4) codes a symbol in less than a bit where it is common
    rans = encode(x, step, zero_runs=False)
    assert rans.bits_per_element < 1.0
    assert all(b.mode == "rans" for b in inspect(rans).blocks)
    assert torch.equal(decode(sparse), decode(rans))


def test_auto_k_beats_every_fixed_k():
    x = ggcomm.gg.sample((20000,), 1.0, generator=torch.Generator().manual_seed(1))
    auto = encode(x, 0.1, zero_runs=False).nbytes
    assert all(auto <= encode(x, 0.1, k=k, zero_runs=False).nbytes for k in range(0, 10))


def test_header_overhead_under_one_percent_at_256k():
    x = ggcomm.gg.sample((65536,), 1.0, generator=torch.Generator().manual_seed(2))
    info = inspect(encode(x, 0.3))
    assert (info.nbytes - len(info.payload)) / info.nbytes < 0.01


def test_frame_buffer_forms_and_out():
    x = torch.randn(3, 333)
    f = encode(x, 0.02, tag=0xDEADBEEF)
    assert f.buffer.dtype == torch.uint8 and f.buffer.dim() == 1
    assert f.buffer.numel() == f.nbytes == len(f)
    for form in (f.buffer, f.buffer.numpy(), f.tobytes(), bytearray(f.tobytes()),
                 memoryview(f.tobytes())):
        g = ggcomm.Frame.from_buffer(form)
        assert g.tag == 0xDEADBEEF and g.shape == x.shape
        assert torch.equal(decode(g), decode(f))
    out = torch.empty(3, 333)
    r = decode(f, out=out)
    assert r is out and torch.equal(out, decode(f))
    out16 = torch.empty(999, dtype=torch.float16)
    decode(encode(x.half(), 0.02), out=out16)
    assert torch.equal(out16.view(3, 333), decode(encode(x.half(), 0.02)))
    with pytest.raises(ValueError, match="out must be"):
        decode(f, out=torch.empty(5))


def test_keep_out_false_decodes_into_out_itself(monkeypatch):
    """decode(out=, keep_out=False) writes a contiguous float32/float64 out directly (no
    scratch), exceptions included; other outs, and an out sharing memory with the frame,
    go through scratch and get the same values."""
    from ggcomm import codec

    x = torch.randn(4, 5000)
    x[1, 7], x[2, 9], x[3, 11] = float("nan"), float("inf"), 1e30
    f = encode(x, 0.02)
    want = decode(f).view(torch.int32)
    strided = torch.empty(4, 10000)[:, ::2]  # not contiguous: scratch
    assert decode(f, out=strided, keep_out=False) is strided
    assert torch.equal(strided.contiguous().view(torch.int32), want)
    half = torch.empty(4, 5000, dtype=torch.float16)  # not the work dtype: scratch
    fh = encode(x.half(), 0.02)
    assert torch.equal(decode(fh, out=half, keep_out=False).view(torch.int16),
                       decode(fh).view(torch.int16))
    # the frame's bytes at the start of the memory that out covers: scratch, then copied
    n = f.nbytes
    shared = torch.zeros(x.numel() + n)
    shared.view(torch.uint8)[:n] = f.buffer
    over = shared[:x.numel()].view(4, 5000)
    assert torch.equal(decode(shared.view(torch.uint8)[:n], out=over, keep_out=False)
                       .view(torch.int32), want)

    leaf = torch.zeros(4, 5000, requires_grad=True)  # autograd's check holds either way
    for keep in (True, False):
        with pytest.raises(RuntimeError, match="requires grad"):
            decode(f, out=leaf, keep_out=keep)

    def no_scratch(*args):
        raise AssertionError("decode(keep_out=False) went through scratch")

    monkeypatch.setattr(codec, "_decode_scratch", no_scratch)
    out = torch.full((4, 5000), 3.0)
    assert decode(f, out=out, keep_out=False) is out
    assert torch.equal(out.view(torch.int32), want)
    x64 = x.double()
    out64 = torch.empty(4, 5000, dtype=torch.float64)
    assert torch.equal(decode(encode(x64, 0.02), out=out64, keep_out=False).view(torch.int64),
                       decode(encode(x64, 0.02)).view(torch.int64))
    with pytest.raises(AssertionError, match="scratch"):  # the default keeps out
        decode(f, out=out)


def test_threads_do_not_change_the_bytes():
    x = torch.randn(300000)
    before = ggcomm.get_num_threads()
    try:
        ggcomm.set_num_threads(1)
        one = encode(x, 0.05, block_size=1024).tobytes()
        ggcomm.set_num_threads(3)
        three = encode(x, 0.05, block_size=1024)
        assert three.tobytes() == one
        assert torch.equal(decode(three), decode(one))
    finally:
        ggcomm.set_num_threads(before)


@pytest.mark.parametrize("bad", [
    dict(step=0.0), dict(step=-1.0), dict(step=float("nan")), dict(step=float("inf")),
    dict(step=1e-320), dict(k=31), dict(k=-1), dict(k="best"), dict(block_size=0),
    dict(block_size=(1 << 22) + 1), dict(zero_runs="yes"), dict(tag=-1),
    dict(step=[0.1, 0.2]), dict(step=[0.1, 0.2], segments=[5, 4]),
])
def test_bad_arguments_raise_value_error(bad):
    kwargs = dict(step=0.1)
    kwargs.update(bad)
    step = kwargs.pop("step")
    with pytest.raises(ValueError):
        encode(torch.randn(10), step, **kwargs)


def test_non_float_input_raises_type_error():
    with pytest.raises(TypeError):
        encode(torch.arange(10), 1.0)
    with pytest.raises(TypeError):
        encode(np.zeros(3), 1.0)


# --------------------------------------------------------------------------- corruption


def _sample_frames():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(700, generator=g)
    x[5] = float("nan")
    sparse = torch.randn(900, generator=g)
    sparse[torch.rand(900, generator=g) < 0.9] = 0
    return [encode(x, 0.1, block_size=128), encode(sparse, 0.05, block_size=300),
            encode(torch.randn(2, 5, dtype=torch.bfloat16), 0.5),
            encode(torch.tensor(1.5), 0.25)]


def test_every_truncation_raises():
    for f in _sample_frames():
        data = f.tobytes()
        for cut in range(len(data)):
            with pytest.raises(FrameError):
                decode(data[:cut])
        with pytest.raises(FrameError):
            decode(data + b"\0")


def test_random_bit_flips_raise():
    rng = np.random.default_rng(0)
    for f in _sample_frames():
        data = np.frombuffer(f.tobytes(), np.uint8)
        for _ in range(1000):
            bad = data.copy()
            for bit in rng.choice(data.size * 8, rng.integers(1, 4), replace=False):
                bad[bit // 8] ^= np.uint8(1 << (bit % 8))
            with pytest.raises(FrameError):
                decode(bad)


def _recrc(buf: np.ndarray) -> np.ndarray:
    buf[-4:] = np.frombuffer(zlib.crc32(buf[:-4].tobytes()).to_bytes(4, "little"), np.uint8)
    return buf


def test_random_bursts_raise():
    """CRC-32 detects every error burst of up to 32 bits: a burst anywhere (header, tables,
    payload or the checksum itself) always raises FrameError."""
    rng = np.random.default_rng(2)
    for f in _sample_frames():
        data = np.frombuffer(f.tobytes(), np.uint8)
        for _ in range(500):
            bad = data.copy()
            start = int(rng.integers(0, data.size * 8 - 32))
            pattern = int(rng.integers(1, 2**32)) | 1  # the burst's first bit is in error
            for j in range(32):
                if pattern >> j & 1:
                    bit = start + j
                    bad[bit // 8] ^= np.uint8(1 << (7 - bit % 8))
            with pytest.raises(FrameError):
                decode(bad)


def _agrees_with_the_spec_reader(bad: np.ndarray) -> str:
    """decode(bad) either raises FrameError and the independent reader of
    test_format_reader (written from FORMAT.md alone) rejects the frame too, or both decode
    it to the same bits, of the dtype, shape and numel its (mutated) header claims."""
    from test_format_reader import bits_equal, parse_frame, read_frame

    try:
        y = decode(bad)
    except FrameError:
        with pytest.raises(ValueError):
            read_frame(bad.tobytes())
        return "error"
    pf = parse_frame(bad.tobytes())
    head = inspect(bad)
    assert y.dtype == head.dtype and tuple(y.shape) == head.shape == pf.shape
    assert y.numel() == head.numel == pf.numel == math.prod(pf.shape)
    assert bits_equal(y, read_frame(bad.tobytes()))
    return "decoded"


@pytest.mark.filterwarnings("ignore:overflow encountered")  # q * step past the dtype: +-inf, valid
def test_corruption_behind_a_valid_checksum_never_crashes():
    """With the CRC recomputed, the structure checks and the kernels' bounds checks alone
    must stand between garbage and memory: ggcomm and the independent reader agree on
    every corrupted frame, rejecting it (FrameError) or decoding it to the same bits."""
    rng = np.random.default_rng(1)
    frames = _sample_frames()
    outcomes = {"error": 0, "decoded": 0}
    for f in frames:
        data = np.frombuffer(f.tobytes(), np.uint8)
        for _ in range(1500):
            bad = data.copy()
            for _ in range(rng.integers(1, 6)):
                i = rng.integers(0, data.size - 4)
                bad[i] = rng.integers(0, 256) if rng.random() < 0.3 else bad[i] ^ (
                    1 << rng.integers(0, 8))
            _recrc(bad)
            outcomes[_agrees_with_the_spec_reader(bad)] += 1
    assert outcomes["error"] > 0 and outcomes["decoded"] > 0


# fixed-header fields: offset, struct format, values to try
_HEADER_EDITS = [(4, "B", [0, 2, 255]), (5, "B", [0, 1, 2, 3, 4, 5]), (6, "B", [0, 1, 2, 65]),
                 (7, "B", [1, 128]), (8, "<I", [0, 2**32 - 1]),
                 (12, "<I", [0, 1, 2, 127, 128, 129, 2**22, 2**22 + 1, 2**32 - 1]),
                 (16, "<Q", [0, 1, 9, 10, 699, 700, 701, 2**62, 2**64 - 1]),
                 (24, "<I", [0, 1, 2, 2**32 - 1]), (28, "<I", [0, 1, 5, 6, 7, 2**32 - 1]),
                 (32, "<Q", [0, 1, 2, 700, 2**64 - 1]), (40, "<Q", [0, 1, 2**64 - 1])]


@pytest.mark.filterwarnings("ignore:overflow encountered")  # q * step past the dtype: +-inf, valid
def test_header_edits_with_the_checksum_recomputed():
    """Every fixed-header field and every shape, segment and block-table field set to edge
    values, CRC recomputed: a FrameError, or exactly what the edited header describes."""
    outcomes = {"error": 0, "decoded": 0}
    for f in _sample_frames():
        data = np.frombuffer(f.tobytes(), np.uint8)
        edits = [(o, fmt, v) for o, fmt, vals in _HEADER_EDITS for v in vals]
        ndim, n_seg, n_blocks = int(data[6]), *struct.unpack_from("<II", data, 24)
        o = 48
        edits += [(o + 8 * i, "<Q", v) for i in range(ndim) for v in (0, 1, 7, 2**63)]
        o += 8 * ndim
        for i in range(n_seg):
            edits += [(o + 16 * i, "<Q", v) for v in (0, 1, 699, 701, 2**63, 2**64 - 1)]
            edits += [(o + 16 * i + 8, "<d", v) for v in (0.0, -1.0, 5e-324, 0.2, 1e300,
                                                           math.inf, math.nan)]
        o += 16 * n_seg
        for i in range(min(n_blocks, 3)):
            edits += [(o + 8 * i + j, "B", v) for j in range(4) for v in (0, 1, 2, 30, 31)]
            edits += [(o + 8 * i + 4, "<I", v) for v in (0, 1, 7, 8, 2**32 - 1)]
        for off, fmt, v in edits:
            bad = data.copy()
            struct.pack_into(fmt, bad, off, v)
            outcomes[_agrees_with_the_spec_reader(_recrc(bad))] += 1
    assert outcomes["error"] > 0 and outcomes["decoded"] > 0


@pytest.mark.parametrize("field,offset,value,message", [
    ("magic", 0, b"XXXX", "magic"),
    ("version", 4, b"\x07", "version"),
    ("dtype", 5, b"\x09", "dtype"),
    ("flags", 7, b"\x01", "flags"),
])
def test_header_errors_name_the_problem(field, offset, value, message):
    buf = np.frombuffer(encode(torch.randn(100), 0.1).tobytes(), np.uint8).copy()
    buf[offset:offset + len(value)] = np.frombuffer(value, np.uint8)
    _recrc(buf)
    with pytest.raises(FrameError, match=message):
        decode(buf)


def test_payload_errors_are_frame_errors():
    f = encode(torch.randn(1000), 0.1, block_size=250)
    info = inspect(f)
    buf = np.frombuffer(f.tobytes(), np.uint8).copy()
    start = info.header_bytes
    buf[start:start + len(info.payload)] = 0  # all-zero payload: endless zero prefixes
    _recrc(buf)
    with pytest.raises(FrameError, match="block 0"):
        decode(buf)


@pytest.mark.parametrize("scale", [1.0, 50.0, 3e4, 2e7])
def test_rice_blocks_with_escapes_match_reference(scale):
    """Mode 2 (Golomb-Rice, EG escape) at small and large orders, outliers escaping: the
    kernels write the reference's bits and read them back (table path, clz path, escapes)."""
    g = torch.Generator().manual_seed(int(scale))
    x = torch.randn(3000, generator=g) * scale
    x[::97] *= 40.0  # rare outliers: escapes in Rice blocks
    frame = encode(x, 1.0, block_size=512)
    info = inspect(frame)
    assert info.version == codec.VERSION == 3
    rice = [b for b in info.blocks if b.mode == "rice"]
    assert rice, [b.mode for b in info.blocks]
    parts, exc = reference_frame_parts(x, [1.0], [x.numel()], 512, -1, 1)
    assert info.payload == b"".join(p[3] for p in parts)
    us, _ = reference.quantize(x.numpy(), np.array([0, x.numel()], np.int64), np.array([1.0]))
    assert any(u >> b.k >= 16 for b in rice for u in us[b.first:b.first + b.count])
    assert same_bits(decode(frame), expected(x, [1.0], [x.numel()]))


def test_large_fresh_outputs_are_ordinary_tensors():
    """Results of 32 MiB and more are mapped on huge pages where the OS offers them: the
    same values as a decode into ``out``, writable, usable as any tensor."""
    from ggcomm import codec

    x = torch.randn(8 << 20, generator=torch.Generator().manual_seed(5))
    frame = encode(x, 0.05)
    y = decode(frame)
    assert y.numel() * 4 >= codec._HUGE_PAGE_MIN_BYTES
    assert torch.equal(y, decode(frame, out=torch.empty_like(x)))
    y[::2] = 1.0  # writable
    assert float(y[0]) == 1.0 and torch.equal(y[1::2], decode(frame)[1::2])
    q, _, _ = codec.decode_symbols(frame)
    assert torch.equal(q, torch.round(x.double() / 0.05))


def test_the_frame_crc_is_zlibs_crc32_through_isal_where_it_installs() -> None:
    import platform

    data = np.random.default_rng(0).integers(0, 256, 100_003, dtype=np.uint8)
    assert codec.crc32(data) == zlib.crc32(data.tobytes())
    assert codec.crc32(data[5:]) == zlib.crc32(data[5:].tobytes())
    assert codec.crc32(b"") == 0
    if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):  # pyproject's marker
        from isal import isal_zlib

        assert codec.crc32 is isal_zlib.crc32
