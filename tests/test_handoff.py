"""Draining and handing off state between nodes in one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from cachetools import TTLCache

import handoff
from handoff import ConfigError
from handoff._adapter import ImportResult
from handoff.adapters.mapping import MappingAdapter
from tests._helpers import connected, wait_until
from tests._helpers import handoff_node as node

pytestmark = pytest.mark.anyio


async def test_dict_moves_to_the_successor_and_the_report_adds_up() -> None:
    source = {f"k{i}": {"n": i, "blob": "x" * 100} for i in range(5000)}
    target = {"k1": "receiver's own, newer", "mine": 1}
    old = node("old", "127.0.0.2", release="v1")
    old.track("users", source)
    async with old:
        new = node("new", "127.0.0.3", old, release="v2")
        new.track("users", target)
        async with new:
            await wait_until(connected(old, new))
            report = await old.drain()
            assert await new.wait_warm() == "received a handoff from old"
    users = report.namespaces["users"]
    assert users.records == 5000
    assert users.acknowledged == 5000
    assert users.applied == 4999
    assert users.kept_existing == 1
    assert users.dropped == {}
    assert users.successors == ["new"]
    assert users.complete
    assert report.ok
    assert target["k1"] == "receiver's own, newer"
    assert target["mine"] == 1
    assert {k: v for k, v in target.items() if k not in ("k1", "mine")} == {
        k: v for k, v in source.items() if k != "k1"
    }
    assert old.last_drain_report is report
    assert '"acknowledged": 5000' in report.to_json()


async def test_leaving_async_with_drains() -> None:
    source = {i: i * i for i in range(100)}
    target: dict[int, int] = {}
    new = node("new", "127.0.0.3")
    new.track("squares", target)
    async with new:
        old = node("old", "127.0.0.2", new)
        old.track("squares", source)
        async with old:
            await wait_until(connected(old, new))
        assert old.last_drain_report is not None
        assert target == source


async def test_one_old_node_three_new_ones_each_get_every_key_by_default() -> None:
    """Spread "all", the default for a cache: behind a round-robin balancer every new node
    sees every key. Each holds every entry that fits its size: the smallest one the
    hottest 1000, and the report says what it dropped."""
    source: TTLCache[str, int] = TTLCache(maxsize=3000, ttl=300)
    source.update({f"user:{i}": i for i in range(3000)})
    hottest = {f"user:{i}" for i in range(2000, 3000)}  # the most recently written
    old = node("old", "127.0.0.2", release="v1")
    old.track("users", source)
    async with old:
        targets: list[TTLCache[str, int]] = [
            TTLCache(maxsize=size, ttl=300) for size in (3000, 3000, 1000)
        ]
        news = [node(f"new{i}", f"127.0.0.{3 + i}", old, release="v2") for i in range(3)]
        for new, target in zip(news, targets, strict=True):
            new.track("users", target)
        async with news[0], news[1], news[2]:
            await wait_until(lambda: len(old.peers()) == 3)
            report = await old.drain()
    assert dict(targets[0]) == dict(targets[1]) == dict(source)
    assert set(targets[2]) == hottest
    ns = report.namespaces["users"]
    assert (ns.spread, ns.records, ns.acknowledged) == ("all", 3000, 3000)
    assert sorted(ns.successors) == ["new0", "new1", "new2"]
    assert ns.per_successor["new2"].dropped == {"receiver full": 2000}
    assert ns.per_successor["new0"].applied == ns.per_successor["new1"].applied == 3000
    assert report.records == report.acknowledged + report.snapshotted + report.dropped


def test_spread_all_is_refused_for_counters_and_unknown_spreads() -> None:
    one = node("one", "127.0.0.2")
    with pytest.raises(ConfigError, match="moves ownership"):
        one.track("usage", handoff.Counters(), spread="all")
    with pytest.raises(ConfigError, match="spread of 'c' must be one of 'split', 'all'"):
        one.track("c", {}, spread="everywhere")  # type: ignore[arg-type]
    one.track("usage", handoff.Counters(), spread="split")
    assert one.tracked["usage"].effective_spread == "split"
    one.track("cache", {})
    assert one.tracked["cache"].effective_spread == "all"


async def test_one_old_node_three_new_ones_split_keys_by_rendezvous() -> None:
    source = {f"user:{i}": i for i in range(3000)}
    old = node("old", "127.0.0.2", release="v1")
    old.track("users", source, spread="split")
    async with old:
        targets: list[dict[str, int]] = [{} for _ in range(3)]
        news = [node(f"new{i}", f"127.0.0.{3 + i}", old, release="v2") for i in range(3)]
        for new, target in zip(news, targets, strict=True):
            new.track("users", target)
        async with news[0], news[1], news[2]:
            await wait_until(lambda: len(old.peers()) == 3)
            report = await old.drain()
    union: dict[str, int] = {}
    for target in targets:
        assert not set(union) & set(target), "a key landed on two successors"
        union.update(target)
    assert union == source
    sizes = sorted(len(t) for t in targets)
    assert sizes[0] > 700, sizes  # even within reason: 1000 expected each
    assert sorted(report.namespaces["users"].successors) == ["new0", "new1", "new2"]


async def test_newer_release_is_preferred_over_same_and_older() -> None:
    source = {i: i for i in range(200)}
    old = node("mid", "127.0.0.2", release="v2")
    old.track("n", source)
    stores: dict[str, dict[int, int]] = {"older": {}, "same": {}, "newer": {}}
    releases = {"older": "v1", "same": "v2", "newer": "v10"}
    async with old:
        others = [node(n, f"127.0.0.{3 + i}", old, release=releases[n])
                  for i, n in enumerate(stores)]  # fmt: skip
        for other in others:
            other.track("n", stores[other.name])
        async with others[0], others[1], others[2]:
            await wait_until(lambda: len(old.peers()) == 3)
            await old.drain()
    assert stores["newer"] == source
    assert stores["same"] == stores["older"] == {}


async def test_no_successor_without_snapshot_store_counts_drops() -> None:
    lonely = node("lonely", "127.0.0.2")
    lonely.track("users", {"a": 1, "b": 2})
    async with lonely:
        report = await lonely.drain()
    assert report.namespaces["users"].dropped == {"no successor, no snapshot store": 2}
    assert not report.ok


async def test_no_successor_snapshot_then_restore_through_upgrade_chain(tmp_path: Path) -> None:
    first = node("first", "127.0.0.2", snapshot_dir=tmp_path)
    first.track("users", {f"u{i}": f"name{i}" for i in range(1000)}, version=1)
    async with first:
        report = await first.drain()
    assert report.namespaces["users"].snapshotted == 1000
    assert report.ok
    (written,) = tmp_path.glob("*.snapshot")  # noqa: ASYNC240 - a test's own tmp dir

    restored: dict[str, Any] = {}
    second = node("second", "127.0.0.2", snapshot_dir=tmp_path)
    second.track("users", restored, version=3)

    @second.upgrade("users", 1)
    def v1_to_v2(key: Any, value: Any) -> tuple[Any, Any]:
        return key, {"name": value}

    @second.upgrade("users", 2)
    def v2_to_v3(key: Any, value: Any) -> tuple[Any, Any]:
        return key, {**value, "v": 3}

    async with second:
        assert second.is_warm
        assert "snapshot" in second.warm_reason
        assert not written.exists()  # removed once restored
    assert restored["u7"] == {"name": "name7", "v": 3}
    assert len(restored) == 1000
    # Leaving drained again, with nobody to take it: a new snapshot, now at version 3.
    assert second.last_drain_report is not None
    assert second.last_drain_report.namespaces["users"].snapshotted == 1000


async def test_rollback_downgrades_on_the_sender() -> None:
    new_state = {f"u{i}": {"name": f"n{i}", "email": f"e{i}"} for i in range(50)}
    old_state: dict[str, Any] = {}
    rolled_back = node("v1-node", "127.0.0.3", release="v1")
    rolled_back.track("users", old_state, version=1)
    async with rolled_back:
        leaving = node("v3-node", "127.0.0.2", rolled_back, release="v1")
        leaving.track("users", new_state, version=3)

        @leaving.downgrade("users", 3)
        def v3_to_v2(key: Any, value: Any) -> tuple[Any, Any]:
            return key, {"name": value["name"]}

        @leaving.downgrade("users", 2)
        def v2_to_v1(key: Any, value: Any) -> tuple[Any, Any]:
            return key, value["name"]

        async with leaving:
            await wait_until(connected(rolled_back, leaving))
            report = await leaving.drain()
    assert report.namespaces["users"].acknowledged == 50
    assert old_state == {k: v["name"] for k, v in new_state.items()}


async def test_missing_step_is_refused_and_the_next_tier_takes_it() -> None:
    source = {i: str(i) for i in range(100)}
    cannot: dict[int, str] = {}
    can: dict[int, str] = {}
    old = node("old", "127.0.0.2", release="v1")
    old.track("n", source, version=1)
    async with old:
        newer = node("newer", "127.0.0.3", old, release="v2")
        newer.track("n", cannot, version=3)  # no upgrade hooks: cannot read v1

        @newer.upgrade("n", 2)
        def only_second_step(key: Any, value: Any) -> tuple[Any, Any]:
            return key, value

        same = node("same", "127.0.0.4", old, release="v1")
        same.track("n", can, version=1)
        async with newer, same:
            await wait_until(lambda: len(old.peers()) == 2)
            report = await old.drain()
    ns = report.namespaces["n"]
    assert "no upgrade hook for 'n' from version 1 to 2" in ns.refusals["newer"]
    assert cannot == {}
    assert can == source
    assert ns.successors == ["same"]


class SlowAdapter(MappingAdapter):
    """Applies like the mapping adapter, but takes its time (a receiver under load)."""

    delay = 0.2

    def import_records(self, records: Any, *, age: float = 0.0) -> ImportResult:
        import time

        time.sleep(self.delay)  # blocking on purpose: the receiver is busy applying
        return super().import_records(records, age=age)


async def test_slow_receiver_drain_ends_by_its_deadline(tmp_path: Path) -> None:
    source = {i: "v" * 100 for i in range(50_000)}
    received: dict[int, str] = {}
    slow = node("slow", "127.0.0.3")
    slow.track("n", received, adapter=SlowAdapter(received))
    async with slow:
        old = node("old", "127.0.0.2", slow, snapshot_dir=tmp_path)
        old.track("n", source)
        async with old:
            await wait_until(connected(old, slow))
            started = anyio.current_time()
            report = await old.drain(timeout=2.0)
            elapsed = anyio.current_time() - started
    ns = report.namespaces["n"]
    # Both nodes share one event loop here, which the receiver's blocking apply holds for
    # its delay: the deadline can be overshot by one apply, plus scheduling on a busy box.
    # (The multi-process deadline tests measure the bound without this handicap.)
    assert elapsed < 2.0 + SlowAdapter.delay + 0.5
    assert ns.acknowledged > 0
    assert ns.snapshotted > 0
    assert ns.complete
    assert ns.acknowledged + ns.snapshotted + sum(ns.dropped.values()) == 50_000


async def test_ttl_and_lru_order_survive() -> None:
    clock_a = [1000.0]
    clock_b = [5.0]  # the two machines' clocks have nothing in common
    source: TTLCache[str, int] = TTLCache(maxsize=100, ttl=60, timer=lambda: clock_a[0])
    for i in range(10):
        source[f"k{i}"] = i
        clock_a[0] += 1  # at drain time k0 has 50 s left, k9 59 s
    _ = source["k3"]  # k3 is now the most recently used
    target: TTLCache[str, int] = TTLCache(maxsize=100, ttl=300, timer=lambda: clock_b[0])
    new = node("new", "127.0.0.3")
    new.track("c", target)
    async with new:
        old = node("old", "127.0.0.2", new)
        old.track("c", source)
        async with old:
            await wait_until(connected(old, new))
            await old.drain()
        # (Reading values through the cache would refresh their recency: only membership
        # tests and popitem() below, which leave the order alone.)
        assert set(target) == {f"k{i}" for i in range(10)}
        clock_b[0] += 49.5
        assert "k0" in target
        clock_b[0] += 1  # past the 50 s k0 had left at the sender, though the receiver's ttl is 300
        assert "k0" not in target
        assert "k1" in target
        # Least recently used first, as on the sender: k1 .. k9 with k3 moved to the end.
        popped = [target.popitem() for _ in range(len(target))]
        assert [key for key, _ in popped] == ["k1", "k2", "k4", "k5", "k6", "k7", "k8", "k9", "k3"]
        assert all(value == int(key[1:]) for key, value in popped)


async def test_missing_step_with_nobody_else_goes_to_the_snapshot(tmp_path: Path) -> None:
    old = node("old", "127.0.0.2", release="v1", snapshot_dir=tmp_path)
    old.track("n", {i: i for i in range(100)}, version=1)
    async with old:
        newer = node("newer", "127.0.0.3", old, release="v2")
        newer.track("n", {}, version=2)  # and no @newer.upgrade("n", 1)
        async with newer:
            await wait_until(connected(old, newer))
            report = await old.drain()
    ns = report.namespaces["n"]
    assert "add @node.upgrade('n', 1)" in ns.refusals["newer"]
    assert ns.snapshotted == 100
    assert ns.acknowledged == 0
    assert ns.complete


async def test_a_failing_upgrade_hook_drops_only_its_records() -> None:
    source = {i: i for i in range(300)}
    received: dict[int, Any] = {}
    old = node("old", "127.0.0.2", release="v1")
    old.track("n", source, version=1)
    async with old:
        new = node("new", "127.0.0.3", old, release="v2")
        new.track("n", received, version=2)

        @new.upgrade("n", 1)
        def picky(key: Any, value: Any) -> tuple[Any, Any]:
            if key % 3 == 0:
                raise ValueError("cannot convert multiples of three")
            return key, {"v": value}

        async with new:
            await wait_until(connected(old, new))
            report = await old.drain()
    ns = report.namespaces["n"]
    assert ns.acknowledged == 300
    assert ns.applied == 200
    assert ns.receiver_dropped == {"transform failed: ValueError": 100}
    assert report.lost == 100
    assert received == {k: {"v": v} for k, v in source.items() if k % 3}


async def test_a_corrupt_snapshot_is_moved_aside_and_the_node_starts_cold(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = node("first", "127.0.0.2", snapshot_dir=tmp_path)
    first.track("users", {f"u{i}": i for i in range(500)})
    async with first:
        await first.drain()
    (written,) = tmp_path.glob("*.snapshot")  # noqa: ASYNC240 - a test's own tmp dir
    data = bytearray(written.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of a chunk
    written.write_bytes(bytes(data))

    restored: dict[str, int] = {}
    second = node("second", "127.0.0.2", snapshot_dir=tmp_path, warmup_timeout=0.2)
    second.track("users", restored)
    async with second:
        assert await second.wait_warm() == "warm-up timeout (0.2 s)"
        assert restored == {}
        assert not written.exists()
        assert list((tmp_path / "corrupt").glob("*.snapshot"))
    assert "not restored" in caplog.text or "unusable" in caplog.text


async def test_successor_is_warm_only_once_every_namespace_arrived() -> None:
    first: dict[int, int] = {}
    second: dict[int, int] = {}
    seen_when_warm: list[tuple[int, int]] = []
    new = node("new", "127.0.0.3")
    new.track("a-first", first)
    new.track("b-second", second)
    async with new, anyio.create_task_group() as tg:

        async def watch() -> None:
            await new.wait_warm()
            seen_when_warm.append((len(first), len(second)))

        tg.start_soon(watch)
        old = node("old", "127.0.0.2", new)
        old.track("a-first", {i: i for i in range(3000)})
        old.track("b-second", {i: i for i in range(3000)})
        async with old:
            await wait_until(connected(old, new))
            await old.drain()
            with anyio.fail_after(5):
                await new.wait_warm()
    assert seen_when_warm == [(3000, 3000)]
    assert new.warm_reason == "received a handoff from old"


async def test_cancelled_app_still_drains() -> None:
    received: dict[int, int] = {}
    new = node("new", "127.0.0.3")
    new.track("n", received)
    async with new:
        old = node("old", "127.0.0.2", new)
        old.track("n", {i: i for i in range(1000)})
        with anyio.CancelScope() as app:
            async with old:
                await wait_until(connected(old, new))
                app.cancel()  # the app is cancelled while the node is up
                await anyio.sleep(10)  # never reached: cancelled here
        assert old.last_drain_report is not None
        assert old.last_drain_report.namespaces["n"].acknowledged == 1000
    assert len(received) == 1000


async def test_each_downgrade_hook_runs_once_per_record_even_when_some_fail() -> None:
    calls: list[int] = []
    received: dict[int, Any] = {}
    older = node("older", "127.0.0.3", release="v1")
    older.track("n", received, version=1)
    async with older:
        newer = node("newer", "127.0.0.2", older, release="v1")
        newer.track("n", {i: {"v": i} for i in range(100)}, version=2)

        @newer.downgrade("n", 2)
        def flaky(key: Any, value: Any) -> tuple[Any, Any]:
            calls.append(key)
            if key % 5 == 0:
                raise ValueError("no old form for multiples of five")
            return key, value["v"]

        async with newer:
            await wait_until(connected(older, newer))
            report = await newer.drain()
    ns = report.namespaces["n"]
    assert sorted(calls) == list(range(100))  # hooks are not re-run to pair survivors
    assert ns.dropped == {"transform failed: ValueError": 20}
    assert ns.acknowledged == 80
    assert received == {i: i for i in range(100) if i % 5}
