"""Command line: ``grpcbridge serve``, ``grpcbridge forward`` and ``grpcbridge demo``.

Argument parsing only; everything else is the library.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from .client.forwarder import Forwarder
from .core.admission import BearerTokenAuth
from .core.config import BridgeConfig, ForwarderConfig
from .core.errors import ConfigError
from .loops import LOOP_NAMES, run, tune_allocator
from .observability import configure_logging, logger
from .server.bridge import Bridge
from .server.workers import Supervisor, WorkerLink, parse_workers

TOKEN_ENV = "GRPCBRIDGE_TOKEN"


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token from --token-file or $GRPCBRIDGE_TOKEN (never from argv, where any
    local user could read it in the process list)."""
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as handle:
            token = handle.read().strip()
        if not token:
            raise ConfigError(f"token file {args.token_file!r} is empty")
        return token
    from_env = os.environ.get(TOKEN_ENV)
    if from_env is not None and not from_env.strip():
        raise ConfigError(
            f"${TOKEN_ENV} is set but empty (or only spaces), which would turn authentication "
            "off; unset it to run without a token, or put the token in it")
    return from_env


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token-file", metavar="PATH",
                        help=f"file holding the bearer token (or set ${TOKEN_ENV})")
    parser.add_argument("--max-message-bytes", type=int,
                        help="largest WebSocket message accepted (default: 16 MiB)")
    parser.add_argument("--buffer-bytes", type=int,
                        help="bytes buffered per tunnel and direction before reading pauses")
    parser.add_argument("--ping-interval", type=float,
                        help="seconds between pings on a quiet tunnel (0: off)")
    parser.add_argument("--idle-timeout", type=float,
                        help="close a tunnel after this many seconds without traffic (0: off)")
    parser.add_argument("--loop", choices=LOOP_NAMES, default="auto",
                        help="event loop; auto (default): uvloop (installed with grpcbridge "
                             "except on Windows; less CPU per message), else asyncio")
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grpcbridge", description="Real gRPC over WebSocket.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="accept WebSocket tunnels and relay them to a gRPC server",
        description="Accept WebSocket tunnels and relay each to its own backend connection.")
    serve.add_argument("--backend", required=True,
                       help="gRPC server (h2c): host:port or unix:/path")
    serve.add_argument("--listen", help="host:port or unix:/path (default: 127.0.0.1:8080)")
    serve.add_argument("--path", help="tunnel URL path (default: /grpc)")
    serve.add_argument("--allow-remote-backend", action="store_true",
                       help="allow a backend that is not loopback or a unix socket")
    serve.add_argument("--backend-timeout", type=float, dest="backend_connect_timeout",
                       metavar="BACKEND_TIMEOUT",
                       help="seconds to connect to the backend (default: 10)")
    serve.add_argument("--allow-origin", action="append", metavar="ORIGIN",
                       dest="allowed_origins",
                       help="browser origin to accept besides same-host (repeatable): "
                            "https://app.example.com, app.example.com[:port] (any scheme), "
                            "*.example.com or https://*.example.com (subdomains, not the "
                            "apex), * = any")
    serve.add_argument("--allowed-host", action="append", metavar="HOST",
                       dest="allowed_hosts",
                       help="Host header to accept, refusing others with 403 against DNS "
                            "rebinding (repeatable): bridge.example.com (any port), "
                            "bridge.example.com:8080, *.example.com, * = any; default: any")
    serve.add_argument("--subprotocol", action="append", dest="subprotocols", metavar="NAME",
                       help="subprotocol to echo when offered (repeatable; default: grpcbridge)")
    serve.add_argument("--workers", type=parse_workers, default=1, metavar="N|auto",
                       help="processes serving the one --listen address (auto: one per core); "
                            "a supervisor restarts a crashed one, passes SIGTERM on to all "
                            "and serves --metrics-listen summed over all. The limits below "
                            "then hold per worker: each counts only the connections it "
                            "accepted (default: 1)")
    serve.add_argument("--client-memory-budget", type=int, metavar="BYTES",
                       help="bytes one client may make the bridge hold in unfinished messages "
                            "and buffers, over all its tunnels; the tunnel that goes over "
                            "closes with 1008 (default: 48 MiB; 0: unlimited; per worker)")
    serve.add_argument("--memory-budget", type=int, metavar="BYTES",
                       help="the same for all clients together (default: 2 GiB; 0: unlimited; "
                            "per worker)")
    serve.add_argument("--max-connections", type=int,
                       help="active tunnels in total, 503 beyond (0: unlimited; per worker)")
    serve.add_argument("--max-connections-per-client", type=int,
                       help="active tunnels per client, 429 beyond (0: unlimited; per worker)")
    serve.add_argument("--max-upgrades-per-minute", type=int,
                       help="upgrades per client per sliding minute, 429 beyond (0: unlimited; "
                            "per worker)")
    serve.add_argument("--trusted-proxy", action="append", metavar="CIDR",
                       dest="trusted_proxies",
                       help="proxy whose X-Forwarded-For, X-Request-Id and upgrade-request "
                            "trace context (traceparent) are believed (repeatable)")
    serve.add_argument("--trust-trace-context", action="store_true",
                       help="continue every client's trace context (traceparent, baggage) "
                            "in tunnel and RPC spans; by default only a trusted proxy's "
                            "upgrade request's is (for the tunnel span), and other spans "
                            "start a new trace linked to the client's")
    serve.add_argument("--max-tunnel-age", type=float, metavar="SECONDS",
                       help="retire tunnels after about this long (+/- 10%% jitter): the "
                            "client gets a graceful HTTP/2 GOAWAY and opens a new tunnel "
                            "for new RPCs while those in flight finish, so long-lived "
                            "clients spread over restarted or added bridges (gRPC's "
                            "MAX_CONNECTION_AGE); 0 or unset: never (the default)")
    serve.add_argument("--max-tunnel-age-grace", type=float, metavar="SECONDS",
                       help="after the GOAWAY, seconds a retired tunnel's RPCs get to "
                            "finish before it is closed with 1001; the close comes at "
                            "the latest at the age plus twice this (default: 30)")
    serve.add_argument("--drain-timeout", type=float,
                       help="on SIGTERM/SIGINT, seconds tunnels get to finish (default: 10)")
    serve.add_argument("--certfile", help="PEM certificate chain: serve wss://")
    serve.add_argument("--keyfile", help="PEM private key for --certfile")
    serve.add_argument("--compression", action="store_true",
                       help="negotiate permessage-deflate when clients offer it")
    serve.add_argument("--metrics-listen", metavar="[HOST:]PORT",
                       help="serve /metrics, /healthz, /readyz here (bare port: loopback)")
    serve.add_argument("--allow-remote-metrics", action="store_true",
                       help="allow a non-loopback --metrics-listen")
    _add_common(serve)

    forward = commands.add_parser(
        "forward", help="listen locally and carry each connection through a WebSocket tunnel",
        description="Accept local gRPC connections; relay each through its own tunnel.")
    forward.add_argument("--target", required=True, help="bridge URL: ws://host:8080/grpc")
    forward.add_argument("--listen", help="host:port or unix:/path (default: 127.0.0.1:50052)")
    forward.add_argument("--header", action="append", default=[], metavar="NAME:VALUE",
                         help="extra upgrade request header (repeatable; not one the "
                         "handshake writes: Host, Upgrade, Connection, Sec-WebSocket-Key, "
                         "-Version, -Extensions, -Accept)")
    forward.add_argument("--subprotocol", action="append", dest="subprotocols",
                         metavar="NAME", help="subprotocol to offer (repeatable)")
    forward.add_argument("--origin", help="Origin header to send")
    forward.add_argument("--tls", action="store_const", const=True,
                         help="demand wss:// (a ws:// target is then an error)")
    forward.add_argument("--cacert", help="PEM CA bundle to verify a wss:// bridge")
    forward.add_argument("--handshake-timeout", type=float,
                         help="seconds for connect + proxy CONNECT + TLS + upgrade "
                              "(default: 10)")
    proxy = forward.add_mutually_exclusive_group()
    proxy.add_argument("--proxy", metavar="URL",
                       help="dial through this proxy: http://[user:password@]host:port "
                            "(HTTP CONNECT), socks5://, socks5h://, socks4:// or socks4a://; "
                            "default: "
                            "$https_proxy (wss://) or $http_proxy (ws://), else $all_proxy, "
                            "unless $no_proxy lists the target (credentials are safer there "
                            "than in argv)")
    proxy.add_argument("--no-proxy", action="store_true",
                       help="dial directly, ignoring the proxy variables")
    _add_common(forward)

    demo = commands.add_parser(
        "demo", help="serve the browser Todo demo (Python in the page calling gRPC)",
        description="Serve the Todo demo: a page whose Python (Pyodide) calls the Todo gRPC "
                    "service through the bridge. --terminal instead runs the service behind "
                    "a bridge and prints what each kind of call returned through a tunnel.")
    demo.add_argument("--terminal", action="store_true",
                      help="run the terminal demo (no browser) and exit")
    from .demo.web import add_arguments as add_web_demo_arguments

    add_web_demo_arguments(demo)  # with --log-level (default: info, warning with --terminal)
    return parser


