"""The secure channel (invariant 6): every frame after the handshake sealed, nothing forged.

Sans-IO first: two real connections, and an attacker between them that sees and rewrites
every byte: it flips, drops, replays, reorders and injects frames. Whatever it does, the
receiving side raises before it hands on anything the sender did not send, in the order it
was sent; the link then ends. Then the same attacker as a TCP relay between live nodes during
a drain: the link drops, nothing forged is applied, the drain re-routes to an honest
successor, and its report stays true.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections.abc import Callable

import anyio
import anyio.abc
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handoff import Node
from handoff._errors import (
    FrameAuthenticationError,
    FrameTooLarge,
    HandoffError,
    ProtocolError,
)
from handoff._keys import cluster_key
from handoff.protocol import (
    Ack,
    Auth,
    Chunk,
    Connection,
    End,
    HandshakeComplete,
    Hello,
    Info,
    Limits,
    LocalNode,
    Message,
    MessageReceived,
    Offer,
    Reject,
    Role,
    Welcome,
    encode_frame,
)
from handoff.protocol._channel import TAG_SIZE, Ephemeral, session_keys
from tests._helpers import (
    CLUSTER,
    COOKIE,
    FAST,
    OTHER_COOKIE,
    decode_frames,
    handoff_node,
    loopback_aliases_usable,
    split_frames,
    wait_until,
)

LIMITS = Limits(frame_size=64 * 1024)
_seeds = itertools.count(10_000)


def _nonces(seed: int) -> Callable[[int], bytes]:
    counter = itertools.count()
    return lambda size: hashlib.sha256(f"{seed}/{next(counter)}".encode()).digest()[:size]


def connection(role: Role, name: str, seed: int, cookie: bytes = COOKIE) -> Connection:
    local = LocalNode(CLUSTER, name, f"inc-{name}", "v1", 0.0)
    return Connection(role, local, cookie, now=0.0, limits=LIMITS, nonce_factory=_nonces(seed))


def established(seed: int | None = None) -> tuple[Connection, Connection]:
    """A client and a server through the handshake. The same ``seed`` gives the same session
    (nonces, ephemeral keys, hence session keys), so a test can replay one point in a
    session against as many fresh receivers as it has mutations."""
    seed = next(_seeds) if seed is None else seed
    client = connection(Role.CLIENT, "a", 2 * seed)
    server = connection(Role.SERVER, "b", 2 * seed + 1)
    for _ in range(4):
        server.receive_data(client.data_to_send(), now=0)
        client.receive_data(server.data_to_send(), now=0)
    assert client.peer is not None
    assert server.peer is not None
    assert client.encrypted
    assert server.encrypted
    return client, server


def chunk(seq: int, payload: bytes = b"\x91\x92\xa1k\xa1v") -> Chunk:
    return Chunk(1, seq, 1, 0.0, payload)


def sent_frames(sender: Connection, *messages: Message) -> list[bytes]:
    for message in messages:
        sender.send(message, now=0)
    return split_frames(sender.data_to_send())


def delivered(receiver: Connection, data: bytes) -> tuple[list[Message], HandoffError | None]:
    """The session messages ``receiver`` hands on from ``data``, fed frame by frame (a cut
    tail as it is), and the error that ended it (``None`` if none did)."""
    frames = split_frames(data)
    tail = data[sum(map(len, frames)) :]
    handed_on: list[Message] = []
    for piece in [*frames, tail]:
        try:
            events = receiver.receive_data(piece, now=0)
        except HandoffError as exc:
            return handed_on, exc
        handed_on += [e.message for e in events if isinstance(e, MessageReceived)]
    return handed_on, None


# -- what the wire shows ---------------------------------------------------------------------


def test_nothing_after_the_handshake_is_in_clear() -> None:
    client = connection(Role.CLIENT, "a", 70)
    server = connection(Role.SERVER, "b-release-name", 71)
    wire = bytearray()
    for _ in range(4):
        data = client.data_to_send()
        wire += data
        server.receive_data(data, now=0)
        data = server.data_to_send()
        wire += data
        client.receive_data(data, now=0)
    secret = b"user:42 card 4111-1111-1111-1111"
    sealed = b"".join(
        sent_frames(client, Chunk(1, 0, 1, 0.0, secret), Offer(1, "users-ns", "dict", 1, 1))
    )
    wire += sealed
    assert delivered(server, sealed)[0] == [
        Chunk(1, 0, 1, 0.0, secret),
        Offer(1, "users-ns", "dict", 1, 1),
    ]
    for plain in (secret, b"users-ns", b"v1", b"serving"):
        assert plain not in wire
    frames = split_frames(bytes(wire))
    assert [type(m) for m in decode_frames(b"".join(frames[:3]))] == [Hello, Welcome, Auth]
    assert len(frames) == 3 + 2 + 2  # then both Infos and the two session messages, sealed


def test_each_direction_and_each_session_has_its_own_keys() -> None:
    one_client, one_server = established()
    two_client, two_server = established()
    frames = [
        sent_frames(one_client, End(1, 1))[0],
        sent_frames(one_server, End(1, 1))[0],
        sent_frames(two_client, End(1, 1))[0],
        sent_frames(two_server, End(1, 1))[0],
    ]
    # The same plaintext at the same sequence number seals four different ways.
    assert len(set(frames)) == 4


def test_session_keys_need_the_cookie_and_the_exchange() -> None:
    one, two = Ephemeral(bytes(32)), Ephemeral(b"\x01" * 32)
    shared = one.exchange(two.public)
    assert shared == two.exchange(one.public)
    key = cluster_key(COOKIE, CLUSTER)
    keys = session_keys(key, shared, b"transcript")
    assert keys.client_to_server != keys.server_to_client
    other_cookie = cluster_key(OTHER_COOKIE, CLUSTER)
    for different in (
        session_keys(other_cookie, shared, b"transcript"),
        session_keys(key, shared, b"other transcript"),
        session_keys(key, bytes(32), b"transcript"),
    ):
        assert different.client_to_server != keys.client_to_server
    assert repr(keys) == "SessionKeys(...)"


def test_a_low_order_key_exchange_value_is_refused() -> None:
    with pytest.raises(ProtocolError, match="unusable"):
        Ephemeral(b"\x05" * 32).exchange(bytes(32))


# -- an attacker on the path ---------------------------------------------------------------

SENT = (chunk(0), chunk(1, b"\x91\x92\xa4user\xa5admin"), End(1, 3), chunk(2))


def _stream(seed: int) -> tuple[Connection, list[bytes]]:
    """A fresh server of session ``seed`` and the sealed frames its client sends (SENT)."""
    client, server = established(seed)
    return server, sent_frames(client, *SENT)


def test_the_untouched_stream_is_delivered_in_order() -> None:
    server, frames = _stream(1)
    assert delivered(server, b"".join(frames)) == (list(SENT), None)


def _flip(frames: list[bytes], index: int, position: int) -> list[bytes]:
    tampered = bytearray(frames[index])
    tampered[position % len(tampered)] ^= 0x01
    return [*frames[:index], bytes(tampered), *frames[index + 1 :]]


REJECT_SELF = Reject("self", "")
Mutation = Callable[[list[bytes]], list[bytes]]
MUTATIONS: dict[str, tuple[Mutation, int]] = {
    # name: (what the attacker does to the frames, how many are delivered before it shows)
    "flip-length-prefix": (lambda f: _flip(f, 1, 3), 1),
    "flip-ciphertext": (lambda f: _flip(f, 1, 9), 1),
    "flip-tag": (lambda f: _flip(f, 1, -1), 1),
    "drop": (lambda f: [f[0], *f[2:]], 1),
    "replay": (lambda f: [f[0], f[1], f[1], *f[2:]], 2),
    "replay-first-at-end": (lambda f: [*f, f[0]], 4),
    "reorder": (lambda f: [f[0], f[2], f[1], f[3]], 1),
    "inject-clear-frame": (lambda f: [f[0], encode_frame(chunk(9).to_wire()), *f[1:]], 1),
    "inject-clear-reject": (
        lambda f: [f[0], encode_frame(Reject("self", "").to_wire()), *f[1:]],
        1,
    ),
    "truncate-and-extend": (lambda f: [f[0], f[1][:-1] + b"\0", *f[2:]], 1),
    "empty-sealed-frame": (lambda f: [f[0], struct.pack(">I", TAG_SIZE) + bytes(TAG_SIZE)], 1),
    "shorter-than-a-tag": (lambda f: [f[0], struct.pack(">I", 3) + b"abc"], 1),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_an_attacker_on_the_path_cannot_get_anything_forged_through(name: str) -> None:
    mutate, intact = MUTATIONS[name]
    server, frames = _stream(2)
    handed_on, error = delivered(server, b"".join(mutate(frames)))
    assert handed_on == list(SENT[:intact])
    assert isinstance(error, FrameAuthenticationError), error
    assert server.closed
    # The server says why, sealed: the attacker cannot read it and the peer can.
    assert server.data_to_send()


def test_frames_from_another_session_are_refused() -> None:
    # The same two nodes, the same cookie, another handshake: nothing crosses over.
    _, other_frames = _stream(3)
    server, frames = _stream(4)
    handed_on, error = delivered(server, frames[0] + other_frames[1])
    assert handed_on == [SENT[0]]
    assert isinstance(error, FrameAuthenticationError)


def test_a_forged_reject_after_the_handshake_is_refused_not_obeyed() -> None:
    client, _ = established()
    _, error = delivered(client, encode_frame(Reject("self", "you are me").to_wire()))
    assert isinstance(error, FrameAuthenticationError)
    assert "self" not in str(error)


def test_the_sealed_frame_limit_holds_before_decryption() -> None:
    _, server = established()
    _, error = delivered(server, struct.pack(">I", LIMITS.frame_size + TAG_SIZE + 1))
    assert isinstance(error, FrameTooLarge)


@given(
    mutations=st.lists(
        st.tuples(st.integers(0, 10_000), st.integers(0, 255).filter(bool)),
        min_size=1,
        max_size=4,
    ),
    cut=st.integers(0, 10_000),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzzed_sealed_streams_deliver_a_prefix_of_what_was_sent(
    mutations: list[tuple[int, int]], cut: int
) -> None:
    """Any byte-level corruption of the sealed stream: the receiver hands on exactly a
    prefix of what was sent (never an altered or extra message) and fails with a
    HandoffError, never anything else."""
    server, frames = _stream(5)
    wire = bytearray(b"".join(frames))
    for position, xor in mutations:
        wire[position % len(wire)] ^= xor
    data = bytes(wire[: max(1, cut % (len(wire) + 1))])
    handed_on, _ = delivered(server, data)  # errors are HandoffErrors: anything else raises
    assert handed_on == list(SENT[: len(handed_on)])


@given(st.binary(min_size=1, max_size=2048))
@settings(max_examples=300, deadline=None)
def test_random_bytes_after_the_handshake_never_deliver_anything(garbage: bytes) -> None:
    _, server = established(6)
    handed_on, error = delivered(server, garbage)
    assert handed_on == []
    if len(garbage) >= 4 + TAG_SIZE and len(split_frames(garbage)) > 0:
        assert isinstance(error, ProtocolError)


def test_a_client_info_is_sealed_too() -> None:
    client, server = connection(Role.CLIENT, "a", 90), connection(Role.SERVER, "b", 91)
    server.receive_data(client.data_to_send(), now=0)
    client.receive_data(server.data_to_send(), now=0)
    auth, info = split_frames(client.data_to_send())
    assert b"v1" not in info
    # An Info in clear in its place (the peer's claims, unauthenticated) is refused.
    clear_info = encode_frame(Info("v9", 0.0, client._local.state, "", (), 0.0).to_wire())
    handed_on, error = delivered(server, auth + clear_info)
    assert isinstance(error, FrameAuthenticationError)
    assert server.peer is None
    assert not any(isinstance(m, HandshakeComplete) for m in handed_on)


def test_msgpack_inside_a_good_seal_is_still_bounded() -> None:
    # A peer holding the keys (a buggy or hostile member) gets the same decode bounds.
    client, server = established()
    assert client._send_cipher is not None
    sealed = client._send_cipher.seal(b"\x91" * 100 + b"\x90")
    _, error = delivered(server, sealed)
    assert isinstance(error, ProtocolError)
    assert "deeper" in str(error)


# -- the same attacker as a relay between live nodes ----------------------------------------

ENTRIES = 20_000
PLANTED = "user:42"
HOST_A, HOST_B, HOST_C, HOST_RELAY = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"
# A frame this large from A to B is a chunk of records (the first chunks are small).
CHUNK_SIZE = 4096
Tamper = Callable[[bytes, "Relay"], list[bytes]]


def _planted_chunk() -> bytes:
    record = msgpack.packb([[PLANTED, {"role": "admin"}]], use_bin_type=True)
    return encode_frame(Chunk(1, 0, 1, 0.0, record).to_wire())


def _flip_middle(frame: bytes, relay: Relay) -> list[bytes]:
    tampered = bytearray(frame)
    tampered[len(frame) // 2] ^= 0x04
    return [bytes(tampered)]


def _drop(frame: bytes, relay: Relay) -> list[bytes]:
    return []


def _replay(frame: bytes, relay: Relay) -> list[bytes]:
    return [frame, frame]


def _inject(frame: bytes, relay: Relay) -> list[bytes]:
    return [_planted_chunk(), frame]


def _reorder(frame: bytes, relay: Relay) -> list[bytes]:
    relay.held = frame  # sent after the next frame
    return []


TAMPERS: dict[str, Tamper] = {
    "flip-a-bit": _flip_middle,
    "drop": _drop,
    "replay": _replay,
    "reorder": _reorder,
    "inject-a-record": _inject,
}


class Relay:
    """A TCP relay on the path from A to B: honest for the handshake and for every later
    connection; on the first connection it tampers once with the first large frame (a
    chunk) from A, or with ``backward`` the first frame from B after its handshake (an
    Accept or Ack) by putting a forged Ack before it."""

    def __init__(self, target_port: int, tamper: Tamper | None, *, backward: bool) -> None:
        self.target_port = target_port
        self.tamper = tamper
        self.backward = backward
        self.tampered = False
        self.held: bytes | None = None
        self.connections = 0
        self.port = 0

    async def serve(self, task_group: anyio.abc.TaskGroup) -> None:
        listener = await anyio.create_tcp_listener(local_host=HOST_RELAY, local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_group.start_soon(listener.serve, self._relay)

    async def _relay(self, dialler: anyio.abc.SocketStream) -> None:
        self.connections += 1
        first = self.connections == 1
        target = await anyio.connect_tcp(HOST_B, self.target_port)
        async with dialler, target, anyio.create_task_group() as pumps:
            pumps.start_soon(self._pump, dialler, target, first and not self.backward, pumps)
            pumps.start_soon(self._pump, target, dialler, first and self.backward, pumps)

    async def _pump(
        self,
        source: anyio.abc.SocketStream,
        sink: anyio.abc.SocketStream,
        tampering: bool,
        pumps: anyio.abc.TaskGroup,
    ) -> None:
        buffer = b""
        index = 0
        try:
            while True:
                buffer += await source.receive()
                frames = split_frames(buffer)
                buffer = buffer[sum(map(len, frames)) :]
                out: list[bytes] = []
                for frame in frames:
                    out += self._maybe_tamper(frame, index, tampering)
                    index += 1
                if out:
                    await sink.send(b"".join(out))
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pumps.cancel_scope.cancel()

    def _maybe_tamper(self, frame: bytes, index: int, tampering: bool) -> list[bytes]:
        if self.held is not None:
            held, self.held = self.held, None
            return [frame, held]
        if not tampering or self.tampered:
            return [frame]
        if self.backward:
            # B's frames: Welcome, Info, then session traffic; forge an Ack in front of it.
            if index < 2:
                return [frame]
            self.tampered = True
            forged = encode_frame(Ack(1, 0, 16, 0, (), 1).to_wire())
            return [forged, frame]
        if len(frame) < CHUNK_SIZE or self.tamper is None:
            return [frame]
        self.tampered = True
        return self.tamper(frame, self)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("name", "backward"),
    [(name, False) for name in TAMPERS] + [("forged-ack", True)],
)
async def test_a_relay_that_tampers_after_the_handshake_drops_the_link_and_the_drain_stays_true(
    name: str, backward: bool, caplog: pytest.LogCaptureFixture
) -> None:
    if not loopback_aliases_usable([HOST_A, HOST_B, HOST_C, HOST_RELAY]):
        pytest.skip("needs the loopback aliases 127.0.0.2-5")
    data = {f"k{i}": {"n": i, "pad": "x" * 40} for i in range(ENTRIES)}
    held_b: dict[str, object] = {}
    held_c: dict[str, object] = {}
    b = handoff_node("b", HOST_B, release="v2")
    c = handoff_node("c", HOST_C, release="v2")
    b.track("n", held_b)
    c.track("n", held_c)
    async with anyio.create_task_group() as tg, b, c:
        relay = Relay(b.port, TAMPERS.get(name), backward=backward)
        await relay.serve(tg)
        a = Node(
            CLUSTER,
            name="a",
            release="v1",
            bind=f"{HOST_A}:0",
            discovery=f"static:{HOST_RELAY}:{relay.port},{c.address}",
            **{**FAST, "drain_timeout": 8.0},
        )
        a.track("n", dict(data))
        async with a:
            await wait_until(lambda: len(a.peers()) == 2)
            report = await a.drain()
        tg.cancel_scope.cancel()
    assert relay.tampered, "the relay never saw what it waited for"
    # The link the relay tampered with was dropped, and said so.
    assert "failed authentication" in caplog.text
    ns = report.namespaces["n"]
    assert report.ok, report.summary()
    assert ns.acknowledged == ENTRIES
    # Every record is at an honest successor; nothing forged was applied anywhere.
    assert PLANTED not in held_b
    assert PLANTED not in held_c
    assert {**held_b, **held_c} == data
    assert held_c, "the drain re-routed to C"
