"""The sans-I/O tunnel machine (grpcbridge.core.tunnel) under a fake clock and a recording
adapter: no sockets, no sleeps. Hypothesis drives random interleavings of inputs and
buffer levels and checks the invariants every adapter relies on."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grpcbridge.core.limits import PROGRESS_BYTES, MemoryBudget
from grpcbridge.core.stream import CloseCode, Opcode
from grpcbridge.core.tunnel import CLOSE_TIMEOUT, PROBE_INTERVAL, TunnelMachine, TunnelState


@dataclass
class FakeIO:
    """Records the machine's outputs; buffer levels are set by the test."""

    now: float = 0.0
    ws_buffer: int = 0
    stream_buffer: int = 0
    inbound: int = 0
    to_stream: list[bytes] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    calls: list[tuple[object, ...]] = field(default_factory=list)
    timer: float | None = None
    closed: int = 0

    def clock(self) -> float:
        return self.now

    def send_message(self, data: bytes) -> None:
        self.messages.append(data)

    def send_ping(self) -> None:
        self.calls.append(("ping",))

    def send_close(self, code: int, reason: str) -> None:
        self.calls.append(("send_close", code, reason))

    def fail_websocket(self, code: int, reason: str) -> None:
        self.calls.append(("fail_websocket", code, reason))

    def abort_websocket(self) -> None:
        self.calls.append(("abort_websocket",))

    def finish_websocket(self) -> None:
        self.calls.append(("finish_websocket",))

    def pause_websocket(self) -> None:
        self.calls.append(("pause_websocket",))

    def resume_websocket(self) -> None:
        self.calls.append(("resume_websocket",))

    def websocket_buffered(self) -> int:
        return self.ws_buffer

    def write_stream(self, data: bytes) -> None:
        self.to_stream.append(data)

    def close_stream(self) -> None:
        self.calls.append(("close_stream",))

    def abort_stream(self) -> None:
        self.calls.append(("abort_stream",))

    def pause_stream(self) -> None:
        self.calls.append(("pause_stream",))

    def resume_stream(self) -> None:
        self.calls.append(("resume_stream",))

    def stream_buffered(self) -> int:
        return self.stream_buffer

    def held_inbound(self) -> int:
        return self.inbound

    def set_timer(self, deadline: float | None) -> None:
        self.timer = deadline

    def tunnel_closed(self) -> None:
        self.closed += 1

    def names(self) -> list[object]:
        return [call[0] for call in self.calls]


def machine(io: FakeIO | None = None) -> tuple[TunnelMachine, FakeIO]:
    io = io or FakeIO()
    return TunnelMachine(io, clock=io.clock, stream_name="backend"), io


def opened() -> tuple[TunnelMachine, FakeIO]:
    tunnel, io = machine()
    tunnel.websocket_opened()
    tunnel.stream_attached_now()
    return tunnel, io


def test_bytes_before_attach_and_before_open_wait_in_order() -> None:
    tunnel, io = machine()
    tunnel.data(b"a")
    tunnel.data(b"b")
    tunnel.stream_data(b"1")  # the WebSocket is not open: held, and the stream paused
    assert io.to_stream == [] and io.messages == [] and "pause_stream" in io.names()
    tunnel.stream_attached_now()
    assert io.to_stream == [b"a", b"b"]
    assert tunnel.state is TunnelState.CONNECTING
    tunnel.stream_data(b"2")
    tunnel.websocket_opened()
    assert io.messages == [b"1", b"2"]
    assert tunnel.state is TunnelState.OPEN
    assert tunnel.bytes_from_websocket == 2 and tunnel.bytes_to_websocket == 2


