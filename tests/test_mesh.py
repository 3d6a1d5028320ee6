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

from handoff._mesh import Mesh
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
from handoff.protocol import LocalNode, Message, NodeState, Offer
from handoff.transport import PeerLink, open_listener
from tests._helpers import CLUSTER, COOKIE, read_until_closed, wait_until

pytestmark = pytest.mark.anyio


class Harness:
    """One mesh on loopback; records the session messages and lost peers it reports."""

    def __init__(
        self, name: str, host: str, *, max_pending: int = 256, handshake_timeout: float = 1.0
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
            poll_interval=0.1,
            heartbeat_timeout=2.0,
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
            max_pending_handshakes=max_pending,
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
    async def run(self, dial: Sequence[Harness] = ()) -> AsyncIterator[None]:
        """Listen and dial ``dial`` until the block ends, then stop the way a Node does."""
        listener = await open_listener(self.host, 0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        discovery = StaticDiscovery(PeerAddress(h.host, h.port) for h in dial)
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
                assert "pending handshakes (the cap)" in caplog.text
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
