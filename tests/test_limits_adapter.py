"""The ``limits`` adapter (adapters/limits.py) with the real ``limits`` package.

A limiter on node A's storage spends 4 of ``5/minute``; A's state goes to B's storage; B's
limiter then allows exactly 1 more: through the adapter directly, under each strategy
(fixed window, moving window, sliding window counter), in Flask-Limiter and slowapi apps,
and in a real drain between two nodes on loopback. The wall clock is faked (``limits`` reads
``time.time()``; the nodes keep time with the monotonic clock).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import flask
import httpx
import limits
import limits.storage.memory
import pytest
from fastapi import FastAPI
from flask_limiter import Limiter as FlaskLimiter
from flask_limiter.util import get_remote_address as flask_remote_address
from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)
from slowapi import Limiter as SlowapiLimiter
from slowapi import _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded
from slowapi.util import get_remote_address
from starlette.requests import Request

import handoff.adapters.limits as limits_adapter
from handoff._adapter import Adapter, SupportsGiveBack
from handoff._registry import adapter_for
from handoff.adapters.limits import (
    EXPIRED,
    MALFORMED,
    PERIOD_MISMATCH,
    LimitsAdapter,
    UnsupportedLimits,
)
from tests._helpers import connected, wait_until
from tests._helpers import handoff_node as node

STRATEGIES: dict[str, type[RateLimiter]] = {
    "fixed-window": FixedWindowRateLimiter,
    "moving-window": MovingWindowRateLimiter,
    "sliding-window-counter": SlidingWindowCounterRateLimiter,
}
FIVE_PER_MINUTE = parse("5/minute")
START = 60.0 * 29_000_000 + 5.0  # 5 s into a minute: windows numbered as limits does


class Clock:
    """``time.time`` for limits and the adapter, moved by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock(START)
    monkeypatch.setattr(time, "time", fake)
    return fake


@pytest.fixture
def storages() -> Iterator[tuple[MemoryStorage, MemoryStorage]]:
    made = (MemoryStorage(), MemoryStorage())
    yield made
    for storage in made:
        storage.timer.cancel()


def spend(limiter: RateLimiter, item: RateLimitItem, n: int, who: str = "client") -> None:
    for _ in range(n):
        assert limiter.hit(item, who)


def allowed(limiter: RateLimiter, item: RateLimitItem, who: str = "client") -> int:
    """How many more hits the limiter allows now (it is spent afterwards)."""
    n = 0
    while limiter.hit(item, who):
        n += 1
        assert n <= 100
    return n


def hand_off(
    source: MemoryStorage, target: MemoryStorage, *, age: float = 0.0
) -> tuple[list[Any], Any]:
    records = list(LimitsAdapter(source).export())
    return records, LimitsAdapter(target).import_records(records, age=age)


# -- adapter directly ------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_four_spent_on_a_leave_exactly_one_on_b(
    strategy: str, clock: Clock, storages: tuple[MemoryStorage, MemoryStorage]
) -> None:
    a, b = storages
    spend(STRATEGIES[strategy](a), FIVE_PER_MINUTE, 4)
    clock.advance(10)
    records, result = hand_off(a, b)
    assert len(records) == 1
    assert (result.applied, result.dropped) == (1, {})
    assert allowed(STRATEGIES[strategy](b), FIVE_PER_MINUTE) == 1
    # The export took the window: A starts afresh.
    assert allowed(STRATEGIES[strategy](a), FIVE_PER_MINUTE) == 5


def test_records_carry_relative_times_never_absolute_ones(
    clock: Clock, storages: tuple[MemoryStorage, MemoryStorage]
) -> None:
    a, _ = storages
    spend(FixedWindowRateLimiter(a), FIVE_PER_MINUTE, 2)
    clock.advance(1)
    spend(MovingWindowRateLimiter(a), FIVE_PER_MINUTE, 1, "m")
    clock.advance(2)
    spend(SlidingWindowCounterRateLimiter(a), FIVE_PER_MINUTE, 3, "s")
    clock.advance(4)
    records = sorted(LimitsAdapter(a).export(), key=lambda r: r[2][0])
    key = FIVE_PER_MINUTE.key_for
    assert records == [
        (key("client"), 2, ("fixed", 53.0)),
        (key("m"), [6.0], ("moving", 60.0)),
        (key("s"), 3, ("sliding", 60.0, 48.0)),  # the base key: no window number
    ]
    assert len(LimitsAdapter(a)) == 0


