"""A pre-copy lists a cache's keys in bounded steps (``export_paused``), the cache serving
between them: the copy plus its delta must still give the receiver the sender's final
state exactly (values, remaining lifetimes, recency order), and the sender itself must
behave as if nothing listed it (same evictions, same order), whoever changes it between
the steps: the event loop's own tasks, or threads that hold the node's lock."""

from __future__ import annotations

import copy
import pickle
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import cachetools
import pytest

from handoff._adapter import PAUSE, Record
from handoff.adapters import cachetools as cachetools_adapter
from handoff.engine._precopy import DELTA, PRECOPY, Precopy, delta_order
from tests._cachetools_versions import FLAVOURS, flavour
from tests.test_engine_unit import network
from tests.test_engine_unit import track as engine_track
from tests.test_precopy import ORDERED, Timer, _drainer, adapter, make

SIZE = 120
STEP = 8  # keys a step lists: SIZE / STEP steps at least


@pytest.fixture(autouse=True)
def small_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in FLAVOURS:
        monkeypatch.setattr(flavour(name).adapters, "WALK_STEP", STEP)


def make_in(version: str, kind: str, timer: Timer) -> Any:
    """``make`` on the installed cachetools, or on the oldest supported one."""
    if version == "installed":
        return make(kind, timer, maxsize=SIZE)
    old = flavour(version).cachetools
    if kind == "ttl":
        return old.TTLCache(maxsize=SIZE, ttl=300, timer=timer)
    if kind == "tlru":
        return old.TLRUCache(maxsize=SIZE, ttu=lambda k, v, now: now + 300, timer=timer)
    return {"lru": old.LRUCache, "fifo": old.FIFOCache}[kind](maxsize=SIZE)


def adapter_in(version: str, cache: Any) -> Any:
    if version == "installed":
        return adapter(cache)
    adapters = flavour(version).adapters
    kinds = {"TTLCache": "TTL", "TLRUCache": "TLRU", "LRUCache": "LRU", "FIFOCache": "FIFO"}
    return getattr(adapters, kinds[type(cache).__name__] + "CacheAdapter")(cache)


def filled(kind: str, timer: Timer, version: str = "installed") -> Any:
    """A full cache whose entries were written 2 s apart (they expire one by one), then
    a third of them read (recency no longer follows the writes)."""
    cache = make_in(version, kind, timer)
    for i in range(SIZE):
        timer.now = 2.0 * i  # (the same for a twin filled after it)
        cache[f"k{i:03d}"] = {"n": i}
    for i in range(0, SIZE, 3):
        _ = cache.get(f"k{(i * 7) % SIZE:03d}")
    return cache


def operate(cache: cachetools.Cache[str, Any], turn: int) -> None:
    """One turn of serving: a new key (the cache is full: it evicts), an overwrite, a
    deletion and two reads (which reorder the recency-ordered caches)."""
    cache[f"new{turn:03d}"] = turn
    cache[f"k{(turn * 7) % SIZE:03d}"] = {"n": turn, "updated": True}
    cache.pop(f"k{(turn * 11 + 3) % SIZE:03d}", None)
    _ = cache.get(f"k{(turn * 13 + 5) % SIZE:03d}")
    _ = cache.get(f"new{turn // 2:03d}")


def keys_of(records: list[Record]) -> list[Any]:
    return [key for key, _, _ in records]


def assert_same_state(got: list[Record], expected: list[Record], *, exact_meta: bool) -> None:
    assert keys_of(got) == keys_of(expected)  # recency (or insertion) order too
    assert {k: v for k, v, _ in got} == {k: v for k, v, _ in expected}
    lifetimes = {k: meta for k, _, meta in expected}
    for key, _, meta in got:
        if exact_meta or meta is None:
            assert meta == lifetimes[key], key
        else:  # shorter at most by the 1/256 grid of the receiver's expiries
            assert lifetimes[key] * (1 - 1 / 256) <= meta <= lifetimes[key], key


