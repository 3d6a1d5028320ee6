"""Pre-copy streams: copying caches to a newer node while both serve, then only the delta.

The engine's parts (the node runs them, see the README's "Pre-copy"). A pre-copy runs as
drains of the copyable namespaces whose adapters track changes
(:class:`~handoff.SupportsChangeTracking` and ``import_delta``, as the cachetools adapters
do) to one newer peer:

- the copy: :meth:`Precopy.copy_sources` marks each namespace (from then on its adapter
  notes every key written, read where reads reorder, or deleted), then exports it. The
  stream is offered with the kind ``<kind>+precopy`` and applied as any handoff (records
  arrive hottest first and keep their order; a key the receiver holds is kept).
- the live stream, while both serve, once the copy is complete: batch after batch,
  :meth:`Precopy.live_batch` lists what changed since the last batch the peer
  acknowledged whole (:meth:`Precopy.acknowledged`), sent as a delta (below); a batch cut
  short is listed again with the next. Only for adapters that list changes without
  listing every key (``lists_changes_cheaply``); the others wait for the drain's delta.
- the delta, at the sender's drain: :meth:`Precopy.delta_sources` yields only what
  changed since the mark, deletions as tombstones, offered as ``<kind>+delta``: the
  receiver applies it with ``import_delta`` (each record replaces the entry it holds and
  becomes the hottest; a tombstone deletes), so it ends with the sender's final state. The
  delta travels in :func:`delta_order` (deletions, then writes coldest first), so a
  deadline would cut its hottest writes: a delta is meant to be small. Run it without a
  snapshot store: a delta applies only on top of its copy.

Both kinds are refused (a clean Refuse, not a protocol error) by receivers that cannot
apply a delta, whatever release they run: a node before this module compares the offered
kind with its adapter's and refuses a stranger. So a node only pre-copies to receivers that
will take its delta, and an old receiver simply gets the whole namespace at the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING, Final

import anyio

from handoff._adapter import (
    DELETED,
    Adapter,
    ChangesLost,
    ImportResult,
    Record,
    SupportsChangeTracking,
    SupportsPausedExport,
)
from handoff.engine._intake import admit
from handoff.engine._planner import compare_releases
from handoff.engine._tracked import Tracked
from handoff.membership import Peer
from handoff.transforms import Chain

if TYPE_CHECKING:
    from handoff.engine._sender import Drainer

__all__ = (
    "ANSWER_WAIT",
    "CANCEL_WAIT",
    "COPY_ATTEMPTS",
    "DELTA",
    "DELTA_SHARE",
    "LINK_WAIT",
    "LIVE_FINISH_WAIT",
    "LIVE_IDLE_LOOK",
    "LIVE_POLL",
    "LIVE_TIME_LIMIT",
    "PRECOPY",
    "PRECOPY_CHUNK_BYTES",
    "PRECOPY_TIME_LIMIT",
    "RESET",
    "TOMBSTONE",
    "Bell",
    "Precopy",
    "PrecopyState",
    "apply_delta",
    "delta_order",
    "from_wire",
    "is_newer",
    "split_kind",
    "supports_delta",
    "to_wire",
)

PRECOPY: Final = "+precopy"
"""Offer kind suffix of a pre-copy's copy stream."""
DELTA: Final = "+delta"
"""Offer kind suffix of a pre-copy's delta stream."""
PRECOPY_TIME_LIMIT: Final = 3600.0
"""Seconds a pre-copy may take (it runs while the node serves, paced)."""
DELTA_SHARE: Final = 0.5
"""Share of the drain's time each delta may take (the drain of the rest follows)."""
PRECOPY_CHUNK_BYTES: Final = 64 * 1024
"""What a pre-copy's chunks aim at (a drain's aim at 1 MiB): the old node's event loop is
busy with one chunk at a time, so this bounds what a pre-copy adds to its serving latency
(see the README's "Pre-copy")."""
LINK_WAIT: Final = 5.0
"""Seconds a pre-copy waits for the link of a peer that just came up."""
CANCEL_WAIT: Final = 1.0
"""Seconds a drain waits for a pre-copy it stopped to cancel its streams."""
ANSWER_WAIT: Final = 0.5
"""Seconds a pre-copy (its copy, or a batch of its live stream) waits for its peer to
answer its offer before it stops and offers again: a drain waits for a lone successor as
long as it lasts, but an offer can go unanswered while the peer serves (seen when it was
sent on a link that the two nodes then closed as a duplicate of the other)."""
COPY_ATTEMPTS: Final = 3
"""Offers of a copy that went unanswered (:data:`ANSWER_WAIT`) before it is partial."""
LIVE_POLL: Final = 0.002
"""Seconds between two looks for changes of the live stream (while a pre-copied peer
serves beside this node) where nothing wakes it: when an adapter cannot call back at a
change (no ``wake_on_change``), and while the peer is away (between two links). The
cachetools adapters wake the stream at the change instead (see :class:`Bell`): what
changed is sent as soon as the batch before it is acknowledged, so a change reaches the
peer within one batch's round trips."""
LIVE_IDLE_LOOK: Final = 1.0
"""Seconds a live stream woken by changes waits before it looks anyway (whether the peer
left, whether the node still serves)."""
LIVE_TIME_LIMIT: Final = 30.0
"""Seconds one batch of the live stream may take (it holds what changed since the last
acknowledged batch; an unacknowledged one is sent again with the next)."""
LIVE_FINISH_WAIT: Final = 0.25
"""Seconds a drain lets the live stream's batch in flight finish before it stops it (what
that batch did not get acknowledged is in the drain's delta)."""
TOMBSTONE: Final = "handoff:deleted"
"""The meta of a delta record that deletes its key (value ``None``); in delta streams only."""
RESET: Final = "handoff:reset"
"""The meta of a delta's first record (key and value ``None``) when the sender could no
longer tell what changed since the mark (:exc:`~handoff.ChangesLost`: its record of
changes is bounded): the receiver deletes every entry it holds, and the rest of the delta
is the whole cache, coldest first, each record becoming the hottest as in any delta."""


