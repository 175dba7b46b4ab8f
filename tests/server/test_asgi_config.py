"""BridgeApp applies every BridgeConfig setting that can apply under ASGI and refuses the
rest at construction, saying where each lives (issue 9). The applied ones that are not
covered elsewhere (drain, memory budget, host guard, message size) run under real uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import websockets
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from websockets.asyncio.client import ClientConnection, connect

from grpcbridge import BridgeApp, BridgeConfig, ConfigError
from grpcbridge.server.asgi import APPLIED, REFUSED

from support import eventually

MiB = 1024 * 1024


# ------------------------------------------------------------------ refused at construction


def test_every_config_field_is_applied_or_refused() -> None:
    fields = {field.name for field in dataclasses.fields(BridgeConfig) if field.init}
    assert not set(APPLIED) & set(REFUSED)
    assert set(APPLIED) | set(REFUSED) == fields, (
        "a BridgeConfig field is neither applied nor refused by BridgeApp: "
        f"{sorted(fields - set(APPLIED) - set(REFUSED))}")


@pytest.fixture
def pem_files(tmp_path: Path) -> dict[str, str]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not checked until used\n")
    key.write_text("not checked until used\n")
    return {"certfile": str(cert), "keyfile": str(key)}


REFUSALS: list[tuple[str, Any, str]] = [
    ("listen", "0.0.0.0:9000", "uvicorn --host/--port"),
    ("handshake_timeout", 3.0, "reverse proxy"),
    ("ping_interval", 5.0, "uvicorn --ws-ping-interval"),
    ("ping_interval", 0.0, "uvicorn --ws-ping-interval"),
    ("idle_timeout", 0.0, "uvicorn --ws-ping-timeout"),
    ("compression", True, "uvicorn --ws-per-message-deflate"),
    ("metrics_listen", "127.0.0.1:9464", "prometheus_client.make_asgi_app"),
    ("allow_remote_metrics", True, "prometheus_client.make_asgi_app"),
    ("static", "dir", "starlette.staticfiles.StaticFiles"),
]


@pytest.mark.parametrize(("field", "value", "hint"), REFUSALS,
                         ids=[f"{f}={v!r}" for f, v, _ in REFUSALS])
def test_refused_field_names_itself_and_where_it_lives(field: str, value: Any, hint: str,
                                                       tmp_path: Path) -> None:
    if field == "static":
        value = {"/files/": str(tmp_path)}
    config = BridgeConfig(backend="127.0.0.1:50051", **{field: value})
    with pytest.raises(ConfigError) as error:
        BridgeApp(config)
    message = str(error.value)
    assert f"{field}=" in message and hint in message, message
    assert "defaults" in message


def test_tls_is_refused_with_the_uvicorn_flags(pem_files: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as error:
        BridgeApp(BridgeConfig(backend="127.0.0.1:50051", **pem_files))
    message = str(error.value)
    assert "certfile=" in message and "keyfile=" in message
    assert "uvicorn --ssl-certfile/--ssl-keyfile" in message


def test_every_refused_field_is_reported_at_once() -> None:
    config = BridgeConfig(backend="127.0.0.1:50051", listen="127.0.0.1:0", ping_interval=5,
                          idle_timeout=30, compression=True)
    with pytest.raises(ConfigError) as error:
        BridgeApp(config)
    message = str(error.value)
    for field in ("listen=", "ping_interval=", "idle_timeout=", "compression="):
        assert field in message, message


def test_defaults_and_applied_settings_are_accepted() -> None:
    # Refused fields at their (explicitly written) defaults are fine, and so is every
    # applied setting.
    app = BridgeApp(BridgeConfig(
        backend="127.0.0.1:50051", listen="127.0.0.1:8080", ping_interval=20.0,
        idle_timeout=60.0, handshake_timeout=10.0, compression=False, static={},
        path="/api/grpc", backend_connect_timeout=0.5, allowed_origins=["https://a.example"],
        allowed_hosts=["bridge.example"], subprotocols=["grpcbridge", "other"],
        max_message_bytes=MiB, buffer_bytes=64 * 1024, client_memory_budget=2 * MiB,
        memory_budget=8 * MiB, max_connections=5, max_connections_per_client=2,
        max_upgrades_per_minute=10, trusted_proxies=["10.0.0.0/8"], drain_timeout=1.5))
    # backend_connect_timeout reaches the backend that dials.
    assert app.backend.connect_timeout == 0.5  # type: ignore[attr-defined]
    assert (app.budget.per_client, app.budget.total) == (2 * MiB, 8 * MiB)


def test_config_error_is_raised_before_anything_starts() -> None:
    # No backend object was made, no task started: the error is the constructor's.
    with pytest.raises(ConfigError):
        BridgeApp(BridgeConfig(backend="127.0.0.1:50051", compression=True))


# ------------------------------------------------------------------- behaviour under uvicorn


class _QuietUvicorn(uvicorn.Server):
    """uvicorn without its signal handlers (pytest keeps Ctrl-C)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serving(app: BridgeApp) -> AsyncIterator[str]:
    """``app`` mounted in Starlette under uvicorn on a free port; yields the ws:// URL."""
    server = _QuietUvicorn(uvicorn.Config(
        Starlette(routes=[WebSocketRoute(app.config.path, app)]), host="127.0.0.1", port=0,
        ws="websockets-sansio", ws_per_message_deflate=False, lifespan="off",
        log_level="warning", timeout_graceful_shutdown=2))
    task = asyncio.get_running_loop().create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        assert not task.done() and time.monotonic() < deadline, "uvicorn did not start"
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"ws://127.0.0.1:{port}{app.config.path}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        await app.close(drain_timeout=0)


