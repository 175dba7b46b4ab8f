"""WebSocket framing rules at the bridge, for both of its framing engines: picows (TCP
listeners, the default) and websockets (unix socket listeners, compression). Frames are built
and parsed by websockets' sans-I/O client, sent over a raw connection, so the test can send
what a well-behaved client never would."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.uri import parse_uri

from grpcbridge import Bridge, BridgeConfig

from support import RawBackend, eventually, sample, timing

ENGINES = ["picows", "websockets"]


class RawClient:
    """A WebSocket client driven frame by frame (websockets' sans-I/O protocol)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.protocol = ClientProtocol(parse_uri("ws://bridge/grpc"), max_size=None)

    async def handshake(self) -> None:
        self.protocol.send_request(self.protocol.connect())
        self.flush()
        while self.protocol.handshake_exc is None and not self.protocol.events_received():
            self.protocol.receive_data(await self.reader.read(65536))
        assert self.protocol.handshake_exc is None, self.protocol.handshake_exc

    def flush(self) -> None:
        self.writer.writelines(self.protocol.data_to_send())

    def send(self, frame: Frame) -> None:
        self.protocol.send_frame(frame)  # masked, as a client must
        self.flush()

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def frames(self, within: float = 5.0) -> list[Frame]:
        """Frames received until the bridge ends the connection."""
        received: list[Frame] = []
        async with asyncio.timeout(timing(within)):
            while data := await self.reader.read(65536):
                self.protocol.receive_data(data)
                received += [e for e in self.protocol.events_received() if isinstance(e, Frame)]
        return received

    async def close_code(self) -> int | None:
        frames = await self.frames()
        closes = [f for f in frames if f.opcode is Opcode.CLOSE]
        return Close.parse(closes[0].data).code if closes else None


@contextlib.asynccontextmanager
async def bridge_client(engine: str, backend: RawBackend, tmp_path: Path,
                        **settings: Any) -> AsyncIterator[tuple[Bridge, RawClient]]:
    listen = "127.0.0.1:0" if engine == "picows" else f"unix:{tmp_path / 'bridge.sock'}"
    config = BridgeConfig(listen=listen, backend=f"127.0.0.1:{backend.port}",
                          drain_timeout=0, **settings)
    async with Bridge(config) as bridge:
        if bridge.address is not None:
            reader, writer = await asyncio.open_connection(*bridge.address)
        else:
            reader, writer = await asyncio.open_unix_connection(str(tmp_path / "bridge.sock"))
        client = RawClient(reader, writer)
        try:
            await client.handshake()
            yield bridge, client
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("frames", [
    pytest.param([Frame(Opcode.CONT, b"x")], id="continuation-first"),
    pytest.param([Frame(Opcode.BINARY, b"x", fin=False), Frame(Opcode.BINARY, b"y")],
                 id="new-message-inside-fragmented-one"),
])
async def test_framing_violations_close_with_1002(engine: str, frames: list[Frame],
                                                  backend: RawBackend, tmp_path: Path) -> None:
    async with bridge_client(engine, backend, tmp_path) as (bridge, client):
        client.send(Frame(Opcode.BINARY, b"ok"))
        await eventually(lambda: backend.received == b"ok")
        for frame in frames:
            client.send(frame)
        assert await client.close_code() == 1002
        await eventually(lambda: sample(bridge, "grpcbridge_tunnels_closed_total",
                                        code="1002") == 1)
    assert backend.received.startswith(b"ok")


@pytest.mark.parametrize("engine", ENGINES)
async def test_reserved_bit_without_extension_closes_with_1002(
        engine: str, backend: RawBackend, tmp_path: Path) -> None:
    async with bridge_client(engine, backend, tmp_path) as (_bridge, client):
        frame = bytearray(Frame(Opcode.BINARY, b"rsv").serialize(mask=True, extensions=[]))
        frame[0] |= 0x40  # RSV1: no extension was negotiated
        client.send_raw(bytes(frame))
        assert await client.close_code() == 1002
    assert b"rsv" not in backend.received


@pytest.mark.parametrize("engine", ENGINES)
async def test_unmasked_frame_closes_with_1002(engine: str, backend: RawBackend,
                                               tmp_path: Path) -> None:
    async with bridge_client(engine, backend, tmp_path) as (_bridge, client):
        client.send_raw(Frame(Opcode.BINARY, b"plain").serialize(mask=False, extensions=[]))
        assert await client.close_code() == 1002
    assert b"plain" not in backend.received


@pytest.mark.parametrize("engine", ENGINES)
async def test_fragmented_message_reaches_backend_whole_and_in_order(
        engine: str, backend: RawBackend, tmp_path: Path) -> None:
    async with bridge_client(engine, backend, tmp_path) as (_bridge, client):
        client.send(Frame(Opcode.BINARY, b"one-", fin=False))
        client.send(Frame(Opcode.PING, b"between"))  # control frames may interleave
        client.send(Frame(Opcode.CONT, b"two-", fin=False))
        client.send(Frame(Opcode.CONT, b"three", fin=True))
        client.send(Frame(Opcode.BINARY, b"|next"))
        await eventually(lambda: backend.received == b"one-two-three|next")


@pytest.mark.parametrize("engine", ENGINES)
async def test_ping_is_answered_with_its_payload(engine: str, backend: RawBackend,
                                                 tmp_path: Path) -> None:
    async with bridge_client(engine, backend, tmp_path) as (_bridge, client):
        client.send(Frame(Opcode.PING, b"are you there"))
        client.send(Frame(Opcode.CLOSE, Close(1000, "").serialize()))
        frames = await client.frames()
    assert frames[0].opcode is Opcode.PONG and frames[0].data == b"are you there"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("payload", "echo"), [
    pytest.param(Close(4000, "app says bye").serialize(), 4000, id="application-code"),
    pytest.param(Close(1001, "").serialize(), 1001, id="going-away"),
    pytest.param(b"", None, id="no-status"),
])
async def test_client_close_is_answered_then_the_connection_ends(
        engine: str, payload: bytes, echo: int | None, backend: RawBackend,
        tmp_path: Path) -> None:
    async with bridge_client(engine, backend, tmp_path) as (bridge, client):
        client.send(Frame(Opcode.BINARY, b"ok"))
        await eventually(lambda: backend.received == b"ok")
        client.send(Frame(Opcode.CLOSE, payload))
        closes = [f for f in await client.frames() if f.opcode is Opcode.CLOSE]
        assert len(closes) == 1
        if echo is None:
            assert closes[0].data == b""
        else:
            assert Close.parse(closes[0].data).code == echo
        await eventually(lambda: backend.eofs == 1)  # the backend side closed too
        code = str(echo if echo is not None else 1005)
        await eventually(lambda: sample(bridge, "grpcbridge_tunnels_closed_total",
                                        code=code) == 1)


