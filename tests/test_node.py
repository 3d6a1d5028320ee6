"""Nodes in one process: joining, events, callbacks, dedupe, leaving, timeouts, bind errors."""

from __future__ import annotations

import logging
import pydoc
import re
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

import handoff
from handoff import (
    BindError,
    ConfigError,
    DownReason,
    LocalProtocolError,
    MembershipEvent,
    Node,
    NodeDown,
    NodeLeaving,
    NodeState,
    NodeUp,
    Peer,
    PortsInUse,
)
from handoff.membership import NAME_IN_USE
from handoff.protocol import Connection, HandshakeComplete, Limits, LocalNode, Role

pytestmark = pytest.mark.anyio

COOKIE = "test-cookie-0123456789abcdef"
FAST = {"poll_interval": 0.1, "heartbeat_timeout": 1.0, "handshake_timeout": 1.0}
FAST_ARGS: dict[str, Any] = {"cookie": COOKIE, "environ": {}, **FAST}


def make_node(name: str, host: str, discovery: str = "none", **kwargs: Any) -> Node:
    options: dict[str, Any] = {**FAST, **kwargs}
    return Node(
        "shop",
        cookie=COOKIE,
        name=name,
        release=options.pop("release", "v1"),
        bind=f"{host}:0",
        discovery=discovery,
        environ={},
        **options,
    )


def static(*nodes: Node) -> str:
    return "static:" + ",".join(node.address for node in nodes)


async def wait_until(predicate: Callable[[], bool], limit: float = 5.0) -> None:
    # Bounded polling: the predicates look at several nodes at once, which no single
    # event covers.
    with anyio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.01)


def names(node: Node) -> list[str]:
    return [peer.name for peer in node.peers()]


@asynccontextmanager
async def recording(node: Node) -> AsyncIterator[list[MembershipEvent]]:
    """Collect node.events() in the background while the block runs."""
    seen: list[MembershipEvent] = []
    async with anyio.create_task_group() as tg:

        async def collect(started: anyio.Event) -> None:
            iterator = node.events()
            started.set()
            async for event in iterator:
                seen.append(event)

        started = anyio.Event()
        tg.start_soon(collect, started)
        await started.wait()
        await anyio.lowlevel.checkpoint()  # let the iterator subscribe before anything happens
        yield seen
        tg.cancel_scope.cancel()


async def test_three_nodes_find_each_other() -> None:
    a = make_node("a", "127.0.0.2", release="v1")
    async with (
        a,
        make_node("b", "127.0.0.3", static(a), release="v2") as b,
        make_node("c", "127.0.0.4", static(a, b), release="v2") as c,
    ):
        await wait_until(
            lambda: (names(a), names(b), names(c)) == (["b", "c"], ["a", "c"], ["a", "b"])
        )
        peer_b = next(p for p in a.peers() if p.name == "b")
        assert peer_b.release == "v2"
        assert peer_b.address == b.address
        assert peer_b.state is NodeState.SERVING
        assert peer_b.serving
        assert {p.release for p in c.peers()} == {"v1", "v2"}


async def test_events_iterator_and_callbacks_report_up_leaving_down() -> None:
    a = make_node("a", "127.0.0.2")
    ups: list[str] = []
    downs: list[tuple[str, DownReason]] = []
    leaving: list[str] = []

    @a.on_node_up
    def on_up(peer: Peer) -> None:
        ups.append(peer.name)

    @a.on_node_leaving
    async def on_leaving(peer: Peer) -> None:
        await anyio.lowlevel.checkpoint()
        leaving.append(peer.name)

    @a.on_node_down
    def on_down(peer: Peer, reason: DownReason) -> None:
        downs.append((peer.name, reason))

    async with a, recording(a) as seen:
        b = make_node("b", "127.0.0.3", static(a))
        async with b:
            await wait_until(lambda: names(a) == ["b"])
            await b._mesh.set_state(NodeState.DRAINING)
            await wait_until(lambda: leaving == ["b"])
            assert a.peers()[0].state is NodeState.DRAINING
        await wait_until(lambda: downs != [])
        await wait_until(lambda: len(seen) == 3)
    assert ups == ["b"]
    assert downs == [("b", DownReason.GOODBYE)]
    assert [type(e) for e in seen] == [NodeUp, NodeLeaving, NodeDown]
    down = seen[2]
    assert isinstance(down, NodeDown)
    assert down.reason is DownReason.GOODBYE
    assert down.detail == "node stopping"


