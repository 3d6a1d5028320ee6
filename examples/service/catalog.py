"""A deliberately slow fake database: the thing the shop's caches protect.

Products are generated from their id, so every process (and every test) agrees on them
without sharing storage. Each query sleeps ``delay`` seconds, like a round trip to a real
database under load, and is counted: a warm cache shows up as *no* backend calls.
"""

from __future__ import annotations

from typing import Any

import anyio

__all__ = ("PRODUCT_SCHEMA_VERSION", "Catalog", "product_record")

#: The schema version of product records in this release (see :mod:`examples.service.shop`).
PRODUCT_SCHEMA_VERSION = 2

_ADJECTIVES = ("red", "quiet", "swift", "golden", "tiny", "woollen", "sturdy", "polished")
_NOUNS = ("kettle", "lamp", "notebook", "backpack", "teapot", "bicycle", "umbrella", "clock")


def product_record(product_id: int) -> dict[str, Any]:
    """The product with ``product_id`` as this release stores it (schema version 2)."""
    adjective = _ADJECTIVES[product_id % len(_ADJECTIVES)]
    noun = _NOUNS[(product_id // len(_ADJECTIVES)) % len(_NOUNS)]
    return {
        "id": product_id,
        "name": f"{adjective} {noun} #{product_id}",
        "price_cents": 199 + (product_id * 7919) % 10_000,
        "currency": "EUR",
    }


class Catalog:
    """Products ``1..size``; every query takes ``delay`` seconds and is counted."""

    def __init__(self, size: int, delay: float) -> None:
        self.size = size
        self.delay = delay
        self.calls = 0
        self.connected = False

    async def connect(self) -> None:
        """Open the (pretend) connection pool; the app's lifespan calls it."""
        self.connected = True

    async def close(self) -> None:
        """Close the (pretend) connection pool."""
        self.connected = False

    async def product(self, product_id: int) -> dict[str, Any] | None:
        """The product, or ``None`` if there is no such id."""
        self.calls += 1
        await anyio.sleep(self.delay)
        if not 1 <= product_id <= self.size:
            return None
        return product_record(product_id)

    async def search(self, query: str, *, limit: int = 10) -> list[int]:
        """Ids of up to ``limit`` products whose name contains ``query`` (lower case)."""
        self.calls += 1
        await anyio.sleep(self.delay)
        found: list[int] = []
        for product_id in range(1, self.size + 1):
            if query in product_record(product_id)["name"]:
                found.append(product_id)
                if len(found) == limit:
                    break
        return found
