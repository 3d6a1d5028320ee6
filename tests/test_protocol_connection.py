"""The connection state machine: handshake, authentication, transitions, heartbeats, close.

No sockets and no sleeps: a FakeLink shuttles ``data_to_send()`` between a client and a server
``Connection`` (optionally cutting the bytes into arbitrary chunks), and time is passed in.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handoff._errors import (
    AuthenticationError,
    ClusterMismatch,
    FrameTooLarge,
    HandoffError,
    HandshakeRejected,
    HandshakeTimeout,
    HeartbeatTimeout,
    LocalProtocolError,
    NameConflict,
    ProtocolError,
    SelfConnection,
    VersionMismatch,
)
from handoff.protocol import (
    MAX_REFERRALS,
    MESSAGE_TYPES,
    SESSION_MESSAGES,
    Accept,
    Ack,
    ActorHere,
    ActorMove,
    ActorMoved,
    ActorReply,
    ActorSend,
    ActorWhere,
    Auth,
    Cancel,
    Chunk,
    Closed,
    Connection,
    ConnState,
    Done,
    End,
    Event,
    FrameDecoder,
    Goodbye,
    HandshakeComplete,
    Heartbeat,
    Hello,
    Info,
    Limits,
    LocalNode,
    Message,
    MessageReceived,
    NamespaceVersion,
    NodeState,
    Offer,
    PeerGoodbye,
    PeerInfo,
    Peers,
    PeerStateChanged,
    Refuse,
    Reject,
    Role,
    StateChange,
    Tally,
    Welcome,
    allowed_incoming,
    decode_message,
    encode_frame,
)
from handoff.protocol._channel import TAG_SIZE, FrameCipher
from handoff.protocol._framing import encode_payload
from handoff.protocol._messages import MAX_COUNT, MAX_CREDIT, MAX_STREAM

COOKIE = b"cookie-7f3a9c-correct-horse-battery-staple"
OTHER_COOKIE = b"cookie-0000-some-other-cluster-secret"

CLIENT_WALL = 1_700_000_000.0
SERVER_WALL = 1_700_000_012.5

CLIENT_NODE = LocalNode(
    cluster="shop",
    name="node-a",
    incarnation="inc-a-1",
    release="release-OLD-2024.1",
    started_at=1_699_999_000.0,
    address="10.0.0.1:4370",
    namespaces=(NamespaceVersion("users", 2), NamespaceVersion("usage", 1)),
)
SERVER_NODE = LocalNode(
    cluster="shop",
    name="node-b",
    incarnation="inc-b-7",
    release="release-SECRET-2024.2",
    started_at=1_699_999_500.0,
    address="[fdaa::2]:4370",
    namespaces=(NamespaceVersion("rooms-secret-ns", 1), NamespaceVersion("users", 3)),
)

LIMITS = Limits(
    handshake_frame_size=4096,
    frame_size=1 << 20,
    depth=32,
    handshake_timeout=5.0,
    heartbeat_interval=1.0,
    heartbeat_timeout=3.0,
)

_seeds = itertools.count(1)


def nonce_factory(seed: int | None = None) -> Callable[[int], bytes]:
    """Deterministic, never-repeating nonces (a new seed for each connection unless given)."""
    base = next(_seeds) if seed is None else seed
    counter = itertools.count()

    def make(size: int) -> bytes:
        return hashlib.sha256(f"{base}/{next(counter)}".encode()).digest()[:size]

    return make


def make_client(
    local: LocalNode = CLIENT_NODE,
    cookie: bytes = COOKIE,
    *,
    now: float = 0.0,
    versions: tuple[int, ...] = (1,),
    seed: int | None = None,
    limits: Limits = LIMITS,
) -> Connection:
    return Connection(
        Role.CLIENT,
        local,
        cookie,
        now=now,
        limits=limits,
        versions=versions,
        wall_clock=lambda: CLIENT_WALL,
        nonce_factory=nonce_factory(seed),
        cipher_factory=ObservedCipher,
    )


def make_server(
    local: LocalNode = SERVER_NODE,
    cookie: bytes = COOKIE,
    *,
    now: float = 0.0,
    versions: tuple[int, ...] = (1,),
    seed: int | None = None,
    limits: Limits = LIMITS,
) -> Connection:
    return Connection(
        Role.SERVER,
        local,
        cookie,
        now=now,
        limits=limits,
        versions=versions,
        wall_clock=lambda: SERVER_WALL,
        nonce_factory=nonce_factory(seed),
        cipher_factory=ObservedCipher,
    )


def split_frames(data: bytes) -> list[bytes]:
    """Cut a byte stream into whole frames (header included)."""
    frames = []
    while data:
        (length,) = struct.unpack_from(">I", data)
        frames.append(data[: 4 + length])
        data = data[4 + length :]
    return frames


# Plaintext of every frame an ObservedCipher sealed, by the sealed bytes: the connections
# under test really encrypt (and their peers really decrypt); this only lets a test read
# what went over the wire.
SEALED: dict[bytes, bytes] = {}


class ObservedCipher(FrameCipher):
    __slots__ = ("key",)

    def __init__(self, key: bytes) -> None:
        super().__init__(key)
        self.key = key

    def seal(self, payload: bytes) -> bytes:
        sealed = super().seal(payload)
        SEALED[sealed] = payload
        return sealed


def messages(data: bytes) -> list[Message]:
    """The messages in a byte stream, sealed frames included (see ``SEALED``)."""
    decoder = FrameDecoder(1 << 24, 64)
    found = []
    for whole_frame in split_frames(data):
        decoder.feed(whole_frame)
        payload = decoder.next_payload()
        assert payload is not None
        found.append(decode_message(decoder.decode(SEALED.get(whole_frame, payload))))
    assert decoder.buffered == 0
    return found


def sealed_for(receiver: Connection, *sent: Message) -> bytes:
    """``sent`` as frames ``receiver`` accepts next: sealed with its peer's session key once
    it has one, as a peer whose own logic would never send them (a buggy or hostile peer)."""
    cipher = receiver._receive_cipher
    if cipher is None:
        return b"".join(frame(message) for message in sent)
    assert isinstance(cipher, ObservedCipher)
    twin = FrameCipher(cipher.key)
    twin._sequence = cipher._sequence
    return b"".join(twin.seal(encode_payload(message.to_wire())) for message in sent)


def frame(message: Message) -> bytes:
    return encode_frame(message.to_wire())


Chunker = Callable[[bytes], list[bytes]]


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


@dataclass
class FakeLink:
    """Carries bytes between two connections, in chunks of the chunkers' choosing."""

    client: Connection
    server: Connection
    now: float = 0.0
    to_server_chunks: Chunker = whole
    to_client_chunks: Chunker = whole
    client_events: list[Event] = field(default_factory=list)
    server_events: list[Event] = field(default_factory=list)
    client_errors: list[HandoffError] = field(default_factory=list)
    server_errors: list[HandoffError] = field(default_factory=list)
    sent_by_client: bytearray = field(default_factory=bytearray)
    sent_by_server: bytearray = field(default_factory=bytearray)

    def pump(self, *, catch: bool = False) -> None:
        """Deliver queued bytes both ways until both sides are quiet.

        With ``catch`` errors are recorded per side and delivery goes on (so that a Reject
        reaches the other side); otherwise the first error propagates.
        """
        while True:
            from_client = self.client.data_to_send()
            from_server = self.server.data_to_send()
            if not from_client and not from_server:
                return
            self.sent_by_client += from_client
            self.sent_by_server += from_server
            self._deliver(from_client, self.to_server_chunks, self.server, catch, to_server=True)
            self._deliver(from_server, self.to_client_chunks, self.client, catch, to_server=False)

    def _deliver(
        self, data: bytes, chunker: Chunker, conn: Connection, catch: bool, *, to_server: bool
    ) -> None:
        if not data:
            return
        events = self.server_events if to_server else self.client_events
        errors = self.server_errors if to_server else self.client_errors
        chunks = chunker(data)
        assert b"".join(chunks) == data
        for chunk in chunks:
            try:
                events.extend(conn.receive_data(chunk, now=self.now))
            except HandoffError as exc:
                if not catch:
                    raise
                errors.append(exc)

    def tick(self, now: float) -> None:
        self.now = now
        self.client.tick(now=now)
        self.server.tick(now=now)
        self.pump()


