"""``handoff simulate``: a local blue-green deploy with real node processes, without and with
handoff, side by side.

Each deploy starts a DNS server on loopback and node processes that find each other through
it: ``node-a`` of the old release ``v1``, holding a warm ``TTLCache``, and ``nodes`` nodes of
the new release ``v2`` (``node-b``, ``node-c`` ...) with empty caches, on 127.0.0.2, 127.0.0.3
and so on (from ``--host-base``), with their control sockets in a directory of the run's
own. Every step has a time bound; anything missing is a :class:`SimulationError` naming what
did not happen.

:func:`run_comparison` (the ``handoff simulate`` command) runs the same deploy twice under
synthetic traffic (see :mod:`handoff._demo`): requests for Zipf-distributed keys, served by
the node processes themselves through their cache in front of a slow backend (a miss "calls
the backend": 3 ms and one backend call). Before the switch ``node-a`` serves all traffic;
at the switch the balancer sends each key to one new node and ``node-a`` gets SIGTERM:

- cold: ``node-a`` stops without draining, as a service without handoff does; the new
  nodes start empty and warm up from the backend;
- warm: ``node-a`` drains its cache to the new nodes. With spread ``split`` each key goes
  to one of them, by the same rendezvous hashing the key balancer uses, so every key lands
  where its requests go; with spread ``all`` every new node gets every key (what a
  round-robin balancer needs). The spread defaults to ``split`` for ``--balance key`` and
  ``all`` for ``--balance round-robin``.

Both runs draw the same request stream (same seeds), so the difference is the handoff:
hit rate over time, backend calls during and after the deploy, entries moved and lost, and
stale reads (:data:`WRITE_SHARE` of the requests write; a read on a new node older than the
old node's last write to its key before the switch is stale, see :mod:`handoff._demo`):
``stale_reads`` after the new node applied the last records handed to it (what the handoff
left behind), ``stale_reads_in_flight`` before (the old node's last writes on their way).
With pre-copy the traffic starts once every new node reports warm (its readiness), at most
:data:`READY_TIMEOUT` later.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import math
import queue
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from xml.sax.saxutils import escape

from handoff._demo import BALANCES, TrafficSpec
from handoff._local.dns import DNSResponder
from handoff._local.process import STATE_ENV, NodeProcess, free_port_on_all
from handoff._text import duration
from handoff.engine._tracked import SPREADS

__all__ = (
    "DEMO_ENTRIES",
    "DEMO_NODES",
    "DEMO_RATE",
    "DEMO_SECONDS",
    "SIMULATE_DESCRIPTION",
    "SIMULATE_HELP",
    "Comparison",
    "DemoSettings",
    "DeployRun",
    "SimulatedNode",
    "SimulationError",
    "SimulationEvent",
    "SimulationResult",
    "TrafficBin",
    "add_simulate_arguments",
    "format_event",
    "loopback_aliases_usable",
    "render_chart",
    "render_svg",
    "render_table",
    "run_comparison",
    "run_from_args",
)

#: ``handoff simulate`` defaults: new-release nodes, the old node's warm entries, seconds
#: of traffic per run and requests per second (the two runs take about 20 s in all).
DEMO_NODES = 2
DEMO_ENTRIES = 20_000
DEMO_SECONDS = 8.0
DEMO_RATE = 2_000.0
MAX_NODES = 8
MAX_ENTRIES = 1_000_000
MIN_SECONDS, MAX_SECONDS = 1.0, 600.0
MIN_RATE, MAX_RATE = 100.0, 20_000.0

#: The key space is this many times the old node's cache (which holds the hottest keys).
KEY_SPACE_FACTOR = 4
ZIPF_EXPONENT = 1.0
BACKEND_DELAY = 0.003
#: The share of requests that write a new value of their key (write-through), so that a
#: handoff that leaves an outdated value behind shows as ``stale_reads``.
WRITE_SHARE = 0.05
#: At the switch the balancer stops sending to the old node, which finishes the requests
#: due before it (its writes are what the new nodes' reads must not be older than) within
#: this many seconds, before it gets SIGTERM.
OLD_TRAFFIC_WAIT = 2.0
BIN_SECONDS = 0.25
#: The part of the traffic served before the switch.
BEFORE_FRACTION = 0.25
#: The hit rates compared are those of the first seconds after the switch.
WINDOW_SECONDS = 2.0
#: Traffic starts this long after it is announced to the nodes, plus this long per key
#: (each node first builds its Zipf table: about a second for 4,000,000 keys).
TRAFFIC_LEAD = 0.3
TRAFFIC_LEAD_PER_KEY = 1e-6
#: The balancer moves traffic to the new nodes, then the old node gets SIGTERM.
SIGTERM_AFTER_SWITCH = 0.02
#: With pre-copy, the traffic (and with it the switch) waits until every new node reports
#: warm (its pre-copy complete), as a platform's readiness check would; at most this long,
#: then it goes ahead and the run says so (``ready_wait_timed_out``).
READY_TIMEOUT = 20.0
STARTUP_TIMEOUT = 30.0
#: The exit code of bad arguments (as argparse's; ``handoff.cli.EXIT_USAGE``).
EXIT_USAGE = 2
#: The old node's loopback address; the new nodes take the following ones.
DEFAULT_HOST_BASE = "127.0.0.2"
# The children must all hash strings alike, so that the balancer's split by key (computed
# in each new node) is the one the drain makes (see handoff._demo).
HASH_SEED = "0"

NAMESPACE = "cache"
DRAIN_TIMEOUT = 15.0

DNS_NAME = "shop.test"
CLUSTER = "shop"
POLL_INTERVAL = 0.5
HEARTBEAT_TIMEOUT = 3.0
# Each node gets this long to stop cleanly at the end before it is killed.
SHUTDOWN_TIMEOUT = 3.0

_STOPPED = "node-a"
_MEMBERSHIP_EVENTS = ("node-up", "leaving", "node-down")
_TRAFFIC_EVENTS = ("traffic", "traffic-started", "traffic-done")


def host_base_problem(host_base: str, nodes: int) -> str | None:
    """What is wrong with ``host_base`` as the first address of ``nodes`` simulated nodes
    (the old one and the new ones), or ``None``: they take consecutive loopback IPv4
    addresses, all inside 127.0.0.0/8 and short of its broadcast address."""
    try:
        first = ipaddress.IPv4Address(host_base)
    except ValueError:
        return f"--host-base {host_base!r} is not an IPv4 address (e.g. 127.0.10.1)"
    if not first.is_loopback:
        return (
            f"--host-base {host_base} is not a loopback address: the simulated nodes run on "
            "this machine only, on 127.0.0.0/8 (e.g. 127.0.10.1)"
        )
    last = int(first) + nodes - 1
    network = ipaddress.IPv4Network("127.0.0.0/8")
    if first == network.network_address or last >= int(network.broadcast_address):
        return (
            f"--host-base {host_base} leaves no room for the {nodes} nodes (one address "
            f"each, consecutive, from {host_base} on): they must stay within 127.0.0.1 to "
            "127.255.255.254; pick a lower one"
        )
    return None


def _plan(new_nodes: int, host_base: str = DEFAULT_HOST_BASE) -> list[tuple[str, str, str]]:
    """(name, release, host) of the old node and ``new_nodes`` new ones."""
    first = ipaddress.IPv4Address(host_base)
    plan = [(_STOPPED, "v1", str(first))]
    plan += [(f"node-{chr(ord('b') + i)}", "v2", str(first + 1 + i)) for i in range(new_nodes)]
    return plan


class SimulationError(Exception):
    """Something the simulation waits for did not happen in time, or a node failed."""


@dataclass(frozen=True, slots=True)
class SimulatedNode:
    """One node of the simulation."""

    name: str
    release: str
    address: str
    exit_code: int | None = None


@dataclass(frozen=True, slots=True)
class SimulationEvent:
    """An event one node reported, ``seconds`` after the simulation started."""

    seconds: float
    observer: str
    event: str
    peer: str | None = None
    release: str | None = None
    reason: str | None = None
    address: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "seconds": round(self.seconds, 4),
            "observer": self.observer,
            "event": self.event,
            "peer": self.peer,
            "release": self.release,
            "reason": self.reason,
            "address": self.address,
        }


@dataclass(slots=True)
class SimulationResult:
    """The membership side of one deploy: filled in as it goes, complete when ``ok``."""

    ok: bool = False
    error: str | None = None
    seconds: float = 0.0
    dns_server: str = ""
    nodes: list[SimulatedNode] = field(default_factory=list)
    events: list[SimulationEvent] = field(default_factory=list)
    stopped: str = _STOPPED
    mesh_seconds: float | None = None
    """When the last node-up of the full mesh arrived."""
    down_seconds: dict[str, float] = field(default_factory=dict)
    """Per observer: seconds from the SIGTERM of the stopped node to its node-down."""
    entries_after: dict[str, int] = field(default_factory=dict)
    """Entries each new node holds at the end."""
    drain: dict[str, Any] | None = None
    """The old node's drain report (``DrainReport.as_dict()``)."""
    warm: dict[str, str] = field(default_factory=dict)
    """Why each new node reported warm."""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "ok": self.ok,
            "error": self.error,
            "seconds": round(self.seconds, 3),
            "dns": {"name": DNS_NAME, "server": self.dns_server},
            "nodes": [
                {
                    "name": n.name,
                    "release": n.release,
                    "address": n.address,
                    "exit_code": n.exit_code,
                }
                for n in self.nodes
            ],
            "stopped": {"name": self.stopped, "signal": "SIGTERM"},
            "timings": {
                "mesh": None if self.mesh_seconds is None else round(self.mesh_seconds, 4),
                "node_down": {k: round(v, 4) for k, v in self.down_seconds.items()},
            },
            "drain": self.drain,
            "warm": dict(sorted(self.warm.items())),
            "events": [e.as_dict() for e in self.events],
        }


