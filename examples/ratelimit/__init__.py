"""A FastAPI app whose slowapi rate limit (5/minute per client) holds across deploys.

``uvicorn examples.ratelimit.app:app`` runs it; see ``README.md`` beside this file.
:func:`create_app` builds it from a given environment (the tests use that);
:mod:`examples.ratelimit.app` builds it from the process environment.
"""

from __future__ import annotations

from examples.ratelimit.api import LIMIT, client_key, create_app

__all__ = ("LIMIT", "client_key", "create_app")
