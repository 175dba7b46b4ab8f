"""OpenTelemetry spans for tunnels and in-process RPCs (optional: ``pip install
grpcbridge[otel]``).

With ``opentelemetry-api`` installed, every tunnel a bridge admits (standalone
:class:`~grpcbridge.Bridge` or :class:`~grpcbridge.BridgeApp`) gets a span, and every RPC an
in-process :class:`~grpcbridge.GrpclibBackend` serves gets one too. Spans go to whatever
tracer provider the application configured (the SDK and an exporter, e.g. through
``opentelemetry-instrument``). With no provider configured (or OpenTelemetry's no-op one)
the hooks return at once, as they do without ``opentelemetry-api``, which is then never
imported.

Trace context: the client's (read with the configured propagators, W3C ``traceparent`` and
baggage by default: from the upgrade request's headers for the tunnel span, from the call's
metadata for an RPC span) is the span's parent only when it is trusted: with
``BridgeConfig.trust_trace_context``, or, for the upgrade request's headers only, when the
socket peer is one of ``BridgeConfig.trusted_proxies`` (a proxy can vet the headers of the
request it forwards, not the calls a client makes inside the tunnel).
Otherwise the span starts a new trace with a link to the client's span, as public endpoints
do (a client must not choose the trace id or the sampling decision, nor inject baggage).

Tunnel span ``grpcbridge.tunnel`` (kind SERVER), attributes:

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
DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS) set ERROR; an RPC the
client cancelled is CANCELLED. The span (and the trusted context's baggage) is current while
the handler runs, so spans the handler makes are its children. Calls grpclib answers
without a handler (UNIMPLEMENTED methods) get no span.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._grpclib_compat import peer_extra_info

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.propagators.textmap import Getter
    from opentelemetry.trace import Link, Span, Tracer

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
#: What grpclib sends when the client cancelled or the connection went.
_UNKNOWN = 2

_tracer_cache: tuple[object, Tracer | None] | None = None


@functools.cache
def available() -> bool:
    """Whether ``opentelemetry-api`` is installed (imported on the first call)."""
    try:
        import opentelemetry.context
        import opentelemetry.propagate
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        return False
    return True


def _tracer() -> Tracer | None:
    """grpcbridge's tracer from the current global provider (it may be set after import);
    None without one (OpenTelemetry's placeholder or its no-op provider): nothing to record."""
    global _tracer_cache
    if not available():
        return None
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    cached = _tracer_cache
    if cached is None or cached[0] is not provider:
        from . import __version__

        unset = isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))
        tracer = None if unset else provider.get_tracer("grpcbridge", __version__)
        cached = _tracer_cache = (provider, tracer)
    return cached[1]


@dataclass(slots=True)
class TunnelTrace:
    """What an RPC span needs of its tunnel: the request id, the tunnel's span, and whether
    the trace context in its calls' metadata is trusted (only with
    ``BridgeConfig.trust_trace_context``: a trusted proxy vouches for the upgrade request's
    headers, not for what the client sends inside the tunnel)."""

    request_id: str
    span: Span | None
    trust_context: bool = False


#: The tunnel whose backend is being connected (set around ``Backend.connect``).
current_tunnel: contextvars.ContextVar[TunnelTrace | None] = contextvars.ContextVar(
    "grpcbridge_current_tunnel", default=None)


def _parent(carrier: Any, getter: Getter[Any], trusted: bool
            ) -> tuple[Context, list[Link]]:
    """The context a server span starts in, and its links, from the trace context in
    ``carrier`` (read by the configured propagators): that context when ``trusted``; else
    an empty one (a new trace, no baggage) and a link to the remote span, if any."""
    from opentelemetry import propagate, trace
    from opentelemetry.context import Context
    from opentelemetry.trace import Link

    extracted = propagate.extract(carrier, context=Context(), getter=getter)
    if trusted:
        return extracted, []
    remote = trace.get_current_span(extracted).get_span_context()
    return Context(), [Link(remote)] if remote.is_valid else []


def start_tunnel(*, request_id: str, client: str, peer: str, path: str,
                 subprotocol: str | None, backend: str,
                 headers: Mapping[str, Sequence[str]], trust_context: bool,
                 trust_rpc_context: bool) -> TunnelTrace:
    """Open the span of a tunnel just admitted (``headers``: the upgrade request's, with
    lower-case names; the trace context among them is the span's parent when
    ``trust_context``, else linked; ``trust_rpc_context``: the same for its RPCs' metadata)."""
    tracer = _tracer()
    if tracer is None:
        return TunnelTrace(request_id, None, trust_rpc_context)
    from opentelemetry.propagators.textmap import DefaultGetter
    from opentelemetry.trace import SpanKind

    parent, links = _parent(headers, DefaultGetter(), trust_context)
    attributes: dict[str, str] = {
        "client.address": client, "network.peer.address": peer, "url.path": path,
        "network.protocol.name": "websocket", REQUEST_ID: request_id, BACKEND: backend,
    }
    if subprotocol:
        attributes[SUBPROTOCOL] = subprotocol
    span = tracer.start_span(TUNNEL_SPAN, context=parent, kind=SpanKind.SERVER,
                             attributes=attributes, links=links)
    return TunnelTrace(request_id, span, trust_rpc_context)


