"""The receiving side: accept offered namespaces, apply chunks, acknowledge them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import anyio

from handoff._adapter import ImportResult
from handoff._codec import Codec, gc_paused
from handoff._errors import NoTransformPath, ProtocolError
from handoff.engine._tracked import Tracked
from handoff.protocol import Accept, Ack, Cancel, Chunk, Done, End, Message, Offer, Refuse
from handoff.transforms import Chain, Transforms
from handoff.transport import PeerLink

__all__ = ("Receiver",)

logger = logging.getLogger("handoff.engine")

# Chunks a sender may have in flight per stream: enough to keep the link busy while one
# chunk is applied, small enough that the receiver's extra memory stays a few MiB.
INITIAL_CREDIT = 4


@dataclass(slots=True)
class _InStream:
    namespace: str
    tracked: Tracked
    chain: Chain | None
    expected: int
    received: int = 0
    next_seq: int = 0


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
        on_complete: Callable[[str, int], None],
        clock: Callable[[], float] = anyio.current_time,
        lock: AbstractContextManager[object] | None = None,
    ) -> None:
        self._node = node
        self._lock = lock if lock is not None else nullcontext()
        self._tracked = tracked
        self._transforms = transforms
        self._codec = codec
        self._accepting = accepting
        self._on_complete = on_complete
        self._clock = clock
        self._streams: dict[tuple[str, int], _InStream] = {}

    @property
    def active(self) -> int:
        """Streams being received now."""
        return len(self._streams)

    async def handle(self, peer: str, link: PeerLink, message: Message) -> None:
        """Handle an Offer, Chunk, End, Cancel or Done from ``peer``."""
        if isinstance(message, Offer):
            await self._offer(peer, link, message)
        elif isinstance(message, Chunk):
            await self._chunk(peer, link, message)
        elif isinstance(message, End):
            stream = self._streams.pop((peer, message.stream), None)
            if stream is None:
                raise ProtocolError(f"End for unknown stream {message.stream}")
            logger.info(
                "received %d records of %r from %s", stream.received, stream.namespace, peer
            )
        elif isinstance(message, Done):
            # Only now, not at the end of one namespace: the next one may be on its way.
            self._on_complete(peer, message.records)
        elif isinstance(message, Cancel):
            stream = self._streams.pop((peer, message.stream), None)
            if stream is not None:
                logger.info(
                    "%s cancelled %r after %d records: %s",
                    peer,
                    stream.namespace,
                    stream.received,
                    message.reason,
                )

    def peer_lost(self, peer: str) -> None:
        """Forget the streams of a peer whose link ended."""
        for key in [key for key in self._streams if key[0] == peer]:
            del self._streams[key]

    def _refusal(self, offer: Offer) -> tuple[str, Chain | None]:
        busy = self._accepting()
        if busy:
            return busy, None
        tracked = self._tracked.get(offer.namespace)
        if tracked is None:
            return f"{self._node} does not track {offer.namespace!r}", None
        if tracked.adapter.kind != offer.kind:
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

    async def _offer(self, peer: str, link: PeerLink, offer: Offer) -> None:
        key = (peer, offer.stream)
        if key in self._streams:
            raise ProtocolError(f"stream {offer.stream} offered twice")
        reason, chain = self._refusal(offer)
        if reason:
            logger.info("refused %r from %s: %s", offer.namespace, peer, reason)
            await link.send(Refuse(offer.stream, reason[:1024]))
            return
        tracked = self._tracked[offer.namespace]
        self._streams[key] = _InStream(offer.namespace, tracked, chain, offer.records)
        await link.send(Accept(offer.stream, INITIAL_CREDIT))

    async def _chunk(self, peer: str, link: PeerLink, chunk: Chunk) -> None:
        arrived = self._clock()
        stream = self._streams.get((peer, chunk.stream))
        if stream is None:
            # Cancelled or never offered: a late chunk after a Cancel is not an error.
            logger.debug("chunk for unknown stream %d from %s", chunk.stream, peer)
            return
        if chunk.seq != stream.next_seq:
            raise ProtocolError(f"chunk {chunk.seq} out of order (expected {stream.next_seq})")
        stream.next_seq += 1
        # Decoding and applying allocate a container per record: without the pause, the
        # collector would traverse the whole (large, growing) cache every 700 of them.
        with self._lock, gc_paused():
            result, dropped = self._apply(stream, chunk, arrived)
        stream.received += chunk.records
        await link.send(
            Ack(
                chunk.stream,
                chunk.seq,
                result.applied,
                result.kept_existing,
                tuple(sorted(dropped.items())),
                1,
            )
        )

    def _apply(
        self, stream: _InStream, chunk: Chunk, arrived: float
    ) -> tuple[ImportResult, dict[str, int]]:
        records = self._codec.decode_records(chunk.payload, max_records=chunk.records)
        if len(records) != chunk.records:
            raise ProtocolError(f"chunk says {chunk.records} records, holds {len(records)}")
        dropped: dict[str, int] = {}
        if stream.chain is not None:
            records, dropped = stream.chain.apply(records)
        age = chunk.age + (self._clock() - arrived)
        try:
            result = stream.tracked.adapter.import_records(records, age=age)
        except Exception as exc:
            # An adapter bug (or a user's merge function) must not take the node down: the
            # chunk is acknowledged as dropped, with the reason, and the next one may apply.
            logger.exception("applying %d records of %r failed", len(records), stream.namespace)
            result = ImportResult(dropped={f"import failed: {type(exc).__name__}": len(records)})
        for reason, count in result.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + count
        return result, dropped
