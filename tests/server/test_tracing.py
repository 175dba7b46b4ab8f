"""OpenTelemetry spans (grpcbridge.tracing) with the real SDK: a tunnel span per tunnel on
both engines and under BridgeApp, an RPC span per in-process grpclib call continuing the
caller's ``traceparent`` when it is trusted (a trusted proxy's, or with
``trust_trace_context``) and linking it otherwise, and nothing breaking without a provider or
without opentelemetry. Bridges that should believe the test's headers trust 127.0.0.1 as a
proxy, as a bridge behind nginx does.

Each test installs its own SDK ``TracerProvider`` with an in-memory exporter and puts the
previous global provider back afterwards (OpenTelemetry allows setting it once per process,
so the fixture resets that guard as OpenTelemetry's own test helpers do)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import websockets.asyncio.client
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from opentelemetry import baggage, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util._once import Once
from todo_oracle import serve
from websockets.exceptions import ConnectionClosed

import grpcbridge
from grpcbridge import Bridge, BridgeConfig, GrpclibBackend
from grpcbridge.demo import todo_grpc, todo_pb2
from grpcbridge.demo.grpclib_service import TodoService
from grpcbridge.demo.store import TodoStore

from support import BEHIND_PROXY, RawBackend, eventually, free_port, timing

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
CALL_TIMEOUT = timing(20.0)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """An SDK tracer provider installed globally for the test, its spans kept in memory."""
    with installed_provider() as exporter:
        yield exporter


@contextlib.contextmanager
def installed_provider(**settings: Any) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(**settings)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    saved = trace._TRACER_PROVIDER, trace._TRACER_PROVIDER_SET_ONCE
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        trace._TRACER_PROVIDER, trace._TRACER_PROVIDER_SET_ONCE = saved
        provider.shutdown()


async def finished(exporter: InMemorySpanExporter, name: str, count: int = 1
                   ) -> list[ReadableSpan]:
    """Wait until ``count`` spans called ``name`` have ended; return them."""
    def named() -> list[ReadableSpan]:
        return [span for span in exporter.get_finished_spans() if span.name == name]

    await eventually(lambda: len(named()) >= count, timing(10),
                     message=lambda: f"spans so far: {exporter.get_finished_spans()}")
    found = named()
    assert len(found) == count, found
    return found


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def ws_connect(url: str, **kwargs: Any) -> websockets.asyncio.client.connect:
    kwargs.setdefault("open_timeout", timing(5))
    kwargs.setdefault("close_timeout", timing(2))
    return websockets.asyncio.client.connect(url, ping_interval=None, **kwargs)


@contextlib.asynccontextmanager
async def grpclib_bridge(service: Any, **settings: Any) -> AsyncIterator[Bridge]:
    config = BridgeConfig(backend=GrpclibBackend([service]), listen="127.0.0.1:0",
                          drain_timeout=0, **settings)
    async with Bridge(config) as bridge:
        yield bridge


# ------------------------------------------------------------------------ tunnel spans


@pytest.mark.parametrize("compression", [False, True], ids=["picows", "websockets"])
async def test_tunnel_span_has_the_bytes_each_way_and_the_close(
        spans: InMemorySpanExporter, backend: RawBackend, compression: bool,
        leak_check: None) -> None:
    sent = [b"\x00" * 1000, bytes(range(256)) * 7, b"x"]
    reply = b"from the backend" * 300
    config = BridgeConfig(backend=f"127.0.0.1:{backend.port}", listen="127.0.0.1:0",
                          drain_timeout=0, compression=compression, **BEHIND_PROXY)
    async with Bridge(config) as bridge:
        async with ws_connect(bridge.url, subprotocols=["grpcbridge"],  # type: ignore[list-item]
                              compression="deflate" if compression else None,
                              additional_headers={"X-Request-Id": "req-42",
                                                  "traceparent": TRACEPARENT}) as ws:
            assert ws.response.headers["X-Request-Id"] == "req-42"
            for message in sent:
                await ws.send(message)
            total = sum(map(len, sent))
            await eventually(lambda: len(backend.received) == total)
            backend.writers[0].write(reply)
            received = bytearray()
            async with asyncio.timeout(timing(5)):
                while len(received) < len(reply):
                    received += await ws.recv()  # type: ignore[operator]
        (span,) = await finished(spans, "grpcbridge.tunnel")
    values = attributes(span)
    assert values["grpcbridge.bytes_to_backend"] == total == len(backend.received)
    assert values["grpcbridge.bytes_to_client"] == len(reply) == len(received)
    assert values["grpcbridge.close_code"] == 1000
    assert values["grpcbridge.request_id"] == "req-42"
    assert values["grpcbridge.subprotocol"] == "grpcbridge"
    assert values["client.address"] == values["network.peer.address"] == "127.0.0.1"
    assert values["url.path"] == "/grpc"
    assert values["network.protocol.name"] == "websocket"
    assert span.kind is SpanKind.SERVER
    assert span.status.status_code is StatusCode.UNSET
    # The (trusted) upgrade's traceparent is the tunnel span's parent.
    assert span.parent is not None and span.parent.is_remote
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert f"{span.parent.span_id:016x}" == PARENT_ID
    assert span.end_time is not None and span.start_time is not None
    assert span.end_time > span.start_time


async def test_tunnel_span_is_an_error_when_the_backend_is_down(
        spans: InMemorySpanExporter, leak_check: None) -> None:
    port = free_port()  # nothing listens there
    config = BridgeConfig(backend=f"127.0.0.1:{port}", listen="127.0.0.1:0", drain_timeout=0)
    async with Bridge(config) as bridge, ws_connect(bridge.url) as ws:
        with contextlib.suppress(ConnectionClosed):
            async with asyncio.timeout(timing(5)):
                await ws.recv()
        assert ws.close_code == 1011
        (span,) = await finished(spans, "grpcbridge.tunnel")
    values = attributes(span)
    assert values["grpcbridge.close_code"] == 1011
    assert values["grpcbridge.close_reason"] == "backend unavailable"
    assert values["grpcbridge.bytes_to_backend"] == values["grpcbridge.bytes_to_client"] == 0
    assert span.status.status_code is StatusCode.ERROR
    assert "1011" in (span.status.description or "")
    assert span.parent is None  # no traceparent on the upgrade: a root span


async def test_tunnel_span_relaying_to_a_grpcio_server(
        spans: InMemorySpanExporter, leak_check: None) -> None:
    server, servicer, port = serve("127.0.0.1:0")
    try:
        config = BridgeConfig(backend=f"127.0.0.1:{port}", listen="127.0.0.1:0",
                              drain_timeout=0, **BEHIND_PROXY)
        async with Bridge(config) as bridge:
            async with grpcbridge.Channel(bridge.url, headers={"X-Request-Id": "relay-1"}
                                          ) as channel:
                stub = todo_grpc.TodoServiceStub(channel)
                await stub.CreateTodo(todo_pb2.CreateTodoRequest(text="traced"),
                                      timeout=CALL_TIMEOUT)
            (span,) = await finished(spans, "grpcbridge.tunnel")
            relayed_up = bridge.metrics.registry.get_sample_value(
                "grpcbridge_bytes_total", {"direction": "client_to_backend"})
            relayed_down = bridge.metrics.registry.get_sample_value(
                "grpcbridge_bytes_total", {"direction": "backend_to_client"})
    finally:
        server.stop(grace=None).wait()
        servicer.store.close()
    values = attributes(span)
    assert values["grpcbridge.request_id"] == "relay-1"
    assert values["grpcbridge.backend"] == f"127.0.0.1:{port}"
    # A whole HTTP/2 connection went each way: preface, settings, the call, GOAWAY...
    assert values["grpcbridge.bytes_to_backend"] == relayed_up and relayed_up > 24
    assert values["grpcbridge.bytes_to_client"] == relayed_down and relayed_down > 0
    assert values["grpcbridge.close_code"] in (1000, 1001)
    assert span.status.status_code is StatusCode.UNSET
    # A socket backend makes no RPC spans: only the tunnel's.
    assert [s.name for s in spans.get_finished_spans()] == ["grpcbridge.tunnel"]


# --------------------------------------------------------------------------- RPC spans


class _TracedTodos(TodoService):
    """The demo service, whose ListTodos makes a span of its own and notes the ``tenant``
    baggage it sees."""

    def __init__(self, store: TodoStore) -> None:
        super().__init__(store)
        self.tenants: list[object] = []

    async def ListTodos(self, stream: Any) -> None:
        self.tenants.append(baggage.get_baggage("tenant"))
        with trace.get_tracer("test").start_as_current_span("handler work"):
            await super().ListTodos(stream)


async def test_rpc_spans_continue_the_callers_trace_and_link_the_tunnel(
        spans: InMemorySpanExporter, leak_check: None) -> None:
    store = TodoStore()
    service = _TracedTodos(store)
    try:
        async with grpclib_bridge(service, trust_trace_context=True,
                                  **BEHIND_PROXY) as bridge:
            async with grpcbridge.Channel(bridge.url, headers={"X-Request-Id": "rpc-7"}
                                          ) as channel:
                stub = todo_grpc.TodoServiceStub(channel)
                await stub.ListTodos(todo_pb2.ListTodosRequest(), timeout=CALL_TIMEOUT,
                                     metadata={"traceparent": TRACEPARENT,
                                               "tracestate": "vendor=1",
                                               "baggage": "tenant=acme"})
                with pytest.raises(GRPCError) as error:
                    await stub.DeleteTodo(todo_pb2.DeleteTodoRequest(id="missing"),
                                          timeout=CALL_TIMEOUT)
                assert error.value.status is Status.NOT_FOUND
            (tunnel,) = await finished(spans, "grpcbridge.tunnel")
    finally:
        store.close()
    (listed,) = await finished(spans, "todo.v1.TodoService/ListTodos")
    (deleted,) = await finished(spans, "todo.v1.TodoService/DeleteTodo")
    (work,) = await finished(spans, "handler work")

    values = attributes(listed)
    assert values == {"rpc.system": "grpc", "rpc.service": "todo.v1.TodoService",
                      "rpc.method": "ListTodos", "rpc.grpc.status_code": 0,
                      "grpcbridge.request_id": "rpc-7"}
    assert listed.kind is SpanKind.SERVER
    assert listed.status.status_code is StatusCode.UNSET
    # The caller's W3C context: same trace, the caller's span as parent, its tracestate.
    assert listed.parent is not None and listed.parent.is_remote
    assert f"{listed.context.trace_id:032x}" == TRACE_ID
    assert f"{listed.parent.span_id:016x}" == PARENT_ID
    assert listed.context.trace_state.get("vendor") == "1"
    # Linked to its tunnel's span, and current while the handler ran.
    assert [link.context.span_id for link in listed.links] == [tunnel.context.span_id]
    assert work.parent is not None and work.parent.span_id == listed.context.span_id
    assert service.tenants == ["acme"]  # the caller's baggage too

    # No traceparent: a new trace (not a child of whatever was current), still linked.
    assert attributes(deleted)["rpc.grpc.status_code"] == Status.NOT_FOUND.value
    assert deleted.status.status_code is StatusCode.UNSET  # NOT_FOUND is the client's
    assert deleted.parent is None
    assert deleted.context.trace_id != listed.context.trace_id
    assert [link.context.span_id for link in deleted.links] == [tunnel.context.span_id]
    assert attributes(tunnel)["grpcbridge.request_id"] == "rpc-7"


class _Failing(TodoService):
    async def ListTodos(self, stream: Any) -> None:
        raise RuntimeError("handler bug")


async def rpc_span(exporter: InMemorySpanExporter, service: TodoService, method: str,
                   call: Callable[[todo_grpc.TodoServiceStub], Awaitable[object]]
                   ) -> ReadableSpan:
    """Make ``call`` on a bridge serving ``service``; the span of its ``method``."""
    try:
        async with grpclib_bridge(service) as bridge, \
                grpcbridge.Channel(bridge.url) as channel:
            await call(todo_grpc.TodoServiceStub(channel))
            (span,) = await finished(exporter, f"todo.v1.TodoService/{method}")
    finally:
        service.store.close()
    return span


async def test_rpc_span_of_a_failing_handler_is_an_error(
        spans: InMemorySpanExporter, leak_check: None) -> None:
    async def call(stub: todo_grpc.TodoServiceStub) -> None:
        with pytest.raises(GRPCError) as error:
            await stub.ListTodos(todo_pb2.ListTodosRequest(), timeout=CALL_TIMEOUT)
        assert error.value.status is Status.UNKNOWN

    span = await rpc_span(spans, _Failing(TodoStore()), "ListTodos", call)
    assert attributes(span)["rpc.grpc.status_code"] == Status.UNKNOWN.value
    assert span.status.status_code is StatusCode.ERROR


async def test_rpc_span_ends_when_the_client_cancels(
        spans: InMemorySpanExporter, leak_check: None) -> None:
    async def call(stub: todo_grpc.TodoServiceStub) -> None:
        async with stub.StreamTodos.open(timeout=CALL_TIMEOUT) as stream:
            await stream.send_message(
                todo_pb2.StreamTodosRequest(repeat=1_000_000, interval_ms=50), end=True)
            assert await stream.recv_message() is not None
            await stream.cancel()

    store = TodoStore()
    store.create("one")
    span = await rpc_span(spans, TodoService(store), "StreamTodos", call)
    assert attributes(span)["rpc.grpc.status_code"] == Status.CANCELLED.value
    assert span.status.status_code is StatusCode.UNSET


class _Slow(TodoService):
    async def ListTodos(self, stream: Any) -> None:
        await asyncio.sleep(timing(60))  # cancelled by grpclib at the call's deadline


async def test_rpc_span_of_a_handler_past_its_deadline_is_deadline_exceeded(
        spans: InMemorySpanExporter, leak_check: None) -> None:
    store = TodoStore()
    try:
        async with grpclib_bridge(_Slow(store)) as bridge, \
                grpcbridge.Channel(bridge.url) as channel:
            with contextlib.suppress(GRPCError, TimeoutError):
                async with todo_grpc.TodoServiceStub(channel).ListTodos.open(
                        timeout=timing(0.5)) as stream:
                    await stream.send_message(todo_pb2.ListTodosRequest(), end=True)
                    # Not reading: the client does not reset the call at its own deadline,
                    # so the server's deadline ends it (grpclib cancels the handler).
                    (span,) = await finished(spans, "todo.v1.TodoService/ListTodos")
    finally:
        store.close()
    assert attributes(span)["rpc.grpc.status_code"] == Status.DEADLINE_EXCEEDED.value
    assert span.status.status_code is StatusCode.ERROR


# ---------------------------------------------------------------- whose trace context


def _remote_link(span: ReadableSpan) -> list[tuple[str, str]]:
    return [(f"{link.context.trace_id:032x}", f"{link.context.span_id:016x}")
            for link in span.links if link.context.is_remote]


async def _traced_call(exporter: InMemorySpanExporter, service: _TracedTodos, **settings: Any
                       ) -> tuple[ReadableSpan, ReadableSpan, ReadableSpan]:
    """A ListTodos through a bridge with ``settings``, the upgrade and the call carrying
    the test's traceparent and ``tenant`` baggage; the tunnel, RPC and handler spans."""
    context = {"traceparent": TRACEPARENT, "baggage": "tenant=acme"}
    async with grpclib_bridge(service, **settings) as bridge:
        async with grpcbridge.Channel(bridge.url, headers=context) as channel:
            await todo_grpc.TodoServiceStub(channel).ListTodos(
                todo_pb2.ListTodosRequest(), timeout=CALL_TIMEOUT, metadata=context)
        (tunnel,) = await finished(exporter, "grpcbridge.tunnel")
    (rpc,) = await finished(exporter, "todo.v1.TodoService/ListTodos")
    (work,) = await finished(exporter, "handler work")
    return tunnel, rpc, work


