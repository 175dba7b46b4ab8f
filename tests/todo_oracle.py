"""The Todo test oracle: the demo's Todo services plus behaviour that only the tests use.

:class:`OracleServicer` (grpcio, a subclass of :class:`grpcbridge.demo.service.TodoServicer`),
:class:`OracleService` (grpclib, a subclass of
:class:`grpcbridge.demo.grpclib_service.TodoService`) and :class:`AioOracleServicer`
(``grpc.aio``, on which the sync servicer cannot run) add to the product's behaviour:

* **Metadata echo** -- request metadata whose key starts with ``x-echo-`` is sent back as
  initial metadata (same key and value; ``-bin`` keys carry bytes); the trailing metadata is
  ``("x-trailer-rpc", "<MethodName>")`` followed by the echoed entries again. This also holds
  for failed RPCs.
* **Errors on demand** -- ``CreateTodo`` with text ``fail:<CODE_NAME>:<message>`` (e.g.
  ``fail:NOT_FOUND:nö such tödo ✓``) fails with that status code and exactly ``<message>``
  (non-ASCII allowed); an unknown code name (or ``OK``) gives ``INVALID_ARGUMENT`` "unknown
  status code '<name>'". The store's text rule is checked first.
* **Cancellation counting** -- ``cancelled_count``: the RPCs that ended because the client
  cancelled, the deadline passed or the connection was lost (also server shutdown), never
  normally completed or failed ones. Tests wait for it with ``support.wait_until`` or
  ``support.eventually``.

Everything else (CRUD, the text rule, the streaming RPCs) is the product's.

Run it in its own process with ``python tests/todo_oracle.py --listen 127.0.0.1:0 [--db PATH]
[--max-text-length N]`` (what :func:`process` does): it prints ``listening on <host:port>``
and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import re
import select
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.server import Stream

from grpcbridge.demo import service, todo_pb2, todo_pb2_grpc
from grpcbridge.demo.grpclib_service import TodoService, _refusals_as_status
from grpcbridge.demo.service import TodoServicer, _Rpc
from grpcbridge.demo.store import Refusal, TodoStore

from support import timing

__all__ = ["AioOracleServicer", "OracleService", "OracleServicer", "process", "serve"]

ECHO_PREFIX = "x-echo-"
TRAILER_KEY = "x-trailer-rpc"
FAIL_PREFIX = "fail:"
Metadata = tuple[tuple[str, str | bytes], ...]


def echoed(metadata: Iterable[tuple[str, Any]] | None) -> Metadata:
    """The request metadata entries to send back."""
    return tuple((key, value) for key, value in metadata or () if key.startswith(ECHO_PREFIX))


def trailers(method: str, echo: Metadata) -> Metadata:
    return ((TRAILER_KEY, method), *echo)


def failure(text: str, codes: Any) -> tuple[Any, str] | None:
    """``(code, message)`` if ``text`` asks for an error, else None; ``codes`` is the status
    enum (``grpc.StatusCode`` or grpclib's ``Status``)."""
    if not text.startswith(FAIL_PREFIX):
        return None
    name, _, message = text[len(FAIL_PREFIX):].partition(":")
    code = codes.__members__.get(name)
    if code is None or code is codes.OK:
        return codes.INVALID_ARGUMENT, f"unknown status code {name!r}"
    return code, message


class _Counter:
    """A thread-safe count of cancelled RPCs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    @property
    def cancelled_count(self) -> int:
        """RPCs that ended because the client cancelled, the deadline passed or the
        connection was lost (never normally completed or failed ones)."""
        with self._lock:
            return self._count

    def _count_cancelled(self) -> None:
        with self._lock:
            self._count += 1


# ------------------------------------------------------------------------------ grpcio


class OracleServicer(_Counter, TodoServicer):
    """The grpcio Todo service with metadata echo, ``fail:`` errors and cancellation
    counting."""

    def __init__(self, store: TodoStore) -> None:
        _Counter.__init__(self)
        TodoServicer.__init__(self, store)

    def _start(self, context: grpc.ServicerContext, method: str) -> _Rpc:
        rpc = _Rpc(context)

        def on_terminated() -> None:
            if not rpc.finished:
                self._count_cancelled()

        if not context.add_callback(on_terminated):
            on_terminated()  # already terminated before the handler ran
        echo = echoed(context.invocation_metadata())
        context.set_trailing_metadata(trailers(method, echo))
        if context.is_active():
            context.send_initial_metadata(echo)
        return rpc

    def CreateTodo(self, request: todo_pb2.CreateTodoRequest,
                   context: grpc.ServicerContext) -> todo_pb2.Todo:
        with self._start(context, "CreateTodo"):
            self.store.check_text(request.text)  # the store's text rule first, then "fail:"
            fail = failure(request.text, grpc.StatusCode)
            if fail is not None:
                context.abort(*fail)
            return self.store.create(request.text)


def serve(address: str, store: TodoStore | None = None, *,
          max_message_bytes: int = 32 * 1024 * 1024,
          max_workers: int = 64) -> tuple[grpc.Server, OracleServicer, int]:
    """:func:`grpcbridge.demo.service.serve` with an :class:`OracleServicer`: returns
    ``(server, servicer, port)``; the caller stops the server and closes the store."""
    server, servicer, port = service.serve(address, store, max_message_bytes=max_message_bytes,
                                           max_workers=max_workers,
                                           servicer_class=OracleServicer)
    assert isinstance(servicer, OracleServicer)
    return server, servicer, port


# ----------------------------------------------------------------------------- grpclib


class OracleService(_Counter, TodoService):
    """The grpclib Todo service with metadata echo, ``fail:`` errors and cancellation
    counting."""

    def __init__(self, store: TodoStore) -> None:
        _Counter.__init__(self)
        TodoService.__init__(self, store)

    @contextlib.asynccontextmanager
    async def _rpc(self, stream: Stream[Any, Any], method: str) -> AsyncIterator[None]:
        """Echo metadata, send the trailers (with the status of a raised ``GRPCError``), and
        count the RPC if it ends by cancellation."""
        echo = echoed((stream.metadata or {}).items())
        try:
            await stream.send_initial_metadata(metadata=echo)
            try:
                with _refusals_as_status():
                    yield
            except GRPCError as error:
                await stream.send_trailing_metadata(
                    status=error.status, status_message=error.message,
                    status_details=error.details, metadata=trailers(method, echo))
            else:
                await stream.send_trailing_metadata(metadata=trailers(method, echo))
        except (asyncio.CancelledError, StreamTerminatedError):
            # Client cancel (RST_STREAM), deadline, lost connection or server shutdown.
            self._count_cancelled()
            raise

    async def CreateTodo(self, stream: Stream[Any, Any]) -> None:
        async with self._rpc(stream, "CreateTodo"):
            request = await self._request(stream)
            text: str = request.text
            self.store.check_text(text)  # the store's text rule first, then "fail:"
            fail = failure(text, Status)
            if fail is not None:
                raise GRPCError(*fail)
            await stream.send_message(self.store.create(text))


# ---------------------------------------------------------------------------- grpc.aio


class AioOracleServicer(_Counter, todo_pb2_grpc.TodoServiceServicer):  # type: ignore[misc]
    """The Todo service for ``grpc.aio.server()`` (the sync servicer cannot run there), with
    the behaviours of :class:`OracleServicer`."""

    def __init__(self, store: TodoStore) -> None:
        _Counter.__init__(self)
        self.store = store

    @contextlib.asynccontextmanager
    async def _rpc(self, context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[None]:
        echo = echoed(context.invocation_metadata())
        context.set_trailing_metadata(trailers(method, echo))
        try:
            await context.send_initial_metadata(echo)
            yield
        except (asyncio.CancelledError, GeneratorExit):
            self._count_cancelled()
            raise
        except Refusal as exc:
            await context.abort(grpc.StatusCode[exc.code], str(exc))

    async def CreateTodo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with self._rpc(context, "CreateTodo"):
            self.store.check_text(request.text)  # the store's text rule first, then "fail:"
            fail = failure(request.text, grpc.StatusCode)
            if fail is not None:
                await context.abort(*fail)
            return self.store.create(request.text)

    async def ListTodos(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with self._rpc(context, "ListTodos"):
            return todo_pb2.ListTodosResponse(todos=self.store.list())

    async def UpdateTodo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with self._rpc(context, "UpdateTodo"):
            return self.store.update(request.id, request.text, request.done)

    async def DeleteTodo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with self._rpc(context, "DeleteTodo"):
            self.store.delete(request.id)
            return todo_pb2.DeleteTodoResponse()

    async def StreamTodos(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with self._rpc(context, "StreamTodos"):
            for pause, todo in self.store.paced(request):
                await asyncio.sleep(pause)
                yield todo

    async def BulkCreateTodos(self, request_iterator: Any,
                              context: grpc.aio.ServicerContext) -> Any:
        async with self._rpc(context, "BulkCreateTodos"):
            count = 0
            async for request in request_iterator:
                self.store.create(request.text)
                count += 1
            return todo_pb2.BulkCreateTodosResponse(created_count=count)

    async def SyncTodos(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        async with self._rpc(context, "SyncTodos"):
            items: queue.SimpleQueue[todo_pb2.SyncResponse] = queue.SimpleQueue()
            self.store.subscribe(items.put)

            async def read() -> None:
                async for request in request_iterator:
                    error = self.store.apply_sync(request)
                    if error is not None:
                        items.put(todo_pb2.SyncResponse(error=error))

            reader = asyncio.get_running_loop().create_task(read())
            try:
                while True:
                    if items.empty():
                        if reader.done():
                            reader.result()
                            break
                        await asyncio.sleep(0.01)  # the feed is a thread-safe queue: polled
                        continue
                    yield items.get_nowait()
            finally:
                self.store.unsubscribe(items.put)
                reader.cancel()
                await asyncio.wait([reader])


# ----------------------------------------------------------------------- as a process


@contextlib.contextmanager
def process(*args: str, timeout: float = 15.0) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """This module in its own process on a free port (plus ``args``); yields the process and
    its port, and kills it at the end."""
    popen = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--listen", "127.0.0.1:0", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        assert popen.stdout is not None
        readable, _, _ = select.select([popen.stdout], [], [], timing(timeout))
        line = popen.stdout.readline() if readable else ""
        match = re.search(r"listening on \S+:(\d+)", line)
        assert match, f"the Todo oracle did not start: {line!r}"
        yield popen, int(match.group(1))
    finally:
        if popen.poll() is None:
            popen.kill()
        popen.wait()
        if popen.stdout is not None:
            popen.stdout.close()


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGTERM/SIGINT (the options of ``python -m grpcbridge.demo.service``)."""
    service.main(argv, servicer_class=OracleServicer,
                 description="The Todo test oracle (grpcio)")


if __name__ == "__main__":
    main()
