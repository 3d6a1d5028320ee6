"""The README's "Several workers per machine" recipes, with real servers on loopback.

Every worker of a machine gets the same environment (``HANDOFF_BIND=host:BASE`` included);
the workers take BASE, BASE+1, ... and find each other and the other machine through
``static:HOST,HOST`` (hosts without a port: the port range is probed). What each worker
holds is read through its own control socket (``a.sock``, ``a-PORT.sock``), so no HTTP
request is needed to look (gunicorn's ``--max-requests`` counts those).

- uvicorn ``--workers 2``: a blue-green deploy from release A (two workers on 127.0.0.2) to
  release B (two on 127.0.0.3) under traffic; every A worker's entries arrive on B, spread
  over both B workers.
- gunicorn with ``uvicorn.workers.UvicornWorker`` and ``--max-requests``: the recycled
  worker's entries land on its sibling.
- gunicorn sync workers (Flask) with the thread runner and ``--preload``: the node is built
  in the master at import and started in each worker (``post_worker_init``); a recycled
  worker drains to its sibling from ``worker_exit``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from examples.service.local_deploy import LineWatcher, _child_environment
from handoff.control import STATUS_SHAPE, ControlError, call
from handoff.testing import free_port
from tests._helpers import loopback_aliases_usable
from tests.test_workers import free_range

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
HOSTS = ("127.0.0.2", "127.0.0.3")
COOKIE = secrets.token_urlsafe(32)
RANGE = 4
STEP = 30.0  # bound of every single wait on the servers
DRAINED = re.compile(
    r"drain of (?P<node>\S+) \((?P<release>\S+)\) in [^:]+: entries: (?P<held>\d+) held, "
    r"(?P<acked>\d+) acknowledged by (?P<by>.+?)(?: \(copies to each: [^)]*\))?, "
    r"0 snapshotted$"
)


@pytest.fixture
def hosts() -> tuple[str, str]:
    if not loopback_aliases_usable(HOSTS):
        pytest.skip(f"cannot bind {', '.join(HOSTS)} (on macOS: ifconfig lo0 alias 127.0.0.2)")
    return HOSTS


def _environ(host: str, base: int, sockets: Path, release: str) -> dict[str, str]:
    """What every worker of one machine gets: the same for all of them."""
    return {
        "HANDOFF_CLUSTER": "workers",
        "HANDOFF_COOKIE": COOKIE,
        "HANDOFF_RELEASE": release,
        "HANDOFF_BIND": f"{host}:{base}",
        "HANDOFF_PORT_RANGE": str(RANGE),
        "HANDOFF_DISCOVERY": "static:" + ",".join(HOSTS),
        "HANDOFF_POLL_INTERVAL": "0.2",
        "HANDOFF_HEARTBEAT_TIMEOUT": "6",
        "HANDOFF_DRAIN_TIMEOUT": "10",
        "HANDOFF_WARMUP_TIMEOUT": "0.2",
        "HANDOFF_CONTROL_SOCKET": str(sockets / f"{release}.sock"),
    }


class Server:
    """A server command in a child process (its own process group), output followed."""

    def __init__(self, command: list[str], env: Mapping[str, str], *, name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=_child_environment(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        self.output = LineWatcher(self.proc.stdout, name=name)
        self.output.start()

    def terminate(self, *, timeout: float) -> int:
        """SIGTERM to the server (its master), then wait for it to exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} did not exit within {timeout:g} s; last lines:\n{self.output.tail()}"
            ) from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STEP)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.output.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def drains(self) -> list[re.Match[str]]:
        return [m for line in self.output.lines if (m := DRAINED.search(line))]


@contextlib.contextmanager
def serving(command: list[str], env: Mapping[str, str], *, name: str) -> Iterator[Server]:
    server = Server(command, env, name=name)
    try:
        yield server
    except BaseException:
        print(f"--- {name}:\n{server.output.tail(60)}")
        raise
    finally:
        server.close()


