"""Adapters for cachetools caches: ``Cache``, ``FIFOCache``, ``LFUCache``, ``LRUCache``,
``RRCache``, ``TLRUCache`` and ``TTLCache``.

Records
    All seven share the kind ``"cachetools"``, so a release may change its cache type (an
    ``LRUCache`` can hand off to the ``TTLCache`` of the next release). A record is
    ``(key, value, meta)`` where ``meta`` is a ``float`` for the seconds of life an entry
    had left when it was exported (``TTLCache``, ``TLRUCache``; never an absolute time, as
    clocks differ between machines), an ``int`` for an ``LFUCache`` use count, and ``None``
    otherwise. The codec keeps ints and floats apart, so a receiver knows which it got and
    uses what it understands: a TTL cache ignores use counts, an LFU cache starts an entry
    without a count at 1.

Export, hottest first (the order a drain should send in, so a deadline cuts the coldest)
    ``LRUCache`` and ``TTLCache`` (which is LRU-ordered): most recently used first;
    ``TLRUCache``: most recently used first; ``LFUCache``: highest use count first, and of
    equal counts the one its cache would evict last first; ``FIFOCache``: newest first;
    ``RRCache`` and plain ``Cache``: the cache's iteration order (they have no notion of
    hot). The keys are listed when the export starts; each value (and its lifetime or
    count) is read when its record is yielded, so keys deleted or expired meanwhile are
    skipped. Reading never counts as a use: the source's recency and counts are untouched.

Import (records arrive hottest first)
    An entry the receiver already holds is kept (it is newer) unless the adapter was made with
    ``merge``: then ``merge(existing, incoming)`` is stored, counts as a write on the receiver,
    expires with the later of the two entries (never beyond the receiver's own expiry for a new
    write) and, in an ``LFUCache``, keeps the higher count. A merged value that a
    ``TLRUCache``'s ``ttu`` expires at once is dropped as ``"expired"``; the entry is then what
    the cache's own write leaves (gone, or unchanged before cachetools 7.1.5). A record whose
    remaining lifetime minus ``age`` is spent, or too short for the receiver's clock to tell
    its end from now, is dropped as ``"expired"``. An entry never outlives the expiry it had on
    the sender: its expiry is the receiver's own (``ttl``, or ``ttu(...)``) or the remaining
    lifetime, whichever ends first. ``TTLCache`` keeps its entries in expiry order, so a
    shortened expiry is rounded down to a grid finer than 1/256 of the time left (see
    ``_ExpiryIndex``): an imported entry may expire up to 0.4 % early, never late. A cache
    that cannot expire entries drops records with a finite lifetime as ``"expiry
    unsupported"`` rather than keep them forever.

    Order survives: each imported entry goes to the cold end of what was imported before
    it, and stays colder than the receiver's own entries, so after a handoff into an empty
    cache its evictions come in the sender's order (LRU, FIFO, LFU with its counts, TTL and
    TLRU recency). A receiver never evicts to make room: once a record does not fit
    (``currsize + getsizeof(value) > maxsize``) it is dropped as ``"receiver full"`` and the
    hotter entries already imported stay; a value larger than the whole cache is dropped as
    ``"too large"``. A record whose key, value or merge function raises is dropped as
    ``"error"`` and logged.

Change tracking (the building blocks of pre-copy)
    ``mark()`` starts noting the keys of a cache that are written, deleted or evicted and,
    in caches whose order reads change (``LRUCache``, ``LFUCache``, ``TTLCache``,
    ``TLRUCache``), read; ``changed_since(mark)`` yields their records as the export would
    (hottest first, remaining lifetimes and counts as of now), then ``(key, DELETED,
    None)`` for those no longer held. Any number of marks share one record of when each
    key last changed (one entry per key changed since the first mark, deleted ones too,
    until ``stop_tracking()``). The record is bounded: once it holds more keys than
    :data:`CHANGES_SHARE` of the cache's entries (and than :data:`CHANGES_FLOOR`), it is
    dropped, tracking stops, and ``changed_since`` raises :exc:`handoff.ChangesLost` for
    every mark of it (a pre-copy then sends the whole cache again; a new ``mark()``
    starts a new record). An import into a tracked cache (a handoff it receives while
    it pre-copies) notes every key it was given. Expiry purges are not noted (the lifetime travelled
    with the entry: it expires on the receiver too). To see every access, ``mark()``
    gives the cache object a subclass of its own class (same name, same behaviour, one
    dictionary write per noted access; it still pickles as its own class), until
    ``stop_tracking()``. On the receiver,
    ``import_delta(records)`` applies such a delta, deletions first and then the written
    records coldest first (so that it can arrive in chunks), on top of a pre-copy: a
    written record replaces the entry held (it is newer) and becomes the hottest, above
    every entry the delta does not name, so that the receiver ends with the sender's
    entries, values, lifetimes and order; ``DELETED`` removes the key (see the README's
    "Pre-copy"). ``export_paused()`` is the export of a tracked cache ordered by an
    ``OrderedDict`` (LRU, TTL, TLRU, FIFO) listed in steps of :data:`WALK_STEP` keys, the
    cache serving between them as it would without the listing (see :class:`_Walk`); and
    ``wake_on_change(waker)`` has ``waker()`` called once at the next change, for a
    pre-copy's live stream to wait for changes rather than poll.

cachetools internals
    Reading without side effects and writing in place need a few private attributes
    (``_Cache__data`` and ``__currsize``, ``__maxsize`` before cachetools 7.1.7 only, whose
    overwrites evict more than they must, ``_LRUCache__order``, ``_FIFOCache__order``,
    ``_TTLCache__links`` and ``__root``, ``_TLRUCache__items`` and ``__order``, and the LFU
    counters in one of three layouts: count buckets with ordered keys since cachetools 7.3,
    count buckets with a set of keys in 6.1 to 7.2, a ``Counter`` before). Each is used by
    one helper below, and :func:`_verify_internals` checks them all when this module is
    imported, raising :exc:`UnsupportedCachetools` instead of failing mid-drain. Before
    cachetools 7.3 LFU counts survive but which of several equally used entries goes first
    is not kept (:data:`LFU_TIES_PRESERVED`); 6.1 to 7.2 pick among them arbitrarily anyway.

Concurrency
    Adapters run on the node's event-loop thread, and neither they nor cachetools objects
    are thread-safe. The node holds ``node.lock`` while an adapter exports or imports, so a
    threaded application guards every access to a tracked cache with that lock
    (``@cached(cache, lock=node.lock)``).
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import logging
import math
from bisect import bisect_left, bisect_right
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from itertools import chain, compress, islice, repeat
from math import floor, frexp, ldexp
from operator import attrgetter, not_
from typing import Any, ClassVar, Final, Generic, NamedTuple, TypeVar

import cachetools

from handoff._adapter import DELETED, PAUSE, ChangesLost, ImportResult, Record
from handoff._errors import HandoffError
from handoff._registry import ClassFactory

__all__ = (
    "CACHETOOLS_ADAPTERS",
    "CACHE_FACTORY",
    "EXPIRED",
    "EXPIRY_UNSUPPORTED",
    "FIFO_CACHE_FACTORY",
    "IMPORT_ERROR",
    "LFU_CACHE_FACTORY",
    "LFU_TIES_PRESERVED",
    "LRU_CACHE_FACTORY",
    "MAX_IMPORTED_COUNT",
    "RECEIVER_FULL",
    "RR_CACHE_FACTORY",
    "TLRU_CACHE_FACTORY",
    "TOO_LARGE",
    "TTL_CACHE_FACTORY",
    "CacheAdapter",
    "FIFOCacheAdapter",
    "LFUCacheAdapter",
    "LRUCacheAdapter",
    "Merge",
    "RRCacheAdapter",
    "TLRUCacheAdapter",
    "TTLCacheAdapter",
    "UnsupportedCachetools",
)

logger = logging.getLogger(__name__)

SUPPORTED_VERSIONS: Final = ">=5.3,<9"

EXPIRED: Final = "expired"
"""Drop reason: the record's lifetime ran out before it could be applied."""
EXPIRY_UNSUPPORTED: Final = "expiry unsupported"
"""Drop reason: the record expires, and the receiving cache cannot expire entries."""
RECEIVER_FULL: Final = "receiver full"
"""Drop reason: the receiving cache is full of hotter entries."""
TOO_LARGE: Final = "too large"
"""Drop reason: ``getsizeof(value)`` exceeds the receiving cache's ``maxsize``."""
IMPORT_ERROR: Final = "error"
"""Drop reason: the record could not be applied (unhashable key, a raising merge ...)."""

Merge = Callable[[Any, Any], Any]
"""``merge(existing_value, incoming_value) -> value`` for keys both sides hold."""

_MISSING: Final[Any] = object()
_C = TypeVar("_C", bound="cachetools.Cache[Any, Any]")
_GRID_BITS: Final = 8  # shortened TTL expiries lose at most 2**-8 of the time left
_RECORD_TYPES: Final = frozenset({tuple, list})
_PLAIN_KEYS: Final = frozenset({str, bytes, int, float, bool, type(None)})
"""Key types whose hashing and comparison run no Python code and cannot fail."""
_PLAIN_OR_TUPLE_KEYS: Final = _PLAIN_KEYS | {tuple}
_EXPIRES: Final = attrgetter("expires")
_SLICE: Final = 512  # keys inserted at a time: their dict slots stay in the CPU's caches


class UnsupportedCachetools(HandoffError, ImportError):
    """The installed cachetools is laid out differently from what these adapters know."""


# --- cachetools internals: every private access goes through one of these helpers. ---


