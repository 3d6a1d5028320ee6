"""Three real node processes on 127.0.0.2-4, found through a real DNS server.

They check what only separate processes can show: a SIGKILLed process is noticed at once
(the kernel closes its sockets), a SIGSTOPped one only by the heartbeat timeout (its
connections stay open but it goes silent), a SIGTERMed one says goodbye, and a node whose
DNS record disappears is not reported down (absence from DNS is not death).
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from handoff.testing import DNSResponder, NodeProcess, NodeProcessError, free_port_on_all
from tests._helpers import loopback_aliases_usable

pytestmark = pytest.mark.slow

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
NAMES = ("node-a", "node-b", "node-c")
RELEASES = ("v1", "v2", "v2")
DNS_NAME = "shop.test"
POLL_INTERVAL = 0.5
HEARTBEAT_TIMEOUT = 3.0
# Scheduling, pipes and the expiry tick on a loaded CI machine.
SLACK = 1.0
STARTUP_TIMEOUT = 20.0


@dataclass
class Cluster:
    """The running nodes and the DNS server they discover each other through."""

    dns: DNSResponder
    port: int
    nodes: dict[str, NodeProcess]

    def others(self, name: str) -> list[NodeProcess]:
        """Every node but ``name``."""
        return [node for other, node in self.nodes.items() if other != name]


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """Three nodes in full mesh; every process is ended by the fixture, pass or fail."""
    if not loopback_aliases_usable(HOSTS):
        pytest.skip(f"cannot bind {', '.join(HOSTS)} (on macOS: ifconfig lo0 alias 127.0.0.2)")
    cookie = secrets.token_urlsafe(32)
    with DNSResponder() as dns, contextlib.ExitStack() as stack:
        port = free_port_on_all(HOSTS)
        dns.set_a(DNS_NAME, HOSTS)
        nodes: dict[str, NodeProcess] = {}
        for name, host, release in zip(NAMES, HOSTS, RELEASES, strict=True):
            env = {
                "HANDOFF_COOKIE": cookie,
                "HANDOFF_CLUSTER": "shop",
                "HANDOFF_RELEASE": release,
                "HANDOFF_BIND": f"{host}:{port}",
                "HANDOFF_DISCOVERY": f"dns:{DNS_NAME}:{port}",
                "HANDOFF_DNS_SERVER": dns.server_spec,
                "HANDOFF_POLL_INTERVAL": str(POLL_INTERVAL),
                "HANDOFF_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
            }
            # Entered into the stack as soon as it exists: closed even if a later one fails.
            nodes[name] = stack.enter_context(NodeProcess(env, name=name))
        for node in nodes.values():
            node.wait_ready(timeout=STARTUP_TIMEOUT)
        cluster = Cluster(dns, port, nodes)
        for name, node in nodes.items():
            for other in cluster.others(name):
                node.wait_for("node-up", other.name, timeout=STARTUP_TIMEOUT)
        yield cluster


def _events(node: NodeProcess, kind: str, peer: str) -> list[dict[str, object]]:
    return [e for e in node.events if e["event"] == kind and e.get("peer") == peer]


def test_each_node_sees_the_others_up_once_with_their_release(cluster: Cluster) -> None:
    releases = dict(zip(NAMES, RELEASES, strict=True))
    for name, node in cluster.nodes.items():
        assert node.listening is not None
        assert node.listening["release"] == releases[name]
        assert node.address == f"{HOSTS[NAMES.index(name)]}:{cluster.port}"
        for other in cluster.others(name):
            ups = _events(node, "node-up", other.name)
            # Both sides dial each other; the duplicate link must stay invisible.
            assert len(ups) == 1, ups
            assert ups[0]["release"] == releases[other.name]
            assert ups[0]["address"] == other.address
            assert ups[0]["state"] == "serving"
        assert not [e for e in node.events if e["event"] == "node-down"]


def test_sigkill_is_reported_down_within_the_heartbeat_timeout(cluster: Cluster) -> None:
    victim = cluster.nodes["node-a"]
    started = time.monotonic()
    assert victim.kill() == -9
    for observer in cluster.others("node-a"):
        event = observer.wait_for("node-down", "node-a", timeout=HEARTBEAT_TIMEOUT + SLACK + 5)
        elapsed = float(event["received_at"]) - started
        print(f"{observer.name} saw SIGKILLed node-a down after {elapsed:.3f} s: {event['reason']}")
        assert elapsed < HEARTBEAT_TIMEOUT + SLACK
        # The kernel closes a killed process's sockets, so this is normally "connection
        # lost" within milliseconds; a timeout would still be a correct, slower, answer.
        assert event["reason"] in ("connection lost", "heartbeat timeout")
        assert event["release"] == "v1"


def test_sigterm_says_goodbye(cluster: Cluster) -> None:
    victim = cluster.nodes["node-b"]
    started = time.monotonic()
    assert victim.terminate(timeout=10) == 0
    assert [e["event"] for e in victim.events][-2:] == ["stopping", "stopped"]
    for observer in cluster.others("node-b"):
        event = observer.wait_for("node-down", "node-b", timeout=5)
        elapsed = float(event["received_at"]) - started
        print(f"{observer.name} saw SIGTERMed node-b down after {elapsed:.3f} s: {event['reason']}")
        assert event["reason"] == "goodbye"


def test_absence_from_dns_is_not_death(cluster: Cluster) -> None:
    dns = cluster.dns
    dns.clear_queries()
    dns.set_a(DNS_NAME, HOSTS[:2])  # node-c vanishes from DNS, as a draining pod would
    changed = time.monotonic()
    # Every node polls every POLL_INTERVAL: wait until at least two polls of each node could
    # have seen the change (both the time and the queries), then look for a node-down.
    deadline = changed + 10 * POLL_INTERVAL
    while time.monotonic() < changed + 2 * POLL_INTERVAL + 0.2 or dns.queries.count(
        (DNS_NAME, "A")
    ) < 2 * len(NAMES):
        assert time.monotonic() < deadline, f"nodes stopped polling DNS: {dns.queries}"
        time.sleep(0.05)
    for observer in cluster.others("node-c"):
        assert not [e for e in observer.events if e["event"] in ("node-down", "leaving")]
    # The link to node-c is still there: killing it is noticed at once, not re-discovered.
    victim = cluster.nodes["node-c"]
    started = time.monotonic()
    victim.kill()
    for observer in cluster.others("node-c"):
        event = observer.wait_for("node-down", "node-c", timeout=HEARTBEAT_TIMEOUT + SLACK)
        assert float(event["received_at"]) - started < HEARTBEAT_TIMEOUT + SLACK


def test_a_silent_process_is_reported_down_by_heartbeat_timeout(cluster: Cluster) -> None:
    victim = cluster.nodes["node-c"]
    victim.pause()  # SIGSTOP: the kernel keeps its connections open, it just goes silent
    started = time.monotonic()
    try:
        for observer in cluster.others("node-c"):
            event = observer.wait_for("node-down", "node-c", timeout=HEARTBEAT_TIMEOUT + SLACK + 5)
            elapsed = float(event["received_at"]) - started
            print(
                f"{observer.name} saw SIGSTOPped node-c down after {elapsed:.3f} s: "
                f"{event['reason']}"
            )
            assert event["reason"] == "heartbeat timeout"
            # Its last heartbeat came about one interval (timeout / 3) or less before the
            # stop, so the silence is noticed after two to three seconds.
            assert HEARTBEAT_TIMEOUT / 3 < elapsed < HEARTBEAT_TIMEOUT + SLACK
    finally:
        victim.kill()  # a stopped process cannot handle SIGTERM; no SIGCONT needed


def test_node_process_reports_a_node_that_cannot_start() -> None:
    env = {"HANDOFF_CLUSTER": "shop", "HANDOFF_BIND": "127.0.0.1:0"}  # no cookie
    with NodeProcess(env, name="no-cookie") as node:
        with pytest.raises(NodeProcessError, match="HANDOFF_COOKIE") as raised:
            node.wait_ready(timeout=STARTUP_TIMEOUT)
        assert "exited (code 2)" in str(raised.value)
    assert node.returncode == 2


def test_node_process_timeout_says_what_it_saw_and_stops_cleanly() -> None:
    env = {
        "HANDOFF_CLUSTER": "shop",
        "HANDOFF_COOKIE": secrets.token_urlsafe(32),
        "HANDOFF_BIND": "127.0.0.1:0",
        "HANDOFF_DISCOVERY": "none",
    }
    with NodeProcess(env, name="alone") as node:
        listening = node.wait_ready(timeout=STARTUP_TIMEOUT)
        assert listening["name"] == "alone"
        assert node.port > 0
        with pytest.raises(TimeoutError, match="no 'node-up' event") as raised:
            node.wait_for("node-up", timeout=0.2)
        assert '"event":"listening"' in str(raised.value)
        assert node.terminate() == 0
        assert [e["event"] for e in node.events] == ["listening", "stopping", "stopped"]
