"""The decoder against hostile and corrupt frames.

Every rejection in docs/FORMAT.md's "Validation" section and every limit the decoder
enforces has a test here built so that it fails if that one check is taken out: the frame
is otherwise valid (it would decode, or fail elsewhere with another message, or allocate
what it claims). Then: memory bounds for frames that claim more than they hold,
``max_numel``, an atomic ``decode(out=...)``, finite values at coarse steps, thread-count
changes under load, and a short run of ``benchmarks/fuzz_frames.py``.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import json
import math
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ggcomm
from ggcomm import FrameError, codec, decode, encode, inspect
from ggcomm.codec import decode_symbols
from ggcomm.kernels import reference

ROOT = Path(__file__).resolve().parents[1]
HEAD = struct.Struct("<4sBBBBIIQIIQQ")


@functools.cache
def _fuzz_module():
    spec = importlib.util.spec_from_file_location("fuzz_frames",
                                                  ROOT / "benchmarks" / "fuzz_frames.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16,
            torch.bfloat16: torch.int16, torch.float64: torch.int64}
BIG = 1 << 22  # the largest block size


# --------------------------------------------------------------------------- frames by hand


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def craft(*, numel: int, shape=None, segments=None, block_size: int = 16384, blocks=(),
          exc_pos=(), exc_raw: bytes = b"", payload: bytes = b"", dtype: int = 1,
          magic: bytes = b"GGEG", version: int = 3, flags: int = 0, tag: int = 0,
          ndim=None, n_segments=None, n_blocks=None, n_exceptions=None,
          payload_len=None) -> bytes:
    """A frame from its fields (FORMAT.md, Layout), CRC included. The fixed header's
    counts default to the lists' lengths; pass them to make a frame that lies."""
    shape = (numel,) if shape is None else tuple(shape)
    segments = [(numel, 1.0)] if segments is None else segments
    body = HEAD.pack(magic, version, dtype, len(shape) if ndim is None else ndim, flags, tag,
                     block_size, numel, len(segments) if n_segments is None else n_segments,
                     len(blocks) if n_blocks is None else n_blocks,
                     len(exc_pos) if n_exceptions is None else n_exceptions,
                     len(payload) if payload_len is None else payload_len)
    body += b"".join(struct.pack("<Q", d) for d in shape)
    body += b"".join(struct.pack("<Qd", n, s) for n, s in segments)
    body += b"".join(struct.pack("<BBBBI", *b) for b in blocks)
    body += b"".join(struct.pack("<Q", p) for p in exc_pos) + exc_raw + payload
    return with_crc(body)


_FIXED = {"magic": (0, "4s"), "version": (4, "B"), "dtype": (5, "B"), "ndim": (6, "B"),
          "flags": (7, "B"), "tag": (8, "<I"), "block_size": (12, "<I"), "numel": (16, "<Q"),
          "n_segments": (24, "<I"), "n_blocks": (28, "<I"), "n_exceptions": (32, "<Q"),
          "payload_len": (40, "<Q")}
_BLOCK_FIELDS = {"mode": (0, "B"), "k": (1, "B"), "k_run": (2, "B"), "reserved": (3, "B"),
                 "bits": (4, "<I")}


def field(data: bytes, name: str) -> tuple[int, str]:
    """(offset, struct format) of a named field: a fixed-header name, ``shape[i]``,
    ``segment[i].length`` / ``.step``, ``block[i].mode`` / ``k`` / ``k_run`` / ``reserved`` /
    ``bits``, ``exc_pos[i]``, ``exc_val[i]`` or ``payload[i]`` (one byte)."""
    if name in _FIXED:
        return _FIXED[name]
    lay = _fuzz_module().layout(data)  # where each part of the frame starts
    itemsize, shape_off, seg_off, blk_off = lay.itemsize, lay.shape, lay.seg, lay.blk
    exc_off, val_off, pay_off = lay.exc, lay.exc_val, lay.payload
    part, _, sub = name.partition(".")
    base, i = part[:-1].split("[")
    i = int(i)
    if base == "shape":
        return shape_off + 8 * i, "<Q"
    if base == "segment":
        return seg_off + 16 * i + (0 if sub == "length" else 8), "<Q" if sub == "length" else "<d"
    if base == "block":
        off, fmt = _BLOCK_FIELDS[sub]
        return blk_off + 8 * i + off, fmt
    if base == "exc_pos":
        return exc_off + 8 * i, "<Q"
    if base == "exc_val":
        return val_off + itemsize * i, {2: "<H", 4: "<I", 8: "<Q"}[itemsize]
    if base == "payload":
        return pay_off + i, "B"
    raise KeyError(name)


def get(data: bytes, name: str):
    off, fmt = field(data, name)
    return struct.unpack_from(fmt, data, off)[0]


def edit(data: bytes, crc: bool = True, **changes) -> bytes:
    """The frame with named fields changed (``edit(f, numel=3, **{"block[0].k": 2})``) and
    its CRC recomputed (zlib.crc32 over everything before the last 4 bytes)."""
    b = bytearray(data)
    for name, value in changes.items():
        off, fmt = field(data, name)
        struct.pack_into(fmt, b, off, value)
    if crc:
        b[-4:] = struct.pack("<I", zlib.crc32(bytes(b[:-4])))
    return bytes(b)


def bits_to_bytes(bits: str) -> bytes:
    bits += "0" * (-len(bits) % 8)
    return bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8))


def one_block(bits: str, count: int, *, mode: int = 0, k: int = 0, k_run: int = 0,
              dtype: int = 4, step: float = 1.0, **kw) -> bytes:
    """A one-block frame of ``count`` elements whose codewords are ``bits``."""
    return craft(numel=count, segments=[(count, step)], block_size=max(count, 1),
                 blocks=[(mode, k, k_run, 0, len(bits))], payload=bits_to_bytes(bits),
                 dtype=dtype, **kw)


