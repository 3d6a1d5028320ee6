"""The receiving side: accept offered namespaces, apply chunks, acknowledge them.

A node takes state only while it serves. When it starts to drain it refuses new offers
(the sender re-routes at once), lets the streams it already accepted finish
(:meth:`Receiver.settle`, bounded by its own deadline) and withdraws from those still open
(:meth:`Receiver.withdraw`): what was acknowledged is applied here and leaves with this
node's own drain; what was not, the sender takes back and sends elsewhere. So an
acknowledgement always means "applied by a node that keeps it or hands it on".
"""

from __future__ import annotations

import functools
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import anyio
import anyio.to_thread

from handoff._adapter import ImportResult, Record
from handoff._codec import Codec, gc_paused
from handoff._errors import HandoffError, NoTransformPath, PayloadRefused, ProtocolError
from handoff.engine._intake import admit, import_guarded
from handoff.engine._link import ANYIO_CLOCK, Clock, Link, carried_by
from handoff.engine._precopy import DELTA, apply_delta, split_kind, supports_delta
from handoff.engine._tracked import Tracked
from handoff.protocol import (
    Accept,
    Ack,
    Cancel,
    Chunk,
    Closed,
    Done,
    End,
    InboundStream,
    Message,
    Offer,
    Refuse,
    StreamState,
)
from handoff.transforms import Chain, Transforms

__all__ = ("Receiver",)

logger = logging.getLogger("handoff.engine")

# Chunks a sender may have in flight per stream: enough to keep the link busy while one
# chunk is applied, small enough that the receiver's extra memory stays a few MiB.
INITIAL_CREDIT = 4
MAX_ACK_REASONS = 64
# Streams one peer may have here at once, open or refused (a refused one is remembered
# until the link ends, to recognise what crossed the refusal): a sender streams one
# namespace at a time to each successor, so this is plenty, and a peer offering fresh
# stream ids cannot make the receiver keep more. Past it, offers are refused.
MAX_STREAMS_PER_PEER = 32
# Senders whose outcome (applied, kept, dropped) is summed until their Done: one entry per
# sender, the oldest forgotten past this many (a sender that never says Done).
MAX_OUTCOMES = 256
# Acks kept per stream to replay to a sender that lost its link: at least the chunks it
# can have unacknowledged (the credit this receiver grants: one per Ack, INITIAL_CREDIT at
# most in flight).
REPLAYED_ACKS = 2 * INITIAL_CREDIT
# Ownership streams whose link ended here, kept (their last Acks) for their sender's
# question on a new link; past this many, the oldest of the peer that holds the most is
# forgotten (the sender then re-sends what it did not see acknowledged, reported in doubt,
# as when a successor crashed). Every old node of a blue-green deploy splits its counters
# over the new ones, so one new node whose network blips loses the streams of all of them
# at once: a fleet of a few hundred fits. A few hundred bytes each (8 Acks, whose drop
# reasons are this node's own short texts).
MAX_LOST_STREAMS = 256


@dataclass(slots=True)
class _InStream:
    namespace: str
    tracked: Tracked
    chain: Chain | None
    machine: InboundStream
    link: Link
    delta: bool = False
    """A pre-copy's delta: records replace what this node holds (see ``_precopy``)."""
    acks: deque[Ack] = field(default_factory=lambda: deque(maxlen=REPLAYED_ACKS))
    """The last Acks sent, replayed if the sender asks on another link."""


