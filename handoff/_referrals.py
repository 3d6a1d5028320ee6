"""What peers say about the peers they are linked to (:class:`~handoff.protocol.Peers`).

Pure logic, no sockets: the mesh feeds it the lists peers send and the outcome of its dials,
and asks which addresses to dial and which still count as possible holders of actors.

Why: absence from discovery is not absence from the cluster. A draining node leaves DNS
(Fly's ``.internal``, a Kubernetes headless service) while it still holds actors; a node
that starts then never finds it through discovery and would take its keys for unclaimed.
Its peers still have links to it, and say so.

Bounds, because the lists come from peers: an authenticated peer names at most
:data:`~handoff.protocol.MAX_REFERRALS` peers per list, a list replaces that peer's last one,
and at most ``max_addresses`` distinct addresses (over all reporters) are dialled or count as
pending, at once when a peer's first list comes, then at each discovery poll: a hostile
peer can make a node dial no more than that many addresses per poll (and per link it
establishes), each of them only to run the usual handshake (nothing is sent before mutual
authentication but what every ``Hello`` says).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from handoff._errors import ConfigError
from handoff.discovery import PeerAddress
from handoff.discovery._spec import parse_host_port

__all__ = ("MAX_LEARNED", "Referrals")

MAX_LEARNED = 256
"""Distinct addresses learned from peers that a node dials (and counts as pending) at most."""


class Referrals:
    """Peers' lists of their peers, and what dialling the addresses found.

    An address a peer lists is *pending* while some linked peer lists it, no link to a peer
    of the name listed with it exists, and the last dial there did not show that nobody of
    this cluster listens (refused, another cluster, another name). A dial that times out
    leaves it pending: it may be a partition, and the node there may hold actors.
    """

    def __init__(self, local_name: str, *, max_addresses: int = MAX_LEARNED) -> None:
        self._local_name = local_name
        self._max = max_addresses
        self._reports: dict[str, tuple[tuple[str, PeerAddress], ...]] = {}
        # Addresses where the last dial found nobody of the name listed with it.
        self._nobody: set[str] = set()

    def report(
        self, reporter: str, peers: Iterable[tuple[str, str]], *, own: Callable[[str], bool]
    ) -> bool:
        """``reporter``'s list now (it replaces the last one); True if it is the first from
        ``reporter`` since it linked. Entries naming this node, an address of its own
        (``own``), or an address that is no ``host:port`` are left out."""
        first = reporter not in self._reports
        kept: dict[str, tuple[str, PeerAddress]] = {}
        for name, address in peers:
            if name == self._local_name or name == reporter:
                continue
            try:
                host, port = parse_host_port(address, context="a peer's address")
            except ConfigError:
                continue
            target = PeerAddress(host, port)
            key = str(target)
            if key not in kept and not own(key):
                kept[key] = (name, target)
        self._reports[reporter] = tuple(kept.values())
        self._prune()
        return first

    def forget(self, reporter: str) -> None:
        """``reporter``'s link is gone: its list no longer counts."""
        if self._reports.pop(reporter, None) is not None:
            self._prune()

    def listed(self) -> list[tuple[str, PeerAddress]]:
        """``(name, address)`` of every address some reporter lists, the first
        ``max_addresses`` distinct ones (reporters in name order, each in its order)."""
        seen: dict[str, tuple[str, PeerAddress]] = {}
        for reporter in sorted(self._reports):
            for name, target in self._reports[reporter]:
                key = str(target)
                if key in seen:
                    continue
                if len(seen) >= self._max:
                    return list(seen.values())
                seen[key] = (name, target)
        return list(seen.values())

    def to_dial(self, linked: Callable[[str], bool]) -> list[PeerAddress]:
        """Listed addresses whose peer is not linked (by name): dial them, again at every
        poll while they stay so."""
        return [target for name, target in self.listed() if not linked(name)]

    def pending(self, linked: Callable[[str], bool]) -> list[str]:
        """Listed addresses whose peer is not linked and not shown to be nobody: a node
        there may hold actors."""
        return sorted(
            key
            for name, target in self.listed()
            if not linked(name) and (key := str(target)) not in self._nobody
        )

    def dialled(self, address: str, *, reached: str | None, timed_out: bool) -> None:
        """A dial of ``address`` ended: linked to the peer ``reached``, timed out, or found
        nobody of this cluster (refused, another cookie or cluster)."""
        if timed_out:
            self._nobody.discard(address)
            return
        names = {name for name, target in self.listed() if str(target) == address}
        if not names:
            return
        if reached is None or reached not in names:
            # Nobody there, or another node than the one listed: the listed one is not here.
            self._nobody.add(address)
        else:
            self._nobody.discard(address)

    def _prune(self) -> None:
        listed = {str(target) for _, target in self.listed()}
        self._nobody &= listed
