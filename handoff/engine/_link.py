"""What the engine needs from the world: a link to send on, and a clock to wait by.

The drainer and the receiver depend on these two small protocols only, never on the
transport, so that tests drive them with a fake link and a fake clock, without sockets.
"""

from __future__ import annotations

from typing import Protocol

import anyio

from handoff.protocol import Message

__all__ = ("ANYIO_CLOCK", "AnyioClock", "Clock", "Link", "carried_by", "transport_of")


class Link(Protocol):
    """One authenticated connection to a peer, as the engine uses it."""

    async def send(self, message: Message, *, time_limit: float | None = None) -> None:
        """Send a session message within ``time_limit`` seconds (else the link's own send
        timeout). Raises a :class:`handoff.HandoffError` when the link fails."""
        ...


def transport_of(link: Link) -> object:
    """The link that carries ``link``'s messages: itself, or the link a wrapper wraps (an
    observed link keeps it in ``wrapped``)."""
    return getattr(link, "wrapped", link)


def carried_by(link: Link, transport: object) -> bool:
    """Whether ``link`` is ``transport``, or a wrapper of it."""
    return transport_of(link) is transport


class Clock(Protocol):
    """Time for the engine: monotonic seconds, and waiting for an event until a deadline."""

    def now(self) -> float:
        """Monotonic seconds."""
        ...

    async def wait(self, event: anyio.Event, deadline: float) -> bool:
        """Wait until ``event`` is set (True) or :meth:`now` reaches ``deadline`` (False)."""
        ...


class AnyioClock:
    """The event loop's clock."""

    def now(self) -> float:
        return anyio.current_time()

    async def wait(self, event: anyio.Event, deadline: float) -> bool:
        with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
            await event.wait()
        return event.is_set()


ANYIO_CLOCK = AnyioClock()
