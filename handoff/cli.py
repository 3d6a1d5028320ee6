"""The ``handoff`` command line.

- ``handoff status``, ``handoff drain``, ``handoff wait-ready`` talk to the node running on
  this host through its control socket (:mod:`handoff.control`);
- ``handoff doctor`` checks the configuration in the environment against the cluster:
  discovery, then a handshake with every peer it finds;
- ``handoff simulate`` runs a local blue-green deploy of real node processes under traffic,
  without and with handoff (:mod:`handoff.simulate`).

``main(argv)`` returns the exit code instead of exiting, so it can be called from tests; the
console script passes it to :func:`sys.exit`. The exit codes are listed in
:data:`EXIT_CODES_HELP` and in every command's ``--help``.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import math
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import anyio

from handoff import __version__, simulate
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
from handoff.config import (
    COOKIE_HOWTO,
    Settings,
    describe,
    resolve_settings,
    unknown_variables,
    worker_ports,
)
from handoff.control import (
    PRECOPY_SHAPE,
    RECEIVED_SHAPE,
    REPORT_SHAPE,
    STATUS_SHAPE,
    WAIT_READY_SHAPE,
    AmbiguousSocket,
    ControlError,
    ControlPermissionError,
    NoControlSocket,
    NoNodeRunning,
    call,
    locate_socket,
    shape_problem,
)
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
    "EXIT_CODES_HELP",
    "EXIT_CONTROL_ERROR",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_NO_NODE",
    "EXIT_PERMISSION",
    "EXIT_USAGE",
    "build_parser",
    "main",
)

#: The command ran and the answer is no (records dropped, not warm in time, problems found).
EXIT_FAILED = 1
#: Bad arguments.
EXIT_USAGE = 2
#: No node answers at the control socket.
EXIT_NO_NODE = 3
#: The control socket is another user's, or the node refused this user.
EXIT_PERMISSION = 4
#: The node answered with an error, or stopped answering.
EXIT_CONTROL_ERROR = 5
#: Interrupted (Ctrl-C).
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """\
exit codes:
  0    success: status shown, the drain dropped nothing, the node is warm,
       doctor found no problem, the simulation succeeded
  1    the command ran and the answer is no: the drain dropped records, the node
       was not warm in time, doctor found problems, the simulation failed
  2    usage error
  3    no node is running: nothing answers at the control socket
  4    the control socket is not yours: another user's socket, or the node refused you
  5    the node answered with an error or stopped answering
  130  interrupted