# -- the traffic runs ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DemoSettings:
    """The settings of ``handoff simulate``."""

    nodes: int = DEMO_NODES
    """Nodes of the new release."""
    entries: int = DEMO_ENTRIES
    """Entries in the old node's cache (full: its ``maxsize``, and each new node's)."""
    seconds: float = DEMO_SECONDS
    """Seconds of traffic per run, before and after the switch."""
    rate: float = DEMO_RATE
    """Requests per second, all nodes together."""
    balance: str = "key"
    """How the balancer spreads requests over the new nodes: ``key`` or ``round-robin``."""
    spread: str | None = None
    """How the drain places the keys on the new nodes: ``split`` or ``all``; ``None``:
    ``split`` for the key balancer (where it puts each key), ``all`` for round-robin."""
    precopy: bool = False
    """In the warm run, the old node pre-copies its cache to each new node as it comes up
    (``HANDOFF_PRECOPY=on``), and its drain sends only the delta."""
    seed: int = 1
    host_base: str = DEFAULT_HOST_BASE
    """The old node's loopback address; the new nodes take the following ones, so runs with
    different bases (and socket directories) on one host do not meet."""

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= MAX_NODES:
            raise ValueError(f"nodes must be from 1 to {MAX_NODES}, not {self.nodes}")
        if not 1 <= self.entries <= MAX_ENTRIES:
            raise ValueError(f"entries must be from 1 to {MAX_ENTRIES}, not {self.entries}")
        if not MIN_SECONDS <= self.seconds <= MAX_SECONDS:
            raise ValueError(
                f"seconds must be from {MIN_SECONDS:g} to {MAX_SECONDS:g}, not {self.seconds}"
            )
        if not MIN_RATE <= self.rate <= MAX_RATE:
            raise ValueError(f"rate must be from {MIN_RATE:g} to {MAX_RATE:g}, not {self.rate}")
        if self.balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}")
        problem = host_base_problem(self.host_base, self.nodes + 1)
        if problem is not None:
            raise ValueError(problem)
        if self.spread not in (None, *SPREADS):
            raise ValueError(f"spread must be one of {', '.join(SPREADS)}")

    @property
    def drain_spread(self) -> str:
        """The spread the drain uses (see :attr:`spread`)."""
        if self.spread is not None:
            return self.spread
        return "split" if self.balance == "key" else "all"

    @property
    def keys(self) -> int:
        """The size of the key space."""
        return self.entries * KEY_SPACE_FACTOR

    @property
    def bins(self) -> int:
        """Bins of :data:`BIN_SECONDS` per run."""
        return max(2, round(self.seconds / BIN_SECONDS))

    @property
    def before_bins(self) -> int:
        """Bins before the switch."""
        return min(self.bins - 1, max(1, round(self.bins * BEFORE_FRACTION)))

    @property
    def window_bins(self) -> int:
        """Bins of the window after the switch whose hit rates are compared."""
        return max(1, min(self.bins - self.before_bins, round(WINDOW_SECONDS / BIN_SECONDS)))

    @property
    def new_names(self) -> list[str]:
        """The names of the new-release nodes."""
        return [name for name, _, _ in _plan(self.nodes, self.host_base)[1:]]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "nodes": self.nodes,
            "entries": self.entries,
            "seconds": self.bins * BIN_SECONDS,
            "seconds_before_switch": self.before_bins * BIN_SECONDS,
            "window_seconds": self.window_bins * BIN_SECONDS,
            "rate": self.rate,
            "balance": self.balance,
            "spread": self.drain_spread,
            "precopy": self.precopy,
            "seed": self.seed,
            "host_base": self.host_base,
            "keys": self.keys,
            "zipf_exponent": ZIPF_EXPONENT,
            "backend_delay": BACKEND_DELAY,
            "interval": BIN_SECONDS,
        }


@dataclass(slots=True)
class TrafficBin:
    """Requests served in one bin (or a span of bins), all serving nodes together."""

    requests: int = 0
    hits: int = 0
    backend_calls: int = 0

    @property
    def hit_rate(self) -> float | None:
        """Hits per request (``None`` without requests)."""
        return self.hits / self.requests if self.requests else None

    def add(self, other: TrafficBin) -> None:
        """Count ``other`` in too."""
        self.requests += other.requests
        self.hits += other.hits
        self.backend_calls += other.backend_calls

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        rate = self.hit_rate
        return {
            "requests": self.requests,
            "hits": self.hits,
            "backend_calls": self.backend_calls,
            "hit_rate": None if rate is None else round(rate, 4),
        }


def _sum(bins: Sequence[TrafficBin]) -> TrafficBin:
    total = TrafficBin()
    for one in bins:
        total.add(one)
    return total


@dataclass(slots=True)
class DeployRun:
    """One deploy under traffic: ``cold`` (no handoff) or ``warm`` (handoff)."""

    label: str
    handoff: bool
    settings: DemoSettings
    deploy: SimulationResult = field(default_factory=SimulationResult)
    """The membership side: nodes, events, timings, the drain report."""
    bins: list[TrafficBin] = field(default_factory=list)
    """Every bin of the run, all nodes together; the switch is at ``settings.before_bins``."""
    per_node: dict[str, TrafficBin] = field(default_factory=dict)
    """Requests each node served."""
    late: list[str] = field(default_factory=list)
    """Nodes whose traffic fell behind (an overloaded machine) and gave up."""
    entries_before: int = 0
    """Entries the old node held when it got SIGTERM."""
    entries_moved: int = 0
    """Entries the new nodes took from the handoff (applied, or already held); with spread
    ``all``, entries at least one new node took (each counted once, by the drain report)."""
    moved_per_node: dict[str, int] = field(default_factory=dict)
    """Entries each new node took from the handoff (its copy, with spread ``all``)."""
    sigterm_at: float | None = None
    """Seconds into the run when the old node got SIGTERM."""
    precopies: list[dict[str, Any]] = field(default_factory=list)
    """With pre-copy: the old node's pre-copies just before SIGTERM (``node.stats()``)."""
    applied_after_sigterm: float | None = None
    """Seconds into the run when a new node last applied handed-off records after it."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Entries the handoff dropped (by the sender or a receiver), per reason."""
    snapshotted: int = 0
    entries_at_end: dict[str, int] = field(default_factory=dict)
    """Entries each new node holds when the traffic has ended."""
    writes: dict[str, int] = field(default_factory=dict)
    """Requests that wrote rather than read (``before`` and ``after`` the switch; the
    bins and ``requests`` count reads)."""
    stale_reads: int | None = None
    """Reads on the new nodes that returned an older value than the old node last wrote
    to that key before the switch, after the new node had applied the last records the
    old node handed to it: outdated values the handoff left behind (``None`` when the old
    node's traffic did not finish before SIGTERM, so its last writes are not known)."""
    stale_reads_in_flight: int | None = None
    """Such reads before the new node had applied the last records handed to it: the old
    node's last writes were still on their way (live delta, or the drain's delta)."""
    ready_wait_seconds: float | None = None
    """With pre-copy: how long the traffic waited for every new node to report warm
    before it started (``None`` without pre-copy: the traffic starts at once)."""
    ready_wait_timed_out: bool = False
    """The wait for warm new nodes reached :data:`READY_TIMEOUT` and the traffic went
    ahead without them all warm."""

    def __post_init__(self) -> None:
        if not self.bins:
            self.bins = [TrafficBin() for _ in range(self.settings.bins)]

    @property
    def lost(self) -> int:
        """Entries of the old node that are not warm on the new release."""
        return max(0, self.entries_before - self.entries_moved)

    @property
    def unaccounted(self) -> int:
        """Entries the handoff neither moved, nor dropped with a reason, nor snapshotted."""
        if not self.handoff:
            return 0
        return self.lost - sum(self.dropped.values()) - self.snapshotted

    @property
    def blackout_seconds(self) -> float | None:
        """From SIGTERM to the last handed-off record applied on a new node: the time the
        new nodes serve without part of the old node's state (0 when a pre-copy left
        nothing to send; ``None`` without handoff)."""
        if not self.handoff or self.sigterm_at is None:
            return None
        if self.applied_after_sigterm is None:
            return 0.0
        return max(0.0, self.applied_after_sigterm - self.sigterm_at)

    @property
    def handoff_seconds(self) -> float | None:
        """How long the drain took (``None`` without handoff)."""
        drain = self.deploy.drain
        return None if drain is None else float(drain["seconds"])

    def before(self) -> TrafficBin:
        """The traffic before the switch."""
        return _sum(self.bins[: self.settings.before_bins])

    def window(self) -> TrafficBin:
        """The traffic of the first seconds after the switch."""
        start = self.settings.before_bins
        return _sum(self.bins[start : start + self.settings.window_bins])

    def after(self) -> TrafficBin:
        """The traffic after the switch."""
        return _sum(self.bins[self.settings.before_bins :])

    def series(self) -> list[dict[str, Any]]:
        """Every bin, ``t`` its start in seconds from the switch."""
        before = self.settings.before_bins
        return [
            {"t": round((index - before) * BIN_SECONDS, 4), **one.as_dict()}
            for index, one in enumerate(self.bins)
        ]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        parts = {"before": self.before(), "window": self.window(), "after": self.after()}
        deploy = self.deploy.as_dict()
        return {
            "handoff": self.handoff,
            "ok": deploy.pop("ok"),
            "error": deploy.pop("error"),
            "seconds": deploy.pop("seconds"),
            "hit_rate": {
                k: None if v.hit_rate is None else round(v.hit_rate, 4) for k, v in parts.items()
            },
            "backend_calls": {k: v.backend_calls for k, v in parts.items()},
            "requests": {k: v.requests for k, v in parts.items()},
            "entries_before": self.entries_before,
            "entries_moved": self.entries_moved,
            "moved_per_node": dict(sorted(self.moved_per_node.items())),
            "lost": self.lost,
            "dropped": dict(sorted(self.dropped.items())),
            "snapshotted": self.snapshotted,
            "handoff_seconds": self.handoff_seconds,
            "blackout_seconds": _rounded(self.blackout_seconds),
            "stale_reads_in_flight": self.stale_reads_in_flight,
            "ready_wait_seconds": _rounded(self.ready_wait_seconds),
            "ready_wait_timed_out": self.ready_wait_timed_out,
            "writes": dict(self.writes),
            "stale_reads": self.stale_reads,
            "precopies": self.precopies,
            "entries_at_end": dict(sorted(self.entries_at_end.items())),
            "per_node": {k: v.as_dict() for k, v in sorted(self.per_node.items())},
            "late": sorted(self.late),
            **deploy,
            "series": self.series(),
        }


