"""Retiring long-lived tunnels with an HTTP/2 GOAWAY, sans-I/O (``--max-tunnel-age``).

A tunnel pins its client to the bridge process it first reached. gRPC servers rebalance
with MAX_CONNECTION_AGE: past a connection's age they send the graceful GOAWAY of RFC 9113
section 6.8 (last-stream-id 2^31-1, NO_ERROR), so the client opens no new streams on it and
dials again for new RPCs while those in flight finish; after a grace period the connection
is closed. The bridge does the same for every tunnel, whatever the backend:

* :class:`TunnelAge` (server side) follows the frame boundaries of the backend-to-client
  byte stream - HTTP/2 frames from its first byte, as a server sends no preface but a
  SETTINGS frame - and, once the tunnel's age is reached, inserts :data:`GOAWAY` between two
  frames: never before the server's first frame, never inside a frame and never inside a
  HEADERS/PUSH_PROMISE ... CONTINUATION sequence (RFC 9113 section 6.10). The backend never
  learns of it, which is fine: a GOAWAY a server sends changes only the client's state.
  If the backend sent a GOAWAY of its own, none is inserted: a second one with a higher
  last-stream-id is forbidden (RFC 9113 section 6.8) and grpc-go clients drop the whole
  connection on it. The grace starts when the client has a GOAWAY, and the tunnel closes
  with 1001 after it - at the latest ``age + 2 x grace``, so a stream stuck inside a frame
  still ends (its close reason then says no GOAWAY was sent). Only tunnels of a bridge with
  a maximum age pay for the tracking.
* :class:`GoawayFilter` (client side) takes graceful GOAWAY frames (NO_ERROR, on stream 0,
  no larger than the client's maximum frame size) out of the server's byte stream before
  h2 sees them and reports them: h2 4.x treats any GOAWAY as the end of the connection and
  fails the streams still open on it, where gRPC lets them finish. Any other GOAWAY goes on
  to h2, which answers it as RFC 9113 says (a protocol error, or the end of the connection).

The frames are built by hyperframe (a dependency of h2), never by hand.
"""

from __future__ import annotations

from collections.abc import Callable

from hyperframe.frame import GoAwayFrame

#: Largest HTTP/2 stream id: "every stream the client opened may still be processed".
LAST_STREAM_ID = 2**31 - 1
#: Jitter of a tunnel's maximum age, as gRPC's MAX_CONNECTION_AGE: +/- 10 %.
AGE_JITTER = 0.1
#: WebSocket close reason once the grace after the GOAWAY has passed (code 1001).
MAX_AGE_REASON = "tunnel reached its maximum age"
#: The close reason when no GOAWAY could be sent by ``age + 2 x grace`` (the backend's bytes
#: stayed inside one frame or header block all along).
MAX_AGE_NO_GOAWAY_REASON = "tunnel reached its maximum age (no GOAWAY sent: stuck mid-frame)"


#: The graceful GOAWAY the bridge sends (17 bytes; error code 0 is NO_ERROR).
GOAWAY = bytes(GoAwayFrame(0, last_stream_id=LAST_STREAM_ID, error_code=0).serialize())

#: An HTTP/2 frame header's size; HTTP/2's initial (and smallest) SETTINGS_MAX_FRAME_SIZE.
FRAME_HEADER_BYTES = 9
H2_MIN_FRAME_SIZE = 16_384
_HEADERS = 0x1
_PUSH_PROMISE = 0x5
_GOAWAY = 0x7
_CONTINUATION = 0x9
_END_HEADERS = 0x4


def jittered(seconds: float, random_unit: float, jitter: float = AGE_JITTER) -> float:
    """``seconds`` spread by +/- ``jitter`` (a fraction; ``random_unit`` in [0, 1) picks the
    point in the band): a tunnel's maximum age, a reconnection's backoff."""
    return seconds * (1 + jitter * (2 * random_unit - 1))


