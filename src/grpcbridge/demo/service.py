"""grpcio (sync, thread-pool) implementation of ``todo.v1.TodoService``.

* **Errors** -- the store's refusals (:class:`grpcbridge.demo.store.Refusal`) end the RPC
  with their status and message: ``CreateTodo``, ``UpdateTodo`` and ``BulkCreateTodos`` with
  a text the store refuses (:func:`grpcbridge.demo.store.text_error`: empty or
  whitespace-only, or longer than the store's ``max_text_length``) fail with
  ``INVALID_ARGUMENT`` and the rule's message, "text must not be empty" for a store without a
  limit.  ``UpdateTodo``/``DeleteTodo`` of an unknown id fail with ``NOT_FOUND`` "todo <id>
  not found" (whatever the text).
* **Headers at once** -- every RPC sends its (empty) initial metadata when it starts, so a
  client may wait for them before the first message (the demo page does, on ``SyncTodos``).
* **StreamTodos** -- sends the current list, then ``repeat - 1`` more times (``repeat <= 0``
  means once), sleeping ``interval_ms`` between consecutive todos; it stops promptly when
  the client cancels or the deadline passes.
* **BulkCreateTodos** -- creates one todo per request and returns ``created_count``; a
  refused text aborts with ``INVALID_ARGUMENT`` (todos created before it are kept).
* **SyncTodos** (bidi) -- applies each ``SyncRequest`` action to the store and streams the
  store's change feed (changes made by *any* client) as ``SyncResponse(todo=...)`` or
  ``SyncResponse(deleted_id=...)``; a failed action (also a refused text) yields
  ``SyncResponse(error=...)`` to the requesting client only.  After the client half-closes,
  all changes caused by its requests are flushed and the stream ends with OK; it stops
  promptly when the client cancels.

Run standalone with ``python -m grpcbridge.demo.service --listen 127.0.0.1:50051
[--db PATH] [--max-text-length N]`` (no length limit by default); it prints
``listening on <host:port>`` (the actual port if 0 was given) and serves until
SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from grpcbridge.demo import todo_pb2, todo_pb2_grpc
from grpcbridge.demo.store import Refusal, TodoStore

__all__ = ["TodoServicer", "main", "serve"]

_POLL = 0.05  # seconds; granularity of cancellation checks


class _Rpc(contextlib.AbstractContextManager["_Rpc"]):
    """Per-RPC bookkeeping: detects whether the RPC ended by cancellation, and ends it with
    the status of a :class:`~grpcbridge.demo.store.Refusal` raised by the handler.

    Used as a context manager around the handler body.  On exit the RPC counts as
    *finished* if it is still active (the handler returned or aborted on its own); the
    termination callback sets :attr:`cancelled` only for RPCs not finished that way (the
    client cancelled, the deadline passed or the server shut down).
    """

    def __init__(self, context: grpc.ServicerContext) -> None:
        self.context = context
        self.cancelled = threading.Event()
        self.finished = False
        if not context.add_callback(self._on_terminated):
            self._on_terminated()  # already terminated before the handler ran

    def _on_terminated(self) -> None:
        if not self.finished:
            self.cancelled.set()

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        self.finished = self.context.is_active()
        if isinstance(error, Refusal):
            self.context.abort(grpc.StatusCode[error.code], str(error))


class TodoServicer(todo_pb2_grpc.TodoServiceServicer):  # type: ignore[misc, unused-ignore]
    """The Todo service backed by a :class:`TodoStore`; see the module docstring."""

    def __init__(self, store: TodoStore) -> None:
        self.store = store

    def _start(self, context: grpc.ServicerContext, method: str) -> _Rpc:
        """Begin the RPC named ``method``: watch it (:class:`_Rpc`) and send the response
        headers at once (a client may wait for them before the first message)."""
        rpc = _Rpc(context)
        if context.is_active():
            context.send_initial_metadata(())
        return rpc

    def CreateTodo(
        self, request: todo_pb2.CreateTodoRequest, context: grpc.ServicerContext
    ) -> todo_pb2.Todo:
        with self._start(context, "CreateTodo"):
            return self.store.create(request.text)

    def ListTodos(
        self, request: todo_pb2.ListTodosRequest, context: grpc.ServicerContext
    ) -> todo_pb2.ListTodosResponse:
        with self._start(context, "ListTodos"):
            return todo_pb2.ListTodosResponse(todos=self.store.list())

    def UpdateTodo(
        self, request: todo_pb2.UpdateTodoRequest, context: grpc.ServicerContext
    ) -> todo_pb2.Todo:
        with self._start(context, "UpdateTodo"):
            return self.store.update(request.id, request.text, request.done)

    def DeleteTodo(
        self, request: todo_pb2.DeleteTodoRequest, context: grpc.ServicerContext
    ) -> todo_pb2.DeleteTodoResponse:
        with self._start(context, "DeleteTodo"):
            self.store.delete(request.id)
            return todo_pb2.DeleteTodoResponse()

    def StreamTodos(
        self, request: todo_pb2.StreamTodosRequest, context: grpc.ServicerContext
    ) -> Iterator[todo_pb2.Todo]:
        with self._start(context, "StreamTodos") as rpc:
            for pause, todo in self.store.paced(request):
                # The termination callback ends the pause at once.
                if (pause and rpc.cancelled.wait(pause)) or not context.is_active():
                    return
                yield todo

    def BulkCreateTodos(
        self, request_iterator: Iterator[todo_pb2.CreateTodoRequest], context: grpc.ServicerContext
    ) -> todo_pb2.BulkCreateTodosResponse:
        with self._start(context, "BulkCreateTodos"):
            count = 0
            for request in request_iterator:
                self.store.create(request.text)
                count += 1
            return todo_pb2.BulkCreateTodosResponse(created_count=count)

    def SyncTodos(
        self, request_iterator: Iterator[todo_pb2.SyncRequest], context: grpc.ServicerContext
    ) -> Iterator[todo_pb2.SyncResponse]:
        with self._start(context, "SyncTodos") as rpc:
            changes: queue.SimpleQueue[todo_pb2.SyncResponse] = queue.SimpleQueue()
            self.store.subscribe(changes.put)
            context.add_callback(lambda: self.store.unsubscribe(changes.put))

            def read_requests() -> None:
                # Cancelled / deadline: grpc.RpcError, and the response loop notices via `rpc`.
                with contextlib.suppress(grpc.RpcError):
                    for request in request_iterator:
                        error = self.store.apply_sync(request)
                        if error is not None:
                            changes.put(todo_pb2.SyncResponse(error=error))

            reader = threading.Thread(target=read_requests, name="SyncTodos-reader", daemon=True)
            reader.start()
            try:
                while not rpc.cancelled.is_set() and context.is_active():
                    try:
                        change = changes.get(timeout=_POLL)
                    except queue.Empty:
                        # Every change caused by this client's requests is queued before the
                        # reader ends, so "ended and empty" means fully flushed.
                        if not reader.is_alive() and changes.empty():
                            break
                        continue
                    yield change
            finally:
                self.store.unsubscribe(changes.put)


def serve(
    address: str,
    store: TodoStore | None = None,
    *,
    max_message_bytes: int = 32 * 1024 * 1024,
    max_workers: int = 64,
    servicer_class: type[TodoServicer] = TodoServicer,
) -> tuple[grpc.Server, TodoServicer, int]:
    """Start a grpcio server for the Todo service on ``address`` (``host:port`` or ``unix:``).

    Returns ``(server, servicer, port)``; ``port`` is the bound TCP port, 0 for unix sockets.
    The caller stops the server (and closes the store, if it passed none, via
    ``servicer.store.close()``).  Each streaming RPC occupies one of ``max_workers`` threads.
    ``servicer_class`` may be a subclass of :class:`TodoServicer` (tests add behaviour).
    """
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="todo-rpc"),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )
    servicer = servicer_class(store if store is not None else TodoStore())
    todo_pb2_grpc.add_TodoServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(address)
    server.start()
    return server, servicer, 0 if address.startswith("unix") else port


def main(argv: list[str] | None = None, *, servicer_class: type[TodoServicer] = TodoServicer,
         description: str = "Todo example gRPC server (grpcio)") -> None:
    """Command-line entry point: serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--listen", default="127.0.0.1:50051", help="host:port or unix:PATH")
    parser.add_argument("--db", default=":memory:", help="sqlite database path")
    parser.add_argument("--max-message-bytes", type=int, default=32 * 1024 * 1024)
    parser.add_argument("--max-text-length", type=int, default=0, metavar="N",
                        help="refuse todo texts longer than N characters (default 0: no limit)")
    args = parser.parse_args(argv)

    store = TodoStore(args.db, max_text_length=args.max_text_length or None)
    server, _, port = serve(args.listen, store, max_message_bytes=args.max_message_bytes,
                            servicer_class=servicer_class)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.stop(grace=2))
    shown = args.listen if port == 0 else f"{args.listen.rpartition(':')[0]}:{port}"
    print(f"listening on {shown}", flush=True)
    server.wait_for_termination()  # polls, so the signal handlers run
    store.close()


if __name__ == "__main__":
    main()
