"""Wire tests: a real in-process Bridge, raw WebSocket/TCP clients and real backends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import websockets.asyncio.client
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from grpcbridge import (
    BearerTokenAuth,
    Bridge,
    BridgeConfig,
    Forwarder,
    ForwarderConfig,
    HandshakeRequest,
    InvalidStateError,
    Rejection,
)
from grpcbridge.demo.service import TodoServicer, serve

from support import (
    RawBackend,
    eventually,
    free_port,
    http_get,
    http_request,
    sample,
    timing,
    tls_files,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# SETTINGS (type 4) on stream 0 with SETTINGS_MAX_CONCURRENT_STREAMS = 100.
SETTINGS = b"\x00\x00\x06\x04\x00\x00\x00\x00\x00" + b"\x00\x03\x00\x00\x00\x64"
SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"
PING = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"grpcbrdg"


# ------------------------------------------------------------------------ helpers


@pytest.fixture
def grpc_backend() -> Iterator[tuple[TodoServicer, int]]:
    server, servicer, port = serve("127.0.0.1:0")
    try:
        yield servicer, port
    finally:
        server.stop(grace=None).wait()
        servicer.store.close()


@contextlib.asynccontextmanager
async def running_bridge(backend_port: int, **settings: Any) -> AsyncIterator[Bridge]:
    settings.setdefault("drain_timeout", 0)
    config = BridgeConfig(listen="127.0.0.1:0", backend=f"127.0.0.1:{backend_port}", **settings)
    async with Bridge(config) as bridge:
        yield bridge


def connect(url: str, **kwargs: Any) -> websockets.asyncio.client.connect:
    kwargs.setdefault("open_timeout", 5)
    kwargs.setdefault("close_timeout", 2)
    kwargs.setdefault("ping_interval", None)
    return websockets.asyncio.client.connect(url, compression=None, **kwargs)


async def refused(url: str, **kwargs: Any) -> Response:
    """Open a WebSocket that must be refused; return the HTTP response."""
    with pytest.raises(InvalidStatus) as exc:
        async with connect(url, **kwargs):
            pass
    return exc.value.response


async def receive_until(ws: Any, predicate: Callable[[bytes], bool],
                        within: float = 5.0, data: bytearray | None = None) -> bytes:
    """Receive binary messages (appending to ``data``) until ``predicate(data)``."""
    data = bytearray() if data is None else data
    async with asyncio.timeout(timing(within)):
        while not predicate(bytes(data)):
            message = await ws.recv()
            assert isinstance(message, bytes), "the bridge must send binary messages only"
            data += message
    return bytes(data)


async def closed_code(ws: Any, within: float = 3.0) -> int | None:
    """Wait for the server to close ``ws``; return the close code it sent."""
    async with asyncio.timeout(timing(within)):
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.recv()
    return ws.close_code  # type: ignore[no-any-return]


def h2_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Complete HTTP/2 frames in ``data``: (type, flags, stream id, payload)."""
    frames = []
    offset = 0
    while len(data) - offset >= 9:
        length = int.from_bytes(data[offset:offset + 3], "big")
        if len(data) - offset - 9 < length:
            break
        kind, flags = data[offset + 3], data[offset + 4]
        stream = int.from_bytes(data[offset + 5:offset + 9], "big") & 0x7FFFFFFF
        frames.append((kind, flags, stream, data[offset + 9:offset + 9 + length]))
        offset += 9 + length
    return frames


# --------------------------------------------------------------- (1) byte stream


async def test_split_preface_and_settings_reach_backend_byte_exact(backend: RawBackend) -> None:
    payload = PREFACE + SETTINGS
    async with running_bridge(backend.port) as bridge, connect(bridge.url) as ws:
        for i in range(len(payload)):
            await ws.send(payload[i:i + 1])
            if i % 3 == 0:
                await ws.send(b"")  # empty messages are legal and skipped
        await eventually(lambda: len(backend.received) >= len(payload))
        assert bytes(backend.received) == payload
        assert backend.accepted == 1

        # Many frames in one message are fine too, and so is a fragmented message.
        await ws.send(SETTINGS_ACK + PING)
        await ws.send([PING[:3], b"", PING[3:]])
        expected = payload + SETTINGS_ACK + PING + PING
        await eventually(lambda: len(backend.received) >= len(expected))
        assert bytes(backend.received) == expected

        reply = bytes(range(256)) * 40  # 10 KiB from the backend
        backend.writers[0].write(reply)
        received = await receive_until(ws, lambda data: len(data) >= len(reply))
        assert received == reply
    # Closing the WebSocket closed the backend connection.
    await eventually(lambda: backend.eofs == 1)


