"""WebSocket framing on picows for both ends (the bridge and the forwarder): Cython
framing under the tunnel machine.

The bridge reads the upgrade request and decides admission itself (websockets' sans-I/O
parser, the :class:`~grpcbridge.server.gate.Gate`, async auth hooks). Once it accepts, the
connection is handed to picows: its protocol replaces the bridge's on the transport, is fed
a canonical upgrade request carrying the client's key (so picows writes the 101 with the
headers the bridge chose) and then the bytes the client sent after its request. From there
picows parses frames in C and :class:`PicowsTunnel` feeds them to the
:class:`~grpcbridge.core.tunnel.TunnelMachine`, which keeps every tunnel rule.

What picows leaves to its user, done here: the closing handshake (it does not answer a
close frame), close codes (``send_close`` needs one, or 0 goes on the wire), reserved bits,
continuation-frame order and the size of fragmented messages, pings (answered here so they
count against the frame rate), and copies: a frame's payload is valid only inside the
callback, and a buffer handed to ``transport.write`` must never be reused (uvloop keeps a
reference instead of copying), so a payload is written to the stream socket from picows'
buffer during the callback when that socket has nothing queued (POSIX plain-socket
transports only), else copied out once; and
picows' zero-copy send for large messages is only used with a fresh buffer.

The forwarder's tunnels (the client end) run on the same adapter: picows writes the upgrade
request (:class:`ClientRequest`) on a connection the forwarder dialed (directly or through
a proxy, TLS end to end), parses the 101 and masks what it sends; the frame rules above are
the same at both ends, and picows refuses masked frames from a server itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

from picows import (
    WSAutoPingStrategy,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)
from picows.picows import WSProtocol  # type: ignore[attr-defined]
from websockets.server import ServerProtocol

from .core.limits import FRAMES_PER_TURN
from .core.stream import CloseCode, Opcode, message_too_big_reason
from .observability import log_event
from .relay import SocketTunnel

#: picows logs protocol errors at ERROR and every connection at INFO; the tunnel's own
#: ``tunnel_closed`` line carries the code and reason, so its logger stays quiet. A
#: LoggerAdapter (not a Logger) also keeps picows from creating a logger per connection.
_PICOWS_LOG = logging.LoggerAdapter(logging.getLogger("grpcbridge.picows"), {})
_PICOWS_LOG.logger.setLevel(logging.CRITICAL)

#: Initial read buffer: idle tunnels stay small (picows grows it as frames need).
READ_BUFFER = 2048
#: Most bytes taken from the socket per read.
READ_CHUNK = 64 * 1024
#: Messages up to this size are copied into picows' write buffer; larger ones are sent
#: from a fresh bytearray with room for the frame header (no reuse, so no corruption).
_COPY_LIMIT = 8192
_HEADROOM = bytearray(14)
#: A read buffer that grew past this is charged to the memory budget (it never shrinks).
_CHARGED_BUFFER = 64 * 1024
#: Most bytes of a refusal's body (an upgrade answered other than 101) a client waits for,
#: within its handshake timeout, before picows reads the answer: the server's reason.
REFUSAL_BODY = 1024
#: A client hands the upgrade answer to picows unread once it holds this much without the
#: end of the head (picows then refuses it as it would).
_ANSWER_HEAD_LIMIT = 16 * 1024


def _plain_socket_transports() -> frozenset[type]:
    """Transport classes known to write straight to a plain socket: a payload may be
    written to their socket's descriptor while their buffer is empty. TLS transports (and
    pipes, and whatever else a loop offers) are other classes; on Windows a socket is a
    handle, not a descriptor, so nothing qualifies there."""
    if os.name != "posix":
        return frozenset()
    from asyncio import selector_events
    kinds: set[type] = {selector_events._SelectorSocketTransport}  # type: ignore[attr-defined]
    with contextlib.suppress(ImportError):  # uvloop is optional
        from uvloop import loop as uvloop_loop
        kinds |= {uvloop_loop.TCPTransport,  # type: ignore[attr-defined]
                  uvloop_loop.UnixTransport}  # type: ignore[attr-defined]
    return frozenset(kinds)


_PLAIN_SOCKET_TRANSPORTS = _plain_socket_transports()

_BINARY = WSMsgType.BINARY
_CONTINUATION = WSMsgType.CONTINUATION
_TEXT = WSMsgType.TEXT
_NO_STATUS = 1005


class _Listener(WSListener):
    """picows' callbacks for one tunnel; the per-frame work lives here (the hot path)."""

    __slots__ = ("frames", "tunnel")

    def __init__(self, tunnel: PicowsTunnel) -> None:
        self.tunnel = tunnel
        #: Frames parsed in the current read.
        self.frames = 0

    def on_ws_connected(self, transport: WSTransport) -> None:
        # picows keeps the (canonical) request and the 101 for the connection's life:
        # their headers are not needed any more (a tenth of an idle tunnel's memory).
        transport.request.headers.clear()
        transport.response.headers.clear()
        self.tunnel.ws = transport
        self.tunnel.machine.websocket_opened()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        tunnel = self.tunnel
        try:
            self.frames += 1
            if frame.last_in_buffer:
                tunnel.partial = frame.tail_size
            if tunnel.failed:
                return
            if (frame.msg_type is _BINARY and frame.fin and tunnel.fragment < 0
                    and not (frame.rsv1 or frame.rsv2 or frame.rsv3
                             or transport.is_close_frame_sent)):
                if frame.payload_size:
                    tunnel.payload(frame)
                else:
                    tunnel.machine.empty_frame()
                return
            tunnel.other_frame(frame)
        except Exception as exc:  # a bug: picows would send 1011 with nothing logged
            log_event("tunnel_failed", logging.ERROR, request_id=tunnel.machine.request_id,
                      error=repr(exc))
            tunnel.machine.fail(CloseCode.INTERNAL_ERROR, "internal error")

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.tunnel.ws_lost(None)  # PicowsProtocol.connection_lost makes sure of it too

    def pause_writing(self) -> None:
        self.tunnel.machine.websocket_write_paused()

    def resume_writing(self) -> None:
        self.tunnel.machine.websocket_write_resumed()


