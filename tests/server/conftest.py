"""Fixtures shared by the bridge's wire-level tests."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

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


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def grpcbridge_records() -> Iterator[list[logging.LogRecord]]:
    """Every record of the ``grpcbridge`` logger at DEBUG (also when propagation is off)."""
    logger = logging.getLogger("grpcbridge")
    handler = _Records()
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