def _data(cache: cachetools.Cache[Any, Any]) -> dict[Any, Any]:
    """The cache's key -> value dict (reading it is not a use, unlike ``cache[key]``)."""
    return cache._Cache__data  # type: ignore[attr-defined,no-any-return]


def _store_new(
    cache: cachetools.Cache[Any, Any], keys: Sequence[Any], values: Sequence[Any]
) -> None:
    """Store values under keys the cache lacks, as ``Cache.__setitem__`` would if nothing
    had to be evicted: for the default ``getsizeof`` only (each value counts 1, and no
    per-key sizes are kept). The caller checks that the keys fit."""
    data = _data(cache)
    held = len(data)
    data.update(zip(keys, values, strict=True))
    cache._Cache__currsize += len(data) - held  # type: ignore[attr-defined]


@contextmanager
def _making_no_room(cache: cachetools.Cache[Any, Any], size: float) -> Iterator[None]:
    """Within, ``cache[key] = value`` of a held key whose new size is at most ``size``
    evicts nothing when its growth fits (the caller checks that it does).

    Before cachetools 7.1.7, ``Cache.__setitem__`` makes room for the whole new size of an
    overwritten key that grows, not for its growth (cachetools #405: it evicts although the
    growth fits). Raising ``maxsize`` by the new size for that one write stops the eviction
    loop and nothing else: the write's own ``value too large`` check uses the raised bound,
    which is why the caller checks ``size <= maxsize`` itself.
    """
    held = cache._Cache__maxsize  # type: ignore[attr-defined]
    cache._Cache__maxsize = held + size  # type: ignore[attr-defined]
    try:
        yield
    finally:
        cache._Cache__maxsize = held  # type: ignore[attr-defined]


def _lru_order(cache: cachetools.LRUCache[Any, Any]) -> OrderedDict[Any, None]:
    """Keys from least to most recently used."""
    return cache._LRUCache__order  # type: ignore[attr-defined,no-any-return]


def _fifo_order(cache: cachetools.FIFOCache[Any, Any]) -> OrderedDict[Any, None]:
    """Keys from first to last inserted."""
    return cache._FIFOCache__order  # type: ignore[attr-defined,no-any-return]


def _ttl_links(cache: cachetools.TTLCache[Any, Any]) -> OrderedDict[Any, Any]:
    """Key -> link, from least to most recently used; ``link.expires``, ``link.key``."""
    return cache._TTLCache__links  # type: ignore[attr-defined,no-any-return]


def _ttl_root(cache: cachetools.TTLCache[Any, Any]) -> Any:
    """Sentinel of the doubly linked list (``prev``/``next``) of links by expiry.

    ``expire()`` stops at the first live link, so the list must stay sorted by expiry.
    """
    return cache._TTLCache__root  # type: ignore[attr-defined]


def _tlru_items(cache: cachetools.TLRUCache[Any, Any]) -> OrderedDict[Any, Any]:
    """Key -> item (``expires``, ``removed``), from least to most recently used."""
    return cache._TLRUCache__items  # type: ignore[attr-defined,no-any-return]


def _tlru_heap(cache: cachetools.TLRUCache[Any, Any]) -> list[Any]:
    """Heap of items by expiry; replaced items stay in it, marked ``removed``.

    ``expire()`` may rebuild the list, so never keep it across cache calls.
    """
    return cache._TLRUCache__order  # type: ignore[attr-defined,no-any-return]


def _lfu_root(cache: cachetools.LFUCache[Any, Any]) -> Any:
    """Sentinel of the linked list of count buckets (``count``, ``keys``), rarest first.

    ``keys`` is an ``OrderedDict``, oldest arrival (evicted first) first, or before
    cachetools 7.3 a ``set``. Only ``_bucket_*`` touch it.
    """
    return cache._LFUCache__root  # type: ignore[attr-defined]


def _lfu_links(cache: cachetools.LFUCache[Any, Any]) -> dict[Any, Any]:
    """Key -> its count bucket (cachetools >= 6.1)."""
    return cache._LFUCache__links  # type: ignore[attr-defined,no-any-return]


def _bucket_keys_hottest_first(bucket: Any) -> list[Any]:
    """A bucket's keys, the one its cache would evict last first."""
    keys = bucket.keys
    return list(keys) if isinstance(keys, set) else list(reversed(keys))


def _bucket_remove(bucket: Any, key: Any) -> bool:
    """Take ``key`` out of its bucket; True if the bucket is now empty."""
    keys = bucket.keys
    if isinstance(keys, set):
        keys.remove(key)
    else:
        del keys[key]
    return not keys


def _bucket_add(bucket: Any, key: Any, *, coldest: bool) -> None:
    """Put ``key`` in a bucket: first (or last) to be evicted among its equals."""
    keys = bucket.keys
    if isinstance(keys, set):
        keys.add(key)
        return
    keys[key] = None
    if coldest:
        keys.move_to_end(key, last=False)


def _lfu_counter(cache: cachetools.LFUCache[Any, Any]) -> Counter[Any]:
    """Key -> minus its use count (cachetools < 6.1; ties evict the first inserted)."""
    return cache._LFUCache__counter  # type: ignore[attr-defined,no-any-return]


CHANGES_FLOOR: Final = 4096
"""A record of changed keys may always grow to this many keys (see :data:`CHANGES_SHARE`)."""
CHANGES_SHARE: Final = 0.5
"""A record of changed keys larger than this share of its cache's entries (and than
:data:`CHANGES_FLOOR`) is dropped, tracking stops, and ``changed_since`` raises
:exc:`~handoff.ChangesLost` (a pre-copy then sends everything again): under churn the keys
deleted since the mark would otherwise pile up without bound, and a delta that large is
worth little more than a copy."""
_CHECK_EVERY: Final = 1024  # notes between two checks of the record's size

_CHANGES: Final = "_handoff_changes"
"""The instance attribute where a tracked cache keeps its :class:`_Changes`."""
_TRACKING: dict[type[Any], type[Any]] = {}
_SESSIONS = iter(range(1, 1 << 62))
_LOST_SESSIONS: set[int] = set()
"""Sessions whose record outgrew its bound: their marks raise ChangesLost (one int each)."""


class _Changes:
    """When each key last changed, by a counter: any number of marks (one per pre-copy,
    to each new node) share it. Keys deleted stay until tracking stops, or until the
    record outgrows its bound (:data:`CHANGES_SHARE`): then it is dropped, the cache gets
    its own class back, and every mark of it is lost."""

    __slots__ = ("cache", "changed", "count", "reordered", "session", "wakers", "walk")

    def __init__(self, cache: cachetools.Cache[Any, Any]) -> None:
        self.session = next(_SESSIONS)
        self.count = 0
        self.changed: dict[Any, int] = {}
        self.cache: cachetools.Cache[Any, Any] | None = cache
        self.reordered = False
        """Whether an import placed entries elsewhere than at the hot end (then the
        order of the notes is not the cache's order)."""
        self.walk: _Walk | None = None
        """The listing of the cache's keys under way in steps, if any (see :class:`_Walk`)."""
        self.wakers: list[Callable[[], None]] = []
        """Called once at the next change (see :meth:`CacheAdapter.wake_on_change`)."""

    def note(self, key: Any) -> None:
        self.count += 1
        changed = self.changed
        # Re-inserted, so that the record is in the order of the changes: ``since`` reads
        # it from the newest end and stops at the mark (a pre-copy's live stream asks
        # every few milliseconds, and must not scan every key changed since the copy).
        changed.pop(key, None)
        changed[key] = self.count
        if self.wakers:  # (nobody waits: this check is all a change costs)
            self.wake()
        cache = self.cache
        if (
            not self.count % _CHECK_EVERY
            and cache is not None
            and len(self.changed) > max(CHANGES_FLOOR, CHANGES_SHARE * len(cache))
        ):
            self.lose(cache)

    def wake(self) -> None:
        """Call (and forget) the wakers: something changed, or tracking ends."""
        wakers, self.wakers = self.wakers, []
        for wake in wakers:
            try:
                wake()
            except Exception:  # (the cache's user must not pay for a waker's bug)
                logger.exception("a waker of %r failed", self.cache)

    def lose(self, cache: cachetools.Cache[Any, Any]) -> None:
        """Drop the record and stop tracking (the cache's accesses cost nothing more)."""
        if self.walk is not None:
            self.walk.settle()  # while the record still says which keys were touched
        _LOST_SESSIONS.add(self.session)
        self.wake()
        self.changed = {}
        self.cache = None
        cache.__dict__.pop(_CHANGES, None)
        cls = type(cache)
        if cls in _TRACKING.values():
            cache.__class__ = cls.__mro__[1]

    def forget_through(self, count: int) -> int:
        """Forget the keys whose last change is at or before ``count`` (no mark in use is
        older): the oldest first, as the record is ordered. Returns how many."""
        if self.walk is not None:  # it must tell the keys touched since it began
            count = min(count, self.walk.start)
        changed = self.changed
        old = list(itertools.takewhile(lambda key: changed[key] <= count, changed))
        for key in old:
            del changed[key]
        return len(old)

    def since(self, mark: object) -> dict[Any, int]:
        """Each key changed after ``mark``, with the count of its last change."""
        if not isinstance(mark, tuple) or len(mark) != 2 or mark[0] != self.session:
            raise ValueError(f"{mark!r} is not a mark of this cache's tracking")
        after: int = mark[1]
        changed = self.changed
        since: dict[Any, int] = {}
        for key in reversed(changed):  # newest first: only what changed after the mark
            count = changed[key]
            if count <= after:
                break
            since[key] = count
        return since


