"""The ``handoff`` command line.

- ``handoff status``, ``handoff drain``, ``handoff wait-ready`` talk to the node running on
  this host through its control socket (:mod:`handoff.control`); ``status --all`` to every
  node of this host (worker processes' ``NAME-PORT.sock`` sockets);
- ``handoff doctor`` checks the configuration in the environment against the cluster:
  discovery, then a handshake with every peer it finds (:mod:`handoff._doctor`); with
  ``--socket`` the node there runs those checks with its own settings;
- ``handoff simulate`` runs a local blue-green deploy of real node processes under traffic,
  without and with handoff (:mod:`handoff.simulate`).

``main(argv)`` returns the exit code instead of exiting, so it can be called from tests; the
console script passes it to :func:`sys.exit`. The exit codes are listed in
:data:`EXIT_CODES_HELP` and in every command's ``--help``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from handoff import __version__, simulate
from handoff._doctor import (
    DOCTOR_SHAPE,
    DoctorReport,
    Problem,
    check_settings,
    doctor_name,
)
from handoff._errors import (
    ConfigError,
)
from handoff._text import duration, peer_text
from handoff.config import control_directory, resolve_settings, unknown_variables
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
    local_sockets,
    locate_socket,
    shape_problem,
)

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
# A node's doctor run: discovery (at most 2 s) and handshakes bounded by the node's
# connect and handshake timeouts, 16 at a time; generous for a big cluster.
DOCTOR_TIME_LIMIT = 120.0

STATUS_DESCRIPTION = """\
Show the local node: its members (name, release, state, address), the namespaces it
tracks with their entry counts and schema versions, and its last drain report. A table
for people; --json prints the node's answer as one JSON object for scripts.

With several nodes on this machine (worker processes: the first has the configured
control socket, each other one the same name with -PORT, e.g. shop-4371.sock), --all
shows every one of them: a line each, then each node's status; --socket-dir DIR does
the same for every socket in DIR. Exits 0 only if every one answered.
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

With --socket PATH the node running there does all this with its own settings, not this
shell's environment: the table shows the values it runs with and where each came from
(argument, HANDOFF_* variable, platform or default); the cookie only as its length.
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
    which = status.add_mutually_exclusive_group()
    which.add_argument("--socket", metavar="PATH", help=SOCKET_HELP)
    which.add_argument(
        "--all",
        action="store_true",
        help="every local node of the cluster: HANDOFF_CONTROL_SOCKET's (else "
        "HANDOFF_CLUSTER's default) socket and its workers' NAME-PORT.sock beside it; "
        "without either, every socket of yours in the default directory",
    )
    which.add_argument(
        "--socket-dir",
        metavar="DIR",
        help="every node whose control socket is in DIR (e.g. handoff simulate --socket-dir)",
    )
    status.add_argument(
        "--json",
        action="store_true",
        help="print the node's status as one JSON object (with --all or --socket-dir: "
        '{"nodes": [{"socket": ..., "status": ...} or {"socket": ..., "error": ...}]})',
    )

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
    if args.all or args.socket_dir is not None:
        return _status_all(args)
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


@dataclass(slots=True)
class _NodeAnswer:
    """One socket's answer for ``status --all``: the status, or why there is none."""

    socket: Path
    status: dict[str, Any] | None = None
    error: str | None = None
    exit_code: int = 0


async def _ask_each(paths: Sequence[Path]) -> list[_NodeAnswer]:
    answers = [_NodeAnswer(path) for path in paths]

    async def ask(answer: _NodeAnswer) -> None:
        try:
            reply = await call(
                answer.socket,
                {"command": "status"},
                time_limit=STATUS_TIME_LIMIT,
                shape={"status": STATUS_SHAPE},
            )
            answer.status = reply["status"]
        except ControlError as exc:
            answer.error = str(exc)
            answer.exit_code = _exit_code(exc)

    # At once: a node that does not answer costs one time limit, not one per node.
    async with anyio.create_task_group() as tasks:
        for answer in answers:
            tasks.start_soon(ask, answer)
    return answers


