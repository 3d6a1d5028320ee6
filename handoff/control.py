"""The local control endpoint: a Unix socket the ``handoff`` CLI uses to talk to a node.

A running node serves it on ``HANDOFF_CONTROL_SOCKET`` (default
``${XDG_RUNTIME_DIR or /tmp}/handoff-<uid>/<cluster>.sock``; ``none`` disables it). Only
processes of the node's own user, or root, may use it: the socket is mode 0600, the default
directory mode 0700, and the server checks the peer's credentials (``SO_PEERCRED`` on Linux)
before it reads a byte. A default directory that is not this user's own (another user made
it, it is a link, or others may write it) is left alone: the node serves in a fresh private
``handoff-<uid>-XXXXXXXX`` directory beside it instead, where :func:`locate_socket` looks
next. So a squatter can neither answer in the node's name nor leave it without a socket.

The client trusts only a socket of its own user, reached without a symbolic link, in a
directory nobody else can write; every reply line is checked against the shape the CLI
reads (:func:`shape_problem`) before anything of it is shown.

The protocol is JSON lines, one request per connection. The client sends one object, the
server answers with zero or more ``progress`` lines and one final ``result`` or ``error``
line, then closes::

    {"command": "status"}                     -> {"type": "result", "status": {...}}
    {"command": "drain", "timeout": 5}        -> {"type": "progress", "event": "started", ...}
                                                 {"type": "progress", "event": "namespace", ...}
                                                 {"type": "result",
                                                  "report": {..., "ok": true, "summary": ...}}
    {"command": "wait-ready", "timeout": 30}  -> {"type": "result", "warm": true, "reason": ...}
    {"command": "doctor"}                     -> {"type": "result", "doctor": {...}}
    anything wrong                            -> {"type": "error", "code": ..., "error": ...}

Everything is bounded: the request size, the time to send it, the time each reply line may
take to be written, and the number of control connections served at once.

A drain asked for here runs in the server's own task group, not the connection's: a client
that goes away (Ctrl-C on ``handoff drain``) must not cut a drain short half way.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import math
import os
import pwd
import re
import socket
import stat
import struct
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from anyio.abc import SocketAttribute
from anyio.streams.buffered import BufferedByteReceiveStream

from handoff._doctor import DoctorReport, Problem, check_settings, doctor_name
from handoff._errors import ConfigError, HandoffError
from handoff._text import peer_text
from handoff.config import control_directory, default_control_socket
from handoff.engine import DrainReport, NamespaceReport
from handoff.protocol import NodeState

if TYPE_CHECKING:
    from handoff.node import Node

__all__ = (
    "MAX_ANNOUNCED_TIMEOUT",
    "MAX_CONNECTIONS",
    "MAX_REQUEST_BYTES",
    "PRECOPY_SHAPE",
    "READ_TIMEOUT",
    "RECEIVED_SHAPE",
    "REPORT_SHAPE",
    "STATUS_SHAPE",
    "WAIT_READY_SHAPE",
    "AmbiguousSocket",
    "ControlError",
    "ControlPermissionError",
    "ControlServer",
    "ControlSocketError",
    "MapOf",
    "NoControlSocket",
    "NoNodeRunning",
    "call",
    "local_sockets",
    "locate_socket",
    "node_status",
    "peer_uid",
    "shape_problem",
    "squatted",
    "uid_allowed",
)

logger = logging.getLogger("handoff.control")

#: Largest request line the server reads; requests are a few dozen bytes.
MAX_REQUEST_BYTES = 4096
#: Seconds a client has to send its request once connected.
READ_TIMEOUT = 5.0
#: Seconds one reply line may take to be written before the client counts as gone.
WRITE_TIMEOUT = 5.0
#: Control connections served at once; more are answered "busy" and closed.
MAX_CONNECTIONS = 16
#: Upper bound of a request's ``timeout``: an hour is longer than any drain or warm-up.
MAX_REQUEST_TIMEOUT = 3600.0
#: Longest deadline the CLI believes a node announces (a larger one is cut to this).
MAX_ANNOUNCED_TIMEOUT = MAX_REQUEST_TIMEOUT
#: Largest reply line the client accepts (a status of a big cluster is a few hundred KiB).
MAX_REPLY_BYTES = 16 * 1024 * 1024
# Progress lines are for people watching: coalesce acknowledgements into one line per
# namespace at most this often instead of one per chunk.
PROGRESS_INTERVAL = 0.2
# A starting node holds the directory lock for a few system calls; waiting longer than
# this means the holder is stuck (a stopped process) and we had better say so.
_LOCK_TIMEOUT = 2.0
_PROBE_TIMEOUT = 1.0
# How long a refused client may take to stop sending before its connection is closed.
_LINGER = 1.0
# The client's patience beyond the deadline the node announced (its drain deadline is hard,
# invariant 7; this covers writing the report and scheduling delays).
_CLIENT_GRACE = 10.0
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ControlError(HandoffError):
    """The CLI could not get an answer from the local node's control socket."""


class NoNodeRunning(ControlError):
    """No node serves the control socket (nothing there, or a stale socket file)."""


class NoControlSocket(NoNodeRunning):
    """The configuration says the node serves no control socket (``none``): waiting for one
    is pointless."""