def _tracking_class(base: type[Any], *, reads: bool) -> type[Any]:
    """A subclass of ``base`` whose writes, deletions (evictions too: ``popitem`` deletes
    through ``del``) and, with ``reads``, reads note the key. Expiry purges (``expire``)
    call ``Cache.__delitem__`` directly and go unnoted: an expired entry expires on the
    receiver too, its remaining lifetime having travelled with it."""
    cls = _TRACKING.get(base)
    if cls is not None:
        return cls
    base_set, base_del, base_get = base.__setitem__, base.__delitem__, base.__getitem__
    base_popitem, base_clear = base.popitem, base.clear
    # A subclass the app wrote may choose (or watch) evictions in its own ``popitem``,
    # which calls cachetools' own and would take the cold end of an order a walk moved:
    # its walk is undone first (the listing is then made at once).
    popitem_owner = next(klass for klass in base.__mro__ if "popitem" in vars(klass))
    own_popitem = popitem_owner.__module__.partition(".")[0] == "cachetools"

    def __setitem__(self: Any, key: Any, value: Any) -> None:
        base_set(self, key, value)
        changes = self.__dict__.get(_CHANGES)
        if changes is not None:
            changes.note(key)

    def __delitem__(self: Any, key: Any) -> None:
        base_del(self, key)
        changes = self.__dict__.get(_CHANGES)
        if changes is not None:
            changes.note(key)

    def own_base_popitem(self: Any) -> tuple[Any, Any]:
        # cachetools' popitem takes ``next(iter(order))``: a step of a walk (or its end)
        # made by a thread that ignores the node's lock between the two fails it with
        # RuntimeError before anything is removed (the app's writes would raise it).
        for _ in range(_STEP_ATTEMPTS - 1):
            with contextlib.suppress(RuntimeError):
                return base_popitem(self)  # type: ignore[no-any-return]
        return base_popitem(self)  # type: ignore[no-any-return]

    def popitem(self: Any) -> tuple[Any, Any]:
        changes = self.__dict__.get(_CHANGES)
        walk = None if changes is None else changes.walk
        if not own_popitem:
            if walk is not None:
                walk.settle()
            return base_popitem(self)  # type: ignore[no-any-return]
        if walk is None:
            return own_base_popitem(self)
        # A walk moved the keys it listed to the hot end: the least recently used is
        # the coldest of those still untouched, if any (see _Walk).
        timer = getattr(self, "timer", None)
        with timer if timer is not None else contextlib.nullcontext():
            expire = getattr(self, "expire", None)
            if expire is not None:
                expire()  # as the base popitem does first
            key = walk.coldest()
            if key is _MISSING:
                return own_base_popitem(self)
            return key, self.pop(key)

    def __reduce_ex__(self: Any, protocol: Any) -> Any:
        # Pickled (or copied) as the cache it is: the tracking stays with this object.
        _settle(self)
        return _reduce_untracked(self, base, protocol)

    def clear(self: Any) -> None:
        changes = self.__dict__.get(_CHANGES)
        if changes is None or base_clear is MutableMapping.clear:
            base_clear(self)  # (through ``popitem``: each deletion noted)
            return
        # Newer cachetools clear without ``__delitem__``: each key is noted as deleted,
        # or a receiver would keep what the app cleared.
        _settle(self)
        cleared = list(_data(self))
        base_clear(self)
        for key in cleared:
            changes.note(key)

    namespace: dict[str, Any] = {
        "__setitem__": __setitem__,
        "clear": clear,
        "__delitem__": __delitem__,
        "popitem": popitem,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__reduce_ex__": __reduce_ex__,
    }
    base_copy = getattr(base, "__copy__", None)
    if base_copy is not None:

        def __copy__(self: Any) -> Any:
            _settle(self)  # (a copy in the middle of a walk would copy its order)
            made = base_copy(self)
            # cachetools' ``__copy__`` copies the instance dict: the copy would share the
            # record of changes (its writes noted as the original's, its evictions made
            # by the original's walk), and keep the tracking class after it stopped.
            made.__dict__.pop(_CHANGES, None)
            made.__class__ = base
            return made

        namespace["__copy__"] = __copy__
    if reads:

        def __getitem__(self: Any, key: Any) -> Any:
            value = base_get(self, key)
            changes = self.__dict__.get(_CHANGES)
            if changes is not None:
                changes.note(key)
            return value

        namespace["__getitem__"] = __getitem__
    cls = _TRACKING[base] = type(base.__name__, (base,), namespace)
    return cls


def _reduce_untracked(cache: Any, base: type[Any], protocol: Any) -> Any:
    state = {k: v for k, v in cache.__dict__.items() if k != _CHANGES}
    return (_new_cache, (base,), state)


def _new_cache(cls: type[Any]) -> Any:
    """Unpickle a tracked cache as an untracked one of its own class."""
    return object.__new__(cls)


def _track(cache: cachetools.Cache[Any, Any], *, reads: bool) -> tuple[int, int]:
    """Swap ``cache``'s class for its tracking subclass (once); a mark of now."""
    if type(cache) not in _TRACKING.values():
        cache.__class__ = _tracking_class(type(cache), reads=reads)
    changes = cache.__dict__.get(_CHANGES)
    if changes is None:
        changes = cache.__dict__[_CHANGES] = _Changes(cache)
    return changes.session, changes.count


def _changes(cache: cachetools.Cache[Any, Any], mark: object) -> dict[Any, int]:
    changes: _Changes | None = cache.__dict__.get(_CHANGES)
    if changes is None:
        session = mark[0] if isinstance(mark, tuple) and mark else None
        if isinstance(session, int) and session in _LOST_SESSIONS:
            raise ChangesLost(
                f"more keys changed since {mark!r} than the record of changes keeps (at "
                f"most {CHANGES_SHARE:g} of the cache's entries, or {CHANGES_FLOOR})"
            )
        raise ValueError(f"{mark!r} is not a mark of this cache's tracking (it stopped)")
    return changes.since(mark)


def _noting_imports(
    method: Callable[..., ImportResult],
) -> Callable[..., ImportResult]:
    """An import into a tracked cache notes every key it was given: its bulk paths store
    without ``__setitem__``, unseen by the tracking subclass (a node that pre-copies and
    receives a handoff meanwhile must pass those records on in its delta)."""

    @functools.wraps(method)
    def import_records(
        self: CacheAdapter[Any], records: Sequence[Record], *, age: float = 0.0
    ) -> ImportResult:
        _settle(self.cache)  # imports place entries at the cold end, where a walk lists
        result = method(self, records, age=age)
        changes: _Changes | None = self.cache.__dict__.get(_CHANGES)
        if changes is not None and records:
            changes.reordered = True
            for record in records:
                with contextlib.suppress(Exception):  # (an unhashable key was dropped)
                    changes.note(record[0])
        return result

    return import_records


def _untrack(cache: cachetools.Cache[Any, Any]) -> None:
    _settle(cache)
    changes: _Changes | None = cache.__dict__.pop(_CHANGES, None)
    if changes is not None:
        changes.wake()
    cls = type(cache)
    if cls in _TRACKING.values():
        cache.__class__ = cls.__mro__[1]


WALK_STEP: Final = 4096
"""Keys a listing in steps (:meth:`CacheAdapter.export_paused`) takes from the cache's
order at a time, then a pause: ~10 ms of the event loop's time at a million entries
(measured 1.5-3 us a key: walking a C ``OrderedDict`` looks each key up again, and each is
then moved), whatever the cache's size."""


_STEP_ATTEMPTS: Final = 3
_LIST_ATTEMPTS: Final = 8


