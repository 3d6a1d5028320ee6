"""Shared helpers for tests that run real nodes on loopback: event logs, raw sockets, node
processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread

from handoff import Node
from handoff._local.process import STATE_ENV
from handoff.membership import MembershipEvent, NodeDown, NodeUp
from handoff.protocol import FrameDecoder, Message, decode_message
from handoff.simulate import loopback_aliases_usable
from handoff.testing import NodeProcess

__all__ = (
    "CLUSTER",
    "COOKIE",
    "FAST",
    "OTHER_COOKIE",
    "EventLog",
    "ProcessCluster",
    "connected",
    "decode_frames",
    "handoff_node",
    "loopback_aliases_usable",
    "make_node",
    "read_until_closed",
    "static_to",
    "wait_all_tasks_blocked",
    "wait_until",
    "watch",
)

CLUSTER = "shop"
COOKIE = b"test-cookie-0123456789abcdef"
OTHER_COOKIE = b"not-the-cookie-9876543210zyxw"

# Generous decoding limits for what a test client received (the node bounds its own side).
_CLIENT_FRAME_LIMIT = 1024 * 1024
_CLIENT_DEPTH = 32
_WAIT_STEPS = 100_000
# Event loop turns one wait for quiescence may take: far more than any burst of work in the
# fake-clock tests (a task that never blocks is a hang, which this turns into a failure).
_QUIESCENCE_TURNS = 10_000_000


class ProcessCluster:
    """Starts node processes of one cluster; every one is ended (and reaped) when
    ``stack`` closes.

    At the end they are SIGKILLed all at once, not stopped one by one with SIGTERM: a test
    that wants a clean stop does it (and checks it) itself, and a SIGTERM at teardown only
    made each node drain its state to nobody, one node after another, for nothing.
    """

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self._stack = stack
        self._cookie = secrets.token_urlsafe(32)
        self._nodes: list[NodeProcess] = []

    def _kill_all(self) -> None:
        for node in self._nodes:
            if node.running:
                node.send_signal(signal.SIGKILL)
        for node in self._nodes:
            if node.running:
                node.kill()

    def start(
        self,
        name: str,
        host: str,
        *,
        state: Mapping[str, Any],
        release: str = "v1",
        port: int = 0,
        peers: Sequence[str] = (),
        snapshot_dir: Path | None = None,
        drain_timeout: float = 30.0,
    ) -> NodeProcess:
        """A node on ``host:port`` holding ``state``, dialling the addresses ``peers``."""
        env = {
            "HANDOFF_COOKIE": self._cookie,
            "HANDOFF_CLUSTER": CLUSTER,
            "HANDOFF_RELEASE": release,
            "HANDOFF_BIND": f"{host}:{port}",
            "HANDOFF_DISCOVERY": "static:" + ",".join(peers) if peers else "none",
            "HANDOFF_POLL_INTERVAL": "0.2",
            "HANDOFF_HEARTBEAT_TIMEOUT": "6",
            "HANDOFF_DRAIN_TIMEOUT": str(drain_timeout),
            # Warm because of the handoff, not because the warm-up wait ran out.
            "HANDOFF_WARMUP_TIMEOUT": "120",
            STATE_ENV: json.dumps(state),
        }
        if snapshot_dir is not None:
            env["HANDOFF_SNAPSHOT_DIR"] = str(snapshot_dir)
        # Entered into the stack as soon as it exists: closed even if a later step fails.
        node = self._stack.enter_context(NodeProcess(env, name=name))
        self._nodes.append(node)
        # Runs before the closes of every node started so far (the stack unwinds in
        # reverse); the later copies find nothing left running.
        self._stack.callback(self._kill_all)
        return node


# Timings for in-process handoff tests: quick to connect, quick to notice a dead peer.
FAST: dict[str, Any] = {
    "cookie": COOKIE,
    "environ": {},
    "poll_interval": 0.1,
    "heartbeat_timeout": 2.0,
    "handshake_timeout": 1.0,
    "warmup_timeout": 5.0,
}


def handoff_node(name: str, host: str, *peers: Node, release: str = "v1", **kwargs: Any) -> Node:
    """A node of cluster ``shop`` on ``host`` (port 0) dialling the started ``peers``."""
    discovery = "static:" + ",".join(p.address for p in peers) if peers else "none"
    return Node(CLUSTER, name=name, release=release, bind=f"{host}:0", discovery=discovery,
                **{**FAST, **kwargs})  # fmt: skip


def _blocked(task: asyncio.Task[Any]) -> bool:
    waiter = task._fut_waiter  # type: ignore[attr-defined]
    return waiter is not None and not waiter.done()


# The tasks inside wait_all_tasks_blocked, the latest last, each with the future it sets
# when it returns: an earlier one waits on the latest's (so that it counts as blocked).
_quiescence_waiters: list[tuple[asyncio.Task[Any], asyncio.Future[None]]] = []


async def wait_all_tasks_blocked() -> None:
    """Return once every other task waits on something other than a worker thread, and the
    event loop has no callback left to run.

    :func:`anyio.wait_all_tasks_blocked` on asyncio sleeps 0.1 s whenever a task can still
    run, so a fake-clock test that waits for quiescence thousands of times spent most of
    its time asleep. That sleep also hid two things it does not check: a task that awaits a
    worker thread (the receiver decodes chunks in one) counts as blocked, and so does one
    whose child task just ended (the callback that wakes it is still queued). This one
    gives the loop one turn at a time and checks both: done as soon as the tasks are, and
    the same on a loaded machine. When several tasks wait at once, the latest to start
    returns first (a helper task's wait inside a test's ``drive``), then the others.
    Other backends (trio) have a native, exact wait.
    """
    try:
        this = asyncio.current_task()
    except RuntimeError:  # not on asyncio
        this = None
    if this is None:
        await anyio.wait_all_tasks_blocked()
        return
    await anyio.lowlevel.checkpoint()
    loop = asyncio.get_running_loop()
    threads = anyio.to_thread.current_default_thread_limiter()
    # (Entries of a task that ended, or of another test's loop, are stale.)
    _quiescence_waiters[:] = [
        waiter
        for waiter in _quiescence_waiters
        if not waiter[0].done() and waiter[1].get_loop() is loop
    ]
    entry = (this, loop.create_future())
    _quiescence_waiters.append(entry)
    try:
        for _ in range(_QUIESCENCE_TURNS):
            if _quiescence_waiters[-1] is not entry:
                await asyncio.shield(_quiescence_waiters[-1][1])
            elif threads.borrowed_tokens:
                # A worker thread at work (or its task about to resume): it takes real time.
                await asyncio.sleep(0.0005)
            elif not loop._ready and all(  # type: ignore[attr-defined]
                task is this or _blocked(task) for task in asyncio.all_tasks()
            ):
                return
            else:
                await asyncio.sleep(0)
        raise AssertionError("the tasks never all blocked: one runs without waiting")
    finally:
        if entry in _quiescence_waiters:
            _quiescence_waiters.remove(entry)
        if not entry[1].done():
            entry[1].set_result(None)


async def wait_until(predicate: Callable[[], bool], limit: float = 5.0) -> None:
    """Poll ``predicate`` until true: for conditions across several nodes at once, which
    no single event covers."""
    with anyio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.01)


def connected(*nodes: Node) -> Callable[[], bool]:
    """True once every node sees all the others."""
    return lambda: all(len(n.peers()) == len(nodes) - 1 for n in nodes)


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


def split_frames(data: bytes) -> list[bytes]:
    """Cut a byte stream into whole frames (header included; a cut-off tail is dropped)."""
    frames = []
    while len(data) >= 4:
        end = 4 + int.from_bytes(data[:4], "big")
        if len(data) < end:
            break
        frames.append(data[:end])
        data = data[end:]
    return frames


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
