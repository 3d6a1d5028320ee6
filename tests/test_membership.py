"""The peer table's rules, without sockets: dedupe, restarts, holds, leaving."""

from __future__ import annotations

import math
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from handoff.membership import (
    DUPLICATE,
    NAME_IN_USE,
    DownReason,
    Membership,
    MembershipEvent,
    NodeDown,
    NodeLeaving,
    NodeUp,
)
from handoff.protocol import NodeState, PeerInfo


def info(name: str, incarnation: str = "i1", started_at: float = 1.0) -> PeerInfo:
    return PeerInfo(
        name=name,
        incarnation=incarnation,
        cluster="shop",
        release="v1",
        started_at=started_at,
        state=NodeState.SERVING,
        address=f"{name}:4370",
        namespaces=(),
        protocol_version=1,
        clock_offset=0.0,
    )


def kinds(events: tuple[MembershipEvent, ...] | list[MembershipEvent]) -> list[str]:
    return [event.kind for event in events]


def test_first_link_is_node_up() -> None:
    table = Membership("a", grace=5)
    decision = table.established(1, info("b"), dialled=True, address="b:4370", now=0)
    assert decision.keep
    assert decision.close == ()
    assert kinds(decision.events) == ["node-up"]
    assert [p.name for p in table.peers()] == ["b"]
    assert table.link_of("b") == 1


def test_both_sides_keep_the_link_dialled_by_the_smaller_name_in_any_order() -> None:
    # Link 1: a dialled b. Link 2: b dialled a. Both tables must settle on link 1.
    for order in ((1, 2), (2, 1)):
        a, b = Membership("a", grace=5), Membership("b", grace=5)
        events_a: list[MembershipEvent] = []
        events_b: list[MembershipEvent] = []
        for link in order:
            da = a.established(link, info("b"), dialled=link == 1, address="b", now=0)
            db = b.established(link, info("a"), dialled=link == 2, address="a", now=0)
            events_a += da.events
            events_b += db.events
        assert a.link_of("b") == 1
        assert b.link_of("a") == 1
        assert kinds(events_a) == ["node-up"]
        assert kinds(events_b) == ["node-up"]


def test_loser_link_closing_is_silent() -> None:
    table = Membership("a", grace=5)
    table.established(1, info("b"), dialled=True, address="b", now=0)
    decision = table.established(2, info("b"), dialled=False, address="b", now=0)
    assert not decision.keep
    assert table.lost(2, DownReason.CONNECTION_LOST, now=0) == []
    assert table.link_of("b") == 1


def test_swapped_link_closes_the_old_one_silently() -> None:
    table = Membership("a", grace=5)
    table.established(2, info("b"), dialled=False, address="b", now=0)
    decision = table.established(1, info("b"), dialled=True, address="b", now=0)
    assert decision.keep
    assert decision.close == (2,)
    assert decision.events == ()
    assert table.lost(2, DownReason.GOODBYE, DUPLICATE, now=0) == []


def test_duplicate_goodbye_holds_the_peer_until_its_replacement_arrives() -> None:
    table = Membership("b", grace=5)
    table.established(2, info("a"), dialled=True, address="a", now=0)
    # a closes link 2 as a duplicate: it prefers link 1, still in its handshake here.
    assert table.lost(2, DownReason.GOODBYE, DUPLICATE, now=10) == []
    assert table.peers() == []
    assert table.peer("a") is not None
    assert table.knows_address("a")
    assert table.next_deadline() == 15
    decision = table.established(1, info("a"), dialled=False, address="a", now=11)
    assert decision.keep
    assert decision.events == ()
    assert table.expire(100) == []
    assert table.next_deadline() == math.inf


def test_held_peer_without_replacement_goes_down_after_grace() -> None:
    table = Membership("b", grace=5)
    table.established(2, info("a"), dialled=True, address="a", now=0)
    table.lost(2, DownReason.GOODBYE, DUPLICATE, now=10)
    assert table.expire(14.9) == []
    events = table.expire(15)
    assert kinds(events) == ["node-down"]
    assert isinstance(events[0], NodeDown)
    assert events[0].reason is DownReason.CONNECTION_LOST