@dataclass(frozen=True, slots=True)
class ClientRequest:
    """The upgrade request of a client tunnel, and the check of the server's answer."""

    #: ``host[:port]`` for the Host header, and the request target (path and query).
    authority: str
    resource: str
    #: Headers besides those picows writes (Host, Upgrade, Connection, Sec-WebSocket-*).
    headers: Sequence[tuple[str, str]]
    #: Called with the 101 response before the tunnel opens; raises to refuse it.
    check: Callable[[WSUpgradeResponse], None]
    #: High-water mark of the connection's write buffer.
    buffer_bytes: int


class PicowsProtocol(WSProtocol):  # type: ignore[misc]
    """picows' protocol (either end), counting the bytes of each read for the tunnel
    (partial frames, read buffer size) and giving the loop back after many frames.

    A client's (made with its ``request``, for the connection it dials) sends the request
    once connected; ``wait_until_handshake_complete()`` returns once the tunnel is open or
    the connection is gone (the tunnel's ``ws`` tells which), or raises what refused the
    answer (picows' ``WSHandshakeError``, or what ``request.check`` raised; a refusal's body
    is then in ``refusal_body`` unless picows had it all)."""

    __slots__ = ("answer", "answer_end", "buffer_bytes", "listener", "read_into", "refusal_body",
                 "tunnel")

    def __init__(self, tunnel: PicowsTunnel, *, response: WSUpgradeResponse | None = None,
                 request: ClientRequest | None = None) -> None:
        listener = _Listener(tunnel)
        factory: Callable[..., object]
        if request is None:
            assert response is not None
            accepted = WSUpgradeResponseWithListener(response, listener)
            factory = lambda _request: accepted  # noqa: E731
        else:
            def factory(_request: object, answer: WSUpgradeResponse) -> _Listener:
                request.check(answer)  # raised: picows disconnects, the dialer is told
                return listener
        super().__init__(
            request.authority if request else None,  # Host (client side)
            request.resource if request else "/",
            request is not None,  # client side: masks what it sends
            factory,
            _PICOWS_LOG,
            True,  # disconnect (1011) if a callback raises
            None,  # handshake timeout: the bridge, or the dialer, has its own
            False, 20.0, 20.0, WSAutoPingStrategy.PING_WHEN_IDLE,  # off: the machine pings
            False,  # auto pong: pings are answered (and rate-limited) by the tunnel
            tunnel.max_message_bytes,  # largest frame
            list(request.headers) if request else None,
            READ_BUFFER,
        )
        self.tunnel = tunnel
        self.listener = listener
        self.buffer_bytes = request.buffer_bytes if request else 0
        # A client holds the upgrade answer back from picows, which parses it as soon as its
        # head is complete and drops the connection if it is not a 101: the body (the
        # server's reason) would be lost when it comes in a later read. Reads go to
        # ``read_into`` and collect in ``answer`` until the head, and for a refusal its
        # body (up to REFUSAL_BODY, or the connection's end), are in; then picows gets them.
        self.answer: bytearray | None = bytearray() if request else None
        self.read_into: memoryview | None = memoryview(bytearray(READ_BUFFER)) if request \
            else None
        #: Where the held answer is complete (-1: its head has not all come yet).
        self.answer_end = -1
        #: A client's upgrade answered other than 101: its body (the server's reason; at
        #: most REFUSAL_BODY bytes), else None.
        self.refusal_body: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.tunnel.client:  # the connection is the tunnel's from the start
            transport = cast(asyncio.Transport, transport)
            transport.set_write_buffer_limits(high=self.buffer_bytes)  # low (asyncio's): a quarter
            self.tunnel.ws_transport = transport
        super().connection_made(transport)  # a client writes its upgrade request here

    def get_buffer(self, size_hint: int) -> memoryview:
        if self.read_into is not None:
            return self.read_into
        view = cast(memoryview, super().get_buffer(size_hint))
        # picows doubles its buffer whenever a read fills it, so a fast sender would grow
        # it without bound (it never shrinks): reads stay at READ_CHUNK, and the buffer at
        # about twice the largest frame plus one read.
        return view[:READ_CHUNK] if len(view) > READ_CHUNK else view

    def buffer_updated(self, nbytes: int) -> None:
        if self.read_into is not None:  # set and cleared with ``answer``
            self._hold_answer(self.read_into[:nbytes])
            return
        tunnel = self.tunnel
        listener = self.listener
        listener.frames = 0
        tunnel.partial += nbytes
        ws = tunnel.ws
        tunnel.closed_before = ws is not None and ws.is_close_frame_sent
        super().buffer_updated(nbytes)
        # picows may have doubled its buffer in there: account for what it holds now.
        tunnel.buffer_size = tunnel.partial + len(WSProtocol.get_buffer(self, -1))
        tunnel.read_done(listener.frames)

    def _hold_answer(self, data: memoryview) -> None:
        answer = self.answer
        assert answer is not None
        answer += data
        if self.answer_end < 0:
            head_end = answer.find(b"\r\n\r\n")
            if head_end < 0:
                if len(answer) > _ANSWER_HEAD_LIMIT:
                    self.release_answer()
                return
            lines = bytes(answer[:head_end]).split(b"\r\n")
            status = lines[0].split(b" ", 2)[1:2]
            if status == [b"101"]:
                self.release_answer()  # picows takes it, and any frames after it
                return
            body = REFUSAL_BODY  # until the connection ends, unless a length is given
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length" and value.strip().isdigit():
                    body = min(body, int(value))
            self.answer_end = head_end + 4 + body
        if len(answer) >= self.answer_end:
            self.release_answer()

    def release_answer(self) -> bool:
        """Hand what a client holds of the upgrade answer to picows, which completes or
        fails the handshake with it if its head is whole; True if it was a refusal (so
        picows has failed the handshake)."""
        answer = self.answer
        if answer is None:
            return False
        self.answer = self.read_into = None
        if self.answer_end >= 0:
            # A refusal: picows gets its head only (it fails the handshake as soon as it
            # has it, with whatever came in the same read as the body), the body is kept
            # for the error; what follows (past REFUSAL_BODY) is not read.
            head = answer.find(b"\r\n\r\n") + 4
            self.refusal_body = bytes(answer[head:self.answer_end])
            del answer[head:]
        self.feed([answer])
        return self.answer_end >= 0

    def connection_lost(self, exc: Exception | None) -> None:
        self.release_answer()  # a refusal's body ends with the connection
        try:
            super().connection_lost(exc)
        finally:  # picows skips on_ws_disconnected for a connection it never upgraded
            self.tunnel.ws_lost(exc)
            if self.tunnel.client:
                # picows keeps the protocol error it ended a client connection for until
                # wait_disconnected(), which nothing awaits (the close code reports it):
                # retrieve it, or asyncio logs "Future exception was never retrieved".
                waiter = asyncio.ensure_future(self.transport.wait_disconnected())
                waiter.add_done_callback(lambda done: done.cancelled() or done.exception())

    def feed(self, chunks: Iterable[bytes | bytearray]) -> None:
        """Deliver bytes as if read from the socket."""
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                buffer = self.get_buffer(-1)
                size = min(len(buffer), len(view))
                buffer[:size] = view[:size]
                view = view[size:]
                self.buffer_updated(size)


