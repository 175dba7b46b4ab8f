"""The bridge: a WebSocket server that relays each tunnel to its own backend connection."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.http11 import Request
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from ..core.admission import (
    AbuseLimiter,
    HandshakeRequest,
    Rejection,
    client_identity,
    select_subprotocol,
)
from ..core.config import BridgeConfig
from ..core.errors import TunnelClosed
from ..core.stream import CloseCode
from ..observability import BridgeMetrics, log_event, logger
from ..relay import StreamSide, Tunnel, WebSocketSide, keepalive_forever, websockets_logger
from ..sockets import connect_address, remove_stale_socket
from .http import HttpServer


@dataclass(slots=True)
class _Session:
    """Bookkeeping of one accepted TCP connection on the bridge's listener."""

    peer: str
    client: str = ""
    accepted: bool = False
    admitted: bool = False
    reported_to_backend: int = 0
    reported_to_client: int = 0
    timer: asyncio.TimerHandle | None = None
    task: asyncio.Task[None] | None = None


def _subprotocol(offered: Sequence[str], allowed: Sequence[str]) -> Subprotocol | None:
    chosen = select_subprotocol(offered, allowed)
    return None if chosen is None else Subprotocol(chosen)


def _upgrade_requested(request: Request) -> bool:
    values = request.headers.get_all("Upgrade")
    return any("websocket" in value.lower() for value in values)


