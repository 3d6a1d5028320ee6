"""Counters across a chain of deploys of real node processes (v1 -> v2 -> ...: 20 deploys with
HANDOFF_DEEP_TESTS=1, 6 by default).

Each node is a child process (tests/_counters_child.py) holding ``handoff.Counters``. Every
deploy starts the next release, increments on both nodes, drains the old one into the new
one and stops it; in some of them (three, or two by default) a second, slow successor of
the new release takes part and is SIGKILLed while it applies a chunk (it prints what it
applied before it acknowledges): the draining node re-sends what it did not acknowledge to
the other one. At the end the last node holds exactly every increment minus what the
killed nodes held when they died, every report adds up, and each node's per-key storage
never grew beyond one value per key.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from handoff.testing import NodeProcess
from tests._helpers import loopback_aliases_usable

pytestmark = pytest.mark.slow

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
CLUSTER = "shop"
CHILD = Path(__file__).with_name("_counters_child.py")
# 20 deploys with HANDOFF_DEEP_TESTS=1; 6 in the default run (the suite's time budget).
DEEP = os.environ.get("HANDOFF_DEEP_TESTS") == "1"
DEPLOYS = 20 if DEEP else 6
KILLED_IN = (4, 11, 17) if DEEP else (2, 5)
"""Deploys (1-based) whose slow successor is SIGKILLed mid-stream."""
KEYS = 30_000
"""Key space: the draining node holds most of it, so a stream has several chunks."""
TIMEOUT = 30.0


class Cluster:
    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.stack = stack
        self.cookie = secrets.token_urlsafe(32)
        self.hosts = iter(HOSTS * 100)
        self.incremented = 0
        self.seed = 0

    def start(self, name: str, release: str, peers: list[str], delay: float = 0.0) -> NodeProcess:
        env = {
            "HANDOFF_COOKIE": self.cookie,
            "HANDOFF_CLUSTER": CLUSTER,
            "HANDOFF_RELEASE": release,
            "HANDOFF_BIND": f"{next(self.hosts)}:0",
            "HANDOFF_DISCOVERY": "static:" + ",".join(peers) if peers else "none",
            "HANDOFF_POLL_INTERVAL": "0.2",
            "HANDOFF_HEARTBEAT_TIMEOUT": "6",
            "HANDOFF_DRAIN_TIMEOUT": "30",
            "HANDOFF_WARMUP_TIMEOUT": "1",
            "HANDOFF_TEST_APPLY_DELAY": str(delay),
        }
        node = NodeProcess(env, name=name, program=[sys.executable, str(CHILD)])
        return self.stack.enter_context(node)

    def incr(self, node: NodeProcess, count: int) -> None:
        self.seed += 1
        reply = node.command(
            f"incr {count} {self.seed} {KEYS}", wait_for_event="incremented", timeout=TIMEOUT
        )
        self.incremented += reply["amount"]


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    if not loopback_aliases_usable(HOSTS):
        pytest.skip(f"cannot bind {', '.join(HOSTS)} (on macOS: ifconfig lo0 alias 127.0.0.2)")
    with contextlib.ExitStack() as stack:
        yield Cluster(stack)


def _connected(old: NodeProcess, *new: NodeProcess) -> None:
    for node in new:
        node.wait_ready(timeout=TIMEOUT)
        node.wait_for("node-up", old.name, timeout=TIMEOUT)
        old.wait_for("node-up", node.name, timeout=TIMEOUT)


def _amount(node: NodeProcess, event: str) -> int:
    return sum(e["amount"] for e in node.events if e.get("event") == event)


def _check_storage(node: NodeProcess) -> dict[str, Any]:
    """One value per key, no windows, no peers' shares: the metadata of a counter is its
    value, whatever the number of deploys behind it."""
    stats = node.command("stats", timeout=TIMEOUT)
    assert stats["values"] == stats["keys"] <= KEYS, stats
    assert stats["deadlines"] == 0, stats
    assert stats["views"] == 0, stats
    return stats


def test_a_chain_of_deploys_with_successors_killed_mid_stream_keeps_counts_exact(
    cluster: Cluster,
) -> None:
    lost = 0
    old = cluster.start("n1", "v1", [])
    old.wait_ready(timeout=TIMEOUT)
    cluster.incr(old, 60_000)
    for deploy in range(1, DEPLOYS + 1):
        release = f"v{deploy + 1}"
        new = cluster.start(f"n{deploy + 1}", release, [old.address])
        slow = None
        if deploy in KILLED_IN:
            slow = cluster.start(f"s{deploy + 1}", release, [old.address], delay=2.0)
            _connected(old, new, slow)
            cluster.incr(slow, 3_000)
        else:
            _connected(old, new)
        cluster.incr(old, 5_000)
        cluster.incr(new, 5_000)
        mark = old.send("drain")
        if slow is not None:
            # Killed while it applies its second chunk: the first one is applied and
            # acknowledged, the second never applied.
            slow.wait_for("applying", count=2, timeout=TIMEOUT)
            assert slow.kill() == -9
            slow.close()  # reaped, its stdout read to the end
            died_with = _amount(slow, "incremented") + _amount(slow, "applied")
            assert _amount(slow, "applied") > 0, "the slow successor must die mid-stream"
            lost += died_with
        drained = old.wait_for("drained", since=mark, timeout=60)
        report = drained["report"]
        ns = report["namespaces"]["usage"]
        assert ns["records"] == ns["acknowledged"] + ns["snapshotted"] + sum(
            ns["dropped"].values()
        ), ns
        assert ns["acknowledged"] == ns["applied"], ns
        assert ns["dropped"] == {}, ns
        assert ns["snapshotted"] == 0, ns
        assert drained["held"] == 0, drained  # everything left
        if slow is None:
            assert report["ok"], report
            assert ns["successors"] == [new.name], ns
        else:
            assert ns["in_doubt"] > 0, ns  # what the killed one had not acknowledged
            assert new.name in ns["successors"], ns
        old.command("stop", timeout=TIMEOUT)
        old.close()
        cluster.incr(new, 2_000)
        stats = _check_storage(new)
        # Exact after every deploy: what was counted, less what died with a killed node.
        assert stats["held"] == cluster.incremented - lost, (deploy, stats, lost)
        old = new
    assert old.name == f"n{DEPLOYS + 1}"
    assert lost > 0
