"""The rate-limited API: slowapi with its default in-memory storage, handed off on deploy.

slowapi (like Flask-Limiter) keeps its counts in a ``limits.storage.MemoryStorage``
(``storage_uri="memory://"``), so every restart used to hand each client a fresh limit.
Here the node tracks that storage: when the old release drains, each client's window moves
to the new release with its count and its remaining time, and a client that spent 4 of its
5 requests before the deploy gets exactly 1 after it.

Endpoints are ``async def``: slowapi touches the storage on the event loop, where the node
also exports and applies handed-off windows (the adapter takes the storage's per-key locks
as well, so a threaded app is safe too).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from fastapi import FastAPI, Request, Response
from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded
from slowapi.util import get_remote_address

from handoff import Node

__all__ = ("LIMIT", "client_key", "create_app")

LIMIT = "5/minute"
"""The limit of ``GET /hello``, per client."""


def client_key(request: Request) -> str:
    """Who the limit counts for: the ``X-Api-Key`` header, else the client's address."""
    return request.headers.get("x-api-key") or get_remote_address(request)


def create_app(environ: Mapping[str, str] | None = None) -> FastAPI:
    """Build the app and its node from ``environ`` (default: the process environment).

    The node reads ``HANDOFF_*`` (and ``FLY_*`` / Kubernetes) variables; ``RATELIMIT_STRATEGY``
    picks the ``limits`` strategy (``fixed-window``, the default, ``moving-window`` or
    ``sliding-window-counter``). Raises ``handoff.ConfigError`` on bad settings.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    strategy = env.get("RATELIMIT_STRATEGY", "").strip() or "fixed-window"
    limiter = Limiter(key_func=client_key, storage_uri="memory://", strategy=strategy)
    node = Node(environ=env)
    # slowapi keeps its storage in limiter._storage (Flask-Limiter: limiter.storage); the
    # limits adapter (pip install 'warm-handoff[limits]') is chosen by its type.
    node.track("ratelimits", limiter._storage)

    app = FastAPI(title="rate limits (warm-handoff example)", lifespan=node.lifespan)
    app.state.limiter = limiter
    app.state.node = node
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]

    @app.get("/hello")
    @limiter.limit(LIMIT)
    async def hello(request: Request) -> dict[str, str]:
        """A greeting, at most 5 a minute per client; the 6th gets 429."""
        return {"hello": client_key(request), "release": node.release}

    @app.get("/readyz")
    async def readyz(response: Response) -> dict[str, object]:
        """Readiness: 200 once the node is warm (the old release's windows arrived)."""
        response.status_code, body = node.readiness()
        return body

    @app.get("/stats")
    async def stats() -> dict[str, object]:
        """The node, and what its last drain did with the rate-limit windows."""
        report = node.last_drain_report
        return {
            "node": node.name,
            "release": node.release,
            "state": str(node.state),
            "warm_reason": node.warm_reason,
            "last_drain": report.summary() if report is not None else None,
        }

    return app
