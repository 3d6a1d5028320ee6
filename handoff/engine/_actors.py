"""Actors: one live activation per key in the cluster, each message handled exactly once.

One :class:`ActorHost` per namespace tracked with a :class:`handoff.ActorRegistry`. It is
both ends of every conversation with an actor:

- **Callers.** A message for ``key`` joins this node's ordered channel to that key (an
  *outbox*: ``origin`` = this process's incarnation, ``gen`` = the channel's number, ``seq``
  = the message's), and is sent to the node this node believes holds the actor: the last
  one that answered for it, else its placement owner (rendezvous hashing of the key over the
  serving nodes tracking the namespace). It stays in the outbox until an owner answers for
  it; it is re-sent after a silence, a redirect (``MOVED``) or a ``RETRY`` / ``BUSY`` /
  ``UNAVAILABLE`` answer (backing off). Every message carries ``first_unacked``: everything
  below was answered.
- **Owners.** An actor's channels (per origin: the next ``seq`` it takes and the replies of
  the last :data:`WINDOW` messages) decide what happens to a message: the next one joins the
  mailbox, a later one waits for the gap to fill, an earlier one is a duplicate (its reply is
  sent again). So a message is handled once and in order per sender, however often it
  travels. One runner per actor handles its mailbox one message at a time.
- **Placement and fresh activations.** A node activates a key it does not hold only after
  asking every peer tracking the namespace (``ActorWhere``) and hearing that none holds it,
  moves it, or wins a simultaneous claim (the higher rendezvous score wins). A peer that
  is unreachable but not known to be gone might hold it: then the key is *unavailable*
  (callers are told so and retry) rather than activated twice. A peer is known to be gone
  when it said goodbye, when a new incarnation took its name, or when its address refuses
  connections (no process listens there: it crashed).
- **Migration** (at drain, and when placement moves a key to a new node): the actor is
  frozen (its runner finishes the message in hand; later arrivals wait), its state, channels
  and queued messages go in one ``ActorMove``; the new owner activates it (``factory(key,
  state)``) and answers ``ActorMoved``; then the old owner forwards what arrived meanwhile
  and keeps a forwarding pointer. A move whose answer never comes (the link dropped) is *in
  doubt*: the actor stays frozen here until the question "who holds it now?" has an
  answer, so that it is never active on both nodes.
- **Records** (what the drain could not move: to a successor's stream or the snapshot
  store, :meth:`ActorHost.take`): the exporter answers for the key "wait" while the record
  travels, until the node that took it says it holds it; a node that takes a record
  (:meth:`ActorHost.put`) holds it frozen until no peer says it holds another activation,
  and gives way to one that does.
- **Start.** Until the mesh has linked (or found nobody at) every address of discovery's
  first answer, and every peer it linked meanwhile has sent its list of peers, those
  addresses and peers count as unreachable peers that may hold any key; so, always, do
  the nodes some peer lists that this node has not linked (a draining node left DNS while
  it holds actors: only its peers still know it). See :meth:`handoff._mesh.Mesh.unlinked`.
- **Forwarded messages** speak for their sender on the forwarder's word: a node never
  activates a key fresh for one, and a held actor takes one only from a node that held it
  before (moved it here, or exported the record restored here). Every forwarder, and a
  moving owner for what it hands over, tells the sender where its messages went: a sender
  takes answers for a message only from the nodes it sent it to and those they named.

The actor's state crosses versions through the namespace's upgrade / downgrade hooks, like
any record ``(key, state)``.
"""

from __future__ import annotations

import collections
import hashlib
import inspect
import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol

import anyio
import anyio.lowlevel

from handoff._codec import Codec
from handoff._errors import (
    ActorBusy,
    ActorFailed,
    ActorTimeout,
    ActorUnavailable,
    HandoffError,
    NoTransformPath,
    ProtocolError,
)
from handoff.engine._link import ANYIO_CLOCK, Clock, Link
from handoff.membership import DownReason, Peer
from handoff.protocol import (
    ACTOR_PROTOCOL,
    ActorHere,
    ActorMove,
    ActorMoved,
    ActorReply,
    ActorSend,
    ActorWhere,
    Message,
)
from handoff.transforms import Transforms

__all__ = (
    "ACTOR_MESSAGES",
    "ActorHost",
    "ActorLimits",
    "Status",
    "placement_score",
)

logger = logging.getLogger("handoff.actors")

ACTOR_MESSAGES = (ActorSend, ActorReply, ActorWhere, ActorHere, ActorMove, ActorMoved)

WINDOW = 64
"""Unanswered messages per sender and key; also the replies an owner keeps per channel."""
MAX_HOPS = 8
"""Redirects a message follows before its sender backs off and asks placement again."""
MAX_ANSWERERS = 16
"""Nodes whose answers count for one message (the oldest go first)."""
MAX_LINEAGE = 8
"""Earlier holders of one actor whose forwarded messages its holder takes."""
RESEND_AFTER = 1.0
"""Seconds without an answer before a message is sent again."""
BACKOFF_FIRST, BACKOFF_MAX = 0.005, 0.5
QUERY_TIMEOUT = 2.0
"""Seconds a claim waits for every peer's answer."""
MOVE_TIMEOUT = 2.0
"""Seconds a move waits for its answer before it is in doubt (asked again)."""
FORWARD_TTL = 600.0
MAX_MOVE_ANSWERS = 100_000
MAX_CLAIMS = 1_024
"""Fresh activations being agreed on at once, per node and namespace."""
MAX_FORWARDS = 100_000
REBALANCE_EVERY = 1.0
SETTLE = 1.0
"""Seconds an actor stays where it arrived before placement may move it again."""
TICK = 0.02
REFUSED_RETRY = 30.0
DRAIN_MOVES = 8
"""Moves a drain has in flight at once. An actor's pause runs from its freeze to its
first message on the new owner, so a move queued behind many others on the one link pauses
its actor for theirs too; a few in flight keep that link busy all the same."""
CHANNEL_KEEP = 30.0
"""Seconds a sender's channel is kept after its last message, even past ``max_channels``:
forgetting one whose reply was lost would handle the message's resend again."""
CONFIRM_CONFLICTS = 5
"""Rounds a restored actor waits, while another node says it holds the key, before it
gives way (see :meth:`ActorHost.put`)."""
"""Seconds before placement tries again to move an actor whose move was refused."""


class Status(IntEnum):
    """What became of a message (``ActorReply.status``)."""

    REPLIED = 0
    """Handled; the body is the handler's return value."""
    DONE = 1
    """Handled (a one-way ``send``)."""
    FAILED = 2
    """The handler raised; the body says what. The message counts as handled."""
    MOVED = 3
    """Not here: ``holder`` has it (or will)."""
    RETRY = 4
    """Not handled yet: a move or a claim is in progress; send again shortly."""
    UNAVAILABLE = 5
    """No node may take the actor now (a peer that may hold it is unreachable)."""
    BUSY = 6
    """The owner's mailbox is full; send again later."""


_HANDLED = (Status.REPLIED, Status.DONE, Status.FAILED)


@dataclass(frozen=True, slots=True)
class ActorLimits:
    """Bounds of one registry on one node."""

    mailbox: int = 1_000
    """Messages queued for one actor."""
    queued: int = 100_000
    """Messages queued for all actors of the namespace on this node."""
    outbox: int = 10_000
    """Unanswered messages this node has sent to actors of the namespace."""
    max_channels: int = 1_024
    """Senders' channels an actor remembers (the least recently used are forgotten)."""


def placement_score(node: str, key: bytes) -> int:
    """Rendezvous score of ``key`` (codec-encoded) on ``node``: the same in every process
    and release (Python's ``hash`` is salted per process, so it is not used here)."""
    digest = hashlib.blake2b(key, digest_size=8, key=node.encode()[:64] or b"-").digest()
    return int.from_bytes(digest, "big")


def place(key: bytes, nodes: Sequence[str]) -> str | None:
    """The node of ``nodes`` with the highest score for ``key`` (``None``: no node)."""
    best: tuple[int, str] | None = None
    for node in nodes:
        score = (placement_score(node, key), node)
        if best is None or score > best:
            best = score
    return None if best is None else best[1]


class Actor(Protocol):
    """What ``factory(key, state)`` returns."""

    def handle(self, message: Any) -> Any:
        """Handle one message (may be a coroutine function); the result is the reply."""
        ...

    def state(self) -> Any:
        """What moves with the actor (msgpack plus the codec's types)."""
        ...


Factory = Callable[[Any, Any], Actor]


# -- caller side ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    seq: int
    body: bytes
    want_reply: bool
    done: anyio.Event = field(default_factory=anyio.Event)
    status: Status | None = None
    answer: bytes = b""
    sent_to: str | None = None
    sent_at: float = 0.0
    created: float = 0.0
    answerers: list[str] = field(default_factory=list)
    """The nodes whose answers for this message count: those it was sent to, and those
    one of them said it went to (a redirect, or a forward). Any other peer could forge a
    reply or a redirect (see :meth:`ActorHost._on_reply`)."""


