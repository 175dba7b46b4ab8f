"""The bridge as an ASGI application (the Go ``HandleBridgeMux`` counterpart).

Mount it in Starlette/FastAPI and run under uvicorn or any ASGI server with WebSocket
support; it applies the same :class:`~grpcbridge.server.gate.Gate` (origin, host, auth,
abuse limits), memory budget, metrics and log events as the standalone bridge, and works
with every backend kind::

    app = FastAPI()
    bridge = BridgeApp(BridgeConfig(backend=GrpclibBackend([TodoService()]), path="/grpc"))
    app.router.add_websocket_route("/grpc", bridge)  # Starlette 1.x: on the router

``config.path`` is compared with the full request path. Settings that are the ASGI server's
job (listening, TLS, pings, compression...) are refused at construction when they differ
from their defaults, with where they live instead: see :data:`REFUSED` and
:class:`BridgeApp`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from ..backends import Backend
from ..core.admission import Rejection
from ..core.config import BridgeConfig
from ..core.errors import ConfigError, InvalidStateError
from ..core.stream import CloseCode, Opcode, message_too_big_reason
from ..core.tunnel import CLOSE_TIMEOUT, PROBE_INTERVAL, TunnelMachine
from ..observability import REQUEST_ID_HEADER, BridgeMetrics
from ..relay import StreamAdapter
from ..tracing import available as tracing_available
from .gate import header_map
from .session import TunnelServer, TunnelSession

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: :class:`BridgeConfig` fields :class:`BridgeApp` applies, and how.
APPLIED: Mapping[str, str] = {
    "backend": "where tunnels go, as in Bridge",
    "allow_remote_backend": "checked by BridgeConfig, as in Bridge",
    "backend_connect_timeout": "bounds each backend connection (socket backends)",
    "path": "compared with the full request path",
    "allowed_origins": "admission (Gate)",
    "allowed_hosts": "admission (Gate)",
    "subprotocols": "admission (Gate); echoed in the accept",
    "authenticate": "admission (Gate)",
    "max_connections": "admission (Gate)",
    "max_connections_per_client": "admission (Gate)",
    "max_upgrades_per_minute": "admission (Gate)",
    "trusted_proxies": "admission (Gate), on the ASGI scope's client address",
    "trust_trace_context": "tunnel and RPC spans continue every client's trace context",
    "max_message_bytes": "larger messages close the tunnel with 1009",
    "buffer_bytes": "bytes queued per direction before reading from that side pauses",
    "client_memory_budget": "counts each tunnel's queued bytes (to the client and to the "
                            "backend) per client; beyond: close 1008",
    "memory_budget": "the same, over all clients",
    "drain_timeout": "close() and the ASGI lifespan shutdown let open tunnels finish this "
                     "long, then close them with 1001",
    "max_tunnel_age": "tunnels get a graceful HTTP/2 GOAWAY at this age, as in Bridge",
    "max_tunnel_age_grace": "then this long until the close with 1001, as in Bridge",
}

#: :class:`BridgeConfig` fields that are the ASGI server's (or the surrounding app's) job:
#: BridgeApp refuses them unless they keep their defaults, saying where they live instead.
REFUSED: Mapping[str, str] = {
    "listen": "the ASGI server binds the socket (uvicorn --host/--port, or --uds)",
    "handshake_timeout": "the ASGI server reads the upgrade request before BridgeApp sees "
                         "it; bound slow requests there or in a reverse proxy in front "
                         "(e.g. nginx client_header_timeout)",
    "ping_interval": "the ASGI server sends the pings (uvicorn --ws-ping-interval)",
    "idle_timeout": "ASGI shows pings and pongs to no application; the ASGI server closes "
                    "a peer that stops answering pings (uvicorn --ws-ping-timeout)",
    "certfile": "TLS is the ASGI server's (uvicorn --ssl-certfile/--ssl-keyfile)",
    "keyfile": "TLS is the ASGI server's (uvicorn --ssl-certfile/--ssl-keyfile)",
    "compression": "the ASGI server negotiates permessage-deflate "
                   "(uvicorn --ws-per-message-deflate)",
    "metrics_listen": "mount the metrics in your app: Mount('/metrics', "
                      "prometheus_client.make_asgi_app(registry=bridge.metrics.registry))",
    "allow_remote_metrics": "mount the metrics in your app: Mount('/metrics', "
                            "prometheus_client.make_asgi_app(registry=bridge.metrics.registry))",
    "static": "serve files from your app: Mount('/', "
              "starlette.staticfiles.StaticFiles(directory=...))",
}


class _AsgiTunnel(StreamAdapter):
    """One tunnel under ASGI: an adapter feeding a :class:`~grpcbridge.core.tunnel.
    TunnelMachine` (where the rules live, as under the standalone bridge) from ASGI
    ``receive()`` and the backend stream, and carrying out its outputs.

    Backend bytes wait in an outbox drained by one sender task; above ``buffer_bytes`` the
    machine pauses the backend's reading. Client messages are handed to the machine one at a
    time, and the next ``receive()`` waits while the machine has paused the WebSocket side.
    As under the relay, the memory budget is charged when a buffer fills or drains (the
    machine's pauses and resumes) and on every tick, not per message.
    ASGI has no pings: the machine's pings become empty messages (legal and skipped by
    every peer), which is how a client that left is noticed while reading is paused.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, send: Send, buffer_bytes: int,
                 max_message_bytes: int) -> None:
        super().__init__(loop)
        self._send = send
        self._buffer_bytes = buffer_bytes
        #: Largest WebSocket message accepted (what frames sent to us must fit in).
        self.max_message_bytes = max_message_bytes
        self._outbox: collections.deque[bytes] = collections.deque()
        self._outbox_bytes = 0
        self._outbox_full = False
        self._wakeup = asyncio.Event()
        self._may_read = asyncio.Event()
        self._may_read.set()
        #: The close frame to send once the outbox is flushed (code, wire reason).
        self._close: tuple[int, str] | None = None
        #: The sender and receiver tasks, while the relay runs.
        self.tasks: tuple[asyncio.Task[None], ...] = ()
        self.machine = TunnelMachine(self, clock=loop.time, stream_name="backend",
                                     close_timeout=CLOSE_TIMEOUT)
        self.machine.websocket_opened()  # accepted before the tunnel exists
        self.machine.pause_websocket()  # until the backend is attached (or the dial fails)

    # TunnelIO: the machine's outputs -------------------------------------------------

    def send_message(self, data: bytes) -> None:
        self._outbox.append(data)
        self._outbox_bytes += len(data)
        self._wakeup.set()
        if self._outbox_bytes > self._buffer_bytes and not self._outbox_full:
            self._outbox_full = True
            self.machine.websocket_write_paused()

    def send_ping(self) -> None:
        self.send_message(b"")

    def send_close(self, code: int, reason: str) -> None:
        if self._close is None:
            self._close = (code, reason)
            self._wakeup.set()
            self._may_read.set()  # let the receiver see the client's answer

    fail_websocket = send_close

    def abort_websocket(self) -> None:
        for task in self.tasks:
            task.cancel()

    def finish_websocket(self) -> None:
        self._wakeup.set()  # the sender ends once the outbox and the close frame are out

    def pause_websocket(self) -> None:
        self._may_read.clear()
        self._wakeup.set()  # the sender starts probing the client

    def resume_websocket(self) -> None:
        self._may_read.set()

    def websocket_buffered(self) -> int:
        return self._outbox_bytes

    # tasks ---------------------------------------------------------------------------

    async def sender(self) -> None:
        """Drain the outbox into the WebSocket; then send the close frame. A send that fails
        (the client is gone) ends the tunnel."""
        send = self._send
        machine = self.machine
        try:
            while True:
                if machine.ws_paused and self._close is None:
                    # Reading from the client waits for the backend, so a client that left
                    # goes unnoticed (ASGI reports it to receive() only): the machine probes it.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), PROBE_INTERVAL)
                    if not self._wakeup.is_set():
                        machine.tick()
                        continue
                else:
                    await self._wakeup.wait()
                self._wakeup.clear()
                while self._outbox:
                    chunk = self._outbox.popleft()
                    await send({"type": "websocket.send", "bytes": chunk})
                    self._outbox_bytes -= len(chunk)
                    if self._outbox_full and self._outbox_bytes <= self._buffer_bytes // 4:
                        self._outbox_full = False
                        machine.websocket_write_resumed()
                if self._close is not None:
                    code, reason = self._close
                    await send({"type": "websocket.close", "code": code, "reason": reason})
                    return
        except OSError as exc:  # uvicorn: ClientDisconnected
            machine.websocket_lost(CloseCode.ABNORMAL, str(exc) or "client connection lost")

    async def receiver(self, receive: Receive) -> None:
        """Feed client messages to the machine until the client disconnects."""
        machine = self.machine
        while True:
            await self._may_read.wait()
            message = await receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
                machine.websocket_lost(int(message.get("code", 1005)),
                                       str(message.get("reason") or ""))
                return
            if kind != "websocket.receive" or machine.close_code is not None:
                continue  # after our close frame: wait for the client's disconnect
            data = message.get("bytes")
            if data is None:
                machine.frame(Opcode.TEXT, b"")
            elif len(data) > self.max_message_bytes:
                machine.fail(CloseCode.MESSAGE_TOO_BIG,
                             message_too_big_reason(self.max_message_bytes))
            elif data:
                machine.data(data)
            else:
                machine.empty_frame()


