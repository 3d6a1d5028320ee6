"""How Python services start and stop a node: ASGI lifespan, a thread for sync apps.

- ``FastAPI(lifespan=node.lifespan)`` (Starlette alike): on startup the node restores a
  waiting snapshot, starts, joins and waits for warm-up (at most ``warmup_timeout``); on
  shutdown it drains, then says goodbye. uvicorn runs lifespan shutdown only after open
  connections have finished, so the drain sees the final state of the caches.
- ``node.lifespan_with(app_lifespan)`` runs the app's own lifespan inside the node's: the
  node is warm before the app's startup code runs and drains after its shutdown code.
- ``node.start_in_thread()`` / ``node.stop()`` for threaded apps (Flask, Django, scripts):
  the node runs its own event loop in a daemon thread. Handoffs apply records on that
  thread while the app's threads use the same objects, so guard every access to a tracked
  object with ``node.lock`` (the node holds it while it exports or applies a chunk):
  ``@cached(users, lock=node.lock)`` with cachetools' decorators, or ``with node.lock:``.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Generator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.from_thread

from handoff._errors import HandoffError, LocalProtocolError

if TYPE_CHECKING:
    from handoff.node import Node

__all__ = ("Done", "ThreadRunner", "lifespan", "lifespan_with")

_App = TypeVar("_App")
Lifespan = Callable[[_App], AbstractAsyncContextManager[Any]]


class Done:
    """An already-finished awaitable: lets ``node.stop()`` serve sync and async callers.

    Not a coroutine, so a sync caller that never awaits it gets no "never awaited" warning.
    """

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # pragma: no cover - makes this a generator


def lifespan(node: Node, app: object) -> AbstractAsyncContextManager[None]:
    """The ASGI lifespan of ``node``: ``FastAPI(lifespan=node.lifespan)``."""

    @asynccontextmanager
    async def run() -> AsyncIterator[None]:
        async with node:
            await node.wait_warm()  # bounded by warmup_timeout
            yield

    return run()


def lifespan_with(node: Node, inner: Lifespan[_App]) -> Lifespan[_App]:
    """Compose: the node's lifespan around the app's own (whose state is passed on)."""

    def composed(app: _App) -> AbstractAsyncContextManager[Any]:
        @asynccontextmanager
        async def run() -> AsyncIterator[Any]:
            async with node:
                await node.wait_warm()
                async with inner(app) as state:
                    yield state

        return run()

    return composed


class ThreadRunner:
    """Runs a node in a background thread with its own event loop."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._portal_cm: Any = None
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._stop: anyio.Event | None = None
        self._future: Any = None

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._portal is not None

    def start(self, *, wait_warm: bool, timeout: float) -> None:
        """Start the node in its thread; return once it listens (and is warm, if asked)."""
        if self._portal is not None:
            raise LocalProtocolError("this node already runs in a thread")
        self._portal_cm = anyio.from_thread.start_blocking_portal(backend="asyncio")
        self._portal = portal = self._portal_cm.__enter__()
        self._stop = portal.call(anyio.Event)
        self._future = portal.start_task_soon(self._main)
        if not self._started.wait(timeout):
            self.stop()
            raise HandoffError(f"the node did not start within {timeout:g} s")
        if self._error is not None:
            error, self._error = self._error, None
            self._close_portal()
            raise error
        if wait_warm:
            portal.call(self._node.wait_warm)

    async def _main(self) -> None:
        assert self._stop is not None
        try:
            # One task owns the node from start to stop, as anyio's task groups require.
            async with self._node:
                self._started.set()
                await self._stop.wait()
        except BaseException as exc:
            if not self._started.is_set():
                self._error = exc
                self._started.set()
                return
            raise

    def stop(self) -> None:
        """Drain and stop the node, then end its thread. Idempotent."""
        portal = self._portal
        if portal is None:
            return
        if self._stop is not None:
            with suppress(RuntimeError):  # the portal is already gone
                portal.call(self._stop.set)
        if self._future is not None:
            try:
                self._future.result()
            except BaseException:
                self._close_portal()
                raise
        self._close_portal()

    def _close_portal(self) -> None:
        cm, self._portal_cm, self._portal = self._portal_cm, None, None
        if cm is not None:
            cm.__exit__(None, None, None)