async def test_backend_close_closes_websocket_normally(backend: RawBackend) -> None:
    async with running_bridge(backend.port) as bridge, connect(bridge.url) as ws:
        await ws.send(b"x")
        await eventually(lambda: backend.received == b"x")
        backend.writers[0].write(b"bye")
        backend.writers[0].close()
        assert await receive_until(ws, lambda d: len(d) >= 3) == b"bye"
        assert await closed_code(ws) == 1000
        await eventually(lambda: sample(bridge, "grpcbridge_tunnels_closed_total",
                                        code="1000") == 1)
        assert sample(bridge, "grpcbridge_bytes_total", direction="client_to_backend") == 1
        assert sample(bridge, "grpcbridge_bytes_total", direction="backend_to_client") == 3


# ----------------------------------------------------------- (2) real gRPC server


async def test_grpc_server_settings_come_back_through_one_byte_messages(
    grpc_backend: tuple[TodoServicer, int],
) -> None:
    _, port = grpc_backend
    async with running_bridge(port) as bridge, connect(bridge.url) as ws:
        payload = PREFACE + SETTINGS
        for i in range(len(payload)):
            await ws.send(payload[i:i + 1])
            await ws.send(b"")
        received = bytearray()
        first = await receive_until(ws, lambda d: len(d) >= 9, data=received)
        length = int.from_bytes(first[:3], "big")
        assert first[3] == 0x4, f"expected a SETTINGS frame first, got {first[:9]!r}"
        assert first[4] & 0x1 == 0  # the server's own SETTINGS, not an ACK
        assert int.from_bytes(first[5:9], "big") == 0
        assert length % 6 == 0

        def has(kind: int, flag: int) -> Callable[[bytes], bool]:
            return lambda d: any(k == kind and f & flag for k, f, _, _ in h2_frames(d))

        # The server parsed our split SETTINGS: it acknowledges them.
        await receive_until(ws, has(0x4, 0x1), data=received)
        # A PING split into 1-byte messages is answered with the same opaque data.
        for frame in (SETTINGS_ACK, PING):
            for i in range(len(frame)):
                await ws.send(frame[i:i + 1])
        await receive_until(ws, has(0x6, 0x1), data=received)
        frames = h2_frames(bytes(received))
        pongs = [payload for kind, flags, _, payload in frames if kind == 0x6 and flags & 0x1]
        assert pongs == [b"grpcbrdg"]
        assert not [f for f in frames if f[0] == 0x7], "the server sent GOAWAY"


# ------------------------------------------------------------ (3)/(4) wire rules


@pytest.mark.parametrize("text", ["this is text", ["fragmented ", "text"]])
async def test_text_message_closes_with_1003(backend: RawBackend, text: Any) -> None:
    async with running_bridge(backend.port) as bridge, connect(bridge.url) as ws:
        await ws.send(b"ok")
        await eventually(lambda: backend.received == b"ok")
        await ws.send(text)
        assert await closed_code(ws) == 1003
        await eventually(lambda: backend.eofs == 1)
        assert bytes(backend.received) == b"ok"  # nothing of the text reached the backend
        await eventually(lambda: sample(bridge, "grpcbridge_tunnels_closed_total",
                                        code="1003") == 1)