RANS_US = [0, 1, 2, 1, 0, 3, 4, 1, 2, 2, 0, 1] * 40  # symbols of a valid mode-4 block


def rans_block(us: list, table: list | None = None) -> bytes:
    """A mode-4 block of us (the reference encoder), with its table's stored frequencies
    replaced by ``table`` if given."""
    data = reference.rans_encode(us, reference.rans_table(us)[1])
    if table is not None:
        bits = "".join(f"{f:012b}" for f in table)
        tb = (12 * len(table) + 7) // 8
        data = bits_to_bytes(bits) + data[tb:]
    return data


def rans_frame(us: list, *, k: int | None = None, k_run: int = 0, bits: int = 0,
               extra: bytes = b"", cut: int = 0, table: list | None = None,
               table_pad: int = 0, state0: int | None = None, exc=(), **kw) -> bytes:
    """A one-block frame holding a mode-4 block of us (int64 values, step 1), with one rule
    broken by the arguments: k (the alphabet size minus one), k_run, bits added to the bit
    length, bytes appended or cut, the stored frequencies, the table's last nibble, the
    first state, exception positions."""
    data = bytearray(rans_block(us, table))
    n = max(us) + 1
    tb = (12 * (n - 1) + 7) // 8
    data[tb - 1] |= table_pad if tb else 0
    if state0 is not None:
        data[tb:tb + 4] = struct.pack("<I", state0)
    data = bytes(data[:len(data) - cut]) + extra
    return craft(numel=len(us), segments=[(len(us), 1.0)], block_size=len(us),
                 blocks=[(4, n - 1 if k is None else k, k_run, 0, 8 * len(data) + bits)],
                 payload=data, dtype=4, exc_pos=list(exc), exc_raw=b"\0" * 8 * len(exc), **kw)


def base_eg() -> bytes:
    """Three mode-0 blocks (k = 0), one exception (NaN at 4): FORMAT.md's simplest frame."""
    x = torch.tensor([0.0, 1.0, 0.0, -2.0, math.nan, 0.0, 3.0, 0.5, 0.0, 0.0])
    return encode(x, 0.5, block_size=4, zero_runs=False, k=0).tobytes()


def base_runs() -> bytes:
    """Zero-run blocks and two exceptions: NaN at 10, +inf at 40."""
    x = torch.zeros(64)
    x[5], x[10], x[40], x[50] = 1.0, math.nan, math.inf, -2.0
    return encode(x, 1.0, block_size=32, zero_runs=True).tobytes()


def eg_bits(v: int, k: int) -> str:
    return reference.eg_codeword(v, k)


def zero_runs_frame(n_blocks: int, *, count: int = BIG, k_run: int = 22, dtype: int = 1,
                    pad_bit: bool = False) -> bytes:
    """A valid frame of n_blocks all-zero mode-1 blocks: each is one run codeword, so
    ``count`` elements cost a few bytes. pad_bit: a 1 in the last block's padding."""
    code = eg_bits(count, k_run)
    assert len(code) % 8, "the padding case needs a partial last byte"
    blocks = [(1, 0, k_run, 0, len(code))] * n_blocks
    pay = bytearray(bits_to_bytes(code) * n_blocks)
    if pad_bit:
        pay[-1] |= 1
    numel = count * n_blocks
    return craft(numel=numel, segments=[(numel, 1.0)], block_size=count, blocks=blocks,
                 payload=bytes(pay), dtype=dtype)


def starved_frame(n_blocks: int, dtype: int = 1) -> bytes:
    """Mode-0 blocks of 2**22 elements with no bits at all: they claim what no payload holds
    (on main a 588-byte one allocated 1 GB, a 131 KB one tried 275 GB)."""
    numel = BIG * n_blocks
    return craft(numel=numel, segments=[(numel, 1.0)], block_size=BIG,
                 blocks=[(0, 0, 0, 0, 0)] * n_blocks, dtype=dtype)


@pytest.fixture
def allocations(monkeypatch):
    """Bytes of every torch.empty / torch.zeros the code asks for, recorded before the
    attempt (so a request that fails counts too; tracemalloc does not see torch's
    allocator), plus tracemalloc's peak for numpy; (list, stop())."""
    sizes: list[int] = []
    for name in ("empty", "zeros"):
        real = getattr(torch, name)

        def wrapper(*args, _real=real, **kw):
            dims = args[0] if len(args) == 1 and not isinstance(args[0], int) else args
            dtype = kw.get("dtype") or torch.get_default_dtype()
            sizes.append(math.prod(int(d) for d in dims)
                         * _real(0, dtype=dtype).element_size())
            return _real(*args, **kw)

        monkeypatch.setattr(torch, name, wrapper)
    tracemalloc.start()

    def stop() -> int:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    yield sizes, stop
    if tracemalloc.is_tracing():
        tracemalloc.stop()


def decode_all(data: bytes, max_numel=None) -> None:
    """Every entry point; each must raise FrameError (the caller checks with raises)."""
    for fn in (lambda: codec.Frame.from_buffer(data, max_numel=max_numel),
               lambda: decode(data, max_numel=max_numel),
               lambda: decode_symbols(data, max_numel=max_numel),
               lambda: inspect(data, max_numel=max_numel)):
        with pytest.raises(FrameError):
            fn()


# --------------------------------------------------------------------------- the helper


