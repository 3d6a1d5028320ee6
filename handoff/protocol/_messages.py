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
    "SESSION_MESSAGES",
    "Accept",
    "Ack",
    "Auth",
    "Cancel",
    "Chunk",
    "Done",
    "End",
    "Goodbye",
    "Heartbeat",
    "Hello",
    "Info",
    "Message",
    "NamespaceVersion",
    "NodeState",
    "Offer",
    "Refuse",
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

    def data(self, what: str) -> bytes:
        value = self._next(what)
        if not isinstance(value, bytes) or not value:
            raise self._bad(what, "non-empty bytes", value)
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


# -- session messages: streaming state between authenticated nodes -----------------------
#
# A sender offers one namespace per stream; the receiver accepts with an initial credit (a
# number of chunks it is ready to buffer) or refuses with a reason. Every chunk is applied,
# then acknowledged with what became of its records and fresh credit. Chunk payloads are
# opaque bytes here: records hold user types decoded by the engine's codec, with its own
# bounds, so that control frames stay strictly typed.

MAX_STREAM = 2**31 - 1
MAX_COUNT = 2**40
MAX_CREDIT = 1024


@dataclass(frozen=True, slots=True)
class Offer(Message):
    """The sender proposes to stream ``namespace`` (``records`` is a hint for progress)."""

    TYPE: ClassVar[int] = 16
    stream: int
    namespace: str
    kind: str
    version: int
    records: int

    def fields(self) -> list[object]:
        return [self.stream, self.namespace, self.kind, self.version, self.records]

    @classmethod
    def from_fields(cls, fields: list[object]) -> Self:
        f = _Fields("Offer", fields)
        message = cls(
            f.integer("stream", 1, MAX_STREAM),
            f.text("namespace"),
            f.text("kind", 64),
            f.integer("version", 0, 2**31 - 1),
            f.integer("records", 0, MAX_COUNT),
        )
        f.done()
        return message


@dataclass(frozen=True, slots=True)
class Accept(Message):
    """The receiver takes the stream and may get ``credit`` chunks."""

    TYPE: ClassVar[int] = 17
    stream: int
    credit: int

    def fields(self) -> list[object]:
        return [self.stream, self.credit]

    @classmethod
    def from_fields(cls, fields: list[object]) -> Self:
        f = _Fields("Accept", fields)
        message = cls(f.integer("stream", 1, MAX_STREAM), f.integer("credit", 1, MAX_CREDIT))
        f.done()
        return message


@dataclass(frozen=True, slots=True)
class Refuse(Message):
    """The receiver will not take the stream, for a reason meant for the drain report."""

    TYPE: ClassVar[int] = 18
    stream: int
    reason: str

    def fields(self) -> list[object]:
        return [self.stream, self.reason]

    @classmethod
    def from_fields(cls, fields: list[object]) -> Self:
        f = _Fields("Refuse", fields)
        message = cls(f.integer("stream", 1, MAX_STREAM), f.text("reason", MAX_REASON))
        f.done()
        return message


@dataclass(frozen=True, slots=True)
class Chunk(Message):
    """``records`` records of a stream, encoded by the engine's codec in ``payload``.

    ``age`` is how many seconds before sending the oldest record's metadata was computed
    (records wait for credit): the receiver shortens relative lifetimes by it.
    """

    TYPE: ClassVar[int] = 19
    stream: int
    seq: int
    records: int
    age: float
    payload: bytes

    def fields(self) -> list[object]:
        return [self.stream, self.seq, self.records, self.age, self.payload]

    @classmethod
    def from_fields(cls, fields: list[object]) -> Self:
        f = _Fields("Chunk", fields)
        stream = f.integer("stream", 1, MAX_STREAM)
        seq = f.integer("seq", 0, MAX_COUNT)
        records = f.integer("records", 1, MAX_COUNT)
        age = f.number("age")
        if age < 0:
            raise ProtocolError("Chunk: field 'age' must not be negative")
        payload = f.data("payload")
        f.done()
        return cls(stream, seq, records, age, payload)