def test_relaying_websocket_and_bytes_an_adapter_writes_itself() -> None:
    tunnel, io = machine()
    assert not tunnel.relaying_websocket  # no stream side yet: data() holds payloads
    tunnel.data(b"held")
    assert io.to_stream == []
    tunnel.stream_attached_now()
    assert tunnel.relaying_websocket and io.to_stream == [b"held"]
    tunnel.websocket_opened()
    io.now += 1.0
    tunnel.bytes_from_websocket += 5  # the adapter wrote 5 payload bytes to the stream itself
    tunnel.data(b"abc")  # and the rest through the stream's transport
    assert io.to_stream == [b"held", b"abc"]
    assert tunnel.bytes_from_websocket == 4 + 5 + 3
    tunnel.stream_gone(error=False)  # the stream side closed its connection
    assert tunnel.stream_closing and not tunnel.relaying_websocket  # no more direct writes
    tunnel.data(b"late")  # nobody reads these: dropped, and not counted
    assert io.to_stream == [b"held", b"abc"] and tunnel.bytes_from_websocket == 12


def test_relaying_stops_once_the_tunnel_closes_the_stream_side() -> None:
    tunnel, io = opened()
    assert tunnel.relaying_websocket
    tunnel.close(CloseCode.NORMAL, "done")
    assert "close_stream" in io.names() and not tunnel.relaying_websocket
    tunnel.data(b"late")
    assert io.to_stream == [] and tunnel.bytes_from_websocket == 0


def test_text_frame_fails_1003_once_and_stops_everything() -> None:
    tunnel, io = opened()
    assert not tunnel.frame(Opcode.TEXT, b"hi")
    assert tunnel.close_code == CloseCode.UNSUPPORTED_DATA
    assert io.calls.count(("fail_websocket", 1003, tunnel.close_reason)) == 1
    tunnel.close(CloseCode.NORMAL, "later")
    tunnel.fail(CloseCode.POLICY_VIOLATION, "later too")
    assert tunnel.close_code == CloseCode.UNSUPPORTED_DATA
    assert io.names().count("fail_websocket") == 1 and "send_close" not in io.names()
    tunnel.data(b"after")  # the stream side is closing: dropped, not written
    assert io.to_stream == []


def test_continuations_of_binary_messages_pass_and_of_text_ones_fail() -> None:
    tunnel, io = opened()
    assert tunnel.frame(Opcode.CONTINUATION, b"more") and io.to_stream == [b"more"]
    assert tunnel.frame(Opcode.CONTINUATION, b"")  # no payload: an empty frame
    assert not tunnel.frame(Opcode.TEXT, b"")  # an empty text message is a violation too
    reason = tunnel.close_reason
    assert "text" in reason and ("fail_websocket", 1003, reason) in io.calls
    assert not tunnel.frame(Opcode.CONTINUATION, b"part two")  # a continuation of the text
    assert io.to_stream == [b"more"]


FRAMES = st.lists(st.tuples(st.sampled_from(list(Opcode)), st.binary(max_size=16)),
                  max_size=12)


@settings(max_examples=150, deadline=None)
@given(FRAMES)
def test_frames_follow_the_documented_rules(frames: list[tuple[Opcode, bytes]]) -> None:
    tunnel, io = opened()
    text_seen = False
    for opcode, payload in frames:
        text_seen = text_seen or opcode is Opcode.TEXT
        assert tunnel.frame(opcode, payload) is not text_seen
        if not text_seen:
            assert tunnel.close_code is None
    assert tunnel.close_code == (CloseCode.UNSUPPORTED_DATA if text_seen else None)
    first_text = next((i for i, (op, _) in enumerate(frames) if op is Opcode.TEXT), len(frames))
    assert b"".join(io.to_stream) == b"".join(payload for _, payload in frames[:first_text])


def test_empty_and_control_frames_are_rate_limited() -> None:
    tunnel, io = opened()
    allowed = 0
    while tunnel.empty_frame():
        allowed += 1
        assert allowed < 10_000
    assert allowed == 500  # the burst, at one instant
    assert tunnel.close_code == CloseCode.POLICY_VIOLATION
    assert io.calls[-2:] == [("fail_websocket", 1008, "too many control or empty frames"),
                             ("close_stream",)]