def supports_delta(adapter: Adapter) -> bool:
    """Whether ``adapter`` can be pre-copied: copyable state that tracks changes and
    applies deltas."""
    return (
        not adapter.moves_ownership
        and isinstance(adapter, SupportsChangeTracking)
        and callable(getattr(adapter, "import_delta", None))
    )


def split_kind(kind: str) -> tuple[str, str]:
    """``("cachetools", "+delta")`` for ``"cachetools+delta"``; ``(kind, "")`` otherwise."""
    for suffix in (PRECOPY, DELTA):
        if kind.endswith(suffix):
            return kind[: -len(suffix)], suffix
    return kind, ""


def delta_order(records: Iterable[Record]) -> list[Record]:
    """What ``changed_since`` yields (written records hottest first, then deletions) in
    the order ``import_delta`` takes and a delta stream carries: the deletions first (they
    make room), then the written records coldest first (each applied one becomes the
    hottest, so chunk after chunk the receiver ends in the sender's order). A delta is
    as large as what changed since the mark, which the adapter holds anyway."""
    written: list[Record] = []
    deletions: list[Record] = []
    for record in records:
        (deletions if record[1] is DELETED else written).append(record)
    written.reverse()
    return deletions + written


def to_wire(records: Iterable[Record]) -> Iterator[Record]:
    """A delta as it travels: ``DELETED`` becomes a tombstone the codec can carry."""
    for record in records:
        if record[1] is DELETED:
            yield record[0], None, TOMBSTONE
        else:
            yield record


def from_wire(records: Iterable[Record]) -> list[Record]:
    """Tombstones back to ``(key, DELETED, None)``."""
    return [
        (record[0], DELETED, None) if type(record[2]) is str and record[2] == TOMBSTONE else record
        for record in records
    ]


