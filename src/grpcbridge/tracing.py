"""OpenTelemetry spans for tunnels and in-process RPCs (optional: ``pip install
grpcbridge[otel]``).

With ``opentelemetry-api`` installed, every tunnel a bridge admits (standalone
:class:`~grpcbridge.Bridge` or :class:`~grpcbridge.BridgeApp`) gets a span, and every RPC an
in-process :class:`~grpcbridge.GrpclibBackend` serves gets one too, continuing the W3C trace
context (``traceparent``/``tracestate``) the client sent in the call's metadata. Spans go to
whatever tracer provider the application configured (the SDK and an exporter, e.g. through
``opentelemetry-instrument``). With no provider configured (or OpenTelemetry's no-op one)
the hooks return at once, as they do without ``opentelemetry-api``, which is then never
imported.

Tunnel span ``grpcbridge.tunnel`` (kind SERVER; a child of a ``traceparent`` header on the
upgrade request, if any), attributes:

* ``client.address`` - the client as the bridge believes it (after ``trusted_proxies``),
  ``network.peer.address`` - the socket's peer, ``url.path``, ``network.protocol.name``
  (``websocket``);
* ``grpcbridge.request_id``, ``grpcbridge.subprotocol`` (when one was chosen),
  ``grpcbridge.backend``;
* at the end: ``grpcbridge.close_code``, ``grpcbridge.close_reason``,
  ``grpcbridge.bytes_to_backend``, ``grpcbridge.bytes_to_client``. Closes other than 1000,
  1001 and 1005 set the status to ERROR.

RPC span ``{service}/{method}`` (kind SERVER), attributes ``rpc.system`` (``grpc``),
``rpc.service``, ``rpc.method``, ``rpc.grpc.status_code``, ``grpcbridge.request_id``; linked
to its tunnel's span. The statuses OpenTelemetry counts as server errors (UNKNOWN,
DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS) set ERROR. The span is
current while the handler runs, so spans the handler makes are its children.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._grpclib_compat import peer_extra_info

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

#: The transport extra of an in-process connection that holds its tunnel's :class:`TunnelTrace`.
TUNNEL_EXTRA = "grpcbridge.tunnel"

#: The tunnel span's name, and the attributes grpcbridge adds to spans beside OpenTelemetry's
#: semantic conventions (``client.address``, ``url.path``, ``rpc.*``...).
TUNNEL_SPAN = "grpcbridge.tunnel"
REQUEST_ID = "grpcbridge.request_id"
SUBPROTOCOL = "grpcbridge.subprotocol"
BACKEND = "grpcbridge.backend"
CLOSE_CODE = "grpcbridge.close_code"
CLOSE_REASON = "grpcbridge.close_reason"
BYTES_TO_BACKEND = "grpcbridge.bytes_to_backend"
BYTES_TO_CLIENT = "grpcbridge.bytes_to_client"
#: All of the above.
OWN_NAMES = (TUNNEL_SPAN, REQUEST_ID, SUBPROTOCOL, BACKEND, CLOSE_CODE, CLOSE_REASON,
             BYTES_TO_BACKEND, BYTES_TO_CLIENT)

#: Close codes that end a tunnel normally (not an ERROR span).
_CLEAN_CLOSES = frozenset((1000, 1001, 1005))
#: gRPC status codes OpenTelemetry's semantic conventions count as server errors.
_SERVER_ERRORS = frozenset((2, 4, 12, 13, 14, 15))
#: rpc.grpc.status_code of an RPC whose handler ended without sending its status.
_CANCELLED = 1

_available: bool | None = None
_tracer_cache: tuple[object, Tracer | None] | None = None


def available() -> bool:
    """Whether ``opentelemetry-api`` is installed (imported on the first call)."""
    global _available
    if _available is None:
        try:
            import opentelemetry.context
            import opentelemetry.propagate
            import opentelemetry.trace  # noqa: F401
        except ImportError:
            _available = False
        else:
            _available = True
    return _available


def _tracer() -> Tracer | None:
    """grpcbridge's tracer from the current global provider (it may be set after import);
    None without one (OpenTelemetry's placeholder or its no-op provider): nothing to record."""
    global _tracer_cache
    if not available():
        return None
    from opentelemetry import trace

    from . import __version__

    provider = trace.get_tracer_provider()
    cached = _tracer_cache
    if cached is None or cached[0] is not provider:
        unset = isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))
        tracer = None if unset else provider.get_tracer("grpcbridge", __version__)
        cached = _tracer_cache = (provider, tracer)
    return cached[1]


@dataclass(slots=True)
class TunnelTrace:
    """What an RPC span needs of its tunnel: the request id and the tunnel's span."""

    request_id: str
    span: Span | None


#: The tunnel whose backend is being connected (set around ``Backend.connect``).
current_tunnel: contextvars.ContextVar[TunnelTrace | None] = contextvars.ContextVar(
    "grpcbridge_current_tunnel", default=None)


