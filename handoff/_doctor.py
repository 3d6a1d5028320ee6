"""What ``handoff doctor`` checks, with settings from anywhere.

The CLI runs :func:`check_settings` with the settings of its own environment (as a node
would read them); a running node runs it with its own settings when ``handoff doctor
--socket PATH`` asks it over the control socket, so that what is checked is what that node
really uses, not the environment of the shell the command runs in. The cookie stays in the
process that has it: only its length and whether it looks guessable leave it.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import anyio

from handoff._errors import (
    AuthenticationError,
    ClusterMismatch,
    ConfigError,
    ConnectError,
    DiscoveryError,
    HandoffError,
    HandshakeTimeout,
    TLSError,
    VersionMismatch,
)
from handoff._keys import cookie_weakness
from handoff._text import duration, peer_text
from handoff.config import COOKIE_HOWTO, Settings, describe, worker_ports
from handoff.discovery import PeerAddress, make_discovery
from handoff.protocol import (
    Connection,
    HandshakeComplete,
    Limits,
    LocalNode,
    NodeState,
    PeerInfo,
    Role,
)
from handoff.transport import TLSContexts, open_connection, translate_errors

__all__ = (
    "DOCTOR_SHAPE",
    "DoctorReport",
    "PeerCheck",
    "Problem",
    "check_settings",
    "doctor_name",
)

# Peers probed at once by doctor: enough for any cluster, bounded for a huge DNS answer.
DOCTOR_CONCURRENCY = 16
# Clock differences above this are worth a warning (the handshake's measure includes the
# one-way delay, well below this on a private network).
CLOCK_TOLERANCE = 1.0


def doctor_name() -> str:
    """The name the doctor's throwaway handshakes give (never a member anywhere)."""
    host = "-".join(socket.gethostname().split())[:60] or "localhost"
    return f"doctor-{host}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Problem:
    """Something ``handoff doctor`` found wrong, and how to fix it."""

    what: str
    fix: str
    severity: Literal["error", "warning"] = "error"


@dataclass(slots=True)
class PeerCheck:
    """What ``handoff doctor`` learned about one discovered address."""

    address: str
    ok: bool = False
    name: str | None = None
    release: str | None = None
    state: str | None = None
    protocol_version: int | None = None
    clock_offset: float | None = None
    namespaces: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    local: bool = False
    """The node this host's control socket belongs to."""