def established(
    client: Connection | None = None, server: Connection | None = None, **kwargs: Any
) -> FakeLink:
    link = FakeLink(client or make_client(), server or make_server(), **kwargs)
    link.pump()
    assert link.client.state is ConnState.ESTABLISHED
    assert link.server.state is ConnState.ESTABLISHED
    return link


def state_of(conn: Connection) -> ConnState:
    """The state, read through a call so that type checkers do not narrow it across steps."""
    return conn.state


def peer_state(conn: Connection) -> NodeState:
    assert conn.peer is not None
    return conn.peer.state


def only_complete(events: list[Event]) -> PeerInfo:
    assert len(events) == 1
    event = events[0]
    assert isinstance(event, HandshakeComplete)
    return event.peer


# -- a successful handshake ----------------------------------------------------------------


def test_handshake_completes_on_both_sides() -> None:
    link = established()
    client_view = only_complete(link.client_events)
    server_view = only_complete(link.server_events)

    assert client_view == PeerInfo(
        name="node-b",
        incarnation="inc-b-7",
        cluster="shop",
        release="release-SECRET-2024.2",
        started_at=1_699_999_500.0,
        state=NodeState.SERVING,
        address="[fdaa::2]:4370",
        namespaces=(NamespaceVersion("rooms-secret-ns", 1), NamespaceVersion("users", 3)),
        protocol_version=1,
        clock_offset=12.5,
    )
    assert server_view == PeerInfo(
        name="node-a",
        incarnation="inc-a-1",
        cluster="shop",
        release="release-OLD-2024.1",
        started_at=1_699_999_000.0,
        state=NodeState.SERVING,
        address="10.0.0.1:4370",
        namespaces=(NamespaceVersion("users", 2), NamespaceVersion("usage", 1)),
        protocol_version=1,
        clock_offset=-12.5,
    )
    assert link.client.peer == client_view
    assert link.server.peer == server_view
    assert link.client.peer_name == "node-b"
    assert link.server.peer_name == "node-a"
    assert not link.client_errors
    assert not link.server_errors


def test_handshake_message_sequence() -> None:
    link = established()
    assert [type(m) for m in messages(bytes(link.sent_by_client))] == [Hello, Auth, Info]
    assert [type(m) for m in messages(bytes(link.sent_by_server))] == [Welcome, Info]


def test_client_sends_hello_at_once_server_waits() -> None:
    client, server = make_client(), make_server()
    assert client.state is ConnState.AWAIT_WELCOME
    assert server.state is ConnState.AWAIT_HELLO
    hello = messages(client.data_to_send())
    assert len(hello) == 1
    assert isinstance(hello[0], Hello)
    assert hello[0].name == "node-a"
    assert server.data_to_send() == b""


@pytest.mark.parametrize(
    ("client_versions", "server_versions", "chosen"),
    [((1,), (1,), 1), ((1, 2, 3), (1, 2), 2), ((2, 1), (1, 2, 5), 2), ((3, 7), (7, 9), 7)],
)
def test_highest_common_version_is_chosen(
    client_versions: tuple[int, ...], server_versions: tuple[int, ...], chosen: int
) -> None:
    link = established(make_client(versions=client_versions), make_server(versions=server_versions))
    assert link.client.peer is not None
    assert link.server.peer is not None
    assert link.client.peer.protocol_version == chosen
    assert link.server.peer.protocol_version == chosen


def test_empty_cookie_is_refused_locally() -> None:
    with pytest.raises(LocalProtocolError):
        make_client(cookie=b"")
    with pytest.raises(LocalProtocolError):
        make_server(cookie=b"")


# -- handshake failures --------------------------------------------------------------------


def failed_link(client: Connection, server: Connection) -> FakeLink:
    link = FakeLink(client, server)
    link.pump(catch=True)
    assert link.client.closed
    assert link.server.closed
    assert not link.client_events
    assert not link.server_events
    return link


def only_error(errors: list[HandoffError]) -> HandoffError:
    assert len(errors) == 1, errors
    return errors[0]


@pytest.mark.parametrize("wrong_side", ["client", "server"])
def test_wrong_cookie_fails_on_both_sides(wrong_side: str) -> None:
    client = make_client(cookie=OTHER_COOKIE if wrong_side == "client" else COOKIE)
    server = make_server(cookie=OTHER_COOKIE if wrong_side == "server" else COOKIE)
    link = failed_link(client, server)
    # The client checks the server's proof first, so it is the detecting side either way.
    assert isinstance(only_error(link.client_errors), AuthenticationError)
    assert isinstance(only_error(link.server_errors), AuthenticationError)
    assert "HANDOFF_COOKIE" in str(link.client_errors[0])
    sent_to_server = messages(bytes(link.sent_by_client))
    assert [type(m) for m in sent_to_server] == [Hello, Reject]
    assert sent_to_server[-1] == Reject("auth", str(link.client_errors[0]))


def test_tampered_auth_detected_by_server_and_client_told() -> None:
    client, server = make_client(), make_server()
    server.receive_data(client.data_to_send(), now=0)
    client.receive_data(server.data_to_send(), now=0)
    auth_frame, info_frame = split_frames(client.data_to_send())
    tampered = auth_frame[:-1] + bytes([auth_frame[-1] ^ 0x01])
    with pytest.raises(AuthenticationError):
        server.receive_data(tampered + info_frame, now=0)
    answer = server.data_to_send()
    assert [type(m) for m in messages(answer)] == [Reject]
    assert server.closed
    with pytest.raises(AuthenticationError):
        client.receive_data(answer, now=0)
    assert client.closed
    assert client.data_to_send() == b""  # a Reject is never answered with a Reject


def test_wrong_cluster() -> None:
    other = LocalNode(
        cluster="warehouse", name="node-b", incarnation="i", release="r", started_at=0.0
    )
    link = failed_link(make_client(), make_server(other))
    server_error = only_error(link.server_errors)
    client_error = only_error(link.client_errors)
    assert isinstance(server_error, ClusterMismatch)
    assert isinstance(client_error, ClusterMismatch)
    for error in (server_error, client_error):
        assert "'shop'" in str(error)
        assert "'warehouse'" in str(error)
        assert "HANDOFF_CLUSTER" in str(error)


