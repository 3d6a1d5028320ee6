"""Successor choice and key split: which peers take a draining node's state, and which keys
go to which of them."""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence

from handoff.membership import Peer

__all__ = ("Router", "compare_releases", "release_key", "successor_tiers")

_TOKENS = re.compile(r"[A-Za-z0-9]+")
_PREFIXED_NUMBER = re.compile(r"([A-Za-z]*)(\d+)")
# A ULID: 48 bits of milliseconds then 80 random bits, in Crockford's base 32.
_ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}", re.IGNORECASE)

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


def compare_releases(release: str, other: str) -> int | None:
    """-1, 0 or 1 when ``release`` is older than, the same as or newer than ``other``;
    ``None`` when their names do not tell (git SHAs such as ``f00dbee`` and ``a11ce55``).

    Names tell when, at the first token where they differ, both tokens are numbers with the
    same letter prefix (``v2``/``v10``, ``2024-01-05``/``2024-01-10``) or both are ULIDs
    (Fly's ``deployment-01JZ...``, time-ordered by construction); or when one name is the
    other plus more tokens (``1.2`` < ``1.2.1``).
    """
    if release == other:
        return 0
    mine, theirs = release_key(release), release_key(other)
    for a, b in zip(mine, theirs, strict=False):
        if a == b:
            continue
        numbers = a[0] == b[0] == 0 and a[1] == b[1]
        ulids = a[0] == b[0] == 1 and bool(_ULID.fullmatch(a[1])) and bool(_ULID.fullmatch(b[1]))
        if numbers or ulids:
            return -1 if a < b else 1
        return None
    if len(mine) == len(theirs):
        return None  # the same tokens, other separators: nothing to go by
    return -1 if len(mine) < len(theirs) else 1


def successor_tiers(
    local_release: str, peers: Sequence[Peer], *, local_started_at: float = 0.0
) -> list[list[Peer]]:
    """Serving peers grouped by preference: newer, then the same release, then older.

    Draining peers are left out (they are leaving too). Where release names do not compare
    (:func:`compare_releases`), a peer that started after this node counts as newer - the
    fresh node of a new deploy - and one that started before it as older. Empty tiers are
    left out; peers within a tier are sorted by name.
    """
    newer: list[Peer] = []
    same: list[Peer] = []
    older: list[Peer] = []
    for peer in sorted(peers, key=lambda p: p.name):
        if not peer.serving:
            continue
        order = compare_releases(peer.release, local_release)
        if order is None:
            order = 1 if peer.started_at > local_started_at else -1
        (newer if order > 0 else same if order == 0 else older).append(peer)
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
