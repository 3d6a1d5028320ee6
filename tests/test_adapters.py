"""The cachetools and mapping adapters: the shared contract, then each cache's rules."""

from __future__ import annotations

import copy
import logging
import math
import sys
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any, ClassVar

import cachetools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handoff._adapter import Adapter, ImportResult, Record
from handoff.adapters import cachetools as ct_adapters
from handoff.adapters.cachetools import (
    LFU_TIES_PRESERVED,
    CacheAdapter,
    FIFOCacheAdapter,
    LFUCacheAdapter,
    LRUCacheAdapter,
    RRCacheAdapter,
    TLRUCacheAdapter,
    TTLCacheAdapter,
    UnsupportedCachetools,
)
from handoff.adapters.mapping import MappingAdapter
from tests._cachetools_versions import FLAVOURS, OLDEST, Flavour, flavour
from tests.adapter_contract import AdapterContract, Merge


class Clock:
    """A settable clock for caches' ``timer``."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def pop_all(cache: cachetools.Cache[Any, Any]) -> list[Any]:
    """The keys in the order the cache evicts them (empties it)."""
    order = []
    while len(cache):
        order.append(cache.popitem()[0])
    return order


def clone(cache: Any) -> Any:
    """An independent copy (``copy.copy`` shares a cache's internals before cachetools 7.3)."""
    return copy.deepcopy(cache)


def pop_items(cache: cachetools.Cache[Any, Any]) -> list[tuple[Any, Any]]:
    """The entries in the order the cache evicts them (empties it)."""
    return [cache.popitem() for _ in range(len(cache))]


def handoff(
    source: Adapter, receiver: Adapter, *, chunk: int = 7, age: float = 0.0
) -> ImportResult:
    """Export from one adapter into another in chunks, as the engine does."""
    records = list(source.export())
    total = ImportResult()
    for start in range(0, len(records), chunk):
        total += receiver.import_records(records[start : start + chunk], age=age)
    assert total.total == len(records)
    return total


class LoggingTTLCache(cachetools.TTLCache[Any, Any, Any]):
    """A subclass that changes ``__setitem__``: the adapter must go through it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writes = 0

    def __setitem__(self, key: Any, value: Any) -> None:
        self.writes += 1
        super().__setitem__(key, value)


class CountingMapping(MutableMapping[Any, Any]):
    """A MutableMapping that is not a dict and counts its reads."""

    def __init__(self) -> None:
        self._data: dict[Any, Any] = {}
        self.reads = 0

    def __getitem__(self, key: Any) -> Any:
        self.reads += 1
        return self._data[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._data[key] = value

    def __delitem__(self, key: Any) -> None:
        del self._data[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


# --- the contract, for every adapter ---


class CachetoolsContract(AdapterContract):
    """Fills a cache with ``cache[key] = value``; subclasses say which cache."""

    def new_cache(self, role: str) -> cachetools.Cache[Any, Any]:
        raise NotImplementedError

    adapter_type: ClassVar[Callable[..., Adapter]]

    def make_source(self, entries: dict[Any, Any]) -> tuple[Any, Adapter]:
        cache = self.new_cache("source")
        for key, value in entries.items():
            cache[key] = value
        return cache, self.adapter_type(cache)

    def make_empty(self, *, merge: Merge | None = None) -> tuple[Any, Adapter]:
        cache = self.new_cache("receiver")
        return cache, self.adapter_type(cache, merge=merge)


class TestCacheContract(CachetoolsContract):
    __test__ = True
    adapter_type = CacheAdapter

    def new_cache(self, role: str) -> cachetools.Cache[Any, Any]:
        return cachetools.Cache(maxsize=2 * self.N)


class TestRRCacheContract(CachetoolsContract):
    __test__ = True
    adapter_type = RRCacheAdapter

    def new_cache(self, role: str) -> cachetools.Cache[Any, Any]:
        return cachetools.RRCache(maxsize=2 * self.N)


class TestLRUCacheContract(CachetoolsContract):
    __test__ = True
    adapter_type = LRUCacheAdapter

    def new_cache(self, role: str) -> cachetools.Cache[Any, Any]:
        return cachetools.LRUCache(maxsize=2 * self.N)


class TestFIFOCacheContract(CachetoolsContract):
    __test__ = True
    adapter_type = FIFOCacheAdapter

    def new_cache(self, role: str) -> cachetools.Cache[Any, Any]:
        return cachetools.FIFOCache(maxsize=2 * self.N)


class TestLFUCacheContract(CachetoolsContract):
    __test__ = True
    adapter_type = LFUCacheAdapter

    def new_cache(self, role: str) -> cachetools.Cache[Any, Any]:
        return cachetools.LFUCache(maxsize=2 * self.N)


class TestTTLCacheContract(CachetoolsContract):
    __test__ = True
    adapter_type = TTLCacheAdapter

    def new_cache(self, role: str) -> cachetools.Cache[Any, Any]:
        # Unrelated clocks on the two sides, as on two machines.
        now = 1_000_000.0 if role == "source" else 42.0
        return cachetools.TTLCache(maxsize=2 * self.N, ttl=600, timer=Clock(now))


class TestTTLCacheSubclassContract(TestTTLCacheContract):
    def new_cache(self, role: str) -> cachetools.Cache[Any, Any]:
        now = 1_000_000.0 if role == "source" else 42.0
        return LoggingTTLCache(maxsize=2 * self.N, ttl=600, timer=Clock(now))


class TestTLRUCacheContract(CachetoolsContract):
    __test__ = True
    adapter_type = TLRUCacheAdapter

    def new_cache(self, role: str) -> cachetools.Cache[Any, Any]:
        now = 5.0 if role == "source" else 123_456.0
        return cachetools.TLRUCache(
            maxsize=2 * self.N, ttu=lambda _key, _value, now: now + 600, timer=Clock(now)
        )


class TestDictContract(AdapterContract):
    __test__ = True

    def make_source(self, entries: dict[Any, Any]) -> tuple[Any, Adapter]:
        mapping = dict(entries)
        return mapping, MappingAdapter(mapping)

    def make_empty(self, *, merge: Merge | None = None) -> tuple[Any, Adapter]:
        mapping: dict[Any, Any] = {}
        return mapping, MappingAdapter(mapping, merge=merge)


class TestCustomMappingContract(AdapterContract):
    __test__ = True

    def make_source(self, entries: dict[Any, Any]) -> tuple[Any, Adapter]:
        mapping = CountingMapping()
        mapping.update(entries)
        return mapping, MappingAdapter(mapping)

    def make_empty(self, *, merge: Merge | None = None) -> tuple[Any, Adapter]:
        mapping = CountingMapping()
        return mapping, MappingAdapter(mapping, merge=merge)


# --- kinds and construction ---


ALL_CACHES: list[tuple[Callable[..., Adapter], cachetools.Cache[Any, Any]]] = [
    (CacheAdapter, cachetools.Cache(4)),
    (RRCacheAdapter, cachetools.RRCache(4)),
    (LRUCacheAdapter, cachetools.LRUCache(4)),
    (FIFOCacheAdapter, cachetools.FIFOCache(4)),
    (LFUCacheAdapter, cachetools.LFUCache(4)),
    (TTLCacheAdapter, cachetools.TTLCache(4, ttl=1)),
    (TLRUCacheAdapter, cachetools.TLRUCache(4, ttu=lambda _k, _v, now: now + 1)),
]


@pytest.mark.parametrize(("adapter_type", "cache"), ALL_CACHES)
def test_every_cache_adapter_shares_one_record_kind(
    adapter_type: Callable[..., Adapter], cache: cachetools.Cache[Any, Any]
) -> None:
    adapter = adapter_type(cache)
    assert adapter.kind == "cachetools"
    assert adapter.moves_ownership is False


def test_an_adapter_refuses_the_wrong_cache_type() -> None:
    with pytest.raises(TypeError, match="LRUCache"):
        LRUCacheAdapter(cachetools.FIFOCache(3))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="merge"):
        LRUCacheAdapter(cachetools.LRUCache(3), merge="newest")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="MutableMapping"):
        MappingAdapter((1, 2))  # type: ignore[arg-type]


def test_the_mapping_adapter_kind() -> None:
    adapter = MappingAdapter({})
    assert adapter.kind == "mapping"
    assert adapter.moves_ownership is False


def test_missing_cachetools_internals_fail_at_import_with_the_supported_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def gone(cache: Any) -> Any:
        raise AttributeError("'LRUCache' object has no attribute '_LRUCache__order'")

    monkeypatch.setattr(ct_adapters, "_lru_order", gone)
    with pytest.raises(UnsupportedCachetools, match=r">=5\.3,<9") as caught:
        ct_adapters._verify_internals()
    assert isinstance(caught.value, ImportError)
    assert cachetools.__version__ in str(caught.value)


def test_a_cache_that_keeps_sizes_differently_fails_at_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def stored_without_size(cache: Any, keys: Any, values: Any) -> None:
        ct_adapters._data(cache).update(zip(keys, values, strict=True))

    monkeypatch.setattr(ct_adapters, "_store_new", stored_without_size)
    with pytest.raises(UnsupportedCachetools, match="Cache size accounting"):
        ct_adapters._verify_internals()


# --- TTL: never outlive the original expiry ---


TTL_TYPES = [cachetools.TTLCache, LoggingTTLCache]


def ttl_entry(seconds_left: float, *, ttl: float = 60.0, sender_now: float = 1e6) -> Record:
    """The record of an entry with ``seconds_left`` to live, exported by a TTLCache."""
    clock = Clock(sender_now)
    cache: cachetools.TTLCache[str, str, float] = cachetools.TTLCache(8, ttl=ttl, timer=clock)
    cache["k"] = "v"
    clock.advance(ttl - seconds_left)
    (record,) = TTLCacheAdapter(cache).export()
    return record


@pytest.mark.parametrize("ttl_type", TTL_TYPES)
def test_ttl_entry_with_5s_left_is_gone_after_5s_on_a_longer_ttl_receiver(
    ttl_type: type[cachetools.TTLCache[Any, Any, Any]],
) -> None:
    record = ttl_entry(5.0)
    assert record == ("k", "v", 5.0)
    clock = Clock(7.0)
    receiver = ttl_type(8, ttl=300, timer=clock)
    assert TTLCacheAdapter(receiver).import_records([record]) == ImportResult(applied=1)
    clock.advance(4.9)
    assert receiver.get("k") == "v"
    clock.advance(0.1)
    assert "k" not in receiver
    assert receiver.get("k") is None
    assert len(receiver) == 0


@pytest.mark.parametrize("ttl_type", TTL_TYPES)
def test_ttl_receiver_with_a_shorter_ttl_keeps_its_own(
    ttl_type: type[cachetools.TTLCache[Any, Any, Any]],
) -> None:
    clock = Clock(-50.0)
    receiver = ttl_type(8, ttl=10, timer=clock)
    TTLCacheAdapter(receiver).import_records([ttl_entry(200.0, ttl=300)])
    clock.advance(9.99)
    assert receiver["k"] == "v"
    clock.advance(0.01)
    assert "k" not in receiver


@pytest.mark.parametrize("ttl_type", TTL_TYPES)
def test_ttl_age_is_subtracted(ttl_type: type[cachetools.TTLCache[Any, Any, Any]]) -> None:
    clock = Clock(3.0)
    receiver = ttl_type(8, ttl=300, timer=clock)
    TTLCacheAdapter(receiver).import_records([ttl_entry(20.0)], age=3.0)
    clock.advance(16.9)
    assert "k" in receiver
    clock.advance(0.1)
    assert "k" not in receiver


@pytest.mark.parametrize("ttl_type", TTL_TYPES)
@pytest.mark.parametrize("age", [20.0, 25.0])
def test_ttl_record_older_than_its_lifetime_is_dropped_as_expired(
    ttl_type: type[cachetools.TTLCache[Any, Any, Any]], age: float
) -> None:
    receiver = ttl_type(8, ttl=300, timer=Clock(0.0))
    result = TTLCacheAdapter(receiver).import_records([ttl_entry(20.0)], age=age)
    assert result == ImportResult(dropped={"expired": 1})
    assert len(receiver) == 0


def test_ttl_expired_entries_are_never_exported() -> None:
    clock = Clock(100.0)
    cache: cachetools.TTLCache[str, int, float] = cachetools.TTLCache(8, ttl=10, timer=clock)
    cache["old"] = 1
    clock.advance(5)
    cache["new"] = 2
    clock.advance(5)  # "old" expires now
    assert list(TTLCacheAdapter(cache).export()) == [("new", 2, 5.0)]


def test_ttl_time_left_is_read_when_each_record_is_yielded() -> None:
    clock = Clock(0.0)
    cache: cachetools.TTLCache[str, int, float] = cachetools.TTLCache(8, ttl=10, timer=clock)
    cache["a"], cache["b"], cache["c"] = 1, 2, 3
    records = TTLCacheAdapter(cache).export()
    assert next(records) == ("c", 3, 10.0)
    clock.advance(4)
    assert next(records) == ("b", 2, 6.0)
    clock.advance(6)  # "a" has expired before its turn
    assert list(records) == []


def test_ttl_time_left_is_a_float_even_with_an_integer_clock() -> None:
    ticks = [100]
    cache: cachetools.TTLCache[str, int, int] = cachetools.TTLCache(
        8, ttl=10, timer=lambda: ticks[0]
    )
    cache["a"] = 1
    ((_key, _value, meta),) = TTLCacheAdapter(cache).export()
    assert type(meta) is float
    assert meta == 10.0


@settings(max_examples=150, deadline=None)
@given(
    sender_now=st.floats(-1e9, 1e9),
    receiver_now=st.floats(-1e9, 1e9),
    sender_ttl=st.floats(0.5, 1e5),
    receiver_ttl=st.floats(0.5, 1e5),
    writes=st.lists(st.tuples(st.floats(0, 1e5), st.booleans()), min_size=1, max_size=30),
    own=st.lists(st.floats(0, 1e5), max_size=10),
    age=st.floats(0, 100),
    subclass=st.booleans(),
)
def test_ttl_handed_off_entries_never_outlive_either_expiry(
    sender_now: float,
    receiver_now: float,
    sender_ttl: float,
    receiver_ttl: float,
    writes: list[tuple[float, bool]],
    own: list[float],
    age: float,
    subclass: bool,
) -> None:
    """Each entry leaves by min(receiver ttl, time left - age), never later and at most
    1/256 of that early, and the receiver stays consistent: its length (expire() purges in
    expiry order) always matches what iterating it finds alive."""
    sender_clock = Clock(sender_now)
    sender: cachetools.TTLCache[Any, int, float] = cachetools.TTLCache(
        1000, ttl=sender_ttl, timer=sender_clock
    )
    for key, (delay, touch) in enumerate(writes):
        sender_clock.advance(delay / 100)
        sender[key] = key
        if touch:
            sender.get(key // 2)
    records = list(TTLCacheAdapter(sender).export())
    # Seconds after the import by which each key must be gone.
    deadlines = {key: min(receiver_ttl, left - age) for key, _value, left in records}

    start = receiver_now
    receiver_clock = Clock(start)
    receiver_type = LoggingTTLCache if subclass else cachetools.TTLCache
    receiver: cachetools.TTLCache[Any, Any, Any] = receiver_type(
        1000, ttl=receiver_ttl, timer=receiver_clock
    )
    for i, written_ago in sorted(enumerate(x % receiver_ttl for x in own), key=lambda e: -e[1]):
        receiver_clock.now = start - written_ago  # the receiver's own, older entries
        receiver[f"own-{i}"] = i
        deadlines[f"own-{i}"] = receiver_ttl - written_ago
    receiver_clock.now = start
    result = TTLCacheAdapter(receiver).import_records(records, age=age)
    assert result.total == len(records)
    assert result.applied == sum(1 for key in receiver if not str(key).startswith("own"))

    # Float rounding of absolute clock values on either side.
    noise = 8 * (math.ulp(abs(sender_now) + 3e5) + math.ulp(abs(start) + 3e5))
    times = sorted(
        {
            t
            for d in deadlines.values()
            for t in (start + d * (255 / 256) - noise, start + d + noise)
        }
    )
    for now in (t for t in times if t >= start):
        receiver_clock.now = now
        held = set(receiver)
        assert len(receiver) == len(held)
        for key, deadline in deadlines.items():
            if now >= start + deadline + noise:
                assert key not in held
            elif now <= start + deadline * (255 / 256) - noise:
                assert key in held


@settings(max_examples=300, deadline=None)
@given(
    # Few distinct lifetimes, so that entries share expiries and reuse remembered links.
    lifetimes=st.lists(st.sampled_from([0.5, 3.0, 7.25, 20.0, 49.0, 80.0]), max_size=16),
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("import"), st.integers(1, 4)),
            st.tuples(st.sampled_from(["delete", "rewrite", "own"]), st.integers(0, 15)),
            st.tuples(st.just("advance"), st.integers(0, 30)),
        ),
        max_size=30,
    ),
    subclass=st.booleans(),
)
def test_ttl_receiver_stays_consistent_when_it_changes_between_chunks(
    lifetimes: list[float], steps: list[tuple[str, int]], subclass: bool
) -> None:
    """Entries the adapter placed earlier may be deleted, rewritten or expire before the
    next chunk arrives; later placements must still keep the cache's expiry order."""
    clock = Clock(1000.0)
    receiver_type = LoggingTTLCache if subclass else cachetools.TTLCache
    receiver: cachetools.TTLCache[Any, Any, Any] = receiver_type(100, ttl=50, timer=clock)
    adapter = TTLCacheAdapter(receiver)
    pending: list[Record] = [(i, i, lifetime) for i, lifetime in enumerate(lifetimes)]
    gone_by: dict[Any, float] = {}  # key -> when it must be gone
    alive_until: dict[Any, float] = {}  # key -> until when it must still be there
    for operation, number in steps:
        if operation == "import":
            chunk, pending = pending[:number], pending[number:]
            assert adapter.import_records(chunk).applied == len(chunk)
            for key, _value, lifetime in chunk:
                gone_by[key] = clock.now + min(50.0, lifetime)
                alive_until[key] = clock.now + min(50.0, lifetime * 255 / 256)
        elif operation == "advance":
            clock.advance(number)
        elif operation == "own":
            receiver[f"own-{number}"] = number
            gone_by[f"own-{number}"] = alive_until[f"own-{number}"] = clock.now + 50.0
        elif number in receiver:
            if operation == "delete":
                del receiver[number]
                del gone_by[number], alive_until[number]
            else:
                receiver[number] = -number
                gone_by[number] = alive_until[number] = clock.now + 50.0
        held = set(receiver)
        assert len(receiver) == len(held)
        assert all(clock.now < gone_by[key] for key in held)
        assert {key for key, until in alive_until.items() if clock.now < until} <= held


@pytest.mark.parametrize("ttl_type", TTL_TYPES)
@pytest.mark.parametrize("change", ["rewrite", "delete"])
def test_ttl_placement_survives_changes_to_entries_placed_before(
    ttl_type: type[cachetools.TTLCache[Any, Any, Any]], change: str
) -> None:
    clock = Clock(0.0)
    receiver = ttl_type(10, ttl=50, timer=clock)
    adapter = TTLCacheAdapter(receiver)
    adapter.import_records([("a", 1, 10.0), ("b", 2, 10.0)])
    if change == "rewrite":
        receiver["b"] = "mine"  # now expires at 50
    else:
        del receiver["b"]
    adapter.import_records([("c", 3, 10.0), ("d", 4, 10.0)])
    assert len(receiver) == len(set(receiver)) == (4 if change == "rewrite" else 3)
    clock.advance(10)
    assert set(receiver) == ({"b"} if change == "rewrite" else set())
    assert len(receiver) == len(set(receiver))


@pytest.mark.parametrize("ttl_type", TTL_TYPES)
def test_ttl_evictions_after_import_follow_the_senders_recency(
    ttl_type: type[cachetools.TTLCache[Any, Any, Any]],
) -> None:
    sender: cachetools.TTLCache[int, int, float] = cachetools.TTLCache(
        20, ttl=100, timer=Clock(0.0)
    )
    for key in range(20):
        sender[key] = key
    for key in (3, 17, 0, 11, 5):
        sender[key]
    reference = clone(sender)
    receiver = ttl_type(20, ttl=100, timer=Clock(9.0))
    handoff(TTLCacheAdapter(sender), TTLCacheAdapter(receiver))
    assert pop_all(receiver) == pop_all(reference)


def test_ttl_merge_never_extends_beyond_either_expiry() -> None:
    clock = Clock(0.0)
    receiver: cachetools.TTLCache[str, Any, float] = cachetools.TTLCache(8, ttl=300, timer=clock)
    receiver["k"] = "mine"  # expires at 300
    clock.advance(290)  # 10 s left here; the incoming copy has 5 s left
    adapter = TTLCacheAdapter(receiver, merge=lambda old, new: [old, new])
    assert adapter.import_records([ttl_entry(5.0)]) == ImportResult(applied=1)
    assert receiver["k"] == ["mine", "v"]
    clock.advance(9.9)
    assert "k" in receiver
    clock.advance(0.1)
    assert "k" not in receiver


@pytest.mark.parametrize("ttl_type", TTL_TYPES)
def test_ttl_merging_the_entry_placed_last_keeps_the_cache_consistent(
    ttl_type: type[cachetools.TTLCache[Any, Any, Any]],
) -> None:
    # A retried chunk: the merged entry goes back to the expiry it was placed at, where it
    # was the last one placed (it once became its own neighbour, looping expire() forever).
    clock = Clock(1000.0)
    receiver = ttl_type(5, ttl=50, timer=clock)
    adapter = TTLCacheAdapter(receiver, merge=lambda old, new: new + old)
    receiver["own"] = 0
    records: list[Record] = [("a", 1, 20.0), ("b", 1, 20.0)]
    for chunk in (records, records[::-1], records[1:]):
        adapter.import_records(chunk, age=3.0)
        ttl_state(receiver)
    assert dict(receiver) == {"own": 0, "a": 2, "b": 3}
    clock.advance(17)
    assert dict(receiver) == {"own": 0}
    assert len(receiver) == 1


class PerRecordTTLCacheAdapter(TTLCacheAdapter):
    """The TTL adapter without its bulk insert: every record through insert()."""

    def _insert_new(self, records: Sequence[Record], age: float) -> tuple[int, Sequence[Record]]:
        return 0, records


def ttl_state(cache: cachetools.TTLCache[Any, Any, Any]) -> Any:
    """Everything a TTLCache's behaviour depends on: entries, recency, expiry order."""
    root = ct_adapters._ttl_root(cache)
    by_expiry = []
    link = root.next
    while link is not root:
        assert link.next.prev is link
        by_expiry.append((link.key, link.expires))
        link = link.next
    recency = [(key, link.expires) for key, link in ct_adapters._ttl_links(cache).items()]
    assert sorted(by_expiry, key=repr) == sorted(recency, key=repr)
    assert [expires for _key, expires in by_expiry] == sorted(e for _k, e in by_expiry)
    return dict(ct_adapters._data(cache)), recency, by_expiry, cache.currsize


ttl_keys = st.integers(0, 40) | st.sampled_from(["a", "b", (1, "x"), (2, None), b"k", 2.5])
ttl_metas = st.sampled_from(
    [0.5, 3.0, 7.25, 20.0, 49.0, 50.0, 80.0, 1e-300, math.inf, math.nan, -1.0, 0.0, 1e6]
)
ttl_chunks = st.one_of(
    # Mostly chunks of lifetimes, some sharing one, some with one kind of other meta.
    st.lists(st.tuples(ttl_keys, st.integers(), ttl_metas), max_size=12),
    st.lists(st.tuples(ttl_keys, st.integers(), st.just(30.0)), max_size=12),
    st.lists(st.tuples(ttl_keys, st.integers(), st.sampled_from([None, 3, True])), max_size=6),
    st.lists(st.tuples(ttl_keys | st.just(("x", (1,))), st.integers(), ttl_metas), max_size=4),
)


@settings(max_examples=400, deadline=None)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("import"), ttl_chunks, st.sampled_from([0.0, 0.25, 3.0])),
            st.tuples(st.sampled_from(["delete", "own", "advance"]), ttl_keys, st.just(0.0)),
        ),
        max_size=12,
    ),
    maxsize=st.sampled_from([5, 20, 100]),
    merging=st.booleans(),
)
def test_ttl_bulk_insert_does_exactly_what_inserting_one_by_one_does(
    steps: list[tuple[str, Any, float]], maxsize: int, merging: bool
) -> None:
    """Whatever the records and the receiver's state, importing a chunk at once leaves the
    cache (entries, sizes, recency, expiries and their order) and the result as inserting
    record by record does, and so do later imports."""
    merge = (lambda old, new: (old, new)) if merging else None
    sides = []
    for adapter_type in (TTLCacheAdapter, PerRecordTTLCacheAdapter):
        clock = Clock(1000.0)
        cache: cachetools.TTLCache[Any, Any, Any] = cachetools.TTLCache(
            maxsize, ttl=50, timer=clock
        )
        sides.append((clock, cache, adapter_type(cache, merge=merge)))
    for operation, argument, age in steps:
        outcomes = []
        for clock, cache, adapter in sides:
            if operation == "import":
                outcomes.append(adapter.import_records(argument, age=age))
            elif operation == "advance":
                clock.advance(argument if isinstance(argument, int) else 7)
            elif operation == "own" and (argument in cache or len(cache) < maxsize):
                cache[argument] = "mine"
            elif operation == "delete":
                cache.pop(argument, None)
            outcomes.append(ttl_state(cache))
        bulk, one_by_one = outcomes[: len(outcomes) // 2], outcomes[len(outcomes) // 2 :]
        assert repr(bulk) == repr(one_by_one)  # repr: NaN keys are not equal to themselves
    (_, bulk_cache, _), (_, reference, _) = sides
    assert pop_items(bulk_cache) == pop_items(reference)


def test_ttl_import_into_a_stock_cache_inserts_in_bulk(monkeypatch: pytest.MonkeyPatch) -> None:
    inserted_one_by_one = []
    setitem = cachetools.Cache.__setitem__

    def counting(self: Any, key: Any, value: Any) -> None:
        inserted_one_by_one.append(key)
        setitem(self, key, value)

    monkeypatch.setattr(cachetools.Cache, "__setitem__", counting)
    clock = Clock(0.0)
    receiver: cachetools.TTLCache[Any, Any, Any] = cachetools.TTLCache(5000, ttl=60, timer=clock)
    receiver["mine"] = receiver[3] = "own"
    adapter = TTLCacheAdapter(receiver)
    records: list[Record] = [(i, f"v{i}", 30.0 - i / 1000) for i in range(3000)]
    assert adapter.import_records(records) == ImportResult(applied=2999, kept_existing=1)
    assert inserted_one_by_one == []
    assert len(receiver) == receiver.currsize == 3001
    assert receiver[3] == "own"
    assert pop_all(clone(receiver))[:3] == [2999, 2998, 2997]  # the coldest first, as sent
    clock.advance(26.99)  # 2999 had 27.001 s left: rounded down to 27.0
    assert 2999 in receiver
    clock.advance(0.01)
    assert 2999 not in receiver
    assert 2000 in receiver
    assert len(receiver) == len(list(receiver))
    # A merge function makes held keys take their turn: the chunk goes one by one.
    adapter = TTLCacheAdapter(receiver, merge=lambda old, new: new)
    assert adapter.import_records([(5000, 1, 9.0), (3, "new", 9.0)]) == ImportResult(applied=2)
    assert inserted_one_by_one == [5000]
    assert receiver[3] == "new"


# --- TLRU ---


def tlru(clock: Clock, seconds: float, maxsize: int = 8) -> cachetools.TLRUCache[Any, Any, float]:
    return cachetools.TLRUCache(maxsize, ttu=lambda _key, _value, now: now + seconds, timer=clock)


def test_tlru_entry_is_gone_at_its_original_expiry() -> None:
    sender_clock = Clock(500.0)
    sender = tlru(sender_clock, 60)
    sender["k"] = "v"
    sender_clock.advance(52)
    records = list(TLRUCacheAdapter(sender).export())
    assert records == [("k", "v", 8.0)]

    clock = Clock(-3.0)
    receiver = tlru(clock, 300)
    assert TLRUCacheAdapter(receiver).import_records(records, age=1) == ImportResult(applied=1)
    clock.advance(6.99)
    assert receiver["k"] == "v"
    clock.advance(0.01)
    assert "k" not in receiver
    assert len(receiver) == 0


def test_tlru_receiver_ttu_shorter_than_the_time_left_wins() -> None:
    clock = Clock(0.0)
    receiver = tlru(clock, 2)
    TLRUCacheAdapter(receiver).import_records([("k", "v", 50.0)])
    clock.advance(1.99)
    assert "k" in receiver
    clock.advance(0.01)
    assert "k" not in receiver


def test_tlru_receiver_ttu_that_refuses_the_entry_drops_it_as_expired() -> None:
    receiver = tlru(Clock(0.0), 0)
    result = TLRUCacheAdapter(receiver).import_records([("k", "v", 50.0)])
    assert result == ImportResult(dropped={"expired": 1})


def test_tlru_evictions_after_import_follow_the_senders_recency() -> None:
    sender = tlru(Clock(0.0), 100, maxsize=12)
    for key in range(12):
        sender[key] = key
    for key in (4, 0, 9):
        sender[key]
    reference = clone(sender)
    receiver = tlru(Clock(70.0), 100, maxsize=12)
    handoff(TLRUCacheAdapter(sender), TLRUCacheAdapter(receiver))
    assert pop_all(receiver) == pop_all(reference)


# --- order and counts survive ---


def lru_with_history() -> cachetools.LRUCache[int, str]:
    cache: cachetools.LRUCache[int, str] = cachetools.LRUCache(16)
    for key in range(16):
        cache[key] = f"v{key}"
    for key in (5, 1, 14, 5, 0, 9):
        cache[key]
    return cache


def test_lru_eviction_order_is_preserved() -> None:
    sender = lru_with_history()
    reference = clone(sender)
    receiver: cachetools.LRUCache[int, str] = cachetools.LRUCache(16)
    handoff(LRUCacheAdapter(sender), LRUCacheAdapter(receiver))
    assert pop_all(receiver) == pop_all(reference)


@settings(max_examples=200, deadline=None)
@given(
    operations=st.lists(
        st.tuples(st.sampled_from(["set", "get", "del"]), st.integers(0, 15)), max_size=80
    ),
    chunk=st.integers(1, 10),
)
def test_lru_handoff_reproduces_keys_and_eviction_order(
    operations: list[tuple[str, int]], chunk: int
) -> None:
    sender: cachetools.LRUCache[int, int] = cachetools.LRUCache(8)
    for step, (operation, key) in enumerate(operations):
        if operation == "set":
            sender[key] = step
        elif operation == "get":
            sender.get(key)
        else:
            sender.pop(key, None)
    reference = clone(sender)
    receiver: cachetools.LRUCache[int, int] = cachetools.LRUCache(8)
    handoff(LRUCacheAdapter(sender), LRUCacheAdapter(receiver), chunk=chunk)
    assert pop_items(receiver) == pop_items(reference)


def lfu_with_history() -> cachetools.LFUCache[str, int]:
    cache: cachetools.LFUCache[str, int] = cachetools.LFUCache(10)
    for i, uses in enumerate([3, 0, 5, 1, 1, 0, 7, 3, 2, 0]):
        cache[f"k{i}"] = i
        for _ in range(uses):
            cache[f"k{i}"]
    return cache


def lfu_counts(cache: cachetools.LFUCache[Any, Any]) -> dict[Any, int]:
    return {key: meta for key, _value, meta in LFUCacheAdapter(cache).export()}


def test_lfu_counts_are_exported_as_meta() -> None:
    records = list(LFUCacheAdapter(lfu_with_history()).export())
    assert [meta for _key, _value, meta in records] == [8, 6, 4, 4, 3, 2, 2, 1, 1, 1]
    assert records[0] == ("k6", 6, 8)


needs_ordered_lfu_ties = pytest.mark.skipif(
    not LFU_TIES_PRESERVED, reason="this cachetools does not order equally used LFU entries"
)


@needs_ordered_lfu_ties
def test_lfu_counts_and_eviction_choices_are_preserved() -> None:
    sender = lfu_with_history()
    reference = clone(sender)
    receiver: cachetools.LFUCache[str, int] = cachetools.LFUCache(10)
    handoff(LFUCacheAdapter(sender), LFUCacheAdapter(receiver), chunk=3)
    assert list(LFUCacheAdapter(receiver).export()) == list(LFUCacheAdapter(sender).export())
    # A new entry evicts what the sender would have evicted, and so on down.
    receiver["new"] = -1
    reference["new"] = -1
    assert pop_all(receiver) == pop_all(reference)


@needs_ordered_lfu_ties
@settings(max_examples=100, deadline=None)
@given(
    operations=st.lists(
        st.tuples(st.sampled_from(["set", "get", "get", "del"]), st.integers(0, 11)),
        max_size=80,
    ),
    chunk=st.integers(1, 10),
)
def test_lfu_handoff_reproduces_eviction_order(
    operations: list[tuple[str, int]], chunk: int
) -> None:
    sender: cachetools.LFUCache[int, int] = cachetools.LFUCache(8)
    for step, (operation, key) in enumerate(operations):
        if operation == "set":
            sender[key] = step
        elif operation == "get":
            sender.get(key)
        else:
            sender.pop(key, None)
    reference = clone(sender)
    receiver: cachetools.LFUCache[int, int] = cachetools.LFUCache(8)
    handoff(LFUCacheAdapter(sender), LFUCacheAdapter(receiver), chunk=chunk)
    assert pop_all(receiver) == pop_all(reference)


@settings(max_examples=100, deadline=None)
@given(
    uses=st.dictionaries(st.integers(0, 50), st.integers(0, 6), max_size=20),
    chunk=st.integers(1, 10),
)
def test_lfu_handoff_reproduces_use_counts(uses: dict[int, int], chunk: int) -> None:
    sender: cachetools.LFUCache[int, int] = cachetools.LFUCache(32)
    for key, count in uses.items():
        sender[key] = key
        for _ in range(count):
            sender[key]
    receiver: cachetools.LFUCache[int, int] = cachetools.LFUCache(32)
    handoff(LFUCacheAdapter(sender), LFUCacheAdapter(receiver), chunk=chunk)
    assert lfu_counts(receiver) == {key: count + 1 for key, count in uses.items()}


def test_lfu_merge_keeps_the_higher_count() -> None:
    receiver: cachetools.LFUCache[str, Any] = cachetools.LFUCache(4)
    receiver["k"], receiver["other"] = "mine", 0
    receiver["other"]
    receiver["other"]  # count 3, beats "k" at 1 (2 after the merge) unless "k" gets 5
    adapter = LFUCacheAdapter(receiver, merge=lambda old, new: [old, new])
    assert adapter.import_records([("k", "v", 5)]) == ImportResult(applied=1)
    assert [(key, meta) for key, _v, meta in adapter.export()] == [("k", 5), ("other", 3)]


def test_fifo_order_is_preserved() -> None:
    sender: cachetools.FIFOCache[int, int] = cachetools.FIFOCache(10)
    for key in (4, 2, 8, 0, 6, 1):
        sender[key] = key
    sender[8] = 80  # an overwrite counts as a new insertion in a FIFOCache
    reference = clone(sender)
    records = list(FIFOCacheAdapter(sender).export())
    assert [key for key, _v, _m in records] == [8, 1, 6, 0, 2, 4]
    receiver: cachetools.FIFOCache[int, int] = cachetools.FIFOCache(10)
    handoff(FIFOCacheAdapter(sender), FIFOCacheAdapter(receiver), chunk=2)
    assert pop_all(receiver) == pop_all(reference)


def test_plain_cache_exports_in_iteration_order() -> None:
    cache: cachetools.Cache[str, int] = cachetools.Cache(5)
    cache["b"], cache["a"], cache["c"] = 1, 2, 3
    assert [key for key, _v, meta in CacheAdapter(cache).export()] == ["b", "a", "c"]


# --- small receivers keep the hottest; the receiver's own entries stay ---


def test_a_smaller_receiver_keeps_the_hottest() -> None:
    sender = lru_with_history()
    hottest = [key for key, _v, _m in LRUCacheAdapter(sender).export()][:5]
    receiver: cachetools.LRUCache[int, str] = cachetools.LRUCache(5)
    result = handoff(LRUCacheAdapter(sender), LRUCacheAdapter(receiver))
    assert result == ImportResult(applied=5, dropped={"receiver full": 11})
    assert pop_all(receiver) == hottest[::-1]


def test_sizes_decide_what_fits_and_oversized_values_are_dropped() -> None:
    receiver: cachetools.LRUCache[str, str] = cachetools.LRUCache(10, getsizeof=len)
    records: list[Record] = [
        ("a", "xxxx", None),  # 4
        ("huge", "x" * 11, None),  # larger than the whole cache
        ("b", "xxxxx", None),  # 9
        ("c", "xx", None),  # 11: does not fit
        ("d", "x", None),  # 10
    ]
    result = LRUCacheAdapter(receiver).import_records(records)
    assert result == ImportResult(applied=3, dropped={"too large": 1, "receiver full": 1})
    assert receiver.currsize == 10
    assert pop_all(receiver) == ["d", "b", "a"]


def test_the_receivers_own_entries_stay_hotter_and_are_never_evicted() -> None:
    receiver: cachetools.LRUCache[Any, str] = cachetools.LRUCache(10)
    for key in ("own-1", "own-2", "own-3"):
        receiver[key] = "mine"
    sender = lru_with_history()
    cold_to_hot = pop_all(clone(sender))
    result = handoff(LRUCacheAdapter(sender), LRUCacheAdapter(receiver), chunk=4)
    assert result == ImportResult(applied=7, dropped={"receiver full": 9})
    assert pop_all(receiver) == [*cold_to_hot[-7:], "own-1", "own-2", "own-3"]


@pytest.mark.parametrize("ttl_type", TTL_TYPES)
def test_ttl_receivers_own_entries_stay_hotter(
    ttl_type: type[cachetools.TTLCache[Any, Any, Any]],
) -> None:
    clock = Clock(0.0)
    receiver = ttl_type(6, ttl=100, timer=clock)
    receiver["own"] = "mine"
    records: list[Record] = [(f"k{i}", i, 50.0 - i) for i in range(8)]
    result = TTLCacheAdapter(receiver).import_records(records)
    assert result == ImportResult(applied=5, dropped={"receiver full": 3})
    assert pop_all(receiver) == ["k4", "k3", "k2", "k1", "k0", "own"]


# --- reading never counts as a use ---


def test_export_leaves_the_sources_recency_and_counts_alone() -> None:
    clock = Clock(0.0)
    ttl: cachetools.TTLCache[int, int, float] = cachetools.TTLCache(10, ttl=100, timer=clock)
    timed = tlru(clock, 100, maxsize=10)
    caches: list[tuple[Callable[..., Adapter], cachetools.Cache[Any, Any]]] = [
        (LRUCacheAdapter, lru_with_history()),
        (LFUCacheAdapter, lfu_with_history()),
        (FIFOCacheAdapter, cachetools.FIFOCache(10)),
        (TTLCacheAdapter, ttl),
        (TLRUCacheAdapter, timed),
    ]
    for key in range(10):
        ttl[key] = timed[key] = caches[2][1][key] = key
    for key in (2, 7, 0):
        ttl[key]
        timed[key]
    for adapter_type, cache in caches:
        reference = clone(cache)
        assert len(list(adapter_type(cache).export())) == len(reference) > 0
        if isinstance(cache, cachetools.LFUCache) and not LFU_TIES_PRESERVED:
            # That cachetools pops equally used entries in set order: compare the counts.
            assert lfu_counts(cache) == lfu_counts(reference)
        else:
            assert pop_all(cache) == pop_all(reference), adapter_type


# --- records across cache types ---


def test_an_lru_release_can_hand_off_to_a_ttl_release() -> None:
    sender = lru_with_history()
    reference = clone(sender)
    clock = Clock(0.0)
    receiver: cachetools.TTLCache[int, str, float] = cachetools.TTLCache(16, ttl=30, timer=clock)
    assert handoff(LRUCacheAdapter(sender), TTLCacheAdapter(receiver)).applied == 16
    clock.advance(29.9)
    assert pop_all(clone(receiver)) == pop_all(reference)
    clock.advance(0.1)
    assert len(receiver) == 0


def test_lfu_counts_mean_nothing_to_a_ttl_cache() -> None:
    clock = Clock(0.0)
    receiver: cachetools.TTLCache[str, int, float] = cachetools.TTLCache(4, ttl=30, timer=clock)
    assert TTLCacheAdapter(receiver).import_records([("k", 1, 7)]) == ImportResult(applied=1)
    clock.advance(29.9)
    assert "k" in receiver  # the receiver's own ttl, not 7 seconds
    clock.advance(0.1)
    assert "k" not in receiver


@pytest.mark.parametrize(
    "receiver",
    [cachetools.LRUCache(4), cachetools.LFUCache(4), cachetools.FIFOCache(4), cachetools.Cache(4)],
)
def test_a_cache_that_cannot_expire_drops_expiring_records(
    receiver: cachetools.Cache[Any, Any],
) -> None:
    adapter = ct_adapters.CACHETOOLS_ADAPTERS
    factory = next(f for f in adapter if type(receiver) in f.types)
    records: list[Record] = [("a", 1, 30.0), ("b", 2, math.inf), ("c", 3, None), ("d", 4, 0.5)]
    result = factory(receiver).import_records(records, age=1.0)
    assert result == ImportResult(applied=2, dropped={"expiry unsupported": 1, "expired": 1})
    assert sorted(receiver) == ["b", "c"]


def test_odd_meta_from_a_peer_is_ignored() -> None:
    receiver: cachetools.LFUCache[str, int] = cachetools.LFUCache(4)
    records: list[Record] = [("a", 1, True), ("b", 2, "many"), ("c", 3, -4)]
    assert LFUCacheAdapter(receiver).import_records(records) == ImportResult(applied=3)
    assert {meta for _k, _v, meta in LFUCacheAdapter(receiver).export()} == {1}


def test_errors_are_logged_once_per_batch(caplog: pytest.LogCaptureFixture) -> None:
    receiver: cachetools.LRUCache[Any, int] = cachetools.LRUCache(4)
    records: list[Record] = [([1], 1, None), ({2: 2}, 2, None), ("ok", 3, None)]
    with caplog.at_level(logging.WARNING, logger="handoff.adapters"):
        result = LRUCacheAdapter(receiver).import_records(records)
    assert result == ImportResult(applied=1, dropped={"error": 2})
    assert len(caplog.records) == 1


# --- on the oldest and the newest supported cachetools ---


@pytest.fixture(scope="module", params=FLAVOURS)
def release(request: pytest.FixtureRequest) -> Flavour:
    """The installed cachetools, then the oldest supported (see tests/_cachetools_versions)."""
    return flavour(request.param)


def test_the_oldest_release_is_loaded_beside_the_installed_one() -> None:
    oldest = flavour(OLDEST)
    assert oldest.cachetools.__version__ == OLDEST
    assert oldest.adapters.cachetools is oldest.cachetools
    assert not oldest.adapters.LFU_TIES_PRESERVED  # its own checks ran: it has the old layout
    assert sys.modules["cachetools"] is cachetools is not oldest.cachetools


CACHE_TYPES = ("Cache", "RRCache", "LRUCache", "FIFOCache", "LFUCache", "TTLCache", "TLRUCache")


def sized_cache(release: Flavour, cache_type: str, maxsize: int, clock: Clock) -> Any:
    """A cache of ``cache_type`` whose values are their own sizes; entries live 100 s."""
    ct = release.cachetools
    if cache_type == "TTLCache":
        return ct.TTLCache(maxsize, ttl=100, timer=clock, getsizeof=int)
    if cache_type == "TLRUCache":
        return ct.TLRUCache(maxsize, lambda _k, _v, now: now + 100, timer=clock, getsizeof=int)
    if cache_type == "RRCache":  # evictions in a known order: the test does not pass by chance
        return ct.RRCache(maxsize, choice=max, getsizeof=int)
    return getattr(ct, cache_type)(maxsize, getsizeof=int)


def adapter_of(release: Flavour, cache: Any, *, merge: Merge | None = None) -> Any:
    return getattr(release.adapters, type(cache).__name__.replace("Cache", "") + "CacheAdapter")(
        cache, merge=merge
    )


@pytest.mark.parametrize("cache_type", CACHE_TYPES)
def test_a_merge_that_grows_a_value_within_room_evicts_nothing(
    release: Flavour, cache_type: str
) -> None:
    # cachetools before 7.1.7 made room for the whole new size when a key was overwritten,
    # not for its growth (cachetools #405): own entries and imported ones were evicted.
    receiver = sized_cache(release, cache_type, 10, Clock(1000.0))
    receiver["own"], receiver["b"] = 2, 3
    adapter = adapter_of(release, receiver, merge=lambda old, new: old + new)
    result = adapter.import_records([("new", 1, None), ("b", 4, None)])
    assert result == ImportResult(applied=2)
    assert receiver.currsize == 10
    assert receiver.maxsize == 10
    assert dict(receiver) == {"own": 2, "b": 7, "new": 1}
    receiver["more"] = 1  # the cache is full again: its own writes evict as before
    assert len(receiver) < 4
    assert receiver.currsize <= 10


@pytest.mark.parametrize("cache_type", CACHE_TYPES)
def test_a_merge_that_outgrows_the_room_left_changes_nothing(
    release: Flavour, cache_type: str
) -> None:
    receiver = sized_cache(release, cache_type, 10, Clock(1000.0))
    receiver["own"], receiver["b"] = 2, 3
    adapter = adapter_of(release, receiver, merge=lambda old, new: old + new)
    result = adapter.import_records([("b", 6, None)])
    assert result == ImportResult(dropped={"receiver full": 1})
    assert receiver.currsize == 5
    assert dict(receiver) == {"own": 2, "b": 3}


@pytest.mark.parametrize("cache_type", ["TTLCache", "TLRUCache"])
def test_a_lifetime_lost_to_the_clocks_resolution_is_expired(
    release: Flavour, cache_type: str
) -> None:
    # 1.5000000000000004 - 1.5 is 4.4e-16 s, less than half the spacing of floats near
    # 3.5e9 (4.8e-7): now + lifetime == now, an entry that expires as it is stored.
    clock = Clock(3.5e9)
    receiver = sized_cache(release, cache_type, 1, clock)
    records: list[Record] = [("a", 1, 1.5000000000000004), ("b", 1, 60.0)]
    result = adapter_of(release, receiver).import_records(records, age=1.5)
    assert result == ImportResult(applied=1, dropped={"expired": 1})
    assert receiver.currsize == 1
    receiver.expire()
    assert dict(receiver) == {"b": 1}


def test_a_tlru_merge_whose_value_the_receivers_ttu_refuses_is_not_applied(
    release: Flavour,
) -> None:
    # cachetools before 7.1.5 skips such a write and keeps the entry it had; later ones
    # remove the entry. Either way the merged value is not stored.
    clock = Clock(1000.0)
    receiver = release.cachetools.TLRUCache(
        10, lambda _k, value, now: now if value % 5 == 0 else now + 100, timer=clock
    )
    receiver["a"] = 2
    written = clone(receiver)
    written["a"] = 5  # what the receiver's own write of the merged value does
    adapter = adapter_of(release, receiver, merge=lambda old, new: old + new)
    assert adapter.import_records([("a", 3, None)]) == ImportResult(dropped={"expired": 1})
    assert dict(receiver) == dict(written)
    assert receiver.currsize == written.currsize


# --- mappings ---


def test_mapping_export_reads_each_value_only_when_it_is_yielded() -> None:
    mapping = CountingMapping()
    mapping.update({i: i for i in range(100)})
    records = MappingAdapter(mapping).export()
    assert next(records) == (0, 0, None)
    assert mapping.reads <= 2  # `in` and `[]` of one key, not the whole mapping
    assert len(list(records)) == 99


def test_dict_export_never_creates_entries() -> None:
    from collections import defaultdict

    mapping: defaultdict[str, list[int]] = defaultdict(list, {"a": [1], "b": [2]})
    records = MappingAdapter(mapping).export()
    next(records)
    del mapping["b"]
    assert list(records) == []
    assert dict(mapping) == {"a": [1]}
