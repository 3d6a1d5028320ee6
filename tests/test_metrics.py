"""The Prometheus collector (``handoff.metrics``) on in-process nodes: values read from a
real drain and receive, checked against the drain report and the receiver's outcome."""

from __future__ import annotations

import builtins
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

import handoff
import handoff.metrics
from handoff.engine import NamespaceReport
from handoff.metrics import METRICS, MissingExtra, prometheus_app, register_prometheus
from tests._helpers import connected, wait_until
from tests._helpers import handoff_node as node

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of a scrape by name and sorted labels."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def scrape(registry: CollectorRegistry) -> Samples:
    return samples(generate_latest(registry).decode())


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def names(found: Samples) -> set[str]:
    return {name for name, _ in found}


async def test_a_drain_and_its_receive_in_the_metrics() -> None:
    users = {f"u{i}": str(i) for i in range(500)}
    carts = {f"c{i}": [i] for i in range(30)}
    old = node("old", "127.0.0.2", release="v1")
    old.track("users", users)
    old.track("carts", carts)
    old_metrics = register_prometheus(old)
    async with old:
        new = node("new", "127.0.0.3", old, release="v2")
        # One key held here (kept), and a validator that rejects one record (dropped).
        target: dict[str, str] = {"u1": "mine"}
        new.track("users", target, validate=lambda key, value: key != "u2")
        new.track("carts", {})
        new_metrics = register_prometheus(new)
        async with new:
            await wait_until(connected(old, new))
            before = scrape(old_metrics)
            # Scraped during the drain too, at every step it reports (on the event loop,
            # as the ASGI app's scrape runs).
            during: list[tuple[str, int, Samples]] = []

            def progress(ns: NamespaceReport) -> None:
                during.append((ns.namespace, ns.acknowledged, scrape(old_metrics)))

            with old.watch_drain(progress):
                report = await old.drain()
            await wait_until(lambda: new.last_received is not None)
            sent = scrape(old_metrics)
            received = scrape(new_metrics)

    # Before the drain: nothing counted, peers and entries read off the node.
    assert not any(name.startswith("handoff_records_") for name in names(before))
    assert "handoff_drain_seconds_count" not in names(before)
    assert value(before, "handoff_peers", state="serving") == 1
    assert value(before, "handoff_peers", state="draining") == 0
    assert value(before, "handoff_entries", namespace="users") == 500
    assert value(before, "handoff_draining") == 0
    assert value(before, "handoff_handoffs_received_total") == 0

    # During the drain: each namespace as far as it was acknowledged, the drain unfinished.
    assert next(name for name, _, _ in during) == "carts"
    assert {name for name, _, _ in during} == {"carts", "users"}
    for name, acknowledged, found in during:
        assert value(found, "handoff_records_acknowledged_total", namespace=name) == acknowledged
        assert value(found, "handoff_draining") == 1
        assert "handoff_drain_seconds_count" not in names(found)
    first_users = next(found for name, _, found in during if name == "users")
    assert value(first_users, "handoff_records_sent_total", namespace="carts") == 30

    # The sender: what its drain report says.
    for name, ns in report.namespaces.items():
        assert value(sent, "handoff_records_sent_total", namespace=name) == ns.sent
        assert value(sent, "handoff_records_acknowledged_total", namespace=name) == ns.acknowledged
        assert value(sent, "handoff_records_snapshotted_total", namespace=name) == 0
    assert report.namespaces["users"].sent == 500
    assert report.namespaces["users"].receiver_dropped == {
        "rejected by the namespace's validator": 1
    }
    assert (
        value(
            sent,
            "handoff_records_dropped_by_successor_total",
            namespace="users",
            reason="rejected by the namespace's validator",
        )
        == 1
    )
    assert not any(name == "handoff_records_dropped_total" for name in names(sent))
    assert value(sent, "handoff_drain_seconds_count", reason="drain") == 1
    assert value(sent, "handoff_drain_seconds_sum", reason="drain") == report.seconds
    assert value(sent, "handoff_draining") == 1
    assert value(sent, "handoff_handoffs_received_total") == 0

    # The receiver: one handoff, every record's outcome per namespace.
    last = new.last_received
    assert last is not None
    assert value(received, "handoff_handoffs_received_total") == 1
    assert value(received, "handoff_receive_seconds_count") == 1
    assert value(received, "handoff_receive_seconds_sum") > 0
    assert value(received, "handoff_records_received_total", namespace="users", outcome="applied")
    outcomes = {
        outcome: sum(
            value(received, "handoff_records_received_total", namespace=ns, outcome=outcome)
            for ns in ("users", "carts")
        )
        for outcome in ("applied", "kept", "dropped")
    }
    assert outcomes == {"applied": last.applied, "kept": last.kept, "dropped": 1}
    assert (last.applied, last.kept) == (528, 1)
    assert value(received, "handoff_records_received_total", namespace="carts", outcome="applied")
    assert value(received, "handoff_entries", namespace="users") == len(target) == 499
    assert value(received, "handoff_peers", state="draining") == 1
    assert value(received, "handoff_warm") == 1
    # The drain histogram of a node that did not drain is empty, not absent.
    assert "handoff_drain_seconds" in {f.name for f in text_string_to_metric_families(
        generate_latest(new_metrics).decode())}  # fmt: skip


