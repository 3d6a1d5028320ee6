"""A successor whose Ack rate changes under the drain: slow, then fast, then it stops
answering. The sender sizes chunks and what it keeps in flight by the measured Ack rate
(``Drainer._room``); with the fake links and clock of ``test_engine_unit``."""

from __future__ import annotations

import pytest

from handoff.engine import _sender
from handoff.protocol import Ack
from tests.test_engine_unit import assert_adds_up, counts, network, tally, total

pytestmark = pytest.mark.anyio


async def test_slow_then_fast_then_silent_successor_keeps_the_deadline_and_counts_exact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_sender, "TARGET_CHUNK_BYTES", 1024 * 1024)
    time_limit = 3.0
    held = counts("k", 3000)
    expected = total(held)
    async with network() as net:
        a = net.node("a", tally("usage", dict(held)))
        b = net.node("b", tally("usage", {}), release="v2")
        net.connect(a, b)
        to_b, to_a = net.wire(a, b), net.wire(b, a)
        to_b.bytes_per_second = 5_000.0
        started = net.clock.now()
        running = net.start(lambda: a.drain(time_limit=time_limit))
        await net.drive(lambda: net.clock.now() >= started + 0.6 or running.done.is_set())
        slow_acks = sum(isinstance(m, Ack) for m in to_a.delivered)
        to_b.bytes_per_second = 50_000.0  # ten times as fast from here
        await net.drive(
            lambda: (
                sum(isinstance(m, Ack) for m in to_a.delivered) >= slow_acks + 2
                or running.done.is_set()
            )
        )
        to_a.hold()  # b applies what arrives and answers nothing from here
        report = await net.finish(running)
        elapsed = net.clock.now() - started
        in_flight_at_the_end = to_b.max_in_flight
        # The node runs on; b answers again: the late answers tell the fate of what was
        # in flight when it went silent.
        to_a.release()
        await net.drive(lambda: not a.sessions._finished, jumps=400)

    assert slow_acks >= 1
    assert elapsed <= time_limit
    assert_adds_up(report)
    ns = report.namespaces["usage"]
    assert 0 < ns.acknowledged < 3000, ns
    assert in_flight_at_the_end >= 1
    assert total(a.data("usage"), b.data("usage")) == expected


async def test_a_streams_first_chunk_is_small_even_when_the_records_size_is_known(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Once the drain knew the records' size (here from an earlier namespace; in
    # test_sender_attack's all-slow test from another successor, for 1 hash seed in 8),
    # a new stream's first chunk was sized to the starting 64 KiB: at 5 KB/s it took
    # seconds, past the stall time (0.5 s of a 2 s drain), and the healthy successor was
    # given up on before it could answer ("made no progress"), its share dropped.
    monkeypatch.setattr(_sender, "TARGET_CHUNK_BYTES", 1024 * 1024)
    first, second = counts("f", 16), counts("s", 2000)
    async with network() as net:
        a = net.node("a", tally("a_first", dict(first)), tally("b_second", dict(second)))
        b = net.node("b", tally("a_first", {}), tally("b_second", {}), release="v2")
        net.connect(a, b)
        net.wire(a, b).bytes_per_second = 5_000.0
        report = await net.finish(net.start(lambda: a.drain(time_limit=2.0)))
        await net.drive(lambda: not a.sessions._finished, jumps=400)
    assert_adds_up(report)
    ns = report.namespaces["b_second"]
    assert "b" not in ns.refusals, ns
    assert ns.acknowledged > 0, ns
    assert total(a.data("b_second"), b.data("b_second")) == total(second)
