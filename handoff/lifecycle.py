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

A threaded app that never calls ``node.stop()`` still drains (:func:`drain_unstopped`):

- on SIGTERM and SIGINT, when the node was started from the main thread and the app left
  the signal to Python (``SIG_DFL``; for SIGINT also Python's KeyboardInterrupt handler).
  The handler starts the drain in a thread (the interrupted main thread may hold
  ``node.lock``, which the drain needs) while the app goes on serving; then the signal
  takes its course: SIGTERM kills the process, SIGINT raises KeyboardInterrupt in the main
  thread, as without the node. Signals during the drain are logged; the drain goes on to
  its deadline. Draining before the app unwinds keeps the drain in a whole interpreter (at
  exit CPython 3.12 refuses new threads, which a snapshot write needs). Handlers of the
  app's own (gunicorn's workers, werkzeug's reloader) are left alone: the app decides when
  it stops, then exits (below) or calls ``node.stop()``. From another thread, where Python
  cannot handle signals, the node warns about the signals that would end it undrained.
- at interpreter exit, from an ``atexit`` hook: plain ``atexit``, not threading's earlier
  hook, so it runs once the app's non-daemon threads have ended (an app whose main thread
  returns while its server threads go on is not exiting yet); the node's daemon thread
  still runs its loop then (checked on CPython 3.11, 3.12 and 3.13).

