"""A cluster of many node processes on loopback, for tests/test_scale.py and
benchmarks/scale.py.

Every node is its own process (own event loop, sockets, GIL) on its own loopback address
(``127.0.G.N``: generation ``G`` of a rolling deploy, node ``N``), all on one port, found
through a real DNS server (:class:`handoff.testing.DNSResponder`, ``dns:NAME:PORT``).
The processes are forked from a multiprocessing fork server that has imported ``handoff``
once: importing it costs about 0.7 s of CPU per process, and 32 cold starts on two cores
would measure the interpreter, not the mesh. (Real nodes start on machines of their own.)

Each node holds a ``cachetools.TTLCache`` and a ``handoff.Counters`` filled from its
:class:`Fill` (what :func:`written` computes in the parent too), tracked with the real
adapters. It reports over a pipe, in order: ``listening``, ``poll`` (each discovery poll:
how many distinct hosts it found), ``node-up`` / ``node-down``, ``drained`` (the report),
``stats`` (on request: its peers, cache and counters) and ``stopped``. SIGTERM (the
platform's stop) drains, then stops. A node whose parent goes away (the pipe closes) stops.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import anyio
import anyio._backends._asyncio  # loaded once by the fork server, not by every node
import anyio.from_thread
import anyio.lowlevel
import cachetools

import handoff
import handoff.node as node_module
from handoff._keys import cluster_key
from handoff.discovery import Discovery, PeerAddress
from handoff.membership import DownReason, Peer

__all__ = (
    "CLUSTER",
    "COOKIE",
    "DNS_NAME",
    "Fill",
    "Member",
    "ScaleCluster",
    "written",
)

CLUSTER = "scale"
COOKIE = "Qm7vR2xK9pLwT4nZ8cYb3HdF6sJ1gA5e"  # generated: a typed one draws a warning
DNS_NAME = "scale.test"
CACHE_TTL = 3600.0
COUNTER_KEYS = 16
"""Counter keys shared by every node (``c0`` ... ``c15``): handoffs merge them."""

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload([__name__])
# The stretched cookie (scrypt, ~70 ms and 16 MiB once per process), computed here once:
# imported by the fork server, so every node forked from it starts with it cached.
cluster_key(COOKIE.encode(), CLUSTER)


# -- what a node writes ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fill:
    """What a node writes at start: ``entries`` cache entries ``f"{prefix}{j}"`` and as
    many increments of the shared counters."""

    prefix: str
    entries: int


def written(fill: Fill) -> tuple[dict[str, str], dict[str, int]]:
    """The cache entries and counter totals a node started with ``fill`` holds."""
    cache = {f"{fill.prefix}{j}": f"{fill.prefix}:{j}" for j in range(fill.entries)}
    counters: dict[str, int] = {}
    for j in range(fill.entries):
        key = f"c{(j * 7 + len(fill.prefix) + sum(map(ord, fill.prefix))) % COUNTER_KEYS}"
        counters[key] = counters.get(key, 0) + j % 5 + 1
    return cache, counters


# -- the node process -----------------------------------------------------------------------


class _CountingDiscovery:
    """The node's real discovery; every poll is reported (the hosts it found)."""

    def __init__(self, inner: Discovery, emit: Callable[[dict[str, Any]], None]) -> None:
        self._inner = inner
        self._emit = emit

    def describe(self) -> str:
        return self._inner.describe()

    async def discover(self) -> list[PeerAddress]:
        try:
            found = await self._inner.discover()
        except Exception:
            self._emit({"event": "poll", "hosts": None})  # failed: a poll all the same
            raise
        self._emit({"event": "poll", "hosts": len({address.host for address in found})})
        return found