class ControlPermissionError(ControlError):
    """The control socket belongs to another user, or the node refused this user."""


class AmbiguousSocket(ControlError):
    """Several nodes' sockets are in the default directory and nothing says which one."""


class ControlSocketError(ConfigError):
    """The node cannot serve its control socket (in use by another node, not a socket,
    a directory that is not this user's). Raised by ``Node.start`` when
    ``HANDOFF_CONTROL_SOCKET`` names the path; with the default path it is logged and the
    node runs without a control socket."""


# -- who may talk ---------------------------------------------------------------------------


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket, ``None`` where the
    platform cannot tell (no ``SO_PEERCRED``: then file permissions alone protect it)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    try:
        data = sock.getsockopt(socket.SOL_SOCKET, option, _PEERCRED.size)
    except OSError:
        return None
    _pid, uid, _gid = _PEERCRED.unpack(data)
    return int(uid)


def uid_allowed(uid: int) -> bool:
    """Whether a process of ``uid`` may use this process's control socket: the same user,
    or root."""
    return uid in (0, os.geteuid())


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


# -- what the node tells ----------------------------------------------------------------------


def _report_dict(report: DrainReport) -> dict[str, Any]:
    return {**report.as_dict(), "ok": report.ok, "summary": report.summary()}


def _progress_dict(report: NamespaceReport) -> dict[str, Any]:
    return {
        "type": "progress",
        "event": "namespace",
        "namespace": report.namespace,
        "version": report.version,
        "records": report.records,
        "sent": report.sent,
        "acknowledged": report.acknowledged,
        "snapshotted": report.snapshotted,
        "dropped": sum(report.dropped.values()),
        "successors": list(report.successors),
    }


def _entries(node: Node, name: str) -> int | None:
    try:
        return len(node.tracked[name].adapter)
    except Exception:  # a third-party adapter's __len__ must not break status
        logger.debug("len() of the adapter of %r failed", name, exc_info=True)
        return None


def node_status(node: Node) -> dict[str, Any]:
    """What ``handoff status`` shows (and ``node.stats()`` returns): this node, its
    members, tracked state, the last drain and the last handoff received."""
    tracked = node.tracked
    members: list[dict[str, Any]] = [
        {
            "name": node.name,
            "release": node.release,
            "state": node.state.value,
            "address": node.address,
            "self": True,
            "started_at": node.started_at,
            "namespaces": {name: t.version for name, t in sorted(tracked.items())},
            "clock_offset": 0.0,
        }
    ]
    members += [
        {
            "name": peer.name,
            "release": peer.release,
            "state": peer.state.value,
            "address": peer.address,
            "self": False,
            "started_at": peer.started_at,
            "namespaces": dict(sorted(peer.namespaces.items())),
            "clock_offset": round(peer.clock_offset, 3) + 0.0,  # no -0.0
        }
        for peer in node.peers()
    ]
    report = node.last_drain_report
    received = node.last_received
    return {
        "node": node.name,
        "cluster": node.cluster,
        "release": node.release,
        "state": node.state.value,
        "address": node.address,
        "pid": os.getpid(),
        "port": node.port,
        "started_at": node.started_at,
        "warm": node.is_warm,
        "warm_reason": node.warm_reason,
        "members": members,
        "tracked": [
            {
                "namespace": name,
                "kind": t.adapter.kind,
                "entries": _entries(node, name),
                "version": t.version,
                "spread": t.effective_spread,
            }
            for name, t in sorted(tracked.items())
        ],
        "last_drain": None if report is None else _report_dict(report),
        "last_received": None
        if received is None
        else {
            "peer": received.peer,
            "release": received.release,
            "records": received.records,
            "at": received.at,
            "applied": received.applied,
            "kept": received.kept,
            "dropped": dict(sorted(received.dropped.items())),
        },
        "join_error": node.join_error,
        "precopy": node._precopy_status(),
    }


# -- the server -----------------------------------------------------------------------------


class _BadRequest(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _request_timeout(request: Mapping[str, Any]) -> float | None:
    value = request.get("timeout")
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 < value <= MAX_REQUEST_TIMEOUT
    ):
        raise _BadRequest(
            "bad-request",
            f"timeout must be a number of seconds in (0, {MAX_REQUEST_TIMEOUT:g}], not {value!r}",
        )
    return float(value)


@dataclass(slots=True)
class _DrainWatch:
    """Progress of one drain as one control connection sees it (latest per namespace)."""

    latest: dict[str, dict[str, Any]] = field(default_factory=dict)
    wake: anyio.Event = field(default_factory=anyio.Event)
    finished: anyio.Event = field(default_factory=anyio.Event)
    report: DrainReport | None = None
    error: str = ""

    def update(self, report: NamespaceReport) -> None:
        self.latest[report.namespace] = _progress_dict(report)
        self.wake.set()

    def finish(self) -> None:
        self.finished.set()
        self.wake.set()

    def take(self) -> list[dict[str, Any]]:
        items = list(self.latest.values())
        self.latest.clear()
        self.wake = anyio.Event()
        return items


