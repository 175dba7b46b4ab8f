"""The channel core (``grpcbridge.channel_core``) and the grpclib/h2 compatibility module.

* ``grpcbridge._grpclib_compat``: a grpclib or h2 version outside the supported range fails
  with a clear message (creating a channel included), and the attributes grpcbridge adds to
  grpclib's ``Channel`` do not collide with grpclib's own;
* one set of option names for ``grpcbridge.Channel`` and ``grpcbridge.browser.Channel``; old
  names (``open_timeout``) fail pointing to the new one;
* the core's behaviour, on an in-memory runtime hook (no WebSocket at all): lazy dialing,
  backoff after a failed attempt, a lost connection failing RPCs with UNAVAILABLE naming it,
  close() failing RPCs in flight with CANCELLED (also while connecting), wait_closed;
* ``grpcbridge.browser`` imports neither websockets nor prometheus-client.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpclib
import grpclib.client
import h2
import hyperframe.frame
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server

import grpcbridge
import grpcbridge.browser
from grpcbridge import _grpclib_compat as compat
from grpcbridge.channel_core import (
    CLOSED_STATUS,
    LOST_STATUS,
    RENAMED_OPTIONS,
    ChannelOptions,
    CoreChannel,
    check_options,
    lost_detail,
)
from grpcbridge.core.age import GOAWAY
from grpcbridge.core.errors import ConfigError, HandshakeError, TunnelClosed
from grpcbridge.core.target import parse_target
from grpcbridge.demo import todo_pb2
from grpcbridge.demo.grpclib_service import TodoService
from grpcbridge.demo.store import TodoStore
from grpcbridge.demo.todo_grpc import TodoServiceStub

from support import eventually, timing

LIST = todo_pb2.ListTodosRequest()
SLOW_STREAM = todo_pb2.StreamTodosRequest(repeat=10_000, interval_ms=20)
FAST = grpcbridge.ReconnectPolicy(initial_delay=0.2, max_delay=0.2, jitter=0,
                                  min_connect_timeout=5)


# ------------------------------------------------------------------ compat module


@pytest.fixture
def unchecked() -> None:
    """Forget that this process already checked the versions."""
    compat.require_supported.cache_clear()


@pytest.mark.parametrize(("package", "version"), [
    ("grpclib", "0.5.0"), ("grpclib", "0.3.4"), ("grpclib", "1.0"), ("h2", "5.0.0"),
    ("h2", "3.2.0"), ("grpclib", "not-a-version"),
])
def test_unsupported_version_fails_with_a_clear_message(
        monkeypatch: pytest.MonkeyPatch, unchecked: None, package: str, version: str) -> None:
    module = {"grpclib": grpclib, "h2": h2}[package]
    monkeypatch.setattr(module, "__version__", version)
    with pytest.raises(compat.UnsupportedDependencyError) as failed:
        compat.require_supported()
    message = str(failed.value)
    assert f"{package} {version} is installed" in message, message
    wanted = {"grpclib": "grpclib>=0.4,<0.5", "h2": "h2>=4,<5"}[package]
    assert f"install '{wanted}'" in message, message
    assert "grpcbridge._grpclib_compat" in message, message


async def test_unsupported_version_stops_channels_and_backends(
        monkeypatch: pytest.MonkeyPatch, unchecked: None) -> None:
    monkeypatch.setattr(grpclib, "__version__", "0.5.1")
    with pytest.raises(compat.UnsupportedDependencyError, match=r"grpclib 0\.5\.1 is installed"):
        grpcbridge.Channel("ws://127.0.0.1:1/grpc")
    store = TodoStore()
    try:
        server = Server([TodoService(store)])
        with pytest.raises(compat.UnsupportedDependencyError, match=r"grpclib 0\.5\.1 is"):
            compat.server_protocol(server)
    finally:
        store.close()


def test_installed_versions_are_supported(unchecked: None) -> None:
    assert compat.unsupported_versions() == []
    compat.require_supported()


async def test_core_attributes_do_not_collide_with_grpclibs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """grpcbridge's channels keep their state in attributes of grpclib's Channel object:
    a grpclib release adding an attribute of the same name would break them silently."""
    # The browser channel reads the page location (Pyodide) when created, nothing else; and
    # swaps hyperframe's payload formatter, restored afterwards.
    monkeypatch.setattr(grpcbridge.browser._ffi, "page_location", lambda: None)
    monkeypatch.setattr(hyperframe.frame, "_raw_data_repr", hyperframe.frame._raw_data_repr)
    plain = grpclib.client.Channel("127.0.0.1", 1)
    grpclib_names = {name for klass in type(plain).__mro__ for name in vars(klass)}
    for channel_class in (grpcbridge.Channel, grpcbridge.browser.Channel):
        channel = channel_class("ws://127.0.0.1:1/grpc")
        try:
            ours = set(vars(channel)) - set(vars(plain))
            assert ours, "no attributes of our own?"
            assert not ours & grpclib_names, ours & grpclib_names
            assert channel._authority == "127.0.0.1:1" and channel._scheme == "http"
        finally:
            channel.close()
    plain.close()


# ------------------------------------------------------------------------- options


SHARED_OPTIONS = {"handshake_timeout", "reconnect", "max_message_bytes", "max_frame_size",
                  "bearer_token", "subprotocols", "config", "codec", "status_details_codec"}


def test_both_channels_share_option_names_and_defaults() -> None:
    native = inspect.signature(grpcbridge.Channel.__init__).parameters
    browser = inspect.signature(grpcbridge.browser.Channel.__init__).parameters
    assert set(native) >= SHARED_OPTIONS and set(browser) >= SHARED_OPTIONS
    for name in SHARED_OPTIONS - {"subprotocols"}:  # browsers need a subprotocol to echo
        assert native[name].default == browser[name].default, name
    for old in RENAMED_OPTIONS:
        assert old not in native and old not in browser


async def test_old_option_names_point_to_the_new_ones() -> None:
    with pytest.raises(TypeError, match=r"'open_timeout'.*'handshake_timeout'"):
        grpcbridge.Channel("ws://127.0.0.1:1/grpc", open_timeout=1)  # type: ignore[arg-type]
    # Checked before anything needs Pyodide, so this runs under CPython too.
    with pytest.raises(TypeError, match=r"'open_timeout'.*'handshake_timeout'"):
        grpcbridge.browser.Channel("ws://127.0.0.1:1/grpc",
                                   open_timeout=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unexpected keyword argument 'handshake_timout'"):
        grpcbridge.Channel("ws://127.0.0.1:1/grpc", handshake_timout=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(("options", "message"), [
    ({"handshake_timeout": 0}, "handshake_timeout must be > 0, got 0"),
    ({"handshake_timeout": "5"}, "handshake_timeout must be a number, got '5'"),
    ({"handshake_timeout": float("inf")}, "handshake_timeout must be a finite number"),
    ({"reconnect": 5}, "reconnect must be a grpcbridge.ReconnectPolicy"),
    ({"max_frame_size": 1000}, "max_frame_size must be 16384 to"),
    ({"bearer_token": "a b"}, "bearer_token must be non-empty"),
    ({"subprotocols": "grpcbridge"}, "subprotocols must be a list of strings"),
])
async def test_shared_options_are_checked_alike(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        grpcbridge.Channel("ws://127.0.0.1:1/grpc", **options)
    with pytest.raises(ConfigError, match=message):
        grpcbridge.browser.Channel("ws://127.0.0.1:1/grpc", **options)


def test_handshake_timeout_defaults_to_the_policys_connect_timeout() -> None:
    options = check_options("FakeChannel", (), handshake_timeout=None, reconnect=FAST,
                            max_message_bytes=1 << 20,
                            max_frame_size=None, bearer_token="secret", subprotocols=(),
                            buffer_bytes=4096)
    assert options.handshake_timeout == FAST.min_connect_timeout
    assert options.max_frame_size == (1 << 20) - 9  # fitted below the message limit
    assert "secret" not in repr(options)


def test_lost_detail_names_the_connection() -> None:
    closed = "tunnel to ws://h/grpc closed with code 1001 (going away)"
    assert lost_detail("Connection lost", closed) == closed
    assert lost_detail("", None) == "connection lost"
    assert lost_detail("Connection lost", None) == "Connection lost"
    assert lost_detail("Received GOAWAY frame, closing connection; error_code: 0", closed) == (
        f"{closed} (Received GOAWAY frame, closing connection; error_code: 0)")
    assert lost_detail("write refused: code 1001", closed) == "write refused: code 1001"


# ------------------------------------------------------ the core on a fake runtime


class _MemoryTransport(asyncio.Transport):
    """One end of an in-memory connection between two protocols."""

    def __init__(self, connection: FakeConnection, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self._connection = connection
        self.protocol = protocol
        self.peer: _MemoryTransport | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._connection.lose_writes and self is self._connection._ends[0]:
            return  # the client's bytes never reach the server
        if self._connection.code is None and self.peer is not None:
            asyncio.get_running_loop().call_soon(self.peer.protocol.data_received, bytes(data))

    def is_closing(self) -> bool:
        return self._connection.code is not None

    def close(self) -> None:
        self._connection.drop(1000, "")

    def abort(self) -> None:
        self._connection.drop(1006, "")


class FakeConnection:
    """The runtime hook's connection, in memory: the far end is a grpclib server."""

    close_timeout = 1.0

    def __init__(self, runtime: FakeRuntime) -> None:
        self._runtime = runtime
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.code: int | None = None
        self.reason = ""
        self._ends: list[_MemoryTransport] = []
        self.closes = 0
        #: Drop what the client writes from now on (the server never sees it).
        self.lose_writes = False

    async def wait_open(self, within: float) -> None:
        self._runtime.within.append(within)
        self._runtime.dialing.set()
        await self._runtime.gate.wait()
        if self._runtime.refuse:
            self.drop(1006, "")
            raise HandshakeError("refused by the fake runtime")

    def attach(self, protocol: asyncio.Protocol) -> None:
        server = compat.server_protocol(self._runtime.server)
        client_end = _MemoryTransport(self, protocol)
        server_end = _MemoryTransport(self, server)
        client_end.peer, server_end.peer = server_end, client_end
        self._ends = [client_end, server_end]
        server.connection_made(server_end)
        protocol.connection_made(client_end)

    @property
    def usable(self) -> bool:
        return self.code is None and bool(self._ends)

    def loss_description(self) -> str | None:
        return None if self.code is None else f"fake closed with code {self.code}"

    def close(self) -> None:
        self.closes += 1
        self.drop(1000, "")

    def abort(self) -> None:
        self.drop(1006, "")

    def drop(self, code: int, reason: str) -> None:
        if self.code is not None:
            return
        self.code, self.reason = code, reason
        loop = asyncio.get_running_loop()
        for end in self._ends:
            loop.call_soon(end.protocol.connection_lost, None)
        loop.call_soon(self.closed.set_result, None)


