"""Pre-copy's building blocks in the cachetools adapters: change tracking on the sender
(``mark`` / ``changed_since``) and the delta applied on top of a pre-copy on the receiver
(``import_delta``). The sender's final state must come out on the receiver exactly: values,
remaining lifetimes, recency order, deletions and evictions."""

from __future__ import annotations

import math
import pickle
from typing import Any

import anyio
import cachetools
import pytest

import handoff
from handoff._adapter import DELETED, PAUSE, ImportResult, SupportsChangeTracking
from handoff._registry import adapter_for
from handoff.adapters.cachetools import (
    CHANGES_FLOOR,
    LFU_TIES_PRESERVED,
    MAX_IMPORTED_COUNT,
    CacheAdapter,
)
from handoff.cli import _status_lines
from handoff.config import resolve_settings
from handoff.engine import Drainer, Tracked
from handoff.engine._precopy import (
    DELTA,
    PRECOPY,
    RESET,
    TOMBSTONE,
    Precopy,
    PrecopyState,
    apply_delta,
    delta_order,
)
from handoff.protocol import Ack, Chunk, Offer
from tests._helpers import handoff_node, wait_until
from tests.test_engine_unit import CLUSTER, FakeNode, network, small_chunks
from tests.test_engine_unit import track as engine_track

__all__ = ("small_chunks",)  # the fixture, used here by name


class Timer:
    """A cache timer the test moves (both caches read the same one)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(kind: str, timer: Timer, maxsize: int = 100) -> cachetools.Cache[str, Any]:
    if kind == "ttl":
        return cachetools.TTLCache(maxsize=maxsize, ttl=300, timer=timer)
    if kind == "tlru":
        return cachetools.TLRUCache(maxsize=maxsize, ttu=lambda k, v, now: now + 300, timer=timer)
    plain: dict[str, type[cachetools.Cache[str, Any]]] = {
        "cache": cachetools.Cache,
        "lru": cachetools.LRUCache,
        "fifo": cachetools.FIFOCache,
        "lfu": cachetools.LFUCache,
        "rr": cachetools.RRCache,
    }
    return plain[kind](maxsize=maxsize)


def adapter(cache: cachetools.Cache[str, Any]) -> CacheAdapter[Any]:
    chosen = adapter_for(cache)
    assert isinstance(chosen, CacheAdapter)
    return chosen


KINDS = ["cache", "lru", "fifo", "lfu", "rr", "ttl", "tlru"]
ORDERED = ["lru", "fifo", "ttl", "tlru"]  # the receiver's order is the sender's


@pytest.mark.parametrize("kind", KINDS)
def test_changed_since_names_what_was_written_or_deleted_after_the_mark(kind: str) -> None:
    timer = Timer()
    cache = make(kind, timer, maxsize=50)
    for i in range(50):
        cache[f"k{i}"] = i
    source = adapter(cache)
    assert isinstance(source, SupportsChangeTracking)
    mark = source.mark()
    assert list(source.changed_since(mark)) == []
    cache["k3"] = "updated"
    cache["new"] = "written"  # full: evicts one entry, which counts as deleted
    assert len(cache) == 50
    evicted = {f"k{i}" for i in range(50)} - set(cache)
    assert len(evicted) == 1
    del cache["k4" if "k4" not in evicted else "k5"]
    deleted = {f"k{i}" for i in range(50)} - set(cache)
    assert len(deleted) == 2
    changed = list(source.changed_since(mark))
    # An RRCache evicts at random: the eviction may take k3 itself (then only a deletion).
    written = {"k3", "new"} - evicted
    # Written keys as the export yields them (its order, its metadata), then deletions.
    assert changed[: len(written)] == [r for r in source.export() if r[0] in written]
    assert sorted(changed[len(written) :]) == sorted((key, DELETED, None) for key in deleted)


def test_a_key_changed_before_a_mark_and_again_after_it_is_in_the_changes_since() -> None:
    """The record is read from its newest end down to the mark (the live stream asks
    often): a key changed again after the mark counts, one changed only before does not."""
    timer = Timer()
    cache = make("lru", timer)
    source = adapter(cache)
    first = source.mark()
    for key in "abcd":
        cache[key] = key
    second = source.mark()
    cache["b"] = "b2"
    del cache["c"]
    _ = cache["a"]
    assert list(source.changed_since(second)) == [
        ("a", "a", None), ("b", "b2", None), ("c", DELETED, None)
    ]  # fmt: skip
    assert [k for k, _, _ in source.changed_since(first)] == ["a", "b", "d", "c"]


def test_a_live_batch_not_acknowledged_is_part_of_the_next() -> None:
    """The live stream's mark moves only once the peer acknowledged a batch whole: what a
    batch cut short carried is sent again, with what changed since."""
    timer = Timer()
    cache = make("ttl", timer)
    cache.update({f"k{i}": i for i in range(10)})
    precopy = Precopy({"users": engine_track("users", cache)})
    list(precopy.copy_sources()["users"]())
    assert precopy.live_batch() == {}  # not complete: the drain sends everything
    precopy.complete = frozenset({"users"})
    assert precopy.live_batch() == {}  # nothing changed
    cache["k1"] = "one"
    del cache["k2"]
    [(records, mark)] = precopy.live_batch().values()
    assert records == [("k2", None, TOMBSTONE), ("k1", "one", 300.0)]
    cache["k3"] = "three"  # the batch above was not acknowledged: it comes again
    [(records, mark)] = precopy.live_batch().values()
    assert [k for k, _, _ in records] == ["k2", "k1", "k3"]
    precopy.acknowledged("users", mark, len(records))
    assert precopy.live_batch() == {}
    assert precopy.streamed == 3
    cache["k4"] = "four"
    [(records, mark)] = precopy.live_batch().values()
    assert [k for k, _, _ in records] == ["k4"]
    # The drain's delta starts at the last acknowledged batch too.
    assert [k for k, _, _ in precopy.delta_sources()["users"]()] == ["k4"]


def test_the_record_of_changes_keeps_what_a_live_stream_has_not_had_acknowledged() -> None:
    """Bounded by the live streams' lag, not by the time since the copy: once every
    pre-copy's mark is past a change, the record forgets it."""
    timer = Timer()
    cache = make("ttl", timer)
    cache.update({f"k{i}": i for i in range(10)})
    tracked = {"users": engine_track("users", cache)}
    first, second = Precopy(tracked), Precopy(tracked)
    state = PrecopyState(begun={"a": first, "b": second})
    for precopy in (first, second):
        list(precopy.copy_sources()["users"]())
        precopy.complete = frozenset({"users"})
    cache["k1"] = "one"
    del cache["k2"]
    record = cache.__dict__["_handoff_changes"].changed
    for precopy, forgotten in ((first, 0), (second, 2)):  # b's mark holds them until its Ack
        [(records, mark)] = precopy.live_batch().values()
        assert [k for k, _, _ in records] == ["k2", "k1"]
        precopy.acknowledged("users", mark, len(records))
        assert state.forget_changes("users") == forgotten
    assert len(record) == 0
    cache["k3"] = "three"
    for precopy in (first, second):
        assert [k for k, _, _ in precopy.delta_sources()["users"]()] == ["k3"]


