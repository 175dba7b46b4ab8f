"""Validated settings for the bridge and the forwarder.

Every field is checked when the object is built; errors name the field, the bad value and
what to use instead, so a mistake surfaces at start-up and never as a 500 per request.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .admission import AuthHook, HostPolicy, IPNetwork, OriginPolicy, parse_networks, string_list
from .age import jittered
from .errors import ConfigError
from .limits import DEFAULT_CLIENT_MEMORY_BUDGET, DEFAULT_MEMORY_BUDGET
from .proxy import FROM_ENVIRONMENT, ProxySetting, ProxyURL, resolve_proxy
from .stream import DEFAULT_BUFFER_BYTES, DEFAULT_MAX_MESSAGE_BYTES
from .target import SocketAddress, Target, parse_address, parse_target
from .wire import TOKEN_CHARS


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    """:class:`ConfigError` naming ``name`` unless ``value`` is a finite number > 0 (>= 0
    with ``allow_zero``, where 0 disables the setting)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        hint = ", or 0 to disable it" if allow_zero else ""
        raise ConfigError(f"{name} must be a finite number, got {value}: give a value such "
                          f"as 30{hint}")
    if value < 0 or (value == 0 and not allow_zero):
        hint = " (0 disables it)" if allow_zero else ""
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}{hint}, got {value}")


def check_bytes(name: str, value: object, minimum: int = 0) -> None:
    """:class:`ConfigError` naming ``name`` unless ``value`` is an integer number of bytes
    >= ``minimum`` (with no minimum, 0 disables the limit)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer number of bytes, got {value!r}")
    if value < minimum:
        hint = "" if minimum else " (0 disables it)"
        raise ConfigError(f"{name} must be >= {minimum}{hint}, got {value}")


def _check_keepalive(ping_interval: float, idle_timeout: float) -> None:
    for name, value in (("ping_interval", ping_interval), ("idle_timeout", idle_timeout)):
        check_positive(name, value, allow_zero=True)
    if idle_timeout and ping_interval and idle_timeout <= ping_interval:
        raise ConfigError(f"idle_timeout ({idle_timeout}) must be longer than ping_interval "
                          f"({ping_interval}), or a healthy quiet tunnel would be closed")


def _check_sizes(max_message_bytes: int, buffer_bytes: int) -> None:
    check_bytes("max_message_bytes", max_message_bytes, 1024)
    check_bytes("buffer_bytes", buffer_bytes, 4096)


def _check_subprotocols(name: str, values: Sequence[str]) -> tuple[str, ...]:
    checked = string_list(name, values)
    for value in checked:
        if not value or not set(value) <= TOKEN_CHARS:
            raise ConfigError(f"{name}: {value!r} is not a valid subprotocol token")
    return checked


def _check_file(name: str, path: str | None) -> None:
    if path is not None and not os.path.isfile(path):
        raise ConfigError(f"{name}: file {path!r} does not exist")


@runtime_checkable
class BackendLike(Protocol):
    """What a bridge needs of an in-process backend object (see ``grpcbridge.backends``)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def connect(self, tunnel: Any, buffer_bytes: int) -> None: ...

    async def reachable(self) -> bool: ...


