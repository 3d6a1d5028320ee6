"""Fingerprints of exported state: did anything change after a drain exported it?

A node drained by hand (``handoff drain`` in a preStop hook) may go on serving, and writing
to its caches, until it stops. At stop it compares what it holds with what the drain
exported and sends the namespaces that changed again (the catch-up), instead of re-sending
everything or silently leaving the new writes behind.

The fingerprint is the count of records and the sum of the hashes of their encoded
``[key, value]`` (:meth:`Codec.fingerprint_encoder`): order-independent, so it can be
accumulated chunk by chunk as the drain exports. Not ``hash((key, value))``: CPython hashes
-1 like -2 (a balance going from -1 to -2 went unseen), 1 like 1.0 and True, and objects
without ``__eq__`` by identity (one mutated in place went unseen); and unhashable values
(dicts, lists) then cost an exception and a one-off Packer each, ~50 us a record on the
event loop, which pushed a manual drain far past its deadline. A record that cannot be
encoded makes the fingerprint unknown, and an unknown fingerprint always counts as
changed. Hashes of bytes are salted per process, which is fine: both fingerprints are
taken in the same process.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import anyio.lowlevel

from handoff._adapter import Adapter, Record

__all__ = ("Fingerprint", "fingerprint_of")

_MASK = (1 << 64) - 1
_BATCH = 8192


class Fingerprint:
    """Accumulates the fingerprint of a stream of records."""

    __slots__ = ("_count", "_encode", "_sum", "known")

    def __init__(self, encode: Callable[[Any], bytes]) -> None:
        """``encode(obj)`` serializes a record's key and value
        (:meth:`Codec.fingerprint_encoder`)."""
        self._count = 0
        self._sum = 0
        self._encode = encode
        self.known = True
        """False once a record could be neither hashed nor encoded: it matches nothing."""

    def add(self, records: Iterable[Record]) -> None:
        """Fold ``records`` in."""
        if not self.known:
            return
        encode = self._encode
        try:
            hashes = [hash(encode([record[0], record[1]])) for record in records]
        except Exception:
            self.known = False
            return
        self._sum = (self._sum + sum(hashes)) & _MASK
        self._count += len(hashes)

    def matches(self, other: Fingerprint) -> bool:
        """True only when both are known and equal."""
        return self.known and other.known and (self._count, self._sum) == (other._count, other._sum)


async def fingerprint_of(
    adapter: Adapter, lock: AbstractContextManager[object], encode: Callable[[Any], bytes]
) -> Fingerprint:
    """The fingerprint of what ``adapter`` would export now. Taken on the event loop in
    chunks, under ``lock``, like a drain's export (an asyncio app writes to its caches from
    the loop's thread without the lock), yielding to other tasks between chunks."""
    fingerprint = Fingerprint(encode)
    records = iter(adapter.export())
    while True:
        with lock:
            batch = list(itertools.islice(records, _BATCH))
        if not batch:
            return fingerprint
        fingerprint.add(batch)
        await anyio.lowlevel.checkpoint()
