"""ggcomm.transport: the one traffic-counter class and settings fingerprint of the transports."""

from __future__ import annotations

import math

import pytest

from ggcomm import transport
from ggcomm.ddp import GGCommState
from ggcomm.errors import PipeSettingsError, SettingsMismatchError
from ggcomm.pipeline import PipeComm


def test_link_counters_per_direction_and_together() -> None:
    s = transport.TrafficStats(("bytes_sent", "bytes_received", "raw_bytes_sent",
                                "raw_bytes_received", "elements_sent", "elements_received"),
                               ("forward", "backward"))
    s.add("forward", bytes_sent=100, raw_bytes_sent=400, elements_sent=100)
    s.add("backward", bytes_sent=300, raw_bytes_sent=400, elements_sent=100)
    assert s["forward"]["ratio_sent"] == 4 and s["forward"]["bits_per_element_sent"] == 8
    assert s["total"]["ratio_sent"] == 2 and s["total"]["bits_per_element_sent"] == 16
    assert math.isnan(s["total"]["ratio_received"])
    assert "last_step" not in s.summary()  # no iteration closed yet
    with pytest.raises(ValueError, match="name the stream"):
        s.add(bytes_sent=1)
    s.reset()
    assert s["forward"]["bytes_sent"] == 0


def test_iterations_close_into_last_step_and_accumulate() -> None:
    s = transport.TrafficStats(("bytes_sent", "raw_bytes", "elements", "payload_bits"))
    s.add(bytes_sent=10, raw_bytes=80, elements=20, payload_bits=60)
    s.buckets.append({"numel": 20})
    last = s.end_iteration()
    assert last["ratio"] == 8 and last["bits_per_element"] == 4
    assert last["payload_bits_per_element"] == 3 and s.last_buckets == [{"numel": 20}]
    s.add(bytes_sent=30, raw_bytes=80, elements=20)
    s.end_iteration()
    assert s["last_step"]["bytes_sent"] == 30 and s["total"]["bytes_sent"] == 40
    assert s["total"]["steps"] == 2 and s.buckets == [] and s.last_buckets == []


def test_both_transports_count_and_fingerprint_through_it() -> None:
    comm, state = PipeComm(), GGCommState(rate=3.0)
    assert isinstance(comm.stats, transport.TrafficStats)
    assert isinstance(state.stats, transport.TrafficStats)
    assert comm.fingerprint == transport.fingerprint(comm.protocol_settings())
    assert state.fingerprint == transport.fingerprint(state.settings())
    assert PipeComm(min_numel=5).fingerprint != comm.fingerprint
    assert GGCommState(rate=2.5).fingerprint != state.fingerprint
    # one exception for peers configured differently, under its former pipeline name too
    assert PipeSettingsError is SettingsMismatchError
