"""Clients through real proxies: Debian's tinyproxy (HTTP CONNECT) and microsocks (SOCKS5),
started per module on loopback with their own config (``.ci/run`` installs both; without
them these tests are skipped, or fail under ``GRPCBRIDGE_REQUIRE_PROXY=1`` as in CI).

* ``grpcbridge.Channel``, ``sync_channel`` and ``grpcbridge forward --proxy`` reach a real
  bridge through the proxy, with and without Basic auth; wss:// with TLS end to end;
* the proxy's 407, 403 and 5xx, and an unreachable proxy, give clear errors; the password
  never shows in errors or logs;
* the standard variables are read by default (``HTTP_PROXY`` for ws://, ``HTTPS_PROXY`` for
  wss://), ``NO_PROXY`` bypasses them (the proxy logs no CONNECT) and ``proxy=None`` /
  ``--no-proxy`` turn them off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpclib.client import Channel as GrpclibChannel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

import grpcbridge
from grpcbridge import Bridge, BridgeConfig, Channel, GrpclibBackend, ReconnectPolicy
from grpcbridge.client.dial import DialSettings, open_websocket
from grpcbridge.core.errors import HandshakeError
from grpcbridge.core.proxy import resolve_proxy
from grpcbridge.core.target import parse_target
from grpcbridge.demo import todo_pb2, todo_pb2_grpc
from grpcbridge.demo.grpclib_service import TodoService
from grpcbridge.demo.store import TodoStore
from grpcbridge.demo.todo_grpc import TodoServiceStub

from support import (
    accepts,
    cli,
    free_port,
    timing,
    tls_files,
    wait_until,
)

USER, PASSWORD = "grpc", "pr0xy-s3cret"
FAST = ReconnectPolicy(initial_delay=0.05, max_delay=0.2, jitter=0.1, min_connect_timeout=5)
LIST = todo_pb2.ListTodosRequest()


def _require(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        reason = f"{program} is not installed (apt-get install {program}; .ci/run does)"
        if os.environ.get("GRPCBRIDGE_REQUIRE_PROXY") == "1":  # set by .ci/run
            pytest.fail(f"GRPCBRIDGE_REQUIRE_PROXY=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return path


class ProxyServer:
    """A proxy program in the foreground on a free loopback port, its output in a file."""

    def __init__(self, command: list[str], port: int, log: Path) -> None:
        self.port = port
        self.log = log
        with log.open("w") as out:
            self.popen = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT)
        wait_until(lambda: self.popen.poll() is not None or accepts(port), 10,
                   message=lambda: f"{command[0]} did not listen:\n{self.output()}")
        assert self.popen.poll() is None, f"{command[0]} exited:\n{self.output()}"

    def url(self, scheme: str = "http", userinfo: str = "") -> str:
        return f"{scheme}://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def connects(self, port: int) -> int:
        """CONNECT requests for ``port`` logged so far (tinyproxy)."""
        return len(re.findall(rf"Request \(file descriptor \d+\): CONNECT \S+:{port} ",
                              self.output()))

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(timing(10))
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def tinyproxy(directory: Path, *extra: str) -> Iterator[ProxyServer]:
    program = _require("tinyproxy")
    port = free_port()  # tinyproxy cannot pick its own (no Port 0)
    conf = directory / "tinyproxy.conf"
    conf.write_text("\n".join([f"Port {port}", "Listen 127.0.0.1", "Timeout 30",
                               "LogLevel Connect", "MaxClients 50", *extra]) + "\n")
    server = ProxyServer([program, "-d", "-c", str(conf)], port, directory / "tinyproxy.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def open_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyServer]:
    """CONNECT to any port, no auth."""
    yield from tinyproxy(tmp_path_factory.mktemp("open"))


@pytest.fixture(scope="module")
def auth_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyServer]:
    yield from tinyproxy(tmp_path_factory.mktemp("auth"), f"BasicAuth {USER} {PASSWORD}")


@pytest.fixture(scope="module")
def refusing_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyServer]:
    """CONNECT only to port 1: every bridge is refused with 403."""
    yield from tinyproxy(tmp_path_factory.mktemp("refusing"), "ConnectPort 1")


@pytest.fixture(scope="module")
def socks_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyServer]:
    program = _require("microsocks")
    port = free_port()
    server = ProxyServer([program, "-i", "127.0.0.1", "-p", str(port), "-u", USER,
                          "-P", PASSWORD], port, tmp_path_factory.mktemp("socks") / "log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module", autouse=True)
def _grpc_warmed_up(_grpc_warmed_up: None) -> None:
    """conftest's, and a grpcio client's (its process-wide threads and descriptors too)."""
    with grpc.insecure_channel(f"127.0.0.1:{free_port()}") as channel, \
            contextlib.suppress(grpc.RpcError):
        todo_pb2_grpc.TodoServiceStub(channel).ListTodos(LIST, timeout=0.5)


@pytest.fixture
async def bridge(leak_check: None) -> AsyncIterator[Bridge]:
    """A bridge, closed before ``leak_check`` looks (so its side of each tunnel is gone)."""
    store = TodoStore()
    store.create("first")
    try:
        async with Bridge(BridgeConfig(backend=GrpclibBackend([TodoService(store)]),
                                       listen="127.0.0.1:0")) as running:
            yield running
    finally:
        store.close()


def port_of(bridge: Bridge) -> int:
    assert bridge.address is not None
    return bridge.address[1]


async def list_through(url: str, **options: object) -> int:
    """Todos listed by a fresh Channel (which must succeed)."""
    async with Channel(url, reconnect=FAST, **options) as channel:  # type: ignore[arg-type]
        return len((await TodoServiceStub(channel).ListTodos(LIST)).todos)


async def failure(url: str, **options: object) -> str:
    """The UNAVAILABLE message of an RPC on a fresh Channel (which must fail)."""
    async with Channel(url, reconnect=FAST, **options) as channel:  # type: ignore[arg-type]
        with pytest.raises(GRPCError) as failed:
            await TodoServiceStub(channel).ListTodos(LIST)
    assert failed.value.status is Status.UNAVAILABLE
    return failed.value.message or ""


# ------------------------------------------------------------------ through the proxy


async def test_channel_through_http_connect(bridge: Bridge, open_proxy: ProxyServer,
                                            leak_check: None) -> None:
    before = open_proxy.connects(port_of(bridge))
    assert await list_through(bridge.url, proxy=open_proxy.url()) == 1
    assert open_proxy.connects(port_of(bridge)) == before + 1


async def test_basic_auth_and_407_never_show_the_password(
        bridge: Bridge, auth_proxy: ProxyServer, leak_check: None,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    port = port_of(bridge)
    assert await list_through(bridge.url, proxy=auth_proxy.url(userinfo=f"{USER}:{PASSWORD}"))
    message = await failure(bridge.url, proxy=auth_proxy.url())
    assert message == (f"proxy 127.0.0.1:{auth_proxy.port} answered HTTP 407 Proxy "
                       "Authentication Required: proxy authentication required (give "
                       "user:password in the proxy URL)")
    message = await failure(bridge.url, proxy=auth_proxy.url(userinfo=f"{USER}:wrong-{PASSWORD}"))
    assert message.endswith("(the user:password in the proxy URL were refused)"), message
    assert auth_proxy.connects(port) == 3
    logged = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    assert "tunnel_closed" in logged, "nothing was logged: the check below would prove nothing"
    assert PASSWORD not in logged


async def test_proxy_refusals_are_clear(bridge: Bridge, open_proxy: ProxyServer,
                                        refusing_proxy: ProxyServer, leak_check: None) -> None:
    port = port_of(bridge)
    message = await failure(bridge.url, proxy=refusing_proxy.url())
    assert message == (f"proxy 127.0.0.1:{refusing_proxy.port} answered HTTP 403 Access "
                       f"violation: proxy refused CONNECT to 127.0.0.1:{port}")
    closed = free_port()
    message = await failure(f"ws://127.0.0.1:{closed}/grpc", proxy=open_proxy.url())
    # tinyproxy says 500 where squid says 503 and others 502: all mean "could not reach".
    assert re.fullmatch(rf"proxy 127\.0\.0\.1:{open_proxy.port} answered HTTP 50[0234] .*: "
                        rf"proxy could not reach the bridge at 127\.0\.0\.1:{closed}",
                        message), message
    nowhere = free_port()
    message = await failure(bridge.url, proxy=f"http://{USER}:{PASSWORD}@127.0.0.1:{nowhere}")
    assert message.startswith(f"cannot connect to proxy 127.0.0.1:{nowhere} (from proxy): "),\
        message
    assert PASSWORD not in message


@pytest.mark.parametrize("proxy", ["refusing", "unreachable"])
async def test_forwarder_dial_through_a_refusing_proxy_fails_cleanly(
        bridge: Bridge, refusing_proxy: ProxyServer, leak_check: None, proxy: str) -> None:
    """The forwarder's (picows) dial: the proxy's refusal is its HandshakeError, and the
    tunnel ends with nothing left behind (``leak_check``; ``tunnel.closed``)."""
    port = port_of(bridge)
    target = parse_target(bridge.url)
    url = refusing_proxy.url() if proxy == "refusing" else f"http://127.0.0.1:{free_port()}"
    settings = DialSettings(target=target, proxy=resolve_proxy(target, url, {}),
                            handshake_timeout=timing(5))
    tunnel = settings.new_tunnel(asyncio.get_running_loop(), "client")
    with pytest.raises(HandshakeError) as caught:
        await open_websocket(tunnel, settings)
    async with asyncio.timeout(timing(5)):
        await tunnel.closed
    if proxy == "refusing":
        assert str(caught.value) == (
            f"proxy 127.0.0.1:{refusing_proxy.port} answered HTTP 403 Access violation: "
            f"proxy refused CONNECT to 127.0.0.1:{port}")
        assert caught.value.proxy_status == 403
    else:
        assert str(caught.value).startswith(f"cannot connect to proxy {url[7:]} "), caught.value
    assert tunnel.ws_transport is None  # the proxy's socket was closed, never wrapped


async def test_wss_through_the_proxy_is_tls_to_the_bridge(
        open_proxy: ProxyServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        leak_check: None) -> None:
    ca_pem, cert_pem, key_pem = tls_files(tmp_path)
    # wss:// takes HTTPS_PROXY; the dead HTTP_PROXY would fail the call if it were used.
    monkeypatch.setenv("HTTPS_PROXY", open_proxy.url())
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    store = TodoStore()
    try:
        async with Bridge(BridgeConfig(backend=GrpclibBackend([TodoService(store)]),
                                       listen="127.0.0.1:0", certfile=str(cert_pem),
                                       keyfile=str(key_pem))) as bridge:
            assert bridge.url.startswith("wss://")
            before = open_proxy.connects(port_of(bridge))
            trusting = ssl.create_default_context(cafile=str(ca_pem))
            assert await list_through(bridge.url, ssl=trusting) == 0
            # The proxy only relays bytes: the bridge's certificate is checked by the client.
            message = await failure(bridge.url)
            assert "CERTIFICATE_VERIFY_FAILED" in message, message
            assert open_proxy.connects(port_of(bridge)) == before + 2
            # The forwarder (picows framing) dials the same way: TLS over the proxy's tunnel.
            config = grpcbridge.ForwarderConfig(target=bridge.url, listen="127.0.0.1:0",
                                                cacert=str(ca_pem))
            async with grpcbridge.Forwarder(config) as forwarder:
                assert forwarder.address is not None
                channel = GrpclibChannel(*forwarder.address)
                try:
                    assert len((await TodoServiceStub(channel).ListTodos(LIST)).todos) == 0
                finally:
                    channel.close()
            assert open_proxy.connects(port_of(bridge)) == before + 3
    finally:
        store.close()


async def test_socks5_with_auth_and_remote_dns(bridge: Bridge, socks_proxy: ProxyServer,
                                               leak_check: None) -> None:
    userinfo = f"{USER}:{PASSWORD}"
    assert await list_through(bridge.url, proxy=socks_proxy.url("socks5", userinfo)) == 1
    # socks5h: the proxy resolves the bridge's name.
    by_name = bridge.url.replace("127.0.0.1", "localhost")
    assert await list_through(by_name, proxy=socks_proxy.url("socks5h", userinfo)) == 1
    message = await failure(bridge.url, proxy=socks_proxy.url("socks5", f"{USER}:wrong"))
    assert message.startswith(f"SOCKS5 proxy 127.0.0.1:{socks_proxy.port} opened no tunnel "
                              f"to 127.0.0.1:{port_of(bridge)}: "), message
    assert PASSWORD not in message


# ------------------------------------------------------------------ the environment


async def test_proxy_variables_no_proxy_and_proxy_none(
        bridge: Bridge, open_proxy: ProxyServer, monkeypatch: pytest.MonkeyPatch,
        leak_check: None) -> None:
    port = port_of(bridge)
    before = open_proxy.connects(port)
    monkeypatch.setenv("HTTP_PROXY", open_proxy.url())
    assert await list_through(bridge.url) == 1
    assert open_proxy.connects(port) == before + 1

    for no_proxy in ("127.0.0.1", f"example.com, 127.0.0.1:{port}", "*", "127.0.0.0/8"):
        monkeypatch.setenv("NO_PROXY", no_proxy)
        assert await list_through(bridge.url) == 1
    monkeypatch.setenv("NO_PROXY", f"127.0.0.1:{port + 1},example.com")
    assert await list_through(bridge.url) == 1
    assert open_proxy.connects(port) == before + 2  # only the last one went through it

    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing there
    assert await list_through(bridge.url, proxy=None) == 1
    message = await failure(bridge.url)
    assert message.startswith("cannot connect to proxy 127.0.0.1:"), message
    assert "(from $HTTP_PROXY)" in message


async def test_an_invalid_proxy_variable_is_refused_when_the_channel_is_made(
        bridge: Bridge, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("http_proxy", f"ftp://{USER}:{PASSWORD}@proxy")
    with pytest.raises(grpcbridge.ConfigError) as failed:
        Channel(bridge.url)
    assert str(failed.value).startswith(f"$http_proxy 'ftp://{USER}:***@proxy' has "
                                        "unsupported scheme 'ftp'")


# ------------------------------------------------------------------ grpcio clients


def test_forward_and_sync_channel_through_the_proxy(
        open_proxy: ProxyServer, auth_proxy: ProxyServer, leak_check: None) -> None:
    store = TodoStore()
    threaded = grpcbridge.ThreadedBridge(BridgeConfig(
        backend=GrpclibBackend([TodoService(store)]), listen="127.0.0.1:0"))
    try:
        with threaded:
            port = int(threaded.url.rsplit(":", 1)[1].split("/")[0])
            proxy = auth_proxy.url(userinfo=f"{USER}:{PASSWORD}")
            with cli(["forward", "--listen", "127.0.0.1:0", "--target", threaded.url,
                      "--proxy", proxy]) as forwarder:
                started = forwarder.wait_for_line("forwarder_started")
                assert f"proxy=http://{USER}:***@127.0.0.1:{auth_proxy.port} proxy_from=proxy" \
                    in started
                with grpc.insecure_channel(forwarder.listen) as channel:
                    stub = todo_pb2_grpc.TodoServiceStub(channel)
                    stub.CreateTodo(todo_pb2.CreateTodoRequest(text="via proxy"), timeout=10)
                forwarder.wait_for_line(r"\btunnel_opened\b")
            assert PASSWORD not in forwarder.output()
            assert "can be read by local users in the process list" in forwarder.output()
            assert auth_proxy.connects(port) == 1

            # --no-proxy ignores the variables the forwarder inherits.
            env = {"HTTP_PROXY": f"http://127.0.0.1:{free_port()}"}
            with cli(["forward", "--listen", "127.0.0.1:0", "--target", threaded.url,
                      "--no-proxy"], env=env) as forwarder, \
                    grpc.insecure_channel(forwarder.listen) as channel:
                reply = todo_pb2_grpc.TodoServiceStub(channel).ListTodos(LIST, timeout=10)
                assert [t.text for t in reply.todos] == ["via proxy"]

            before = open_proxy.connects(port)
            with grpcbridge.sync_channel(threaded.url, proxy=open_proxy.url()) as channel:
                reply = todo_pb2_grpc.TodoServiceStub(channel).ListTodos(LIST, timeout=10)
                assert len(reply.todos) == 1
            assert open_proxy.connects(port) == before + 1
    finally:
        store.close()


def test_cli_proxy_options() -> None:
    for args, message in (
        (["--proxy", "http://p:1", "--no-proxy"], "not allowed with argument"),
        (["--proxy", f"ftp://{USER}:{PASSWORD}@p"], "unsupported scheme 'ftp'"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "grpcbridge.cli", "forward",
             "--target", "ws://127.0.0.1:1/grpc", *args],
            capture_output=True, text=True, timeout=timing(30))
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert PASSWORD not in result.stderr
