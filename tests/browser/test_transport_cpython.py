"""grpcbridge.browser.WebSocketTransport under CPython: close races, coalescing and the close
deadline, with a fake clock (an event loop whose time only moves when the test says so).

The only fakes are the JavaScript objects the transport touches (see ``browser/_ffi.py``):
``WebSocket`` (with a browser's rule that scripts may send only close codes 1000 and
3000-4999), ``Uint8Array``, ``queueMicrotask`` and Pyodide proxies. The protocol is a
recorder; the tunnel rules run for real (``core.tunnel.TunnelMachine``). The same behaviour
is tested end to end in Node and Chromium (``tests/browser``, ``tests/demo``).

Also the ``TunnelMachine`` additions the browser adapter needs (``pending_limit``, the end of
delivery of held bytes when the stream side closes while taking them).

And ``grpcbridge.browser.Channel`` on a tunnel a bridge retires (``max_tunnel_age``): the
bridge is a grpclib server in memory behind the fake ``WebSocket``; after its GOAWAY, new
RPCs take a new socket, the stream in flight finishes on the old one, which then closes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from types import SimpleNamespace
from typing import Any, ClassVar

import hyperframe.frame
import pytest
from grpclib.server import Server

from grpcbridge import _grpclib_compat as compat
from grpcbridge.browser import Channel as BrowserChannel
from grpcbridge.browser import _ffi
from grpcbridge.browser import transport as transport_module
from grpcbridge.browser.transport import SocketClosedError, WebSocketTransport
from grpcbridge.core.age import GOAWAY
from grpcbridge.core.errors import HandshakeError
from grpcbridge.core.stream import CloseCode
from grpcbridge.core.tunnel import TunnelMachine, TunnelState
from grpcbridge.demo import todo_pb2
from grpcbridge.demo.grpclib_service import TodoService
from grpcbridge.demo.store import TodoStore
from grpcbridge.demo.todo_grpc import TodoServiceStub

from support import eventually

CONNECTING, OPEN, CLOSING, CLOSED = 0, 1, 2, 3
# An HTTP/2 WINDOW_UPDATE frame (a control frame: dropped, not refused, after a close).
WINDOW_UPDATE = b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x01"


# ------------------------------------------------------------------ fake JavaScript


class FakeArrayBuffer:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self.byteLength = len(data)

    def to_bytes(self) -> bytes:
        return self._data


class FakeUint8Array:
    def __init__(self, size: int) -> None:
        self.data = b"\x00" * size

    @classmethod
    def new(cls, size: int) -> FakeUint8Array:
        return cls(size)

    def assign(self, data: bytes) -> None:
        self.data = bytes(data)


class FakeWebSocket:
    """What the transport uses of a browser ``WebSocket``; the test plays the network."""

    instances: ClassVar[list[FakeWebSocket]] = []

    def __init__(self, url: str, protocols: Any = None) -> None:
        self.url = url
        self.protocols = protocols
        self.readyState = CONNECTING
        self.binaryType = "blob"
        self.bufferedAmount = 0
        self.protocol = ""
        self.onopen: Any = None
        self.onmessage: Any = None
        self.onclose: Any = None
        self.onerror: Any = None
        self.sent: list[bytes] = []
        self.close_calls: list[tuple[int, str]] = []
        FakeWebSocket.instances.append(self)

    @classmethod
    def new(cls, url: str, protocols: Any = None) -> FakeWebSocket:
        return cls(url, protocols)

    def send(self, buffer: FakeUint8Array) -> None:
        assert self.readyState == OPEN, "send on a socket that is not open"
        self.sent.append(buffer.data)
        self.bufferedAmount += len(buffer.data)

    def close(self, code: int, reason: str) -> None:
        if code != 1000 and not 3000 <= code <= 4999:
            raise ValueError(f"InvalidAccessError: close code {code}")  # as browsers do
        self.close_calls.append((code, reason))
        if self.readyState in (CONNECTING, OPEN):
            self.readyState = CLOSING

    # The network's side.
    def fire_open(self) -> None:
        self.readyState = OPEN
        self.onopen(SimpleNamespace())

    def fire_message(self, data: bytes | str) -> None:
        handler = self.onmessage
        if handler is not None:
            handler(SimpleNamespace(data=data if isinstance(data, str) else FakeArrayBuffer(data)))

    def fire_close(self, code: int, reason: str = "") -> None:
        self.readyState = CLOSED
        if self.onclose is not None:
            self.onclose(SimpleNamespace(code=code, reason=reason))

    def fire_error(self) -> None:
        if self.onerror is not None:
            self.onerror(SimpleNamespace())


class FakeProxy:
    live = 0

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        self.destroyed = False
        FakeProxy.live += 1

    def __call__(self, *args: Any) -> Any:
        assert not self.destroyed, "a destroyed proxy was called"
        return self.function(*args)

    def destroy(self) -> None:
        assert not self.destroyed, "proxy destroyed twice"
        self.destroyed = True
        FakeProxy.live -= 1


class FakeJS:
    """The ``js`` module: the end of a JavaScript task runs the queued microtasks."""

    current: ClassVar[FakeJS | None] = None

    def __init__(self) -> None:
        FakeJS.current = self
        self.Uint8Array = FakeUint8Array
        self.WebSocket = FakeWebSocket
        self.microtasks: list[Any] = []

    def queueMicrotask(self, callback: Any) -> None:
        self.microtasks.append(callback)

    def end_task(self) -> None:
        while self.microtasks:
            self.microtasks.pop(0)()


@pytest.fixture
def fake_js(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeJS]:
    js = FakeJS()
    FakeWebSocket.instances = []
    monkeypatch.setattr(_ffi, "js", lambda: js)
    monkeypatch.setattr(_ffi, "ffi", lambda: SimpleNamespace(create_proxy=FakeProxy, to_js=list))
    monkeypatch.setattr(_ffi, "navigator_online", lambda: None)
    proxies = FakeProxy.live
    yield js
    assert FakeProxy.live == proxies, "proxies leaked"


# ------------------------------------------------------------------------ fake clock


class FakeClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` moves only in :func:`advance`."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0

    def time(self) -> float:
        return self.now


async def settle(turns: int = 10) -> None:
    """Let ``turns`` loop iterations run; each ends a JavaScript task (runs microtasks)."""
    for _ in range(turns):
        if FakeJS.current is not None:
            FakeJS.current.end_task()
        await asyncio.sleep(0)


async def advance(seconds: float, step: float = 0.05) -> None:
    """Move the clock ``seconds`` forward in steps, running what becomes due."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, FakeClockLoop)
    end = loop.now + seconds
    while loop.now < end:
        loop.now = min(end, loop.now + step)
        await settle(3)


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=FakeClockLoop) as runner:
        runner.run(test())


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.lost: list[BaseException | None] = []
        self.pauses = 0
        self.resumes = 0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.append(exc)

    def pause_writing(self) -> None:
        self.pauses += 1

    def resume_writing(self) -> None:
        self.resumes += 1