def test_caches_whose_changes_are_listed_by_listing_every_key_are_left_to_the_drain() -> None:
    timer = Timer()
    cache = make("fifo", timer)
    cache.update({f"k{i}": i for i in range(10)})
    precopy = Precopy({"users": engine_track("users", cache)})
    list(precopy.copy_sources()["users"]())
    precopy.complete = frozenset({"users"})
    cache["k1"] = "one"
    assert precopy.live_batch() == {}
    assert precopy.live_lost == {"users"}
    assert [k for k, _, _ in precopy.delta_sources()["users"]()] == ["k1"]


@pytest.mark.parametrize("kind", KINDS)
def test_reads_count_as_changes_only_where_they_reorder(kind: str) -> None:
    timer = Timer()
    cache = make(kind, timer)
    cache.update({f"k{i}": i for i in range(10)})
    source = adapter(cache)
    mark = source.mark()
    assert cache["k1"] == 1
    assert cache.get("k2") == 2
    assert "k5" in cache  # never a use
    names = [key for key, _, _ in source.changed_since(mark)]
    if kind in ("lru", "lfu", "ttl", "tlru"):
        assert sorted(names) == ["k1", "k2"]
    else:
        assert names == []


def test_marks_coexist_and_stop_tracking_restores_the_cache() -> None:
    """One pre-copy per new node: each has its own mark, all valid until tracking stops."""
    timer = Timer()
    cache = make("ttl", timer)
    cache["a"] = 1
    source = adapter(cache)
    first = source.mark()
    cache["b"] = 2
    second = source.mark()
    assert [key for key, _, _ in source.changed_since(second)] == []
    cache["c"] = 3
    assert [key for key, _, _ in source.changed_since(second)] == ["c"]
    assert sorted(key for key, _, _ in source.changed_since(first)) == ["b", "c"]
    # While tracked the cache stays a TTLCache to the application, and pickles as one.
    assert isinstance(cache, cachetools.TTLCache)
    copy = pickle.loads(pickle.dumps(cache))
    assert type(copy) is cachetools.TTLCache
    assert dict(copy) == {"a": 1, "b": 2, "c": 3}
    source.stop_tracking()
    assert type(cache) is cachetools.TTLCache
    cache["d"] = 4  # untracked: nothing noted, nothing raised
    with pytest.raises(ValueError, match="tracking"):
        list(source.changed_since(second))
    assert source.mark() != second  # a new tracking: the old marks stay invalid
    with pytest.raises(ValueError, match="not a mark of this cache's tracking"):
        list(source.changed_since(second))


