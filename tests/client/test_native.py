"""Native Python on both ends: ``grpcbridge.Channel`` against in-process bridges.

* reconnecting after the bridge went away and came back; handshakes to dead or silent
  targets failing within ``handshake_timeout`` with a clear message;
* close semantics of channels, bridges, ASGI apps and threaded bridges: idempotent,
  concurrent, after the peer vanished, and leaving no task, socket or file behind;
* a thousand open/call/close cycles without growth in tasks, file descriptors or memory;
* a tunnel dropped by the server mid-stream failing the RPC with UNAVAILABLE that names the
  close code, and the next RPC reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import grpclib.client
import psutil
import pytest
import uvicorn
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

import grpcbridge
from grpcbridge import (
    Bridge,
    BridgeApp,
    BridgeConfig,
    Channel,
    CloseCode,
    GrpclibBackend,
    InvalidStateError,
    ReconnectPolicy,
    TunnelClosed,
)
from grpcbridge.demo import todo_pb2, todo_pb2_grpc
from grpcbridge.demo.grpclib_service import TodoService
from grpcbridge.demo.service import TodoServicer
from grpcbridge.demo.store import TodoStore
from grpcbridge.demo.todo_grpc import TodoServiceStub
from grpcbridge.loops import loop_factory

from support import MiB, eventually, free_port

FAST = ReconnectPolicy(initial_delay=0.05, max_delay=0.2, jitter=0.1, min_connect_timeout=5)
LIST = todo_pb2.ListTodosRequest()
SLOW_STREAM = todo_pb2.StreamTodosRequest(repeat=10_000, interval_ms=20)


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def store() -> Iterator[TodoStore]:
    store = TodoStore()
    store.create("first")
    store.create("second")
    yield store
    store.close()


def grpclib_config(store: TodoStore, listen: str = "127.0.0.1:0", **options: Any) -> BridgeConfig:
    return BridgeConfig(backend=GrpclibBackend([TodoService(store)]), listen=listen, **options)


def other_tasks() -> set[asyncio.Task[Any]]:
    return {task for task in asyncio.all_tasks() if task is not asyncio.current_task()}


async def assert_no_tasks_left(within: float = 3.0) -> None:
    """Every task but the test's own finishes (callbacks may need a few loop turns)."""
    await eventually(lambda: not other_tasks(), within,
                     message=lambda: f"tasks left behind: {other_tasks()}")


def exists(path: str) -> bool:
    return os.path.exists(path)


async def rpc_status(coro: Any) -> tuple[Status, str]:
    """Await an RPC that must fail; its status and message."""
    with pytest.raises(GRPCError) as failed:
        await coro
    return failed.value.status, failed.value.message or ""