ConfigT = TypeVar("ConfigT", BridgeConfig, ForwarderConfig)


def _config(cls: type[ConfigT], args: argparse.Namespace, **derived: Any) -> ConfigT:
    """``cls`` from the options whose dest is one of its fields (an option not given, None,
    keeps the field's default) and the ``derived`` fields."""
    names = {field.name for field in dataclasses.fields(cls) if field.init}
    given = {name: value for name, value in vars(args).items()
             if name in names and value is not None}
    return cls(**{**given, **derived})


def _bridge_config(args: argparse.Namespace) -> BridgeConfig:
    token = _token(args)
    metrics = args.metrics_listen
    if metrics is not None and ":" not in metrics:
        metrics = f"127.0.0.1:{metrics}"  # a bare port: loopback
    return _config(BridgeConfig, args, authenticate=BearerTokenAuth(token) if token else None,
                   metrics_listen=metrics)


def _forwarder_config(args: argparse.Namespace) -> ForwarderConfig:
    headers: dict[str, str] = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep:
            raise ConfigError(f"--header {item!r} must look like Name:value")
        headers[name.strip()] = value.strip()
    if args.proxy is not None and "@" in args.proxy:
        logger.warning(
            "the proxy credentials given in --proxy can be read by local users in the process "
            "list; put the proxy URL in $https_proxy or $http_proxy instead")
    return _config(ForwarderConfig, args, headers=headers, bearer_token=_token(args),
                   **({"proxy": None} if args.no_proxy else {}))