@dataclass(frozen=True, kw_only=True)
class BridgeConfig:
    """Settings of a :class:`~grpcbridge.Bridge` (the WebSocket server)."""

    #: Where tunnels go: a gRPC server (h2c) at ``host:port`` or ``unix:/path``, or a backend
    #: object such as ``GrpclibBackend(handlers)`` (served in process, no socket).
    backend: str | BackendLike
    #: Where to accept WebSocket connections: ``host:port`` (port 0 picks one) or ``unix:/path``.
    listen: str = "127.0.0.1:8080"
    #: URL path of the tunnel endpoint.
    path: str = "/grpc"
    #: Allow a backend that is not loopback or a unix socket.
    allow_remote_backend: bool = False
    #: Seconds to wait for the backend to accept a connection.
    backend_connect_timeout: float = 10.0
    #: Seconds a client has to complete its HTTP upgrade request and the bridge to answer
    #: it (the ``authenticate`` hook included: it is cancelled at the deadline, 503).
    handshake_timeout: float = 10.0
    #: Origins accepted besides same-host ones (see :class:`OriginPolicy`).
    allowed_origins: Sequence[str] = ()
    #: Host header values accepted, the DNS-rebinding guard (see :class:`HostPolicy`):
    #: ``bridge.example.com[:port]``, ``*.example.com``, ``*``; empty: any Host.
    allowed_hosts: Sequence[str] = ()
    #: Subprotocols the bridge may echo, in order of preference.
    subprotocols: Sequence[str] = ("grpcbridge",)
    #: Authentication hook: request -> ``None`` (accept) or a ``Rejection``.
    authenticate: AuthHook | None = None
    #: Largest WebSocket message accepted (larger: close 1009).
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: Bytes buffered per tunnel and direction before reading from the sender pauses.
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    #: Bytes one client may make the bridge hold in incomplete messages and write buffers,
    #: over all its tunnels and handshakes (beyond: the tunnel that grows closes with 1008);
    #: 0 = unlimited. Must leave room for one ``max_message_bytes`` message.
    client_memory_budget: int = DEFAULT_CLIENT_MEMORY_BUDGET
    #: The same budget for all clients together; 0 = unlimited.
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    #: Active tunnels in total (503 beyond); 0 = unlimited.
    max_connections: int = 10_000
    #: Active tunnels per client (429 beyond); 0 = unlimited.
    max_connections_per_client: int = 200
    #: Upgrades per client in any 60 s window (429 + Retry-After beyond); 0 = unlimited.
    max_upgrades_per_minute: int = 600
    #: CIDRs of reverse proxies whose X-Forwarded-For is believed.
    trusted_proxies: Sequence[str] = ()
    #: Continue the W3C trace context (``traceparent``, baggage) of every client in tunnel and
    #: RPC spans; by default only a trusted proxy's upgrade request's is continued (for the
    #: tunnel span), other spans start a new trace linked to the client's (a client must not
    #: pick trace ids or sampling).
    trust_trace_context: bool = False
    #: Seconds between WebSocket pings on a quiet tunnel; 0 disables pings.
    ping_interval: float = 20.0
    #: Close a tunnel with no traffic at all (data, ping or pong) for this long; 0 disables.
    idle_timeout: float = 60.0
    #: On shutdown, seconds open tunnels get to finish before they are closed with 1001.
    drain_timeout: float = 10.0
    #: Seconds after which a tunnel is retired (gRPC's MAX_CONNECTION_AGE, +/- 10 % jitter
    #: per tunnel): the client gets a graceful HTTP/2 GOAWAY, opens a new tunnel for new
    #: RPCs and finishes those in flight; None or 0 = tunnels live as long as they are used.
    max_tunnel_age: float | None = None
    #: Seconds a retired tunnel's RPCs get after its GOAWAY before it is closed with 1001
    #: (at the latest the age plus twice this, if no GOAWAY could be sent).
    max_tunnel_age_grace: float = 30.0
    #: Serve wss:// with this certificate chain and key (PEM files).
    certfile: str | None = None
    keyfile: str | None = None
    #: Negotiate permessage-deflate when the client offers it (off: HTTP/2 compresses poorly).
    compression: bool = False
    #: Prometheus /metrics, /healthz and /readyz listener (``host:port``), or None.
    metrics_listen: str | None = None
    #: Allow a metrics listener on a non-loopback address.
    allow_remote_metrics: bool = False
    #: Static files served over plain HTTP GET beside the tunnel endpoint: URL prefix
    #: (``"/"``, ``"/pyodide/"``) -> directory (or a ``grpcbridge.server.static.Mount``).
    static: Mapping[str, Any] = field(default_factory=dict)

    # Derived, validated forms (not constructor arguments).
    #: The parsed backend address (None for backend objects).
    backend_address: SocketAddress | None = field(init=False, repr=False)
    listen_address: SocketAddress = field(init=False, repr=False)
    metrics_address: SocketAddress | None = field(init=False, repr=False)
    origin_policy: OriginPolicy = field(init=False, repr=False)
    host_policy: HostPolicy = field(init=False, repr=False)
    trusted_networks: tuple[IPNetwork, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        backend: SocketAddress | None = None
        if isinstance(self.backend, str):
            backend = parse_address(self.backend, what="backend")
            if not self.allow_remote_backend and not backend.is_loopback():
                raise ConfigError(
                    f"backend {self.backend!r} is not loopback or a unix socket; the bridge "
                    "would expose it to every WebSocket client. Pass allow_remote_backend=True "
                    "(--allow-remote-backend) if that is intended"
                )
        elif not isinstance(self.backend, BackendLike):
            raise ConfigError(
                f"backend must be 'host:port', 'unix:/path' or a backend object such as "
                f"grpcbridge.GrpclibBackend(handlers), got {self.backend!r}"
            )
        listen = parse_address(self.listen, what="listen", allow_port_zero=True)
        if not self.path.startswith("/") or "?" in self.path:
            raise ConfigError(f"path must start with '/' and hold no query, got {self.path!r}")
        for name in ("backend_connect_timeout", "handshake_timeout"):
            check_positive(name, getattr(self, name))
        _check_keepalive(self.ping_interval, self.idle_timeout)
        for name in ("drain_timeout", "max_tunnel_age_grace", "max_connections",
                     "max_connections_per_client", "max_upgrades_per_minute"):
            check_positive(name, getattr(self, name), allow_zero=True)
        if self.max_tunnel_age is not None:
            check_positive("max_tunnel_age", self.max_tunnel_age, allow_zero=True)
        _check_sizes(self.max_message_bytes, self.buffer_bytes)
        needed = self.max_message_bytes + self.buffer_bytes
        per_client, total = self.client_memory_budget, self.memory_budget
        for name, value in (("client_memory_budget", per_client), ("memory_budget", total)):
            check_bytes(name, value)
            if value and value < needed:
                raise ConfigError(
                    f"{name} ({value}) must hold at least one largest message plus a buffer "
                    f"(max_message_bytes + buffer_bytes = {needed}), or 0 to disable it")
        if per_client and total and per_client > total:
            raise ConfigError(f"client_memory_budget ({per_client}) must not exceed "
                              f"memory_budget ({total})")
        if (self.certfile is None) != (self.keyfile is None):
            raise ConfigError("certfile and keyfile go together: give both for wss, or neither")
        _check_file("certfile", self.certfile)
        _check_file("keyfile", self.keyfile)
        metrics = None
        if self.metrics_listen is not None:
            metrics = parse_address(self.metrics_listen, what="metrics_listen",
                                    allow_port_zero=True)
            if metrics.is_unix:
                raise ConfigError("metrics_listen must be host:port, not a unix socket")
            if not metrics.is_loopback() and not self.allow_remote_metrics:
                raise ConfigError(
                    f"metrics_listen {self.metrics_listen!r} is not loopback; pass "
                    "allow_remote_metrics=True (--allow-remote-metrics) to expose metrics"
                )
        for prefix, mount in self.static.items():
            directory = getattr(mount, "directory", mount)  # a static.Mount's, or the value
            if not isinstance(prefix, str) or not prefix.startswith("/") \
                    or not prefix.endswith("/"):
                raise ConfigError(f"static: URL prefix {prefix!r} must start and end with '/'")
            if prefix.rstrip("/") == self.path.rstrip("/"):
                raise ConfigError(f"static: prefix {prefix!r} would hide the tunnel path")
            if isinstance(directory, str | os.PathLike) and not os.path.isdir(directory):
                raise ConfigError(f"static: {prefix!r} -> {os.fspath(directory)!r} is not a "
                                  "directory")
        if self.authenticate is not None and not callable(self.authenticate):
            raise ConfigError("authenticate must be a callable (request) -> Rejection | None")
        object.__setattr__(self, "subprotocols",
                           _check_subprotocols("subprotocols", self.subprotocols))
        for name in ("allowed_origins", "allowed_hosts"):
            object.__setattr__(self, name, string_list(name, getattr(self, name)))
        object.__setattr__(self, "backend_address", backend)
        object.__setattr__(self, "listen_address", listen)
        object.__setattr__(self, "metrics_address", metrics)
        object.__setattr__(self, "origin_policy", OriginPolicy(self.allowed_origins))
        object.__setattr__(self, "host_policy", HostPolicy(self.allowed_hosts))
        if not isinstance(self.trust_trace_context, bool):
            raise ConfigError(f"trust_trace_context must be True or False, not "
                              f"{self.trust_trace_context!r}")
        object.__setattr__(self, "trusted_networks", parse_networks(
            string_list("trusted_proxies", self.trusted_proxies), what="trusted_proxies"))


#: Headers the WebSocket handshake writes itself: picows would send a user's copy besides its
#: own (two Upgrade or Host headers), so a client's ``headers`` may not name them.
HANDSHAKE_HEADERS = frozenset({"host", "upgrade", "connection", "sec-websocket-key",
                               "sec-websocket-version", "sec-websocket-extensions",
                               "sec-websocket-accept"})


def check_dial_options(
    *,
    headers: Mapping[str, str],
    bearer_token: str | None,
    subprotocols: Sequence[str],
    max_message_bytes: int,
    buffer_bytes: int,
) -> tuple[dict[str, str], tuple[str, ...]]:
    """Validate what every client (forwarder, channel) sends when it opens a tunnel; returns
    the headers and subprotocols in normalised form."""
    _check_sizes(max_message_bytes, buffer_bytes)
    for key, value in headers.items():
        if not key or any(c in key for c in ":\r\n ") or any(c in value for c in "\r\n"):
            raise ConfigError(f"headers: invalid header {key!r}: names need no ':' or spaces, "
                              "values no line breaks")
        if key.lower() in HANDSHAKE_HEADERS:
            raise ConfigError(
                f"headers: {key!r} is written by the WebSocket handshake itself and "
                "cannot be set; drop it (Host comes from the target URL; Origin and "
                "Sec-WebSocket-Protocol may be set, or use origin/subprotocols)")
    if bearer_token is not None and (
        not bearer_token or any(c in bearer_token for c in "\r\n ")
    ):
        raise ConfigError("bearer_token must be non-empty, without spaces or line breaks")
    return dict(headers), _check_subprotocols("subprotocols", subprotocols)


@dataclass(frozen=True, kw_only=True)
class ReconnectPolicy:
    """Backoff between connection attempts after a failure (the Go project's defaults,
    which are gRPC's connection-backoff defaults).

    After ``n`` consecutive failures the next attempt waits
    ``min(initial_delay * multiplier ** (n - 1), max_delay)``, spread by +/- ``jitter``.
    A successful connection resets the count.
    """

    initial_delay: float = 1.0
    multiplier: float = 1.6
    jitter: float = 0.2
    max_delay: float = 120.0
    #: Each attempt gets at least this long to connect and complete the handshake.
    min_connect_timeout: float = 20.0

    def __post_init__(self) -> None:
        check_positive("initial_delay", self.initial_delay, allow_zero=True)
        check_positive("max_delay", self.max_delay, allow_zero=True)
        check_positive("min_connect_timeout", self.min_connect_timeout)
        if isinstance(self.multiplier, bool) or not isinstance(self.multiplier, int | float) \
                or not 1 <= self.multiplier < math.inf:
            raise ConfigError(f"multiplier must be a finite number >= 1 (such as 1.6), "
                              f"got {self.multiplier!r}")
        if isinstance(self.jitter, bool) or not isinstance(self.jitter, int | float) \
                or not 0 <= self.jitter < 1:
            raise ConfigError(f"jitter must be in [0, 1), got {self.jitter!r}")
        if self.max_delay < self.initial_delay:
            raise ConfigError(
                f"max_delay ({self.max_delay}) must be >= initial_delay ({self.initial_delay})")

    def delay(self, failures: int, random_unit: float) -> float:
        """Seconds to wait after ``failures`` consecutive failures (``random_unit`` in
        [0, 1) picks the point within the jitter band)."""
        if failures <= 0:
            return 0.0
        exponent = min(failures - 1, 1000)  # 1.6 ** 1000 is already past any max_delay
        try:
            base = min(self.initial_delay * self.multiplier ** exponent, self.max_delay)
        except OverflowError:
            base = self.max_delay
        return max(0.0, jittered(base, random_unit, self.jitter))


@dataclass(frozen=True, kw_only=True)
class ForwarderConfig:
    """Settings of a :class:`~grpcbridge.Forwarder` (local socket -> WebSocket tunnel)."""

    #: WebSocket URL of the bridge (``ws://host:8080/grpc`` or ``wss://...``).
    target: str
    #: Local address to accept gRPC clients on: ``host:port`` (0 picks one) or ``unix:/path``.
    listen: str = "127.0.0.1:50052"
    #: Demand TLS (``True``), forbid it (``False``) or follow the URL's scheme (``None``).
    tls: bool | None = None
    #: PEM file of CA certificates to verify a wss:// bridge (default: system store).
    cacert: str | None = None
    #: Extra HTTP headers for the upgrade request.
    headers: Mapping[str, str] = field(default_factory=dict)
    #: Bearer token sent as ``Authorization: Bearer <token>``.
    bearer_token: str | None = None
    #: Subprotocols to offer.
    subprotocols: Sequence[str] = ()
    #: Origin header to send, if any.
    origin: str | None = None
    #: Proxy to dial through: ``True`` reads ``https_proxy``/``http_proxy``/``all_proxy``/
    #: ``no_proxy`` when the config is built, a URL (``http://user:password@host:port``,
    #: ``socks5://...``) is always used, ``None`` means none (:mod:`grpcbridge.core.proxy`).
    proxy: ProxySetting = field(default=FROM_ENVIRONMENT, repr=False)
    #: Seconds for TCP connect + proxy CONNECT + TLS + WebSocket handshake.
    handshake_timeout: float = 10.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    #: Seconds between pings on a quiet tunnel; 0 disables.
    ping_interval: float = 20.0
    #: Close a tunnel with no traffic for this long; 0 disables.
    idle_timeout: float = 60.0

    parsed_target: Target = field(init=False, repr=False)
    listen_address: SocketAddress = field(init=False, repr=False)
    #: The proxy ``proxy`` resolved to (its ``repr`` hides the password), or None.
    parsed_proxy: ProxyURL | None = field(init=False)

    def __post_init__(self) -> None:
        target = parse_target(self.target, tls=self.tls)
        object.__setattr__(self, "parsed_proxy", resolve_proxy(target, self.proxy, os.environ))
        listen = parse_address(self.listen, what="listen", allow_port_zero=True)
        check_positive("handshake_timeout", self.handshake_timeout)
        _check_keepalive(self.ping_interval, self.idle_timeout)
        _check_file("cacert", self.cacert)
        if self.cacert is not None and not target.secure:
            raise ConfigError("cacert is only used with a wss:// target")
        headers, subprotocols = check_dial_options(
            headers=self.headers, bearer_token=self.bearer_token, subprotocols=self.subprotocols,
            max_message_bytes=self.max_message_bytes, buffer_bytes=self.buffer_bytes)
        object.__setattr__(self, "subprotocols", subprotocols)
        object.__setattr__(self, "headers", headers)
        object.__setattr__(self, "parsed_target", target)
        object.__setattr__(self, "listen_address", listen)
