"""Attacks on duplicate links and their retirement (Mesh._retire) around a drain.

Two nodes that dial each other at once end with two links; both keep the one dialled by
the smaller name. The server side of a handshake completes first (it takes the client's
Info, then sends its own), so the node that keeps the new link may close the old one
(Goodbye "duplicate") before the other node has finished the new link's handshake: for that
moment the other node holds the peer (``Membership._held``), absent from its peers, its
replacement link on its way.

Each test forces one moment of a drain at which the duplicate appears or goes: before the
drain chooses successors, with its Offer on the way, at its first chunk (the kept link
then failing, or the successor dying with both links), and its Done (never sent, or due
after a stream was offered again on the other link).
"""

from __future__ import annotations

import math
from typing import Any

import anyio
import pytest

from handoff import Counters, Node
from handoff._observe import Observer
from handoff.discovery import PeerAddress
from handoff.engine._sender import FIRST_CHUNK_RECORDS
from handoff.membership import DUPLICATE, DownReason, Membership
from handoff.protocol import Chunk, Done, Message, NodeState, Offer, PeerInfo, StreamState
from handoff.transport import PeerLink
from tests._helpers import make_node, wait_until

pytestmark = pytest.mark.anyio

KEYS = 200


async def test_a_drain_that_starts_while_its_successors_link_is_being_replaced_waits_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # "final" dialled "b" (link F). b dials final back (link B, the one both keep: b is the
    # smaller name). final completes B first (server side) and closes F; b takes F's
    # Goodbye before its own side of B completes (held here until b drains, as a loaded
    # machine may hold it): for that moment b holds final, absent from its peers. A drain
    # starting then found no successor ("no successor, no snapshot store" for everything,
    # sent 0: test_netfaults' test_slow_successor_at_one_megabit[fits], once under load).
    written, held = Counters(), Counters()
    for i in range(KEYS):
        written.incr(f"k{i}", 1 + i % 3)
    b = make_node("b", "127.0.0.2")
    b.track("usage", written)
    total = written.total()
    async with b:
        final = make_node("final", "127.0.0.3", peers=[b])
        final.track("usage", held)
        async with final:
            await wait_until(lambda: [p.name for p in b.peers()] == ["final"])
            release = anyio.Event()
            make_link = b._mesh._link

            def slow_client_link(*args: Any) -> PeerLink:
                link = make_link(*args)
                handshake = link.handshake

                async def completes_late() -> Any:
                    result = await handshake()
                    await release.wait()
                    return result

                monkeypatch.setattr(link, "handshake", completes_late)
                return link

            monkeypatch.setattr(b._mesh, "_link", slow_client_link)
            b._spawn(b._mesh._dial, PeerAddress("127.0.0.3", final.port))
            # final closed F as the duplicate: b holds final until B completes here.
            await wait_until(lambda: b.peers() == [] and "final" in b._mesh._membership._held)
            report: list[Any] = []

            async def drain() -> None:
                report.append(await b.drain(timeout=3.0))

            async with anyio.create_task_group() as group:
                group.start_soon(drain)
                await wait_until(lambda: b._mesh.state is NodeState.DRAINING)
                release.set()
            ns = report[0].namespaces["usage"]
            assert ns.successors == ["final"], ns
            assert ns.acknowledged == ns.records == KEYS, ns
            assert held.total() == total


