"""The record codec: exact round trips, per-record failures, and bounded, hostile-proof decoding."""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import enum
import gc
import math
import os
import struct
import threading
import uuid
import zoneinfo
from collections import OrderedDict, defaultdict, namedtuple
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handoff._codec import MAX_BIGINT_BITS, Codec, _check_decimal, _find_problem
from handoff._errors import ProtocolError, RecordDecodeError, RecordEncodeError

# Slow examples (big generated records): fewer in the default run, the suite's time budget.
EXAMPLES = 60 if os.environ.get("HANDOFF_DEEP_TESTS") == "1" else 20

try:
    BERLIN: zoneinfo.ZoneInfo | None = zoneinfo.ZoneInfo("Europe/Berlin")
except zoneinfo.ZoneInfoNotFoundError:  # pragma: no cover - no tz database on this machine
    BERLIN = None
needs_tzdata = pytest.mark.skipif(BERLIN is None, reason="no time zone database")


# -- strict comparison: == alone would accept a list for a tuple, a set for a frozenset, ------
# -- 0.0 for -0.0, and two aware datetimes in different zones at the same instant. ------------


def assert_same(a: Any, b: Any) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, float | complex | decimal.Decimal):
        assert repr(a) == repr(b)
    elif isinstance(a, dt.datetime | dt.time):
        assert a.replace(tzinfo=None) == b.replace(tzinfo=None)
        assert a.fold == b.fold
        assert_same_tz(a.tzinfo, b.tzinfo)
    else:
        assert a == b


def assert_same_tz(a: dt.tzinfo | None, b: dt.tzinfo | None) -> None:
    assert type(a) is type(b)
    if isinstance(a, zoneinfo.ZoneInfo):
        assert isinstance(b, zoneinfo.ZoneInfo)
        assert a.key == b.key
    elif a is not None:
        assert b is not None
        assert a.utcoffset(None) == b.utcoffset(None)
        assert a.tzname(None) == b.tzname(None)


# -- strategies -------------------------------------------------------------------------------

fixed_offsets = st.builds(
    dt.timezone,
    st.timedeltas(min_value=dt.timedelta(hours=-23, minutes=-59), max_value=dt.timedelta(hours=23)),
) | st.builds(
    dt.timezone,
    st.timedeltas(min_value=dt.timedelta(hours=-12), max_value=dt.timedelta(hours=12)),
    st.text(min_size=1, max_size=8),
)
zones: st.SearchStrategy[dt.tzinfo | None] = st.none() | st.just(dt.UTC) | fixed_offsets
if BERLIN is not None:
    zones = zones | st.timezones()

big_ints = st.builds(
    lambda bits, low, sign: sign * ((1 << bits) - low),
    st.integers(60, MAX_BIGINT_BITS - 1),
    st.integers(1, 1000),
    st.sampled_from([1, -1]),
)
hashable_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | big_ints
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.datetimes(timezones=zones, allow_imaginary=False)
    | st.dates()
    | st.times(timezones=zones)
    | st.timedeltas()
    | st.decimals(allow_nan=False).filter(lambda d: _check_decimal(d) is None)
    | st.uuids()
    | st.complex_numbers(allow_nan=False)
)
# Quiet NaNs hash by identity and never equal themselves: values only. (Signalling NaNs and
# enormous Decimals are refused: tests/test_hostile_data.py.)
unhashable_scalars = st.decimals(allow_nan=True).filter(lambda d: _check_decimal(d) is None)
hashables = st.recursive(
    hashable_scalars,
    lambda children: (
        st.lists(children, max_size=4).map(tuple) | st.frozensets(children, max_size=4)
    ),
    max_leaves=10,
)
values = st.recursive(
    hashable_scalars | unhashable_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(hashables, children, max_size=4)
        | st.sets(hashables, max_size=4)
        | st.frozensets(hashables, max_size=4)
    ),
    max_leaves=20,
)
records = st.lists(st.tuples(hashables, values, values), max_size=8)


# -- round trips ------------------------------------------------------------------------------


