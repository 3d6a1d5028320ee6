"""Ownership (DESIGN.md): who may take state and when, and reports that never hide a loss.

Nodes in one process on 127.0.0.x: receiver-side drops reach the sender's report (issue 7),
a draining node answers 503 and refuses offers, writes after a manual drain are caught up
at stop (or reported), and successors are chosen by start time where releases do not sort.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from cachetools import LRUCache, TTLCache

from handoff.engine import compare_releases, successor_tiers
from handoff.engine._sender import KEPT_OLDER
from handoff.membership import Peer
from handoff.protocol import NodeState
from tests._helpers import connected, wait_until
from tests._helpers import handoff_node as node

pytestmark = pytest.mark.anyio

# -- receiver-side drops reach the sender -----------------------------------------------------


async def test_a_failing_upgrade_hook_makes_the_senders_report_not_ok() -> None:
    old = node("old", "127.0.0.2", release="v1")
    old.track("items", {i: i for i in range(10)}, version=1)
    received: dict[int, Any] = {}
    async with old:
        new = node("new", "127.0.0.3", old, release="v2")
        new.track("items", received, version=2)

        @new.upgrade("items", 1)
        def broken(key: Any, value: Any) -> tuple[Any, Any]:
            raise KeyError("schema")

        async with new:
            await wait_until(connected(old, new))
            report = await old.drain()
    ns = report.namespaces["items"]
    assert ns.acknowledged == 10  # acknowledged: the successor answered for every record ...
    assert ns.receiver_dropped == {"transform failed: KeyError": 10}  # ... by dropping it
    assert report.dropped == 0
    assert report.receiver_dropped == report.lost == 10
    assert not report.ok
    assert report.as_dict()["ok"] is False
    assert "dropped there: 10 transform failed: KeyError" in report.summary()


async def test_expired_entries_and_a_full_receiver_show_on_the_sender() -> None:
    now = [0.0]
    # Entries with 10 ns left: whatever the transfer takes, they are expired on arrival.
    expiring: TTLCache[str, str] = TTLCache(maxsize=100, ttl=10, timer=lambda: now[0])
    for i in range(5):
        expiring[f"e{i}"] = "x"
    now[0] = 10 - 1e-8
    many: LRUCache[str, int] = LRUCache(maxsize=100)
    many.update((f"k{i}", i) for i in range(50))
    old = node("old", "127.0.0.2")
    old.track("short", expiring)
    old.track("many", many)
    small: LRUCache[str, int] = LRUCache(maxsize=10)
    async with old:
        new = node("new", "127.0.0.3", old, release="v2")
        new.track("short", TTLCache(maxsize=100, ttl=10))
        new.track("many", small)
        async with new:
            await wait_until(connected(old, new))
            report = await old.drain()
    assert report.namespaces["short"].receiver_dropped == {"expired": 5}
    assert report.namespaces["many"].receiver_dropped == {"receiver full": 40}
    assert len(small) == 10
    assert not report.ok
    summary = report.summary()
    assert "5 expired" in summary
    assert "40 receiver full" in summary


async def test_a_refusal_is_named_in_the_summary_of_what_was_dropped() -> None:
    old = node("old", "127.0.0.2", release="v1")
    old.track("items", {i: i for i in range(5)}, version=2)
    async with old:
        older = node("older", "127.0.0.3", old, release="v0")
        older.track("items", {}, version=1)
        async with older:
            await wait_until(connected(old, older))
            report = await old.drain()
    ns = report.namespaces["items"]
    assert ns.dropped == {"no successor, no snapshot store": 5}
    assert "older" in ns.refusals
    # The one-line summary names the refusal, not only "no successor".
    assert "refused by older:" in report.summary()
    assert "@node.downgrade('items', 2)" in report.summary()


# -- a draining node -------------------------------------------------------------------------


async def test_a_draining_node_answers_503_and_takes_nothing() -> None:
    held = {i: i for i in range(20)}
    leaving = node("leaving", "127.0.0.2", warmup_timeout=0.01)
    leaving.track("n", {i: -i for i in range(100, 120)})
    async with leaving:
        await leaving.wait_warm()
        assert leaving.readiness()[0] == 200
        other = node("other", "127.0.0.3", leaving)
        other.track("n", held)
        async with other:
            await wait_until(connected(leaving, other))
            await leaving.drain()  # nobody else serves: other takes leaving's records
            status, body = leaving.readiness()
            assert status == 503
            assert body["ready"] is False
            assert body["state"] == "draining"
            assert "draining" in str(body["reason"])
            await wait_until(lambda: all(not p.serving for p in other.peers()))
            report = await other.drain()
    # A draining node takes nothing: other had nobody to give its records to.
    ns = report.namespaces["n"]
    assert ns.dropped == {"no successor, no snapshot store": 40}
    assert ns.acknowledged == 0
    assert ns.successors == []


# -- writes after a manual drain ---------------------------------------------------------------


async def test_writes_after_a_manual_drain_are_caught_up_at_stop() -> None:
    cache: dict[str, Any] = {f"k{i}": i for i in range(100)}
    received: dict[str, Any] = {}
    new = node("new", "127.0.0.3", release="v2")
    new.track("cache", received)
    async with new:
        old = node("old", "127.0.0.2", new)
        old.track("cache", cache)
        async with old:
            await wait_until(connected(old, new))
            first = await old.drain()  # handoff drain in a preStop hook
            assert first.namespaces["cache"].acknowledged == 100
            cache["late"] = "written after the drain"  # the app still serves
            cache["k1"] = "updated after the drain"
        report = old.catch_up_report
        assert report is not None
        assert report.reason == "catch-up"
        ns = report.namespaces["cache"]
        assert ns.records == 2  # exactly what was written after the drain
        assert ns.acknowledged == 2
        assert ns.applied == 1  # "late" arrives ...
        # ... the update does not (successors never overwrite), and the report says so.
        assert ns.receiver_dropped == {KEPT_OLDER: 1}
        assert not report.ok
        assert "written after the drain, the successor kept its older copy" in report.summary()
    assert received["late"] == "written after the drain"
    assert received["k1"] == 1


async def test_no_catch_up_when_nothing_was_written_after_the_drain(tmp_path: Path) -> None:
    lonely = node("lonely", "127.0.0.2", snapshot_dir=tmp_path)
    lonely.track("cache", {"a": [1, 2], "b": {"c": 3}})  # unhashable values, too
    async with lonely:
        report = await lonely.drain()
        assert report.namespaces["cache"].snapshotted == 2
    assert lonely.catch_up_report is not None
    assert lonely.catch_up_report.records == 0
    assert len(list(tmp_path.glob("*.snapshot"))) == 1  # noqa: ASYNC240 - a test's tmp dir


async def test_writes_after_a_manual_drain_with_nobody_to_take_them_are_reported() -> None:
    cache: dict[str, Any] = {"a": 1}
    lonely = node("lonely", "127.0.0.2")
    lonely.track("cache", cache)
    async with lonely:
        await lonely.drain()
        cache["b"] = 2
    report = lonely.catch_up_report
    assert report is not None
    # Only "b": "a" was exported by the drain (and reported dropped there).
    assert report.namespaces["cache"].dropped == {"no successor, no snapshot store": 1}
    assert not report.ok
    assert report.summary().startswith("catch-up of lonely")


LARGE = 300_000


async def test_the_catch_up_of_a_large_unchanged_cache_keeps_the_event_loop_turning() -> None:
    # At stop after a manual drain, finding what changed scans every record: in one pull
    # that stopped the loop (and every heartbeat) for seconds at a million records, and
    # the successor dropped the link before the catch-up could reach it (the benchmark's
    # manual drain showed it: "dropped v2: ... nothing heard from the peer for 3.0 s").
    cache: dict[str, Any] = {f"k{i}": i for i in range(LARGE)}
    received: dict[str, Any] = {}
    longest = 0.0

    async def tick() -> None:
        nonlocal longest
        last = time.monotonic()
        while True:
            await anyio.sleep(0.005)
            now = time.monotonic()
            longest, last = max(longest, now - last), now

    new = node("new", "127.0.0.3", release="v2")
    new.track("cache", received)
    async with anyio.create_task_group() as ticker, new:
        old = node("old", "127.0.0.2", new)
        old.track("cache", cache)
        async with old:
            await wait_until(connected(old, new))
            await old.drain()
            cache["late"] = "written after the drain"
            ticker.start_soon(tick)
        # Left: the stop ran the catch-up.
        ticker.cancel_scope.cancel()
    report = old.catch_up_report
    assert report is not None
    assert report.namespaces["cache"].records == 1
    assert report.ok, report.summary()
    assert received["late"] == "written after the drain"
    # Scanned in slices now; what is left is the one sort of the drain's log (~0.2-0.4 s
    # here). Before, the whole scan was one pull: 1.5 s.
    assert longest < 0.9, f"the event loop stood still for {longest:.2f} s"


# -- successor choice --------------------------------------------------------------------------


def test_release_names_compare_only_where_they_tell() -> None:
    assert compare_releases("v2", "v10") == -1
    assert compare_releases("1.2.10", "1.2.9") == 1
    assert compare_releases("2024-01-05", "2024-01-10") == -1
    assert compare_releases("1.2", "1.2.1") == -1
    assert compare_releases("v3", "v3") == 0
    assert compare_releases("f00dbee", "a11ce55") is None  # git SHAs
    assert compare_releases("main-abc123", "main-abd456") is None
    ulids = ("deployment-01JZ8X3Q9M0000000000000000", "deployment-01JZ8X3Q9N0000000000000000")
    assert compare_releases(*ulids) == -1


def _peer(name: str, release: str, started_at: float, *, serving: bool = True) -> Peer:
    return Peer(
        name=name,
        release=release,
        address="",
        state=NodeState.SERVING if serving else NodeState.DRAINING,
        namespaces={},
        started_at=started_at,
        incarnation="x",
        protocol_version=1,
        clock_offset=0.0,
    )


def test_start_time_orders_successors_whose_releases_do_not_compare() -> None:
    # This node runs f00dbee since t=100. a11ce55 started later: the new deploy, though
    # its name sorts first. c0ffee1 started before: the old one. Draining peers never.
    peers = [
        _peer("old", "c0ffee1", 50.0),
        _peer("new", "a11ce55", 200.0),
        _peer("sibling", "f00dbee", 90.0),
        _peer("leaving", "a11ce55", 300.0, serving=False),
    ]
    tiers = successor_tiers("f00dbee", peers, local_started_at=100.0)
    assert [[p.name for p in tier] for tier in tiers] == [["new"], ["sibling"], ["old"]]
