"""ASGI entry point, configured by the environment: ``uvicorn examples.ratelimit.app:app``.

Importing this module builds the app (and its node) from ``os.environ``, so a missing
``HANDOFF_COOKIE`` fails right here, before uvicorn serves.
"""

from __future__ import annotations

import logging

from examples.ratelimit.api import create_app

__all__ = ("app",)

# The node's drain report and warm-up lines (INFO) on stderr, beside uvicorn's.
_handoff_logger = logging.getLogger("handoff")
_handoff_logger.setLevel(logging.INFO)
_handoff_logger.addHandler(logging.StreamHandler())
app = create_app()
