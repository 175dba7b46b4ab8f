"""The metrics listener (``grpcbridge.server.http.HttpServer``): one request per connection,
read and answered within its bound. A client that sends nothing, or that asks for an answer
and never reads it, is dropped at the bound: neither holds a task or a socket of the bridge
past it, nor delays ``close()``."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from grpcbridge.core.target import parse_address
from grpcbridge.server.http import HttpServer

from support import MiB, eventually, timing

#: The bound under test, made short so the test need not wait the default 10 s.
BOUND = 0.5
#: /metrics answers with this much: far more than the loopback socket buffers of a client
#: that reads nothing, so the listener's flush of it cannot finish.
ANSWER_BYTES = 16 * MiB


class _HugeMetric(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("huge", "a metric with a long label", labels=["text"])
        family.add_metric(["x" * ANSWER_BYTES], 1.0)
        yield family


@pytest.fixture
async def listener() -> AsyncIterator[tuple[HttpServer, tuple[str, int]]]:
    registry = CollectorRegistry()
    registry.register(_HugeMetric())

    async def ready() -> str | None:
        return None

    server = HttpServer(registry, ready)
    server.TIMEOUT = BOUND
    address = await server.start(parse_address("127.0.0.1:0", what="metrics",
                                               allow_port_zero=True))
    try:
        yield server, address
    finally:
        await server.close()


def _client(address: tuple[str, int]) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    sock.connect(address)
    return sock


def _serving(server: HttpServer) -> int:
    return len(server._tasks)  # the connections the listener still holds


async def test_a_client_that_never_reads_its_answer_is_dropped_at_the_bound(
        listener: tuple[HttpServer, tuple[str, int]], leak_check: None) -> None:
    server, address = listener
    with _client(address) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await eventually(lambda: _serving(server) == 1, message="the request was not taken")
        await eventually(lambda: _serving(server) == 0, 5 * BOUND,
                         message="a client not reading its answer held the listener")
        # Dropped, not answered: what the client can still read ends short of the answer.
        sock.setblocking(False)
        received = 0
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timing(10)):
                while chunk := await loop.sock_recv(sock, 1 << 20):
                    received += len(chunk)
        except ConnectionResetError:
            pass
        assert 0 < received < ANSWER_BYTES, received  # the answer began, and was cut


async def test_a_silent_client_is_dropped_at_the_bound(
        listener: tuple[HttpServer, tuple[str, int]], leak_check: None) -> None:
    server, address = listener
    with _client(address) as sock:
        await eventually(lambda: _serving(server) == 1, message="the connection was not taken")
        await eventually(lambda: _serving(server) == 0, 5 * BOUND,
                         message="a client that sent nothing held the listener")
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timing(10)):
                assert await loop.sock_recv(sock, 1024) == b""  # closed, nothing answered
        except ConnectionResetError:
            pass


async def test_close_does_not_wait_for_a_client_that_never_reads(
        listener: tuple[HttpServer, tuple[str, int]], leak_check: None) -> None:
    server, address = listener
    server.TIMEOUT = 60.0  # close() must not lean on the bound
    with _client(address) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await eventually(lambda: _serving(server) == 1, message="the request was not taken")
        await asyncio.sleep(0.1)
        async with asyncio.timeout(timing(5)):
            await server.close()
        assert _serving(server) == 0
