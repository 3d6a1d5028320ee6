"""Discovery: which addresses might be peers (static list, DNS, Fly.io's 6PN DNS).

Discovery only answers "who might be there"; membership decides who is up. Absence from
DNS is not death: draining and not-ready nodes vanish from DNS while still alive.
"""

from __future__ import annotations

from ._base import Discovery, NoDiscovery, StaticDiscovery, make_discovery
from ._dns import DnsDiscovery
from ._fly import FlyDiscovery
from ._spec import DiscoverySpec, PeerAddress, parse_discovery_spec, parse_host_port, port_range

__all__ = (
    "Discovery",
    "DiscoverySpec",
    "DnsDiscovery",
    "FlyDiscovery",
    "NoDiscovery",
    "PeerAddress",
    "StaticDiscovery",
    "make_discovery",
    "parse_discovery_spec",
    "parse_host_port",
    "port_range",
)