@dataclass(slots=True)
class Comparison:
    """The result of :func:`run_comparison`: a cold and a warm deploy under the same traffic."""

    settings: DemoSettings
    cold: DeployRun | None = None
    warm: DeployRun | None = None
    ok: bool = False
    error: str | None = None
    seconds: float = 0.0
    plot: str | None = None
    """Where the SVG chart was written, if it was."""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``--json`` output)."""
        cold, warm = self.cold, self.warm

        def rate(run: DeployRun | None) -> float | None:
            value = None if run is None else run.window().hit_rate
            return None if value is None else round(value, 4)

        return {
            "ok": self.ok,
            "error": self.error,
            "seconds": round(self.seconds, 3),
            "settings": self.settings.as_dict(),
            "entries_before": None if warm is None else warm.entries_before,
            "entries_after": None if warm is None else warm.entries_moved,
            "lost": None if warm is None else warm.lost,
            "handoff_seconds": None if warm is None else warm.handoff_seconds,
            "blackout_seconds": None if warm is None else _rounded(warm.blackout_seconds),
            "stale_reads_in_flight": None if warm is None else warm.stale_reads_in_flight,
            "stale_reads": None if warm is None else warm.stale_reads,
            "ready_wait_seconds": None if warm is None else _rounded(warm.ready_wait_seconds),
            "ready_wait_timed_out": None if warm is None else warm.ready_wait_timed_out,
            "hit_rate_before": _rate_before(warm),
            "hit_rate_cold": rate(cold),
            "hit_rate_warm": rate(warm),
            "backend_calls_cold": None if cold is None else cold.after().backend_calls,
            "backend_calls_warm": None if warm is None else warm.after().backend_calls,
            "window_seconds": self.settings.window_bins * BIN_SECONDS,
            "plot": self.plot,
            "cold": None if cold is None else cold.as_dict(),
            "warm": None if warm is None else warm.as_dict(),
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _rate_before(run: DeployRun | None) -> float | None:
    """The hit rate of ``run`` before the switch, rounded (``None`` if unknown)."""
    value = None if run is None else run.before().hit_rate
    return None if value is None else round(value, 4)


# -- running a deploy ----------------------------------------------------------------------------


def loopback_aliases_usable(hosts: Sequence[str]) -> bool:
    """True if this machine can bind every one of ``hosts`` (Linux can bind 127.0.0.0/8;
    other systems need aliases for loopback addresses other than 127.0.0.1)."""
    try:
        for host in hosts:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
    except OSError:
        return False
    return True


def format_event(event: SimulationEvent, *, offset: float | None = None) -> str:
    """One readable line, e.g. ``  0.41s  node-b  node-up    node-a (release v1)``; with
    ``offset``, the time is shown signed, relative to it (``+0.11s``)."""
    if offset is None:
        text = f"{event.seconds:6.2f}s  {event.observer:<7} {event.event:<10}"
    else:
        text = f"{event.seconds - offset:+6.2f}s  {event.observer:<7} {event.event:<10}"
    if event.peer is not None:
        text += f" {event.peer} (release {event.release})"
    elif event.address is not None:
        text += f" on {event.address} (release {event.release})"
    if event.reason:
        text += f": {event.reason}" if event.peer is not None else f" {event.reason}"
    return text.rstrip()


def _bar(rate: float | None, width: int, *, unicode: bool) -> str:
    if rate is None:
        return " " * width
    eighths = round(max(0.0, min(1.0, rate)) * width * 8)
    if not unicode:
        full = round(eighths / 8)
        return "#" * full + "." * (width - full)
    full, part = divmod(eighths, 8)
    text = "█" * full + (" ▏▎▍▌▋▊▉"[part] if part else "")
    return text + "·" * (width - len(text))


class _Simulation:
    """One deploy under traffic, filling in ``run``; progress lines go to ``say``."""

    def __init__(
        self, run: DeployRun, say: Callable[[str], None], *, unicode: bool, socket_dir: Path
    ) -> None:
        self.socket_dir = socket_dir
        self.entries = run.settings.entries
        self.started = time.monotonic()
        self.seconds = STARTUP_TIMEOUT
        self.deadline = self.started + self.seconds
        self.say = say
        self.run_data = run
        self.handoff = run.handoff
        self.plan = _plan(run.settings.nodes, run.settings.host_base)
        self.result = run.deploy
        self.inbox: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.procs: dict[str, NodeProcess] = {}
        self.unicode = unicode
        self.switch_elapsed: float | None = None
        self.traffic_started: set[str] = set()
        self.traffic_done: dict[str, dict[str, Any]] = {}
        self.epoch = 0.0
        self.printed_groups = 0

    def elapsed(self, at: float | None = None) -> float:
        return (time.monotonic() if at is None else at) - self.started

    @property
    def new_names(self) -> list[str]:
        return [name for name, _, _ in self.plan if name != _STOPPED]

    def run(self) -> SimulationResult:
        hosts = [host for _, _, host in self.plan]
        if not loopback_aliases_usable(hosts):
            raise SimulationError(
                f"cannot bind the loopback addresses {', '.join(hosts)} the nodes use "
                "(Linux has all of 127.0.0.0/8; on macOS add aliases first: "
                f"sudo ifconfig lo0 alias {hosts[0]} up, and likewise for the others)"
            )
        cookie = secrets.token_urlsafe(32)
        with DNSResponder() as dns, contextlib.ExitStack() as stack:
            # One callback ends every process (not one per process) so that they all get
            # SIGTERM first and stop in parallel, within one SHUTDOWN_TIMEOUT.
            stack.callback(self._shutdown)
            port = free_port_on_all(hosts)
            dns.set_a(DNS_NAME, hosts)
            self.result.dns_server = dns.server_spec
            old_state, new_state = self._states()
            for name, release, host in self.plan:
                state = old_state if name == _STOPPED else new_state
                env = {
                    STATE_ENV: json.dumps(state),
                    "HANDOFF_DRAIN_TIMEOUT": str(DRAIN_TIMEOUT),
                    "HANDOFF_PRECOPY": (
                        "on" if self.handoff and self.run_data.settings.precopy else "off"
                    ),
                    "HANDOFF_COOKIE": cookie,
                    "HANDOFF_CLUSTER": CLUSTER,
                    "HANDOFF_RELEASE": release,
                    "HANDOFF_BIND": f"{host}:{port}",
                    "HANDOFF_DISCOVERY": f"dns:{DNS_NAME}:{port}",
                    "HANDOFF_DNS_SERVER": dns.server_spec,
                    "HANDOFF_POLL_INTERVAL": str(POLL_INTERVAL),
                    "HANDOFF_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
                    # Each node its own socket in this run's directory: another run (or a
                    # real node of a cluster named shop) never holds it.
                    "HANDOFF_CONTROL_SOCKET": str(self.socket_dir / f"{name}.sock"),
                    "PYTHONHASHSEED": HASH_SEED,
                }
                proc = NodeProcess(
                    env, name=name, log_level="WARNING", on_event=self._forward(name)
                )
                self.procs[name] = proc
                proc.start()
                self.result.nodes.append(SimulatedNode(name, release, f"{host}:{port}"))
            self.say(
                f"  starting {_STOPPED} (v1, {self.entries} warm entries) and "
                f"{_names(self.new_names)} (v2, empty) on {hosts[0]}..{hosts[-1]}"
            )
            self.say(f"  they find each other through DNS: {DNS_NAME} on {dns.server_spec}")
            self.say(
                f"  control sockets in {self.socket_dir} (handoff status --socket-dir "
                f"{self.socket_dir})"
            )
            self._form_mesh()
            if self.handoff and self.run_data.settings.precopy:
                self._await_warm()
            self._traffic()
        return self.result

    def _states(self) -> tuple[dict[str, Any], dict[str, Any]]:
        base = {"namespace": NAMESPACE, "type": "ttl", "ttl": 600}
        # A full cache of the hottest keys (the most recently used first); the new nodes
        # have the same size, stop without draining at the end (the run is over by then).
        old = {
            **base,
            "entries": self.entries,
            "maxsize": self.entries,
            "hot_first": True,
            "drain_on_stop": self.handoff,
            "spread": self.run_data.settings.drain_spread,
        }
        return old, {**base, "entries": 0, "maxsize": self.entries, "drain_on_stop": False}

    def _forward(self, name: str) -> Callable[[dict[str, Any]], None]:
        def forward(event: dict[str, Any]) -> None:
            self.inbox.put((name, event))

        return forward

    # -- the phases ------------------------------------------------------------------------

    def _form_mesh(self) -> None:
        names = [name for name, _, _ in self.plan]
        wanted = {(observer, peer) for observer in names for peer in names if observer != peer}
        listening: set[str] = set()

        def handle(observer: str, event: SimulationEvent) -> None:
            if event.event == "listening":
                listening.add(observer)
            elif event.event == "node-up" and event.peer is not None:
                wanted.discard((observer, event.peer))
                if not wanted:
                    self.result.mesh_seconds = event.seconds

        def missing() -> str:
            waiting = [f"{name} to listen" for name in names if name not in listening]
            waiting += [f"{o} to see {p} up" for o, p in sorted(wanted)]
            return ", ".join(waiting)

        self._pump(handle, done=lambda: not wanted, missing=missing, alive=set(names))
        self.say(f"  full mesh: every node sees the other {len(names) - 1} ({self.elapsed():.2f}s)")

    def _await_warm(self) -> None:
        """Wait, at most :data:`READY_TIMEOUT`, until every new node reports warm (its
        pre-copy is in): a platform sends a node traffic once its readiness check passes."""
        new = set(self.new_names)
        started = time.monotonic()
        cap = started + READY_TIMEOUT
        self.deadline = max(self.deadline, cap + 1.0)
        self._pump(
            lambda _o, _e: None,
            done=lambda: new <= self.result.warm.keys() or time.monotonic() >= cap,
            missing=lambda: ", ".join(f"{n} to report warm" for n in sorted(new)),
            alive=set(self.procs),
            until=cap,
        )
        run = self.run_data
        run.ready_wait_seconds = time.monotonic() - started
        cold = sorted(new - self.result.warm.keys())
        run.ready_wait_timed_out = bool(cold)
        if cold:
            self.say(
                f"  {_names(cold)} not warm after {READY_TIMEOUT:g} s: the traffic starts anyway"
            )
        else:
            self.say(
                f"  readiness: {_names(sorted(new))} warm (pre-copies in) after "
                f"{run.ready_wait_seconds:.2f}s; the traffic starts"
            )

    def _stop_old_node(self) -> None:
        victim = self.procs[_STOPPED]
        observers = set(self.new_names)
        if self.handoff and self.run_data.settings.precopy:
            stats = victim.command("stats --no-digest", timeout=SHUTDOWN_TIMEOUT)
            self.run_data.precopies = list(stats.get("precopy") or [])
        sent = time.monotonic()
        self.run_data.sigterm_at = self.elapsed(sent)
        victim.send_signal(signal.SIGTERM)
        stopped = False

        def handle(observer: str, event: SimulationEvent) -> None:
            nonlocal stopped
            if observer == _STOPPED and event.event == "stopped":
                stopped = True
            elif event.event == "node-down" and event.peer == _STOPPED and observer in observers:
                self.result.down_seconds[observer] = event.seconds - self.elapsed(sent)

        def done() -> bool:
            return (
                stopped
                and (self.result.drain is not None or not self.handoff)
                # A new node's warm event is shown, not awaited: one that got no keys
                # would only be warm at its warm-up timeout.
                and observers <= self.result.down_seconds.keys()
            )

        def missing() -> str:
            drained = self.result.drain is not None or not self.handoff
            waiting = [] if drained else [f"{_STOPPED} to drain"]
            waiting += [f"{_STOPPED} to stop"] if not stopped else []
            waiting += [
                f"{o} to see {_STOPPED} down"
                for o in sorted(observers - self.result.down_seconds.keys())
            ]
            return ", ".join(waiting)

        self._pump(handle, done=done, missing=missing, alive=observers)
        try:
            code = victim.terminate(timeout=max(0.1, self.deadline - time.monotonic()))
        except TimeoutError:
            raise SimulationError(f"{_STOPPED} did not exit after SIGTERM") from None
        if code != 0:
            raise SimulationError(f"{_STOPPED} exited with code {code} after SIGTERM, not 0")

    def _count_entries(self) -> None:
        for name, proc in sorted(self.procs.items()):
            if name == _STOPPED:
                continue
            remaining = max(1.0, self.deadline - time.monotonic())
            stats = proc.command("stats", timeout=remaining)
            if stats.get("unexpected"):
                raise SimulationError(f"{name} holds {stats['unexpected']} entries it should not")
            self.result.entries_after[name] = int(stats["entries"])
        self.run_data.entries_at_end = dict(self.result.entries_after)

    def _traffic(self) -> None:
        run = self.run_data
        settings = run.settings
        new = self.new_names
        self.epoch = epoch = time.monotonic() + TRAFFIC_LEAD + TRAFFIC_LEAD_PER_KEY * settings.keys
        switch = epoch + settings.before_bins * BIN_SECONDS
        end = epoch + settings.bins * BIN_SECONDS

        def spec(start: float, stop: float, seed: int, nodes: Sequence[str]) -> TrafficSpec:
            return TrafficSpec(
                epoch=epoch,
                start=start,
                end=stop,
                rate=settings.rate,
                keys=settings.keys,
                seed=seed,
                exponent=ZIPF_EXPONENT,
                backend_delay=BACKEND_DELAY,
                interval=BIN_SECONDS,
                nodes=tuple(nodes),
                balance=settings.balance,
                writes=WRITE_SHARE,
                previous=None if start == epoch else (epoch, switch, settings.seed),
            )

        # The same seeds in both runs: the same requests, in the same order.
        specs = {_STOPPED: spec(epoch, switch, settings.seed, [])}
        specs.update({name: spec(switch, end, settings.seed + 1, new) for name in new})
        for name, one in specs.items():
            self.procs[name].send(f"traffic {one.to_json()}")
        self.say(
            f"  traffic: {settings.rate:g} requests/s for {settings.bins * BIN_SECONDS:g} s, "
            f"Zipf keys (s={ZIPF_EXPONENT:g}) over {settings.keys} keys; a miss is a "
            f"{BACKEND_DELAY * 1000:g} ms backend call"
        )
        names = set(specs)
        # Until the switch, serve from the old node; it then finishes the requests due
        # before the switch (within OLD_TRAFFIC_WAIT) before it gets SIGTERM.
        self.deadline = switch + 5.0 + OLD_TRAFFIC_WAIT

        def switched() -> bool:
            now = time.monotonic()
            return now >= switch + SIGTERM_AFTER_SWITCH and (
                _STOPPED in self.traffic_done or now >= switch + OLD_TRAFFIC_WAIT
            )

        self._pump(
            lambda _o, _e: None,
            done=switched,
            missing=lambda: "the switch",
            alive=names,
            until=switch + SIGTERM_AFTER_SWITCH,
        )
        if names - self.traffic_started:
            raise SimulationError(
                f"{', '.join(sorted(names - self.traffic_started))} did not start the traffic"
            )
        self.switch_elapsed = self.elapsed(switch)
        self._progress(final=False, before_switch=True)
        how = "by key" if settings.balance == "key" else "round-robin"
        how += f"; the drain's spread: {settings.drain_spread}"
        what = "drains its cache to them" if self.handoff else "stops without draining"
        self.say(f"      0s  switch: the balancer sends the traffic to {_names(new)} {how}")
        self.say(f"          {_STOPPED} gets SIGTERM and {what}")
        self.deadline = end + DRAIN_TIMEOUT + 10.0
        self.seconds = self.deadline - self.started
        self._stop_old_node()
        if not self.handoff:
            held = self.traffic_done.get(_STOPPED, {}).get("entries", self.entries)
            self.say(f"  {_STOPPED} stopped without a drain: its {held} cache entries are lost")

        def missing() -> str:
            return ", ".join(f"{n} to end its traffic" for n in new if n not in self.traffic_done)

        self._pump(
            lambda _o, _e: None,
            done=lambda: set(new) <= self.traffic_done.keys(),
            missing=missing,
            alive=set(new),
        )
        self._progress(final=True)
        self._count_entries()
        self._account(run)

    def _account(self, run: DeployRun) -> None:
        old = self.traffic_done.get(_STOPPED, {})
        run.writes = {
            "before": int(old.get("writes", 0)),
            "after": sum(
                int(done.get("writes", 0))
                for name, done in self.traffic_done.items()
                if name != _STOPPED
            ),
        }
        if old.get("complete"):  # else the old node's last writes are not known
            new = [done for name, done in self.traffic_done.items() if name != _STOPPED]
            run.stale_reads = sum(int(done.get("stale_after_handoff", 0)) for done in new)
            run.stale_reads_in_flight = sum(int(done.get("stale_in_flight", 0)) for done in new)
        for name, done in self.traffic_done.items():
            if done.get("late"):
                run.late.append(name)
            run.per_node[name] = TrafficBin(
                int(done["requests"]), int(done["hits"]), int(done["backend_calls"])
            )
        drain = self.result.drain
        if drain is None:
            run.entries_before = int(old.get("entries", self.entries))
            return
        namespace = drain["namespaces"].get(NAMESPACE, {})
        run.entries_before = int(namespace.get("records", 0))
        run.snapshotted = int(namespace.get("snapshotted", 0))
        if namespace.get("spread") == "all" or run.settings.precopy:
            # Every new node got its own copy (spread all, or a pre-copy to each before the
            # drain): the receivers' sums count an entry once per node, and the copy too.
            # The drain report counts each record of the drain once (what the first node
            # to acknowledge it did with it).
            run.entries_moved = int(namespace.get("applied", 0)) + int(
                namespace.get("kept_existing", 0)
            )
            run.dropped = {
                reason: int(count)
                for reason, count in namespace.get("receiver_dropped", {}).items()
            }
        for reason, count in namespace.get("dropped", {}).items():
            run.dropped[reason] = run.dropped.get(reason, 0) + int(count)
        if run.unaccounted:
            raise SimulationError(
                f"{run.unaccounted} of {run.entries_before} entries vanished in the handoff "
                f"(moved {run.entries_moved}, dropped {run.dropped}, snapshotted "
                f"{run.snapshotted})"
            )

    # -- events --------------------------------------------------------------------------------

    def _pump(
        self,
        handle: Callable[[str, SimulationEvent], None],
        *,
        done: Callable[[], bool],
        missing: Callable[[], str],
        alive: set[str],
        until: float | None = None,
    ) -> None:
        """Show and record events until ``done()``, within the deadline (waking at ``until``)."""
        while not done():
            now = time.monotonic()
            remaining = self.deadline - now
            if remaining <= 0:
                raise SimulationError(
                    f"not done within {self.seconds:g} s: still waiting for {missing()}"
                )
            self._progress(final=False)
            wait = min(remaining, 0.1)
            if until is not None:
                wait = max(0.0, min(wait, until - now))
            try:
                observer, raw = self.inbox.get(timeout=wait)
            except queue.Empty:
                for name in sorted(alive):
                    proc = self.procs[name]
                    if not proc.running:
                        raise SimulationError(
                            f"{name} exited unexpectedly (code {proc.returncode}) while "
                            f"waiting for {missing()}; its log:\n{proc.stderr_tail()}"
                        ) from None
                continue
            if raw.get("event") in _TRAFFIC_EVENTS or raw.get("event") == "command-error":
                self._traffic_event(observer, raw)
                continue
            event = self._record(observer, raw)
            if event.event == "error":
                raise SimulationError(f"{observer} failed: {raw.get('message')}")
            handle(observer, event)

    def _traffic_event(self, observer: str, raw: dict[str, Any]) -> None:
        kind = raw.get("event")
        if kind == "command-error":
            raise SimulationError(
                f"{observer} refused {raw.get('command')!r}: {raw.get('message')}"
            )
        if kind == "traffic-started":
            self.traffic_started.add(observer)
        elif kind == "traffic-done":
            self.traffic_done[observer] = raw
        elif kind == "traffic":
            index = int(raw["bin"])
            if 0 <= index < len(self.run_data.bins):
                self.run_data.bins[index].add(
                    TrafficBin(int(raw["requests"]), int(raw["hits"]), int(raw["backend_calls"]))
                )

    def _progress(self, *, final: bool, before_switch: bool = False) -> None:
        """Show each second of traffic once it is over; with ``before_switch``, every second
        before the switch now; with ``final``, all of them."""
        run = self.run_data
        if self.epoch == 0.0:
            return
        settings = run.settings
        per = max(1, round(1.0 / BIN_SECONDS))
        before = settings.before_bins
        # Seconds counted from the switch: the first one before it may be shorter.
        earlier = math.ceil(before / per)
        groups = earlier + math.ceil((settings.bins - before) / per)
        while self.printed_groups < groups:
            group = self.printed_groups - earlier
            start = max(0, before + group * per)
            stop = min(settings.bins, before + (group + 1) * per)
            ready = final or (before_switch and group < 0)
            if before_switch and group >= 0:
                return
            if not ready and time.monotonic() < self.epoch + stop * BIN_SECONDS + 0.15:
                return
            self.printed_groups += 1
            span = _sum(run.bins[start:stop])
            who = _STOPPED if group < 0 else _names(self.new_names)
            rate = span.hit_rate
            shown = "   -  " if rate is None else f"{rate:6.1%}"
            self.say(
                f"  {f'{(start - before) * BIN_SECONDS:+g}s':>6}  {who:<14.14} "
                f"{_bar(rate, 20, unicode=self.unicode)} hit rate {shown}  "
                f"backend calls {span.backend_calls:5d} of {span.requests:5d} requests"
            )

    def _record(self, observer: str, raw: dict[str, Any]) -> SimulationEvent:
        kind = str(raw.get("event"))
        seconds = self.elapsed(float(raw.get("received_at", time.monotonic())))
        offset = self.switch_elapsed
        if kind in _MEMBERSHIP_EVENTS:
            event = SimulationEvent(
                seconds,
                observer,
                kind,
                peer=str(raw["peer"]),
                release=str(raw["release"]),
                reason=raw.get("reason"),
                address=str(raw["address"]),
            )
        elif kind == "listening":
            event = SimulationEvent(
                seconds, observer, kind, release=str(raw["release"]), address=str(raw["address"])
            )
        elif kind == "drained":
            self.result.drain = report = raw["report"]
            event = SimulationEvent(seconds, observer, kind)
            self.say(f"  {format_event(event, offset=offset)}: {_describe_report(report)}")
        elif kind == "warm":
            reason = str(raw.get("reason"))
            self.result.warm[observer] = reason
            event = SimulationEvent(seconds, observer, kind, reason=reason)
            if self.handoff:  # (without handoff: at the warm-up timeout, not worth showing)
                self.say(f"  {format_event(event, offset=offset)}")
        elif kind == "applied":
            event = SimulationEvent(seconds, observer, kind)
            # The receivers' own account of the handoff (kept: already loaded meanwhile).
            result = raw.get("result", {})
            run = self.run_data
            moved = int(result.get("applied", 0)) + int(result.get("kept_existing", 0))
            if run.sigterm_at is not None and seconds >= run.sigterm_at:
                run.applied_after_sigterm = seconds
            run.entries_moved += moved
            run.moved_per_node[observer] = run.moved_per_node.get(observer, 0) + moved
            for reason, count in result.get("dropped", {}).items():
                run.dropped[reason] = run.dropped.get(reason, 0) + int(count)
        else:
            event = SimulationEvent(seconds, observer, kind)
        self.result.events.append(event)
        # (node-ups are summed up by the full-mesh line)
        if kind in ("leaving", "node-down", "stopped"):
            self.say(f"  {format_event(event, offset=offset)}")
        return event

    def _shutdown(self) -> None:
        running = [proc for proc in self.procs.values() if proc.running]
        if running:
            self.say(f"  shutting down {_names([proc.name for proc in running])}")
        # Signal all first so that they stop in parallel; close() then waits and reaps.
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            proc.close(timeout=SHUTDOWN_TIMEOUT)
        self.result.nodes = [
            SimulatedNode(n.name, n.release, n.address, self.procs[n.name].returncode)
            for n in self.result.nodes
            if n.name in self.procs
        ]


def _names(names: Sequence[str]) -> str:
    """``node-b, node-c``, or ``node-b..node-e`` for more than two."""
    return ", ".join(names) if len(names) <= 2 else f"{names[0]}..{names[-1]}"


def _describe_report(report: dict[str, Any]) -> str:
    ns = report["namespaces"].get(NAMESPACE)
    if ns is None:
        return "nothing tracked"
    dropped = sum(ns["dropped"].values()) + sum(ns["receiver_dropped"].values())
    text = (
        f"{ns['records']} held, {ns['acknowledged']} acknowledged by "
        f"{', '.join(ns['successors']) or 'nobody'} in {ns['seconds']:.2f}s "
        f"({ns['bytes'] / 1e6:.1f} MB), {ns['snapshotted']} snapshotted, {dropped} dropped"
    )
    copies = ns.get("per_successor", {})
    if ns.get("spread") == "all" and copies:
        text += (
            " (copies to each: "
            + ", ".join(
                f"{peer} {counts['applied'] + counts['kept_existing']}"
                for peer, counts in sorted(copies.items())
            )
            + " held)"
        )
    return text


@contextlib.contextmanager
def _timed(result: SimulationResult | Comparison, started: float) -> Iterator[None]:
    try:
        yield
    finally:
        result.seconds = time.monotonic() - started


def _run_deploy(
    run: DeployRun, say: Callable[[str], None], *, unicode: bool, socket_dir: Path
) -> None:
    """One deploy under traffic; fills ``run`` (``run.deploy.ok`` / ``error``)."""
    simulation = _Simulation(run, say, unicode=unicode, socket_dir=socket_dir)
    result = run.deploy
    with _timed(result, simulation.started):
        try:
            simulation.run()
        except SimulationError as exc:
            result.error = str(exc)
            return
        except OSError as exc:
            result.error = f"cannot set up the local cluster: {exc}"
            return
    unclean = {n.name: n.exit_code for n in result.nodes if n.exit_code != 0}
    if unclean:
        result.error = f"nodes did not stop cleanly (exit codes {unclean})"
        return
    result.ok = True


def run_comparison(
    settings: DemoSettings | None = None,
    *,
    say: Callable[[str], None] | None = None,
    unicode: bool = False,
    socket_dir: Path | None = None,
) -> Comparison:
    """Run the deploy cold (no handoff), then warm (handoff), under the same traffic.

    ``say`` receives progress lines as they happen (bars drawn with block characters if
    ``unicode``). The nodes' control sockets go to ``socket_dir`` (made if missing), by
    default to a fresh temporary directory removed at the end. Never raises for a failed
    run: the comparison has ``ok`` false and ``error`` set (``KeyboardInterrupt`` still
    propagates, after every process has been stopped).
    """
    settings = settings or DemoSettings()
    tell = say or (lambda _line: None)
    comparison = Comparison(settings)
    with contextlib.ExitStack() as cleanup, _timed(comparison, time.monotonic()):
        if socket_dir is None:
            made = tempfile.mkdtemp(prefix="handoff-simulate-")
            cleanup.callback(shutil.rmtree, made, ignore_errors=True)
            socket_dir = Path(made)
        else:
            try:
                socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                comparison.error = f"cannot make the socket directory {socket_dir}: {exc}"
                return comparison
        for label, handoff in (("cold", False), ("warm", True)):
            run = DeployRun(label, handoff, settings)
            setattr(comparison, label, run)
            what = (
                f"{_STOPPED} drains its cache to the new nodes on SIGTERM"
                if handoff
                else f"{_STOPPED} is stopped without draining; the new nodes start empty"
            )
            tell(f"{label} run ({'with' if handoff else 'without'} handoff): {what}")
            _run_deploy(run, tell, unicode=unicode, socket_dir=socket_dir)
            if run.deploy.error is not None:
                comparison.error = f"{label} run: {run.deploy.error}"
                return comparison
    warm = comparison.warm
    assert warm is not None
    if warm.unaccounted:
        comparison.error = f"warm run: {warm.unaccounted} entries vanished in the handoff"
        return comparison
    comparison.ok = True
    return comparison


# -- showing the result ------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def render_table(comparison: Comparison) -> list[str]:
    """The numbers of both runs side by side."""
    cold, warm = comparison.cold, comparison.warm
    settings = comparison.settings
    window = settings.window_bins * BIN_SECONDS
    after = (settings.bins - settings.before_bins) * BIN_SECONDS
    runs = [cold, warm]

    def cells(get: Callable[[DeployRun], str]) -> list[str]:
        return ["-" if run is None else get(run) for run in runs]

    def handoff(run: DeployRun) -> str:
        seconds = run.handoff_seconds
        return "none" if seconds is None else duration(seconds)

    rows = [
        ("hit rate before the switch", cells(lambda r: _percent(r.before().hit_rate))),
        (f"hit rate, first {window:g} s after", cells(lambda r: _percent(r.window().hit_rate))),
        (f"hit rate, all {after:g} s after", cells(lambda r: _percent(r.after().hit_rate))),
        ("backend calls before the switch", cells(lambda r: f"{r.before().backend_calls}")),
        (
            f"backend calls, first {window:g} s after",
            cells(lambda r: f"{r.window().backend_calls}"),
        ),
        (f"backend calls, all {after:g} s after", cells(lambda r: f"{r.after().backend_calls}")),
        ("handoff", cells(handoff)),
        ("entries moved", cells(lambda r: f"{r.entries_moved} of {r.entries_before}")),
        ("entries lost", cells(_lost)),
        ("waited for warm new nodes", cells(_ready_wait)),
        ("stale reads after the handoff", cells(lambda r: _count(r.stale_reads))),
        ("stale reads in flight", cells(lambda r: _count(r.stale_reads_in_flight))),
    ]
    header = ("", ["cold: no handoff", "warm: handoff"])
    name_width = max(len(name) for name, _ in rows)
    widths = [max(len(row[1][i]) for row in (header, *rows)) + 3 for i in range(2)]
    return [
        f"{name:<{name_width}}{a:>{widths[0]}}{b:>{widths[1]}}" for name, (a, b) in (header, *rows)
    ]


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value}"


def _ready_wait(run: DeployRun) -> str:
    seconds = run.ready_wait_seconds
    if seconds is None:
        return "-"
    return duration(seconds) + (" (timed out)" if run.ready_wait_timed_out else "")


def _lost(run: DeployRun) -> str:
    if not run.handoff or not run.dropped:
        return f"{run.lost}"
    reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(run.dropped.items()))
    return f"{run.lost} ({reasons})"


def _columns(run: DeployRun, width: int) -> tuple[list[float | None], int, float]:
    """Hit rate per column (bins merged, or repeated, to fit ``width``), the switch's
    column, and the seconds a column stands for."""
    settings = run.settings
    before, total = settings.before_bins, settings.bins
    per = max(1, math.ceil(total / width))
    columns: list[float | None] = []
    # Merge from the switch outwards, so that no column straddles it.
    for stop in range(before, 0, -per):
        columns.insert(0, _sum(run.bins[max(0, stop - per) : stop]).hit_rate)
    switch = len(columns)
    for start in range(before, total, per):
        columns.append(_sum(run.bins[start : start + per]).hit_rate)
    repeat = max(1, width // len(columns))
    columns = [value for value in columns for _ in range(repeat)]
    return columns, switch * repeat, per * BIN_SECONDS / repeat


def render_chart(comparison: Comparison, *, unicode: bool = True, width: int = 32) -> list[str]:
    """The hit rate over time of both runs, as two bar charts side by side (text lines)."""
    runs = [run for run in (comparison.cold, comparison.warm) if run is not None]
    if not runs:
        return []
    rows = 8
    blocks = " ▁▂▃▄▅▆▇█" if unicode else " ..::||##"
    vertical, tick, corner, horizontal, mark = (
        ("│", "┤", "└", "─", "▲") if unicode else ("|", "+", "+", "-", "^")
    )
    panels: list[list[str]] = []
    titles = {"cold": "cold: no handoff", "warm": "warm: handoff"}
    seconds = BIN_SECONDS
    for run in runs:
        columns, switch, seconds = _columns(run, width)
        levels = [None if v is None else round(max(0.0, min(1.0, v)) * rows * 8) for v in columns]
        lines = [f"     {titles.get(run.label, run.label):<{len(columns) + 1}}"]
        for row in range(rows):
            floor_level = (rows - 1 - row) * 8
            label = {0: "100%", rows // 2: " 50%"}.get(row, "")
            text = "".join(
                " " if level is None else blocks[max(0, min(8, level - floor_level))]
                for level in levels
            )
            lines.append(f"{label:>4} {tick if label else vertical}{text}")
        axis = [horizontal] * len(columns)
        if switch < len(axis):
            axis[switch] = mark
        lines.append(f"  0% {corner}{''.join(axis)}")
        before = run.settings.before_bins * BIN_SECONDS
        after = (run.settings.bins - run.settings.before_bins) * BIN_SECONDS
        # Under the first column, the switch and the last column, where there is room.
        scale = _scale(
            len(columns) + 1,
            [(1, f"-{before:g}s"), (switch + 1, "0"), (len(columns), f"+{after:g}s")],
        )
        lines.append("     " + scale)
        panels.append(lines)
    panel_width = max(len(line) for panel in panels for line in panel)
    out = [
        f"cache hit rate (a column is {seconds:g} s; {mark} is the switch: traffic to the new "
        f"nodes, SIGTERM to {_STOPPED})"
    ]
    for parts in zip(*panels, strict=True):
        out.append("   ".join(part.ljust(panel_width) for part in parts).rstrip())
    return out


def _scale(width: int, labels: Sequence[tuple[int, str]]) -> str:
    """A line of ``width`` characters with each label centred on its position, shifted to
    fit, and left out where it would touch one placed before."""
    line = [" "] * width
    taken = -2
    for position, text in labels:
        begin = max(0, min(width - len(text), position - len(text) // 2))
        if begin <= taken + 1 or begin + len(text) > width:
            continue
        line[begin : begin + len(text)] = list(text)
        taken = begin + len(text) - 1
    return "".join(line)


_SVG_COLORS = {"cold": "#d9480f", "warm": "#1971c2"}


def _nice_step(span: float, ticks: int) -> float:
    raw = span / max(1, ticks)
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude  # pragma: no cover - the loop always returns


def render_svg(comparison: Comparison) -> str:
    """An SVG document: hit rate and backend calls per second over time, both runs."""
    settings = comparison.settings
    runs = [run for run in (comparison.cold, comparison.warm) if run is not None]
    width, height = 900, 650
    left, right = 80, 30
    panels = [("cache hit rate", 96, 230), ("backend calls per second", 386, 170)]
    t0 = -settings.before_bins * BIN_SECONDS
    t1 = (settings.bins - settings.before_bins) * BIN_SECONDS
    plot_width = width - left - right

    def x(t: float) -> float:
        return left + (t - t0) / (t1 - t0) * plot_width

    calls_max = max(
        (one.backend_calls / BIN_SECONDS for run in runs for one in run.bins), default=0.0
    )
    calls_step = _nice_step(max(calls_max, 1.0), 4)
    calls_top = max(calls_step, math.ceil(calls_max / calls_step) * calls_step)
    parts: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        "<title>handoff simulate: a blue-green deploy without and with handoff</title>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="24" font-size="16" font-weight="bold">'
        f"{escape('A blue-green deploy, without handoff (cold) and with handoff (warm)')}"
        "</text>",
        f'<text x="{left}" y="44" fill="#555">'
        + escape(
            f"{_STOPPED} (old release, {settings.entries} warm entries) replaced by "
            f"{settings.nodes} new node{'s' if settings.nodes != 1 else ''}, balanced by "
            f"{settings.balance}"
        )
        + "</text>",
        f'<text x="{left}" y="60" fill="#555">'
        + escape(
            f"{settings.rate:g} requests/s for Zipf keys (s={ZIPF_EXPONENT:g}) over "
            f"{settings.keys} keys; a miss is a backend call of {BACKEND_DELAY * 1000:g} ms"
        )
        + "</text>",
    ]
    step = _nice_step(t1 - t0, 10)
    for title, top, size in panels:
        is_rate = title == "cache hit rate"
        bottom = top + size
        parts.append(f'<text x="{left}" y="{top - 8}" font-weight="bold">{escape(title)}</text>')
        y_ticks = (
            [0.0, 0.25, 0.5, 0.75, 1.0]
            if is_rate
            else [calls_step * i for i in range(round(calls_top / calls_step) + 1)]
        )
        y_top = 1.0 if is_rate else calls_top

        def y(
            value: float, bottom: float = bottom, size: float = size, y_top: float = y_top
        ) -> float:
            return bottom - value / y_top * size

        for value in y_ticks:
            label = f"{value:.0%}" if is_rate else f"{value:g}"
            parts.append(
                f'<line x1="{left}" y1="{y(value):.1f}" x2="{width - right}" y2="{y(value):.1f}" '
                'stroke="#e6e6e6"/>'
            )
            parts.append(
                f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end" fill="#555">'
                f"{escape(label)}</text>"
            )
        tick = math.ceil(t0 / step) * step
        while tick <= t1 + 1e-9:
            parts.append(
                f'<text x="{x(tick):.1f}" y="{bottom + 16}" text-anchor="middle" fill="#555">'
                f"{_signed(tick)} s</text>"
            )
            tick += step
        parts.append(
            f'<line x1="{x(0):.1f}" y1="{top}" x2="{x(0):.1f}" y2="{bottom}" stroke="#333" '
            'stroke-dasharray="4 3"/>'
        )
        parts.append(
            f'<rect x="{left}" y="{top}" width="{plot_width}" height="{size}" fill="none" '
            'stroke="#999"/>'
        )
        for run in runs:
            segments: list[list[str]] = [[]]
            for index, one in enumerate(run.bins):
                t = (index - settings.before_bins + 0.5) * BIN_SECONDS
                point = one.hit_rate if is_rate else one.backend_calls / BIN_SECONDS
                if point is None:
                    segments.append([])
                    continue
                segments[-1].append(f"{x(t):.1f},{y(point):.1f}")
            for points in segments:
                if points:
                    parts.append(
                        f'<polyline points="{" ".join(points)}" fill="none" '
                        f'stroke="{_SVG_COLORS.get(run.label, "#333")}" stroke-width="2"/>'
                    )
    parts.append(
        f'<text x="{x(0) + 6:.1f}" y="{panels[0][1] + 14}" fill="#333">'
        f"{escape(f'switch: SIGTERM to {_STOPPED}')}</text>"
    )
    legend_y = panels[0][1] + panels[0][2] - 40
    for offset, run in enumerate(runs):
        color = _SVG_COLORS.get(run.label, "#333")
        name = "cold: no handoff" if run.label == "cold" else "warm: handoff"
        ly = legend_y + offset * 18
        parts.append(
            f'<line x1="{width - right - 170}" y1="{ly}" x2="{width - right - 145}" y2="{ly}" '
            f'stroke="{color}" stroke-width="3"/>'
        )
        parts.append(f'<text x="{width - right - 138}" y="{ly + 4}">{escape(name)}</text>')
    for offset, line in enumerate(_headline(comparison)):
        parts.append(f'<text x="{left}" y="{610 + offset * 16}">{escape(line)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _signed(value: float) -> str:
    return "0" if abs(value) < 1e-9 else f"{value:+g}"


def _headline(comparison: Comparison) -> list[str]:
    cold, warm = comparison.cold, comparison.warm
    if cold is None or warm is None:
        return []
    window = comparison.settings.window_bins * BIN_SECONDS
    lines = [
        f"hit rate in the first {window:g} s after the switch: cold "
        f"{_percent(cold.window().hit_rate)}, warm {_percent(warm.window().hit_rate)}; "
        f"backend calls after the switch: cold {cold.after().backend_calls}, warm "
        f"{warm.after().backend_calls}"
    ]
    seconds = warm.handoff_seconds
    lines.append(
        f"handoff: {warm.entries_moved} of {warm.entries_before} entries moved"
        + ("" if seconds is None else f" in {duration(seconds)}")
        + f", {warm.lost} lost; without handoff all {cold.entries_before} were lost"
    )
    return lines


# -- the command line ------------------------------------------------------------------------------

SIMULATE_HELP = "run a local blue-green deploy under traffic, without and with handoff"

SIMULATE_DESCRIPTION = "\n\n".join(
    textwrap.fill(" ".join(paragraph.split()), 88)
    for paragraph in (
        """Run a local blue-green deploy twice, with real processes and real sockets: without
        handoff (cold) and with it (warm), under the same synthetic traffic, and compare.""",
        f"""Starts a DNS server on 127.0.0.1 and node processes that discover each other
        through it: node-a of the old release v1, holding a full TTLCache of the hottest keys,
        and N nodes of the new release v2 with empty ones, on 127.0.0.2, 127.0.0.3 and so on
        (from --host-base), with control sockets in --socket-dir.
        The nodes serve requests themselves, for keys drawn from a Zipf distribution over
        {KEY_SPACE_FACTOR}x as many keys as the cache holds, through the cache in front of a
        slow backend: a miss is a backend call of {BACKEND_DELAY * 1000:g} ms. First node-a
        serves everything. At the switch the balancer sends the traffic to the new nodes, each
        key to one node (or round-robin, with --balance), and node-a gets SIGTERM: in the cold
        run it stops without draining and the new nodes warm up from the backend; in the warm
        run it drains its cache to the new nodes: split by key as the key balancer splits
        requests, or a copy of every key to each new node (--spread all, the default with
        round-robin).""",
        """Shows progress, then the hit rate over time of both runs side by side, backend
        calls before, during and after the deploy, handoff seconds and entries moved and lost.
        Exits 0 if both runs completed and the handoff accounted for every entry, 1 (saying
        what went wrong) otherwise, 2 for bad arguments. Needs the loopback addresses
        127.0.0.2 and up (present on Linux); two runs at once on one host need --host-base
        ranges that do not overlap. Takes about 2 x (S + 2) seconds.""",
    )
)


def _number(text: str, kind: Callable[[str], float], low: float, high: float, what: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what} from {low:g} to {high:g}")
    return value


def _seconds_arg(text: str) -> float:
    return _number(text, float, MIN_SECONDS, MAX_SECONDS, "a number of seconds")


def _rate_arg(text: str) -> float:
    return _number(text, float, MIN_RATE, MAX_RATE, "a number of requests per second")


def _nodes_arg(text: str) -> int:
    return int(_number(text, int, 1, MAX_NODES, "a whole number of nodes"))


def _entries_arg(text: str) -> int:
    return int(_number(text, int, 1, MAX_ENTRIES, "a whole number of entries"))


def _host_base_arg(text: str) -> str:
    # Room for the nodes depends on --nodes too: checked again once both are known.
    problem = host_base_problem(text.strip(), 1)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem.removeprefix("--host-base "))
    return text.strip()


def _plot_arg(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() != ".svg":
        raise argparse.ArgumentTypeError(
            f"{text!r}: the chart is written as SVG only, so the file name must end in .svg"
        )
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: no directory {str(path.parent)!r}")
    return path


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` (the ``simulate`` sub-command's) its description and options."""
    parser.description = SIMULATE_DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--nodes",
        type=_nodes_arg,
        default=DEMO_NODES,
        metavar="N",
        help=f"nodes of the new release (default {DEMO_NODES}, at most {MAX_NODES})",
    )
    parser.add_argument(
        "--entries",
        type=_entries_arg,
        default=DEMO_ENTRIES,
        metavar="M",
        help=f"entries in the old node's (full) cache (default {DEMO_ENTRIES})",
    )
    parser.add_argument(
        "--seconds",
        type=_seconds_arg,
        default=DEMO_SECONDS,
        metavar="S",
        help=f"seconds of traffic per run, a quarter of it before the switch (default "
        f"{DEMO_SECONDS:g})",
    )
    parser.add_argument(
        "--rate",
        type=_rate_arg,
        default=DEMO_RATE,
        metavar="R",
        help=f"requests per second, all nodes together (default {DEMO_RATE:g})",
    )
    parser.add_argument(
        "--balance",
        choices=BALANCES,
        default="key",
        help="how the balancer spreads requests over the new nodes: by key (each key to "
        "one node, the split the drain makes) or round-robin (default key)",
    )
    parser.add_argument(
        "--host-base",
        type=_host_base_arg,
        default=DEFAULT_HOST_BASE,
        metavar="ADDRESS",
        help=f"loopback IPv4 address of the old node; the new nodes take the following "
        f"ones (default {DEFAULT_HOST_BASE}). Runs at once on one host need bases whose "
        "address ranges do not overlap, e.g. 127.0.10.1 and 127.0.20.1",
    )
    parser.add_argument(
        "--socket-dir",
        type=Path,
        metavar="DIR",
        help="directory for the nodes' control sockets, NODE.sock (made if missing; "
        "default: a fresh temporary directory, removed at the end)",
    )
    parser.add_argument(
        "--spread",
        choices=SPREADS,
        default=None,
        help="how the drain places keys on the new nodes: split (each key to one node) or "
        "all (every node gets every key); default split with --balance key, all with "
        "round-robin",
    )
    parser.add_argument(
        "--precopy",
        action="store_true",
        help="in the warm run, node-a pre-copies its cache to each new node as it comes up "
        "(HANDOFF_PRECOPY=on) and drains only what changed since; the traffic starts once "
        f"every new node reports warm (at most {READY_TIMEOUT:g} s later)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (settings, hit rates, backend calls, handoff, stale reads, the "
        "series of both runs) instead of progress, chart and table",
    )
    parser.add_argument(
        "--plot",
        type=_plot_arg,
        metavar="FILE.svg",
        help="also write the charts (hit rate and backend calls over time) to FILE.svg; "
        "SVG only (no PNG: that would need a plotting dependency)",
    )