class FakeRuntime:
    def __init__(self, store: TodoStore) -> None:
        self.server = Server([TodoService(store)])
        self.connections: list[FakeConnection] = []
        self.dialing = asyncio.Event()
        self.refuse = False
        self.gate = asyncio.Event()
        self.gate.set()
        self.within: list[float] = []


@pytest.fixture
async def runtime() -> AsyncIterator[FakeRuntime]:
    store = TodoStore()
    store.create("first")
    yield FakeRuntime(store)
    store.close()


class FakeChannel(CoreChannel[FakeConnection]):
    _public_name = "FakeChannel"

    def __init__(self, runtime: FakeRuntime, **options: Any) -> None:
        checked: ChannelOptions = check_options(
            "FakeChannel", (),
            handshake_timeout=options.get("handshake_timeout"), reconnect=FAST,
            max_message_bytes=1 << 20, max_frame_size=None, bearer_token=None,
            subprotocols=(), buffer_bytes=4096)
        super().__init__(parse_target("ws://fake.example:81/grpc"), checked, codec=None,
                         status_details_codec=None, config=None)
        self.runtime = runtime

    def _new_connection(self) -> FakeConnection:
        connection = FakeConnection(self.runtime)
        self.runtime.connections.append(connection)
        return connection


@contextlib.asynccontextmanager
async def streaming(stub: TodoServiceStub) -> AsyncIterator[Any]:
    """A slow StreamTodos that has sent its first message."""
    async with stub.StreamTodos.open() as stream:
        await stream.send_message(SLOW_STREAM, end=True)
        assert await stream.recv_message() is not None
        yield stream