async def _run_until_signalled(server: Bridge | Forwarder,
                               worker: WorkerLink | None = None) -> None:
    loop = asyncio.get_running_loop()
    if worker is not None:
        assert isinstance(server, Bridge)
        await worker.start(server)
    else:
        await server.start()
    closing: asyncio.Task[None] | None = None

    def stop(signame: str) -> None:
        nonlocal closing
        if closing is None:
            logger.info("received %s, shutting down", signame)
            closing = loop.create_task(server.close())

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signal.Signals(signum).name)
    try:
        await server.serve_forever()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await (server.close() if closing is None else closing)  # a failed close raises
        if worker is not None:
            await worker.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # A worker of `serve --workers N`: its supervisor serves the metrics and counts workers.
    worker = WorkerLink.from_environment() if args.command == "serve" else None
    if worker is not None:
        args.metrics_listen, args.workers = None, 1
    level = args.log_level or ("warning" if getattr(args, "terminal", False) else "info")
    configure_logging(json_lines=getattr(args, "log_json", False),
                      level=getattr(logging, level.upper()),
                      common=None if worker is None else {"worker": worker.index,
                                                          "pid": os.getpid()})
    try:
        if args.command == "demo":
            if args.terminal:
                from .demo.terminal import run_demo

                return run(run_demo())
            from .demo.web import run_from_args

            return run_from_args(args)
        job: Coroutine[Any, Any, int | None]
        if args.command == "serve" and args.workers > 1:
            supervisor = Supervisor(_bridge_config(args),
                                    sys.argv[1:] if argv is None else argv, args.workers)
            job = supervisor.run()
        else:
            server: Bridge | Forwarder = (
                Bridge(_bridge_config(args)) if args.command == "serve"
                else Forwarder(_forwarder_config(args)))
            job = _run_until_signalled(server, worker)
            tune_allocator()  # the relaying processes (not the supervisor)
    except (ConfigError, OSError) as exc:
        parser.exit(2, f"grpcbridge {args.command}: error: {exc}\n")
    try:
        code = run(job, args.loop)
    except (ConfigError, OSError) as exc:  # while serving, an OSError (address in use) is 1
        parser.exit(1 if isinstance(exc, OSError) else 2,
                    f"grpcbridge {args.command}: error: {exc}\n")
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
