"""Shared fixtures: async tests run on asyncio (modules may widen this to trio)."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
