"""Call a bridge from Python with grpclib stubs over grpcbridge.Channel: every RPC kind,
metadata, errors, deadlines, a bearer token and reconnect backoff."""

import asyncio

from grpclib.exceptions import GRPCError

import grpcbridge
from grpcbridge.demo import todo_pb2
from grpcbridge.demo.grpclib_service import TodoService
from grpcbridge.demo.store import TodoStore
from grpcbridge.demo.todo_grpc import TodoServiceStub


async def main() -> None:
    # A bridge to talk to; in real use this is `grpcbridge serve` or any bridge elsewhere.
    config = grpcbridge.BridgeConfig(
        backend=grpcbridge.GrpclibBackend([TodoService(TodoStore())]), listen="127.0.0.1:0",
        authenticate=grpcbridge.BearerTokenAuth("s3cret"))
    async with grpcbridge.Bridge(config) as bridge:
        async with grpcbridge.Channel(
            bridge.url,  # ws:// or wss:// (then verified against the system CAs, or ssl=...)
            bearer_token="s3cret",
            reconnect=grpcbridge.ReconnectPolicy(initial_delay=0.5, max_delay=10),
        ) as channel:
            stub = TodoServiceStub(channel)

            # Client streaming, then unary.
            requests = [todo_pb2.CreateTodoRequest(text=text) for text in ("milk", "eggs")]
            bulk = await stub.BulkCreateTodos(requests, timeout=5)
            print("created", bulk.created_count)

            # Server streaming, with request metadata (sent as HTTP/2 headers, as usual).
            async with stub.StreamTodos.open(metadata={"x-trace-id": "42"}) as stream:
                await stream.send_message(todo_pb2.StreamTodosRequest(repeat=1), end=True)
                async for todo in stream:
                    print("todo:", todo.text)

            # Bidirectional streaming.
            async with stub.SyncTodos.open() as sync:
                await sync.send_message(todo_pb2.SyncRequest(
                    create=todo_pb2.CreateTodoRequest(text="bread")))
                reply = await sync.recv_message()
                print("synced:", reply.todo.text)
                await sync.end()

            # Errors arrive as grpclib's GRPCError; a lost tunnel is UNAVAILABLE.
            try:
                await stub.UpdateTodo(todo_pb2.UpdateTodoRequest(id="nope"), timeout=5)
            except GRPCError as error:
                print("error:", error.status.name, error.message)


asyncio.run(main())