@dataclass(slots=True)
class _Outbox:
    key: Any
    key_bytes: bytes
    gen: int
    next_seq: int = 1
    pending: dict[int, _Pending] = field(default_factory=dict)
    route: str | None = None
    hops: int = 0
    hold_until: float = 0.0
    backoff: float = BACKOFF_FIRST
    last_reason: str = ""
    space: anyio.Event = field(default_factory=anyio.Event)

    def first_unacked(self) -> int:
        return next(iter(self.pending), self.next_seq)


# -- owner side ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Channel:
    gen: int
    next: int
    replies: collections.OrderedDict[int, tuple[int, bytes]] = field(
        default_factory=collections.OrderedDict
    )
    early: dict[int, ActorSend] = field(default_factory=dict)
    used: float = 0.0


@dataclass(slots=True)
class _Held:
    key: Any
    key_bytes: bytes
    epoch: int
    instance: Actor | None
    state: Any = None
    channels: collections.OrderedDict[str, _Channel] = field(
        default_factory=collections.OrderedDict
    )
    mailbox: collections.deque[ActorSend] = field(default_factory=collections.deque)
    running: bool = False
    idle: anyio.Event = field(default_factory=anyio.Event)
    frozen: bool = False
    moving_to: str | None = None
    arrived_at: float = 0.0
    last_active: float = 0.0
    held: list[ActorSend] = field(default_factory=list)
    ahead: int = 0
    """How many of ``held`` went ahead to ``moving_to`` already, behind the move (see
    :meth:`ActorHost._on_send`)."""
    in_doubt: bool = False
    migrating: bool = False
    move_request: ActorMove | None = None
    move_to: str = ""
    confirming: bool = False
    doubt_stats: MoveStats | None = None
    """The migration report that counts this actor in doubt (corrected when that ends)."""
    """Restored or handed over as a record: frozen until the cluster says no other node
    holds the key (see :meth:`ActorHost.put`)."""


@dataclass(slots=True)
class _Query:
    key_bytes: bytes
    waiting: set[str]
    answered: set[str] = field(default_factory=set)
    done: anyio.Event = field(default_factory=anyio.Event)
    holder: str = ""
    lost: bool = False
    claiming: bool = False
    holding: bool = False
    """Asked by a node that holds the key (a move in doubt): a peer claiming it (answer 2)
    holds nothing, and cannot activate it while this node says it holds it."""
    waiting_for: set[str] = field(default_factory=set)
    """Peers that answered "wait" (2): one that exported the record this node restored
    (or that claims the key and wins)."""


@dataclass(slots=True)
class _Move:
    target: str = ""
    key_bytes: bytes = b""
    done: anyio.Event = field(default_factory=anyio.Event)
    accepted: bool | None = None
    reason: str = ""


@dataclass(slots=True)
class MoveStats:
    """What one node's migrations of a namespace did (its drain's part for actors)."""

    moved: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    in_doubt: int = 0
    successors: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Member:
    incarnation: str
    address: str
    suspect: bool = False


