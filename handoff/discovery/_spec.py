"""Parsing of the ``HANDOFF_DISCOVERY`` value into a typed, validated description."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from handoff._errors import ConfigError

__all__ = (
    "DiscoverySpec",
    "PeerAddress",
    "parse_discovery_spec",
    "parse_host_port",
    "port_range",
)

DiscoveryKind = Literal["static", "dns", "fly", "none"]

_FORMS = "'static:HOST[:PORT],HOST[:PORT]', 'dns:NAME[:PORT]', 'fly' or 'none'"


@dataclass(frozen=True, slots=True)
class PeerAddress:
    """An address that might be a peer, as discovery saw it (not yet a member)."""

    host: str
    port: int
    meta: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    probe: bool = field(default=False, compare=False)
    """True for the ports beyond the first of a probed range (``HANDOFF_PORT_RANGE``): a
    node there is possible (a second worker process), not expected."""

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def port_range(
    host: str, port: int, count: int, meta: tuple[tuple[str, str], ...] = ()
) -> list[PeerAddress]:
    """``host`` on ``port`` and the ``count - 1`` ports after it (cut at 65535), those marked
    as probes: where the worker processes of one machine listen (``HANDOFF_PORT_RANGE``)."""
    # Port 0 (any free port, for tests) has no range.
    last = min(port + (max(count, 1) if port else 1), 65536)
    return [PeerAddress(host, p, meta, probe=p != port) for p in range(port, last)]


@dataclass(frozen=True, slots=True)
class DiscoverySpec:
    """What to ask to find peers. ``port`` is ``None`` when the node's own port applies.

    ``static`` are the ``HOST:PORT`` entries of a static list (dialled exactly as given);
    ``static_hosts`` its entries without a port, probed on the node's port range like DNS
    answers.
    """

    kind: DiscoveryKind
    static: tuple[PeerAddress, ...] = ()
    static_hosts: tuple[str, ...] = ()
    name: str = ""
    port: int | None = None


def _port(text: str, context: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or not 0 < int(text) < 65536:
        raise ConfigError(f"{context}: port {text!r} is not a number between 1 and 65535")
    return int(text)


def parse_host_port(text: str, *, context: str, default_port: int | None = None) -> tuple[str, int]:
    """Split ``host:port``, ``[v6]:port`` or (with a default port) a bare host.

    ``context`` names the setting in error messages, e.g. ``"HANDOFF_BIND"``.
    """
    text = text.strip()
    if not text:
        raise ConfigError(f"{context}: empty address; expected HOST:PORT")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if sep and not host:
            raise ConfigError(f"{context}: {text!r} has an empty host between '[' and ']'")
        if not sep:
            raise ConfigError(f"{context}: {text!r} has an unclosed '['; expected [IPV6]:PORT")
        if not rest:
            if default_port is None:
                raise ConfigError(f"{context}: {text!r} has no port; expected [IPV6]:PORT")
            return host, default_port
        if not rest.startswith(":"):
            raise ConfigError(f"{context}: {text!r}: expected ':' and a port after ']'")
        return host, _port(rest[1:], context)
    if text.count(":") > 1:
        # A bare IPv6 address: the port, if any, must be written with brackets.
        if default_port is None:
            raise ConfigError(
                f"{context}: {text!r} looks like an IPv6 address without a port; "
                "write it as [IPV6]:PORT"
            )
        return text, default_port
    host, sep, port = text.partition(":")
    if any(c.isspace() for c in host):
        raise ConfigError(f"{context}: host {host!r} contains whitespace")
    if not host:
        raise ConfigError(f"{context}: {text!r} has no host; expected HOST:PORT")
    if not sep:
        if default_port is None:
            raise ConfigError(f"{context}: {text!r} has no port; expected HOST:PORT")
        return host, default_port
    return host, _port(port, context)


def parse_discovery_spec(text: str, *, context: str = "HANDOFF_DISCOVERY") -> DiscoverySpec:
    """Parse a discovery setting; raise :class:`ConfigError` saying what is wrong."""
    text = text.strip()
    kind, colon, rest = text.partition(":")
    if kind == "none" and not colon:
        return DiscoverySpec(kind="none")
    if kind == "fly" and not colon:
        return DiscoverySpec(kind="fly")
    if kind == "static":
        if not rest.strip():
            raise ConfigError(f"{context}: 'static:' needs at least one HOST:PORT")
        addresses: list[PeerAddress] = []
        hosts: list[str] = []
        for part in rest.split(","):
            if not part.strip():
                continue
            # Port 0 stands for "none given": no real entry can have it.
            host, number = parse_host_port(part, context=context, default_port=0)
            if number:
                addresses.append(PeerAddress(host, number))
            elif host not in hosts:
                hosts.append(host)
        if not addresses and not hosts:
            raise ConfigError(f"{context}: 'static:' needs at least one HOST:PORT")
        return DiscoverySpec(kind="static", static=tuple(addresses), static_hosts=tuple(hosts))
    if kind == "dns":
        name, sep, port = rest.partition(":")
        name = name.strip().rstrip(".")
        if not name or any(c.isspace() for c in name):
            raise ConfigError(f"{context}: 'dns:' needs a DNS name, e.g. dns:myapp.internal")
        if sep and (not port or ":" in port):
            raise ConfigError(f"{context}: {text!r}: expected dns:NAME or dns:NAME:PORT")
        return DiscoverySpec(kind="dns", name=name, port=_port(port, context) if sep else None)
    raise ConfigError(f"{context}: {text!r} is not a discovery setting; expected {_FORMS}")
