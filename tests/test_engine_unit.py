"""The engine without sockets: Drainer, Receiver and Sessions of several fake nodes, wired
together by fake links, with time that moves only when the test moves it.

Each fake node has the real engine (Sessions, Receiver, a Drainer per drain), real tracked
namespaces (real adapters on a dict or a ``cachetools.TTLCache``), real transforms and codec.
Between two nodes runs a pair of :class:`Wire` objects, one per direction: ``send`` queues
the message at once (the order of calls is the order on the wire, as with the real link's
buffer) and a pump task delivers it to the other node's ``Sessions.handle``, one message at
a time, as the mesh's link task does. A ProtocolError from a handler drops the link, and
both nodes hear that the peer is lost. A wire can be held (a stalled peer: messages wait),
blocked (sends hang until their time limit, then the link drops), slow (chunks take their
bytes' time to arrive), made to fail, to drop or to rewrite messages. A node's
``StateChange`` travels on the same wires, in order with the stream messages, so a peer
learns that a node drains exactly when it would on a real link.

Time is a :class:`FakeClock`: ``drive`` waits until every task is blocked, then moves the
clock to the next deadline somebody waits for (no sleeps; a loaded machine only makes the
tests slower, never different). Chunks hold 16 records (``small_chunks``), so that a few
hundred records make many chunks.
"""

from __future__ import annotations

import itertools
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import pytest
from cachetools import TTLCache

import handoff
from handoff._adapter import ImportResult, Record
from handoff._codec import Codec
from handoff._errors import ConnectionClosed, HandoffError, ProtocolError
from handoff._registry import adapter_for
from handoff.engine import Drainer, DrainReport, Receiver, Sessions, Tracked, _sender
from handoff.engine._receiver import INITIAL_CREDIT
from handoff.engine._restore import restore_snapshots
from handoff.engine._sessions import INBOUND_SHARE
from handoff.engine._tracked import Spread
from handoff.membership import Peer
from handoff.protocol import (
    Accept,
    Ack,
    Cancel,
    Chunk,
    End,
    Message,
    NodeState,
    Refuse,
    StateChange,
)
from handoff.snapshot import DirectorySnapshotStore
from handoff.transforms import Transforms
from tests._helpers import wait_all_tasks_blocked

pytestmark = pytest.mark.anyio

CLUSTER = "shop"
SEND_TIMEOUT = 30.0
"""A link's own send timeout, for sends without a time limit."""
HANG = 60.0
"""Real seconds after which a test counts as hung (it never waits on real time)."""

T = TypeVar("T")


# -- time -------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Sleeper:
    deadline: float
    wake: anyio.Event = field(default_factory=anyio.Event)


class FakeClock:
    """The engine's Clock: ``now`` moves only by :meth:`advance`; ``wait`` returns when its
    event is set or when the clock is advanced to its deadline."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._sleepers: list[_Sleeper] = []

    def now(self) -> float:
        return self._now

    def next_deadline(self) -> float | None:
        return min((s.deadline for s in self._sleepers), default=None)

    def advance(self, seconds: float) -> None:
        self._now += seconds
        for sleeper in self._sleepers:
            if sleeper.deadline <= self._now:
                sleeper.wake.set()

    async def wait(self, event: anyio.Event, deadline: float) -> bool:
        if event.is_set() or self._now >= deadline:
            return event.is_set()
        sleeper = _Sleeper(deadline)
        self._sleepers.append(sleeper)

        async def on_event() -> None:
            await event.wait()
            sleeper.wake.set()

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(on_event)
                await sleeper.wake.wait()
                group.cancel_scope.cancel()
        finally:
            self._sleepers.remove(sleeper)
        return event.is_set()


# -- links ------------------------------------------------------------------------------------


class Wire:
    """One direction of a link between two fake nodes; the sender's end is the engine's
    :class:`~handoff.engine.Link` to the peer."""

    def __init__(self, net: Net, src: FakeNode, dst: FakeNode) -> None:
        self.net, self.src, self.dst = net, src, dst
        self.queue: deque[Message] = deque()
        self.sent: list[Message] = []
        self.delivered: list[Message] = []
        self.closed = False
        self.held = False
        self.blocked = False
        self.failing = False
        self.drop: Callable[[Message], bool] = lambda message: False
        self.tamper: Callable[[Message], Message] = lambda message: message
        self.hold_after: Callable[[Message], bool] = lambda message: False
        """Hold the wire once a message for which this is true was delivered."""
        self.on_send: Callable[[Message], None] = lambda message: None
        self.max_in_flight = 0
        """The most chunks of one stream sent and not yet acknowledged, as the sender saw."""
        self.bytes_per_second: float | None = None
        """A slow link: each chunk takes its payload's bytes at this rate to arrive."""
        self.seconds_per_chunk = 0.0
        """A receiver whose cost is per chunk (a slow apply, a long round trip): each chunk
        takes this long to arrive, whatever its size."""
        self._more = anyio.Event()
        self._unblocked = anyio.Event()

    def __repr__(self) -> str:
        return f"Wire({self.src.name} -> {self.dst.name})"

    # The Link protocol.
    async def send(self, message: Message, *, time_limit: float | None = None) -> None:
        if self.failing and not self.closed:
            self.net.cut(self.src, self.dst, "send failed")
        if self.closed:
            raise ConnectionClosed(f"link {self.src.name} -> {self.dst.name} is closed")
        self.on_send(message)
        if self.blocked:
            # A full buffer: this message does not get out until unblocked; past the time
            # limit the link is dropped, as the real link does.
            clock = self.net.clock
            limit = SEND_TIMEOUT if time_limit is None else time_limit
            if not await clock.wait(self._unblocked, clock.now() + limit):
                self.net.cut(self.src, self.dst, "send timed out")
            if self.closed:
                raise ConnectionClosed(f"link {self.src.name} -> {self.dst.name} timed out")
        self.sent.append(message)
        if isinstance(message, Chunk):
            self._note_in_flight(message.stream)
        if not self.drop(message):
            self.queue.append(self.tamper(message))
            self._more.set()
        # A real send flushes: other tasks run meanwhile.
        await anyio.lowlevel.checkpoint()

    def _note_in_flight(self, stream: int) -> None:
        back = self.dst.links.get(self.src.name)
        acked = sum(
            1 for m in (back.delivered if back else ()) if isinstance(m, Ack) and m.stream == stream
        )
        sent = sum(1 for m in self.sent if isinstance(m, Chunk) and m.stream == stream)
        self.max_in_flight = max(self.max_in_flight, sent - acked)

    def hold(self) -> None:
        self.held = True

    def release(self) -> None:
        self.held = False
        self._more.set()

    def block(self) -> None:
        """Sends from now on hang (until their time limit, then the link drops)."""
        self.blocked = True
        self._unblocked = anyio.Event()

    def unblock(self) -> None:
        self.blocked = False
        self._unblocked.set()

    def close(self) -> None:
        self.closed = True
        self.queue.clear()
        self._more.set()
        self._unblocked.set()

    def types(self, messages: Iterable[Message] | None = None) -> list[str]:
        return [type(m).__name__ for m in (self.delivered if messages is None else messages)]

    async def pump(self) -> None:
        while not self.closed:
            if self.held or not self.queue:
                self._more = anyio.Event()
                await self._more.wait()
                continue
            message = self.queue.popleft()
            if isinstance(message, Chunk) and (self.bytes_per_second or self.seconds_per_chunk):
                clock = self.net.clock
                arrives = clock.now() + self.seconds_per_chunk
                if self.bytes_per_second is not None:
                    arrives += len(message.payload) / self.bytes_per_second
                await clock.wait(anyio.Event(), arrives)
                if self.closed:
                    break
            self.delivered.append(message)
            if self.hold_after(message):
                self.held = True
            try:
                await self.dst.deliver(self.src, message)
            except ProtocolError as exc:
                # What the mesh does: log, drop the link, both ends lose the peer.
                self.net.protocol_errors.append((self.dst.name, self.src.name, str(exc)))
                self.net.cut(self.src, self.dst, f"protocol error: {exc}")
            except HandoffError as exc:
                # An answer sent on a link that went down meanwhile: the link is gone.
                self.net.cut(self.src, self.dst, f"connection lost: {exc}")