@pytest.mark.parametrize("observed", [False, True], ids=["plain", "observed"])
async def test_a_kept_duplicate_that_fails_ends_the_streams_it_carried_on_both_sides(
    observed: bool,
) -> None:
    # b dialled a (link 1) and a's drain streams on it; a dials back (link 2, kept: a is
    # the smaller name) at the first chunk, so both sides keep link 1 up for the stream
    # (Mesh._retire). Then link 1 fails for real, with the chunk lost on the way. It was
    # not the link in use, so neither side called on_peer_lost: b's receiver kept the
    # stream open (its own drain would wait for it, 40% of its time) and a's drain waited
    # for an Ack until it gave up on a stall, with the chunk's fate bound. Observed: with
    # an observer (metrics, tracing) the engine holds wrappers of the mesh's links.
    old_usage, new_usage = Counters(), Counters()
    for i in range(KEYS):
        old_usage.incr(f"k{i}", 1)
    a = make_node("a", "127.0.0.2")
    a.track("usage", old_usage)
    async with a:
        b = make_node("b", "127.0.0.3", peers=[a])
        b.track("usage", new_usage)
        if observed:
            a._observers.add(Observer())
            b._observers.add(Observer())
        async with b:
            await wait_until(lambda: [p.name for p in a.peers()] == ["b"])
            first_link = a._mesh._membership.link_of("b")
            handle = b._mesh._on_session_message
            cut = anyio.Event()
            streams: list[Any] = []  # a's drain's streams, once it sends

            async def cut_at_first_chunk(peer: str, link: PeerLink, message: Message) -> None:
                if isinstance(message, Chunk) and not cut.is_set():
                    cut.set()
                    assert a._sessions._drainer is not None
                    streams.extend(a._sessions._drainer._streams.values())
                    a._spawn(a._mesh._dial, PeerAddress("127.0.0.3", b.port))
                    await wait_until(
                        lambda: (
                            a._mesh._membership.link_of("b") not in (first_link, None)
                            and len(b._mesh._links) == len(a._mesh._links) == 2
                        )
                    )
                    await anyio.aclose_forcefully(link._stream)  # the chunk never arrives
                    return
                await handle(peer, link, message)

            b._mesh._on_session_message = cut_at_first_chunk
            reports: list[Any] = []

            async def drain() -> None:
                reports.append(await a.drain(timeout=30.0))

            async with anyio.create_task_group() as group:
                group.start_soon(drain)
                await wait_until(lambda: cut.is_set() and len(b._mesh._links) == 1)
                await wait_until(lambda: b._sessions.receiver.active == 0)
                await wait_until(
                    lambda: all(s.state is not StreamState.OPEN for s in streams), limit=10
                )
                # Ended because its link did, not given up as stalled.
                assert [s.link_lost for s in streams] == [True]
            # b is still linked (on link 2): a asks it at once there which chunks it
            # applied (none: the chunk never arrived), and offers it the rest again. Before
            # (no node-up came to ask on), the chunk was re-sent after the stall time, in
            # doubt, and b was not offered it again (it went back to a).
            ns = reports[0].namespaces["usage"]
            assert (ns.acknowledged, ns.in_doubt, ns.refusals) == (KEYS, 0, {}), ns
            assert new_usage.total() == KEYS
            assert old_usage.total() == 0


async def test_a_duplicate_resolved_while_the_offer_is_on_its_way_still_reaches_the_successor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # b dialled a (link 1); a's drain chose b on link 1 and sends its Offer there just as
    # a's own dial completes (link 2, the one both keep). b finished link 2 first (server
    # side) and, knowing of no stream with a yet, closed link 1 at once: the Offer is lost
    # with it. b is alive and serving on link 2: the drain must still hand everything to
    # it, not give up on b as if it had gone down.
    old_usage, new_usage = Counters(), Counters()
    for i in range(KEYS):
        old_usage.incr(f"k{i}", 1)
    a = make_node("a", "127.0.0.2")
    a.track("usage", old_usage)
    async with a:
        b = make_node("b", "127.0.0.3", peers=[a])
        b.track("usage", new_usage)
        async with b:
            await wait_until(lambda: [p.name for p in a.peers()] == ["b"])
            first = a._mesh._membership.link_of("b")
            assert first is not None
            link_1 = a._mesh._links[first]
            b_first = b._mesh._membership.link_of("a")
            send = link_1.send

            async def offer_meets_the_dial_back(
                message: Message, *, time_limit: float | None = None
            ) -> None:
                if isinstance(message, Offer):
                    a._spawn(a._mesh._dial, PeerAddress("127.0.0.3", b.port))
                    await wait_until(lambda: b_first not in b._mesh._links)
                await send(message, time_limit=time_limit)

            monkeypatch.setattr(link_1, "send", offer_meets_the_dial_back)
            report = await a.drain(timeout=4.0)
            ns = report.namespaces["usage"]
            assert ns.successors == ["b"], ns
            assert ns.acknowledged == KEYS, ns
            assert new_usage.total() == KEYS