@contextlib.asynccontextmanager
async def silent_listener() -> AsyncIterator[str]:
    """A TCP listener that accepts connections and never answers (a black hole)."""
    transports: list[asyncio.BaseTransport] = []

    class Silent(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transports.append(transport)

    server = await asyncio.get_running_loop().create_server(Silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"ws://127.0.0.1:{port}/grpc"
    finally:
        server.close()
        for transport in transports:
            transport.abort()
        await server.wait_closed()


class FreezableProxy:
    """A TCP proxy that can stop relaying while keeping both connections open: to the client
    the server then vanished without a FIN, RST or close frame."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = False
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> FreezableProxy:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pump(source, sink))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while data := await source.read(65536):
            if self.frozen:
                continue  # swallowed: the peer has "vanished"
            sink.write(data)
            await sink.drain()

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for writer in self.writers:
            writer.transport.abort()
        await self.server.wait_closed()


# ------------------------------------------------------------------ (a) reconnecting


async def test_reconnects_after_bridge_restart(store: TodoStore, leak_check: None) -> None:
    bridge = Bridge(grpclib_config(store))
    await bridge.start()
    assert bridge.address is not None
    port = bridge.address[1]
    restarted: Bridge | None = None
    try:
        async with Channel(bridge.url, reconnect=FAST) as channel:
            stub = TodoServiceStub(channel)
            assert len((await stub.ListTodos(LIST)).todos) == 2

            # In flight when the bridge goes away: UNAVAILABLE naming the close code.
            async with stub.StreamTodos.open() as stream:
                await stream.send_message(SLOW_STREAM, end=True)
                assert await stream.recv_message() is not None
                await bridge.close(drain_timeout=0)
                with pytest.raises(GRPCError) as in_flight:
                    while True:
                        assert await stream.recv_message() is not None
            assert in_flight.value.status is Status.UNAVAILABLE
            assert "1001" in (in_flight.value.message or ""), in_flight.value.message

            # While down: fail fast with UNAVAILABLE (refused, then backing off).
            for _ in range(3):
                started = time.monotonic()
                status, message = await rpc_status(stub.ListTodos(LIST))
                assert status is Status.UNAVAILABLE
                assert "cannot connect" in message or "is down" in message, message
                assert time.monotonic() - started < 1

            # Back on the same port: the channel recovers once the backoff has passed.
            restarted = Bridge(grpclib_config(store, listen=f"127.0.0.1:{port}"))
            await restarted.start()
            replies: list[todo_pb2.ListTodosResponse] = []

            async def recovered() -> bool:
                try:
                    replies.append(await stub.ListTodos(LIST, timeout=5))
                except GRPCError as exc:
                    assert exc.status is Status.UNAVAILABLE
                    return False
                return True

            await eventually(recovered, 5, interval=0.02, message="the channel did not recover")
            (reply,) = replies
            assert len(reply.todos) == 2
            assert restarted.active_tunnels == 1
    finally:
        await bridge.close()
        if restarted is not None:
            await restarted.close()
    await assert_no_tasks_left()


async def test_handshake_to_black_hole_times_out(leak_check: None) -> None:
    async with silent_listener() as url:
        channel = Channel(url, handshake_timeout=0.3, reconnect=FAST)
        started = time.monotonic()
        status, message = await rpc_status(TodoServiceStub(channel).ListTodos(LIST))
        took = time.monotonic() - started
        await channel.wait_closed()
    assert status is Status.UNAVAILABLE
    assert 0.25 < took < 1.5, took
    assert message == f"no WebSocket handshake with {url} within 0.3 s"
    await assert_no_tasks_left()


async def test_handshake_to_dead_port_fails_at_once(leak_check: None) -> None:
    url = f"ws://127.0.0.1:{free_port()}/grpc"
    async with Channel(url, handshake_timeout=5, reconnect=FAST) as channel:
        started = time.monotonic()
        status, message = await rpc_status(TodoServiceStub(channel).ListTodos(LIST))
        assert time.monotonic() - started < 1
    assert status is Status.UNAVAILABLE
    assert message.startswith(f"cannot connect to {url}: "), message
    await assert_no_tasks_left()


async def test_rejected_upgrade_is_reported(store: TodoStore, leak_check: None) -> None:
    async with Bridge(grpclib_config(store, path="/grpc")) as bridge:
        url = bridge.url.replace("/grpc", "/elsewhere")
        async with Channel(url, reconnect=FAST) as channel:
            status, message = await rpc_status(TodoServiceStub(channel).ListTodos(LIST))
    assert status is Status.UNAVAILABLE
    assert "refused the WebSocket upgrade: HTTP 404" in message, message
    await assert_no_tasks_left()


async def test_bearer_token_and_headers_reach_the_bridge(store: TodoStore,
                                                         leak_check: None) -> None:
    """Channel(bearer_token=, headers=) and Forwarder(headers=, bearer_token=) send them on
    the upgrade (setting a header the request does not have yet must not fail)."""
    seen: list[tuple[str | None, str | None]] = []
    check = grpcbridge.BearerTokenAuth("s3cret")

    def authenticate(request: grpcbridge.HandshakeRequest) -> grpcbridge.Rejection | None:
        seen.append((request.header("x-api-key"), request.header("authorization")))
        return check(request)

    async with Bridge(grpclib_config(store, authenticate=authenticate)) as bridge:
        async with Channel(bridge.url, bearer_token="s3cret",
                           headers={"X-Api-Key": "k1"}) as channel:
            assert len((await TodoServiceStub(channel).ListTodos(LIST)).todos) == 2
        async with Channel(bridge.url, bearer_token="wrong", reconnect=FAST) as channel:
            status, message = await rpc_status(TodoServiceStub(channel).ListTodos(LIST))
            assert status is Status.UNAVAILABLE and "HTTP 403" in message, message

        config = grpcbridge.ForwarderConfig(target=bridge.url, listen="127.0.0.1:0",
                                            bearer_token="s3cret", headers={"X-Api-Key": "k2"})
        async with grpcbridge.Forwarder(config) as forwarder:
            assert forwarder.address is not None
            plain = grpclib.client.Channel(*forwarder.address)
            try:
                assert len((await TodoServiceStub(plain).ListTodos(LIST, timeout=5)).todos) == 2
            finally:
                plain.close()
    assert seen == [("k1", "Bearer s3cret"), (None, "Bearer wrong"), ("k2", "Bearer s3cret")]
    await assert_no_tasks_left()


# ------------------------------------------------------------------- (b) closing


async def test_channel_close_is_idempotent_and_concurrent(store: TodoStore,
                                                          leak_check: None) -> None:
    async with Bridge(grpclib_config(store)) as bridge:
        channel = Channel(bridge.url)
        stub = TodoServiceStub(channel)
        assert (await stub.ListTodos(LIST)).todos
        channel.close()
        channel.close()
        await asyncio.gather(channel.wait_closed(), channel.wait_closed())
        await channel.wait_closed()
        with pytest.raises(TunnelClosed):
            await stub.ListTodos(LIST)
        with pytest.raises(TunnelClosed):
            async with stub.StreamTodos.open() as stream:
                await stream.send_message(SLOW_STREAM, end=True)

        # Closing from two tasks at once, while an RPC is in flight.
        channel = Channel(bridge.url)
        stub = TodoServiceStub(channel)
        async with stub.StreamTodos.open() as stream:
            await stream.send_message(SLOW_STREAM, end=True)
            assert await stream.recv_message() is not None
            await asyncio.gather(channel.wait_closed(), channel.wait_closed())
            with pytest.raises(GRPCError) as in_flight:
                while True:
                    assert await stream.recv_message() is not None
        # Closed by us, as in grpcio: CANCELLED (UNAVAILABLE would invite a retry).
        assert in_flight.value.status is Status.CANCELLED
        assert "was closed" in (in_flight.value.message or "")
        await eventually(lambda: bridge.connections == 0)
    await assert_no_tasks_left()


async def test_channel_close_after_server_aborted(store: TodoStore, leak_check: None) -> None:
    async with Bridge(grpclib_config(store)) as bridge:
        channel = Channel(bridge.url)
        assert (await TodoServiceStub(channel).ListTodos(LIST)).todos
        for tunnel in list(bridge._sessions):  # no public handle on single tunnels
            tunnel.machine.abort()
        await eventually(lambda: bridge.connections == 0)
        started = time.monotonic()
        await asyncio.gather(channel.wait_closed(), channel.wait_closed())
        channel.close()
        assert time.monotonic() - started < 0.5
    await assert_no_tasks_left()


async def test_channel_close_after_peer_vanished(store: TodoStore, leak_check: None) -> None:
    async with Bridge(grpclib_config(store)) as bridge:
        assert bridge.address is not None
        async with FreezableProxy(bridge.address[1]) as proxy:
            channel = Channel(f"ws://127.0.0.1:{proxy.port}/grpc")
            assert (await TodoServiceStub(channel).ListTodos(LIST)).todos
            proxy.frozen = True  # no close frame will ever come back
            started = time.monotonic()
            await asyncio.gather(channel.wait_closed(), channel.wait_closed())
            took = time.monotonic() - started
    # The close frame is sent and the connection closed without waiting for an answer
    # that will never come.
    assert took < 1, took
    await assert_no_tasks_left()


async def test_bridge_close_twice_and_concurrently(store: TodoStore, leak_check: None) -> None:
    directory = tempfile.mkdtemp(prefix="grpcbridge-test-")
    path = os.path.join(directory, "bridge.sock")
    bridge = Bridge(grpclib_config(store, listen=f"unix:{path}"))
    await bridge.start()
    assert exists(path)
    await asyncio.gather(bridge.close(), bridge.close())
    await bridge.close()
    assert not exists(path)
    os.rmdir(directory)

    tcp = Bridge(grpclib_config(store))
    await tcp.start()
    async with Channel(tcp.url) as channel:
        assert (await TodoServiceStub(channel).ListTodos(LIST)).todos
        await tcp.close(drain_timeout=0)
        await tcp.close()
    with pytest.raises(InvalidStateError):
        await tcp.start()
    await assert_no_tasks_left()


class _QuietUvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def test_bridge_app_close_twice(store: TodoStore, leak_check: None) -> None:
    app = BridgeApp(BridgeConfig(backend=GrpclibBackend([TodoService(store)])))
    server = _QuietUvicorn(uvicorn.Config(
        Starlette(routes=[WebSocketRoute("/grpc", app)]), host="127.0.0.1", port=0,
        ws="websockets-sansio", lifespan="off", log_level="warning"))
    task = asyncio.get_running_loop().create_task(server.serve())
    await eventually(lambda: server.started)
    port = server.servers[0].sockets[0].getsockname()[1]
    async with Channel(f"ws://127.0.0.1:{port}/grpc") as channel:
        assert (await TodoServiceStub(channel).ListTodos(LIST)).todos
        assert app.active_tunnels == 1
    await eventually(lambda: app.active_tunnels == 0)
    server.should_exit = True
    await asyncio.wait_for(task, 10)
    await asyncio.gather(app.close(), app.close())
    await app.close()
    await assert_no_tasks_left()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_attached_grpcio_close_twice_removes_socket(loop: Any, leak_check: None) -> None:
    # Sync grpc.server: the bridge runs on its own thread, on the loop asked for.
    store = TodoStore()
    executor = ThreadPoolExecutor(4)
    server = grpc.server(executor)
    todo_pb2_grpc.add_TodoServiceServicer_to_server(TodoServicer(store), server)
    threaded = grpcbridge.attach_grpcio(server, listen="127.0.0.1:0", loop=loop)
    directory = threaded.config.backend.directory  # type: ignore[union-attr]
    assert exists(directory)
    server.start()
    with threaded:
        assert threaded.loop_kind == loop
        async with Channel(threaded.url) as channel:
            assert len((await TodoServiceStub(channel).ListTodos(LIST)).todos) == 0
        threaded.stop()
    threaded.stop()
    assert not exists(directory)
    server.stop(None).wait()
    executor.shutdown()
    store.close()
    await assert_no_tasks_left()


async def test_attached_grpcio_aio_close_twice_removes_socket() -> None:
    # grpc.aio keeps process-wide pollers after first use, so no leak_check here; the
    # bridge's own resources are checked directly.
    server = grpc.aio.server()
    todo_pb2_grpc.add_TodoServiceServicer_to_server(todo_pb2_grpc.TodoServiceServicer(), server)
    bridge = grpcbridge.attach_grpcio(server, threaded=False, listen="127.0.0.1:0")
    directory = bridge.config.backend.directory  # type: ignore[union-attr]
    await server.start()
    await bridge.start()
    process = psutil.Process()
    listening = {c.laddr for c in process.net_connections("tcp") if c.status == "LISTEN"}
    assert bridge.address is not None and bridge.address in {tuple(a) for a in listening}
    async with Channel(bridge.url) as channel:
        status, _ = await rpc_status(TodoServiceStub(channel).ListTodos(LIST))
        assert status is Status.UNIMPLEMENTED  # the base servicer: reached the server
    await asyncio.gather(bridge.close(), bridge.close())
    await bridge.close()
    assert not exists(directory)
    listening = {c.laddr for c in process.net_connections("tcp") if c.status == "LISTEN"}
    assert bridge.address not in {tuple(a) for a in listening}
    await server.stop(None)


def _h2(channel: Channel) -> Any:
    protocol = channel._protocol
    assert protocol is not None
    return protocol.connection._connection


@pytest.mark.parametrize(("bridge_limit", "server_frames"), [
    (None, 1024 * 1024),               # defaults: 16 MiB messages, 1 MiB frames
    (300 * 1024, 300 * 1024 - 9),      # a smaller message limit: frames fitted below it
])
async def test_both_ends_negotiate_large_frames(store: TodoStore, bridge_limit: int | None,
                                                server_frames: int) -> None:
    options = {} if bridge_limit is None else {"max_message_bytes": bridge_limit}
    big = "x" * (200 * 1024)  # a message far above HTTP/2's 16 KiB default frame size
    async with Bridge(grpclib_config(store, **options)) as bridge, \
            Channel(bridge.url) as channel:
        stub = TodoServiceStub(channel)
        created = await stub.CreateTodo(todo_pb2.CreateTodoRequest(text=big))
        listed = await stub.ListTodos(LIST)
        assert [t.text for t in listed.todos if t.id == created.id] == [big]
        h2 = _h2(channel)
        assert h2.local_settings.max_frame_size == 1024 * 1024  # the server acknowledged it
        assert h2.remote_settings.max_frame_size == server_frames  # what the backend asked


async def test_frame_size_options_are_validated(store: TodoStore) -> None:
    with pytest.raises(grpcbridge.ConfigError, match="16384 to 16777215"):
        GrpclibBackend([TodoService(store)], max_frame_size=1000)
    with pytest.raises(grpcbridge.ConfigError, match="must fit in max_message_bytes"):
        Channel("ws://127.0.0.1:9/grpc", max_frame_size=1024 * 1024,
                max_message_bytes=512 * 1024)


class _AioTodos(todo_pb2_grpc.TodoServiceServicer):
    async def ListTodos(self, request: Any, context: Any) -> Any:
        peer_metadata = dict(context.invocation_metadata())
        todo = todo_pb2.Todo(id="1", text=f"for {peer_metadata.get('who', '?')}")
        return todo_pb2.ListTodosResponse(todos=[todo])


async def test_threaded_bridge_serves_an_aio_server() -> None:
    # grpc.aio server on this loop, bridge on its own thread and loop ("auto": uvloop here,
    # since the dev extras install it).
    server = grpc.aio.server()
    todo_pb2_grpc.add_TodoServiceServicer_to_server(_AioTodos(), server)
    threaded = grpcbridge.attach_grpcio(server, listen="127.0.0.1:0")
    directory = threaded.config.backend.directory  # type: ignore[union-attr]
    await server.start()
    await asyncio.to_thread(threaded.start)
    try:
        assert threaded.loop_kind == "uvloop"
        async with Channel(threaded.url) as channel:
            listed = await TodoServiceStub(channel).ListTodos(LIST, metadata={"who": "me"})
            assert [t.text for t in listed.todos] == ["for me"]
    finally:
        await asyncio.to_thread(threaded.stop)
        await server.stop(None)
    assert not exists(directory)


def test_loop_choices_are_validated() -> None:
    server = grpc.server(ThreadPoolExecutor(1))
    with pytest.raises(grpcbridge.ConfigError, match=r"auto, asyncio, uvloop.*'trio'"):
        grpcbridge.attach_grpcio(server, listen="127.0.0.1:0", loop="trio")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="threaded=True only"):
        grpcbridge.attach_grpcio(server, threaded=False, loop="uvloop",  # type: ignore[call-overload]
                                 listen="127.0.0.1:0")
    assert loop_factory("asyncio") is asyncio.new_event_loop
    assert loop_factory("auto") is loop_factory("uvloop")  # uvloop is a dev dependency
    server.stop(None)


def test_loop_choice_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what `import uvloop` sees without it
    assert loop_factory("auto") is asyncio.new_event_loop
    with pytest.raises(grpcbridge.ConfigError, match=r"pip install uvloop"):
        loop_factory("uvloop")


_DIAL_TUNES_ALLOCATOR = """
import asyncio
from grpcbridge import Bridge, BridgeConfig, Channel, GrpclibBackend
from grpcbridge.demo import todo_pb2
from grpcbridge.demo.grpclib_service import TodoService
from grpcbridge.demo.store import TodoStore
from grpcbridge.demo.todo_grpc import TodoServiceStub
from grpcbridge.loops import tune_allocator

async def main():
    store = TodoStore()
    bridge = Bridge(BridgeConfig(backend=GrpclibBackend([TodoService(store)]),
                                 listen="127.0.0.1:0"))
    await bridge.start()
    before = tune_allocator.cache_info().currsize
    async with Channel(bridge.url) as channel:
        await TodoServiceStub(channel).ListTodos(todo_pb2.ListTodosRequest())
    await bridge.close()
    store.close()
    print(before, tune_allocator.cache_info().currsize, tune_allocator())

asyncio.run(main())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_first_dial_tunes_the_allocator(tmp_path: Any) -> None:
    # Without the tuning a Channel streaming 64 KiB messages page-faults on every message
    # (10x the faults of the websockets client it replaced; docs/benchmarks.md). A fresh
    # process, so no earlier test has tuned this one; GRPCBRIDGE_MALLOC_TUNING=0 opts out.
    for setting, applied in (("1", "True"), ("0", "False")):
        done = subprocess.run([sys.executable, "-c", _DIAL_TUNES_ALLOCATOR], cwd=tmp_path,
                              env={**os.environ, "GRPCBRIDGE_MALLOC_TUNING": setting},
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["0", "1", applied], (setting, done.stdout)


# --------------------------------------------------------------------- (c) no leaks

CYCLES = 1000
WARM_UP = 100
#: RSS may stay this far above its post-warm-up value after CYCLES more cycles. Measured:
#: +2 to +3 MiB of allocator growth over the first 1,000 cycles after the warm-up (once
#: grpcio has run in the process), then flat over 2,000 more. Leaks of Python objects are
#: caught precisely by the gc object count instead: one object per cycle shows as +1,000.
RSS_SLACK = 6 * MiB
OBJECT_SLACK = 800


async def test_thousand_channels_leave_nothing_behind(store: TodoStore,
                                                      leak_check: None) -> None:
    process = psutil.Process()
    backend = GrpclibBackend([TodoService(store)])
    config = BridgeConfig(backend=backend, listen="127.0.0.1:0", max_upgrades_per_minute=0)
    async with Bridge(config) as bridge:
        url = bridge.url

        async def cycle() -> None:
            async with Channel(url) as channel:
                reply = await TodoServiceStub(channel).ListTodos(LIST, timeout=10)
                assert len(reply.todos) == 2

        async def settle() -> tuple[int, int, int, int]:
            await eventually(lambda: bridge.connections == 0 and len(other_tasks()) == 1)
            gc.collect()
            return (len(other_tasks()), process.num_fds(), process.memory_info().rss,
                    len(gc.get_objects()))

        for _ in range(WARM_UP):
            await cycle()
        tasks0, fds0, rss0, objects0 = await settle()
        started = time.monotonic()
        for _ in range(CYCLES):
            await cycle()
        took = time.monotonic() - started
        tasks1, fds1, rss1, objects1 = await settle()
        handlers = len(backend._server._handlers)  # grpclib's per-connection handlers

    print(f"{CYCLES} cycles in {took:.1f} s; tasks {tasks0} -> {tasks1}, fds {fds0} -> {fds1}, "
          f"RSS {rss0 / MiB:.1f} -> {rss1 / MiB:.1f} MiB, objects {objects0} -> {objects1}, "
          f"{handlers} grpclib handlers")
    assert tasks1 == tasks0 == 1  # the bridge's keepalive task
    assert fds1 <= fds0, f"fds: {fds0} -> {fds1}"
    assert rss1 - rss0 < RSS_SLACK, f"RSS grew by {(rss1 - rss0) / MiB:.1f} MiB"
    assert objects1 - objects0 < OBJECT_SLACK, f"gc objects: {objects0} -> {objects1}"
    assert handlers <= 10, f"{handlers} grpclib connection handlers kept"
    assert took < 30, f"{CYCLES} cycles took {took:.1f} s (a 40 ms stall per call?)"
    await assert_no_tasks_left()


# ------------------------------------------------------------- (d) dropped tunnels


@pytest.mark.parametrize(("drop", "code"), [
    ("close", CloseCode.INTERNAL_ERROR),
    ("abort", CloseCode.ABNORMAL),
])
async def test_dropped_tunnel_fails_rpc_and_next_rpc_reconnects(
        store: TodoStore, leak_check: None, drop: str, code: int) -> None:
    async with Bridge(grpclib_config(store)) as bridge, Channel(bridge.url) as channel:
        stub = TodoServiceStub(channel)
        async with stub.StreamTodos.open() as stream:
            await stream.send_message(SLOW_STREAM, end=True)
            assert await stream.recv_message() is not None
            (tunnel,) = bridge._sessions  # no public handle on single tunnels
            if drop == "close":
                tunnel.machine.close(CloseCode.INTERNAL_ERROR, "dropped by the test")
            else:
                tunnel.machine.abort()
            with pytest.raises(GRPCError) as failed:
                while True:
                    assert await stream.recv_message() is not None
        assert failed.value.status is Status.UNAVAILABLE
        message = failed.value.message or ""
        assert f"closed with code {int(code)}" in message, message
        if drop == "close":
            assert "(dropped by the test)" in message, message

        reply = await stub.ListTodos(LIST, timeout=5)
        assert len(reply.todos) == 2
        await eventually(lambda: bridge.active_tunnels == 1)
    await assert_no_tasks_left()