class _Backend:
    """A TCP backend that echoes (``read=True``) or accepts and never reads."""

    def __init__(self, *, read: bool) -> None:
        self.read = read
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError):
            if self.read:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            else:
                await asyncio.Event().wait()

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        for writer in self.writers:
            writer.transport.abort()
        self.server.close()
        await self.server.wait_closed()


async def echo(ws: ClientConnection, data: bytes) -> None:
    await ws.send(data)
    got = b""
    while len(got) < len(data):
        message = await asyncio.wait_for(ws.recv(), 5)
        assert isinstance(message, bytes)
        got += message
    assert got == data


async def test_drain_timeout_lets_open_tunnels_finish_then_closes_them_1001() -> None:
    async with _Backend(read=True) as backend:
        app = BridgeApp(BridgeConfig(backend=backend, drain_timeout=0.6))
        async with serving(app) as url, connect(url, compression=None) as ws:
            await echo(ws, b"before")
            started = time.monotonic()
            closing = asyncio.get_running_loop().create_task(app.close())
            await eventually(lambda: app._closing, message="close() did not begin")
            # During the drain: the open tunnel still relays; new ones get 503.
            await echo(ws, b"during the drain")
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with connect(url, compression=None, open_timeout=5):
                    pass
            assert refused.value.response.status_code == 503
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            await asyncio.wait_for(closing, 10)
            elapsed = time.monotonic() - started
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
                1001, "server shutting down")
            assert 0.6 <= elapsed < 5, elapsed
            assert app.metrics.registry.get_sample_value(
                "grpcbridge_upgrades_rejected_total", {"reason": "shutdown"}) == 1


async def test_drain_ends_as_soon_as_the_tunnels_do() -> None:
    async with _Backend(read=True) as backend:
        app = BridgeApp(BridgeConfig(backend=backend, drain_timeout=30))
        async with serving(app) as url:
            ws = await connect(url, compression=None)
            await echo(ws, b"x")
            started = time.monotonic()
            closing = asyncio.get_running_loop().create_task(app.close())
            await asyncio.sleep(0.2)
            assert not closing.done()  # waiting for the tunnel
            await ws.close()
            await asyncio.wait_for(closing, 10)
            assert time.monotonic() - started < 5
            assert ws.close_code == 1000


