"""Message types: every one round-trips; every malformed field list is a ProtocolError."""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handoff._errors import ProtocolError
from handoff.protocol import (
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
    Done,
    End,
    FrameDecoder,
    Goodbye,
    Heartbeat,
    Hello,
    Info,
    Message,
    NamespaceVersion,
    NodeState,
    Offer,
    Peers,
    Refuse,
    Reject,
    StateChange,
    Tally,
    Welcome,
    decode_message,
    encode_frame,
)
from handoff.protocol._messages import (
    MAGIC,
    MAX_COUNT,
    MAX_CREDIT,
    MAX_NAME,
    MAX_NAMESPACES,
    MAX_REASON,
    MAX_REFERRALS,
    MAX_STREAM,
    MAX_TALLY_RECORDS,
    MAX_VERSIONS,
    NONCE_SIZE,
    PROOF_SIZE,
    Integer,
    _message,
)

MAX_DROPPED = 64
MAX_KIND = 64
MAX_SCHEMA = 2**31 - 1

# -- valid messages ------------------------------------------------------------------------

names = st.text(min_size=1, max_size=MAX_NAME)
finite = st.floats(allow_nan=False, allow_infinity=False)
states = st.sampled_from(NodeState)
blobs32 = st.binary(min_size=NONCE_SIZE, max_size=NONCE_SIZE)
namespace_versions = st.builds(
    NamespaceVersion, names, st.integers(min_value=0, max_value=2**31 - 1)
)
streams = st.integers(1, MAX_STREAM)
counts = st.integers(0, MAX_COUNT)
reasons = st.text(min_size=1, max_size=MAX_REASON)
payloads = st.binary(min_size=1, max_size=4096)
ages = st.floats(min_value=0, allow_nan=False, allow_infinity=False)
dropped_pairs = st.lists(st.tuples(names, counts), max_size=MAX_DROPPED).map(tuple)

STRATEGIES: dict[type[Message], st.SearchStrategy[Message]] = {
    Hello: st.builds(
        Hello,
        st.lists(st.integers(1, 2**16 - 1), max_size=MAX_VERSIONS).map(tuple),
        names,
        names,
        names,
        blobs32,
    ),
    Welcome: st.builds(
        Welcome, st.integers(1, 2**16 - 1), names, names, names, blobs32, blobs32, blobs32
    ),
    Auth: st.builds(Auth, blobs32, st.binary(min_size=PROOF_SIZE, max_size=PROOF_SIZE)),
    Info: st.builds(
        Info,
        names,
        finite,
        states,
        st.text(max_size=MAX_NAME),
        st.lists(namespace_versions, max_size=20).map(tuple),
        finite,
    ),
    Reject: st.builds(Reject, st.text(min_size=1, max_size=64), st.text(max_size=MAX_REASON)),
    Heartbeat: st.just(Heartbeat()),
    StateChange: st.builds(StateChange, states),
    Goodbye: st.builds(Goodbye, st.text(max_size=MAX_REASON)),
    Offer: st.builds(
        Offer,
        streams,
        names,
        st.text(min_size=1, max_size=MAX_KIND),
        st.integers(0, MAX_SCHEMA),
        counts,
    ),
    Accept: st.builds(Accept, streams, st.integers(1, MAX_CREDIT)),
    Refuse: st.builds(Refuse, streams, reasons),
    Chunk: st.builds(Chunk, streams, counts, st.integers(1, MAX_COUNT), ages, payloads),
    Ack: st.builds(Ack, streams, counts, counts, counts, dropped_pairs, st.integers(0, MAX_CREDIT)),
    End: st.builds(End, streams, counts),
    Cancel: st.builds(Cancel, streams, reasons),
    Closed: st.builds(Closed, streams),
    Done: st.builds(Done, counts),
    Tally: st.builds(
        Tally,
        names,
        names,
        st.integers(1, MAX_COUNT),
        counts,
        st.integers(0, MAX_TALLY_RECORDS),
        payloads,
    ),
    ActorSend: st.builds(
        ActorSend,
        names,
        payloads,
        names,
        names,
        st.integers(1, MAX_COUNT),
        st.integers(1, MAX_COUNT),
        st.integers(1, MAX_COUNT),
        st.integers(0, 1),
        st.integers(0, 64),
        payloads,
    ),
    ActorReply: st.builds(
        ActorReply,
        names,
        payloads,
        st.integers(1, MAX_COUNT),
        st.integers(1, MAX_COUNT),
        st.integers(0, 7),
        st.text(max_size=MAX_NAME),
        payloads,
    ),
    ActorWhere: st.builds(ActorWhere, names, payloads, st.integers(1, MAX_COUNT)),
    ActorHere: st.builds(
        ActorHere, names, payloads, st.integers(1, MAX_COUNT), st.integers(0, 2), names
    ),
    ActorMove: st.builds(
        ActorMove,
        names,
        payloads,
        st.integers(1, MAX_COUNT),
        st.integers(1, MAX_COUNT),
        st.integers(0, MAX_SCHEMA),
        payloads,
    ),
    ActorMoved: st.builds(
        ActorMoved, names, payloads, st.integers(1, MAX_COUNT), st.integers(0, 1), reasons
    ),
    Peers: st.lists(st.tuples(names, st.text(min_size=1, max_size=300)), max_size=5).map(
        lambda pairs: Peers(tuple(pairs))
    ),
}
any_message = st.one_of(*STRATEGIES.values())