class FrameCursor:
    """Where an HTTP/2 frame stream is, fed in chunks of any size: inside a frame's header
    or payload, inside a header block (HEADERS or PUSH_PROMISE without END_HEADERS, up to the
    CONTINUATION that ends it), or between frames. It also notes whether a GOAWAY frame
    passed (:attr:`goaway_seen`)."""

    __slots__ = ("_head", "_in_block", "_need", "frames", "goaway_seen")

    def __init__(self) -> None:
        #: Payload bytes of the current frame still to come.
        self._need = 0
        #: Bytes of an incomplete frame header (fewer than 9).
        self._head = b""
        self._in_block = False
        #: Complete frames seen.
        self.frames = 0
        #: A GOAWAY frame's header passed.
        self.goaway_seen = False

    @property
    def at_boundary(self) -> bool:
        """Between two frames (after at least one), outside any header block: a frame
        may be inserted here."""
        return (not self._need and not self._head and not self._in_block
                and self.frames > 0)

    def advance(self, data: bytes, find: bool = False) -> int:
        """Move past ``data``. With ``find``, return the first offset in ``data`` (0 to
        ``len(data)``) that is a boundary :attr:`at_boundary` would accept and that comes
        before any GOAWAY frame, else -1."""
        size = len(data)
        need = self._need
        if need > size and not find:  # inside one payload: the common case, no parsing
            self._need = need - size
            return -1
        find = find and not self.goaway_seen
        found = 0 if find and self.at_boundary else -1
        pos = 0
        while True:
            if need:
                if need > size - pos:
                    self._need = need - (size - pos)
                    return found
                pos += need
                need = 0
                self.frames += 1
                if found < 0 and find and not self._in_block:
                    found = pos
            if pos == size:
                self._need = 0
                return found
            head = self._head
            if head or size - pos < FRAME_HEADER_BYTES:
                took = min(FRAME_HEADER_BYTES - len(head), size - pos)
                head += data[pos:pos + took]
                pos += took
                if len(head) < FRAME_HEADER_BYTES:
                    self._head = head
                    self._need = 0
                    return found
                self._head = b""
            else:
                head = data[pos:pos + FRAME_HEADER_BYTES]
                pos += FRAME_HEADER_BYTES
            need = int.from_bytes(head[:3], "big")
            kind = head[3]
            if kind in (_HEADERS, _PUSH_PROMISE, _CONTINUATION):
                self._in_block = not head[4] & _END_HEADERS
            elif kind == _GOAWAY:
                self.goaway_seen = True
                find = False  # no boundary after a GOAWAY is wanted any more
            if not need:  # a frame without payload ends with its header
                self.frames += 1
                if found < 0 and find and not self._in_block:
                    found = pos


class TunnelAge:
    """The maximum age of one server-side tunnel: the GOAWAY after ``max_age`` seconds
    (already jittered) by the ``clock``, the close ``grace`` seconds after the GOAWAY went
    out - or ``max_age + 2 x grace`` at the latest. The tunnel machine calls
    :meth:`outbound` with every chunk it sends to the client and :meth:`due` when
    :attr:`next_at` has passed; ``on_goaway`` runs once, when the tunnel starts retiring
    with a GOAWAY sent (the bridge's, or one the backend had sent)."""

    __slots__ = ("_clock", "_cursor", "close_at", "goaway_sent", "grace", "next_at",
                 "on_goaway", "retire_at")

    def __init__(self, clock: Callable[[], float], max_age: float, grace: float,
                 on_goaway: Callable[[], None] | None = None) -> None:
        self._clock = clock
        self._cursor = FrameCursor()
        self.retire_at = clock() + max_age
        self.grace = grace
        #: When the tunnel closes (set once the age is reached; earlier once the GOAWAY
        #: is sent).
        self.close_at: float | None = None
        #: The next time the machine must call :meth:`due` (None: nothing left to do).
        self.next_at: float | None = self.retire_at
        #: The client has a GOAWAY: the bridge's, or one the backend had sent (then the
        #: bridge inserts none).
        self.goaway_sent = False
        self.on_goaway = on_goaway

    @property
    def close_reason(self) -> str:
        """The reason of the 1001 close: it says whether the client got a GOAWAY."""
        return MAX_AGE_REASON if self.goaway_sent else MAX_AGE_NO_GOAWAY_REASON

    def outbound(self, data: bytes) -> bytes:
        """``data`` (backend bytes for the client) with the GOAWAY inserted at the first
        allowed frame boundary, once the age is reached and until it is sent (never after
        a GOAWAY of the backend's)."""
        cursor = self._cursor
        if self.goaway_sent or cursor.goaway_seen:  # nothing left to find: no parsing
            return data
        if self.close_at is None:
            cursor.advance(data)
            return data
        cut = cursor.advance(data, find=True)
        if cut < 0:
            if cursor.goaway_seen:  # the backend's GOAWAY went out: it stands for ours
                self._sent()
            return data
        self._sent()
        return data[:cut] + GOAWAY + data[cut:] if data else GOAWAY

    def _sent(self) -> None:
        self.goaway_sent = True
        close_at = self._clock() + self.grace
        if self.close_at is None or close_at < self.close_at:
            self.close_at = self.next_at = close_at
        if self.on_goaway is not None:
            self.on_goaway()

    def due(self, now: float) -> bool:
        """Time passed :attr:`next_at`: the age is reached (returns False; the machine then
        sends ``outbound(b"")`` if not empty) or the close is due (returns True: close the
        tunnel with 1001 and :attr:`close_reason`)."""
        if self.close_at is None:
            if now < self.retire_at:
                return False
            self.close_at = self.next_at = now + 2 * self.grace  # the latest close
            if self._cursor.goaway_seen:
                self._sent()
            return False
        if now < self.close_at:
            return False
        self.next_at = None
        return True


