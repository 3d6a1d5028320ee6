"""Hostile input against a live node (invariant 6, "nothing before trust").

Two good nodes A and B are connected; a raw TCP client then attacks A. After every attack:
A closed the hostile connection within its bound, A and B still see each other and neither
published a membership event, a fresh node C can still join A, and nothing the attacker
received names A's release, its namespaces or its peers: before authentication A answers
only with ``Welcome`` (to a valid ``Hello``) or ``Reject``.
"""

from __future__ import annotations

import random
import resource
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass

import anyio
import anyio.abc
import msgpack
import pytest

from handoff import Node
from handoff._errors import (
    AuthenticationError,
    ClusterMismatch,
    HandoffError,
    VersionMismatch,
)
from handoff.membership import NodeUp
from handoff.protocol import (
    SUPPORTED_VERSIONS,
    Auth,
    Connection,
    HandshakeComplete,
    Hello,
    Info,
    LocalNode,
    NodeState,
    Reject,
    Role,
    Welcome,
    encode_frame,
)
from tests._helpers import (
    CLUSTER,
    COOKIE,
    OTHER_COOKIE,
    EventLog,
    decode_frames,
    make_node,
    read_until_closed,
    split_frames,
    watch,
)

HOST_A, HOST_B, HOST_C = "127.0.0.2", "127.0.0.3", "127.0.0.4"
HANDSHAKE_TIMEOUT = 1.0
HEARTBEAT_TIMEOUT = 2.0
# A peer that breaks the protocol outright is dropped at once, not at the handshake timeout.
PROMPT = 0.5
# Anything else is dropped by the handshake timeout at the latest.
BOUND = HANDSHAKE_TIMEOUT + 1.5
SECRET_NAMESPACE = "users-secret-namespace"
NONCE = bytes(range(32))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Cluster:
    a: Node
    b: Node
    log_a: EventLog
    log_b: EventLog
    task_group: anyio.abc.TaskGroup

    def marks(self) -> tuple[int, int]:
        return len(self.log_a.events), len(self.log_b.events)

    def secrets(self) -> list[bytes]:
        """What an unauthenticated client must never see."""
        return [
            self.a.release.encode(),
            SECRET_NAMESPACE.encode(),
            self.b.name.encode(),
            self.b.release.encode(),
            self.b.incarnation.encode(),
        ]


@asynccontextmanager
async def two_nodes(
    *, handshake_timeout: float = HANDSHAKE_TIMEOUT, max_pending_handshakes: int = 256
) -> AsyncIterator[Cluster]:
    """A (under attack) and B (dials A), connected, with their event logs."""
    async with anyio.create_task_group() as tg:
        a = make_node(
            "node-a",
            HOST_A,
            handshake_timeout=handshake_timeout,
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            max_pending_handshakes=max_pending_handshakes,
        )
        # A tracked namespace, as Info would announce it to an authenticated peer.
        a.track(SECRET_NAMESPACE, {"secret-key": "secret-value"}, version=3)
        log_a = await watch(tg, a)
        async with a:
            b = make_node("node-b", HOST_B, peers=[a], heartbeat_timeout=HEARTBEAT_TIMEOUT)
            log_b = await watch(tg, b)
            async with b:
                await log_a.wait_up("node-b")
                await log_b.wait_up("node-a")
                yield Cluster(a, b, log_a, log_b, tg)
        tg.cancel_scope.cancel()


def assert_cluster_intact(cluster: Cluster, marks: tuple[int, int]) -> None:
    assert [p.name for p in cluster.a.peers()] == ["node-b"]
    assert [p.name for p in cluster.b.peers()] == ["node-a"]
    mark_a, mark_b = marks
    assert cluster.log_a.since(mark_a) == []
    assert cluster.log_b.since(mark_b) == []


async def assert_new_node_joins(cluster: Cluster) -> None:
    c = make_node("node-c", HOST_C, peers=[cluster.a])
    log_c = await watch(cluster.task_group, c)
    async with c:
        await cluster.log_a.wait_up("node-c")
        await log_c.wait_up("node-a")
        assert {p.name for p in cluster.a.peers()} == {"node-b", "node-c"}
    await cluster.log_a.wait_down("node-c")


