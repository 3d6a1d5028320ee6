"""A peer whose link in use keeps ending while a stream with it is under way: the node
redials it at once (to ask what it applied) and keeps a replaced duplicate up while streams
with the peer run (``Mesh._retire``). Both on loopback meshes (``tests/test_mesh.py``'s
Harness), no timed assertion: each step waits for the state it needs."""

from __future__ import annotations

import functools

import anyio
import pytest

from handoff.discovery import PeerAddress
from tests._helpers import wait_until
from tests.test_mesh import Harness

pytestmark = pytest.mark.anyio

CYCLES = 3


def linked_anew(node: Harness, old: int | None) -> bool:
    """Whether ``node``'s link in use to a is another than ``old``."""
    return node.mesh._membership.link_of("a") not in (None, old)


async def test_a_peer_that_keeps_ending_its_link_leaves_at_most_one_duplicate() -> None:
    """z has a stream with a that does not end (a never says Done: hostile, or a drain
    still running); a's name wins the tie-break, so a link a dials replaces one z dialled,
    and z keeps the replaced one up for the stream. a then ends the link in use (no
    goodbye): z redials, and a dials again. z kept every replaced link for as long as any
    stream with a ran, though the end of the link in use had ended every stream with a (on
    all links): a socket and a heartbeat loop per cycle, without bound. Now a duplicate is
    kept only while the link that replaced it is the one in use."""
    z = Harness("z", "127.0.0.2", streams_with=lambda peer: True)
    # a keeps its duplicates too (it streams with z as well): z's are what is counted.
    a = Harness("a", "127.0.0.3", streams_with=lambda peer: True)
    a.mesh._redial = lambda address: None  # type: ignore[method-assign]  # a dials when it likes
    async with a.run(), z.run(dial=[a]):
        await wait_until(lambda: len(z.mesh.peer_links()) == len(a.mesh.peer_links()) == 1)
        for _ in range(CYCLES):
            before = z.mesh._membership.link_of("a")
            a._spawn(a.mesh._dial, PeerAddress(z.host, z.port))
            # a's link (preferred) replaces z's: the one z dialled is kept as a duplicate.
            await wait_until(functools.partial(linked_anew, z, before))
            [(_, in_use)] = a.mesh.peer_links()
            replaced = z.mesh._membership.link_of("a")
            await anyio.aclose_forcefully(in_use._stream)  # cut, no goodbye
            # z redials at once (it streams with a): linked again, ...
            await wait_until(functools.partial(linked_anew, z, replaced))
            await wait_until(lambda: len(a.mesh.peer_links()) == 1)
            # ... and holds the link in use and at most one duplicate (it held one more
            # after each cycle: this waited in vain).
            await wait_until(lambda: len(z.mesh._links) <= 2)
        assert len(z.mesh._links) <= 2