async def opened(**options: Any) -> tuple[WebSocketTransport, FakeWebSocket, Recorder]:
    transport = WebSocketTransport("ws://test/tunnel", ["grpcbridge"], **options)
    ws = FakeWebSocket.instances[-1]
    ws.fire_open()
    await transport.wait_open(1)
    recorder = Recorder()
    transport.attach(recorder)
    return transport, ws, recorder


async def gone(transport: WebSocketTransport, ws: FakeWebSocket) -> None:
    await settle()
    assert transport.closed.done(), "the socket was not given up"
    assert all(getattr(ws, name) is None for name in ("onopen", "onmessage", "onclose",
                                                      "onerror")), "handlers not detached"


# ------------------------------------------------------------------------- coalescing


def test_writes_of_one_task_leave_as_one_message(fake_js: FakeJS) -> None:
    async def scenario() -> None:
        transport, ws, _ = await opened()
        transport.write(b"a" * 10)
        transport.write(b"b" * 20)
        transport.write(bytearray(b"c" * 30))
        assert ws.sent == [b"a" * 10], "the first write of a task goes out at once"
        fake_js.end_task()
        assert ws.sent == [b"a" * 10, b"b" * 20 + b"c" * 30]
        transport.write(b"d")  # a new task: at once again
        assert ws.sent[-1] == b"d"
        fake_js.end_task()
        assert transport.stats.messages_sent == 3 and transport.stats.writes == 4
        assert transport.machine.bytes_to_websocket == 61
        transport.close()
        ws.fire_close(1000)
        await gone(transport, ws)

    run(scenario)