"""

SOCKET_HELP = (
    "the node's control socket (default: HANDOFF_CONTROL_SOCKET, else "
    "${XDG_RUNTIME_DIR or /tmp}/handoff-<uid>/<HANDOFF_CLUSTER>.sock, else the only socket "
    "there)"
)

# How long the CLI waits for a status answer; the node answers from memory at once.
STATUS_TIME_LIMIT = 10.0
# The wait for a drain's "started" line; after it the node's announced deadline applies.
DRAIN_START_LIMIT = 10.0
DEFAULT_WAIT_READY = 30.0
# Beyond the wait the node was asked for: time to write the answer.
WAIT_GRACE = 5.0
# How often wait-ready looks for a control socket that is not there yet: a starting node
# binds it within a second or so, and a stat every 100 ms costs nothing.
SOCKET_POLL_INTERVAL = 0.1
# The wait the node is asked for when the socket appeared at the deadline: it still gets
# the chance to say it is warm rather than the CLI guessing.
MIN_WAIT = 0.05
# Peers probed at once by doctor: enough for any cluster, bounded for a huge DNS answer.
DOCTOR_CONCURRENCY = 16
# Clock differences above this are worth a warning (the handshake's measure includes the
# one-way delay, well below this on a private network).
CLOCK_TOLERANCE = 1.0

STATUS_DESCRIPTION = """\
Show the local node: its members (name, release, state, address), the namespaces it
tracks with their entry counts and schema versions, and its last drain report. A table
for people; --json prints the node's answer as one JSON object for scripts.
"""

DRAIN_DESCRIPTION = """\
Ask the local node to hand its state off now, to its successors (or its snapshot store),
and show the progress: records acknowledged so far per namespace. For preStop hooks and
deploy scripts: the node keeps running, in the draining state, until it is stopped; a
later drain (SIGTERM, lifespan shutdown) returns this drain's report. Exits 1 if the node
dropped any record.
"""

WAIT_READY_DESCRIPTION = """\
Wait until the local node is warm: it received handed-off state, restored a snapshot, had
nothing to wait for, or its warm-up timeout passed. Run it right after starting the
process: within --timeout seconds it also waits for the node's control socket to appear.
Prints the real time waited. Exits 0 once warm, 1 if it was not warm within --timeout
seconds, 3 if no control socket appeared.
"""

DOCTOR_DESCRIPTION = """\
Check this host's warm-handoff configuration against the cluster, from the HANDOFF_*
environment (as a node would read it): resolve the discovery query, connect to every
address found and run the authentication handshake as a throwaway client (it never
becomes a member), then check cookie, cluster, protocol version, schema versions (against
the local node's, if one answers on the control socket) and clocks. Prints every problem
with its fix; exits 0 if there is none, 1 otherwise.
"""


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary_line: str,
    description: str,
) -> argparse.ArgumentParser:
    return commands.add_parser(
        name,
        help=summary_line,
        description=description,
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _socket_and_json(parser: argparse.ArgumentParser, json_help: str) -> None:
    parser.add_argument("--socket", metavar="PATH", help=SOCKET_HELP)
    parser.add_argument("--json", action="store_true", help=json_help)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``handoff`` command."""
    parser = argparse.ArgumentParser(
        prog="handoff",
        description="warm-handoff: keep in-memory state warm across rolling and blue-green "
        "deploys.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    status = _command(
        commands, "status", "show the local node, its peers and state", STATUS_DESCRIPTION
    )
    _socket_and_json(status, "print the node's status as one JSON object")

    drain = _command(commands, "drain", "hand the local node's state off now", DRAIN_DESCRIPTION)
    drain.add_argument(
        "--timeout",
        type=_positive_seconds,
        metavar="S",
        help="deadline of the drain in seconds (default: the node's HANDOFF_DRAIN_TIMEOUT)",
    )
    _socket_and_json(drain, "print only the final drain report as one JSON object")

    wait = _command(
        commands, "wait-ready", "wait until the local node is warm", WAIT_READY_DESCRIPTION
    )
    wait.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=DEFAULT_WAIT_READY,
        metavar="S",
        help=f"give up after S seconds (default {DEFAULT_WAIT_READY:g})",
    )
    _socket_and_json(wait, "print the node's answer as one JSON object")

    doctor = _command(
        commands, "doctor", "check the configuration against the cluster", DOCTOR_DESCRIPTION
    )
    _socket_and_json(doctor, "print the findings as one JSON object")

    simulate_parser = commands.add_parser(
        "simulate", help=simulate.SIMULATE_HELP, epilog=EXIT_CODES_HELP
    )
    simulate.add_simulate_arguments(simulate_parser)
    return parser


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True), flush=True)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    cells = [[str(c) for c in headers], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]


# -- talking to the local node ----------------------------------------------------------------


def _ask(
    args: argparse.Namespace,
    request: Mapping[str, Any],
    *,
    time_limit: float,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    shape: Any = None,
) -> dict[str, Any]:
    path = locate_socket(args.socket)
    return anyio.run(
        functools.partial(
            call, path, request, time_limit=time_limit, on_progress=on_progress, shape=shape
        )
    )