def test_close_is_idempotent_and_closed_after_both_sides() -> None:
    tunnel, io = opened()
    tunnel.close(CloseCode.GOING_AWAY, "bye")
    tunnel.close(CloseCode.NORMAL, "again")
    tunnel.stream_eof()
    assert io.calls.count(("send_close", 1001, "bye")) == 1
    assert io.names().count("close_stream") == 1
    assert tunnel.state is TunnelState.CLOSING
    tunnel.stream_gone(error=False)
    assert tunnel.state is TunnelState.CLOSING  # the WebSocket is still there
    tunnel.websocket_lost(CloseCode.ABNORMAL, "gone")
    assert tunnel.state is TunnelState.CLOSED and io.closed == 1
    assert (tunnel.close_code, tunnel.close_reason) == (1001, "bye")
    before = list(io.calls), list(io.messages), list(io.to_stream)
    # After CLOSED every input is a no-op.
    tunnel.data(b"x")
    tunnel.stream_data(b"y")
    tunnel.close(CloseCode.NORMAL, "x")
    tunnel.fail(CloseCode.POLICY_VIOLATION, "x")
    tunnel.websocket_lost(CloseCode.ABNORMAL, "x")
    tunnel.stream_gone(error=True)
    io.now += 100
    tunnel.tick(ping_interval=1, idle_timeout=2)
    assert (list(io.calls), list(io.messages), list(io.to_stream)) == before
    assert io.closed == 1


@pytest.mark.parametrize("failing", [False, True])
def test_a_long_close_reason_is_cut_to_fit_a_close_frame(failing: bool) -> None:
    """Every adapter gets a reason that fits in a close frame (123 bytes of UTF-8): the
    websockets engine raises on a longer one; the full text stays the logged reason."""
    tunnel, io = opened()
    reason = "backend said: " + "é" * 200
    (tunnel.fail if failing else tunnel.close)(CloseCode.INTERNAL_ERROR, reason)
    ((name, code, sent),) = [call for call in io.calls
                             if call[0] in ("send_close", "fail_websocket")]
    assert name == ("fail_websocket" if failing else "send_close")
    assert code == 1011 and isinstance(sent, str)
    assert len(sent.encode()) <= 123 and sent.endswith("...")
    assert reason.startswith(sent[:-3])


def test_stream_side_lost_with_error_closes_1011() -> None:
    tunnel, io = opened()
    tunnel.stream_gone(error=True)
    assert ("send_close", 1011, "backend connection lost") in io.calls
    # Nothing more can be relayed: the connection ends once the close frame is out.
    assert io.calls[-1] == ("finish_websocket",)


def test_a_stuck_stream_side_is_aborted_after_the_close_timeout() -> None:
    tunnel, io = opened()
    io.stream_buffer = 1000  # the backend stopped reading
    tunnel.websocket_lost(CloseCode.ABNORMAL, "client left")
    assert io.names()[-1] == "close_stream" and io.timer == CLOSE_TIMEOUT
    io.now = CLOSE_TIMEOUT - 0.1
    tunnel.tick()
    assert "abort_stream" not in io.names()
    io.now = CLOSE_TIMEOUT
    io.stream_buffer = 600  # still draining: a slow reader gets more time
    tunnel.tick()
    assert "abort_stream" not in io.names() and io.timer == 2 * CLOSE_TIMEOUT
    io.now = 2 * CLOSE_TIMEOUT  # no progress since: aborted
    tunnel.tick()
    assert io.names()[-1] == "abort_stream"
    tunnel.stream_gone(error=True)
    assert tunnel.state is TunnelState.CLOSED and io.timer is None


def test_close_handshake_times_out_unless_the_peer_keeps_reading() -> None:
    tunnel, io = opened()
    io.ws_buffer = 500
    tunnel.close(CloseCode.GOING_AWAY, "idle")
    io.now = CLOSE_TIMEOUT
    io.ws_buffer = 100
    tunnel.tick()
    assert "abort_websocket" not in io.names()
    io.now = 2 * CLOSE_TIMEOUT
    tunnel.tick()
    assert io.names()[-1] == "abort_websocket"


