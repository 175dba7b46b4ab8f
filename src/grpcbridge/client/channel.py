"""A grpclib Channel whose connection is a WebSocket tunnel (no local socket in between)."""

from __future__ import annotations

import asyncio
import os
import ssl as ssl_module
from collections.abc import Mapping, Sequence
from typing import Never

from grpclib.config import Configuration
from grpclib.encoding.base import CodecBase, StatusDetailsCodecBase

from ..channel_core import CoreChannel, check_options
from ..core.config import ReconnectPolicy
from ..core.proxy import FROM_ENVIRONMENT, ProxySetting, resolve_proxy
from ..core.stream import DEFAULT_BUFFER_BYTES, DEFAULT_MAX_MESSAGE_BYTES, CloseCode
from ..core.target import parse_target
from ..core.tunnel import CLOSE_TIMEOUT
from ..pipe import Pipe
from .dial import DialSettings, open_websocket


class _TunnelConnection:
    """The CPython runtime's connection: a tunnel whose WebSocket side is a picows client
    and whose stream side is grpclib's protocol, joined by an in-process pipe."""

    __slots__ = ("_dial", "closed", "tunnel")

    close_timeout = CLOSE_TIMEOUT

    def __init__(self, dial: DialSettings) -> None:
        self._dial = dial
        self.tunnel = dial.new_tunnel(asyncio.get_running_loop(), "channel")
        self.closed = self.tunnel.closed

    async def wait_open(self, within: float) -> None:
        # ``within`` is the channel's handshake_timeout, which the dial settings carry.
        await open_websocket(self.tunnel, self._dial)

    def attach(self, protocol: asyncio.Protocol) -> None:
        tunnel = self.tunnel
        peername = tunnel.ws_transport.get_extra_info("peername") if tunnel.ws_transport else None
        Pipe(tunnel, protocol, {"peername": peername})

    @property
    def usable(self) -> bool:
        return not self.tunnel.machine.dialing and self.tunnel.machine.close_code is None

    def loss_description(self) -> str | None:
        machine = self.tunnel.machine
        if machine.close_code is None:
            return None
        return (f"tunnel to {self._dial.target.url} closed with code {machine.close_code}"
                + (f" ({machine.close_reason})" if machine.close_reason else ""))

    def close(self) -> None:
        # A handshake in progress finishes first (see Connection).
        if not self.tunnel.machine.dialing:
            self.tunnel.machine.close(CloseCode.NORMAL, "channel closed")

    def abort(self) -> None:
        if not self.tunnel.machine.dialing:
            self.tunnel.machine.abort()


class Channel(CoreChannel[_TunnelConnection]):
    """A grpclib :class:`~grpclib.client.Channel` over a WebSocket tunnel.

    Use it with grpclib stubs (``--grpclib_python_out``) or betterproto stubs exactly like a
    normal channel::

        async with grpcbridge.Channel("ws://127.0.0.1:8080/grpc") as channel:
            reply = await TodoServiceStub(channel).ListTodos(ListTodosRequest())

    ``target`` follows :func:`grpcbridge.parse_target`. Passing ``ssl`` demands ``wss://``
    (a ``wss://`` target without it uses the system CAs). ``headers``, ``bearer_token``
    (``Authorization: Bearer``), ``subprotocols`` and ``origin`` go on the upgrade request.
    ``handshake_timeout``: seconds for TCP connect, TLS and the WebSocket handshake
    (default: ``reconnect.min_connect_timeout``, 20 s; a proxy's CONNECT included).
    ``proxy``: by default the ``https_proxy``/``http_proxy``/``all_proxy``/``no_proxy``
    variables, read once, here; a URL (``http://user:password@host:3128``,
    ``socks5://host:1080``) to always use; ``None`` for none (:mod:`grpcbridge.core.proxy`).

    Shared with :class:`grpcbridge.browser.Channel` (:mod:`grpcbridge.channel_core`): a
    dropped tunnel fails in-flight RPCs with ``UNAVAILABLE`` naming its close code; the next
    RPC reconnects, with ``reconnect`` backoff after failed attempts (RPCs made while waiting
    fail fast with ``UNAVAILABLE``). ``close()`` fails RPCs in flight with ``CANCELLED``;
    later RPCs raise :class:`~grpcbridge.TunnelClosed`. ``max_frame_size`` is the largest
    HTTP/2 frame the channel accepts (SETTINGS_MAX_FRAME_SIZE; default 1 MiB, kept below
    ``max_message_bytes``; see :mod:`grpcbridge.framesize`). Must be created inside a
    running event loop.
    """

    _public_name = "grpcbridge.Channel"

    def __init__(
        self,
        target: str,
        *,
        ssl: ssl_module.SSLContext | None = None,
        headers: Mapping[str, str] | None = None,
        bearer_token: str | None = None,
        subprotocols: Sequence[str] = (),
        origin: str | None = None,
        proxy: ProxySetting = FROM_ENVIRONMENT,
        handshake_timeout: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        reconnect: ReconnectPolicy | None = None,
        max_frame_size: int | None = None,
        config: Configuration | None = None,
        codec: CodecBase | None = None,
        status_details_codec: StatusDetailsCodecBase | None = None,
        **renamed: Never,
    ) -> None:
        parsed = parse_target(target, tls=True if ssl is not None else None)
        options = check_options(
            "grpcbridge.Channel", renamed, handshake_timeout=handshake_timeout,
            reconnect=reconnect, max_message_bytes=max_message_bytes,
            max_frame_size=max_frame_size, bearer_token=bearer_token,
            subprotocols=subprotocols, headers=headers, buffer_bytes=buffer_bytes)
        super().__init__(parsed, options, codec=codec,
                         status_details_codec=status_details_codec, config=config)
        self._dial = DialSettings(
            target=parsed,
            ssl=ssl if ssl is not None else (ssl_module.create_default_context() if parsed.secure
                                             else None),
            headers=options.headers, bearer_token=bearer_token,
            subprotocols=options.subprotocols, origin=origin,
            proxy=resolve_proxy(parsed, proxy, os.environ),
            handshake_timeout=options.handshake_timeout,
            max_message_bytes=max_message_bytes, buffer_bytes=buffer_bytes)

    def _new_connection(self) -> _TunnelConnection:
        return _TunnelConnection(self._dial)