@pytest.mark.parametrize(
    ("client_versions", "server_versions"), [((1,), (2,)), ((2,), (1,)), ((1, 3), (2, 4))]
)
def test_no_common_version(
    client_versions: tuple[int, ...], server_versions: tuple[int, ...]
) -> None:
    link = failed_link(make_client(versions=client_versions), make_server(versions=server_versions))
    server_error = only_error(link.server_errors)
    client_error = only_error(link.client_errors)
    assert isinstance(server_error, VersionMismatch)
    assert isinstance(client_error, VersionMismatch)
    for error in (server_error, client_error):
        assert str(list(client_versions)) in str(error)
        assert str(list(server_versions)) in str(error)


def test_self_connection() -> None:
    link = failed_link(make_client(CLIENT_NODE), make_server(CLIENT_NODE))
    assert isinstance(only_error(link.server_errors), SelfConnection)
    assert isinstance(only_error(link.client_errors), SelfConnection)
    assert [type(m) for m in messages(bytes(link.sent_by_server))] == [Reject]


def test_same_name_other_incarnation_is_a_name_conflict() -> None:
    twin = LocalNode(
        cluster="shop",
        name=CLIENT_NODE.name,
        incarnation="inc-a-2",
        release="r",
        started_at=0.0,
    )
    link = failed_link(make_client(CLIENT_NODE), make_server(twin))
    assert isinstance(only_error(link.server_errors), NameConflict)
    assert isinstance(only_error(link.client_errors), NameConflict)
    assert "HANDOFF_NODE_NAME" in str(link.server_errors[0])


def test_name_conflict_is_only_judged_after_authentication() -> None:
    twin = LocalNode(
        cluster="shop", name=CLIENT_NODE.name, incarnation="other", release="r", started_at=0.0
    )
    link = failed_link(make_client(CLIENT_NODE, OTHER_COOKIE), make_server(twin))
    assert isinstance(only_error(link.server_errors), AuthenticationError)
    assert isinstance(only_error(link.client_errors), AuthenticationError)


def test_welcome_with_a_version_not_offered() -> None:
    client = make_client(versions=(1,))
    client.data_to_send()
    bogus = Welcome(7, "shop", "node-b", "i", b"n" * 32, b"k" * 32, b"p" * 32)
    with pytest.raises(ProtocolError, match="not offered"):
        client.receive_data(frame(bogus), now=0)
    [reject] = messages(client.data_to_send())
    assert isinstance(reject, Reject)
    assert reject.code == "protocol"


def test_welcome_from_another_cluster() -> None:
    client = make_client()
    client.data_to_send()
    bogus = Welcome(1, "warehouse", "node-b", "i", b"n" * 32, b"k" * 32, b"p" * 32)
    with pytest.raises(ClusterMismatch):
        client.receive_data(frame(bogus), now=0)
    [reject] = messages(client.data_to_send())
    assert isinstance(reject, Reject)
    assert reject.code == "cluster"


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("auth", AuthenticationError),
        ("cluster", ClusterMismatch),
        ("version", VersionMismatch),
        ("self", SelfConnection),
        ("name", NameConflict),
        ("busy", HandshakeRejected),
        ("timeout", HandshakeRejected),
        ("protocol", HandshakeRejected),
        ("from-the-future", HandshakeRejected),
    ],
)
def test_reject_during_handshake_maps_to_an_error(code: str, error: type[HandoffError]) -> None:
    client = make_client()
    client.data_to_send()
    with pytest.raises(error, match="because") as info:
        client.receive_data(frame(Reject(code, "because")), now=0)
    if isinstance(info.value, HandshakeRejected):
        assert info.value.code == code
        assert info.value.reason == "because"
    assert client.closed
    assert client.data_to_send() == b""


def test_reject_when_established_is_a_protocol_error() -> None:
    link = established()
    with pytest.raises(ProtocolError, match="overloaded"):
        link.client.receive_data(sealed_for(link.client, Reject("busy", "overloaded")), now=0)
    assert link.client.closed
    assert link.client.data_to_send() == b""


# -- authentication properties -------------------------------------------------------------


def test_replayed_client_session_is_refused() -> None:
    recorded = established(make_client(seed=100), make_server(seed=200))
    replay = bytes(recorded.sent_by_client)

    # The same bytes to a server with the same nonce would pass: the nonce is what stops it.
    same_nonce = make_server(seed=200)
    assert [type(e) for e in same_nonce.receive_data(replay, now=0)] == [HandshakeComplete]

    fresh = make_server(seed=201)
    with pytest.raises(AuthenticationError):
        fresh.receive_data(replay, now=0)
    assert fresh.closed
    answer = messages(fresh.data_to_send())
    assert [type(m) for m in answer] == [Welcome, Reject]
    assert isinstance(answer[1], Reject)
    assert answer[1].code == "auth"


def test_replayed_welcome_is_refused() -> None:
    recorded = established(make_client(seed=300), make_server(seed=400))
    welcome = split_frames(bytes(recorded.sent_by_server))[0]
    assert isinstance(messages(welcome)[0], Welcome)

    fresh = make_client(seed=301)
    fresh.data_to_send()
    with pytest.raises(AuthenticationError):
        fresh.receive_data(welcome, now=0)
    assert fresh.closed
    [reject] = messages(fresh.data_to_send())
    assert isinstance(reject, Reject)
    assert reject.code == "auth"


def test_tampered_version_offer_is_detected() -> None:
    # An on-path attacker strips version 2 from the client's offer to force version 1: the
    # offered list is bound into the transcript, so the server's proof no longer verifies.
    client = make_client(versions=(1, 2))
    server = make_server(versions=(1, 2))
    [hello] = messages(client.data_to_send())
    assert isinstance(hello, Hello)
    downgraded = Hello((1,), hello.cluster, hello.name, hello.incarnation, hello.nonce)
    server.receive_data(frame(downgraded), now=0)
    with pytest.raises(AuthenticationError):
        client.receive_data(server.data_to_send(), now=0)


def test_reflected_server_proof_is_not_a_client_proof() -> None:
    client, server = make_client(), make_server()
    server.receive_data(client.data_to_send(), now=0)
    welcome = messages(server.data_to_send())[0]
    assert isinstance(welcome, Welcome)
    with pytest.raises(AuthenticationError):
        server.receive_data(frame(Auth(welcome.key, welcome.proof)), now=0)


def _all_sessions() -> list[FakeLink]:
    twin = LocalNode(
        cluster="shop", name=CLIENT_NODE.name, incarnation="x", release="r", started_at=0.0
    )
    links = [
        failed_link(make_client(cookie=OTHER_COOKIE), make_server()),
        failed_link(make_client(), make_server(cookie=OTHER_COOKIE)),
        failed_link(make_client(), make_server(twin)),
        failed_link(make_client(CLIENT_NODE), make_server(CLIENT_NODE)),
    ]
    link = established()
    link.client.set_local_state(NodeState.DRAINING, now=0.5)
    link.tick(1.0)
    link.client.close("done")
    link.pump()
    links.append(link)
    return links


def test_cookie_never_crosses_the_wire() -> None:
    for link in _all_sessions():
        for data in (bytes(link.sent_by_client), bytes(link.sent_by_server)):
            assert data
            assert COOKIE not in data
            assert OTHER_COOKIE not in data
            assert COOKIE[:12] not in data


