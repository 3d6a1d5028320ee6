"""Cluster-scoped counters: reads that add the peers' reports, the reports themselves
(Tallies, with fake links), and three nodes converging within the documented bound."""

from __future__ import annotations

import bisect
import math
import threading
import time
from typing import Any

import anyio
import anyio.to_thread
import pytest

from handoff import Counters, ProtocolError
from handoff._codec import Codec
from handoff._errors import ConnectionClosed
from handoff.adapters.counters import CountersAdapter
from handoff.engine import Tracked
from handoff.engine._tally import FULL_EVERY, Tallies
from handoff.membership import Peer
from handoff.protocol import Message, NodeState, Tally
from tests._helpers import connected, wait_until
from tests._helpers import handoff_node as node


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cluster(**options: Any) -> tuple[Counters, CountersAdapter]:
    counters = Counters(scope="cluster", **options)
    return counters, CountersAdapter(counters)


# --- reads ---------------------------------------------------------------------------------


def test_reads_add_what_peers_reported() -> None:
    counters, adapter = cluster()
    counters.incr("page", 2)
    assert (
        adapter.apply_tally(("b", "i1"), 1, [("page", 10, None), ("home", 1, None)], full_from=0)
        == 0
    )
    adapter.apply_tally(("c", "i2"), 1, [("page", 5, None)], full_from=0)
    assert counters["page"] == 17
    assert counters.get("home") == 1
    assert counters.get("nowhere", -1) == -1
    assert counters.local("page") == 2
    assert counters.local("home") == 0
    assert counters.local_items() == [("page", 2)]
    assert counters.incr("page") == 18  # incr returns the cluster-wide value
    assert counters.decr("home") == 0
    assert "home" in counters
    assert "nowhere" not in counters
    assert sorted(counters.items()) == [("home", 0), ("page", 18)]
    assert len(counters) == 2
    assert counters.total() == 18
    assert counters.reset("page") == 3  # only this node's share
    assert counters["page"] == 15
    adapter.forget("b")
    assert counters["page"] == 5
    assert counters.scope == "cluster"
    assert counters.interval == 0.5
    assert adapter.tally_interval == 0.5
    assert CountersAdapter(Counters()).tally_interval is None


def test_a_later_report_replaces_and_an_older_one_is_ignored() -> None:
    counters, adapter = cluster()
    origin = ("b", "i1")
    adapter.apply_tally(origin, 5, [("k", 10, None), ("j", 1, None)], full_from=0)
    adapter.apply_tally(origin, 5, [("k", 99, None)], full_from=0)  # duplicate
    adapter.apply_tally(origin, 3, [("k", 7, None), ("j", 50, None)], full_from=0)  # reordered
    assert counters["k"] == 10
    assert counters["j"] == 1
    adapter.apply_tally(origin, 6, [("k", 12, None)], full_from=0)  # absolute, not added
    assert counters["k"] == 12
    adapter.apply_tally(origin, 7, [("k", 0, None)], full_from=0)  # none left there
    assert counters["k"] == 0
    assert "k" not in counters
    adapter.apply_tally(origin, 4, [("k", 3, None)], full_from=0)  # older than the 0
    assert counters["k"] == 0


def test_a_full_report_drops_keys_it_did_not_refresh() -> None:
    counters, adapter = cluster()
    origin = ("b", "i1")
    adapter.apply_tally(origin, 1, [("gone", 4, None), ("kept", 1, None)], full_from=0)
    adapter.apply_tally(origin, 2, [("kept", 2, None)], full_from=0)  # first chunk
    adapter.apply_tally(origin, 3, [("new", 3, None)], full_from=2)  # last chunk
    assert sorted(counters.items()) == [("kept", 2), ("new", 3)]
    assert len(counters._views[origin]) == 2  # nothing kept for the dropped key


def test_a_restarted_peer_replaces_its_former_life() -> None:
    counters, adapter = cluster()
    adapter.apply_tally(("b", "old"), 9, [("k", 5, None)], full_from=0)
    adapter.apply_tally(("b", "new"), 1, [("k", 2, None)], full_from=0)
    assert counters["k"] == 2
    assert list(counters._views) == [("b", "new")]


def test_reported_windows_expire_on_the_receivers_clock() -> None:
    clock = Clock()
    counters, adapter = cluster(timer=clock)
    adapter.apply_tally(("b", "i"), 1, [("ip", 4, 10.0), ("forever", 1, None)], full_from=0)
    clock.now += 9.9
    assert counters["ip"] == 4
    clock.now += 0.1
    assert counters["ip"] == 0
    assert counters.items() == [("forever", 1)]


