"""Load generator for benchmarks/relay.py, run as its own process (own GIL).

Modes (all talk JSON lines on stdout and wait for a line on stdin before the measured part,
so the driver can sample the relays' CPU times exactly around it):

* ``seq``     -- sequential unary echo calls with the sync grpcio client: per-call latency.
* ``conc``    -- grpc.aio client, N concurrent in-flight unary calls on one channel, for a
  fixed duration: completed calls per second.
* ``stream``  -- grpc.aio bidi echo of fixed-size messages for a fixed duration: MiB/s.

With ``--channels K`` (conc, stream) the client opens K channels, each its own connection
(hence its own tunnel through a forwarder): conc spreads its N calls over them, stream runs
one bidi stream on each at once (throughput summed). Tunnels are what ``serve --workers``
spreads over its processes.
* ``tunnels`` -- opens raw WebSocket tunnels (websockets asyncio client, no compression) to a
  bridge, each doing the HTTP/2 preface + SETTINGS exchange with the backend, and holds them
  open; stops at each checkpoint so the driver can read the bridge's RSS.

Protocol: the worker prints ``{"ready": ...}``, reads a line (``go``), runs, prints
``{"result": {...}}``. ``tunnels`` prints ``{"open": n, ...}`` at every checkpoint and reads
a line after each one; after the last it closes everything and prints its result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from echo_server import GRPC_OPTIONS, STREAM, UNARY, raise_nofile_limit


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def wait_go() -> None:
    line = sys.stdin.readline()
    if not line:
        raise SystemExit("driver went away")


async def wait_go_async() -> None:
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if not line:
        raise SystemExit("driver went away")


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


# --------------------------------------------------------------------------- seq


def run_seq(target: str, calls: int, warmup: int, size: int) -> None:
    import grpc

    payload = os.urandom(size)
    with grpc.insecure_channel(target, options=GRPC_OPTIONS) as channel:
        grpc.channel_ready_future(channel).result(timeout=15)
        unary = channel.unary_unary(UNARY)
        for _ in range(warmup):
            if unary(payload, timeout=10) != payload:
                raise SystemExit("echo mismatch")
        emit({"ready": True})
        wait_go()
        samples: list[float] = []
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        perf = time.perf_counter_ns
        for _ in range(calls):
            start = perf()
            unary(payload, timeout=10)
            samples.append((perf() - start) / 1000.0)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        samples.sort()
        emit({"result": {
            "calls": calls,
            "elapsed_s": elapsed,
            "p50_us": percentile(samples, 0.50),
            "p90_us": percentile(samples, 0.90),
            "p99_us": percentile(samples, 0.99),
            "mean_us": sum(samples) / len(samples),
            "client_cpu_s": cpu,
        }})
        wait_go()  # keep the connection open until the driver has sampled CPU times


# -------------------------------------------------------------------------- conc


@contextlib.asynccontextmanager
async def open_channels(target: str, count: int) -> AsyncIterator[list[Any]]:
    """``count`` ready grpc.aio channels, each with its own connection (a local subchannel
    pool; grpcio otherwise shares one connection between channels with equal settings)."""
    import grpc

    options = (GRPC_OPTIONS if count == 1
               else [*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)])
    async with contextlib.AsyncExitStack() as stack:
        channels = [await stack.enter_async_context(
            grpc.aio.insecure_channel(target, options=options)) for _ in range(count)]
        await asyncio.wait_for(
            asyncio.gather(*(channel.channel_ready() for channel in channels)), 30)
        yield channels


async def run_conc(target: str, concurrency: int, duration: float, warmup: float,
                   size: int, channels: int) -> None:
    import grpc

    payload = os.urandom(size)
    async with open_channels(target, channels) as opened:
        unaries = [channel.unary_unary(UNARY) for channel in opened]
        done = 0
        errors = 0
        stop_at = 0.0

        async def worker(index: int) -> None:
            nonlocal done, errors
            unary = unaries[index % len(unaries)]
            while time.perf_counter() < stop_at:
                try:
                    await unary(payload, timeout=30)
                except grpc.aio.AioRpcError:
                    errors += 1
                else:
                    done += 1

        stop_at = time.perf_counter() + warmup
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        emit({"ready": True, "warmup_calls": done})
        await wait_go_async()
        done = errors = 0
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        stop_at = t0 + duration
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        emit({"result": {
            "calls": done,
            "errors": errors,
            "elapsed_s": elapsed,
            "rate": done / elapsed,
            "client_cpu_s": cpu,
        }})
        await wait_go_async()  # connection stays open until the driver sampled CPU times


# ------------------------------------------------------------------------ stream


async def _stream_once(channel: Any, payload: bytes, duration: float) -> tuple[int, int, float]:
    call = channel.stream_stream(STREAM)()
    received = 0

    async def reader() -> None:
        nonlocal received
        async for message in call:
            received += len(message)

    t0 = time.perf_counter()
    task = asyncio.create_task(reader())
    sent = 0
    try:
        while time.perf_counter() - t0 < duration:
            await call.write(payload)
            sent += len(payload)
        await call.done_writing()
        await task
    finally:
        if not task.done():
            task.cancel()
    elapsed = time.perf_counter() - t0
    if received != sent:
        raise SystemExit(f"stream echo lost data: sent {sent}, received {received}")
    return sent, received, elapsed


async def run_stream(target: str, size: int, duration: float, warmup: float,
                     channels: int) -> None:
    payload = os.urandom(size)
    async with open_channels(target, channels) as opened:
        await asyncio.gather(*(_stream_once(channel, payload, warmup) for channel in opened))
        emit({"ready": True})
        await wait_go_async()
        cpu0 = time.process_time()
        results = await asyncio.gather(
            *(_stream_once(channel, payload, duration) for channel in opened))
        cpu = time.process_time() - cpu0
        sent = sum(result[0] for result in results)
        received = sum(result[1] for result in results)
        elapsed = max(result[2] for result in results)
        emit({"result": {
            "message_bytes": size,
            "bytes_sent": sent,
            "bytes_received": received,
            "elapsed_s": elapsed,
            "mib_per_s": received / elapsed / (1024 * 1024),
            "client_cpu_s": cpu,
        }})
        await wait_go_async()  # connection stays open until the driver sampled CPU times


# ----------------------------------------------------------------------- tunnels

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # empty SETTINGS, stream 0
H2_SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"
H2_PING = 6


async def _open_tunnel(url: str, limit: float) -> Any:
    """One WebSocket tunnel with a completed HTTP/2 SETTINGS exchange; returns it open."""
    from websockets.asyncio.client import connect

    ws = await connect(url, compression=None, open_timeout=limit, ping_interval=None,
                       max_size=None)
    try:
        await ws.send(H2_PREFACE + H2_SETTINGS)
        buffer = b""
        got_settings = got_ack = False
        async with asyncio.timeout(limit):
            while not (got_settings and got_ack):
                message = await ws.recv()
                if isinstance(message, str):
                    raise RuntimeError("text message on a tunnel")
                buffer += message
                while len(buffer) >= 9:
                    length = int.from_bytes(buffer[:3], "big")
                    if len(buffer) < 9 + length:
                        break
                    frame_type, flags = buffer[3], buffer[4]
                    body = buffer[9:9 + length]
                    buffer = buffer[9 + length:]
                    if frame_type == 4 and not flags & 1:
                        got_settings = True
                        await ws.send(H2_SETTINGS_ACK)
                    elif frame_type == 4:
                        got_ack = True
                    elif frame_type == H2_PING and not flags & 1:
                        await ws.send(b"\x00\x00\x08\x06\x01\x00\x00\x00\x00" + body)
    except BaseException:
        await ws.close()
        raise
    return ws


async def _drain(ws: Any) -> None:
    """Keep reading (answers WebSocket pings; discards any HTTP/2 frames)."""
    try:
        async for _ in ws:
            pass
    except Exception:
        pass


async def run_tunnels(url: str, checkpoints: list[int], batch: int, limit: float) -> None:
    raise_nofile_limit()
    tunnels: list[Any] = []
    drains: list[asyncio.Task[None]] = []
    failures = 0
    emit({"ready": True})
    await wait_go_async()
    t0 = time.perf_counter()
    for checkpoint in checkpoints:
        while len(tunnels) < checkpoint:
            n = min(batch, checkpoint - len(tunnels))
            results = await asyncio.gather(
                *(_open_tunnel(url, limit) for _ in range(n)), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    failures += 1
                    if failures > max(10, checkpoints[-1] // 100):
                        raise SystemExit(f"too many tunnel failures; last: {result!r}")
                else:
                    tunnels.append(result)
                    drains.append(asyncio.create_task(_drain(result)))
        await asyncio.sleep(0.5)
        alive = sum(1 for task in drains if not task.done())
        emit({"open": len(tunnels), "alive": alive, "failures": failures,
              "elapsed_s": time.perf_counter() - t0})
        await wait_go_async()
    alive = sum(1 for task in drains if not task.done())
    closing = [ws.close() for ws in tunnels]
    for i in range(0, len(closing), 500):
        await asyncio.gather(*closing[i:i + 500], return_exceptions=True)
    emit({"result": {"opened": len(tunnels), "alive_at_end": alive, "failures": failures}})


# -------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description="benchmark load process")
    parser.add_argument("mode", choices=["seq", "conc", "stream", "tunnels"])
    parser.add_argument("--target", required=True, help="host:port, or ws:// URL (tunnels)")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--warmup-calls", type=int, default=200)
    parser.add_argument("--size", type=int, default=16, help="payload bytes")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--channels", type=int, default=1,
                        help="conc, stream: channels (connections) to spread the load over")
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds")
    parser.add_argument("--checkpoints", default="20,1000,2000,3000,4000,5020")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args()
    if args.mode == "seq":
        run_seq(args.target, args.calls, args.warmup_calls, args.size)
    elif args.mode == "conc":
        asyncio.run(run_conc(args.target, args.concurrency, args.duration, args.warmup,
                             args.size, args.channels))
    elif args.mode == "stream":
        asyncio.run(run_stream(args.target, args.size, args.duration, args.warmup,
                               args.channels))
    else:
        checkpoints = [int(c) for c in args.checkpoints.split(",")]
        asyncio.run(run_tunnels(args.target, checkpoints, args.batch, args.timeout))


if __name__ == "__main__":
    main()