def test_server_sends_only_a_welcome_before_auth() -> None:
    client, server = make_client(), make_server()
    server.receive_data(client.data_to_send(), now=0)
    out = server.data_to_send()
    assert [type(m) for m in messages(out)] == [Welcome]
    assert len(split_frames(out)) == 1
    for secret in (b"release-SECRET", b"rooms-secret-ns", b"fdaa", b"serving"):
        assert secret not in out


def test_client_with_wrong_cookie_never_receives_server_info() -> None:
    link = failed_link(make_client(cookie=OTHER_COOKIE), make_server())
    received = bytes(link.sent_by_server)
    assert Info not in {type(m) for m in messages(received)}
    for secret in (b"release-SECRET", b"rooms-secret-ns", b"fdaa"):
        assert secret not in received


def test_forged_auth_with_info_gets_no_info_back() -> None:
    server = make_server()
    server.receive_data(make_client().data_to_send(), now=0)
    server.data_to_send()
    client_info = Info("r", 0.0, NodeState.SERVING, "", (), 0.0)
    with pytest.raises(AuthenticationError):
        server.receive_data(frame(Auth(b"\x09" * 32, b"\x00" * 32)) + frame(client_info), now=0)
    assert [type(m) for m in messages(server.data_to_send())] == [Reject]
    assert server.peer is None


def test_handshake_frames_are_limited_until_authenticated() -> None:
    # A client's Info larger than the handshake limit is fine once its Auth is verified...
    many = tuple(NamespaceVersion(f"namespace-{i:04d}-" + "x" * 40, i) for i in range(200))
    big_client = LocalNode(
        cluster="shop", name="big", incarnation="i", release="r", started_at=0.0, namespaces=many
    )
    link = established(make_client(big_client), make_server())
    assert link.server.peer is not None
    assert link.server.peer.namespaces == many
    assert len(split_frames(bytes(link.sent_by_client))[2]) > LIMITS.handshake_frame_size

    # ...but the same frame size before authentication is refused without being buffered.
    server = make_server()
    with pytest.raises(FrameTooLarge):
        server.receive_data(struct.pack(">I", LIMITS.handshake_frame_size + 1), now=0)
    [reject] = messages(server.data_to_send())
    assert isinstance(reject, Reject)
    assert reject.code == "protocol"


def test_frame_limit_after_authentication() -> None:
    link = established()
    with pytest.raises(FrameTooLarge):
        link.server.receive_data(struct.pack(">I", LIMITS.frame_size + TAG_SIZE + 1), now=0)
    assert link.server.closed


def test_deeply_nested_hello_is_a_protocol_error() -> None:
    server = make_server()
    payload = b"\x91" * 5000 + b"\x90"
    with pytest.raises(ProtocolError):
        server.receive_data(struct.pack(">I", len(payload)) + payload, now=0)
    [reject] = messages(server.data_to_send())
    assert isinstance(reject, Reject)
    assert reject.code == "protocol"


@given(st.binary(max_size=200))
@settings(max_examples=200)
def test_garbage_to_a_server_fails_cleanly(data: bytes) -> None:
    server = make_server()
    try:
        events = server.receive_data(data, now=0)
    except HandoffError:
        assert server.closed
        assert [type(m) for m in messages(server.data_to_send())] in ([], [Reject])
    else:
        assert events == []


# -- arbitrary splits ----------------------------------------------------------------------


def chunker_from(data: st.DataObject) -> Chunker:
    def chunk(stream: bytes) -> list[bytes]:
        cuts = data.draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=8))
        bounds = [0, *sorted(c for c in cuts if c < len(stream)), len(stream)]
        return [stream[a:b] for a, b in itertools.pairwise(bounds)]

    return chunk


Action = str
ACTIONS = st.lists(
    st.sampled_from(
        ["tick", "client-drain", "server-drain", "client-serve", "server-serve", "both-drain"]
    ),
    max_size=6,
)


def run_session(
    actions: list[Action], closer: str, to_server: Chunker, to_client: Chunker
) -> tuple[list[Event], list[Event]]:
    link = FakeLink(
        make_client(seed=1),
        make_server(seed=2),
        to_server_chunks=to_server,
        to_client_chunks=to_client,
    )
    link.pump()
    now = 0.0
    for action in actions:
        now += 0.75
        link.tick(now)  # both sides send heartbeats as due, so neither times out
        if action == "tick":
            now += 0.75
            link.tick(now)
        else:
            side, _, what = action.partition("-")
            state = NodeState.DRAINING if what == "drain" else NodeState.SERVING
            if side in ("client", "both"):
                link.client.set_local_state(state, now=now)
            if side in ("server", "both"):
                link.server.set_local_state(state, now=now)
            link.pump()
    (link.client if closer == "client" else link.server).close("deploy finished")
    link.pump()
    assert link.client.closed
    assert link.server.closed
    assert not link.client_errors
    assert not link.server_errors
    return link.client_events, link.server_events


@given(ACTIONS, st.sampled_from(["client", "server"]), st.data())
@settings(max_examples=150, deadline=None)
def test_any_split_gives_the_same_events(
    actions: list[Action], closer: str, data: st.DataObject
) -> None:
    expected = run_session(actions, closer, whole, whole)
    got = run_session(actions, closer, chunker_from(data), chunker_from(data))
    assert got == expected
    client_events, server_events = got
    assert isinstance(client_events[0], HandshakeComplete)
    assert isinstance(server_events[0], HandshakeComplete)
    receiver_events = server_events if closer == "client" else client_events
    assert receiver_events[-1] == PeerGoodbye("deploy finished")


def test_byte_at_a_time_both_ways() -> None:
    actions = ["client-drain", "tick", "server-drain", "tick", "client-serve"]
    expected = run_session(actions, "client", whole, whole)
    assert run_session(actions, "client", bytewise, bytewise) == expected
    client_events, server_events = expected
    assert client_events[1:] == [PeerStateChanged(NodeState.DRAINING)]
    assert server_events[1:] == [
        PeerStateChanged(NodeState.DRAINING),
        PeerStateChanged(NodeState.SERVING),
        PeerGoodbye("deploy finished"),
    ]


def test_every_split_point_of_the_client_stream() -> None:
    reference = established(make_client(seed=5), make_server(seed=6))
    stream = bytes(reference.sent_by_client)
    welcome = split_frames(bytes(reference.sent_by_server))[0]
    for cut in range(len(stream) + 1):
        client, server = make_client(seed=5), make_server(seed=6)
        client.data_to_send()
        events = server.receive_data(stream[:cut], now=0)
        events += server.receive_data(stream[cut:], now=0)
        assert events == reference.server_events, cut
        assert server.state is ConnState.ESTABLISHED
        assert split_frames(server.data_to_send())[0] == welcome


# -- the transition table ------------------------------------------------------------------

EXPECTED_ALLOWED: dict[ConnState, set[type[Message]]] = {
    ConnState.AWAIT_HELLO: {Hello, Reject},
    ConnState.AWAIT_WELCOME: {Welcome, Reject},
    ConnState.AWAIT_AUTH: {Auth, Reject},
    ConnState.AWAIT_INFO: {Info, Reject},
    ConnState.ESTABLISHED: {Heartbeat, StateChange, Goodbye, Reject, *SESSION_MESSAGES},
    ConnState.CLOSED: set(),
}


