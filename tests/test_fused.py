"""The fused kernels of the DDP data path, against the pure-Python reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ggcomm import codec
from ggcomm.codec import FrameError
from ggcomm.kernels import eg, reference


def _data(seed, n, scale=1.0, specials=False):
    rng = np.random.default_rng(seed)
    g = (rng.laplace(size=n) * scale).astype(np.float32)
    r = (rng.uniform(-0.5, 0.5, size=n) * 0.1 * scale).astype(np.float32)
    if specials and n > 10:
        g[3], g[7], g[n - 1] = np.inf, np.nan, 3e30
    return g, r


@pytest.mark.parametrize("feedback", [True, False])
@pytest.mark.parametrize("specials", [False, True])
def test_encode_feedback_equals_encode_and_the_reference(feedback, specials):
    g, r = _data(1, 3000, specials=specials)
    lengths = [1000, 0, 1500, 500]
    steps = np.array([0.3, 1.0, 0.05, 2.0])
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    x_ref, r_ref, q_ref, stats_ref = reference.feedback(g, r if feedback else None, bounds,
                                                       steps)
    resid = r.copy() if feedback else None
    q = np.zeros(g.size, np.int32)
    frame, stats = codec.encode_feedback(g, resid, steps, lengths, block_size=256, tag=9,
                                         q_out=q)
    plain = codec.encode(torch.from_numpy(x_ref), steps, segments=lengths, block_size=256,
                         tag=9)
    assert frame.tobytes() == plain.tobytes()  # the same frame, bit for bit
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_allclose(stats, stats_ref, rtol=1e-12)
    if feedback:
        np.testing.assert_array_equal(resid, r_ref)


def _frames(n_ranks, n, lengths, steps, specials=False):
    out = []
    for rank in range(n_ranks):
        g, _ = _data(10 + rank, n, specials=specials and rank == 1)
        q = np.zeros(n, np.int32)
        f, _ = codec.encode_feedback(g, None, steps, lengths, block_size=128, q_out=q)
        out.append((f, q, g))
    return out


@pytest.mark.parametrize("specials", [False, True])
def test_sum_frames_equals_the_reference_sum(specials):
    n, lengths, steps = 2000, [700, 1300], np.array([0.2, 0.7])
    bounds = np.array([0, 700, 2000])
    parts = _frames(3, n, lengths, steps, specials)
    buffer = torch.cat([f.buffer for f, _, _ in parts])
    offs = np.concatenate([[0], np.cumsum([f.nbytes for f, _, _ in parts])])
    own = 1  # this rank's own frame is never decoded: its integers come from the encoder
    frames = [None if i == own else (int(offs[i]), codec.Frame.from_buffer(buffer[offs[i]:]
                                                                           [:parts[i][0].nbytes]))
              for i in range(3)]
    own_f = parts[own][0]
    own_exc = own_f.exceptions()
    out = np.empty(n, np.float32)
    codec.sum_frames(buffer, frames, own=parts[own][1], own_exceptions=own_exc, divisor=3.0,
                     out=out)
    us = [list(reference.quantize(g, bounds, steps)[0]) for _, _, g in parts]
    extra = {}
    for f, _, _ in parts:
        pos, vals = f.exceptions()
        for p, v in zip(pos.tolist(), vals.tolist(), strict=True):
            extra[p] = extra.get(p, 0.0) + v
    expected = reference.frame_sum(us, extra, bounds, steps, 3.0)
    np.testing.assert_array_equal(out, expected)
    # the integer mode: the exact sums, and the exceptions handed back
    ints = np.empty(n, np.int64)
    xpos, xval = codec.sum_frames(buffer, frames, own=parts[own][1], own_exceptions=own_exc,
                                  out=ints)
    qsum = np.array([sum(reference.q_of_u(u[i]) for u in us) for i in range(n)])
    np.testing.assert_array_equal(ints, qsum)
    assert sorted(extra) == xpos.tolist()


def test_encode_integers_round_trips_sums_and_exceptions():
    n, lengths, steps = 1500, [500, 1000], np.array([0.5, 0.25])
    rng = np.random.default_rng(3)
    s = rng.integers(-40, 40, n).astype(np.int64)
    s[10] = 2**31 + 5  # beyond the code's range: an exception
    extra_pos, extra_val = np.array([20, 600]), np.array([np.inf, 1.5])
    expected = s * np.repeat(steps, lengths)
    expected[extra_pos] += extra_val
    frame = codec.encode_integers(s.copy(), steps, lengths, extra_pos, extra_val,
                                  block_size=64)
    back = codec.decode(codec.Frame.from_buffer(frame.tobytes())).numpy()
    np.testing.assert_array_equal(back, expected)


def test_sum_frames_rejects_a_corrupt_or_mismatched_frame():
    n, lengths, steps = 1000, [1000], np.array([0.2])
    parts = _frames(2, n, lengths, steps)
    good = parts[0][0]
    # a frame at other steps cannot be summed with the first
    other, _ = codec.encode_feedback(parts[1][2], None, np.array([0.3]), lengths,
                                     block_size=128)
    buffer = torch.cat([good.buffer, other.buffer])
    frames = [(0, good), (good.nbytes, codec.Frame.from_buffer(buffer[good.nbytes:]))]
    with pytest.raises(FrameError, match="frame 1: its steps differ"):
        codec.sum_frames(buffer, frames, out=np.empty(n, np.float32))
    # a payload zeroed after the CRC check (no valid codeword): the decoder refuses it
    bad = good.buffer.clone()
    bad[good._h.payload_off:good._h.payload_off + 16] = 0
    f = codec.Frame(bad, good._h)
    with pytest.raises(FrameError, match="frame 0, block 0"):
        codec.sum_frames(bad, [(0, f)], out=np.empty(n, np.float32))


def test_moments_match_numpy_over_finite_values():
    g, r = _data(5, 70000, specials=True)
    got = codec.moments(g, r, [30000, 0, 40000])
    x = (g + r).astype(np.float64)
    for i, (lo, hi) in enumerate([(0, 30000), (30000, 30000), (30000, 70000)]):
        seg = x[lo:hi]
        fin = seg[np.isfinite(seg)]
        np.testing.assert_allclose(got[i, :2], [np.square(fin).sum(), np.abs(fin).sum()],
                                   rtol=1e-9)
        assert got[i, 2] == (~np.isfinite(seg)).sum()
    with pytest.raises(ValueError, match="segments add up"):
        codec.moments(g, None, [5])


def test_encode_integers_is_encode_of_the_same_values():
    n, lengths, steps = 3000, [1000, 2000], np.array([0.5, 0.125])
    s = np.random.default_rng(4).integers(-300, 300, n).astype(np.int64)
    values = torch.from_numpy(s * np.repeat(steps, lengths))  # exact in float64
    frame = codec.encode_integers(s.copy(), steps, lengths, np.empty(0, np.int64),
                                  np.empty(0), block_size=256, tag=3)
    plain = codec.encode(values, steps, segments=lengths, block_size=256, tag=3)
    assert frame.tobytes() == plain.tobytes()


@pytest.mark.parametrize("seed", range(6))
def test_zero_runs_bound_never_exceeds_the_zero_runs_bits(seed):
    # the encoder skips the run histograms when this bound reaches EG's bits: exact only
    # if the bound is a true lower bound of the zero-run mode's bits
    from ggcomm.kernels import eg

    rng = np.random.default_rng(seed)
    for cnt in (1, 2, 3, 4, 5, 17, 1000, 16384):
        x = rng.laplace(size=cnt) * rng.choice([0.3, 1.0, 5.0, 100.0])
        x[rng.random(cnt) < rng.random()] = 0.0  # runs of exact zeros
        scratch = np.empty(cnt, np.int32)
        eg._quantize(x.astype(np.float32), 0, cnt, 1.0, scratch)
        H, T = np.zeros((eg._NBINS, eg._HCOLS), np.int64), np.zeros(4 * eg._LANE, np.int64)
        eg._histogram(scratch, cnt, H, T)
        eg._best_k(H)
        bound = eg._zero_runs_bound(scratch, cnt, T, H, H[0, 0])
        Hrun, Hval = np.zeros_like(H), np.zeros_like(H)
        eg._zero_run_hists(scratch, cnt, Hrun, Hval, np.empty(cnt, np.int32), np.zeros_like(T),
                           np.zeros_like(T), H, T, False)
        exact = eg._best_k(Hrun)[1] + eg._best_k(Hval)[1]
        assert bound <= exact, (cnt, bound, exact)


@pytest.mark.parametrize("seed", range(4))
def test_sparse_histograms_are_the_plain_ones(seed):
    # a block that looks mostly zeros is histogrammed from its nonzeros alone; the encoder's
    # choice is exact only if those histograms are the plain pass's, bit for bit
    from ggcomm.kernels import eg

    rng = np.random.default_rng(seed)
    for cnt in (1, 3, 255, 256, 1000, 16384):
        for zero_share in (0.0, 0.3, 0.6, 0.95, 1.0):
            x = rng.laplace(size=cnt) * rng.choice([0.3, 3.0, 300.0])
            x[rng.random(cnt) < zero_share] = 0.0
            x[:cnt // 7] = 0.0  # a long run
            u = np.empty(cnt, np.int32)
            eg._quantize(x.astype(np.float32), 0, cnt, 1.0, u)
            H, T = np.zeros((eg._NBINS, eg._HCOLS), np.int64), np.zeros(4 * eg._LANE, np.int64)
            eg._histogram(u, cnt, H, T)
            runs = [np.zeros_like(H) for _ in range(4)]
            tables = [np.zeros_like(T) for _ in range(4)]
            pos = np.empty(cnt, np.int32)
            nnz = eg._zero_run_hists(u, cnt, runs[0], runs[1], pos, tables[0], tables[1],
                                     np.zeros_like(H), np.zeros_like(T), False)
            Hs, Ts = np.zeros_like(H), np.zeros_like(T)
            nnz_s = eg._zero_run_hists(u, cnt, runs[2], runs[3], pos, tables[2], tables[3], Hs,
                                       Ts, True)
            assert nnz == nnz_s == np.count_nonzero(u)
            np.testing.assert_array_equal(Hs, H)
            np.testing.assert_array_equal(runs[2], runs[0])
            np.testing.assert_array_equal(runs[3], runs[1])
            np.testing.assert_array_equal(pos[:nnz], np.flatnonzero(u))


def _mixed_frame():
    """A frame whose blocks take every path of the grouped decoder: EG and Golomb-Rice
    blocks at table orders (k <= 8), at larger k, zero-run blocks, and a short last group."""
    rng = np.random.default_rng(7)
    parts = [rng.laplace(size=4096) * 3.0,  # EG / Golomb-Rice, small k
             rng.normal(size=2048) * 1e4,  # k above the table orders
             np.where(rng.random(3000) < 0.95, 0.0, rng.normal(size=3000)),  # zero runs
             rng.standard_t(1.5, size=1500)]  # heavy tails: codewords the table lacks
    x = torch.from_numpy(np.concatenate(parts).astype(np.float32))
    lengths = [p.size for p in parts]
    return codec.encode(x, np.array([0.5, 1.0, 0.1, 0.05]), segments=lengths,
                        block_size=256), x


def _blockwise(payload, h, arrays, luts):
    """(error code, block) of a plain block-by-block decode, as decoders did before groups."""
    modes, ks, kruns, bits, offsets = arrays
    starts, counts, _ = h.layout
    scratch = np.empty(int(counts.max()), np.int32)
    for b in range(counts.size):
        p0 = int(offsets[b]) * 8
        err = eg._decode_block(payload, p0, p0 + int(bits[b]), int(counts[b]), int(modes[b]),
                               int(ks[b]), int(kruns[b]), luts, scratch)
        if err:
            return err, b
        for i in h.exc_pos[(h.exc_pos >= starts[b]) & (h.exc_pos < starts[b] + counts[b])]:
            if scratch[i - starts[b]] != 0:
                return eg.ERR_EXCEPTION_CODE, b
    return 0, -1


def test_grouped_decoding_reports_what_block_by_block_decoding_reports():
    frame, x = _mixed_frame()
    modes = {b.mode for b in codec.inspect(frame).blocks}
    assert {"eg", "rice", "zero_runs", "zero_runs_rice"} <= modes
    buf, h = codec._frame_and_header(frame)
    arrays = codec._block_arrays(h)
    ks = arrays[1]
    assert ks.max() > eg.LUT_K_MAX and (ks <= eg.LUT_K_MAX).sum() >= 2 * eg.LANES
    luts = codec._luts()
    starts, counts, seg = h.layout
    payload0 = buf[h.payload_off:h.payload_off + h.payload_len].copy()
    np.testing.assert_array_equal(codec.decode(frame), codec.decode(frame.tobytes()))
    rng = np.random.default_rng(0)
    seen = set()
    for trial in range(300):
        payload = payload0.copy()
        for _ in range(1 + trial % 3):  # flip 1-3 bits
            bit = int(rng.integers(payload.size * 8))
            payload[bit >> 3] ^= np.uint8(0x80 >> (bit & 7))
        out = np.zeros(h.numel, np.float32)
        got = eg.decode_blocks(payload, starts, counts, h.steps[seg], 0, counts.size,
                               *arrays, luts, h.exc_pos, out)
        want = _blockwise(payload, h, arrays, luts)
        assert (int(got[0]), int(got[1])) == want, trial
        seen.add(want[0])
        if want[0] == 0:  # a flip that still decodes: the values are the stream's
            q, _, _ = codec.decode_symbols(codec.Frame(torch.from_numpy(np.concatenate(
                [buf[:h.payload_off], payload, buf[h.payload_off + h.payload_len:]])), h))
            np.testing.assert_array_equal(out, (q * torch.from_numpy(
                np.repeat(h.steps, np.diff(h.seg_bounds)))).float().numpy())
    assert len(seen) >= 3  # several kinds of error were met


def test_grouped_sum_names_the_corrupt_frame_and_block():
    frame, _ = _mixed_frame()
    good = frame.buffer
    buf, h = codec._frame_and_header(frame)
    arrays = codec._block_arrays(h)
    luts = codec._luts()
    rng = np.random.default_rng(1)
    for _ in range(40):
        bad = good.clone()
        bit = int(rng.integers(h.payload_len * 8))
        bad[h.payload_off + (bit >> 3)] ^= 0x80 >> (bit & 7)
        want = _blockwise(bad.numpy()[h.payload_off:h.payload_off + h.payload_len], h,
                          arrays, luts)
        buffer = torch.cat([good, bad])
        frames = [(0, frame), (good.numel(), codec.Frame(buffer[good.numel():], h))]
        if want[0] == 0:
            codec.sum_frames(buffer, frames, out=np.empty(h.numel, np.float32))
            continue
        with pytest.raises(FrameError, match=f"frame 1, block {want[1]}:"):
            codec.sum_frames(buffer, frames, out=np.empty(h.numel, np.float32))


def test_kernels_refuse_a_block_table_that_does_not_fit():
    """The decoders are called by ggcomm.codec after it validated the block table; called
    directly with a table that places a block past the payload or the output, they refuse
    it (ERR_TABLE) instead of reading or writing outside the arrays."""
    frame, _ = _mixed_frame()
    buf, h = codec._frame_and_header(frame)
    modes, ks, kruns, bits, offsets = codec._block_arrays(h)
    luts = codec._luts()
    starts, counts, seg = h.layout
    payload = buf[h.payload_off:h.payload_off + h.payload_len].copy()
    last = counts.size - 1

    def decode(payload, bits, offsets, starts, n_out):
        return tuple(int(v) for v in eg.decode_blocks(
            payload, starts, counts, h.steps[seg], 0, counts.size, modes, ks, kruns, bits,
            offsets, luts, h.exc_pos, np.zeros(n_out, np.float32)))

    assert decode(payload, bits, offsets, starts, h.numel) == (0, -1)
    assert decode(payload[:-1], bits, offsets, starts, h.numel) == (eg.ERR_TABLE, last)
    far = offsets.copy()
    far[3] = payload.size  # block 3 starts where the payload ends
    assert decode(payload, bits, far, starts, h.numel) == (eg.ERR_TABLE, 3)
    neg = bits.copy()
    neg[5] = -8
    assert decode(payload, neg, offsets, starts, h.numel) == (eg.ERR_TABLE, 5)
    assert decode(payload, bits, offsets, starts, h.numel - 1) == (eg.ERR_TABLE, last)

    def reduce(pay_hi, n_out, own):
        mb = [a[None] for a in (modes, ks, kruns, bits, offsets)]
        return tuple(int(v) for v in eg.reduce_blocks(
            payload, np.array([0], np.int64), np.array([pay_hi], np.int64), *mb, starts,
            counts, h.steps[seg], 0, counts.size, luts, own, h.exc_pos,
            np.array([0, h.exc_pos.size], np.int64), np.empty(0, np.int64),
            np.empty(0, np.float64), 1.0, np.zeros(n_out, np.float32), np.empty(0, np.int64)))

    none = np.empty(0, np.int32)
    assert reduce(payload.size, h.numel, none) == (0, -1, -1)
    assert reduce(payload.size - 1, h.numel, none) == (eg.ERR_TABLE, last, 0)
    assert reduce(payload.size + 1, h.numel, none)[0] == eg.ERR_TABLE  # past buf
    assert reduce(payload.size, h.numel - 1, none) == (eg.ERR_TABLE, last, 0)
    assert reduce(payload.size, h.numel, np.zeros(h.numel - 1, np.int32))[0] == eg.ERR_TABLE


def test_small_symbol_fold_is_the_per_symbol_histogram():
    # _fold_small turns the four interleaved count tables into the (m, t) histogram by
    # running totals; it must equal counting each symbol on its own (_hist_add)
    from ggcomm.kernels import eg

    rng = np.random.default_rng(5)
    for _ in range(40):
        top = int(rng.integers(0, eg._SMALL))
        T = np.zeros(4 * eg._LANE, np.int64)
        for lane in range(4):
            for u in range(eg._SMALL):
                if (u | top) == top and rng.random() < 0.5:  # symbols within top's bits
                    T[lane * eg._LANE + u] = rng.integers(0, 40)
        totals = [sum(T[lane * eg._LANE + u] for lane in range(4)) for u in range(eg._SMALL)]
        want = np.zeros((eg._NBINS, eg._HCOLS), np.int64)
        for u, c in enumerate(totals):
            for _ in range(c):
                eg._hist_add(want, u)
        got = np.zeros_like(want)
        eg._fold_small(T, got, np.uint64(top))
        np.testing.assert_array_equal(got, want)


def test_reused_histogram_tables_start_clean():
    # the encoder's work arrays serve block after block and are cleared only as far as
    # the last block's symbols reached: a block of small symbols after one of large ones
    # must histogram as on fresh arrays, both ways
    from ggcomm.kernels import eg

    rng = np.random.default_rng(6)
    cnt = 4096
    big = rng.integers(0, 3 * eg._SMALL, cnt).astype(np.int32)
    big[rng.random(cnt) < 0.6] = 0
    small = rng.integers(0, 4, cnt).astype(np.int32)
    small[rng.random(cnt) < 0.6] = 0

    def hists(blocks, fresh):
        H, T = np.zeros((eg._NBINS, eg._HCOLS), np.int64), np.zeros(4 * eg._LANE, np.int64)
        Hr, Hv, Tr, Tv = np.zeros_like(H), np.zeros_like(H), np.zeros_like(T), np.zeros_like(T)
        pos = np.empty(cnt, np.int32)
        out = []
        for u in blocks:
            if fresh:
                H, T, Hr, Hv, Tr, Tv = (np.zeros_like(a) for a in (H, T, Hr, Hv, Tr, Tv))
            eg._histogram(u, cnt, H, T)
            plain = H.copy(), [sum(T[lane * eg._LANE + s] for lane in range(4))
                               for s in range(eg._SMALL)]
            eg._zero_run_hists(u, cnt, Hr, Hv, pos, Tr, Tv, H, T, True)
            out.append((plain, H.copy(), Hr.copy(), Hv.copy()))
        return out

    for (p1, *h1), (p2, *h2) in zip(hists([big, small, big, small], False),
                                    hists([big, small, big, small], True), strict=True):
        np.testing.assert_array_equal(p1[0], p2[0])
        assert p1[1] == p2[1]
        for a, b in zip(h1, h2, strict=True):
            np.testing.assert_array_equal(a, b)


def test_decoding_tables_hold_the_whole_codewords_of_each_bit_pattern():
    """Every entry of every decoding table (EG and mode-2 codewords, k <= LUT_K_MAX) holds
    the symbols, count and total bits of the whole codewords that the checked reader finds
    in its LUT_BITS bits, at most LUT_SLOTS of them, and zero in the slots past its count
    (they are stored as junk that later codewords overwrite, never as symbols)."""
    luts = eg.build_luts()
    assert luts.shape == (2, eg.LUT_K_MAX + 1, eg.LUT_SIZE)
    buf = np.zeros(16, np.uint8)
    ptr = buf.ctypes.data
    for rice in (0, 1):
        for k in range(eg.LUT_K_MAX + 1):
            table = luts[rice, k]
            meta = table.view(np.uint8)[eg.LUT_META:]
            for pat in range(1 << eg.LUT_BITS):
                buf[0], buf[1] = pat >> 4, (pat & 15) << 4  # the pattern, then zeros
                syms, pos = [], 0
                while len(syms) < eg.LUT_SLOTS:
                    u, end, err = eg._read_symbol(ptr, buf.size, pos, k, bool(rice))
                    if err or end > eg.LUT_BITS:
                        break
                    syms.append(u)
                    pos = end
                entry = int(table[pat])
                fields = [(entry >> (16 * i)) & 0xFFFF for i in range(4)]
                assert fields == syms + [0] * (4 - len(syms)), (rice, k, pat)
                assert (meta[pat] & 7, meta[pat] >> 3) == (len(syms), pos), (rice, k, pat)


@pytest.mark.parametrize("k", [0, 2, 9, 13, 30])
def test_rice_writer_groups_write_the_reference_bits(k):
    """The mode-2 writer joins four codewords per store where they fit in 56 bits and takes
    them one by one where they do not, or where one escapes: at every order, with groups
    that fit, overflow and escape in every position, and blocks of every length mod 4."""
    rng = np.random.default_rng(k)
    umax = eg.UMAX if k == 30 else (np.int64(1) << (k + 8))
    for cnt in (1, 3, 6, 257, 1027):
        u = (rng.geometric(0.3, cnt) - 1) << k | rng.integers(0, 1 << k, cnt)
        sel = rng.random(cnt) < 0.05
        u[sel] = rng.integers(0, umax, int(sel.sum()))  # escapes, long codewords
        u = np.minimum(u, eg.UMAX).astype(np.int32)
        out = np.zeros(eg.worst_case_bytes(cnt, 0) + 8, np.uint8)
        quads = eg._work_arrays(np.array([cnt]), 0, 1)[-1]
        pos = np.empty(cnt, np.int32)
        p, bits = eg._write_block(u, cnt, eg.MODE_RICE, k, 0, out, 0, pos, 0, quads)
        want, want_bits = reference.encode_block([int(v) for v in u], eg.MODE_RICE, k, 0)
        assert (bits, bytes(out[:p])) == (want_bits, want), (k, cnt)