def test_coalescing_never_exceeds_the_limit(fake_js: FakeJS, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    monkeypatch.setattr(WebSocketTransport, "coalesce_limit", 100)

    async def scenario() -> None:
        transport, ws, _ = await opened()
        transport.write(b"0")
        for _ in range(5):
            transport.write(b"x" * 40)
        fake_js.end_task()
        assert [len(m) for m in ws.sent] == [1, 80, 80, 40]
        transport.write(b"y")
        transport.write(b"z" * 150)  # above the limit: what is held goes first
        assert [len(m) for m in ws.sent[4:]] == [1, 150]
        fake_js.end_task()
        transport.close()
        ws.fire_close(1000)
        await gone(transport, ws)

    run(scenario)


def test_held_writes_go_out_before_our_close_frame(fake_js: FakeJS) -> None:
    async def scenario() -> None:
        transport, ws, recorder = await opened()
        transport.write(b"first")
        transport.write(b"held")
        order: list[str] = []
        send, close = ws.send, ws.close
        ws.send = lambda buffer: (order.append("send"), send(buffer))[1]  # type: ignore
        ws.close = lambda code, reason: (order.append("close"), close(code, reason))[1]  # type: ignore
        transport.close()
        assert order == ["send", "close"] and ws.sent[-1] == b"held"
        fake_js.end_task()  # the queued microtask finds nothing held
        assert ws.close_calls == [(1000, "normal closure")]
        with pytest.raises(SocketClosedError, match="1000"):
            transport.write(b"late")
        with pytest.raises(SocketClosedError):
            transport.write(WINDOW_UPDATE)  # after our own close, control frames raise too
        await settle()
        assert len(recorder.lost) == 1 and recorder.lost[0] is None  # clean: ours, 1000
        ws.fire_close(1000)
        await gone(transport, ws)

    run(scenario)


def test_backpressure_pauses_and_resumes_the_protocol(fake_js: FakeJS) -> None:
    async def scenario() -> None:
        transport, ws, recorder = await opened(high_water=1000, low_water=100,
                                               max_buffer_bytes=10_000,
                                               max_message_bytes=1000)
        transport.write(b"x" * 1500)
        assert recorder.pauses == 1
        ws.bufferedAmount = 500
        await advance(0.05)
        assert recorder.resumes == 0
        ws.bufferedAmount = 50
        await advance(0.05)  # the poll sees it
        assert recorder.resumes == 1
        fake_js.end_task()
        transport.write(b"x" * 1500)
        assert recorder.pauses == 2
        ws.bufferedAmount = 0
        ws.fire_message(b"ack")  # every inbound message checks too
        assert recorder.resumes == 2 and bytes(recorder.data) == b"ack"
        transport.write(b"x" * 9000)  # a writer ignoring backpressure
        with pytest.raises(SocketClosedError, match="1011"):
            transport.write(b"x" * 2000)
        assert ws.close_calls == [(4011, "send buffer over 10000 bytes (writer ignored "
                                         "backpressure)")]
        assert transport.sent_close_code == 4011 and transport.machine.close_code == 1011
        ws.fire_close(1006)
        await gone(transport, ws)
        assert transport.machine.close_code == 1011 and transport.closed_by == "client"

    run(scenario)


# ------------------------------------------------------------------------ close races


@pytest.mark.parametrize("order", [
    ("close", "close_event", "error"),
    ("close_event", "close", "error"),
    ("error", "close_event", "close"),
    ("error", "close", "close_event"),
    ("close_event", "error", "close"),
])
def test_close_from_every_path_is_idempotent(fake_js: FakeJS, order: tuple[str, ...]) -> None:
    async def scenario() -> None:
        transport, ws, recorder = await opened()
        for step in order:
            if step == "close":
                transport.close()
            elif step == "close_event":
                ws.fire_close(1001, "going away")
            else:
                ws.fire_error()
        await gone(transport, ws)
        await settle()
        first = next(step for step in order if step != "error")
        assert transport.machine.close_code == {"close_event": 1001, "close": 1000}[first]
        assert transport.machine.state is TunnelState.CLOSED
        assert len(recorder.lost) == 1
        if first == "close_event":
            assert isinstance(recorder.lost[0], SocketClosedError)
            assert "1001 (going away)" in str(recorder.lost[0])
        transport.close()  # still idempotent
        assert len(ws.close_calls) <= 1

    run(scenario)


def test_close_deadline_gives_up_a_silent_socket(fake_js: FakeJS) -> None:
    async def scenario() -> None:
        transport, ws, recorder = await opened()
        ws.bufferedAmount = 3000
        transport.close()
        await advance(transport.close_timeout - 0.2)
        assert not transport.closed.done()
        ws.bufferedAmount = 1000  # still draining at the deadline: a slow reader, not dead
        await advance(0.4)
        assert not transport.closed.done(), "deadline not extended while draining"
        await advance(transport.close_timeout)  # no progress: given up
        assert transport.closed.done()
        assert transport.machine.close_code == 1000 and len(recorder.lost) == 1
        ws.fire_close(1000)  # too late: ignored (handlers detached)

    run(scenario)


def test_error_without_close_event(fake_js: FakeJS) -> None:
    async def scenario() -> None:
        transport, ws, recorder = await opened()
        ws.fire_error()
        assert transport.machine.close_code is None, "the close event carries the code: wait for it"
        await advance(0.9)
        assert transport.machine.close_code is None
        await advance(0.2)
        await gone(transport, ws)
        await settle()
        assert transport.machine.close_code == 1006 and transport.closed_by == "error"
        assert "no close event followed" in transport.machine.close_reason
        assert len(recorder.lost) == 1 and isinstance(recorder.lost[0], SocketClosedError)
        assert ws.close_calls == [(1000, "normal closure")]  # given up: closed by us

    run(scenario)


def test_error_before_open_fails_the_handshake(fake_js: FakeJS) -> None:
    async def scenario() -> None:
        transport = WebSocketTransport("ws://test/tunnel")
        ws = FakeWebSocket.instances[-1]
        ws.fire_error()
        with pytest.raises(HandshakeError, match="1006"):
            await transport.wait_open(1)
        ws.fire_close(1006)
        await gone(transport, ws)
        assert transport.close_event_code == 1006

    run(scenario)


def test_open_timeout_closes_then_gives_up(fake_js: FakeJS) -> None:
    async def scenario() -> None:
        transport = WebSocketTransport("ws://test/tunnel")
        ws = FakeWebSocket.instances[-1]
        waiter = asyncio.ensure_future(transport.wait_open(2))
        await advance(2.1)
        with pytest.raises(HandshakeError, match="did not open within 2 s"):
            await waiter
        assert ws.close_calls == [(1000, "did not open within 2 s")]
        await advance(transport.close_timeout + 0.1)
        await gone(transport, ws)

    run(scenario)


def test_peer_close_right_after_data_delivers_it_first(fake_js: FakeJS) -> None:
    async def scenario() -> None:
        transport, ws, recorder = await opened()
        transport.write(b"request")
        transport.write(b"held")  # accepted, but the peer closes before the task ends
        ws.fire_message(b"response")
        ws.fire_close(1001, "bye")
        assert bytes(recorder.data) == b"response"
        assert transport.stats.bytes_unsent == 4
        fake_js.end_task()
        await gone(transport, ws)
        await settle()
        assert transport.closed_by == "server" and len(recorder.lost) == 1
        assert transport.machine.close_code == 1001 and ws.close_calls == []
        assert transport.is_closing()

    run(scenario)


# ------------------------------------------------------------------- inbound messages


def test_bytes_before_attach_are_delivered_in_order(fake_js: FakeJS) -> None:
    async def scenario() -> None:
        transport = WebSocketTransport("ws://test/tunnel")
        ws = FakeWebSocket.instances[-1]
        ws.fire_open()
        await transport.wait_open(1)
        for chunk in (b"one", b"", b"two", b"three"):
            ws.fire_message(chunk)
        assert transport.stats.max_pending_bytes == 11
        assert transport.stats.empty_messages == 1
        recorder = Recorder()
        transport.attach(recorder)
        assert bytes(recorder.data) == b"onetwothree"
        ws.fire_message(b"four")
        assert bytes(recorder.data).endswith(b"four")
        transport.close()
        ws.fire_close(1000)
        await gone(transport, ws)

    run(scenario)


@pytest.mark.parametrize(("message", "code", "sent", "reason"), [
    ("text", 1003, 4003, "text message received"),
    (b"x" * 2000, 1009, 4009, "message larger than the 1000 byte limit"),
])
def test_bad_message_fails_with_a_private_code(fake_js: FakeJS, message: bytes | str,
                                               code: int, sent: int, reason: str) -> None:
    async def scenario() -> None:
        transport, ws, recorder = await opened(max_message_bytes=1000)
        ws.fire_message(message)
        assert transport.machine.close_code == code and transport.sent_close_code == sent
        assert reason in ws.close_calls[0][1]
        ws.fire_message(b"ignored")
        assert transport.stats.bytes_ignored_after_close == 7 and not recorder.data
        ws.fire_close(1005)
        await gone(transport, ws)
        await settle()
        assert transport.machine.close_code == code and len(recorder.lost) == 1
        assert f"code {code}" in str(recorder.lost[0])

    run(scenario)


def test_too_many_bytes_before_attach(fake_js: FakeJS) -> None:
    async def scenario() -> None:
        transport = WebSocketTransport("ws://test/tunnel", high_water=100, low_water=10,
                                       max_buffer_bytes=1000, max_message_bytes=600)
        ws = FakeWebSocket.instances[-1]
        ws.fire_open()
        ws.fire_message(b"x" * 600)
        ws.fire_message(b"x" * 600)
        assert transport.machine.close_code == 1009 and transport.sent_close_code == 4009
        assert "more than 1000 bytes arrived before" in transport.machine.close_reason
        with pytest.raises(SocketClosedError, match="1009"):
            transport.attach(Recorder())
        ws.fire_close(1006)
        await gone(transport, ws)

    run(scenario)


def test_empty_message_flood_fails_with_1008(fake_js: FakeJS) -> None:
    async def scenario() -> None:
        transport, ws, _ = await opened()
        for _ in range(600):
            ws.fire_message(b"")
        assert transport.machine.close_code == 1008 and transport.sent_close_code == 4008
        ws.fire_close(1006)
        await gone(transport, ws)

    run(scenario)


def test_protocol_closing_while_taking_held_bytes(fake_js: FakeJS) -> None:
    async def scenario() -> None:
        transport = WebSocketTransport("ws://test/tunnel")
        ws = FakeWebSocket.instances[-1]
        ws.fire_open()
        ws.fire_message(b"bad")
        ws.fire_message(b"more")

        class Closer(Recorder):
            def data_received(self, data: bytes) -> None:
                super().data_received(data)
                self.transport.close()  # e.g. an HTTP/2 protocol error

        closer = Closer()
        transport.attach(closer)
        assert bytes(closer.data) == b"bad", "bytes delivered after the protocol closed"
        await settle()
        assert closer.lost == [None]
        ws.fire_close(1000)
        await gone(transport, ws)

    run(scenario)


def test_the_module_constants_are_the_documented_ones() -> None:
    assert transport_module.CLOSE_TIMEOUT == WebSocketTransport.close_timeout == 5.0
    assert transport_module.ERROR_CLOSE_TIMEOUT == 1.0


# --------------------------------------------------------- TunnelMachine additions


class RecordingIO:
    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[tuple[Any, ...]] = []
        self.to_stream: list[bytes] = []
        self.machine: TunnelMachine | None = None
        self.close_on_write = False

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def record(*args: Any) -> int:
            self.calls.append((name, *args))
            return 0
        return record

    def write_stream(self, data: bytes) -> None:
        self.to_stream.append(data)
        if self.close_on_write and self.machine is not None:
            self.machine.close(CloseCode.NORMAL, "stream side closed")


def test_machine_pending_limit() -> None:
    io = RecordingIO()
    machine = TunnelMachine(io, clock=lambda: io.now, stream_name="client")
    machine.pending_limit = 10
    machine.websocket_opened()
    machine.data(b"x" * 6)
    assert machine.pending_bytes == 6 and machine.close_code is None
    machine.data(b"x" * 6)
    assert machine.close_code == CloseCode.MESSAGE_TOO_BIG
    assert ("fail_websocket", 1009, "more than 10 bytes arrived before the connection was set up"
            ) in io.calls
    assert machine.bytes_from_websocket == 12
    unlimited = TunnelMachine(io, clock=lambda: io.now, stream_name="client")
    unlimited.data(b"x" * 1_000_000)
    assert unlimited.close_code is None and unlimited.pending_bytes == 1_000_000


def test_machine_stops_delivering_held_bytes_once_the_stream_side_closes() -> None:
    io = RecordingIO()
    machine = TunnelMachine(io, clock=lambda: io.now, stream_name="client")
    io.machine = machine
    machine.websocket_opened()
    machine.data(b"one")
    machine.data(b"two")
    io.close_on_write = True
    machine.stream_attached_now()
    assert io.to_stream == [b"one"]
    assert machine.state is TunnelState.CLOSING, "a closing tunnel was marked open"


# ------------------------------------------------- browser.Channel and a retired tunnel


class _ServerEnd(asyncio.Transport):
    """A grpclib server's transport whose writes arrive as messages on a fake WebSocket."""

    def __init__(self, ws: FakeWebSocket) -> None:
        super().__init__()
        self.ws = ws

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.ws.readyState == OPEN:
            asyncio.get_running_loop().call_soon(self.ws.fire_message, bytes(data))

    def is_closing(self) -> bool:
        return self.ws.readyState != OPEN

    def close(self) -> None:
        pass


async def test_browser_channel_moves_new_rpcs_off_a_retired_tunnel(
        fake_js: FakeJS, monkeypatch: pytest.MonkeyPatch) -> None:
    # The bridge side in memory: each FakeWebSocket is a tunnel to a grpclib server; the
    # test injects the GOAWAY a bridge with max_tunnel_age sends, between two writes.
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(fake_js, "queueMicrotask", loop.call_soon)
    store = TodoStore()
    store.create("streamed")
    server = Server([TodoService(store)])
    protocols: dict[FakeWebSocket, asyncio.Protocol] = {}

    def network(url: str, protocols_offered: Any = None) -> FakeWebSocket:
        ws = FakeWebSocket(url, protocols_offered)
        protocol = compat.server_protocol(server)
        protocols[ws] = protocol
        sent = ws.send

        def send(buffer: FakeUint8Array) -> None:
            sent(buffer)
            loop.call_soon(protocol.data_received, buffer.data)

        def close(code: int, reason: str) -> None:
            FakeWebSocket.close(ws, code, reason)
            loop.call_soon(ws.fire_close, code, reason)
            loop.call_soon(protocol.connection_lost, None)

        def opened() -> None:
            ws.protocol = "grpcbridge"
            ws.fire_open()
            protocol.connection_made(_ServerEnd(ws))

        ws.send = send  # type: ignore[method-assign]
        ws.close = close  # type: ignore[method-assign]
        loop.call_soon(opened)
        return ws

    monkeypatch.setattr(FakeWebSocket, "new", staticmethod(network))
    # The channel swaps hyperframe's payload formatter: restored afterwards for later tests.
    monkeypatch.setattr(hyperframe.frame, "_raw_data_repr", hyperframe.frame._raw_data_repr)
    try:
        async with BrowserChannel("ws://bridge.test/grpc") as channel:
            stub = TodoServiceStub(channel)
            async with stub.StreamTodos.open() as stream:
                await stream.send_message(
                    todo_pb2.StreamTodosRequest(repeat=10_000, interval_ms=5), end=True)
                assert await stream.recv_message() is not None
                first = FakeWebSocket.instances[0]
                first.fire_message(GOAWAY)
                await stub.ListTodos(todo_pb2.ListTodosRequest())
                assert len(FakeWebSocket.instances) == 2 and channel.connections_opened == 2
                for _ in range(3):  # the stream goes on over the retired tunnel
                    assert await stream.recv_message() is not None
                assert first.close_calls == []
                await stream.cancel()
            await eventually(lambda: first.close_calls != [])
            assert first.close_calls[0][0] == 1000
            assert FakeWebSocket.instances[1].close_calls == []
    finally:
        store.close()