@pytest.mark.parametrize("kind", KINDS)
def test_precopy_then_changes_then_delta_gives_the_receiver_the_senders_final_state(
    kind: str,
) -> None:
    """The flow a pre-copy runs: mark, copy everything while the sender serves on, then
    writes, updates, reads, deletions and evictions on the sender, time passing; at the
    end only the delta crosses, and the receiver holds exactly what the sender holds."""
    timer = Timer()
    cache = make(kind, timer)
    for i in range(100):
        cache[f"k{i:03d}"] = {"n": i}
    source = adapter(cache)
    received = make(kind, timer)
    target = adapter(received)
    mark = source.mark()
    assert target.import_records(list(source.export())).applied == 100
    timer.now += 30.0
    for i in range(0, 100, 10):
        cache[f"k{i:03d}"] = {"n": i, "updated": True}  # pre-copied, then changed
    for i in range(5, 100, 20):
        del cache[f"k{i:03d}"]
    for i in range(3, 100, 25):
        _ = cache.get(f"k{i:03d}")  # a read: recency (or a use count) changes
    for i in range(8):
        cache[f"new{i}"] = i  # the last ones evict (the cache is full again)
    timer.now += 10.0
    delta = delta_order(source.changed_since(mark))
    assert len(delta) < len(cache)  # only the delta crosses
    # In pieces, as chunks arrive.
    result = target.import_delta(delta[:7]) + target.import_delta(delta[7:])
    assert result.total == len(delta)
    assert result.dropped == {}
    expected, got = list(source.export()), list(target.export())
    if kind in ORDERED:
        assert [key for key, _, _ in got] == [key for key, _, _ in expected]
    assert {key: value for key, value, _ in got} == {key: value for key, value, _ in expected}
    if kind in ("ttl", "tlru"):
        lifetimes = {key: meta for key, _, meta in expected}
        for key, _, meta in got:
            # Never longer; shorter at most by the 1/256 grid of the receiver's expiries.
            assert lifetimes[key] * (1 - 1 / 256) <= meta <= lifetimes[key], key
    if kind == "lfu":
        assert {key: count for key, _, count in got} == {key: count for key, _, count in expected}


def test_a_delta_replaces_what_the_receiver_wrote_itself_and_deletes_what_it_never_had() -> None:
    timer = Timer()
    cache, received = make("lru", timer), make("lru", timer)
    cache.update({"a": 1, "b": 2})
    source, target = adapter(cache), adapter(received)
    mark = source.mark()
    target.import_records(list(source.export()))
    received["a"] = "the receiver's own"  # the new node served meanwhile
    cache["a"] = "the sender's update"
    del cache["b"]
    del cache["a"]
    cache["a"] = "again"
    result = target.import_delta(
        delta_order([*source.changed_since(mark), ("gone", DELETED, None)])
    )
    assert dict(received) == {"a": "again"}
    assert result.applied == 3  # a written, b and "gone" deleted


# -- the engine: a pre-copy's copy and delta streams over fake links --------------------------


def _drainer(
    node: FakeNode,
    target: FakeNode,
    tracked: dict[str, Tracked],
    sources: dict[str, Any],
    suffix: str,
    *,
    pace: float | None = None,
) -> Drainer:
    return Drainer(
        node=node.name,
        release=node.release,
        cluster=CLUSTER,
        tracked=tracked,
        transforms=node.transforms,
        codec=node.codec,
        snapshots=None,  # a delta is applicable only where the copy went
        peers=lambda: [(p, w) for p, w in node.peers() if p.name == target.name],
        clock=node.net.clock,
        wall_clock=lambda: 1_700_000_000.0,
        started_at=node.started_at,
        stream_ids=node.stream_ids,
        sources=sources,
        kinds={name: t.adapter.kind + suffix for name, t in tracked.items()},
        reason="pre-copy",
        pace=pace,
    )


class NoDeltas:
    """A cachetools adapter as a node before pre-copy has it: no ``import_delta``."""

    kind = "cachetools"
    moves_ownership = False

    def __init__(self, cache: cachetools.Cache[str, Any]) -> None:
        self._inner = adapter(cache)

    def __len__(self) -> int:
        return len(self._inner)

    def export(self) -> Any:
        return self._inner.export()

    def import_records(self, records: Any, *, age: float = 0.0) -> ImportResult:
        return self._inner.import_records(records, age=age)


