"""The rules of one tunnel, sans-I/O: a WebSocket (messages) on one side, a byte stream on the
other, and what happens between them from open to close.

:class:`TunnelMachine` knows nothing of sockets, event loops or WebSocket framing. Its adapters
(the asyncio relay of the bridge and the forwarder, the ASGI app's tunnel and the browser's
WebSocket transport) feed it inputs - a data message arrived, stream bytes arrived, a side was
lost, a write buffer filled or drained, the clock advanced - and carry out its outputs through
a :class:`TunnelIO` it implements: send a message or a ping, write to the stream, pause or
resume reading a side, close or abort a side. It reads time from a clock the adapter gives (the
event loop's, or a fake one in tests) and says when it next needs
:meth:`~TunnelMachine.timer_fired` (:attr:`TunnelMachine.deadline`, armed through
:meth:`TunnelIO.set_timer`).

Rules kept here, once:

* Bytes are never dropped while both sides live: stream bytes that arrive before the
  WebSocket is open, and WebSocket bytes before the stream side is attached, wait in order.
* Inbound messages: binary payloads go to the stream as they are; text is a violation
  (1003); frames without payload (ping, pong, close, empty data) are rate-limited (1008).
* The close code is set once, by whichever path closes first; closing is idempotent from
  every path, and after :attr:`TunnelState.CLOSED` every input is a no-op.
* A side being closed gets ``close_timeout`` to flush what is buffered for it, extended
  while it keeps draining, then it is aborted: nothing waits forever on a peer that stopped
  reading.
* Keepalive: pings on quiet tunnels and, every ``probe_interval``, while the WebSocket is
  paused for backpressure (a vanished peer is only noticed by writing to it); an idle
  timeout counting only complete frames or real progress on a partial one.
* Maximum age (servers, when set: :meth:`TunnelMachine.retire_after`): a graceful HTTP/2
  GOAWAY goes to the client at a frame boundary once the age is reached (none if the
  backend sent one), and the tunnel closes with 1001 the grace after it, ``age + 2 x grace``
  at the latest (:mod:`grpcbridge.core.age`).
* Memory: what the tunnel holds (incomplete message, both write buffers, the last frame
  the framing layer keeps) is charged to a :class:`~grpcbridge.core.limits.BudgetAccount`;
  over budget closes with 1008.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Protocol

from .age import TunnelAge
from .limits import PROGRESS_BYTES, BudgetAccount, FrameRate
from .stream import CloseCode, Opcode, fit_close_reason

#: Seconds a closing side gets to flush (and the peer to answer a close frame).
CLOSE_TIMEOUT = 2.0
#: Seconds between pings to a peer whose reading is paused for backpressure.
PROBE_INTERVAL = 1.0


class TunnelState(enum.Enum):
    """Where a tunnel is in its life."""

    #: The WebSocket handshake or the stream side's connection is not complete yet.
    CONNECTING = "connecting"
    #: Both sides connected: bytes flow both ways.
    OPEN = "open"
    #: A close began (from either side or a rule); sides are flushing and closing.
    CLOSING = "closing"
    #: Both sides are gone; every input is a no-op.
    CLOSED = "closed"


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Scheduler(Protocol):
    """What :meth:`TunnelIO.set_timer` needs of an event loop (asyncio's has it)."""

    def call_at(self, when: float, callback: Callable[[], object], /) -> Cancellable: ...


class TunnelIO(Protocol):
    """What an adapter does on behalf of a :class:`TunnelMachine` (adapters subclass it).

    Every adapter carries out the outputs with empty bodies (mypy takes them as abstract).
    The others default to nothing, for the adapters that cannot or need not act on them: a
    browser cannot send pings, stop reading a socket or end one early (the machine gets no
    ping interval there, and HTTP/2 flow control bounds what it reads); a framing layer
    that hands over only whole messages (the browser's, an ASGI server's) holds nothing; a
    stream side that takes bytes at once buffers nothing. :meth:`set_timer` arms the timer
    on the adapter's ``loop`` (any :class:`Scheduler`; the machine keeps its handle).
    """

    __slots__ = ()

    machine: TunnelMachine
    loop: Scheduler

    def send_message(self, data: bytes) -> None:
        """Send ``data`` as one binary WebSocket message."""

    def send_ping(self) -> None:
        return None

    def send_close(self, code: int, reason: str) -> None:
        """Start the WebSocket closing handshake."""

    def fail_websocket(self, code: int, reason: str) -> None:
        """Close for a protocol violation: close frame, then no further frames processed."""

    def abort_websocket(self) -> None: ...

    def finish_websocket(self) -> None:
        """Close the WebSocket connection once what is buffered for it is sent, without
        waiting for the peer's close frame."""
        return None

    def pause_websocket(self) -> None:
        return None

    def resume_websocket(self) -> None:
        return None

    def websocket_buffered(self) -> int:
        """Bytes waiting to be sent on the WebSocket."""

    def write_stream(self, data: bytes) -> None: ...

    def close_stream(self) -> None:
        """Close the stream side after flushing what it has buffered."""

    def abort_stream(self) -> None: ...

    def pause_stream(self) -> None: ...

    def resume_stream(self) -> None: ...

    def stream_buffered(self) -> int:
        """Bytes waiting to be written to the stream side."""
        return 0

    def held_inbound(self) -> int:
        """Bytes the framing layer holds for the WebSocket: an incomplete frame, and the
        last frame if it keeps one referenced."""
        return 0

    def set_timer(self, deadline: float | None) -> None:
        """Call :meth:`TunnelMachine.timer_fired` at ``deadline`` (None: no timer needed).
        Called only when the deadline changes: an armed timer stays armed."""
        machine = self.machine
        if machine.timer is not None:
            machine.timer.cancel()
        machine.timer = (None if deadline is None
                         else self.loop.call_at(deadline, machine.timer_fired))

    def tunnel_closed(self) -> None:
        """Both sides are gone: the tunnel reached :attr:`TunnelState.CLOSED`."""
        return None


class TunnelMachine:
    """State and rules of one tunnel (see the module docstring).

    ``stream_name`` names the stream side in close reasons (``"backend"``, ``"client"``);
    ``clock`` returns seconds on a monotonic clock.
    """

    __slots__ = (
        "_early",
        "_frame_rate",
        "_in_text",
        "_io",
        "_last_ping",
        "_pending",
        "_progress_mark",
        "_stream_buffer_at",
        "_stream_deadline",
        "_ws_buffer_at",
        "_ws_deadline",
        "account",
        "age",
        "bytes_from_websocket",
        "bytes_to_websocket",
        "clock",
        "close_code",
        "close_reason",
        "close_timeout",
        "dialing",
        "last_inbound",
        "opened_at",
        "pending_bytes",
        "pending_limit",
        "request_id",
        "state",
        "stream_attached",
        "stream_closing",
        "stream_lost",
        "stream_name",
        "timer",
        "ws_lost",
        "ws_open",
        "ws_paused",
    )

    def __init__(self, io: TunnelIO, *, clock: Callable[[], float], stream_name: str,
                 close_timeout: float = CLOSE_TIMEOUT) -> None:
        now = clock()
        self._io = io
        self.clock = clock
        self.stream_name = stream_name
        self.close_timeout = close_timeout
        self.state = TunnelState.CONNECTING
        self.ws_open = False
        self.ws_lost = False
        #: Reading the WebSocket is paused because the stream side is not keeping up.
        self.ws_paused = False
        self.stream_attached = False
        self.stream_closing = False
        self.stream_lost = False
        #: The stream side is being connected (the tunnel cannot be CLOSED before it is
        #: attached or given up: :meth:`stream_never_attached`).
        self.dialing = False
        #: The bridge's request id for this tunnel (its log lines carry it); "" elsewhere.
        self.request_id = ""
        #: A text message began: its continuations are refused too.
        self._in_text = False
        self._pending: list[bytes] = []
        #: WebSocket bytes waiting for the stream side to be attached.
        self.pending_bytes = 0
        self._early: list[bytes] = []
        self._frame_rate = FrameRate(now)
        self._progress_mark = 0
        self._ws_deadline: float | None = None
        self._ws_buffer_at = 0
        self._stream_deadline: float | None = None
        self._stream_buffer_at = 0
        self.opened_at = now
        self.last_inbound = now
        self._last_ping = now
        #: Set once closing began (ours, the peer's or the network's): why the tunnel closed.
        self.close_code: int | None = None
        self.close_reason = ""
        self.bytes_from_websocket = 0
        self.bytes_to_websocket = 0
        #: Share of a server's memory budget (None: not accounted). The machine closes it
        #: when the WebSocket is lost (the one place: every tunnel ends through there).
        self.account: BudgetAccount | None = None
        #: Most WebSocket bytes held before the stream side is attached; beyond it the
        #: tunnel fails with 1009 (None: no limit of its own, the budget account decides).
        self.pending_limit: int | None = None
        #: The tunnel's maximum age (None: it has none; see :meth:`retire_after`).
        self.age: TunnelAge | None = None
        #: The timer :meth:`TunnelIO.set_timer` armed (None: none).
        self.timer: Cancellable | None = None

    # ----------------------------------------------------------------- queries

    @property
    def deadline(self) -> float | None:
        """The next time :meth:`tick` must run for a close deadline (keepalive ticks are
        the adapter's periodic sweep)."""
        ws, stream = self._ws_deadline, self._stream_deadline
        age = self.age
        if age is not None and age.next_at is not None and self.close_code is None:
            ws = age.next_at if ws is None else min(ws, age.next_at)
        if ws is None:
            return stream
        return ws if stream is None else min(ws, stream)

    # ------------------------------------------------------------ maximum age

    def retire_after(self, max_age: float, grace: float,
                     on_goaway: Callable[[], None] | None = None) -> None:
        """Give the tunnel a maximum age (the module docstring's rule): ``max_age`` seconds
        from now (jitter already applied), closing ``grace`` after the GOAWAY; ``on_goaway``
        runs if the backend sent one. Call it before any stream byte is sent (the frame
        boundaries of the stream side's bytes are followed from the first one)."""
        self.age = TunnelAge(self.clock, max_age, grace, on_goaway)
        self._io.set_timer(self.deadline)

    # ------------------------------------------------------- WebSocket inputs

    def websocket_opened(self) -> None:
        """The WebSocket handshake completed."""
        if self.ws_open or self.ws_lost:
            return
        self.ws_open = True
        self.last_inbound = self._last_ping = self.clock()
        if self.close_code is not None:  # closed while the handshake was under way
            self._io.send_close(self.close_code, "")
            self.websocket_flushing()
            return
        early, self._early = self._early, []
        for chunk in early:
            self._send(chunk)
        if self.stream_attached:
            self.state = TunnelState.OPEN
            self._io.resume_stream()

    def data(self, payload: bytes) -> None:
        """Payload of a binary data frame (or of a continuation of one): stream bytes."""
        if self.relaying_websocket:
            self._io.write_stream(payload)
        elif self.stream_attached or self.state is TunnelState.CLOSED:
            # the stream side is going (or gone): nobody will read these bytes
            return
        else:
            self._pending.append(payload)
            self.pending_bytes += len(payload)
            limit = self.pending_limit
            if limit is not None and self.pending_bytes > limit:
                self.fail(CloseCode.MESSAGE_TOO_BIG,
                          f"more than {limit} bytes arrived before the connection was set up")
        self.bytes_from_websocket += len(payload)

    @property
    def relaying_websocket(self) -> bool:
        """WebSocket payloads go to the stream side as they come (:meth:`data` writes them
        at once): an adapter may then write them itself, without a copy for
        :meth:`TunnelIO.write_stream`, and count them in ``bytes_from_websocket``."""
        return self.stream_attached and not self.stream_closing

    def frame(self, opcode: Opcode, payload: bytes) -> bool:
        """A data frame other than a whole binary message's (those may go straight to
        :meth:`data`): text, or a continuation. False when it breaks the wire rules (a text
        message, or a continuation of one): the tunnel is then failing with 1003. Fragmented
        messages are taken frame by frame, so a large message is never buffered whole."""
        if opcode is Opcode.TEXT or self._in_text:
            self._in_text = True
            self.fail(CloseCode.UNSUPPORTED_DATA,
                      "text message received; grpcbridge carries HTTP/2 in binary messages only")
            return False
        if payload:
            self.data(payload)
            return True
        return self.empty_frame()

    def empty_frame(self) -> bool:
        """A frame without stream bytes (ping, pong, close, empty data). False when the
        peer exceeded the rate: the tunnel is then failing with 1008."""
        if self._frame_rate.allow(self.clock()):
            return True
        self.fail(CloseCode.POLICY_VIOLATION, "too many control or empty frames")
        return False

    def received(self, frames: int, partial: int) -> None:
        """After a read: ``frames`` complete frames were parsed and ``partial`` bytes of an
        incomplete one are held. Complete frames, or 64 KiB of progress on a partial one,
        count as activity for the idle timeout (a trickle into a huge frame does not)."""
        if frames or partial - self._progress_mark >= PROGRESS_BYTES:
            self.last_inbound = self.clock()
            self._progress_mark = partial

    def websocket_closing(self, code: int, reason: str) -> None:
        """The WebSocket began closing (a close frame was sent or received): record why."""
        self._set_close(code, reason)
        self._begin_closing()

    def websocket_lost(self, code: int, reason: str) -> None:
        """The WebSocket connection is gone. ``code``/``reason`` are used if no close was
        recorded before (1006 for a connection lost without a closing handshake)."""
        if self.ws_lost:
            return
        self.ws_lost = True
        if self._ws_deadline is not None:
            self._ws_deadline = None
            self._io.set_timer(self.deadline)
        self._early.clear()
        self._set_close(code, reason)
        self._begin_closing()
        if self.account is not None:
            self.account.close()
        self._maybe_closed()

    def websocket_write_paused(self) -> None:
        """The WebSocket's write buffer is full: stop reading the stream side."""
        if self.relaying_websocket:
            self._io.pause_stream()
        self.charge()

    def websocket_write_resumed(self) -> None:
        if self.relaying_websocket and self.ws_open:
            self._io.resume_stream()
        self.charge()

    # ---------------------------------------------------------- stream inputs

    def stream_attached_now(self) -> None:
        """The stream side connected: bytes that arrived from the WebSocket before go to it
        first. If the WebSocket is not open yet, reading the stream waits for it."""
        if self.stream_attached:
            return
        self.stream_attached = True
        self.dialing = False
        pending, self._pending = self._pending, []
        self.pending_bytes = 0
        if self.close_code is not None:  # closing (a lost WebSocket has a code too)
            self._close_stream()
            return
        if not self.ws_open:
            self._io.pause_stream()
        for chunk in pending:
            if self.stream_closing:
                break  # the stream side closed while taking earlier bytes: drop the rest
            self._io.write_stream(chunk)
        if self.ws_open and self.close_code is None:
            self.state = TunnelState.OPEN
        self.resume_websocket()

    def stream_data(self, data: bytes) -> None:
        """Bytes from the stream side, for the WebSocket."""
        if self.ws_open and self.close_code is None:
            self._send(data)
        elif not self.ws_open and self.close_code is None:  # (a lost WebSocket has a code)
            # Event loops may deliver data despite a pause (uvloop does): keep it, in
            # order, until the handshake completes. Never drop.
            self._early.append(data)
            self._io.pause_stream()
        # otherwise the WebSocket is closing: the peer will not read this

    def stream_eof(self) -> None:
        self.close(CloseCode.NORMAL, f"{self.stream_name} closed the connection")

    def stream_gone(self, error: bool) -> None:
        """The stream side's connection is gone (``error``: lost rather than closed)."""
        if self.stream_lost:
            return
        self.stream_lost = self.stream_closing = True
        if self._stream_deadline is not None:
            self._stream_deadline = None
            self._io.set_timer(self.deadline)
        if error:
            self.close(CloseCode.INTERNAL_ERROR, f"{self.stream_name} connection lost")
        else:
            self.stream_eof()
        if self.ws_open and not self.ws_lost:
            # Nothing more will come from the stream side and nothing the peer sends can be
            # delivered: once our close frame (and what precedes it) is out, end the
            # connection instead of waiting for the peer's close frame.
            self._io.finish_websocket()
        self._maybe_closed()

    def stream_write_paused(self) -> None:
        """The stream side's write buffer is full: stop reading the WebSocket."""
        self.pause_websocket()
        self.charge()

    def stream_write_resumed(self) -> None:
        self.resume_websocket()
        self.charge()

    def stream_never_attached(self) -> None:
        """Connecting the stream side failed or was abandoned."""
        self.dialing = False
        if not self.stream_attached:
            self._pending.clear()
            self.pending_bytes = 0
            self._maybe_closed()

    # ------------------------------------------------------------ pause/resume

    def pause_websocket(self) -> None:
        if not self.ws_lost and not self.ws_paused:
            self.ws_paused = True
            self._io.pause_websocket()

    def resume_websocket(self) -> None:
        if not self.ws_lost and self.ws_paused:
            self.ws_paused = False
            self._io.resume_websocket()

    # ------------------------------------------------------------------ close

    def close(self, code: int, reason: str) -> None:
        """Close both sides; the WebSocket with ``code`` and ``reason``. Idempotent."""
        self._end(code, reason, reason, failing=False)

    def fail(self, code: int, reason: str, *, detail: str | None = None) -> None:
        """Fail the WebSocket for a violation (no further frames are processed). ``reason``
        goes on the wire (keep it short); ``detail``, if given, to the logs."""
        self._end(code, reason, detail or reason, failing=True)

    def _end(self, code: int, reason: str, logged: str, *, failing: bool) -> None:
        """:meth:`close` and :meth:`fail`: the first call decides the code and what is sent;
        every call closes the stream side."""
        if self.state is TunnelState.CLOSED:
            return
        if self.close_code is None:
            self._set_close(code, logged)
            if not self.ws_lost:
                if not self.ws_open:
                    self._io.abort_websocket()
                elif failing:
                    self._io.fail_websocket(code, fit_close_reason(reason))
                else:
                    self._io.send_close(code, fit_close_reason(reason))
                    # Read the peer's close frame even if reading was paused for backpressure.
                    self.resume_websocket()
                self.websocket_flushing()
        self._begin_closing()

    def abort(self) -> None:
        """Drop both sides now, without waiting for buffers or handshakes."""
        self._set_close(CloseCode.ABNORMAL, "aborted")
        if self._ws_deadline is not None or self._stream_deadline is not None:
            self._ws_deadline = self._stream_deadline = None
            self._io.set_timer(None)
        if not self.ws_lost:
            self._io.abort_websocket()
        if self.stream_attached and not self.stream_lost:
            self.stream_closing = True
            self._io.abort_stream()
        self._begin_closing()

    def _set_close(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason

    def _begin_closing(self) -> None:
        if self.state is not TunnelState.CLOSED:
            self.state = TunnelState.CLOSING
        self._close_stream()

    def _close_stream(self) -> None:
        if not self.stream_attached or self.stream_closing:
            return
        self.stream_closing = True
        self._stream_buffer_at = self._io.stream_buffered()
        self._io.close_stream()
        if self._stream_buffer_at:
            self._stream_deadline = self.clock() + self.close_timeout
            self._io.set_timer(self.deadline)

    def websocket_flushing(self) -> None:
        """The WebSocket closes once flushed (our close frame is out, or the framing layer is
        done: closing handshake complete or failed): arm its close deadline."""
        if not self.ws_lost and self._ws_deadline is None:
            self._ws_buffer_at = self._io.websocket_buffered()
            self._ws_deadline = self.clock() + self.close_timeout
            self._io.set_timer(self.deadline)

    def _maybe_closed(self) -> None:
        if self.state is TunnelState.CLOSED or not self.ws_lost or self.dialing:
            return
        if self.stream_lost or not self.stream_attached:
            self.state = TunnelState.CLOSED
            self._pending.clear()  # never attached: nobody will take these
            self._io.tunnel_closed()

    # ------------------------------------------------------------------- time

    def tick(self, ping_interval: float = 0.0, idle_timeout: float = 0.0) -> None:
        """Time passed: close deadlines, keepalive (pings, probes, idle timeout) and a
        refresh of the memory account (buffers drain without telling anyone)."""
        now = self.clock()
        before = self.deadline
        age = self.age
        if age is not None and age.next_at is not None and now >= age.next_at \
                and self.close_code is None:
            if age.due(now):
                self.close(CloseCode.GOING_AWAY, age.close_reason)
            elif self.ws_open and not age.goaway_sent:
                goaway = age.outbound(b"")  # empty unless at a frame boundary now
                if goaway:
                    self._send(goaway)
        # A side's deadline exists only while it lives (losing it clears the deadline).
        if self._ws_deadline is not None and now >= self._ws_deadline:
            self._ws_deadline, self._ws_buffer_at = self._next_deadline(
                now, self._io.websocket_buffered(), self._ws_buffer_at)
            if self._ws_deadline is None:
                self._set_close(CloseCode.ABNORMAL, "close timed out")
                self._io.abort_websocket()
        if self._stream_deadline is not None and now >= self._stream_deadline:
            self._stream_deadline, self._stream_buffer_at = self._next_deadline(
                now, self._io.stream_buffered(), self._stream_buffer_at)
            if self._stream_deadline is None:
                self._io.abort_stream()
        if self.deadline != before:
            # Only on a change: the keepalive sweep ticks every aged tunnel each second. A
            # timer that fired a little early is set again by timer_fired.
            self._io.set_timer(self.deadline)
        if self.ws_open and self.close_code is None:
            quiet = now - self.last_inbound
            since_ping = now - self._last_ping
            if idle_timeout and quiet >= idle_timeout:
                self.close(CloseCode.GOING_AWAY, "idle timeout")
            elif ((ping_interval and quiet >= ping_interval and since_ping >= ping_interval)
                  or (self.ws_paused and since_ping >= PROBE_INTERVAL)):
                # While reading is paused (the stream side is not keeping up), a peer that
                # went away goes unnoticed until something is written to it: probe it.
                self._last_ping = now
                self._io.send_ping()
        self.charge()

    def timer_fired(self) -> None:
        """The timer the machine asked for ran: :meth:`tick`, and ask for it again when the
        deadline stayed (the loop ran it a hair early, so the tick did nothing)."""
        self.timer = None
        deadline = self.deadline
        self.tick()
        if deadline is not None and self.deadline == deadline:
            self._io.set_timer(deadline)

    def _next_deadline(self, now: float, left: int, buffer_at: int) -> tuple[float | None, int]:
        """A side's close deadline passed with ``left`` bytes still buffered (``buffer_at``
        when it was set): one still draining is a slow reader, not a dead one, and gets
        another ``close_timeout`` (the new deadline and mark); otherwise (None, unchanged)
        the side is aborted."""
        if 0 < left < buffer_at:
            return now + self.close_timeout, left
        return None, buffer_at

    # ----------------------------------------------------------------- memory

    def charge(self) -> None:
        """Report what the tunnel holds to its budget account; over budget: close 1008."""
        account = self.account
        if account is None:
            return
        io = self._io
        held = io.held_inbound() + self.pending_bytes
        if self.relaying_websocket:
            held += io.stream_buffered()
        if not self.ws_lost:
            held += io.websocket_buffered()
        reason = account.charge(held)
        if reason is not None and self.close_code is None:
            self.fail(CloseCode.POLICY_VIOLATION, reason.partition(" (")[0], detail=reason)

    # ------------------------------------------------------------------ output

    def _send(self, data: bytes) -> None:
        age = self.age
        if age is not None:
            sent = age.goaway_sent
            data = age.outbound(data)
            if age.goaway_sent is not sent:  # the grace starts now: the close comes sooner
                self._io.set_timer(self.deadline)
        self.bytes_to_websocket += len(data)
        self._io.send_message(data)