@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow])
@given(records)
def test_records_round_trip_exactly(recs: list[tuple[Any, Any, Any]]) -> None:
    codec = Codec()
    payload, failed = codec.encode_records(recs)
    assert failed == []
    decoded = codec.decode_records(payload, max_records=len(recs))
    assert_same(decoded, recs)


@given(values)
def test_single_values_round_trip_exactly(value: Any) -> None:
    codec = Codec()
    assert_same(codec.unpackb(codec.packb(value)), value)


def test_plain_records_fast_path_matches_per_record_encoding() -> None:
    codec = Codec()
    recs = [(f"key-{i}", "v" * 100, float(i)) for i in range(1000)]
    payload, failed = codec.encode_records(recs)
    assert failed == []
    assert codec.decode_records(payload, max_records=1000) == recs
    # The same payload a record at a time (what the fallback produces).
    one_by_one = msgpack.packb([list(r) for r in recs], use_bin_type=True)
    assert payload == one_by_one


def test_tuples_stay_tuples_including_dict_keys() -> None:
    codec = Codec()
    value = {(1, "a"): [(2, (3,)), {4, 5}, frozenset({(6, 7)})], (): ()}
    (record,) = codec.decode_records(
        codec.encode_records([((1, 2), value, None)])[0], max_records=1
    )
    assert_same(record, ((1, 2), value, None))


def test_datetimes_keep_their_zone() -> None:
    codec = Codec()
    utc = codec.unpackb(codec.packb(dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC)))
    assert isinstance(utc, dt.datetime)
    assert utc.tzinfo is dt.UTC
    named = dt.timezone(dt.timedelta(hours=5, minutes=30), "IST")
    aware = dt.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=named)
    back = codec.unpackb(codec.packb(aware))
    assert isinstance(back, dt.datetime)
    assert back.tzname() == "IST"
    assert back.utcoffset() == dt.timedelta(hours=5, minutes=30)
    unnamed = dt.datetime(2024, 5, 1, tzinfo=dt.timezone(dt.timedelta(seconds=-3601)))
    assert_same(codec.unpackb(codec.packb(unnamed)), unnamed)
    naive = dt.datetime(1, 1, 1)
    assert_same(codec.unpackb(codec.packb(naive)), naive)


@needs_tzdata
def test_zoneinfo_by_key_and_fold() -> None:
    codec = Codec()
    # 02:30 on the autumn change happens twice in Berlin: fold tells which.
    ambiguous = dt.datetime(2024, 10, 27, 2, 30, tzinfo=BERLIN, fold=1)
    back = codec.unpackb(codec.packb(ambiguous))
    assert isinstance(back, dt.datetime)
    assert back.tzinfo is BERLIN
    assert back.fold == 1
    assert back.utcoffset() == dt.timedelta(hours=1)
    timed = dt.time(2, 30, tzinfo=BERLIN, fold=1)
    assert_same(codec.unpackb(codec.packb(timed)), timed)


def test_special_numbers() -> None:
    codec = Codec()
    for number in (2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 2**MAX_BIGINT_BITS - 1, -(2**700)):
        assert_same(codec.unpackb(codec.packb(number)), number)
    for dec in ("NaN", "-0", "1E+999", "-Infinity", "0.000001000"):
        assert_same(codec.unpackb(codec.packb(decimal.Decimal(dec))), decimal.Decimal(dec))
    nan = codec.unpackb(codec.packb(float("nan")))
    assert isinstance(nan, float)
    assert math.isnan(nan)
    assert_same(codec.unpackb(codec.packb(complex(-0.0, math.inf))), complex(-0.0, math.inf))


class Color(enum.StrEnum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Huge(enum.IntEnum):
    BIG = 2**70


Point = namedtuple("Point", "x y")


def test_subclasses_arrive_as_their_base_type() -> None:
    codec = Codec()
    value = [
        Color.RED,
        Level.HIGH,
        Huge.BIG,
        OrderedDict(b=1, a=2),
        defaultdict(list, a=[1]),
        Point(1, 2),
        bytearray(b"xy"),
        True,
    ]
    back = codec.unpackb(codec.packb(value))
    assert_same(back, ["red", 3, 2**70, {"b": 1, "a": 2}, {"a": [1]}, (1, 2), b"xy", True])


# -- user types -------------------------------------------------------------------------------


class Money:
    def __init__(self, cents: int) -> None:
        self.cents = cents

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Money) and type(other) is type(self) and other.cents == self.cents

    def __hash__(self) -> int:
        return hash(self.cents)