def test_a_fixed_window_keeps_its_remaining_time(
    clock: Clock, storages: tuple[MemoryStorage, MemoryStorage]
) -> None:
    a, b = storages
    spend(FixedWindowRateLimiter(a), FIVE_PER_MINUTE, 4)  # the window resets at START + 60
    clock.advance(20)
    hand_off(a, b, age=5)  # 5 s in flight: 35 s left
    limiter = FixedWindowRateLimiter(b)
    clock.advance(34)
    assert allowed(limiter, FIVE_PER_MINUTE) == 1
    clock.advance(1.5)
    assert allowed(limiter, FIVE_PER_MINUTE) == 5


def test_moving_window_hits_keep_their_ages(
    clock: Clock, storages: tuple[MemoryStorage, MemoryStorage]
) -> None:
    a, b = storages
    for _ in range(4):
        spend(MovingWindowRateLimiter(a), FIVE_PER_MINUTE, 1)
        clock.advance(10)  # hits at 0, 10, 20, 30 s
    records = list(LimitsAdapter(a).export())  # at 40 s
    clock.advance(2)
    LimitsAdapter(b).import_records(records, age=2)  # applied at 42 s
    limiter = MovingWindowRateLimiter(b)
    assert allowed(limiter, FIVE_PER_MINUTE) == 1  # one more, at 42 s
    clock.advance(17.5)  # 59.5 s: the hit at 0 s is still in the window
    assert allowed(limiter, FIVE_PER_MINUTE) == 0
    clock.advance(1)  # 60.5 s: it left the window
    assert allowed(limiter, FIVE_PER_MINUTE) == 1


def test_sliding_window_counts_keep_their_window_meaning(
    clock: Clock, storages: tuple[MemoryStorage, MemoryStorage]
) -> None:
    a, b = storages
    control = MemoryStorage()  # the same hits, never handed off
    control.timer.cancel()
    for storage in (a, control):
        spend(SlidingWindowCounterRateLimiter(storage), FIVE_PER_MINUTE, 4)  # 5 s into a window
    clock.advance(57)  # 2 s into the next window: those 4 are the previous window's
    records, result = hand_off(a, b)
    (record,) = records
    assert record[2][0] == "sliding"
    assert record[2][2] == pytest.approx(-2.0)  # that window ended 2 s ago
    assert result.applied == 1
    # B weighs them as A would have: 4 * 58/60 + 2 = 5.87, floor 5: two more.
    assert allowed(SlidingWindowCounterRateLimiter(control), FIVE_PER_MINUTE) == 2
    assert allowed(SlidingWindowCounterRateLimiter(b), FIVE_PER_MINUTE) == 2
    clock.advance(60)  # a window later the 4 no longer count; the 2 new ones are previous
    later = [(count, meta) for _, count, meta in LimitsAdapter(b).export()]
    assert later == [(2, ("sliding", 60.0, pytest.approx(-2.0)))]


def test_sliding_windows_follow_the_receivers_clock(
    clock: Clock, storages: tuple[MemoryStorage, MemoryStorage]
) -> None:
    a, b = storages
    spend(SlidingWindowCounterRateLimiter(a), FIVE_PER_MINUTE, 4)
    records = list(LimitsAdapter(a).export())
    # B's clock is 20 s behind A's: on A the window is 5 s old, on B it starts in 15 s.
    clock.advance(-20)
    result = LimitsAdapter(b).import_records(records)
    assert result.applied == 1
    (key,) = b.storage
    assert key == f"{FIVE_PER_MINUTE.key_for('client')}/{int(clock.now / 60)}"  # B's current
    assert allowed(SlidingWindowCounterRateLimiter(b), FIVE_PER_MINUTE) == 1


def test_windows_past_their_end_are_dropped_as_expired(
    clock: Clock, storages: tuple[MemoryStorage, MemoryStorage]
) -> None:
    a, b = storages
    spend(FixedWindowRateLimiter(a), FIVE_PER_MINUTE, 4, "fixed")
    spend(MovingWindowRateLimiter(a), FIVE_PER_MINUTE, 4, "moving")
    spend(SlidingWindowCounterRateLimiter(a), FIVE_PER_MINUTE, 4, "sliding")
    records, result = hand_off(a, b, age=121)  # two minutes in a snapshot
    assert len(records) == 3
    assert (result.applied, result.dropped) == (0, {EXPIRED: 3})
    assert len(LimitsAdapter(b)) == 0