async def test_message_over_limit_closes_with_1009(backend: RawBackend) -> None:
    limit = 64 * 1024
    async with running_bridge(backend.port, max_message_bytes=limit) as bridge:
        async with connect(bridge.url) as ws:
            await ws.send(b"a" * limit)  # exactly at the limit: relayed
            await eventually(lambda: len(backend.received) >= limit)
            assert bytes(backend.received) == b"a" * limit
            await ws.send(b"b" * (limit + 1))
            assert await closed_code(ws) == 1009
        await eventually(lambda: backend.eofs == 1)
        assert b"b" not in backend.received
        await eventually(lambda: sample(bridge, "grpcbridge_tunnels_closed_total",
                                        code="1009") == 1)
        # The limit is per message, not per fragment.
        async with connect(bridge.url) as ws:
            await ws.send([b"c" * (limit // 2), b"c" * (limit // 2), b"c"])
            assert await closed_code(ws) == 1009
        assert b"c" * (limit + 1) not in backend.received


# ------------------------------------------------------------------- (5) origin


async def test_origin_policy(backend: RawBackend) -> None:
    async with running_bridge(backend.port) as bridge:
        response = await refused(bridge.url, origin="http://evil.example")
        assert response.status_code == 403
        assert response.body == b"origin not allowed\n"
        assert sample(bridge, "grpcbridge_upgrades_rejected_total", reason="origin") == 1
        assert bridge.address is not None
        same_host = f"http://127.0.0.1:{bridge.address[1]}"
        async with connect(bridge.url, origin=same_host) as ws:
            await ws.send(b"x")
            await eventually(lambda: backend.received == b"x")
        async with connect(bridge.url):  # no Origin at all (non-browser client)
            pass

    async with running_bridge(backend.port, allowed_origins=["https://app.example.com"]
                              ) as bridge:
        async with connect(bridge.url, origin="https://app.example.com"):
            pass
        assert (await refused(bridge.url, origin="https://other.example.com")).status_code == 403
        assert (await refused(bridge.url, origin="http://app.example.com")).status_code == 403


# ------------------------------------------------------------ (6) abuse limits


async def test_upgrade_rate_limit_is_429_with_retry_after(backend: RawBackend) -> None:
    async with running_bridge(backend.port, max_upgrades_per_minute=2) as bridge:
        for _ in range(2):
            async with connect(bridge.url):
                pass
        response = await refused(bridge.url)
        assert response.status_code == 429
        retry_after = int(response.headers["Retry-After"])
        assert 55 <= retry_after <= 60
        assert sample(bridge, "grpcbridge_upgrades_rejected_total", reason="rate") == 1


async def test_global_connection_cap_is_503(backend: RawBackend) -> None:
    async with running_bridge(backend.port, max_connections=1) as bridge:
        async with connect(bridge.url) as ws:
            response = await refused(bridge.url)
            assert response.status_code == 503
            assert "Retry-After" in response.headers
            await ws.send(b"still relaying")
            await eventually(lambda: backend.received == b"still relaying")
        # The slot is released when the tunnel closes.
        await eventually(lambda: bridge.gate.limiter.active == 0)
        async with connect(bridge.url):
            pass


async def test_per_client_cap_is_429(backend: RawBackend) -> None:
    async with running_bridge(backend.port, max_connections_per_client=1) as bridge:
        async with connect(bridge.url):
            response = await refused(bridge.url)
            assert response.status_code == 429
            assert response.headers["Retry-After"] == "1"
        await eventually(lambda: bridge.connections == 0)
        async with connect(bridge.url):
            pass


async def test_forwarded_for_from_trusted_proxy_is_the_client(backend: RawBackend) -> None:
    async with running_bridge(backend.port, max_connections_per_client=1,
                              trusted_proxies=["127.0.0.0/8"]) as bridge:
        one = {"X-Forwarded-For": "198.51.100.1"}
        async with connect(bridge.url, additional_headers=one):
            # Same peer, but another client behind the proxy: admitted.
            async with connect(bridge.url,
                               additional_headers={"X-Forwarded-For": "198.51.100.2"}):
                assert bridge.active_tunnels == 2
            assert (await refused(bridge.url, additional_headers=one)).status_code == 429


# ---------------------------------------------------------------------- (7) auth


async def test_bearer_token_auth(backend: RawBackend,
                                 grpcbridge_records: list[logging.LogRecord]) -> None:
    token = "s3cret"
    async with running_bridge(backend.port, authenticate=BearerTokenAuth(token)) as bridge:
        response = await refused(bridge.url)
        assert response.status_code == 401
        assert (await refused(bridge.url, additional_headers={
            "Authorization": "Bearer wrong"})).status_code == 403
        assert (await refused(bridge.url, subprotocols=["grpcbridge", "bearer.wrong"]
                              )).status_code == 403
        assert (await refused(bridge.url + "?access_token=wrong")).status_code == 403
        assert sample(bridge, "grpcbridge_upgrades_rejected_total", reason="auth") == 4

        async with connect(bridge.url, additional_headers={"Authorization": f"Bearer {token}"}
                           ) as ws:
            await ws.send(b"header")
            await eventually(lambda: backend.received == b"header")

        async with connect(bridge.url, subprotocols=["grpcbridge", f"bearer.{token}"]) as ws:
            assert ws.subprotocol == "grpcbridge"
            assert ws.response is not None
            echoed = ws.response.headers.get_all("Sec-WebSocket-Protocol")
            assert echoed == ["grpcbridge"]
            assert ws.request is not None

        async with connect(bridge.url, subprotocols=[f"bearer.{token}"]) as ws:
            assert ws.subprotocol is None  # the token entry is never echoed
            assert ws.response is not None
            assert "Sec-WebSocket-Protocol" not in ws.response.headers

        async with connect(f"{bridge.url}?access_token={token}") as ws:
            await ws.send(b"query")
            await eventually(lambda: bytes(backend.received).endswith(b"query"))
        await eventually(lambda: bridge.connections == 0)

    assert any(getattr(r, "event", None) == "upgrade_rejected" for r in grpcbridge_records)
    assert any(getattr(r, "event", None) == "tunnel_closed" for r in grpcbridge_records)
    for record in grpcbridge_records:
        text = record.getMessage() + repr(record.__dict__)
        assert token not in text, f"token leaked in log record: {text}"
        assert "wrong" not in text, f"rejected credentials leaked in log record: {text}"


async def test_async_auth_hook(backend: RawBackend) -> None:
    seen: list[HandshakeRequest] = []

    async def hook(request: HandshakeRequest) -> Rejection | None:
        await asyncio.sleep(0.01)
        seen.append(request)
        if request.header("X-Api-Key") == "k1":
            return None
        return Rejection(418, "no key", label="custom")

    async with running_bridge(backend.port, authenticate=hook) as bridge:
        response = await refused(bridge.url)
        assert response.status_code == 418
        assert response.body == b"no key\n"
        async with connect(bridge.url + "?a=1", additional_headers={"X-Api-Key": "k1"},
                           subprotocols=["grpcbridge", "x"]):
            pass
        request = seen[-1]
        assert request.path == "/grpc"
        assert request.query == "a=1"
        assert request.subprotocols == ("grpcbridge", "x")
        assert request.client == "127.0.0.1"
        assert sample(bridge, "grpcbridge_upgrades_rejected_total", reason="custom") == 1


async def test_failing_auth_hook_is_500_and_releases_the_slot(backend: RawBackend) -> None:
    def hook(request: HandshakeRequest) -> Rejection | None:
        raise RuntimeError("boom")

    async with running_bridge(backend.port, authenticate=hook,
                              max_upgrades_per_minute=0) as bridge:
        assert (await refused(bridge.url)).status_code == 500
        await eventually(lambda: bridge.connections == 0)
        assert bridge.gate.limiter.active == 0
        assert bridge.gate.limiter.tracked_clients == 0
        assert (bridge.budget.held, bridge.budget.tracked_clients) == (0, 0)


# -------------------------------------------------------------- (8) plain HTTP


async def test_plain_http_is_426_and_other_paths_404(backend: RawBackend) -> None:
    async with running_bridge(backend.port) as bridge:
        assert bridge.address is not None
        port = bridge.address[1]
        status, headers, body = await http_get(port, "/grpc")
        assert status == 426
        assert headers["upgrade"] == "websocket"
        assert body.endswith(b"\n") and body.count(b"\n") == 1
        assert b"WebSocket" in body
        assert int(headers["content-length"]) == len(body)

        status, _, _ = await http_request(
            port, "POST /grpc HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert status == 426
        status, _, body = await http_get(port, "/other")
        assert status == 404
        assert b"/grpc" in body and body.count(b"\n") == 1
        assert (await refused(bridge.url.replace("/grpc", "/nope"))).status_code == 404
        await eventually(lambda: bridge.connections == 0)
        assert backend.accepted == 0
        assert sample(bridge, "grpcbridge_upgrades_rejected_total", reason="not_websocket") == 2
        assert sample(bridge, "grpcbridge_upgrades_rejected_total", reason="path") == 2


# ------------------------------------------------------------- (9) backend down


async def test_backend_down_closes_with_1011_quickly() -> None:
    async with running_bridge(free_port()) as bridge:
        started = time.monotonic()
        async with connect(bridge.url) as ws:
            code = await closed_code(ws, within=2)
        assert code == 1011
        assert ws.close_reason == "backend unavailable"
        assert time.monotonic() - started < 2
        assert sample(bridge, "grpcbridge_backend_dial_failures_total", reason="refused") == 1
        await eventually(lambda: sample(bridge, "grpcbridge_tunnels_closed_total",
                                        code="1011") == 1)


# ------------------------------------------------------------ (10) subprotocols


async def test_subprotocol_echo(backend: RawBackend) -> None:
    async with running_bridge(backend.port) as bridge:
        async with connect(bridge.url, subprotocols=["grpcbridge"]) as ws:
            assert ws.subprotocol == "grpcbridge"
        async with connect(bridge.url) as ws:
            assert ws.subprotocol is None
            assert ws.response is not None
            assert "Sec-WebSocket-Protocol" not in ws.response.headers
        async with connect(bridge.url, subprotocols=["unknown"]) as ws:
            assert ws.subprotocol is None

    async with (running_bridge(backend.port, subprotocols=["v2", "v1"]) as bridge,
                connect(bridge.url, subprotocols=["v1", "v2"]) as ws):
        assert ws.subprotocol == "v2"  # the bridge's preference wins


# ---------------------------------------------------------- (11) keepalive/idle


async def test_client_answering_pings_stays_open(backend: RawBackend) -> None:
    # ping_interval=None: the client never pings itself, it only answers the bridge's
    # pings, so the pongs are the only traffic keeping the tunnel alive.
    async with (running_bridge(backend.port, ping_interval=0.2, idle_timeout=0.6) as bridge,
                connect(bridge.url, ping_interval=None) as ws):
        await asyncio.sleep(1.6)
        assert ws.close_code is None
        assert bridge.active_tunnels == 1
        await ws.send(b"alive")
        await eventually(lambda: backend.received == b"alive")


async def test_silent_client_is_pinged_then_closed_1001_after_idle(backend: RawBackend) -> None:
    async with running_bridge(backend.port, ping_interval=0.2, idle_timeout=0.6) as bridge:
        assert bridge.address is not None
        protocol = ClientProtocol(parse_uri(bridge.url))
        protocol.send_request(protocol.connect())
        reader, writer = await asyncio.open_connection(*bridge.address)
        try:
            writer.writelines(protocol.data_to_send())
            frames: list[Frame] = []
            handshake: list[Response] = []
            started = time.monotonic()
            async with asyncio.timeout(3):
                while protocol.close_rcvd is None:
                    data = await reader.read(65536)
                    if not data:
                        break
                    protocol.receive_data(data)
                    for event in protocol.events_received():
                        if isinstance(event, Response):
                            handshake.append(event)
                            started = time.monotonic()
                        elif isinstance(event, Frame):
                            frames.append(event)
                    protocol.data_to_send()  # never answer: no pong, no close reply
            elapsed = time.monotonic() - started
        finally:
            writer.close()
        assert handshake and handshake[0].status_code == 101
        assert protocol.close_rcvd is not None
        assert protocol.close_rcvd.code == 1001
        assert protocol.close_rcvd.reason == "idle timeout"
        assert any(f.opcode is Opcode.PING for f in frames), "the bridge sent no ping"
        assert 0.4 <= elapsed < 2.0
        await eventually(lambda: bridge.connections == 0, 4)
        assert sample(bridge, "grpcbridge_tunnels_closed_total", code="1001") == 1


async def test_handshake_timeout_drops_silent_connection(backend: RawBackend) -> None:
    async with running_bridge(backend.port, handshake_timeout=0.3) as bridge:
        assert bridge.address is not None
        reader, writer = await asyncio.open_connection(*bridge.address)
        try:
            await eventually(lambda: bridge.connections == 1)
            async with asyncio.timeout(2):
                assert await reader.read() == b""
        finally:
            writer.close()
        await eventually(lambda: bridge.connections == 0)
        assert sample(bridge, "grpcbridge_upgrades_rejected_total", reason="timeout") == 1


# ---------------------------------------------------------------- (12) metrics


async def test_metrics_health_and_readiness(backend: RawBackend) -> None:
    async with running_bridge(backend.port, metrics_listen="127.0.0.1:0") as bridge:
        assert bridge.metrics_address is not None
        port = bridge.metrics_address[1]
        status, headers, body = await http_get(port, "/metrics")
        assert status == 200
        assert headers["content-type"].startswith("text/plain")
        assert b"grpcbridge_tunnels_active 0.0" in body

        async with connect(bridge.url) as ws:
            await ws.send(b"12345")
            await eventually(lambda: backend.received == b"12345")
            _, _, body = await http_get(port, "/metrics")
            assert b"grpcbridge_tunnels_active 1.0" in body
        await eventually(lambda: bridge.connections == 0)
        _, _, text = await http_get(port, "/metrics")
        assert b"grpcbridge_tunnels_active 0.0" in text
        assert b'grpcbridge_tunnels_closed_total{code="1000"} 1.0' in text
        assert b"grpcbridge_upgrades_accepted_total 1.0" in text
        assert b'grpcbridge_bytes_total{direction="client_to_backend"} 5.0' in text

        assert (await http_get(port, "/healthz"))[0] == 200
        status, _, body = await http_get(port, "/readyz")
        assert (status, body) == (200, b"ready\n")
        assert (await http_get(port, "/nothing"))[0] == 404

        await backend.close()  # backend goes away
        status, _, body = await http_get(port, "/readyz")
        assert status == 503
        assert (await http_get(port, "/healthz"))[0] == 200
    # The metrics listener is gone with the bridge.
    with pytest.raises(OSError):
        await http_get(port, "/healthz")


# ---------------------------------------------------------- (13) close semantics


async def test_close_is_idempotent_and_concurrent(backend: RawBackend) -> None:
    bridge = Bridge(BridgeConfig(listen="127.0.0.1:0", backend=f"127.0.0.1:{backend.port}"))
    await bridge.start()
    url = bridge.url
    await asyncio.wait_for(asyncio.gather(bridge.close(), bridge.close()), 5)
    await asyncio.wait_for(bridge.close(), 5)
    with pytest.raises(InvalidStateError):
        await bridge.start()
    with pytest.raises(OSError):
        async with connect(url, open_timeout=1):
            pass
    await asyncio.wait_for(bridge.serve_forever(), 1)  # returns at once: already closed


async def test_close_during_start_leaves_nothing_serving(backend: RawBackend) -> None:
    for server in (Bridge(BridgeConfig(listen="127.0.0.1:0",
                                       backend=f"127.0.0.1:{backend.port}")),
                   Forwarder(ForwarderConfig(target="ws://127.0.0.1:9/grpc",
                                             listen="127.0.0.1:0"))):
        starting = asyncio.create_task(server.start())
        await asyncio.sleep(0)  # one step: the start is under way
        assert server._state == "starting"
        await asyncio.wait_for(server.close(), 5)  # waits for the start, then closes
        await asyncio.wait_for(starting, 5)
        assert server._state == "closed" and server.address is not None
        with pytest.raises(OSError):
            await asyncio.open_connection(*server.address)


async def test_a_connection_completing_its_tls_handshake_after_close_is_dropped(
        backend: RawBackend, tmp_path: Any) -> None:
    import ssl

    ca, cert, key = tls_files(tmp_path)
    bridge = Bridge(BridgeConfig(listen="127.0.0.1:0", backend=f"127.0.0.1:{backend.port}",
                                 certfile=str(cert), keyfile=str(key)))
    await bridge.start()
    assert bridge.address is not None
    # Accepted while the bridge runs, but its TLS handshake (and so connection_made) waits.
    reader, writer = await asyncio.open_connection(*bridge.address)
    server = bridge._server
    assert server is not None
    await eventually(lambda: server._active_count == 1)  # type: ignore[attr-defined]
    await bridge.close()
    try:
        await writer.start_tls(ssl.create_default_context(cafile=str(ca)),
                               server_hostname="localhost")
        writer.write(b"GET /grpc HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
    except (ConnectionError, ssl.SSLError):
        answer = b""
    finally:
        writer.transport.abort()
    assert b"101" not in answer and backend.accepted == 0


async def test_start_twice_raises(backend: RawBackend) -> None:
    async with running_bridge(backend.port) as bridge:
        with pytest.raises(InvalidStateError):
            await bridge.start()


async def test_close_with_open_tunnel_sends_1001(backend: RawBackend) -> None:
    bridge = Bridge(BridgeConfig(listen="127.0.0.1:0", backend=f"127.0.0.1:{backend.port}",
                                 drain_timeout=0.2))
    await bridge.start()
    try:
        async with connect(bridge.url) as ws:
            await ws.send(b"x")
            await eventually(lambda: backend.received == b"x")
            started = time.monotonic()
            closing = asyncio.gather(bridge.close(), bridge.close())
            assert await closed_code(ws) == 1001
            assert ws.close_reason == "server shutting down"
            await asyncio.wait_for(closing, 5)
            assert time.monotonic() - started < 3
    finally:
        await bridge.close()
    await eventually(lambda: backend.eofs == 1)
    assert bridge.connections == 0
    assert bridge.gate.limiter.active == 0


async def test_tunnel_finishing_during_drain_closes_normally(backend: RawBackend) -> None:
    bridge = Bridge(BridgeConfig(listen="127.0.0.1:0", backend=f"127.0.0.1:{backend.port}",
                                 drain_timeout=5, metrics_listen="127.0.0.1:0"))
    await bridge.start()
    assert bridge.metrics_address is not None
    metrics_port = bridge.metrics_address[1]
    try:
        async with connect(bridge.url) as ws:
            await ws.send(b"x")
            await eventually(lambda: backend.received == b"x")
            closing = asyncio.create_task(bridge.close())
            # Draining: /readyz says so (a load balancer sends no new tunnels), the backend is
            # still fine, and close waits for the tunnel.
            status, _, body = await http_get(metrics_port, "/readyz")
            assert (status, body) == (503, b"draining\n")
            assert not closing.done()
            backend.writers[0].close()  # the backend ends the connection
            assert await closed_code(ws) == 1000
        await asyncio.wait_for(closing, 3)
    finally:
        await bridge.close()


# ------------------------------------------------------------ (14) bookkeeping


async def test_state_returns_to_zero_after_tunnels_close(backend: RawBackend) -> None:
    async with running_bridge(backend.port, max_upgrades_per_minute=0) as bridge:
        sockets = [await connect(bridge.url) for _ in range(5)]
        await eventually(lambda: bridge.active_tunnels == 5)
        assert bridge.gate.limiter.tracked_clients == 1
        assert bridge.gate.limiter.active == 5
        assert (await refused(bridge.url + "x")).status_code == 404  # leaves no state
        await asyncio.gather(*(ws.close() for ws in sockets))
        await eventually(lambda: bridge.connections == 0)
        assert bridge.active_tunnels == 0
        assert bridge.gate.limiter.active == 0
        assert bridge.gate.limiter.tracked_clients == 0
        # The budget accounts (each handshake's, then each tunnel's) are all closed.
        assert (bridge.budget.held, bridge.budget.tracked_clients) == (0, 0)
        assert sample(bridge, "grpcbridge_tunnels_active") == 0


async def test_rate_limit_state_pruned_once_the_window_passes(backend: RawBackend) -> None:
    async with running_bridge(backend.port, max_upgrades_per_minute=5) as bridge:
        bridge.gate.limiter.WINDOW = 0.3
        async with connect(bridge.url):
            await asyncio.sleep(0.4)
        await eventually(lambda: bridge.connections == 0)
        assert bridge.gate.limiter.tracked_clients == 0
        # Within the window the state is kept (it is what the rate limit counts).
        async with connect(bridge.url):
            pass
        await eventually(lambda: bridge.connections == 0)
        assert bridge.gate.limiter.tracked_clients == 1