def test_edit_helper_round_trips():
    f = base_eg()
    assert inspect(edit(f, tag=0xABCDEF)).tag == 0xABCDEF
    assert get(f, "block[1].bits") == inspect(f).blocks[1].bit_length
    assert get(f, "segment[0].step") == 0.5 and get(f, "exc_pos[0]") == 4
    assert torch.equal(decode(edit(f, **{"segment[0].step": 0.25}))[:4],
                       torch.tensor([0.0, 0.5, 0.0, -1.0]))
    # crc=False leaves the old checksum: corrupt
    with pytest.raises(FrameError, match="checksum"):
        decode(edit(f, crc=False, tag=1))


# --------------------------------------------------------------------------- Validation
#
# One case per rejection. Each frame is built so that without the check it would decode
# (or decode wrongly), or fail elsewhere with a different message.


def _cases() -> dict[str, tuple[bytes, str]]:
    eg0 = base_eg()
    runs = base_runs()
    n_exc_runs = inspect(runs).exception_positions
    assert n_exc_runs == (10, 40)
    pad_blk = next(i for i, b in enumerate(inspect(eg0).blocks) if b.bit_length % 8)
    info = inspect(eg0)
    pad_at = info.blocks[pad_blk].bit_offset // 8 + info.blocks[pad_blk].bit_length // 8
    body = eg0[:-4]
    cases = {
        # length and checksum
        "trailing_bytes": (with_crc(body + b"\0\0\0\0"), "header describes"),
        "crc": (edit(eg0, crc=False, tag=5), "checksum"),
        # magic, version, dtype, flags, reserved
        "magic": (edit(eg0, magic=b"GGEH"), "magic"),
        "version": (edit(eg0, version=4), "version"),
        "dtype": (edit(eg0, dtype=5), "dtype code 5"),
        "flags": (edit(eg0, flags=1), "flags"),
        "reserved": (edit(eg0, **{"block[0].reserved": 1}), "reserved"),
        # ranges of the fixed header
        "ndim_65": (craft(numel=1, shape=(1,) * 65, blocks=[(0, 0, 0, 0, 1)],
                          payload=b"\x80", block_size=1), "65 dimensions"),
        "block_size_0": (edit(eg0, block_size=0), "block size 0"),
        "block_size_2^22+1": (craft(numel=3, block_size=BIG + 1, blocks=[(0, 0, 0, 0, 3)],
                                    payload=b"\xe0"), "block size"),
        "numel_2^64-1": (craft(numel=2**64 - 1), "claims"),
        "numel_2^62": (craft(numel=2**62), "claims"),
        # every dimension in range, their product not
        "numel_of_dims": (craft(numel=2**64 - 2**32, shape=(2**32, 2**32 - 1)), "claims"),
        "dim_2^63": (craft(numel=0, shape=(0, 2**63), segments=[(0, 1.0)]), "a dimension"),
        "n_segments_0": (craft(numel=0, segments=[]), "at least one segment"),
        "n_exceptions_above_numel": (craft(numel=1, blocks=[(0, 0, 0, 0, 1)],
                                           payload=b"\x80", exc_pos=[0, 0],
                                           exc_raw=b"\0" * 8, block_size=1),
                                     "2 exceptions for 1"),
        # counts that disagree
        "shape_product": (edit(eg0, **{"shape[0]": 9}), "does not hold"),
        "segment_sum": (craft(numel=10, segments=[(4, 0.5), (5, 0.5)], block_size=8,
                              blocks=[(0, 0, 0, 0, 4), (0, 0, 0, 0, 5)],
                              payload=b"\xf0\xf8"), "segment lengths"),
        # a length of 2**64 - 1 is -1 as int64: it must not pass as a small sum
        "segment_length_wraps": (craft(numel=10, segments=[(2**64 - 1, 0.5), (11, 0.5)],
                                       block_size=16, blocks=[(0, 0, 0, 0, 11)],
                                       payload=b"\xff\xe0"), "segment lengths"),
        # lengths that wrap int64 back to numel (5 * (2**62 - 1) + 4 = numel + 2**64)
        "segment_sum_wraps": (craft(numel=2**62 - 1,
                                    segments=[(2**62 - 1, 1.0)] * 5 + [(4, 1.0)],
                                    block_size=BIG), "segment lengths"),
        "n_blocks": (edit(eg0, block_size=8), "blocks, but the segments"),
        "payload_len": (edit(eg0, **{"block[0].bits": get(eg0, "block[0].bits") + 8}),
                        "do not add up to the"),
        "payload_without_blocks": (craft(numel=0, segments=[(0, 1.0)], payload=b"junk"),
                                   "do not add up to the"),
        # steps
        "step_0": (edit(eg0, **{"segment[0].step": 0.0}), "step"),
        "step_negative": (edit(eg0, **{"segment[0].step": -0.5}), "step"),
        "step_inf": (edit(eg0, **{"segment[0].step": math.inf}), "step"),
        "step_nan": (edit(eg0, **{"segment[0].step": math.nan}), "step"),
        "step_reciprocal_inf": (edit(eg0, **{"segment[0].step": 5e-324}), "step"),
        # the block table
        "mode_5": (edit(runs, **{"block[0].mode": 5}), "block mode 5"),
        "mode_4_in_version_2": (rans_frame(RANS_US, version=2), "block mode 4 in a version 2"),
        "mode_3_in_version_1": (edit(runs, version=1, **{"block[0].mode": 3}),
                                "block mode 3 in a version 1 frame"),
        "mode_2_in_version_1": (edit(runs, version=1, **{"block[0].mode": 2}),
                                "block mode 2 in a version 1 frame"),
        "k_run_in_mode_2": (one_block("1" * 4, 4, mode=2, k_run=1), "nonzero k_run"),
        "k_31": (edit(eg0, **{"block[0].k": 31}), "order above 30"),
        "k_run_31": (edit(runs, **{"block[0].k_run": 31}), "order above 30"),
        "k_run_in_mode_0": (edit(eg0, **{"block[0].k_run": 1}), "nonzero k_run"),
        # exceptions
        "exc_not_increasing": (edit(runs, **{"exc_pos[0]": 40, "exc_pos[1]": 10}),
                               "not increasing"),
        "exc_repeated": (edit(runs, **{"exc_pos[1]": 10}), "not increasing"),
        "exc_past_numel": (edit(eg0, **{"exc_pos[0]": 10}), "not increasing"),
        "exc_position_2^63": (edit(eg0, **{"exc_pos[0]": 2**63 + 4}), "not increasing"),
        "exc_on_nonzero_code": (edit(eg0, **{"exc_pos[0]": 3}), "nonzero code"),
        # codewords (the kernels' checks)
        "prefix_too_long": (one_block("0" * 32 + "1" + "0" * 32, 1), "zero prefix"),
        # codewords 1 010 (u = 0, 1) said to be 3 bits: the second runs past them
        "overrun": (edit(one_block("1010", 2), **{"block[0].bits": 3}), "do not fill"),
        "unread_bits": (one_block("1" + "1", 1), "do not fill"),
        "padding": (edit(eg0, **{f"payload[{pad_at}]": eg0[field(eg0, f"payload[{pad_at}]")[0]]
                                 | 1}), "nonzero padding"),
        "u_above_2^31-2_mode0": (one_block(eg_bits(2**31 - 1, 1), 1, k=1), "outside"),
        "u_above_2^31-2_mode1": (one_block(eg_bits(0, 0) + eg_bits(2**31 - 2, 1), 1, mode=1,
                                           k=1), "outside"),
        "run_past_block": (one_block(eg_bits(4, 0), 3, mode=1), "run of zeros"),
        # mode 2: an escape (16 zeros, then EG_k(u)) must hold u >= 16 * 2^k; its EG prefix
        # is at most 31 - k zeros; Golomb-Rice values past 2^31 - 2 at large k
        "escape_below_range": (one_block("0" * 16 + eg_bits(15, 0), 1, mode=2), "outside"),
        "escape_prefix_too_long": (one_block("0" * 16 + "0" * 32 + "1" + "0" * 32, 1, mode=2),
                                   "zero prefix"),
        "u_above_2^31-2_mode2": (one_block("0" * 15 + "1" + "1" * 27, 1, mode=2, k=27),
                                 "outside"),
        "budget_mode2": (one_block("10" * 9, 10, mode=2, k=1), "cannot hold"),
        # mode 3: zero runs, the values in mode 2's code (a run of 0, then an escape)
        "escape_below_range_mode3": (one_block("1" + "0" * 16 + eg_bits(15, 0), 1, mode=3),
                                     "outside"),
        "run_past_block_mode3": (one_block(eg_bits(4, 0), 3, mode=3), "run of zeros"),
        # the same values inside a longer payload (the one-load path of zero-run blocks)
        "u_above_2^31-2_mode1_long": (one_block("1" + eg_bits(2**31 - 2, 30) + "1" * 40, 10,
                                                mode=1, k=30), "outside"),
        "u_above_2^31-2_mode3_long": (one_block("1" + "0" * 15 + "1" + "1" * 27 + "1" * 40,
                                                10, mode=3, k=27), "outside"),
        "run_past_block_mode3_long": (one_block(eg_bits(11, 0) + "1" * 40, 10, mode=3),
                                      "run of zeros"),
        "budget_mode3": (one_block("001", 3, mode=3), "cannot hold"),
        # the budgets: fewer bits than the elements need (mode 0: count * (k + 1))
        "budget_mode0": (one_block("1" * 9, 10, k=0), "cannot hold"),
        "budget_mode0_k": (one_block("100" * 9 + "10", 10, k=2), "cannot hold"),
        # mode 1: fewer bits than one run of all zeros, or a run and the symbol 1
        # (3 elements at k = k_run = 0: 4 bits, a run of 2 then the symbol 1: 011 1)
        "budget_mode1": (one_block("001", 3, mode=1), "cannot hold"),
        "budget_mode1_big": (one_block(eg_bits(BIG, 0)[:-1], BIG, mode=1), "cannot hold"),
        # mode 4 (rANS): the table, states and words (a valid block, then each rule broken)
        "rans_alphabet_65": (rans_frame(RANS_US, k=64), "alphabet"),
        "rans_k_run": (rans_frame(RANS_US, k_run=1), "nonzero k_run"),
        "rans_not_bytes": (rans_frame(RANS_US, bits=-4), "whole 16-bit words"),
        "rans_odd_word": (rans_frame(RANS_US, extra=b"\0"), "whole 16-bit words"),
        "rans_budget": (rans_frame(RANS_US, cut=len(rans_block(RANS_US)) - 10), "cannot hold"),
        "rans_frequencies": (rans_frame(RANS_US, table=[4000, 96, 0]), "frequencies add up"),
        "rans_table_padding": (rans_frame([0, 1, 1, 0], table_pad=1), "padding"),
        "rans_state_below_2^16": (rans_frame(RANS_US, state0=0xFFFF), "rANS state"),
        "rans_state_end": (rans_frame([0] * 9, state0=(1 << 16) + 1), "rANS state"),
        "rans_word_past_end": (rans_frame(RANS_US, cut=2), "past the end"),
        "rans_unread_word": (rans_frame(RANS_US, extra=b"\0\0"), "do not fill"),
        "rans_exc_on_nonzero_code": (rans_frame(RANS_US, exc=[1]), "nonzero code"),
    }
    return cases