@pytest.mark.anyio
async def test_a_precopy_then_its_delta_leave_the_receiver_with_the_senders_state(
    small_chunks: None,
) -> None:
    timer = Timer()
    cache = make("ttl", timer, maxsize=300)
    for i in range(300):
        cache[f"u{i:03d}"] = {"n": i}
    received = make("ttl", timer, maxsize=300)
    async with network() as net:
        a = net.node("a", engine_track("users", cache))
        b = net.node("b", engine_track("users", received), release="v2")
        c = net.node("c", Tracked("users", {}, NoDeltas(make("ttl", timer)), 1), release="v2")
        net.connect(a, b, c)
        precopy = Precopy(a.tracked)
        copy = await net.finish(
            net.start(
                lambda: a.sessions.precopy(
                    _drainer(a, b, precopy.tracked, precopy.copy_sources(), PRECOPY),
                    time_limit=10.0,
                )
            )
        )
        assert copy.ok, copy.summary()
        assert copy.namespaces["users"].acknowledged == 300
        assert b.completed == [("a", 300)]  # its Done: the receiver knows the copy is in
        assert len(received) == 300
        # The sender serves on: writes, updates, reads, deletions, evictions; time passes.
        timer.now += 20.0
        for i in range(0, 300, 7):
            cache[f"u{i:03d}"] = {"n": i, "v": 2}
        for i in range(3, 300, 11):
            cache.pop(f"u{i:03d}", None)
        for i in range(5, 300, 13):
            _ = cache.get(f"u{i:03d}")
        for i in range(40):
            cache[f"new{i}"] = i  # fills up, then evicts the least recently used
        timer.now += 5.0
        delta = await net.finish(
            net.start(
                lambda: a.sessions.drain(
                    _drainer(a, b, precopy.tracked, precopy.delta_sources(), DELTA),
                    time_limit=10.0,
                )
            )
        )
        # A receiver that cannot apply a delta refuses a pre-copy cleanly (no protocol
        # error): it will get the whole namespace at the drain instead.
        refused = await net.finish(
            net.start(
                lambda: a.sessions.drain(
                    _drainer(a, c, precopy.tracked, precopy.copy_sources(), PRECOPY),
                    time_limit=10.0,
                )
            )
        )
        assert net.protocol_errors == []

    ns = delta.namespaces["users"]
    assert delta.ok, delta.summary()
    assert ns.records == ns.acknowledged == ns.applied
    assert ns.records < len(cache)  # only the delta crossed
    expected, got = list(adapter(cache).export()), list(adapter(received).export())
    assert [k for k, _, _ in got] == [k for k, _, _ in expected]  # recency order too
    assert {k: v for k, v, _ in got} == {k: v for k, v, _ in expected}
    lifetimes = {k: meta for k, _, meta in expected}
    for key, _, meta in got:
        assert lifetimes[key] * (1 - 1 / 256) <= meta <= lifetimes[key], key
    assert "cannot apply a pre-copy" in refused.namespaces["users"].refusals["c"]
    assert refused.namespaces["users"].acknowledged == 0


@pytest.mark.anyio
async def test_a_paced_drain_spaces_its_chunks_by_the_bytes_they_carry(
    small_chunks: None,
) -> None:
    """A pre-copy runs while the node serves: its chunks leave no faster than the pace."""
    timer = Timer()
    cache = make("ttl", timer, maxsize=300)
    cache.update({f"u{i:03d}": "x" * 100 for i in range(300)})
    pace = 10_000.0  # bytes per second
    async with network() as net:
        a = net.node("a", engine_track("users", cache))
        b = net.node("b", engine_track("users", make("ttl", timer, maxsize=300)), release="v2")
        net.connect(a, b)
        precopy = Precopy(a.tracked)
        drainer = _drainer(a, b, precopy.tracked, precopy.copy_sources(), PRECOPY, pace=pace)
        started = net.clock.now()
        report = await net.finish(net.start(lambda: a.sessions.drain(drainer, time_limit=60.0)))
        elapsed = net.clock.now() - started
        chunks = [m for m in net.wire(a, b).delivered if isinstance(m, Chunk)]

    assert report.ok, report.summary()
    assert len(chunks) > 10
    # Chunk k leaves when the bytes of chunks 0..k-1 fit the pace; the acknowledgements
    # take no time here, so the drain ends as the last chunk leaves.
    sent = report.namespaces["users"].bytes
    assert elapsed == pytest.approx((sent - len(chunks[-1].payload)) / pace)
    with pytest.raises(ValueError, match="pace must be a positive number"):
        _drainer(a, b, precopy.tracked, precopy.copy_sources(), PRECOPY, pace=0.0)


@pytest.mark.anyio
async def test_a_precopy_cut_short_by_the_receiver_leaving_costs_nothing(
    small_chunks: None,
) -> None:
    """A copy, not a move: the sender keeps everything, the report says how far the copy
    got, and a delta is only ever sent to where the copy went."""
    timer = Timer()
    cache = make("ttl", timer, maxsize=300)
    cache.update({f"u{i:03d}": i for i in range(300)})
    async with network() as net:
        a = net.node("a", engine_track("users", cache))
        b = net.node("b", engine_track("users", make("ttl", timer, maxsize=300)), release="v2")
        net.connect(a, b)
        b_a = net.wire(b, a)
        b_a.hold_after = lambda m: isinstance(m, Ack) and m.seq == 1
        precopy = Precopy(a.tracked)
        copying = net.start(
            lambda: a.sessions.precopy(
                _drainer(a, b, precopy.tracked, precopy.copy_sources(), PRECOPY),
                time_limit=10.0,
            )
        )
        await net.drive(lambda: b_a.held)
        net.cut(a, b, "b left")
        report = await net.finish(copying)

    ns = report.namespaces["users"]
    assert (ns.records, ns.acknowledged) == (300, 32)
    assert ns.dropped == {"no successor, no snapshot store": 268}
    assert ns.records == ns.acknowledged + sum(ns.dropped.values())
    assert len(cache) == 300  # nothing left the sender
    assert precopy.marked == {"users"}