def _status_all(args: argparse.Namespace) -> int:
    paths = local_sockets(args.socket_dir)
    if not paths:
        where = f"in {args.socket_dir}" if args.socket_dir is not None else "here"
        raise NoNodeRunning(
            f"no node is running {where}: no control socket found (the nodes' sockets are "
            "HANDOFF_CONTROL_SOCKET and NAME-PORT.sock beside it, else "
            f"{control_directory()}/CLUSTER[-PORT].sock)"
        )
    answers = anyio.run(_ask_each, paths)
    if args.json:
        _print_json(
            {
                "nodes": [
                    {"socket": str(a.socket), "status": a.status}
                    if a.status is not None
                    else {"socket": str(a.socket), "error": a.error}
                    for a in answers
                ]
            }
        )
    else:
        for line in _status_all_lines(answers):
            print(line)
    for answer in answers:
        if answer.error is not None:
            print(
                f"handoff status: error: {answer.socket}: {answer.error}",
                file=sys.stderr,
            )
    failed = [a.exit_code for a in answers if a.exit_code]
    return failed[0] if failed else 0


def _status_all_lines(answers: Sequence[_NodeAnswer]) -> list[str]:
    t = peer_text
    rows = []
    for answer in answers:
        status = answer.status
        if status is None:
            rows.append((answer.socket.name, "-", "-", "no answer", "-", "-", "-", "-"))
            continue
        counts = [n["entries"] for n in status["tracked"]]
        entries = "?" if None in counts else str(sum(counts))
        rows.append(
            (
                answer.socket.name,
                t(status["node"]),
                t(status["release"]),
                t(status["state"]),
                "yes" if status["warm"] else "no",
                t(status["address"] or "-"),
                str(len(status["members"]) - 1),
                entries,
            )
        )
    answered = sum(a.status is not None for a in answers)
    directories = sorted({str(a.socket.parent) for a in answers})
    lines = [f"{answered} of {len(answers)} local nodes answer ({', '.join(directories)})", ""]
    lines += _table(
        ("SOCKET", "NODE", "RELEASE", "STATE", "WARM", "ADDRESS", "PEERS", "ENTRIES"), rows
    )
    for answer in answers:
        lines += ["", f"== {answer.socket} =="]
        if answer.status is None:
            lines.append(f"no answer: {answer.error}")
        else:
            lines += _status_lines(answer.status)
    return lines


def _exit_code(exc: ControlError) -> int:
    if isinstance(exc, NoNodeRunning):
        return EXIT_NO_NODE
    if isinstance(exc, ControlPermissionError):
        return EXIT_PERMISSION
    return EXIT_CONTROL_ERROR


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
                + (
                    f", {streamed} changes streamed since"
                    if type(streamed := precopy.get("streamed")) is int and streamed
                    else ""
                )
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


async def _doctor_checks(socket_arg: str | None, environ: Mapping[str, str]) -> DoctorReport:
    """Doctor with this shell's environment, as a node started here would read it."""
    report = DoctorReport()
    name = doctor_name()
    try:
        settings = resolve_settings(environ=environ, name=name)
    except ConfigError as exc:
        report.problems.append(
            Problem(str(exc), "set the variable as the message says, as the nodes have it")
        )
        return report
    for unknown in unknown_variables(environ):
        report.problems.append(
            Problem(unknown, "rename or remove the variable (the node ignores it too)")
        )
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
    return await check_settings(settings, report, name=name, origin="environment")


async def _node_doctor(socket_arg: str) -> DoctorReport:
    """Doctor run by the node at ``socket_arg`` with its own settings."""
    path = locate_socket(socket_arg)
    reply = await call(
        path,
        {"command": "doctor"},
        time_limit=DOCTOR_TIME_LIMIT,
        # The local node's status in it is shown as a status is: checked alike.
        shape={"doctor": {**DOCTOR_SHAPE, "local": (type(None), STATUS_SHAPE)}},
    )
    return DoctorReport.from_dict(reply["doctor"])


def _doctor_lines(report: DoctorReport) -> list[str]:
    lines = [f"handoff doctor: cluster {peer_text(report.cluster or '(unknown)')}"]
    if report.origin != "environment":
        lines.append(f"settings and checks of {peer_text(report.origin, 300)}")
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
    if args.socket is not None:
        # The node's own settings, checked from the node: not this shell's environment.
        report = anyio.run(_node_doctor, args.socket)
    else:
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
