"""Who may open a tunnel: host and origin policies, authentication, client identity and
abuse limits.

All decisions here are pure functions of the handshake request and a clock reading, so the
asyncio bridge and the ASGI app apply exactly the same rules.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import re
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from .errors import ConfigError
from .target import ip_or_none
from .wire import TOKEN_CHARS

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


#: Response headers the bridge writes itself; a :class:`Rejection` may not carry them.
_RESERVED_HEADERS = frozenset({"content-length", "content-type", "transfer-encoding",
                               "connection", "upgrade", "retry-after"})
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*\Z")


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
    #: Extra response headers, such as ``("WWW-Authenticate", 'Bearer realm="x"')``.
    headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for name, value in self.headers:
            if not name or not set(name) <= TOKEN_CHARS or not _HEADER_VALUE.match(value):
                raise ValueError(f"Rejection header {name!r}: {value!r} is not a valid HTTP "
                                 "header (token name; latin-1 value without line breaks)")
            if name.lower() in _RESERVED_HEADERS:
                raise ValueError(f"Rejection header {name!r} is set by the bridge; use "
                                 "retry_after for Retry-After and leave the others out")

    def response_headers(self) -> tuple[tuple[str, str], ...]:
        """Every header a response for this rejection needs besides Content-Type and
        Content-Length: Retry-After, ``Upgrade: websocket`` for 426, and :attr:`headers`."""
        extra: list[tuple[str, str]] = []
        if self.retry_after is not None:
            extra.append(("Retry-After", str(self.retry_after)))
        if self.status == 426:
            extra.append(("Upgrade", "websocket"))
        extra.extend(self.headers)
        return tuple(extra)


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


def is_trusted_proxy(address: str, networks: Sequence[IPNetwork]) -> bool:
    """Whether ``address`` (a socket peer) lies in one of ``networks`` (trusted proxies)."""
    ip = ip_or_none(address)
    return ip is not None and any(ip in network for network in networks)


def client_identity(
    peer: str, forwarded_for: Sequence[str], trusted_proxies: Sequence[IPNetwork]
) -> str:
    """The client's address for abuse limits.

    ``X-Forwarded-For`` is believed only when the socket peer is a trusted proxy; it is then
    walked from the right, skipping trusted proxies, and the first other valid address wins.
    """
    if not trusted_proxies or not is_trusted_proxy(peer, trusted_proxies):
        return peer
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
    for hop in reversed(hops):
        if ip_or_none(hop) is None:
            return peer  # a malformed chain cannot be trusted
        if not is_trusted_proxy(hop, trusted_proxies):
            return hop
    return peer


#: Longest path :func:`loggable_path` returns.
LOGGABLE_PATH_LIMIT = 200
# Where a path's parameters or query begin, also percent-encoded (a raw request target).
_PATH_CUT = re.compile(r";|\?|%3b|%3f", re.IGNORECASE)


def loggable_path(path: str, limit: int = LOGGABLE_PATH_LIMIT) -> str:
    """``path`` made safe for logs and rejection reasons: cut before any ``;`` parameters
    or ``?`` query (where clients put tokens), non-printable characters escaped as by
    :func:`repr`, and at most ``limit`` characters (longer ones end with ``...``)."""
    path = _PATH_CUT.split(path, maxsplit=1)[0]
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1]
                   for ch in path[: limit + 1])  # enough for the check below, whatever its length
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


_LABEL = re.compile(r"[a-z0-9_-]+\Z")
_PORT = re.compile(r"[0-9]{1,5}\Z")
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*\Z")


def _split_host_port(value: str) -> tuple[str, int | None] | None:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` -> ``(host, port)`` with the host
    normalised (lower case, no trailing dot; IPv6 compressed, in brackets); None if malformed.
    ASCII only: str.lower() maps some non-ASCII letters to ASCII ones (KELVIN SIGN -> k)."""
    if not value.isascii():
        return None
    value = value.lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        try:
            address = ipaddress.IPv6Address(value[1:end])
        except ValueError:
            return None
        host, rest = f"[{address.compressed}]", value[end + 1 :]
    else:
        host, colon, port_text = value.partition(":")
        rest = colon + port_text
        if host.endswith("."):
            host = host[:-1]
        if not host or not all(_LABEL.match(label) for label in host.split(".")):
            return None
    if not rest:
        return host, None
    if rest[0] != ":" or not _PORT.match(rest[1:]) or int(rest[1:]) > 65535:
        return None
    return host, int(rest[1:])


@dataclass(frozen=True, slots=True)
class _HostPattern:
    host: str  # normalised host; for a wildcard, the suffix after "*."
    wildcard: bool
    port: int | None
    any_port: bool  # False: the port must equal ``port`` (None: no explicit port)

    def matches(self, host: str, port: int | None) -> bool:
        if not self.any_port and port != self.port:
            return False
        if self.wildcard:  # hosts are validated: the part before the suffix is a label
            return host.endswith("." + self.host)
        return host == self.host


