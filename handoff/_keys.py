"""Keys derived from the cluster's cookie.

The cookie is stretched once per process with scrypt (:func:`cluster_key`), so that a
captured handshake or a snapshot file lets an attacker test cookie guesses only at
milliseconds per guess, never at hash speed. Everything keyed by the cookie (handshake proofs,
the secure channel's session keys, snapshot authentication) is derived from that stretched
key with HKDF under its own label (:meth:`ClusterKey.derive`), so no two uses share a key.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ("SCRYPT_N", "ClusterKey", "cluster_key", "cookie_weakness")

# scrypt cost: 2**14 x 8 x 128 bytes = 16 MiB of memory and ~50-80 ms of one core per guess.
# Fixed, not configurable: every node of a cluster must derive the same key.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
KEY_SIZE = 32
_SALT_PREFIX = b"warm-handoff cookie v2\0"


class ClusterKey:
    """The stretched cookie of one cluster. ``repr`` never shows key material."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"a cluster key is {KEY_SIZE} bytes, not {len(key)}")
        self._key = key

    def derive(
        self, label: str, *, context: bytes = b"", secret: bytes = b"", length: int = KEY_SIZE
    ) -> bytes:
        """A subkey for one purpose (``label``), bound to ``context`` (e.g. a transcript
        hash) and mixed with ``secret`` (e.g. an ephemeral Diffie-Hellman result)."""
        hkdf = HKDF(
            algorithm=hashes.SHA256(),
            length=length,
            salt=context or None,
            info=b"warm-handoff " + label.encode(),
        )
        return hkdf.derive(self._key + secret)

    def __repr__(self) -> str:
        return "ClusterKey(...)"


@functools.lru_cache(maxsize=16)
def cluster_key(cookie: bytes, cluster: str) -> ClusterKey:
    """Stretch ``cookie`` for ``cluster`` (scrypt; cached, so each process pays it once).

    The cluster name salts the derivation: one cookie shared by two clusters still gives
    them different keys, and a precomputed table of guesses serves one cluster only.
    """
    if not cookie:
        raise ValueError("an empty cookie cannot authenticate anything")
    stretched = hashlib.scrypt(
        cookie,
        salt=_SALT_PREFIX + cluster.encode(),
        n=SCRYPT_N,
        r=SCRYPT_R,
        p=SCRYPT_P,
        maxmem=64 * 1024 * 1024,
        dklen=KEY_SIZE,
    )
    return ClusterKey(stretched)


# Words that mark a cookie someone typed in (or copied from an example) rather than generated.
_PLACEHOLDERS = re.compile(
    r"changeme|change-me|change_me|password|passw0rd|secret|example|default|cookie|"
    r"letmein|qwerty|123456|abcdef|test|dummy|sample|handoff",
    re.IGNORECASE,
)
MIN_COOKIE_BITS = 80


def _estimated_bits(cookie: bytes) -> float:
    # Generous to the cookie on purpose: the size of the character classes it draws from,
    # capped by a few times the distinct symbols it actually uses, times its length.
    text = cookie.decode("latin-1")
    alphabet = 0
    if all(c.isascii() and c.isprintable() for c in text):
        alphabet += 26 if any(c.islower() for c in text) else 0
        alphabet += 26 if any(c.isupper() for c in text) else 0
        alphabet += 10 if any(c.isdigit() for c in text) else 0
        alphabet += 32 if any(not c.isalnum() for c in text) else 0
    else:
        alphabet = 256
    distinct = len(set(cookie))
    return len(cookie) * math.log2(max(2, min(alphabet, 3 * distinct)))


def cookie_weakness(cookie: bytes) -> str | None:
    """Why ``cookie`` looks guessable, or ``None`` when it looks generated.

    A heuristic: it catches what a person typed or copied from an example (placeholder words,
    few distinct characters, a short run of one character class), not every weak secret.
    """
    match = _PLACEHOLDERS.search(cookie.decode("latin-1"))
    if match:
        return f"it contains the word {match.group(0)!r}, as example and typed cookies do"
    if len(set(cookie)) < 10:
        return f"it uses only {len(set(cookie))} distinct characters"
    bits = _estimated_bits(cookie)
    if bits < MIN_COOKIE_BITS:
        return f"it holds about {bits:.0f} bits of entropy at most (want {MIN_COOKIE_BITS})"
    return None
