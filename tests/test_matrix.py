"""Every client kind against every server kind, with every RPC kind.

Clients: ``grpcbridge.Channel`` with grpclib stubs; ``grpc.aio`` through an in-process
``Forwarder``; ``grpc.aio`` through a ``grpcbridge forward`` subprocess.

Servers: a ``Bridge`` relaying to the grpcio Todo service; a ``Bridge`` serving the grpclib
Todo service in process (``GrpclibBackend``); ``attach_grpcio`` on a sync ``grpc.server``
(``ThreadedBridge``) and on ``grpc.aio.server()``; ``BridgeApp`` under uvicorn, mounted in
Starlette (relaying to the grpcio service) and in FastAPI (``GrpclibBackend``).

Each combination checks unary calls with metadata echo and trailers, errors with non-ASCII
messages, the three streaming kinds, a deadline and a client cancellation that both reach the
handler. Reflection and health are queried through tunnels too. All servers (and one
forwarder subprocess per server) live for the whole module, on the module's event loop; the
Todo services are the test oracle's (tests/todo_oracle.py), and every test starts with their
stores empty (the ``world`` fixture), so no test sees another's todos.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import pytest
import pytest_asyncio
import uvicorn
from fastapi import FastAPI
from grpclib.exceptions import GRPCError
from grpclib.health.service import Health
from grpclib.health.v1 import health_grpc as grpclib_health_grpc
from grpclib.health.v1 import health_pb2 as grpclib_health_pb2
from grpclib.reflection.service import ServerReflection
from grpclib.reflection.v1 import reflection_grpc as grpclib_reflection_grpc
from grpclib.reflection.v1 import reflection_pb2 as grpclib_reflection_pb2
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from todo_oracle import AioOracleServicer, OracleService, OracleServicer
from todo_oracle import serve as serve_grpcio

import grpcbridge
from grpcbridge.demo import todo_grpc, todo_pb2, todo_pb2_grpc
from grpcbridge.demo.store import TodoStore

import support
from support import Process, eventually, timing

pytestmark = pytest.mark.asyncio(loop_scope="module")

SERVICE = "todo.v1.TodoService"
HEALTH = "grpc.health.v1.Health"
#: Timeout of calls that are expected to succeed: only there to turn a hang into a failure.
CALL_TIMEOUT = timing(20.0)
ECHO = (("x-echo-user", "ada"), ("x-echo-blob-bin", b"\x00\x01\xfe\xff"))
FAIL_MESSAGE = "nö such tödo ✓ — 失敗"


# ============================================================================ servers


class _QuietUvicorn(uvicorn.Server):
    """uvicorn without its signal handlers (pytest keeps Ctrl-C)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def start_uvicorn(app: Any) -> tuple[uvicorn.Server, asyncio.Task[None], int]:
    server = _QuietUvicorn(uvicorn.Config(
        app, host="127.0.0.1", port=0, ws="websockets-sansio", lifespan="off",
        log_level="warning", timeout_graceful_shutdown=2))
    task = asyncio.get_running_loop().create_task(server.serve())
    await eventually(lambda: server.started or task.done(), 10, message="uvicorn did not start")
    assert not task.done(), "uvicorn did not start"
    port = int(server.servers[0].sockets[0].getsockname()[1])
    return server, task, port


@dataclass
class Server:
    name: str
    url: str
    #: RPCs the serving Todo implementation saw end by cancellation (or deadline).
    cancelled: Callable[[], int]
    forward_cli: Process | None = None


@dataclass
class World:
    servers: dict[str, Server] = field(default_factory=dict)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    #: The Todo services' stores (each test starts with them empty).
    stores: list[TodoStore] = field(default_factory=list)


SERVERS = ["bridge-relay", "bridge-grpclib", "attach-sync", "attach-aio",
           "asgi-starlette-socket", "asgi-fastapi-grpclib"]
CLIENTS = ["channel", "forwarder", "forward-cli"]


def _grpclib_handlers(store: TodoStore) -> tuple[OracleService, list[Any]]:
    service = OracleService(store)
    health = Health({service: []})
    return service, ServerReflection.extend([service, health])