# -- nodes: pre-copy at node-up, the delta at the drain ---------------------------------------


def _state(cache: cachetools.Cache[str, Any]) -> list[tuple[Any, Any]]:
    """Keys and values hottest first (an export reads without touching the order)."""
    return [(k, v) for k, v, _ in adapter(cache).export()]


def _changes_after_the_copy(cache: cachetools.Cache[str, Any]) -> None:
    for i in range(0, 2000, 97):
        cache[f"k{i:04d}"] = {"n": i, "v": 2}  # pre-copied, then changed
    for i in range(5, 2000, 301):
        cache.pop(f"k{i:04d}", None)  # deleted
    for i in range(7, 2000, 211):
        _ = cache.get(f"k{i:04d}")  # read: now recently used
    for i in range(30):
        cache[f"new{i}"] = i  # written (the cache is full: the coldest go)


@pytest.mark.anyio
async def test_a_precopy_warms_the_new_node_and_the_drain_sends_only_the_delta() -> None:
    cache: cachetools.TTLCache[str, Any] = cachetools.TTLCache(maxsize=2000, ttl=300)
    for i in reversed(range(2000)):
        cache[f"k{i:04d}"] = {"n": i}
    received: cachetools.TTLCache[str, Any] = cachetools.TTLCache(maxsize=2000, ttl=300)
    old = handoff_node("old", "127.0.0.2", release="v1", precopy=True)
    old.track("users", cache)
    async with old:
        new = handoff_node("new", "127.0.0.3", old, release="v2")
        new.track("users", received)
        async with new:
            # Warm on state: the pre-copy is in, before the old node stops.
            with anyio.fail_after(10):
                assert await new.wait_warm() == "received a handoff from old"
            assert len(received) == 2000
            await wait_until(lambda: old.stats()["precopy"][0]["state"] == "complete")
            assert old.stats()["precopy"] == [
                {"peer": "new", "state": "complete", "copied": 2000, "entries": 2000,
                 "streamed": 0}
            ]  # fmt: skip
            assert "pre-copy to new: complete, 2000 of 2000 entries copied" in _status_lines(
                old.stats()
            )
            _changes_after_the_copy(cache)
            # While both serve, the changes reach the new node (the live stream): values,
            # deletions and order, without a drain.
            await wait_until(lambda: _state(received) == _state(cache))
            # (Counted once the sender has the batch's last Ack.)
            await wait_until(lambda: _precopy(old)["streamed"] > 0)
            streamed = old.stats()["precopy"][0]["streamed"]
            assert f", {streamed} changes streamed since" in "".join(_status_lines(old.stats()))
            report = await old.drain()
            final = list(adapter(cache).export())
            got = list(adapter(received).export())

    assert report.ok, report.summary()
    assert 0 < streamed < 200  # the changes, not the cache
    ns = report.namespaces["users"]
    assert ns.records < 200  # only what the live stream had not sent crossed at the drain
    assert ns.records == ns.acknowledged
    assert [k for k, _, _ in got] == [k for k, _, _ in final]
    assert {k: v for k, v, _ in got} == {k: v for k, v, _ in final}
    lifetimes = {k: meta for k, _, meta in final}
    for key, _, meta in got:
        assert meta <= lifetimes[key] + 0.5, key  # never outlives the sender's entry


@pytest.mark.anyio
async def test_the_catch_up_after_a_manual_drain_sends_a_precopied_peer_only_what_changed() -> None:
    """``handoff drain`` in a preStop hook, the app serving on, then the stop: the peer
    that took the pre-copy gets only the records written since the drain's delta, applied
    as a delta (they replace what it holds), not the whole cache again."""
    cache: cachetools.TTLCache[str, Any] = cachetools.TTLCache(maxsize=2000, ttl=300)
    for i in reversed(range(2000)):
        cache[f"k{i:04d}"] = {"n": i}
    received: cachetools.TTLCache[str, Any] = cachetools.TTLCache(maxsize=2000, ttl=300)
    new = handoff_node("new", "127.0.0.3", release="v2")
    new.track("users", received)
    async with new:
        old = handoff_node("old", "127.0.0.2", new, release="v1", precopy=True)
        old.track("users", cache)
        async with old:
            with anyio.fail_after(10):
                await new.wait_warm()
            await wait_until(lambda: old.stats()["precopy"][0]["state"] == "complete")
            _changes_after_the_copy(cache)
            drained = await old.drain()
            for i in range(1, 2000, 151):
                cache[f"k{i:04d}"] = {"n": i, "v": 3}  # written after the drain
            cache.pop("k0002", None)
        # (Leaving the block stopped the old node: the catch-up ran.)
        final = list(adapter(cache).export())
        got = list(adapter(received).export())
    assert drained.ok, drained.summary()
    report = old.catch_up_report
    assert report is not None
    assert report.ok, report.summary()
    ns = report.namespaces["users"]
    assert ns.records == ns.acknowledged == ns.applied
    assert 14 <= ns.records < 30  # 14 written and one deleted, not 2000
    assert {k: v for k, v, _ in got} == {k: v for k, v, _ in final}
    assert [k for k, _, _ in got] == [k for k, _, _ in final]


