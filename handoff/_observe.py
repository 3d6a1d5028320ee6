"""What a node shows its observers (the exporters of :mod:`handoff.metrics`).

A node calls its observers at its edges only: where its drains start and end, where the
engine reports a drain's progress, where session messages come in from the mesh and go out
on the links it hands the engine, where a link ends and where a received handoff completes.
The engine knows nothing of them, and a node without observers pays one empty loop per
call. An observer that raises is logged and skipped: it must never break a handoff.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from handoff.engine import DrainReport, Link, NamespaceReport
from handoff.protocol import Message

if TYPE_CHECKING:
    from handoff.node import ReceivedHandoff

__all__ = ("ObservedLink", "Observer", "Observers")

logger = logging.getLogger("handoff.metrics")


class Observer:
    """What an observer may hear of a node; every method does nothing by default. All run
    on the node's event loop and must not block."""

    def drain_started(self, reason: str) -> None:
        """A drain (``reason`` "drain") or a catch-up ("catch-up") begins."""

    def drain_progress(self, report: NamespaceReport) -> None:
        """A namespace of the current drain made progress (its report, changed in place)."""

    def drain_finished(self, report: DrainReport | None) -> None:
        """The drain that began last ended: its report, or ``None`` if it raised."""

    def sent(self, peer: str, message: Message) -> None:
        """A session message is about to go to ``peer`` (the drain's and the receiver's)."""

    def received(self, peer: str, message: Message) -> None:
        """A session message came from ``peer``, before the engine handles it."""

    def peer_lost(self, peer: str) -> None:
        """The link to ``peer`` ended: its streams in both directions end too."""

    def handoff_received(self, handoff: ReceivedHandoff) -> None:
        """A handoff from ``handoff.peer`` completed (its Done arrived)."""


class Observers:
    """A node's observers, called in turn; one that raises is logged and skipped."""

    def __init__(self) -> None:
        self._observers: list[Observer] = []

    def add(self, observer: Observer) -> None:
        """Call ``observer`` from now on."""
        self._observers.append(observer)

    def __bool__(self) -> bool:
        return bool(self._observers)

    def __iter__(self) -> Iterator[Observer]:
        return iter(list(self._observers))

    def _each(self, method: str, *args: object) -> None:
        for observer in self._observers:
            try:
                getattr(observer, method)(*args)
            except Exception:
                logger.exception("observer %r failed in %s", observer, method)

    def drain_started(self, reason: str) -> None:
        """See :meth:`Observer.drain_started`."""
        self._each("drain_started", reason)

    def drain_progress(self, report: NamespaceReport) -> None:
        """See :meth:`Observer.drain_progress`."""
        self._each("drain_progress", report)

    def drain_finished(self, report: DrainReport | None) -> None:
        """See :meth:`Observer.drain_finished`."""
        self._each("drain_finished", report)

    def sent(self, peer: str, message: Message) -> None:
        """See :meth:`Observer.sent`."""
        self._each("sent", peer, message)

    def received(self, peer: str, message: Message) -> None:
        """See :meth:`Observer.received`."""
        self._each("received", peer, message)

    def peer_lost(self, peer: str) -> None:
        """See :meth:`Observer.peer_lost`."""
        self._each("peer_lost", peer)

    def handoff_received(self, handoff: ReceivedHandoff) -> None:
        """See :meth:`Observer.handoff_received`."""
        self._each("handoff_received", handoff)


class ObservedLink:
    """A link that shows every message it sends to the observers first."""

    def __init__(self, link: Link, peer: str, observers: Observers) -> None:
        self._link = link
        self.wrapped = link
        """The link this one sends on (the engine matches streams to a link that ended)."""
        self._peer = peer
        self._observers = observers

    def __eq__(self, other: object) -> bool:
        # The node wraps a link anew for every message it hands on: two wrappers of one
        # link are the same link (the receiver tells a stream's link from a new one).
        if isinstance(other, ObservedLink):
            return other._link is self._link
        return other is self._link

    def __hash__(self) -> int:
        return id(self._link)

    async def send(self, message: Message, *, time_limit: float | None = None) -> None:
        """Tell the observers, then send on the wrapped link."""
        self._observers.sent(self._peer, message)
        await self._link.send(message, time_limit=time_limit)