# -- nodes ------------------------------------------------------------------------------------


def track(name: str, obj: Any, version: int = 1, spread: Spread | None = None) -> Tracked:
    return Tracked(name, obj, adapter_for(obj), version, spread=spread)


class FakeNode:
    """One node's engine: what ``handoff.Node`` wires, minus the mesh and sockets."""

    def __init__(
        self,
        net: Net,
        name: str,
        release: str,
        tracked: Iterable[Tracked],
        *,
        started_at: float,
        transforms: Transforms | None,
        snapshots: DirectorySnapshotStore | None,
    ) -> None:
        self.net, self.name, self.release, self.started_at = net, name, release, started_at
        self.tracked = {t.name: t for t in tracked}
        self.transforms = transforms if transforms is not None else Transforms()
        self.codec = Codec()
        self.snapshots = snapshots
        self.state = NodeState.SERVING
        self.links: dict[str, Wire] = {}
        self.view: dict[str, NodeState] = {}
        """The state of each peer as this node last heard it."""
        self.stream_ids = itertools.count(1)
        self.completed: list[tuple[str, int]] = []
        """Done messages received: (peer, records it says this node acknowledged)."""
        self.receiver = Receiver(
            node=name,
            tracked=self.tracked,
            transforms=self.transforms,
            codec=self.codec,
            accepting=self._refusal,
            on_complete=lambda peer, records, _: self.completed.append((peer, records)),
            clock=net.clock,
        )
        self.sessions = Sessions(self.receiver, clock=net.clock)

    def __repr__(self) -> str:
        return f"FakeNode({self.name})"

    def _refusal(self) -> str:
        return f"{self.name} is draining" if self.state is NodeState.DRAINING else ""

    def data(self, namespace: str) -> Any:
        return self.tracked[namespace].obj

    def as_peer(self, state: NodeState) -> Peer:
        return Peer(
            name=self.name,
            release=self.release,
            address=f"{self.name}:4370",
            state=state,
            namespaces={name: t.version for name, t in self.tracked.items()},
            started_at=self.started_at,
            incarnation=f"{self.name}-1",
            protocol_version=1,
            clock_offset=0.0,
        )

    def peers(self) -> list[tuple[Peer, Wire]]:
        nodes = self.net.nodes
        return [(nodes[name].as_peer(self.view[name]), wire) for name, wire in self.links.items()]

    async def deliver(self, src: FakeNode, message: Message) -> None:
        if isinstance(message, StateChange):
            self.view[src.name] = message.state
            return
        await self.sessions.handle(src.name, self.links[src.name], message)

    async def drain(self, time_limit: float = 10.0) -> DrainReport:
        """What ``Node.drain`` does: announce draining, then let Sessions run the drain."""
        self.state = NodeState.DRAINING
        for wire in list(self.links.values()):
            await wire.send(StateChange(NodeState.DRAINING))
        drainer = Drainer(
            node=self.name,
            release=self.release,
            cluster=CLUSTER,
            tracked=self.tracked,
            transforms=self.transforms,
            codec=self.codec,
            snapshots=self.snapshots,
            peers=self.peers,
            clock=self.net.clock,
            wall_clock=lambda: 1_700_000_000.0,
            started_at=self.started_at,
            stream_ids=self.stream_ids,
        )
        report = await self.sessions.drain(drainer, time_limit=time_limit)
        # The node goes on running: Cancels the deadline left no time for go out now.
        self.net.start(self.sessions.send_late)
        return report


@dataclass
class Running(Generic[T]):
    result: T | None = None
    done: anyio.Event = field(default_factory=anyio.Event)


class Net:
    def __init__(self, clock: FakeClock, group: anyio.abc.TaskGroup) -> None:
        self.clock = clock
        self._group = group
        self.nodes: dict[str, FakeNode] = {}
        self.wires: dict[tuple[str, str], Wire] = {}
        self.cuts: list[tuple[str, str, str]] = []
        self.protocol_errors: list[tuple[str, str, str]] = []

    def node(
        self,
        name: str,
        *tracked: Tracked,
        release: str = "v1",
        started_at: float = 0.0,
        transforms: Transforms | None = None,
        snapshots: DirectorySnapshotStore | None = None,
    ) -> FakeNode:
        node = FakeNode(
            self,
            name,
            release,
            tracked,
            started_at=started_at,
            transforms=transforms,
            snapshots=snapshots,
        )
        self.nodes[name] = node
        return node

    def connect(self, *nodes: FakeNode) -> None:
        """Link every pair of ``nodes`` (each sees the other in its current state); a
        pair linked again (the mesh redials) hears that the peer is up, as the node does."""
        linked: list[tuple[FakeNode, FakeNode]] = []
        for a in nodes:
            for b in nodes:
                if a is not b and b.name not in a.links:
                    wire = self.wires[(a.name, b.name)] = Wire(self, a, b)
                    a.links[b.name] = wire
                    a.view[b.name] = b.state
                    self._group.start_soon(wire.pump)
                    linked.append((a, b))
        for a, b in linked:
            asking = a.sessions.peer_up(b.name)
            if asking is not None:  # finished drains' questions, sent as the mesh does
                self._group.start_soon(_awaited, asking)

    def wire(self, src: FakeNode, dst: FakeNode) -> Wire:
        return self.wires[(src.name, dst.name)]

    def cut(self, a: FakeNode, b: FakeNode, reason: str) -> None:
        if b.name not in a.links:
            return
        self.cuts.append((a.name, b.name, reason))
        for wire in (a.links.pop(b.name), b.links.pop(a.name)):
            wire.close()
        a.sessions.peer_lost(b.name)
        b.sessions.peer_lost(a.name)

    def start(self, work: Callable[[], Awaitable[T]]) -> Running[T]:
        running: Running[T] = Running()

        async def run() -> None:
            running.result = await work()
            running.done.set()

        self._group.start_soon(run)
        return running

    async def drive(self, until: Callable[[], bool], *, jumps: int = 200) -> None:
        """Let everything run; whenever all tasks are blocked and ``until()`` is still
        false, move the clock to the next deadline somebody waits for."""
        while True:
            await wait_all_tasks_blocked()
            if until():
                return
            deadline = self.clock.next_deadline()
            if deadline is None:
                # Nobody waits on the clock: a thread (writing a snapshot) is at work, or
                # the test hangs (``network`` bounds that).
                await anyio.sleep(0.01)
                continue
            jumps -= 1
            assert jumps >= 0, "the clock keeps jumping and the test's goal is not reached"
            self.clock.advance(deadline - self.clock.now())

    async def finish(self, running: Running[T]) -> T:
        await self.drive(running.done.is_set)
        assert running.result is not None
        return running.result


async def _awaited(work: Awaitable[None]) -> None:
    await work


