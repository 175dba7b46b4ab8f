"""Hostile clients and backends against a real ``grpcbridge serve`` subprocess.

Regression tests for defects found by abusing the bridge: a stalled backend pinning tunnels
whose clients left, floods of empty/control frames starving other tunnels, pipelined and
unparseable HTTP requests, a backend reset in the middle of an upload, memory pinned by
incomplete messages, requests pinned behind a slow auth hook (an in-process Bridge,
whose hook the test holds); and a soak of all of them at once (``-k soak``; its length from
GRPCBRIDGE_SOAK_SECONDS, default 60). Time bounds scale with GRPCBRIDGE_TEST_TIMING.

Clients are raw sockets: frames come from websockets' sans-I/O code (hostile.py), floods
from a separate process so its CPU use does not distort what is measured here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import random
import re
import signal
import socket
import struct
import time
from collections import Counter

import grpc
import psutil
import pytest
from hostile import (
    MEASURE_ENV,
    SOAK_SECONDS,
    RawWebSocket,
    ScriptedBackend,
    abuse_idle,
    abuse_pipelining,
    abuse_resets,
    abuse_slowloris,
    abuse_trickle,
    binary_frame,
    crash_lines,
    flooder_report,
    flooding,
    incomplete_frame,
    log_count,
    raw_exchange,
    statuses,
    upgrade_status,
)

import grpcbridge
from grpcbridge.demo import todo_pb2, todo_pb2_grpc
from grpcbridge.demo.todo_grpc import TodoServiceStub

from support import MiB, Process, cli, eventually, serve_args, start_cli, timing, wait_until

LOOPS = ["uvloop", "asyncio"]


async def stop_bridge(bridge: Process, within: float = 30.0) -> float:
    """SIGTERM the bridge (the test's loop keeps running meanwhile), wait until its stderr is
    fully read; the seconds it took to exit."""
    started = time.monotonic()
    await asyncio.to_thread(bridge.stop, signal.SIGTERM, within)
    seconds = time.monotonic() - started
    wait_until(lambda: bridge.popen.stderr is None or bridge.popen.stderr.closed, 5)
    return seconds


def tail(bridge: Process, lines: int = 30) -> str:
    return "\n".join(bridge.lines[-lines:])


# ------------------------------------------------- (1) stalled backend, client gone

STUCK_MESSAGE = 16 * MiB


@pytest.mark.parametrize("ending", ["close", "reset"])
@pytest.mark.parametrize("loop", LOOPS)
async def test_stalled_backend_tunnel_is_freed_when_its_client_leaves(
        loop: str, ending: str, leak_check: None) -> None:
    """The backend accepts and never reads: the bridge's write buffer fills, it stops
    reading the client, the client's writes block; then the client closes its socket. The
    bridge must notice within seconds (tunnel_closed) and free the client's slot."""
    message = binary_frame(os.urandom(STUCK_MESSAGE))
    async with ScriptedBackend("stuck") as backend:
        with cli(serve_args(backend.address, "--max-connections-per-client", "1", loop=loop)
                 ) as bridge:
            ws = await RawWebSocket.connect(bridge.url, source="127.0.0.2")
            pushed = await ws.push_until_blocked(message)
            await (ws.close() if ending == "close" else ws.abort())
            started = time.monotonic()
            freed = await eventually(
                lambda: log_count(bridge.lines, "tunnel_closed", client="127.0.0.2") == 1,
                5, interval=0.05, fail=False)
            seconds = time.monotonic() - started
            status = await upgrade_status(bridge.url, source="127.0.0.2")
            await stop_bridge(bridge)
            print(f"\npushed {pushed / MiB:.1f} MiB before blocking; tunnel_closed "
                  f"{f'after {seconds:.2f} s' if freed else 'only at shutdown'}; "
                  f"new upgrade from the same address: {status}")
            assert freed and status == 101, (
                f"client left ({ending}) after pushing {pushed / MiB:.1f} MiB: tunnel_closed "
                f"within {timing(5):.0f} s: {freed}; next upgrade from the same address got "
                f"{status} (want 101)\n{tail(bridge)}")
            assert not crash_lines(bridge.lines), tail(bridge, 60)


@pytest.mark.parametrize("loop", LOOPS)
async def test_stalled_backend_20_tunnels_release_their_memory(
        loop: str, leak_check: None) -> None:
    """20 clients (20 addresses, so no per-client limit steps in) each push 16 MiB
    messages into a backend that never reads, until blocked, then leave. Every tunnel is
    closed within seconds and the bridge's RSS comes back near its baseline."""
    message = binary_frame(os.urandom(STUCK_MESSAGE))
    sources = [f"127.0.1.{i}" for i in range(1, 21)]
    async with ScriptedBackend("stuck") as backend:
        with cli(serve_args(backend.address, loop=loop), env=MEASURE_ENV) as bridge:
            # Warm-up: one small message and a clean close, then the baseline.
            ws = await RawWebSocket.connect(bridge.url)
            await ws.send(binary_frame(b"x" * 1000))
            await ws.abort()
            await eventually(lambda: log_count(bridge.lines, "tunnel_closed") == 1, 5,
                             interval=0.05)
            await asyncio.sleep(0.3)
            baseline = bridge.rss()
            gate = asyncio.Semaphore(5)

            async def one(source: str) -> int:
                async with gate:
                    client = await RawWebSocket.connect(bridge.url, source=source)
                    try:
                        return await client.push_until_blocked(message, stall=0.7)
                    finally:
                        await client.close()

            pushed = sum(await asyncio.gather(*(one(source) for source in sources)))
            peak = bridge.rss()

            def closed() -> int:
                return sum(log_count(bridge.lines, "tunnel_closed", client=s) for s in sources)

            all_closed = await eventually(lambda: closed() == len(sources), 5, interval=0.05,
                                          fail=False)
            released = await eventually(lambda: bridge.rss() - baseline <= 32 * MiB,
                                        5, interval=0.2, fail=False)
            rss = bridge.rss()
            n_closed = closed()
            after_gc = ""
            if not released:
                # Diagnosis: 300 more upgrades make the bridge's GC run; if RSS drops then,
                # dead tunnels were kept by reference cycles, not leaked for good.
                for _ in range(300):
                    await upgrade_status(bridge.url)
                await asyncio.sleep(0.5)
                after_gc = (f"; after 300 more upgrades (GC passes) "
                            f"+{(bridge.rss() - baseline) / MiB:.0f} MiB")
            await stop_bridge(bridge)
            print(f"\npushed {pushed / MiB:.0f} MiB in 20 tunnels; bridge RSS baseline "
                  f"{baseline / MiB:.0f} MiB, after the pushes +{(peak - baseline) / MiB:.0f}, "
                  f"after the clients left +{(rss - baseline) / MiB:.0f}; {n_closed}/20 "
                  f"tunnel_closed before shutdown")
            assert all_closed and released, (
                f"{n_closed}/20 tunnels closed within {timing(5):.0f} s of their clients "
                f"leaving; bridge RSS +{(rss - baseline) / MiB:.0f} MiB over its baseline "
                f"(allowed +32) after {pushed / MiB:.0f} MiB were pushed{after_gc}")
            assert not crash_lines(bridge.lines), tail(bridge, 60)


@pytest.mark.parametrize("client", ["connected", "gone"])
@pytest.mark.parametrize("loop", LOOPS)
async def test_sigterm_with_a_stalled_tunnel_exits_within_drain_timeout(
        loop: str, client: str, leak_check: None) -> None:
    """SIGTERM while a tunnel is stuck behind a backend that never reads (its client still
    connected but blocked, or gone): the bridge exits within --drain-timeout + the 2 s
    closing handshake + slack."""
    drain = 1.0
    message = binary_frame(os.urandom(STUCK_MESSAGE))
    async with ScriptedBackend("stuck") as backend:
        with cli(serve_args(backend.address, "--drain-timeout", str(drain), loop=loop)) as bridge:
            ws = await RawWebSocket.connect(bridge.url, source="127.0.0.2")
            try:
                await ws.push_until_blocked(message)
                if client == "gone":
                    await ws.close()
                seconds = await stop_bridge(bridge)
            finally:
                await ws.abort()
            print(f"\nSIGTERM to exit with a stalled tunnel (client {client}): {seconds:.2f} s "
                  f"(drain timeout {drain} s)")
            assert bridge.popen.returncode == 0, tail(bridge)
            assert seconds <= drain + 2 + timing(1.5), f"exit took {seconds:.2f} s"
            assert not crash_lines(bridge.lines), tail(bridge, 60)


# ------------------------------------------------------------- (2) starvation

FLOOD_SECONDS = 8.0


async def new_tunnel_call(url: str) -> float:
    """Seconds to open a new tunnel and finish a unary call through it (capped)."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(timing(5)):
            async with grpcbridge.Channel(url) as channel:
                reply = await TodoServiceStub(channel).ListTodos(todo_pb2.ListTodosRequest())
                assert isinstance(reply, todo_pb2.ListTodosResponse)
    except TimeoutError:
        pass
    return time.monotonic() - started


@pytest.mark.parametrize(("loop", "kind"), [("uvloop", "empty"), ("uvloop", "ping"),
                                            ("asyncio", "empty")])
async def test_frame_flood_does_not_starve_other_tunnels(
        todo_port: int, loop: str, kind: str, leak_check: None) -> None:
    """One client floods masked empty binary frames (or pings, reading the pongs) for 8 s.
    Meanwhile a new tunnel opens and answers a call within 1 s, a healthy server stream
    never pauses for more than 0.5 s, and the flooder is closed with 1008."""
    with cli(serve_args(f"127.0.0.1:{todo_port}", loop=loop)) as bridge:
        async with grpcbridge.Channel(bridge.url) as channel:
            stub = TodoServiceStub(channel)
            await stub.CreateTodo(todo_pb2.CreateTodoRequest(text="healthy"))
            async with stub.StreamTodos.open() as stream:
                await stream.send_message(
                    todo_pb2.StreamTodosRequest(repeat=1_000_000, interval_ms=20), end=True)
                assert await stream.recv_message() is not None
                opens: list[float] = []
                gaps: list[float] = []
                with flooding(bridge.url, kind, FLOOD_SECONDS, "127.0.0.2") as flooder:
                    started = time.monotonic()
                    until = started + FLOOD_SECONDS

                    async def opener() -> None:
                        for at in (1.5, 4.0, 6.5):
                            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
                            opens.append(await new_tunnel_call(bridge.url))

                    opening = asyncio.create_task(opener())
                    last = time.monotonic()
                    while (now := time.monotonic()) < until:
                        try:
                            reply = await asyncio.wait_for(stream.recv_message(),
                                                           until + 2 - now)
                        except TimeoutError:
                            gaps.append(time.monotonic() - last)
                            break
                        assert reply is not None, "the healthy stream ended"
                        now = time.monotonic()
                        gaps.append(now - last)
                        last = now
                    await opening
                    report = flooder_report(flooder, FLOOD_SECONDS + 30)
                await stream.cancel()
        await stop_bridge(bridge)
    worst_gap = max(gaps)
    worst_open = max(opens)
    print(f"\n{kind} flood on {loop}: worst stream gap {worst_gap:.3f} s, new tunnel + call "
          f"{', '.join(f'{s:.3f}' for s in opens)} s; flooder: {report.tunnels} tunnel(s), "
          f"close codes {dict(Counter(report.codes))}, {report.bytes_sent / MiB:.0f} MiB sent, "
          f"{report.pongs} pongs, first close after {report.first_close_after} s")
    problems = []
    if worst_gap > timing(0.5):
        problems.append(f"healthy stream stalled {worst_gap:.2f} s (max {timing(0.5):.2f})")
    if worst_open > timing(1.0):
        problems.append(f"new tunnel + call took {worst_open:.2f} s (max {timing(1.0):.2f})")
    if 1008 not in report.codes:
        problems.append(f"flooder never closed with 1008 (codes {report.codes[:5]})")
    assert not problems, "; ".join(problems)
    assert not crash_lines(bridge.lines), tail(bridge, 60)


# ---------------------------------------------------- (3) pipelined requests

PIPELINED = {
    "two-404": (b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 2, 404),
    "two-401": ((b"GET /grpc HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n") * 2, 401),
}


@pytest.mark.parametrize("case", list(PIPELINED))
@pytest.mark.parametrize("loop", LOOPS)
async def test_pipelined_requests_get_one_answer_then_close(
        loop: str, case: str, leak_check: None) -> None:
    """Two requests in one write: the first is answered (404 / 401 without the token), the
    connection is then closed; one upgrade_rejected, no exception in the bridge."""
    data, want = PIPELINED[case]
    with cli(serve_args("127.0.0.1:1", loop=loop), env={"GRPCBRIDGE_TOKEN": "secret"}) as bridge:
        received, closed = await raw_exchange(bridge.port, data, source="127.0.0.2")
        await asyncio.sleep(0.2)
        await stop_bridge(bridge)
    rejected = log_count(bridge.lines, "upgrade_rejected", peer="127.0.0.2")
    assert statuses(received) == [want], f"got {received[:300]!r}"
    assert closed, "the bridge left the connection open"
    assert rejected == 1, f"{rejected} upgrade_rejected lines\n{tail(bridge)}"
    assert not crash_lines(bridge.lines), tail(bridge, 60)


# ------------------------------------------------ (4) backend reset during upload


@pytest.mark.parametrize("loop", LOOPS)
async def test_backend_reset_during_upload_closes_1011_cleanly(
        loop: str, leak_check: None) -> None:
    """The backend reads 100 kB then resets the connection while the client keeps
    uploading: the client gets 1011, the bridge logs one tunnel_closed and no error."""
    message = binary_frame(os.urandom(64 * 1024))
    async with ScriptedBackend("reset", reset_after=100_000) as backend:
        with cli(serve_args(backend.address, loop=loop)) as bridge:
            ws = await RawWebSocket.connect(bridge.url, source="127.0.0.2")
            try:
                await ws.push_until_blocked(message, stall=timing(3), limit=64 * MiB)
                code = await ws.wait_closed(timing(5))
            finally:
                await ws.abort()
            assert backend.resets == 1
            await eventually(lambda: log_count(bridge.lines, "tunnel_closed") >= 1, 5,
                             interval=0.05, fail=False)
            await asyncio.sleep(0.3)
            await stop_bridge(bridge)
    closed = log_count(bridge.lines, "tunnel_closed", client="127.0.0.2")
    noise = [line for line in bridge.lines if "socket.send() raised exception" in line]
    assert code == 1011, f"client got close code {code} ({ws.close_reason!r})"
    assert closed == 1, f"{closed} tunnel_closed lines\n{tail(bridge)}"
    assert not crash_lines(bridge.lines) and not noise, (
        f"bridge stderr after the backend reset:\n{tail(bridge, 60)}")


# ------------------------------------------- (6) memory pinned by incomplete messages


async def trickle_tunnel(url: str, source: str, head: bytes, rest: bytes, seconds: float
                         ) -> RawWebSocket:
    """Send ``head`` (a frame header and most of its payload) at once, then one byte a
    second, until closed or ``seconds`` passed. The caller aborts the returned socket."""
    ws = await RawWebSocket.connect(url, source=source, reply=False)
    end = time.monotonic() + seconds
    try:
        await ws.send(head)
        i = 0
        while time.monotonic() < end and not ws.done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ws.done.wait(), min(1.0, end - time.monotonic()))
            if not ws.done.is_set() and time.monotonic() < end:
                await ws.send(rest[i:i + 1])
                i += 1
    except OSError:
        pass
    return ws


@pytest.mark.parametrize("loop", LOOPS)
async def test_incomplete_messages_from_one_client_stay_within_budget(
        loop: str, leak_check: None) -> None:
    """8 tunnels from one address each send the header of a 16 MiB message and 15 MiB of
    it, then trickle a byte a second. The 48 MiB per-client budget holds three of them:
    the others are closed with 1008 and the bridge's RSS grows by less than 64 MiB."""
    head, rest = incomplete_frame(16 * MiB, 15 * MiB)
    async with ScriptedBackend("sink") as backend:
        with cli(serve_args(backend.address, loop=loop), env=MEASURE_ENV) as bridge:
            assert await upgrade_status(bridge.url) == 101
            await asyncio.sleep(0.3)
            baseline = bridge.rss()
            tasks = [asyncio.create_task(trickle_tunnel(bridge.url, "127.0.0.2", head, rest,
                                                        timing(6)))
                     for _ in range(8)]
            peak = 0
            while not all(task.done() for task in tasks):
                peak = max(peak, bridge.rss() - baseline)
                await asyncio.sleep(0.05)
            sockets = [task.result() for task in tasks]
            codes = [ws.close_code for ws in sockets]
            for ws in sockets:
                await ws.abort()
            await stop_bridge(bridge)
    print(f"\n8 x 15 MiB incomplete messages from one address: bridge RSS peak "
          f"+{peak / MiB:.0f} MiB, close codes {codes}")
    assert 1008 in codes and peak < 64 * MiB, (
        f"bridge RSS grew by {peak / MiB:.0f} MiB (allowed 64); close codes {codes}")
    assert not crash_lines(bridge.lines), tail(bridge, 60)


@pytest.mark.parametrize("loop", LOOPS)
async def test_trickled_message_does_not_outlive_idle_timeout(
        loop: str, leak_check: None) -> None:
    """A 15 MiB partial message kept alive by one byte a second: with --idle-timeout 3 the
    bridge must not hold it much longer than that (closed within 3 x idle timeout)."""
    idle = 3.0
    head, rest = incomplete_frame(16 * MiB, 15 * MiB)
    async with ScriptedBackend("sink") as backend:
        with cli(serve_args(backend.address, "--ping-interval", "1",
                            "--idle-timeout", str(idle), loop=loop)) as bridge:
            started = time.monotonic()
            ws = await trickle_tunnel(bridge.url, "127.0.0.2", head, rest, timing(3 * idle))
            seconds = time.monotonic() - started
            try:
                closed = ws.done.is_set()
                logged = await eventually(
                    lambda: log_count(bridge.lines, "tunnel_closed", client="127.0.0.2") == 1,
                    3, interval=0.05, fail=False)
            finally:
                await ws.abort()
            await stop_bridge(bridge)
    print(f"\ntrickled partial message, idle timeout {idle} s: "
          f"{f'closed ({ws.close_code}) after {seconds:.1f} s' if closed else 'still open'}")
    assert closed and logged, (
        f"the trickled 15 MiB message kept its tunnel open for {seconds:.1f} s "
        f"(idle timeout {idle} s)\n{tail(bridge)}")
    assert not crash_lines(bridge.lines), tail(bridge, 60)


# ------------------------------------------------ (7) unparseable HTTP requests

UNPARSEABLE = {
    "garbage-request-line": b"HELLO WORLD\r\n\r\n",
    "bare-lf": (b"GET /grpc HTTP/1.1\nHost: 127.0.0.1\nUpgrade: websocket\n"
                b"Connection: Upgrade\n\n"),
    "header-without-colon": b"GET /grpc HTTP/1.1\r\nHost 127.0.0.1\r\n\r\n",
    "nul-in-header": b"GET /grpc HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Junk: a\x00b\r\n\r\n",
}


async def test_two_host_headers_get_an_answer(leak_check: None) -> None:
    """A plain GET with two Host headers (websockets' parser accepts them) is answered like
    any other request, and trusted with neither Host."""
    data = b"GET /nope HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n"
    with cli(serve_args("127.0.0.1:1", loop="asyncio")) as bridge:
        received, closed = await raw_exchange(bridge.port, data, source="127.0.0.2")
        await asyncio.sleep(0.2)
        await stop_bridge(bridge)
    assert statuses(received) == [404], f"got {received[:300]!r}"
    assert closed
    assert not crash_lines(bridge.lines), tail(bridge, 60)


@pytest.mark.parametrize("case", list(UNPARSEABLE))
@pytest.mark.parametrize("loop", LOOPS)
async def test_unparseable_request_gets_400_and_a_log_line(
        loop: str, case: str, leak_check: None) -> None:
    with cli(serve_args("127.0.0.1:1", loop=loop)) as bridge:
        received, closed = await raw_exchange(bridge.port, UNPARSEABLE[case],
                                              source="127.0.0.2")
        await asyncio.sleep(0.2)
        await stop_bridge(bridge)
    lines = [line for line in bridge.lines
             if log_count([line], "upgrade_rejected", peer="127.0.0.2")]
    assert statuses(received) == [400], f"got {received[:300]!r}"
    assert closed
    assert len(lines) == 1 and "status=400" in lines[0], f"log:\n{tail(bridge)}"
    assert re.search(r' reason=("[^"]+"|\S+)', lines[0]), lines[0]
    assert not crash_lines(bridge.lines), tail(bridge, 60)


# ------------------------------------------------------------------- soak


@pytest.mark.timeout(SOAK_SECONDS + 180)
async def test_soak_mixed_abuse(todo_port: int) -> None:
    """SOAK_SECONDS of floods, slowloris, pipelining, resets, trickles and idle half-open
    connections from 127.0.0.2-6 while a grpc.aio bidi stream (through a `grpcbridge
    forward` process) checks SHA-256 of every echoed message. Afterwards the bridge is back
    to its fds and (nearly) its RSS, and never logged a traceback."""
    # No leak_check: grpc.aio keeps a poller thread and fds per event loop.
    bridge = start_cli(serve_args(f"127.0.0.1:{todo_port}", loop="uvloop"), env=MEASURE_ENV)
    forwarder = start_cli(["forward", "--listen", "127.0.0.1:0", "--target", bridge.url])
    process = psutil.Process(bridge.pid)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{forwarder.port}", options=[
        ("grpc.max_receive_message_length", 8 * MiB)])
    stats = {"messages": 0, "integrity_errors": 0, "worst_rtt": 0.0}
    stop_healthy = asyncio.Event()

    async def healthy() -> None:
        call = todo_pb2_grpc.TodoServiceStub(channel).SyncTodos(
            timeout=SOAK_SECONDS + 120)
        rng = random.Random(7)
        while not stop_healthy.is_set():
            payload = rng.randbytes(rng.randint(1, 48 * 1024))
            text = f"{hashlib.sha256(payload).hexdigest()}:{base64.b64encode(payload).decode()}"
            sent = time.monotonic()
            await call.write(todo_pb2.SyncRequest(create=todo_pb2.CreateTodoRequest(text=text)))
            reply = await read_within(call, timing(10), stats["messages"])
            digest, _, body = reply.todo.text.partition(":")
            if hashlib.sha256(base64.b64decode(body)).hexdigest() != digest or \
                    reply.todo.text != text:
                stats["integrity_errors"] += 1
            await call.write(todo_pb2.SyncRequest(delete=todo_pb2.DeleteTodoRequest(
                id=reply.todo.id)))
            gone = await read_within(call, timing(10), stats["messages"])
            if gone.deleted_id != reply.todo.id:
                stats["integrity_errors"] += 1
            stats["worst_rtt"] = max(stats["worst_rtt"], time.monotonic() - sent)
            stats["messages"] += 1
        await call.done_writing()
        assert await call.code() is grpc.StatusCode.OK

    healthy_task = asyncio.create_task(healthy())
    try:
        await asyncio.sleep(1.5)
        assert not healthy_task.done(), healthy_task
        baseline_fds = process.num_fds()
        baseline_rss = process.memory_info().rss

        until = time.monotonic() + SOAK_SECONDS
        port, url = bridge.port, bridge.url
        with flooding(url, "empty", SOAK_SECONDS, "127.0.0.2") as empty_flood, \
                flooding(url, "ping", SOAK_SECONDS, "127.0.0.3") as ping_flood:
            tasks = [asyncio.create_task(job) for job in (
                abuse_slowloris(port, "127.0.0.4", until),
                abuse_pipelining(port, "127.0.0.5", until),
                abuse_resets(url, "127.0.0.5", until),
                abuse_trickle(url, "127.0.0.6", until, parallel=5),
                abuse_idle(url, port, "127.0.0.6", until),
                healthy_watch(healthy_task, until))]
            try:
                abusers = await asyncio.gather(*tasks)
            finally:  # a failure stops every abuser (each closes its sockets)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            floods = [flooder_report(empty_flood, 60), flooder_report(ping_flood, 60)]
        assert not healthy_task.done(), healthy_task

        # Abuse over: the bridge holds only the healthy tunnel again.
        sources = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"]

        def open_abusers() -> int:
            return sum(log_count(bridge.lines, "upgrade_accepted", client=source)
                       - log_count(bridge.lines, "tunnel_closed", client=source)
                       for source in sources)

        settled = await eventually(
            lambda: open_abusers() == 0 and process.num_fds() <= baseline_fds + 2
            and process.memory_info().rss - baseline_rss <= 32 * MiB, 20, interval=0.25,
            fail=False)
        fds, rss = process.num_fds(), process.memory_info().rss
        stop_healthy.set()
        await asyncio.wait_for(healthy_task, timing(15))
    finally:
        stop_healthy.set()
        if not healthy_task.done():
            healthy_task.cancel()
            with contextlib.suppress(BaseException):
                await healthy_task
        await channel.close()
        forwarder.stop()
        await stop_bridge(bridge)
    print(f"\nsoak {SOAK_SECONDS:.0f} s: healthy {stats['messages']} round trips, worst "
          f"{stats['worst_rtt']:.3f} s, {stats['integrity_errors']} integrity errors; "
          f"abusers {[summary(a) for a in abusers[:-1]]}; floods "
          f"{[(f.tunnels, dict(Counter(f.codes))) for f in floods]}; "
          f"bridge fds {baseline_fds} -> {fds}, RSS {baseline_rss / MiB:.0f} -> "
          f"{rss / MiB:.0f} MiB; abuser tunnels still open {open_abusers()}")
    assert stats["integrity_errors"] == 0
    assert stats["messages"] > 0
    assert settled, (f"not back to baseline: fds {baseline_fds} -> {fds}, RSS "
                     f"+{(rss - baseline_rss) / MiB:.0f} MiB, abuser tunnels open "
                     f"{open_abusers()}")
    assert not crash_lines(bridge.lines), "\n".join(crash_lines(bridge.lines)[:20])


