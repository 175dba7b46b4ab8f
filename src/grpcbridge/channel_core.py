"""The one core of grpcbridge's grpclib channels: :class:`grpcbridge.Channel` (CPython, over a
WebSocket tunnel) and :class:`grpcbridge.browser.Channel` (Pyodide, over the browser's
``WebSocket``). Both are thin subclasses of :class:`CoreChannel`; what they share is
decided here, once:

* **Options**: the names, defaults and checks every channel shares (:func:`check_options`):
  ``handshake_timeout`` (seconds to open a connection, WebSocket handshake included;
  default: the ``reconnect`` policy's ``min_connect_timeout``, 20 s), ``reconnect``,
  ``max_message_bytes``, ``max_frame_size``, ``bearer_token``, ``subprotocols``, and
  grpclib's ``config``/``codec``/``status_details_codec``. Old names fail with a
  ``TypeError`` naming the new one (:data:`RENAMED_OPTIONS`: ``open_timeout`` is
  ``handshake_timeout``).
* **Dialing**: lazily, on the next RPC that needs a connection. After a failed attempt the
  next waits for the :class:`~grpcbridge.ReconnectPolicy` backoff; RPCs made meanwhile fail
  fast with ``UNAVAILABLE`` naming the last error and the time left
  (:class:`~grpcbridge.core.reconnect.Backoff`). A connection that is closing (the peer's
  close frame arrived) takes no new RPCs: the next one dials. So does one the server sent
  a graceful GOAWAY (a bridge's ``max_tunnel_age``): its RPCs in flight finish on it, and
  it is closed (1000) once the last one is done; those the GOAWAY's last-stream-id says the
  server never processed fail at once with ``UNAVAILABLE`` ("not processed by the server
  (GOAWAY), safe to retry"). A retiring connection is logged once, at debug level.
* **Errors**: an RPC whose connection could not be opened or was lost fails with
  :data:`LOST_STATUS` (``UNAVAILABLE``: retrying may help), its message naming the close
  code and reason of the connection that RPC ran on. RPCs in flight when the application
  closes the channel - waiting for a connection, for a reply, or in the middle of a stream -
  fail with :data:`CLOSED_STATUS` (``CANCELLED``: gRPC's status for a call cancelled on the
  client side, which grpcio also gives when its channel is closed; ``UNAVAILABLE`` would
  invite a retry on a channel that is gone). RPCs started after ``close()`` raise
  :class:`~grpcbridge.TunnelClosed`.
* **Closing**: ``close()`` closes the connection (code 1000) and is idempotent;
  ``await wait_closed()`` (or leaving ``async with``) closes, then waits until the
  connection is gone (dropping it if the peer does not answer in time); both are safe from
  several tasks.

What differs is how a connection is made: the **runtime hook**. Each channel implements
:meth:`CoreChannel._new_connection`, returning a :class:`Connection` (a tunnel through
picows in CPython, a :class:`~grpcbridge.browser.WebSocketTransport` in the browser).

This module imports only grpclib (its internals through :mod:`grpcbridge._grpclib_compat`),
``grpcbridge.core`` and ``grpcbridge.framesize``: the browser (Pyodide) imports it too.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar
from weakref import WeakKeyDictionary

import grpclib.client
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.encoding.base import CodecBase, StatusDetailsCodecBase
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.protocol import H2Protocol

from ._grpclib_compat import (
    FrameSizeProtocol,
    GrpclibChannel,
    protocol_connection,
    retype_stream,
    stream_connection,
    streams_released,
)
from .core.config import ReconnectPolicy, check_dial_options, check_positive
from .core.errors import ConfigError, HandshakeError, TunnelClosed
from .core.reconnect import Backoff
from .core.target import Target
from .framesize import max_frame_size_for

log = logging.getLogger(__name__)

#: Status of RPCs in flight when the application closes the channel (see above).
CLOSED_STATUS = Status.CANCELLED
#: Status of RPCs whose connection could not be opened, or was lost.
LOST_STATUS = Status.UNAVAILABLE
#: Old option names -> their name now. Passing an old name raises ``TypeError`` saying so.
RENAMED_OPTIONS = {"open_timeout": "handshake_timeout"}
#: grpclib's own reasons for ending streams, which say nothing about the WebSocket.
GENERIC_REASONS = frozenset({"Connection lost", "Connection closed", ""})


# ------------------------------------------------------------------------- options


@dataclass(frozen=True, kw_only=True)
class ChannelOptions:
    """The checked options the core and the runtime hooks read (:func:`check_options` also
    checks ``max_message_bytes`` and ``bearer_token``, which each channel passes on itself)."""

    #: Seconds an attempt gets to connect and complete the WebSocket handshake.
    handshake_timeout: float
    reconnect: ReconnectPolicy
    #: SETTINGS_MAX_FRAME_SIZE the channel advertises (fitted to ``max_message_bytes``).
    max_frame_size: int
    subprotocols: tuple[str, ...]
    #: Extra upgrade request headers (CPython only: browsers cannot set any).
    headers: dict[str, str] = field(repr=False)


def check_options(
    owner: str,
    renamed: Iterable[str],
    *,
    handshake_timeout: float | None,
    reconnect: ReconnectPolicy | None,
    max_message_bytes: int,
    max_frame_size: int | None,
    bearer_token: str | None,
    subprotocols: Sequence[str],
    headers: Mapping[str, str] | None = None,
    buffer_bytes: int,
) -> ChannelOptions:
    """Check the shared options of channel ``owner``; :class:`~grpcbridge.ConfigError` names
    the bad one. ``renamed`` are the keyword arguments ``owner`` does not take (channels
    collect them in ``**renamed``): ``TypeError``, pointing renamed ones to their new name."""
    for name in renamed:
        new = RENAMED_OPTIONS.get(name)
        if new is not None:
            raise TypeError(f"{owner}() has no option {name!r} any more: it is called "
                            f"{new!r} now (one name for both grpcbridge channels)")
        raise TypeError(f"{owner}() got an unexpected keyword argument {name!r}")
    policy = reconnect if reconnect is not None else ReconnectPolicy()
    if not isinstance(policy, ReconnectPolicy):
        raise ConfigError("reconnect must be a grpcbridge.ReconnectPolicy")
    timeout = policy.min_connect_timeout if handshake_timeout is None else handshake_timeout
    check_positive("handshake_timeout", timeout)
    frame_size = max_frame_size_for(max_frame_size, max_message_bytes)
    checked_headers, checked_subprotocols = check_dial_options(
        headers=headers or {}, bearer_token=bearer_token, subprotocols=subprotocols,
        max_message_bytes=max_message_bytes, buffer_bytes=buffer_bytes)
    return ChannelOptions(
        handshake_timeout=timeout, reconnect=policy, max_frame_size=frame_size,
        subprotocols=checked_subprotocols, headers=checked_headers)


# --------------------------------------------------------------------- the runtime hook


class Connection(Protocol):
    """One connection of a channel, as the runtime hook makes it: created not yet open,
    then :meth:`wait_open`, then :meth:`attach` grpclib's protocol to it."""

    #: Resolved once the connection is gone (its resources released).
    closed: asyncio.Future[None]
    #: Seconds :meth:`close` may take before ``wait_closed`` drops the connection.
    close_timeout: float

    async def wait_open(self, within: float) -> None:
        """Open within ``within`` seconds, or raise :class:`HandshakeError` (the connection
        is then torn down)."""

    def attach(self, protocol: asyncio.Protocol) -> None:
        """Connect ``protocol`` (``connection_made``, then any bytes that arrived before).
        May raise :class:`HandshakeError` or :class:`TunnelClosed` if the connection is
        already closing."""

    @property
    def usable(self) -> bool:
        """Open, and not closing on either side: new RPCs may use it."""

    def loss_description(self) -> str | None:
        """One line naming the close code and reason, once closing began (from either side:
        :attr:`closed` resolves soon), else ``None``."""

    def close(self) -> None:
        """Close with code 1000 (idempotent). A connection still opening may go on opening:
        the channel closes it as soon as it is open."""

    def abort(self) -> None:
        """Drop the connection without waiting for the peer."""