def node_main(environ: dict[str, str], fill: Fill, conn: Connection) -> None:
    """Run one node until SIGTERM (drain, then stop) or until ``conn`` closes."""
    send_lock = threading.Lock()

    def emit(event: dict[str, Any]) -> None:
        with send_lock, contextlib.suppress(OSError):
            conn.send(event)

    real: Callable[..., Discovery] = getattr(node_module, "make_discovery")  # noqa: B009

    def counting(*args: Any, **kwargs: Any) -> Discovery:
        return _CountingDiscovery(real(*args, **kwargs), emit)

    # Only to observe polls: the discovery itself stays the product's own.
    setattr(node_module, "make_discovery", counting)  # noqa: B010
    anyio.run(_run_node, environ, fill, conn, emit)


async def _run_node(
    environ: dict[str, str],
    fill: Fill,
    conn: Connection,
    emit: Callable[[dict[str, Any]], None],
) -> None:
    cache_items, counter_totals = written(fill)
    cache: cachetools.TTLCache[str, str] = cachetools.TTLCache(maxsize=1_000_000, ttl=CACHE_TTL)
    cache.update(cache_items)
    usage = handoff.Counters()
    for key, amount in counter_totals.items():
        usage.incr(key, amount)
    node = handoff.Node(environ=environ)
    node.track("cache", cache)
    node.track("usage", usage)

    def peer_event(kind: str) -> Callable[..., None]:
        def callback(peer: Peer, reason: DownReason | None = None) -> None:
            why = None if reason is None else str(reason)
            emit({"event": kind, "peer": peer.name, "reason": why})

        return callback

    node.on_node_up(peer_event("node-up"))
    node.on_node_down(peer_event("node-down"))
    commands_in, commands = anyio.create_memory_object_stream[str](100)
    token = anyio.lowlevel.current_token()

    def read_commands() -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                command = conn.recv()
                with contextlib.suppress(anyio.RunFinishedError, RuntimeError):
                    anyio.from_thread.run_sync(commands_in.send_nowait, command, token=token)
        os.kill(os.getpid(), signal.SIGTERM)  # the parent is gone: stop

    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        await node.start()
        emit({"event": "listening", "name": node.name, "address": node.address, "pid": os.getpid()})
        threading.Thread(target=read_commands, daemon=True).start()
        async with anyio.create_task_group() as tasks:

            async def serve() -> None:
                async for command in commands:
                    if command == "stats":
                        emit(
                            {
                                "event": "stats",
                                "peers": [peer.name for peer in node.peers()],
                                "cache": dict(cache.items()),
                                "counters": {key: usage[key] for key in usage},
                            }
                        )

            tasks.start_soon(serve)
            async for _ in signals:
                break
            report = await node.drain()
            emit({"event": "drained", "report": report.as_dict()})
            tasks.cancel_scope.cancel()
        await node.stop()
    emit({"event": "stopped"})


# -- the parent's side ------------------------------------------------------------------------


@dataclass
class Member:
    """One node process as the parent sees it."""

    name: str
    host: str
    release: str
    fill: Fill
    process: Any
    conn: Connection
    started_at: float
    events: list[dict[str, Any]] = field(default_factory=list)
    peers: set[str] = field(default_factory=set)
    pid: int = 0

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        """The events of one kind so far."""
        return [event for event in self.events if event["event"] == kind]