def test_keepalive_pings_probes_and_idle_timeout() -> None:
    tunnel, io = opened()
    io.now = 9.9
    tunnel.tick(ping_interval=10, idle_timeout=30)
    assert "ping" not in io.names()
    io.now = 10
    tunnel.tick(ping_interval=10, idle_timeout=30)
    assert io.names().count("ping") == 1
    # Reading paused for backpressure: probe pings every PROBE_INTERVAL.
    tunnel.stream_write_paused()
    io.now += PROBE_INTERVAL
    tunnel.tick(ping_interval=10, idle_timeout=30)
    assert io.names().count("ping") == 2
    # A trickle into a partial frame is not activity; 64 KiB of progress is.
    tunnel.received(frames=0, partial=10)
    io.now = 29
    tunnel.received(frames=0, partial=PROGRESS_BYTES - 1)
    assert tunnel.last_inbound == 0
    tunnel.received(frames=0, partial=PROGRESS_BYTES + 10)
    assert tunnel.last_inbound == 29
    io.now = 59
    tunnel.tick(ping_interval=10, idle_timeout=30)
    assert ("send_close", 1001, "idle timeout") in io.calls


def test_closed_during_the_handshake_closes_when_the_websocket_opens() -> None:
    tunnel, io = machine()
    tunnel.stream_attached_now()
    tunnel.stream_eof()
    assert tunnel.close_code == 1000
    tunnel.websocket_opened()
    assert io.calls[-1] == ("send_close", 1000, "")


def test_over_budget_fails_1008_with_the_detail_logged() -> None:
    tunnel, io = opened()
    tunnel.account = MemoryBudget(per_client=100, total=1000).open("c")
    io.inbound = 101
    tunnel.charge()
    assert io.calls[-2] == ("fail_websocket", 1008, "client memory budget exceeded")
    assert tunnel.close_reason.startswith("client memory budget exceeded (101 bytes")
    tunnel.websocket_lost(CloseCode.ABNORMAL, "x")
    assert tunnel.account.closed


def test_dialing_keeps_the_tunnel_until_the_dial_ends() -> None:
    tunnel, io = machine()
    tunnel.dialing = True
    tunnel.websocket_lost(CloseCode.ABNORMAL, "client left")
    assert tunnel.state is TunnelState.CLOSING and io.closed == 0
    tunnel.stream_never_attached()
    assert tunnel.state is TunnelState.CLOSED and io.closed == 1


# ---------------------------------------------------------------- properties

_inputs = st.lists(st.one_of(
    st.tuples(st.just("data"), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("stream_data"), st.binary(min_size=1, max_size=8)),
    st.tuples(st.sampled_from(["dial", "attach", "open", "empty", "text", "stream_eof",
                               "stream_lost", "stream_closed", "ws_lost", "abort",
                               "never_attached", "pause_ws", "resume_ws", "ws_full",
                               "ws_drained"]), st.none()),
    st.tuples(st.just("close"), st.sampled_from([1000, 1001, 1011])),
    st.tuples(st.just("levels"), st.tuples(st.integers(0, 5000), st.integers(0, 5000),
                                           st.integers(0, 5000))),
    st.tuples(st.just("tick"), st.floats(0, 5)),
), max_size=60)


_OPEN_FIRST = [("dial", None), ("attach", None), ("open", None)]