class _Walk:
    """Lists the keys of a tracked cache ordered by an ``OrderedDict`` (LRU, TTL, TLRU,
    FIFO) in steps of bounded time, while the cache serves between them.

    An ``OrderedDict`` iterator fails once the dict changes, and can only start at either
    end: each step takes the coldest keys not yet listed from the cold end and moves them
    to the hot end (``move_to_end``, which changes nothing else). Between steps the cache
    changes, every change noted by its tracking (see :func:`_tracking_class`): a key used
    or written goes to the hot end, a deleted one leaves. So the order is always: the keys
    not yet listed and not touched since the walk began (coldest first, as they were),
    then the listed ones and the touched ones, interleaved; the walk ends at the first key
    that is touched, or is the first listed one still there untouched.

    The true recency order meanwhile is: the untouched listed keys (as they were listed),
    the untouched unlisted ones, the touched ones by their last use. The tracking class's
    ``popitem`` evicts by it (:meth:`coldest`); at the end :meth:`finish` moves the
    touched keys to the hot end by their last use, which restores the cache's own order
    exactly, and a walk left unfinished is undone by :meth:`settle`. Imports (which place
    entries at the cold end) and anything that reads the order settle first.
    """

    __slots__ = ("changes", "cursor", "listed", "order", "start")

    def __init__(self, order: OrderedDict[Any, Any], changes: _Changes) -> None:
        self.order = order
        self.changes = changes
        self.start = changes.count
        """Keys whose last change counts above this were touched since the walk began."""
        self.listed: list[Any] = []
        """Keys in the order listed: coldest first, as they were when the walk began."""
        self.cursor = 0
        """Listed keys before this index are gone from the cache or touched."""

    def _untouched(self, key: Any) -> bool:
        return self.changes.changed.get(key, 0) <= self.start

    def coldest(self) -> Any:
        """The listed key least recently used (gone and touched ones skipped), or
        ``_MISSING`` if none is left."""
        listed, order = self.listed, self.order
        while self.cursor < len(listed):
            key = listed[self.cursor]
            if key in order and self._untouched(key):
                return key
            self.cursor += 1
        return _MISSING

    def step(self, limit: int) -> bool:
        """List up to ``limit`` more keys; True once every untouched key is listed.

        Raises :exc:`RuntimeError` if the cache keeps changing during the step itself
        (threads that change it without the node's lock, between two keys whose hashing
        runs Python code): the listing is then made at once."""
        order, changes = self.order, self.changes
        for _ in range(_STEP_ATTEMPTS):
            count = changes.count
            stop = self.coldest()
            try:
                part = list(islice(order, limit))
            except (RuntimeError, KeyError):  # (KeyError: the key it was at left)
                continue
            changed, start = changes.changed, self.start
            end = len(part) < limit
            # (In C first: usually no key taken was ever noted, nor is the first listed.)
            if not changed.keys().isdisjoint(part) or (stop is not _MISSING and stop in part):
                for index, key in enumerate(part):
                    if key is stop or changed.get(key, 0) > start:
                        del part[index:]
                        end = True
                        break
            # Nothing noted meanwhile: the keys taken are the coldest unlisted ones (a
            # change noted during the step may have left or moved one of them, making it
            # look like the end). A step starts at the cold end: it can start again.
            if changes.count == count:
                break
        else:
            raise RuntimeError("the cache changed during each attempt at a step of its listing")
        try:
            _run(map(order.move_to_end, part))
        except KeyError:
            # A key left meanwhile (the same): the keys still held, in order (those moved
            # already move again, in the same order).
            for key in part:
                if key in order:
                    order.move_to_end(key)
        self.listed += part
        return end

    def finish(self) -> list[Any]:
        """End the (complete) walk: the keys touched since it began and still held go to
        the hot end by their last use. Returns them, the most recently used first."""
        changes, order = self.changes, self.order
        # (A Python loop: a thread without the node's lock may note a key while it reads
        # the record, which fails. It ends only once read whole, or the caller settles.)
        for _ in range(_STEP_ATTEMPTS):
            with contextlib.suppress(RuntimeError):
                since = changes.since((changes.session, self.start))
                break
        else:
            raise RuntimeError("the cache changed during each attempt at ending its listing")
        changes.walk = None
        touched = [key for key in since if key in order]
        try:
            _run(map(order.move_to_end, reversed(touched)))
        except KeyError:  # (one left meanwhile: the keys still held, in order)
            touched = [key for key in touched if key in order]
            for key in reversed(touched):
                with contextlib.suppress(KeyError):
                    order.move_to_end(key)
        return touched

    def settle(self) -> None:
        """End the walk, done or not: the untouched listed keys go back to the cold end
        as they were (one pass over them, at most the whole cache once)."""
        changes = self.changes
        if changes.walk is not self:
            return
        changes.walk = None
        order, untouched = self.order, self._untouched
        back = [key for key in reversed(self.listed) if key in order and untouched(key)]
        _run(map(order.move_to_end, back, repeat(False)))


def _settle(cache: cachetools.Cache[Any, Any]) -> None:
    """Undo a walk under way on ``cache``, if any (before its order is read or changed
    by anything but its own users)."""
    changes: _Changes | None = cache.__dict__.get(_CHANGES)
    if changes is not None and changes.walk is not None:
        changes.walk.settle()


def _hottest_first_of(order: OrderedDict[Any, Any]) -> list[Any]:
    """The keys of ``order``, the hot end first. Iterating an ``OrderedDict`` hashes each
    key: where that runs Python code, a thread that changes the cache without the node's
    lock makes the iteration fail (``RuntimeError``, or ``KeyError`` for a key that left
    under it); it is tried again, a few times, before that failure is let through."""
    for _ in range(_LIST_ATTEMPTS - 1):
        with contextlib.suppress(RuntimeError, KeyError):
            return list(reversed(order))
    return list(reversed(order))


def _run(calls: Iterable[object]) -> None:
    """Exhaust an iterator of calls (``map(...)``) in C, discarding what they return."""
    deque(calls, maxlen=0)


def _unlink(node: Any) -> None:
    node.prev.next = node.next
    node.next.prev = node.prev


def _insert_after(anchor: Any, node: Any) -> None:
    node.prev = anchor
    node.next = after = anchor.next
    anchor.next = after.prev = node


def _overwrite_makes_room_for_whole_size() -> bool:
    """Whether ``cache[key] = value`` of a held key that grows evicts until the whole new
    size fits, rather than the growth (cachetools before 7.1.7; see _making_no_room)."""
    probe: cachetools.Cache[str, str] = cachetools.Cache(3, getsizeof=len)
    probe["a"], probe["b"] = "x", "x"
    probe["b"] = "xx"  # grows by 1: fits beside "a"
    return "a" not in probe


def _verify_internals() -> str:
    """Check every internal the adapters use; return the LFU layout (see _LFU_LAYOUT)."""

    def require(condition: bool, what: str) -> None:
        if not condition:
            raise UnsupportedCachetools(
                f"handoff.adapters.cachetools supports cachetools {SUPPORTED_VERSIONS}, "
                f"but the installed cachetools {cachetools.__version__} differs: {what}. "
                f"Install cachetools{SUPPORTED_VERSIONS}."
            )

    def clock() -> float:
        return 0.0

    try:
        cache: cachetools.Cache[str, int] = cachetools.Cache(2)
        cache["a"] = 1
        require(_data(cache) == {"a": 1}, "Cache data dict")

        plain: cachetools.Cache[str, int] = cachetools.Cache(3)
        plain["a"] = 1
        _store_new(plain, ("b",), (2,))
        plain["c"], plain["d"] = 3, 4  # full: "d" evicts "a"
        del plain["b"]  # a stored entry leaves like any other
        require(dict(plain) == {"c": 3, "d": 4} and plain.currsize == 2, "Cache size accounting")

        if _overwrite_makes_room_for_whole_size():
            sized: cachetools.Cache[str, str] = cachetools.Cache(3, getsizeof=len)
            sized["a"], sized["b"] = "x", "x"
            with _making_no_room(sized, 2):
                sized["b"] = "xx"
            require(
                dict(sized) == {"a": "x", "b": "xx"} and (sized.currsize, sized.maxsize) == (3, 3),
                "Cache maxsize",
            )

        lru: cachetools.LRUCache[str, int] = cachetools.LRUCache(3)
        lru["a"], lru["b"] = 1, 2
        require(list(_lru_order(lru)) == ["a", "b"], "LRUCache order")

        fifo: cachetools.FIFOCache[str, int] = cachetools.FIFOCache(3)
        fifo["a"], fifo["b"] = 1, 2
        require(list(_fifo_order(fifo)) == ["a", "b"], "FIFOCache order")

        ttl: cachetools.TTLCache[str, int, float] = cachetools.TTLCache(3, 10.0, clock)
        ttl["a"] = 1
        link, root = _ttl_links(ttl)["a"], _ttl_root(ttl)
        made = type(link)("b", 5.0)
        require(
            isinstance(_ttl_links(ttl), OrderedDict)
            and root.next is link is root.prev
            and link.next is root is link.prev
            and (link.key, link.expires) == ("a", 10.0)
            and (made.key, made.expires) == ("b", 5.0),
            "TTLCache links",
        )
        with ttl.timer as now:
            require(now == 0.0, "TTLCache timer")

        tlru: cachetools.TLRUCache[str, int, float] = cachetools.TLRUCache(
            3, lambda _k, _v, now: now + 5.0, clock
        )
        tlru["a"] = 1
        item = _tlru_items(tlru)["a"]
        require(
            _tlru_heap(tlru) == [item]
            and (item.key, item.expires, item.removed) == ("a", 5.0, False)
            and type(item)("b", 1.0).expires == 1.0,
            "TLRUCache items",
        )

        lfu: cachetools.LFUCache[str, int] = cachetools.LFUCache(3)
        lfu["a"] = 1
        lfu["a"]  # a use: count 2
        if hasattr(lfu, "_LFUCache__links"):
            bucket = _lfu_links(lfu)["a"]
            require(
                _lfu_root(lfu).next is bucket
                and bucket.count == 2
                and list(bucket.keys) == ["a"]
                and type(bucket)(3).count == 3,
                "LFUCache count buckets",
            )
            return "set buckets" if isinstance(bucket.keys, set) else "ordered buckets"
        require(_lfu_counter(lfu) == {"a": -2}, "LFUCache counter")
        return "counter"
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        require(False, f"{type(exc).__name__}: {exc}")
        raise  # unreachable: require raised


_LFU_LAYOUT: Final = _verify_internals()
"""``"ordered buckets"`` (cachetools >= 7.3), ``"set buckets"`` (6.1 to 7.2), ``"counter"``."""
_LFU_LINKED: Final = _LFU_LAYOUT != "counter"

_OVERWRITE_MAKES_ROOM_FOR_WHOLE_SIZE: Final = _overwrite_makes_room_for_whole_size()

LFU_TIES_PRESERVED: Final = _LFU_LAYOUT == "ordered buckets"
"""Whether, among entries used equally often, the one an ``LFUCache`` would evict first
is still evicted first after a handoff (cachetools >= 7.3); counts always survive."""


class _Batch(NamedTuple):
    """What one import call does per record: closures over the receiver's state."""

    live: Callable[[Any], Any]
    """``key -> value`` if the receiver holds ``key`` unexpired, else ``_MISSING``."""
    insert: Callable[[Any, Any, float | None, int | None], bool]
    """Store a key the receiver lacks, colder than all earlier imports; False: expired."""
    overwrite: Callable[[Any, Any, float | None, int | None], bool]
    """Store a merged value for a key the receiver holds; False: it expired at once."""