def test_allowed_incoming_table() -> None:
    assert set(EXPECTED_ALLOWED) == set(ConnState)
    for state, allowed in EXPECTED_ALLOWED.items():
        assert allowed_incoming(state) == allowed, state


NONCE = bytes(range(32))
SAMPLE_MESSAGES: dict[type[Message], Message] = {
    Hello: Hello((1,), "shop", "node-z", "inc-z", NONCE),
    Welcome: Welcome(1, "shop", "node-z", "inc-z", NONCE, NONCE, NONCE),
    Auth: Auth(NONCE, NONCE),
    Info: Info("r", 0.0, NodeState.SERVING, "", (), 0.0),
    Reject: Reject("busy", "no"),
    Heartbeat: Heartbeat(),
    StateChange: StateChange(NodeState.DRAINING),
    Goodbye: Goodbye("bye"),
    Offer: Offer(1, "users", "cachetools", 1, 10),
    Accept: Accept(1, 4),
    Refuse: Refuse(1, "no"),
    Chunk: Chunk(1, 0, 1, 0.0, b"\x90"),
    Ack: Ack(1, 0, 1, 0, (), 1),
    End: End(1, 1),
    Cancel: Cancel(1, "deadline"),
    Closed: Closed(1),
    Done: Done(1),
    Tally: Tally("usage", "inc-z", 1, 1, 0, b"\x90"),
    ActorSend: ActorSend("rooms", b"\xa1k", "inc-z", "node-z", 1, 1, 1, 1, 0, b"\xc0"),
    ActorReply: ActorReply("rooms", b"\xa1k", 1, 1, 0, "", b"\xc0"),
    ActorWhere: ActorWhere("rooms", b"\xa1k", 1),
    ActorHere: ActorHere("rooms", b"\xa1k", 1, 0, ""),
    ActorMove: ActorMove("rooms", b"\xa1k", 1, 2, 1, b"\x93\xc0\x90\x90"),
    ActorMoved: ActorMoved("rooms", b"\xa1k", 1, 1, ""),
    Peers: Peers((("b", "10.0.0.2:4370"),)),
}


def drive(role: Role, state: ConnState) -> Connection:
    """A connection of ``role`` brought into ``state`` by a real peer, its output drained."""
    client, server = make_client(), make_server()
    conn = client if role is Role.CLIENT else server
    hello = client.data_to_send()
    if state is not ConnState.AWAIT_HELLO and state is not ConnState.AWAIT_WELCOME:
        server.receive_data(hello, now=0)
        welcome = server.data_to_send()
        if role is Role.CLIENT:
            client.receive_data(welcome, now=0)
            if state is ConnState.ESTABLISHED:
                server.receive_data(client.data_to_send(), now=0)
                client.receive_data(server.data_to_send(), now=0)
        elif state is not ConnState.AWAIT_AUTH:
            client.receive_data(welcome, now=0)
            auth, info = split_frames(client.data_to_send())
            server.receive_data(auth, now=0)
            if state is ConnState.ESTABLISHED:
                server.receive_data(info, now=0)
    conn.data_to_send()
    assert conn.state is state
    assert conn.role is role
    return conn


REACHABLE: list[tuple[Role, ConnState]] = [
    (Role.SERVER, ConnState.AWAIT_HELLO),
    (Role.CLIENT, ConnState.AWAIT_WELCOME),
    (Role.SERVER, ConnState.AWAIT_AUTH),
    (Role.CLIENT, ConnState.AWAIT_INFO),
    (Role.SERVER, ConnState.AWAIT_INFO),
    (Role.CLIENT, ConnState.ESTABLISHED),
    (Role.SERVER, ConnState.ESTABLISHED),
]

DISALLOWED = [
    pytest.param(role, state, cls, id=f"{role.value}-{state.value}-{cls.__name__}")
    for role, state in REACHABLE
    for cls in MESSAGE_TYPES.values()
    if cls not in allowed_incoming(state)
]


def test_sample_messages_cover_every_type() -> None:
    assert set(SAMPLE_MESSAGES) == set(MESSAGE_TYPES.values())
    for cls, message in SAMPLE_MESSAGES.items():
        assert type(message) is cls


def test_session_messages_are_disallowed_in_every_state_before_established() -> None:
    # Independent of allowed_incoming: the cross product must hold every session message for
    # every open state other than ESTABLISHED, on both roles.
    covered = {tuple(param.values) for param in DISALLOWED}
    for role, state in REACHABLE:
        for cls in SESSION_MESSAGES:
            assert ((role, state, cls) in covered) is (state is not ConnState.ESTABLISHED)


def test_every_open_state_is_reached() -> None:
    assert {state for _, state in REACHABLE} == set(ConnState) - {ConnState.CLOSED}
    assert len(DISALLOWED) == sum(
        len(MESSAGE_TYPES) - len(allowed_incoming(state)) for _, state in REACHABLE
    )


@pytest.mark.parametrize(("role", "state", "cls"), DISALLOWED)
def test_disallowed_message_is_a_protocol_error(
    role: Role, state: ConnState, cls: type[Message]
) -> None:
    conn = drive(role, state)
    with pytest.raises(ProtocolError, match="not allowed") as info:
        conn.receive_data(sealed_for(conn, SAMPLE_MESSAGES[cls]), now=0)
    assert type(info.value) is ProtocolError
    assert conn.closed
    assert conn.state is ConnState.CLOSED
    [reject] = messages(conn.data_to_send())
    assert isinstance(reject, Reject)
    assert reject.code == "protocol"
    assert cls.__name__ in reject.reason
    assert conn.receive_data(frame(Heartbeat()), now=0) == []
    assert conn.data_to_send() == b""


@pytest.mark.parametrize(("role", "state"), REACHABLE, ids=lambda v: getattr(v, "value", v))
def test_closed_connection_ignores_everything(role: Role, state: ConnState) -> None:
    conn = drive(role, state)
    conn.close("going away")
    conn.data_to_send()
    assert conn.state is ConnState.CLOSED
    for message in SAMPLE_MESSAGES.values():
        assert conn.receive_data(frame(message), now=0) == []
    assert conn.receive_data(b"\xff\xff\xff\xff garbage", now=0) == []
    assert conn.data_to_send() == b""
    conn.tick(now=1000.0)
    assert conn.next_deadline() == math.inf
    assert conn.data_to_send() == b""


# -- local misuse --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "state"), [p for p in REACHABLE if p[1] is not ConnState.ESTABLISHED]
)
def test_send_before_established_is_local_misuse(role: Role, state: ConnState) -> None:
    conn = drive(role, state)
    with pytest.raises(LocalProtocolError):
        conn.send(Heartbeat(), now=0)
    for cls in SESSION_MESSAGES:
        with pytest.raises(LocalProtocolError, match=cls.__name__):
            conn.send(SAMPLE_MESSAGES[cls], now=1.0)
    assert conn.state is state
    assert conn.data_to_send() == b""
    assert conn.next_deadline() == LIMITS.handshake_timeout


