"""Attacks on the actor engine (issue 10): sequences that try to break DESIGN.md's
invariants 3 (one live actor per key; messages once, in order, none lost) and 9 (no peer can
wedge a node or make it hold unbounded memory).

Each finding is marked ``xfail(strict=True)`` until the engine is fixed, so the suite stays
green and a fix turns it into an XPASS (then drop the mark); the tests without a mark are
attacks that held. They run on the deterministic simulation of ``tests/test_actors_sim.py``
(fake network, fake clock): the sequences are exact; only the drain deadlines are real time.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from handoff.engine._actors import (
    CHANNEL_KEEP,
    MAX_ANSWERERS,
    WINDOW,
    ActorLimits,
    MoveStats,
    Status,
    place,
    placement_score,
)
from handoff.protocol import ActorMove, ActorMoved, ActorReply, ActorSend, Message
from tests.test_actors_sim import (
    NAMESPACE,
    Net,
    SimNode,
    settle,
)
from tests.test_engine_unit import FakeClock


def run(scenario: Callable[[Net], Awaitable[None]]) -> None:
    async def main() -> None:
        async with anyio.create_task_group() as group:
            net = Net(FakeClock(), group)
            await scenario(net)
            group.cancel_scope.cancel()

    try:
        anyio.run(main)
    except BaseExceptionGroup as group:  # the scenario's own error, not the group's
        while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
            group = group.exceptions[0]
        raise group from None


def single(net: Net, key: Any) -> None:
    on = holders(net, key)
    assert len(on) <= 1, f"{key!r} active on {on}"


def kb(net: Net, key: Any) -> bytes:
    return net.codec.packb(key)


def holders(net: Net, key: Any, *, unfrozen: bool = True) -> list[str]:
    key_bytes = kb(net, key)
    return [
        node.name
        for node in net.live()
        if (held := node.host._held.get(key_bytes)) is not None and not (unfrozen and held.frozen)
    ]


def key_placed_on(net: Net, owner: SimNode, nodes: list[SimNode], prefix: str = "k") -> str:
    names = [n.name for n in nodes]
    for i in range(10_000):
        key = f"{prefix}{i}"
        if place(kb(net, key), names) == owner.name:
            return key
    raise AssertionError("no key placed there")


async def flush(net: Net, drop: Callable[[Message], bool] = lambda message: False) -> None:
    """Deliver everything on the wire, in order, a batch between settles; ``drop`` says
    which messages are lost instead."""
    await settle()
    for _ in range(200):
        if not net.wire:
            return
        batch, net.wire = net.wire, []
        for envelope in batch:
            net.wire.insert(0, envelope)
            if drop(envelope.message):
                net.wire.pop(0)
            else:
                net.deliver(0)
        await settle()
    raise AssertionError("the wire did not empty")


async def call(net: Net, node: SimNode, key: Any, number: int) -> Any:
    pending = await node.host.submit(key, [node.name, number], want_reply=True, time_limit=10)
    await flush(net)
    return pending


async def tick(net: Net, seconds: float = 1.1) -> None:
    net.clock.advance(seconds)
    await settle()
    for node in net.live():
        node.host._resend_due(net.clock.now())
    await flush(net)


async def answer_within(net: Net, pending: Any, ticks: int, seconds: float = 1.1) -> Any:
    """Move the fake clock up to ``ticks`` times (``seconds`` each) until ``pending`` is
    answered; assert that it was replied to, and return the reply."""
    for _ in range(ticks):
        if pending.done.is_set():
            break
        await tick(net, seconds)
    assert pending.status is Status.REPLIED
    return net.codec.unpackb(pending.answer)


def handled(net: Net, key: Any) -> list[list[Any]]:
    (name,) = holders(net, key, unfrozen=False)
    held = net.nodes[name].host._held[kb(net, key)]
    value = held.instance.state() if held.instance is not None else held.state
    return [list(item) for item in (value or [])]


# -- double activation ------------------------------------------------------------------------


def test_a_node_not_yet_linked_to_the_holder_does_not_activate_the_key_again() -> None:
    async def scenario(net: Net) -> None:
        a, c = await net.spawn_node(), await net.spawn_node()
        key = key_placed_on(net, a, [a, c])
        assert (await call(net, c, key, 1)).status is Status.REPLIED
        assert holders(net, key) == [a.name]
        # A new node started: discovery found the cluster, no link is up yet.
        net.cuts |= {frozenset(("n3", a.name)), frozenset(("n3", c.name))}
        t = await net.spawn_node()
        t.host._members.clear()
        for other in (a, c):
            other.host._members.pop(t.name, None)
        # Its app calls the key at once: unavailable (a, c not linked yet), not activated.
        pending = await call(net, t, key, 1)
        single(net, key)
        assert holders(net, key) == [a.name]
        assert not pending.done.is_set()
        # Linked: the message reaches the one activation.
        for pair in list(net.cuts):
            net.heal(pair)
        for _ in range(3):
            await tick(net)
        assert pending.status is Status.REPLIED
        assert holders(net, key) == [a.name]

    run(scenario)


def test_an_exported_actor_is_not_activated_twice_when_its_record_lands() -> None:
    async def scenario(net: Net) -> None:
        a, b, c = [await net.spawn_node() for _ in range(3)]
        key = key_placed_on(net, a, [a, b, c])
        assert (await call(net, c, key, 1)).status is Status.REPLIED
        # a drains; its actor could not move, the drain's export takes it for a successor.
        a.serving = False
        records = list(a.host.take())
        assert [r[0] for r in records] == [key]
        # Meanwhile c calls the key again: placement (b or c) claims it, a says "in
        # transit": nobody activates it, the message waits.
        pending = await call(net, c, key, 2)
        await tick(net)
        assert holders(net, key, unfrozen=False) == []
        assert not pending.done.is_set()
        # The record lands on the successor the planner chose; asked, it ends the transit.
        successor = b
        assert successor.host.put(*records[0])
        for _ in range(4):
            await tick(net)
            single(net, key)
        assert holders(net, key) == [successor.name]
        assert pending.status is Status.REPLIED
        assert handled(net, key) == [[c.name, 1], [c.name, 2]]
        assert a.host._transit == {}

    run(scenario)


@pytest.mark.parametrize("record_wins_placement", [False, True])
def test_a_record_landing_where_another_activation_runs_gives_way(
    record_wins_placement: bool,
) -> None:
    """The exporter crashed mid-stream (or a snapshot was restored late): a fresh
    activation runs elsewhere when the record lands. It is held frozen, asks, and is
    dropped as superseded, whichever placement score is higher: never two."""

    async def scenario(net: Net) -> None:
        a, b, c = [await net.spawn_node() for _ in range(3)]
        key = next(
            f"s{i}"
            for i in range(10_000)
            if place(kb(net, f"s{i}"), [a.name, b.name]) == a.name
            and (place(kb(net, f"s{i}"), [a.name, c.name]) == c.name) == record_wins_placement
        )
        c.serving = False  # the fresh activation runs on a (placement without c)
        assert (await call(net, b, key, 1)).status is Status.REPLIED
        c.serving = True
        assert holders(net, key) == [a.name]
        assert c.host.put(key, [["old", 1]], None)
        for _ in range(2 + 2 * 5):
            await tick(net)
            single(net, key)
        assert holders(net, key, unfrozen=False) == [a.name]
        assert c.host.superseded == 1
        assert (await call(net, c, key, 2)).status is Status.REPLIED
        assert handled(net, key) == [[b.name, 1], [c.name, 2]]

    run(scenario)


def test_two_records_of_one_actor_landing_at_once_keep_one() -> None:
    """A chunk re-sent after a lost acknowledgement lands on a second successor: both
    hold the record frozen; the lower placement score gives way, the other goes on."""

    async def scenario(net: Net) -> None:
        a, b, c = [await net.spawn_node() for _ in range(3)]
        key = "twice"
        assert b.host.put(key, [["old", 1]], None)
        assert c.host.put(key, [["old", 1]], None)
        for _ in range(4):
            await tick(net)
            single(net, key)
        keeper, loser = sorted((b, c), key=lambda n: placement_score(n.name, kb(net, key)))[::-1]
        assert holders(net, key, unfrozen=False) == [keeper.name]
        assert (keeper.host.superseded, loser.host.superseded) == (0, 1)
        assert (await call(net, a, key, 1)).status is Status.REPLIED
        assert handled(net, key) == [["old", 1], [a.name, 1]]

    run(scenario)


def test_a_move_answer_counts_only_from_the_moves_target() -> None:
    async def scenario(net: Net) -> None:
        a, b, x = [await net.spawn_node() for _ in range(3)]
        key = key_placed_on(net, a, [a, b, x])
        assert (await call(net, x, key, 1)).status is Status.REPLIED
        held = a.host._held[kb(net, key)]
        a.host._spawn(a.host.migrate, held, b.name, MoveStats())
        await settle()
        assert held.moving_to == b.name
        # x (any authenticated peer) answers for b: "refused".
        assert held.move_request is not None
        move = held.move_request.move
        a.host.handle(x.name, ActorMoved(NAMESPACE, kb(net, key), move, 0, "no"))
        await settle()
        await flush(net)  # the real move reaches b, which activates it
        single(net, key)

    run(scenario)


def test_a_move_is_not_repeated_to_a_new_incarnation_of_its_target() -> None:
    async def scenario(net: Net) -> None:
        a, p, e = [await net.spawn_node() for _ in range(3)]
        key = key_placed_on(net, a, [a, p, e])
        assert (await call(net, e, key, 1)).status is Status.REPLIED
        held = a.host._held[kb(net, key)]
        a.host._spawn(a.host.migrate, held, p.name, MoveStats())
        # p activates it; its answer is lost.
        await flush(net, drop=lambda message: isinstance(message, ActorMoved))
        assert held.moving_to == p.name
        assert kb(net, key) in p.host._held
        # p drains (the actor moves on to e) and exits; it restarts under its name.
        p.serving = False
        stats = MoveStats()
        p.host._spawn(p.host.migrate, p.host._held[kb(net, key)], e.name, stats)
        await flush(net)
        assert stats.moved == 1
        net.leave(p)
        net.names = itertools.count(2)
        p2 = await net.spawn_node()
        assert p2.name == p.name
        # a's move times out while the name is linked again: it asks again.
        net.clock.advance(2.5)
        await flush(net)
        single(net, key)

    run(scenario)


def test_a_move_to_a_node_that_forwarded_an_older_activation_is_not_lost() -> None:
    async def scenario(net: Net) -> None:
        a, t, e, b = [await net.spawn_node() for _ in range(4)]
        key = next(
            f"e{i}"
            for i in range(10_000)
            if place(kb(net, f"e{i}"), [a.name, t.name, e.name, b.name]) == a.name
            and place(kb(net, f"e{i}"), [t.name, b.name]) == b.name
        )
        assert (await call(net, e, key, 1)).status is Status.REPLIED
        # a -> t (epoch 2) -> e (epoch 3): t keeps a forwarding pointer (e, 3).
        for source, target in ((a, t), (t, e)):
            stats = MoveStats()
            source.host._spawn(
                source.host.migrate, source.host._held[kb(net, key)], target.name, stats
            )
            await flush(net)
            assert stats.moved == 1
        # e crashes, a drains: the key comes back from nothing on b (epoch 1).
        net.crash(e)
        a.serving = False
        assert (await call(net, b, key, 1)).status is Status.REPLIED
        assert holders(net, key) == [b.name]
        # b moves it to t (epoch 2): t's pointer says epoch 3 went on, so t says "accepted".
        stats = MoveStats()
        b.host._spawn(b.host.migrate, b.host._held[kb(net, key)], t.name, stats)
        await flush(net)
        assert stats.moved == 1
        assert holders(net, key) == [t.name]

    run(scenario)


def test_a_stale_forwarding_pointer_does_not_make_the_key_unreachable() -> None:
    async def scenario(net: Net) -> None:
        a, t, e = [await net.spawn_node() for _ in range(3)]
        key = next(
            f"e{i}"
            for i in range(10_000)
            if place(kb(net, f"e{i}"), [a.name, t.name, e.name]) == a.name
            and place(kb(net, f"e{i}"), [a.name, t.name]) == a.name
        )
        assert (await call(net, e, key, 1)).status is Status.REPLIED
        for source, target in ((a, t), (t, e)):  # a -> t -> e: a points at t
            stats = MoveStats()
            source.host._spawn(
                source.host.migrate, source.host._held[kb(net, key)], target.name, stats
            )
            await flush(net)
            assert stats.moved == 1
        net.crash(e)  # the key is to come back from nothing, on a (its placement)
        pending = await call(net, a, key, 1)
        for _ in range(5):
            await tick(net, 5.0)
        assert pending.status is Status.REPLIED

    run(scenario)


# -- duplicates and lost replies ----------------------------------------------------------------


def test_evicting_channels_does_not_handle_a_message_twice() -> None:
    async def scenario(net: Net) -> None:
        o, c = await net.spawn_node(), await net.spawn_node()
        key = key_placed_on(net, o, [o, c])
        assert (await call(net, c, key, 1)).status is Status.REPLIED
        pending = await c.host.submit(key, [c.name, 2], want_reply=True, time_limit=10)
        await settle()
        net.deliver(0)  # the ActorSend reaches o and is handled...
        await settle()
        assert [e for e in net.wire if isinstance(e.message, ActorReply)]
        net.wire.clear()  # ... its reply is lost (the link dropped)
        assert not pending.done.is_set()
        # Other senders (forwarded from nodes o does not know, by c, which held the actor
        # before as far as o knows) go past max_channels.
        o.host._remember_holder(kb(net, key), c.name)
        for i in range(o.host.limits.max_channels):
            o.host.handle(
                c.name,
                ActorSend(
                    NAMESPACE, kb(net, key), f"inc-x{i}", f"x{i}", 1, 1, 1, 0, 1,
                    net.codec.packb([f"x{i}", 1]),
                ),
            )  # fmt: skip
        await settle()
        net.wire.clear()
        for _ in range(3):
            await tick(net)
        assert pending.status is Status.REPLIED
        mine = [m for m in handled(net, key) if m[0] == c.name]
        assert mine == [[c.name, 1], [c.name, 2]]
        # Channels unused for CHANNEL_KEEP are forgotten to make room for a new sender.
        held = o.host._held[kb(net, key)]
        assert len(held.channels) <= o.host.limits.max_channels
        net.clock.advance(CHANNEL_KEEP)
        o.host.handle(
            c.name,
            ActorSend(NAMESPACE, kb(net, key), "inc-y", "y", 1, 1, 1, 0, 1, b"\x92\xa1y\x01"),
        )
        await settle()
        assert "inc-y" in held.channels
        assert len(held.channels) <= o.host.limits.max_channels

    run(scenario)


def test_a_lost_reply_is_answered_again_after_later_messages() -> None:
    """The owner keeps the replies of the last WINDOW messages per channel, so a sender's
    unanswered messages must span at most WINDOW seqs: past that, the next message waits
    for room, and the resend of the oldest one is still answered from those replies."""

    async def scenario(net: Net) -> None:
        o, c = await net.spawn_node(), await net.spawn_node()
        key = key_placed_on(net, o, [o, c])
        first = [
            await c.host.submit(key, [c.name, i], want_reply=True, time_limit=10)
            for i in range(1, WINDOW + 1)
        ]
        lost: list[Message] = []

        def first_reply(message: Message) -> bool:
            if not lost and isinstance(message, ActorReply) and message.seq == 1:
                lost.append(message)
                return True
            return False

        await flush(net, drop=first_reply)
        assert lost
        assert not first[0].done.is_set()
        assert all(p.status is Status.REPLIED for p in first[1:])
        later: list[Any] = []

        async def submit_next() -> None:
            later.append(
                await c.host.submit(key, [c.name, WINDOW + 1], want_reply=True, time_limit=60)
            )

        async with anyio.create_task_group() as group:
            group.start_soon(submit_next)
            await settle()
            assert not later, "the span of unanswered seqs is full: the next one waits"
            for _ in range(2):
                await tick(net)
        assert first[0].status is Status.REPLIED
        await flush(net)
        assert later[0].status is Status.REPLIED

    run(scenario)


# -- wedges -------------------------------------------------------------------------------------


@pytest.mark.parametrize("target_restarts", [False, True])
def test_a_move_in_doubt_ends_once_the_target_is_back_and_does_not_hold_it(
    target_restarts: bool,
) -> None:
    async def scenario(net: Net) -> None:
        a, b, c = [await net.spawn_node() for _ in range(3)]
        key = key_placed_on(net, a, [a, b, c])
        assert (await call(net, c, key, 1)).status is Status.REPLIED
        held = a.host._held[kb(net, key)]
        a.host._spawn(a.host.migrate, held, b.name, MoveStats())
        await settle()
        assert held.moving_to == b.name
        net.cut(a.name, b.name)  # the ActorMove is lost with the link
        net.clock.advance(2.5)
        await settle()
        assert held.in_doubt
        if target_restarts:  # b exits and a new process takes its name: the move died
            net.leave(b)
            net.names = itertools.count(2)
            assert (await net.spawn_node()).name == b.name
        # Linked again (the same process, asked the same move again, takes it).
        net.heal(frozenset((a.name, b.name)))
        for _ in range(8):  # the resolver's back-off tops out at 1 s: 8 rounds of 1.1 s
            await tick(net)
            single(net, key)
        assert not held.in_doubt
        assert holders(net, key) == [a.name if target_restarts else b.name]
        assert (await call(net, c, key, 2)).status is Status.REPLIED
        assert handled(net, key) == [[c.name, 1], [c.name, 2]]

    run(scenario)


@pytest.mark.parametrize("accepted", [False, True])
def test_an_actor_whose_move_the_drain_deadline_cut_is_reported_or_exported(
    accepted: bool,
) -> None:
    """Counted once in the drain's report, which is read after its streams: in doubt while
    it is, then moved (the late answer accepted it) or here again and exported."""

    async def scenario(net: Net) -> None:
        a, b = await net.spawn_node(), await net.spawn_node()
        key = key_placed_on(net, a, [a, b])
        assert (await call(net, b, key, 1)).status is Status.REPLIED
        a.serving = False
        stats = await a.host.drain(net.clock.now() + 0.2)  # b does not answer in time
        assert (stats.moved, stats.in_doubt) == (0, 1)
        b.serving = accepted  # draining too, b refuses the move delivered late
        await flush(net)
        assert holders(net, key) == [b.name if accepted else a.name]
        exported = list(a.host.take())
        accounted = stats.moved + stats.in_doubt + a.host.stranded() + len(exported)
        assert accounted == 1
        assert stats.moved == int(accepted)

    run(scenario)


def test_a_state_method_that_raises_does_not_break_the_drain() -> None:
    async def scenario(net: Net) -> None:
        a, b = await net.spawn_node(), await net.spawn_node()
        key = key_placed_on(net, a, [a, b])
        assert (await call(net, b, key, 1)).status is Status.REPLIED
        held = a.host._held[kb(net, key)]

        def broken() -> Any:
            raise RuntimeError("bug in the app's state()")

        held.instance.state = broken  # type: ignore[method-assign,union-attr]
        a.serving = False
        stats = await a.host.drain(net.clock.now() + 5)
        assert stats.refused

    run(scenario)


def test_restored_queued_messages_are_handled_after_start() -> None:
    async def scenario(net: Net) -> None:
        o, c = await net.spawn_node(), await net.spawn_node()
        key = key_placed_on(net, o, [o, c])
        o.host._running = False  # as at node start: restore_snapshots, then host.start()
        body = net.codec.packb([c.name, 1])
        meta = [[[c.incarnation, 1, 2, []]], [[c.incarnation, c.name, 1, 1, 1, body]]]
        assert o.host.put(key, [], meta)
        o.host.start()
        await settle()
        await flush(net)
        assert handled(net, key) == [[c.name, 1]]

    run(scenario)


@pytest.mark.parametrize("deadline_first", [False, True])
def test_a_drain_reports_the_actors_a_rebalance_was_moving(deadline_first: bool) -> None:
    async def scenario(net: Net) -> None:
        a, c = await net.spawn_node(), await net.spawn_node()
        # A key on a that placement gives to the next node to join (n3).
        key = next(
            f"r{i}"
            for i in range(10_000)
            if place(kb(net, f"r{i}"), [a.name, c.name]) == a.name
            and place(kb(net, f"r{i}"), [a.name, c.name, "n3"]) == "n3"
        )
        assert (await call(net, c, key, 1)).status is Status.REPLIED
        t = await net.spawn_node()
        assert t.name == "n3"
        net.clock.advance(2.0)  # past SETTLE
        a.host._rebalance()
        await settle()
        assert a.host._migrating == {kb(net, key)}
        a.serving = False
        if deadline_first:  # the move's answer comes after the drain's deadline
            stats = await a.host.drain(net.clock.now() + 0.3)
            assert (stats.moved, stats.in_doubt) == (0, 1)
            await flush(net)
        else:  # the drain waits for the move and counts it
            reports: list[MoveStats] = []

            async def drain() -> None:
                reports.append(await a.host.drain(net.clock.now() + 30))

            a.host._spawn(drain)
            await flush(net)
            [stats] = reports
        assert holders(net, key) == [t.name]
        assert stats.moved + stats.in_doubt + a.host.stranded() == 1
        assert (stats.moved, stats.successors) == (1, {t.name})

    run(scenario)


def test_a_forged_origin_cannot_silence_another_nodes_channel() -> None:
    async def scenario(net: Net) -> None:
        o, c, x = [await net.spawn_node() for _ in range(3)]
        key = key_placed_on(net, o, [o, c, x])
        assert (await call(net, c, key, 1)).status is Status.REPLIED
        body = net.codec.packb(["x", 1])
        o.host.handle(
            x.name,
            ActorSend(NAMESPACE, kb(net, key), c.incarnation, x.name, 2**39, 1, 1, 1, 0, body),
        )
        await flush(net)
        pending = await call(net, c, key, 2)
        for _ in range(3):
            await tick(net)
        assert pending.status is Status.REPLIED

    run(scenario)


# -- hostile payloads and floods ----------------------------------------------------------------


def test_a_move_payload_cannot_make_a_node_hold_more_than_it_sent() -> None:
    async def scenario(net: Net) -> None:
        o, x = await net.spawn_node(), await net.spawn_node()
        payload = net.codec.packb([None, [["inc-v", 1, 1, [[1, 0, 20_000_000]]]], []])
        o.host.handle(x.name, ActorMove(NAMESPACE, kb(net, "bomb"), 1, 1, 1, payload))
        held = o.host._held.get(kb(net, "bomb"))
        kept = 0
        if held is not None:
            kept = sum(
                len(body) for ch in held.channels.values() for _, body in ch.replies.values()
            )
        assert kept <= 100 * len(payload)

    run(scenario)


def test_a_poisoned_reply_status_does_not_break_an_innocent_senders_link() -> None:
    """A move whose channel table holds a status outside Status is refused whole: no
    reply of it can later make handle() raise for an innocent sender (the mesh would close
    that sender's link at each resend)."""

    async def scenario(net: Net) -> None:
        o, c, x = [await net.spawn_node() for _ in range(3)]
        channels = [[c.incarnation, 1, 2, [[1, 99, net.codec.packb("x")]]]]
        payload = net.codec.packb([None, channels, []])
        o.host.handle(x.name, ActorMove(NAMESPACE, kb(net, "p"), 1, 1, 1, payload))
        assert kb(net, "p") not in o.host._held
        body = net.codec.packb([c.name, 1])
        o.host.handle(
            c.name, ActorSend(NAMESPACE, kb(net, "p"), c.incarnation, c.name, 1, 1, 1, 1, 0, body)
        )

    run(scenario)


def test_messages_waiting_for_claims_count_in_the_node_bound() -> None:
    async def scenario(net: Net) -> None:
        o, x = await net.spawn_node(), await net.spawn_node()
        o.host.limits = ActorLimits(mailbox=10, queued=10)
        sent = 0
        for i in range(2_000):
            key = f"f{i}"
            if place(kb(net, key), [o.name, x.name]) != o.name:
                continue
            body = net.codec.packb(["x", 1])
            o.host.handle(
                x.name,
                ActorSend(NAMESPACE, kb(net, key), x.incarnation, x.name, 1, 1, 1, 1, 0, body),
            )
            sent += 1
        await settle()  # x never answers the ActorWhere queries (it is slow, or hostile)
        assert sent > 100
        waiting = sum(len(m) for m in o.host._claim_waiting.values())
        assert 0 < waiting <= o.host.stats()["queued"] <= o.host.limits.queued
        busy = [e.message for e in net.wire if isinstance(e.message, ActorReply)]
        assert busy
        assert all(reply.status == Status.BUSY for reply in busy)

    run(scenario)


def test_replies_to_names_that_are_no_peer_hold_nothing() -> None:
    async def scenario(net: Net) -> None:
        o, x = await net.spawn_node(), await net.spawn_node()
        key = key_placed_on(net, x, [o, x])  # placed on x: o answers MOVED to the 'sender'
        for i in range(200):  # 'forwarded' (hops 1): names o does not know pass as senders
            body = net.codec.packb(["x", i])
            o.host.handle(
                x.name,
                ActorSend(NAMESPACE, kb(net, key), f"inc-g{i}", f"ghost{i}", 1, 1, 1, 1, 1, body),
            )
        await settle()
        assert len(o.host._outgoing) <= len(net.nodes)

    run(scenario)


# -- what held: checks that pass (no mark) --------------------------------------------------------


def test_a_handler_that_never_returns_does_not_hold_the_drain_past_its_deadline() -> None:
    async def scenario(net: Net) -> None:
        a, c = await net.spawn_node(), await net.spawn_node()
        key = key_placed_on(net, a, [a, c])
        assert (await call(net, c, key, 1)).status is Status.REPLIED
        held = a.host._held[kb(net, key)]

        async def stuck(message: Any) -> Any:
            await anyio.sleep_forever()

        held.instance.handle = stuck  # type: ignore[method-assign,union-attr]
        await call(net, c, key, 2)
        assert held.running
        a.serving = False
        with anyio.fail_after(5):  # a generous bound on a 0.2 s deadline: never reached
            stats = await a.host.drain(net.clock.now() + 0.2)
        assert stats.moved == 0
        assert a.host.stranded() == 1  # reported as "still handling a message"
        assert list(a.host.take()) == []  # and not exported while it runs

    run(scenario)


@pytest.mark.parametrize("newest_first", [False, True])
def test_a_move_arriving_while_the_target_claims_the_key_keeps_one_activation(
    newest_first: bool,
) -> None:
    async def scenario(net: Net) -> None:
        a, c = await net.spawn_node(), await net.spawn_node()
        key = next(
            f"r{i}"
            for i in range(10_000)
            if place(kb(net, f"r{i}"), [a.name, c.name]) == a.name
            and place(kb(net, f"r{i}"), [a.name, c.name, "n3"]) == "n3"
        )
        assert (await call(net, a, key, 1)).status is Status.REPLIED
        t = await net.spawn_node()
        pending = await c.host.submit(key, [c.name, 1], want_reply=True, time_limit=10)
        await settle()
        assert [e.target for e in net.wire] == [t.name]
        net.deliver(0)  # c's message reaches t (placement), which claims the key...
        await settle()
        assert kb(net, key) in t.host._claims
        net.clock.advance(2.0)
        a.host._rebalance()  # ... while a moves the actor to t
        await settle()
        for _ in range(200):
            if not net.wire:
                await tick(net)
                if not net.wire:
                    break
            net.deliver(len(net.wire) - 1 if newest_first else 0)
            await settle()
            single(net, key)
        assert pending.status is Status.REPLIED
        assert holders(net, key) == [t.name]
        assert handled(net, key) == [[a.name, 1], [c.name, 1]]

    run(scenario)


def test_answers_for_queries_and_moves_that_do_not_exist_are_ignored() -> None:
    async def scenario(net: Net) -> None:
        from handoff.protocol import ActorHere

        o, x = await net.spawn_node(), await net.spawn_node()
        key = key_placed_on(net, o, [o, x])
        assert (await call(net, x, key, 1)).status is Status.REPLIED
        before = (dict(o.host._held), len(o.host._queries), len(o.host._moves))
        for i in range(1, 50):
            o.host.handle(x.name, ActorHere(NAMESPACE, kb(net, key), i, 1, x.name))
            o.host.handle(x.name, ActorMoved(NAMESPACE, kb(net, key), i, 1, ""))
        await settle()
        assert (dict(o.host._held), len(o.host._queries), len(o.host._moves)) == before
        assert holders(net, key) == [o.name]
        assert (await call(net, x, key, 2)).status is Status.REPLIED

    run(scenario)


def test_malformed_move_payloads_are_refused_and_leave_nothing() -> None:
    async def scenario(net: Net) -> None:
        o, x = await net.spawn_node(), await net.spawn_node()
        bad = [
            b"\xc0",
            net.codec.packb([1, 2]),
            net.codec.packb([None, [[1, 2]], []]),
            net.codec.packb([None, [["o", "g", 1, []]], []]),
            net.codec.packb([None, [], [[1, 2, 3]]]),
            net.codec.packb([None, [], [["o", "s", 1, 1, 1, "not bytes"]]]),
            net.codec.packb([None, [], [["o", "s", 1, 1, 1, b"m"]] * 2_000]),
        ]
        for i, payload in enumerate(bad, start=1):
            o.host.handle(x.name, ActorMove(NAMESPACE, kb(net, f"m{i}"), i, 1, 1, payload))
        await settle()
        assert o.host._held == {}
        answers = [e.message for e in net.wire if isinstance(e.message, ActorMoved)]
        assert len(answers) == len(bad)
        assert not any(a.accepted for a in answers)

    run(scenario)


def test_a_drain_moves_the_most_recently_messaged_actors_first() -> None:
    async def scenario(net: Net) -> None:
        a, b = await net.spawn_node(), await net.spawn_node()
        keys = [key_placed_on(net, a, [a, b], prefix=p) for p in ("x", "y", "z")]
        for key in (keys[2], keys[0], keys[1]):  # y last, then x, then z
            assert (await call(net, b, key, 1)).status is Status.REPLIED
            net.clock.advance(1.0)
        a.serving = False
        a.host._spawn(a.host.drain, net.clock.now() + 30)
        await settle()
        moves = [e.message.key for e in net.wire if isinstance(e.message, ActorMove)]
        assert moves == [kb(net, keys[1]), kb(net, keys[0]), kb(net, keys[2])]

    run(scenario)


def test_a_peer_that_never_held_an_actor_cannot_forward_messages_into_its_channels() -> None:
    """A 'forwarded' message (hops > 0) speaks for its sender on the forwarder's word, so
    only a node the actor came from may forward to it: another peer could otherwise put
    a message of its own under a sender's next sequence number, and the sender's real
    message would be answered with the forged one's reply (lost)."""

    async def scenario(net: Net) -> None:
        o, c, x = [await net.spawn_node() for _ in range(3)]
        key = key_placed_on(net, o, [o, c, x])
        assert (await call(net, c, key, 1)).status is Status.REPLIED
        gen = c.host._outboxes[kb(net, key)].gen
        forged = net.codec.packb(["x", 666])
        fresh = key_placed_on(net, o, [o, c, x], prefix="fresh")
        # Moves of the actor o holds, "repeated" (epoch 1) and refused (2): neither makes x
        # a node the actor came from.
        payload = net.codec.packb([None, [], []])
        for epoch in (1, 2):
            o.host.handle(x.name, ActorMove(NAMESPACE, kb(net, key), 7 + epoch, epoch, 1, payload))
        for hops, target_key in ((1, key), (1, fresh)):
            o.host.handle(
                x.name,
                ActorSend(
                    NAMESPACE, kb(net, target_key), c.incarnation, c.name, gen, 2, 1, 1, hops,
                    forged,
                ),
            )  # fmt: skip
        await flush(net)
        pending = await call(net, c, key, 2)
        assert await answer_within(net, pending, 3) == 2
        assert handled(net, key) == [[c.name, 1], [c.name, 2]]
        assert holders(net, fresh) == []  # nothing activated on a forwarder's word

    run(scenario)


def test_a_forwarded_message_never_starts_a_fresh_activation() -> None:
    """A peer 'forwarding' a forged message for a key nobody holds does not make its
    placement owner activate the key and handle the message under another sender's name."""

    async def scenario(net: Net) -> None:
        o, c, x = [await net.spawn_node() for _ in range(3)]
        fresh = key_placed_on(net, o, [o, c, x], prefix="fresh")
        forged = net.codec.packb(["x", 666])
        o.host.handle(
            x.name,
            ActorSend(
                NAMESPACE, kb(net, fresh), c.incarnation, c.name, 1, 1, 1, 1, 1, forged
            ),
        )  # fmt: skip
        await flush(net)
        assert holders(net, fresh, unfrozen=False) == []
        pending = await call(net, c, fresh, 1)  # c's own first message: activated, handled
        assert pending.status is Status.REPLIED
        assert handled(net, fresh) == [[c.name, 1]]

    run(scenario)


def test_a_reply_or_redirect_counts_only_from_a_node_the_message_went_to() -> None:
    """A peer the message never went to cannot answer it (the sender would return a forged
    reply and the real one would be lost to it) nor redirect it (to itself, to answer the
    re-sent message as it likes): a sender takes answers only from the node it sent the
    message to, and from those that one said the message went to."""

    async def scenario(net: Net) -> None:
        o, c, x = [await net.spawn_node() for _ in range(3)]
        key = key_placed_on(net, o, [o, c, x])
        assert (await call(net, c, key, 1)).status is Status.REPLIED
        gen = c.host._outboxes[kb(net, key)].gen
        second = await c.host.submit(key, [c.name, 2], want_reply=True, time_limit=10)
        third = await c.host.submit(key, [c.name, 3], want_reply=True, time_limit=10)
        await settle()
        assert [e.target for e in net.wire] == [o.name, o.name]  # not delivered yet
        forged = net.codec.packb(["x", 666])
        c.host.handle(x.name, ActorReply(NAMESPACE, kb(net, key), gen, 2, 0, "", forged))
        c.host.handle(x.name, ActorReply(NAMESPACE, kb(net, key), gen, 3, 3, x.name, b"\xc0"))
        await settle()
        assert not second.done.is_set()
        assert not [e for e in net.wire if e.target == x.name]  # nothing re-sent to x
        await flush(net)
        for number, pending in ((2, second), (3, third)):
            assert pending.status is Status.REPLIED
            assert net.codec.unpackb(pending.answer) == number
        assert handled(net, key) == [[c.name, 1], [c.name, 2], [c.name, 3]]

    run(scenario)


def test_messages_a_moved_owner_hands_over_or_forwards_are_answered_by_the_new_one() -> None:
    """What a moving owner's mailbox hands over, and what it forwards afterwards, is
    answered by the new owner: the old one tells each sender where its messages went, so
    their answers count (a sender takes answers only from the nodes its messages went to)."""

    async def scenario(net: Net) -> None:
        o, c = await net.spawn_node(), await net.spawn_node()
        # Placed on o, and on the node that joins next once it serves (so that o keeps a
        # forwarding pointer instead of asking where the actor is).
        key = next(
            k
            for k in (f"k{i}" for i in range(10_000))
            if place(kb(net, k), [o.name, c.name]) == o.name
            and place(kb(net, k), [o.name, c.name, "n3"]) == "n3"
        )
        assert (await call(net, c, key, 1)).status is Status.REPLIED
        held = o.host._held[kb(net, key)]
        await o.host._freeze(held)
        pendings = [
            await c.host.submit(key, [c.name, n], want_reply=True, time_limit=10) for n in (2, 3)
        ]
        await flush(net)
        assert len(held.mailbox) == 2
        assert not any(p.done.is_set() for p in pendings)
        n = await net.spawn_node()
        assert n.name == "n3"
        async with anyio.create_task_group() as group:
            group.start_soon(o.host.migrate, held, n.name, MoveStats())
            await flush(net)
        assert holders(net, key) == [n.name]
        assert [net.codec.unpackb(p.answer) for p in pendings] == [2, 3]  # no re-send needed
        # c still routes to o (as if n's replies had not come yet): o's pointer forwards.
        c.host._outboxes[kb(net, key)].route = o.name
        fourth = await c.host.submit(key, [c.name, 4], want_reply=True, time_limit=10)
        await flush(net)
        assert fourth.status is Status.REPLIED
        assert net.codec.unpackb(fourth.answer) == 4
        assert holders(net, key) == [n.name]
        assert handled(net, key) == [[c.name, n] for n in (1, 2, 3, 4)]

    run(scenario)


def test_a_message_queued_in_a_record_is_answered_by_the_node_that_took_it() -> None:
    """A message queued when the drain's export took its actor is handled where the record
    lands; the exporter tells the sender so once that node says it holds the actor, and its
    answer counts without waiting for a re-send."""

    async def scenario(net: Net) -> None:
        a, b, c = [await net.spawn_node() for _ in range(3)]
        key = key_placed_on(net, a, [a, b, c])
        assert (await call(net, c, key, 1)).status is Status.REPLIED
        a.host._held[kb(net, key)].frozen = True  # the next message waits in the mailbox
        pending = await call(net, c, key, 2)
        a.serving = False
        (record,) = a.host.take()
        assert record[2][1]  # the queued message travels in the record
        assert b.host.put(*record)
        # Five ticks of 0.1 s: less than RESEND_AFTER in all, so no re-send.
        assert await answer_within(net, pending, 5, 0.1) == 2
        assert holders(net, key) == [b.name]
        assert handled(net, key) == [[c.name, 1], [c.name, 2]]

    run(scenario)


def test_a_reply_lost_before_the_export_is_answered_where_the_record_lands() -> None:
    """A record carries its channels' kept replies: a message handled before the export,
    whose reply was lost, is answered again where the record lands (never silence for
    ever, never handled twice)."""

    async def scenario(net: Net) -> None:
        a, b, c = [await net.spawn_node() for _ in range(3)]
        key = key_placed_on(net, a, [a, b, c])
        assert (await call(net, c, key, 1)).status is Status.REPLIED
        pending = await c.host.submit(key, [c.name, 2], want_reply=True, time_limit=10)
        await flush(net, drop=lambda message: isinstance(message, ActorReply))
        assert not pending.done.is_set()
        a.serving = False
        (record,) = a.host.take()
        assert b.host.put(*record)
        assert await answer_within(net, pending, 4) == 2
        assert handled(net, key) == [[c.name, 1], [c.name, 2]]

    run(scenario)


def test_a_malformed_record_is_refused_and_leaves_nothing() -> None:
    """A record whose channels or queued messages are malformed (a forged or corrupt chunk,
    more replies than a channel keeps) is refused before the actor is held: refused after, the
    key stayed held frozen with nobody confirming it (wedged for ever, every message to it
    queued), and a good record of it was then kept out ('held already')."""

    async def scenario(net: Net) -> None:
        o, c = await net.spawn_node(), await net.spawn_node()
        body = net.codec.packb([c.name, 1])
        bad = [
            [[[c.incarnation, "not a gen", 2, []]], []],
            [[[c.incarnation, 1, b"12", []]], []],
            [[], [[c.incarnation, c.name, 1]]],
            [[], [[c.incarnation, c.name, "g", 1, 1, body]]],
            [[], [[c.incarnation, c.name, 1, 1, 1, "not bytes"]]],
            [[[None, 1, 2, []]], []],
            [[[c.incarnation, 1, 2, [[1, 0, b"r"]] * (WINDOW + 1)]], []],
        ]
        for i, meta in enumerate(bad, start=1):
            with pytest.raises((TypeError, ValueError)):
                o.host.put(f"r{i}", [], meta)
            assert kb(net, f"r{i}") not in o.host._held, i
        assert o.host._queued == 0
        # A record of an earlier build (no kept replies) is held; so is one from a node
        # with a larger mailbox (the record is the actor's only copy).
        assert o.host.put("r1", [], [[[c.incarnation, 1, 2, []]], []])
        more = ActorLimits().mailbox + 1
        queued = [[c.incarnation, c.name, 1, s, 1, body] for s in range(2, 2 + more)]
        assert o.host.put("r2", [], [[], queued])
        assert len(o.host._held[kb(net, "r2")].mailbox) == o.host._queued == more

    run(scenario)


@pytest.mark.parametrize("named", ["strangers", "the sender", "a circle"])
def test_redirects_past_the_answerer_bound_do_not_lose_a_call(named: str) -> None:
    """A node the message went to (here x, made one by hand) names more nodes than a
    message keeps answerers for (17 redirects: strangers, the sender itself, or a circle
    through itself) while the holder's reply is on its way: the holder's answer may be
    dropped (it left the bound), but the call is answered (the re-send reaches the holder,
    which answers from its kept reply) and handled once."""

    async def scenario(net: Net) -> None:
        o, c, x = [await net.spawn_node() for _ in range(3)]
        key = key_placed_on(net, o, [o, c, x])
        assert (await call(net, c, key, 1)).status is Status.REPLIED
        outbox = c.host._outboxes[kb(net, key)]
        pending = await c.host.submit(key, [c.name, 2], want_reply=True, time_limit=60)
        await settle()
        pending.answerers.append(x.name)
        net.deliver(0)  # o takes the message; its reply waits on the wire
        await settle()
        names = {
            "strangers": [f"ghost{i}" for i in range(MAX_ANSWERERS + 1)],
            "the sender": [c.name] * (MAX_ANSWERERS + 1),
            "a circle": [x.name, o.name] * MAX_ANSWERERS,
        }[named]
        for holder in names:
            reply = ActorReply(NAMESPACE, kb(net, key), outbox.gen, 2, 3, holder, b"\xc0")
            c.host.handle(x.name, reply)
            await settle()
        assert await answer_within(net, pending, 10) == 2
        assert handled(net, key) == [[c.name, 1], [c.name, 2]]
        single(net, key)

    run(scenario)


def test_a_message_forwarded_while_the_key_is_claimed_does_not_enter_its_channels() -> None:
    """A 'forwarded' message from a peer that never held the actor, arriving while the
    node claims the key (the sender's first message started the claim), waited with the
    claim's messages and entered the new activation's channels unchecked: its forged
    message took the sender's next sequence number, and the sender's real one was answered
    with the forged one's reply (lost)."""

    async def scenario(net: Net) -> None:
        o, c, x = [await net.spawn_node() for _ in range(3)]
        key = key_placed_on(net, o, [o, c, x])
        first = await c.host.submit(key, [c.name, 1], want_reply=True, time_limit=10)
        await settle()
        net.deliver(0)  # o claims the key: it asks c and x
        await settle()
        assert kb(net, key) in o.host._claims
        gen = c.host._outboxes[kb(net, key)].gen
        forged = net.codec.packb(["x", 666])
        o.host.handle(
            x.name,
            ActorSend(NAMESPACE, kb(net, key), c.incarnation, c.name, gen, 2, 1, 1, 1, forged),
        )
        await flush(net)
        assert first.status is Status.REPLIED
        pending = await call(net, c, key, 2)
        assert await answer_within(net, pending, 3) == 2
        assert handled(net, key) == [[c.name, 1], [c.name, 2]]

    run(scenario)


@pytest.mark.xfail(
    strict=True,
    reason="the exporter answers 'wait' for the key until the node that took its record "
    "says it holds it; if that node crashes first, the key stays unavailable while the "
    "exporter lives (the deep simulation's long seed 27 with PYTHONHASHSEED=8). Proposed "
    "fix: remember the nodes that asked about the key while in transit (possible takers) "
    "and end the transit when one of them is known gone (its record gave way to no one: "
    "what it held is lost with it, as for any crash); a record landing later is checked "
    "against the running activation by put()'s confirmation as now",
)
def test_a_record_taker_that_crashes_before_confirming_does_not_wedge_the_key() -> None:
    async def scenario(net: Net) -> None:
        a, b, c = [await net.spawn_node() for _ in range(3)]
        key = key_placed_on(net, a, [a, b, c])
        assert (await call(net, c, key, 1)).status is Status.REPLIED
        a.serving = False
        (record,) = a.host.take()
        assert b.host.put(*record)
        await settle()
        net.crash(b)  # before its confirmation reached a (its questions die with it)
        pending = await c.host.submit(key, [c.name, 2], want_reply=True, time_limit=60)
        await answer_within(net, pending, 8)

    run(scenario)
