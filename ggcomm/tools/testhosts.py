"""Test hosts on one machine: network namespaces on a switch, every link shaped to a rate.

Distributed benchmarks need real TCP links of a known speed between ranks. This module builds
them on one Linux machine: ``n`` network namespaces (the hosts), each with one veth link to a
bridge that lives in a namespace of its own (the switch), and a ``tbf`` token bucket on both
ends of every link, so a host sends at most ``rate`` and receives at most ``rate``, like a
full-duplex NIC. Everything is in namespaces this module creates: the machine's own network,
routes and addresses are never touched, and removing the namespaces removes every link.

::

    with TestHosts(2, rate="100mbit") as hosts:
        procs = [hosts.popen(i, ["python", "train.py"]) for i in range(hosts.n)]
        # each process sees MASTER_ADDR, MASTER_PORT, GLOO_SOCKET_IFNAME, RANK, WORLD_SIZE

or from a shell (``python launch/testhosts.py`` in a checkout is the same command)::

    python -m ggcomm.tools.testhosts up --hosts 2 --rate 100mbit
    python -m ggcomm.tools.testhosts exec 1 -- ip -br addr    # a command in host 1
    python -m ggcomm.tools.testhosts measure                  # TCP host 0 -> host 1, in Gbit/s
    python -m ggcomm.tools.testhosts down

What it costs: root (CAP_NET_ADMIN and CAP_SYS_ADMIN), a kernel with network namespaces, veth,
bridge and tbf, and iproute2's ``ip`` and ``tc``; nothing from Python beyond the standard
library (``allreduce`` needs torch, in the processes it starts only). Every byte crosses the
kernel twice on the same CPUs, so at high rates the machine's cores, not the shaping, set the
speed (see :meth:`TestHosts.measure` and ``launch/README-testhosts.md``). There is no latency
emulation: the links add only queueing delay.

Without the privileges or kernel features, :func:`unavailable_reason` says what is missing,
:class:`TestHosts` raises :class:`HostsUnavailable`, and the command exits with status
:data:`EXIT_UNAVAILABLE`, so a caller can fall back to ranks on localhost.

Names: hosts are namespaces ``<prefix>-h<i>`` with interface ``<prefix>-h<i>`` and address
``subnet[i + 1]``; the switch is namespace ``<prefix>-sw`` with bridge ``<prefix>-br`` and ports
``<prefix>-p<i>``. The bridge's alias holds the configuration and the owner's process id, so
the state lives and dies with the namespaces: hosts whose owner has exited are leftovers and
are removed by the next :class:`TestHosts` with the same prefix, or by :func:`cleanup`.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_PREFIX = "ggc"
DEFAULT_LINK_RATE = "1gbit"
# A private /24 that is rarely used; the hosts are isolated from the machine's network, and the
# subnet is still checked against the machine's routes so that no address means two things.
DEFAULT_SUBNET = "10.213.0.0/24"
# torch.distributed's rendezvous port on host 0 (torchrun's default as well).
DEFAULT_MASTER_PORT = 29500
# Port of the TCP throughput receiver of `measure`; any free port in the hosts will do.
DEFAULT_MEASURE_PORT = 5201

# tbf bucket size as time at the rate. The bucket fills while the qdisc's timer sleeps, so a
# bigger one keeps the rate when the timer wakes late (busy CPUs, high rates); but after an idle
# moment this much data leaves at memory speed, which flatters messages not much longer than the
# bucket. 1 ms keeps 1 Gbit/s within 2 % of the best TCP can do even on two busy cores, and at
# 1 Gbit/s and up it holds a whole 64 KiB GSO packet, which tbf would otherwise split in
# software (cheap at 100 Mbit/s, where the bucket is smaller).
BURST_S = 0.001
# Smallest bucket, in bytes: a few full 1514-byte frames; a frame larger than the bucket would
# be dropped, so very low rates need this floor.
MIN_BURST_BYTES = 16_384
# tbf queue length as time at the rate. Longer queues absorb more incast (several hosts sending
# to one) before dropping, at the price of queueing delay; TCP Small Queues keep a single flow's
# queue far shorter than this anyway.
QUEUE_S = 0.02
# Smallest queue, in bytes, so that low rates still hold a few full-size packets.
MIN_QUEUE_BYTES = 262_144
# How long processes left in a host get after SIGTERM before SIGKILL, when hosts are removed.
KILL_GRACE_S = 2.0
# How long `measure` waits for its receiver to listen (a Python start on a busy machine).
RECEIVER_START_TIMEOUT_S = 30.0

# Command exit statuses: callers fall back to localhost on EXIT_UNAVAILABLE.
EXIT_ERROR = 1
EXIT_UNAVAILABLE = 3

_PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,7}")
_RATE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit|tbit)?", re.IGNORECASE)
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_STATE_VERSION = 1
_CAP_NET_ADMIN = 12
_CAP_SYS_ADMIN = 21
_THIS_FILE = os.path.abspath(__file__)
# `ip netns exec NS` bind-mounts the files of /etc/netns/NS over those in /etc: each host gets
# an /etc/hosts that names every host, so peers resolve (c10d logs peer names).
_NETNS_ETC = "/etc/netns"


class HostsError(RuntimeError):
    """Test hosts could not be built, used or removed; the message says which step failed."""


class HostsUnavailable(HostsError):
    """This machine cannot build test hosts (no root, no netns, veth, bridge or tbf, no ip/tc).

    Callers catch this one to fall back to ranks on localhost.
    """


class HostsBusy(HostsError):
    """Hosts with this prefix exist and belong to a running process or to a ``up`` command."""


class HostsNotFound(HostsError):
    """No test hosts with this prefix are up."""


class SubnetInUse(ValueError):
    """The chosen subnet overlaps a route of this machine; pass another ``subnet``."""


def parse_rate(rate: str | int | float | None) -> int | None:
    """Bits per second from a tc-style rate (``"10gbit"``, ``"100mbit"``, ``"2.5gbit"``, or a
    number of bit/s); ``None`` or ``"none"`` means an unshaped link.

    Units are decimal, as in tc (``kbit`` = 1000 bit/s). tc's ``bps`` (bytes per second) is not
    accepted, to keep bits and bytes apart.
    """
    if rate is None or (isinstance(rate, str) and rate.strip().lower() == "none"):
        return None
    if isinstance(rate, bool) or not isinstance(rate, (str, int, float)):
        raise TypeError(
            f"rate must be a string like '1gbit', a number of bit/s or None, "
            f"not {type(rate).__name__}"
        )
    if isinstance(rate, str):
        m = _RATE_RE.fullmatch(rate.strip())
        if not m:
            raise ValueError(
                f"rate {rate!r} is not a number with unit bit, kbit, mbit, gbit or "
                "tbit (e.g. '100mbit')"
            )
        bits = float(m.group(1)) * _RATE_UNITS[(m.group(2) or "bit").lower()]
    else:
        bits = float(rate)
    if not bits >= 8000:
        raise ValueError(f"rate {rate!r} is below 8 kbit/s; tbf cannot shape that slowly")
    return int(bits)


def format_rate(bits_per_s: float) -> str:
    """``bits_per_s`` in the largest unit that keeps it at least 1 (``1.25 Gbit/s``)."""
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits_per_s >= scale:
            return f"{bits_per_s / scale:.3g} {unit}"
    return f"{bits_per_s:.3g} bit/s"


def tbf_params(rate_bps: int, burst_s: float = BURST_S, queue_s: float = QUEUE_S) -> dict:
    """The ``tbf`` bucket (``burst``) and queue (``limit``) in bytes for a rate in bit/s."""
    byte_rate = rate_bps / 8
    burst = max(MIN_BURST_BYTES, int(byte_rate * burst_s))
    limit = max(MIN_QUEUE_BYTES, burst + int(byte_rate * queue_s))
    return {"rate": rate_bps, "burst": burst, "limit": limit}


# ---------------------------------------------------------------------------------------------
# iproute2 plumbing


def _cmd(argv: Sequence[str], what: str, error: type[HostsError] = HostsError) -> str:
    r = subprocess.run(list(argv), capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip() or f"exit status {r.returncode}"
        raise error(f"{what} failed: `{' '.join(argv)}`: {msg}")
    return r.stdout


def _ip(*args: str, ns: str | None = None, what: str = "ip") -> str:
    return _cmd(["ip", *(["-n", ns] if ns else []), *args], what)


def _netns_names() -> list[str]:
    out = _cmd(["ip", "netns", "list"], "listing network namespaces")
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _prefix_pattern(prefix: str) -> re.Pattern:
    return re.compile(rf"{re.escape(prefix)}-(sw|h\d+|probe\d+)")


def list_namespaces(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Names of the network namespaces of hosts with ``prefix`` (up or left over), and of host
    files in /etc/netns that a removal has not finished with. Availability probes of running
    processes are not listed."""
    pattern = _prefix_pattern(_check_prefix(prefix))
    names = set(_netns_names())
    with contextlib.suppress(OSError):
        names.update(os.listdir(_NETNS_ETC))
    found = []
    for name in names:
        m = pattern.fullmatch(name)
        if m and not (m.group(1).startswith("probe") and _start_time(int(m.group(1)[5:]))):
            found.append(name)
    return sorted(found)


