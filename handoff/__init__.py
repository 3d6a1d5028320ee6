"""warm-handoff: keep in-memory state warm across rolling and blue-green deploys."""

from __future__ import annotations

from handoff._errors import (
    AuthenticationError,
    BindError,
    ClusterMismatch,
    ConfigError,
    ConnectError,
    ConnectionClosed,
    ConnectTimeout,
    DiscoveryError,
    FrameTooLarge,
    HandoffError,
    HandoffTimeout,
    HandshakeError,
    HandshakeRejected,
    HandshakeTimeout,
    HeartbeatTimeout,
    LocalProtocolError,
    NameConflict,
    ProtocolError,
    SelfConnection,
    TLSError,
    TransportError,
    VersionMismatch,
)
from handoff.membership import DownReason, MembershipEvent, NodeDown, NodeLeaving, NodeUp, Peer
from handoff.node import Node
from handoff.protocol import NodeState

__version__ = "0.1.0"

__all__ = (
    "AuthenticationError",
    "BindError",
    "ClusterMismatch",
    "ConfigError",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionClosed",
    "DiscoveryError",
    "DownReason",
    "FrameTooLarge",
    "HandoffError",
    "HandoffTimeout",
    "HandshakeError",
    "HandshakeRejected",
    "HandshakeTimeout",
    "HeartbeatTimeout",
    "LocalProtocolError",
    "MembershipEvent",
    "NameConflict",
    "Node",
    "NodeDown",
    "NodeLeaving",
    "NodeState",
    "NodeUp",
    "Peer",
    "ProtocolError",
    "SelfConnection",
    "TLSError",
    "TransportError",
    "VersionMismatch",
    "__version__",
)