def _host_pattern(what: str, value: str, text: str, *, any_port: bool, example: str,
                  expected: str) -> _HostPattern:
    """``text`` (the entry ``value`` of ``what``, or its part after ``scheme://``):
    ``host[:port]`` or ``*.host[:port]``, lower case; with ``any_port`` an entry without a
    port matches every port. Else a :class:`ConfigError` for a misplaced ``*`` (``example``
    shows where it goes) or for not being ``expected``."""
    wildcard = text.startswith("*.")
    body = text[2:] if wildcard else text
    parsed = None if "*" in body else _split_host_port(body)
    if parsed is not None and not (wildcard and parsed[0].startswith("[")):
        host, port = parsed
        return _HostPattern(host, wildcard, port, any_port and port is None)
    if "*" in text:
        raise ConfigError(
            f"{what}: {value!r} uses '*' where it is not supported; the only wildcard is a "
            f"leading '*.' matching subdomains at any depth ({example}; the apex example.com "
            "is not matched), or '*' alone for anything")
    raise ConfigError(f"{what}: {value!r} is not {expected}")


def string_list(name: str, values: Iterable[str]) -> tuple[str, ...]:
    """``values`` as a tuple; one string (for a list of one) is refused."""
    if isinstance(values, str):
        raise ConfigError(f"{name} must be a list of strings, not one string "
                          f"(write [{values!r}])")
    return tuple(values)


def _entries(allowed: Iterable[str], what: str) -> tuple[bool, list[str]]:
    """Whether ``*`` (anything) is among the entries, and the others, lower case."""
    values = []
    for entry in string_list(what, allowed):
        if not isinstance(entry, str) or not entry.strip():
            raise ConfigError(f"{what} entries must be non-empty strings, got {entry!r}")
        values.append(entry.strip().lower())
    return "*" in values, [value for value in values if value != "*"]


_AN_ORIGIN = "an http(s) origin like https://app.example.com (scheme, host and optional port only)"


class OriginPolicy:
    """Browser Origin check.

    A request without ``Origin`` passes (non-browser clients), and so does a browser request
    whose Origin's ``host[:port]`` equals the ``Host`` header (the Go project's default;
    pair it with :class:`HostPolicy` against DNS rebinding). Allow-list entries add:
    full origins (``https://app.example.com``, scheme, host and port must match), bare hosts
    (``app.example.com``: any scheme and port; ``app.example.com:3000``: that port),
    wildcard subdomains (``*.example.com`` or ``https://*.example.com``: any depth, not the
    apex, same port rules) and ``*`` (anything). Case-insensitive.
    """

    __slots__ = ("_any", "_patterns")

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        #: (scheme, pattern): a full origin's scheme, or None for a bare host (any scheme).
        self._patterns: list[tuple[str | None, _HostPattern]] = []
        self._any, entries = _entries(allowed, "allowed_origins")
        for value in entries:
            is_origin = "://" in value
            scheme, _, rest = value.rstrip("/").partition("://")
            if is_origin and scheme not in ("http", "https"):
                raise ConfigError(f"allowed_origins: {value!r} is not {_AN_ORIGIN}")
            pattern = _host_pattern(
                "allowed_origins", value, rest if is_origin else value, any_port=not is_origin,
                example="*.example.com or https://*.example.com",
                expected=_AN_ORIGIN if is_origin else "a host like app.example.com or "
                "app.example.com:3000")
            self._patterns.append((scheme if is_origin else None, pattern))

    def allows(self, origin: str | None, host: str | None) -> bool:
        """Whether a request with this ``Origin`` and ``Host`` header may proceed."""
        if origin is None or self._any:
            return True
        text = origin.strip()  # "null" and garbage are refused
        scheme, sep, rest = text.lower().rstrip("/").partition("://")
        parsed = _split_host_port(rest)
        if not text.isascii() or not sep or not _SCHEME.match(scheme) or parsed is None:
            return False
        name, port = parsed
        if any(allowed in (None, scheme) and pattern.matches(name, port)
               for allowed, pattern in self._patterns):
            return True
        return host is not None and _split_host_port(host.strip()) == (name, port)