def _live_in(cache: cachetools.Cache[Any, Any]) -> Callable[[Any], Any]:
    get = _data(cache).get

    def live(key: Any) -> Any:
        return get(key, _MISSING)

    return live


def _store_in(cache: cachetools.Cache[Any, Any]) -> Callable[[Any, Any, Any, Any], bool]:
    def store(key: Any, value: Any, _lifetime: Any, _count: Any) -> bool:
        cache[key] = value
        return True

    return store


def _overwriting_in_room(
    cache: cachetools.Cache[Any, Any], overwrite: Callable[[Any, Any, Any, Any], bool]
) -> Callable[[Any, Any, Any, Any], bool]:
    """``overwrite`` that evicts nothing to store a merged value whose growth fits."""
    getsizeof = cache.getsizeof

    def in_room(key: Any, value: Any, lifetime: Any, count: Any) -> bool:
        with _making_no_room(cache, getsizeof(value)):
            return overwrite(key, value, lifetime, count)

    return in_room


class _ExpiryIndex:
    """Finds where a link with a given expiry goes in a ``TTLCache``'s expiry-sorted list.

    Searching a linked list is linear, so imported expiries are rounded down to a grid
    (a power-of-two step at most 1/256 of the time left): many entries then share an expiry,
    and a link goes right after the last one placed with the same expiry, found in a dict.
    Only a new expiry value needs a search: a bisect over the values already placed, then a
    short walk over the receiver's own links. Entries may vanish at any time, so each
    remembered link is checked before use.
    """

    __slots__ = ("last", "values")

    def __init__(self) -> None:
        self.last: dict[float, Any] = {}  # expiry -> last link placed with it
        self.values: list[float] = []  # sorted keys of last

    def forget_before(self, now: float) -> None:
        """Drop remembered expiries that have passed (their links are gone)."""
        stale = bisect_right(self.values, now)
        for value in self.values[:stale]:
            del self.last[value]
        del self.values[:stale]

    def search(self, expires: float, root: Any, links: OrderedDict[Any, Any]) -> Any:
        """The link after which one expiring at ``expires`` keeps the list sorted."""
        last, values = self.last, self.values
        if expires in last:  # remembered, but its link is gone
            del last[expires]
            del values[bisect_left(values, expires)]
        index = bisect_left(values, expires)
        anchor = root
        while index > 0:
            value = values[index - 1]
            candidate = last[value]
            if candidate.expires == value and links.get(candidate.key) is candidate:
                anchor = candidate
                break
            del last[value]
            del values[index - 1]
            index -= 1
        after = anchor.next
        while after is not root and after.expires <= expires:
            anchor, after = after, after.next
        values.insert(index, expires)
        return anchor


def _round_down(now: float, expires: float) -> float:
    """The largest point <= ``expires`` of a grid finer than 1/256 of the time left.

    The result is later than ``now`` unless the time left is lost to float rounding.
    """
    step = ldexp(1.0, frexp(expires - now)[1] - _GRID_BITS - 1)
    return floor(expires / step) * step


class CacheAdapter(Generic[_C]):
    """Hands off a ``cachetools.Cache``; the base of the other cachetools adapters.

    A plain ``Cache`` has no notion of hot: export follows its iteration order (insertion
    order, except that overwriting a key keeps its place). ``merge`` decides the value of
    keys both sides hold; without it the receiver keeps its own.
    """

    kind: str = "cachetools"
    moves_ownership: bool = False

    _cache_type: ClassVar[type[cachetools.Cache[Any, Any]]] = cachetools.Cache
    _expiring: ClassVar[bool] = False
    _reads_reorder: ClassVar[bool] = False
    _recency_ordered: ClassVar[bool] = False
    """Whether the export's order is that of the last use (read or write) of each key."""
    """Whether a read changes the order the export follows (LRU recency, LFU counts)."""

    def __init__(self, cache: _C, *, merge: Merge | None = None) -> None:
        if not isinstance(cache, self._cache_type):
            raise TypeError(
                f"{type(self).__name__} adapts a cachetools.{self._cache_type.__name__}, "
                f"not {type(cache).__name__}"
            )
        if merge is not None and not callable(merge):
            raise TypeError(f"merge must be callable(existing, incoming), not {merge!r}")
        self.cache = cache
        self.merge = merge

    def __len__(self) -> int:
        return len(self.cache)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.cache).__name__}, merge={self.merge!r})"

    # -- export --

    def export(self) -> Iterator[Record]:
        """Yield ``(key, value, meta)`` hottest first, reading each value when yielded."""
        # A generator: the keys are listed at the first pull (under the node's lock).
        yield from self._records(self._hottest_first())

    def export_paused(self) -> Iterator[Record]:
        """What :meth:`export` yields, with ``PAUSE`` between steps of the listing of the
        keys that each take a bounded time (:data:`WALK_STEP` keys), while the cache is
        tracked (a pre-copy marked it) and ordered by recency or insertion; otherwise
        the export itself. Keys touched during the listing (see :class:`_Walk`) come
        first, most recently used first, then the others as they were when it began:
        the cache's order when the listing ends. The cache serves between the steps, in
        the same order (its evictions too) as without the listing."""
        order = self._walk_order()
        changes: _Changes | None = self.cache.__dict__.get(_CHANGES)
        if order is None or changes is None:
            yield from self.export()
            return
        _settle(self.cache)  # (another walk left unfinished)
        walk = changes.walk = _Walk(order, changes)
        try:
            done = False
            while True:
                if changes.walk is walk:  # (not settled during the pause)
                    try:
                        done = walk.step(WALK_STEP)
                    except RuntimeError:
                        walk.settle()
                if changes.walk is not walk:
                    # Settled (its tracking was lost, an import came, or it kept changing
                    # under the step): what is left is listed at once, as the export does.
                    yield from self.export()
                    return
                if done:
                    break
                yield PAUSE
            try:
                touched = walk.finish()
            except RuntimeError:
                walk.settle()  # (kept changing under it: made at once, as above)
                yield from self.export()
                return
        finally:
            walk.settle()  # (a no-op once finished)
        skip = frozenset(touched)
        rest = itertools.filterfalse(skip.__contains__, reversed(walk.listed))
        yield from self._records(chain(touched, rest))

    def _walk_order(self) -> OrderedDict[Any, Any] | None:
        """The ``OrderedDict`` whose order the export follows (coldest first), if any."""
        return None

    def _records(self, keys: Iterable[Any]) -> Iterator[Record]:
        """The records of ``keys`` (hottest first), skipping those gone or expired."""
        data = _data(self.cache)
        for key in keys:
            value = data.get(key, _MISSING)
            if value is not _MISSING:
                yield key, value, None

    def _hottest_first(self) -> list[Any]:
        return list(_data(self.cache))

    # -- change tracking (pre-copy) --

    def mark(self) -> tuple[int, int]:
        """Start remembering the keys written, read (where reads change the order) or
        deleted from now on; returns a token for :meth:`changed_since`. Marks taken later
        (a pre-copy to each new node) share one record of when each key last changed.
        See "Change tracking" in the module documentation."""
        return _track(self.cache, reads=self._reads_reorder)

    def changed_since(self, mark: object) -> Iterator[Record]:
        """The records of keys written (or, see :meth:`mark`, read) since ``mark`` that the
        cache still holds, hottest first, as :meth:`export` yields them; then
        ``(key, DELETED, None)`` for keys deleted or evicted since (and not written
        again). Raises :exc:`ValueError` for a mark of no current tracking, and
        :exc:`~handoff.ChangesLost` once the record of changes outgrew its bound (see
        :data:`CHANGES_SHARE`)."""
        changes = _changes(self.cache, mark)
        if not changes:
            return
        data = _data(self.cache)
        tracking: _Changes | None = self.cache.__dict__.get(_CHANGES)
        if self._recency_ordered and tracking is not None and not tracking.reordered:
            # Every use is noted, so the last note of a key is its last use: the keys by
            # it, latest first, are in the cache's order (without listing every key).
            held = sorted((key for key in changes if key in data), key=changes.__getitem__)
            held.reverse()
        else:
            held = [key for key in self._hottest_first() if key in changes]
        yield from self._records(held)
        for key in list(changes):
            if key not in data:
                yield key, DELETED, None

    def lists_changes_cheaply(self) -> bool:
        """Whether :meth:`changed_since` reads only what changed, not every key (caches
        ordered by last use whose record of changes is in that order): a pre-copy's
        live stream asks every few milliseconds, and only then."""
        tracking: _Changes | None = self.cache.__dict__.get(_CHANGES)
        return self._recency_ordered and (tracking is None or not tracking.reordered)

    def forget_changes_before(self, marks: Iterable[object]) -> int:
        """Forget what changed before the oldest of ``marks`` (every mark still in use:
        no ``changed_since`` will ask for it), so that the record of changes holds what
        changed since the live streams' last acknowledged batches, not since the copy.
        Marks of an earlier tracking are ignored (they raise :exc:`~handoff.ChangesLost`
        anyway). Returns how many keys were forgotten."""
        tracking: _Changes | None = self.cache.__dict__.get(_CHANGES)
        if tracking is None:
            return 0
        counts = [
            mark[1]
            for mark in marks
            if isinstance(mark, tuple) and len(mark) == 2 and mark[0] == tracking.session
        ]
        return tracking.forget_through(min(counts)) if counts else 0

    def wake_on_change(self, waker: Callable[[], None]) -> bool:
        """Call ``waker()`` once, at the next change the tracking notes (or when tracking
        stops or its record is lost), in the thread that makes it, which may hold the
        node's lock: it must not block (a pre-copy's live stream sets an event of its
        event loop, thread-safely). Returns False, and never calls it, if the cache is
        not tracked."""
        tracking: _Changes | None = self.cache.__dict__.get(_CHANGES)
        if tracking is None:
            return False
        if waker not in tracking.wakers:  # (a waiter that timed out and waits again)
            tracking.wakers.append(waker)
        return True

    def stop_tracking(self) -> None:
        """Forget the mark, and give the cache back its own class (see :meth:`mark`)."""
        _untrack(self.cache)

    def import_delta(self, records: Sequence[Record], *, age: float = 0.0) -> ImportResult:
        """Apply part of what :meth:`changed_since` yielded on a pre-copy's sender, on top
        of what the pre-copy brought, in *delta order*: the deletions, then the written
        records coldest first (the reverse of :meth:`changed_since`; see
        ``handoff.engine._precopy.delta_order``), so that the delta can arrive in several
        calls. ``DELETED`` removes the key (counted as applied, whether it was held or
        not); deletions in a call are applied before its writes, to make room. A written
        record replaces the entry this cache holds (it is the newer one, unlike in
        :meth:`import_records`) and becomes the hottest, so that the last record applied
        is the hottest of all, above every entry the delta does not name. Otherwise the
        rules of :meth:`import_records` apply (lifetimes, sizes, drops)."""
        cache = self.cache
        _settle(cache)
        data = _data(cache)
        result = ImportResult()
        deleted = 0
        written: list[Record] = []
        for record in records:
            try:
                key, value = record[0], record[1]
                if key in data:
                    with contextlib.suppress(KeyError):  # (a TTLCache's expired entry)
                        del cache[key]
            except Exception:
                logger.warning("could not apply a delta record to %r", self, exc_info=True)
                result += ImportResult(dropped={IMPORT_ERROR: 1})
                continue
            if value is DELETED:
                deleted += 1
            else:
                written.append(record)
        # One import, hottest first (each at the cold end of those before it: in order,
        # none held any more), then each applied one to the hot end, coldest first: above
        # every entry the delta does not name, in the sender's order. (A record at a time
        # cost ~0.1 ms each.) Should they not all fit, the coldest are dropped.
        written.reverse()
        result += self.import_records(written, age=age)
        written.reverse()
        for record in written:
            if record[0] in data:
                self._to_hot_end(record[0])
        return result + ImportResult(applied=deleted)

    def _to_hot_end(self, key: Any) -> None:
        """Make ``key`` the entry the cache evicts last (where its order allows)."""

    # -- import --

    @_noting_imports
    def import_records(self, records: Sequence[Record], *, age: float = 0.0) -> ImportResult:
        """Apply hottest-first records; see the module documentation for the rules."""
        if not records:
            return ImportResult()
        cache, merge = self.cache, self.merge
        maxsize, getsizeof = cache.maxsize, cache.getsizeof
        sized = getsizeof is not cachetools.Cache.getsizeof  # else every value counts 1
        expiring = self._expiring
        applied = kept = 0
        dropped: dict[str, int] = {}
        with self._batch() as (live, insert, overwrite):
            if sized and _OVERWRITE_MAKES_ROOM_FOR_WHOLE_SIZE:
                overwrite = _overwriting_in_room(cache, overwrite)
            currsize = cache.currsize
            for record in records:
                try:
                    key, value, meta = record
                    lifetime: float | None = None
                    count: int | None = None
                    if type(meta) is float:
                        lifetime = meta - age
                        if not lifetime > 0.0:
                            dropped[EXPIRED] = dropped.get(EXPIRED, 0) + 1
                            continue
                        if not expiring:
                            if lifetime != math.inf:
                                reason = EXPIRY_UNSUPPORTED
                                dropped[reason] = dropped.get(reason, 0) + 1
                                continue
                            lifetime = None
                    elif type(meta) is int:
                        count = meta
                    existing = live(key)
                    if existing is _MISSING:
                        size = getsizeof(value) if sized else 1
                        if size > maxsize:
                            reason = TOO_LARGE
                        elif currsize + size > maxsize:
                            reason = RECEIVER_FULL
                        elif insert(key, value, lifetime, count):
                            currsize += size
                            applied += 1
                            continue
                        else:
                            reason = EXPIRED
                    elif merge is None:
                        kept += 1
                        continue
                    else:
                        value = merge(existing, value)
                        size = getsizeof(value)
                        grown = size - getsizeof(existing)
                        if size > maxsize:
                            reason = TOO_LARGE
                        elif currsize + grown > maxsize:
                            reason = RECEIVER_FULL
                        elif overwrite(key, value, lifetime, count):
                            currsize += grown
                            applied += 1
                            continue
                        else:
                            currsize = cache.currsize  # the receiver's policy removed it
                            reason = EXPIRED
                except Exception:
                    if IMPORT_ERROR not in dropped:  # one log line per batch is enough
                        logger.warning("could not import a record into %r", self, exc_info=True)
                    reason = IMPORT_ERROR
                dropped[reason] = dropped.get(reason, 0) + 1
        return ImportResult(applied, kept, dropped)

    @contextmanager
    def _batch(self) -> Iterator[_Batch]:
        """The per-record operations of one import call (time frozen for timed caches)."""
        store = _store_in(self.cache)
        yield _Batch(_live_in(self.cache), store, store)