NONCE = bytes(range(NONCE_SIZE))
SAMPLES: dict[type[Message], Message] = {
    Hello: Hello((1, 2), "shop", "node-a", "inc-1", NONCE),
    Welcome: Welcome(1, "shop", "node-b", "inc-2", NONCE, bytes(32), NONCE[::-1]),
    Auth: Auth(bytes(32), NONCE),
    Info: Info(
        "v1.2.3",
        1_700_000_000.5,
        NodeState.DRAINING,
        "10.0.0.1:4370",
        (NamespaceVersion("users", 2), NamespaceVersion("usage", 0)),
        1_700_000_001.25,
    ),
    Reject: Reject("auth", "no"),
    Heartbeat: Heartbeat(),
    StateChange: StateChange(NodeState.SERVING),
    Goodbye: Goodbye("bye"),
    Offer: Offer(7, "users", "cachetools.TTLCache", 2, 10_000),
    Accept: Accept(7, 16),
    Refuse: Refuse(7, "namespace 'users' is not tracked here"),
    Chunk: Chunk(7, 3, 2, 0.25, b"\x92\xa1a\xa1b"),
    Ack: Ack(7, 3, 1, 0, (("expired", 1),), 15),
    End: End(7, 10_000),
    Cancel: Cancel(7, "drain deadline"),
    Closed: Closed(7),
    Done: Done(10_000),
    Tally: Tally("usage", "inc-1", 9, 0, 1, b"\x91\x93\xa4page\x0a\xc0"),
    ActorSend: ActorSend("rooms", b"\xa2r1", "inc-1", "node-a", 1, 5, 4, 1, 0, b"\xa4ping"),
    ActorReply: ActorReply("rooms", b"\xa2r1", 1, 5, 3, "node-b", b"\xc0"),
    ActorWhere: ActorWhere("rooms", b"\xa2r1", 12),
    ActorHere: ActorHere("rooms", b"\xa2r1", 12, 1, "node-b"),
    ActorMove: ActorMove("rooms", b"\xa2r1", 3, 2, 1, b"\x93\xc0\x90\x90"),
    ActorMoved: ActorMoved("rooms", b"\xa2r1", 3, 0, "draining"),
    Peers: Peers((("node-b", "10.0.0.2:4370"),)),
}


def test_every_message_type_is_covered() -> None:
    assert set(STRATEGIES) == set(MESSAGE_TYPES.values())
    assert set(SAMPLES) == set(MESSAGE_TYPES.values())


def test_session_messages_are_the_new_types() -> None:
    streams = {Offer, Accept, Refuse, Chunk, Ack, End, Cancel, Closed, Done, Tally}
    actors = {ActorSend, ActorReply, ActorWhere, ActorHere, ActorMove, ActorMoved}
    assert streams | actors | {Peers} == SESSION_MESSAGES
    assert SESSION_MESSAGES.issubset(MESSAGE_TYPES.values())
    assert sorted(cls.TYPE for cls in SESSION_MESSAGES) == [*range(16, 26), *range(30, 37)]


