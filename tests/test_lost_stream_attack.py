"""Attacks on the question a drain asks a successor whose link ended (see README,
"Counters stay exact"): the sender asks on a new link which chunks were applied (a Cancel
of the stream), the receiver replays the Acks it kept and a Closed.

Each test forces one moment with the fake network of ``tests/test_engine_unit.py`` (fake
clock, no sockets) or drives a Receiver directly: an answer whose Acks do not add up; a
question whose link ends before the answer, with the peer gone (the drain spun); a
question about a stream the receiver withdrew from; a cancelled stream whose link ends
before its Closed arrives; one peer losing more streams than the receiver keeps, and a
hundred senders losing theirs at once; a sole successor that answered; chunks of unknown
outcome whose link ends after the drain (a new link, or a kept duplicate failing); a kept
duplicate failing under a running drain's chunks; and what held: an answer cut short by
another link drop, a question about another peer's stream, an answer after the stall
time, a restarted successor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from handoff.engine._receiver import MAX_LOST_STREAMS, MAX_STREAMS_PER_PEER, Receiver
from handoff.protocol import Accept, Ack, Cancel, Chunk, Closed, Message, Refuse
from tests._helpers import wait_all_tasks_blocked
from tests.test_counters_exact import (
    NAMESPACE,
    _counters_node,
    _held,
    _receiver,
    _Recorder,
    _stream,
)
from tests.test_engine_unit import FakeNode, Net, assert_adds_up, network, small_chunks

__all__ = ("small_chunks",)  # the fixture: 16 records a chunk here too

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def counts_on_a(
    held: dict[str, int], *successors: str
) -> AsyncIterator[tuple[Net, FakeNode, list[FakeNode]]]:
    """A fake network where a (v1) holds the counts ``held`` and every one of
    ``successors`` (v2, empty) is linked to it and to each other."""
    async with network() as net:
        a = _counters_node(net, "a", "v1", **held)
        others = [_counters_node(net, name, "v2") for name in successors]
        net.connect(a, *others)
        yield net, a, others


def _cut_at_duplicate_of_chunk_1(net: Net, a: FakeNode, b: FakeNode) -> None:
    """b's Acks wait on the wire, and a's chunk 1 arrives twice: b drops the link (a
    protocol error) having applied chunks 0 and 1; a never saw their Acks."""
    a_b, b_a = net.wire(a, b), net.wire(b, a)
    b_a.hold_after = lambda m: isinstance(m, Accept)
    a_b.on_send = lambda m: a_b.queue.append(m) if isinstance(m, Chunk) and m.seq == 1 else None


async def test_a_replayed_ack_that_does_not_add_up_drops_the_link_and_is_not_counted() -> None:
    """b answers a's question with an Ack of chunk 0 that accounts for a million records
    (a buggy or hostile successor): on the stream's own link such an Ack drops the link;
    as an answer it was counted as it said (the report claimed a million applied records
    of a 16-record chunk). Now it is a protocol error too: the link drops, the replayed
    Ack counts nothing, and the report adds up."""
    held = {f"k{i:03d}": i + 1 for i in range(64)}
    async with counts_on_a(held, "b", "c") as (net, a, (b, c)):
        _cut_at_duplicate_of_chunk_1(net, a, b)
        cut = net.cut

        def forge(message: Message) -> Message:
            if isinstance(message, Ack):
                return dataclasses.replace(message, applied=1_000_000)
            return message

        def redial(x: FakeNode, y: FakeNode, reason: str) -> None:
            cut(x, y, reason)
            if len(net.cuts) == 1:
                net.connect(x, y)
                net.wire(b, a).tamper = forge

        net.cut = redial  # type: ignore[method-assign,assignment]
        report = await net.finish(net.start(a.drain))

    assert_adds_up(report)
    ns = report.namespaces[NAMESPACE]
    assert ns.applied <= ns.records, ns
    assert ("a", "b") in [(x, y) for x, y, _ in net.protocol_errors]  # a dropped b's link
    # b's answer never came true: what it may hold is re-sent and said to be in doubt.
    assert ns.in_doubt > 0
    assert _held(c.data(NAMESPACE)) + _held(b.data(NAMESPACE)) >= sum(held.values())


async def test_a_question_whose_link_ends_unanswered_does_not_spin_the_drain() -> None:
    """a asks b on the new link; that link ends too before b answers, and b does not come
    back. The question was to be asked again 0.2 s later, but b is linked nowhere: the
    drain's wait woke at once for a question it could not ask, again and again, without
    ever yielding (on a real loop: no heartbeat, no other link served until the stall time
    ran out; on the fake clock: forever). Now it looks for b again every 0.2 s until b
    comes back or the stall time ends, and re-sends in doubt."""
    held = {f"k{i:03d}": i + 1 for i in range(64)}
    async with counts_on_a(held, "b", "c") as (net, a, (b, c)):
        _cut_at_duplicate_of_chunk_1(net, a, b)
        cut = net.cut

        def redial(x: FakeNode, y: FakeNode, reason: str) -> None:
            cut(x, y, reason)
            if len(net.cuts) == 1:
                net.connect(x, y)
                b_a = net.wire(b, a)
                b_a.hold()  # b's answer waits on the wire ...
                # ... and the link ends once a's question is out.
                net.wire(a, b).on_send = end_after_sending

        def end_after_sending(message: Message) -> None:
            net.start(end_link)

        async def end_link() -> None:
            net.cut(a, b, "the new link ended too")

        peers = a.peers
        calls = [0]

        def counted() -> list:  # type: ignore[type-arg]
            calls[0] += 1
            # A spinning drain asks for its peers without end; an honest one a few times.
            assert calls[0] < 10_000, "the drain spins"
            return peers()

        a.peers = counted  # type: ignore[method-assign]
        net.cut = redial  # type: ignore[method-assign,assignment]
        report = await net.finish(net.start(a.drain))

    assert_adds_up(report)
    assert len(net.cuts) == 2
    ns = report.namespaces[NAMESPACE]
    assert ns.in_doubt > 0  # b never answered: re-sent, and said so
    assert _held(c.data(NAMESPACE)) + _held(b.data(NAMESPACE)) >= sum(held.values())


async def test_a_question_about_a_stream_this_node_withdrew_from_is_answered() -> None:
    """b (draining) withdrew from a's stream on the old link (Acks, then a Refuse), and
    has not yet seen that link end (a duplicate kept up for it, a heartbeat not yet
    missed); a lost that link and asks on the new one. The withdrawn stream stays here
    until its link ends, finished: the Cancel was taken for one that crossed the
    withdrawal and got no answer, so a's question went unanswered for as long as b took to
    notice (past a's stall time: re-sent in doubt, counted twice). Now the Acks are
    replayed on the new link, then a Closed (nothing is applied after a withdrawal)."""
    receiver = _receiver()
    old, new = _Recorder(), _Recorder()
    await _stream(receiver, "a", old, 1, 3)
    assert await receiver.withdraw("draining", until=1e9) == 1
    assert [type(m).__name__ for m in old.sent] == ["Accept", "Ack", "Ack", "Ack", "Refuse"]
    await receiver.handle("a", new, Cancel(1, "its link ended: which chunks were applied?"))
    assert new.sent == [*(m for m in old.sent if isinstance(m, Ack)), Closed(1)]
    # A Cancel that crossed the withdrawal on the stream's own link is late: no answer.
    await receiver.handle("a", old, Cancel(1, "stalled"))
    assert isinstance(old.sent[-1], Refuse)


async def _answered(receiver: Receiver, peer: str, stream: int) -> bool:
    asked = _Recorder()
    await receiver.handle(peer, asked, Cancel(stream, "which?"))
    return bool(asked.sent) and asked.sent[-1] == Closed(stream)


async def test_one_peer_losing_many_streams_does_not_evict_another_peers() -> None:
    """a's stream to b lost its link (b keeps its Acks for a's question); then h, a hostile
    or buggy peer, opens as many streams as b keeps (32 at a time, the most it may hold
    open) and drops its link after each batch. The kept streams were forgotten oldest
    first, whoever they came from: a's went, and a's question got no answer (a re-sent in
    doubt, counted twice). Now a full table forgets the oldest of the peer that holds the
    most: h's own."""
    receiver = _receiver()
    await _stream(receiver, "a", _Recorder(), 1, 2)
    receiver.peer_lost("a")
    ids = iter(range(1, 10 * MAX_LOST_STREAMS))
    for _ in range(-(-MAX_LOST_STREAMS // MAX_STREAMS_PER_PEER)):
        link = _Recorder()
        for _ in range(MAX_STREAMS_PER_PEER):
            await _stream(receiver, "h", link, next(ids), 1)
        receiver.peer_lost("h")
    assert await _answered(receiver, "a", 1)
    assert not await _answered(receiver, "h", 1)  # h's oldest went instead
    assert await _answered(receiver, "h", next(ids) - 1)


async def test_a_receiver_that_loses_a_hundred_senders_at_once_answers_each() -> None:
    """A blue-green deploy of a hundred nodes: every old node splits its counters over
    the new ones, so each new node receives from a hundred senders at once, and a blip of
    its network ends every one of those links together. It kept 64 lost streams: the
    other senders' questions got no answer (re-sent in doubt, counted twice)."""
    receiver = _receiver()
    senders = [f"old{i:03d}" for i in range(100)]
    for peer in senders:
        await _stream(receiver, peer, _Recorder(), 7, 2)
    for peer in senders:
        receiver.peer_lost(peer)
    assert [peer for peer in senders if not await _answered(receiver, peer, 7)] == []


async def test_a_cancelled_stream_whose_link_ends_before_the_closed_arrives_is_answered() -> None:
    """b stalls (its Acks do not get back), a cancels b's stream and sends the rest to c;
    b answers the Cancel (its Acks, then a Closed) on the stalled link, which then ends
    (a stalled link is often one about to). a asks b on the new link which chunks it
    applied, but b had forgotten the stream at the Cancel (it ended it), not at the link's
    end: no answer, and a re-sent b's chunks in doubt (counted twice, b runs on). Now a
    cancelled ownership stream's Acks are kept as a lost one's."""
    held = {f"k{i:03d}": i + 1 for i in range(64)}
    async with counts_on_a(held, "b", "c") as (net, a, (b, c)):
        b_a = net.wire(b, a)
        b_a.hold_after = lambda m: isinstance(m, Accept)  # b stalls: its Acks wait

        async def cut_and_redial() -> None:
            net.cut(a, b, "the stalled link ended")
            net.connect(a, b)

        def on_b_send(message: Message) -> None:
            if isinstance(message, Closed) and not net.cuts:
                net.start(cut_and_redial)

        b_a.on_send = on_b_send
        report = await net.finish(net.start(a.drain))

    assert_adds_up(report)
    assert len(net.cuts) == 1
    ns = report.namespaces[NAMESPACE]
    b_held = _held(b.data(NAMESPACE))
    assert b_held > 0  # b applied chunks whose Acks the stalled link held
    assert ns.in_doubt == 0, ns
    assert b_held + _held(c.data(NAMESPACE)) == sum(held.values())


async def test_a_sole_successor_that_answered_is_offered_the_rest() -> None:
    """a's only successor b drops the link at a duplicated chunk, comes back and answers
    which chunks it applied. The rest was to be re-sent, but b was the only one to re-send
    it to, and a stream that failed with chunks unacknowledged was never offered again
    (they might count twice): once b has said exactly what it applied, that fear is gone.
    Before, the rest went to "no successor" (given back and reported dropped: lost when a
    exits) although b was linked and serving."""
    held = {f"k{i:03d}": i + 1 for i in range(64)}
    async with counts_on_a(held, "b") as (net, a, (b,)):
        _cut_at_duplicate_of_chunk_1(net, a, b)
        cut = net.cut

        def redial(x: FakeNode, y: FakeNode, reason: str) -> None:
            cut(x, y, reason)
            net.connect(x, y)

        net.cut = redial  # type: ignore[method-assign,assignment]
        report = await net.finish(net.start(a.drain))

    assert_adds_up(report)
    ns = report.namespaces[NAMESPACE]
    assert len(net.cuts) == 1
    assert ns.in_doubt == 0
    assert not ns.dropped, ns
    assert _held(b.data(NAMESPACE)) == sum(held.values())


async def test_an_answer_cut_short_by_another_link_drop_is_asked_again() -> None:
    """Held: b's answer on the new link gets one Ack through, then that link ends too. a
    asks again on the third link; b replays the same Acks (the one a counted is not
    counted again) and the Closed: exact, nothing in doubt."""
    held = {f"k{i:03d}": i + 1 for i in range(64)}
    async with counts_on_a(held, "b", "c") as (net, a, (b, c)):
        _cut_at_duplicate_of_chunk_1(net, a, b)
        cut = net.cut

        async def cut_again() -> None:
            net.cut(a, b, "the answer's link ended too")

        def after_the_first_ack(message: Message) -> bool:
            if isinstance(message, Ack):
                net.start(cut_again)  # runs once a has taken this Ack
                return True
            return False

        def redial(x: FakeNode, y: FakeNode, reason: str) -> None:
            cut(x, y, reason)
            net.connect(x, y)
            if len(net.cuts) == 1:
                net.wire(b, a).hold_after = after_the_first_ack

        net.cut = redial  # type: ignore[method-assign,assignment]
        report = await net.finish(net.start(a.drain))

    assert_adds_up(report)
    # (The fake network also cuts the third link when b's answer on the second fails.)
    assert len(net.cuts) >= 2
    ns = report.namespaces[NAMESPACE]
    assert ns.in_doubt == 0
    assert not ns.dropped, ns
    b_held = _held(b.data(NAMESPACE))
    assert ns.per_successor["b"].applied == len(b.data(NAMESPACE)) > 0
    assert b_held + _held(c.data(NAMESPACE)) == sum(held.values())


async def test_a_question_about_another_peers_stream_gets_no_answer() -> None:
    """Held: h asks about stream 1, which a lost here: streams are kept by (sender, id),
    and the sender's name is the one its link authenticated, so h learns nothing of a's
    (and a's question still gets its answer)."""
    receiver = _receiver()
    await _stream(receiver, "a", _Recorder(), 1, 3)
    receiver.peer_lost("a")
    asked = _Recorder()
    await receiver.handle("h", asked, Cancel(1, "which?"))
    assert asked.sent == []
    assert await _answered(receiver, "a", 1)


@pytest.mark.parametrize("restarted", [False, True], ids=["same", "restarted"])
async def test_chunks_of_unknown_outcome_whose_link_ends_after_the_drain_are_asked_about(
    restarted: bool,
) -> None:
    """A drain by hand (the node runs on): b, the only successor, stops answering; at the
    deadline a's chunks to b are of unknown outcome (reported dropped, "outcome unknown"),
    and a waits for b's late answer to give back what b did not apply. The stalled link
    then ends and the mesh links them again: b kept its Acks for the question (chunks 0
    and 1 applied, 2 and 3 never arrived), but a forgot the chunks when the link ended,
    and never asked: the counts of chunks 2 and 3 were gone from the cluster. Now a asks,
    and gets them back. Restarted, b cannot say (what it applied died with it): a asks
    nothing and gives nothing back (the outcome stays unknown, as reported)."""
    held = {f"k{i:03d}": i + 1 for i in range(64)}
    async with counts_on_a(held, "b") as (net, a, (b,)):
        a_b, b_a = net.wire(a, b), net.wire(b, a)
        b_a.hold_after = lambda m: isinstance(m, Accept)  # b's Acks wait
        a_b.hold_after = lambda m: isinstance(m, Chunk) and m.seq == 1  # 2, 3 never arrive
        report = await net.finish(net.start(a.drain))
        ns = report.namespaces[NAMESPACE]
        assert any(reason.startswith("outcome unknown") for reason in ns.dropped), ns
        net.cut(a, b, "the stalled link ended")
        if restarted:
            b.data(NAMESPACE)._values.clear()  # what b applied died with it
            b.as_peer = lambda state: dataclasses.replace(  # type: ignore[method-assign]
                FakeNode.as_peer(b, state), incarnation="b-2"
            )
            b.receiver = b.sessions.receiver = _receiver()  # a new process: nothing kept
        net.connect(a, b)
        await wait_all_tasks_blocked()

    questions = [m for m in net.wire(a, b).delivered if isinstance(m, Cancel)]
    if restarted:
        assert questions == []
        assert _held(a.data(NAMESPACE)) == 0
    else:
        assert len(questions) == 1
        assert _held(b.data(NAMESPACE)) > 0
        assert _held(a.data(NAMESPACE)) + _held(b.data(NAMESPACE)) == sum(held.values())


async def test_a_kept_duplicate_that_fails_under_chunks_is_asked_about_on_the_link_in_use() -> None:
    """a streams to b on a link that has just become a kept duplicate (the other link is
    in use now, see ``Mesh._retire``); b applied chunk 0, its Ack and chunks 1 to 3 are on
    the way when the duplicate fails. b stays linked on the link in use, so no node-up
    comes, and a never asked b which chunks it applied: after the stall time it re-sent
    them in doubt (chunk 0 counted twice). Now a asks at once on the link in use; b answers
    (chunk 0 applied, nothing else), and the rest goes to b again: exact, not in doubt."""
    held = {f"k{i:03d}": i + 1 for i in range(64)}
    async with counts_on_a(held, "b") as (net, a, (b,)):
        old_ab, old_ba = net.wire(a, b), net.wire(b, a)
        old_ba.hold_after = lambda m: isinstance(m, Accept)  # b's Acks wait
        old_ab.hold_after = lambda m: isinstance(m, Chunk) and m.seq == 0  # 1 to 3 wait

        async def duplicate_fails() -> None:
            # The link in use is another one now; the old one, kept for the stream, fails.
            del a.links["b"], b.links["a"]
            net.connect(a, b)
            old_ab.close()
            old_ba.close()
            a.sessions.link_lost("b", old_ab)
            b.sessions.link_lost("a", old_ba)

        def on_send(message: Message) -> None:
            if isinstance(message, Chunk) and message.seq == 3:
                net.start(duplicate_fails)

        old_ab.on_send = on_send
        report = await net.finish(net.start(a.drain))

    assert_adds_up(report)
    ns = report.namespaces[NAMESPACE]
    assert ns.in_doubt == 0, ns
    assert not ns.dropped, ns
    assert _held(b.data(NAMESPACE)) == sum(held.values())


async def test_an_answer_after_the_stall_time_changes_nothing_and_the_report_says_so() -> None:
    """Held: b comes back at once but its answer waits on the wire past the stall time; a
    has re-sent b's chunks to c by then, reported in doubt. The late Acks and Closed are
    ignored (the stream is over): nothing is counted again, and the report says in doubt
    what indeed counts twice (b runs on)."""
    held = {f"k{i:03d}": i + 1 for i in range(64)}
    async with counts_on_a(held, "b", "c") as (net, a, (b, c)):
        _cut_at_duplicate_of_chunk_1(net, a, b)
        cut = net.cut

        def redial(x: FakeNode, y: FakeNode, reason: str) -> None:
            cut(x, y, reason)
            net.connect(x, y)
            net.wire(b, a).hold()  # b's answer waits until the drain is over

        net.cut = redial  # type: ignore[method-assign,assignment]
        report = await net.finish(net.start(a.drain))
        late = net.wire(b, a)
        late.release()
        await wait_all_tasks_blocked()

    assert [type(m).__name__ for m in late.delivered][-1] == "Closed"  # it did come
    assert_adds_up(report)
    ns = report.namespaces[NAMESPACE]
    b_held = _held(b.data(NAMESPACE))
    assert ns.in_doubt >= len(b.data(NAMESPACE)) > 0
    assert "b" not in ns.per_successor  # no late Ack counted
    assert _held(c.data(NAMESPACE)) == sum(held.values())
    assert b_held > 0  # counted twice: b's and c's, as the report warns


async def test_chunks_of_unknown_outcome_on_a_kept_duplicate_that_fails_are_asked_about() -> None:
    """As in the test of chunks of unknown outcome whose link ends after the drain, but the
    stalled stream's link is a kept duplicate (another link is in use now) and fails: b
    stays linked, no node-up comes, and a never asked; the counts of the chunks b never
    got were gone. Now the end of the duplicate asks on the link in use (the mesh runs what
    ``Sessions.link_lost`` returns)."""
    held = {f"k{i:03d}": i + 1 for i in range(64)}
    async with counts_on_a(held, "b") as (net, a, (b,)):
        old_ab, old_ba = net.wire(a, b), net.wire(b, a)
        old_ba.hold_after = lambda m: isinstance(m, Accept)  # b's Acks wait
        old_ab.hold_after = lambda m: isinstance(m, Chunk) and m.seq == 1  # 2, 3 never arrive
        report = await net.finish(net.start(a.drain))
        assert any(r.startswith("outcome unknown") for r in report.namespaces[NAMESPACE].dropped)
        # The link in use is another one now; the old one, kept for the stream, fails.
        del a.links["b"], b.links["a"]
        net.connect(a, b)
        old_ab.close()
        old_ba.close()
        b.sessions.link_lost("a", old_ba)
        asking = a.sessions.link_lost("b", old_ab)
        assert asking is not None
        await asking
        await wait_all_tasks_blocked()

    assert _held(b.data(NAMESPACE)) > 0
    assert _held(a.data(NAMESPACE)) + _held(b.data(NAMESPACE)) == sum(held.values())
