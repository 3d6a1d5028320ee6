"""Attacks on the pre-copy's listing in steps and the tracking it relies on: the app's
own view of its cache (what it evicts, which of its hooks run) and the delta a receiver
applies must be what they would be without a pre-copy, whatever public method the app
calls between the steps."""

from __future__ import annotations

import copy
import logging
import sys
import threading
from typing import Any

import anyio
import pytest

from handoff._adapter import DELETED, PAUSE
from handoff.engine._precopy import Bell, delta_order
from tests._cachetools_versions import FLAVOURS, flavour
from tests.test_precopy import Timer
from tests.test_precopy_walk import SIZE as WALK_SIZE
from tests.test_precopy_walk import (
    Key,
    adapter_in,
    assert_same_state,
    filled,
    keys_of,
    make_in,
    operate,
)

SIZE = 40
STEP = 4
HELD = 20  # entries of a cache the thread test lists at each of its hashings


@pytest.fixture(autouse=True)
def small_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in FLAVOURS:
        monkeypatch.setattr(flavour(name).adapters, "WALK_STEP", STEP)


@pytest.mark.parametrize("version", FLAVOURS)
@pytest.mark.parametrize("kind", ["lru", "fifo", "ttl", "tlru"])
def test_a_clear_after_the_mark_deletes_every_key_on_the_receiver(kind: str, version: str) -> None:
    """``clear()`` (which newer cachetools make O(1), without ``__delitem__``) between the
    copy and the delta, and during a listing: the receiver ends empty but for what was
    written after it, not holding the entries the app cleared."""
    timer = Timer()
    cache = make_in(version, kind, timer)
    cache.update({f"k{i:03d}": i for i in range(SIZE)})
    source = adapter_in(version, cache)
    mark = source.mark()
    listing = source.export_paused()
    assert next(listing) is PAUSE
    cache.clear()
    cache["after"] = "written after the clear"
    copied = [record for record in listing if record is not PAUSE]
    received = make_in(version, kind, timer)
    receiver = adapter_in(version, received)
    receiver.import_records([(f"k{i:03d}", i, None) for i in range(SIZE)])  # an earlier copy
    receiver.import_records(copied)
    receiver.import_delta(delta_order(source.changed_since(mark)))
    assert dict(received) == dict(cache) == {"after": "written after the clear"}


@pytest.mark.parametrize("version", FLAVOURS)
@pytest.mark.parametrize("kind", ["lru", "fifo", "ttl", "tlru"])
def test_a_subclass_popitem_hook_sees_every_eviction_during_a_listing(
    kind: str, version: str
) -> None:
    """The eviction hook the cachetools documentation shows (a subclass's ``popitem``
    that calls ``super().popitem()``) runs for each eviction while a listing is under
    way, evicting what a twin nobody lists evicts; the listing still comes out right."""
    timer = Timer()
    base = type(make_in(version, kind, timer))

    def hooked(evicted: list[Any]) -> Any:
        class Hooked(base):  # type: ignore[misc,valid-type]
            def popitem(self) -> tuple[Any, Any]:
                key, value = super().popitem()
                evicted.append(key)
                return key, value

        args: dict[str, Any] = {"maxsize": SIZE}
        if kind == "ttl":
            args.update(ttl=300, timer=timer)
        if kind == "tlru":
            args.update(ttu=lambda k, v, now: now + 300, timer=timer)
        cache = Hooked(**args)
        cache.update({f"k{i:03d}": i for i in range(SIZE)})
        for i in range(0, SIZE, 3):
            _ = cache.get(f"k{(i * 7) % SIZE:03d}")
        return cache

    evicted: list[Any] = []
    evicted_by_twin: list[Any] = []
    cache, twin = hooked(evicted), hooked(evicted_by_twin)
    kinds = {"TTLCache": "TTL", "TLRUCache": "TLRU", "LRUCache": "LRU", "FIFOCache": "FIFO"}
    adapter_class = getattr(flavour(version).adapters, kinds[base.__name__] + "CacheAdapter")
    source, twin_source = adapter_class(cache), adapter_class(twin)
    source.mark()
    turns = iter(range(100))

    def serve() -> None:
        turn = next(turns)
        for c in (cache, twin):
            c[f"new{turn:03d}"] = turn  # full: evicts through the hook
            _ = c.get(f"k{(turn * 13 + 5) % SIZE:03d}")

    copied = []
    for record in source.export_paused():
        if record is PAUSE:
            serve()
        else:
            copied.append(record)
    assert evicted == evicted_by_twin
    assert evicted  # (the hook ran)
    assert keys_of(copied) == keys_of(list(twin_source.export()))
    assert keys_of(list(source.export())) == keys_of(list(twin_source.export()))


