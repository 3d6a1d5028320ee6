"""The peer mesh: who this node is linked to, and what it hears about them.

It accepts and dials connections, runs the handshakes (TLS server side included), keeps one
link per peer (heartbeats run inside :class:`~handoff.transport.PeerLink`), polls discovery,
expires peers that never came back, and publishes membership events to callbacks and
``events()`` subscribers. It does not interpret session messages (offers, chunks,
acknowledgements): it hands them to the ``on_session_message`` callback it was given and
reports a peer's lost link through ``on_peer_lost``, so data flows one way, from the mesh to
the sessions.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol

import anyio
import anyio.abc
from anyio.abc import SocketAttribute
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from handoff._errors import (
    AuthenticationError,
    ClusterMismatch,
    ConnectError,
    DiscoveryError,
    HandoffError,
    HandoffTimeout,
    HeartbeatTimeout,
    NameConflict,
    ProtocolError,
    SelfConnection,
    TLSError,
    VersionMismatch,
)
from handoff._guard import LogLimiter, PendingHandshakes, source_of
from handoff._referrals import Referrals
from handoff._text import peer_text
from handoff.config import Settings
from handoff.discovery import Discovery, PeerAddress
from handoff.membership import (
    DUPLICATE,
    NAME_IN_USE,
    DownReason,
    Membership,
    MembershipEvent,
    NodeDown,
    NodeLeaving,
    Peer,
)
from handoff.protocol import (
    MAX_REFERRALS,
    REFERRAL_PROTOCOL,
    Connection,
    Event,
    Limits,
    LocalNode,
    Message,
    MessageReceived,
    NodeState,
    PeerGoodbye,
    PeerInfo,
    Peers,
    PeerStateChanged,
    Role,
)
from handoff.transport import (
    PeerLink,
    TLSContexts,
    format_address,
    open_connection,
    secure_server_side,
)

__all__ = (
    "EVENT_BUFFER",
    "MAX_PENDING_HANDSHAKES",
    "MAX_PENDING_PER_SOURCE",
    "DownCallback",
    "Mesh",
    "PeerCallback",
    "SessionHandler",
    "Spawn",
)

# The node's own logger: these lines (node-up, refused connections, ...) were always
# "handoff.node" ones, and users' logging configuration may select them by that name.
logger = logging.getLogger("handoff.node")

PeerCallback = Callable[[Peer], Awaitable[None] | None]
DownCallback = Callable[[Peer, DownReason], Awaitable[None] | None]
SessionHandler = Callable[[str, PeerLink, Message], Awaitable[None]]
"""``(peer name, link, message)``: a session message (offer, chunk, ack, ...) arrived."""

EVENT_BUFFER = 1024
EVICTION_LOG_INTERVAL = 10.0
# Handshakes in progress at once; past this one is dropped to admit a newcomer (see
# PendingHandshakes: the source holding the most pays, or the oldest when each holds one), so
# peers that connect and never authenticate cost a socket each and cannot lock others out.
MAX_PENDING_HANDSHAKES = 256
# Handshakes in progress from one address (an IPv6 /64): a flood from there only ever
# displaces its own. Several worker nodes on one machine dial at once (as many as the
# default port range, HANDOFF_PORT_RANGE, has ports), hence not 1 or 2.
MAX_PENDING_PER_SOURCE = 16
# Log lines about refused or failed connections, per address: a burst, then one summary
# per interval. Whoever provokes them must not also decide how much the node logs.
REFUSAL_LOG_BURST = 5
REFUSAL_LOG_INTERVAL = 60.0
# A peer with another cookie keeps dialling (every discovery poll) and keeps being dialled:
# one line per address per minute says it all, with what to check.
COOKIE_REFUSAL_LOG_INTERVAL = 60.0
# Refusals not logged yet, per address, counted for the next line about that address.
MAX_COOKIE_SOURCES = 1024
COOKIE_CHECK = (
    "check that HANDOFF_COOKIE is the same on every node of the cluster (and that "
    "HANDOFF_CLUSTER names the same cluster)"
)
# A probed port (beyond the first of a port range: a possible second worker) where nobody
# listens is tried again after twice as long each time, up to this: a new worker there
# dials everyone itself at start, so waiting costs no time to join, and the machines of a
# big cluster do not knock on every empty port of each other's range every poll.
PROBE_BACKOFF_LIMIT = 60.0
# How often a duplicate link kept up for the streams it carries checks whether they ended
# (see Mesh._retire): short next to a drain, and a duplicate is rare.
RETIRE_POLL_INTERVAL = 0.05
# A new link gets this node's list of peers (Peers) this long after it is established (a
# just-started node waits for it), not at once: a peer that refuses the link (a name in
# use) says why in a Goodbye, which a write of ours racing it would turn into a reset
# connection.
FIRST_LIST_DELAY = 0.1
# A link of this node that ended is told (a new list) to the peers it was listed to this
# long after the first such change, and at most this often.
REFERRAL_INTERVAL = 1.0


class Spawn(Protocol):
    """Runs ``function(*args)`` as a background task of the node (see ``Node._spawn``)."""

    def __call__(self, function: Callable[..., Awaitable[object]], *args: object) -> None: ...


def _remote_of(stream: anyio.abc.ByteStream) -> str:
    return _endpoint(stream, SocketAttribute.remote_address)


def _endpoint(stream: anyio.abc.ByteStream, attribute: object) -> str:
    """``host:port`` of one end of ``stream``'s socket (IPv4-mapped IPv6 shown as IPv4)."""
    try:
        address = stream.extra(attribute)
    except anyio.TypedAttributeLookupError:
        return "unknown"
    if isinstance(address, tuple):
        host = str(address[0])
        if host.startswith("::ffff:") and "." in host:
            host = host.removeprefix("::ffff:")
        return format_address(host, int(address[1]))
    return str(address)