def _status(args: argparse.Namespace) -> int:
    reply = _ask(
        args, {"command": "status"}, time_limit=STATUS_TIME_LIMIT, shape={"status": STATUS_SHAPE}
    )
    status: dict[str, Any] = reply["status"]
    if args.json:
        _print_json(status)
        return 0
    for line in _status_lines(status):
        print(line)
    return 0


def _status_lines(status: Mapping[str, Any]) -> list[str]:
    # Every string here may come from a peer (names, releases) or stand for one: escaped.
    t = peer_text
    warm = f"warm ({t(status['warm_reason'])})" if status["warm"] else "warming up"
    lines = [
        f"node {t(status['node'])} of cluster {t(status['cluster'])}, release "
        f"{t(status['release'])}, {t(status['state'])}, {warm}",
        f"address {t(status['address'] or '(none advertised)')}, pid {status['pid']}",
        "",
    ]
    members = [
        (
            ("* " if m["self"] else "  ") + t(m["name"]),
            t(m["release"]),
            t(m["state"]),
            t(m["address"] or "-"),
        )
        for m in status["members"]
    ]
    lines += _table(("  MEMBER", "RELEASE", "STATE", "ADDRESS"), members)
    lines.append("")
    if status["tracked"]:
        tracked = [
            (
                peer_text(n["namespace"]),
                peer_text(n["kind"]),
                "?" if n["entries"] is None else n["entries"],
                n["version"],
                # Nodes from before spreads existed do not say: they split.
                peer_text(n.get("spread", "split")),
            )
            for n in status["tracked"]
        ]
        lines += _table(("NAMESPACE", "ADAPTER", "ENTRIES", "VERSION", "SPREAD"), tracked)
    else:
        lines.append("no tracked namespaces")
    lines.append("")
    drain = status.get("last_drain")
    lines.append("last drain: " + ("none" if drain is None else t(drain["summary"], 2000)))
    for precopy in status.get("precopy") or ():  # older nodes do not say
        if shape_problem(precopy, PRECOPY_SHAPE) is None:
            lines.append(
                f"pre-copy to {t(precopy['peer'])}: {t(precopy['state'])}, "
                f"{precopy['copied']} of {precopy['entries']} entries copied"
            )
    received = status.get("last_received")
    if shape_problem(received, RECEIVED_SHAPE) is not None:
        lines.append("last received: (not readable)")
    elif received is None:
        lines.append("last received: none")
    else:
        release = f" (release {t(received['release'])})" if received["release"] else ""
        ago = duration(max(0.0, time.time() - received["at"]))
        outcome = ""
        applied, kept, dropped = (received.get(k) for k in ("applied", "kept", "dropped"))
        if isinstance(applied, int) and isinstance(kept, int) and isinstance(dropped, dict):
            # Older nodes do not send the outcome: shown where there is one.
            outcome = f": {applied} applied, {kept} kept their newer copy here"
            reasons = [
                f"{count} {t(str(reason), 200)}"
                for reason, count in sorted(dropped.items())
                if isinstance(count, int)
            ]
            outcome += f", dropped {', '.join(reasons)}" if reasons else ", none dropped"
        lines.append(
            f"last received: {received['records']} records from {t(received['peer'])}"
            f"{release}, {ago} ago{outcome}"
        )
    return lines