def test_send_of_a_control_message_is_local_misuse() -> None:
    link = established()
    for message in SAMPLE_MESSAGES.values():
        if type(message) in SESSION_MESSAGES:
            continue
        with pytest.raises(LocalProtocolError):
            link.client.send(message, now=0)
    assert link.client.data_to_send() == b""
    assert link.client.state is ConnState.ESTABLISHED


def test_send_after_close_is_local_misuse() -> None:
    link = established()
    link.client.close("bye")
    link.client.data_to_send()
    with pytest.raises(LocalProtocolError):
        link.client.send(Heartbeat(), now=0)
    for cls in SESSION_MESSAGES:
        with pytest.raises(LocalProtocolError):
            link.client.send(SAMPLE_MESSAGES[cls], now=0)
    assert link.client.data_to_send() == b""


# -- session messages ----------------------------------------------------------------------

SESSION_SAMPLES: list[Message] = [
    *(message for cls, message in SAMPLE_MESSAGES.items() if cls in SESSION_MESSAGES),
    Offer(MAX_STREAM, "n" * 255, "k" * 64, 2**31 - 1, MAX_COUNT),
    Accept(MAX_STREAM, MAX_CREDIT),
    Refuse(2, "r" * 1024),
    Chunk(2, MAX_COUNT, MAX_COUNT, 12.5, bytes(range(256)) * 64),  # over the handshake limit
    Ack(2, 5, 3, 1, (("expired", 1), ("too-large", 1)), 0),
    Ack(2, 6, 0, 0, (("r" * 255, MAX_COUNT),) * 64, MAX_CREDIT),
    End(2, 0),
    Closed(2),
    Cancel(2, "shutdown"),
    Tally("u" * 255, "i" * 255, MAX_COUNT, MAX_COUNT, 4096, bytes(range(256)) * 64),
    ActorSend("r" * 255, b"k" * 300, "i" * 255, "n" * 255, MAX_COUNT, MAX_COUNT, 1, 0, 64, b"b"),
    ActorReply("r", b"k", 1, MAX_COUNT, 6, "n" * 255, bytes(range(256)) * 64),
    ActorWhere("r", b"k", MAX_COUNT),
    ActorHere("r", b"k", MAX_COUNT, 2, "n" * 255),
    ActorMove("r", b"k", MAX_COUNT, MAX_COUNT, 2**31 - 1, bytes(range(256)) * 64),
    ActorMoved("r", b"k", 1, 0, "r" * 1024),
    Peers((("n" * 255, "h" * 300),) * MAX_REFERRALS),
]

short_texts = st.text(min_size=1, max_size=40)
stream_ids = st.integers(1, MAX_STREAM)
record_counts = st.integers(0, MAX_COUNT)
session_messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        Offer, stream_ids, short_texts, short_texts, st.integers(0, 2**31 - 1), record_counts
    ),
    st.builds(Accept, stream_ids, st.integers(1, MAX_CREDIT)),
    st.builds(Refuse, stream_ids, short_texts),
    st.builds(
        Chunk,
        stream_ids,
        record_counts,
        st.integers(1, MAX_COUNT),
        st.floats(0, 1e6),
        st.binary(min_size=1, max_size=300),
    ),
    st.builds(
        Ack,
        stream_ids,
        record_counts,
        record_counts,
        record_counts,
        st.lists(st.tuples(short_texts, record_counts), max_size=4).map(tuple),
        st.integers(0, MAX_CREDIT),
    ),
    st.builds(End, stream_ids, record_counts),
    st.builds(Cancel, stream_ids, short_texts),
    st.builds(
        Tally,
        short_texts,
        short_texts,
        st.integers(1, MAX_COUNT),
        record_counts,
        st.integers(0, 4096),
        st.binary(min_size=1, max_size=300),
    ),
)


def test_session_samples_cover_every_session_message() -> None:
    assert {type(message) for message in SESSION_SAMPLES} == SESSION_MESSAGES
    assert any(len(frame(m)) > LIMITS.handshake_frame_size for m in SESSION_SAMPLES)


@pytest.mark.parametrize("sender", ["client", "server"])
@pytest.mark.parametrize("message", SESSION_SAMPLES, ids=lambda m: type(m).__name__)
def test_session_message_is_delivered_as_sent(sender: str, message: Message) -> None:
    link = established()
    this, other = (link.client, link.server) if sender == "client" else (link.server, link.client)
    this.send(message, now=0.5)
    sent = this.data_to_send()
    assert messages(sent) == [message]
    events = other.receive_data(sent, now=0.5)
    assert events == [MessageReceived(message)]
    [event] = events
    assert isinstance(event, MessageReceived)
    assert type(event.message) is type(message)
    assert state_of(this) is ConnState.ESTABLISHED
    assert state_of(other) is ConnState.ESTABLISHED
    assert other.data_to_send() == b""


SessionStep = tuple[str, Message | NodeState]
SESSION_STEPS = st.lists(
    st.tuples(st.sampled_from(["client", "server"]), session_messages | st.sampled_from(NodeState)),
    min_size=1,
    max_size=12,
)


@given(SESSION_STEPS, st.data())
@settings(max_examples=150, deadline=None)
def test_session_messages_arrive_in_order_under_any_split(
    steps: list[SessionStep], data: st.DataObject
) -> None:
    link = established(
        make_client(seed=11),
        make_server(seed=12),
        to_server_chunks=chunker_from(data),
        to_client_chunks=chunker_from(data),
    )
    expected: dict[str, list[Event]] = {"client": [], "server": []}
    states = {"client": NodeState.SERVING, "server": NodeState.SERVING}
    for sender, what in steps:
        conn = link.client if sender == "client" else link.server
        receiver = "server" if sender == "client" else "client"
        if isinstance(what, NodeState):
            conn.set_local_state(what, now=0)
            if what is not states[sender]:
                states[sender] = what
                expected[receiver].append(PeerStateChanged(what))
        else:
            conn.send(what, now=0)
            expected[receiver].append(MessageReceived(what))
        if data.draw(st.booleans(), label="deliver now"):
            link.pump()
    link.pump()
    assert link.client_events[1:] == expected["client"]
    assert link.server_events[1:] == expected["server"]
    assert not link.client_errors
    assert not link.server_errors
    assert link.client.state is ConnState.ESTABLISHED
    assert link.server.state is ConnState.ESTABLISHED


def test_session_messages_byte_at_a_time_both_ways() -> None:
    link = established(to_server_chunks=bytewise, to_client_chunks=bytewise)
    sent = [m for m in SESSION_SAMPLES if len(frame(m)) < 2048]
    for message in sent:
        link.client.send(message, now=0)
        link.server.send(message, now=0)
    link.pump()
    expected = [MessageReceived(message) for message in sent]
    assert link.client_events[1:] == expected
    assert link.server_events[1:] == expected


