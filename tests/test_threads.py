"""Threaded apps (Flask-style, ``node.start_in_thread()``) that never call ``node.stop()``.

The child app (tests/_threaded_app.py) serves HTTP from a tracked cache in its main thread
and ends the way such apps end: Ctrl-C, SIGTERM, or its main thread returning. Whichever it
is, its state must reach the successor (a NodeProcess) and its log must say so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio.from_thread
import pytest

from handoff import Node
from handoff._local.process import STATE_ENV, expected_digest, state_value
from handoff.lifecycle import drain_unstopped
from handoff.testing import NodeProcess
from tests._helpers import loopback_aliases_usable

APP = Path(__file__).resolve().parent / "_threaded_app.py"
HOSTS = ("127.0.0.2", "127.0.0.3")
STARTUP_TIMEOUT = 60.0  # two interpreters starting on a loaded 2-core machine
CONNECT_TIMEOUT = 20.0
EXIT_TIMEOUT = 60.0  # a drain of 2,000 entries takes well under a second; this is slack
ENTRIES = 2000
COOKIE = "test-cookie-0123456789abcdef"


def _env(host: str, *, discovery: str, state: dict[str, Any]) -> dict[str, str]:
    return {
        "HANDOFF_COOKIE": COOKIE,
        "HANDOFF_CLUSTER": "shop",
        "HANDOFF_BIND": f"{host}:0",
        "HANDOFF_DISCOVERY": discovery,
        "HANDOFF_POLL_INTERVAL": "0.2",
        "HANDOFF_HEARTBEAT_TIMEOUT": "6",
        "HANDOFF_DRAIN_TIMEOUT": "20",
        "HANDOFF_WARMUP_TIMEOUT": "120",  # warm because of the handoff, not a timeout
        "HANDOFF_CONTROL_SOCKET": "none",
        STATE_ENV: json.dumps(state),
    }


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    if not loopback_aliases_usable(HOSTS):
        pytest.skip(f"cannot bind {', '.join(HOSTS)} (on macOS: ifconfig lo0 alias 127.0.0.2)")
    with contextlib.ExitStack() as stack:
        yield stack


def _log(app: NodeProcess) -> str:
    return "\n".join(f"{e['level']} {e['message']}" for e in app.events if e["event"] == "log")


def _start_pair(
    stack: contextlib.ExitStack, state: dict[str, Any], empty: dict[str, Any]
) -> tuple[NodeProcess, NodeProcess]:
    new = stack.enter_context(
        NodeProcess(_env(HOSTS[1], discovery="none", state=empty), name="new")
    )
    new.wait_ready(timeout=STARTUP_TIMEOUT)
    old = stack.enter_context(
        NodeProcess(
            _env(HOSTS[0], discovery=f"static:{new.address}", state=state),
            name="old",
            program=[sys.executable, str(APP)],
        )
    )
    old.wait_ready(timeout=STARTUP_TIMEOUT)
    new.wait_for("node-up", peer="old", timeout=CONNECT_TIMEOUT)
    old.wait_for("node-up", peer="new", timeout=CONNECT_TIMEOUT)
    return old, new


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ending", "exit_code"),
    [("SIGINT", -signal.SIGINT), ("SIGTERM", -signal.SIGTERM), ("exit", 0)],
)
def test_a_threaded_app_that_never_calls_stop_drains(
    stack: contextlib.ExitStack, ending: str, exit_code: int
) -> None:
    state = {"namespace": "cache", "type": "ttl", "entries": ENTRIES, "ttl": 300}
    empty = {**state, "entries": 0, "maxsize": 2 * ENTRIES}
    old, new = _start_pair(stack, state, empty)
    listening = old.wait_ready()
    url = f"http://127.0.0.1:{listening['http_port']}/k7"
    with urllib.request.urlopen(url, timeout=10) as response:  # it serves, as a Flask app
        assert json.loads(response.read()) == state_value(7, 100)

    if ending == "exit":
        old.send("exit")  # serve_forever returns, main() ends: plain interpreter exit
    else:
        old.send_signal(getattr(signal, ending))
    assert old.wait_exit(timeout=EXIT_TIMEOUT) == exit_code  # the usual way out, drained first
    old.close()  # joins the reader: every event is in

    new.wait_for("warm", timeout=CONNECT_TIMEOUT)
    stats = new.command("stats")
    assert stats["entries"] == ENTRIES
    assert stats["digest"] == expected_digest(state)
    log = _log(old)
    trigger = "interpreter exit: node.stop() was not called" if ending == "exit" else ending
    assert f"WARNING node old: draining on {trigger}" in log, log
    assert f"cache: {ENTRIES} held, {ENTRIES} acknowledged by new, 0 snapshotted" in log, log
    if ending != "SIGTERM":  # SIGTERM kills the process as it always did: no atexit
        after = old.wait_for("after-exit", timeout=1)
        assert after["running"] is False
        report = after["report"]
        assert report["acknowledged"] == report["records"] == ENTRIES, report


@pytest.mark.slow
def test_a_second_signal_does_not_cut_the_drain_short(stack: contextlib.ExitStack) -> None:
    state = {"namespace": "cache", "type": "ttl", "entries": ENTRIES, "ttl": 300}
    # The successor sits on each chunk (two here) for a while: the drain is still running
    # when the second signal comes, milliseconds after the first.
    slow = {**state, "entries": 0, "maxsize": 2 * ENTRIES, "apply_delay": 0.5}
    old, new = _start_pair(stack, state, slow)

    def logged(text: str) -> Callable[[dict[str, Any]], bool]:
        def match(event: dict[str, Any]) -> bool:
            return event["event"] == "log" and text in event["message"]

        match.__name__ = f"a log line with {text!r}"
        return match

    old.send_signal(signal.SIGTERM)
    old.wait_for(logged("draining on SIGTERM"), timeout=CONNECT_TIMEOUT)
    os.kill(old.pid, signal.SIGTERM)  # the platform, or an impatient operator, again
    old.wait_for(logged("SIGTERM during the drain"), timeout=CONNECT_TIMEOUT)
    assert old.wait_exit(timeout=EXIT_TIMEOUT) == -signal.SIGTERM
    old.close()
    assert f"cache: {ENTRIES} held, {ENTRIES} acknowledged by new" in _log(old), _log(old)
    new.wait_for("warm", timeout=CONNECT_TIMEOUT)
    assert new.command("stats")["digest"] == expected_digest(state)


@pytest.mark.slow
@pytest.mark.parametrize("child_stops", [True, False], ids=["node.stop()", "exit hook"])
def test_a_forked_child_does_not_hang_on_its_parents_node(child_stops: bool) -> None:
    # gunicorn --preload, multiprocessing with fork: the child inherits the node but not its
    # thread. Stopping it there (worker_exit, interpreter exit) must neither hang nor drain.
    stop = "node.stop()" if child_stops else "pass  # the exit hook finds the node"
    code = textwrap.dedent(
        f"""
        import os, sys
        import handoff

        node = handoff.Node(
            "shop", cookie={COOKIE!r}, bind="127.0.0.2:0", environ={{}},
            control_socket="none",
        )
        node.track("n", {{"a": 1}})
        node.start_in_thread(wait_warm=False)
        pid = os.fork()
        if pid == 0:
            {stop}
            sys.exit(0)  # the interpreter's exit must not wait for the missing thread
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status), flush=True)
        print("parent still running:", node.running, flush=True)
        node.stop()
        print("parent drained:", node.last_drain_report is not None, flush=True)
        """
    )
    if not loopback_aliases_usable(HOSTS):
        pytest.skip("cannot bind 127.0.0.2")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=EXIT_TIMEOUT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "child 0",
        "parent still running: True",
        "parent drained: True",
    ], done.stderr
    assert "was started in process" in done.stderr  # the child says why it did not drain


# -- in one process -------------------------------------------------------------------------


def _node(name: str, host: str, **kwargs: Any) -> Node:
    return Node(
        "shop",
        name=name,
        bind=f"{host}:0",
        cookie=COOKIE,
        environ={},
        control_socket="none",
        warmup_timeout=5.0,
        **kwargs,
    )


def test_stop_after_an_automatic_drain_is_a_no_op() -> None:
    received: dict[str, int] = {}
    new = _node("new", "127.0.0.3")
    new.track("n", received)
    # The successor runs under its own portal, not start_in_thread(): only "old" is left
    # for the automatic drain.
    with (
        anyio.from_thread.start_blocking_portal() as portal,
        portal.wrap_async_context_manager(new),
    ):
        old = _node("old", "127.0.0.2", discovery=f"static:{new.address}")
        old.track("n", {"a": 1, "b": 2})
        ready = threading.Event()
        old.on_node_up(lambda peer: ready.set())
        old.start_in_thread(wait_warm=False)
        assert ready.wait(CONNECT_TIMEOUT)
        drain_unstopped("a test")  # what SIGTERM or interpreter exit runs
        assert not old.running
        report = old.last_drain_report
        assert report is not None
        assert report.acknowledged == 2
        old.stop()  # the app's own stop, later: nothing left to do, no error
        old.stop()
        assert old.last_drain_report is report
        with new.lock:
            assert received == {"a": 1, "b": 2}


def test_started_from_another_thread_it_warns_that_sigterm_kills_without_a_drain(
    caplog: pytest.LogCaptureFixture,
) -> None:
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("this test runner handles SIGTERM itself")
    node = _node("svc", "127.0.0.2")
    errors: list[BaseException] = []

    def start() -> None:
        try:
            node.start_in_thread(wait_warm=False)
        except BaseException as exc:  # surfaced in the test's thread below
            errors.append(exc)

    with caplog.at_level(logging.WARNING, logger="handoff"):
        starter = threading.Thread(target=start)
        starter.start()
        starter.join(STARTUP_TIMEOUT)
    try:
        assert not errors
        assert node.running
        warning = " ".join(r.getMessage() for r in caplog.records)
        assert "not from the main thread" in warning
        assert "SIGTERM" in warning
        assert "node.stop()" in warning
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # untouched
    finally:
        node.stop()


def test_from_the_main_thread_sigterm_and_sigint_are_handled_until_stop() -> None:
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("this test runner handles SIGTERM itself")
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("this test runner handles SIGINT itself")
    node = _node("svc", "127.0.0.2")
    node.start_in_thread(wait_warm=False)
    try:
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    finally:
        node.stop()
    # As they were before: a stopped node leaves signals to Python and the app.
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_apps_own_sigterm_handler_is_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    def mine(signum: int, frame: object) -> None:
        raise AssertionError("not sent in this test")

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        node = _node("svc", "127.0.0.2")
        with caplog.at_level(logging.WARNING, logger="handoff"):
            node.start_in_thread(wait_warm=False)
        try:
            assert signal.getsignal(signal.SIGTERM) is mine
            assert not [r for r in caplog.records if "SIGTERM" in r.getMessage()]
        finally:
            node.stop()
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_signal_that_lands_while_the_main_thread_holds_the_registry_lock_still_drains() -> None:
    # The main thread holds the registry's lock in start_in_thread(), node.stop() and the
    # exit hook; the signal handler runs on that same thread and took the lock too: with a
    # plain Lock the process hung for ever instead of draining and ending.
    script = textwrap.dedent(
        """
        import os, signal, time, handoff
        from handoff import lifecycle
        node = handoff.Node("shop", cookie="x" * 20, bind="127.0.0.1:0", environ={},
                            control_socket="none", discovery="none", drain_timeout=2)
        node.start_in_thread(wait_warm=False)
        assert signal.getsignal(signal.SIGTERM) is lifecycle._on_signal
        with lifecycle._unstopped._lock:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, lock held
            time.sleep(0.1)
        time.sleep(30)  # the drain ends the process with SIGTERM, as SIG_DFL would
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=EXIT_TIMEOUT
    )
    assert done.returncode == -signal.SIGTERM, done.stderr
