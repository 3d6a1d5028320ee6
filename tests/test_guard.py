"""Pending-handshake caps and log-line limits, without sockets and with a fake clock."""

from __future__ import annotations

import pytest

from handoff._guard import OVERFLOW_SOURCE, LogLimiter, PendingHandshakes, source_of


def test_sources_are_hosts_ipv4_mapped_as_ipv4_and_ipv6_by_64_prefix() -> None:
    assert source_of("10.0.0.7") == "10.0.0.7"
    assert source_of("::ffff:10.0.0.7") == "10.0.0.7"
    assert source_of("fdaa:0:1:a7b:7d:1:2:2") == source_of("fdaa:0:1:a7b:ffff::9")
    assert source_of("fdaa:0:1:a7b:7d:1:2:2") != source_of("fdaa:0:1:a7c:7d:1:2:2")
    assert source_of("fe80::1%eth0") == "fe80::/64"
    assert source_of("unknown") == "unknown"


def test_a_source_past_its_cap_evicts_its_own_oldest() -> None:
    pending = PendingHandshakes(total=100, per_source=2)
    honest = pending.admit("10.0.0.3")
    first, second = pending.admit("10.0.0.9"), pending.admit("10.0.0.9")
    third = pending.admit("10.0.0.9")
    assert third.evicted == (first.id,)
    assert pending.admit("10.0.0.9").evicted == (second.id,)
    assert pending.count("10.0.0.9") == 2
    assert pending.count("10.0.0.3") == 1
    assert honest.id is not None


def test_at_the_total_cap_the_biggest_source_pays_never_a_lone_peer() -> None:
    pending = PendingHandshakes(total=4, per_source=8)
    lone = pending.admit("10.0.0.3")  # the oldest of all: the old rule evicted it first
    for _ in range(3):
        pending.admit("10.0.0.9")
    for _ in range(50):
        admission = pending.admit("10.0.0.9")
        assert admission.id is not None
        assert len(admission.evicted) == 1
        assert admission.evicted[0] != lone.id
    assert pending.count("10.0.0.3") == 1
    assert len(pending) == 4
    # A newcomer from a third address takes its room from the flood too.
    other = pending.admit("10.0.0.4")
    assert len(other.evicted) == 1
    assert other.evicted[0] not in (lone.id, other.id)
    assert (pending.count("10.0.0.3"), pending.count("10.0.0.4")) == (1, 1)


def test_when_every_source_holds_one_the_oldest_makes_room() -> None:
    pending = PendingHandshakes(total=3, per_source=8)
    ids = [pending.admit(f"10.0.0.{i}").id for i in range(3)]
    newcomer = pending.admit("10.0.0.99")
    assert newcomer.evicted == (ids[0],)
    assert pending.count("10.0.0.0") == 0
    assert pending.count("10.0.0.99") == 1
    assert len(pending) == 3
    # The next newcomer evicts the next oldest, not the previous newcomer.
    assert pending.admit("10.0.0.98").evicted == (ids[1],)
    # One finished: room again, nobody evicted.
    pending.done(ids[2])
    pending.done(ids[2])  # idempotent
    assert pending.admit("10.0.0.97").evicted == ()
    # A second one from a source that holds one already evicts that source's own.
    again = pending.admit("10.0.0.99")
    assert again.evicted == (newcomer.id,)


def test_one_source_flooding_evicts_at_most_one_lone_handshake() -> None:
    pending = PendingHandshakes(total=4, per_source=2)
    lone = {pending.admit(f"10.0.0.{i}").id for i in range(4)}
    flood: set[int] = set()
    evicted: set[int] = set()
    for _ in range(50):
        admission = pending.admit("10.0.0.9")
        flood.add(admission.id)
        evicted.update(admission.evicted)
    assert len(evicted & lone) == 1, "the flood took more than its first room from others"
    assert sum(pending.count(f"10.0.0.{i}") for i in range(4)) == 3
    assert pending.count("10.0.0.9") == 1
    assert evicted - lone <= flood


def test_caps_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        PendingHandshakes(total=0, per_source=1)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_log_lines_per_source_are_limited_then_summarised_once() -> None:
    clock = FakeClock()
    limiter = LogLimiter(burst=3, interval=60.0, clock=clock)
    allowed = [limiter.allow("10.0.0.9") for _ in range(100)]
    assert allowed == [True] * 3 + [False] * 97
    # Another source has a budget of its own.
    assert limiter.allow("10.0.0.3")
    clock.now += 59.9
    assert not limiter.allow("10.0.0.9")
    assert limiter.flush() == []  # the interval has not ended: nothing to summarise yet
    clock.now += 0.1
    assert limiter.flush() == [("10.0.0.9", 98)]
    assert limiter.flush() == []  # reported once
    assert limiter.allow("10.0.0.9")


def test_a_line_after_the_interval_starts_a_new_one_and_keeps_the_count() -> None:
    clock = FakeClock()
    limiter = LogLimiter(burst=1, interval=10.0, clock=clock)
    assert [limiter.allow("s") for _ in range(5)] == [True, False, False, False, False]
    clock.now += 10
    assert limiter.allow("s")  # before any flush
    assert not limiter.allow("s")
    assert limiter.flush() == [("s", 4)]
    clock.now += 10
    assert limiter.flush() == [("s", 1)]


def test_many_sources_share_one_budget_past_the_table_size() -> None:
    clock = FakeClock()
    limiter = LogLimiter(burst=2, interval=10.0, clock=clock, max_sources=4)
    assert all(limiter.allow(f"10.0.1.{i}") for i in range(4))
    allowed = [limiter.allow(f"10.0.2.{i}") for i in range(1000)]
    assert sum(allowed) == 2
    clock.now += 10
    assert limiter.flush() == [(OVERFLOW_SOURCE, 998)]