def apply_delta(
    tracked: Tracked, chain: Chain | None, records: list[Record], *, age: float
) -> tuple[ImportResult, dict[str, int]]:
    """Apply a decoded delta chunk: written records go through the upgrade hooks and the
    validator as any handoff's do; tombstones delete their key (they carry no value for
    the validator to vet: a peer holding the cookie can delete a cached entry, which costs
    a cache miss); a :data:`RESET` record first deletes every entry held. An adapter
    error drops the chunk with its reason, as on import."""
    written: list[Record] = []
    deletions: list[Record] = []
    reset = 0
    for record in from_wire(records):
        if type(record[2]) is str and record[2] == RESET:
            reset += 1
            continue
        (deletions if record[1] is DELETED else written).append(record)
    if reset:
        try:
            held = [(key, DELETED, None) for key, _, _ in tracked.adapter.export()]
            tracked.adapter.import_delta(held, age=age)  # type: ignore[attr-defined]
        except Exception as exc:
            return ImportResult(), {f"import failed: {type(exc).__name__}": len(records)}
    written, dropped = admit(tracked, chain, written)
    batch = deletions + written
    try:
        result: ImportResult = tracked.adapter.import_delta(batch, age=age)  # type: ignore[attr-defined]
    except Exception as exc:
        failed = f"import failed: {type(exc).__name__}"
        return ImportResult(applied=reset), {**dropped, failed: len(batch)}
    if result.total != len(batch):
        unknown = "outcome unknown: adapter miscounted"
        return ImportResult(applied=reset), {**dropped, unknown: len(batch)}
    for reason, count in result.dropped.items():
        dropped[reason] = dropped.get(reason, 0) + count
    return result + ImportResult(applied=reset), dropped


def _threadsafe_soon() -> Callable[[Callable[[], object]], object]:
    """Of the running event loop: schedule a call from any thread, without waiting."""
    try:
        return asyncio.get_running_loop().call_soon_threadsafe
    except RuntimeError:  # not asyncio: anyio's other backend
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon


class Bell:
    """Wakes a live stream's task when a tracked cache changes, from whichever thread
    changes it (a sync app writes from its threads, holding the node's lock): on the
    event loop's thread :meth:`ring` sets the event; from another it schedules that on
    the loop and returns at once (it must not wait for the loop: the writer may hold the
    node's lock, which the loop may be waiting for). Made on the loop's thread."""

    def __init__(self) -> None:
        self.event = anyio.Event()
        self._thread = threading.get_ident()
        self._soon = _threadsafe_soon()

    def ring(self) -> None:
        """Something changed: wake the waiter (thread-safe, never blocks)."""
        if threading.get_ident() == self._thread:
            self.event.set()
            return
        with contextlib.suppress(Exception):  # the loop has ended: nobody waits
            self._soon(self._set)

    def _set(self) -> None:
        self.event.set()  # (the event current when it runs: a spurious look at worst)

    def rearm(self) -> None:
        """Before listing what changed: a change noted after the listing rings anew."""
        if self.event.is_set():
            self.event = anyio.Event()


