"""A grpclib Channel whose connection is the browser's WebSocket (Pyodide)."""

from __future__ import annotations

import asyncio
import binascii
import random
import string
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import quote

import grpclib.client
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.encoding.base import CodecBase, StatusDetailsCodecBase
from grpclib.exceptions import GRPCError
from grpclib.protocol import AbstractHandler, H2Protocol
from h2.config import H2Configuration

from ..client.streams import tunnel_stream
from ..core.admission import BEARER_QUERY_PARAMETER, BEARER_SUBPROTOCOL_PREFIX
from ..core.config import ReconnectPolicy, check_dial_options
from ..core.errors import ConfigError, HandshakeError, TargetError, TunnelClosed
from ..core.reconnect import Backoff
from ..core.stream import DEFAULT_MAX_MESSAGE_BYTES
from ..core.target import Target, browser_target, parse_target
from ..framesize import advertise_max_frame_size, max_frame_size_for
from . import _ffi
from .transport import (
    CLOSE_TIMEOUT,
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_HIGH_WATER,
    DEFAULT_LOW_WATER,
    DEFAULT_MAX_BUFFER_BYTES,
    SocketClosedError,
    WebSocketTransport,
)

_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")
#: grpclib's own reasons for ending streams, which say nothing about the WebSocket.
_GENERIC_REASONS = ("Connection lost", "Connection closed")


def resolve_target(target: str, location: tuple[str, str] | None) -> Target:
    """The WebSocket URL for ``target`` as seen from a page at ``location``
    (``(location.protocol, location.host)``, or ``None`` outside a page).

    In a page, ``""`` means ``ws(s)://<page host>/`` and ``"/grpc"`` means
    ``ws(s)://<page host>/grpc`` (``wss`` on ``https:`` pages); full ``ws://``/``wss://``
    URLs are taken as given. Without a location (Node) a full URL is required.
    """
    text = target.strip()
    if location is None:
        if not text or text.startswith("/"):
            raise TargetError(
                f"target {target!r} is relative, but this runtime has no page location "
                "(Node?): pass a full URL like ws://127.0.0.1:8080/grpc")
        return parse_target(text)
    return browser_target(text, page_protocol=location[0], page_host=location[1])


def _hex_head(data: bytes | None) -> str:
    """hyperframe's ``_raw_data_repr``, hexlifying only the 10 bytes it shows."""
    if not data:
        return "None"
    text = binascii.hexlify(data[:10]).decode("ascii")
    return f"<hex:{text}{'...' if len(data) > 10 else ''}>"


def _cheapen_frame_repr() -> None:
    """h2 4.x formats every frame it receives for a trace log that is normally discarded
    (``logger.trace("Received frame: %s", repr(frame))``), and hyperframe's repr hexlifies a
    frame's whole payload to show its first 10 bytes: in Pyodide that is 10-15 % of a bulk
    download. Swap in :func:`_hex_head`: the same text, without the per-byte cost. Only done
    if hyperframe's helper gives the same results (another hyperframe is left alone)."""
    try:
        from hyperframe import frame
    except ImportError:  # pragma: no cover - h2 always brings hyperframe
        return
    current = getattr(frame, "_raw_data_repr", None)
    if current is None or current is _hex_head:
        return
    try:
        if any(current(sample) != _hex_head(sample) for sample in
               (b"", b"\x00", bytes(range(10)), bytes(range(11)), bytes(range(200)))):
            return
    except Exception:  # pragma: no cover - a different helper
        return
    frame._raw_data_repr = _hex_head


class _BrowserH2Protocol(H2Protocol):
    """grpclib's ``H2Protocol`` advertising a larger SETTINGS_MAX_FRAME_SIZE."""

    def __init__(self, handler: AbstractHandler, config: Any, h2_config: H2Configuration,
                 max_frame_size: int) -> None:
        super().__init__(handler, config, h2_config)
        self._max_frame_size = max_frame_size

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # grpclib sends the preface and its SETTINGS here; ours follow in the same message
        # (the transport sends the writes of one task together), before any request.
        super().connection_made(transport)
        advertise_max_frame_size(self, self._max_frame_size)


class _StreamErrors:
    """Maps a lost connection to UNAVAILABLE for one stream, naming that stream's socket."""

    __slots__ = ("_channel", "_stream")

    def __init__(self, channel: Channel, stream: grpclib.client.Stream) -> None:  # type: ignore[type-arg]
        self._channel = channel
        self._stream = stream

    def _unavailable(self, exc: BaseException) -> GRPCError:
        h2_stream = getattr(self._stream, "_stream", None)
        transport = getattr(h2_stream, "_transport", None)
        return self._channel._unavailable(
            exc, transport if isinstance(transport, WebSocketTransport) else None)