async def test_a_direct_clients_trace_context_is_linked_not_continued(
        spans: InMemorySpanExporter, leak_check: None) -> None:
    store = TodoStore()
    service = _TracedTodos(store)
    try:
        tunnel, rpc, work = await _traced_call(spans, service)
    finally:
        store.close()
    # New traces (the client chose neither the trace id nor the sampling), linked to the
    # client's span; the RPC also to its tunnel; no baggage from the client.
    for span in (tunnel, rpc):
        assert span.parent is None
        assert f"{span.context.trace_id:032x}" != TRACE_ID
        assert _remote_link(span) == [(TRACE_ID, PARENT_ID)]
    assert rpc.context.trace_id != tunnel.context.trace_id
    assert tunnel.context.span_id in [link.context.span_id for link in rpc.links]
    assert work.parent is not None and work.parent.span_id == rpc.context.span_id
    assert service.tenants == [None]


@pytest.mark.parametrize("settings", [{"trust_trace_context": True}, BEHIND_PROXY],
                         ids=["trust_trace_context", "trusted_proxy"])
async def test_a_trusted_trace_context_is_continued(
        spans: InMemorySpanExporter, settings: dict[str, Any],
        leak_check: None) -> None:
    """trust_trace_context: every client's context, upgrade and calls. A trusted proxy
    vouches for the upgrade request it forwards only: the calls' metadata inside the tunnel
    is still the client's own, so the RPC span starts a trace of its own, linked."""
    store = TodoStore()
    service = _TracedTodos(store)
    try:
        tunnel, rpc, _work = await _traced_call(spans, service, **settings)
    finally:
        store.close()
    rpc_trusted = settings.get("trust_trace_context", False)
    for span, trusted in ((tunnel, True), (rpc, rpc_trusted)):
        if trusted:
            assert span.parent is not None and span.parent.is_remote
            assert f"{span.context.trace_id:032x}" == TRACE_ID
            assert f"{span.parent.span_id:016x}" == PARENT_ID
            assert _remote_link(span) == []
        else:
            assert span.parent is None
            assert f"{span.context.trace_id:032x}" != TRACE_ID
            assert _remote_link(span) == [(TRACE_ID, PARENT_ID)]
    assert service.tenants == (["acme"] if rpc_trusted else [None])


