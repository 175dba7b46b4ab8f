"""Who may open a tunnel: origin policy, authentication, client identity and abuse limits.

All decisions here are pure functions of the handshake request and a clock reading, so the
asyncio bridge and the ASGI app apply exactly the same rules.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from .errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Prefix of a ``Sec-WebSocket-Protocol`` entry carrying a bearer token (browsers cannot
#: set an Authorization header on a WebSocket): ``bearer.<token>``.
BEARER_SUBPROTOCOL_PREFIX = "bearer."
#: Query parameter that may carry a bearer token.
BEARER_QUERY_PARAMETER = "access_token"


@dataclass(frozen=True, slots=True)
class HandshakeRequest:
    """What the bridge knows about a WebSocket upgrade request when it decides on it."""

    #: Request path without the query string.
    path: str
    #: Raw query string (without ``?``).
    query: str
    #: Header name (lower case) -> values, in order of appearance.
    headers: Mapping[str, Sequence[str]]
    #: Client identity used for abuse limits (peer address, or forwarded address when the
    #: peer is a trusted proxy).
    client: str
    #: Subprotocols the client offered, in its order.
    subprotocols: tuple[str, ...] = ()

    def header(self, name: str) -> str | None:
        """First value of a header (case-insensitive name), or ``None``."""
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def query_values(self, name: str) -> list[str]:
        return parse_qs(self.query, keep_blank_values=True).get(name, [])


@dataclass(frozen=True, slots=True)
class Rejection:
    """Refuse an upgrade with an HTTP ``status`` and a one-line ``reason`` (sent to the
    client as the response body; never include secrets)."""

    status: int
    reason: str
    #: Seconds for a ``Retry-After`` header (429/503), if any.
    retry_after: int | None = None
    #: Short machine-readable label for metrics (``origin``, ``auth``, ``rate``...).
    label: str = "rejected"


#: An authentication hook: return ``None`` to accept or a :class:`Rejection`.
AuthHook = Callable[[HandshakeRequest], "Rejection | Awaitable[Rejection | None] | None"]


def parse_networks(values: Iterable[str], *, what: str) -> tuple[IPNetwork, ...]:
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ConfigError(
                f"{what}: {value!r} is not an IP network; use CIDR notation like 10.0.0.0/8"
            ) from None
    return tuple(networks)


def _in_networks(address: str, networks: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_identity(
    peer: str, forwarded_for: Sequence[str], trusted_proxies: Sequence[IPNetwork]
) -> str:
    """The client's address for abuse limits.

    ``X-Forwarded-For`` is believed only when the socket peer is a trusted proxy; it is then
    walked from the right, skipping trusted proxies, and the first other valid address wins.
    """
    if not trusted_proxies or not _in_networks(peer, trusted_proxies):
        return peer
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return peer  # a malformed chain cannot be trusted
        if not _in_networks(hop, trusted_proxies):
            return hop
    return peer


class OriginPolicy:
    """Browser Origin check.

    With no allow-list: a request without ``Origin`` passes (non-browser clients), and a
    browser request passes when the Origin's ``host[:port]`` equals the ``Host`` header (the
    Go project's default). With an allow-list, entries are full origins
    (``https://app.example.com``), bare hosts (``app.example.com``, any scheme and port), or
    ``*`` (anything). Same-host requests always pass.
    """

    __slots__ = ("_any", "_hosts", "_origins")

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        self._origins: set[str] = set()
        self._hosts: set[str] = set()
        self._any = False
        for entry in allowed:
            value = entry.strip().lower()
            if "://" in value:
                value = value.rstrip("/") or value
            if not value:
                raise ConfigError("allowed_origins entries must not be empty")
            if value == "*":
                self._any = True
            elif "://" in value:
                parts = urlsplit(value)
                if (parts.scheme not in ("http", "https") or not parts.hostname
                        or parts.path or parts.query or parts.fragment):
                    raise ConfigError(
                        f"allowed_origins: {entry!r} is not an http(s) origin like "
                        "https://app.example.com (scheme, host and optional port only)"
                    )
                self._origins.add(value)
            else:
                parts = urlsplit("//" + value)
                if not parts.hostname or parts.path or parts.query or value.endswith(":"):
                    raise ConfigError(
                        f"allowed_origins: {entry!r} is not a host like app.example.com "
                        "or app.example.com:3000"
                    )
                self._hosts.add(value)

    def allows(self, origin: str | None, host: str | None) -> bool:
        if origin is None:
            return True
        value = origin.strip().lower().rstrip("/")
        if self._any or value in self._origins:
            return True
        parts = urlsplit(value)
        if parts.hostname is None:
            return False
        if parts.hostname in self._hosts or parts.netloc in self._hosts:
            return True
        return host is not None and parts.netloc == host.strip().lower()


class BearerTokenAuth:
    """Accept requests carrying ``token`` in the Authorization header (``Bearer <token>``),
    a ``Sec-WebSocket-Protocol`` entry ``bearer.<token>``, or the ``access_token`` query
    parameter. Compared in constant time; the token never appears in messages or logs."""

    __slots__ = ("_token",)

    def __init__(self, token: str) -> None:
        if not token or token.strip() != token:
            raise ConfigError("the bearer token must be non-empty and without surrounding spaces")
        self._token = token.encode()

    def __repr__(self) -> str:
        return "BearerTokenAuth(token=<redacted>)"

    def _matches(self, candidate: str) -> bool:
        return hmac.compare_digest(candidate.encode(), self._token)

    def __call__(self, request: HandshakeRequest) -> Rejection | None:
        candidates: list[str] = []
        authorization = request.header("authorization")
        if authorization is not None:
            scheme, _, credentials = authorization.partition(" ")
            if scheme.lower() == "bearer":
                candidates.append(credentials.strip())
        candidates.extend(
            entry[len(BEARER_SUBPROTOCOL_PREFIX) :]
            for entry in request.subprotocols
            if entry.startswith(BEARER_SUBPROTOCOL_PREFIX)
        )
        candidates.extend(request.query_values(BEARER_QUERY_PARAMETER))
        if not candidates:
            return Rejection(401, "missing bearer token", label="auth")
        # Check every candidate so timing does not reveal which one matched.
        matched = [self._matches(candidate) for candidate in candidates]
        if any(matched):
            return None
        return Rejection(403, "invalid bearer token", label="auth")


def select_subprotocol(offered: Sequence[str], allowed: Sequence[str]) -> str | None:
    """The subprotocol to echo: the first of ``allowed`` the client offered. Token entries
    (``bearer.*``) are never echoed."""
    offered_set = {entry for entry in offered if not entry.startswith(BEARER_SUBPROTOCOL_PREFIX)}
    for entry in allowed:
        if entry in offered_set:
            return entry
    return None


@dataclass(slots=True)
class _ClientState:
    active: int = 0
    upgrades: deque[float] = field(default_factory=deque)


class AbuseLimiter:
    """Three limits: active tunnels overall (503), active tunnels per client (429) and
    upgrades per client in any sliding 60 s window (429 with Retry-After).

    Per-client state exists only while a client has active tunnels or upgrades inside the
    window; it is pruned as it expires, so memory does not grow with distinct clients.
    Limits of 0 are disabled.
    """

    WINDOW = 60.0

    def __init__(
        self,
        *,
        max_connections: int = 0,
        max_connections_per_client: int = 0,
        max_upgrades_per_minute: int = 0,
    ) -> None:
        for name, value in (
            ("max_connections", max_connections),
            ("max_connections_per_client", max_connections_per_client),
            ("max_upgrades_per_minute", max_upgrades_per_minute),
        ):
            if value < 0:
                raise ConfigError(f"{name} must be >= 0 (0 disables the limit), got {value}")
        self.max_connections = max_connections
        self.max_connections_per_client = max_connections_per_client
        self.max_upgrades_per_minute = max_upgrades_per_minute
        self.active = 0
        self._clients: dict[str, _ClientState] = {}
        self._next_sweep = 0.0

    @property
    def tracked_clients(self) -> int:
        """Number of clients with state held (for tests and metrics)."""
        return len(self._clients)

    def _expire(self, state: _ClientState, now: float) -> None:
        upgrades = state.upgrades
        horizon = now - self.WINDOW
        while upgrades and upgrades[0] <= horizon:
            upgrades.popleft()

    def _sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.WINDOW / 4
        for client in list(self._clients):
            state = self._clients[client]
            self._expire(state, now)
            if not state.active and not state.upgrades:
                del self._clients[client]

    def admit(self, client: str, now: float) -> Rejection | None:
        """Decide on an upgrade; on success the caller must :meth:`release` it later."""
        self._sweep(now)
        if self.max_connections and self.active >= self.max_connections:
            return Rejection(503, "bridge at its connection limit", retry_after=1, label="capacity")
        state = self._clients.get(client)
        if state is None:
            state = self._clients[client] = _ClientState()
        else:
            self._expire(state, now)
        if self.max_connections_per_client and state.active >= self.max_connections_per_client:
            return Rejection(429, "too many tunnels from this client", retry_after=1,
                             label="client_connections")
        limit = self.max_upgrades_per_minute
        if limit and len(state.upgrades) >= limit:
            wait = state.upgrades[0] + self.WINDOW - now
            return Rejection(429, "too many upgrades from this client",
                             retry_after=max(1, math.ceil(wait)), label="rate")
        if limit:
            state.upgrades.append(now)
        state.active += 1
        self.active += 1
        return None

    def release(self, client: str, now: float) -> None:
        state = self._clients.get(client)
        if state is None or state.active <= 0:
            raise RuntimeError(f"release() without a matching admit() for {client!r}")
        state.active -= 1
        self.active -= 1
        if not state.active:
            self._expire(state, now)
            if not state.upgrades:
                del self._clients[client]
