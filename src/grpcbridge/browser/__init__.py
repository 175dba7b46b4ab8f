"""grpcbridge in the browser: a grpclib channel over the browser's ``WebSocket`` (Pyodide).

Python running in Pyodide (a page, a web worker, or Node with a ``WebSocket`` global) calls
gRPC services through a grpcbridge bridge (or a Go grpc-tunnel bridge) with every RPC kind::

    from grpcbridge.browser import Channel
    from todo_grpc import TodoServiceStub

    async with Channel("/grpc") as channel:     # ws(s)://<page host>/grpc
        stub = TodoServiceStub(channel)
        todo = await stub.CreateTodo(CreateTodoRequest(text="write tests"))

What it shares with :class:`grpcbridge.Channel` (options, reconnect backoff, statuses, closing)
is in :mod:`grpcbridge.channel_core`. This package imports only grpclib, ``grpcbridge.core``,
``grpcbridge.channel_core``, ``grpcbridge._grpclib_compat`` and ``grpcbridge.framesize`` (no
websockets, no prometheus-client; a test checks it); Pyodide's ``js`` and ``pyodide.ffi``
modules are imported when a connection is made, so the package also imports (but cannot
connect) under CPython. Ship it to the browser with
``scripts/build_browser_bundle.py``, which builds the wheels Pyodide needs (grpcbridge,
grpclib, h2, hpack, hyperframe, multidict, protobuf).
"""

from __future__ import annotations

from .channel import Channel, resolve_target
from .transport import (
    SocketClosedError,
    TransportStats,
    WebSocketTransport,
    private_close_code,
)

__all__ = [
    "Channel",
    "SocketClosedError",
    "TransportStats",
    "WebSocketTransport",
    "private_close_code",
    "resolve_target",
]
