"""The discovery interface, the trivial strategies and the factory."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from handoff._errors import ConfigError

from ._dns import DnsDiscovery
from ._fly import FlyDiscovery
from ._spec import DiscoverySpec, PeerAddress, port_range

__all__ = ("Discovery", "NoDiscovery", "StaticDiscovery", "make_discovery")


@runtime_checkable
class Discovery(Protocol):
    """Answers "which addresses might be peers"; membership decides who is up."""

    async def discover(self) -> list[PeerAddress]:
        """The addresses found now, deduplicated and in a stable order.

        ``[]`` when the name exists without records or does not exist at all (a Kubernetes
        headless service with no ready pods answers NXDOMAIN): nobody there is not an
        error. Raises :class:`~handoff.DiscoveryError`, with a message naming the query
        and the server, when the question could not be answered.
        """
        ...

    def describe(self) -> str:
        """What is asked of whom, for logs and ``handoff doctor``."""
        ...


class StaticDiscovery:
    """A fixed list of addresses (``HANDOFF_DISCOVERY=static:h:p,h:p``), returned as given.

    ``hosts`` are entries given without a port (``static:10.0.0.1,10.0.0.2``): each is
    probed on ``port`` and the ``ports - 1`` after it, where the worker processes of one
    machine listen (``HANDOFF_PORT_RANGE``). Entries with a port stay exact.
    """

    def __init__(
        self,
        addresses: Iterable[PeerAddress],
        hosts: Iterable[str] = (),
        *,
        port: int = 0,
        ports: int = 1,
    ) -> None:
        self.addresses = tuple(addresses)
        self.hosts = tuple(hosts)
        self.port = port
        self.ports = ports

    def describe(self) -> str:
        """E.g. ``static:10.0.0.1:4370,[fd00::2]:4370`` (hosts without a port: the range)."""
        entries = [str(address) for address in self.addresses]
        entries += [
            f"{PeerAddress(host, self.port)}" + (f"+{self.ports - 1}" if self.ports > 1 else "")
            for host in self.hosts
        ]
        return "static:" + ",".join(entries)

    async def discover(self) -> list[PeerAddress]:
        """The configured addresses, in the configured order, then the hosts' ranges."""
        found = list(self.addresses)
        for host in self.hosts:
            found += [a for a in port_range(host, self.port, self.ports) if a not in found]
        return found


class NoDiscovery:
    """No peers ever (``HANDOFF_DISCOVERY=none``): a single node, or peers that dial in."""

    def describe(self) -> str:
        """Always ``none``."""
        return "none"

    async def discover(self) -> list[PeerAddress]:
        """Always ``[]``."""
        return []


def make_discovery(
    spec: DiscoverySpec,
    *,
    default_port: int,
    dns_server: tuple[str, int] | None = None,
    fly_app: str | None = None,
    timeout: float = 2.0,
    ports: int = 1,
) -> Discovery:
    """Build the strategy a parsed ``HANDOFF_DISCOVERY`` describes.

    ``default_port`` (the node's own port) applies where the spec names none; ``ports``
    (``HANDOFF_PORT_RANGE``) is how many ports from there on are probed on each address
    that DNS, Fly or a static host without a port gives (SRV records and static
    ``HOST:PORT`` entries name exact ports);
    ``dns_server`` is ``HANDOFF_DNS_SERVER`` (else resolv.conf), ``fly_app`` is
    ``FLY_APP_NAME``, ``timeout`` bounds each DNS query. Raises :class:`ConfigError`
    when the spec cannot work here.
    """
    if spec.kind == "static":
        return StaticDiscovery(spec.static, spec.static_hosts, port=default_port, ports=ports)
    if spec.kind == "none":
        return NoDiscovery()
    port = spec.port if spec.port is not None else default_port
    if spec.kind == "dns":
        return DnsDiscovery(
            spec.name, port=port, dns_server=dns_server, timeout=timeout, ports=ports
        )
    if spec.kind == "fly":
        if fly_app is None:
            raise ConfigError(
                "HANDOFF_DISCOVERY: discovery 'fly' needs FLY_APP_NAME, which Fly sets on "
                "every Machine; outside Fly use 'dns:NAME[:PORT]' or 'static:HOST:PORT,...'"
            )
        return FlyDiscovery(fly_app, port=port, dns_server=dns_server, timeout=timeout, ports=ports)
    raise ConfigError(f"HANDOFF_DISCOVERY: unknown discovery kind {spec.kind!r}")