async def _status(coro: Any) -> tuple[Status, str]:
    with pytest.raises(GRPCError) as failed:
        await coro
    return failed.value.status, failed.value.message or ""


async def test_dials_lazily_and_once(runtime: FakeRuntime) -> None:
    async with FakeChannel(runtime, handshake_timeout=3) as channel:
        assert runtime.connections == [] and channel.connections_opened == 0
        stub = TodoServiceStub(channel)
        await asyncio.gather(*(stub.ListTodos(LIST) for _ in range(5)))
        assert len(runtime.connections) == 1 and channel.connections_opened == 1
        assert runtime.within == [3]
        assert repr(channel) == "FakeChannel('ws://fake.example:81/grpc')"


async def test_lost_connection_is_unavailable_and_the_next_rpc_redials(
        runtime: FakeRuntime) -> None:
    async with FakeChannel(runtime) as channel:
        stub = TodoServiceStub(channel)
        async with streaming(stub) as stream:
            runtime.connections[0].drop(1011, "gone")
            status, message = await _status(stream.recv_message())
        assert status is LOST_STATUS is Status.UNAVAILABLE
        assert message == "fake closed with code 1011", message
        await stub.ListTodos(LIST)
        assert len(runtime.connections) == 2 and channel.connections_opened == 2


async def test_goaway_moves_new_rpcs_to_a_new_connection_and_retires_the_old(
        runtime: FakeRuntime, caplog: pytest.LogCaptureFixture) -> None:
    # What both channels (grpcbridge.Channel, grpcbridge.browser.Channel) do when a bridge
    # retires a tunnel (max_tunnel_age): h2 never sees the GOAWAY, so the stream in flight
    # goes on; new RPCs dial; the old connection closes after its last stream.
    async with FakeChannel(runtime) as channel:
        stub = TodoServiceStub(channel)
        async with streaming(stub) as stream:
            old = runtime.connections[0]
            client = old._ends[0].protocol  # between two writes: at a frame boundary
            with caplog.at_level(logging.DEBUG, logger="grpcbridge.channel_core"):
                client.data_received(GOAWAY)
                client.data_received(GOAWAY)  # a second one: logged once all the same
            assert not channel.connection_usable()
            assert [record.getMessage() for record in caplog.records] == [
                "FakeChannel('ws://fake.example:81/grpc'): the server retires tunnel #1 "
                "(GOAWAY, last_stream_id 2147483647); new RPCs open a new tunnel"]
            await stub.ListTodos(LIST)
            assert len(runtime.connections) == 2 and channel.connections_opened == 2
            for _ in range(3):
                assert await stream.recv_message() is not None  # still on the old one
            assert old.closes == 0
            await stream.cancel()
        await eventually(lambda: old.closes == 1)
        assert runtime.connections[1].closes == 0
        await stub.ListTodos(LIST)
        assert len(runtime.connections) == 2


