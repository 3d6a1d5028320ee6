"""The cookie's stretching and the keys derived from it."""

from __future__ import annotations

import secrets
import time

import pytest

from handoff._keys import ClusterKey, cluster_key, cookie_weakness


def test_stretching_is_deterministic_per_cluster_and_salted_by_it() -> None:
    cookie = secrets.token_bytes(32)
    assert cluster_key(cookie, "a").derive("x") == cluster_key(bytes(cookie), "a").derive("x")
    assert cluster_key(cookie, "a").derive("x") != cluster_key(cookie, "b").derive("x")
    assert cluster_key(cookie, "a").derive("x") != cluster_key(cookie + b"!", "a").derive("x")


def test_labels_and_contexts_separate_subkeys() -> None:
    key = cluster_key(b"k" * 8 + secrets.token_bytes(16), "c")
    derived = {
        key.derive("proof"),
        key.derive("snapshot"),
        key.derive("proof", context=b"t1"),
        key.derive("proof", context=b"t2"),
    }
    assert len(derived) == 4
    assert len(key.derive("x", length=64)) == 64


def test_a_guess_costs_scrypt_not_a_hash() -> None:
    # What an attacker pays per guess: the uncached derivation. It is scrypt with 16 MiB,
    # so even a fast core needs milliseconds; a plain HMAC would take microseconds.
    cookie = secrets.token_bytes(24)
    started = time.process_time()
    cluster_key.__wrapped__(cookie, "timing")
    assert time.process_time() - started > 0.002


def test_key_material_never_in_repr() -> None:
    key = cluster_key(b"z" * 24, "c")
    assert repr(key) == "ClusterKey(...)"
    with pytest.raises(ValueError, match="32 bytes"):
        ClusterKey(b"short")


@pytest.mark.parametrize(
    ("cookie", "why"),
    [
        ("changeme-changeme-changeme", "changeme"),
        ("my-test-cookie-1234", "test"),
        ("aaaaaaaaaaaaaaaaaaaaaaaa", "distinct"),
        ("abcabcabcabcabcabcabcabcab", "distinct"),
        ("qmvzlrtwkpsx", "bits"),
    ],
)
def test_obviously_weak_cookies_are_named(cookie: str, why: str) -> None:
    reason = cookie_weakness(cookie.encode())
    assert reason is not None
    assert why in reason


def test_generated_cookies_pass() -> None:
    for _ in range(50):
        assert cookie_weakness(secrets.token_urlsafe(32).encode()) is None
        assert cookie_weakness(secrets.token_hex(16).encode()) is None
        assert cookie_weakness(secrets.token_bytes(32)) is None


def test_peer_text_is_one_escaped_bounded_line() -> None:
    from handoff._text import peer_text

    assert peer_text("web-1 (v2)") == "web-1 (v2)"
    shown = peer_text("x\x1b[2J\nWARNING forged\r\u202e")
    assert "\x1b" not in shown
    assert "\n" not in shown
    assert "\r" not in shown
    assert "\u202e" not in shown
    assert shown.startswith("x\\x1b[2J\\nWARNING forged")
    long = peer_text("y" * 10_000, limit=50)
    assert long == "y" * 50 + "...(+9950 chars)"


def test_a_node_warns_once_about_a_guessable_cookie(caplog: pytest.LogCaptureFixture) -> None:
    from handoff import Node

    for _ in range(2):
        Node("keys-test", cookie="changeme-changeme-changeme", environ={}, discovery="none")
    warnings = [r for r in caplog.records if "looks guessable" in r.getMessage()]
    assert len(warnings) == 1
    assert "changeme" in warnings[0].getMessage()
    assert "secrets.token_urlsafe" in warnings[0].getMessage()
    assert "changeme-changeme-changeme" not in warnings[0].getMessage()