@pytest.mark.anyio
async def test_a_precopy_cut_short_by_the_drain_loses_nothing_and_leaves_nothing_stale() -> None:
    cache: cachetools.TTLCache[str, Any] = cachetools.TTLCache(maxsize=2000, ttl=300)
    for i in reversed(range(2000)):
        cache[f"k{i:04d}"] = {"n": i, "pad": "x" * 50}
    received: cachetools.TTLCache[str, Any] = cachetools.TTLCache(maxsize=2000, ttl=300)
    # 20,000 bytes per second: the copy takes seconds.
    old = handoff_node("old", "127.0.0.2", release="v1", precopy=20_000.0)
    old.track("users", cache)
    async with old:
        new = handoff_node("new", "127.0.0.3", old, release="v2")
        new.track("users", received)
        async with new:
            await wait_until(lambda: len(received) >= 100, limit=10)
            assert len(received) < 2000
            _changes_after_the_copy(cache)
            report = await old.drain()
            final = {k: v for k, v, _ in adapter(cache).export()}
            got = dict(received.items())

    assert report.ok, report.summary()
    ns = report.namespaces["users"]
    assert ns.records == ns.acknowledged  # the delta, then the whole namespace
    assert got == final


@pytest.mark.anyio
async def test_two_new_nodes_each_get_a_precopy_and_their_own_delta() -> None:
    cache: cachetools.TTLCache[str, Any] = cachetools.TTLCache(maxsize=2000, ttl=300)
    for i in reversed(range(2000)):
        cache[f"k{i:04d}"] = {"n": i}
    targets: list[cachetools.TTLCache[str, Any]] = [
        cachetools.TTLCache(maxsize=2000, ttl=300) for _ in range(2)
    ]
    old = handoff_node("old", "127.0.0.2", release="v1", precopy=True)
    old.track("users", cache)
    async with old:
        news = [handoff_node(f"new{i}", f"127.0.0.{3 + i}", old, release="v2") for i in (0, 1)]
        for new, target in zip(news, targets, strict=True):
            new.track("users", target)
        async with news[0], news[1]:
            with anyio.fail_after(10):
                for new in news:
                    await new.wait_warm()
            await wait_until(lambda: all(len(t) == 2000 for t in targets))
            _changes_after_the_copy(cache)
            # Each peer's live stream brings it the changes while all serve.
            await wait_until(lambda: all(_state(t) == _state(cache) for t in targets))
            await wait_until(lambda: all(p["streamed"] for p in old.stats()["precopy"]))
            streamed = [p["streamed"] for p in old.stats()["precopy"]]
            report = await old.drain()
            final = {k: v for k, v, _ in adapter(cache).export()}
            got = [dict(t.items()) for t in targets]

    assert report.ok, report.summary()
    assert len(streamed) == 2
    assert all(0 < n < 200 for n in streamed)  # the changes, to each
    ns = report.namespaces["users"]
    assert ns.records == ns.acknowledged < 400  # what was left of two deltas, no second copy
    assert got == [final, final]


def test_only_caches_that_track_changes_are_precopied_never_counters() -> None:
    cache = make("ttl", Timer())
    counters = handoff.Counters()
    tracked = {
        "cache": engine_track("cache", cache),
        "usage": engine_track("usage", counters),  # moves ownership
        "plain": engine_track("plain", {}),  # a mapping: no change tracking
    }
    assert set(Precopy(tracked).tracked) == {"cache"}


@pytest.mark.parametrize(
    ("given", "expected"),
    [("on", math.inf), ("off", 0.0), ("20000000", 2e7), (True, math.inf), (False, 0.0), (5e5, 5e5)],
)
def test_the_precopy_setting(given: object, expected: float) -> None:
    environ = {"HANDOFF_COOKIE": "x" * 32, "HANDOFF_CLUSTER": "shop"}
    if isinstance(given, str):
        settings = resolve_settings(environ={**environ, "HANDOFF_PRECOPY": given})
    else:
        settings = resolve_settings(environ=environ, precopy=given)  # type: ignore[arg-type]
    assert settings.precopy == expected
    assert resolve_settings(environ=environ).precopy == 0.0  # off unless asked


