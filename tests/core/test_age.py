"""Tunnel retirement (grpcbridge.core.age) and its use by the tunnel machine, under a fake
clock: the GOAWAY lands between two frames - never inside a frame or a header block, never
before the server's first frame - whatever the chunking, and the client-side filter takes
graceful GOAWAYs out of any chunking of a frame stream and leaves the rest intact."""

from __future__ import annotations

import itertools

import h2.config
import h2.connection
import h2.exceptions
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PushPromiseFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_tunnel_machine import FakeIO, opened

from grpcbridge.core.age import (
    GOAWAY,
    LAST_STREAM_ID,
    MAX_AGE_NO_GOAWAY_REASON,
    MAX_AGE_REASON,
    FrameCursor,
    GoawayFilter,
    TunnelAge,
    jittered,
)
from grpcbridge.core.stream import CloseCode
from grpcbridge.core.tunnel import TunnelMachine

# ------------------------------------------------------------------ frame streams


def _block(stream_id: int, sizes: list[int], push: bool) -> list[tuple[bytes, bool]]:
    """A header block in 1 + len(sizes[1:]) frames: (bytes, a frame may follow it)."""
    first: Frame
    if push:
        first = PushPromiseFrame(stream_id, promised_stream_id=stream_id + 1)
    else:
        first = HeadersFrame(stream_id)
    first.data = b"h" * sizes[0]
    frames: list[Frame] = [first]
    for size in sizes[1:]:
        continuation = ContinuationFrame(stream_id)
        continuation.data = b"c" * size
        frames.append(continuation)
    frames[-1].flags.add("END_HEADERS")
    return [(bytes(frame.serialize()), frame is frames[-1]) for frame in frames]


@st.composite
def frame_stream(draw: st.DrawFn) -> list[tuple[bytes, bool]]:
    """A server's frames: SETTINGS first, then a mix, each with whether a GOAWAY may follow."""
    frames = [(bytes(SettingsFrame(0, settings={4: 65535}).serialize()), True)]
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["data", "headers", "push", "ping", "window", "empty"]))
        if kind == "data":
            data = DataFrame(1, data=b"d" * draw(st.integers(0, 70)))
            frames.append((bytes(data.serialize()), True))
        elif kind in ("headers", "push"):
            sizes = draw(st.lists(st.integers(0, 30), min_size=1, max_size=4))
            frames.extend(_block(3, sizes, kind == "push"))
        elif kind == "ping":
            frames.append((bytes(PingFrame(0, opaque_data=b"12345678").serialize()), True))
        elif kind == "window":
            frames.append((bytes(WindowUpdateFrame(0, window_increment=9).serialize()), True))
        else:
            frames.append((bytes(SettingsFrame(0, flags=["ACK"]).serialize()), True))
    return frames


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def _allowed_offsets(frames: list[tuple[bytes, bool]]) -> list[int]:
    offsets, end = [], 0
    for data, may_follow in frames:
        end += len(data)
        if may_follow:
            offsets.append(end)
    return offsets


# -------------------------------------------------------------------- the injector


_SETTINGS = bytes(SettingsFrame(0, settings={4: 65535}).serialize())
_ACK = bytes(SettingsFrame(0, flags=["ACK"]).serialize())


def _clock(now: float = 0.0) -> list[float]:
    """A fake clock: ``clock[0]`` is the time, ``clock.__getitem__`` reads it."""
    return [now]


def _backend_goaway(last: int) -> bytes:
    frame = GoAwayFrame(0)
    frame.last_stream_id = last
    return bytes(frame.serialize())


@settings(max_examples=300, deadline=None)
@given(frame_stream(), st.lists(st.integers(0, 2000), max_size=12), st.integers(0, 12),
       st.none() | st.tuples(st.integers(1, 40), st.integers(0, LAST_STREAM_ID)))
# A chunk that ends exactly where the first frame's payload ends: that frame is complete.
@example(frames=[(_SETTINGS, True), (_ACK, True)], cuts=[1, 9, 15], due_before=3,
         backend=None)
# The backend's GOAWAY completely passed before the age: none is inserted.
@example(frames=[(_SETTINGS, True), (_ACK, True)], cuts=[9, 26], due_before=2,
         backend=(1, 5))
# Only part of the backend's GOAWAY header passed when the age came: still none.
@example(frames=[(_SETTINGS, True), (_ACK, True)], cuts=[9, 12], due_before=2,
         backend=(1, 5))
