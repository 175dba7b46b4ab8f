"""Addresses: WebSocket target URLs (client side) and backend/listen addresses.

The target rules follow the Go project (see ``wire-protocol``), except that an explicit
``ws://`` URL with TLS demanded is refused instead of silently downgraded.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import TargetError

_DEFAULT_PORTS = {"ws": 80, "wss": 443}


def ip_or_none(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an IP address, or None if it is not one."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def host_port(host: str, port: int | None = None) -> str:
    """``host:port`` as URLs and ``Host`` headers write it: an IPv6 literal in brackets
    (``[::1]:80``); just the (bracketed) host when ``port`` is None."""
    host = f"[{host}]" if ":" in host else host
    return host if port is None else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed WebSocket target URL."""

    secure: bool
    host: str
    port: int
    #: Path and query string sent in the request line (at least ``/``).
    resource: str
    #: Whether the URL named a port explicitly.
    explicit_port: bool

    @property
    def scheme(self) -> str:
        return "wss" if self.secure else "ws"

    @property
    def authority(self) -> str:
        """``host[:port]`` as in the URL: the HTTP/2 ``:authority`` and the ``Host`` header."""
        return host_port(self.host, self.port if self.explicit_port else None)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.authority}{self.resource}"

    def __str__(self) -> str:
        return self.url


def parse_target(raw: str, *, tls: bool | None = None) -> Target:
    """Parse a WebSocket target.

    ``tls=None`` takes TLS from the scheme; ``True`` demands ``wss`` (a bare ``host:port``
    becomes ``wss://``; an explicit ``ws://`` is refused); ``False`` demands ``ws``.
    ``:8080`` means ``localhost:8080``. Path, query and port are kept.
    """
    text = raw.strip()
    if not text:
        raise TargetError("the target URL is empty; give one like ws://host:8080/grpc")
    if text.startswith(":"):
        text = "localhost" + text
    if "://" not in text:
        text = ("wss://" if tls else "ws://") + text
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # "Invalid IPv6 URL", NFKC-normalised netlocs...
        raise TargetError(f"target {raw!r} is not a valid URL ({exc}); give one like "
                          "ws://host:8080/grpc") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise TargetError(
            f"unsupported scheme {parts.scheme!r} in target {raw!r}; use ws:// or wss://"
        )
    secure = scheme == "wss"
    if tls is True and not secure:
        raise TargetError(
            f"target {raw!r} is ws:// but TLS was requested; use wss:// (grpcbridge never "
            "downgrades silently)"
        )
    if tls is False and secure:
        raise TargetError(f"target {raw!r} is wss:// but TLS was disabled; use ws://")
    if not parts.hostname:
        raise TargetError(f"target {raw!r} has no host; give one like ws://host:8080/grpc")
    if parts.username or parts.password:
        raise TargetError(
            f"target {raw!r} carries credentials in the URL; pass a bearer token or headers"
        )
    try:
        port = parts.port
    except ValueError as exc:
        raise TargetError(f"target {raw!r} has an invalid port: {exc}") from None
    resource = parts.path or "/"
    if parts.query:
        resource += "?" + parts.query
    return Target(
        secure=secure,
        host=parts.hostname,
        port=port if port is not None else _DEFAULT_PORTS[scheme],
        resource=resource,
        explicit_port=port is not None,
    )


def browser_target(raw: str, *, page_protocol: str, page_host: str) -> Target:
    """Infer a target from inside a web page: ``""`` and ``"/path"`` use the page's host,
    with ``wss`` when the page is served over ``https:``; full URLs are taken as given."""
    text = raw.strip()
    if not text or text.startswith("/"):
        scheme = "wss" if page_protocol.rstrip(":").lower() == "https" else "ws"
        return parse_target(f"{scheme}://{page_host}{text or '/'}")
    return parse_target(text)


@dataclass(frozen=True, slots=True)
class SocketAddress:
    """A TCP ``host:port`` or a unix socket path (``unix:/path``)."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def is_loopback(self) -> bool:
        """True for unix sockets, ``localhost`` and loopback IP literals."""
        if self.path is not None:
            return True
        assert self.host is not None
        ip = ip_or_none(self.host)
        return self.host.lower() == "localhost" or (ip is not None and ip.is_loopback)

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        assert self.host is not None and self.port is not None
        return host_port(self.host, self.port)


def parse_address(
    raw: str, *, what: str = "address", allow_port_zero: bool = False
) -> SocketAddress:
    """Parse ``host:port``, ``[v6]:port`` or ``unix:/path``; ``what`` names it in errors."""
    text = raw.strip()
    if text.startswith("unix:"):
        path = text[5:].removeprefix("//")
        if not path:
            raise TargetError(f"{what} {raw!r} has an empty unix socket path; use unix:/path")
        return SocketAddress(path=path)
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise TargetError(
            f"{what} {raw!r} is not host:port or unix:/path (example: 127.0.0.1:50051)"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise TargetError(f"{what} {raw!r} has a non-numeric port {port_text!r}") from None
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise TargetError(f"{what} {raw!r} has port {port} outside 1-65535")
    return SocketAddress(host=host, port=port)