class GoawayFilter:
    """Takes graceful GOAWAY frames (error code NO_ERROR) out of a server's HTTP/2 byte
    stream, fed in chunks of any size; ``on_goaway(last_stream_id)`` is called for each.
    Other GOAWAY frames pass on to the HTTP/2 layer, which judges them: errors, and those
    h2 must refuse as RFC 9113 says - on a stream other than 0 (a PROTOCOL_ERROR), or larger
    than ``max_frame_size`` (the SETTINGS_MAX_FRAME_SIZE the client accepts: a
    FRAME_SIZE_ERROR). Bytes of an incomplete frame header, and of a GOAWAY frame until it is
    complete, are held back; everything else passes at once, in order."""

    __slots__ = ("_goaway", "_head", "_need", "max_frame_size", "on_goaway")

    def __init__(self, on_goaway: Callable[[int], None],
                 max_frame_size: int = H2_MIN_FRAME_SIZE) -> None:
        self.on_goaway = on_goaway
        self.max_frame_size = max_frame_size
        #: Payload bytes of the current frame still to come (passed on, or gathered).
        self._need = 0
        self._head = b""
        #: The GOAWAY frame being gathered (header included), or None.
        self._goaway: bytearray | None = None

    def feed(self, data: bytes) -> bytes:
        """The bytes of ``data`` to hand to the HTTP/2 layer."""
        need = self._need
        size = len(data)
        if need >= size and self._goaway is None:  # inside one payload: no parsing
            self._need = need - size
            return data
        out: list[bytes] = []
        pos = 0
        run = 0  # start of the bytes of data that pass on as they are
        while pos < size:
            if need:
                take = min(need, size - pos)
                if self._goaway is not None:
                    self._goaway += data[pos:pos + take]
                    run = pos + take
                pos += take
                need -= take
                if not need and self._goaway is not None:
                    self._goaway_done(out)
                continue
            head = self._head
            if head or size - pos < FRAME_HEADER_BYTES:  # a header split between chunks: held
                if pos > run:
                    out.append(data[run:pos])
                took = min(FRAME_HEADER_BYTES - len(head), size - pos)
                head += data[pos:pos + took]
                pos = run = pos + took
                if len(head) < FRAME_HEADER_BYTES:
                    self._head = head
                    break
                self._head = b""
                held = True
            else:
                head = data[pos:pos + FRAME_HEADER_BYTES]
                pos += FRAME_HEADER_BYTES
                held = False
            need = int.from_bytes(head[:3], "big")
            if head[3] == _GOAWAY and need <= self.max_frame_size \
                    and not int.from_bytes(head[5:9], "big") & LAST_STREAM_ID:
                if not held and pos - FRAME_HEADER_BYTES > run:
                    out.append(data[run:pos - FRAME_HEADER_BYTES])
                self._goaway = bytearray(head)
                run = pos
                if not need:
                    self._goaway_done(out)
            elif held:
                out.append(head)
        self._need = need
        if run < size:
            if not out:
                return data[run:] if run else data
            out.append(data[run:])
        return out[0] if len(out) == 1 else b"".join(out)

    def _goaway_done(self, out: list[bytes]) -> None:
        frame = self._goaway
        assert frame is not None
        self._goaway = None
        payload = frame[FRAME_HEADER_BYTES:]
        if len(payload) >= 8 and int.from_bytes(payload[4:8], "big") == 0:
            self.on_goaway(int.from_bytes(payload[:4], "big") & LAST_STREAM_ID)
        else:
            out.append(bytes(frame))
