"""A grpclib Channel whose connection is a WebSocket tunnel (no local socket in between)."""

from __future__ import annotations

import asyncio
import random
import ssl as ssl_module
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import grpclib.client
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.encoding.base import CodecBase, StatusDetailsCodecBase
from grpclib.exceptions import GRPCError
from grpclib.protocol import H2Protocol

from ..core.config import ReconnectPolicy, check_dial_options
from ..core.errors import ConfigError, HandshakeError, TunnelClosed
from ..core.reconnect import Backoff
from ..core.stream import DEFAULT_BUFFER_BYTES, DEFAULT_MAX_MESSAGE_BYTES, CloseCode
from ..core.target import parse_target
from ..framesize import advertise_max_frame_size, max_frame_size_for
from ..pipe import Pipe
from ..relay import Tunnel
from .dial import DialSettings, client_ssl_context, open_websocket
from .streams import tunnel_stream


class Channel(grpclib.client.Channel):
    """A grpclib :class:`~grpclib.client.Channel` over a WebSocket tunnel.

    Use it with grpclib stubs (``--grpclib_python_out``) or betterproto stubs exactly like a
    normal channel::

        async with grpcbridge.Channel("ws://127.0.0.1:8080/grpc") as channel:
            reply = await TodoServiceStub(channel).ListTodos(ListTodosRequest())

    ``target`` follows :func:`grpcbridge.parse_target`. Passing ``ssl`` demands ``wss://``
    (a ``wss://`` target without it uses the system CAs). A dropped tunnel fails in-flight
    RPCs with ``UNAVAILABLE``; the next RPC reconnects, with ``reconnect`` backoff after
    failed attempts (RPCs made while waiting fail fast with ``UNAVAILABLE``).
    ``max_frame_size`` is the largest HTTP/2 frame the channel accepts (SETTINGS_MAX_FRAME_SIZE;
    default 1 MiB, kept below ``max_message_bytes``; see :mod:`grpcbridge.framesize`). Must be
    created inside a running event loop.
    """

    def __init__(
        self,
        target: str,
        *,
        ssl: ssl_module.SSLContext | None = None,
        headers: Mapping[str, str] | None = None,
        bearer_token: str | None = None,
        subprotocols: Sequence[str] = (),
        origin: str | None = None,
        handshake_timeout: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        reconnect: ReconnectPolicy | None = None,
        max_frame_size: int | None = None,
        config: Configuration | None = None,
        codec: CodecBase | None = None,
        status_details_codec: StatusDetailsCodecBase | None = None,
    ) -> None:
        asyncio.get_running_loop()  # grpclib binds the loop now: fail clearly outside one
        parsed = parse_target(target, tls=True if ssl is not None else None)
        policy = reconnect if reconnect is not None else ReconnectPolicy()
        if not isinstance(policy, ReconnectPolicy):
            raise ConfigError("reconnect must be a grpcbridge.ReconnectPolicy")
        timeout = policy.min_connect_timeout if handshake_timeout is None else handshake_timeout
        if timeout <= 0:
            raise ConfigError(f"handshake_timeout must be > 0, got {timeout}")
        self._max_frame_size = max_frame_size_for(max_frame_size, max_message_bytes)
        checked_headers, checked_subprotocols = check_dial_options(
            headers=headers or {}, bearer_token=bearer_token, subprotocols=subprotocols,
            max_message_bytes=max_message_bytes, buffer_bytes=buffer_bytes)
        super().__init__(parsed.host, parsed.port, codec=codec,
                         status_details_codec=status_details_codec, config=config)
        self._authority = parsed.authority  # host[:port] as in the URL, never a path
        self._scheme = "http"  # the HTTP/2 inside the tunnel is always cleartext (h2c)
        self._dial = DialSettings(
            target=parsed,
            ssl=ssl if ssl is not None else (client_ssl_context(None) if parsed.secure
                                             else None),
            headers=checked_headers, bearer_token=bearer_token,
            subprotocols=checked_subprotocols,
            origin=origin, handshake_timeout=timeout, max_message_bytes=max_message_bytes,
            buffer_bytes=buffer_bytes)
        self._tunnel: Tunnel | None = None
        self._backoff = Backoff(policy, self.target)
        self._closed = False

    def __repr__(self) -> str:
        return f"grpcbridge.Channel({self._dial.target.url!r})"

    @property
    def target(self) -> str:
        return self._dial.target.url

    # ------------------------------------------------------------ grpclib hooks

    async def _create_connection(self) -> H2Protocol:
        if self._closed:
            raise TunnelClosed(f"{self!r} is closed; create a new Channel")
        loop = asyncio.get_running_loop()
        refusal = self._backoff.refusal(loop.time())
        if refusal is not None:
            raise GRPCError(Status.UNAVAILABLE, refusal)
        tunnel = self._dial.new_tunnel(loop, "channel")
        try:
            await open_websocket(tunnel, self._dial)
        except HandshakeError as exc:
            self._backoff.failed(loop.time(), str(exc), random.random())
            raise GRPCError(Status.UNAVAILABLE, str(exc)) from exc
        if self._closed:  # closed while connecting
            tunnel.close(CloseCode.NORMAL, "channel closed")
            raise TunnelClosed(f"{self!r} was closed while connecting")
        self._backoff.succeeded()
        protocol = self._protocol_factory()
        peername = tunnel.ws_transport.get_extra_info("peername") if tunnel.ws_transport else None
        Pipe(tunnel, protocol, {"peername": peername}).connect(self._dial.buffer_bytes)
        advertise_max_frame_size(protocol, self._max_frame_size)  # leaves with the preface
        self._tunnel = tunnel
        return protocol

    def request(self, *args: Any, **kwargs: Any) -> grpclib.client.Stream:  # type: ignore[type-arg]
        if self._closed:
            raise TunnelClosed(f"{self!r} is closed; create a new Channel")
        return tunnel_stream(super().request(*args, **kwargs), self)

    def _unavailable(self, exc: BaseException) -> GRPCError:
        if self._closed:  # closed by us: like grpcio, in-flight calls are CANCELLED
            return GRPCError(Status.CANCELLED, f"{self!r} was closed")
        tunnel = self._tunnel
        detail = str(exc) or "connection lost"
        if tunnel is not None and tunnel.close_code is not None:
            detail = (f"tunnel to {self.target} closed with code {tunnel.close_code}"
                      + (f" ({tunnel.close_reason})" if tunnel.close_reason else ""))
        return GRPCError(Status.UNAVAILABLE, detail)

    # ----------------------------------------------------------------- closing

    def close(self) -> None:
        """Close the tunnel (code 1000); in-flight RPCs fail. Idempotent. Later RPCs raise
        :class:`~grpcbridge.TunnelClosed`."""
        self._closed = True
        super().close()
        if self._tunnel is not None:
            self._tunnel.close(CloseCode.NORMAL, "channel closed")

    async def wait_closed(self) -> None:
        """Close, then wait until the tunnel's connection is gone."""
        self.close()
        tunnel = self._tunnel
        if tunnel is not None:
            await asyncio.wait([tunnel.closed], timeout=Tunnel.CLOSE_TIMEOUT + 1)
            if not tunnel.closed.done():
                tunnel.abort()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc_val: BaseException | None, exc_tb: TracebackType | None) -> None:
        await self.wait_closed()
