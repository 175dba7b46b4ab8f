"""The bridge as an ASGI application (the Go ``HandleBridgeMux`` counterpart).

Mount it in Starlette/FastAPI and run under uvicorn or any ASGI server with WebSocket
support; it applies the same :class:`~grpcbridge.server.gate.Gate` (origin, auth, abuse
limits), metrics and log events as the standalone bridge, and works with every backend kind::

    app = FastAPI()
    bridge = BridgeApp(BridgeConfig(backend=GrpclibBackend([TodoService()]), path="/grpc"))
    app.router.add_websocket_route("/grpc", bridge)  # Starlette 1.x: on the router

``config.path`` is compared with the full request path. Keepalive pings are the ASGI
server's job (uvicorn: ``--ws-ping-interval``/``--ws-ping-timeout``); ASGI does not show
pongs to applications, so ``idle_timeout`` is not applied here. The ASGI server frames the
messages and enforces its own message limit (uvicorn ``--ws-max-size``, 16 MiB by default);
``max_message_bytes`` is checked again here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ..backends import Backend
from ..core.admission import Rejection
from ..core.config import BridgeConfig
from ..core.stream import CloseCode, InboundMessages, Opcode, StreamViolation
from ..observability import BridgeMetrics
from .bridge import make_backend
from .gate import Admitted, Gate

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _AsgiTunnel:
    """Relay between an ASGI WebSocket and a backend stream (a :class:`StreamOwner`).

    Backend bytes wait in an outbox drained by one sender task; above ``buffer_bytes`` the
    backend's reading pauses. Client messages are written to the backend one at a time, and
    the next ``receive()`` waits while the backend's write buffer is full.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, send: Send, buffer_bytes: int,
                 max_message_bytes: int) -> None:
        self.loop = loop
        self._send = send
        self._buffer_bytes = buffer_bytes
        #: Largest WebSocket message accepted (what frames sent to us must fit in).
        self.max_message_bytes = max_message_bytes
        self._rules = InboundMessages()
        self.stream_transport: asyncio.Transport | None = None
        self._pending: list[bytes] = []
        self._outbox: collections.deque[bytes] = collections.deque()
        self._outbox_bytes = 0
        self._stream_paused = False
        self._wakeup = asyncio.Event()
        self._may_read = asyncio.Event()
        self._may_read.set()
        self._stream_lost = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.bytes_to_backend = 0
        self.bytes_to_client = 0
        self.opened_at = loop.time()

    # StreamOwner ------------------------------------------------------------

    def attach_stream(self, transport: asyncio.Transport, buffer_bytes: int) -> None:
        transport.set_write_buffer_limits(high=buffer_bytes, low=buffer_bytes // 4)
        self.stream_transport = transport
        pending, self._pending = self._pending, []
        for chunk in pending:
            transport.write(chunk)
        if self.close_code is not None:
            transport.close()

    def stream_data(self, data: bytes) -> None:
        if self.close_code is not None:
            return
        self._outbox.append(data)
        self._outbox_bytes += len(data)
        self.bytes_to_client += len(data)
        self._wakeup.set()
        if self._outbox_bytes > self._buffer_bytes and self.stream_transport is not None \
                and not self._stream_paused:
            self._stream_paused = True
            self.stream_transport.pause_reading()

    def stream_eof(self) -> None:
        self.finish(CloseCode.NORMAL, "backend closed the connection")

    def stream_lost(self, exc: Exception | None) -> None:
        self._stream_lost = True
        if exc is None:
            self.finish(CloseCode.NORMAL, "backend closed the connection")
        else:
            self.finish(CloseCode.INTERNAL_ERROR, "backend connection lost")

    def pause_websocket_reading(self) -> None:
        self._may_read.clear()

    def resume_websocket_reading(self) -> None:
        self._may_read.set()

    def websocket_buffer_size(self) -> int:
        return self._outbox_bytes

    # relay --------------------------------------------------------------------

    def finish(self, code: int, reason: str) -> None:
        """Close with ``code`` once the outbox is flushed; close the backend stream."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        self._wakeup.set()
        self._may_read.set()
        if self.stream_transport is not None and not self._stream_lost:
            self.stream_transport.close()

    async def sender(self) -> None:
        """Drain the outbox into the WebSocket; then send the close frame."""
        send = self._send
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._outbox:
                chunk = self._outbox.popleft()
                await send({"type": "websocket.send", "bytes": chunk})
                self._outbox_bytes -= len(chunk)
                if self._stream_paused and self._outbox_bytes <= self._buffer_bytes // 4:
                    self._stream_paused = False
                    if self.stream_transport is not None and not self._stream_lost:
                        self.stream_transport.resume_reading()
            if self.close_code is not None:
                await send({"type": "websocket.close", "code": self.close_code,
                            "reason": self.close_reason})
                return

    async def receiver(self, receive: Receive) -> None:
        """Feed client messages to the backend until the client disconnects."""
        while self.close_code is None:
            await self._may_read.wait()
            message = await receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
                self.close_code = self.close_code or int(message.get("code", 1005))
                self.close_reason = self.close_reason or str(message.get("reason") or "")
                return
            if kind != "websocket.receive":
                continue
            data = message.get("bytes")
            try:
                if data is None:
                    self._rules.accept(Opcode.TEXT, b"")
                    continue
                if len(data) > self.max_message_bytes:
                    raise StreamViolation(CloseCode.MESSAGE_TOO_BIG,
                                          f"message larger than {self.max_message_bytes} bytes")
            except StreamViolation as violation:
                self.finish(violation.code, violation.reason)
                return
            if data:
                self.bytes_to_backend += len(data)
                if self.stream_transport is None:
                    self._pending.append(data)
                else:
                    self.stream_transport.write(data)


class BridgeApp:
    """ASGI application serving gRPC tunnels at ``config.path``."""

    def __init__(self, config: BridgeConfig, *, metrics: BridgeMetrics | None = None) -> None:
        if not isinstance(config, BridgeConfig):
            raise TypeError("BridgeApp() takes a BridgeConfig")
        self.config = config
        self.metrics = metrics if metrics is not None else BridgeMetrics()
        self.gate = Gate(config, self.metrics)
        self.backend = make_backend(config)
        self._started: asyncio.Task[None] | None = None
        self._closed = False
        self._tunnels: set[asyncio.Task[None]] = set()

    async def _ensure_started(self) -> None:
        if self._started is None:
            self._started = asyncio.get_running_loop().create_task(self.backend.start())
        await asyncio.shield(self._started)

    async def close(self) -> None:
        """Close the backend (in-process servers). Idempotent. Mounted apps get no lifespan
        events from Starlette, so call this from your app's shutdown."""
        if self._closed:
            return
        self._closed = True
        if self._started is not None:
            with contextlib.suppress(Exception):
                await self._started
            await self.backend.close()

    @property
    def active_tunnels(self) -> int:
        return len(self._tunnels)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "http":
            await self._http(scope, send)
        elif kind == "websocket":
            task = asyncio.current_task()
            assert task is not None
            self._tunnels.add(task)
            try:
                await self._websocket(scope, receive, send)
            finally:
                self._tunnels.discard(task)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._ensure_started()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    @staticmethod
    def _headers(scope: Scope) -> dict[str, list[str]]:
        headers: dict[str, list[str]] = {}
        for name, value in scope.get("headers", ()):
            headers.setdefault(name.decode("latin-1").lower(), []).append(
                value.decode("latin-1"))
        return headers

    @staticmethod
    def _peer(scope: Scope) -> str:
        client = scope.get("client")
        return str(client[0]) if client else "unknown"

    async def _http(self, scope: Scope, send: Send) -> None:
        decision = await self.gate.check(
            path=scope["path"], query=scope.get("query_string", b"").decode("latin-1"),
            headers=self._headers(scope), peer=self._peer(scope), websocket=False,
            now=asyncio.get_running_loop().time())
        assert isinstance(decision, Rejection)
        await self._send_http_rejection(send, decision, prefix="http.response")

    @staticmethod
    async def _send_http_rejection(send: Send, rejection: Rejection, *, prefix: str) -> None:
        body = (rejection.reason + "\n").encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8"),
                   (b"content-length", str(len(body)).encode())]
        headers.extend((name.lower().encode("latin-1"), value.encode("latin-1"))
                       for name, value in rejection.response_headers())
        await send({"type": f"{prefix}.start", "status": rejection.status, "headers": headers})
        await send({"type": f"{prefix}.body", "body": body})

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        headers = self._headers(scope)
        peer = self._peer(scope)
        decision = await self.gate.check(
            path=scope["path"], query=scope.get("query_string", b"").decode("latin-1"),
            headers=headers, peer=peer, websocket=True, now=loop.time())
        if isinstance(decision, Rejection):
            if "websocket.http.response" in scope.get("extensions", {}):
                await self._send_http_rejection(send, decision, prefix="websocket.http.response")
            else:
                await send({"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION})
            return
        try:
            await self._ensure_started()
            await send({"type": "websocket.accept", "subprotocol": decision.subprotocol})
        except BaseException:
            self.gate.release(decision, loop.time())
            raise
        origin = headers.get("origin", [""])[0]
        self.gate.opened(decision, peer=peer, path=scope["path"], origin=origin)
        tunnel = _AsgiTunnel(loop, send, self.config.buffer_bytes,
                             self.config.max_message_bytes)
        try:
            await self._relay(tunnel, decision, receive)
        finally:
            now = loop.time()
            self.gate.release(decision, now)
            self.metrics.add_bytes(tunnel.bytes_to_backend, tunnel.bytes_to_client)
            self.gate.closed(decision, code=int(tunnel.close_code or CloseCode.ABNORMAL),
                             reason=tunnel.close_reason, duration=now - tunnel.opened_at,
                             bytes_to_backend=tunnel.bytes_to_backend,
                             bytes_to_client=tunnel.bytes_to_client)

    async def _relay(self, tunnel: _AsgiTunnel, admitted: Admitted, receive: Receive) -> None:
        loop = tunnel.loop
        sender = loop.create_task(tunnel.sender())
        receiver = loop.create_task(tunnel.receiver(receive))
        try:
            started = loop.time()
            try:
                await self.backend.connect(tunnel, self.config.buffer_bytes)
            except (OSError, TimeoutError) as exc:
                self.gate.backend_failed(exc)
                tunnel.finish(CloseCode.INTERNAL_ERROR, "backend unavailable")
            else:
                self.gate.backend_connected(admitted, loop.time() - started)
            # Ends when the client disconnects, or when we sent our close frame.
            await asyncio.wait([sender, receiver], return_when=asyncio.FIRST_COMPLETED)
            if receiver.done():
                tunnel.finish(tunnel.close_code or CloseCode.NORMAL, tunnel.close_reason)
                sender.cancel()  # the client is gone: nothing more can be delivered
            else:
                # Our close frame is out: wait (briefly) for the client's disconnect.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(receiver), 2.0)
        finally:
            for task in (sender, receiver):
                task.cancel()
            await asyncio.gather(sender, receiver, return_exceptions=True)
            if tunnel.stream_transport is not None and not tunnel._stream_lost:
                tunnel.stream_transport.close()


__all__ = ["Backend", "BridgeApp"]