async def _build_world(world: World) -> None:
    loop = asyncio.get_running_loop()
    add = world.servers.__setitem__
    stores = world.stores

    def new_store() -> TodoStore:
        stores.append(TodoStore())
        return stores[-1]

    async def close_stores() -> None:
        for store in stores:
            store.close()

    world.closers.append(close_stores)

    # The grpcio service on TCP: relayed to by a Bridge and by the Starlette app.
    grpcio_server, servicer, port = serve_grpcio("127.0.0.1:0", new_store(), max_workers=32)
    world.closers.append(lambda: _stop_sync(grpcio_server))

    relay = grpcbridge.Bridge(grpcbridge.BridgeConfig(backend=f"127.0.0.1:{port}",
                                                      listen="127.0.0.1:0"))
    await relay.start()
    world.closers.append(relay.close)
    add("bridge-relay", Server("bridge-relay", relay.url, lambda: servicer.cancelled_count))

    # grpclib in process.
    service, handlers = _grpclib_handlers(new_store())
    in_process = grpcbridge.Bridge(grpcbridge.BridgeConfig(
        backend=grpcbridge.GrpclibBackend(handlers), listen="127.0.0.1:0"))
    await in_process.start()
    world.closers.append(in_process.close)
    add("bridge-grpclib",
        Server("bridge-grpclib", in_process.url, lambda: service.cancelled_count))

    # attach_grpcio on a sync grpc.server: the bridge runs on its own thread.
    executor = ThreadPoolExecutor(32, thread_name_prefix="attach-sync")
    sync_server = grpc.server(executor)
    sync_servicer = OracleServicer(new_store())
    todo_pb2_grpc.add_TodoServiceServicer_to_server(sync_servicer, sync_server)
    threaded = grpcbridge.attach_grpcio(sync_server, listen="127.0.0.1:0")
    sync_server.start()
    threaded.start()
    world.closers.append(lambda: loop.run_in_executor(None, executor.shutdown))
    world.closers.append(lambda: _stop_sync(sync_server))
    world.closers.append(lambda: loop.run_in_executor(None, threaded.stop))
    add("attach-sync",
        Server("attach-sync", threaded.url, lambda: sync_servicer.cancelled_count))

    # attach_grpcio on grpc.aio.server(), in this loop.
    aio_server = grpc.aio.server()
    aio_servicer = AioOracleServicer(new_store())
    todo_pb2_grpc.add_TodoServiceServicer_to_server(aio_servicer, aio_server)
    attached = grpcbridge.attach_grpcio(aio_server, threaded=False, listen="127.0.0.1:0")
    await aio_server.start()
    await attached.start()
    world.closers.append(lambda: aio_server.stop(None))
    world.closers.append(attached.close)
    add("attach-aio",
        Server("attach-aio", attached.url, lambda: aio_servicer.cancelled_count))

    # BridgeApp (socket backend) in Starlette under uvicorn.
    socket_app = grpcbridge.BridgeApp(grpcbridge.BridgeConfig(backend=f"127.0.0.1:{port}"))
    starlette = Starlette(routes=[WebSocketRoute("/grpc", socket_app)])
    uv_server, uv_task, uv_port = await start_uvicorn(starlette)
    world.closers.append(socket_app.close)
    world.closers.append(lambda: _stop_uvicorn(uv_server, uv_task))
    add("asgi-starlette-socket", Server("asgi-starlette-socket", f"ws://127.0.0.1:{uv_port}/grpc",
                                        lambda: servicer.cancelled_count))

    # BridgeApp (GrpclibBackend) in FastAPI under uvicorn.
    asgi_service, asgi_handlers = _grpclib_handlers(new_store())
    grpclib_app = grpcbridge.BridgeApp(grpcbridge.BridgeConfig(
        backend=grpcbridge.GrpclibBackend(asgi_handlers)))
    fastapi = FastAPI()
    fastapi.router.add_websocket_route("/grpc", grpclib_app)
    fa_server, fa_task, fa_port = await start_uvicorn(fastapi)
    world.closers.append(grpclib_app.close)
    world.closers.append(lambda: _stop_uvicorn(fa_server, fa_task))
    add("asgi-fastapi-grpclib", Server("asgi-fastapi-grpclib", f"ws://127.0.0.1:{fa_port}/grpc",
                                       lambda: asgi_service.cancelled_count))

    # One `grpcbridge forward` subprocess per server, started together.
    for server in world.servers.values():
        server.forward_cli = support.start_cli(  # stopped by this module, not per test
            ["forward", "--listen", "127.0.0.1:0", "--target", server.url], ready=False,
            outlives_test=True)
    for server in world.servers.values():
        process = server.forward_cli
        assert process is not None
        world.closers.append(_stopper(process))
        await eventually(process.started, 15, interval=0.02, message=lambda p=process: (
            f"grpcbridge forward did not start:\n{p.output()}"))


