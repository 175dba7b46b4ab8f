"""The command line: clear errors for bad settings, tokens kept out of argv and logs."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest
import websockets.asyncio.client
from websockets.exceptions import InvalidStatus

from grpcbridge.demo import service, todo_pb2, todo_pb2_grpc

from support import cli


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "grpcbridge.cli", *args], capture_output=True, text=True,
        timeout=30, env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--backend", "10.1.2.3:50051"], "--allow-remote-backend"),
        (["serve", "--backend", "nonsense"], "not host:port or unix:/path"),
        (["serve", "--backend", "127.0.0.1:1", "--path", "grpc"], "path must start with '/'"),
        (["serve", "--backend", "127.0.0.1:1", "--certfile", "/nonexistent.pem",
          "--keyfile", "/nonexistent.key"], "does not exist"),
        (["serve", "--backend", "127.0.0.1:1", "--ping-interval", "30", "--idle-timeout", "10"],
         "must be longer than ping_interval"),
        (["serve", "--backend", "127.0.0.1:1", "--metrics-listen", "0.0.0.0:9464"],
         "--allow-remote-metrics"),
        (["forward", "--target", "ftp://host/grpc"], "use ws:// or wss://"),
        (["forward", "--target", "ws://host/grpc", "--tls"], "never downgrades"),
        (["forward", "--target", "ws://host/grpc", "--header", "novalue"], "Name:value"),
    ],
)
def test_bad_settings_exit_2_with_a_clear_message(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["serve", "--backend", "127.0.0.1:1"],
                                     ["forward", "--target", "ws://127.0.0.1:1/grpc"]])
@pytest.mark.parametrize("value", ["", "  \t"])
def test_empty_token_variable_refuses_to_start(command: list[str], value: str) -> None:
    """Set but empty must not silently turn authentication off (as a blank file does not)."""
    result = run(*command, "--listen", "127.0.0.1:0", env={"GRPCBRIDGE_TOKEN": value})
    assert result.returncode == 2, result.stderr
    assert "$GRPCBRIDGE_TOKEN is set but empty" in result.stderr
    assert "unset it" in result.stderr and "put the token in it" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_allowed_host_and_origin_wildcard_exit_2() -> None:
    for flag, value, message in (("--allowed-host", "b*.example.com", "allowed_hosts"),
                                 ("--allow-origin", "*example.com", "allowed_origins")):
        result = run("serve", "--backend", "127.0.0.1:1", flag, value)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "'*.'" in result.stderr


async def test_allowed_host_refuses_other_hosts_with_403() -> None:
    with cli(["serve", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1",
              "--allowed-host", "localhost"]) as bridge:
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.asyncio.client.connect(bridge.url, compression=None):
                pass
        assert refused.value.response.status_code == 403  # Host: 127.0.0.1:<port>
        async with websockets.asyncio.client.connect(
            bridge.url.replace("127.0.0.1", "localhost"), compression=None) as ws:
            await ws.wait_closed()  # admitted; backend 127.0.0.1:1 is down: 1011
        assert ws.close_code == 1011
        assert "host not allowed" in bridge.wait_for_line("upgrade_rejected")


def test_address_in_use_is_reported_without_traceback() -> None:
    with cli(["serve", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1"]) as bridge:
        result = run("serve", "--listen", f"127.0.0.1:{bridge.port}", "--backend", "127.0.0.1:1")
    assert result.returncode != 0
    assert "address already in use" in result.stderr.lower()
    assert "Traceback" not in result.stderr


async def test_token_from_environment_guards_the_bridge_and_is_never_logged() -> None:
    token = "tok-3f9a1c-very-secret"
    with cli(["serve", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1", "--log-json"],
             env={"GRPCBRIDGE_TOKEN": token}) as bridge:
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.asyncio.client.connect(bridge.url, compression=None):
                pass
        assert refused.value.response.status_code == 401
        async with websockets.asyncio.client.connect(
            bridge.url, compression=None, additional_headers={"Authorization": f"Bearer {token}"}
        ) as ws:
            await ws.wait_closed()  # backend 127.0.0.1:1 is down: the bridge closes with 1011
        assert ws.close_code == 1011
        bridge.wait_for_line(r'"event": "tunnel_closed"')
    assert token not in bridge.output()
    assert '"event": "upgrade_rejected"' in bridge.output()


async def test_401_challenges_with_www_authenticate() -> None:
    with cli(["serve", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1"],
             env={"GRPCBRIDGE_TOKEN": "tok-3f9a1c"}) as bridge, \
            pytest.raises(InvalidStatus) as refused:
        async with websockets.asyncio.client.connect(bridge.url, compression=None):
            pass
    assert refused.value.response.status_code == 401
    assert refused.value.response.headers["WWW-Authenticate"] == 'Bearer realm="grpcbridge"'


def test_help_lists_the_commands() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("serve", "forward", "demo"):
        assert command in result.stdout


def test_uvloop_forwarder_and_bridge_lose_no_early_bytes() -> None:
    """uvloop delivers a new connection's first bytes despite the forwarder pausing it until
    the WebSocket opens; they must wait for the handshake, not vanish."""
    server, _servicer, port = service.serve("127.0.0.1:0")
    try:
        with cli(["serve", "--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{port}",
                  "--loop", "uvloop"]) as bridge, \
             cli(["forward", "--listen", "127.0.0.1:0", "--target", bridge.url,
                  "--loop", "uvloop"]) as forwarder:
            for index in range(10):  # each channel is a new connection, hence a new tunnel
                with grpc.insecure_channel(forwarder.listen) as channel:
                    reply = todo_pb2_grpc.TodoServiceStub(channel).CreateTodo(
                        todo_pb2.CreateTodoRequest(text=f"todo {index}"), timeout=10)
                assert reply.text == f"todo {index}"
    finally:
        server.stop(None).wait()


@pytest.mark.parametrize(("flags", "expected"), [
    ([], "uvloop"),  # --loop auto: uvloop, which the dev extras install
    (["--loop", "asyncio"], "asyncio"),
    (["--loop", "uvloop"], "uvloop"),
])
def test_loop_choice_is_logged(flags: list[str], expected: str) -> None:
    with cli(["serve", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9", *flags]) as bridge, \
         cli(["forward", "--listen", "127.0.0.1:0", "--target", bridge.url, *flags]) as forwarder:
        assert f"loop={expected}" in bridge.wait_for_line("bridge_started")
        assert f"loop={expected}" in forwarder.wait_for_line("forwarder_started")


def test_terminal_demo_prints_every_kind_of_call() -> None:
    result = run("demo", "--terminal")
    assert result.returncode == 0, result.stderr
    for line in ("unary          CreateTodo -> id=", "client stream  BulkCreateTodos(3 requests)"
                 " -> created_count=3", "server stream  StreamTodos -> 4 todos",
                 "bidi stream    SyncTodos(update, delete) -> todo 'write the bridge' done=True"):
        assert line in result.stdout


def test_trust_trace_context_flag_reaches_the_config() -> None:
    from grpcbridge.cli import _bridge_config, build_parser

    for flags, trusted in (([], False), (["--trust-trace-context"], True)):
        args = build_parser().parse_args(["serve", "--backend", "127.0.0.1:50051", *flags])
        assert _bridge_config(args).trust_trace_context is trusted
    assert "--trust-trace-context" in run("serve", "--help").stdout


def test_trust_trace_context_must_be_a_bool() -> None:
    from grpcbridge import BridgeConfig
    from grpcbridge.core.errors import ConfigError

    with pytest.raises(ConfigError, match="trust_trace_context must be True or False"):
        BridgeConfig(backend="127.0.0.1:50051", trust_trace_context="yes")  # type: ignore[arg-type]


def test_every_option_reaches_its_config_field() -> None:
    from grpcbridge.cli import _bridge_config, _forwarder_config, build_parser

    parse = build_parser().parse_args
    serve = _bridge_config(parse([
        "serve", "--backend", "127.0.0.1:50051", "--listen", "127.0.0.1:9000", "--path", "/t",
        "--backend-timeout", "3", "--allow-origin", "https://a.example", "--allowed-host",
        "b.example", "--subprotocol", "p1", "--client-memory-budget", "40000000",
        "--memory-budget", "90000000", "--max-connections", "7",
        "--max-connections-per-client", "3", "--max-upgrades-per-minute", "9",
        "--trusted-proxy", "10.0.0.0/8", "--max-tunnel-age", "60", "--max-tunnel-age-grace",
        "5", "--drain-timeout", "4", "--compression", "--metrics-listen", "9464",
        "--max-message-bytes", "2048", "--buffer-bytes", "8192", "--ping-interval", "6",
        "--idle-timeout", "13"]))
    assert (serve.listen, serve.path, serve.backend_connect_timeout) == ("127.0.0.1:9000",
                                                                        "/t", 3.0)
    assert (serve.allowed_origins, serve.allowed_hosts, serve.subprotocols) \
        == (("https://a.example",), ("b.example",), ("p1",))
    assert (serve.client_memory_budget, serve.memory_budget, serve.max_connections,
            serve.max_connections_per_client, serve.max_upgrades_per_minute) \
        == (40_000_000, 90_000_000, 7, 3, 9)
    assert [str(net) for net in serve.trusted_proxies] == ["10.0.0.0/8"]
    assert (serve.max_tunnel_age, serve.max_tunnel_age_grace, serve.drain_timeout) == (60, 5, 4)
    assert (serve.compression, serve.metrics_listen) == (True, "127.0.0.1:9464")
    assert (serve.max_message_bytes, serve.buffer_bytes, serve.ping_interval,
            serve.idle_timeout) == (2048, 8192, 6, 13)
    default = _bridge_config(parse(["serve", "--backend", "127.0.0.1:50051"]))
    assert default.subprotocols == ("grpcbridge",) and default.authenticate is None

    forward = _forwarder_config(parse([
        "forward", "--target", "wss://bridge.example/grpc", "--listen", "127.0.0.1:9001",
        "--header", "X-A: 1", "--subprotocol", "p2", "--origin", "https://o.example", "--tls",
        "--handshake-timeout", "7", "--no-proxy", "--max-message-bytes", "4096",
        "--buffer-bytes", "16384", "--ping-interval", "8", "--idle-timeout", "17"]))
    assert (forward.target, forward.listen, dict(forward.headers)) == (
        "wss://bridge.example/grpc", "127.0.0.1:9001", {"X-A": "1"})
    assert (forward.subprotocols, forward.origin, forward.tls, forward.proxy) == (
        ("p2",), "https://o.example", True, None)
    assert (forward.handshake_timeout, forward.max_message_bytes, forward.buffer_bytes,
            forward.ping_interval, forward.idle_timeout) == (7, 4096, 16384, 8, 17)
