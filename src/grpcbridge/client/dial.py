"""Opening the WebSocket side of a client tunnel (shared by the forwarder and channels)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from websockets.client import ClientProtocol
from websockets.http11 import Response
from websockets.protocol import OPEN
from websockets.typing import Origin, Subprotocol
from websockets.uri import parse_uri

from ..core.errors import HandshakeError
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

    Raises :class:`HandshakeError` (refused, unreachable, TLS failure or timeout); the
    tunnel is then already being torn down, so callers only report the error.
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
            try:
                await loop.create_connection(
                    lambda: WebSocketSide(tunnel, settings.buffer_bytes), target.host,
                    target.port, ssl=settings.ssl,
                    server_hostname=target.host if settings.ssl else None)
            except OSError as exc:
                raise HandshakeError(f"cannot connect to {target.url}: {exc}") from exc
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
        raise HandshakeError(
            f"no WebSocket handshake with {target.url} within {within} s"
        ) from None
    except BaseException:  # HandshakeError, or cancellation
        _abandon(tunnel)
        raise
    finally:
        tunnel.on_handshake_event = None
    tunnel.dialing = False
    tunnel.websocket_opened()


def _abandon(tunnel: Tunnel) -> None:
    tunnel.dialing = False
    if tunnel.ws_transport is None:
        tunnel.ws_lost(None)  # never connected: let the tunnel finish
    else:
        tunnel.abort()
