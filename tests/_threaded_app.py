"""A plain threaded app that never calls ``node.stop()``: the child of tests/test_threads.py.

What a Flask app run by its development server looks like, without Flask: a
``ThreadingHTTPServer`` serves from a tracked cache (under ``node.lock``) in the main thread,
and the node runs beside it through ``node.start_in_thread()``. The app never calls
``node.stop()``; it ends the way such apps end: Ctrl-C (SIGINT), SIGTERM, or ``serve_forever``
returning (here: the line ``exit`` on stdin) and the interpreter exiting.

It speaks NodeProcess's protocol: configured by ``HANDOFF_*`` and ``HANDOFF_TEST_STATE``,
one JSON event per line on stdout (``listening`` first), the ``handoff`` log on stderr and
as ``{"event": "log", "level": ..., "message": ...}`` events. An
``atexit`` handler registered by the app (it runs after the node's own exit hook) prints
``{"event": "after-exit", "running": ..., "report": ...}``, calling ``node.stop()`` once
more if the node has drained (which must then do nothing).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import handoff
from handoff._local.process import STATE_ENV, StateConfig


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class LogEvents(logging.Handler):
    """Each log record as an event too, so that the test can wait for a line of the log."""

    def emit(self, record: logging.LogRecord) -> None:
        emit({"event": "log", "level": record.levelname, "message": record.getMessage()})


def main() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    package_logger = logging.getLogger("handoff")
    package_logger.addHandler(handler)
    package_logger.addHandler(LogEvents())
    package_logger.setLevel(logging.INFO)

    config = StateConfig.parse(os.environ[STATE_ENV])
    cache = config.create()
    for index in range(config.entries):
        cache[config.key(index)] = config.value(index)
    node = handoff.Node()
    node.track(config.namespace, cache, version=config.version)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with node.lock:  # the documented way for app threads to use a tracked object
                value = cache.get(self.path.lstrip("/"))
            body = json.dumps(value).encode()
            self.send_response(200 if value is not None else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    def after_exit() -> None:
        report = node.last_drain_report
        if report is not None:  # this app never stops the node itself, so only then
            node.stop()  # after the automatic drain: a no-op, not an error or a hang
        emit(
            {
                "event": "after-exit",
                "running": node.running,
                "report": None if report is None else report.as_dict(),
            }
        )

    atexit.register(after_exit)
    node.on_node_up(lambda peer: emit({"event": "node-up", "peer": peer.name}))
    node.start_in_thread(wait_warm=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def watch_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "exit":
                break
        server.shutdown()  # serve_forever returns; main() ends without node.stop()

    threading.Thread(target=watch_stdin, daemon=True).start()
    emit(
        {
            "event": "listening",
            "name": node.name,
            "address": node.address,
            "port": node.port,
            "http_port": server.server_address[1],
            "pid": os.getpid(),
        }
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
    emit({"event": "main-returned"})


if __name__ == "__main__":
    main()
