"""Length-prefixed msgpack frames with every size and depth bounded before decoding.

A frame is a 4-byte big-endian payload length followed by one msgpack object. The length is
checked against the current limit as soon as its four bytes are in, so a peer that announces
4 GiB is refused without a byte of it being buffered.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from handoff._errors import FrameTooLarge, ProtocolError

__all__ = ("FrameDecoder", "check_depth", "encode_frame", "encode_payload", "size_limits")

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size


def _refuse_ext(code: int, data: bytes) -> object:
    # Extension types are opt-in per message (state records register their own decoders in
    # later layers); a control frame that carries one is malformed.
    raise ProtocolError(f"msgpack extension type {code} is not allowed here")


def check_depth(obj: object, max_depth: int, *, allow_timestamps: bool = True) -> None:
    """Raise :class:`ProtocolError` if containers nest deeper than ``max_depth``.

    Iterative on purpose: a hostile payload must not be able to exhaust the Python stack.
    With ``allow_timestamps=False`` a ``msgpack.Timestamp`` anywhere is refused too: msgpack
    decodes extension type -1 itself, without consulting ``ext_hook``.
    """
    stack: list[tuple[object, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if not allow_timestamps and isinstance(item, msgpack.Timestamp):
            raise ProtocolError("msgpack extension type -1 (timestamp) is not allowed here")
        if isinstance(item, list | tuple):
            if depth > max_depth:
                raise ProtocolError(f"message nests deeper than {max_depth} levels")
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, dict):
            if depth > max_depth:
                raise ProtocolError(f"message nests deeper than {max_depth} levels")
            stack.extend((child, depth + 1) for child in item.values())


def size_limits(size: int) -> dict[str, int]:
    """msgpack's per-object limits for a payload of ``size`` bytes: nothing in it can claim
    more items or bytes than the payload could hold, so a small hostile payload cannot make
    the decoder allocate a large container up front."""
    return {
        "max_str_len": size,
        "max_bin_len": size,
        "max_array_len": size,
        "max_map_len": size // 2,
        "max_ext_len": size,
    }


def encode_payload(obj: object) -> bytes:
    """Serialize one object as a frame payload (msgpack, no header)."""
    payload: bytes = msgpack.packb(obj, use_bin_type=True)
    return payload


def encode_frame(obj: object) -> bytes:
    """Serialize one object as a frame in clear (header + msgpack payload)."""
    payload = encode_payload(obj)
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Turns a byte stream into decoded msgpack objects, one per frame.

    ``max_frame_size`` may be raised after authentication (``set_limit``): before it, a peer
    can make this side buffer only a small handshake-sized frame.
    """

    def __init__(self, max_frame_size: int, max_depth: int) -> None:
        self._buffer = bytearray()
        self._max_frame_size = max_frame_size
        self._max_depth = max_depth
        self._expected: int | None = None

    def set_limits(self, max_frame_size: int, max_depth: int) -> None:
        """Change the frame-size and nesting limits for frames not yet started."""
        self._max_frame_size = max_frame_size
        self._max_depth = max_depth

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        """Append received bytes. Checks the next frame header as soon as it is complete."""
        self._buffer += data
        self._check_header()

    def _check_header(self) -> None:
        if self._expected is None and len(self._buffer) >= HEADER_SIZE:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length == 0:
                raise ProtocolError("empty frame")
            if length > self._max_frame_size:
                # Drop the buffer: nothing of an oversized frame is kept.
                self._buffer.clear()
                raise FrameTooLarge(
                    f"frame of {length} bytes exceeds the limit of {self._max_frame_size} bytes"
                )
            self._expected = length

    def next_payload(self) -> bytes | None:
        """Return the next complete frame's payload, or ``None`` if none is buffered yet."""
        self._check_header()
        length = self._expected
        if length is None or len(self._buffer) < HEADER_SIZE + length:
            return None
        payload = bytes(self._buffer[HEADER_SIZE : HEADER_SIZE + length])
        del self._buffer[: HEADER_SIZE + length]
        self._expected = None
        return payload

    def decode(self, payload: bytes) -> Any:
        """Decode one frame payload (plaintext) within this decoder's limits.

        ``None`` is never a valid message payload (every message is an array), so a frame
        holding msgpack nil is a protocol error.
        """
        try:
            obj = msgpack.unpackb(
                payload,
                raw=False,
                use_list=True,
                strict_map_key=True,
                ext_hook=_refuse_ext,
                **size_limits(len(payload)),
            )
        except ProtocolError:
            raise
        except (ValueError, TypeError, OverflowError) as exc:
            raise ProtocolError(f"undecodable frame: {type(exc).__name__}: {exc}") from None
        if obj is None:
            raise ProtocolError("frame holds no message")
        check_depth(obj, self._max_depth, allow_timestamps=False)
        return obj

    def next_object(self) -> Any:
        """Return the next decoded object, or ``None`` if no complete frame is buffered."""
        payload = self.next_payload()
        return None if payload is None else self.decode(payload)
