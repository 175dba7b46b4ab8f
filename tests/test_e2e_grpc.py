"""End to end: grpcio clients -> `grpcbridge forward` -> `grpcbridge serve` -> grpcio server.

Every part is real: the Todo service (grpcio, the test oracle of tests/todo_oracle.py, in this
process or a subprocess), the bridge and the forwarder as CLI subprocesses, and sync grpcio
channels to the forwarder's port.
The module-scoped bridge + forwarder are reused by the tests that only make calls; tests
that need their own processes start them (and run under ``leak_check``).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import rpc_checks
from rpc_checks import CALL_TIMEOUT, Requests, Stub, create_request
from todo_oracle import OracleServicer, serve
from todo_oracle import process as oracle_process

from grpcbridge.demo import todo_pb2

from support import (
    GRPC_OPTIONS,
    MiB,
    Process,
    cli,
    free_port,
    start_cli,
    tls_files,
    wait_until,
)

# --------------------------------------------------------------------------- helpers


def _count(process: Process, event: str) -> int:
    regex = re.compile(rf"\b{event}\b")
    return sum(1 for line in list(process.lines) if regex.search(line))


def _stop_promptly(process: Process) -> None:
    """Stop a CLI process that holds no open tunnel any more: it must exit 0 at once,
    without sitting out close-handshake timeouts for tunnels that already ended."""
    started = time.monotonic()
    assert process.stop() == 0, process.output()
    took = time.monotonic() - started
    assert took < 2.5, f"stopping took {took:.1f} s; finished tunnels were waited for"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# -------------------------------------------------------------------------- fixtures


def _start_every_worker(port: int, workers: int = 64) -> None:
    """Make the server start all of its ``workers`` (the default of ``serve``) now.

    grpcio's thread pool starts workers lazily; ``leak_check`` compares thread names, so a
    worker first needed during a test would look like a leaked thread. ``workers`` calls
    that each hold a worker for a moment, all at once, start them all.
    """
    with grpc.insecure_channel(f"127.0.0.1:{port}") as direct:
        stub = Stub(direct)
        seed = stub.CreateTodo(todo_pb2.CreateTodoRequest(text="warm-up"), timeout=CALL_TIMEOUT)
        calls = [stub.StreamTodos(todo_pb2.StreamTodosRequest(repeat=2, interval_ms=300),
                                  timeout=CALL_TIMEOUT) for _ in range(workers)]
        assert all(len(list(call)) == 2 for call in calls)
        stub.DeleteTodo(todo_pb2.DeleteTodoRequest(id=seed.id), timeout=CALL_TIMEOUT)


@pytest.fixture(scope="module")
def backend() -> Iterator[tuple[OracleServicer, int]]:
    server, servicer, port = serve("127.0.0.1:0")
    try:
        _start_every_worker(port)
        yield servicer, port
    finally:
        server.stop(grace=None).wait()
        servicer.store.close()


@pytest.fixture(scope="module")
def servicer(backend: tuple[OracleServicer, int]) -> OracleServicer:
    return backend[0]


@pytest.fixture(scope="module")
def bridge(backend: tuple[OracleServicer, int]) -> Iterator[Process]:
    process = start_cli([
        "serve", "--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{backend[1]}",
        "--max-upgrades-per-minute", "0", "--max-connections-per-client", "0",
    ], outlives_test=True)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def forwarder(bridge: Process) -> Iterator[Process]:
    process = start_cli(["forward", "--listen", "127.0.0.1:0", "--target", bridge.url],
                        outlives_test=True)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def channel(forwarder: Process) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(forwarder.listen, options=GRPC_OPTIONS) as ch:
        # Connected before any test starts, so leak_check does not count its socket.
        grpc.channel_ready_future(ch).result(timeout=CALL_TIMEOUT)
        yield ch


@pytest.fixture
def stub(channel: grpc.Channel) -> Stub:
    return Stub(channel)


# ------------------------------------------------------------ 1. the four RPC kinds


def test_unary_calls(stub: Stub) -> None:
    rpc_checks.unary_calls(stub)


def test_server_streaming(stub: Stub) -> None:
    rpc_checks.server_streaming(stub)


def test_client_streaming(stub: Stub) -> None:
    rpc_checks.client_streaming(stub)


def test_bidi_streaming(stub: Stub) -> None:
    rpc_checks.bidi_streaming(stub)


# ------------------------------------------------------------ 2. metadata, trailers


def test_metadata_echo_and_trailers(stub: Stub) -> None:
    blob = bytes(range(256)) + b"\x00\r\n"
    metadata = (
        ("x-echo-greeting", "hello tunnel"),
        ("x-echo-blob-bin", blob),
        ("x-not-echoed", "private"),
    )
    todo, call = stub.CreateTodo.with_call(
        todo_pb2.CreateTodoRequest(text="with metadata"), metadata=metadata,
        timeout=CALL_TIMEOUT)
    assert todo.text == "with metadata"

    initial = dict(call.initial_metadata())
    assert initial["x-echo-greeting"] == "hello tunnel"
    assert initial["x-echo-blob-bin"] == blob
    assert "x-not-echoed" not in initial

    trailing = list(call.trailing_metadata())
    assert ("x-trailer-rpc", "CreateTodo") in trailing
    assert ("x-echo-greeting", "hello tunnel") in trailing
    assert ("x-echo-blob-bin", blob) in trailing
    assert "x-not-echoed" not in dict(trailing)

    # The same on a server-streaming call, whose initial metadata precedes the messages.
    stream = stub.StreamTodos(todo_pb2.StreamTodosRequest(repeat=1), metadata=metadata,
                              timeout=CALL_TIMEOUT)
    assert dict(stream.initial_metadata())["x-echo-blob-bin"] == blob
    assert list(stream)
    assert ("x-trailer-rpc", "StreamTodos") in stream.trailing_metadata()
    assert ("x-echo-blob-bin", blob) in stream.trailing_metadata()


# --------------------------------------------------------------- 3. status codes


@pytest.mark.parametrize(
    ("text", "code", "details"),
    [
        ("fail:NOT_FOUND:nö such tödo ✓", grpc.StatusCode.NOT_FOUND, "nö such tödo ✓"),
        ("fail:PERMISSION_DENIED:100% 🚫: ask ☃ at ops@例え.jp",
         grpc.StatusCode.PERMISSION_DENIED, "100% 🚫: ask ☃ at ops@例え.jp"),
        ("fail:FAILED_PRECONDITION:plain ascii", grpc.StatusCode.FAILED_PRECONDITION,
         "plain ascii"),
        ("", grpc.StatusCode.INVALID_ARGUMENT, "text must not be empty"),
        ("fail:NO_SUCH_CODE:x", grpc.StatusCode.INVALID_ARGUMENT,
         "unknown status code 'NO_SUCH_CODE'"),
    ],
    ids=["not-found-non-ascii", "permission-denied-emoji", "failed-precondition",
         "invalid-argument-empty", "invalid-argument-unknown-code"],
)
def test_status_codes_and_messages(
    stub: Stub, text: str, code: grpc.StatusCode, details: str
) -> None:
    with pytest.raises(grpc.RpcError) as failure:
        stub.CreateTodo(todo_pb2.CreateTodoRequest(text=text),
                        metadata=(("x-echo-case", "error"),), timeout=CALL_TIMEOUT)
    error = failure.value
    assert error.code() == code
    assert error.details() == details
    assert ("x-trailer-rpc", "CreateTodo") in error.trailing_metadata()
    assert ("x-echo-case", "error") in error.trailing_metadata()


# ------------------------------------------------------ 4./5. deadlines, cancellation


def test_deadline_exceeded_reaches_the_server(stub: Stub, servicer: OracleServicer) -> None:
    stub.CreateTodo(todo_pb2.CreateTodoRequest(text="deadline seed"), timeout=CALL_TIMEOUT)
    before = servicer.cancelled_count
    call = stub.StreamTodos(todo_pb2.StreamTodosRequest(repeat=1_000_000, interval_ms=50),
                            timeout=1.0)
    received = 0
    with pytest.raises(grpc.RpcError) as failure:
        for _ in call:
            received += 1
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert received >= 1
    wait_until(lambda: servicer.cancelled_count >= before + 1, 10,
               message="handler did not see the deadline")


def test_client_cancellation_reaches_the_server(stub: Stub, servicer: OracleServicer) -> None:
    stub.CreateTodo(todo_pb2.CreateTodoRequest(text="cancel seed"), timeout=CALL_TIMEOUT)
    before = servicer.cancelled_count
    call = stub.StreamTodos(todo_pb2.StreamTodosRequest(repeat=1_000_000, interval_ms=20),
                            timeout=CALL_TIMEOUT)
    assert next(call).id
    assert next(call).id
    assert call.cancel()
    with pytest.raises(grpc.RpcError) as failure:
        for _ in call:
            pass
    assert failure.value.code() == grpc.StatusCode.CANCELLED
    wait_until(lambda: servicer.cancelled_count >= before + 1, 10,
               message="handler did not see the cancel")


# ------------------------------------------------------------------ 6. big messages


def test_16_mib_messages_both_directions(stub: Stub) -> None:
    size = 16 * MiB - 1024  # room for the protobuf and gRPC framing
    text = os.urandom(size // 2).hex()
    assert len(text) == size
    created = stub.CreateTodo(todo_pb2.CreateTodoRequest(text=text), timeout=60)
    try:
        assert created.ByteSize() > 16 * MiB - 1024
        assert len(created.text) == size
        assert _sha256(created.text) == _sha256(text)

        # Server -> client again, this time read back from the store.
        listed = stub.ListTodos(todo_pb2.ListTodosRequest(), timeout=60).todos
        (stored,) = [todo for todo in listed if todo.id == created.id]
        assert _sha256(stored.text) == _sha256(text)
    finally:
        stub.DeleteTodo(todo_pb2.DeleteTodoRequest(id=created.id), timeout=CALL_TIMEOUT)


# ------------------------------------------------------------------- 7./8. load


def test_200_concurrent_rpcs_on_one_channel(stub: Stub, bridge: Process) -> None:
    tunnels_before = _count(bridge, "upgrade_accepted")
    futures = [
        stub.CreateTodo.future(todo_pb2.CreateTodoRequest(text=f"concurrent-{i}"),
                               timeout=CALL_TIMEOUT)
        for i in range(200)
    ]
    results = [future.result() for future in futures]
    assert [todo.text for todo in results] == [f"concurrent-{i}" for i in range(200)]
    assert len({todo.id for todo in results}) == 200
    # One channel, one HTTP/2 connection: all 200 calls shared (at most) one new tunnel.
    assert _count(bridge, "upgrade_accepted") - tunnels_before <= 1


def test_20_channels_at_once(forwarder: Process, bridge: Process) -> None:
    accepted_before = _count(bridge, "upgrade_accepted")
    opened_before = _count(forwarder, "tunnel_opened")
    # A local subchannel pool gives every channel its own connection, hence its own tunnel.
    options = [*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.insecure_channel(forwarder.listen, options=options) for _ in range(20)]

    def work(index: int, channel: grpc.Channel) -> list[str]:
        stub = Stub(channel)
        creates = [
            stub.CreateTodo.future(todo_pb2.CreateTodoRequest(text=f"chan-{index}-{k}"),
                                   timeout=CALL_TIMEOUT)
            for k in range(3)
        ]
        bulk = stub.BulkCreateTodos.future(
            iter([todo_pb2.CreateTodoRequest(text=f"chan-{index}-bulk-{k}") for k in range(3)]),
            timeout=CALL_TIMEOUT)
        streamed = stub.StreamTodos(todo_pb2.StreamTodosRequest(repeat=1), timeout=CALL_TIMEOUT)
        created = [future.result() for future in creates]
        assert bulk.result().created_count == 3
        assert len(list(streamed)) > 0
        listed = {t.id for t in stub.ListTodos(todo_pb2.ListTodosRequest(),
                                               timeout=CALL_TIMEOUT).todos}
        assert {todo.id for todo in created} <= listed
        return [todo.text for todo in created]

    try:
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT)
        with ThreadPoolExecutor(max_workers=20) as pool:
            results = list(pool.map(work, range(20), channels))
    finally:
        for channel in channels:
            channel.close()
    assert results == [[f"chan-{i}-{k}" for k in range(3)] for i in range(20)]
    wait_until(lambda: _count(bridge, "upgrade_accepted") - accepted_before >= 20)
    wait_until(lambda: _count(forwarder, "tunnel_opened") - opened_before >= 20)


# ------------------------------------------------------- 9. backend killed mid-stream


def _unread_bytes(port: int) -> int | None:
    """Bytes waiting unread in the receive queues of connections accepted on ``port``
    (from /proc/net/tcp{,6}: grpcio listens on a dual-stack socket; None without /proc)."""
    rows: list[str] = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as table:
                rows += table.read().splitlines()[1:]
        except OSError:
            pass
    if not rows:
        return None
    total = 0
    for row in rows:
        fields = row.split()
        local, state, queues = fields[1], fields[3], fields[4]
        if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
            total += int(queues.split(":")[1], 16)
    return total


def test_backend_killed_mid_stream(leak_check: None, stub: Stub, bridge: Process) -> None:
    with (oracle_process() as (popen, port),
          cli(["serve", "--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{port}"]) as b2,
          cli(["forward", "--listen", "127.0.0.1:0", "--target", b2.url]) as f2,
          grpc.insecure_channel(f2.listen, options=GRPC_OPTIONS) as doomed):
        doomed_stub = Stub(doomed)
        for text in ("one", "two"):
            doomed_stub.CreateTodo(todo_pb2.CreateTodoRequest(text=text),
                                   timeout=CALL_TIMEOUT)
        call = doomed_stub.StreamTodos(
            todo_pb2.StreamTodosRequest(repeat=1_000_000, interval_ms=20), timeout=60)
        assert next(call).text == "one"
        assert next(call).text == "two"

        # Crash the backend like a hung process that gets killed: stopped, with a
        # request it never read. The kernel then resets the connection instead of
        # closing it in order (a clean FIN is a normal close, logged as 1000).
        popen.send_signal(signal.SIGSTOP)
        unread = doomed_stub.ListTodos.future(todo_pb2.ListTodosRequest(), timeout=60)
        visible = _unread_bytes(port) is not None  # Linux: wait until it is queued
        wait_until(lambda: not visible or (_unread_bytes(port) or 0) > 0)
        popen.kill()
        popen.wait(10)
        killed_at = time.monotonic()
        with pytest.raises(grpc.RpcError) as failure:
            for _ in call:
                pass
        took = time.monotonic() - killed_at
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert took < 5, f"the client learned of the dead backend only after {took:.1f} s"
        with pytest.raises(grpc.RpcError) as pending:
            unread.result()
        assert pending.value.code() == grpc.StatusCode.UNAVAILABLE

        # The other bridge and its backend are unaffected.
        alive = stub.CreateTodo(todo_pb2.CreateTodoRequest(text="still alive"),
                                timeout=CALL_TIMEOUT)
        assert alive.text == "still alive"
        assert alive in list(stub.StreamTodos(todo_pb2.StreamTodosRequest(repeat=1),
                                              timeout=CALL_TIMEOUT))

        line = b2.wait_for_line(r"\btunnel_closed\b")  # the first one is the killed one
        if visible:
            assert "code=1011" in line, line
            assert 'reason="backend connection lost"' in line, line


# ---------------------------------------------------------------------------- 10. TLS


def test_tls_bridge_and_forwarder(
    leak_check: None, tmp_path: Path, backend: tuple[OracleServicer, int]
) -> None:
    ca_pem, cert_pem, key_pem = tls_files(tmp_path)

    with cli(["serve", "--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{backend[1]}",
              "--certfile", str(cert_pem), "--keyfile", str(key_pem)]) as secure_bridge:
        assert secure_bridge.url.startswith("wss://")
        target = f"wss://localhost:{secure_bridge.port}/grpc"

        with cli(["forward", "--listen", "127.0.0.1:0", "--target", target, "--tls",
                  "--cacert", str(ca_pem)]) as trusting:
            with grpc.insecure_channel(trusting.listen, options=GRPC_OPTIONS) as channel:
                todo = Stub(channel).CreateTodo(todo_pb2.CreateTodoRequest(text="över TLS"),
                                                timeout=CALL_TIMEOUT)
                assert todo.text == "över TLS"
                trusting.wait_for_line(r"\btunnel_opened\b")
            _stop_promptly(trusting)
        secure_bridge.wait_for_line(r"\bupgrade_accepted\b")

        with cli(["forward", "--listen", "127.0.0.1:0", "--target", target]) as untrusting, \
                grpc.insecure_channel(untrusting.listen, options=GRPC_OPTIONS) as channel:
            with pytest.raises(grpc.RpcError) as failure:
                Stub(channel).CreateTodo(todo_pb2.CreateTodoRequest(text="unverified"),
                                         timeout=CALL_TIMEOUT)
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
            line = untrusting.wait_for_line(r"\btunnel_dial_failed\b")
            assert re.search(r"certificate", line, re.IGNORECASE), line
        assert _count(secure_bridge, "upgrade_accepted") == 1
    assert "Traceback" not in secure_bridge.output()


# -------------------------------------------------------------------- 11. drain


def test_sigterm_drains_then_closes_with_1001(
    leak_check: None, backend: tuple[OracleServicer, int]
) -> None:
    with cli(["serve", "--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{backend[1]}",
              "--drain-timeout", "1"]) as draining, \
            cli(["forward", "--listen", "127.0.0.1:0", "--target", draining.url]) as fwd, \
            grpc.insecure_channel(fwd.listen, options=GRPC_OPTIONS) as channel:
        requests = Requests()
        call = Stub(channel).SyncTodos(iter(requests), timeout=CALL_TIMEOUT)
        try:
            requests.send(create_request("open during drain"))
            assert next(call).todo.text == "open during drain"
            draining.wait_for_line(r"\btunnel_opened\b")

            started = time.monotonic()
            returncode = draining.stop(signal.SIGTERM, timeout=15)
            took = time.monotonic() - started
            assert returncode == 0, draining.output()
            assert took < 5, f"bridge took {took:.1f} s to stop"

            with pytest.raises(grpc.RpcError) as failure:
                for _ in call:
                    pass
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            requests.close()
        channel.close()
        _stop_promptly(fwd)
    output = draining.output()
    assert re.search(r"\bbridge_draining\b.*tunnels=1", output), output
    assert re.search(r"\btunnel_closed\b.*code=1001", output), output
    assert re.search(r"\bbridge_stopped\b", output), output
    assert "Traceback" not in output


# ------------------------------------------------------------------- 12. dead target


def test_forwarder_with_dead_target_fails_fast(leak_check: None) -> None:
    target = f"ws://127.0.0.1:{free_port()}/grpc"
    with cli(["forward", "--listen", "127.0.0.1:0", "--target", target]) as fwd, \
            grpc.insecure_channel(fwd.listen, options=GRPC_OPTIONS) as channel:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as failure:
            Stub(channel).CreateTodo(todo_pb2.CreateTodoRequest(text="nobody home"),
                                     timeout=CALL_TIMEOUT, wait_for_ready=False)
        took = time.monotonic() - started
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert took < 5, f"the call failed only after {took:.1f} s"
        line = fwd.wait_for_line(r"\btunnel_dial_failed\b")
        assert target in line, line
    assert "Traceback" not in fwd.output()
