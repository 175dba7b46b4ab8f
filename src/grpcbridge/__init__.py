"""grpcbridge: real gRPC over WebSocket.

One WebSocket connection carries one unmodified HTTP/2 (h2c) connection in binary messages,
wire-compatible with the Go project grpc-tunnel. The public API:

* :class:`Bridge` / :class:`BridgeConfig` - WebSocket server relaying tunnels to a gRPC backend.
* :class:`Forwarder` / :class:`ForwarderConfig` - local port whose connections are tunnelled.
* :class:`Channel` / :class:`ReconnectPolicy` - a grpclib channel over a WebSocket tunnel.
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
    "BridgeConfig": ".core.config",
    "BridgeMetrics": ".observability",
    "Channel": ".client.channel",
    "CloseCode": ".core.stream",
    "ConfigError": ".core.errors",
    "Forwarder": ".client.forwarder",
    "ForwarderConfig": ".core.config",
    "GrpcBridgeError": ".core.errors",
    "HandshakeError": ".core.errors",
    "HandshakeRequest": ".core.admission",
    "OriginPolicy": ".core.admission",
    "ReconnectPolicy": ".core.config",
    "Rejection": ".core.admission",
    "Target": ".core.target",
    "TargetError": ".core.errors",
    "TunnelClosed": ".core.errors",
    "configure_logging": ".observability",
    "parse_target": ".core.target",
}

__all__ = [
    "BearerTokenAuth",
    "Bridge",
    "BridgeConfig",
    "BridgeMetrics",
    "Channel",
    "CloseCode",
    "ConfigError",
    "Forwarder",
    "ForwarderConfig",
    "GrpcBridgeError",
    "HandshakeError",
    "HandshakeRequest",
    "OriginPolicy",
    "ReconnectPolicy",
    "Rejection",
    "Target",
    "TargetError",
    "TunnelClosed",
    "configure_logging",
    "parse_target",
]

if TYPE_CHECKING:
    from .client.channel import Channel
    from .client.forwarder import Forwarder
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
