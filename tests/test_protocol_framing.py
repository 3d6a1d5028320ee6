"""Frames: a 4-byte big-endian length, then one msgpack object, every bound checked early."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import msgpack
import msgpack.fallback
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handoff._errors import FrameTooLarge, ProtocolError
from handoff.protocol import FrameDecoder, check_depth, encode_frame

LIMIT = 64 * 1024
DEPTH = 32


def header(length: int) -> bytes:
    return struct.pack(">I", length)


def raw_frame(payload: bytes) -> bytes:
    return header(len(payload)) + payload


def drain(decoder: FrameDecoder) -> list[Any]:
    objects: list[Any] = []
    while (obj := decoder.next_object()) is not None:
        objects.append(obj)
    return objects


def nested_arrays(depth: int) -> bytes:
    """``depth`` arrays, each holding the next; the innermost is empty."""
    return b"\x91" * (depth - 1) + b"\x90"


def nested_maps(depth: int) -> bytes:
    """``depth`` maps ``{"k": {"k": ... {}}}``."""
    return b"\x81\xa1k" * (depth - 1) + b"\x80"


# Values msgpack carries natively and gives back unchanged (no tuples: they come back as lists).
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)
payloads = values.filter(lambda obj: obj is not None)


# -- encode / decode -----------------------------------------------------------------------


def test_encode_frame_is_length_prefixed_msgpack() -> None:
    frame = encode_frame([1, "two", b"\x03"])
    payload = msgpack.packb([1, "two", b"\x03"], use_bin_type=True)
    assert frame == header(len(payload)) + payload


@given(payloads)
def test_round_trip(obj: Any) -> None:
    decoder = FrameDecoder(1 << 20, 64)
    decoder.feed(encode_frame(obj))
    assert decoder.next_object() == obj
    assert decoder.next_object() is None
    assert decoder.buffered == 0


def test_round_trip_keeps_str_and_bytes_apart() -> None:
    decoder = FrameDecoder(LIMIT, DEPTH)
    decoder.feed(encode_frame(["text", b"bytes", {"k": b"v"}]))
    obj = decoder.next_object()
    assert obj == ["text", b"bytes", {"k": b"v"}]
    assert type(obj[0]) is str
    assert type(obj[1]) is bytes


def test_several_frames_in_one_feed() -> None:
    decoder = FrameDecoder(LIMIT, DEPTH)
    decoder.feed(encode_frame([1]) + encode_frame([2, 3]) + encode_frame("four"))
    assert drain(decoder) == [[1], [2, 3], "four"]
    assert decoder.buffered == 0


def test_incomplete_frame_waits_for_more() -> None:
    decoder = FrameDecoder(LIMIT, DEPTH)
    frame = encode_frame(["x" * 50])
    decoder.feed(frame[:-1])
    assert decoder.next_object() is None
    assert decoder.buffered == len(frame) - 1
    decoder.feed(frame[-1:])
    assert decoder.next_object() == ["x" * 50]


def test_header_alone_waits_for_payload() -> None:
    decoder = FrameDecoder(LIMIT, DEPTH)
    decoder.feed(header(10))
    assert decoder.next_object() is None
    assert decoder.buffered == 4


def test_empty_feed_is_harmless() -> None:
    decoder = FrameDecoder(LIMIT, DEPTH)
    decoder.feed(b"")
    assert decoder.next_object() is None
    assert decoder.buffered == 0


# -- sizes ---------------------------------------------------------------------------------


def test_four_gib_prefix_refused_after_four_bytes() -> None:
    decoder = FrameDecoder(LIMIT, DEPTH)
    for byte in b"\xff\xff\xff":
        decoder.feed(bytes([byte]))  # not yet a whole header: nothing to judge
    assert decoder.buffered == 3
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"\xff")
    assert decoder.buffered == 0


def test_four_gib_prefix_with_payload_bytes_buffers_nothing() -> None:
    decoder = FrameDecoder(LIMIT, DEPTH)
    with pytest.raises(FrameTooLarge, match="4294967295"):
        decoder.feed(b"\xff\xff\xff\xff" + b"A" * 1000)
    assert decoder.buffered == 0


def test_frame_at_limit_accepted_one_over_refused() -> None:
    # A bin8 payload: 2 bytes of msgpack header + data.
    at_limit = b"\xc4\xfe" + b"x" * 254
    assert len(at_limit) == 256
    decoder = FrameDecoder(256, DEPTH)
    decoder.feed(raw_frame(at_limit))
    assert decoder.next_object() == b"x" * 254
    with pytest.raises(FrameTooLarge):
        decoder.feed(header(257))
    assert decoder.buffered == 0


def test_oversized_frame_after_a_good_one_in_the_same_feed() -> None:
    decoder = FrameDecoder(64, DEPTH)
    decoder.feed(encode_frame([1]) + header(65) + b"junk")
    assert decoder.next_object() == [1]
    with pytest.raises(FrameTooLarge):
        decoder.next_object()
    assert decoder.buffered == 0


def test_frame_too_large_is_a_protocol_error() -> None:
    assert issubclass(FrameTooLarge, ProtocolError)


def test_zero_length_frame_refused() -> None:
    decoder = FrameDecoder(LIMIT, DEPTH)
    with pytest.raises(ProtocolError, match="empty"):
        decoder.feed(b"\x00\x00\x00\x00")


def test_nil_payload_refused() -> None:
    decoder = FrameDecoder(LIMIT, DEPTH)
    decoder.feed(encode_frame(None))
    with pytest.raises(ProtocolError, match="no message"):
        decoder.next_object()


def test_trailing_bytes_inside_a_frame_refused() -> None:
    decoder = FrameDecoder(LIMIT, DEPTH)
    decoder.feed(raw_frame(b"\x90\x90"))  # two objects in one frame
    with pytest.raises(ProtocolError):
        decoder.next_object()


def test_truncated_payload_refused() -> None:
    decoder = FrameDecoder(LIMIT, DEPTH)
    decoder.feed(raw_frame(b"\x92\x01"))  # an array of two holding one
    with pytest.raises(ProtocolError):
        decoder.next_object()


def test_handshake_limit_then_raised_limit() -> None:
    big = ["y" * 1000]
    small_decoder = FrameDecoder(128, DEPTH)
    with pytest.raises(FrameTooLarge):
        small_decoder.feed(encode_frame(big))

    raised = FrameDecoder(128, DEPTH)
    raised.set_limits(4096, DEPTH)
    raised.feed(encode_frame(big))
    assert raised.next_object() == big


def test_raised_limit_applies_to_the_next_frame_already_buffered() -> None:
    # The Auth-then-Info case: both arrive in one read; the limit goes up between them.
    decoder = FrameDecoder(128, DEPTH)
    big = ["z" * 1000]
    decoder.feed(encode_frame([1]) + encode_frame(big))
    assert decoder.next_object() == [1]
    decoder.set_limits(4096, DEPTH)
    assert decoder.next_object() == big


def test_lowered_depth_limit_applies() -> None:
    decoder = FrameDecoder(LIMIT, DEPTH)
    decoder.set_limits(LIMIT, 2)
    decoder.feed(encode_frame([[1]]))
    assert decoder.next_object() == [[1]]
    decoder.feed(encode_frame([[[1]]]))
    with pytest.raises(ProtocolError, match="deeper"):
        decoder.next_object()


# -- splitting -----------------------------------------------------------------------------


def test_every_single_split_point() -> None:
    objects: list[Any] = [[1, "a"], {"k": [b"v", None]}, "x" * 300, [[[]]]]
    stream = b"".join(encode_frame(obj) for obj in objects)
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder(LIMIT, DEPTH)
        decoder.feed(stream[:cut])
        got = drain(decoder)
        decoder.feed(stream[cut:])
        got += drain(decoder)
        assert got == objects, cut


def test_byte_at_a_time() -> None:
    objects: list[Any] = [[1, "a"], {"k": [b"v", None]}, "x" * 300]
    stream = b"".join(encode_frame(obj) for obj in objects)
    decoder = FrameDecoder(LIMIT, DEPTH)
    got: list[Any] = []
    for i in range(len(stream)):
        decoder.feed(stream[i : i + 1])
        got += drain(decoder)
    assert got == objects
    assert decoder.buffered == 0


@given(st.lists(payloads, min_size=1, max_size=6), st.data())
def test_arbitrary_chunkings_give_the_same_objects(objects: list[Any], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(obj) for obj in objects)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(stream)), max_size=len(stream))))
    bounds = [0, *cuts, len(stream)]
    decoder = FrameDecoder(1 << 20, 64)
    got: list[Any] = []
    for start, end in itertools.pairwise(bounds):
        decoder.feed(stream[start:end])
        got += drain(decoder)
    assert got == objects
    assert decoder.buffered == 0


# -- nesting -------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [33, 100, 1000, 5000, 60000])
def test_deep_arrays_refused_without_recursion_error(depth: int) -> None:
    decoder = FrameDecoder(LIMIT, DEPTH)
    decoder.feed(raw_frame(nested_arrays(depth)))
    with pytest.raises(ProtocolError):
        decoder.next_object()


@pytest.mark.parametrize("depth", [100, 5000])
def test_deep_maps_refused_without_recursion_error(depth: int) -> None:
    decoder = FrameDecoder(LIMIT, DEPTH)
    decoder.feed(raw_frame(nested_maps(depth)))
    with pytest.raises(ProtocolError):
        decoder.next_object()


@pytest.mark.parametrize("depth", [100, 5000])
def test_deep_arrays_refused_by_the_pure_python_msgpack(
    depth: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MSGPACK_PUREPYTHON=1 or a platform without the C extension uses the recursive fallback.
    monkeypatch.setattr(msgpack, "unpackb", msgpack.fallback.unpackb)
    decoder = FrameDecoder(LIMIT, DEPTH)
    decoder.feed(raw_frame(nested_arrays(depth)))
    with pytest.raises(ProtocolError):
        decoder.next_object()


def test_depth_at_limit_accepted() -> None:
    decoder = FrameDecoder(LIMIT, DEPTH)
    decoder.feed(raw_frame(nested_arrays(DEPTH)))
    obj = decoder.next_object()
    for _ in range(DEPTH - 1):
        assert isinstance(obj, list)
        assert len(obj) == 1
        obj = obj[0]
    assert obj == []


def test_depth_one_over_limit_refused() -> None:
    decoder = FrameDecoder(LIMIT, DEPTH)
    decoder.feed(raw_frame(nested_arrays(DEPTH + 1)))
    with pytest.raises(ProtocolError, match="deeper"):
        decoder.next_object()


def test_check_depth_is_iterative() -> None:
    obj: list[Any] = []
    for _ in range(100_000):
        obj = [obj]
    with pytest.raises(ProtocolError):
        check_depth(obj, DEPTH)


def test_check_depth_allows_timestamps_unless_told_not_to() -> None:
    stamp = msgpack.Timestamp(1, 0)
    check_depth([stamp], DEPTH)
    with pytest.raises(ProtocolError, match="timestamp"):
        check_depth({"k": [stamp]}, DEPTH, allow_timestamps=False)


def test_check_depth_counts_maps_and_tuples() -> None:
    check_depth({"a": ({"b": 1},)}, 3)
    with pytest.raises(ProtocolError):
        check_depth({"a": ({"b": [1]},)}, 3)
    check_depth("scalar", 0)


# -- extension types and odd msgpack -------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [
        msgpack.ExtType(5, b"abc"),
        [1, msgpack.ExtType(0, b"")],
        {"k": msgpack.ExtType(127, b"x" * 20)},
        msgpack.Timestamp(1, 0),  # ext type -1, which msgpack decodes without ext_hook
        [msgpack.Timestamp(1_700_000_000, 5)],
    ],
    ids=repr,
)
def test_extension_types_refused(obj: object) -> None:
    decoder = FrameDecoder(LIMIT, DEPTH)
    decoder.feed(encode_frame(obj))
    with pytest.raises(ProtocolError, match="extension"):
        decoder.next_object()


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\xd6\xfe1234", id="reserved-negative-type"),
        pytest.param(b"\xd6\xff\x00\x00\x00\x01", id="timestamp32"),
        pytest.param(b"\xd7\xff" + b"\x00" * 8, id="timestamp64"),
        pytest.param(b"\x91\xc7\x0c\xff" + b"\x00" * 12, id="timestamp96-in-array"),
    ],
)
def test_raw_extension_types_refused(payload: bytes) -> None:
    decoder = FrameDecoder(LIMIT, DEPTH)
    decoder.feed(raw_frame(payload))
    with pytest.raises(ProtocolError, match="extension"):
        decoder.next_object()


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(b"\x81\x01\x02", id="int-map-key"),
        pytest.param(b"\x81\x90\x02", id="array-map-key"),
        pytest.param(b"\x81\xc0\x02", id="nil-map-key"),
        pytest.param(b"\xa2\xff\xfe", id="invalid-utf8"),
        pytest.param(b"\xdd\xff\xff\xff\xff", id="array32-of-4g"),
        pytest.param(b"\xdf\xff\xff\xff\xff", id="map32-of-4g"),
        pytest.param(b"\xdb\xff\xff\xff\xff", id="str32-of-4g"),
        pytest.param(b"\xc6\xff\xff\xff\xff", id="bin32-of-4g"),
        pytest.param(b"\xc9\xff\xff\xff\xff\x05", id="ext32-of-4g"),
        pytest.param(b"\xd6\xff\x00", id="short-timestamp"),
        pytest.param(b"\xc7\x03\xff\x00\x00\x00", id="timestamp-of-3-bytes"),
        pytest.param(b"\xc7\x0c\xff" + b"\xff" * 12, id="timestamp-bad-nanoseconds"),
    ],
)
def test_malformed_msgpack_refused(payload: bytes) -> None:
    decoder = FrameDecoder(LIMIT, DEPTH)
    decoder.feed(raw_frame(payload))
    with pytest.raises(ProtocolError):
        decoder.next_object()


# -- garbage -------------------------------------------------------------------------------

# Bytes that steer msgpack into its interesting corners: sizes, ext, maps, nil, reserved.
interesting = st.sampled_from(
    [
        b"\xc0",
        b"\xc1",
        b"\x90",
        b"\x91",
        b"\x9f",
        b"\x80",
        b"\x81",
        b"\xa1",
        b"\xc4\x10",
        b"\xc7\x01\x05",
        b"\xc7\x0c\xff",
        b"\xd4\x01",
        b"\xd6\xff",
        b"\xd7\xff",
        b"\xdc\xff\xff",
        b"\xdd\x7f\xff\xff\xff",
        b"\xde\x00\x10",
        b"\xdf\xff\xff\xff\xff",
        b"\xdb\x00\x00\x10\x00",
        b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",
        b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff",
    ]
)
garbage_payloads = st.lists(interesting | st.binary(max_size=8), max_size=20).map(b"".join)


@given(garbage_payloads)
@settings(max_examples=300)
def test_garbage_payload_raises_only_protocol_error(payload: bytes) -> None:
    decoder = FrameDecoder(LIMIT, DEPTH)
    try:
        decoder.feed(raw_frame(payload))
        drain(decoder)
    except ProtocolError:
        pass


@given(st.binary(max_size=300), st.integers(1, 16))
@settings(max_examples=300)
def test_garbage_stream_raises_only_protocol_error(stream: bytes, chunk: int) -> None:
    decoder = FrameDecoder(256, DEPTH)
    try:
        for start in range(0, len(stream), chunk):
            decoder.feed(stream[start : start + chunk])
            drain(decoder)
    except ProtocolError:
        pass
