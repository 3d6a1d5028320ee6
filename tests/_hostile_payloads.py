"""Payloads a hostile (authenticated) peer sends: keys that share one CPython hash, and
decode bombs. Shared by the codec, receiver and snapshot tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

from handoff._codec import Codec

__all__ = (
    "HASH_MODULUS",
    "colliding_bigints",
    "colliding_pairs",
    "empty_array_bomb",
    "empty_map_bomb",
    "encode",
)

HASH_MODULUS = sys.hash_info.modulus  # 2**61 - 1: hash(k * HASH_MODULUS) == 0 for any int k

# CPython's tuple hash (xxHash-based, not randomized): see Objects/tupleobject.c.
_P1 = 11400714785074694791
_P2 = 14029467366897019727
_P5 = 2870177450012600261
_MASK = 2**64 - 1


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _MASK


def _rotr(x: int, r: int) -> int:
    return ((x >> r) | (x << (64 - r))) & _MASK


def colliding_bigints(count: int) -> list[int]:
    """``count`` distinct ints beyond 64 bits (the codec's big-int extension type) whose
    hash is 0."""
    return [k * HASH_MODULUS for k in range(9, 9 + count)]


def _int_with_hash(target: int) -> int | None:
    signed = target - 2**64 if target >= 2**63 else target
    if 0 <= signed < HASH_MODULUS:
        return signed
    if -HASH_MODULUS < signed < -2:
        return signed
    return None


def _pairs() -> Iterator[tuple[int, int]]:
    # Invert the last round of the tuple hash: for each first item, the second item whose
    # hash makes the pair's hash a chosen constant (an int hash reaches a quarter of them).
    target = 0x0123_4567_89AB_CDEF
    inner = _rotr((target * pow(_P1, -1, 2**64)) & _MASK, 31)
    inverse = pow(_P2, -1, 2**64)
    for first in range(1, 10**9):
        acc = (_rotl((_P5 + first * _P2) & _MASK, 31) * _P1) & _MASK
        second = _int_with_hash(((inner - acc) * inverse) & _MASK)
        if second is not None:
            yield first, second


def colliding_pairs(count: int) -> list[tuple[int, int]]:
    """``count`` distinct 2-tuples of ints that all share one hash."""
    pairs: list[tuple[int, int]] = []
    for pair in _pairs():
        pairs.append(pair)
        if len(pairs) == count:
            break
    assert len({hash(p) for p in pairs}) == 1, "CPython's tuple hash changed"
    return pairs


def encode(records: list[tuple[Any, Any, Any]]) -> bytes:
    payload, failed = Codec().encode_records(records)
    assert not failed, failed
    return payload


def _one_record_of(size: int, item: bytes) -> bytes:
    # [["bomb", [item] * size, nil]], written directly: building it as objects costs what
    # the receiver is meant never to pay.
    return b"\x91\x93\xa4bomb\xdd" + size.to_bytes(4, "big") + item * size + b"\xc0"


def empty_array_bomb(size: int) -> bytes:
    """One record whose value is ``size`` empty arrays (one byte each on the wire)."""
    return _one_record_of(size, b"\x90")


def empty_map_bomb(size: int) -> bytes:
    """One record whose value is ``size`` empty maps."""
    return _one_record_of(size, b"\x80")
