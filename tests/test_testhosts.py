"""ggcomm.tools.testhosts: shaped test hosts in network namespaces, and their removal.

Tests that build hosts need root and network namespaces; without them they are skipped with
the reason the module gives. Two prefixes of their own keep them apart from hosts a user has
up with the default prefix; a second run of this file at the same time on the same machine
finds them busy and skips.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import ipaddress
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ggcomm.tools import testhosts as th

SCRIPT = Path(th.__file__)  # standard library only: runs as a script on a bare python

PREFIX = "ggct"  # hosts shared by the measurement tests
OTHER = "ggcu"  # hosts the life-cycle tests build and tear down
RATE = "100mbit"
RATE_BPS = 100e6
REASON = th.unavailable_reason(PREFIX)
# the module in a child process, as `th`
IMPORT_IN_CHILD = (
    "import os, sys, time\n"
    "from ggcomm.tools import testhosts as th\n"
)
needs_hosts = pytest.mark.skipif(REASON is not None, reason=f"test hosts unavailable: {REASON}")


@contextlib.contextmanager
def hosts_or_skip(*args, **kw):
    try:
        hosts = th.TestHosts(*args, **kw).__enter__()
    except th.HostsBusy as e:
        pytest.skip(f"another run holds the test prefix: {e}")
    try:
        yield hosts
    finally:
        hosts.__exit__(None, None, None)


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, **kw
    )


def leftovers(prefix: str) -> list[str]:
    """Everything with the prefix: namespaces, /etc/netns entries, links in this namespace."""
    names = th.list_namespaces(prefix)
    links = json.loads(
        subprocess.run(
            ["ip", "-j", "link", "show"], capture_output=True, text=True, check=True
        ).stdout
    )
    names += [link["ifname"] for link in links if link["ifname"].startswith(prefix + "-")]
    return names


def alive(pid: int) -> bool:
    return th._start_time(pid) is not None


def crashed_owner_leaves_hosts(prefix: str) -> int:
    """Build hosts in a process that dies without removing them, leaving a process inside;
    returns that process's id."""
    code = (
        IMPORT_IN_CHILD + f"h = th.TestHosts(2, {RATE!r}, {prefix!r}); h.up()\n"
        "quiet = dict(start_new_session=True, stdout=-3, stderr=-3)  # DEVNULL: no pipes held\n"
        "print(h.popen(1, ['sleep', '600'], **quiet).pid, flush=True)\n"
        "os._exit(0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and "HostsBusy" in r.stderr:
        pytest.skip(f"another run holds the test prefix: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


# --- without privileges ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "rate,bps",
    [
        ("10gbit", 10**10),
        ("1gbit", 10**9),
        ("100mbit", 10**8),
        ("2.5Gbit", 25 * 10**8),
        ("500kbit", 5 * 10**5),
        (10**9, 10**9),
        (None, None),
        ("none", None),
    ],
)
def test_parse_rate(rate, bps):
    assert th.parse_rate(rate) == bps


@pytest.mark.parametrize("rate", ["fast", "1gbps", "1 gigabit", "-1mbit", "1kbit"])
def test_parse_rate_rejects(rate):
    with pytest.raises(ValueError, match="rate"):
        th.parse_rate(rate)


def test_parse_rate_rejects_non_rates():
    with pytest.raises(TypeError):
        th.parse_rate(True)


def test_tbf_bucket_holds_a_gso_packet_at_high_rates_and_frames_at_low_rates():
    fast, slow = th.tbf_params(10**10), th.tbf_params(10**6)
    assert fast["burst"] == int(10**10 / 8 * th.BURST_S) >= 65536
    assert slow["burst"] == th.MIN_BURST_BYTES >= 4 * 1514
    for p in (fast, slow, th.tbf_params(10**8)):
        assert p["limit"] >= p["burst"] + p["rate"] / 8 * th.QUEUE_S - 1
        assert p["limit"] >= th.MIN_QUEUE_BYTES


def test_names_addresses_and_env_without_building():
    h = th.TestHosts(4, "1gbit", "ggcx", subnet="10.77.3.0/24", master_port=1234)
    assert h.namespaces == ["ggcx-h0", "ggcx-h1", "ggcx-h2", "ggcx-h3"]
    assert h.addresses == ["10.77.3.1", "10.77.3.2", "10.77.3.3", "10.77.3.4"]
    assert all(len(name) <= 15 for name in [*h.interfaces, *h.switch_ports, h.bridge])
    env = h.env(2)
    assert env["MASTER_ADDR"] == "10.77.3.1" and env["MASTER_PORT"] == "1234"
    assert env["GLOO_SOCKET_IFNAME"] == "ggcx-h2" and env["RANK"] == "2"
    assert env["WORLD_SIZE"] == "4"
    assert h.command(3, ["python", "-V"]) == ["ip", "netns", "exec", "ggcx-h3", "python", "-V"]
    with pytest.raises(IndexError):
        h.env(4)
    with pytest.raises(TypeError):
        h.command(0, "python -V")


@pytest.mark.parametrize(
    "kw",
    [
        dict(n=1),
        dict(n=7, subnet="10.0.0.0/29"),
        dict(prefix="GGC"),
        dict(prefix="toolongprefix"),
        dict(subnet="fd00::/64"),
        dict(master_port=0),
        dict(rate="fast"),
    ],
)
def test_bad_configuration_is_refused(kw):
    with pytest.raises(ValueError):
        th.TestHosts(**{"n": 2, **kw})


def _drop_admin_capabilities() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    for cap in (th._CAP_NET_ADMIN, th._CAP_SYS_ADMIN):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_without_privileges_says_so_and_exits_unavailable():
    """Root without CAP_NET_ADMIN/CAP_SYS_ADMIN (or any user) gets a clear refusal."""
    dropped = os.geteuid() == 0
    r = cli(
        "--prefix",
        OTHER,
        "measure",
        "--rate",
        RATE,
        preexec_fn=_drop_admin_capabilities if dropped else None,
    )
    assert r.returncode == th.EXIT_UNAVAILABLE, r.stderr
    assert "unavailable" in r.stderr and "CAP_NET_ADMIN" in r.stderr and "root" in r.stderr
    if not dropped:
        with pytest.raises(th.HostsUnavailable, match="root"):
            th.TestHosts(2, RATE, OTHER).up()


# --- on shaped hosts ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hosts():
    if REASON is not None:
        pytest.skip(f"test hosts unavailable: {REASON}")
    with hosts_or_skip(2, RATE, PREFIX) as h:
        yield h


@needs_hosts
def test_hosts_are_addressed_named_and_shaped_both_ways(hosts):
    for i in range(2):
        r = hosts.run(i, ["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True)
        links = {link["ifname"]: link for link in json.loads(r.stdout)}
        assert set(links) == {"lo", hosts.interfaces[i]}
        assert "UP" in links["lo"]["flags"]
        addrs = [a["local"] for a in links[hosts.interfaces[i]]["addr_info"]]
        assert addrs == [hosts.addresses[i]]  # one address: no IPv6 link-local for gloo to pick
    assert [row["rate_bps"] for row in hosts.status()] == [RATE_BPS, RATE_BPS]
    for port in hosts.switch_ports:
        r = subprocess.run(
            ["tc", "-n", hosts.switch, "-j", "qdisc", "show", "dev", port],
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(r.stdout)[0]["options"]["rate"] * 8 == RATE_BPS
    # peers resolve by name, and back from the IPv4-mapped form dual-stack servers see
    lookup = (
        f"import socket; a = socket.gethostbyname({hosts.namespaces[0]!r}); "
        "print(a, socket.getnameinfo(('::ffff:' + a, 0, 0, 0), socket.NI_NAMEREQD)[0])"
    )
    peer = hosts.run(1, [sys.executable, "-c", lookup], capture_output=True, text=True)
    assert peer.stdout.split() == [hosts.addresses[0], hosts.namespaces[0]], peer.stderr


@needs_hosts
def test_tcp_throughput_close_to_the_shaped_rate(hosts):
    t = hosts.measure(0, 1, seconds=2.0)
    # payload of 1500-byte frames is at most 95.6 % of the link rate; shaping caps it
    assert 0.85 * RATE_BPS < t.bits_per_s < RATE_BPS, t
    assert t.bytes > 0.85 * RATE_BPS / 8 * 2.0


@needs_hosts
def test_gloo_allreduce_across_hosts_sums_exactly_at_the_link_rate(hosts):
    mb = 6.25  # half a second per call on 2 ranks at 100 Mbit/s
    r = hosts.allreduce(mb=mb, iters=1, warmup=1)
    assert r.world_size == 2 and r.bytes == mb * 1e6
    assert r.max_error == 0.0
    # each rank sends 2 (W - 1) / W * bytes = 6.25 MB over its 100 Mbit/s link: 0.5 s
    assert r.seconds[0] > 0.98 * mb * 1e6 * 8 / RATE_BPS  # not faster than the links allow
    assert 0.7 * RATE_BPS < r.bus_bits_per_s < 1.02 * RATE_BPS, r


# --- life cycle -----------------------------------------------------------------------------


@needs_hosts
def test_everything_is_removed_on_exit_also_after_an_error():
    with pytest.raises(RuntimeError, match="inside"):
        with hosts_or_skip(2, "1gbit", OTHER) as h:
            assert len(leftovers(OTHER)) == 3  # two hosts and the switch
            child = h.popen(0, ["sleep", "600"])
            spawned = h.run(
                1,
                ["sh", "-c", "sleep 600 >/dev/null 2>&1 & echo $!"],
                capture_output=True,
                text=True,
                check=True,
            )
            orphan = int(spawned.stdout)
            assert alive(child.pid) and alive(orphan)
            raise RuntimeError("inside")
    assert leftovers(OTHER) == []
    assert child.returncode is not None and not alive(orphan)


@needs_hosts
def test_four_hosts_share_one_switch():
    with hosts_or_skip(4, None, OTHER) as h:
        assert h.status()[3]["rate_bps"] is None  # unshaped
        r = subprocess.run(
            ["ip", "-n", h.switch, "-j", "link", "show", "master", h.bridge],
            capture_output=True,
            text=True,
            check=True,
        )
        assert sorted(link["ifname"] for link in json.loads(r.stdout)) == h.switch_ports
        t = h.measure(3, 1, seconds=0.3)
        assert t.bytes > 0
    assert leftovers(OTHER) == []


@needs_hosts
def test_cleanup_removes_a_crashed_runs_leftovers_and_is_idempotent():
    sleeper = crashed_owner_leaves_hosts(OTHER)
    try:
        assert len(leftovers(OTHER)) == 3 and alive(sleeper)
        assert th.TestHosts.attach(OTHER).n == 2  # still described by the switch
        assert sorted(th.cleanup(OTHER)) == sorted([f"{OTHER}-h0", f"{OTHER}-h1", f"{OTHER}-sw"])
        assert leftovers(OTHER) == [] and not alive(sleeper)
        assert th.cleanup(OTHER) == []
    finally:
        th.cleanup(OTHER, force=True)


@needs_hosts
def test_new_hosts_replace_a_crashed_runs_leftovers():
    crashed_owner_leaves_hosts(OTHER)
    try:
        with hosts_or_skip(2, "10gbit", OTHER) as h:
            assert h.status()[0]["rate_bps"] == 10**10
        assert leftovers(OTHER) == []
    finally:
        th.cleanup(OTHER, force=True)


@needs_hosts
def test_hosts_of_a_running_owner_are_not_taken():
    with hosts_or_skip(2, None, OTHER):
        with pytest.raises(th.HostsBusy, match="running process"):
            th.cleanup(OTHER)
        with pytest.raises(th.HostsBusy, match="running process"):
            th.TestHosts(2, None, OTHER).up()
        assert len(leftovers(OTHER)) == 3
    assert leftovers(OTHER) == []


@needs_hosts
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_removed_when_interrupted_or_terminated(sig):
    # A suite started in the background (`cmd &`) runs with SIGINT ignored, which the child
    # would inherit: give it Python's own handler back, as an interactive run would have.
    code = (
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        + IMPORT_IN_CHILD + f"with th.TestHosts(2, {RATE!r}, {OTHER!r}):\n"
        "    print('up', flush=True)\n"
        "    time.sleep(60)\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = p.stdout.readline()
        if line != "up\n":
            p.wait(10)
            if "HostsBusy" in p.stderr.read():
                pytest.skip("another run holds the test prefix")
        assert line == "up\n"
        assert len(leftovers(OTHER)) == 3
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
        # Python ends on Ctrl-C by killing itself with SIGINT; SIGTERM becomes SystemExit(143)
        assert p.returncode == (-sig if sig == signal.SIGINT else 128 + sig), err
        assert ("KeyboardInterrupt" in err) == (sig == signal.SIGINT)
        assert leftovers(OTHER) == []
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        th.cleanup(OTHER, force=True)


@needs_hosts
def test_command_line_up_status_exec_down():
    try:
        r = cli("--prefix", OTHER, "up", "--hosts", "2", "--rate", RATE)
        if r.returncode == th.EXIT_ERROR and ("belong to" in r.stderr or "brought up" in r.stderr):
            pytest.skip(f"another run holds the test prefix: {r.stderr.strip()}")
        assert r.returncode == 0, r.stderr
        assert "10.213.0.2" in r.stdout and "100 Mbit/s" in r.stdout
        r = cli("--prefix", OTHER, "status")
        assert r.returncode == 0 and f"{OTHER}-h1" in r.stdout
        r = cli("--prefix", OTHER, "exec", "1", "--", "ip", "-br", "addr")
        assert r.returncode == 0 and "10.213.0.2/24" in r.stdout, r.stderr
        r = cli("--prefix", OTHER, "exec", f"{OTHER}-h0", "--", "printenv", "GLOO_SOCKET_IFNAME")
        assert r.stdout.strip() == f"{OTHER}-h0"
        assert cli("--prefix", OTHER, "exec", "0", "--", "sh", "-c", "exit 7").returncode == 7
        r = cli("--prefix", OTHER, "up")  # already up: refused, not replaced
        assert r.returncode == th.EXIT_ERROR and "down" in r.stderr
        r = cli("--prefix", OTHER, "down")
        assert r.returncode == 0 and f"{OTHER}-sw" in r.stdout
        assert leftovers(OTHER) == []
        r = cli("--prefix", OTHER, "down")
        assert r.returncode == 0 and "nothing to remove" in r.stdout
        r = cli("--prefix", OTHER, "status")
        assert r.returncode == th.EXIT_ERROR and "no test hosts" in r.stderr
    finally:
        th.cleanup(OTHER, force=True)


@needs_hosts
def test_a_subnet_the_machine_routes_is_refused():
    routes = json.loads(
        subprocess.run(
            ["ip", "-j", "-4", "route", "show"], capture_output=True, text=True, check=True
        ).stdout
    )
    nets = [r["dst"] for r in routes if r.get("dst", "default") != "default"]
    if not nets:
        pytest.skip("this machine has no non-default IPv4 route to collide with")
    net = ipaddress.ip_network(nets[0], strict=False)
    subnet = net if net.prefixlen <= 29 else net.supernet(new_prefix=29)
    with pytest.raises(th.SubnetInUse, match=str(nets[0])):
        th.TestHosts(2, RATE, OTHER, subnet=str(subnet)).up()
    assert leftovers(OTHER) == []


def test_runs_on_the_standard_library_alone():
    r = subprocess.run(
        [sys.executable, "-I", "-S", str(SCRIPT), "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert all(c in r.stdout for c in ("up", "down", "status", "measure", "exec"))
