"""WebSocket framing rules at the forwarder (the client end of a tunnel, on picows), against a
bridge stand-in that sends what a well-behaved bridge never would: text, masked frames,
reserved bits, invalid close codes, oversized messages, no close answer. The rules are the
bridge's (tests/server/test_framing.py); what differs for a client is checked here, on both
event loops the CLI offers. Frames are built and parsed by websockets' sans-I/O server
protocol over a raw connection, which also checks that everything the forwarder sends is
masked, as a client must."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.datastructures import Headers
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from grpcbridge import Channel, Forwarder, ForwarderConfig
from grpcbridge.client.dial import DialSettings, open_websocket
from grpcbridge.core.errors import ConfigError, HandshakeError
from grpcbridge.core.target import parse_target
from grpcbridge.core.tunnel import CLOSE_TIMEOUT
from grpcbridge.fastws import PicowsTunnel
from grpcbridge.loops import loop_factory
from grpcbridge.relay import StreamSide

from support import eventually, timing, tls_files

LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


def run(loop: str, scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``scenario`` on a new event loop of kind ``loop``; no task may outlive it."""

    async def checked() -> None:
        await scenario()
        me = asyncio.current_task()
        await eventually(lambda: not [t for t in asyncio.all_tasks() if t is not me],
                         message="tasks left behind")

    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        runner.run(checked())


