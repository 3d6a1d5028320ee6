"""Text shown to people: what came from a peer, made safe, and durations, made readable.

A peer chooses names, releases and reasons. Written raw, they could carry ANSI escapes that
rewrite a terminal, newlines that forge log lines, or megabytes that flood a log. Every
place that shows peer-supplied text passes it through :func:`peer_text` first.

Every duration the CLI and the reports print goes through :func:`duration`, so they read
alike ("4 ms", "2.5 s") rather than "0.004 s" here and "0.00 s" there.
"""

from __future__ import annotations

__all__ = ("PEER_TEXT_LIMIT", "duration", "peer_text")

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


def duration(seconds: float, *, signed: bool = False) -> str:
    """``seconds`` for people: milliseconds below a second ("4 ms", "0.3 ms", "250 ms"),
    seconds with at most two decimals above ("1.5 s", "30 s"). ``signed`` adds "+" to a
    positive value (a clock offset)."""
    sign = "-" if seconds < 0 else ("+" if signed else "")
    magnitude = abs(seconds)
    millis = magnitude * 1000
    # Three significant digits below a second; 999.5 ms and up would round to "1e+03".
    if millis < 999.5:
        text = f"{millis:.3g}" if millis >= 1 else f"{millis:.1g}"
        return f"{sign}{text} ms"
    text = f"{magnitude:.2f}".rstrip("0").rstrip(".")
    return f"{sign}{text} s"