def test_counts_of_the_same_window_merge_by_addition(
    clock: Clock, storages: tuple[MemoryStorage, MemoryStorage]
) -> None:
    for strategy in STRATEGIES.values():
        a, b = MemoryStorage(), MemoryStorage()
        try:
            spend(strategy(a), FIVE_PER_MINUTE, 3)
            spend(strategy(b), FIVE_PER_MINUTE, 1)  # B served the client meanwhile
            clock.advance(1)
            hand_off(a, b)
            assert allowed(strategy(b), FIVE_PER_MINUTE) == 1, strategy
        finally:
            a.timer.cancel()
            b.timer.cancel()


def test_a_fixed_window_merged_resets_with_the_later_of_the_two(
    clock: Clock, storages: tuple[MemoryStorage, MemoryStorage]
) -> None:
    a, b = storages
    spend(FixedWindowRateLimiter(a), FIVE_PER_MINUTE, 3)  # resets at 60 s
    clock.advance(30)
    spend(FixedWindowRateLimiter(b), FIVE_PER_MINUTE, 1)  # resets at 90 s
    hand_off(a, b)
    assert b.storage[FIVE_PER_MINUTE.key_for("client")] == 4
    assert b.expirations[FIVE_PER_MINUTE.key_for("client")] == START + 90


def test_moving_window_hits_merge_in_time_order_and_keep_the_newest_amount(
    clock: Clock, storages: tuple[MemoryStorage, MemoryStorage]
) -> None:
    a, b = storages
    for _ in range(4):
        spend(MovingWindowRateLimiter(a), FIVE_PER_MINUTE, 1)
        spend(MovingWindowRateLimiter(b), FIVE_PER_MINUTE, 1)
        clock.advance(1)
    _, result = hand_off(a, b)
    assert result.applied == 1
    hits = b.events[FIVE_PER_MINUTE.key_for("client")]
    assert len(hits) == 5  # the limit's size
    times = [hit.atime for hit in hits]
    assert times == sorted(times, reverse=True)
    assert times == [START + 3, START + 3, START + 2, START + 2, START + 1]
    assert all(hit.expiry == hit.atime + 60 for hit in hits)
    assert allowed(MovingWindowRateLimiter(b), FIVE_PER_MINUTE) == 0


def test_hits_after_an_export_start_afresh_and_go_with_the_next_one(
    clock: Clock, storages: tuple[MemoryStorage, MemoryStorage]
) -> None:
    a, b = storages
    limiter = FixedWindowRateLimiter(a)
    spend(limiter, FIVE_PER_MINUTE, 3)
    adapter = LimitsAdapter(a)
    first = list(adapter.export())
    spend(limiter, FIVE_PER_MINUTE, 1)  # the draining node still serves
    second = list(adapter.export())
    assert [r[1] for r in first] == [3]
    assert [r[1] for r in second] == [1]
    target = LimitsAdapter(b)
    target.import_records(first)
    target.import_records(second)
    assert allowed(FixedWindowRateLimiter(b), FIVE_PER_MINUTE) == 1


def test_export_takes_only_what_it_yielded(
    clock: Clock, storages: tuple[MemoryStorage, MemoryStorage]
) -> None:
    a, _ = storages
    for who in ("x", "y", "z"):
        spend(FixedWindowRateLimiter(a), FIVE_PER_MINUTE, 1, who)
    export = LimitsAdapter(a).export()
    taken = next(export)
    assert len(LimitsAdapter(a)) == 2
    assert a.storage[taken[0]] == 0


def test_hits_from_other_threads_during_exports_are_taken_exactly_once(
    storages: tuple[MemoryStorage, MemoryStorage],
) -> None:
    a, _ = storages
    item = parse("1000000/hour")
    limiter = FixedWindowRateLimiter(a)
    keys = [f"client{i}" for i in range(8)]
    for key in keys:  # limits makes a key's lock on first use, unguarded: make them first
        assert limiter.hit(item, key)
    per_thread = 2000

    def hammer(offset: int) -> None:
        for n in range(per_thread):
            assert limiter.hit(item, keys[(n + offset) % len(keys)])

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    adapter = LimitsAdapter(a)
    taken = 0
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        taken += sum(count for _, count, _ in adapter.export())
    for thread in threads:
        thread.join()
    taken += sum(count for _, count, _ in adapter.export())
    assert taken == len(keys) + len(threads) * per_thread


