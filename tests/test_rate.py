"""Tests for ggcomm.rate: quantization, EG lengths, code rates and GG rate prediction."""

from __future__ import annotations

import heapq
import math
from collections import Counter
from functools import cache

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from ggcomm import codec, rate
from ggcomm.gg import GGFit
from ggcomm.rate import (
    MAX_AUTO_K,
    eg_bits,
    eg_length,
    eg_rate_surrogate,
    entropy_bits,
    fl_bits,
    huffman_bits,
    huffman_code_lengths,
    predict_bits,
    predict_eg_bits,
    predict_entropy_bits,
    predict_rans_bits,
    quantize,
    signed_to_unsigned,
    step_for_rate,
    summary,
    unsigned_to_signed,
)


def ref_eg_length(u: int, k: int) -> int:
    """Length of the k-th order Exp-Golomb codeword of u, built as a bit string."""
    c = u + (1 << k)
    body = bin(c)[2:]
    zeros = len(body) - 1 - k
    return len("0" * zeros + body)


@cache
def gennorm_data(beta: float, n: int = 1_000_000, seed: int = 4321) -> np.ndarray:
    return stats.gennorm.rvs(beta, size=n, random_state=seed)


# --------------------------------------------------------------------------- quantization


def test_quantize_formula_and_ties() -> None:
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49, 3.7])
    np.testing.assert_array_equal(quantize(x, 1.0), [0, 2, 2, 0, -2, -2, 0, 4])
    rng = np.random.default_rng(0)
    y = rng.standard_normal(10_000) * 10
    for step in (0.1, 0.3, 1 / 3, 7.0):
        q = quantize(y, step)
        assert q.dtype == np.int64
        np.testing.assert_array_equal(q, np.rint(y * (1.0 / step)).astype(np.int64))


def test_quantize_torch_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    y32 = (rng.standard_normal(10_000) * 5).astype(np.float32)
    y32[:4] = [0.25, 0.75, -0.25, 1.25]  # exact ties at step 0.5
    for step in (0.5, 0.1, 0.013):
        qt = quantize(torch.from_numpy(y32), step)
        assert qt.dtype == torch.int64
        np.testing.assert_array_equal(qt.numpy(), quantize(y32, step))
    with pytest.raises(ValueError):
        quantize(y32, 0.0)


def test_signed_unsigned_map() -> None:
    table = {0: 0, 1: 1, -1: 2, 2: 3, -2: 4, 3: 5, -3: 6}
    q = np.array(list(table))
    u = np.array(list(table.values()))
    np.testing.assert_array_equal(signed_to_unsigned(q), u)
    np.testing.assert_array_equal(unsigned_to_signed(u), q)
    q = np.arange(-100_000, 100_001)
    u = signed_to_unsigned(q)
    np.testing.assert_array_equal(np.sort(u), np.arange(u.size))  # a bijection onto 0..2n
    np.testing.assert_array_equal(unsigned_to_signed(u), q)
    qt = torch.from_numpy(q)
    np.testing.assert_array_equal(signed_to_unsigned(qt).numpy(), u)
    np.testing.assert_array_equal(unsigned_to_signed(torch.from_numpy(u)).numpy(), q)


# --------------------------------------------------------------------------- EG lengths


def test_eg_length_small_values_exhaustive() -> None:
    u = np.arange(5001)
    for k in range(13):
        expected = np.array([ref_eg_length(int(v), k) for v in u])
        np.testing.assert_array_equal(eg_length(u, k), expected)
        np.testing.assert_array_equal(eg_length(torch.from_numpy(u), k).numpy(), expected)


def test_eg_length_known_codewords() -> None:
    # ue(v): 0 -> "1", 1 -> "010", 2 -> "011", 3 -> "00100", 7 -> "0001000"
    np.testing.assert_array_equal(eg_length([0, 1, 2, 3, 6, 7], 0), [1, 3, 3, 5, 5, 7])
    # k = 2: u < 4 -> 3 bits, 4..11 -> 5 bits
    np.testing.assert_array_equal(eg_length([0, 3, 4, 11, 12], 2), [3, 3, 5, 5, 7])


