"""betterproto2 stubs over ``grpcbridge.Channel``: every RPC kind, metadata, errors and
cancellation against the grpclib Todo service (the test oracle's, tests/todo_oracle.py) served
in process by a real bridge.

The stubs are generated from ``grpcbridge/demo/todo.proto`` when the module starts (protoc
plus the ``protoc-gen-python_betterproto2`` plugin take well under a second), so the test also
proves that the *installed* compiler's output works, not a copy committed long ago. The
server side uses the google-protobuf messages of ``grpcbridge.demo``: only the wire is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from grpclib.const import Status
from grpclib.events import RecvInitialMetadata, RecvTrailingMetadata, listen
from grpclib.exceptions import GRPCError
from todo_oracle import OracleService

import grpcbridge
import grpcbridge.demo
from grpcbridge.demo.store import TodoStore

from support import eventually

pytest.importorskip("betterproto2.grpclib", reason="betterproto2[grpclib] is not installed")
pytest.importorskip("betterproto2_compiler", reason="betterproto2-compiler is not installed")

#: The top-level package the generated code is written as (it imports ``...message_pool``).
PACKAGE = "grpcbridge_betterproto2_todo"
PROTO = Path(grpcbridge.demo.__file__).resolve().parent / "todo.proto"


#: Where this interpreter's scripts are (a venv's bin/): the plugin, and the ``ruff`` it runs
#: by name on its output, are looked up there first.
PATH = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", os.defpath)])


def _plugin() -> str:
    name = "protoc-gen-python_betterproto2"
    found = shutil.which(name, path=PATH)
    assert found, f"{name} not found, although betterproto2_compiler is importable"
    return found


@pytest.fixture(scope="module")
def pb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The generated ``todo.v1`` module (async grpclib client stubs)."""
    root = tmp_path_factory.mktemp("betterproto2")
    out = root / PACKAGE
    out.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO.parent}",
         f"--plugin=protoc-gen-python_betterproto2={_plugin()}",
         f"--python_betterproto2_out={out}",
         "--python_betterproto2_opt=client_generation=async", str(PROTO)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PATH": PATH})
    assert result.returncode == 0, f"protoc failed:\n{result.stdout}\n{result.stderr}"
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module(f"{PACKAGE}.todo.v1")
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


@pytest.fixture
def service() -> Iterator[OracleService]:
    store = TodoStore()
    store.create("first")
    store.create("second")
    yield OracleService(store)
    store.close()


@pytest.fixture
async def channel(service: OracleService, leak_check: None) -> AsyncIterator[grpcbridge.Channel]:
    """A ``grpcbridge.Channel`` to an in-process bridge serving ``service``."""
    config = grpcbridge.BridgeConfig(backend=grpcbridge.GrpclibBackend([service]),
                                     listen="127.0.0.1:0")
    async with grpcbridge.Bridge(config) as bridge, grpcbridge.Channel(bridge.url) as channel:
        yield channel


class Recorded:
    """Response metadata of the channel's RPCs, from grpclib's channel events (betterproto2
    stubs return messages only)."""

    def __init__(self, channel: grpcbridge.Channel) -> None:
        self.initial: list[tuple[str, Any]] = []
        self.trailing: list[tuple[str, Any]] = []
        self.statuses: list[Status] = []
        listen(channel, RecvInitialMetadata, self._on_initial)
        listen(channel, RecvTrailingMetadata, self._on_trailing)

    async def _on_initial(self, event: RecvInitialMetadata) -> None:
        self.initial.extend(event.metadata.items())

    async def _on_trailing(self, event: RecvTrailingMetadata) -> None:
        self.trailing.extend(event.metadata.items())
        self.statuses.append(event.status)


async def test_unary_rpcs(pb: Any, channel: grpcbridge.Channel) -> None:
    stub = pb.TodoServiceStub(channel)

    listed = await stub.list_todos()  # an empty request message may be omitted
    assert isinstance(listed, pb.ListTodosResponse)
    assert [todo.text for todo in listed.todos] == ["first", "second"]

    created = await stub.create_todo(pb.CreateTodoRequest(text="milk"), timeout=5)
    assert isinstance(created, pb.Todo)
    assert created.text == "milk" and not created.done and len(created.id) == 32

    updated = await stub.update_todo(pb.UpdateTodoRequest(id=created.id, text="oat milk",
                                                          done=True))
    assert (updated.id, updated.text, updated.done) == (created.id, "oat milk", True)

    assert isinstance(await stub.delete_todo(pb.DeleteTodoRequest(id=created.id)),
                      pb.DeleteTodoResponse)
    assert [todo.text for todo in (await stub.list_todos(pb.ListTodosRequest())).todos] == [
        "first", "second"]


async def test_server_streaming(pb: Any, channel: grpcbridge.Channel) -> None:
    stub = pb.TodoServiceStub(channel)
    texts = [todo.text async for todo in stub.stream_todos(pb.StreamTodosRequest(repeat=3))]
    assert texts == ["first", "second"] * 3


