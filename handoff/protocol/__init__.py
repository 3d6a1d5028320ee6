"""The warm-handoff wire protocol, sans-IO: bytes in, events out; no sockets, no event loop.

A lint rule (``handoff/protocol/ruff.toml``) keeps anyio, asyncio, socket, ssl and dns out of
this package, so that everything here can be tested with plain function calls.
"""

from __future__ import annotations

from ._connection import (
    SESSION_MESSAGES,
    SUPPORTED_VERSIONS,
    Connection,
    ConnState,
    Event,
    HandshakeComplete,
    Limits,
    LocalNode,
    MessageReceived,
    PeerGoodbye,
    PeerInfo,
    PeerStateChanged,
    Role,
    allowed_incoming,
)
from ._framing import FrameDecoder, check_depth, encode_frame
from ._messages import (
    MESSAGE_TYPES,
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
    "MESSAGE_TYPES",
    "SESSION_MESSAGES",
    "SUPPORTED_VERSIONS",
    "Auth",
    "ConnState",
    "Connection",
    "Event",
    "FrameDecoder",
    "Goodbye",
    "HandshakeComplete",
    "Heartbeat",
    "Hello",
    "Info",
    "Limits",
    "LocalNode",
    "Message",
    "MessageReceived",
    "NamespaceVersion",
    "NodeState",
    "PeerGoodbye",
    "PeerInfo",
    "PeerStateChanged",
    "Reject",
    "RejectCode",
    "Role",
    "StateChange",
    "Welcome",
    "allowed_incoming",
    "check_depth",
    "decode_message",
    "encode_frame",
)