async def _send(stream: anyio.abc.ByteStream, message: Mapping[str, Any]) -> None:
    # Bounded: a client that stops reading must not hold a connection slot forever.
    with anyio.fail_after(WRITE_TIMEOUT):
        await stream.send(json.dumps(message, separators=(",", ":")).encode() + b"\n")


def _error(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "error": message}


class ControlServer:
    """Serves one node's control socket. Built by :meth:`open`; the node runs :meth:`serve`
    in its task group and calls :meth:`aclose` when it stops."""

    def __init__(
        self,
        node: Node,
        listener: anyio.abc.SocketListener,
        path: Path,
        identity: tuple[int, int],
        fresh: Path | None = None,
    ) -> None:
        self.node = node
        self.path = path
        """The socket's path."""
        self._listener = listener
        self._identity = identity
        self._fresh = fresh
        self._active = 0
        self._refusing = 0
        self._tasks: anyio.abc.TaskGroup | None = None

    @classmethod
    async def open(cls, node: Node, path: Path, *, explicit: bool) -> ControlServer | None:
        """Listen on ``path``, replacing a stale socket file left by a node that died.

        ``explicit``: the path came from ``HANDOFF_CONTROL_SOCKET`` (or the argument); then
        any problem raises :class:`ControlSocketError`. For the default path a problem is a
        warning and ``None`` is returned: several nodes of one cluster on one host (tests,
        gunicorn workers) are legitimate, and only one of them can have the default socket.
        """
        try:
            listener, identity, path, fresh = await _listen(path, explicit=explicit)
        except ControlSocketError as exc:
            if explicit:
                raise
            logger.warning("%s; %s runs without a control socket", exc, node.name)
            return None
        logger.info("%s: control socket for the handoff CLI at %s", node.name, path)
        return cls(node, listener, path, identity, fresh)

    async def aclose(self) -> None:
        """Stop listening and remove the socket file (if it is still this server's)."""
        with contextlib.suppress(OSError):
            # While our listener is open nobody else takes the path over (they would find
            # it alive), so the file there is ours if it is the one we made.
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)
        if self._fresh is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self._fresh)  # only if empty: never anything another put there
        await self._listener.aclose()

    async def serve(self) -> None:
        """Accept control connections until the listener is closed or the task cancelled."""
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            while True:
                try:
                    stream = await self._listener.accept()
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    return
                except OSError as exc:
                    # Out of file descriptors and the like: back off instead of spinning.
                    logger.warning("accepting a control connection failed: %s", exc)
                    await anyio.sleep(0.1)
                    continue
                if self._active < MAX_CONNECTIONS:
                    self._active += 1
                    tasks.start_soon(self._handle, stream)
                elif self._refusing < MAX_CONNECTIONS:
                    self._refusing += 1
                    tasks.start_soon(self._refuse_busy, stream)
                else:  # a flood: not even a word for it
                    await anyio.aclose_forcefully(stream)

    async def _refuse_busy(self, stream: anyio.abc.SocketStream) -> None:
        try:
            async with stream:
                message = (
                    f"{self.node.name} is serving {MAX_CONNECTIONS} control connections "
                    "already; try again"
                )
                await _last_word(stream, _error("busy", message))
        except Exception:
            logger.debug("could not tell a control client the server is busy", exc_info=True)
        finally:
            self._refusing -= 1

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        try:
            async with stream:
                await self._serve_one(stream)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, TimeoutError, OSError):
            logger.debug("control client went away", exc_info=True)
        except Exception:
            # A bug of ours must cost one control connection, never the node.
            logger.exception("internal error serving a control request")
        finally:
            self._active -= 1

    async def _serve_one(self, stream: anyio.abc.SocketStream) -> None:
        uid = peer_uid(stream.extra(SocketAttribute.raw_socket))
        if uid is not None and not uid_allowed(uid):
            logger.warning("refused a control connection from %s", _user(uid))
            message = (
                f"{_user(uid)} may not use the control socket of {self.node.name}: only its "
                f"own user ({_user(os.geteuid())}) and root may"
            )
            await _last_word(stream, _error("forbidden", message))
            return
        try:
            request = await _read_request(stream)
            if request is None:
                return  # connected and left without asking: a liveness probe
            command = request.get("command")
            if command == "status":
                await _send(stream, {"type": "result", "status": node_status(self.node)})
            elif command == "drain":
                await self._drain(stream, _request_timeout(request))
            elif command == "wait-ready":
                await self._wait_ready(stream, _request_timeout(request))
            elif command == "doctor":
                await self._doctor(stream)
            else:
                raise _BadRequest(
                    "unknown-command",
                    f"unknown command {command!r}; known: status, drain, wait-ready, doctor",
                )
        except _BadRequest as exc:
            await _last_word(stream, _error(exc.code, str(exc)))

    async def _doctor(self, stream: anyio.abc.ByteStream) -> None:
        """``handoff doctor --socket``: the checks, with this node's settings as it runs
        with them (the worker's port and name included), from this node's host."""
        node = self.node
        settings = node.settings
        report = DoctorReport(local=node_status(node))
        for warning in settings.warnings:
            report.problems.append(
                Problem(
                    warning,
                    "the node logged this at start: change the setting it names and restart",
                    "warning",
                )
            )
        if settings.bind_port not in (0, node.port):
            report.notes.append(
                f"{node.name} listens on port {node.port}: its configured port "
                f"{settings.bind_port} was in use (a sibling worker's)"
            )
        origin = f"the running node {node.name} (pid {os.getpid()}, control socket {self.path})"

        async def run() -> None:
            await check_settings(settings, report, name=doctor_name(), origin=origin)

        if await _unless_hung_up(stream, run):
            await _send(stream, {"type": "result", "doctor": report.as_dict()})

    async def _wait_ready(self, stream: anyio.abc.ByteStream, seconds: float | None) -> None:
        node = self.node
        limit = seconds if seconds is not None else node.settings.warmup_timeout
        started = anyio.current_time()

        async def wait() -> None:
            with anyio.move_on_after(limit):
                await node.wait_warm()

        if not await _unless_hung_up(stream, wait):
            return
        await _send(
            stream,
            {
                "type": "result",
                "node": node.name,
                "warm": node.is_warm,
                "reason": node.warm_reason,
                "waited": round(anyio.current_time() - started, 3),
            },
        )

    async def _drain(self, stream: anyio.abc.ByteStream, seconds: float | None) -> None:
        node = self.node
        assert self._tasks is not None
        watch = _DrainWatch()
        started = {
            "type": "progress",
            "event": "started",
            "node": node.name,
            "timeout": seconds if seconds is not None else node.settings.drain_timeout,
            "already": node.last_drain_report is not None or node.state is NodeState.DRAINING,
            "namespaces": sorted(node.tracked),
        }

        async def report_progress() -> None:
            await _send(stream, started)
            while True:
                await watch.wake.wait()
                for item in watch.take():
                    await _send(stream, item)
                if watch.finished.is_set():
                    return
                # Coalesce acknowledgements into one line per interval, but never wait
                # past the end of the drain.
                with anyio.move_on_after(PROGRESS_INTERVAL):
                    await watch.finished.wait()

        with node.watch_drain(watch.update):
            self._tasks.start_soon(self._run_drain, seconds, watch)
            if not await _unless_hung_up(stream, report_progress):
                return  # the drain goes on in the server's task group
        if watch.report is None:
            await _send(stream, _error("drain-failed", watch.error or "the drain did not finish"))
            return
        await _send(stream, {"type": "result", "report": _report_dict(watch.report)})

    async def _run_drain(self, seconds: float | None, watch: _DrainWatch) -> None:
        try:
            watch.report = await self.node.drain(timeout=seconds)
        except Exception as exc:
            logger.exception("drain asked for on the control socket failed")
            watch.error = f"the drain failed: {type(exc).__name__}: {exc}"
        finally:
            watch.finish()


