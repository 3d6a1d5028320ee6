"""Several nodes drain at about the same time (issue 7, invariant 1), as processes on loopback.

Two nodes of the newest release drain while an older node serves: a rollback, a scale-down,
two machines of a blue-green deploy whose SIGTERMs arrive a few milliseconds apart. Each may
pick the other as its successor. Before the fix one accepted the other's records,
acknowledged them, and exported its own cache without them: up to half of all entries
vanished while both reports said ``dropped: 0``. Now a draining node refuses offers, lets
the streams it accepted finish (or withdraws from them) and only then exports, so every key
ends on the serving node or is reported dropped with a reason, whatever the stagger and
whether or not release names sort (git SHAs).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest

from handoff.testing import NodeProcess
from tests._helpers import ProcessCluster, loopback_aliases_usable

pytestmark = pytest.mark.slow

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
ENTRIES = 20_000
STAGGERS_MS = (0, 5, 20, 50, 200)
# Each release naming runs every stagger with HANDOFF_DEEP_TESTS=1; by default the two share
# them out (both keep 0: drains that start together), which halves their 28 s.
DEEP = os.environ.get("HANDOFF_DEEP_TESTS") == "1"
SHARED_STAGGERS_MS = {"v1": (0, 20, 200), "f00dbee": (0, 5, 50)}
STARTUP_TIMEOUT = 60.0
CONNECT_TIMEOUT = 20.0


@pytest.fixture
def cluster() -> Iterator[ProcessCluster]:
    if not loopback_aliases_usable(HOSTS):
        pytest.skip(f"cannot bind {', '.join(HOSTS)} (on macOS: ifconfig lo0 alias 127.0.0.2)")
    with contextlib.ExitStack() as stack:
        yield ProcessCluster(stack)


def _connected(*nodes: NodeProcess) -> None:
    for node in nodes:
        node.wait_ready(timeout=STARTUP_TIMEOUT)
    for node in nodes:
        for other in nodes:
            if other is not node:
                node.wait_for("node-up", other.name, timeout=CONNECT_TIMEOUT)


def _lost(report: Mapping[str, Any]) -> int:
    ns = report["namespaces"]["n"]
    dropped = sum(ns["dropped"].values())
    # Invariant 1 on every report: each record acknowledged, snapshotted or dropped.
    assert ns["records"] == ns["acknowledged"] + ns["snapshotted"] + dropped, ns
    return int(dropped + sum(ns["receiver_dropped"].values()))


def _drain_together(
    cluster: ProcessCluster,
    serving: NodeProcess,
    *,
    release: str,
    prefixes: Sequence[str],
    stagger_ms: int,
) -> list[dict[str, Any]]:
    """Start one node per prefix (``ENTRIES`` entries each), connected to ``serving`` and
    to each other; drain them ``stagger_ms`` apart; return their drain reports."""
    leaving: list[NodeProcess] = []
    for index, prefix in enumerate(prefixes):
        state = {"namespace": "n", "type": "dict", "entries": ENTRIES, "key_prefix": prefix}
        peers = [serving.address, *(node.address for node in leaving)]
        host = HOSTS[1 + index]
        leaving.append(cluster.start(prefix, host, release=release, state=state, peers=peers))
        leaving[-1].wait_ready(timeout=STARTUP_TIMEOUT)
    _connected(serving, *leaving)
    marks = []
    for node in leaving:
        marks.append(node.send("drain"))
        time.sleep(stagger_ms / 1000)
    reports = [
        node.wait_for("drained", since=mark, timeout=60)["report"]
        for node, mark in zip(leaving, marks, strict=True)
    ]
    for node in leaving:
        node.kill()  # their state has moved; a SIGTERM would only drain them again
    return reports


@pytest.mark.parametrize(
    ("old_release", "new_release"),
    [("v1", "v2"), ("f00dbee", "a11ce55")],
    ids=["sortable releases", "git SHAs"],
)
def test_two_nodes_draining_together_lose_nothing(
    cluster: ProcessCluster, old_release: str, new_release: str
) -> None:
    serving = cluster.start(
        "serving",
        HOSTS[0],
        release=old_release,
        state={"namespace": "n", "type": "dict", "entries": 0},
    )
    serving.wait_ready(timeout=STARTUP_TIMEOUT)
    results = []
    for stagger in STAGGERS_MS if DEEP else SHARED_STAGGERS_MS[old_release]:
        prefixes = [f"a{stagger}x", f"b{stagger}x"]
        reports = _drain_together(
            cluster, serving, release=new_release, prefixes=prefixes, stagger_ms=stagger
        )
        held = serving.command("stats")["by_prefix"]
        lost = sum(_lost(report) for report in reports)
        results.append((stagger, [held.get(p, 0) for p in prefixes], lost))
        for prefix in prefixes:
            # Every key ends on the serving node or is reported dropped with a reason ...
            assert held.get(prefix, 0) + lost >= ENTRIES, (stagger, held, reports)
        # ... and here, with room for everything, nothing is dropped at all.
        assert lost == 0, (stagger, reports)
        assert all(report["ok"] for report in reports)
        assert held.get("", 0) == 0, "the serving node holds entries nobody sent"
    print(f"{new_release} draining together ({ENTRIES} entries each): " + "; ".join(
        f"{stagger} ms apart: serving holds {held[0]} + {held[1]}, {lost} reported dropped"
        for stagger, held, lost in results
    ))  # fmt: skip


def test_three_nodes_draining_in_a_chain_lose_nothing(cluster: ProcessCluster) -> None:
    serving = cluster.start(
        "serving", HOSTS[0], release="v1", state={"namespace": "n", "type": "dict", "entries": 0}
    )
    serving.wait_ready(timeout=STARTUP_TIMEOUT)
    prefixes = ["ax", "bx", "cx"]
    reports = _drain_together(cluster, serving, release="v2", prefixes=prefixes, stagger_ms=20)
    held = serving.command("stats")["by_prefix"]
    lost = sum(_lost(report) for report in reports)
    print(f"three draining 20 ms apart: serving holds {held}, {lost} reported dropped")
    assert lost == 0, reports
    assert [held.get(prefix, 0) for prefix in prefixes] == [ENTRIES] * 3
    assert held.get("", 0) == 0