class ScaleCluster:
    """Node processes of one cluster behind one DNS name; every process is ended on
    :meth:`close` (also after a failure).

    ``environ`` adds ``HANDOFF_*`` settings (poll interval, heartbeat timeout ...) to what
    every node gets. The DNS name starts empty: :meth:`publish` puts addresses in it.
    """

    def __init__(self, dns: Any, port: int, environ: Mapping[str, str] | None = None) -> None:
        self.dns = dns
        self.port = port
        self.environ = dict(environ or {})
        self.members: dict[str, Member] = {}
        self._cond = threading.Condition()
        self._published: list[str] = []

    # -- processes --------------------------------------------------------------------------

    def start(self, name: str, host: str, release: str, fill: Fill) -> Member:
        """Fork one node process (returns at once; see :meth:`wait`)."""
        environ = {
            "HANDOFF_COOKIE": COOKIE,
            "HANDOFF_CLUSTER": CLUSTER,
            "HANDOFF_NODE_NAME": name,
            "HANDOFF_RELEASE": release,
            "HANDOFF_BIND": f"{host}:{self.port}",
            "HANDOFF_DISCOVERY": f"dns:{DNS_NAME}:{self.port}",
            "HANDOFF_DNS_SERVER": self.dns.server_spec,
            # Many nodes on one machine: the CLI's default socket would be shared.
            "HANDOFF_CONTROL_SOCKET": "none",
            **self.environ,
        }
        parent, child = _CONTEXT.Pipe()
        process = _CONTEXT.Process(
            target=node_main, args=(environ, fill, child), name=name, daemon=True
        )
        member = Member(name, host, release, fill, process, parent, time.monotonic())
        with self._cond:
            self.members[name] = member
        process.start()
        child.close()
        threading.Thread(target=self._read, args=(member,), daemon=True).start()
        return member

    def _read(self, member: Member) -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                event = member.conn.recv()
                event["received_at"] = time.monotonic()
                with self._cond:
                    member.events.append(event)
                    kind = event["event"]
                    if kind == "node-up":
                        member.peers.add(event["peer"])
                    elif kind == "node-down":
                        member.peers.discard(event["peer"])
                    elif kind == "listening":
                        member.pid = event["pid"]
                    self._cond.notify_all()
        with self._cond:
            member.events.append({"event": "closed", "received_at": time.monotonic()})
            self._cond.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait until ``predicate()`` (called under the lock) holds; TimeoutError naming
        ``what`` and every member's peer count otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    counts = {name: len(m.peers) for name, m in self.members.items()}
                    raise TimeoutError(f"no {what} within {timeout:g} s; peers: {counts}")
                self._cond.wait(left)

    def listening(self, members: Iterable[Member]) -> bool:
        """Every one of ``members`` listens (call under :meth:`wait`)."""
        return all(m.of_kind("listening") for m in members)

    def meshed(self, members: Sequence[Member]) -> bool:
        """Each of ``members`` has every other one as an authenticated peer."""
        names = {m.name for m in members}
        return all(names - {m.name} <= m.peers for m in members)

    def linked(self, members: Sequence[Member], others: Sequence[Member]) -> bool:
        """Each of ``members`` and each of ``others`` (but itself and its own batch) are
        peers of each other."""
        batch = {m.name for m in members}
        return all(
            o.name in m.peers and m.name in o.peers
            for m in members
            for o in others
            if o.name not in batch
        )

    def publish(self, members: Iterable[Member]) -> None:
        """Make the DNS name answer exactly the hosts of ``members``."""
        self._published = sorted(m.host for m in members)
        self.dns.set_a(DNS_NAME, self._published)

    def stats(self, member: Member, timeout: float = 30.0) -> dict[str, Any]:
        """The node's peers, cache and counters, asked over its pipe."""
        with self._cond:
            mark = len(member.events)
        member.conn.send("stats")
        self.wait(
            lambda: any(e["event"] == "stats" for e in member.events[mark:]),
            timeout,
            f"stats from {member.name}",
        )
        with self._cond:
            return next(e for e in member.events[mark:] if e["event"] == "stats")

    def stop(self, members: Sequence[Member], timeout: float = 60.0) -> list[dict[str, Any]]:
        """SIGTERM ``members`` at once (each drains, then stops); their drain reports."""
        for member in members:
            os.kill(member.process.pid, signal.SIGTERM)
        self.wait(
            lambda: all(m.of_kind("stopped") or m.of_kind("closed") for m in members),
            timeout,
            "stop of " + ", ".join(m.name for m in members),
        )
        for member in members:
            member.process.join(timeout)
            member.conn.close()
            with self._cond:
                del self.members[member.name]
        return [report for m in members for report in _reports(m)]

    def close(self) -> None:
        """End every process that is left (SIGKILL: nothing is checked any more)."""
        for member in list(self.members.values()):
            if member.process.is_alive():
                member.process.kill()
        for member in list(self.members.values()):
            member.process.join(10)
            member.conn.close()
        self.members.clear()