def test_membership_says_until_when_a_held_peers_replacement_may_come() -> None:
    membership = Membership("b", grace=1.0)
    info = PeerInfo(
        name="final",
        incarnation="i1",
        cluster="shop",
        release="v3",
        started_at=0.0,
        state=NodeState.SERVING,
        address="127.0.0.3:4370",
        namespaces=(),
        protocol_version=1,
        clock_offset=0.0,
    )
    assert membership.established(1, info, dialled=False, address="127.0.0.3:5000", now=10.0).keep
    assert membership.replacing(10.0) == -math.inf
    # The other side kept the duplicate it completed first and closed the link in use.
    assert membership.lost(1, DownReason.GOODBYE, DUPLICATE, now=10.0) == []
    assert membership.peers() == []
    assert membership.replacing(10.5) == membership.replacing(10.5, "final") == 11.0
    assert membership.replacing(10.5, "other") == -math.inf
    assert membership.replacing(11.0) == -math.inf  # its grace is over: expired, not awaited
    assert membership.established(2, info, dialled=True, address="127.0.0.3:4370", now=10.2).keep
    assert membership.replacing(10.2) == -math.inf
    assert [p.name for p in membership.peers()] == ["final"]


def cut_at_second_chunk(a: Node, b: Node, *, every_link: bool) -> list[int]:
    """Make b, on its first chunk on the link in use (link 1), have a dial it again (two
    links: link 1 is kept for the stream), and on its second end link 1 (``every_link``:
    all of b's links, as kill -9 would) so that chunk never arrives. Returns a one-item
    list: how many chunks came on link 1."""
    first_link = a._mesh._membership.link_of("b")
    link_1 = b._mesh._links[b._mesh._membership.link_of("a") or 0]
    handle = b._mesh._on_session_message
    chunks = [0]

    async def cut(peer: str, link: PeerLink, message: Message) -> None:
        if isinstance(message, Chunk) and link is link_1:
            chunks[0] += 1
            if chunks[0] == 1:
                a._spawn(a._mesh._dial, PeerAddress("127.0.0.3", b.port))
                await wait_until(
                    lambda: (
                        a._mesh._membership.link_of("b") not in (first_link, None)
                        and len(b._mesh._links) == len(a._mesh._links) == 2
                    )
                )
            else:
                for each in list(b._mesh._links.values()) if every_link else [link]:
                    await anyio.aclose_forcefully(each._stream)
                return
        await handle(peer, link, message)

    b._mesh._on_session_message = cut
    return chunks


async def test_after_an_offer_again_the_done_goes_on_a_link_that_is_up() -> None:
    # As above, a cache this time (re-sent freely: no chunk of it is in doubt), and link 1
    # ends after b acknowledged a first chunk: a offers it again on link 2, where the rest
    # arrives. The Done, which tells b what it received (and makes it warm), went on the
    # link of the first stream that b acknowledged something on: link 1, gone.
    entries = 4 * FIRST_CHUNK_RECORDS
    cache = {f"k{i}": f"v{i}" for i in range(entries)}
    received: dict[str, str] = {}
    a = make_node("a", "127.0.0.2")
    a.track("cache", cache)
    async with a:
        b = make_node("b", "127.0.0.3", peers=[a])
        b.track("cache", received)
        async with b:
            await wait_until(lambda: len(a.peers()) == len(b.peers()) == 1)
            chunks = cut_at_second_chunk(a, b, every_link=False)
            report = await a.drain(timeout=4.0)
            ns = report.namespaces["cache"]
            assert chunks[0] >= 2
            assert ns.acknowledged == entries, ns
            assert received == cache
            await wait_until(lambda: b.last_received is not None)
            assert b.last_received is not None
            assert (b.last_received.peer, b.last_received.records) == ("a", entries)


