"""ASGI entry point, configured by the environment: ``uvicorn examples.service.app:app``.

Importing this module builds the app (and its node) from ``os.environ``, so a missing
``HANDOFF_COOKIE`` or a bad ``SHOP_*`` value fails right here, before uvicorn serves.
Tests and embedders use :func:`examples.service.create_app` instead.
"""

from __future__ import annotations

from examples.service.logs import configure_logging
from examples.service.shop import create_app

__all__ = ("app",)

configure_logging()
app = create_app()