class RRCacheAdapter(CacheAdapter[cachetools.RRCache[Any, Any]]):
    """Hands off a ``cachetools.RRCache`` (random replacement: export in iteration order)."""

    _cache_type = cachetools.RRCache


class _OrderedAdapter(CacheAdapter[_C]):
    """Caches whose eviction order is an ``OrderedDict`` of keys, first out first."""

    def _order(self) -> OrderedDict[Any, None]:
        raise NotImplementedError

    def _walk_order(self) -> OrderedDict[Any, Any] | None:
        return self._order()

    def _hottest_first(self) -> list[Any]:
        _settle(self.cache)
        return _hottest_first_of(self._order())

    def _to_hot_end(self, key: Any) -> None:
        self._order().move_to_end(key)

    @contextmanager
    def _batch(self) -> Iterator[_Batch]:
        cache, move = self.cache, self._order().move_to_end

        def insert(key: Any, value: Any, _lifetime: Any, _count: Any) -> bool:
            cache[key] = value
            move(key, last=False)
            return True

        yield _Batch(_live_in(cache), insert, _store_in(cache))


class LRUCacheAdapter(_OrderedAdapter[cachetools.LRUCache[Any, Any]]):
    """Hands off a ``cachetools.LRUCache``: most recently used first; recency survives."""

    _cache_type = cachetools.LRUCache
    _reads_reorder = True
    _recency_ordered = True

    def _order(self) -> OrderedDict[Any, None]:
        return _lru_order(self.cache)


class FIFOCacheAdapter(_OrderedAdapter[cachetools.FIFOCache[Any, Any]]):
    """Hands off a ``cachetools.FIFOCache``: newest first; insertion order survives."""

    _cache_type = cachetools.FIFOCache

    def _order(self) -> OrderedDict[Any, None]:
        return _fifo_order(self.cache)


MAX_IMPORTED_COUNT: Final = 1 << 16
"""The floor of the ceiling on imported LFU use counts (see :class:`LFUCacheAdapter`)."""