def _wire_reasons(dropped: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    """Drop reasons as an Ack carries them: at most 64, each at most 255 characters."""
    merged: dict[str, int] = {}
    for reason, count in sorted(dropped.items(), key=lambda item: -item[1]):
        if len(merged) >= MAX_ACK_REASONS - 1 and reason[:255] not in merged:
            reason = "other reasons"
        merged[reason[:255]] = merged.get(reason[:255], 0) + count
    return tuple(sorted(merged.items()))


class Receiver:
    """Applies incoming streams for one node. All methods run on the node's event loop."""

    def __init__(
        self,
        *,
        node: str,
        tracked: Mapping[str, Tracked],
        transforms: Transforms,
        codec: Codec,
        accepting: Callable[[], str | None],
        on_complete: Callable[[str, int, ImportResult], None],
        clock: Clock = ANYIO_CLOCK,
        lock: AbstractContextManager[object] | None = None,
    ) -> None:
        """``accepting()`` returns why offers are refused now ("" or None: they are not).
        ``on_complete(peer, records, outcome)`` is called at a sender's Done, with what
        became of the records this node applied from it since its previous Done."""
        self._node = node
        self._lock = lock if lock is not None else nullcontext()
        self._tracked = tracked
        self._transforms = transforms
        self._codec = codec
        self._accepting = accepting
        self._on_complete = on_complete
        self._clock = clock
        # Streams withdrawn by this node stay here (finished) until their peer goes, so
        # that chunks and an End that crossed the withdrawal on the wire are recognised.
        self._streams: dict[tuple[str, int], _InStream] = {}
        self._outcomes: dict[str, ImportResult] = {}
        # Ownership streams whose link ended while their sender may still run, or that it
        # cancelled (the answer may be lost with the link): the Acks it may have missed,
        # by (peer, stream), for its question (see _answer_lost).
        self._lost: dict[tuple[str, int], tuple[Ack, ...]] = {}
        self._changed = anyio.Event()

    @property
    def active(self) -> int:
        """Streams being received now (offered or open)."""
        return sum(1 for s in self._streams.values() if not s.machine.state.finished)

    def streams_with(self, peer: str) -> bool:
        """Whether a stream from ``peer`` is being received now (offered or open), or what
        was applied from it awaits its Done (which comes on the streams' link)."""
        return peer in self._outcomes or any(
            name == peer and not stream.machine.state.finished
            for (name, _), stream in self._streams.items()
        )

    async def handle(self, peer: str, link: Link, message: Message) -> None:
        """Handle an Offer, Chunk, End, Cancel or Done from ``peer``."""
        if isinstance(message, Offer):
            await self._offer(peer, link, message)
        elif isinstance(message, Chunk):
            await self._chunk(peer, link, message)
        elif isinstance(message, Done):
            # Only now, not at the end of one namespace: the next one may be on its way.
            self._on_complete(peer, message.records, self._outcomes.pop(peer, ImportResult()))
        elif isinstance(message, End | Cancel):
            key = (peer, message.stream)
            stream = self._streams.get(key)
            if stream is None:
                if isinstance(message, End):
                    raise ProtocolError(f"End for unknown stream {message.stream}")
                await self._answer_lost(key, link)
                return
            if not stream.machine.receive(message):
                if (
                    isinstance(message, Cancel)
                    and link != stream.link
                    and stream.tracked.adapter.moves_ownership
                ):
                    # Withdrawn here, and the sender asks on a new link (it lost the old
                    # one, this node has not noticed yet): the Acks and the Refuse on the
                    # old link may never reach it. Nothing is applied after a withdrawal.
                    await self._answer(key, tuple(stream.acks), link)
                return  # crossed this node's withdrawal: already handled
            del self._streams[key]
            self._changed.set()
            if stream.machine.state is StreamState.CANCELLING:
                if link != stream.link:
                    # The sender asks on a new link (it lost the stream's): the Acks on the
                    # old one may never reach it, so they precede the Closed here too.
                    for ack in stream.acks:
                        await link.send(ack)
                # After the Acks of every chunk applied here (none is applied from now on):
                # the sender learns exactly which of its chunks count here.
                closed = Closed(message.stream)
                stream.machine.send(closed)
                if stream.tracked.adapter.moves_ownership:
                    # The Acks and this Closed may never reach the sender (it cancelled a
                    # stalled stream: its link may be about to end): kept for its question
                    # on a new link, as when the link ends under an open stream.
                    self._keep_lost(key, stream.acks)
                await link.send(closed)
            if isinstance(message, End):
                # A delta may be one batch of a live stream, every few milliseconds.
                (logger.debug if stream.delta else logger.info)(
                    "received %d records of %r from %s",
                    stream.machine.records,
                    stream.namespace,
                    peer,
                )
            else:
                logger.info(
                    "%s cancelled %r after %d records: %s",
                    peer,
                    stream.namespace,
                    stream.machine.records,
                    message.reason,
                )

    def peer_lost(self, peer: str) -> None:
        """Forget the streams of a peer whose link ended (an ownership stream's last Acks
        are kept for the sender's question on a new link, see :meth:`_answer_lost`)."""
        self.link_lost(peer, None)

    def link_lost(self, peer: str, link: object | None) -> None:
        """Forget the streams of ``peer`` that ran on ``link`` (all of them if ``None``):
        it ended (a duplicate link kept up for them, see ``Mesh._retire``, that failed)."""
        for key in [
            key
            for key, stream in self._streams.items()
            if key[0] == peer and (link is None or carried_by(stream.link, link))
        ]:
            stream = self._streams.pop(key)
            machine = stream.machine
            # Ends the stream here too: a chunk still being decoded sees it is no longer
            # open and applies nothing (its sender re-sends what it did not see acknowledged).
            was_open = machine.fail("the link to the sender ended")
            if not stream.tracked.adapter.moves_ownership:
                continue
            self._keep_lost(key, stream.acks)
            if was_open and machine.records:
                # The sender cannot know which of the last chunks were applied here: it
                # asks on a new link (the Acks kept here answer it); if it cannot, it
                # re-sends them elsewhere and they count in both places. Its report counts
                # them as in doubt; this line says where the other copy is.
                logger.warning(
                    "the link to %s ended during its handoff of %r (%d records received "
                    "here): unless it reconnects and asks what was applied here, what it "
                    "had not seen acknowledged may be re-sent elsewhere, and count twice",
                    peer,
                    stream.namespace,
                    machine.records,
                )
        self._changed.set()

    def _keep_lost(self, key: tuple[str, int], acks: Iterable[Ack]) -> None:
        """Keep the last Acks of ownership stream ``key`` for its sender's question."""
        if key not in self._lost and len(self._lost) >= MAX_LOST_STREAMS:
            self._forget_lost()
        self._lost[key] = tuple(acks)

    def _forget_lost(self) -> None:
        """Make room in the kept lost streams: forget the oldest of the peer that holds
        the most. Oldest of all, a peer that keeps losing streams (hostile, or a link that
        flaps) would push out every other sender's, whose questions would then go
        unanswered (their chunks re-sent in doubt, counted twice)."""
        held = Counter(peer for peer, _ in self._lost)
        most = max(held.values())
        del self._lost[next(key for key in self._lost if held[key[0]] == most)]

    async def _answer_lost(self, key: tuple[str, int], link: Link) -> None:
        """A Cancel of a stream whose link ended here (or that was cancelled and
        answered already): its sender lost the link too, and asks on a new one which
        chunks were applied. The kept Acks, then a Closed (nothing
        else was applied, nor will be) let it re-send exactly the rest. A stream not kept
        (forgotten, or never an ownership stream) gets no answer: its sender's question
        times out and it re-sends what it did not see acknowledged, as in doubt. Kept after
        the answer: the sender asks again if the answer's link is closed under it (two
        links at once, one closed by the tie-break); a late repeat it ignores."""
        acks = self._lost.get(key)
        if acks is not None:
            await self._answer(key, acks, link)

    async def _answer(self, key: tuple[str, int], acks: Iterable[Ack], link: Link) -> None:
        """Tell the sender of stream ``key`` which of its chunks were applied here: the
        Acks kept, then a Closed (nothing else was applied, nor will be)."""
        for ack in acks:
            await link.send(ack)
        await link.send(Closed(key[1]))
        logger.info(
            "told %s which chunks of its stream %d were applied here (its link had ended)",
            key[0],
            key[1],
        )

    async def settle(self, until: float) -> bool:
        """Wait until no stream is being received, or until ``until``. True if none is."""
        while self.active:
            if self._clock.now() >= until:
                return False
            self._changed = anyio.Event()
            await self._clock.wait(self._changed, until)
        return True

    async def withdraw(self, reason: str, until: float) -> int:
        """Stop every stream still being received: the senders take back what this node
        has not acknowledged. Returns how many streams were withdrawn. Each sender is told
        at the same time and within ``until``: one that stopped reading loses its link
        instead (and re-routes for that reason), it cannot hold this node's drain."""
        withdrawn: list[tuple[str, _InStream, Refuse]] = []
        for (peer, _), stream in self._streams.items():
            if stream.machine.state.finished:
                continue
            refusal = Refuse(stream.machine.stream, reason[:1024])
            stream.machine.send(refusal)
            withdrawn.append((peer, stream, refusal))
            logger.info(
                "withdrew from %r of %s after %d records: %s",
                stream.namespace,
                peer,
                stream.machine.records,
                reason,
            )
        self._changed.set()

        async def tell(peer: str, link: Link, refusal: Refuse) -> None:
            try:
                await link.send(refusal, time_limit=max(0.0, until - self._clock.now()))
            except HandoffError as exc:
                logger.debug("could not tell %s about the withdrawal: %s", peer, exc)

        async with anyio.create_task_group() as group:
            for peer, stream, refusal in withdrawn:
                group.start_soon(tell, peer, stream.link, refusal)
        return len(withdrawn)

    def _refusal(self, offer: Offer) -> tuple[str, Chain | None]:
        busy = self._accepting()
        if busy:
            return busy, None
        tracked = self._tracked.get(offer.namespace)
        if tracked is None:
            return f"{self._node} does not track {offer.namespace!r}", None
        kind, mode = split_kind(offer.kind)
        if mode and not supports_delta(tracked.adapter):
            return (
                f"{self._node} cannot apply a pre-copy of {offer.namespace!r} (its adapter "
                "does not apply deltas)"
            ), None
        if tracked.adapter.kind != kind:
            return (
                f"{self._node} holds {offer.namespace!r} as {tracked.adapter.kind!r} state, "
                f"the sender as {offer.kind!r}"
            ), None
        if offer.version > tracked.version:
            return (
                f"the sender offers {offer.namespace!r} at version {offer.version}, "
                f"{self._node} holds version {tracked.version}: the newer side must "
                f"downgrade (@node.downgrade({offer.namespace!r}, {offer.version}))"
            ), None
        if offer.version == tracked.version:
            return "", None
        try:
            chain = self._transforms.path(offer.namespace, offer.version, tracked.version)
        except NoTransformPath as exc:
            return str(exc), None
        return "", chain

    async def _offer(self, peer: str, link: Link, offer: Offer) -> None:
        key = (peer, offer.stream)
        if key in self._streams:
            raise ProtocolError(f"stream {offer.stream} offered twice")
        # A stream id reused (the sender restarted): what was kept of the former is stale.
        self._lost.pop(key, None)
        machine = InboundStream(offer)
        held = sum(1 for other, _ in self._streams if other == peer)
        if held >= MAX_STREAMS_PER_PEER:
            reason, chain = (
                (
                    f"{self._node} already holds {held} streams of {peer} (open or refused): "
                    f"the limit is {MAX_STREAMS_PER_PEER}"
                ),
                None,
            )
        else:
            reason, chain = self._refusal(offer)
        if reason:
            logger.info("refused %r from %s: %s", offer.namespace, peer, reason)
            refusal = Refuse(offer.stream, reason[:1024])
            machine.send(refusal)
            await link.send(refusal)
            return
        tracked = self._tracked[offer.namespace]
        delta = split_kind(offer.kind)[1] == DELTA
        self._streams[key] = _InStream(offer.namespace, tracked, chain, machine, link, delta)
        self._changed.set()
        accept = Accept(offer.stream, INITIAL_CREDIT)
        machine.send(accept)
        await link.send(accept)

    async def _chunk(self, peer: str, link: Link, chunk: Chunk) -> None:
        arrived = self._clock.now()
        stream = self._streams.get((peer, chunk.stream))
        if stream is None:
            # Cancelled or never offered: a late chunk after a Cancel is not an error.
            logger.debug("chunk for unknown stream %d from %s", chunk.stream, peer)
            return
        if not stream.machine.receive(chunk):
            return  # crossed this node's withdrawal: the sender takes it back
        try:
            records = await self._decode(chunk)
        except PayloadRefused as exc:
            if stream.machine.state is StreamState.OPEN:
                await self._refuse_stream(peer, stream, f"chunk {chunk.seq} refused: {exc}")
            return
        if stream.machine.state is not StreamState.OPEN:
            # This node withdrew (or the link went) while the chunk was decoded: nothing of
            # it is applied, and the sender takes it back as it does every unacknowledged one.
            return
        # Applying allocates a container per record: without the pause, the collector
        # would traverse the whole (large, growing) cache every 700 of them.
        with self._lock, gc_paused():
            result, dropped = self._apply(stream, records, chunk, arrived)
        self._note_outcome(peer, ImportResult(result.applied, result.kept_existing, dropped))
        # No await between applying and queueing the Ack: a withdrawal cannot slip in and
        # make the sender re-route records that are already applied here.
        ack = Ack(
            chunk.stream,
            chunk.seq,
            result.applied,
            result.kept_existing,
            _wire_reasons(dropped),
            1,
        )
        stream.machine.send(ack)
        stream.acks.append(ack)
        await link.send(ack)

    def _note_outcome(self, peer: str, outcome: ImportResult) -> None:
        previous = self._outcomes.pop(peer, None)
        if previous is None and len(self._outcomes) >= MAX_OUTCOMES:
            del self._outcomes[next(iter(self._outcomes))]
        self._outcomes[peer] = outcome if previous is None else previous + outcome

    async def _refuse_stream(self, peer: str, stream: _InStream, reason: str) -> None:
        """Refuse an open stream: nothing of the chunk was applied, and the sender takes
        back every record not acknowledged (it sees the reason). The link stays up: a
        well-formed chunk past a bound is no broken protocol, and heartbeats go on."""
        logger.warning("refused %r from %s: %s", stream.namespace, peer, reason)
        refusal = Refuse(stream.machine.stream, reason[:1024])
        stream.machine.send(refusal)
        self._changed.set()
        await stream.link.send(refusal)

    async def _decode(self, chunk: Chunk) -> list[Record]:
        # In a worker thread: a chunk's decoding is bounded (the codec refuses hash floods
        # and decode bombs) but a large hostile one still takes a second or more to refuse,
        # and on the event loop that second would stop every heartbeat of this node. The
        # thread shares the interpreter, so the loop still gets its turn every few ms.
        records = await anyio.to_thread.run_sync(
            functools.partial(self._codec.decode_records, chunk.payload, max_records=chunk.records)
        )
        if len(records) != chunk.records:
            raise ProtocolError(f"chunk says {chunk.records} records, holds {len(records)}")
        return records

    def _apply(
        self, stream: _InStream, records: list[Record], chunk: Chunk, arrived: float
    ) -> tuple[ImportResult, dict[str, int]]:
        age = chunk.age + (self._clock.now() - arrived)
        if stream.delta:
            return apply_delta(stream.tracked, stream.chain, records, age=age)
        records, dropped = admit(stream.tracked, stream.chain, records)
        result = import_guarded(stream.tracked, records, age=age)
        for reason, count in result.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + count
        return result, dropped
