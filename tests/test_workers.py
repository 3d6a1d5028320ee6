"""Several workers per machine, in process: the port range, worker names, discovery that
probes the range, siblings as successors, spread over the next release's workers, and a
worker that finds no free port serving on without a node.

The real servers (uvicorn, gunicorn, Flask) are in tests/test_workers_servers.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from handoff import ConfigError, Node, PortsInUse
from handoff.cli import _doctor_checks
from handoff.config import for_worker, resolve_settings, worker_ports
from handoff.discovery import DnsDiscovery, PeerAddress, make_discovery, parse_discovery_spec
from handoff.discovery._dns import merge_addresses
from handoff.testing import DNSResponder
from tests._helpers import FAST, wait_until

pytestmark = pytest.mark.anyio

COOKIE = "zQ8v-Lr2mW9xT4kP7nB3yH6cJ1"
ENV = {"HANDOFF_COOKIE": COOKIE, "HANDOFF_CLUSTER": "shop"}


def free_range(hosts: Sequence[str], count: int, *, attempts: int = 200) -> int:
    """A base port whose ``count`` ports are all free on every host right now (below the
    ephemeral range, so that outgoing connections do not take them meanwhile)."""
    for _ in range(attempts):
        base = random.randrange(20000, 32000 - count)
        try:
            with contextlib.ExitStack() as stack:
                for host in hosts:
                    for port in range(base, base + count):
                        sock = stack.enter_context(socket.socket())
                        sock.bind((host, port))
        except OSError:
            continue
        return base
    raise OSError(f"no {count} free ports in a row on {hosts}")


# -- configuration ---------------------------------------------------------------------------


def test_port_range_defaults_to_16_and_is_checked() -> None:
    settings = resolve_settings(environ=ENV)
    assert settings.port_range == 16
    assert list(worker_ports(settings.bind_port, settings.port_range)) == list(range(4370, 4386))
    assert resolve_settings(environ={**ENV, "HANDOFF_PORT_RANGE": "4"}).port_range == 4
    assert resolve_settings(environ=ENV, port_range=1).port_range == 1
    for bad in ("0", "-1", "x", "1.5", "257"):
        with pytest.raises(ConfigError, match="HANDOFF_PORT_RANGE"):
            resolve_settings(environ={**ENV, "HANDOFF_PORT_RANGE": bad})
    with pytest.raises(ConfigError, match="HANDOFF_PORT_RANGE"):
        resolve_settings(environ=ENV, port_range=True)
    # Port 0 (any free port, for tests) has no range; the range stops at 65535.
    assert list(worker_ports(0, 16)) == [0]
    assert list(worker_ports(65534, 16)) == [65534, 65535]


def test_a_worker_on_a_later_port_gets_its_own_name_and_control_socket() -> None:
    fly = {
        **ENV,
        "FLY_APP_NAME": "shop",
        "FLY_MACHINE_ID": "683d314fdd4d68",
        "HANDOFF_CONTROL_SOCKET": "/run/handoff/shop.sock",
    }
    settings = resolve_settings(environ=fly)
    pid = os.getpid()
    # The first worker, on the configured port, keeps the usual name.
    assert for_worker(settings, 4370, pid=pid, built_by=pid) is settings
    second = for_worker(settings, 4371, pid=pid, built_by=pid)
    assert second.node_name == "683d314fdd4d68-4371"
    assert second.control_socket == Path("/run/handoff/shop-4371.sock")
    # An explicit name that every worker shares (the same environment) is told apart too.
    named = resolve_settings(
        environ={**ENV, "HANDOFF_NODE_NAME": "web", "HANDOFF_BIND": "127.0.0.1:1"}
    )
    assert for_worker(named, 2, pid=pid, built_by=pid).node_name == "web-2"
    long = resolve_settings(environ={**ENV, "HANDOFF_NODE_NAME": "n" * 128})
    assert len(for_worker(long, 4385, pid=pid, built_by=pid).node_name) == 128


def test_a_forked_worker_rebuilds_the_default_host_pid_name() -> None:
    settings = resolve_settings(environ=ENV)  # built in "the master" (this process)
    assert settings.node_name.endswith(f"-{os.getpid()}")
    forked = for_worker(settings, 4370, pid=os.getpid() + 1, built_by=os.getpid())
    assert forked.node_name.endswith(f"-{os.getpid() + 1}")
    # A name somebody chose stays as chosen.
    named = resolve_settings(environ={**ENV, "HANDOFF_NODE_NAME": "web"})
    assert for_worker(named, 4370, pid=os.getpid() + 1, built_by=os.getpid()) is named


# -- discovery -------------------------------------------------------------------------------


async def test_static_hosts_without_a_port_probe_the_range_entries_with_one_stay_exact() -> None:
    spec = parse_discovery_spec("static:10.0.0.1,10.0.0.2:5000,[fd00::1]")
    assert spec.static == (PeerAddress("10.0.0.2", 5000),)
    assert spec.static_hosts == ("10.0.0.1", "fd00::1")
    discovery = make_discovery(spec, default_port=4370, ports=3)
    found = await discovery.discover()
    assert [str(a) for a in found] == [
        "10.0.0.2:5000",
        "10.0.0.1:4370",
        "10.0.0.1:4371",
        "10.0.0.1:4372",
        "[fd00::1]:4370",
        "[fd00::1]:4371",
        "[fd00::1]:4372",
    ]
    assert [a.probe for a in found] == [False, False, True, True, False, True, True]
    assert discovery.describe() == "static:10.0.0.2:5000,10.0.0.1:4370+2,[fd00::1]:4370+2"


async def test_dns_addresses_are_probed_on_the_range_srv_ports_stay_exact() -> None:
    with DNSResponder() as dns:
        dns.set_a("shop.test", ["10.0.0.2", "10.0.0.1"])
        dns.set_srv("_h._tcp.shop.test", [(0, 0, 5000, "a.shop.test")])
        dns.set_a("a.shop.test", ["10.0.0.9"])
        server = dns.address
        plain = DnsDiscovery("shop.test", port=4370, dns_server=server, ports=2)
        found = await plain.discover()
        srv = DnsDiscovery("_h._tcp.shop.test", port=4370, dns_server=server, ports=2)
        exact = await srv.discover()
    assert [(str(a), a.probe) for a in found] == [
        ("10.0.0.1:4370", False),
        ("10.0.0.1:4371", True),
        ("10.0.0.2:4370", False),
        ("10.0.0.2:4371", True),
    ]
    assert "ports 4370..4371" in plain.describe()
    assert [str(a) for a in exact] == ["10.0.0.9:5000"]


def test_an_address_is_a_probe_only_if_every_copy_is() -> None:
    merged = merge_addresses(
        [PeerAddress("10.0.0.1", 4371, probe=True), PeerAddress("10.0.0.1", 4371)]
    )
    assert [(str(a), a.probe) for a in merged] == [("10.0.0.1:4371", False)]


# -- nodes -----------------------------------------------------------------------------------


def worker(
    host: str, port: int, *, release: str = "v1", hosts: Sequence[str] = (), **kwargs: Any
) -> Node:
    """A worker as every worker of a machine is configured: the same settings (no name:
    the default, HOST-PID, is the same for the workers of this one test process)."""
    discovery = "static:" + ",".join(hosts or (host,))
    return Node(
        "shop",
        **{
            **FAST,
            "name": f"{release}@{host}",
            "release": release,
            "bind": f"{host}:{port}",
            "discovery": discovery,
            "port_range": 4,
            "control_socket": "none",
            **kwargs,
        },
    )


@contextlib.asynccontextmanager
async def running(*nodes: Node) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        for node in nodes:
            await stack.enter_async_context(node)
        yield


async def test_workers_with_the_same_settings_take_the_next_ports_and_find_each_other(
    caplog: pytest.LogCaptureFixture,
) -> None:
    base = free_range(["127.0.0.2"], 4)
    first, second, third = (worker("127.0.0.2", base) for _ in range(3))
    with caplog.at_level(logging.DEBUG, logger="handoff"):
        async with running(first, second, third):
            assert [n.port for n in (first, second, third)] == [base, base + 1, base + 2]
            assert [n.name for n in (first, second, third)] == [
                "v1@127.0.0.2",
                f"v1@127.0.0.2-{base + 1}",
                f"v1@127.0.0.2-{base + 2}",
            ]
            await wait_until(lambda: all(len(n.peers()) == 2 for n in (first, second, third)))
            # Nobody on the last port of the range: probed quietly, never a warning.
            await anyio.sleep(0.5)
    noisy = [
        r for r in caplog.records if r.levelno >= logging.WARNING and "COOKIE" not in r.getMessage()
    ]
    assert noisy == [], [r.getMessage() for r in noisy]


async def test_no_free_port_in_the_range_is_ports_in_use() -> None:
    base = free_range(["127.0.0.2"], 2)
    nodes = [worker("127.0.0.2", base, port_range=2) for _ in range(3)]
    async with running(*nodes[:2]):
        with pytest.raises(PortsInUse, match=r"and the 1 ports after it.*HANDOFF_PORT_RANGE"):
            await nodes[2].start()
        assert not nodes[2].running


async def test_a_worker_without_a_port_serves_on_under_the_asgi_lifespan(
    caplog: pytest.LogCaptureFixture,
) -> None:
    base = free_range(["127.0.0.2"], 1)
    holder = worker("127.0.0.2", base, port_range=1)
    late = worker("127.0.0.2", base, port_range=1)
    served = False
    async with running(holder), late.lifespan(object()):
        served = True
        assert not late.running
        assert late.is_warm
        assert "already in use" in late.join_error
    assert served
    assert any("serves WITHOUT a node" in r.getMessage() for r in caplog.records)


async def test_a_recycled_worker_hands_its_state_to_its_siblings() -> None:
    base = free_range(["127.0.0.2"], 4)
    leaving, sibling, other = (worker("127.0.0.2", base) for _ in range(3))
    state = {f"k{i}": i for i in range(300)}
    kept: list[dict[str, int]] = [{}, {}]
    leaving.track("entries", state)
    sibling.track("entries", kept[0])
    other.track("entries", kept[1])
    async with running(sibling, other):
        async with leaving:
            await wait_until(lambda: len(leaving.peers()) == 2)
        report = leaving.last_drain_report
        assert report is not None
        assert report.ok, report.summary()
        assert report.namespaces["entries"].acknowledged == 300
        assert {**kept[0], **kept[1]} == state
        assert kept[0]
        assert kept[1]  # split between both siblings, not all to one


async def test_two_draining_workers_spread_over_the_next_releases_workers() -> None:
    hosts = ("127.0.0.2", "127.0.0.3")
    base = free_range(hosts, 4)
    old = [worker(hosts[0], base, release="v1", hosts=hosts) for _ in range(2)]
    new = [worker(hosts[1], base, release="v2", hosts=hosts) for _ in range(2)]
    held = [{f"{w}-{i}": i for i in range(200)} for w in range(2)]
    received: list[dict[str, int]] = [{}, {}]
    for node, state in zip(old, held, strict=True):
        node.track("entries", state)
    for node, got in zip(new, received, strict=True):
        node.track("entries", got)
    async with running(*new):
        async with running(*old):
            await wait_until(lambda: all(len(n.peers()) == 3 for n in old + new))
            async with anyio.create_task_group() as drains:
                for node in old:
                    drains.start_soon(node.drain)
        for node in old:
            report = node.last_drain_report
            assert report is not None
            assert report.ok, report.summary()
            assert report.namespaces["entries"].acknowledged == 200
        assert {**received[0], **received[1]} == {**held[0], **held[1]}
        # Each new worker got records of each old worker: neither old worker sent all
        # of its state to one successor.
        for got in received:
            for w in range(2):
                assert any(key.startswith(f"{w}-") for key in got), (w, len(got))


async def test_doctor_says_how_many_ports_of_the_range_are_taken_here(tmp_path: Path) -> None:
    base = free_range(["127.0.0.2"], 2)
    env = {
        **ENV,
        "HANDOFF_BIND": f"127.0.0.2:{base}",
        "HANDOFF_PORT_RANGE": "2",
        "HANDOFF_CONTROL_SOCKET": str(tmp_path / "none-here.sock"),
    }
    with contextlib.ExitStack() as stack:
        for taken in range(2):
            sock = stack.enter_context(socket.socket())
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.2", base + taken))
            sock.listen()
            report = await _doctor_checks(None, env)
            ports = [n for n in report.notes if "ports" in n and "in use on this host" in n]
            assert ports == [
                f"{taken + 1} of the 2 ports {base}..{base + 1} are in use on this host (the "
                f"worker nodes here: {', '.join(str(base + p) for p in range(taken + 1))})"
            ]
            full = [p for p in report.problems if "serves WITHOUT a node" in p.what]
            assert len(full) == taken  # a problem only once every port is taken


async def test_a_worker_started_again_keeps_one_suffix() -> None:
    base = free_range(["127.0.0.2"], 4)
    first, second = (worker("127.0.0.2", base) for _ in range(2))
    async with first:
        for _ in range(2):
            async with second:
                assert second.name == f"v1@127.0.0.2-{base + 1}"
    # Alone now, on the configured port: the configured name again.
    async with second:
        assert second.name == "v1@127.0.0.2"
        assert second.port == base