def test_give_back_merges_the_records_into_the_storage_again(
    clock: Clock, storages: tuple[MemoryStorage, MemoryStorage]
) -> None:
    a, _ = storages
    for name, strategy in STRATEGIES.items():
        spend(strategy(a), FIVE_PER_MINUTE, 3, name)
    adapter = LimitsAdapter(a)
    records = list(adapter.export())
    assert len(LimitsAdapter(a)) == 0
    for name, strategy in STRATEGIES.items():
        spend(strategy(a), FIVE_PER_MINUTE, 1, name)  # hits while the records were away
    adapter.give_back(records)
    for name, strategy in STRATEGIES.items():
        assert allowed(strategy(a), FIVE_PER_MINUTE, name) == 1, name


def test_malformed_records_are_dropped_with_a_reason_and_nothing_raises(
    clock: Clock, storages: tuple[MemoryStorage, MemoryStorage]
) -> None:
    _, b = storages
    key = FIVE_PER_MINUTE.key_for("client")
    hostile: list[Any] = [
        "not a record",
        (key, 1),
        (1, 1, ("fixed", 5.0)),
        (key, 1, None),
        (key, 1, ()),
        (key, 1, ("fixed",)),
        (key, 1, ("fixed", math.nan)),
        (key, 1, ("fixed", math.inf)),
        (key, 0, ("fixed", 5.0)),
        (key, -3, ("fixed", 5.0)),
        (key, True, ("fixed", 5.0)),
        (key, 2**63, ("fixed", 5.0)),
        (key, 1.5, ("fixed", 5.0)),
        (key, 1, ("bogus", 5.0)),
        (key, [], ("moving", 60.0)),
        (key, [1.0, "x"], ("moving", 60.0)),
        (key, [1.0], ("moving", 0.0)),
        (key, [1.0], ("moving", -60.0)),
        (key, [1.0], ("moving", 61.0)),  # not the key's period
        (key, (1.0,), ("moving", 60.0)),
        (f"{key}/29000000", [1.0], ("moving", 60.0)),  # a sliding key
        (key, 1, ("sliding", 61.0, 3.0)),
        (key, 1, ("sliding", 60.0, math.nan)),
        ("no limit in this key", 1, ("sliding", 60.0, 3.0)),
        (f"{key}/29000000", 1, ("sliding", 60.0, 3.0)),  # already numbered
        (key, 1, ("sliding", 60.0)),
        (key, 1, ("sliding", 60.0, 1e308)),
        (key, 1, ("sliding", 60.0, -1e308)),
        (key, 1, ("fixed", 61.0)),  # longer than the key's limit lasts
        ("no limit in this key", 1, ("fixed", 1e308)),
        ("no limit in this key", [1.0], ("moving", 1e308)),
    ]
    result = LimitsAdapter(b).import_records(hostile)
    assert result.total == len(hostile)
    assert (result.applied, dict(result.dropped)) == (0, {MALFORMED: len(hostile)})
    assert len(LimitsAdapter(b)) == 0


def test_a_count_that_would_overflow_is_refused(
    clock: Clock, storages: tuple[MemoryStorage, MemoryStorage]
) -> None:
    _, b = storages
    adapter = LimitsAdapter(b)
    big = limits_adapter.MAX_COUNT
    assert adapter.import_records([("k", big, ("fixed", 5.0))]).applied == 1
    assert adapter.import_records([("k", 1, ("fixed", 5.0))]).dropped == {MALFORMED: 1}
    assert b.storage["k"] == big


def test_moving_hits_of_another_period_are_refused(
    clock: Clock, storages: tuple[MemoryStorage, MemoryStorage]
) -> None:
    _, b = storages
    b.events["custom"] = [limits_adapter._new_entry(START, 10.0)]
    result = LimitsAdapter(b).import_records([("custom", [1.0], ("moving", 20.0))])
    assert result.dropped == {PERIOD_MISMATCH: 1}
    assert LimitsAdapter(b).import_records([("custom", [1.0], ("moving", 10.0))]).applied == 1
    assert [hit.atime for hit in b.events["custom"]] == [START, START - 1.0]


def test_keys_that_are_not_limits_keys_travel_as_they_are(
    clock: Clock, storages: tuple[MemoryStorage, MemoryStorage]
) -> None:
    a, b = storages
    a.incr("my/own/counter/7", 30, amount=2)
    records, result = hand_off(a, b)
    assert records == [("my/own/counter/7", 2, ("fixed", 30.0))]
    assert result.applied == 1
    assert b.get("my/own/counter/7") == 2


# -- registry, packaging, versions -----------------------------------------------------------