class LFUCacheAdapter(CacheAdapter[cachetools.LFUCache[Any, Any]]):
    """Hands off a ``cachetools.LFUCache``: highest use count first; counts survive.

    ``meta`` is the use count. A merged entry keeps the higher of the two counts (its merge
    write counts as a use). An incoming count is clamped to the receiver's own range: at
    most the highest count the receiver holds when the chunk arrives, or
    :data:`MAX_IMPORTED_COUNT` (65,536) if that is lower. A peer's ``2**62`` would
    otherwise pin an entry forever (every other entry would need as many uses first), and
    as imported counts never exceed the ceiling, chunk after chunk cannot ratchet it up:
    only the receiver's own uses raise it. Honest counts above it arrive tied at the
    ceiling, still the hottest, in the sender's order where cachetools keeps the order of
    ties (:data:`LFU_TIES_PRESERVED`). A pre-copy's delta (:meth:`import_delta`) follows
    the same rule: counts up to the ceiling are the sender's, and each record becomes the
    hottest of its count, so that ties end in the sender's order.
    """

    _cache_type = cachetools.LFUCache
    _reads_reorder = True

    def export(self) -> Iterator[Record]:
        """Yield ``(key, value, use_count)`` from the most to the least used."""
        # A generator: the keys are listed at the first pull (under the node's lock).
        yield from self._records(self._hottest_first())

    def _records(self, keys: Iterable[Any]) -> Iterator[Record]:
        data = _data(self.cache)
        count_of = self._count_of()
        for key in keys:
            value = data.get(key, _MISSING)
            count = count_of(key)
            if value is not _MISSING and count is not None:
                yield key, value, count

    def _count_of(self) -> Callable[[Any], int | None]:
        if _LFU_LINKED:
            links = _lfu_links(self.cache)

            def linked_count(key: Any) -> int | None:
                bucket = links.get(key)
                return None if bucket is None else int(bucket.count)

            return linked_count
        counter = _lfu_counter(self.cache)

        def counter_count(key: Any) -> int | None:
            count = counter.get(key)
            return None if count is None else -count

        return counter_count

    def _hottest_first(self) -> list[Any]:
        if not _LFU_LINKED:
            counter = _lfu_counter(self.cache)
            # Values are minus the counts; among equals the first inserted is evicted first.
            return sorted(reversed(counter), key=counter.__getitem__)
        keys: list[Any] = []
        root = _lfu_root(self.cache)
        bucket = root.prev
        while bucket is not root:
            keys.extend(_bucket_keys_hottest_first(bucket))
            bucket = bucket.prev
        return keys

    def _to_hot_end(self, key: Any) -> None:
        # Hottest among the entries of its count (where cachetools keeps the order of ties:
        # LFU_TIES_PRESERVED); an import placed it coldest among them.
        if _LFU_LINKED:
            keys = _lfu_links(self.cache)[key].keys
            if not isinstance(keys, set):
                keys.move_to_end(key)

    def _highest_count(self) -> int:
        if not _LFU_LINKED:
            return -min(_lfu_counter(self.cache).values(), default=0)
        root = _lfu_root(self.cache)
        return 0 if root.prev is root else int(root.prev.count)

    @contextmanager
    def _batch(self) -> Iterator[_Batch]:
        cache = self.cache
        count_of = self._count_of()
        hint: list[Any] = [None]  # the last bucket used: records come most used first
        ceiling = max(self._highest_count(), MAX_IMPORTED_COUNT)

        def insert(key: Any, value: Any, _lifetime: Any, count: int | None) -> bool:
            cache[key] = value
            count = 1 if count is None else min(count, ceiling)
            hint[0] = self._set_count(key, count, hint[0], coldest=True)
            return True

        def overwrite(key: Any, value: Any, _lifetime: Any, count: int | None) -> bool:
            cache[key] = value  # counts as a use
            current = count_of(key)
            if count is not None and current is not None and min(count, ceiling) > current:
                self._set_count(key, min(count, ceiling), None, coldest=False)
            return True

        yield _Batch(_live_in(cache), insert, overwrite)

    def _set_count(self, key: Any, count: int, hint: Any, *, coldest: bool) -> Any:
        """Give ``key`` use count ``count``, first (or last) to go among equal counts.

        Returns the bucket used, a hint for the next call (buckets can vanish: checked).
        """
        count = max(count, 1)
        if not _LFU_LINKED:
            _lfu_counter(self.cache)[key] = -count
            return None
        links, root = _lfu_links(self.cache), _lfu_root(self.cache)
        bucket = links[key]
        if _bucket_remove(bucket, key):
            _unlink(bucket)
        start = hint if hint is not None and hint.prev.next is hint else root.prev
        if start is not root and start.count < count:
            start = root.prev
        while start is not root and start.count > count:
            start = start.prev
        if start is root or start.count != count:
            new = type(bucket)(count)
            _insert_after(start, new)
            start = new
        _bucket_add(start, key, coldest=coldest)
        links[key] = start
        return start


class TTLCacheAdapter(CacheAdapter[cachetools.TTLCache[Any, Any, Any]]):
    """Hands off a ``cachetools.TTLCache``: most recently used first, with time left.

    ``meta`` is the seconds of life left at export. On import an entry expires when the
    receiver's ``ttl`` or its remaining lifetime (less ``age``) runs out, whichever is
    first (rounded down to 1/256 of the time left).
    """

    _cache_type = cachetools.TTLCache
    _expiring = True
    _reads_reorder = True
    _recency_ordered = True

    def __init__(
        self, cache: cachetools.TTLCache[Any, Any, Any], *, merge: Merge | None = None
    ) -> None:
        super().__init__(cache, merge=merge)
        self._index = _ExpiryIndex()

    def export(self) -> Iterator[Record]:
        """Yield ``(key, value, seconds_left)`` from the most to the least recently used."""
        # A generator: the keys are listed at the first pull (under the node's lock).
        yield from self._records(self._hottest_first())

    def _walk_order(self) -> OrderedDict[Any, Any] | None:
        return _ttl_links(self.cache)

    def _hottest_first(self) -> list[Any]:
        _settle(self.cache)
        return _hottest_first_of(_ttl_links(self.cache))

    def _to_hot_end(self, key: Any) -> None:
        _ttl_links(self.cache).move_to_end(key)

    def _records(self, keys: Iterable[Any]) -> Iterator[Record]:
        cache = self.cache
        data, links, timer = _data(cache), _ttl_links(cache), cache.timer
        for key in keys:
            link = links.get(key)
            value = data.get(key, _MISSING)
            if link is None or value is _MISSING:
                continue
            left = link.expires - timer()  # read per record: an earlier time overstates it
            if left > 0:
                yield key, value, float(left)

    @_noting_imports
    def import_records(self, records: Sequence[Record], *, age: float = 0.0) -> ImportResult:
        """Apply hottest-first records; see the module documentation for the rules."""
        cache = self.cache
        if (
            not records
            or type(cache).__setitem__ is not cachetools.TTLCache.__setitem__
            or cache.getsizeof is not cachetools.Cache.getsizeof
        ):
            return super().import_records(records, age=age)
        with cache.timer:  # one frozen time for both parts
            inserted, rest = self._insert_new(records, age)
            result = super().import_records(rest, age=age)
        if not inserted:
            return result
        return ImportResult(result.applied + inserted, result.kept_existing, result.dropped)

    def _insert_new(self, records: Sequence[Record], age: float) -> tuple[int, Sequence[Record]]:
        """Insert the records of keys the cache lacks at once: the common case of a handoff.

        Returns how many were inserted, and the records left for the per-record path
        (those of keys the cache holds, which it keeps). A chunk unlike the common case
        goes to that path whole: records or keys not of plain types, a key repeated, new
        keys that do not all fit, a record that expires at once or has a NaN lifetime,
        lifetimes mixed with counts or ``None``, or a ``merge`` and a key the cache holds.
        For a cache with the stock ``__setitem__`` and ``getsizeof`` (the caller checks),
        the cache ends up exactly as inserting record by record leaves it (entries, sizes,
        recency, expiries and their order), with C-level passes over the chunk instead of
        several Python calls per record.
        """
        cache = self.cache
        if not _RECORD_TYPES.issuperset(map(type, records)):
            return 0, records
        try:
            keys, values, metas = zip(*records, strict=True)
        except ValueError:  # records of different lengths, or all of a length other than 3
            return 0, records
        key_types = set(map(type, keys))
        if not _PLAIN_KEYS.issuperset(key_types) and not (
            _PLAIN_OR_TUPLE_KEYS.issuperset(key_types)
            and _PLAIN_KEYS.issuperset(
                map(type, chain.from_iterable(key for key in keys if type(key) is tuple))
            )
        ):
            return 0, records
        unique = set(keys)
        if len(unique) != len(keys):
            return 0, records
        with cache.timer as now:
            cache.expire(now)
            self._index.forget_before(now)
            found = self._expiries(metas, age, now)
            if found is None:
                return 0, records
            expiries, single = found
            # As insert() does, ask the links (expire() left them all alive) if a key is held.
            links = _ttl_links(cache)
            if self.merge is not None and not links.keys().isdisjoint(unique):
                # Merged entries must take their turn among the new ones (they may share
                # an expiry, and so an order in the expiry list): all one by one.
                return 0, records
            room = cache.maxsize - cache.currsize
            if len(keys) > room and len(keys) - len(links.keys() & unique) > room:
                return 0, records
            new_link = type(_ttl_root(cache))
            made: list[Any] = []
            # A slice at a time, so that the several dict operations on a key find its
            # memory warm. Keys the cache holds are left out, and their records returned.
            held: list[bool] | None = None
            contains, move = links.__contains__, links.move_to_end
            for start in range(0, len(keys), _SLICE):
                stop = start + _SLICE
                part = keys[start:stop]
                part_values = values[start:stop]
                part_expiries = expiries[start:stop]
                if links.keys().isdisjoint(part):
                    if held is not None:
                        held += repeat(False, len(part))
                else:
                    if held is None:
                        held = [False] * start
                    mask = list(map(contains, part))
                    held += mask
                    new = list(map(not_, mask))
                    part = tuple(compress(part, new))
                    part_values = tuple(compress(part_values, new))
                    part_expiries = list(compress(part_expiries, new))
                part_made = list(map(new_link, part, part_expiries))
                # Each new key goes to the cold end of those before it, as insert() does.
                links.update(zip(part, part_made, strict=True))
                _run(map(move, part, repeat(False)))
                _store_new(cache, part, part_values)
                made += part_made
            rest: Sequence[Record] = ()
            if held is not None:
                rest = list(compress(records, held))
                expiries = list(compress(expiries, map(not_, held)))
            if made:
                self._place(made, expiries, single, now)
        return len(made), rest

    def _expiries(
        self, metas: Sequence[Any], age: float, now: float
    ) -> tuple[list[float], bool] | None:
        """Each record's expiry, as insert() computes it, and whether they are all the same;
        ``None`` (all left to insert()) if a record expires at once or has a NaN lifetime,
        or if lifetimes (``float``) come mixed with counts or ``None``."""
        ttl: float = self.cache.ttl
        own_expiry = now + ttl
        types = set(map(type, metas))
        if float not in types:  # counts or None: no lifetime
            return ([own_expiry] * len(metas), True) if own_expiry > now else None
        if len(types) != 1:
            return None
        total = sum(metas)
        if total != total:  # a NaN lifetime, which insert() drops as expired (or -inf and inf)
            return None
        # Expiries grow with lifetimes: the shortest and longest bound them all.
        shortest, longest = min(metas) - age, max(metas) - age
        if not shortest > 0.0:
            return None
        if shortest >= ttl:
            return ([own_expiry] * len(metas), True) if own_expiry > now else None
        exponent = frexp(shortest)[1]
        if longest < ttl and frexp(longest)[1] == exponent:  # one grid step for all
            step = ldexp(1.0, exponent - _GRID_BITS - 1)
            lowest = floor((now + shortest) / step) * step
            if not lowest > now:
                return None
            if floor((now + longest) / step) * step == lowest:  # the usual case
                return [lowest] * len(metas), True
            return [floor((now + (meta - age)) / step) * step for meta in metas], False

        def expiry(meta: float) -> float:
            lifetime = meta - age
            if lifetime < ttl:
                step = ldexp(1.0, frexp(lifetime)[1] - _GRID_BITS - 1)
                return floor((now + lifetime) / step) * step
            return own_expiry

        expiries = list(map(expiry, metas))
        return (expiries, False) if min(expiries) > now else None

    def _place(self, made: list[Any], expiries: list[float], single: bool, now: float) -> None:
        """Link new links into the expiry-ordered list, as insert() would one by one.

        The links are sorted by expiry once (stable: of equal expiries the first imported
        goes first; ``single``: all expiries are equal, nothing to sort), chained to each
        other in C, and each run of equal expiries is spliced in where insert() would put
        its first link: after the last link placed with that expiry, or where the index's
        search finds, or, for the receiver's own expiry (the latest there is), at the end.
        """
        cache = self.cache
        root, links = _ttl_root(cache), _ttl_links(cache)
        own_expiry = now + cache.ttl
        if single:
            ordered, runs = made, [(expiries[0], len(made))]
        else:
            ordered = sorted(made, key=_EXPIRES)
            sorted_expiries = sorted(expiries)
            runs = [
                (value, bisect_right(sorted_expiries, value)) for value in sorted(set(expiries))
            ]
        _run(map(setattr, ordered, repeat("next"), islice(ordered, 1, None)))
        _run(map(setattr, islice(ordered, 1, None), repeat("prev"), ordered))
        index = self._index
        last, search, links_get = index.last, index.search, links.get
        start = 0
        for expires, end in runs:
            first, final = ordered[start], ordered[end - 1]
            if expires == own_expiry:
                anchor = root.prev
            else:
                anchor = last.get(expires)
                if (
                    anchor is None
                    or anchor.expires != expires
                    or links_get(anchor.key) is not anchor
                ):
                    anchor = search(expires, root, links)
                last[expires] = final
            after = anchor.next
            first.prev = anchor
            anchor.next = first
            final.next = after
            after.prev = final
            start = end

    @contextmanager
    def _batch(self) -> Iterator[_Batch]:
        cache = self.cache
        index = self._index
        with cache.timer as now:  # frozen for the batch: the cache's own writes see it too
            cache.expire(now)
            index.forget_before(now)
            data_get = _data(cache).get
            links, root = _ttl_links(cache), _ttl_root(cache)
            links_get, move, last, search = links.get, links.move_to_end, index.last, index.search
            ttl = cache.ttl
            own_expiry = now + ttl
            new_link = type(root)
            base_setitem = cachetools.Cache.__setitem__
            # Unless a subclass changed how entries are stored, write the link directly
            # instead of letting __setitem__ append it and then moving it.
            direct = type(cache).__setitem__ is cachetools.TTLCache.__setitem__

            def live(key: Any) -> Any:
                link = links_get(key)
                if link is None or not now < link.expires:
                    return _MISSING
                return data_get(key, _MISSING)

            def place(link: Any, expires: float) -> None:
                """Link the unlinked ``link`` back in at ``expires``."""
                anchor: Any = last.get(expires)
                if (
                    anchor is None
                    or anchor is link  # a merged entry's link, placed at this expiry before
                    or anchor.expires != expires
                    or links_get(anchor.key) is not anchor
                ):
                    anchor = search(expires, root, links)
                link.prev = anchor
                link.next = after = anchor.next
                anchor.next = after.prev = link
                last[expires] = link

            def insert(key: Any, value: Any, lifetime: float | None, _count: Any) -> bool:
                if lifetime is not None and lifetime < ttl:
                    # _round_down(now, now + lifetime), inlined: this runs per record.
                    step = ldexp(1.0, frexp(lifetime)[1] - _GRID_BITS - 1)
                    expires = floor((now + lifetime) / step) * step
                    if not expires > now:
                        return False
                else:
                    expires = own_expiry
                if direct and key not in links:
                    base_setitem(cache, key, value)
                    links[key] = link = new_link(key, expires)
                    move(key, last=False)
                    if expires == own_expiry:  # the latest expiry there is: append
                        anchor = root.prev
                    else:  # place(), inlined
                        anchor = last.get(expires)
                        if (
                            anchor is None
                            or anchor.expires != expires
                            or links_get(anchor.key) is not anchor
                        ):
                            anchor = search(expires, root, links)
                        last[expires] = link
                    link.prev = anchor
                    link.next = after = anchor.next
                    anchor.next = after.prev = link
                    return True
                cache[key] = value  # appends the link, expiring at own_expiry
                move(key, last=False)
                if expires != own_expiry:
                    link = links[key]
                    _unlink(link)
                    link.expires = expires
                    place(link, expires)
                return True

            def overwrite(key: Any, value: Any, lifetime: float | None, _count: Any) -> bool:
                held_until = links[key].expires
                cache[key] = value  # moves the link to the end, expiring at own_expiry
                until = held_until if lifetime is None else max(held_until, now + lifetime)
                if lifetime is not None and until < own_expiry:
                    link = links[key]
                    _unlink(link)
                    link.expires = expires = _round_down(now, until)
                    place(link, expires)
                return True

            yield _Batch(live, insert, overwrite)


