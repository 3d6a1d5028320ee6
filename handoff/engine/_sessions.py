"""Sessions: where stream messages go, and the order in which a node gives up its state.

The mesh hands every session message here. What a receiver sends (Accept, Refuse, Ack,
Closed) answers one of this node's outgoing streams and goes to the drain in progress; what a
sender sends (Offer, Chunk, End, Cancel, Done) goes to the receiver; a peer's report of its
cluster-scoped counters (Tally) goes to the tallies; actor messages go to the namespace's
actor host.

A drain runs in three steps (DESIGN.md, "Ownership"). The node has already announced that
it drains, so its receiver refuses new offers. Then the streams it accepted while serving
may finish, within part of its own deadline; those still open are withdrawn, and their
senders re-route what was not acknowledged. Only then does it export, so everything it
acknowledged leaves with its own drain.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Mapping, Sequence

import anyio

from handoff._errors import HandoffError
from handoff.engine._actors import ACTOR_MESSAGES, ActorHost
from handoff.engine._link import ANYIO_CLOCK, Clock, Link
from handoff.engine._receiver import Receiver
from handoff.engine._report import DrainReport
from handoff.engine._sender import Drainer
from handoff.engine._tally import Tallies
from handoff.protocol import Accept, Ack, Closed, Message, Refuse, Tally

__all__ = ("INBOUND_SHARE", "Sessions")

logger = logging.getLogger("handoff.engine")

# Share of a drain's time that streams accepted before it may take to finish. The rest is
# for this node's own export: it must hand on what it received as well as what it held.
INBOUND_SHARE = 0.4
# Share of it for telling the senders of the streams still open that this node withdraws.
WITHDRAW_SHARE = 0.05
# Seconds each message a drain had no time left for may take once the drain is over.
LATE_SEND_LIMIT = 1.0


class Sessions:
    """Routes stream messages to the receiver and the current drain; runs drains."""

    def __init__(
        self,
        receiver: Receiver,
        *,
        clock: Clock = ANYIO_CLOCK,
        tallies: Tallies | None = None,
        actors: Mapping[str, ActorHost] | None = None,
    ) -> None:
        self.receiver = receiver
        self.tallies = tallies
        self.actors: Mapping[str, ActorHost] = actors if actors is not None else {}
        self._clock = clock
        self._drainer: Drainer | None = None
        self._precopiers: list[Drainer] = []
        """Pre-copies running while the node serves: a copy, and the live streams of
        changes to peers whose copy is complete (see ``_precopy``)."""
        # Finished drains that may still learn the fate of chunks (Drainer.unresolved).
        self._finished: list[Drainer] = []
        self._late: list[tuple[str, Link, Message]] = []

    async def handle(self, peer: str, link: Link, message: Message) -> None:
        """Route one session message from ``peer`` (ProtocolError: drop the link)."""
        if isinstance(message, Accept | Refuse | Ack | Closed):
            for precopier in self._precopiers:
                # Each drain knows its own streams (the node numbers them all alike) and
                # ignores the others'.
                precopier.on_message(peer, message)
            if self._drainer is not None:
                self._drainer.on_message(peer, message)
            # Also while a later drain runs (the catch-up): stream ids are the node's, so
            # each drain takes only answers about its own streams.
            for drainer in self._finished:
                drainer.on_late(peer, message)
            self._finished = [d for d in self._finished if d.unresolved]
        elif isinstance(message, ACTOR_MESSAGES):
            host = self.actors.get(message.namespace)
            if host is not None:
                host.handle(peer, message)
            else:
                logger.debug("%s sent %r for a namespace without actors here", peer, message)
        elif isinstance(message, Tally):
            if self.tallies is not None:
                await self.tallies.handle(peer, message)
        else:
            await self.receiver.handle(peer, link, message)

    def streams_with(self, peer: str) -> bool:
        """Whether a stream with ``peer`` is under way, in either direction, or may still
        learn the fate of its chunks: the link it runs on must stay up until it ends (a
        duplicate link closed under it would look like a crash of the peer)."""
        drainers = [self._drainer, *self._precopiers, *self._finished]
        return self.receiver.streams_with(peer) or any(
            drainer.streams_with(peer) for drainer in drainers if drainer is not None
        )

    def peer_up(self, peer: str) -> Awaitable[None] | None:
        """A link to ``peer`` came up: a drain whose link to it had ended asks on it what
        the peer applied (see :meth:`Drainer.on_peer_up`), and so do finished drains about
        chunks of unknown outcome (see :meth:`Drainer.late_questions`): for those, returns
        the sending of the questions, for the caller to await (the mesh runs it as a task)."""
        if self._drainer is not None:
            self._drainer.on_peer_up(peer)
        for precopier in self._precopiers:
            precopier.on_peer_up(peer)
        drainers = [*self._finished, *([self._drainer] if self._drainer is not None else [])]
        questions = [q for drainer in drainers for q in drainer.late_questions(peer)]
        return self._ask_late(peer, questions) if questions else None

    async def _ask_late(self, peer: str, questions: Sequence[tuple[Link, Message]]) -> None:
        for link, question in questions:
            try:
                await link.send(question, time_limit=LATE_SEND_LIMIT)
            except HandoffError as exc:
                logger.debug("could not ask %s about %r: %s", peer, question, exc)

    def peer_lost(self, peer: str) -> None:
        """The current link to ``peer`` ended: its streams in both directions end too."""
        self.receiver.peer_lost(peer)
        if self.tallies is not None:
            self.tallies.peer_lost(peer)
        if self._drainer is not None:
            self._drainer.on_peer_lost(peer)
        for precopier in self._precopiers:
            precopier.on_peer_lost(peer)
        for drainer in self._finished:
            drainer.forget_unresolved(peer)
        self._finished = [d for d in self._finished if d.unresolved]

    def link_lost(self, peer: str, link: object) -> Awaitable[None] | None:
        """``link`` to ``peer`` ended, not the link in use (a duplicate kept up for the
        streams it carried, see ``Mesh._retire``): the streams on it end, as if the peer
        had gone (their chunks' fate is unknown); those on the link in use go on. The
        peer stays linked, so no node-up comes: a drain asks at once which chunks it
        applied (see :meth:`Drainer.on_peer_lost`), and for finished drains' chunks of
        unknown outcome this returns the sending of the questions, as :meth:`peer_up`."""
        self.receiver.link_lost(peer, link)
        if self._drainer is not None:
            self._drainer.on_peer_lost(peer, link)
        for precopier in self._precopiers:
            precopier.on_peer_lost(peer, link)
        for drainer in self._finished:
            drainer.forget_unresolved(peer, link)
        self._finished = [d for d in self._finished if d.unresolved]
        questions = [q for drainer in self._finished for q in drainer.late_questions(peer)]
        return self._ask_late(peer, questions) if questions else None

    async def drain(self, drainer: Drainer, *, time_limit: float) -> DrainReport:
        """Finish or withdraw inbound streams, then run ``drainer``, all within
        ``time_limit`` seconds. The caller has already stopped accepting offers."""
        started = self._clock.now()
        deadline = started + time_limit
        settled = started + time_limit * INBOUND_SHARE
        if not await self.receiver.settle(settled):
            withdrawn = await self.receiver.withdraw(
                "draining: the receiver is leaving too; send what it did not acknowledge elsewhere",
                settled + time_limit * WITHDRAW_SHARE,
            )
            logger.info("withdrew from %d inbound stream(s) to drain in time", withdrawn)
        self._drainer = drainer
        try:
            return await drainer.run(time_limit=max(0.0, deadline - self._clock.now()))
        finally:
            self._drainer = None
            self._late.extend(drainer.late)
            if drainer.unresolved:
                self._finished.append(drainer)

    async def precopy(self, drainer: Drainer, *, time_limit: float) -> DrainReport:
        """Run a pre-copy's ``drainer`` (a copy, or a batch of a live stream) while the
        node serves: no inbound stream is settled or withdrawn, and it may run alongside
        other pre-copies and a drain (which should stop it first). Give it the node's own
        stream numbering (``Drainer(stream_ids=...)``)."""
        self._precopiers.append(drainer)
        try:
            return await drainer.run(time_limit=time_limit)
        finally:
            self._precopiers.remove(drainer)
            self._late.extend(drainer.late)

    async def send_late(self, time_limit: float = LATE_SEND_LIMIT) -> None:
        """Send what past drains had no time left for (Cancels of streams they gave up at
        their deadline), each within ``time_limit`` seconds. Run once a drain is over, when
        the node keeps running: its successors stop waiting for those streams."""
        late, self._late = self._late, []

        async def send(peer: str, link: Link, message: Message) -> None:
            try:
                await link.send(message, time_limit=time_limit)
            except HandoffError as exc:
                logger.debug("could not send %r to %s after the drain: %s", message, peer, exc)

        async with anyio.create_task_group() as group:
            for peer, link, message in late:
                group.start_soon(send, peer, link, message)
