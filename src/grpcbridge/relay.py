"""The asyncio relay: one WebSocket connection <-> one byte-stream connection.

Used by the bridge (WebSocket from a client, stream to the backend) and the forwarder
(stream from a local gRPC client, WebSocket to a bridge). Both sides are callback-level
asyncio Protocols; the WebSocket side drives websockets' sans-I/O protocol (:class:`Tunnel`,
for a bridge with compression or on a Unix socket; its other listeners and every client use
picows instead, :mod:`grpcbridge.fastws`, on the same :class:`SocketTunnel` transport half),
so there is no coroutine, queue or task per message.

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
from collections.abc import Callable, Sequence
from typing import cast

from websockets.exceptions import InvalidState
from websockets.frames import Frame
from websockets.frames import Opcode as WsOpcode
from websockets.protocol import OPEN
from websockets.protocol import Protocol as WebSocketProtocol

from .core.limits import FRAMES_PER_TURN
from .core.stream import CloseCode, Opcode
from .core.tunnel import TunnelIO, TunnelMachine

#: Logger handed to websockets' protocol objects. Its DEBUG output includes request headers
#: (bearer tokens among them), so it is pinned at WARNING whatever the root level is.
websockets_logger = logging.getLogger("grpcbridge.websockets")
websockets_logger.setLevel(logging.WARNING)

_BINARY = WsOpcode.BINARY
_OPCODES = {WsOpcode.TEXT: Opcode.TEXT, WsOpcode.CONT: Opcode.CONTINUATION}
#: A last frame smaller than this is not worth charging to the memory budget.
_RETAINED_MIN = 64 * 1024


class StreamAdapter(TunnelIO):
    """The stream half of a :class:`~grpcbridge.core.tunnel.TunnelMachine` adapter: drives
    an asyncio stream transport (a backend connection, a local client, or a
    :class:`~grpcbridge.pipe.Pipe`, which report to the machine directly), arms the
    machine's timer and resolves ``closed`` when the machine is done. Shared by the relay's
    :class:`Tunnel`, :class:`~grpcbridge.fastws.PicowsTunnel` and the ASGI app's tunnel,
    which add their WebSocket halves."""

    __slots__ = ("closed", "loop", "machine", "stream_transport")

    #: The byte-stream connection, set by :meth:`attach_stream`: the machine asks for the
    #: stream outputs below only once it is attached.
    stream_transport: asyncio.Transport

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        #: Resolves once both sides are gone.
        self.closed: asyncio.Future[None] = loop.create_future()

    def attach_stream(self, transport: asyncio.Transport) -> None:
        """Attach the byte-stream connection (from its ``connection_made``); what follows is
        :meth:`~grpcbridge.core.tunnel.TunnelMachine.stream_attached_now`'s."""
        self.stream_transport = transport
        self.machine.stream_attached_now()
        self.machine.charge()

    # --------------------------------------- TunnelIO: the stream half of the outputs

    def write_stream(self, data: bytes) -> None:
        self.stream_transport.write(data)

    def close_stream(self) -> None:
        self.stream_transport.close()

    def abort_stream(self) -> None:
        self.stream_transport.abort()

    def pause_stream(self) -> None:
        self.stream_transport.pause_reading()

    def resume_stream(self) -> None:
        self.stream_transport.resume_reading()

    def stream_buffered(self) -> int:
        return self.stream_transport.get_write_buffer_size()

    def tunnel_closed(self) -> None:
        self.set_timer(None)  # an age's timer may still be armed
        if not self.closed.done():
            self.closed.set_result(None)