def assert_nothing_leaked(cluster: Cluster, received: bytes) -> list[Welcome | Reject]:
    """Only Welcome / Reject frames, and no byte of A's private state."""
    for secret in cluster.secrets():
        assert secret not in received, f"{secret!r} reached an unauthenticated client"
    messages = decode_frames(received)
    replies: list[Welcome | Reject] = []
    for message in messages:
        assert isinstance(message, Welcome | Reject), f"{message!r} sent before trust"
        replies.append(message)
    return replies


def intruder(
    name: str = "intruder",
    incarnation: str = "0123456789abcdef",
    *,
    cluster: str = CLUSTER,
    cookie: bytes = OTHER_COOKIE,
    versions: tuple[int, ...] = SUPPORTED_VERSIONS,
) -> Connection:
    """A real protocol client, possibly with the wrong cookie, cluster or versions."""
    local = LocalNode(cluster, name, incarnation, "intruder-release", 0.0)
    return Connection(
        Role.CLIENT,
        local,
        cookie,
        now=anyio.current_time(),
        versions=versions,
        nonce_factory=lambda size: NONCE[:size],
    )


@dataclass
class Outcome:
    """How a protocol client fared against A."""

    received: bytes
    """Everything A sent, until it closed."""
    error: HandoffError | None
    """What the client raised, if it failed."""
    farewell: bytes
    """What the client sent A after failing (its Reject)."""


async def drive(stream: anyio.abc.ByteStream, client: Connection) -> Outcome:
    """Run ``client`` over ``stream`` until either side fails or the server closes."""
    received = bytearray()
    await stream.send(client.data_to_send())
    with anyio.fail_after(BOUND):
        for _ in range(1000):
            try:
                chunk = await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return Outcome(bytes(received), None, b"")
            received += chunk
            try:
                events = client.receive_data(chunk, now=anyio.current_time())
            except HandoffError as exc:
                # The client tells the server why (a Reject), then waits for it to close.
                farewell = client.data_to_send()
                with suppress(anyio.BrokenResourceError):
                    await stream.send(farewell)
                rest = await read_until_closed(stream, within=BOUND)
                return Outcome(bytes(received) + rest, exc, farewell)
            assert events == [], "a client without the cookie completed the handshake"
            if out := client.data_to_send():
                await stream.send(out)
    raise AssertionError("unreachable: bounded by the time limit")


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def hello(*, cluster: str = CLUSTER, versions: list[int] | None = None) -> bytes:
    return encode_frame(
        Hello(
            tuple(versions or SUPPORTED_VERSIONS), cluster, "intruder", "0123456789abcdef", NONCE
        ).to_wire()
    )


def fake_info() -> bytes:
    info = Info("evil", 0.0, NodeState.SERVING, "", (), 0.0)
    return encode_frame(info.to_wire())


# -- the attacks -----------------------------------------------------------------------------
#
# Each gets a fresh connection to A and returns everything A sent until it closed.
Attack = Callable[[anyio.abc.ByteStream, Cluster], Awaitable[bytes]]


async def wrong_cookie(stream: anyio.abc.ByteStream, cluster: Cluster) -> bytes:
    """A real client with another cookie: it sees A's proof fail and says "auth"."""
    outcome = await drive(stream, intruder())
    assert isinstance(outcome.error, AuthenticationError)
    (farewell,) = decode_frames(outcome.farewell)
    assert isinstance(farewell, Reject)
    assert farewell.code == "auth"
    (welcome,) = decode_frames(outcome.received)
    assert isinstance(welcome, Welcome)
    return outcome.received


async def impersonate_b(stream: anyio.abc.ByteStream, cluster: Cluster) -> bytes:
    """B's name and incarnation (a Welcome from B gives both away), but not the cookie."""
    outcome = await drive(stream, intruder(cluster.b.name, cluster.b.incarnation))
    assert isinstance(outcome.error, AuthenticationError)
    return outcome.received


