"""The terminal demo: the Todo service behind a bridge, called through a forwarder.

Everything runs in this process on 127.0.0.1 with ports picked by the OS: a grpcio server,
a :class:`~grpcbridge.Bridge` in front of it and a :class:`~grpcbridge.Forwarder` that a
plain ``grpc.aio`` client dials. Each of the four RPC kinds is called and its result printed.
"""

from __future__ import annotations

import grpc

from ..client.forwarder import Forwarder
from ..core.config import BridgeConfig, ForwarderConfig
from ..server.bridge import Bridge
from . import todo_pb2, todo_pb2_grpc
from .service import serve
from .store import MAX_TEXT_LENGTH, TodoStore


async def run_demo() -> int:
    """Run the demo, printing what each call returned. Returns 0 (the exit status)."""
    store = TodoStore(max_text_length=MAX_TEXT_LENGTH)
    server, _servicer, port = serve("127.0.0.1:0", store)
    try:
        bridge_config = BridgeConfig(backend=f"127.0.0.1:{port}", listen="127.0.0.1:0")
        async with Bridge(bridge_config) as bridge:
            print(f"gRPC server   127.0.0.1:{port}")
            print(f"bridge        {bridge.url}  ->  127.0.0.1:{port}")
            async with Forwarder(ForwarderConfig(target=bridge.url,
                                                 listen="127.0.0.1:0")) as forwarder:
                local = forwarder.target
                print(f"forwarder     {local}  ->  {bridge.url}")
                print()
                async with grpc.aio.insecure_channel(local) as channel:
                    await _calls(todo_pb2_grpc.TodoServiceStub(channel))
                print()
                print(f"tunnels open at the bridge: {bridge.active_tunnels} (the channel's)")
    finally:
        server.stop(grace=1).wait()
        store.close()
    return 0


async def _calls(stub: todo_pb2_grpc.TodoServiceStub) -> None:
    todo = await stub.CreateTodo(todo_pb2.CreateTodoRequest(text="write the bridge"))
    print(f"unary          CreateTodo -> id={todo.id[:8]} text={todo.text!r} done={todo.done}")
    bulk = await stub.BulkCreateTodos(
        todo_pb2.CreateTodoRequest(text=text) for text in ("test it", "measure it", "ship it"))
    print(f"client stream  BulkCreateTodos(3 requests) -> created_count={bulk.created_count}")
    texts = [item.text async for item in stub.StreamTodos(todo_pb2.StreamTodosRequest())]
    print(f"server stream  StreamTodos -> {len(texts)} todos: {', '.join(texts)}")
    requests = [
        todo_pb2.SyncRequest(update=todo_pb2.UpdateTodoRequest(id=todo.id, text=todo.text,
                                                               done=True)),
        todo_pb2.SyncRequest(delete=todo_pb2.DeleteTodoRequest(id="no-such-id"))]
    events = []
    async for response in stub.SyncTodos(requests):
        kind = response.WhichOneof("event")
        if kind == "todo":
            events.append(f"todo {response.todo.text!r} done={response.todo.done}")
        else:
            events.append(f"{kind} {getattr(response, kind)!r}")
    print(f"bidi stream    SyncTodos(update, delete) -> {'; '.join(events)}")
