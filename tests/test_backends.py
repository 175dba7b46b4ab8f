"""GrpcioBackend's private socket directory: it never outlives a refused port."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from grpcbridge import ConfigError
from grpcbridge.backends import GrpcioBackend


@pytest.fixture
def temp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Where ``tempfile.mkdtemp`` creates the backend's directory during the test."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield tmp_path


def test_directory_removed_when_grpcio_raises(temp_root: Path) -> None:
    deep = temp_root / ("d" * 120)  # a unix socket path longer than 107 characters
    deep.mkdir()
    tempfile.tempdir = str(deep)
    server = grpc.server(ThreadPoolExecutor(1))
    try:
        with pytest.raises(RuntimeError, match="Failed to bind"):
            GrpcioBackend(server)
    finally:
        server.stop(None)
    assert list(deep.iterdir()) == []


class _RefusingServer:
    """Older grpcio releases refuse a unix port by returning 0 instead of raising."""

    def add_insecure_port(self, address: str) -> int:
        assert address.startswith("unix:")
        return 0


def test_directory_removed_when_the_port_is_refused(temp_root: Path) -> None:
    with pytest.raises(ConfigError, match="refused the unix port; attach it before"):
        GrpcioBackend(_RefusingServer())
    assert list(temp_root.iterdir()) == []


def test_directory_private_while_serving_and_removed_on_close(temp_root: Path) -> None:
    server = grpc.server(ThreadPoolExecutor(1))
    try:
        backend = GrpcioBackend(server)
        directory = Path(backend.directory)
        assert directory.parent == temp_root
        assert directory.stat().st_mode & 0o777 == 0o700
        asyncio.run(backend.close())
        assert not directory.exists()
    finally:
        server.stop(None)