def test_held_peer_replaced_by_new_incarnation_after_the_grace_reports_restart() -> None:
    table = Membership("b", grace=5)
    table.established(2, info("a", "old"), dialled=True, address="a", now=0)
    table.lost(2, DownReason.GOODBYE, DUPLICATE, now=1)
    decision = table.established(3, info("a", "new", 2.0), dialled=True, address="a", now=6)
    assert decision.keep
    assert kinds(decision.events) == ["node-down", "node-up"]


def silent_since(heard: dict[int, float]) -> Callable[[int], float]:
    """``last_heard`` for the table: when each link last received bytes."""
    return lambda link: heard.get(link, -math.inf)


def test_new_incarnation_is_refused_while_the_old_link_is_heard_from() -> None:
    # A cookie holder claiming a live node's name with a later start time must not take
    # the name over: the real node would be dropped as "restarted" and its drain lost.
    table = Membership("a", grace=5, heartbeat_timeout=3)
    table.established(1, info("b", "real", started_at=1.0), dialled=True, address="b", now=0)
    for now in (0.0, 2.9):
        decision = table.established(
            2,
            info("b", "impostor", started_at=50.0),
            dialled=False,
            address="evil",
            now=now,
            last_heard=silent_since({1: 0.0}),
        )
        assert not decision.keep
        assert decision.reason == NAME_IN_USE
        assert decision.close == ()
        assert decision.events == ()
        assert table.link_of("b") == 1
        assert table.peers()[0].incarnation == "real"
        # The refused link ending is not news either.
        assert table.lost(2, DownReason.GOODBYE, NAME_IN_USE, now=now) == []
    assert not table.knows_address("evil")


def test_new_incarnation_replaces_one_silent_past_the_heartbeat_timeout() -> None:
    table = Membership("a", grace=5, heartbeat_timeout=3)
    table.established(1, info("b", "old", started_at=1.0), dialled=True, address="b", now=0)
    decision = table.established(
        2,
        info("b", "new", started_at=2.0),
        dialled=True,
        address="b",
        now=10,
        last_heard=silent_since({1: 7.0}),
    )
    assert decision.keep
    assert decision.close == (1,)
    assert kinds(decision.events) == ["node-down", "node-up"]
    down = decision.events[0]
    assert isinstance(down, NodeDown)
    assert down.reason is DownReason.RESTARTED
    assert down.peer.incarnation == "old"
    # The old link ending afterwards is not news.
    assert table.lost(1, DownReason.CONNECTION_LOST, now=10) == []
    assert table.peers()[0].incarnation == "new"


def test_restarted_node_gets_in_once_the_old_link_is_gone() -> None:
    table = Membership("a", grace=5, heartbeat_timeout=3)
    table.established(1, info("b", "old", started_at=1.0), dialled=True, address="b", now=0)
    refused = table.established(2, info("b", "new", 2.0), dialled=True, address="b", now=1)
    assert not refused.keep
    assert kinds(table.lost(1, DownReason.CONNECTION_LOST, now=1.5)) == ["node-down"]
    decision = table.established(3, info("b", "new", 2.0), dialled=True, address="b", now=2)
    assert decision.keep
    assert kinds(decision.events) == ["node-up"]


def test_stale_incarnation_arriving_late_is_refused() -> None:
    table = Membership("a", grace=5, heartbeat_timeout=3)
    table.established(1, info("b", "new", started_at=2.0), dialled=True, address="b", now=0)
    for now, heard in ((0.0, 0.0), (10.0, 0.0)):  # heard from or silent: still refused
        decision = table.established(
            2,
            info("b", "old", started_at=1.0),
            dialled=True,
            address="b",
            now=now,
            last_heard=silent_since({1: heard}),
        )
        assert not decision.keep
        assert decision.reason == NAME_IN_USE
        assert decision.events == ()


