"""Discovery strategies, the DNS ones asked against a real DNS server on loopback."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import dns.name
import dns.rdata
import dns.rdatatype
import pytest

from handoff._errors import ConfigError, DiscoveryError
from handoff.discovery import (
    Discovery,
    DnsDiscovery,
    FlyDiscovery,
    NoDiscovery,
    PeerAddress,
    StaticDiscovery,
    make_discovery,
    parse_discovery_spec,
)
from handoff.discovery._dns import _Resolver
from handoff.testing import DNSResponder

pytestmark = pytest.mark.anyio

# A hard bound on every test here; each DNS query has its own, much shorter one.
DEADLINE = 5.0
PORT = 4370


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    # Both, in one process: dnspython caches the first backend it sniffs (dnspython#991).
    return str(request.param)


@pytest.fixture
def responder() -> Iterator[DNSResponder]:
    with DNSResponder() as server:
        yield server


@pytest.fixture
def unused_port() -> int:
    """A loopback UDP port where nothing answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dns_discovery(responder: DNSResponder, text: str) -> Discovery:
    return make_discovery(
        parse_discovery_spec(text), default_port=PORT, dns_server=responder.address, timeout=1.0
    )


def fly_discovery(responder: DNSResponder, app: str = "shop") -> Discovery:
    return make_discovery(
        parse_discovery_spec("fly"),
        default_port=PORT,
        dns_server=responder.address,
        fly_app=app,
        timeout=1.0,
    )


async def discover(discovery: Discovery) -> list[PeerAddress]:
    with anyio.fail_after(DEADLINE):
        return await discovery.discover()


def hosts_and_meta(addresses: list[PeerAddress]) -> list[tuple[str, int, dict[str, str]]]:
    return [(a.host, a.port, dict(a.meta)) for a in addresses]


# -- static and none ----------------------------------------------------------------------


async def test_static_returns_the_list_as_given() -> None:
    spec = parse_discovery_spec("static:10.0.0.2:4370,[fd00::1]:4371,10.0.0.1:4370")
    discovery = make_discovery(spec, default_port=1)
    assert isinstance(discovery, StaticDiscovery)
    assert await discover(discovery) == [
        PeerAddress("10.0.0.2", 4370),
        PeerAddress("fd00::1", 4371),
        PeerAddress("10.0.0.1", 4370),
    ]
    assert discovery.describe() == "static:10.0.0.2:4370,[fd00::1]:4371,10.0.0.1:4370"


async def test_none_finds_nobody() -> None:
    discovery = make_discovery(parse_discovery_spec("none"), default_port=PORT)
    assert isinstance(discovery, NoDiscovery)
    assert isinstance(discovery, Discovery)
    assert await discover(discovery) == []
    assert discovery.describe() == "none"


# -- dns ----------------------------------------------------------------------------------


async def test_dns_merges_a_and_aaaa_with_the_default_port(responder: DNSResponder) -> None:
    responder.set_a("shop.internal", ["10.0.0.10", "10.0.0.9"])
    responder.set_aaaa("shop.internal", ["fdaa:0:1::3", "fdaa::2"])
    discovery = dns_discovery(responder, "dns:shop.internal")
    assert await discover(discovery) == [
        PeerAddress("10.0.0.9", PORT),
        PeerAddress("10.0.0.10", PORT),
        PeerAddress("fdaa::2", PORT),
        PeerAddress("fdaa:0:1::3", PORT),
    ]
    assert ("shop.internal", "A") in responder.queries
    assert ("shop.internal", "AAAA") in responder.queries
    host, port = responder.address
    assert discovery.describe() == f"dns:shop.internal (A/AAAA, port {PORT}) via {host}:{port}"


async def test_dns_with_an_explicit_port_and_one_family_only(responder: DNSResponder) -> None:
    responder.set_aaaa("shop.internal", ["fdaa::2"])
    assert await discover(dns_discovery(responder, "dns:shop.internal:5000")) == [
        PeerAddress("fdaa::2", 5000)
    ]