def _goaway(last_stream_id: int) -> bytes:
    frame = hyperframe.frame.GoAwayFrame(0)
    frame.last_stream_id = last_stream_id
    return bytes(frame.serialize())


async def test_streams_a_goaway_leaves_out_fail_at_once_as_safe_to_retry(
        runtime: FakeRuntime) -> None:
    # A backend's own GOAWAY(N) (e.g. its max connection age, second phase): the server
    # never processed the streams above N. They fail at once, retryable; those up to N go on.
    async with FakeChannel(runtime) as channel:
        stub = TodoServiceStub(channel)
        async with streaming(stub) as stream:  # stream 1
            old = runtime.connections[0]
            client = old._ends[0].protocol
            old.lose_writes = True  # stream 3's request never reaches the server
            unprocessed = asyncio.ensure_future(stub.ListTodos(LIST))
            await eventually(lambda: 3 in compat.open_streams(client))
            old.lose_writes = False
            client.data_received(_goaway(1))
            status, message = await _status(asyncio.wait_for(unprocessed, timing(10)))
            assert status is Status.UNAVAILABLE
            assert message == compat.UNPROCESSED_REASON == (
                "not processed by the server (GOAWAY), safe to retry")
            assert not channel.connection_usable()
            await stub.ListTodos(LIST)  # the retry: on a new connection
            assert len(runtime.connections) == 2
            for _ in range(3):
                assert await stream.recv_message() is not None  # stream 1 goes on
            await stream.cancel()
        await eventually(lambda: old.closes == 1)


