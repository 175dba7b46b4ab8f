"""Exceptions raised by grpcbridge."""

from __future__ import annotations


class GrpcBridgeError(Exception):
    """Base class of every error grpcbridge raises on purpose."""


class ConfigError(GrpcBridgeError, ValueError):
    """A setting is invalid. The message says which one, why, and how to fix it."""


class TargetError(ConfigError):
    """A WebSocket target URL or backend address cannot be used."""


class HandshakeError(GrpcBridgeError):
    """The WebSocket opening handshake failed (refused, timed out or unreachable)."""

    def __init__(self, message: str, *, status: int | None = None,
                 proxy_status: int | None = None) -> None:
        super().__init__(message)
        #: HTTP status of the server's refusal, when the server answered with one.
        self.status = status
        #: HTTP status of an HTTP proxy's refusal of CONNECT (407, 403, 502...).
        self.proxy_status = proxy_status


class TunnelClosed(GrpcBridgeError):
    """The tunnel (or the channel that owns it) is closed: an RPC or a send was attempted
    on it after :meth:`close`, or the connection went away."""


class InvalidStateError(GrpcBridgeError, RuntimeError):
    """A lifecycle method was called in the wrong state: ``start()`` twice or after
    ``close()``, ``Bridge.url`` or ``Forwarder.target`` before ``start()``... The message
    says what state the object is in and what to call instead."""
