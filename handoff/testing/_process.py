"""Run a node in a child process and watch its membership events, for multi-process tests.

:class:`NodeProcess` starts ``python -c "...handoff.testing._process.main()"`` with the
``HANDOFF_*`` environment you give it. The child builds ``handoff.Node()`` purely from that
environment, writes one JSON object per line to its stdout, and nothing else:

- ``{"event": "listening", "name": ..., "release": ..., "cluster": ..., "address": ...,
  "port": ..., "pid": ...}`` once, first, when the node listens;
- ``{"event": "node-up" | "leaving" | "node-down", "peer": ..., "release": ...,
  "address": ..., "state": ..., "reason": ...}`` for every membership event (``reason``
  is ``None`` except for ``node-down``);
- ``{"event": "stopping", "signal": "SIGTERM"}`` and ``{"event": "stopped"}`` around a clean
  stop, or ``{"event": "error", "message": ...}`` if the node could not start.

It logs to stderr (the ``handoff`` logger, at ``log_level``) and runs until SIGTERM or
SIGINT, then stops the node (saying goodbye to its peers) and exits 0. It also stops when
its stdin reaches end of file, so a test runner that dies leaves no node behind.

The helpers in this module are POSIX-only (signals such as SIGSTOP and SIGKILL).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import IO, Any, Self

import anyio

from handoff import ConfigError, HandoffError, Node, Peer
from handoff.membership import DownReason

__all__ = (
    "NodeProcess",
    "NodeProcessError",
    "free_port",
    "free_port_on_all",
)

logger = logging.getLogger("handoff.testing")

#: Variables a child does not inherit from the parent unless asked to: the node must be
#: configured only by the environment the test gives, not by the machine the test runs on.
_PLATFORM_VARIABLES = ("KUBERNETES_SERVICE_HOST", "POD_IP")
_PLATFORM_PREFIXES = ("HANDOFF_", "FLY_")

_STDERR_TAIL_LINES = 200
_CHILD_CODE = "import sys; from handoff.testing._process import main; sys.exit(main())"

EventPredicate = Callable[[dict[str, Any]], bool]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now.

    The port is found by binding port 0 on ``host`` and closing the socket again, so there
    is a small race: another process may take the port before the node binds it. The node
    then fails to start with ``BindError`` (``address already in use``), which
    :meth:`NodeProcess.wait_ready` reports with the child's stderr; pick a new port and
    retry if that matters to you.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_port_on_all(hosts: Sequence[str], *, attempts: int = 50) -> int:
    """A TCP port that is free on every address of ``hosts`` right now (same race as
    :func:`free_port`). Useful when DNS discovery gives one port for every address.
    """
    if not hosts:
        raise ValueError("free_port_on_all needs at least one host")
    last_error: OSError | None = None
    for _ in range(attempts):
        port = free_port(hosts[0])
        try:
            with contextlib.ExitStack() as stack:
                for host in hosts[1:]:
                    sock = stack.enter_context(
                        socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
                    )
                    sock.bind((host, port))
        except OSError as exc:
            last_error = exc
            continue
        return port
    raise OSError(f"no port free on all of {', '.join(hosts)} in {attempts} tries: {last_error}")


class NodeProcessError(RuntimeError):
    """The node process exited (or could not start) before what was awaited happened."""


def _describe_wait(what: str | EventPredicate, peer: str | None) -> str:
    if isinstance(what, str):
        return f"{what!r} event" + (f" for peer {peer!r}" if peer is not None else "")
    name = getattr(what, "__name__", repr(what))
    return f"an event matching {name}" + (f" for peer {peer!r}" if peer is not None else "")


class NodeProcess:
    """A node running in a child process, driven by a test.

    ``env`` holds the node's configuration (``HANDOFF_COOKIE``, ``HANDOFF_CLUSTER``,
    ``HANDOFF_BIND=127.0.0.2:PORT`` ...); ``HANDOFF_NODE_NAME`` is set to ``name`` unless
    ``env`` gives one. The child inherits the parent's environment (``PATH``, ``PYTHONPATH``
    ...) except ``HANDOFF_*``, ``FLY_*``, ``KUBERNETES_SERVICE_HOST`` and ``POD_IP``, which
    come only from ``env`` unless ``inherit_platform_env`` is true. Pick the port of
    ``HANDOFF_BIND`` with :func:`free_port`, or :func:`free_port_on_all` when DNS discovery
    gives every address the same port (both have a small race, documented there).

    Use it as a context manager, which starts the process and always ends it::

        with NodeProcess(env, name="node-a") as a, NodeProcess(env_b, name="node-b") as b:
            a.wait_ready()
            b.wait_for("node-up", peer="node-a")
            a.kill()
            b.wait_for("node-down", peer="node-a", timeout=5)

    A thread reads the child's stdout: every JSON event line is appended to :attr:`events`
    with one key added, ``received_at``, the parent's :func:`time.monotonic` when the line
    was read (so latencies can be measured against ``time.monotonic()`` in the test).
    ``on_event(event)``, if given, is called from that thread for each event.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        name: str,
        log_level: str = "INFO",
        on_event: Callable[[dict[str, Any]], None] | None = None,
        inherit_platform_env: bool = False,
    ) -> None:
        self.name = name
        self.env: dict[str, str] = {"HANDOFF_NODE_NAME": name, **env}
        self.log_level = log_level
        self._on_event = on_event
        self._inherit = inherit_platform_env
        self._proc: subprocess.Popen[str] | None = None
        self._cond = threading.Condition()
        self._events: list[dict[str, Any]] = []
        self._lines: list[str] = []
        self._stderr: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self._eof = False
        self._paused = False
        self._terminating = False
        self._threads: list[threading.Thread] = []
        self._closed = False

    # -- state ------------------------------------------------------------------------------

    @property
    def events(self) -> list[dict[str, Any]]:
        """The events seen so far, oldest first (a copy)."""
        with self._cond:
            return list(self._events)

    @property
    def lines(self) -> list[str]:
        """Every stdout line so far, including any that were not JSON events (a copy)."""
        with self._cond:
            return list(self._lines)

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._process().pid

    @property
    def returncode(self) -> int | None:
        """The exit code once the child has exited (negative: killed by that signal)."""
        return None if self._proc is None else self._proc.poll()

    @property
    def running(self) -> bool:
        """True between :meth:`start` and the child's exit."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def listening(self) -> dict[str, Any] | None:
        """The ``listening`` event, once the node listens."""
        with self._cond:
            return next((e for e in self._events if e.get("event") == "listening"), None)

    @property
    def port(self) -> int:
        """The port the node listens on (after :meth:`wait_ready`)."""
        return int(self._listening_field("port"))

    @property
    def address(self) -> str:
        """``host:port`` the node advertises to peers (after :meth:`wait_ready`)."""
        return str(self._listening_field("address"))

    def stderr_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines the child wrote to stderr (its log)."""
        with self._cond:
            return "\n".join(list(self._stderr)[-lines:])

    def _listening_field(self, key: str) -> Any:
        event = self.listening
        if event is None:
            raise NodeProcessError(f"{self.name} is not listening yet; call wait_ready() first")
        return event[key]

    def _process(self) -> subprocess.Popen[str]:
        if self._proc is None:
            raise NodeProcessError(f"{self.name} is not started")
        return self._proc

    # -- lifecycle --------------------------------------------------------------------------

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        if not self._inherit:
            for key in list(env):
                if key.startswith(_PLATFORM_PREFIXES) or key in _PLATFORM_VARIABLES:
                    del env[key]
        env.update(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self) -> Self:
        """Start the child; returns at once (see :meth:`wait_ready`)."""
        if self._proc is not None:
            raise NodeProcessError(f"{self.name} was already started")
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CHILD_CODE,
                "--log-level",
                self.log_level,
                "--exit-on-stdin-eof",
            ],
            env=self._child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
        )
        assert self._proc.stdout is not None
        assert self._proc.stderr is not None
        for target, stream in (
            (self._read_stdout, self._proc.stdout),
            (self._read_stderr, self._proc.stderr),
        ):
            thread = threading.Thread(
                target=target, args=(stream,), name=f"NodeProcess {self.name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def _read_stdout(self, stream: IO[str]) -> None:
        try:
            for raw in stream:
                line = raw.rstrip("\n")
                received = time.monotonic()
                event: dict[str, Any] | None = None
                try:
                    decoded = json.loads(line)
                except ValueError:
                    decoded = None
                if isinstance(decoded, dict) and isinstance(decoded.get("event"), str):
                    event = {**decoded, "received_at": received}
                with self._cond:
                    self._lines.append(line)
                    if event is not None:
                        self._events.append(event)
                    self._cond.notify_all()
                if event is not None and self._on_event is not None:
                    try:
                        self._on_event(event)
                    except Exception:
                        logger.exception("NodeProcess %s: on_event callback failed", self.name)
        except (OSError, ValueError):
            pass  # the pipe was closed under us by close()
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def _read_stderr(self, stream: IO[str]) -> None:
        with contextlib.suppress(OSError, ValueError):
            for raw in stream:
                with self._cond:
                    self._stderr.append(raw.rstrip("\n"))

    def __enter__(self) -> Self:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- waiting ----------------------------------------------------------------------------

    def wait_ready(self, timeout: float = 15.0) -> dict[str, Any]:
        """Wait until the node listens; return the ``listening`` event."""
        return self.wait_for("listening", timeout=timeout)

    def wait_for(
        self,
        what: str | EventPredicate,
        peer: str | None = None,
        *,
        timeout: float = 10.0,
        since: int = 0,
    ) -> dict[str, Any]:
        """The first event from index ``since`` of :attr:`events` that matches, waiting for
        it up to ``timeout`` seconds.

        ``what`` is an event kind (``"node-up"``, ``"leaving"``, ``"node-down"``,
        ``"listening"``...) or a predicate on the event dict; ``peer`` also requires
        ``event["peer"] == peer``. Events already seen count, so there is no race with an
        event that arrives before the call; pass ``since=len(proc.events)`` to wait for a
        new one.

        Raises :class:`TimeoutError` if no such event comes in time, and
        :class:`NodeProcessError` if the child exits first; both messages hold the events
        seen so far and the tail of the child's stderr.
        """
        self._process()

        def matches(event: dict[str, Any]) -> bool:
            if peer is not None and event.get("peer") != peer:
                return False
            return event.get("event") == what if isinstance(what, str) else what(event)

        deadline = time.monotonic() + timeout
        index = since
        with self._cond:
            while True:
                for event in self._events[index:]:
                    if matches(event):
                        return event
                index = max(index, len(self._events))
                if self._eof:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{self.name}: no {_describe_wait(what, peer)} within {timeout:g} s"
                        + self._report()
                    )
                self._cond.wait(remaining)
        # The child closed its stdout: it is exiting. Give the stderr reader a moment to
        # collect the last words (a traceback, a configuration error) for the message.
        proc = self._process()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2.0)
        for thread in self._threads:
            thread.join(timeout=1.0)
        with self._cond:
            raise NodeProcessError(
                f"{self.name} exited (code {proc.poll()}) before {_describe_wait(what, peer)}"
                + self._report()
            )

    def _report(self) -> str:
        # Called with self._cond held.
        seen = "\n".join(f"    {line}" for line in self._lines[-30:]) or "    (none)"
        tail = "\n".join(f"    {line}" for line in list(self._stderr)[-30:]) or "    (empty)"
        return f"\n  stdout so far:\n{seen}\n  stderr tail:\n{tail}"

    # -- signals ----------------------------------------------------------------------------

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the child if it is still running.

        Only the first SIGTERM is sent: once the child has stopped its node it no longer
        handles the signal, and a second one would kill it (exit code -15) on its way out.
        """
        proc = self._process()
        if proc.poll() is not None:
            return
        if signum == signal.SIGTERM:
            if self._terminating:
                return
            self._terminating = True
        proc.send_signal(signum)

    def kill(self, timeout: float = 5.0) -> int:
        """SIGKILL the child (no goodbye: its peers see the connection drop) and reap it."""
        proc = self._process()
        if proc.poll() is None:
            proc.kill()
        self._paused = False
        return proc.wait(timeout=timeout)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM the child (a clean stop: goodbyes to peers) and wait for it to exit.

        Returns the exit code (0 after a clean stop). If the child is still running after
        ``timeout`` seconds it is killed and :class:`TimeoutError` is raised.
        """
        proc = self._process()
        self.send_signal(signal.SIGTERM)
        if self._paused:
            self.resume()
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            with self._cond:
                raise TimeoutError(
                    f"{self.name} did not exit within {timeout:g} s of SIGTERM; killed it"
                    + self._report()
                ) from None

    def pause(self) -> None:
        """SIGSTOP the child: its connections stay open but it goes silent."""
        self.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT a paused child."""
        self.send_signal(signal.SIGCONT)
        self._paused = False

    def close(self, timeout: float = 5.0) -> None:
        """End the child whatever its state and release everything. Idempotent.

        A running child gets SIGTERM and ``timeout`` seconds to stop cleanly, then SIGKILL;
        a paused one is killed at once.
        """
        if self._closed:
            return
        self._closed = True
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                if self._paused:
                    proc.kill()
                else:
                    self.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=timeout)
                    except subprocess.TimeoutExpired:
                        proc.kill()
            proc.wait(timeout=10.0)
        finally:
            if proc.poll() is None:  # pragma: no cover - wait() above failed oddly
                proc.kill()
                proc.wait()
            for stream in (proc.stdin,):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            for thread in self._threads:
                thread.join(timeout=2.0)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()


# -- the child side -------------------------------------------------------------------------


def _emit(event: Mapping[str, object]) -> None:
    sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _peer_fields(peer: Peer) -> dict[str, object]:
    return {
        "peer": peer.name,
        "release": peer.release,
        "address": peer.address,
        "state": str(peer.state),
    }


def _watch_stdin() -> None:
    # The parent holds our stdin open; end of file means it is gone (or closed us). The raw
    # descriptor, not sys.stdin: a daemon thread blocked inside a buffered object's lock
    # can abort the interpreter at exit.
    with contextlib.suppress(OSError):
        while os.read(0, 4096):
            pass
    os.kill(os.getpid(), signal.SIGTERM)


async def _run_node() -> int:
    try:
        node = Node()
    except ConfigError as exc:
        _emit({"event": "error", "message": f"configuration error: {exc}"})
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2

    def up(peer: Peer) -> None:
        _emit({"event": "node-up", **_peer_fields(peer), "reason": None})

    def leaving(peer: Peer) -> None:
        _emit({"event": "leaving", **_peer_fields(peer), "reason": None})

    def down(peer: Peer, reason: DownReason) -> None:
        _emit({"event": "node-down", **_peer_fields(peer), "reason": str(reason)})

    # Callbacks, not node.events(): they are registered before start, so none is missed.
    node.on_node_up(up)
    node.on_node_leaving(leaving)
    node.on_node_down(down)
    # The receiver stays open until the node has stopped: a second signal during the stop
    # is swallowed instead of killing the process halfway through its goodbyes.
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        try:
            await node.start()
        except HandoffError as exc:
            _emit({"event": "error", "message": f"{type(exc).__name__}: {exc}"})
            print(f"cannot start the node: {exc}", file=sys.stderr)
            return 1
        try:
            _emit(
                {
                    "event": "listening",
                    "name": node.name,
                    "release": node.release,
                    "cluster": node.cluster,
                    "address": node.address,
                    "port": node.port,
                    "pid": os.getpid(),
                }
            )
            async for signum in signals:
                _emit({"event": "stopping", "signal": signal.Signals(signum).name})
                break
        finally:
            await node.stop()
    # Leaving the receiver restored the default handlers: a late signal must not turn a
    # clean exit into "killed by SIGTERM".
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    _emit({"event": "stopped"})
    return 0


def main(argv: Iterable[str] | None = None) -> int:
    """Entry point of the child process: run one node from ``HANDOFF_*`` until signalled."""
    parser = argparse.ArgumentParser(
        prog="handoff.testing._process",
        description="Run one warm-handoff node configured by HANDOFF_* variables, printing "
        "its membership events as JSON lines, until SIGTERM or SIGINT.",
    )
    parser.add_argument("--log-level", default="INFO", help="level of the log on stderr")
    parser.add_argument(
        "--exit-on-stdin-eof",
        action="store_true",
        help="stop when stdin is closed (the parent process went away)",
    )
    args = parser.parse_args(None if argv is None else list(argv))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s", "%X")
    )
    package_logger = logging.getLogger("handoff")
    package_logger.addHandler(handler)
    package_logger.setLevel(args.log_level.upper())
    if args.exit_on_stdin_eof:
        threading.Thread(target=_watch_stdin, name="stdin watcher", daemon=True).start()
    try:
        return anyio.run(_run_node)
    except KeyboardInterrupt:  # pragma: no cover - SIGINT before the receiver was set up
        return 130