def pull(
    cache: Any,
    between: Callable[[], None],
    *,
    stop_after: int = -1,
    version: str = "installed",
) -> tuple[list[Record], int]:
    """A pre-copy's listing of ``cache``: its records, and the steps it paused at;
    ``between()`` runs at each pause. ``stop_after``: abandon it after that many."""
    records: list[Record] = []
    pauses = 0
    listing = adapter_in(version, cache).export_paused()
    for record in listing:
        if record is PAUSE:
            pauses += 1
            if pauses == stop_after:
                listing.close()
                break
            between()
        else:
            records.append(record)
    return records, pauses


@pytest.mark.parametrize("version", FLAVOURS)
@pytest.mark.parametrize("kind", ORDERED)
def test_a_listing_in_steps_keeps_order_lifetimes_and_evictions_while_the_cache_changes(
    kind: str, version: str
) -> None:
    """Between steps the sender serves on (new keys that evict, overwrites, deletions,
    reads that reorder, entries expiring): it evicts exactly what a twin cache that
    nobody lists evicts and ends in the same order; the copy plus the delta since the
    mark give the receiver the sender's final state."""
    timer = Timer()
    cache, twin = filled(kind, timer, version), filled(kind, timer, version)
    source = adapter_in(version, cache)
    mark = source.mark()
    turns = iter(range(1000))

    def serve() -> None:
        turn = next(turns)
        operate(cache, turn)
        operate(twin, turn)
        timer.now += 3.0  # the oldest entries expire as the listing goes
        assert set(cache) == set(twin)  # the same evictions, the same expiries

    copied, pauses = pull(cache, serve, version=version)
    assert pauses >= SIZE // STEP // 2  # many steps, serving between (fewer keys left)
    twin_records = list(adapter_in(version, twin).export())
    assert_same_state(list(source.export()), twin_records, exact_meta=True)

    received = make_in(version, kind, timer)
    target = adapter_in(version, received)
    assert target.import_records(copied).dropped == {}
    serve()  # (after the copy too)
    delta = delta_order(source.changed_since(mark))
    assert target.import_delta(delta).dropped == {}
    assert_same_state(list(target.export()), list(source.export()), exact_meta=False)