def test_eg_length_large_values() -> None:
    edges = [2**31, 2**32, 2**53, 2**62]
    u = sorted({e + d for e in edges for d in range(-3, 4)})
    for k in (0, 1, 5, 16, 30):
        expected = [ref_eg_length(v, k) for v in u]
        np.testing.assert_array_equal(eg_length(np.array(u, dtype=np.int64), k), expected)
        np.testing.assert_array_equal(eg_length(np.array(u, dtype=np.uint64), k), expected)
        got_t = eg_length(torch.tensor(u, dtype=torch.int64), k)
        np.testing.assert_array_equal(got_t.numpy(), expected)
    top = 2**64 - 2
    assert int(eg_length(np.array([top], dtype=np.uint64), 0)[0]) == ref_eg_length(top, 0)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**62), st.integers(0, 60))
def test_eg_length_hypothesis(u: int, k: int) -> None:
    expected = ref_eg_length(u, k)
    assert int(eg_length(np.array([u], dtype=np.int64), k)[0]) == expected
    assert int(eg_length(torch.tensor([u]), k)[0]) == expected


def test_eg_length_errors() -> None:
    with pytest.raises(ValueError):
        eg_length(np.array([-1, 2]), 0)
    with pytest.raises(ValueError):
        eg_length(torch.tensor([-1]), 0)
    with pytest.raises(TypeError):
        eg_length(np.array([1.0]), 0)
    with pytest.raises(TypeError):
        eg_length(torch.tensor([1.0]), 0)
    with pytest.raises(ValueError):
        eg_length([1], -1)
    with pytest.raises(OverflowError):
        eg_length(torch.tensor([2**63 - 1]), 0)
    assert eg_length(np.zeros(0, dtype=np.int64), 3).shape == (0,)


def test_eg_bits_auto_is_exhaustive_min() -> None:
    rng = np.random.default_rng(2)
    for scale in (0.3, 3.0, 40.0, 5000.0):
        u = signed_to_unsigned(np.rint(rng.laplace(0, scale, 20_000)).astype(np.int64))
        costs = [float(eg_length(u, k).mean()) for k in range(MAX_AUTO_K + 1)]
        bits, k = eg_bits(u)
        assert k == int(np.argmin(costs))
        assert bits == pytest.approx(min(costs), rel=1e-12)
        assert eg_bits(u, 3) == (pytest.approx(costs[3], rel=1e-12), 3)
        bits_t, k_t = eg_bits(torch.from_numpy(u))
        assert (bits_t, k_t) == (bits, k)
    with pytest.raises(ValueError):
        eg_bits(np.zeros(0, dtype=np.int64))


# --------------------------------------------------------------------------- other codes


def test_fl_and_entropy() -> None:
    assert fl_bits([-3, 4, 0]) == 3  # 8 values
    assert fl_bits([0, 8]) == 4  # 9 values
    assert fl_bits([0, 1]) == 1
    assert fl_bits(np.full(7, 5)) == 0
    assert fl_bits(torch.tensor([-128, 127])) == 8
    assert entropy_bits([0, 1, 2, 3] * 5) == pytest.approx(2.0)
    assert entropy_bits([7] * 9) == 0.0
    assert entropy_bits([0, 0, 0, 1]) == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * -2))


def huffman_cost_by_merging(counts: list[int]) -> int:
    """Total Huffman bits: the sum of the weights of all merged nodes."""
    heap = [c for c in counts if c > 0]
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total += merged
        heapq.heappush(heap, merged)
    return total


def test_huffman_known_example() -> None:
    np.testing.assert_array_equal(huffman_code_lengths([5, 2, 1, 1]), [1, 2, 3, 3])
    np.testing.assert_array_equal(huffman_code_lengths([1, 1, 1, 1]), [2, 2, 2, 2])
    np.testing.assert_array_equal(huffman_code_lengths([3, 0, 1]), [1, 0, 1])
    np.testing.assert_array_equal(huffman_code_lengths([9]), [1])
    assert huffman_code_lengths([]).shape == (0,)
    assert huffman_bits([4] * 10) == 1.0
    assert huffman_bits([0, 0, 0, 0, 0, 1, 1, 2, 3]) == pytest.approx((5 + 2 * 2 + 3 + 3) / 9)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=60))
