"""Serve an existing (synchronous) grpcio server over WebSocket as well: two more lines."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc

import grpcbridge
from grpcbridge.demo import todo_pb2, todo_pb2_grpc
from grpcbridge.demo.service import TodoServicer
from grpcbridge.demo.store import TodoStore
from grpcbridge.demo.todo_grpc import TodoServiceStub

server = grpc.server(ThreadPoolExecutor(max_workers=8))
todo_pb2_grpc.add_TodoServiceServicer_to_server(TodoServicer(TodoStore()), server)
server.add_insecure_port("127.0.0.1:0")  # its usual port(s) keep working

bridge = grpcbridge.attach_grpcio(server, listen="127.0.0.1:0")  # before server.start()
server.start()
bridge.start()  # a ThreadedBridge: the bridge runs on its own thread and event loop
print("serving on", bridge.url)


async def call(url: str) -> todo_pb2.Todo:
    async with grpcbridge.Channel(url) as channel:
        return await TodoServiceStub(channel).CreateTodo(
            todo_pb2.CreateTodoRequest(text="served by grpcio"))


try:
    # A server would now `server.wait_for_termination()`; this example calls it once.
    print("created:", asyncio.run(call(bridge.url)).text)
finally:
    bridge.stop()  # drains open tunnels, removes the private unix socket
    server.stop(grace=None).wait()
