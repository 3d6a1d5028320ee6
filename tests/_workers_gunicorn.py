"""gunicorn configuration of the sync-worker recipe (README, "Several workers per machine"):
each worker starts its own node after the fork and drains it when it exits (TERM, INT,
QUIT, and ``--max-requests`` recycling)."""

from __future__ import annotations

from typing import Any


def post_worker_init(worker: Any) -> None:
    from tests._workers_flask import node

    node.start_in_thread()


def worker_exit(server: Any, worker: Any) -> None:
    from tests._workers_flask import node

    node.stop()
