"""handoff.ActorRegistry on real nodes in one process (loopback): routing, placement
changes, drains, snapshots, versions, idle deactivation, errors and bounds.

The exactly-once / single-activation properties under faults are in test_actors_sim.py; the
multi-process deploys in test_actors_multiprocess.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

import handoff
from handoff import ActorBusy, ActorFailed, ActorRegistry, ActorUnavailable, ConfigError
from tests._helpers import connected, wait_until
from tests._helpers import handoff_node as node

pytestmark = pytest.mark.anyio


class Tally:
    """Counts what it is told; ``state`` is the list of messages it handled."""

    def __init__(self, key: Any, state: Any) -> None:
        self.key = key
        self.seen: list[Any] = list(state or [])

    async def handle(self, message: Any) -> Any:
        if message == "boom":
            raise ValueError("boom")
        if message == "read":
            return list(self.seen)
        self.seen.append(message)
        return len(self.seen)

    def state(self) -> Any:
        return self.seen


class SyncTally(Tally):
    def handle(self, message: Any) -> Any:
        self.seen.append(message)
        return len(self.seen)


KEYS = [f"room{i}" for i in range(24)]


async def test_a_call_from_any_node_reaches_the_one_owner() -> None:
    ra, rb = ActorRegistry(Tally), ActorRegistry(Tally)
    a = node("a", "127.0.0.1")
    a.track("rooms", ra)
    async with a:
        b = node("b", "127.0.0.1", a)
        b.track("rooms", rb)
        async with b:
            await wait_until(connected(a, b))
            for round_ in range(3):
                for key in KEYS:
                    caller = ra if hash((key, round_)) % 2 else rb
                    assert await caller.call(key, (key, round_)) == round_ + 1
            held_a, held_b = set(ra.local_keys()), set(rb.local_keys())
            assert held_a | held_b == set(KEYS)
            assert not held_a & held_b
            assert held_a  # placement spreads the keys
            assert held_b
            for key in KEYS:
                assert ra.owner(key) == rb.owner(key) == ("a" if key in held_a else "b")
            assert ra.stats()["activations"] + rb.stats()["activations"] == len(KEYS)


async def test_one_way_sends_are_handled_once_in_order() -> None:
    # Whichever node owns a key runs its factory: the sync handler on b, the async one on a.
    ra, rb = ActorRegistry(Tally), ActorRegistry(SyncTally)
    a = node("a", "127.0.0.1")
    a.track("rooms", ra)
    async with a:
        b = node("b", "127.0.0.1", a)
        b.track("rooms", rb)
        async with b:
            await wait_until(connected(a, b))
            for key in ("room1", "room2"):
                for n in range(150):
                    await ra.send(key, n)
                    await rb.send(key, 1000 + n)
            # A send returns once queued: wait until every one was answered.
            await wait_until(lambda: ra.stats()["unanswered"] == rb.stats()["unanswered"] == 0)
            for key in ("room1", "room2"):
                seen = await ra.call(key, "read")
                assert [n for n in seen if n < 1000] == list(range(150))
                assert [n for n in seen if n >= 1000] == list(range(1000, 1150))
            assert sorted(ra.local_keys() + rb.local_keys()) == ["room1", "room2"]


async def test_a_failing_handler_raises_for_its_caller_and_the_actor_goes_on() -> None:
    registry = ActorRegistry(Tally)
    a = node("a", "127.0.0.1")
    a.track("rooms", registry)
    async with a:
        assert await registry.call("r", "one") == 1
        with pytest.raises(ActorFailed, match="ValueError: boom"):
            await registry.call("r", "boom")
        assert await registry.call("r", "two") == 2
        assert await registry.call("r", "read") == ["one", "two"]


async def test_a_new_node_takes_the_keys_placement_gives_it_with_their_state() -> None:
    ra, rb, rc = ActorRegistry(Tally), ActorRegistry(Tally), ActorRegistry(Tally)
    a = node("a", "127.0.0.1")
    a.track("rooms", ra)
    async with a:
        b = node("b", "127.0.0.1", a)
        b.track("rooms", rb)
        async with b:
            await wait_until(connected(a, b))
            for key in KEYS:
                await ra.call(key, 1)
            c = node("c", "127.0.0.1", a, b, release="v2")
            c.track("rooms", rc)
            async with c:
                await wait_until(connected(a, b, c))
                await wait_until(lambda: len(rc.local_keys()) > 0, limit=10)
                await wait_until(
                    lambda: all(ra.owner(k) == rb.owner(k) == rc.owner(k) for k in KEYS), 10
                )
                # Every actor kept its count wherever it lives now: nothing restarted.
                for key in KEYS:
                    assert await rc.call(key, 2) == 2
                keys = [ra.local_keys(), rb.local_keys(), rc.local_keys()]
                assert sorted(k for held in keys for k in held) == sorted(KEYS)


async def test_a_drain_moves_every_actor_and_reports_it() -> None:
    ra, rb, rc = ActorRegistry(Tally), ActorRegistry(Tally), ActorRegistry(Tally)
    a = node("a", "127.0.0.1")
    a.track("rooms", ra)
    async with a:
        b = node("b", "127.0.0.1", a)
        b.track("rooms", rb)
        async with b:
            c = node("c", "127.0.0.1", a, b)
            c.track("rooms", rc)
            await c.start()
            await wait_until(connected(a, b, c))
            for key in KEYS:
                await rb.call(key, "x")
            held_by_a = len(ra.local_keys())
            assert held_by_a > 0
            report = await a.drain()
            rooms = report.namespaces["rooms"]
            assert report.ok, report.summary()
            assert rooms.records == rooms.acknowledged == held_by_a
            assert ra.local_keys() == []
            assert sorted(rb.local_keys() + rc.local_keys()) == sorted(KEYS)
            for key in KEYS:
                assert await rc.call(key, "y") == 2
            await c.stop()


async def test_actors_nobody_can_take_go_to_the_snapshot_store_and_come_back(
    tmp_path: Path,
) -> None:
    first = ActorRegistry(Tally)
    a = node("a", "127.0.0.1", snapshot_dir=tmp_path)
    a.track("rooms", first)
    async with a:
        for key in KEYS[:5]:
            await first.call(key, "before")
        report = await a.drain()
    assert report.namespaces["rooms"].snapshotted == 5, report.summary()
    second = ActorRegistry(Tally)
    b = node("b", "127.0.0.1", snapshot_dir=tmp_path)
    b.track("rooms", second)
    async with b:
        assert sorted(second.local_keys()) == sorted(KEYS[:5])
        for key in KEYS[:5]:
            assert await second.call(key, "after") == 2
            assert await second.call(key, "read") == ["before", "after"]


async def test_a_moved_actors_state_goes_through_the_upgrade_hooks() -> None:
    old, new = ActorRegistry(Tally), ActorRegistry(Tally)
    a = node("a", "127.0.0.1", release="v1")
    a.track("rooms", old, version=1)
    async with a:
        for key in KEYS[:4]:
            await old.call(key, "v1-message")
        b = node("b", "127.0.0.1", a, release="v2")
        b.track("rooms", new, version=2)

        @b.upgrade("rooms", 1)
        def tag(key: Any, value: Any) -> tuple[Any, Any]:
            return key, [*value, "upgraded"]

        async with b:
            await wait_until(connected(a, b))
            report = await a.drain()
            assert report.ok, report.summary()
            for key in KEYS[:4]:
                assert await new.call(key, "read") == ["v1-message", "upgraded"]


async def test_idle_actors_are_deactivated_and_keep_their_state() -> None:
    registry = ActorRegistry(Tally, idle_timeout=0.05)
    a = node("a", "127.0.0.1")
    a.track("rooms", registry)
    async with a:
        for key in KEYS[:3]:
            await registry.call(key, "first")
        await wait_until(lambda: registry.stats()["active"] == 0, limit=5)
        assert registry.stats()["actors"] == 3
        assert await registry.call(KEYS[0], "second") == 2
        assert registry.stats()["active"] == 1


async def test_bounds_give_clear_errors() -> None:
    release = anyio.Event()

    class Slow(Tally):
        async def handle(self, message: Any) -> Any:
            await release.wait()
            return await super().handle(message)

    registry = ActorRegistry(Slow, outbox=4, timeout=0.3)
    a = node("a", "127.0.0.1")
    a.track("rooms", registry)
    async with a:
        for n in range(3):
            await registry.send("r", n)
        with pytest.raises(handoff.ActorTimeout, match="stays queued"):
            await registry.call("other", "late", timeout=0.1)
        with pytest.raises(ActorBusy, match="4 messages to actors of 'rooms' await an answer"):
            await registry.send("r", 3)
        release.set()
        await wait_until(lambda: registry.stats()["unanswered"] == 0)
        assert await registry.call("r", "read") == [0, 1, 2]
        # The call that timed out was still handled, once.
        assert await registry.call("other", "read") == ["late"]


async def test_a_registry_says_what_is_wrong() -> None:
    with pytest.raises(ConfigError, match="factory"):
        ActorRegistry("not callable")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="mailbox"):
        ActorRegistry(Tally, mailbox=0)
    with pytest.raises(ConfigError, match="timeout"):
        ActorRegistry(Tally, timeout=-1)
    loose = ActorRegistry(Tally)
    with pytest.raises(ActorUnavailable, match="not tracked by a node"):
        await loose.call("k", 1)
    a = node("a", "127.0.0.1")
    a.track("rooms", loose)
    with pytest.raises(ConfigError, match="tracked already"):
        node("b", "127.0.0.1").track("rooms2", loose)
    async with a:
        with pytest.raises(TypeError, match="not hashable"):
            await loose.call(["a", "list"], 1)
        with pytest.raises(handoff.RecordEncodeError):
            await loose.call("k", object())


async def test_a_holder_missing_from_discovery_is_learned_from_its_peers_never_doubled() -> None:
    """A draining node leaves DNS (Fly, Kubernetes) while it still holds actors: a node
    that starts then does not find it through discovery. It learns it from the peers it
    does find (they share the peers they are linked to), and activates nothing fresh
    before it has linked it: every key keeps one activation and its state."""
    ra, rc, rn = ActorRegistry(Tally), ActorRegistry(Tally), ActorRegistry(Tally)
    a = node("a", "127.0.0.1")
    a.track("rooms", ra)
    async with a:
        c = node("c", "127.0.0.1", a)
        c.track("rooms", rc)
        async with c:
            await wait_until(connected(a, c))
            for key in KEYS:
                assert await rc.call(key, "before") == 1
            assert rc.local_keys()  # c holds some of them
            n = node("n", "127.0.0.1", a)  # discovery gives a only
            n.track("rooms", rn)
            async with n:
                for key in KEYS:
                    assert await rn.call(key, "after") == 2, key
                held = [set(r.local_keys()) for r in (ra, rc, rn)]
                assert sorted(k for keys in held for k in keys) == sorted(KEYS)
                assert ra.stats()["activations"] + rc.stats()["activations"] == len(KEYS)
                assert rn.stats()["activations"] == len(held[2])  # moved in, none fresh