class Euro(Money):
    pass


def money_codec() -> Codec:
    codec = Codec()
    codec.register(
        Money, 64, lambda m: m.cents.to_bytes(8, "big"), lambda b: Money(int.from_bytes(b, "big"))
    )
    return codec


def test_registered_types_round_trip_and_cover_subclasses() -> None:
    codec = money_codec()
    assert codec.unpackb(codec.packb({"price": Money(250)})) == {"price": Money(250)}
    # Exact type first, then the MRO: Euro is encoded by Money's encoder until registered.
    assert codec.unpackb(codec.packb(Euro(5))) == Money(5)
    codec.register(Euro, 65, lambda m: str(m.cents).encode(), lambda b: Euro(int(b)))
    assert codec.unpackb(codec.packb(Euro(5))) == Euro(5)
    assert codec.unpackb(codec.packb(Money(5))) == Money(5)


def test_registration_is_checked() -> None:
    codec = money_codec()
    enc, dec = (lambda m: b""), (lambda b: None)
    with pytest.raises(ValueError, match=r"already registered for .*Money"):
        codec.register(Euro, 64, enc, dec)
    with pytest.raises(ValueError, match="Money already has an encoder"):
        codec.register(Money, 66, enc, dec)
    for code in (0, 1, 63, 128, -1):
        with pytest.raises(ValueError, match=r"64\.\.127"):
            codec.register(Euro, code, enc, dec)
    with pytest.raises(ValueError, match="built in"):
        codec.register(dt.datetime, 70, enc, dec)
    with pytest.raises(ValueError, match="natively"):
        codec.register(str, 70, enc, dec)


def test_user_decoder_failures_and_recursion_are_decode_errors() -> None:
    codec = Codec(max_depth=16)

    class Box:
        def __init__(self, inner: object) -> None:
            self.inner = inner

    codec.register(Box, 100, lambda b: codec.packb(b.inner), lambda data: Box(codec.unpackb(data)))
    box: object = 1
    for _ in range(10):
        box = Box(box)
    assert isinstance(codec.unpackb(codec.packb(box)), Box)
    # A hostile payload nests Box in Box far deeper than the limit.
    data = msgpack.packb(1)
    for _ in range(2000):
        data = msgpack.packb(msgpack.ExtType(100, data))
    with pytest.raises(RecordDecodeError, match="deeper than 16"):
        codec.unpackb(data)

    codec.register(Money, 101, lambda m: b"", lambda data: 1 / 0)
    with pytest.raises(RecordDecodeError, match="ZeroDivisionError"):
        codec.unpackb(codec.packb(Money(1)))


# -- records that cannot be encoded -----------------------------------------------------------


class Unknown:
    pass


