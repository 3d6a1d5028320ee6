"""Hooks for services: ASGI lifespan (plain and composed), a thread for sync apps, readiness."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from handoff import BindError, LocalProtocolError, Node

COOKIE = "test-cookie-0123456789abcdef"
FAST: dict[str, Any] = {
    "cookie": COOKIE,
    "environ": {},
    "poll_interval": 0.05,
    "heartbeat_timeout": 2.0,
    "warmup_timeout": 5.0,
}


def node(name: str, host: str, *, discovery: str = "none", **kwargs: Any) -> Node:
    return Node("shop", name=name, bind=f"{host}:0", discovery=discovery, **{**FAST, **kwargs})


def wait_for(predicate: Any, limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)


def test_threaded_nodes_hand_off_on_stop() -> None:
    source = {f"k{i}": i for i in range(2000)}
    received: dict[str, int] = {}
    new = node("new", "127.0.0.3")
    new.track("n", received)
    new.start_in_thread(wait_warm=False)
    try:
        old = node("old", "127.0.0.2", discovery=f"static:{new.address}")
        old.track("n", source)
        old.start_in_thread(wait_warm=False)
        wait_for(lambda: bool(old.peers()) and bool(new.peers()))
        result = old.stop()  # sync: drains, then stops, then returns
        assert not old.running
        assert old.last_drain_report is not None
        assert old.last_drain_report.namespaces["n"].acknowledged == 2000
        assert isinstance(result, object)
        with new.lock:  # the documented way for threads to read a tracked object
            assert received == source
        assert new.is_warm
    finally:
        new.stop()
    assert not new.running


def test_thread_start_errors_surface_in_the_caller() -> None:
    first = node("first", "127.0.0.2")
    first.start_in_thread()
    try:
        # An address of no interface here: a configuration error, raised in the caller.
        wrong = Node("shop", name="wrong", bind="192.0.2.1:4370", **FAST)
        with pytest.raises(BindError, match="no interface"):
            wrong.start_in_thread()
        with pytest.raises(LocalProtocolError, match="already started"):
            first.start_in_thread()
        # Every port of the range in use is a condition of the machine: the app serves on
        # without a node (several workers, too few ports), and says so.
        clash = Node("shop", name="clash", bind=f"127.0.0.2:{first.port}", port_range=1, **FAST)
        clash.start_in_thread()
        assert not clash.running
        assert "already in use" in clash.join_error
        assert clash.is_warm
        assert clash.warm_reason.startswith("not joined: ")
        clash.stop()  # nothing to stop
    finally:
        first.stop()
    first.stop()  # idempotent


def test_thread_lock_is_held_while_chunks_apply() -> None:
    received: dict[int, int] = {}
    new = node("new", "127.0.0.3")
    new.track("n", received)
    new.start_in_thread(wait_warm=False)
    holding = threading.Event()
    release = threading.Event()

    def hold_the_lock() -> None:
        with new.lock:
            holding.set()
            release.wait(5)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    holding.wait(5)
    try:
        old = node("old", "127.0.0.2", discovery=f"static:{new.address}")
        old.track("n", {i: i for i in range(100)})
        old.start_in_thread(wait_warm=False)
        wait_for(lambda: bool(old.peers()))
        stopper = threading.Thread(target=old.stop)
        stopper.start()
        time.sleep(0.3)  # a window for a chunk to arrive: none may apply under the lock
        assert received == {}  # nothing applied while the app holds the lock
        release.set()
        stopper.join(10)
        assert len(received) == 100
    finally:
        release.set()
        holder.join(5)
        new.stop()


@pytest.mark.anyio
async def test_lifespan_starts_warm_and_drains_on_shutdown() -> None:
    received: dict[str, int] = {}
    new = node("new", "127.0.0.3")
    new.track("n", received)
    async with new:
        old = node("old", "127.0.0.2", discovery=f"static:{new.address}", warmup_timeout=0.1)
        old.track("n", {"a": 1})
        async with old.lifespan(app=None):
            assert old.running
            assert old.is_warm  # waited for warm-up (here: its short timeout)
            status, body = old.readiness()
            assert status == 200
            assert body["ready"] is True
            with anyio.fail_after(5):
                while not old.peers():  # noqa: ASYNC110 - bounded, across two nodes
                    await anyio.sleep(0.01)
        assert not old.running
        assert received == {"a": 1}


@pytest.mark.anyio
async def test_lifespan_with_runs_the_apps_lifespan_inside_the_nodes() -> None:
    order: list[str] = []
    service = node("svc", "127.0.0.2")

    @asynccontextmanager
    async def app_lifespan(app: object) -> AsyncIterator[dict[str, str]]:
        order.append(f"app startup, node warm={service.is_warm}")
        yield {"db": "connected"}
        order.append(f"app shutdown, node drained={service.last_drain_report is not None}")

    async with service.lifespan_with(app_lifespan)(object()) as state:
        assert state == {"db": "connected"}
        order.append("serving")
    assert order == [
        "app startup, node warm=True",
        "serving",
        "app shutdown, node drained=False",
    ]
    assert service.last_drain_report is not None  # drained after the app's shutdown


@pytest.mark.anyio
async def test_readiness_is_503_until_warm() -> None:
    cold = node("cold", "127.0.0.2", warmup_timeout=30)
    cold.track("n", {})
    async with cold:
        status, body = cold.readiness()
        assert status == 503
        assert body["ready"] is False
        assert body["reason"] == "warming up"