@pytest.mark.parametrize("last_stream_id", [compat.LAST_STREAM_ID, 1])
async def test_a_stream_waiting_to_write_is_not_lost_when_its_connection_retires(
        runtime: FakeRuntime, last_stream_id: int) -> None:
    # An RPC that chose the connection while writing was paused registers its stream only
    # once writing resumes: the retiring connection must not be closed under it. With a
    # GOAWAY(1), its stream (3) was opened after the GOAWAY: it fails as never processed.
    async with FakeChannel(runtime) as channel:
        stub = TodoServiceStub(channel)
        await stub.ListTodos(LIST)  # stream 1, done: the connection has no stream left
        old = runtime.connections[0]
        client = old._ends[0].protocol
        write_ready = client.connection.write_ready
        client.pause_writing()
        waiting = asyncio.ensure_future(stub.ListTodos(LIST))
        await eventually(lambda: len(write_ready._waiters) == 1)
        client.data_received(_goaway(last_stream_id))
        # The retiring connection waits for writing to resume too, not closed meanwhile.
        await eventually(lambda: len(write_ready._waiters) == 2)
        assert old.closes == 0 and not compat.open_streams(client)
        client.resume_writing()
        if last_stream_id == 1:
            status, message = await _status(asyncio.wait_for(waiting, timing(10)))
            assert (status, message) == (Status.UNAVAILABLE, compat.UNPROCESSED_REASON)
        else:
            reply = await asyncio.wait_for(waiting, timing(10))
            assert [todo.text for todo in reply.todos] == ["first"]
        await eventually(lambda: old.closes == 1)
        assert len(runtime.connections) == 1


async def test_a_goaway_after_close_starts_no_retirement(runtime: FakeRuntime) -> None:
    channel = FakeChannel(runtime)
    await TodoServiceStub(channel).ListTodos(LIST)
    client = runtime.connections[0]._ends[0].protocol
    channel.close()
    client.data_received(GOAWAY)
    assert not channel._retiring
    await channel.wait_closed()


async def test_failed_attempt_backs_off_then_redials(runtime: FakeRuntime) -> None:
    runtime.refuse = True
    async with FakeChannel(runtime) as channel:
        stub = TodoServiceStub(channel)
        assert await _status(stub.ListTodos(LIST)) == (Status.UNAVAILABLE,
                                                       "refused by the fake runtime")
        status, message = await _status(stub.ListTodos(LIST))  # within the 0.2 s backoff
        assert status is Status.UNAVAILABLE and "next attempt in" in message, message
        assert "refused by the fake runtime" in message
        assert len(runtime.connections) == 1
        runtime.refuse = False

        async def redialed() -> bool:  # RPCs fail fast, dialing nothing, until it is over
            try:
                await stub.ListTodos(LIST)
            except GRPCError as error:
                assert "next attempt in" in str(error.message), error.message
                return False
            return True

        await eventually(redialed, 5, interval=0.05, message="no redial after the backoff")
        assert len(runtime.connections) == 2 and channel.connections_opened == 1


async def test_close_cancels_rpcs_in_flight_and_refuses_new_ones(runtime: FakeRuntime) -> None:
    channel = FakeChannel(runtime)
    stub = TodoServiceStub(channel)
    async with stub.StreamTodos.open() as stream:
        await stream.send_message(SLOW_STREAM, end=True)
        assert await stream.recv_message() is not None
        await asyncio.gather(channel.wait_closed(), channel.wait_closed())
        status, message = await _status(stream.recv_message())
    assert status is CLOSED_STATUS is Status.CANCELLED
    assert message == "FakeChannel('ws://fake.example:81/grpc') was closed", message
    connection = runtime.connections[0]
    assert connection.closed.done() and connection.code == 1000
    with pytest.raises(TunnelClosed, match="is closed; create a new Channel"):
        await stub.ListTodos(LIST)
    channel.close()
    await channel.wait_closed()


async def test_close_while_connecting_cancels_the_waiting_rpc(runtime: FakeRuntime) -> None:
    runtime.gate.clear()
    channel = FakeChannel(runtime)
    call = asyncio.ensure_future(TodoServiceStub(channel).ListTodos(LIST))
    await asyncio.wait_for(runtime.dialing.wait(), 5)
    channel.close()
    runtime.gate.set()
    status, message = await _status(call)
    assert status is Status.CANCELLED and "was closed while connecting" in message, message
    assert runtime.connections[0].code == 1000
    await channel.wait_closed()


# ----------------------------------------------------------------- browser imports


def test_browser_package_imports_no_server_side() -> None:
    code = (
        "import sys\n"
        "sys.modules['websockets'] = None\n"  # importing it now fails
        "import grpcbridge.browser, grpcbridge.channel_core\n"
        "bad = [m for m, mod in sys.modules.items() if mod is not None and (m.split('.')[0] in "
        "('websockets', 'prometheus_client') or m in ('grpcbridge.relay', 'grpcbridge.pipe'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
