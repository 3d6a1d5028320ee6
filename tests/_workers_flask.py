"""The Flask app of the sync-worker recipe's test (tests/test_workers_servers.py), served by
``gunicorn -w 2 -c tests/_workers_gunicorn.py --preload tests._workers_flask:app``.

The node is built here, at import: with ``--preload`` that is the master, before the fork.
It is started in each worker by the ``post_worker_init`` hook (tests/_workers_gunicorn.py),
never in the master, and stopped (drained) by ``worker_exit``.
"""

from __future__ import annotations

import logging
import sys

from flask import Flask

from handoff import Node

__all__ = ("app", "node")

_handler = logging.StreamHandler(sys.stderr)
_handler.setFormatter(logging.Formatter("%(process)d %(levelname)s %(name)s: %(message)s"))
logging.getLogger("handoff").addHandler(_handler)
logging.getLogger("handoff").setLevel(logging.INFO)

node = Node()
entries: dict[str, str] = {}
node.track("entries", entries)
app = Flask(__name__)


@app.get("/put/<key>")
def put(key: str) -> dict[str, str]:
    with node.lock:  # the node applies and exports on its own thread
        entries[key] = node.name
    return {"node": node.name}