def _check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(
            f"prefix {prefix!r} must be 1-8 lowercase letters or digits starting with "
            "a letter (it becomes part of interface names, at most 15 characters)"
        )
    return prefix


def _capabilities() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


_AVAILABLE: set[str] = set()


def unavailable_reason(prefix: str = DEFAULT_PREFIX) -> str | None:
    """Why test hosts cannot be built here, or ``None`` when they can.

    Checks privileges and tools, then builds and removes a probe namespace with a veth pair, a
    bridge and a tbf qdisc (a few tens of ms; a success is remembered for the process).
    """
    _check_prefix(prefix)
    if prefix in _AVAILABLE:
        return None
    if not sys.platform.startswith("linux"):
        return f"test hosts need Linux network namespaces; this is {sys.platform}"
    caps = _capabilities()
    missing = [
        name
        for bit, name in ((_CAP_NET_ADMIN, "CAP_NET_ADMIN"), (_CAP_SYS_ADMIN, "CAP_SYS_ADMIN"))
        if not caps >> bit & 1
    ]
    if missing:
        return (
            f"test hosts need root ({' and '.join(missing)} missing; uid {os.geteuid()}): "
            "run as root, or fall back to localhost"
        )
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"iproute2's `{tool}` is not on PATH (install iproute2)"
    probe = f"{prefix}-probe{os.getpid()}"
    steps = [
        (["ip", "netns", "add", probe], "cannot create a network namespace"),
        (
            f"ip -n {probe} link add gp0 type veth peer name gp1".split(),
            "cannot create a veth pair (kernel without CONFIG_VETH?)",
        ),
        (
            f"ip -n {probe} link add gpbr type bridge".split(),
            "cannot create a bridge (kernel without CONFIG_BRIDGE?)",
        ),
        (
            f"tc -n {probe} qdisc add dev gp0 root tbf rate 1gbit burst 16kb limit 256kb".split(),
            "cannot add a tbf qdisc (kernel without CONFIG_NET_SCH_TBF?)",
        ),
    ]
    try:
        for argv, problem in steps:
            r = subprocess.run(argv, capture_output=True, text=True)
            if r.returncode != 0:
                return f"{problem}: `{' '.join(argv)}`: {r.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    _AVAILABLE.add(prefix)
    return None