def _can_encode(stream: TextIO, text: str) -> bool:
    try:
        text.encode(stream.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _explain(settings: DemoSettings) -> list[str]:
    spread = settings.drain_spread
    if settings.balance == "key":
        if spread == "all":
            return [
                "The balancer routes by key, as a consistent-hash balancer does, and the drain",
                "(--spread all) gave every new node every key: each request finds its entry,",
                "at the cost of sending the cache once per new node.",
            ]
        return [
            "The balancer routes by key, as a consistent-hash balancer does: each key goes to",
            "one new node, the one the drain sent it to (the same rendezvous hashing), so",
            "with handoff every request finds its entry where it lands. With --balance",
            "round-robin every node sees every key, and the drain copies every key to each.",
        ]
    if spread == "split":
        return [
            "The balancer spreads requests round-robin: every new node sees every key, but",
            "the drain (--spread split) gave each key to one node, so right after the switch",
            "a request finds its entry only on the node that received it. The default spread",
            "for round-robin, all, copies every key to each new node.",
        ]
    return [
        "The balancer spreads requests round-robin: every new node sees every key, and the",
        "drain (spread all) gave every new node every key, so a request finds its entry",
        "wherever it lands. With --spread split each node would hold only its share.",
    ]


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``handoff simulate`` with parsed arguments; print the output; the exit code."""
    # The one check of its own that involves two options (--host-base and --nodes).
    problem = host_base_problem(args.host_base, args.nodes + 1)
    if problem is not None:
        print(f"handoff simulate: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    settings = DemoSettings(
        nodes=args.nodes,
        entries=args.entries,
        seconds=args.seconds,
        rate=args.rate,
        balance=args.balance,
        host_base=args.host_base,
        spread=args.spread,
        precopy=args.precopy,
    )
    out = sys.stdout
    progress: TextIO | None = (
        out if not args.json else (sys.stderr if sys.stderr.isatty() else None)
    )
    unicode = progress is not None and _can_encode(progress, "█▏·")

    def say(line: str) -> None:
        if progress is not None:
            print(line, file=progress, flush=True)

    comparison = run_comparison(settings, say=say, unicode=unicode, socket_dir=args.socket_dir)
    plot: Path | None = args.plot
    plot_error: str | None = None
    if plot is not None and comparison.cold is not None and comparison.warm is not None:
        try:
            plot.write_text(render_svg(comparison), encoding="utf-8")
            comparison.plot = str(plot)
        except OSError as exc:
            plot_error = f"cannot write {str(plot)!r}: {exc}"
    if args.json:
        print(json.dumps(comparison.as_dict(), indent=2), file=out)
    elif comparison.cold is not None and comparison.warm is not None and comparison.ok:
        print(file=out)
        for line in render_chart(comparison, unicode=_can_encode(out, "█▁│┤└─▲")):
            print(line, file=out)
        print(file=out)
        for line in render_table(comparison):
            print(line, file=out)
        print(file=out)
        for line in [*_explain(settings), "", *_headline(comparison)]:
            print(line, file=out)
        if comparison.plot is not None:
            print(f"chart written to {comparison.plot}", file=out)
        print(f"done in {duration(comparison.seconds)}", file=out)
    if not comparison.ok:
        print(f"handoff simulate: error: {comparison.error}", file=sys.stderr)
        return 1
    if plot_error is not None:
        print(f"handoff simulate: error: {plot_error}", file=sys.stderr)
        return 1
    return 0
