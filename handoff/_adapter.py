"""The adapter protocol: how one kind of tracked object hands its state in and out.

An adapter wraps one tracked object (a cache, a dict, a counter set, an actor registry) and
turns it into a stream of records and back. The engine never looks inside the object: it
pulls records from :meth:`Adapter.export` (lazily, hottest first), chunks, transforms and
ships them, and the receiving node's adapter applies them with :meth:`Adapter.import_records`.

A record is ``(key, value, meta)``. ``key`` and ``value`` are the user's data (msgpack plus
the codec's extension types); ``meta`` is the adapter's own small annotation: the remaining
time-to-live of a TTL cache entry in seconds, an LFU use count, ``None`` for plain mappings.
Metadata is always relative, never absolute: clocks differ between machines.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, runtime_checkable

from handoff._errors import HandoffError

__all__ = (
    "DELETED",
    "PAUSE",
    "Adapter",
    "ChangesLost",
    "ImportResult",
    "Record",
    "SupportsChangeTracking",
    "SupportsFreeze",
    "SupportsGiveBack",
    "SupportsPausedExport",
)

Record = tuple[Any, Any, Any]
"""``(key, value, meta)``; see the module documentation."""


class _Deleted:
    __slots__ = ()

    def __repr__(self) -> str:
        return "DELETED"

    def __reduce__(self) -> str:
        return "DELETED"


DELETED: Final[Any] = _Deleted()
"""The value of a record that says its key was deleted (:class:`SupportsChangeTracking`).
Not a wire value: a pre-copy's delta must carry deletions its own way."""


PAUSE: Final[Record] = (object(), None, None)
"""Not a record: what :meth:`SupportsPausedExport.export_paused` yields between two bounded
steps of its work, for the engine to give the event loop (and threads waiting for the
node's lock) a turn before it pulls on."""


class ChangesLost(HandoffError, LookupError):
    """:meth:`SupportsChangeTracking.changed_since` cannot name what changed since the mark
    (its record outgrew its bound): what changed may be anything, so send everything."""


@dataclass(frozen=True, slots=True)
class ImportResult:
    """What became of the records given to one :meth:`Adapter.import_records` call.

    Every record lands in exactly one bucket: ``applied + kept_existing +
    sum(dropped.values()) == len(records)``.
    """

    applied: int = 0
    """Records now held by the receiving object."""
    kept_existing: int = 0
    """Records not applied because the receiver already held a newer entry for the key."""
    dropped: Mapping[str, int] = field(default_factory=dict)
    """Records not applied, counted per reason (``"expired"``, ``"receiver full"`` ...)."""

    @property
    def total(self) -> int:
        """Number of records this result accounts for."""
        return self.applied + self.kept_existing + sum(self.dropped.values())

    def __add__(self, other: ImportResult) -> ImportResult:
        dropped = dict(self.dropped)
        for reason, count in other.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + count
        return ImportResult(
            self.applied + other.applied, self.kept_existing + other.kept_existing, dropped
        )


@runtime_checkable
class Adapter(Protocol):
    """Moves the state of one tracked object.

    ``kind`` names the record format (``"cachetools"``, ``"mapping"``, ``"counters"`` ...):
    a receiver accepts a namespace only from a sender whose adapter has the same kind.
    ``moves_ownership`` is ``False`` for caches, whose copies are harmless, and ``True`` for
    state that must live in exactly one place (counters, actors): the engine then streams
    it first and never leaves a copy behind on the sender. Such an adapter's
    :meth:`export` *takes* what it yields (a counter's amount leaves the object as its
    record is yielded; what is written afterwards is new and goes with the next export),
    and it implements :class:`SupportsGiveBack` for what the engine could hand to nobody.
    """

    kind: str
    moves_ownership: bool

    def __len__(self) -> int:
        """Number of records an export would yield now (a hint for progress and offers)."""
        ...

    def export(self) -> Iterator[Record]:
        """Yield the object's records, hottest first, lazily.

        Must tolerate the object changing while the iterator is alive (keys that vanish are
        skipped) and must not copy values up front: memory during a drain may not grow with
        the size of the state (a list of keys is acceptable).
        """
        ...

    def import_records(self, records: Sequence[Record], *, age: float = 0.0) -> ImportResult:
        """Apply records that arrived in hottest-first order.

        ``age`` is how many seconds ago the records' metadata was computed (time spent in a
        snapshot, or waiting before being applied): relative lifetimes shrink by it. An entry
        the receiver already holds is kept (it is newer) unless the adapter was configured
        to merge.
        """
        ...


@runtime_checkable
class SupportsChangeTracking(Protocol):
    """Adapters that can list what changed since a mark (for pre-copy while serving)."""

    def mark(self) -> object:
        """Start remembering changed keys; returns a token for :meth:`changed_since`."""
        ...

    def changed_since(self, mark: object) -> Iterator[Record]:
        """Records of keys written since ``mark`` that the object still holds, hottest
        first, as the export yields them; then ``(key, DELETED, None)`` for keys deleted
        since (a value of ``None`` stays a value). Raises :exc:`ChangesLost` when it can
        no longer tell (the record of changes is bounded)."""
        ...


@runtime_checkable
class SupportsPausedExport(Protocol):
    """Adapters whose export can list a large object in bounded steps (a pre-copy runs
    while the node serves: one listing of a million keys in one go stops its event loop
    for most of a second)."""

    def export_paused(self) -> Iterator[Record]:
        """What :meth:`Adapter.export` yields, with :data:`PAUSE` between two steps of
        work that each take a bounded time; the caller releases the node's lock and lets
        the event loop run at each. Keys changed between two steps are those the object's
        change tracking notes (the export may leave them to the delta)."""
        ...


@runtime_checkable
class SupportsFreeze(Protocol):
    """Adapters whose objects must stop changing while they move (actors)."""

    def freeze(self) -> None:
        """Stop processing; queue new work until :meth:`thaw` or the object moves."""
        ...

    def thaw(self) -> None:
        """Resume processing (the handoff failed and the state stays here)."""
        ...


@runtime_checkable
class SupportsGiveBack(Protocol):
    """Adapters that move ownership: take back records nobody received.

    The engine calls :meth:`give_back` with records it took from :meth:`Adapter.export`
    and knows were applied nowhere (no successor and no snapshot store, a deadline, a
    record no successor's version can hold): they return to the object, which keeps
    serving with them (and hands them on at the next drain or the catch-up at stop).
    Records whose fate is unknown (sent, never acknowledged nor refused) are never
    given back: they may already count elsewhere.
    """

    def give_back(self, records: Sequence[Record]) -> None:
        """Merge ``records`` (as exported, metadata relative to the export) back in."""
        ...
