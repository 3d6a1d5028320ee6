"""One connection between two nodes, as a sans-IO state machine.

Bytes in (``receive_data``), events out; calls in (``send``, ``set_local_state``, ``close``),
bytes out (``data_to_send``). Time is passed in by the caller (``now``, monotonic seconds), so
heartbeats and timeouts are tested with a fake clock and no sleeps. Every incoming message is
looked up in one table keyed by (state, message type); anything not in it is a protocol error.

Handshake (client = the side that dialled)::

    client                                  server
    Hello(versions, cluster, name, nonce_c)  ->
                             <-  Welcome(version, cluster, name, nonce_s, key_s, proof_s)
    Auth(key_c, proof_c), [Info(client)]    ->
                                         <-  [Info(server)]
    [every later frame, both ways]

``proof_s = HMAC(K, "server" || T_s)`` and ``proof_c = HMAC(K, "client" || T_s || key_c)``,
where ``K`` is a subkey of the scrypt-stretched cookie (:mod:`handoff._keys`) and the
transcript ``T_s`` binds the chosen version, the client's offered versions, the cluster, both
names and incarnations, both fresh nonces and the server's ephemeral X25519 key. The cookie
never crosses the wire, a recorded transcript cannot be replayed (the other side's nonce is
new), the two labels stop a proof being reflected back, and a guess at the cookie costs an
attacker one scrypt. Nothing about the node's state is sent before both proofs are verified.

Frames in brackets travel in the secure channel (:mod:`._channel`): sealed with per-direction
keys derived from the stretched cookie, the X25519 exchange of ``key_c`` and ``key_s``, and
the whole transcript. Only ``Hello``, ``Welcome``, ``Auth`` and a ``Reject`` before the
channel exists travel in clear; none carries state.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum

import msgpack

from handoff._errors import (
    AuthenticationError,
    ClusterMismatch,
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
from handoff._keys import ClusterKey, cluster_key

from ._channel import PUBLIC_KEY_SIZE, TAG_SIZE, Ephemeral, FrameCipher, session_keys
from ._framing import FrameDecoder, encode_frame, encode_payload
from ._messages import (
    MAGIC,
    NONCE_SIZE,
    SESSION_MESSAGES,
    Auth,
    Goodbye,
    Heartbeat,
    Hello,
    Info,
    Message,
    NamespaceVersion,
    NodeState,
    Reject,
    RejectCode,
    StateChange,
    Welcome,
    decode_message,
)

__all__ = (
    "SESSION_MESSAGES",
    "SUPPORTED_VERSIONS",
    "ConnState",
    "Connection",
    "Event",
    "HandshakeComplete",
    "Limits",
    "LocalNode",
    "MessageReceived",
    "PeerGoodbye",
    "PeerInfo",
    "PeerStateChanged",
    "Role",
)

# Version 1 had no secure channel: its frames after the handshake were in clear. A node of
# version 1 is refused (with a message that says why) rather than spoken to insecurely.
# Version 2 could not confirm a cancelled stream (no Closed): a sender could not tell which
# of its chunks the receiver applied, so counters handed off through it could count twice.
# Version 4 adds the actor messages (ActorSend ... ActorMoved); a node speaks 3 as well, so
# that a release of version 3 still hands its caches and counters to this one (the actor
# messages never go to a peer of version 3). Version 5 adds Peers (the peers a node is
# linked to, so that a node learns those discovery no longer lists); never sent to 3 or 4.
SUPPORTED_VERSIONS: tuple[int, ...] = (3, 4, 5)
_UNENCRYPTED_VERSIONS = frozenset({1})
_UNCONFIRMED_VERSIONS = frozenset({2})


class Role(Enum):
    """Which side opened the connection."""

    CLIENT = "client"
    SERVER = "server"


class ConnState(Enum):
    """Where a connection is in its life."""

    AWAIT_HELLO = "await-hello"
    AWAIT_WELCOME = "await-welcome"
    AWAIT_AUTH = "await-auth"
    AWAIT_INFO = "await-info"
    ESTABLISHED = "established"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds applied to what a peer may make this side buffer and decode."""

    # The largest handshake message (a Hello or Reject of maximal text fields) is ~4 KiB.
    handshake_frame_size: int = 8 * 1024
    frame_size: int = 8 * 1024 * 1024
    depth: int = 32
    handshake_timeout: float = 5.0
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 3.0


