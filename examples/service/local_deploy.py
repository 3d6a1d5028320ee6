"""A warm deploy of the shop on one machine: ``python -m examples.service.local_deploy``.

Two releases of the service run under uvicorn as child processes, the way a platform runs
them: the old one serves and its caches fill; the new one starts and joins it; the old one
gets SIGTERM, uvicorn runs the lifespan shutdown, the node drains into the successor and the
process exits; the successor, warm, starts serving every product from its cache.

:class:`ServiceProcess` and :func:`warm_deploy` are also what the project's tests drive
(tests/test_example_service.py and tests/test_containers.py), with static and DNS
discovery. POSIX only (signals).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import httpx

from handoff.testing import free_port

__all__ = ("DeployOutcome", "LineWatcher", "ServiceProcess", "ServiceProcessError", "warm_deploy")

ROOT = Path(__file__).resolve().parents[2]

#: What a child must not inherit from the parent: it is configured only by what it is given.
_INHERITED_PREFIXES = ("HANDOFF_", "FLY_", "SHOP_", "UVICORN_")
_INHERITED_NAMES = ("KUBERNETES_SERVICE_HOST", "POD_IP", "WEB_CONCURRENCY")
_TAIL_LINES = 60

#: Lines the tests and the demo wait for (uvicorn's, the shop's and the node's).
SERVING = re.compile(r"Uvicorn running on http://\S+")
DRAIN_REPORT = re.compile(r"drain of \S+ \(\S+\) in [\d.]+ m?s: .*")


def joined(peer: str) -> re.Pattern[str]:
    """The shop's log line saying that ``peer`` joined (see ``shop._log_membership``)."""
    return re.compile(rf"peer {re.escape(peer)} \(release \S+\) joined")


class ServiceProcessError(RuntimeError):
    """A service process did not do what was awaited in time (its log tail attached)."""


