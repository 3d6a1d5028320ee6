"""Run a node in a child process, watch its events and drive it, for multi-process tests.

:class:`NodeProcess` starts ``python -c "...handoff._local.process.main()"`` with the
``HANDOFF_*`` environment you give it. The child builds ``handoff.Node()`` purely from that
environment, writes one JSON object per line to its stdout, and nothing else:

- ``{"event": "listening", "name": ..., "release": ..., "cluster": ..., "address": ...,
  "port": ..., "pid": ...}`` once, first, when the node listens;
- ``{"event": "node-up" | "leaving" | "node-down", "peer": ..., "release": ...,
  "address": ..., "state": ..., "reason": ...}`` for every membership event (``reason``
  is ``None`` except for ``node-down``);
- ``{"event": "stopping", "signal": "SIGTERM"}`` (or ``"signal": null, "command": "stop"``)
  and ``{"event": "stopped"}`` around a clean stop, or ``{"event": "error", "message": ...}``
  if the node could not start (exit code 2 for a configuration error, 1 otherwise).

It logs to stderr (the ``handoff`` logger, at ``log_level``) and runs until SIGTERM or
SIGINT, then stops the node (saying goodbye to its peers) and exits 0. It also stops when
its stdin reaches end of file, so a test runner that dies leaves no node behind.

State to hand off
-----------------
With ``HANDOFF_TEST_STATE`` set to a JSON object (see :class:`StateConfig`), the child also
holds state and tracks it before the node starts::

    {"namespace": "cache", "type": "ttl", "entries": 20000, "value_size": 100,
     "ttl": 300, "maxsize": 40000, "version": 1, "apply_delay": 0, "key_prefix": "k",
     "hot_first": false, "drain_on_stop": true}

Every field is optional. ``type`` is ``"ttl"`` (``cachetools.TTLCache(maxsize, ttl)``),
``"lru"`` (``cachetools.LRUCache(maxsize)``) or ``"dict"``; ``maxsize`` defaults to twice
``entries`` (at least 2) and is ignored for ``"dict"``. The child fills ``entries`` entries
in order ``i = 0, 1, ...`` (with ``hot_first``, in the reverse order, so that entry 0 is
the most recently used: what a cache under traffic where low indices are the hottest looks
like): key ``f"{key_prefix}{i}"``, value :func:`state_value` ``(i, value_size)``, a
``value_size``-character string derived from ``i``, so the parent can compute what a
receiver must hold (:func:`expected_digest`). The namespace is tracked with
``node.track(namespace, obj, version=version)`` through the adapter its type selects, wrapped
so that every import (a received chunk, or a chunk of a restored snapshot) first sleeps
``apply_delay`` seconds (blocking the event loop on purpose: a slow receiver) and then
prints

- ``{"event": "applied", "namespace": ..., "records": n, "total": t, "result":
  {"applied": ..., "kept_existing": ..., "dropped": {reason: count}}}`` (``n`` records in
  this chunk, ``t`` records imported so far);
- ``{"event": "warm", "reason": ...}`` once, when ``node.is_warm`` becomes true (the
  reason names the handoff, the snapshot or the warm-up timeout).

A child with state drains on SIGTERM, SIGINT or end of stdin before it stops, as a real
service would (prints ``drained``, see below); a child without state only stops, as before,
and so does one whose state says ``"drain_on_stop": false`` (a service without handoff: its
state is lost).
Mind ``HANDOFF_DRAIN_TIMEOUT`` against the ``timeout`` of :meth:`NodeProcess.close`.

Commands
--------
The child reads one command per line from its stdin (:meth:`NodeProcess.command` writes
them and waits for the reply):

- ``drain``: runs ``node.drain()`` in the background (other commands are still served) and
  prints ``{"event": "drained", "report": report.as_dict()}``; a second ``drain`` replies
  with the first report, as ``Node.drain`` does.
- ``stats`` (or ``stats --no-digest``, which skips the two slow fields): prints
  ``{"event": "stats", "entries": ..., "digest": ..., "unexpected": ..., "maxrss_kib": ...,
  "rss_kib": ..., "warm": ..., "warm_reason": ..., "precopy": [...], "state": "serving" |
  "draining"}`` (``precopy``: this node's pre-copies, as in ``node.stats()``).
  ``entries`` is the number of live entries (expired ones are purged first), ``digest``
  :func:`state_digest` of them, ``unexpected`` the number of entries that are not exactly
  what :class:`StateConfig` generates (a wrong value for the key, or a key it never makes;
  a value that traffic wrote counts as generated without its version),
  ``maxrss_kib`` the peak resident set (``getrusage(RUSAGE_SELF).ru_maxrss``, in KiB on
  every platform) and ``rss_kib`` the current one (``None`` where ``/proc`` is missing).
  ``maxrss_kib`` is read first, so the digest's own work does not count in it. Without
  state, ``entries``, ``digest`` and ``unexpected`` are ``None``.
- ``stop``: drains (as leaving ``async with node`` does; with or without state), prints
  ``drained`` if no drain was reported yet, then stops as on SIGTERM and exits 0.
- ``traffic SPEC`` (needs state): serves synthetic requests from the held object, as
  :class:`handoff._demo.TrafficSpec` ``SPEC`` (JSON, one line) describes, in the background:
  keys ``f"{key_prefix}{rank}"``, values from :func:`state_value`, so what it loads is what
  ``StateConfig`` generates. Replies ``{"event": "traffic-started", "requests": n}`` at
  once, then prints one ``traffic`` event per bin and ``traffic-done`` at the end (see
  :func:`handoff._demo.run_traffic`). The traffic stops, before any drain, as soon as the
  node is told to stop. One stream at a time.

Anything else gets ``{"event": "command-error", "command": line, "message": ...}``, which
:meth:`NodeProcess.command` raises as :class:`NodeProcessError`.

Example (tests/test_handoff_multiprocess.py has more)::

    state = {"namespace": "cache", "type": "ttl", "entries": 20_000}
    empty = {**state, "entries": 0, "maxsize": 40_000}
    with NodeProcess({**env_old, STATE_ENV: json.dumps(state)}, name="old") as old:
        old.wait_ready()
        env_new["HANDOFF_DISCOVERY"] = f"static:{old.address}"
        with NodeProcess({**env_new, STATE_ENV: json.dumps(empty)}, name="new") as new:
            new.wait_for("node-up", peer="old", timeout=10)
            old.wait_for("node-up", peer="new", timeout=10)
            report = old.command("drain", timeout=30)["report"]
            new.wait_for("warm", timeout=10)
            assert new.command("stats")["digest"] == expected_digest(state)

The helpers in this module are POSIX-only (signals such as SIGSTOP and SIGKILL).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import logging
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from types import TracebackType
from typing import IO, Any, Final, Literal, Self

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import cachetools
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from handoff import ConfigError, HandoffError, Node, Peer
from handoff._adapter import Adapter, ImportResult, Record
from handoff._demo import VERSION_MARK, TrafficSpec, run_traffic, version_of
from handoff._registry import adapter_for
from handoff.adapters.cachetools import _data as _cache_data
from handoff.engine import DrainReport
from handoff.membership import DownReason

__all__ = (
    "STATE_ENV",
    "NodeProcess",
    "NodeProcessError",
    "StateConfig",
    "expected_digest",
    "free_port",
    "free_port_on_all",
    "state_digest",
    "state_value",
)

logger = logging.getLogger("handoff.local")

STATE_ENV: Final = "HANDOFF_TEST_STATE"
"""The variable holding a child's :class:`StateConfig` as JSON."""