@pytest.mark.parametrize("trusted", [False, True], ids=["direct", "trusted"])
async def test_only_a_trusted_client_decides_sampling(trusted: bool, leak_check: None) -> None:
    # The application samples nothing of its own; the client's traceparent says "sampled".
    with installed_provider(sampler=ParentBased(ALWAYS_OFF)) as exporter:
        config = BridgeConfig(backend="127.0.0.1:1", listen="127.0.0.1:0", drain_timeout=0,
                              trust_trace_context=trusted)
        async with Bridge(config) as bridge:
            async with ws_connect(bridge.url,
                                  additional_headers={"traceparent": TRACEPARENT}) as ws:
                with contextlib.suppress(ConnectionClosed):
                    async with asyncio.timeout(timing(5)):
                        await ws.recv()
                assert ws.close_code == 1011  # nothing listens on port 1
            if trusted:
                await finished(exporter, "grpcbridge.tunnel")
        assert len(exporter.get_finished_spans()) == int(trusted)


async def test_asgi_app_gets_tunnel_and_rpc_spans(
        spans: InMemorySpanExporter, leak_check: None) -> None:
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from test_matrix import _stop_uvicorn, start_uvicorn

    store = TodoStore()
    app = grpcbridge.BridgeApp(BridgeConfig(backend=GrpclibBackend([TodoService(store)]),
                                            trust_trace_context=True, **BEHIND_PROXY))
    server, task, port = await start_uvicorn(Starlette(routes=[WebSocketRoute("/grpc", app)]))
    try:
        url = f"ws://127.0.0.1:{port}/grpc"
        async with ws_connect(url, additional_headers={"X-Request-Id": "asgi-1"}) as ws:
            assert ws.response.headers["X-Request-Id"] == "asgi-1"
        async with grpcbridge.Channel(url, headers={"X-Request-Id": "asgi-2"}) as channel:
            await todo_grpc.TodoServiceStub(channel).CreateTodo(
                todo_pb2.CreateTodoRequest(text="via asgi"), timeout=CALL_TIMEOUT,
                metadata={"traceparent": TRACEPARENT})
        tunnels = await finished(spans, "grpcbridge.tunnel", 2)
        (rpc,) = await finished(spans, "todo.v1.TodoService/CreateTodo")
    finally:
        await app.close()
        await _stop_uvicorn(server, task)
        store.close()
    by_id = {attributes(span)["grpcbridge.request_id"]: span for span in tunnels}
    assert set(by_id) == {"asgi-1", "asgi-2"}
    assert attributes(by_id["asgi-1"])["grpcbridge.bytes_to_backend"] == 0
    assert attributes(by_id["asgi-2"])["grpcbridge.bytes_to_backend"] > 24
    assert attributes(rpc)["grpcbridge.request_id"] == "asgi-2"
    assert f"{rpc.context.trace_id:032x}" == TRACE_ID
    assert [link.context.span_id for link in rpc.links] == [by_id["asgi-2"].context.span_id]