async def _last_word(stream: anyio.abc.SocketStream, message: Mapping[str, Any]) -> None:
    """Send a final error line to a client whose request may not have been read (whole).

    Closing a Unix socket with unread data resets the connection, and the client would
    then lose this line: so half-close, and read and drop what it sends, for a moment.
    """
    await _send(stream, message)
    with anyio.move_on_after(_LINGER), contextlib.suppress(Exception):
        await stream.send_eof()
        while await stream.receive(MAX_REQUEST_BYTES):
            pass


async def _unless_hung_up(
    stream: anyio.abc.ByteStream, work: Callable[[], Awaitable[None]]
) -> bool:
    """Run ``work``, but stop if the client hangs up (or says more than its one request)
    first, so that a long wait does not hold a connection slot for a client that is gone.
    Returns whether ``work`` finished."""
    finished = False
    error: Exception | None = None
    async with anyio.create_task_group() as tasks:

        async def watch() -> None:
            with contextlib.suppress(Exception):
                await stream.receive()
            tasks.cancel_scope.cancel()

        tasks.start_soon(watch)
        try:
            await work()
            finished = True
        except Exception as exc:
            # Raised after the group, unwrapped: the caller handles a broken stream itself.
            error = exc
        tasks.cancel_scope.cancel()
    if error is not None:
        raise error
    return finished


async def _read_request(stream: anyio.abc.ByteStream) -> dict[str, Any] | None:
    buffered = BufferedByteReceiveStream(stream)
    try:
        with anyio.fail_after(READ_TIMEOUT):
            line = await buffered.receive_until(b"\n", MAX_REQUEST_BYTES)
    except TimeoutError:
        raise _BadRequest("timeout", f"no request line within {READ_TIMEOUT:g} s") from None
    except anyio.DelimiterNotFound:
        raise _BadRequest(
            "too-large", f"request longer than {MAX_REQUEST_BYTES} bytes without a newline"
        ) from None
    except (anyio.IncompleteRead, anyio.EndOfStream):
        return None
    try:
        request = json.loads(line)
    except ValueError:
        raise _BadRequest("bad-request", "the request is not a JSON object") from None
    if not isinstance(request, dict):
        raise _BadRequest("bad-request", "the request is not a JSON object")
    return request


