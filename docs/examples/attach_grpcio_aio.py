"""Serve a grpc.aio server over WebSocket as well, on the same event loop."""

import asyncio

import grpc

import grpcbridge
from grpcbridge.demo import todo_pb2, todo_pb2_grpc
from grpcbridge.demo.store import TodoStore
from grpcbridge.demo.todo_grpc import TodoServiceStub


class AsyncTodos(todo_pb2_grpc.TodoServiceServicer):
    """A grpc.aio servicer (``async def`` methods); only CreateTodo for brevity."""

    def __init__(self) -> None:
        self.store = TodoStore()

    async def CreateTodo(self, request, context):
        return self.store.create(request.text)


async def main() -> None:
    server = grpc.aio.server()
    todo_pb2_grpc.add_TodoServiceServicer_to_server(AsyncTodos(), server)
    bridge = grpcbridge.attach_grpcio(server, threaded=False, listen="127.0.0.1:0")
    await server.start()
    async with bridge:  # a Bridge: started here, drained and closed at the end
        print("serving on", bridge.url)
        async with grpcbridge.Channel(bridge.url) as channel:
            todo = await TodoServiceStub(channel).CreateTodo(
                todo_pb2.CreateTodoRequest(text="served by grpc.aio"))
        print("created:", todo.text)
    await server.stop(grace=None)


asyncio.run(main())
