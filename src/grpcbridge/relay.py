"""The asyncio relay: one WebSocket connection <-> one byte-stream connection.

Used by the bridge (WebSocket from a client, stream to the backend) and the forwarder
(stream from a local gRPC client, WebSocket to a bridge). Both sides are callback-level
asyncio Protocols; the WebSocket side drives websockets' sans-I/O protocol, so there is no
coroutine, queue or task per message.

Memory stays bounded in both directions: every transport's write buffer has a high-water
mark of ``buffer_bytes``; when one fills, reading from the side that feeds it pauses until
it drains to a quarter. Nothing is ever dropped while both sides live. On a server, a
:class:`~grpcbridge.core.limits.BudgetAccount` also caps what a client can make the relay
hold (incomplete messages included), frames without stream bytes are rate-limited, and a
connection that delivers many frames at once yields the event loop before reading more.

Closing never waits forever: a side being closed gets ``CLOSE_TIMEOUT`` to flush what is
buffered for it (longer while its peer keeps reading), then it is aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from collections.abc import Callable
from typing import Any, Protocol, cast

from websockets.exceptions import InvalidState
from websockets.frames import Frame
from websockets.frames import Opcode as WsOpcode
from websockets.protocol import CONNECTING, OPEN
from websockets.protocol import Protocol as WebSocketProtocol

from .core.limits import FRAMES_PER_TURN, PROGRESS_BYTES, BudgetAccount, FrameRate
from .core.stream import CloseCode, InboundMessages, Opcode, StreamViolation

logger = logging.getLogger("grpcbridge")
#: Logger handed to websockets' protocol objects. Its DEBUG output includes request headers
#: (bearer tokens among them), so it is pinned at WARNING whatever the root level is.
websockets_logger = logging.getLogger("grpcbridge.websockets")
websockets_logger.setLevel(logging.WARNING)

_BINARY = WsOpcode.BINARY
_OPCODES = {WsOpcode.TEXT: Opcode.TEXT, WsOpcode.CONT: Opcode.CONTINUATION}
_SEND_EOF = b""


class StreamOwner(Protocol):
    """What the stream side of a tunnel (a socket's :class:`StreamSide`, or an in-process
    :class:`~grpcbridge.pipe.Pipe`) needs from its tunnel. Implemented by :class:`Tunnel`
    (websockets sans-I/O) and by the ASGI app's tunnel."""

    loop: asyncio.AbstractEventLoop

    def attach_stream(self, transport: asyncio.Transport, buffer_bytes: int) -> None: ...

    def stream_data(self, data: bytes) -> None: ...

    def stream_eof(self) -> None: ...

    def stream_lost(self, exc: Exception | None) -> None: ...

    def pause_websocket_reading(self) -> None: ...

    def resume_websocket_reading(self) -> None: ...

    def websocket_buffer_size(self) -> int: ...

    @property
    def max_message_bytes(self) -> int | None:
        """Largest WebSocket message this side accepts (None: no limit)."""