async def test_events_iterator_ends_when_node_stops() -> None:
    node = make_node("a", "127.0.0.2")
    received: list[MembershipEvent] = []
    finished = anyio.Event()

    async def consume() -> None:
        async for event in node.events():
            received.append(event)
        finished.set()

    async with anyio.create_task_group() as tg:
        # start() and stop() at one level of one task, as anyio's structured tasks need.
        await node.start()
        tg.start_soon(consume)
        await anyio.sleep(0.05)
        await node.stop()
        with anyio.fail_after(5):
            await finished.wait()
    assert received == []


async def test_simultaneous_dials_leave_one_link_and_one_node_up_each() -> None:
    # Both nodes know each other from the start, so both dial at once, every time.
    with socket.socket() as sa, socket.socket() as sb:
        sa.bind(("127.0.0.2", 0))
        sb.bind(("127.0.0.3", 0))
        port_a, port_b = sa.getsockname()[1], sb.getsockname()[1]
    both = f"static:127.0.0.2:{port_a},127.0.0.3:{port_b}"
    for _ in range(5):
        a = Node("shop", name="a", bind=f"127.0.0.2:{port_a}", discovery=both, **FAST_ARGS)
        b = Node("shop", name="b", bind=f"127.0.0.3:{port_b}", discovery=both, **FAST_ARGS)
        async with a, recording(a) as seen_a, b, recording(b) as seen_b:
            await wait_until(lambda: names(a) == ["b"] and names(b) == ["a"])  # noqa: B023
            # Several poll rounds: nobody re-dials a known peer, nothing flaps.
            await anyio.sleep(0.5)
            assert len(a._mesh._links) == 1
            assert len(b._mesh._links) == 1
            assert [e.kind for e in seen_a] == ["node-up"]
            assert [e.kind for e in seen_b] == ["node-up"]


async def join_then_fall_silent(
    stream: anyio.abc.SocketStream, name: str, incarnation: str
) -> None:
    """Run a client handshake on ``stream`` as ``name``, then never send (nor read) again."""
    connection = Connection(
        Role.CLIENT,
        LocalNode("shop", name, incarnation, "v0", 0.0),
        COOKIE.encode(),
        now=anyio.current_time(),
        limits=Limits(heartbeat_timeout=60),
    )
    with anyio.fail_after(5):
        await stream.send(connection.data_to_send())
        done = False
        while not done:
            events = connection.receive_data(await stream.receive(), now=anyio.current_time())
            await stream.send(connection.data_to_send())
            done = any(isinstance(e, HandshakeComplete) for e in events)


async def test_silent_peer_is_reported_down_by_heartbeat_timeout() -> None:
    async with make_node("a", "127.0.0.2", heartbeat_timeout=0.6) as a, recording(a) as seen:
        stream = await anyio.connect_tcp("127.0.0.2", a.port)
        async with stream:
            await join_then_fall_silent(stream, "mute", "inc")
            await wait_until(lambda: names(a) == ["mute"])
            started = anyio.current_time()
            # From here on the peer sends nothing at all, but keeps its socket open.
            await wait_until(lambda: any(isinstance(e, NodeDown) for e in seen), limit=5)
            elapsed = anyio.current_time() - started
    down = seen[-1]
    assert isinstance(down, NodeDown)
    assert down.reason is DownReason.HEARTBEAT_TIMEOUT
    assert 0.4 <= elapsed < 2.0


async def test_a_later_start_time_does_not_take_over_a_live_nodes_name() -> None:
    source = {f"k{i}": i for i in range(200)}
    real_target: dict[str, int] = {}
    impostor_target: dict[str, int] = {}
    a = make_node("a", "127.0.0.2")
    a.track("users", source)
    stop_real, real_stopped = anyio.Event(), anyio.Event()

    async def run(node: Node) -> None:
        # In a task of its own: it stops before the impostor that started after it.
        async with node:
            await stop_real.wait()
        real_stopped.set()

    async with a, recording(a) as seen_a, anyio.create_task_group() as tasks:
        real = make_node("b", "127.0.0.3", static(a))
        real.track("users", real_target)
        tasks.start_soon(run, real)
        await wait_until(lambda: names(a) == ["b"])
        # Another process of the cluster calls itself b and claims a later start.
        impostor = make_node("b", "127.0.0.4", static(a))
        impostor.track("users", impostor_target)
        async with impostor, recording(impostor) as seen_impostor:
            assert impostor.started_at > real.started_at
            # It dials a every poll and is refused every time, with a reason.
            await wait_until(lambda: sum(isinstance(e, NodeDown) for e in seen_impostor) >= 3)
            refusals = [e for e in seen_impostor if isinstance(e, NodeDown)]
            assert {e.detail for e in refusals} == {NAME_IN_USE}
            assert [p.incarnation for p in a.peers()] == [real.incarnation]
            report = await a.drain()
            assert report.namespaces["users"].successors == ["b"]
            assert report.namespaces["users"].acknowledged == 200
            assert real_target == source
            assert impostor_target == {}
            # The real b leaves: the other process (a restart, say) now gets in.
            stop_real.set()
            with anyio.fail_after(5):
                await real_stopped.wait()
            started = anyio.current_time()
            await wait_until(lambda: [p.incarnation for p in a.peers()] == [impostor.incarnation])
            assert anyio.current_time() - started < 1.0 + 0.5  # heartbeat timeout + slack
    # The real b was never dropped as "restarted": it left when it stopped.
    assert [e.kind for e in seen_a if e.peer.incarnation == real.incarnation] == [
        "node-up",
        "leaving",
        "node-down",
    ]
    assert not any(isinstance(e, NodeDown) and e.reason is DownReason.RESTARTED for e in seen_a)


