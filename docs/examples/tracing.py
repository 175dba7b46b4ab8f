"""OpenTelemetry spans from a bridge: one per tunnel, one per in-process RPC continuing the
caller's W3C trace context (pip install "grpcbridge[otel]" opentelemetry-sdk)."""

import asyncio

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import grpcbridge
from grpcbridge.demo import todo_pb2
from grpcbridge.demo.grpclib_service import TodoService
from grpcbridge.demo.store import TodoStore
from grpcbridge.demo.todo_grpc import TodoServiceStub

# The application configures the SDK; in production an exporter to your collector, e.g.
# BatchSpanProcessor(OTLPSpanExporter()) from opentelemetry-exporter-otlp, or no code at all
# under `opentelemetry-instrument`. This example keeps the spans in memory to print them.
spans = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(spans))
trace.set_tracer_provider(provider)

CALLER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"  # the caller's traceparent


async def main() -> None:
    store = TodoStore()
    backend = grpcbridge.GrpclibBackend([TodoService(store)])
    config = grpcbridge.BridgeConfig(backend=backend, listen="127.0.0.1:0")
    async with grpcbridge.Bridge(config) as bridge:
        # X-Request-Id on the upgrade names the tunnel in the bridge's logs and spans.
        async with grpcbridge.Channel(bridge.url, headers={"X-Request-Id": "docs-1"}) as channel:
            await TodoServiceStub(channel).CreateTodo(
                todo_pb2.CreateTodoRequest(text="traced"), metadata={"traceparent": CALLER})
    store.close()
    for span in spans.get_finished_spans():  # the bridge is closed: every span has ended
        attributes = dict(span.attributes or {})
        if span.name == "grpcbridge.tunnel":
            print("tunnel span:", attributes["grpcbridge.request_id"],
                  "closed with", attributes["grpcbridge.close_code"])
        else:
            print("rpc span:", span.name, "continues trace", f"{span.context.trace_id:032x}")
    provider.shutdown()


asyncio.run(main())