def _reports(member: Member) -> list[dict[str, Any]]:
    return [event["report"] for event in member.of_kind("drained")]


@contextlib.contextmanager
def scale_cluster(
    dns: Any, port: int, environ: Mapping[str, str] | None = None
) -> Iterator[ScaleCluster]:
    """A :class:`ScaleCluster` that is closed however the block ends."""
    cluster = ScaleCluster(dns, port, environ)
    try:
        yield cluster
    finally:
        cluster.close()


# -- joining and rolling deploys ------------------------------------------------------------


def host_of(generation: int, index: int) -> str:
    """The loopback address of node ``index`` of deploy generation ``generation``."""
    return f"127.0.{generation}.{index + 2}"


def name_of(generation: int, index: int) -> str:
    """``g1n07``: the node name (its cache keys are ``g1n07x0``, ``g1n07x1`` ...)."""
    return f"g{generation}n{index:02d}"


def start_generation(
    cluster: ScaleCluster, generation: int, indexes: Iterable[int], entries: int
) -> list[Member]:
    """Start nodes ``indexes`` of release ``v{generation}``, each writing ``entries``."""
    return [
        cluster.start(
            name_of(generation, index),
            host_of(generation, index),
            f"v{generation}",
            Fill(f"{name_of(generation, index)}x", entries),
        )
        for index in indexes
    ]


@dataclass(frozen=True, slots=True)
class Joined:
    """How one node reached the full mesh."""

    name: str
    at: float
    """When the event that completed its peers arrived (parent's monotonic clock)."""
    full_polls: int
    """Its discovery polls before that event, counted from the first one that found every
    node (that one included; failed polls count too): 0 if the others' dials made its
    mesh before it found them all itself."""


def joined(member: Member, names: set[str]) -> Joined | None:
    """When ``member`` first had every one of ``names`` (but itself) as a peer, and how
    many polls it had made by then from the first that found all of them (its own events
    are in order)."""
    wanted = names - {member.name}
    peers: set[str] = set()
    polls = 0
    for event in member.events:
        kind = event["event"]
        if kind == "poll" and (polls or (event["hosts"] or 0) >= len(names)):
            polls += 1
        elif kind == "node-up":
            peers.add(event["peer"])
        elif kind == "node-down":
            peers.discard(event["peer"])
        if wanted <= peers:
            return Joined(member.name, float(event["received_at"]), polls)
    return None


def join(cluster: ScaleCluster, members: Sequence[Member], timeout: float) -> dict[str, Any]:
    """Wait until ``members`` listen, put them in DNS at once, wait for the full mesh.

    Returns the times (seconds, parent's clock) from the last process start and from the
    DNS change to the last node's full mesh, and every node's :class:`Joined`.
    """
    cluster.wait(lambda: cluster.listening(members), timeout, "listening")
    with cluster._cond:
        listening_at = max(float(m.of_kind("listening")[0]["received_at"]) for m in members)
    published_at = time.monotonic()
    cluster.publish(members)
    cluster.wait(lambda: cluster.meshed(members), timeout, "full mesh")
    names = {m.name for m in members}
    with cluster._cond:
        done = [joined(m, names) for m in members]
    assert all(d is not None for d in done)
    result = [d for d in done if d is not None]
    last = max(d.at for d in result)
    return {
        "last_start": max(m.started_at for m in members),
        "listening_at": listening_at,
        "published_at": published_at,
        "meshed_at": last,
        "joined": result,
    }


@dataclass
class Step:
    """One step of a rolling deploy."""

    replaced: list[str]
    seconds: float
    join_seconds: float
    drain_seconds: float
    reports: list[dict[str, Any]]