async def test_client_streaming(pb: Any, channel: grpcbridge.Channel) -> None:
    stub = pb.TodoServiceStub(channel)
    # A plain iterable...
    reply = await stub.bulk_create_todos([pb.CreateTodoRequest(text=t) for t in ("a", "b")])
    assert isinstance(reply, pb.BulkCreateTodosResponse)
    assert reply.created_count == 2

    # ...or an async generator.
    async def requests() -> AsyncIterator[Any]:
        for text in ("c", "d", "e"):
            await asyncio.sleep(0)
            yield pb.CreateTodoRequest(text=text)

    assert (await stub.bulk_create_todos(requests())).created_count == 3
    listed = await stub.list_todos()
    assert [todo.text for todo in listed.todos] == ["first", "second", "a", "b", "c", "d", "e"]


async def test_bidi_streaming_is_interactive(pb: Any, channel: grpcbridge.Channel) -> None:
    """SyncTodos: each request is sent only after the reply to the one before arrived."""
    stub = pb.TodoServiceStub(channel)
    replies: asyncio.Queue[Any] = asyncio.Queue()
    ids: list[str] = []

    async def requests() -> AsyncIterator[Any]:
        yield pb.SyncRequest(create=pb.CreateTodoRequest(text="bread"))
        created = (await replies.get()).todo
        ids.append(created.id)
        yield pb.SyncRequest(update=pb.UpdateTodoRequest(id=created.id, text="rye", done=True))
        await replies.get()
        yield pb.SyncRequest(delete=pb.DeleteTodoRequest(id=created.id))
        await replies.get()
        yield pb.SyncRequest(delete=pb.DeleteTodoRequest(id="nope"))

    events: list[tuple[str, Any]] = []
    async with asyncio.timeout(10):
        async for reply in stub.sync_todos(requests()):
            assert isinstance(reply, pb.SyncResponse)
            if reply.todo is not None:
                events.append(("todo", (reply.todo.text, reply.todo.done)))
            elif reply.deleted_id is not None:
                events.append(("deleted", reply.deleted_id))
            else:
                events.append(("error", reply.error))
            await replies.put(reply)
    assert events == [
        ("todo", ("bread", False)),
        ("todo", ("rye", True)),
        ("deleted", ids[0]),
        ("error", "todo 'nope' not found"),
    ]


async def test_error_status_and_metadata(pb: Any, channel: grpcbridge.Channel) -> None:
    stub = pb.TodoServiceStub(channel)
    recorded = Recorded(channel)

    # Request metadata reaches the service (it echoes x-echo-* as initial metadata and, after
    # x-trailer-rpc, in the trailers), also with a stub-wide default.
    await stub.list_todos(metadata={"x-echo-trace": "42"})
    assert recorded.initial == [("x-echo-trace", "42")]
    assert recorded.trailing == [("x-trailer-rpc", "ListTodos"), ("x-echo-trace", "42")]
    defaulted = pb.TodoServiceStub(channel, metadata=[("x-echo-who", "stub")], timeout=5)
    assert [t.text async for t in defaulted.stream_todos(pb.StreamTodosRequest())] == [
        "first", "second"]
    assert recorded.initial[-1] == ("x-echo-who", "stub")

    # Errors arrive as grpclib's GRPCError, with status, message and trailers.
    with pytest.raises(GRPCError) as missing:
        await stub.update_todo(pb.UpdateTodoRequest(id="nope", text="x"),
                               metadata={"x-echo-case": "missing"})
    assert missing.value.status is Status.NOT_FOUND
    assert missing.value.message == "todo 'nope' not found"
    assert recorded.statuses[-1] is Status.NOT_FOUND
    assert recorded.trailing[-2:] == [("x-trailer-rpc", "UpdateTodo"), ("x-echo-case", "missing")]

    with pytest.raises(GRPCError) as denied:
        await stub.create_todo(pb.CreateTodoRequest(text="fail:PERMISSION_DENIED:nö"))
    assert (denied.value.status, denied.value.message) == (Status.PERMISSION_DENIED, "nö")


async def test_deadline_ends_the_rpc_on_both_sides(pb: Any, service: OracleService,
                                                   channel: grpcbridge.Channel) -> None:
    stub = pb.TodoServiceStub(channel)
    slow = pb.StreamTodosRequest(repeat=1000, interval_ms=20)
    # grpclib's own timer raises TimeoutError; if the server's DEADLINE_EXCEEDED trailers
    # win the race, it is a GRPCError with that status.
    with pytest.raises((TimeoutError, GRPCError)) as late:
        async for _ in stub.stream_todos(slow, timeout=0.2):
            pass
    if isinstance(late.value, GRPCError):
        assert late.value.status is Status.DEADLINE_EXCEEDED
    await eventually(lambda: service.cancelled_count >= 1, 5,
                     message="the handler outlived the deadline")


async def test_leaving_a_stream_early_cancels_it(pb: Any, service: OracleService,
                                                  channel: grpcbridge.Channel) -> None:
    """The stub's streams are async generators: leaving one early cancels the RPC when the
    generator is closed, so close it explicitly (``contextlib.aclosing``) rather than leave
    that to the event loop's finalizer for abandoned async generators."""
    stub = pb.TodoServiceStub(channel)
    endless = pb.StreamTodosRequest(repeat=1_000_000, interval_ms=10)
    async with contextlib.aclosing(stub.stream_todos(endless)) as stream:
        async for todo in stream:
            assert todo.text == "first"
            break
    await eventually(lambda: service.cancelled_count >= 1, 5,
                     message="the server never saw the cancel")
    # The tunnel is still good for the next RPC.
    assert len((await stub.list_todos()).todos) == 2
