"""grpcbridge: real gRPC over WebSocket.

One WebSocket connection carries one unmodified HTTP/2 (h2c) connection in binary messages,
wire-compatible with the Go project grpc-tunnel. The public API:

* :class:`Bridge` / :class:`BridgeConfig` - WebSocket server relaying tunnels to a gRPC backend.
* :class:`Forwarder` / :class:`ForwarderConfig` - local port whose connections are tunnelled.
* :class:`Channel` / :class:`ReconnectPolicy` - a grpclib channel over a WebSocket tunnel.
* :class:`BearerTokenAuth`, :class:`Rejection`, :class:`HandshakeRequest` - admission hooks.
* :func:`parse_target` - the client-side target URL rules.
"""

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

__version__ = "0.1.0"

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