def test_goaway_lands_at_the_first_allowed_boundary_whatever_the_chunking(
        frames: list[tuple[bytes, bool]], cuts: list[int], due_before: int,
        backend: tuple[int, int] | None) -> None:
    goaway_starts: list[int] = []  # where backend GOAWAYs begin in the stream
    if backend is not None:  # a GOAWAY of the backend's after a frame a frame may follow
        after = [index for index, (_, may_follow) in enumerate(frames) if may_follow]
        index = after[backend[0] % len(after)] + 1
        goaway_starts.append(sum(len(data) for data, _ in frames[:index]))
        frames = [*frames[:index], (_backend_goaway(backend[1]), True), *frames[index:]]
    stream = b"".join(data for data, _ in frames)
    chunks = _chunks(stream, cuts)
    clock = _clock()
    age = TunnelAge(lambda: clock[0], 5.0, 1.0)
    out: list[bytes] = []
    fed = 0
    due_at = None
    for index, chunk in enumerate(chunks):
        if index == due_before:
            clock[0] = 5.0
            assert not age.due(5.0) and age.close_at is not None  # reached: not yet closing
            due_at = fed
            out.append(age.outbound(b""))  # what the machine sends at once, if anything
        out.append(age.outbound(chunk))
        fed += len(chunk)
    sent = b"".join(out)
    if due_at is None:
        assert sent == stream and not age.goaway_sent
        return
    later = [offset for offset in _allowed_offsets(frames) if offset >= due_at]
    if any(start < (later[0] if later else len(stream) + 1) for start in goaway_starts):
        # The backend's GOAWAY went out before the first boundary the bridge's could take:
        # a second one would raise the last-stream-id (RFC 9113 section 6.8). None.
        assert sent == stream and age.goaway_sent
        return
    if not later:  # the age came after the last boundary: nothing to insert it at yet
        assert sent == stream and not age.goaway_sent
        return
    cut = later[0]
    assert age.goaway_sent
    assert sent == stream[:cut] + GOAWAY + stream[cut:]


def test_cursor_follows_boundaries_and_header_blocks() -> None:
    cursor = FrameCursor()
    assert not cursor.at_boundary  # nothing yet: the server's SETTINGS must come first
    settings_frame = bytes(SettingsFrame(0).serialize())
    assert cursor.advance(settings_frame[:4], find=True) == -1
    assert cursor.advance(settings_frame[4:], find=True) == 5  # the end of the header
    assert cursor.at_boundary and cursor.frames == 1
    (headers, _), (continuation, _) = _block(1, [5, 5], push=False)
    assert cursor.advance(headers, find=True) == 0  # a boundary before it
    assert not cursor.at_boundary  # inside the header block
    assert cursor.advance(continuation[:10]) == -1
    assert cursor.advance(continuation[10:], find=True) == len(continuation) - 10
    assert cursor.at_boundary and not cursor.goaway_seen
    goaway = _backend_goaway(7)
    assert cursor.advance(goaway[:9], find=True) == 0  # before it only
    assert cursor.goaway_seen
    assert cursor.advance(goaway[9:] + settings_frame, find=True) == -1  # never after it
    assert cursor.advance(settings_frame, find=True) == -1


def test_due_then_grace_then_close_times() -> None:
    clock = _clock(10.0)
    age = TunnelAge(lambda: clock[0], 5.0, 2.0)
    age.outbound(_SETTINGS)
    assert age.next_at == 15.0 and not age.due(14.9) and age.close_at is None
    clock[0] = 15.0
    assert not age.due(15.0) and age.close_at == age.next_at == 19.0  # at most 2 x grace
    assert age.outbound(b"") == GOAWAY and age.next_at == 17.0  # the grace starts now
    assert not age.due(16.9)
    assert age.due(17.0) and age.next_at is None and age.close_reason == MAX_AGE_REASON


def test_grace_starts_when_the_goaway_goes_out() -> None:
    clock = _clock()
    age = TunnelAge(lambda: clock[0], 5.0, 2.0)
    data = bytes(DataFrame(1, data=b"x" * 100).serialize())
    age.outbound(_SETTINGS + data[:50])
    clock[0] = 5.0
    assert not age.due(5.0) and age.outbound(b"") == b""  # mid-frame: it waits
    clock[0] = 6.5
    assert age.outbound(data[50:]) == data[50:] + GOAWAY
    assert age.close_at == age.next_at == 8.5  # 2 s after the GOAWAY, not after the age
    assert not age.due(8.4) and age.due(8.5) and age.close_reason == MAX_AGE_REASON


def test_a_goaway_later_than_the_grace_keeps_the_latest_close() -> None:
    clock = _clock()
    age = TunnelAge(lambda: clock[0], 5.0, 2.0)
    data = bytes(DataFrame(1, data=b"x" * 100).serialize())
    age.outbound(_SETTINGS + data[:50])
    assert not age.due(5.0)
    clock[0] = 8.0
    assert age.outbound(data[50:]) == data[50:] + GOAWAY
    assert age.close_at == 9.0  # age + 2 x grace, not 8 + 2


