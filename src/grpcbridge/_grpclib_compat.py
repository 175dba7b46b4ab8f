"""Every use grpcbridge makes of grpclib's and h2's private internals, in one place.

grpcbridge runs grpclib's HTTP/2 protocol on connections grpclib never made (a WebSocket
tunnel, the browser's ``WebSocket``, an in-process pipe). Doing so needs a few things
grpclib does not offer publicly; they are all here, so a new grpclib or h2 release is
checked against one module (and ``tests/test_channel_core.py``), not the whole code base:

* :class:`GrpclibChannel` - grpclib's ``Channel`` with its private connection hooks
  (``_create_connection``, ``_connected``, ``_authority``, ``_scheme``) routed to
  public-named methods the grpcbridge channels implement;
* :func:`advertise_max_frame_size` and :class:`FrameSizeProtocol` - h2's connection behind
  grpclib's (``Connection._connection``) and its inbound frame limit; the protocol also
  keeps graceful GOAWAYs from h2, which would fail the streams still open (see
  :class:`~grpcbridge.core.age.GoawayFilter`), ends the streams a GOAWAY says the server
  never processed (``processor.streams``, ``Stream.__terminated__``), and
  :func:`streams_released` waits for a retiring connection's streams
  (``Connection.stream_close_waiter``, ``Connection.write_ready``);
* :func:`retype_stream`, :func:`stream_connection`, :func:`release_finished_streams`,
  :func:`open_streams` - giving the streams ``Channel.request`` makes grpcbridge's class,
  which connection a client stream runs on, and ending some streams of a connection but not
  others (``Stream._stream``, ``processor.streams``, ``buffer._eof``, ``__terminated__``);
* :func:`server_protocol`, :func:`server_handlers` - serving a grpclib ``Server`` over
  connections it did not accept (``Server._protocol_factory``, ``Server._handlers``);
* :func:`peer_extra_info` - what the bridge put in an in-process connection's transport,
  from a server event's ``Peer`` (``Peer._transport``);
* :func:`cheapen_frame_repr` - hyperframe's payload formatter (``frame._raw_data_repr``).

Supported: grpclib 0.4.x and h2 4.x (:data:`SUPPORTED`). :func:`require_supported` (called
when a channel or an in-process grpclib server is created) fails with a clear message on
other versions instead of an ``AttributeError`` deep inside an RPC.

This module imports only grpclib, h2, hyperframe (pure Python) and ``grpcbridge.core``: the
browser channel (Pyodide) uses it too.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import re
from collections.abc import Callable, Container
from typing import Any, TypeVar

import grpclib
import grpclib.client
import h2
from grpclib.config import Configuration
from grpclib.encoding.base import CodecBase, StatusDetailsCodecBase
from grpclib.protocol import AbstractHandler, H2Protocol
from h2.config import H2Configuration
from h2.settings import SettingCodes

from .core.age import H2_MIN_FRAME_SIZE, LAST_STREAM_ID, GoawayFilter
from .core.errors import GrpcBridgeError

#: Versions whose internals this module was written and tested against:
#: package -> (lowest supported, first unsupported), compared on (major, minor).
SUPPORTED: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "grpclib": ((0, 4), (0, 5)),
    "h2": ((4, 0), (5, 0)),
}
#: Why a stream a GOAWAY's last-stream-id left out ends: the server never processed it.
UNPROCESSED_REASON = "not processed by the server (GOAWAY), safe to retry"
#: What to tell pip, per package.
_REQUIREMENT = {"grpclib": "grpclib>=0.4,<0.5", "h2": "h2>=4,<5"}


class UnsupportedDependencyError(GrpcBridgeError, RuntimeError):
    """An installed grpclib or h2 is a version whose internals grpcbridge does not know."""


def unsupported_versions() -> list[str]:
    """One line per installed package outside :data:`SUPPORTED` (empty: all supported)."""
    problems = []
    for package, (lowest, beyond) in SUPPORTED.items():
        version = str(getattr({"grpclib": grpclib, "h2": h2}[package], "__version__", "unknown"))
        match = re.match(r"(\d+)\.(\d+)", version)
        if match is None or not lowest <= (int(match[1]), int(match[2])) < beyond:
            problems.append(
                f"{package} {version} is installed, but grpcbridge supports {package} "
                f"{lowest[0]}.{lowest[1]} up to (not including) {beyond[0]}.{beyond[1]} "
                f"(install '{_REQUIREMENT[package]}')")
    return problems


@functools.cache  # a failure raises, which is not cached: only a success is kept
def require_supported() -> None:
    """Raise :class:`UnsupportedDependencyError` unless grpclib and h2 are supported versions
    (checked once per process)."""
    problems = unsupported_versions()
    if problems:
        raise UnsupportedDependencyError(
            "; ".join(problems) + ". grpcbridge runs grpclib's HTTP/2 protocol over "
            "WebSockets using grpclib/h2 internals (grpcbridge._grpclib_compat) that other "
            "versions may not have")


# ----------------------------------------------------------------- HTTP/2 frame size


def advertise_max_frame_size(protocol: Any, size: int) -> None:
    """Tell the peer of grpclib ``protocol`` (an ``H2Protocol`` whose ``connection_made`` ran)
    that frames of up to ``size`` bytes are welcome, and accept them from now on.

    h2 raises its inbound limit only when the peer's ACK is processed, and checks frames
    against the limit it had when ``receive_data()`` began: an ACK and a first large frame
    arriving in one message (a relay reading both at once) would fail the connection.
    Accepting larger frames early is always allowed."""
    if size == H2_MIN_FRAME_SIZE:  # HTTP/2's initial value: nothing to say
        return
    connection = protocol.connection
    h2_connection = connection._connection
    h2_connection.update_settings({SettingCodes.MAX_FRAME_SIZE: size})
    h2_connection.max_inbound_frame_size = size
    connection.flush()


class FrameSizeProtocol(H2Protocol):
    """grpclib's client ``H2Protocol`` advertising a larger SETTINGS_MAX_FRAME_SIZE as soon
    as it is connected (its SETTINGS follow grpclib's preface, before any request).

    A graceful GOAWAY from the server (a bridge retiring the tunnel, a backend's own
    max-connection-age) is kept from h2 - h2 4.x would end the connection and grpclib fail
    every stream on it - and reported to ``on_goaway`` (once): the channel then opens a new
    connection for new RPCs and closes this one when its streams are done
    (:attr:`goaway_received` tells one that arrived before the channel was listening).
    Streams with an id above the lowest last-stream-id received were never processed by
    the server: they end at once with :data:`UNPROCESSED_REASON` (an ``UNAVAILABLE``
    the application may retry), also those that start on the connection afterwards."""

    def __init__(self, handler: AbstractHandler, config: Any, h2_config: H2Configuration,
                 max_frame_size: int,
                 on_goaway: Callable[[FrameSizeProtocol], None] | None = None) -> None:
        super().__init__(handler, config, h2_config)
        self._max_frame_size = max_frame_size
        self._on_goaway = on_goaway
        self._goaways = GoawayFilter(self._goaway, max_frame_size)
        self.goaway_received = False
        #: The lowest last-stream-id of the GOAWAYs received (streams above it are ended).
        self.goaway_last_stream_id = LAST_STREAM_ID
        self._ended_unprocessed: set[int] = set()
        #: Which of its channel's connections this is (1, 2, ...; set by the channel).
        self.tunnel_number = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        advertise_max_frame_size(self, self._max_frame_size)
        register = self.processor.register

        def register_checked(stream: Any) -> Callable[[], None]:
            release = register(stream)
            if stream.id > self.goaway_last_stream_id:  # opened after the server's GOAWAY
                asyncio.get_running_loop().call_soon(self.end_unprocessed_streams)
            return release

        self.processor.register = register_checked  # type: ignore[method-assign]

    def data_received(self, data: bytes) -> None:
        data = self._goaways.feed(data)
        if data:
            super().data_received(data)

    def _goaway(self, last_stream_id: int) -> None:
        self.goaway_last_stream_id = min(self.goaway_last_stream_id, last_stream_id)
        self.end_unprocessed_streams()
        if self.goaway_received:
            return
        self.goaway_received = True
        if self._on_goaway is not None:
            self._on_goaway(self)

    def end_unprocessed_streams(self) -> None:
        """End the streams above :attr:`goaway_last_stream_id` (once each)."""
        last = self.goaway_last_stream_id
        if last == LAST_STREAM_ID:
            return
        ended = self._ended_unprocessed
        for stream_id, stream in list(self.processor.streams.items()):
            if stream_id > last and stream_id not in ended:
                ended.add(stream_id)
                stream.__terminated__(UNPROCESSED_REASON)


# ----------------------------------------------------------------------- channels


class GrpclibChannel(grpclib.client.Channel):
    """grpclib's client ``Channel`` whose connections are made by a subclass.

    grpclib dials TCP itself; its hooks for that are private. They are overridden here and
    routed to :meth:`open_protocol` (make a connected protocol) and
    :meth:`connection_usable` (may the current connection take new RPCs?). The HTTP/2
    ``:authority`` is ``authority`` and ``:scheme`` is ``http`` (the HTTP/2 inside a tunnel
    is cleartext whatever the WebSocket's scheme)."""

    def __init__(self, *, host: str, port: int, authority: str, max_frame_size: int,
                 codec: CodecBase | None, status_details_codec: StatusDetailsCodecBase | None,
                 config: Configuration | None) -> None:
        require_supported()
        super().__init__(host, port, codec=codec, status_details_codec=status_details_codec,
                         config=config)
        self._authority = authority  # host[:port] as in the URL, never a path
        self._scheme = "http"
        self._bridge_max_frame_size = max_frame_size

    def new_protocol(self) -> FrameSizeProtocol:
        """A client protocol for a new connection, asking for frames up to
        ``max_frame_size`` once connected."""
        return FrameSizeProtocol(grpclib.client.Handler(), self._config, self._h2_config,
                                 self._bridge_max_frame_size, self.connection_retiring)

    def connection_retiring(self, protocol: FrameSizeProtocol) -> None:
        """The server sent ``protocol``'s connection a graceful GOAWAY: it takes no new
        RPCs (overridden by the grpcbridge channels)."""

    async def open_protocol(self) -> H2Protocol:
        """Open a connection and return the protocol connected to it (grpclib calls this
        when an RPC needs a connection and :meth:`connection_usable` said no)."""
        raise NotImplementedError

    def connection_usable(self) -> bool:
        """Whether the current connection (grpclib has one) may take new RPCs."""
        return True

    # grpclib's private hooks.

    async def _create_connection(self) -> H2Protocol:
        return await self.open_protocol()

    @property
    def _connected(self) -> bool:
        return bool(super()._connected and self.connection_usable())


StreamT = TypeVar("StreamT", bound=grpclib.client.Stream)  # type: ignore[type-arg]


def retype_stream(stream: grpclib.client.Stream,  # type: ignore[type-arg]
                  cls: type[StreamT]) -> StreamT:
    """Make the stream grpclib's ``Channel.request`` created an instance of ``cls``, a
    subclass overriding public methods only (grpclib offers no hook to choose the class)."""
    stream.__class__ = cls
    assert isinstance(stream, cls)
    return stream


def protocol_connection(protocol: H2Protocol) -> object:
    """The object identifying ``protocol``'s connection (after ``connection_made``); the
    same object :func:`stream_connection` returns for streams on it."""
    return protocol.connection


def stream_connection(stream: grpclib.client.Stream) -> object | None:  # type: ignore[type-arg]
    """The connection (as :func:`protocol_connection` names it) a client stream was sent
    on, or ``None`` before its request was sent."""
    h2_stream = getattr(stream, "_stream", None)
    return getattr(h2_stream, "connection", None)


def release_finished_streams(protocol: Any, reason: str) -> list[int]:
    """The peer closed ``protocol``'s connection. Stop new RPCs on it, end the streams whose
    response had not fully arrived with ``reason``, and return the ids of those whose
    response did (END_STREAM arrived): they may still be reading it."""
    finishing: list[int] = []
    protocol.handler.close()  # grpclib: the next RPC dials a new connection
    for stream_id, stream in list(protocol.processor.streams.items()):
        buffer = getattr(stream, "buffer", None)
        if buffer is not None and getattr(buffer, "_eof", False):
            finishing.append(stream_id)
        else:
            stream.__terminated__(reason)
    return finishing


async def streams_released(protocol: Any) -> None:
    """Return once client ``protocol`` has no stream left (grpclib sets its connection's
    ``stream_close_waiter`` whenever one is released).

    A stream that already chose this connection but waits for its transport to take writes
    (``write_ready``, cleared by ``pause_writing``) is not registered yet: while writing is
    paused, wait for it to resume and let such streams register before concluding."""
    streams = protocol.processor.streams
    connection = protocol.connection
    waiter = connection.stream_close_waiter
    while True:
        if streams:
            waiter.clear()
            await waiter.wait()
        elif not connection.write_ready.is_set():
            await connection.write_ready.wait()
            await asyncio.sleep(0)  # the streams woken first register now
        else:
            return


def open_streams(protocol: Any) -> Container[int]:
    """The ids of ``protocol``'s streams that have not been released yet (a live view)."""
    streams: Container[int] = protocol.processor.streams
    return streams


# ------------------------------------------------------------------------ servers


def server_protocol(server: Any) -> H2Protocol:
    """A new server-side protocol of grpclib ``server`` (as if it had accepted a socket)."""
    require_supported()
    protocol: H2Protocol = server._protocol_factory()
    return protocol


def server_handlers(server: Any) -> list[Any]:
    """The connection handlers of grpclib ``server`` (one per connection it served)."""
    return list(server._handlers)


def peer_extra_info(peer: Any, name: str) -> object:
    """``get_extra_info(name)`` of the transport behind grpclib ``peer`` (a ``Peer``, as
    server events carry it); grpclib shows only its ``peername`` and certificate."""
    transport = getattr(peer, "_transport", None)
    return None if transport is None else transport.get_extra_info(name)


# --------------------------------------------------------------------- hyperframe


def hex_head(data: bytes | None) -> str:
    """hyperframe's ``_raw_data_repr``, hexlifying only the 10 bytes it shows."""
    if not data:
        return "None"
    text = binascii.hexlify(data[:10]).decode("ascii")
    return f"<hex:{text}{'...' if len(data) > 10 else ''}>"


def cheapen_frame_repr() -> None:
    """h2 4.x formats every frame it receives for a trace log that is normally discarded
    (``logger.trace("Received frame: %s", repr(frame))``), and hyperframe's repr hexlifies a
    frame's whole payload to show its first 10 bytes: in Pyodide that is 10-15 % of a bulk
    download. Swap in :func:`hex_head`: the same text, without the per-byte cost. Only done
    if hyperframe's helper gives the same results (another hyperframe is left alone)."""
    try:
        from hyperframe import frame
    except ImportError:  # pragma: no cover - h2 always brings hyperframe
        return
    current = getattr(frame, "_raw_data_repr", None)
    if current is None or current is hex_head:
        return
    try:
        if any(current(sample) != hex_head(sample) for sample in
               (b"", b"\x00", bytes(range(10)), bytes(range(11)), bytes(range(200)))):
            return
    except Exception:  # pragma: no cover - a different helper
        return
    frame._raw_data_repr = hex_head