def _stopper(process: Process) -> Callable[[], Awaitable[None]]:
    async def stop() -> None:
        await asyncio.get_running_loop().run_in_executor(None, process.stop)
    return stop


async def _stop_sync(server: grpc.Server) -> None:
    event = server.stop(None)
    await asyncio.get_running_loop().run_in_executor(None, event.wait)


async def _stop_uvicorn(server: uvicorn.Server, task: asyncio.Task[None]) -> None:
    server.should_exit = True
    await asyncio.wait_for(task, 10)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def _world() -> AsyncIterator[World]:
    world = World()
    try:
        await _build_world(world)
        yield world
    finally:
        for close in reversed(world.closers):
            try:
                await close()
            except Exception as exc:  # keep closing the rest
                print(f"closing failed: {exc!r}")


@pytest.fixture
def world(_world: World) -> World:
    """The module's servers, with every Todo store emptied: a test gets what it creates."""
    for store in _world.stores:
        for todo in store.list():
            store.delete(todo.id)
    return _world


# ============================================================================ clients


@dataclass
class Reply:
    value: Any
    initial: list[tuple[str, Any]]
    trailing: list[tuple[str, Any]]


class Failure(Exception):
    """An RPC error, whichever client library raised it."""

    def __init__(self, code: str, message: str, initial: list[tuple[str, Any]],
                 trailing: list[tuple[str, Any]]) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message
        self.initial, self.trailing = initial, trailing


def _x(metadata: Any) -> list[tuple[str, Any]]:
    """The application metadata (``x-`` keys) as a list of pairs, in order."""
    if metadata is None:
        return []
    if isinstance(metadata, grpc.aio.Metadata):
        items = list(metadata)  # (key, value) pairs; its items() groups values by key
    else:
        items = metadata.items() if hasattr(metadata, "items") else metadata
    return [(key, value) for key, value in items if key.startswith("x-")]


class Bidi(Protocol):
    async def send(self, request: Any) -> None: ...
    async def recv(self) -> Any | None: ...
    async def done_writing(self) -> None: ...
    async def finish(self) -> list[tuple[str, Any]]: ...
    async def cancel(self) -> None: ...


class Client(Protocol):
    async def unary(self, method: str, request: Any, *, metadata: Sequence[tuple[str, Any]] = (),
                    deadline: float = CALL_TIMEOUT) -> Reply: ...
    async def server_stream(self, request: Any, *, deadline: float = CALL_TIMEOUT) -> Reply: ...
    async def client_stream(self, requests: Sequence[Any]) -> Reply: ...
    def bidi(self) -> contextlib.AbstractAsyncContextManager[Bidi]: ...
    async def stream_then_cancel(self, request: Any) -> Any: ...