def test_huffman_kraft_and_optimality(counts: list[int]) -> None:
    lengths = huffman_code_lengths(counts)
    used = np.array(counts) > 0
    assert (lengths[~used] == 0).all()
    if used.sum() >= 2:
        assert float(np.sum(2.0 ** -lengths[used])) == pytest.approx(1.0)  # complete code
        assert int(np.dot(lengths, counts)) == huffman_cost_by_merging(counts)
    assert float(np.sum(2.0 ** -lengths[used])) <= 1.0 + 1e-12


def test_huffman_between_entropy_and_entropy_plus_one() -> None:
    rng = np.random.default_rng(3)
    for scale in (0.2, 1.0, 10.0):
        q = np.rint(rng.laplace(0, scale, 50_000)).astype(np.int64)
        h, hm = entropy_bits(q), huffman_bits(q)
        assert h <= hm < h + 1
        counts = np.array(list(Counter(q.tolist()).values()))
        assert float(np.sum(2.0 ** -huffman_code_lengths(counts))) <= 1.0


def test_summary() -> None:
    q = np.rint(np.random.default_rng(4).laplace(0, 4, 30_000)).astype(np.int64)
    s = summary(torch.from_numpy(q))
    assert set(s) == {"fl", "eg", "eg_k", "hm", "entropy", "n"}
    assert s["n"] == q.size
    assert s["fl"] == fl_bits(q)
    assert (s["eg"], s["eg_k"]) == eg_bits(signed_to_unsigned(q))
    assert s["hm"] == pytest.approx(huffman_bits(q))
    assert s["entropy"] == pytest.approx(entropy_bits(q))
    assert s["entropy"] <= s["hm"] <= s["eg"] <= s["fl"]


# --------------------------------------------------------------------------- GG predictions


def brute_force_eg_bits(fit: GGFit, step: float, k: int) -> float:
    """Cell-by-cell expectation of L_k(u(q)) over a wide q range."""
    dist = stats.gennorm(fit.beta, loc=fit.loc, scale=fit.scale)
    q_lo = math.floor(dist.ppf(1e-15) / step) - 1
    q_hi = math.ceil(dist.isf(1e-15) / step) + 1
    q = np.arange(q_lo, q_hi + 1)
    p = dist.cdf((q + 0.5) * step) - dist.cdf((q - 0.5) * step)
    return float(np.dot(p, eg_length(signed_to_unsigned(q), k)))


@pytest.mark.parametrize("beta", (0.5, 1.0, 2.0))
@pytest.mark.parametrize("k", (0, 2))
def test_predict_eg_bits_matches_cellwise_sum(beta: float, k: int) -> None:
    fit = GGFit(loc=0.3, scale=1.5, beta=beta, n=1)
    for step in (0.05, 0.7, 4.0):
        assert predict_eg_bits(fit, step, k) == (
            pytest.approx(brute_force_eg_bits(fit, step, k), rel=1e-9),
            k,
        )


def rice_length(u, k: int) -> np.ndarray:
    """Mode-2 codeword lengths (docs/FORMAT.md): u >> k < 16 zeros, a one and k bits, else
    16 zeros and EG_k(u)."""
    u = np.asarray(u, dtype=np.int64)
    return np.where(u >> k < 16, (u >> k) + 1 + k, 16 + eg_length(u, k))


@pytest.mark.parametrize("beta", (0.5, 1.0, 2.0))
@pytest.mark.parametrize("k", (0, 2))
def test_predict_rice_bits_matches_cellwise_sum(beta: float, k: int) -> None:
    fit = GGFit(loc=0.3, scale=1.5, beta=beta, n=1)
    dist = stats.gennorm(fit.beta, loc=fit.loc, scale=fit.scale)
    for step in (0.05, 0.7, 4.0):
        q = np.arange(math.floor(dist.ppf(1e-15) / step) - 1, math.ceil(dist.isf(1e-15) / step) + 2)
        p = dist.cdf((q + 0.5) * step) - dist.cdf((q - 0.5) * step)
        want = float(np.dot(p, rice_length(signed_to_unsigned(q), k)))
        got = rate.eg_order_bits(fit, np.array([step]), (k,), rice=True)[0][0, 0]
        assert got == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("beta", (0.5, 1.0, 2.0))
