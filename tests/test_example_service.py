"""The example shop (examples/service): in process through httpx, and under uvicorn.

The in-process tests drive the FastAPI app through ``httpx.ASGITransport`` while its lifespan
(the node's around the shop's own) runs in a task, exactly as a server would run it: caches,
readiness, stats, and version hooks across a handoff from an older release and a rollback to
one. The last test is the issue's: the app under uvicorn in a subprocess, SIGTERM, and the
successor (another uvicorn subprocess) comes up warm.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from cachetools import LRUCache, TTLCache
from fastapi import FastAPI

from examples.service import ShopSettings, create_app
from examples.service.catalog import product_record
from examples.service.local_deploy import DeployOutcome, ServiceProcess, warm_deploy
from examples.service.shop import product_v1_to_v2, product_v2_to_v1
from handoff import Node, Peer
from handoff.testing import free_port
from tests._helpers import loopback_aliases_usable

ROOT = Path(__file__).resolve().parent.parent
COOKIE = "example-shop-cookie-0123456789abcdef"
HOSTS = ("127.0.0.2", "127.0.0.3")
STEP = 10.0  # bound of every single wait in the in-process tests
PROCESS_TIMEOUT = 30.0  # bound of every single wait on a subprocess


def _environ(**extra: str) -> dict[str, str]:
    """A node environment on loopback that nothing from the machine leaks into."""
    return {
        "HANDOFF_CLUSTER": "shop",
        "HANDOFF_COOKIE": COOKIE,
        "HANDOFF_RELEASE": "v2",
        "HANDOFF_NODE_NAME": "shop-a",
        "HANDOFF_BIND": "127.0.0.1:0",
        "HANDOFF_DISCOVERY": "none",
        "HANDOFF_POLL_INTERVAL": "0.1",
        "HANDOFF_WARMUP_TIMEOUT": "0.01",  # nobody to wait for
        "HANDOFF_DRAIN_TIMEOUT": "5",
        "HANDOFF_CONTROL_SOCKET": "none",
        "SHOP_BACKEND_DELAY": "0",
        **extra,
    }


@dataclass
class Lifespan:
    """A running lifespan: ``started`` is set once its startup completed."""

    started: anyio.Event
    stop: anyio.Event


@asynccontextmanager
async def lifespan_running(app: FastAPI) -> AsyncIterator[Lifespan]:
    """Run ``app``'s lifespan in a task (one task enters and exits it, as servers do)."""
    state = Lifespan(anyio.Event(), anyio.Event())

    async def run() -> None:
        async with app.router.lifespan_context(app):
            state.started.set()
            await state.stop.wait()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(run)
        try:
            yield state
        finally:
            state.stop.set()


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shop")


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan started, and a client for it."""
    async with lifespan_running(app) as lifespan, _client(app) as client:
        with anyio.fail_after(STEP):
            await lifespan.started.wait()
        yield client


async def _json(client: httpx.AsyncClient, path: str, status: int = 200) -> dict[str, Any]:
    response = await client.get(path)
    assert response.status_code == status, (path, response.status_code, response.text)
    body: dict[str, Any] = response.json()
    return body


def _joined(node: Node) -> anyio.Event:
    event = anyio.Event()

    def up(peer: Peer) -> None:
        event.set()

    node.on_node_up(up)
    return event


# -- in process ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_product_comes_from_the_backend_once_then_from_the_cache() -> None:
    app = create_app(_environ())
    async with serving(app) as client:
        first = await _json(client, "/products/7")
        second = await _json(client, "/products/7")
        stats = await _json(client, "/stats")
    assert first == {"product": product_record(7), "source": "backend", "views": 1}
    assert second == {"product": product_record(7), "source": "cache", "views": 2}
    assert (stats["hits"], stats["misses"], stats["backend_calls"]) == (1, 1, 1)
    assert stats["sizes"] == {"products": 1, "searches": 0, "views": 1}


@pytest.mark.anyio
async def test_unknown_and_invalid_products() -> None:
    app = create_app(_environ(SHOP_CATALOG_SIZE="10"))
    async with serving(app) as client:
        for _ in range(2):  # a miss is not cached: each costs a backend call
            assert (await _json(client, "/products/11", 404))["detail"] == "no product 11"
        await _json(client, "/products/0", 422)
        await _json(client, "/products/abc", 422)
        stats = await _json(client, "/stats")
    assert stats["backend_calls"] == 2
    assert stats["sizes"] == {"products": 0, "searches": 0, "views": 0}


@pytest.mark.anyio
async def test_searches_are_cached_by_their_normalised_query() -> None:
    app = create_app(_environ(SHOP_CATALOG_SIZE="200"))
    async with serving(app) as client:
        first = await _json(client, "/search?q=Teapot")
        second = await _json(client, "/search?q=teapot%20")
        await _json(client, "/search?q=", 422)
        stats = await _json(client, "/stats")
    assert first["source"] == "backend"
    assert second["source"] == "cache"
    assert first["ids"] == second["ids"]
    assert first["ids"], "the catalog has teapots"
    assert all("teapot" in product_record(i)["name"] for i in first["ids"])
    assert stats["backend_calls"] == 1
    assert stats["sizes"]["searches"] == 1


@pytest.mark.anyio
async def test_health_readiness_and_stats_describe_the_node() -> None:
    app = create_app(_environ())
    async with serving(app) as client:
        health = await _json(client, "/healthz")
        ready = await _json(client, "/readyz")
        node = (await _json(client, "/stats"))["node"]
    assert health == {"status": "ok"}
    assert ready["ready"] is True
    assert ready["node"] == "shop-a"
    assert ready["reason"].startswith("warm-up timeout")
    assert node["name"] == "shop-a"
    assert node["release"] == "v2"
    assert node["cluster"] == "shop"
    assert node["state"] == "serving"
    assert node["warm"] is True
    assert node["peers"] == []
    assert node["last_drain"] is None


@pytest.mark.anyio
async def test_the_shop_drains_after_its_own_shutdown_and_reports() -> None:
    app = create_app(_environ())
    async with serving(app) as client:
        await _json(client, "/products/1")
    node: Node = app.state.node
    report = node.last_drain_report
    assert report is not None
    products = report.namespaces["products"]
    # Alone: nobody to take the entry and no snapshot directory, so it is dropped, with why.
    assert products.records == 1
    assert sum(products.dropped.values()) == 1
    assert not app.state.shop.catalog.connected, "the shop's own lifespan has ended"


def test_settings_come_from_shop_variables() -> None:
    settings = ShopSettings.from_env(
        {
            "SHOP_BACKEND_DELAY": "0.5",
            "SHOP_CACHE_SIZE": "7",
            "SHOP_CACHE_TTL": "60",
            "SHOP_SEARCH_CACHE_SIZE": " 3 ",
            "SHOP_CATALOG_SIZE": "",  # blank: the default
        }
    )
    assert settings == ShopSettings(
        backend_delay=0.5, cache_size=7, cache_ttl=60.0, search_cache_size=3, catalog_size=1000
    )
    for name, value in [
        ("SHOP_CACHE_SIZE", "many"),
        ("SHOP_CACHE_SIZE", "1.5"),
        ("SHOP_BACKEND_DELAY", "-1"),
        ("SHOP_CACHE_TTL", "nan"),
        ("SHOP_CACHE_SIZE", "0"),
    ]:
        with pytest.raises(ValueError, match=name):
            ShopSettings.from_env({name: value})


def test_product_hooks_convert_between_versions_and_back() -> None:
    record = product_record(42)
    key, old = product_v2_to_v1(42, record)
    assert key == 42
    assert old == {"id": 42, "name": record["name"], "price": record["price_cents"] / 100}
    assert product_v1_to_v2(key, old) == (42, record)


def _old_release_node(name: str, products: TTLCache[int, dict[str, Any]]) -> Node:
    """A node of the previous release: its products cache holds schema version 1."""
    node = Node(
        "shop",
        cookie=COOKIE,
        name=name,
        release="v1",
        bind="127.0.0.1:0",
        discovery="none",
        poll_interval=0.1,
        environ={},
        control_socket="none",
    )
    node.track("products", products, version=1)
    return node


@pytest.mark.anyio
async def test_a_previous_release_hands_off_to_the_shop_and_records_are_upgraded() -> None:
    old_products: TTLCache[int, dict[str, Any]] = TTLCache(maxsize=100, ttl=300)
    for product_id in (1, 2, 3):
        _, old_products[product_id] = product_v2_to_v1(product_id, product_record(product_id))
    old = _old_release_node("v1-node", old_products)
    old_joined = _joined(old)
    async with old:
        app = create_app(
            _environ(HANDOFF_DISCOVERY=f"static:{old.address}", HANDOFF_WARMUP_TIMEOUT="60")
        )
        new_joined = _joined(app.state.node)
        async with lifespan_running(app) as lifespan, _client(app) as client:
            with anyio.fail_after(STEP):
                await old_joined.wait()
                await new_joined.wait()
            # Not warm yet: the lifespan startup waits, and readiness says so.
            cold = await _json(client, "/readyz", 503)
            assert cold["ready"] is False
            assert not lifespan.started.is_set()
            report = await old.drain()
            with anyio.fail_after(STEP):
                await lifespan.started.wait()
            ready = await _json(client, "/readyz")
            product = await _json(client, "/products/2")
            stats = await _json(client, "/stats")
    assert report.namespaces["products"].acknowledged == 3
    assert ready["reason"] == "received a handoff from v1-node"
    assert product == {"product": product_record(2), "source": "cache", "views": 1}
    assert stats["backend_calls"] == 0
    assert stats["sizes"]["products"] == 3


@pytest.mark.anyio
async def test_a_rollback_hands_the_shop_off_to_the_previous_release_downgraded() -> None:
    old_products: TTLCache[int, dict[str, Any]] = TTLCache(maxsize=100, ttl=300)
    previous = _old_release_node("v1-node", old_products)
    previous.track("searches", LRUCache(maxsize=10))
    previous_joined = _joined(previous)
    async with previous:
        app = create_app(_environ(HANDOFF_DISCOVERY=f"static:{previous.address}"))
        async with serving(app) as client:
            for product_id in (4, 5):
                await _json(client, f"/products/{product_id}")
            await _json(client, "/search?q=lamp")
            with anyio.fail_after(STEP):
                await previous_joined.wait()
        # Leaving the lifespan drained the shop into the only peer, the older release.
        node: Node = app.state.node
        report = node.last_drain_report
        assert report is not None
        assert report.namespaces["products"].acknowledged == 2
        assert report.namespaces["searches"].acknowledged == 1
        # The previous release does not track view counts: refused, reported as dropped.
        assert report.namespaces["views"].acknowledged == 0
        assert sum(report.namespaces["views"].dropped.values()) == 2
        assert dict(old_products.items()) == {
            product_id: product_v2_to_v1(product_id, product_record(product_id))[1]
            for product_id in (4, 5)
        }


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({}, "HANDOFF_COOKIE"),  # no cookie
        ({"HANDOFF_COOKIE": COOKIE, "SHOP_LOG_LEVEL": "loud"}, "SHOP_LOG_LEVEL"),
    ],
)
def test_python_dash_m_reports_a_configuration_error(extra: dict[str, str], named: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "HANDOFF_CLUSTER": "shop", **extra}
    done = subprocess.run(
        [sys.executable, "-m", "examples.service", "--port", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "configuration error" in done.stderr
    assert named in done.stderr


# -- under uvicorn ---------------------------------------------------------------------------


@pytest.fixture
def hosts() -> tuple[str, str]:
    if not loopback_aliases_usable(HOSTS):
        pytest.skip(f"cannot bind {', '.join(HOSTS)} (on macOS: ifconfig lo0 alias 127.0.0.2)")
    return HOSTS


def service_env(**extra: str) -> dict[str, str]:
    """Environment of a shop under uvicorn (tests in test_containers.py use it too)."""
    return {
        "HANDOFF_CLUSTER": "shop",
        "HANDOFF_COOKIE": COOKIE,
        "HANDOFF_POLL_INTERVAL": "0.2",
        "HANDOFF_DRAIN_TIMEOUT": "10",
        "HANDOFF_CONTROL_SOCKET": "none",
        "SHOP_BACKEND_DELAY": "0.01",
        **extra,
    }


def check_warm_successor(outcome: DeployOutcome, *, old: str = "old", new: str = "new") -> None:
    """Assert what a warm deploy must show (shared with test_containers.py)."""
    products, searches = outcome.products, outcome.searches
    print("timings:", ", ".join(f"{k} {v:.2f} s" for k, v in outcome.timings.items()))
    print("drain report:", outcome.drain_report)
    # uvicorn re-raises the signal after a graceful shutdown.
    assert outcome.old_exit in (0, -signal.SIGTERM, 128 + signal.SIGTERM), outcome.old_exit
    assert outcome.old_stats["sizes"]["products"] == len(products)
    assert outcome.old_stats["backend_calls"] == len(products) + len(searches)
    held = re.search(
        rf"products: {len(products)} held, {len(products)} acknowledged by {re.escape(new)}, "
        r"0 snapshotted",
        outcome.drain_report,
    )
    assert held, outcome.drain_report

    before: Mapping[str, Any] = outcome.new_stats_before
    assert before["node"]["warm_reason"] == f"received a handoff from {old}", before["node"]
    assert before["backend_calls"] == 0
    assert before["sizes"] == {
        "products": len(products),
        "searches": len(searches),
        "views": len(products),
    }
    assert set(outcome.product_sources.values()) == {"cache"}, outcome.product_sources
    assert set(outcome.search_sources.values()) <= {"cache"}, outcome.search_sources
    after: Mapping[str, Any] = outcome.new_stats_after
    assert after["backend_calls"] == 0, "every product and search was warm"
    assert after["hits"] == len(products) + len(searches)
    assert after["misses"] == 0


@pytest.mark.slow
def test_lifespan_under_uvicorn_sigterm_the_successor_is_warm(hosts: tuple[str, str]) -> None:
    old_host, new_host = hosts
    old_node = free_port(old_host)
    old_env = service_env(
        HANDOFF_RELEASE="v1",
        HANDOFF_BIND=f"{old_host}:{old_node}",
        HANDOFF_DISCOVERY="none",
        HANDOFF_WARMUP_TIMEOUT="0.2",  # the first release: nobody to wait for
    )
    new_env = service_env(
        HANDOFF_RELEASE="v2",
        HANDOFF_BIND=f"{new_host}:{free_port(new_host)}",
        HANDOFF_DISCOVERY=f"static:{old_host}:{old_node}",
        HANDOFF_WARMUP_TIMEOUT="60",  # warm because of the handoff, not the timeout
    )
    with (
        ServiceProcess(old_env, name="old", host=old_host, http_port=free_port(old_host)) as old,
        ServiceProcess(new_env, name="new", host=new_host, http_port=free_port(new_host)) as new,
    ):
        outcome = warm_deploy(
            old,
            new,
            products=range(1, 41),
            searches=["lamp", "clock"],
            timeout=PROCESS_TIMEOUT,
        )
        lines = old.output.lines
    check_warm_successor(outcome)
    # The order of the old process' shutdown: uvicorn stopped serving, the shop's own
    # lifespan ended, then the node drained (inside uvicorn's lifespan shutdown).
    shutdown = next(i for i, line in enumerate(lines) if "Shutting down" in line)
    shop_done = next(i for i, line in enumerate(lines) if "stopped serving" in line)
    drained = next(i for i, line in enumerate(lines) if "drain of old" in line)
    complete = next(i for i, line in enumerate(lines) if "Application shutdown complete" in line)
    assert shutdown < shop_done < drained < complete, "\n".join(lines)