def test_track_picks_the_adapter_by_type(storages: tuple[MemoryStorage, MemoryStorage]) -> None:
    adapter = adapter_for(storages[0])
    assert isinstance(adapter, LimitsAdapter)
    assert isinstance(adapter, Adapter)
    assert isinstance(adapter, SupportsGiveBack)
    assert adapter.kind == "limits"
    assert adapter.moves_ownership is True
    with pytest.raises(TypeError):
        LimitsAdapter({})  # type: ignore[arg-type]


def test_importing_handoff_does_not_import_limits() -> None:
    code = "import sys, handoff; from handoff._registry import adapter_for; adapter_for({}); "
    code += "print(sorted(m for m in sys.modules if m.split('.')[0] == 'limits'))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


OLDEST_WHEEL = Path(__file__).resolve().parent / "limits_wheels" / "limits-4.3-py3-none-any.whl"
ON_THE_OLDEST = """
import limits
from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import STRATEGIES
from handoff.adapters.limits import LimitsAdapter

item = parse("5/minute")
for name, strategy in sorted(STRATEGIES.items()):
    a, b = MemoryStorage(), MemoryStorage()
    for _ in range(4):
        assert strategy(a).hit(item, "client")
    records = list(LimitsAdapter(a).export())
    result = LimitsAdapter(b).import_records(records, age=0.5)
    more = 0
    while strategy(b).hit(item, "client"):
        more += 1
    print(limits.__version__, name, records[0][2][0], result.applied, more)
    a.timer.cancel()
    b.timer.cancel()
"""


def test_the_oldest_supported_limits_hands_off_too() -> None:
    # limits 4.3 (the oldest release SUPPORTED_VERSIONS allows), imported from its wheel.
    out = subprocess.run(
        [sys.executable, "-c", ON_THE_OLDEST],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(OLDEST_WHEEL)},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "4.3 fixed-window fixed 1 1",
        "4.3 fixed-window-elastic-expiry fixed 1 1",  # removed in limits 5
        "4.3 moving-window moving 1 1",
        "4.3 sliding-window-counter sliding 1 1",
    ]


def test_an_unknown_release_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "__version__", "6.0.0")
    with pytest.raises(UnsupportedLimits, match=r"limits >=4\.3,<6.*6\.0\.0.*release"):
        limits_adapter._verify()
    monkeypatch.setattr(limits, "__version__", "4.2")
    with pytest.raises(UnsupportedLimits):
        limits_adapter._verify()


def test_an_unknown_layout_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    class Entry:  # hits kept as something else than (atime, expiry)
        def __init__(self, expiry: float) -> None:
            self.at = time.time()
            self.until = self.at + expiry

    monkeypatch.setattr(limits.storage.memory, "Entry", Entry)
    with pytest.raises(UnsupportedLimits, match="moving-window hits"):
        limits_adapter._verify()


# -- Flask-Limiter and slowapi ---------------------------------------------------------------


def _flask_app(strategy: str) -> tuple[flask.Flask, FlaskLimiter]:
    app = flask.Flask(__name__)
    limiter = FlaskLimiter(
        flask_remote_address, app=app, storage_uri="memory://", strategy=strategy
    )

    @app.route("/ping")
    @limiter.limit("5/minute")
    def ping() -> str:
        return "pong"

    return app, limiter


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_flask_limiter_app_keeps_its_limit_across_a_handoff(strategy: str, clock: Clock) -> None:
    old_app, old_limiter = _flask_app(strategy)
    new_app, new_limiter = _flask_app(strategy)
    old_storage, new_storage = old_limiter.storage, new_limiter.storage
    assert isinstance(old_storage, MemoryStorage)
    assert isinstance(new_storage, MemoryStorage)
    try:
        with old_app.test_client() as client:
            assert [client.get("/ping").status_code for _ in range(4)] == [200] * 4
        clock.advance(3)
        _, result = hand_off(old_storage, new_storage)
        assert (result.applied, result.dropped) == (1, {})
        with new_app.test_client() as client:
            assert [client.get("/ping").status_code for _ in range(3)] == [200, 429, 429]
    finally:
        old_storage.timer.cancel()
        new_storage.timer.cancel()


def _slowapi_app(strategy: str) -> tuple[FastAPI, SlowapiLimiter]:
    limiter = SlowapiLimiter(
        key_func=get_remote_address, storage_uri="memory://", strategy=strategy
    )
    app = FastAPI()
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]

    @app.get("/ping")
    @limiter.limit("5/minute")
    async def ping(request: Request) -> dict[str, str]:
        return {"ping": "pong"}

    return app, limiter