class GrpclibClient:
    """grpclib stubs over a :class:`grpcbridge.Channel`."""

    def __init__(self, channel: grpcbridge.Channel) -> None:
        self.stub = todo_grpc.TodoServiceStub(channel)

    @contextlib.asynccontextmanager
    async def _call(self, method: Any, metadata: Sequence[tuple[str, Any]] = (),
                    deadline: float = CALL_TIMEOUT) -> AsyncIterator[Any]:
        stream = None
        try:
            async with method.open(metadata=list(metadata) or None, timeout=deadline) as stream:
                yield stream
        except GRPCError as exc:
            assert stream is not None
            raise Failure(exc.status.name, exc.message or "", _x(stream.initial_metadata),
                          _x(stream.trailing_metadata)) from exc
        except TimeoutError as exc:  # grpclib's own deadline fired first
            raise Failure("DEADLINE_EXCEEDED", "", [], []) from exc

    async def unary(self, method: str, request: Any, *, metadata: Sequence[tuple[str, Any]] = (),
                    deadline: float = CALL_TIMEOUT) -> Reply:
        async with self._call(getattr(self.stub, method), metadata, deadline) as stream:
            await stream.send_message(request, end=True)
            await stream.recv_initial_metadata()
            value = await stream.recv_message()
            await stream.recv_trailing_metadata()
        return Reply(value, _x(stream.initial_metadata), _x(stream.trailing_metadata))

    async def server_stream(self, request: Any, *, deadline: float = CALL_TIMEOUT) -> Reply:
        async with self._call(self.stub.StreamTodos, ECHO, deadline) as stream:
            await stream.send_message(request, end=True)
            values = [message async for message in stream]
            await stream.recv_trailing_metadata()
        return Reply(values, _x(stream.initial_metadata), _x(stream.trailing_metadata))

    async def client_stream(self, requests: Sequence[Any]) -> Reply:
        async with self._call(self.stub.BulkCreateTodos, ECHO) as stream:
            for request in requests:
                await stream.send_message(request)
            await stream.end()
            value = await stream.recv_message()
            await stream.recv_trailing_metadata()
        return Reply(value, _x(stream.initial_metadata), _x(stream.trailing_metadata))

    @contextlib.asynccontextmanager
    async def bidi(self) -> AsyncIterator[Bidi]:
        async with self._call(self.stub.SyncTodos, ECHO) as stream:
            yield _GrpclibBidi(stream)

    async def stream_then_cancel(self, request: Any) -> Any:
        async with self.stub.StreamTodos.open(timeout=CALL_TIMEOUT) as stream:
            await stream.send_message(request, end=True)
            first = await stream.recv_message()
            await stream.cancel()
        return first


class _GrpclibBidi:
    def __init__(self, stream: Any) -> None:
        self.stream = stream

    async def send(self, request: Any) -> None:
        await self.stream.send_message(request)

    async def recv(self) -> Any | None:
        return await self.stream.recv_message()

    async def done_writing(self) -> None:
        await self.stream.end()

    async def finish(self) -> list[tuple[str, Any]]:
        assert await self.stream.recv_message() is None
        await self.stream.recv_trailing_metadata()
        return _x(self.stream.trailing_metadata)

    async def cancel(self) -> None:
        await self.stream.cancel()


