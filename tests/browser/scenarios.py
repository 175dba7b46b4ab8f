"""Scenarios for grpcbridge.browser, run inside Pyodide by ``run_node.mjs``.

``main()`` reads the driver's config (``globalThis.grpcbridgeHarness.config``: bridge URLs,
the raw test server, sizes), runs every scenario in order on Pyodide's event loop and returns
JSON: ``{name: {"ok": bool, "error": str, ...figures}}``. ``tests/browser/test_browser_node.py``
asserts on it. Scenarios may poke transport internals on purpose (forced close events).

The config's ``timing`` is the suite's timing factor (``GRPCBRIDGE_TEST_TIMING``, see
tests/support.py, which Pyodide cannot import): :func:`timing` scales every wait by it.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import random
import time
import traceback
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import js  # type: ignore[import-not-found]
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from grpcbridge.browser import Channel, SocketClosedError, WebSocketTransport, resolve_target
from grpcbridge.core.config import ReconnectPolicy
from grpcbridge.core.errors import TargetError, TunnelClosed
from grpcbridge.demo import todo_pb2
from grpcbridge.demo.todo_grpc import TodoServiceStub

KiB = 1024
MiB = 1024 * KiB
Result = dict[str, Any]

CONFIG: dict[str, Any] = {}
FORCED_DRAINING: list[bool] = []
LOOP_ERRORS: list[str] = []


def check(condition: object, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def timing(seconds: float) -> float:
    """``seconds`` scaled by the suite's timing factor."""
    return seconds * float(CONFIG.get("timing", 1.0))


async def until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    """tests/support.py's ``eventually`` (scaled the same way), for Pyodide."""
    deadline = time.monotonic() + timing(within)
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timing(within):g} s")
        await asyncio.sleep(0.01)


async def signal(name: str, data: Any = None) -> str:
    """Ask the pytest driver to act (e.g. close a bridge); returns its answer."""
    return str(await js.grpcbridgeHarness.signal(name, json.dumps(data)))


def channel(url: str, **kwargs: Any) -> Channel:
    return Channel(url, **kwargs)


