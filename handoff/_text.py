"""Text that came from a peer (names, releases, reasons), made safe to log and print.

A peer chooses these strings. Written raw, they could carry ANSI escapes that rewrite a
terminal, newlines that forge log lines, or megabytes that flood a log. Every place that
shows peer-supplied text passes it through :func:`peer_text` first.
"""

from __future__ import annotations

__all__ = ("PEER_TEXT_LIMIT", "peer_text")

PEER_TEXT_LIMIT = 200


def peer_text(value: object, limit: int = PEER_TEXT_LIMIT) -> str:
    """``value`` as one printable line: control and non-printable characters escaped
    (``\\x1b``, ``\\n``, ``\\u202e``), cut to ``limit`` characters with a marker."""
    text = value if isinstance(value, str) else str(value)
    escaped = "".join(
        c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii")
        for c in text[:limit]
    )
    if len(text) > limit:
        escaped += f"...(+{len(text) - limit} chars)"
    return escaped