def test_type_codes_are_unique_and_registered() -> None:
    for code, cls in MESSAGE_TYPES.items():
        assert code == cls.TYPE
    assert len({cls.TYPE for cls in MESSAGE_TYPES.values()}) == len(MESSAGE_TYPES)


@pytest.mark.parametrize("cls", list(SAMPLES), ids=lambda cls: cls.__name__)
def test_sample_round_trips(cls: type[Message]) -> None:
    message = SAMPLES[cls]
    wire = message.to_wire()
    assert wire[0] == cls.TYPE
    assert decode_message(wire) == message


@given(any_message)
@settings(max_examples=300)
def test_round_trip_through_to_wire(message: Message) -> None:
    decoded = decode_message(message.to_wire())
    assert decoded == message
    assert type(decoded) is type(message)


@given(any_message)
@settings(max_examples=200)
def test_round_trip_through_a_frame(message: Message) -> None:
    decoder = FrameDecoder(1 << 20, 32)
    decoder.feed(encode_frame(message.to_wire()))
    assert decode_message(decoder.next_object()) == message


def test_hello_magic_is_on_the_wire() -> None:
    assert SAMPLES[Hello].to_wire()[1] == MAGIC


# SAMPLES byte for byte on the wire: a change here breaks talking to peers of other releases.
GOLDEN_FRAMES: dict[type[Message], str] = {
    Hello: "000000469701ac7761726d2d68616e646f6666920102a473686f70a66e6f64652d61a5696e632d31"
    "c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    Welcome: "0000007b980201a473686f70a66e6f64652d62a5696e632d32c420000102030405060708090a0b0c"
    "0d0e0f101112131415161718191a1b1c1d1e1fc420000000000000000000000000000000000000000000000000"
    "0000000000000000c4201f1e1d1c1b1a191817161514131211100f0e0d0c0b0a09080706050403020100",
    Auth: "000000469303c4200000000000000000000000000000000000000000000000000000000000000000c420"
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    Info: "000000439704a676312e322e33cb41d954fc40200000a8647261696e696e67ad31302e302e302e313a"
    "343337309292a575736572730292a5757361676500cb41d954fc40500000",
    Reject: "0000000a9305a461757468a26e6f",
    Heartbeat: "000000029106",
    StateChange: "0000000a9207a773657276696e67",
    Goodbye: "000000069208a3627965",
    Offer: "00000021961007a57573657273b36361636865746f6f6c732e54544c436163686502cd2710",
    Accept: "0000000493110710",
    Refuse: "0000002a931207d9256e616d6573706163652027757365727327206973206e6f7420747261636b65"
    "642068657265",
    Chunk: "000000159613070302cb3fd0000000000000c40592a161a162",
    Ack: "000000129714070301009192a765787069726564010f",
    End: "00000006931507cd2710",
    Cancel: "00000012931607ae647261696e20646561646c696e65",
    Closed: "00000003921807",
    Done: "000000059217cd2710",
    Tally: "0000001c9719a57573616765a5696e632d31090001c4099193a4706167650ac0",
    ActorSend: "000000269b1ea5726f6f6d73c403a27231a5696e632d31a66e6f64652d610105040100c405"
    "a470696e67",
    ActorReply: "0000001a981fa5726f6f6d73c403a27231010503a66e6f64652d62c401c0",
    ActorWhere: "0000000e9420a5726f6f6d73c403a272310c",
    ActorHere: "000000169621a5726f6f6d73c403a272310c01a66e6f64652d62",
    ActorMove: "000000169722a5726f6f6d73c403a27231030201c40493c09090",
    ActorMoved: "000000189623a5726f6f6d73c403a272310300a8647261696e696e67",
    Peers: "0000001992249192a66e6f64652d62ad31302e302e302e323a34333730",
}


@pytest.mark.parametrize("cls", list(SAMPLES), ids=lambda cls: cls.__name__)
def test_wire_format_is_pinned(cls: type[Message]) -> None:
    frame = encode_frame(SAMPLES[cls].to_wire())
    assert frame.hex() == GOLDEN_FRAMES[cls]
    decoder = FrameDecoder(1 << 20, 32)
    decoder.feed(bytes.fromhex(GOLDEN_FRAMES[cls]))
    assert decode_message(decoder.next_object()) == SAMPLES[cls]


