"""A hostile authenticated successor against a draining node (invariants 1, 7 and 9).

The attacker is a real mesh member (it knows the cookie) with a newer release, so that a
draining node offers it every namespace first. It then misbehaves on the stream: withdraws
at once, acknowledges what it never got, acknowledges wrong counts, or accepts and never
acknowledges. Whatever it does, the drain ends by its deadline, its report adds up, and
what the attacker did not acknowledge reaches the honest successor or is reported dropped.
(What an authenticated peer acknowledges and then throws away cannot be told from a good
successor: the cookie is trust.)
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from handoff import Node
from handoff._codec import Codec
from handoff.adapters.mapping import MappingAdapter
from handoff.engine import Drainer, DrainReport, Tracked
from handoff.engine._sender import STALL_CEILING, STALL_SHARE
from handoff.membership import Peer
from handoff.protocol import (
    Accept,
    Ack,
    Chunk,
    End,
    LocalNode,
    Message,
    NamespaceVersion,
    NodeState,
    Offer,
    Refuse,
)
from handoff.transforms import Transforms
from handoff.transport import PeerLink
from tests._helpers import CLUSTER, COOKIE, wait_until
from tests.test_mesh import Harness

pytestmark = pytest.mark.anyio

ENTRIES = 2_000
Behaviour = Callable[["Hostile", PeerLink, Message], Awaitable[None]]


class Hostile(Harness):
    """A mesh member announcing a newer release and the namespace ``n``; ``behaviour``
    answers the stream messages the draining node sends it."""

    def __init__(self, behaviour: Behaviour) -> None:
        super().__init__("hostile", "127.0.0.4")
        self.behaviour = behaviour
        self.chunks = 0

    def _local_node(self) -> LocalNode:
        return LocalNode(
            CLUSTER,
            self.name,
            "incarnation-of-hostile",
            "v9",
            time.time(),
            state=self.mesh.state,
            namespaces=(NamespaceVersion("n", 1),),
        )

    async def _session(self, peer: str, link: PeerLink, message: Message) -> None:
        if isinstance(message, Chunk):
            self.chunks += 1
        await self.behaviour(self, link, message)


def _node(name: str, host: str, release: str, discovery: str, timeout: float = 3.0) -> Node:
    return Node(
        CLUSTER,
        cookie=COOKIE,
        name=name,
        release=release,
        bind=f"{host}:0",
        discovery=discovery,
        poll_interval=0.1,
        heartbeat_timeout=2.0,
        handshake_timeout=1.0,
        connect_timeout=1.0,
        drain_timeout=timeout,
        control_socket="none",
        environ={},
    )


@asynccontextmanager
async def attacked(
    behaviour: Behaviour, *, drain_timeout: float = 3.0
) -> AsyncIterator[tuple[Node, dict[str, Any], Hostile]]:
    """A draining-to-be node ``old`` (v1) with ENTRIES keys, an honest successor (v2)
    and the hostile one (v9), all connected."""
    hostile = Hostile(behaviour)
    received: dict[str, Any] = {}
    async with hostile.run():
        honest = _node("honest", "127.0.0.3", "v2", "none")
        honest.track("n", received)
        async with honest:
            discovery = f"static:127.0.0.4:{hostile.port},{honest.address}"
            old = _node("old", "127.0.0.2", "v1", discovery, drain_timeout)
            # Split: the tests follow which successor holds which share.
            old.track("n", {f"k{i}": i for i in range(ENTRIES)}, spread="split")
            async with old:
                await wait_until(lambda: len(old.peers()) == 2)
                yield old, received, hostile


def _adds_up(report: DrainReport) -> None:
    ns = report.namespaces["n"]
    assert ns.records == ENTRIES
    assert ns.records == ns.acknowledged + ns.snapshotted + sum(ns.dropped.values()), ns
    assert ns.acknowledged == ns.applied + ns.kept_existing + sum(ns.receiver_dropped.values())


async def _timed_drain(old: Node) -> tuple[DrainReport, float]:
    started = time.monotonic()
    report = await old.drain()
    return report, time.monotonic() - started


# -- behaviours ---------------------------------------------------------------------------------


async def withdraw_at_once(hostile: Hostile, link: PeerLink, message: Message) -> None:
    if isinstance(message, Offer):
        await link.send(Accept(message.stream, 4))
        await link.send(Refuse(message.stream, "draining (not really)"))


async def ack_then_withdraw(hostile: Hostile, link: PeerLink, message: Message) -> None:
    """Acknowledges the first chunk as applied (and drops it), then withdraws."""
    if isinstance(message, Offer):
        await link.send(Accept(message.stream, 4))
    elif isinstance(message, Chunk) and message.seq == 0:
        await link.send(Ack(message.stream, 0, message.records, 0, (), 1))
        await link.send(Refuse(message.stream, "withdrawn"))


async def ack_wrong_counts(hostile: Hostile, link: PeerLink, message: Message) -> None:
    if isinstance(message, Offer):
        await link.send(Accept(message.stream, 4))
    elif isinstance(message, Chunk):
        await link.send(Ack(message.stream, message.seq, message.records + 5, 0, (), 1))


async def ack_twice(hostile: Hostile, link: PeerLink, message: Message) -> None:
    if isinstance(message, Offer):
        await link.send(Accept(message.stream, 4))
    elif isinstance(message, Chunk):
        ack = Ack(message.stream, message.seq, message.records, 0, (), 1)
        await link.send(ack)
        await link.send(ack)


async def ack_unsent_chunks(hostile: Hostile, link: PeerLink, message: Message) -> None:
    if isinstance(message, Offer):
        await link.send(Accept(message.stream, 4))
        await link.send(Ack(message.stream, 7, 3, 0, (), 1))


async def refuse_spam(hostile: Hostile, link: PeerLink, message: Message) -> None:
    """Refusals and Acks for streams that do not exist, then an honest receiver's part
    (which drops everything it acknowledges)."""
    if isinstance(message, Offer):
        for stream in range(1, 200):
            if stream != message.stream:
                await link.send(Refuse(stream, "never offered"))
                await link.send(Ack(stream, 0, 1, 0, (), 1))
        await link.send(Accept(message.stream, 4))
    elif isinstance(message, Chunk):
        await link.send(
            Ack(message.stream, message.seq, 0, 0, (("thrown away", message.records),), 1)
        )


async def accept_and_sit(hostile: Hostile, link: PeerLink, message: Message) -> None:
    if isinstance(message, Offer):
        await link.send(Accept(message.stream, 1024))


# -- the attacks ----------------------------------------------------------------------------------


async def test_a_successor_that_withdraws_at_once_costs_nothing() -> None:
    async with attacked(withdraw_at_once) as (old, received, _):
        report, elapsed = await _timed_drain(old)
    _adds_up(report)
    assert len(received) == ENTRIES
    assert report.ok, report.summary()
    assert elapsed < 3.0


async def test_a_successor_that_acknowledges_then_withdraws_is_not_double_counted() -> None:
    async with attacked(ack_then_withdraw) as (old, received, _):
        report, elapsed = await _timed_drain(old)
    _adds_up(report)
    ns = report.namespaces["n"]
    # The hostile node acknowledged its first chunk; the rest reached the honest one.
    assert ns.acknowledged == ENTRIES
    assert len(received) < ENTRIES
    assert ns.applied == ENTRIES  # what it claimed, and what honest applied
    assert set(ns.successors) == {"hostile", "honest"}
    assert elapsed < 3.0


@pytest.mark.parametrize(
    ("behaviour", "acknowledges"),
    [(ack_wrong_counts, False), (ack_twice, True), (ack_unsent_chunks, False)],
)
async def test_acks_that_do_not_add_up_cost_the_link_not_the_records(
    behaviour: Behaviour, acknowledges: bool
) -> None:
    async with attacked(behaviour) as (old, received, _):
        report, elapsed = await _timed_drain(old)
    _adds_up(report)
    ns = report.namespaces["n"]
    # Whatever the hostile node acknowledged is counted once; the rest went to honest.
    assert ns.dropped == {}
    assert ns.acknowledged == ns.applied == ENTRIES
    if acknowledges:  # its first chunk, before the duplicate Ack cost it the link
        assert 0 < len(received) < ENTRIES
    else:
        assert len(received) == ENTRIES
    assert elapsed < 3.0


async def test_refusals_and_acks_for_streams_never_offered_are_ignored() -> None:
    # The hostile node sends its ~400 messages before it accepts, so the drain's stall time
    # (STALL_SHARE of drain_timeout, at most STALL_CEILING) must outlast them, or it gives
    # up on the hostile offer as unanswered and this tests nothing of the spam: at 3 s (a
    # 0.6 s stall) that failed at load ~22. At 15 s the stall is the ceiling, 3 s; an
    # unloaded run takes what it did (the drain ends when both streams do).
    timeout = STALL_CEILING / STALL_SHARE
    async with attacked(refuse_spam, drain_timeout=timeout) as (old, received, _):
        report, elapsed = await _timed_drain(old)
    _adds_up(report)
    ns = report.namespaces["n"]
    assert "hostile" not in ns.refusals, ns.refusals
    # It "applied" nothing of its share: what it dropped is on the report, which is not ok.
    assert ns.receiver_dropped["thrown away"] + len(received) == ENTRIES
    assert not report.ok
    # The spam held nothing up to the deadline.
    assert elapsed < timeout


async def test_a_successor_that_accepts_and_never_acknowledges_cannot_hold_the_deadline() -> None:
    async with attacked(accept_and_sit, drain_timeout=1.5) as (old, _, _):
        report, elapsed = await _timed_drain(old)
    _adds_up(report)
    assert elapsed < 1.5 + 0.5
    # Nothing is acknowledged by the hostile node: past the stall time its stream is
    # cancelled and what it held unacknowledged goes to the honest successor (it used to
    # be dropped at the deadline, no snapshot store), with the reason on the report.
    assert report.ok, report.summary()
    [ns] = report.namespaces.values()
    assert ns.successors == ["honest"]
    assert ns.refusals["hostile"].startswith("made no progress for")


# -- a withdrawal between two Ends (a fake link: no timing involved) ------------------------------


class _Link:
    """Answers at once like a good receiver; ``on_end`` runs while an End is being sent."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.drainer: Drainer | None = None
        self.on_end: Callable[[], None] = lambda: None
        self.sent: list[Message] = []

    async def send(self, message: Message, *, time_limit: float | None = None) -> None:
        assert self.drainer is not None
        self.sent.append(message)
        if isinstance(message, Offer):
            self.drainer.on_message(self.peer, Accept(message.stream, 4))
        elif isinstance(message, Chunk):
            ack = Ack(message.stream, message.seq, message.records, 0, (), 1)
            self.drainer.on_message(self.peer, ack)
        elif isinstance(message, End):
            self.on_end()
        await anyio.lowlevel.checkpoint()