@dataclass(slots=True)
class DoctorReport:
    """Everything ``handoff doctor`` found (its ``--json`` output)."""

    settings: list[tuple[str, str, str]] = field(default_factory=list)
    origin: str = "environment"
    """Whose settings were checked: this shell's environment, or a running node's."""
    cluster: str | None = None
    discovery: str | None = None
    addresses: list[str] = field(default_factory=list)
    local: dict[str, Any] | None = None
    local_note: str | None = None
    peers: list[PeerCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "ok": self.ok,
            "origin": self.origin,
            "cluster": self.cluster,
            "settings": [{"setting": s, "value": v, "source": src} for s, v, src in self.settings],
            "discovery": self.discovery,
            "addresses": self.addresses,
            "local": self.local,
            "local_note": self.local_note,
            "peers": [asdict(p) for p in self.peers],
            "notes": self.notes,
            "problems": [asdict(p) for p in self.problems],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DoctorReport:
        """The report a node sent (its :meth:`as_dict`, checked against
        :data:`DOCTOR_SHAPE`). The node escaped what peers chose; whatever control characters
        are left (a node that is not what it seems) are escaped here before any is shown."""
        p = _printable

        def peer(check: Mapping[str, Any]) -> PeerCheck:
            fields = {k: check[k] for k in _PEER_FIELDS if k in check}
            for key in ("address", "name", "release", "state", "error"):
                if isinstance(fields.get(key), str):
                    fields[key] = p(fields[key])
            fields["namespaces"] = {p(str(k)): v for k, v in fields["namespaces"].items()}
            return PeerCheck(**fields)

        return cls(
            settings=[
                (p(row["setting"]), p(row["value"]), p(row["source"])) for row in data["settings"]
            ],
            origin=p(data["origin"]),
            cluster=None if data["cluster"] is None else p(data["cluster"]),
            discovery=None if data["discovery"] is None else p(data["discovery"]),
            addresses=[p(a) for a in data["addresses"]],
            local=data["local"],
            local_note=None if data["local_note"] is None else p(data["local_note"]),
            peers=[peer(check) for check in data["peers"]],
            notes=[p(note) for note in data["notes"]],
            problems=[
                Problem(
                    p(problem["what"]),
                    p(problem["fix"]),
                    "warning" if problem["severity"] == "warning" else "error",
                )
                for problem in data["problems"]
            ],
        )


def _printable(text: str) -> str:
    # Not peer_text: that escapes backslashes too, and the node's text is escaped already.
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


_PEER_FIELDS = tuple(PeerCheck.__dataclass_fields__)
_TEXT = str
_TEXT_OR_NONE = (str, type(None))
_INT_OR_NONE = (int, type(None))
_NUMBER_OR_NONE = (int, float, type(None))

#: The shape of a node's doctor report (see :func:`handoff.control.shape_problem`): what
#: :meth:`DoctorReport.from_dict` reads, checked before anything of it is shown.
DOCTOR_SHAPE: Any = {
    "origin": _TEXT,
    "cluster": _TEXT_OR_NONE,
    "settings": [{"setting": _TEXT, "value": _TEXT, "source": _TEXT}],
    "discovery": _TEXT_OR_NONE,
    "addresses": [_TEXT],
    "local": (type(None), dict),
    "local_note": _TEXT_OR_NONE,
    "peers": [
        {
            "address": _TEXT,
            "ok": bool,
            "name": _TEXT_OR_NONE,
            "release": _TEXT_OR_NONE,
            "state": _TEXT_OR_NONE,
            "protocol_version": _INT_OR_NONE,
            "clock_offset": _NUMBER_OR_NONE,
            "namespaces": dict,
            "error": _TEXT_OR_NONE,
            "local": bool,
        }
    ],
    "notes": [_TEXT],
    "problems": [{"what": _TEXT, "fix": _TEXT, "severity": _TEXT}],
}


_FIX_REACH = (
    "check that a node runs there and listens on an address reachable from here "
    "(HANDOFF_BIND 0.0.0.0:PORT or [::]:PORT, not 127.0.0.1, on another host), and that no "
    "firewall blocks the port"
)
_FIX_COOKIE = (
    "set the same HANDOFF_COOKIE on every node of the cluster, and in the environment "
    "handoff doctor runs in"
)
_FIX_CLUSTER = "set the same HANDOFF_CLUSTER on every node that should hand state to the others"
_FIX_VERSION = "run releases of warm-handoff that share a protocol version on every node"
_FIX_TLS = (
    "give every node (and handoff doctor) HANDOFF_TLS_CERT, HANDOFF_TLS_KEY and "
    "HANDOFF_TLS_CA, certificates signed by the cluster's CA; TLS is on for all or for none"
)
_FIX_PROTOCOL = (
    "check that the address is a warm-handoff node (not another service) and that TLS is "
    "configured alike on both sides"
)


async def _handshake(
    target: PeerAddress, settings: Settings, tls: TLSContexts | None, identity: LocalNode
) -> PeerInfo:
    remote = str(target)
    stream = await open_connection(
        target.host,
        target.port,
        time_limit=settings.connect_timeout,
        tls=tls.client if tls is not None else None,
    )
    connection = Connection(
        Role.CLIENT,
        identity,
        settings.cookie,
        now=anyio.current_time(),
        limits=Limits(handshake_timeout=settings.handshake_timeout),
        announce=False,
    )
    try:
        with anyio.fail_after(settings.handshake_timeout), translate_errors(remote):
            await stream.send(connection.data_to_send())
            while True:
                data = await stream.receive()
                try:
                    events = connection.receive_data(data, now=anyio.current_time())
                except HandoffError:
                    # Tell the peer why (a queued Reject) so that its log says it too.
                    reject = connection.data_to_send()
                    if reject:
                        with anyio.move_on_after(0.5):
                            await stream.send(reject)
                    raise
                outgoing = connection.data_to_send()
                if outgoing:
                    await stream.send(outgoing)
                for event in events:
                    if isinstance(event, HandshakeComplete):
                        return event.peer
    except TimeoutError:
        raise HandshakeTimeout(
            f"no complete handshake from {remote} within {duration(settings.handshake_timeout)}"
        ) from None
    finally:
        await anyio.aclose_forcefully(stream)


def _probe_problem(check: PeerCheck, exc: HandoffError, cluster: str) -> Problem:
    who = check.address + (f" ({check.name})" if check.name else "")
    if isinstance(exc, ConnectError):
        return Problem(f"cannot reach {who}: {check.error}", _FIX_REACH)
    if isinstance(exc, AuthenticationError):
        return Problem(
            f"{who} does not share this cookie (HANDOFF_COOKIE): {check.error}", _FIX_COOKIE
        )
    if isinstance(exc, ClusterMismatch):
        # The peer's message speaks from its side ("this node" is the peer).
        return Problem(
            f"{who} is not in cluster {cluster!r} (HANDOFF_CLUSTER); it says: {check.error}",
            _FIX_CLUSTER,
        )
    if isinstance(exc, VersionMismatch):
        return Problem(f"{who} speaks another protocol version: {check.error}", _FIX_VERSION)
    if isinstance(exc, TLSError):
        return Problem(f"TLS with {who} failed: {check.error}", _FIX_TLS)
    return Problem(f"handshake with {who} failed: {check.error}", _FIX_PROTOCOL)


@dataclass(slots=True)
class _Findings:
    """What one peer check found, merged into the report in discovery order."""

    check: PeerCheck
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    absent: bool = False
    """A probed port of the range (a possible worker) where nobody listens: not reported."""


async def _check_peer(
    target: PeerAddress,
    settings: Settings,
    tls: TLSContexts | None,
    identity: LocalNode,
    local: Mapping[str, Any] | None,
) -> _Findings:
    check = PeerCheck(str(target))
    found = _Findings(check)
    try:
        peer = await _handshake(target, settings, tls, identity)
    except HandoffError as exc:
        if target.probe and isinstance(exc, ConnectError):
            found.absent = True
            return found
        # A rejection's reason is the peer's text.
        check.error = peer_text(exc, 1000)
        found.problems.append(_probe_problem(check, exc, settings.cluster))
        return found
    # The peer chose its name, release and namespace names: escaped before they are shown.
    check.ok = True
    check.name = peer_text(peer.name)
    check.release = peer_text(peer.release)
    check.state = peer.state.value
    check.protocol_version = peer.protocol_version
    check.clock_offset = round(peer.clock_offset, 3) + 0.0  # no "-0.000"
    check.namespaces = {peer_text(ns.name): ns.version for ns in peer.namespaces}
    who = f"{check.name} ({check.address})"
    if abs(peer.clock_offset) > CLOCK_TOLERANCE:
        found.problems.append(
            Problem(
                f"the clock of {who} differs from this host's by "
                f"{duration(peer.clock_offset, signed=True)}",
                "synchronise the clocks (NTP, chrony); handoffs send remaining lifetimes so "
                "caches stay correct, but snapshot ages and logs drift",
                "warning",
            )
        )
    if peer.state is NodeState.DRAINING:
        found.notes.append(f"{who} is draining")
    if local is None:
        return found
    me = peer_text(local["node"])
    if check.name == me:
        check.local = True
        return found
    ours: dict[str, int] = next((m["namespaces"] for m in local["members"] if m["self"]), {})
    for namespace, version in sorted(ours.items()):
        theirs = check.namespaces.get(namespace)
        if theirs is None:
            found.problems.append(
                Problem(
                    f"{who} does not track {namespace!r}, which the local node "
                    f"{me} tracks (version {version}): {check.name} refuses that "
                    f"state when {me} drains",
                    f"track {namespace!r} on every release (node.track({namespace!r}, ...)), "
                    "or expect it to go to other peers or to the snapshot store",
                )
            )
        elif theirs != version:
            found.notes.append(
                f"{namespace!r}: version {version} on {me}, {theirs} on "
                f"{check.name}: the newer release needs @node.upgrade / @node.downgrade hooks "
                f"between {min(version, theirs)} and {max(version, theirs)}"
            )
    for namespace in sorted(set(check.namespaces) - set(ours)):
        found.notes.append(f"{check.name} tracks {namespace!r}, the local node {me} does not")
    return found


def _check_ports(settings: Settings, report: DoctorReport) -> None:
    """How many ports of the node's range are taken on this host: all of them means that a
    worker process starting now serves without a node (PortsInUse)."""
    ports = worker_ports(settings.bind_port, settings.port_range)
    if ports[0] == 0:
        return
    busy = [port for port in ports if _port_in_use(settings.bind_host, port)]
    if not busy:
        return
    first, last = ports[0], ports[-1]
    report.notes.append(
        f"{len(busy)} of the {len(ports)} ports {first}..{last} are in use on this host "
        f"(the worker nodes here: {', '.join(map(str, busy))})"
    )
    if len(busy) == len(ports):
        report.problems.append(
            Problem(
                f"every port of {first}..{last} (HANDOFF_BIND, HANDOFF_PORT_RANGE="
                f"{settings.port_range}) is in use on this host: a worker process that "
                "starts now serves WITHOUT a node (its state is neither received nor handed "
                "off; its log says 'serves WITHOUT a node')",
                "run fewer worker processes per machine, or raise HANDOFF_PORT_RANGE "
                "(on every node: discovery probes that many ports)",
            )
        )


def _port_in_use(host: str, port: int) -> bool:
    # A bind without listen: nothing connects to the nodes, so none of them logs a probe.
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


async def check_settings(
    settings: Settings,
    report: DoctorReport,
    *,
    name: str,
    origin: str,
) -> DoctorReport:
    """Fill ``report`` (which may already hold findings about where the settings came
    from, and the local node's status in ``report.local``): the settings table, the cookie's
    strength, the port range on this host, discovery, and a throwaway handshake with every
    address found. ``origin`` says whose settings these are ("HANDOFF_COOKIE" and the like
    are named in the fixes either way). ``name`` is the handshakes' node name."""
    report.origin = origin
    report.settings = [row for row in describe(settings) if row[0] != "node_name"]
    report.cluster = settings.cluster
    weakness = cookie_weakness(settings.cookie)
    if weakness is not None:
        report.notes.append(f"HANDOFF_COOKIE looks guessable: {weakness}; {COOKIE_HOWTO}")
    _check_ports(settings, report)
    if settings.discovery.kind == "none":
        report.discovery = "none"
        report.problems.append(
            Problem(
                "no discovery configured (HANDOFF_DISCOVERY is none or unset): nodes never "
                "find each other, so a draining node has nobody to hand its state to",
                "set HANDOFF_DISCOVERY: dns:NAME[:PORT] (on Kubernetes the headless service, "
                "with publishNotReadyAddresses: true), 'fly' on Fly.io, or "
                "static:HOST:PORT,HOST:PORT",
            )
        )
        return report
    try:
        tls = TLSContexts(settings.tls) if settings.tls is not None else None
        discovery = make_discovery(
            settings.discovery,
            default_port=settings.bind_port,
            dns_server=settings.dns_server,
            fly_app=settings.fly_app,
            timeout=min(2.0, settings.poll_interval),
            ports=settings.port_range,
        )
    except ConfigError as exc:
        report.problems.append(Problem(str(exc), "fix the setting the message names"))
        return report
    report.discovery = discovery.describe()
    try:
        found = await discovery.discover()
    except DiscoveryError as exc:
        report.problems.append(
            Problem(
                f"discovery failed: {exc}",
                "check that the name in HANDOFF_DISCOVERY exists and that the DNS server "
                "(HANDOFF_DNS_SERVER, else /etc/resolv.conf) answers from here",
            )
        )
        return report
    report.addresses = [str(a) for a in found]
    if not found:
        report.problems.append(
            Problem(
                f"discovery ({report.discovery}) found no address",
                "check the name in HANDOFF_DISCOVERY; on Kubernetes, not-ready pods are left "
                "out of DNS unless the service sets publishNotReadyAddresses: true",
            )
        )
        return report

    identity = LocalNode(
        cluster=settings.cluster,
        name=name,
        incarnation=secrets.token_hex(8),
        release="doctor",
        started_at=time.time(),
        # Never a successor, should anything ever count it as a peer.
        state=NodeState.DRAINING,
    )
    limiter = anyio.CapacityLimiter(DOCTOR_CONCURRENCY)
    results: dict[int, _Findings] = {}

    async def one(index: int, target: PeerAddress) -> None:
        async with limiter:
            results[index] = await _check_peer(target, settings, tls, identity, report.local)

    async with anyio.create_task_group() as tasks:
        for index, target in enumerate(found):
            tasks.start_soon(one, index, target)
    for index in sorted(results):
        if results[index].absent:
            continue
        report.peers.append(results[index].check)
        report.problems += results[index].problems
        report.notes += results[index].notes
    return report
