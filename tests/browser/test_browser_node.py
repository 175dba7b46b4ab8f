"""grpcbridge.browser end to end: Python in Pyodide under Node, through a real Bridge.

One Node process (``tests/browser/run_node.mjs``) boots Pyodide once, installs the wheels of
``build/browser`` and runs every scenario of ``tests/browser/scenarios.py`` in order; this
module serves what they talk to and asserts on each scenario's result:

* bridges (in-process :class:`grpcbridge.Bridge`) in front of the grpcio Todo service (the
  test oracle of tests/todo_oracle.py: the scenarios use its metadata echo and ``fail:``
  errors): the main one, one that the test closes while a stream runs, one with a short idle
  timeout, one that demands a bearer token and one that retires tunnels at a short age;
* a raw WebSocket server (websockets) for wire-level cases: a slow sink, a server that sends
  bytes before the client is ready, one that sends a text message, one that closes soon,
  and a relay to the Todo service that closes right after each response's last frame.

The scenarios run under the npm ``ws`` WebSocket and again under Node's own (undici), which
follows the browser spec (Node 20 gets ``--experimental-websocket`` when it accepts it); the
tests are parametrised ``[ws]`` / ``[native]``. ``BROWSER_SCENARIOS=unary,bulk`` runs a
subset; ``BROWSER_NODE_FLAGS`` adds Node flags.

Needs ``node`` >= 20, ``npm ci`` (node_modules/pyodide, node_modules/ws) and the bundle
(``python scripts/build_browser_bundle.py``); skipped with the reason otherwise, or failed
with ``GRPCBRIDGE_REQUIRE_NODE=1`` (as in CI). The bundle is rebuilt here when the sources
changed since it was built (so the tests never run stale code).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from todo_oracle import serve as serve_todo
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from grpcbridge import BearerTokenAuth, Bridge, BridgeConfig
from grpcbridge.browser import private_close_code
from grpcbridge.observability import PRESET_CLOSE_CODES

from support import (
    ROOT,
    TIMING,
    build_browser_bundle,
    eventually,
    free_port,
    sample,
    skip_or_fail,
    timing,
)

HARNESS = Path(__file__).resolve().with_name("run_node.mjs")
BUNDLE = ROOT / "build" / "browser"
MiB = 1024 * 1024
TOKEN = "browser-test-token.42"
#: The age bridge's ``max_tunnel_age`` (jittered +/- 10 % per tunnel) and grace: the
#: tunnel_ages scenario's stream outlives several ages but ends well within the grace.
TUNNEL_AGE = timing(0.6)
TUNNEL_AGE_GRACE = timing(15.0)
NODE_TIMEOUT = timing(100.0)  # below pytest-timeout's 120 s (scaled alike): this message wins


#: The oldest Node the tests run on (the first with a WebSocket of its own, behind a flag).
MIN_NODE = 20


def _missing() -> str | None:
    if shutil.which("node") is None:
        return f"node is not installed (apt-get install nodejs; >= {MIN_NODE})"
    version = subprocess.run(["node", "--version"], capture_output=True, text=True,
                             timeout=30).stdout.strip()
    major = version.lstrip("v").partition(".")[0]
    if not major.isdigit() or int(major) < MIN_NODE:
        return f"node {version or '(no version)'} is too old: grpcbridge needs >= {MIN_NODE}"
    for package in ("pyodide/pyodide.mjs", "ws/package.json"):
        if not (ROOT / "node_modules" / package).is_file():
            return f"node_modules/{package} is missing: run `npm ci` in the repository root"
    if not (BUNDLE / "manifest.json").is_file():
        return "build/browser is missing: run `python scripts/build_browser_bundle.py`"
    return None


def pattern(size: int) -> bytes:
    """What /early sends (tests/browser/scenarios.py has the same function)."""
    return bytes(i % 251 for i in range(251)) * (size // 251) + bytes(range(size % 251))


# --------------------------------------------------------------- raw test server


@dataclass
class RawServer:
    """Wire-level behaviours the bridge would never show; results per ``?id=``."""

    backend_port: int
    records: dict[str, dict[str, Any]] = field(default_factory=dict)

    async def handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        parts = urlsplit(ws.request.path)
        query = {key: values[0] for key, values in parse_qs(parts.query).items()}
        record = self.records.setdefault(query.get("id", parts.path), {})
        with contextlib.suppress(ConnectionClosed):
            await getattr(self, "mode_" + parts.path.strip("/").replace("-", "_"))(
                ws, query, record)
        record["close_code"] = ws.close_code

    async def mode_sink(self, ws: ServerConnection, query: dict[str, str],
                        record: dict[str, Any]) -> None:
        await asyncio.sleep(float(query.get("stall", 0)))
        delay = float(query.get("delay", 0))
        digest = hashlib.sha256()
        size = messages = 0
        try:
            async for message in ws:
                assert isinstance(message, bytes)
                digest.update(message)
                size += len(message)
                messages += 1
                if delay:
                    await asyncio.sleep(delay)
        finally:
            record.update(sha256=digest.hexdigest(), bytes=size, messages=messages)

    async def mode_early(self, ws: ServerConnection, query: dict[str, str],
                         record: dict[str, Any]) -> None:
        data = pattern(int(query["bytes"]))
        chunk = int(query.get("chunk", 48 * 1024))
        for offset in range(0, len(data), chunk):
            await ws.send(data[offset:offset + chunk])
        await ws.send(b"")
        async for _ in ws:
            pass

    async def mode_text(self, ws: ServerConnection, query: dict[str, str],
                        record: dict[str, Any]) -> None:
        await ws.recv()  # the client's HTTP/2 preface: the RPC has started
        await ws.send("this is a text message")
        async for _ in ws:
            pass

    async def mode_close_soon(self, ws: ServerConnection, query: dict[str, str],
                              record: dict[str, Any]) -> None:
        await asyncio.sleep(int(query.get("ms", 150)) / 1000)
        await ws.close(1001, "closing soon")

    async def mode_relay_close(self, ws: ServerConnection, query: dict[str, str],
                               record: dict[str, Any]) -> None:
        """Relay to the Todo service; right after the first frame that ends a response
        (HEADERS with END_STREAM), send it and close the WebSocket with 1000."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.backend_port)

        async def upstream() -> None:
            with contextlib.suppress(ConnectionClosed, ConnectionError):
                async for message in ws:
                    assert isinstance(message, bytes)
                    writer.write(message)
                    await writer.drain()

        task = asyncio.create_task(upstream())
        buffer = bytearray()
        try:
            while data := await reader.read(65536):
                buffer += data
                offset, end = 0, None
                while len(buffer) - offset >= 9:
                    length = int.from_bytes(buffer[offset:offset + 3], "big")
                    kind, flags = buffer[offset + 3], buffer[offset + 4]
                    stream_id = int.from_bytes(buffer[offset + 5:offset + 9], "big") & 0x7FFFFFFF
                    if len(buffer) - offset < 9 + length:
                        break
                    offset += 9 + length
                    if kind == 0x1 and flags & 0x1 and stream_id:
                        end = offset
                        break
                if end is not None:
                    await ws.send(bytes(buffer[:end]))
                    record["closes"] = record.get("closes", 0) + 1
                    await ws.close(1000, "response sent")
                    return
                if offset:
                    await ws.send(bytes(buffer[:offset]))
                    del buffer[:offset]
        finally:
            task.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


