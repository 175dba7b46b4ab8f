"""grpcbridge: real gRPC over WebSocket.

One WebSocket connection carries one unmodified HTTP/2 (h2c) connection in binary messages,
wire-compatible with the Go project grpc-tunnel. The public API, by role:

Serve gRPC over WebSocket
    :class:`Bridge` / :class:`BridgeConfig` - the standalone WebSocket server;
    :class:`BridgeApp` - the same as an ASGI app (Starlette/FastAPI under uvicorn);
    :class:`GrpclibBackend`, :class:`GrpcioBackend`, :class:`SocketBackend` - what a bridge
    serves; :func:`attach_grpcio` / :class:`ThreadedBridge` - an existing grpcio server in
    two lines, the bridge on its own thread.

Dial with grpclib
    :class:`Channel` (a ``grpclib`` channel over a tunnel) / :class:`ReconnectPolicy`.

Dial with grpcio (or any gRPC tool)
    :func:`aio_channel` / :func:`sync_channel` - real grpcio channels to a WebSocket target;
    :class:`Forwarder` / :class:`ForwarderConfig` - a local port whose connections are
    tunnelled.

Admission (who may open a tunnel)
    :class:`BearerTokenAuth`, :class:`HandshakeRequest`, :class:`Rejection` - the auth hook;
    :class:`OriginPolicy`, :class:`HostPolicy` - the Origin and Host rules.

Errors
    :class:`GrpcBridgeError`, the base of :class:`ConfigError` (with :class:`TargetError`),
    :class:`HandshakeError`, :class:`TunnelClosed` and :class:`InvalidStateError`.

Everything else lives in its module: ``grpcbridge.core.stream.CloseCode``,
``grpcbridge.core.target.parse_target`` / ``Target``, ``grpcbridge.observability``
(``BridgeMetrics``, ``configure_logging``), ``grpcbridge.browser`` (Pyodide). Those five were
exported here before and still resolve, but are no longer part of this list.

Names are imported lazily, so ``import grpcbridge.browser`` inside Pyodide does not pull in
the server side (websockets, prometheus-client).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: The public names by defining module (imported on first use).
_EXPORTS = {name: module for module, names in {
    ".server.bridge": ["Bridge"],
    ".server.asgi": ["BridgeApp"],
    ".server.attach": ["attach_grpcio", "ThreadedBridge"],
    ".backends": ["GrpclibBackend", "GrpcioBackend", "SocketBackend"],
    ".client.channel": ["Channel"],
    ".client.grpcio": ["aio_channel", "sync_channel"],
    ".client.forwarder": ["Forwarder"],
    ".core.config": ["BridgeConfig", "ForwarderConfig", "ReconnectPolicy"],
    ".core.admission": ["BearerTokenAuth", "HandshakeRequest", "Rejection", "OriginPolicy",
                        "HostPolicy"],
    ".core.errors": ["GrpcBridgeError", "ConfigError", "TargetError", "HandshakeError",
                     "TunnelClosed", "InvalidStateError"],
}.items() for name in names}

#: Formerly exported here; still importable, but documented in their own modules only.
_MOVED = {
    "BridgeMetrics": ".observability",
    "configure_logging": ".observability",
    "CloseCode": ".core.stream",
    "Target": ".core.target",
    "parse_target": ".core.target",
}

__all__ = [
    "BearerTokenAuth",
    "Bridge",
    "BridgeApp",
    "BridgeConfig",
    "Channel",
    "ConfigError",
    "Forwarder",
    "ForwarderConfig",
    "GrpcBridgeError",
    "GrpcioBackend",
    "GrpclibBackend",
    "HandshakeError",
    "HandshakeRequest",
    "HostPolicy",
    "InvalidStateError",
    "OriginPolicy",
    "ReconnectPolicy",
    "Rejection",
    "SocketBackend",
    "TargetError",
    "ThreadedBridge",
    "TunnelClosed",
    "aio_channel",
    "attach_grpcio",
    "sync_channel",
]

# For type checkers; the names of _MOVED are re-exported as ``X as X``, outside __all__.
if TYPE_CHECKING:
    from .backends import GrpcioBackend, GrpclibBackend, SocketBackend
    from .client.channel import Channel
    from .client.forwarder import Forwarder
    from .client.grpcio import aio_channel, sync_channel
    from .core.admission import (
        BearerTokenAuth,
        HandshakeRequest,
        HostPolicy,
        OriginPolicy,
        Rejection,
    )
    from .core.config import BridgeConfig, ForwarderConfig, ReconnectPolicy
    from .core.errors import (
        ConfigError,
        GrpcBridgeError,
        HandshakeError,
        InvalidStateError,
        TargetError,
        TunnelClosed,
    )
    from .core.stream import CloseCode as CloseCode
    from .core.target import Target as Target
    from .core.target import parse_target as parse_target
    from .observability import BridgeMetrics as BridgeMetrics
    from .observability import configure_logging as configure_logging
    from .server.asgi import BridgeApp
    from .server.attach import ThreadedBridge, attach_grpcio
    from .server.bridge import Bridge


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name) or _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module 'grpcbridge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
