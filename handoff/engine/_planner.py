"""Successor choice and key split: which peers take a draining node's state, and which keys
go to which of them."""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence

from handoff.membership import Peer

__all__ = ("Router", "release_key", "successor_tiers")

_RUNS = re.compile(r"(\d+)")


def release_key(release: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders releases naturally: ``v2 < v10``, ``deployment-01H.. < 01J..``.

    Numbers compare as numbers and text as text, so release ids built from versions,
    timestamps or ULIDs (Fly's ``deployment-<ULID>``) sort from older to newer.
    """
    parts: list[tuple[int, int | str]] = []
    for index, run in enumerate(_RUNS.split(release)):
        if not run:
            continue
        parts.append((0, int(run)) if index % 2 else (1, run))
    return tuple(parts)


def successor_tiers(local_release: str, peers: Sequence[Peer]) -> list[list[Peer]]:
    """Serving peers grouped by preference: newer release, then the same, then older.

    Empty tiers are left out; peers within a tier are sorted by name.
    """
    mine = release_key(local_release)
    newer: list[Peer] = []
    same: list[Peer] = []
    older: list[Peer] = []
    for peer in sorted(peers, key=lambda p: p.name):
        if not peer.serving:
            continue
        theirs = release_key(peer.release)
        (newer if theirs > mine else same if theirs == mine else older).append(peer)
    return [tier for tier in (newer, same, older) if tier]


_MASK = (1 << 64) - 1


def _mix(value: int) -> int:
    # splitmix64's finaliser: turns correlated inputs (a key hash xor a salt) into
    # independent-looking scores, which rendezvous hashing needs for an even split.
    value = (value + 0x9E3779B97F4A7C15) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)


class Router:
    """Rendezvous (highest random weight) hashing of keys onto successors.

    Each key goes to exactly one successor; when a successor leaves, only its keys move,
    spread over the others. Python's ``hash`` of the key is enough: routing only has to be
    stable within this process's drain (receivers never recompute it).
    """

    def __init__(self, names: Sequence[str]) -> None:
        self._salts = [_mix(hash(("handoff-route", name)) & _MASK) for name in names]

    def route(self, key: Hashable) -> int:
        """Index (into the names given) of the successor for ``key``."""
        salts = self._salts
        if len(salts) == 1:
            return 0
        hashed = hash(key) & _MASK
        scores = [_mix(hashed ^ salt) for salt in salts]
        return scores.index(max(scores))
