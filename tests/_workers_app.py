"""The ASGI app of the worker recipes' tests (tests/test_workers_servers.py): one tracked
dict per worker process, written through ``GET /put/{key}``; the node reads ``HANDOFF_*``.

Run as every worker of a machine is: ``uvicorn tests._workers_app:app --workers 2`` or
``gunicorn -w 2 -k uvicorn.workers.UvicornWorker tests._workers_app:app``.
"""

from __future__ import annotations

import logging
import sys

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from handoff import Node

__all__ = ("app", "node")

# The handoff logger has no handler under uvicorn or gunicorn: the tests read its lines.
_handler = logging.StreamHandler(sys.stderr)
_handler.setFormatter(logging.Formatter("%(process)d %(levelname)s %(name)s: %(message)s"))
logging.getLogger("handoff").addHandler(_handler)
logging.getLogger("handoff").setLevel(logging.INFO)

node = Node()
entries: dict[str, str] = {}
node.track("entries", entries)


async def put(request: Request) -> JSONResponse:
    entries[request.path_params["key"]] = node.name
    return JSONResponse({"node": node.name})


app = Starlette(routes=[Route("/put/{key}", put)], lifespan=node.lifespan)
