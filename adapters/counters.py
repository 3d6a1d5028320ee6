"""Exact counters that move with a deploy: :class:`Counters` and its adapter.

``handoff.Counters`` holds named integer counters (usage, quotas, rate-limit windows).
``node.track("usage", counters)`` hands them off with ownership semantics: a count lives in
exactly one place, it moves at a drain (streamed before caches) and the receiver *adds* it
to what it holds, so a sender's ``page=10`` and a receiver's ``page=3`` give ``13``.

Records
    Kind ``"counters"``. A record is ``(key, amount, remaining)``: ``amount`` is an ``int``
    (never ``0``), ``remaining`` the seconds left in the key's window (a ``float``), or
    ``None`` for a key without one. Never an absolute time: clocks differ between machines.

Export takes
    The keys are listed when the export starts; each key's amount (and window) leaves the
    object, under its lock, when its record is yielded. Keys that vanished, hold ``0`` or
    whose window ran out meanwhile are skipped. Increments after a key was taken start a
    fresh amount (and a fresh window) that the next export takes: nothing is counted twice
    and nothing is left behind. :meth:`CountersAdapter.give_back` adds back what the engine
    could hand to nobody.

Import adds
    Each record's amount is added to what the receiver holds. A record's remaining time
    shrinks by ``age``; one with nothing left is dropped as ``"expired"``. When both sides
    hold a live window for the key, the *longer* remaining time wins: a rate-limit window
    must never forget counts early (it may count them a little longer). A receiver without
    ``ttl`` keeps what it receives without expiry (its counters do not expire); a receiver
    with ``ttl`` caps a remaining time at its own ``ttl`` and gives a record without one a
    fresh window. A record from a hostile or buggy peer never raises: a non-``int`` amount
    (a ``bool`` included) is dropped as ``"not an integer count"``, a remaining time that is
    not a finite number as ``"invalid remaining time"``, an unusable key or record as
    ``"error"``.

Cluster scope
    ``Counters(scope="cluster")`` reads cluster-wide (see :class:`Counters`): the adapter
    reports the node's own amounts to its peers (:meth:`CountersAdapter.tally`, sent by
    ``handoff.engine._tally`` every ``interval``) and keeps theirs
    (:meth:`CountersAdapter.apply_tally`), per peer incarnation, until the peer goes down
    (:meth:`CountersAdapter.forget`). A handoff moves only the node's own amounts.

Concurrency
    Every method is thread-safe: one ``threading.Lock`` guards the object, so threaded apps
    (Flask, gunicorn threads) call it from any thread without ``node.lock``. An increment
    is O(1) (in cluster scope, plus one look-up per peer that reported).
"""

from __future__ import annotations

import logging
import math
import operator
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any, Final

from handoff._adapter import ImportResult, Record
from handoff._registry import ClassFactory

__all__ = (
    "CLUSTER",
    "COUNTERS_FACTORY",
    "DEFAULT_INTERVAL",
    "EXPIRED",
    "IMPORT_ERROR",
    "INVALID_REMAINING",
    "LOCAL",
    "NOT_AN_INTEGER",
    "Counters",
    "CountersAdapter",
)

logger = logging.getLogger(__name__)

EXPIRED: Final = "expired"
"""Drop reason: the record's window ran out before it could be applied."""
NOT_AN_INTEGER: Final = "not an integer count"
"""Drop reason: the record's amount is not an ``int`` (or is a ``bool``)."""
INVALID_REMAINING: Final = "invalid remaining time"
"""Drop reason: the record's remaining time is neither ``None`` nor a finite number."""
IMPORT_ERROR: Final = "error"
"""Drop reason: the record could not be applied (not a triple, an unhashable key ...)."""


def _amount(n: object) -> int:
    """``n`` as an ``int`` for :meth:`Counters.incr` (the slow path: not exactly ``int``)."""
    if isinstance(n, bool):
        raise TypeError(f"counter amounts must be int, not bool ({n!r})")
    try:
        return operator.index(n)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"counter amounts must be int, not {type(n).__name__} ({n!r})") from None


def _unhashable(key: object) -> TypeError:
    return TypeError(f"counter keys must be hashable, not {type(key).__name__} ({key!r})")