async def _listen(
    path: Path, *, explicit: bool
) -> tuple[anyio.abc.SocketListener, tuple[int, int], Path, Path | None]:
    """Listen on ``path``; returns the listener, the socket's identity, the path actually
    used and the fresh private directory made for it (``None`` when the usual one served)."""
    origin = (
        "HANDOFF_CONTROL_SOCKET"
        if explicit
        else "the default; set HANDOFF_CONTROL_SOCKET to another path, or none"
    )
    where = f"control socket {path} ({origin})"
    directory = path.parent
    fresh: Path | None = None
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not explicit:
            fresh = _private_or_fresh(directory, where)
            if fresh is not None:
                directory, path = fresh, fresh / path.name
        fd = os.open(directory, os.O_RDONLY)
    except OSError as exc:
        raise ControlSocketError(
            f"{where}: cannot use the directory {directory}: {exc.strerror or exc}"
        ) from exc
    try:
        await _lock(fd, where)
        # Blocking calls (a connect that may wait on a full backlog): off the event loop.
        await anyio.to_thread.run_sync(_clear_stale, path, where)
        try:
            listener = await anyio.create_unix_listener(path, mode=0o600)
        except OSError as exc:
            raise ControlSocketError(f"{where}: cannot listen: {exc.strerror or exc}") from exc
        try:
            st = os.lstat(path)
        except OSError as exc:
            await listener.aclose()
            raise ControlSocketError(f"{where}: vanished after binding: {exc}") from exc
        return listener, (st.st_dev, st.st_ino), path, fresh
    finally:
        os.close(fd)  # releases the lock


