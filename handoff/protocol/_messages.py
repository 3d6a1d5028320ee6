"""Message types and their strict wire form.

Every message is a msgpack array ``[type_code, field, ...]``. Decoding checks the type code,
the number of fields and each field's type and size; anything else is a
:class:`ProtocolError`. ``Hello`` and ``Reject`` keep their shape in every protocol version
(and tolerate extra trailing fields) so that nodes of different versions can always tell
each other, in words, why they cannot talk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, Self

from handoff._errors import ProtocolError

__all__ = (
    "MAGIC",
    "MESSAGE_TYPES",
    "Auth",
    "Goodbye",
    "Heartbeat",
    "Hello",
    "Info",
    "Message",
    "NamespaceVersion",
    "NodeState",
    "Reject",
    "RejectCode",
    "StateChange",
    "Welcome",
    "decode_message",
)

MAGIC = "warm-handoff"
NONCE_SIZE = 32
PROOF_SIZE = 32
MAX_NAME = 255
MAX_REASON = 1024
MAX_NAMESPACES = 1024
MAX_VERSIONS = 16


class NodeState(StrEnum):
    """A node's lifecycle state as its peers see it."""

    SERVING = "serving"
    DRAINING = "draining"


class RejectCode(StrEnum):
    """Why a node refuses a connection; the receiving side maps each to an exception."""

    PROTOCOL = "protocol"
    VERSION = "version"
    CLUSTER = "cluster"
    AUTH = "auth"
    SELF = "self"
    NAME = "name"
    BUSY = "busy"
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class NamespaceVersion:
    """A tracked namespace and the schema version this node holds it in."""

    name: str
    version: int


class _Fields:
    """Reads and validates positional fields of one message."""

    def __init__(self, message: str, fields: list[object], *, extra_ok: bool = False) -> None:
        self._message = message
        self._fields = fields
        self._index = 0
        self._extra_ok = extra_ok

    def _next(self, what: str) -> object:
        if self._index >= len(self._fields):
            raise ProtocolError(f"{self._message}: missing field {what!r}")
        value = self._fields[self._index]
        self._index += 1
        return value

    def _bad(self, what: str, expected: str, value: object) -> ProtocolError:
        return ProtocolError(
            f"{self._message}: field {what!r} must be {expected}, got {type(value).__name__}"
        )

    def text(self, what: str, max_len: int = MAX_NAME, *, empty_ok: bool = False) -> str:
        value = self._next(what)
        if not isinstance(value, str):
            raise self._bad(what, "a string", value)
        if len(value) > max_len or (not value and not empty_ok):
            raise ProtocolError(f"{self._message}: field {what!r} must be 1..{max_len} chars")
        return value

    def integer(self, what: str, low: int, high: int) -> int:
        value = self._next(what)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._bad(what, "an integer", value)
        if not low <= value <= high:
            raise ProtocolError(f"{self._message}: field {what!r} out of range")
        return value

    def number(self, what: str) -> float:
        value = self._next(what)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self._bad(what, "a number", value)
        if not math.isfinite(value):
            raise ProtocolError(f"{self._message}: field {what!r} must be finite")
        return float(value)

    def blob(self, what: str, size: int) -> bytes:
        value = self._next(what)
        if not isinstance(value, bytes):
            raise self._bad(what, "bytes", value)
        if len(value) != size:
            raise ProtocolError(f"{self._message}: field {what!r} must be {size} bytes")
        return value

    def items(self, what: str, max_items: int) -> list[object]:
        value = self._next(what)
        if not isinstance(value, list):
            raise self._bad(what, "an array", value)
        if len(value) > max_items:
            raise ProtocolError(f"{self._message}: field {what!r} has over {max_items} items")
        return value

    def done(self) -> None:
        if self._index != len(self._fields) and not self._extra_ok:
            raise ProtocolError(
                f"{self._message}: expected {self._index} fields, got {len(self._fields)}"
            )


class Message:
    """Base of all protocol messages."""

    TYPE: ClassVar[int]

    def fields(self) -> list[object]:
        """The message's fields in wire order."""
        raise NotImplementedError

    def to_wire(self) -> list[object]:
        """The msgpack-ready array for this message."""
        return [self.TYPE, *self.fields()]

    @classmethod
    def from_fields(cls, fields: list[object]) -> Self:
        """Build the message from its wire fields, validating every one."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First message of the dialling side: who it is and which versions it speaks."""

    TYPE: ClassVar[int] = 1
    versions: tuple[int, ...]
    cluster: str
    name: str
    incarnation: str
    nonce: bytes

    def fields(self) -> list[object]:
        return [MAGIC, list(self.versions), self.cluster, self.name, self.incarnation, self.nonce]

    @classmethod
    def from_fields(cls, fields: list[object]) -> Self:
        f = _Fields("Hello", fields, extra_ok=True)
        if f.text("magic") != MAGIC:
            raise ProtocolError("Hello: not a warm-handoff peer (bad magic)")
        raw_versions = f.items("versions", MAX_VERSIONS)
        versions = []
        for v in raw_versions:
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 2**16:
                raise ProtocolError("Hello: protocol versions must be small positive integers")
            versions.append(v)
        cluster, name, incarnation = f.text("cluster"), f.text("name"), f.text("incarnation")
        nonce = f.blob("nonce", NONCE_SIZE)
        f.done()
        return cls(tuple(versions), cluster, name, incarnation, nonce)


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """The accepting side's answer: chosen version, identity, its nonce and its proof."""

    TYPE: ClassVar[int] = 2
    version: int
    cluster: str
    name: str
    incarnation: str
    nonce: bytes
    proof: bytes

    def fields(self) -> list[object]:
        return [self.version, self.cluster, self.name, self.incarnation, self.nonce, self.proof]

    @classmethod
    def from_fields(cls, fields: list[object]) -> Self:
        f = _Fields("Welcome", fields)
        message = cls(
            f.integer("version", 1, 2**16 - 1),
            f.text("cluster"),
            f.text("name"),
            f.text("incarnation"),
            f.blob("nonce", NONCE_SIZE),
            f.blob("proof", PROOF_SIZE),
        )
        f.done()
        return message