def test_fields_are_the_wire_form_without_the_type_code() -> None:
    for message in SAMPLES.values():
        assert message.fields() == message.to_wire()[1:]
        assert type(message).from_fields(message.fields()) == message


def test_a_message_field_without_a_wire_kind_is_refused_at_definition() -> None:
    with pytest.raises(TypeError, match="wire kind"):

        @_message()
        @dataclasses.dataclass(frozen=True, slots=True)
        class Unkinded(Message):
            TYPE: ClassVar[int] = 200
            stream: int

    assert 200 not in MESSAGE_TYPES


def test_a_taken_type_code_is_refused_at_definition() -> None:
    with pytest.raises(TypeError, match="taken"):

        @_message()
        @dataclasses.dataclass(frozen=True, slots=True)
        class Twin(Message):
            TYPE: ClassVar[int] = Chunk.TYPE
            stream: Annotated[int, Integer(1, 2)]

    assert MESSAGE_TYPES[Chunk.TYPE] is Chunk


def test_integral_float_fields_come_back_as_floats() -> None:
    wire = SAMPLES[Info].to_wire()
    wire[2] = 5  # started_at as an int on the wire
    info = decode_message(wire)
    assert isinstance(info, Info)
    assert info.started_at == 5.0
    assert type(info.started_at) is float


# -- forward compatibility -----------------------------------------------------------------

wire_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=10,
)


@pytest.mark.parametrize("cls", [Hello, Reject], ids=lambda cls: cls.__name__)
@given(extra=st.lists(wire_values, min_size=1, max_size=5))
def test_hello_and_reject_tolerate_extra_fields(cls: type[Message], extra: list[Any]) -> None:
    message = SAMPLES[cls]
    assert decode_message([*message.to_wire(), *extra]) == message


@pytest.mark.parametrize(
    "cls",
    [cls for cls in SAMPLES if cls not in (Hello, Reject)],
    ids=lambda cls: cls.__name__,
)
@given(extra=st.lists(wire_values, min_size=1, max_size=5))
def test_other_messages_refuse_extra_fields(cls: type[Message], extra: list[Any]) -> None:
    with pytest.raises(ProtocolError):
        decode_message([*SAMPLES[cls].to_wire(), *extra])


@pytest.mark.parametrize(
    "cls",
    [cls for cls in SAMPLES if cls is not Heartbeat],
    ids=lambda cls: cls.__name__,
)
def test_missing_fields_refused(cls: type[Message]) -> None:
    wire = SAMPLES[cls].to_wire()
    for keep in range(1, len(wire)):
        with pytest.raises(ProtocolError, match="missing field"):
            decode_message(wire[:keep])


# -- malformed fields ----------------------------------------------------------------------


def _not(*types: type) -> st.SearchStrategy[Any]:
    """Wire values of none of ``types`` (bool counts as its own type, not as int)."""

    def keep(value: Any) -> bool:
        if isinstance(value, bool):
            return bool not in types
        return not isinstance(value, types)

    return wire_values.filter(keep)


def _texts(max_len: int, *, empty_ok: bool) -> st.SearchStrategy[Any]:
    bad = _not(str) | st.text(min_size=max_len + 1, max_size=max_len + 40)
    return bad if empty_ok else bad | st.just("")