@pytest.mark.parametrize(
    "record",
    [
        ("k", "1", None),
        ("k", True, None),
        ("k", 1.5, None),
        ("k", 1, "soon"),
        ("k", 1, math.nan),
        ("k", 1, False),
        (["k"], 1, None),
        ("k", 1),
        None,
    ],
)
def test_an_unusable_reported_record_is_refused_not_raised(record: Any) -> None:
    counters, adapter = cluster()
    assert adapter.apply_tally(("b", "i"), 1, [record, ("ok", 1, None)], full_from=0) == 1
    assert counters.items() == [("ok", 1)]


def test_own_reports_delta_then_full() -> None:
    clock = Clock()
    counters, adapter = cluster(ttl=60, timer=clock)
    counters.incr("a", 2)
    counters.incr("b", 1)
    clock.now += 10
    assert sorted(adapter.tally(full=False)) == [("a", 2, 50.0), ("b", 1, 50.0)]
    assert adapter.tally(full=False) == []  # each change once
    counters.incr("a")
    counters.reset("b")
    assert sorted(adapter.tally(full=False), key=str) == [("a", 3, 50.0), ("b", 0, None)]
    taken = list(adapter.export())
    assert taken == [("a", 3, 50.0)]
    assert adapter.tally(full=False) == [("a", 0, None)]  # moved away: none left here
    adapter.import_records([("c", 7, 5.0)])
    assert adapter.tally(full=False) == [("c", 7, 5.0)]
    counters.incr("z")
    assert sorted(adapter.tally(full=True)) == [("c", 7, 5.0), ("z", 1, 60.0)]


def test_scope_and_interval_are_checked() -> None:
    with pytest.raises(ValueError, match="scope must be"):
        Counters(scope="global")
    for bad in (0, -1, math.inf, math.nan, True, "1"):
        with pytest.raises(ValueError, match="interval must be"):
            Counters(scope="cluster", interval=bad)  # type: ignore[arg-type]


# --- reports between nodes, with fake links -----------------------------------------------


class FakeLink:
    def __init__(self, *, fail: bool = False) -> None:
        self.sent: list[Message] = []
        self.fail = fail

    async def send(self, message: Message, *, time_limit: float | None = None) -> None:
        if self.fail:
            raise ConnectionClosed("gone")
        self.sent.append(message)


def peer(name: str, version: int = 1, incarnation: str = "x") -> Peer:
    return Peer(name, "v1", "", NodeState.SERVING, {"usage": version}, 0.0, incarnation, 1, 0.0)


class Side:
    """One node's counters and Tallies, its peers given by hand."""

    def __init__(self, name: str, **options: Any) -> None:
        self.name = name
        self.counters = Counters(scope="cluster")
        self.adapter = CountersAdapter(self.counters)
        self.peers: list[tuple[Peer, FakeLink]] = []
        self.tallies = Tallies(
            incarnation=f"inc-{name}",
            tracked={"usage": Tracked("usage", self.counters, self.adapter, 1)},
            codec=Codec(),
            peers=lambda: self.peers,
            **options,
        )

    async def report(self) -> None:
        tracked, adapter, _interval = self.tallies.scoped()[0]
        await self.tallies.report(tracked, adapter)


async def deliver(link: FakeLink, to: Side, sender: str) -> None:
    for message in link.sent:
        assert isinstance(message, Tally)
        await to.tallies.handle(sender, message)
    link.sent.clear()


@pytest.mark.anyio
async def test_a_new_peer_gets_a_full_report_then_deltas() -> None:
    a, b = Side("a"), Side("b")
    link = FakeLink()
    a.peers = [(peer("b"), link)]
    a.counters.incr("x", 3)
    a.counters.incr("y", 1)
    await a.report()
    (full,) = link.sent
    assert isinstance(full, Tally)
    assert full.full_from == full.seq  # a one-piece full report
    assert full.incarnation == "inc-a"
    await deliver(link, b, "a")
    assert b.counters["x"] == 3
    await a.report()
    assert link.sent == []  # nothing changed, nothing sent
    a.counters.incr("x")
    await a.report()
    (delta,) = link.sent
    assert isinstance(delta, Tally)
    assert delta.full_from == 0
    assert delta.records == 1
    await deliver(link, b, "a")
    assert b.counters["x"] == 4
    assert b.counters.local("x") == 0


@pytest.mark.anyio
async def test_a_failed_send_is_repaired_by_a_full_report() -> None:
    a, b = Side("a"), Side("b")
    link = FakeLink()
    a.peers = [(peer("b"), link)]
    a.counters.incr("x")
    await a.report()
    await deliver(link, b, "a")
    a.counters.incr("x")
    a.counters.reset("x")
    a.counters.incr("lost", 5)
    link.fail = True
    await a.report()  # the delta is lost
    link.fail = False
    await a.report()  # nothing changed since, but the peer missed one: full
    (full,) = link.sent
    assert isinstance(full, Tally)
    assert full.full_from
    await deliver(link, b, "a")
    assert b.counters.items() == [("lost", 5)]  # "x" is gone there too