def _successor(name: str) -> Peer:
    return Peer(name, "v2", "", NodeState.SERVING, {"n": 1}, 0.0, "x", 1, 0.0)


async def test_a_successor_withdrawing_while_another_gets_its_end_does_not_crash_the_drain() -> (
    None
):
    # Both streams were open and fully acknowledged; the End to the first is an await, and
    # meanwhile the second successor withdrew (it started draining) or went down. The
    # drain then sent End on a refused stream: LocalProtocolError out of node.drain(), no
    # report, and no later namespace handed off. (Seen live with a hostile peer, 1 run in 3.)
    links = {name: _Link(name) for name in ("a", "b")}
    data = {f"k{i}": i for i in range(200)}
    drainer = Drainer(
        node="old",
        release="v1",
        cluster=CLUSTER,
        tracked={
            "n": Tracked("n", data, MappingAdapter(data), 1),
            "z": Tracked("z", {}, MappingAdapter({}), 1),
        },
        transforms=Transforms(),
        codec=Codec(),
        snapshots=None,
        peers=lambda: [(_successor(name), link) for name, link in links.items()],
    )
    for link in links.values():
        link.drainer = drainer
    first_end = {"done": False}

    def withdraw_the_other(sender: str) -> Callable[[], None]:
        def hook() -> None:
            if first_end["done"]:
                return
            first_end["done"] = True
            other = "b" if sender == "a" else "a"
            [offer] = [m for m in links[other].sent if isinstance(m, Offer) and m.namespace == "n"]
            drainer.on_message(other, Refuse(offer.stream, "draining"))

        return hook

    links["a"].on_end = withdraw_the_other("a")
    links["b"].on_end = withdraw_the_other("b")
    with anyio.fail_after(5):
        report = await drainer.run(time_limit=3.0)
    ns = report.namespaces["n"]
    assert ns.acknowledged == ns.records == 200
    assert set(ns.successors) == {"a", "b"}
    assert "z" in report.namespaces  # the drain went on to the next namespace
