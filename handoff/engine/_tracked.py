"""What a node tracks: a named object, its adapter and its schema version."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from handoff._adapter import Adapter

__all__ = ("Tracked",)


@dataclass(frozen=True, slots=True)
class Tracked:
    """One namespace: ``obj`` handed off through ``adapter`` at schema ``version``;
    ``validate(key, value)`` (if any) decides which incoming records it takes."""

    name: str
    obj: Any
    adapter: Adapter
    version: int
    validate: Callable[[Any, Any], bool] | None = None