def summary(stats: object) -> object:
    """An abuser's stats with its list of close codes counted."""
    if isinstance(stats, dict) and "codes" in stats:
        return {**stats, "codes": dict(Counter(stats["codes"]))}
    return stats


async def read_within(call: object, seconds: float, done: int) -> todo_pb2.SyncResponse:
    try:
        reply = await asyncio.wait_for(call.read(), seconds)  # type: ignore[attr-defined]
    except TimeoutError:
        raise AssertionError(f"healthy stream: no reply for {seconds:.0f} s (after {done} "
                             f"good round trips)") from None
    assert isinstance(reply, todo_pb2.SyncResponse), f"healthy stream ended: {reply!r}"
    return reply


async def healthy_watch(task: asyncio.Task[None], until: float) -> None:
    """Fail the soak at once if the healthy stream dies during the abuse."""
    while time.monotonic() < until:
        if task.done():
            task.result()
            raise AssertionError("the healthy stream ended during the abuse")
        await asyncio.sleep(0.2)


# ------------------------------------------- (8) requests held while admission runs
# In-process Bridge: the auth hook is the test's, so admission can be held open at will.


def big_upgrade(port: int, lines: int = 100) -> bytes:
    """An upgrade request of ``lines`` 8000-byte headers (about 800 KB; websockets allows
    128 of 8 KiB), up to its blank line."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET /grpc HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: grpcbridge\r\n"
            + f"X-Pad: {'a' * 8000}\r\n" * lines + "\r\n").encode()


async def send_raw(port: int, data: bytes, source: str) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((source, 0))
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, data)
    return sock


async def read_answer(sock: socket.socket) -> bytes:
    """Everything the bridge sends until it closes."""
    loop = asyncio.get_running_loop()
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await loop.sock_recv(sock, 65536):
            received += chunk
    return received


class SlowHook:
    """An async auth hook that waits until :meth:`answer` (counting calls, cancellations)."""

    def __init__(self) -> None:
        self.entered = 0
        self.cancelled = 0
        self.answer_with: grpcbridge.Rejection | None = None
        self._gate = asyncio.Event()

    async def __call__(self, request: grpcbridge.HandshakeRequest) -> grpcbridge.Rejection | None:
        self.entered += 1
        try:
            await self._gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return self.answer_with

    def answer(self, rejection: grpcbridge.Rejection | None) -> None:
        self.answer_with = rejection
        self._gate.set()


def rejected_for_memory(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    fields = [getattr(record, "fields", {}) for record in caplog.records
              if getattr(record, "event", None) == "upgrade_rejected"]
    return [f for f in fields if "memory budget exceeded" in str(f.get("reason"))]


async def test_requests_waiting_for_a_slow_auth_hook_are_charged_to_the_budget(
        caplog: pytest.LogCaptureFixture, leak_check: None) -> None:
    """100 upgrades of about 1 MB each (an 800 KB head, 200 KB sent after it) wait on a
    slow auth hook: the head and the early bytes count against the client's 48 MiB budget,
    so the upgrades past it are refused (429, logged with their request id, metric
    "memory") before the hook runs, the process grows by less than 64 MiB, and the budget
    is back to 0 once the hook answers and the connections end. (Uncharged, the bridge
    held about 110 MB here.)"""
    caplog.set_level("INFO", logger="grpcbridge")
    hook = SlowHook()
    config = grpcbridge.BridgeConfig(listen="127.0.0.1:0", backend="127.0.0.1:1",
                                     authenticate=hook, max_upgrades_per_minute=0,
                                     handshake_timeout=timing(60), drain_timeout=0)
    process = psutil.Process()
    count = 100
    async with grpcbridge.Bridge(config) as bridge:
        assert bridge.address is not None
        port = bridge.address[1]
        data = big_upgrade(port) + b"\x82" * (200 * 1024)
        baseline = process.memory_info().rss
        sockets: list[socket.socket] = []
        closing = contextlib.ExitStack()
        peak = 0
        for _ in range(count):
            sockets.append(closing.enter_context(await send_raw(port, data, "127.0.0.2")))
            peak = max(peak, process.memory_info().rss - baseline)
        with closing:
            answers = [asyncio.create_task(read_answer(sock)) for sock in sockets]
            refused = lambda: sum(task.done() for task in answers)  # noqa: E731
            await eventually(lambda: hook.entered + refused() == count, 20,
                             message=lambda: f"{hook.entered} in the hook, {refused()} refused")
            held = bridge.budget.held_by("127.0.0.2")
            n_refused = refused()
            peak = max(peak, process.memory_info().rss - baseline)
            memory_refusals = bridge.metrics.registry.get_sample_value(
                "grpcbridge_upgrades_rejected_total", {"reason": "memory"})
            logged = rejected_for_memory(caplog)
            refused_statuses = Counter(status for task in answers if task.done()
                                       for status in statuses(task.result()))
            hook.answer(grpcbridge.Rejection(403, "not today", label="auth"))
            await asyncio.gather(*answers)
            late_statuses = Counter(status for task in answers
                                    for status in statuses(task.result()))
        released = await eventually(lambda: bridge.budget.held_by("127.0.0.2") == 0
                                    and bridge.connections == 0, 10, fail=False)
        print(f"\n{count} x {len(data) / MiB:.1f} MB upgrades behind a slow hook: "
              f"{hook.entered} reached it, {n_refused} refused, {held / MiB:.1f} MiB charged, "
              f"process RSS +{peak / MiB:.0f} MiB")
        assert released, (f"{bridge.budget.held_by('127.0.0.2')} bytes still charged, "
                          f"{bridge.connections} connections")
        assert bridge.budget.tracked_clients == 0 and bridge.budget.held == 0
    per_client = config.client_memory_budget
    assert 0 < hook.entered < count and held <= per_client
    assert held > hook.entered * (len(data) - 256 * 1024), (
        f"{held} bytes charged for {hook.entered} waiting {len(data)}-byte requests")
    assert refused_statuses == Counter({429: count - hook.entered}), refused_statuses
    assert late_statuses[403] == hook.entered, late_statuses
    assert memory_refusals == count - hook.entered
    assert len(logged) == count - hook.entered
    assert all(str(f["request_id"]) and f["status"] == 429 for f in logged), logged[:3]
    assert peak < 64 * MiB, f"process RSS grew by {peak / MiB:.0f} MiB (allowed 64)"


@pytest.mark.parametrize("compression", [False, True], ids=["picows", "websockets"])
async def test_auth_hook_is_bounded_by_the_handshake_timeout(
        compression: bool, caplog: pytest.LogCaptureFixture, leak_check: None) -> None:
    """An auth hook that never answers: at the handshake timeout the hook is cancelled, the
    client gets a 503, its slot and its budget are released."""
    caplog.set_level("INFO", logger="grpcbridge")
    hook = SlowHook()
    config = grpcbridge.BridgeConfig(listen="127.0.0.1:0", backend="127.0.0.1:1",
                                     authenticate=hook, handshake_timeout=timing(1),
                                     compression=compression, drain_timeout=0)
    async with grpcbridge.Bridge(config) as bridge:
        assert bridge.address is not None
        port = bridge.address[1]
        sock = await send_raw(port, big_upgrade(port, lines=4) + b"\x82" * 1000, "127.0.0.2")
        try:
            await eventually(lambda: hook.entered == 1, 5)
            charged = bridge.budget.held_by("127.0.0.2")
            answer = await asyncio.wait_for(read_answer(sock), timing(10))
        finally:
            sock.close()
        await eventually(lambda: bridge.budget.held_by("127.0.0.2") == 0
                         and bridge.connections == 0, 5,
                         message=lambda: f"{bridge.budget.held_by('127.0.0.2')} bytes held")
        assert bridge.gate.limiter.active == 0
    assert charged > 4 * 8000 + 1000, charged
    assert statuses(answer) == [503] and b"handshake timeout" in answer, answer[:300]
    assert hook.cancelled == 1
    timeouts = [getattr(record, "fields", {}) for record in caplog.records
                if getattr(record, "event", None) == "upgrade_rejected"]
    assert [f["status"] for f in timeouts] == [503], timeouts


async def test_client_leaving_during_admission_cancels_the_hook(leak_check: None) -> None:
    """A client that leaves while the hook runs: noticed at the latest at the handshake
    timeout (reading is paused during admission); the hook is cancelled, its slot and the
    charged request released."""
    hook = SlowHook()
    config = grpcbridge.BridgeConfig(listen="127.0.0.1:0", backend="127.0.0.1:1",
                                     authenticate=hook, handshake_timeout=timing(1),
                                     drain_timeout=0)
    async with grpcbridge.Bridge(config) as bridge:
        assert bridge.address is not None
        port = bridge.address[1]
        sock = await send_raw(port, big_upgrade(port, lines=4), "127.0.0.2")
        await eventually(lambda: hook.entered == 1, 5)
        assert bridge.budget.held_by("127.0.0.2") > 4 * 8000
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset
        await eventually(lambda: hook.cancelled == 1 and bridge.connections == 0, 10)
        assert bridge.budget.held_by("127.0.0.2") == 0 and bridge.gate.limiter.active == 0