@pytest.mark.parametrize("writes", ["once", "at every hashing after"])
def test_a_thread_without_the_lock_writing_at_any_hashing_of_a_listing_loses_nothing(
    writes: str,
) -> None:
    """A thread that ignores the node's lock writes a new key at any moment of a listing
    (here: at a hashing of a key, one run per hashing, the end of the listing included;
    or from then on at every hashing, which makes each attempt at a step or at the end
    fail): the listing never fails, the cache keeps every key and, but for where the
    keys written land, its own order; the copy plus its delta give the receiver the
    sender's entries."""
    timer = Timer()

    def run(countdown: int) -> int:
        cache = make_in("installed", "lru", timer)
        twin = make_in("installed", "lru", timer)
        for i in range(HELD):  # (room for the keys the thread writes: nothing is evicted)
            cache[Key(f"k{i:03d}")] = i
            twin[f"k{i:03d}"] = i
        source = adapter_in("installed", cache)
        mark = source.mark()
        turns = iter(range(100))

        def serve() -> None:
            turn = next(turns)
            key = f"k{(turn * 7) % HELD:03d}"
            _ = cache.get(Key(key)), twin.get(key)  # touched: read

        # (Once: one write. Every: one at each of the next six hashings, which makes
        # each of three attempts at a step, or at its end, fail: an attempt may hash a
        # key twice before it notices.)
        sneaked = iter(range(1 if writes == "once" else 6))

        def unlocked_thread() -> None:
            n = next(sneaked, None)
            if n is not None:
                cache[f"sneaked{n}"] = twin[f"sneaked{n}"] = "written without the lock"
                Key.countdown = 1  # (and at the next hashing, if any is left)

        Key.countdown, Key.sneak = countdown, unlocked_thread
        try:
            copied = []
            for record in source.export_paused():
                if record is PAUSE:
                    serve()
                else:
                    copied.append(record)
        finally:
            left, Key.countdown = Key.countdown, 0
        assert dict(cache) == dict(twin)

        def without_sneaked(c: Any) -> list[Any]:
            listed = keys_of(list(adapter_in("installed", c).export()))
            return [k for k in listed if not k.startswith("sneaked")]

        assert without_sneaked(cache) == without_sneaked(twin), countdown
        received = make_in("installed", "lru", timer)
        adapter_in("installed", received).import_records(copied)
        adapter_in("installed", received).import_delta(delta_order(source.changed_since(mark)))
        assert dict(received) == dict(cache), countdown
        return countdown - left

    hashings = run(1 << 30)  # (never reached: how many hashings a listing makes)
    assert hashings > SIZE
    for countdown in range(1, hashings + 1):
        run(countdown)