class Tunnel:
    """State of one tunnel. Closing is idempotent from every path; ``closed`` resolves once
    both connections are gone."""

    __slots__ = (
        "__weakref__",
        "_close_timer",
        "_early",
        "_frame_rate",
        "_inbound",
        "_last_ping",
        "_pending",
        "_progress_mark",
        "_retained",
        "_rules",
        "_stream_closing",
        "_stream_lost",
        "_stream_timer",
        "_ws_lost",
        "_ws_reading_paused",
        "_ws_yielding",
        "account",
        "bytes_from_websocket",
        "bytes_to_websocket",
        "close_code",
        "close_reason",
        "closed",
        "dialing",
        "info",
        "last_inbound",
        "loop",
        "on_handshake_event",
        "opened_at",
        "stream_name",
        "stream_transport",
        "websocket",
        "ws_transport",
    )

    #: Seconds to wait for the peer's closing handshake before dropping the connection.
    CLOSE_TIMEOUT = 2.0
    #: Seconds between pings to a peer whose reading is paused for backpressure.
    PROBE_INTERVAL = 1.0

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        websocket: WebSocketProtocol,
        *,
        stream_name: str,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.loop = loop
        self.websocket = websocket
        self.stream_name = stream_name
        self.info: dict[str, Any] = info if info is not None else {}
        self.ws_transport: asyncio.Transport | None = None
        self.stream_transport: asyncio.Transport | None = None
        #: Called with each non-frame event (handshake Request/Response).
        self.on_handshake_event: Callable[[object], None] | None = None
        self._rules = InboundMessages()
        self._pending: list[bytes] = []
        self._early: list[bytes] = []
        self._ws_lost = False
        self._stream_lost = False
        #: No more writes to the stream side: it is closing, aborted or lost.
        self._stream_closing = False
        self._ws_reading_paused = False
        self._ws_yielding = False
        self._close_timer: asyncio.TimerHandle | None = None
        self._stream_timer: asyncio.TimerHandle | None = None
        #: Bytes of a WebSocket frame received but not complete yet (websockets' reader).
        self._inbound: bytearray = websocket.reader.buffer
        self._progress_mark = 0
        #: Payload bytes of the last frame received: websockets' parser keeps that frame
        #: referenced until the next one arrives, so it counts as held memory.
        self._retained = 0
        #: Share of a server's memory budget, charged with what this tunnel holds.
        self.account: BudgetAccount | None = None
        #: True while the stream side is being connected (``closed`` waits for it).
        self.dialing = False
        self.bytes_from_websocket = 0
        self.bytes_to_websocket = 0
        self.opened_at = loop.time()
        self.last_inbound = self.opened_at
        self._last_ping = self.opened_at
        self._frame_rate = FrameRate(self.opened_at)
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed: asyncio.Future[None] = loop.create_future()

    # ------------------------------------------------------------------ state

    @property
    def is_open(self) -> bool:
        """Relaying: WebSocket open and stream side attached."""
        return (
            self.websocket.state is OPEN and self.stream_transport is not None
            and not self._stream_lost
        )

    @property
    def max_message_bytes(self) -> int | None:
        """Largest WebSocket message accepted (None: no limit)."""
        return self.websocket.max_message_size

    # --------------------------------------------------------- WebSocket side

    def ws_data(self, data: bytes) -> None:
        now = self.loop.time()
        websocket = self.websocket
        websocket.receive_data(data)
        events = websocket.events_received()
        # Activity for the idle timeout: a complete frame, or real progress on a partial
        # one. A byte trickled now and then into a huge frame keeps nothing alive.
        partial = len(self._inbound)
        if events or partial - self._progress_mark >= PROGRESS_BYTES:
            self.last_inbound = now
            self._progress_mark = partial
        for event in events:
            if type(event) is Frame:
                opcode = event.opcode
                if opcode is _BINARY:
                    payload = event.data
                elif opcode in _OPCODES:
                    try:
                        payload = self._rules.accept(_OPCODES[opcode], bytes(event.data))
                    except StreamViolation as violation:
                        self.fail(violation.code, violation.reason)
                        return
                else:
                    payload = b""  # ping/pong/close: answered by the sans-I/O protocol
                if payload:
                    # websockets hands over bytes (masked frames) or a fresh bytearray
                    # (unmasked ones). Both go on uncopied: nothing mutates them, and a
                    # copy would cost a memcpy per received byte.
                    self._to_stream(cast(bytes, payload))
                elif not self._frame_rate.allow(now):
                    self.fail(CloseCode.POLICY_VIOLATION, "too many control or empty frames")
                    return
            elif self.on_handshake_event is not None:
                self.on_handshake_event(event)
        self.flush_websocket()
        if websocket.close_expected() and self.close_code is None:
            self._note_websocket_close()
        if self.close_code is not None:
            self._close_stream()
        elif len(events) > FRAMES_PER_TURN:
            self._yield_turn()
        if self.account is not None:
            if events:
                last = events[-1]
                self._retained = len(last.data) if type(last) is Frame else 0
            self.charge_budget()

    def _note_websocket_close(self) -> None:
        websocket = self.websocket
        sent, received = websocket.close_sent, websocket.close_rcvd
        if sent is not None and (received is None or not websocket.close_rcvd_then_sent):
            self._set_close(sent.code, sent.reason)
        elif received is not None:
            self._set_close(received.code, received.reason)

    def _set_close(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason

    def _to_stream(self, payload: bytes) -> None:
        transport = self.stream_transport
        if transport is None:
            self._pending.append(payload)
        elif self._stream_closing:
            return  # the stream side is gone: nobody will read these bytes
        else:
            transport.write(payload)
        self.bytes_from_websocket += len(payload)

    def _yield_turn(self) -> None:
        """Stop reading the WebSocket until the loop's next iteration, so a peer that sends
        many frames at once cannot hold the loop (uvloop reads up to 32 times per wake-up)."""
        transport = self.ws_transport
        if transport is None or self._ws_lost or self._ws_yielding:
            return
        self._ws_yielding = True
        if not self._ws_reading_paused:
            transport.pause_reading()
        self.loop.call_soon(self._end_turn)

    def _end_turn(self) -> None:
        self._ws_yielding = False
        if self.ws_transport is not None and not self._ws_lost and not self._ws_reading_paused:
            self.ws_transport.resume_reading()

    def charge_budget(self) -> None:
        """Report what this tunnel holds to its budget account; over budget: close 1008."""
        account = self.account
        if account is None:
            return
        held = len(self._inbound) + self._retained
        transport = self.stream_transport
        if transport is not None and not self._stream_closing:
            held += transport.get_write_buffer_size()
        transport = self.ws_transport
        if transport is not None and not self._ws_lost:
            held += transport.get_write_buffer_size()
        reason = account.charge(held)
        if reason is not None and self.close_code is None:
            self.fail(CloseCode.POLICY_VIOLATION, reason.partition(" (")[0], detail=reason)

    def flush_websocket(self) -> None:
        transport = self.ws_transport
        if transport is None or self._ws_lost:
            if self._ws_lost:
                self.websocket.data_to_send()  # the peer is gone: nothing to write to
            return
        for chunk in self.websocket.data_to_send():
            if chunk is _SEND_EOF or not chunk:
                if self._close_timer is not None:
                    self._close_timer.cancel()
                    self._close_timer = None
                transport.close()
                if not self._ws_lost and transport.get_write_buffer_size():
                    self._arm_close_timer()  # flushing to the peer, but not forever
            else:
                transport.write(chunk)

    def ws_lost(self, exc: Exception | None) -> None:
        if self._ws_lost:
            return
        self._ws_lost = True
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        websocket = self.websocket
        with contextlib.suppress(EOFError, AssertionError):
            websocket.receive_eof()  # fails harmlessly when already at EOF
        websocket.data_to_send()
        # websockets' parser generator holds the last frame and the protocol in a cycle
        # that only the cyclic GC frees: end it now, so the memory goes with the tunnel.
        websocket.parser.close()
        if websocket.parser_exc is not None:  # its traceback keeps the parser's frame
            traceback.clear_frames(websocket.parser_exc.__traceback__)
        self._retained = 0
        if self.close_code is None:
            self._note_websocket_close()
            self._set_close(CloseCode.ABNORMAL, str(exc) if exc else "connection lost")
        self._close_stream()
        if self.account is not None:
            self.account.close()
        # websockets' protocol object lives in a reference cycle (its parser generator) and
        # is freed only by the cyclic GC: drop the bytes it holds now.
        with contextlib.suppress(BufferError):
            self._inbound.clear()
        self._early.clear()
        self._maybe_done()

    def ws_pause_writing(self) -> None:
        if self.stream_transport is not None and not self._stream_closing:
            self.stream_transport.pause_reading()
        if self.account is not None:
            self.charge_budget()

    def ws_resume_writing(self) -> None:
        if self.stream_transport is not None and not self._stream_closing:
            self.stream_transport.resume_reading()
        if self.account is not None:
            self.charge_budget()

    # ------------------------------------------------------------ stream side

    def attach_stream(self, transport: asyncio.Transport, buffer_bytes: int) -> None:
        """Attach the byte-stream connection (from its ``connection_made``).

        Bytes that arrived from the WebSocket before are written to it first. If the
        WebSocket is not open yet, reading from the stream waits for :meth:`websocket_opened`.
        """
        transport.set_write_buffer_limits(high=buffer_bytes, low=buffer_bytes // 4)
        self.stream_transport = transport
        if self._ws_lost or self.close_code is not None:
            self._close_stream()
            return
        if self.websocket.state is not OPEN:
            transport.pause_reading()
        pending, self._pending = self._pending, []
        for chunk in pending:
            transport.write(chunk)
        self.resume_websocket_reading()

    def websocket_opened(self) -> None:
        """The WebSocket handshake completed: start relaying."""
        early, self._early = self._early, []
        for chunk in early:
            self.stream_data(chunk)
        transport = self.stream_transport
        if transport is not None and not self._stream_closing:
            transport.resume_reading()
        self.resume_websocket_reading()

    def websocket_buffer_size(self) -> int:
        """Bytes waiting in the WebSocket's write buffer."""
        transport = self.ws_transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def pause_websocket_reading(self) -> None:
        if self.ws_transport is not None and not self._ws_lost and not self._ws_reading_paused:
            self._ws_reading_paused = True
            if not self._ws_yielding:
                self.ws_transport.pause_reading()
        if self.account is not None:
            self.charge_budget()

    def resume_websocket_reading(self) -> None:
        if self.ws_transport is not None and not self._ws_lost and self._ws_reading_paused:
            self._ws_reading_paused = False
            if not self._ws_yielding:
                self.ws_transport.resume_reading()
        if self.account is not None:
            self.charge_budget()

    def stream_data(self, data: bytes) -> None:
        websocket = self.websocket
        try:
            websocket.send_binary(data)
        except InvalidState:
            if websocket.state is CONNECTING:
                # Event loops may deliver data despite the pause in attach_stream (uvloop
                # does): keep it, in order, until the handshake completes. Never drop.
                self._early.append(data)
                if self.stream_transport is not None:
                    self.stream_transport.pause_reading()
            return  # otherwise the WebSocket is closing: the peer will not read this
        self.bytes_to_websocket += len(data)
        transport = self.ws_transport
        if transport is not None:
            transport.writelines(websocket.data_to_send())

    def stream_eof(self) -> None:
        self.close(CloseCode.NORMAL, f"{self.stream_name} closed the connection")

    def stream_lost(self, exc: Exception | None) -> None:
        if self._stream_lost:
            return
        self._stream_lost = self._stream_closing = True
        if self._stream_timer is not None:
            self._stream_timer.cancel()
            self._stream_timer = None
        if exc is None:
            self.close(CloseCode.NORMAL, f"{self.stream_name} closed the connection")
        else:
            self.close(CloseCode.INTERNAL_ERROR, f"{self.stream_name} connection lost")
        self._maybe_done()

    # ---------------------------------------------------------------- closing

    def close(self, code: int, reason: str) -> None:
        """Close both connections; the WebSocket with ``code`` and ``reason``."""
        websocket = self.websocket
        if websocket.state is OPEN and not self._ws_lost:
            self._set_close(code, reason)
            websocket.send_close(code, reason)
            self.flush_websocket()
            self._arm_close_timer()
            # Read the peer's close frame even if reading was paused for backpressure.
            self.resume_websocket_reading()
        elif self.ws_transport is not None and not self._ws_lost:
            self._set_close(code, reason)
            self.ws_transport.close()
            self._arm_close_timer()
        self._close_stream()

    def fail(self, code: int, reason: str, *, detail: str | None = None) -> None:
        """Fail the WebSocket for a protocol violation (no further frames are processed).
        ``reason`` goes on the wire (keep it short); ``detail``, if given, to the logs."""
        self._set_close(code, detail or reason)
        if self.websocket.state is OPEN:
            self.websocket.fail(code, reason)
            self.flush_websocket()
            self._arm_close_timer()
        self._close_stream()

    def _arm_close_timer(self) -> None:
        transport = self.ws_transport
        if transport is not None and not self._ws_lost and self._close_timer is None:
            self._close_timer = self.loop.call_later(
                self.CLOSE_TIMEOUT, self._close_timed_out, transport.get_write_buffer_size())

    def _close_timed_out(self, pending: int) -> None:
        """No closing handshake (or no flush) within CLOSE_TIMEOUT: abort. Unless the
        close frame still waits behind data that the peer keeps reading (the write buffer
        shrank from ``pending``): a slow reader is not a dead one, and aborting would drop
        that data."""
        self._close_timer = None
        transport = self.ws_transport
        left = 0 if transport is None or self._ws_lost else transport.get_write_buffer_size()
        if 0 < left < pending:
            self._close_timer = self.loop.call_later(
                self.CLOSE_TIMEOUT, self._close_timed_out, left)
        elif transport is not None and not self._ws_lost:
            self._set_close(CloseCode.ABNORMAL, "close timed out")
            transport.abort()

    def _close_stream(self) -> None:
        """Close the stream side: what is buffered for it gets CLOSE_TIMEOUT to drain (more
        while it keeps draining); a peer that stopped reading is then aborted."""
        transport = self.stream_transport
        if transport is None or self._stream_closing:
            return
        self._stream_closing = True
        pending = transport.get_write_buffer_size()
        transport.close()
        if pending:
            self._stream_timer = self.loop.call_later(
                self.CLOSE_TIMEOUT, self._stream_close_timed_out, pending)

    def _stream_close_timed_out(self, pending: int) -> None:
        self._stream_timer = None
        transport = self.stream_transport
        if transport is None or self._stream_lost:
            return
        left = transport.get_write_buffer_size()
        if 0 < left < pending:
            self._stream_timer = self.loop.call_later(
                self.CLOSE_TIMEOUT, self._stream_close_timed_out, left)
        else:
            transport.abort()

    def abort(self) -> None:
        """Drop both connections now, without waiting for buffers or handshakes."""
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._set_close(CloseCode.ABNORMAL, "aborted")
        if self.ws_transport is not None and not self._ws_lost:
            self.ws_transport.abort()
        if self.stream_transport is not None and not self._stream_lost:
            self._stream_closing = True
            if self._stream_timer is not None:
                self._stream_timer.cancel()
                self._stream_timer = None
            self.stream_transport.abort()

    def dial_finished(self) -> None:
        """The stream side was connected, or will never be (dial failed or cancelled)."""
        self.dialing = False
        self._maybe_done()

    def _maybe_done(self) -> None:
        if not self._ws_lost or self.dialing:
            return
        if self.stream_transport is None:
            self._stream_lost = True
        if self._stream_lost and not self.closed.done():
            self.closed.set_result(None)

    # -------------------------------------------------------------- keepalive

    def keepalive(self, now: float, ping_interval: float, idle_timeout: float) -> None:
        if self.websocket.state is not OPEN:
            return
        quiet = now - self.last_inbound
        since_ping = now - self._last_ping
        if idle_timeout and quiet >= idle_timeout:
            logger.debug("tunnel idle for %.1f s, closing", quiet)
            self.close(CloseCode.GOING_AWAY, "idle timeout")
        elif ((ping_interval and quiet >= ping_interval and since_ping >= ping_interval)
              or (self._ws_reading_paused and since_ping >= self.PROBE_INTERVAL)):
            # While reading is paused (the stream side is not keeping up), a peer that went
            # away goes unnoticed until something is written to it: probe it with pings.
            self._last_ping = now
            self.websocket.send_ping(b"grpcbridge")
            self.flush_websocket()
        if self.account is not None:
            self.charge_budget()  # buffers drain without callbacks: refresh the account


class WebSocketSide(asyncio.Protocol):
    """asyncio Protocol for the WebSocket connection of a tunnel."""

    __slots__ = ("_buffer_bytes", "on_connection", "tunnel")

    def __init__(self, tunnel: Tunnel, buffer_bytes: int,
                 on_connection: Callable[[Tunnel], None] | None = None) -> None:
        self.tunnel = tunnel
        self._buffer_bytes = buffer_bytes
        self.on_connection = on_connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        transport.set_write_buffer_limits(high=self._buffer_bytes, low=self._buffer_bytes // 4)
        self.tunnel.ws_transport = transport
        if self.on_connection is not None:
            self.on_connection(self.tunnel)

    def data_received(self, data: bytes) -> None:
        self.tunnel.ws_data(data)

    def eof_received(self) -> bool | None:
        tunnel = self.tunnel
        tunnel.websocket.receive_eof()
        tunnel.flush_websocket()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.ws_lost(exc)

    def pause_writing(self) -> None:
        self.tunnel.ws_pause_writing()

    def resume_writing(self) -> None:
        self.tunnel.ws_resume_writing()


class StreamSide(asyncio.Protocol):
    """asyncio Protocol for the byte-stream connection of a tunnel."""

    __slots__ = ("_buffer_bytes", "tunnel")

    def __init__(self, tunnel: StreamOwner, buffer_bytes: int) -> None:
        self.tunnel = tunnel
        self._buffer_bytes = buffer_bytes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.tunnel.attach_stream(transport, self._buffer_bytes)

    def data_received(self, data: bytes) -> None:
        self.tunnel.stream_data(data)

    def eof_received(self) -> bool | None:
        self.tunnel.stream_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.stream_lost(exc)

    def pause_writing(self) -> None:
        self.tunnel.pause_websocket_reading()

    def resume_writing(self) -> None:
        self.tunnel.resume_websocket_reading()


async def keepalive_forever(
    tunnels: Callable[[], list[Tunnel]],
    ping_interval: float,
    idle_timeout: float,
    on_tick: Callable[[], None] | None = None,
) -> None:
    """Ping quiet tunnels and close idle ones, forever (cancel the task to stop).

    One task per server instead of one timer per tunnel keeps idle tunnels cheap.
    """
    periods = [p for p in (ping_interval, idle_timeout) if p]
    interval = min([1.0, *(p / 4 for p in periods)])
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        if on_tick is not None:
            on_tick()
        if not periods:
            continue
        now = loop.time()
        for tunnel in tunnels():
            tunnel.keepalive(now, ping_interval, idle_timeout)