CASES = _cases()


def test_rans_cases_start_from_a_valid_block():
    """The mode-4 cases above break one rule each of a block that decodes."""
    for us in (RANS_US, [0] * 9, [0, 1, 1, 0]):
        assert decode(rans_frame(us)).tolist() == [reference.q_of_u(u) for u in us]


@pytest.mark.parametrize("name", list(CASES))
def test_every_validation_rule_rejects(name):
    data, message = CASES[name]
    for fn in (lambda: decode(data), lambda: decode_symbols(data)):
        with pytest.raises(FrameError, match=message):
            fn()
    if message not in ("zero prefix", "do not fill", "outside", "run of zeros",
                       "nonzero code", "frequencies add up", "rANS state",
                       "past the end") and name != "rans_table_padding":
        # rules checked before any decoding
        with pytest.raises(FrameError, match=message):
            inspect(data)
        with pytest.raises(FrameError, match=message):
            codec.Frame.from_buffer(data)


def test_swapped_exception_positions_never_swap_the_values():
    """With the increasing-positions check gone, this frame decoded with its NaN and inf
    values silently swapped."""
    runs = base_runs()
    y = decode(runs)
    assert math.isnan(y[10]) and y[40] == math.inf
    with pytest.raises(FrameError, match="not increasing"):
        decode(edit(runs, **{"exc_pos[0]": 40, "exc_pos[1]": 10}))