async def _statuses(app: FastAPI, n: int) -> list[int]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        return [(await client.get("/ping")).status_code for _ in range(n)]


@pytest.mark.anyio
@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_slowapi_app_keeps_its_limit_across_a_handoff(strategy: str, clock: Clock) -> None:
    old_app, old_limiter = _slowapi_app(strategy)
    new_app, new_limiter = _slowapi_app(strategy)
    old_storage, new_storage = old_limiter._storage, new_limiter._storage
    assert isinstance(old_storage, MemoryStorage)
    assert isinstance(new_storage, MemoryStorage)
    try:
        assert await _statuses(old_app, 4) == [200] * 4
        clock.advance(3)
        _, result = hand_off(old_storage, new_storage)
        assert (result.applied, result.dropped) == (1, {})
        assert await _statuses(new_app, 3) == [200, 429, 429]
    finally:
        old_storage.timer.cancel()
        new_storage.timer.cancel()


# -- a real drain between two nodes ----------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_a_drain_hands_the_limits_to_the_successor(strategy: str, clock: Clock) -> None:
    # The nodes keep time with the monotonic clock; the wall clock (limits') stands still.
    old_storage, new_storage = MemoryStorage(), MemoryStorage()
    limiter = STRATEGIES[strategy]
    spend(limiter(old_storage), FIVE_PER_MINUTE, 4)
    spend(limiter(old_storage), FIVE_PER_MINUTE, 2, "other client")
    old = node("old", "127.0.0.2", release="v1")
    old.track("limits", old_storage)
    try:
        async with old:
            new = node("new", "127.0.0.3", old, release="v2")
            new.track("limits", new_storage)
            async with new:
                await wait_until(connected(old, new))
                report = await old.drain()
                # Before new leaves: it would hand the limits on (to nobody here).
                assert allowed(limiter(new_storage), FIVE_PER_MINUTE) == 1
                assert allowed(limiter(new_storage), FIVE_PER_MINUTE, "other client") == 3
    finally:
        old_storage.timer.cancel()
        new_storage.timer.cancel()
    limits_report = report.namespaces["limits"]
    assert limits_report.records == 2
    assert limits_report.acknowledged == 2
    assert limits_report.applied == 2
    assert limits_report.dropped == {}
    assert report.ok
    assert len(LimitsAdapter(old_storage)) == 0


@pytest.mark.anyio
@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_a_drain_with_nobody_to_take_the_windows_gives_them_back(
    strategy: str, clock: Clock
) -> None:
    storage = MemoryStorage()
    limiter = STRATEGIES[strategy](storage)
    try:
        spend(limiter, FIVE_PER_MINUTE, 4)
        lonely = node("lonely", "127.0.0.2")
        lonely.track("limits", storage)
        async with lonely:
            report = await lonely.drain()  # no successor, no snapshot store
            # The engine gave the windows back: the node keeps limiting with them.
            assert allowed(limiter, FIVE_PER_MINUTE) == 1
    finally:
        storage.timer.cancel()
    windows = report.namespaces["limits"]
    assert (windows.records, windows.dropped) == (1, {"no successor, no snapshot store": 1})


@pytest.mark.anyio
async def test_windows_wait_in_a_snapshot_with_their_time_running(tmp_path: Path) -> None:
    # The real clock: the snapshot's age comes from the wall clock the engine was given.
    first_storage, second_storage = MemoryStorage(), MemoryStorage()
    key = FIVE_PER_MINUTE.key_for("client")
    try:
        spend(FixedWindowRateLimiter(first_storage), FIVE_PER_MINUTE, 4)
        resets_at = first_storage.expirations[key]
        first = node("first", "127.0.0.2", snapshot_dir=tmp_path)
        first.track("limits", first_storage)
        async with first:
            pass  # alone: the drain writes a snapshot
        assert first.last_drain_report is not None
        assert first.last_drain_report.namespaces["limits"].snapshotted == 1
        await anyio.sleep(0.3)  # in the snapshot
        second = node("second", "127.0.0.2", snapshot_dir=tmp_path)
        second.track("limits", second_storage)
        async with second:
            assert "snapshot" in second.warm_reason
            assert second_storage.storage[key] == 4
            # It resets when it would have on the first node (not 0.3 s later).
            assert second_storage.expirations[key] == pytest.approx(resets_at, abs=0.1)
            assert allowed(FixedWindowRateLimiter(second_storage), FIVE_PER_MINUTE) == 1
    finally:
        first_storage.timer.cancel()
        second_storage.timer.cancel()
