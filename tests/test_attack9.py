"""Attack 9 on exactly-once counters (issue 9): each finding is a test here.

Most tests run the real engine over the fake network of ``tests/test_engine_unit.py`` (no
sockets, time moves only when every task is blocked): see its module documentation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from handoff import Counters
from handoff._codec import Codec
from handoff._errors import SnapshotError
from handoff.adapters.counters import CountersAdapter
from handoff.engine._restore import restore_snapshots
from handoff.protocol import Ack, Chunk, Closed, End, Message
from handoff.snapshot import DirectorySnapshotStore, _DirectoryWriter
from handoff.transforms import Transforms
from tests._helpers import wait_all_tasks_blocked
from tests.test_engine_unit import (
    CLUSTER,
    Wire,
    assert_adds_up,
    chunk_total,
    counts,
    network,
    small_chunks,
    tally,
    total,
    track,
)

__all__ = ("small_chunks",)  # the fake network's autouse fixture: chunks of 16 records

pytestmark = pytest.mark.anyio


async def test_finding_9a_a_chunk_never_sent_at_the_streaming_deadline_is_not_lost() -> None:
    """Finding 9a. The first successor's link blocks (a full buffer) on its first chunk: the
    drain waits on that send until the end of the streaming time, then that link drops. The
    drain then flushes the other successor's queued records: it has credit, so ``_flush``
    recorded the chunk as in flight (bound to it) and ``_send`` refused it, out of time,
    failing the stream *without* sending anything. The chunk stayed bound: reported
    "outcome unknown: sent to <peer>", never given back nor snapshotted, and the peer's
    stream was left open (no Cancel). Counts nobody ever received vanished."""
    held = counts("k", 20)
    expected = total(held)
    async with network() as net:
        a = net.node("a", tally("usage", dict(held)))
        b = net.node("b", tally("usage", {}), release="v2")
        c = net.node("c", tally("usage", {}), release="v2")
        net.connect(a, b, c)
        a_b, a_c = net.wire(a, b), net.wire(a, c)
        blocked: list[str] = []

        def block_first_chunk(wire: Wire) -> Callable[[Message], None]:
            def on_send(message: Message) -> None:
                if isinstance(message, Chunk) and not blocked:
                    blocked.append(wire.dst.name)
                    wire.block()

            return on_send

        a_b.on_send, a_c.on_send = block_first_chunk(a_b), block_first_chunk(a_c)
        report = await net.finish(net.start(lambda: a.drain(time_limit=10.0)))

    assert blocked
    other = {"b": c, "c": b}[blocked[0]]
    to_other = net.wire(a, other)
    assert_adds_up(report)
    ns = report.namespaces["usage"]
    unknown = [reason for reason in ns.dropped if reason.startswith("outcome unknown")]
    # Nothing sent to the other successor lacks an answer: every chunk it got, it acknowledged.
    assert [m.seq for m in to_other.delivered if isinstance(m, Chunk)] == [
        m.seq for m in net.wire(other, a).delivered if isinstance(m, Ack)
    ]
    assert not unknown, ns.dropped
    # Every count is somewhere: given back to a, or applied by b or c.
    assert total(a.data("usage"), b.data("usage"), c.data("usage")) == expected
    # And the other successor does not keep waiting for a stream nobody ends.
    assert other.receiver.active == 0


async def test_finding_9b_a_chunk_decoded_across_the_loss_of_its_link_is_not_applied() -> None:
    """Finding 9b. b decodes a's first chunk in a worker thread; meanwhile its link to a
    ends (a partition: b keeps running). ``Receiver.peer_lost`` forgot the stream but left
    its machine open, so after the decode ``_chunk`` found it "open" and applied the chunk,
    though its comment says a chunk decoded across the loss of the link is not applied.
    a, whose link ended before any Ack, re-sends it to c: the counts were in b and in c."""
    held = counts("k", 40)
    expected = total(held)
    async with network() as net:
        a = net.node("a", tally("usage", dict(held)))
        b = net.node("b", tally("usage", {}), release="v2")
        c = net.node("c", tally("usage", {}), release="v1")
        net.connect(a, b, c)
        decode = b.receiver._decode

        async def decode_then_partition(chunk: Chunk) -> Any:
            records = await decode(chunk)
            net.cut(a, b, "partition")
            return records

        b.receiver._decode = decode_then_partition  # type: ignore[method-assign]
        report = await net.finish(net.start(lambda: a.drain(time_limit=10.0)))

    assert_adds_up(report)
    ns = report.namespaces["usage"]
    assert ns.in_doubt > 0  # a could not know: it reports the doubt
    # b applied nothing after its link was gone: no count is in two places.
    assert total(b.data("usage")) == 0
    assert total(a.data("usage"), b.data("usage"), c.data("usage")) == expected


def test_finding_9d_counts_given_back_keep_the_window_they_had_not_a_longer_one() -> None:
    """Finding 9d. ``CountersAdapter.give_back`` merged records with age 0: a record's
    remaining time is measured at its export, so a key taken 1 s before its window ended
    and given back 5 s later (the drain held it: a stalled successor, a refusal) got a new
    second of window from the give-back: it read 5 (and a rate limit refused) 4 s after its
    window ended. The limits adapter ages what it gives back; Counters did not."""
    now = [0.0]
    counters = Counters(ttl=10.0, timer=lambda: now[0])
    counters.incr("ip", 5)
    adapter = CountersAdapter(counters)
    now[0] = 9.0  # 1 s left in the window
    taken = list(adapter.export())
    assert taken == [("ip", 5, 1.0)]
    now[0] = 14.0  # the window ended at 10
    adapter.give_back(taken)
    assert counters["ip"] == 0
    assert counters.incr("ip") == 1  # a fresh window


def test_finding_9d_counts_given_back_at_once_keep_their_window() -> None:
    now = [0.0]
    counters = Counters(ttl=10.0, timer=lambda: now[0])
    counters.incr("ip", 5)
    adapter = CountersAdapter(counters)
    now[0] = 9.0
    adapter.give_back(list(adapter.export()))
    now[0] = 9.5
    assert counters["ip"] == 5
    assert counters.remaining("ip") == pytest.approx(0.5)


@pytest.mark.parametrize("fails_at", ["write_chunk", "commit"])
async def test_finding_9e_a_snapshot_store_that_fails_does_not_destroy_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails_at: str
) -> None:
    """Finding 9e. With nobody to take the counters, the drain writes them to the snapshot
    store. The disk is full: the store raises SnapshotError (its documented error for
    that), which the drain did not catch: ``drain()`` raised, no report at all, and every
    count taken for the snapshot was destroyed (neither given back nor reported). The
    namespaces after it were not even drained."""
    counters = Counters()
    for i in range(100):
        counters.incr(f"k{i:03d}", i + 1)
    expected = counters.total()
    after = {"x": 1}

    def full(self: Any, *args: Any) -> None:
        raise SnapshotError("cannot write snapshot: [Errno 28] No space left on device")

    monkeypatch.setattr(_DirectoryWriter, fails_at, full)
    store = DirectorySnapshotStore(tmp_path / "snapshots", key=bytes(32))
    async with network() as net:
        a = net.node("a", track("usage", counters), track("zcache", dict(after)), snapshots=store)
        report = await net.finish(net.start(lambda: a.drain(time_limit=10.0)))

    assert_adds_up(report)
    ns = report.namespaces["usage"]
    assert not report.ok
    assert ns.records == 100
    assert sum(n for reason, n in ns.dropped.items() if "No space left" in reason) == 100
    assert ns.snapshotted == 0
    # The node keeps serving with every count (they leave with the catch-up).
    assert counters.total() == expected
    assert "zcache" in report.namespaces


async def test_held_a_successor_that_withdraws_while_decoding_a_chunk_counts_it_once() -> None:
    """Held: b starts draining (and withdraws from a's stream) while it decodes a's second
    chunk. Nothing of that chunk is applied at b; a takes it back and sends it to c; b's own
    drain hands what it had acknowledged to c. Every count once, nothing in doubt."""
    held = counts("k", 100)
    expected = total(held)
    async with network() as net:
        a = net.node("a", tally("usage", dict(held)))
        b = net.node("b", tally("usage", {}), release="v3")
        c = net.node("c", tally("usage", {}), release="v2")
        net.connect(a, b, c)
        decode, withdraw = b.receiver._decode, b.receiver.withdraw
        withdrawn = anyio.Event()
        b_drain: list[Any] = []

        async def withdraw_and_say(reason: str, until: float) -> int:
            count = await withdraw(reason, until)
            withdrawn.set()
            return count

        async def decode_while_b_drains(chunk: Chunk) -> Any:
            records = await decode(chunk)
            if chunk.seq == 1:
                b_drain.append(net.start(lambda: b.drain(time_limit=1.0)))
                await withdrawn.wait()
            return records

        b.receiver.withdraw = withdraw_and_say  # type: ignore[method-assign]
        b.receiver._decode = decode_while_b_drains  # type: ignore[method-assign]
        report = await net.finish(net.start(lambda: a.drain(time_limit=10.0)))
        b_report = await net.finish(b_drain[0])

    assert net.protocol_errors == []
    assert_adds_up(report)
    assert_adds_up(b_report)
    ns, b_ns = report.namespaces["usage"], b_report.namespaces["usage"]
    assert ns.in_doubt == 0
    assert b_ns.in_doubt == 0
    assert report.ok, report.summary()
    assert b_report.ok, b_report.summary()
    assert ns.refusals["b"].startswith("draining")
    # b handed on exactly what it applied: its first chunk, not the one it was decoding.
    [first] = [m.records for m in net.wire(a, b).delivered if isinstance(m, Chunk) and m.seq == 0]
    assert b_ns.records == first
    assert net.wire(b, a).types()[:4] == ["Accept", "Ack", "StateChange", "Refuse"]
    assert total(a.data("usage"), b.data("usage")) == 0
    assert total(c.data("usage")) == expected


async def test_finding_9f_an_end_the_deadline_left_no_time_for_still_reaches_its_receiver() -> None:
    """Finding 9f. Every chunk is acknowledged; a sends End to each successor in turn. The
    first End's send blocks (a full buffer) until the drain's deadline, so the next End has
    no time left: ``_send`` failed that stream locally and sent nothing, neither the End nor
    a Cancel afterwards (only Cancels go to the late list). The second successor, which
    applied and acknowledged everything, kept the stream open for as long as the link
    lives: its own drain then waits for it (40% of its drain time) before withdrawing."""
    held = counts("k", 200)
    expected = total(held)
    async with network() as net:
        a = net.node("a", tally("usage", dict(held)))
        b = net.node("b", tally("usage", {}), release="v2")
        c = net.node("c", tally("usage", {}), release="v2")
        net.connect(a, b, c)
        blocked: list[str] = []

        def block_first_end(wire: Wire) -> Callable[[Message], None]:
            def on_send(message: Message) -> None:
                if isinstance(message, End) and not blocked:
                    blocked.append(wire.dst.name)
                    wire.block()

            return on_send

        for node in (b, c):
            wire = net.wire(a, node)
            wire.on_send = block_first_end(wire)
        report = await net.finish(net.start(lambda: a.drain(time_limit=10.0)))
        other = {"b": c, "c": b}[blocked[0]]
        # The node runs on (a manual drain): what the drain had no time for goes out now.
        await wait_all_tasks_blocked()

    assert_adds_up(report)
    assert report.namespaces["usage"].acknowledged == 200
    assert total(b.data("usage"), c.data("usage")) == expected
    assert other.receiver.active == 0


def test_finding_9g_a_counters_snapshot_whose_removal_fails_is_not_applied_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DirectorySnapshotStore(tmp_path / "snapshots", key=bytes(32))
    codec = Codec()
    payload, rejected = codec.encode_records([("page", 10, None)])
    assert not rejected
    with store.begin(
        "usage",
        cluster=CLUSTER,
        kind="counters",
        version=1,
        node="old",
        release="v1",
        created_at=1_700_000_000.0,
    ) as writer:
        writer.write_chunk(payload, 1)
        writer.commit()
    counters = Counters()
    tracked = {"usage": track("usage", counters)}

    def restore() -> None:
        restore_snapshots(
            store, cluster=CLUSTER, tracked=tracked, transforms=Transforms(), codec=codec
        )

    def read_only(self: Any, info: Any) -> None:
        raise SnapshotError(f"cannot remove restored snapshot {info.path}: [Errno 30] EROFS")

    with monkeypatch.context() as patch:
        patch.setattr(DirectorySnapshotStore, "remove", read_only)
        with contextlib.suppress(SnapshotError):
            restore()
    restore()  # the store works again (or another worker's store restores it)
    assert counters["page"] == 10


@pytest.mark.parametrize("b_starts_after_chunks", [0, 1, 3])
async def test_held_two_nodes_with_counters_draining_at_once_count_every_amount_once(
    b_starts_after_chunks: int,
) -> None:
    """Held: a drains to b (the newest release) and c; b starts its own drain after a's
    ``b_starts_after_chunks``-th chunk reached it, and drains to c. What b acknowledged
    leaves with b's drain, what it did not goes from a to c: c ends with every count,
    once, and neither report is in doubt."""
    held_a, held_b = counts("a", 120), counts("b", 50)
    expected = total(held_a, held_b)
    async with network() as net:
        a = net.node("a", tally("usage", dict(held_a)))
        b = net.node("b", tally("usage", dict(held_b)), release="v3")
        c = net.node("c", tally("usage", {}), release="v2")
        net.connect(a, b, c)
        runs: list[Any] = []
        seen = [0]

        def on_send(message: Message) -> None:
            if isinstance(message, Chunk):
                seen[0] += 1
            if not runs and seen[0] >= b_starts_after_chunks:
                runs.append(net.start(lambda: b.drain(time_limit=4.0)))

        net.wire(a, b).on_send = on_send
        if b_starts_after_chunks == 0:
            runs.append(net.start(lambda: b.drain(time_limit=4.0)))
        report = await net.finish(net.start(lambda: a.drain(time_limit=10.0)))
        b_report = await net.finish(runs[0])

    assert net.protocol_errors == []
    for r in (report, b_report):
        assert_adds_up(r)
        assert r.ok, r.summary()
    assert total(a.data("usage"), b.data("usage")) == 0
    assert total(c.data("usage")) == expected


async def test_held_past_the_deadline_counters_are_counted_by_size_and_all_given_back() -> None:
    """Held: b takes a few chunks of real ``handoff.Counters`` and stops acknowledging;
    the Cancel at the end of the streaming time blocks until the deadline, so the rest of
    the export is counted by the adapter's size (``_count_rest`` past the deadline). What b
    did not acknowledge is given back with everything never taken: a keeps every count b
    does not hold, and the report counts each key once."""
    counters = Counters()
    for i in range(300):
        counters.incr(f"k{i:03d}", i + 1)
    expected = counters.total()
    async with network() as net:
        a = net.node("a", track("usage", counters))
        b = net.node("b", track("usage", Counters()), release="v2")
        net.connect(a, b)
        a_b, b_a = net.wire(a, b), net.wire(b, a)
        b_a.hold_after = lambda m: isinstance(m, Ack) and m.seq == 1

        def block_cancel(message: Message) -> None:
            if type(message).__name__ == "Cancel":
                a_b.block()

        a_b.on_send = block_cancel
        report = await net.finish(net.start(lambda: a.drain(time_limit=2.0)))
        in_b: Counters = b.data("usage")

    ns = report.namespaces["usage"]
    assert_adds_up(report)
    assert ns.records == 300
    # The chunks b holds unacknowledged are either in doubt (b's link dropped while the
    # Cancel's write blocked the drain) or, since a blocked write holds only its own link
    # (a writer per link), still bound to b at the deadline: dropped as "outcome unknown",
    # neither re-sent nor given back. Either way each count is in one place.
    unknown = sum(n for why, n in ns.dropped.items() if "unknown" in why)
    assert ns.in_doubt + unknown > 0
    acknowledged = chunk_total(a_b, [m.seq for m in b_a.delivered if isinstance(m, Ack)])
    assert in_b.total() >= acknowledged
    if ns.in_doubt == 0:
        assert counters.total() + in_b.total() == expected
    else:
        assert counters.total() + acknowledged == expected


async def test_held_a_closed_from_a_peer_in_the_wrong_state_or_for_no_stream_is_harmless() -> None:
    """Held: b answers a's first chunk with a Closed instead of its Ack (a stream it was
    never asked to close), and c sends a Closed for a stream it never had. c's is ignored;
    b's is a protocol error: the link drops and a re-sends what b did not acknowledge, and
    the report says it is in doubt (b may hold it: it counts twice if b still runs)."""
    held = counts("k", 100)
    expected = total(held)
    async with network() as net:
        a = net.node("a", tally("usage", dict(held)))
        b = net.node("b", tally("usage", {}), release="v3")
        c = net.node("c", tally("usage", {}), release="v2")
        net.connect(a, b, c)
        await net.wire(c, a).send(Closed(4242))

        def forge(message: Message) -> Message:
            if isinstance(message, Ack) and message.seq == 0:
                return Closed(message.stream)
            return message

        net.wire(b, a).tamper = forge
        report = await net.finish(net.start(lambda: a.drain(time_limit=10.0)))

    assert [(dst, src) for dst, src, _ in net.protocol_errors] == [("a", "b")]
    assert_adds_up(report)
    ns = report.namespaces["usage"]
    assert not report.ok
    in_b = total(b.data("usage"))
    assert in_b > 0
    assert ns.in_doubt >= len(b.data("usage"))
    # Exact if b is gone (what it holds leaves with it); doubled only in what is in doubt.
    assert total(a.data("usage"), c.data("usage")) == expected


async def test_finding_9h_counts_a_late_withdrawal_proves_unapplied_are_given_back() -> None:
    """Finding 9h. Chunks still bound to a successor when the drain ends were reported
    "outcome unknown" and forgotten. When that successor's withdrawal (a Refuse: nothing of
    them applied) arrives later, on a node that runs on after a manual drain, the answer
    was dropped: counts known to be nowhere were never given back for the catch-up."""
    held = counts("k", 40)
    expected = total(held)
    async with network() as net:
        a = net.node("a", tally("usage", dict(held)))
        b = net.node("b", tally("usage", {}), release="v2")
        net.connect(a, b)
        a_b, b_a = net.wire(a, b), net.wire(b, a)
        # b accepts, then its answers are held; a's chunks wait on the wire.
        b_a.hold_after = lambda m: type(m).__name__ == "Accept"
        a_b.hold_after = lambda m: type(m).__name__ == "Offer"
        report = await net.finish(net.start(lambda: a.drain(time_limit=2.0)))
        # b drains in turn: it withdraws from a's stream before any chunk reached it.
        b_report = await net.finish(net.start(lambda: b.drain(time_limit=2.0)))
        a_b.release()
        b_a.release()
        await wait_all_tasks_blocked()

    assert "outcome unknown: sent to b" in report.summary()
    assert b_report.namespaces["usage"].records == 0  # b applied nothing
    assert total(b.data("usage")) == 0
    # a runs on after its manual drain: what b never applied is back at a.
    assert total(a.data("usage")) == expected