def rolling_deploy(
    cluster: ScaleCluster,
    old: Sequence[Member],
    generation: int,
    batch: int,
    *,
    others: Sequence[Member] = (),
    timeout: float = 60.0,
    publish_early: bool = False,
) -> tuple[list[Member], list[Step]]:
    """Replace ``old`` by release ``v{generation}``, ``batch`` at a time, the Kubernetes
    way (``maxSurge=batch, maxUnavailable=0``): start the new nodes (they write nothing),
    wait until they and every live node but their batch-mates are peers, put them in DNS,
    take the old ones out of DNS and SIGTERM them together (each drains to its successors,
    then stops).
    ``others`` stay throughout. Returns the new nodes and the steps.

    ``publish_early`` puts the new nodes in DNS as soon as they listen instead: the old
    nodes' next poll may then dial a new node while its own dial to them is still in its
    handshake, and the duplicate-link tie-break can close the link a drain streams on
    (see the README's Scale section: counters may count twice)."""
    live = [*others, *old]
    new: list[Member] = []
    steps: list[Step] = []
    for first in range(0, len(old), batch):
        leaving = list(old[first : first + batch])
        started = time.monotonic()
        indexes = [int(m.name.rpartition("n")[2]) for m in leaving]
        fresh = start_generation(cluster, generation, indexes, entries=0)
        cluster.wait(lambda fresh=fresh: cluster.listening(fresh), timeout, "listening")  # type: ignore[misc]
        live += fresh
        new += fresh
        everyone = list(live)
        if publish_early:
            cluster.publish(live)
        # The new nodes dialled every node in DNS at their first poll: linked to all of
        # them, they are ready, so in DNS now (a Kubernetes Service lists a pod once its
        # readiness probe passes), where the new ones of one batch find each other at
        # their next poll. The old ones need not wait for that: they see every new node.
        cluster.wait(lambda: cluster.linked(fresh, everyone), timeout, "new nodes linked")  # noqa: B023
        cluster.publish(live)
        meshed = time.monotonic()
        live = [m for m in live if m not in leaving]
        cluster.publish(live)  # a terminating pod leaves the service's DNS first
        reports = cluster.stop(leaving, timeout)
        done = time.monotonic()
        steps.append(
            Step(
                [m.name for m in leaving], done - started, meshed - started, done - meshed, reports
            )
        )
    return new, steps


def lost_in(reports: Iterable[dict[str, Any]]) -> dict[str, int]:
    """What drain reports say did not reach a serving successor."""
    totals = {"records": 0, "acknowledged": 0, "snapshotted": 0, "lost": 0, "in_doubt": 0}
    for report in reports:
        for key in totals:
            totals[key] += int(report[key])
    return totals


def check_state(
    cluster: ScaleCluster, members: Sequence[Member], fills: Iterable[Fill]
) -> dict[str, Any]:
    """Compare what ``members`` hold now with what ``fills`` wrote: the union of their
    caches against every written entry, and their counters summed against every
    increment."""
    cache: dict[str, str] = {}
    counters: dict[str, int] = {}
    for fill in fills:
        entries, totals = written(fill)
        cache.update(entries)
        for key, amount in totals.items():
            counters[key] = counters.get(key, 0) + amount
    held: dict[str, str] = {}
    held_counters: dict[str, int] = {}
    copies = 0
    for member in members:
        stats = cluster.stats(member)
        copies += len(stats["cache"])
        held.update(stats["cache"])
        for key, amount in stats["counters"].items():
            held_counters[key] = held_counters.get(key, 0) + amount
    return {
        "cache_written": len(cache),
        "cache_copies_held": copies,
        "cache_missing": len(cache.keys() - held.keys()),
        "cache_wrong": sum(1 for key, value in held.items() if cache.get(key) != value),
        "counters_written": sum(counters.values()),
        "counters_held": sum(held_counters.values()),
        "counters_exact": held_counters == {k: v for k, v in counters.items() if v},
    }