@pytest.mark.parametrize("kind", ["lru", "fifo", "ttl", "tlru"])
def test_a_copy_of_a_tracked_cache_is_a_cache_of_its_own(kind: str) -> None:
    """``copy.copy`` of a cache a pre-copy tracks (cachetools' ``__copy__`` copies its
    instance dict, the record of changes too) in the middle of a listing: the copy is
    untracked, of the cache's own class; its writes evict its own coldest entries (not
    by the original's listing) and are not in the original's delta. (cachetools 5.3.0
    has no ``__copy__``: its shallow copy shares the original's dicts, tracked or not.)"""
    version = "installed"
    timer = Timer()
    cache = make_in(version, kind, timer)
    full = cache.maxsize
    cache.update({f"k{i:03d}": i for i in range(full)})
    own_class = type(cache)
    source = adapter_in(version, cache)
    mark = source.mark()
    listing = source.export_paused()
    assert next(listing) is PAUSE
    del cache["k000"]  # the original's listing goes on without the coldest
    made = copy.copy(cache)
    assert type(made) is own_class
    assert not any("handoff" in name for name in vars(made))
    made.update({f"copy{i}": i for i in range(3)})  # full: evicts the copy's coldest
    assert list(made) == [f"k{i:03d}" for i in range(3, full)] + ["copy0", "copy1", "copy2"]
    copied = [record for record in listing if record is not PAUSE]
    assert keys_of(copied) == [f"k{i:03d}" for i in reversed(range(1, full))]
    assert list(source.changed_since(mark)) == [("k000", DELETED, None)]

    # A copy made before a listing, holding other keys: its writes, which evict, during
    # the original's listing (they raised KeyError: the original's coldest key).
    earlier = copy.copy(cache)
    earlier.clear()
    earlier.update({f"own{i:03d}": i for i in range(full)})
    listing = source.export_paused()
    assert next(listing) is PAUSE
    earlier["one more"] = 1
    assert "own000" not in earlier
    listing.close()