@asynccontextmanager
async def network() -> AsyncIterator[Net]:
    with anyio.fail_after(HANG):
        async with anyio.create_task_group() as group:
            net = Net(FakeClock(), group)
            try:
                yield net
            finally:
                group.cancel_scope.cancel()


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every chunk holds 16 records (the first chunk's size, and the least)."""
    monkeypatch.setattr(_sender, "TARGET_CHUNK_BYTES", 1)


# -- data and checks --------------------------------------------------------------------------


def users(prefix: str, count: int) -> dict[str, dict[str, Any]]:
    return {f"{prefix}{i:04d}": {"id": i, "name": f"user {prefix}{i}"} for i in range(count)}


class Timer:
    """A TTLCache timer the test sets (the cache's own clock, not the engine's)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ttl_cache(
    entries: dict[str, Any], *, maxsize: int = 10_000, ttl: float = 300.0
) -> TTLCache[str, Any]:
    cache: TTLCache[str, Any] = TTLCache(maxsize=maxsize, ttl=ttl)
    cache.update(entries)
    return cache


def assert_adds_up(report: DrainReport) -> None:
    for ns in report.namespaces.values():
        assert ns.records == ns.acknowledged + ns.snapshotted + sum(ns.dropped.values()), ns
        assert ns.acknowledged == ns.applied + ns.kept_existing + sum(
            ns.receiver_dropped.values()
        ), ns


def chunk_keys(wire: Wire, seqs: Iterable[int] | None = None) -> list[str]:
    """Keys in the chunks delivered on ``wire`` (all, or those of sequence ``seqs``)."""
    codec = Codec()
    wanted = None if seqs is None else set(seqs)
    keys = []
    for message in wire.delivered:
        if isinstance(message, Chunk) and (wanted is None or message.seq in wanted):
            records = codec.decode_records(message.payload, max_records=message.records)
            keys += [key for key, _, _ in records]
    return keys


def keys_of(obj: Any) -> set[str]:
    return set(obj.keys())


# -- a plain drain ----------------------------------------------------------------------------


async def test_a_plain_drain_is_acknowledged_and_the_report_adds_up() -> None:
    held_users, held_cache = users("u", 300), users("c", 100)
    async with network() as net:
        a = net.node("a", track("users", dict(held_users)), track("cache", ttl_cache(held_cache)))
        b = net.node("b", track("users", {}), track("cache", ttl_cache({})), release="v2")
        net.connect(a, b)
        started = net.clock.now()
        report = await net.finish(net.start(a.drain))
        assert net.clock.now() == started  # nothing ever waited for time to pass

    assert_adds_up(report)
    assert report.ok, report.summary()
    assert (report.records, report.acknowledged, report.snapshotted) == (400, 400, 0)
    for ns, held in (("users", held_users), ("cache", held_cache)):
        assert report.namespaces[ns].applied == len(held)
        assert report.namespaces[ns].successors == ["b"]
        assert dict(b.data(ns)) == held
    assert b.completed == [("a", 400)]
    wire = net.wire(a, b)
    assert wire.types(wire.sent) == [
        "StateChange",
        *(["Offer"] + ["Chunk"] * 7 + ["End"]),  # 100 cache records, first (cache < users)
        *(["Offer"] + ["Chunk"] * 19 + ["End"]),  # 300 users records
        "Done",
    ]
    # Bounded memory: never more chunks in flight than the receiver's credit.
    assert 1 <= wire.max_in_flight <= INITIAL_CREDIT
    assert net.cuts == []
    assert net.protocol_errors == []


# -- a receiver that withdraws ----------------------------------------------------------------


async def test_a_successor_that_withdraws_mid_stream_gets_only_what_it_acknowledged() -> None:
    held = users("a", 200)
    async with network() as net:
        a = net.node("a", track("users", dict(held)), release="v1")
        b = net.node("b", track("users", users("b", 20)), release="v2")  # newer: a's first choice
        c = net.node("c", track("users", {}), release="v1")  # a's next choice, b's only one
        net.connect(a, b, c)
        a_b, b_a = net.wire(a, b), net.wire(b, a)
        # b applies two chunks, then stops reading for a while: what a sends meanwhile
        # waits on the wire and will cross b's withdrawal.
        a_b.hold_after = lambda m: isinstance(m, Chunk) and m.seq == 1
        started = net.clock.now()
        draining_a = net.start(a.drain)
        await net.drive(lambda: a_b.held)
        # b starts draining too: it lets a's stream go on for INBOUND_SHARE of its time,
        # then withdraws.
        draining_b = net.start(b.drain)
        await net.drive(lambda: any(isinstance(m, Refuse) for m in b_a.delivered))
        assert net.clock.now() == pytest.approx(started + 10.0 * INBOUND_SHARE)
        crossing = len(a_b.queue)
        a_b.release()
        report_a = await net.finish(draining_a)
        report_b = await net.finish(draining_b)

    assert crossing > 0  # chunks were on their way when b withdrew
    acknowledged_by_b = chunk_keys(a_b, seqs=(0, 1))
    assert len(acknowledged_by_b) == 32
    # b applied the two chunks it acknowledged and none that crossed its withdrawal.
    assert keys_of(b.data("users")) == set(users("b", 20)) | set(acknowledged_by_b)
    # a's report: every record acknowledged once, by b or by c.
    assert_adds_up(report_a)
    assert report_a.ok, report_a.summary()
    ns = report_a.namespaces["users"]
    assert (ns.records, ns.acknowledged, ns.applied) == (200, 200, 200)
    assert sorted(ns.successors) == ["b", "c"]
    assert b.completed == [("a", 32)]  # a's Done: b is warm, it took part
    assert sorted(c.completed) == [("a", 168), ("b", 52)]
    # b handed on what it acknowledged: nothing ends on a draining node only.
    assert_adds_up(report_b)
    assert report_b.ok
    assert report_b.acknowledged == 52
    assert c.data("users") == {**held, **users("b", 20)}


# -- two nodes drain at once --------------------------------------------------------------------


@pytest.mark.parametrize("stalled", [False, True], ids=["flowing", "stalled"])
@pytest.mark.parametrize("head_start", [0, 1, 2, 3, 5, 8, 12, 100])
async def test_two_nodes_draining_at_once_leave_every_key_on_the_serving_node(
    head_start: int, stalled: bool
) -> None:
    """Issue 7: a and b drain at the same time, c serves. Release names that do not compare
    (git SHAs): a counts b (started after it) as newer, like c, and splits its keys between
    them; b prefers c. Whatever b had received from a when it started draining
    (``head_start`` messages), every key of a and b must end on c, or be reported lost:
    never only on a node that is leaving. ``stalled``: what a sends next reaches b only
    after b's time for inbound streams ran out (b withdraws)."""
    held = {
        "a": (users("a", 150), users("ac", 40)),
        "b": (users("b", 120), users("bc", 30)),
    }
    async with network() as net:
        a = net.node(
            "a",
            track("users", dict(held["a"][0])),
            track("cache", ttl_cache(held["a"][1])),
            release="f00dbee",
            started_at=1.0,
        )
        b = net.node(
            "b",
            track("users", dict(held["b"][0])),
            track("cache", ttl_cache(held["b"][1])),
            release="a11ce55",
            started_at=2.0,
        )
        c = net.node(
            "c",
            track("users", {}),
            track("cache", ttl_cache({})),
            release="c0ffee1",
            started_at=3.0,
        )
        net.connect(a, b, c)
        a_b = net.wire(a, b)
        delivered = 0

        def count(message: Message) -> bool:
            nonlocal delivered
            delivered += 1
            return delivered == head_start

        a_b.hold_after = count
        if head_start == 0:
            a_b.hold()
        draining_a = net.start(a.drain)
        await net.drive(lambda: a_b.held or draining_a.done.is_set())
        draining_b = net.start(b.drain)
        settled = net.clock.now() + 10.0 * INBOUND_SHARE
        if stalled:
            await net.drive(lambda: not b.receiver.active or net.clock.now() >= settled)
        else:
            await net.drive(lambda: b.state is NodeState.DRAINING)
        a_b.release()
        report_a = await net.finish(draining_a)
        report_b = await net.finish(draining_b)

    for report in (report_a, report_b):
        assert_adds_up(report)
        assert report.ok, report.summary()
        assert report.dropped == report.snapshotted == 0
    assert report_a.acknowledged == 190
    # What b acknowledged to a, b exported in its own drain.
    taken_from_a = sum(n for peer, n in b.completed if peer == "a")
    assert report_b.records == 150 + taken_from_a
    for index, ns in enumerate(("users", "cache")):
        everything = {**held["a"][index], **held["b"][index]}
        assert dict(c.data(ns)) == everything
        for node in (a, b):
            # Nothing reached a draining node but through an acknowledged stream.
            assert keys_of(node.data(ns)) <= keys_of(c.data(ns))


# -- drops on the receiver ----------------------------------------------------------------------


async def test_drops_on_the_receiver_make_the_report_not_ok_and_name_every_reason() -> None:
    def upgrade(key: Any, value: Any) -> tuple[Any, Any]:
        if value["id"] % 10 == 0:
            raise KeyError("id")
        return key, {**value, "version": 2}

    newer = Transforms()
    newer.add_upgrade("users", 1, upgrade)
    async with network() as net:
        a = net.node(
            "a", track("users", users("u", 100)), track("cache", ttl_cache(users("c", 50)))
        )
        b = net.node(
            "b",
            track("users", {}, version=2),
            track("cache", ttl_cache({}, maxsize=20)),
            release="v2",
            transforms=newer,
        )
        net.connect(a, b)
        report = await net.finish(net.start(a.drain))

    assert_adds_up(report)
    users_ns, cache_ns = report.namespaces["users"], report.namespaces["cache"]
    # Acknowledged, so the sender is done with them; but not kept, and the report says so.
    assert (users_ns.acknowledged, users_ns.applied) == (100, 90)
    assert users_ns.receiver_dropped == {"transform failed: KeyError": 10}
    assert (cache_ns.acknowledged, cache_ns.applied) == (50, 20)
    assert cache_ns.receiver_dropped == {"receiver full": 30}
    assert report.dropped == 0
    assert report.receiver_dropped == report.lost == 40
    assert not report.ok
    summary = report.summary()
    assert "dropped there: 10 transform failed: KeyError" in summary
    assert "dropped there: 30 receiver full" in summary
    assert len(b.data("users")) == 90
    assert all(value["version"] == 2 for value in b.data("users").values())
    assert len(b.data("cache")) == 20


async def test_entries_that_expire_while_waiting_for_credit_are_dropped_on_the_receiver() -> None:
    timer = Timer()
    cache: TTLCache[str, Any] = TTLCache(maxsize=1000, ttl=100.0, timer=timer)
    keys = [f"e{i:02d}" for i in range(100)]
    short = keys[20:36]
    for key in short:  # written at 0: 30 s left at 70
        cache[key] = key
    timer.now = 40.0
    for key in keys:  # the rest written at 40 (70 s left at 70), in order of use
        if key in short:
            assert cache[key] == key  # a read: hotter, same expiry
        else:
            cache[key] = key
    timer.now = 70.0
    async with network() as net:
        a = net.node("a", track("cache", cache))
        b = net.node("b", track("cache", ttl_cache({})), release="v2")
        net.connect(a, b)
        b_a = net.wire(b, a)
        # b applies what arrives but its acknowledgements are held up: a sends as far as
        # its credit goes (chunks 0-3, e99..e36), pulls the next 16 records (e35..e20) and
        # waits for credit with them.
        b_a.hold_after = lambda m: isinstance(m, Accept)
        draining = net.start(lambda: a.drain(time_limit=100.0))
        await net.drive(lambda: len(b_a.queue) == 4)
        assert net.wire(a, b).max_in_flight == INITIAL_CREDIT
        net.clock.advance(50.0)  # 50 s waiting for credit: the 16 have 30 s left
        b_a.release()
        report = await net.finish(draining)

    assert_adds_up(report)
    ns = report.namespaces["cache"]
    assert (ns.records, ns.acknowledged, ns.applied) == (100, 100, 84)
    assert ns.receiver_dropped == {"expired": 16}
    assert not report.ok
    assert "dropped there: 16 expired" in report.summary()
    assert keys_of(b.data("cache")) == set(keys) - set(short)


# -- the deadline -------------------------------------------------------------------------------


@pytest.mark.parametrize("stall", ["held", "blocked", "acks lost"])
@pytest.mark.parametrize("store", [True, False], ids=["snapshot", "no snapshot"])
async def test_a_stalled_successor_cannot_hold_the_drain_past_its_deadline(
    stall: str, store: bool, tmp_path: Path
) -> None:
    held = users("u", 200)
    snapshots = DirectorySnapshotStore(tmp_path / "snapshots", key=bytes(32)) if store else None
    async with network() as net:
        a = net.node("a", track("users", dict(held)), snapshots=snapshots)
        b = net.node("b", track("users", {}), release="v2")
        net.connect(a, b)
        a_b, b_a = net.wire(a, b), net.wire(b, a)
        # b acknowledges two chunks, then stalls.
        if stall == "held":  # b stops answering
            b_a.hold_after = lambda m: isinstance(m, Ack) and m.seq == 1
        elif stall == "blocked":  # a's writes to b hang
            a_b.on_send = lambda m: a_b.block() if isinstance(m, Chunk) and m.seq == 2 else None
        else:  # b's acknowledgements get lost
            b_a.drop = lambda m: isinstance(m, Ack) and m.seq >= 2
        started = net.clock.now()
        report = await net.finish(net.start(lambda: a.drain(time_limit=10.0)))
        ended = net.clock.now()
        # b holds no stream open for a drain that is over, so its own drain later has
        # nothing inbound to wait for.
        assert b.receiver.active == 0
        await net.finish(net.start(b.drain))
        assert net.clock.now() == ended

    assert ended - started <= 10.0
    assert_adds_up(report)
    ns = report.namespaces["users"]
    assert (ns.records, ns.acknowledged) == (200, 32)
    acknowledged = set(chunk_keys(a_b, seqs=(0, 1)))
    if snapshots is not None:
        assert report.ok, report.summary()
        assert (ns.snapshotted, ns.dropped) == (168, {})
        [info] = snapshots.pending(CLUSTER)
        assert info.records == 168
        restored: dict[str, Any] = {}
        restore_snapshots(
            snapshots,
            cluster=CLUSTER,
            tracked={"users": track("users", restored)},
            transforms=Transforms(),
            codec=Codec(),
        )
        assert restored == {key: held[key] for key in set(held) - acknowledged}
    else:
        assert ns.dropped == {"deadline, no snapshot store": 168}
        assert not report.ok
        assert "dropped 168 deadline, no snapshot store" in report.summary()


# -- broken and hostile successors ----------------------------------------------------------------


async def test_a_hostile_ack_drops_the_link_and_its_records_go_elsewhere() -> None:
    held = users("u", 200)
    async with network() as net:
        a = net.node("a", track("users", dict(held)))
        b = net.node("b", track("users", {}), release="v2")
        c = net.node("c", track("users", {}), release="v2")
        net.connect(a, b, c)

        def forge(message: Message) -> Message:
            # b claims one record more than the chunk held.
            if isinstance(message, Ack):
                return replace(message, applied=message.applied + 1)
            return message

        net.wire(b, a).tamper = forge
        report = await net.finish(net.start(a.drain))

    [(at, peer, error)] = net.protocol_errors
    assert (at, peer) == ("a", "b")
    match = re.search(r"accounts for (\d+) records, the chunk held (\d+)", error)
    assert match is not None, error
    assert int(match[1]) == int(match[2]) + 1
    assert [(x, y) for x, y, _ in net.cuts] == [("b", "a")]
    assert_adds_up(report)
    assert report.ok, report.summary()
    ns = report.namespaces["users"]
    assert (ns.records, ns.acknowledged, ns.applied) == (200, 200, 200)
    assert ns.successors == ["c"]
    assert c.data("users") == held
    assert c.completed == [("a", 200)]
    assert b.receiver.active == 0  # b forgot the stream with the link


async def test_a_successor_whose_link_fails_mid_stream_loses_nothing_and_doubles_nothing() -> None:
    held = users("u", 200)
    async with network() as net:
        a = net.node("a", track("users", dict(held)))
        b = net.node("b", track("users", {}), release="v2")
        c = net.node("c", track("users", {}), release="v1")
        net.connect(a, b, c)
        a_b = net.wire(a, b)

        def fail_after_chunk_2(message: Message) -> None:
            if isinstance(message, Chunk) and message.seq == 2:
                a_b.failing = True  # the next send fails and the link drops

        a_b.on_send = fail_after_chunk_2
        report = await net.finish(net.start(a.drain))

    assert [(x, y, why) for x, y, why in net.cuts] == [("a", "b", "send failed")]
    assert_adds_up(report)
    assert report.ok, report.summary()
    ns = report.namespaces["users"]
    assert (ns.records, ns.acknowledged) == (200, 200)
    from_c = dict(c.completed)["a"]
    by_b = 200 - from_c
    assert by_b in (0, 16, 32, 48)  # whole chunks that b acknowledged before the link failed
    assert len(c.data("users")) == from_c
    assert keys_of(c.data("users")) | set(chunk_keys(a_b)[:by_b]) == set(held)
    assert not keys_of(c.data("users")) & set(chunk_keys(a_b)[:by_b])


async def test_a_withdrawal_while_end_goes_to_another_successor() -> None:
    """a has had every chunk acknowledged by b and c and sends End to b and c (slowly: the
    writes hang); c starts draining meanwhile and withdraws. The End reaches c after its
    withdrawal and changes nothing; nothing is lost (c acknowledged all it got and hands
    it on)."""
    held = users("u", 200)
    async with network() as net:
        a = net.node("a", track("users", dict(held)))
        b = net.node("b", track("users", {}), release="v2")
        c = net.node("c", track("users", {}), release="v2")
        net.connect(a, b, c)
        a_b = net.wire(a, b)
        draining_c: list[Running[DrainReport]] = []

        a_c = net.wire(a, c)

        def on_send(message: Message) -> None:
            if isinstance(message, End):
                a_b.block()
                a_c.block()
                draining_c.append(net.start(c.drain))

        a_b.on_send = on_send
        draining_a = net.start(a.drain)
        await net.drive(lambda: any(isinstance(m, Refuse) for m in net.wire(c, a).delivered))
        a_b.unblock()
        a_c.unblock()
        report_a = await net.finish(draining_a)
        report_c = await net.finish(draining_c[0])

    for report in (report_a, report_c):
        assert_adds_up(report)
        assert report.ok, report.summary()
    assert report_a.acknowledged == 200
    assert net.protocol_errors == []
    assert b.data("users") == held


async def test_an_offer_answered_too_late_is_cancelled_and_a_later_drain_can_use_the_link() -> None:
    """b is stalled when a offers: a gives up on it at the deadline. b must hear that the
    stream is over, or it keeps it open: its own drain would wait for it (and before
    streams were numbered per node, a's catch-up drain found stream 1 taken)."""
    held = users("u", 100)
    async with network() as net:
        a = net.node("a", track("users", dict(held)))
        b = net.node("b", track("users", {}), release="v2")
        net.connect(a, b)
        b_a = net.wire(b, a)
        b_a.hold()
        first = await net.finish(net.start(a.drain))
        b_a.release()
        await net.drive(lambda: not b_a.queue)
        assert b.receiver.active == 0
        catch_up = await net.finish(net.start(a.drain))

    assert first.namespaces["users"].dropped == {"deadline, no snapshot store": 100}
    assert net.protocol_errors == []
    assert_adds_up(catch_up)
    assert catch_up.ok, catch_up.summary()
    assert b.data("users") == held


async def test_a_stalled_successor_does_not_starve_a_healthy_one() -> None:
    held = users("u", 100)
    async with network() as net:
        a = net.node("a", track("users", dict(held)))
        b = net.node("b", track("users", {}), release="v2")
        c = net.node("c", track("users", {}), release="v2")
        net.connect(a, b, c)
        net.wire(b, a).hold()  # b is connected but never answers
        report = await net.finish(net.start(a.drain))

    assert_adds_up(report)
    assert c.data("users") == held
    assert report.namespaces["users"].refusals["b"] == "did not answer the offer in time"


async def test_a_successor_that_stalls_mid_stream_and_acknowledges_late_is_counted_once() -> None:
    """b acknowledges its first chunk, then stops answering with chunks outstanding. Past
    the stall time a cancels b's stream. b then wakes up and its acknowledgements arrive
    while a still drains: acknowledgements that precede b's Closed count (the stream is
    cancelling), and what a had already taken back and sent to c counts there instead.
    Every record is acknowledged once."""
    held = users("u", 100)
    async with network() as net:
        a = net.node("a", track("users", dict(held), spread="split"))
        b = net.node("b", track("users", {}), release="v2")
        c = net.node("c", track("users", {}), release="v2")
        net.connect(a, b, c)
        a_b, b_a = net.wire(a, b), net.wire(b, a)
        b_a.hold_after = lambda m: isinstance(m, Ack) and m.seq == 0
        # b wakes up as soon as a gives up on it.
        a_b.on_send = lambda m: b_a.release() if isinstance(m, Cancel) else None
        late_acks: list[bool] = []
        handle = a.sessions.handle

        async def watch(peer: str, link: Any, message: Message) -> None:
            if peer == "b" and isinstance(message, Ack) and message.seq > 0:
                late_acks.append(a.sessions._drainer is not None)
            await handle(peer, link, message)

        a.sessions.handle = watch  # type: ignore[method-assign]
        started = net.clock.now()
        report = await net.finish(net.start(lambda: a.drain(time_limit=10.0)))
        elapsed = net.clock.now() - started

    # The late acknowledgements reached the drain (not only the node after it).
    assert late_acks
    assert all(late_acks), late_acks
    [cancel] = [m for m in a_b.sent if isinstance(m, Cancel)]
    assert cancel.reason == "made no progress for 2 s"  # a fifth of the 10 s drain
    assert elapsed < 5.0  # not held until the deadline
    assert net.protocol_errors == []
    assert_adds_up(report)
    assert report.ok, report.summary()
    ns = report.namespaces["users"]
    assert (ns.records, ns.acknowledged, ns.applied) == (100, 100, 100)
    assert ns.refusals["b"] == cancel.reason
    assert sorted(ns.successors) == ["b", "c"]
    by_b = set(chunk_keys(a_b, seqs=(0,)))
    assert by_b <= keys_of(b.data("users"))
    assert keys_of(c.data("users")) | keys_of(b.data("users")) == set(held)
    # Its acknowledgements crossed the Cancel and counted: nothing it applied was re-sent.
    assert len(keys_of(b.data("users"))) > len(by_b)
    assert not keys_of(b.data("users")) & keys_of(c.data("users"))
    assert b.completed == [("a", len(keys_of(b.data("users"))))]
    assert c.completed == [("a", len(keys_of(c.data("users"))))]
    assert b.receiver.active == 0


# -- state that moves exactly once (counters, actors) -------------------------------------------


class Tally:
    """An ownership adapter over a dict of ints, with the rules ``handoff.Counters`` has:
    the export takes what it yields, an import adds, ``give_back`` adds back."""

    kind = "tally"
    moves_ownership = True

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def __len__(self) -> int:
        return len(self.counts)

    def keys(self) -> Any:
        return self.counts.keys()

    def export(self) -> Iterator[Record]:
        for key in list(self.counts):
            amount = self.counts.pop(key, 0)
            if amount:
                yield key, amount, None

    def _add(self, records: Iterable[Record]) -> None:
        for key, amount, _ in records:
            self.counts[key] = self.counts.get(key, 0) + amount

    def import_records(self, records: Any, *, age: float = 0.0) -> ImportResult:
        self._add(records)
        return ImportResult(applied=len(records))

    def give_back(self, records: Any) -> None:
        self._add(records)


def tally(name: str, counts: dict[str, int]) -> Tracked:
    return Tracked(name, counts, Tally(counts), 1)


def counts(prefix: str, keys: int) -> dict[str, int]:
    return {f"{prefix}{i:04d}": i + 1 for i in range(keys)}


def total(*holders: dict[str, int]) -> int:
    return sum(sum(h.values()) for h in holders)


def chunk_total(wire: Wire, seqs: Iterable[int]) -> int:
    codec = Codec()
    wanted = set(seqs)
    return sum(
        amount
        for message in wire.sent
        if isinstance(message, Chunk) and message.seq in wanted
        for _, amount, _ in codec.decode_records(message.payload, max_records=message.records)
    )


async def test_ownership_acks_that_cross_a_stall_cancel_count_and_nothing_moves_twice() -> None:
    """b applies chunks, then stalls with their Acks held. a cancels b's stream and must not
    send those chunks elsewhere before b says what it applied: b wakes up, its Acks and its
    Closed arrive, and a sends only what b did not apply. Counted once, exactly."""
    held = counts("k", 100)
    expected = total(held)
    async with network() as net:
        a = net.node("a", tally("usage", dict(held)))
        b = net.node("b", tally("usage", {}), release="v2")
        c = net.node("c", tally("usage", {}), release="v2")
        net.connect(a, b, c)
        a_b, b_a = net.wire(a, b), net.wire(b, a)
        b_a.hold_after = lambda m: isinstance(m, Ack) and m.seq == 0
        a_b.on_send = lambda m: b_a.release() if isinstance(m, Cancel) else None
        report = await net.finish(net.start(lambda: a.drain(time_limit=10.0)))

    assert net.protocol_errors == []
    assert "Closed" in b_a.types()
    assert_adds_up(report)
    assert report.ok, report.summary()
    ns = report.namespaces["usage"]
    assert (ns.records, ns.acknowledged, ns.in_doubt) == (100, 100, 0)
    assert a.data("usage") == {}
    assert total(b.data("usage"), c.data("usage")) == expected
    assert not keys_of(b.data("usage")) & keys_of(c.data("usage"))


async def test_ownership_sent_to_a_successor_that_never_answers_is_never_sent_twice() -> None:
    """b takes two chunks, then goes silent for good with more outstanding. Its chunks stay
    bound to it: not re-sent to c, not given back, reported as of unknown outcome."""
    held = counts("k", 200)
    expected = total(held)
    async with network() as net:
        a = net.node("a", tally("usage", dict(held)))
        b = net.node("b", tally("usage", {}), release="v2")
        c = net.node("c", tally("usage", {}), release="v2")
        net.connect(a, b, c)
        a_b, b_a = net.wire(a, b), net.wire(b, a)
        a_b.hold_after = lambda m: isinstance(m, Chunk) and m.seq == 3
        b_a.hold_after = lambda m: isinstance(m, Ack) and m.seq == 1
        report = await net.finish(net.start(lambda: a.drain(time_limit=10.0)))

    assert_adds_up(report)
    assert not report.ok
    ns = report.namespaces["usage"]
    [(reason, unknown)] = ns.dropped.items()
    assert reason.startswith("outcome unknown: sent to b")
    sent_to_b = {m.seq: m.records for m in a_b.sent if isinstance(m, Chunk)}
    acknowledged_by_b = sent_to_b[0] + sent_to_b[1]
    assert unknown == sum(sent_to_b.values()) - acknowledged_by_b
    assert ns.acknowledged == 200 - unknown
    assert a.data("usage") == {}  # not given back: b may hold them
    in_b = total(b.data("usage"))
    # b applied what reached it (chunks 0..3); the held rest never arrived. c got none of it.
    assert in_b == chunk_total(a_b, range(4))
    assert total(c.data("usage")) + chunk_total(a_b, set(sent_to_b)) == expected
    assert not keys_of(c.data("usage")) & set(chunk_keys(a_b))
    assert "outcome unknown: sent to b" in report.summary()


async def test_ownership_of_a_successor_whose_link_drops_is_re_sent_and_reported_in_doubt() -> None:
    held = counts("k", 200)
    expected = total(held)
    async with network() as net:
        a = net.node("a", tally("usage", dict(held)))
        b = net.node("b", tally("usage", {}), release="v2")
        c = net.node("c", tally("usage", {}), release="v1")
        net.connect(a, b, c)
        a_b, b_a = net.wire(a, b), net.wire(b, a)

        def fail_after_chunk_2(message: Message) -> None:
            if isinstance(message, Chunk) and message.seq == 2:
                a_b.failing = True

        a_b.on_send = fail_after_chunk_2
        report = await net.finish(net.start(a.drain))

    assert_adds_up(report)
    ns = report.namespaces["usage"]
    assert ns.in_doubt > 0
    assert not report.ok  # b may still run: what it applied unacknowledged counts twice
    assert "count twice if it still runs" in report.summary()
    acked = {m.seq for m in b_a.delivered if isinstance(m, Ack)}
    unacked = {m.seq for m in a_b.sent if isinstance(m, Chunk)} - acked
    assert unacked
    # At least what reached b unacknowledged (the chunk whose send failed may have too).
    assert ns.in_doubt >= sum(
        m.records for m in a_b.sent if isinstance(m, Chunk) and m.seq in unacked
    )
    # Exact if b crashed (what it holds is lost with it): c holds all the rest.
    assert total(c.data("usage")) + chunk_total(a_b, acked) == expected
    assert total(b.data("usage")) >= chunk_total(a_b, acked)


async def test_ownership_nobody_takes_is_given_back_and_reported_dropped() -> None:
    held = counts("k", 50)
    async with network() as net:
        a = net.node("a", tally("usage", dict(held)))
        report = await net.finish(net.start(a.drain))

    assert_adds_up(report)
    assert report.namespaces["usage"].dropped == {"no successor, no snapshot store": 50}
    assert a.data("usage") == held  # the node keeps serving with them


# -- spread "all": every successor gets every key -------------------------------------------------


@pytest.mark.parametrize("successors", [2, 3])
async def test_spread_all_gives_every_successor_every_key_and_counts_each_record_once(
    successors: int,
) -> None:
    held = users("u", 200)
    async with network() as net:
        a = net.node("a", track("users", dict(held)))  # the default spread for a mapping
        news = [net.node(f"n{i}", track("users", {}), release="v2") for i in range(successors)]
        net.connect(a, *news)
        report = await net.finish(net.start(a.drain))

    assert_adds_up(report)
    assert report.ok, report.summary()
    ns = report.namespaces["users"]
    assert ns.spread == "all"
    assert (ns.records, ns.acknowledged, ns.applied, ns.snapshotted) == (200, 200, 200, 0)
    assert ns.sent == 200 * successors  # one copy each
    assert sorted(ns.successors) == [n.name for n in news]
    for new in news:
        assert dict(new.data("users")) == held
        assert ns.per_successor[new.name].acknowledged == 200
        assert ns.per_successor[new.name].applied == 200
        assert new.completed == [("a", 200)]
        # Each copy in the sender's order (hottest first), each record once.
        assert chunk_keys(net.wire(a, new)) == list(held)
    # The same chunk is encoded once for all successors.
    first, *others = (
        [m.payload for m in net.wire(a, new).delivered if isinstance(m, Chunk)] for new in news
    )
    for payloads in others:
        assert all(x is y for x, y in zip(first, payloads, strict=True))


async def test_spread_all_a_successor_dying_mid_stream_costs_nothing_the_other_holds() -> None:
    """b acknowledges two chunks, then its link ends: c carries every record, so nothing
    is re-sent and every record is acknowledged once."""
    held = users("u", 200)
    async with network() as net:
        a = net.node("a", track("users", dict(held)))
        b = net.node("b", track("users", {}), release="v2")
        c = net.node("c", track("users", {}), release="v2")
        net.connect(a, b, c)
        b_a = net.wire(b, a)
        b_a.hold_after = lambda m: isinstance(m, Ack) and m.seq == 1
        draining = net.start(a.drain)
        await net.drive(lambda: b_a.held)
        net.cut(a, b, "b crashed")
        report = await net.finish(draining)

    assert_adds_up(report)
    assert report.ok, report.summary()
    ns = report.namespaces["users"]
    assert (ns.records, ns.acknowledged, ns.in_doubt) == (200, 200, 0)
    assert ns.per_successor["b"].acknowledged == 32
    assert ns.per_successor["c"].acknowledged == 200
    assert dict(c.data("users")) == held
    assert chunk_keys(net.wire(a, c)) == list(held)  # nothing sent to c twice


async def test_spread_all_both_successors_dying_leaves_the_rest_to_the_snapshot(
    tmp_path: Path,
) -> None:
    """No silent loss: what neither successor acknowledged before its link ended is in the
    snapshot, what one of them acknowledged is not, and each record counts once."""
    held = users("u", 200)
    snapshots = DirectorySnapshotStore(tmp_path / "snapshots", key=bytes(32))
    async with network() as net:
        a = net.node("a", track("users", dict(held)), snapshots=snapshots)
        b = net.node("b", track("users", {}), release="v2")
        c = net.node("c", track("users", {}), release="v2")
        net.connect(a, b, c)
        b_a, c_a = net.wire(b, a), net.wire(c, a)
        b_a.hold_after = lambda m: isinstance(m, Ack) and m.seq == 1
        c_a.hold_after = lambda m: isinstance(m, Ack) and m.seq == 3
        draining = net.start(a.drain)
        await net.drive(lambda: b_a.held and c_a.held)
        net.cut(a, b, "b crashed")
        net.cut(a, c, "c crashed")
        report = await net.finish(draining)

    assert_adds_up(report)
    assert report.ok, report.summary()
    ns = report.namespaces["users"]
    assert (ns.records, ns.acknowledged, ns.snapshotted) == (200, 64, 136)
    assert ns.per_successor["b"].acknowledged == 32
    assert ns.per_successor["c"].acknowledged == 64
    restored: dict[str, Any] = {}
    restore_snapshots(
        snapshots,
        cluster=CLUSTER,
        tracked={"users": track("users", restored)},
        transforms=Transforms(),
        codec=Codec(),
    )
    acknowledged = set(chunk_keys(net.wire(a, b), seqs=(0, 1))) | set(
        chunk_keys(net.wire(a, c), seqs=range(4))
    )
    assert len(acknowledged) == 64
    assert restored == {key: held[key] for key in set(held) - acknowledged}


async def test_spread_all_is_bounded_by_each_receivers_size_and_says_so() -> None:
    """Each successor holds the hottest entries that fit its cache; the rest is dropped
    there as "receiver full", per successor and in the namespace's report (no successor
    holds it: lost, and the report is not ok)."""
    cache = ttl_cache(users("u", 200))
    hottest = [key for key, _, _ in adapter_for(cache).export()][:50]
    async with network() as net:
        a = net.node("a", track("users", cache))
        b = net.node("b", track("users", ttl_cache({}, maxsize=50)), release="v2")
        c = net.node("c", track("users", ttl_cache({}, maxsize=50)), release="v2")
        net.connect(a, b, c)
        report = await net.finish(net.start(a.drain))

    assert_adds_up(report)
    ns = report.namespaces["users"]
    assert (ns.records, ns.acknowledged, ns.applied) == (200, 200, 50)
    assert ns.receiver_dropped == {"receiver full": 150}
    assert not report.ok
    for node in (b, c):
        assert set(node.data("users")) == set(hottest)
        counts = ns.per_successor[node.name]
        assert (counts.applied, counts.dropped) == (50, {"receiver full": 150})
    assert "copies to each: b 50 [dropped 150 receiver full], c 50" in report.summary()


async def test_counters_are_always_split_whatever_the_tracked_spread() -> None:
    """The engine's own guard (the node refuses spread="all" for counters first)."""
    counters = handoff.Counters()
    for i in range(100):
        counters.incr(f"k{i}")
    async with network() as net:
        a = net.node("a", track("usage", counters, spread="all"))
        b = net.node("b", track("usage", handoff.Counters()), release="v2")
        c = net.node("c", track("usage", handoff.Counters()), release="v2")
        net.connect(a, b, c)
        report = await net.finish(net.start(a.drain))

    assert report.ok, report.summary()
    assert report.namespaces["usage"].spread == "split"
    got_b, got_c = b.data("usage"), c.data("usage")
    assert not set(got_b.keys()) & set(got_c.keys())
    assert got_b.total() + got_c.total() == 100


# -- a link whose writes block, a slow link ---------------------------------------------------


def block_after_chunk(wire: Wire, seq: int) -> None:
    """From chunk ``seq`` on, ``wire``'s writes hang (a partitioned peer, full buffers)."""

    def on_send(message: Message) -> None:
        if isinstance(message, Chunk) and message.seq == seq:
            wire.block()

    wire.on_send = on_send


def last_ack_at(net: Net, wire: Wire) -> list[float]:
    """The clock when each Ack crossing ``wire`` was handled (recorded by its pump)."""
    times: list[float] = []
    deliver = wire.dst.deliver

    async def record(src: FakeNode, message: Message) -> None:
        if isinstance(message, Ack):
            times.append(net.clock.now())
        await deliver(src, message)

    wire.dst.deliver = record  # type: ignore[method-assign]
    return times


async def test_a_successor_whose_writes_never_complete_does_not_hold_the_others() -> None:
    """a's writes to b hang from b's second chunk on (b partitioned away, its socket
    buffers full; the link stays open). The stream to c must not wait for them: b's share
    goes to c once b counts as stalled, long before the blocked write's time runs out."""
    held = users("u", 400)
    async with network() as net:
        a = net.node("a", track("users", dict(held), spread="split"))
        b = net.node("b", track("users", {}), release="v2")
        c = net.node("c", track("users", {}), release="v2")
        net.connect(a, b, c)
        a_b = net.wire(a, b)
        block_after_chunk(a_b, 1)
        c_acks = last_ack_at(net, net.wire(c, a))
        started = net.clock.now()
        report = await net.finish(net.start(lambda: a.drain(time_limit=10.0)))

    assert_adds_up(report)
    assert report.ok, report.summary()
    ns = report.namespaces["users"]
    assert ns.acknowledged == 400
    assert ns.successors == ["b", "c"]
    assert ns.refusals["b"] == "made no progress for 2 s"
    # Every key is on one of them: b what it acknowledged, c the rest.
    assert keys_of(b.data("users")) | keys_of(c.data("users")) == set(held)
    assert dict(b.data("users")) | dict(c.data("users")) == held
    # c had all its share, b's included, right after b's stall time (2 s of the 10 s
    # drain): the blocked write (until 9.9 s) held nothing back.
    assert c_acks
    assert max(c_acks) - started <= 2.5
    assert ("a", "b", "send timed out") in net.cuts
    assert net.protocol_errors == []


async def test_ownership_sent_on_a_link_whose_writes_hang_is_never_counted_twice() -> None:
    """Counters: a's write of b's second chunk hangs. The chunks queued behind it were
    never written: they go to c. The one whose write hangs may have reached b: it is not
    re-sent while b may hold it, and at the end it is reported (in doubt, given back, never
    silently lost); cluster totals stay exact."""
    held = counts("k", 200)
    expected = total(held)
    async with network() as net:
        a = net.node("a", tally("usage", dict(held)))
        b = net.node("b", tally("usage", {}), release="v2")
        c = net.node("c", tally("usage", {}), release="v2")
        net.connect(a, b, c)
        a_b = net.wire(a, b)
        block_after_chunk(a_b, 1)
        report = await net.finish(net.start(lambda: a.drain(time_limit=10.0)))

    assert_adds_up(report)
    ns = report.namespaces["usage"]
    hung = [m for m in a_b.sent if isinstance(m, Chunk) and m.seq >= 1]
    assert hung == []  # the blocked write never got out (the link dropped at its limit)
    assert not report.ok  # what hung is not acknowledged, and the report says so
    lost = sum(ns.dropped.values())
    assert 0 < lost <= 16  # only the chunk whose write hung; those queued behind went to c
    assert ns.acknowledged == 200 - lost
    # Exact: nothing doubled, nothing lost (what was not delivered went back to a).
    assert total(a.data("usage"), b.data("usage"), c.data("usage")) == expected
    assert total(b.data("usage"), c.data("usage")) == expected - total(a.data("usage"))


async def test_chunks_grow_on_a_fast_link(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_sender, "TARGET_CHUNK_BYTES", 1024 * 1024)
    held = {f"k{i:05d}": "v" * 1000 for i in range(8000)}
    async with network() as net:
        a = net.node("a", track("cache", dict(held)))
        b = net.node("b", track("cache", {}), release="v2")
        net.connect(a, b)
        report = await net.finish(net.start(a.drain))

    assert report.ok, report.summary()
    sizes = [len(m.payload) for m in net.wire(a, b).sent if isinstance(m, Chunk)]
    # Acks come back at once: after the first 16 records, the starting size, then growing.
    assert sizes[1] <= _sender.START_CHUNK_BYTES
    assert sizes[:-1] == sorted(sizes[:-1])  # the last one holds what was left
    assert max(sizes) > 512 * 1024
    assert max(sizes) <= _sender.TARGET_CHUNK_BYTES + 2048
    assert 1 <= net.wire(a, b).max_in_flight <= INITIAL_CREDIT


async def test_a_slow_link_gets_small_chunks_that_are_all_acknowledged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """1 Mbit/s to b, 1 MB of state, 3 s to drain: chunks stay small (a quarter of a second of the
    link each), every chunk sent is acknowledged before the streaming time ends, and
    what the link cannot carry in time is not sent at all (dropped with the deadline as
    its reason: no snapshot store here). With a 1 MiB chunk, nothing would be."""
    monkeypatch.setattr(_sender, "TARGET_CHUNK_BYTES", 1024 * 1024)
    time_limit = 3.0
    held = {f"k{i:05d}": "v" * 1000 for i in range(1000)}
    async with network() as net:
        a = net.node("a", track("cache", dict(held)))
        b = net.node("b", track("cache", {}), release="v2")
        net.connect(a, b)
        a_b = net.wire(a, b)
        a_b.bytes_per_second = 125_000.0
        started = net.clock.now()
        report = await net.finish(net.start(lambda: a.drain(time_limit=time_limit)))
        elapsed = net.clock.now() - started

    assert_adds_up(report)
    ns = report.namespaces["cache"]
    sizes = [len(m.payload) for m in a_b.sent if isinstance(m, Chunk)]
    assert max(sizes) <= _sender.START_CHUNK_BYTES + 2048
    # What the link carries in the streaming time (its rate, less the first round trip).
    assert ns.acknowledged * 1000 >= 125_000 * (time_limit - 0.1) * 0.7
    assert ns.sent == ns.acknowledged  # nothing sent that the deadline then cut off
    assert ns.dropped == {"deadline, no snapshot store": 1000 - ns.acknowledged}
    assert len(b.data("cache")) == ns.acknowledged
    assert elapsed <= time_limit
    assert a_b.max_in_flight <= INITIAL_CREDIT
    assert [m for m in a_b.sent if isinstance(m, Cancel)] != []  # stream ended at deadline


# -- the snapshot reserve ---------------------------------------------------------------------


class _CostlyStore(DirectorySnapshotStore):
    """A directory store whose writes cost fake time per record (a loaded box)."""

    def __init__(self, path: Path, clock: FakeClock, seconds_per_record: float) -> None:
        super().__init__(path, key=bytes(32))
        self.clock, self.seconds_per_record = clock, seconds_per_record

    def begin(self, *args: Any, **kwargs: Any) -> Any:
        writer = super().begin(*args, **kwargs)
        store = self

        class Costly:
            def write_chunk(self, payload: bytes, records: int) -> None:
                # From the writer's thread: the time passes, sleepers wake at the next jump.
                store.clock._now += records * store.seconds_per_record
                writer.write_chunk(payload, records)

            def commit(self) -> Any:
                return writer.commit()

            def abort(self) -> None:
                writer.abort()

        return Costly()


def test_the_snapshot_reserve_is_between_its_floor_and_its_cap() -> None:
    floor, cap = _sender.SNAPSHOT_RESERVE * 10.0, _sender.SNAPSHOT_RESERVE_CAP * 10.0
    assert _sender.snapshot_reserve(10.0, 100, 0.001) == floor
    assert _sender.snapshot_reserve(10.0, 0, 0.0) == floor
    between = _sender.snapshot_reserve(10.0, 3000, 0.001)
    assert floor < between < cap
    assert between == pytest.approx(3.0)
    assert _sender.snapshot_reserve(10.0, 1_000_000, 0.001) == cap
    assert _sender.snapshot_reserve(0.0, 1_000_000, 0.001) == 0.0


@pytest.mark.parametrize("reserve", ["fixed", "measured", "fast successor"])
async def test_the_snapshot_reserve_is_sized_by_the_measured_cost_of_what_is_left(
    reserve: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow successor leaves most records to a store that writes one per 2 ms, as
    encoding one costs 1 ms while streaming: the fixed 25 % of a 10 s drain (2.5 s) cannot
    write the ~1,700 left and drops the rest "deadline"; the reserve sized by the measured
    cost (twice the encoding's) snapshots them all, within the deadline. A fast successor
    still takes everything."""
    encode_seconds = 0.001
    cpu = [0.0]
    encode = Codec.encode_records

    def costly_encode(self: Codec, records: list[Record]) -> Any:
        cpu[0] += encode_seconds * len(records)
        return encode(self, records)

    monkeypatch.setattr(Codec, "encode_records", costly_encode)
    monkeypatch.setattr(_sender, "_cpu_clock", lambda: cpu[0])
    # A snapshot chunk starts only before the deadline, but once started it is written
    # whole: small chunks keep that overrun small (one chunk's 32 ms).
    monkeypatch.setattr(_sender, "MAX_CHUNK_RECORDS", 16)
    if reserve == "fixed":
        monkeypatch.setattr(_sender, "SNAPSHOT_RESERVE_CAP", _sender.SNAPSHOT_RESERVE)
    async with network() as net:
        snapshots = _CostlyStore(tmp_path / "snapshots", net.clock, 2 * encode_seconds)
        a = net.node("a", track("users", users("u", 2000)), snapshots=snapshots)
        b = net.node("b", track("users", {}), release="v2")
        net.connect(a, b)
        if reserve != "fast successor":
            net.wire(a, b).seconds_per_chunk = 0.25
        started = net.clock.now()
        report = await net.finish(net.start(lambda: a.drain(time_limit=10.0)))
        ended = net.clock.now()

    assert ended - started <= 10.0 + 16 * 2 * encode_seconds
    assert_adds_up(report)
    ns = report.namespaces["users"]
    assert ns.acknowledged > 0
    left = ns.records - ns.acknowledged
    if reserve == "fast successor":
        # The costly store does not hold back a successor that takes everything.
        assert (ns.acknowledged, ns.snapshotted, ns.dropped) == (2000, 0, {})
    elif reserve == "fixed":
        assert ns.dropped.get("deadline", 0) > 0, report.summary()
    else:
        assert (ns.snapshotted, ns.dropped) == (left, {}), report.summary()
        assert ended - started <= 10.0 + 1e-9  # the fake clock's sums of floats
