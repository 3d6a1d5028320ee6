"""The rate-limit example (examples/ratelimit) through a blue-green deploy, in process.

Two instances of the app, v1 and v2, each with its lifespan running in a task as a server
would run it, driven through ``httpx.ASGITransport``. The client spends 4 of its 5 requests
on v1; v2 starts and finds v1; v1 shuts down (its lifespan drains it into v2); the client
then gets exactly one more 200 from v2, and 429 after that.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import httpx
import pytest
from fastapi import FastAPI

from examples.ratelimit import create_app
from handoff import Node, Peer

pytestmark = pytest.mark.anyio

COOKIE = "example-ratelimit-cookie-0123456789abcdef"
STEP = 10.0  # bound of every single wait
ALICE = {"X-Api-Key": "alice"}


def _environ(name: str, release: str, host: str, **extra: str) -> dict[str, str]:
    """A node environment on loopback that nothing from the machine leaks into."""
    return {
        "HANDOFF_CLUSTER": "ratelimit",
        "HANDOFF_COOKIE": COOKIE,
        "HANDOFF_RELEASE": release,
        "HANDOFF_NODE_NAME": name,
        "HANDOFF_BIND": f"{host}:0",
        "HANDOFF_DISCOVERY": "none",
        "HANDOFF_POLL_INTERVAL": "0.1",
        "HANDOFF_WARMUP_TIMEOUT": "0.01",
        "HANDOFF_DRAIN_TIMEOUT": "5",
        "HANDOFF_CONTROL_SOCKET": "none",
        **extra,
    }


@dataclass
class Running:
    """An app whose lifespan runs in a task: ``started`` once up, set ``stop`` to end it."""

    app: FastAPI
    started: anyio.Event
    stop: anyio.Event
    stopped: anyio.Event

    @property
    def node(self) -> Node:
        node: Node = self.app.state.node
        return node

    def client(self) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app)
        return httpx.AsyncClient(transport=transport, base_url="http://ratelimit")


@asynccontextmanager
async def deployment() -> AsyncIterator[anyio.abc.TaskGroup]:
    async with anyio.create_task_group() as tasks:
        yield tasks
        tasks.cancel_scope.cancel()


def launch(tasks: anyio.abc.TaskGroup, app: FastAPI) -> Running:
    """Start ``app``'s lifespan in a task of ``tasks`` (one task enters and exits it)."""
    running = Running(app, anyio.Event(), anyio.Event(), anyio.Event())

    async def run() -> None:
        try:
            async with app.router.lifespan_context(app):
                running.started.set()
                await running.stop.wait()
        finally:
            running.stopped.set()

    tasks.start_soon(run)
    return running


async def statuses(running: Running, n: int) -> list[int]:
    async with running.client() as client:
        return [(await client.get("/hello", headers=ALICE)).status_code for _ in range(n)]


def joined(node: Node) -> anyio.Event:
    event = anyio.Event()

    def up(peer: Peer) -> None:
        event.set()

    node.on_node_up(up)
    return event


@pytest.mark.parametrize("strategy", ["fixed-window", "moving-window"])
async def test_the_limit_holds_across_a_blue_green_deploy(strategy: str) -> None:
    async with deployment() as tasks:
        v1 = launch(
            tasks, create_app(_environ("v1", "v1", "127.0.0.2", RATELIMIT_STRATEGY=strategy))
        )
        with anyio.fail_after(STEP):
            await v1.started.wait()
        assert await statuses(v1, 4) == [200] * 4

        # Blue-green: v2 starts beside v1, finds it, and waits for its state.
        v2_app = create_app(
            _environ(
                "v2",
                "v2",
                "127.0.0.3",
                RATELIMIT_STRATEGY=strategy,
                HANDOFF_DISCOVERY=f"static:{v1.node.address}",
                HANDOFF_WARMUP_TIMEOUT="60",
            )
        )
        v2_joined = joined(v2_app.state.node)
        v2 = launch(tasks, v2_app)
        with anyio.fail_after(STEP):
            await v2_joined.wait()
        assert not v2.started.is_set(), "v2 waits for warm-up before it serves"

        # v1 shuts down: its lifespan drains it into v2.
        v1.stop.set()
        with anyio.fail_after(STEP):
            await v1.stopped.wait()
            await v2.started.wait()
        assert await statuses(v2, 3) == [200, 429, 429]
        async with v2.client() as client:
            other = await client.get("/hello", headers={"X-Api-Key": "bob"})
            stats = (await client.get("/stats")).json()
        assert other.status_code == 200, "another client's limit is its own"
        assert stats["warm_reason"] == "received a handoff from v1"

        report = v1.node.last_drain_report
        assert report is not None
        windows = report.namespaces["ratelimits"]
        assert (windows.records, windows.acknowledged, windows.applied) == (1, 1, 1)
        assert windows.successors == ["v2"]
        assert report.ok
        v2.stop.set()
