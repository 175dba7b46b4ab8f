"""Tests for the Todo example service: grpcio (grpcbridge.demo.service) and, for the todo
text rule they share (grpcbridge.demo.store.text_error), grpclib (demo.grpclib_service).

Most of them run against the test oracle (tests/todo_oracle.py: the product services plus
metadata echo, ``fail:`` errors and cancellation counting), which they check too; the
product services themselves have none of that (checked at the end).
"""

from __future__ import annotations

import contextlib
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server
from todo_oracle import OracleService, OracleServicer, serve

from grpcbridge.demo import MAX_TEXT_LENGTH, todo_pb2, todo_pb2_grpc
from grpcbridge.demo.grpclib_service import TodoService
from grpcbridge.demo.service import TodoServicer
from grpcbridge.demo.service import serve as serve_product
from grpcbridge.demo.store import InvalidTextError, TodoStore, text_error
from grpcbridge.demo.todo_grpc import TodoServiceStub
from grpcbridge.demo.web import add_arguments

from support import wait_until

MiB = 1024 * 1024


@pytest.fixture
def server() -> Iterator[tuple[OracleServicer, int]]:
    srv, servicer, port = serve("127.0.0.1:0")
    try:
        yield servicer, port
    finally:
        srv.stop(grace=None).wait()
        servicer.store.close()


@pytest.fixture
def servicer(server: tuple[OracleServicer, int]) -> OracleServicer:
    return server[0]


@pytest.fixture
def channel(server: tuple[OracleServicer, int]) -> Iterator[grpc.Channel]:
    options = [
        ("grpc.max_receive_message_length", 32 * MiB),
        ("grpc.max_send_message_length", 32 * MiB),
    ]
    with grpc.insecure_channel(f"127.0.0.1:{server[1]}", options=options) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.Channel) -> todo_pb2_grpc.TodoServiceStub:
    return todo_pb2_grpc.TodoServiceStub(channel)


def test_store_crud_and_change_feed() -> None:
    with contextlib.closing(TodoStore()) as store:
        events: list[todo_pb2.SyncResponse] = []
        store.subscribe(events.append)
        a = store.create("a")
        b = store.create("b")
        assert [t.text for t in store.list()] == ["a", "b"]
        assert store.update(a.id, "A", True) == todo_pb2.Todo(id=a.id, text="A", done=True)
        store.delete(b.id)
        with pytest.raises(KeyError):
            store.delete(b.id)
        with pytest.raises(KeyError):
            store.update("nope", "x", False)
        assert [e.WhichOneof("event") for e in events] == ["todo", "todo", "todo", "deleted_id"]
        assert events[3] == todo_pb2.SyncResponse(deleted_id=b.id)
        store.unsubscribe(events.append)
        store.create("c")
        assert len(events) == 4


def test_unary_crud(stub: todo_pb2_grpc.TodoServiceStub) -> None:
    first = stub.CreateTodo(todo_pb2.CreateTodoRequest(text="buy milk"), timeout=5)
    second = stub.CreateTodo(todo_pb2.CreateTodoRequest(text="walk dog"), timeout=5)
    assert len(first.id) == 32 and not first.done
    listed = stub.ListTodos(todo_pb2.ListTodosRequest(), timeout=5).todos
    assert [t.text for t in listed] == ["buy milk", "walk dog"]

    updated = stub.UpdateTodo(
        todo_pb2.UpdateTodoRequest(id=first.id, text="buy oat milk", done=True), timeout=5
    )
    assert updated == todo_pb2.Todo(id=first.id, text="buy oat milk", done=True)
    stub.DeleteTodo(todo_pb2.DeleteTodoRequest(id=second.id), timeout=5)
    assert list(stub.ListTodos(todo_pb2.ListTodosRequest(), timeout=5).todos) == [updated]


def test_stream_todos_repeats(stub: todo_pb2_grpc.TodoServiceStub) -> None:
    for text in ("a", "b"):
        stub.CreateTodo(todo_pb2.CreateTodoRequest(text=text), timeout=5)
    got = stub.StreamTodos(todo_pb2.StreamTodosRequest(repeat=3, interval_ms=1), timeout=5)
    assert [t.text for t in got] == ["a", "b"] * 3
    once = stub.StreamTodos(todo_pb2.StreamTodosRequest(repeat=0), timeout=5)
    assert [t.text for t in once] == ["a", "b"]


def test_bulk_create(stub: todo_pb2_grpc.TodoServiceStub) -> None:
    requests = (todo_pb2.CreateTodoRequest(text=f"t{i}") for i in range(25))
    assert stub.BulkCreateTodos(requests, timeout=5).created_count == 25
    assert len(stub.ListTodos(todo_pb2.ListTodosRequest(), timeout=5).todos) == 25