def test_predict_matches_empirical(beta: float) -> None:
    x = gennorm_data(beta)
    fit = GGFit(loc=0.0, scale=1.0, beta=beta, n=x.size)
    for target in (2.0, 4.0, 6.0):
        step = step_for_rate(fit, target, rans=False)
        q = quantize(x, step)
        u = signed_to_unsigned(q)
        # the codec's prefix-code blocks: the cheaper of EG and Golomb-Rice at their best
        # orders (rANS blocks left out, as the transports do)
        bits, mode, k_code = predict_bits(fit, step, rans=False)
        assert bits == pytest.approx(target, rel=1e-6)
        codes = [(eg_bits(u, kk)[0], "eg", kk) for kk in range(20)]
        codes += [(float(rice_length(u, kk).mean()), "rice", kk) for kk in range(20)]
        best = min(codes, key=lambda c: c[0])
        assert best[0] == pytest.approx(bits, rel=0.02)
        assert best[1] == mode or abs(best[0] - bits) < 0.02 * bits
        if beta >= 1.0:
            assert mode == "rice"  # light tails: Golomb-Rice
        # EG alone, as the paper's code
        empirical, k_emp = eg_bits(u)
        predicted, k_pred = predict_eg_bits(fit, step)
        assert empirical == pytest.approx(predicted, rel=0.02)
        assert eg_bits(signed_to_unsigned(q), k_pred)[0] == pytest.approx(predicted, rel=0.02)
        assert predict_entropy_bits(fit, step) == pytest.approx(entropy_bits(q), rel=0.02)
        assert predict_eg_bits(fit, step, 0)[0] == pytest.approx(
            eg_bits(signed_to_unsigned(q), 0)[0], rel=0.02
        )
        assert abs(k_emp - k_pred) <= 1


@pytest.mark.parametrize("beta", (0.5, 2.0, 3.0))
def test_predicted_bits_follow_the_codec_with_rans_blocks(beta: float) -> None:
    """With rans (ggcomm.encode's default) the model takes mode 4 where the codec does:
    the codec's frame comes within 3% of the predicted bits at the step for a target."""
    x = torch.from_numpy(gennorm_data(beta, n=1 << 19).astype(np.float32))
    fit = GGFit(loc=0.0, scale=1.0, beta=beta, n=x.numel())
    for target in (2.0, 3.0, 4.5):
        step = step_for_rate(fit, target)
        frame = codec.encode(x, step)
        payload = sum(b.bit_length for b in codec.inspect(frame).blocks) / x.numel()
        assert payload == pytest.approx(target, rel=0.03), (beta, target)
        bits, mode, _ = predict_bits(fit, step)
        modes = [b.mode for b in codec.inspect(frame).blocks]
        assert (mode == "rans") == (modes.count("rans") > len(modes) / 2) or \
            abs(payload - bits) < 0.03 * bits
    if beta == 3.0:  # light tails at 2 bits: rANS, below what the prefix codes predict
        step = step_for_rate(fit, 2.0)
        assert predict_bits(fit, step)[1] == "rans"
        assert predict_bits(fit, step, rans=False)[0] > 2.06
    rans_bits, share = predict_rans_bits(fit, 1.0)
    assert 0.0 <= share <= 1.0
    if share > 0.99:  # every symbol in mode 4's range: its bits are above the entropy
        assert rans_bits > predict_entropy_bits(fit, 1.0)


