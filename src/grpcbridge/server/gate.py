"""The admission sequence and tunnel accounting shared by every server adapter.

Both the asyncio :class:`~grpcbridge.Bridge` and the ASGI app call :meth:`Gate.check` with
what they know of an upgrade request (and report tunnels through
:class:`~grpcbridge.server.session.TunnelSession`), so guards, metrics and log events are
identical whichever way WebSockets arrive.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
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
    REQUEST_ID_HEADER,
    BridgeMetrics,
    client_request_id,
    log_event,
    logger,
    new_request_id,
)


@dataclass(frozen=True, slots=True)
class Admitted:
    """An upgrade that passed every guard; release its ``Gate.limiter`` slot when the
    tunnel ends.
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


def header_map(items: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """A request's headers as :meth:`Gate.check` takes them: lower-case name -> values."""
    headers: dict[str, list[str]] = {}
    for name, value in items:
        headers.setdefault(name.lower(), []).append(value)
    return headers


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

    def request_id(self, headers: Mapping[str, Sequence[str]], *,
                   peer: str) -> tuple[str, str | None]:
        """The request id of a request with ``headers``: its ``X-Request-Id`` when it is
        well formed and the peer is a trusted proxy (a direct client could reuse another
        tunnel's id), else a new one (a malformed header is logged); and the well-formed
        ``X-Request-Id`` it did not use (for :attr:`Admitted.client_request_id`)."""
        sent, problem = client_request_id(headers.get(REQUEST_ID_HEADER.lower(), ()))
        if sent is not None and is_trusted_proxy(peer, self.config.trusted_networks):
            return sent, None
        request_id = new_request_id()
        if problem is not None:
            log_event("request_id_replaced", request_id=request_id, peer=peer, reason=problem)
        return request_id, sent

    async def check(
        self,
        *,
        request_id: str,
        client_request_id: str | None = None,
        path: str,
        query: str,
        headers: Mapping[str, Sequence[str]],
        peer: str,
        websocket: bool,
        now: float,
    ) -> Admitted | Rejection:
        """Run the guards in order. ``headers`` maps lower-case names to values;
        ``request_id`` and ``client_request_id`` are :meth:`request_id`'s. A
        :class:`Rejection` has already been counted and logged."""
        config = self.config
        client = peer
        origin = next(iter(headers.get("origin", ())), None)
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
        elif not config.origin_policy.allows(origin, next(iter(hosts), None)):
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
                    return Admitted(client, select_subprotocol(offered, config.subprotocols),
                                    request_id, client_request_id,
                                    config.trust_trace_context
                                    or is_trusted_proxy(peer, config.trusted_networks))
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
            if decision is None or isinstance(decision, Rejection):
                return decision
            logger.error("authentication hook returned %r, not None or a Rejection", decision,
                         extra={"fields": {"request_id": request_id}})
        except Exception:
            logger.exception("authentication hook failed",
                             extra={"fields": {"request_id": request_id}})
        return Rejection(500, "authentication failed", label="auth_error")

    def rejected(self, rejection: Rejection, *, request_id: str, peer: str, client: str = "",
                 path: str = "", origin: str = "", host: str = "") -> None:
        """Count and log a refused upgrade (``path`` is logged without parameters/query)."""
        self.metrics.upgrades_rejected.labels(rejection.label).inc()
        log_event("upgrade_rejected", request_id=request_id, status=rejection.status,
                  reason=rejection.reason, peer=peer, client=client or peer,
                  path=loggable_path(path), origin=origin, host=loggable_path(host))