async def test_dns_follows_zone_changes(responder: DNSResponder) -> None:
    discovery = dns_discovery(responder, "dns:shop.internal")
    responder.set_a("shop.internal", ["10.0.0.1"])
    assert await discover(discovery) == [PeerAddress("10.0.0.1", PORT)]
    responder.set_a("shop.internal", ["10.0.0.1", "10.0.0.2"])
    assert await discover(discovery) == [
        PeerAddress("10.0.0.1", PORT),
        PeerAddress("10.0.0.2", PORT),
    ]


async def test_dns_srv_resolves_each_target(responder: DNSResponder) -> None:
    responder.set_srv(
        "_handoff._tcp.shop.internal",
        [
            (10, 5, 4370, "node-1.shop.internal"),
            (10, 5, 4371, "node-2.shop.internal"),
            (20, 5, 4371, "node-2.shop.internal"),  # same target and port: one address
            (10, 5, 4372, "gone.shop.internal"),  # target without records: nothing
            (10, 5, 4373, "."),  # "not available here" (RFC 2782)
        ],
    )
    responder.set_a("node-1.shop.internal", ["10.0.0.1"])
    responder.set_aaaa("node-1.shop.internal", ["fdaa::1"])
    responder.set_a("node-2.shop.internal", ["10.0.0.2"])
    discovery = dns_discovery(responder, "dns:_handoff._tcp.shop.internal")
    assert await discover(discovery) == [
        PeerAddress("10.0.0.1", 4370),
        PeerAddress("10.0.0.2", 4371),
        PeerAddress("fdaa::1", 4370),
    ]
    assert "(SRV)" in discovery.describe()


async def test_dns_large_answers_come_over_tcp(responder: DNSResponder) -> None:
    ips = [f"10.0.1.{i}" for i in range(1, 61)]
    responder.set_a("big.internal", ips)
    found = await discover(dns_discovery(responder, "dns:big.internal"))
    assert [a.host for a in found] == ips


async def test_dns_no_such_name_is_nobody_not_an_error(responder: DNSResponder) -> None:
    assert await discover(dns_discovery(responder, "dns:shop-headless.internal")) == []
    assert await discover(dns_discovery(responder, "dns:_handoff._tcp.nothing.internal")) == []
    responder.set_txt("shop.internal", ["only text here"])
    assert await discover(dns_discovery(responder, "dns:shop.internal")) == []


async def test_dns_server_down_is_a_discovery_error(unused_port: int) -> None:
    discovery = DnsDiscovery(
        "shop.internal", port=PORT, dns_server=("127.0.0.1", unused_port), timeout=0.3
    )
    started = time.monotonic()
    with pytest.raises(DiscoveryError, match=f"shop.internal via 127.0.0.1:{unused_port}"):
        await discover(discovery)
    assert time.monotonic() - started < 1.5


async def test_every_dnspython_error_becomes_a_discovery_error(
    responder: DNSResponder, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolver = _Resolver(dns_server=responder.address, timeout=1.0)

    async def broken(*args: object, **kwargs: object) -> None:
        raise dns.name.LabelTooLong

    monkeypatch.setattr(resolver._resolver, "resolve", broken)
    with pytest.raises(DiscoveryError, match=r"TXT x\.internal via .*LabelTooLong"):
        await resolver.query(dns.name.from_text("x.internal"), dns.rdatatype.TXT)


def test_dns_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="HANDOFF_DNS_SERVER"):
        DnsDiscovery("shop.internal", port=PORT, dns_server=("localhost", 53))
    with pytest.raises(ConfigError, match="valid DNS name"):
        DnsDiscovery("a" * 64 + ".internal", port=PORT, dns_server=("127.0.0.1", 53))
    empty = tmp_path / "resolv.conf"
    empty.write_text("search example.com\n")
    with pytest.raises(ConfigError, match="HANDOFF_DNS_SERVER"):
        DnsDiscovery("shop.internal", port=PORT, resolv_conf=str(empty))
    configured = tmp_path / "resolv2.conf"
    configured.write_text("nameserver fdaa::3\nnameserver 10.0.0.53\n")
    discovery = DnsDiscovery("shop.internal", port=PORT, resolv_conf=str(configured))
    assert discovery.describe().endswith("via [fdaa::3]:53, 10.0.0.53:53")


# -- fly ----------------------------------------------------------------------------------


