"""Serve grpclib handlers over WebSocket in process: no gRPC port, no socket in between."""

import asyncio

import grpcbridge
from grpcbridge.demo import todo_pb2
from grpcbridge.demo.grpclib_service import TodoService
from grpcbridge.demo.store import TodoStore
from grpcbridge.demo.todo_grpc import TodoServiceStub


async def main() -> None:
    backend = grpcbridge.GrpclibBackend([TodoService(TodoStore())])  # any grpclib handlers
    config = grpcbridge.BridgeConfig(backend=backend, listen="127.0.0.1:0")  # 0: a free port
    async with grpcbridge.Bridge(config) as bridge:
        print("serving on", bridge.url)
        # A server would now `await bridge.serve_forever()`; this example calls it once.
        async with grpcbridge.Channel(bridge.url) as channel:
            stub = TodoServiceStub(channel)
            todo = await stub.CreateTodo(todo_pb2.CreateTodoRequest(text="served in process"))
        print("created:", todo.text)


asyncio.run(main())
