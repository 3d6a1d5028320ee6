"""Node: one process's part in a warm-handoff cluster.

It listens for peers, dials the addresses discovery finds, authenticates both ways and keeps
one link per peer alive with heartbeats (``node.peers()``, ``@node.on_node_up``,
``node.events()``). It holds the tracked namespaces (``node.track``, upgrade and downgrade
hooks), restores snapshots at start, receives handoffs, and drains to successors or to the
snapshot store (``node.drain()``), with hooks for ASGI and threaded services.
"""

from __future__ import annotations

import collections
import errno
import functools
import itertools
import logging
import math
import os
import secrets
import signal
import threading
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Self, TypeVar

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
from anyio.abc import SocketAttribute

from handoff._adapter import Adapter, ImportResult, Record
from handoff._codec import Codec
from handoff._errors import (
    BindError,
    ConfigError,
    InexactCountsWarning,
    LocalProtocolError,
    PortsInUse,
)
from handoff._keys import cluster_key, cookie_weakness
from handoff._mesh import MAX_PENDING_HANDSHAKES, Mesh
from handoff._observe import ObservedLink, Observers
from handoff._registry import adapter_for
from handoff.adapters.actors import ActorRegistry, ActorsAdapter
from handoff.config import COOKIE_HOWTO, Settings, for_worker, resolve_settings, worker_ports
from handoff.control import ControlServer, node_status
from handoff.discovery import make_discovery
from handoff.engine import (
    Drainer,
    DrainReport,
    Link,
    NamespaceReport,
    Receiver,
    Sessions,
    Tallies,
    Tracked,
)
from handoff.engine._actors import ActorHost, MoveStats
from handoff.engine._fingerprint import ExportLog, changed_records
from handoff.engine._planner import successor_tiers
from handoff.engine._precopy import (
    ANSWER_WAIT,
    CANCEL_WAIT,
    COPY_ATTEMPTS,
    DELTA,
    DELTA_SHARE,
    LINK_WAIT,
    LIVE_FINISH_WAIT,
    LIVE_IDLE_LOOK,
    LIVE_POLL,
    LIVE_TIME_LIMIT,
    PRECOPY,
    PRECOPY_CHUNK_BYTES,
    PRECOPY_TIME_LIMIT,
    Bell,
    Precopy,
    PrecopyState,
    is_newer,
)
from handoff.engine._report import merge_reports
from handoff.engine._restore import restore_snapshots
from handoff.engine._sender import CATCH_UP, MAX_CHUNK_BYTES
from handoff.engine._tracked import ALL, SPREADS, Spread
from handoff.lifecycle import Done, Lifespan, ThreadRunner, lifespan, lifespan_with
from handoff.membership import MembershipEvent, Peer
from handoff.protocol import (
    LocalNode,
    Message,
    NamespaceVersion,
    NodeState,
)
from handoff.snapshot import DirectorySnapshotStore, SnapshotStore
from handoff.snapshot_s3 import S3SnapshotStore
from handoff.transforms import Transform, Transforms
from handoff.transport import PeerLink, TLSContexts, format_address, open_listener

__all__ = ("Node", "ReceivedHandoff")

logger = logging.getLogger("handoff.node")


@functools.lru_cache(maxsize=8)
def _warn_if_weak(cookie: bytes) -> None:
    # Cached: once per process and cookie, however many nodes it builds.
    weakness = cookie_weakness(cookie)
    if weakness is not None:
        logger.warning(
            "HANDOFF_COOKIE looks guessable: %s. Whoever records one handshake can test "
            "guesses offline (each costs one scrypt, ~50 ms of a core). %s",
            weakness,
            COOKIE_HOWTO,
        )


# Values of a tracked mapping looked at to tell whether it holds counts (at start-up).
_COUNTS_SCAN = 10_000


def _holds_counts(obj: object) -> bool:
    """True for a ``collections.Counter``, a ``defaultdict(int)`` or a non-empty mapping
    whose values (the first :data:`_COUNTS_SCAN` of them) are all ints."""
    if isinstance(obj, collections.Counter):
        return True
    if isinstance(obj, collections.defaultdict) and obj.default_factory is int:
        return True
    if not isinstance(obj, dict) or not obj:
        return False
    return all(type(value) is int for value in itertools.islice(dict.values(obj), _COUNTS_SCAN))


def _warn_if_counts(name: str, obj: object) -> None:
    if not _holds_counts(obj):
        return
    message = (
        f"namespace {name!r} tracks a {type(obj).__name__} of counts as a plain mapping: "
        "a handoff copies it, and the receiver keeps its own values, so counts are lost "
        "(sender page=10, receiver page=3: 3). For exact counts track a handoff.Counters "
        "(counts move exactly once and add up). merge=operator.add adds the two sides, but "
        "a mapping is copied, not moved: the sender keeps its counts, and a merge adds on "
        "every delivery, so counts can be added twice (two deploys in a row, a retried "
        "chunk, a catch-up)."
    )
    logger.warning("%s", message)
    warnings.warn(message, InexactCountsWarning, stacklevel=3)


@dataclass(frozen=True, slots=True)
class ReceivedHandoff:
    """The last handoff a node received completely (:attr:`Node.last_received`)."""

    peer: str
    """The node that handed its state over."""
    release: str
    """Its release ("" if it was gone by the time the handoff completed)."""
    records: int
    """How many records it sent in all (every namespace)."""
    at: float
    """When it completed (``time.time()``)."""
    applied: int = 0
    """Records this node applied from it."""
    kept: int = 0
    """Records not applied because this node held a newer entry for the key."""
    dropped: Mapping[str, int] = field(default_factory=dict)
    """Records this node did not keep, per reason (expired, receiver full, ...)."""


_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T", bound=Transform)
_A = TypeVar("_A")


ACTOR_SHARE = 0.5
"""Share of a drain's time that actor migrations may take; the streams get the rest."""
REPLACEMENT_SHARE = 0.2
"""Share of a drain's time it may wait, before choosing successors, for a peer whose link
is being replaced (a duplicate resolved the other way round): see
``Mesh.await_replacements``."""


def _add_moves(
    report: DrainReport, moves: Mapping[str, MoveStats], actors: Mapping[str, ActorHost]
) -> None:
    """Count what the drain's own actor migrations did into its report: actors moved
    (acknowledged by their new owners), of unknown outcome (the new owner's link ended
    before it answered), and those neither could take (still handling a message)."""
    for name, stats in moves.items():
        ns = report.namespaces.get(name)
        if ns is None:
            continue
        stranded = actors[name].stranded()
        ns.records += stats.moved + stats.in_doubt + stranded
        ns.sent += stats.moved + stats.in_doubt
        ns.acknowledged += stats.moved
        ns.applied += stats.moved
        ns.successors = sorted(set(ns.successors) | stats.successors)
        ns.drop(
            "outcome unknown: the new owner's link ended before it answered the move",
            stats.in_doubt,
        )
        ns.drop("not exported: still handling a message, or its state() failed", stranded)
        for refusal in stats.refused:
            target, _, why = refusal.partition(": ")
            ns.refusals.setdefault(target, why)


async def _refuses_connections(address: str) -> bool:
    """True when nothing listens at ``address`` (``host:port``): the process is gone. A
    timeout or any other failure is not proof (a partition drops packets)."""
    host, _, port = address.rpartition(":")
    try:
        with anyio.fail_after(PROBE_TIMEOUT):
            stream = await anyio.connect_tcp(host.strip("[]"), int(port))
    except (OSError, ValueError, TimeoutError) as exc:
        # anyio reports a refusal as OSError("All connection attempts failed") caused by
        # the ConnectionRefusedError of the last attempt.
        return isinstance(exc, ConnectionRefusedError) or isinstance(
            exc.__cause__, ConnectionRefusedError
        )
    await stream.aclose()
    return False