def test_session_message_right_behind_the_servers_info() -> None:
    # The server is established once the client's Auth and Info arrive and may send at once:
    # its first session message follows its Info on the stream, at every split point.
    client, server = make_client(seed=21), make_server(seed=22)
    server.receive_data(client.data_to_send(), now=0)
    welcome = server.data_to_send()
    client.receive_data(welcome, now=0)
    server.receive_data(client.data_to_send(), now=0)
    assert state_of(server) is ConnState.ESTABLISHED
    offer = Offer(1, "users", "dict", 1, 3)
    server.send(offer, now=0)
    stream = server.data_to_send()
    assert [type(m) for m in messages(stream)] == [Info, Offer]
    for cut in range(len(stream) + 1):
        fresh = make_client(seed=21)
        fresh.data_to_send()
        assert fresh.receive_data(welcome, now=0) == []
        fresh.data_to_send()
        events = fresh.receive_data(stream[:cut], now=0)
        events += fresh.receive_data(stream[cut:], now=0)
        assert [type(e) for e in events] == [HandshakeComplete, MessageReceived], cut
        assert events[1] == MessageReceived(offer)
        assert state_of(fresh) is ConnState.ESTABLISHED


def test_session_messages_count_for_heartbeats() -> None:
    link = established()
    link.client.send(End(1, 0), now=0.8)
    assert link.client.next_deadline() == pytest.approx(1.8)  # sending counts as a beat
    assert link.server.receive_data(link.client.data_to_send(), now=2.5) == [
        MessageReceived(End(1, 0))
    ]
    link.server.tick(now=5.4)  # heard from the client at 2.5: not yet overdue
    assert not link.server.closed
    with pytest.raises(HeartbeatTimeout):
        link.server.tick(now=5.5)


SMALL_FRAMES = replace(LIMITS, frame_size=512)


def chunk_filling(body_size: int) -> Chunk:
    """A Chunk whose frame body (without the 4-byte header) is exactly ``body_size`` bytes."""
    for payload_size in range(1, body_size):
        chunk = Chunk(1, 0, 1, 0.0, b"x" * payload_size)
        if len(frame(chunk)) - 4 == body_size:
            return chunk
    raise AssertionError(f"no Chunk frame of exactly {body_size} bytes")


@pytest.mark.parametrize("receiver", ["client", "server"])
def test_chunk_at_the_frame_limit_is_delivered(receiver: str) -> None:
    link = established(make_client(limits=SMALL_FRAMES), make_server(limits=SMALL_FRAMES))
    this, other = (link.server, link.client) if receiver == "client" else (link.client, link.server)
    chunk = chunk_filling(SMALL_FRAMES.frame_size)
    this.send(chunk, now=0)
    assert other.receive_data(this.data_to_send(), now=0) == [MessageReceived(chunk)]
    assert state_of(other) is ConnState.ESTABLISHED


@pytest.mark.parametrize("receiver", ["client", "server"])
@pytest.mark.parametrize("header_split", [0, 1, 3])
def test_chunk_over_the_frame_limit_is_refused(receiver: str, header_split: int) -> None:
    link = established(make_client(limits=SMALL_FRAMES), make_server(limits=SMALL_FRAMES))
    this, other = (link.server, link.client) if receiver == "client" else (link.client, link.server)
    chunk = chunk_filling(SMALL_FRAMES.frame_size + 1)
    this.send(chunk, now=0)  # the sender does not know the peer's limit
    data = this.data_to_send()
    assert messages(data) == [chunk]
    for byte in data[:header_split]:
        assert other.receive_data(bytes([byte]), now=0) == []
    # Refused as soon as the header is complete, without waiting for the payload.
    rest = data[header_split:4] if header_split else data
    with pytest.raises(FrameTooLarge, match=str(SMALL_FRAMES.frame_size + TAG_SIZE)):
        other.receive_data(rest, now=0)
    assert other.closed
    answer = other.data_to_send()
    [reject] = messages(answer)
    assert isinstance(reject, Reject)
    assert reject.code == "protocol"
    with pytest.raises(ProtocolError):
        this.receive_data(answer, now=0)
    assert this.closed


@given(
    st.integers(SMALL_FRAMES.frame_size - 64, SMALL_FRAMES.frame_size + 16),
    st.integers(0, 255),
)
@settings(max_examples=50, deadline=None)
def test_chunk_payload_size_against_the_frame_limit(size: int, fill: int) -> None:
    link = established(make_client(limits=SMALL_FRAMES), make_server(limits=SMALL_FRAMES))
    chunk = Chunk(3, 1, 1, 0.5, bytes([fill]) * size)
    link.client.send(chunk, now=0)
    data = link.client.data_to_send()
    if len(data) - 4 - TAG_SIZE <= SMALL_FRAMES.frame_size:
        assert link.server.receive_data(data, now=0) == [MessageReceived(chunk)]
    else:
        with pytest.raises(FrameTooLarge):
            link.server.receive_data(data, now=0)
        assert link.server.closed


# -- heartbeats and timeouts ---------------------------------------------------------------


def test_heartbeat_sent_at_interval() -> None:
    link = established()
    client = link.client
    assert client.next_deadline() == 1.0
    client.tick(now=0.5)
    assert client.data_to_send() == b""
    client.tick(now=1.0)
    assert messages(client.data_to_send()) == [Heartbeat()]
    assert client.next_deadline() == 2.0
    client.tick(now=1.5)
    assert client.data_to_send() == b""


def test_next_deadline_is_the_heartbeat_timeout_when_sending() -> None:
    link = established()
    client = link.client
    for now in (1.0, 2.0):
        client.tick(now=now)
    assert client.next_deadline() == 3.0  # last heard at 0 + timeout 3 (< next beat at 3.0)
    client.data_to_send()


def test_silence_past_heartbeat_timeout() -> None:
    link = established()
    client = link.client
    client.tick(now=1.0)
    client.tick(now=2.0)
    client.tick(now=2.999)
    with pytest.raises(HeartbeatTimeout, match="3"):
        client.tick(now=3.0)
    assert client.closed
    sent = client.data_to_send()
    *beats, reject = messages(sent)
    assert beats == [Heartbeat(), Heartbeat()]
    assert isinstance(reject, Reject)
    assert reject.code == "timeout"
    with pytest.raises(HandoffError, match="timeout"):
        link.server.receive_data(sent, now=3.0)
    assert link.server.closed


def test_any_frame_resets_the_heartbeat_timeout() -> None:
    link = established()
    link.server.tick(now=2.5)  # the server's heartbeat arrives at 2.5
    link.now = 2.5
    link.pump()
    assert link.client.next_deadline() == 1.0  # own heartbeat still due since 1.0
    link.client.tick(now=3.0)
    assert messages(link.client.data_to_send()) == [Heartbeat()]
    assert link.client.next_deadline() == 4.0
    link.client.tick(now=4.0)
    link.client.tick(now=5.0)
    link.client.tick(now=5.49)
    assert not link.client.closed
    with pytest.raises(HeartbeatTimeout):
        link.client.tick(now=5.5)


def test_state_change_resets_the_timeout() -> None:
    link = established()
    link.now = 2.0
    link.server.set_local_state(NodeState.DRAINING, now=2.0)
    link.pump()
    link.client.tick(now=4.9)
    with pytest.raises(HeartbeatTimeout):
        link.client.tick(now=5.0)


def test_heartbeat_exchange_keeps_both_alive() -> None:
    link = established()
    for step in range(1, 50):
        link.tick(step * 0.5)
    assert link.client.state is ConnState.ESTABLISHED
    assert link.server.state is ConnState.ESTABLISHED
    assert link.client_events[1:] == []
    assert link.server_events[1:] == []