class ActorHost:
    """The actors of one namespace on one node (see the module documentation)."""

    def __init__(
        self,
        *,
        namespace: str,
        node: str,
        incarnation: str,
        factory: Factory,
        codec: Codec,
        transforms: Transforms,
        version: int,
        peers: Callable[[], Sequence[tuple[Peer, Link]]],
        serving: Callable[[], bool],
        spawn: Callable[..., None],
        clock: Clock = ANYIO_CLOCK,
        limits: ActorLimits | None = None,
        idle_timeout: float | None = None,
        probe: Callable[[str], Awaitable[bool | None]] | None = None,
        unlinked: Callable[[], Sequence[str]] = tuple,
    ) -> None:
        self.namespace = namespace
        self.node = node
        self.incarnation = incarnation
        self._factory = factory
        self._codec = codec
        self._transforms = transforms
        self.version = version
        self._peers = peers
        self._serving = serving
        self._spawn = spawn
        self._clock = clock
        self.limits = limits or ActorLimits()
        self.idle_timeout = idle_timeout
        self._probe = probe
        # Addresses discovery gave that the mesh has not linked (nor found gone) yet, while
        # its first round lasts: a node there may hold any key (see _suspects).
        self._unlinked = unlinked
        self._outboxes: dict[bytes, _Outbox] = {}
        self._unanswered = 0
        self._waiting_answers: set[bytes] = set()
        self._placed_for: tuple[str, ...] = ()
        self._unsettled = False
        self._all_answered = anyio.Event()
        self._gens = itertools.count(1)
        self._held: dict[bytes, _Held] = {}
        self._queued = 0
        self._forwards: collections.OrderedDict[bytes, tuple[str, int, float]] = (
            collections.OrderedDict()
        )
        # Per key, the nodes this node knows held the actor before it came here (moved it
        # here, or exported the record it restored): the nodes whose forwarding pointers
        # may point here, long after the actor left and came back.
        self._lineage: collections.OrderedDict[bytes, tuple[tuple[str, ...], float]] = (
            collections.OrderedDict()
        )
        self._queries: dict[int, _Query] = {}
        self._query_ids = itertools.count(1)
        self._claims: dict[bytes, _Query] = {}
        self._claim_waiting: dict[bytes, list[ActorSend]] = {}
        self._moves: dict[int, _Move] = {}
        # From a random start: a restarted node (same name, new process) must not reuse the
        # ids of moves its predecessor sent, whose answers the receivers remember.
        self._move_ids = itertools.count(secrets.randbelow(2**39) + 1)
        self._move_answers: collections.OrderedDict[tuple[str, int], tuple[bool, str]] = (
            collections.OrderedDict()
        )
        self._members: dict[str, _Member] = {}
        self._probing: set[str] = set()
        self._outgoing: dict[str, collections.deque[Message]] = {}
        self._wake: dict[str, anyio.Event] = {}
        self._migrating: set[bytes] = set()
        # Placement changes' migrations in progress: key -> set when it ends (a drain
        # waits for them and counts what they did).
        self._migration_ends: dict[bytes, anyio.Event] = {}
        # Actors the drain's export took, whose record travels (to a successor or the
        # snapshot store): key -> epoch. Claims for them wait (see _on_where).
        self._transit: dict[bytes, int] = {}
        # The messages queued in those records: their senders are told where they went once
        # the node that took the record says it holds it (they take answers only from the
        # nodes their messages went to).
        self._transit_queued: dict[bytes, list[ActorSend]] = {}
        self._asking_back: set[tuple[str, bytes]] = set()
        self.superseded = 0
        """Restored actors dropped because another node held the key when they landed."""
        self.activations = 0
        """Activations started on this node (fresh, moved in, or restored)."""
        self.abandoned = 0
        """Messages this node gave up delivering (see ``delivery_timeout``)."""
        self.delivery_timeout = 60.0
        self._running = False
        self.on_activate: Callable[[Any, int], None] | None = None
        self.on_deactivate: Callable[[Any, int], None] | None = None

    # -- inspection -----------------------------------------------------------------------

    def local_keys(self) -> list[Any]:
        """Keys of the actors held here (active or idle), not those that moved away."""
        return [held.key for held in self._held.values() if held.moving_to is None]

    def owner(self, key: Any) -> str | None:
        """The node holding ``key`` as far as this node knows: itself, the node it moved
        the actor to, or else the key's placement (``None``: no serving node tracks the
        namespace)."""
        key_bytes = self._encode_key(key)
        if key_bytes in self._held:
            return self.node
        forward = self._forwards.get(key_bytes)
        if forward is not None:
            return forward[0]
        return place(key_bytes, self._candidates())

    def stats(self) -> dict[str, int]:
        """Counts for ``node.stats()``."""
        return {
            "actors": len(self._held),
            "active": sum(1 for held in self._held.values() if held.instance is not None),
            "queued": self._queued,
            "unanswered": self._unanswered,
            "activations": self.activations,
            "abandoned": self.abandoned,
            "superseded": self.superseded,
        }

    def __len__(self) -> int:
        return sum(1 for held in self._held.values() if held.moving_to is None)

    # -- membership -----------------------------------------------------------------------

    def _tracks(self, peer: Peer) -> bool:
        return self.namespace in peer.namespaces and peer.protocol_version >= ACTOR_PROTOCOL

    def _links(self) -> dict[str, tuple[Peer, Link]]:
        return {peer.name: (peer, link) for peer, link in self._peers() if self._tracks(peer)}

    def _candidates(self, *, without_me: bool = False) -> list[str]:
        names = [peer.name for peer, _ in self._links().values() if peer.serving]
        if not without_me and self._serving():
            names.append(self.node)
        return names

    def peer_up(self, peer: Peer) -> None:
        """A peer joined (or came back)."""
        if not self._tracks(peer):
            return
        self._members[peer.name] = _Member(peer.incarnation, peer.address)

    def peer_down(self, peer: Peer, reason: DownReason) -> None:
        """A peer is gone: for good (goodbye, restarted) or maybe only unreachable."""
        member = self._members.get(peer.name)
        if member is None or member.incarnation != peer.incarnation:
            return
        if reason in (DownReason.GOODBYE, DownReason.RESTARTED):
            self._gone(peer.name)
        else:
            member.suspect = True
            for query in self._queries.values():
                if peer.name in query.waiting:
                    query.lost = True
                    query.done.set()
            if self._probe is not None and peer.name not in self._probing and self._running:
                self._probing.add(peer.name)
                self._spawn(self._probe_until_known, peer.name, member)

    def _gone(self, name: str) -> None:
        self._members.pop(name, None)
        for query in self._queries.values():
            query.waiting.discard(name)
            if not query.waiting:
                query.done.set()

    async def _probe_until_known(self, name: str, member: _Member) -> None:
        # A crashed process's address refuses connections: it is known gone, and what it
        # held may be activated elsewhere. An address that times out may be a partition:
        # the peer stays suspect (its actors unavailable) until it answers again.
        assert self._probe is not None
        try:
            delay = 0.1
            while self._members.get(name) is member and member.suspect:
                refused = await self._probe(member.address)
                if self._members.get(name) is not member or not member.suspect:
                    return
                if refused:
                    logger.info(
                        "%s: %s refuses connections: its actors of %r may be activated again",
                        self.node,
                        name,
                        self.namespace,
                    )
                    self._gone(name)
                    return
                await self._sleep(delay)
                delay = min(delay * 2, 2.0)
        finally:
            self._probing.discard(name)

    def _suspects(self) -> list[str]:
        linked = self._links()
        suspects = sorted(
            name
            for name, member in self._members.items()
            if member.suspect or (name not in linked and name != self.node)
        )
        # A node that just started knows only the peers it linked so far: one it found
        # but has not reached yet may hold any key, so nothing is activated fresh until
        # every address of the first discovery round is linked or known to be nobody.
        suspects.extend(sorted(self._unlinked()))
        return suspects

    async def _sleep(self, seconds: float) -> None:
        # On the engine's clock, so that tests move time instead of waiting for it.
        await self._clock.wait(anyio.Event(), self._clock.now() + seconds)

    # -- outgoing messages ----------------------------------------------------------------

    def _post(self, peer: str, message: Message) -> None:
        """Queue ``message`` for ``peer`` (this node included); never blocks the caller."""
        if peer == self.node:
            self._deliver_local(message)
            return
        queue = self._outgoing.get(peer)
        if queue is None:
            if peer not in self._links():
                return  # no such peer (now): what is lost is re-sent or asked again
            queue = self._outgoing[peer] = collections.deque()
            self._wake[peer] = anyio.Event()
            if self._running:
                self._spawn(self._send_loop, peer)
        if len(queue) >= 4 * self.limits.queued:
            return  # the peer does not read: what is lost is re-sent or asked again
        queue.append(message)
        self._wake[peer].set()

    def _deliver_local(self, message: Message) -> None:
        try:
            self.handle(self.node, message)
        except ProtocolError:  # pragma: no cover - this node's own messages are well-formed
            logger.exception("%s: own actor message refused", self.node)

    async def _send_loop(self, peer: str) -> None:
        queue = self._outgoing[peer]
        while self._running:
            if not queue:
                self._wake[peer] = event = anyio.Event()
                with anyio.move_on_after(30.0):
                    await event.wait()
                if not queue:
                    if peer not in self._links():
                        break
                    continue
            link = self._links().get(peer)
            if link is None:
                queue.clear()  # nobody to send to: callers re-send, moves and claims ask again
                continue
            message = queue.popleft()
            try:
                await link[1].send(message, time_limit=RESEND_AFTER)
            except HandoffError as exc:
                logger.debug("%s: could not send %r to %s: %s", self.node, message, peer, exc)
        self._outgoing.pop(peer, None)
        self._wake.pop(peer, None)

    # -- running --------------------------------------------------------------------------

    def start(self) -> None:
        """The node started: from now on background tasks may be spawned (call before
        :meth:`run`, in the same step as the node's start, so that no message finds the
        host half-started)."""
        if self._running:
            return
        self._running = True
        for peer in list(self._outgoing):
            self._spawn(self._send_loop, peer)
        for held in list(self._held.values()):
            if held.confirming:
                self._spawn(self._confirm, held)  # restored before the start
            self._start(held)

    async def run(self) -> None:
        """Background work: re-sends, idle deactivation, placement changes. Runs until the
        node stops."""
        self.start()
        last_rebalance = self._clock.now()
        try:
            while True:
                await anyio.sleep(TICK)
                now = self._clock.now()
                self._resend_due(now)
                if now - last_rebalance >= REBALANCE_EVERY:
                    last_rebalance = now
                    self._deactivate_idle(now)
                    self._expire_forwards(now)
                    if self._serving():
                        self._rebalance()
        finally:
            self._running = False

    def _resend_due(self, now: float) -> None:
        for key_bytes in list(self._waiting_answers):
            outbox = self._outboxes.get(key_bytes)
            if outbox is None or not outbox.pending:
                self._waiting_answers.discard(key_bytes)
                continue
            head = next(iter(outbox.pending.values()))
            if now - head.created > self.delivery_timeout:
                self._abandon(outbox, head)
                continue
            if now < outbox.hold_until:
                continue
            stale = [
                p
                for p in outbox.pending.values()
                if p.sent_to is None or now - p.sent_at >= RESEND_AFTER
            ]
            if stale:
                if any(p.sent_to is not None for p in stale):
                    outbox.route = None  # the owner it went to is silent: ask placement again
                self._flush(outbox, stale)

    def _abandon(self, outbox: _Outbox, pending: _Pending) -> None:
        logger.warning(
            "%s: gave up delivering a message to actor %r of %r after %.0f s (%s); "
            "it may or may not have been handled",
            self.node,
            outbox.key,
            self.namespace,
            self.delivery_timeout,
            outbox.last_reason or "no answer",
        )
        self.abandoned += 1
        self._answer(outbox, pending, Status.UNAVAILABLE, self._codec.packb("abandoned"))

    # -- caller API -----------------------------------------------------------------------

    def _encode_key(self, key: Any) -> bytes:
        if not isinstance(key, Hashable):
            raise TypeError(f"actor key {key!r} is not hashable")
        return self._codec.packb(key)

    async def submit(
        self, key: Any, message: Any, *, want_reply: bool, time_limit: float
    ) -> _Pending:
        """Queue ``message`` for ``key`` in this node's channel to it and send it; waits
        (up to ``time_limit`` seconds) for room in the channel's window."""
        key_bytes = self._encode_key(key)
        body = self._codec.packb(message)
        deadline = self._clock.now() + time_limit
        while True:
            outbox = self._outboxes.get(key_bytes)
            if outbox is None:
                outbox = self._outboxes[key_bytes] = _Outbox(key, key_bytes, next(self._gens))
            # The span, not the count: the owner keeps the replies of the last WINDOW
            # messages, so the oldest unanswered one must stay within it.
            if (
                outbox.next_seq - outbox.first_unacked() < WINDOW
                and self._unanswered < self.limits.outbox
            ):
                break
            if self._unanswered >= self.limits.outbox:
                raise ActorBusy(
                    f"{self._unanswered} messages to actors of {self.namespace!r} await an "
                    f"answer on this node (the limit is {self.limits.outbox}): the owners are "
                    "slow or unreachable"
                )
            if not await self._clock.wait(outbox.space, deadline):
                raise ActorBusy(
                    f"{WINDOW} messages to actor {key!r} of {self.namespace!r} await an answer "
                    f"and none came within {time_limit:g} s ({outbox.last_reason or 'no answer'})"
                )
            outbox.space = anyio.Event()
        now = self._clock.now()
        pending = _Pending(outbox.next_seq, body, want_reply, created=now)
        outbox.next_seq += 1
        outbox.pending[pending.seq] = pending
        self._waiting_answers.add(key_bytes)
        self._unanswered += 1
        if now >= outbox.hold_until:
            self._flush(outbox, [pending])
        return pending

    async def result(self, key: Any, pending: _Pending, *, time_limit: float) -> Any:
        """Wait (up to ``time_limit`` seconds) for ``pending``'s answer: the reply, or the
        error that says what happened. The message stays queued when the wait ends."""
        deadline = self._clock.now() + time_limit
        if not await self._clock.wait(pending.done, deadline):
            outbox = self._outboxes.get(self._encode_key(key))
            reason = outbox.last_reason if outbox is not None else ""
            stays = (
                "the message stays queued and will be handled once, in order, when the "
                "actor can be reached"
            )
            if reason.startswith("unavailable"):
                raise ActorUnavailable(
                    f"actor {key!r} of {self.namespace!r}: {reason[len('unavailable: ') :]}; "
                    f"{stays}"
                )
            raise ActorTimeout(
                f"no answer from actor {key!r} of {self.namespace!r} within {time_limit:g} s"
                f"{f' ({reason})' if reason else ''}; {stays}"
            )
        if pending.status is Status.FAILED:
            raise ActorFailed(
                f"actor {key!r} of {self.namespace!r} failed to handle the message: "
                f"{self._codec.unpackb(pending.answer)}"
            )
        if pending.status is Status.UNAVAILABLE:
            raise ActorUnavailable(
                f"gave up delivering the message to actor {key!r} of {self.namespace!r} after "
                f"{self.delivery_timeout:g} s; it may or may not have been handled"
            )
        return self._codec.unpackb(pending.answer) if pending.want_reply else None

    def _route(self, outbox: _Outbox) -> str | None:
        # The last node that answered for the key, else placement (whose owner asks the
        # holders when it holds nothing itself); never a forwarding pointer, which may be
        # stale.
        route = outbox.route
        if route is not None and route != self.node and route not in self._links():
            outbox.route = None  # gone or cut off: placement and the holders decide
        if outbox.route is not None:
            return outbox.route
        if outbox.key_bytes in self._held:
            return self.node
        return place(outbox.key_bytes, self._candidates())

    def _flush(self, outbox: _Outbox, pendings: Sequence[_Pending]) -> None:
        route = self._route(outbox)
        now = self._clock.now()
        if route is None:
            outbox.last_reason = f"unavailable: no serving node tracks {self.namespace!r}"
            self._hold(outbox, now)
            return
        first = outbox.first_unacked()
        for pending in pendings:
            pending.sent_to, pending.sent_at = route, now
            _may_answer(pending, route)
            self._post(
                route,
                ActorSend(
                    self.namespace,
                    outbox.key_bytes,
                    self.incarnation,
                    self.node,
                    outbox.gen,
                    pending.seq,
                    first,
                    int(pending.want_reply),
                    0,
                    pending.body,
                ),
            )

    def _hold(self, outbox: _Outbox, now: float) -> None:
        outbox.hold_until = now + outbox.backoff
        outbox.backoff = min(outbox.backoff * 2, BACKOFF_MAX)
        for pending in outbox.pending.values():
            pending.sent_to = None

    def _on_reply(self, peer: str, reply: ActorReply) -> None:
        outbox = self._outboxes.get(reply.key)
        if outbox is None or outbox.gen != reply.gen:
            return
        pending = outbox.pending.get(reply.seq)
        # Only a node the message went to answers for it: one it was sent to, or one such
        # a node redirected or forwarded it to. Another peer's reply or redirect is forged
        # (the message was never there); the real one follows, or the message is re-sent.
        if pending is None or peer not in pending.answerers:
            return
        status = Status(reply.status)
        now = self._clock.now()
        if status in _HANDLED:
            outbox.route, outbox.hops = peer, 0
            outbox.backoff, outbox.last_reason = BACKOFF_FIRST, ""
            self._answer(outbox, pending, status, reply.body)
            return
        reason = _text(self._codec, reply.body)
        if status is Status.MOVED and reply.holder:
            _may_answer(pending, reply.holder)
            if reply.holder == pending.sent_to:
                # Forwarded to where it was re-sent already (each message forwarded during
                # a move says so): that node answers.
                return
            outbox.hops += 1
            if outbox.hops <= MAX_HOPS:
                outbox.route = reply.holder
                outbox.last_reason = f"moved to {reply.holder}"
                self._flush(
                    outbox, [p for p in outbox.pending.values() if p.sent_to != reply.holder]
                )
                return
            outbox.route, outbox.hops = None, 0
            outbox.last_reason = "placement is changing"
        elif status is Status.UNAVAILABLE:
            outbox.route = None
            outbox.last_reason = f"unavailable: {reason}"
        else:
            outbox.last_reason = reason
            if status is Status.RETRY:
                outbox.route = None
        if now >= outbox.hold_until:
            self._hold(outbox, now)

    def _answer(self, outbox: _Outbox, pending: _Pending, status: Status, body: bytes) -> None:
        del outbox.pending[pending.seq]
        self._unanswered -= 1
        pending.status, pending.answer = status, body
        pending.done.set()
        outbox.space.set()
        if not self._unanswered:
            self._all_answered.set()
        if not outbox.pending and len(self._outboxes) > self.limits.outbox:
            # A channel with nothing in flight may go: the next message to the key opens a
            # channel with a higher ``gen``, which the owner takes as a fresh start.
            del self._outboxes[outbox.key_bytes]

    # -- owner side -----------------------------------------------------------------------

    def handle(self, peer: str, message: Message) -> None:
        """One actor message from ``peer``; never blocks (replies are queued)."""
        if isinstance(message, ActorSend):
            self._on_send(message, peer)
        elif isinstance(message, ActorReply):
            self._on_reply(peer, message)
        elif isinstance(message, ActorWhere):
            self._on_where(peer, message)
        elif isinstance(message, ActorHere):
            self._on_here(peer, message)
        elif isinstance(message, ActorMove):
            self._on_move(peer, message)
        elif isinstance(message, ActorMoved):
            move = self._moves.get(message.move)
            # Only the move's target answers for it (any peer could send this message).
            if (
                move is not None
                and move.accepted is None
                and move.target == peer
                and move.key_bytes == message.key
            ):
                move.accepted, move.reason = bool(message.accepted), message.reason
                move.done.set()

    def _reply(self, message: ActorSend, status: Status, body: bytes, holder: str = "") -> None:
        self._post(
            message.sender,
            ActorReply(self.namespace, message.key, message.gen, message.seq, status, holder, body),
        )

    def _on_send(self, message: ActorSend, peer: str | None = None) -> None:
        if peer is not None and not self._authentic(peer, message):
            return
        key_bytes = message.key
        held = self._held.get(key_bytes)
        # A forwarded message speaks for its sender on the forwarder's word: it never starts
        # a fresh activation (see _not_here), and a held actor takes it only from a node
        # that held the actor before (its channels): another peer could put a forged
        # message under a sender's next sequence number, and the sender's real one would
        # get its reply (lost). Every forwarder tells the sender where the message went,
        # so a message dropped here is sent here again by its sender itself.
        forwarded = peer is not None and peer != self.node and message.hops > 0
        if held is None:
            self._not_here(message, forwarded=forwarded)
            return
        if forwarded and peer not in self._lineage.get(key_bytes, ((), 0.0))[0]:
            return
        if held.moving_to is not None or held.in_doubt or held.confirming:
            if len(held.held) >= self.limits.mailbox:
                self._reply(message, Status.BUSY, self._codec.packb("the actor is moving"))
                return
            held.held.append(message)
            if (
                held.moving_to is not None
                and not held.in_doubt
                and held.ahead == len(held.held) - 1
            ):
                # Sent right behind the move (one ordered queue per peer): the new owner
                # handles it as soon as it activated the actor, a round trip before the
                # answer would let it go. A copy stays here: if the move is refused, or in
                # doubt, the actor's channels tell a copy handled twice from a new one.
                held.ahead += 1
                self._post(held.moving_to, _hop(message))
            return
        self._accept(held, message)

    def _authentic(self, peer: str, message: ActorSend) -> bool:
        """Whether ``message`` may speak for its channel. Sent directly (``hops == 0``), the
        link's peer is its sender. Direct or forwarded, its ``origin`` is its sender's
        incarnation as far as this node knows it: another would let one peer answer, or
        silence (with a higher ``gen``), another node's channel. A forwarded message from a
        sender this node does not know is taken as it comes (it may be cut off from here)."""
        if message.hops == 0 and message.sender != peer:
            return False
        if message.sender == self.node:
            return message.origin == self.incarnation
        link = self._links().get(message.sender)
        if link is not None:
            return message.origin == link[0].incarnation
        member = self._members.get(message.sender)
        return member is None or message.origin == member.incarnation

    def _not_here(self, message: ActorSend, *, forwarded: bool = False) -> None:
        key_bytes = message.key
        forward = self._forwards.get(key_bytes)
        if forward is not None:
            placed_here = place(key_bytes, self._candidates()) == self.node
            if message.hops < MAX_HOPS // 2 and forward[0] in self._links() and not placed_here:
                self._post(forward[0], _hop(message))
                # Its sender takes answers only from the nodes the message went to.
                self._reply(message, Status.MOVED, b"\xc0", forward[0])
                return
            # Forwarded too often (the actor moved on since), or to a node that is not
            # linked: placement and the holders themselves tell where it is.
            del self._forwards[key_bytes]
        if key_bytes in self._transit:
            # Its record travels: the successor that takes it (or this node, if it comes
            # back) answers once it holds it; activating it meanwhile would make two.
            self._reply(
                message,
                Status.RETRY,
                self._codec.packb("the actor is in transit (handed over by a drain)"),
            )
            return
        # Messages waiting for a claim count in the node's bound like queued ones: a flood
        # of fresh keys whose claims peers are slow to answer holds no more than that.
        if self._queued >= self.limits.queued:
            self._reply(
                message,
                Status.BUSY,
                self._codec.packb(f"{self._queued} messages queued on {self.node}"),
            )
            return
        if key_bytes in self._claims:
            if forwarded:
                # Replayed once the claim ends, it would enter the channels with nobody
                # checking who forwarded it (see _on_send): dropped, as into a held actor
                # from a node that never held it; its sender, told where it went, sends it
                # here itself.
                return
            waiting = self._claim_waiting.setdefault(key_bytes, [])
            if len(waiting) < self.limits.mailbox:
                waiting.append(message)
                self._queued += 1
            else:
                self._reply(message, Status.BUSY, self._codec.packb("activation in progress"))
            return
        owner = place(key_bytes, self._candidates())
        if owner is None:
            self._reply(
                message,
                Status.RETRY,
                self._codec.packb(f"no serving node tracks {self.namespace!r}"),
            )
        elif owner != self.node:
            self._reply(message, Status.MOVED, b"\xc0", owner)
        elif forwarded:
            # Never a fresh activation on a forwarder's word (see _on_send).
            self._reply(
                message,
                Status.RETRY,
                self._codec.packb("forwarded to a node that does not hold the actor"),
            )
        elif not self._running:
            self._reply(message, Status.RETRY, self._codec.packb("the node is not running"))
        elif len(self._claims) >= MAX_CLAIMS:
            # Each claim is a task and a question to every peer: a flood of fresh keys
            # (from a peer or the app) waits its turn instead of piling them up.
            self._reply(
                message,
                Status.BUSY,
                self._codec.packb(f"{MAX_CLAIMS} activations are being agreed on already"),
            )
        else:
            self._claim_waiting[key_bytes] = [message]
            self._queued += 1
            query = self._new_query(key_bytes, claiming=True)
            self._spawn(self._claim, key_bytes, query)

    def _new_query(self, key_bytes: bytes, *, claiming: bool) -> _Query:
        query = _Query(key_bytes, set(self._links()), claiming=claiming)
        if claiming:
            self._claims[key_bytes] = query
        return query

    async def _ask_everyone(self, query: _Query) -> str | None:
        """Ask every linked peer; ``None`` when nobody holds the key, else who does (or
        ``"?..."``: why nobody can tell). A holder's answer counts even while some peer is
        unreachable: only "nobody holds it" needs every peer."""
        query_id = next(self._query_ids)
        self._queries[query_id] = query
        try:
            for name in list(query.waiting):
                self._post(name, ActorWhere(self.namespace, query.key_bytes, query_id))
            if query.waiting:
                await self._clock.wait(query.done, self._clock.now() + QUERY_TIMEOUT)
        finally:
            del self._queries[query_id]
        if query.holder:
            return query.holder
        suspects = self._suspects()
        if suspects:
            return (
                f"?{', '.join(suspects)} cannot be reached and is not known to be gone: "
                "it may hold this actor"
            )
        if query.lost or query.waiting:
            silent = ", ".join(sorted(query.waiting)) or "a peer"
            return f"?{silent} did not answer whether it holds this actor"
        # "Nobody holds it" needs an answer from every peer that is there now: one that
        # came back (or joined) while the question was out was never asked.
        unasked = (set(self._links()) | set(self._members)) - query.answered - {self.node}
        if unasked:
            return f"?{', '.join(sorted(unasked))} joined while the cluster was asked"
        return None

    async def _claim(self, key_bytes: bytes, query: _Query) -> None:
        try:
            answer = await self._ask_everyone(query)
        finally:
            if self._claims.get(key_bytes) is query:
                del self._claims[key_bytes]
        waiting = self._claim_waiting.pop(key_bytes, [])
        self._queued -= len(waiting)
        if query.lost and not query.holder and answer is None:
            answer = "?another node claimed this actor at the same time"
        if answer is None and key_bytes not in self._held and self._serving():
            held = self._activate(key_bytes, None, epoch=1)
            if held is None:
                for message in waiting:
                    self._reply(message, Status.FAILED, self._codec.packb("activation failed"))
                return
            for message in waiting:
                self._on_send(message)
            return
        for message in waiting:
            if key_bytes in self._held:
                self._on_send(message)
            elif answer is not None and not answer.startswith("?"):
                self._reply(message, Status.MOVED, b"\xc0", answer)
            elif answer is not None and "cannot be reached" in answer:
                self._reply(message, Status.UNAVAILABLE, self._codec.packb(answer[1:]))
            else:
                self._reply(
                    message,
                    Status.RETRY,
                    self._codec.packb((answer or "?placement changed")[1:]),
                )

    def _on_where(self, peer: str, message: ActorWhere) -> None:
        # Only what this node holds counts (moving away included: it holds it until the new
        # owner answers). Forwarding pointers are not answers: they can be stale, and a
        # chain of stale ones can loop.
        key_bytes = message.key
        holder = ""
        answer = 0
        held = self._held.get(key_bytes)
        if held is not None:
            answer, holder = 1, self.node
        elif key_bytes in self._transit:
            # Nobody may claim it while its record travels ("2": wait, as for a claim that
            # wins). The asker may be the node that just took the record: asked back, its
            # "held" ends the transit.
            answer, holder = 2, self.node
            if self._running and (peer, key_bytes) not in self._asking_back:
                self._asking_back.add((peer, key_bytes))
                self._spawn(self._ask_back, peer, key_bytes)
        else:
            claim = self._claims.get(key_bytes)
            if claim is not None:
                if placement_score(self.node, key_bytes) > placement_score(peer, key_bytes):
                    answer, holder = 2, self.node
                else:
                    claim.lost = True  # the other claimant wins: this one backs off
                    claim.done.set()
        self._post(peer, ActorHere(self.namespace, key_bytes, message.query, answer, holder))

    async def _ask_back(self, peer: str, key_bytes: bytes) -> None:
        try:
            query = _Query(key_bytes, {peer})
            query_id = next(self._query_ids)
            self._queries[query_id] = query
            try:
                self._post(peer, ActorWhere(self.namespace, key_bytes, query_id))
                await self._clock.wait(query.done, self._clock.now() + QUERY_TIMEOUT)
            finally:
                del self._queries[query_id]
            epoch = self._transit.get(key_bytes)
            if query.holder == peer and epoch is not None and key_bytes not in self._held:
                del self._transit[key_bytes]
                self._forwards[key_bytes] = (peer, epoch, self._clock.now())
                self._forwards.move_to_end(key_bytes)
                for message in self._transit_queued.pop(key_bytes, ()):
                    self._reply(message, Status.MOVED, b"\xc0", peer)
        finally:
            self._asking_back.discard((peer, key_bytes))

    def _on_here(self, peer: str, message: ActorHere) -> None:
        query = self._queries.get(message.query)
        if query is None or query.key_bytes != message.key or peer not in query.waiting:
            return
        query.waiting.discard(peer)
        query.answered.add(peer)
        if message.answer == 1 and message.holder == peer:
            query.holder = peer
        elif message.answer == 2 and not query.holding:
            query.lost = True
            if message.holder == peer:
                query.waiting_for.add(peer)
        if query.holder or query.lost or not query.waiting:
            query.done.set()

    # -- activations and mailboxes --------------------------------------------------------

    def _activate(
        self, key_bytes: bytes, state: Any, *, epoch: int, dormant: bool = False
    ) -> _Held | None:
        key = self._codec.unpackb(key_bytes)
        now = self._clock.now()
        held = _Held(key, key_bytes, epoch, None, state, arrived_at=now, last_active=now)
        held.idle.set()
        if not dormant:
            try:
                held.instance = self._factory(key, state)
            except Exception:
                logger.exception(
                    "%s: activating actor %r of %r failed", self.node, key, self.namespace
                )
                return None
            held.state = None
            self._activated(held)
        self._held[key_bytes] = held
        self._forwards.pop(key_bytes, None)
        return held

    def _activated(self, held: _Held) -> None:
        self.activations += 1
        if self.on_activate is not None:
            self.on_activate(held.key, held.epoch)

    def _deactivated(self, held: _Held) -> None:
        if self.on_deactivate is not None:
            self.on_deactivate(held.key, held.epoch)

    def _accept(self, held: _Held, message: ActorSend) -> None:
        channels = held.channels
        channel = channels.get(message.origin)
        now = self._clock.now()
        if channel is None or message.gen > channel.gen:
            if channel is None and len(channels) >= self.limits.max_channels:
                # The least recently used goes, unless it was used lately: its sender may
                # still re-send a message whose reply was lost, which a new channel would
                # take for a new one.
                if now - next(iter(channels.values())).used < CHANNEL_KEEP:
                    self._reply(
                        message,
                        Status.BUSY,
                        self._codec.packb(
                            f"the actor has {len(channels)} senders in the last {CHANNEL_KEEP:g} s"
                        ),
                    )
                    return
                channels.popitem(last=False)
            channel = _Channel(message.gen, message.first_unacked)
            channels[message.origin] = channel
        elif message.gen < channel.gen:
            return  # an older channel's copy: everything in it was answered
        channel.used = now
        channels.move_to_end(message.origin)
        if message.first_unacked > channel.next:
            # What this activation never saw was answered by an earlier one (state that
            # was restored from a snapshot, or lost with a crashed owner).
            channel.next = message.first_unacked
            channel.early = {s: m for s, m in channel.early.items() if s >= channel.next}
        seq = message.seq
        if seq < channel.next:
            answer = channel.replies.get(seq)
            if answer is not None:
                self._reply(message, Status(answer[0]), answer[1])
            return  # still in the mailbox: answered when handled
        if seq > channel.next:
            if len(channel.early) < WINDOW:
                channel.early[seq] = message
            return
        while True:
            if len(held.mailbox) >= self.limits.mailbox or self._queued >= self.limits.queued:
                self._reply(
                    message,
                    Status.BUSY,
                    self._codec.packb(
                        f"mailbox full ({len(held.mailbox)} queued for this actor, "
                        f"{self._queued} on {self.node})"
                    ),
                )
                return
            held.mailbox.append(message)
            self._queued += 1
            channel.next += 1
            following = channel.early.pop(channel.next, None)
            if following is None:
                break
            message = following
        self._start(held)

    def _start(self, held: _Held) -> None:
        if held.running or held.frozen or not held.mailbox or not self._running:
            return
        held.running = True
        held.idle = anyio.Event()
        self._spawn(self._run_mailbox, held)

    async def _run_mailbox(self, held: _Held) -> None:
        codec = self._codec
        try:
            while held.mailbox and not held.frozen and self._held.get(held.key_bytes) is held:
                message = held.mailbox.popleft()
                self._queued -= 1
                if held.instance is None:
                    try:
                        held.instance = self._factory(held.key, held.state)
                    except Exception as exc:
                        logger.exception(
                            "%s: activating actor %r of %r failed",
                            self.node,
                            held.key,
                            self.namespace,
                        )
                        self._handled(held, message, Status.FAILED, codec.packb(_describe(exc)))
                        continue
                    held.state = None
                    self._activated(held)
                try:
                    result = held.instance.handle(codec.unpackb(message.body))
                    if inspect.isawaitable(result):
                        result = await result
                    body = codec.packb(result) if message.want_reply else b"\xc0"
                    status = Status.REPLIED if message.want_reply else Status.DONE
                except Exception as exc:
                    status, body = Status.FAILED, codec.packb(_describe(exc))
                held.last_active = self._clock.now()
                self._handled(held, message, status, body)
                await anyio.lowlevel.checkpoint()
        finally:
            held.running = False
            held.idle.set()

    def _handled(self, held: _Held, message: ActorSend, status: Status, body: bytes) -> None:
        channel = held.channels.get(message.origin)
        if channel is not None and channel.gen == message.gen:
            channel.replies[message.seq] = (int(status), body)
            while len(channel.replies) > WINDOW:
                channel.replies.popitem(last=False)
        self._reply(message, status, body)

    def _deactivate_idle(self, now: float) -> None:
        if self.idle_timeout is None:
            return
        for held in list(self._held.values()):
            if (
                held.instance is not None
                and not held.running
                and not held.mailbox
                and not held.frozen
                and now - held.last_active >= self.idle_timeout
            ):
                try:
                    held.state = held.instance.state()
                except Exception:
                    logger.exception(
                        "%s: state() of actor %r of %r failed: it stays active",
                        self.node,
                        held.key,
                        self.namespace,
                    )
                    continue
                held.instance = None
                self._deactivated(held)

    def _expire_forwards(self, now: float) -> None:
        while self._forwards:
            key_bytes, (_, _, since) = next(iter(self._forwards.items()))
            if now - since < FORWARD_TTL and len(self._forwards) <= MAX_FORWARDS:
                break
            del self._forwards[key_bytes]
        # An earlier holder's pointer here lasts FORWARD_TTL on its clock; this memory of
        # it (from when the actor arrived, later) outlasts it.
        while self._lineage:
            key_bytes, (_, since) = next(iter(self._lineage.items()))
            if now - since < 2 * FORWARD_TTL and len(self._lineage) <= MAX_FORWARDS:
                break
            del self._lineage[key_bytes]

    def _remember_holder(self, key_bytes: bytes, node: str) -> None:
        """``node`` held the actor ``key_bytes`` before this node: its forwarding pointer
        may point here, and the actor takes the messages it forwards (see ``_on_send``)."""
        if node == self.node:
            return
        known = tuple(n for n in self._lineage.get(key_bytes, ((), 0.0))[0] if n != node)
        self._lineage[key_bytes] = ((*known, node)[-MAX_LINEAGE:], self._clock.now())
        self._lineage.move_to_end(key_bytes)

    # -- migration ------------------------------------------------------------------------

    def _rebalance(self) -> None:
        now = self._clock.now()
        candidates = self._candidates()
        placed_for = tuple(sorted(candidates))
        # Placement changes with membership only: the actors are looked at again when it
        # changed, or when some were left where they were last time (just arrived, moving).
        if placed_for == self._placed_for and not self._unsettled:
            return
        self._placed_for, self._unsettled = placed_for, False
        if len(candidates) < 2:
            return
        for key_bytes, held in list(self._held.items()):
            if (
                held.moving_to is not None
                or held.in_doubt
                or held.confirming
                or key_bytes in self._migrating
                or now - held.arrived_at < SETTLE
            ):
                self._unsettled = True
                continue
            owner = place(key_bytes, candidates)
            if owner is not None and owner != self.node:
                self._migrating.add(key_bytes)
                self._migration_ends[key_bytes] = anyio.Event()
                self._spawn(self._migrate_one, held, owner, None)

    async def _migrate_one(self, held: _Held, target: str, stats: MoveStats | None) -> None:
        try:
            if not await self.migrate(held, target, stats or MoveStats()):
                # Refused (or the target left): try again later, not at every round.
                held.arrived_at = self._clock.now() + REFUSED_RETRY
                self._unsettled = True
        finally:
            self._migrating.discard(held.key_bytes)
            ended = self._migration_ends.pop(held.key_bytes, None)
            if ended is not None:
                ended.set()

    async def _freeze(self, held: _Held) -> None:
        held.frozen = True
        await held.idle.wait()

    def _payload(self, held: _Held, target_version: int) -> tuple[bytes, int] | str:
        try:
            state = held.instance.state() if held.instance is not None else held.state
        except Exception as exc:
            logger.exception("%s: state() of actor %r failed", self.node, held.key)
            return f"state() failed: {_describe(exc)}"
        # A newer sender downgrades (old code cannot know the new format); an older one
        # sends its own version and the receiver upgrades.
        if target_version < self.version:
            try:
                chain = self._transforms.path(self.namespace, self.version, target_version)
            except NoTransformPath as exc:
                return str(exc)
            converted, dropped = chain.apply([(held.key, state, None)])
            if not converted:
                return next(iter(dropped), "transform failed")
            state = converted[0][1]
        channels = [
            [origin, ch.gen, ch.next, [[seq, st, body] for seq, (st, body) in ch.replies.items()]]
            for origin, ch in held.channels.items()
        ]
        queued = [[m.origin, m.sender, m.gen, m.seq, m.want_reply, m.body] for m in held.mailbox]
        version = min(target_version, self.version)
        try:
            return self._codec.packb([state, channels, queued]), version
        except HandoffError as exc:
            return f"state not encodable: {exc}"

    async def migrate(self, held: _Held, target: str, stats: MoveStats) -> bool:
        """Move ``held`` to ``target``; True when it moved (or is in doubt: not here any
        more as far as callers go)."""
        if (
            held.migrating
            or held.moving_to is not None
            or held.in_doubt
            or held.confirming
            or target not in self._links()
        ):
            return False
        # Claimed before the first await: two migrations of one actor at once (the drain
        # and a placement change) would each send it somewhere.
        held.migrating = True
        try:
            return await self._migrate(held, target, stats)
        finally:
            held.migrating = False
            if (
                held.doubt_stats is not None
                and not held.in_doubt
                and self._held.get(held.key_bytes) is held
            ):
                self._doubt_ended(held, None)  # back here: a drain counted it in doubt

    async def _migrate(self, held: _Held, target: str, stats: MoveStats) -> bool:
        await self._freeze(held)
        links = self._links()
        if self._held.get(held.key_bytes) is not held:
            return False
        if target not in links:
            self._thaw(held)
            return False
        payload = self._payload(held, links[target][0].namespaces[self.namespace])
        if isinstance(payload, str):
            _count(stats.refused, payload)
            self._thaw(held)
            return False
        data, version = payload
        held.moving_to = target
        move_id = next(self._move_ids)
        request = ActorMove(self.namespace, held.key_bytes, move_id, held.epoch + 1, version, data)
        # The incarnation it goes to: a restarted target (same name) never saw this move
        # and would take a repeat of it as new (see _send_move).
        held.move_request, held.move_to = request, links[target][0].incarnation
        move = await self._send_move(held, target, stats)
        if move is None:
            return True  # cancelled while waiting: in doubt (see _send_move)
        if move.accepted:
            self._moved(held, target, held.epoch + 1)
            if held.doubt_stats is not None:
                self._doubt_ended(held, target)  # a drain counted it in doubt meanwhile
            else:
                stats.moved += 1
                stats.successors.add(target)
            return True
        if move.accepted is False:
            _count(stats.refused, f"{target}: {move.reason}")
            held.moving_to = None
            self._thaw(held)
            return False
        # No answer and no link: the move is in doubt. The actor stays frozen here until
        # someone tells who holds it now (see _resolve).
        held.in_doubt = True
        self._doubt(held, stats)
        logger.warning(
            "%s: moving actor %r of %r to %s: no answer before its link ended; it stays "
            "frozen here until the cluster says who holds it",
            self.node,
            held.key,
            self.namespace,
            target,
        )
        if self._running:
            self._spawn(self._resolve, held, target)
        return True

    async def _send_move(self, held: _Held, target: str, stats: MoveStats) -> _Move | None:
        """Send ``held.move_request`` to ``target`` (again while it is silent but linked,
        to the same incarnation) and wait for the answer. ``None``: cancelled meanwhile (the
        drain's deadline): the move is in doubt and resolved in the background."""
        request = held.move_request
        assert request is not None
        move = self._moves[request.move] = _Move(target, held.key_bytes)
        completed = False
        try:
            self._post(target, request)
            answered = await self._clock.wait(move.done, self._clock.now() + MOVE_TIMEOUT)
            while not answered and self._same_incarnation(target, held.move_to):
                # Silent but linked: ask again (the answer to a repeated move is the same).
                self._post(target, request)
                answered = await self._clock.wait(move.done, self._clock.now() + MOVE_TIMEOUT)
            completed = True
        finally:
            del self._moves[request.move]
            if not completed and move.accepted is None:
                held.in_doubt = True
                self._doubt(held, stats)
                if self._running:
                    self._spawn(self._resolve, held, target)
        return move

    @staticmethod
    def _doubt(held: _Held, stats: MoveStats) -> None:
        if held.doubt_stats is None:
            held.doubt_stats = stats
            stats.in_doubt += 1

    @staticmethod
    def _doubt_ended(held: _Held, moved_to: str | None) -> None:
        # The drain's report is read after its streams: an actor whose doubt ended by then
        # counts as moved, or is here again (exported by the streams, or stranded).
        stats, held.doubt_stats = held.doubt_stats, None
        if stats is not None:
            stats.in_doubt -= 1
            if moved_to is not None:
                stats.moved += 1
                stats.successors.add(moved_to)

    def _is_member(self, name: str, incarnation: str) -> bool:
        member = self._members.get(name)
        return member is not None and member.incarnation == incarnation

    def _same_incarnation(self, name: str, incarnation: str) -> bool:
        link = self._links().get(name)
        return link is not None and link[0].incarnation == incarnation

    async def _resolve(self, held: _Held, target: str) -> None:
        delay = 0.05
        while self._running and self._held.get(held.key_bytes) is held and held.in_doubt:
            query = self._new_query(held.key_bytes, claiming=False)
            query.waiting.discard(self.node)
            # Held here all along: a claim elsewhere cannot win, so it does not stall this
            # question (each would otherwise make the other ask again, for ever).
            query.holding = True
            answer = await self._ask_everyone(query)
            if answer is not None and not answer.startswith("?") and answer != self.node:
                self._doubt_ended(held, answer)
                self._moved(held, answer, held.epoch + 1)
                return
            if answer is None and self._same_incarnation(target, held.move_to):
                # The target is back and does not hold it: ask it the same move again (it
                # answers a move once, so a copy that did arrive is not taken twice).
                move = await self._send_move(held, target, MoveStats())
                if move is not None and move.accepted:
                    self._doubt_ended(held, target)
                    self._moved(held, target, held.epoch + 1)
                    return
                if move is not None and move.accepted is False:
                    self._doubt_ended(held, None)
                    held.in_doubt = False
                    held.moving_to = None
                    self._thaw(held)
                    return
            elif answer is None and not self._is_member(target, held.move_to):
                # Nobody holds it and the process it went to is gone (left, or restarted
                # under its name without it): the move never took effect, or died there.
                self._doubt_ended(held, None)
                held.in_doubt = held.frozen = False
                held.moving_to = None
                self._thaw(held)
                return
            await self._sleep(delay)
            delay = min(delay * 2, 1.0)

    def _thaw(self, held: _Held) -> None:
        held.frozen = False
        held.ahead = 0
        waiting, held.held = held.held, []
        for message in waiting:
            self._on_send(message)
        self._start(held)

    def _moved(self, held: _Held, target: str, epoch: int) -> None:
        # What went ahead reached the target unless the move was in doubt (the link may
        # have dropped them): then everything goes again (its channels drop the copies).
        ahead = held.ahead if target == held.moving_to and not held.in_doubt else 0
        held.in_doubt = False
        if self._held.get(held.key_bytes) is held:
            del self._held[held.key_bytes]
        self._queued -= len(held.mailbox)
        if held.instance is not None:
            self._deactivated(held)
        self._forwards[held.key_bytes] = (target, epoch, self._clock.now())
        self._forwards.move_to_end(held.key_bytes)
        for message in held.held[ahead:]:
            self._post(target, _hop(message))
        held.ahead = 0
        early = [m for channel in held.channels.values() for m in channel.early.values()]
        for message in early:
            self._post(target, _hop(message))
        # Their senders take answers only from the nodes their messages went to: each is
        # told where it went (the queued ones moved in the payload).
        for message in itertools.chain(held.mailbox, held.held, early):
            self._reply(message, Status.MOVED, b"\xc0", target)
        held.held = []

    def _on_move(self, peer: str, message: ActorMove) -> None:
        # A move is answered once: a repeated one (the sender asks again when the answer is
        # slow) gets the same answer, whatever happened since. Accepting a repeat of a move
        # this node refused would activate an actor its sender kept.
        remembered = self._move_answers.get((peer, message.move))
        if remembered is not None:
            accepted, reason = remembered
            self._post(
                peer,
                ActorMoved(self.namespace, message.key, message.move, int(accepted), reason),
            )
            return

        def answer(accepted: bool, reason: str = "") -> None:
            self._move_answers[(peer, message.move)] = (accepted, reason)
            while len(self._move_answers) > MAX_MOVE_ANSWERS:
                self._move_answers.popitem(last=False)
            self._post(
                peer,
                ActorMoved(self.namespace, message.key, message.move, int(accepted), reason),
            )

        key_bytes = message.key
        existing = self._held.get(key_bytes)
        if existing is not None and existing.epoch >= message.epoch:
            answer(True)  # a repeated move that arrived before: it is here
            return
        if existing is not None:
            answer(False, "this node already holds the actor")
            return
        if not self._serving():
            answer(False, "draining")
            return
        try:
            state, channels, queued = self._decode_payload(message)
        except (HandoffError, ValueError, TypeError) as exc:
            answer(False, f"unusable actor state: {exc}")
            return
        claim = self._claims.get(key_bytes)
        if claim is not None:
            claim.holder = self.node  # it arrives: the claim is moot
            claim.done.set()
        held = self._activate(key_bytes, state, epoch=message.epoch)
        if held is None:
            answer(False, "activation failed on the new owner")
            return
        # Only a move that activated the actor here makes its sender an earlier holder
        # (any peer can send a move: one refused, or repeated, proves nothing).
        self._remember_holder(key_bytes, peer)
        for origin, gen, next_seq, replies in channels:
            channel = _Channel(gen, next_seq, used=self._clock.now())
            for seq, status, body in replies:
                channel.replies[seq] = (status, body)
            held.channels[origin] = channel
        for origin, sender, gen, seq, want_reply, body in queued:
            held.mailbox.append(
                ActorSend(
                    self.namespace, key_bytes, origin, sender, gen, seq, 1, want_reply, 0, body
                )
            )
            self._queued += 1
        answer(True)
        self._start(held)

    def _decode_payload(self, message: ActorMove) -> tuple[Any, _Channels, _Queued]:
        decoded = self._codec.unpackb(message.payload)
        if not isinstance(decoded, list | tuple) or len(decoded) != 3:
            raise ValueError("not [state, channels, queued]")
        state, raw_channels, raw_queued = decoded
        if message.version != self.version:
            chain = self._transforms.path(self.namespace, message.version, self.version)
            key = self._codec.unpackb(message.key)
            converted, dropped = chain.apply([(key, state, None)])
            if not converted:
                raise ValueError(next(iter(dropped), "transform failed"))
            state = converted[0][1]
        channels, queued = _checked_meta(raw_channels, raw_queued, self.limits)
        return state, channels, queued

    # -- drain ----------------------------------------------------------------------------

    async def drain(self, deadline: float) -> MoveStats:
        """Move every actor held here to its placement among the serving peers, before
        ``deadline``; what cannot move stays (the snapshot store may take it)."""
        stats = MoveStats()
        limiter = anyio.CapacityLimiter(DRAIN_MOVES)

        async def adopt(held: _Held, ended: anyio.Event) -> None:
            # A placement change is moving it: this drain waits for that move and counts
            # its outcome (in doubt if the deadline comes first), or moves it itself.
            try:
                await ended.wait()
            finally:
                if not ended.is_set():
                    self._doubt(held, stats)  # corrected when that move ends
            if self._held.get(held.key_bytes) is not held:
                forward = self._forwards.get(held.key_bytes)
                stats.moved += 1
                if forward is not None:
                    stats.successors.add(forward[0])
            elif held.in_doubt:
                held.doubt_stats = None
                self._doubt(held, stats)
            else:
                await one(held)

        async def one(held: _Held) -> None:
            async with limiter:
                candidates = self._candidates(without_me=True)
                tried: set[str] = set()
                while candidates and self._held.get(held.key_bytes) is held:
                    target = place(held.key_bytes, [c for c in candidates if c not in tried])
                    if target is None:
                        return
                    tried.add(target)
                    if await self.migrate(held, target, stats) or held.in_doubt:
                        return

        with anyio.move_on_after(max(0.0, deadline - self._clock.now())):
            async with anyio.create_task_group() as group:
                # Those with messages waiting first, then the most recently messaged:
                # their callers wait the least, and a deadline leaves behind the actors
                # nobody was talking to.
                by_activity = sorted(
                    self._held.values(), key=lambda h: (not h.mailbox, -h.last_active)
                )
                for held in by_activity:
                    ended = self._migration_ends.get(held.key_bytes)
                    if ended is not None:
                        group.start_soon(adopt, held, ended)
                    elif held.in_doubt:
                        held.doubt_stats = None  # a move in doubt since before: counted here
                        self._doubt(held, stats)
                    elif held.moving_to is None and not held.migrating:
                        group.start_soon(one, held)
            # Messages this node sent as a caller are answered before it leaves, if they can.
            if self._unanswered:
                self._all_answered = anyio.Event()
                await self._all_answered.wait()
        return stats

    def take(self) -> Iterator[tuple[Any, Any, Any]]:
        """Yield (and forget) every actor still here that is not moving or handling a
        message: ``(key, state, [channels, queued])`` for the snapshot store or a successor
        (the state alone is the record's value, so that upgrade hooks see only it)."""
        for key_bytes, held in list(self._held.items()):
            if held.moving_to is not None or held.in_doubt or held.running or held.confirming:
                continue
            try:
                state = held.instance.state() if held.instance is not None else held.state
            except Exception:
                logger.exception("%s: state() of actor %r failed", self.node, held.key)
                continue  # stays here, counted by stranded()
            # With their kept replies: a sender whose answer was lost (or not taken: it came
            # from a node the sender did not know held the actor) is answered again.
            channels = [
                [o, c.gen, c.next, [[seq, st, body] for seq, (st, body) in c.replies.items()]]
                for o, c in held.channels.items()
            ]
            queued = [_queued(m) for m in held.mailbox]
            del self._held[key_bytes]
            self._transit[key_bytes] = held.epoch
            if held.mailbox:
                self._transit_queued[key_bytes] = list(held.mailbox)
            self._queued -= len(held.mailbox)
            if held.instance is not None:
                self._deactivated(held)
            yield held.key, state, [channels, queued]

    def stranded(self) -> int:
        """Actors still here that a drain's export could not take (handling a message, or
        moving and in doubt)."""
        return sum(1 for held in self._held.values() if held.moving_to is None)

    def put(self, key: Any, state: Any, meta: Any) -> bool:
        """Hold a restored (or given back, or handed over) actor. False if this node holds
        the key already.

        Its record may have travelled while another node activated the key (its exporter
        crashed mid-stream, a snapshot restored late, a chunk re-sent after a lost Ack): the
        actor is held frozen, and answers for the key so that nobody claims it, until every
        peer says it holds no other activation (messages wait meanwhile). If one does, the
        record gives way ("superseded": counted in ``stats()``, logged, its waiting messages
        forwarded there): the running activation has answered callers already. Two records
        landing on two nodes: the lower placement score gives way."""
        key_bytes = self._encode_key(key)
        if key_bytes in self._held:
            return False
        channels: _Channels = []
        queued: _Queued = []
        if isinstance(meta, list | tuple) and len(meta) == 2:
            # Checked whole before the actor is held: refused after, the key stayed held
            # frozen with nobody confirming it (every message to it queued for ever).
            # A record is the actor's only copy: one from a node with larger limits is
            # held all the same (its extra queued messages count in the node's bound).
            channels, queued = _checked_meta(meta[0], meta[1], None)
        elif meta is not None:
            raise ValueError("an actor record's metadata is [channels, queued]")
        held = self._activate(key_bytes, state, epoch=self._transit.pop(key_bytes, 1), dormant=True)
        self._transit_queued.pop(key_bytes, None)  # back here: this node answers them
        assert held is not None
        held.confirming = held.frozen = True
        for origin, gen, next_seq, replies in channels:
            channel = _Channel(gen, next_seq, used=self._clock.now())
            for seq, status, body in replies:
                channel.replies[seq] = (status, body)
            held.channels[origin] = channel
        for origin, sender, gen, seq, want_reply, body in queued:
            held.mailbox.append(
                ActorSend(
                    self.namespace, key_bytes, origin, sender, gen, seq, 1, want_reply, 0, body
                )
            )
            self._queued += 1
        if self._running:
            self._spawn(self._confirm, held)
        return True

    async def _confirm(self, held: _Held) -> None:
        delay, conflicts = 0.02, 0
        key_bytes = held.key_bytes
        while self._running and self._held.get(key_bytes) is held and held.confirming:
            query = self._new_query(key_bytes, claiming=False)
            query.waiting.discard(self.node)
            answer = await self._ask_everyone(query)
            for exporter in query.waiting_for:
                # Its record travels until this node says it holds it: then it forwards
                # what its callers send it here.
                self._remember_holder(key_bytes, exporter)
            if self._held.get(key_bytes) is not held or not held.confirming:
                return
            if answer is None:
                held.confirming = False
                self._thaw(held)
                return
            if not answer.startswith("?") and answer != self.node:
                conflicts += 1
                # Both may be records still confirming: the lower score gives way at once;
                # the higher one waits a few rounds for that, then gives way to what is
                # running there.
                if (
                    placement_score(self.node, key_bytes) < placement_score(answer, key_bytes)
                    or conflicts > CONFIRM_CONFLICTS
                ):
                    self._supersede(held, answer)
                    return
            await self._sleep(delay)
            delay = min(delay * 2, 1.0)

    def _supersede(self, held: _Held, holder: str) -> None:
        logger.warning(
            "%s: actor %r of %r arrived as a record while %s holds it: the record is dropped "
            "(superseded), its waiting messages go there",
            self.node,
            held.key,
            self.namespace,
            holder,
        )
        self.superseded += 1
        waiting = list(held.mailbox)
        held.mailbox.clear()
        self._queued -= len(waiting)
        held.held[:0] = waiting
        self._moved(held, holder, held.epoch)


