"""Mount the bridge in a FastAPI app, with the same guards and metrics as `grpcbridge serve`.

Serve it with `uvicorn fastapi_app:app --ws websockets-sansio`; run as a script, it starts
uvicorn itself on a free port, makes one call through the tunnel and exits.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI
from starlette.routing import WebSocketRoute

import grpcbridge
from grpcbridge.demo import todo_pb2
from grpcbridge.demo.grpclib_service import TodoService
from grpcbridge.demo.store import TodoStore
from grpcbridge.demo.todo_grpc import TodoServiceStub

# Any backend works here: GrpclibBackend (in process), "127.0.0.1:50051", "unix:/path"...
bridge = grpcbridge.BridgeApp(grpcbridge.BridgeConfig(
    backend=grpcbridge.GrpclibBackend([TodoService(TodoStore())]), path="/grpc"))


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await bridge.close()  # a mounted app gets no lifespan events of its own


# The route's path must equal the config's `path`.
app = FastAPI(lifespan=lifespan, routes=[WebSocketRoute("/grpc", bridge)])


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "the rest of your app is unchanged"}


async def main() -> None:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                           ws="websockets-sansio", log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    print(f"serving on ws://127.0.0.1:{port}/grpc")
    async with grpcbridge.Channel(f"ws://127.0.0.1:{port}/grpc") as channel:
        todo = await TodoServiceStub(channel).CreateTodo(
            todo_pb2.CreateTodoRequest(text="served by FastAPI"))
    print("created:", todo.text)
    server.should_exit = True
    await task


if __name__ == "__main__":
    asyncio.run(main())
