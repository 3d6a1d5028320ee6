"""The peer mesh on its own, without a Node: its callbacks and the pending-handshake cap."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream

from handoff._mesh import (
    COOKIE_REFUSAL_LOG_INTERVAL,
    REFUSAL_LOG_BURST,
    REFUSAL_LOG_INTERVAL,
    Mesh,
)
from handoff.config import resolve_settings
from handoff.discovery import PeerAddress, StaticDiscovery
from handoff.membership import (
    DownReason,
    MembershipEvent,
    NodeDown,
    NodeLeaving,
    NodeUp,
    Peer,
)
from handoff.protocol import (
    Connection,
    HandshakeComplete,
    Limits,
    LocalNode,
    Message,
    NodeState,
    Offer,
    Reject,
    Role,
    encode_frame,
)
from handoff.transport import PeerLink, open_listener
from tests._helpers import (
    CLUSTER,
    COOKIE,
    loopback_aliases_usable,
    read_until_closed,
    wait_until,
)

FLOOD_HOST = "127.0.0.9"

pytestmark = pytest.mark.anyio


class Harness:
    """One mesh on loopback; records the session messages and lost peers it reports."""

    def __init__(
        self,
        name: str,
        host: str,
        *,
        max_pending: int = 256,
        max_pending_per_source: int = 8,
        handshake_timeout: float = 1.0,
        heartbeat_timeout: float = 2.0,
        log_clock: Callable[[], float] = anyio.current_time,
        poll_interval: float = 0.1,
        streams_with: Callable[[str], bool] = lambda peer: False,
    ) -> None:
        self.name, self.host, self.port = name, host, 0
        self.settings = resolve_settings(
            environ={},
            cluster=CLUSTER,
            cookie=COOKIE,
            name=name,
            release=f"release-of-{name}",
            bind=f"{host}:0",
            discovery="none",
            poll_interval=poll_interval,
            heartbeat_timeout=heartbeat_timeout,
            handshake_timeout=handshake_timeout,
            connect_timeout=1.0,
        )
        self.sessions: list[tuple[str, PeerLink, Message]] = []
        self.lost: list[str] = []
        self._task_group: anyio.abc.TaskGroup | None = None
        self.mesh = Mesh(
            self.settings,
            local_node=self._local_node,
            spawn=self._spawn,
            on_session_message=self._session,
            on_peer_lost=self.lost.append,
            streams_with=streams_with,
            max_pending_handshakes=max_pending,
            max_pending_per_source=max_pending_per_source,
            log_clock=log_clock,
        )

    def _local_node(self) -> LocalNode:
        return LocalNode(
            CLUSTER, self.name, f"incarnation-of-{self.name}", "v1", 0.0, state=self.mesh.state
        )

    def _spawn(self, function: Callable[..., Awaitable[object]], *args: object) -> None:
        assert self._task_group is not None

        async def run() -> None:
            await function(*args)

        self._task_group.start_soon(run)

    async def _session(self, peer: str, link: PeerLink, message: Message) -> None:
        self.sessions.append((peer, link, message))

    @asynccontextmanager
    async def run(
        self,
        dial: Sequence[Harness] = (),
        *,
        also: Sequence[PeerAddress] = (),
        own_port_at: str | None = None,
    ) -> AsyncIterator[None]:
        """Listen and dial ``dial`` (and the addresses ``also``, and this mesh's own port
        at host ``own_port_at``) until the block ends, then stop the way a Node does."""
        listener = await open_listener(self.host, 0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        itself = [PeerAddress(own_port_at, self.port)] if own_port_at else []
        discovery = StaticDiscovery([*(PeerAddress(h.host, h.port) for h in dial), *also, *itself])
        async with listener:
            try:
                async with anyio.create_task_group() as self._task_group:
                    self.mesh.start(
                        listener,
                        discovery=discovery,
                        tls=None,
                        own_addresses={f"{self.host}:{self.port}"},
                    )
                    try:
                        yield
                    finally:
                        await self.mesh.stop(f"{self.name} stopping")
                        self._task_group.cancel_scope.cancel()
            finally:
                self._task_group = None
                self.mesh.close()


async def next_event(events: MemoryObjectReceiveStream[MembershipEvent]) -> MembershipEvent:
    with anyio.fail_after(5):
        return await events.receive()


async def test_callbacks_sessions_and_lost_peers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="handoff")
    a, b = Harness("a", "127.0.0.2"), Harness("b", "127.0.0.3")
    ups: list[str] = []

    def broken(peer: Peer) -> None:
        raise RuntimeError("a bug in an observer")

    async def slow(peer: Peer) -> None:
        await anyio.lowlevel.checkpoint()
        ups.append(peer.name)

    a.mesh.on_node_up(broken)
    a.mesh.on_node_up(slow)
    offer = Offer(stream=1, namespace="users", kind="cache", version=1, records=10)
    with a.mesh.subscribe() as events:
        async with a.run():
            async with b.run(dial=[a]):
                up = await next_event(events)
                assert isinstance(up, NodeUp)
                assert up.peer.name == "b"
                # A failing callback costs nothing to the next one, nor to subscribers.
                await wait_until(lambda: ups == ["b"])
                assert "membership callback" in caplog.text
                # The dialling side finishes its handshake after the listening side.
                await wait_until(lambda: len(b.mesh.peer_links()) == 1)
                [(peer, link)] = b.mesh.peer_links()
                assert peer.name == "a"
                # Session messages are not the mesh's business: they go to the callback.
                await link.send(offer)
                await wait_until(lambda: len(a.sessions) == 1)
                assert a.sessions[0][0] == "b"
                assert a.sessions[0][2] == offer
                await b.mesh.set_state(NodeState.DRAINING)
                assert b.mesh.state is NodeState.DRAINING
                leaving = await next_event(events)
                assert isinstance(leaving, NodeLeaving)
                assert [p.state for p in a.mesh.peers()] == [NodeState.DRAINING]
                assert a.lost == []
            down = await next_event(events)
            assert isinstance(down, NodeDown)
            assert down.reason is DownReason.GOODBYE
            assert a.lost == ["b"]
            assert a.mesh.peers() == []
        # close() ends the subscription.
        with anyio.fail_after(5):
            assert [event async for event in events] == []


async def test_the_oldest_pending_handshake_makes_way_for_a_newcomer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="handoff")
    # Handshakes would time out after a minute: only eviction closes these sockets.
    a = Harness("a", "127.0.0.2", max_pending=2, handshake_timeout=60.0)
    b = Harness("b", "127.0.0.3")
    with a.mesh.subscribe() as events:
        async with a.run():
            silent = [await anyio.connect_tcp("127.0.0.2", a.port) for _ in range(3)]
            try:
                assert await read_until_closed(silent[0], within=2.0) == b""
                assert "pending handshakes (the cap is" in caplog.text
                for stream in silent[1:]:
                    with anyio.move_on_after(0.2) as waited:
                        await stream.receive()
                    assert waited.cancelled_caught, "a younger pending handshake was dropped"
                # The cap is full of silent sockets, yet a real peer gets in.
                async with b.run(dial=[a]):
                    up = await next_event(events)
                    assert isinstance(up, NodeUp)
                    assert up.peer.name == "b"
                assert await read_until_closed(silent[1], within=2.0) == b""
            finally:
                for stream in silent:
                    await anyio.aclose_forcefully(stream)


async def _flood(
    port: int, count: int, *, source: str = FLOOD_HOST
) -> list[anyio.abc.SocketStream]:
    """``count`` connections from ``source`` that never say a word (closed by the caller)."""
    streams = []
    with anyio.fail_after(10):
        for _ in range(count):
            streams.append(await anyio.connect_tcp("127.0.0.2", port, local_host=source))
            # Let the listener accept each one before the next.
            await anyio.lowlevel.checkpoint()
    return streams


async def test_a_connect_flood_from_one_address_cannot_keep_a_slow_peer_out() -> None:
    if not loopback_aliases_usable(["127.0.0.3", FLOOD_HOST]):
        pytest.skip("needs loopback aliases (127.0.0.0/8 bindable)")
    # Handshakes would time out after a minute: only eviction closes a pending one.
    a = Harness("a", "127.0.0.2", max_pending=4, handshake_timeout=60.0)
    honest = Connection(
        Role.CLIENT,
        LocalNode(CLUSTER, "far", "incarnation-of-far", "v1", 0.0),
        COOKIE,
        now=0.0,
        limits=Limits(handshake_timeout=60.0, heartbeat_timeout=60.0),
    )
    flood: list[anyio.abc.SocketStream] = []
    with a.mesh.subscribe() as events:
        async with a.run():
            stream = await anyio.connect_tcp("127.0.0.2", a.port, local_host="127.0.0.3")
            try:
                with anyio.fail_after(5):
                    await stream.send(honest.data_to_send())  # Hello
                    welcome = await stream.receive()
                    assert honest.receive_data(welcome, now=0.0) == []
                    # A cross-region round trip: meanwhile someone connects as fast as it
                    # can, 10 times the whole cap, all from one address.
                    flood = await _flood(a.port, 40)
                    # Past its own cap of 8 the flood evicts its own: at most 3 (the total
                    # cap, less the honest one) of the 40 are still open.
                    assert await read_until_closed(flood[0], within=2.0) == b""
                    await stream.send(honest.data_to_send())  # Auth and Info, late
                    done = honest.receive_data(await stream.receive(), now=0.0)
                    assert any(isinstance(e, HandshakeComplete) for e in done)
                    up = await next_event(events)
                    assert isinstance(up, NodeUp)
                    assert up.peer.name == "far"
            finally:
                await anyio.aclose_forcefully(stream)
                for silent in flood:
                    await anyio.aclose_forcefully(silent)


async def test_one_address_holds_at_most_its_share_of_pending_handshakes() -> None:
    if not loopback_aliases_usable([FLOOD_HOST]):
        pytest.skip("needs loopback aliases (127.0.0.0/8 bindable)")
    a = Harness("a", "127.0.0.2", max_pending_per_source=2, handshake_timeout=60.0)
    async with a.run():
        flood = await _flood(a.port, 5)
        try:
            for stream in flood[:3]:
                assert await read_until_closed(stream, within=2.0) == b""
            for stream in flood[3:]:
                with anyio.move_on_after(0.2) as waited:
                    await stream.receive()
                assert waited.cancelled_caught, "a younger pending handshake was dropped"
        finally:
            for stream in flood:
                await anyio.aclose_forcefully(stream)


async def test_when_each_address_holds_one_the_oldest_handshake_makes_room() -> None:
    hosts = [f"127.0.0.{i}" for i in (10, 11, 12, 13)]
    if not loopback_aliases_usable(hosts):
        pytest.skip("needs loopback aliases (127.0.0.0/8 bindable)")
    a = Harness("a", "127.0.0.2", max_pending=3, handshake_timeout=60.0)
    async with a.run():
        lone = [(await _flood(a.port, 1, source=host))[0] for host in hosts[:3]]
        # Admitted in order (the accept loop admits one connection at a time), so the first
        # is the oldest by the time the newcomer comes.
        await wait_until(lambda: len(a.mesh._pending) == 3)
        [newcomer] = await _flood(a.port, 1, source=hosts[3])
        try:
            # Every address holds one: the oldest is evicted and its socket closed (the last
            # thing its task does), and the newcomer waits for its handshake like the others.
            assert await read_until_closed(lone[0], within=2.0) == b""
            for stream in [*lone[1:], newcomer]:
                with anyio.move_on_after(0.2) as waited:
                    await stream.receive()
                assert waited.cancelled_caught, "a younger pending handshake was evicted"
            assert len(a.mesh._pending) == 3
        finally:
            for stream in [*lone, newcomer]:
                await anyio.aclose_forcefully(stream)


HOSTILE_REASON = "\x1b[2J\x1b[31mpwned\nCRITICAL handoff.node: forged line" + "x" * 5000


class Rejecter:
    """Not a node: it answers every Hello with the Reject it was given; counts them."""

    def __init__(self, reject: Reject, host: str = FLOOD_HOST) -> None:
        self.frame = encode_frame(reject.to_wire())
        self.answered = 0
        self.host = host
        self.address = PeerAddress(host, 0)

    async def _answer(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            with anyio.move_on_after(2):
                await stream.receive()
                await stream.send(self.frame)
                self.answered += 1

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[Rejecter]:
        """Listen on its host until the block ends."""
        listener = await anyio.create_tcp_listener(local_host=self.host)
        self.address = PeerAddress(self.host, listener.extra(anyio.abc.SocketAttribute.local_port))
        async with listener, anyio.create_task_group() as tasks:
            tasks.start_soon(listener.serve, self._answer)
            yield self
            tasks.cancel_scope.cancel()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_peer_text_in_refusals_is_escaped_and_the_lines_are_limited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    if not loopback_aliases_usable([FLOOD_HOST]):
        pytest.skip("needs loopback aliases (127.0.0.0/8 bindable)")
    caplog.set_level(logging.INFO, logger="handoff")
    clock = FakeClock()
    a = Harness("a", "127.0.0.2", log_clock=clock)
    # It says what it likes in its Reject, and is dialled every poll (0.1 s).
    rejecter = Rejecter(Reject("cluster", HOSTILE_REASON[:1024]))
    async with rejecter.serving() as hostile, a.run(also=[hostile.address]):
        await wait_until(lambda: hostile.answered >= 12)
        lines = [r.getMessage() for r in caplog.records if "refused connection" in r.message]
        assert len(lines) == REFUSAL_LOG_BURST  # however often it happens
        for line in lines:
            assert "\x1b" not in line
            assert "\n" not in line
            assert "\\x1b[2J" in line
            assert len(line) < 600
        assert "suppressed" not in caplog.text
        before = hostile.answered
        clock.now += REFUSAL_LOG_INTERVAL  # the interval ends: one summary line
        await wait_until(lambda: "suppressed" in caplog.text)
        [summary] = [r.getMessage() for r in caplog.records if "suppressed" in r.message]
        suppressed = int(summary.split()[1])
        assert suppressed >= before - REFUSAL_LOG_BURST - 2  # two may still have been under way
        assert FLOOD_HOST in summary


async def test_a_wrong_cookie_is_logged_once_a_minute_per_address_with_what_to_check(
    caplog: pytest.LogCaptureFixture,
) -> None:
    other = "127.0.0.10"
    if not loopback_aliases_usable([FLOOD_HOST, other]):
        pytest.skip("needs loopback aliases (127.0.0.0/8 bindable)")
    caplog.set_level(logging.INFO, logger="handoff")
    clock = FakeClock()
    a = Harness("a", "127.0.0.2", log_clock=clock)
    reason = "authentication failed: the peer does not know this cluster's cookie"
    first, second = Rejecter(Reject("auth", reason)), Rejecter(Reject("auth", reason), other)

    def lines_about(host: str) -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if "refused connection" in r.message and host in r.message
        ]

    async with (
        first.serving() as one,
        second.serving() as two,
        a.run(also=[one.address, two.address]),
    ):
        # Both are dialled every poll (0.1 s) and refuse every time.
        await wait_until(lambda: one.answered >= 10 and two.answered >= 10)
        [line] = lines_about(FLOOD_HOST)
        assert str(one.address) in line
        assert "HANDOFF_COOKIE is the same on every node" in line
        assert "HANDOFF_CLUSTER" in line
        assert "more refusals" not in line
        assert len(lines_about(other)) == 1  # another address gets its own line
        assert "suppressed" not in caplog.text  # no summary lines of their own
        before = one.answered
        clock.now += COOKIE_REFUSAL_LOG_INTERVAL - 1.0
        await wait_until(lambda: one.answered >= before + 3)
        assert len(lines_about(FLOOD_HOST)) == 1  # still within the minute
        clock.now += 1.0
        await wait_until(lambda: len(lines_about(FLOOD_HOST)) == 2)
        later = lines_about(FLOOD_HOST)[1]
        assert "HANDOFF_COOKIE" in later
        # The refusals in between are counted in the next line, not in lines of their own.
        more = int(later.split("; ")[-1].split()[0])
        assert more >= before + 3 - 2  # two may have been under way at the first line
    assert "suppressed" not in caplog.text


async def test_failed_handshakes_from_one_address_are_logged_a_few_times(
    caplog: pytest.LogCaptureFixture,
) -> None:
    if not loopback_aliases_usable([FLOOD_HOST, "127.0.0.3"]):
        pytest.skip("needs loopback aliases (127.0.0.0/8 bindable)")
    caplog.set_level(logging.INFO, logger="handoff")
    a = Harness("a", "127.0.0.2", log_clock=FakeClock())

    async def garbage(source: str) -> None:
        stream = await anyio.connect_tcp("127.0.0.2", a.port, local_host=source)
        async with stream:
            await stream.send(b"\x00\x00\x00\x03\x93\x01\x02")  # not a Hello
            await read_until_closed(stream, within=2.0)

    async with a.run():
        for _ in range(20):
            await garbage(FLOOD_HOST)
        await garbage("127.0.0.3")  # someone else still gets its line
    lines = [r.getMessage() for r in caplog.records if "dropped connection from" in r.message]
    assert sum(FLOOD_HOST in line for line in lines) == 5
    assert sum("127.0.0.3" in line for line in lines) == 1


async def test_an_authenticated_peers_name_release_and_goodbye_are_escaped_in_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="handoff")
    a = Harness("a", "127.0.0.2")
    evil = Connection(
        Role.CLIENT,
        LocalNode(CLUSTER, "evil\x1b[2J\nWARNING forged", "inc", "v1\x1b]0;title\x07", 0.0),
        COOKIE,
        now=0.0,
    )
    with a.mesh.subscribe() as events:
        async with a.run():
            stream = await anyio.connect_tcp("127.0.0.2", a.port)
            async with stream:
                with anyio.fail_after(5):
                    done = False
                    while not done:
                        await stream.send(evil.data_to_send())
                        received = evil.receive_data(await stream.receive(), now=0.0)
                        done = any(isinstance(e, HandshakeComplete) for e in received)
                    assert isinstance(await next_event(events), NodeUp)
                    evil.close("bye\x1b[31m\nCRITICAL forged")
                    await stream.send(evil.data_to_send())
                    down = await next_event(events)
            assert isinstance(down, NodeDown)
            # The event keeps the peer's real name; its detail, meant for logs, is escaped.
            assert down.peer.name == "evil\x1b[2J\nWARNING forged"
            assert down.detail == "bye\\x1b[31m\\nCRITICAL forged"
    messages = [r.getMessage() for r in caplog.records]
    assert any("node-up evil\\x1b[2J\\nWARNING forged" in m for m in messages)
    assert any("release v1\\x1b]0;title\\x07" in m for m in messages)
    for message in messages:
        assert "\x1b" not in message
        assert "\n" not in message


async def test_a_forged_reject_self_does_not_stop_the_dialling() -> None:
    if not loopback_aliases_usable([FLOOD_HOST]):
        pytest.skip("needs loopback aliases (127.0.0.0/8 bindable)")
    a = Harness("a", "127.0.0.2")
    # Anyone can send this before authenticating: it must not make a give up on the
    # address (a real peer may be there later).
    rejecter = Rejecter(Reject("self", "connected to itself"))
    async with rejecter.serving() as hostile, a.run(also=[hostile.address]):
        await wait_until(lambda: hostile.answered >= 3)


async def test_a_node_that_reaches_its_own_listener_stops_dialling_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="handoff")
    # Listening on every address, it knows itself as 0.0.0.0:port only; discovery lists
    # 127.0.0.2:port, which is this very node.
    a = Harness("a", "0.0.0.0")
    async with a.run(own_port_at="127.0.0.2"):
        await wait_until(lambda: "this node's own listener" in caplog.text)
        await anyio.sleep(0.5)  # five more polls
    assert caplog.text.count("this node's own listener") == 1
    assert a.mesh.peers() == []


async def test_unlinked_lists_the_first_rounds_addresses_until_linked_or_refused() -> None:
    """What a just-started node's actors count as possible holders (issue 10): every
    address of discovery's first answer until it is linked or nothing listens there; an
    address that never completes a handshake stays (a timeout may be a partition)."""
    a = Harness("a", "127.0.0.2", handshake_timeout=0.3)
    b = Harness("b", "127.0.0.3")
    closed = await anyio.create_tcp_listener(local_host="127.0.0.4")
    refused = PeerAddress("127.0.0.4", closed.extra(anyio.abc.SocketAttribute.local_port))
    await closed.aclose()

    async def hold(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await anyio.sleep(3)

    assert a.mesh.unlinked() == []  # not started: no actor runs yet
    silent_listener = await anyio.create_tcp_listener(local_host="127.0.0.5")
    silent = PeerAddress("127.0.0.5", silent_listener.extra(anyio.abc.SocketAttribute.local_port))
    async with silent_listener, anyio.create_task_group() as tasks:
        tasks.start_soon(silent_listener.serve, hold)
        async with b.run(), a.run(dial=[b], also=[refused, silent]):
            await wait_until(lambda: len(a.mesh.peer_links()) == 1)
            await wait_until(lambda: a.mesh.unlinked() == [str(silent)])
            await anyio.sleep(0.5)  # past a's handshake timeout, several polls
            assert a.mesh.unlinked() == [str(silent)]
        tasks.cancel_scope.cancel()


async def test_a_peer_whose_link_drops_during_a_stream_is_dialled_again_at_once() -> None:
    """a streams to b (``streams_with``) and their link drops (not a goodbye): a dials b
    again at once, not at its next discovery poll (a minute away), so that its drain can
    ask b what it applied before re-sending anything."""
    a = Harness("a", "127.0.0.2", poll_interval=60.0, streams_with=lambda peer: peer == "b")
    b = Harness("b", "127.0.0.3")
    with a.mesh.subscribe() as events:
        async with b.run(), a.run(dial=[b]):
            up = await next_event(events)
            assert isinstance(up, NodeUp)
            await wait_until(lambda: len(b.mesh.peer_links()) == 1)
            [(_, link)] = b.mesh.peer_links()
            await anyio.aclose_forcefully(link._stream)  # cut, no goodbye
            down = await next_event(events)
            assert isinstance(down, NodeDown)
            assert down.reason is not DownReason.GOODBYE
            again = await next_event(events)
            assert isinstance(again, NodeUp)
            assert again.peer.name == "b"
            assert a.lost == ["b"]
