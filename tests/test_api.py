"""The public surface of ``grpcbridge`` (issue 9): a small grouped export list, lazily
imported, covering every name the docs use; lifecycle misuse raises InvalidStateError with
a message that says the state and what to call."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import grpcbridge
from grpcbridge import (
    Bridge,
    BridgeApp,
    BridgeConfig,
    Forwarder,
    ForwarderConfig,
    GrpcBridgeError,
    InvalidStateError,
    ThreadedBridge,
    TunnelClosed,
    tracing,
)

from support import asgi_upgrade

ROOT = Path(__file__).resolve().parent.parent

EXPORTS = {
    # Serve gRPC over WebSocket.
    "Bridge", "BridgeConfig", "BridgeApp", "GrpclibBackend", "GrpcioBackend", "SocketBackend",
    "attach_grpcio", "ThreadedBridge",
    # Dial with grpclib.
    "Channel", "ReconnectPolicy",
    # Dial with grpcio.
    "aio_channel", "sync_channel", "Forwarder", "ForwarderConfig",
    # Admission.
    "BearerTokenAuth", "Rejection", "HandshakeRequest", "OriginPolicy", "HostPolicy",
    # Errors.
    "GrpcBridgeError", "ConfigError", "TargetError", "HandshakeError", "TunnelClosed",
    "InvalidStateError",
}


# ------------------------------------------------------------------------ exports


def test_export_list() -> None:
    assert set(grpcbridge.__all__) == EXPORTS
    assert len(grpcbridge.__all__) == len(EXPORTS)
    for name in grpcbridge.__all__:
        assert getattr(grpcbridge, name) is not None
    assert set(grpcbridge.__all__) <= set(dir(grpcbridge))


def test_moved_names_still_resolve_from_their_modules_and_here() -> None:
    from grpcbridge.core.stream import CloseCode
    from grpcbridge.core.target import Target, parse_target
    from grpcbridge.observability import BridgeMetrics, configure_logging

    for value in (CloseCode, Target, parse_target, BridgeMetrics, configure_logging):
        assert getattr(grpcbridge, value.__name__) is value
        assert value.__name__ not in grpcbridge.__all__
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        grpcbridge.Nope  # noqa: B018


def test_import_is_lazy() -> None:
    # Pyodide imports grpcbridge.browser: the package must not pull in the server side.
    code = ("import sys, grpcbridge, grpcbridge.core.errors; "
            "heavy = {'websockets', 'prometheus_client', 'grpc', 'grpclib'} & set(sys.modules); "
            "assert not heavy, heavy; "
            "grpcbridge.InvalidStateError; "
            "assert 'websockets' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def documented_names() -> set[str]:
    """Every ``grpcbridge.X`` and ``from grpcbridge import X`` in README, docs and examples."""
    names: set[str] = set()
    sources = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"),
               *(ROOT / "docs" / "examples").glob("*.py")]
    for path in sources:
        text = path.read_text()
        names.update(re.findall(r"\bgrpcbridge\.([A-Za-z_]\w*)", text))
        imports = re.findall(r"^\s*from grpcbridge import \(([^)]*)\)", text, flags=re.MULTILINE)
        imports += re.findall(r"^\s*from grpcbridge import ([\w ,]+)$", text, flags=re.MULTILINE)
        for imported in imports:
            names.update(name.strip() for name in imported.split(",") if name.strip())
    return names


def test_every_documented_name_resolves() -> None:
    names = documented_names()
    assert {"Bridge", "BridgeApp", "Channel", "attach_grpcio"} <= names  # the scan works
    submodules = {path.stem for path in (ROOT / "src" / "grpcbridge").iterdir()
                  if path.suffix == ".py" or (path / "__init__.py").exists()}
    # Span and attribute names (grpcbridge.request_id...) are no Python names.
    span_names = {name.partition(".")[2] for name in tracing.OWN_NAMES}
    for name in names - submodules - span_names:
        assert name in grpcbridge.__all__, f"documented grpcbridge.{name} is not exported"


def test_invalid_state_error_is_its_own_error() -> None:
    assert issubclass(InvalidStateError, GrpcBridgeError)
    assert issubclass(InvalidStateError, RuntimeError)
    assert not issubclass(InvalidStateError, TunnelClosed)


# ---------------------------------------------------------------------- Bridge misuse


def bridge_config(**settings: Any) -> BridgeConfig:
    return BridgeConfig(backend="127.0.0.1:50051", listen="127.0.0.1:0", **settings)


async def test_bridge_url_before_start() -> None:
    bridge = Bridge(bridge_config())
    with pytest.raises(InvalidStateError, match=r"it is new: await bridge\.start\(\)"):
        bridge.url  # noqa: B018


async def test_bridge_start_twice_and_after_close() -> None:
    bridge = Bridge(bridge_config())
    await bridge.start()
    try:
        assert bridge.url.startswith("ws://127.0.0.1:")
        with pytest.raises(InvalidStateError, match=r"bridge that is running.*already serving"):
            await bridge.start()
    finally:
        await bridge.close(drain_timeout=0)
    with pytest.raises(InvalidStateError, match=r"bridge that is closed.*create a new Bridge"):
        await bridge.start()


async def test_bridge_start_after_close_without_start() -> None:
    bridge = Bridge(bridge_config())
    await bridge.close()
    with pytest.raises(InvalidStateError, match="closed"):
        await bridge.start()
    with pytest.raises(InvalidStateError, match="it is closed: it never listened"):
        bridge.url  # noqa: B018


async def test_bridge_url_on_a_unix_listener(tmp_path: Path) -> None:
    path = tmp_path / "bridge.sock"
    async with Bridge(BridgeConfig(backend="127.0.0.1:50051", listen=f"unix:{path}")) as bridge:
        with pytest.raises(InvalidStateError, match="unix socket, which has no ws:// URL"):
            bridge.url  # noqa: B018


# ------------------------------------------------------------------- Forwarder misuse


def forwarder_config() -> ForwarderConfig:
    return ForwarderConfig(target="ws://127.0.0.1:1/grpc", listen="127.0.0.1:0")


async def test_forwarder_target_before_start() -> None:
    forwarder = Forwarder(forwarder_config())
    with pytest.raises(InvalidStateError,
                       match=r"it is new: await forwarder\.start\(\)"):
        forwarder.target  # noqa: B018


async def test_forwarder_start_twice_and_after_close() -> None:
    forwarder = Forwarder(forwarder_config())
    await forwarder.start()
    try:
        assert forwarder.target.startswith("127.0.0.1:")
        with pytest.raises(InvalidStateError, match=r"forwarder that is running.*already"):
            await forwarder.start()
    finally:
        await forwarder.close()
    with pytest.raises(InvalidStateError,
                       match=r"forwarder that is closed.*create a new Forwarder"):
        await forwarder.start()


async def test_forwarder_closed_before_start() -> None:
    forwarder = Forwarder(forwarder_config())
    await forwarder.close()
    with pytest.raises(InvalidStateError, match="it is closed: it never listened"):
        forwarder.target  # noqa: B018
    with pytest.raises(InvalidStateError, match="closed"):
        await forwarder.start()


# -------------------------------------------------------------- ThreadedBridge misuse


def test_threaded_bridge_before_start() -> None:
    threaded = ThreadedBridge(bridge_config(), loop="asyncio")
    for attribute in ("url", "bridge", "loop_kind"):
        with pytest.raises(InvalidStateError,
                           match=rf"ThreadedBridge\.{attribute} .* has not started: call"):
            getattr(threaded, attribute)


def test_threaded_bridge_start_twice_and_after_stop() -> None:
    threaded = ThreadedBridge(bridge_config(), loop="asyncio")
    threaded.start()
    try:
        assert threaded.url.startswith("ws://127.0.0.1:")
        with pytest.raises(InvalidStateError, match=r"that is running.*already serving"):
            threaded.start()
    finally:
        threaded.stop(drain_timeout=0)
    with pytest.raises(InvalidStateError, match=r"that was stopped.*create a new ThreadedBridge"):
        threaded.start()
    threaded.stop()  # still idempotent


def test_threaded_bridge_stopped_before_start_cannot_start() -> None:
    threaded = ThreadedBridge(bridge_config(), loop="asyncio")
    threaded.stop()
    with pytest.raises(InvalidStateError, match="that was stopped"):
        threaded.start()
    with pytest.raises(InvalidStateError, match="this one was stopped"):
        threaded.url  # noqa: B018


def test_threaded_bridge_that_failed_to_start() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        threaded = ThreadedBridge(BridgeConfig(backend="127.0.0.1:50051",
                                               listen=f"127.0.0.1:{port}"), loop="asyncio")
        with pytest.raises(OSError):
            threaded.start()
    with pytest.raises(InvalidStateError, match=r"that failed to start.*create a new"):
        threaded.start()
    with pytest.raises(InvalidStateError, match="this one failed to start"):
        threaded.url  # noqa: B018


# -------------------------------------------------------------------- BridgeApp misuse


async def test_bridge_app_after_close_refuses_tunnels_and_startup() -> None:
    app = BridgeApp(BridgeConfig(backend="127.0.0.1:50051"))
    await app.close()
    sent = await asgi_upgrade(app)
    assert sent[0]["type"] == "websocket.http.response.start" and sent[0]["status"] == 503

    sent.clear()

    async def send(message: Any) -> None:
        sent.append(dict(message))

    async def startup() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    await app({"type": "lifespan"}, startup, send)
    assert sent == [{"type": "lifespan.startup.failed",
                     "message": "this BridgeApp was closed; create a new BridgeApp"}]
