"""A grpclib Channel whose connection is the browser's WebSocket (Pyodide)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Literal, Never
from urllib.parse import quote

from grpclib.config import Configuration
from grpclib.encoding.base import CodecBase, StatusDetailsCodecBase

from .._grpclib_compat import cheapen_frame_repr
from ..channel_core import CoreChannel, check_options
from ..core.admission import BEARER_QUERY_PARAMETER, BEARER_SUBPROTOCOL_PREFIX
from ..core.config import ReconnectPolicy
from ..core.errors import ConfigError, TargetError
from ..core.stream import DEFAULT_MAX_MESSAGE_BYTES
from ..core.target import Target, browser_target, parse_target
from ..core.wire import TOKEN_CHARS
from . import _ffi
from .transport import (
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_HIGH_WATER,
    DEFAULT_LOW_WATER,
    DEFAULT_MAX_BUFFER_BYTES,
    WebSocketTransport,
    check_buffer_sizes,
)


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


class Channel(CoreChannel[WebSocketTransport]):
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
    offered. ``handshake_timeout``: seconds for the socket to open (default:
    ``reconnect.min_connect_timeout``, 20 s).

    Shared with :class:`grpcbridge.Channel` (:mod:`grpcbridge.channel_core`): a dropped
    socket fails waiting RPCs with ``UNAVAILABLE`` (close code, reason and
    ``navigator.onLine`` in the message); RPCs whose responses had fully arrived complete.
    The next RPC reconnects, with ``reconnect`` backoff after failed attempts (RPCs made
    while waiting fail fast with ``UNAVAILABLE``). ``close()`` fails RPCs in flight with
    ``CANCELLED``; later RPCs raise :class:`~grpcbridge.TunnelClosed`.

    Outbound backpressure: ``high_water`` / ``low_water`` bytes held or in
    ``bufferedAmount``; ``max_buffer_bytes`` caps anything buffered. ``max_frame_size`` is
    the largest HTTP/2 frame the client accepts (SETTINGS_MAX_FRAME_SIZE, 16 KiB to 16 MiB -
    1, below ``max_message_bytes``; by default 1 MiB, or less if ``max_message_bytes`` is
    smaller, so servers send large messages in few frames). Must be created inside the
    running event loop. The first channel also swaps hyperframe's payload formatter for one
    that gives the same text in constant time (see
    :func:`grpcbridge._grpclib_compat.cheapen_frame_repr`).
    """

    _public_name = "grpcbridge.browser.Channel"

    def __init__(
        self,
        target: str,
        *,
        subprotocols: Sequence[str] = ("grpcbridge",),
        bearer_token: str | None = None,
        token_in: Literal["subprotocol", "query"] = "subprotocol",
        handshake_timeout: float | None = None,
        reconnect: ReconnectPolicy | None = None,
        high_water: int = DEFAULT_HIGH_WATER,
        low_water: int = DEFAULT_LOW_WATER,
        max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        max_frame_size: int | None = None,
        config: Configuration | None = None,
        codec: CodecBase | None = None,
        status_details_codec: StatusDetailsCodecBase | None = None,
        **renamed: Never,
    ) -> None:
        options = check_options(
            "grpcbridge.browser.Channel", renamed, handshake_timeout=handshake_timeout,
            reconnect=reconnect, max_message_bytes=max_message_bytes,
            max_frame_size=max_frame_size, bearer_token=bearer_token,
            subprotocols=subprotocols, buffer_bytes=max(high_water, 4096))
        if token_in not in ("subprotocol", "query"):
            raise ConfigError(f"token_in must be 'subprotocol' or 'query', got {token_in!r}")
        # Fail now on bad sizes, not at the first RPC.
        check_buffer_sizes(high_water, low_water, max_buffer_bytes, max_message_bytes)
        cheapen_frame_repr()
        parsed = resolve_target(target, _ffi.page_location())
        offered = list(options.subprotocols)
        url = parsed.url
        if bearer_token is not None:
            if token_in == "subprotocol":
                if not offered:
                    raise ConfigError(
                        "a bearer token sent as a subprotocol needs another subprotocol the "
                        "bridge echoes (browsers fail the handshake otherwise): keep "
                        "subprotocols=('grpcbridge',) or use token_in='query'")
                if not set(bearer_token) <= TOKEN_CHARS:
                    raise ConfigError(  # never quote the token itself
                        "bearer_token has characters a subprotocol cannot carry (allowed: "
                        "letters, digits and !#$%&'*+-.^_`|~); use token_in='query'")
                offered.append(BEARER_SUBPROTOCOL_PREFIX + bearer_token)
            else:
                separator = "&" if "?" in parsed.resource else "?"
                url += f"{separator}{BEARER_QUERY_PARAMETER}={quote(bearer_token, safe='')}"
        super().__init__(parsed, options, codec=codec,
                         status_details_codec=status_details_codec, config=config)
        # ``url`` may carry the token: never shown (the transport's messages show the target).
        self._connect = partial(
            WebSocketTransport, url, tuple(offered), name=self.target, high_water=high_water,
            low_water=low_water, max_buffer_bytes=max_buffer_bytes,
            max_message_bytes=max_message_bytes, drain_timeout=drain_timeout)

    @property
    def transport(self) -> WebSocketTransport | None:
        """The current (or last) connection's transport."""
        return self._current

    def _new_connection(self) -> WebSocketTransport:
        return self._connect()