def test_mode0_k_run_is_rejected_not_ignored():
    eg0 = base_eg()
    bad = edit(eg0, **{"block[1].k_run": 30})
    with pytest.raises(FrameError, match="nonzero k_run"):
        decode(bad)
    # the same k_run in a mode-1 block is valid
    runs = base_runs()
    kr = get(runs, "block[0].k_run")
    assert decode(runs).shape == (64,) and kr <= 30


def test_underflowing_value_at_an_exception_position_is_rejected():
    """The code at an exception position must be 0 even where q * step underflows to 0 in
    float32 (checked on the symbols, not on the decoded values)."""
    data = craft(numel=2, segments=[(2, 1e-300)], block_size=2, blocks=[(0, 0, 0, 0, 4)],
                 exc_pos=[0], exc_raw=struct.pack("<f", 7.0), payload=bits_to_bytes("0101"))
    for fn in (decode, decode_symbols):
        with pytest.raises(FrameError, match="nonzero code"):
            fn(data)
    ok = edit(data, **{"payload[0]": 0b11000000}, **{"block[0].bits": 2})
    assert decode(ok).tolist() == [7.0, 0.0]


def test_kernel_padding_check_stands_behind_a_stale_header():
    """The kernels re-check padding: a Frame whose bytes changed after parsing (its header
    object is stale) is still refused."""
    eg0 = base_eg()
    good = codec.Frame.from_buffer(eg0)
    bad = torch.from_numpy(np.frombuffer(CASES["padding"][0], np.uint8).copy())
    with pytest.raises(FrameError, match="padding bits after the block"):
        decode(codec.Frame(bad, good._h))
    with pytest.raises(FrameError, match="padding"):
        codec.sum_frames(bad, [(0, codec.Frame(bad, good._h))], out=np.empty(10, np.float32))


def test_budget_exactly_met_decodes():
    """The budgets are tight: blocks with exactly the fewest bits are valid."""
    # mode 0: all zeros at order k, k + 1 bits each
    for k in (0, 3, 30):
        data = one_block(eg_bits(0, k) * 10, 10, k=k)
        assert decode(data).tolist() == [0.0] * 10
    # mode 1: one run of all zeros, or a run and the symbol 1, whichever is shorter
    for count in (1, 2, 3, 7, 8, 1000):
        for krun in (0, 1, 2, 5):
            for k in (0, 1, 4):
                a = eg_bits(count, krun)
                b = eg_bits(count - 1, krun) + eg_bits(0, k)
                need = int(codec._min_block_bits(np.array([1]), np.array([k]),
                                                 np.array([krun]), np.array([count]))[0])
                assert need == min(len(a), len(b))
                best = a if len(a) <= len(b) else b
                y = decode(one_block(best, count, mode=1, k=k, k_run=krun))
                assert y.shape == (count,)
                with pytest.raises(FrameError, match="cannot hold"):
                    decode(one_block(best[:-1], count, mode=1, k=k, k_run=krun))


def _fewest_bits_mode1(count: int, k: int, krun: int) -> int:
    """Fewest bits over every parse FORMAT.md's mode-1 reader accepts, by exhaustive
    dynamic programming (values at their cheapest, k + 1 bits)."""
    @__import__("functools").cache
    def from_run(i: int) -> int:  # i < count, a run codeword comes next
        best = math.inf
        for r in range(count - i + 1):
            j = i + r
            cost = len(eg_bits(r, krun))
            if j < count:
                cost += k + 1
                if j + 1 < count:
                    cost += from_run(j + 1)
            best = min(best, cost)
        return best

    return from_run(0)


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("krun", [0, 1, 2, 4])
def test_mode1_budget_is_the_exact_minimum(k, krun):
    counts = np.arange(1, 90)
    got = codec._min_block_bits(np.ones_like(counts), np.full_like(counts, k),
                                np.full_like(counts, krun), counts)
    assert got.tolist() == [_fewest_bits_mode1(int(c), k, krun) for c in counts]
    big = np.array([BIG, BIG - 1, 12345])
    assert codec._min_block_bits(np.zeros(3, np.int64), np.full(3, k), np.zeros(3, np.int64),
                                 big).tolist() == (big * (k + 1)).tolist()


def test_encoder_frames_meet_the_budgets():
    rng = np.random.default_rng(0)
    for zr in ("auto", True, False):
        for p0 in (0.0, 0.5, 0.99, 1.0):
            x = torch.from_numpy(rng.laplace(size=5000).astype(np.float32))
            x[torch.from_numpy(rng.random(5000) < p0)] = 0
            f = encode(x, 0.1, block_size=int(rng.choice([1, 2, 3, 64, 700])), zero_runs=zr)
            assert torch.equal(decode(f.tobytes()), decode(f))