def test_predict_limits() -> None:
    fit = GGFit(loc=0.0, scale=1.0, beta=1.0, n=1)
    assert predict_eg_bits(fit, 1e6) == (pytest.approx(1.0), 0)
    assert predict_eg_bits(fit, 1e6, 3) == (pytest.approx(4.0), 3)
    assert predict_entropy_bits(fit, 1e6) == pytest.approx(0.0, abs=1e-9)
    # Fine steps: the cell sum approaches h(X) - log2(step); past the cell cap that
    # high-resolution formula is used directly.
    h_bits = stats.gennorm.entropy(1.0) / math.log(2)
    assert predict_entropy_bits(fit, 1e-4) == pytest.approx(h_bits - math.log2(1e-4), rel=1e-6)
    assert predict_entropy_bits(fit, 1e-9) == pytest.approx(h_bits - math.log2(1e-9))
    with pytest.raises(ValueError):
        predict_eg_bits(fit, -1.0)


def test_step_for_rate_round_trip() -> None:
    fit = GGFit(loc=0.1, scale=0.02, beta=0.7, n=1)
    steps = []
    for target in (1.5, 3.0, 5.5, 12.0):
        step = step_for_rate(fit, target)
        steps.append(step)
        assert predict_bits(fit, step)[0] == pytest.approx(target, rel=1e-8)
        step0 = step_for_rate(fit, target + 1.0, k=0)
        assert predict_eg_bits(fit, step0, 0)[0] == pytest.approx(target + 1.0, rel=1e-8)
    assert steps == sorted(steps, reverse=True)
    for bad in (1.0, 0.5, float("nan")):
        with pytest.raises(ValueError):
            step_for_rate(fit, bad)
    with pytest.raises(ValueError):
        step_for_rate(fit, 3.5, k=3)


# --------------------------------------------------------------------------- surrogate


def test_surrogate_tight_at_powers_of_two() -> None:
    # k = 0: u = 0, 1, 3, 7 (q = 0, 1, 2, 4) have u + 1 a power of two.
    x = torch.tensor([0.1, 1.2, 1.9, 4.3], dtype=torch.float64)
    u = signed_to_unsigned(quantize(x, 1.0))
    np.testing.assert_array_equal(u.numpy(), [0, 1, 3, 7])
    exact = eg_length(u, 0).double()
    for xi, li in zip(x, exact, strict=True):
        assert float(eg_rate_surrogate(xi.reshape(1), 1.0)) == pytest.approx(float(li))


@pytest.mark.parametrize("beta", (0.5, 1.0, 2.0))
def test_surrogate_bounds_exact_rate(beta: float) -> None:
    x = torch.from_numpy(gennorm_data(beta)[:200_000])
    fit = GGFit(loc=0.0, scale=1.0, beta=beta, n=x.numel())
    for target in (2.0, 4.0, 6.0):
        step = step_for_rate(fit, target)
        u = signed_to_unsigned(quantize(x, step))
        _, k = eg_bits(u)
        exact = eg_length(u, k).double()
        per_element = torch.stack(
            [eg_rate_surrogate(x[i : i + 1], step, k) for i in range(0, 2000, 7)]
        )
        assert (per_element >= exact[0:2000:7] - 1e-12).all()
        assert (per_element < exact[0:2000:7] + 2.0).all()
        smooth = float(eg_rate_surrogate(x, step, k))
        exact_mean = float(exact.mean())
        # The smooth log2 bound costs ~10-20% on GG data at these rates.
        assert exact_mean <= smooth <= 1.2 * exact_mean
        ste = float(eg_rate_surrogate(x, step, k, exact_forward=True))
        assert ste == pytest.approx(exact_mean, rel=1e-12)


def test_surrogate_gradient() -> None:
    x = torch.tensor([-3.2, -0.2, 0.1, 0.9, 2.6, 40.0], dtype=torch.float64, requires_grad=True)
    rate = eg_rate_surrogate(x, 0.5, k=1)
    assert rate.ndim == 0 and rate.requires_grad
    rate.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # Larger magnitude costs more bits: gradient pushes towards zero.
    assert (x.grad[[0]] < 0).all() and (x.grad[[3, 4, 5]] > 0).all()
    assert float(x.grad[1]) == 0.0 and float(x.grad[2]) == 0.0  # zero bin

    y = x.detach().clone().requires_grad_(True)
    eg_rate_surrogate(y, 0.5, k=1, exact_forward=True).backward()
    assert y.grad is not None
    torch.testing.assert_close(y.grad, x.grad)

    z = torch.randn(64, 32, dtype=torch.float32, requires_grad=True)
    out = eg_rate_surrogate(z, 0.05)
    assert out.dtype == torch.float32
    out.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