def test_jitter_is_ten_percent_each_way() -> None:
    assert jittered(100.0, 0.0) == 90.0
    assert jittered(100.0, 0.5) == 100.0
    assert 109.99 < jittered(100.0, 0.99999) <= 110.0


# ------------------------------------------------------------------ in the machine


def test_backend_goaway_before_the_age_means_none_inserted_and_the_close_after_grace() -> None:
    # The review's case: the backend retired the connection itself (GOAWAY(5)); a GOAWAY
    # (2^31-1) after it would raise the last-stream-id, which RFC 9113 forbids and grpc-go
    # clients answer by dropping the connection, failing the RPCs in flight.
    tunnel, io = opened()
    retired: list[float] = []
    tunnel.retire_after(5.0, 2.0, lambda: retired.append(io.now))
    backend_goaway = _backend_goaway(5)
    tunnel.stream_data(_SETTINGS + backend_goaway)
    io.now = 5.0
    tunnel.tick()
    data = bytes(DataFrame(3, data=b"x").serialize())
    tunnel.stream_data(data)
    assert io.messages == [_SETTINGS + backend_goaway, data]  # nothing inserted
    assert retired == [5.0] and tunnel.age is not None and tunnel.age.goaway_sent
    assert io.timer == 7.0 and tunnel.close_code is None
    io.now = 7.0
    tunnel.tick()
    assert ("send_close", 1001, MAX_AGE_REASON) in io.calls


_BIG = bytes(DataFrame(1, data=b"x" * 100).serialize())


def _retiring_mid_frame(max_age: float, grace: float) -> tuple[TunnelMachine, FakeIO]:
    """A tunnel whose age passed while half of :data:`_BIG` was sent: no GOAWAY yet."""
    tunnel, io = opened()
    tunnel.retire_after(max_age, grace)
    tunnel.stream_data(_SETTINGS + _BIG[:50])
    io.now = max_age
    tunnel.tick()
    assert len(io.messages) == 1
    return tunnel, io


def test_backend_goaway_while_waiting_for_a_boundary_means_none_inserted() -> None:
    tunnel, io = _retiring_mid_frame(1.0, 10.0)
    backend_goaway = _backend_goaway(1)
    # A header block cannot be interrupted: the backend's GOAWAY comes first here.
    (headers, _), (continuation, _) = _block(1, [5, 5], push=False)
    tunnel.stream_data(_BIG[50:] + headers)
    assert io.messages[-1] == _BIG[50:] + GOAWAY + headers  # ours, at the first boundary
    tunnel2, io2 = opened()
    tunnel2.retire_after(1.0, 10.0)
    tunnel2.stream_data(_SETTINGS + headers)  # inside a header block at the age
    io2.now = 1.0
    tunnel2.tick()
    tunnel2.stream_data(backend_goaway[:4])
    tunnel2.stream_data(backend_goaway[4:] + continuation)  # (a protocol error, passed on)
    assert b"".join(io2.messages) == _SETTINGS + headers + backend_goaway + continuation
    assert tunnel2.age is not None and tunnel2.age.goaway_sent
    assert io2.timer == 11.0


def test_machine_closes_a_stream_stuck_mid_frame_at_age_plus_twice_the_grace() -> None:
    tunnel, io = _retiring_mid_frame(5.0, 2.0)
    assert io.timer == 9.0
    io.now = 7.0  # the grace after the age: no GOAWAY yet, so no close yet
    tunnel.tick()
    assert tunnel.close_code is None
    io.now = 9.0
    tunnel.tick()
    assert ("send_close", 1001, MAX_AGE_NO_GOAWAY_REASON) in io.calls
    assert len(MAX_AGE_NO_GOAWAY_REASON.encode()) <= 123  # fits a close frame


def test_machine_rearms_its_timer_when_the_goaway_goes_out_late() -> None:
    tunnel, io = _retiring_mid_frame(5.0, 2.0)
    assert io.timer == 9.0
    io.now = 6.0
    tunnel.stream_data(_BIG[50:])
    assert io.messages[-1] == _BIG[50:] + GOAWAY and io.timer == 8.0
    io.now = 8.0
    tunnel.tick()
    assert ("send_close", 1001, MAX_AGE_REASON) in io.calls


def test_machine_sends_goaway_when_the_age_passes_then_closes_1001_after_grace() -> None:
    tunnel, io = opened()
    retired: list[float] = []
    tunnel.retire_after(5.0, 2.0, lambda: retired.append(io.now))
    assert io.timer == 5.0
    settings_frame = bytes(SettingsFrame(0).serialize())
    tunnel.stream_data(settings_frame)
    io.now = 5.0
    tunnel.tick()
    assert io.messages == [settings_frame, GOAWAY] and retired == [5.0]
    assert io.timer == 7.0 and tunnel.close_code is None
    data = bytes(DataFrame(1, data=b"x" * 10).serialize())
    tunnel.stream_data(data)  # in-flight RPCs go on
    assert io.messages[-1] == data
    io.now = 7.0
    tunnel.tick()
    assert tunnel.close_code == CloseCode.GOING_AWAY
    assert ("send_close", 1001, MAX_AGE_REASON) in io.calls
    assert tunnel.bytes_to_websocket == len(settings_frame) + len(GOAWAY) + len(data)