class PicowsTunnel(SocketTunnel):
    """A tunnel whose WebSocket side runs on picows (see the module docstring). On the
    bridge, until :meth:`upgrade`, ``websocket`` is the websockets protocol that parses the
    request and writes refusals; a forwarder's (client) tunnel has none. ``ws_transport``
    is the connection throughout."""

    __slots__ = (
        "buffer_size",
        "client",
        "closed_before",
        "failed",
        "fragment",
        "max_message_bytes",
        "partial",
        "stream_fd",
        "ws",
    )

    websocket: ServerProtocol | None

    def __init__(self, loop: asyncio.AbstractEventLoop, websocket: ServerProtocol | None, *,
                 stream_name: str, max_message_bytes: int) -> None:
        super().__init__(loop, stream_name)
        #: The client end of a tunnel (``websocket`` None): see :class:`PicowsProtocol`.
        self.client = websocket is None
        self.websocket = websocket
        self.max_message_bytes = max_message_bytes
        self.ws: WSTransport | None = None
        #: Bytes of the current fragmented message so far (-1: not in one).
        self.fragment = -1
        #: A close frame was sent for a violation or received: later frames are ignored.
        self.failed = False
        #: picows had sent a close frame before the current read.
        self.closed_before = False
        #: Bytes of an incomplete frame in picows' read buffer, and that buffer's size.
        self.partial = 0
        self.buffer_size = 0
        #: The stream side's socket, written to directly while its buffer is empty (-1: none).
        self.stream_fd = -1

    # ------------------------------------------------------------ handshake phase

    def upgrade(self, response_headers: Iterable[tuple[str, str]], key: str,
                early: list[bytes], eof: bool) -> None:
        """Accept: hand the connection to picows, which writes the 101 (with
        ``response_headers``) and parses ``early`` (bytes sent after the request) first."""
        transport = self.ws_transport
        assert transport is not None and self.websocket is not None
        # The handshake parser's generator keeps the protocol in a cycle: end it now.
        self.websocket.parser.close()
        self.websocket = None
        response = WSUpgradeResponse.create_101_response(extra_headers=[
            (name, value) for name, value in response_headers
            if name.lower() not in ("upgrade", "connection", "sec-websocket-accept")])
        protocol = PicowsProtocol(self, response=response)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        request = (b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n"
                   b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                   b"Sec-WebSocket-Key: " + key.encode("ascii") + b"\r\n\r\n")
        protocol.feed([request, *early])
        if eof:
            self._close_flushed()

    # ------------------------------------------------------------- frames, reads

    def attach_stream(self, transport: asyncio.Transport) -> None:
        # Only a plain socket's transport (an allowlist): bytes written past a TLS transport
        # would skip its encryption, and only on POSIX is a socket's fileno() a descriptor.
        sock = (transport.get_extra_info("socket")
                if type(transport) in _PLAIN_SOCKET_TRANSPORTS else None)
        self.stream_fd = sock.fileno() if sock is not None else -1
        super().attach_stream(transport)

    def payload(self, frame: WSFrame) -> None:
        """A binary message's payload, for the stream side. While nothing waits in the
        stream's write buffer it is written to the socket straight from picows' read buffer
        (no copy unless the socket takes only part of it); otherwise it is copied out."""
        machine = self.machine
        if (self.stream_fd < 0 or not machine.relaying_websocket  # (attached: fd >= 0)
                or self.stream_transport.is_closing()
                or self.stream_transport.get_write_buffer_size()):
            machine.data(frame.get_payload_as_bytes())
            return
        view = frame.get_payload_as_memoryview()
        try:  # the transport is open, so its descriptor is still this connection's
            written = os.write(self.stream_fd, view)
        except OSError:  # full (EAGAIN), or failed: the transport's own write reports it
            written = 0
        machine.bytes_from_websocket += written  # data() counts the rest
        if written < len(view):
            machine.data(bytes(view[written:]))

    def other_frame(self, frame: WSFrame) -> None:
        """Every frame but a whole binary message without reserved bits."""
        ws = self.ws
        if ws is not None and ws.is_close_frame_sent and self.machine.close_code is None:
            # picows closed for a framing error (a frame over the size limit, a bad opcode)
            # but goes on parsing until it disconnects. It parses a frame before delivering
            # the previous one: the last frame of the read in which it closed was whole and
            # valid, the rest is ignored.
            if frame.last_in_buffer and not self.closed_before:
                self.frame_rules(frame)
            self.picows_closed()
            return
        self.frame_rules(frame)

    def picows_closed(self) -> None:
        """picows sent a close frame itself and disconnects in a moment, after reading on
        (closing now, with its frame's payload unread, would reset the connection and lose
        the close frame); :meth:`ws_lost` then records its code. The close deadline covers a
        peer that never reads the close frame."""
        if self.failed or self.ws is None or self.machine.close_code is not None:
            return
        self.failed = True
        self.machine.websocket_flushing()

    def frame_rules(self, frame: WSFrame) -> None:
        machine = self.machine
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            machine.fail(CloseCode.PROTOCOL_ERROR, "reserved bits must be 0")
            return
        msg_type = frame.msg_type
        if msg_type is _BINARY or msg_type is _TEXT or msg_type is _CONTINUATION:
            if (msg_type is _CONTINUATION) is (self.fragment < 0):
                machine.fail(CloseCode.PROTOCOL_ERROR, "unexpected continuation frame"
                             if self.fragment < 0 else "expected a continuation frame")
                return
            size = max(self.fragment, 0) + frame.payload_size
            if size > self.max_message_bytes:
                machine.fail(CloseCode.MESSAGE_TOO_BIG,
                             message_too_big_reason(self.max_message_bytes))
                return
            self.fragment = -1 if frame.fin else size
            # A binary frame's payload goes where a continuation's does (data, or an empty
            # frame); a text frame fails the tunnel.
            machine.frame(Opcode.TEXT if msg_type is _TEXT else Opcode.CONTINUATION,
                          frame.get_payload_as_bytes())
        elif msg_type is WSMsgType.PING:
            if machine.empty_frame() and self.ws is not None:
                self.ws.send_pong(frame.get_payload_as_bytes())
        elif msg_type is WSMsgType.PONG:
            machine.empty_frame()
        elif msg_type is WSMsgType.CLOSE:
            ws = self.ws
            assert ws is not None
            payload = frame.get_payload_as_bytes()  # picows checked the code and the UTF-8
            code = int.from_bytes(payload[:2], "big") if payload else _NO_STATUS
            reason = payload[2:].decode()
            if payload and not (1000 <= code <= 1003 or 1007 <= code <= 1014
                                or 3000 <= code <= 4999):  # picows lets 0, 1006, >= 5000 by
                machine.fail(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
                return
            if not ws.is_close_frame_sent:  # the peer began: answer with its code (RFC 6455)
                if payload:
                    self.send_close(code, reason)
                else:
                    ws.send(WSMsgType.CLOSE, b"")
                machine.websocket_closing(code, reason)
            self.failed = True
            # The closing handshake is complete: close the connection once flushed.
            self._close_flushed()

    def read_done(self, frames: int) -> None:
        """After each read: idle-timeout activity, the loop's turn and the memory budget."""
        machine = self.machine
        ws = self.ws
        if ws is not None and ws.is_close_frame_sent and not self.failed:
            self.picows_closed()  # no frame came after picows' close to tell us
        machine.received(frames, self.partial)
        if frames > FRAMES_PER_TURN and machine.close_code is None:
            self._yield_turn()
        account = machine.account
        if account is not None and (self.partial or account.held
                                    or self.buffer_size > _CHARGED_BUFFER):
            machine.charge()

    # ------------------------------------------------- the connection's callbacks

    def ws_lost(self, exc: Exception | None) -> None:
        machine = self.machine
        if machine.ws_lost:
            return
        if self.websocket is not None:  # lost during the handshake
            self.websocket.parser.close()
            self.websocket = None
        ws = self.ws
        if machine.close_code is None and ws is not None and ws.close_handshake is not None:
            sent = ws.close_handshake.sent  # picows failed the connection itself
            if sent is not None:
                machine.websocket_closing(int(sent.code.value), sent.reason)
        self.partial = self.buffer_size = 0
        machine.websocket_lost(CloseCode.ABNORMAL, str(exc) if exc else "connection lost")

    # ------------------------------------------------- TunnelIO: the machine's outputs

    def send_message(self, data: bytes) -> None:
        ws = self.ws
        if ws is None:
            return
        if len(data) <= _COPY_LIMIT:
            ws.send(_BINARY, data)
        else:
            ws.send_reuse_external_bytearray(_BINARY, _HEADROOM + data, 14)

    def send_ping(self) -> None:
        ws = self.ws
        if ws is not None and not ws.is_close_frame_sent:
            ws.send_ping(b"grpcbridge")

    def send_close(self, code: int, reason: str) -> None:
        ws = self.ws
        if ws is None or ws.is_close_frame_sent or self.failed:
            return
        # picows' WSCloseCode is a C enum: it takes any int (its stub says otherwise).
        ws.send_close(code, reason.encode())  # type: ignore[arg-type]

    def fail_websocket(self, code: int, reason: str) -> None:
        self.send_close(code, reason)
        self.failed = True
        self._close_flushed()

    def held_inbound(self) -> int:
        if self.websocket is not None:
            return len(self.websocket.reader.buffer)
        size = self.buffer_size
        return size if size > _CHARGED_BUFFER else self.partial