# ------------------------------------------------------------------ the Node run


@dataclass
class NodeRun:
    results: dict[str, dict[str, Any]]
    timing: dict[str, float]
    raw: dict[str, dict[str, Any]]
    stderr: str
    seconds: float
    #: Whether Node had a WebSocket of its own (the scenarios then ran under it too).
    native: bool


def _node_flags() -> list[str]:
    """Flags that give Node its own (undici, spec-following) WebSocket, if it has one."""
    check = "process.exit(typeof WebSocket === 'function' ? 0 : 1)"
    for flags in ([], ["--experimental-websocket"]):
        probe = subprocess.run(["node", *flags, "-e", check], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return flags
    return []


async def _age_stats(bridge: Bridge) -> dict[str, float]:
    """The age bridge's tunnel counters for the ``tunnel_ages`` scenario, once its tunnels
    are closed (or as they are after 10 s: the scenario's assertions then say what is open)."""
    await eventually(lambda: bridge.active_tunnels == 0, 10, fail=False)
    stats = {"active": float(bridge.active_tunnels),
             "accepted": sample(bridge, "grpcbridge_upgrades_accepted_total"),
             "retired": sample(bridge, "grpcbridge_tunnels_retired_total")}
    for code in PRESET_CLOSE_CODES:
        stats[f"closed_{code}"] = sample(bridge, "grpcbridge_tunnels_closed_total",
                                         code=str(code))
    return stats


async def _run_node(backend_port: int) -> NodeRun:
    base = {"backend": f"127.0.0.1:{backend_port}", "listen": "127.0.0.1:0",
            "max_upgrades_per_minute": 0}
    bridges = {
        "main": Bridge(BridgeConfig(**base)),
        "close": Bridge(BridgeConfig(**base)),
        "idle": Bridge(BridgeConfig(**base, ping_interval=0, idle_timeout=0.6)),
        "auth": Bridge(BridgeConfig(**base, authenticate=BearerTokenAuth(TOKEN))),
        "age": Bridge(BridgeConfig(**base, max_tunnel_age=TUNNEL_AGE,
                                   max_tunnel_age_grace=TUNNEL_AGE_GRACE)),
    }
    raw = RawServer(backend_port)
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        for bridge in bridges.values():
            await stack.enter_async_context(bridge)
        server = await stack.enter_async_context(serve(
            raw.handle, "127.0.0.1", 0, subprotocols=["grpcbridge"],
            compression=None, max_size=None, max_queue=4))
        raw_port = server.sockets[0].getsockname()[1]
        main_host, main_port = bridges["main"].address or ("", 0)
        config = {
            "bridge": bridges["main"].url,
            "bridge_authority": f"{main_host}:{main_port}",
            "bridge_close": bridges["close"].url,
            "bridge_idle": bridges["idle"].url,
            "bridge_auth": bridges["auth"].url,
            "bridge_age": bridges["age"].url,
            "token": TOKEN,
            "raw": f"ws://127.0.0.1:{raw_port}",
            "dead": f"ws://127.0.0.1:{free_port()}/grpc",
            "bulk_bytes": 64 * MiB,
            "native_bulk_bytes": 16 * MiB,
            "only": [name for name in os.environ.get("BROWSER_SCENARIOS", "").split(",")
                     if name],
            "timing": TIMING,
        }
        node_flags = _node_flags() + os.environ.get("BROWSER_NODE_FLAGS", "").split()
        process = await asyncio.create_subprocess_exec(
            "node", *node_flags, str(HARNESS), "--bundle", str(BUNDLE),
            "--config", json.dumps(config),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, limit=64 * MiB, cwd=ROOT)
        assert process.stdin and process.stdout and process.stderr
        stderr_task = asyncio.create_task(process.stderr.read())
        final: dict[str, Any] = {}
        try:
            async with asyncio.timeout(NODE_TIMEOUT):
                while line := await process.stdout.readline():
                    message = json.loads(line)
                    if "signal" in message:
                        reply = "ok"
                        if message["signal"] == "close_bridge":
                            await bridges["close"].close(drain_timeout=0)
                        elif message["signal"] == "age_stats":
                            reply = json.dumps(await _age_stats(bridges["age"]))
                        process.stdin.write(reply.encode() + b"\n")
                        await process.stdin.drain()
                    elif "results" in message:
                        final = message
                await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        stderr = (await stderr_task).decode(errors="replace")
    if not final:
        raise AssertionError(f"the Node harness exited with {process.returncode} and no "
                             f"results; stderr:\n{stderr[-6000:]}")
    return NodeRun(results=final["results"], timing=final["timing"], raw=raw.records,
                   stderr=stderr, seconds=time.monotonic() - started,
                   native=bool(final["native_websocket"]))


@pytest.fixture(scope="module")
def node_run() -> Iterator[NodeRun]:
    reason = _missing()
    if reason is not None:
        skip_or_fail(reason, "GRPCBRIDGE_REQUIRE_NODE")
    build_browser_bundle()
    grpc_server, servicer, port = serve_todo("127.0.0.1:0")
    try:
        yield asyncio.run(_run_node(port))
    finally:
        grpc_server.stop(0).wait()
        servicer.store.close()


@pytest.fixture(params=["ws", "native"])
def impl(request: pytest.FixtureRequest, node_run: NodeRun) -> str:
    """The WebSocket implementation under Pyodide: the npm `ws` package, or Node's own
    (undici, which follows the browser spec: e.g. scripts cannot send close code 1003)."""
    if request.param == "native" and not node_run.native:
        pytest.skip("this Node has no WebSocket of its own (Node 20 needs "
                    "--experimental-websocket, which it refused)")
    return str(request.param)


def scenario(run: NodeRun, name: str, impl: str = "ws") -> dict[str, Any]:
    """The scenario's result; fails with its traceback (and the harness log) if it failed."""
    key = name if impl == "ws" else f"{impl}:{name}"
    if key not in run.results:
        pytest.skip(f"scenario {name} not selected (BROWSER_SCENARIOS)")
    result = run.results[key]
    if not result["ok"]:
        pytest.fail(f"scenario {name} failed:\n{result['error']}\n--- harness stderr (tail):\n"
                    f"{run.stderr[-4000:]}", pytrace=False)
    assert not result["loop_errors"], f"{name}: event loop errors {result['loop_errors']}"
    return result


def raw(run: NodeRun, name: str, impl: str) -> dict[str, Any]:
    """What the raw test server recorded for a scenario's connection."""
    return run.raw[name if impl == "ws" else f"native-{name}"]


def wire_code(code: int, impl: str) -> int:
    """The close code a client sends for ``code``: spec-following WebSockets (browsers,
    Node's own) may not send 1003/1009/1011 and send 4003/4009/4011 instead."""
    return code if impl == "ws" else private_close_code(code)


# ------------------------------------------------------------------------ tests


def test_harness_boots_pyodide(node_run: NodeRun) -> None:
    figures = {name: {key: value for key, value in result.items()
                      if isinstance(value, int | float) and key != "ok"}
               for name, result in node_run.results.items()}
    print(json.dumps({"timing": node_run.timing, "total_s": node_run.seconds,
                      "figures": figures}, indent=1))  # shown with pytest -s
    assert node_run.timing["boot_s"] > 0
    assert node_run.seconds < NODE_TIMEOUT


def test_targets_follow_the_page_or_need_a_full_url(node_run: NodeRun) -> None:
    scenario(node_run, "targets")


def test_unary_with_metadata(node_run: NodeRun, impl: str) -> None:
    assert scenario(node_run, "unary", impl)["unary_median_ms"] > 0


def test_errors_with_unicode_messages(node_run: NodeRun, impl: str) -> None:
    scenario(node_run, "errors", impl)


def test_server_streaming(node_run: NodeRun, impl: str) -> None:
    assert scenario(node_run, "server_streaming", impl)["todos"] > 0


def test_client_streaming(node_run: NodeRun, impl: str) -> None:
    scenario(node_run, "client_streaming", impl)


def test_bidi_streaming(node_run: NodeRun, impl: str) -> None:
    scenario(node_run, "bidi", impl)


def test_200_concurrent_unary_calls(node_run: NodeRun, impl: str) -> None:
    assert scenario(node_run, "concurrent", impl)["concurrent_rps"] > 0


def test_bulk_to_a_slow_reader_loses_nothing_and_stays_bounded(node_run: NodeRun,
                                                               impl: str) -> None:
    result = scenario(node_run, "bulk", impl)
    assert result["slow_bytes"] >= (64 if impl == "ws" else 16) * MiB
    # Inbound memory is bounded by HTTP/2 flow control (grpclib's 4 MiB windows), not by
    # the transport: bytes received but not yet read by the RPC stay near one window.
    assert result["max_outstanding_bytes"] < 9 * MiB, result
    assert result["max_pending_bytes"] < 64 * 1024  # at most the server's SETTINGS
    # The WebAssembly heap (which never shrinks) grew by less than a quarter of the data.
    assert result["heap_growth_bytes"] < 16 * MiB, result


def test_outbound_backpressure_from_buffered_amount(node_run: NodeRun, impl: str) -> None:
    result = scenario(node_run, "backpressure", impl)
    sink = raw(node_run, "backpressure", impl)
    assert sink["bytes"] == result["bytes"] and sink["sha256"] == result["sha256"]
    assert result["pauses"] >= 1
    assert sink["close_code"] == 1000


def test_writes_of_one_task_are_coalesced(node_run: NodeRun, impl: str) -> None:
    result = scenario(node_run, "coalescing", impl)
    sink = raw(node_run, "coalesce", impl)
    # Every byte arrived, in order, in as many messages as the transport counted; all were
    # sent before the close frame (1000).
    assert sink["bytes"] == result["bytes"] and sink["sha256"] == result["sha256"]
    assert sink["messages"] == result["messages"] < result["writes"]
    assert sink["close_code"] == 1000
    assert result["unary_writes_messages"][1] <= 2  # HEADERS at once, then DATA
    writes, messages = result["bulk_writes_messages"]
    assert messages < writes, result


def test_larger_inbound_frames(node_run: NodeRun, impl: str) -> None:
    # Both frame sizes were acknowledged by the server and gave the same stream.
    assert set(scenario(node_run, "frame_size", impl)["messages_by_frame_size"]) == {
        str(16 * 1024), str(1024 * 1024)}


def test_frame_repr_shortcut_gives_hyperframes_text() -> None:
    """The shortcut grpcbridge.browser gives hyperframe's frame repr (CPython, no Node)."""
    import os

    import hyperframe.frame

    from grpcbridge._grpclib_compat import hex_head

    original = hyperframe.frame._raw_data_repr
    assert original is not hex_head  # only grpcbridge.browser.Channel swaps it (in Pyodide)
    for size in (0, 1, 9, 10, 11, 64, 100_000):
        data = os.urandom(size)
        assert hex_head(data) == original(data)
    assert hex_head(None) == original(None)


class _Wire(asyncio.Transport):
    """Collects what a protocol writes (the far end is driven by hand in the test)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        self.sent += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


async def test_settings_ack_and_large_frame_in_one_message() -> None:
    """The browser channel asks for 1 MiB frames. A peer's SETTINGS ACK and its first large
    frame can arrive in one WebSocket message (a relay reads both at once); h2 alone would
    still hold that frame to 16 KiB and fail the connection (CPython, no Node)."""
    import grpclib.client
    import h2.config
    import h2.connection
    from grpclib.config import Configuration

    from grpcbridge._grpclib_compat import FrameSizeProtocol

    h2_config = h2.config.H2Configuration(client_side=True, header_encoding="ascii")
    protocol = FrameSizeProtocol(grpclib.client.Handler(), Configuration().__for_client__(),
                                  h2_config, 1024 * 1024)
    wire = _Wire()
    protocol.connection_made(wire)
    client = protocol.connection._connection
    client.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", "/x.Y/Z"),
                            (":authority", "example")])
    protocol.connection.flush()
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    server.receive_data(bytes(wire.sent))  # preface, both SETTINGS (acknowledged), HEADERS
    assert server.remote_settings.max_frame_size == 1024 * 1024
    server.send_headers(1, [(":status", "200")])
    server.send_data(1, bytes(60_000))  # one DATA frame: more than 16 KiB, in the window
    # The server's SETTINGS, its ACKs, the response HEADERS and the large DATA frame arrive
    # in one message:
    protocol.data_received(server.data_to_send())
    assert not wire.closed, "the client failed the connection on a frame it asked for"
    assert client.max_inbound_frame_size == 1024 * 1024
    protocol.connection_lost(None)


def test_writer_ignoring_backpressure_fails_closed(node_run: NodeRun, impl: str) -> None:
    scenario(node_run, "outbound_cap", impl)
    assert raw(node_run, "outbound_cap", impl)["close_code"] == wire_code(1011, impl)


def test_bytes_before_attach_are_kept_in_order(node_run: NodeRun, impl: str) -> None:
    assert scenario(node_run, "early_bytes", impl)["pending_bytes"] == 3 * MiB


def test_inbound_cap_and_message_limit_fail_closed(node_run: NodeRun, impl: str) -> None:
    scenario(node_run, "inbound_cap", impl)
    assert raw(node_run, "inbound_cap", impl)["close_code"] == wire_code(1009, impl)


def test_text_message_closes_1003(node_run: NodeRun, impl: str) -> None:
    result = scenario(node_run, "text_message", impl)
    assert "1003" in result["message"]
    assert raw(node_run, "text", impl)["close_code"] == wire_code(1003, impl)


def test_rpc_completing_just_before_close_completes(node_run: NodeRun, impl: str) -> None:
    scenario(node_run, "complete_before_close_forced", impl)
    scenario(node_run, "complete_before_close_relay", impl)
    assert raw(node_run, "relay", impl)["closes"] == 12


def test_close_is_idempotent_in_any_order(node_run: NodeRun, impl: str) -> None:
    assert len(scenario(node_run, "close_races", impl)["orders"]) == 7


def test_send_after_close_raises(node_run: NodeRun, impl: str) -> None:
    assert "1001" in scenario(node_run, "send_after_close", impl)["grpc_message"]


def test_server_closing_mid_stream_gives_unavailable(node_run: NodeRun) -> None:
    result = scenario(node_run, "server_close_midstream")
    assert "1001" in result["message"] and "server shutting down" in result["message"]


def test_lazy_reconnect_after_idle_close(node_run: NodeRun, impl: str) -> None:
    scenario(node_run, "reconnect", impl)


def test_rpcs_survive_several_tunnel_ages(node_run: NodeRun, impl: str) -> None:
    """The browser Channel under ``max_tunnel_age``: new RPCs took a new tunnel after each
    GOAWAY, the stream finished on its old one, and every tunnel (retired or the last) was
    closed by the client with 1000, none by the bridge's grace (1001)."""
    result = scenario(node_run, "tunnel_ages", impl)
    bridge = result["bridge"]
    assert bridge["active"] == 0, result
    assert result["connections_opened"] >= 4, result
    assert bridge["accepted"] == result["connections_opened"], result
    assert bridge["retired"] >= 3, result
    assert bridge["closed_1001"] == 0, result
    assert bridge["closed_1000"] == result["connections_opened"], result
    assert result["unary_calls"] > 3 and result["bidi_rounds"] > 1, result


def test_bearer_token_as_subprotocol_or_query(node_run: NodeRun, impl: str) -> None:
    result = scenario(node_run, "auth", impl)
    assert all(TOKEN not in message for message in result["messages"])


def test_dead_target_fails_fast(node_run: NodeRun, impl: str) -> None:
    assert "1006" in scenario(node_run, "dead_target", impl)["message"]


def test_no_leaked_proxies_or_loop_errors(node_run: NodeRun, impl: str) -> None:
    result = scenario(node_run, "no_leaks", impl)
    assert result["live_proxies"] == 0
    everything = [error for r in node_run.results.values() for error in r["loop_errors"]]
    assert not everything, everything
    assert "Traceback" not in node_run.stderr, node_run.stderr[-4000:]