def end_tunnel(trace: TunnelTrace, *, code: int, reason: str, bytes_to_backend: int,
               bytes_to_client: int) -> None:
    """Close the tunnel's span with how it ended."""
    span, trace.span = trace.span, None
    if span is not None:
        _end(span, {CLOSE_CODE: code, CLOSE_REASON: reason, BYTES_TO_BACKEND: bytes_to_backend,
                    BYTES_TO_CLIENT: bytes_to_client},
             code not in _CLEAN_CLOSES, f"closed with {code}: {reason}")


def _end(span: Span, attributes: dict[str, str | int], error: bool, message: str | None) -> None:
    """Set ``attributes`` and, if ``error``, the ERROR status with ``message``; end ``span``."""
    from opentelemetry.trace import Status, StatusCode

    span.set_attributes(attributes)
    if error:
        span.set_status(Status(StatusCode.ERROR, message))
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
        span, self.span = self.span, None
        if span is not None:
            _end(span, {"rpc.grpc.status_code": status}, status in _SERVER_ERRORS, message)


#: The RPC whose handler runs in this task (grpclib runs each request in its own task).
_current_rpc: contextvars.ContextVar[_Rpc | None] = contextvars.ContextVar(
    "grpcbridge_current_rpc", default=None)


@functools.cache
def _metadata_getter() -> Getter[Any]:
    """A propagator getter for grpclib's metadata (a MultiDict; binary values skipped)."""
    from opentelemetry.propagators.textmap import Getter

    class MetadataGetter(Getter[Any]):
        def get(self, carrier: Any, key: str) -> list[str] | None:
            values = [value for value in carrier.getall(key, ()) if isinstance(value, str)]
            return values or None

        def keys(self, carrier: Any) -> list[str]:
            return list(carrier.keys())

    return MetadataGetter()


async def _on_request(event: Any) -> None:
    """grpclib ``RecvRequest``: open the RPC's span, current while the handler runs."""
    tracer = _tracer()
    if tracer is None:
        return
    from grpclib.exceptions import StreamTerminatedError
    from opentelemetry import context, trace
    from opentelemetry.trace import Link, SpanKind

    service, _, method = event.method_name.lstrip("/").rpartition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    tunnel = peer_extra_info(event.peer, TUNNEL_EXTRA)
    trusted = isinstance(tunnel, TunnelTrace) and tunnel.trust_context
    parent, links = _parent(event.metadata, _metadata_getter(), trusted)
    if isinstance(tunnel, TunnelTrace):
        attributes[REQUEST_ID] = tunnel.request_id
        if tunnel.span is not None and tunnel.span.get_span_context().is_valid:
            links.insert(0, Link(tunnel.span.get_span_context()))
    span = tracer.start_span(f"{service}/{method}", context=parent, kind=SpanKind.SERVER,
                             attributes=attributes, links=links)
    rpc = _Rpc(span)
    _current_rpc.set(rpc)  # this runs in the RPC's own task: set until the task ends
    handler = event.method_func
    current = trace.set_span_in_context(span, parent)  # with the trusted context's baggage

    async def traced(stream: Any) -> None:
        token = context.attach(current)
        try:
            await handler(stream)
        except (StreamTerminatedError, asyncio.CancelledError):
            rpc.cancelled = True
            raise
        finally:
            context.detach(token)

    event.method_func = traced
    task = asyncio.current_task()
    if task is not None:  # the handler ended without sending a status (connection lost)
        task.add_done_callback(lambda _task: rpc.end(_CANCELLED))


async def _on_trailers(event: Any) -> None:
    """grpclib ``SendTrailingMetadata``: the RPC's status is known; end its span."""
    rpc = _current_rpc.get()
    if rpc is not None:
        status = int(event.status.value)
        # A handler cancelled by its deadline sends DEADLINE_EXCEEDED: keep that. One the
        # client cancelled (or whose connection went) sends UNKNOWN: it was CANCELLED.
        if rpc.cancelled and status == _UNKNOWN:
            rpc.end(_CANCELLED)
        else:
            rpc.end(status, event.status_message)


#: grpclib servers whose RPCs get spans (their listeners are registered).
_traced: weakref.WeakSet[Any] = weakref.WeakSet()


def trace_rpcs(server: Any) -> None:
    """Give every RPC grpclib ``server`` handles from now on a span. Call it for every
    connection: it registers grpclib's event listeners only once a tracer provider is set,
    because with listeners each RPC costs several microseconds more even when there is
    nothing to record (nothing without opentelemetry)."""
    if server in _traced or _tracer() is None:
        return
    from grpclib.events import RecvRequest, SendTrailingMetadata, listen

    _traced.add(server)
    listen(server, RecvRequest, _on_request)
    listen(server, SendTrailingMetadata, _on_trailers)
