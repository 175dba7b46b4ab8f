"""grpclib (asyncio) implementation of ``todo.v1.TodoService``, for in-process serving with
:class:`grpcbridge.GrpclibBackend`.

It behaves exactly like the grpcio servicer in :mod:`grpcbridge.demo.service` (see its module
docstring); the rules both share (the refusals and their status, ``StreamTodos``' pacing, the
``SyncTodos`` actions and change feed) live once in :mod:`grpcbridge.demo.store`.

::

    store = TodoStore()
    backend = grpcbridge.GrpclibBackend([TodoService(store)])
    async with grpcbridge.Bridge(grpcbridge.BridgeConfig(backend=backend, listen=...)):
        ...

The store is shared with threads safely (it holds a lock), so one :class:`TodoStore` may back
a grpcio and a grpclib service at once; both then see each other's changes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from grpcbridge.demo import todo_grpc, todo_pb2
from grpcbridge.demo.store import Refusal, TodoStore

__all__ = ["TodoService"]


@contextlib.contextmanager
def _refusals_as_status() -> Iterator[None]:
    """A :class:`~grpcbridge.demo.store.Refusal` ends the RPC with its status and message."""
    try:
        yield
    except Refusal as exc:
        raise GRPCError(Status[exc.code], str(exc)) from None


class TodoService(todo_grpc.TodoServiceBase):  # type: ignore[misc, unused-ignore]
    """The Todo service backed by a :class:`TodoStore`; see the module docstring."""

    def __init__(self, store: TodoStore) -> None:
        self.store = store

    @contextlib.asynccontextmanager
    async def _rpc(self, stream: Stream[Any, Any], method: str) -> AsyncIterator[None]:
        """Around the RPC named ``method``: send the response headers at once (a client may
        wait for them before the first message: the demo page subscribes with SyncTodos and
        waits for its headers before it loads the list); a store refusal ends it with its
        status."""
        await stream.send_initial_metadata()
        with _refusals_as_status():
            yield

    @staticmethod
    async def _request(stream: Stream[Any, Any]) -> Any:
        request = await stream.recv_message()
        if request is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "request message missing")
        return request

    async def CreateTodo(self, stream: Stream[Any, Any]) -> None:
        async with self._rpc(stream, "CreateTodo"):
            request = await self._request(stream)
            await stream.send_message(self.store.create(request.text))

    async def ListTodos(self, stream: Stream[Any, Any]) -> None:
        async with self._rpc(stream, "ListTodos"):
            await self._request(stream)
            await stream.send_message(todo_pb2.ListTodosResponse(todos=self.store.list()))

    async def UpdateTodo(self, stream: Stream[Any, Any]) -> None:
        async with self._rpc(stream, "UpdateTodo"):
            request = await self._request(stream)
            await stream.send_message(self.store.update(request.id, request.text, request.done))

    async def DeleteTodo(self, stream: Stream[Any, Any]) -> None:
        async with self._rpc(stream, "DeleteTodo"):
            request = await self._request(stream)
            self.store.delete(request.id)
            await stream.send_message(todo_pb2.DeleteTodoResponse())

    async def StreamTodos(self, stream: Stream[Any, Any]) -> None:
        async with self._rpc(stream, "StreamTodos"):
            request = await self._request(stream)
            for pause, todo in self.store.paced(request):
                if pause:
                    await asyncio.sleep(pause)  # cancellation interrupts it at once
                await stream.send_message(todo)

    async def BulkCreateTodos(self, stream: Stream[Any, Any]) -> None:
        async with self._rpc(stream, "BulkCreateTodos"):
            count = 0
            async for request in stream:
                self.store.create(request.text)
                count += 1
            await stream.send_message(todo_pb2.BulkCreateTodosResponse(created_count=count))

    async def SyncTodos(self, stream: Stream[Any, Any]) -> None:
        async with self._rpc(stream, "SyncTodos"):
            loop = asyncio.get_running_loop()
            changes: asyncio.Queue[todo_pb2.SyncResponse | None] = asyncio.Queue()

            def deliver(change: todo_pb2.SyncResponse | None) -> None:
                # The store calls it from the writer's thread; the loop runs these in order.
                loop.call_soon_threadsafe(changes.put_nowait, change)

            async def read_requests() -> None:
                try:
                    async for request in stream:
                        error = self.store.apply_sync(request)
                        if error is not None:
                            deliver(todo_pb2.SyncResponse(error=error))
                finally:
                    deliver(None)  # the end: queued after every change the requests caused

            self.store.subscribe(deliver)
            reader = loop.create_task(read_requests())
            try:
                while (change := await changes.get()) is not None:
                    await stream.send_message(change)
                await reader  # re-raise what ended the request stream
            finally:
                self.store.unsubscribe(deliver)
                reader.cancel()  # a no-op once it is done
                await asyncio.wait([reader])  # never raises what ended the reader
                if not reader.cancelled():
                    reader.exception()  # retrieved: not logged as "never retrieved"
