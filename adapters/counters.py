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

Concurrency
    Every method is thread-safe: one ``threading.Lock`` guards the object, so threaded apps
    (Flask, gunicorn threads) call it from any thread without ``node.lock``. An increment
    is O(1).
"""

from __future__ import annotations

import logging
import math
import operator
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, Final

from handoff._adapter import ImportResult, Record
from handoff._registry import ClassFactory

__all__ = (
    "COUNTERS_FACTORY",
    "EXPIRED",
    "IMPORT_ERROR",
    "INVALID_REMAINING",
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

    Track it with ``node.track("usage", counters)``: the counts then move to the node's
    successors at a drain, added to theirs, exactly once.
    """

    __slots__ = ("__weakref__", "_deadlines", "_lock", "_timer", "_ttl", "_values", "_windowed")

    def __init__(
        self, *, ttl: float | None = None, timer: Callable[[], float] = time.monotonic
    ) -> None:
        if ttl is not None and (
            isinstance(ttl, bool)
            or not isinstance(ttl, int | float)
            or not math.isfinite(ttl)
            or ttl <= 0
        ):
            raise ValueError(
                f"ttl must be a positive finite number of seconds or None, not {ttl!r}"
            )
        if not callable(timer):
            raise TypeError(f"timer must be callable() -> float, not {timer!r}")
        self._ttl: float | None = None if ttl is None else float(ttl)
        self._timer = timer
        self._lock = threading.Lock()
        self._values: dict[Any, int] = {}
        # key -> the timer's time its window ends, in window-start order (windowed only).
        self._deadlines: dict[Any, float] = {}
        self._windowed = ttl is not None

    # -- writing ---------------------------------------------------------------------------

    def incr(self, key: Hashable, n: int = 1) -> int:
        """Add ``n`` (an ``int``; default 1) to ``key`` and return its new value."""
        if n.__class__ is not int:
            n = _amount(n)
        lock = self._lock
        lock.acquire()
        try:
            values = self._values
            if not self._windowed:
                value = values[key] = values.get(key, 0) + n
            elif (deadline := self._deadlines.get(key)) is not None and deadline > self._timer():
                value = values[key] = values[key] + n
            else:
                value = self._new_window(key, n)
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

    def _new_window(self, key: Any, n: int) -> int:
        # Called with the lock held: ``key`` holds no live window.
        now = self._timer()
        if key in self._deadlines:
            del self._deadlines[key]  # the window restarts: to the end of the order
        else:
            self._purge_front(now)
        assert self._ttl is not None
        self._deadlines[key] = now + self._ttl
        self._values[key] = n
        return n

    def reset(self, key: Hashable) -> int:
        """Remove ``key``; return what it held (``0`` if unknown or expired)."""
        with self._lock:
            return self._pop(key, self._now())

    # -- reading ---------------------------------------------------------------------------

    def __getitem__(self, key: Hashable) -> int:
        """The value of ``key``: ``0`` when it was never counted or its window ran out."""
        return self.get(key, 0)

    def get(self, key: Hashable, default: int = 0) -> int:
        """The value of ``key``, or ``default`` when it holds no live count."""
        if not self._windowed:
            try:
                return self._values.get(key, default)
            except TypeError:
                if not isinstance(key, Hashable):
                    raise _unhashable(key) from None
                raise
        with self._lock:
            deadline = self._deadlines.get(key)
            if deadline is None or deadline <= self._timer():
                return default
            return self._values[key]

    def __contains__(self, key: object) -> bool:
        """True if ``key`` holds a live count (possibly ``0`` after a :meth:`decr`)."""
        if not self._windowed:
            return key in self._values
        with self._lock:
            deadline = self._deadlines.get(key)
            return deadline is not None and deadline > self._timer()

    def __len__(self) -> int:
        """Number of keys holding a live count."""
        with self._lock:
            self._purge_all()
            return len(self._values)

    def keys(self) -> list[Any]:
        """The keys holding a live count (a snapshot, in first-count order)."""
        with self._lock:
            self._purge_all()
            return list(self._values)

    def items(self) -> list[tuple[Any, int]]:
        """``(key, value)`` of every live key (a snapshot)."""
        with self._lock:
            self._purge_all()
            return list(self._values.items())

    def __iter__(self) -> Iterator[Any]:
        """Iterate over a snapshot of :meth:`keys`."""
        return iter(self.keys())

    def total(self) -> int:
        """Sum of all live values."""
        with self._lock:
            self._purge_all()
            return sum(self._values.values())

    def remaining(self, key: Hashable) -> float | None:
        """Seconds left in ``key``'s window; ``None`` without ``ttl`` or a live window."""
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

    def __repr__(self) -> str:
        shown = self.items()
        head = ", ".join(f"{k!r}: {v!r}" for k, v in shown[:8])
        more = f", ... ({len(shown)} keys)" if len(shown) > 8 else ""
        ttl = f", ttl={self._ttl:g}" if self._ttl is not None else ""
        return f"Counters({{{head}{more}}}{ttl})"

    # -- for the adapter (and the lock held) -----------------------------------------------

    def _now(self) -> float:
        return self._timer() if self._windowed else 0.0

    def _pop(self, key: Any, now: float) -> int:
        """Remove ``key``; what it held if live, else 0."""
        value = self._values.pop(key, 0)
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
            if not self._windowed:
                del self._values[key]
                return value, None
            now = self._timer()
            deadline = self._deadlines.get(key)
            if deadline is None or deadline <= now:
                return None  # expired: left for the purge
            del self._values[key], self._deadlines[key]
            return value, deadline - now

    def _add(self, key: Any, amount: int, remaining: float | None, now: float) -> None:
        """Add ``amount`` with ``remaining`` seconds of window (> 0 or None)."""
        values = self._values
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

    def __len__(self) -> int:
        """Keys holding a live, non-zero count: what an export would yield now."""
        return self.counters._live_nonzero()

    def __repr__(self) -> str:
        return f"CountersAdapter({self.counters!r})"

    def export(self) -> Iterator[Record]:
        """Take each key's amount as its record is yielded: ``(key, amount, remaining)``."""
        counters = self.counters
        for key in counters:
            taken = counters._take(key)
            if taken is not None:
                yield key, taken[0], taken[1]

    def import_records(self, records: Sequence[Record], *, age: float = 0.0) -> ImportResult:
        """Add each record's amount to the key's count (see the module documentation)."""
        return self._merge(records, age)

    def give_back(self, records: Sequence[Record]) -> None:
        """Add back records this adapter exported and nobody received."""
        result = self._merge(records, 0.0)
        if result.dropped:
            logger.warning("gave back %d counts; dropped %s", result.applied, dict(result.dropped))

    def _merge(self, records: Sequence[Record], age: float) -> ImportResult:
        counters = self.counters
        applied = 0
        dropped: dict[str, int] = {}
        with counters._lock:
            now = counters._now()
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
