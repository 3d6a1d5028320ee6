"""The secure channel: every frame after the handshake authenticated and encrypted.

After both cookie proofs are verified, each side holds two ChaCha20-Poly1305 keys, one per
direction, derived with HKDF from the stretched cookie, an ephemeral X25519 exchange (so a
cookie leaked later does not open recorded sessions) and the hash of the handshake transcript
(so the keys belong to this one handshake). Each frame's nonce is its sequence number in its
direction, and its length prefix is authenticated data: a frame that was altered, replayed,
reordered, dropped (the next one then has the wrong number) or injected fails to open, and
the connection ends. The primitives come from ``cryptography``; nothing here is a cipher.
"""

from __future__ import annotations

import hashlib
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from handoff._errors import FrameAuthenticationError, LocalProtocolError, ProtocolError
from handoff._keys import ClusterKey

__all__ = (
    "PUBLIC_KEY_SIZE",
    "TAG_SIZE",
    "Ephemeral",
    "FrameCipher",
    "SessionKeys",
    "session_keys",
)

PUBLIC_KEY_SIZE = 32
TAG_SIZE = 16
_HEADER = struct.Struct(">I")
_NONCE_PREFIX = b"\0\0\0\0"
_MAX_SEQUENCE = 2**64 - 1


class Ephemeral:
    """One side's X25519 key pair for one handshake; thrown away with the connection."""

    __slots__ = ("_private", "public")

    def __init__(self, secret: bytes) -> None:
        # ``secret`` is 32 fresh random bytes (X25519 clamps them into a private key).
        self._private = X25519PrivateKey.from_private_bytes(secret)
        self.public = self._private.public_key().public_bytes_raw()

    def exchange(self, peer_public: bytes) -> bytes:
        """The shared secret with the peer's public key."""
        try:
            peer = X25519PublicKey.from_public_bytes(peer_public)
            shared = self._private.exchange(peer)
        except ValueError as exc:
            # An all-zero result (a low-order point) is refused by cryptography.
            raise ProtocolError(f"the peer's key exchange value is unusable: {exc}") from None
        return shared


class SessionKeys:
    """The two directions' keys of one connection."""

    __slots__ = ("client_to_server", "server_to_client")

    def __init__(self, client_to_server: bytes, server_to_client: bytes) -> None:
        self.client_to_server = client_to_server
        self.server_to_client = server_to_client

    def __repr__(self) -> str:
        return "SessionKeys(...)"


def session_keys(key: ClusterKey, shared: bytes, transcript: bytes) -> SessionKeys:
    """Derive both directions' keys from the cluster key, the X25519 result and the
    transcript (its SHA-256 is the HKDF salt)."""
    context = hashlib.sha256(transcript).digest()
    return SessionKeys(
        key.derive("channel client-to-server", context=context, secret=shared),
        key.derive("channel server-to-client", context=context, secret=shared),
    )


class FrameCipher:
    """Seals or opens the frames of one direction, in order.

    A sealed frame is ``length || ciphertext || tag`` where ``length`` counts ciphertext and
    tag and is authenticated with them; the nonce is the frame's sequence number.
    """

    __slots__ = ("_aead", "_sequence")

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._sequence = 0

    def _nonce(self) -> bytes:
        if self._sequence > _MAX_SEQUENCE:
            raise LocalProtocolError("the channel's sequence numbers are used up; reconnect")
        nonce = _NONCE_PREFIX + self._sequence.to_bytes(8, "big")
        self._sequence += 1
        return nonce

    def seal(self, payload: bytes) -> bytes:
        """The whole frame (header included) carrying ``payload``."""
        header = _HEADER.pack(len(payload) + TAG_SIZE)
        return header + self._aead.encrypt(self._nonce(), payload, header)

    def open(self, sealed: bytes) -> bytes:
        """The payload of the next frame's body (what followed its header)."""
        header = _HEADER.pack(len(sealed))
        sequence = self._sequence
        try:
            return self._aead.decrypt(self._nonce(), sealed, header)
        except InvalidTag:
            raise FrameAuthenticationError(
                f"frame {sequence} failed authentication: tampered, replayed, reordered or "
                "injected on the way (it was not sealed by the peer with this session's key)"
            ) from None
