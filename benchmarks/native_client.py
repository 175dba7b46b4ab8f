"""Load process for benchmarks/native.py: a grpclib client, over TCP or over WebSocket.

``--target 127.0.0.1:PORT`` uses ``grpclib.client.Channel(host, port)``; ``--target
ws://...`` uses ``grpcbridge.Channel(url)`` (grpclib's HTTP/2 protocol fed straight from a
WebSocket, no local socket). Both with the raw-bytes codec of benchmarks/native_echo.py and
no per-call deadline, so the two paths run exactly the same client code above the
connection.

Modes (same JSON-lines protocol as benchmarks/bench_client.py: ``{"ready": ...}`` after
the warm-up on the same channel, then a ``go`` line on stdin, then ``{"result": ...}``, then
a last line on stdin before closing, so the driver samples CPU with the connection open):

* ``seq``    -- sequential unary echo calls: per-call latency p50/p90/p99.
* ``stream`` -- one bidi stream echoing fixed-size messages for a fixed duration: MiB/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

from bench_client import emit, percentile, wait_go_async
from grpclib.client import Channel as TcpChannel
from grpclib.const import Cardinality
from native_echo import STREAM, UNARY, BytesCodec


def open_channel(target: str) -> Any:
    if target.startswith(("ws://", "wss://")):
        import grpcbridge

        return grpcbridge.Channel(target, codec=BytesCodec())
    host, _, port = target.rpartition(":")
    return TcpChannel(host, int(port), codec=BytesCodec())


async def close_channel(channel: Any) -> None:
    if hasattr(channel, "wait_closed"):
        await channel.wait_closed()
    else:
        channel.close()


async def unary(channel: Any, payload: bytes) -> bytes:
    async with channel.request(UNARY, Cardinality.UNARY_UNARY, bytes, bytes) as stream:
        await stream.send_message(payload, end=True)
        reply = await stream.recv_message()
    return reply  # type: ignore[no-any-return]


async def run_seq(target: str, calls: int, warmup: int, size: int) -> None:
    payload = os.urandom(size)
    channel = open_channel(target)
    try:
        for _ in range(warmup):
            if await unary(channel, payload) != payload:
                raise SystemExit("echo mismatch")
        emit({"ready": True})
        await wait_go_async()
        samples: list[float] = []
        perf = time.perf_counter_ns
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        for _ in range(calls):
            start = perf()
            await unary(channel, payload)
            samples.append((perf() - start) / 1000.0)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        samples.sort()
        emit({"result": {
            "calls": calls, "elapsed_s": elapsed,
            "p50_us": percentile(samples, 0.50), "p90_us": percentile(samples, 0.90),
            "p99_us": percentile(samples, 0.99), "mean_us": sum(samples) / len(samples),
            "client_cpu_s": cpu,
        }})
        await wait_go_async()  # connection stays open until the driver sampled CPU times
    finally:
        await close_channel(channel)


async def _stream_once(channel: Any, payload: bytes, duration: float) -> tuple[int, int, float]:
    received = 0
    async with channel.request(STREAM, Cardinality.STREAM_STREAM, bytes, bytes) as stream:
        await stream.send_request()

        async def reader() -> None:
            nonlocal received
            while (message := await stream.recv_message()) is not None:
                received += len(message)

        task = asyncio.create_task(reader())
        t0 = time.perf_counter()
        sent = 0
        try:
            while time.perf_counter() - t0 < duration:
                await stream.send_message(payload)
                sent += len(payload)
            await stream.end()
            await task
        finally:
            if not task.done():
                task.cancel()
        elapsed = time.perf_counter() - t0
    if received != sent:
        raise SystemExit(f"stream echo lost data: sent {sent}, received {received}")
    return sent, received, elapsed


async def run_stream(target: str, size: int, duration: float, warmup: float) -> None:
    payload = os.urandom(size)
    channel = open_channel(target)
    try:
        await _stream_once(channel, payload, warmup)
        emit({"ready": True})
        await wait_go_async()
        cpu0 = time.process_time()
        sent, received, elapsed = await _stream_once(channel, payload, duration)
        cpu = time.process_time() - cpu0
        emit({"result": {
            "message_bytes": size, "bytes_sent": sent, "bytes_received": received,
            "elapsed_s": elapsed, "mib_per_s": received / elapsed / (1024 * 1024),
            "client_cpu_s": cpu,
        }})
        await wait_go_async()
    finally:
        await close_channel(channel)


def main() -> None:
    parser = argparse.ArgumentParser(description="grpclib load process (native.py)")
    parser.add_argument("mode", choices=["seq", "stream"])
    parser.add_argument("--target", required=True, help="host:port (TCP) or ws:// URL")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--warmup-calls", type=int, default=200)
    parser.add_argument("--size", type=int, default=16, help="payload bytes")
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds")
    args = parser.parse_args()
    if args.mode == "seq":
        asyncio.run(run_seq(args.target, args.calls, args.warmup_calls, args.size))
    else:
        asyncio.run(run_stream(args.target, args.size, args.duration, args.warmup))


if __name__ == "__main__":
    main()