# --------------------------------------------------------------------------- findings 1-3


def test_numel_2_64_minus_1_is_a_frame_error(allocations):
    """Finding 1: a CRC-valid 76-byte frame claiming 2**64 - 1 elements."""
    sizes, stop = allocations
    data = craft(numel=2**64 - 1)
    assert len(data) == 76
    decode_all(data)
    with pytest.raises(FrameError, match="claims 18446744073709551615 elements"):
        decode(data)
    assert stop() < 1 << 20 and max(sizes, default=0) < 1 << 20


def test_shape_and_numel_ranges():
    ok = craft(numel=0, shape=(0, 2**62 - 1), segments=[(0, 1.0)])
    assert decode(ok).shape == (0, 2**62 - 1)
    for shape in [(0, 2**62), (2**64 - 1, 0), (2**62, 1, 0)]:
        with pytest.raises(FrameError, match="a dimension"):
            decode(craft(numel=0, shape=shape, segments=[(0, 1.0)]))
    # products are taken in Python ints: 2**32 * 2**32 is not 0
    with pytest.raises(FrameError, match="does not hold"):
        decode(craft(numel=0, shape=(2**32, 2**32), segments=[(0, 1.0)]))


@pytest.mark.parametrize("n_blocks,dtype,size", [(64, 1, 588), (502, 4, 4092),
                                                 (16374, 1, 131068)])
def test_starved_blocks_are_rejected_before_allocating(allocations, n_blocks, dtype, size):
    """Finding 2: 588 B -> 1 GB, 4 KB -> 16.5 GB, 131 KB -> 275 GB on main."""
    sizes, stop = allocations
    data = starved_frame(n_blocks, dtype)
    assert len(data) == size
    decode_all(data)
    with pytest.raises(FrameError, match="block 0: 0 bits cannot hold its 4194304"):
        decode(data)
    assert max(sizes, default=0) < 1 << 20, sizes  # nothing near numel * itemsize
    assert stop() < 4 << 20


def test_zero_run_frame_is_bounded_by_max_numel(allocations):
    """Finding 3: a valid 268-byte frame of 2**26 zeros; max_numel refuses it unallocated."""
    sizes, stop = allocations
    data = zero_runs_frame(16)
    assert len(data) == 268
    assert inspect(data).numel == 2**26  # valid, and inspect allocates nothing for it
    for fn in (codec.Frame.from_buffer, decode, decode_symbols, inspect):
        with pytest.raises(FrameError, match="max_numel=1048576"):
            fn(data, max_numel=1 << 20)
    frame = codec.Frame.from_buffer(data)  # no limit: structure only
    with pytest.raises(FrameError, match="max_numel"):
        decode(frame, max_numel=2**26 - 1)
    assert max(sizes, default=0) < 1 << 20, sizes
    assert stop() < 4 << 20


def test_max_numel_boundary_and_arguments():
    f = encode(torch.randn(3, 5), 0.1)
    b = f.tobytes()
    assert decode(b, max_numel=15).shape == (3, 5)
    assert decode(f, max_numel=15).shape == (3, 5)
    assert inspect(b, max_numel=15).numel == 15
    assert decode_symbols(b, max_numel=15)[0].numel() == 15
    assert codec.Frame.from_buffer(b, max_numel=15).numel == 15
    for fn in (codec.Frame.from_buffer, decode, decode_symbols, inspect):
        with pytest.raises(FrameError, match="max_numel=14"):
            fn(b, max_numel=14)
    assert decode(encode(torch.empty(0), 1.0).tobytes(), max_numel=0).numel() == 0
    for bad in (-1, 1.5, "10", True):
        with pytest.raises(ValueError, match="max_numel"):
            decode(b, max_numel=bad)


def test_bad_padding_fails_before_allocating(allocations):
    """One bad padding bit after 2**22 zeros: refused from the block table's bytes."""
    sizes, stop = allocations
    data = zero_runs_frame(1, pad_bit=True)
    with pytest.raises(FrameError, match="block 0: nonzero padding"):
        decode(data)
    with pytest.raises(FrameError, match="nonzero padding"):
        inspect(data)
    assert max(sizes, default=0) < 1 << 20, sizes
    stop()
    assert decode(zero_runs_frame(1)).abs().sum() == 0  # without the bit: valid


_MEMORY_SCRIPT = r"""
import json, resource, struct, sys
sys.path.insert(0, sys.argv[1])
import test_hostile_codec as t
import torch, ggcomm
from ggcomm import FrameError
ggcomm.decode(ggcomm.encode(torch.randn(100000), 0.1).tobytes())  # warm up
ggcomm.decode(t.base_runs())
frames = {"numel_2^64-1": (t.craft(numel=2**64 - 1), None),
          "starved_588B": (t.starved_frame(64), None),
          "starved_4KB": (t.starved_frame(502, 4), None),
          "starved_131KB": (t.starved_frame(16374), None),
          "zero_runs_268B": (t.zero_runs_frame(16), 1 << 20),
          "bad_padding": (t.zero_runs_frame(1, pad_bit=True), None)}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {}
for name, (data, limit) in frames.items():
    kinds = []
    for fn in (ggcomm.decode, ggcomm.codec.decode_symbols, ggcomm.inspect,
               ggcomm.Frame.from_buffer):
        try:
            fn(data, max_numel=limit)
            kinds.append("accepted")
        except Exception as e:
            kinds.append(type(e).__name__)
    out[name] = kinds
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"results": out, "growth_kib": after - before}))
"""