async def forged_auth(stream: anyio.abc.ByteStream, cluster: Cluster) -> bytes:
    """Ignore the server's proof and answer with a made-up one: A refuses ("auth") in the
    secure channel, so the forger gets one frame it cannot open, and nothing else."""
    await stream.send(hello())
    with anyio.fail_after(BOUND):
        first = await stream.receive()
    (welcome,) = decode_frames(first)
    assert isinstance(welcome, Welcome)
    fake = random.Random(7)
    forged = encode_frame(Auth(fake.randbytes(32), fake.randbytes(32)).to_wire())
    await stream.send(forged + fake_info())
    rest = await read_until_closed(stream, within=BOUND)
    for secret in cluster.secrets():
        assert secret not in rest
    (length,) = struct.unpack_from(">I", rest)
    assert len(rest) == 4 + length, "one sealed frame (the Reject), then the end"
    with pytest.raises(HandoffError):
        decode_frames(rest)
    return first


async def info_without_auth(stream: anyio.abc.ByteStream, cluster: Cluster) -> bytes:
    """Skip the proof and go straight to Info."""
    await stream.send(hello() + fake_info())
    received = await read_until_closed(stream, within=BOUND)
    *_, reject = decode_frames(received)
    assert isinstance(reject, Reject)
    assert reject.code == "protocol"
    return received


async def hello_twice(stream: anyio.abc.ByteStream, cluster: Cluster) -> bytes:
    await stream.send(hello() + hello())
    received = await read_until_closed(stream, within=BOUND)
    *_, reject = decode_frames(received)
    assert isinstance(reject, Reject)
    assert reject.code == "protocol"
    return received


async def wrong_cluster(stream: anyio.abc.ByteStream, cluster: Cluster) -> bytes:
    outcome = await drive(stream, intruder(cluster="other-cluster", cookie=COOKIE))
    assert isinstance(outcome.error, ClusterMismatch)
    received = outcome.received
    (reject,) = decode_frames(received)
    assert isinstance(reject, Reject)
    assert reject.code == "cluster"
    assert "'other-cluster'" in reject.reason
    assert f"'{CLUSTER}'" in reject.reason
    return received


async def unsupported_version(stream: anyio.abc.ByteStream, cluster: Cluster) -> bytes:
    outcome = await drive(stream, intruder(cookie=COOKIE, versions=(99,)))
    assert isinstance(outcome.error, VersionMismatch)
    received = outcome.received
    (reject,) = decode_frames(received)
    assert isinstance(reject, Reject)
    assert reject.code == "version"
    assert "[99]" in reject.reason
    assert str(list(SUPPORTED_VERSIONS)) in reject.reason
    return received


async def previous_protocol(stream: anyio.abc.ByteStream, cluster: Cluster) -> bytes:
    """A node of protocol 1 (no secure channel) is refused, and told why."""
    outcome = await drive(stream, intruder(cookie=COOKIE, versions=(1,)))
    assert isinstance(outcome.error, VersionMismatch)
    (reject,) = decode_frames(outcome.received)
    assert isinstance(reject, Reject)
    assert reject.code == "version"
    assert "no encrypted channel" in reject.reason
    return outcome.received


async def reject_first(stream: anyio.abc.ByteStream, cluster: Cluster) -> bytes:
    """A Reject with an unknown code instead of a Hello."""
    await stream.send(encode_frame(Reject("no-such-code", "go away").to_wire()))
    return await read_until_closed(stream, within=BOUND)


def garbage(seed: int) -> Attack:
    async def attack(stream: anyio.abc.ByteStream, cluster: Cluster) -> bytes:
        await stream.send(random.Random(seed).randbytes(700))
        return await read_until_closed(stream, within=BOUND)

    return attack


def garbage_frame(seed: int) -> Attack:
    """A frame of valid length whose payload is random bytes."""

    async def attack(stream: anyio.abc.ByteStream, cluster: Cluster) -> bytes:
        await stream.send(frame(random.Random(seed).randbytes(300)))
        received = await read_until_closed(stream, within=BOUND)
        for reply in decode_frames(received):
            assert isinstance(reply, Reject)
            assert reply.code == "protocol"
        return received

    return attack


async def four_gib_prefix(stream: anyio.abc.ByteStream, cluster: Cluster) -> bytes:
    await stream.send(b"\xff\xff\xff\xff" + b"\x00" * 64)
    received = await read_until_closed(stream, within=BOUND)
    for reply in decode_frames(received):
        assert isinstance(reply, Reject)
        assert reply.code == "protocol"
    return received