# --------------------------------------------------------------------------- codec-matched rate


def _codec_cases():
    """Tensors and settings that exercise every choice the encoder makes."""
    gen = torch.Generator().manual_seed(11)
    from ggcomm.gg import sample

    spiky = torch.randn(3000, generator=gen)
    spiky[::97] *= 1e3
    odd = torch.randn(5000, generator=gen)
    odd[7], odd[70], odd[700] = float("nan"), float("inf"), 1e12  # exceptions
    sparse = sample(20_000, 0.3, generator=gen)
    for x, block_size in (
        (sample((64, 300), 1.0, generator=gen), 16384),
        (sample(4097, 2.0, generator=gen).to(torch.bfloat16), 512),
        (sparse.to(torch.float16), 1000),
        (spiky.double(), 64),
        (odd, 333),
        (torch.zeros(2, 3, 4), 5),
        (torch.tensor(2.5), 1),
        (sample(40_000, 3.0, generator=gen) * 20.0, 16384),  # light tails: rANS at step 2
    ):
        for step in (0.02, 2.0):
            for k, zero_runs in (("auto", "auto"), (2, "auto"), ("auto", True), (0, False),
                                 ("auto", False)):
                yield x, step, k, block_size, zero_runs, True
            yield x, step, "auto", block_size, "auto", False  # mode 4 left out


def test_codec_bits_is_the_frame_size() -> None:
    from ggcomm import codec
    from ggcomm.rate import codec_bits
    from ggcomm.rate.bits import _plan_codec, _plan_torch

    rice_seen = rans_seen = False
    for x, step, k, block_size, zero_runs, rans in _codec_cases():
        frame = codec.encode(x, step, k=k, block_size=block_size, zero_runs=zero_runs,
                             rans=rans)
        args = (x, step, k, block_size, zero_runs, rans)
        assert codec_bits(*args[:2], k=k, block_size=block_size, zero_runs=zero_runs,
                          rans=rans) == 8 * frame.nbytes
        assert rans or not any(b.mode == "rans" for b in codec.inspect(frame).blocks)
        # The torch reproduction (used off the CPU) agrees with the codec block by block.
        mine, ref = _plan_torch(*args), _plan_codec(*args)
        for field in ("order", "zero_run", "rice", "rans", "count", "frame_bits",
                      "payload_bits"):
            assert torch.equal(getattr(mine, field), getattr(ref, field)), (field, args[1:])
        rice_seen |= bool((ref.rice & ~ref.rans).any())
        rans_seen |= bool(ref.rans.any())
    assert rice_seen  # the cases reach Golomb-Rice blocks (FORMAT.md mode 2)
    assert rans_seen  # and rANS blocks (mode 4)


