"""Log set-up for the service's entry points (the library never configures logging).

The node logs under ``handoff`` (joins, leaves, the one-line drain report), the shop under
``examples.service``; uvicorn configures only its own loggers, so without this those lines
would not show in ``fly logs`` or ``kubectl logs``.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ("configure_logging",)

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str | None = None) -> None:
    """Send ``handoff`` and ``examples.service`` records to stderr (once; idempotent).

    ``level`` defaults to ``$SHOP_LOG_LEVEL`` or INFO.
    """
    chosen = (level or os.environ.get("SHOP_LOG_LEVEL") or "INFO").upper()
    if chosen not in logging.getLevelNamesMapping():
        raise ValueError(
            f"SHOP_LOG_LEVEL={chosen!r} is not a log level: use DEBUG, INFO, WARNING or ERROR"
        )
    for name in ("handoff", "examples.service"):
        target = logging.getLogger(name)
        target.setLevel(chosen)
        if not any(getattr(h, "_shop_handler", False) for h in target.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(_FORMAT))
            handler._shop_handler = True  # type: ignore[attr-defined]
            target.addHandler(handler)
        target.propagate = False