class Channel(grpclib.client.Channel):
    """A grpclib :class:`~grpclib.client.Channel` over the browser's ``WebSocket``, for
    Python running in Pyodide (page, web worker, or Node with a ``WebSocket`` global).

    Use it with grpclib stubs like any channel::

        from grpcbridge.browser import Channel

        async with Channel("/grpc") as channel:      # ws(s)://<page host>/grpc
            todo = await TodoServiceStub(channel).CreateTodo(CreateTodoRequest(text="hi"))

    ``target``: ``""`` or ``"/path"`` resolve against the page's location (scheme following
    the page); ``ws://``/``wss://`` URLs are used as given (required where there is no page,
    as in Node). The HTTP/2 ``:authority`` is the URL's ``host[:port]``.

    Browsers cannot set request headers, so ``bearer_token`` travels as a ``bearer.<token>``
    subprotocol entry (``token_in="subprotocol"``, default) or as ``?access_token=``
    (``token_in="query"``). ``subprotocols`` are offered too; the bridge echoes one from its
    allow-list (``grpcbridge`` by default), which browsers require whenever a subprotocol is
    offered.

    A dropped socket fails waiting RPCs with ``UNAVAILABLE`` (close code, reason and
    ``navigator.onLine`` in the message); RPCs whose responses had fully arrived complete. The
    next RPC reconnects, with ``reconnect`` backoff after failed attempts (RPCs made while
    waiting fail fast with ``UNAVAILABLE``). Outbound backpressure: ``high_water`` /
    ``low_water`` bytes held or in ``bufferedAmount``; ``max_buffer_bytes`` caps anything
    buffered. ``max_frame_size`` is the largest HTTP/2 frame the client accepts
    (SETTINGS_MAX_FRAME_SIZE, 16 KiB to 16 MiB - 1, below ``max_message_bytes``; by default
    1 MiB, or less if ``max_message_bytes`` is smaller, so servers send large messages in few
    frames). Must be created inside the
    running event loop. The first channel also swaps hyperframe's payload formatter for one
    that gives the same text in constant time (see :func:`_cheapen_frame_repr`).
    """

    def __init__(
        self,
        target: str,
        *,
        subprotocols: Sequence[str] = ("grpcbridge",),
        bearer_token: str | None = None,
        token_in: Literal["subprotocol", "query"] = "subprotocol",
        open_timeout: float | None = None,
        reconnect: ReconnectPolicy | None = None,
        high_water: int = DEFAULT_HIGH_WATER,
        low_water: int = DEFAULT_LOW_WATER,
        max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        max_frame_size: int | None = None,
        websocket_class: Any = None,
        config: Configuration | None = None,
        codec: CodecBase | None = None,
        status_details_codec: StatusDetailsCodecBase | None = None,
    ) -> None:
        asyncio.get_running_loop()  # grpclib binds the loop now: fail clearly outside one
        _cheapen_frame_repr()
        parsed = resolve_target(target, _ffi.page_location())
        policy = reconnect if reconnect is not None else ReconnectPolicy()
        if not isinstance(policy, ReconnectPolicy):
            raise ConfigError("reconnect must be a grpcbridge.ReconnectPolicy")
        timeout = policy.min_connect_timeout if open_timeout is None else open_timeout
        if timeout <= 0:
            raise ConfigError(f"open_timeout must be > 0, got {timeout}")
        max_frame_size = max_frame_size_for(max_frame_size, max_message_bytes)
        if token_in not in ("subprotocol", "query"):
            raise ConfigError(f"token_in must be 'subprotocol' or 'query', got {token_in!r}")
        _, checked = check_dial_options(
            headers={}, bearer_token=bearer_token, subprotocols=subprotocols,
            max_message_bytes=max_message_bytes, buffer_bytes=max(high_water, 4096))
        offered = list(checked)
        url = parsed.url
        if bearer_token is not None:
            if token_in == "subprotocol":
                if not offered:
                    raise ConfigError(
                        "a bearer token sent as a subprotocol needs another subprotocol the "
                        "bridge echoes (browsers fail the handshake otherwise): keep "
                        "subprotocols=('grpcbridge',) or use token_in='query'")
                if not set(bearer_token) <= _TOKEN_CHARS:
                    raise ConfigError(  # never quote the token itself
                        "bearer_token has characters a subprotocol cannot carry (allowed: "
                        "letters, digits and !#$%&'*+-.^_`|~); use token_in='query'")
                offered.append(BEARER_SUBPROTOCOL_PREFIX + bearer_token)
            else:
                separator = "&" if "?" in parsed.resource else "?"
                url += f"{separator}{BEARER_QUERY_PARAMETER}={quote(bearer_token, safe='')}"
        super().__init__(parsed.host, parsed.port, codec=codec,
                         status_details_codec=status_details_codec, config=config)
        self._authority = parsed.authority  # host[:port] as in the URL, never a path
        self._scheme = "http"  # the HTTP/2 inside the tunnel is always cleartext (h2c)
        self._target = parsed
        self._url = url  # may carry the token: never shown
        self._offered = tuple(offered)
        self._open_timeout = timeout
        self._max_frame_size = max_frame_size
        self._transport_options: dict[str, Any] = {
            "high_water": high_water, "low_water": low_water,
            "max_buffer_bytes": max_buffer_bytes, "max_message_bytes": max_message_bytes,
            "drain_timeout": drain_timeout, "websocket_class": websocket_class,
        }
        # Fail now on bad sizes, not at the first RPC.
        if not 0 <= low_water <= high_water <= max_buffer_bytes or \
                max_buffer_bytes < max_message_bytes:
            raise ConfigError("need 0 <= low_water <= high_water <= max_buffer_bytes and "
                              "max_message_bytes <= max_buffer_bytes")
        self._transport: WebSocketTransport | None = None
        self._backoff = Backoff(policy, self.target)
        self._closed = False
        #: Connections opened so far (reconnects included).
        self.connections_opened = 0

    def __repr__(self) -> str:
        return f"grpcbridge.browser.Channel({self.target!r})"

    @property
    def target(self) -> str:
        """The WebSocket URL (without a query-string token)."""
        return self._target.url

    @property
    def transport(self) -> WebSocketTransport | None:
        """The current (or last) connection's transport."""
        return self._transport

    # ------------------------------------------------------------ grpclib hooks

    @property
    def _connected(self) -> bool:
        # grpclib reuses its protocol until connection_lost. A socket that is closing (the
        # server's close frame arrived, the close event has not yet) cannot take new RPCs:
        # dial a new one instead of failing the next RPC with UNAVAILABLE.
        transport = self._transport
        return bool(super()._connected and transport is not None and transport.usable)

    def _protocol_factory(self) -> H2Protocol:
        return _BrowserH2Protocol(grpclib.client.Handler(), self._config, self._h2_config,
                                  self._max_frame_size)

    async def _create_connection(self) -> H2Protocol:
        if self._closed:
            raise TunnelClosed(f"{self!r} is closed; create a new Channel")
        loop = asyncio.get_running_loop()
        refusal = self._backoff.refusal(loop.time())
        if refusal is not None:
            raise GRPCError(Status.UNAVAILABLE, refusal)
        try:
            transport = WebSocketTransport(self._url, self._offered, name=self.target,
                                           **self._transport_options)
            self._transport = transport
            await transport.wait_open(self._open_timeout)
            if self._closed:  # closed while connecting
                transport.close()
                raise TunnelClosed(f"{self!r} was closed while connecting")
            protocol = self._protocol_factory()
            transport.attach(protocol)
        except (HandshakeError, SocketClosedError) as exc:
            self._backoff.failed(loop.time(), str(exc), random.random())
            raise GRPCError(Status.UNAVAILABLE, str(exc)) from exc
        self._backoff.succeeded()
        self.connections_opened += 1
        return protocol

    def request(self, *args: Any, **kwargs: Any) -> grpclib.client.Stream:  # type: ignore[type-arg]
        if self._closed:
            raise TunnelClosed(f"{self!r} is closed; create a new Channel")
        stream = super().request(*args, **kwargs)
        return tunnel_stream(stream, _StreamErrors(self, stream))

    def _unavailable(self, exc: BaseException,
                     transport: WebSocketTransport | None = None) -> GRPCError:
        """UNAVAILABLE for an RPC whose connection was lost, naming the close code."""
        if isinstance(exc, SocketClosedError):
            return GRPCError(Status.UNAVAILABLE, str(exc))
        detail = str(exc) or "connection lost"
        transport = transport if transport is not None else self._transport
        if (detail in _GENERIC_REASONS or detail.startswith("Received GOAWAY")) and \
                transport is not None and transport.close_code is not None:
            detail = f"{transport.describe_close()} ({detail})"
        return GRPCError(Status.UNAVAILABLE, detail)

    # ----------------------------------------------------------------- closing

    def close(self) -> None:
        """Close the WebSocket (code 1000); in-flight RPCs fail with ``UNAVAILABLE``.
        Idempotent. Later RPCs raise :class:`~grpcbridge.TunnelClosed`."""
        self._closed = True
        super().close()
        if self._transport is not None:
            self._transport.close()

    async def wait_closed(self) -> None:
        """Close, then wait until the socket is gone and its proxies are destroyed."""
        self.close()
        transport = self._transport
        if transport is not None:
            await asyncio.wait([transport.closed], timeout=CLOSE_TIMEOUT + 1)
            if not transport.closed.done():  # pragma: no cover - no close event
                transport.abort()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc_val: BaseException | None, exc_tb: TracebackType | None) -> None:
        await self.wait_closed()