#: Variables a child does not inherit from the parent unless asked to: the node must be
#: configured only by the environment the test gives, not by the machine the test runs on.
_PLATFORM_VARIABLES = ("KUBERNETES_SERVICE_HOST", "POD_IP")
_PLATFORM_PREFIXES = ("HANDOFF_", "FLY_")

_STDERR_TAIL_LINES = 200
_CHILD_CODE = "import sys; from handoff._local.process import main; sys.exit(main())"

#: The event each command answers with (:meth:`NodeProcess.command`).
_REPLIES: Final[Mapping[str, str]] = {
    "drain": "drained",
    "stats": "stats",
    "stop": "stopped",
    "traffic": "traffic-started",
}
_COMMAND_ERROR: Final = "command-error"

EventPredicate = Callable[[dict[str, Any]], bool]
StateType = Literal["ttl", "lru", "dict"]
_STATE_TYPES: Final = ("ttl", "lru", "dict")


# -- the state a child holds ----------------------------------------------------------------


def state_value(index: int, size: int) -> str:
    """The value of entry ``index``: ``size`` characters, ``"{index}:"`` repeated."""
    seed = f"{index}:"
    return (seed * (size // len(seed) + 1))[:size]


@dataclass(frozen=True, slots=True)
class StateConfig:
    """What a child holds and tracks: the JSON object of ``HANDOFF_TEST_STATE``."""

    namespace: str = "cache"
    type: StateType = "ttl"
    entries: int = 0
    value_size: int = 100
    ttl: float = 300.0
    maxsize: int | None = None
    version: int = 1
    apply_delay: float = 0.0
    """Seconds each import sleeps (blocking) before it applies its records."""
    key_prefix: str = "k"
    hot_first: bool = False
    """Fill from the last index down, so that entry 0 is the most recently used."""
    drain_on_stop: bool = True
    """Drain on SIGTERM, SIGINT or end of stdin (false: stop at once, the state is lost)."""
    spread: str | None = None
    """``node.track(..., spread=)``: ``"split"``, ``"all"``, or the default."""

    def __post_init__(self) -> None:
        def integer(name: str, value: object, low: int) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

        def number(name: str, value: object, *, positive: bool) -> None:
            if (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not math.isfinite(value)
                or value < 0
                or (positive and value == 0)
            ):
                limit = "> 0" if positive else ">= 0"
                raise ValueError(f"{name} must be a finite number {limit}, got {value!r}")

        if not isinstance(self.namespace, str) or not self.namespace:
            raise ValueError(f"namespace must be a non-empty string, got {self.namespace!r}")
        if self.type not in _STATE_TYPES:
            raise ValueError(f"type must be one of {', '.join(_STATE_TYPES)}, got {self.type!r}")
        integer("entries", self.entries, 0)
        integer("value_size", self.value_size, 1)
        number("ttl", self.ttl, positive=True)
        if self.maxsize is not None:
            integer("maxsize", self.maxsize, 1)
        integer("version", self.version, 0)
        number("apply_delay", self.apply_delay, positive=False)
        if not isinstance(self.key_prefix, str):
            raise ValueError(f"key_prefix must be a string, got {self.key_prefix!r}")
        if self.spread not in (None, "split", "all"):
            raise ValueError(f"spread must be 'split', 'all' or null, got {self.spread!r}")
        for name in ("hot_first", "drain_on_stop"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> StateConfig:
        """Validate a decoded ``HANDOFF_TEST_STATE`` object (raises :class:`ValueError`)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown field(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(sorted(known))}"
            )
        return cls(**data)

    @classmethod
    def parse(cls, config: StateConfig | Mapping[str, Any] | str) -> StateConfig:
        """A config from itself, a mapping, or JSON text."""
        if isinstance(config, StateConfig):
            return config
        if isinstance(config, str):
            try:
                config = json.loads(config)
            except ValueError as exc:
                raise ValueError(f"not JSON: {exc}") from None
        return cls.from_mapping(config)  # type: ignore[arg-type]

    def to_json(self) -> str:
        """The JSON text to put in ``HANDOFF_TEST_STATE``."""
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None})

    @property
    def capacity(self) -> int:
        """``maxsize`` of a cache: as given, else twice ``entries`` (at least 2)."""
        return self.maxsize if self.maxsize is not None else max(self.entries, 1) * 2

    def key(self, index: int) -> str:
        """The key of entry ``index``."""
        return f"{self.key_prefix}{index}"

    def value(self, index: int) -> str:
        """The value of entry ``index``."""
        return state_value(index, self.value_size)

    def index_of(self, key: object) -> int | None:
        """The ``index`` whose :meth:`key` is ``key``, or ``None`` if none is."""
        if not isinstance(key, str) or not key.startswith(self.key_prefix):
            return None
        digits = key[len(self.key_prefix) :]
        if not digits.isdigit() or not digits.isascii() or str(int(digits)) != digits:
            return None
        return int(digits)

    def create(self) -> Any:
        """A new, empty object of :attr:`type`."""
        if self.type == "ttl":
            return cachetools.TTLCache(maxsize=self.capacity, ttl=self.ttl)
        if self.type == "lru":
            return cachetools.LRUCache(maxsize=self.capacity)
        return {}

    def unexpected(self, view: Mapping[Any, Any]) -> int:
        """Entries of ``view`` that this config would not generate as they are."""
        count = 0
        for key, value in view.items():
            index = self.index_of(key)
            if index is None or _unversioned(value) != self.value(index):
                count += 1
        return count


def _unversioned(value: object) -> object:
    """A value written by synthetic traffic without its version (see
    :func:`handoff._demo.versioned`): what the config generates for the key."""
    if isinstance(value, str) and version_of(value):
        return value.rpartition(VERSION_MARK)[0]
    return value


def genuine_by_prefix(view: Mapping[Any, Any], value_size: int) -> dict[str, int]:
    """Entries whose value is what a node with their key's prefix (``key_prefix``) and
    ``value_size`` generates, counted per prefix: which source nodes' state a node holds.
    Entries that match no such node are counted under ``""``. The prefix is the key without
    its trailing digits, so prefixes must not end in a digit."""
    counts: dict[str, int] = {}
    # One config per prefix, not per entry: building one validates every field, which cost
    # most of the time of a stats command at 300,000 entries.
    sources: dict[str, StateConfig] = {}
    for key, value in view.items():
        prefix = key.rstrip("0123456789") if isinstance(key, str) else ""
        source = sources.get(prefix)
        if source is None:
            source = sources[prefix] = StateConfig(key_prefix=prefix, value_size=value_size)
        index = source.index_of(key)
        name = prefix if index is not None and value == source.value(index) else ""
        counts[name] = counts.get(name, 0) + 1
    return counts


def _sorted_keys(keys: Iterable[Any]) -> list[Any]:
    listed = list(keys)
    try:
        return sorted(listed)
    except TypeError:  # keys of several types: any order both sides agree on
        return sorted(listed, key=repr)


def _digest_pairs(pairs: Iterable[tuple[Any, Any]]) -> str:
    digest = hashlib.sha256()
    for key, value in pairs:
        digest.update(f"{key!r}\t{value!r}\n".encode())
    return digest.hexdigest()


def state_digest(view: Mapping[Any, Any]) -> str:
    """SHA-256 over ``f"{key!r}\\t{value!r}\\n"`` for every entry, keys sorted (by ``repr``
    if they do not compare). Holds only the sorted list of keys, never a copy of values."""
    return _digest_pairs((key, view[key]) for key in _sorted_keys(view))


def expected_digest(config: StateConfig | Mapping[str, Any] | str) -> str:
    """The :func:`state_digest` of a node that holds exactly what ``config`` generates
    (its ``entries`` entries): what a successor that received all of it must report."""
    state = StateConfig.parse(config)
    ordered = sorted((state.key(i), i) for i in range(state.entries))
    return _digest_pairs((key, state.value(index)) for key, index in ordered)


def _live_view(obj: Any) -> Mapping[Any, Any]:
    """The entries of a held object, read without counting as uses (no LRU update)."""
    if isinstance(obj, cachetools.TTLCache):
        obj.expire()
    if isinstance(obj, cachetools.Cache):
        return _cache_data(obj)
    if isinstance(obj, Mapping):
        return obj
    raise TypeError(f"cannot read a {type(obj).__name__}")  # pragma: no cover


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

    With ``HANDOFF_TEST_STATE`` in ``env`` the child holds state to hand off; drive it with
    :meth:`command` (``"drain"``, ``"stats"``, ``"stop"``) or :meth:`send` (see the module
    documentation).

    A thread reads the child's stdout: every JSON event line is appended to :attr:`events`
    with one key added, ``received_at``, the parent's :func:`time.monotonic` when the line
    was read (so latencies can be measured against ``time.monotonic()`` in the test).
    ``on_event(event)``, if given, is called from that thread for each event.

    ``program``, if given, is the child's command line instead of the built-in node runner
    (e.g. ``[sys.executable, "my_app.py"]``: an app that runs a node its own way); it must
    print the same JSON events, ``listening`` first, and ``log_level`` does not apply.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        name: str,
        log_level: str = "INFO",
        on_event: Callable[[dict[str, Any]], None] | None = None,
        inherit_platform_env: bool = False,
        program: Sequence[str] | None = None,
    ) -> None:
        self.name = name
        self.program = list(program) if program is not None else None
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
        self._stdin_lock = threading.Lock()
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
        argv = self.program or [
            sys.executable,
            "-c",
            _CHILD_CODE,
            "--log-level",
            self.log_level,
            "--exit-on-stdin-eof",
        ]
        self._proc = subprocess.Popen(
            argv,
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
        count: int = 1,
    ) -> dict[str, Any]:
        """The first event from index ``since`` of :attr:`events` that matches, waiting for
        it up to ``timeout`` seconds; with ``count``, the ``count``-th one.

        ``what`` is an event kind (``"node-up"``, ``"leaving"``, ``"node-down"``,
        ``"listening"``, ``"applied"`` ...) or a predicate on the event dict, called once
        per event; ``peer`` also requires ``event["peer"] == peer``. Events already seen
        count, so there is no race with an event that arrives before the call; pass
        ``since=len(proc.events)`` (or the mark :meth:`send` returns) to wait for a new one.

        Raises :class:`TimeoutError` if no such event comes in time, and
        :class:`NodeProcessError` if the child exits first; both messages hold the events
        seen so far and the tail of the child's stderr.
        """
        self._process()
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")

        def matches(event: dict[str, Any]) -> bool:
            if peer is not None and event.get("peer") != peer:
                return False
            return event.get("event") == what if isinstance(what, str) else what(event)

        deadline = time.monotonic() + timeout
        index = since
        found = 0
        described = _describe_wait(what, peer) + (f" (#{count})" if count > 1 else "")
        with self._cond:
            while True:
                for event in self._events[index:]:
                    if matches(event):
                        found += 1
                        if found == count:
                            return event
                index = max(index, len(self._events))
                if self._eof:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{self.name}: no {described} within {timeout:g} s"
                        + (f" ({found} seen)" if count > 1 else "")
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
                f"{self.name} exited (code {proc.poll()}) before {described}" + self._report()
            )

    def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait for the child to exit by itself (after ``stop``); return its exit code.

        Raises :class:`TimeoutError` if it is still running after ``timeout`` seconds (it is
        left running: :meth:`close` ends it).
        """
        proc = self._process()
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with self._cond:
                raise TimeoutError(
                    f"{self.name} still running {timeout:g} s later" + self._report()
                ) from None

    # -- commands ---------------------------------------------------------------------------

    def send(self, line: str) -> int:
        """Write one command line to the child's stdin without waiting for its answer.

        Returns the number of events seen before the line was written: pass it as
        ``since=`` to :meth:`wait_for` to wait for the answer later (``send("drain")``,
        do something, then ``wait_for("drained", since=mark, timeout=...)``).
        Raises :class:`NodeProcessError` if the child is not running.
        """
        if "\n" in line or "\r" in line:
            raise ValueError(f"a command is one line, got {line!r}")
        proc = self._process()
        if proc.poll() is not None or proc.stdin is None:
            raise NodeProcessError(f"{self.name} is not running; cannot send {line!r}")
        with self._cond:
            mark = len(self._events)
        with self._stdin_lock:
            try:
                proc.stdin.write(line + "\n")
                proc.stdin.flush()
            except (OSError, ValueError) as exc:
                raise NodeProcessError(f"{self.name}: cannot send {line!r}: {exc}") from exc
        return mark

    def command(
        self,
        line: str,
        *,
        wait_for_event: str | EventPredicate | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Send a command line and return the event that answers it.

        By default the answer of ``drain`` is ``drained``, of ``stats`` ``stats`` and of
        ``stop`` ``stopped``; ``wait_for_event`` (an event kind or a predicate) overrides
        it, and is required for other lines. Only events after the line was written count.
        Raises :class:`NodeProcessError` if the child rejects the command
        (``command-error``) or exits first, :class:`TimeoutError` after ``timeout``.
        """
        words = line.split()
        expected = wait_for_event
        if expected is None:
            expected = _REPLIES.get(words[0]) if words else None
            if expected is None:
                raise ValueError(f"which event answers {line!r}? pass wait_for_event")
        command = line.strip()

        def answer(event: dict[str, Any]) -> bool:
            if event.get("event") == _COMMAND_ERROR and event.get("command") == command:
                return True
            if isinstance(expected, str):
                return event.get("event") == expected
            return expected(event)

        answer.__name__ = f"the answer to {command!r}"
        mark = self.send(line)
        event = self.wait_for(answer, timeout=timeout, since=mark)
        if event.get("event") == _COMMAND_ERROR and expected != _COMMAND_ERROR:
            raise NodeProcessError(f"{self.name} rejected {command!r}: {event.get('message')}")
        return event

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

_emit_lock = threading.Lock()


def _emit(event: Mapping[str, object]) -> None:
    line = json.dumps(event, separators=(",", ":")) + "\n"
    with _emit_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


def _peer_fields(peer: Peer) -> dict[str, object]:
    return {
        "peer": peer.name,
        "release": peer.release,
        "address": peer.address,
        "state": str(peer.state),
    }


def _maxrss_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS


def _rss_kib() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


class _ObservedAdapter:
    """Delegates to the adapter the object's type selects; every import first sleeps
    ``delay`` seconds (blocking: a receiver busy applying) and then prints ``applied``."""

    def __init__(self, inner: Adapter, namespace: str, delay: float) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.moves_ownership = inner.moves_ownership
        self.namespace = namespace
        self.delay = delay
        self.total = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __repr__(self) -> str:
        return f"_ObservedAdapter({self.inner!r}, delay={self.delay:g})"

    def __getattr__(self, name: str) -> Any:
        # Optional protocols (change tracking, freeze) of the wrapped adapter.
        return getattr(self.inner, name)

    def export(self) -> Iterator[Record]:
        return self.inner.export()

    def import_records(self, records: Sequence[Record], *, age: float = 0.0) -> ImportResult:
        if self.delay:
            time.sleep(self.delay)  # blocking on purpose: the event loop is busy applying
        result = self.inner.import_records(records, age=age)
        self.total += len(records)
        _emit(
            {
                "event": "applied",
                "namespace": self.namespace,
                "records": len(records),
                "total": self.total,
                "result": {
                    "applied": result.applied,
                    "kept_existing": result.kept_existing,
                    "dropped": dict(result.dropped),
                },
            }
        )
        return result

    def import_delta(self, records: Sequence[Record], *, age: float = 0.0) -> ImportResult:
        """A pre-copy's delta (only reached when the wrapped adapter applies deltas:
        without change tracking, nobody offers this node one)."""
        result: ImportResult = self.inner.import_delta(records, age=age)  # type: ignore[attr-defined]
        self.total += len(records)
        _emit(
            {
                "event": "applied",
                "namespace": self.namespace,
                "records": len(records),
                "total": self.total,
                "delta": True,
                "result": {
                    "applied": result.applied,
                    "kept_existing": result.kept_existing,
                    "dropped": dict(result.dropped),
                },
            }
        )
        return result


class _HeldState:
    """The object a child holds under ``HANDOFF_TEST_STATE``, filled and tracked."""

    def __init__(self, node: Node, config: StateConfig) -> None:
        self.config = config
        self.obj = config.create()
        order = range(config.entries)
        for index in reversed(order) if config.hot_first else order:
            self.obj[config.key(index)] = config.value(index)
        self.adapter = _ObservedAdapter(adapter_for(self.obj), config.namespace, config.apply_delay)
        spread: Any = config.spread  # checked by StateConfig
        node.track(
            config.namespace,
            self.obj,
            version=config.version,
            adapter=self.adapter,
            spread=spread,
        )


class _StdinReader:
    """Reads command lines from the raw stdin descriptor in a daemon thread.

    Lines wait in a list until the event loop attaches; after that each is handed to the
    loop through its token. The raw descriptor, not sys.stdin: a daemon thread blocked
    inside a buffered object's lock can abort the interpreter at exit. At end of file the
    process sends itself SIGTERM if ``stop_on_eof`` (the parent is gone, or closed us).
    """

    def __init__(self, *, stop_on_eof: bool) -> None:
        self._stop_on_eof = stop_on_eof
        self._lock = threading.Lock()
        self._waiting: list[str] = []
        self._deliver: Callable[[str], None] | None = None

    def start(self) -> None:
        threading.Thread(target=self._run, name="stdin reader", daemon=True).start()

    def attach(self, send: MemoryObjectSendStream[str]) -> None:
        """Deliver lines to ``send`` from now on (call from the event loop)."""
        token = anyio.lowlevel.current_token()

        def put(line: str) -> None:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                send.send_nowait(line)

        def from_thread(line: str) -> None:
            with contextlib.suppress(anyio.RunFinishedError, RuntimeError):
                anyio.from_thread.run_sync(put, line, token=token)

        with self._lock:
            for line in self._waiting:
                put(line)
            self._waiting.clear()
            self._deliver = from_thread

    def detach(self) -> None:
        """Stop delivering (later lines are ignored)."""
        with self._lock:
            self._deliver = self._ignore

    @staticmethod
    def _ignore(line: str) -> None:
        logger.debug("ignored command after stop: %r", line)

    def _line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").strip()
        if not line:
            return
        with self._lock:
            deliver = self._deliver
            if deliver is None:
                self._waiting.append(line)
                return
        deliver(line)

    def _run(self) -> None:
        buffered = b""
        with contextlib.suppress(OSError):
            while chunk := os.read(0, 4096):
                buffered += chunk
                *lines, buffered = buffered.split(b"\n")
                for raw in lines:
                    self._line(raw)
        self._line(buffered)
        if self._stop_on_eof:
            os.kill(os.getpid(), signal.SIGTERM)


class _Runner:
    """Serves signals and commands for one started node until it should stop."""

    def __init__(self, node: Node, held: _HeldState | None, task_group: anyio.abc.TaskGroup):
        self.node = node
        self.held = held
        self.task_group = task_group
        self.stop_requested = anyio.Event()
        self.drain_on_stop = False
        self._draining = 0
        self._drained_reported = False
        self._traffic = False

    def request_stop(self, event: dict[str, object], *, drain: bool) -> None:
        if self.stop_requested.is_set():
            return  # a second signal during the stop is swallowed
        _emit(event)
        self.drain_on_stop = drain
        self.stop_requested.set()

    async def watch_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            self.request_stop(
                {"event": "stopping", "signal": signal.Signals(signum).name},
                drain=self.held is not None and self.held.config.drain_on_stop,
            )

    async def announce_warm(self) -> None:
        reason = await self.node.wait_warm()
        _emit({"event": "warm", "reason": reason})

    async def serve_commands(self, lines: MemoryObjectReceiveStream[str]) -> None:
        async with lines:
            async for line in lines:
                self.handle(line)

    def handle(self, line: str) -> None:
        words = line.split()
        if self.stop_requested.is_set():
            self._reject(line, "the node is stopping")
        elif words == ["drain"]:
            self.task_group.start_soon(self.drain_command, line)
        elif words[:1] == ["stats"] and words[1:] in ([], ["--no-digest"]):
            _emit(self.stats(digest=not words[1:]))
        elif words == ["stop"]:
            self.request_stop({"event": "stopping", "signal": None, "command": "stop"}, drain=True)
        elif words[:1] == ["traffic"]:
            self.start_traffic(line)
        else:
            self._reject(
                line, "unknown command; known: drain, stats [--no-digest], stop, traffic SPEC"
            )

    def start_traffic(self, line: str) -> None:
        if self.held is None:
            self._reject(line, f"traffic needs state to serve from ({STATE_ENV})")
            return
        if self._traffic:
            self._reject(line, "traffic is already running")
            return
        try:
            spec = TrafficSpec.parse(line.partition(" ")[2])
            spec.owner(self.node.name)  # this node must be one of the spec's nodes
        except ValueError as exc:
            self._reject(line, f"invalid traffic spec: {exc}")
            return
        self._traffic = True
        _emit({"event": "traffic-started", "requests": spec.requests})
        self.task_group.start_soon(self.traffic, spec, self.held)

    async def traffic(self, spec: TrafficSpec, held: _HeldState) -> None:
        config = held.config
        try:
            await run_traffic(
                spec,
                held.obj,
                me=self.node.name,
                key_of=config.key,
                value_of=config.value,
                emit=_emit,
                stopped=self.stop_requested.is_set,
                lock=self.node.lock,
                clock=time.monotonic,
                # Records handed to this node applied so far: imports run on this loop
                # under the node's lock, as the traffic's reads do.
                handed_off=lambda: held.adapter.total,
            )
        finally:
            self._traffic = False

    @staticmethod
    def _reject(line: str, message: str) -> None:
        _emit({"event": _COMMAND_ERROR, "command": line, "message": message})

    async def drain_command(self, line: str) -> None:
        self._draining += 1
        try:
            report = await self.node.drain()
        except Exception as exc:
            logger.exception("drain failed")
            self._reject(line, f"drain failed: {type(exc).__name__}: {exc}")
            return
        finally:
            self._draining -= 1
        self._report_drained(report)

    async def drain_for_stop(self) -> None:
        # A drain started by a command answers it first (one "drained" event, not two).
        while self._draining:  # noqa: ASYNC110 - bounded: a drain ends by its deadline
            await anyio.sleep(0.01)
        try:
            report = await self.node.drain()
        except Exception:
            logger.exception("drain before stopping failed")
            return
        if not self._drained_reported:
            self._report_drained(report)

    def _report_drained(self, report: DrainReport) -> None:
        self._drained_reported = True
        _emit({"event": "drained", "report": report.as_dict()})

    def stats(self, *, digest: bool) -> dict[str, object]:
        peak = _maxrss_kib()  # first: the digest's own work must not count in it
        entries: int | None = None
        checksum: str | None = None
        unexpected: int | None = None
        by_prefix: dict[str, int] | None = None
        if self.held is not None:
            view = _live_view(self.held.obj)
            entries = len(view)
            if digest:
                checksum = state_digest(view)
                unexpected = self.held.config.unexpected(view)
                by_prefix = genuine_by_prefix(view, self.held.config.value_size)
        return {
            "event": "stats",
            "entries": entries,
            "digest": checksum,
            "unexpected": unexpected,
            "by_prefix": by_prefix,
            "maxrss_kib": peak,
            "rss_kib": _rss_kib(),
            "warm": self.node.is_warm,
            "warm_reason": self.node.warm_reason,
            "precopy": self.node._precopy_status(),
            "state": str(self.node.state),
        }


async def _serve(
    node: Node, held: _HeldState | None, signals: AsyncIterator[int], reader: _StdinReader
) -> None:
    send, receive = anyio.create_memory_object_stream[str](math.inf)
    async with anyio.create_task_group() as task_group:
        runner = _Runner(node, held, task_group)
        reader.attach(send)
        task_group.start_soon(runner.watch_signals, signals)
        task_group.start_soon(runner.serve_commands, receive)
        if held is not None:
            task_group.start_soon(runner.announce_warm)
        await runner.stop_requested.wait()
        if runner.drain_on_stop:
            await runner.drain_for_stop()
        reader.detach()
        send.close()
        task_group.cancel_scope.cancel()


def _state_from_env() -> StateConfig | None:
    text = os.environ.get(STATE_ENV)
    if text is None or not text.strip():
        return None
    return StateConfig.parse(text)


async def _run_node(reader: _StdinReader) -> int:
    try:
        state = _state_from_env()
    except (ValueError, TypeError) as exc:
        _emit({"event": "error", "message": f"invalid {STATE_ENV}: {exc}"})
        print(f"invalid {STATE_ENV}: {exc}", file=sys.stderr)
        return 2
    try:
        node = Node()
        held = _HeldState(node, state) if state is not None else None
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
            await _serve(node, held, signals, reader)
        finally:
            await node.stop()
    # Leaving the receiver restored the default handlers: a late signal must not turn a
    # clean exit into "killed by SIGTERM".
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    _emit({"event": "stopped"})
    return 0


def main(argv: Iterable[str] | None = None) -> int:
    """Entry point of the child process: run one node from ``HANDOFF_*`` until signalled
    (or told to stop on stdin)."""
    parser = argparse.ArgumentParser(
        prog="handoff._local.process",
        description="Run one warm-handoff node configured by HANDOFF_* variables, printing "
        f"its events as JSON lines, until SIGTERM or SIGINT. {STATE_ENV} gives it state to "
        "hand off; stdin takes the commands drain, stats [--no-digest], stop and traffic SPEC.",
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
    reader = _StdinReader(stop_on_eof=args.exit_on_stdin_eof)
    reader.start()
    try:
        return anyio.run(_run_node, reader)
    except KeyboardInterrupt:  # pragma: no cover - SIGINT before the receiver was set up
        return 130