def nested(payload: bytes) -> Attack:
    async def attack(stream: anyio.abc.ByteStream, cluster: Cluster) -> bytes:
        await stream.send(frame(payload))
        received = await read_until_closed(stream, within=BOUND)
        (reject,) = decode_frames(received)
        assert isinstance(reject, Reject)
        assert reject.code == "protocol"
        return received

    return attack


async def ext_type_in_hello(stream: anyio.abc.ByteStream, cluster: Cluster) -> bytes:
    """A msgpack extension value (the route to custom decoders) in a handshake frame."""
    wire = Hello(SUPPORTED_VERSIONS, CLUSTER, "intruder", "0123456789abcdef", NONCE).to_wire()
    wire[3] = msgpack.ExtType(42, b"payload")
    await stream.send(frame(msgpack.packb(wire, use_bin_type=True)))
    return await read_until_closed(stream, within=BOUND)


def hello_with_extra(extra: bytes) -> bytes:
    """A valid Hello payload with one more (msgpack-encoded) trailing field.

    Hello tolerates extra trailing fields (for future versions), so only the depth bound
    stands between a deeply nested extra field and a Welcome.
    """
    wire = Hello(SUPPORTED_VERSIONS, CLUSTER, "intruder", "0123456789abcdef", NONCE).to_wire()
    packed: bytes = msgpack.packb(wire, use_bin_type=True)
    assert packed[0] == 0x90 + len(wire)  # a fixarray: bump its length by one
    return bytes([packed[0] + 1]) + packed[1:] + extra


# 10_000 nested one-element arrays: far beyond what a recursive decoder's stack survives.
DEEP_ARRAYS = b"\x91" * 10_000 + b"\x90"
DEEP_MAPS = b"\x81\xa1k" * 5_000 + b"\x80"
# Past the depth limit (32) but well within msgpack's own stack: check_depth's job.
DEPTH_40_ARRAYS = b"\x91" * 39 + b"\x90"
DEPTH_40_MAPS = b"\x81\xa1k" * 39 + b"\x80"

PROMPT_CASES: list[tuple[str, Attack]] = [
    ("wrong-cookie", wrong_cookie),
    ("impersonate-b", impersonate_b),
    ("forged-auth", forged_auth),
    ("info-without-auth", info_without_auth),
    ("hello-twice", hello_twice),
    ("wrong-cluster", wrong_cluster),
    ("unsupported-version", unsupported_version),
    ("previous-protocol", previous_protocol),
    ("reject-first", reject_first),
    ("four-gib-length-prefix", four_gib_prefix),
    ("nested-10000-arrays", nested(DEEP_ARRAYS)),
    ("nested-5000-maps", nested(DEEP_MAPS)),
    ("hello-with-10000-nested-arrays", nested(hello_with_extra(DEEP_ARRAYS))),
    ("hello-with-40-nested-arrays", nested(hello_with_extra(DEPTH_40_ARRAYS))),
    ("hello-with-40-nested-maps", nested(hello_with_extra(DEPTH_40_MAPS))),
    ("ext-type-in-hello", ext_type_in_hello),
    *((f"garbage-frame-seed-{seed}", garbage_frame(seed)) for seed in (1, 2, 3)),
]
# Random bytes usually announce a huge frame (dropped at once), but a small length prefix
# would make A wait for the rest of the frame: the handshake timeout bounds those.
BOUNDED_CASES: list[tuple[str, Attack]] = [
    *((f"garbage-seed-{seed}", garbage(seed)) for seed in (1, 2, 3, 4)),
]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("attack", "limit"),
    [pytest.param(attack, PROMPT, id=name) for name, attack in PROMPT_CASES]
    + [pytest.param(attack, BOUND, id=name) for name, attack in BOUNDED_CASES],
)
async def test_hostile_client_is_dropped_and_cluster_survives(attack: Attack, limit: float) -> None:
    async with two_nodes() as cluster:
        marks = cluster.marks()
        stream = await anyio.connect_tcp(HOST_A, cluster.a.port)
        async with stream:
            started = anyio.current_time()
            received = await attack(stream, cluster)
            elapsed = anyio.current_time() - started
        assert elapsed < limit, f"A kept the hostile connection open for {elapsed:.2f} s"
        assert_nothing_leaked(cluster, received)
        assert_cluster_intact(cluster, marks)
        await assert_new_node_joins(cluster)
        assert [p.name for p in cluster.a.peers()] == ["node-b"]


