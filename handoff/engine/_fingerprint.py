"""Fingerprints of exported state: did anything change after a drain exported it?

A node drained by hand (``handoff drain`` in a preStop hook) may go on serving, and writing
to its caches, until it stops. At stop it compares what it holds with what the drain
exported and sends the namespaces that changed again (the catch-up), instead of re-sending
everything or silently leaving the new writes behind.

The fingerprint is the count of records and the sum of ``hash((key, value))`` over them:
order-independent, so it can be accumulated chunk by chunk as the drain exports. A record
that cannot be hashed (a dict or list value) is hashed through its encoded bytes instead;
one that cannot be encoded either makes the fingerprint unknown, and an unknown
fingerprint always counts as changed. Hashes of str/bytes are salted per process, which is
fine: both fingerprints are taken in the same process.
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
        """``encode(obj)`` serializes what cannot be hashed (the drain's codec)."""
        self._count = 0
        self._sum = 0
        self._encode = encode
        self.known = True
        """False once a record could be neither hashed nor encoded: it matches nothing."""

    def add(self, records: Iterable[Record]) -> None:
        """Fold ``records`` in."""
        if not self.known:
            return
        batch = [(record[0], record[1]) for record in records]
        try:
            total = sum(map(hash, batch))
        except TypeError:
            total = 0
            for pair in batch:
                try:
                    total += hash(pair)
                except TypeError:
                    try:
                        total += hash(self._encode(pair))
                    except Exception:
                        self.known = False
                        return
        self._sum = (self._sum + total) & _MASK
        self._count += len(batch)

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
