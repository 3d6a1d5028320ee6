"""Message types and their strict wire form.

Every message is a msgpack array ``[type_code, field, ...]``. Each message class lists its
wire fields once, in wire order, each annotated with its kind (``Annotated[int,
Integer(1, MAX_STREAM)]``); encoding and validated decoding are both derived from that list.
Decoding checks the type code, the number of fields and each field's type and size; anything
else is a :class:`ProtocolError`. ``Hello`` and ``Reject`` keep their shape in every protocol
version (and tolerate extra trailing fields) so that nodes of different versions can always
tell each other, in words, why they cannot talk.

Adding a field is one annotated line in its class; adding a message is one class with the
``@_message`` decorator, which registers its type code.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import (
    Annotated,
    Any,
    ClassVar,
    NoReturn,
    Self,
    TypeVar,
    get_args,
    get_origin,
    get_type_hints,
)

from handoff._errors import ProtocolError

__all__ = (
    "ACTOR_PROTOCOL",
    "MAGIC",
    "MAX_REFERRALS",
    "MAX_TALLY_RECORDS",
    "MESSAGE_TYPES",
    "REFERRAL_PROTOCOL",
    "SESSION_MESSAGES",
    "Accept",
    "Ack",
    "ActorHere",
    "ActorMove",
    "ActorMoved",
    "ActorReply",
    "ActorSend",
    "ActorWhere",
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
    "Peers",
    "Refuse",
    "Reject",
    "RejectCode",
    "StateChange",
    "Tally",
    "Welcome",
    "decode_message",
)

MAGIC = "warm-handoff"
NONCE_SIZE = 32
PROOF_SIZE = 32
PUBLIC_KEY_SIZE = 32
MAX_NAME = 255
MAX_REASON = 1024
MAX_NAMESPACES = 1024
MAX_VERSIONS = 16
MAX_STREAM = 2**31 - 1
MAX_SCHEMA = 2**31 - 1
MAX_COUNT = 2**40
MAX_CREDIT = 1024
MAX_KIND = 64
MAX_DROPPED = 64


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


# -- field kinds ---------------------------------------------------------------------------
#
# A kind builds, once per message field, a reader: a closure that validates one wire value
# and returns what the message stores. Readers run for every field of every frame, Chunks
# and Acks included, so they close over their bounds and test the common exact type first.

Reader = Callable[[object], Any]


def _bad(where: str, expected: str, value: object) -> ProtocolError:
    return ProtocolError(f"{where} must be {expected}, got {type(value).__name__}")


class Kind(ABC):
    """How one wire field is checked when read and shaped when written."""

    @abstractmethod
    def reader(self, message: str, field: str) -> Reader:
        """A function that validates one wire value of ``message.field`` and converts it."""

    def writer(self) -> Callable[[Any], object] | None:
        """What turns the stored value into its wire value; ``None``: it goes as it is."""
        return None


@dataclass(frozen=True, slots=True)
class Text(Kind):
    """A string of 1 (0 with ``empty_ok``) to ``max_len`` characters."""

    max_len: int = MAX_NAME
    empty_ok: bool = False

    def reader(self, message: str, field: str) -> Reader:
        where = f"{message}: field {field!r}"
        low, high = (0 if self.empty_ok else 1), self.max_len

        def read(value: object) -> str:
            if not isinstance(value, str):
                raise _bad(where, "a string", value)
            if not low <= len(value) <= high:
                raise ProtocolError(f"{where} must be {low}..{high} chars")
            return value

        return read


@dataclass(frozen=True, slots=True)
class Integer(Kind):
    """An integer in ``low..high`` (inclusive); never a bool."""

    low: int
    high: int

    def reader(self, message: str, field: str) -> Reader:
        where = f"{message}: field {field!r}"
        low, high = self.low, self.high

        def read(value: object) -> int:
            if type(value) is int or (isinstance(value, int) and not isinstance(value, bool)):
                if low <= value <= high:
                    return value
                raise ProtocolError(f"{where} out of range {low}..{high}")
            raise _bad(where, "an integer", value)

        return read


@dataclass(frozen=True, slots=True)
class Number(Kind):
    """A finite number (an integer on the wire comes back as a float); never a bool."""

    nonnegative: bool = False

    def reader(self, message: str, field: str) -> Reader:
        where = f"{message}: field {field!r}"
        nonnegative = self.nonnegative
        isfinite = math.isfinite

        def read(value: object) -> float:
            if type(value) is float or (
                isinstance(value, int | float) and not isinstance(value, bool)
            ):
                if not isfinite(value):
                    raise ProtocolError(f"{where} must be finite")
                if nonnegative and value < 0:
                    raise ProtocolError(f"{where} must not be negative")
                return float(value)
            raise _bad(where, "a number", value)

        return read


@dataclass(frozen=True, slots=True)
class Blob(Kind):
    """Exactly ``size`` bytes (nonces, proofs)."""

    size: int

    def reader(self, message: str, field: str) -> Reader:
        where = f"{message}: field {field!r}"
        size = self.size

        def read(value: object) -> bytes:
            if not isinstance(value, bytes):
                raise _bad(where, "bytes", value)
            if len(value) != size:
                raise ProtocolError(f"{where} must be {size} bytes")
            return value

        return read


@dataclass(frozen=True, slots=True)
class Data(Kind):
    """Non-empty opaque bytes; their size is bounded by the frame."""

    def reader(self, message: str, field: str) -> Reader:
        where = f"{message}: field {field!r}"

        def read(value: object) -> bytes:
            if isinstance(value, bytes) and value:
                return value
            raise _bad(where, "non-empty bytes", value)

        return read


def _array(where: str, value: object, max_items: int) -> list[object]:
    if not isinstance(value, list):
        raise _bad(where, "an array", value)
    if len(value) > max_items:
        raise ProtocolError(f"{where} has over {max_items} items")
    return value


@dataclass(frozen=True, slots=True)
class Integers(Kind):
    """Up to ``max_items`` integers in ``low..high``, stored as a tuple."""

    max_items: int
    low: int
    high: int

    def reader(self, message: str, field: str) -> Reader:
        where = f"{message}: field {field!r}"
        max_items, low, high = self.max_items, self.low, self.high

        def read(value: object) -> tuple[int, ...]:
            items = _array(where, value, max_items)
            for item in items:
                if not isinstance(item, int) or isinstance(item, bool) or not low <= item <= high:
                    raise ProtocolError(f"{where} must hold integers in {low}..{high}")
            return tuple(items)  # type: ignore[arg-type]  # every item was checked above

        return read

    def writer(self) -> Callable[[Any], object]:
        return list


@dataclass(frozen=True, slots=True)
class Pairs(Kind):
    """Up to ``max_items`` ``[name, count]`` arrays: names of 1..MAX_NAME characters, counts
    in ``0..high``; each pair is stored as ``build(name, count)`` and sent as ``split(item)``.
    ``shape`` names the two parts for error messages, e.g. ``"[reason, count]"``."""

    max_items: int
    high: int
    shape: str
    build: Callable[[str, int], object]
    split: Callable[[Any], list[object]]

    def reader(self, message: str, field: str) -> Reader:
        where = f"{message}: field {field!r}"
        refused = f"{message}: {field} must be {self.shape} pairs"
        max_items, high, build = self.max_items, self.high, self.build

        def read(value: object) -> tuple[object, ...]:
            pairs = []
            for item in _array(where, value, max_items):
                if (
                    not isinstance(item, list)
                    or len(item) != 2
                    or not isinstance(item[0], str)
                    or not 0 < len(item[0]) <= MAX_NAME
                    or not isinstance(item[1], int)
                    or isinstance(item[1], bool)
                    or not 0 <= item[1] <= high
                ):
                    raise ProtocolError(refused)
                pairs.append(build(item[0], item[1]))
            return tuple(pairs)

        return read

    def writer(self) -> Callable[[Any], object]:
        split = self.split
        return lambda items: [split(item) for item in items]


_NODE_STATES = {state.value: state for state in NodeState}


@dataclass(frozen=True, slots=True)
class State(Kind):
    """A :class:`NodeState`, sent as its value."""

    def reader(self, message: str, field: str) -> Reader:
        as_text = Text().reader(message, field)

        def read(value: object) -> NodeState:
            state = _NODE_STATES.get(as_text(value))
            if state is None:
                raise ProtocolError(f"{message}: unknown node state {value!r}")
            return state

        return read

    def writer(self) -> Callable[[Any], object]:
        return operator.attrgetter("value")


@dataclass(frozen=True, slots=True)
class Magic(Kind):
    """The constant :data:`MAGIC` that opens every ``Hello``: strangers are told apart."""

    def reader(self, message: str, field: str) -> Reader:
        def read(value: object) -> str:
            if type(value) is not str or value != MAGIC:
                raise ProtocolError(f"{message}: not a warm-handoff peer (bad magic)")
            return value

        return read


# -- messages ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _WireForm:
    """A message class's codec, derived once from its annotated fields by ``@_message``."""

    names: tuple[str, ...]  # the wire fields in order, after the type code
    readers: tuple[Reader, ...]
    constants: tuple[int, ...]  # positions of ClassVar constants: checked, not stored
    extra_ok: bool
    encode: Callable[[Any], list[object]]


