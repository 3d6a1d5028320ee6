"""The shop: a small FastAPI service whose caches stay warm across deploys.

``uvicorn examples.service.app:app`` or ``python -m examples.service`` runs it; see
``README.md`` beside this file. :func:`create_app` builds it from a given environment (the
tests use that); :mod:`examples.service.app` builds it from the process environment.
"""

from __future__ import annotations

from examples.service.settings import ShopSettings
from examples.service.shop import Shop, create_app

__all__ = ("Shop", "ShopSettings", "create_app")