@dataclass(frozen=True, slots=True)
class Auth(Message):
    """The dialling side's proof of the cookie over the whole handshake transcript."""

    TYPE: ClassVar[int] = 3
    proof: bytes

    def fields(self) -> list[object]:
        return [self.proof]

    @classmethod
    def from_fields(cls, fields: list[object]) -> Self:
        f = _Fields("Auth", fields)
        message = cls(f.blob("proof", PROOF_SIZE))
        f.done()
        return message


@dataclass(frozen=True, slots=True)
class Info(Message):
    """What a node tells an authenticated peer about itself."""

    TYPE: ClassVar[int] = 4
    release: str
    started_at: float
    state: NodeState
    address: str
    namespaces: tuple[NamespaceVersion, ...]
    clock: float

    def fields(self) -> list[object]:
        return [
            self.release,
            self.started_at,
            self.state.value,
            self.address,
            [[ns.name, ns.version] for ns in self.namespaces],
            self.clock,
        ]

    @classmethod
    def from_fields(cls, fields: list[object]) -> Self:
        f = _Fields("Info", fields)
        release = f.text("release")
        started_at = f.number("started_at")
        state = _node_state(f.text("state"))
        address = f.text("address", empty_ok=True)
        namespaces = []
        for item in f.items("namespaces", MAX_NAMESPACES):
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not isinstance(item[0], str)
                or not 0 < len(item[0]) <= MAX_NAME
                or not isinstance(item[1], int)
                or isinstance(item[1], bool)
                or not 0 <= item[1] < 2**31
            ):
                raise ProtocolError("Info: namespaces must be [name, version] pairs")
            namespaces.append(NamespaceVersion(item[0], item[1]))
        clock = f.number("clock")
        f.done()
        return cls(release, started_at, state, address, tuple(namespaces), clock)


@dataclass(frozen=True, slots=True)
class Reject(Message):
    """A refusal or fatal error, with a reason meant for humans; the sender then closes."""

    TYPE: ClassVar[int] = 5
    code: str
    reason: str

    def fields(self) -> list[object]:
        return [self.code, self.reason]

    @classmethod
    def from_fields(cls, fields: list[object]) -> Self:
        f = _Fields("Reject", fields, extra_ok=True)
        message = cls(f.text("code", 64), f.text("reason", MAX_REASON, empty_ok=True))
        f.done()
        return message


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """Liveness signal; any frame counts, this one is sent when nothing else was."""

    TYPE: ClassVar[int] = 6

    def fields(self) -> list[object]:
        return []

    @classmethod
    def from_fields(cls, fields: list[object]) -> Self:
        _Fields("Heartbeat", fields).done()
        return cls()


@dataclass(frozen=True, slots=True)
class StateChange(Message):
    """The sender changed state (serving -> draining)."""

    TYPE: ClassVar[int] = 7
    state: NodeState

    def fields(self) -> list[object]:
        return [self.state.value]

    @classmethod
    def from_fields(cls, fields: list[object]) -> Self:
        f = _Fields("StateChange", fields)
        message = cls(_node_state(f.text("state")))
        f.done()
        return message


@dataclass(frozen=True, slots=True)
class Goodbye(Message):
    """The sender is closing this connection on purpose, for the reason given."""

    TYPE: ClassVar[int] = 8
    reason: str

    def fields(self) -> list[object]:
        return [self.reason]

    @classmethod
    def from_fields(cls, fields: list[object]) -> Self:
        f = _Fields("Goodbye", fields)
        message = cls(f.text("reason", MAX_REASON, empty_ok=True))
        f.done()
        return message


def _node_state(text: str) -> NodeState:
    try:
        return NodeState(text)
    except ValueError:
        raise ProtocolError(f"unknown node state {text!r}") from None


MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TYPE: cls for cls in (Hello, Welcome, Auth, Info, Reject, Heartbeat, StateChange, Goodbye)
}


def decode_message(obj: object) -> Message:
    """Turn one decoded frame into a message, or raise :class:`ProtocolError`."""
    if not isinstance(obj, list) or not obj:
        raise ProtocolError("a message must be a non-empty array")
    code, *fields = obj
    if not isinstance(code, int) or isinstance(code, bool):
        raise ProtocolError("message type must be an integer")
    cls = MESSAGE_TYPES.get(code)
    if cls is None:
        raise ProtocolError(f"unknown message type {code}")
    return cls.from_fields(fields)