A forked child (gunicorn ``--preload``) inherits the node but not its thread: there
``node.stop()`` and the exit hook only warn, instead of waiting forever for that thread.
With ``--preload``, build the node at import but start it in each worker (the lifespan,
or gunicorn's ``post_worker_init``): it then takes that worker's name, incarnation and port.

Several workers per machine each run a node (see ``HANDOFF_PORT_RANGE``). A worker whose
node finds every port of its range in use (:class:`~handoff.PortsInUse`) is a condition of
the machine, not a configuration error: the lifespan and the thread runner log it as an
error, set ``node.join_error`` and let the app serve on without a node.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator
from concurrent.futures import Future, wait
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.from_thread

from handoff._errors import HandoffError, LocalProtocolError, PortsInUse

if TYPE_CHECKING:
    from handoff.node import Node

__all__ = ("Done", "ThreadRunner", "drain_unstopped", "lifespan", "lifespan_with")

logger = logging.getLogger("handoff.lifecycle")

_App = TypeVar("_App")
Lifespan = Callable[[_App], AbstractAsyncContextManager[Any]]


class Done:
    """An already-finished awaitable: lets ``node.stop()`` serve sync and async callers.

    Not a coroutine, so a sync caller that never awaits it gets no "never awaited" warning.
    """

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # pragma: no cover - makes this a generator


@asynccontextmanager
async def _joined(node: Node) -> AsyncIterator[bool]:
    """``async with node`` for servers: yields whether the node runs. Every port of its
    range in use (:class:`PortsInUse`: more workers on this machine than ports) is a
    condition of the machine, not of the configuration: the app serves without a node
    (logged as an error, :attr:`Node.join_error`) instead of the server stopping. Any other
    start error (a missing cookie, a wrong bind address) still stops it."""
    try:
        await node.start()
    except PortsInUse as exc:
        node._serve_without(exc)
        yield False
        return
    try:
        yield True
    except BaseException as exc:
        await node.__aexit__(type(exc), exc, exc.__traceback__)
        raise
    await node.__aexit__(None, None, None)


def lifespan(node: Node, app: object) -> AbstractAsyncContextManager[None]:
    """The ASGI lifespan of ``node``: ``FastAPI(lifespan=node.lifespan)``."""

    @asynccontextmanager
    async def run() -> AsyncIterator[None]:
        async with _joined(node):
            await node.wait_warm()  # bounded by warmup_timeout
            yield

    return run()


def lifespan_with(node: Node, inner: Lifespan[_App]) -> Lifespan[_App]:
    """Compose: the node's lifespan around the app's own (whose state is passed on)."""

    def composed(app: _App) -> AbstractAsyncContextManager[Any]:
        @asynccontextmanager
        async def run() -> AsyncIterator[Any]:
            async with _joined(node):
                await node.wait_warm()
                async with inner(app) as state:
                    yield state

        return run()

    return composed


#: How long an automatic drain may take beyond ``drain_timeout``: the drain keeps its own
#: deadline; this only bounds the goodbyes after it and guards against a bug there.
_STOP_SLACK = 10.0


class ThreadRunner:
    """Runs a node in a background thread with its own event loop."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self.pid = os.getpid()
        """The process that started the node (a fork's copy of the runner cannot stop it)."""
        self._started = threading.Event()
        self._stopping = threading.Lock()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._stop: anyio.Event | None = None
        self._future: Future[None] | None = None

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._portal is not None

    @property
    def node(self) -> Node:
        """The node this runner runs."""
        return self._node

    def start(self, *, wait_warm: bool, timeout: float) -> None:
        """Start the node in its thread; return once it listens (and is warm, if asked)."""
        if self._portal is not None:
            raise LocalProtocolError("this node already runs in a thread")
        ready: Future[anyio.from_thread.BlockingPortal] = Future()
        self._thread = threading.Thread(
            target=self._run_loop, args=(ready,), name=f"handoff {self._node.name}", daemon=True
        )
        self._thread.start()
        self._portal = portal = ready.result()
        self._stop = portal.call(anyio.Event)
        self._future = portal.start_task_soon(self._main)
        if not self._started.wait(timeout):
            self.stop()
            raise HandoffError(f"the node did not start within {timeout:g} s")
        if self._error is not None:
            error, self._error = self._error, None
            self._close_portal()
            if isinstance(error, PortsInUse):
                # The app serves on without a node (see _joined); stop() has nothing to do.
                self._node._serve_without(error)
                return
            raise error
        # From here on the node runs: whatever ends this process must drain it first.
        _unstopped.add(self)
        if wait_warm:
            portal.call(self._node.wait_warm)

    @staticmethod
    def _run_loop(ready: Future[anyio.from_thread.BlockingPortal]) -> None:
        # anyio's start_blocking_portal() would do, but its context manager stops the portal
        # when it is finalized: in a forked child (no loop thread there) that waits forever.
        async def serve() -> None:
            async with anyio.from_thread.BlockingPortal() as portal:
                ready.set_result(portal)
                await portal.sleep_until_stopped()

        try:
            anyio.run(serve, backend="asyncio")
        except BaseException as exc:
            if ready.done():
                raise
            ready.set_exception(exc)

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

    def request_stop(self) -> None:
        """Tell the node's task to drain and stop, without waiting for it."""
        portal, stop = self._portal, self._stop
        if portal is None or stop is None or os.getpid() != self.pid:
            return
        with suppress(RuntimeError):  # the portal is already gone
            portal.call(stop.set)

    def stop(self, *, timeout: float | None = None) -> bool:
        """Drain and stop the node, then end its thread. Idempotent and thread-safe.

        A caller that comes while another one stops the node (the app's ``node.stop()``
        during an automatic drain) waits for that stop to finish. Returns false if
        ``timeout`` passed first; the node's thread is then left running (it is a daemon).
        """
        if os.getpid() != self.pid:
            self._forget_in_fork()
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._stopping.acquire(timeout=-1 if timeout is None else timeout):
            return False
        try:
            if self._portal is None:
                return True
            self.request_stop()
            future = self._future
            if future is not None:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not wait([future], left).done:
                    return False
                try:
                    future.result()
                except BaseException:
                    self._close_portal()
                    raise
            self._close_portal()
            return True
        finally:
            self._stopping.release()

    def _close_portal(self) -> None:
        portal, self._portal = self._portal, None
        thread, self._thread = self._thread, None
        try:
            if portal is not None:
                with suppress(RuntimeError):  # the portal is already gone
                    portal.call(portal.stop)
            if thread is not None:
                thread.join()
        finally:
            _unstopped.discard(self)

    def _forget_in_fork(self) -> None:
        # A forked child (gunicorn --preload, multiprocessing's fork) inherits the node but
        # not its thread: a portal call would wait forever for a loop that is not there.
        if self._portal is not None:
            logger.warning(
                "node %s was started in process %d; this process (%d) is a fork without "
                "the node's thread: it neither drains nor stops the node here. Start the "
                "node in the process that serves (gunicorn: in post_worker_init)",
                self._node.name,
                self.pid,
                os.getpid(),
            )
        self._thread = self._portal = self._future = None
        _unstopped.discard(self)


def drain_unstopped(trigger: str, *, why: str = "") -> None:
    """Drain and stop every node of this process that :meth:`Node.start_in_thread` started
    and the app has not stopped: what interpreter exit, SIGTERM and SIGINT run (see the
    module's documentation). ``trigger`` and ``why`` go into the warning logged per node.

    The drains run at the same time, and the waits for them share one bound: the longest
    ``drain_timeout`` plus a few seconds. A node that does not stop by then is given up.
    Nodes a forked child inherited are only forgotten, with a warning: their thread is not
    in this process.
    """
    for inherited in _unstopped.inherited():
        inherited.stop()  # says why a fork cannot drain it, and forgets it
    runners = _unstopped.runners()
    for runner in runners:
        logger.warning(
            "node %s: draining on %s%s (at most %g s)",
            runner.node.name,
            trigger,
            why,
            runner.node.settings.drain_timeout,
        )
        runner.request_stop()
    # One deadline for all: they drain at the same time, so the waits must not add up.
    limit = max((r.node.settings.drain_timeout for r in runners), default=0.0) + _STOP_SLACK
    deadline = time.monotonic() + limit
    for runner in runners:
        try:
            finished = runner.stop(timeout=max(0.0, deadline - time.monotonic()))
        except Exception:
            logger.exception("node %s: the drain on %s failed", runner.node.name, trigger)
            _unstopped.discard(runner)
            continue
        if not finished:
            logger.error(
                "node %s: the drain on %s did not end within %g s; giving up on it",
                runner.node.name,
                trigger,
                limit,
            )
            _unstopped.discard(runner)  # not waited for again at exit


_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class _Unstopped:
    """The nodes of this process that run in a thread and were not stopped yet, and the
    process-wide hooks that drain them when the app does not: interpreter exit, and the
    signals that would otherwise end the process at once."""

    def __init__(self) -> None:
        # Reentrant: the signal handler runs on the main thread, which may be holding it
        # (start_in_thread, stop, the exit hook) when the signal lands.
        self._lock = threading.RLock()
        self._runners: dict[ThreadRunner, None] = {}  # ordered: drains start in start order
        self._exit_hook = False
        self._previous: dict[int, _Handler] = {}  # signals we handle -> the handler before
        self.draining = False  # an automatic drain (exit or signal) runs now
        self.signal_drained = False  # a signal's drain is over: the next one acts as before

    def runners(self) -> list[ThreadRunner]:
        """The runners not stopped yet that this process can stop (not a fork's copies)."""
        with self._lock:
            return [r for r in self._runners if r.pid == os.getpid()]

    def inherited(self) -> list[ThreadRunner]:
        """The runners a forked child inherited from the process that started them."""
        with self._lock:
            return [r for r in self._runners if r.pid != os.getpid()]

    def add(self, runner: ThreadRunner) -> None:
        with self._lock:
            self._runners[runner] = None
            if not self._exit_hook:
                # Plain atexit, not threading's earlier hook: it runs once the app's
                # non-daemon threads have ended (the process really is exiting).
                atexit.register(_at_exit)
                self._exit_hook = True
        self._take_signals(runner)

    def discard(self, runner: ThreadRunner) -> None:
        with self._lock:
            self._runners.pop(runner, None)
            if self._runners or threading.current_thread() is not threading.main_thread():
                # Off the main thread our handler stays; with nothing left to drain it
                # acts as the handler before it did.
                return
            for signum, previous in list(self._previous.items()):
                if signal.getsignal(signum) == _on_signal:
                    signal.signal(signum, previous)
                del self._previous[signum]

    def act_as_before(self, signum: int, frame: FrameType | None) -> None:
        """Restore the handler from before the node and let it have this signal."""
        with self._lock:
            previous = self._previous.pop(signum, signal.SIG_DFL)
            self.signal_drained = False  # a node started later handles signals afresh
        signal.signal(signum, previous)
        if callable(previous):
            previous(signum, frame)  # Python's SIGINT handler: KeyboardInterrupt, as always
        else:
            os.kill(os.getpid(), signum)  # SIG_DFL: the signal ends the process, as always

    def _take_signals(self, runner: ThreadRunner) -> None:
        # Only the handlers a process has when it installed none: SIG_DFL (SIGTERM ends the
        # process at once) and Python's SIGINT handler. Handlers of the app's own
        # (gunicorn's workers, werkzeug's reloader) stay in charge: they decide when the
        # app stops, after which it exits (the exit hook drains) or calls node.stop().
        ours = {
            signum: handler
            for signum, handler in (
                (signal.SIGTERM, signal.getsignal(signal.SIGTERM)),
                (signal.SIGINT, signal.getsignal(signal.SIGINT)),
            )
            if handler is signal.SIG_DFL or handler is signal.default_int_handler
        }
        if threading.current_thread() is not threading.main_thread():
            # Python's SIGINT handler still drains (KeyboardInterrupt, then the exit hook);
            # SIG_DFL does not.
            lost = [signal.Signals(s).name for s, h in ours.items() if h is signal.SIG_DFL]
            if lost:
                logger.warning(
                    "node %s was started from thread %r, not from the main thread: Python "
                    "handles signals only there, so %s still ends this process without a "
                    "drain. Call node.stop() on shutdown (gunicorn: in the worker_exit "
                    "hook), or start the node from the main thread (see the README's "
                    "recipes)",
                    runner.node.name,
                    threading.current_thread().name,
                    " and ".join(lost),
                )
            return
        with self._lock:
            for signum, handler in ours.items():
                if signum not in self._previous:
                    self._previous[signum] = handler
                    signal.signal(signum, _on_signal)


_unstopped = _Unstopped()


def _at_exit() -> None:
    _unstopped.draining = True
    try:
        drain_unstopped(
            "interpreter exit",
            why=": node.stop() was not called (see the README's Flask and gunicorn recipes)",
        )
    except KeyboardInterrupt:
        # A second Ctrl-C where Python's own handler is in place: the user wants out now.
        logger.error("interrupted: the drain was abandoned; records not yet handed off are lost")
    finally:
        _unstopped.draining = False


def _on_signal(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if _unstopped.draining:
        logger.warning("%s during the drain: the drain goes on to its deadline", name)
        return
    if _unstopped.signal_drained or not _unstopped.runners():
        _unstopped.act_as_before(signum, frame)
        return
    _unstopped.draining = True
    # The drain runs beside the app, not in this handler: the interrupted main thread may
    # hold node.lock, which the drain needs; and the app goes on serving until it is done.
    drainer = threading.Thread(
        target=_drain_then_resignal, args=(signum,), name=f"handoff {name} drain", daemon=True
    )
    try:
        drainer.start()
    except RuntimeError:  # no new thread while the interpreter shuts down (3.12)
        _drain_then_resignal(signum)


def _drain_then_resignal(signum: int) -> None:
    try:
        drain_unstopped(signal.Signals(signum).name, why=", before the signal takes its course")
    finally:
        _unstopped.signal_drained = True
        _unstopped.draining = False
        # The signal once more: its handler, in the main thread (the only one that may
        # change handlers), hands it to the handler from before, which ends the process
        # (SIG_DFL) or raises KeyboardInterrupt there (SIGINT), as without the node.
        os.kill(os.getpid(), signum)
