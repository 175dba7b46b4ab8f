"""The admission sequence and tunnel accounting shared by every server adapter.

Both the asyncio :class:`~grpcbridge.Bridge` and the ASGI app call :meth:`Gate.check` with
what they know of an upgrade request and report tunnels through :meth:`Gate.opened` and
:meth:`Gate.closed`, so guards, metrics and log events are identical whichever way
WebSockets arrive.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..core.admission import (
    AbuseLimiter,
    HandshakeRequest,
    Rejection,
    client_identity,
    is_trusted_proxy,
    loggable_path,
    select_subprotocol,
)
from ..core.config import BridgeConfig
from ..observability import (
    DIAL_ERROR,
    DIAL_REFUSED,
    DIAL_TIMEOUT,
    REQUEST_ID_HEADER,
    BridgeMetrics,
    client_request_id,
    log_event,
    logger,
    new_request_id,
)


@dataclass(frozen=True, slots=True)
class Admitted:
    """An upgrade that passed every guard; :meth:`Gate.release` it when the tunnel ends.
    ``request_id`` goes into every log line (and the span) of the tunnel;
    ``client_request_id`` is the well-formed ``X-Request-Id`` a client that is not a trusted
    proxy sent (not used as the request id, logged once). ``trust_trace_context``: whether
    the trace context of the upgrade request (``traceparent``...) may be the tunnel span's
    parent (the peer is a trusted proxy, or ``BridgeConfig.trust_trace_context``; RPC spans
    follow ``BridgeConfig.trust_trace_context`` only)."""

    client: str
    subprotocol: str | None
    request_id: str
    client_request_id: str | None = None
    trust_trace_context: bool = False


def _first(headers: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = headers.get(name)
    return values[0] if values else None


def single_host(headers: Mapping[str, Sequence[str]]) -> str | None:
    """The request's ``Host``, or None when it has none or several (a request with two
    ``Host`` headers is not trusted with either)."""
    hosts = headers.get("host", ())
    return hosts[0] if len(hosts) == 1 else None


class Gate:
    """Decides on upgrade requests: path, WebSocket upgrade, Host, Origin, abuse limits,
    auth."""

    def __init__(self, config: BridgeConfig, metrics: BridgeMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.limiter = AbuseLimiter(
            max_connections=config.max_connections,
            max_connections_per_client=config.max_connections_per_client,
            max_upgrades_per_minute=config.max_upgrades_per_minute,
        )

    def trusts(self, peer: str) -> bool:
        """Whether the socket peer is one of ``trusted_proxies``."""
        return is_trusted_proxy(peer, self.config.trusted_networks)

    def request_id(self, values: Sequence[str], *, peer: str) -> str:
        """The request id of a request whose ``X-Request-Id`` headers are ``values``: the
        header's when it is well formed and the peer is a trusted proxy (a direct client
        could reuse another tunnel's id), else a new one (a malformed header is logged)."""
        request_id, problem = client_request_id(values)
        if problem is not None:
            log_event("request_id_replaced", request_id=(request_id := new_request_id()),
                      peer=peer, reason=problem)
        elif request_id is None or not self.trusts(peer):
            request_id = new_request_id()
        return request_id

    async def check(
        self,
        *,
        request_id: str,
        path: str,
        query: str,
        headers: Mapping[str, Sequence[str]],
        peer: str,
        websocket: bool,
        now: float,
    ) -> Admitted | Rejection:
        """Run the guards in order. ``headers`` maps lower-case names to values;
        ``request_id`` is :meth:`request_id`'s. A :class:`Rejection` has already been
        counted and logged."""
        config = self.config
        client = peer
        origin = _first(headers, "origin")
        hosts = headers.get("host", ())
        rejection: Rejection | None = None
        if path != config.path:
            rejection = Rejection(
                404, f"no tunnel endpoint at {loggable_path(path)}; use {config.path}",
                label="path")
        elif not websocket:
            rejection = Rejection(
                426, "this endpoint only accepts WebSocket upgrades (gRPC over WebSocket)",
                label="not_websocket")
        elif not config.host_policy.allows(single_host(headers)):
            rejection = Rejection(403, "host not allowed", label="host")
        elif not config.origin_policy.allows(origin, _first(headers, "host")):
            rejection = Rejection(403, "origin not allowed", label="origin")
        else:
            client = client_identity(peer, headers.get("x-forwarded-for", ()),
                                     config.trusted_networks)
            rejection = self.limiter.admit(client, now)
            if rejection is None:
                offered = tuple(
                    entry.strip()
                    for value in headers.get("sec-websocket-protocol", ())
                    for entry in value.split(",") if entry.strip()
                )
                try:
                    rejection = await self._authenticate(path, query, headers, client,
                                                         offered, request_id)
                except BaseException:  # cancelled: the client left, or the handshake timed out
                    self.limiter.release(client, now)
                    raise
                if rejection is not None:
                    self.limiter.release(client, now)
                else:
                    sent, _ = client_request_id(headers.get(REQUEST_ID_HEADER.lower(), ()))
                    return Admitted(client, select_subprotocol(offered, config.subprotocols),
                                    request_id, sent if sent != request_id else None,
                                    config.trust_trace_context or self.trusts(peer))
        self.rejected(rejection, request_id=request_id, peer=peer, client=client, path=path,
                      origin=origin or "", host=", ".join(hosts))
        return rejection

    async def _authenticate(self, path: str, query: str, headers: Mapping[str, Sequence[str]],
                            client: str, offered: tuple[str, ...],
                            request_id: str) -> Rejection | None:
        hook = self.config.authenticate
        if hook is None:
            return None
        request = HandshakeRequest(path=path, query=query, headers=headers, client=client,
                                   subprotocols=offered)
        try:
            decision = hook(request)
            if inspect.isawaitable(decision):
                decision = await decision
        except Exception:
            logger.exception("authentication hook failed",
                             extra={"fields": {"request_id": request_id}})
            return Rejection(500, "authentication failed", label="auth_error")
        if decision is not None and not isinstance(decision, Rejection):
            logger.error("authentication hook returned %r, not None or a Rejection", decision,
                         extra={"fields": {"request_id": request_id}})
            return Rejection(500, "authentication failed", label="auth_error")
        return decision

    def rejected(self, rejection: Rejection, *, request_id: str, peer: str, client: str = "",
                 path: str = "", origin: str = "", host: str = "") -> None:
        """Count and log a refused upgrade (``path`` is logged without parameters/query)."""
        self.metrics.upgrades_rejected.labels(rejection.label).inc()
        log_event("upgrade_rejected", request_id=request_id, status=rejection.status,
                  reason=rejection.reason, peer=peer, client=client or peer,
                  path=loggable_path(path), origin=origin, host=loggable_path(host))

    def release(self, admitted: Admitted, now: float) -> None:
        self.limiter.release(admitted.client, now)

    # ------------------------------------------------------------ accounting

    def opened(self, admitted: Admitted, *, peer: str, path: str, origin: str) -> None:
        self.metrics.upgrades_accepted.inc()
        self.metrics.tunnels_active.inc()
        extra = ({} if admitted.client_request_id is None
                 else {"client_request_id": admitted.client_request_id})
        log_event("upgrade_accepted", request_id=admitted.request_id, peer=peer,
                  client=admitted.client, path=loggable_path(path),
                  origin=origin, subprotocol=admitted.subprotocol or "", **extra)

    def backend_failed(self, admitted: Admitted, exc: BaseException) -> None:
        reason = (DIAL_TIMEOUT if isinstance(exc, TimeoutError)
                  else DIAL_REFUSED if isinstance(exc, ConnectionRefusedError) else DIAL_ERROR)
        self.metrics.backend_dial_failures.labels(reason).inc()
        log_event("backend_dial_failed", request_id=admitted.request_id,
                  backend=str(self.config.backend), reason=reason,
                  error=str(exc) or type(exc).__name__)

    def backend_connected(self, admitted: Admitted, seconds: float) -> None:
        self.metrics.backend_dial_seconds.observe(seconds)
        log_event("tunnel_opened", request_id=admitted.request_id, client=admitted.client,
                  backend=str(self.config.backend))

    def retiring(self, admitted: Admitted, age: float) -> None:
        """A tunnel reached its maximum age: its client was sent a GOAWAY."""
        self.metrics.tunnels_retired.inc()
        log_event("tunnel_retiring", request_id=admitted.request_id, client=admitted.client,
                  age=round(age, 3),
                  grace=self.config.max_tunnel_age_grace)

    def closed(self, admitted: Admitted, *, code: int, reason: str, duration: float,
               bytes_to_backend: int, bytes_to_client: int) -> None:
        """Count a finished tunnel (its bytes are reported separately, as they flow)."""
        self.metrics.tunnels_active.dec()
        self.metrics.tunnels_closed.labels(str(code)).inc()
        self.metrics.tunnel_duration.observe(duration)
        log_event("tunnel_closed", request_id=admitted.request_id, client=admitted.client,
                  code=code, reason=reason, duration=round(duration, 3),
                  bytes_to_backend=bytes_to_backend, bytes_to_client=bytes_to_client)