@pytest.mark.parametrize("kind", ORDERED)
def test_a_listing_left_unfinished_leaves_the_cache_as_it_would_be(kind: str) -> None:
    """A pre-copy stopped (the drain began) in the middle of its listing: the cache's
    order is its own again, and it evicts as it would have."""
    timer = Timer()
    cache, twin = filled(kind, timer), filled(kind, timer)
    adapter(cache).mark()
    turns = iter(range(1000))

    def serve() -> None:
        turn = next(turns)
        operate(cache, turn)
        operate(twin, turn)
        timer.now += 3.0

    copied, pauses = pull(cache, serve, stop_after=SIZE // STEP // 2)
    assert copied == []
    assert pauses == SIZE // STEP // 2
    for _ in range(30):
        serve()
        assert set(cache) == set(twin)
    assert_same_state(list(adapter(cache).export()), list(adapter(twin).export()), exact_meta=True)


def test_an_import_during_a_listing_settles_it() -> None:
    """An import places entries at the cold end, where the listing takes its next keys:
    the listing is undone first, and what is left is listed at once."""
    timer = Timer()
    cache, twin = filled("lru", timer), filled("lru", timer)
    adapter(cache).mark()
    adapter(twin).mark()
    imported = [(f"in{i}", i, None) for i in range(3)]

    def receive() -> None:
        cache.pop("k000", None)
        twin.pop("k000", None)
        cache.pop("k001", None)
        twin.pop("k001", None)
        adapter(cache).import_records(imported)
        adapter(twin).import_records(imported)

    once = iter([receive])
    copied, pauses = pull(cache, lambda: next(once, lambda: None)())
    assert pauses == 1  # then listed at once
    assert keys_of(copied) == keys_of(list(adapter(twin).export()))
    assert_same_state(list(adapter(cache).export()), list(adapter(twin).export()), exact_meta=True)


@pytest.mark.parametrize("kind", ["lru", "ttl"])
def test_threads_that_write_under_the_nodes_lock_between_steps(kind: str) -> None:
    """A sync app writes from its threads, each access under the node's lock; the
    listing takes the lock for each step only (as the engine does). Whatever the thread
    did between the steps, replayed on a twin nobody listed, ends in the same cache, and
    the copy plus the delta give the receiver that state."""
    timer = Timer()
    cache, twin = filled(kind, timer), filled(kind, timer)
    source = adapter(cache)
    mark = source.mark()
    lock = threading.RLock()
    done: list[int] = []
    your_turn, mine = threading.Semaphore(0), threading.Semaphore(0)
    steps = SIZE // STEP + 4

    def app() -> None:
        for turn in range(steps):
            if not your_turn.acquire(timeout=10):
                return
            for sub in range(3):
                with lock:
                    operate(cache, turn * 3 + sub)
                    done.append(turn * 3 + sub)
            mine.release()

    thread = threading.Thread(target=app)
    thread.start()
    try:
        copied: list[Record] = []
        listing = source.export_paused()
        pauses = 0
        while True:
            with lock:
                record = next(listing, None)
            if record is None:
                break
            if record is PAUSE:
                pauses += 1
                your_turn.release()
                assert mine.acquire(timeout=10)
            else:
                copied.append(record)
    finally:
        for _ in range(steps):
            your_turn.release()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert pauses >= SIZE // STEP // 2
    for turn in done:
        operate(twin, turn)
    assert_same_state(list(source.export()), list(adapter(twin).export()), exact_meta=True)
    received = make(kind, timer, maxsize=SIZE)
    adapter(received).import_records(copied)
    adapter(received).import_delta(delta_order(source.changed_since(mark)))
    assert_same_state(list(adapter(received).export()), list(source.export()), exact_meta=False)


@pytest.mark.anyio
async def test_a_precopys_listing_lets_the_event_loop_run_between_its_steps() -> None:
    """The copy of a pre-copy over the engine: a task of the sender's event loop gets
    turns while the listing is under way (one listing in one go gave it none), and
    changes the cache in them; the delta then leaves the receiver with the sender's
    state."""
    timer = Timer()
    cache = filled("ttl", timer)
    received = make("ttl", timer, maxsize=SIZE)
    turns_during_listing = 0
    async with network() as net:
        a = net.node("a", engine_track("users", cache))
        b = net.node("b", engine_track("users", received), release="v2")
        net.connect(a, b)
        precopy = Precopy(a.tracked)
        copying = net.start(
            lambda: a.sessions.precopy(
                _drainer(a, b, precopy.tracked, precopy.copy_sources(), PRECOPY),
                time_limit=10.0,
            )
        )

        async def app() -> None:
            nonlocal turns_during_listing
            for turn in range(10_000):  # bounded: the copy takes a few hundred turns
                if copying.done.is_set():
                    return
                changes = cache.__dict__.get("_handoff_changes")
                walk = None if changes is None else changes.walk
                if walk is not None and walk.listed:
                    turns_during_listing += 1
                    operate(cache, turn)
                await anyio.lowlevel.checkpoint()

        net.start(app)
        copy = await net.finish(copying)
        assert copy.ok, copy.summary()
        assert turns_during_listing >= SIZE // STEP // 2
        delta = await net.finish(
            net.start(
                lambda: a.sessions.drain(
                    _drainer(a, b, precopy.tracked, precopy.delta_sources(), DELTA),
                    time_limit=10.0,
                )
            )
        )
    assert delta.ok, delta.summary()
    assert_same_state(
        list(adapter(received).export()), list(adapter(cache).export()), exact_meta=False
    )


def test_caches_without_an_order_to_walk_export_as_before() -> None:
    """LFU, RR and plain caches (and any cache not tracked) list in one go, no pause."""
    timer = Timer()
    for kind in ("lfu", "rr", "cache", "ttl"):
        cache = filled(kind, timer)
        if kind != "ttl":
            adapter(cache).mark()
        records, pauses = pull(cache, lambda: None)
        assert pauses == 0
        assert records == list(adapter(cache).export())


def test_a_precopys_listing_left_unfinished_is_undone_under_the_nodes_lock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The drain stops a pre-copy mid-listing: its export is collected on the event loop,
    where the node's lock is not held; undoing the listing must not race the app's
    threads, so it is closed under the lock."""

    class Lock:
        held = False

        def __enter__(self) -> None:
            self.held = True

        def __exit__(self, *_: object) -> None:
            self.held = False

    lock = Lock()
    settled_holding: list[bool] = []
    settle = cachetools_adapter._Walk.settle

    def recording(walk: Any) -> None:
        if walk.changes.walk is walk:
            settled_holding.append(lock.held)
        settle(walk)

    monkeypatch.setattr(cachetools_adapter._Walk, "settle", recording)
    cache = filled("lru", Timer())
    precopy = Precopy({"users": engine_track("users", cache)})
    records = precopy.copy_sources(lock)["users"]()
    assert next(records) is PAUSE
    del records  # (collected)
    assert settled_holding == [True]


@pytest.mark.parametrize("how", ["copy", "pickle"])
def test_a_copy_made_during_a_listing_has_the_caches_own_order(how: str) -> None:
    timer = Timer()
    cache, twin = filled("lru", timer), filled("lru", timer)
    adapter(cache).mark()
    listing = adapter(cache).export_paused()
    assert next(listing) is PAUSE
    made = copy.copy(cache) if how == "copy" else pickle.loads(pickle.dumps(cache))
    assert list(made) == list(twin)
    assert_same_state(list(adapter(made).export()), list(adapter(twin).export()), exact_meta=True)


class Key(str):
    """A key whose hashing runs Python code: a thread that ignores the node's lock can
    change the cache there, in the middle of a step. Here the key does it itself, at the
    ``countdown``-th hashing."""

    __slots__ = ()
    countdown = 0
    sneak: Callable[[], None] = staticmethod(lambda: None)

    def __hash__(self) -> int:
        Key.countdown -= 1
        if Key.countdown == 0:
            Key.sneak()
        return str.__hash__(self)

    def __eq__(self, other: object) -> bool:
        return str.__eq__(self, other)


def test_a_key_deleted_in_the_middle_of_a_step_is_skipped() -> None:
    """Whether the step is iterating the order (it starts again) or moving the keys it
    took (the ones still held move): the listing, the cache and the copy plus its delta
    stay right."""
    for countdown in range(1, 3 * STEP):  # hashings in the first step, and after it
        timer = Timer()
        cache, twin = make("lru", timer, maxsize=SIZE), make("lru", timer, maxsize=SIZE)
        for i in range(SIZE):
            cache[Key(f"k{i:03d}")] = i
            twin[f"k{i:03d}"] = i
        source = adapter(cache)
        mark = source.mark()

        def unlocked_thread(cache: Any = cache, twin: Any = twin) -> None:
            del cache["k005"]  # (in the first step)
            del twin["k005"]

        listing = source.export_paused()
        Key.countdown, Key.sneak = countdown, unlocked_thread
        copied = [record for record in listing if record is not PAUSE]
        assert Key.countdown < 0  # it ran
        assert "k005" not in keys_of(copied)
        assert keys_of(list(source.export())) == keys_of(list(adapter(twin).export())), countdown
        received = make("lru", timer, maxsize=SIZE)
        adapter(received).import_records(copied)
        adapter(received).import_delta(delta_order(source.changed_since(mark)))
        assert keys_of(list(adapter(received).export())) == keys_of(list(adapter(twin).export()))


def test_a_listing_whose_record_of_changes_is_lost_is_undone_then_made_at_once() -> None:
    """Churn between two steps outgrows the record of changes: tracking stops (nothing
    says any more which keys were touched), so the listing is undone while the record
    still says it, and what is left is listed at once; the cache keeps its own order."""
    timer = Timer()
    size = 2 * cachetools_adapter.CHANGES_FLOOR
    cache, twin = make("lru", timer, maxsize=size), make("lru", timer, maxsize=size)
    for c in (cache, twin):
        c.update({f"old{i}": i for i in range(size)})
    adapter(cache).mark()

    def churn() -> None:
        for c in (cache, twin):
            for i in range(size * 3 // 4):
                c[f"new{i}"] = i  # evicts: each a deletion noted

    once = iter([churn])
    copied, pauses = pull(cache, lambda: next(once, lambda: None)())
    assert pauses == 1
    assert type(cache) is cachetools.LRUCache  # tracking stopped
    assert keys_of(copied) == keys_of(list(adapter(twin).export()))
    assert keys_of(list(adapter(cache).export())) == keys_of(list(adapter(twin).export()))