@dataclass(frozen=True, slots=True)
class Ack(Message):
    """Chunk ``seq`` was applied: how many records were applied, kept or dropped (why)."""

    TYPE: ClassVar[int] = 20
    stream: int
    seq: int
    applied: int
    kept: int
    dropped: tuple[tuple[str, int], ...]
    credit: int

    def fields(self) -> list[object]:
        dropped = [[reason, count] for reason, count in self.dropped]
        return [self.stream, self.seq, self.applied, self.kept, dropped, self.credit]

    @classmethod
    def from_fields(cls, fields: list[object]) -> Self:
        f = _Fields("Ack", fields)
        stream = f.integer("stream", 1, MAX_STREAM)
        seq = f.integer("seq", 0, MAX_COUNT)
        applied = f.integer("applied", 0, MAX_COUNT)
        kept = f.integer("kept", 0, MAX_COUNT)
        dropped = []
        for item in f.items("dropped", 64):
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not isinstance(item[0], str)
                or not 0 < len(item[0]) <= MAX_NAME
                or not isinstance(item[1], int)
                or isinstance(item[1], bool)
                or not 0 <= item[1] <= MAX_COUNT
            ):
                raise ProtocolError("Ack: dropped must be [reason, count] pairs")
            dropped.append((item[0], item[1]))
        credit = f.integer("credit", 0, MAX_CREDIT)
        f.done()
        return cls(stream, seq, applied, kept, tuple(dropped), credit)


@dataclass(frozen=True, slots=True)
class End(Message):
    """The sender has nothing more for this stream (``records`` sent in all)."""

    TYPE: ClassVar[int] = 21
    stream: int
    records: int

    def fields(self) -> list[object]:
        return [self.stream, self.records]

    @classmethod
    def from_fields(cls, fields: list[object]) -> Self:
        f = _Fields("End", fields)
        message = cls(f.integer("stream", 1, MAX_STREAM), f.integer("records", 0, MAX_COUNT))
        f.done()
        return message


@dataclass(frozen=True, slots=True)
class Cancel(Message):
    """The sender abandons the stream (deadline, shutdown); chunks not acknowledged are void."""

    TYPE: ClassVar[int] = 22
    stream: int
    reason: str

    def fields(self) -> list[object]:
        return [self.stream, self.reason]

    @classmethod
    def from_fields(cls, fields: list[object]) -> Self:
        f = _Fields("Cancel", fields)
        message = cls(f.integer("stream", 1, MAX_STREAM), f.text("reason", MAX_REASON))
        f.done()
        return message


@dataclass(frozen=True, slots=True)
class Done(Message):
    """The sender's drain is over: nothing more will come from it (``records`` this
    receiver acknowledged in all). The receiver counts itself warm from here."""

    TYPE: ClassVar[int] = 23
    records: int

    def fields(self) -> list[object]:
        return [self.records]

    @classmethod
    def from_fields(cls, fields: list[object]) -> Self:
        f = _Fields("Done", fields)
        message = cls(f.integer("records", 0, MAX_COUNT))
        f.done()
        return message


def _node_state(text: str) -> NodeState:
    try:
        return NodeState(text)
    except ValueError:
        raise ProtocolError(f"unknown node state {text!r}") from None


SESSION_MESSAGES: frozenset[type[Message]] = frozenset(
    {Offer, Accept, Refuse, Chunk, Ack, End, Cancel, Done}
)
"""Messages that an established connection hands to the layer above."""

MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Welcome,
        Auth,
        Info,
        Reject,
        Heartbeat,
        StateChange,
        Goodbye,
        Offer,
        Accept,
        Refuse,
        Chunk,
        Ack,
        End,
        Cancel,
        Done,
    )
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
