"""Discovery through DNS: A/AAAA of a name, or SRV records and their targets.

:class:`_Resolver` is the one place where a dnspython resolver is set up and where
dnspython's exceptions become :class:`~handoff.DiscoveryError`; :mod:`._fly` reuses it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Iterable, Sequence

import anyio
import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdata
import dns.rdatatype
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rdtypes.IN.SRV
import dns.resolver

from handoff._errors import ConfigError, DiscoveryError

from ._spec import PeerAddress, port_range

__all__ = ("DnsDiscovery",)

logger = logging.getLogger("handoff.discovery")

RESOLV_CONF = "/etc/resolv.conf"

_ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)


def _format_server(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_dns_name(text: str, *, context: str, absolute: bool) -> dns.name.Name:
    """Turn a configured name into a :class:`dns.name.Name`; raise :class:`ConfigError`.

    ``absolute=False`` keeps a name without a trailing dot relative, so that the resolver
    can apply the ``search`` list of resolv.conf to it (as the C library does).
    """
    try:
        return dns.name.from_text(text, origin=dns.name.root if absolute else None)
    except dns.exception.DNSException as exc:
        raise ConfigError(f"{context}: {text!r} is not a valid DNS name: {exc}") from exc


class _Resolver:
    """A configured dnspython resolver plus the translation of its errors.

    With ``dns_server`` the resolver asks only that server and names are absolute. Without
    it, the system configuration (resolv.conf) is read here, once, at construction: a host
    without usable resolver configuration cannot discover anything for the life of the
    process (dnspython never re-reads the file), so that is a :class:`ConfigError` at
    startup, naming ``HANDOFF_DNS_SERVER`` as the fix, rather than a DiscoveryError logged
    every poll.
    """

    def __init__(
        self,
        *,
        dns_server: tuple[str, int] | None,
        timeout: float,
        resolv_conf: str = RESOLV_CONF,
    ) -> None:
        if timeout <= 0:
            raise ConfigError(f"discovery timeout must be positive, not {timeout!r}")
        if dns_server is not None:
            host, port = dns_server
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ConfigError(
                    f"HANDOFF_DNS_SERVER: {host!r} is not an IP address; "
                    "the DNS server must be given as IP[:PORT] or [IPV6]:PORT"
                ) from None
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [host]
            resolver.port = port
            self.server = _format_server(host, port)
            # An explicit server has no search list; names are taken as written.
            self.search = False
        else:
            try:
                resolver = dns.asyncresolver.Resolver(filename=resolv_conf)
            except dns.resolver.NoResolverConfiguration as exc:
                raise ConfigError(
                    f"DNS discovery: no usable resolver configuration in {resolv_conf} "
                    f"({exc}); set HANDOFF_DNS_SERVER=IP[:PORT] to name a DNS server"
                ) from exc
            self.server = ", ".join(
                _format_server(ns, resolver.nameserver_ports.get(ns, resolver.port))
                if isinstance(ns, str)
                else str(ns)
                for ns in resolver.nameservers
            )
            # Follow resolv.conf's search list and ndots as getaddrinfo() would, so that a
            # short Kubernetes service name works here as it does everywhere else.
            self.search = True
        resolver.cache = None
        resolver.lifetime = timeout
        # Half the lifetime per try leaves room for one retransmission of a lost UDP packet.
        resolver.timeout = timeout / 2
        self.timeout = timeout
        self._resolver = resolver

    def qname(self, text: str, *, context: str) -> dns.name.Name:
        """Parse a configured name the way this resolver treats names."""
        return parse_dns_name(text, context=context, absolute=not self.search)

    async def query(
        self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> list[dns.rdata.Rdata]:
        """Ask for one RRset. No such name, or no records of that type: ``[]``.

        Every other failure, whatever dnspython raised, becomes :class:`DiscoveryError`
        naming the query and the server.
        """
        # dnspython caches the first event loop library it sniffs in a global default
        # backend (rthalley/dnspython#991); picking it per call keeps asyncio and trio apart.
        backend = dns.asyncbackend.get_backend(dns.asyncbackend.sniff())
        what = f"{dns.rdatatype.to_text(rdtype)} {name.to_text(omit_final_dot=True)}"
        too_slow = f"DNS query {what} via {self.server}: no answer within {self.timeout:g} s"
        try:
            # dnspython checks its lifetime only between tries and sleeps a back-off
            # before retrying, so on its own it can overrun; this makes the bound hard.
            with anyio.fail_after(self.timeout):
                answer = await self._resolver.resolve(
                    name,
                    rdtype,
                    raise_on_no_answer=False,
                    search=self.search,
                    lifetime=self.timeout,
                    backend=backend,
                )
        except TimeoutError as exc:
            raise DiscoveryError(too_slow) from exc
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.resolver.LifetimeTimeout as exc:
            raise DiscoveryError(f"{too_slow} ({exc})") from exc
        except (dns.exception.DNSException, OSError) as exc:
            raise DiscoveryError(
                f"DNS query {what} via {self.server} failed: {type(exc).__name__}: {exc}"
            ) from exc
        if answer.rrset is None:
            return []
        return list(answer.rrset)

    async def query_many(
        self, queries: Sequence[tuple[dns.name.Name, dns.rdatatype.RdataType]]
    ) -> list[list[dns.rdata.Rdata] | DiscoveryError]:
        """Run queries concurrently; each result is its records or its error, in order."""
        results: list[list[dns.rdata.Rdata] | DiscoveryError] = [[] for _ in queries]

        async def one(index: int, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> None:
            try:
                results[index] = await self.query(name, rdtype)
            except DiscoveryError as exc:
                results[index] = exc

        async with anyio.create_task_group() as tg:
            for index, (name, rdtype) in enumerate(queries):
                tg.start_soon(one, index, name, rdtype)
        return results

    async def addresses(self, names: Sequence[dns.name.Name]) -> list[list[str]]:
        """A and AAAA of each name (both asked; one without records is normal).

        Raises the first :class:`DiscoveryError` if any query failed.
        """
        queries = [(name, rdtype) for name in names for rdtype in _ADDRESS_TYPES]
        results = await self.query_many(queries)
        out: list[list[str]] = []
        for i in range(len(names)):
            found: list[str] = []
            for result in results[2 * i : 2 * i + 2]:
                if isinstance(result, DiscoveryError):
                    raise result
                found.extend(rdata_addresses(result))
            out.append(found)
        return out


def rdata_addresses(rdatas: Iterable[dns.rdata.Rdata]) -> list[str]:
    """The addresses of A and AAAA rdatas; other types are skipped."""
    return [
        str(rdata.address)
        for rdata in rdatas
        if isinstance(rdata, dns.rdtypes.IN.A.A | dns.rdtypes.IN.AAAA.AAAA)
    ]


def _sort_key(address: PeerAddress) -> tuple[int, int, str, int]:
    try:
        ip = ipaddress.ip_address(address.host)
    except ValueError:
        return (9, 0, address.host, address.port)
    return (ip.version, int(ip), "", address.port)


def merge_addresses(addresses: Iterable[PeerAddress]) -> list[PeerAddress]:
    """Deduplicate by host and port (keeping metadata where one copy has it, and a probe
    only where every copy is one) and sort.

    IPv4 sorts before IPv6, each in numeric order, so that the same records always give
    the same list whatever order the server returned them in.
    """
    seen: dict[tuple[str, int], PeerAddress] = {}
    for address in addresses:
        host = address.host
        with contextlib.suppress(ValueError):
            host = ipaddress.ip_address(host).compressed
        key = (host, address.port)
        known = seen.get(key)
        if known is None:
            seen[key] = PeerAddress(host, address.port, address.meta, probe=address.probe)
        elif (not known.meta and address.meta) or (known.probe and not address.probe):
            # An address is a probe only if every copy of it is.
            seen[key] = PeerAddress(
                host,
                address.port,
                known.meta or address.meta,
                probe=known.probe and address.probe,
            )
    return sorted(seen.values(), key=_sort_key)


class DnsDiscovery:
    """Peers from DNS.

    A name starting with ``_`` (``_handoff._tcp.shop.internal``) is an SRV query: each
    SRV record names a target and a port, and the target's A and AAAA records give the
    addresses. Any other name is asked for A and AAAA, and every address gets ``port``.

    A name that does not exist, or has no records, gives ``[]``: a Kubernetes headless
    service with no ready pods answers NXDOMAIN, which is "nobody there yet", not a failure.
    Timeouts, refusals and server failures raise :class:`DiscoveryError`.

    ``dns_server`` (``HANDOFF_DNS_SERVER``) replaces the system resolver configuration.
    Without it, resolv.conf (``resolv_conf``) is read once, here: no usable configuration
    raises :class:`ConfigError` at construction, since it cannot fix itself later (dnspython
    never re-reads the file). Its search list applies as in getaddrinfo(), so a short
    Kubernetes service name works. ``ports``: each A/AAAA address is also probed on the
    ``ports - 1`` ports after ``port`` (``HANDOFF_PORT_RANGE``: worker processes of one
    machine); SRV records name exact ports. ``timeout`` is a hard bound on each query,
    retransmissions included; queries run concurrently, so :meth:`discover` takes at most
    ``timeout`` (A/AAAA) or twice that (SRV, then the targets).
    """

    def __init__(
        self,
        name: str,
        *,
        port: int,
        dns_server: tuple[str, int] | None = None,
        timeout: float = 2.0,
        resolv_conf: str = RESOLV_CONF,
        ports: int = 1,
    ) -> None:
        self._resolver = _Resolver(dns_server=dns_server, timeout=timeout, resolv_conf=resolv_conf)
        self.name = name
        self.port = port
        self.ports = ports
        self._qname = self._resolver.qname(name, context="HANDOFF_DISCOVERY")
        self.is_srv = name.startswith("_")

    def describe(self) -> str:
        """E.g. ``dns:shop.internal (A/AAAA, port 4370) via 127.0.0.1:5353``."""
        last = min(self.port + self.ports - 1, 65535)
        ports = f"ports {self.port}..{last}" if last > self.port else f"port {self.port}"
        kinds = "SRV" if self.is_srv else f"A/AAAA, {ports}"
        return f"dns:{self.name} ({kinds}) via {self._resolver.server}"

    async def discover(self) -> list[PeerAddress]:
        """Ask DNS now; see the class documentation for what counts as a failure."""
        if not self.is_srv:
            (hosts,) = await self._resolver.addresses([self._qname])
            return merge_addresses(
                address for host in hosts for address in port_range(host, self.port, self.ports)
            )

        records = await self._resolver.query(self._qname, dns.rdatatype.SRV)
        targets: list[tuple[dns.name.Name, int]] = []
        for rdata in records:
            # A target of "." says the service is decidedly not available there (RFC 2782).
            if isinstance(rdata, dns.rdtypes.IN.SRV.SRV) and rdata.target != dns.name.root:
                targets.append((rdata.target, int(rdata.port)))
        unique = sorted({target for target, _ in targets})
        hosts_by_target = dict(zip(unique, await self._resolver.addresses(unique), strict=True))
        return merge_addresses(
            PeerAddress(host, port) for target, port in targets for host in hosts_by_target[target]
        )
