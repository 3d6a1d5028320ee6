"""The draining side: stream every tracked namespace to successors, or snapshot it.

Per namespace: offer it to the best tier of serving peers (newer release first), split keys
across those that accept by rendezvous hashing, and send chunks as their credit allows. A
chunk's records stay in memory until the successor acknowledges them; if it goes down, they
and everything still queued for it go to the remaining successors, then to the next tier.
A successor that stops answering while another of its tier answers (no Accept, Ack or credit
for the stall time, :data:`STALL_SHARE`) is treated the same way: its stream is cancelled,
and acknowledgements it sends after that are late and count for nothing.
What is left at the deadline, or with nobody to take it, goes to the snapshot store if there
is one, and is otherwise counted as dropped. Memory held at any time is bounded by the
successors' credit times the chunk size (and, with spread ``all``, each one's backlog),
whatever the size of the state.

Each link's messages are written by a task of its own (:class:`_Writer`), in order: a write
that blocks (a successor partitioned away, its socket buffers full) holds back that link
only; the drain waits at most :data:`WRITE_PATIENCE` for each write, and the successor then
stalls like one that stops answering. Chunks its writer never began are bound to nobody
and go elsewhere; the one it was writing follows the rules below. Chunks are sized per
successor by the rate its Acks come back at (:data:`CHUNK_SECONDS`), within the cap above,
and a stream gets no chunk its link's observed rate cannot carry before the streaming time
ends, nor more in flight than its Acks return within half the stall time
(:meth:`Drainer._room`): a slow link gets small chunks that complete, and its Acks keep it
from counting as stalled; a receiver whose cost is per chunk keeps full-sized chunks.

State that moves ownership (counters, actors) must arrive exactly once, so a chunk sent to
a successor stays bound to it until its fate is known: acknowledged (applied there),
refused or withdrawn (not applied: the receiver's Acks precede its Refuse on the wire), or
cancelled and confirmed (the receiver's Closed follows the Acks of what it applied). Only
then does the rest go elsewhere. A successor whose link ends first may still run: for the
stall time the drain waits for it on a new link and asks which chunks it applied (a Cancel
of the stream there; the receiver replays the Acks it kept and a Closed). Not back in time,
it is presumed crashed, taking what it applied with it: its unacknowledged chunks are
re-sent and counted in the report as ``in_doubt`` (exact if it crashed, twice if it still
runs behind a longer partition). A
chunk still bound at the deadline is reported as of unknown outcome, never re-sent nor
snapshotted; what nobody received at all is given back to the adapter. If the successor
answers later (the node runs on after a manual drain), what it says it did not apply is
given back too, and leaves with the catch-up.

Spread ``all`` (caches and mappings only, see :attr:`Tracked.effective_spread`): every
record goes to every successor of the tier, each successor's stream carrying the same
records in the same (hottest-first) order, at its own pace: a successor slower than
another of its tier gets records queued up to its backlog (:data:`BACKLOG_BYTES`), then
skips batches until it has room again (see :meth:`Drainer._copy_to_all`). A record counts
once, as acknowledged by the first successor that acknowledges it; while it is
unacknowledged the drain knows how many streams still carry it (pending or in flight), and
only when the last of them lets it go (failed, withdrawn, stalled, a chunk it could not
encode) is it re-sent (to the streams still open, then the next tier), snapshotted or
counted as dropped. So a successor that dies mid-stream costs nothing while another one
holds the same records. A chunk of the same records is encoded once for all successors
that read the same version (within :data:`ENCODED_BYTES` of recent chunks).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import anyio
import anyio.abc
import anyio.lowlevel

from handoff._adapter import Record, SupportsGiveBack
from handoff._codec import Codec, gc_paused
from handoff._errors import HandoffError, NoTransformPath, ProtocolError, SnapshotError
from handoff.engine._fingerprint import SCAN_PAUSE, ChangedRecords, ExportLog
from handoff.engine._link import ANYIO_CLOCK, Clock, Link, carried_by, transport_of
from handoff.engine._planner import Router, successor_tiers
from handoff.engine._report import DrainReport, NamespaceReport
from handoff.engine._tracked import ALL, Tracked
from handoff.membership import Peer
from handoff.protocol import (
    Accept,
    Ack,
    Cancel,
    Chunk,
    Closed,
    Done,
    End,
    Message,
    Offer,
    OutboundStream,
    Refuse,
    StreamState,
)
from handoff.snapshot import MAX_CHUNK as MAX_SNAPSHOT_CHUNK
from handoff.snapshot import SnapshotStore, SnapshotWriter
from handoff.transforms import Chain, Transforms

__all__ = ("Drainer",)

logger = logging.getLogger("handoff.engine")

TARGET_CHUNK_BYTES = 1024 * 1024
MAX_CHUNK_BYTES = 4 * 1024 * 1024
# Chunks are sized per successor by how fast its Acks come back, like TCP's slow start: a
# stream starts with chunks of START_CHUNK_BYTES, and only that many bytes unacknowledged
# until its first Ack. A chunk acknowledged within CHUNK_SECONDS lets the next ones be twice
# its size; one that took over twice that halves them, at most down to what the link carries
# in CHUNK_SECONDS and never below START_CHUNK_BYTES (only the deadline trims a chunk
# further); always between MIN_CHUNK_BYTES and TARGET_CHUNK_BYTES. A fast link soon
# gets full-sized chunks; a slow one small chunks, each acknowledged in a fraction of the
# drain, instead of one chunk that cannot be written before the deadline (the write times
# out, the link closes, and even the Acks already on their way are lost with it).
START_CHUNK_BYTES = 64 * 1024
MIN_CHUNK_BYTES = 8 * 1024
CHUNK_SECONDS = 0.25
# Small, to learn the records' size before sizing chunks by bytes: large values must not
# make the first chunk huge.
FIRST_CHUNK_RECORDS = 16
MAX_CHUNK_RECORDS = 8192
# Share of the drain timeout kept at least for writing the snapshot when a store is
# configured; more (up to SNAPSHOT_RESERVE_CAP, so that a successor still gets its share) when
# the records not yet acknowledged would take longer to snapshot at the measured cost (see
# snapshot_reserve).
SNAPSHOT_RESERVE = 0.25
SNAPSHOT_RESERVE_CAP = 0.5
# A snapshot record costs its encoding (measured while streaming, under the box's load of
# the moment) and its write (msgpack chunks written by a thread): counted as twice the
# encoding.
SNAPSHOT_COST_FACTOR = 2.0
CATCH_UP = "catch-up"
OUTCOME_UNKNOWN = (
    "outcome unknown: sent to {peer}, which neither acknowledged nor refused it in time"
)
STOPPED = "stopped"
NOT_CHECKED = "deadline: not checked for changes since the drain (may be unchanged)"
KEPT_OLDER = "written after the drain, the successor kept its older copy"
# The clock the encoding's cost is measured by (CPU work: real seconds; tests replace it).
_cpu_clock: Callable[[], float] = time.perf_counter
# Seconds (at most) kept at the end of a drain to cancel the streams still open.
CANCEL_RESERVE = 0.1
# A successor that owes the drain an answer (to its offer, an acknowledgement, credit) and
# gives none for this share of the drain's time is stalled: its process paused, or a peer
# that holds credit. While another successor of its tier answers, its stream is cancelled
# and what it did not acknowledge goes to the others, as when a successor goes down;
# otherwise the drain would wait for it until the heartbeat timeout drops its link, which
# the drain's time may not even cover (3 s by default, a Fly drain has 4). The floor spares
# a busy but healthy successor (a collection pause, a large chunk to apply); the ceiling is
# the default heartbeat timeout, past which a silent peer counts as down anyway.
STALL_SHARE = 0.2
STALL_FLOOR = 0.5
STALL_CEILING = 3.0
# How many times a namespace is offered again to a successor whose stream ended with its
# link while the successor stayed linked (a duplicate link closed under it): bounded, so
# that links that keep failing cannot hold the drain in a loop.
MAX_RELINKS = 2
# How often a drain looks whether a successor's replacement link arrived.
RELINK_POLL = 0.02
# Seconds the drain waits for a message it queued to be written before it carries on. A
# healthy link's socket takes a write at once, so the drain keeps its order of events (an
# answer that a written message brings comes before the drain's next step); a link whose
# buffers are full (a peer partitioned away) holds the drain back at most this long per
# message, while the write goes on in the link's writer until its own time limit.
WRITE_PATIENCE = 0.05
# Spread ``all``: records that wait on a successor's stream because it is slower than
# another of its tier are at most what its link carries by the end of the streaming time,
# within BACKLOG_BYTES (the drain holds no more for it: it skips batches, see
# Drainer._copy_to_all), and at least BACKLOG_CHUNKS of its chunks: not 1, so that a fast
# successor waiting for an Ack while a slow one has room does not skip.
BACKLOG_BYTES = MAX_CHUNK_BYTES
BACKLOG_CHUNKS = 2
# Spread ``all``: bytes of the latest chunks' encodings kept for the other successors that
# get the same chunks. Not only the last chunk: each successor sends at its own pace, so one
# may be several chunks ahead of another (within its backlog).
ENCODED_BYTES = BACKLOG_BYTES
# Seconds between two questions to a successor whose link ended (see Drainer.on_peer_up),
# once it came back: two nodes that dial each other at once make two links, and a question
# sent on the one the tie-break closes may never be read; the next goes on the link kept.
ASK_AGAIN = 0.2


@dataclass(slots=True)
class _Pending:
    records: list[Record] = field(default_factory=list)
    pulled_at: float = 0.0


@dataclass(slots=True)
class _OutStream:
    peer: Peer
    link: Link
    machine: OutboundStream
    version: int
    chain: Chain | None
    pending: _Pending = field(default_factory=_Pending)
    inflight: dict[int, tuple[list[Record], float]] = field(default_factory=dict)
    """The records of chunks sent and not acknowledged, kept to send elsewhere."""
    acknowledged: int = 0
    ownership: bool = False
    """The namespace moves ownership: unacknowledged chunks stay bound to this successor
    until their fate is known (see the module documentation)."""
    link_lost: bool = False
    """The stream failed because its link ended (the successor is presumed crashed)."""
    asking_until: float = -math.inf
    """Ownership, its link lost with chunks unacknowledged: until then (or an answer) the
    drain waits for the successor to come back on a new link and say which it applied
    (see :meth:`Drainer.on_peer_up`); its chunks stay bound meanwhile."""
    answered: bool = False
    """The successor answered on a new link: the chunks still in flight were not applied."""
    asked_at: float = -math.inf
    """When the question was last sent (see :data:`ASK_AGAIN`)."""
    doubtful: bool = False
    """It failed with chunks of ownership state unacknowledged: the successor may hold
    them, so it is not offered the namespace again (they would count twice)."""
    progress_at: float = 0.0
    """When the successor last answered on this stream, or the drain began to wait on it."""
    report: NamespaceReport | None = None
    sizes: dict[int, tuple[int, float]] = field(default_factory=dict)
    """Of the chunks in :attr:`inflight`: their encoded bytes, and when they were queued."""
    chunk_bytes: int = START_CHUNK_BYTES
    """The size its next chunk aims at (see :data:`CHUNK_SECONDS`)."""
    seconds_per_byte: float = math.nan
    """Its link's observed time per acknowledged byte; NaN before the first Ack."""
    recent_bytes: float = 0.0
    recent_seconds: float = 0.0
    """Bytes acknowledged and the time they took, older Acks weighing less: their ratio
    is :attr:`seconds_per_byte`, by bytes (a small chunk's round trip says little)."""
    last_ack_at: float = -math.inf
    last_sample: tuple[int, float] | None = None
    """The bytes and time of the chunk acknowledged last (see :meth:`Drainer._learn_rate`)."""
    fixed_seconds: float = math.nan
    marginal_seconds_per_byte: float = math.nan
    """Its link's cost as ``fixed + bytes x marginal`` per chunk, fitted from the last two
    Acks of chunks of different sizes; NaN until then. A receiver whose cost is per chunk
    (a slow apply) has a large fixed part, a slow link a large marginal one: only the
    second is helped by smaller chunks."""
    full: bool = False
    """Its link cannot carry another chunk before the streaming time ends: it gets no more
    (what it holds in flight may still be acknowledged)."""

    @property
    def unacked_bytes(self) -> int:
        return sum(size for size, _ in self.sizes.values())

    @property
    def stream(self) -> int:
        return self.machine.stream

    @property
    def state(self) -> StreamState:
        return self.machine.state

    @property
    def credit(self) -> int:
        return self.machine.credit

    @property
    def sent_records(self) -> int:
        return self.machine.records


