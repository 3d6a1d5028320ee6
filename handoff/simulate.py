"""``handoff simulate``: a local cluster of real node processes going through a release.

It starts a DNS server on loopback and three node processes that find each other through
it: ``node-a`` of the old release ``v1``, holding a warm ``TTLCache`` of ``entries`` entries,
and ``node-b`` and ``node-c`` of the new release ``v2`` with empty caches, on 127.0.0.2,
127.0.0.3 and 127.0.0.4. It shows each node-up as it happens, stops the old node with
SIGTERM as a deploy would, so that it drains its cache to the new nodes, shows the drain
report, what each new node now holds and the node-down the other two see, then shuts
everything down. Every step has a time bound; anything missing is a
:class:`SimulationError` naming what did not happen.
"""

from __future__ import annotations

import contextlib
import json
import queue
import secrets
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from handoff.testing import STATE_ENV, DNSResponder, NodeProcess, free_port_on_all

__all__ = (
    "DEFAULT_ENTRIES",
    "DEFAULT_SECONDS",
    "SimulatedNode",
    "SimulationError",
    "SimulationEvent",
    "SimulationResult",
    "run_simulation",
)

#: The default time bound of the whole simulation, shutdown excluded.
DEFAULT_SECONDS = 30.0
#: Entries in the old node's cache by default.
DEFAULT_ENTRIES = 50_000

NAMESPACE = "cache"
DRAIN_TIMEOUT = 15.0

DNS_NAME = "shop.test"
CLUSTER = "shop"
POLL_INTERVAL = 0.5
HEARTBEAT_TIMEOUT = 3.0
# Each node gets this long to stop cleanly at the end before it is killed.
SHUTDOWN_TIMEOUT = 3.0

