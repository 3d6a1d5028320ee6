"""handoff.Counters and its adapter: the API, windows on a fake clock, threads, ownership
(export takes, give back, import adds), hostile records, the warning for plain counts, and
a handoff between two nodes."""

from __future__ import annotations

import collections
import enum
import logging
import math
import operator
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, ClassVar

import pytest

import handoff
from handoff import Counters, ImportResult, InexactCountsWarning
from handoff._adapter import Adapter, Record, SupportsGiveBack
from handoff._registry import adapter_for
from handoff.adapters.counters import (
    EXPIRED,
    IMPORT_ERROR,
    INVALID_REMAINING,
    NOT_AN_INTEGER,
    CountersAdapter,
)
from handoff.discovery import PeerAddress
from tests._helpers import connected, wait_until
from tests._helpers import handoff_node as node
from tests.adapter_contract import AdapterContract, Merge


class Clock:
    """A settable clock for ``Counters(timer=...)``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def windowed(ttl: float = 60.0, now: float = 1000.0) -> tuple[Counters, Clock]:
    clock = Clock(now)
    return Counters(ttl=ttl, timer=clock), clock


# --- the API ------------------------------------------------------------------------------


def test_incr_decr_and_reads() -> None:
    counters = Counters()
    assert counters.incr("page") == 1
    assert counters.incr("page", 9) == 10
    assert counters.decr("page") == 9
    assert counters.decr("other", 2) == -2
    assert counters["page"] == 9
    assert counters["unknown"] == 0
    assert counters.get("unknown") == 0
    assert counters.get("unknown", -1) == -1
    assert counters.get("page", -1) == 9
    assert "page" in counters
    assert "unknown" not in counters
    assert len(counters) == 2
    assert counters.keys() == ["page", "other"]
    assert list(counters) == ["page", "other"]
    assert counters.items() == [("page", 9), ("other", -2)]
    assert counters.total() == 7
    assert counters.remaining("page") is None
    assert counters.ttl is None
    assert repr(counters) == "Counters({'page': 9, 'other': -2})"


def test_reset_removes_the_key_and_returns_what_it_held() -> None:
    counters = Counters()
    counters.incr("a", 5)
    assert counters.reset("a") == 5
    assert "a" not in counters
    assert counters.reset("a") == 0
    assert counters.incr("a") == 1


def test_a_key_back_at_zero_stays_until_reset() -> None:
    counters = Counters()
    counters.incr("a", 2)
    counters.decr("a", 2)
    assert "a" in counters
    assert counters["a"] == 0
    assert len(counters) == 1


class Level(enum.IntEnum):
    HIGH = 3


class Index:
    def __index__(self) -> int:
        return 4


def test_amounts_are_ints() -> None:
    counters = Counters()
    assert counters.incr("a", Level.HIGH) == 3
    assert counters.incr("a", Index()) == 7  # type: ignore[arg-type]
    assert type(counters["a"]) is int
    for bad in (True, False, 1.0, "1", None, 2.5, math.nan):
        with pytest.raises(TypeError, match="counter amounts must be int"):
            counters.incr("a", bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="counter amounts must be int"):
            counters.decr("a", bad)  # type: ignore[arg-type]
    assert counters["a"] == 7


def test_keys_must_be_hashable() -> None:
    counters = Counters()
    with pytest.raises(TypeError, match="counter keys must be hashable, not list"):
        counters.incr(["a"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="counter keys must be hashable, not dict"):
        counters.get({})  # type: ignore[arg-type]
    windowed_counters, _clock = windowed()
    with pytest.raises(TypeError, match="counter keys must be hashable, not set"):
        windowed_counters.incr({1})  # type: ignore[arg-type]
    # The lock was released: the object still works.
    assert counters.incr("a") == 1
    assert windowed_counters.incr("a") == 1


@pytest.mark.parametrize("ttl", [0, -1, math.nan, math.inf, -math.inf, True, "60", [60]])
def test_ttl_must_be_a_positive_finite_number(ttl: Any) -> None:
    with pytest.raises(ValueError, match="ttl must be a positive finite number"):
        Counters(ttl=ttl)


def test_timer_must_be_callable() -> None:
    with pytest.raises(TypeError, match="timer must be callable"):
        Counters(ttl=1, timer=3.0)  # type: ignore[arg-type]


# --- windows, on a fake clock -------------------------------------------------------------


def test_a_window_starts_at_the_first_increment_and_is_fixed() -> None:
    counters, clock = windowed(ttl=60)
    assert counters.incr("ip") == 1
    clock.advance(30)
    assert counters.incr("ip") == 2  # within the window: no restart
    assert counters.remaining("ip") == pytest.approx(30)
    clock.advance(29.9)
    assert counters["ip"] == 2
    clock.advance(0.1)  # 60 s after the first increment
    assert counters["ip"] == 0
    assert counters.get("ip", -1) == -1
    assert "ip" not in counters
    assert counters.remaining("ip") is None
    assert counters.incr("ip") == 1  # a new window
    assert counters.remaining("ip") == pytest.approx(60)


def test_expired_keys_are_purged_lazily() -> None:
    counters, clock = windowed(ttl=10)
    for i in range(100):
        counters.incr(i)
    clock.advance(5)
    counters.incr("late")
    clock.advance(5)  # the first 100 expire
    assert len(counters._values) == 101  # nothing purged yet: reads do not write
    counters.incr("new")  # a new window purges from the front of the order
    assert len(counters._values) < 101
    assert len(counters) == 2  # late and new
    assert counters.items() == [("late", 1), ("new", 1)]
    assert counters.total() == 2
    assert len(counters._values) == len(counters._deadlines) == 2


def test_reset_of_an_expired_key_returns_zero() -> None:
    counters, clock = windowed(ttl=10)
    counters.incr("a", 4)
    clock.advance(10)
    assert counters.reset("a") == 0
    assert counters.incr("a") == 1


# --- threads ------------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [None, 3600.0])
def test_threads_hammering_incr_count_exactly(ttl: float | None) -> None:
    counters = Counters(ttl=ttl)
    threads, per_thread, keys = 8, 5000, ["a", "b", "c"]
    barrier = threading.Barrier(threads)
    interval = sys.getswitchinterval()

    def work(index: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            counters.incr(keys[i % 3], 2)
            counters.decr(keys[(i + index) % 3])

    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        sys.setswitchinterval(interval)
    assert counters.total() == threads * per_thread  # +2 -1 per step
    assert sum(counters[key] for key in keys) == threads * per_thread


def test_exports_from_another_thread_lose_and_double_nothing() -> None:
    counters = Counters()
    adapter = CountersAdapter(counters)
    taken: collections.Counter[str] = collections.Counter()
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            for key, amount, _meta in adapter.export():
                taken[key] += amount

    drainer = threading.Thread(target=drain)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        drainer.start()
        for i in range(30_000):
            counters.incr(f"k{i % 7}")
    finally:
        stop.set()
        drainer.join()
        sys.setswitchinterval(interval)
    for key, amount, _meta in adapter.export():
        taken[key] += amount
    assert sum(taken.values()) == 30_000
    assert len(counters) == 0 or counters.total() == 0


# --- the adapter: export takes ------------------------------------------------------------


def test_track_picks_the_counters_adapter() -> None:
    counters = Counters()
    adapter = adapter_for(counters)
    assert isinstance(adapter, CountersAdapter)
    assert adapter.kind == "counters"
    assert adapter.moves_ownership is True
    assert isinstance(adapter, Adapter)
    assert isinstance(adapter, SupportsGiveBack)
    n = node("n", "127.0.0.2")
    assert isinstance(n.track("usage", counters), CountersAdapter)
    with pytest.raises(TypeError, match=r"adapts handoff\.Counters"):
        CountersAdapter({})  # type: ignore[arg-type]


def test_export_takes_each_amount_as_it_is_yielded() -> None:
    counters = Counters()
    counters.incr("a", 3)
    counters.incr("b", 4)
    counters.incr("zero", 1)
    counters.decr("zero", 1)
    adapter = CountersAdapter(counters)
    assert len(adapter) == 2  # the key holding 0 has nothing to move
    export = adapter.export()
    assert next(export) == ("a", 3, None)
    assert "a" not in counters
    assert counters["b"] == 4  # not yet taken
    counters.incr("a", 5)  # after its export: a fresh amount
    counters.incr("b", 1)  # before its export: goes with it
    counters.incr("c", 1)  # listed after the export began: the next export's
    assert list(export) == [("b", 5, None)]
    assert counters.items() == [("zero", 0), ("a", 5), ("c", 1)]
    assert sorted(adapter.export()) == [("a", 5, None), ("c", 1, None)]
    assert list(adapter.export()) == []
    assert len(adapter) == 0


def test_export_skips_keys_that_vanish_or_expire_meanwhile() -> None:
    counters, clock = windowed(ttl=10)
    counters.incr("a")
    counters.incr("b")
    clock.advance(4)
    counters.incr("late", 2)
    export = CountersAdapter(counters).export()
    assert next(export) == ("a", 1, 6.0)
    counters.reset("b")
    clock.advance(6)  # "a" would have expired now; "late" has 4 s left
    assert list(export) == [("late", 2, 4.0)]


def test_give_back_adds_the_amounts_back() -> None:
    counters, clock = windowed(ttl=60)
    counters.incr("a", 3)
    clock.advance(20)
    adapter = CountersAdapter(counters)
    records = list(adapter.export())
    assert records == [("a", 3, 40.0)]
    counters.incr("a", 2)  # meanwhile: a new window of 60 s
    clock.advance(1)
    adapter.give_back(records)
    assert counters["a"] == 5
    assert counters.remaining("a") == pytest.approx(59)  # the longer window stays
    # Into a key that does not exist: its window is the remaining time, from now.
    other = CountersAdapter(Counters(ttl=60, timer=clock))
    other.give_back(records)
    assert other.counters["a"] == 3
    assert other.counters.remaining("a") == pytest.approx(40)


# --- the adapter: import adds -------------------------------------------------------------


def test_import_adds_to_what_the_receiver_holds() -> None:
    sender, receiver = Counters(), Counters()
    sender.incr("page", 10)
    sender.incr("only-sent", 1)
    receiver.incr("page", 3)
    receiver.incr("only-held", 7)
    result = CountersAdapter(receiver).import_records(list(CountersAdapter(sender).export()))
    assert result == ImportResult(applied=2)
    assert receiver.items() == [("page", 13), ("only-held", 7), ("only-sent", 1)]
    assert len(sender) == 0


def test_windows_travel_as_remaining_time_and_age_shrinks_them() -> None:
    sender, sender_clock = windowed(ttl=60, now=5_000_000.0)
    receiver, receiver_clock = windowed(ttl=60, now=17.0)  # unrelated clocks
    sender.incr("ip", 4)
    sender_clock.advance(50)
    sender.incr("fresh", 1)
    records = list(CountersAdapter(sender).export())
    assert sorted(records) == [("fresh", 1, 60.0), ("ip", 4, 10.0)]
    result = CountersAdapter(receiver).import_records(records, age=2.5)
    assert result == ImportResult(applied=2)
    assert receiver.remaining("ip") == pytest.approx(7.5)
    assert receiver.remaining("fresh") == pytest.approx(57.5)
    receiver_clock.advance(7.5)
    assert receiver["ip"] == 0
    assert receiver["fresh"] == 1


def test_a_record_whose_window_ran_out_is_dropped_as_expired() -> None:
    receiver, _clock = windowed(ttl=60)
    records: list[Record] = [("a", 1, 3.0), ("b", 2, 10.0), ("c", 3, 0.0)]
    result = CountersAdapter(receiver).import_records(records, age=3.0)
    assert result == ImportResult(applied=1, dropped={EXPIRED: 2})
    assert receiver.items() == [("b", 2)]
    # A receiver without windows drops them too: those counts belong to a window now over.
    plain = Counters()
    assert CountersAdapter(plain).import_records(records, age=3.0) == ImportResult(
        applied=1, dropped={EXPIRED: 2}
    )
    assert plain.items() == [("b", 2)]
    assert plain.remaining("b") is None  # and keeps what it takes without expiry


@pytest.mark.parametrize(("held_left", "incoming_left"), [(50.0, 10.0), (10.0, 50.0)])
def test_when_both_hold_a_window_the_longer_remaining_time_wins(
    held_left: float, incoming_left: float
) -> None:
    receiver, clock = windowed(ttl=60)
    receiver.incr("ip", 3)
    clock.advance(60 - held_left)
    result = CountersAdapter(receiver).import_records([("ip", 2, incoming_left)])
    assert result == ImportResult(applied=1)
    assert receiver["ip"] == 5
    longer = max(held_left, incoming_left)
    assert receiver.remaining("ip") == pytest.approx(longer)
    clock.advance(longer - 0.001)
    assert receiver["ip"] == 5  # no count forgotten early
    clock.advance(0.001)
    assert receiver["ip"] == 0


def test_a_window_longer_than_the_receivers_ttl_is_capped_and_none_gets_a_fresh_one() -> None:
    receiver, _clock = windowed(ttl=30)
    records: list[Record] = [("long", 1, 3600.0), ("no-window", 2, None)]
    assert CountersAdapter(receiver).import_records(records) == ImportResult(applied=2)
    assert receiver.remaining("long") == pytest.approx(30)
    assert receiver.remaining("no-window") == pytest.approx(30)


def test_an_imported_window_lengthened_later_still_expires_and_is_purged() -> None:
    receiver, clock = windowed(ttl=60)
    adapter = CountersAdapter(receiver)
    adapter.import_records([("short", 1, 5.0)])
    receiver.incr("other")
    adapter.import_records([("short", 1, 50.0)])  # the longer window: to the end
    clock.advance(49)
    assert receiver["short"] == 2
    clock.advance(11)
    assert receiver["short"] == receiver["other"] == 0
    receiver.incr("new")
    assert len(receiver) == 1


# --- hostile or buggy peers ---------------------------------------------------------------


class Weird:
    def __hash__(self) -> int:
        raise RuntimeError("no hash")


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (("k", "1", None), NOT_AN_INTEGER),
        (("k", 1.0, None), NOT_AN_INTEGER),
        (("k", True, None), NOT_AN_INTEGER),
        (("k", None, None), NOT_AN_INTEGER),
        (("k", [1], None), NOT_AN_INTEGER),
        (("k", 1, "10"), INVALID_REMAINING),
        (("k", 1, math.nan), INVALID_REMAINING),
        (("k", 1, math.inf), INVALID_REMAINING),
        (("k", 1, False), INVALID_REMAINING),
        (("k", 1, [1.0]), INVALID_REMAINING),
        ((["k"], 1, None), IMPORT_ERROR),
        ((Weird(), 1, None), IMPORT_ERROR),
        (("k", 1), IMPORT_ERROR),
        (("k", 1, None, "extra"), IMPORT_ERROR),
        (None, IMPORT_ERROR),
        ("abc", IMPORT_ERROR),
    ],
)
@pytest.mark.parametrize("ttl", [None, 60.0])
def test_an_unusable_record_is_dropped_with_its_reason(
    record: Any, reason: str, ttl: float | None
) -> None:
    receiver = Counters(ttl=ttl, timer=Clock())
    receiver.incr("k", 5)
    result = CountersAdapter(receiver).import_records([record, ("k", 2, 30.0)])
    assert result == ImportResult(applied=1, dropped={reason: 1})
    assert receiver.items() == [("k", 7)]


def test_a_list_record_and_an_int_subclass_are_fine() -> None:
    receiver = Counters()
    result = CountersAdapter(receiver).import_records([["k", 2, None], ("j", Level.HIGH, 1)])  # type: ignore[list-item]
    assert result == ImportResult(applied=2)
    assert receiver.items() == [("k", 2), ("j", 3)]
    assert type(receiver["j"]) is int


# --- the contract every adapter passes ----------------------------------------------------


class TestCountersContract(AdapterContract):
    __test__ = True
    CONFLICT: ClassVar[str] = "add"
    MERGES: ClassVar[bool] = False

    def new_counters(self) -> Counters:
        return Counters()

    def value(self, i: int) -> Any:
        return i + 1

    def changed(self, key: Any) -> Any:
        return 1000 + int(key.rpartition("-")[2])

    def held(self) -> Any:
        return 7

    def write(self, obj: Any, key: Any, value: Any) -> None:
        obj.reset(key)
        obj.incr(key, value)

    def delete(self, obj: Any, key: Any) -> None:
        obj.reset(key)

    def make_source(self, entries: dict[Any, Any]) -> tuple[Any, Adapter]:
        counters = self.new_counters()
        for key, value in entries.items():
            counters.incr(key, value)
        return counters, CountersAdapter(counters)

    def make_empty(self, *, merge: Merge | None = None) -> tuple[Any, Adapter]:
        assert merge is None
        counters = self.new_counters()
        return counters, CountersAdapter(counters)


class TestWindowedCountersContract(TestCountersContract):
    def new_counters(self) -> Counters:
        return Counters(ttl=600, timer=Clock())


# --- plain counts warn --------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [
        collections.Counter(),
        collections.Counter({"page": 10}),
        collections.defaultdict(int),
        {"page": 10, "home": 3},
    ],
    ids=["empty Counter", "Counter", "defaultdict(int)", "dict of ints"],
)
def test_tracking_plain_counts_warns_how_to_count_exactly(
    obj: Any, caplog: pytest.LogCaptureFixture
) -> None:
    n = node("n", "127.0.0.2")
    with (
        caplog.at_level(logging.WARNING, logger="handoff.node"),
        pytest.warns(InexactCountsWarning, match=r"handoff\.Counters") as warned,
    ):
        n.track("usage", obj)
    message = str(warned[0].message)
    assert "merge=operator.add" in message
    assert "copied, not moved" in message
    assert "twice" in message
    assert warned[0].filename == __file__  # points at the track() call
    assert any("handoff.Counters" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("obj", "options"),
    [
        ({}, {}),
        ({"a": "text", "b": 1}, {}),
        ({"a": True}, {}),
        ({"a": 1}, {"merge": operator.add}),
        (collections.Counter({"a": 1}), {"merge": operator.add}),
        (Counters(), {}),
    ],
    ids=["empty dict", "mixed", "bools", "dict with merge", "Counter with merge", "Counters"],
)
def test_no_warning_for_other_mappings_or_a_chosen_merge(obj: Any, options: Any) -> None:
    n = node("n", "127.0.0.2")
    with warnings.catch_warnings():
        warnings.simplefilter("error", InexactCountsWarning)
        n.track("state", obj, **options)


def test_counters_is_exported() -> None:
    assert handoff.Counters is Counters
    assert "Counters" in handoff.__all__
    assert "InexactCountsWarning" in handoff.__all__
    assert Counters.__doc__
    for name in ("incr", "decr", "get", "reset", "keys", "items", "total", "remaining"):
        assert getattr(Counters, name).__doc__, name


# --- two nodes ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_counts_move_to_the_successor_and_add_up() -> None:
    sent, held = Counters(), Counters()
    sent.incr("page", 10)
    sent.incr("home", 2)
    held.incr("page", 3)
    old = node("old", "127.0.0.2", release="v1")
    old.track("usage", sent)
    async with old:
        new = node("new", "127.0.0.3", old, release="v2")
        new.track("usage", held)
        async with new:
            await wait_until(connected(old, new))
            report = await old.drain()
            assert held["page"] == 13
            assert held["home"] == 2
            assert len(sent) == 0
    usage = report.namespaces["usage"]
    assert usage.records == 2
    assert usage.acknowledged == 2
    assert usage.applied == 2
    assert usage.dropped == {}
    assert report.ok


@pytest.mark.anyio
async def test_increments_after_a_manual_drain_go_with_the_catch_up() -> None:
    sent, held = Counters(), Counters()
    sent.incr("page", 10)
    new = node("new", "127.0.0.3", release="v2")
    new.track("usage", held)
    async with new:
        old = node("old", "127.0.0.2", new, release="v1")
        old.track("usage", sent)
        async with old:
            await wait_until(connected(old, new))
            await old.drain()
            assert held["page"] == 10
            # The app keeps serving: the same amount again (equal to the one exported).
            sent.incr("page", 10)
            sent.incr("home", 1)
        assert old.catch_up_report is not None
        assert old.catch_up_report.namespaces["usage"].applied == 2
        assert held.items() == [("page", 20), ("home", 1)]
        assert len(sent) == 0


@pytest.mark.anyio
async def test_counts_with_no_successor_go_to_the_snapshot_and_add_up_at_restore(
    tmp_path: Path,
) -> None:
    first_counts = Counters(ttl=3600)
    first_counts.incr("page", 10)
    first_counts.incr("ip", 4)
    first = node("first", "127.0.0.2", snapshot_dir=tmp_path)
    first.track("usage", first_counts)
    async with first:
        report = await first.drain()
    assert report.namespaces["usage"].snapshotted == 2
    assert len(first_counts) == 0  # taken: they live in the snapshot now

    second_counts = Counters(ttl=3600)
    second_counts.incr("page", 3)
    second = node("second", "127.0.0.2", snapshot_dir=tmp_path)
    second.track("usage", second_counts)
    async with second:
        assert second_counts["page"] == 13
        assert second_counts["ip"] == 4
        left = second_counts.remaining("ip")
        assert left is not None
        assert 3500 < left < 3600  # the window travelled as remaining time


@pytest.mark.anyio
async def test_counts_nobody_takes_are_given_back_and_go_with_the_catch_up() -> None:
    """No successor and no snapshot store: a drain that took the counts gives them back
    (the node keeps serving with them) and the report says they were dropped. At stop the
    catch-up takes them again, with what the app added meanwhile, and the successor that
    joined since gets them all."""
    later = Counters()
    later.incr("page", 1)
    successor = node("successor", "127.0.0.3", release="v2", control_socket="none")
    successor.track("usage", later)
    async with successor:
        counts = Counters()
        counts.incr("page", 10)
        counts.incr("ip", 4)
        alone = node("alone", "127.0.0.2", control_socket="none")
        alone.track("usage", counts)
        async with alone:
            report = await alone.drain()
            assert report.namespaces["usage"].dropped == {"no successor, no snapshot store": 2}
            assert not report.ok
            assert (counts["page"], counts["ip"]) == (10, 4)  # given back
            counts.incr("page", 5)
            # The successor appears (as a DNS poll would find it).
            alone._mesh._spawn(alone._mesh._dial, PeerAddress("127.0.0.3", successor.port))
            await wait_until(lambda: len(alone.peers()) == 1)
        assert alone.catch_up_report is not None
        assert alone.catch_up_report.ok, alone.catch_up_report.summary()
        assert len(counts) == 0
        assert (later["page"], later["ip"]) == (16, 4)