@settings(max_examples=1000, deadline=None)
@given(st.booleans(), _inputs)
def test_random_interleavings_keep_the_invariants(open_first: bool,
                                                  inputs: list[tuple[str, object]]) -> None:
    """Bytes reach each side complete and in order or the tunnel ends with a close code;
    the close code is set once; CLOSED is final and silent; what is held never stays over
    budget without the tunnel failing."""
    budget = MemoryBudget(per_client=4000, total=8000)
    tunnel, io = machine()
    tunnel.account = budget.open("c")
    sent_by_client: list[bytes] = []
    sent_by_backend: list[bytes] = []
    first_code: int | None = None
    closed_snapshot: tuple[int, int, int] | None = None
    if open_first:  # most tunnels relay for a while before anything closes them
        inputs = [*_OPEN_FIRST, *inputs]
    for name, value in inputs:
        if name == "data":
            assert isinstance(value, bytes)
            sent_by_client.append(value)
            tunnel.data(value)
        elif name == "stream_data":
            assert isinstance(value, bytes)
            sent_by_backend.append(value)
            tunnel.stream_data(value)
        elif name == "dial":
            if not tunnel.stream_attached and tunnel.state is not TunnelState.CLOSED:
                tunnel.dialing = True  # adapters attach a stream only after dialling it
        elif name == "attach":
            if tunnel.dialing:
                tunnel.stream_attached_now()
        elif name == "open":
            tunnel.websocket_opened()
        elif name == "empty":
            tunnel.empty_frame()
        elif name == "text":
            tunnel.frame(Opcode.TEXT, b"t")
        elif name == "stream_eof":
            tunnel.stream_eof()
        elif name in ("stream_lost", "stream_closed"):
            if tunnel.stream_attached:
                tunnel.stream_gone(error=name == "stream_lost")
        elif name == "ws_lost":
            tunnel.websocket_lost(CloseCode.ABNORMAL, "lost")
        elif name == "abort":
            tunnel.abort()
        elif name == "never_attached":
            if tunnel.dialing:
                tunnel.stream_never_attached()
        elif name == "pause_ws":
            tunnel.stream_write_paused()
        elif name == "resume_ws":
            tunnel.stream_write_resumed()
        elif name == "ws_full":
            tunnel.websocket_write_paused()
        elif name == "ws_drained":
            tunnel.websocket_write_resumed()
        elif name == "close":
            assert isinstance(value, int)
            tunnel.close(value, "closing")
        elif name == "levels":
            assert isinstance(value, tuple)
            io.inbound, io.ws_buffer, io.stream_buffer = value
            was_open = tunnel.close_code is None
            tunnel.charge()
            if was_open and budget.held_by("c") > 4000:
                assert tunnel.close_code == CloseCode.POLICY_VIOLATION
        elif name == "tick":
            assert isinstance(value, float)
            io.now += value
            tunnel.tick(ping_interval=1.0, idle_timeout=3.0)
        # The close code, once set, never changes.
        if first_code is None:
            first_code = tunnel.close_code
        assert tunnel.close_code == first_code or first_code is None
        # In order, never duplicated or invented: what arrived is a prefix of what was sent.
        streamed = b"".join(io.to_stream)
        assert b"".join(sent_by_client).startswith(streamed)
        delivered = b"".join(io.messages)
        assert b"".join(sent_by_backend).startswith(delivered)
        # What is charged never stays over budget unless the tunnel is closing (with 1008
        # when the budget was the reason).
        assert budget.held_by("c") <= 4000 or tunnel.close_code is not None
        if tunnel.state is TunnelState.CLOSED:
            snapshot = (len(io.calls), len(io.messages), len(io.to_stream))
            if closed_snapshot is not None:
                assert snapshot == closed_snapshot, "output after CLOSED"
            closed_snapshot = snapshot
            assert tunnel.ws_lost and io.closed == 1
    # Complete, or ended with a code: every client byte reached an open, attached stream.
    if tunnel.close_code is None and tunnel.state is TunnelState.OPEN:
        assert b"".join(io.to_stream) == b"".join(sent_by_client)
        assert b"".join(io.messages) == b"".join(sent_by_backend)
    assert io.closed <= 1


def test_a_tick_sets_the_timer_only_when_the_deadline_changes() -> None:
    tunnel, io = opened()
    io.stream_buffer = 10
    tunnel.websocket_lost(CloseCode.ABNORMAL, "gone")
    assert io.timer == CLOSE_TIMEOUT
    io.now = CLOSE_TIMEOUT - 0.001  # event loops may run a timer a little early
    io.timer = -1.0  # a marker: armed, and not due
    tunnel.tick()
    # Nothing was due: a tick (the keepalive sweep's, every second for an aged tunnel) leaves
    # the armed timer alone instead of replacing it.
    assert io.timer == -1.0 and tunnel.deadline == CLOSE_TIMEOUT
    io.timer = None  # the adapter's timer fired early
    tunnel.timer_fired()
    # timer_fired asks for the same deadline again, as nothing was due.
    assert io.timer == CLOSE_TIMEOUT and "abort_stream" not in io.names()
    io.timer, io.now = None, CLOSE_TIMEOUT  # fired on time
    tunnel.timer_fired()
    assert io.timer is None and io.names()[-1] == "abort_stream"  # the deadline is gone
