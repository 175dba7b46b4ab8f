"""Fixtures shared by the bridge's wire-level tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from support import RawBackend


@pytest.fixture
async def backend() -> AsyncIterator[RawBackend]:
    """A raw TCP backend that records what the bridge relays to it."""
    server = RawBackend()
    await server.start()
    try:
        yield server
    finally:
        await server.close()