class Precopy:
    """The marks of one pre-copy: which namespaces, and since when they changed."""

    def __init__(self, tracked: Mapping[str, Tracked]) -> None:
        self.tracked = {name: one for name, one in tracked.items() if supports_delta(one.adapter)}
        self._marks: dict[str, object] = {}
        self.complete: frozenset[str] = frozenset()
        """Namespaces whose every record the receiver acknowledged (set when the copy
        ends; what it dropped, full of its own entries, is in the report)."""
        self.state = "waiting"
        """``waiting`` (for another pre-copy), ``copying``, ``complete`` (every namespace
        acknowledged whole) or ``partial`` (cut short, refused, or not all of it kept)."""
        self.copied: dict[str, int] = {}
        """Records acknowledged so far, per namespace."""
        self.entries: dict[str, int] = {}
        """Entries per namespace when the copy began."""
        self.reset: set[str] = set()
        """Namespaces whose delta was the whole cache (:data:`RESET`)."""
        self.streamed = 0
        """Records the live stream got acknowledged (see :meth:`live_batch`)."""
        self.live_lost: set[str] = set()
        """Namespaces the live stream left to the drain's delta: their adapter lists
        changes only by listing every key (not ordered by last use, or an import placed
        entries out of that order), or their record of changes outgrew its bound (that
        delta is then the whole cache again)."""
        self.live_stopped = False
        """Set by the drain: no more live batches."""
        self.live_done: anyio.Event | None = None
        """Set when the live stream's task ends (``None``: it never started)."""
        self.live_drainer: Drainer | None = None
        """The live batch in flight, if any."""
        self.bell: Bell | None = None
        """Wakes the live stream (a change, or the drain); made when it starts."""

    def status(self, peer: str) -> dict[str, object]:
        """For ``handoff status``: the peer, the state, records copied of how many, and
        records streamed live since the copy."""
        return {
            "peer": peer,
            "state": self.state,
            "copied": sum(self.copied.values()),
            "entries": sum(self.entries.values()),
            "streamed": self.streamed,
        }

    def copy_sources(
        self, lock: AbstractContextManager[object] | None = None
    ) -> dict[str, Callable[[], Iterator[Record]]]:
        """The Drainer's ``sources`` for the copy: each marks its namespace, then exports
        it (the mark first: a write during the export is in the delta), with pauses in
        its listing where the adapter makes them (:class:`SupportsPausedExport`: the
        Drainer lets the event loop run at each, so that the node keeps serving). Such an
        export left unfinished is closed under ``lock`` (the node's: closing it puts the
        cache's order back, which the app's threads must not see half done)."""

        def source(name: str) -> Callable[[], Iterator[Record]]:
            def records() -> Iterator[Record]:
                adapter = self.tracked[name].adapter
                assert isinstance(adapter, SupportsChangeTracking)
                self._marks[name] = adapter.mark()
                if isinstance(adapter, SupportsPausedExport):
                    return _closed_under(adapter.export_paused(), lock or nullcontext())
                return iter(adapter.export())

            return records

        return {name: source(name) for name in self.tracked}

    @property
    def marked(self) -> frozenset[str]:
        """The namespaces whose copy began (and so have a delta)."""
        return frozenset(self._marks)

    def delta_sources(self) -> dict[str, Callable[[], Iterator[Record]]]:
        """The Drainer's ``sources`` for the delta of every marked namespace: what changed
        since the mark, or since the last delta (each delta marks anew)."""

        def source(name: str) -> Callable[[], Iterator[Record]]:
            def records() -> Iterator[Record]:
                adapter = self.tracked[name].adapter
                assert isinstance(adapter, SupportsChangeTracking)
                try:
                    delta = delta_order(adapter.changed_since(self._marks[name]))
                except ChangesLost:
                    # Everything again, on an emptied receiver: what it holds from the
                    # copy may since have been changed or deleted here, unseen.
                    self.reset.add(name)
                    everything = list(adapter.export())
                    everything.reverse()
                    self._marks[name] = adapter.mark()
                    return chain([(None, None, RESET)], everything)
                # The next delta (the catch-up after a manual drain) starts here: the
                # records are listed by now, under the node's lock.
                self._marks[name] = adapter.mark()
                return to_wire(delta)

            return records

        return {name: source(name) for name in self._marks}

    def live_batch(self) -> dict[str, tuple[list[Record], object]]:
        """The live stream's next batch: per namespace whose copy is complete, what
        changed since its last acknowledged batch (or the copy's mark), in the order a
        delta travels, with the mark to keep once the peer acknowledged all of it (see
        :meth:`acknowledged`). Call it under the node's lock (the app's threads write
        the caches). A namespace whose record of changes was lost leaves the live
        stream: the drain's delta sends it whole (:data:`RESET`)."""
        batch: dict[str, tuple[list[Record], object]] = {}
        for name in sorted(self.complete & self.marked - self.live_lost):
            adapter = self.tracked[name].adapter
            assert isinstance(adapter, SupportsChangeTracking)
            cheaply = getattr(adapter, "lists_changes_cheaply", None)
            if not callable(cheaply) or not cheaply():
                # Listing its changes means listing every key: not every few milliseconds.
                self.live_lost.add(name)
                continue
            try:
                changed = delta_order(adapter.changed_since(self._marks[name]))
            except RuntimeError:
                # A thread changed the cache without the node's lock while it was listed:
                # the mark stays, the next look lists it again.
                continue
            except (ChangesLost, ValueError):
                # (ValueError: tracking stopped.) Not marked again here: the drain's delta
                # finds the loss itself and sends a reset and everything.
                self.live_lost.add(name)
                continue
            if changed:
                batch[name] = (list(to_wire(changed)), adapter.mark())
        return batch

    def wake_on_change(self, waker: Callable[[], None]) -> bool:
        """Have ``waker()`` called at the next change of any namespace the live stream
        carries; False if one of them cannot call back (then the stream polls). Call it
        under the node's lock, with the listing of the batch it follows: a change after
        that listing wakes it, and one before it is in the batch."""
        every = True
        for name in sorted(self.complete & self.marked - self.live_lost):
            wake_on_change = getattr(self.tracked[name].adapter, "wake_on_change", None)
            if not callable(wake_on_change) or not wake_on_change(waker):
                every = False
        return every

    def acknowledged(self, name: str, mark: object, records: int) -> None:
        """The peer applied a live batch whole: later deltas start at its ``mark``."""
        self._marks[name] = mark
        self.streamed += records

    def mark_of(self, name: str) -> object | None:
        """Where the next delta of namespace ``name`` starts (``None``: not marked)."""
        return self._marks.get(name)