bad_name = _texts(MAX_NAME, empty_ok=False)
bad_address = _texts(MAX_NAME, empty_ok=True)
bad_code = _texts(64, empty_ok=False)
bad_reason = _texts(MAX_REASON, empty_ok=True)
bad_magic = _not(str) | st.text(max_size=20).filter(lambda text: text != MAGIC)
bad_int16 = (
    _not(int)
    | st.booleans()
    | st.integers(max_value=0)
    | st.integers(min_value=2**16)
    | st.just(1.0)
)
bad_version_item = (
    _not(int) | st.booleans() | st.integers(max_value=0) | st.integers(min_value=2**16)
)
bad_versions = (
    _not(list)
    | st.lists(st.integers(1, 100), min_size=MAX_VERSIONS + 1, max_size=MAX_VERSIONS + 5)
    | st.tuples(st.lists(st.integers(1, 100), max_size=3), bad_version_item).map(
        lambda pair: [*pair[0], pair[1]]
    )
)
bad_blob32 = (
    _not(bytes)
    | st.binary(max_size=NONCE_SIZE - 1)
    | st.binary(min_size=NONCE_SIZE + 1, max_size=NONCE_SIZE + 8)
    | st.just("x" * NONCE_SIZE)
    | st.just(list(range(NONCE_SIZE)))
)
bad_number = _not(int, float) | st.booleans() | st.sampled_from([math.nan, math.inf, -math.inf])
bad_state = _not(str) | st.text(max_size=20).filter(
    lambda text: text not in {s.value for s in NodeState}
)
bad_namespace_item: st.SearchStrategy[Any] = (
    _not(list)
    | st.just([])
    | st.just(["users"])
    | st.just(["users", 1, 2])
    | st.tuples(bad_name, st.integers(0, 10)).map(list)
    | st.tuples(
        st.just("users"),
        _not(int) | st.booleans() | st.integers(max_value=-1) | st.integers(min_value=2**31),
    ).map(list)
)
bad_stream = (
    _not(int)
    | st.booleans()
    | st.integers(max_value=0)
    | st.integers(min_value=MAX_STREAM + 1)
    | st.just(1.0)
)
bad_count = (
    _not(int)
    | st.booleans()
    | st.integers(max_value=-1)
    | st.integers(min_value=MAX_COUNT + 1)
    | st.just(0.0)
)
bad_records = bad_count | st.just(0)  # a Chunk carries at least one record
bad_schema = (
    _not(int) | st.booleans() | st.integers(max_value=-1) | st.integers(min_value=MAX_SCHEMA + 1)
)
bad_accept_credit = (
    _not(int) | st.booleans() | st.integers(max_value=0) | st.integers(min_value=MAX_CREDIT + 1)
)
bad_ack_credit = (
    _not(int) | st.booleans() | st.integers(max_value=-1) | st.integers(min_value=MAX_CREDIT + 1)
)
bad_tally_records = (
    _not(int)
    | st.booleans()
    | st.integers(max_value=-1)
    | st.integers(min_value=MAX_TALLY_RECORDS + 1)
)
bad_kind = _texts(MAX_KIND, empty_ok=False)
bad_flag = _not(int) | st.booleans() | st.integers(max_value=-1) | st.integers(min_value=2)
bad_hops = _not(int) | st.booleans() | st.integers(max_value=-1) | st.integers(min_value=65)
bad_status = _not(int) | st.booleans() | st.integers(max_value=-1) | st.integers(min_value=8)
bad_answer = _not(int) | st.booleans() | st.integers(max_value=-1) | st.integers(min_value=3)

bad_session_reason = _texts(MAX_REASON, empty_ok=False)
bad_age = bad_number | st.floats(max_value=-1e-300) | st.integers(max_value=-1)
bad_payload = _not(bytes) | st.just(b"") | st.just("payload") | st.just([1, 2, 3])
bad_dropped_item: st.SearchStrategy[Any] = (
    _not(list)
    | st.just([])
    | st.just(["expired"])
    | st.just(["expired", 1, 2])
    | st.just([1, "expired"])
    | st.tuples(bad_name, st.integers(0, 10)).map(list)
    | st.tuples(
        st.just("expired"),
        _not(int)
        | st.booleans()
        | st.integers(max_value=-1)
        | st.integers(min_value=MAX_COUNT + 1),
    ).map(list)
)
bad_dropped = (
    _not(list)
    | st.just([["expired", 1]] * (MAX_DROPPED + 1))
    | st.tuples(st.lists(st.tuples(names, counts), max_size=3), bad_dropped_item).map(
        lambda pair: [*([reason, count] for reason, count in pair[0]), pair[1]]
    )
)
bad_namespaces = (
    _not(list)
    | st.just([["n", 1]] * (MAX_NAMESPACES + 1))
    | st.tuples(st.lists(namespace_versions, max_size=3), bad_namespace_item).map(
        lambda pair: [*([ns.name, ns.version] for ns in pair[0]), pair[1]]
    )
)

bad_referrals = (
    _not(list)
    | st.just([["n", "h:1"]] * (MAX_REFERRALS + 1))
    | st.sampled_from(
        [[[]], [["n"]], [["n", "h:1", 2]], [["", "h:1"]], [["n", ""]], [["n", 1]], [[1, "h"]]]
    )
    | st.just([["n", "h" * 301]])
    | st.just([["n" * (MAX_NAME + 1), "h:1"]])
)