class Message:
    """Base of all protocol messages.

    A message's wire fields are its annotated attributes, in order: dataclass fields (sent
    and stored) and ``ClassVar`` constants (sent as the class's value, checked on receipt,
    not stored). ``@_message`` derives the codec from them.
    """

    TYPE: ClassVar[int]
    _WIRE: ClassVar[_WireForm]

    def fields(self) -> list[object]:
        """The message's fields in wire order."""
        return self._WIRE.encode(self)[1:]

    def to_wire(self) -> list[object]:
        """The msgpack-ready array for this message."""
        return self._WIRE.encode(self)

    @classmethod
    def from_fields(cls, fields: list[object]) -> Self:
        """Build the message from its wire fields, validating every one."""
        form = cls._WIRE
        readers = form.readers
        if len(fields) != len(readers) and not (form.extra_ok and len(fields) > len(readers)):
            cls._refuse_count(fields)
        # map stops at the shorter input: tolerated extra fields are ignored.
        if not form.constants:
            return cls(*map(operator.call, readers, fields))
        values = list(map(operator.call, readers, fields))
        for index in reversed(form.constants):
            del values[index]
        return cls(*values)

    @classmethod
    def _refuse_count(cls, fields: list[object]) -> NoReturn:
        form = cls._WIRE
        # A bad field before the gap is the better diagnosis, as when reading in order.
        for read, value in zip(form.readers, fields, strict=False):
            read(value)
        if len(fields) < len(form.names):
            raise ProtocolError(f"{cls.__name__}: missing field {form.names[len(fields)]!r}")
        raise ProtocolError(f"{cls.__name__}: expected {len(form.names)} fields, got {len(fields)}")


