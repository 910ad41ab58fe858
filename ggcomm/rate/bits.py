"""Bit counting: what integer symbols and the codec's frames cost.

Definitions (arXiv 2506.00486, Eq. 7-8):

* Signed -> unsigned map as H.264 ``se(v)``: ``u = 2q - 1`` if ``q > 0`` else ``u = -2q``
  (0 -> 0, 1 -> 1, -1 -> 2, 2 -> 3, -2 -> 4, ...).
* k-th order Exp-Golomb length: ``L_k(u) = 2 floor(log2(u + 2^k)) - k + 1`` bits.

Measured rates (bits per element) of an integer tensor: :func:`fl_bits` (fixed length for the
range, the paper's FL column), :func:`eg_bits` (EG), :func:`huffman_bits` (HM) and
:func:`entropy_bits`; :func:`summary` collects them. :func:`codec_bits` is the size of the
frame :func:`ggcomm.codec.encode` would return, from :func:`codec_plan`, the codec's own
choices (block orders, zero-run mode, exceptions) without encoding.

Integer functions accept numpy arrays, torch tensors or Python sequences; torch inputs give
torch outputs (same device) where the result is elementwise.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Literal, overload

import numpy as np
import torch

from .. import codec as _codec
from ..kernels import eg as _eg_kernels
from ..quant import check_step, quantize_coded

__all__ = [
    "MAX_AUTO_K",
    "MAX_K",
    "CodecPlan",
    "check_coded_args",
    "check_k",
    "codec_bits",
    "codec_plan",
    "eg_bits",
    "eg_length",
    "entropy_bits",
    "fl_bits",
    "huffman_bits",
    "huffman_code_lengths",
    "signed_to_unsigned",
    "summary",
    "unsigned_to_signed",
]

MAX_AUTO_K = _eg_kernels.K_MAX
"""Largest Exp-Golomb order tried when ``k="auto"`` (the codec's largest order)."""

MAX_K = 62
"""Largest order these counts take (``u + 2^k`` must fit in 64 bits); the codec's is
``MAX_AUTO_K``."""

KArg = int | Literal["auto"]


def check_k(k: int) -> int:
    """``k`` as an int if it is an Exp-Golomb order this module counts (0..62), else the
    error (TypeError, ValueError) saying why."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 0 <= k <= MAX_K:
        raise ValueError(f"k must be in [0, {MAX_K}], got {k}")
    return int(k)


def _int_numpy(q: Any) -> np.ndarray:
    """Integer numpy view of ``q`` (torch tensors are moved to the CPU)."""
    if isinstance(q, torch.Tensor):
        if q.is_floating_point() or q.is_complex():
            raise TypeError(f"expected an integer tensor, got {q.dtype}")
        return q.detach().cpu().numpy()
    arr = np.asarray(q)
    if arr.dtype == object or (arr.size == 0 and arr.dtype.kind == "f"):
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"expected integers, got dtype {arr.dtype}")
    return arr


@overload
def signed_to_unsigned(q: torch.Tensor) -> torch.Tensor: ...
@overload
def signed_to_unsigned(q: Any) -> np.ndarray: ...
def signed_to_unsigned(q: Any) -> np.ndarray | torch.Tensor:
    """H.264 ``se(v)`` map: ``u = 2q - 1`` for ``q > 0``, ``u = -2q`` for ``q <= 0``."""
    if isinstance(q, torch.Tensor):
        q = q.to(torch.int64)
        return torch.where(q > 0, 2 * q - 1, -2 * q)
    q = _int_numpy(q).astype(np.int64)
    return np.where(q > 0, 2 * q - 1, -2 * q)


@overload
def unsigned_to_signed(u: torch.Tensor) -> torch.Tensor: ...
@overload
def unsigned_to_signed(u: Any) -> np.ndarray: ...
def unsigned_to_signed(u: Any) -> np.ndarray | torch.Tensor:
    """Inverse of :func:`signed_to_unsigned`: odd ``u`` -> ``(u + 1) / 2``, even -> ``-u / 2``."""
    if isinstance(u, torch.Tensor):
        u = u.to(torch.int64)
        return torch.where(u % 2 == 1, (u + 1) // 2, -(u // 2))
    u = _int_numpy(u).astype(np.int64)
    return np.where(u % 2 == 1, (u + 1) // 2, -(u // 2))


def _bit_length_np(c: np.ndarray) -> np.ndarray:
    """Exact ``int.bit_length`` of a uint64 array by binary search on shifts."""
    v = c.copy()
    n = np.zeros(c.shape, dtype=np.int64)
    for s in (32, 16, 8, 4, 2, 1):
        big = v >= np.uint64(1 << s)
        n += s * big
        v = np.where(big, v >> np.uint64(s), v)
    return n + (v > 0)


def _bit_length_torch(c: torch.Tensor) -> torch.Tensor:
    """Exact ``int.bit_length`` of a non-negative int64 tensor by binary search on shifts."""
    v = c.clone()
    n = torch.zeros_like(c)
    for s in (32, 16, 8, 4, 2, 1):
        big = v >= (1 << s)
        n += s * big
        v = torch.where(big, v >> s, v)
    return n + (v > 0)


@overload
def eg_length(u: torch.Tensor, k: int = 0) -> torch.Tensor: ...
@overload
def eg_length(u: Any, k: int = 0) -> np.ndarray: ...
def eg_length(u: Any, k: int = 0) -> np.ndarray | torch.Tensor:
    """Exact k-th order Exp-Golomb codeword lengths ``2 floor(log2(u + 2^k)) - k + 1``.

    Computed with integer arithmetic only (``floor(log2 c) = bit_length(c) - 1``), so it is
    exact for every ``u`` representable in the input dtype (numpy: ``u + 2^k < 2^64``; torch:
    int64, ``u + 2^k < 2^63``). Returns int64 lengths with the shape of ``u``.

    Raises:
        TypeError: for non-integer input. ValueError: for negative ``u`` or bad ``k``.
        OverflowError: if ``u + 2^k`` does not fit.
    """
    k = check_k(k)
    if isinstance(u, torch.Tensor):
        if u.is_floating_point() or u.is_complex():
            raise TypeError(f"eg_length expects an integer tensor, got {u.dtype}")
        u = u.to(torch.int64)
        if u.numel():
            if int(u.min()) < 0:
                raise ValueError("eg_length expects non-negative u")
            if int(u.max()) > (1 << 63) - 1 - (1 << k):
                raise OverflowError(f"u + 2^{k} does not fit in int64")
        return 2 * _bit_length_torch(u + (1 << k)) - k - 1
    arr = _int_numpy(u)
    if arr.size:
        if arr.dtype.kind == "i" and int(arr.min()) < 0:
            raise ValueError("eg_length expects non-negative u")
        if int(arr.max()) > (1 << 64) - 1 - (1 << k):
            raise OverflowError(f"u + 2^{k} does not fit in uint64")
    c = arr.astype(np.uint64) + np.uint64(1 << k)
    return 2 * _bit_length_np(c) - k - 1


def _histogram(q: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """Distinct values, their counts and the element count of an integer array/tensor."""
    arr = _int_numpy(q).ravel()
    if arr.size == 0:
        raise ValueError("cannot compute a rate for an empty input")
    values, counts = np.unique(arr, return_counts=True)
    return values, counts, arr.size


def _best_k(avg_bits: Any, k: KArg) -> tuple[float, int]:
    """Evaluate ``avg_bits(k)`` at ``k`` or minimise it over 0..MAX_AUTO_K (smallest k wins)."""
    if k == "auto":
        best = min((avg_bits(kk), kk) for kk in range(MAX_AUTO_K + 1))
        return float(best[0]), best[1]
    k = check_k(k)
    return float(avg_bits(k)), k


def eg_bits(u: Any, k: KArg = "auto") -> tuple[float, int]:
    """Average k-th order Exp-Golomb bits per element of unsigned symbols ``u``.

    With ``k="auto"`` the order minimising the average over ``0..MAX_AUTO_K`` is chosen
    (ties go to the smallest k). Returns ``(bits_per_element, k)``.
    """
    values, counts, n = _histogram(u)
    return _best_k(lambda kk: float(np.dot(eg_length(values, kk), counts)) / n, k)


def fl_bits(q: Any) -> int:
    """Fixed-length bits per element for the value range: ``ceil(log2(max - min + 1))``.

    A constant input needs 0 bits (the paper's FL column; the value itself is side info).
    """
    values, _, _ = _histogram(q)
    return (int(values[-1]) - int(values[0])).bit_length()


def entropy_bits(q: Any) -> float:
    """Empirical (zeroth-order) entropy of the symbols, bits per element."""
    _, counts, n = _histogram(q)
    p = counts / n
    return float(-(p * np.log2(p)).sum())


def huffman_code_lengths(counts: Any) -> np.ndarray:
    """Codeword lengths of an optimal prefix (Huffman) code for the given symbol counts.

    Symbols with count 0 get length 0 (not coded). A single used symbol gets a 1-bit
    codeword (a prefix code needs at least one bit). Returns int64 lengths aligned with
    ``counts``.
    """
    c = np.asarray(counts)
    if c.ndim != 1:
        raise ValueError("counts must be one-dimensional")
    if c.size and (c.min() < 0 or not np.isfinite(c).all()):
        raise ValueError("counts must be finite and non-negative")
    lengths = np.zeros(c.size, dtype=np.int64)
    used = np.flatnonzero(c > 0)
    if used.size == 1:
        lengths[used] = 1
    if used.size <= 1:
        return lengths
    # Nodes 0..m-1 are leaves; each merge appends a node. parent[i] is the node above i.
    m = used.size
    parent = np.full(2 * m - 1, -1, dtype=np.int64)
    heap = [(c[i].item(), j) for j, i in enumerate(used)]
    heapq.heapify(heap)
    node = m
    while len(heap) > 1:
        w1, a = heapq.heappop(heap)
        w2, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (w1 + w2, node))
        node += 1
    depth = np.zeros(2 * m - 1, dtype=np.int64)
    for i in range(2 * m - 3, -1, -1):  # parents are created after children
        depth[i] = depth[parent[i]] + 1
    lengths[used] = depth[:m]
    return lengths


def huffman_bits(q: Any) -> float:
    """Average bits per element of a Huffman code built from the histogram of ``q``.

    The code table is not counted. A single distinct symbol costs 1 bit per element.
    """
    _, counts, n = _histogram(q)
    return float(np.dot(huffman_code_lengths(counts), counts)) / n


def summary(q: Any) -> dict[str, float | int]:
    """Bits per element of signed integers ``q`` under the paper's codes.

    Keys: ``fl`` (fixed length for the range), ``eg`` (Exp-Golomb of the ``se(v)``-mapped
    symbols, best order), ``eg_k`` (that order), ``hm`` (Huffman), ``entropy`` and ``n``
    (element count).
    """
    values, counts, n = _histogram(q)
    u = signed_to_unsigned(values)
    eg, k = _best_k(lambda kk: float(np.dot(eg_length(u, kk), counts)) / n, "auto")
    p = counts / n
    return {
        "fl": (int(values[-1]) - int(values[0])).bit_length(),
        "eg": eg,
        "eg_k": k,
        "hm": float(np.dot(huffman_code_lengths(counts), counts)) / n,
        "entropy": float(-(p * np.log2(p)).sum()),
        "n": n,
    }

_N_ORDERS = _eg_kernels.K_MAX + 1
_NBITS = _eg_kernels.NBINS  # bit lengths 0..32 cover every code value


def _length_table(device: torch.device) -> torch.Tensor:
    """``(orders, 33 * 33)`` float64 EG lengths for every order and ``(m, j)`` class.

    A value ``u > 0`` of bit length ``m`` has ``floor(log2(u + 2^k))`` equal to ``k`` when
    ``k >= m``, to ``m`` when ``j <= k < m`` and to ``m - 1`` when ``k < j``, where
    ``j = bit_length(2^m - u - 1)`` (so ``u + 2^k >= 2^m`` exactly when ``k >= j``); ``u = 0``
    is class ``(0, 0)``. The bits of any set of values at every order are then one matrix
    product of its ``(m, j)`` histogram with this table.
    """
    k = torch.arange(_N_ORDERS, dtype=torch.float64, device=device)[:, None, None]
    m = torch.arange(_NBITS, dtype=torch.float64, device=device)[None, :, None]
    j = torch.arange(_NBITS, dtype=torch.float64, device=device)[None, None, :]
    length = torch.where(k >= m, k + 1, torch.where(k >= j, 2 * m - k + 1, 2 * m - k - 1))
    return length.reshape(_N_ORDERS, _NBITS * _NBITS)


_TOP = 16  # top-4-bit classes of a bit length (mode 2's unary part)


def _rice_tables(eg_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mode 2's lengths, ``(orders, 33 * 16)`` over ``(m, top)`` classes and ``(orders,
    33 * 33)`` over EG's ``(m, j)`` classes, float64; a value's length is the sum of its two
    entries.

    ``top`` is ``u``'s top four bits (``u`` shifted to a 4-bit number). Order ``k``: ``m <= k``
    costs ``k + 1``; ``k < m <= k + 4`` costs ``(u >> k) + 1 + k`` with ``u >> k = top >>
    (4 - m + k)``; longer values escape, ``RICE_ESC`` zeros then ``EG_k(u)``
    (docs/FORMAT.md, mode 2). ``eg_table`` is :func:`_length_table`'s.
    """
    device = eg_table.device
    k = torch.arange(_N_ORDERS, device=device)[:, None, None]
    m = torch.arange(_NBITS, device=device)[None, :, None]
    top = torch.arange(_TOP, device=device)[None, None, :]
    shift = torch.clamp(4 - m + k, 0, 62)
    body = torch.where(m <= k, k + 1, (top >> shift) + 1 + k)
    body = torch.where(m > k + 4, 0, body).to(torch.float64)
    escape = torch.where(m > k + 4, float(_eg_kernels.RICE_ESC), 0.0) + eg_table.reshape(
        _N_ORDERS, _NBITS, _NBITS)
    escape = torch.where(m > k + 4, escape, 0.0)
    return body.reshape(_N_ORDERS, _NBITS * _TOP), escape.reshape(_N_ORDERS, _NBITS * _NBITS)


def _bit_length_exact(v: torch.Tensor) -> torch.Tensor:
    """``bit_length`` of non-negative int64 values below 2^53 (exact through float64)."""
    return torch.frexp(v.to(torch.float64))[1].to(torch.int64)


def _order_costs(values: torch.Tensor, group: torch.Tensor, n_groups: int,
                 rice: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(n_groups, orders)`` exact EG bits of the non-negative ``values`` of each group, and
    with ``rice`` mode 2's bits (else None).

    One histogram pass over the values (two with ``rice``) plus small matrix products,
    whatever the number of orders; the codec's kernels count the same classes.
    """
    table = _length_table(values.device)
    if values.numel() == 0:
        zeros = torch.zeros(n_groups, _N_ORDERS, dtype=torch.float64, device=values.device)
        return zeros, zeros.clone() if rice else None
    m = _bit_length_exact(values)
    j = _bit_length_exact(torch.clamp((1 << m) - values - 1, min=0))
    cell = (group * _NBITS + m) * _NBITS + j
    hist = torch.bincount(cell, minlength=n_groups * _NBITS * _NBITS)
    hist = hist.reshape(n_groups, _NBITS * _NBITS).to(torch.float64)
    eg = hist @ table.T
    if not rice:
        return eg, None
    top = torch.where(m >= 4, values >> torch.clamp(m - 4, min=0),
                      values << torch.clamp(4 - m, min=0))
    tops = torch.bincount((group * _NBITS + m) * _TOP + top, minlength=n_groups * _NBITS * _TOP)
    body, escape = _rice_tables(table)
    rice_bits = tops.reshape(n_groups, _NBITS * _TOP).to(torch.float64) @ body.T
    return eg, rice_bits + hist @ escape.T


def _pick_order(costs: torch.Tensor, k: KArg) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group ``(bits, order)``: the cheapest order (smallest on ties) or the fixed one."""
    if k == "auto":
        bits, order = costs.min(dim=1)  # min returns the first minimum: the smallest order
        return bits, order
    order = torch.full((costs.shape[0],), k, dtype=torch.int64, device=costs.device)
    return costs[:, k], order


def _run_lengths(
    u: torch.Tensor, block: torch.Tensor, block_size: int, n_blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero runs of the zero-run mode, with their blocks: one before each nonzero symbol
    (possibly 0) and the trailing run of a block when it is above zero (FORMAT.md)."""
    n = u.numel()
    pos = torch.nonzero(u, as_tuple=True)[0]
    pos_block = block[pos]
    block_start = torch.arange(n_blocks, device=u.device) * block_size
    prev = torch.cat([pos.new_full((1,), -1), pos[:-1]])[: pos.numel()]
    first_in_block = torch.cat(
        [pos.new_ones(1, dtype=torch.bool), pos_block[1:] != pos_block[:-1]]
    )[: pos.numel()]
    prev = torch.where(first_in_block, block_start[pos_block] - 1, prev)
    before = pos - prev - 1
    last = (block_start - 1).scatter_reduce(0, pos_block, pos, reduce="amax")
    block_end = torch.clamp(block_start + block_size, max=n)
    trailing = block_end - 1 - last
    has_trailing = trailing > 0
    runs = torch.cat([before, trailing[has_trailing]])
    run_block = torch.cat([pos_block, torch.nonzero(has_trailing, as_tuple=True)[0]])
    return runs, run_block


@dataclass(frozen=True)
class CodecPlan:
    """How :func:`ggcomm.codec.encode` codes a tensor at one step.

    ``frame_bits``: the whole frame (headers, block table, exceptions, padded payload,
    checksum); ``payload_bits``: the blocks' codewords without padding (float64 0-d
    tensors). Per block: ``order`` (its EG order, or Golomb-Rice parameter), ``zero_run``
    (coded in a zero-run mode, where nonzero symbols are coded as ``u - 1``), ``rice`` (its
    symbols, or the nonzero ones of a zero-run block, in Golomb-Rice codewords),
    ``count`` (its elements) and ``rans`` (coded in mode 4, rANS over a frequency table).
    A rANS block has no codewords to differentiate: its ``order`` and ``rice`` describe
    the Golomb-Rice code that would code its symbols in the fewest bits, whose smooth length
    stands in for the table's in :func:`ggcomm.rate.eg_rate`'s gradient.
    """

    order: torch.Tensor
    zero_run: torch.Tensor
    count: torch.Tensor
    frame_bits: torch.Tensor
    payload_bits: torch.Tensor
    rice: torch.Tensor
    rans: torch.Tensor


def _plan_codec(
    x: torch.Tensor, step: float, k: KArg, block_size: int, zero_runs: bool | str,
    rans: bool = True,
) -> CodecPlan:
    """The plan read off the frame the codec itself encodes (the fast path on the CPU)."""
    info = _codec.inspect(
        _codec.encode(x.detach(), step, k=k, block_size=block_size, zero_runs=zero_runs,
                      rans=rans)
    )
    order = torch.tensor([b.k for b in info.blocks], dtype=torch.int64)
    in_rans = torch.tensor([b.mode == "rans" for b in info.blocks], dtype=torch.bool)
    if bool(in_rans.any()):  # the stand-in order of a rANS block: its best Golomb-Rice code's
        u = signed_to_unsigned(quantize_coded(x.reshape(-1), step)[0])
        block = torch.arange(u.numel()) // block_size
        sel = in_rans[block]
        _, rice_costs = _order_costs(u[sel], block[sel], len(info.blocks), rice=True)
        order = torch.where(in_rans, _pick_order(rice_costs, "auto")[1], order)
    return CodecPlan(
        order=order,
        zero_run=torch.tensor([b.mode in ("zero_runs", "zero_runs_rice") for b in info.blocks],
                              dtype=torch.bool),
        count=torch.tensor([b.count for b in info.blocks], dtype=torch.int64),
        frame_bits=torch.tensor(8.0 * info.nbytes, dtype=torch.float64),
        payload_bits=torch.tensor(
            float(sum(b.bit_length for b in info.blocks)), dtype=torch.float64
        ),
        rice=torch.tensor([b.mode in ("rice", "zero_runs_rice", "rans") for b in info.blocks],
                          dtype=torch.bool),
        rans=in_rans,
    )


def _plan_torch(
    x: torch.Tensor, step: float, k: KArg, block_size: int, zero_runs: bool | str,
    rans: bool = True,
) -> CodecPlan:
    """The codec's choices reproduced with torch ops on ``x``'s device (no copy of ``x`` to
    the CPU; with ``rans``, the symbols of the blocks that pass mode 4's estimate are, for
    the kernel that gives their exact size).

    Quantization as the codec does it (float64 ``x * (1 / step)`` rounded half to even;
    non-finite values and ``|q| > QMAX`` are exceptions, coded as 0). Per block: the order
    with the fewest bits (or the fixed one), Golomb-Rice mode when its best order is
    strictly smaller (``k="auto"`` only) and, where the zero-run mode is allowed
    (``zero_runs=True``, or "auto" with at least a third of the symbols zero), that mode
    when it is strictly smaller; see docs/FORMAT.md.
    """
    q, ok = quantize_coded(x.reshape(-1), step)
    q = q.to(torch.int64)
    u = torch.where(q > 0, 2 * q - 1, -2 * q)
    n = u.numel()
    n_blocks = -(-n // block_size)
    block = torch.arange(n, device=u.device) // block_size
    counts = torch.clamp(n - torch.arange(n_blocks, device=u.device) * block_size, max=block_size)

    eg_costs, rice_costs = _order_costs(u, block, n_blocks, rice=k == "auto")
    bits, order = _pick_order(eg_costs, k)
    rice = torch.zeros(n_blocks, dtype=torch.bool, device=u.device)
    if rice_costs is not None:
        rice_bits, rice_order = _pick_order(rice_costs, "auto")
        rice_order_all = rice_order
        rice = rice_bits < bits
        bits = torch.where(rice, rice_bits, bits)
        order = torch.where(rice, rice_order, order)
    zero_run = torch.zeros(n_blocks, dtype=torch.bool, device=u.device)
    if zero_runs is True:
        zero_run = ~zero_run
    elif zero_runs == "auto":
        zeros = torch.bincount(block[u == 0], minlength=n_blocks)
        zero_run = _eg_kernels.zero_runs_considered(zeros, counts)
    if bool(zero_run.any()):
        nz = u != 0
        val_eg, val_rice = _order_costs(u[nz] - 1, block[nz], n_blocks, rice=k == "auto")
        val_bits, val_order = _pick_order(val_eg, k)
        val_is_rice = torch.zeros_like(zero_run)
        if val_rice is not None:  # the values in Golomb-Rice where smaller (mode 3)
            rice_bits, rice_order = _pick_order(val_rice, "auto")
            val_is_rice = rice_bits < val_bits
            val_bits = torch.where(val_is_rice, rice_bits, val_bits)
            val_order = torch.where(val_is_rice, rice_order, val_order)
        runs, run_block = _run_lengths(u, block, block_size, n_blocks)
        run_bits, _ = _pick_order(_order_costs(runs, run_block, n_blocks)[0], "auto")
        alt = val_bits + run_bits
        if zero_runs == "auto":
            zero_run &= alt < bits
        bits = torch.where(zero_run, alt, bits)
        order = torch.where(zero_run, val_order, order)
        rice = torch.where(zero_run, val_is_rice, rice)
    in_rans = torch.zeros(n_blocks, dtype=torch.bool, device=u.device)
    if rans and rice_costs is not None and zero_runs is not True:  # mode 4: saves 1/32
        in_rans, rans_bits = _rans_plan(u, block, counts, bits.to(torch.int64))
        bits = torch.where(in_rans, rans_bits.to(bits.dtype), bits)
        # the gradient's stand-in for a rANS block: its best Golomb-Rice code
        order = torch.where(in_rans, rice_order_all, order)
        rice = rice | in_rans
        zero_run = zero_run & ~in_rans
    n_exceptions = (~ok).sum()
    header = _codec.header_bytes(x.dim(), 1, n_blocks, n_exceptions, x.element_size())
    frame = 8 * (header + _codec.CRC_BYTES) + 8 * torch.ceil(bits / 8).sum()
    return CodecPlan(
        order=order,
        zero_run=zero_run,
        count=counts,
        frame_bits=frame.to(torch.float64),
        payload_bits=bits.sum(),
        rice=rice,
        rans=in_rans,
    )


def _rans_plan(
    u: torch.Tensor, block: torch.Tensor, counts: torch.Tensor, bits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block, whether the codec codes it in mode 4 (rANS) and its bits there, given the
    bits of its best other mode (FORMAT.md, "Choices"): the table and the integer estimate
    with torch ops, then the exact size of the blocks that pass the estimate from the
    codec's kernel (their symbols copied to the CPU, one byte each at most)."""
    n_blocks = counts.numel()
    dev = u.device
    a = _eg_kernels.RANS_ALPHABET
    m = _eg_kernels.RANS_M
    big = torch.bincount(block[u >= a], minlength=n_blocks) > 0
    c = torch.bincount(block * a + torch.clamp(u, max=a - 1), minlength=n_blocks * a)
    c = c.reshape(n_blocks, a)
    f = torch.where(c > 0, torch.clamp(c * m // counts[:, None], min=1), 0)
    rows = torch.arange(n_blocks, device=dev)
    f[rows, f.argmax(dim=1)] += m - f.sum(dim=1)  # argmax: the first largest
    n = a - (c.flip(1) > 0).to(torch.int64).argmax(dim=1)  # the largest symbol + 1
    table = 8 * ((12 * (n - 1) + 7) // 8 + 16)
    cost = torch.as_tensor(_eg_kernels.RANS_LOG, device=dev)[f]
    est = (c * cost).sum(dim=1) + (table << _eg_kernels.RANS_FRAC)
    margin = _eg_kernels.RANS_MARGIN
    try_ = ~big & (margin * est < (margin - 1) * (bits << _eg_kernels.RANS_FRAC))
    exact = torch.zeros(n_blocks, dtype=torch.int64, device=dev)
    if bool(try_.any()):
        sel = try_[block]
        sizes = np.empty(int(try_.sum()), np.int64)
        _eg_kernels.rans_bits(u[sel].to(device="cpu", dtype=torch.int32).numpy(),
                              counts[try_].cpu().numpy(), sizes)
        exact[try_] = torch.from_numpy(sizes).to(dev)
    return try_ & (margin * exact < (margin - 1) * bits), exact


def codec_plan(
    x: torch.Tensor, step: float, k: KArg, block_size: int, zero_runs: bool | str,
    rans: bool = True,
) -> CodecPlan:
    """The codec's own kernels on CPU tensors (fastest there); torch ops elsewhere."""
    make = _plan_codec if x.device.type == "cpu" else _plan_torch
    return make(x, step, k, block_size, zero_runs, rans)


def check_coded_args(x: Any, k: KArg, block_size: int, zero_runs: bool | str,
                     rans: bool = True) -> None:
    """Raise if ``x``, ``k``, ``block_size``, ``zero_runs`` and ``rans`` are not arguments
    the wire codec takes (as :func:`codec_bits` and the rate surrogates need)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(
            f"expected a floating-point torch.Tensor, got {type(x).__name__}"
            + (f" of {x.dtype}" if isinstance(x, torch.Tensor) else "")
        )
    if x.numel() == 0:
        raise ValueError("cannot compute a rate for an empty tensor")
    if k != "auto":
        check_k(k)
        if k > _eg_kernels.K_MAX:
            raise ValueError(f"the codec's k is at most {_eg_kernels.K_MAX}, got {k}")
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, (int, np.integer))
        or not (1 <= block_size <= _eg_kernels.MAX_BLOCK_SIZE)
    ):
        raise ValueError(
            f"block_size must be an int in 1..{_eg_kernels.MAX_BLOCK_SIZE}, got {block_size!r}"
        )
    if zero_runs not in ("auto", True, False):
        raise ValueError(f"zero_runs must be 'auto', True or False, got {zero_runs!r}")
    if not isinstance(rans, bool):
        raise ValueError(f"rans must be True or False, got {rans!r}")


def codec_bits(
    x: torch.Tensor,
    step: float,
    *,
    k: KArg = "auto",
    block_size: int = _codec.DEFAULT_BLOCK_SIZE,
    zero_runs: bool | str = "auto",
    rans: bool = True,
) -> int:
    """Size in bits of the frame ``ggcomm.codec.encode(x, step, ...)`` returns, without
    encoding.

    The codec's choices (per-block order, zero-run mode, exceptions, byte padding, header
    and block table) are reproduced with torch ops on ``x``'s device, so this equals
    ``8 * encode(x, step, k=k, block_size=block_size, zero_runs=zero_runs,
    rans=rans).nbytes``. Costs
    a few passes over ``x`` and one histogram; useful where the tensor lives on a GPU and
    copying it to the CPU to encode it would cost more.
    """
    step = check_step(step)
    check_coded_args(x, k, block_size, zero_runs, rans)
    return int(codec_plan(x, step, k, int(block_size), zero_runs, rans).frame_bits)
