"""Node: one process's part in a warm-handoff cluster.

It listens for peers, dials the addresses discovery finds, authenticates both ways and keeps
one link per peer alive with heartbeats (``node.peers()``, ``@node.on_node_up``,
``node.events()``). It holds the tracked namespaces (``node.track``, upgrade and downgrade
hooks), restores snapshots at start, receives handoffs, and drains to successors or to the
snapshot store (``node.drain()``), with hooks for ASGI and threaded services.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import os
import secrets
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, contextmanager
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Self, TypeVar

import anyio
import anyio.abc
from anyio.abc import SocketAttribute
from anyio.streams.memory import MemoryObjectSendStream

from handoff._adapter import Adapter
from handoff._codec import Codec
from handoff._errors import (
    AuthenticationError,
    ClusterMismatch,
    ConfigError,
    ConnectError,
    DiscoveryError,
    HandoffError,
    HeartbeatTimeout,
    LocalProtocolError,
    NameConflict,
    ProtocolError,
    SelfConnection,
    TLSError,
    VersionMismatch,
)
from handoff._registry import adapter_for
from handoff.config import Settings, resolve_settings
from handoff.control import ControlServer
from handoff.discovery import Discovery, PeerAddress, make_discovery
from handoff.engine import Drainer, DrainReport, NamespaceReport, Receiver, Tracked
from handoff.engine._restore import restore_snapshots
from handoff.lifecycle import Done, Lifespan, ThreadRunner, lifespan, lifespan_with
from handoff.membership import (
    DUPLICATE,
    DownReason,
    Membership,
    MembershipEvent,
    NodeDown,
    NodeLeaving,
    Peer,
)
from handoff.protocol import (
    Accept,
    Ack,
    Connection,
    Event,
    Limits,
    LocalNode,
    Message,
    MessageReceived,
    NamespaceVersion,
    NodeState,
    PeerGoodbye,
    PeerInfo,
    PeerStateChanged,
    Refuse,
    Role,
)
from handoff.snapshot import DirectorySnapshotStore, SnapshotStore
from handoff.transforms import Transform, Transforms
from handoff.transport import (
    PeerLink,
    TLSContexts,
    format_address,
    open_connection,
    open_listener,
    secure_server_side,
)

__all__ = ("Node",)

logger = logging.getLogger("handoff.node")

PeerCallback = Callable[[Peer], Awaitable[None] | None]
DownCallback = Callable[[Peer, DownReason], Awaitable[None] | None]
_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T", bound=Transform)
_A = TypeVar("_A")

EVENT_BUFFER = 1024
EVICTION_LOG_INTERVAL = 10.0
# Handshakes in progress at once; past this the oldest is dropped to admit a newcomer, so
# peers that connect and never authenticate cost a socket each and cannot lock others out.
MAX_PENDING_HANDSHAKES = 256


def _remote_of(stream: anyio.abc.ByteStream) -> str:
    try:
        address = stream.extra(SocketAttribute.remote_address)
    except anyio.TypedAttributeLookupError:
        return "unknown"
    if isinstance(address, tuple):
        return format_address(str(address[0]), int(address[1]))
    return str(address)


def _describe(peer: Peer) -> str:
    return f"{peer.name} (release {peer.release}, {peer.address})"


class Node:
    """A member of a warm-handoff cluster.

    Every argument is optional: explicit arguments win, then ``HANDOFF_*`` environment
    variables, then Fly.io / Kubernetes detection (see :mod:`handoff.config`). Configuration
    errors (a missing cookie, a malformed ``HANDOFF_BIND``) raise :class:`ConfigError` here,
    at construction; a port in use raises :class:`BindError` from :meth:`start`.

    Use it as ``async with node:`` or call :meth:`start` and :meth:`stop` from the same task.
    Leaving ``async with`` drains first. With ``handle_signals=True`` (plain scripts; the
    main thread only) SIGTERM and SIGINT start the drain too; see :meth:`wait_drained`.
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
        )
        s = self.settings
        self.incarnation = secrets.token_hex(8)
        self.started_at = 0.0
        self._state = NodeState.SERVING
        self._tracked: dict[str, Tracked] = {}
        self.transforms = Transforms()
        """The upgrade / downgrade hooks registered with :meth:`upgrade` and :meth:`downgrade`."""
        self.codec = Codec()
        """Serializer of records; register encoders for your own value types on it."""
        self._snapshots: SnapshotStore | None = (
            DirectorySnapshotStore(s.snapshot_dir) if s.snapshot_dir is not None else None
        )
        self._drainer: Drainer | None = None
        self._drain_watchers: list[Callable[[NamespaceReport], None]] = []
        self._control: ControlServer | None = None
        self._drain_lock = anyio.Lock()
        self._runner: ThreadRunner | None = None
        self._task_scopes: set[anyio.CancelScope] = set()
        self.lock = threading.RLock()
        """Held while the node exports or applies a chunk of tracked state: threaded apps
        hold it too around every access to a tracked object (see :mod:`handoff.lifecycle`)."""
        self._drained = anyio.Event()
        self._handle_signals = handle_signals
        self.last_drain_report: DrainReport | None = None
        """The report of this node's drain, once it has drained."""
        self._warm = anyio.Event()
        self.warm_reason = ""
        """Why the node counts as warm: a restored snapshot, a received handoff, nothing
        to wait for, or the warm-up timeout."""
        self._receiver = Receiver(
            node=s.node_name,
            tracked=self._tracked,
            transforms=self.transforms,
            codec=self.codec,
            accepting=self._refuse_reason,
            on_complete=self._handoff_received,
            lock=self.lock,
        )
        self._limits = Limits(
            handshake_timeout=s.handshake_timeout,
            heartbeat_interval=s.heartbeat_interval,
            heartbeat_timeout=s.heartbeat_timeout,
        )
        self._membership = Membership(s.node_name, grace=s.handshake_timeout)
        self._links: dict[int, PeerLink] = {}
        self._link_ids = itertools.count(1)
        self._up_callbacks: list[PeerCallback] = []
        self._leaving_callbacks: list[PeerCallback] = []
        self._down_callbacks: list[DownCallback] = []
        self._subscribers: set[MemoryObjectSendStream[MembershipEvent]] = set()
        self._max_pending = max_pending_handshakes
        # Incoming handshakes in progress, oldest first (dicts keep insertion order).
        self._pending: dict[int, anyio.CancelScope] = {}
        self._pending_ids = itertools.count(1)
        self._evicted = 0
        self._evictions_logged_at = -math.inf
        self._dialling: set[str] = set()
        self._self_addresses: set[str] = set()
        self._last_discovery_error = ""
        self._exit_stack: AsyncExitStack | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._listener: anyio.abc.SocketListener | None = None
        self._tls: TLSContexts | None = None
        self._discovery: Discovery | None = None
        self._port = s.bind_port
        self._stopping = False

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
        return self._membership.peers()

    # -- state ------------------------------------------------------------------------------

    def track(
        self,
        name: str,
        obj: object,
        *,
        version: int = 1,
        adapter: Adapter | None = None,
        **options: Any,
    ) -> Adapter:
        """Hand ``obj`` off under ``name`` when this node drains, and receive it on start.

        The adapter is chosen by the object's type (``cachetools`` caches, any mutable
        mapping, and whatever third-party packages register) unless one is given;
        ``options`` go to the adapter (e.g. ``merge=``). ``version`` is the schema version of
        the records; register :meth:`upgrade` / :meth:`downgrade` hooks between versions.
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
        chosen = adapter if adapter is not None else adapter_for(obj, **options)
        self._tracked[name] = Tracked(name, obj, chosen, version)
        return chosen

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

    def _refuse_reason(self) -> str:
        if self._state is not NodeState.SERVING:
            return f"{self.name} is draining"
        return ""

    def _handoff_received(self, peer: str, records: int) -> None:
        self._set_warm(f"received a handoff from {peer}")

    # A deadline, not a cancellation: at ``timeout`` the drain still snapshots what is left.
    async def drain(self, *, timeout: float | None = None) -> DrainReport:  # noqa: ASYNC109
        """Hand everything tracked to successors (or the snapshot store) and report.

        Announces draining, picks serving peers (newer release first), streams each
        namespace and returns within ``timeout`` (default ``drain_timeout``) whatever the
        peers do. Draining twice returns the first report.
        """
        async with self._drain_lock:
            if self.last_drain_report is not None:
                return self.last_drain_report
            if not self.running:
                raise LocalProtocolError("drain() needs a started node")
            limit = self.settings.drain_timeout if timeout is None else timeout
            await self._set_state(NodeState.DRAINING)
            self._drainer = Drainer(
                node=self.name,
                release=self.release,
                cluster=self.cluster,
                tracked=self._tracked,
                transforms=self.transforms,
                codec=self.codec,
                snapshots=self._snapshots,
                peers=self._peer_links,
                lock=self.lock,
                progress=self._drain_progress,
            )
            try:
                report = await self._drainer.run(time_limit=limit)
            finally:
                self._drainer = None
            self.last_drain_report = report
            self._drained.set()
            log = logger.warning if report.dropped else logger.info
            log("%s", report.summary())
            return report

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
                if self._drain_lock.locked() or self.last_drain_report is not None:
                    logger.warning("%s during the drain: the drain goes on to its deadline", name)
                    continue
                logger.info("%s: draining %s", name, self.name)
                assert self._task_group is not None
                self._spawn(self.drain)

    # -- subscriptions ----------------------------------------------------------------------

    def on_node_up(self, callback: _F) -> _F:
        """Decorator: call ``callback(peer)`` when a peer joins. May be async."""
        self._up_callbacks.append(callback)
        return callback

    def on_node_leaving(self, callback: _F) -> _F:
        """Decorator: call ``callback(peer)`` when a peer starts draining. May be async."""
        self._leaving_callbacks.append(callback)
        return callback

    def on_node_down(self, callback: _F) -> _F:
        """Decorator: call ``callback(peer, reason)`` when a peer is gone. May be async."""
        self._down_callbacks.append(callback)
        return callback

    async def events(self) -> AsyncIterator[MembershipEvent]:
        """Membership events from now on, until the node stops.

        Each iterator has its own buffer of 1024 events; a consumer that falls further
        behind misses the newest events until it catches up, with a warning in the log.
        """
        send, receive = anyio.create_memory_object_stream[MembershipEvent](EVENT_BUFFER)
        self._subscribers.add(send)
        try:
            async with receive:
                async for event in receive:
                    yield event
        finally:
            self._subscribers.discard(send)
            send.close()

    def _publish(self, events: tuple[MembershipEvent, ...] | list[MembershipEvent]) -> None:
        for event in events:
            peer = event.peer
            if isinstance(event, NodeDown):
                logger.info(
                    "%s: node-down %s: %s%s",
                    self.name,
                    _describe(peer),
                    event.reason,
                    f" ({event.detail})" if event.detail else "",
                )
                for down in self._down_callbacks:
                    self._call(down, peer, event.reason)
            elif isinstance(event, NodeLeaving):
                logger.info(
                    "%s: leaving %s (release %s, %s)",
                    self.name,
                    peer.name,
                    peer.release,
                    peer.address,
                )
                for leaving in self._leaving_callbacks:
                    self._call(leaving, peer)
            else:
                logger.info(
                    "%s: node-up %s (release %s, %s)",
                    self.name,
                    peer.name,
                    peer.release,
                    peer.address,
                )
                for up in self._up_callbacks:
                    self._call(up, peer)
            for send in list(self._subscribers):
                try:
                    send.send_nowait(event)
                except anyio.WouldBlock:
                    logger.warning("an events() consumer is %d events behind; dropped one", 1024)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    self._subscribers.discard(send)

    def _call(self, callback: Callable[..., Awaitable[None] | None], *args: object) -> None:
        try:
            result = callback(*args)
        except Exception:
            logger.exception("membership callback %r failed", callback)
            return
        if inspect.isawaitable(result) and self._task_group is not None:
            self._spawn(self._await_callback, callback, result)

    @staticmethod
    async def _await_callback(callback: object, result: Awaitable[None]) -> None:
        try:
            await result
        except Exception:
            logger.exception("membership callback %r failed", callback)

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
                    await self.drain()
        finally:
            await self._stop()

    async def start(self) -> None:
        """Listen, then find and join peers in the background. Returns once listening."""
        if self._exit_stack is not None:
            raise LocalProtocolError("this node is already started")
        s = self.settings
        for warning in s.warnings:
            logger.warning("%s", warning)
        self._tls = TLSContexts(s.tls) if s.tls else None
        self._discovery = make_discovery(
            s.discovery,
            default_port=s.bind_port,
            dns_server=s.dns_server,
            fly_app=s.fly_app,
            timeout=min(2.0, s.poll_interval),
        )
        listener = await open_listener(s.bind_host, s.bind_port)
        if self._snapshots is not None and self._tracked:
            try:
                with self.lock:
                    restored = restore_snapshots(
                        self._snapshots,
                        cluster=s.cluster,
                        tracked=self._tracked,
                        transforms=self.transforms,
                        codec=self.codec,
                    )
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
        local = listener.extra(SocketAttribute.local_address)
        self._port = int(local[1]) if isinstance(local, tuple) else s.bind_port
        self._self_addresses = {format_address(s.bind_host, self._port)}
        if self.address:
            self._self_addresses.add(self.address)
        self.started_at = time.time()
        self._stopping = False
        stack = AsyncExitStack()
        try:
            await stack.enter_async_context(listener)
            if control is not None:
                stack.push_async_callback(control.aclose)
            self._task_group = await stack.enter_async_context(anyio.create_task_group())
        except BaseException:
            await stack.aclose()
            raise
        self._exit_stack, self._listener, self._control = stack, listener, control
        self._spawn(self._accept_loop, listener)
        self._spawn(self._discovery_loop, self._discovery)
        self._spawn(self._expiry_loop)
        self._spawn(self._warmup)
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
            " with TLS" if self._tls else "",
            self._discovery.describe(),
        )

    def stop(self, reason: str = "node stopping") -> Awaitable[None]:
        """Say goodbye to every peer, stop listening and end all background work.

        ``await node.stop()`` after :meth:`start`; a plain ``node.stop()`` after
        :meth:`start_in_thread`, where it drains first (as leaving ``async with`` does) and
        returns once the node's thread has finished.
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

    async def _stop(self, reason: str = "node stopping") -> None:
        stack, task_group = self._exit_stack, self._task_group
        if stack is None or task_group is None:
            return
        self._stopping = True
        with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
            async with anyio.create_task_group() as goodbyes:
                for link in list(self._links.values()):
                    goodbyes.start_soon(link.aclose, reason)
        # The task group must be exited from the scope that entered it, so not shielded.
        for scope in list(self._task_scopes):
            scope.cancel()
        task_group.cancel_scope.cancel()
        self._exit_stack = self._task_group = self._listener = None
        try:
            await stack.aclose()
        finally:
            self._control = None
            self._membership.clear()
            for send in list(self._subscribers):
                send.close()
            self._subscribers.clear()
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
                node.stop()  # Ctrl-C ends app.run()

        gunicorn (one worker, ``threads`` for concurrency), in ``gunicorn.conf.py``::

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
        """``(status, body)`` for a readiness endpoint: 200 once warm, 503 before.

        For a Kubernetes readiness probe or a Fly check, e.g. in FastAPI::

            @app.get("/readyz")
            def ready(response: Response) -> dict[str, object]:
                response.status_code, body = node.readiness()
                return body
        """
        body: dict[str, object] = {
            "ready": self.is_warm,
            "reason": self.warm_reason or "warming up",
            "node": self.name,
            "release": self.release,
            "state": self._state.value,
            "peers": len(self._membership.peers()),
        }
        return (200 if self.is_warm else 503), body

    async def _set_state(self, state: NodeState) -> None:
        """Change this node's state and tell every peer (serving -> draining)."""
        if state is self._state:
            return
        self._state = state
        async with anyio.create_task_group() as tell:
            for link in list(self._links.values()):
                tell.start_soon(self._tell_state, link, state)

    @staticmethod
    async def _tell_state(link: PeerLink, state: NodeState) -> None:
        try:
            await link.set_local_state(state)
        except HandoffError as exc:
            logger.debug("could not tell %s about state %s: %s", link.remote, state, exc)

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

    def _link(self, stream: anyio.abc.ByteStream, role: Role, remote: str) -> PeerLink:
        # A peer that stops reading for as long as it may stay silent counts as gone.
        return PeerLink(
            stream,
            self._connection(role),
            remote,
            send_timeout=self.settings.heartbeat_timeout,
        )

    def _connection(self, role: Role) -> Connection:
        return Connection(
            role,
            self._local_node(),
            self.settings.cookie,
            now=anyio.current_time(),
            limits=self._limits,
        )

    # -- background work --------------------------------------------------------------------

    async def _accept_loop(self, listener: anyio.abc.SocketListener) -> None:
        assert self._task_group is not None
        while True:
            try:
                stream = await listener.accept()
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                return
            except OSError as exc:
                # Out of file descriptors and the like: back off instead of spinning.
                logger.warning("accepting a connection failed: %s", exc)
                await anyio.sleep(0.1)
                continue
            if len(self._pending) >= self._max_pending:
                # Evict the oldest pending handshake instead of refusing the newcomer:
                # otherwise sockets that connect and stay silent lock real peers out
                # until they time out, and a slow trickle of them keeps it that way.
                oldest = next(iter(self._pending))
                self._pending.pop(oldest).cancel()
                self._evicted += 1
                now = anyio.current_time()
                # Summarised: whoever floods us must not also control our log volume.
                if now - self._evictions_logged_at >= EVICTION_LOG_INTERVAL:
                    logger.warning(
                        "%d pending handshakes (the cap): dropped the %d oldest so that "
                        "new peers get in (latest from %s)",
                        len(self._pending) + 1,
                        self._evicted,
                        _remote_of(stream),
                    )
                    self._evicted, self._evictions_logged_at = 0, now
            pending_id, scope = next(self._pending_ids), anyio.CancelScope()
            self._pending[pending_id] = scope
            self._spawn(self._serve_incoming, stream, pending_id, scope)

    async def _serve_incoming(
        self, stream: anyio.abc.ByteStream, pending_id: int, scope: anyio.CancelScope
    ) -> None:
        remote = _remote_of(stream)
        done: tuple[PeerLink, PeerInfo, list[Event]] | None = None
        try:
            with scope:  # cancelled if evicted by newer connections (see _accept_loop)
                if self._tls is not None:
                    stream = await secure_server_side(
                        stream,
                        self._tls.server,
                        time_limit=self.settings.handshake_timeout,
                        remote=remote,
                    )
                link = self._link(stream, Role.SERVER, remote)
                peer, events = await link.handshake()
                done = link, peer, events
        except HandoffError as exc:
            self._log_refusal(remote, exc, incoming=True)
            await anyio.aclose_forcefully(stream)
            return
        except Exception:
            # A bug of ours must cost one connection, never the node (invariant 6).
            logger.exception("internal error in the handshake from %s; connection closed", remote)
            await anyio.aclose_forcefully(stream)
            return
        finally:
            self._pending.pop(pending_id, None)
        if done is None:  # evicted (logged by _accept_loop)
            await anyio.aclose_forcefully(stream)
            return
        link, peer, events = done
        await self._run_link(link, peer, events, dialled=False, address=remote)

    async def _dial(self, target: PeerAddress) -> None:
        key = str(target)
        self._dialling.add(key)
        try:
            stream = await open_connection(
                target.host,
                target.port,
                time_limit=self.settings.connect_timeout,
                tls=self._tls.client if self._tls else None,
            )
            link = self._link(stream, Role.CLIENT, key)
            try:
                peer, events = await link.handshake()
            except BaseException:
                await link.aclose()
                raise
        except SelfConnection:
            self._self_addresses.add(key)
            return
        except HandoffError as exc:
            self._log_refusal(key, exc, incoming=False)
            return
        except Exception:
            logger.exception("internal error in the handshake to %s; connection closed", key)
            return
        finally:
            self._dialling.discard(key)
        await self._run_link(link, peer, events, dialled=True, address=key)

    @staticmethod
    def _log_refusal(remote: str, exc: HandoffError, *, incoming: bool) -> None:
        direction = "from" if incoming else "to"
        if isinstance(exc, SelfConnection):
            logger.debug("connection %s %s is this node itself", direction, remote)
        elif isinstance(exc, AuthenticationError | ClusterMismatch | VersionMismatch):
            logger.warning("refused connection %s %s: %s", direction, remote, exc)
        elif isinstance(exc, NameConflict | ProtocolError | TLSError):
            logger.warning("dropped connection %s %s: %s", direction, remote, exc)
        elif isinstance(exc, ConnectError):
            # DNS lists nodes that are still starting; not worth more than debug.
            logger.debug("cannot reach %s: %s", remote, exc)
        else:
            logger.info("connection %s %s failed: %s", direction, remote, exc)

    async def _run_link(
        self,
        link: PeerLink,
        peer: PeerInfo,
        events: list[Event],
        *,
        dialled: bool,
        address: str,
    ) -> None:
        link_id = next(self._link_ids)
        decision = self._membership.established(
            link_id, peer, dialled=dialled, address=address, now=anyio.current_time()
        )
        for other in decision.close:
            stale = self._links.get(other)
            if stale is not None and self._task_group is not None:
                self._spawn(stale.aclose, DUPLICATE)
        if not decision.keep:
            await link.aclose(DUPLICATE)
            return
        self._links[link_id] = link
        self._publish(decision.events)
        reason, detail = DownReason.CONNECTION_LOST, ""
        try:
            while True:
                for event in events:
                    if isinstance(event, PeerStateChanged):
                        self._publish(self._membership.state_changed(link_id, event.state))
                    elif isinstance(event, PeerGoodbye):
                        reason, detail = DownReason.GOODBYE, event.reason
                        return
                    elif isinstance(event, MessageReceived):
                        await self._dispatch_session(peer.name, link, event.message)
                events = await link.next_events()
        except HeartbeatTimeout as exc:
            reason, detail = DownReason.HEARTBEAT_TIMEOUT, str(exc)
        except ProtocolError as exc:
            logger.warning("dropped %s: %s", peer.name, exc)
            reason, detail = DownReason.PROTOCOL_ERROR, str(exc)
        except HandoffError as exc:
            reason, detail = DownReason.CONNECTION_LOST, str(exc)
        except Exception as exc:
            logger.exception("internal error on the link to %s; link closed", peer.name)
            reason, detail = DownReason.PROTOCOL_ERROR, f"internal error: {exc!r}"
        finally:
            self._links.pop(link_id, None)
            if self._membership.link_of(peer.name) in (link_id, None):
                # Streams die with the link that carried them (not with a replaced duplicate).
                self._receiver.peer_lost(peer.name)
                if self._drainer is not None:
                    self._drainer.on_peer_lost(peer.name)
            await link.aclose()
            if not self._stopping:
                self._publish(
                    self._membership.lost(link_id, reason, detail, now=anyio.current_time())
                )

    async def _dispatch_session(self, peer: str, link: PeerLink, message: Message) -> None:
        if isinstance(message, Accept | Refuse | Ack):
            if self._drainer is not None:
                self._drainer.on_message(peer, message)
        else:
            await self._receiver.handle(peer, link, message)

    def _peer_links(self) -> list[tuple[Peer, PeerLink]]:
        pairs = []
        for peer in self._membership.peers():
            link_id = self._membership.link_of(peer.name)
            link = self._links.get(link_id) if link_id is not None else None
            if link is not None:
                pairs.append((peer, link))
        return pairs

    async def _discovery_loop(self, discovery: Discovery) -> None:
        assert self._task_group is not None
        while True:
            try:
                found = await discovery.discover()
            except DiscoveryError as exc:
                # Logged once per distinct failure, retried every poll: never fatal.
                message = str(exc)
                level = logging.DEBUG if message == self._last_discovery_error else logging.WARNING
                logger.log(level, "discovery failed (will retry): %s", message)
                self._last_discovery_error = message
            else:
                self._last_discovery_error = ""
                for target in found:
                    key = str(target)
                    if (
                        key in self._self_addresses
                        or key in self._dialling
                        or self._membership.knows_address(key)
                    ):
                        continue
                    self._spawn(self._dial, target)
            await anyio.sleep(self.settings.poll_interval)

    async def _warmup(self) -> None:
        if not self._tracked:
            self._set_warm("nothing tracked")
            return
        with anyio.move_on_after(self.settings.warmup_timeout):
            await self._warm.wait()
        self._set_warm(f"warm-up timeout ({self.settings.warmup_timeout:g} s)")

    async def _expiry_loop(self) -> None:
        while True:
            now = anyio.current_time()
            self._publish(self._membership.expire(now))
            wait = self._membership.next_deadline() - now
            await anyio.sleep(min(max(wait, 0.05), 1.0))
