"""What a node tracks: a named object, its adapter, its schema version and its spread."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from handoff._adapter import Adapter

__all__ = ("ALL", "SPLIT", "SPREADS", "Spread", "Tracked")

Spread = Literal["split", "all"]
SPLIT: Final = "split"
"""Each key goes to exactly one successor (rendezvous hashing): for key-affine balancers,
and the only spread of state that moves ownership (counters, actors)."""
ALL: Final = "all"
"""Every successor gets every key (as far as it fits): for round-robin balancers."""
SPREADS: Final = (SPLIT, ALL)


@dataclass(frozen=True, slots=True)
class Tracked:
    """One namespace: ``obj`` handed off through ``adapter`` at schema ``version``;
    ``validate(key, value)`` (if any) decides which incoming records it takes. ``spread``
    says how a drain places its keys over several successors; ``None`` is the default
    (:attr:`effective_spread`)."""

    name: str
    obj: Any
    adapter: Adapter
    version: int
    validate: Callable[[Any, Any], bool] | None = None
    spread: Spread | None = None

    @property
    def effective_spread(self) -> Spread:
        """``all`` for state that is copied (caches, mappings), unless ``split`` was asked;
        always ``split`` for state that moves ownership (a copy would count twice)."""
        if self.adapter.moves_ownership:
            return SPLIT
        return self.spread if self.spread is not None else ALL