class LosingLink(FakeLink):
    """Delivers, but the link is reported lost while the send is under way."""

    def __init__(self, tallies: Tallies, peer: str) -> None:
        super().__init__()
        self.tallies, self.peer, self.lose = tallies, peer, True

    async def send(self, message: Message, *, time_limit: float | None = None) -> None:
        await super().send(message, time_limit=time_limit)
        if self.lose:
            self.lose = False
            self.tallies.peer_lost(self.peer)


@pytest.mark.anyio
async def test_a_full_report_sent_as_the_link_went_is_sent_again() -> None:
    a = Side("a")
    link = LosingLink(a.tallies, "b")
    a.peers = [(peer("b"), link)]
    a.counters.incr("x")
    await a.report()
    await a.report()  # the peer's next link has not had a full report yet
    assert [m.full_from != 0 for m in link.sent if isinstance(m, Tally)] == [True, True]


@pytest.mark.anyio
async def test_every_peer_gets_a_full_report_now_and_then() -> None:
    a = Side("a")
    link = FakeLink()
    a.peers = [(peer("b"), link)]
    a.counters.incr("x")
    fulls = 0
    for _ in range(2 * FULL_EVERY):
        await a.report()
        fulls += sum(1 for m in link.sent if isinstance(m, Tally) and m.full_from)
        link.sent.clear()
    assert fulls == 3  # the first, and every FULL_EVERY-th


@pytest.mark.anyio
async def test_large_reports_go_in_pieces_within_the_bounds() -> None:
    a, b = Side("a", max_records=3, max_bytes=200), Side("b")
    link = FakeLink()
    a.peers = [(peer("b"), link)]
    for i in range(10):
        a.counters.incr(f"key-{i}-" + "x" * 30, i + 1)
    await a.report()
    tallies = [m for m in link.sent if isinstance(m, Tally)]
    assert len(tallies) >= 4
    assert all(m.records <= 3 and len(m.payload) <= 200 for m in tallies)
    assert [m.full_from for m in tallies[:-1]] == [0] * (len(tallies) - 1)
    assert tallies[-1].full_from == tallies[0].seq
    assert [m.seq for m in tallies] == sorted({m.seq for m in tallies})
    await deliver(link, b, "a")
    assert b.counters.total() == sum(range(1, 11))


@pytest.mark.anyio
async def test_only_peers_tracking_the_namespace_at_this_version_hear() -> None:
    a = Side("a")
    same, other_version = FakeLink(), FakeLink()
    elsewhere = FakeLink()
    stranger = Peer("d", "v1", "", NodeState.SERVING, {"users": 1}, 0.0, "x", 1, 0.0)
    a.peers = [(peer("b"), same), (peer("c", version=2), other_version), (stranger, elsewhere)]
    a.counters.incr("x")
    await a.report()
    assert len(same.sent) == 1
    assert other_version.sent == elsewhere.sent == []


@pytest.mark.anyio
async def test_a_peer_lost_is_forgotten_and_gets_a_full_report_again() -> None:
    a, b = Side("a"), Side("b")
    a_to_b = FakeLink()
    a.peers = [(peer("b"), a_to_b)]
    a.counters.incr("x", 2)
    await a.report()
    await deliver(a_to_b, b, "a")
    assert b.counters["x"] == 2
    b.tallies.peer_lost("a")
    assert b.counters["x"] == 0
    a.tallies.peer_lost("b")  # its side of the same link
    await a.report()
    (full,) = a_to_b.sent
    assert isinstance(full, Tally)
    assert full.full_from


class GatedCodec(Codec):
    """Decodes only once ``gate`` is set (in the worker thread), after saying it began."""

    def __init__(self) -> None:
        super().__init__()
        self.began = threading.Event()
        self.gate = threading.Event()

    def decode_records(self, payload: bytes, *, max_records: int) -> list[Any]:
        self.began.set()
        self.gate.wait(5)
        return super().decode_records(payload, max_records=max_records)


@pytest.mark.anyio
async def test_a_report_decoded_across_the_links_end_is_not_applied() -> None:
    a, b = Side("a"), Side("b")
    codec = GatedCodec()
    b.tallies._codec = codec
    link = FakeLink()
    a.peers = [(peer("b"), link)]
    a.counters.incr("x", 2)
    await a.report()
    (message,) = link.sent
    assert isinstance(message, Tally)
    async with anyio.create_task_group() as group:
        group.start_soon(b.tallies.handle, "a", message)
        await anyio.to_thread.run_sync(codec.began.wait, 5)
        b.tallies.peer_lost("a")  # while the worker thread decodes
        codec.gate.set()
    assert b.counters["x"] == 0
    await b.tallies.handle("a", message)  # on a link that is up: applied
    assert b.counters["x"] == 2