def test_eg_rate_value_and_gradient() -> None:
    from ggcomm import codec
    from ggcomm.rate import eg_rate, rms

    x = torch.from_numpy(gennorm_data(1.0)[:50_000]).requires_grad_(True)
    step, one_block = 0.05, {"zero_runs": False, "block_size": 1 << 16}
    r = eg_rate(x, step, **one_block)
    assert r.dtype == torch.float64 and r.ndim == 0
    assert float(r.detach()) == codec.encode(x.detach(), step, **one_block).bits_per_element
    payload = eg_rate(x, step, overhead=False, **one_block)
    u = signed_to_unsigned(quantize(x, step))
    best, k = eg_bits(u)
    # Laplacian data: the block is coded in Golomb-Rice mode (FORMAT.md mode 2), whose
    # codeword is u >> kr zeros, a one and kr bits (an escape past 16 zeros)
    un = u.numpy().astype(np.int64)
    rice = min((sum(int(v >> kr) + 1 + kr if v >> kr < 16 else 16 + int(eg_length(v, kr))
                    for v in un), kr) for kr in range(12))
    assert rice[0] / un.size < best
    assert float(payload.detach()) == pytest.approx(rice[0] / un.size, rel=1e-12)
    r.backward()
    # Its smoothed length u / 2^kr + 1 + kr has the slope 2 sign(q) / (2^kr step) per element
    q = quantize(x.detach(), step).to(torch.float64)
    want = torch.sign(q) * (2.0 / (2.0 ** rice[1] * step * x.numel()))
    torch.testing.assert_close(x.grad, want, rtol=1e-9, atol=1e-15)
    # EG blocks (an order fixed by the user turns Golomb-Rice off): the gradient is the
    # smooth bound's at the codec's order (straight-through floor).
    x.grad = None
    fixed = eg_rate(x, step, overhead=False, k=k, **one_block)
    assert float(fixed.detach()) == pytest.approx(best, rel=1e-12)
    fixed.backward()
    y = x.detach().clone().requires_grad_(True)
    eg_rate_surrogate(y, step, k, exact_forward=True).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-15)

    # Zero-run blocks code nonzero symbols as u - 1: the slope follows (EG values at a
    # fixed order: mode 1).
    s = torch.tensor([0.0] * 30 + [0.26, -0.26], dtype=torch.float64, requires_grad=True)
    eg_rate(s, 0.25, k=0).backward()
    assert codec.inspect(codec.encode(s.detach(), 0.25, k=0)).blocks[0].mode == "zero_runs"
    slope = 4.0 / (math.log(2.0) * 0.25 * 32)  # u - 1 + 2^0 = 1 for q = 1 and 2 for q = -1
    torch.testing.assert_close(s.grad[-2:], torch.tensor([slope, -slope / 2], dtype=s.dtype))
    assert (s.grad[:-2] == 0).all()  # zeros of a zero-run block: no slope, and not 0 / 0
    # With the order picked, the values 0 and 1 cost 1 and 2 bits in Golomb-Rice against
    # EG's 1 and 3 (mode 3): the slope is Golomb-Rice's, 2 sign(q) / (2^k step n)
    s.grad = None
    eg_rate(s, 0.25).backward()
    assert codec.inspect(codec.encode(s.detach(), 0.25)).blocks[0].mode == "zero_runs_rice"
    slope = 2.0 / (0.25 * 32)
    torch.testing.assert_close(s.grad[-2:], torch.tensor([slope, -slope], dtype=s.dtype))
    assert (s.grad[:-2] == 0).all()

    z = (5.0 * torch.randn(40, 50)).requires_grad_(True)
    rel = eg_rate(z, rel_step=0.1)
    want = codec.encode(z.detach(), 0.1 * rms(z)).bits_per_element
    assert float(rel.detach()) == pytest.approx(want, rel=1e-6)  # float32 like z
    rel.backward()
    assert abs(float((z.grad * z.detach()).sum())) < 1e-6 * float(z.grad.norm() * z.detach().norm())

    with pytest.raises(ValueError):
        eg_rate(z, 0.1, rel_step=0.1)
    with pytest.raises(ValueError):
        eg_rate(z)
    with pytest.raises(ValueError):
        eg_rate(torch.zeros(3), rel_step=0.1)
    with pytest.raises(ValueError):
        eg_rate(z, 0.1, block_size=0)
    with pytest.raises(TypeError):
        eg_rate(torch.arange(4), 0.1)
    assert rms(torch.tensor([3.0, float("nan"), -4.0, float("inf")])) == pytest.approx(
        math.sqrt(12.5)
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_eg_rate_on_cuda_matches_cpu() -> None:
    from ggcomm import codec
    from ggcomm.rate import codec_bits, eg_rate

    x = torch.from_numpy(gennorm_data(0.5)[:70_000]).float()
    for step in (0.02, 3.0):  # plain EG blocks, then zero-run blocks
        cpu = x.clone().requires_grad_(True)
        gpu = x.cuda().requires_grad_(True)
        eg_rate(cpu, step).backward()
        r = eg_rate(gpu, step)
        r.backward()
        assert r.device.type == "cuda"
        assert float(r.detach()) == pytest.approx(codec.encode(x, step).bits_per_element)
        assert codec_bits(gpu, step) == 8 * codec.encode(x, step).nbytes
        torch.testing.assert_close(gpu.grad.cpu(), cpu.grad)