@dataclass(frozen=True, slots=True)
class LocalNode:
    """What this node says about itself in handshakes."""

    cluster: str
    name: str
    incarnation: str
    release: str
    started_at: float
    state: NodeState = NodeState.SERVING
    address: str = ""
    namespaces: tuple[NamespaceVersion, ...] = ()


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """What an authenticated peer told about itself."""

    name: str
    incarnation: str
    cluster: str
    release: str
    started_at: float
    state: NodeState
    address: str
    namespaces: tuple[NamespaceVersion, ...]
    protocol_version: int
    clock_offset: float
    """The peer's wall clock minus ours when its Info arrived (includes one-way delay)."""


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """Both sides proved the cookie and exchanged their info."""

    peer: PeerInfo


@dataclass(frozen=True, slots=True)
class PeerStateChanged:
    """The peer moved to another state (e.g. draining)."""

    state: NodeState


@dataclass(frozen=True, slots=True)
class PeerGoodbye:
    """The peer closed the connection on purpose."""

    reason: str


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A session message for the layer above."""

    message: Message


Event = HandshakeComplete | PeerStateChanged | PeerGoodbye | MessageReceived

_REJECT_ERRORS: dict[str, type[HandoffError]] = {
    RejectCode.VERSION.value: VersionMismatch,
    RejectCode.CLUSTER.value: ClusterMismatch,
    RejectCode.AUTH.value: AuthenticationError,
    RejectCode.SELF.value: SelfConnection,
    RejectCode.NAME.value: NameConflict,
}

_ERROR_CODES: tuple[tuple[type[HandoffError], RejectCode], ...] = (
    (VersionMismatch, RejectCode.VERSION),
    (ClusterMismatch, RejectCode.CLUSTER),
    (AuthenticationError, RejectCode.AUTH),
    (SelfConnection, RejectCode.SELF),
    (NameConflict, RejectCode.NAME),
    (HandshakeTimeout, RejectCode.TIMEOUT),
    (HeartbeatTimeout, RejectCode.TIMEOUT),
)

S = ConnState
_Transition = tuple[str, ConnState]

# The one table: (state, incoming message type) -> (handler, next state).
_TRANSITIONS: dict[tuple[ConnState, type[Message]], _Transition] = {
    (S.AWAIT_HELLO, Hello): ("_on_hello", S.AWAIT_AUTH),
    (S.AWAIT_WELCOME, Welcome): ("_on_welcome", S.AWAIT_INFO),
    (S.AWAIT_AUTH, Auth): ("_on_auth", S.AWAIT_INFO),
    (S.AWAIT_INFO, Info): ("_on_info", S.ESTABLISHED),
    (S.ESTABLISHED, Heartbeat): ("_on_heartbeat", S.ESTABLISHED),
    (S.ESTABLISHED, StateChange): ("_on_state_change", S.ESTABLISHED),
    (S.ESTABLISHED, Goodbye): ("_on_goodbye", S.CLOSED),
    **{
        (state, Reject): ("_on_reject", S.CLOSED)
        for state in (S.AWAIT_HELLO, S.AWAIT_WELCOME, S.AWAIT_AUTH, S.AWAIT_INFO, S.ESTABLISHED)
    },
}


def allowed_incoming(state: ConnState) -> frozenset[type[Message]]:
    """The message types a peer may send in ``state`` (for tests and diagnostics)."""
    allowed = {cls for (s, cls) in _TRANSITIONS if s is state}
    if state is S.ESTABLISHED:
        allowed |= SESSION_MESSAGES
    return frozenset(allowed)


def _transcript(
    version: int,
    cluster: str,
    client: Hello,
    server_name: str,
    server_inc: str,
    s_nonce: bytes,
    s_key: bytes,
) -> bytes:
    # The client's whole offer is bound too, so that nobody on the path can strip versions
    # from the Hello to force a downgrade.
    offer = list(client.versions)
    fields = [MAGIC, version, offer, cluster, client.name, client.incarnation, client.nonce]
    server = [server_name, server_inc, s_nonce, s_key]
    payload: bytes = msgpack.packb([*fields, *server], use_bin_type=True)
    return payload


def _proof(key: bytes, label: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, label + b"\0" + transcript, hashlib.sha256).digest()


def _full_transcript(server_transcript: bytes, client_key: bytes) -> bytes:
    # msgpack items are self-delimiting, so appending one keeps the encoding unambiguous.
    tail: bytes = msgpack.packb(client_key, use_bin_type=True)
    return server_transcript + tail


class Connection:
    """The protocol state of one connection. Does no I/O.

    ``now`` arguments are monotonic seconds from the caller's clock; ``wall_clock`` gives the
    Unix time sent in ``Info`` so that peers can see clock differences. ``cookie`` is the
    cluster's cookie or, better, its stretched key (:func:`handoff._keys.cluster_key`, which
    costs tens of milliseconds once and is cached per process).
    """

    def __init__(
        self,
        role: Role,
        local: LocalNode,
        cookie: bytes | ClusterKey,
        *,
        now: float,
        limits: Limits | None = None,
        versions: tuple[int, ...] = SUPPORTED_VERSIONS,
        wall_clock: Callable[[], float] = time.time,
        nonce_factory: Callable[[int], bytes] = secrets.token_bytes,
        cipher_factory: Callable[[bytes], FrameCipher] = FrameCipher,
        announce: bool = True,
    ) -> None:
        if not cookie:
            raise LocalProtocolError("an empty cookie cannot authenticate anything")
        self.role = role
        self._local = local
        self._key = cookie if isinstance(cookie, ClusterKey) else cluster_key(cookie, local.cluster)
        self._proof_key = self._key.derive("handshake proof")
        self._limits = limits or Limits()
        self._versions = versions
        self._wall_clock = wall_clock
        self._nonce_factory = nonce_factory
        # A seam for tests that observe plaintext and for the benchmark's baseline.
        self._cipher_factory = cipher_factory
        # A probe (``handoff doctor``) verifies the peer and reads its Info but sends none of
        # its own, so the handshake stops one message short on the peer's side and the probe
        # never becomes a member there.
        self._announce = announce
        self._decoder = FrameDecoder(self._limits.handshake_frame_size, self._limits.depth)
        self._outgoing = bytearray()
        self._handshake_deadline = now + self._limits.handshake_timeout
        self._last_received = now
        self._last_sent = now
        self._hello: Hello | None = None
        self._ephemeral: Ephemeral | None = None
        self._server_transcript = b""
        self._send_cipher: FrameCipher | None = None
        self._receive_cipher: FrameCipher | None = None
        self._version = 0
        self._peer_identity: tuple[str, str, str] | None = None
        self.peer: PeerInfo | None = None
        self.peer_name: str | None = None
        """The name the peer claimed in the handshake (unverified until established)."""
        if role is Role.CLIENT:
            self.state = S.AWAIT_WELCOME
            self._hello = Hello(
                versions,
                local.cluster,
                local.name,
                local.incarnation,
                self._nonce_factory(NONCE_SIZE),
            )
            self._queue(self._hello)
        else:
            self.state = S.AWAIT_HELLO

    # -- outgoing ---------------------------------------------------------------------------

    def _queue(self, message: Message) -> None:
        if self._send_cipher is None:
            self._outgoing += encode_frame(message.to_wire())
        else:
            self._outgoing += self._send_cipher.seal(encode_payload(message.to_wire()))

    @property
    def encrypted(self) -> bool:
        """True once both directions travel in the secure channel."""
        return self._send_cipher is not None and self._receive_cipher is not None

    def data_to_send(self) -> bytes:
        """Bytes queued for the peer since the last call (possibly empty)."""
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def send(self, message: Message, *, now: float) -> None:
        """Queue a session message; only allowed once established."""
        if self.state is not S.ESTABLISHED:
            raise LocalProtocolError(f"cannot send {type(message).__name__} in state {self.state}")
        if type(message) not in SESSION_MESSAGES:
            raise LocalProtocolError(f"{type(message).__name__} is not a session message")
        self._queue(message)
        self._last_sent = now

    def set_local_state(self, state: NodeState, *, now: float) -> None:
        """Record this node's new state and tell the peer if it already knows us."""
        if state is self._local.state:
            return
        self._local = replace(self._local, state=state)
        # In AWAIT_INFO our Info is already queued (the client sends it with Auth, the server
        # after verifying Auth), so the change must follow it; the peer accepts the StateChange
        # because our Info, which precedes it on the stream, moves it to ESTABLISHED.
        if self.state in (S.AWAIT_INFO, S.ESTABLISHED):
            self._queue(StateChange(state))
            self._last_sent = now

    def close(self, reason: str) -> None:
        """Say goodbye (if established) and close. Idempotent."""
        if self.state is S.ESTABLISHED:
            self._queue(Goodbye(reason[:1024]))
        self.state = S.CLOSED

    # -- incoming ---------------------------------------------------------------------------

    def receive_data(self, data: bytes, *, now: float) -> list[Event]:
        """Feed bytes from the peer; return the events they complete.

        Raises a :class:`HandoffError` subclass when the peer breaks the protocol, fails
        authentication or refuses us; the connection is then closed and ``data_to_send``
        may hold a ``Reject`` telling the peer why.
        """
        if self.closed:
            return []
        events: list[Event] = []
        try:
            self._decoder.feed(data)
            while not self.closed:
                payload = self._decoder.next_payload()
                if payload is None:
                    break
                if self._receive_cipher is not None:
                    payload = self._receive_cipher.open(payload)
                self._last_received = now
                events.extend(self._dispatch(decode_message(self._decoder.decode(payload))))
        except HandoffError as exc:
            self._fail(exc)
            raise
        return events

    def _dispatch(self, message: Message) -> list[Event]:
        message_type = type(message)
        if self.state is S.ESTABLISHED and message_type in SESSION_MESSAGES:
            return [MessageReceived(message)]
        transition = _TRANSITIONS.get((self.state, message_type))
        if transition is None:
            raise ProtocolError(f"{message_type.__name__} is not allowed in state {self.state}")
        handler_name, next_state = transition
        handler: Callable[[Message], list[Event]] = getattr(self, handler_name)
        events = handler(message)
        if not self.closed:  # the handler may have closed it
            self.state = next_state
        return events

    @property
    def closed(self) -> bool:
        """True once the connection ended, for whatever reason."""
        return self.state is S.CLOSED

    def _fail(self, exc: HandoffError) -> None:
        if self.state is S.CLOSED:
            return
        code = RejectCode.PROTOCOL
        for error_type, error_code in _ERROR_CODES:
            if isinstance(exc, error_type):
                code = error_code
                break
        self._queue(Reject(code.value, str(exc)[:1024]))
        self.state = S.CLOSED

    def _on_hello(self, hello: Message) -> list[Event]:
        assert isinstance(hello, Hello)
        self.peer_name = hello.name
        self._peer_identity = (hello.name, hello.incarnation, hello.cluster)
        common = set(hello.versions) & set(self._versions)
        if not common:
            hint = ""
            if set(hello.versions) <= _UNENCRYPTED_VERSIONS:
                hint = (
                    " (the peer runs an older warm-handoff whose protocol has no encrypted "
                    "channel; it is refused rather than spoken to in clear: upgrade it)"
                )
            elif set(hello.versions) <= _UNENCRYPTED_VERSIONS | _UNCONFIRMED_VERSIONS:
                hint = (
                    " (the peer runs an older warm-handoff whose streams cannot confirm a "
                    "cancelled handoff, so counters moved through it could count twice: "
                    "upgrade it)"
                )
            raise VersionMismatch(
                f"unsupported protocol version: peer speaks {sorted(hello.versions)}, "
                f"this node speaks {sorted(self._versions)}{hint}"
            )
        if hello.cluster != self._local.cluster:
            raise ClusterMismatch(
                f"cluster mismatch: peer is in cluster {hello.cluster!r}, this node in "
                f"{self._local.cluster!r} (check HANDOFF_CLUSTER)"
            )
        if hello.name == self._local.name and hello.incarnation == self._local.incarnation:
            raise SelfConnection("connected to itself")
        self._version = max(common)
        nonce = self._nonce_factory(NONCE_SIZE)
        local = self._local
        self._ephemeral = Ephemeral(self._nonce_factory(PUBLIC_KEY_SIZE))
        key = self._ephemeral.public
        transcript = _transcript(
            self._version, local.cluster, hello, local.name, local.incarnation, nonce, key
        )
        self._server_transcript = transcript
        proof = _proof(self._proof_key, b"server", transcript)
        self._queue(
            Welcome(self._version, local.cluster, local.name, local.incarnation, nonce, key, proof)
        )
        return []

    def _on_welcome(self, welcome: Message) -> list[Event]:
        assert isinstance(welcome, Welcome)
        assert self._hello is not None
        self.peer_name = welcome.name
        self._peer_identity = (welcome.name, welcome.incarnation, welcome.cluster)
        if welcome.version not in self._versions:
            raise ProtocolError(f"peer chose protocol version {welcome.version} it was not offered")
        if welcome.cluster != self._local.cluster:
            raise ClusterMismatch(
                f"cluster mismatch: peer is in cluster {welcome.cluster!r}, this node in "
                f"{self._local.cluster!r} (check HANDOFF_CLUSTER)"
            )
        transcript = _transcript(
            welcome.version,
            self._local.cluster,
            self._hello,
            welcome.name,
            welcome.incarnation,
            welcome.nonce,
            welcome.key,
        )
        if not hmac.compare_digest(welcome.proof, _proof(self._proof_key, b"server", transcript)):
            raise AuthenticationError(
                "authentication failed: the peer does not know this cluster's cookie "
                "(HANDOFF_COOKIE differs between the nodes)"
            )
        self._version = welcome.version
        ephemeral = Ephemeral(self._nonce_factory(PUBLIC_KEY_SIZE))
        full = _full_transcript(transcript, ephemeral.public)
        keys = session_keys(self._key, ephemeral.exchange(welcome.key), full)
        self._queue(Auth(ephemeral.public, _proof(self._proof_key, b"client", full)))
        # From here on both directions are sealed: our Info is the first sealed frame, and
        # the server seals everything after verifying our Auth.
        self._authenticated(keys.client_to_server, keys.server_to_client)
        if self._announce:
            self._queue(self._info())
        return []

    def _on_auth(self, auth: Message) -> list[Event]:
        assert isinstance(auth, Auth)
        assert self._ephemeral is not None
        full = _full_transcript(self._server_transcript, auth.key)
        keys = session_keys(self._key, self._ephemeral.exchange(auth.key), full)
        self._ephemeral = None
        # Sealed from here even if the proof fails: the client switched to the channel when
        # it sent Auth, so a Reject in clear would reach it as a forgery. (A client without
        # the cookie never gets this far: it cannot verify the Welcome.)
        self._authenticated(keys.server_to_client, keys.client_to_server)
        if not hmac.compare_digest(auth.proof, _proof(self._proof_key, b"client", full)):
            raise AuthenticationError(
                "authentication failed: the peer does not know this cluster's cookie "
                "(HANDOFF_COOKIE differs between the nodes)"
            )
        self._queue(self._info())
        return []

    def _authenticated(self, send_key: bytes, receive_key: bytes) -> None:
        self._send_cipher = self._cipher_factory(send_key)
        self._receive_cipher = self._cipher_factory(receive_key)
        self._decoder.set_limits(self._limits.frame_size + TAG_SIZE, self._limits.depth)

    def _info(self) -> Info:
        local = self._local
        return Info(
            local.release,
            local.started_at,
            local.state,
            local.address,
            local.namespaces,
            self._wall_clock(),
        )

    def _on_info(self, info: Message) -> list[Event]:
        assert isinstance(info, Info)
        assert self._peer_identity is not None
        name, incarnation, cluster = self._peer_identity
        if name == self._local.name and incarnation != self._local.incarnation:
            raise NameConflict(
                f"two live nodes are named {name!r}: give each process a unique "
                "HANDOFF_NODE_NAME (or leave it unset)"
            )
        self.peer = PeerInfo(
            name=name,
            incarnation=incarnation,
            cluster=cluster,
            release=info.release,
            started_at=info.started_at,
            state=info.state,
            address=info.address,
            namespaces=info.namespaces,
            protocol_version=self._version,
            clock_offset=info.clock - self._wall_clock(),
        )
        return [HandshakeComplete(self.peer)]

    def _on_heartbeat(self, heartbeat: Message) -> list[Event]:
        return []

    def _on_state_change(self, change: Message) -> list[Event]:
        assert isinstance(change, StateChange)
        if self.peer is not None:
            self.peer = replace(self.peer, state=change.state)
        return [PeerStateChanged(change.state)]

    def _on_goodbye(self, goodbye: Message) -> list[Event]:
        assert isinstance(goodbye, Goodbye)
        return [PeerGoodbye(goodbye.reason)]

    def _on_reject(self, reject: Message) -> list[Event]:
        assert isinstance(reject, Reject)
        # Closed before raising, so that the failure path does not answer a Reject with one.
        was_established = self.state is S.ESTABLISHED
        self.state = S.CLOSED
        if was_established:
            raise ProtocolError(f"peer closed with an error ({reject.code}): {reject.reason}")
        error_type = _REJECT_ERRORS.get(reject.code)
        if error_type is None:
            raise HandshakeRejected(reject.code, reject.reason)
        raise error_type(f"peer refused the connection: {reject.reason}")

    # -- time -------------------------------------------------------------------------------

    def next_deadline(self) -> float:
        """Monotonic time at which ``tick`` has something to do (``inf`` if never)."""
        if self.state is S.CLOSED:
            return math.inf
        if self.state is not S.ESTABLISHED:
            return self._handshake_deadline
        return min(
            self._last_sent + self._limits.heartbeat_interval,
            self._last_received + self._limits.heartbeat_timeout,
        )

    def tick(self, *, now: float) -> None:
        """Send a heartbeat if one is due; raise a timeout if the peer is overdue."""
        if self.state is S.CLOSED:
            return
        try:
            if self.state is not S.ESTABLISHED:
                if now >= self._handshake_deadline:
                    raise HandshakeTimeout(
                        f"handshake not completed within {self._limits.handshake_timeout:g} s"
                    )
                return
            silent = now - self._last_received
            if silent >= self._limits.heartbeat_timeout:
                raise HeartbeatTimeout(
                    f"nothing heard from the peer for {silent:.1f} s "
                    f"(heartbeat timeout {self._limits.heartbeat_timeout:g} s)"
                )
        except HandoffError as exc:
            self._fail(exc)
            raise
        if now - self._last_sent >= self._limits.heartbeat_interval:
            self._queue(Heartbeat())
            self._last_sent = now