async def test_lifespan_shutdown_applies_the_drain_and_startup_after_close_fails() -> None:
    app = BridgeApp(BridgeConfig(backend="127.0.0.1:50051", drain_timeout=0))
    sent: list[dict[str, Any]] = []
    events = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

    async def receive() -> dict[str, Any]:
        return events.pop(0)

    async def send(message: Any) -> None:
        sent.append(dict(message))

    await app({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete",
                                         "lifespan.shutdown.complete"]
    assert app._closed.is_set()
    sent.clear()
    events.append({"type": "lifespan.startup"})
    await app({"type": "lifespan"}, receive, send)
    assert sent[0]["type"] == "lifespan.startup.failed"
    assert "closed" in sent[0]["message"] and "new BridgeApp" in sent[0]["message"]


async def test_client_memory_budget_closes_the_tunnel_that_grows_past_it() -> None:
    # One tunnel can hold buffer_bytes + one message towards a backend that does not read;
    # the budget holds one such tunnel, so the client's second one is closed with 1008.
    message = 256 * 1024
    config: dict[str, Any] = {"max_message_bytes": message, "buffer_bytes": 64 * 1024,
                              "client_memory_budget": message + 64 * 1024}
    async with _Backend(read=False) as backend:
        app = BridgeApp(BridgeConfig(backend=backend, **config))
        async with serving(app) as url:
            chunk = b"\0" * message

            async def fill(ws: ClientConnection, seconds: float) -> None:
                # Send until sends stall (the backend and kernel buffers are full).
                with contextlib.suppress(TimeoutError, websockets.ConnectionClosed):
                    async with asyncio.timeout(seconds):
                        while True:
                            await ws.send(chunk)

            first = await connect(url, compression=None)
            await fill(first, 1.5)
            assert first.close_code is None  # alone, it stays within the budget
            assert app.budget.held > 0
            second = await connect(url, compression=None)
            await fill(second, 3)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(second.wait_closed(), 5)
            assert second.close_code == 1008
            assert second.close_reason == "client memory budget exceeded"
            assert first.close_code is None
            first.transport.abort()
            await eventually(lambda: not app.active_tunnels)  # noticed by the probe
            assert app.budget.held == 0 and app.budget.tracked_clients == 0
        assert app.metrics.registry.get_sample_value(
            "grpcbridge_tunnels_closed_total", {"code": "1008"}) == 1


async def test_max_message_bytes_closes_1009() -> None:
    async with _Backend(read=True) as backend:
        app = BridgeApp(BridgeConfig(backend=backend, max_message_bytes=4096))
        async with serving(app) as url, connect(url, compression=None) as ws:
            await echo(ws, b"a" * 4096)
            await ws.send(b"a" * 4097)
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            assert ws.close_code == 1009


async def test_allowed_hosts_guard_applies() -> None:
    app = BridgeApp(BridgeConfig(backend="127.0.0.1:50051", allowed_hosts=["bridge.example"]))
    async with serving(app) as url:
        port = int(url.split(":")[2].split("/")[0])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /grpc HTTP/1.1\r\nHost: evil.example\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n")
        status = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        assert status.split()[1] == b"403", status


async def test_relayed_bytes_are_reported_while_the_tunnel_is_open() -> None:
    # The keepalive sweep runs while tunnels are open: it reports bytes before the tunnel
    # ends (not only at its end) and stops with the last tunnel.
    async with _Backend(read=True) as backend:
        app = BridgeApp(BridgeConfig(backend=backend))
        relayed = {direction: 0.0 for direction in ("client_to_backend", "backend_to_client")}

        def reported() -> bool:
            for direction in relayed:
                relayed[direction] = app.metrics.registry.get_sample_value(
                    "grpcbridge_bytes_total", {"direction": direction}) or 0.0
            return all(relayed.values())

        async with serving(app) as url, connect(url, compression=None) as ws:
            await echo(ws, b"counted" * 100)
            await eventually(reported, message="no bytes reported while the tunnel is open")
            assert relayed == {"client_to_backend": 700, "backend_to_client": 700}
            assert app._reporter is not None and not app._reporter.done()
            reporter = app._reporter
        await eventually(lambda: app._reporter is None and reporter.done(),
                         message="the sweep outlived the last tunnel")


async def test_a_tunnel_cancelled_at_every_await_releases_its_budget() -> None:
    """anyio's cancellation is delivered again at every await: the tunnel's cleanup (which
    awaits its own tasks) is cut short, and the client's memory budget must still be
    released and the backend connection closed."""
    backend_closed = asyncio.Event()

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"y" * 300_000)  # more than the client (who never reads) takes
        await reader.read()  # until the bridge closes the connection
        backend_closed.set()
        writer.close()

    server = await asyncio.start_server(flood, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    app = BridgeApp(BridgeConfig(backend=f"127.0.0.1:{port}"))
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    inbox.put_nowait({"type": "websocket.connect"})
    inbox.put_nowait({"type": "websocket.receive", "bytes": b"x" * 1000})
    stuck = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] != "websocket.accept":
            await stuck.wait()  # a client that does not read

    scope = {"type": "websocket", "path": "/grpc", "headers": [(b"host", b"example")],
             "client": ("10.0.0.7", 1234), "query_string": b"", "subprotocols": []}
    task = asyncio.create_task(app(scope, inbox.get, send))  # type: ignore[arg-type]
    try:
        await eventually(lambda: app.budget.held_by("10.0.0.7") > 100_000)
        while not task.done():  # cancelled again at every await, as anyio does
            task.cancel()
            await asyncio.sleep(0)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert app.budget.held_by("10.0.0.7") == 0
        assert app.budget.tracked_clients == 0 and app.active_tunnels == 0
        await asyncio.wait_for(backend_closed.wait(), 10)
    finally:
        stuck.set()
        await app.close()
        server.close()
        await server.wait_closed()
