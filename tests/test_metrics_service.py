"""The example shop's ``/metrics`` under uvicorn, scraped during and after a drain.

Two shops run as uvicorn subprocesses: the old release drains (``handoff drain`` through
its control socket, so it keeps serving HTTP) while its successor's process is stopped
(SIGSTOP), which holds the drain at its first offer; ``/metrics`` is scraped then, and
again once the successor runs on and the drain has ended. The values are checked against
the drain report the CLI prints and against the successor's own view.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from examples.service.local_deploy import ServiceProcess, joined
from handoff.cli import main
from handoff.testing import free_port
from tests.test_example_service import PROCESS_TIMEOUT, hosts, service_env

__all__ = ("hosts",)  # the fixture, imported to be used here

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(client: httpx.Client, service: ServiceProcess) -> Samples:
    response = client.get(service.url("/metrics"))
    response.raise_for_status()
    found: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def scrape_until_draining(client: httpx.Client, service: ServiceProcess) -> Samples:
    """Scrape until the node says it drains (bounded in time and count)."""
    deadline = time.monotonic() + PROCESS_TIMEOUT
    for _ in range(int(PROCESS_TIMEOUT / 0.05)):
        found = scrape(client, service)
        if value(found, "handoff_draining") == 1 or time.monotonic() > deadline:
            return found
        time.sleep(0.05)
    return found


@pytest.mark.slow
def test_metrics_of_the_shop_during_and_after_a_drain(
    hosts: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old_host, new_host = hosts
    old_node, new_node = free_port(old_host), free_port(new_host)
    socket = tmp_path / "old.sock"
    # Long heartbeats: the successor's process is stopped for a moment on purpose.
    common = {
        "HANDOFF_HEARTBEAT_TIMEOUT": "20",
        "HANDOFF_DRAIN_TIMEOUT": "20",
        "SHOP_BACKEND_DELAY": "0",
    }
    old_env = service_env(
        **common,
        HANDOFF_RELEASE="v1",
        HANDOFF_BIND=f"{old_host}:{old_node}",
        # Each finds the other: whichever listens last joins at its first probe (the
        # first one's probes back off while the other starts).
        HANDOFF_DISCOVERY=f"static:{new_host}:{new_node}",
        HANDOFF_WARMUP_TIMEOUT="0.2",
        HANDOFF_CONTROL_SOCKET=str(socket),
    )
    new_env = service_env(
        **common,
        HANDOFF_RELEASE="v2",
        HANDOFF_BIND=f"{new_host}:{new_node}",
        HANDOFF_DISCOVERY=f"static:{old_host}:{old_node}",
        HANDOFF_WARMUP_TIMEOUT="60",  # serves HTTP once the handoff arrived
    )
    products = range(1, 31)
    with (
        ServiceProcess(old_env, name="old", host=old_host, http_port=free_port(old_host)) as old,
        ServiceProcess(new_env, name="new", host=new_host, http_port=free_port(new_host)) as new,
        httpx.Client(timeout=PROCESS_TIMEOUT) as client,
    ):
        # Both at once (the successor dials until the old one listens): start-up is most
        # of this test's time.
        old.start()
        new.start()
        old.wait_serving(timeout=PROCESS_TIMEOUT)
        for product in products:
            client.get(old.url(f"/products/{product}")).raise_for_status()
        client.get(old.url("/search?q=lamp")).raise_for_status()
        old.wait_for(joined("new"), timeout=PROCESS_TIMEOUT)
        new.wait_for(joined("old"), timeout=PROCESS_TIMEOUT)
        serving = scrape(client, old)

        new.send_signal(signal.SIGSTOP)
        # `handoff drain --json`, in a thread of this process (a CLI process costs a
        # second of imports): the report goes to stdout.
        codes: list[int] = []
        command = ["drain", "--socket", str(socket), "--json"]
        drain = threading.Thread(target=lambda: codes.append(main(command)))
        try:
            drain.start()
            during = scrape_until_draining(client, old)
        finally:
            new.send_signal(signal.SIGCONT)
        drain.join(PROCESS_TIMEOUT)
        assert codes == [0]
        report = json.loads(capsys.readouterr().out)
        after = scrape(client, old)
        new.wait_serving(timeout=PROCESS_TIMEOUT)
        received = scrape(client, new)

    # Serving, before any drain: the peer, the entries, nothing moved.
    assert value(serving, "handoff_peers", state="serving") == 1
    assert value(serving, "handoff_entries", namespace="products") == len(products)
    assert value(serving, "handoff_entries", namespace="searches") == 1
    assert value(serving, "handoff_draining") == 0
    assert not [name for name, _ in serving if name.startswith("handoff_records_")]

    # During the drain (held at its first offer): draining, not yet finished, nothing sent.
    assert value(during, "handoff_draining") == 1
    assert "handoff_drain_seconds_count" not in {name for name, _ in during}
    assert sum(v for (name, _), v in during.items() if name == "handoff_records_sent_total") == 0
    assert value(during, "handoff_entries", namespace="products") == len(products)

    # After: the drain report's numbers, namespace by namespace.
    namespaces = report["namespaces"]
    assert namespaces["products"]["sent"] == len(products)
    for name, ns in namespaces.items():
        assert value(after, "handoff_records_sent_total", namespace=name) == ns["sent"]
        assert (
            value(after, "handoff_records_acknowledged_total", namespace=name)
            == (ns["acknowledged"])
        )
        assert value(after, "handoff_records_snapshotted_total", namespace=name) == 0
    assert report["ok"]
    assert not [name for name, _ in after if "dropped" in name]
    assert value(after, "handoff_drain_seconds_count", reason="drain") == 1
    assert value(after, "handoff_drain_seconds_sum", reason="drain") == pytest.approx(
        report["seconds"], abs=1e-6
    )
    assert value(after, "handoff_handoffs_received_total") == 0

    # The successor: one handoff received, every record sent applied there.
    assert value(received, "handoff_handoffs_received_total") == 1
    assert value(received, "handoff_receive_seconds_count") == 1
    for name, ns in namespaces.items():
        applied = value(
            received, "handoff_records_received_total", namespace=name, outcome="applied"
        )
        assert applied == ns["applied"] == ns["sent"]
    assert value(received, "handoff_entries", namespace="products") == len(products)
    assert value(received, "handoff_peers", state="draining") == 1
    assert value(received, "handoff_warm") == 1
