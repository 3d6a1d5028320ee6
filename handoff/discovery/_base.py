"""The discovery interface, the trivial strategies and the factory."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from handoff._errors import ConfigError

from ._dns import DnsDiscovery
from ._fly import FlyDiscovery
from ._spec import DiscoverySpec, PeerAddress

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
    """A fixed list of addresses (``HANDOFF_DISCOVERY=static:h:p,h:p``), returned as given."""

    def __init__(self, addresses: Iterable[PeerAddress]) -> None:
        self.addresses = tuple(addresses)

    def describe(self) -> str:
        """E.g. ``static:10.0.0.1:4370,[fd00::2]:4370``."""
        return "static:" + ",".join(str(address) for address in self.addresses)

    async def discover(self) -> list[PeerAddress]:
        """The configured addresses, in the configured order."""
        return list(self.addresses)


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
) -> Discovery:
    """Build the strategy a parsed ``HANDOFF_DISCOVERY`` describes.

    ``default_port`` (the node's own port) applies where the spec names none;
    ``dns_server`` is ``HANDOFF_DNS_SERVER`` (else resolv.conf), ``fly_app`` is
    ``FLY_APP_NAME``, ``timeout`` bounds each DNS query. Raises :class:`ConfigError`
    when the spec cannot work here.
    """
    if spec.kind == "static":
        return StaticDiscovery(spec.static)
    if spec.kind == "none":
        return NoDiscovery()
    port = spec.port if spec.port is not None else default_port
    if spec.kind == "dns":
        return DnsDiscovery(spec.name, port=port, dns_server=dns_server, timeout=timeout)
    if spec.kind == "fly":
        if fly_app is None:
            raise ConfigError(
                "HANDOFF_DISCOVERY: discovery 'fly' needs FLY_APP_NAME, which Fly sets on "
                "every Machine; outside Fly use 'dns:NAME[:PORT]' or 'static:HOST:PORT,...'"
            )
        return FlyDiscovery(fly_app, port=port, dns_server=dns_server, timeout=timeout)
    raise ConfigError(f"HANDOFF_DISCOVERY: unknown discovery kind {spec.kind!r}")
