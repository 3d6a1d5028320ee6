"""The peer table: who is up, and the node-up / leaving / node-down events.

Pure logic with time passed in, so every rule is tested without sockets. The node feeds it
what its links report; it answers with events to publish and links to close.

Rules:

- One connection per pair of nodes. Both sides often dial at once (each sees the other in
  DNS); of two links between the same two incarnations, both sides keep the one dialled by
  the node whose name sorts first, so they agree without talking about it. The incarnation
  is no secret (it travels in clear in every handshake), so a second link of a known
  incarnation replaces a live one only when it can be the peer's own: both completed within
  the grace (two dials at once), the link in use is silent past the heartbeat timeout, or
  the new one comes from a host the peer is known at. Otherwise a cookie holder could take
  over a live node's name by claiming its incarnation.
- A peer that closes a link as a duplicate is not down: the link it prefers is on its way.
  It is held for a grace period and reported down only if no link replaces it.
- A new incarnation under a known name (a restarted process) replaces the old one only
  once the old one's link is dead: closed, or silent past the heartbeat timeout. While the
  old link is heard from, the newcomer is refused with :data:`NAME_IN_USE` (it retries
  later), whatever start time it claims: start times are self-declared, and believing them
  would let any cookie holder take over a live node's name and receive its drain.
- Absence from DNS is never a reason to drop a peer; only its links decide.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import MappingProxyType

from handoff.protocol import NodeState, PeerInfo

__all__ = (
    "DUPLICATE",
    "NAME_IN_USE",
    "DownReason",
    "LinkDecision",
    "Membership",
    "MembershipEvent",
    "NodeDown",
    "NodeLeaving",
    "NodeUp",
    "Peer",
)

DUPLICATE = "duplicate connection"
NAME_IN_USE = "name in use by a live node"
"""Goodbye reason of a link refused because its peer's name belongs to another live
incarnation; the refused side retries later (a restarted node gets in once the old link is
dead)."""


class DownReason(StrEnum):
    """Why a peer is considered gone."""

    GOODBYE = "goodbye"
    CONNECTION_LOST = "connection lost"
    HEARTBEAT_TIMEOUT = "heartbeat timeout"
    PROTOCOL_ERROR = "protocol error"
    RESTARTED = "restarted"


@dataclass(frozen=True, slots=True)
class Peer:
    """An authenticated member of the cluster, as this node sees it."""

    name: str
    release: str
    address: str
    state: NodeState
    namespaces: Mapping[str, int]
    started_at: float
    incarnation: str = field(repr=False)
    protocol_version: int = field(repr=False)
    clock_offset: float = field(repr=False)
    """The peer's wall clock minus ours at handshake time, in seconds."""

    @property
    def serving(self) -> bool:
        """True while the peer takes work (not draining)."""
        return self.state is NodeState.SERVING

    @classmethod
    def from_info(cls, info: PeerInfo, address: str) -> Peer:
        """Build from what the handshake told; ``address`` is used if the peer gave none."""
        return cls(
            name=info.name,
            release=info.release,
            address=info.address or address,
            state=info.state,
            namespaces=MappingProxyType({ns.name: ns.version for ns in info.namespaces}),
            started_at=info.started_at,
            incarnation=info.incarnation,
            protocol_version=info.protocol_version,
            clock_offset=info.clock_offset,
        )

    def with_state(self, state: NodeState) -> Peer:
        """The same peer in another state."""
        return replace(self, state=state)


@dataclass(frozen=True, slots=True)
class NodeUp:
    """A peer joined (authenticated)."""

    peer: Peer
    kind: str = "node-up"


@dataclass(frozen=True, slots=True)
class NodeLeaving:
    """A peer started draining: it is still reachable but takes no new work."""

    peer: Peer
    kind: str = "leaving"


