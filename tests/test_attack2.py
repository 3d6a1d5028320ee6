"""Second attack on protocol 2, the mesh hardening and snapshot files (review of issue 8).

Each test is a finding: a reproduction that failed before its fix (or is marked xfail with
the reason when it is not fixed here).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from handoff import Node
from handoff._codec import Codec
from handoff._guard import PendingHandshakes
from handoff._keys import cluster_key
from handoff._registry import adapter_for
from handoff.engine._restore import restore_snapshots
from handoff.engine._tracked import Tracked
from handoff.membership import Membership
from handoff.protocol import (
    Connection,
    HandshakeComplete,
    LocalNode,
    NodeState,
    PeerInfo,
    Role,
)
from handoff.snapshot import DirectorySnapshotStore
from handoff.transforms import Transforms
from tests._helpers import CLUSTER, COOKIE, connected, make_node, wait_until

HOST_A, HOST_B, HOST_EVIL = "127.0.0.2", "127.0.0.3", "127.0.0.9"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def info(name: str, incarnation: str, *, address: str) -> PeerInfo:
    return PeerInfo(
        name=name,
        incarnation=incarnation,
        cluster=CLUSTER,
        release="v1",
        started_at=1.0,
        state=NodeState.SERVING,
        address=address,
        namespaces=(),
        protocol_version=2,
        clock_offset=0.0,
    )


# -- name takeover through the duplicate-link tie-break ----------------------------------------
#
# The incarnation is no secret: it travels in clear in every Hello and Welcome (anyone who
# sends a Hello to a node gets its Welcome). Two links of the same incarnation are settled by
# the tie-break "keep the link dialled by the smaller name". When the node with the larger
# name dialled first, the smaller-named one never dials (it knows the address already), so
# the settled link is the non-preferred one for good; a cookie holder who then dials in under
# the smaller name and its incarnation is "preferred" and replaced the real node's live link.


def test_a_same_incarnation_claim_does_not_replace_a_settled_live_link() -> None:
    table = Membership("node-z", grace=1.0, heartbeat_timeout=3.0)
    real = info("node-a", "inc-of-a", address="127.0.0.3:4370")
    assert table.established(1, real, dialled=True, address="127.0.0.3:4370", now=0.0).keep
    # Long after: the real link is heard from (last_heard = now); an insider claims node-a.
    forged = info("node-a", "inc-of-a", address="")
    decision = table.established(
        2, forged, dialled=False, address="127.0.0.9:5555", now=60.0, last_heard=lambda _: 60.0
    )
    assert not decision.keep
    assert decision.close == ()
    assert table.link_of("node-a") == 1


def test_a_simultaneous_dial_still_settles_on_the_preferred_link() -> None:
    # The legitimate duplicate: both nodes dial at once, the preferred link completes a
    # moment after the other one. It must still replace it, or both sides close both links.
    table = Membership("node-z", grace=1.0, heartbeat_timeout=3.0)
    real = info("node-a", "inc-of-a", address="127.0.0.3:4370")
    table.established(1, real, dialled=True, address="127.0.0.3:4370", now=0.0)
    decision = table.established(
        2, real, dialled=False, address="127.0.0.3:40000", now=0.3, last_heard=lambda _: 0.3
    )
    assert decision.keep
    assert decision.close == (1,)


def test_a_dead_non_preferred_link_is_replaced_by_the_same_incarnation() -> None:
    # The real peer redials after its side lost the link; ours is silent past the timeout.
    table = Membership("node-z", grace=1.0, heartbeat_timeout=3.0)
    real = info("node-a", "inc-of-a", address="127.0.0.3:4370")
    table.established(1, real, dialled=True, address="127.0.0.3:4370", now=0.0)
    decision = table.established(
        2, real, dialled=False, address="127.0.0.3:40000", now=60.0, last_heard=lambda _: 56.0
    )
    assert decision.keep
    assert decision.close == (1,)


@asynccontextmanager
async def insider(target: Node, name: str, incarnation: str) -> AsyncIterator[Connection]:
    """A cookie holder that dials ``target`` claiming ``name`` and ``incarnation``, completes
    the handshake and keeps the link alive (heartbeats) while the block runs."""
    local = LocalNode(CLUSTER, name, incarnation, "evil", 0.0)
    connection = Connection(Role.CLIENT, local, COOKIE, now=anyio.current_time())
    host, port = target.address.rsplit(":", 1)
    stream = await anyio.connect_tcp(host, int(port), local_host=HOST_EVIL)
    async with stream, anyio.create_task_group() as tg:
        await stream.send(connection.data_to_send())
        established = anyio.Event()

        async def pump() -> None:
            with anyio.move_on_after(30):
                for _ in range(10_000):
                    try:
                        with anyio.move_on_after(0.2):
                            data = await stream.receive()
                            for event in connection.receive_data(data, now=anyio.current_time()):
                                if isinstance(event, HandshakeComplete):
                                    established.set()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        established.set()
                        return
                    connection.tick(now=anyio.current_time())
                    if out := connection.data_to_send():
                        await stream.send(out)

        tg.start_soon(pump)
        with anyio.fail_after(5):
            await established.wait()
        yield connection
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_an_insider_cannot_take_over_a_live_nodes_name_with_its_incarnation() -> None:
    b = make_node("node-a", HOST_B)  # the smaller name; dials nobody
    async with b:
        a = make_node("node-z", HOST_A, peers=[b])  # dials b: the non-preferred link
        async with a:
            await wait_until(connected(a, b))
            real_address = a.peers()[0].address
            await anyio.sleep(1.2)  # past the grace in which two dials race each other
            async with insider(a, "node-a", b.incarnation):
                await anyio.sleep(0.5)
                # A still talks to the real node-a; the real node-a still sees node-z.
                assert [p.address for p in a.peers()] == [real_address]
                assert [p.name for p in b.peers()] == ["node-z"]


# -- one snapshot restored by two nodes sharing the directory ----------------------------------


def test_a_snapshot_is_restored_by_one_node_only(tmp_path: Path) -> None:
    """Two nodes sharing HANDOFF_SNAPSHOT_DIR (workers of one machine) that start together
    must not both apply one snapshot: harmless for caches, a double count for counters."""
    key = cluster_key(b"snapshot-tests-cookie-0123456789", CLUSTER).derive("snapshot")
    first, second = (DirectorySnapshotStore(tmp_path, key=key) for _ in range(2))
    codec = Codec()
    data, failed = codec.encode_records([("k", 1, None)])
    assert not failed
    with first.begin(
        "n", cluster=CLUSTER, kind="mapping", version=1, node="old", release="v1",
        created_at=time.time(),
    ) as writer:  # fmt: skip
        writer.write_chunk(data, 1)
        writer.commit()

    targets: list[dict[str, Any]] = [{}, {}]
    raced: list[bool] = []

    def restore(
        store: DirectorySnapshotStore,
        target: dict[str, Any],
        validate: Callable[[Any, Any], bool] | None = None,
    ) -> None:
        restore_snapshots(
            store,
            cluster=CLUSTER,
            tracked={"n": Tracked("n", target, adapter_for(target), 1, validate)},
            transforms=Transforms(),
            codec=codec,
        )

    def second_node_starts(key: Any, value: Any) -> bool:
        # Runs in the first node's applying pass, with the file open and verified: the
        # second node starts right then, on the same directory.
        if not raced:
            raced.append(True)
            restore(second, targets[1])
        return True

    restore(first, targets[0], second_node_starts)
    assert raced
    assert [len(t) for t in targets].count(1) == 1, f"restored by both nodes: {targets}"
    assert targets[0] == {"k": 1}, "the first to claim it restores it"
    assert first.pending(CLUSTER) == []


# -- pending handshakes held by many addresses, one each ---------------------------------------


def test_singleton_sources_cannot_keep_a_new_peer_out() -> None:
    """Whoever holds ``total`` addresses, one silent handshake each, renewed as each times
    out or is evicted, used to keep every newcomer out. Now the newcomer evicts the oldest,
    and the attacker must open ``total`` new connections from distinct addresses before the
    newcomer's round trip ends to evict it in turn."""
    pending = PendingHandshakes(total=4, per_source=2)
    attacker = {f"127.0.0.{10 + i}": pending.admit(f"127.0.0.{10 + i}").id for i in range(4)}
    newcomer = pending.admit("127.0.0.3")
    assert newcomer.evicted == (attacker["127.0.0.10"],)
    assert pending.count("127.0.0.3") == 1
    assert len(pending) == 4
    # The attacker renews what was evicted, each renewal evicting the oldest left: its own.
    renewals = ["127.0.0.10", "127.0.0.11", "127.0.0.12"]
    for host in renewals:
        renewal = pending.admit(host)
        assert newcomer.id not in renewal.evicted
        assert pending.count("127.0.0.3") == 1
    pending.done(newcomer.id)  # the genuine peer's round trip ends: it is in
    assert len(pending) == 3