@pytest.mark.parametrize("engine", ENGINES)
async def test_oversized_single_frame_is_1009_and_never_reaches_backend(
        engine: str, backend: RawBackend, tmp_path: Path) -> None:
    limit = 4096
    async with bridge_client(engine, backend, tmp_path,
                             max_message_bytes=limit) as (_bridge, client):
        client.send(Frame(Opcode.BINARY, b"z" * (limit + 1)))
        client.send(Frame(Opcode.BINARY, b"after"))  # parsed after the violation: dropped
        assert await client.close_code() == 1009
    await eventually(lambda: backend.eofs == 1)
    assert b"z" not in backend.received and b"after" not in backend.received


@pytest.mark.parametrize("engine", ENGINES)
async def test_frame_before_a_violation_in_the_same_write_still_arrives(
        engine: str, backend: RawBackend, tmp_path: Path) -> None:
    async with bridge_client(engine, backend, tmp_path) as (_bridge, client):
        bad = bytearray(Frame(Opcode.BINARY, b"bad").serialize(mask=True, extensions=[]))
        bad[0] = (bad[0] & 0xF0) | 0x3  # a reserved opcode
        client.send_raw(Frame(Opcode.BINARY, b"keep-me").serialize(mask=True, extensions=[])
                        + bytes(bad))
        assert await client.close_code() == 1002
    await eventually(lambda: backend.eofs == 1)
    assert backend.received == b"keep-me"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("code", [1006, 1005, 5000, 999])
async def test_close_with_an_invalid_code_is_1002(engine: str, code: int,
                                                  backend: RawBackend, tmp_path: Path) -> None:
    async with bridge_client(engine, backend, tmp_path) as (_bridge, client):
        client.send_raw(Frame(Opcode.CLOSE, code.to_bytes(2, "big"))
                        .serialize(mask=True, extensions=[]))
        assert await client.close_code() == 1002
