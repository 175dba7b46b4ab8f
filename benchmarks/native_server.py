"""Server process for benchmarks/native.py: one echo service, reachable two ways at once.

* ``--kind grpclib``: the grpclib echo handler of benchmarks/native_echo.py, served by
  ``grpclib.server.Server.start()`` on TCP *and*, the same handler object, by a
  ``grpcbridge.Bridge`` with ``GrpclibBackend`` on another port (in process, no socket
  between the WebSocket and grpclib's HTTP/2 protocol).
* ``--kind grpcio``: the grpcio echo server of benchmarks/echo_server.py (``grpc.aio`` by
  default, ``--grpcio sync`` for ``grpc.server`` with a thread pool) on TCP, with
  ``grpcbridge.attach_grpcio()`` (a private unix-socket port on the server, and a bridge in
  this same process: on the server's event loop for aio, on its own thread for sync).

All of it runs in this one process, so the server-side CPU of a path is this process's CPU.
For aio the grpcio server also gets a second attachment (path GU), ``attach_grpcio()``'s
default: a bridge on its own thread and loop. Prints one JSON line ``{"tcp": "host:port",
"ws": "ws://...", ...}`` (plus ``ws_thread`` for GU), then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from echo_server import GRPC_OPTIONS, SERVICE, echo_handler, raise_nofile_limit
from native_echo import BytesCodec, EchoService

import grpcbridge

#: The bridge's guards that would throttle a benchmark (as `--max-upgrades-per-minute 0
#: --max-connections-per-client 0` in benchmarks/relay.py).
BRIDGE_OPTIONS: dict[str, Any] = {"listen": "127.0.0.1:0", "max_upgrades_per_minute": 0,
                                  "max_connections_per_client": 0}


def announce(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


async def serve_grpclib() -> None:
    from grpclib.server import Server

    handler = EchoService()  # one handler object behind both listeners
    server = Server([handler], codec=BytesCodec())
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets whose proto is
    # IPPROTO_TCP, and accepted sockets inherit it. With proto 0 every response's second
    # segment waits for the client's delayed ACK (about 40 ms per unary call).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    await server.start(sock=sock)
    backend = grpcbridge.GrpclibBackend([handler], codec=BytesCodec())
    bridge = grpcbridge.Bridge(grpcbridge.BridgeConfig(backend=backend, **BRIDGE_OPTIONS))
    await bridge.start()
    announce(kind="grpclib", tcp=f"127.0.0.1:{port}", ws=bridge.url)
    try:
        await until_signalled()
    finally:
        await bridge.close(0)
        server.close()
        await server.wait_closed()


async def serve_grpcio_aio() -> None:
    import grpc

    server = grpc.aio.server(options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((echo_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    bridge = grpcbridge.attach_grpcio(server, threaded=False, **BRIDGE_OPTIONS)
    # Path GU: a second attachment, the bridge on its own thread and loop ("auto": uvloop
    # when installed). Idle while the other paths run.
    threaded = grpcbridge.attach_grpcio(server, **BRIDGE_OPTIONS)
    await server.start()
    await bridge.start()
    threaded.start()
    announce(kind="grpcio-aio", tcp=f"127.0.0.1:{port}", ws=bridge.url, ws_thread=threaded.url,
             thread_loop=threaded.loop_kind)
    try:
        await until_signalled()
    finally:
        await bridge.close(0)
        await asyncio.to_thread(threaded.stop, 0)
        await server.stop(grace=0.5)


def _sync_echo_handler() -> Any:
    import grpc

    def unary(request: bytes, context: Any) -> bytes:
        return request

    def stream(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        yield from requests

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.stream_stream_rpc_method_handler(stream),
    })


async def serve_grpcio_sync() -> None:
    import grpc

    server = grpc.server(ThreadPoolExecutor(max_workers=8), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((_sync_echo_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    bridge = grpcbridge.attach_grpcio(server, **BRIDGE_OPTIONS)  # its own thread and loop
    server.start()
    bridge.start()
    announce(kind="grpcio-sync", tcp=f"127.0.0.1:{port}", ws=bridge.url)
    try:
        await until_signalled()
    finally:
        bridge.stop(drain_timeout=0)
        server.stop(0.5).wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["grpclib", "grpcio"], required=True)
    parser.add_argument("--grpcio", choices=["aio", "sync"], default="aio",
                        help="grpcio flavour for --kind grpcio")
    args = parser.parse_args()
    raise_nofile_limit()
    if args.kind == "grpclib":
        asyncio.run(serve_grpclib())
    elif args.grpcio == "aio":
        asyncio.run(serve_grpcio_aio())
    else:
        asyncio.run(serve_grpcio_sync())


if __name__ == "__main__":
    main()