def fake_fly_app(responder: DNSResponder) -> None:
    """Three started Machines; the third is not (yet) in the TXT record."""
    responder.set_aaaa("shop.internal", ["fdaa:0:1:a7b::2", "fdaa:0:1:a7b::1", "fdaa:0:1:a7b::3"])
    # Split where Fly's server might split, even inside a pair: clients must join.
    responder.set_txt("vms.shop.internal", [["683d314fdd4d68 yy", "z,568323e9b54dd8 lhr"]])
    responder.set_aaaa("683d314fdd4d68.vm.shop.internal", ["fdaa:0:1:a7b::1"])
    responder.set_aaaa("568323e9b54dd8.vm.shop.internal", ["fdaa:0:1:a7b::2"])


async def test_fly_maps_machine_ids_and_regions(responder: DNSResponder) -> None:
    fake_fly_app(responder)
    discovery = fly_discovery(responder)
    assert hosts_and_meta(await discover(discovery)) == [
        ("fdaa:0:1:a7b::1", PORT, {"machine_id": "683d314fdd4d68", "region": "yyz"}),
        ("fdaa:0:1:a7b::2", PORT, {"machine_id": "568323e9b54dd8", "region": "lhr"}),
        ("fdaa:0:1:a7b::3", PORT, {}),
    ]
    assert ("vms.shop.internal", "TXT") in responder.queries
    assert discovery.describe().startswith("fly:shop (AAAA shop.internal, TXT vms.shop.internal")


async def test_fly_without_txt_still_returns_the_addresses(responder: DNSResponder) -> None:
    fake_fly_app(responder)
    responder.remove("vms.shop.internal")
    assert hosts_and_meta(await discover(fly_discovery(responder))) == [
        ("fdaa:0:1:a7b::1", PORT, {}),
        ("fdaa:0:1:a7b::2", PORT, {}),
        ("fdaa:0:1:a7b::3", PORT, {}),
    ]


async def test_fly_txt_failure_still_returns_the_addresses(
    responder: DNSResponder, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake_fly_app(responder)
    query = _Resolver.query

    async def txt_fails(
        self: _Resolver, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> list[dns.rdata.Rdata]:
        if rdtype == dns.rdatatype.TXT:
            raise DiscoveryError("TXT timed out")
        return await query(self, name, rdtype)

    monkeypatch.setattr(_Resolver, "query", txt_fails)
    with caplog.at_level(logging.DEBUG, logger="handoff.discovery"):
        found = await discover(fly_discovery(responder))
    assert [(a.host, a.meta) for a in found] == [
        ("fdaa:0:1:a7b::1", ()),
        ("fdaa:0:1:a7b::2", ()),
        ("fdaa:0:1:a7b::3", ()),
    ]
    assert "TXT timed out" in caplog.text


async def test_fly_with_many_machines(responder: DNSResponder) -> None:
    machines = [(f"{i:014x}", "ams" if i % 2 else "lhr") for i in range(1, 41)]
    responder.set_txt("vms.shop.internal", [",".join(f"{m} {r}" for m, r in machines)])
    for i, (machine_id, _) in enumerate(machines, start=1):
        responder.set_aaaa(f"{machine_id}.vm.shop.internal", [f"fdaa::{i:x}"])
    # <app>.internal lags behind: Machines listed in the TXT record count all the same.
    responder.set_aaaa("shop.internal", ["fdaa::1"])
    found = await discover(fly_discovery(responder))
    assert [dict(a.meta) for a in found] == [
        {"machine_id": machine_id, "region": region} for machine_id, region in machines
    ]


async def test_fly_app_name_missing_is_nobody(responder: DNSResponder) -> None:
    assert await discover(fly_discovery(responder)) == []


async def test_fly_server_down_is_a_discovery_error(unused_port: int) -> None:
    discovery = FlyDiscovery("shop", port=PORT, dns_server=("127.0.0.1", unused_port), timeout=0.3)
    with pytest.raises(DiscoveryError, match=f"AAAA shop.internal via 127.0.0.1:{unused_port}"):
        await discover(discovery)


def test_fly_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="FLY_APP_NAME"):
        make_discovery(parse_discovery_spec("fly"), default_port=PORT)
    with pytest.raises(ConfigError, match="FLY_APP_NAME"):
        FlyDiscovery("not an app", port=PORT, dns_server=("127.0.0.1", 53))