@pytest.mark.parametrize("given", ["soon", "-5", "nan"])
def test_a_bad_precopy_setting_says_what_it_takes(given: str) -> None:
    environ = {"HANDOFF_COOKIE": "x" * 32, "HANDOFF_CLUSTER": "shop", "HANDOFF_PRECOPY": given}
    with pytest.raises(handoff.ConfigError, match="HANDOFF_PRECOPY"):
        resolve_settings(environ=environ)


def test_an_lfu_delta_keeps_counts_and_the_order_of_ties() -> None:
    """Each delta record becomes the hottest of its count, as on the sender; counts are
    the sender's up to the ceiling any import has (MAX_IMPORTED_COUNT, or higher counts
    the receiver holds), above which they stay tied at it, as after any handoff."""
    cache: cachetools.LFUCache[str, int] = cachetools.LFUCache(100)
    for i in range(10):
        cache[f"k{i}"] = i
        for _ in range(i):
            _ = cache[f"k{i}"]
    received: cachetools.LFUCache[str, int] = cachetools.LFUCache(100)
    source, target = adapter(cache), adapter(received)
    mark = source.mark()
    target.import_records(list(source.export()))
    for _ in range(5):
        _ = cache["k1"]  # count 7, tied with k6, and now the later of the two
    _ = cache["k2"]
    cache["k4"] = -4  # a write is a use too
    for _ in range(MAX_IMPORTED_COUNT + 10):
        _ = cache["k3"]
    target.import_delta(delta_order(source.changed_since(mark)))
    expected = list(source.export())
    counts = {key: min(count, MAX_IMPORTED_COUNT) for key, _, count in expected}
    got = list(target.export())  # (dict(cache) would read, and so use, every entry)
    assert {key: count for key, _, count in got} == counts
    assert {key: value for key, value, _ in got} == {key: value for key, value, _ in expected}
    if LFU_TIES_PRESERVED:
        assert [key for key, _, _ in got] == [key for key, _, _ in expected]


def test_the_record_of_changes_is_bounded_and_then_everything_is_sent_again() -> None:
    """Churn after the mark (new keys evicting old ones) would grow the record of deleted
    keys without end: past its bound it is dropped, tracking stops, and the delta becomes
    a reset plus the whole cache, after which the receiver holds exactly the sender's."""
    timer = Timer()
    size = 2 * CHANGES_FLOOR
    cache = make("ttl", timer, maxsize=size)
    cache.update({f"old{i}": i for i in range(size)})
    received = make("ttl", timer, maxsize=size)
    source, target = adapter(cache), adapter(received)
    precopy = Precopy({"c": Tracked("c", cache, source, 1)})
    copied = [r for r in precopy.copy_sources()["c"]() if r is not PAUSE]  # (the Drainer's)
    assert target.import_records(copied).applied == size
    for i in range(size):  # churn: every old key evicted
        cache[f"new{i}"] = i
    assert type(cache) is cachetools.TTLCache  # untracked: reads cost nothing extra
    assert not any(name.startswith("_handoff") for name in vars(cache))
    with pytest.raises(handoff.ChangesLost):
        list(source.changed_since(precopy._marks["c"]))
    delta = list(precopy.delta_sources()["c"]())
    assert precopy.reset == {"c"}
    assert delta[0] == (None, None, RESET)
    assert len(delta) == 1 + len(cache)
    tracked = Tracked("c", received, target, 1)
    result, dropped = apply_delta(tracked, None, delta[:100], age=0.0)
    more, more_dropped = apply_delta(tracked, None, delta[100:], age=0.0)
    assert (result + more).applied == len(delta)
    assert dropped == more_dropped == {}
    assert [(k, v) for k, v, _ in target.export()] == [(k, v) for k, v, _ in source.export()]
    # A new mark starts a new record.
    mark = source.mark()
    cache["fresh"] = 1  # (evicts one: a deletion)
    changed = list(source.changed_since(mark))
    assert [key for key, value, _ in changed if value is not DELETED] == ["fresh"]
    assert len(changed) == 2


@pytest.mark.parametrize("kind", ["ttl", "lru", "fifo", "lfu"])
def test_a_handoff_received_while_tracking_is_part_of_the_delta(kind: str) -> None:
    """A node that pre-copies and meanwhile receives a handoff (its bulk import stores
    without ``__setitem__``) passes those records on in its delta, in its own order."""
    timer = Timer()
    cache = make(kind, timer, maxsize=3000)
    cache.update({f"own{i}": i for i in range(1000)})
    source = adapter(cache)
    mark = source.mark()
    _ = cache.get("own5")  # a use before the import
    incoming = [(f"in{i}", i, 200.0 if kind == "ttl" else None) for i in range(1500)]
    assert source.import_records(incoming).applied == 1500
    _ = cache.get("own7")  # and one after
    changed = list(source.changed_since(mark))
    expected = {f"in{i}" for i in range(1500)} | (
        {"own5", "own7"} if kind in ("ttl", "lru", "lfu") else set()
    )
    assert {key for key, _, _ in changed} == expected
    # As the export yields them, whatever order the imports gave the cache.
    assert changed == [record for record in source.export() if record[0] in expected]