def test_hostile_frames_stay_under_64mb_resident():
    """In a fresh process: every hostile frame raises FrameError from every entry point and
    peak RSS grows by less than 64 MB."""
    r = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(Path(__file__).parent)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for name, kinds in res["results"].items():
        assert kinds == ["FrameError"] * 4, (name, kinds)
    assert res["growth_kib"] < 64 * 1024, res


# --------------------------------------------------------------------------- finding 4


def _three_blocks_last_corrupt(dtype):
    x = torch.randn(3000, dtype=torch.float64).to(dtype)
    f = encode(x, 0.05, block_size=1000, zero_runs=False)
    info = inspect(f)
    last = info.blocks[-1]
    # the last block's codewords all zero (same length, zero padding): no valid codeword
    lo = info.header_bytes + last.bit_offset // 8
    hi = lo + (last.bit_length + 7) // 8
    data = bytearray(f.tobytes())
    data[lo:hi] = bytes(hi - lo)
    data[-4:] = struct.pack("<I", zlib.crc32(bytes(data[:-4])))
    return bytes(data), f


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16,
                                   torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("strided", [False, True])
def test_decode_out_is_untouched_when_a_later_block_is_corrupt(dtype, threads, strided):
    bad, good = _three_blocks_last_corrupt(dtype)
    before = ggcomm.get_num_threads()
    try:
        ggcomm.set_num_threads(threads)
        base = torch.full((6000 if strided else 3000,), 7.25, dtype=dtype)
        base.view(INT_VIEW[dtype])[::5] = -1  # NaN bit patterns too
        out = base[::2] if strided else base
        snapshot = base.clone()
        with pytest.raises(FrameError, match="block 2"):
            decode(bad, out=out)
        assert torch.equal(base.view(INT_VIEW[dtype]), snapshot.view(INT_VIEW[dtype]))
        # and a good frame fills it
        assert decode(good, out=out) is out
        assert torch.equal(out.view(INT_VIEW[dtype]) if not strided else
                           out.contiguous().view(INT_VIEW[dtype]),
                           decode(good).view(INT_VIEW[dtype]))
    finally:
        ggcomm.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_decode_keep_out_false_still_raises_frame_error(dtype):
    """keep_out=False (a receive buffer) writes straight into out: a frame whose last
    block is corrupt still raises FrameError (out may hold part of it), and a good frame
    fills out again."""
    bad, good = _three_blocks_last_corrupt(dtype)
    out = torch.full((3000,), 7.25, dtype=dtype)
    with pytest.raises(FrameError, match="block 2"):
        decode(bad, out=out, keep_out=False)
    assert decode(good, out=out, keep_out=False) is out
    assert torch.equal(out.view(INT_VIEW[dtype]), decode(good).view(INT_VIEW[dtype]))


# --------------------------------------------------------------------------- finding 5

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _floor_ratio(a: float, b: float) -> int:
    return math.floor(Fraction(a) / Fraction(b))


def _check_finite_and_close(x: torch.Tensor, step: float):
    f = encode(x, step)
    y = decode(f)
    exc = set(inspect(f).exception_positions)
    xd, yd = x.double(), y.double()
    for i in range(x.numel()):
        if not math.isfinite(float(xd[i])):
            continue
        assert math.isfinite(float(yd[i])), (x.dtype, step, float(xd[i]))
        if i in exc:
            assert x.view(INT_VIEW[x.dtype])[i] == y.view(INT_VIEW[x.dtype])[i]
        else:  # within step / 2 before rounding to the dtype, and never past vmax
            q = round(float(Fraction(float(xd[i])) / Fraction(step)))
            assert abs(q) <= _floor_ratio(float(torch.finfo(x.dtype).max), step)
    # the exceptions are exactly what FORMAT.md's rule says
    xs = (x if x.dtype in (torch.float32, torch.float64) else x.float()).numpy()
    us, ref_exc = reference.quantize(xs, np.array([0, x.numel()]), np.array([step]),
                                     vmax=float(torch.finfo(x.dtype).max))
    assert sorted(exc) == ref_exc
    return y


@pytest.mark.parametrize("dtype", FLOATS)
def test_largest_finite_values_come_back_finite(dtype):
    vmax = float(torch.finfo(dtype).max)
    below = torch.tensor([vmax], dtype=dtype).view(INT_VIEW[dtype]) - 1
    xs = torch.cat([torch.tensor([vmax, -vmax, vmax * 0.999, 1.0, 0.0], dtype=dtype),
                    below.view(dtype), (-below).view(dtype)])
    steps = [1000.0, 3.0, 0.7, vmax / 2, vmax / 3, vmax, vmax / 65.5, vmax / 65.504,
             float(np.nextafter(vmax / 66, 0)), 1e-3]
    if dtype != torch.float64:
        steps += [1e300, 2 * vmax]
    for step in steps:
        _check_finite_and_close(xs, step)
    # the issue's example: float16 65504 at step 1000 -> q = 66 -> 66000 -> inf on main
    if dtype == torch.float16:
        f = encode(torch.tensor([65504.0], dtype=torch.float16), 1000.0)
        assert decode(f).item() == 65504.0 and inspect(f).exception_positions == (0,)


@settings(max_examples=200, deadline=None)
@given(dtype=st.sampled_from(FLOATS), log_step=st.floats(-3, 330),
       mant=st.floats(1.0, 2.0, exclude_max=True), frac=st.floats(0.9, 1.0))
def test_coarse_steps_never_overflow(dtype, log_step, mant, frac):
    vmax = float(torch.finfo(dtype).max)
    step = mant * 10.0 ** min(log_step, 307)
    if not (math.isfinite(step) and math.isfinite(1.0 / step)):
        return
    x = torch.tensor([vmax * frac, -vmax * frac, vmax, -vmax], dtype=torch.float64).to(dtype)
    _check_finite_and_close(x, step)