MESSAGE_TYPES: dict[int, type[Message]] = {}
_SESSION: set[type[Message]] = set()

_M = TypeVar("_M", bound=Message)


def _message(*, session: bool = False, extra_ok: bool = False) -> Callable[[type[_M]], type[_M]]:
    """Register a message dataclass and derive its codec from its annotated fields.

    ``session``: handed to the layer above once the connection is established.
    ``extra_ok``: trailing fields from newer versions are ignored instead of refused.
    """

    def register(cls: type[_M]) -> type[_M]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__}: put @_message above @dataclass")
        if cls.TYPE in MESSAGE_TYPES:
            raise TypeError(f"{cls.__name__}: type code {cls.TYPE} is taken")
        fields = _wire_fields(cls)
        names = tuple(name for name, _, _ in fields)
        stored = [name for name, _, constant in fields if not constant]
        if stored != [f.name for f in dataclasses.fields(cls) if f.init]:
            raise TypeError(
                f"{cls.__name__}: the wire fields must be the __init__ fields, in order"
            )
        readers = tuple(kind.reader(cls.__name__, name) for name, kind, _ in fields)
        constants = tuple(index for index, (_, _, constant) in enumerate(fields) if constant)
        for index in constants:
            readers[index](getattr(cls, names[index]))  # what is sent must be accepted
        writers = [
            (index + 1, write)  # +1: after the type code
            for index, (_, kind, _) in enumerate(fields)
            if (write := kind.writer()) is not None
        ]
        encode = _encoder(cls.TYPE, names, writers)
        cls._WIRE = _WireForm(names, readers, constants, extra_ok, encode)
        MESSAGE_TYPES[cls.TYPE] = cls
        if session:
            _SESSION.add(cls)
        return cls

    return register