def nested_lists(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_one_bad_record_is_left_out_with_its_reason() -> None:
    codec = Codec()
    bad = ("k2", {"x": Unknown()}, None)
    recs = [("k1", (1, 2), 3.0), bad, ("k3", "v", None)]
    payload, failed = codec.encode_records(recs)
    assert len(failed) == 1
    record, reason = failed[0]
    assert record is bad
    assert reason == (
        f"cannot encode value of type {__name__}.Unknown: register an encoder with Codec.register"
    )
    assert codec.decode_records(payload, max_records=3) == [recs[0], recs[2]]


def test_unencodable_values_each_name_their_reason() -> None:
    codec = Codec(max_depth=8)
    cyclic: list[Any] = []
    cyclic.append(cyclic)

    class HashableList(list[int]):
        def __hash__(self) -> int:  # type: ignore[override]
            return 1

    cases = {
        "too deep": ("k", nested_lists(9), None),
        "cycle": ("k", cyclic, None),
        "int too large": (2 ** (MAX_BIGINT_BITS + 1), 1, None),
        "surrogate": ("k", "\ud800", None),
        "ext type": ("k", [msgpack.ExtType(1, b"")], None),
        "key decodes unhashable": ("k", {(1, HashableList()): 1}, None),
        "other tz": ("k", dt.datetime(2024, 1, 1, tzinfo=OddZone()), None),
        "not a triple": ("k", "v"),
    }
    plain = ("ok", nested_lists(8), None)
    recs = [*cases.values(), plain]
    payload, failed = codec.encode_records(recs)  # type: ignore[arg-type]
    reasons = {id(record): reason for record, reason in failed}
    assert codec.decode_records(payload, max_records=10) == [plain]
    expected = {
        "too deep": "nests deeper than 8 levels",
        "cycle": "nests deeper than 8 levels",
        "int too large": "bits is more than the limit",
        "surrogate": "UnicodeEncodeError",
        "ext type": "msgpack.ExtType",
        "key decodes unhashable": "used as a dict key",
        "other tz": "tzinfo OddZone",
        "not a triple": "not a (key, value, meta) record",
    }
    for name, record in cases.items():
        assert expected[name] in reasons[id(record)], name
    with pytest.raises(RecordEncodeError, match="nests deeper"):
        codec.packb(cyclic)
    with pytest.raises(RecordEncodeError, match="Unknown"):
        codec.packb(Unknown())


class OddZone(dt.tzinfo):
    """A tzinfo of a kind the codec does not know (like pytz or dateutil zones)."""

    def utcoffset(self, d: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(0)

    def dst(self, d: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(0)

    def tzname(self, d: dt.datetime | None) -> str:
        return "ODD"


def test_checking_walks_shared_substructures_once() -> None:
    shared: list[Any] = [1]
    for _ in range(60):
        shared = [shared, shared]  # 2**60 paths through 61 objects
    assert _find_problem([shared], 64) is None
    assert "deeper than 50" in str(_find_problem([shared], 50))


# -- decoding is bounded and hostile-proof ----------------------------------------------------


def test_depth_limit_is_the_same_both_ways() -> None:
    codec = Codec(max_depth=8)
    ok = nested_lists(8)
    assert codec.unpackb(codec.packb(ok)) == ok
    raw = msgpack.packb([["k", nested_lists(9), None]])
    with pytest.raises(RecordDecodeError, match="deeper than 8"):
        codec.decode_records(raw, max_records=1)
    with pytest.raises(RecordDecodeError, match="deeper than 8"):
        codec.unpackb(msgpack.packb(nested_lists(9)))


def test_deeply_nested_extension_types_are_refused_without_recursion_error() -> None:
    codec = Codec()
    data = msgpack.packb([])
    for _ in range(50_000):
        data = msgpack.packb(msgpack.ExtType(1, data))
    with pytest.raises(RecordDecodeError):
        codec.decode_records(msgpack.packb([["k", msgpack.ExtType(1, data), None]]), max_records=1)
    deep_arrays = b"\x91" * 200_000 + b"\x90"
    with pytest.raises(RecordDecodeError):
        codec.unpackb(deep_arrays)


def test_record_count_is_checked_before_decoding() -> None:
    codec = Codec()
    payload, _ = codec.encode_records([("k", i, None) for i in range(100)])
    assert len(codec.decode_records(payload, max_records=100)) == 100
    with pytest.raises(RecordDecodeError, match=r"100 records .* limit is 99"):
        codec.decode_records(payload, max_records=99)
    # A header that claims four billion records is refused without reading further.
    with pytest.raises(RecordDecodeError, match="limit"):
        codec.decode_records(b"\xdd\xff\xff\xff\xff", max_records=10_000)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "empty"),
        (b"\x80", "not an array"),
        (msgpack.packb([["k", "v"]]), r"\[key, value, meta\]"),
        (msgpack.packb(["k", "v", None]), r"\[key, value, meta\]"),
        (
            msgpack.packb([["k", msgpack.ExtType(42, b""), None]]),
            "unknown msgpack extension type 42",
        ),
        (b"\x91\x93\xa1k\xd4\xfb\x00\xc0", "unknown msgpack extension type -5"),
        (
            msgpack.packb([["k", msgpack.ExtType(64, b""), None]]),
            "unknown msgpack extension type 64",
        ),
        (b"\x91\x93\xa1k\x81\x91\x01\x02\xc0", "unhashable"),
        (b"\x91\x93\xa1k\xa5ab", "incomplete"),
        (msgpack.packb([["k", 1, None]]) + b"\x00", "extra data"),
        (msgpack.packb([["k", msgpack.ExtType(2, msgpack.packb([[1]])), None]]), "unhashable"),
        (msgpack.packb([["k", msgpack.ExtType(1, msgpack.packb({})), None]]), "array"),
        (
            msgpack.packb([["k", msgpack.ExtType(4, b"\x00" * 12), None]]),
            "malformed extension type 4",
        ),
        (msgpack.packb([["k", msgpack.ExtType(9, b"short"), None]]), "malformed extension type 9"),
        (msgpack.packb([["k", msgpack.ExtType(8, b"nope"), None]]), "malformed extension type 8"),
        (msgpack.packb([["k", msgpack.ExtType(11, b""), None]]), "extension type 11"),
        (msgpack.packb([["k", msgpack.ExtType(11, b"\x01" * 2000), None]]), "extension type 11"),
    ],
)
def test_malformed_payloads_are_protocol_errors(payload: bytes, match: str) -> None:
    with pytest.raises(RecordDecodeError, match=match) as info:
        Codec().decode_records(payload, max_records=10)
    assert isinstance(info.value, ProtocolError)