def test_metadata_echo_and_trailers(stub: todo_pb2_grpc.TodoServiceStub) -> None:
    metadata = (("x-echo-foo", "bar"), ("x-echo-data-bin", b"\x00\xffraw"), ("other", "no"))
    _, call = stub.ListTodos.with_call(todo_pb2.ListTodosRequest(), metadata=metadata, timeout=5)
    echoed = [("x-echo-foo", "bar"), ("x-echo-data-bin", b"\x00\xffraw")]
    assert [m for m in call.initial_metadata() if m[0].startswith("x-")] == echoed
    trailers = [m for m in call.trailing_metadata() if m[0].startswith("x-")]
    assert trailers == [("x-trailer-rpc", "ListTodos"), *echoed]

    stream = stub.StreamTodos(todo_pb2.StreamTodosRequest(), metadata=metadata, timeout=5)
    assert list(stream) == []
    assert ("x-echo-foo", "bar") in stream.initial_metadata()
    assert ("x-trailer-rpc", "StreamTodos") in stream.trailing_metadata()


def test_fail_prefix_with_non_ascii_message(stub: todo_pb2_grpc.TodoServiceStub) -> None:
    request = todo_pb2.CreateTodoRequest(text="fail:NOT_FOUND:nö such tödo ✓")
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateTodo(request, metadata=(("x-echo-a", "1"),), timeout=5)
    err = info.value
    assert isinstance(err, grpc.Call)
    assert err.code() is grpc.StatusCode.NOT_FOUND
    assert err.details() == "nö such tödo ✓"
    trailers = [m for m in err.trailing_metadata() if m[0].startswith("x-")]
    assert trailers == [("x-trailer-rpc", "CreateTodo"), ("x-echo-a", "1")]