def status(path: Path) -> dict[str, Any]:
    async def ask() -> dict[str, Any]:
        reply = await call(
            path, {"command": "status"}, time_limit=5.0, shape={"status": STATUS_SHAPE}
        )
        result: dict[str, Any] = reply["status"]
        return result

    return anyio.run(ask)


def worker_statuses(
    sockets: Path, release: str, base: int, *, count: int, server: Server
) -> dict[int, dict[str, Any]]:
    """The status of each of ``count`` workers of ``release`` by port, once all of them
    run, know every peer they should (``count`` siblings and others) and are warm."""
    paths = {base: sockets / f"{release}.sock"} | {
        port: sockets / f"{release}-{port}.sock" for port in range(base + 1, base + RANGE)
    }
    deadline = time.monotonic() + STEP
    while True:
        found: dict[int, dict[str, Any]] = {}
        for port, path in paths.items():
            with contextlib.suppress(ControlError, OSError):
                found[port] = status(path)
        if len(found) == count and all(s["warm"] for s in found.values()):
            return found
        if time.monotonic() > deadline or server.proc.poll() is not None:
            raise AssertionError(
                f"{release}: {len(found)} of {count} workers up; last lines:\n"
                f"{server.output.tail(40)}"
            )
        time.sleep(0.1)


def entries(state: Mapping[str, Any]) -> int:
    (tracked,) = [t for t in state["tracked"] if t["namespace"] == "entries"]
    count: int = tracked["entries"]
    return count


def wait_peers(
    sockets: Path, release: str, base: int, *, count: int, peers: int, server: Server
) -> dict[int, dict[str, Any]]:
    deadline = time.monotonic() + STEP
    while True:
        found = worker_statuses(sockets, release, base, count=count, server=server)
        if all(len(s["members"]) - 1 >= peers for s in found.values()):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{release}: peers {[len(s['members']) for s in found.values()]}")
        time.sleep(0.1)


def write(url: str, keys: list[str], *, parallel: int = 4) -> list[str]:
    """``GET /put/KEY`` for each key, each on a new connection (so that the kernel hands
    them to either worker); returns the name of the worker that took each."""

    def put(key: str) -> str:
        with httpx.Client(timeout=10.0) as client:
            response = client.get(f"{url}/put/{key}")
            response.raise_for_status()
            name: str = response.json()["node"]
            return name

    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(put, keys))