async def test_a_restarted_node_gets_in_once_the_old_one_times_out() -> None:
    # The old process froze (or its machine vanished): its socket stays open, silent.
    async with make_node("a", "127.0.0.2", heartbeat_timeout=0.6) as a, recording(a) as seen:
        stream = await anyio.connect_tcp("127.0.0.2", a.port)
        async with stream:
            await join_then_fall_silent(stream, "b", "old-incarnation")
            heard = anyio.current_time()
            await wait_until(lambda: names(a) == ["b"])
            async with make_node("b", "127.0.0.3", static(a), heartbeat_timeout=0.6) as restarted:
                await wait_until(
                    lambda: [p.incarnation for p in a.peers()] == [restarted.incarnation]
                )
                admitted = anyio.current_time() - heard
    # Not before the old link timed out, and soon after: one heartbeat timeout plus a poll.
    assert 0.6 <= admitted < 0.6 + 0.6
    assert [(e.kind, e.peer.incarnation) for e in seen[:3]] == [
        ("node-up", "old-incarnation"),
        ("node-down", "old-incarnation"),
        ("node-up", restarted.incarnation),
    ]


async def test_wrong_cookie_never_joins(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="handoff")
    async with make_node("a", "127.0.0.2") as a:
        intruder = Node(
            "shop",
            name="x",
            bind="127.0.0.3:0",
            discovery=static(a),
            **{**FAST_ARGS, "cookie": "another-cookie-0123456789"},
        )
        async with intruder:
            await wait_until(lambda: "authentication failed" in caplog.text)
            assert a.peers() == []
            assert intruder.peers() == []


async def test_port_in_use_is_a_clear_bind_error() -> None:
    async with make_node("a", "127.0.0.2") as a:
        clash = Node(
            "shop", cookie=COOKIE, name="b", bind=f"127.0.0.2:{a.port}", port_range=1, environ={}
        )
        with pytest.raises(PortsInUse, match=r"already in use.*HANDOFF_BIND") as info:
            await clash.start()
        assert isinstance(info.value, BindError)
        assert not clash.running


async def test_missing_cookie_fails_at_construction() -> None:
    with pytest.raises(ConfigError, match="HANDOFF_COOKIE"):
        Node("shop", environ={})


async def test_start_twice_is_refused_and_stop_is_idempotent() -> None:
    node = make_node("a", "127.0.0.2")
    await node.stop()
    async with node:
        assert node.running
        with pytest.raises(LocalProtocolError, match="already started"):
            await node.start()
    assert not node.running
    await node.stop()


async def test_dual_stack_bind_accepts_ipv4_and_ipv6() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("IPv6 loopback is not configured here")
    node = Node("shop", name="a", bind="[::]:0", **FAST_ARGS)
    async with node:
        for host in ("127.0.0.1", "::1"):
            async with await anyio.connect_tcp(host, node.port) as stream:
                await stream.send(b"\x00\x00\x00\x00")  # an empty frame: refused at once
                with anyio.fail_after(5):
                    reply = await stream.receive()
                assert reply  # a Reject frame, from the same dual-stack listener


# Every attribute the README uses, and the node's other public attributes.
DOCUMENTED_ATTRIBUTES = (
    "lock",
    "codec",
    "transforms",
    "last_drain_report",
    "catch_up_report",
    "warm_reason",
    "is_warm",
    "settings",
    "incarnation",
    "started_at",
)


@pytest.mark.parametrize("name", DOCUMENTED_ATTRIBUTES)
def test_help_documents_every_public_attribute(name: str) -> None:
    # help() shows no docstring written after an assignment: each attribute must head an
    # entry of its own (the class docstring's "Attributes" section, or a property), with
    # a description after it.
    text = pydoc.plain(pydoc.render_doc(handoff.Node))
    entry = re.search(rf"^[ |]*{name}(: \S.*| *\n[ |]*\S.*)$", text, re.M)
    assert entry, f"help(handoff.Node) does not document {name}"