def _closed_under(
    records: Iterator[Record], lock: AbstractContextManager[object]
) -> Iterator[Record]:
    """``records``, closed under ``lock`` when this ends (finished, closed, collected)."""
    try:
        for record in records:  # noqa: UP028 (``yield from`` would close them first)
            yield record
    finally:
        close = getattr(records, "close", None)
        if callable(close):
            with lock:
                close()


def is_newer(peer: Peer, release: str, started_at: float) -> bool:
    """Whether ``peer`` is what a node of ``release`` that started at ``started_at`` would
    hand its state to first: a newer release, or where releases do not compare, a node
    that started later (as in successor choice)."""
    order = compare_releases(peer.release, release)
    if order is None:
        return peer.started_at > started_at
    return order > 0


@dataclass(slots=True)
class PrecopyState:
    """A node's pre-copies: the peers they went to, and the one running."""

    enabled: bool = False
    pace: float | None = None
    """Bytes per second (``None``: unpaced)."""
    begun: dict[str, Precopy] = field(default_factory=dict)
    running: Drainer | None = None
    lock: anyio.Lock | None = None
    """One pre-copy at a time; made when the node starts (in its event loop)."""

    def forget_changes(self, name: str) -> int:
        """After a live batch of namespace ``name``: let its adapter forget what changed
        before every pre-copy's mark (a peer that left keeps its own, and so what it
        would need), so that the record of changes holds the live streams' lag, not
        everything since the first copy. Returns how many keys were forgotten."""
        marks = [p.mark_of(name) for p in self.begun.values() if name in p.marked]
        holders = [p for p in self.begun.values() if name in p.tracked]
        if not marks or not holders:
            return 0
        forget = getattr(holders[0].tracked[name].adapter, "forget_changes_before", None)
        return int(forget(marks)) if callable(forget) else 0