@dataclass(slots=True)
class _Owed:
    """Spread ``all``: a record no successor acknowledged yet, and how many streams carry
    it (pending or in flight)."""

    record: Record
    carriers: int = 0


@dataclass(eq=False, slots=True)
class _Writer:
    """Writes one link's messages of this drain, in order, in a task of its own: a write
    that blocks (a successor partitioned away with full socket buffers) holds back only the
    streams on that link, never the drain nor the other successors. Its queue is bounded by
    the streams' credit (chunks) and a few control messages per stream."""

    link: Link
    queue: deque[tuple[_OutStream | None, Message, float, anyio.Event]] = field(
        default_factory=deque
    )
    """``(stream, message, until, written)``; ``stream`` is None for a :class:`Done`; the
    event is set once the message is written (or given up)."""
    more: anyio.Event = field(default_factory=anyio.Event)
    closing: bool = False


def _take_replayed(stream: _OutStream, ack: Ack) -> list[Record] | None:
    """The records of the chunk a replayed ``ack`` (an answer on a new link) says was
    applied, taken off the stream; None if it was acknowledged before the link ended."""
    entry = stream.inflight.get(ack.seq)
    if entry is None:
        return None
    # The stream's machine, ended with its link, checks no Ack any more: an answer that
    # does not add up is the protocol error it is on a live stream (the link drops; the
    # chunk stays unanswered, and in doubt if it stays so).
    outcome = ack.applied + ack.kept + sum(n for _, n in ack.dropped)
    if outcome != len(entry[0]):
        raise ProtocolError(
            f"stream {stream.stream}: replayed Ack of chunk {ack.seq} accounts for "
            f"{outcome} records, the chunk held {len(entry[0])}"
        )
    del stream.inflight[ack.seq]
    stream.sizes.pop(ack.seq, None)
    return entry[0]


def _none_asking(streams: list[_OutStream]) -> bool:
    """Whether none of ``streams`` awaits its successor's answer on a new link."""
    return all(stream.asking_until == -math.inf for stream in streams)


def _pull_until_pause(records: Iterator[Record], size: int) -> tuple[list[Record], bool]:
    """Up to ``size`` records, stopping early at a :data:`SCAN_PAUSE`; and whether
    ``records`` ran out."""
    batch: list[Record] = []
    for record in records:
        if record is SCAN_PAUSE:
            return batch, False
        batch.append(record)
        if len(batch) == size:
            return batch, False
    return batch, True


