"""Attacks on the drain's sender (per-link writer tasks, Ack-rate chunk sizing), with the
fake links and fake clock of ``test_engine_unit``: each test drives the real Drainer,
Receiver and Sessions of fake nodes, and time moves only when the test moves it."""

from __future__ import annotations

from typing import Any

import pytest

from handoff.engine import _sender
from handoff.protocol import Ack, Chunk, Offer, Refuse
from tests.test_engine_unit import (
    Net,
    Wire,
    assert_adds_up,
    block_after_chunk,
    counts,
    network,
    tally,
    total,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every chunk holds 16 records (as in ``test_engine_unit``)."""
    monkeypatch.setattr(_sender, "TARGET_CHUNK_BYTES", 1)


def queued_chunks(net: Net, node: str, wire: Wire) -> list[Chunk]:
    """Chunks ``node``'s drain queued on ``wire``'s writer that it has not begun to write."""
    drainer: Any = net.nodes[node].sessions._drainer
    if drainer is None:
        return []
    writer = drainer._writers.get(id(wire))
    if writer is None:
        return []
    return [message for _, message, _, _ in writer.queue if isinstance(message, Chunk)]


def inject(wire: Wire, *messages: Any) -> None:
    """Messages that ``wire``'s sender never wrote arrive as if it had (a hostile peer)."""
    wire.queue.extend(messages)
    wire.release()


async def test_an_ack_for_a_chunk_still_queued_on_the_writer_drops_the_link() -> None:
    """Counters: a's write of b's chunk 1 hangs, chunks behind it wait in a's writer. b
    (hostile) acknowledges one of those it never received, then withdraws. That Ack can
    only be a lie: taking it would count the chunk acknowledged, and the withdrawal would
    then take it out of the queue unwritten: its counts would vanish from the cluster.
    The drain must treat it as a protocol error (the link drops, the records go to c)."""
    held = counts("k", 200)
    expected = total(held)
    async with network() as net:
        a = net.node("a", tally("usage", dict(held)))
        b = net.node("b", tally("usage", {}), release="v2")
        c = net.node("c", tally("usage", {}), release="v2")
        net.connect(a, b, c)
        a_b, b_a = net.wire(a, b), net.wire(b, a)
        block_after_chunk(a_b, 1)
        draining = net.start(lambda: a.drain(time_limit=10.0))
        await net.drive(lambda: bool(queued_chunks(net, "a", a_b)))
        [offer] = [m for m in a_b.sent if isinstance(m, Offer)]
        unwritten = queued_chunks(net, "a", a_b)[0]
        assert unwritten.seq not in {m.seq for m in a_b.sent if isinstance(m, Chunk)}
        forged = Ack(offer.stream, unwritten.seq, unwritten.records, 0, (), 1)
        inject(b_a, forged, Refuse(offer.stream, "hostile"))
        report = await net.finish(draining)

    assert_adds_up(report)
    assert any(at == "a" and peer == "b" for at, peer, _ in net.protocol_errors)
    ns = report.namespaces["usage"]
    # Nothing counted for a chunk b never got, nothing lost from the cluster.
    assert ns.per_successor.get("b") is None or ns.per_successor["b"].acknowledged <= 16
    assert total(a.data("usage"), b.data("usage"), c.data("usage")) == expected