class Peer:
    """The bridge end of one connection, driven frame by frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 protocol: ServerProtocol, request: Request) -> None:
        self.reader, self.writer, self.protocol, self.request = reader, writer, protocol, request
        self.received: list[Frame] = []

    def send(self, frame: Frame) -> None:
        self.protocol.send_frame(frame)  # unmasked, as a server must
        self.writer.writelines(self.protocol.data_to_send())

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def read(self) -> bool:
        """Parse one read into ``received``; False at the end of the connection."""
        try:
            data = await self.reader.read(65536)
        except ConnectionError:
            data = b""
        if not data:
            return False
        self.protocol.receive_data(data)
        self.received += [e for e in self.protocol.events_received() if isinstance(e, Frame)]
        assert self.protocol.parser_exc is None, self.protocol.parser_exc  # e.g. unmasked
        return True

    async def until_end(self, within: float = 5.0) -> list[Frame]:
        """Frames received until the forwarder ends the connection."""
        async with asyncio.timeout(timing(within)):
            while await self.read():
                pass
        return self.received

    async def until(self, predicate: Callable[[list[Frame]], bool],
                    within: float = 5.0) -> list[Frame]:
        async with asyncio.timeout(timing(within)):
            while not predicate(self.received):
                assert await self.read(), f"connection ended; frames: {self.received}"
        return self.received

    def payload(self) -> bytes:
        return b"".join(f.data for f in self.received if f.opcode in (Opcode.BINARY,
                                                                      Opcode.CONT))

    async def close_code(self) -> int | None:
        closes = [f for f in await self.until_end() if f.opcode is Opcode.CLOSE]
        return Close.parse(closes[0].data).code if closes else None


def _closes(frames: list[Frame]) -> list[Frame]:
    return [f for f in frames if f.opcode is Opcode.CLOSE]


@dataclass
class RawBridge:
    """Accepts upgrades with websockets' server protocol; ``answer`` may rewrite the 101
    (or replace it). Each accepted connection arrives on ``peers``."""

    answer: Callable[[Response], Response] | None = None
    peers: asyncio.Queue[Peer] = field(default_factory=asyncio.Queue)
    server: asyncio.Server | None = None
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/grpc?tenant=a"

    async def __aenter__(self) -> RawBridge:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        protocol = ServerProtocol(max_size=None, select_subprotocol=lambda _p, offered:
                                  offered[0] if offered else None)
        requests: list[Request] = []
        while not requests:
            data = await reader.read(65536)
            if not data:
                return
            protocol.receive_data(data)
            requests = [e for e in protocol.events_received() if isinstance(e, Request)]
        response = protocol.accept(requests[0])
        if self.answer is not None:
            response = self.answer(response)
        protocol.send_response(response)
        writer.writelines(protocol.data_to_send())
        if response.status_code == 101:
            self.peers.put_nowait(Peer(reader, writer, protocol, requests[0]))


@contextlib.asynccontextmanager
async def forwarded(**settings: Any) -> AsyncIterator[
        tuple[Peer, asyncio.StreamReader, asyncio.StreamWriter]]:
    """A forwarder to a :class:`RawBridge`, one local connection through it: (the bridge end,
    the local client's reader and writer)."""
    async with RawBridge() as bridge:
        config = ForwarderConfig(target=bridge.url, listen="127.0.0.1:0", proxy=None,
                                 **settings)
        async with Forwarder(config) as forwarder:
            assert forwarder.address is not None
            reader, writer = await asyncio.open_connection(*forwarder.address)
            try:
                async with asyncio.timeout(timing(5)):
                    peer = await bridge.peers.get()
                yield peer, reader, writer
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
            await eventually(lambda: forwarder.active_tunnels == 0,
                             CLOSE_TIMEOUT + 3, message="the tunnel never ended")


async def local_end(reader: asyncio.StreamReader) -> bytes:
    """What the local client reads until the forwarder closes its connection."""
    async with asyncio.timeout(timing(5)):
        return await reader.read()


# ------------------------------------------------------------------ frames that pass


@LOOPS
def test_bytes_flow_both_ways_masked_and_in_order(loop: str) -> None:
    async def scenario() -> None:
        async with forwarded() as (peer, reader, writer):
            writer.write(b"from the client")
            await peer.until(lambda _f: peer.payload() == b"from the client")
            assert all(f.opcode is Opcode.BINARY for f in peer.received)
            peer.send(Frame(Opcode.BINARY, b"one-", fin=False))
            peer.send(Frame(Opcode.PING, b"between"))  # control frames may interleave
            peer.send(Frame(Opcode.CONT, b"two-", fin=False))
            peer.send(Frame(Opcode.CONT, b"three"))
            peer.send(Frame(Opcode.BINARY, b"|" + b"x" * 100_000))  # the 64-bit length form
            expected = b"one-two-three|" + b"x" * 100_000
            async with asyncio.timeout(timing(5)):
                assert await reader.readexactly(len(expected)) == expected
            frames = await peer.until(lambda f: any(x.opcode is Opcode.PONG for x in f))
            assert [f.data for f in frames if f.opcode is Opcode.PONG] == [b"between"]
    run(loop, scenario)


@LOOPS
def test_keepalive_pings_reach_the_bridge(loop: str) -> None:
    async def scenario() -> None:
        async with forwarded(ping_interval=0.2) as (peer, _reader, _writer):
            await peer.until(lambda f: any(x.opcode is Opcode.PING for x in f))
    run(loop, scenario)


# ------------------------------------------------------------- frames a bridge must not send


@LOOPS
@pytest.mark.parametrize(("make", "code"), [
    pytest.param(lambda: Frame(Opcode.TEXT, b"text").serialize(mask=False, extensions=[]),
                 1003, id="text"),
    pytest.param(lambda: Frame(Opcode.BINARY, b"masked").serialize(mask=True, extensions=[]),
                 1002, id="masked"),
    pytest.param(lambda: bytes([0xC2, 0x03]) + b"rsv", 1002, id="reserved-bit"),
    pytest.param(lambda: Frame(Opcode.CONT, b"x").serialize(mask=False, extensions=[]),
                 1002, id="continuation-first"),
    pytest.param(lambda: bytes([0x83, 0x01, 0x00]), 1002, id="reserved-opcode"),
])
def test_frames_a_bridge_must_not_send_close_the_tunnel(
        loop: str, make: Callable[[], bytes], code: int) -> None:
    async def scenario() -> None:
        async with forwarded() as (peer, reader, _writer):
            peer.send(Frame(Opcode.BINARY, b"kept"))
            peer.send_raw(make() + Frame(Opcode.BINARY, b"dropped").serialize(
                mask=False, extensions=[]))
            assert await peer.close_code() == code  # and the connection ends
            assert await local_end(reader) == b"kept"
    run(loop, scenario)


@LOOPS
@pytest.mark.parametrize("code", [1005, 1006, 5000, 999])
def test_close_with_an_invalid_code_is_1002(loop: str, code: int,
                                            caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with forwarded() as (peer, reader, _writer):
            peer.send_raw(Frame(Opcode.CLOSE, code.to_bytes(2, "big"))
                          .serialize(mask=False, extensions=[]))
            assert await peer.close_code() == 1002
            assert await local_end(reader) == b""
    run(loop, scenario)
    # picows keeps the protocol error for wait_disconnected(); the tunnel reports it as its
    # close code, and asyncio must not log it as an exception nobody retrieved.
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


@LOOPS
@pytest.mark.parametrize("fragmented", [False, True])
def test_oversized_message_is_1009(loop: str, fragmented: bool) -> None:
    limit = 4096

    async def scenario() -> None:
        async with forwarded(max_message_bytes=limit) as (peer, reader, _writer):
            if fragmented:
                peer.send(Frame(Opcode.BINARY, b"z" * limit, fin=False))
                peer.send(Frame(Opcode.CONT, b"z"))
            else:
                peer.send(Frame(Opcode.BINARY, b"z" * (limit + 1)))
            assert await peer.close_code() == 1009
            assert b"z" * (limit + 1) not in await local_end(reader)
    run(loop, scenario)


# ---------------------------------------------------------------------------- closing


@LOOPS
@pytest.mark.parametrize(("payload", "echo"), [
    pytest.param(Close(4000, "bridge says bye").serialize(), 4000, id="application-code"),
    pytest.param(b"", None, id="no-status"),
])
def test_bridge_close_is_answered_then_the_bridge_closes(
        loop: str, payload: bytes, echo: int | None) -> None:
    async def scenario() -> None:
        async with forwarded() as (peer, reader, _writer):
            peer.send(Frame(Opcode.BINARY, b"last words"))
            peer.send(Frame(Opcode.CLOSE, payload))
            frames = await peer.until(lambda f: bool(_closes(f)))
            (answer,) = _closes(frames)
            assert (Close.parse(answer.data).code if answer.data else None) == echo
            assert await local_end(reader) == b"last words"
            peer.writer.close()  # the server ends the connection (RFC 6455 7.1.1)
    run(loop, scenario)


@LOOPS
def test_the_forwarder_ends_the_connection_after_the_closing_handshake(loop: str) -> None:
    async def scenario() -> None:
        async with forwarded() as (peer, _reader, _writer):
            peer.send(Frame(Opcode.CLOSE, Close(1000, "").serialize()))
            # The bridge never closes; its local connection gone, the forwarder does.
            frames = await peer.until_end(CLOSE_TIMEOUT + 3)
            assert [Close.parse(f.data).code for f in _closes(frames)] == [1000]
    run(loop, scenario)


@LOOPS
def test_no_close_answer_the_forwarder_drops_the_connection(loop: str) -> None:
    async def scenario() -> None:
        async with forwarded() as (peer, _reader, writer):
            writer.write(b"bye")
            writer.close()  # the local client leaves: the forwarder closes with 1000
            frames = await peer.until_end(CLOSE_TIMEOUT + 3)  # never answered, never closed
            assert peer.payload() == b"bye"
            assert [Close.parse(f.data).code for f in _closes(frames)] == [1000]
    run(loop, scenario)


# -------------------------------------------------------------------------- handshake


def _settings(url: str, **options: Any) -> DialSettings:
    return DialSettings(target=parse_target(url), handshake_timeout=timing(5), **options)


async def _dial(bridge: RawBridge, **options: Any) -> HandshakeError | None:
    """Open a forwarder tunnel to ``bridge``: the HandshakeError, or None (then closed)."""
    settings = _settings(bridge.url, **options)
    tunnel = settings.new_tunnel(asyncio.get_running_loop(), "client")
    try:
        await open_websocket(tunnel, settings)
    except HandshakeError as exc:
        return exc
    finally:
        tunnel.machine.abort()  # no stream side: the tunnel ends with its connection
        async with asyncio.timeout(timing(5)):
            await tunnel.closed
    return None


@LOOPS
def test_upgrade_request_carries_what_the_forwarder_was_given(loop: str) -> None:
    async def scenario() -> None:
        async with RawBridge() as bridge:
            assert await _dial(bridge, headers={"X-Tenant": "a", "Origin": "https://x.test"},
                               bearer_token="s3cret", subprotocols=("grpc-ws", "other"),
                               origin="https://ignored.test") is None
            request = (await bridge.peers.get()).request
            port = bridge.url.split(":")[2].split("/")[0]
        assert request.path == "/grpc?tenant=a"
        headers: Headers = request.headers
        assert headers["Host"] == f"127.0.0.1:{port}"
        assert headers.get_all("Origin") == ["https://x.test"]  # headers replace origin
        assert headers["X-Tenant"] == "a"
        assert headers["Authorization"] == "Bearer s3cret"
        assert headers["Sec-WebSocket-Protocol"] == "grpc-ws, other"
        assert "Sec-WebSocket-Extensions" not in headers  # no compression offered
    run(loop, scenario)


@pytest.mark.parametrize("name", ["Upgrade", "connection", "SEC-WEBSOCKET-VERSION",
                                  "Sec-WebSocket-Key", "Sec-WebSocket-Extensions", "Host"])
async def test_headers_the_handshake_writes_are_refused_in_the_config(name: str) -> None:
    """picows adds its own Upgrade, Connection, Sec-WebSocket-* and Host besides a user's
    (two of each on the wire): such names fail the forwarder's config (and a channel's
    options), saying why."""
    with pytest.raises(ConfigError, match=rf"headers: '{name}' is written by the WebSocket "
                                          "handshake itself"):
        ForwarderConfig(target="ws://127.0.0.1:1/grpc", listen="127.0.0.1:0",
                        proxy=None, headers={"X-Tenant": "a", name: "x"})
    with pytest.raises(ConfigError, match="written by the WebSocket handshake"):
        Channel("ws://127.0.0.1:1/grpc", headers={name: "x"})


def _refuse(response: Response) -> Response:
    return Response(403, "Forbidden", Headers([("Content-Length", "18")]),
                    b"origin not allowed")


def _with_header(name: str, value: str) -> Callable[[Response], Response]:
    def answer(response: Response) -> Response:
        if name in response.headers:
            del response.headers[name]
        response.headers[name] = value
        return response
    return answer


@LOOPS
@pytest.mark.parametrize(("answer", "options", "message", "status"), [
    pytest.param(_refuse, {}, "refused the WebSocket upgrade: HTTP 403: origin not allowed",
                 403, id="refused"),
    pytest.param(_with_header("Sec-WebSocket-Protocol", "unoffered"),
                 {"subprotocols": ("grpc-ws",)},
                 "answered the WebSocket upgrade wrongly: it chose subprotocol 'unoffered'",
                 101, id="unoffered-subprotocol"),
    pytest.param(lambda r: (r.headers.__setitem__("Sec-WebSocket-Protocol", "b"), r)[1],
                 {"subprotocols": ("a", "b")}, "it chose subprotocol 'a, b'", 101,
                 id="two-subprotocols"),
    pytest.param(_with_header("Sec-WebSocket-Protocol", "chosen"), {},
                 "it chose subprotocol 'chosen', not one offered", 101,
                 id="subprotocol-none-offered"),
    pytest.param(_with_header("Sec-WebSocket-Extensions", "permessage-deflate"), {},
                 "it chose extensions 'permessage-deflate', none offered", 101,
                 id="extension"),
    pytest.param(_with_header("Sec-WebSocket-Accept", "d3Jvbmc="), {},
                 "answered the WebSocket upgrade wrongly: cannot upgrade, invalid "
                 "sec-websocket-accept", 101, id="bad-accept"),
])
def test_upgrade_answers_the_forwarder_refuses(
        loop: str, answer: Callable[[Response], Response], options: dict[str, Any],
        message: str, status: int) -> None:
    async def scenario() -> None:
        async with RawBridge(answer=answer) as bridge:
            error = await _dial(bridge, **options)
            assert error is not None, "the upgrade was accepted"
            assert str(error).startswith(bridge.url), str(error)
        assert message in str(error), str(error)
        assert error.status == status
    run(loop, scenario)


@LOOPS
def test_connection_closed_during_the_handshake(loop: str) -> None:
    async def scenario() -> None:
        async def hang_up(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        error = await _dial_raw(hang_up)
        assert "closed the connection during the WebSocket handshake" in str(error)
    run(loop, scenario)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]]


async def _dial_raw(handler: Handler, within: float = 5.0,
                    tunnels: list[PicowsTunnel] | None = None) -> HandshakeError:
    """Dial a forwarder tunnel to a raw server running ``handler`` (the tunnel is appended
    to ``tunnels`` first): the HandshakeError it must fail with, once the tunnel ended."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        settings = DialSettings(target=parse_target(f"ws://127.0.0.1:{port}/grpc"),
                                handshake_timeout=timing(within))
        tunnel = settings.new_tunnel(asyncio.get_running_loop(), "client")
        if tunnels is not None:
            tunnels.append(tunnel)
        with pytest.raises(HandshakeError) as caught:
            await open_websocket(tunnel, settings)
        async with asyncio.timeout(timing(5)):
            await tunnel.closed
    finally:
        server.close()
        await server.wait_closed()
    return caught.value


# ------------------------------------------------------ direct writes to the stream side


@pytest.fixture(scope="module")
def uvloop_warm() -> None:
    """libuv keeps two descriptors for the process from the first loop on: open them before
    any ``leak_check`` snapshot."""
    loop_factory("uvloop")().close()


@LOOPS
@pytest.mark.usefixtures("uvloop_warm", "leak_check")
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_only_a_plain_socket_stream_side_is_written_directly(
        loop: str, tls: bool, tmp_path: Path) -> None:
    """Payloads skip the stream transport's write only for an allowlisted plain socket
    transport: a TLS one gets no descriptor (bytes written past it would skip its
    encryption), and its payloads still arrive intact through ``transport.write``."""
    ca, cert, key = tls_files(tmp_path)
    server_tls = client_tls = None
    if tls:
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(cert, key)
        client_tls = ssl.create_default_context(cafile=str(ca))
    payload = bytes(range(256)) * 800  # over one read of either side

    async def scenario() -> None:
        received = bytearray()
        done = asyncio.Event()

        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while len(received) < len(payload) and (chunk := await reader.read(65536)):
                received.extend(chunk)
            done.set()
            writer.close()

        local = await asyncio.start_server(sink, "127.0.0.1", 0, ssl=server_tls)
        async with RawBridge() as bridge:
            settings = _settings(bridge.url)
            tunnel = settings.new_tunnel(asyncio.get_running_loop(), "client")
            await open_websocket(tunnel, settings)
            try:
                peer = await bridge.peers.get()
                port = local.sockets[0].getsockname()[1]
                await asyncio.get_running_loop().create_connection(
                    lambda: StreamSide(tunnel, 65536), "127.0.0.1", port, ssl=client_tls,
                    server_hostname="127.0.0.1" if tls else None)
                assert (tunnel.stream_fd < 0) is tls, tunnel.stream_fd
                peer.send(Frame(Opcode.BINARY, payload))
                async with asyncio.timeout(timing(5)):
                    await done.wait()
                assert bytes(received) == payload
                assert tunnel.machine.bytes_from_websocket == len(payload)
            finally:
                tunnel.machine.abort()
                async with asyncio.timeout(timing(5)):
                    await tunnel.closed
        local.close()
        await local.wait_closed()
    run(loop, scenario)


# ------------------------------------------------------- a refusal's body comes later


def _held_answer(tunnel: PicowsTunnel) -> int:
    """Bytes of the upgrade answer the dialing tunnel holds back from picows."""
    transport = tunnel.ws_transport
    answer = getattr(transport.get_protocol(), "answer", None) if transport else None
    return len(answer) if answer is not None else -1


@LOOPS
@pytest.mark.usefixtures("uvloop_warm", "leak_check")
@pytest.mark.parametrize(("head", "body", "close", "within", "expected"), [
    pytest.param(b"Content-Length: 22\r\n", b"bearer token is wrong\n", False, 5,
                 ": bearer token is wrong", id="content-length"),
    pytest.param(b"", b"bearer token is wrong", True, 5, ": bearer token is wrong",
                 id="until-close"),
    pytest.param(b"Content-Length: 5000\r\n", b"\x00\x1b[31mred\r\n" + b"z" * 4986, False,
                 5, ": " + ("[31mred " + "z" * 4986)[:197] + "...",
                 id="long-and-unprintable"),
    pytest.param(b"Content-Length: 100\r\n", b"only part", False, 1, ": only part",
                 id="body-not-all-in-time"),
])
def test_a_refusal_reason_sent_after_the_head_is_reported(
        loop: str, head: bytes, body: bytes, close: bool, within: float,
        expected: str) -> None:
    """picows parses the answer once its head is in and drops the connection when it is
    not a 101: the forwarder holds the answer until the body (Content-Length, at most
    1 KiB, or the connection's end) is in too, or the handshake timeout is up, so the
    reason reaches the error as on websockets' path. The body is sent only once the
    client holds the head, so it always comes in a later read."""
    async def scenario() -> None:
        tunnels: list[PicowsTunnel] = []
        head_bytes = b"HTTP/1.1 401 Unauthorized\r\n" + head + b"\r\n"

        async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(head_bytes)
                await eventually(lambda: tunnels and _held_answer(tunnels[0]) >= len(
                    head_bytes), message="the client never held the answer's head")
                writer.write(body)
                if close:
                    writer.close()  # the body ends with the connection
                with contextlib.suppress(ConnectionError):
                    await reader.read()  # until the client hangs up
            finally:
                writer.close()

        error = await _dial_raw(refuse, within, tunnels)
        message = str(error)
        assert message.endswith("refused the WebSocket upgrade: HTTP 401" + expected), message
        assert error.status == 401
    run(loop, scenario)


# ------------------------------------------------------------- dials that do not finish


@LOOPS
@pytest.mark.usefixtures("uvloop_warm", "leak_check")
def test_no_answer_within_the_handshake_timeout(loop: str) -> None:
    async def scenario() -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                await reader.read()  # the request, then nothing: until the client hangs up
            writer.close()

        error = await _dial_raw(silent, within=0.5)
        assert re.fullmatch(rf"no WebSocket handshake with ws://127\.0\.0\.1:\d+/grpc within "
                            rf"{timing(0.5)} s", str(error)), error
        assert error.status is None
    run(loop, scenario)


@LOOPS
@pytest.mark.usefixtures("uvloop_warm", "leak_check")
@pytest.mark.parametrize("answer", [b"", b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 9\r\n\r\n"],
                         ids=["request-sent", "refusal-held"])
def test_a_dial_cancelled_midway_leaves_nothing(loop: str, answer: bytes) -> None:
    """Cancelling the dial (the caller gave up) ends the tunnel and closes its connection,
    whether the answer has not come or a refusal's body is still awaited."""
    async def scenario() -> None:
        asked = asyncio.Event()
        hung_up = asyncio.Event()

        async def stalling(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                await reader.readuntil(b"\r\n\r\n")
                writer.write(answer)
                asked.set()
                await reader.read()
            hung_up.set()
            writer.close()

        server = await asyncio.start_server(stalling, "127.0.0.1", 0)
        settings = _settings(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/grpc")
        tunnel = settings.new_tunnel(asyncio.get_running_loop(), "client")
        dial = asyncio.create_task(open_websocket(tunnel, settings))
        try:
            async with asyncio.timeout(timing(5)):
                await asked.wait()
            await eventually(lambda: _held_answer(tunnel) == len(answer),
                             message="the client never read the answer")
            dial.cancel()
            with pytest.raises(asyncio.CancelledError):
                await dial
            async with asyncio.timeout(timing(5)):
                await tunnel.closed
                await hung_up.wait()  # the connection is closed, not just forgotten
        finally:
            server.close()
            await server.wait_closed()
    run(loop, scenario)