@pytest.mark.anyio
async def test_half_a_frame_then_silence_is_dropped_at_the_handshake_timeout() -> None:
    async with two_nodes() as cluster:
        marks = cluster.marks()
        whole = hello()
        stream = await anyio.connect_tcp(HOST_A, cluster.a.port)
        async with stream:
            started = anyio.current_time()
            await stream.send(whole[: len(whole) // 2])
            received = await read_until_closed(stream, within=HANDSHAKE_TIMEOUT + 1.5)
            elapsed = anyio.current_time() - started
        assert HANDSHAKE_TIMEOUT - 0.05 <= elapsed <= HANDSHAKE_TIMEOUT + 1.5
        replies = assert_nothing_leaked(cluster, received)
        assert [(r.code if isinstance(r, Reject) else r) for r in replies] == ["timeout"]
        assert_cluster_intact(cluster, marks)
        await assert_new_node_joins(cluster)


@pytest.mark.anyio
async def test_silent_connection_is_dropped_at_the_handshake_timeout() -> None:
    async with two_nodes() as cluster:
        marks = cluster.marks()
        stream = await anyio.connect_tcp(HOST_A, cluster.a.port)
        async with stream:
            started = anyio.current_time()
            received = await read_until_closed(stream, within=HANDSHAKE_TIMEOUT + 1.5)
            elapsed = anyio.current_time() - started
        assert HANDSHAKE_TIMEOUT - 0.05 <= elapsed <= HANDSHAKE_TIMEOUT + 1.5
        assert_nothing_leaked(cluster, received)
        assert_cluster_intact(cluster, marks)


# -- replay --------------------------------------------------------------------------------


async def record_session(cluster: Cluster) -> tuple[bytes, Welcome]:
    """A genuine client (right cookie, fixed nonce) joins A; returns every byte it sent."""
    client = intruder("recorder", "fedcba9876543210", cookie=COOKIE)
    sent = bytearray()
    welcome: Welcome | None = None
    stream = await anyio.connect_tcp(HOST_A, cluster.a.port)
    async with stream:
        with anyio.fail_after(BOUND):
            for _ in range(100):
                if out := client.data_to_send():
                    sent += out
                    await stream.send(out)
                chunk = await stream.receive()
                if welcome is None:  # the first answer, in clear; the rest is sealed
                    (first, *_) = split_frames(chunk)
                    (message,) = decode_frames(first)
                    assert isinstance(message, Welcome)
                    welcome = message
                events = client.receive_data(chunk, now=anyio.current_time())
                if any(isinstance(e, HandshakeComplete) for e in events):
                    break
            if out := client.data_to_send():
                sent += out
                await stream.send(out)
        await cluster.log_a.wait_up("recorder")
        client.close("recording done")
        await stream.send(client.data_to_send())
    await cluster.log_a.wait_down("recorder")
    assert welcome is not None
    return bytes(sent), welcome


@pytest.mark.anyio
@pytest.mark.parametrize("interactive", [False, True], ids=["all-at-once", "step-by-step"])
async def test_replayed_transcript_fails_authentication(interactive: bool) -> None:
    async with two_nodes() as cluster:
        transcript, first_welcome = await record_session(cluster)
        marks = cluster.marks()
        stream = await anyio.connect_tcp(HOST_A, cluster.a.port)
        async with stream:
            if interactive:
                hello_length = len(split_frames(transcript)[0])
                await stream.send(transcript[:hello_length])
                with anyio.fail_after(BOUND):
                    first = await stream.receive()
                await stream.send(transcript[hello_length:])
                received = first + await read_until_closed(stream, within=PROMPT)
            else:
                await stream.send(transcript)
                received = await read_until_closed(stream, within=PROMPT)
        # A's answer: a fresh Welcome, then its refusal sealed with keys the replayer cannot
        # have (it has neither the cookie nor the recorded session's ephemeral secrets).
        welcome_frame, sealed_reject = split_frames(received)
        (welcome,) = assert_nothing_leaked(cluster, welcome_frame)
        assert isinstance(welcome, Welcome)
        assert welcome.nonce != first_welcome.nonce
        assert welcome.key != first_welcome.key
        with pytest.raises(HandoffError):
            decode_frames(sealed_reject)
        assert not any(isinstance(e, NodeUp) for e in cluster.log_a.since(marks[0]))
        assert_cluster_intact(cluster, marks)
        await assert_new_node_joins(cluster)


# -- a flood of idle connections -----------------------------------------------------------

FLOOD_SOCKETS = 1000
FLOOD_BATCH = 50
FLOOD_CAP = 64
# The default handshake timeout: idle sockets hold their pending slot for this long.
FLOOD_HANDSHAKE_TIMEOUT = 5.0
# Start C once this many batches (well past the cap) are open.
C_AFTER_BATCHES = 4


@pytest.fixture
def enough_file_descriptors() -> Iterator[None]:
    """Raise the soft RLIMIT_NOFILE for the flood (both ends live in this process)."""
    needed = 2 * FLOOD_SOCKETS + 512
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"the flood needs {needed} file descriptors; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.anyio
@pytest.mark.usefixtures("enough_file_descriptors")
async def test_idle_connection_flood_does_not_starve_real_peers() -> None:
    async with two_nodes(
        handshake_timeout=FLOOD_HANDSHAKE_TIMEOUT, max_pending_handshakes=FLOOD_CAP
    ) as cluster:
        marks = cluster.marks()
        c = make_node("node-c", HOST_C, peers=[cluster.a])
        log_c = await watch(cluster.task_group, c)
        idle: list[anyio.abc.SocketStream] = []
        started = anyio.current_time()
        async with AsyncExitStack() as stack:
            for batch in range(FLOOD_SOCKETS // FLOOD_BATCH):
                for _ in range(FLOOD_BATCH):
                    idle.append(await anyio.connect_tcp(HOST_A, cluster.a.port))
                # B learns C from A's list of peers (Peers) once C joined.
                assert [p.name for p in cluster.b.peers() if p.name != "node-c"] == ["node-a"]
                assert "node-b" in [p.name for p in cluster.a.peers()]
                if batch + 1 == C_AFTER_BATCHES:
                    await stack.enter_async_context(c)
                # Pace the flood so that it outlasts the heartbeat timeout.
                await anyio.sleep(0.1)
            # The flood outlasts B's and A's heartbeat timeout (idle sockets still open).
            await anyio.sleep(max(0.0, started + HEARTBEAT_TIMEOUT + 0.5 - anyio.current_time()))
            assert anyio.current_time() - started > HEARTBEAT_TIMEOUT
            # C joined while the cap was full of idle sockets, not after they timed out.
            joined = [e for e in cluster.log_a.since(marks[0]) if isinstance(e, NodeUp)]
            assert [e.peer.name for e in joined] == ["node-c"], (
                "node C could not join while idle connections filled the pending-handshake cap"
            )
            await log_c.wait_up("node-a", within=0.1)
            # The oldest idle socket was evicted long before its handshake timeout.
            assert await read_until_closed(idle[0], within=0.5) == b""
            assert [p.name for p in cluster.a.peers()] == ["node-b", "node-c"]
            assert [p.name for p in cluster.b.peers() if p.name != "node-c"] == ["node-a"]
            for stream in idle:
                await anyio.aclose_forcefully(stream)
        await cluster.log_a.wait_down("node-c")
        events_a = [e for e in cluster.log_a.since(marks[0]) if e.peer.name != "node-c"]
        assert events_a == []
        assert [e for e in cluster.log_b.since(marks[1]) if e.peer.name != "node-c"] == []
        # And A still takes newcomers once the flood is over.
        await assert_new_node_joins(cluster)


@pytest.mark.anyio
async def test_protocol_error_is_logged_with_the_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="handoff")
    async with two_nodes() as cluster:
        stream = await anyio.connect_tcp(HOST_A, cluster.a.port)
        async with stream:
            await stream.send(b"\xff\xff\xff\xff")
            await read_until_closed(stream, within=PROMPT)
        # A logs the reason before it closes the connection.
        assert any(
            r.name.startswith("handoff") and "exceeds the limit" in r.getMessage()
            for r in caplog.records
        )
