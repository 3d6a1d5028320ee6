"""What a manual drain exported, record by record: which records changed after it?

A node drained by hand (``handoff drain`` in a preStop hook) may go on serving, and writing
to its caches, until it stops. At stop it sends exactly the records that are new or changed
since the drain exported them (the catch-up), instead of re-sending everything or silently
leaving the new writes behind. A successor that already holds such a key keeps its copy
(successors never overwrite): the catch-up then reports the record as not applied, so an
update made after the drain is never lost without a word.

The log keeps one 64-bit hash per record the drain exported (past its deadline a drain
counts the rest by the object's size, so those the catch-up sends as well): of its
encoded ``[key, value]`` (:meth:`Codec.fingerprint_encoder`), not of ``hash((key, value))``:
CPython hashes -1 like -2, 1 like 1.0 and True, and objects without ``__eq__`` by identity
(one mutated in place would go unseen). That is 8 bytes a record for as long as the node
runs after the drain: a manual drain's price (a drain on the way out keeps no log). A record
that cannot be encoded counts as changed. Hashes of bytes are salted per process, which is
fine: both sides of the comparison are taken in the same process."""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from handoff._adapter import PAUSE, Adapter, Record

__all__ = ("SCAN_PAUSE", "SCAN_STEP", "ChangedRecords", "ExportLog", "changed_records")

SCAN_STEP = 4096
SCAN_PAUSE: Record = PAUSE
"""(The adapters' :data:`~handoff._adapter.PAUSE`.) Yielded by :func:`changed_records`
after :data:`SCAN_STEP` records that did not change: the drain then gives the event loop
its turn. A catch-up of a large cache that barely changed would otherwise scan all of it
(seconds for a million records) in one pull, and stop the node's heartbeats for as long."""


class ExportLog:
    """The hashes of the records one namespace's drain exported."""

    __slots__ = ("_encode", "_forgotten", "_hashes", "_sealed")

    def __init__(self, encode: Callable[[Any], bytes]) -> None:
        """``encode(obj)`` serializes a record's ``[key, value]``
        (:meth:`Codec.fingerprint_encoder`; one per log, it is not thread-safe)."""
        self._encode = encode
        self._hashes = array("q")
        self._forgotten = array("q")
        self._sealed = False

    def _hash(self, record: Record) -> int | None:
        try:
            return hash(self._encode([record[0], record[1]]))
        except Exception:
            return None  # the drain drops it with the codec's reason; here: "changed"

    def add(self, records: Iterable[Record]) -> None:
        """Log exported ``records``."""
        self._hashes.extend(h for h in map(self._hash, records) if h is not None)
        self._sealed = False

    def forget(self, records: Iterable[Record]) -> None:
        """Records the drain pulled and then gave up on at its deadline: the catch-up
        sends them, as it sends those the deadline left unexported."""
        self._forgotten.extend(h for h in map(self._hash, records) if h is not None)
        self._sealed = False

    def seal(self) -> None:
        """Sort the log for look-ups (once: at the end of the drain, so that the catch-up's
        deadline does not pay for it; ~0.1 s for 300,000 records)."""
        if not self._sealed:
            self._hashes = _sorted(self._hashes)
            self._forgotten = _sorted(self._forgotten)
            self._sealed = True

    def changed(self, record: Record) -> bool:
        """True unless ``record`` is exactly one the drain exported (and did not forget)."""
        self.seal()
        digest = self._hash(record)
        if digest is None:
            return True
        return not _holds(self._hashes, digest) or _holds(self._forgotten, digest)


def _sorted(hashes: array[int]) -> array[int]:
    """``hashes`` sorted, without a Python int per hash alive at once.

    ``sorted(hashes)`` makes a list of int objects: ~40 bytes a hash (a million records:
    40 MiB on top of the log's 8 MiB, at the end of a drain, which invariant 8 bounds).
    Sorting by the top byte into 256 arrays first keeps one bucket's objects alive at a
    time, and is no slower."""
    buckets = [array("q") for _ in range(256)]
    appends = [bucket.append for bucket in buckets]
    for digest in hashes:
        appends[(digest >> 56) + 128](digest)  # signed: -128..127 -> 0..255, in order
    result = array("q")
    for index in range(256):
        result.extend(sorted(buckets[index]))
        buckets[index] = array("q")  # freed as we go
    return result


def _holds(hashes: array[int], digest: int) -> bool:
    index = bisect_left(hashes, digest)
    return index < len(hashes) and hashes[index] == digest


class ChangedRecords:
    """The records ``adapter`` exports now that ``log`` does not hold: written (or
    rewritten) after the drain, with a :data:`SCAN_PAUSE` after every :data:`SCAN_STEP`
    unchanged ones. Lazy, like the export itself. :attr:`scanned` says how many records of
    the export it has looked at: a drain that must stop at its deadline counts the rest
    without looking (at a million records, the scan alone takes seconds)."""

    __slots__ = ("_records", "scanned")

    def __init__(self, adapter: Adapter, log: ExportLog) -> None:
        self.scanned = 0
        self._records = self._scan(adapter, log)

    def __iter__(self) -> Iterator[Record]:
        return self

    def __next__(self) -> Record:
        return next(self._records)

    def _scan(self, adapter: Adapter, log: ExportLog) -> Iterator[Record]:
        unchanged = 0
        for record in adapter.export():
            self.scanned += 1
            if log.changed(record):
                yield record
            else:
                unchanged += 1
                if unchanged == SCAN_STEP:
                    unchanged = 0
                    yield SCAN_PAUSE


def changed_records(adapter: Adapter, log: ExportLog) -> ChangedRecords:
    """See :class:`ChangedRecords`."""
    return ChangedRecords(adapter, log)
