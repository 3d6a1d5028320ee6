"""handoff._referrals.Referrals: what peers say about their peers (Peers), without sockets;
and, through meshes on loopback, that a node learns and dials a node discovery does not
give, waits for its first peers' lists, and never sends Peers to a peer of protocol 4."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest

from handoff import _mesh
from handoff._referrals import Referrals
from handoff.protocol import Connection, LocalNode, Role
from handoff.protocol._connection import SUPPORTED_VERSIONS
from tests._helpers import CLUSTER, wait_until
from tests.test_mesh import Harness

NOBODY_LINKED: set[str] = set()


def linked(*names: str) -> set[str]:
    return set(names)


def not_own(address: str) -> bool:
    return False


def test_a_list_names_other_nodes_at_addresses_that_parse() -> None:
    table = Referrals("me")
    table.report(
        "a",
        [
            ("me", "10.0.0.1:4370"),  # this node
            ("a", "10.0.0.2:4370"),  # the reporter itself: linked already
            ("c", "10.0.0.3:4370"),
            ("d", "not an address"),
            ("e", "10.0.0.5"),  # no port
            ("f", "[fd00::6]:4370"),
            ("g", "10.0.0.3:4370"),  # an address listed already
            ("h", "10.0.0.8:4370"),  # one of this node's own addresses
        ],
        own={"10.0.0.8:4370"}.__contains__,
    )
    assert [(name, str(target)) for name, target in table.listed()] == [
        ("c", "10.0.0.3:4370"),
        ("f", "[fd00::6]:4370"),
    ]
    assert table.pending(NOBODY_LINKED.__contains__) == ["10.0.0.3:4370", "[fd00::6]:4370"]
    # Linked by name: nothing to dial, nothing pending.
    assert table.pending(linked("c").__contains__) == ["[fd00::6]:4370"]
    assert [str(t) for t in table.to_dial(linked("c").__contains__)] == ["[fd00::6]:4370"]


def test_a_list_replaces_its_reporters_last_one_and_goes_with_its_link() -> None:
    table = Referrals("me")
    assert table.report("a", [("c", "10.0.0.3:1")], own=not_own)  # a's first list
    assert table.report("b", [("c", "10.0.0.3:1"), ("d", "10.0.0.4:1")], own=not_own)
    assert table.pending(NOBODY_LINKED.__contains__) == ["10.0.0.3:1", "10.0.0.4:1"]
    assert not table.report("b", [], own=not_own)  # b's link to d ended
    assert table.pending(NOBODY_LINKED.__contains__) == ["10.0.0.3:1"]
    table.forget("a")
    assert table.pending(NOBODY_LINKED.__contains__) == []
    assert table.report("a", [], own=not_own)  # linked again: a first list again


def test_a_refused_dial_settles_an_address_and_a_timeout_does_not() -> None:
    table = Referrals("me")
    table.report("a", [("c", "10.0.0.3:1"), ("d", "10.0.0.4:1")], own=not_own)
    table.dialled("10.0.0.3:1", reached=None, timed_out=False)  # refused: nobody there
    table.dialled("10.0.0.4:1", reached=None, timed_out=True)  # may be a partition
    assert table.pending(NOBODY_LINKED.__contains__) == ["10.0.0.4:1"]
    # Another node than the one listed answers there: the listed one is not there.
    table.dialled("10.0.0.4:1", reached="x", timed_out=False)
    assert table.pending(NOBODY_LINKED.__contains__) == []
    # Still dialled at every poll while unlinked: a node may come to listen there.
    assert [str(t) for t in table.to_dial(NOBODY_LINKED.__contains__)] == [
        "10.0.0.3:1",
        "10.0.0.4:1",
    ]
    table.dialled("10.0.0.3:1", reached=None, timed_out=True)  # now silent, not refusing
    assert table.pending(NOBODY_LINKED.__contains__) == ["10.0.0.3:1"]
    table.dialled("10.0.0.9:1", reached=None, timed_out=False)  # listed by nobody: ignored
    assert table.pending(NOBODY_LINKED.__contains__) == ["10.0.0.3:1"]


def test_hostile_lists_cannot_make_a_node_dial_without_bound() -> None:
    table = Referrals("me", max_addresses=300)
    for n, reporter in enumerate(("evil1", "evil2", "evil3")):
        entries = [(f"{reporter}-{i}", f"10.0.{n}.1:{i + 1}") for i in range(250)]
        table.report(reporter, entries, own=not_own)
    assert len(table.to_dial(NOBODY_LINKED.__contains__)) == 300
    assert len(table.pending(NOBODY_LINKED.__contains__)) == 300
    # The first reporters' lists come first; the rest is left out, not queued.
    assert {name.split("-")[0] for name, _ in table.listed()} == {"evil1", "evil2"}
    table.forget("evil1")
    assert {name.split("-")[0] for name, _ in table.listed()} == {"evil2", "evil3"}


# -- meshes on loopback -------------------------------------------------------------------


class Advertised(Harness):
    """A Harness whose node says where it listens (as a Node does), and whose connections
    may speak only ``versions``."""

    def __init__(self, *args: object, versions: Sequence[int] = SUPPORTED_VERSIONS) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.versions = tuple(versions)
        self.mesh._connection = self._connection  # type: ignore[method-assign]
        self.lists_sent: list[str] = []
        send_list = self.mesh._send_list

        async def record(link: object, name: str) -> None:
            self.lists_sent.append(name)
            await send_list(link, name)  # type: ignore[arg-type]

        self.mesh._send_list = record  # type: ignore[method-assign]

    def _local_node(self) -> LocalNode:
        address = f"{self.host}:{self.port}" if self.port else ""
        return LocalNode(
            CLUSTER,
            self.name,
            f"incarnation-of-{self.name}",
            "v1",
            0.0,
            state=self.mesh.state,
            address=address,
        )

    def _connection(self, role: Role) -> Connection:
        return Connection(
            role,
            self._local_node(),
            self.settings.cookie,
            now=anyio.current_time(),
            limits=self.mesh._limits,
            versions=self.versions,
        )


def names(harness: Harness) -> list[str]:
    return [peer.name for peer in harness.mesh.peers()]


@pytest.mark.anyio
async def test_a_node_learns_a_peer_discovery_does_not_give_and_waits_for_the_lists() -> None:
    a, b, c = (
        Advertised("a", "127.0.0.2"),
        Advertised("b", "127.0.0.3"),
        Advertised("c", "127.0.0.4"),
    )
    async with a.run(), c.run(dial=[a]):
        await wait_until(lambda: names(a) == ["c"])
        # b finds only a (c left discovery): it learns c from a's list and links it.
        async with b.run(dial=[a]):
            await wait_until(lambda: names(b) == ["a", "c"])
            await wait_until(lambda: b.mesh.unlinked() == [])
            assert "b" in a.lists_sent


@pytest.mark.anyio
async def test_until_a_first_round_peers_list_comes_its_peers_may_hold_anything() -> None:
    a, b = Advertised("a", "127.0.0.2"), Advertised("b", "127.0.0.3")

    async def silent(link: object, name: str) -> None:
        return  # a peer that never sends its list

    a.mesh._send_list = silent  # type: ignore[method-assign]
    async with a.run(), b.run(dial=[a]):
        await wait_until(lambda: names(b) == ["a"])
        await anyio.sleep(0.3)  # several of a's list intervals
        assert b.mesh.unlinked() == ["a (its list of peers)"]


@pytest.mark.anyio
async def test_a_peer_of_protocol_4_is_never_sent_a_list() -> None:
    old = Advertised("old", "127.0.0.2", versions=(3, 4))
    a, c = Advertised("a", "127.0.0.3"), Advertised("c", "127.0.0.4")
    async with old.run(), a.run(dial=[old]), c.run(dial=[a]):
        await wait_until(lambda: names(a) == ["c", "old"])
        await wait_until(lambda: "c" in a.lists_sent)
        await wait_until(lambda: names(old) == ["a", "c"])  # c learnt it from a
        await anyio.sleep(0.2)
        assert "old" not in a.lists_sent + c.lists_sent
        assert "a" not in old.lists_sent


@pytest.mark.anyio
async def test_a_new_link_is_not_told_to_peers_but_an_ended_one_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Lists after the first go only to peers told of a node this one is no longer linked
    to: telling every new link to every peer made a 32-node join send ~1,000 lists a second,
    whose CPU dropped half-made links (tests/test_scale.py)."""
    monkeypatch.setattr(_mesh, "REFERRAL_INTERVAL", 0.05)
    a, b, c = (
        Advertised("a", "127.0.0.2"),
        Advertised("b", "127.0.0.3"),
        Advertised("c", "127.0.0.4"),
    )
    async with a.run(), c.run(dial=[a]):
        await wait_until(lambda: names(a) == ["c"])
        async with b.run(dial=[a]):
            await wait_until(lambda: names(a) == ["b", "c"] and names(b) == ["a", "c"])
            await wait_until(lambda: "b" in a.lists_sent)
            await anyio.sleep(0.3)  # several intervals after a's links changed
            assert a.lists_sent.count("b") == 1, a.lists_sent
            assert a.lists_sent.count("c") == 1, a.lists_sent
            # c leaves: b, told of c by a, hears that a's link to c ended.
            await c.mesh.stop("leaving")
            await wait_until(lambda: names(a) == ["b"])
            await wait_until(lambda: a.lists_sent.count("b") == 2)
            assert "c" not in a.mesh._names_sent
