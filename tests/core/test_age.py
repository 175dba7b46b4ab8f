"""Tunnel retirement (grpcbridge.core.age) and its use by the tunnel machine, under a fake
clock: the GOAWAY lands between two frames - never inside a frame or a header block, never
before the server's first frame - whatever the chunking, and the client-side filter takes
graceful GOAWAYs out of any chunking of a frame stream and leaves the rest intact."""

from __future__ import annotations

import itertools

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
from test_tunnel_machine import opened

from grpcbridge.core.age import (
    GOAWAY,
    LAST_STREAM_ID,
    MAX_AGE_REASON,
    FrameCursor,
    GoawayFilter,
    TunnelAge,
    jittered,
)
from grpcbridge.core.stream import CloseCode

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


@settings(max_examples=300, deadline=None)
@given(frame_stream(), st.lists(st.integers(0, 2000), max_size=12), st.integers(0, 12))
# A chunk that ends exactly where the first frame's payload ends: that frame is complete.
@example(frames=[(_SETTINGS, True), (_ACK, True)], cuts=[1, 9, 15], due_before=3)
def test_goaway_lands_at_the_first_allowed_boundary_whatever_the_chunking(
        frames: list[tuple[bytes, bool]], cuts: list[int], due_before: int) -> None:
    stream = b"".join(data for data, _ in frames)
    chunks = _chunks(stream, cuts)
    age = TunnelAge(0.0, 5.0, 1.0)
    out: list[bytes] = []
    fed = 0
    due_at = None
    for index, chunk in enumerate(chunks):
        if index == due_before:
            assert not age.due(5.0) and age.retiring  # the age is reached: not yet closing
            due_at = fed
            out.append(age.outbound(b""))  # what the machine sends at once, if anything
        out.append(age.outbound(chunk))
        fed += len(chunk)
    sent = b"".join(out)
    if due_at is None:
        assert sent == stream and not age.goaway_sent
        return
    later = [offset for offset in _allowed_offsets(frames) if offset >= due_at]
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
    assert cursor.at_boundary


def test_due_then_grace_then_close_times() -> None:
    age = TunnelAge(10.0, 5.0, 2.0)
    assert age.next_at == 15.0 and not age.due(14.9) and not age.retiring
    assert not age.due(15.0) and age.retiring and age.next_at == 17.0
    assert not age.due(16.9)
    assert age.due(17.0) and age.next_at is None


def test_jitter_is_ten_percent_each_way() -> None:
    assert jittered(100.0, 0.0) == 90.0
    assert jittered(100.0, 0.5) == 100.0
    assert 109.99 < jittered(100.0, 0.99999) <= 110.0


# ------------------------------------------------------------------ in the machine


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
