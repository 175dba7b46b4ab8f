"""Plain asyncio TCP pass-through relay: the floor for a two-hop Python relay.

Path D of benchmarks/relay.py chains two of these (client -> relay -> relay -> server): the
same process layout and event loop as grpcbridge forward + serve, minus WebSocket framing,
so the difference between paths B and D is what the WebSocket layer costs.

Each accepted connection gets its own upstream connection; bytes are written through as
they arrive (asyncio.Protocol callbacks, write buffers bounded by pausing the other side).

``--mode buffered`` reads with ``recv_into`` a reusable buffer (asyncio.BufferedProtocol)
instead of a fresh 256 KiB bytes object per read; ``--mode uvloop`` runs the default
protocol on uvloop (must be importable). Both are experiments for what a relay could gain.

Run: ``python benchmarks/tcp_relay.py --listen 127.0.0.1:0 --target 127.0.0.1:50051``;
prints ``listening on host:port``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import cast

BUFFER = 256 * 1024


class Half(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Half | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are no asyncio.Transport subclasses: a cast, not an isinstance.
        transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=BUFFER, low=BUFFER // 4)
        self.transport = transport
        if self.peer is not None:  # upstream connected: flush what arrived before
            for chunk in self.peer.pending:
                transport.write(chunk)
            self.peer.pending.clear()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(bytes(data))

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class BufferedHalf(Half, asyncio.BufferedProtocol):
    """Same relay, reading into one reusable buffer (no allocation per read)."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = memoryview(bytearray(BUFFER))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        # write() sends at once or copies what is left into the transport's own buffer.
        self.data_received(self.buffer[:nbytes])  # type: ignore[arg-type]


async def serve(listen: str, target: str, half: type[Half]) -> None:
    loop = asyncio.get_running_loop()
    target_host, _, target_port = target.rpartition(":")
    tasks: set[asyncio.Task[None]] = set()

    def accept() -> Half:
        downstream = half()

        async def dial() -> None:
            try:
                await loop.create_connection(upstream_factory, target_host, int(target_port))
            except OSError:
                if downstream.transport is not None:
                    downstream.transport.close()

        def upstream_factory() -> Half:
            upstream = half()
            upstream.peer, downstream.peer = downstream, upstream
            return upstream

        tasks.add(task := loop.create_task(dial()))
        task.add_done_callback(tasks.discard)
        return downstream

    host, _, port = listen.rpartition(":")
    server = await loop.create_server(accept, host, int(port), backlog=1024)
    bound = server.sockets[0].getsockname()
    print(f"listening on {bound[0]}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--target", required=True)
    parser.add_argument("--mode", choices=["protocol", "buffered", "uvloop"],
                        default="protocol")
    args = parser.parse_args()
    if args.mode == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(args.listen, args.target,
                      BufferedHalf if args.mode == "buffered" else Half))


if __name__ == "__main__":
    main()