_Channels = list[tuple[str, int, int, list[tuple[int, int, bytes]]]]
_Queued = list[tuple[str, str, int, int, int, bytes]]


def _checked_meta(
    raw_channels: Any, raw_queued: Any, limits: ActorLimits | None
) -> tuple[_Channels, _Queued]:
    """The channels ``[origin, gen, next, replies]`` and queued messages ``[origin, sender,
    gen, seq, want_reply, body]`` of a move's payload or an actor record (records of earlier
    builds keep no replies), within ``limits`` if given; checked, never converted (bytes(n)
    of a number makes n bytes, int() of a string or a float is no sequence number)."""
    if not isinstance(raw_channels, list | tuple) or not isinstance(raw_queued, list | tuple):
        raise ValueError("channels and queued messages must be arrays")
    if limits is not None and (
        len(raw_channels) > limits.max_channels or len(raw_queued) > limits.mailbox
    ):
        raise ValueError("more channels or queued messages than this node takes")
    channels: _Channels = []
    for item in raw_channels:
        if not isinstance(item, list | tuple) or len(item) != 4:
            raise ValueError("malformed channel")
        origin, gen, next_seq, replies = item
        if not (
            isinstance(origin, str)
            and _positive(gen)
            and _positive(next_seq)
            and isinstance(replies, list | tuple)
            and len(replies) <= WINDOW
        ):
            raise ValueError("malformed channel")
        kept: list[tuple[int, int, bytes]] = []
        for reply in replies:
            if not isinstance(reply, list | tuple) or len(reply) != 3:
                raise ValueError("malformed reply")
            seq, status, body = reply
            if not (_positive(seq) and status in _STATUSES and isinstance(body, bytes)):
                raise ValueError("malformed reply")
            kept.append((seq, status, body))
        channels.append((origin, gen, next_seq, kept))
    queued: _Queued = []
    for item in raw_queued:
        if not isinstance(item, list | tuple) or len(item) != 6:
            raise ValueError("malformed queued message")
        origin, sender, gen, seq, want_reply, body = item
        if not (
            isinstance(origin, str)
            and isinstance(sender, str)
            and _positive(gen)
            and _positive(seq)
            and isinstance(want_reply, int)
            and isinstance(body, bytes)
            and body
        ):
            raise ValueError("malformed queued message")
        queued.append((origin, sender, gen, seq, int(bool(want_reply)), body))
    return channels, queued


def _may_answer(pending: _Pending, node: str) -> None:
    if node in pending.answerers:
        return
    pending.answerers.append(node)
    if len(pending.answerers) > MAX_ANSWERERS:
        del pending.answerers[0]


def _queued(message: ActorSend) -> list[Any]:
    return [
        message.origin,
        message.sender,
        message.gen,
        message.seq,
        message.want_reply,
        message.body,
    ]


def _hop(message: ActorSend) -> ActorSend:
    return ActorSend(
        message.namespace,
        message.key,
        message.origin,
        message.sender,
        message.gen,
        message.seq,
        message.first_unacked,
        message.want_reply,
        min(message.hops + 1, 64),
        message.body,
    )


_STATUSES = frozenset(int(status) for status in Status)


def _positive(value: object) -> bool:
    return type(value) is int and 0 < value <= 2**40


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:1000]


def _text(codec: Codec, body: bytes) -> str:
    try:
        value = codec.unpackb(body)
    except HandoffError:
        return ""
    return value if isinstance(value, str) else ""


def _count(counts: dict[str, int], reason: str) -> None:
    counts[reason] = counts.get(reason, 0) + 1