def _wire_fields(cls: type[Message]) -> list[tuple[str, Kind, bool]]:
    """``(name, kind, constant)`` for each wire field of ``cls``, in wire order."""
    hints = get_type_hints(cls, include_extras=True)
    fields = []
    for name in inspect.get_annotations(cls):
        hint = hints[name]
        constant = get_origin(hint) is ClassVar
        if constant:
            hint = get_args(hint)[0]
        kinds = [k for k in getattr(hint, "__metadata__", ()) if isinstance(k, Kind)]
        if not kinds and constant:
            continue  # TYPE and the like: not on the wire
        if len(kinds) != 1:
            raise TypeError(f"{cls.__name__}.{name}: annotate the field with one wire kind")
        fields.append((name, kinds[0], constant))
    return fields


def _encoder(
    code: int, names: tuple[str, ...], writers: list[tuple[int, Callable[[Any], object]]]
) -> Callable[[Any], list[object]]:
    get: Callable[[Any], tuple[object, ...]]
    if len(names) > 1:
        get = operator.attrgetter(*names)  # one C call for all fields
    else:
        get = lambda message: tuple(getattr(message, name) for name in names)  # noqa: E731
    if not writers:
        return lambda message: [code, *get(message)]

    def encode(message: Message) -> list[object]:
        wire = [code, *get(message)]
        for index, write in writers:
            wire[index] = write(wire[index])
        return wire

    return encode