def check_available(prefix: str = DEFAULT_PREFIX) -> None:
    """Raise :class:`HostsUnavailable` with the reason when test hosts cannot be built here."""
    reason = unavailable_reason(prefix)
    if reason is not None:
        raise HostsUnavailable(reason)


def _check_subnet(subnet: ipaddress.IPv4Network) -> None:
    """Refuse a subnet that overlaps a (non-default) route of this machine's own namespace."""
    routes = json.loads(
        _cmd(["ip", "-j", "-4", "route", "show", "table", "all"], "listing routes") or "[]"
    )
    for route in routes:
        dst = route.get("dst", "")
        if dst in ("", "default"):
            continue
        try:
            net = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if net.version == 4 and net.prefixlen > 0 and net.overlaps(subnet):
            raise SubnetInUse(
                f"subnet {subnet} overlaps this machine's route to {dst} (dev "
                f"{route.get('dev', '?')}); pass another subnet, e.g. 10.214.0.0/24"
            )


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def _owner_alive(state: Mapping[str, Any] | None) -> bool:
    if not state or not state.get("owner"):
        return False
    return _start_time(int(state["owner"])) == state.get("start")


def _read_state(prefix: str) -> dict | None:
    """The configuration stored in the switch's bridge alias, or None when unreadable."""
    r = subprocess.run(
        ["ip", "-n", f"{prefix}-sw", "-j", "link", "show", f"{prefix}-br"],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        return None
    try:
        state = json.loads(json.loads(r.stdout)[0].get("ifalias", ""))
    except (ValueError, IndexError, AttributeError):
        return None
    return state if isinstance(state, dict) and state.get("v") == _STATE_VERSION else None


def _netns_pids(ns: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split() if p.isdigit() and int(p) != os.getpid()]


def _stop_pids(pids: Sequence[int], grace_s: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 1.0)
        while time.monotonic() < deadline:
            pids = [pid for pid in pids if _start_time(pid) is not None]
            if not pids:
                return
            time.sleep(0.05)


def _remove_namespaces(names: Sequence[str], grace_s: float = KILL_GRACE_S) -> list[str]:
    """Stop the processes inside ``names``, then delete the namespaces (their links go too)
    and their files in /etc/netns. Returns the names of which something was removed."""
    existing = set(_netns_names())
    _stop_pids([pid for ns in names if ns in existing for pid in _netns_pids(ns)], grace_s)
    removed, errors = set(), []
    for ns in names:
        etc = os.path.join(_NETNS_ETC, ns)
        if os.path.isdir(etc):
            shutil.rmtree(etc, onerror=lambda _f, path, e: errors.append(f"{path}: {e[1]}"))
            removed.add(ns)
        if ns in existing:
            r = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
            if r.returncode == 0:
                removed.add(ns)
            elif ns in _netns_names():
                errors.append(f"{ns}: {r.stderr.strip()}")
    with contextlib.suppress(OSError):
        os.rmdir(_NETNS_ETC)  # only when empty: others' files stay
    if errors:
        raise HostsError("could not remove test hosts: " + "; ".join(errors))
    return sorted(removed)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done, then act on them: removal finishes even
    when Ctrl-C or a kill arrives half-way. Only the main thread can set handlers; elsewhere
    the block runs unprotected."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old = {
        s: signal.signal(s, lambda signum, _frame: pending.append(signum))
        for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if pending:
            signum = pending[0]
            handler = old[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                raise SystemExit(128 + signum)


def cleanup(
    prefix: str = DEFAULT_PREFIX, *, force: bool = False, grace_s: float = KILL_GRACE_S
) -> list[str]:
    """Remove every namespace (and so every link) of hosts with ``prefix``; idempotent.

    Processes still running in the hosts get SIGTERM, then SIGKILL after ``grace_s``. Hosts
    whose owning process is still running raise :class:`HostsBusy` unless ``force``. Returns
    the namespaces removed (empty when there was nothing to do).
    """
    names = list_namespaces(prefix)
    if not names:
        return []
    state = _read_state(prefix)
    if not force and _owner_alive(state):
        raise HostsBusy(
            f"test hosts {prefix!r} belong to running process {state['owner']}; "
            "stop it, or force the removal (`down --force`)"
        )
    with _signals_deferred():
        return _remove_namespaces(names, grace_s)


# ---------------------------------------------------------------------------------------------
# The hosts


@dataclass(frozen=True)
class Throughput:
    """What one TCP stream carried: payload bytes, receive time, and their rate in bit/s."""

    bytes: int
    seconds: float
    bits_per_s: float

    @property
    def gbit_per_s(self) -> float:
        return self.bits_per_s / 1e9


@dataclass(frozen=True)
class AllreduceResult:
    """A gloo ``all_reduce`` across the hosts, one rank per host, timed on rank 0.

    ``bus_bits_per_s`` is the NCCL-tests bus bandwidth, ``2 (W - 1) / W * bytes * 8 / time``:
    what each rank's link carried per second for a bandwidth-optimal (ring) allreduce, directly
    comparable with the link rate. ``max_error`` is the largest deviation from the exact sum.
    """

    world_size: int
    bytes: int
    seconds: list[float]
    bus_bits_per_s: float
    max_error: float


class TestHosts:
    """``n`` network namespaces joined by a bridge, each link shaped to ``rate`` both ways.

    A context manager: entering builds the hosts (about 10 ms per host), leaving stops every
    process still running in them and removes all namespaces and links, also on an exception,
    Ctrl-C or SIGTERM (as ``SystemExit``) while inside. Leftovers of an earlier run that died
    with the same ``prefix`` are removed on entry; hosts of a live process raise
    :class:`HostsBusy`. Raises :class:`HostsUnavailable` when the machine cannot build them.

    Arguments:

    * ``n``: number of hosts (at least 2; at most what ``subnet`` holds).
    * ``rate``: link rate, tc style (``"10gbit"``, ``"1gbit"``, ``"100mbit"``), or ``None`` for
      unshaped links (what the CPU alone allows).
    * ``prefix``: names of namespaces and interfaces; concurrent users need distinct prefixes.
    * ``subnet``: IPv4 subnet of the hosts (host ``i`` gets ``subnet[i + 1]``).
    * ``master_port``: ``MASTER_PORT`` in :meth:`env`.
    * ``burst_s``, ``queue_s``: tbf bucket and queue as time at the rate (:data:`BURST_S`,
      :data:`QUEUE_S` explain the trade-offs).

    Attributes: ``n``, ``rate``, ``rate_bps``, ``prefix``, ``subnet``, ``namespaces`` (one per
    host), ``interfaces`` (each host's link), ``addresses``, ``switch`` (its namespace),
    ``bridge``, ``switch_ports``, ``master_port``, ``tbf`` (the qdisc parameters in bytes).
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        n: int = 2,
        rate: str | int | None = DEFAULT_LINK_RATE,
        prefix: str = DEFAULT_PREFIX,
        *,
        subnet: str = DEFAULT_SUBNET,
        master_port: int = DEFAULT_MASTER_PORT,
        burst_s: float = BURST_S,
        queue_s: float = QUEUE_S,
    ) -> None:
        self.prefix = _check_prefix(prefix)
        self.subnet = ipaddress.ip_network(subnet)
        if not isinstance(self.subnet, ipaddress.IPv4Network):
            raise ValueError(f"subnet {subnet!r} must be IPv4")
        capacity = self.subnet.num_addresses - 2
        if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= min(capacity, 999):
            raise ValueError(
                f"n must be an int from 2 to {min(capacity, 999)} (subnet {subnet} "
                f"holds {capacity} hosts), not {n!r}"
            )
        if not (isinstance(master_port, int) and 0 < master_port < 65536):
            raise ValueError(f"master_port must be a TCP port number, not {master_port!r}")
        if not (burst_s > 0 and queue_s >= 0):
            raise ValueError(f"burst_s must be > 0 and queue_s >= 0, not {burst_s}, {queue_s}")
        self.n = n
        self.rate_bps = parse_rate(rate)
        self.rate = "none" if self.rate_bps is None else str(rate)
        self.master_port = master_port
        self.tbf = None if self.rate_bps is None else tbf_params(self.rate_bps, burst_s, queue_s)
        self.switch = f"{prefix}-sw"
        self.bridge = f"{prefix}-br"
        self.namespaces = [f"{prefix}-h{i}" for i in range(n)]
        self.interfaces = list(self.namespaces)
        self.switch_ports = [f"{prefix}-p{i}" for i in range(n)]
        self.addresses = [str(self.subnet[i + 1]) for i in range(n)]
        self._owned = False
        self._procs: list[subprocess.Popen] = []
        self._old_sigterm: Any = None

    def __repr__(self) -> str:
        return f"TestHosts(n={self.n}, rate={self.rate!r}, prefix={self.prefix!r})"

    # -- life cycle ---------------------------------------------------------------------------

    def __enter__(self) -> TestHosts:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self, *, persistent: bool = False, replace: bool = False) -> TestHosts:
        """Build the hosts. ``persistent`` hosts outlive this process (the ``up`` command) and
        are removed only by :meth:`down` or :func:`cleanup`; ``replace`` removes such hosts
        with the same prefix first instead of raising :class:`HostsBusy`."""
        check_available(self.prefix)
        _check_subnet(self.subnet)
        if list_namespaces(self.prefix):
            state = _read_state(self.prefix)
            if _owner_alive(state):
                raise HostsBusy(
                    f"test hosts {self.prefix!r} belong to running process "
                    f"{state['owner']}; use another prefix"
                )
            if state and state.get("persistent") and not replace:
                raise HostsBusy(
                    f"test hosts {self.prefix!r} were brought up by `testhosts.py up`"
                    f" ({state.get('n')} hosts at {state.get('rate')}); take them "
                    "down first (`testhosts.py down`), or use another prefix"
                )
            cleanup(self.prefix, force=True)
        created: list[str] = []
        try:
            self._build(created, persistent)
        except BaseException:
            with _signals_deferred():
                _remove_namespaces(created)
            raise
        self._owned = not persistent
        if (
            self._owned
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        ):
            self._old_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return self

    def _build(self, created: list[str], persistent: bool) -> None:
        sw = self.switch
        # `ip netns add` fails when the name exists: two builders with one prefix cannot both
        # get past this line, and the loser removes only what it created (nothing).
        try:
            _ip("netns", "add", sw, what="creating the switch namespace")
        except HostsError as e:
            raise HostsBusy(
                f"test hosts {self.prefix!r} are being built by another process: {e}"
            ) from e
        created.append(sw)
        state = {
            "v": _STATE_VERSION,
            "owner": 0 if persistent else os.getpid(),
            "start": None if persistent else _start_time(os.getpid()),
            "persistent": persistent,
            "n": self.n,
            "rate": self.rate,
            "subnet": str(self.subnet),
            "port": self.master_port,
        }
        _ip("link", "set", "lo", "up", ns=sw)
        bridge = f"link add {self.bridge} type bridge stp_state 0 forward_delay 0"
        _ip(*bridge.split(), ns=sw, what="creating the bridge")
        _ip("link", "set", self.bridge, "alias", json.dumps(state, separators=(",", ":")), ns=sw)
        _ip("link", "set", self.bridge, "up", ns=sw)
        for i in range(self.n):
            ns, dev, port = self.namespaces[i], self.interfaces[i], self.switch_ports[i]
            _ip("netns", "add", ns, what=f"creating host {i}")
            created.append(ns)
            self._write_hosts_file(i)
            veth = f"link add {dev} netns {ns} type veth peer name {port} netns {sw}"
            _ip(*veth.split(), what=f"linking host {i} to the switch")
            # no IPv6 link-local address: gloo must find exactly one address on the interface
            _ip("link", "set", dev, "addrgenmode", "none", ns=ns)
            _ip("addr", "add", f"{self.addresses[i]}/{self.subnet.prefixlen}", "dev", dev, ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)
            _ip("link", "set", dev, "up", ns=ns)
            _ip("link", "set", port, "master", self.bridge, ns=sw)
            _ip("link", "set", port, "up", ns=sw)
            if self.tbf is not None:
                # host egress = the host's uplink; switch-port egress = its downlink
                rate, burst, limit = self.tbf["rate"], self.tbf["burst"], self.tbf["limit"]
                for where, link in ((ns, dev), (sw, port)):
                    tbf = f"tc -n {where} qdisc replace dev {link} root tbf rate {rate}bit"
                    _cmd(
                        [*tbf.split(), "burst", str(burst), "limit", str(limit)],
                        f"shaping {link} in {where}",
                    )

    def _write_hosts_file(self, i: int) -> None:
        """/etc/hosts of host ``i``: every host by name, and this machine's hostname as host
        ``i`` itself (so code that resolves its own hostname finds its shaped link). The
        IPv4-mapped IPv6 forms name the peers that dual-stack servers (c10d's store) see."""
        named = list(zip(self.addresses, self.namespaces, strict=True))
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        lines += [
            f"{addr}\t{name}" + (f" {socket.gethostname()}" if j == i else "")
            for j, (addr, name) in enumerate(named)
        ]
        lines += [f"::ffff:{addr}\t{name}" for addr, name in named]
        etc = os.path.join(_NETNS_ETC, self.namespaces[i])
        os.makedirs(etc, exist_ok=True)
        with open(os.path.join(etc, "hosts"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def down(self) -> list[str]:
        """Stop what runs in the hosts and remove them (only hosts this object built, or
        persistent ones through :func:`cleanup`). Returns the namespaces removed."""
        with _signals_deferred():
            for p in self._procs:
                if p.poll() is None:
                    p.terminate()
            deadline = time.monotonic() + KILL_GRACE_S
            for p in self._procs:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            self._procs.clear()
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)
                self._old_sigterm = None
            if not self._owned:
                return []
            self._owned = False
            return _remove_namespaces([*self.namespaces, self.switch])

    @classmethod
    def attach(cls, prefix: str = DEFAULT_PREFIX) -> TestHosts:
        """The hosts with ``prefix`` that are already up (from ``up`` or another process), to
        run commands in; leaving its context leaves them up. Raises :class:`HostsNotFound`."""
        state = _read_state(_check_prefix(prefix))
        if state is None:
            found = list_namespaces(prefix)
            raise HostsNotFound(
                f"no test hosts {prefix!r} are up"
                + (
                    f" (leftovers {', '.join(found)}: `testhosts.py down` removes them)"
                    if found
                    else "; `testhosts.py up` builds them"
                )
            )
        return cls(
            state["n"], state["rate"], prefix, subnet=state["subnet"], master_port=state["port"]
        )

    # -- running things in the hosts ----------------------------------------------------------

    def _host(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.n:
            raise IndexError(f"host {i!r} does not exist; hosts are 0..{self.n - 1}")
        return i

    def env(self, i: int) -> dict[str, str]:
        """What torch.distributed needs in host ``i`` for one rank per host.

        ``MASTER_ADDR``/``MASTER_PORT`` point at host 0; ``GLOO_SOCKET_IFNAME`` (and
        ``TP_SOCKET_IFNAME`` for RPC) pin the host's shaped link, since the machine's hostname
        resolves to an address the host cannot reach; ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
        and ``LOCAL_WORLD_SIZE`` describe one rank per host (torchrun sets its own for its
        workers). ``GGCOMM_TESTHOST`` and ``GGCOMM_LINK_RATE`` tell benchmarks where they run.
        """
        i = self._host(i)
        return {
            "MASTER_ADDR": self.addresses[0],
            "MASTER_PORT": str(self.master_port),
            "GLOO_SOCKET_IFNAME": self.interfaces[i],
            "TP_SOCKET_IFNAME": self.interfaces[i],
            "RANK": str(i),
            "WORLD_SIZE": str(self.n),
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
            "GGCOMM_TESTHOST": self.namespaces[i],
            "GGCOMM_LINK_RATE": self.rate,
        }

    def command(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside host ``i`` (``ip netns exec``, which then execs it)."""
        if isinstance(argv, (str, bytes)) or not argv:
            raise TypeError("argv must be a non-empty sequence of arguments, not a string")
        return ["ip", "netns", "exec", self.namespaces[self._host(i)], *map(str, argv)]

    def _full_env(self, i: int, env: Mapping[str, str] | None) -> dict[str, str]:
        return {**os.environ, **self.env(i), **(env or {})}

    def popen(
        self, i: int, argv: Sequence[str], env: Mapping[str, str] | None = None, **kw: Any
    ) -> subprocess.Popen:
        """Start ``argv`` in host ``i`` with this process's environment, :meth:`env` and
        ``env`` on top; other keywords go to :class:`subprocess.Popen`. Processes still running
        when the hosts are removed get SIGTERM, then SIGKILL."""
        p = subprocess.Popen(self.command(i, argv), env=self._full_env(i, env), **kw)
        self._procs.append(p)
        return p

    def run(
        self, i: int, argv: Sequence[str], env: Mapping[str, str] | None = None, **kw: Any
    ) -> subprocess.CompletedProcess:
        """:func:`subprocess.run` of ``argv`` in host ``i``, environment as in :meth:`popen`."""
        return subprocess.run(self.command(i, argv), env=self._full_env(i, env), **kw)

    # -- measurements -------------------------------------------------------------------------

    def measure(
        self, src: int = 0, dst: int = 1, seconds: float = 3.0, port: int = DEFAULT_MEASURE_PORT
    ) -> Throughput:
        """TCP goodput of one stream from host ``src`` to host ``dst`` for ``seconds``.

        A stdlib receiver in ``dst`` counts payload bytes from the first byte to the sender's
        close, so bytes still queued when the sender stops are counted with the time they take.
        Payload excludes TCP/IP/Ethernet headers, so with 1500-byte frames the best possible is
        1448/1514 = 95.6 % of the shaped rate (94.1 % on a real NIC, which also sends preamble
        and gaps). Costs ``seconds`` plus two Python starts.
        """
        self._host(src)
        self._host(dst)
        if src == dst:
            raise ValueError("src and dst must be different hosts")
        receive = f"_receive --bind {self.addresses[dst]} --port {port}".split()
        send = f"_send --to {self.addresses[dst]} --port {port} --seconds {seconds}".split()
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        receiver = self.popen(dst, [sys.executable, _THIS_FILE, *receive], **pipes)
        try:
            ready, _, _ = select.select([receiver.stdout], [], [], RECEIVER_START_TIMEOUT_S)
            line = receiver.stdout.readline() if ready else ""
            if line.strip() != "listening":
                receiver.kill()
                raise HostsError(
                    f"throughput receiver in host {dst} did not start: "
                    f"{line.strip()} {receiver.communicate()[1].strip()}"
                )
            sender = self.run(
                src, [sys.executable, _THIS_FILE, *send], **pipes, timeout=seconds + 60
            )
            if sender.returncode != 0:
                raise HostsError(f"throughput sender in host {src} failed: {sender.stderr}")
            out, err = receiver.communicate(timeout=60)
            if receiver.returncode != 0:
                raise HostsError(f"throughput receiver in host {dst} failed: {err}")
        finally:
            if receiver.poll() is None:
                receiver.kill()
                receiver.wait()
        r = json.loads(out)
        return Throughput(r["bytes"], r["seconds"], 8 * r["bytes"] / r["seconds"])

    def allreduce(
        self, mb: float = 25.0, iters: int = 3, warmup: int = 1, timeout: float = 300.0
    ) -> AllreduceResult:
        """Time a gloo ``all_reduce`` of ``mb`` megabytes of float32 with one rank per host.

        Each rank is a plain process started with :meth:`env` (``init_method="env://"``),
        contributes ``rank + 1`` everywhere and checks the exact sum; rank 0 times ``iters``
        calls after ``warmup`` untimed ones, each after a barrier. Needs torch in the ranks.
        Costs one torch import per host plus ``(warmup + iters) * 2 (W - 1) / W * mb * 8 / rate``.
        """
        if not (mb > 0 and iters >= 1 and warmup >= 0):
            raise ValueError(f"need mb > 0, iters >= 1, warmup >= 0, not {mb}, {iters}, {warmup}")
        rank = f"_allreduce --mb {mb} --iters {iters} --warmup {warmup} --timeout {timeout}"
        argv = [sys.executable, _THIS_FILE, *rank.split()]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        procs = [self.popen(i, argv, **pipes) for i in range(self.n)]
        deadline = time.monotonic() + timeout
        try:
            # a rank that fails leaves the others waiting for it: report it at once
            while any(p.poll() is None for p in procs):
                if any(p.poll() for p in procs) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            for p in procs:
                if p.poll() is None:
                    p.kill()
            outs = [p.communicate() for p in procs]
            results = [(p.returncode, out, err) for p, (out, err) in zip(procs, outs, strict=True)]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        bad = [(i, rc, err.strip()) for i, (rc, _, err) in enumerate(results) if rc]
        crashed = [b for b in bad if b[1] > 0]  # the ranks killed here only waited for these
        if bad:
            what = "failed" if crashed else f"did not finish in {timeout} s"
            ranks = "; ".join(f"rank {i} (exit {rc}):\n{err}" for i, rc, err in crashed or bad)
            raise HostsError(f"allreduce {what}: {ranks}")
        outputs = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]
        r0 = outputs[0]
        mean_s = sum(r0["seconds"]) / len(r0["seconds"])
        bus = 2 * (self.n - 1) / self.n * r0["bytes"] * 8 / mean_s
        return AllreduceResult(
            self.n, r0["bytes"], r0["seconds"], bus, max(r["max_error"] for r in outputs)
        )

    def status(self) -> list[dict]:
        """Per host: namespace, interface, address, the uplink's shaped rate in bit/s (``None``
        if unshaped) and its qdisc's counters from ``tc -s``: bytes sent and packets dropped."""
        rows = []
        for i in range(self.n):
            row = dict(
                host=i,
                namespace=self.namespaces[i],
                interface=self.interfaces[i],
                address=self.addresses[i],
                rate_bps=None,
                sent_bytes=None,
                drops=None,
            )
            show = f"tc -n {self.namespaces[i]} -s -j qdisc show dev {self.interfaces[i]}"
            r = subprocess.run(show.split(), capture_output=True, text=True)
            for q in json.loads(r.stdout or "[]") if r.returncode == 0 else []:
                if q.get("root"):
                    row.update(sent_bytes=q.get("bytes"), drops=q.get("drops"))
                    if q.get("kind") == "tbf":
                        row["rate_bps"] = 8 * q["options"]["rate"]
            rows.append(row)
        return rows


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


# ---------------------------------------------------------------------------------------------
# Processes that run inside the hosts (started by measure/allreduce through this file)

_SEND_CHUNK = 1 << 20


def _receive(bind: str, port: int) -> dict:
    with socket.create_server((bind, port), reuse_port=False) as server:
        print("listening", flush=True)
        conn, _ = server.accept()
        with conn:
            buf = bytearray(4 << 20)
            view = memoryview(buf)
            total = conn.recv_into(view)
            t0 = time.perf_counter()
            first = total
            while True:
                k = conn.recv_into(view)
                if not k:
                    break
                total += k
            elapsed = time.perf_counter() - t0
    # the clock starts when the first chunk has arrived: count from the chunk after it
    return {"bytes": total - first, "seconds": elapsed}


def _send(to: str, port: int, seconds: float) -> None:
    payload = memoryview(os.urandom(_SEND_CHUNK))
    with socket.create_connection((to, port), timeout=30) as conn:
        conn.settimeout(None)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # the receiver closes when it has read everything


def _allreduce_rank(mb: float, iters: int, warmup: int, timeout: float) -> dict:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=timeout))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        x = torch.empty(max(1, int(mb * 1e6 / 4)), dtype=torch.float32)
        expected = world * (world + 1) / 2
        seconds, max_error = [], 0.0
        for k in range(warmup + iters):
            x.fill_(rank + 1)
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            dt = time.perf_counter() - t0
            max_error = max(max_error, (x - expected).abs().max().item())
            if k >= warmup:
                seconds.append(dt)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return {"rank": rank, "bytes": x.numel() * 4, "seconds": seconds, "max_error": max_error}


# ---------------------------------------------------------------------------------------------
# Command line


def _print_status(hosts: TestHosts) -> None:
    print(
        f"{hosts.n} test hosts {hosts.prefix!r} at {hosts.rate}, subnet {hosts.subnet}, "
        f"switch namespace {hosts.switch}"
    )
    for row in hosts.status():
        rate = "unshaped" if row["rate_bps"] is None else format_rate(row["rate_bps"])
        print(
            f"  host {row['host']}: netns {row['namespace']}  dev {row['interface']}  "
            f"{row['address']}  {rate}  sent {row['sent_bytes']} B  drops {row['drops']}"
        )


def _host_index(hosts: TestHosts, name: str) -> int:
    if name.isdigit():
        return int(name)
    if name in hosts.namespaces:
        return hosts.namespaces.index(name)
    raise IndexError(f"host {name!r} is neither 0..{hosts.n - 1} nor one of {hosts.namespaces}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="testhosts.py",
        description="Network namespaces on one machine, joined by a bridge, links shaped with tbf.",
        epilog=f"Exit status {EXIT_UNAVAILABLE}: this machine cannot build test hosts (not root, "
        "no netns); fall back to localhost.",
    )
    parser.add_argument(
        "--prefix",
        default=DEFAULT_PREFIX,
        help=f"names of namespaces and links (default {DEFAULT_PREFIX})",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    p = sub.add_parser("up", help="build hosts that stay up until `down`")
    p.add_argument("--hosts", type=int, default=2, help="number of hosts (default 2)")
    p.add_argument(
        "--rate",
        default=DEFAULT_LINK_RATE,
        help=f"link rate, e.g. 10gbit, 1gbit, 100mbit, none (default {DEFAULT_LINK_RATE})",
    )
    p.add_argument("--subnet", default=DEFAULT_SUBNET, help=f"default {DEFAULT_SUBNET}")
    p.add_argument("--master-port", type=int, default=DEFAULT_MASTER_PORT)
    p.add_argument("--replace", action="store_true", help="replace hosts an earlier `up` built")
    p = sub.add_parser("down", help="remove the hosts and anything left over with the prefix")
    p.add_argument("--force", action="store_true", help="also hosts of a running process")
    sub.add_parser("status", help="show the hosts, their rates and counters")
    p = sub.add_parser("measure", help="TCP throughput host 0 -> host 1 (and gloo allreduce)")
    p.add_argument(
        "--rate",
        help="build temporary hosts at this rate for the measurement "
        "(default: use the hosts that are up)",
    )
    p.add_argument("--hosts", type=int, default=2, help="with --rate: number of hosts")
    p.add_argument("--seconds", type=float, default=3.0, help="TCP stream length (default 3)")
    p.add_argument(
        "--allreduce-mb",
        type=float,
        default=0.0,
        help="also time a gloo all_reduce of this many MB on all hosts (needs torch)",
    )
    p.add_argument("--iters", type=int, default=3, help="timed all_reduce calls (default 3)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p = sub.add_parser("exec", help="run a command in a host: exec HOST -- cmd ...")
    p.add_argument("host", help="host index or namespace name")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    for name in ("_receive", "_send", "_allreduce"):
        sub.add_parser(name)  # the processes measure/allreduce start in the hosts
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command: ``up``, ``down``, ``status``, ``measure`` or ``exec`` (see ``--help``);
    returns its exit status (:data:`EXIT_UNAVAILABLE` when the machine cannot build hosts)."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command.startswith("_"):
            return _internal(args.command, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return _command(parser, args)
    except HostsUnavailable as e:
        print(f"testhosts: unavailable: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (HostsError, ValueError, IndexError) as e:
        print(f"testhosts: {e}", file=sys.stderr)
        return EXIT_ERROR


def _command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Carry out one of the user's commands; errors propagate to :func:`main`."""
    if args.command == "up":
        hosts = TestHosts(
            args.hosts, args.rate, args.prefix, subnet=args.subnet, master_port=args.master_port
        )
        hosts.up(persistent=True, replace=args.replace)
        _print_status(hosts)
    elif args.command == "down":
        removed = cleanup(args.prefix, force=args.force)
        print(
            f"removed {', '.join(removed)}"
            if removed
            else f"nothing to remove for prefix {args.prefix!r}"
        )
    elif args.command == "status":
        _print_status(TestHosts.attach(args.prefix))
    elif args.command == "measure":
        with contextlib.ExitStack() as stack:
            if args.rate is not None:
                hosts = stack.enter_context(TestHosts(args.hosts, args.rate, args.prefix))
            else:
                hosts = TestHosts.attach(args.prefix)
            _measure(hosts, args)
    elif args.command == "exec":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            parser.error("exec needs a command: exec HOST -- cmd ...")
        hosts = TestHosts.attach(args.prefix)
        return hosts.run(_host_index(hosts, args.host), cmd).returncode
    return 0


def _measure(hosts: TestHosts, args: argparse.Namespace) -> None:
    tcp = hosts.measure(seconds=args.seconds)
    result: dict[str, Any] = {
        "rate": hosts.rate,
        "hosts": hosts.n,
        "tbf": hosts.tbf,
        "tcp_gbit_per_s": tcp.gbit_per_s,
        "tcp_bytes": tcp.bytes,
        "tcp_seconds": tcp.seconds,
    }
    if args.allreduce_mb > 0:
        ar = hosts.allreduce(args.allreduce_mb, iters=args.iters)
        result.update(
            allreduce_mb=ar.bytes / 1e6,
            allreduce_seconds=ar.seconds,
            allreduce_bus_gbit_per_s=ar.bus_bits_per_s / 1e9,
            allreduce_max_error=ar.max_error,
        )
    if args.json:
        print(json.dumps(result))
        return
    nominal = (
        ""
        if hosts.rate_bps is None
        else f" ({tcp.bits_per_s / hosts.rate_bps:.1%} of {format_rate(hosts.rate_bps)})"
    )
    print(
        f"TCP host 0 -> host 1: {tcp.gbit_per_s:.4g} Gbit/s{nominal}, {tcp.bytes} B in "
        f"{tcp.seconds:.2f} s"
    )
    if args.allreduce_mb > 0:
        times = ", ".join(f"{s:.3f}" for s in result["allreduce_seconds"])
        print(
            f"gloo all_reduce {result['allreduce_mb']:.1f} MB on {hosts.n} ranks: {times} s, "
            f"bus bandwidth {result['allreduce_bus_gbit_per_s']:.4g} Gbit/s, "
            f"max error {result['allreduce_max_error']}"
        )


def _internal(command: str, rest: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog=f"testhosts.py {command}")
    if command == "_receive":
        p.add_argument("--bind", required=True)
        p.add_argument("--port", type=int, required=True)
        a = p.parse_args(rest)
        print(json.dumps(_receive(a.bind, a.port)), flush=True)
    elif command == "_send":
        p.add_argument("--to", required=True)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--seconds", type=float, required=True)
        a = p.parse_args(rest)
        _send(a.to, a.port, a.seconds)
    else:
        p.add_argument("--mb", type=float, required=True)
        p.add_argument("--iters", type=int, required=True)
        p.add_argument("--warmup", type=int, required=True)
        p.add_argument("--timeout", type=float, required=True)
        a = p.parse_args(rest)
        print(json.dumps(_allreduce_rank(a.mb, a.iters, a.warmup, a.timeout)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
