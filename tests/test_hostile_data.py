"""Hostile data from an authenticated peer (invariant 9): hash floods, decode bombs, unsafe
values and use counts. The codec refuses them before building anything quadratic or large;
a live node refuses the stream, a snapshot is quarantined, honest data always passes."""

from __future__ import annotations

import decimal
import time
import tracemalloc
from typing import Any

import msgpack
import pytest

from handoff._codec import (
    EXT_DECIMAL,
    MAX_HASH_COLLISIONS,
    RETAINED_PER_BYTE,
    Codec,
)
from handoff._errors import PayloadRefused, RecordDecodeError, RecordEncodeError
from tests._hostile_payloads import (
    colliding_bigints,
    colliding_pairs,
    empty_array_bomb,
    empty_map_bomb,
    encode,
)

# Far below the seconds a flood took before the bound (and O(n) checks run in milliseconds).
PROMPT = 0.5
FLOOD = 4_000


def _decode(payload: bytes) -> list[Any]:
    return Codec().decode_records(payload, max_records=100_000)


def _refused_promptly(payload: bytes, words: str) -> None:
    started = time.monotonic()
    with pytest.raises(PayloadRefused, match=words):
        _decode(payload)
    assert time.monotonic() - started < PROMPT


# -- hash floods ------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [colliding_bigints, colliding_pairs], ids=["bigint", "pair"])
def test_record_keys_sharing_one_hash_are_refused_at_once(make: Any) -> None:
    payload = encode([(key, 1, None) for key in make(FLOOD)])
    _refused_promptly(payload, "share one hash")


@pytest.mark.parametrize("make", [colliding_bigints, colliding_pairs], ids=["bigint", "pair"])
def test_dict_keys_and_set_elements_sharing_one_hash_are_refused(make: Any) -> None:
    keys = make(FLOOD)
    _refused_promptly(encode([("k", dict.fromkeys(keys, 0), None)]), "share one hash")
    _refused_promptly(encode([("k", set(keys), None)]), "share one hash")
    _refused_promptly(encode([("k", frozenset(keys), None)]), "share one hash")


def test_decimals_sharing_one_hash_are_refused() -> None:
    keys = [decimal.Decimal(k) for k in colliding_bigints(FLOOD)]
    _refused_promptly(encode([(key, 1, None) for key in keys]), "share one hash")


def test_a_few_collisions_and_repeated_equal_values_pass() -> None:
    keys = colliding_bigints(MAX_HASH_COLLISIONS)
    records = [(key, (1, 2), None) for key in keys] + [(f"k{i}", (1, 2), None) for i in range(500)]
    assert _decode(encode(records)) == records


# -- decode bombs -----------------------------------------------------------------------------


@pytest.mark.parametrize("bomb", [empty_array_bomb, empty_map_bomb], ids=["arrays", "maps"])
def test_a_decode_bomb_is_refused_before_it_is_built(bomb: Any) -> None:
    payload = bomb(1_000_000)
    tracemalloc.start()
    try:
        with pytest.raises(PayloadRefused, match="memory"):
            _decode(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Refused once its budget is spent: never more than the budget (plus the msgpack
    # decoder's own bookkeeping) was held, not the ~70x that building it costs.
    assert peak < (RETAINED_PER_BYTE + 8) * len(payload)


def test_a_bomb_that_would_fit_the_plain_path_is_refused_too() -> None:
    # Nested single-element arrays: on the scalar fast path (tuples), 48 bytes a byte.
    codec = Codec()
    codec.decode_records(encode([("k", 1, None)]), max_records=1)  # the fast path is tried
    nested: Any = None
    for _ in range(60):
        nested = [nested]
    payload = encode([("k", nested, None) for _ in range(20_000)])
    with pytest.raises(PayloadRefused, match="memory"):
        codec.decode_records(payload, max_records=20_000)


# -- unsafe values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["sNaN", "-sNaN", "sNaN123", "1E+1000000", "1E-1000000", "9" * 5000]
)
def test_unsafe_decimals_are_refused_both_ways(text: str) -> None:
    value = decimal.Decimal(text)
    with pytest.raises(RecordEncodeError, match="Decimal"):
        Codec().packb(value)
    row = [("k", msgpack.ExtType(EXT_DECIMAL, text.encode()), None)]
    payload = msgpack.packb(row, use_bin_type=True)
    with pytest.raises(PayloadRefused, match="Decimal"):
        _decode(payload)


@pytest.mark.parametrize("text", ["NaN", "-Infinity", "1.50", "-0E-7", "1E+6000", "9" * 100])
def test_ordinary_decimals_round_trip(text: str) -> None:
    value = decimal.Decimal(text)
    [(_, back, _)] = _decode(encode([("k", value, None)]))
    assert str(back) == str(value)


def test_refusals_are_decode_errors_of_their_own() -> None:
    # The receiver tells a refusal (the stream is refused, the link stays) from a malformed
    # payload (the link drops): both are RecordDecodeErrors, only one is PayloadRefused.
    assert issubclass(PayloadRefused, RecordDecodeError)
    with pytest.raises(RecordDecodeError) as info:
        _decode(b"\x91\x93\xc1")
    assert not isinstance(info.value, PayloadRefused)