def test_fused_encoders_keep_values_finite_and_match_the_reference():
    """encode_feedback (float32) and encode_integers (float64) apply the same limit, bit for
    bit with encode and the reference, so DDP's sums stay identical across ranks."""
    fmax = float(np.finfo(np.float32).max)
    g = np.array([fmax, -fmax, fmax * 0.99, 3e38, 1.0, 0.0, np.nan], np.float32)
    for step in (1e37, 3e37, fmax / 7, fmax / 6.5, fmax):
        steps = np.array([step])
        resid = np.zeros_like(g)
        q = np.zeros(g.size, np.int32)
        frame, _ = codec.encode_feedback(g, resid, steps, [g.size], q_out=q)
        plain = encode(torch.from_numpy(g.copy()), step)
        assert frame.tobytes() == plain.tobytes()
        y = decode(frame).numpy()
        assert np.isfinite(y[:6]).all()
        _, r_ref, q_ref, _ = reference.feedback(g, np.zeros_like(g), np.array([0, g.size]),
                                                steps)
        np.testing.assert_array_equal(q, q_ref)
        np.testing.assert_array_equal(resid, r_ref)
    dmax = float(np.finfo(np.float64).max)
    step = dmax / 10.5  # M = 10: |s| <= 10 coded, 11 an exception (11 * step overflows)
    s = np.array([10, -10, 11, -11, 3, 0], np.int64)
    frame = codec.encode_integers(s.copy(), np.array([step]), [s.size], np.empty(0, np.int64),
                                  np.empty(0))
    assert inspect(frame).exception_positions == (2, 3)
    y = decode(frame).numpy()
    np.testing.assert_array_equal(y[[0, 1, 4, 5]], s[[0, 1, 4, 5]] * step)
    assert np.isinf(y[[2, 3]]).all()  # s * step itself overflows: carried as such


def test_kernels_equal_reference_at_coarse_steps():
    """The per-block limit in encode_blocks agrees with the reference bit for bit."""
    from test_codec import reference_frame_parts

    rng = np.random.default_rng(5)
    fmax = float(np.finfo(np.float32).max)
    top = rng.uniform(0.94, 1.0, 200) * rng.choice([-1, 1], 200)  # the top half-steps
    x = torch.from_numpy((np.concatenate([top, rng.uniform(-1, 1, 200), [1, -1]])
                          * fmax).astype(np.float32))
    x[::7] = 0
    # M = floor(fmax / step) = 3, 65, 34, each with values above (M + 1/2) * step
    for step in (fmax / 3.7, fmax / 65.8, 9.8e36):
        f = encode(x, step, block_size=64)
        info = inspect(f)
        parts, exc = reference_frame_parts(x, [step], [x.numel()], 64, -1, 1)
        assert len(exc) > 10  # the limit is exercised: these would be q = M + 1 otherwise
        assert list(info.exception_positions) == exc
        assert info.payload == b"".join(p[3] for p in parts)
        assert np.isfinite(decode(f).numpy()).all()


# --------------------------------------------------------------------------- finding 6


def test_set_num_threads_while_other_threads_code():
    x = torch.randn(120000)
    frame = encode(x, 0.05, block_size=1024).tobytes()
    expected = decode(frame)
    errors: list[str] = []
    calls = [0]
    stop = threading.Event()
    before = ggcomm.get_num_threads()

    def work():
        while not stop.is_set() and calls[0] < 600:
            try:
                f = encode(x, 0.05, block_size=1024)
                assert f.tobytes() == frame
                assert torch.equal(decode(f), expected)
                calls[0] += 1
            except Exception as e:  # noqa: BLE001 - any error is the failure
                errors.append(repr(e))
                return

    def flip():
        i = 0
        while not stop.is_set():
            ggcomm.set_num_threads(1 + i % 4)
            i += 1
            time.sleep(0.0005)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        workers = [threading.Thread(target=work) for _ in range(3)]
        flipper = threading.Thread(target=flip)
        for t in [*workers, flipper]:
            t.start()
        deadline = time.monotonic() + 60
        while calls[0] < 300 and not errors and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        for t in [*workers, flipper]:
            t.join()
    finally:
        sys.setswitchinterval(old)
        ggcomm.set_num_threads(before)
    assert not errors, errors[:3]
    assert calls[0] >= 300
    # the dropped pools' workers exit: no thread leak
    for _ in range(100):
        gc.collect()
        alive = [t for t in threading.enumerate() if t.name.startswith("ggcomm-codec")]
        if len(alive) <= 4:
            break
        time.sleep(0.05)
    assert len(alive) <= 4, len(alive)


# --------------------------------------------------------------------------- fuzzing


def test_short_fuzz_run_only_raises_frame_error():
    fuzz = _fuzz_module()
    res = fuzz.run(3000, seed=11)
    assert not res.failures, res.failures[:5]
    decoded = sum(v for k, v in res.outcomes.items() if k.startswith("decoded"))
    rejected = sum(v for k, v in res.outcomes.items() if k.startswith("rejected"))
    assert decoded > 50 and rejected > 2000  # both sides of the decoder are exercised
    assert res.outcomes["rejected: above max_numel"] > 0
    assert res.rss_growth_mb < fuzz.RSS_BOUND_MB


def test_forged_frames_with_blocks_of_no_symbols_are_checked():
    """The forger makes frames whose block size leaves a block of no symbols; a rANS block
    there has no table to build from symbols (these seeds stopped a 100,000-frame run)."""
    fuzz = _fuzz_module()
    for seed in (705, 1950, 3101):
        data = fuzz.forge(np.random.default_rng(seed))
        outcome = fuzz.check(data, np.random.default_rng(seed))
        assert outcome.startswith(("decoded", "rejected")), outcome