# ----------------------------------------------------------- without provider / without otel


async def test_without_a_tracer_provider_calls_work_and_a_later_one_is_used(
        leak_check: None) -> None:
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    store = TodoStore()

    async def create(url: str, text: str) -> None:
        async with grpcbridge.Channel(url) as channel:
            created = await todo_grpc.TodoServiceStub(channel).CreateTodo(
                todo_pb2.CreateTodoRequest(text=text), timeout=CALL_TIMEOUT,
                metadata={"traceparent": TRACEPARENT})
            assert created.text == text

    try:
        async with grpclib_bridge(TodoService(store)) as bridge:
            await create(bridge.url, "untraced")
            # A provider configured after the bridge started is used from then on.
            with installed_provider() as exporter:
                await create(bridge.url, "traced")
                await finished(exporter, "todo.v1.TodoService/CreateTodo")
                await finished(exporter, "grpcbridge.tunnel")
    finally:
        store.close()


_WITHOUT_OTEL = textwrap.dedent("""
    import asyncio, sys
    sys.modules["opentelemetry"] = None  # as if grpcbridge[otel] was not installed
    import websockets.asyncio.client
    import grpcbridge
    from grpcbridge import tracing
    from grpcbridge.demo import todo_grpc, todo_pb2
    from grpcbridge.demo.grpclib_service import TodoService
    from grpcbridge.demo.store import TodoStore

    async def main():
        store = TodoStore()
        config = grpcbridge.BridgeConfig(backend=grpcbridge.GrpclibBackend([TodoService(store)]),
                                         listen="127.0.0.1:0", drain_timeout=0,
                                         trusted_proxies=["127.0.0.1/32"])
        async with grpcbridge.Bridge(config) as bridge:
            async with grpcbridge.Channel(bridge.url) as channel:
                todo = await todo_grpc.TodoServiceStub(channel).CreateTodo(
                    todo_pb2.CreateTodoRequest(text="plain"), timeout=20,
                    metadata={"traceparent": "TRACEPARENT"})
            async with websockets.asyncio.client.connect(
                    bridge.url, additional_headers={"X-Request-Id": "no-otel"}) as ws:
                echoed = ws.response.headers["X-Request-Id"]
        store.close()
        loaded = sorted(name for name, module in sys.modules.items()
                        if name.startswith("opentelemetry") and module is not None)
        print(todo.text, echoed, tracing.available(), loaded)

    asyncio.run(main())
""").replace("TRACEPARENT", TRACEPARENT)


def test_without_opentelemetry_nothing_is_imported_and_tunnels_work(leak_check: None) -> None:
    result = subprocess.run([sys.executable, "-c", _WITHOUT_OTEL], capture_output=True,
                            text=True, timeout=timing(60), check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "plain no-otel False []", result.stdout


async def test_context_without_a_traceparent_is_extracted_too(
        spans: InMemorySpanExporter, leak_check: None) -> None:
    # The configured propagators read the context, whatever headers they use (B3's, or
    # baggage alone): the bridge does not look for a traceparent first.
    store = TodoStore()
    service = _TracedTodos(store)
    try:
        async with grpclib_bridge(service, trust_trace_context=True) as bridge, \
                grpcbridge.Channel(bridge.url) as channel:
            await todo_grpc.TodoServiceStub(channel).ListTodos(
                todo_pb2.ListTodosRequest(), timeout=CALL_TIMEOUT,
                metadata={"baggage": "tenant=acme"})
            (rpc,) = await finished(spans, "todo.v1.TodoService/ListTodos")
    finally:
        store.close()
    assert service.tenants == ["acme"]
    assert rpc.parent is None