class GrpcioClient:
    """``grpc.aio`` stubs over a local port (a forwarder)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = todo_pb2_grpc.TodoServiceStub(channel)

    @staticmethod
    async def _failure(exc: grpc.aio.AioRpcError) -> Failure:
        return Failure(exc.code().name, exc.details() or "", _x(exc.initial_metadata()),
                       _x(exc.trailing_metadata()))

    async def unary(self, method: str, request: Any, *, metadata: Sequence[tuple[str, Any]] = (),
                    deadline: float = CALL_TIMEOUT) -> Reply:
        call = getattr(self.stub, method)(request, metadata=tuple(metadata) or None,
                                          timeout=deadline)
        try:
            value = await call
        except grpc.aio.AioRpcError as exc:
            raise await self._failure(exc) from exc
        return Reply(value, _x(await call.initial_metadata()),
                     _x(await call.trailing_metadata()))

    async def server_stream(self, request: Any, *, deadline: float = CALL_TIMEOUT) -> Reply:
        call = self.stub.StreamTodos(request, metadata=ECHO, timeout=deadline)
        try:
            values = [message async for message in call]
        except grpc.aio.AioRpcError as exc:
            raise await self._failure(exc) from exc
        return Reply(values, _x(await call.initial_metadata()),
                     _x(await call.trailing_metadata()))

    async def client_stream(self, requests: Sequence[Any]) -> Reply:
        call = self.stub.BulkCreateTodos(iter(requests), metadata=ECHO, timeout=CALL_TIMEOUT)
        try:
            value = await call
        except grpc.aio.AioRpcError as exc:
            raise await self._failure(exc) from exc
        return Reply(value, _x(await call.initial_metadata()),
                     _x(await call.trailing_metadata()))

    @contextlib.asynccontextmanager
    async def bidi(self) -> AsyncIterator[Bidi]:
        call = self.stub.SyncTodos(metadata=ECHO, timeout=CALL_TIMEOUT)
        try:
            yield _GrpcioBidi(call)
        except grpc.aio.AioRpcError as exc:
            raise await self._failure(exc) from exc
        finally:
            call.cancel()  # no-op once finished

    async def stream_then_cancel(self, request: Any) -> Any:
        call = self.stub.StreamTodos(request, timeout=CALL_TIMEOUT)
        first = await call.read()
        call.cancel()
        return first


class _GrpcioBidi:
    def __init__(self, call: Any) -> None:
        self.call = call

    async def send(self, request: Any) -> None:
        await self.call.write(request)

    async def recv(self) -> Any | None:
        message = await self.call.read()
        return None if message is grpc.aio.EOF else message

    async def done_writing(self) -> None:
        await self.call.done_writing()

    async def finish(self) -> list[tuple[str, Any]]:
        assert await self.call.read() is grpc.aio.EOF
        assert await self.call.code() == grpc.StatusCode.OK
        return _x(await self.call.trailing_metadata())

    async def cancel(self) -> None:
        self.call.cancel()


@contextlib.asynccontextmanager
async def open_client(kind: str, server: Server) -> AsyncIterator[Client]:
    if kind == "channel":
        async with grpcbridge.Channel(server.url) as channel:
            yield GrpclibClient(channel)
    elif kind == "forwarder":
        config = grpcbridge.ForwarderConfig(target=server.url, listen="127.0.0.1:0")
        async with grpcbridge.Forwarder(config) as forwarder:
            assert forwarder.address is not None
            host, port = forwarder.address
            async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
                yield GrpcioClient(channel)
    else:
        assert server.forward_cli is not None
        async with grpc.aio.insecure_channel(server.forward_cli.listen) as channel:
            yield GrpcioClient(channel)


def _create(text: str) -> Any:
    return todo_pb2.CreateTodoRequest(text=text)


combinations = pytest.mark.parametrize(
    ("client_name", "server_name"),
    [(c, s) for s in SERVERS for c in CLIENTS],
    ids=[f"{c}>{s}" for s in SERVERS for c in CLIENTS])


# ============================================================================== tests


@combinations
async def test_unary_metadata_errors(world: World, client_name: str, server_name: str) -> None:
    server = world.servers[server_name]
    async with open_client(client_name, server) as client:
        text = f"unary {uuid.uuid4().hex[:8]} ✓"
        created = await client.unary("CreateTodo", _create(text), metadata=ECHO)
        assert created.value.text == text and created.value.id and not created.value.done
        assert created.initial == list(ECHO)
        assert created.trailing == [("x-trailer-rpc", "CreateTodo"), *ECHO]

        todo_id = created.value.id
        updated = await client.unary("UpdateTodo", todo_pb2.UpdateTodoRequest(
            id=todo_id, text=text + " (done)", done=True))
        assert (updated.value.id, updated.value.done) == (todo_id, True)
        assert updated.trailing == [("x-trailer-rpc", "UpdateTodo")]
        listed = await client.unary("ListTodos", todo_pb2.ListTodosRequest())
        assert updated.value in listed.value.todos
        await client.unary("DeleteTodo", todo_pb2.DeleteTodoRequest(id=todo_id))

        # Errors: status, exact (non-ASCII) message, and metadata on failed RPCs.
        with pytest.raises(Failure) as failed:
            await client.unary("CreateTodo", _create(f"fail:NOT_FOUND:{FAIL_MESSAGE}"),
                               metadata=ECHO)
        assert (failed.value.code, failed.value.message) == ("NOT_FOUND", FAIL_MESSAGE)
        assert failed.value.initial == list(ECHO)
        assert failed.value.trailing == [("x-trailer-rpc", "CreateTodo"), *ECHO]
        with pytest.raises(Failure) as failed:
            await client.unary("CreateTodo", _create("fail:RESOURCE_EXHAUSTED:Kontingent ✗"))
        assert (failed.value.code, failed.value.message) == ("RESOURCE_EXHAUSTED",
                                                             "Kontingent ✗")
        with pytest.raises(Failure) as failed:
            await client.unary("CreateTodo", _create(""))
        assert (failed.value.code, failed.value.message) == ("INVALID_ARGUMENT",
                                                             "text must not be empty")
        for method, request in (("UpdateTodo", todo_pb2.UpdateTodoRequest(id=todo_id)),
                                ("DeleteTodo", todo_pb2.DeleteTodoRequest(id=todo_id))):
            with pytest.raises(Failure) as failed:
                await client.unary(method, request)
            assert (failed.value.code, failed.value.message) == (
                "NOT_FOUND", f"todo {todo_id!r} not found")
            assert failed.value.trailing == [("x-trailer-rpc", method)]


@combinations
async def test_streaming_kinds(world: World, client_name: str, server_name: str) -> None:
    server = world.servers[server_name]
    tag = uuid.uuid4().hex[:8]
    async with open_client(client_name, server) as client:
        # Client streaming.
        bulk = await client.client_stream([_create(f"bulk-{tag}-{i}") for i in range(3)])
        assert bulk.value.created_count == 3
        assert bulk.initial == list(ECHO)
        assert bulk.trailing == [("x-trailer-rpc", "BulkCreateTodos"), *ECHO]
        with pytest.raises(Failure) as failed:
            await client.client_stream([_create(f"bulk-{tag}-x"), _create("")])
        assert failed.value.code == "INVALID_ARGUMENT"

        # Server streaming.
        current = list((await client.unary("ListTodos", todo_pb2.ListTodosRequest())).value.todos)
        assert {f"bulk-{tag}-{i}" for i in range(3)} <= {todo.text for todo in current}
        streamed = await client.server_stream(todo_pb2.StreamTodosRequest(repeat=3))
        assert streamed.value == current * 3
        assert streamed.initial == list(ECHO)
        assert streamed.trailing == [("x-trailer-rpc", "StreamTodos"), *ECHO]

        # Bidi streaming: each action's change comes back; errors to this client only.
        async with client.bidi() as sync:
            await sync.send(todo_pb2.SyncRequest(create=_create(f"sync-{tag}")))
            created = await sync.recv()
            assert created is not None and created.todo.text == f"sync-{tag}"
            await sync.send(todo_pb2.SyncRequest(update=todo_pb2.UpdateTodoRequest(
                id=created.todo.id, text=f"sync-{tag}!", done=True)))
            updated = await sync.recv()
            assert updated is not None
            assert (updated.todo.id, updated.todo.done) == (created.todo.id, True)
            await sync.send(todo_pb2.SyncRequest(delete=todo_pb2.DeleteTodoRequest(id="nope")))
            error = await sync.recv()
            assert error is not None and error.error == "todo 'nope' not found"
            await sync.send(todo_pb2.SyncRequest(delete=todo_pb2.DeleteTodoRequest(
                id=created.todo.id)))
            await sync.done_writing()
            deleted = await sync.recv()
            assert deleted is not None and deleted.deleted_id == created.todo.id
            assert await sync.finish() == [("x-trailer-rpc", "SyncTodos"), *ECHO]


@combinations
async def test_deadline_and_cancellation(world: World, client_name: str,
                                         server_name: str) -> None:
    server = world.servers[server_name]
    async with open_client(client_name, server) as client:
        await client.unary("CreateTodo", _create("keep the stream busy"))
        slow = todo_pb2.StreamTodosRequest(repeat=1000, interval_ms=50)

        # A deadline ends the stream on both sides.
        before = server.cancelled()
        started = time.monotonic()
        with pytest.raises(Failure) as failed:
            await client.server_stream(slow, deadline=0.3)
        assert failed.value.code == "DEADLINE_EXCEEDED"
        assert time.monotonic() - started < 3
        await eventually(lambda: server.cancelled() >= before + 1, 5)

        # Cancelling a server stream reaches the handler.
        before = server.cancelled()
        first = await client.stream_then_cancel(slow)
        assert first.text
        await eventually(lambda: server.cancelled() >= before + 1, 5)

        # So does cancelling a bidi stream.
        before = server.cancelled()
        async with client.bidi() as sync:
            await sync.send(todo_pb2.SyncRequest(create=_create("sync then cancel")))
            assert await sync.recv() is not None
            await sync.cancel()
        await eventually(lambda: server.cancelled() >= before + 1, 5)

        # The connection still serves calls afterwards.
        listed = await client.unary("ListTodos", todo_pb2.ListTodosRequest())
        assert listed.value.todos


# ----------------------------------------------------------------- reflection and health


@pytest.mark.parametrize("server_name", ["bridge-grpclib", "asgi-fastapi-grpclib"])
async def test_grpclib_reflection_and_health(world: World, server_name: str) -> None:
    async with grpcbridge.Channel(world.servers[server_name].url) as channel:
        reflection = grpclib_reflection_grpc.ServerReflectionStub(channel)
        async with reflection.ServerReflectionInfo.open(timeout=CALL_TIMEOUT) as stream:
            await stream.send_message(
                grpclib_reflection_pb2.ServerReflectionRequest(list_services=""))
            listed = await stream.recv_message()
            await stream.send_message(grpclib_reflection_pb2.ServerReflectionRequest(
                file_containing_symbol=SERVICE), end=True)
            files = await stream.recv_message()
        assert listed is not None and files is not None
        names = {s.name for s in listed.list_services_response.service}
        assert {SERVICE, HEALTH} <= names
        assert files.file_descriptor_response.file_descriptor_proto  # serialized .proto

        health = grpclib_health_grpc.HealthStub(channel)
        for service in (SERVICE, ""):
            reply = await health.Check(grpclib_health_pb2.HealthCheckRequest(service=service),
                                       timeout=CALL_TIMEOUT)
            assert reply.status == grpclib_health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(GRPCError) as unknown:
            await health.Check(grpclib_health_pb2.HealthCheckRequest(service="no.Such"),
                               timeout=CALL_TIMEOUT)
        assert unknown.value.status.name == "NOT_FOUND"


#: grpcio-health-checking and grpcio-reflection register the same protobuf symbols as
#: grpclib's health and reflection modules (``grpc.health.v1.HealthCheckRequest``...), and
#: protobuf refuses a second definition in one process. So the grpcio side runs in a
#: subprocess: attach_grpcio on a sync or aio server, queried through a Forwarder.
GRPCIO_EXTRAS = """
import asyncio, sys
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