@pytest.mark.parametrize("version", FLAVOURS)
@pytest.mark.parametrize("kind", ["lru", "fifo", "ttl", "tlru"])
def test_a_listing_stopped_at_any_step_leaves_the_cache_its_own_order_and_lifetimes(
    kind: str, version: str
) -> None:
    """The drain stops a pre-copy's listing after any of its steps (or while it yields
    its records, or before it began), entries expiring meanwhile: the drain's export
    then has the order and the remaining lifetimes of a twin nobody listed, and both
    evict alike afterwards."""
    timer = Timer()
    probe = filled(kind, timer, version)
    adapter_in(version, probe).mark()
    steps = sum(record is PAUSE for record in adapter_in(version, probe).export_paused())
    assert steps >= WALK_SIZE // STEP - 1
    for stop in [0, *range(1, steps + 1), steps + 1, steps + WALK_SIZE // 2]:
        timer.now = 0.0
        cache, twin = filled(kind, timer, version), filled(kind, timer, version)
        source, twin_source = adapter_in(version, cache), adapter_in(version, twin)
        source.mark()
        turns = iter(range(1000))

        def serve(cache: Any = cache, twin: Any = twin, turns: Any = turns) -> None:
            turn = next(turns)
            operate(cache, turn)
            operate(twin, turn)
            timer.now += 5.0  # (entries written 2 s apart: some expire at each turn)

        listing = source.export_paused()
        for pulled, record in enumerate(listing, start=1):
            if record is PAUSE:
                serve()
            if pulled >= stop:
                break
        listing.close()  # (the drain, under the node's lock)
        serve()
        drained = list(source.export())
        assert_same_state(drained, list(twin_source.export()), exact_meta=True)
        for _ in range(5):
            serve()
            assert list(cache) == list(twin), stop


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_change_after_the_live_streams_loop_ended_rings_its_bell_harmlessly(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The node stopped (its event loop ended) while its live stream's bell still waits
    on a tracked cache: the app's next writes, from the loop's old thread or another,
    ring it without an exception or an error logged."""

    async def make_bell() -> Bell:
        return Bell()

    bell = anyio.run(make_bell, backend=backend)
    cache = make_in("installed", "lru", Timer())
    source = adapter_in("installed", cache)
    source.mark()
    for thread_runs_it in (False, True):
        assert source.wake_on_change(bell.ring)
        if thread_runs_it:
            writer = threading.Thread(target=cache.__setitem__, args=("from a thread", 1))
            writer.start()
            writer.join(timeout=10)
            assert not writer.is_alive()
        else:
            cache["from the loop's thread"] = 1
    assert dict(cache) == {"from the loop's thread": 1, "from a thread": 1}
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


@pytest.mark.parametrize("version", FLAVOURS)
@pytest.mark.parametrize("kind", ["lru", "fifo", "ttl", "tlru"])
def test_a_step_between_any_two_instructions_of_an_eviction_raises_nothing_in_the_app(
    kind: str, version: str
) -> None:
    """A thread that ignores the node's lock evicts (a write to a full cache) while the
    listing takes a step: cachetools' ``popitem`` takes ``next(iter(order))``, and a step
    between the two made the app's write raise ``RuntimeError``. Here the step is taken
    at each bytecode instruction of that ``popitem`` in turn (a trace function stands
    for the thread switch): the write succeeds, and evicts one entry (at worst not the
    one a twin evicts: the rule is that threads hold the node's lock)."""
    timer = Timer()
    own_popitem = type(make_in(version, kind, timer)).popitem.__code__
    at = 0
    while True:
        at += 1
        cache, twin = make_in(version, kind, timer), make_in(version, kind, timer)
        for c in (cache, twin):
            c.update({f"k{i:03d}": i for i in range(c.maxsize)})
        adapter_in(version, cache).mark()
        listing = adapter_in(version, cache).export_paused()
        instructions = 0

        def step_at(frame: Any, event: str, _arg: Any, listing: Any = listing, at: int = at) -> Any:
            nonlocal instructions
            if event == "opcode":
                instructions += 1
                if instructions == at:
                    assert next(listing) is PAUSE  # (the first step, "from the loop")
            return step_at

        def in_popitem(frame: Any, _event: str, _arg: Any) -> Any:
            if frame.f_code is not own_popitem:
                return None
            frame.f_trace_opcodes = True
            return step_at

        tracer = sys.gettrace()
        sys.settrace(in_popitem)
        try:
            cache["new"] = twin["new"] = "written by a thread without the lock"
        finally:
            sys.settrace(tracer)
        assert len(cache) == len(twin), at
        assert "new" in cache, at
        assert len(set(twin) - set(cache)) <= 1, at
        listing.close()
        if instructions < at:  # (the step came after the eviction: every place tried)
            break
    assert at > 5


@pytest.mark.parametrize("version", FLAVOURS)
@pytest.mark.parametrize("kind", ["lru", "fifo", "ttl", "tlru"])
def test_an_eviction_by_cachetools_own_popitem_keeps_the_listing_in_steps(
    kind: str, version: str
) -> None:
    """Only a subclass's own ``popitem`` undoes a listing: cachetools' classes (the
    installed release and the side-loaded one) evict by the listing and it goes on."""
    cache = make_in(version, kind, Timer())
    cache.update({f"k{i:03d}": i for i in range(cache.maxsize)})
    source = adapter_in(version, cache)
    source.mark()
    listing = source.export_paused()
    assert next(listing) is PAUSE
    cache["new"] = 1  # full: evicts
    assert next(listing) is PAUSE  # (a listing undone is made at once: no more pauses)
    listing.close()


@pytest.mark.xfail(
    strict=True,
    reason="cachetools 5.3.0 has no __copy__: copy.copy goes through the tracking class's "
    "__reduce_ex__, whose state shares the cache's dicts, untracked: writes through that "
    "alias change the cache unnoted. Proposed fix: where the base has no __copy__, give the "
    "tracking class one that settles, then makes the same alias but of the tracking class "
    "with the same record of changes (an alias is the same cache), and have _untrack find "
    "such aliases (a weak set in _Changes) to give them back their class too.",
)
def test_writes_through_a_shallow_copy_on_cachetools_5_3_reach_the_delta() -> None:
    """On cachetools 5.3.0 ``copy.copy`` of a cache shares its internals (tracked or
    not): a write through the copy is a write to the cache, and must be in its delta."""
    version = "5.3.0"
    timer = Timer()
    cache = make_in(version, "lru", timer)
    cache.update({f"k{i:03d}": i for i in range(10)})
    source = adapter_in(version, cache)
    mark = source.mark()
    alias = copy.copy(cache)
    alias["through the alias"] = 1
    assert "through the alias" in cache  # (cachetools 5.3.0's own sharing)
    assert ("through the alias", 1, None) in list(source.changed_since(mark))