class SocketTunnel(StreamAdapter):
    """A tunnel whose WebSocket is an asyncio transport (``ws_transport``): the transport
    half shared by the websockets (:class:`Tunnel`) and picows
    (:class:`~grpcbridge.fastws.PicowsTunnel`) adapters."""

    __slots__ = ("_ws_yielding", "websocket", "ws_transport")

    #: websockets' protocol, whose output :meth:`flush_websocket` writes (None: none).
    websocket: WebSocketProtocol | None

    def __init__(self, loop: asyncio.AbstractEventLoop, stream_name: str) -> None:
        super().__init__(loop)
        self.ws_transport: asyncio.Transport | None = None
        self._ws_yielding = False
        self.machine = TunnelMachine(self, clock=loop.time, stream_name=stream_name)

    def flush_websocket(self) -> None:
        """Write what websockets' protocol has to send; its end-of-stream marker closes the
        connection once flushed (within the machine's close deadline)."""
        websocket = self.websocket
        if websocket is None:
            return
        if self.machine.ws_lost:
            websocket.data_to_send()  # the peer is gone: nothing to write to
        elif self.ws_transport is not None:
            for chunk in websocket.data_to_send():
                if chunk:
                    self.ws_transport.write(chunk)
                else:  # websockets' end-of-stream marker
                    self._close_flushed()

    def _close_flushed(self) -> None:
        """Close the WebSocket connection once what is buffered for it is sent."""
        self.finish_websocket()
        self.machine.websocket_flushing()

    def _yield_turn(self) -> None:
        """Stop reading the WebSocket until the loop's next iteration, so a peer that sends
        many frames at once cannot hold the loop (uvloop reads up to 32 times per wake-up)."""
        transport = self.ws_transport
        if transport is None or self.machine.ws_lost or self._ws_yielding:
            return
        self._ws_yielding = True
        if not self.machine.ws_paused:
            transport.pause_reading()
        self.loop.call_soon(self._end_turn)

    def _end_turn(self) -> None:
        self._ws_yielding = False
        if (self.ws_transport is not None and not self.machine.ws_lost
                and not self.machine.ws_paused):
            self.ws_transport.resume_reading()

    # ------------------------------------------- TunnelIO: the transport's outputs

    def abort_websocket(self) -> None:
        if self.ws_transport is not None and not self.machine.ws_lost:
            self.ws_transport.abort()

    def finish_websocket(self) -> None:
        if self.ws_transport is not None and not self.machine.ws_lost:
            self.ws_transport.close()

    def pause_websocket(self) -> None:
        if self.ws_transport is not None and not self._ws_yielding:
            self.ws_transport.pause_reading()

    def resume_websocket(self) -> None:
        if self.ws_transport is not None and not self._ws_yielding:
            self.ws_transport.resume_reading()

    def websocket_buffered(self) -> int:
        transport = self.ws_transport
        if transport is None or self.machine.ws_lost:
            return 0
        return transport.get_write_buffer_size()


class Tunnel(SocketTunnel):
    """One tunnel over asyncio transports: an adapter that feeds a
    :class:`~grpcbridge.core.tunnel.TunnelMachine` (where every rule lives) and carries out
    its outputs on the WebSocket transport (through websockets' sans-I/O protocol) and the
    stream transport. ``closed`` resolves once both connections are gone."""

    __slots__ = (
        "_inbound",
        "_retained",
        "max_message_bytes",
    )

    websocket: WebSocketProtocol

    def __init__(self, loop: asyncio.AbstractEventLoop, websocket: WebSocketProtocol, *,
                 stream_name: str) -> None:
        super().__init__(loop, stream_name)
        self.websocket = websocket
        #: Largest WebSocket message accepted (None: no limit).
        self.max_message_bytes = websocket.max_message_size
        #: Bytes of a WebSocket frame received but not complete yet (websockets' reader).
        self._inbound: bytearray = websocket.reader.buffer
        #: Payload bytes of the last frame received: websockets' parser keeps that frame
        #: referenced until the next one arrives, so it counts as held memory.
        self._retained = 0

    # --------------------------------------------------------- WebSocket side

    def ws_data(self, data: bytes) -> None:
        websocket = self.websocket
        machine = self.machine
        websocket.receive_data(data)
        events = websocket.events_received()
        for event in events:
            if type(event) is Frame:
                opcode = event.opcode
                if opcode is _BINARY:
                    if event.data:
                        # websockets hands over bytes (masked frames) or a fresh bytearray
                        # (unmasked ones). Both go on uncopied: nothing mutates them, and a
                        # copy would cost a memcpy per received byte.
                        machine.data(cast(bytes, event.data))
                    elif not machine.empty_frame():
                        break
                elif opcode in _OPCODES:
                    if not machine.frame(_OPCODES[opcode], bytes(event.data)):
                        break
                elif not machine.empty_frame():  # ping/pong/close: websockets answers them
                    break
        self.flush_websocket()
        if websocket.close_expected() and machine.close_code is None:
            self._note_websocket_close()
        elif len(events) > FRAMES_PER_TURN and machine.close_code is None:
            self._yield_turn()
        machine.received(len(events), len(self._inbound))
        account = machine.account
        if account is not None:
            if events:
                last = events[-1]
                retained = len(last.data) if type(last) is Frame else 0
                self._retained = retained if retained >= _RETAINED_MIN else 0
            # Small frames and drained buffers are the common case: charge only when this
            # tunnel holds something or held something last time (write buffers are
            # charged when they fill, and on every keepalive tick).
            if self._inbound or self._retained or account.held:
                machine.charge()

    def _note_websocket_close(self) -> None:
        websocket = self.websocket
        sent, received = websocket.close_sent, websocket.close_rcvd
        if sent is not None and (received is None or not websocket.close_rcvd_then_sent):
            self.machine.websocket_closing(sent.code, sent.reason)
        elif received is not None:
            self.machine.websocket_closing(received.code, received.reason)

    def ws_lost(self, exc: Exception | None) -> None:
        machine = self.machine
        if machine.ws_lost:
            return
        websocket = self.websocket
        with contextlib.suppress(EOFError, AssertionError):
            websocket.receive_eof()  # fails harmlessly when already at EOF
        websocket.data_to_send()
        if machine.close_code is None:
            self._note_websocket_close()
        # websockets' parser generator holds the last frame and the protocol in a cycle
        # that only the cyclic GC frees: end it now, so the memory goes with the tunnel.
        websocket.parser.close()
        if websocket.parser_exc is not None:  # its traceback keeps the parser's frame
            traceback.clear_frames(websocket.parser_exc.__traceback__)
        self._retained = 0
        with contextlib.suppress(BufferError):
            self._inbound.clear()
        machine.websocket_lost(CloseCode.ABNORMAL, str(exc) if exc else "connection lost")

    # ------------------------------------------- TunnelIO: the machine's outputs

    def send_message(self, data: bytes) -> None:
        websocket = self.websocket
        try:
            websocket.send_binary(data)
        except InvalidState:
            return  # the WebSocket is closing: the peer will not read this
        transport = self.ws_transport
        if transport is not None:
            transport.writelines(websocket.data_to_send())

    def send_ping(self) -> None:
        if self.websocket.state is OPEN:
            self.websocket.send_ping(b"grpcbridge")
            self.flush_websocket()

    def send_close(self, code: int, reason: str) -> None:
        if self.websocket.state is OPEN:
            self.websocket.send_close(code, reason)
            self.flush_websocket()

    def fail_websocket(self, code: int, reason: str) -> None:
        if self.websocket.state is OPEN:
            self.websocket.fail(code, reason)
            self.flush_websocket()

    def held_inbound(self) -> int:
        return len(self._inbound) + self._retained


