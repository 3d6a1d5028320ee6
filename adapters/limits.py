"""Adapter for the in-memory storage of the ``limits`` package (``memory://``), which
Flask-Limiter and slowapi use by default: rate-limit windows survive a deploy.

``node.track("limits", storage)`` with a ``limits.storage.MemoryStorage`` picks this adapter
(install ``warm-handoff[limits]``). Flask-Limiter keeps its storage in
``limiter.storage``; slowapi in ``limiter._storage``; a ``limits`` strategy in
``limiter.storage``.

Ownership
    Rate-limit counts must live in one place, so the adapter moves ownership
    (``moves_ownership = True``): :meth:`LimitsAdapter.export` *takes* each window from the
    storage as it yields its record (under the key's lock, leaving the key with a count of
    0 or no hits rather than removing it), and hits that come afterwards start a fresh
    window that goes with the next export (the catch-up at stop).
    :meth:`LimitsAdapter.give_back` merges back what the engine could hand to nobody.
    Delivering each record exactly once is the engine's job: the adapter adds what it is
    given.

Records (kind ``"limits"``; times are always seconds relative to the export, never
absolute: clocks differ between machines)
    fixed window
        ``(key, count, ("fixed", seconds_left))``: the storage key, its count and the time
        until the window resets.
    moving window
        ``(key, ages, ("moving", period))``: the ages in seconds of the window's hits,
        newest first (a hit of cost 3 is three equal ages), and the limit's period.
    sliding window counter
        ``(base_key, count, ("sliding", period, ends_in))``: the limit's key without the
        window number that ``limits`` appends (``{key}/{int(now / period)}``, a number
        read off the sender's clock), the window's count, and the seconds until that window
        ends (negative for the previous window, which ended that long ago). The receiver
        files the count under its own number for the window that ends then: the current
        window stays current, the previous one previous, whatever the two clocks say.

Import (``age`` seconds after the export: time spent in a snapshot or in flight)
    Counts of the same window merge by addition. A fixed window keeps its remaining time
    (less ``age``); merged with a window the receiver holds, the later reset of the two
    wins (the limit is never looser than either side's). Moving-window hits merge into the
    receiver's hits in time order, and only the newest ``amount`` of them (the limit's size,
    read from the key) are kept: ``limits`` looks no further back. A sliding-window count
    joins the receiver's count for the same window (the current one, or the previous one).
    A window whose time is over is dropped as ``"expired"``. Records that cannot come from
    this adapter (a hostile or broken peer: wrong shapes or types, counts beyond
    :data:`MAX_COUNT`, a window longer than the period its key names, or than
    :data:`MAX_SECONDS` for a key that names none) are dropped as ``"malformed"``, hits whose
    period differs from the receiver's hits of the same key as ``"period mismatch"``;
    nothing raises.

Supported ``limits`` releases: :data:`SUPPORTED_VERSIONS`. The adapter reads and writes
the storage's own structures (``storage``, ``expirations``, ``events`` of ``Entry`` objects
with ``atime`` and ``expiry``, ``locks``, and the window numbers of
``sliding_window_keys``), so importing this module checks both the version and the layout,
and raises :exc:`UnsupportedLimits` rather than guess. ``limits`` 4.3 introduced the plain
``Entry`` the adapter builds (4.1 and 4.2 kept hits as ``LockableEntry`` locks; before 4.1
there were neither per-key locks nor sliding windows); 4.3 to 5.8 share the layout, and
a release from 6 on is refused until it has been checked. The asynchronous
``limits.aio.storage.MemoryStorage`` is not supported: its expiry task cuts a key's hits at
an index it computed before an ``await`` (inside the key's lock since 5.8, outside it in
5.0 to 5.7), so hits merged in meanwhile could be cut off.

Concurrency
    Every read and write of a key holds the storage's lock for that key, as ``limits``
    does itself, so threaded apps (Flask) need nothing more.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, Final, NamedTuple

import limits
from limits.limits import TIME_TYPES, RateLimitItemPerMinute
from limits.storage import memory as _memory
from limits.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    SlidingWindowCounterRateLimiter,
)

from handoff._adapter import ImportResult, Record
from handoff._errors import HandoffError
from handoff._registry import ClassFactory

__all__ = (
    "EXPIRED",
    "IMPORT_ERROR",
    "KIND",
    "MALFORMED",
    "MAX_COUNT",
    "MAX_EVENTS",
    "MAX_SECONDS",
    "MEMORY_STORAGE_FACTORY",
    "PERIOD_MISMATCH",
    "SUPPORTED_VERSIONS",
    "LimitsAdapter",
    "UnsupportedLimits",
)

logger = logging.getLogger(__name__)

SUPPORTED_VERSIONS: Final = ">=4.3,<6"
"""The ``limits`` releases whose in-memory layout this adapter knows (see the module)."""
_OLDEST: Final = (4, 3)
_BEYOND: Final = (6, 0)

KIND: Final = "limits"

EXPIRED: Final = "expired"
"""Drop reason: the window (or every hit of it) ended before the record was applied."""
MALFORMED: Final = "malformed"
"""Drop reason: the record is not one this adapter exports (wrong shape, type or range)."""
PERIOD_MISMATCH: Final = "period mismatch"
"""Drop reason: moving-window hits whose period differs from the receiver's for that key."""
IMPORT_ERROR: Final = "error"
"""Drop reason: applying the record raised (logged)."""

