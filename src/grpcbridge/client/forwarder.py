"""The forwarder: a local TCP or unix listener whose every connection is carried through its
own WebSocket tunnel to a bridge, so grpcio and any gRPC tool can use a tunnel unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl

from websockets.client import ClientProtocol
from websockets.http11 import Response
from websockets.protocol import OPEN
from websockets.typing import Origin, Subprotocol
from websockets.uri import parse_uri

from ..core.config import ForwarderConfig
from ..core.errors import HandshakeError, TunnelClosed
from ..core.stream import CloseCode
from ..observability import log_event
from ..relay import StreamSide, Tunnel, WebSocketSide, keepalive_forever
from ..server.bridge import _remove_stale_socket


def client_ssl_context(cacert: str | None) -> ssl.SSLContext:
    """TLS settings for dialing wss:// (system CAs, or only ``cacert`` when given)."""
    return ssl.create_default_context(cafile=cacert)


class Forwarder:
    """Accepts local gRPC connections and relays each through a new WebSocket tunnel.

    ::

        async with Forwarder(ForwarderConfig(target="ws://host:8080/grpc",
                                             listen="127.0.0.1:50052")):
            ...  # point any gRPC client at 127.0.0.1:50052
    """

    def __init__(self, config: ForwarderConfig) -> None:
        if not isinstance(config, ForwarderConfig):
            raise TypeError("Forwarder() takes a ForwarderConfig")
        self.config = config
        target = config.parsed_target
        self._uri = parse_uri(target.url)
        self._ssl = client_ssl_context(config.cacert) if target.secure else None
        self._server: asyncio.Server | None = None
        self._tunnels: dict[Tunnel, asyncio.Task[None] | None] = {}
        self._keepalive: asyncio.Task[None] | None = None
        self._state = "new"
        self._closed = asyncio.Event()
        self._unix_path: str | None = None
        #: Bound ``(host, port)`` after :meth:`start` (TCP listeners).
        self.address: tuple[str, int] | None = None

    @property
    def active_tunnels(self) -> int:
        return len(self._tunnels)

    async def start(self) -> None:
        if self._state != "new":
            raise TunnelClosed(f"start() called on a forwarder that is {self._state}")
        self._state = "running"
        loop = asyncio.get_running_loop()
        listen = self.config.listen_address
        try:
            if listen.path is not None:
                _remove_stale_socket(listen.path)
                self._server = await loop.create_unix_server(self._accept, listen.path,
                                                             backlog=1024)
                self._unix_path = listen.path
            else:
                assert listen.port is not None
                self._server = await loop.create_server(self._accept, listen.host, listen.port,
                                                        backlog=1024, reuse_address=True)
                self.address = self._server.sockets[0].getsockname()[:2]
        except BaseException:
            self._state = "closed"
            self._closed.set()
            raise
        self._keepalive = loop.create_task(keepalive_forever(
            lambda: [t for t in self._tunnels if t.is_open],
            self.config.ping_interval, self.config.idle_timeout))
        log_event("forwarder_started", listen=str(listen) if listen.path else
                  f"{self.address[0]}:{self.address[1]}" if self.address else "",
                  target=self.config.parsed_target.url)

    async def serve_forever(self) -> None:
        if self._state == "new":
            await self.start()
        await self._closed.wait()

    async def __aenter__(self) -> Forwarder:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop accepting and close every tunnel (1001). Idempotent."""
        if self._state in ("closing", "closed"):
            await self._closed.wait()
            return
        self._state = "closing"
        try:
            if self._server is not None:
                self._server.close()
            for tunnel, task in list(self._tunnels.items()):
                if task is not None:
                    task.cancel()
                tunnel.close(CloseCode.GOING_AWAY, "forwarder shutting down")
            pending = [tunnel.closed for tunnel in self._tunnels]
            if pending:
                await asyncio.wait(pending, timeout=Tunnel.CLOSE_TIMEOUT + 1)
            for tunnel in list(self._tunnels):
                tunnel.abort()
            pending = [tunnel.closed for tunnel in self._tunnels]
            if pending:
                await asyncio.wait(pending, timeout=1)
            tasks = [task for task in self._tunnels.values() if task is not None]
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            if self._keepalive is not None:
                self._keepalive.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._keepalive
            if self._server is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._server.wait_closed(), 5)
            if self._unix_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._unix_path)
            self._state = "closed"
            self._closed.set()

    # ------------------------------------------------------------------

    def _accept(self) -> StreamSide:
        config = self.config
        loop = asyncio.get_running_loop()
        websocket = ClientProtocol(
            self._uri,
            origin=Origin(config.origin) if config.origin else None,
            subprotocols=[Subprotocol(s) for s in config.subprotocols] or None,
            max_size=config.max_message_bytes,
        )
        tunnel = Tunnel(loop, websocket, stream_name="client")
        tunnel.dialing = True
        if self._state != "running":
            tunnel.dialing = False
            return _RefusingStreamSide(tunnel, config.buffer_bytes)
        self._tunnels[tunnel] = loop.create_task(self._dial(tunnel))
        tunnel.closed.add_done_callback(lambda _f: self._tunnels.pop(tunnel, None))
        return StreamSide(tunnel, config.buffer_bytes)

    async def _dial(self, tunnel: Tunnel) -> None:
        config = self.config
        target = config.parsed_target
        loop = tunnel.loop
        websocket = tunnel.websocket
        assert isinstance(websocket, ClientProtocol)
        response: asyncio.Future[Response] = loop.create_future()

        def on_event(event: object) -> None:
            if isinstance(event, Response) and not response.done():
                response.set_result(event)

        tunnel.on_handshake_event = on_event
        try:
            async with asyncio.timeout(config.handshake_timeout):
                try:
                    await loop.create_connection(
                        lambda: WebSocketSide(tunnel, config.buffer_bytes), target.host,
                        target.port, ssl=self._ssl,
                        server_hostname=target.host if self._ssl else None)
                except OSError as exc:
                    raise HandshakeError(f"cannot connect to {target.url}: {exc}") from exc
                request = websocket.connect()
                extra = dict(config.headers)
                if config.bearer_token is not None:
                    extra["Authorization"] = f"Bearer {config.bearer_token}"
                for name, value in extra.items():
                    del request.headers[name]  # websockets' Headers append on assignment
                    request.headers[name] = value
                websocket.send_request(request)
                tunnel.flush_websocket()
                answer = await response
            if websocket.handshake_exc is not None or websocket.state is not OPEN:
                body = (answer.body or b"").decode(errors="replace").strip()
                raise HandshakeError(
                    f"{target.url} refused the WebSocket upgrade: HTTP {answer.status_code}"
                    + (f": {body}" if body else ""), status=answer.status_code)
        except (HandshakeError, TimeoutError) as exc:
            reason = str(exc) if isinstance(exc, HandshakeError) else (
                f"no WebSocket handshake with {target.url} within {config.handshake_timeout} s")
            log_event("tunnel_dial_failed", target=target.url, error=reason)
            tunnel.dialing = False
            if tunnel.ws_transport is None:
                tunnel.ws_lost(HandshakeError(reason))
            else:
                tunnel.abort()
            return
        except asyncio.CancelledError:
            tunnel.dialing = False
            if tunnel.ws_transport is None:
                tunnel.ws_lost(None)  # never connected: let the tunnel finish
            else:
                tunnel.abort()
            raise
        finally:
            tunnel.on_handshake_event = None
            if tunnel in self._tunnels:
                self._tunnels[tunnel] = None
        tunnel.dial_finished()  # else `closed` never resolves and the tunnel is never dropped
        tunnel.websocket_opened()
        log_event("tunnel_opened", target=target.url)


class _RefusingStreamSide(StreamSide):
    """Accepted while shutting down: close at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.abort()
