"""``max_tunnel_age``: tunnels retired with a graceful HTTP/2 GOAWAY while RPCs go on.

Real parts only: in-process bridges with a relayed grpcio backend or an in-process grpclib
one (and BridgeApp under uvicorn), ``grpcbridge.Channel`` clients, and grpcio through
``grpcbridge serve`` and ``grpcbridge forward`` subprocesses. A bidirectional stream lives
across several tunnel ages while unary calls run without pause: no RPC fails, and the
clients opened a new tunnel after each GOAWAY. Past the grace, an RPC still open on a
retired tunnel fails with UNAVAILABLE naming the maximum age (close code 1001).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import re
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from test_asgi_config import serving

from grpcbridge import (
    Bridge,
    BridgeApp,
    BridgeConfig,
    Channel,
    ForwarderConfig,
    GrpclibBackend,
    ReconnectPolicy,
)
from grpcbridge.core.age import MAX_AGE_REASON
from grpcbridge.core.errors import ConfigError
from grpcbridge.demo import todo_pb2, todo_pb2_grpc
from grpcbridge.demo.grpclib_service import TodoService
from grpcbridge.demo.service import serve
from grpcbridge.demo.store import TodoStore
from grpcbridge.demo.todo_grpc import TodoServiceStub

from support import cli, eventually, sample, timing, wait_until

#: The tunnels' maximum age (jittered +/- 10 % per tunnel) and the grace of the long tests.
AGE = timing(0.4)
LONG_GRACE = timing(60.0)
#: Tunnels retired before a run counts as "across several ages".
AGES = 3
LIST = todo_pb2.ListTodosRequest()


@pytest.fixture
def store() -> Iterator[TodoStore]:
    store = TodoStore()
    yield store
    store.close()


@contextlib.contextmanager
def grpcio_backend(store: TodoStore) -> Iterator[str]:
    server, _servicer, port = serve("127.0.0.1:0", store)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait()


@contextlib.asynccontextmanager
async def asgi_bridge(config: BridgeConfig) -> AsyncIterator[Any]:
    """BridgeApp under uvicorn; what it yields has the ``url`` a Bridge has."""
    app = BridgeApp(config)
    async with serving(app) as url:
        app.url = url  # type: ignore[attr-defined]
        yield app


@contextlib.asynccontextmanager
async def bridge(kind: str, store: TodoStore, **options: Any) -> AsyncIterator[Any]:
    """A bridge whose backend is a relayed grpcio server or an in-process grpclib one, or
    (``asgi``) BridgeApp with an in-process grpclib one."""
    with contextlib.ExitStack() as stack:
        backend: Any = (stack.enter_context(grpcio_backend(store)) if kind == "grpcio"
                        else GrpclibBackend([TodoService(store)]))
        if kind == "asgi":
            async with asgi_bridge(BridgeConfig(backend=backend, **options)) as app:
                yield app
            return
        async with Bridge(BridgeConfig(backend=backend, listen="127.0.0.1:0",
                                       **options)) as server:
            yield server


def sync_create(text: str) -> todo_pb2.SyncRequest:
    return todo_pb2.SyncRequest(create=todo_pb2.CreateTodoRequest(text=text))


# ------------------------------------------------------------------ grpcbridge.Channel


@pytest.mark.parametrize("kind", ["grpcio", "grpclib", "asgi"])
async def test_channel_rpcs_survive_several_tunnel_ages(kind: str, store: TodoStore,
                                                         leak_check: None) -> None:
    async with bridge(kind, store, max_tunnel_age=AGE,
                      max_tunnel_age_grace=LONG_GRACE) as server:
        async with Channel(server.url) as channel:
            stub = TodoServiceStub(channel)
            stop = asyncio.Event()
            unary_calls = 0
            bidi_rounds = 0

            async def unary_forever() -> None:
                nonlocal unary_calls
                while not stop.is_set():
                    await stub.ListTodos(LIST, timeout=timing(30))
                    unary_calls += 1

            async def bidi() -> None:
                nonlocal bidi_rounds
                async with stub.SyncTodos.open(timeout=timing(60)) as stream:
                    while not stop.is_set():
                        text = f"bidi {bidi_rounds}"
                        await stream.send_message(sync_create(text))
                        while True:  # the change feed: wait for our own todo
                            reply = await stream.recv_message()
                            assert reply is not None
                            if reply.todo.text == text:
                                break
                        bidi_rounds += 1
                    await stream.end()

            tasks = [asyncio.create_task(unary_forever()), asyncio.create_task(bidi())]
            try:
                await eventually(
                    lambda: sample(server, "grpcbridge_tunnels_retired_total") >= AGES
                    or any(task.done() for task in tasks), timing(60))
                for task in tasks:
                    assert not task.done(), task.exception()  # an RPC failed
                rounds_then = bidi_rounds
                await eventually(lambda: bidi_rounds > rounds_then + 1
                                 or any(task.done() for task in tasks), timing(30))
            finally:
                stop.set()
                await asyncio.gather(*tasks)  # raises what failed, if anything did
            assert sample(server, "grpcbridge_tunnels_retired_total") >= AGES
            # One tunnel per age at least: the unary calls moved on after each GOAWAY,
            # while the stream stayed on the first tunnel.
            assert channel.connections_opened >= AGES + 1
            assert unary_calls > AGES and bidi_rounds > 1
        # Retired tunnels closed once their last RPC was done: nothing closed with 1001.
        await eventually(lambda: server.active_tunnels == 0, timing(10))
        assert sample(server, "grpcbridge_tunnels_closed_total", code="1001") == 0


async def test_rpc_open_past_the_grace_fails_unavailable_naming_the_age(
        store: TodoStore, leak_check: None) -> None:
    async with bridge("grpclib", store, max_tunnel_age=AGE,
                      max_tunnel_age_grace=timing(0.3)) as server:
        async with Channel(server.url) as channel:
            stub = TodoServiceStub(channel)
            with pytest.raises(GRPCError) as failed:
                async with stub.SyncTodos.open(timeout=timing(60)) as stream:
                    await stream.send_message(sync_create("waits"))
                    while True:  # the feed stays quiet after our todo: wait for the close
                        await stream.recv_message()
            assert failed.value.status is Status.UNAVAILABLE
            message = failed.value.message or ""
            assert "1001" in message and MAX_AGE_REASON in message, message
            # The next RPC takes a new tunnel.
            await stub.ListTodos(LIST, timeout=timing(30))
            assert channel.connections_opened == 2
        assert sample(server, "grpcbridge_tunnels_retired_total") >= 1
        assert sample(server, "grpcbridge_tunnels_closed_total", code="1001") >= 1


async def test_without_a_maximum_age_tunnels_are_not_retired(store: TodoStore) -> None:
    async with bridge("grpclib", store) as server, Channel(server.url) as channel:
        stub = TodoServiceStub(channel)
        for _ in range(3):
            await stub.ListTodos(LIST, timeout=timing(30))
        assert channel.connections_opened == 1
        assert server.config.max_tunnel_age is None
        assert sample(server, "grpcbridge_tunnels_retired_total") == 0


def test_config_refuses_negative_ages() -> None:
    for options in ({"max_tunnel_age": -1.0}, {"max_tunnel_age_grace": -1.0},
                    {"max_tunnel_age": "10"}):
        with pytest.raises(ConfigError, match="max_tunnel_age"):
            BridgeConfig(backend="127.0.0.1:50051", **options)
    assert BridgeConfig(backend="127.0.0.1:50051", max_tunnel_age=0).max_tunnel_age == 0


_FLOAT_OPTIONS = [
    *((BridgeConfig, {"backend": "127.0.0.1:50051"}, name) for name in (
        "max_tunnel_age", "max_tunnel_age_grace", "backend_connect_timeout",
        "handshake_timeout", "ping_interval", "idle_timeout", "drain_timeout")),
    *((ReconnectPolicy, {}, name) for name in (
        "initial_delay", "max_delay", "min_connect_timeout", "multiplier")),
    *((ForwarderConfig, {"target": "ws://127.0.0.1:8080/grpc", "proxy": None}, name)
      for name in ("handshake_timeout", "ping_interval", "idle_timeout")),
]


@pytest.mark.parametrize(("cls", "required", "name"), _FLOAT_OPTIONS,
                         ids=[f"{cls.__name__}.{name}" for cls, _, name in _FLOAT_OPTIONS])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_config_refuses_non_finite_seconds(cls: Any, required: dict[str, Any], name: str,
                                           value: float) -> None:
    # NaN passes every comparison-based check (nan < 0 is False): a bridge with
    # max_tunnel_age=nan would tick without end and never retire a tunnel.
    with pytest.raises(ConfigError) as error:
        cls(**required, **{name: value})
    message = str(error.value)
    assert message.startswith(name) and str(value) in message, message
    assert "finite" in message, message
    cls(**required)  # the other options are fine: only the non-finite value is refused


# ------------------------------------------------------- grpcio through forward + serve


def test_grpcio_through_the_forwarder_survives_several_tunnel_ages(
        store: TodoStore, leak_check: None) -> None:
    with grpcio_backend(store) as backend, \
            cli(["serve", "--listen", "127.0.0.1:0", "--backend", backend,
                 "--max-tunnel-age", str(AGE), "--max-tunnel-age-grace",
                 str(LONG_GRACE)]) as serving, \
            cli(["forward", "--listen", "127.0.0.1:0", "--target", serving.url]) as forward, \
            grpc.insecure_channel(f"127.0.0.1:{forward.port}") as channel:
        stub = todo_pb2_grpc.TodoServiceStub(channel)
        stop = threading.Event()
        failures: list[BaseException] = []
        counts = {"unary": 0, "bidi": 0}

        def unary_forever() -> None:
            try:
                while not stop.is_set():
                    stub.ListTodos(LIST, timeout=timing(30))
                    counts["unary"] += 1
            except BaseException as exc:
                failures.append(exc)

        def bidi() -> None:
            requests: queue.SimpleQueue[todo_pb2.SyncRequest | None] = queue.SimpleQueue()
            try:
                replies = stub.SyncTodos(iter(requests.get, None), timeout=timing(60))
                while not stop.is_set():
                    text = f"bidi {counts['bidi']}"
                    requests.put(sync_create(text))
                    while next(replies).todo.text != text:
                        pass
                    counts["bidi"] += 1
                requests.put(None)
                for _ in replies:
                    pass
            except BaseException as exc:
                failures.append(exc)

        def retired() -> int:
            return sum(1 for line in list(serving.lines)
                       if re.search(r"\btunnel_retiring\b", line))

        threads = [threading.Thread(target=unary_forever), threading.Thread(target=bidi)]
        for thread in threads:
            thread.start()
        try:
            wait_until(lambda: retired() >= AGES or failures, timing(60),
                       message=lambda: serving.output())
            rounds_then = counts["bidi"]
            wait_until(lambda: counts["bidi"] > rounds_then + 1 or failures, timing(30))
        finally:
            stop.set()
            for thread in threads:
                thread.join(timing(60))
        assert not failures, failures
        assert counts["unary"] > AGES and counts["bidi"] > 1
        # grpcio opened a new connection (so the forwarder a new tunnel) after each GOAWAY.
        opened = sum(1 for line in list(serving.lines)
                     if re.search(r"\btunnel_opened\b", line))
        assert opened >= AGES + 1, serving.output()