class Recorder(asyncio.Protocol):
    """A protocol for transport-level scenarios: records everything."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.made = 0
        self.lost: list[BaseException | None] = []
        self.pauses = 0
        self.resumed = asyncio.Event()
        self.resumed.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made += 1

    def data_received(self, data: bytes) -> None:
        self.data += data

    def pause_writing(self) -> None:
        self.pauses += 1
        self.resumed.clear()

    def resume_writing(self) -> None:
        self.resumed.set()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.append(exc)


def rid(name: str) -> str:
    """A raw-server record id, per WebSocket implementation."""
    return name if CONFIG.get("impl", "ws") == "ws" else f"native-{name}"


def is_null(value: object) -> bool:
    """JavaScript null or undefined (Pyodide shows null as ``jsnull``)."""
    return value is None or type(value).__name__ == "JsNull"


def pattern(size: int) -> bytes:
    """The bytes the raw test server's /early mode sends."""
    return bytes(i % 251 for i in range(251)) * (size // 251) + bytes(range(size % 251))


def todo_digest(todos: Any) -> bytes:
    digest = hashlib.sha256()
    for todo in todos:
        digest.update(todo.id.encode() + b"\0" + todo.text.encode() + b"\0")
    return digest.digest()


def big_text(index: int, size: int) -> str:
    seed = f"todo-{index}-".encode()
    block = hashlib.sha256(seed).hexdigest()
    return (block * (size // len(block) + 1))[:size]


def heap_bytes() -> int:
    try:
        import pyodide_js  # type: ignore[import-not-found]
        return int(pyodide_js._module.HEAP8.length)
    except Exception:
        return -1


# --------------------------------------------------------------------- gRPC basics


async def scenario_unary() -> Result:
    async with channel(CONFIG["bridge"]) as ch:
        stub = TodoServiceStub(ch)
        metadata = {"x-echo-one": "1", "x-echo-data-bin": b"\x00\xff\x01"}
        async with stub.CreateTodo.open(metadata=metadata) as stream:
            await stream.send_message(todo_pb2.CreateTodoRequest(text="hello ünïcode ✓"), end=True)
            todo = await stream.recv_message()
            await stream.recv_trailing_metadata()
        check(todo is not None and todo.text == "hello ünïcode ✓" and todo.id, f"reply {todo}")
        initial = stream.initial_metadata
        trailing = stream.trailing_metadata
        check(initial is not None and initial.get("x-echo-one") == "1", f"initial {initial}")
        check(initial.get("x-echo-data-bin") == b"\x00\xff\x01", f"bin metadata {initial}")
        check(trailing is not None and trailing.get("x-trailer-rpc") == "CreateTodo",
              f"trailing {trailing}")
        transport = ch.transport
        assert transport is not None
        check(transport.subprotocol == "grpcbridge", f"subprotocol {transport.subprotocol!r}")
        check(transport.websocket.binaryType == "arraybuffer", "binaryType")
        check(ch._authority == CONFIG["bridge_authority"], f"authority {ch._authority}")
        # Sequential latency.
        rounds = 200
        timings = []
        for i in range(rounds):
            started = time.perf_counter()
            await stub.UpdateTodo(todo_pb2.UpdateTodoRequest(id=todo.id, text=f"t{i}"))
            timings.append(time.perf_counter() - started)
        timings.sort()
        return {"unary_median_ms": 1000 * timings[rounds // 2],
                "unary_mean_ms": 1000 * sum(timings) / rounds,
                "unary_p90_ms": 1000 * timings[int(rounds * 0.9)]}


async def scenario_errors() -> Result:
    async with channel(CONFIG["bridge"]) as ch:
        stub = TodoServiceStub(ch)
        message = "nö such tödo ✓"
        try:
            async with stub.CreateTodo.open(metadata={"x-echo-k": "v"}) as stream:
                await stream.send_message(
                    todo_pb2.CreateTodoRequest(text=f"fail:NOT_FOUND:{message}"), end=True)
                await stream.recv_message()
            raise AssertionError("fail:NOT_FOUND did not fail")
        except GRPCError as exc:
            check(exc.status is Status.NOT_FOUND, f"status {exc.status}")
            check(exc.message == message, f"message {exc.message!r}")
        try:
            await stub.CreateTodo(todo_pb2.CreateTodoRequest(text=""))
            raise AssertionError("empty text did not fail")
        except GRPCError as exc:
            check(exc.status is Status.INVALID_ARGUMENT, f"status {exc.status}")
            check(exc.message == "text must not be empty", f"message {exc.message!r}")
        # The channel still works after errors.
        todo = await stub.CreateTodo(todo_pb2.CreateTodoRequest(text="after errors"))
        check(todo.text == "after errors", "channel unusable after errors")
        check(ch.connections_opened == 1, f"reconnected: {ch.connections_opened}")
    return {}


async def scenario_server_streaming() -> Result:
    async with channel(CONFIG["bridge"]) as ch:
        stub = TodoServiceStub(ch)
        await stub.CreateTodo(todo_pb2.CreateTodoRequest(text="something to stream"))
        listing = await stub.ListTodos(todo_pb2.ListTodosRequest())
        async with stub.StreamTodos.open() as stream:
            await stream.send_message(todo_pb2.StreamTodosRequest(repeat=3), end=True)
            received = [todo async for todo in stream]
        check(todo_digest(received) == todo_digest(list(listing.todos) * 3),
              f"got {len(received)} todos, listed {len(listing.todos)}")
        check(stream.trailing_metadata.get("x-trailer-rpc") == "StreamTodos", "trailers")
    return {"todos": len(received)}


async def scenario_client_streaming() -> Result:
    async with channel(CONFIG["bridge"]) as ch:
        stub = TodoServiceStub(ch)
        requests = [todo_pb2.CreateTodoRequest(text=f"bulk {i}") for i in range(50)]
        reply = await stub.BulkCreateTodos(requests)
        check(reply.created_count == 50, f"created {reply.created_count}")
        try:
            await stub.BulkCreateTodos([todo_pb2.CreateTodoRequest(text="x"),
                                        todo_pb2.CreateTodoRequest(text="")])
            raise AssertionError("empty text in a bulk create did not fail")
        except GRPCError as exc:
            check(exc.status is Status.INVALID_ARGUMENT, f"status {exc.status}")
    return {}


async def scenario_bidi() -> Result:
    async with channel(CONFIG["bridge"]) as ch:
        stub = TodoServiceStub(ch)
        texts = [f"sync {i} {random.random()}" for i in range(5)]
        async with stub.SyncTodos.open() as stream:
            for text in texts:
                await stream.send_message(todo_pb2.SyncRequest(
                    create=todo_pb2.CreateTodoRequest(text=text)))
            # Wait for our five creates to come back before the failing update.
            seen: list[str] = []
            while len([t for t in seen if t in texts]) < len(texts):
                response = await stream.recv_message()
                check(response is not None, "stream ended early")
                if response.WhichOneof("event") == "todo":
                    seen.append(response.todo.text)
            await stream.send_message(todo_pb2.SyncRequest(
                update=todo_pb2.UpdateTodoRequest(id="no-such-id", text="x")), end=True)
            errors = []
            async for response in stream:
                if response.WhichOneof("event") == "error":
                    errors.append(response.error)
        check(errors and "not found" in errors[0], f"errors {errors}")
    return {}


async def scenario_concurrent() -> Result:
    async with channel(CONFIG["bridge"]) as ch:
        stub = TodoServiceStub(ch)
        await stub.ListTodos(todo_pb2.ListTodosRequest())  # connect first
        count = 200
        started = time.perf_counter()
        replies = await asyncio.gather(*(
            stub.CreateTodo(todo_pb2.CreateTodoRequest(text=f"c{i}")) for i in range(count)))
        elapsed = time.perf_counter() - started
        check(sorted(r.text for r in replies) == sorted(f"c{i}" for i in range(count)),
              "wrong replies")
        check(ch.connections_opened == 1, "more than one connection")
        for reply in replies:  # keep the store small for later listings
            await stub.DeleteTodo(todo_pb2.DeleteTodoRequest(id=reply.id))
    return {"concurrent_rps": count / elapsed}


# ------------------------------------------------------------------- bulk transfer


async def scenario_bulk() -> Result:
    """Upload 4 MiB, then download 64 MiB (16 under the second WebSocket implementation) to
    a deliberately slow reader, with checksums."""
    total = CONFIG["bulk_bytes"] if CONFIG["impl"] == "ws" else CONFIG["native_bulk_bytes"]
    size = 256 * KiB
    async with channel(CONFIG["bridge"]) as ch:
        stub = TodoServiceStub(ch)
        texts = [big_text(i, size) for i in range(16)]
        started = time.perf_counter()
        reply = await stub.BulkCreateTodos([todo_pb2.CreateTodoRequest(text=t) for t in texts])
        upload_s = time.perf_counter() - started
        check(reply.created_count == 16, f"created {reply.created_count}")
        listing = list((await stub.ListTodos(todo_pb2.ListTodosRequest())).todos)
        mine = [t for t in listing if len(t.text) == size]
        check(sorted(t.text for t in mine) == sorted(texts), "uploaded texts differ")
        list_bytes = sum(t.ByteSize() for t in listing)
        transport = ch.transport
        assert transport is not None

        # Fast reader: throughput.
        repeat = max(1, (16 * MiB) // list_bytes)
        started = time.perf_counter()
        async with stub.StreamTodos.open() as stream:
            await stream.send_message(todo_pb2.StreamTodosRequest(repeat=repeat), end=True)
            fast = 0
            async for todo in stream:
                fast += todo.ByteSize()
        download_s = time.perf_counter() - started

        # Slow reader: everything arrives, in order, with bounded buffering.
        repeat = -(-total // list_bytes)
        heap_before = heap_bytes()
        received_before = transport.machine.bytes_from_websocket
        digest = hashlib.sha256()
        consumed = 0
        count = 0
        max_outstanding = 0
        since_sleep = 0
        slow_started = time.perf_counter()
        async with stub.StreamTodos.open() as stream:
            await stream.send_message(todo_pb2.StreamTodosRequest(repeat=repeat), end=True)
            async for todo in stream:
                digest.update(todo.id.encode() + b"\0" + todo.text.encode() + b"\0")
                consumed += todo.ByteSize() + 5
                count += 1
                outstanding = transport.machine.bytes_from_websocket - received_before - consumed
                max_outstanding = max(max_outstanding, outstanding)
                since_sleep += todo.ByteSize()
                if since_sleep >= 512 * KiB:  # a slow consumer: ~20 MiB/s at most
                    since_sleep = 0
                    await asyncio.sleep(0.02)
        slow_s = time.perf_counter() - slow_started
        expected = hashlib.sha256()
        for _ in range(repeat):
            for todo in listing:
                expected.update(todo.id.encode() + b"\0" + todo.text.encode() + b"\0")
        check(count == repeat * len(listing), f"received {count} of {repeat * len(listing)}")
        check(digest.digest() == expected.digest(), "checksum mismatch: data lost or reordered")
        for todo in mine:
            await stub.DeleteTodo(todo_pb2.DeleteTodoRequest(id=todo.id))
        return {
            "upload_mib_s": 16 * size / MiB / upload_s,
            "download_mib_s": fast / MiB / download_s,
            "slow_bytes": consumed,
            "slow_mib_s": consumed / MiB / slow_s,
            "max_outstanding_bytes": max_outstanding,
            "max_pending_bytes": transport.stats.max_pending_bytes,
            "heap_growth_bytes": heap_bytes() - heap_before if heap_before > 0 else -1,
            "heap_bytes": heap_bytes(),
            "sha256": digest.hexdigest(),
        }


# ------------------------------------------------------------ transport behaviour


async def scenario_backpressure() -> Result:
    """16 MiB to a slow WebSocket reader: pause/resume from bufferedAmount, nothing lost."""
    high, low, chunk, chunks = 256 * KiB, 64 * KiB, 64 * KiB, 256
    url = CONFIG["raw"] + f"/sink?id={rid('backpressure')}&stall=0.5&delay=0.002"
    transport = WebSocketTransport(url, ["grpcbridge"], high_water=high, low_water=low)
    await transport.wait_open(timing(5))
    recorder = Recorder()
    transport.attach(recorder)
    digest = hashlib.sha256()
    started = time.perf_counter()
    for i in range(chunks):
        await recorder.resumed.wait()
        data = hashlib.sha256(str(i).encode()).digest() * (chunk // 32)
        digest.update(data)
        transport.write(data)
    await until(lambda: not transport.get_write_buffer_size())
    elapsed = time.perf_counter() - started
    transport.close()
    await asyncio.wait_for(transport.closed, timing(10))
    stats = transport.stats
    check(stats.pauses >= 1 and recorder.pauses == stats.pauses, f"pauses {stats.pauses}")
    check(stats.max_buffered_amount <= high + chunk,
          f"bufferedAmount reached {stats.max_buffered_amount}")
    check(recorder.lost == [None], f"connection_lost {recorder.lost}")
    return {"sha256": digest.hexdigest(), "bytes": chunks * chunk, "pauses": stats.pauses,
            "max_buffered_amount": stats.max_buffered_amount,
            "mib_s": chunks * chunk / MiB / elapsed}


async def scenario_coalescing() -> Result:
    """The first write of a task goes out at once, the task's later writes as one message
    (and at once beyond coalesce_limit); held bytes count for backpressure and are sent
    before a close this side starts."""
    limit = WebSocketTransport.coalesce_limit
    check(limit == 256 * KiB, f"coalesce_limit {limit}")
    url = CONFIG["raw"] + f"/sink?id={rid('coalesce')}"
    transport = WebSocketTransport(url, ["grpcbridge"])
    await transport.wait_open(timing(5))
    recorder = Recorder()
    transport.attach(recorder)
    digest = hashlib.sha256()
    stats = transport.stats

    def write(data: bytes) -> None:
        digest.update(data)
        transport.write(data)

    # Five small writes in one task: the first alone, the other four together.
    for i in range(5):
        write(bytes([i]) * KiB)
    check(stats.messages_sent == 1, f"sent {stats.messages_sent} messages during the task")
    check(transport.get_write_buffer_size() >= 4 * KiB, "held bytes not counted as buffered")
    await asyncio.sleep(0)
    check(stats.messages_sent == 2 and stats.writes == 5,
          f"{stats.writes} writes became {stats.messages_sent} messages, expected 2")
    # Ten 64 KiB writes in one task: 1 at once, then 4 + 4 at the limit, then the last one.
    for i in range(10):
        write(bytes([i]) * (64 * KiB))
    await asyncio.sleep(0)
    check(stats.messages_sent == 6, f"{stats.messages_sent} messages after the 64 KiB writes")
    # Held bytes alone trigger backpressure.
    transport.set_write_buffer_limits(high=16 * KiB, low=0)
    await until(lambda: transport.get_write_buffer_size() == 0)
    write(b"a" * KiB)
    write(b"b" * (20 * KiB))
    check(recorder.pauses == 1, f"not paused by 21 KiB held: pauses {recorder.pauses}")
    await asyncio.wait_for(recorder.resumed.wait(), timing(10))
    # Writes followed by close() in the same task are all sent before the close frame.
    transport.set_write_buffer_limits()
    for i in range(3):
        write(bytes([i + 1]) * (3 * KiB))
    transport.close()
    try:
        transport.write(b"late")
        raise AssertionError("a write after close() was accepted")
    except SocketClosedError as exc:
        check("1000" in str(exc), f"write after close: {exc}")
    await asyncio.wait_for(transport.closed, timing(10))
    check(stats.bytes_unsent == 0, f"{stats.bytes_unsent} bytes not sent")
    check(recorder.lost == [None], f"connection_lost {recorder.lost}")

    # gRPC: a unary call is HEADERS + DATA (two writes, the first sent at once); a client
    # stream's frames leave in fewer messages (how many depends on flow control's timing).
    async with channel(CONFIG["bridge"]) as ch:
        stub = TodoServiceStub(ch)
        await stub.ListTodos(todo_pb2.ListTodosRequest())
        grpc_transport = ch.transport
        assert grpc_transport is not None
        grpc_stats = grpc_transport.stats
        writes, sent = grpc_stats.writes, grpc_stats.messages_sent
        await stub.ListTodos(todo_pb2.ListTodosRequest())
        unary = (grpc_stats.writes - writes, grpc_stats.messages_sent - sent)
        check(unary[1] <= 2, f"a unary call sent {unary[1]} messages")
        texts = [big_text(i, 64 * KiB) for i in range(16)]
        writes, sent = grpc_stats.writes, grpc_stats.messages_sent
        reply = await stub.BulkCreateTodos([todo_pb2.CreateTodoRequest(text=t) for t in texts])
        check(reply.created_count == 16, f"created {reply.created_count}")
        bulk = (grpc_stats.writes - writes, grpc_stats.messages_sent - sent)
        check(bulk[0] >= 17 and bulk[1] < bulk[0], f"bulk: {bulk[0]} writes, {bulk[1]} messages")
        listing = (await stub.ListTodos(todo_pb2.ListTodosRequest())).todos
        mine = [t for t in listing if len(t.text) == 64 * KiB]
        check(sorted(t.text for t in mine) == sorted(texts), "uploaded texts differ")
        for todo in mine:
            await stub.DeleteTodo(todo_pb2.DeleteTodoRequest(id=todo.id))
    return {"sha256": digest.hexdigest(), "bytes": transport.machine.bytes_to_websocket,
            "messages": stats.messages_sent, "writes": stats.writes,
            "unary_writes_messages": unary, "bulk_writes_messages": bulk}


async def scenario_frame_size() -> Result:
    """The client advertises SETTINGS_MAX_FRAME_SIZE (1 MiB by default): the server sends large
    messages in large frames; 16 KiB (HTTP/2's default) works as well; bad sizes are refused."""
    size = 256 * KiB
    results = {}
    async with channel(CONFIG["bridge"]) as ch:
        stub = TodoServiceStub(ch)
        texts = [big_text(100 + i, size) for i in range(4)]
        await stub.BulkCreateTodos([todo_pb2.CreateTodoRequest(text=t) for t in texts])
        listing = list((await stub.ListTodos(todo_pb2.ListTodosRequest())).todos)
        for max_frame_size in (16 * KiB, 1 * MiB):
            async with channel(CONFIG["bridge"], max_frame_size=max_frame_size) as reader:
                reader_stub = TodoServiceStub(reader)
                await reader_stub.ListTodos(todo_pb2.ListTodosRequest())
                protocol: Any = reader._protocol
                h2 = protocol.connection._connection
                check(h2.max_inbound_frame_size == max_frame_size,
                      f"max_inbound_frame_size {h2.max_inbound_frame_size}")
                transport = reader.transport
                assert transport is not None
                before = transport.stats.messages_received
                async with reader_stub.StreamTodos.open() as stream:
                    await stream.send_message(todo_pb2.StreamTodosRequest(repeat=2), end=True)
                    received = [todo async for todo in stream]
                check(todo_digest(received) == todo_digest(listing * 2),
                      f"{max_frame_size}: stream differs")
                results[str(max_frame_size)] = transport.stats.messages_received - before
        for todo in listing:
            if len(todo.text) == size:
                await stub.DeleteTodo(todo_pb2.DeleteTodoRequest(id=todo.id))
    for bad in (16 * KiB - 1, 16 * MiB, 2 * MiB):
        try:
            Channel(CONFIG["bridge"], max_frame_size=bad, max_message_bytes=2 * MiB)
            raise AssertionError(f"max_frame_size={bad} accepted")
        except ValueError as exc:
            check("max_frame_size" in str(exc), f"message {exc}")
    small = Channel(CONFIG["bridge"], max_message_bytes=64 * KiB)  # default follows the limit
    frame_size = small._options.max_frame_size
    check(frame_size == 64 * KiB - 9, f"default frame size {frame_size}")
    small.close()
    import hyperframe.frame
    check(hyperframe.frame.DataFrame(1, data=b"0123456789abc").__repr__().endswith(
        "<hex:30313233343536373839...>"), "frame repr changed")
    return {"messages_by_frame_size": results}


async def scenario_outbound_cap() -> Result:
    """A writer that ignores pause_writing hits the hard cap: fails closed, clear error."""
    transport = WebSocketTransport(CONFIG["raw"] + f"/sink?id={rid('outbound_cap')}&stall=1",
                                   ["grpcbridge"], high_water=256 * KiB, low_water=64 * KiB,
                                   max_buffer_bytes=1 * MiB, max_message_bytes=64 * KiB)
    await transport.wait_open(timing(5))
    recorder = Recorder()
    transport.attach(recorder)
    error = None
    written = 0
    for _ in range(1024):  # up to 64 MiB without waiting (kernel buffers take a few MiB)
        try:
            transport.write(b"\x01" * (64 * KiB))
            written += 64 * KiB
        except SocketClosedError as exc:
            error = str(exc)
            break
    check(error is not None and "send buffer over 1048576 bytes" in error, f"error {error!r}")
    check(transport.machine.close_code == 1011, f"close code {transport.machine.close_code}")
    await asyncio.wait_for(transport.closed, timing(10))
    await asyncio.sleep(0)
    check(len(recorder.lost) == 1 and recorder.lost[0] is not None, f"lost {recorder.lost}")
    try:
        transport.write(b"more")
        raise AssertionError("write after fail-closed did not raise")
    except SocketClosedError:
        pass
    return {"written": written, "error": error}


async def scenario_early_bytes() -> Result:
    """Bytes that arrive before a protocol is attached are kept and delivered in order."""
    size = 3 * MiB
    transport = WebSocketTransport(CONFIG["raw"] + f"/early?bytes={size}&id={rid('early')}",
                                   ["grpcbridge"])
    ws = transport.websocket
    check(ws.readyState == 0 and ws.binaryType == "arraybuffer", "not CONNECTING")
    check(all(not is_null(getattr(ws, name)) for name in ("onopen", "onmessage", "onclose",
                                                              "onerror")),
          "handlers not installed at construction")
    await transport.wait_open(timing(5))
    await until(lambda: transport.machine.bytes_from_websocket >= size)
    recorder = Recorder()
    transport.attach(recorder)
    check(bytes(recorder.data) == pattern(size), f"delivered {len(recorder.data)} bytes, "
          "not the expected pattern")
    check(transport.stats.max_pending_bytes == size, f"pending {transport.stats.max_pending_bytes}")
    check(transport.stats.empty_messages >= 1, "empty message not counted")
    transport.close()
    await asyncio.wait_for(transport.closed, timing(10))
    return {"pending_bytes": transport.stats.max_pending_bytes}


async def scenario_inbound_cap() -> Result:
    """More than max_buffer_bytes before attach, or a too-big message: fail closed."""
    url = CONFIG["raw"] + f"/early?bytes={3 * MiB}&id={rid('inbound_cap')}"
    transport = WebSocketTransport(url, ["grpcbridge"], high_water=256 * KiB, low_water=64 * KiB,
                                   max_buffer_bytes=1 * MiB, max_message_bytes=64 * KiB)
    await transport.wait_open(timing(5))
    await asyncio.wait_for(transport.closed, timing(10))
    check(transport.machine.close_code == 1009, f"close code {transport.machine.close_code}")
    check("more than 1048576 bytes arrived before" in transport.machine.close_reason,
          f"reason {transport.machine.close_reason!r}")
    try:
        transport.attach(Recorder())
        raise AssertionError("attach after fail-closed did not raise")
    except SocketClosedError as exc:
        check("1009" in str(exc), f"error {exc}")
    big = WebSocketTransport(CONFIG["raw"] + f"/early?bytes={200 * KiB}&chunk={200 * KiB}",
                             ["grpcbridge"], max_message_bytes=64 * KiB)
    await big.wait_open(timing(5))
    await asyncio.wait_for(big.closed, timing(10))
    check(big.machine.close_code == 1009 and "larger than" in big.machine.close_reason,
          f"too-big message: {big.machine.close_code} {big.machine.close_reason!r}")
    return {"reason": transport.machine.close_reason}


async def scenario_text_message() -> Result:
    """A text message from the server closes with 1003; the RPC says why."""
    async with channel(CONFIG["raw"] + f"/text?id={rid('text')}") as ch:
        stub = TodoServiceStub(ch)
        try:
            await stub.CreateTodo(todo_pb2.CreateTodoRequest(text="x"), timeout=10)
            raise AssertionError("RPC over a text-sending server succeeded")
        except GRPCError as exc:
            check(exc.status is Status.UNAVAILABLE, f"status {exc.status}")
            check("1003" in (exc.message or "") and "text message" in (exc.message or ""),
                  f"message {exc.message!r}")
            message = exc.message
        transport = ch.transport
        assert transport is not None
        check(transport.machine.close_code == 1003, f"close code {transport.machine.close_code}")
    return {"message": message}


# ------------------------------------------------------------------------ closing


async def scenario_server_close_midstream() -> Result:
    """The bridge shuts down during a server stream: UNAVAILABLE with the close code; the
    next RPCs fail (bridge gone), then fail fast during backoff."""
    policy = ReconnectPolicy(initial_delay=5.0, jitter=0.0, max_delay=5.0)
    async with channel(CONFIG["bridge_close"], reconnect=policy) as ch:
        stub = TodoServiceStub(ch)
        await stub.CreateTodo(todo_pb2.CreateTodoRequest(text="something to stream"))
        got = 0
        try:
            async with stub.StreamTodos.open() as stream:
                await stream.send_message(
                    todo_pb2.StreamTodosRequest(repeat=1_000_000, interval_ms=20), end=True)
                async for _todo in stream:
                    got += 1
                    if got == 3:
                        await signal("close_bridge")
            raise AssertionError("stream ended without an error")
        except GRPCError as exc:
            check(exc.status is Status.UNAVAILABLE, f"status {exc.status}: {exc.message}")
            check("1001" in (exc.message or ""), f"message {exc.message!r}")
            message = exc.message
        try:
            await stub.ListTodos(todo_pb2.ListTodosRequest())
            raise AssertionError("RPC to a closed bridge succeeded")
        except GRPCError as exc:
            check(exc.status is Status.UNAVAILABLE, f"reconnect status {exc.status}")
            refused = exc.message
        started = time.perf_counter()
        try:
            await stub.ListTodos(todo_pb2.ListTodosRequest())
            raise AssertionError("RPC during backoff succeeded")
        except GRPCError as exc:
            check(exc.status is Status.UNAVAILABLE and "next attempt in" in (exc.message or ""),
                  f"backoff: {exc.status} {exc.message!r}")
            check(time.perf_counter() - started < 0.5, "backoff RPC did not fail fast")
    return {"message": message, "refused": refused}


async def scenario_reconnect() -> Result:
    """The bridge closes an idle tunnel; the next RPC reconnects by itself."""
    async with channel(CONFIG["bridge_idle"]) as ch:
        stub = TodoServiceStub(ch)
        await stub.CreateTodo(todo_pb2.CreateTodoRequest(text="before idle"))
        first = ch.transport
        assert first is not None
        await asyncio.wait_for(first.closed, timing(10))
        check(first.machine.close_code == 1001 and "idle" in first.machine.close_reason,
              f"idle close {first.machine.close_code} {first.machine.close_reason!r}")
        todo = await stub.CreateTodo(todo_pb2.CreateTodoRequest(text="after idle"))
        check(todo.text == "after idle", "RPC after reconnect")
        check(ch.connections_opened == 2, f"connections {ch.connections_opened}")
    return {}


def _force_close_after_last_frame(transport: WebSocketTransport, code: int = 1001) -> None:
    """Make a close event arrive right after the message that ends an RPC, before the RPC's
    task can run (the hardest case for 'data that arrived before a close is used')."""
    original = transport._handle_message

    def hooked(event: Any) -> None:
        original(event)
        protocol: Any = transport.protocol
        if transport.machine.close_code is None and protocol is not None and any(
                getattr(getattr(s, "buffer", None), "_eof", False)
                for s in protocol.processor.streams.values()):
            transport._handle_close(SimpleNamespace(code=code, reason="forced after last frame"))
            # The RPC has not run yet: its stream must be finishing, not terminated.
            FORCED_DRAINING.append(transport.draining)

    transport._handle_message = hooked  # type: ignore[method-assign]


async def scenario_complete_before_close_forced() -> Result:
    outcomes = []
    for kind in ("unary", "list", "error"):
        async with channel(CONFIG["bridge"]) as ch:
            stub = TodoServiceStub(ch)
            await stub.ListTodos(todo_pb2.ListTodosRequest())  # connect
            transport = ch.transport
            assert transport is not None
            _force_close_after_last_frame(transport)
            if kind == "unary":
                todo = await stub.CreateTodo(todo_pb2.CreateTodoRequest(text="last words"))
                check(todo.text == "last words", "unary reply")
            elif kind == "list":
                listing = await stub.ListTodos(todo_pb2.ListTodosRequest())
                check(len(listing.todos) > 0, "empty listing")
            else:
                try:
                    await stub.CreateTodo(todo_pb2.CreateTodoRequest(text="fail:NOT_FOUND:gone"))
                    raise AssertionError("error RPC succeeded")
                except GRPCError as exc:
                    check(exc.status is Status.NOT_FOUND and exc.message == "gone",
                          f"error RPC: {exc.status} {exc.message!r}")
            check(transport.machine.close_code == 1001, f"{kind}: the close was not forced")
            outcomes.append(kind)
    # A server stream whose trailers arrive right before the close.
    async with channel(CONFIG["bridge"]) as ch:
        stub = TodoServiceStub(ch)
        listing = await stub.ListTodos(todo_pb2.ListTodosRequest())
        transport = ch.transport
        assert transport is not None
        _force_close_after_last_frame(transport)
        async with stub.StreamTodos.open() as stream:
            await stream.send_message(todo_pb2.StreamTodosRequest(repeat=2), end=True)
            received = [todo async for todo in stream]
        check(len(received) == 2 * len(listing.todos), f"stream got {len(received)}")
        check(stream.trailing_metadata.get("x-trailer-rpc") == "StreamTodos",
              "stream trailers not read")
        check(transport.machine.close_code == 1001, "the close was not forced")
        outcomes.append(("server-stream", len(received)))
    check(len(FORCED_DRAINING) == 4 and all(FORCED_DRAINING),
          f"the forced closes did not hit finishing RPCs: {FORCED_DRAINING}")
    FORCED_DRAINING.clear()
    return {"outcomes": outcomes}


async def scenario_complete_before_close_relay() -> Result:
    """A relay that closes the WebSocket right after each response's last frame."""
    policy = ReconnectPolicy(initial_delay=0.0, max_delay=0.0)
    async with channel(CONFIG["raw"] + f"/relay-close?id={rid('relay')}", reconnect=policy) as ch:
        stub = TodoServiceStub(ch)

        async def closed() -> None:
            # Each connection carries one RPC: wait for its close before the next RPC (one
            # sent while the server's close frame is on its way fails with UNAVAILABLE).
            transport = ch.transport
            assert transport is not None
            await asyncio.wait_for(transport.closed, timing(10))
            code = transport.machine.close_code
            check(code == 1000, f"close code {code}")

        for i in range(4):
            todo = await stub.CreateTodo(todo_pb2.CreateTodoRequest(text=f"relay {i}"))
            check(todo.text == f"relay {i}", f"reply {todo}")
            await closed()
            async with stub.StreamTodos.open() as stream:
                await stream.send_message(todo_pb2.StreamTodosRequest(repeat=1), end=True)
                received = [todo async for todo in stream]
            check(received and stream.trailing_metadata.get("x-trailer-rpc") == "StreamTodos",
                  "stream through the closing relay")
            await closed()
            try:
                await stub.CreateTodo(todo_pb2.CreateTodoRequest(text="fail:ABORTED:relay"))
                raise AssertionError("error RPC succeeded")
            except GRPCError as exc:
                check(exc.status is Status.ABORTED, f"status {exc.status} {exc.message!r}")
            await closed()
        transport = ch.transport
        assert transport is not None
        check(ch.connections_opened == 12, f"connections {ch.connections_opened}")
    return {"connections": ch.connections_opened}


class _FakeEvent:
    def __init__(self, code: int = 1001, reason: str = "fake close") -> None:
        self.code = code
        self.reason = reason


async def scenario_close_races() -> Result:
    """onerror, onclose and close() in every order: one connection_lost, nothing leaked."""
    results = []
    for index, order in enumerate(itertools.permutations(("error", "close_event", "close"))):
        url = CONFIG["raw"] + f"/sink?id={rid(f'race{index}')}"
        transport = WebSocketTransport(url, ["grpcbridge"])
        await transport.wait_open(timing(5))
        recorder = Recorder()
        transport.attach(recorder)
        ws = transport.websocket
        for step in order:
            if step == "close":
                transport.close()
            else:  # dispatch through the JavaScript handlers, as the browser would
                handler = ws.onerror if step == "error" else ws.onclose
                if is_null(handler):
                    continue  # already detached: the browser would not call it either
                event = js.Object.new()
                event.code = 1001
                event.reason = "fake close"
                handler(event)
        await asyncio.wait_for(transport.closed, timing(10))
        await asyncio.sleep(0.02)
        # An error event only waits (briefly) for the close event, which has the code.
        first = next(step for step in order if step != "error")
        expected = {"close_event": 1001, "close": 1000}[first]
        code = transport.machine.close_code
        check(code == expected, f"{order}: code {code}")
        check(len(recorder.lost) == 1, f"{order}: connection_lost {len(recorder.lost)} times")
        check(all(is_null(getattr(ws, name)) for name in ("onopen", "onmessage", "onclose",
                                                          "onerror")),
              f"{order}: handlers not detached")
        transport.close()  # still idempotent afterwards
        results.append([*order, transport.machine.close_code])
    # An error event with no close event after it (not per spec, but seen in Node 20).
    transport = WebSocketTransport(CONFIG["raw"] + f"/sink?id={rid('error-only')}",
                                   ["grpcbridge"])
    await transport.wait_open(timing(5))
    recorder = Recorder()
    transport.attach(recorder)
    transport.websocket.onerror(js.Object.new())
    check(transport.machine.close_code is None,
          "closed at the error event, before waiting for close")
    await asyncio.wait_for(transport.closed, timing(5))
    await asyncio.sleep(0.02)
    check(transport.machine.close_code == 1006 and len(recorder.lost) == 1,
          f"error only: {transport.machine.close_code} {recorder.lost}")
    results.append(["error-only", transport.machine.close_code])
    # Natural races: the server closes at ~150 ms, the client closes around then too.
    for i in range(8):
        transport = WebSocketTransport(CONFIG["raw"] + "/close-soon?ms=150", ["grpcbridge"])
        await transport.wait_open(timing(5))
        recorder = Recorder()
        transport.attach(recorder)
        await asyncio.sleep(0.13 + 0.005 * i)
        transport.close()
        await asyncio.wait_for(transport.closed, timing(10))
        await asyncio.sleep(0.02)
        check(len(recorder.lost) == 1, f"natural race {i}: lost {len(recorder.lost)}")
    # A channel closed while an RPC waits: CANCELLED, as for grpcbridge.Channel (the channel
    # core's status for RPCs in flight on close; it used to be UNAVAILABLE with code 1000).
    async with channel(CONFIG["bridge"]) as ch:
        stub = TodoServiceStub(ch)
        await stub.CreateTodo(todo_pb2.CreateTodoRequest(text="something to stream"))
        got = 0

        async def reader() -> None:
            nonlocal got
            async with stub.StreamTodos.open() as stream:
                await stream.send_message(
                    todo_pb2.StreamTodosRequest(repeat=1000, interval_ms=20), end=True)
                async for _todo in stream:
                    got += 1

        task = asyncio.ensure_future(reader())
        await until(lambda: got >= 2)
        ch.close()
        try:
            await asyncio.wait_for(task, timing(10))
            raise AssertionError("stream survived close()")
        except GRPCError as exc:
            check(exc.status is Status.CANCELLED and "was closed" in (exc.message or ""),
                  f"close(): {exc.status} {exc.message!r}")
            close_message = exc.message
        try:
            await stub.ListTodos(todo_pb2.ListTodosRequest())
            raise AssertionError("RPC on a closed channel succeeded")
        except TunnelClosed:
            pass
    return {"orders": results, "close_message": close_message}


async def scenario_send_after_close() -> Result:
    # gRPC level: a bidi stream whose socket the server closed.
    async with channel(CONFIG["bridge"]) as ch:
        stub = TodoServiceStub(ch)
        async with stub.SyncTodos.open() as stream:
            await stream.send_message(todo_pb2.SyncRequest(
                create=todo_pb2.CreateTodoRequest(text="before close")))
            while True:
                response = await stream.recv_message()
                if response is not None and response.todo.text == "before close":
                    break
            transport = ch.transport
            assert transport is not None
            transport._handle_close(_FakeEvent(1001, "server went away"))
            try:
                await stream.send_message(todo_pb2.SyncRequest(
                    create=todo_pb2.CreateTodoRequest(text="after close")))
                raise AssertionError("send after close succeeded")
            except GRPCError as exc:
                check(exc.status is Status.UNAVAILABLE, f"status {exc.status}")
                check("1001" in (exc.message or "") and "server went away" in (exc.message or ""),
                      f"message {exc.message!r}")
                grpc_message = exc.message
    # Transport level: a raw write after close().
    try:
        transport.write(b"\x00\x00\x05\x00\x00\x00\x00\x00\x01hello")
        raise AssertionError("raw write after close succeeded")
    except SocketClosedError as exc:
        check("1001" in str(exc), f"raw write error {exc}")
        raw_message = str(exc)
    return {"grpc_message": grpc_message, "raw_message": raw_message}


# ------------------------------------------------------------ options and targets


async def scenario_auth() -> Result:
    token = CONFIG["token"]
    url = CONFIG["bridge_auth"]
    messages = []
    for token_in in ("subprotocol", "query"):
        async with channel(url, bearer_token=token, token_in=token_in) as ch:
            todo = await TodoServiceStub(ch).CreateTodo(todo_pb2.CreateTodoRequest(text="auth"))
            check(todo.text == "auth", f"{token_in}: reply")
            check(token not in repr(ch) and token not in ch.target, "token in repr/target")
    async with channel(url) as ch:
        try:
            await TodoServiceStub(ch).CreateTodo(todo_pb2.CreateTodoRequest(text="x"))
            raise AssertionError("RPC without a token succeeded")
        except GRPCError as exc:
            check(exc.status is Status.UNAVAILABLE, f"status {exc.status}")
            messages.append(exc.message)
    async with channel(url, bearer_token="wrong-token", token_in="query") as ch:
        try:
            await TodoServiceStub(ch).CreateTodo(todo_pb2.CreateTodoRequest(text="x"))
            raise AssertionError("RPC with a wrong token succeeded")
        except GRPCError as exc:
            check(exc.status is Status.UNAVAILABLE, f"status {exc.status}")
            check("wrong-token" not in (exc.message or ""), "token leaked into the error")
            messages.append(exc.message)
    return {"messages": messages}


async def age_stats() -> dict[str, float]:
    """The age bridge's tunnel counters, once it has no tunnel open (the driver waits)."""
    return dict(json.loads(await signal("age_stats")))


async def scenario_tunnel_ages() -> Result:
    """A bidirectional stream stays open across several tunnel ages (the bridge's
    ``max_tunnel_age``) while unary calls run without pause: no RPC fails, new RPCs move to
    a new tunnel after each GOAWAY, and the client closes every retired tunnel with 1000
    once its last RPC is done (the test checks the bridge's close codes)."""
    ages = 3
    before = await age_stats()
    async with channel(CONFIG["bridge_age"]) as ch:
        stub = TodoServiceStub(ch)
        todo = await stub.CreateTodo(todo_pb2.CreateTodoRequest(text="aged"))
        stop = asyncio.Event()
        counts = {"unary": 0, "bidi": 0}
        tag = f"{CONFIG['impl']}-{random.random()}"

        async def unary_forever() -> None:
            while not stop.is_set():
                reply = await stub.UpdateTodo(
                    todo_pb2.UpdateTodoRequest(id=todo.id, text=f"u{counts['unary']}"),
                    timeout=timing(30))
                check(reply.id == todo.id, f"update replied {reply}")
                counts["unary"] += 1

        async def bidi() -> None:
            async with stub.SyncTodos.open(timeout=timing(60)) as stream:
                while not stop.is_set():
                    text = f"age {tag} {counts['bidi']}"
                    await stream.send_message(todo_pb2.SyncRequest(
                        create=todo_pb2.CreateTodoRequest(text=text)))
                    while True:  # the change feed: wait for our own todo
                        reply = await stream.recv_message()
                        check(reply is not None, "the stream ended early")
                        if reply.WhichOneof("event") == "todo" and reply.todo.text == text:
                            break
                    counts["bidi"] += 1
                await stream.end()
                async for _ in stream:
                    pass

        tasks = [asyncio.create_task(unary_forever()), asyncio.create_task(bidi())]
        try:
            # One new tunnel per GOAWAY: the first plus one per age.
            await until(lambda: ch.connections_opened > ages
                        or any(task.done() for task in tasks), 30)
            for task in tasks:
                check(not task.done(), f"an RPC ended: {task}")
            rounds = counts["bidi"]
            await until(lambda: counts["bidi"] > rounds + 1
                        or any(task.done() for task in tasks), 30)
        finally:
            stop.set()
            await asyncio.gather(*tasks)  # raises what failed, if anything did
        opened = ch.connections_opened
    after = await age_stats()
    return {"connections_opened": opened, "unary_calls": counts["unary"],
            "bidi_rounds": counts["bidi"],
            "bridge": {key: after[key] - before[key] for key in after}}


async def scenario_targets() -> Result:
    page = ("https:", "app.example:8443")
    check(resolve_target("", page).url == "wss://app.example:8443/", "'' on https page")
    check(resolve_target("/grpc", page).url == "wss://app.example:8443/grpc", "/grpc on https")
    check(resolve_target("/grpc", ("http:", "h")).url == "ws://h/grpc", "/grpc on http")
    check(resolve_target("ws://other:81/x?y=1", page).url == "ws://other:81/x?y=1", "explicit")
    check(resolve_target("/g", page).authority == "app.example:8443", "authority")
    for relative in ("", "/grpc"):
        try:
            Channel(relative)
            raise AssertionError("relative target accepted without a page location")
        except TargetError as exc:
            check("full URL" in str(exc), f"message {exc}")
    ch = Channel("ws://127.0.0.1:9/grpc?x=1")
    check(ch._authority == "127.0.0.1:9", f"authority {ch._authority}")
    ch.close()
    # A page at http://<bridge host>/ reaches "/grpc" on its own host.
    location = js.Object.new()
    location.protocol = "http:"
    location.host = CONFIG["bridge_authority"]
    js.globalThis.location = location
    try:
        async with Channel("/grpc") as ch:
            check(ch.target == f"ws://{CONFIG['bridge_authority']}/grpc", f"target {ch.target}")
            todo = await TodoServiceStub(ch).CreateTodo(todo_pb2.CreateTodoRequest(text="page"))
            check(todo.text == "page", "RPC through a page-relative target")
    finally:
        js.Reflect.deleteProperty(js.globalThis, "location")
    try:
        Channel("ws://h/grpc", bearer_token="a/b=", token_in="subprotocol")
        raise AssertionError("token with '/' accepted as a subprotocol")
    except ValueError as exc:
        check("a/b=" not in str(exc), "token in the error message")
    # One option name for both channels: the old one points to the new one.
    try:
        Channel("ws://h/grpc", open_timeout=1)
        raise AssertionError("open_timeout accepted")
    except TypeError as exc:
        check("handshake_timeout" in str(exc), f"message {exc}")
    return {}


async def scenario_dead_target() -> Result:
    policy = ReconnectPolicy(initial_delay=0.0, max_delay=0.0)
    had_navigator = "navigator" in js.Object.keys(js.globalThis)
    if not had_navigator:  # Node 20: a browser-like navigator, offline
        navigator = js.Object.new()
        navigator.onLine = False
        js.globalThis.navigator = navigator
    try:
        async with channel(CONFIG["dead"], reconnect=policy, handshake_timeout=5) as ch:
            started = time.perf_counter()
            try:
                await TodoServiceStub(ch).ListTodos(todo_pb2.ListTodosRequest())
                raise AssertionError("RPC to a dead target succeeded")
            except GRPCError as exc:
                check(exc.status is Status.UNAVAILABLE and "1006" in (exc.message or ""),
                      f"dead target: {exc.status} {exc.message!r}")
                message = exc.message or ""
            check(time.perf_counter() - started < 5, "dead target took too long")
    finally:
        if not had_navigator:
            js.Reflect.deleteProperty(js.globalThis, "navigator")
    if not had_navigator:
        check("navigator.onLine=false" in message, f"navigator.onLine missing: {message!r}")
    return {"message": message}


async def scenario_no_leaks() -> Result:
    await asyncio.sleep(0.1)
    check(WebSocketTransport.live_proxies == 0,
          f"{WebSocketTransport.live_proxies} Pyodide proxies still alive")
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    return {"live_proxies": WebSocketTransport.live_proxies, "tasks": len(pending),
            "loop_errors": list(LOOP_ERRORS), "heap_bytes": heap_bytes()}


SCENARIOS: dict[str, Callable[[], Awaitable[Result]]] = {
    "targets": scenario_targets,
    "unary": scenario_unary,
    "errors": scenario_errors,
    "server_streaming": scenario_server_streaming,
    "client_streaming": scenario_client_streaming,
    "bidi": scenario_bidi,
    "concurrent": scenario_concurrent,
    "bulk": scenario_bulk,
    "backpressure": scenario_backpressure,
    "coalescing": scenario_coalescing,
    "frame_size": scenario_frame_size,
    "outbound_cap": scenario_outbound_cap,
    "early_bytes": scenario_early_bytes,
    "inbound_cap": scenario_inbound_cap,
    "text_message": scenario_text_message,
    "complete_before_close_forced": scenario_complete_before_close_forced,
    "complete_before_close_relay": scenario_complete_before_close_relay,
    "close_races": scenario_close_races,
    "send_after_close": scenario_send_after_close,
    "server_close_midstream": scenario_server_close_midstream,
    "reconnect": scenario_reconnect,
    "tunnel_ages": scenario_tunnel_ages,
    "auth": scenario_auth,
    "dead_target": scenario_dead_target,
    "no_leaks": scenario_no_leaks,
}


#: Scenarios run only with the first WebSocket implementation (they change shared state).
FIRST_ONLY = {"server_close_midstream", "targets"}


async def main() -> str:
    CONFIG.update(json.loads(str(js.grpcbridgeHarness.config)))
    loop = asyncio.get_running_loop()

    def on_error(_loop: Any, context: dict[str, Any]) -> None:
        LOOP_ERRORS.append(f"{context.get('message')}: {context.get('exception')!r}")

    loop.set_exception_handler(on_error)
    only = set(CONFIG.get("only") or SCENARIOS)
    implementations = ["ws"]
    if not is_null(js.NativeWebSocket) and CONFIG.get("native", True):
        implementations.append("native")
    results: dict[str, Result] = {}
    for impl in implementations:
        CONFIG["impl"] = impl
        js.globalThis.WebSocket = js.WsWebSocket if impl == "ws" else js.NativeWebSocket
        for name, scenario in SCENARIOS.items():
            if name not in only or (impl != "ws" and name in FIRST_ONLY):
                continue
            started = time.perf_counter()
            errors_before = len(LOOP_ERRORS)
            try:
                result = await asyncio.wait_for(scenario(),
                                                timing(CONFIG.get("scenario_timeout", 60)))
                result["ok"] = True
            except BaseException as exc:
                result = {"ok": False, "error": "".join(traceback.format_exception(exc))}
            result["seconds"] = time.perf_counter() - started
            result["loop_errors"] = LOOP_ERRORS[errors_before:]
            results[name if impl == "ws" else f"{impl}:{name}"] = result
    return json.dumps(results)