LOCAL: Final = "local"
"""Scope of counters that each node reads for itself."""
CLUSTER: Final = "cluster"
"""Scope of counters whose reads give the cluster-wide total."""
DEFAULT_INTERVAL: Final = 0.5
"""Seconds between two reports of a cluster-scoped node's own amounts to its peers."""

# Modes: what an increment must do beyond adding (the fast path is mode 0).
_PLAIN, _WINDOWED, _CLUSTER = 0, 1, 2


class Counters:
    """Named integer counters that stay exact across deploys (see :mod:`handoff.adapters.counters`).

    ``counters.incr(key)`` adds one and returns the new value; ``counters[key]`` reads it
    (``0`` for a key never counted or whose window ran out). Thread-safe, O(1) increments.

    ``ttl`` (seconds, a positive finite number; ``None``: counts never expire) gives every
    key a fixed window: it starts at the key's first increment, and ``ttl`` seconds later
    the key expires (reads ``0``); the next increment starts a new window. Expired keys are
    removed lazily: by later increments that start windows, and by :meth:`__len__`,
    :meth:`keys`, :meth:`items` and :meth:`total`. ``timer`` is the clock of the windows
    (``time.monotonic`` by default; tests pass a fake one).

    ``scope="cluster"`` (default ``"local"``) makes every read cluster-wide: ``counters[key]``,
    :meth:`get`, the values :meth:`incr` and :meth:`decr` return, :meth:`items`,
    :meth:`keys`, ``len``, ``in`` and :meth:`total` give this node's own amount plus what
    the other nodes tracking the namespace (at the same schema version) last reported of
    theirs, so a global rate limit reads ``if counters.incr(ip) > 100``, the same code as a
    local one. :meth:`local` and :meth:`local_items` give this node's own share; :meth:`reset`
    and a handoff move only that share. Each node reports the keys whose own amount changed
    every ``interval`` seconds (default 0.5) to its peers, as absolute amounts; a peer's
    share is forgotten when it goes down. Staleness: a read misses at most what the other
    nodes counted in the last ``interval`` plus one round trip; during a handoff the moved
    counts may show twice or not at all for at most that long, then the total is exact.

    Track it with ``node.track("usage", counters)``: the counts then move to the node's
    successors at a drain, added to theirs, exactly once.
    """

    __slots__ = (
        "__weakref__",
        "_deadlines",
        "_dirty",
        "_interval",
        "_lock",
        "_mode",
        "_scope",
        "_timer",
        "_ttl",
        "_values",
        "_views",
        "_windowed",
    )

    def __init__(
        self,
        *,
        ttl: float | None = None,
        timer: Callable[[], float] = time.monotonic,
        scope: str = LOCAL,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        if ttl is not None and not _positive(ttl):
            raise ValueError(
                f"ttl must be a positive finite number of seconds or None, not {ttl!r}"
            )
        if not callable(timer):
            raise TypeError(f"timer must be callable() -> float, not {timer!r}")
        if scope not in (LOCAL, CLUSTER):
            raise ValueError(f"scope must be {LOCAL!r} or {CLUSTER!r}, not {scope!r}")
        if not _positive(interval):
            raise ValueError(
                f"interval must be a positive finite number of seconds, not {interval!r}"
            )
        self._ttl: float | None = None if ttl is None else float(ttl)
        self._timer = timer
        self._scope = scope
        self._interval = float(interval)
        self._lock = threading.Lock()
        self._values: dict[Any, int] = {}
        # key -> the timer's time its window ends, in window-start order (windowed only).
        self._deadlines: dict[Any, float] = {}
        self._windowed = ttl is not None
        # Cluster scope: keys whose own amount changed since the last report, and the
        # peers' reported amounts: (peer, incarnation) -> key -> [seq, amount, deadline].
        self._dirty: set[Any] = set()
        self._views: dict[tuple[str, str], dict[Any, list[Any]]] = {}
        self._mode = _CLUSTER if scope == CLUSTER else _WINDOWED if self._windowed else _PLAIN

    # -- writing ---------------------------------------------------------------------------

    def incr(self, key: Hashable, n: int = 1) -> int:
        """Add ``n`` (an ``int``; default 1) to ``key`` and return its new value (cluster
        scope: the new cluster-wide value)."""
        if n.__class__ is not int:
            n = _amount(n)
        lock = self._lock
        lock.acquire()
        try:
            values = self._values
            mode = self._mode
            if mode == _PLAIN:
                value = values[key] = values.get(key, 0) + n
            elif (
                mode == _WINDOWED
                and (deadline := self._deadlines.get(key)) is not None
                and deadline > self._timer()
            ):
                value = values[key] = values[key] + n
            else:
                value = self._incr_slow(key, n)
        except TypeError:
            if not isinstance(key, Hashable):
                raise _unhashable(key) from None
            raise
        finally:
            lock.release()
        return value

    def decr(self, key: Hashable, n: int = 1) -> int:
        """Subtract ``n`` (an ``int``; default 1) from ``key`` and return its new value."""
        if n.__class__ is not int:
            n = _amount(n)
        return self.incr(key, -n)

    def _incr_slow(self, key: Any, n: int) -> int:
        # Called with the lock held: a new window, or cluster scope.
        values = self._values
        now: float | None = None
        if not self._windowed:
            value = values[key] = values.get(key, 0) + n
        else:
            now = self._timer()
            deadline = self._deadlines.get(key)
            if deadline is not None and deadline > now:
                value = values[key] = values[key] + n
            else:
                if deadline is not None:
                    del self._deadlines[key]  # the window restarts: to the end of the order
                else:
                    self._purge_front(now)
                assert self._ttl is not None
                self._deadlines[key] = now + self._ttl
                value = values[key] = n
        if self._mode == _CLUSTER:
            self._dirty.add(key)
            if self._views:
                value += self._remote(key, self._timer() if now is None else now)
        return value

    def reset(self, key: Hashable) -> int:
        """Remove ``key``; return what it held (``0`` if unknown or expired). In cluster
        scope only this node's own share is removed (and returned)."""
        with self._lock:
            return self._pop(key, self._timer())

    # -- reading ---------------------------------------------------------------------------

    def __getitem__(self, key: Hashable) -> int:
        """The value of ``key``: ``0`` when it was never counted or its window ran out."""
        return self.get(key, 0)

    def get(self, key: Hashable, default: int = 0) -> int:
        """The value of ``key``, or ``default`` when it holds no live count."""
        if self._mode == _PLAIN:
            try:
                return self._values.get(key, default)
            except TypeError:
                if not isinstance(key, Hashable):
                    raise _unhashable(key) from None
                raise
        try:
            with self._lock:
                now = self._timer()
                own = self._own(key, now)
                if self._mode != _CLUSTER:
                    return default if own is None else own
                remote = self._remote(key, now, default=None)
        except TypeError:
            if not isinstance(key, Hashable):
                raise _unhashable(key) from None
            raise
        if own is None and remote is None:
            return default
        return (own or 0) + (remote or 0)

    def local(self, key: Hashable) -> int:
        """This node's own amount of ``key`` (what a handoff would move); in local scope
        the same as ``counters[key]``."""
        with self._lock:
            own = self._own(key, self._timer())
        return own or 0

    def local_items(self) -> list[tuple[Any, int]]:
        """``(key, own amount)`` of every key this node holds a live count of (a snapshot)."""
        with self._lock:
            self._purge_all()
            return list(self._values.items())

    def __contains__(self, key: object) -> bool:
        """True if ``key`` holds a live count (possibly ``0`` after a :meth:`decr`)."""
        if self._mode == _PLAIN:
            return key in self._values
        with self._lock:
            now = self._timer()
            if self._own(key, now) is not None:
                return True
            return self._mode == _CLUSTER and self._remote(key, now, default=None) is not None

    def __len__(self) -> int:
        """Number of keys holding a live count."""
        return len(self._snapshot())

    def keys(self) -> list[Any]:
        """The keys holding a live count (a snapshot, in first-count order)."""
        return list(self._snapshot())

    def items(self) -> list[tuple[Any, int]]:
        """``(key, value)`` of every live key (a snapshot)."""
        return list(self._snapshot().items())

    def __iter__(self) -> Iterator[Any]:
        """Iterate over a snapshot of :meth:`keys`."""
        return iter(self.keys())

    def total(self) -> int:
        """Sum of all live values."""
        return sum(self._snapshot().values())

    def remaining(self, key: Hashable) -> float | None:
        """Seconds left in ``key``'s own window; ``None`` without ``ttl`` or a live window."""
        with self._lock:
            deadline = self._deadlines.get(key)
            if deadline is None:
                return None
            left = deadline - self._timer()
            return left if left > 0 else None

    @property
    def ttl(self) -> float | None:
        """Seconds of each key's window (``None``: counts never expire)."""
        return self._ttl

    @property
    def scope(self) -> str:
        """``"local"`` or ``"cluster"`` (see the class documentation)."""
        return self._scope

    @property
    def interval(self) -> float:
        """Seconds between two reports of this node's own amounts (cluster scope)."""
        return self._interval

    def __repr__(self) -> str:
        shown = self.items()
        head = ", ".join(f"{k!r}: {v!r}" for k, v in shown[:8])
        more = f", ... ({len(shown)} keys)" if len(shown) > 8 else ""
        ttl = f", ttl={self._ttl:g}" if self._ttl is not None else ""
        scope = f", scope={self._scope!r}" if self._scope != LOCAL else ""
        return f"Counters({{{head}{more}}}{ttl}{scope})"

    # -- the lock held ---------------------------------------------------------------------

    def _snapshot(self) -> dict[Any, int]:
        with self._lock:
            self._purge_all()
            if self._mode != _CLUSTER:
                return dict(self._values)
            now = self._timer()
            totals = dict(self._values)
            for view in self._views.values():
                for key, (_seq, amount, deadline) in view.items():
                    if amount and (deadline is None or deadline > now):
                        totals[key] = totals.get(key, 0) + amount
            return totals

    def _own(self, key: Any, now: float) -> int | None:
        """This node's live amount of ``key``, or ``None``."""
        if self._windowed:
            deadline = self._deadlines.get(key)
            if deadline is None or deadline <= now:
                return None
            return self._values[key]
        return self._values.get(key)

    def _remote(self, key: Any, now: float, default: Any = 0) -> Any:
        """Sum of the peers' live amounts of ``key`` (``default`` if none holds one)."""
        total, found = 0, False
        for view in self._views.values():
            entry = view.get(key)
            if entry is not None and entry[1] and (entry[2] is None or entry[2] > now):
                total += entry[1]
                found = True
        return total if found else default

    def _pop(self, key: Any, now: float) -> int:
        """Remove ``key``; what it held if live, else 0."""
        value = self._values.pop(key, 0)
        if self._mode == _CLUSTER:
            self._dirty.add(key)
        if self._windowed:
            deadline = self._deadlines.pop(key, None)
            if deadline is None or deadline <= now:
                return 0
        return value

    def _take(self, key: Any) -> tuple[int, float | None] | None:
        """Take ``key``'s live, non-zero amount and its remaining time, or ``None``."""
        with self._lock:
            value = self._values.get(key, 0)
            if not value:
                return None
            remaining = None
            if self._windowed:
                now = self._timer()
                deadline = self._deadlines.get(key)
                if deadline is None or deadline <= now:
                    return None  # expired: left for the purge
                del self._deadlines[key]
                remaining = deadline - now
            del self._values[key]
            if self._mode == _CLUSTER:
                self._dirty.add(key)
            return value, remaining

    def _add(self, key: Any, amount: int, remaining: float | None, now: float) -> None:
        """Add ``amount`` with ``remaining`` seconds of window (> 0 or None)."""
        values = self._values
        if self._mode == _CLUSTER:
            self._dirty.add(key)
        if not self._windowed:
            values[key] = values.get(key, 0) + amount
            return
        assert self._ttl is not None
        ends = now + (self._ttl if remaining is None else min(remaining, self._ttl))
        deadlines = self._deadlines
        deadline = deadlines.get(key)
        if deadline is not None and deadline > now:
            values[key] += amount
            if ends <= deadline:
                return
            del deadlines[key]  # the longer window wins: to the end of the order
        else:
            if deadline is not None:
                del deadlines[key]
            else:
                self._purge_front(now)
            values[key] = amount
        deadlines[key] = ends

    def _live_nonzero(self) -> int:
        with self._lock:
            self._purge_all()
            return sum(1 for value in self._values.values() if value)

    def _purge_front(self, now: float) -> None:
        """Remove expired keys from the front of the window order (amortized O(1)).

        The order is window-start order, so the front expires first; a window lengthened by
        an import moves to the end. An imported window shorter than ``ttl`` may sit behind
        longer ones, so an expired key lingers at most ``ttl`` past its end."""
        deadlines, values = self._deadlines, self._values
        expired: list[Any] = []
        for key, deadline in deadlines.items():
            if deadline > now or len(expired) >= 64:
                break
            expired.append(key)
        for key in expired:
            del deadlines[key]
            values.pop(key, None)

    def _purge_all(self) -> None:
        if not self._windowed:
            return
        now = self._timer()
        expired = [key for key, deadline in self._deadlines.items() if deadline <= now]
        for key in expired:
            del self._deadlines[key]
            self._values.pop(key, None)

    # -- cluster scope: reports out and in --------------------------------------------------

    def _report(self, *, full: bool) -> list[Record]:
        """``(key, own amount, remaining)`` of the keys changed since the last delta report
        (``full=False``: taken, so each change is reported once; amount 0: none left), or
        of every key this node holds a live, non-zero amount of (``full=True``)."""
        with self._lock:
            now = self._timer()
            if full:
                keys: Iterable[Any] = list(self._values)
            else:
                keys, self._dirty = self._dirty, set()
            records: list[Record] = []
            for key in keys:
                own = self._own(key, now)
                if not own and full:
                    continue
                remaining = None
                if own and self._windowed:
                    remaining = self._deadlines[key] - now
                records.append((key, own or 0, remaining))
            return records

    def _apply_report(
        self, origin: tuple[str, str], seq: int, records: Sequence[Record], full_from: int
    ) -> int:
        """Keep what a peer reported of its own amounts; returns the records refused."""
        refused = 0
        with self._lock:
            now = self._timer()
            for name, incarnation in [o for o in self._views if o[0] == origin[0]]:
                if incarnation != origin[1]:
                    del self._views[(name, incarnation)]  # a restarted peer's former life
            view = self._views.setdefault(origin, {})
            for record in records:
                if not isinstance(record, tuple | list) or len(record) != 3:
                    refused += 1
                    continue
                key, amount, remaining = record
                if amount.__class__ is not int or (
                    remaining is not None
                    and (
                        isinstance(remaining, bool)
                        or not isinstance(remaining, int | float)
                        or not math.isfinite(remaining)
                    )
                ):
                    refused += 1
                    continue
                try:
                    entry = view.get(key)
                except TypeError:
                    refused += 1
                    continue
                if entry is not None and entry[0] >= seq:
                    continue  # an older report than the one kept
                deadline = None if remaining is None else now + remaining
                view[key] = [seq, amount, deadline]
            if full_from:
                # A full report ended: keys it did not refresh are gone, and expired ones too.
                for key in [
                    k
                    for k, (s, a, d) in view.items()
                    if s < full_from or not a or (d is not None and d <= now)
                ]:
                    del view[key]
        return refused

    def _forget(self, peer: str) -> None:
        """Drop what ``peer`` (any incarnation) reported: it went down."""
        with self._lock:
            for origin in [o for o in self._views if o[0] == peer]:
                del self._views[origin]


def _positive(number: object) -> bool:
    return (
        not isinstance(number, bool)
        and isinstance(number, int | float)
        and math.isfinite(number)
        and number > 0
    )


class CountersAdapter:
    """Hands off a :class:`Counters` with ownership semantics; see the module documentation."""

    kind: str = "counters"
    moves_ownership: bool = True

    def __init__(self, counters: Counters) -> None:
        if not isinstance(counters, Counters):
            raise TypeError(
                f"CountersAdapter adapts handoff.Counters, not {type(counters).__name__}"
            )
        self.counters = counters
        # The counters' timer when the latest record was taken (windowed counters only).
        self._taken_at: float | None = None

    def __len__(self) -> int:
        """Keys holding a live, non-zero count: what an export would yield now."""
        return self.counters._live_nonzero()

    def __repr__(self) -> str:
        return f"CountersAdapter({self.counters!r})"

    @property
    def tally_interval(self) -> float | None:
        """Seconds between reports of this node's own amounts to its peers; ``None``: the
        counters are local, nothing is reported."""
        counters = self.counters
        return counters.interval if counters.scope == CLUSTER else None

    def tally(self, *, full: bool) -> list[Record]:
        """This node's own amounts to report: of the keys changed since the last call with
        ``full=False`` (amount 0: none left), or of every key held (``full=True``)."""
        return self.counters._report(full=full)

    def apply_tally(
        self, origin: tuple[str, str], seq: int, records: Sequence[Record], *, full_from: int
    ) -> int:
        """Keep what ``origin`` (peer name, incarnation) reported in its Tally ``seq``;
        returns how many records were unusable (and ignored)."""
        return self.counters._apply_report(origin, seq, records, full_from)

    def forget(self, peer: str) -> None:
        """``peer`` went down: its share leaves the cluster-wide totals."""
        self.counters._forget(peer)

    def export(self) -> Iterator[Record]:
        """Take each key's amount as its record is yielded: ``(key, amount, remaining)``."""
        counters = self.counters
        for key in counters:
            taken = counters._take(key)
            if taken is not None:
                if taken[1] is not None:
                    self._taken_at = counters._timer()
                yield key, taken[0], taken[1]

    def import_records(self, records: Sequence[Record], *, age: float = 0.0) -> ImportResult:
        """Add each record's amount to the key's count (see the module documentation)."""
        return self._merge(records, age)

    def give_back(self, records: Sequence[Record]) -> None:
        """Add back records this adapter exported and nobody received. Their remaining
        times were measured at the export: they age by the time since the latest record
        was taken (at most their real age: a window never ends earlier than it would have,
        nor later by the time the drain held them)."""
        taken = self._taken_at
        age = 0.0 if taken is None else max(0.0, self.counters._timer() - taken)
        result = self._merge(records, age)
        lost = {reason: n for reason, n in result.dropped.items() if reason != EXPIRED}
        if lost:
            logger.warning("gave back %d counts; dropped %s", result.applied, lost)

    def _merge(self, records: Sequence[Record], age: float) -> ImportResult:
        counters = self.counters
        applied = 0
        dropped: dict[str, int] = {}
        with counters._lock:
            now = counters._timer()
            for record in records:
                reason = self._merge_one(counters, record, age, now)
                if reason:
                    dropped[reason] = dropped.get(reason, 0) + 1
                else:
                    applied += 1
        if (
            dropped.get(IMPORT_ERROR)
            or dropped.get(NOT_AN_INTEGER)
            or dropped.get(INVALID_REMAINING)
        ):
            logger.warning("dropped unusable counter records: %s", dropped)
        return ImportResult(applied=applied, dropped=dropped)

    @staticmethod
    def _merge_one(counters: Counters, record: Any, age: float, now: float) -> str:
        """Apply one record (the lock held); the drop reason, or ``""``."""
        if not isinstance(record, tuple | list) or len(record) != 3:
            return IMPORT_ERROR
        key, amount, remaining = record
        if amount.__class__ is not int:
            if isinstance(amount, bool) or not isinstance(amount, int):
                return NOT_AN_INTEGER
            amount = int(amount)
        if remaining is not None:
            if isinstance(remaining, bool) or not isinstance(remaining, int | float):
                return INVALID_REMAINING
            if not math.isfinite(remaining):
                return INVALID_REMAINING
            remaining = remaining - age
            if remaining <= 0:
                return EXPIRED
        try:
            hash(key)
        except Exception:
            return IMPORT_ERROR
        try:
            counters._add(key, amount, remaining, now)
        except Exception:
            logger.warning("could not add a counter record", exc_info=True)
            return IMPORT_ERROR
        return ""


COUNTERS_FACTORY: Final = ClassFactory(CountersAdapter, (Counters,))
"""Factory for :class:`Counters` (the registry knows it by import path)."""