@pytest.mark.anyio
async def test_a_malformed_report_is_a_protocol_error() -> None:
    b = Side("b")
    payload, _ = Codec().encode_records([("x", 1, None)])
    with pytest.raises(ProtocolError, match="says 2 records"):
        await b.tallies.handle("a", Tally("usage", "i", 1, 0, 2, payload))
    with pytest.raises(ProtocolError, match="Tally of 'usage'"):
        await b.tallies.handle("a", Tally("usage", "i", 1, 0, 1, b"\xc1garbage"))
    with pytest.raises(ProtocolError, match="Tally of 'usage'"):
        await b.tallies.handle("a", Tally("usage", "i", 1, 0, 0, payload))  # more than said
    # Unknown or local namespaces: ignored.
    await b.tallies.handle("a", Tally("elsewhere", "i", 1, 0, 1, payload))
    assert b.counters.total() == 0


# --- three nodes ---------------------------------------------------------------------------

INTERVAL = 0.05
# The documented bound is one interval plus one round trip (the time a report takes to be
# sent, decoded and applied); the margin is that round trip on a busy test machine.
BOUND = INTERVAL + 0.5


@pytest.mark.anyio
async def test_three_nodes_counting_concurrently_converge_within_the_bound() -> None:
    counters = [Counters(scope="cluster", interval=INTERVAL) for _ in range(3)]
    history: list[tuple[float, int]] = [(0.0, 0)]  # (time, increments so far)
    samples: list[tuple[float, int]] = []  # (time, what a node read)
    a = node("a", "127.0.0.2")
    a.track("usage", counters[0])
    async with a:
        b = node("b", "127.0.0.3", a)
        b.track("usage", counters[1])
        async with b:
            c = node("c", "127.0.0.4", a, b)
            c.track("usage", counters[2])
            async with c:
                await wait_until(connected(a, b, c))
                history[0] = (time.monotonic(), 0)

                async def count(index: int) -> None:
                    for i in range(60):
                        counters[index].incr("requests", 1 + (i % 3))
                        history.append((time.monotonic(), history[-1][1] + 1 + (i % 3)))
                        samples.append((time.monotonic(), counters[index]["requests"]))
                        await anyio.sleep(0.005)

                async with anyio.create_task_group() as group:
                    for index in range(3):
                        group.start_soon(count, index)
                stopped = time.monotonic()
                total = history[-1][1]
                assert total == 3 * 20 * (1 + 2 + 3)
                await wait_until(lambda: all(x["requests"] == total for x in counters), BOUND)
                converged = time.monotonic() - stopped
    assert converged <= BOUND
    # No read ever saw more than was counted, nor missed more than the last BOUND seconds.
    times = [t for t, _ in history]
    for when, seen in samples:
        at_most = history[bisect.bisect_right(times, when) - 1][1]
        at_least = history[max(0, bisect.bisect_right(times, when - BOUND) - 1)][1]
        assert at_least <= seen <= at_most


@pytest.mark.anyio
async def test_a_handoff_keeps_the_cluster_total_exact() -> None:
    counters = [Counters(scope="cluster", interval=INTERVAL) for _ in range(3)]
    a = node("a", "127.0.0.2", release="v1")
    a.track("usage", counters[0])
    async with a:
        b = node("b", "127.0.0.3", a, release="v2")
        b.track("usage", counters[1])
        async with b:
            c = node("c", "127.0.0.4", a, b, release="v2")
            c.track("usage", counters[2])
            async with c:
                await wait_until(connected(a, b, c))
                counters[0].incr("page", 10)
                counters[1].incr("page", 3)
                counters[2].incr("page", 1)
                await wait_until(lambda: all(x["page"] == 14 for x in counters), BOUND)
                report = await a.drain()
                assert report.ok
                assert counters[0].local("page") == 0
                assert counters[1].local("page") + counters[2].local("page") == 14
                # Within the bound every node reads the exact total again.
                await wait_until(lambda: all(x["page"] == 14 for x in counters), BOUND)
            # c went down: its share leaves the others' totals (it took its count along).
            await wait_until(lambda: counters[1]["page"] == 14 - counters[2].local("page"))


@pytest.mark.anyio
async def test_a_report_that_fails_is_logged_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = Side("a")
    calls = 0

    def broken(*, full: bool) -> list[Any]:
        nonlocal calls
        calls += 1
        raise RuntimeError("adapter bug")

    a.adapter.tally = broken  # type: ignore[method-assign]
    a.counters._interval = 0.01
    with anyio.move_on_after(0.2):
        await a.tallies.run()
    assert calls > 2
    assert "could not report 'usage'" in caplog.text