class Drainer:
    """Runs one drain. The node feeds it the Accept/Refuse/Ack messages of its streams."""

    def __init__(
        self,
        *,
        node: str,
        release: str,
        cluster: str,
        tracked: Mapping[str, Tracked],
        transforms: Transforms,
        codec: Codec,
        snapshots: SnapshotStore | None,
        peers: Callable[[], Sequence[tuple[Peer, Link]]],
        clock: Clock = ANYIO_CLOCK,
        wall_clock: Callable[[], float] = time.time,
        max_frame: int = 8 * 1024 * 1024,
        lock: AbstractContextManager[object] | None = None,
        progress: Callable[[NamespaceReport], None] | None = None,
        reason: str = "drain",
        started_at: float = 0.0,
        fingerprints: bool = False,
        sources: Mapping[str, Callable[[], Iterator[Record]]] | None = None,
        stream_ids: Iterator[int] | None = None,
        kinds: Mapping[str, str] | None = None,
        pace: float | None = None,
        skip: Mapping[str, frozenset[str]] | None = None,
        exclude: frozenset[str] = frozenset(),
        chunk_bytes: int | None = None,
        relinking: Callable[[str], bool] = lambda peer: False,
    ) -> None:
        """``progress(report)`` is called with the namespace's report (updated in place)
        after each acknowledgement and when the namespace is done; it must not block.
        ``started_at`` (this node's start, wall clock) orders successors whose release
        names do not compare with this node's. ``reason`` names the drain in its report
        ("drain", or "catch-up" for records written after a drain: there a record the
        successor did not apply because it held the key is reported as lost, since the
        successor's copy is the older one). With ``fingerprints`` the drain logs what
        it exported (:attr:`exported`, an :class:`ExportLog` per namespace) for a later
        catch-up to send what it lacks: what changed since, and what a deadline left
        unexported; ``sources`` replaces the export of the namespaces it names
        (and limits the drain to them). ``stream_ids`` numbers the streams: pass the
        node's own counter, so that a later drain (the catch-up) never offers a stream
        id that a receiver may still hold from an earlier one. ``kinds`` replaces the
        kind offered for the namespaces it names (a pre-copy's ``<kind>+delta``, see
        ``_precopy``). ``pace`` (bytes per second, all streams together) spaces the
        chunks of a drain that runs while the node serves (a pre-copy), so that encoding
        and sending take only a share of its time. ``skip`` names, per namespace, peers
        that are not to get it (they took it by pre-copy); ``exclude`` namespaces not to
        drain at all (every successor took them so). ``chunk_bytes`` caps the size chunks
        grow to by their Acks (see :meth:`_learn_rate`): the event loop is busy for one
        chunk at a time (pulling, encoding, encrypting), so a drain that runs beside
        serving (a pre-copy) keeps it small, and then yields to the loop before each chunk
        (default: :data:`TARGET_CHUNK_BYTES`, no yield). ``relinking(peer)`` says whether
        a link to ``peer`` is being replaced (it is briefly absent from ``peers``): a
        successor whose stream ended with its link is offered the namespace again once it
        is back (see :meth:`_relinked`)."""
        self._skip = skip if skip is not None else {}
        self._relinking = relinking
        self._relinks: dict[str, int] = {}
        self._exclude = exclude
        self._stopped = False
        if pace is not None and not pace > 0:
            raise ValueError(f"pace must be a positive number of bytes per second, not {pace!r}")
        self._kinds = kinds if kinds is not None else {}
        self._pace = pace
        self._chunk_bytes = chunk_bytes
        self._paced_bytes = 0
        self._paced_from = math.nan
        self.exported: dict[str, ExportLog] = {}
        self.late: list[tuple[str, Link, Cancel | End]] = []
        """Cancels and Ends the deadline left no time for: ``(peer, link, message)``, for
        the node to send once the drain is over."""
        self._keep_fingerprints = fingerprints
        self._sources = sources
        self._lock = lock if lock is not None else nullcontext()
        self._progress = progress
        self._node = node
        self._release = release
        self._cluster = cluster
        self._tracked = tracked
        self._transforms = transforms
        self._codec = codec
        self._snapshots = snapshots
        self._peers = peers
        self._clock = clock
        self._wall_clock = wall_clock
        self._reason = reason
        self._started_at = started_at
        self._max_chunk_bytes = min(MAX_CHUNK_BYTES, max_frame - 1024)
        self._stream_ids = stream_ids if stream_ids is not None else itertools.count(1)
        self._streams: dict[tuple[str, int], _OutStream] = {}
        self._changed = anyio.Event()
        self._bytes_per_record = 0.0
        # Seconds of CPU an encoded record took while streaming (0: not measured yet).
        self._encode_seconds_per_record = 0.0
        self._time_limit = 0.0
        self._stall_after = STALL_CEILING
        self._tier: list[_OutStream] = []
        """The streams of the tier the current namespace goes to: each other's fallback."""
        self._deadline = math.inf
        self._namespace: Tracked | None = None
        self._given_back = 0
        self._everywhere = False
        """The current namespace goes to every successor (spread ``all``)."""
        self._owed: dict[int, _Owed] = {}
        """Spread ``all``: the records no successor acknowledged yet, by ``id(record)``."""
        self._encoded: dict[
            tuple[int, ...], tuple[list[Record], bytes, list[tuple[Record, str]]]
        ] = {}
        """Spread ``all``: the latest chunks encoded (:data:`ENCODED_BYTES` of them), by
        their records' identities (the records kept alive so that their identities stay
        theirs), for the other successors that get the same chunk."""
        self._encoded_bytes = 0
        self._writers: dict[int, _Writer] = {}
        """One writer per link (by ``id``), started by the first message for it."""
        self._group: anyio.abc.TaskGroup | None = None
        self._unresolved: dict[tuple[str, int], Tracked] = {}
        """Cancelled ownership streams whose chunks the end of their namespace reported as
        of unknown outcome: the successor's late answer (after the namespace, or after the
        drain when the node runs on) still tells which it did not apply, to give back."""
        self._ask_late: set[tuple[str, int]] = set()
        """Of :attr:`_unresolved`, those whose link ended: asked on the next (see
        :meth:`late_questions`)."""

    def stop(self) -> None:
        """End the drain early (a pre-copy when the node starts draining): the streams
        open are cancelled, and what was not acknowledged is reported as ``STOPPED``."""
        self._stopped = True
        self._changed.set()

    def offer_answered(self) -> bool:
        """Whether a successor answered an offer of this drain (accepted or refused)."""
        return any(s.state is not StreamState.OFFERED for s in self._streams.values())

    @property
    def unresolved(self) -> bool:
        """Whether a late answer may still give chunks back (see :meth:`on_message`)."""
        return bool(self._unresolved)

    # -- messages from the node -------------------------------------------------------------

    def on_message(self, peer: str, message: Message) -> None:
        """An Accept, Refuse, Ack or Closed from ``peer`` for one of this drain's streams."""
        if not isinstance(message, Accept | Refuse | Ack | Closed):
            return
        stream = self._streams.get((peer, message.stream))
        if stream is None:
            logger.debug("%s answered unknown stream %d", peer, message.stream)
            return
        tracked = self._unresolved.get((peer, message.stream))
        if tracked is not None:
            self._late_answer(stream, tracked, message)
            return
        if stream.asking_until > -math.inf:
            self._recovered(stream, message)
            return
        if isinstance(message, Ack) and self._unwritten_chunk(stream, message.seq):
            # Its writer has not begun to write that chunk: the peer cannot have applied
            # it. Taken, the Ack would count it, and a withdrawal would then take it out
            # of the queue unwritten: its records would vanish (counters from the cluster).
            raise ProtocolError(
                f"stream {stream.stream}: Ack for chunk {message.seq}, which was never written"
            )
        was_open = stream.state is StreamState.OPEN
        # Raises ProtocolError for an answer the stream does not allow (the link drops,
        # and the stream's records go elsewhere); False for a late one.
        if not stream.machine.receive(message):
            return
        stream.progress_at = self._clock.now()
        if stream.state.finished:
            # Refused: chunks its writer has not begun are nobody's, like queued records.
            self._unqueue(stream)
        if isinstance(message, Refuse) and was_open:
            # The successor started draining before the stream ended: what it did not
            # acknowledge is taken back and re-routed by the drain loop.
            logger.info("%s withdrew from %r: %s", peer, self._report.namespace, message.reason)
            # Kept for the report: a successor may also refuse a stream whose chunk is past
            # its bounds (a hash flood, a decode bomb), and the operator must see why.
            self._report.refusals[peer] = message.reason
        elif isinstance(message, Ack):
            entry = stream.inflight.pop(message.seq, None)
            size = stream.sizes.pop(message.seq, None)
            if size is not None:
                self._learn_rate(stream, *size)
            if entry is None:
                # A cache's chunk that crossed its Cancel: its records were already sent
                # elsewhere, and count there.
                return
            self._acknowledged(stream, message, entry[0])
        self._changed.set()

    def _acknowledged(self, stream: _OutStream, ack: Ack, records: list[Record]) -> None:
        """Count a chunk of ``records`` acknowledged by ``ack``."""
        report = self._report
        count = len(records)
        stream.acknowledged += count
        dropped = dict(ack.dropped)
        report.successor_acked(stream.peer.name, count, ack.applied, ack.kept, dropped)
        if self._everywhere:
            self._first_acknowledgements(records, ack.kept, dropped)
        else:
            self._count_acknowledged(count, ack.applied, ack.kept, dropped)
        if self._progress is not None:
            self._progress(report)

    def _unwritten_chunk(self, stream: _OutStream, seq: int) -> bool:
        """Whether chunk ``seq`` of ``stream`` still waits in its writer's queue."""
        writer = self._writers.get(id(stream.link))
        return writer is not None and any(
            item is stream and isinstance(message, Chunk) and message.seq == seq
            for item, message, _, _ in writer.queue
        )

    def _chunk_cap(self) -> int:
        # A pre-copy's chunk_bytes (beside serving) caps what the Acks would grow to.
        aim = TARGET_CHUNK_BYTES if self._chunk_bytes is None else self._chunk_bytes
        return min(aim, self._max_chunk_bytes)

    def _learn_rate(self, stream: _OutStream, size: int, queued_at: float) -> None:
        """An Ack of a chunk of ``size`` bytes: update the link's observed rate, and size
        the stream's next chunks (see :data:`CHUNK_SECONDS`). The time counted is from
        when the chunk was queued, or from the previous Ack when chunks were pipelined:
        the time the link took for this chunk's bytes."""
        now = self._clock.now()
        elapsed = max(0.0, now - max(queued_at, stream.last_ack_at))
        stream.last_ack_at = now
        stream.recent_bytes = stream.recent_bytes / 2 + size
        stream.recent_seconds = stream.recent_seconds / 2 + elapsed
        stream.seconds_per_byte = stream.recent_seconds / max(1.0, stream.recent_bytes)
        previous, stream.last_sample = stream.last_sample, (size, elapsed)
        if previous is not None and 4 * abs(size - previous[0]) >= max(size, previous[0]):
            before, took = previous
            # The line through both points, kept within what either chunk alone says.
            slope = (elapsed - took) / (size - before)
            slope = min(max(slope, 0.0), max(elapsed / max(1, size), took / max(1, before)))
            stream.marginal_seconds_per_byte = slope
            stream.fixed_seconds = min(max(0.0, elapsed - slope * size), elapsed, took)
        current = stream.chunk_bytes
        cap = self._chunk_cap()
        sized: float
        if elapsed <= CHUNK_SECONDS:
            sized = max(current, 2 * size)
        elif elapsed > 2 * CHUNK_SECONDS:
            # Never below a starting chunk: a receiver whose cost is per chunk (a slow
            # apply, a long round trip) would otherwise get ever smaller chunks that each
            # cost as much; the deadline trim (see _room) keeps the last one deliverable.
            floor = min(current, START_CHUNK_BYTES)
            sized = min(current, max(current / 2, size * CHUNK_SECONDS / elapsed, floor))
        else:
            sized = current
        stream.chunk_bytes = int(max(min(MIN_CHUNK_BYTES, cap), min(cap, sized)))

    def _stream_chunk_records(self, stream: _OutStream) -> int:
        """Records in the stream's next chunk, by its chunk size (see :meth:`_learn_rate`)."""
        if not self._bytes_per_record:
            return FIRST_CHUNK_RECORDS
        wanted = int(stream.chunk_bytes / self._bytes_per_record)
        # At least a few records (per-chunk overhead), unless they are large: a slow link
        # must get chunks of the size its Acks ask for, not 16 large values.
        least = max(1, min(FIRST_CHUNK_RECORDS, int(START_CHUNK_BYTES / self._bytes_per_record)))
        if stream.machine.next_seq == 0:
            # Its link's rate is unknown until its first Ack: its first chunk is small, as
            # the drain's very first is, and its Ack comes back within the stall time.
            # Sized to the starting bytes (the drain knew the records' size from another
            # successor), a first chunk took 2 s at 5 KB/s, and the successor was given up
            # on as stalled before it could answer. Only the first: until its Ack nothing
            # more goes out (see _room), and a receiver whose cost is per chunk would pay
            # it for many small ones.
            return least
        return max(least, min(MAX_CHUNK_RECORDS, wanted))

    def _room(self, stream: _OutStream, until: float) -> int:
        """How many records the stream's next chunk may hold now: 0 to wait for an Ack,
        -1 if its link cannot carry a chunk before ``until`` (nothing is in flight and its
        observed rate leaves no time). Until the first Ack, only the bytes of one starting
        chunk are sent unacknowledged (the link's rate is unknown); then what the rate
        says the link acknowledges before ``until``, beyond what is in flight, and within
        half the stall time (see :meth:`_quick_records`; at least a record when nothing is
        in flight)."""
        if stream.full:
            return -1
        limit = self._stream_chunk_records(stream)
        unacked = stream.unacked_bytes
        per_byte = stream.seconds_per_byte
        if math.isnan(per_byte):
            if unacked and unacked + limit * self._bytes_per_record > START_CHUNK_BYTES:
                return 0
            return limit
        if per_byte <= 0:
            return limit
        budget = (until - self._clock.now()) / per_byte - unacked
        fit = int(budget / self._bytes_per_record) if self._bytes_per_record else limit
        if fit < 1:
            return 0 if unacked else -1
        quick = self._quick_records(stream, limit)
        if quick >= 1:
            return min(limit, fit, quick)
        return 0 if unacked else 1

    def _quick_records(self, stream: _OutStream, limit: int) -> int:
        """Records the stream's link acknowledges, beyond what is in flight, within half
        the stall time: more in flight, and a slow but healthy successor's Ack would come
        too late (it would be given up on as stalled). By the link's fitted cost per chunk
        (see :attr:`_OutStream.fixed_seconds`): when a chunk's fixed cost alone takes that
        long, its size does not matter (smaller chunks would only cost as much each), and
        ``limit`` stands. Until the cost is fitted, per byte."""
        fixed, marginal = stream.fixed_seconds, stream.marginal_seconds_per_byte
        if math.isnan(fixed):
            fixed, marginal = 0.0, stream.seconds_per_byte
        window = self._stall_after / 2 - fixed
        if window <= 0 or marginal <= 0 or not self._bytes_per_record:
            return limit
        return int((window / marginal - stream.unacked_bytes) / self._bytes_per_record)

    def _count_acknowledged(
        self, count: int, applied: int, kept: int, dropped: Mapping[str, int]
    ) -> None:
        report = self._report
        report.acknowledged += count
        report.applied += applied
        if self._reason == CATCH_UP:
            # The catch-up sends only records written after the drain: a successor
            # that kept its own copy kept the older one, and the update is lost.
            report.receiver_drop(KEPT_OLDER, kept)
        else:
            report.kept_existing += kept
        for reason, number in dropped.items():
            report.receiver_drop(reason, number)

    def _first_acknowledgements(
        self, records: list[Record], kept: int, dropped: Mapping[str, int]
    ) -> None:
        """Spread ``all``: count the records of an acknowledged chunk that no successor
        acknowledged before. The Ack says how many of the chunk were kept or dropped, not
        which: when only some of its records are first acknowledged here, the drops are
        counted against those first (the report errs on the side of loss)."""
        owed = self._owed
        first = 0
        for record in records:
            if owed.pop(id(record), None) is not None:
                first += 1
        if not first:
            return
        drops: dict[str, int] = {}
        room = first
        for reason, number in sorted(dropped.items()):
            taken = min(number, room)
            if taken:
                drops[reason] = taken
                room -= taken
        kept_here = min(kept, room)
        self._count_acknowledged(first, room - kept_here, kept_here, drops)

    def _released(self, records: list[tuple[Record, float]]) -> list[tuple[Record, float]]:
        """Records a stream let go (taken back): with spread ``all``, only those that no
        other stream still carries and no successor acknowledged go on (re-sent, or to the
        snapshot store); the others are where they should be already."""
        if not self._everywhere or not records:
            return records
        owed = self._owed
        free: list[tuple[Record, float]] = []
        for pair in records:
            key = id(pair[0])
            entry = owed.get(key)
            if entry is None:
                continue  # acknowledged by a successor
            if entry.carriers <= 1:
                del owed[key]
                free.append(pair)
            else:
                entry.carriers -= 1
        return free

    def _drop(
        self, report: NamespaceReport, records: Sequence[Record], reasons: Sequence[str]
    ) -> None:
        """Count ``records`` as given up (``reasons[i]`` for ``records[i]``), and give them
        back to an ownership adapter. With spread ``all`` a record is given up only by the
        last stream that carries it, unless a successor acknowledged it."""
        if self._everywhere:
            free = self._released([(record, 0.0) for record in records])
            if len(free) != len(records):
                kept = {id(record) for record, _ in free}
                reasons = [
                    why for record, why in zip(records, reasons, strict=True) if id(record) in kept
                ]
                records = [record for record, _ in free]
        for why in reasons:
            report.drop(why)
        self._give_back(records)

    def _late_answer(self, stream: _OutStream, tracked: Tracked, message: Message) -> None:
        """An answer on a stream already reported as of unknown outcome: an Ack says its
        chunk was applied there; a Refuse or Closed (after the Acks) says the rest was not,
        and it goes back to the adapter (it leaves with the catch-up). Also the answer to
        :meth:`late_questions` on a new link: the Acks the successor kept, then a Closed."""
        key = (stream.peer.name, stream.stream)
        if key in self._ask_late:
            if isinstance(message, Ack):
                _take_replayed(stream, message)
                return
            if not isinstance(message, Closed):
                return
            self._ask_late.discard(key)
        elif not stream.machine.receive(message):
            return
        elif isinstance(message, Ack):
            stream.inflight.pop(message.seq, None)
            return
        elif not stream.state.finished:
            return
        del self._unresolved[key]
        records = [record for seq in sorted(stream.inflight) for record in stream.inflight[seq][0]]
        stream.inflight.clear()
        if records:
            logger.warning(
                "%s answered late: %d records of %r it did not apply go back (they leave "
                "with the catch-up)",
                stream.peer.name,
                len(records),
                tracked.name,
            )
            self._give_back_to(tracked, records)

    def on_late(self, peer: str, message: Message) -> None:
        """An answer from ``peer`` after the drain (the node runs on): only streams whose
        chunks have an unknown outcome still listen (see :meth:`_late_answer`)."""
        if not isinstance(message, Accept | Refuse | Ack | Closed):
            return
        key = (peer, message.stream)
        tracked = self._unresolved.get(key)
        if tracked is not None:
            self._late_answer(self._streams[key], tracked, message)

    def streams_with(self, peer: str) -> bool:
        """Whether the link a stream to ``peer`` runs on must stay up (not be closed as a
        duplicate): while the drain runs (its Done to the peer goes on that link too), and
        after it while a late answer may still tell the fate of chunks."""
        running = self._group is not None
        return any(
            key[0] == peer and (running or not stream.state.finished or key in self._unresolved)
            for key, stream in self._streams.items()
        )

    def forget_unresolved(self, peer: str, link: object | None = None) -> None:
        """``peer``'s link ended (``link``, or every link to it if ``None``): the chunks
        it may hold keep an unknown outcome until it is back on a new link and says which
        it applied (see :meth:`late_questions`)."""
        self._ask_late.update(
            key
            for key in self._unresolved
            if key[0] == peer and (link is None or carried_by(self._streams[key].link, link))
        )

    def late_questions(self, peer: str) -> list[tuple[Link, Cancel]]:
        """``peer`` is back on a new link: for each stream of unknown outcome whose link to
        it ended, the question to send on that link (a Cancel of the stream); the receiver
        replays the Acks it kept and a Closed, and what it did not apply goes back to the
        adapter (see :meth:`_late_answer`). The stalled link of such a stream is often one
        about to end: forgotten then, those counts were gone from the cluster. Back as
        another incarnation (it restarted), it cannot say: the outcome stays unknown."""
        keys = [key for key in self._ask_late if key[0] == peer]
        found = {p.name: (p, link) for p, link in self._peers()}.get(peer) if keys else None
        if found is None:
            return []
        questions: list[tuple[Link, Cancel]] = []
        for key in keys:
            stream = self._streams[key]
            if found[0].incarnation != stream.peer.incarnation:
                self._ask_late.discard(key)
                del self._unresolved[key]
                stream.inflight.clear()
                continue
            stream.link = found[1]
            question = Cancel(stream.stream, "its link ended: which chunks were applied?")
            questions.append((found[1], question))
            logger.info(
                "asked %s which of %d chunks of unknown outcome it applied (its link had ended)",
                peer,
                len(stream.inflight),
            )
        return questions

    def on_peer_lost(self, peer: str, link: object | None = None) -> None:
        """``peer``'s link ended: its unacknowledged records must go elsewhere. With
        ``link``, only that link ended (a duplicate kept up for the streams it carried,
        see ``Mesh._retire``): only the streams on it end. Those of ownership state wait a
        stall time for the peer to come back on a new link and say which it applied
        (:meth:`on_peer_up`; at once when only a kept duplicate ended and the peer stays
        linked): a live peer whose link dropped (a protocol error, a heartbeat missed in a
        pause) must not count them twice. If it does not come back, they are re-sent and
        reported as in doubt (exact if it crashed)."""
        self.forget_unresolved(peer, link)
        for (name, _), stream in self._streams.items():
            if name != peer or not (link is None or carried_by(stream.link, link)):
                continue
            self._fail(stream, "went down during the drain", link_lost=True)
            if (
                stream.link_lost
                and stream.ownership
                and stream.inflight
                and not stream.answered
                and self._group is not None
                and stream.asking_until == -math.inf
            ):
                stream.asking_until = self._clock.now() + self._stall_after
        if link is not None and self._group is not None:
            # A kept duplicate failed while the peer stays linked on the link in use: no
            # node-up will come to ask on it, so asked now.
            self._ask(self._clock.now(), peer)
        self._changed.set()

    def on_peer_up(self, peer: str) -> None:
        """A link to ``peer`` came up: streams whose link to it ended with chunks of unknown
        fate ask on it (a Cancel of the stream): the receiver replays the Acks of what it
        applied, then a Closed. Asked again every :data:`ASK_AGAIN` seconds on the link in
        use until it answers or the stall time ends. A peer of another incarnation
        restarted: what it applied died with it, so its chunks are re-sent at once (in
        doubt, and exact)."""
        if self._group is not None:
            self._ask(self._clock.now(), peer)

    def _ask(self, now: float, peer: str | None = None) -> None:
        """Ask (again) the successors whose streams wait for an answer: ``peer``'s now,
        the others' if they were asked :data:`ASK_AGAIN` ago and are linked."""
        links: dict[str, tuple[Peer, Link]] | None = None
        for (name, _), stream in self._streams.items():
            if stream.asking_until == -math.inf:
                continue
            if name != peer and (stream.asked_at == -math.inf or now < stream.asked_at + ASK_AGAIN):
                continue
            if links is None:
                links = {p.name: (p, link) for p, link in self._peers()}
            found = links.get(name)
            if found is None:
                # Linked nowhere (the link asked on ended too): looked for again in
                # ASK_AGAIN (a replacement link may come without a node-up), and asked at
                # once by on_peer_up. Not left at the old time: past from now on, it woke
                # the drain's wait at once, again and again, without a yield.
                stream.asked_at = now
                continue
            if found[0].incarnation != stream.peer.incarnation:
                stream.asking_until = -math.inf
                self._changed.set()
                continue
            stream.link = found[1]
            stream.asked_at = now
            self._changed.set()  # a waiting drain wakes to ask again in time
            ask = Cancel(stream.stream, "its link ended: which chunks were applied?")
            self._enqueue(found[1], None, ask, self._deadline)
            logger.info(
                "asked %s which of %d chunks it applied (its link had ended)",
                name,
                len(stream.inflight),
            )

    def _recovered(self, stream: _OutStream, message: Message) -> None:
        """An answer to :meth:`on_peer_up`'s question: an Ack (replayed) of a chunk still
        unacknowledged here counts it as applied there; the Closed after them says the
        rest was not, and it is re-sent (not in doubt)."""
        if isinstance(message, Ack):
            records = _take_replayed(stream, message)
            if records is not None:
                self._acknowledged(stream, message, records)
        elif isinstance(message, Closed):
            stream.answered = True
            stream.asking_until = -math.inf
            logger.info(
                "%s answered: %d chunks it had not acknowledged were not applied there",
                stream.peer.name,
                len(stream.inflight),
            )
        self._changed.set()

    def _end_questions(self, now: float, *, all_of_them: bool = False) -> None:
        """Streams that asked and got no answer in time: their chunks go elsewhere."""
        for stream in self._streams.values():
            if stream.asking_until > -math.inf and (all_of_them or stream.asking_until <= now):
                stream.asking_until = -math.inf
                self._changed.set()

    def _next_question_end(self) -> float:
        """When a question ends unanswered, or is to be asked again."""
        return min(
            (
                # Asked already: again soon (before that, on_peer_up asks at once).
                min(s.asking_until, s.asked_at + ASK_AGAIN)
                if s.asked_at > -math.inf
                else s.asking_until
                for s in self._streams.values()
                if s.asking_until > -math.inf
            ),
            default=math.inf,
        )

    # -- the drain --------------------------------------------------------------------------

    async def run(self, *, time_limit: float) -> DrainReport:
        """Drain every namespace within ``time_limit`` seconds; report what became of them."""
        failure: Exception | None = None
        report: DrainReport | None = None
        async with anyio.create_task_group() as group:
            self._group = group
            try:
                report = await self._run(time_limit)
            except Exception as exc:
                # Raised as itself, not inside the task group's ExceptionGroup.
                failure = exc
                group.cancel_scope.cancel()
            finally:
                # Each writer ends once its queue is written: every write has a time limit
                # within the deadline, so the deadline holds.
                for writer in self._writers.values():
                    writer.closing = True
                    writer.more.set()
        self._group = None
        if failure is not None:
            raise failure
        assert report is not None
        return report

    async def _run(self, time_limit: float) -> DrainReport:
        started = self._clock.now()
        deadline = self._deadline = started + time_limit
        self._time_limit = time_limit
        self._stall_after = min(STALL_CEILING, max(STALL_FLOOR, time_limit * STALL_SHARE))
        # Streaming stops a moment before the deadline, so that the streams still open can
        # be cancelled in time: a receiver would otherwise count them as arriving, and wait
        # for them when it drains in turn.
        stream_until = deadline - min(CANCEL_RESERVE, time_limit * 0.05)
        if self._snapshots is not None:
            stream_until = deadline - time_limit * SNAPSHOT_RESERVE
        # Relative metadata (remaining TTLs) is computed from here on; a snapshot that says
        # it was made at this moment makes restored lifetimes err on the short side.
        self._drain_wall = self._wall_clock()
        reports: dict[str, NamespaceReport] = {}
        order = sorted(
            self._tracked.values(), key=lambda t: (not t.adapter.moves_ownership, t.name)
        )
        for tracked in order:
            if self._sources is not None and tracked.name not in self._sources:
                continue
            if tracked.name in self._exclude:
                continue
            # Ownership state needs no log: its export takes what it sends, so whatever it
            # holds at the catch-up was written after the drain.
            if self._keep_fingerprints and not tracked.adapter.moves_ownership:
                self.exported[tracked.name] = ExportLog(self._codec.fingerprint_encoder())
            report = reports[tracked.name] = NamespaceReport(tracked.name, tracked.version)
            ns_started = self._clock.now()
            await self._drain_namespace(tracked, report, stream_until, deadline)
            report.seconds = self._clock.now() - ns_started
            if self._progress is not None:
                self._progress(report)
            if not report.complete:  # pragma: no cover - a bug, never a user error
                logger.error("drain report for %s does not add up: %r", tracked.name, report)
        await self._say_done(deadline)
        return DrainReport(
            self._node, self._release, self._clock.now() - started, reports, self._reason
        )

    async def _say_done(self, deadline: float) -> None:
        """Tell every successor that took something that nothing more will come."""
        served: dict[str, tuple[Link, int]] = {}
        lost: set[str] = set()
        for (name, _), stream in self._streams.items():
            if stream.state is StreamState.ENDED or stream.acknowledged:
                link, acknowledged = served.get(name, (stream.link, 0))
                # On the link of its last stream (after its End) that did not end with
                # its link: a stream offered again after a duplicate link closed under the
                # first one runs on the link now in use.
                if stream.link_lost:
                    lost.add(name)
                else:
                    link = stream.link
                    lost.discard(name)
                served[name] = (link, acknowledged + stream.acknowledged)
        if lost:
            current = {peer.name: link for peer, link in self._peers()}
            for name in lost:
                link, acknowledged = served[name]
                served[name] = (current.get(name, link), acknowledged)
        for link, acknowledged in served.values():
            if deadline <= self._clock.now():
                break
            self._enqueue(link, None, Done(acknowledged), deadline)

    async def _drain_namespace(
        self, tracked: Tracked, report: NamespaceReport, stream_until: float, deadline: float
    ) -> None:
        self._report = report
        self._namespace = tracked
        self._given_back = 0
        self._relinks = {}
        self._everywhere = tracked.effective_spread == ALL
        report.spread = tracked.effective_spread
        self._owed = {}
        self._encoded = {}
        self._encoded_bytes = 0
        source = self._sources.get(tracked.name) if self._sources is not None else None
        exporter = iter(source() if source is not None else tracked.adapter.export())
        retry: deque[tuple[Record, float]] = deque()
        tiers = self._eligible_tiers(tracked, report)
        # With one successor per tier, "all" is "split": the plain path, which keeps no
        # record of who carries what.
        self._everywhere = self._everywhere and any(len(tier) > 1 for tier in tiers)
        streams: list[_OutStream] = []
        # Every tier's streams: a successor that acknowledged part and then left is one too.
        offered: list[_OutStream] = []
        router = Router([])
        routed: list[str] = []
        exhausted = False
        too_slow = False
        floor_until = stream_until
        while not self._stopped:
            if self._snapshots is not None:
                # Never later than the floor's (the stream_until given): sooner while the
                # records left would take longer to snapshot than the floor leaves; later
                # again as a successor acknowledges them.
                stream_until = min(
                    floor_until,
                    self._stream_until(tracked, report, deadline, sized=source is None),
                )
            if self._clock.now() >= stream_until:
                break
            # Streams that stopped (and, for ownership, whose chunks' fate became known)
            # give back what they had: it goes to the successors still open.
            for stream in offered:
                if stream.state is not StreamState.OPEN:
                    retry.extend(self._released(self._take_back(stream)))
            open_streams = [s for s in streams if s.state is StreamState.OPEN]
            if not open_streams:
                if not tiers and not _none_asking(offered):
                    # A successor asked which chunks it applied (its link ended) may
                    # answer, and then take the rest (see _relinked): the last one left.
                    await self._wait(functools.partial(_none_asking, offered), stream_until)
                    continue
                if not tiers:
                    tiers = await self._relinked(tracked, report, offered, stream_until)
                if not tiers:
                    break
                streams = await self._offer(tracked, tiers.pop(0), report, stream_until, deadline)
                self._tier = streams
                offered += streams
                continue
            for stream in open_streams:
                if stream.full and stream.pending.records:
                    retry.extend(self._released(self._take_pending(stream)))
            sending = [s for s in open_streams if not s.full]
            if not sending:
                # No successor's link carries another chunk before the streaming time ends:
                # what they have in flight may still be acknowledged; the rest is dealt with
                # as at the deadline (snapshot store, or dropped with the reason).
                await self._wait(
                    functools.partial(self._acknowledged_or_stopped, open_streams),
                    stream_until,
                    stalls=True,
                )
                if all(s.state is StreamState.OPEN for s in open_streams):
                    too_slow = True
                    break
                continue
            names = [s.peer.name for s in sending]
            if names != routed:
                routed, router = names, Router(names)
            # Work in batches of a chunk: the per-record path is the drain's hot loop.
            size = max(map(self._stream_chunk_records, sending))
            if retry:
                taken = [retry.popleft() for _ in range(min(size, len(retry)))]
                batch = [record for record, _ in taken]
                pulled_at = min(pulled for _, pulled in taken)
            elif not exhausted:
                with self._lock, gc_paused():
                    if source is None:
                        batch = list(itertools.islice(exporter, size))
                        exhausted = len(batch) < size
                    else:
                        batch, exhausted = _pull_until_pause(exporter, size)
                pulled_at = self._clock.now()
                report.records += len(batch)
                log = self.exported.get(tracked.name)
                if log is not None:
                    log.add(batch)
                if not batch:
                    await anyio.lowlevel.checkpoint()  # a scan paused: the loop's turn
                    continue
            else:
                if await self._finish(open_streams, stream_until):
                    if self._bound(offered):
                        # Chunks of a cancelled stream wait for their fate: applied there,
                        # or to be sent to the successors still open (not yet ended).
                        await self._wait(
                            functools.partial(self._resolved_or_stopped, offered, open_streams),
                            stream_until,
                        )
                        # Past the streaming time, the end of the namespace deals with
                        # what is still bound (and cancels the streams, ended or not).
                        continue
                    if any(
                        s.state is not StreamState.OPEN and (s.inflight or s.pending.records)
                        for s in offered
                    ):
                        # Let go while the acknowledgements were awaited (an answer came:
                        # a Closed, a successor's reply on a new link): taken back at the
                        # top of the loop and sent on, not left behind.
                        continue
                    for stream in open_streams:
                        # Each End is an await: a successor may withdraw or go down before
                        # its turn. Everything it had is acknowledged, so it needs no End.
                        if stream.state is StreamState.OPEN:
                            end = End(stream.stream, stream.sent_records)
                            await self._send(stream, end, deadline)
                    self._note_successors(offered, report)
                    return
                continue
            if self._everywhere:
                await self._copy_to_all(batch, pulled_at, sending, retry, stream_until)
                continue
            for index, records in self._split(batch, router, len(sending)):
                stream = sending[index]
                pending = stream.pending
                pending.pulled_at = (
                    min(pending.pulled_at, pulled_at) if pending.records else pulled_at
                )
                pending.records.extend(records)
                await self._flush_full(stream, report, stream_until)
        # Out of time or out of successors: everything not acknowledged goes to the snapshot.
        leftovers: list[tuple[Record, float]] = list(retry)
        for stream in streams:
            if stream.state is StreamState.OPEN:
                await self._send(stream, Cancel(stream.stream, "drain deadline"), deadline)
        if self._bound(offered):
            # What the receivers applied of it is acknowledged before their Closed: wait
            # for that (within the time kept for the end), so that what they did not
            # apply can still go to the snapshot store, and only the rest is unknown.
            await self._wait(lambda: not self._bound(offered), self._resolve_until(deadline))
        # A successor asked whether it applied chunks after its link ended, without an
        # answer yet: presumed crashed now, its chunks go to the snapshot store (in doubt).
        self._end_questions(self._clock.now(), all_of_them=True)
        for stream in offered:
            leftovers.extend(self._released(self._take_back(stream)))
            self._report_unknown(stream, report)
        self._note_successors(offered, report)
        if self._stopped:
            reason = STOPPED
        elif too_slow or self._clock.now() >= stream_until:
            reason = "deadline"
        else:
            reason = "no successor"
        await self._snapshot_or_drop(
            tracked,
            report,
            [record for record, _ in leftovers],
            exporter,
            sized=source is None,
            reason=reason,
            deadline=deadline,
        )

    async def _copy_to_all(
        self,
        batch: list[Record],
        pulled_at: float,
        streams: list[_OutStream],
        retry: deque[tuple[Record, float]],
        until: float,
    ) -> None:
        """Spread ``all``: queue ``batch`` on every open stream that has room for it in its
        backlog, each carrying every record it takes, and send each stream's chunks at its
        own pace; return once a stream can take the next batch (or none is open, or at
        ``until``). A record that no stream took (all stopped meanwhile) is retried.

        A successor slower than another of its tier falls behind: records queue on its
        stream, up to :meth:`_backlog` (what its link carries by ``until``, within
        :data:`BACKLOG_BYTES`). Past that it skips batches (its carriers count does not
        include it) and takes up again at the batch current when it has room: it never
        holds back a faster one, and never makes the drain hold more than its backlog for
        it. What it skipped is acknowledged by the others; if they let it go, it is re-sent
        like any record that nobody carries (see :meth:`_released`)."""
        owed = self._owed
        entries = [_Owed(record) for record in batch]
        for entry in entries:
            owed[id(entry.record)] = entry
        for stream in streams:
            if stream.state is not StreamState.OPEN or stream.full:
                continue  # stopped or full meanwhile: it never gets this batch
            if len(stream.pending.records) >= self._backlog(stream, until):
                continue  # behind the others: it skips this batch
            pending = stream.pending
            pending.pulled_at = min(pending.pulled_at, pulled_at) if pending.records else pulled_at
            pending.records.extend(batch)
            for entry in entries:
                entry.carriers += 1
        await self._flush_each(
            streams, until, whole=False, done=lambda live: not all(map(self._behind, live))
        )
        for entry in entries:
            if entry.carriers == 0 and owed.pop(id(entry.record), None) is not None:
                retry.append((entry.record, pulled_at))

    def _behind(self, stream: _OutStream) -> bool:
        """Spread ``all``: the stream holds a chunk's worth of records it could not send yet."""
        return len(stream.pending.records) >= self._stream_chunk_records(stream)

    def _backlog(self, stream: _OutStream, until: float) -> int:
        """Spread ``all``: how many records may queue on the stream before it skips batches:
        what its link carries by ``until`` beyond what is in flight (at its observed rate),
        within :data:`BACKLOG_BYTES`; at least :data:`BACKLOG_CHUNKS` chunks, so that a fast
        successor waiting for an Ack while a slower one has room does not skip."""
        least = BACKLOG_CHUNKS * self._stream_chunk_records(stream)
        per_record = self._bytes_per_record
        if not per_record:
            return least
        most = BACKLOG_BYTES / per_record
        per_byte = stream.seconds_per_byte
        if not math.isnan(per_byte) and per_byte > 0:
            carried = ((until - self._clock.now()) / per_byte - stream.unacked_bytes) / per_record
            most = min(most, carried)
        return max(least, int(most))

    def _sendable(self, stream: _OutStream, until: float) -> bool:
        """The stream may send a chunk now (see :meth:`_flush`)."""
        return stream.credit > 0 and self._room(stream, until) != 0

    async def _flush_each(
        self,
        streams: list[_OutStream],
        until: float,
        *,
        whole: bool,
        done: Callable[[list[_OutStream]], bool],
    ) -> None:
        """Spread ``all``: send every stream's queued chunks as its credit and room allow,
        waiting for none in particular, until ``done(live)`` holds for the streams still
        open and not full (or none is, or ``until`` came). ``whole``: queued records that
        make less than a chunk are sent too (the end of the namespace)."""
        report = self._report
        while self._clock.now() < until:
            progressed = False
            for stream in streams:
                while (
                    stream.state is StreamState.OPEN
                    and not stream.full
                    and stream.pending.records
                    and (whole or self._behind(stream))
                    and self._sendable(stream, until)
                ):
                    queued = len(stream.pending.records)
                    await self._flush(stream, report, until)
                    if len(stream.pending.records) >= queued:
                        break  # nothing sent: out of time, or paced past the end
                    progressed = True
            live = [s for s in streams if s.state is StreamState.OPEN and not s.full]
            if not live or done(live):
                return
            # Wait for a stream to be able to send; after a round that sent nothing, for
            # any change (an Ack, credit, a stream that stops) instead: a stream that may
            # send but did not must not make this loop spin.
            before = None if progressed else list(map(self._flush_state, live))
            ready = functools.partial(self._may_flush, live, before, until)
            if not await self._wait(ready, until, stalls=True):
                return

    def _may_flush(
        self,
        live: list[_OutStream],
        before: list[tuple[int, int, int, int]] | None,
        until: float,
    ) -> bool:
        """Whether :meth:`_flush_each` should look again: a stream stopped, or one may send
        (or, given ``before``, anything changed since)."""
        if any(s.state is not StreamState.OPEN or s.full for s in live):
            return True
        if before is not None:
            return list(map(self._flush_state, live)) != before
        return any(s.pending.records and self._sendable(s, until) for s in live)

    @staticmethod
    def _flush_state(stream: _OutStream) -> tuple[int, int, int, int]:
        """What changes when a stream's chance to send may have."""
        return (
            stream.credit,
            len(stream.inflight),
            len(stream.pending.records),
            stream.sent_records,
        )

    @staticmethod
    def _split(
        batch: list[Record], router: Router, streams: int
    ) -> Iterator[tuple[int, list[Record]]]:
        if streams == 1:
            yield 0, batch
            return
        parts: list[list[Record]] = [[] for _ in range(streams)]
        route = router.route
        for record in batch:
            key = record[0]
            try:
                index = route(key)
            except TypeError:  # an unhashable key (a list in a plain dict's value?)
                index = route(repr(key))
            parts[index].append(record)
        for index, part in enumerate(parts):
            if part:
                yield index, part

    def _counting(self, records: Iterator[Record], report: NamespaceReport) -> Iterator[Record]:
        """``records`` as they are pulled from the export: counted, and logged. A
        :data:`SCAN_PAUSE` passes through uncounted: pull with :meth:`_pull_counted`."""
        log = self.exported.get(report.namespace)
        for record in records:
            if record is SCAN_PAUSE:
                yield record
                continue
            report.records += 1
            if log is not None:
                log.add((record,))
            yield record

    async def _pull_counted(
        self, counting: Iterator[Record], size: int, *, until: float = math.inf
    ) -> tuple[list[Record], bool]:
        """Up to ``size`` records of ``counting`` (a :meth:`_counting` of an export), and
        whether it ran out. The event loop gets its turn at every :data:`SCAN_PAUSE` (a
        catch-up's scan of unchanged records) and after the pull: never one long pull.
        At ``until`` it returns what it has (a scan of unchanged records may be long)."""
        batch: list[Record] = []
        exhausted = False
        while len(batch) < size and not exhausted and self._clock.now() < until:
            with self._lock:
                part, exhausted = _pull_until_pause(counting, size - len(batch))
            batch += part
            await anyio.lowlevel.checkpoint()
        return batch, exhausted

    async def _count_rest(
        self,
        tracked: Tracked,
        report: NamespaceReport,
        exporter: Iterator[Record],
        *,
        sized: bool,
        deadline: float,
        forget: bool = False,
    ) -> int:
        """Count what the export still holds into the report; returns how many. With
        ``forget`` (a deadline cut them off) the export log forgets them, so that a
        catch-up sends them. One by one
        while there is time; past the deadline, when ``sized``, by the object's size:
        iterating a large cache (1-6 us a record on the event loop) would overrun the
        deadline by seconds. The size may count entries the export would skip (expired,
        not yet purged): the report errs on the side of loss. An ownership export takes
        what it yields: what is counted here is given back."""
        counting = self._counting(exporter, report)
        counted = 0
        # A scan of what changed since a drain (the catch-up) says how far it got: past the
        # deadline the rest is counted without looking, as a sized export is.
        scan = exporter if isinstance(exporter, ChangedRecords) else None
        while (not sized and scan is None) or self._clock.now() < deadline:
            batch, exhausted = await self._pull_counted(
                counting, MAX_CHUNK_RECORDS, until=deadline if scan is not None else math.inf
            )
            counted += len(batch)
            self._give_back(batch)
            if forget:
                self._forget(report, batch)
            if exhausted:
                return counted
        if scan is not None:
            # Not known to have changed: the catch-up may not send them, and cannot say
            # they are safe either. Counted (and so not ok) under a reason that says so.
            unchecked = max(0, len(tracked.adapter) - scan.scanned)
            report.records += unchecked
            report.drop(NOT_CHECKED, unchecked)
            return counted
        if isinstance(tracked.adapter, SupportsGiveBack) and tracked.adapter.moves_ownership:
            # What it holds is what was never taken, plus what was given back.
            left = max(0, len(tracked.adapter) - self._given_back)
        else:
            left = max(0, len(tracked.adapter) - report.records)
        report.records += left
        return counted + left

    def _eligible_tiers(self, tracked: Tracked, report: NamespaceReport) -> list[list[_Target]]:
        links = {peer.name: (peer, link) for peer, link in self._peers()}
        tiers: list[list[_Target]] = []
        candidates = [peer for peer, _ in links.values()]
        for tier in successor_tiers(self._release, candidates, local_started_at=self._started_at):
            eligible: list[_Target] = []
            for peer in tier:
                if peer.name in self._skip.get(tracked.name, ()):
                    continue
                version = peer.namespaces.get(tracked.name)
                if version is None:
                    report.refusals[peer.name] = f"does not track {tracked.name!r}"
                    continue
                chain: Chain | None = None
                if version < tracked.version:
                    # Old code cannot read new formats: downgrade here, before sending.
                    try:
                        chain = self._transforms.path(tracked.name, tracked.version, version)
                    except NoTransformPath as exc:
                        report.refusals[peer.name] = str(exc)
                        continue
                eligible.append(_Target(peer, links[peer.name][1], version, chain))
            if eligible:
                tiers.append(eligible)
        return tiers

    async def _relinked(
        self,
        tracked: Tracked,
        report: NamespaceReport,
        offered: list[_OutStream],
        until: float,
    ) -> list[list[_Target]]:
        """Successors whose stream ended with its link while they stay linked, as a tier
        to offer the namespace again, on the link now in use. Two nodes that dialled each
        other keep one link; the other node may close the one a stream had just started on
        (it knew of no stream yet: an Offer on its way), and the stream ends as if the
        successor had crashed while it serves on. Not a successor that may hold ownership
        state of the ended stream (it would count twice), unless it came back and said
        which chunks it applied (see :meth:`on_peer_up`: the last successor left takes the
        rest), and at most :data:`MAX_RELINKS` times each. Waits, until ``until`` and for a
        stall's time at most, while a link to one of them is being replaced."""
        ended: dict[str, list[object | None]] = {}
        doubted = {s.peer.name for s in offered if s.doubtful and not s.answered}
        for stream in offered:
            name = stream.peer.name
            if (
                stream.state is StreamState.FAILED
                and stream.link_lost
                and name not in doubted
                and self._relinks.get(name, 0) < MAX_RELINKS
            ):
                # Answered on a new link (see on_peer_up): it said which chunks it applied,
                # so the rest cannot count twice there, and it is back already (the
                # question moved the stream onto the link in use: None stands for "any").
                ended.setdefault(name, []).append(
                    None if stream.answered else transport_of(stream.link)
                )
        if not ended:
            return []
        # A replacement normally takes a handshake's time: no longer than a stall.
        until = min(until, self._clock.now() + self._stall_after)
        back: set[str] = set()
        while True:
            links = {peer.name: transport_of(link) for peer, link in self._peers()}
            back = {
                n for n, old in ended.items() if n in links and (None in old or links[n] not in old)
            }
            waiting = [n for n in ended if n not in back and self._relinking(n)]
            if back or not waiting or self._clock.now() >= until:
                break
            await self._clock.wait(anyio.Event(), min(until, self._clock.now() + RELINK_POLL))
        if not back:
            return []
        for name in back:
            self._relinks[name] = self._relinks.get(name, 0) + 1
            logger.info(
                "%s: its link ended under the stream of %r while it stays linked (a "
                "duplicate link closed): offered again",
                name,
                tracked.name,
            )
        tier = [t for tier in self._eligible_tiers(tracked, report) for t in tier]
        return [[t for t in tier if t.peer.name in back]] if tier else []

    async def _offer(
        self,
        tracked: Tracked,
        targets: list[_Target],
        report: NamespaceReport,
        until: float,
        deadline: float,
    ) -> list[_OutStream]:
        streams: list[_OutStream] = []
        for target in targets:
            stream = _OutStream(
                target.peer,
                target.link,
                OutboundStream(next(self._stream_ids)),
                min(target.version, tracked.version),
                target.chain,
            )
            stream.ownership = tracked.adapter.moves_ownership
            stream.report = report
            stream.chunk_bytes = min(START_CHUNK_BYTES, self._chunk_cap())
            self._streams[(target.peer.name, stream.stream)] = stream
            streams.append(stream)
            offer = Offer(
                stream.stream,
                tracked.name,
                self._kinds.get(tracked.name, tracked.adapter.kind),
                stream.version,
                len(tracked.adapter),
            )
            stream.progress_at = self._clock.now()
            await self._send(stream, offer, until)

        def answered() -> bool:
            return all(s.state is not StreamState.OFFERED for s in streams)

        # A successor that does not answer must not hold back those that did: past the
        # stall time, once one of them accepted, the silent ones are given up on. With
        # nobody else to take their share, they are waited for as long as the drain lasts.
        if not await self._wait(answered, min(until, self._clock.now() + self._stall_after)):
            await self._wait(
                lambda: answered() or any(s.state is StreamState.OPEN for s in streams), until
            )
        for stream in streams:
            if stream.state is StreamState.OFFERED:
                # Said, so that a late Accept does not leave the successor with an open
                # stream nobody ends (it would wait for it when it drains in turn).
                why = "did not answer the offer in time"
                if await self._send(stream, Cancel(stream.stream, why), deadline):
                    logger.warning("successor %s %s", stream.peer.name, why)
                    report.refusals[stream.peer.name] = why
            if stream.state is StreamState.REFUSED:
                report.refusals[stream.peer.name] = stream.machine.reason
                logger.info(
                    "%s refused %r: %s", stream.peer.name, tracked.name, stream.machine.reason
                )
        return streams

    async def _send(self, stream: _OutStream, message: Message, until: float) -> bool:
        """Send within the drain's time (a stuck successor must not hold the deadline)."""
        if stream.state.finished:
            return False  # withdrawn or failed while the caller awaited something else
        remaining = until - self._clock.now()
        if remaining <= 0:
            if isinstance(message, Chunk):
                # Not written: the caller keeps its records, and the stream stays open
                # for the Cancel that ends it (the receiver would otherwise wait for it).
                return False
            if isinstance(message, Cancel | End):
                # Out of time, but the receiver must learn that the stream is over (it
                # would wait for it when it drains in turn): the node sends it afterwards.
                # An End only follows the last Ack, so it is as true later as now.
                self.late.append((stream.peer.name, stream.link, message))
            self._fail(stream, "could not be written to before the deadline")
            return False
        if isinstance(message, Cancel):
            # Chunks still queued behind a blocked write were never written: nobody holds
            # them, and they go elsewhere like the records not yet sent.
            self._unqueue(stream)
        stream.machine.send(message)
        written = self._enqueue(stream.link, stream, message, until)
        await self._clock.wait(written, min(until, self._clock.now() + WRITE_PATIENCE))
        return True

    def _enqueue(
        self, link: Link, stream: _OutStream | None, message: Message, until: float
    ) -> anyio.Event:
        """Queue ``message`` on ``link``'s writer (started on first use); the event is set
        once it is written or given up."""
        writer = self._writers.get(id(link))
        if writer is None:
            assert self._group is not None, "messages are sent only while the drain runs"
            writer = self._writers[id(link)] = _Writer(link)
            self._group.start_soon(self._write, writer)
        written = anyio.Event()
        writer.queue.append((stream, message, until, written))
        writer.more.set()
        return written

    async def _write(self, writer: _Writer) -> None:
        while True:
            if not writer.queue:
                if writer.closing:
                    return
                writer.more = anyio.Event()
                await writer.more.wait()
                continue
            stream, message, until, written = writer.queue.popleft()
            try:
                await self._write_one(writer.link, stream, message, until)
            finally:
                written.set()

    async def _write_one(
        self, link: Link, stream: _OutStream | None, message: Message, until: float
    ) -> None:
        """Write one queued message within its time (a stuck link must not hold the
        deadline); a failure ends the stream it belongs to."""
        remaining = until - self._clock.now()
        if stream is None:
            if remaining > 0:
                try:
                    await link.send(message, time_limit=remaining)
                except HandoffError as exc:
                    logger.debug("could not tell a successor the drain is done: %s", exc)
            return
        if remaining <= 0:
            if isinstance(message, Chunk):
                # Never written: bound to nobody, its records are queued again. Its sequence
                # number is spent, so the stream gets no chunk after it (only its Cancel).
                stream.full = True
                self._unwritten(stream, [message.seq])
                return
            if isinstance(message, Cancel | End):
                # The receiver must learn that the stream is over (it would wait for it when
                # it drains in turn): the node sends it afterwards. An End only follows the
                # last Ack, so it is as true later as now.
                self.late.append((stream.peer.name, link, message))
            self._fail(stream, "could not be written to before the deadline")
            return
        try:
            await link.send(message, time_limit=remaining)
        except HandoffError as exc:
            # The link is closed for good (a send that fails or overruns closes it).
            self._fail(stream, f"send failed: {exc}", link_lost=True)

    def _unqueue(self, stream: _OutStream) -> None:
        """Take the stream's chunks that its writer has not begun to write out of the queue:
        their records are queued on the stream again (see :meth:`_unwritten`)."""
        writer = self._writers.get(id(stream.link))
        if writer is None:
            return
        taken = [item for item in writer.queue if item[0] is stream and isinstance(item[1], Chunk)]
        if not taken:
            return
        gone = set(map(id, taken))
        writer.queue = deque(item for item in writer.queue if id(item) not in gone)
        for _, _, _, written in taken:
            written.set()
        self._unwritten(stream, [m.seq for _, m, _, _ in taken if isinstance(m, Chunk)])

    def _unwritten(self, stream: _OutStream, seqs: list[int]) -> None:
        """Chunks ``seqs`` of ``stream`` were never written: not sent, bound to nobody; their
        records go back to the front of the stream's queue, for the drain to take back."""
        records: list[Record] = []
        pulled_at = math.inf
        for seq in sorted(seqs):
            entry = stream.inflight.pop(seq, None)
            size = stream.sizes.pop(seq, None)
            if entry is None:
                continue
            records += entry[0]
            pulled_at = min(pulled_at, entry[1])
            if stream.report is not None:
                stream.report.sent -= len(entry[0])
                stream.report.bytes -= size[0] if size is not None else 0
        if records:
            queued = stream.pending
            if queued.records:
                pulled_at = min(pulled_at, queued.pulled_at)
            stream.pending = _Pending(records + queued.records, pulled_at)
        self._changed.set()

    def _fail(self, stream: _OutStream, why: str, *, link_lost: bool = False) -> None:
        if stream.machine.fail(why):
            stream.link_lost = link_lost
            stream.doubtful = stream.ownership and bool(stream.inflight)
            self._unqueue(stream)
            logger.warning("successor %s %s", stream.peer.name, why)
            self._changed.set()

    def _give_back(self, records: Sequence[Record]) -> None:
        """Return records the drain took and nobody received to an ownership adapter (it
        keeps serving with them: they leave with the catch-up or the next drain)."""
        tracked = self._namespace
        if not records or tracked is None or not isinstance(tracked.adapter, SupportsGiveBack):
            return
        self._given_back += len(records)
        self._give_back_to(tracked, records)

    def _give_back_to(self, tracked: Tracked, records: Sequence[Record]) -> None:
        if not isinstance(tracked.adapter, SupportsGiveBack):
            return
        with self._lock:
            try:
                tracked.adapter.give_back(records)
            except Exception:
                logger.exception("could not give %d records back to %r", len(records), tracked.name)

    def _forget(self, report: NamespaceReport, records: Sequence[Record]) -> None:
        log = self.exported.get(report.namespace)
        if log is not None and records:
            log.forget(records)

    @staticmethod
    def _bound_here(stream: _OutStream) -> bool:
        """Whether the stream's unacknowledged chunks must wait for their fate: ownership
        state a successor may have applied, which it has not yet confirmed or refused."""
        if not stream.ownership or not stream.inflight:
            return False
        state = stream.state
        if state is StreamState.FAILED:
            # Given up locally: the successor may hold them. Its link lost: it may come
            # back and say (while the drain asks), or it crashed with them.
            return not stream.link_lost or stream.asking_until > -math.inf
        return state is StreamState.CANCELLING or state is StreamState.OPEN

    @staticmethod
    def _acknowledged_or_stopped(streams: list[_OutStream]) -> bool:
        return all(not s.inflight or s.state is not StreamState.OPEN for s in streams)

    def _resolved_or_stopped(self, offered: list[_OutStream], waiting: list[_OutStream]) -> bool:
        return not self._bound(offered) or any(s.state is not StreamState.OPEN for s in waiting)

    def _bound(self, streams: list[_OutStream]) -> bool:
        """Whether any stopped stream of ``streams`` still holds chunks of unknown fate."""
        return any(s.state is not StreamState.OPEN and self._bound_here(s) for s in streams)

    def _resolve_until(self, deadline: float) -> float:
        """How long the end of a namespace waits for cancelled streams' Closed: half of
        the time left, so that the snapshot store still has its share."""
        now = self._clock.now()
        return now + max(0.0, deadline - now) / 2

    def _report_unknown(self, stream: _OutStream, report: NamespaceReport) -> None:
        """Count chunks still bound to ``stream`` as of unknown outcome (at the end)."""
        if not self._bound_here(stream) or stream.state is StreamState.OPEN:
            return
        count = sum(len(records) for records, _ in stream.inflight.values())
        if stream.state is StreamState.CANCELLING and self._namespace is not None:
            self._unresolved[(stream.peer.name, stream.stream)] = self._namespace
        else:
            stream.inflight.clear()
        report.drop(OUTCOME_UNKNOWN.format(peer=stream.peer.name), count)
        logger.warning(
            "%d records of %r sent to %s have an unknown outcome: it neither acknowledged "
            "nor refused them before the deadline (it may hold them)",
            count,
            report.namespace,
            stream.peer.name,
        )

    @staticmethod
    def _take_pending(stream: _OutStream) -> list[tuple[Record, float]]:
        """The stream's queued records (never sent), taken off it."""
        queued = [(record, stream.pending.pulled_at) for record in stream.pending.records]
        stream.pending = _Pending()
        return queued

    def _take_back(self, stream: _OutStream) -> list[tuple[Record, float]]:
        """Unacknowledged and queued records of a stream, oldest chunk first. Chunks bound
        to the successor (:meth:`_bound_here`) stay with it until their fate is known."""
        queued = self._take_pending(stream)
        if self._bound_here(stream):
            return queued
        if stream.ownership and stream.link_lost and stream.inflight and not stream.answered:
            count = sum(len(records) for records, _ in stream.inflight.values())
            self._report.in_doubt += count
            self._report.refusals.setdefault(
                stream.peer.name, "its link ended before it acknowledged every chunk"
            )
            logger.warning(
                "%s's link ended with %d records of %r unacknowledged: they are re-sent; "
                "if it crashed they are exact, if it still runs they may count twice",
                stream.peer.name,
                count,
                self._report.namespace,
            )
        taken = [
            (record, pulled_at)
            for seq in sorted(stream.inflight)
            for record in stream.inflight[seq][0]
            for pulled_at in (stream.inflight[seq][1],)
        ]
        stream.inflight.clear()
        return taken + queued

    async def _wait(self, done: Callable[[], bool], until: float, *, stalls: bool = False) -> bool:
        """Wait until ``done()`` (True) or ``until`` (False). With ``stalls``, the streams of
        the tier that stall meanwhile are cancelled (see :data:`STALL_SHARE`): ``done`` must
        then hold once the stream the caller waits on is no longer open."""
        while True:
            now = self._clock.now()
            self._end_questions(now)
            self._ask(now)
            if done():
                return True
            if now >= until or self._stopped:
                return False
            wake = min(until, self._next_question_end())
            if stalls:
                if await self._give_up_on_stalled():
                    continue
                # Woken by the next stall, not only by messages: a silent peer sends none.
                wake = min(wake, self._next_stall(now))
            self._changed = anyio.Event()
            await self._clock.wait(self._changed, wake)

    def _stalls_at(self, stream: _OutStream) -> float:
        """When ``stream`` counts as stalled if its successor stays silent; never if the
        successor owes the drain nothing (an idle stream is not a stalled one)."""
        state = stream.state
        if state is StreamState.OPEN:
            owes = bool(stream.inflight) or (bool(stream.pending.records) and stream.credit <= 0)
        else:
            owes = state is StreamState.OFFERED
        return stream.progress_at + self._stall_after if owes else math.inf

    def _next_stall(self, now: float) -> float:
        return min(
            (at for at in map(self._stalls_at, self._tier) if at > now),
            default=math.inf,
        )

    async def _give_up_on_stalled(self) -> bool:
        """Cancel the streams of the tier that stalled, if another one still answers: the
        drain loop then takes their records back and routes them to it. True if any."""
        now = self._clock.now()
        stalled: list[_OutStream] = []
        answering = False
        for stream in self._tier:
            if self._stalls_at(stream) <= now:
                stalled.append(stream)
            elif stream.state is StreamState.OPEN:
                answering = True
        if not stalled or not answering:
            return False
        why = f"made no progress for {self._stall_after:g} s"
        for stream in stalled:
            # Within the stall time too: a peer whose link takes no Cancel holds nothing
            # back (past the limit the link drops, and the peer with it).
            cancel = Cancel(stream.stream, why)
            if await self._send(stream, cancel, min(self._deadline, now + self._stall_after)):
                logger.warning("successor %s %s: its share goes elsewhere", stream.peer.name, why)
            self._report.refusals[stream.peer.name] = why
        self._changed.set()
        return True

    async def _flush_full(self, stream: _OutStream, report: NamespaceReport, until: float) -> None:
        """Send chunks while the stream's queue holds a chunk's worth of records."""
        while stream.state is StreamState.OPEN and not stream.full:
            queued = len(stream.pending.records)
            if queued < self._stream_chunk_records(stream):
                return
            await self._flush(stream, report, until)
            if len(stream.pending.records) >= queued:
                return  # nothing sent: out of time, or the stream stopped

    async def _flush(self, stream: _OutStream, report: NamespaceReport, until: float) -> None:
        """Send the stream's queued records as a chunk (as many as :meth:`_room` allows)
        once it has credit; the rest stays queued."""
        ready = await self._wait(
            lambda: (
                stream.state is not StreamState.OPEN
                or (stream.credit > 0 and self._room(stream, until) != 0)
            ),
            until,
            stalls=True,
        )
        if not ready or stream.state is not StreamState.OPEN:
            return  # the records stay queued: taken back by the caller
        room = self._room(stream, until)
        if room < 0:
            stream.full = True
            logger.info(
                "the link to %s carries no more chunks before the deadline (at its observed "
                "rate): its share goes elsewhere",
                stream.peer.name,
            )
            self._changed.set()
            return
        pending = stream.pending
        rest = pending.records[room:]
        if rest:
            stream.pending = _Pending(pending.records[:room], pending.pulled_at)
        await self._flush_now(stream, report, until)
        if rest:
            if stream.pending.records:
                stream.pending.records.extend(rest)
            else:
                stream.pending = _Pending(rest, pending.pulled_at)

    async def _flush_now(self, stream: _OutStream, report: NamespaceReport, until: float) -> None:
        """Send the stream's queued records as one chunk (split if too large for a frame)."""
        if stream.state is not StreamState.OPEN:
            return
        pending = stream.pending
        stream.pending = _Pending()
        records = pending.records
        to_send = records
        if stream.chain is not None:
            # Inflight keeps the originals (a retry to another successor may need another
            # version), so each converted record stays paired with its original.
            kept, to_send, failed = stream.chain.apply_keeping(records)
            if failed:
                kept_ids = set(kept)
                # The hooks say how many failed for each reason, not which: the reasons
                # are dealt out in order (what counts is that each is counted once).
                reasons = [why for why, count in sorted(failed.items()) for _ in range(count)]
                lost = [r for i, r in enumerate(records) if i not in kept_ids]
                self._drop(report, lost, reasons)
                records = [records[i] for i in kept]
        payload, rejected = self._encode(stream, to_send)
        if rejected:
            rejected_ids = {id(r) for r, _ in rejected}
            why_of = {id(r): why for r, why in rejected}
            kept = [i for i, r in enumerate(to_send) if id(r) not in rejected_ids]
            kept_ids = set(kept)
            gone = [i for i in range(len(records)) if i not in kept_ids]
            self._drop(report, [records[i] for i in gone], [why_of[id(to_send[i])] for i in gone])
            records = [records[i] for i in kept]
            to_send = [to_send[i] for i in kept]
        if not records:
            return
        if len(payload) > self._max_chunk_bytes or (
            # Records larger than the average (or the first chunk, sized before the
            # records' size is known): the link gets the size its Acks ask for.
            len(records) > 1 and len(payload) > max(2 * stream.chunk_bytes, START_CHUNK_BYTES)
        ):
            await self._send_split(stream, report, records, pending.pulled_at, until)
            return
        if self._chunk_bytes is not None:
            # Beside serving: the loop's other tasks get their turn between two chunks (a
            # send that the transport's buffer takes whole does not suspend).
            await anyio.lowlevel.checkpoint()
        if self._pace is not None and not await self._paced(until):
            stream.pending = _Pending(records + stream.pending.records, pending.pulled_at)
            return  # out of time: the records stay queued, for the caller to take back
        self._bytes_per_record = len(payload) / len(records)
        seq = stream.machine.next_seq
        now = self._clock.now()
        if not stream.inflight:
            stream.progress_at = now  # it owed nothing until now: the stall clock starts
        stream.inflight[seq] = (records, pending.pulled_at)
        stream.sizes[seq] = (len(payload), now)
        age = max(0.0, now - pending.pulled_at)
        chunk = Chunk(stream.stream, seq, len(records), age, payload)
        # Counted when queued for the writer; a chunk it never writes is taken off again.
        report.sent += len(records)
        report.bytes += len(payload)
        if await self._send(stream, chunk, until):
            self._paced_bytes += len(payload)
        elif stream.machine.next_seq == seq:
            # Never queued (out of time, or the stream ended meanwhile): nobody received
            # it, so it is bound to nobody. Queued again, for the caller to take back.
            report.sent -= len(records)
            report.bytes -= len(payload)
            del stream.inflight[seq]
            del stream.sizes[seq]
            stream.pending = _Pending(records + stream.pending.records, pending.pulled_at)

    async def _paced(self, until: float) -> bool:
        """Wait until the bytes sent so far fit the pace (False: ``until`` came first)."""
        assert self._pace is not None
        now = self._clock.now()
        if math.isnan(self._paced_from):
            self._paced_from = now
        due = self._paced_from + self._paced_bytes / self._pace
        if due >= until:
            return now >= due
        while self._clock.now() < due:
            if self._stopped:
                return False
            self._changed = anyio.Event()
            await self._clock.wait(self._changed, due)
        return True

    def _timed_encode(self, records: list[Record]) -> tuple[bytes, list[tuple[Record, str]]]:
        """Encode, learning the encoding's cost per record: it sizes the snapshot reserve
        (real seconds, not the engine's clock: it is CPU work, slower on a loaded box)."""
        started = _cpu_clock()
        result = self._codec.encode_records(records)
        if records:
            cost = (_cpu_clock() - started) / len(records)
            previous = self._encode_seconds_per_record
            self._encode_seconds_per_record = cost if not previous else (previous + cost) / 2
        return result

    def _stream_until(
        self, tracked: Tracked, report: NamespaceReport, deadline: float, *, sized: bool
    ) -> float:
        """When streaming stops, with a snapshot store: the reserve for the records not
        acknowledged yet (see :func:`snapshot_reserve`). ``sized``: the export is the
        adapter's own, so its size tells how many are still to be pulled."""
        left = report.records - report.acknowledged
        if sized:
            left += max(0, len(tracked.adapter) - report.records)
        reserve = snapshot_reserve(
            self._time_limit, left, self._encode_seconds_per_record * SNAPSHOT_COST_FACTOR
        )
        return deadline - reserve

    def _encode(
        self, stream: _OutStream, records: list[Record]
    ) -> tuple[bytes, list[tuple[Record, str]]]:
        """Encode a chunk; with spread ``all`` the same records for the next successor
        reuse the encoding (records converted by a chain are new objects each time)."""
        if not self._everywhere or stream.chain is not None:
            return self._timed_encode(records)
        identity = tuple(map(id, records))
        cached = self._encoded.get(identity)
        if cached is not None:
            return cached[1], cached[2]
        payload, rejected = self._timed_encode(records)
        encoded = self._encoded
        encoded[identity] = (records, payload, rejected)
        self._encoded_bytes += len(payload)
        while self._encoded_bytes > ENCODED_BYTES and len(encoded) > 1:
            oldest = encoded.pop(next(iter(encoded)))
            self._encoded_bytes -= len(oldest[1])
        return payload, rejected

    async def _send_split(
        self,
        stream: _OutStream,
        report: NamespaceReport,
        records: list[Record],
        pulled_at: float,
        until: float,
    ) -> None:
        if len(records) == 1:
            # The limit in the reason: the report is where a user learns it exists.
            why = f"record too large for a frame (over {self._max_chunk_bytes} bytes encoded)"
            self._drop(report, records, [why])
            return
        half = len(records) // 2
        parts = (records[:half], records[half:])
        for index, part in enumerate(parts):
            stream.pending = _Pending(part, pulled_at)
            await self._flush(stream, report, until)
            if stream.pending.records or stream.state is not StreamState.OPEN:
                # Out of time or credit, or the stream failed: what was not sent stays
                # queued after what is still there, for the caller to take back.
                rest = [record for later in parts[index + 1 :] for record in later]
                if rest and not stream.pending.records:
                    stream.pending = _Pending(rest, pulled_at)
                else:
                    stream.pending.records.extend(rest)
                return

    async def _finish(self, streams: list[_OutStream], until: float) -> bool:
        """Flush what is queued and wait for every acknowledgement. False: go round again
        (a successor failed and its records are back in play)."""
        report = self._report
        if self._everywhere:
            # Each at its own pace: a slow successor's queue must not hold back the last
            # chunk of a fast one.
            await self._flush_each(
                streams,
                until,
                whole=True,
                done=lambda live: not any(s.pending.records for s in live),
            )
        for stream in streams:
            while stream.pending.records and stream.state is StreamState.OPEN and not stream.full:
                queued = len(stream.pending.records)
                await self._flush(stream, report, until)
                if len(stream.pending.records) >= queued:
                    break

        def stuck(s: _OutStream) -> bool:
            return s.state is not StreamState.OPEN or (s.full and bool(s.pending.records))

        return await self._wait(
            lambda: (
                all(not s.inflight and not s.pending.records for s in streams)
                or any(map(stuck, streams))
            ),
            until,
            stalls=True,
        ) and not any(map(stuck, streams))

    @staticmethod
    def _note_successors(streams: list[_OutStream], report: NamespaceReport) -> None:
        for stream in streams:
            if stream.acknowledged and stream.peer.name not in report.successors:
                report.successors.append(stream.peer.name)

    async def _snapshot_or_drop(
        self,
        tracked: Tracked,
        report: NamespaceReport,
        leftovers: list[Record],
        exporter: Iterator[Record],
        *,
        sized: bool,
        reason: str,
        deadline: float,
    ) -> None:
        """Write ``leftovers`` and the rest of ``exporter`` to the snapshot store, or count
        them as dropped. ``sized``: the exporter is the adapter's own export, so its size
        tells how many records are left."""
        store = self._snapshots
        cut = reason == "deadline"
        if store is None:
            self._give_back(leftovers)
            rest = await self._count_rest(
                tracked, report, exporter, sized=sized, deadline=deadline, forget=cut
            )
            report.drop(f"{reason}, no snapshot store", len(leftovers) + rest)
            return
        taken = deque(leftovers)
        counting = self._counting(exporter, report)
        exhausted = False
        # Records of the batch in hand pulled from the export (never sent anywhere), after
        # those taken back from streams (which a successor may have applied late).
        pulled = 0

        async def next_batch() -> list[Record]:
            nonlocal exhausted, pulled
            size = self._snapshot_records()
            batch = [taken.popleft() for _ in range(min(size, len(taken)))]
            pulled = 0
            if len(batch) < size and not exhausted:
                more, exhausted = await self._pull_counted(counting, size - len(batch))
                batch += more
                pulled = len(more)
            return batch

        batch = await next_batch()
        if not batch:
            return
        # What an ownership adapter wrote, to give back if the snapshot fails: it took them.
        kept: list[Record] | None = (
            []
            if tracked.adapter.moves_ownership and isinstance(tracked.adapter, SupportsGiveBack)
            else None
        )
        writer: SnapshotWriter | None = None
        written = 0
        try:
            writer = store.begin(
                tracked.name,
                cluster=self._cluster,
                kind=tracked.adapter.kind,
                version=tracked.version,
                node=self._node,
                release=self._release,
                created_at=self._drain_wall,
            )
            # Sized by bytes like stream chunks: a count alone lets large values make one
            # chunk bigger than the store takes (64 MiB) and than memory should hold.
            while batch:
                if self._clock.now() >= deadline:
                    self._give_back(batch + list(taken))
                    # What was never sent is not on any successor: the catch-up sends it.
                    self._forget(report, batch[len(batch) - pulled :])
                    rest = len(taken)
                    taken.clear()
                    rest += await self._count_rest(
                        tracked, report, exporter, sized=sized, deadline=deadline, forget=True
                    )
                    report.drop("deadline", len(batch) + rest)
                    break
                written += await self._write_snapshot_chunk(writer, report, batch)
                if kept is not None:
                    kept += batch
                batch = await next_batch()
            await anyio.to_thread.run_sync(writer.commit)
        except SnapshotError as exc:
            # The store failed (a full disk): nothing of this snapshot exists. What an
            # ownership adapter took goes back to it; the report says what was lost.
            if writer is not None:
                writer.abort()
            logger.error("could not snapshot %r: %s", tracked.name, exc)
            if kept is not None:
                self._give_back(kept + batch + list(taken))
            taken.clear()
            await self._count_rest(
                tracked, report, exporter, sized=sized, deadline=deadline, forget=True
            )
            unaccounted = (
                report.records
                - report.acknowledged
                - report.snapshotted
                - sum(report.dropped.values())
            )
            if unaccounted > 0:
                report.drop(f"snapshot store failed: {exc}", unaccounted)
            return
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        report.snapshotted += written
        logger.info("snapshotted %d records of %r (%s)", written, tracked.name, reason)

    def _snapshot_records(self) -> int:
        if not self._bytes_per_record:
            return FIRST_CHUNK_RECORDS
        wanted = int(MAX_CHUNK_BYTES / self._bytes_per_record)
        return max(1, min(MAX_CHUNK_RECORDS, wanted))

    async def _write_snapshot_chunk(
        self, writer: SnapshotWriter, report: NamespaceReport, batch: list[Record]
    ) -> int:
        """Encode and write ``batch``, halving it while it exceeds a chunk; returns the
        records written."""
        payload, rejected = self._codec.encode_records(batch)
        if len(payload) > self._max_chunk_bytes and len(batch) > 1:
            half = len(batch) // 2
            first = await self._write_snapshot_chunk(writer, report, batch[:half])
            return first + await self._write_snapshot_chunk(writer, report, batch[half:])
        for _, why in rejected:
            report.drop(why)
        count = len(batch) - len(rejected)
        if not count:
            return 0
        if len(payload) > MAX_SNAPSHOT_CHUNK:
            report.drop(
                f"record too large for a snapshot chunk (over {MAX_SNAPSHOT_CHUNK} bytes encoded)",
                count,
            )
            return 0
        self._bytes_per_record = len(payload) / count
        await anyio.to_thread.run_sync(writer.write_chunk, payload, count)
        return count


def snapshot_reserve(time_limit: float, left: int, seconds_per_record: float) -> float:
    """Seconds kept at the end of a drain of ``time_limit`` for snapshotting ``left``
    records at ``seconds_per_record``: at least :data:`SNAPSHOT_RESERVE` of the time limit,
    at most :data:`SNAPSHOT_RESERVE_CAP` of it (a successor still gets its share)."""
    if time_limit <= 0:
        return 0.0
    wanted = left * seconds_per_record
    return time_limit * min(SNAPSHOT_RESERVE_CAP, max(SNAPSHOT_RESERVE, wanted / time_limit))


@dataclass(frozen=True, slots=True)
class _Target:
    peer: Peer
    link: Link
    version: int
    chain: Chain | None