def test_invalid_argument_and_not_found(stub: todo_pb2_grpc.TodoServiceStub) -> None:
    for blank in ("", " \t "):  # a store without a length limit still refuses blank text
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateTodo(todo_pb2.CreateTodoRequest(text=blank), timeout=5)
        assert isinstance(info.value, grpc.Call)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "text must not be empty"

    for call in (
        lambda: stub.UpdateTodo(todo_pb2.UpdateTodoRequest(id="missing1", text="x"), timeout=5),
        lambda: stub.DeleteTodo(todo_pb2.DeleteTodoRequest(id="missing1"), timeout=5),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert isinstance(info.value, grpc.Call)
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
        assert "missing1" in (info.value.details() or "")


def test_deadline_exceeded_on_slow_stream(
    stub: todo_pb2_grpc.TodoServiceStub, servicer: OracleServicer
) -> None:
    for text in ("a", "b"):
        stub.CreateTodo(todo_pb2.CreateTodoRequest(text=text), timeout=5)
    stream = stub.StreamTodos(
        todo_pb2.StreamTodosRequest(repeat=1000, interval_ms=100), timeout=0.5
    )
    received = 0
    with pytest.raises(grpc.RpcError) as info:
        for _ in stream:
            received += 1
    assert isinstance(info.value, grpc.Call)
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert 1 <= received < 20
    wait_until(lambda: servicer.cancelled_count >= 1, 5)


def test_client_cancel_is_counted(
    stub: todo_pb2_grpc.TodoServiceStub, servicer: OracleServicer
) -> None:
    stub.CreateTodo(todo_pb2.CreateTodoRequest(text="a"), timeout=5)
    list(stub.StreamTodos(todo_pb2.StreamTodosRequest(repeat=2), timeout=5))
    assert servicer.cancelled_count == 0  # normal completion is not a cancellation

    stream = stub.StreamTodos(todo_pb2.StreamTodosRequest(repeat=1000, interval_ms=200))
    assert next(stream).text == "a"
    started = time.monotonic()
    stream.cancel()
    wait_until(lambda: servicer.cancelled_count >= 1, 5)
    assert time.monotonic() - started < 2
    assert servicer.cancelled_count == 1


def test_large_message_round_trip(stub: todo_pb2_grpc.TodoServiceStub) -> None:
    text = "x" * (16 * MiB)
    todo = stub.CreateTodo(todo_pb2.CreateTodoRequest(text=text), timeout=30)
    assert todo.text == text
    (listed,) = stub.ListTodos(todo_pb2.ListTodosRequest(), timeout=30).todos
    assert len(listed.text) == 16 * MiB


class _SyncClient:
    """Drives one SyncTodos stream with a queue-fed request iterator."""

    def __init__(self, stub: todo_pb2_grpc.TodoServiceStub) -> None:
        self._requests: queue.SimpleQueue[todo_pb2.SyncRequest | None] = queue.SimpleQueue()
        self.responses: queue.SimpleQueue[todo_pb2.SyncResponse] = queue.SimpleQueue()
        self.call = stub.SyncTodos(iter(self._requests.get, None), timeout=20)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(grpc.RpcError):  # cancelled by the test
            for response in self.call:
                self.responses.put(response)

    def send(self, request: todo_pb2.SyncRequest) -> None:
        self._requests.put(request)

    def next(self) -> todo_pb2.SyncResponse:
        return self.responses.get(timeout=5)

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join(timeout=5)


def test_sync_todos_two_clients(stub: todo_pb2_grpc.TodoServiceStub) -> None:
    alice, bob = _SyncClient(stub), _SyncClient(stub)
    try:
        # Make sure both subscriptions exist: a failing action answers only its sender.
        for client in (alice, bob):
            client.send(todo_pb2.SyncRequest(delete=todo_pb2.DeleteTodoRequest(id="ping")))
            assert "ping" in client.next().error

        alice.send(todo_pb2.SyncRequest(create=todo_pb2.CreateTodoRequest(text="from alice")))
        a_todo = alice.next().todo
        assert a_todo.text == "from alice"
        assert bob.next().todo == a_todo
        bob.send(todo_pb2.SyncRequest(create=todo_pb2.CreateTodoRequest(text="from bob")))
        b_todo = bob.next().todo
        assert alice.next().todo == b_todo

        bob.send(
            todo_pb2.SyncRequest(
                update=todo_pb2.UpdateTodoRequest(id=a_todo.id, text="done by bob", done=True)
            )
        )
        expected = todo_pb2.Todo(id=a_todo.id, text="done by bob", done=True)
        assert bob.next().todo == expected
        assert alice.next().todo == expected

        alice.send(todo_pb2.SyncRequest(delete=todo_pb2.DeleteTodoRequest(id=b_todo.id)))
        assert alice.next().deleted_id == b_todo.id
        assert bob.next().deleted_id == b_todo.id

        # Half-close: the changes caused by the last requests are flushed, then OK.
        alice.send(todo_pb2.SyncRequest(create=todo_pb2.CreateTodoRequest(text="last")))
        alice.close()
        assert alice.next().todo.text == "last"
        assert alice.call.code() is grpc.StatusCode.OK
        assert ("x-trailer-rpc", "SyncTodos") in alice.call.trailing_metadata()
        assert bob.next().todo.text == "last"
    finally:
        alice.close()
        bob.close()
    assert bob.call.code() is grpc.StatusCode.OK


def test_sync_cancel_unsubscribes(
    stub: todo_pb2_grpc.TodoServiceStub, servicer: OracleServicer
) -> None:
    client = _SyncClient(stub)
    client.send(todo_pb2.SyncRequest(delete=todo_pb2.DeleteTodoRequest(id="ping")))
    assert client.next().error
    client.call.cancel()
    wait_until(lambda: servicer.cancelled_count >= 1, 5)
    client.close()
    wait_until(lambda: not servicer.store._subscribers, 5, interval=0.01, fail=False)
    assert not servicer.store._subscribers


def test_main_subprocess_serves_until_sigterm(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "grpcbridge.demo.service", "--listen", "127.0.0.1:0"]
    proc = subprocess.Popen(
        [*cmd, "--db", str(tmp_path / "todos.db")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on 127.0.0.1:")
        with grpc.insecure_channel(line.removeprefix("listening on ")) as ch:
            todo = todo_pb2_grpc.TodoServiceStub(ch).CreateTodo(
                todo_pb2.CreateTodoRequest(text="persisted"), timeout=10
            )
        assert todo.text == "persisted"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    with contextlib.closing(TodoStore(str(tmp_path / "todos.db"))) as store:
        assert [t.text for t in store.list()] == ["persisted"]


# ------------------------------------------------------------------ the todo text rule

LIMIT = MAX_TEXT_LENGTH
BLANK = f"text must not be empty (1-{LIMIT} characters)"


def _too_long(length: int) -> str:
    return f"text must be 1-{LIMIT} characters, got {length}"


def test_text_rule() -> None:
    assert LIMIT == 500
    for blank in ("", " ", " \t\n\u3000 "):
        assert text_error(blank, LIMIT) == BLANK
        assert text_error(blank) == "text must not be empty"  # no limit: the old message
    assert text_error("x" * LIMIT, LIMIT) is None
    assert text_error("ü" * LIMIT, LIMIT) is None  # characters, not bytes
    assert text_error("x" * (LIMIT + 1), LIMIT) == _too_long(LIMIT + 1)
    assert text_error("x" * 10_000, LIMIT) == _too_long(10_000)
    assert text_error(" x ", LIMIT) is None
    assert text_error("x" * 10_000) is None


def test_store_refuses_invalid_text_on_every_write() -> None:
    with contextlib.closing(TodoStore(max_text_length=LIMIT)) as store:
        feed: list[todo_pb2.SyncResponse] = []
        store.subscribe(feed.append)
        with pytest.raises(InvalidTextError, match=r"^text must be 1-500 characters, got 501$"):
            store.create("x" * (LIMIT + 1))
        todo = store.create("ok")
        with pytest.raises(InvalidTextError, match=r"^text must not be empty \(1-500"):
            store.update(todo.id, "   ", True)
        with pytest.raises(KeyError):  # the id is checked before the text
            store.update("nope", "", False)
        for request, error in (
            (todo_pb2.SyncRequest(create=todo_pb2.CreateTodoRequest(text="")), BLANK),
            (todo_pb2.SyncRequest(update=todo_pb2.UpdateTodoRequest(id=todo.id, text="y" * 501)),
             _too_long(501)),
        ):
            assert store.apply_sync(request) == error
        assert [t.text for t in store.list()] == ["ok"]
        assert feed == [todo_pb2.SyncResponse(todo=todo)]  # the refused writes published nothing
    with pytest.raises(ValueError, match="at least 1"):
        TodoStore(max_text_length=0)


def test_web_demo_option() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).max_text_length == LIMIT
    assert parser.parse_args(["--max-text-length", "0"]).max_text_length == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-text-length", "-1"])


@contextlib.asynccontextmanager
async def todo_stub(kind: str, store: TodoStore, *, oracle: bool
                    ) -> AsyncIterator[TodoServiceStub]:
    """A grpclib client stub of a Todo service on ``store``: the grpcio or the grpclib
    implementation, as the test oracle or as the product."""
    if kind == "grpcio":
        server, servicer, port = (serve if oracle else serve_product)("127.0.0.1:0", store)
        assert type(servicer) is (OracleServicer if oracle else TodoServicer)
        try:
            async with Channel("127.0.0.1", port) as channel:
                yield TodoServiceStub(channel)
        finally:
            server.stop(grace=None).wait()
        return
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    grpclib_server = Server([(OracleService if oracle else TodoService)(store)])
    await grpclib_server.start(sock=sock)
    try:
        async with Channel("127.0.0.1", port) as channel:
            yield TodoServiceStub(channel)
    finally:
        grpclib_server.close()
        await grpclib_server.wait_closed()


@pytest.fixture(params=["grpcio", "grpclib"])
async def limited(request: pytest.FixtureRequest) -> AsyncIterator[TodoServiceStub]:
    """A Todo service stub (either implementation, as the test oracle) whose store has the
    demo's text limit."""
    with contextlib.closing(TodoStore(max_text_length=LIMIT)) as store:
        async with todo_stub(request.param, store, oracle=True) as stub:
            yield stub


async def _refused(call: object, message: str) -> None:
    assert callable(call)
    with pytest.raises(GRPCError) as info:
        await call()
    assert (info.value.status, info.value.message) == (Status.INVALID_ARGUMENT, message)


async def test_create_and_update_refuse_invalid_text(limited: TodoServiceStub) -> None:
    stub = limited
    for blank in ("", "   ", "\t\n"):
        await _refused(lambda t=blank: stub.CreateTodo(todo_pb2.CreateTodoRequest(text=t)), BLANK)
    at_limit = "x" * LIMIT
    created = await stub.CreateTodo(todo_pb2.CreateTodoRequest(text=at_limit))
    assert created.text == at_limit
    for length in (LIMIT + 1, 10_000):
        await _refused(lambda n=length: stub.CreateTodo(
            todo_pb2.CreateTodoRequest(text="y" * n)), _too_long(length))
    # "fail:" texts obey the rule too (checked first).
    await _refused(lambda: stub.CreateTodo(
        todo_pb2.CreateTodoRequest(text="fail:NOT_FOUND:" + "z" * LIMIT)), _too_long(LIMIT + 15))

    await _refused(lambda: stub.UpdateTodo(
        todo_pb2.UpdateTodoRequest(id=created.id, text=" ", done=True)), BLANK)
    with pytest.raises(GRPCError) as unknown:  # an unknown id: NOT_FOUND, whatever the text
        await stub.UpdateTodo(todo_pb2.UpdateTodoRequest(id="nope", text=""))
    assert unknown.value.status is Status.NOT_FOUND
    await _refused(lambda: stub.UpdateTodo(todo_pb2.UpdateTodoRequest(
        id=created.id, text="u" * (LIMIT + 1), done=True)), _too_long(LIMIT + 1))
    updated = await stub.UpdateTodo(todo_pb2.UpdateTodoRequest(
        id=created.id, text="u" * LIMIT, done=True))
    assert (updated.text, updated.done) == ("u" * LIMIT, True)
    listed = await stub.ListTodos(todo_pb2.ListTodosRequest())
    assert [(t.text, t.done) for t in listed.todos] == [("u" * LIMIT, True)]


async def test_bulk_create_refuses_invalid_text(limited: TodoServiceStub) -> None:
    with pytest.raises(GRPCError) as info:
        async with limited.BulkCreateTodos.open() as stream:
            await stream.send_message(todo_pb2.CreateTodoRequest(text="kept"))
            await stream.send_message(todo_pb2.CreateTodoRequest(text="b" * (LIMIT + 1)))
            await stream.end()
            await stream.recv_message()
    assert (info.value.status, info.value.message) == (Status.INVALID_ARGUMENT,
                                                       _too_long(LIMIT + 1))
    listed = await limited.ListTodos(todo_pb2.ListTodosRequest())
    assert [t.text for t in listed.todos] == ["kept"]
    reply = await limited.BulkCreateTodos([todo_pb2.CreateTodoRequest(text="c" * LIMIT)])
    assert reply is not None and reply.created_count == 1


async def test_sync_actions_refuse_invalid_text(limited: TodoServiceStub) -> None:
    async with limited.SyncTodos.open() as sync:
        await sync.send_message(todo_pb2.SyncRequest(
            create=todo_pb2.CreateTodoRequest(text=" ")))
        assert (await sync.recv_message()) == todo_pb2.SyncResponse(error=BLANK)
        await sync.send_message(todo_pb2.SyncRequest(
            create=todo_pb2.CreateTodoRequest(text="s" * (LIMIT + 1))))
        assert (await sync.recv_message()) == todo_pb2.SyncResponse(error=_too_long(LIMIT + 1))
        await sync.send_message(todo_pb2.SyncRequest(
            create=todo_pb2.CreateTodoRequest(text="s" * LIMIT)))
        created = await sync.recv_message()
        assert created is not None and created.todo.text == "s" * LIMIT
        await sync.send_message(todo_pb2.SyncRequest(update=todo_pb2.UpdateTodoRequest(
            id=created.todo.id, text="t" * (LIMIT + 1))))
        assert (await sync.recv_message()) == todo_pb2.SyncResponse(error=_too_long(LIMIT + 1))
        await sync.end()
        assert (await sync.recv_message()) is None  # the stream ends OK after the errors


# ------------------------------------------------------- the product has no test oracle


@pytest.fixture(params=["grpcio", "grpclib"])
async def product(request: pytest.FixtureRequest) -> AsyncIterator[TodoServiceStub]:
    """A grpclib client stub of a product Todo service (no test oracle)."""
    with contextlib.closing(TodoStore()) as store:
        async with todo_stub(request.param, store, oracle=False) as stub:
            yield stub


async def test_product_services_echo_nothing_and_fail_on_nothing(
        product: TodoServiceStub) -> None:
    """``x-echo-`` metadata, the ``x-trailer-rpc`` trailer, ``fail:`` texts and cancellation
    counters belong to the test oracle, not to the demo's services."""
    async with product.CreateTodo.open(metadata={"x-echo-a": "1"}) as stream:
        await stream.send_message(todo_pb2.CreateTodoRequest(text="fail:NOT_FOUND:no"),
                                  end=True)
        await stream.recv_initial_metadata()
        todo = await stream.recv_message()
        await stream.recv_trailing_metadata()
    assert todo is not None and todo.text == "fail:NOT_FOUND:no"
    assert not [key for key in stream.initial_metadata or {} if key.startswith("x-")]
    assert not [key for key in stream.trailing_metadata or {} if key.startswith("x-")]
    with pytest.raises(GRPCError) as missing:  # errors still end with their status
        await product.DeleteTodo(todo_pb2.DeleteTodoRequest(id="nope"))
    assert (missing.value.status, missing.value.message) == (Status.NOT_FOUND,
                                                             "todo 'nope' not found")
    for service in (TodoServicer(TodoStore()), TodoService(TodoStore())):
        assert not hasattr(service, "cancelled_count")
        service.store.close()
