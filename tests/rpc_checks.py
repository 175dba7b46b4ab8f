"""The e2e checks of the four RPC kinds (unary, server streaming, client streaming, bidi) on
the Todo test oracle (tests/todo_oracle.py), shared by every path that must carry them all:
tests/test_e2e_grpc.py (forwarder -> bridge) and tests/deploy/test_nginx.py (forwarder ->
nginx -> bridges). Each takes a stub on a channel whose calls go through that path."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import grpc
import pytest

from grpcbridge.demo import todo_pb2, todo_pb2_grpc

from support import timing

#: Timeout for calls that are expected to succeed: only there to turn a hang into a failure.
CALL_TIMEOUT = timing(30.0)
Stub = todo_pb2_grpc.TodoServiceStub


class Requests:
    """A request iterator for bidi calls, fed from the test; ``close()`` half-closes."""

    def __init__(self) -> None:
        self._queue: queue.Queue[todo_pb2.SyncRequest | None] = queue.Queue()

    def __iter__(self) -> Iterator[todo_pb2.SyncRequest]:
        while (item := self._queue.get()) is not None:
            yield item

    def send(self, request: todo_pb2.SyncRequest) -> None:
        self._queue.put(request)

    def close(self) -> None:
        self._queue.put(None)


def create_request(text: str) -> todo_pb2.SyncRequest:
    return todo_pb2.SyncRequest(create=todo_pb2.CreateTodoRequest(text=text))


def unary_calls(stub: Stub) -> None:
    created = stub.CreateTodo(todo_pb2.CreateTodoRequest(text="buy milk"), timeout=CALL_TIMEOUT)
    assert created.id and created.text == "buy milk" and not created.done

    updated = stub.UpdateTodo(
        todo_pb2.UpdateTodoRequest(id=created.id, text="buy oat milk", done=True),
        timeout=CALL_TIMEOUT)
    assert (updated.id, updated.text, updated.done) == (created.id, "buy oat milk", True)
    listed = stub.ListTodos(todo_pb2.ListTodosRequest(), timeout=CALL_TIMEOUT).todos
    assert updated in listed

    stub.DeleteTodo(todo_pb2.DeleteTodoRequest(id=created.id), timeout=CALL_TIMEOUT)
    listed = stub.ListTodos(todo_pb2.ListTodosRequest(), timeout=CALL_TIMEOUT).todos
    assert created.id not in {todo.id for todo in listed}
    with pytest.raises(grpc.RpcError) as missing:
        stub.DeleteTodo(todo_pb2.DeleteTodoRequest(id=created.id), timeout=CALL_TIMEOUT)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def server_streaming(stub: Stub) -> None:
    for i in range(3):
        stub.CreateTodo(todo_pb2.CreateTodoRequest(text=f"stream-{i}"), timeout=CALL_TIMEOUT)
    current = list(stub.ListTodos(todo_pb2.ListTodosRequest(), timeout=CALL_TIMEOUT).todos)
    assert len(current) >= 3

    call = stub.StreamTodos(todo_pb2.StreamTodosRequest(repeat=4), timeout=CALL_TIMEOUT)
    received = list(call)
    assert received == current * 4
    assert call.code() == grpc.StatusCode.OK
    assert ("x-trailer-rpc", "StreamTodos") in call.trailing_metadata()


def client_streaming(stub: Stub) -> None:
    texts = [f"bulk-{i}-{'x' * i}" for i in range(100)]
    response, call = stub.BulkCreateTodos.with_call(
        (todo_pb2.CreateTodoRequest(text=text) for text in texts), timeout=CALL_TIMEOUT)
    assert response.created_count == len(texts)
    assert call.code() == grpc.StatusCode.OK
    listed = {t.text for t in stub.ListTodos(todo_pb2.ListTodosRequest(),
                                             timeout=CALL_TIMEOUT).todos}
    assert set(texts) <= listed


def bidi_streaming(stub: Stub) -> None:
    requests = Requests()
    call = stub.SyncTodos(iter(requests), timeout=CALL_TIMEOUT)
    try:
        requests.send(create_request("sync me"))
        event = next(call)
        assert event.WhichOneof("event") == "todo" and event.todo.text == "sync me"
        todo_id = event.todo.id

        requests.send(todo_pb2.SyncRequest(
            update=todo_pb2.UpdateTodoRequest(id=todo_id, text="synced", done=True)))
        event = next(call)
        assert (event.todo.id, event.todo.text, event.todo.done) == (todo_id, "synced", True)

        requests.send(todo_pb2.SyncRequest(delete=todo_pb2.DeleteTodoRequest(id=todo_id)))
        assert next(call).deleted_id == todo_id

        requests.send(todo_pb2.SyncRequest(delete=todo_pb2.DeleteTodoRequest(id=todo_id)))
        event = next(call)
        assert event.WhichOneof("event") == "error" and todo_id in event.error

        # Several requests in flight at once, then half-close: all answered, then OK.
        for i in range(20):
            requests.send(create_request(f"burst-{i}"))
    finally:
        requests.close()
    rest = list(call)
    assert [event.todo.text for event in rest] == [f"burst-{i}" for i in range(20)]
    assert call.code() == grpc.StatusCode.OK
    assert ("x-trailer-rpc", "SyncTodos") in call.trailing_metadata()


#: Every RPC kind, by name.
RPC_KINDS = {"unary": unary_calls, "server_streaming": server_streaming,
             "client_streaming": client_streaming, "bidi_streaming": bidi_streaming}
