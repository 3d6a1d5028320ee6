"""Bounds on what unauthenticated sources can make the mesh hold or log.

Pure bookkeeping with time passed in, so every rule is tested without sockets:

- :class:`PendingHandshakes`: incoming handshakes in progress, capped per source address and
  in total. A flood from one address only ever displaces its own handshakes (and at most one
  other), so a slow, distant peer still gets in while someone else connects as fast as it
  can; and holding one handshake from each of many addresses cannot keep a newcomer out.
- :class:`LogLimiter`: at most so many log lines per source per interval about refused or
  failed connections, then one summary line, so that whoever provokes them does not also
  decide how much the node logs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ("Admission", "LogLimiter", "PendingHandshakes", "source_of")

OVERFLOW_SOURCE = "other sources"


def source_of(host: str) -> str:
    """The unit that pending handshakes and log lines are counted by, for one remote host.

    IPv4 addresses count one by one (IPv4-mapped IPv6 ones as IPv4, as a dual-stack listener
    sees them); IPv6 ones by their /64 prefix, which one host usually owns whole, so that
    an attacker cannot spread a flood over its 2**64 addresses.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer to a new incoming connection: its id and the pending handshakes to cancel
    to make room for it."""

    id: int
    evicted: tuple[int, ...] = ()


class PendingHandshakes:
    """Incoming handshakes in progress, by source, oldest first.

    At most ``per_source`` per source: past it, that source's oldest is evicted. At most
    ``total`` in all: past it, the oldest handshake of the source holding the most (the
    newcomer counted) is evicted; if every source holds only one, the oldest handshake of
    all is evicted.

    Why the oldest lone one and not the newcomer: turning newcomers away would let whoever
    holds ``total`` addresses, one silent handshake each renewed at every handshake timeout,
    keep every new peer out for good. A genuine handshake completes in a round trip, so the
    oldest is the likeliest silent one; to evict a genuine one, an attacker must open
    ``total`` connections from as many new addresses within that round trip. One source
    alone evicts at most one handshake of another: from its second on it is the source
    holding the most, and pays itself.
    """

    def __init__(self, total: int, per_source: int) -> None:
        if total < 1 or per_source < 1:
            raise ValueError("pending handshake caps must be at least 1")
        self.total = total
        self.per_source = per_source
        self._by_source: dict[str, dict[int, None]] = {}  # dicts keep insertion order
        self._source: dict[int, str] = {}
        self._next_id = 1

    def __len__(self) -> int:
        return len(self._source)

    def count(self, source: str) -> int:
        """Handshakes in progress from ``source``."""
        return len(self._by_source.get(source, ()))

    def admit(self, source: str) -> Admission:
        """Make room for a new connection from ``source`` (see the class docstring)."""
        evicted: tuple[int, ...] = ()
        if self.count(source) >= self.per_source:
            evicted = (self._oldest_of(source),)
        elif len(self._source) >= self.total:
            biggest = max(
                self._by_source,
                key=lambda s: (len(self._by_source[s]) + (s == source), s == source),
            )
            if len(self._by_source[biggest]) + (biggest == source) <= 1:
                # Every source holds one and the newcomer's holds none: ids grow with
                # time, so the smallest is the oldest.
                evicted = (min(self._source),)
            else:
                evicted = (self._oldest_of(biggest),)
        for pending in evicted:
            self.done(pending)
        pending_id, self._next_id = self._next_id, self._next_id + 1
        self._by_source.setdefault(source, {})[pending_id] = None
        self._source[pending_id] = source
        return Admission(pending_id, evicted)

    def done(self, pending_id: int) -> None:
        """The handshake ended (completed, failed or evicted). Idempotent."""
        source = self._source.pop(pending_id, None)
        if source is None:
            return
        ids = self._by_source[source]
        del ids[pending_id]
        if not ids:
            del self._by_source[source]

    def _oldest_of(self, source: str) -> int:
        return next(iter(self._by_source[source]))


class LogLimiter:
    """At most ``burst`` lines per source in each ``interval`` seconds.

    A line past that is counted, not written; :meth:`flush` then reports, per source whose
    interval ended, how many were suppressed, for one summary line each. At most
    ``max_sources`` sources are tracked at once; the rest share one budget
    (:data:`OVERFLOW_SOURCE`), so many sources cannot make the table or the log grow.
    """

    def __init__(
        self,
        *,
        burst: int,
        interval: float,
        clock: Callable[[], float],
        max_sources: int = 1024,
    ) -> None:
        self._burst = burst
        self._interval = interval
        self._clock = clock
        self._max_sources = max_sources
        # source -> [interval start, lines written, lines suppressed]
        self._windows: dict[str, list[float]] = {}
        # Suppressed counts of windows that ended, not reported by flush() yet.
        self._unreported: dict[str, int] = {}

    def allow(self, source: str) -> bool:
        """True if a line about ``source`` may be written now."""
        now = self._clock()
        if source not in self._windows and len(self._windows) >= self._max_sources:
            source = OVERFLOW_SOURCE
        window = self._windows.get(source)
        if window is None or now - window[0] >= self._interval:
            if window is not None and window[2]:
                self._unreported[source] = self._unreported.get(source, 0) + int(window[2])
            window = self._windows[source] = [now, 0, 0]
        if window[1] < self._burst:
            window[1] += 1
            return True
        window[2] += 1
        return False

    def flush(self) -> list[tuple[str, int]]:
        """``(source, suppressed)`` for every source whose interval ended with lines
        suppressed (each reported once), oldest first; ended intervals are forgotten."""
        now = self._clock()
        for source, (start, _, suppressed) in list(self._windows.items()):
            if now - start >= self._interval:
                del self._windows[source]
                if suppressed:
                    count = self._unreported.get(source, 0) + int(suppressed)
                    self._unreported[source] = count
        reported = list(self._unreported.items())
        self._unreported.clear()
        return reported
