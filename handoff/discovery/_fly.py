"""Discovery on Fly.io through the 6PN internal DNS (``fdaa::3``)."""

from __future__ import annotations

import re

import dns.name
import dns.rdata
import dns.rdatatype
import dns.rdtypes.ANY.TXT

from handoff._errors import ConfigError, DiscoveryError

from ._dns import RESOLV_CONF, _Resolver, logger, merge_addresses, rdata_addresses
from ._spec import PeerAddress, port_range

__all__ = ("FlyDiscovery",)

# Fly machine ids are hex strings; anything else in the TXT record would not make a
# valid (or a safe) DNS label to look up.
_MACHINE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}\Z")
_APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}\Z")


def parse_vms_txt(rdatas: list[dns.rdata.Rdata]) -> list[tuple[str, str]]:
    """``(machine_id, region)`` pairs from the TXT records of ``vms.<app>.internal``.

    A TXT record holds character-strings of at most 255 bytes each, so a long list arrives
    split at arbitrary points (even inside a pair): the strings of a record are joined
    before splitting at commas. The region is ``""`` where an entry has none.
    """
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for rdata in rdatas:
        if not isinstance(rdata, dns.rdtypes.ANY.TXT.TXT):
            continue
        text = b"".join(rdata.strings).decode("utf-8", errors="replace")
        for entry in text.split(","):
            fields = entry.split()
            if not fields or not _MACHINE_ID.match(fields[0]) or fields[0] in seen:
                continue
            seen.add(fields[0])
            pairs.append((fields[0], fields[1] if len(fields) > 1 else ""))
    return pairs


class FlyDiscovery:
    """Peers of a Fly app, with their machine ids and regions.

    Asks for the AAAA records of ``<app>.internal`` (every started Machine) and the TXT
    record of ``vms.<app>.internal`` (``"<machine_id> <region>"`` pairs); then the AAAA
    of ``<machine_id>.vm.<app>.internal`` for each listed Machine, to learn which address
    belongs to which Machine. Each address then carries ``meta`` of
    ``(("machine_id", id), ("region", region))`` where known. Each address is probed on
    ``port`` and the ``ports - 1`` after it (``HANDOFF_PORT_RANGE``: the worker processes
    of one Machine).

    Only the ``<app>.internal`` query must succeed: when the TXT or a per-machine query
    fails, the addresses are returned without that metadata (logged at debug level).
    Addresses of listed Machines are returned even if ``<app>.internal`` missed them
    (its records and the TXT record are not updated atomically).

    ``dns_server`` and ``timeout`` work as for :class:`DnsDiscovery` (two rounds of
    concurrent queries: :meth:`discover` takes at most twice ``timeout``); on Fly the
    system resolver (resolv.conf points to ``fdaa::3``) is right.
    """

    def __init__(
        self,
        app: str,
        *,
        port: int,
        dns_server: tuple[str, int] | None = None,
        timeout: float = 2.0,
        resolv_conf: str = RESOLV_CONF,
        ports: int = 1,
    ) -> None:
        if not _APP_NAME.match(app):
            raise ConfigError(f"FLY_APP_NAME: {app!r} is not a valid Fly app name")
        self._resolver = _Resolver(dns_server=dns_server, timeout=timeout, resolv_conf=resolv_conf)
        self.app = app
        self.port = port
        self.ports = ports
        # Absolute names: a resolv.conf search list must never turn them into others.
        self._internal = dns.name.from_text(f"{app}.internal")
        self._vms = dns.name.from_text(f"vms.{app}.internal")

    def describe(self) -> str:
        """E.g. ``fly:shop (AAAA shop.internal, TXT vms.shop.internal, port 4370) via ...``."""
        last = min(self.port + self.ports - 1, 65535)
        ports = f"ports {self.port}..{last}" if last > self.port else f"port {self.port}"
        return (
            f"fly:{self.app} (AAAA {self.app}.internal, TXT vms.{self.app}.internal, "
            f"{ports}) via {self._resolver.server}"
        )

    async def discover(self) -> list[PeerAddress]:
        """Ask Fly's DNS now; only a failed ``<app>.internal`` query raises."""
        internal, vms = await self._resolver.query_many(
            [(self._internal, dns.rdatatype.AAAA), (self._vms, dns.rdatatype.TXT)]
        )
        if isinstance(internal, DiscoveryError):
            raise internal
        found = [
            address
            for host in rdata_addresses(internal)
            for address in port_range(host, self.port, self.ports)
        ]
        if isinstance(vms, DiscoveryError):
            logger.debug("fly discovery: no machine ids and regions: %s", vms)
            return merge_addresses(found)

        machines = parse_vms_txt(vms)
        names = [dns.name.from_text(f"{mid}.vm.{self.app}.internal") for mid, _ in machines]
        results = await self._resolver.query_many([(n, dns.rdatatype.AAAA) for n in names])
        for (machine_id, region), result in zip(machines, results, strict=True):
            if isinstance(result, DiscoveryError):
                logger.debug("fly discovery: no address for machine %s: %s", machine_id, result)
                continue
            meta = (
                (("machine_id", machine_id), ("region", region))
                if region
                else (("machine_id", machine_id),)
            )
            found.extend(
                address
                for host in rdata_addresses(result)
                for address in port_range(host, self.port, self.ports, meta)
            )
        return merge_addresses(found)