async def test_records_with_nowhere_to_go_are_counted_as_dropped_or_snapshotted(
    tmp_path: Path,
) -> None:
    alone = node("alone", "127.0.0.2")
    alone.track("users", {f"u{i}": str(i) for i in range(12)})
    registry = register_prometheus(alone)
    async with alone:
        report = await alone.drain()
    found = scrape(registry)
    [(reason, count)] = report.namespaces["users"].dropped.items()
    assert count == 12
    assert value(found, "handoff_records_dropped_total", namespace="users", reason=reason) == 12
    assert value(found, "handoff_records_sent_total", namespace="users") == 0

    kept = node("kept", "127.0.0.2", snapshot_dir=tmp_path)
    kept.track("users", {f"u{i}": str(i) for i in range(7)})
    registry = register_prometheus(kept)
    async with kept:
        report = await kept.drain()
    assert report.snapshotted == 7
    assert value(scrape(registry), "handoff_records_snapshotted_total", namespace="users") == 7


async def test_the_asgi_app_serves_at_metrics_and_every_documented_metric_exists() -> None:
    n = node("solo", "127.0.0.2")
    n.track("users", {"a": "1"})
    app = Starlette()
    app.add_route("/metrics", prometheus_app(n))
    mounted = Starlette()
    mounted.mount("/metrics", prometheus_app(n, CollectorRegistry()))
    async with n:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            response = await client.get("/metrics")
        transport = httpx.ASGITransport(app=mounted)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            at_mount = await client.get("/metrics/")
    assert response.status_code == 200
    assert at_mount.status_code == 200
    assert "handoff_entries" in at_mount.text
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    # Every documented metric is exposed (counters without their _total suffix here).
    assert {f.name if f.type != "counter" else f.name + "_total" for f in families.values()} == (
        set(METRICS)
    )
    for name, (kind, labels, _) in METRICS.items():
        family = families[name.removesuffix("_total") if kind == "counter" else name]
        assert family.type == kind, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == set(labels), (name, sample)


def test_two_nodes_in_one_process_have_registries_of_their_own() -> None:
    first, second = node("a", "127.0.0.2"), node("b", "127.0.0.3")
    assert register_prometheus(first) is not register_prometheus(second)
    shared = CollectorRegistry()
    assert register_prometheus(first, shared) is shared
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        register_prometheus(second, shared)


def test_without_prometheus_client_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_prometheus(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("prometheus_client"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_prometheus)
    n = node("solo", "127.0.0.2")
    for use in (prometheus_app, register_prometheus, handoff.metrics.PrometheusCollector):
        with pytest.raises(MissingExtra, match=r"pip install 'warm-handoff\[prometheus\]'"):
            use(n)
    assert issubclass(MissingExtra, handoff.HandoffError)
    assert issubclass(MissingExtra, ImportError)
    assert not n._observers


def test_the_readme_table_lists_exactly_the_metrics() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Logs, metrics and tracing", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `(handoff_\w+)` \| (\w+) \| ([^|]+) \|", section, flags=re.MULTILINE)
    assert {name: (kind, labels.strip()) for name, kind, labels in rows} == {
        name: (kind, ", ".join(f"`{label}`" for label in labels) or "-")
        for name, (kind, labels, _) in METRICS.items()
    }


def test_the_library_imports_and_runs_without_either_extra() -> None:
    # A fresh interpreter where neither package can be imported (None in sys.modules).
    script = """
import sys
sys.modules["prometheus_client"] = None
sys.modules["opentelemetry"] = None
import handoff, handoff.metrics
node = handoff.Node("c", cookie=b"k" * 32, bind="127.0.0.2:0", discovery="none", environ={})
assert handoff.metrics.trace(node) is False
try:
    handoff.metrics.prometheus_app(node)
except handoff.metrics.MissingExtra as exc:
    print(exc)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == (
        "the Prometheus exporter needs prometheus_client: pip install 'warm-handoff[prometheus]'"
    )


def test_a_wsgi_app_serves_the_registry() -> None:
    from prometheus_client import make_wsgi_app

    n = node("solo", "127.0.0.2")
    n.track("users", {"a": "1", "b": "2"})
    app = make_wsgi_app(register_prometheus(n))
    statuses: list[str] = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "QUERY_STRING": ""}
    body = b"".join(app(environ, lambda status, headers: statuses.append(status)))
    assert statuses == ["200 OK"]
    assert value(samples(body.decode()), "handoff_entries", namespace="users") == 2
