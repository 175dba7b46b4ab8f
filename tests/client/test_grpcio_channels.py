"""grpcio channels (aio and sync) to a WebSocket target through a private forwarder."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import grpc
import pytest
from todo_oracle import OracleService

import grpcbridge
from grpcbridge import Bridge, BridgeConfig, GrpclibBackend, ThreadedBridge
from grpcbridge.demo import todo_pb2, todo_pb2_grpc
from grpcbridge.demo.store import TodoStore


def private_socket(channel: object) -> tuple[Path, Path]:
    forwarder = channel._forwarder  # type: ignore[attr-defined]
    path = Path(forwarder.target.removeprefix("unix:"))
    return path.parent, path


def assert_private(directory: Path, socket_path: Path) -> None:
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(socket_path.stat().st_mode)
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600


async def test_aio_channel_calls_through_a_private_socket_removed_on_close() -> None:
    # No leak_check fixture here: grpc.aio keeps a poller thread and fds per event loop
    # until the loop closes, after the test. What this channel owns is checked directly.
    tasks_before = len(asyncio.all_tasks())
    store = TodoStore()
    config = BridgeConfig(backend=GrpclibBackend([OracleService(store)]), listen="127.0.0.1:0")
    try:
        async with Bridge(config) as bridge:
            channel = await grpcbridge.aio_channel(bridge.url)
            directory, socket_path = private_socket(channel)
            assert_private(directory, socket_path)
            stub = todo_pb2_grpc.TodoServiceStub(channel)
            todo = await stub.CreateTodo(todo_pb2.CreateTodoRequest(text="from grpc.aio"))
            texts = [t.text async for t in stub.StreamTodos(todo_pb2.StreamTodosRequest())]
            assert texts == [todo.text]
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub.CreateTodo(todo_pb2.CreateTodoRequest(text="fail:NOT_FOUND:nö ✓"))
            assert failed.value.code() is grpc.StatusCode.NOT_FOUND
            assert failed.value.details() == "nö ✓"
            await channel.close()
            await channel.close()  # idempotent
            assert not directory.exists()
            assert channel._forwarder.active_tunnels == 0
            assert len(asyncio.all_tasks()) <= tasks_before + 1  # + the bridge's sweeper
    finally:
        store.close()


def test_sync_channel_needs_no_event_loop(leak_check: None) -> None:
    store = TodoStore()
    threaded = ThreadedBridge(BridgeConfig(backend=GrpclibBackend([OracleService(store)]),
                                           listen="127.0.0.1:0"))
    try:
        with threaded:
            with grpcbridge.sync_channel(threaded.url) as channel:
                directory, socket_path = private_socket(channel)
                assert_private(directory, socket_path)
                stub = todo_pb2_grpc.TodoServiceStub(channel)
                created = stub.BulkCreateTodos(
                    iter([todo_pb2.CreateTodoRequest(text=t) for t in ("a", "b", "c")]),
                    timeout=10)
                assert created.created_count == 3
                assert [t.text for t in stub.ListTodos(todo_pb2.ListTodosRequest()).todos] \
                    == ["a", "b", "c"]
            channel.close()  # idempotent
            assert not directory.exists()
            assert not os.path.exists(socket_path)
    finally:
        store.close()


def test_dead_target_fails_the_call_with_unavailable(leak_check: None) -> None:
    with grpcbridge.sync_channel("ws://127.0.0.1:1/grpc", handshake_timeout=2) as channel:
        stub = todo_pb2_grpc.TodoServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failed:
            stub.ListTodos(todo_pb2.ListTodosRequest(), timeout=5)
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