ConnectionT = TypeVar("ConnectionT", bound=Connection)


def lost_detail(detail: str, description: str | None) -> str:
    """The message of an RPC whose connection was lost: grpclib's ``detail``, with grpclib's
    generic wording replaced by the connection's ``description`` (close code and reason)."""
    if description is None:
        return detail or "connection lost"
    if detail in GENERIC_REASONS:
        return description
    if detail.startswith("Received GOAWAY"):
        return f"{description} ({detail})"
    return detail  # already specific (e.g. a send refused with the close code)


T = TypeVar("T")


def _reported(method: Callable[..., Coroutine[Any, Any, T]]
              ) -> Callable[..., Coroutine[Any, Any, T]]:
    """``method`` of grpclib's stream, raising the channel's ``GRPCError`` instead of
    ``StreamTerminatedError``."""

    @functools.wraps(method)
    async def reporting(self: _TunnelStream, *args: Any, **kwargs: Any) -> T:
        try:
            return await method(self, *args, **kwargs)
        except StreamTerminatedError as exc:
            raise self._bridge_call_error(exc) from exc

    return reporting


class _TunnelStream(grpclib.client.Stream):  # type: ignore[type-arg]
    """A grpclib client stream that reports a lost connection as a ``GRPCError`` (grpclib
    itself raises ``StreamTerminatedError``, which gRPC code does not expect)."""

    #: Set by :meth:`CoreChannel.request`: the ``GRPCError`` to raise for the
    #: ``StreamTerminatedError`` grpclib ended the stream with (connection lost or channel
    #: closed; :meth:`CoreChannel._call_error` decides which status).
    _bridge_call_error: Callable[[BaseException], GRPCError]

    send_request = _reported(grpclib.client.Stream.send_request)
    send_message = _reported(grpclib.client.Stream.send_message)
    end = _reported(grpclib.client.Stream.end)
    recv_initial_metadata = _reported(grpclib.client.Stream.recv_initial_metadata)
    recv_message = _reported(grpclib.client.Stream.recv_message)
    recv_trailing_metadata = _reported(grpclib.client.Stream.recv_trailing_metadata)

    @_reported
    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc_val: BaseException | None, exc_tb: TracebackType | None) -> None:
        await super().__aexit__(exc_type, exc_val, exc_tb)
        if isinstance(exc_val, StreamTerminatedError):
            raise self._bridge_call_error(exc_val) from exc_val