class HostPolicy:
    """Host header check, the guard against DNS rebinding (a hostile name re-pointed at the
    bridge, whose pages then pass the same-host Origin rule).

    With no entries every request passes. Otherwise the request needs exactly one ``Host``
    header matching an entry: ``bridge.example.com`` (any port), ``bridge.example.com:8080``
    or ``[::1]:8080`` (that port), ``*.example.com`` (any subdomain, not the apex) or ``*``
    (any value). Case-insensitive; a trailing dot is ignored.
    """

    __slots__ = ("_any", "_patterns")

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        self._any, entries = _entries(allowed, "allowed_hosts")
        self._patterns = [_host_pattern(
            "allowed_hosts", value, value, any_port=True, example="*.example.com",
            expected="a host name like bridge.example.com, bridge.example.com:8080 or [::1]:8080")
            for value in entries]

    @property
    def enabled(self) -> bool:
        """Whether any check happens (an allow-list was given)."""
        return self._any or bool(self._patterns)

    def allows(self, host: str | None) -> bool:
        """Whether a request with this ``Host`` header (None: missing, or more than one) may
        proceed."""
        if not self.enabled:
            return True
        if host is None:
            return False
        if self._any:
            return True
        parsed = _split_host_port(host.strip())
        return parsed is not None and any(pattern.matches(*parsed) for pattern in self._patterns)


class BearerTokenAuth:
    """Accept requests carrying ``token`` in the Authorization header (``Bearer <token>``),
    a ``Sec-WebSocket-Protocol`` entry ``bearer.<token>``, or the ``access_token`` query
    parameter. Compared in constant time; the token never appears in messages or logs.
    A missing token gets 401 with ``WWW-Authenticate: Bearer realm="grpcbridge"``, a wrong
    one 403 with ``error="invalid_token"`` added."""

    __slots__ = ("_token",)

    #: The challenge on a 401 (no token offered).
    CHALLENGE = 'Bearer realm="grpcbridge"'
    #: The header on a 403 (RFC 6750's error for a token that does not match).
    INVALID_TOKEN = 'Bearer realm="grpcbridge", error="invalid_token"'

    def __init__(self, token: str) -> None:
        if not token or token.strip() != token:
            raise ConfigError("the bearer token must be non-empty and without surrounding spaces")
        self._token = token.encode("utf-8", "surrogatepass")

    def __repr__(self) -> str:
        return "BearerTokenAuth(token=<redacted>)"

    def __call__(self, request: HandshakeRequest) -> Rejection | None:
        scheme, _, credentials = (request.header("authorization") or "").partition(" ")
        candidates = [credentials.strip()] if scheme.lower() == "bearer" else []
        candidates.extend(
            entry[len(BEARER_SUBPROTOCOL_PREFIX) :]
            for entry in request.subprotocols
            if entry.startswith(BEARER_SUBPROTOCOL_PREFIX)
        )
        candidates.extend(request.query_values(BEARER_QUERY_PARAMETER))
        if not candidates:
            return Rejection(401, "missing bearer token", label="auth",
                             headers=(("WWW-Authenticate", self.CHALLENGE),))
        # Check every candidate so timing does not reveal which one matched; surrogatepass:
        # a hostile lone surrogate must not turn into an exception (a 500).
        matched = [hmac.compare_digest(candidate.encode("utf-8", "surrogatepass"), self._token)
                   for candidate in candidates]
        if any(matched):
            return None
        return Rejection(403, "invalid bearer token", label="auth",
                         headers=(("WWW-Authenticate", self.INVALID_TOKEN),))


def select_subprotocol(offered: Sequence[str], allowed: Sequence[str]) -> str | None:
    """The subprotocol to echo: the first of ``allowed`` the client offered. Token entries
    (``bearer.*``) are never echoed."""
    offered_set = {entry for entry in offered if not entry.startswith(BEARER_SUBPROTOCOL_PREFIX)}
    return next((entry for entry in allowed if entry in offered_set), None)


@dataclass(slots=True)
class _ClientState:
    active: int = 0
    upgrades: deque[float] = field(default_factory=deque)


class AbuseLimiter:
    """Three limits: active tunnels overall (503), active tunnels per client (429) and
    upgrades per client in any sliding 60 s window (429 with Retry-After).

    Per-client state exists only while a client has active tunnels or upgrades inside the
    window; it is pruned as it expires, so memory does not grow with distinct clients.
    Limits of 0 are disabled (:class:`~grpcbridge.core.config.BridgeConfig` validates them).
    """

    WINDOW = 60.0

    def __init__(
        self,
        *,
        max_connections: int = 0,
        max_connections_per_client: int = 0,
        max_upgrades_per_minute: int = 0,
    ) -> None:
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

    def admit(self, client: str, now: float) -> Rejection | None:
        """Decide on an upgrade; on success the caller must :meth:`release` it later."""
        if now >= self._next_sweep:  # drop the state of clients whose window is empty
            self._next_sweep = now + self.WINDOW / 4
            for other, held in list(self._clients.items()):
                self._expire(held, now)
                if not held.active and not held.upgrades:
                    del self._clients[other]
        if self.max_connections and self.active >= self.max_connections:
            return Rejection(503, "bridge at its connection limit", retry_after=1, label="capacity")
        state = self._clients.setdefault(client, _ClientState())
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
