"""Benchmark-only gRPC echo server (grpc.aio, no proto file).

Service ``bench.Echo`` is defined with grpc generic handlers and no (de)serializers, so the
payload is raw bytes and no protobuf cost is in the figures:

* ``/bench.Echo/Unary``  -- unary: returns the request bytes.
* ``/bench.Echo/Stream`` -- bidi: echoes every request message.

Run: ``python benchmarks/echo_server.py --listen 127.0.0.1:0``; prints
``listening on host:port`` and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
from collections.abc import AsyncIterator

import grpc

SERVICE = "bench.Echo"
UNARY = f"/{SERVICE}/Unary"
STREAM = f"/{SERVICE}/Stream"
MiB = 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 32 * MiB),
    ("grpc.max_send_message_length", 32 * MiB),
]


def raise_nofile_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit (thousands of idle tunnels need fds)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _stream(requests: AsyncIterator[bytes],
                  context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for message in requests:
        yield message


def echo_handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),  # type: ignore[arg-type]
        "Stream": grpc.stream_stream_rpc_method_handler(_stream),  # type: ignore[arg-type]
    })


async def serve(listen: str) -> None:
    server = grpc.aio.server(options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((echo_handler(),))
    port = server.add_insecure_port(listen)
    await server.start()
    host = listen.rpartition(":")[0]
    print(f"listening on {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(grace=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    args = parser.parse_args()
    raise_nofile_limit()
    asyncio.run(serve(args.listen))


if __name__ == "__main__":
    main()
