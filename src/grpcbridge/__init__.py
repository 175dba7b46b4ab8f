"""grpcbridge: real gRPC over WebSocket.

One WebSocket connection carries one unmodified HTTP/2 (h2c) connection in binary messages,
wire-compatible with the Go project grpc-tunnel. The public API:

* :class:`Bridge` / :class:`BridgeConfig` - WebSocket server relaying tunnels to a gRPC backend.
* :class:`Forwarder` / :class:`ForwarderConfig` - local port whose connections are tunnelled.
* :class:`Channel` / :class:`ReconnectPolicy` - a grpclib channel over a WebSocket tunnel.
* :func:`aio_channel` / :func:`sync_channel` - real grpcio channels to a WebSocket target.
* :class:`GrpclibBackend`, :class:`GrpcioBackend`, :class:`SocketBackend`,
  :func:`attach_grpcio`, :class:`ThreadedBridge` - what a bridge serves, in process or not.
* :class:`BridgeApp` - the bridge as an ASGI app (Starlette/FastAPI, uvicorn).
* :class:`BearerTokenAuth`, :class:`Rejection`, :class:`HandshakeRequest` - admission hooks.
* :func:`parse_target` - the client-side target URL rules.

Names are imported lazily, so ``import grpcbridge.browser`` inside Pyodide does not pull in
the server side (websockets, prometheus-client).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "BearerTokenAuth": ".core.admission",
    "Bridge": ".server.bridge",
    "BridgeApp": ".server.asgi",
    "BridgeConfig": ".core.config",
    "BridgeMetrics": ".observability",
    "Channel": ".client.channel",
    "CloseCode": ".core.stream",
    "ConfigError": ".core.errors",
    "Forwarder": ".client.forwarder",
    "ForwarderConfig": ".core.config",
    "GrpcBridgeError": ".core.errors",
    "GrpcioBackend": ".backends",
    "GrpclibBackend": ".backends",
    "HandshakeError": ".core.errors",
    "HandshakeRequest": ".core.admission",
    "OriginPolicy": ".core.admission",
    "ReconnectPolicy": ".core.config",
    "Rejection": ".core.admission",
    "SocketBackend": ".backends",
    "Target": ".core.target",
    "TargetError": ".core.errors",
    "ThreadedBridge": ".server.attach",
    "TunnelClosed": ".core.errors",
    "aio_channel": ".client.grpcio",
    "attach_grpcio": ".server.attach",
    "configure_logging": ".observability",
    "parse_target": ".core.target",
    "sync_channel": ".client.grpcio",
}

__all__ = [
    "BearerTokenAuth",
    "Bridge",
    "BridgeApp",
    "BridgeConfig",
    "BridgeMetrics",
    "Channel",
    "CloseCode",
    "ConfigError",
    "Forwarder",
    "ForwarderConfig",
    "GrpcBridgeError",
    "GrpcioBackend",
    "GrpclibBackend",
    "HandshakeError",
    "HandshakeRequest",
    "OriginPolicy",
    "ReconnectPolicy",
    "Rejection",
    "SocketBackend",
    "Target",
    "TargetError",
    "ThreadedBridge",
    "TunnelClosed",
    "aio_channel",
    "attach_grpcio",
    "configure_logging",
    "parse_target",
    "sync_channel",
]

if TYPE_CHECKING:
    from .backends import GrpcioBackend, GrpclibBackend, SocketBackend
    from .client.channel import Channel
    from .client.forwarder import Forwarder
    from .client.grpcio import aio_channel, sync_channel
    from .core.admission import BearerTokenAuth, HandshakeRequest, OriginPolicy, Rejection
    from .core.config import BridgeConfig, ForwarderConfig, ReconnectPolicy
    from .core.errors import (
        ConfigError,
        GrpcBridgeError,
        HandshakeError,
        TargetError,
        TunnelClosed,
    )
    from .core.stream import CloseCode
    from .core.target import Target, parse_target
    from .observability import BridgeMetrics, configure_logging
    from .server.asgi import BridgeApp
    from .server.attach import ThreadedBridge, attach_grpcio
    from .server.bridge import Bridge


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'grpcbridge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
