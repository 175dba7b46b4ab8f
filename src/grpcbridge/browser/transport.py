"""The browser's ``WebSocket`` as an asyncio transport for a grpclib ``H2Protocol`` (Pyodide).

One WebSocket carries one HTTP/2 connection in binary messages whose boundaries mean nothing
(see ``wire-protocol``). What this transport guarantees, where the Go project's WASM client
fell short:

* **Nothing is dropped.** Every message's bytes go straight to the protocol's
  ``data_received`` inside the ``message`` event handler (no queue, no task). Bytes that arrive
  before a protocol is attached are kept in order and delivered first. Anything buffered is
  bounded by a hard cap (``max_buffer_bytes``, far above HTTP/2 flow-control windows) that
  fails the connection closed with a clear error instead of losing data.
* **Data that arrived before a close is used.** When the peer closes, RPCs whose responses
  arrived in full keep running until they have read them (``drain_timeout``); the others end
  at once. grpclib then gets ``connection_lost``.
* **Writes are coalesced.** grpclib writes every HTTP/2 frame separately (HEADERS, each
  16 KiB DATA frame, WINDOW_UPDATE...). The first write of a JavaScript task is sent at once
  (latency); the writes that follow in the same task are held and sent as one binary message
  by a microtask the first one queued (right after the task, before any other event), at once
  when ``COALESCE_LIMIT`` bytes are held, and always before a close frame this side sends
  (the rules of ``grpcbridge.pipe``, one limit for both in ``grpcbridge.core.wire``; the
  pipe's flush is a loop callback: one costs ~0.15 ms in Pyodide under Chromium, a microtask
  ~0.01 ms).
* **Outbound backpressure.** Above ``high_water`` bytes held or in ``bufferedAmount`` the
  protocol's ``pause_writing()`` is called; ``resume_writing()`` follows once the amount is at
  or below ``low_water``, checked at every inbound message (HTTP/2 acknowledgements arrive
  while data drains) and on a timer. A write after the socket began closing raises
  :class:`SocketClosedError` (never a silent loss).
* **Handlers first.** ``onopen``, ``onmessage``, ``onclose`` and ``onerror`` are installed
  right after the socket is constructed, before it can open. Their Pyodide proxies live as
  long as the socket and are destroyed when it is gone.
* **Idempotent close** from ``onclose``, ``onerror`` and :meth:`WebSocketTransport.close`, in
  any order: the close code is set once, by a :class:`~grpcbridge.core.tunnel.TunnelMachine`
  (the rules every grpcbridge tunnel follows; this class is its adapter). Close codes: a
  text message closes with 1003, a message above ``max_message_bytes`` or too many bytes
  before setup with 1009, a writer ignoring backpressure with 1011, a flood of empty
  messages with 1008. Browsers forbid scripts to send these, so there they go out as
  4003/4008/4009/4011 (:func:`private_close_code`); errors always show the real code.

Copies: inbound ``arraybuffer.to_bytes()``, outbound ``Uint8Array.new(n).assign(data)`` (one
bulk copy each way, never element by element).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

from grpclib.exceptions import StreamTerminatedError

from .._grpclib_compat import open_streams, release_finished_streams
from ..core.age import FRAME_HEADER_BYTES
from ..core.config import check_positive
from ..core.errors import ConfigError, HandshakeError, TunnelClosed
from ..core.stream import (
    DEFAULT_MAX_MESSAGE_BYTES,
    CloseCode,
    Opcode,
    fit_close_reason,
    message_too_big_reason,
)
from ..core.tunnel import TunnelIO, TunnelMachine
from ..core.wire import COALESCE_LIMIT
from . import _ffi

logger = logging.getLogger("grpcbridge.browser")

MiB = 1024 * 1024
#: ``bufferedAmount`` above which the protocol is asked to pause writing.
DEFAULT_HIGH_WATER = 1 * MiB
#: ``bufferedAmount`` at or below which writing resumes: half of ``DEFAULT_HIGH_WATER``, so the
#: socket still has data to send while the writer wakes up (a quarter: uploads 3-20 % slower).
DEFAULT_LOW_WATER = 512 * 1024
#: Hard cap on bytes held in either direction; beyond it the connection fails closed.
DEFAULT_MAX_BUFFER_BYTES = 64 * MiB
#: Seconds RPCs whose responses arrived in full before the peer closed get to read them.
DEFAULT_DRAIN_TIMEOUT = 10.0
#: Seconds to wait for the ``close`` event after closing from this side.
CLOSE_TIMEOUT = 5.0
#: Seconds to wait for ``close`` after an ``error`` event before giving up on it.
ERROR_CLOSE_TIMEOUT = 1.0
#: Seconds between ``bufferedAmount`` checks while writing is paused.
POLL_INTERVAL = 0.005

# JavaScript WebSocket.readyState values.
_CONNECTING, _OPEN, _CLOSING = 0, 1, 2  # then CLOSED = 3
_HANDLERS = ("onopen", "onmessage", "onclose", "onerror")
# HTTP/2 frame types that carry no request data: RST_STREAM, SETTINGS, PING, GOAWAY,
# WINDOW_UPDATE. grpclib may still emit them for RPCs finishing after the socket closed.
_CONTROL_FRAME_TYPES = frozenset({0x3, 0x4, 0x6, 0x7, 0x8})


class SocketClosedError(TunnelClosed, StreamTerminatedError):
    """A write was attempted after the WebSocket began closing (or before it opened).

    It is a grpclib ``StreamTerminatedError`` too, so grpcbridge channels report it to RPCs
    as ``UNAVAILABLE`` with the close code and reason."""


@dataclass(slots=True)
class TransportStats:
    """Counters of one :class:`WebSocketTransport` (bytes each way are its machine's:
    ``bytes_to_websocket``, ``bytes_from_websocket``)."""

    #: Binary messages sent: writes made in one JavaScript task leave as one message.
    messages_sent: int = 0
    messages_received: int = 0
    #: ``write`` calls that carried data (several become one message).
    writes: int = 0
    #: Empty binary messages received (legal, skipped).
    empty_messages: int = 0
    #: Times the protocol was asked to pause writing.
    pauses: int = 0
    #: Largest ``bufferedAmount`` seen right after a send.
    max_buffered_amount: int = 0
    #: Largest number of received bytes held before a protocol was attached.
    max_pending_bytes: int = 0
    #: Bytes received after this side had closed the connection (the client gave them up).
    bytes_ignored_after_close: int = 0
    #: Held (accepted) bytes, other than control frames, that could not be sent because the
    #: peer or the network had closed the socket first; their RPCs fail with the close code.
    bytes_unsent: int = 0


def _control_frames_only(data: bytes | bytearray | memoryview) -> bool:
    """True if ``data`` is a whole number of HTTP/2 control frames (see above)."""
    view = memoryview(data)
    offset = 0
    while offset < len(view):
        if len(view) - offset < FRAME_HEADER_BYTES or view[offset + 3] not in _CONTROL_FRAME_TYPES:
            return False  # a partial frame header, or a frame that carries request data
        offset += FRAME_HEADER_BYTES + int.from_bytes(view[offset:offset + 3], "big")
    return offset == len(view)


def check_buffer_sizes(high_water: int, low_water: int, max_buffer_bytes: int,
                       max_message_bytes: int) -> None:
    """:class:`ConfigError` unless ``0 <= low_water <= high_water <= max_buffer_bytes`` and
    ``max_message_bytes <= max_buffer_bytes`` (the transport's and the channel's check)."""
    if not 0 <= low_water <= high_water <= max_buffer_bytes or \
            max_buffer_bytes < max_message_bytes:
        raise ConfigError("need 0 <= low_water <= high_water <= max_buffer_bytes and "
                          "max_message_bytes <= max_buffer_bytes, got "
                          f"{low_water}, {high_water}, {max_buffer_bytes}, {max_message_bytes}")


def private_close_code(code: int) -> int:
    """The code a browser client sends instead of ``code`` (scripts may not send 1001-1015):
    ``4000 + code - 1000``, e.g. 1003 -> 4003. Other codes are returned unchanged."""
    return 4000 + code - 1000 if 1001 <= code <= 1015 else code


class WebSocketTransport(asyncio.Transport, TunnelIO):
    """An asyncio transport over a JavaScript ``WebSocket`` (browser, worker or Node).

    Create it inside Pyodide's running event loop, await :meth:`wait_open`, then
    :meth:`attach` a protocol (grpclib's ``H2Protocol``). ``url`` is the full WebSocket URL;
    ``name`` is what messages show instead (it must not carry a token).
    The tunnel's rules are its :attr:`machine`'s (``machine.close_code`` and
    ``close_reason`` once closing began): the JavaScript socket is the WebSocket side, the
    protocol the stream side. It implements what grpclib's protocol calls; a browser cannot
    stop reading a socket, so ``pause_reading``/``resume_reading`` are not offered.
    """

    #: Pyodide proxies currently alive, over all transports (a leak check for tests).
    live_proxies: ClassVar[int] = 0
    #: Held writes are sent at once when this many bytes are held.
    coalesce_limit: ClassVar[int] = COALESCE_LIMIT
    #: Seconds to wait for the ``close`` event after closing from this side.
    close_timeout: float = CLOSE_TIMEOUT

    def __init__(
        self,
        url: str,
        subprotocols: Sequence[str] = (),
        *,
        name: str | None = None,
        high_water: int = DEFAULT_HIGH_WATER,
        low_water: int = DEFAULT_LOW_WATER,
        max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    ) -> None:
        check_buffer_sizes(high_water, low_water, max_buffer_bytes, max_message_bytes)
        check_positive("drain_timeout", drain_timeout, allow_zero=True)
        super().__init__({"url": name or url})
        self.loop = asyncio.get_running_loop()
        self.name = name or url
        self.stats = TransportStats()
        self._high_water = high_water
        self._low_water = low_water
        self._max_buffer_bytes = max_buffer_bytes
        self._max_message_bytes = max_message_bytes
        self._drain_timeout = drain_timeout
        #: The tunnel's rules; it calls back the ``TunnelIO`` methods of this transport.
        self.machine = TunnelMachine(self, clock=self.loop.time, stream_name="client",
                                     close_timeout=self.close_timeout)
        self.machine.pending_limit = max_buffer_bytes
        #: The attached protocol, if any.
        self.protocol: asyncio.Protocol | None = None
        #: Writes held until the end of the current JavaScript task (see ``write``).
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._flush_queued = False
        #: ``bufferedAmount`` when last read (it only falls between sends).
        self._buffered = 0
        self._paused = False
        self._watcher: asyncio.Task[None] | None = None
        self._drainer: asyncio.Task[None] | None = None
        #: Who began the close: ``"client"`` (this side), ``"server"`` or ``"error"``.
        self.closed_by: str | None = None
        #: Code of the ``close`` event, when one arrived.
        self.close_event_code: int | None = None
        #: Code this side put in its close frame (see :func:`private_close_code`).
        self.sent_close_code: int | None = None
        self._error_seen = False
        #: True while RPCs whose responses arrived before the peer closed are finishing.
        self.draining = False
        #: Resolved when the socket opened; fails with :class:`HandshakeError` otherwise.
        self.opened: asyncio.Future[None] = self.loop.create_future()
        #: Resolved when the socket is gone and its proxies are destroyed.
        self.closed: asyncio.Future[None] = self.loop.create_future()

        js = _ffi.js()
        self._uint8array = js.Uint8Array
        self._queue_microtask = js.queueMicrotask
        args = (url, _ffi.ffi().to_js(list(subprotocols))) if subprotocols else (url,)
        try:
            #: The JavaScript ``WebSocket`` object.
            self.websocket: Any = js.WebSocket.new(*args)
        except Exception as exc:  # JS SyntaxError (bad URL), SecurityError (blocked port)
            raise HandshakeError(f"cannot open a WebSocket to {self.name}: {exc}") from None
        self.websocket.binaryType = "arraybuffer"
        # Install every handler now, before the socket can open or deliver anything.
        create_proxy = _ffi.ffi().create_proxy  # long-lived: destroyed in _destroy_proxies
        self._proxies: dict[str, Any] = {  # onopen -> _handle_open, looked up per event
            handler: create_proxy(partial(self._guard, "_handle_" + handler[2:]))
            for handler in _HANDLERS}
        for handler, proxy in self._proxies.items():
            setattr(self.websocket, handler, proxy)
        # One long-lived proxy runs every flush microtask (no proxy per flush).
        self._proxies["flush"] = self._flush_proxy = create_proxy(self._flush_task_end)
        WebSocketTransport.live_proxies += len(self._proxies)

    def __repr__(self) -> str:
        machine = self.machine
        state = ("closed" if machine.ws_lost else "closing" if machine.close_code is not None
                 else "open" if self.opened.done() else "connecting")
        return f"<WebSocketTransport {self.name} {state}>"

    # ------------------------------------------------------------------ state

    @property
    def subprotocol(self) -> str:
        """The subprotocol the server selected (``""`` for none)."""
        return str(self.websocket.protocol or "")

    @property
    def usable(self) -> bool:
        """True while new requests can be sent: open, and not closing on either side."""
        return (self.machine.close_code is None and self.protocol is not None
                and self.websocket.readyState == _OPEN)

    def loss_description(self) -> str | None:
        """:meth:`describe_close` once closing began, else ``None`` (for the channel core)."""
        return None if self.machine.close_code is None else self.describe_close()

    def describe_close(self) -> str:
        """One line for errors: URL, close code and reason, and ``navigator.onLine``."""
        if self.machine.close_code is None:
            text = f"WebSocket {self.name} is {'open' if self.opened.done() else 'connecting'}"
        else:
            text = f"WebSocket {self.name} closed with code {self.machine.close_code}"
            if self.machine.close_reason:
                text += f" ({self.machine.close_reason})"
            if self.closed_by == "client":
                text += " by the client"
            if self._error_seen:
                text += " after a WebSocket error"
        online = _ffi.navigator_online()
        if online is not None:
            text += f"; navigator.onLine={'true' if online else 'false'}"
        return text

    # ---------------------------------------------------------------- opening

    async def wait_open(self, within: float) -> None:
        """Wait until the socket is open; :class:`HandshakeError` if it closes first or does
        not open within ``within`` seconds (then it is closed)."""
        try:
            await asyncio.wait_for(asyncio.shield(self.opened), within)
        except TimeoutError:
            self.machine.close(CloseCode.NORMAL, f"did not open within {within:g} s")
            raise HandshakeError(f"WebSocket {self.name} did not open within {within:g} s"
                                 ) from None

    def attach(self, protocol: asyncio.Protocol) -> None:
        """Call ``protocol.connection_made(self)``, then deliver the bytes that arrived
        before, in order. Raises :class:`SocketClosedError` if the socket is not open."""
        if self.protocol is not None:
            raise RuntimeError("a protocol is already attached")
        if self.machine.close_code is not None or not self.opened.done():
            raise SocketClosedError(f"cannot attach: {self.describe_close()}")
        self.protocol = protocol
        protocol.connection_made(self)
        self.machine.stream_attached_now()
        if self._paused:  # connection_made's writes filled the socket already
            self.machine.websocket_write_paused()

    # ------------------------------------------------------- JS event handlers

    def _guard(self, handler: str, event: Any) -> None:
        # An exception escaping into JavaScript would be thrown out of the event dispatch
        # (in Node: an uncaught exception). Fail the connection closed instead.
        try:
            getattr(self, handler)(event)
        except BaseException as exc:
            logger.exception("grpcbridge.browser: error in a WebSocket event handler")
            try:
                self.machine.fail(CloseCode.INTERNAL_ERROR, f"internal error: {exc!r}")
            except BaseException:  # pragma: no cover - last resort
                logger.exception("grpcbridge.browser: error while failing the connection")

    def _handle_open(self, event: Any) -> None:
        if self.machine.close_code is None and not self.opened.done():
            self.machine.websocket_opened()
            self.opened.set_result(None)

    def _handle_message(self, event: Any) -> None:
        data = event.data
        machine = self.machine
        if machine.close_code is not None and not self.draining:
            # This side closed the connection (close() or a violation): nobody reads any more.
            self.stats.bytes_ignored_after_close += len(data) if isinstance(data, str) else int(
                getattr(data, "byteLength", 0) or 0)
            return
        self.stats.messages_received += 1
        if isinstance(data, str):
            machine.frame(Opcode.TEXT, data.encode())  # a violation: fails with 1003
            return
        size = getattr(data, "byteLength", None)
        if not isinstance(size, int):  # a Blob: someone changed binaryType
            machine.fail(CloseCode.UNSUPPORTED_DATA,
                         "binary message is not an ArrayBuffer (binaryType must be 'arraybuffer')")
            return
        if size > self._max_message_bytes:
            machine.fail(CloseCode.MESSAGE_TOO_BIG, message_too_big_reason(self._max_message_bytes))
            return
        if size == 0:
            self.stats.empty_messages += 1
            machine.empty_frame()  # rate-limited (1008)
            return
        payload = data.to_bytes()
        if self._paused:
            # Replies (HTTP/2 WINDOW_UPDATEs) arrive as sent data drains: a cheap moment to
            # check, and one that timers throttled in background tabs cannot delay.
            self._check_resume()
        machine.data(payload)  # to the protocol, or held in order until one is attached
        if self.protocol is None:
            self.stats.max_pending_bytes = max(self.stats.max_pending_bytes,
                                               machine.pending_bytes)

    def _handle_close(self, event: Any) -> None:
        if self.machine.ws_lost:
            return
        code = int(getattr(event, "code", CloseCode.ABNORMAL) or CloseCode.ABNORMAL)
        reason = str(getattr(event, "reason", "") or "")
        self.close_event_code = code
        self._closed_there(code, reason)
        self._finalize()

    def _handle_error(self, event: Any) -> None:
        self._error_seen = True
        if self.machine.close_code is not None:
            return  # the close event (or our own close) decides
        if self.websocket.readyState == _CONNECTING:
            # The attempt failed: fail the RPCs waiting for it now. (Node 20's WebSocket
            # then fires no close event at all; browsers fire one with 1006.)
            self._closed_there(CloseCode.ABNORMAL, "WebSocket error before opening")
        # A close event follows an error event and carries the code: wait for it, briefly.
        self.loop.call_later(ERROR_CLOSE_TIMEOUT, self._error_timer_fired)

    def _error_timer_fired(self) -> None:
        # Nothing to do once the socket is gone (both calls below are then no-ops), nor once
        # this side closed: the machine's close deadline applies then.
        if self.closed_by != "client":
            self._closed_there(CloseCode.ABNORMAL, "WebSocket error; no close event followed")
            self._finalize()

    # ----------------------------------------------------------------- writing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data``: the first write of a JavaScript task at once, the task's later
        writes together in one binary message (see the module docstring). Raises
        :class:`SocketClosedError` once the socket began closing (HTTP/2 control frames of
        RPCs finishing after a close are dropped: there is nobody to send them to)."""
        size = len(data)
        if not size:
            return
        if self.machine.close_code is None and self.protocol is not None and \
                self.websocket.readyState == _OPEN:
            held = self._held_bytes + size
            if held + self._buffered > self._max_buffer_bytes and \
                    held + self._read_buffered() > self._max_buffer_bytes:
                self.machine.fail(CloseCode.INTERNAL_ERROR,
                                  f"send buffer over {self._max_buffer_bytes} bytes (writer "
                                  "ignored backpressure)")
                raise SocketClosedError(f"write of {size} bytes refused: {self.describe_close()}")
            if self._held and held > self.coalesce_limit:
                self._flush()  # coalescing never makes a message larger than the limit
                held = size
            self._held.append(data if isinstance(data, bytes) else bytes(data))
            self._held_bytes = held
            self.stats.writes += 1
            if not self._flush_queued:
                # The first write of a task goes out at once (the server starts on a request's
                # HEADERS while its DATA is encoded); the microtask sends the task's others.
                self._flush_queued = True
                self._queue_microtask(self._flush_proxy)
                self._flush()
            elif held >= self.coalesce_limit:
                self._flush()
            if not self._paused and self._held_bytes + self._buffered > self._high_water and \
                    self._held_bytes + self._read_buffered() > self._high_water:
                self._paused = True
                self.stats.pauses += 1
                self.machine.websocket_write_paused()  # -> protocol.pause_writing()
                self._watcher = self.loop.create_task(self._wait_below_low_water())
            return
        socket_going = self.machine.close_code is None and self.websocket.readyState >= _CLOSING
        if (self.draining or socket_going) and _control_frames_only(data):
            return
        if socket_going:
            raise SocketClosedError(f"write of {size} bytes refused: WebSocket {self.name} is "
                                    "closing (the close code is not known yet)")
        raise SocketClosedError(f"write of {size} bytes refused: {self.describe_close()}")

    def _flush_task_end(self) -> None:
        """The microtask queued by the first held write of a task."""
        self._flush_queued = False
        try:
            self._flush()
        except BaseException:  # never throw into the microtask queue
            logger.exception("grpcbridge.browser: error while sending held writes")
            self.machine.fail(CloseCode.INTERNAL_ERROR, "internal error while sending")

    def _flush(self) -> None:
        """Send the held writes as one binary message (or account for them if the socket can
        no longer send: the peer or the network closed it, and their RPCs fail)."""
        held = self._held
        if not held:
            return
        data = held[0] if len(held) == 1 else b"".join(held)
        self._held = []
        self._held_bytes = 0
        if self.websocket.readyState != _OPEN:
            if not _control_frames_only(data):  # control frames: nobody to send them to
                self.stats.bytes_unsent += len(data)
                logger.debug("grpcbridge.browser: %d held bytes not sent: %s", len(data),
                             self.describe_close())
        elif self.machine.close_code is None:
            self.machine.stream_data(data)
        else:  # drain before close: writes accepted before this side closed go out first
            self.machine.bytes_to_websocket += len(data)  # the machine sends nothing now
            self.send_message(data)

    def _read_buffered(self) -> int:
        self._buffered = buffered = int(self.websocket.bufferedAmount)
        return buffered

    def get_write_buffer_size(self) -> int:
        """Held bytes plus the socket's ``bufferedAmount`` (0 once it is gone)."""
        return 0 if self.machine.ws_lost else self._held_bytes + self._read_buffered()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Set the backpressure marks (held plus ``bufferedAmount`` bytes)."""
        high = DEFAULT_HIGH_WATER if high is None else high
        low = high // 4 if low is None else low
        check_buffer_sizes(high, low, self._max_buffer_bytes, self._max_message_bytes)
        self._high_water, self._low_water = high, low

    def _check_resume(self) -> None:
        """Resume writing if held bytes plus ``bufferedAmount`` fell to ``low_water``."""
        if not self._paused or self.machine.close_code is not None or \
                self._held_bytes + self._read_buffered() > self._low_water:
            return
        self._paused = False
        if self._watcher is not None:  # (run by the watcher itself, it ends all the same)
            self._watcher.cancel()
            self._watcher = None
        self.machine.websocket_write_resumed()  # -> protocol.resume_writing()

    async def _wait_below_low_water(self) -> None:
        # Browsers fire no event when bufferedAmount falls: poll. Background tabs throttle
        # these timers (to 1 s or more), so every inbound message checks too (see
        # _handle_message). Polling faster than every 5 ms (Pyodide runs delays up
        # to 2 ms as immediate callbacks) spins the CPU the network needs, and measured slower.
        while self._paused and self.machine.close_code is None:
            await asyncio.sleep(POLL_INTERVAL)
            self._check_resume()

    # ----------------------------------------------------------------- closing

    def is_closing(self) -> bool:
        """True once the socket began closing, except while RPCs drain (see below)."""
        # While RPCs whose responses arrived in full are finishing, grpclib must still read
        # their trailers (it skips them on a closing transport), so this says False then.
        return self.machine.close_code is not None and not self.draining

    def close(self) -> None:
        """Close with code 1000; RPCs still waiting end at once. Idempotent."""
        self.machine.close(CloseCode.NORMAL, "normal closure")

    def abort(self) -> None:
        """Close without waiting for the ``close`` event."""
        self.close()
        self._finalize()

    def _closed_there(self, code: int, reason: str) -> None:
        """The peer (``closed_by`` ``server``) or the network (``error``, after an ``error``
        event) began the close."""
        if self.machine.close_code is not None:
            return
        self._flush()  # held writes are accounted for as unsent: the socket cannot send
        self.closed_by = "error" if self._error_seen else "server"
        self.machine.websocket_closing(code, reason)  # -> close_stream: RPCs drain
        self._settle_opened()

    def _settle_opened(self) -> None:
        if not self.opened.done():
            self.opened.set_exception(HandshakeError(f"{self.describe_close()} before opening"))
            self.opened.exception()  # retrieved: wait_open re-raises it when awaited

    def _send_close(self, code: int, reason: str) -> None:
        ws = self.websocket
        if ws.readyState >= _CLOSING:
            return
        text = fit_close_reason(reason)
        # Browsers let scripts send only 1000 and 3000-4999: 1003, 1009 and 1011 go out as
        # 4003, 4009 and 4011 there (private-use codes); the reason says why in any case.
        for candidate in dict.fromkeys((int(code), private_close_code(code), 1000)):
            try:
                ws.close(candidate, text)
            except Exception:
                continue
            self.sent_close_code = candidate
            return
        logger.debug("grpcbridge.browser: WebSocket.close refused every code")

    async def _drain(self, protocol: Any, stream_ids: list[int]) -> None:
        deadline = self.loop.time() + self._drain_timeout
        streams = open_streams(protocol)
        try:
            while self.loop.time() < deadline:
                if not any(stream_id in streams for stream_id in stream_ids):
                    break
                await asyncio.sleep(0.01)
        finally:
            self._connection_lost()

    def _connection_lost(self) -> None:
        self.draining = False
        protocol = self.protocol
        if protocol is None or self.machine.stream_lost:
            return
        self.machine.stream_gone(False)  # the close code is set: this only records it
        clean = self.closed_by == "client" and self.machine.close_code == CloseCode.NORMAL
        protocol.connection_lost(None if clean else SocketClosedError(self.describe_close()))

    def _finalize(self) -> None:
        """The socket is gone (or given up): detach the handlers, destroy the proxies."""
        if self.machine.ws_lost:
            return
        # Closing began before (every path here sets the close code, and any held writes
        # were sent or accounted for then): the machine only records the loss.
        self.machine.websocket_lost(CloseCode.ABNORMAL, "WebSocket gone")
        if self._watcher is not None:
            self._watcher.cancel()  # a no-op once it is done
        ws = self.websocket
        for handler in _HANDLERS:
            try:
                setattr(ws, handler, None)
            except Exception:  # pragma: no cover
                logger.debug("grpcbridge.browser: cannot detach %s", handler, exc_info=True)
        self._send_close(CloseCode.NORMAL, "normal closure")  # if given up without a close event
        # The handler that called us may be one of the proxies: destroy them afterwards.
        self.loop.call_soon(self._destroy_proxies)

    def _destroy_proxies(self) -> None:
        proxies, self._proxies = self._proxies, {}
        for proxy in proxies.values():
            try:
                proxy.destroy()
            except Exception:  # pragma: no cover
                logger.debug("grpcbridge.browser: proxy.destroy failed", exc_info=True)
        WebSocketTransport.live_proxies -= len(proxies)
        if not self.closed.done():
            self.closed.set_result(None)

    # ------------------------------------- TunnelIO: the machine's outputs, carried out

    def send_message(self, data: bytes) -> None:
        buffer = self._uint8array.new(len(data))
        buffer.assign(data)
        self.websocket.send(buffer)
        self.stats.messages_sent += 1
        self.stats.max_buffered_amount = max(self.stats.max_buffered_amount,
                                             self._read_buffered())

    def send_close(self, code: int, reason: str) -> None:
        if self.closed_by is None:  # this side begins the close
            self.closed_by = "client"
            # Writes accepted before the close go out first (drain before close); if the
            # socket can no longer send, _flush accounts for them.
            self._flush()
            self._settle_opened()
        self._send_close(code, reason)

    def fail_websocket(self, code: int, reason: str) -> None:
        logger.warning("grpcbridge.browser: closing %s with %d: %s", self.name, code, reason)
        self.send_close(code, reason)

    def abort_websocket(self) -> None:
        # A script cannot drop a socket: the first call (closing before the socket opened)
        # closes it; a later one (the close deadline passed) gives it up.
        if self.closed_by is not None:
            self._finalize()
        elif self.machine.close_code is None or self.machine.close_code == CloseCode.NORMAL:
            self.send_close(CloseCode.NORMAL, self.machine.close_reason)
        else:
            self.fail_websocket(self.machine.close_code, self.machine.close_reason)

    websocket_buffered = get_write_buffer_size

    def write_stream(self, data: bytes) -> None:
        assert self.protocol is not None
        self.protocol.data_received(data)

    def close_stream(self) -> None:
        protocol = self.protocol
        if protocol is None:
            return
        if self.closed_by != "client":
            # The peer closed. RPCs whose response ended (END_STREAM arrived) may still be
            # reading it: let them finish for up to ``drain_timeout`` seconds; end the
            # others now with the close code and reason. Then ``connection_lost``.
            try:
                finishing = release_finished_streams(protocol, self.describe_close())
            except AttributeError:  # not a grpclib protocol, or one without these internals
                logger.debug("grpcbridge.browser: unknown grpclib internals", exc_info=True)
                finishing = []
            if finishing and self._drain_timeout > 0:
                self.draining = True
                self._drainer = self.loop.create_task(self._drain(protocol, finishing))
                return
        # Otherwise (and when this side gave up the connection) every RPC on it ends now.
        self.loop.call_soon(self._connection_lost)

    abort_stream = _connection_lost

    def pause_stream(self) -> None:
        assert self.protocol is not None
        self.protocol.pause_writing()

    def resume_stream(self) -> None:
        assert self.protocol is not None
        self.protocol.resume_writing()