def _precopy(node: handoff.Node) -> dict[str, Any]:
    """The node's only pre-copy's status (empty before it begins)."""
    precopies: list[dict[str, Any]] = node.stats()["precopy"]
    return precopies[0] if precopies else {}


async def _write_until(cache: cachetools.Cache[str, Any], stop: anyio.Event) -> None:
    """The app writing and deleting while both serve, until ``stop`` (bounded)."""
    for i in range(20_000):
        if stop.is_set():
            return
        cache[f"k{(i * 37) % 2000:04d}"] = {"n": i}
        if i % 7 == 0:
            cache.pop(f"k{(i * 11) % 2000:04d}", None)
        await anyio.sleep(0.0005)


@pytest.mark.anyio
async def test_a_drain_during_the_live_stream_loses_nothing_and_leaves_nothing_stale() -> None:
    """SIGTERM while the live stream carries changes (a batch may be in flight): the
    drain lets it finish or stops it, and its delta sends the rest, so the receiver ends
    with the sender's final state."""
    cache: cachetools.TTLCache[str, Any] = cachetools.TTLCache(maxsize=2000, ttl=300)
    for i in reversed(range(2000)):
        cache[f"k{i:04d}"] = {"n": i}
    received: cachetools.TTLCache[str, Any] = cachetools.TTLCache(maxsize=2000, ttl=300)
    old = handoff_node("old", "127.0.0.2", release="v1", precopy=True)
    old.track("users", cache)
    async with old:
        new = handoff_node("new", "127.0.0.3", old, release="v2")
        new.track("users", received)
        async with new:
            await wait_until(lambda: _precopy(old).get("state") == "complete", 10)
            stop = anyio.Event()
            async with anyio.create_task_group() as group:
                group.start_soon(_write_until, cache, stop)
                await wait_until(lambda: _precopy(old)["streamed"] > 200, 10)
                stop.set()
                report = await old.drain()
            final = _state(cache)
            got = _state(received)

    assert report.ok, report.summary()
    ns = report.namespaces["users"]
    assert ns.records == ns.acknowledged
    assert got == final


@pytest.mark.anyio
async def test_a_peer_leaving_ends_its_live_stream_and_the_drain_report_stays_true() -> None:
    cache: cachetools.TTLCache[str, Any] = cachetools.TTLCache(maxsize=500, ttl=300)
    cache.update({f"k{i:04d}": {"n": i} for i in range(500)})
    received: cachetools.TTLCache[str, Any] = cachetools.TTLCache(maxsize=500, ttl=300)
    old = handoff_node("old", "127.0.0.2", release="v1", precopy=True)
    old.track("users", cache)
    async with old:
        new = handoff_node("new", "127.0.0.3", old, release="v2")
        new.track("users", received)
        stop = anyio.Event()
        async with anyio.create_task_group() as group:
            async with new:
                await wait_until(lambda: _precopy(old).get("state") == "complete", 10)
                group.start_soon(_write_until, cache, stop)
                await wait_until(lambda: _precopy(old)["streamed"] > 50, 10)
            # (new left: it drained what it held back to old, the only node serving)
            live = old._precopy.begun["new"].live_done
            assert live is not None
            with anyio.fail_after(5):
                await live.wait()  # its live stream ended with it
            stop.set()
        report = await old.drain()
        held = len(cache)

    ns = report.namespaces["users"]
    assert ns.records == held > 0
    assert ns.acknowledged == 0
    assert ns.dropped == {"no successor, no snapshot store": held}
    assert not report.ok


@pytest.mark.anyio
async def test_a_precopy_offer_left_unanswered_is_offered_again() -> None:
    """A drain waits for a lone successor's answer as long as it lasts; a pre-copy stops
    after ANSWER_WAIT and offers again (an offer can be lost with a duplicate link)."""
    cache: cachetools.TTLCache[str, Any] = cachetools.TTLCache(maxsize=500, ttl=300)
    cache.update({f"k{i:04d}": {"n": i} for i in range(500)})
    received: cachetools.TTLCache[str, Any] = cachetools.TTLCache(maxsize=500, ttl=300)
    new = handoff_node("new", "127.0.0.3", release="v2")
    new.track("users", received)
    async with new:
        receiver = new._sessions.receiver
        original = receiver.handle
        lost: list[Offer] = []

        async def lose_the_first_offer(peer: str, link: Any, message: Any) -> None:
            if isinstance(message, Offer) and not lost:
                lost.append(message)
                return
            await original(peer, link, message)

        receiver.handle = lose_the_first_offer  # type: ignore[method-assign]
        old = handoff_node("old", "127.0.0.2", new, release="v1", precopy=True)
        old.track("users", cache)
        async with old:
            await wait_until(lambda: _precopy(old).get("state") in ("complete", "partial"), 10)
            status = _precopy(old)
            got = _state(received)
            final = _state(cache)
    assert len(lost) == 1
    assert status["state"] == "complete"
    assert got == final
