"""Shared helpers for tests that run real nodes on loopback: event logs and raw sockets."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import anyio.abc
import anyio.lowlevel

from handoff import Node
from handoff.membership import MembershipEvent, NodeDown, NodeUp
from handoff.protocol import FrameDecoder, Message, decode_message

__all__ = (
    "CLUSTER",
    "COOKIE",
    "OTHER_COOKIE",
    "EventLog",
    "decode_frames",
    "make_node",
    "read_until_closed",
    "static_to",
    "watch",
)

CLUSTER = "shop"
COOKIE = b"test-cookie-0123456789abcdef"
OTHER_COOKIE = b"not-the-cookie-9876543210zyxw"

# Generous decoding limits for what a test client received (the node bounds its own side).
_CLIENT_FRAME_LIMIT = 1024 * 1024
_CLIENT_DEPTH = 32
_WAIT_STEPS = 100_000


def static_to(*nodes: Node) -> str:
    """A ``static:`` discovery spec that lists the given (started) nodes."""
    return "static:" + ",".join(node.address for node in nodes)


def make_node(
    name: str,
    host: str,
    *,
    peers: Sequence[Node] = (),
    handshake_timeout: float = 1.0,
    heartbeat_timeout: float = 2.0,
    max_pending_handshakes: int = 256,
    tls: tuple[Path, Path, Path] | None = None,
) -> Node:
    """A node on ``host`` (any free port) that dials ``peers``; no environment leaks in."""
    cert, key, ca = tls if tls is not None else (None, None, None)
    return Node(
        CLUSTER,
        cookie=COOKIE,
        name=name,
        release=f"release-of-{name}",
        bind=f"{host}:0",
        discovery=static_to(*peers) if peers else "none",
        poll_interval=0.2,
        heartbeat_timeout=heartbeat_timeout,
        handshake_timeout=handshake_timeout,
        connect_timeout=1.0,
        tls_cert=cert,
        tls_key=key,
        tls_ca=ca,
        environ={},
        max_pending_handshakes=max_pending_handshakes,
    )


class EventLog:
    """Every membership event one node publishes through ``node.events()``."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.events: list[MembershipEvent] = []
        self._changed = anyio.Event()

    async def _run(self) -> None:
        async for event in self.node.events():
            self.events.append(event)
            self._changed.set()
            self._changed = anyio.Event()

    async def wait_for(
        self, predicate: Callable[[MembershipEvent], bool], *, within: float
    ) -> MembershipEvent:
        """The first event (already seen or still to come) that matches ``predicate``."""
        seen = 0
        with anyio.fail_after(within):
            for _ in range(_WAIT_STEPS):
                for event in self.events[seen:]:
                    if predicate(event):
                        return event
                seen = len(self.events)
                await self._changed.wait()
        raise AssertionError("unreachable: the wait is bounded by its time limit")

    async def wait_up(self, name: str, *, within: float = 5.0) -> MembershipEvent:
        """Wait for node-up of the peer called ``name``."""
        return await self.wait_for(
            lambda e: isinstance(e, NodeUp) and e.peer.name == name, within=within
        )

    async def wait_down(self, name: str, *, within: float = 5.0) -> MembershipEvent:
        """Wait for node-down of the peer called ``name``."""
        return await self.wait_for(
            lambda e: isinstance(e, NodeDown) and e.peer.name == name, within=within
        )

    def since(self, mark: int) -> list[MembershipEvent]:
        """Events that arrived after ``mark`` (a previous ``len(log.events)``)."""
        return self.events[mark:]


async def watch(task_group: anyio.abc.TaskGroup, node: Node) -> EventLog:
    """Subscribe to ``node.events()`` in a background task; returns once subscribed.

    ``events()`` registers its buffer when first iterated; one checkpoint lets the new
    task get there. Callers still confirm it by waiting for an expected event.
    """
    log = EventLog(node)
    task_group.start_soon(log._run)
    await anyio.lowlevel.checkpoint()
    await anyio.lowlevel.checkpoint()
    return log


async def read_until_closed(stream: anyio.abc.ByteStream, *, within: float) -> bytes:
    """Everything the peer sends until it closes; fails if it is still open after ``within`` s."""
    received = bytearray()
    with anyio.fail_after(within):
        for _ in range(_WAIT_STEPS):
            try:
                chunk = await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return bytes(received)
            received += chunk
    raise AssertionError("the peer kept sending without closing")


def decode_frames(data: bytes) -> list[Message]:
    """The protocol messages in ``data`` (complete frames only; a cut-off tail is ignored)."""
    decoder = FrameDecoder(_CLIENT_FRAME_LIMIT, _CLIENT_DEPTH)
    decoder.feed(data)
    messages: list[Message] = []
    for _ in range(_WAIT_STEPS):
        obj = decoder.next_object()
        if obj is None:
            break
        messages.append(decode_message(obj))
    return messages
