"""Successor choice and key split: which peers take a draining node's state, and which keys
go to which of them."""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence

from handoff.membership import Peer

__all__ = ("Router", "release_key", "successor_tiers")

_TOKENS = re.compile(r"[A-Za-z0-9]+")
_PREFIXED_NUMBER = re.compile(r"([A-Za-z]*)(\d+)")

ReleaseKey = tuple[tuple[int, str, int], ...]


def release_key(release: str) -> ReleaseKey:
    """Sort key that orders releases from older to newer.

    The release is cut into alphanumeric tokens. A token that is a number, or letters then
    a number (``v2``, ``rc10``, ``2024``), compares by that number, so ``v2 < v10`` and
    ``1.2.9 < 1.2.10``; any other token compares as text, which keeps fixed-width ids such
    as the ULID in Fly's ``deployment-01JZ...`` (or a hex timestamp) in time order.
    """
    key: list[tuple[int, str, int]] = []
    for token in _TOKENS.findall(release):
        match = _PREFIXED_NUMBER.fullmatch(token)
        if match is not None:
            key.append((0, match.group(1), int(match.group(2))))
        else:
            key.append((1, token, 0))
    return tuple(key)


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