def test_machine_waits_for_a_boundary_inside_a_large_frame() -> None:
    tunnel, io = opened()
    tunnel.retire_after(1.0, 10.0)
    settings_frame = bytes(SettingsFrame(0).serialize())
    data = bytes(DataFrame(1, data=b"x" * 100).serialize())
    tunnel.stream_data(settings_frame + data[:50])
    io.now = 1.0
    tunnel.tick()
    assert len(io.messages) == 1  # mid-frame: the GOAWAY waits
    tunnel.stream_data(data[50:] + settings_frame)
    assert io.messages[-1] == data[50:] + GOAWAY + settings_frame


def test_machine_without_age_sends_bytes_untouched() -> None:
    tunnel, io = opened()
    tunnel.stream_data(b"\x00\x00")  # not even HTTP/2: nothing parses it
    assert io.messages == [b"\x00\x00"] and tunnel.age is None and io.timer is None


# ---------------------------------------------------------------------- the filter


def _goaway(last: int, error: int, debug: bytes = b"") -> bytes:
    frame = GoAwayFrame(0)
    frame.last_stream_id = last
    frame.error_code = error
    frame.additional_data = debug
    return bytes(frame.serialize())


@settings(max_examples=300, deadline=None)
@given(frame_stream(), st.lists(st.tuples(st.integers(0, 20), st.integers(0, LAST_STREAM_ID),
                                          st.sampled_from([0, 0, 2]), st.binary(max_size=20)),
                                max_size=3),
       st.lists(st.integers(0, 2000), max_size=14))
def test_filter_removes_graceful_goaways_from_any_chunking(
        frames: list[tuple[bytes, bool]], goaways: list[tuple[int, int, int, bytes]],
        cuts: list[int]) -> None:
    parts: list[bytes] = []
    expected_parts: list[bytes] = []
    expected_ids: list[int] = []
    for index, (data, _) in enumerate([*frames, (b"", True)]):
        for position, last, error, debug in goaways:  # before the frame at ``position``
            if min(position, len(frames)) == index:
                frame = _goaway(last, error, debug)
                parts.append(frame)
                if error:
                    expected_parts.append(frame)
                else:
                    expected_ids.append(last)
        parts.append(data)
        expected_parts.append(data)
    seen: list[int] = []
    goaway_filter = GoawayFilter(seen.append)
    stream = b"".join(parts)
    out = b"".join(goaway_filter.feed(chunk) for chunk in _chunks(stream, cuts))
    assert out == b"".join(expected_parts)
    assert seen == expected_ids


def test_filter_passes_the_bridges_goaway_to_nobody_and_reports_it() -> None:
    seen: list[int] = []
    goaway_filter = GoawayFilter(seen.append)
    data = bytes(DataFrame(1, data=b"abc").serialize())
    assert goaway_filter.feed(data + GOAWAY + data) == data + data
    assert seen == [LAST_STREAM_ID]
    assert goaway_filter.feed(b"") == b""


def _h2_client() -> h2.connection.H2Connection:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.receive_data(_SETTINGS)
    return client


@pytest.mark.parametrize("case", ["stream", "size"])
def test_filter_passes_goaways_h2_must_refuse_and_h2_refuses_them(case: str) -> None:
    seen: list[int] = []
    goaway_filter = GoawayFilter(seen.append, max_frame_size=16384)
    if case == "stream":  # RFC 9113 section 6.8: on a stream other than 0, PROTOCOL_ERROR
        frame = GoAwayFrame(0)
        frame.stream_id = 1  # hyperframe would refuse to build it on a stream
        frame.last_stream_id = LAST_STREAM_ID
        body = frame.serialize_body()
        bad = (len(body).to_bytes(3, "big") + bytes([0x7, 0]) + (1).to_bytes(4, "big")
               + body)
        error: type[Exception] = h2.exceptions.ProtocolError
    else:  # larger than the client accepts: FRAME_SIZE_ERROR
        bad = _goaway(LAST_STREAM_ID, 0, b"d" * 16384)
        error = h2.exceptions.FrameTooLargeError
    passed = b"".join(goaway_filter.feed(bad[i:i + 7]) for i in range(0, len(bad), 7))
    assert passed == bad and seen == []
    with pytest.raises(error):
        _h2_client().receive_data(passed)
    assert goaway_filter.feed(GOAWAY) == b"" and seen == [LAST_STREAM_ID]  # still in step