def squatted(st: os.stat_result, directory: Path) -> str | None:
    """Why ``directory`` (its lstat ``st``) cannot hold this user's control sockets, or
    ``None``: it must be a real directory (not a link) of this user nobody else can write."""
    if stat.S_ISLNK(st.st_mode):
        return f"{directory} is a symbolic link, not a directory"
    if not stat.S_ISDIR(st.st_mode):
        return f"{directory} is not a directory"
    if st.st_uid != os.geteuid():
        return (
            f"the directory {directory} belongs to {_user(st.st_uid)}, not to this user "
            f"({_user(os.geteuid())})"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        return f"the directory {directory} is writable by others (mode {mode:04o})"
    return None


def _private_or_fresh(directory: Path, where: str) -> Path | None:
    """The default directory sits in a shared place (/tmp): use it if it is ours and nobody
    else can write it (made 0700), else make a fresh private one beside it and return that.

    A squatter must not leave the node without a socket: the fresh directory
    (``handoff-<uid>-XXXXXXXX``) is where the CLI looks next (:func:`locate_socket`).
    """
    st = os.lstat(directory)  # a symlink planted there by someone else must not be followed
    problem = squatted(st, directory)
    if problem is None:
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(directory, 0o700)
        return None
    fresh = Path(tempfile.mkdtemp(prefix=directory.name + "-", dir=directory.parent))
    logger.warning(
        "%s: %s; someone else could answer in this node's name there, so the node is serving "
        "it in a fresh private directory, %s (the handoff CLI finds it there). Remove %s to "
        "get the usual path back",
        where,
        problem,
        fresh,
        directory,
    )
    return fresh


async def _lock(fd: int, where: str) -> None:
    """Lock the socket's directory so that two nodes starting at once do not both find a
    stale socket and remove each other's fresh one."""
    import fcntl  # POSIX only, like Unix sockets themselves

    deadline = anyio.current_time() + _LOCK_TIMEOUT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if anyio.current_time() >= deadline:
                raise ControlSocketError(
                    f"{where}: its directory stayed locked by another starting node for "
                    f"{_LOCK_TIMEOUT:g} s"
                ) from None
        # flock has no asynchronous wait, and the holder keeps it for a few system calls.
        await anyio.sleep(0.01)


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(_PROBE_TIMEOUT)
        try:
            probe.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True  # busy (backlog full) or not ours to replace: either way, not stale
        return True


def _clear_stale(path: Path, where: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlSocketError(
            f"{where}: {path} exists and is not a socket; remove it or choose another path"
        )
    if _answers(path):
        raise ControlSocketError(
            f"{where}: another live node already serves it; give each node on this host its "
            "own HANDOFF_CONTROL_SOCKET (or none)"
        )
    # Nobody answers: a node that was killed before it could clean up.
    os.unlink(path)
    logger.info("replaced the stale control socket %s", path)


# -- the client -----------------------------------------------------------------------------

_HOW_TO_POINT = "point the CLI at the node's socket with --socket PATH or HANDOFF_CONTROL_SOCKET"


def _fallback_directories(directory: Path) -> list[Path]:
    """The fresh private directories nodes made beside a squatted default ``directory``."""
    found = []
    try:
        candidates = sorted(directory.parent.glob(glob.escape(directory.name) + "-*"))
    except OSError:
        return []
    for candidate in candidates:
        with contextlib.suppress(OSError):
            if squatted(os.lstat(candidate), candidate) is None:
                found.append(candidate)
    return found


def _sockets(directories: list[Path], name: str = "*.sock") -> list[Path]:
    found = []
    for directory in directories:
        with contextlib.suppress(OSError):
            found += [p for p in directory.glob(name) if stat.S_ISSOCK(os.lstat(p).st_mode)]
    return found


def _usable(directory: Path) -> bool:
    try:
        return squatted(os.lstat(directory), directory) is None
    except OSError:
        return False


def _default_socket(path: Path) -> Path:
    """``path`` in the default directory, or where a node went when that was squatted."""
    directory = path.parent
    if _usable(directory) and path.exists():
        return path
    # The newest: older ones are left by nodes that were killed.
    found = _sockets(_fallback_directories(directory), glob.escape(path.name))
    if found:
        return max(found, key=lambda p: os.lstat(p).st_mtime)
    if directory.exists() and not _usable(directory):
        raise ControlPermissionError(
            f"the control socket directory {directory} is not a private directory of yours "
            f"(someone else's, a link, or writable by others), and no node serves in a fresh "
            f"directory beside it; remove it, or {_HOW_TO_POINT}"
        )
    return path


def locate_socket(
    explicit: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Path:
    """The control socket the CLI should use: ``explicit`` (``--socket``), else
    ``HANDOFF_CONTROL_SOCKET``, else the default path of ``HANDOFF_CLUSTER`` (or
    ``FLY_APP_NAME``), else the only socket in the default directory.

    The default directory counts only if it is a real directory of this user that nobody
    else can write; if it is not (squatted), the fresh private directories that nodes
    then make beside it (``handoff-<uid>-*``) are searched instead.
    """
    env = os.environ if environ is None else environ
    if explicit is not None:
        return Path(explicit)
    configured = env.get("HANDOFF_CONTROL_SOCKET", "").strip()
    if configured.lower() == "none":
        raise NoControlSocket(
            "HANDOFF_CONTROL_SOCKET is 'none' here: the node serves no control socket. "
            "Give it one, or pass --socket PATH"
        )
    if configured:
        return Path(configured)
    cluster = env.get("HANDOFF_CLUSTER", "").strip() or env.get("FLY_APP_NAME", "").strip()
    if cluster:
        return _default_socket(default_control_socket(cluster, env))
    directory = control_directory(env)
    usual = [directory] if _usable(directory) else []
    found = sorted(_sockets(usual + _fallback_directories(directory)))
    if len(found) == 1:
        return found[0]
    if not found:
        raise NoNodeRunning(
            f"no node is running here: no control socket in {directory} (and neither "
            f"HANDOFF_CLUSTER nor HANDOFF_CONTROL_SOCKET is set). Start the node, or "
            f"{_HOW_TO_POINT}"
        )
    raise AmbiguousSocket(
        f"several nodes' control sockets in {directory}: "
        f"{', '.join(p.name for p in found)}; pick one with --socket PATH or HANDOFF_CLUSTER"
    )


def _worker_sockets(directories: list[Path], path: Path) -> list[Path]:
    """``path`` and its workers' sockets (``NAME-PORT.sock``, see
    :func:`handoff.config.for_worker`) in each of ``directories``."""
    pattern = re.compile(re.escape(path.stem) + r"(-[0-9]+)?" + re.escape(path.suffix))
    found = _sockets(directories, glob.escape(path.stem) + "*" + glob.escape(path.suffix))
    return [p for p in found if pattern.fullmatch(p.name)]


def local_sockets(
    directory: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[Path]:
    """Every control socket of this user's nodes here, for ``handoff status --all``:
    those in ``directory`` (``--socket-dir``) if given; else ``HANDOFF_CONTROL_SOCKET``'s
    and its workers' (``NAME-PORT.sock`` beside it); else those of ``HANDOFF_CLUSTER`` (or
    ``FLY_APP_NAME``) and its workers in the default directory; else every socket there.

    A worker deployment (several nodes per machine, see ``HANDOFF_PORT_RANGE``) gives the
    first node the configured socket and each other one the same name with ``-PORT``. Sockets
    of nodes that died are listed too: asking them says so. Sorted by path.
    """
    env = os.environ if environ is None else environ
    if directory is not None:
        folder = Path(directory)
        if not folder.is_dir():
            raise NoNodeRunning(f"no node is running here: {folder} is not a directory")
        return sorted(_sockets([folder]))
    configured = env.get("HANDOFF_CONTROL_SOCKET", "").strip()
    if configured.lower() == "none":
        raise NoControlSocket(
            "HANDOFF_CONTROL_SOCKET is 'none' here: the nodes serve no control socket. "
            "Give them one, or pass --socket-dir DIR"
        )
    if configured:
        path = Path(configured)
        return sorted(_worker_sockets([path.parent], path))
    default = control_directory(env)
    directories = ([default] if _usable(default) else []) + _fallback_directories(default)
    cluster = env.get("HANDOFF_CLUSTER", "").strip() or env.get("FLY_APP_NAME", "").strip()
    if cluster:
        return sorted(_worker_sockets(directories, default_control_socket(cluster, env)))
    return sorted(_sockets(directories))


def _check_socket(path: Path) -> None:
    """Refuse anything but a socket of this user, reached without a planted link, in a
    directory nobody else can swap it in."""
    try:
        st = os.lstat(path)
    except PermissionError:
        raise ControlPermissionError(
            f"cannot reach the control socket {path}: permission denied (it is another "
            f"user's). Run the command as the user the node runs as, or {_HOW_TO_POINT}"
        ) from None
    except OSError:
        raise NoNodeRunning(
            f"no node is running here: nothing at {path}. Start the node, or {_HOW_TO_POINT}"
        ) from None
    if stat.S_ISLNK(st.st_mode):
        raise ControlPermissionError(
            f"{path} is a symbolic link: the CLI does not follow links to a control socket "
            f"(one could lead to another node's); {_HOW_TO_POINT} itself"
        )
    if not stat.S_ISSOCK(st.st_mode):
        raise NoNodeRunning(f"{path} is not a socket, so no node serves there; {_HOW_TO_POINT}")
    if st.st_uid != os.geteuid():
        # Root could connect, but talking to another user's node is almost always the
        # wrong socket; the node's own user can do it (sudo -u).
        raise ControlPermissionError(
            f"the control socket {path} belongs to {_user(st.st_uid)}, not to you "
            f"({_user(os.geteuid())}): run the command as that user, or {_HOW_TO_POINT} "
            "of your own node"
        )
    problem = _parent_problem(path.parent)
    if problem is not None:
        raise ControlPermissionError(
            f"the control socket {path} is not safe to use: {problem}; {_HOW_TO_POINT} in a "
            "directory of yours"
        )


def _parent_problem(directory: Path) -> str | None:
    # Links and directories of this user or root only: only they could have put the socket
    # there. A world-writable directory is fine with the sticky bit (/tmp): then nobody
    # else can replace this user's socket in it.
    trusted = (0, os.geteuid())
    try:
        link = os.lstat(directory)
        st = os.stat(directory)
    except OSError as exc:
        return f"cannot check its directory {directory}: {exc.strerror or exc}"
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in trusted:
        return f"its directory {directory} is a link made by {_user(link.st_uid)}"
    if st.st_uid not in trusted:
        return f"its directory {directory} belongs to {_user(st.st_uid)}"
    if stat.S_IMODE(st.st_mode) & 0o022 and not st.st_mode & stat.S_ISVTX:
        return (
            f"its directory {directory} is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
        )
    return None


async def _connect(path: Path) -> anyio.abc.SocketStream:
    _check_socket(path)
    try:
        stream = await anyio.connect_unix(path)
    except PermissionError:
        raise ControlPermissionError(
            f"cannot connect to the control socket {path}: permission denied. Run the "
            f"command as the user the node runs as, or {_HOW_TO_POINT}"
        ) from None
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            raise NoNodeRunning(
                f"no node is running here: nobody answers at {path} (a socket left by a "
                f"node that exited). Start the node, or {_HOW_TO_POINT}"
            ) from None
        raise ControlError(f"cannot connect to {path}: {exc.strerror or exc}") from None
    # The checks above looked at a path, which can be swapped before the connect: what
    # answers must itself be a process of this user (or root), as the node checks us.
    uid = peer_uid(stream.extra(anyio.abc.SocketAttribute.raw_socket))
    if uid is not None and not uid_allowed(uid):
        await anyio.aclose_forcefully(stream)
        raise ControlPermissionError(
            f"the control socket {path} is served by {_user(uid)}, not by this user: "
            f"refusing to talk to it. {_HOW_TO_POINT}"
        )
    return stream


# -- what the client accepts ------------------------------------------------------------------
#
# A reply is checked against the shape of what the CLI reads from it before anything is
# shown: a node (or whatever answers at the socket) that sends the wrong types gets a
# one-line error, never a traceback. A shape is a type or tuple of types (``bool`` is not
# a number here), a dict of required keys (others are allowed), a one-item list (every
# item has that shape) or a :class:`MapOf`.


@dataclass(frozen=True, slots=True)
class MapOf:
    """A shape: a JSON object with any keys whose values all have the shape ``values``."""

    values: Any


_NUMBER = (int, float)
_TEXT_OR_NONE = (str, type(None))
_INT_OR_NONE = (int, type(None))

STATUS_SHAPE: Any = {
    "node": str,
    "cluster": str,
    "release": str,
    "state": str,
    "address": _TEXT_OR_NONE,
    "pid": int,
    "warm": bool,
    "warm_reason": str,
    "members": [
        {
            "self": bool,
            "name": str,
            "release": str,
            "state": str,
            "address": _TEXT_OR_NONE,
            "namespaces": MapOf(int),
        }
    ],
    "tracked": [{"namespace": str, "kind": str, "entries": _INT_OR_NONE, "version": int}],
    "last_drain": (type(None), {"summary": str}),
}
#: ``last_received`` of a status: optional (nodes before it existed do not send it), so
#: checked on its own where it is shown.
RECEIVED_SHAPE: Any = (
    type(None),
    {"peer": str, "release": str, "records": int, "at": _NUMBER},
)
PRECOPY_SHAPE: Any = {"peer": str, "state": str, "copied": int, "entries": int}
"""One entry of a status's ``precopy`` list (optional: older nodes do not send it)."""
REPORT_SHAPE: Any = {
    "node": str,
    "summary": str,
    "ok": bool,
    "lost": int,
    "dropped": int,
    "receiver_dropped": int,
}
WAIT_READY_SHAPE: Any = {"node": str, "warm": bool, "reason": str}
_PROGRESS_SHAPES: Mapping[str, Any] = {
    "started": {"node": str, "timeout": _NUMBER, "already": bool},
    "namespace": {
        "namespace": str,
        "records": int,
        "acknowledged": int,
        "snapshotted": int,
        "dropped": int,
    },
}
_ERROR_SHAPE: Any = {"code": str, "error": str}


def shape_problem(value: object, shape: Any, where: str = "the reply") -> str | None:
    """What in ``value`` does not have ``shape`` (see above), or ``None``."""
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{where} is not an object"
        for key, inner in shape.items():
            if key not in value:
                return f"{where} has no {key!r}"
            problem = shape_problem(value[key], inner, f"{where}.{key}")
            if problem is not None:
                return problem
        return None
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{where} is not a list"
        for index, item in enumerate(value):
            problem = shape_problem(item, shape[0], f"{where}[{index}]")
            if problem is not None:
                return problem
        return None
    if isinstance(shape, MapOf):
        if not isinstance(value, dict):
            return f"{where} is not an object"
        for key, item in value.items():
            problem = shape_problem(item, shape.values, f"{where}[{peer_text(key, 40)!r}]")
            if problem is not None:
                return problem
        return None
    if isinstance(shape, tuple) and any(isinstance(s, dict | list | MapOf) for s in shape):
        problems = [shape_problem(value, s, where) for s in shape]
        return None if None in problems else problems[-1]
    kinds = shape if isinstance(shape, tuple) else (shape,)
    if isinstance(value, bool) and bool not in kinds:
        return f"{where} is not {_names(kinds)}"
    if not isinstance(value, kinds):
        return f"{where} is not {_names(kinds)}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} is not a finite number"
    return None


def _names(kinds: tuple[type, ...]) -> str:
    words = {str: "text", int: "an integer", float: "a number", bool: "true or false"}
    return " or ".join(words.get(k, "null" if k is type(None) else k.__name__) for k in kinds)


def _malformed(path: Path, problem: str) -> ControlError:
    return ControlError(f"the node at {path} sent a malformed reply: {problem}")


def _raise_reply_error(reply: Mapping[str, Any], path: Path) -> None:
    problem = shape_problem(reply, _ERROR_SHAPE, "the error")
    if problem is not None:
        raise _malformed(path, problem)
    code, message = peer_text(reply["code"], 40), peer_text(reply["error"], 1000)
    if code == "forbidden":
        raise ControlPermissionError(f"the node at {path} refused: {message}")
    raise ControlError(f"the node at {path} answered with an error ({code}): {message}")


async def call(
    path: Path,
    request: Mapping[str, Any],
    *,
    time_limit: float,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    shape: Any = None,
) -> dict[str, Any]:
    """Send one request to the node at ``path`` and return its final ``result`` line.

    ``progress`` lines go to ``on_progress``. ``time_limit`` bounds the whole exchange; the
    first ``started`` line may extend it once, to the deadline it announces (at most
    :data:`MAX_ANNOUNCED_TIMEOUT`) plus a grace. With ``shape``, the result must have it
    (see :func:`shape_problem`); progress lines are always checked before they are passed on.
    Raises :class:`NoNodeRunning`, :class:`ControlPermissionError` or :class:`ControlError`.
    """
    stream = await _connect(path)
    async with stream:
        try:
            await stream.send(json.dumps(dict(request)).encode() + b"\n")
            buffered = BufferedByteReceiveStream(stream)
            deadline = anyio.current_time() + time_limit
            extended = False
            while True:
                with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                    line = await buffered.receive_until(b"\n", MAX_REPLY_BYTES)
                try:
                    reply = json.loads(line)
                except (ValueError, RecursionError):
                    raise ControlError(f"the node at {path} sent a line that is not JSON") from None
                if not isinstance(reply, dict):
                    raise ControlError(f"the node at {path} sent a line that is not an object")
                kind = reply.get("type")
                if kind == "result":
                    problem = None if shape is None else shape_problem(reply, shape)
                    if problem is not None:
                        raise _malformed(path, problem)
                    return reply
                if kind == "error":
                    _raise_reply_error(reply, path)
                if kind != "progress":
                    continue
                progress_shape = _PROGRESS_SHAPES.get(reply.get("event"))  # type: ignore[arg-type]
                if progress_shape is None:
                    continue  # an event this CLI does not know: a newer node's
                problem = shape_problem(reply, progress_shape, "a progress line")
                if problem is not None:
                    raise _malformed(path, problem)
                if reply["event"] == "started" and not extended:
                    # Once: a node that keeps announcing must not keep the CLI forever.
                    extended = True
                    announced = min(max(0.0, float(reply["timeout"])), MAX_ANNOUNCED_TIMEOUT)
                    deadline = max(deadline, anyio.current_time() + announced + _CLIENT_GRACE)
                if on_progress is not None:
                    on_progress(reply)
        except TimeoutError:
            raise ControlError(f"the node at {path} did not answer within the time limit") from None
        except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            raise ControlError(
                f"the node at {path} closed the connection before answering (did it stop?)"
            ) from None
        except anyio.DelimiterNotFound:
            raise ControlError(f"the node at {path} sent a reply line that is too long") from None