def start_tunnel(*, request_id: str, client: str, peer: str, path: str,
                 subprotocol: str | None, backend: str,
                 headers: Mapping[str, Sequence[str]]) -> TunnelTrace:
    """Open the span of a tunnel just admitted (``headers``: the upgrade request's, with
    lower-case names; a ``traceparent`` among them is the span's parent)."""
    tracer = _tracer()
    if tracer is None:
        return TunnelTrace(request_id, None)
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind

    parent = propagate.extract(headers) if "traceparent" in headers else None
    attributes: dict[str, str] = {
        "client.address": client, "network.peer.address": peer, "url.path": path,
        "network.protocol.name": "websocket", REQUEST_ID: request_id, BACKEND: backend,
    }
    if subprotocol:
        attributes[SUBPROTOCOL] = subprotocol
    span = tracer.start_span(TUNNEL_SPAN, context=parent, kind=SpanKind.SERVER,
                             attributes=attributes)
    return TunnelTrace(request_id, span)


def end_tunnel(trace: TunnelTrace, *, code: int, reason: str, bytes_to_backend: int,
               bytes_to_client: int) -> None:
    """Close the tunnel's span with how it ended."""
    span = trace.span
    if span is None:
        return
    trace.span = None
    from opentelemetry.trace import Status, StatusCode

    span.set_attributes({
        CLOSE_CODE: code, CLOSE_REASON: reason, BYTES_TO_BACKEND: bytes_to_backend,
        BYTES_TO_CLIENT: bytes_to_client,
    })
    if code not in _CLEAN_CLOSES:
        span.set_status(Status(StatusCode.ERROR, f"closed with {code}: {reason}"))
    span.end()


# ---------------------------------------------------------------------- RPC spans


class _Rpc:
    """The span of one RPC being handled, ended once (status sent, or the handler gone)."""

    __slots__ = ("cancelled", "span")

    def __init__(self, span: Span) -> None:
        self.span: Span | None = span
        #: The client cancelled (or the connection went): grpclib still reports UNKNOWN.
        self.cancelled = False

    def end(self, status: int, message: str | None = None) -> None:
        span = self.span
        if span is None:
            return
        self.span = None
        from opentelemetry.trace import Status, StatusCode

        span.set_attribute("rpc.grpc.status_code", status)
        if status in _SERVER_ERRORS:
            span.set_status(Status(StatusCode.ERROR, message))
        span.end()


#: The RPC whose handler runs in this task (grpclib runs each request in its own task).
_current_rpc: contextvars.ContextVar[_Rpc | None] = contextvars.ContextVar(
    "grpcbridge_current_rpc", default=None)


class _MetadataGetter:
    """Reads W3C trace headers from grpclib's metadata (a MultiDict)."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        values = [value for value in carrier.getall(key, ()) if isinstance(value, str)]
        return values or None

    def keys(self, carrier: Any) -> list[str]:
        return list(carrier.keys())


async def _on_request(event: Any) -> None:
    """grpclib ``RecvRequest``: open the RPC's span, current while the handler runs."""
    tracer = _tracer()
    if tracer is None:
        return
    from grpclib.exceptions import StreamTerminatedError
    from opentelemetry import context, propagate, trace
    from opentelemetry.trace import Link, SpanKind

    metadata = event.metadata
    parent = (propagate.extract(metadata, getter=_MetadataGetter())  # type: ignore[arg-type]
              if "traceparent" in metadata else context.Context())
    service, _, method = event.method_name.lstrip("/").rpartition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    links = None
    tunnel = peer_extra_info(event.peer, TUNNEL_EXTRA)
    if isinstance(tunnel, TunnelTrace):
        attributes[REQUEST_ID] = tunnel.request_id
        span_context = tunnel.span.get_span_context() if tunnel.span is not None else None
        if span_context is not None and span_context.is_valid:
            links = [Link(span_context)]
    span = tracer.start_span(f"{service}/{method}", context=parent, kind=SpanKind.SERVER,
                             attributes=attributes, links=links)
    rpc = _Rpc(span)
    _current_rpc.set(rpc)  # this runs in the RPC's own task: set until the task ends
    handler = event.method_func

    async def traced(stream: Any) -> None:
        with trace.use_span(span, end_on_exit=False, record_exception=False,
                            set_status_on_exception=False):
            try:
                await handler(stream)
            except (StreamTerminatedError, asyncio.CancelledError):
                rpc.cancelled = True
                raise

    event.method_func = traced
    task = asyncio.current_task()
    if task is not None:  # the handler ended without sending a status (connection lost)
        task.add_done_callback(lambda _task: rpc.end(_CANCELLED))


async def _on_trailers(event: Any) -> None:
    """grpclib ``SendTrailingMetadata``: the RPC's status is known; end its span."""
    rpc = _current_rpc.get()
    if rpc is not None:
        if rpc.cancelled:
            rpc.end(_CANCELLED)
        else:
            rpc.end(int(event.status.value), event.status_message)


def trace_rpcs(server: Any) -> None:
    """Give every RPC grpclib ``server`` handles a span (nothing without opentelemetry)."""
    if not available():
        return
    from grpclib.events import RecvRequest, SendTrailingMetadata, listen

    listen(server, RecvRequest, _on_request)
    listen(server, SendTrailingMetadata, _on_trailers)