MAX_COUNT: Final = 2**62
"""Largest count a record may carry (a window's count, or the sum after a merge)."""
MAX_SECONDS: Final = 10 * 366 * 86_400.0
"""Longest window (or moving-window period) accepted for a key that does not name its limit;
a key that does (``.../5/1/minute``) accepts at most its limit's period."""
_SLACK: Final = 1e-3  # float rounding between the sender's subtraction and the period
MAX_EVENTS: Final = 100_000
"""Most moving-window hits kept for a key whose limit cannot be read from the key."""
_MAX_DIGITS: Final = 18

_GRANULARITIES: Final = {
    granularity.name: granularity.seconds for granularity in TIME_TYPES.values()
}


class UnsupportedLimits(HandoffError, ImportError):
    """The installed ``limits`` is a release, or has a layout, this adapter does not know."""


# --- keys: "{namespace}/{identifiers...}/{amount}/{multiples}/{granularity}[/{window}]" ---


class _Limit(NamedTuple):
    amount: int
    period: float
    window: int | None
    """The sliding window's number (``int(time / period)``), ``None`` for other keys."""
    base: str
    """The key without the window number."""


def _natural(text: str) -> int | None:
    if 0 < len(text) <= _MAX_DIGITS and text.isascii() and text.isdigit():
        return int(text)
    return None


def _integer(text: str) -> int | None:
    return _natural(text[1:]) if text.startswith("-") else _natural(text)


def _limit_of(key: str) -> _Limit | None:
    """What a ``limits`` key says about its limit, or ``None`` if it is not such a key."""
    parts = key.rsplit("/", 5)
    if len(parts) >= 5 and parts[-2] in _GRANULARITIES:  # .../5/1/minute/29000000
        window = _integer(parts[-1])
        limit = _limit_in(parts[-4], parts[-3], parts[-2])
        if window is not None and limit is not None:
            amount, period = limit
            return _Limit(amount, period, window, key[: key.rfind("/")])
    if len(parts) >= 4 and parts[-1] in _GRANULARITIES:  # .../5/1/minute
        limit = _limit_in(parts[-3], parts[-2], parts[-1])
        if limit is not None:
            return _Limit(limit[0], limit[1], None, key)
    return None


def _limit_in(amount_text: str, multiples_text: str, granularity: str) -> tuple[int, float] | None:
    amount, multiples = _natural(amount_text), _natural(multiples_text)
    if not amount or not multiples:
        return None
    return amount, float(multiples * _GRANULARITIES[granularity])