_PLAN = (
    ("node-a", "v1", "127.0.0.2"),
    ("node-b", "v2", "127.0.0.3"),
    ("node-c", "v2", "127.0.0.4"),
)
_STOPPED = "node-a"
_MEMBERSHIP_EVENTS = ("node-up", "leaving", "node-down")


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
    """What happened: filled in as the simulation goes, complete when ``ok``."""

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
    entries_before: int = 0
    """Entries in the old node's cache before the deploy."""
    entries_after: dict[str, int] = field(default_factory=dict)
    """Entries each new node holds after the handoff."""
    drain: dict[str, Any] | None = None
    """The old node's drain report (``DrainReport.as_dict()``)."""
    warm: dict[str, str] = field(default_factory=dict)
    """Why each new node reported warm."""

    @property
    def lost(self) -> int:
        """Entries of the old cache that no new node holds."""
        return max(0, self.entries_before - sum(self.entries_after.values()))

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``--json`` output)."""
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
            "handoff": {
                "namespace": NAMESPACE,
                "entries_before": self.entries_before,
                "entries_after": sum(self.entries_after.values()),
                "per_node": dict(sorted(self.entries_after.items())),
                "lost": self.lost,
                "handoff_seconds": None if self.drain is None else self.drain["seconds"],
                "report": self.drain,
                "warm": dict(sorted(self.warm.items())),
            },
            "events": [e.as_dict() for e in self.events],
        }


def _loopback_aliases_usable(hosts: list[str]) -> bool:
    try:
        for host in hosts:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
    except OSError:
        return False
    return True


def format_event(event: SimulationEvent) -> str:
    """One readable line, e.g. ``  0.41s  node-b  node-up    node-a (release v1)``."""
    text = f"{event.seconds:6.2f}s  {event.observer:<7} {event.event:<10}"
    if event.peer is not None:
        text += f" {event.peer} (release {event.release})"
    elif event.address is not None:
        text += f" on {event.address} (release {event.release})"
    if event.reason:
        text += f": {event.reason}" if event.peer is not None else f" {event.reason}"
    return text.rstrip()


class _Simulation:
    def __init__(self, seconds: float, entries: int, say: Callable[[str], None]) -> None:
        self.entries = entries
        self.started = time.monotonic()
        self.deadline = self.started + seconds
        self.seconds = seconds
        self.say = say
        self.result = SimulationResult()
        self.inbox: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.procs: dict[str, NodeProcess] = {}
        self.releases = {name: release for name, release, _ in _PLAN}
        self.show = True

    def elapsed(self, at: float | None = None) -> float:
        return (time.monotonic() if at is None else at) - self.started

    def run(self) -> SimulationResult:
        hosts = [host for _, _, host in _PLAN]
        if not _loopback_aliases_usable(hosts):
            raise SimulationError(
                f"cannot bind the loopback addresses {', '.join(hosts)} the nodes use "
                "(Linux has all of 127.0.0.0/8; on macOS add aliases first: "
                "sudo ifconfig lo0 alias 127.0.0.2 up, and likewise .3 and .4)"
            )
        cookie = secrets.token_urlsafe(32)
        with DNSResponder() as dns, contextlib.ExitStack() as stack:
            # One callback ends every process (not one per process) so that they all get
            # SIGTERM first and stop in parallel, within one SHUTDOWN_TIMEOUT.
            stack.callback(self._shutdown)
            port = free_port_on_all(hosts)
            dns.set_a(DNS_NAME, hosts)
            self.result.dns_server = dns.server_spec
            self.say(f"DNS server on {dns.server_spec}: {DNS_NAME} A {', '.join(hosts)}")
            old_state = {"namespace": NAMESPACE, "type": "ttl", "entries": self.entries,
                         "ttl": 600}  # fmt: skip
            new_state = {**old_state, "entries": 0, "maxsize": max(2, 2 * self.entries)}
            self.result.entries_before = self.entries
            for name, release, host in _PLAN:
                state = old_state if name == _STOPPED else new_state
                env = {
                    STATE_ENV: json.dumps(state),
                    "HANDOFF_DRAIN_TIMEOUT": str(DRAIN_TIMEOUT),
                    "HANDOFF_COOKIE": cookie,
                    "HANDOFF_CLUSTER": CLUSTER,
                    "HANDOFF_RELEASE": release,
                    "HANDOFF_BIND": f"{host}:{port}",
                    "HANDOFF_DISCOVERY": f"dns:{DNS_NAME}:{port}",
                    "HANDOFF_DNS_SERVER": dns.server_spec,
                    "HANDOFF_POLL_INTERVAL": str(POLL_INTERVAL),
                    "HANDOFF_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
                }
                proc = NodeProcess(
                    env, name=name, log_level="WARNING", on_event=self._forward(name)
                )
                self.procs[name] = proc
                proc.start()
                self.result.nodes.append(SimulatedNode(name, release, f"{host}:{port}"))
                held = f", {self.entries} warm cache entries" if name == _STOPPED else ""
                self.say(f"starting {name} (release {release}) on {host}:{port}{held}")
            self._form_mesh()
            self._stop_old_node()
            self._count_entries()
        return self.result

    def _forward(self, name: str) -> Callable[[dict[str, Any]], None]:
        def forward(event: dict[str, Any]) -> None:
            self.inbox.put((name, event))

        return forward

    # -- the phases ------------------------------------------------------------------------

    def _form_mesh(self) -> None:
        names = [name for name, _, _ in _PLAN]
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
        self.say(f"full mesh: every node sees the other two ({self.elapsed():.2f}s)")

    def _stop_old_node(self) -> None:
        victim = self.procs[_STOPPED]
        observers = {name for name in self.procs if name != _STOPPED}
        self.say(
            f"stopping {_STOPPED} (release {self.releases[_STOPPED]}) with SIGTERM, "
            "as the deploy retires the old release: it drains its cache to the new nodes"
        )
        sent = time.monotonic()
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
                and self.result.drain is not None
                and observers <= self.result.down_seconds.keys()
                and observers <= self.result.warm.keys()
            )

        def missing() -> str:
            waiting = [f"{_STOPPED} to drain"] if self.result.drain is None else []
            waiting += [f"{_STOPPED} to stop"] if not stopped else []
            waiting += [
                f"{o} to see {_STOPPED} down"
                for o in sorted(observers - self.result.down_seconds.keys())
            ]
            waiting += [f"{o} to be warm" for o in sorted(observers - self.result.warm.keys())]
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
        per_node = ", ".join(f"{n} {c}" for n, c in sorted(self.result.entries_after.items()))
        self.say(
            f"after the deploy: {sum(self.result.entries_after.values())} of "
            f"{self.result.entries_before} entries are warm on the new release ({per_node}); "
            f"lost {self.result.lost}"
        )

    def _pump(
        self,
        handle: Callable[[str, SimulationEvent], None],
        *,
        done: Callable[[], bool],
        missing: Callable[[], str],
        alive: set[str],
    ) -> None:
        """Show and record events until ``done()``, within the deadline."""
        while not done():
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise SimulationError(
                    f"not done within {self.seconds:g} s: still waiting for {missing()}"
                )
            try:
                observer, raw = self.inbox.get(timeout=min(remaining, 0.1))
            except queue.Empty:
                for name in sorted(alive):
                    proc = self.procs[name]
                    if not proc.running:
                        raise SimulationError(
                            f"{name} exited unexpectedly (code {proc.returncode}) while "
                            f"waiting for {missing()}; its log:\n{proc.stderr_tail()}"
                        ) from None
                continue
            event = self._record(observer, raw)
            if event.event == "error":
                raise SimulationError(f"{observer} failed: {raw.get('message')}")
            handle(observer, event)

    def _record(self, observer: str, raw: dict[str, Any]) -> SimulationEvent:
        kind = str(raw.get("event"))
        seconds = self.elapsed(float(raw.get("received_at", time.monotonic())))
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
            self.say(format_event(event) + ": " + _describe_report(report))
        elif kind == "warm":
            reason = str(raw.get("reason"))
            self.result.warm[observer] = reason
            event = SimulationEvent(seconds, observer, kind, reason=reason)
            self.say(format_event(event))
        else:
            event = SimulationEvent(seconds, observer, kind)
        self.result.events.append(event)
        if kind in (*_MEMBERSHIP_EVENTS, "listening", "stopped"):
            self.say(format_event(event))
        return event

    def _shutdown(self) -> None:
        running = [proc for proc in self.procs.values() if proc.running]
        if running:
            self.say(f"shutting down {', '.join(proc.name for proc in running)}")
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


def _describe_report(report: dict[str, Any]) -> str:
    ns = report["namespaces"].get(NAMESPACE)
    if ns is None:
        return "nothing tracked"
    dropped = sum(ns["dropped"].values()) + sum(ns["receiver_dropped"].values())
    return (
        f"{ns['records']} held, {ns['acknowledged']} acknowledged by "
        f"{', '.join(ns['successors']) or 'nobody'} in {ns['seconds']:.2f}s "
        f"({ns['bytes'] / 1e6:.1f} MB), {ns['snapshotted']} snapshotted, {dropped} dropped"
    )


@contextlib.contextmanager
def _timed(result: SimulationResult, started: float) -> Iterator[None]:
    try:
        yield
    finally:
        result.seconds = time.monotonic() - started


def run_simulation(
    *,
    seconds: float = DEFAULT_SECONDS,
    entries: int = DEFAULT_ENTRIES,
    say: Callable[[str], None] | None = None,
) -> SimulationResult:
    """Run the simulation; ``say`` receives progress lines as they happen.

    Never raises for a failed simulation: the result has ``ok`` false and ``error`` set
    (``KeyboardInterrupt`` still propagates, after every process has been stopped).
    """
    if not seconds > 0:
        raise ValueError(f"seconds must be positive, not {seconds!r}")
    if entries < 0:
        raise ValueError(f"entries must not be negative, not {entries!r}")
    simulation = _Simulation(seconds, entries, say or (lambda _line: None))
    result = simulation.result
    with _timed(result, simulation.started):
        try:
            simulation.run()
        except SimulationError as exc:
            result.error = str(exc)
            return result
        except OSError as exc:
            result.error = f"cannot set up the local cluster: {exc}"
            return result
    exit_codes = {n.name: n.exit_code for n in result.nodes}
    unclean = {name: code for name, code in exit_codes.items() if code != 0}
    if unclean:
        result.error = f"nodes did not stop cleanly (exit codes {unclean})"
        return result
    if result.lost:
        result.error = f"{result.lost} cache entries were lost in the handoff"
        return result
    result.ok = True
    return result


def summary(result: SimulationResult) -> list[str]:
    """The closing lines of the readable output."""
    nodes = ", ".join(f"{n.name} ({n.release})" for n in result.nodes)
    lines = [f"summary ({result.seconds:.2f}s in all):"]
    if result.mesh_seconds is not None:
        ups = sum(1 for e in result.events if e.event == "node-up")
        lines.append(
            f"  {len(result.nodes)} nodes {nodes} formed a full mesh after "
            f"{result.mesh_seconds:.2f}s ({ups} node-up events)"
        )
    if result.down_seconds:
        seen = ", ".join(
            f"{observer} after {delay * 1000:.0f} ms"
            for observer, delay in sorted(result.down_seconds.items())
        )
        reasons = sorted(
            {
                e.reason or ""
                for e in result.events
                if e.event == "node-down" and e.peer == result.stopped
            }
        )
        lines.append(
            f"  {result.stopped} stopped with SIGTERM: node-down ({', '.join(reasons)}) "
            f"seen by {seen}"
        )
    if result.drain is not None:
        lines.append(
            f"  handoff: {sum(result.entries_after.values())} of {result.entries_before} "
            f"cache entries warm on the new release after {result.drain['seconds']:.2f}s, "
            f"{result.lost} lost"
        )
    if result.ok:
        lines.append("  every node stopped cleanly (exit code 0)")
    else:
        lines.append(f"  FAILED: {result.error}")
    return lines