@needs_tzdata
@pytest.mark.parametrize(
    "zone",
    [
        msgpack.packb("../../etc/passwd"),
        msgpack.packb("No/Such_Zone"),
        msgpack.packb(""),
        msgpack.packb([2**62, None]),
        msgpack.packb([0, 5]),
        msgpack.packb(msgpack.ExtType(4, b"")),
        b"\xc1",
    ],
)
def test_malformed_time_zones_are_protocol_errors(zone: bytes) -> None:
    fields = struct.pack(">HBBBBBIB", 2024, 1, 1, 0, 0, 0, 0, 0)
    payload = msgpack.packb([["k", msgpack.ExtType(4, fields + zone), None]])
    with pytest.raises(RecordDecodeError):
        Codec().decode_records(payload, max_records=1)


def decode_or_refuse(codec: Codec, payload: bytes) -> None:
    try:
        out = codec.decode_records(payload, max_records=1000)
    except RecordDecodeError:
        return
    assert all(type(r) is tuple and len(r) == 3 for r in out)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_another_exception(data: bytes) -> None:
    codec = money_codec()
    decode_or_refuse(codec, data)
    decode_or_refuse(codec, b"\x91\x93" + data)
    with contextlib.suppress(RecordDecodeError):
        codec.unpackb(data)


# Raw msgpack structures with extension types of every code, including the codec's own codes
# holding arbitrary (or arbitrarily structured) payloads.
raw_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=5)
ext_codes = st.sampled_from([*range(1, 12), 64, 100, 0, 12, 127])


def _ext(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    packed = children.map(lambda c: msgpack.packb(c, use_bin_type=True))
    return st.builds(msgpack.ExtType, ext_codes, st.binary(max_size=30) | packed)


raw_values = st.recursive(
    raw_scalars | st.builds(msgpack.ExtType, ext_codes, st.binary(max_size=30)),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(raw_scalars, children, max_size=3)
        | _ext(children)
    ),
    max_leaves=25,
)


@settings(max_examples=150)
@given(st.lists(st.lists(raw_values, min_size=2, max_size=4), max_size=4))
def test_random_structures_never_escape_as_another_exception(rows: list[Any]) -> None:
    codec = money_codec()
    payload = msgpack.packb(rows, use_bin_type=True)
    decode_or_refuse(codec, payload)


def decode_outcome(codec: Codec, payload: bytes, *, plain_first: bool) -> Any:
    """What decoding gives, or the error's message; ``plain_first`` tries the fast path."""
    codec._plain_hint = plain_first
    try:
        return codec.decode_records(payload, max_records=1000)
    except RecordDecodeError as exc:
        return f"refused: {exc}"


plain_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=5)
    | st.binary(max_size=5)
)
plain_rows = st.lists(st.lists(plain_scalars, min_size=3, max_size=3), max_size=5)
odd_rows = st.lists(
    st.lists(plain_scalars | raw_values, min_size=2, max_size=4)
    | plain_scalars
    | st.builds(msgpack.ExtType, ext_codes, st.binary(max_size=10)),
    max_size=4,
)