class TLRUCacheAdapter(CacheAdapter[cachetools.TLRUCache[Any, Any, Any]]):
    """Hands off a ``cachetools.TLRUCache``: most recently used first, with time left.

    ``meta`` is the seconds of life left at export. On import the receiver's ``ttu``
    computes the expiry, shortened to the remaining lifetime (less ``age``) if that ends
    first.
    """

    _cache_type = cachetools.TLRUCache
    _expiring = True
    _reads_reorder = True
    _recency_ordered = True

    def export(self) -> Iterator[Record]:
        """Yield ``(key, value, seconds_left)`` from the most to the least recently used."""
        # A generator: the keys are listed at the first pull (under the node's lock).
        yield from self._records(self._hottest_first())

    def _walk_order(self) -> OrderedDict[Any, Any] | None:
        return _tlru_items(self.cache)

    def _hottest_first(self) -> list[Any]:
        _settle(self.cache)
        return _hottest_first_of(_tlru_items(self.cache))

    def _to_hot_end(self, key: Any) -> None:
        _tlru_items(self.cache).move_to_end(key)

    def _records(self, keys: Iterable[Any]) -> Iterator[Record]:
        cache = self.cache
        data, items, timer = _data(cache), _tlru_items(cache), cache.timer
        for key in keys:
            item = items.get(key)
            value = data.get(key, _MISSING)
            if item is None or value is _MISSING:
                continue
            left = item.expires - timer()
            if left > 0:
                yield key, value, float(left)

    @contextmanager
    def _batch(self) -> Iterator[_Batch]:
        cache = self.cache
        with cache.timer as now:
            cache.expire(now)
            data_get = _data(cache).get
            items = _tlru_items(cache)

            def live(key: Any) -> Any:
                item = items.get(key)
                if item is None or not now < item.expires:
                    return _MISSING
                return data_get(key, _MISSING)

            def shorten(key: Any, until: float) -> None:
                item = items[key]
                if until < item.expires:
                    # Heap entries cannot move: retire the item and push a replacement,
                    # as TLRUCache itself does when a key is overwritten.
                    item.removed = True
                    items[key] = replacement = type(item)(key, until)
                    heapq.heappush(_tlru_heap(cache), replacement)

            def insert(key: Any, value: Any, lifetime: float | None, _count: Any) -> bool:
                until = math.inf if lifetime is None else now + lifetime
                if not until > now:  # a lifetime below the clock's resolution at now
                    return False
                cache[key] = value
                if key not in items:  # the receiver's ttu says it is already expired
                    return False
                items.move_to_end(key, last=False)
                shorten(key, until)
                return True

            def overwrite(key: Any, value: Any, lifetime: float | None, _count: Any) -> bool:
                held = items[key]
                held_until = held.expires
                cache[key] = value
                # The receiver's ttu says the merged value is already expired: cachetools
                # >= 7.1.5 removes the entry, earlier releases skip the write and keep it.
                if items.get(key, held) is held:
                    return False
                if lifetime is not None:
                    shorten(key, max(held_until, now + lifetime))
                return True

            yield _Batch(live, insert, overwrite)


CACHE_FACTORY: Final = ClassFactory(CacheAdapter, (cachetools.Cache,))
FIFO_CACHE_FACTORY: Final = ClassFactory(FIFOCacheAdapter, (cachetools.FIFOCache,))
LFU_CACHE_FACTORY: Final = ClassFactory(LFUCacheAdapter, (cachetools.LFUCache,))
LRU_CACHE_FACTORY: Final = ClassFactory(LRUCacheAdapter, (cachetools.LRUCache,))
RR_CACHE_FACTORY: Final = ClassFactory(RRCacheAdapter, (cachetools.RRCache,))
TLRU_CACHE_FACTORY: Final = ClassFactory(TLRUCacheAdapter, (cachetools.TLRUCache,))
TTL_CACHE_FACTORY: Final = ClassFactory(TTLCacheAdapter, (cachetools.TTLCache,))

CACHETOOLS_ADAPTERS: Final = (
    CACHE_FACTORY,
    FIFO_CACHE_FACTORY,
    LFU_CACHE_FACTORY,
    LRU_CACHE_FACTORY,
    RR_CACHE_FACTORY,
    TLRU_CACHE_FACTORY,
    TTL_CACHE_FACTORY,
)
"""The factories for each cachetools type (the registry knows them by import path)."""