def test_other_incarnation_is_refused_while_a_duplicate_is_held() -> None:
    # The held peer said "my preferred link is on its way": it is alive until the grace ends.
    table = Membership("b", grace=5, heartbeat_timeout=3)
    table.established(2, info("a", "real"), dialled=True, address="a", now=0)
    table.lost(2, DownReason.GOODBYE, DUPLICATE, now=1)
    refused = table.established(3, info("a", "impostor", 9.0), dialled=False, address="x", now=2)
    assert not refused.keep
    assert refused.reason == NAME_IN_USE
    assert refused.events == ()
    # The real replacement still arrives silently.
    decision = table.established(4, info("a", "real"), dialled=False, address="a", now=3)
    assert decision.keep
    assert decision.events == ()


def test_draining_is_reported_once() -> None:
    table = Membership("a", grace=5)
    table.established(1, info("b"), dialled=True, address="b", now=0)
    events = table.state_changed(1, NodeState.DRAINING)
    assert kinds(events) == ["leaving"]
    assert isinstance(events[0], NodeLeaving)
    assert events[0].peer.state is NodeState.DRAINING
    assert not table.peers()[0].serving
    assert table.state_changed(1, NodeState.DRAINING) == []
    assert table.state_changed(99, NodeState.DRAINING) == []


def test_lost_link_reports_down_with_reason() -> None:
    table = Membership("a", grace=5)
    table.established(1, info("b"), dialled=True, address="b", now=0)
    events = table.lost(1, DownReason.HEARTBEAT_TIMEOUT, "silent 3 s", now=0)
    assert len(events) == 1
    down = events[0]
    assert isinstance(down, NodeDown)
    assert (down.reason, down.detail) == (DownReason.HEARTBEAT_TIMEOUT, "silent 3 s")
    assert table.peers() == []
    assert table.lost(1, DownReason.CONNECTION_LOST, now=0) == []


def test_addresses_of_both_links_are_known() -> None:
    table = Membership("a", grace=5)
    table.established(1, info("b"), dialled=True, address="10.0.0.2:4370", now=0)
    table.established(2, info("b"), dialled=False, address="10.0.0.2:51234", now=0)
    assert table.knows_address("10.0.0.2:4370")
    assert table.knows_address("10.0.0.2:51234")
    assert table.knows_address("b:4370")
    assert not table.knows_address("10.0.0.3:4370")


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["establish", "lost", "goodbye-dup", "expire"]),
            st.integers(1, 4),
            st.sampled_from(["i1", "i2"]),
            st.booleans(),
        ),
        max_size=30,
    )
)
def test_up_and_down_alternate_per_peer(
    steps: list[tuple[str, int, str, bool]],
) -> None:
    """Whatever links do, users never see two node-ups (or two node-downs) in a row."""
    table = Membership("a", grace=5)
    now = 0.0
    live_links: set[int] = set()
    up = False
    for action, link, incarnation, dialled in steps:
        now += 1
        events: list[MembershipEvent] = []
        if action == "establish" and link not in live_links:
            started = 1.0 if incarnation == "i1" else 2.0
            decision = table.established(
                link, info("b", incarnation, started), dialled=dialled, address="b", now=now
            )
            events += decision.events
            live_links.add(link)
            for closed in decision.close:
                events += table.lost(closed, DownReason.CONNECTION_LOST, now=now)
                live_links.discard(closed)
            if not decision.keep:
                events += table.lost(link, DownReason.CONNECTION_LOST, now=now)
                live_links.discard(link)
        elif action == "lost" and link in live_links:
            events += table.lost(link, DownReason.CONNECTION_LOST, now=now)
            live_links.discard(link)
        elif action == "goodbye-dup" and link in live_links:
            events += table.lost(link, DownReason.GOODBYE, DUPLICATE, now=now)
            live_links.discard(link)
        elif action == "expire":
            now += 10
            events += table.expire(now)
        for event in events:
            if isinstance(event, NodeUp):
                assert not up, "node-up while already up"
                up = True
            elif isinstance(event, NodeDown):
                assert up, "node-down while not up"
                up = False
        assert len(table.peers()) <= 1
        assert (table.link_of("b") is not None) <= up