class BridgeApp(TunnelServer):
    """ASGI application serving gRPC tunnels at ``config.path``.

    Of its :class:`BridgeConfig` it applies the fields of :data:`APPLIED` (each with how;
    the memory budgets count what each tunnel queues towards the client and the backend,
    not the ASGI server's own buffers). The rest is the ASGI server's job: a config that
    sets any field of :data:`REFUSED` raises :class:`~grpcbridge.ConfigError` naming the
    field and where it lives (uvicorn options, a reverse proxy, your app's mounts).
    """

    def __init__(self, config: BridgeConfig, *, metrics: BridgeMetrics | None = None) -> None:
        super().__init__(config, metrics)
        defaults = BridgeConfig(backend=config.backend, allow_remote_backend=True)
        problems = [f"{name}={getattr(config, name)!r}: {hint}" for name, hint in REFUSED.items()
                    if getattr(config, name) != getattr(defaults, name)]
        if problems:
            raise ConfigError(
                "BridgeApp cannot apply " + "; ".join(problems)
                + ". Leave these at their defaults in the BridgeConfig given to BridgeApp")
        self._started: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = asyncio.Event()
        self._tunnels: set[asyncio.Task[None]] = set()
        self._reporter: asyncio.Task[None] | None = None

    async def _ensure_started(self) -> None:
        if self._closing:
            raise InvalidStateError("this BridgeApp was closed; create a new BridgeApp")
        if self._started is None:
            tracing_available()  # import opentelemetry (when installed) now, not later
            self._started = asyncio.get_running_loop().create_task(self.backend.start())
        await asyncio.shield(self._started)

    async def close(self, drain_timeout: float | None = None) -> None:
        """Refuse new tunnels (503), let open ones finish for up to ``drain_timeout``
        seconds (default: the config's), close the rest with 1001, then close the backend.
        Idempotent and safe from several tasks at once. A mounted app gets no lifespan
        events from Starlette, so call this from your app's shutdown.

        uvicorn closes its WebSockets itself (1012) before the lifespan shutdown, bounded by
        its ``--timeout-graceful-shutdown``; the drain matters when you call this earlier."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            await self._close_tunnels(drain_timeout, lambda: set(self._tunnels))
        finally:
            if self._started is not None:
                with contextlib.suppress(Exception):
                    await self._started
                await self.backend.close()
            self._closed.set()

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

    def _request(self, scope: Scope) -> tuple[dict[str, list[str]], str, str, str | None]:
        """The request's headers (for :meth:`Gate.check`), peer and request ids."""
        headers = header_map((name.decode("latin-1"), value.decode("latin-1"))
                             for name, value in scope.get("headers", ()))
        peer = str(scope["client"][0]) if scope.get("client") else "unknown"
        return headers, peer, *self.gate.request_id(headers, peer=peer)

    async def _http(self, scope: Scope, send: Send) -> None:
        headers, peer, request_id, _ = self._request(scope)
        decision = await self.gate.check(
            request_id=request_id, path=scope["path"],
            query=scope.get("query_string", b"").decode("latin-1"), headers=headers,
            peer=peer, websocket=False, now=asyncio.get_running_loop().time())
        assert isinstance(decision, Rejection)
        await self._send_http_rejection(send, decision, request_id, prefix="http.response")

    @staticmethod
    async def _send_http_rejection(send: Send, rejection: Rejection, request_id: str, *,
                                   prefix: str) -> None:
        body = (rejection.reason + "\n").encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8"),
                   (b"content-length", str(len(body)).encode()),
                   (REQUEST_ID_HEADER.lower().encode(), request_id.encode())]
        headers.extend((name.lower().encode("latin-1"), value.encode("latin-1"))
                       for name, value in rejection.response_headers())
        await send({"type": f"{prefix}.start", "status": rejection.status, "headers": headers})
        await send({"type": f"{prefix}.body", "body": body})

    async def _reject(self, scope: Scope, send: Send, rejection: Rejection,
                      request_id: str) -> None:
        if "websocket.http.response" in scope.get("extensions", {}):
            await self._send_http_rejection(send, rejection, request_id,
                                            prefix="websocket.http.response")
        else:
            await send({"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION})

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        headers, peer, request_id, client_request_id = self._request(scope)
        path = scope["path"]
        decision = None if self._closing else await self.gate.check(
            request_id=request_id, client_request_id=client_request_id, path=path,
            query=scope.get("query_string", b"").decode("latin-1"),
            headers=headers, peer=peer, websocket=True, now=loop.time())
        if not isinstance(decision, Rejection) and self._closing:
            if decision is not None:  # close() began while the auth hook ran
                self.gate.limiter.release(decision.client, loop.time())
            decision = Rejection(503, "the bridge is shutting down", label="shutdown")
            self.gate.rejected(decision, request_id=request_id, peer=peer, path=path)
        if isinstance(decision, Rejection):
            await self._reject(scope, send, decision, request_id)
            return
        assert decision is not None
        try:
            await self._ensure_started()
            await send({"type": "websocket.accept", "subprotocol": decision.subprotocol,
                        "headers": [(REQUEST_ID_HEADER.lower().encode(),
                                     request_id.encode())]})
        except BaseException:
            self.gate.limiter.release(decision.client, loop.time())
            raise
        tunnel = _AsgiTunnel(loop, send, self.config.buffer_bytes,
                             self.config.max_message_bytes)
        session = TunnelSession(self, tunnel, decision, peer=peer, path=path, headers=headers)
        try:
            await self._relay(tunnel, session, receive)
        finally:
            session.finish()

    async def _relay(self, tunnel: _AsgiTunnel, session: TunnelSession,
                     receive: Receive) -> None:
        loop = tunnel.loop
        sender = loop.create_task(tunnel.sender())
        receiver = loop.create_task(tunnel.receiver(receive))
        tunnel.tasks = (sender, receiver)
        self._relaying[tunnel] = session
        if self._reporter is None:
            # While tunnels are open, as the standalone bridge does: every second report
            # relayed bytes and tick every machine (probes, the memory charge's refresh).
            # Pings and the idle timeout are the ASGI server's (0, 0: off here).
            self._reporter = self._keepalive(0, 0)
        try:
            await session.connect_backend()
            # Ends when the client disconnects, or when we sent our close frame.
            await asyncio.wait([sender, receiver], return_when=asyncio.FIRST_COMPLETED)
            if receiver.done():
                sender.cancel()  # the client is gone: nothing more can be delivered
            else:
                # Our close frame is out: wait (briefly) for the client's disconnect.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(receiver), CLOSE_TIMEOUT)
        finally:
            del self._relaying[tunnel]
            if not self._relaying and self._reporter is not None:
                self._reporter.cancel()  # the last tunnel: its bytes go out in finish()
                self._reporter = None
            for task in (sender, receiver):
                task.cancel()
            try:
                await asyncio.gather(sender, receiver, return_exceptions=True)
            finally:
                # However it ended (a second cancellation of this task included: anyio
                # delivers one at every await), the WebSocket side is done; the machine
                # closes the backend stream (what is buffered for it gets the close timeout
                # to drain) and releases the tunnel's memory budget.
                tunnel.machine.websocket_lost(CloseCode.ABNORMAL, "client connection lost")


__all__ = ["APPLIED", "REFUSED", "Backend", "BridgeApp"]
