"""The test DNS server in handoff.testing: a real server, asked with dnspython's own clients."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import anyio
import dns.asyncresolver
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest

from handoff.testing import DNSResponder

TIMEOUT = 2.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def responder() -> Iterator[DNSResponder]:
    with DNSResponder() as server:
        yield server


def ask(
    server: DNSResponder, name: str, rdtype: str, *, tcp: bool = False, payload: int | None = None
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    if payload is not None:
        query.use_edns(0, 0, payload)
    host, port = server.address
    if tcp:
        return dns.query.tcp(query, host, port=port, timeout=TIMEOUT)
    return dns.query.udp(query, host, port=port, timeout=TIMEOUT)


def texts(response: dns.message.Message) -> list[str]:
    return sorted(rdata.to_text() for rrset in response.answer for rdata in rrset)


def resolver_for(server: DNSResponder) -> dns.resolver.Resolver:
    resolver = dns.resolver.Resolver(configure=False)
    host, port = server.address
    resolver.nameservers = [host]
    resolver.port = port
    resolver.lifetime = TIMEOUT
    return resolver


def test_a_and_aaaa(responder: DNSResponder) -> None:
    responder.set_a("shop.internal", ["10.0.0.2", "10.0.0.1"])
    responder.set_aaaa("shop.internal", ["fdaa::1"])
    response = ask(responder, "shop.internal", "A")
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    assert texts(response) == ["10.0.0.1", "10.0.0.2"]
    assert response.answer[0].ttl == 5
    assert texts(ask(responder, "shop.internal", "AAAA")) == ["fdaa::1"]


def test_srv_and_txt(responder: DNSResponder) -> None:
    responder.set_srv("_handoff._tcp.shop.internal", [(10, 5, 4370, "node-1.shop.internal")])
    responder.set_txt("vms.shop.internal", ["abc ams,def lhr", ["part one ", "part two"]])
    assert texts(ask(responder, "_handoff._tcp.shop.internal", "SRV")) == [
        "10 5 4370 node-1.shop.internal."
    ]
    (rrset,) = ask(responder, "vms.shop.internal", "TXT").answer
    strings = sorted(tuple(rdata.strings) for rdata in rrset)
    assert strings == [(b"abc ams,def lhr",), (b"part one ", b"part two")]


def test_long_txt_is_split_into_character_strings(responder: DNSResponder) -> None:
    text = ",".join(f"{i:014x} ams" for i in range(40))
    responder.set_txt("vms.shop.internal", [text])
    (rrset,) = ask(responder, "vms.shop.internal", "TXT", tcp=True).answer
    (rdata,) = rrset
    assert len(rdata.strings) > 1
    assert all(len(part) <= 255 for part in rdata.strings)
    assert b"".join(rdata.strings) == text.encode()


def test_nxdomain_versus_no_answer(responder: DNSResponder) -> None:
    responder.set_a("a.b.shop.internal", ["10.0.0.1"])
    assert ask(responder, "nothing.internal", "A").rcode() == dns.rcode.NXDOMAIN
    no_answer = ask(responder, "a.b.shop.internal", "AAAA")
    assert no_answer.rcode() == dns.rcode.NOERROR
    assert no_answer.answer == []
    # A name with names below it exists, without records of its own.
    between = ask(responder, "b.shop.internal", "A")
    assert between.rcode() == dns.rcode.NOERROR
    assert between.answer == []


def test_names_are_case_insensitive_with_or_without_final_dot(responder: DNSResponder) -> None:
    responder.set_a("Shop.Internal.", ["10.0.0.1"])
    response = ask(responder, "sHOP.internal", "A")
    assert texts(response) == ["10.0.0.1"]
    # The answer repeats the question's spelling, as servers do.
    assert response.answer[0].name.to_text() == "sHOP.internal."
    responder.remove("SHOP.INTERNAL")
    assert ask(responder, "shop.internal", "A").rcode() == dns.rcode.NXDOMAIN


def test_zone_updates_apply_to_the_next_query(responder: DNSResponder) -> None:
    responder.set_a("shop.internal", ["10.0.0.1"])
    responder.set_txt("shop.internal", ["hello"])
    assert texts(ask(responder, "shop.internal", "A")) == ["10.0.0.1"]
    responder.set_a("shop.internal", ["10.0.0.3"])
    assert texts(ask(responder, "shop.internal", "A")) == ["10.0.0.3"]
    responder.remove("shop.internal", "A")
    assert ask(responder, "shop.internal", "A").answer == []
    assert texts(ask(responder, "shop.internal", "TXT")) == ['"hello"']
    responder.set_txt("shop.internal", [])
    assert ask(responder, "shop.internal", "TXT").rcode() == dns.rcode.NXDOMAIN
    responder.set_a("shop.internal", ["10.0.0.4"])
    responder.clear()
    assert ask(responder, "shop.internal", "A").rcode() == dns.rcode.NXDOMAIN


def test_ttl_is_configurable() -> None:
    with DNSResponder(ttl=30) as server:
        server.set_a("shop.internal", ["10.0.0.1"])
        assert ask(server, "shop.internal", "A").answer[0].ttl == 30
        server.ttl = 1
        assert ask(server, "shop.internal", "A").answer[0].ttl == 1


def test_tcp_queries(responder: DNSResponder) -> None:
    responder.set_aaaa("shop.internal", ["fdaa::1", "fdaa::2"])
    response = ask(responder, "shop.internal", "AAAA", tcp=True)
    assert texts(response) == ["fdaa::1", "fdaa::2"]
    assert ask(responder, "nothing.internal", "A", tcp=True).rcode() == dns.rcode.NXDOMAIN


def test_several_queries_on_one_tcp_connection(responder: DNSResponder) -> None:
    responder.set_a("shop.internal", ["10.0.0.1"])
    with socket.create_connection(responder.address, timeout=TIMEOUT) as sock:
        # Two queries in one write: the server must split the stream by length prefix.
        first = dns.message.make_query("shop.internal", "A")
        second = dns.message.make_query("nothing.internal", "A")
        sock.sendall(first.to_wire(prepend_length=True) + second.to_wire(prepend_length=True))
        expiration = time.time() + TIMEOUT
        one, _ = dns.query.receive_tcp(sock, expiration)
        two, _ = dns.query.receive_tcp(sock, expiration)
    assert (one.id, texts(one)) == (first.id, ["10.0.0.1"])
    assert (two.id, two.rcode()) == (second.id, dns.rcode.NXDOMAIN)


def test_large_answer_is_truncated_over_udp_and_complete_over_tcp(
    responder: DNSResponder,
) -> None:
    ips = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(60)]
    responder.set_a("big.internal", ips)
    udp = ask(responder, "big.internal", "A")
    assert udp.flags & dns.flags.TC
    assert udp.answer == []
    assert len(texts(ask(responder, "big.internal", "A", tcp=True))) == 60
    # A client that advertises a bigger EDNS buffer gets everything over UDP.
    edns = ask(responder, "big.internal", "A", payload=4096)
    assert not edns.flags & dns.flags.TC
    assert len(texts(edns)) == 60


def test_resolver_retries_truncated_answers_over_tcp(responder: DNSResponder) -> None:
    ips = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(60)]
    responder.set_a("big.internal", ips)
    answer = resolver_for(responder).resolve("big.internal", "A")
    assert sorted(rdata.to_text() for rdata in answer) == sorted(ips)
    assert responder.queries == [("big.internal", "A"), ("big.internal", "A")]


@pytest.mark.anyio
async def test_async_resolver_under_an_event_loop(responder: DNSResponder) -> None:
    responder.set_a("shop.internal", ["10.0.0.1"])
    resolver = dns.asyncresolver.Resolver(configure=False)
    host, port = responder.address
    resolver.nameservers = [host]
    resolver.port = port
    with anyio.fail_after(TIMEOUT):
        answer = await resolver.resolve("shop.internal", "A", lifetime=TIMEOUT)
    assert [rdata.to_text() for rdata in answer] == ["10.0.0.1"]


def test_serves_child_processes(responder: DNSResponder) -> None:
    responder.set_a("shop.internal", ["10.0.0.9"])
    host, port = responder.address
    code = (
        "import sys, dns.resolver\n"
        "r = dns.resolver.Resolver(configure=False)\n"
        "r.nameservers = [sys.argv[1]]; r.port = int(sys.argv[2]); r.lifetime = 2\n"
        "print(r.resolve('shop.internal', 'A')[0].address)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, host, str(port)],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    assert result.stdout.strip() == "10.0.0.9"


def test_queries_are_recorded(responder: DNSResponder) -> None:
    ask(responder, "Shop.Internal", "AAAA")
    ask(responder, "vms.shop.internal", "TXT", tcp=True)
    assert responder.queries == [("shop.internal", "AAAA"), ("vms.shop.internal", "TXT")]
    responder.clear_queries()
    assert responder.queries == []


def test_garbage_does_not_stop_the_server(responder: DNSResponder) -> None:
    responder.set_a("shop.internal", ["10.0.0.1"])
    host, port = responder.address
    response = dns.message.make_response(dns.message.make_query("shop.internal", "A"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for junk in (b"", b"\x00", b"\xff" * 11, b"\x12\x34" + b"\x01" * 40, response.to_wire()):
            udp.sendto(junk, (host, port))
    with socket.create_connection((host, port), timeout=TIMEOUT) as tcp:
        tcp.sendall(b"\x00\x05hello\x00\x03ab")  # a junk message, then a cut-off one
    with socket.create_connection((host, port), timeout=TIMEOUT) as tcp:
        tcp.sendall(b"\x00")  # half a length prefix, then gone
    assert texts(ask(responder, "shop.internal", "A")) == ["10.0.0.1"]
    assert texts(ask(responder, "shop.internal", "A", tcp=True)) == ["10.0.0.1"]


def test_close_is_fast_idempotent_and_frees_the_port() -> None:
    server = DNSResponder()
    server.start()
    host, port = server.address
    assert server.server_spec == f"{host}:{port}"
    started = time.monotonic()
    server.close()
    server.close()
    assert time.monotonic() - started < 1.0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((host, port))
    with pytest.raises(RuntimeError):
        server.start()


def test_close_with_an_idle_tcp_client_connected() -> None:
    with DNSResponder() as server, socket.create_connection(server.address, timeout=TIMEOUT):
        pass  # the client's connection is still open when the server closes
    assert not server._thread or not server._thread.is_alive()


def test_address_before_start_and_non_loopback() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        _ = DNSResponder().address
    with pytest.raises(ValueError, match="loopback"):
        DNSResponder("192.0.2.1")


def test_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with DNSResponder("::1") as server:
        server.set_a("shop.internal", ["10.0.0.1"])
        assert server.server_spec.startswith("[::1]:")
        assert texts(ask(server, "shop.internal", "A")) == ["10.0.0.1"]
        assert texts(ask(server, "shop.internal", "A", tcp=True)) == ["10.0.0.1"]


def test_bad_records_are_refused_at_once(responder: DNSResponder) -> None:
    with pytest.raises(ValueError, match="IPv4"):
        responder.set_a("shop.internal", ["fdaa::1"])
    with pytest.raises(ValueError, match="IPv6"):
        responder.set_aaaa("shop.internal", ["10.0.0.1"])