def test_a_trickled_frame_does_not_keep_the_peer_alive() -> None:
    link = established()
    goodbye = frame(Goodbye("a slow goodbye " * 20))
    client = link.client

    def trickle() -> None:
        for second, byte in enumerate(goodbye, start=1):
            assert client.receive_data(bytes([byte]), now=second) == []
            client.tick(now=second)

    with pytest.raises(HeartbeatTimeout):
        trickle()
    assert client.closed


def test_trickled_frame_completing_in_time_counts() -> None:
    link = established()
    client = link.client
    heartbeat = sealed_for(client, Heartbeat())
    for i, byte in enumerate(heartbeat):
        client.receive_data(bytes([byte]), now=2.0 + i * 0.1)
    completed_at = 2.0 + (len(heartbeat) - 1) * 0.1
    assert client.next_deadline() == 1.0
    client.tick(now=completed_at)
    client.data_to_send()
    assert client.next_deadline() == pytest.approx(completed_at + 1.0)
    client.tick(now=completed_at + 2.9)
    assert not client.closed


def test_handshake_timeout_for_half_a_hello() -> None:
    client, server = make_client(), make_server(now=10.0)
    hello = client.data_to_send()
    assert server.receive_data(hello[: len(hello) // 2], now=11.0) == []
    assert server.next_deadline() == 15.0
    server.tick(now=14.99)
    assert server.data_to_send() == b""
    with pytest.raises(HandshakeTimeout):
        server.tick(now=15.0)
    assert server.closed
    [reject] = messages(server.data_to_send())
    assert isinstance(reject, Reject)
    assert reject.code == "timeout"
    assert server.next_deadline() == math.inf


def test_handshake_deadline_is_not_extended_by_progress() -> None:
    client, server = make_client(), make_server()
    server.receive_data(client.data_to_send(), now=4.0)  # a whole Hello, just in time
    assert server.state is ConnState.AWAIT_AUTH
    assert server.next_deadline() == 5.0
    with pytest.raises(HandshakeTimeout):
        server.tick(now=5.0)


def test_client_handshake_timeout_without_welcome() -> None:
    client = make_client(now=100.0)
    client.data_to_send()
    assert client.next_deadline() == 105.0
    client.tick(now=104.0)
    assert client.data_to_send() == b""
    with pytest.raises(HandshakeTimeout):
        client.tick(now=105.0)
    assert client.closed


def test_no_heartbeats_during_the_handshake() -> None:
    client = make_client()
    client.data_to_send()
    for now in (1.0, 2.0, 3.0, 4.0):
        client.tick(now=now)
        assert client.data_to_send() == b""


# -- local state ---------------------------------------------------------------------------


def test_draining_before_the_handshake_is_in_the_info() -> None:
    client, server = make_client(), make_server()
    client.set_local_state(NodeState.DRAINING, now=0)
    server.set_local_state(NodeState.DRAINING, now=0)
    assert server.data_to_send() == b""
    link = established(client, server)
    assert only_complete(link.server_events).state is NodeState.DRAINING
    assert only_complete(link.client_events).state is NodeState.DRAINING
    assert StateChange not in {type(m) for m in messages(bytes(link.sent_by_client))}


def test_draining_server_mid_handshake_is_in_its_info() -> None:
    client, server = make_client(), make_server()
    server.receive_data(client.data_to_send(), now=0)  # server now awaits Auth
    server.set_local_state(NodeState.DRAINING, now=0)
    link = established(client, server)
    assert only_complete(link.client_events).state is NodeState.DRAINING


@pytest.mark.parametrize("role", [Role.CLIENT, Role.SERVER])
def test_draining_after_own_info_was_sent_reaches_the_peer(role: Role) -> None:
    # In AWAIT_INFO this side already sent its Info (as SERVING): the change must follow it.
    client, server = make_client(), make_server()
    server.receive_data(client.data_to_send(), now=0)
    client.receive_data(server.data_to_send(), now=0)
    assert state_of(client) is ConnState.AWAIT_INFO
    auth, info = split_frames(client.data_to_send())
    server.receive_data(auth, now=0)
    assert state_of(server) is ConnState.AWAIT_INFO
    server_info = server.data_to_send()

    drainer = client if role is Role.CLIENT else server
    drainer.set_local_state(NodeState.DRAINING, now=0)

    server_events = server.receive_data(info + client.data_to_send(), now=0)
    client_events = client.receive_data(server_info + server.data_to_send(), now=0)
    assert state_of(client) is ConnState.ESTABLISHED
    assert state_of(server) is ConnState.ESTABLISHED
    observer, events = (server, server_events) if role is Role.CLIENT else (client, client_events)
    assert events[-1] == PeerStateChanged(NodeState.DRAINING)
    assert peer_state(observer) is NodeState.DRAINING


def test_state_change_after_establishment() -> None:
    link = established()
    link.client.set_local_state(NodeState.DRAINING, now=0.5)
    sent = link.client.data_to_send()
    assert messages(sent) == [StateChange(NodeState.DRAINING)]
    assert link.server.receive_data(sent, now=0.5) == [PeerStateChanged(NodeState.DRAINING)]
    assert peer_state(link.server) is NodeState.DRAINING
    assert link.client.next_deadline() == 1.5  # the StateChange counts as sending

    link.client.set_local_state(NodeState.DRAINING, now=0.6)  # no change, nothing sent
    assert link.client.data_to_send() == b""

    link.client.set_local_state(NodeState.SERVING, now=0.7)
    assert link.server.receive_data(link.client.data_to_send(), now=0.7) == [
        PeerStateChanged(NodeState.SERVING)
    ]
    assert peer_state(link.server) is NodeState.SERVING


# -- close ---------------------------------------------------------------------------------


@pytest.mark.parametrize("closer", ["client", "server"])
def test_close_sends_goodbye(closer: str) -> None:
    link = established()
    this, other = (link.client, link.server) if closer == "client" else (link.server, link.client)
    this.close("rolling deploy")
    assert this.closed
    sent = this.data_to_send()
    assert messages(sent) == [Goodbye("rolling deploy")]
    assert other.receive_data(sent, now=0) == [PeerGoodbye("rolling deploy")]
    assert other.closed
    assert other.data_to_send() == b""
    assert this.receive_data(frame(Heartbeat()), now=0) == []


def test_close_is_idempotent() -> None:
    link = established()
    link.client.close("one")
    link.client.close("two")
    assert messages(link.client.data_to_send()) == [Goodbye("one")]


def test_long_goodbye_reason_is_truncated_to_what_the_peer_accepts() -> None:
    link = established()
    link.client.close("é" * 5000)
    events = link.server.receive_data(link.client.data_to_send(), now=0)
    assert events == [PeerGoodbye("é" * 1024)]


def test_frames_after_goodbye_are_ignored() -> None:
    link = established()
    data = sealed_for(link.client, Goodbye("bye"), Heartbeat(), StateChange(NodeState.DRAINING))
    assert link.client.receive_data(data, now=0) == [PeerGoodbye("bye")]
    assert link.client.closed


def test_receive_data_after_close_returns_nothing() -> None:
    link = established()
    link.server.close("bye")
    assert link.server.receive_data(b"", now=0) == []
    assert link.server.receive_data(frame(StateChange(NodeState.DRAINING)), now=0) == []
    assert link.server.receive_data(b"\x00\x00\x00\x00", now=0) == []
