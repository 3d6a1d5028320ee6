"""A duplicate link resolved while a drain streams on it must not double count.

In a rolling deploy a new node may dial an old one and, before the old node drains, be
found by the old node's discovery too (Kubernetes ``publishNotReadyAddresses``): the old node
then dials it back. The tie-break keeps one link per peer (the one dialled by the smaller
name), so the link the drain already streams on may be the one that loses. Closing it at
once ended the stream as if the successor had crashed: the drain re-sent what it had not
seen acknowledged (``in_doubt``) over the surviving link, to the same live successor, which
had applied it already, and the counts landed twice.

The drain's Done (which tells the successor what it received, and makes it warm) goes on the
stream's link after its End: the variants hold it back at either end, for a few of the
retiring link's checks, to show that neither end closes the link before it.
"""

from __future__ import annotations

import anyio
import pytest

from handoff import Counters
from handoff._mesh import RETIRE_POLL_INTERVAL
from handoff.discovery import PeerAddress
from handoff.protocol import Ack, Chunk, Done, End, Message
from handoff.transport import PeerLink
from tests._helpers import make_node, wait_until

pytestmark = pytest.mark.anyio

KEYS = 300
# Long enough for a retiring link's owner to see its streams ended several times over.
PAUSE = 4 * RETIRE_POLL_INTERVAL


@pytest.mark.parametrize("pause", ["none", "receiver after the End", "sender before the Done"])
async def test_a_duplicate_link_resolved_mid_drain_keeps_counters_exact(
    pause: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "a" is the old node, "b" the new one: b dials a first (link 1); a's dial back
    # (link 2) is the one the tie-break keeps, as a is the smaller name.
    old_usage, new_usage = Counters(), Counters()
    for i in range(KEYS):
        old_usage.incr(f"k{i}", 1 + i % 5)
    written = old_usage.total()
    a = make_node("a", "127.0.0.2")
    a.track("usage", old_usage)
    async with a:
        b = make_node("b", "127.0.0.3", peers=[a])
        b.track("usage", new_usage)
        async with b:
            await wait_until(lambda: [p.name for p in a.peers()] == ["b"])
            first_link = a._mesh._membership.link_of("b")
            handle = b._mesh._on_session_message
            dialled_back = anyio.Event()

            async def dial_back_at_first_chunk(peer: str, link: PeerLink, message: Message) -> None:
                # The first chunk of a's drain has reached b on link 1: now a's dial to b
                # completes (link 2), before b applies and acknowledges that chunk.
                if isinstance(message, Chunk) and not dialled_back.is_set():
                    dialled_back.set()
                    a._spawn(a._mesh._dial, PeerAddress("127.0.0.3", b.port))
                    await wait_until(
                        lambda: (
                            a._mesh._membership.link_of("b") not in (first_link, None)
                            and len(b._mesh._links) >= 2
                        )
                    )
                    await anyio.sleep(PAUSE)  # the tie-break's closes go out meanwhile
                await handle(peer, link, message)
                if isinstance(message, End) and pause == "receiver after the End":
                    await anyio.sleep(PAUSE)  # the stream is over here; its Done is not

            if pause == "sender before the Done":
                link_1 = a._mesh._links[first_link or 0]
                send = link_1.send

                async def done_later(message: Message, *, time_limit: float | None = None) -> None:
                    if isinstance(message, Done):
                        await anyio.sleep(PAUSE)  # a's stream is over; its Done is not sent
                    await send(message, time_limit=time_limit)

                monkeypatch.setattr(link_1, "send", done_later)

            b._mesh._on_session_message = dial_back_at_first_chunk
            report = await a.drain(timeout=3.0)
            assert dialled_back.is_set()
            # Both nodes keep one link each for the other once the stream is over.
            await wait_until(lambda: len(a._mesh._links) == 1 and len(b._mesh._links) == 1)
            assert [p.name for p in b.peers()] == ["a"]
            held = new_usage.total()
            received = b.last_received
    assert report.in_doubt == 0, report
    assert held == written
    # The drain's Done reached b on the link its stream ran on, before that link closed.
    assert received is not None
    assert (received.peer, received.records) == ("a", KEYS)


class _AckLost:
    """b's end of the link, for one chunk: its Ack never leaves, the connection drops
    instead (applied at b, unconfirmed at a)."""

    def __init__(self, link: PeerLink) -> None:
        self.link = link

    async def send(self, message: Message, *, time_limit: float | None = None) -> None:
        if isinstance(message, Ack):
            await anyio.aclose_forcefully(self.link._stream)
            return
        await self.link.send(message, time_limit=time_limit)


async def test_a_link_lost_with_an_ack_is_asked_again_and_nothing_counts_twice() -> None:
    """a drains counters to b; b applies a chunk, and the link drops before its Ack gets
    out. b runs on: the mesh links them again at once, a asks b which chunks it applied,
    b replays the Ack, and what b did not apply comes back to a (no other successor):
    nothing is in doubt and every count exists once."""
    old_usage, new_usage = Counters(), Counters()
    for i in range(KEYS):
        old_usage.incr(f"k{i}", 1 + i % 5)
    written = old_usage.total()
    a = make_node("a", "127.0.0.2")
    a.track("usage", old_usage)
    async with a:
        b = make_node("b", "127.0.0.3", peers=[a])
        b.track("usage", new_usage)
        async with b:
            await wait_until(lambda: [p.name for p in a.peers()] == ["b"])
            handle = b._mesh._on_session_message
            cut: list[int] = []

            async def lose_an_ack(peer: str, link: PeerLink, message: Message) -> None:
                if isinstance(message, Chunk) and not cut:
                    cut.append(message.seq)
                    await handle(peer, _AckLost(link), message)  # type: ignore[arg-type]
                    return
                await handle(peer, link, message)

            b._mesh._on_session_message = lose_an_ack
            report = await a.drain(timeout=10.0)
            held_b, held_a = new_usage.total(), old_usage.total()
    assert cut == [0]
    ns = report.namespaces["usage"]
    assert ns.in_doubt == 0, report
    assert ns.per_successor["b"].applied > 0  # the replayed Ack counted
    assert held_b > 0
    assert held_a + held_b == written