class LineWatcher:
    """Collects lines from ``source`` in a daemon thread; :meth:`wait_for` one that matches.

    Waiting is event driven (a condition variable notified per line), bounded by a timeout,
    and ends early when the source ends (the process exited, the container stopped).
    """

    def __init__(self, source: Iterable[str], *, name: str) -> None:
        self.name = name
        self._source = source
        self._lines: list[str] = []
        self._ended = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"lines of {name}", daemon=True)

    def start(self) -> None:
        """Start reading."""
        self._thread.start()

    def _run(self) -> None:
        try:
            for line in self._source:
                with self._changed:
                    self._lines.append(line.rstrip("\r\n"))
                    self._changed.notify_all()
        except (OSError, ValueError):  # the stream was closed under us
            pass
        finally:
            with self._changed:
                self._ended = True
                self._changed.notify_all()

    @property
    def lines(self) -> list[str]:
        """Every line read so far."""
        with self._changed:
            return list(self._lines)

    def mark(self) -> int:
        """A position: ``wait_for(..., since=mark)`` ignores the lines before it."""
        with self._changed:
            return len(self._lines)

    def tail(self, count: int = _TAIL_LINES) -> str:
        """The last ``count`` lines, for error messages."""
        with self._changed:
            return "\n".join(self._lines[-count:])

    def wait_for(
        self, pattern: str | re.Pattern[str], *, timeout: float, since: int = 0
    ) -> re.Match[str]:
        """The first match of ``pattern`` in a line from ``since`` on, seen or still to come.

        Raises :class:`ServiceProcessError` if the source ends or ``timeout`` seconds pass
        first.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        checked = since
        with self._changed:
            while True:
                for line in self._lines[checked:]:
                    if (match := regex.search(line)) is not None:
                        return match
                checked = len(self._lines)
                remaining = deadline - time.monotonic()
                if self._ended or remaining <= 0:
                    why = "its output ended" if self._ended else f"{timeout:g} s passed"
                    raise ServiceProcessError(
                        f"{self.name}: {why} before a line matched {regex.pattern!r}; "
                        f"last lines:\n{self.tail()}"
                    )
                self._changed.wait(remaining)

    def join(self, timeout: float) -> None:
        """Wait for the reading thread to end (after its source ended)."""
        self._thread.join(timeout)


def _child_environment(env: Mapping[str, str]) -> dict[str, str]:
    base = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_INHERITED_PREFIXES) and key not in _INHERITED_NAMES
    }
    base.update(env)
    base["PYTHONUNBUFFERED"] = "1"
    return base


class ServiceProcess:
    """The shop under uvicorn in a child process, configured by ``env``; output followed.

    ``name`` is the node's name (``HANDOFF_NODE_NAME`` is set to it). uvicorn listens on
    ``host:http_port``; the node where ``env``'s ``HANDOFF_BIND`` says. Use it as a context
    manager: leaving it ends the process (SIGTERM, then SIGKILL after ``stop_timeout``) and
    reaps it.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        name: str,
        host: str,
        http_port: int,
        graceful_timeout: int = 5,
        stop_timeout: float = 30.0,
    ) -> None:
        self.name = name
        self.host = host
        self.http_port = http_port
        self.env = {**env, "HANDOFF_NODE_NAME": name}
        self.graceful_timeout = graceful_timeout
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[str] | None = None
        self._watcher: LineWatcher | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def output(self) -> LineWatcher:
        """The child's stdout and stderr, line by line."""
        if self._watcher is None:
            raise ServiceProcessError(f"{self.name} is not started")
        return self._watcher

    @property
    def returncode(self) -> int | None:
        """The exit status once the child has exited (``-N``: killed by signal N)."""
        return None if self._proc is None else self._proc.poll()

    def url(self, path: str) -> str:
        """The service's URL for ``path``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.http_port}{path}"

    def start(self) -> None:
        """Start uvicorn (returns at once; see :meth:`wait_serving`)."""
        if self._proc is not None:
            raise ServiceProcessError(f"{self.name} was started already")
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "examples.service.app:app",
            "--host",
            self.host,
            "--port",
            str(self.http_port),
            "--timeout-graceful-shutdown",
            str(self.graceful_timeout),
        ]
        self._proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=_child_environment(self.env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        assert self._proc.stdout is not None
        self._watcher = LineWatcher(self._proc.stdout, name=self.name)
        self._watcher.start()

    def wait_for(self, pattern: str | re.Pattern[str], *, timeout: float) -> re.Match[str]:
        """The first line (seen so far or to come) that matches ``pattern``."""
        return self.output.wait_for(pattern, timeout=timeout)

    def wait_serving(self, *, timeout: float) -> None:
        """Wait until uvicorn listens: after the lifespan startup, so the node is warm."""
        self.wait_for(SERVING, timeout=timeout)

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the process (SIGSTOP and SIGCONT pause and resume it)."""
        self._require().send_signal(signum)

    def terminate(self, *, timeout: float) -> int:
        """SIGTERM (what platforms send), then wait for the exit; returns the exit status."""
        proc = self._require()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ServiceProcessError(
                f"{self.name} did not exit within {timeout:g} s of SIGTERM; last lines:\n"
                f"{self.output.tail()}"
            ) from None

    def close(self) -> None:
        """End the process if it still runs (SIGTERM, then SIGKILL) and reap it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10.0)
        finally:
            if proc.poll() is None:  # pragma: no cover - wait() above failed oddly
                proc.kill()
                proc.wait()
            if self._watcher is not None:
                self._watcher.join(5.0)
            stdout: IO[str] | None = proc.stdout
            if stdout is not None:
                with contextlib.suppress(OSError):
                    stdout.close()

    def _require(self) -> subprocess.Popen[str]:
        if self._proc is None:
            raise ServiceProcessError(f"{self.name} is not started")
        return self._proc


@dataclass
class DeployOutcome:
    """What a :func:`warm_deploy` saw; the tests assert on it, the demo prints it."""

    products: list[int]
    searches: list[str]
    old_stats: dict[str, Any]
    old_exit: int
    drain_report: str
    new_stats_before: dict[str, Any]
    new_stats_after: dict[str, Any]
    product_sources: dict[int, str]
    search_sources: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)


def _get(client: httpx.Client, url: str) -> dict[str, Any]:
    response = client.get(url)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def warm_deploy(
    old: ServiceProcess,
    new: ServiceProcess,
    *,
    products: Sequence[int],
    searches: Sequence[str] = (),
    timeout: float = 30.0,
) -> DeployOutcome:
    """Deploy ``new`` over ``old`` and report how warm ``new`` came up.

    Starts ``old`` and fills its caches (``products`` by id, ``searches`` by query), starts
    ``new``, waits until each logs that the other joined, sends ``old`` SIGTERM and waits for
    it to exit (its drain ends when the successor has acknowledged everything), waits until
    ``new`` serves, then requests the same products and searches from ``new``. Every wait
    is bounded by ``timeout``. The caller closes both processes.
    """
    started = time.monotonic()
    old.start()
    old.wait_serving(timeout=timeout)
    timings = {"old serving": time.monotonic() - started}
    # Closed before SIGTERM: uvicorn's shutdown waits for open connections.
    with httpx.Client(timeout=timeout) as client:
        for product_id in products:
            _get(client, old.url(f"/products/{product_id}"))
        for query in searches:
            _get(client, old.url(f"/search?q={query}"))
        old_stats = _get(client, old.url("/stats"))

    mark = time.monotonic()
    new.start()
    old.wait_for(joined(new.name), timeout=timeout)
    new.wait_for(joined(old.name), timeout=timeout)
    timings["joined"] = time.monotonic() - mark

    mark = time.monotonic()
    old_exit = old.terminate(timeout=timeout)
    timings["SIGTERM to exit"] = time.monotonic() - mark
    drain_report = old.wait_for(DRAIN_REPORT, timeout=timeout).group(0)
    new.wait_serving(timeout=timeout)
    timings["SIGTERM to successor serving"] = time.monotonic() - mark

    with httpx.Client(timeout=timeout) as client:
        before = _get(client, new.url("/stats"))
        product_sources = {
            product_id: str(_get(client, new.url(f"/products/{product_id}"))["source"])
            for product_id in products
        }
        search_sources = {
            query: str(_get(client, new.url(f"/search?q={query}"))["source"]) for query in searches
        }
        after = _get(client, new.url("/stats"))
    timings["total"] = time.monotonic() - started
    return DeployOutcome(
        products=list(products),
        searches=list(searches),
        old_stats=old_stats,
        old_exit=old_exit,
        drain_report=drain_report,
        new_stats_before=before,
        new_stats_after=after,
        product_sources=product_sources,
        search_sources=search_sources,
        timings=timings,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run a warm deploy on 127.0.0.1 and print what the successor holds."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.service.local_deploy", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--products", type=int, default=50, help="products to warm (default 50)")
    parser.add_argument("--delay", type=float, default=0.05, help="backend delay in seconds")
    args = parser.parse_args(argv)
    host = "127.0.0.1"
    old_node, new_node = free_port(host), free_port(host)
    common = {
        "HANDOFF_CLUSTER": "shop",
        "HANDOFF_COOKIE": secrets.token_urlsafe(32),
        "HANDOFF_POLL_INTERVAL": "0.2",
        "HANDOFF_DRAIN_TIMEOUT": "10",
        "SHOP_BACKEND_DELAY": str(args.delay),
    }
    old_env = {
        **common,
        "HANDOFF_RELEASE": "v1",
        "HANDOFF_BIND": f"{host}:{old_node}",
        "HANDOFF_DISCOVERY": "none",
        "HANDOFF_WARMUP_TIMEOUT": "0.5",  # first deploy: nobody to wait for
    }
    new_env = {
        **common,
        "HANDOFF_RELEASE": "v2",
        "HANDOFF_BIND": f"{host}:{new_node}",
        "HANDOFF_DISCOVERY": f"static:{host}:{old_node}",
        "HANDOFF_WARMUP_TIMEOUT": "60",  # warm because of the handoff, not the timeout
    }
    products = list(range(1, args.products + 1))
    with (
        ServiceProcess(old_env, name="old", host=host, http_port=free_port(host)) as old,
        ServiceProcess(new_env, name="new", host=host, http_port=free_port(host)) as new,
    ):
        outcome = warm_deploy(old, new, products=products, searches=["lamp", "teapot"])
    print(f"old ({old.url('/')}) warmed {len(products)} products; exit status {outcome.old_exit}")
    print(f"its drain report: {outcome.drain_report}")
    hits = sum(source == "cache" for source in outcome.product_sources.values())
    after = outcome.new_stats_after
    print(
        f"new served {hits}/{len(products)} products from its cache; backend calls: "
        f"{after['backend_calls']}; warm because: {after['node']['warm_reason']}"
    )
    print("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in outcome.timings.items()))
    return 0 if hits == len(products) else 1


if __name__ == "__main__":
    sys.exit(main())
