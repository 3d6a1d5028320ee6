"""The shop's own settings, from ``SHOP_*`` environment variables.

The node's settings come from ``HANDOFF_*`` (see the project README); these are the
service's. Every value is checked at startup and a bad one raises :class:`ValueError`
naming the variable, so a typo in a deploy template fails the deploy instead of running
with a surprise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ("SHOP_VARIABLES", "ShopSettings")

#: The variables the shop reads, with what each one means (checked by the deploy-kit tests).
SHOP_VARIABLES: tuple[tuple[str, str], ...] = (
    ("SHOP_BACKEND_DELAY", "Seconds the fake database takes per query. Default: 0.2."),
    ("SHOP_CACHE_SIZE", "Products the TTL cache holds at most. Default: 10000."),
    ("SHOP_CACHE_TTL", "Seconds a cached product lives. Default: 300."),
    ("SHOP_SEARCH_CACHE_SIZE", "Searches the LRU cache keeps. Default: 256."),
    ("SHOP_CATALOG_SIZE", "Products in the fake database (ids 1..N). Default: 1000."),
    ("SHOP_LOG_LEVEL", "Level of the handoff and examples.service loggers. Default: INFO."),
)


def _number(environ: Mapping[str, str], name: str, default: float, *, integer: bool) -> float:
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise ValueError(f"{name}={text!r} is not {kind}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={text!r} must be a finite number >= 0")
    return value


@dataclass(frozen=True, slots=True)
class ShopSettings:
    """What the shop needs besides the node: sizes, lifetimes and the backend's delay."""

    backend_delay: float = 0.2
    cache_size: int = 10_000
    cache_ttl: float = 300.0
    search_cache_size: int = 256
    catalog_size: int = 1_000

    def __post_init__(self) -> None:
        if self.cache_size < 1 or self.search_cache_size < 1:
            raise ValueError("SHOP_CACHE_SIZE and SHOP_SEARCH_CACHE_SIZE must be at least 1")
        if self.cache_ttl <= 0:
            raise ValueError("SHOP_CACHE_TTL must be greater than 0")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ShopSettings:
        """Read the ``SHOP_*`` variables of ``environ``; unset or blank ones keep defaults."""
        defaults = cls()
        return cls(
            backend_delay=_number(
                environ, "SHOP_BACKEND_DELAY", defaults.backend_delay, integer=False
            ),
            cache_size=int(_number(environ, "SHOP_CACHE_SIZE", defaults.cache_size, integer=True)),
            cache_ttl=_number(environ, "SHOP_CACHE_TTL", defaults.cache_ttl, integer=False),
            search_cache_size=int(
                _number(environ, "SHOP_SEARCH_CACHE_SIZE", defaults.search_cache_size, integer=True)
            ),
            catalog_size=int(
                _number(environ, "SHOP_CATALOG_SIZE", defaults.catalog_size, integer=True)
            ),
        )