@_message(extra_ok=True)
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First message of the dialling side: who it is and which versions it speaks."""

    TYPE: ClassVar[int] = 1
    magic: ClassVar[Annotated[str, Magic()]] = MAGIC
    versions: Annotated[tuple[int, ...], Integers(MAX_VERSIONS, 1, 2**16 - 1)]
    cluster: Annotated[str, Text()]
    name: Annotated[str, Text()]
    incarnation: Annotated[str, Text()]
    nonce: Annotated[bytes, Blob(NONCE_SIZE)]


@_message()
@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """The accepting side's answer: chosen version, identity, its nonce, its ephemeral
    X25519 key for the secure channel, and its proof of the cookie."""

    TYPE: ClassVar[int] = 2
    version: Annotated[int, Integer(1, 2**16 - 1)]
    cluster: Annotated[str, Text()]
    name: Annotated[str, Text()]
    incarnation: Annotated[str, Text()]
    nonce: Annotated[bytes, Blob(NONCE_SIZE)]
    key: Annotated[bytes, Blob(PUBLIC_KEY_SIZE)]
    proof: Annotated[bytes, Blob(PROOF_SIZE)]


@_message()
@dataclass(frozen=True, slots=True)
class Auth(Message):
    """The dialling side's ephemeral key and its proof of the cookie over the whole
    handshake transcript (that key included)."""

    TYPE: ClassVar[int] = 3
    key: Annotated[bytes, Blob(PUBLIC_KEY_SIZE)]
    proof: Annotated[bytes, Blob(PROOF_SIZE)]


_NAMESPACES = Pairs(
    MAX_NAMESPACES,
    MAX_SCHEMA,
    "[name, version]",
    build=NamespaceVersion,
    split=lambda ns: [ns.name, ns.version],
)


@_message()
@dataclass(frozen=True, slots=True)
class Info(Message):
    """What a node tells an authenticated peer about itself."""

    TYPE: ClassVar[int] = 4
    release: Annotated[str, Text()]
    started_at: Annotated[float, Number()]
    state: Annotated[NodeState, State()]
    address: Annotated[str, Text(empty_ok=True)]
    namespaces: Annotated[tuple[NamespaceVersion, ...], _NAMESPACES]
    clock: Annotated[float, Number()]


@_message(extra_ok=True)
@dataclass(frozen=True, slots=True)
class Reject(Message):
    """A refusal or fatal error, with a reason meant for humans; the sender then closes."""

    TYPE: ClassVar[int] = 5
    code: Annotated[str, Text(64)]
    reason: Annotated[str, Text(MAX_REASON, empty_ok=True)]


@_message()
@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """Liveness signal; any frame counts, this one is sent when nothing else was."""

    TYPE: ClassVar[int] = 6


@_message()
@dataclass(frozen=True, slots=True)
class StateChange(Message):
    """The sender changed state (serving -> draining)."""

    TYPE: ClassVar[int] = 7
    state: Annotated[NodeState, State()]


@_message()
@dataclass(frozen=True, slots=True)
class Goodbye(Message):
    """The sender is closing this connection on purpose, for the reason given."""

    TYPE: ClassVar[int] = 8
    reason: Annotated[str, Text(MAX_REASON, empty_ok=True)]


# -- session messages: streaming state between authenticated nodes -----------------------
#
# A sender offers one namespace per stream; the receiver accepts with an initial credit (a
# number of chunks it is ready to buffer) or refuses with a reason. Every chunk is applied,
# then acknowledged with what became of its records and fresh credit. Chunk payloads are
# opaque bytes here: records hold user types decoded by the engine's codec, with its own
# bounds, so that control frames stay strictly typed.

_STREAM = Integer(1, MAX_STREAM)
_COUNT = Integer(0, MAX_COUNT)
_SESSION_REASON = Text(MAX_REASON)
_DROPPED = Pairs(MAX_DROPPED, MAX_COUNT, "[reason, count]", build=lambda *pair: pair, split=list)


@_message(session=True)
@dataclass(frozen=True, slots=True)
class Offer(Message):
    """The sender proposes to stream ``namespace`` (``records`` is a hint for progress)."""

    TYPE: ClassVar[int] = 16
    stream: Annotated[int, _STREAM]
    namespace: Annotated[str, Text()]
    kind: Annotated[str, Text(MAX_KIND)]
    version: Annotated[int, Integer(0, MAX_SCHEMA)]
    records: Annotated[int, _COUNT]


@_message(session=True)
@dataclass(frozen=True, slots=True)
class Accept(Message):
    """The receiver takes the stream and may get ``credit`` chunks."""

    TYPE: ClassVar[int] = 17
    stream: Annotated[int, _STREAM]
    credit: Annotated[int, Integer(1, MAX_CREDIT)]


@_message(session=True)
@dataclass(frozen=True, slots=True)
class Refuse(Message):
    """The receiver will not take the stream, for a reason meant for the drain report."""

    TYPE: ClassVar[int] = 18
    stream: Annotated[int, _STREAM]
    reason: Annotated[str, _SESSION_REASON]


@_message(session=True)
@dataclass(frozen=True, slots=True)
class Chunk(Message):
    """``records`` records of a stream, encoded by the engine's codec in ``payload``.

    ``age`` is how many seconds before sending the oldest record's metadata was computed
    (records wait for credit): the receiver shortens relative lifetimes by it.
    """

    TYPE: ClassVar[int] = 19
    stream: Annotated[int, _STREAM]
    seq: Annotated[int, _COUNT]
    records: Annotated[int, Integer(1, MAX_COUNT)]
    age: Annotated[float, Number(nonnegative=True)]
    payload: Annotated[bytes, Data()]


@_message(session=True)
@dataclass(frozen=True, slots=True)
class Ack(Message):
    """Chunk ``seq`` was applied: how many records were applied, kept or dropped (why)."""

    TYPE: ClassVar[int] = 20
    stream: Annotated[int, _STREAM]
    seq: Annotated[int, _COUNT]
    applied: Annotated[int, _COUNT]
    kept: Annotated[int, _COUNT]
    dropped: Annotated[tuple[tuple[str, int], ...], _DROPPED]
    credit: Annotated[int, Integer(0, MAX_CREDIT)]


@_message(session=True)
@dataclass(frozen=True, slots=True)
class End(Message):
    """The sender has nothing more for this stream (``records`` sent in all)."""

    TYPE: ClassVar[int] = 21
    stream: Annotated[int, _STREAM]
    records: Annotated[int, _COUNT]


@_message(session=True)
@dataclass(frozen=True, slots=True)
class Cancel(Message):
    """The sender abandons the stream (deadline, shutdown); chunks not acknowledged are void."""

    TYPE: ClassVar[int] = 22
    stream: Annotated[int, _STREAM]
    reason: Annotated[str, _SESSION_REASON]


@_message(session=True)
@dataclass(frozen=True, slots=True)
class Closed(Message):
    """The receiver's answer to a Cancel of an open stream: every chunk it applied was
    acknowledged before this message, and none will be applied after it. Until it comes,
    the sender cannot tell whether its unacknowledged chunks were applied, so state that
    must move exactly once (counters, actors) stays bound to this receiver meanwhile."""

    TYPE: ClassVar[int] = 24
    stream: Annotated[int, _STREAM]


@_message(session=True)
@dataclass(frozen=True, slots=True)
class Done(Message):
    """The sender's drain is over: nothing more will come from it (``records`` this
    receiver acknowledged in all). The receiver counts itself warm from here."""

    TYPE: ClassVar[int] = 23
    records: Annotated[int, _COUNT]


MAX_TALLY_RECORDS = 4096
"""Keys in one :class:`Tally` at most (a report of more keys goes in several)."""


@_message(session=True)
@dataclass(frozen=True, slots=True)
class Tally(Message):
    """A node's own amounts of some keys of a cluster-scoped ``namespace`` (counters).

    ``payload`` holds ``records`` ``[key, amount, remaining]`` records, encoded by the
    engine's codec like a Chunk's: absolute amounts (0: none left), not increments, so a
    lost, repeated or reordered Tally is harmless. ``seq`` grows with every Tally of the
    sender's ``incarnation``: the receiver keeps, per key, the value of the latest one.
    ``full_from`` is 0, or, on the last Tally of a full report (every key the sender
    holds), the ``seq`` of its first one: keys not refreshed since are gone.
    """

    TYPE: ClassVar[int] = 25
    namespace: Annotated[str, Text()]
    incarnation: Annotated[str, Text()]
    seq: Annotated[int, Integer(1, MAX_COUNT)]
    full_from: Annotated[int, _COUNT]
    records: Annotated[int, Integer(0, MAX_TALLY_RECORDS)]
    payload: Annotated[bytes, Data()]


ACTOR_PROTOCOL = 4
"""The first protocol version whose peers understand the actor messages (types 30-35);
they are never sent to a peer of an older version."""

_KEY = Data()
_REPLY_STATUS = Integer(0, 7)
_HOLDER = Text(empty_ok=True)
_QUERY = Integer(1, MAX_COUNT)
_SEQ = Integer(1, MAX_COUNT)


@_message(session=True)
@dataclass(frozen=True, slots=True)
class ActorSend(Message):
    """A message for the actor ``key`` (codec-encoded) of ``namespace``.

    ``origin`` (the sending node's incarnation) and ``gen`` name the sender's ordered
    channel to this key, ``seq`` numbers the message in it; every message below
    ``first_unacked`` was answered, so an owner that knows nothing of this channel (a fresh
    activation) starts there. Replies go to the node named ``sender``. ``hops`` counts the
    owners that forwarded it (bounded: views of placement can disagree for a moment).
    """

    TYPE: ClassVar[int] = 30
    namespace: Annotated[str, Text()]
    key: Annotated[bytes, _KEY]
    origin: Annotated[str, Text()]
    sender: Annotated[str, Text()]
    gen: Annotated[int, _SEQ]
    seq: Annotated[int, _SEQ]
    first_unacked: Annotated[int, _SEQ]
    want_reply: Annotated[int, Integer(0, 1)]
    hops: Annotated[int, Integer(0, 64)]
    body: Annotated[bytes, Data()]


@_message(session=True)
@dataclass(frozen=True, slots=True)
class ActorReply(Message):
    """The fate of message ``seq`` of channel ``gen`` to ``key``: ``status`` is one of
    :class:`handoff.engine._actors.Status` (handled with a reply or without, failed in the
    handler, held elsewhere (``holder``), retry later, unavailable, busy); ``body`` is the
    codec-encoded reply or the reason."""

    TYPE: ClassVar[int] = 31
    namespace: Annotated[str, Text()]
    key: Annotated[bytes, _KEY]
    gen: Annotated[int, _SEQ]
    seq: Annotated[int, _SEQ]
    status: Annotated[int, _REPLY_STATUS]
    holder: Annotated[str, _HOLDER]
    body: Annotated[bytes, Data()]


@_message(session=True)
@dataclass(frozen=True, slots=True)
class ActorWhere(Message):
    """Query ``query``: does the receiver hold ``key`` (or know who does)? Sent to every
    peer before a fresh activation, so that no key is ever activated twice."""

    TYPE: ClassVar[int] = 32
    namespace: Annotated[str, Text()]
    key: Annotated[bytes, _KEY]
    query: Annotated[int, _QUERY]


@_message(session=True)
@dataclass(frozen=True, slots=True)
class ActorHere(Message):
    """Answer to an :class:`ActorWhere`: ``answer`` is 0 (not held here), 1 (held by
    ``holder``, maybe on its way there) or 2 (this node is activating it itself, and wins)."""

    TYPE: ClassVar[int] = 33
    namespace: Annotated[str, Text()]
    key: Annotated[bytes, _KEY]
    query: Annotated[int, _QUERY]
    answer: Annotated[int, Integer(0, 2)]
    holder: Annotated[str, _HOLDER]


@_message(session=True)
@dataclass(frozen=True, slots=True)
class ActorMove(Message):
    """The actor ``key`` moves to the receiver: ``payload`` holds its state (at schema
    ``version``), its channels' positions and the messages it had queued. ``epoch`` counts
    its migrations; ``move`` names this attempt for the answer."""

    TYPE: ClassVar[int] = 34
    namespace: Annotated[str, Text()]
    key: Annotated[bytes, _KEY]
    move: Annotated[int, _QUERY]
    epoch: Annotated[int, _SEQ]
    version: Annotated[int, Integer(0, MAX_SCHEMA)]
    payload: Annotated[bytes, Data()]


@_message(session=True)
@dataclass(frozen=True, slots=True)
class ActorMoved(Message):
    """Answer to :class:`ActorMove` ``move``: ``accepted`` 1 when the receiver activated the
    actor (it now owns it), 0 with a ``reason`` when it did not (the sender keeps it)."""

    TYPE: ClassVar[int] = 35
    namespace: Annotated[str, Text()]
    key: Annotated[bytes, _KEY]
    move: Annotated[int, _QUERY]
    accepted: Annotated[int, Integer(0, 1)]
    reason: Annotated[str, Text(MAX_REASON, empty_ok=True)]


REFERRAL_PROTOCOL = 5
"""The first protocol version whose peers send and understand :class:`Peers`."""
MAX_REFERRALS = 256
"""Peers named in one :class:`Peers` at most (a node links to more: the first ones go)."""
MAX_ADDRESS = 300
"""Characters of one ``host:port`` (a DNS name is at most 253, a port 5, brackets 2)."""


@dataclass(frozen=True, slots=True)
class Referrals(Kind):
    """Up to :data:`MAX_REFERRALS` ``[name, address]`` arrays (a peer's name, 1..MAX_NAME
    characters, and the ``host:port`` it listens on, 1..MAX_ADDRESS), stored as tuples.
    Whether an address can be dialled is the mesh's question, not the codec's."""

    def reader(self, message: str, field: str) -> Reader:
        where = f"{message}: field {field!r}"
        refused = f"{message}: {field} must be [name, address] pairs"

        def read(value: object) -> tuple[tuple[str, str], ...]:
            pairs = []
            for item in _array(where, value, MAX_REFERRALS):
                if (
                    not isinstance(item, list)
                    or len(item) != 2
                    or not isinstance(item[0], str)
                    or not 0 < len(item[0]) <= MAX_NAME
                    or not isinstance(item[1], str)
                    or not 0 < len(item[1]) <= MAX_ADDRESS
                ):
                    raise ProtocolError(refused)
                pairs.append((item[0], item[1]))
            return tuple(pairs)

        return read

    def writer(self) -> Callable[[Any], object]:
        return lambda pairs: [list(pair) for pair in pairs]


@_message(session=True)
@dataclass(frozen=True, slots=True)
class Peers(Message):
    """The peers the sender is linked to now: ``[name, address]`` each (the recipient left
    out). Sent when a link is established and again when the sender's links change. A node
    that started after one of them left discovery (a draining node leaves DNS) learns it
    here, dials it, and counts it as a possible holder of actors until linked (see
    :mod:`handoff._referrals`)."""

    TYPE: ClassVar[int] = 36
    peers: Annotated[tuple[tuple[str, str], ...], Referrals()]


SESSION_MESSAGES: frozenset[type[Message]] = frozenset(_SESSION)
"""Messages that an established connection hands to the layer above."""


def decode_message(obj: object) -> Message:
    """Turn one decoded frame into a message, or raise :class:`ProtocolError`."""
    if not isinstance(obj, list) or not obj:
        raise ProtocolError("a message must be a non-empty array")
    code = obj[0]
    if not isinstance(code, int) or isinstance(code, bool):
        raise ProtocolError("message type must be an integer")
    cls = MESSAGE_TYPES.get(code)
    if cls is None:
        raise ProtocolError(f"unknown message type {code}")
    return cls.from_fields(obj[1:])
