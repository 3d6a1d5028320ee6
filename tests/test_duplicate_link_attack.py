"""Attacks on duplicate links and their retirement (Mesh._retire) around a drain.

Two nodes that dial each other at once end with two links; both keep the one dialled by
the smaller name. The server side of a handshake completes first (it takes the client's
Info, then sends its own), so the node that keeps the new link may close the old one
(Goodbye "duplicate") before the other node has finished the new link's handshake: for that
moment the other node holds the peer (``Membership._held``), absent from its peers, its
replacement link on its way.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from handoff import Counters
from handoff.discovery import PeerAddress
from handoff.protocol import NodeState
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