# For each message: a strategy of invalid values for each of its fields, in wire order.
BAD_FIELDS: dict[type[Message], list[st.SearchStrategy[Any]]] = {
    Hello: [bad_magic, bad_versions, bad_name, bad_name, bad_name, bad_blob32],
    Welcome: [bad_int16, bad_name, bad_name, bad_name, bad_blob32, bad_blob32, bad_blob32],
    Auth: [bad_blob32, bad_blob32],
    Info: [bad_name, bad_number, bad_state, bad_address, bad_namespaces, bad_number],
    Reject: [bad_code, bad_reason],
    Heartbeat: [],
    StateChange: [bad_state],
    Goodbye: [bad_reason],
    Offer: [bad_stream, bad_name, bad_kind, bad_schema, bad_count],
    Accept: [bad_stream, bad_accept_credit],
    Refuse: [bad_stream, bad_session_reason],
    Chunk: [bad_stream, bad_count, bad_records, bad_age, bad_payload],
    Ack: [bad_stream, bad_count, bad_count, bad_count, bad_dropped, bad_ack_credit],
    End: [bad_stream, bad_count],
    Cancel: [bad_stream, bad_session_reason],
    Closed: [bad_stream],
    Done: [bad_count],
    Tally: [bad_name, bad_name, bad_records, bad_count, bad_tally_records, bad_payload],
    ActorSend: [
        bad_name,
        bad_payload,
        bad_name,
        bad_name,
        bad_records,
        bad_records,
        bad_records,
        bad_flag,
        bad_hops,
        bad_payload,
    ],
    ActorReply: [
        bad_name,
        bad_payload,
        bad_records,
        bad_records,
        bad_status,
        bad_address,
        bad_payload,
    ],
    ActorWhere: [bad_name, bad_payload, bad_records],
    ActorHere: [bad_name, bad_payload, bad_records, bad_answer, bad_address],
    ActorMove: [bad_name, bad_payload, bad_records, bad_records, bad_schema, bad_payload],
    ActorMoved: [bad_name, bad_payload, bad_records, bad_flag, bad_reason],
    Peers: [bad_referrals],
}


def test_bad_field_table_matches_the_wire_forms() -> None:
    assert set(BAD_FIELDS) == set(MESSAGE_TYPES.values())
    for cls, bad in BAD_FIELDS.items():
        assert len(bad) == len(SAMPLES[cls].to_wire()) - 1, cls.__name__


