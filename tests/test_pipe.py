"""The in-memory pipe between a tunnel and an in-process HTTP/2 protocol."""

from __future__ import annotations

import asyncio

from grpcbridge.pipe import COALESCE_LIMIT, Pipe


class RecordingTunnel:
    """The tunnel (StreamAdapter) side of a pipe, recording what the protocol sends."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.machine = self  # the machine's calls are recorded here too
        self.sent: list[bytes] = []
        self.lost: list[bool] = []

    def attach_stream(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def stream_data(self, data: bytes) -> None:
        self.sent.append(data)

    def stream_gone(self, abnormal: bool) -> None:
        self.lost.append(abnormal)

    def websocket_buffered(self) -> int:
        return 0


class Writer(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.lost = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


async def test_writes_of_one_loop_iteration_leave_as_one_message() -> None:
    tunnel = RecordingTunnel(asyncio.get_running_loop())
    protocol = Writer()
    Pipe(tunnel, protocol)  # type: ignore[arg-type]
    for frame in (b"HEADERS", b"DATA", b"TRAILERS"):
        protocol.transport.write(frame)
    assert tunnel.sent == []
    assert protocol.transport.get_write_buffer_size() == len(b"HEADERSDATATRAILERS")
    await asyncio.sleep(0)
    assert tunnel.sent == [b"HEADERSDATATRAILERS"]
    assert protocol.transport.get_write_buffer_size() == 0

    # A burst up to the limit goes out at once as one message, in order; coalescing never
    # makes a message larger than the limit (a single larger write goes out alone).
    protocol.transport.write(b"a")
    protocol.transport.write(bytes(COALESCE_LIMIT - 1))
    assert tunnel.sent[1:] == [b"a" + bytes(COALESCE_LIMIT - 1)]
    big = bytes(COALESCE_LIMIT + 1)
    protocol.transport.write(b"b")
    protocol.transport.write(big)
    assert tunnel.sent[2:] == [b"b", big]
    assert max(len(message) for message in tunnel.sent) == len(big)
    protocol.transport.write(b"tail")
    protocol.transport.close()  # held bytes are sent before the close
    assert tunnel.sent[-1] == b"tail"
    assert await protocol.lost is None
    assert tunnel.lost == [False]
    protocol.transport.write(b"after close")  # ignored, like a closed socket transport
    await asyncio.sleep(0)
    assert b"after close" not in b"".join(tunnel.sent)