def _source_of(stream: anyio.abc.ByteStream) -> str:
    try:
        address = stream.extra(SocketAttribute.remote_address)
    except anyio.TypedAttributeLookupError:
        return "unknown"
    return source_of(str(address[0])) if isinstance(address, tuple) else str(address)


def _describe(peer: Peer) -> str:
    # Every part is the peer's own word: escaped and cut before it reaches a log.
    return f"{peer_text(peer.name)} (release {peer_text(peer.release)}, {peer_text(peer.address)})"


def _host_of(address: str) -> str:
    """The host of ``host:port`` (``[v6]:port`` too)."""
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 or "]" in address else address
    return host.strip("[]")


class Mesh:
    """The links of one node to its peers, and the membership events they produce.

    ``local_node`` is called for every handshake, so peers always learn the current
    identity (state, address, namespaces). Background work goes through ``spawn``, which
    must keep tasks running until the owner stops the node: the mesh only spawns between
    :meth:`start` and the end of :meth:`stop`. ``log_clock`` times the limits on log lines
    about refused connections (tests pass a fake one). ``streams_with(peer)`` says whether
    the sessions have a stream with ``peer`` under way: a duplicate link is closed only
    once it says no (see :meth:`_retire`); ``on_link_lost(peer, link)`` says that such a
    link, not the one in use, ended: the streams it carried end with it.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        local_node: Callable[[], LocalNode],
        spawn: Spawn,
        on_session_message: SessionHandler,
        on_peer_lost: Callable[[str], None],
        streams_with: Callable[[str], bool] = lambda peer: False,
        on_link_lost: Callable[[str, PeerLink], Awaitable[None] | None] = lambda peer, link: None,
        max_pending_handshakes: int = MAX_PENDING_HANDSHAKES,
        max_pending_per_source: int = MAX_PENDING_PER_SOURCE,
        log_clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        self._settings = settings
        # Duplicate links are held for a handshake's time before the tie-break.
        self._membership = Membership(
            settings.node_name,
            grace=settings.handshake_timeout,
            heartbeat_timeout=settings.heartbeat_timeout,
        )
        self._local_node = local_node
        self._spawn = spawn
        self._on_session_message = on_session_message
        self._on_peer_lost = on_peer_lost
        self._streams_with = streams_with
        self._on_link_lost = on_link_lost
        self._state = NodeState.SERVING
        self._limits = Limits(
            handshake_timeout=settings.handshake_timeout,
            heartbeat_interval=settings.heartbeat_interval,
            heartbeat_timeout=settings.heartbeat_timeout,
        )
        self._links: dict[int, PeerLink] = {}
        self._link_ids = itertools.count(1)
        self._up_callbacks: list[PeerCallback] = []
        self._leaving_callbacks: list[PeerCallback] = []
        self._down_callbacks: list[DownCallback] = []
        self._subscribers: set[MemoryObjectSendStream[MembershipEvent]] = set()
        # Incoming handshakes in progress, and how to cancel each.
        self._pending = PendingHandshakes(max_pending_handshakes, max_pending_per_source)
        self._pending_scopes: dict[int, anyio.CancelScope] = {}
        self._evicted = 0
        self._refusal_log = LogLimiter(
            burst=REFUSAL_LOG_BURST, interval=REFUSAL_LOG_INTERVAL, clock=log_clock
        )
        self._cookie_log = LogLimiter(
            burst=1, interval=COOKIE_REFUSAL_LOG_INTERVAL, clock=log_clock
        )
        self._cookie_unlogged: dict[str, int] = {}
        self._evictions_logged_at = -math.inf
        self._dialling: set[str] = set()
        # Probed addresses where nobody listened: address -> (retry after, last wait).
        self._probe_backoff: dict[str, tuple[float, float]] = {}
        self._self_addresses: set[str] = set()
        # Local ends of our own recent dials -> (address dialled, until when to remember):
        # a handshake failing as "self" on our listener from one of these was our own.
        self._own_dials: dict[str, tuple[str, float]] = {}
        self._last_discovery_error = ""
        # The first discovery round's addresses not linked yet and not found to be nobody
        # (refused, or no peer of this cluster): None until discovery first answers. Empty
        # (for good) once every one is settled; see :meth:`unlinked`.
        self._first_round: set[str] | None = None
        # Peers linked while the first round lasts whose list of peers (Peers) has not come
        # yet: one of the nodes they know may have left discovery while holding actors.
        self._awaiting_lists: set[str] = set()
        self._first_round_over = False
        self._referrals = Referrals(settings.node_name)
        self._links_changed: anyio.Event | None = None
        # Per peer that speaks Peers: the names in the last list sent to it.
        self._names_sent: dict[str, frozenset[str]] = {}
        # What discovery gave last: dialled by the discovery loop, never again as listed.
        self._discovered: set[str] = set()
        self._tls: TLSContexts | None = None
        self._running = False
        self._stopping = False

    def adopt(self, settings: Settings) -> None:
        """Take the node's final settings before :meth:`start`: its name is known once it
        listens (a worker on a port after its configured one appends ``-PORT``)."""
        if self._running:
            raise RuntimeError("the mesh runs already: its node cannot change its name")
        self._settings = settings
        self._membership = Membership(
            settings.node_name,
            grace=settings.handshake_timeout,
            heartbeat_timeout=settings.heartbeat_timeout,
        )
        self._referrals = Referrals(settings.node_name)

    @property
    def state(self) -> NodeState:
        """This node's state as its peers know it."""
        return self._state

    def peers(self) -> list[Peer]:
        """The authenticated peers, sorted by name."""
        return self._membership.peers()

    def unlinked(self) -> list[str]:
        """Where a node may be that holds what this node would otherwise take for
        unclaimed (actors), and that it has not linked yet:

        - while the first discovery round lasts (``["discovery ..."]`` before discovery
          first answers), its addresses not linked nor found to be nobody, and the peers
          linked meanwhile whose list of peers has not come yet (they may know a node that
          left discovery: a draining node leaves DNS while it still holds actors);
        - always, the addresses peers list (:class:`~handoff.protocol.Peers`) whose node is
          not linked and not found to be nobody (see :class:`~handoff._referrals.Referrals`).

        An address that times out stays (it may be a partition) until it answers, or
        discovery (for the first round) or the peers listing it stop giving it."""
        pending = self._first_round
        if pending is None:
            return ["discovery (no answer yet)"] if self._running else []
        unlinked: list[str] = []
        if not self._first_round_over:
            pending -= self._self_addresses
            for key in sorted(pending):
                name = self._membership.name_at(key)
                if name is None:
                    unlinked.append(key)
                elif name not in self._awaiting_lists:
                    pending.discard(key)
            unlinked += [f"{name} (its list of peers)" for name in sorted(self._awaiting_lists)]
            # Over for good once settled: later peers are asked like any (see the actors).
            self._first_round_over = not unlinked
        return unlinked + self._referrals.pending(self._linked)

    def _linked(self, name: str) -> bool:
        return self._membership.link_of(name) is not None

    def _settled(self, key: str) -> None:
        if self._first_round is not None:
            self._first_round.discard(key)

    def peer_links(self) -> list[tuple[Peer, PeerLink]]:
        """Every authenticated peer with the link that currently carries it."""
        pairs = []
        for peer in self._membership.peers():
            link_id = self._membership.link_of(peer.name)
            link = self._links.get(link_id) if link_id is not None else None
            if link is not None:
                pairs.append((peer, link))
        return pairs

    async def await_replacements(self, until: float) -> None:
        """Wait, until ``until`` at most, while a peer is absent only because its link is
        being replaced: the other side kept the duplicate it completed first and closed
        the link in use here, whose replacement is still in its handshake (the server side
        of a handshake completes first). A drain choosing successors meanwhile would find
        none; the replacement normally takes a moment, its handshake time at most."""
        while anyio.current_time() < min(  # noqa: ASYNC110
            until, self._membership.replacing(anyio.current_time())
        ):
            await anyio.sleep(RETIRE_POLL_INTERVAL)

    def replacing(self, peer: str) -> bool:
        """Whether ``peer`` is absent only because its link is being replaced (see
        :meth:`await_replacements`)."""
        now = anyio.current_time()
        return self._membership.replacing(now, peer) > now

    async def set_state(self, state: NodeState) -> None:
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
            logger.debug(
                "could not tell %s about state %s: %s",
                peer_text(link.remote),
                state,
                peer_text(exc),
            )

    # -- start and stop ---------------------------------------------------------------------

    def start(
        self,
        listener: anyio.abc.SocketListener,
        *,
        discovery: Discovery,
        tls: TLSContexts | None,
        own_addresses: Iterable[str],
    ) -> None:
        """Accept peers on ``listener``, dial what ``discovery`` finds (never
        ``own_addresses``) and expire lost peers, in tasks started through ``spawn``.

        The caller keeps the listener (and closes it after :meth:`stop`).
        """
        self._tls = tls
        self._self_addresses = set(own_addresses)
        self._stopping = False
        self._running = True
        self._links_changed = anyio.Event()
        self._spawn(self._accept_loop, listener)
        self._spawn(self._discovery_loop, discovery)
        self._spawn(self._expiry_loop)
        self._spawn(self._referral_loop)

    async def stop(self, reason: str) -> None:
        """Say goodbye to every peer (at most 2 s, even when cancelled); no node-down
        events for links that end from now on. The caller then cancels the tasks it
        spawned and calls :meth:`close`."""
        self._stopping = True
        with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
            async with anyio.create_task_group() as goodbyes:
                for link in list(self._links.values()):
                    goodbyes.start_soon(link.aclose, reason)
        self._running = False

    def close(self) -> None:
        """Forget every peer and end every ``events()`` iterator (after :meth:`stop`)."""
        self._membership.clear()
        for send in list(self._subscribers):
            send.close()
        self._subscribers.clear()

    # -- subscriptions ----------------------------------------------------------------------

    def on_node_up(self, callback: PeerCallback) -> None:
        """Call ``callback(peer)`` when a peer joins. May be async."""
        self._up_callbacks.append(callback)

    def on_node_leaving(self, callback: PeerCallback) -> None:
        """Call ``callback(peer)`` when a peer starts draining. May be async."""
        self._leaving_callbacks.append(callback)

    def on_node_down(self, callback: DownCallback) -> None:
        """Call ``callback(peer, reason)`` when a peer is gone. May be async."""
        self._down_callbacks.append(callback)

    @contextmanager
    def subscribe(self) -> Iterator[MemoryObjectReceiveStream[MembershipEvent]]:
        """Within the block, every membership event also goes to the stream yielded.

        It buffers :data:`EVENT_BUFFER` events; past that, the newest are dropped with a
        warning. The stream ends when the mesh is closed.
        """
        send, receive = anyio.create_memory_object_stream[MembershipEvent](EVENT_BUFFER)
        self._subscribers.add(send)
        try:
            yield receive
        finally:
            self._subscribers.discard(send)
            send.close()

    def _publish(self, events: tuple[MembershipEvent, ...] | list[MembershipEvent]) -> None:
        name = self._settings.node_name
        for event in events:
            peer = event.peer
            if isinstance(event, NodeDown):
                logger.info(
                    "%s: node-down %s: %s%s",
                    name,
                    _describe(peer),
                    event.reason,
                    f" ({peer_text(event.detail)})" if event.detail else "",
                )
                for down in self._down_callbacks:
                    self._call(down, peer, event.reason)
            elif isinstance(event, NodeLeaving):
                logger.info("%s: leaving %s", name, _describe(peer))
                for leaving in self._leaving_callbacks:
                    self._call(leaving, peer)
            else:
                logger.info("%s: node-up %s", name, _describe(peer))
                for up in self._up_callbacks:
                    self._call(up, peer)
            for send in list(self._subscribers):
                try:
                    send.send_nowait(event)
                except anyio.WouldBlock:
                    logger.warning(
                        "an events() consumer is %d events behind; dropped one", EVENT_BUFFER
                    )
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    self._subscribers.discard(send)

    def _call(self, callback: Callable[..., Awaitable[None] | None], *args: object) -> None:
        try:
            result = callback(*args)
        except Exception:
            logger.exception("membership callback %r failed", callback)
            return
        if inspect.isawaitable(result):
            if self._running:
                self._spawn(self._await_callback, callback, result)
            elif inspect.iscoroutine(result):
                result.close()  # stopping: nobody runs it (and no "never awaited" warning)

    @staticmethod
    async def _await_callback(callback: object, result: Awaitable[None]) -> None:
        try:
            await result
        except Exception:
            logger.exception("membership callback %r failed", callback)

    # -- links ------------------------------------------------------------------------------

    def _last_heard(self, link_id: int) -> float:
        link = self._links.get(link_id)
        return link.last_received if link is not None else -math.inf

    def _link(self, stream: anyio.abc.ByteStream, role: Role, remote: str) -> PeerLink:
        # A peer that stops reading for as long as it may stay silent counts as gone.
        return PeerLink(
            stream,
            self._connection(role),
            remote,
            send_timeout=self._settings.heartbeat_timeout,
        )

    def _connection(self, role: Role) -> Connection:
        return Connection(
            role,
            self._local_node(),
            self._settings.cookie,
            now=anyio.current_time(),
            limits=self._limits,
        )

    async def _accept_loop(self, listener: anyio.abc.SocketListener) -> None:
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
            source = _source_of(stream)
            admission = self._pending.admit(source)
            for evicted in admission.evicted:
                scope = self._pending_scopes.pop(evicted, None)
                if scope is not None:
                    scope.cancel()
            if admission.evicted:
                self._note_eviction(source)
            scope = anyio.CancelScope()
            self._pending_scopes[admission.id] = scope
            self._spawn(self._serve_incoming, stream, source, admission.id, scope)

    def _note_eviction(self, source: str) -> None:
        # Summarised: whoever floods us must not also control our log volume.
        self._evicted += 1
        now = anyio.current_time()
        if now - self._evictions_logged_at >= EVICTION_LOG_INTERVAL:
            logger.warning(
                "%d pending handshakes (the cap is %d in all, %d per address): dropped %d "
                "so that new peers get in, taken from the addresses holding the most, or "
                "the oldest when each holds one (latest from %s, which holds %d)",
                len(self._pending),
                self._pending.total,
                self._pending.per_source,
                self._evicted,
                peer_text(source),
                self._pending.count(source),
            )
            self._evicted, self._evictions_logged_at = 0, now

    async def _serve_incoming(
        self,
        stream: anyio.abc.ByteStream,
        source: str,
        pending_id: int,
        scope: anyio.CancelScope,
    ) -> None:
        remote = _remote_of(stream)
        done: tuple[PeerLink, PeerInfo, list[Event]] | None = None
        try:
            with scope:  # cancelled if evicted by newer connections (see _accept_loop)
                if self._tls is not None:
                    stream = await secure_server_side(
                        stream,
                        self._tls.server,
                        time_limit=self._settings.handshake_timeout,
                        remote=remote,
                    )
                link = self._link(stream, Role.SERVER, remote)
                peer, events = await link.handshake()
                done = link, peer, events
        except HandoffError as exc:
            if not (isinstance(exc, SelfConnection) and self._reached_itself(remote)):
                self._log_refusal(source, remote, exc, incoming=True)
            await anyio.aclose_forcefully(stream)
            return
        except Exception:
            # A bug of ours must cost one connection, never the node (invariant 6); a
            # peer that found one must not flood the log with it either.
            if self._refusal_log.allow(source):
                logger.exception(
                    "internal error in the handshake from %s; connection closed", remote
                )
            await anyio.aclose_forcefully(stream)
            return
        finally:
            self._pending.done(pending_id)
            self._pending_scopes.pop(pending_id, None)
        if done is None:  # evicted (logged by _accept_loop)
            await anyio.aclose_forcefully(stream)
            return
        link, peer, events = done
        await self._run_link(link, peer, events, dialled=False, address=remote)

    def _remember_dial(self, local: str, key: str) -> None:
        now = anyio.current_time()
        for endpoint, (_, until) in list(self._own_dials.items()):
            if until <= now:
                del self._own_dials[endpoint]
        # Long enough for our own listener to see this dial's Hello, and bounded by the
        # dials of one connect-and-handshake time, whatever peers do.
        limit = self._settings.connect_timeout + self._settings.handshake_timeout
        self._own_dials[local] = (key, now + limit)

    def _reached_itself(self, remote: str) -> bool:
        """True if the connection from ``remote`` that failed as "self" on our listener is
        one of our own dials: the peer's word plus a source address no one else can have
        (the local end of a socket of ours). The address dialled is then never dialled
        again."""
        dial = self._own_dials.pop(remote, None)
        if dial is None or dial[1] <= anyio.current_time():
            return False
        key = dial[0]
        self._self_addresses.add(key)
        logger.debug("%s is this node's own listener: not dialled again", peer_text(key))
        return True

    async def _dial(self, target: PeerAddress) -> None:
        key = str(target)
        self._dialling.add(key)
        try:
            stream = await open_connection(
                target.host,
                target.port,
                time_limit=self._settings.connect_timeout,
                tls=self._tls.client if self._tls else None,
            )
            self._remember_dial(_endpoint(stream, SocketAttribute.local_address), key)
            link = self._link(stream, Role.CLIENT, key)
            try:
                peer, events = await link.handshake()
            except BaseException:
                await link.aclose()
                raise
        except HandoffError as exc:
            timed_out = isinstance(exc, HandoffTimeout)
            self._referrals.dialled(key, reached=None, timed_out=timed_out)
            if not timed_out:
                # Refused, or not a peer of this cluster (another cookie, itself): nobody
                # there holds anything of ours. A timeout proves nothing (a partition).
                self._settled(key)
            if target.probe and isinstance(exc, ConnectError):
                # Nobody on this port of the range: normal, not worth a log line.
                self._back_off(key)
                logger.debug("nobody listens on %s (probed): %s", key, peer_text(exc))
                return
            # A Reject("self") too: it comes before authentication, so anyone can send
            # it. Only our own listener can tell that we reached ourselves
            # (_reached_itself); until then the address is retried like any failure.
            self._log_refusal(source_of(target.host), key, exc, incoming=False)
            return
        except Exception:
            if self._refusal_log.allow(source_of(target.host)):
                logger.exception(
                    "internal error in the handshake to %s; connection closed", peer_text(key)
                )
            return
        finally:
            self._dialling.discard(key)
        self._probe_backoff.pop(key, None)
        self._referrals.dialled(key, reached=peer.name, timed_out=False)
        if peer.protocol_version < REFERRAL_PROTOCOL:
            # A peer: linked now (or a duplicate of a link it has). One that sends its list
            # of peers is settled once that came (see unlinked).
            self._settled(key)
        await self._run_link(link, peer, events, dialled=True, address=key)

    def _redial(self, address: str) -> None:
        """Dial ``address`` (``host:port``, ``[v6]:port``) now, unless a link or a dial to
        it is under way."""
        host, _, port = address.rpartition(":")
        if not self._running or self._stopping or not port.isdigit() or not host:
            return
        target = PeerAddress(host.strip("[]"), int(port))
        key = str(target)
        if key in self._dialling or key in self._self_addresses:
            return
        if self._membership.knows_address(key):
            return
        self._spawn(self._dial, target)

    def _back_off(self, key: str) -> None:
        _, wait = self._probe_backoff.get(key, (0.0, self._settings.poll_interval / 2))
        wait = min(wait * 2, PROBE_BACKOFF_LIMIT)
        self._probe_backoff[key] = (anyio.current_time() + wait, wait)

    def _backing_off(self, target: PeerAddress) -> bool:
        if not target.probe:
            return False
        entry = self._probe_backoff.get(str(target))
        return entry is not None and anyio.current_time() < entry[0]

    def _log_refusal(self, source: str, remote: str, exc: HandoffError, *, incoming: bool) -> None:
        if isinstance(exc, AuthenticationError):
            self._log_cookie_refusal(source, remote, exc, incoming=incoming)
            return
        if not self._refusal_log.allow(source):
            return  # counted; _flush_log_summaries says how many
        direction = "from" if incoming else "to"
        # The message may quote the peer (a Reject's reason): escaped and cut like its name.
        remote, exc_text = peer_text(remote), peer_text(exc)
        if isinstance(exc, SelfConnection):
            logger.debug(
                "connection %s %s claims to be this node (not believed: %s)",
                direction,
                remote,
                "not one of its own dials" if incoming else "retried like any failure",
            )
        elif isinstance(exc, ClusterMismatch | VersionMismatch):
            logger.warning("refused connection %s %s: %s", direction, remote, exc_text)
        elif isinstance(exc, NameConflict | ProtocolError | TLSError):
            logger.warning("dropped connection %s %s: %s", direction, remote, exc_text)
        elif isinstance(exc, ConnectError):
            # DNS lists nodes that are still starting; not worth more than debug.
            logger.debug("cannot reach %s: %s", remote, exc_text)
        else:
            logger.info("connection %s %s failed: %s", direction, remote, exc_text)

    def _log_cookie_refusal(
        self, source: str, remote: str, exc: HandoffError, *, incoming: bool
    ) -> None:
        """One line per address per minute: the count of the refusals in between goes
        into the next line about that address, never into lines of their own."""
        if not self._cookie_log.allow(source):
            return
        self._count_unlogged_cookie_refusals()
        unlogged = self._cookie_unlogged.pop(source, 0)
        since = f"; {unlogged} more refusals since the last line" if unlogged else ""
        logger.warning(
            "refused connection %s %s: %s; %s (logged once a minute per address%s)",
            "from" if incoming else "to",
            peer_text(remote),
            peer_text(exc),
            COOKIE_CHECK,
            since,
        )

    def _count_unlogged_cookie_refusals(self) -> None:
        for source, suppressed in self._cookie_log.flush():
            if source in self._cookie_unlogged or len(self._cookie_unlogged) < MAX_COOKIE_SOURCES:
                self._cookie_unlogged[source] = self._cookie_unlogged.get(source, 0) + suppressed

    def _flush_log_summaries(self) -> None:
        self._count_unlogged_cookie_refusals()
        for source, suppressed in self._refusal_log.flush():
            logger.warning(
                "suppressed %d similar messages about connections with %s (at most %d per "
                "%g s per address)",
                suppressed,
                peer_text(source),
                REFUSAL_LOG_BURST,
                REFUSAL_LOG_INTERVAL,
            )

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
            link_id,
            peer,
            dialled=dialled,
            address=address,
            now=anyio.current_time(),
            last_heard=self._last_heard,
        )
        restarted = any(isinstance(event, NodeDown) for event in decision.events)
        for other in decision.close:
            stale = self._links.get(other)
            if stale is not None and self._running:
                if restarted:
                    # Its streams died with the old incarnation (peer_lost on the close).
                    self._spawn(stale.aclose, DUPLICATE)
                else:
                    self._spawn(self._retire, other, stale, peer.name, link_id)
        if not decision.keep:
            if decision.reason == NAME_IN_USE and self._refusal_log.allow(
                source_of(_host_of(address))
            ):
                logger.warning(
                    "%s: refused %s from %s: a live node already has that name (it is "
                    "admitted once that node's link is gone)",
                    self._settings.node_name,
                    peer_text(peer.name),
                    peer_text(address),
                )
            await link.aclose(decision.reason)
            return
        self._links[link_id] = link
        referrals = peer.protocol_version >= REFERRAL_PROTOCOL
        if referrals:
            if not self._first_round_over:
                self._awaiting_lists.add(peer.name)
            if self._running:
                self._spawn(self._send_first_list, link, peer.name, link_id)
        self._note_links_changed()  # the other peers hear of it
        self._publish(decision.events)
        reason, detail = DownReason.CONNECTION_LOST, ""
        try:
            while True:
                for event in events:
                    if isinstance(event, MessageReceived) and isinstance(event.message, Peers):
                        if referrals:
                            self._on_list(peer.name, event.message)
                        continue
                    if isinstance(event, PeerStateChanged):
                        self._publish(self._membership.state_changed(link_id, event.state))
                    elif isinstance(event, PeerGoodbye):
                        reason, detail = DownReason.GOODBYE, peer_text(event.reason)
                        if event.reason == NAME_IN_USE and self._refusal_log.allow(
                            source_of(_host_of(address))
                        ):
                            logger.warning(
                                "%s: %s refused this node: it has a live link to another "
                                "node named %s; retrying",
                                self._settings.node_name,
                                peer_text(peer.name),
                                self._settings.node_name,
                            )
                        return
                    elif isinstance(event, MessageReceived):
                        await self._on_session_message(peer.name, link, event.message)
                events = await link.next_events()
        # Details reach logs, callbacks and the CLI, and may quote the peer: made safe here.
        except HeartbeatTimeout as exc:
            reason, detail = DownReason.HEARTBEAT_TIMEOUT, peer_text(exc)
        except ProtocolError as exc:
            logger.warning("dropped %s: %s", peer_text(peer.name), peer_text(exc))
            reason, detail = DownReason.PROTOCOL_ERROR, peer_text(exc)
        except HandoffError as exc:
            reason, detail = DownReason.CONNECTION_LOST, peer_text(exc)
        except Exception as exc:
            logger.exception("internal error on the link to %s; link closed", peer_text(peer.name))
            reason, detail = DownReason.PROTOCOL_ERROR, peer_text(f"internal error: {exc!r}")
        finally:
            self._links.pop(link_id, None)
            redial = False
            if self._membership.link_of(peer.name) in (link_id, None):
                # Streams die with the link that carried them.
                self._on_peer_lost(peer.name)
                # What it said about its peers counted while it was linked.
                self._referrals.forget(peer.name)
                self._awaiting_lists.discard(peer.name)
                self._note_links_changed()
                # A drain streams to it: dialled again now, not at the next discovery poll,
                # so that the drain can ask it what it applied before re-sending (a live
                # peer must not count twice what the lost link did not confirm).
                redial = reason is not DownReason.GOODBYE and self._streams_with(peer.name)
            else:
                # A replaced duplicate (kept up for its streams, or of an old incarnation):
                # only the streams it carried die with it (what the callback returns to
                # await, questions about them on the link in use, runs as a task).
                self._call(self._on_link_lost, peer.name, link)
            await link.aclose()
            if not self._stopping:
                self._publish(
                    self._membership.lost(link_id, reason, detail, now=anyio.current_time())
                )
                if redial:
                    self._redial(peer.address or address)

    async def _retire(self, link_id: int, link: PeerLink, peer: str, kept: int) -> None:
        """Close ``link``, a duplicate of the peer's link in use (``kept``), once no stream
        with the peer is under way, or once ``kept`` is no longer in use: its end ended
        every stream with the peer, on every link (a peer that kept ending its link in use
        while a stream with it ran made this node keep one more duplicate each time). Both
        nodes run the same tie-break and each keeps the link up while it knows of a stream:
        closing it under a stream would end that stream as if the peer had crashed, and its
        sender would re-send, to the same live peer, what the peer had applied but not yet
        acknowledged (counted twice). Meanwhile the link carries the stream's messages as
        before; new streams start on the link in use."""
        # Polled: streams end in the receiver, the drain, a pre-copy or a finished drain's
        # late answers, and no one event covers them all; a duplicate is rare.
        while (  # noqa: ASYNC110
            link_id in self._links
            and self._membership.link_of(peer) == kept
            and self._streams_with(peer)
        ):
            await anyio.sleep(RETIRE_POLL_INTERVAL)
        if link_id in self._links:
            await link.aclose(DUPLICATE)

    # -- background loops -------------------------------------------------------------------

    async def _discovery_loop(self, discovery: Discovery) -> None:
        while True:
            try:
                found = await discovery.discover()
            except DiscoveryError as exc:
                # Logged once per distinct failure, retried every poll: never fatal.
                message = str(exc)
                level = logging.DEBUG if message == self._last_discovery_error else logging.WARNING
                logger.log(level, "discovery failed (will retry): %s", peer_text(message))
                self._last_discovery_error = message
            else:
                if self._stopping:
                    # The node stops: it may already have let go of its task group (a
                    # discovery answered without a checkpoint races the cancellation).
                    return
                self._last_discovery_error = ""
                # Only addresses discovery still gives are remembered (bounded memory).
                keys = {str(target) for target in found}
                self._discovered = keys
                if self._first_round is None:
                    self._first_round = keys - self._self_addresses
                else:
                    self._first_round &= keys
                for gone in self._probe_backoff.keys() - keys:
                    del self._probe_backoff[gone]
                for target in found:
                    key = str(target)
                    if (
                        key in self._self_addresses
                        or key in self._dialling
                        or self._membership.knows_address(key)
                        or self._backing_off(target)
                    ):
                        continue
                    self._spawn(self._dial, target)
            self._dial_listed()
            await anyio.sleep(self._settings.poll_interval)

    # -- lists of peers (Peers) ---------------------------------------------------------------

    def _list_for(self, recipient: str) -> Peers:
        entries = [
            (p.name, p.address) for p, _ in self.peer_links() if p.name != recipient and p.address
        ]
        return Peers(tuple(entries[:MAX_REFERRALS]))

    async def _send_first_list(self, link: PeerLink, name: str, link_id: int) -> None:
        await anyio.sleep(FIRST_LIST_DELAY)
        if self._membership.link_of(name) == link_id and not self._stopping:
            await self._send_list(link, name)

    async def _send_list(self, link: PeerLink, name: str) -> None:
        peers = self._list_for(name)
        self._names_sent[name] = frozenset(entry[0] for entry in peers.peers)
        try:
            await link.send(peers)
        except HandoffError as exc:
            logger.debug("could not send the list of peers to %s: %s", peer_text(name), exc)

    def _note_links_changed(self) -> None:
        if self._links_changed is not None:
            self._links_changed.set()

    async def _referral_loop(self) -> None:
        """Send the current list, REFERRAL_INTERVAL after this node's links changed, to
        every peer that was told of a node this one is no longer linked to.

        Only endings are told: a peer keeps a listed node it cannot reach pending (its fresh
        actor keys unavailable) until no list names it, so an ended link must reach it. A new
        link need not: the first list tells a just-started node what it cannot find itself
        (a node that left discovery), and a node that starts later finds its peers and dials
        them. Telling every link to every peer made a 32-node join send thousands of lists
        (~1,000 a second for 20 s), and the CPU they took dropped half-made links and DNS
        answers."""
        while True:
            assert self._links_changed is not None
            await self._links_changed.wait()
            await anyio.sleep(REFERRAL_INTERVAL)
            self._links_changed = anyio.Event()
            if self._stopping:
                continue  # goodbyes say it all
            linked = {peer.name for peer, _ in self.peer_links()}
            for name in self._names_sent.keys() - linked:
                del self._names_sent[name]
            for peer, link in self.peer_links():
                sent = self._names_sent.get(peer.name)
                if (
                    peer.protocol_version >= REFERRAL_PROTOCOL
                    and sent is not None
                    and not sent <= linked
                ):
                    self._spawn(self._send_list, link, peer.name)

    def _on_list(self, reporter: str, message: Peers) -> None:
        first = self._referrals.report(
            reporter, message.peers, own=self._self_addresses.__contains__
        )
        self._awaiting_lists.discard(reporter)
        if first and self._discovered - self._self_addresses:
            # At once for a peer's first list (a just-started node waits for what it names),
            # once this node's own discovery has found its peers: before that (a cluster
            # whose nodes start and enter DNS together), the lists name nodes that discovery
            # is about to give, and dialling them now, while they dial each other from
            # their own polls, doubles the handshakes of the join (32 nodes: listeners
            # evicted pending handshakes and links dropped half-made). Those wait for the
            # next poll, which dials what discovery did not give. Later lists too, so that
            # a peer sending list after list of new addresses cannot make this node dial
            # faster than MAX_LEARNED per poll.
            self._dial_listed()

    def _dial_listed(self) -> None:
        """Dial what peers listed and is not linked (bounded: see Referrals)."""
        if not self._running or self._stopping:
            return
        for target in self._referrals.to_dial(self._linked):
            key = str(target)
            if (
                key in self._self_addresses
                or key in self._dialling
                or key in self._discovered
                or self._membership.knows_address(key)
            ):
                continue
            self._spawn(self._dial, target)

    async def _expiry_loop(self) -> None:
        while True:
            now = anyio.current_time()
            self._publish(self._membership.expire(now))
            self._flush_log_summaries()
            wait = self._membership.next_deadline() - now
            await anyio.sleep(min(max(wait, 0.05), 1.0))