@dataclass(frozen=True, slots=True)
class NodeDown:
    """A peer is gone, for ``reason`` (``detail`` says more, for logs)."""

    peer: Peer
    reason: DownReason
    detail: str = ""
    kind: str = "node-down"


MembershipEvent = NodeUp | NodeLeaving | NodeDown


@dataclass(frozen=True, slots=True)
class LinkDecision:
    """What the node must do after a link completed its handshake: if not ``keep``, close
    the new link saying ``reason``."""

    keep: bool
    close: tuple[int, ...] = ()
    events: tuple[MembershipEvent, ...] = ()
    reason: str = DUPLICATE


@dataclass(slots=True)
class _Entry:
    peer: Peer
    link: int
    dialled: bool
    addresses: set[str]
    since: float = -math.inf
    """When the link was established (monotonic, like ``now``)."""


def _host_of(address: str) -> str:
    """The host of ``host:port`` (``[v6]:port`` too)."""
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 or "]" in address else address
    return host.strip("[]")


class Membership:
    """The authenticated peers of one node, keyed by name."""

    def __init__(
        self, local_name: str, *, grace: float, heartbeat_timeout: float = math.inf
    ) -> None:
        self._local_name = local_name
        self._grace = grace
        self._heartbeat_timeout = heartbeat_timeout
        self._entries: dict[str, _Entry] = {}
        # Peers whose link the other side closed as a duplicate: name -> (entry, deadline).
        self._held: dict[str, tuple[_Entry, float]] = {}

    def peers(self) -> list[Peer]:
        """Authenticated peers, sorted by name."""
        return [self._entries[name].peer for name in sorted(self._entries)]

    def peer(self, name: str) -> Peer | None:
        """The peer called ``name``, if it is up."""
        entry = self._entries.get(name) or self._held.get(name, (None, 0.0))[0]
        return entry.peer if entry else None

    def link_of(self, name: str) -> int | None:
        """The id of the link in use for peer ``name``."""
        entry = self._entries.get(name)
        return entry.link if entry else None

    def knows_address(self, address: str) -> bool:
        """True if a live peer is reachable at ``address`` (no need to dial it)."""
        return any(address in entry.addresses for entry in self._entries.values()) or any(
            address in entry.addresses for entry, _ in self._held.values()
        )

    def name_at(self, address: str) -> str | None:
        """The name of the live peer reachable at ``address``, if any."""
        for name, entry in self._entries.items():
            if address in entry.addresses:
                return name
        return None

    def _preferred(self, peer_name: str, dialled: bool) -> bool:
        dialler = self._local_name if dialled else peer_name
        return dialler == min(self._local_name, peer_name)

    def established(
        self,
        link: int,
        info: PeerInfo,
        *,
        dialled: bool,
        address: str,
        now: float,
        last_heard: Callable[[int], float] | None = None,
    ) -> LinkDecision:
        """A link finished its handshake with ``info``; decide whether to keep it.

        ``last_heard(link)`` is when a link in use last received anything (monotonic, like
        ``now``); without it every link in use counts as heard from just now.
        """
        peer = Peer.from_info(info, address)
        entry = _Entry(peer, link, dialled, {address, peer.address} - {""}, since=now)
        current = self._entries.get(info.name)
        held = self._held.get(info.name)
        if current is None and held is not None:
            held_entry, deadline = held
            if held_entry.peer.incarnation == info.incarnation:
                # The replacement for a link closed as a duplicate: nothing changed for users.
                del self._held[info.name]
                self._entries[info.name] = entry
                return LinkDecision(keep=True)
            if now < deadline:
                # Its preferred link is on its way: the peer is as alive as a heard one.
                return LinkDecision(keep=False, reason=NAME_IN_USE)
            del self._held[info.name]
            self._entries[info.name] = entry
            return LinkDecision(
                keep=True,
                events=(NodeDown(held_entry.peer, DownReason.RESTARTED), NodeUp(peer)),
            )
        if current is None:
            self._entries[info.name] = entry
            return LinkDecision(keep=True, events=(NodeUp(peer),))
        if current.peer.incarnation != info.incarnation:
            heard = now if last_heard is None else last_heard(current.link)
            alive = now - heard < self._heartbeat_timeout
            if alive or info.started_at < current.peer.started_at:
                return LinkDecision(keep=False, reason=NAME_IN_USE)
            self._entries[info.name] = entry
            return LinkDecision(
                keep=True,
                close=(current.link,),
                events=(NodeDown(current.peer, DownReason.RESTARTED), NodeUp(peer)),
            )
        # Same incarnation twice: the deterministic tie-break, silently. The incarnation is
        # no secret (it travels in clear in every Hello and Welcome), so a claim to it alone
        # must not displace a settled, live link: only the race of two dials, a dead link or
        # a link from the same host as the one in use can be the peer's own second link.
        if self._preferred(info.name, dialled) and not self._preferred(info.name, current.dialled):
            if not self._may_be_same_node(current, address, now, last_heard):
                return LinkDecision(keep=False)
            entry.addresses |= current.addresses
            self._entries[info.name] = entry
            return LinkDecision(keep=True, close=(current.link,))
        current.addresses |= entry.addresses
        return LinkDecision(keep=False)

    def _may_be_same_node(
        self,
        current: _Entry,
        address: str,
        now: float,
        last_heard: Callable[[int], float] | None,
    ) -> bool:
        if now - current.since < self._grace:
            return True  # both nodes dialled at once: the two links complete together
        heard = now if last_heard is None else last_heard(current.link)
        if now - heard >= self._heartbeat_timeout:
            return True
        host = _host_of(address)
        return any(_host_of(known) == host for known in current.addresses)

    def state_changed(self, link: int, state: NodeState) -> list[MembershipEvent]:
        """The peer on ``link`` changed state."""
        entry = self._find(link)
        if entry is None or entry.peer.state is state:
            return []
        entry.peer = entry.peer.with_state(state)
        return [NodeLeaving(entry.peer)] if state is NodeState.DRAINING else []

    def lost(
        self, link: int, reason: DownReason, detail: str = "", *, now: float
    ) -> list[MembershipEvent]:
        """The link ended. Events only if it was the link in use for its peer."""
        entry = self._find(link)
        if entry is None:
            return []
        del self._entries[entry.peer.name]
        if reason is DownReason.GOODBYE and detail == DUPLICATE:
            self._held[entry.peer.name] = (entry, now + self._grace)
            return []
        return [NodeDown(entry.peer, reason, detail)]

    def expire(self, now: float) -> list[MembershipEvent]:
        """Report held peers whose replacement link never came."""
        events: list[MembershipEvent] = []
        for name, (entry, deadline) in list(self._held.items()):
            if now >= deadline:
                del self._held[name]
                events.append(
                    NodeDown(entry.peer, DownReason.CONNECTION_LOST, "duplicate never replaced")
                )
        return events

    def replacing(self, now: float, name: str | None = None) -> float:
        """Until when a peer (``name``, or any) whose link the other side closed as a
        duplicate may still get its replacement (``-inf`` if none is awaited): until then
        it is absent from :meth:`peers`, yet alive, its new link's handshake still
        completing here."""
        return max(
            (
                deadline
                for held, (_, deadline) in self._held.items()
                if deadline > now and name in (None, held)
            ),
            default=-math.inf,
        )

    def next_deadline(self) -> float:
        """When ``expire`` has something to do (``inf`` if never)."""
        return min((deadline for _, deadline in self._held.values()), default=math.inf)

    def clear(self) -> list[Peer]:
        """Forget everyone (the local node stops); returns who was up."""
        peers = self.peers()
        self._entries.clear()
        self._held.clear()
        return peers

    def _find(self, link: int) -> _Entry | None:
        for entry in self._entries.values():
            if entry.link == link:
                return entry
        return None
