"""Call a bridge with grpcio: a Forwarder gives grpcio a local port, and tunnels each
connection made to it (grpc.aio here; a sync grpc channel works the same)."""

import asyncio

import grpc

import grpcbridge
from grpcbridge.demo import todo_pb2, todo_pb2_grpc
from grpcbridge.demo.grpclib_service import TodoService
from grpcbridge.demo.store import TodoStore


async def main() -> None:
    # A bridge to talk to; in real use this is `grpcbridge serve` or any bridge elsewhere.
    backend = grpcbridge.GrpclibBackend([TodoService(TodoStore())])
    async with grpcbridge.Bridge(grpcbridge.BridgeConfig(backend=backend,
                                                         listen="127.0.0.1:0")) as bridge:
        config = grpcbridge.ForwarderConfig(target=bridge.url, listen="127.0.0.1:0")
        async with grpcbridge.Forwarder(config) as forwarder:
            host, port = forwarder.address
            async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
                stub = todo_pb2_grpc.TodoServiceStub(channel)
                todo = await stub.CreateTodo(
                    todo_pb2.CreateTodoRequest(text="sent by grpcio"), timeout=10)
                print("created:", todo.text)


asyncio.run(main())
