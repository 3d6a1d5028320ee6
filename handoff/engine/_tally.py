"""Cluster-scoped counters: each node tells its peers its own amounts, periodically.

A namespace whose adapter has a ``tally_interval`` (``handoff.Counters(scope="cluster")``)
is reported every that many seconds to each peer that tracks it at the same schema version:
one or more :class:`~handoff.protocol.Tally` messages with the keys whose own amount changed
since the last report, as absolute amounts (0: none left) with the remaining time of their
windows. A peer that has not had a full report from this node (it just came up, its link
was replaced, or a send to it failed) gets every key instead, and every peer gets one every
:data:`FULL_EVERY` reports: that repairs any report lost on the way, and lets the receiver
forget keys the sender no longer holds. Amounts are absolute and every Tally carries a
sequence number, so a lost, repeated or reordered one does no harm. What a peer reported is
forgotten when its link goes: a node's counts then count once, where they are.

Staleness: a node's reads miss at most what the others counted in the last interval plus
one round trip. A handoff moves counts from one node's share to another's: the sender's
next report shows them gone, the receiver's shows them added, so for at most that long a
third node may see them twice or not at all; then the total is exact again.

Data flows one way: the mesh hands a Tally to the sessions, which hand it here, and this
module hands the records to the namespace's adapter.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import anyio
import anyio.lowlevel
import anyio.to_thread

from handoff._adapter import Record
from handoff._codec import Codec
from handoff._errors import HandoffError, ProtocolError, RecordDecodeError
from handoff.engine._link import ANYIO_CLOCK, Clock, Link
from handoff.engine._tracked import Tracked
from handoff.membership import Peer
from handoff.protocol import MAX_TALLY_RECORDS, Tally

__all__ = ("FULL_EVERY", "MAX_TALLY_BYTES", "SupportsClusterScope", "Tallies")

logger = logging.getLogger("handoff.engine")

FULL_EVERY = 60
"""Every this many reports of a namespace, each peer gets every key (30 s at 0.5 s)."""
MAX_TALLY_BYTES = 1024 * 1024
"""Encoded records in one Tally at most (a report of more goes in several)."""
SEND_LIMIT = 2.0
"""Seconds one Tally may take to send; past that the peer gets a full report next time."""


@runtime_checkable
class SupportsClusterScope(Protocol):
    """Adapters whose objects every node reads cluster-wide (``Counters(scope="cluster")``)."""

    @property
    def tally_interval(self) -> float | None:
        """Seconds between two reports; ``None``: nothing to report (local scope)."""
        ...

    def tally(self, *, full: bool) -> list[Record]:
        """Own amounts of the keys changed since the last ``full=False`` call, or all."""
        ...

    def apply_tally(
        self, origin: tuple[str, str], seq: int, records: Sequence[Record], *, full_from: int
    ) -> int:
        """Keep what ``origin`` reported; returns the number of unusable records."""
        ...

    def forget(self, peer: str) -> None:
        """Drop what ``peer`` reported."""
        ...


PeerLinks = Callable[[], Sequence[tuple[Peer, Link]]]


class Tallies:
    """Sends this node's reports and applies its peers' (see the module documentation)."""

    def __init__(
        self,
        *,
        incarnation: str,
        tracked: Mapping[str, Tracked],
        codec: Codec,
        peers: PeerLinks,
        clock: Clock = ANYIO_CLOCK,
        max_records: int = MAX_TALLY_RECORDS,
        max_bytes: int = MAX_TALLY_BYTES,
    ) -> None:
        self._incarnation = incarnation
        self._tracked = tracked
        self._codec = codec
        self._peers = peers
        self._clock = clock
        self._max_records = min(max_records, MAX_TALLY_RECORDS)
        self._max_bytes = max_bytes
        self._seq = itertools.count(1)
        self._reports: dict[str, int] = {}
        # Per namespace, the peers (name, incarnation) that had a full report and no
        # failed send since.
        self._synced: dict[str, set[tuple[str, str]]] = {}
        # Bumped when a peer's link goes: a Tally decoded across that is not applied.
        self._lives: dict[str, int] = {}

    def scoped(self) -> list[tuple[Tracked, SupportsClusterScope, float]]:
        """The namespaces to report, with their adapters and intervals."""
        found: list[tuple[Tracked, SupportsClusterScope, float]] = []
        for tracked in self._tracked.values():
            adapter = tracked.adapter
            if isinstance(adapter, SupportsClusterScope):
                interval = adapter.tally_interval
                if interval is not None:
                    found.append((tracked, adapter, interval))
        return found

    async def run(self) -> None:
        """Report each cluster-scoped namespace every its interval, until cancelled."""
        scoped = self.scoped()
        if not scoped:
            return
        due = {tracked.name: self._clock.now() for tracked, _adapter, _interval in scoped}
        while True:
            now = self._clock.now()
            for tracked, adapter, interval in scoped:
                if due[tracked.name] <= now:
                    due[tracked.name] = now + interval
                    try:
                        await self.report(tracked, adapter)
                    except Exception:
                        # A report that failed must not take the node down: the next one
                        # goes to every peer in full.
                        logger.exception("could not report %r to the peers", tracked.name)
                        self._synced.pop(tracked.name, None)
            await anyio.sleep(max(0.0, min(due.values()) - self._clock.now()))

    async def report(self, tracked: Tracked, adapter: SupportsClusterScope) -> None:
        """Send one report of ``tracked`` to every peer that tracks it."""
        name = tracked.name
        count = self._reports[name] = self._reports.get(name, 0) + 1
        targets = [
            (peer, link)
            for peer, link in self._peers()
            if peer.namespaces.get(name) == tracked.version
        ]
        delta = adapter.tally(full=False)  # taken even with nobody to tell: they get a full
        synced = self._synced.setdefault(name, set())
        synced &= {(peer.name, peer.incarnation) for peer, _link in targets}
        full_round = count % FULL_EVERY == 0
        full: list[Record] | None = None
        sends = []
        for peer, link in targets:
            origin = (peer.name, peer.incarnation)
            if full_round or origin not in synced:
                if full is None:
                    full = adapter.tally(full=True)
                sends.append((peer, link, full, True))
            elif delta:
                sends.append((peer, link, delta, False))
        if not sends:
            return
        payloads = {}
        for _peer, _link, records, _full in sends:
            if id(records) not in payloads:
                payloads[id(records)] = await self._encode(name, records)
        async with anyio.create_task_group() as group:
            for peer, link, records, is_full in sends:
                group.start_soon(self._send, name, peer, link, payloads[id(records)], is_full)

    async def _encode(self, name: str, records: list[Record]) -> list[tuple[int, bytes]]:
        """``(count, payload)`` pieces of at most the bounds; unencodable records left out."""
        pieces: list[tuple[int, bytes]] = []
        step = self._max_records
        pending = [records[i : i + step] for i in range(0, len(records), step)] or [[]]
        while pending:
            batch = pending.pop(0)
            if pieces:
                await anyio.lowlevel.checkpoint()  # a large full report: the loop's turn
            payload, rejected = self._codec.encode_records(batch)
            if len(payload) > self._max_bytes and len(batch) > 1:
                half = len(batch) // 2
                pending[0:0] = [batch[:half], batch[half:]]
                continue
            if rejected or len(payload) > self._max_bytes:
                logger.warning(
                    "%r: %d key(s) left out of the cluster report: %s",
                    name,
                    len(rejected) or len(batch),
                    rejected[0][1] if rejected else "too large for one report",
                )
                if len(payload) > self._max_bytes:
                    continue
            pieces.append((len(batch) - len(rejected), payload))
        return pieces

    async def _send(
        self, name: str, peer: Peer, link: Link, pieces: list[tuple[int, bytes]], full: bool
    ) -> None:
        origin = (peer.name, peer.incarnation)
        synced = self._synced.setdefault(name, set())
        life = self._lives.get(peer.name, 0)
        first = 0
        try:
            for index, (count, payload) in enumerate(pieces):
                seq = next(self._seq)
                first = first or seq
                last = full and index == len(pieces) - 1
                message = Tally(name, self._incarnation, seq, first if last else 0, count, payload)
                await link.send(message, time_limit=SEND_LIMIT)
        except HandoffError as exc:
            synced.discard(origin)  # what it missed comes with a full report
            logger.debug("could not report %r to %s: %s", name, peer.name, exc)
            return
        if full and self._lives.get(peer.name, 0) == life:
            synced.add(origin)  # (a link that went meanwhile: its successor gets a full)

    async def handle(self, peer: str, message: Tally) -> None:
        """Apply a peer's report (a malformed one is a :class:`ProtocolError`)."""
        tracked = self._tracked.get(message.namespace)
        adapter = tracked.adapter if tracked is not None else None
        if not isinstance(adapter, SupportsClusterScope) or adapter.tally_interval is None:
            logger.debug("%s reported %r, not cluster-scoped here", peer, message.namespace)
            return
        life = self._lives.get(peer, 0)
        try:
            records = await anyio.to_thread.run_sync(
                functools.partial(
                    self._codec.decode_records, message.payload, max_records=message.records
                )
            )
        except RecordDecodeError as exc:
            raise ProtocolError(f"Tally of {message.namespace!r}: {exc}") from exc
        if len(records) != message.records:
            raise ProtocolError(f"Tally says {message.records} records, holds {len(records)}")
        if self._lives.get(peer, 0) != life:
            return  # the link went while decoding: its report died with it
        origin = (peer, message.incarnation)
        refused = adapter.apply_tally(origin, message.seq, records, full_from=message.full_from)
        if refused:
            logger.warning(
                "%s reported %d unusable record(s) of %r", peer, refused, message.namespace
            )

    def peer_lost(self, peer: str) -> None:
        """``peer``'s link ended: forget what it reported; it gets a full report next."""
        self._lives[peer] = self._lives.get(peer, 0) + 1
        for synced in self._synced.values():
            for origin in [o for o in synced if o[0] == peer]:
                synced.discard(origin)
        for _tracked, adapter, _interval in self.scoped():
            adapter.forget(peer)