class WebSocketSide(asyncio.Protocol):
    """asyncio Protocol for the WebSocket connection of a tunnel."""

    __slots__ = ("_buffer_bytes", "tunnel")

    def __init__(self, tunnel: Tunnel, buffer_bytes: int) -> None:
        self.tunnel = tunnel
        self._buffer_bytes = buffer_bytes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        transport.set_write_buffer_limits(high=self._buffer_bytes)  # low (asyncio's): a quarter
        self.tunnel.ws_transport = transport

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
        self.tunnel.machine.websocket_write_paused()

    def resume_writing(self) -> None:
        self.tunnel.machine.websocket_write_resumed()


class StreamSide(asyncio.Protocol):
    """asyncio Protocol for the byte-stream connection of a tunnel."""

    __slots__ = ("_buffer_bytes", "machine", "tunnel")

    def __init__(self, tunnel: StreamAdapter, buffer_bytes: int) -> None:
        self.tunnel = tunnel
        self.machine = tunnel.machine
        self._buffer_bytes = buffer_bytes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        transport.set_write_buffer_limits(high=self._buffer_bytes)  # low (asyncio's): a quarter
        self.tunnel.attach_stream(transport)

    def data_received(self, data: bytes) -> None:
        self.machine.stream_data(data)

    def eof_received(self) -> bool | None:
        self.machine.stream_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.machine.stream_gone(exc is not None)

    def pause_writing(self) -> None:
        self.machine.stream_write_paused()

    def resume_writing(self) -> None:
        self.machine.stream_write_resumed()


async def keepalive_forever(
    tunnels: Callable[[], Sequence[StreamAdapter]],
    ping_interval: float,
    idle_timeout: float,
    on_tick: Callable[[], None] | None = None,
) -> None:
    """Tick every tunnel's machine, forever (cancel the task to stop): pings on quiet
    tunnels, idle timeouts, probes of paused peers and the memory account's refresh (the
    last two also when pings and the idle timeout are off).

    One task per server instead of one timer per tunnel keeps idle tunnels cheap.
    """
    interval = min([1.0, *(p / 4 for p in (ping_interval, idle_timeout) if p)])
    while True:
        await asyncio.sleep(interval)
        if on_tick is not None:
            on_tick()
        for tunnel in tunnels():
            tunnel.machine.tick(ping_interval, idle_timeout)
