"""Attack 9 on exactly-once counters (issue 9): each finding is a test here.

Most tests run the real engine over the fake network of ``tests/test_engine_unit.py`` (no
sockets, time moves only when every task is blocked): see its module documentation.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from handoff.protocol import Ack, Chunk, Message
from tests.test_engine_unit import (
    assert_adds_up,
    chunk_total,
    counts,
    network,
    small_chunks,
    tally,
    total,
    Wire,
)

__all__ = ("small_chunks",)  # the fake network's autouse fixture: chunks of 16 records

pytestmark = pytest.mark.anyio


async def test_finding_9a_a_chunk_never_sent_at_the_streaming_deadline_is_not_lost() -> None:
    """Finding 9a. The first successor's link blocks (a full buffer) on its first chunk: the
    drain waits on that send until the end of the streaming time, then that link drops. The
    drain then flushes the other successor's queued records: it has credit, so ``_flush``
    recorded the chunk as in flight (bound to it) and ``_send`` refused it, out of time,
    failing the stream *without* sending anything. The chunk stayed bound: reported
    "outcome unknown: sent to <peer>", never given back nor snapshotted, and the peer's
    stream was left open (no Cancel). Counts nobody ever received vanished."""
    held = counts("k", 20)
    expected = total(held)
    async with network() as net:
        a = net.node("a", tally("usage", dict(held)))
        b = net.node("b", tally("usage", {}), release="v2")
        c = net.node("c", tally("usage", {}), release="v2")
        net.connect(a, b, c)
        a_b, a_c = net.wire(a, b), net.wire(a, c)
        blocked: list[str] = []

        def block_first_chunk(wire: Wire) -> Callable[[Message], None]:
            def on_send(message: Message) -> None:
                if isinstance(message, Chunk) and not blocked:
                    blocked.append(wire.dst.name)
                    wire.block()

            return on_send

        a_b.on_send, a_c.on_send = block_first_chunk(a_b), block_first_chunk(a_c)
        report = await net.finish(net.start(lambda: a.drain(time_limit=10.0)))

    assert blocked
    other = {"b": c, "c": b}[blocked[0]]
    to_other = net.wire(a, other)
    assert_adds_up(report)
    ns = report.namespaces["usage"]
    unknown = [reason for reason in ns.dropped if reason.startswith("outcome unknown")]
    # Nothing sent to the other successor lacks an answer: every chunk it got, it acknowledged.
    assert [m.seq for m in to_other.delivered if isinstance(m, Chunk)] == [
        m.seq for m in net.wire(other, a).delivered if isinstance(m, Ack)
    ]
    assert not unknown, ns.dropped
    # Every count is somewhere: given back to a, or applied by b or c.
    assert total(a.data("usage"), b.data("usage"), c.data("usage")) == expected
    # And the other successor does not keep waiting for a stream nobody ends.
    assert other.receiver.active == 0