def _gunicorn() -> list[str]:
    if shutil.which("gunicorn", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("gunicorn is not installed (pip install -e '.[test]')")
    return [sys.executable, "-m", "gunicorn"]


# -- the recipes -----------------------------------------------------------------------------


def test_uvicorn_workers_blue_green_every_workers_entries_arrive(
    hosts: tuple[str, str], tmp_path: Path
) -> None:
    base = free_range(hosts, RANGE)
    sockets = tmp_path
    http = {host: free_port(host) for host in hosts}

    def uvicorn(host: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "tests._workers_app:app",
            "--workers",
            "2",
            "--host",
            host,
            "--port",
            str(http[host]),
            "--timeout-graceful-shutdown",
            "5",
        ]

    a_url = f"http://{hosts[0]}:{http[hosts[0]]}"
    with serving(uvicorn(hosts[0]), _environ(hosts[0], base, sockets, "v1"), name="A") as a:
        wait_peers(sockets, "v1", base, count=2, peers=1, server=a)
        with serving(uvicorn(hosts[1]), _environ(hosts[1], base, sockets, "v2"), name="B") as b:
            wait_peers(sockets, "v2", base, count=2, peers=3, server=b)
            wait_peers(sockets, "v1", base, count=2, peers=3, server=a)
            # Traffic to A until both of its workers hold entries.
            written: list[str] = []
            for round_ in range(10):
                keys = [f"r{round_}-k{i}" for i in range(40)]
                write(a_url, keys)
                written += keys
                held = worker_statuses(sockets, "v1", base, count=2, server=a)
                if all(entries(s) for s in held.values()):
                    break
            a_held = {s["node"]: entries(s) for s in held.values()}
            assert all(a_held.values()), a_held
            assert sum(a_held.values()) == len(written)

            assert a.terminate(timeout=STEP) in (0, -signal.SIGTERM)
            drains = {m["node"]: m for m in a.drains()}
            assert set(drains) == set(a_held), a.output.tail(40)
            for name, match in drains.items():
                assert int(match["held"]) == int(match["acked"]) == a_held[name]
                # Each A worker copied its entries to both B workers (spread "all", the
                # default for a mapping: a round-robin balancer sends any key anywhere).
                assert len(match["by"].split(", ")) == 2, match["by"]

            b_held = worker_statuses(sockets, "v2", base, count=2, server=b)
            counts = [entries(s) for s in b_held.values()]
            assert counts == [len(written)] * 2, counts  # every B worker holds every entry


def test_gunicorn_uvicorn_workers_a_recycled_workers_entries_land_on_its_sibling(
    hosts: tuple[str, str], tmp_path: Path
) -> None:
    host = hosts[0]
    base = free_range([host], RANGE)
    port = free_port(host)
    max_requests = 30
    command = [
        *_gunicorn(),
        "-w",
        "2",
        "-k",
        "uvicorn.workers.UvicornWorker",
        "--max-requests",
        str(max_requests),
        "--graceful-timeout",
        "15",
        "-b",
        f"{host}:{port}",
        "tests._workers_app:app",
    ]
    with serving(command, _environ(host, base, tmp_path, "v1"), name="gunicorn") as server:
        wait_peers(tmp_path, "v1", base, count=2, peers=1, server=server)
        # 2 * max_requests - 1 requests: one worker reaches max_requests (and only one).
        keys = [f"k{i}" for i in range(2 * max_requests - 1)]
        write(f"http://{host}:{port}", keys, parallel=1)
        match = server.output.wait_for(DRAINED, timeout=STEP)
        held = int(match["held"])
        assert held > 0
        assert int(match["acked"]) == held
        # The sibling took it all (it is the only serving peer); the new worker that
        # replaced the recycled one joins and holds only what it was sent since.
        wait_peers(tmp_path, "v1", base, count=2, peers=1, server=server)
        after = worker_statuses(tmp_path, "v1", base, count=2, server=server)
        assert sum(entries(s) for s in after.values()) == len(keys)
        assert match["by"] in {s["node"] for s in after.values()}
        assert len(server.drains()) == 1


def test_gunicorn_sync_flask_workers_thread_runner_with_preload(
    hosts: tuple[str, str], tmp_path: Path
) -> None:
    host = hosts[0]
    base = free_range([host], RANGE)
    port = free_port(host)
    max_requests = 20
    command = [
        *_gunicorn(),
        "-w",
        "2",
        "--preload",
        "-c",
        "tests/_workers_gunicorn.py",
        "--max-requests",
        str(max_requests),
        "-b",
        f"{host}:{port}",
        "tests._workers_flask:app",
    ]
    env = _environ(host, base, tmp_path, "v1")
    with serving(command, env, name="gunicorn-flask") as server:
        first = wait_peers(tmp_path, "v1", base, count=2, peers=1, server=server)
        names = {s["node"] for s in first.values()}
        pids = {s["pid"] for s in first.values()}
        assert len(names) == len(pids) == 2  # built in the master, named in each worker
        keys = [f"k{i}" for i in range(2 * max_requests - 1)]
        write(f"http://{host}:{port}", keys, parallel=1)
        match = server.output.wait_for(DRAINED, timeout=STEP)
        assert int(match["acked"]) == int(match["held"]) > 0
        wait_peers(tmp_path, "v1", base, count=2, peers=1, server=server)
        after = worker_statuses(tmp_path, "v1", base, count=2, server=server)
        assert sum(entries(s) for s in after.values()) == len(keys)
        assert match["by"] in {s["node"] for s in after.values()}
        assert server.terminate(timeout=STEP) == 0
    # Nothing was ever started in the master: no warning about a node in a fork.
    assert "is a fork without the node's thread" not in "\n".join(server.output.lines)
