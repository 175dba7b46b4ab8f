"""grpclib (asyncio) implementation of ``todo.v1.TodoService``, for in-process serving with
:class:`grpcbridge.GrpclibBackend`.

It behaves exactly like the grpcio servicer in :mod:`grpcbridge.demo.service` (see its module
docstring): ``x-echo-*`` metadata echoed as initial metadata and, after
``("x-trailer-rpc", "<MethodName>")``, in the trailers (also for failed RPCs);
``INVALID_ARGUMENT`` for a text the store refuses (empty, whitespace-only or too long, with the
message of :func:`grpcbridge.demo.store.text_error`);
``fail:<CODE_NAME>:<message>`` errors (non-ASCII allowed); ``NOT_FOUND`` for unknown ids;
``StreamTodos`` repeats with ``interval_ms`` pauses and stops as soon as it is cancelled;
``BulkCreateTodos``; ``SyncTodos`` fed by the store's change feed; and cancellation
counting (:attr:`TodoService.cancelled_count`, :meth:`TodoService.wait_cancelled`).

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
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any, Literal, NoReturn, TypeAlias, cast

from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.server import Stream

from grpcbridge.demo import todo_grpc, todo_pb2
from grpcbridge.demo.store import ChangeEvent, InvalidTextError, TodoStore

__all__ = ["TodoService"]

_SyncItem: TypeAlias = ChangeEvent | tuple[Literal["error"], str]
_Metadata: TypeAlias = list[tuple[str, str | bytes]]
#: Seconds between checks of the change feed for changes made by other clients (and threads);
#: changes caused by the stream's own requests are sent at once.
_POLL = 0.02


class TodoService(todo_grpc.TodoServiceBase):  # type: ignore[misc, unused-ignore]
    """The Todo service backed by a :class:`TodoStore`; see the module docstring."""

    def __init__(self, store: TodoStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._cancelled_count = 0
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    # -- cancellation observability -----------------------------------------------------

    @property
    def cancelled_count(self) -> int:
        """Number of RPCs that ended because the client cancelled, the deadline passed or the
        connection was lost (never normally completed or failed RPCs)."""
        with self._lock:
            return self._cancelled_count

    async def wait_cancelled(self, n: int, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until at least ``n`` RPCs were cancelled; False on timeout. Works from any
        event loop (the service may run on another thread's loop)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        waiter = (n, loop, future)
        with self._lock:
            if self._cancelled_count >= n:
                return True
            self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await future
            return True
        except TimeoutError:
            return False
        finally:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _count_cancelled(self) -> None:
        with self._lock:
            self._cancelled_count += 1
            ready = [w for w in self._waiters if w[0] <= self._cancelled_count]
            for waiter in ready:
                self._waiters.remove(waiter)
        for _, loop, future in ready:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_resolve, future)

    # -- helpers --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _rpc(self, stream: Stream[Any, Any], method: str) -> AsyncIterator[None]:
        """Echo metadata, send the trailers (with the status of a raised ``GRPCError``), and
        count the RPC if it ends by cancellation."""
        metadata = stream.metadata if stream.metadata is not None else {}
        echo: _Metadata = [(key, value) for key, value in metadata.items()
                           if key.startswith("x-echo-")]
        trailers: _Metadata = [("x-trailer-rpc", method), *echo]
        try:
            await stream.send_initial_metadata(metadata=echo)
            try:
                yield
            except GRPCError as error:
                await stream.send_trailing_metadata(
                    status=error.status, status_message=error.message,
                    status_details=error.details, metadata=trailers)
            else:
                await stream.send_trailing_metadata(metadata=trailers)
        except (asyncio.CancelledError, StreamTerminatedError):
            # Client cancel (RST_STREAM), deadline, lost connection or server shutdown.
            self._count_cancelled()
            raise

    def _check_text(self, text: str) -> None:
        """Raise ``INVALID_ARGUMENT`` if the store refuses ``text``."""
        try:
            self.store.check_text(text)
        except InvalidTextError as exc:
            raise GRPCError(Status.INVALID_ARGUMENT, str(exc)) from None

    @staticmethod
    def _not_found(todo_id: str) -> NoReturn:
        raise GRPCError(Status.NOT_FOUND, f"todo {todo_id!r} not found")

    @staticmethod
    async def _request(stream: Stream[Any, Any]) -> Any:
        request = await stream.recv_message()
        if request is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "request message missing")
        return request

    # -- RPCs -----------------------------------------------------------------------------

    async def CreateTodo(self, stream: Stream[Any, Any]) -> None:
        async with self._rpc(stream, "CreateTodo"):
            request = await self._request(stream)
            text: str = request.text
            self._check_text(text)
            if text.startswith("fail:"):
                name, _, message = text[len("fail:"):].partition(":")
                code = Status.__members__.get(name)
                if code is None or code is Status.OK:
                    raise GRPCError(Status.INVALID_ARGUMENT, f"unknown status code {name!r}")
                raise GRPCError(code, message)
            await stream.send_message(self.store.create(text))

    async def ListTodos(self, stream: Stream[Any, Any]) -> None:
        async with self._rpc(stream, "ListTodos"):
            await self._request(stream)
            await stream.send_message(todo_pb2.ListTodosResponse(todos=self.store.list()))

    async def UpdateTodo(self, stream: Stream[Any, Any]) -> None:
        async with self._rpc(stream, "UpdateTodo"):
            request = await self._request(stream)
            try:
                todo = self.store.update(request.id, request.text, request.done)
            except KeyError:
                self._not_found(request.id)
            except InvalidTextError as exc:  # checked after the id: NOT_FOUND comes first
                raise GRPCError(Status.INVALID_ARGUMENT, str(exc)) from None
            await stream.send_message(todo)

    async def DeleteTodo(self, stream: Stream[Any, Any]) -> None:
        async with self._rpc(stream, "DeleteTodo"):
            request = await self._request(stream)
            try:
                self.store.delete(request.id)
            except KeyError:
                self._not_found(request.id)
            await stream.send_message(todo_pb2.DeleteTodoResponse())

    async def StreamTodos(self, stream: Stream[Any, Any]) -> None:
        async with self._rpc(stream, "StreamTodos"):
            request = await self._request(stream)
            interval = max(int(request.interval_ms), 0) / 1000
            first = True
            for _ in range(max(int(request.repeat), 1)):
                for todo in self.store.list():
                    if not first and interval:
                        await asyncio.sleep(interval)  # cancellation interrupts it at once
                    first = False
                    await stream.send_message(todo)

    async def BulkCreateTodos(self, stream: Stream[Any, Any]) -> None:
        async with self._rpc(stream, "BulkCreateTodos"):
            count = 0
            async for request in stream:
                self._check_text(request.text)
                self.store.create(request.text)
                count += 1
            await stream.send_message(todo_pb2.BulkCreateTodosResponse(created_count=count))

    async def SyncTodos(self, stream: Stream[Any, Any]) -> None:
        async with self._rpc(stream, "SyncTodos"):
            changes = self.store.subscribe()
            # Errors share the queue so they keep their order relative to the change feed.
            items = cast("queue.SimpleQueue[_SyncItem]", changes)
            wakeup = asyncio.Event()

            async def read_requests() -> None:
                try:
                    async for request in stream:
                        error = self._apply(request)
                        if error is not None:
                            items.put(("error", error))
                        wakeup.set()
                finally:
                    wakeup.set()

            reader = asyncio.get_running_loop().create_task(read_requests())
            try:
                while True:
                    try:
                        item = items.get_nowait()
                    except queue.Empty:
                        # Every change caused by this client's requests is queued before the
                        # reader finishes, so "done and empty" means fully flushed.
                        if reader.done():
                            reader.result()  # re-raise what ended the request stream
                            break
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(_POLL):
                                await wakeup.wait()
                        wakeup.clear()
                        continue
                    if item[0] == "todo":
                        await stream.send_message(todo_pb2.SyncResponse(todo=item[1]))
                    elif item[0] == "deleted":
                        await stream.send_message(todo_pb2.SyncResponse(deleted_id=item[1]))
                    else:
                        await stream.send_message(todo_pb2.SyncResponse(error=item[1]))
            finally:
                self.store.unsubscribe(changes)
                if not reader.done():
                    reader.cancel()
                await asyncio.wait([reader])  # never raises what ended the reader
                if not reader.cancelled():
                    reader.exception()  # retrieved: not logged as "never retrieved"

    def _apply(self, request: Any) -> str | None:
        """Perform one sync action; return an error message on failure."""
        return self.store.apply_sync(request)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