class CoreChannel(GrpclibChannel, Generic[ConnectionT]):
    """A grpclib channel whose connections come from :meth:`_new_connection` (see the
    module docstring for what every grpcbridge channel shares). Must be created inside a
    running event loop."""

    #: Shown by ``repr``: the public name of the channel class.
    _public_name = "grpcbridge channel"

    def __init__(self, target: Target, options: ChannelOptions, *,
                 codec: CodecBase | None, status_details_codec: StatusDetailsCodecBase | None,
                 config: Configuration | None) -> None:
        asyncio.get_running_loop()  # grpclib binds the loop now: fail clearly outside one
        super().__init__(host=target.host, port=target.port, authority=target.authority,
                         max_frame_size=options.max_frame_size, codec=codec,
                         status_details_codec=status_details_codec, config=config)
        self._options = options
        #: The WebSocket URL (never with a token).
        self.target = target.url
        self._backoff = Backoff(options.reconnect, target.url)
        self._bridge_closed = False
        #: The current (or last) connection, possibly still opening.
        self._current: ConnectionT | None = None
        #: grpclib's connection -> ours, to name the connection a failed RPC ran on.
        self._by_protocol: WeakKeyDictionary[object, ConnectionT] = WeakKeyDictionary()
        #: Connections opened so far (reconnects included).
        self.connections_opened = 0
        #: Connections the server sent a GOAWAY, until their last stream is done.
        self._retiring: dict[ConnectionT, asyncio.Task[None]] = {}

    def _new_connection(self) -> ConnectionT:
        """Start a new connection to :attr:`target` (not yet open). May raise
        :class:`HandshakeError` at once (the runtime refuses the URL)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{self._public_name}({self.target!r})"

    # ---------------------------------------------------------------- connecting

    def connection_usable(self) -> bool:
        connection = self._current
        return (connection is not None and connection.usable
                and connection not in self._retiring)

    def connection_retiring(self, protocol: FrameSizeProtocol) -> None:
        if self._bridge_closed:
            return  # close() closes every connection; nobody would await a _retire task
        connection = self._by_protocol.get(protocol_connection(protocol))
        if connection is None or connection in self._retiring:
            return  # not registered yet: open_protocol calls again
        log.debug("%r: the server retires tunnel #%d (GOAWAY, last_stream_id %d); new RPCs "
                  "open a new tunnel", self, protocol.tunnel_number,
                  protocol.goaway_last_stream_id)
        self._retiring[connection] = asyncio.get_running_loop().create_task(
            self._retire(protocol, connection))

    async def _retire(self, protocol: FrameSizeProtocol, connection: ConnectionT) -> None:
        released = asyncio.ensure_future(streams_released(protocol))
        try:
            await asyncio.wait([released, connection.closed],
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            released.cancel()
            self._retiring.pop(connection, None)
            connection.close()

    async def open_protocol(self) -> H2Protocol:
        if self._bridge_closed:
            raise TunnelClosed(f"{self!r} is closed; create a new Channel")
        loop = asyncio.get_running_loop()
        refusal = self._backoff.refusal(loop.time())
        if refusal is not None:
            raise GRPCError(LOST_STATUS, refusal)
        try:
            connection = self._new_connection()
            self._current = connection
            await connection.wait_open(self._options.handshake_timeout)
            if self._bridge_closed:
                connection.close()
                raise GRPCError(CLOSED_STATUS, f"{self!r} was closed while connecting")
            protocol = self.new_protocol()
            connection.attach(protocol)
        except (HandshakeError, TunnelClosed) as exc:
            if self._bridge_closed:
                raise GRPCError(CLOSED_STATUS,
                                f"{self!r} was closed while connecting") from exc
            self._backoff.failed(loop.time(), str(exc), random.random())
            raise GRPCError(LOST_STATUS, str(exc)) from exc
        self._backoff.succeeded()
        self.connections_opened += 1
        self._by_protocol[protocol_connection(protocol)] = connection
        protocol.tunnel_number = self.connections_opened
        if protocol.goaway_received:
            self.connection_retiring(protocol)  # the GOAWAY came with the first bytes
        return protocol

    def request(self, *args: Any, **kwargs: Any) -> grpclib.client.Stream:  # type: ignore[type-arg]
        if self._bridge_closed:
            raise TunnelClosed(f"{self!r} is closed; create a new Channel")
        stream = retype_stream(super().request(*args, **kwargs), _TunnelStream)
        stream._bridge_call_error = functools.partial(self._call_error, stream=stream)
        return stream

    def _call_error(self, exc: BaseException,
                    stream: grpclib.client.Stream) -> GRPCError:  # type: ignore[type-arg]
        """The gRPC error of an RPC whose stream grpclib ended with ``exc``."""
        if self._bridge_closed:
            return GRPCError(CLOSED_STATUS, f"{self!r} was closed")
        key = stream_connection(stream)
        connection = self._by_protocol.get(key) if key is not None else None
        if connection is None:  # the request was not sent yet: the current connection
            connection = self._current
        description = connection.loss_description() if connection is not None else None
        return GRPCError(LOST_STATUS, lost_detail(str(exc), description))

    # ------------------------------------------------------------------- closing

    def close(self) -> None:
        """Close the connection (code 1000): RPCs in flight fail with ``CANCELLED``.
        Idempotent. Later RPCs raise :class:`~grpcbridge.TunnelClosed`."""
        self._bridge_closed = True
        super().close()
        if self._current is not None:
            self._current.close()
        for connection in self._retiring:
            connection.close()

    async def wait_closed(self) -> None:
        """Close, then wait until the connections (retiring ones too) are gone."""
        retiring = dict(self._retiring)
        self.close()
        for connection in (self._current, *retiring):
            if connection is not None and connection.loss_description() is not None:
                await asyncio.wait([connection.closed], timeout=connection.close_timeout + 1)
                if not connection.closed.done():
                    connection.abort()
        await asyncio.gather(*retiring.values(), return_exceptions=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc_val: BaseException | None, exc_tb: TracebackType | None) -> None:
        await self.wait_closed()