# --- the storage's internals: every access goes through these helpers. ---


def _key_lock(storage: _memory.MemoryStorage, key: str) -> Any:
    """The storage's lock for ``key`` (``limits`` makes one per key on first use)."""
    return storage.locks[key]


def _new_entry(atime: float, period: float) -> Any:
    """A moving-window hit at ``atime``, as ``Entry(period)`` made at that time would be."""
    entry = _memory.Entry.__new__(_memory.Entry)
    entry.atime = atime
    entry.expiry = atime + period
    return entry


def _version() -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", str(getattr(limits, "__version__", "")))
    return (int(match[1]), int(match[2])) if match else None


def _verify() -> None:
    """Check the release and every structure the adapter touches; raise UnsupportedLimits."""
    installed = getattr(limits, "__version__", "unknown")

    def require(condition: bool, what: str) -> None:
        if not condition:
            raise UnsupportedLimits(
                f"handoff.adapters.limits supports limits {SUPPORTED_VERSIONS}, but the "
                f"installed limits {installed} differs: {what}. Install "
                f"warm-handoff[limits] (limits{SUPPORTED_VERSIONS})."
            )

    version = _version()
    require(version is not None and _OLDEST <= version < _BEYOND, "an unsupported release")
    storage = _memory.MemoryStorage()
    try:
        require(
            type(storage.storage) is Counter
            and type(storage.expirations) is dict
            and type(storage.events) is dict
            and hasattr(storage.locks, "default_factory"),
            "MemoryStorage's storage, expirations, events and locks",
        )
        lock = _key_lock(storage, "probe")
        require(hasattr(lock, "__enter__") and hasattr(lock, "__exit__"), "its per-key locks")
        item = RateLimitItemPerMinute(5)
        before = time.time()
        FixedWindowRateLimiter(storage).hit(item, "fixed")
        MovingWindowRateLimiter(storage).hit(item, "moving")
        SlidingWindowCounterRateLimiter(storage).hit(item, "sliding")
        after = time.time()
        fixed, moving, sliding = (item.key_for(name) for name in ("fixed", "moving", "sliding"))
        require(
            storage.storage.get(fixed) == 1
            and before + 60 <= storage.expirations.get(fixed, 0) <= after + 60,
            "fixed-window counts and expirations",
        )
        require(_limit_of(fixed) == _Limit(5, 60.0, None, fixed), "rate limit keys")
        (hit,) = storage.events.get(moving, [None, None])
        require(
            type(hit) is _memory.Entry
            and set(vars(hit)) == {"atime", "expiry"}
            and before <= hit.atime <= after
            and hit.expiry == hit.atime + 60,
            "moving-window hits",
        )
        made = _new_entry(1.0, 60.0)
        require((made.atime, made.expiry) == (1.0, 61.0), "moving-window hits")
        windows = [key for key in storage.storage if key.startswith(f"{sliding}/")]
        require(len(windows) == 1, "sliding-window keys")
        parsed = _limit_of(windows[0])
        require(
            parsed is not None
            and parsed.base == sliding
            and parsed.window in {int(before / 60), int(after / 60)},
            "sliding-window keys",
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        require(False, f"{type(exc).__name__}: {exc}")
    finally:
        timer = getattr(storage, "timer", None)
        if isinstance(timer, threading.Timer):
            timer.cancel()


_verify()


# --- records ---


def _seconds(value: Any) -> float | None:
    """A finite number of seconds, or ``None``."""
    if type(value) is float or type(value) is int:
        seconds = float(value)
        if math.isfinite(seconds):
            return seconds
    return None


def _longest(key: str) -> float:
    """The longest a window of ``key`` may last: its limit's period, read from the key, or
    :data:`MAX_SECONDS` for keys that do not say (so that no record keeps a key forever)."""
    limit = _limit_of(key)
    return MAX_SECONDS if limit is None else limit.period + _SLACK


def _count(value: Any) -> int | None:
    if type(value) is int and 0 < value <= MAX_COUNT:
        return value
    return None


class LimitsAdapter:
    """Hands off a ``limits.storage.MemoryStorage``; see the module documentation."""

    kind: str = KIND
    moves_ownership: bool = True

    def __init__(self, storage: _memory.MemoryStorage) -> None:
        if not isinstance(storage, _memory.MemoryStorage):
            raise TypeError(
                f"LimitsAdapter adapts a limits.storage.MemoryStorage, not {type(storage).__name__}"
            )
        self.storage = storage
        self._last_taken: float | None = None  # time.monotonic() of the latest record taken

    def __len__(self) -> int:
        storage = self.storage
        return sum(map(bool, list(storage.storage.values()))) + sum(
            map(bool, list(storage.events.values()))
        )

    def __repr__(self) -> str:
        return f"LimitsAdapter({type(self.storage).__name__})"

    # -- export: takes what it yields --

    def export(self) -> Iterator[Record]:
        """Take each window from the storage as its record is yielded (see the module)."""
        storage = self.storage
        # A taken key is emptied rather than removed: limits reads keys outside their locks
        # (its expiry thread indexes the keys it listed; an expired key is removed before
        # an increment takes the lock, which loses a concurrent hit), so a count goes to 0
        # and keeps its expiration: the next hit starts a fresh window, as after a reset.
        events, counts = storage.events, storage.storage
        for key in list(events):
            with _key_lock(storage, key):
                hits = events.get(key)
                if hits:
                    events[key] = []
            record = self._moving_record(key, hits)
            if record is not None:
                self._last_taken = time.monotonic()
                yield record
        for key in list(counts):
            with _key_lock(storage, key):
                count = counts.get(key)
                expires = storage.expirations.get(key)
                if count:
                    counts[key] = 0
            record = self._counter_record(key, count, expires)
            if record is not None:
                self._last_taken = time.monotonic()
                yield record

    @staticmethod
    def _moving_record(key: str, hits: list[Any] | None) -> Record | None:
        if not hits:
            return None
        now = time.time()
        live = [hit for hit in hits if hit.expiry > now]
        if not live:
            return None
        period = float(live[0].expiry - live[0].atime)
        return key, [max(0.0, now - hit.atime) for hit in live], ("moving", period)

    @staticmethod
    def _counter_record(key: str, count: int | None, expires: float | None) -> Record | None:
        if not count or count < 0 or expires is None:
            return None
        now = time.time()
        left = expires - now
        if not left > 0:
            return None
        limit = _limit_of(key)
        if limit is None or limit.window is None:
            return key, count, ("fixed", float(left))
        ends_in = (limit.window + 1) * limit.period - now
        if not ends_in > -limit.period:  # neither the current window nor the previous one
            return None
        return limit.base, count, ("sliding", limit.period, float(ends_in))

    # -- import and give back: merge --

    def import_records(self, records: Sequence[Record], *, age: float = 0.0) -> ImportResult:
        """Merge windows into the storage; see the module documentation for the rules."""
        if not age >= 0.0:  # NaN or negative: no age
            age = 0.0
        applied = errors = 0
        dropped: dict[str, int] = {}
        for record in records:
            try:
                reason = self._apply(record, age)
            except Exception:
                if not errors:  # one log line per batch is enough
                    logger.warning("could not import a record into %r", self, exc_info=True)
                errors += 1
                reason = IMPORT_ERROR
            if reason:
                dropped[reason] = dropped.get(reason, 0) + 1
            else:
                applied += 1
        return ImportResult(applied, 0, dropped)

    def give_back(self, records: Sequence[Record]) -> None:
        """Merge back records the engine took and handed to nobody.

        Their times are relative to their export; they age by the time since the latest
        record was taken (at most their real age: a window never ends earlier than it
        would have).
        """
        taken = self._last_taken
        age = 0.0 if taken is None else max(0.0, time.monotonic() - taken)
        result = self.import_records(records, age=age)
        lost = {reason: n for reason, n in result.dropped.items() if reason != EXPIRED}
        if lost:
            logger.warning("%r could not take back %s of its own records", self, lost)

    def _apply(self, record: Any, age: float) -> str:
        """Apply one record; the drop reason, or ``""`` once applied."""
        if type(record) not in (tuple, list) or len(record) != 3:
            return MALFORMED
        key, value, meta = record
        if type(key) is not str or type(meta) not in (tuple, list) or not meta:
            return MALFORMED
        tag, now = meta[0], time.time()
        if tag == "fixed" and len(meta) == 2:
            count, left = _count(value), _seconds(meta[1])
            if count is None or left is None or left > _longest(key):
                return MALFORMED
            left -= age
            if not left > 0.0:
                return EXPIRED
            return self._add(key, count, now + left, now)
        if tag == "sliding" and len(meta) == 3:
            return self._add_sliding(key, value, meta[1], meta[2], age, now)
        if tag == "moving" and len(meta) == 2:
            return self._add_moving(key, value, meta[1], age, now)
        return MALFORMED

    def _add(self, key: str, count: int, expires: float, now: float) -> str:
        storage = self.storage
        with _key_lock(storage, key):
            held, held_until = storage.storage.get(key, 0), storage.expirations.get(key)
            if held > 0 and held_until is not None and held_until > now:
                total = held + count
                expires = max(expires, held_until)
            else:
                total = count
            if total > MAX_COUNT:
                return MALFORMED
            storage.storage[key] = total
            storage.expirations[key] = expires
        return ""

    def _add_sliding(
        self, base: str, value: Any, period_value: Any, ends_value: Any, age: float, now: float
    ) -> str:
        count, period, ends_in = _count(value), _seconds(period_value), _seconds(ends_value)
        limit = _limit_of(base)
        if (
            count is None
            or period is None
            or ends_in is None
            or limit is None
            or limit.window is not None
            or not math.isclose(period, limit.period)
        ):
            return MALFORMED
        period = limit.period
        if not -period - _SLACK < ends_in <= period + _SLACK:  # previous or current window
            return MALFORMED
        # The receiver's window whose end is nearest the end the sender's clock gave.
        window = round((now + ends_in - age) / period) - 1
        current = int(now / period)  # limits' own number for the current window
        if window < current - 1:
            return EXPIRED
        window = min(window, current)  # a window the receiver's clock has not reached yet
        # Kept while it is the current or the previous window, as limits keeps it.
        return self._add(f"{base}/{window}", count, (window + 2) * period, now)

    def _add_moving(self, key: str, value: Any, period_value: Any, age: float, now: float) -> str:
        period = _seconds(period_value)
        if type(value) is not list or not value or period is None or not period > 0.0:
            return MALFORMED
        if period > _longest(key):
            return MALFORMED
        limit = _limit_of(key)
        if limit is not None and (
            limit.window is not None or not math.isclose(period, limit.period)
        ):
            return MALFORMED
        if limit is not None:
            period = limit.period
        bound = limit.amount if limit is not None else MAX_EVENTS
        ages = [_seconds(item) for item in value]
        if None in ages:
            return MALFORMED
        times = sorted((now - (max(0.0, a) + age) for a in ages if a is not None), reverse=True)
        times = [t for t in times[:bound] if t + period > now]
        if not times:
            return EXPIRED
        storage = self.storage
        with _key_lock(storage, key):
            held = storage.events.get(key) or []
            if held and not math.isclose(held[0].expiry - held[0].atime, period):
                return PERIOD_MISMATCH
            merged = [*held, *(_new_entry(t, period) for t in times)]
            merged.sort(key=lambda hit: hit.atime, reverse=True)  # newest first, as limits keeps
            storage.events[key] = merged[:bound]
        return ""


MEMORY_STORAGE_FACTORY: Final = ClassFactory(LimitsAdapter, (_memory.MemoryStorage,))
"""Factory for ``limits.storage.MemoryStorage`` (the registry knows it by import path)."""
