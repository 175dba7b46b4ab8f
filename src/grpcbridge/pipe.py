"""In-memory connection between a tunnel's stream side and an in-process asyncio Protocol.

A grpclib ``H2Protocol`` (server or client) normally sits on a socket transport. Here it gets
a :class:`ProtocolTransport` whose writes go straight into the tunnel's WebSocket, while the
tunnel writes received stream bytes straight into the protocol's ``data_received``. No socket,
no copy, no task: the same :class:`~grpcbridge.relay.Tunnel` rules and close paths apply.

Writes made during one event-loop iteration are sent as one WebSocket message (fewer
messages, masks and frame headers per RPC; boundaries carry no meaning on the wire).

Backpressure: when the WebSocket's write buffer fills, the tunnel pauses its stream side,
which here means calling the protocol's ``pause_writing`` (grpclib then waits before sending
more DATA). Inbound memory is bounded by HTTP/2 flow control, as on a socket.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from .core.wire import COALESCE_LIMIT as COALESCE_LIMIT  # defined once, for the browser too
from .relay import StreamAdapter


class ProtocolTransport(asyncio.Transport):
    """The transport an in-process protocol writes to (its end of the pipe)."""

    def __init__(self, pipe: Pipe, extra: dict[str, Any]) -> None:
        super().__init__(extra)
        self._pipe = pipe
        self._held: list[bytes] = []
        #: Bytes written in the current loop iteration, not yet sent.
        self.held_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue a write: what is written during one loop iteration leaves as one WebSocket
        message, sent at once at ``COALESCE_LIMIT`` bytes (see there), as grpclib writes each
        HTTP/2 frame separately (HEADERS, DATA, WINDOW_UPDATE, trailers)."""
        if self._pipe.closed:
            return  # like a socket transport after close(): silently ignored
        data = bytes(data)
        if self._held and self.held_bytes + len(data) > COALESCE_LIMIT:
            self.flush()
        if not self._held:
            self._pipe.tunnel.loop.call_soon(self.flush)
        self._held.append(data)
        self.held_bytes += len(data)
        if self.held_bytes >= COALESCE_LIMIT:
            self.flush()

    def flush(self) -> None:
        if not self._held:
            return
        data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
        self._held.clear()
        self.held_bytes = 0
        if not self._pipe.closed:
            self._pipe.tunnel.machine.stream_data(data)

    def is_closing(self) -> bool:
        return self._pipe.closed

    def close(self) -> None:
        """The in-process side closed: send what it wrote, then close the pipe."""
        if not self._pipe.closed:
            self.flush()
            self._pipe.close()

    abort = close

    def get_write_buffer_size(self) -> int:
        return self.held_bytes + self._pipe.tunnel.websocket_buffered()


class Pipe(asyncio.Transport):
    """Connects ``tunnel``'s stream side to ``protocol`` at once: ``connection_made`` on the
    protocol, then the pipe attaches to the tunnel (which delivers any stream bytes that
    arrived before). Closing either end closes both. The pipe itself is the transport the
    tunnel writes stream bytes to (its end of the pipe)."""

    def __init__(self, tunnel: StreamAdapter, protocol: asyncio.Protocol,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.tunnel = tunnel
        self.protocol = protocol
        self.closed = False
        self.paused = False
        protocol.connection_made(ProtocolTransport(self, extra or {}))
        tunnel.attach_stream(self)

    # ------------------------------------- the tunnel's end: its stream transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closed:
            # bytes and bytearray go through uncopied (the tunnel never reuses them).
            self.protocol.data_received(
                bytes(data) if isinstance(data, memoryview) else cast(bytes, data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        """Either end closed (the tunnel's: WebSocket gone or closing): tell the protocol
        and the tunnel's machine, soon."""
        if self.closed:
            return
        self.closed = True
        loop = self.tunnel.loop
        loop.call_soon(self.protocol.connection_lost, None)
        loop.call_soon(self.tunnel.machine.stream_gone, False)

    abort = close

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        if not self.closed and not self.paused:
            self.paused = True
            self.protocol.pause_writing()

    def resume_reading(self) -> None:
        if not self.closed and self.paused:
            self.paused = False
            self.protocol.resume_writing()
