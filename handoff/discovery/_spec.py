"""Parsing of the ``HANDOFF_DISCOVERY`` value into a typed, validated description."""

from __future__ import annotations

import ipaddress
import re
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


_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _is_host_name(name: str) -> bool:
    """A DNS name (letters, digits, '-' and '_' in dot-separated labels; a final dot ok)."""
    name = name[:-1] if name.endswith(".") else name
    if not name or len(name) > 253:
        return False
    return all(_LABEL.fullmatch(label) for label in name.split("."))


def _check_host(host: str, text: str, context: str) -> None:
    """Refuse what can be no host: with an accurate reason, not as a host to dial."""
    try:
        ipaddress.ip_address(host.partition("%")[0])  # a scope id (fe80::1%eth0) is fine
        return
    except ValueError:
        pass
    if _is_host_name(host):
        return
    if ";" in text:
        raise ConfigError(
            f"{context}: {text!r}: separate peers with commas, not ';' "
            "(e.g. static:10.0.0.2:4370,10.0.0.3:4370)"
        )
    if any(c.isspace() for c in host):
        raise ConfigError(f"{context}: host {host!r} contains whitespace")
    raise ConfigError(f"{context}: {host!r} is neither a host name nor an IP address")


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
        try:
            ipaddress.IPv6Address(host.partition("%")[0])
        except ValueError:
            raise ConfigError(
                f"{context}: {text!r}: brackets hold an IPv6 address, and {host!r} is none"
            ) from None
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
        _check_host(text, text, context)
        return text, default_port
    host, sep, port = text.partition(":")
    if any(c.isspace() for c in host):
        raise ConfigError(f"{context}: host {host!r} contains whitespace")
    if not host:
        raise ConfigError(f"{context}: {text!r} has no host; expected HOST:PORT")
    _check_host(host, text, context)
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
        if not name:
            raise ConfigError(f"{context}: 'dns:' needs a DNS name, e.g. dns:myapp.internal")
        if not _is_host_name(name):
            why = "it contains whitespace" if any(c.isspace() for c in name) else "not a DNS name"
            raise ConfigError(
                f"{context}: {name!r} is not a DNS name ({why}); e.g. dns:myapp.internal"
            )
        if sep and (not port or ":" in port):
            raise ConfigError(f"{context}: {text!r}: expected dns:NAME or dns:NAME:PORT")
        return DiscoverySpec(kind="dns", name=name, port=_port(port, context) if sep else None)
    raise ConfigError(f"{context}: {text!r} is not a discovery setting; expected {_FORMS}")