import grpcbridge
from grpcbridge.demo import todo_pb2_grpc
from grpcbridge.demo.service import TodoServicer
from grpcbridge.demo.store import TodoStore

SERVICE, HEALTH = "todo.v1.TodoService", "grpc.health.v1.Health"
NAMES = [SERVICE, HEALTH, reflection.SERVICE_NAME]


async def query(url: str) -> None:
    config = grpcbridge.ForwarderConfig(target=url, listen="127.0.0.1:0")
    async with grpcbridge.Forwarder(config) as forwarder:
        host, port = forwarder.address
        async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)]
            replies = [r async for r in stub.ServerReflectionInfo(iter(requests), timeout=20)]
            names = sorted(s.name for s in replies[0].list_services_response.service)
            print("services", *names)
            assert replies[1].file_descriptor_response.file_descriptor_proto
            print("descriptor ok")
            checker = health_pb2_grpc.HealthStub(channel)
            reply = await checker.Check(health_pb2.HealthCheckRequest(service=SERVICE),
                                        timeout=20)
            print("health", health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
            try:
                await checker.Check(health_pb2.HealthCheckRequest(service="no.Such"),
                                    timeout=20)
            except grpc.aio.AioRpcError as exc:
                print("unknown", exc.code().name)


async def main(kind: str) -> None:
    store = TodoStore()
    if kind == "sync":
        server = grpc.server(ThreadPoolExecutor(8))
        todo_pb2_grpc.add_TodoServiceServicer_to_server(TodoServicer(store), server)
        servicer = health.HealthServicer()
        servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        reflection.enable_server_reflection(NAMES, server)
        bridge = grpcbridge.attach_grpcio(server, listen="127.0.0.1:0")
        server.start()
        with bridge:
            await query(bridge.url)
        server.stop(None).wait()
    else:
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        await servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        reflection.enable_server_reflection(NAMES, server)
        bridge = grpcbridge.attach_grpcio(server, threaded=False, listen="127.0.0.1:0")
        await server.start()
        async with bridge:
            await query(bridge.url)
        await server.stop(None)
    store.close()


asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.parametrize("kind", ["sync", "aio"])
async def test_grpcio_reflection_and_health(kind: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", GRPCIO_EXTRAS, kind,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    text = output.decode()
    assert process.returncode == 0, text
    lines = text.splitlines()
    assert f"services {HEALTH} grpc.reflection.v1alpha.ServerReflection {SERVICE}" in lines
    assert "descriptor ok" in lines
    assert "health SERVING" in lines
    assert "unknown NOT_FOUND" in lines