@given(st.data())
@settings(max_examples=400)
def test_one_bad_field_is_a_protocol_error(data: st.DataObject) -> None:
    cls = data.draw(st.sampled_from([cls for cls, bad in BAD_FIELDS.items() if bad]))
    message = data.draw(STRATEGIES[cls])
    wire = message.to_wire()
    index = data.draw(st.integers(0, len(BAD_FIELDS[cls]) - 1))
    wire[index + 1] = data.draw(BAD_FIELDS[cls][index])
    with pytest.raises(ProtocolError):
        decode_message(wire)


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        pytest.param(
            [Welcome.TYPE, True, "c", "n", "i", NONCE, NONCE, NONCE],
            "integer",
            id="welcome-bool-version",
        ),
        pytest.param(
            [Hello.TYPE, MAGIC, [True], "c", "n", "i", NONCE], "versions", id="hello-bool-version"
        ),
        pytest.param(
            [Info.TYPE, "r", True, "serving", "", [], 0.0], "number", id="info-bool-started-at"
        ),
        pytest.param(
            [Info.TYPE, "r", 0.0, "serving", "", [["ns", False]], 0.0],
            "namespaces",
            id="info-bool-namespace-version",
        ),
        pytest.param(
            [Info.TYPE, "r", 0.0, "serving", "", [], math.nan], "finite", id="info-nan-clock"
        ),
        pytest.param(
            [Info.TYPE, "r", math.inf, "serving", "", [], 0.0], "finite", id="info-inf-started"
        ),
        pytest.param(
            [Info.TYPE, "r", 0.0, "SERVING", "", [], 0.0], "unknown node state", id="info-state"
        ),
        pytest.param([StateChange.TYPE, "stopped"], "unknown node state", id="statechange-state"),
        pytest.param([Auth.TYPE, NONCE, NONCE[:31]], "32 bytes", id="auth-short-proof"),
        pytest.param(
            [Hello.TYPE, MAGIC, [1], "c", "n", "i", NONCE + b"!"], "32 bytes", id="hello-long-nonce"
        ),
        pytest.param(
            [Hello.TYPE, "cold-handoff", [1], "c", "n", "i", NONCE], "magic", id="hello-magic"
        ),
        pytest.param(
            [Hello.TYPE, MAGIC, [1], "c" * (MAX_NAME + 1), "n", "i", NONCE],
            "chars",
            id="hello-long-cluster",
        ),
        pytest.param([Goodbye.TYPE, "x" * (MAX_REASON + 1)], "chars", id="goodbye-long-reason"),
        pytest.param([Reject.TYPE, "", "reason"], "chars", id="reject-empty-code"),
        pytest.param([Heartbeat.TYPE, None], "fields", id="heartbeat-extra"),
        pytest.param([Offer.TYPE, True, "users", "k", 1, 1], "integer", id="offer-bool-stream"),
        pytest.param([Offer.TYPE, 0, "users", "k", 1, 1], "range", id="offer-stream-zero"),
        pytest.param(
            [Offer.TYPE, MAX_STREAM + 1, "users", "k", 1, 1], "range", id="offer-stream-too-big"
        ),
        pytest.param([Offer.TYPE, 1, "users", "k" * 65, 1, 1], "chars", id="offer-long-kind"),
        pytest.param([Offer.TYPE, 1, "users", "k", 1, -1], "range", id="offer-negative-records"),
        pytest.param([Accept.TYPE, 1, 0], "range", id="accept-zero-credit"),
        pytest.param([Accept.TYPE, 1, MAX_CREDIT + 1], "range", id="accept-credit-too-big"),
        pytest.param([Accept.TYPE, 1, False], "integer", id="accept-bool-credit"),
        pytest.param([Refuse.TYPE, 1, ""], "chars", id="refuse-empty-reason"),
        pytest.param([Chunk.TYPE, 1, 0, 1, 0.0, b""], "non-empty bytes", id="chunk-empty-payload"),
        pytest.param([Chunk.TYPE, 1, 0, 1, 0.0, "text"], "non-empty bytes", id="chunk-str-payload"),
        pytest.param([Chunk.TYPE, 1, 0, 0, 0.0, b"x"], "range", id="chunk-zero-records"),
        pytest.param([Chunk.TYPE, 1, MAX_COUNT + 1, 1, 0.0, b"x"], "range", id="chunk-seq-too-big"),
        pytest.param([Chunk.TYPE, 1, 0.0, 1, 0.0, b"x"], "integer", id="chunk-float-seq"),
        pytest.param([Chunk.TYPE, 1, 0, 1, -0.5, b"x"], "negative", id="chunk-negative-age"),
        pytest.param([Chunk.TYPE, 1, 0, 1, math.inf, b"x"], "finite", id="chunk-inf-age"),
        pytest.param([Chunk.TYPE, 1, 0, 1, math.nan, b"x"], "finite", id="chunk-nan-age"),
        pytest.param([Chunk.TYPE, 1, 0, 1, True, b"x"], "number", id="chunk-bool-age"),
        pytest.param([Ack.TYPE, 1, 0, 0, 0, [], -1], "range", id="ack-negative-credit"),
        pytest.param([Ack.TYPE, 1, 0, 0, 0, [], MAX_CREDIT + 1], "range", id="ack-credit-too-big"),
        pytest.param([Ack.TYPE, 1, 0, 0, 0, {}, 1], "array", id="ack-map-dropped"),
        pytest.param([Ack.TYPE, 1, 0, 0, 0, [["x", True]], 1], "pairs", id="ack-bool-count"),
        pytest.param([Ack.TYPE, 1, 0, 0, 0, [["", 1]], 1], "pairs", id="ack-empty-reason"),
        pytest.param([Ack.TYPE, 1, 0, 0, 0, [["x", -1]], 1], "pairs", id="ack-negative-count"),
        pytest.param([Ack.TYPE, 1, 0, 0, 0, [("x", 1)], 1], "pairs", id="ack-tuple-pair"),
        pytest.param(
            [Ack.TYPE, 1, 0, 0, 0, [["x", 1]] * (MAX_DROPPED + 1), 1],
            "over 64 items",
            id="ack-too-many-dropped",
        ),
        pytest.param([End.TYPE, 1, MAX_COUNT + 1], "range", id="end-records-too-big"),
        pytest.param([Cancel.TYPE, 1, "x" * (MAX_REASON + 1)], "chars", id="cancel-long-reason"),
        pytest.param([Cancel.TYPE, 1, "why", None], "fields", id="cancel-extra"),
        pytest.param([End.TYPE, 1], "missing field", id="end-missing-records"),
    ],
)
def test_specific_bad_fields(wire: list[Any], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_message(wire)


def test_limits_are_inclusive() -> None:
    longest = "n" * MAX_NAME
    hello = Hello(tuple(range(1, MAX_VERSIONS + 1)), longest, longest, longest, NONCE)
    assert decode_message(hello.to_wire()) == hello
    goodbye = Goodbye("r" * MAX_REASON)
    assert decode_message(goodbye.to_wire()) == goodbye
    info = Info("r", 0.0, NodeState.SERVING, "", (NamespaceVersion("n", 0),) * MAX_NAMESPACES, 0)
    assert decode_message(info.to_wire()) == info


def test_integral_chunk_age_comes_back_as_a_float() -> None:
    chunk = decode_message([Chunk.TYPE, 1, 0, 1, 3, b"x"])
    assert isinstance(chunk, Chunk)
    assert chunk.age == 3.0
    assert type(chunk.age) is float


def test_session_limits_are_inclusive() -> None:
    longest_reason = "r" * MAX_REASON
    dropped = (("n" * MAX_NAME, MAX_COUNT),) * MAX_DROPPED
    for message in (
        Offer(MAX_STREAM, "n" * MAX_NAME, "k" * MAX_KIND, MAX_SCHEMA, MAX_COUNT),
        Offer(1, "n", "k", 0, 0),
        Accept(MAX_STREAM, MAX_CREDIT),
        Accept(1, 1),
        Refuse(1, longest_reason),
        Chunk(MAX_STREAM, MAX_COUNT, MAX_COUNT, 1e9, b"x"),
        Chunk(1, 0, 1, 0.0, b"x"),
        Ack(MAX_STREAM, MAX_COUNT, MAX_COUNT, MAX_COUNT, dropped, MAX_CREDIT),
        Ack(1, 0, 0, 0, (), 0),
        End(MAX_STREAM, MAX_COUNT),
        End(1, 0),
        Cancel(1, longest_reason),
    ):
        assert decode_message(message.to_wire()) == message


# -- type codes and envelopes --------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 9, 10, 15, 26, 29, 37, 99, 255, -1, 2**63, 2**64 - 1])
def test_unknown_type_code(code: int) -> None:
    with pytest.raises(ProtocolError, match="unknown message type"):
        decode_message([code])


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param([], id="empty-array"),
        pytest.param([True], id="bool-code"),
        pytest.param([True, MAGIC, [1], "c", "n", "i", NONCE], id="bool-code-hello"),
        pytest.param([1.0, MAGIC, [1], "c", "n", "i", NONCE], id="float-code"),
        pytest.param(["1"], id="str-code"),
        pytest.param([None], id="nil-code"),
        pytest.param({"type": 1}, id="map"),
        pytest.param("hello", id="str"),
        pytest.param(6, id="int"),
        pytest.param(b"\x06", id="bytes"),
        pytest.param(None, id="nil"),
    ],
)
def test_bad_envelopes(obj: object) -> None:
    with pytest.raises(ProtocolError):
        decode_message(obj)


@given(wire_values)
@settings(max_examples=300)
def test_arbitrary_objects_give_a_message_or_a_protocol_error(obj: Any) -> None:
    try:
        message = decode_message(obj)
    except ProtocolError:
        return
    assert isinstance(message, Message)


@given(st.sampled_from(sorted(MESSAGE_TYPES)), st.lists(wire_values, max_size=8))
@settings(max_examples=200)
def test_arbitrary_fields_give_a_message_or_a_protocol_error(code: int, fields: list[Any]) -> None:
    try:
        message = decode_message([code, *fields])
    except ProtocolError:
        return
    assert type(message) is MESSAGE_TYPES[code]