async def test_a_successor_that_dies_while_its_duplicate_link_is_retired_is_not_offered_again() -> (
    None
):
    # As kill -9 of b's links: at its second chunk, on link 1 (kept for the stream), both
    # of b's links end at once and the chunk is never applied. The first chunk is
    # acknowledged; b's process lives on here, so it dials again and a asks it which
    # chunks it applied: none more, and the rest goes back to a (not in doubt). Were b
    # dead, the rest would be in doubt. Either way every count is in one place.
    old_usage, new_usage = Counters(), Counters()
    for i in range(4 * FIRST_CHUNK_RECORDS):
        old_usage.incr(f"k{i}", 1)
    total = old_usage.total()
    a = make_node("a", "127.0.0.2")
    a.track("usage", old_usage)
    async with a:
        b = make_node("b", "127.0.0.3", peers=[a])
        b.track("usage", new_usage)
        async with b:
            await wait_until(lambda: len(a.peers()) == len(b.peers()) == 1)
            chunks = cut_at_second_chunk(a, b, every_link=True)
            report = await a.drain(timeout=4.0)
            ns = report.namespaces["usage"]
            assert chunks[0] >= 2
            assert ns.acknowledged == new_usage.total() > 0, ns
            assert ns.acknowledged + ns.in_doubt <= total
            assert new_usage.total() + old_usage.total() == total


async def test_a_done_that_never_comes_does_not_keep_the_duplicate_link_open() -> None:
    # The receiver keeps a duplicate link up until the sender's Done arrives on it (what
    # it applied awaits that Done); a Done never sent (the deadline came first) must not
    # keep it forever: the sender's end closes it once its drain is over.
    old_usage, new_usage = Counters(), Counters()
    for i in range(KEYS):
        old_usage.incr(f"k{i}", 1)
    a = make_node("a", "127.0.0.2")
    a.track("usage", old_usage)
    async with a:
        b = make_node("b", "127.0.0.3", peers=[a])
        b.track("usage", new_usage)
        async with b:
            await wait_until(lambda: len(a.peers()) == len(b.peers()) == 1)
            first = a._mesh._membership.link_of("b")
            assert first is not None
            link_1 = a._mesh._links[first]
            send = link_1.send
            handle = b._mesh._on_session_message
            dialled_back = anyio.Event()

            async def dial_back_at_first_chunk(peer: str, link: PeerLink, message: Message) -> None:
                if isinstance(message, Chunk) and not dialled_back.is_set():
                    dialled_back.set()
                    a._spawn(a._mesh._dial, PeerAddress("127.0.0.3", b.port))
                    await wait_until(lambda: len(b._mesh._links) == len(a._mesh._links) == 2)
                await handle(peer, link, message)

            async def no_done(message: Message, *, time_limit: float | None = None) -> None:
                if not isinstance(message, Done):
                    await send(message, time_limit=time_limit)

            b._mesh._on_session_message = dial_back_at_first_chunk
            link_1.send = no_done  # type: ignore[method-assign]
            report = await a.drain(timeout=3.0)
            assert dialled_back.is_set()
            assert report.namespaces["usage"].acknowledged == KEYS
            assert b._sessions.streams_with("a")  # b still waits for the Done
            await wait_until(lambda: len(a._mesh._links) == len(b._mesh._links) == 1)
            assert new_usage.total() == KEYS