def _drain(args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"command": "drain"}
    if args.timeout is not None:
        request["timeout"] = args.timeout

    def show(progress: dict[str, Any]) -> None:
        if args.json:
            return
        if progress.get("event") == "started":
            already = " (already draining: waiting for its report)" if progress["already"] else ""
            print(
                f"draining {peer_text(progress['node'])} within "
                f"{duration(progress['timeout'])}{already}",
                flush=True,
            )
        elif progress.get("event") == "namespace":
            print(
                f"  {peer_text(progress['namespace'])}: {progress['acknowledged']} acknowledged, "
                f"{progress['snapshotted']} snapshotted, {progress['dropped']} dropped "
                f"(of {progress['records']} exported so far)",
                flush=True,
            )

    reply = _ask(
        args,
        request,
        time_limit=DRAIN_START_LIMIT,
        on_progress=show,
        shape={"report": REPORT_SHAPE},
    )
    report: dict[str, Any] = reply["report"]
    if args.json:
        _print_json(report)
    else:
        print(peer_text(report["summary"], 10_000))
    if not report["ok"]:
        print(
            f"handoff drain: error: {report['lost']} records lost ({report['dropped']} dropped "
            f"by {peer_text(report['node'])}, {report['receiver_dropped']} by successors; see "
            "the report)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return 0


def _wait_ready(args: argparse.Namespace) -> int:
    started = time.monotonic()
    reply = anyio.run(_wait_ready_call, args.socket, started, args.timeout)
    # The real time, socket wait included: the node only knows its own part of it.
    waited = time.monotonic() - started
    if args.json:
        answer = {k: v for k, v in reply.items() if k != "type"}
        answer["waited"] = round(waited, 3)
        _print_json(answer)
    elif reply["warm"]:
        print(
            f"{peer_text(reply['node'])} is warm: {peer_text(reply['reason'])} "
            f"(waited {duration(waited)})"
        )
    if not reply["warm"]:
        print(
            f"handoff wait-ready: error: {peer_text(reply['node'])} is not warm after "
            f"{duration(waited)}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return 0


async def _wait_ready_call(
    socket_arg: str | None, started: float, seconds: float
) -> dict[str, Any]:
    # Deploy scripts run wait-ready right after starting the process, before its node has
    # bound the socket: "no node" is retried until the deadline, anything else is final.
    # Each round sleeps at least a poll interval, so the loop runs a bounded number of times.
    deadline = started + seconds
    while True:
        try:
            path = locate_socket(socket_arg)
            remaining = max(deadline - time.monotonic(), MIN_WAIT)
            return await call(
                path,
                {"command": "wait-ready", "timeout": remaining},
                time_limit=remaining + WAIT_GRACE,
                shape=WAIT_READY_SHAPE,
            )
        except NoControlSocket:
            raise  # configured away: waiting cannot change that
        except NoNodeRunning as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoNodeRunning(
                    f"{exc} (waited {duration(time.monotonic() - started)} for it)"
                ) from None
            await anyio.sleep(min(SOCKET_POLL_INTERVAL, left))


# -- doctor -----------------------------------------------------------------------------------


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


async def _doctor_checks(socket_arg: str | None, environ: Mapping[str, str]) -> DoctorReport:
    report = DoctorReport()
    host = "-".join(socket.gethostname().split())[:60] or "localhost"
    name = f"doctor-{host}-{os.getpid()}"
    try:
        settings = resolve_settings(environ=environ, name=name)
    except ConfigError as exc:
        report.problems.append(
            Problem(str(exc), "set the variable as the message says, as the nodes have it")
        )
        return report
    report.settings = [row for row in describe(settings) if row[0] != "node_name"]
    report.cluster = settings.cluster
    for unknown in unknown_variables(environ):
        report.problems.append(
            Problem(unknown, "rename or remove the variable (the node ignores it too)")
        )
    weakness = cookie_weakness(settings.cookie)
    if weakness is not None:
        report.notes.append(f"HANDOFF_COOKIE looks guessable: {weakness}; {COOKIE_HOWTO}")

    try:
        path = locate_socket(socket_arg, environ)
        status = await call(
            path,
            {"command": "status"},
            time_limit=STATUS_TIME_LIMIT,
            shape={"status": STATUS_SHAPE},
        )
        report.local = status["status"]
    except ControlError as exc:
        report.local_note = f"{exc} (schema versions are listed, not compared)"
    if report.local is not None and report.local["cluster"] != settings.cluster:
        report.problems.append(
            Problem(
                f"the local node {peer_text(report.local['node'])} is in cluster "
                f"{report.local['cluster']!r}, the environment here says {settings.cluster!r}",
                "run handoff doctor with the node's environment (HANDOFF_CLUSTER), or point "
                "--socket at the node of this cluster",
            )
        )

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


def _doctor_lines(report: DoctorReport) -> list[str]:
    lines = [f"handoff doctor: cluster {report.cluster or '(unknown)'}"]
    if report.settings:
        lines.append("")
        lines += ["  " + line for line in _table(("SETTING", "VALUE", "SOURCE"), report.settings)]
    lines.append("")
    if report.local is not None:
        local = report.local
        namespaces = ", ".join(
            f"{peer_text(t['namespace'])} v{t['version']}" for t in local["tracked"]
        )
        lines.append(
            f"local node: {peer_text(local['node'])} ({peer_text(local['state'])}), tracks "
            f"{namespaces or 'nothing'}"
        )
    elif report.local_note:
        lines.append(f"local node: {report.local_note}")
    if report.discovery is not None:
        lines.append(f"discovery: {report.discovery}: {len(report.addresses)} address(es)")
    if report.peers:
        rows = []
        for p in report.peers:
            if p.ok:
                namespaces = ", ".join(f"{n} v{v}" for n, v in sorted(p.namespaces.items()))
                rows.append(
                    (
                        "ok",
                        p.address,
                        (p.name or "") + (" (local)" if p.local else ""),
                        p.release or "",
                        p.state or "",
                        duration(p.clock_offset or 0.0, signed=True),
                        namespaces or "-",
                    )
                )
            else:
                rows.append(("FAIL", p.address, p.name or "", "", "", "", p.error or ""))
        lines.append("")
        lines += [
            "  " + line
            for line in _table(
                ("", "ADDRESS", "NAME", "RELEASE", "STATE", "CLOCK", "NAMESPACES"), rows
            )
        ]
    if report.notes:
        lines.append("")
        lines += [f"note: {note}" for note in report.notes]
    lines.append("")
    if report.ok:
        lines.append("no problems found")
    else:
        lines.append(f"{len(report.problems)} problem(s):")
        for number, problem in enumerate(report.problems, 1):
            tag = " (warning)" if problem.severity == "warning" else ""
            lines.append(f"  {number}. {problem.what}{tag}")
            lines.append(f"     fix: {problem.fix}")
    return lines


def _doctor(args: argparse.Namespace) -> int:
    report = anyio.run(_doctor_checks, args.socket, os.environ)
    if args.json:
        _print_json(report.as_dict())
    else:
        for line in _doctor_lines(report):
            print(line)
    return 0 if report.ok else EXIT_FAILED


# -- simulate ---------------------------------------------------------------------------------


def _simulate(args: argparse.Namespace) -> int:
    # Looked up at call time: the simulation lives (and is tested) in its own module.
    return simulate.run_from_args(args)


_COMMANDS: Mapping[str, Callable[[argparse.Namespace], int]] = {
    "status": _status,
    "drain": _drain,
    "wait-ready": _wait_ready,
    "doctor": _doctor,
    "simulate": _simulate,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``handoff`` command with ``argv`` (default: ``sys.argv[1:]``)."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # --help, --version and usage errors
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else EXIT_FAILED
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    prefix = f"handoff {args.command}: error:"
    try:
        return _COMMANDS[args.command](args)
    except NoNodeRunning as exc:
        print(f"{prefix} {exc}", file=sys.stderr)
        return EXIT_NO_NODE
    except ControlPermissionError as exc:
        print(f"{prefix} {exc}", file=sys.stderr)
        return EXIT_PERMISSION
    except AmbiguousSocket as exc:
        print(f"{prefix} {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ControlError as exc:
        print(f"{prefix} {exc}", file=sys.stderr)
        return EXIT_CONTROL_ERROR
    except KeyboardInterrupt:
        print("handoff: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Output piped into a command that stopped reading (| head): not worth a traceback.
        # Python would report the failed flush of stdout at exit, so point it at devnull.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