PROBE_TIMEOUT = 2.0
"""Seconds a probe of an unreachable peer's address may take."""


class Node:
    """A member of a warm-handoff cluster.

    Every argument is optional: explicit arguments win, then ``HANDOFF_*`` environment
    variables, then Fly.io / Kubernetes detection (see :mod:`handoff.config`). Configuration
    errors (a missing cookie, a malformed ``HANDOFF_BIND``) raise :class:`ConfigError` here,
    at construction. A port in use makes :meth:`start` take the next free one of
    ``HANDOFF_PORT_RANGE`` (several worker processes per machine; the node then appends
    ``-PORT`` to its name); with none free it raises :class:`PortsInUse`, which the ASGI
    lifespan and :meth:`start_in_thread` log as an error while the app serves on.

    Use it as ``async with node:`` or call :meth:`start` and :meth:`stop` from the same task.
    Leaving ``async with`` drains first. With ``handle_signals=True`` (plain scripts; the
    main thread only) SIGTERM and SIGINT start the drain too; see :meth:`wait_drained`.

    Attributes:
        settings: The resolved configuration (:class:`handoff.config.Settings`): arguments,
            then ``HANDOFF_*`` variables, then platform detection.
        lock: A :class:`threading.RLock` held while the node exports or applies a chunk of
            tracked state: threaded apps hold it too around every access to a tracked
            object (see :mod:`handoff.lifecycle`).
        codec: The serializer of records (``handoff._codec.Codec``); register encoders for
            your own value types on it before the first handoff.
        transforms: The upgrade / downgrade hooks registered with :meth:`upgrade` and
            :meth:`downgrade` (:class:`handoff.transforms.Transforms`).
        last_drain_report: The :class:`DrainReport` of this node's drain, once it has
            drained; ``None`` before.
        catch_up_report: The :class:`DrainReport` of the catch-up at stop after an earlier
            drain (records written after the drain exported them), once it ran; ``None``
            before.
        warm_reason: Why the node counts as warm: a restored snapshot, a received handoff,
            nothing to wait for, or the warm-up timeout; ``""`` while not warm.
        last_received: The :class:`ReceivedHandoff` of the last handoff this node received
            completely (from whom, how many records, when); ``None`` before. The records
            arrive (and count towards warmth) before this is set.
        join_error: Why this process serves without a node (every port of its range was
            in use, see ``HANDOFF_PORT_RANGE``): the ASGI lifespan and
            :meth:`start_in_thread` log it and let the app serve on; ``""`` otherwise.
        is_warm: True once the node is warm (a property, see below): use it for readiness
            checks.
        incarnation: Random per process, so peers tell a restarted node from the old one.
        started_at: Wall-clock time (``time.time()``) the node started; 0.0 before.
    """

    def __init__(
        self,
        cluster: str | None = None,
        *,
        cookie: str | bytes | None = None,
        release: str | None = None,
        name: str | None = None,
        bind: str | None = None,
        discovery: str | None = None,
        dns_server: str | None = None,
        snapshot_dir: str | os.PathLike[str] | None = None,
        snapshot_url: str | None = None,
        drain_timeout: float | None = None,
        warmup_timeout: float | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        heartbeat_timeout: float | None = None,
        heartbeat_interval: float | None = None,
        poll_interval: float | None = None,
        handshake_timeout: float | None = None,
        connect_timeout: float | None = None,
        advertise: str | None = None,
        control_socket: str | os.PathLike[str] | None = None,
        port_range: int | None = None,
        precopy: bool | float | None = None,
        environ: Mapping[str, str] | None = None,
        max_pending_handshakes: int = MAX_PENDING_HANDSHAKES,
        handle_signals: bool = False,
    ) -> None:
        self.settings: Settings = resolve_settings(
            environ=environ,
            cluster=cluster,
            cookie=cookie,
            release=release,
            name=name,
            bind=bind,
            discovery=discovery,
            dns_server=dns_server,
            snapshot_dir=snapshot_dir,
            snapshot_url=snapshot_url,
            drain_timeout=drain_timeout,
            warmup_timeout=warmup_timeout,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_ca=tls_ca,
            heartbeat_timeout=heartbeat_timeout,
            heartbeat_interval=heartbeat_interval,
            poll_interval=poll_interval,
            handshake_timeout=handshake_timeout,
            connect_timeout=connect_timeout,
            advertise=advertise,
            control_socket=control_socket,
            port_range=port_range,
            precopy=precopy,
        )
        s = self.settings
        # What was configured, before a start names the node after its worker's port.
        self._configured = s
        self._built_by = os.getpid()
        # The process's one scrypt (cached by cookie and cluster): handshakes and snapshot
        # files derive their keys from it, so it is paid here rather than in the first
        # handshake on the event loop.
        cluster_key(s.cookie, s.cluster)
        _warn_if_weak(s.cookie)
        self.incarnation = secrets.token_hex(8)
        self.started_at = 0.0
        self._tracked: dict[str, Tracked] = {}
        self._actors: dict[str, ActorHost] = {}
        # Public attributes are documented in the class docstring: help() shows no
        # docstring written after an assignment.
        self.transforms = Transforms()
        self.codec = Codec()
        self._snapshots: SnapshotStore | None = None
        # Only a holder of the cookie can make a snapshot this node restores.
        if s.snapshot_dir is not None:
            key = cluster_key(s.cookie, s.cluster).derive("snapshot")
            self._snapshots = DirectorySnapshotStore(s.snapshot_dir, key=key)
        elif s.snapshot_url is not None:
            key = cluster_key(s.cookie, s.cluster).derive("snapshot")
            self._snapshots = S3SnapshotStore.from_url(
                s.snapshot_url,
                key=key,
                owner=s.node_name,
                environ=os.environ if environ is None else environ,
            )
        self._drain_watchers: list[Callable[[NamespaceReport], None]] = []
        # The exporters of handoff.metrics (none unless asked for): see handoff._observe.
        self._observers = Observers()
        self._control: ControlServer | None = None
        self._drain_lock = anyio.Lock()
        self._runner: ThreadRunner | None = None
        self._task_scopes: set[anyio.CancelScope] = set()
        self.lock = threading.RLock()
        self._drained = anyio.Event()
        self._handle_signals = handle_signals
        self.last_drain_report: DrainReport | None = None
        self.catch_up_report: DrainReport | None = None
        self._warm = anyio.Event()
        self.warm_reason = ""
        self.join_error = ""
        self.last_received: ReceivedHandoff | None = None
        self._receiver, self._sessions = self._new_sessions()
        # One numbering for all of this node's drains: a receiver keeps a stream that a
        # drain gave up on at its deadline (no time left for a Cancel) until the link goes;
        # the catch-up reusing its id was "offered twice", a dropped link and lost records.
        self._stream_ids = itertools.count(1)
        # What the last drain exported, per namespace, while the node may keep serving
        # (None: no catch-up is due). Ownership namespaces keep no log: their export takes.
        self._exported: dict[str, ExportLog] | None = None
        self._precopy = PrecopyState(
            enabled=s.precopy > 0, pace=None if s.precopy == math.inf else s.precopy or None
        )
        self._mesh = Mesh(
            s,
            local_node=self._local_node,
            spawn=self._spawn,
            on_session_message=self._session_message,
            on_peer_lost=self._peer_lost,
            streams_with=lambda peer: self._sessions.streams_with(peer),
            on_link_lost=lambda peer, link: self._sessions.link_lost(peer, link),
            max_pending_handshakes=max_pending_handshakes,
        )
        # A peer back on a new link: a drain whose link to it ended asks what it applied.
        self._mesh.on_node_up(lambda peer: self._sessions.peer_up(peer.name))
        self._exit_stack: AsyncExitStack | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._listener: anyio.abc.SocketListener | None = None
        self._port = s.bind_port

    def _new_sessions(self) -> tuple[Receiver, Sessions]:
        receiver = Receiver(
            node=self.settings.node_name,
            tracked=self._tracked,
            transforms=self.transforms,
            codec=self.codec,
            accepting=self._refuse_reason,
            on_complete=self._handoff_received,
            lock=self.lock,
        )
        # Cluster-scoped counters report this node's own amounts to the peers.
        self._tallies = Tallies(
            incarnation=self.incarnation,
            tracked=self._tracked,
            codec=self.codec,
            peers=lambda: self._mesh.peer_links(),
        )
        return receiver, Sessions(receiver, tallies=self._tallies, actors=self._actors)

    async def _session_message(self, peer: str, link: PeerLink, message: Message) -> None:
        if self._observers:
            self._observers.received(peer, message)
            await self._sessions.handle(peer, ObservedLink(link, peer, self._observers), message)
            return
        await self._sessions.handle(peer, link, message)

    def _peer_lost(self, peer: str) -> None:
        self._sessions.peer_lost(peer)
        self._observers.peer_lost(peer)

    def _peer_links(self) -> Sequence[tuple[Peer, Link]]:
        """The links a drain sends on (through the observers, if any)."""
        pairs = self._mesh.peer_links()
        if not self._observers:
            return pairs
        return [(peer, ObservedLink(link, peer.name, self._observers)) for peer, link in pairs]

    # -- identity ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """This node's name (unique among live nodes of the cluster)."""
        return self.settings.node_name

    @property
    def cluster(self) -> str:
        """The cluster this node joins."""
        return self.settings.cluster

    @property
    def release(self) -> str:
        """This node's release (deploy) identifier."""
        return self.settings.release

    @property
    def state(self) -> NodeState:
        """``serving`` or ``draining``."""
        return self._state

    @property
    def _state(self) -> NodeState:
        # The mesh owns the state: it is what tells the peers when it changes.
        return self._mesh.state

    @property
    def port(self) -> int:
        """The port the node listens on (the real one when bound to port 0)."""
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` peers should dial to reach this node ("" if unknown)."""
        host = self.settings.advertise_host
        return format_address(host, self._port) if host else ""

    @property
    def control_socket(self) -> Path | None:
        """The Unix socket this node serves the CLI on while running (``None``: none)."""
        return self._control.path if self._control is not None else None

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._task_group is not None

    def peers(self) -> list[Peer]:
        """The authenticated peers, sorted by name."""
        return self._mesh.peers()

    # -- state ------------------------------------------------------------------------------

    def track(
        self,
        name: str,
        obj: object,
        *,
        version: int = 1,
        adapter: Adapter | None = None,
        validate: Callable[[Any, Any], bool] | None = None,
        spread: Spread | None = None,
        **options: Any,
    ) -> Adapter:
        """Hand ``obj`` off under ``name`` when this node drains, and receive it on start.

        The adapter is chosen by the object's type (``cachetools`` caches, any mutable
        mapping, and whatever third-party packages register) unless one is given;
        ``options`` go to the adapter (e.g. ``merge=``). ``version`` is the schema version of
        the records; register :meth:`upgrade` / :meth:`downgrade` hooks between versions.
        ``validate(key, value)`` runs on this node for every record it receives, from a
        handoff or a snapshot, after the upgrade hooks: a false result (or an exception)
        rejects the record, counted as dropped with the reason "rejected by the
        namespace's validator", which the sender's drain report shows (and is then not
        ``ok``). Use it to refuse types and values the application does not expect: any
        peer holding the cookie can send anything the codec decodes.
        ``spread`` says where a drain sends the keys when several successors take them:
        ``"all"`` (every successor gets every key, as far as its size allows: for round-robin
        balancers, such as a Kubernetes Service or the Fly proxy) or ``"split"`` (each key to
        exactly one successor, by rendezvous hashing: for key-affine balancers, or to send
        each record once). The default is ``"all"`` for caches and mappings; state that moves
        ownership (``handoff.Counters``) is always split, and asking it for ``"all"`` raises
        :exc:`ConfigError` (a copy would count twice).
        Must be called before :meth:`start`: peers learn the namespaces in the handshake.
        """
        if self.running:
            raise ConfigError(
                f"track({name!r}) after start(): track every namespace before the node "
                "starts, peers learn them when they connect"
            )
        if not isinstance(name, str) or not 0 < len(name) <= 255 or not name.isprintable():
            raise ConfigError(f"namespace {name!r} must be 1..255 printable characters")
        if name in self._tracked:
            raise ConfigError(f"namespace {name!r} is already tracked")
        if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version < 2**31:
            raise ConfigError(f"version of {name!r} must be an integer >= 0, got {version!r}")
        if validate is not None and not callable(validate):
            raise ConfigError(f"validate of {name!r} must be callable(key, value): {validate!r}")
        if spread is not None and spread not in SPREADS:
            raise ConfigError(
                f"spread of {name!r} must be one of {', '.join(map(repr, SPREADS))}, not {spread!r}"
            )
        chosen = adapter if adapter is not None else adapter_for(obj, **options)
        if spread == ALL and chosen.moves_ownership:
            raise ConfigError(
                f"spread='all' for {name!r}: its state moves ownership ({chosen.kind}), so "
                "each record must go to exactly one successor (a copy on several would count "
                "twice); leave spread unset or use 'split'"
            )
        if adapter is None and chosen.kind == "mapping" and options.get("merge") is None:
            _warn_if_counts(name, obj)
        if isinstance(chosen, ActorsAdapter):
            self._actors[name] = chosen.bind(
                functools.partial(self._actor_host, name, version=version)
            )
        self._tracked[name] = Tracked(name, obj, chosen, version, validate, spread)
        return chosen

    def _actor_host(self, name: str, registry: ActorRegistry, *, version: int) -> ActorHost:
        host = ActorHost(
            namespace=name,
            node=self.name,
            incarnation=self.incarnation,
            factory=registry.factory,
            codec=self.codec,
            transforms=self.transforms,
            version=version,
            peers=self._mesh.peer_links,
            serving=lambda: self.running and self._state is NodeState.SERVING,
            spawn=self._spawn,
            limits=registry.limits,
            idle_timeout=registry.idle_timeout,
            probe=_refuses_connections,
            unlinked=self._mesh.unlinked,
        )
        host.delivery_timeout = registry.delivery_timeout
        self._mesh.on_node_up(host.peer_up)
        self._mesh.on_node_down(host.peer_down)
        return host

    def upgrade(self, namespace: str, from_version: int) -> Callable[[_T], _T]:
        """Decorator: ``fn(key, value) -> (key, value)`` turns a ``from_version`` record of
        ``namespace`` into a ``from_version + 1`` one. Runs on the receiving (newer) node."""

        def register(fn: _T) -> _T:
            self.transforms.add_upgrade(namespace, from_version, fn)
            return fn

        return register

    def downgrade(self, namespace: str, from_version: int) -> Callable[[_T], _T]:
        """Decorator: ``fn(key, value) -> (key, value)`` turns a ``from_version`` record into
        a ``from_version - 1`` one. Runs on the sending node when its successor is older (a
        rollback): old code cannot know new formats."""

        def register(fn: _T) -> _T:
            self.transforms.add_downgrade(namespace, from_version, fn)
            return fn

        return register

    @property
    def tracked(self) -> Mapping[str, Tracked]:
        """The tracked namespaces by name."""
        return MappingProxyType(self._tracked)

    @property
    def is_warm(self) -> bool:
        """True once handed-off state arrived, a snapshot was restored, there was nothing to
        wait for, or ``warmup_timeout`` passed. Use it for readiness checks."""
        return self._warm.is_set()

    async def wait_warm(self) -> str:
        """Wait until :attr:`is_warm`; returns :attr:`warm_reason`."""
        await self._warm.wait()
        return self.warm_reason

    def _set_warm(self, reason: str) -> None:
        if not self._warm.is_set():
            self.warm_reason = reason
            self._warm.set()
            logger.info("%s is warm: %s", self.name, reason)

    def _serve_without(self, exc: PortsInUse) -> None:
        """The ASGI lifespan and the thread runner: this process could not join (no port
        free); the app serves on without a node, and says so loudly."""
        self.join_error = str(exc)
        logger.error(
            "%s: this process serves WITHOUT a node: its tracked state is neither received "
            "nor handed off. %s",
            self.name,
            exc,
        )
        self._set_warm(f"not joined: {exc}")

    def _refuse_reason(self) -> str:
        if self._state is not NodeState.SERVING:
            return f"{self.name} is draining"
        return ""

    def _handoff_received(self, peer: str, records: int, outcome: ImportResult) -> None:
        sender = next((p for p in self._mesh.peers() if p.name == peer), None)
        self.last_received = ReceivedHandoff(
            peer,
            sender.release if sender is not None else "",
            records,
            time.time(),
            outcome.applied,
            outcome.kept_existing,
            dict(outcome.dropped),
        )
        self._set_warm(f"received a handoff from {peer}")
        self._observers.handoff_received(self.last_received)

    def check_encodable(
        self, namespace: str | None = None, *, limit: int = 20
    ) -> list[tuple[str, Any, str]]:
        """Records a handoff could not carry, as ``(namespace, key, reason)``: for tests
        and development, so that a type the codec cannot encode (or a record over the
        4 MiB limit) is found before a deploy drops it. Checks every tracked namespace
        (or ``namespace``) and stops after ``limit`` problems. Reads only: a cache or a
        mapping through its export, counters and other state that moves ownership through
        their ``items()`` (their export would take what it reads); an ownership object
        without ``items()`` is not checked. O(entries): not for a request path."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit!r}")
        names = list(self._tracked) if namespace is None else [namespace]
        problems: list[tuple[str, Any, str]] = []
        for name in names:
            tracked = self._tracked.get(name)
            if tracked is None:
                raise KeyError(f"{name!r} is not tracked (tracked: {sorted(self._tracked)})")
            for record in self._records_to_check(tracked):
                reason = self._why_not_encodable(record)
                if reason is not None:
                    problems.append((name, record[0], reason))
                    if len(problems) >= limit:
                        return problems
        return problems

    @staticmethod
    def _records_to_check(tracked: Tracked) -> Iterator[Record]:
        if not tracked.adapter.moves_ownership:
            return iter(tracked.adapter.export())
        items = getattr(tracked.obj, "items", None)
        if not callable(items):
            return iter(())
        return ((key, value, None) for key, value in items())

    def _why_not_encodable(self, record: Record) -> str | None:
        payload, rejected = self.codec.encode_records([record])
        if rejected:
            return rejected[0][1]
        if len(payload) > MAX_CHUNK_BYTES:
            return f"record too large for a frame (over {MAX_CHUNK_BYTES} bytes encoded)"
        return None

    def stats(self) -> dict[str, Any]:
        """A snapshot of this node as plain data (JSON-ready), what ``handoff status``
        shows: ``node``, ``cluster``, ``release``, ``state``, ``address``, ``port``, ``pid``,
        ``warm`` and ``warm_reason``, ``join_error``, ``members`` (this node and its peers
        with their releases, states and namespace versions), ``tracked`` (per namespace:
        adapter kind, entries, schema version, spread), ``last_drain`` (the report, or ``None``) and
        ``last_received`` (``peer``, ``release``, ``records``, ``at``, ``applied``, ``kept``,
        ``dropped``; or ``None``) and ``precopy`` (each pre-copy: ``peer``, ``state``,
        ``copied``, ``entries``)."""
        return node_status(self)

    # A deadline, not a cancellation: at ``timeout`` the drain still snapshots what is left.
    async def drain(self, *, timeout: float | None = None) -> DrainReport:  # noqa: ASYNC109
        """Hand everything tracked to successors (or the snapshot store) and report.

        Announces draining (from then on the node refuses incoming state and
        :meth:`readiness` answers 503), lets streams it accepted before finish or
        withdraws from them, picks serving peers (see "Successor choice" in the README),
        streams each namespace and returns within ``timeout`` (default ``drain_timeout``)
        whatever the peers do. Draining twice returns the first report. If the app keeps
        writing after this drain, stopping the node sends what was written since (the
        catch-up, see :attr:`catch_up_report`).
        """
        return await self._drain(time_limit=timeout, stopping=False)

    async def _drain(self, *, time_limit: float | None, stopping: bool) -> DrainReport:
        async with self._drain_lock:
            if self.last_drain_report is not None:
                return self.last_drain_report
            if not self.running:
                raise LocalProtocolError("drain() needs a started node")
            limit = self.settings.drain_timeout if time_limit is None else time_limit
            # First announce it: from here on offers are refused and peers re-route.
            await self._mesh.set_state(NodeState.DRAINING)
            drainers: list[Drainer] = []

            async def run() -> DrainReport:
                # Actors move first (their own migrations), then pre-copied peers get their
                # deltas, then the streams take what is left, all within ``limit``.
                started = anyio.current_time()
                await self._mesh.await_replacements(started + limit * REPLACEMENT_SHARE)
                moves = await self._move_actors(started + limit * ACTOR_SHARE)
                deltas, skip, done = await self._precopy_deltas(
                    max(0.0, limit - (anyio.current_time() - started))
                )
                # A drain on the way out keeps no log of what it exported: nothing follows.
                drainer = self._drainer("drain", fingerprints=not stopping, skip=skip, exclude=done)
                drainers.append(drainer)
                remaining = max(0.0, limit - (anyio.current_time() - started))
                report = await self._sessions.drain(drainer, time_limit=remaining)
                _add_moves(report, moves, self._actors)
                if deltas:
                    report = merge_reports(report, deltas, seconds=anyio.current_time() - started)
                return report

            report = await self._observed_drain("drain", run)
            [drainer] = drainers
            self._log_report(report)
            if not stopping:
                self._spawn(self._sessions.send_late)
            self._exported = None if stopping else drainer.exported
            for log in drainer.exported.values():
                log.seal()
            self.last_drain_report = report
            self._drained.set()
            return report

    async def _move_actors(self, deadline: float) -> dict[str, MoveStats]:
        """Actors move first, each to its placement among the serving peers (what cannot
        move is left to the drain's export: the snapshot store or a successor)."""
        moves: dict[str, MoveStats] = {}
        for name, host in self._actors.items():
            moves[name] = await host.drain(deadline)
        return moves

    async def _catch_up(self) -> None:
        """At stop after a drain that left the node serving: send the records written
        since the drain exported them (new keys and changed values), so that they reach
        successors, or the snapshot store, or the report as lost."""
        async with self._drain_lock:
            exported, self._exported = self._exported, None
            if self.last_drain_report is None or exported is None:
                return
            # An adapter that moves ownership took what the drain exported: everything it
            # holds now was written since (comparing with the log would skip, and lose, an
            # amount equal to one exported).
            sources: dict[str, Callable[[], Iterator[Record]]] = {
                name: functools.partial(changed_records, tracked.adapter, exported[name])
                if name in exported and not tracked.adapter.moves_ownership
                else tracked.adapter.export
                for name, tracked in self._tracked.items()
            }
            limit = self.settings.drain_timeout

            async def run() -> DrainReport:
                # Peers that took a pre-copy get what changed since their delta as another
                # delta (it replaces there); the catch-up proper leaves them out, and
                # leaves out the namespaces they cover whole, instead of re-sending those
                # in full (the drain did not export them) to be kept as they were.
                started = anyio.current_time()
                await self._mesh.await_replacements(started + limit * REPLACEMENT_SHARE)
                deltas, skip, done = await self._precopy_deltas(limit, require_complete=False)
                drainer = self._drainer(CATCH_UP, sources=sources, skip=skip, exclude=done)
                remaining = max(0.0, limit - (anyio.current_time() - started))
                report = await self._sessions.drain(drainer, time_limit=remaining)
                if deltas:
                    report = merge_reports(report, deltas, seconds=anyio.current_time() - started)
                return report

            report = await self._observed_drain(CATCH_UP, run)
            if report.records:
                self._log_report(report)
            else:
                logger.info("%s: nothing written since the drain", self.name)
            self.catch_up_report = report

    async def _observed_drain(
        self, reason: str, run: Callable[[], Awaitable[DrainReport]]
    ) -> DrainReport:
        """``run()``, the drain, between telling the observers it starts and ends."""
        self._observers.drain_started(reason)
        report: DrainReport | None = None
        try:
            report = await run()
        finally:
            self._observers.drain_finished(report)
        return report

    @staticmethod
    def _log_report(report: DrainReport) -> None:
        log = logger.info if report.ok else logger.warning
        log("%s", report.summary())

    def _drainer(
        self,
        reason: str,
        *,
        fingerprints: bool = False,
        sources: Mapping[str, Callable[[], Iterator[Record]]] | None = None,
        skip: Mapping[str, frozenset[str]] | None = None,
        exclude: frozenset[str] = frozenset(),
    ) -> Drainer:
        return Drainer(
            node=self.name,
            release=self.release,
            cluster=self.cluster,
            tracked=self._tracked,
            transforms=self.transforms,
            codec=self.codec,
            snapshots=self._snapshots,
            peers=self._peer_links,
            relinking=self._mesh.replacing,
            lock=self.lock,
            progress=self._drain_progress,
            reason=reason,
            started_at=self.started_at,
            fingerprints=fingerprints,
            sources=sources,
            stream_ids=self._stream_ids,
            skip=skip,
            exclude=exclude,
        )

    # -- pre-copy (HANDOFF_PRECOPY) --------------------------------------------------------

    def _maybe_precopy(self, peer: Peer) -> None:
        """node-up: copy caches to a serving peer of a newer release (or, where releases
        do not compare, one that started later), one peer at a time."""
        state = self._precopy
        if state.lock is None or self._state is not NodeState.SERVING or not peer.serving:
            return
        if peer.name in state.begun or not is_newer(peer, self.release, self.started_at):
            return
        # Only what the peer tracks: marking a cache costs its reads something.
        state.begun[peer.name] = Precopy(
            {n: t for n, t in self._tracked.items() if n in peer.namespaces}
        )
        self._spawn(self._precopy_to, peer.name)

    async def _precopy_to(self, name: str) -> None:
        state = self._precopy
        assert state.lock is not None  # set at start, before any node-up
        async with state.lock:
            precopy = state.begun[name]
            if self._state is not NodeState.SERVING or not precopy.tracked:
                precopy.state = "partial"
                return
            # node-up may come before the link that carries the peer is registered: a copy
            # started then finds no successor (and is reported partial).
            with anyio.move_on_after(LINK_WAIT):
                while not any(p.name == name for p, _ in self._mesh.peer_links()):  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            precopy.state = "copying"
            for _ in range(COPY_ATTEMPTS):
                precopy.entries = {n: len(t.adapter) for n, t in precopy.tracked.items()}
                precopy.copied = {}
                drainer = Drainer(
                    node=self.name,
                    release=self.release,
                    cluster=self.cluster,
                    tracked=precopy.tracked,
                    transforms=self.transforms,
                    codec=self.codec,
                    snapshots=None,
                    peers=lambda: [
                        (p, link) for p, link in self._mesh.peer_links() if p.name == name
                    ],
                    lock=self.lock,
                    reason="pre-copy",
                    started_at=self.started_at,
                    sources=precopy.copy_sources(self.lock),
                    stream_ids=self._stream_ids,
                    kinds={n: t.adapter.kind + PRECOPY for n, t in precopy.tracked.items()},
                    pace=state.pace,
                    chunk_bytes=PRECOPY_CHUNK_BYTES,
                    progress=lambda ns: precopy.copied.__setitem__(ns.namespace, ns.acknowledged),
                )
                state.running = drainer
                try:
                    report, answered = await self._run_precopy(drainer, PRECOPY_TIME_LIMIT)
                finally:
                    state.running = None
                if answered or self._state is not NodeState.SERVING:
                    break
                logger.info("%s: %s did not answer the pre-copy's offer: offered again",
                            self.name, name)  # fmt: skip
            precopy.complete = frozenset(
                n
                for n, ns in report.namespaces.items()
                # Every record acknowledged: what the receiver did not keep (full of its
                # own entries) a second sending would not make it keep either.
                if name not in ns.refusals and ns.acknowledged == ns.records
            )
            precopy.state = "complete" if precopy.complete == set(precopy.tracked) else "partial"
            logger.info("%s: %s", self.name, report.summary())
            if precopy.complete and self._state is NodeState.SERVING:
                precopy.live_done = anyio.Event()
                self._spawn(self._stream_changes, name)

    async def _run_precopy(self, drainer: Drainer, time_limit: float) -> tuple[DrainReport, bool]:
        """Run a pre-copy's ``drainer`` (see ``Sessions.precopy``), stopped if no offer of
        it is answered within ``ANSWER_WAIT``; and whether one was."""
        answered = True

        async def watch() -> None:
            nonlocal answered
            await anyio.sleep(ANSWER_WAIT)
            if not drainer.offer_answered():
                answered = False
                drainer.stop()

        async with anyio.create_task_group() as group:
            group.start_soon(watch)
            report = await self._sessions.precopy(drainer, time_limit=time_limit)
            group.cancel_scope.cancel()
        return report, answered

    def _precopy_peer(self, name: str) -> list[tuple[Peer, Link]]:
        """The link to peer ``name`` while it serves (a pre-copy's only successor)."""
        return [(p, link) for p, link in self._mesh.peer_links() if p.name == name and p.serving]

    async def _stream_changes(self, name: str) -> None:
        """The live stream: while both serve, send the peer that took a complete copy
        what changed since, batch after batch as deltas (each applied as the drain's
        delta is), so that it lags this node by about a batch's round trips, not by the
        time until the drain. A batch the peer did not acknowledge whole is sent again
        with the next (its mark is kept only once acknowledged). Ends when the drain
        stops it (which then sends the rest as its delta), when the peer leaves or
        refuses, or when no namespace is left to stream."""
        precopy = self._precopy.begun[name]
        assert precopy.live_done is not None
        absent_since: float | None = None
        # Woken by a change of a cache it carries (from any thread), or by the drain;
        # without either it looks every LIVE_IDLE_LOOK (LIVE_POLL where an adapter cannot
        # wake it, or while the peer is away).
        bell = precopy.bell = Bell()
        wait = 0.0  # the first look: at once
        try:
            while not precopy.live_stopped and self._state is NodeState.SERVING:
                if wait > 0:
                    with anyio.move_on_after(wait):
                        await bell.event.wait()
                else:
                    await anyio.lowlevel.checkpoint()
                wait = LIVE_POLL
                if precopy.live_stopped:
                    return
                if not self._precopy_peer(name):
                    # Draining, gone, or between two links (a duplicate link is replaced
                    # under way): only a peer that stays away that long ends the stream.
                    draining = any(p.name == name for p, _ in self._mesh.peer_links())
                    now = anyio.current_time()
                    absent_since = now if absent_since is None else absent_since
                    if draining or now - absent_since > LINK_WAIT:
                        return
                    continue
                absent_since = None
                with self.lock:
                    bell.rearm()
                    batch = precopy.live_batch()
                    # Under the lock with the listing: a change after it rings the bell.
                    if not batch and precopy.wake_on_change(bell.ring):
                        wait = LIVE_IDLE_LOOK
                if not batch:
                    if not precopy.complete & precopy.marked - precopy.live_lost:
                        return
                    continue
                drainer = Drainer(
                    node=self.name,
                    release=self.release,
                    cluster=self.cluster,
                    tracked={n: precopy.tracked[n] for n in batch},
                    transforms=self.transforms,
                    codec=self.codec,
                    snapshots=None,  # a delta applies only on top of its copy
                    peers=lambda: self._precopy_peer(name),
                    lock=self.lock,
                    reason="pre-copy live delta",
                    started_at=self.started_at,
                    sources={
                        n: functools.partial(iter, records) for n, (records, _) in batch.items()
                    },
                    stream_ids=self._stream_ids,
                    kinds={n: precopy.tracked[n].adapter.kind + DELTA for n in batch},
                    pace=self._precopy.pace,
                    chunk_bytes=PRECOPY_CHUNK_BYTES,
                )
                precopy.live_drainer = drainer
                try:
                    # (Unanswered: stopped, and what it carried goes with the next batch.)
                    report, _ = await self._run_precopy(drainer, LIVE_TIME_LIMIT)
                finally:
                    precopy.live_drainer = None
                # What changed while the batch was in flight: at once, if it went well
                # (one that failed is sent again after LIVE_POLL, not in a tight loop).
                wait = 0.0
                for n, ns in report.namespaces.items():
                    if name in ns.refusals:
                        logger.warning("%s: %s refused the live stream of %r: %s",
                                    self.name, name, n, ns.refusals[name])  # fmt: skip
                        precopy.live_lost.add(n)
                    elif ns.records and ns.acknowledged == ns.records:
                        precopy.acknowledged(n, batch[n][1], ns.records)
                        with self.lock:
                            self._precopy.forget_changes(n)
                    elif not precopy.live_stopped:  # (stopped by the drain: its delta)
                        # Sent again with the next batch; the drain's delta if none.
                        wait = LIVE_POLL
                        logger.warning(
                            "%s: live stream to %s: %s", self.name, name, report.summary()
                        )
                logger.debug("%s: %s", self.name, report.summary())
        finally:
            precopy.live_done.set()

    async def _stop_live_streams(self) -> None:
        """At the drain: let each live stream's batch in flight finish (briefly), then
        stop it; what it did not get acknowledged is in the drain's delta."""
        streams = [p for p in self._precopy.begun.values() if p.live_done is not None]
        for precopy in streams:
            precopy.live_stopped = True
            if precopy.bell is not None:
                precopy.bell.ring()  # (waiting for a change)
        with anyio.move_on_after(LIVE_FINISH_WAIT):
            for precopy in streams:
                assert precopy.live_done is not None
                await precopy.live_done.wait()
        for precopy in streams:
            if precopy.live_drainer is not None:
                precopy.live_drainer.stop()
        with anyio.move_on_after(CANCEL_WAIT):
            for precopy in streams:
                assert precopy.live_done is not None
                await precopy.live_done.wait()

    def _precopy_status(self) -> list[dict[str, object]]:
        """Each pre-copy of this node (``handoff status``): see ``Precopy.status``."""
        return [p.status(name) for name, p in sorted(self._precopy.begun.items())]

    async def _precopy_deltas(
        self, limit: float, *, require_complete: bool = True
    ) -> tuple[list[DrainReport], dict[str, frozenset[str]], frozenset[str]]:
        """At the drain: stop a pre-copy in progress, then send each peer that took one
        what changed since (its delta replaces and deletes there; the next delta, at the
        catch-up, starts where this one ended). Returns the delta reports, the peers each
        namespace's drain leaves out (their copy is complete, unless not
        ``require_complete``: at the catch-up the drain gave them the rest, and their
        delta acknowledged) and the namespaces that need no drain at all (every successor
        the drain would choose is such a peer)."""
        state = self._precopy
        if state.lock is None:
            return [], {}, frozenset()
        if state.running is not None:
            state.running.stop()
        await self._stop_live_streams()
        with anyio.move_on_after(CANCEL_WAIT):
            async with state.lock:
                pass
        reports: list[DrainReport] = []
        skip: dict[str, set[str]] = {}
        links = {p.name: p for p, _ in self._mesh.peer_links()}
        for name, precopy in list(state.begun.items()):
            peer = links.get(name)
            if peer is None or not peer.serving or not precopy.marked:
                continue
            drainer = Drainer(
                node=self.name,
                release=self.release,
                cluster=self.cluster,
                tracked={n: precopy.tracked[n] for n in precopy.marked},
                transforms=self.transforms,
                codec=self.codec,
                snapshots=None,  # a delta applies only on top of its copy
                peers=lambda name=name: [  # type: ignore[misc]
                    (p, link) for p, link in self._mesh.peer_links() if p.name == name
                ],
                lock=self.lock,
                reason="pre-copy delta",
                started_at=self.started_at,
                sources=precopy.delta_sources(),
                stream_ids=self._stream_ids,
                kinds={n: precopy.tracked[n].adapter.kind + DELTA for n in precopy.marked},
            )
            report = await self._sessions.drain(drainer, time_limit=limit * DELTA_SHARE)
            logger.info("%s: %s", self.name, report.summary())
            reports.append(report)
            for n, ns in report.namespaces.items():
                if (n in precopy.complete or not require_complete) and (
                    ns.acknowledged == ns.records
                ):
                    skip.setdefault(n, set()).add(name)
        done = frozenset(
            n
            for n, names in skip.items()
            if (
                tiers := successor_tiers(
                    self.release,
                    [p for p in links.values() if n in p.namespaces],
                    local_started_at=self.started_at,
                )
            )
            and all(p.name in names for p in tiers[0])
        )
        return reports, {n: frozenset(names) for n, names in skip.items()}, done

    @contextmanager
    def watch_drain(self, callback: Callable[[NamespaceReport], None]) -> Iterator[None]:
        """Within the block, call ``callback(namespace_report)`` whenever a drain makes
        progress (an acknowledgement; a namespace done). It runs on the event loop: it must
        not block, nor keep the report (it changes in place)."""
        self._drain_watchers.append(callback)
        try:
            yield
        finally:
            self._drain_watchers.remove(callback)

    def _drain_progress(self, report: NamespaceReport) -> None:
        self._observers.drain_progress(report)
        for watcher in list(self._drain_watchers):
            try:
                watcher(report)
            except Exception:
                # An observer must never break the drain it watches.
                logger.exception("drain progress callback %r failed", watcher)

    async def wait_drained(self) -> DrainReport:
        """Wait until this node has drained (by any trigger) and return the report.

        With ``handle_signals=True`` a plain script runs ``async with node: await
        node.wait_drained()``: SIGTERM or SIGINT drains, then the block ends.
        """
        await self._drained.wait()
        assert self.last_drain_report is not None
        return self.last_drain_report

    async def _signal_loop(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if self._drain_lock.locked():
                    logger.warning("%s during the drain: the drain goes on to its deadline", name)
                    continue
                if self.last_drain_report is not None:
                    logger.warning("%s: %s has drained already", name, self.name)
                    continue
                logger.info("%s: draining %s", name, self.name)
                assert self._task_group is not None
                self._spawn(self.drain)

    # -- subscriptions ----------------------------------------------------------------------

    def on_node_up(self, callback: _F) -> _F:
        """Decorator: call ``callback(peer)`` when a peer joins. May be async."""
        self._mesh.on_node_up(callback)
        return callback

    def on_node_leaving(self, callback: _F) -> _F:
        """Decorator: call ``callback(peer)`` when a peer starts draining. May be async."""
        self._mesh.on_node_leaving(callback)
        return callback

    def on_node_down(self, callback: _F) -> _F:
        """Decorator: call ``callback(peer, reason)`` when a peer is gone. May be async."""
        self._mesh.on_node_down(callback)
        return callback

    async def events(self) -> AsyncIterator[MembershipEvent]:
        """Membership events from now on, until the node stops.

        Each iterator has its own buffer of 1024 events; a consumer that falls further
        behind misses the newest events until it catches up, with a warning in the log.
        """
        with self._mesh.subscribe() as receive:
            async with receive:
                async for event in receive:
                    yield event

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self.running:
                # Shielded: a cancelled app (Ctrl-C, a cancelled task group) is exactly when
                # state must still move. The drain keeps its own deadline; the outer bound
                # only guards against a bug there.
                with anyio.CancelScope(shield=True) as scope:
                    scope.deadline = anyio.current_time() + self.settings.drain_timeout + 5
                    if self.last_drain_report is None:
                        await self._drain(time_limit=None, stopping=True)
                    else:
                        await self._catch_up()
        finally:
            await self._stop(catch_up=False)

    async def start(self) -> None:
        """Listen, then find and join peers in the background. Returns once listening."""
        if self._exit_stack is not None:
            raise LocalProtocolError("this node is already started")
        s = self.settings
        for warning in s.warnings:
            logger.warning("%s", warning)
        tls = TLSContexts(s.tls) if s.tls else None
        discovery = make_discovery(
            s.discovery,
            default_port=s.bind_port,
            dns_server=s.dns_server,
            fly_app=s.fly_app,
            timeout=min(2.0, s.poll_interval),
            ports=s.port_range,
        )
        listener, port = await self._listen()
        self._take_identity(port)
        s = self.settings
        if self._snapshots is not None and self._tracked:
            try:
                restored = await self._restore_snapshots(self._snapshots)
            except BaseException:
                await listener.aclose()
                raise
            if restored:
                self._set_warm("restored " + ", ".join(sorted(restored)) + " from snapshots")
        control: ControlServer | None = None
        if s.control_socket is not None:
            try:
                control = await ControlServer.open(
                    self,
                    s.control_socket,
                    explicit=s.sources.get("control_socket", "default") != "default",
                )
            except BaseException:
                await listener.aclose()
                raise
        own_addresses = {format_address(s.bind_host, self._port)}
        if self.address:
            own_addresses.add(self.address)
        self.started_at = time.time()
        stack = AsyncExitStack()
        try:
            await stack.enter_async_context(listener)
            if control is not None:
                stack.push_async_callback(control.aclose)
            self._task_group = await stack.enter_async_context(anyio.create_task_group())
        except BaseException:
            await stack.aclose()
            raise
        self._exit_stack, self._control, self._listener = stack, control, listener
        self._mesh.start(listener, discovery=discovery, tls=tls, own_addresses=own_addresses)
        self._spawn(self._warmup)
        for host in self._actors.values():
            host.node, host.incarnation = self.name, self.incarnation
            host.start()
            self._spawn(host.run)
        if self._precopy.enabled:
            self._precopy.lock = anyio.Lock()
            self._mesh.on_node_up(self._maybe_precopy)
        if self._tallies.scoped():
            self._spawn(self._tallies.run)
        if control is not None:
            self._spawn(control.serve)
        if self._handle_signals:
            self._spawn(self._signal_loop)
        logger.info(
            "node %s (cluster %s, release %s) listening on %s%s; discovery %s",
            s.node_name,
            s.cluster,
            s.release,
            format_address(s.bind_host, self._port),
            " with TLS" if tls else "",
            discovery.describe(),
        )

    async def _restore_snapshots(self, store: SnapshotStore) -> dict[str, ImportResult]:
        """Restore waiting snapshots: the store's I/O (the network, for object storage) and
        the decoding in a worker thread, each chunk's application on the event loop under
        the node's lock, like a received handoff's."""
        cluster = self.settings.cluster

        def apply(work: Callable[[], ImportResult]) -> ImportResult:
            def locked() -> ImportResult:
                with self.lock:
                    return work()

            return anyio.from_thread.run_sync(locked)

        return await anyio.to_thread.run_sync(
            functools.partial(
                restore_snapshots,
                store,
                cluster=cluster,
                tracked=self._tracked,
                transforms=self.transforms,
                codec=self.codec,
                apply=apply,
            )
        )

    async def _listen(self) -> tuple[anyio.abc.SocketListener, int]:
        """Listen on the bind port, else on the first free one of the range after it (the
        worker processes of one machine take one each); :class:`PortsInUse` if none is."""
        s = self.settings
        ports = worker_ports(s.bind_port, s.port_range)
        for port in ports:
            try:
                listener = await open_listener(s.bind_host, port)
            except BindError as exc:
                cause = exc.__cause__
                if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
                    continue
                raise
            local = listener.extra(SocketAttribute.local_address)
            return listener, int(local[1]) if isinstance(local, tuple) else port
        where = format_address(s.bind_host, ports[0])
        if len(ports) == 1:
            raise PortsInUse(
                f"cannot listen on {where}: address already in use (another process, another "
                "node?, listens there); stop it, set HANDOFF_BIND to a free port, or let worker "
                "processes take the following ports (HANDOFF_PORT_RANGE above 1)"
            )
        raise PortsInUse(
            f"cannot listen on {where}: it and the {len(ports) - 1} ports after it "
            f"(HANDOFF_PORT_RANGE={s.port_range}) are all in use, by other worker "
            "processes of this machine or other programs: run fewer workers per machine or "
            "raise HANDOFF_PORT_RANGE (and free those ports), or set HANDOFF_BIND elsewhere"
        )

    def _take_identity(self, port: int) -> None:
        """The name (and control socket) of a node that listens on ``port`` in this
        process: see :func:`handoff.config.for_worker`."""
        self._port = port
        pid = os.getpid()
        if pid != self._built_by:
            # A forked worker (gunicorn --preload) is another process than its parent.
            self.incarnation = secrets.token_hex(8)
        # Always from what was configured: a node started again (after a stop, or a failed
        # start) must not pile suffixes up.
        configured = self._configured
        settings = for_worker(configured, port, pid=pid, built_by=self._built_by)
        if settings == self.settings:
            return
        if port != configured.bind_port:
            logger.info(
                "port %d is in use (another worker of this machine?): this node listens on "
                "%d and is called %s",
                configured.bind_port,
                port,
                settings.node_name,
            )
        for warning in settings.warnings[len(configured.warnings) :]:
            logger.warning("%s", warning)
        self.settings = settings
        self._mesh.adopt(settings)
        self._receiver, self._sessions = self._new_sessions()

    def stop(self, reason: str = "node stopping") -> Awaitable[None]:
        """Say goodbye to every peer, stop listening and end all background work.

        ``await node.stop()`` after :meth:`start`; a plain ``node.stop()`` after
        :meth:`start_in_thread`, where it drains first (as leaving ``async with`` does) and
        returns once the node's thread has finished. A node that drained earlier and kept
        serving first sends its state again (the catch-up: records written after the drain
        are handed off too, see :attr:`catch_up_report`).
        """
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.stop()
            return Done()
        if not self.running:
            return Done()  # nothing to stop, and no coroutine left unawaited by sync callers
        return self._stop(reason)

    def _spawn(self, function: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run ``function(*args)`` as a background task of the node.

        Each task runs in a shielded scope of its own that only :meth:`stop` cancels: when
        the application around the node is cancelled (Ctrl-C, a cancelled task group), the
        links must stay up so that leaving ``async with node`` can still drain over them.
        """
        assert self._task_group is not None

        async def run() -> None:
            scope = anyio.CancelScope(shield=True)
            self._task_scopes.add(scope)
            try:
                with scope:
                    await function(*args)
            finally:
                self._task_scopes.discard(scope)

        self._task_group.start_soon(run)

    async def _stop(self, reason: str = "node stopping", *, catch_up: bool = True) -> None:
        stack, task_group = self._exit_stack, self._task_group
        if stack is None or task_group is None:
            return
        if catch_up and self.last_drain_report is not None:
            # Drained earlier while the app kept serving: what it wrote since must not be
            # left behind silently.
            with anyio.CancelScope(shield=True) as scope:
                scope.deadline = anyio.current_time() + self.settings.drain_timeout + 5
                await self._catch_up()
        await self._mesh.stop(reason)
        # The listener is closed before the accept loop's task is cancelled: asyncio 3.11
        # sets the result of an accept cancelled in the loop's turn that found a connection
        # waiting (its reader callback was already queued): an InvalidStateError from the
        # callback (bpo-41317; fixed in 3.12). The listener's aclose unregisters that
        # callback (which cancels it even when queued) before it cancels the accept. A
        # connection can arrive at any moment (a peer, or a stray dial), so the turn of the
        # loop taken here before did not close the race. Shielded: a cancellation here
        # would skip the task group's exit below.
        listener, self._listener = self._listener, None
        with anyio.CancelScope(shield=True):
            if listener is not None:
                await listener.aclose()
            await anyio.lowlevel.checkpoint()
        # The task group must be exited from the scope that entered it, so not shielded.
        for scope in list(self._task_scopes):
            scope.cancel()
        task_group.cancel_scope.cancel()
        self._exit_stack = self._task_group = None
        try:
            await stack.aclose()
        finally:
            self._control = None
            self._mesh.close()
        logger.info("node %s stopped", self.name)

    # -- hooks for services ---------------------------------------------------------------

    def lifespan(self, app: object) -> AbstractAsyncContextManager[None]:
        """ASGI lifespan: ``FastAPI(lifespan=node.lifespan)``, ``Starlette(lifespan=...)``.

        Startup starts the node, restores a waiting snapshot and waits for warm-up (at most
        ``warmup_timeout``); shutdown drains, then stops. See :mod:`handoff.lifecycle`.
        """
        return lifespan(self, app)

    def lifespan_with(self, inner: Lifespan[_A]) -> Lifespan[_A]:
        """The node's lifespan around the app's own: ``lifespan=node.lifespan_with(mine)``.

        The node is warm before ``inner``'s startup runs and drains after its shutdown;
        the state ``inner`` yields is passed on to the server.
        """
        return lifespan_with(self, inner)

    def start_in_thread(self, *, wait_warm: bool = True, timeout: float = 30.0) -> None:
        """Run the node in a background thread (threaded apps: Flask, Django, scripts).

        Returns once the node listens, and, with ``wait_warm``, once it is warm (at most
        ``warmup_timeout``). Stop it with ``node.stop()``, which drains first. Guard every
        access to tracked objects with :attr:`lock`. Without ``node.stop()`` the node
        drains at interpreter exit and, started from the main thread of an app that left
        SIGTERM and SIGINT to Python, on those (see :mod:`handoff.lifecycle`). Flask's
        development server::

            if __name__ == "__main__":
                node.start_in_thread()
                app.run(use_reloader=False)  # the reloader would start a second node
                node.stop()  # drains; a no-op if a signal already did

        gunicorn (any number of workers: each runs its own node; ``--preload`` too, since
        the node starts in the worker), in ``gunicorn.conf.py``::

            def post_worker_init(worker):
                from app import node
                node.start_in_thread()

            def worker_exit(server, worker):  # on TERM, INT and QUIT
                from app import node
                node.stop()
        """
        if self.running or self._runner is not None:
            raise LocalProtocolError("this node is already started")
        runner = ThreadRunner(self)
        runner.start(wait_warm=wait_warm, timeout=timeout)
        self._runner = runner

    def readiness(self) -> tuple[int, dict[str, object]]:
        """``(status, body)`` for a readiness endpoint: 200 once warm and serving, 503
        while warming up and from the moment the node drains (so that load balancers stop
        sending it the requests whose writes would come after its handoff).

        For a Kubernetes readiness probe or a Fly check, e.g. in FastAPI::

            @app.get("/readyz")
            def ready(response: Response) -> dict[str, object]:
                response.status_code, body = node.readiness()
                return body
        """
        ready = self.is_warm and self._state is NodeState.SERVING
        if self._state is not NodeState.SERVING:
            reason = f"{self._state.value}: this node is handing its state off"
        else:
            reason = self.warm_reason or "warming up"
        body: dict[str, object] = {
            "ready": ready,
            "reason": reason,
            "node": self.name,
            "release": self.release,
            "state": self._state.value,
            "peers": len(self._mesh.peers()),
        }
        return (200 if ready else 503), body

    def _local_node(self) -> LocalNode:
        return LocalNode(
            cluster=self.cluster,
            name=self.name,
            incarnation=self.incarnation,
            release=self.release,
            started_at=self.started_at,
            state=self._state,
            address=self.address,
            namespaces=tuple(
                NamespaceVersion(t.name, t.version)
                for t in sorted(self._tracked.values(), key=lambda t: t.name)
            ),
        )

    # -- background work --------------------------------------------------------------------

    async def _warmup(self) -> None:
        if not self._tracked:
            self._set_warm("nothing tracked")
            return
        with anyio.move_on_after(self.settings.warmup_timeout):
            await self._warm.wait()
        self._set_warm(f"warm-up timeout ({self.settings.warmup_timeout:g} s)")
