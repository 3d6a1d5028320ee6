"""The library's exceptions: one root, subclasses that say what failed.

Errors from anyio, ssl, dnspython and the OS are translated into these at one edge
(``handoff.transport`` for sockets, ``handoff.discovery`` for DNS) so that callers never
have to know which backend raised what.
"""

from __future__ import annotations

__all__ = (
    "ActorBusy",
    "ActorError",
    "ActorFailed",
    "ActorTimeout",
    "ActorUnavailable",
    "AdapterNotFound",
    "AuthenticationError",
    "BindError",
    "ClusterMismatch",
    "ConfigError",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionClosed",
    "DiscoveryError",
    "FrameAuthenticationError",
    "FrameTooLarge",
    "HandoffError",
    "HandoffTimeout",
    "HandshakeError",
    "HandshakeRejected",
    "HandshakeTimeout",
    "HeartbeatTimeout",
    "InexactCountsWarning",
    "LocalProtocolError",
    "MissingExtra",
    "NameConflict",
    "NoTransformPath",
    "PayloadRefused",
    "PortsInUse",
    "ProtocolError",
    "RecordDecodeError",
    "RecordEncodeError",
    "SelfConnection",
    "SnapshotCorrupt",
    "SnapshotError",
    "TLSError",
    "TransportError",
    "VersionMismatch",
)


class HandoffError(Exception):
    """Root of every error raised by warm-handoff."""


class ConfigError(HandoffError):
    """The configuration is missing something or holds a value that cannot work.

    The message names the setting (argument and environment variable) and how to fix it.
    """


class ProtocolError(HandoffError):
    """The peer sent bytes that break the protocol: malformed, oversized or out of order."""


class FrameTooLarge(ProtocolError):
    """A frame's length prefix exceeds the limit; nothing of it was buffered."""


class FrameAuthenticationError(ProtocolError):
    """A frame of the secure channel failed authentication: tampered, replayed, reordered or
    injected by someone without the session keys. Nothing of it was applied."""


class LocalProtocolError(HandoffError):
    """This process tried to do something the protocol does not allow in the current state."""


class HandshakeError(HandoffError):
    """The two nodes could not establish a trusted connection."""


class AuthenticationError(HandshakeError):
    """The peer's proof of the shared cookie was wrong (different ``HANDOFF_COOKIE``)."""


class ClusterMismatch(HandshakeError):
    """The peer belongs to another cluster (different ``HANDOFF_CLUSTER``)."""


class VersionMismatch(HandshakeError):
    """The two nodes share no protocol version."""


class SelfConnection(HandshakeError):
    """The address dialled is this node itself."""


class NameConflict(HandshakeError):
    """Another live node uses this node's name (two processes with one ``HANDOFF_NODE_NAME``)."""


