"""Opening the WebSocket side of a client tunnel (shared by the forwarder and channels)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.asyncio import Proxy
from websockets.client import ClientProtocol
from websockets.http11 import Response
from websockets.protocol import OPEN
from websockets.typing import Origin, Subprotocol
from websockets.uri import parse_uri

from ..core.errors import HandshakeError
from ..core.proxy import ProxyURL, refusal_message
from ..core.stream import DEFAULT_BUFFER_BYTES, DEFAULT_MAX_MESSAGE_BYTES
from ..core.target import Target
from ..relay import Tunnel, WebSocketSide, websockets_logger


def client_ssl_context(cacert: str | None) -> ssl.SSLContext:
    """TLS settings for dialing wss:// (system CAs, or only ``cacert`` when given)."""
    return ssl.create_default_context(cafile=cacert)


@dataclass(frozen=True, kw_only=True)
class DialSettings:
    """How to open client tunnels to one target (already validated by the caller)."""

    target: Target
    ssl: ssl.SSLContext | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    bearer_token: str | None = None
    subprotocols: Sequence[str] = ()
    origin: str | None = None
    #: Proxy to dial through (already resolved: see :mod:`grpcbridge.core.proxy`), or None.
    proxy: ProxyURL | None = None
    handshake_timeout: float = 10.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    buffer_bytes: int = DEFAULT_BUFFER_BYTES

    def new_tunnel(self, loop: asyncio.AbstractEventLoop, stream_name: str) -> Tunnel:
        """A tunnel whose WebSocket side is a client, not yet connected."""
        websocket = ClientProtocol(
            parse_uri(self.target.url),
            origin=Origin(self.origin) if self.origin else None,
            subprotocols=[Subprotocol(s) for s in self.subprotocols] or None,
            max_size=self.max_message_bytes,
            logger=websockets_logger,
        )
        tunnel = Tunnel(loop, websocket, stream_name=stream_name)
        tunnel.dialing = True
        return tunnel


async def open_websocket(tunnel: Tunnel, settings: DialSettings, *,
                         within: float | None = None) -> None:
    """Connect ``tunnel``'s WebSocket side and complete the opening handshake within
    ``within`` seconds (default: ``settings.handshake_timeout``).

    Through ``settings.proxy`` when set (TLS, for wss://, is then end to end with the
    bridge); ``within`` covers the proxy's CONNECT too.

    Raises :class:`HandshakeError` (refused, unreachable, TLS failure, proxy refusal or
    timeout); the tunnel is then already being torn down, so callers only report the error.
    """
    target = settings.target
    within = settings.handshake_timeout if within is None else within
    loop = tunnel.loop
    websocket = tunnel.websocket
    assert isinstance(websocket, ClientProtocol)
    response: asyncio.Future[Response] = loop.create_future()

    def on_event(event: object) -> None:
        if isinstance(event, Response) and not response.done():
            response.set_result(event)

    tunnel.on_handshake_event = on_event
    try:
        async with asyncio.timeout(within):
            await _connect(tunnel, settings, within)
            request = websocket.connect()
            extra = dict(settings.headers)
            if settings.bearer_token is not None:
                extra["Authorization"] = f"Bearer {settings.bearer_token}"
            for name, value in extra.items():
                # websockets' Headers append on assignment, and raise KeyError on deleting a
                # header that is absent (Authorization and custom headers always are).
                if name in request.headers:
                    del request.headers[name]
                request.headers[name] = value
            websocket.send_request(request)
            tunnel.flush_websocket()
            answer = await response
        if websocket.handshake_exc is not None or websocket.state is not OPEN:
            body = (answer.body or b"").decode(errors="replace").strip()
            raise HandshakeError(
                f"{target.url} refused the WebSocket upgrade: HTTP {answer.status_code}"
                + (f": {body}" if body else ""), status=answer.status_code)
    except TimeoutError:
        _abandon(tunnel)
        via = f" through proxy {settings.proxy.address}" if settings.proxy else ""
        raise HandshakeError(
            f"no WebSocket handshake with {target.url}{via} within {within} s"
        ) from None
    except BaseException:  # HandshakeError, or cancellation
        _abandon(tunnel)
        raise
    finally:
        tunnel.on_handshake_event = None
    tunnel.dialing = False
    tunnel.websocket_opened()


async def _connect(tunnel: Tunnel, settings: DialSettings, within: float) -> None:
    """Connect ``tunnel``'s WebSocket side (TCP, proxy, TLS), not yet upgraded."""
    target = settings.target
    sock = None
    if settings.proxy is not None:
        sock = await _proxy_socket(settings.proxy, target.host, target.port, within)

    def side() -> WebSocketSide:
        return WebSocketSide(tunnel, settings.buffer_bytes)

    tls, hostname = settings.ssl, target.host if settings.ssl else None
    try:
        if sock is None:
            await tunnel.loop.create_connection(side, target.host, target.port, ssl=tls,
                                                server_hostname=hostname)
        else:
            await tunnel.loop.create_connection(side, sock=sock, ssl=tls,
                                                server_hostname=hostname)
    except OSError as exc:
        via = f" through proxy {settings.proxy.address}" if settings.proxy else ""
        raise HandshakeError(f"cannot connect to {target.url}{via}: {exc}") from exc
    finally:
        if sock is not None and tunnel.ws_transport is None:
            sock.close()  # the TLS handshake failed, or was cancelled


_PROXY_TYPES = {"http": ProxyType.HTTP, "socks5": ProxyType.SOCKS5, "socks4": ProxyType.SOCKS4}


async def _proxy_socket(proxy: ProxyURL, host: str, port: int, within: float) -> socket.socket:
    """A socket connected to ``host:port`` through ``proxy`` (python-socks: HTTP CONNECT,
    SOCKS5 or SOCKS4). Messages name the proxy by address only: never its password."""
    dialer = Proxy(_PROXY_TYPES[proxy.kind], proxy.host, proxy.port, username=proxy.username,
                   password=proxy.password, rdns=proxy.remote_dns,
                   loop=asyncio.get_running_loop())
    try:
        return await dialer.connect(host, port, timeout=within)
    except ProxyConnectionError as exc:
        cause = exc.__cause__ or exc
        raise HandshakeError(
            f"cannot connect to proxy {proxy.address} (from {proxy.source}): {cause}"
        ) from None
    except ProxyTimeoutError:
        raise TimeoutError from None
    except ProxyError as exc:
        status = exc.error_code if proxy.kind == "http" else None
        if status is not None:
            reason = str(exc).removeprefix(str(status)).strip()
            message = refusal_message(proxy, status, reason, host, port)
        else:  # a SOCKS refusal, or an HTTP proxy that closed or answered garbage
            message = (f"{proxy.kind.upper()} proxy {proxy.address} opened no tunnel to "
                       f"{host}:{port}: {exc}")
        raise HandshakeError(message, proxy_status=status) from None


def _abandon(tunnel: Tunnel) -> None:
    tunnel.dialing = False
    if tunnel.ws_transport is None:
        tunnel.ws_lost(None)  # never connected: let the tunnel finish
    else:
        tunnel.abort()