class Bridge:
    """Accepts WebSocket connections and relays each one to its own backend connection.

    Use it as an async context manager, or call :meth:`start` and :meth:`close`::

        async with Bridge(BridgeConfig(backend="127.0.0.1:50051", listen="127.0.0.1:8080")):
            await asyncio.Event().wait()
    """

    def __init__(self, config: BridgeConfig, *, metrics: BridgeMetrics | None = None) -> None:
        if not isinstance(config, BridgeConfig):
            raise TypeError("Bridge() takes a BridgeConfig")
        self.config = config
        self.metrics = metrics if metrics is not None else BridgeMetrics()
        self.limiter = AbuseLimiter(
            max_connections=config.max_connections,
            max_connections_per_client=config.max_connections_per_client,
            max_upgrades_per_minute=config.max_upgrades_per_minute,
        )
        self._sessions: dict[Tunnel, _Session] = {}
        self._server: asyncio.Server | None = None
        self._metrics_server: HttpServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._ssl: ssl.SSLContext | None = None
        self._state = "new"
        self._closed = asyncio.Event()
        self._unix_path: str | None = None
        #: Bound ``(host, port)`` of the WebSocket listener (TCP only), after start.
        self.address: tuple[str, int] | None = None
        #: Bound ``(host, port)`` of the metrics listener, after start.
        self.metrics_address: tuple[str, int] | None = None

    # ----------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        """The ``ws://`` / ``wss://`` URL of the tunnel endpoint (TCP listeners)."""
        if self.address is None:
            raise TunnelClosed("the bridge is not listening on TCP (not started, or unix)")
        host, port = self.address
        host = f"[{host}]" if ":" in host else host
        scheme = "wss" if self._ssl else "ws"
        return f"{scheme}://{host}:{port}{self.config.path}"

    @property
    def active_tunnels(self) -> int:
        """Tunnels currently accepted and not yet closed."""
        return sum(1 for session in self._sessions.values() if session.accepted)

    @property
    def connections(self) -> int:
        """Every connection the bridge holds state for (including handshakes)."""
        return len(self._sessions)

    async def start(self) -> None:
        """Bind the listeners. Raises :class:`OSError` if an address is taken."""
        if self._state != "new":
            raise TunnelClosed(f"start() called on a bridge that is {self._state}")
        self._state = "starting"
        config = self.config
        loop = asyncio.get_running_loop()
        if config.certfile is not None:
            self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._ssl.load_cert_chain(config.certfile, config.keyfile)
        try:
            listen = config.listen_address
            if listen.path is not None:
                remove_stale_socket(listen.path)
                self._server = await loop.create_unix_server(
                    self._protocol_factory, listen.path, ssl=self._ssl, backlog=1024)
                self._unix_path = listen.path
            else:
                assert listen.port is not None
                self._server = await loop.create_server(
                    self._protocol_factory, listen.host, listen.port, ssl=self._ssl,
                    backlog=1024, reuse_address=True)
                self.address = self._server.sockets[0].getsockname()[:2]
            if config.metrics_address is not None:
                self._metrics_server = HttpServer(self._http_handler)
                metrics = config.metrics_address
                assert metrics.host is not None and metrics.port is not None
                self.metrics_address = await self._metrics_server.start(
                    metrics.host, metrics.port)
        except BaseException:
            await self._shutdown_listeners()
            self._state = "closed"
            self._closed.set()
            raise
        self._sweeper = loop.create_task(keepalive_forever(
            self._accepted_tunnels, config.ping_interval, config.idle_timeout,
            self._report_all_bytes))
        self._state = "running"
        log_event("bridge_started", listen=self.url if self.address else str(listen),
                  backend=str(config.backend_address),
                  metrics=_format_address(self.metrics_address))

    async def serve_forever(self) -> None:
        """Wait until :meth:`close` finishes (starting the bridge first if needed)."""
        if self._state == "new":
            await self.start()
        await self._closed.wait()

    async def __aenter__(self) -> Bridge:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self, drain_timeout: float | None = None) -> None:
        """Stop accepting, let open tunnels finish for up to ``drain_timeout`` seconds
        (default: the config's), then close the rest with 1001. Idempotent and safe to call
        from several tasks at once: every caller returns once the bridge is closed."""
        if self._state in ("closing", "closed"):
            await self._closed.wait()
            return
        self._state = "closing"
        try:
            await self._drain(self.config.drain_timeout if drain_timeout is None
                              else drain_timeout)
        finally:
            await self._shutdown_listeners()
            self._state = "closed"
            self._closed.set()
            log_event("bridge_stopped")

    async def _drain(self, seconds: float) -> None:
        if self._server is not None:
            self._server.close()
        # Connections still in their handshake are not tunnels yet: drop them.
        for tunnel, session in list(self._sessions.items()):
            if not session.accepted:
                if session.task is not None:
                    session.task.cancel()
                tunnel.abort()
        pending = [tunnel.closed for tunnel in self._sessions]
        if pending and seconds > 0:
            log_event("bridge_draining", tunnels=len(pending), timeout=seconds)
            await asyncio.wait(pending, timeout=seconds)
        for tunnel in list(self._sessions):
            tunnel.close(CloseCode.GOING_AWAY, "server shutting down")
        pending = [tunnel.closed for tunnel in self._sessions]
        if pending:
            await asyncio.wait(pending, timeout=Tunnel.CLOSE_TIMEOUT + 1)
        for tunnel in list(self._sessions):
            tunnel.abort()
        pending = [tunnel.closed for tunnel in self._sessions]
        if pending:
            await asyncio.wait(pending, timeout=1)
        tasks = [s.task for s in self._sessions.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _shutdown_listeners(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None
        if self._metrics_server is not None:
            await self._metrics_server.close()
            self._metrics_server = None
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unix_path)
            self._unix_path = None

    # -------------------------------------------------------- connections

    def _protocol_factory(self) -> WebSocketSide:
        config = self.config
        loop = asyncio.get_running_loop()
        allowed = config.subprotocols
        websocket = ServerProtocol(
            max_size=config.max_message_bytes,
            extensions=[ServerPerMessageDeflateFactory()] if config.compression else None,
            select_subprotocol=lambda _protocol, offered: _subprotocol(offered, allowed),
            logger=websockets_logger,
        )
        tunnel = Tunnel(loop, websocket, stream_name="backend")
        return WebSocketSide(tunnel, config.buffer_bytes, self._connection_made)

    def _connection_made(self, tunnel: Tunnel) -> None:
        assert tunnel.ws_transport is not None
        if self._state != "running":
            tunnel.ws_transport.abort()
            return
        peername = tunnel.ws_transport.get_extra_info("peername")
        peer = peername[0] if isinstance(peername, tuple) else "unix"
        session = _Session(peer=peer)
        self._sessions[tunnel] = session
        session.timer = tunnel.loop.call_later(
            self.config.handshake_timeout, self._handshake_timed_out, tunnel)
        tunnel.on_handshake_event = lambda event: self._on_handshake_event(tunnel, event)
        tunnel.closed.add_done_callback(lambda _f: self._tunnel_finished(tunnel))

    def _handshake_timed_out(self, tunnel: Tunnel) -> None:
        session = self._sessions.get(tunnel)
        if session is not None and not session.accepted and session.task is None:
            log_event("upgrade_rejected", status=408, reason="handshake timeout",
                      peer=session.peer)
            self.metrics.upgrades_rejected.labels("timeout").inc()
            tunnel.abort()

    def _on_handshake_event(self, tunnel: Tunnel, event: object) -> None:
        session = self._sessions.get(tunnel)
        if session is None or session.task is not None or not isinstance(event, Request):
            return
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        tunnel.pause_websocket_reading()
        session.task = tunnel.loop.create_task(self._open(tunnel, session, event))

    def _reject(self, tunnel: Tunnel, session: _Session, request: Request | None,
                rejection: Rejection) -> None:
        websocket = tunnel.websocket
        assert isinstance(websocket, ServerProtocol)
        response = websocket.reject(rejection.status, rejection.reason + "\n")
        if rejection.retry_after is not None:
            response.headers["Retry-After"] = str(rejection.retry_after)
        if rejection.status == 426:
            response.headers["Upgrade"] = "websocket"
        websocket.send_response(response)
        tunnel.flush_websocket()
        self.metrics.upgrades_rejected.labels(rejection.label).inc()
        log_event("upgrade_rejected", status=rejection.status, reason=rejection.reason,
                  peer=session.peer, client=session.client or session.peer,
                  path=request.path.partition("?")[0] if request else "",
                  origin=request.headers.get("Origin", "") if request else "")

    async def _open(self, tunnel: Tunnel, session: _Session, request: Request) -> None:
        config = self.config
        loop = tunnel.loop
        path, _, query = request.path.partition("?")
        if path != config.path:
            self._reject(tunnel, session, request,
                         Rejection(404, f"no tunnel endpoint at {path}; use {config.path}",
                                   label="path"))
            return
        if not _upgrade_requested(request):
            self._reject(tunnel, session, request, Rejection(
                426, "this endpoint only accepts WebSocket upgrades (gRPC over WebSocket)",
                label="not_websocket"))
            return
        headers: dict[str, list[str]] = {}
        for name, value in request.headers.raw_items():
            headers.setdefault(name.lower(), []).append(value)
        if not config.origin_policy.allows(request.headers.get("Origin"),
                                           request.headers.get("Host")):
            self._reject(tunnel, session, request,
                         Rejection(403, "origin not allowed", label="origin"))
            return
        session.client = client_identity(session.peer, headers.get("x-forwarded-for", []),
                                         config.trusted_networks)
        rejection = self.limiter.admit(session.client, loop.time())
        if rejection is not None:
            self._reject(tunnel, session, request, rejection)
            return
        session.admitted = True
        if config.authenticate is not None:
            offered = tuple(
                entry.strip()
                for value in headers.get("sec-websocket-protocol", [])
                for entry in value.split(",") if entry.strip()
            )
            handshake = HandshakeRequest(path=path, query=query, headers=headers,
                                         client=session.client, subprotocols=offered)
            try:
                decision = config.authenticate(handshake)
                if inspect.isawaitable(decision):
                    decision = await decision
            except Exception:
                logger.exception("authentication hook failed")
                decision = Rejection(500, "authentication failed", label="auth_error")
            if decision is not None:
                self._reject(tunnel, session, request, decision)
                return
        websocket = tunnel.websocket
        assert isinstance(websocket, ServerProtocol)
        response = websocket.accept(request)
        if response.status_code != 101:
            self._reject(tunnel, session, request, Rejection(
                response.status_code, (response.body or b"").decode(errors="replace").strip()
                .replace("\n", " ") or "invalid WebSocket handshake", label="handshake"))
            return
        websocket.send_response(response)
        tunnel.flush_websocket()
        session.accepted = True
        self.metrics.upgrades_accepted.inc()
        self.metrics.tunnels_active.inc()
        log_event("upgrade_accepted", peer=session.peer, client=session.client, path=path,
                  origin=request.headers.get("Origin", ""),
                  subprotocol=websocket.subprotocol or "")
        await self._dial_backend(tunnel)

    async def _dial_backend(self, tunnel: Tunnel) -> None:
        config = self.config
        backend = config.backend_address
        loop = tunnel.loop
        tunnel.dialing = True
        started = loop.time()
        try:
            await asyncio.wait_for(
                connect_address(loop, backend, lambda: StreamSide(tunnel, config.buffer_bytes)),
                config.backend_connect_timeout)
        except (OSError, TimeoutError) as exc:
            reason = "timeout" if isinstance(exc, TimeoutError) else "refused" if isinstance(
                exc, ConnectionRefusedError) else "error"
            self.metrics.backend_dial_failures.labels(reason).inc()
            log_event("backend_dial_failed", backend=str(backend), reason=reason,
                      error=str(exc) or type(exc).__name__)
            tunnel.close(CloseCode.INTERNAL_ERROR, "backend unavailable")
            # Reading was paused for the handshake: resume it so the client's close reply
            # completes the closing handshake now instead of after Tunnel.CLOSE_TIMEOUT.
            tunnel.resume_websocket_reading()
            return
        finally:
            tunnel.dial_finished()
        self.metrics.backend_dial_seconds.observe(loop.time() - started)
        tunnel.websocket_opened()
        log_event("tunnel_opened", client=self._sessions[tunnel].client, backend=str(backend))

    def _tunnel_finished(self, tunnel: Tunnel) -> None:
        session = self._sessions.pop(tunnel, None)
        if session is None:
            return
        if session.timer is not None:
            session.timer.cancel()
        now = tunnel.loop.time()
        if session.admitted:
            self.limiter.release(session.client, now)
        if not session.accepted:
            return
        self._report_bytes(tunnel, session)
        code = tunnel.close_code or CloseCode.ABNORMAL
        duration = now - tunnel.opened_at
        self.metrics.tunnels_active.dec()
        self.metrics.tunnels_closed.labels(str(int(code))).inc()
        self.metrics.tunnel_duration.observe(duration)
        log_event("tunnel_closed", client=session.client, code=int(code),
                  reason=tunnel.close_reason, duration=round(duration, 3),
                  bytes_to_backend=tunnel.bytes_from_websocket,
                  bytes_to_client=tunnel.bytes_to_websocket)

    def _report_bytes(self, tunnel: Tunnel, session: _Session) -> None:
        to_backend = tunnel.bytes_from_websocket - session.reported_to_backend
        to_client = tunnel.bytes_to_websocket - session.reported_to_client
        session.reported_to_backend = tunnel.bytes_from_websocket
        session.reported_to_client = tunnel.bytes_to_websocket
        self.metrics.add_bytes(to_backend, to_client)

    def _accepted_tunnels(self) -> list[Tunnel]:
        return [tunnel for tunnel, session in self._sessions.items() if session.accepted]

    def _report_all_bytes(self) -> None:
        for tunnel, session in self._sessions.items():
            if session.accepted:
                self._report_bytes(tunnel, session)

    # -------------------------------------------------------------- probes

    async def backend_reachable(self, within: float = 1.0) -> bool:
        """Whether a connection to the backend can be opened within ``within`` seconds."""
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await asyncio.wait_for(
                connect_address(loop, self.config.backend_address, asyncio.Protocol), within)
        except (OSError, TimeoutError):
            return False
        transport.close()
        return True

    async def _http_handler(self, path: str) -> tuple[int, str, bytes]:
        text = "text/plain; charset=utf-8"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)
        if path == "/healthz":
            return 200, text, b"ok\n"
        if path == "/readyz":
            if self._state == "running" and await self.backend_reachable():
                return 200, text, b"ready\n"
            return 503, text, b"backend unreachable\n"
        return 404, text, b"not found; try /metrics, /healthz or /readyz\n"


def _format_address(address: Sequence[object] | None) -> str:
    return "" if address is None else f"{address[0]}:{address[1]}"