class HandshakeRejected(HandshakeError):
    """The peer refused the handshake for a reason it named."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"peer rejected the connection ({code}): {reason}")
        self.code = code
        self.reason = reason


class HandoffTimeout(HandoffError):
    """Something did not happen within its time limit."""


class HandshakeTimeout(HandoffTimeout):
    """The peer did not complete the handshake in time."""


class HeartbeatTimeout(HandoffTimeout):
    """Nothing was heard from an established peer within the heartbeat timeout."""


class TransportError(HandoffError):
    """A network-level failure: refused, reset, unreachable, closed."""


class ConnectError(TransportError):
    """A connection to a peer could not be opened."""


class ConnectTimeout(ConnectError, HandoffTimeout):
    """Opening a connection to a peer took longer than the connect timeout."""


class ConnectionClosed(TransportError):
    """The connection ended (closed, reset or broken) while it was in use."""


class TLSError(TransportError):
    """The TLS handshake failed: untrusted or mismatched certificates."""


class BindError(TransportError, ConfigError):
    """The node could not listen on its bind address (address in use, not available)."""


class PortsInUse(BindError):
    """Every port of the node's range (``HANDOFF_PORT_RANGE`` from the bind port on) is in
    use: more worker processes on this machine than the range has ports, or other programs
    there. A condition of the machine, not of the configuration: the ASGI lifespan and the
    thread runner log it as an error and let the app serve without a node."""


class DiscoveryError(HandoffError):
    """A discovery query failed. Logged and retried by the node; never fatal there."""


class RecordEncodeError(HandoffError):
    """A value could not be serialized: a type with no encoder, or nesting beyond the limit.

    The message names the type and how to fix it (``Codec.register``).
    """


class RecordDecodeError(ProtocolError):
    """Serialized records are malformed, nest too deep, or use an unknown extension type."""


class PayloadRefused(RecordDecodeError):
    """Well-formed records that exceed what a receiver takes from one payload: keys that
    share one hash beyond a small bound (a hash flood), more memory than a small multiple
    of the payload's size (a decode bomb), or an unsafe value (a signalling or enormous
    ``Decimal``). A live receiver refuses the stream with the reason, and keeps the link; a
    snapshot holding one is quarantined."""


class NoTransformPath(HandoffError):
    """A namespace cannot be converted between two schema versions: a hook is missing."""

    def __init__(
        self, namespace: str, from_version: int, to_version: int, missing_step: tuple[int, int]
    ) -> None:
        step_from, step_to = missing_step
        direction = "upgrade" if step_to > step_from else "downgrade"
        super().__init__(
            f"cannot convert {namespace!r} from version {from_version} to {to_version}: "
            f"no {direction} hook for {namespace!r} from version {step_from} to {step_to}; "
            f"add @node.{direction}({namespace!r}, {step_from})"
        )
        self.namespace = namespace
        self.from_version = from_version
        self.to_version = to_version
        self.missing_step = missing_step


class ActorError(HandoffError):
    """A message to an actor (:class:`handoff.ActorRegistry`) was not answered as asked."""


class ActorUnavailable(ActorError):
    """No node may run the actor now: a peer that may hold it cannot be reached and is not
    known to be gone (a partition, or a crash not yet confirmed). Rather than risk two live
    activations, callers get this error; the message stays queued and is handled once, in
    order, when the actor can be reached (unless ``delivery_timeout`` passes first)."""


class ActorTimeout(ActorError, HandoffTimeout):
    """No answer within the call's timeout. The message stays queued: it is handled once, in
    order, later; only its reply is not awaited any more."""


class ActorBusy(ActorError):
    """A bound was reached: this node has too many unanswered messages to the namespace's
    actors, or one actor's channel window stayed full for the whole timeout. The message
    was not sent."""


class ActorFailed(ActorError):
    """The actor's ``handle`` raised (the text says what). The message counts as handled:
    it is not retried."""


class SnapshotError(HandoffError):
    """The snapshot store could not write, read or move a snapshot (disk full, I/O error)."""


class MissingExtra(HandoffError, ImportError):
    """An optional integration is used without its dependency (the message says which
    extra to install: ``pip install 'warm-handoff[prometheus]'``, ``[s3]``)."""


class SnapshotCorrupt(SnapshotError):
    """A snapshot file is truncated, damaged, foreign or not a snapshot; nothing of it is used.

    ``reason`` says what is wrong (``"checksum mismatch in chunk 2"``).
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"snapshot {path} is unusable: {reason}")
        self.path = path
        self.reason = reason


class AdapterNotFound(HandoffError):
    """No adapter is known for the type of an object given to ``node.track``.

    The message lists the supported types and how to register an adapter for another one.
    """


class InexactCountsWarning(UserWarning):
    """A tracked object holds counts that a handoff would not keep exact.

    ``node.track`` warns with it for a ``collections.Counter`` or a mapping of ints: as a
    plain mapping it is copied, not moved, and a receiver keeps its own values, so counts
    are lost (or, with ``merge=operator.add``, counted twice after two deploys). Use
    :class:`handoff.Counters`.
    """