@settings(max_examples=200)
@given(st.one_of(plain_rows, odd_rows, st.lists(plain_scalars, max_size=3)))
def test_the_plain_fast_path_decodes_exactly_as_the_general_one(rows: Any) -> None:
    codec = money_codec()
    payload = msgpack.packb(rows, use_bin_type=True)
    fast = decode_outcome(codec, payload, plain_first=True)
    general = decode_outcome(codec, payload, plain_first=False)
    if isinstance(general, str):
        assert fast == general
    else:
        assert_same(fast, general)
        assert all(type(r) is tuple and len(r) == 3 for r in fast)


def test_plain_payloads_decode_fast_and_the_others_as_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    codec = Codec()
    plain = [("k", "v" * 100, 1.5), (1, b"x", None), (True, 2.0, -(2**63))]
    with_lists = [("k", [1, [2]], None), ("j", {"a": [3]}, 7)]
    encoded = {
        name: codec.encode_records(recs)[0] for name, recs in (("p", plain), ("l", with_lists))
    }
    for name in ("p", "l", "l", "p", "p", "l"):
        decoded = codec.decode_records(encoded[name], max_records=10)
        assert_same(decoded, plain if name == "p" else with_lists)
        # The fast path is tried first again once a payload held only scalars.
        assert codec._plain_hint is (name == "p")
    general = codec._unpack

    def no_general_path(data: bytes, level: int, **kwargs: Any) -> Any:
        assert data != encoded["p"], "a plain payload took the general path"
        return general(data, level, **kwargs)

    monkeypatch.setattr(codec, "_unpack", no_general_path)
    codec._plain_hint = True
    assert_same(codec.decode_records(encoded["p"], max_records=10), plain)
    # A record must be a msgpack array: a tuple extension type holding three fields is not.
    as_tuple = msgpack.packb([msgpack.ExtType(1, msgpack.packb(["k", 1, None]))])
    for plain_first in (True, False):
        assert "[key, value, meta]" in decode_outcome(codec, as_tuple, plain_first=plain_first)


def test_codec_is_usable_from_several_threads() -> None:
    codec = Codec()
    recs = [((i, (i, "x")), {"v": (i,)}, None) for i in range(200)]
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                payload, failed = codec.encode_records(recs)
                assert not failed
                assert codec.decode_records(payload, max_records=200) == recs
        except BaseException as exc:  # pragma: no cover - only on failure
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_uuid_and_dates() -> None:
    codec = Codec()
    value = (uuid.UUID(int=7), dt.date(9999, 12, 31), dt.timedelta(days=-999_999_999), dt.time())
    assert_same(codec.unpackb(codec.packb(value)), value)


def test_garbage_collector_is_paused_only_for_large_chunks_and_restored() -> None:
    seen: list[bool] = []

    def decode(data: bytes) -> Money:
        seen.append(gc.isenabled())
        return Money(int(data))

    def make(pause: bool) -> Codec:
        codec = Codec(pause_gc=pause)
        codec.register(Money, 64, lambda m: str(m.cents).encode(), decode)
        return codec

    big = [("k", i, None) for i in range(1000)] + [("m", Money(1), None)]
    small = big[-2:]
    codec = make(True)
    for recs, paused in ((big, True), (small, False)):
        seen.clear()
        payload, _ = codec.encode_records(recs)
        assert gc.isenabled()
        assert codec.decode_records(payload, max_records=2000) == recs
        assert seen == [not paused]
        assert gc.isenabled()
    hostile = codec.encode_records(big)[0][:-3]
    with pytest.raises(RecordDecodeError):
        codec.decode_records(hostile, max_records=2000)
    assert gc.isenabled()
    # An application that turned the collector off keeps it off.
    gc.disable()
    try:
        codec.decode_records(codec.encode_records(big)[0], max_records=2000)
        assert not gc.isenabled()
    finally:
        gc.enable()
    seen.clear()
    unpaused = make(False)
    unpaused.decode_records(unpaused.encode_records(big)[0], max_records=2000)
    assert seen == [True]
