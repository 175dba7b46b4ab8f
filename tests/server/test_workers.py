"""``grpcbridge serve --workers N``: real supervisor and worker processes against the grpcio Todo
oracle. Both workers serve the one port, /metrics sums them, a killed worker comes back, SIGTERM
drains every worker and leaves no process behind, a dead supervisor takes its workers with it,
and ``--workers 1`` is today's single process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
from grpclib.exceptions import GRPCError

import grpcbridge
from grpcbridge.demo import todo_pb2
from grpcbridge.demo.todo_grpc import TodoServiceStub
from grpcbridge.server.workers import parse_workers

from support import (
    Metrics,
    Process,
    cli,
    closed,
    eventually,
    serve_args,
    start_cli,
    timing,
    wait_until,
)

SUPERVISOR_STARTED = r"bridge_started .*workers=2"


def workers_args(port: int, *extra: str) -> list[str]:
    """``grpcbridge serve --workers 2`` with /metrics, in front of the Todo service on
    ``port``."""
    return serve_args(f"127.0.0.1:{port}", "--workers", "2", "--metrics-listen", "127.0.0.1:0",
                      *extra)


def metrics_of(bridge: Process) -> Metrics:
    """The supervisor's /metrics, once it logged that all workers are up."""
    bridge.wait_for_line(SUPERVISOR_STARTED)
    return Metrics(bridge)


def http_status(metrics: Metrics, path: str) -> tuple[int, str]:
    url = f"http://{metrics.host}:{metrics.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timing(5)) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def ready(metrics: Metrics) -> bool:
    return await asyncio.to_thread(http_status, metrics, "/readyz") == (200, "ready\n")


def served(bridge: Process) -> Counter[str]:
    """Tunnels accepted, by the worker that logged them."""
    found = (re.search(r" worker=(\d+) ", line) for line in list(bridge.lines)
             if "upgrade_accepted" in line)
    return Counter(match.group(1) for match in found if match)


def exited(bridge: Process, timeout: float) -> int:
    """Wait for the supervisor to exit and for the last of its output; its exit code."""
    code = bridge.popen.wait(timing(timeout))
    assert bridge.pump is not None
    bridge.pump.join(timing(5))  # EOF once the workers, which share the pipe, are gone too
    return code


def workers(bridge: Process) -> list[psutil.Process]:
    return psutil.Process(bridge.pid).children()


async def unary_calls(url: str, count: int) -> None:
    """``count`` unary calls at once, each through its own tunnel."""

    async def one() -> None:
        async with grpcbridge.Channel(url) as channel:
            reply = await TodoServiceStub(channel).ListTodos(todo_pb2.ListTodosRequest())
            assert isinstance(reply, todo_pb2.ListTodosResponse)

    await asyncio.gather(*(one() for _ in range(count)))


async def until_both_served(bridge: Process) -> int:
    """Calls in batches until both workers have accepted tunnels; how many calls."""
    calls = 0

    async def both() -> bool:
        nonlocal calls
        await unary_calls(bridge.url, 10)
        calls += 10
        return len(served(bridge)) == 2

    await eventually(both, 30, interval=0,
                     message=lambda: f"after {calls} calls, served by {served(bridge)}")
    return calls


async def started_stream(stack: contextlib.AsyncExitStack, channel: grpcbridge.Channel,
                         seconds: float) -> Any:
    """A StreamTodos call on ``channel`` that lasts about ``seconds`` (one todo every 50 ms)
    and has sent its first message."""
    stub = TodoServiceStub(channel)
    todos = len((await stub.ListTodos(todo_pb2.ListTodosRequest())).todos)
    if not todos:  # the stream sends every todo `repeat` times: one is enough
        await stub.CreateTodo(todo_pb2.CreateTodoRequest(text="streamed"))
        todos = 1
    stream = await stack.enter_async_context(stub.StreamTodos.open())
    # The oracle's store is shared by the module's tests: a stream of many todos would
    # outlast the drain timeout however few repeats it asks for.
    assert todos * 0.05 <= seconds, f"{todos} todos: the stream cannot last {seconds} s"
    repeat = max(1, round(seconds / 0.05 / todos))
    await stream.send_message(todo_pb2.StreamTodosRequest(repeat=repeat, interval_ms=50),
                              end=True)
    assert await stream.recv_message() is not None
    return stream


async def test_two_workers_share_the_port_and_metrics_sum_them(todo_port: int) -> None:
    with cli(workers_args(todo_port)) as bridge:
        metrics = metrics_of(bridge)
        assert len(workers(bridge)) == 2
        assert await ready(metrics)
        calls = await until_both_served(bridge)
        samples = await metrics.settled(calls)
        assert samples["grpcbridge_tunnels_active"] == 0 and closed(samples) == calls, samples
        wait_until(lambda: sum(served(bridge).values()) == calls, 5,
                   message=lambda: f"{calls} calls, logged by worker: {served(bridge)}")
        per_worker = served(bridge)
        assert all(per_worker[index] > 0 for index in ("0", "1")), per_worker
        assert samples["grpcbridge_upgrades_accepted_total"] == calls
        assert samples['grpcbridge_tunnels_closed_total{code="1000"}'] == calls
        assert samples["grpcbridge_workers_ready"] == 2
        assert samples["grpcbridge_worker_restarts_total"] == 0


async def test_a_killed_worker_is_restarted_and_service_continues(todo_port: int) -> None:
    with cli(workers_args(todo_port)) as bridge:
        metrics = metrics_of(bridge)
        await unary_calls(bridge.url, 10)
        victim, survivor = workers(bridge)
        victim.kill()
        line = bridge.wait_for_line(rf"worker_exited .*pid={victim.pid} .*SIGKILL")
        assert "worker=" in line
        bridge.wait_for_line(r"worker_restarting")

        def replaced() -> bool:
            pids = {child.pid for child in workers(bridge)}
            return len(pids) == 2 and victim.pid not in pids and survivor.pid in pids

        wait_until(replaced, 10, message=lambda: bridge.output())
        await eventually(lambda: ready(metrics), 10)
        await unary_calls(bridge.url, 20)  # every call succeeds
        # The dead worker's counts stay in the sum (counters never go down).
        samples = await metrics.settled(30)
        assert closed(samples) == samples["grpcbridge_upgrades_accepted_total"] == 30
        assert samples["grpcbridge_worker_restarts_total"] == 1
    assert bridge.popen.returncode == 0, bridge.output()


async def test_sigterm_drains_every_worker_and_leaves_no_process(
        todo_port: int, leak_check: None) -> None:
    """Streams in flight on both workers when SIGTERM arrives run to their end; then the
    supervisor and its workers exit 0 and no process is left."""
    bridge = start_cli(workers_args(todo_port, "--drain-timeout", "10"))
    metrics_of(bridge)
    pids = [child.pid for child in workers(bridge)]
    await until_both_served(bridge)
    before = served(bridge)
    channels: list[grpcbridge.Channel] = []
    streams = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            # Open streams until both workers hold one (each channel is its own tunnel).
            async def both_hold_one() -> bool:
                channel = grpcbridge.Channel(bridge.url)
                channels.append(channel)
                streams.append(await started_stream(stack, channel, 1.0))
                now = served(bridge) - before
                return len(now) == 2

            await eventually(both_hold_one, 30, interval=0)
            bridge.popen.send_signal(signal.SIGTERM)
            bridge.wait_for_line("supervisor_stopping")
            for index in ("0", "1"):
                bridge.wait_for_line(rf"bridge_draining .*worker={index} ")
            # Every worker stopped accepting and the supervisor let go of its copy of the
            # socket: a new connection is refused (a load balancer fails over at once),
            # not left waiting in the backlog.
            host, port = urlsplit(bridge.url).hostname, urlsplit(bridge.url).port
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((host, port), timeout=timing(5)).close()
            for stream in streams:  # every stream still runs to its end
                received = 0
                while await stream.recv_message() is not None:
                    received += 1
                assert received >= 1
        for channel in channels:
            channel.close()
        started = time.monotonic()
        exited(bridge, 10)
        print(f"\nexit {time.monotonic() - started:.2f} s after the last tunnel closed")
    finally:
        for channel in channels:
            channel.close()
    assert bridge.popen.returncode == 0, bridge.output()
    assert "Traceback" not in bridge.output()
    assert bridge.output().count("worker_exited") == 2
    assert not any(psutil.pid_exists(pid) for pid in pids)


async def test_a_second_signal_kills_the_workers_at_once(todo_port: int) -> None:
    """A stream keeps its worker draining for up to 60 s; a second SIGTERM ends that."""
    bridge = start_cli(workers_args(todo_port, "--drain-timeout", "60"))
    metrics_of(bridge)
    pids = [child.pid for child in workers(bridge)]
    seconds = float("inf")
    with contextlib.suppress(GRPCError):  # the stream's tunnel dies with its worker
        async with grpcbridge.Channel(bridge.url) as channel, \
                contextlib.AsyncExitStack() as stack:
            await started_stream(stack, channel, 3600)
            bridge.popen.send_signal(signal.SIGTERM)
            bridge.wait_for_line(r"bridge_draining .*tunnels=1 ")
            started = time.monotonic()
            bridge.popen.send_signal(signal.SIGTERM)
            exited(bridge, 10)
            seconds = time.monotonic() - started
    assert seconds < timing(5), f"exit took {seconds:.2f} s after the second signal"
    assert "supervisor_killing" in bridge.output()
    assert "SIGKILL" in bridge.output()
    assert not any(psutil.pid_exists(pid) for pid in pids)


def test_workers_exit_when_the_supervisor_is_killed_and_the_next_cleans_up(todo_port: int) -> None:
    with cli(workers_args(todo_port)) as bridge:
        metrics_of(bridge)
        children = workers(bridge)
        metrics_dir = children[0].environ()["PROMETHEUS_MULTIPROC_DIR"]
        bridge.popen.kill()

        def ended(child: psutil.Process) -> bool:  # a zombie waits for init to reap it
            with contextlib.suppress(psutil.NoSuchProcess):
                return child.status() == psutil.STATUS_ZOMBIE
            return True

        wait_until(lambda: all(ended(child) for child in children), 10,
                   message=lambda: bridge.output())
        wait_until(lambda: bridge.output().count("supervisor_gone") == 2, 5,
                   message=lambda: bridge.output())
    assert os.path.isdir(metrics_dir)  # left behind by the killed supervisor
    with cli(workers_args(todo_port)) as bridge:  # the next one removes it
        metrics_of(bridge)
        assert not os.path.exists(metrics_dir)


def test_gives_up_after_repeated_crashes(todo_port: int) -> None:
    with cli(workers_args(todo_port)) as bridge:
        metrics_of(bridge)
        killed: set[int] = set()

        def kill_a_worker() -> bool:
            for child in workers(bridge):
                if child.pid not in killed:
                    killed.add(child.pid)
                    child.kill()
                    return True
            return False

        for _ in range(5):  # the fifth exit within a minute: give up
            wait_until(kill_a_worker, 10, message=lambda: bridge.output())
        exited(bridge, 15)
    assert bridge.popen.returncode == 1
    assert "workers_gave_up" in bridge.output()
    assert bridge.output().count("worker_restarting") == 4


def test_a_worker_that_cannot_start_stops_the_supervisor(
        todo_port: int, tmp_path: object) -> None:
    junk = os.path.join(str(tmp_path), "junk.pem")
    with open(junk, "w") as handle:
        handle.write("not a certificate\n")
    result = subprocess.run(
        [sys.executable, "-m", "grpcbridge.cli", *workers_args(todo_port, "--certfile", junk,
                                                             "--keyfile", junk)],
        capture_output=True, text=True, timeout=timing(30))
    assert result.returncode == 1, result.stderr
    assert "worker_failed_to_start" in result.stderr
    assert "bridge_started" not in result.stderr.replace("worker=", "")


def test_one_worker_is_the_single_process_bridge(todo_port: int) -> None:
    with cli(["serve", "--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{todo_port}",
              "--workers", "1"]) as bridge:
        line = bridge.wait_for_line("bridge_started")
        assert not workers(bridge)
        assert "workers=" not in line and "worker=" not in line


@pytest.mark.parametrize("value", ["0", "-1", "two", ""])
def test_bad_worker_counts_exit_2(value: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "grpcbridge.cli", "serve", "--backend", "127.0.0.1:1",
         "--workers", value], capture_output=True, text=True, timeout=timing(30))
    assert result.returncode == 2
    assert "--workers: must be a whole number >= 1 or 'auto'" in result.stderr


def test_auto_is_one_worker_per_core_and_help_says_limits_are_per_worker() -> None:
    assert parse_workers("auto") == (os.cpu_count() or 1)
    result = subprocess.run([sys.executable, "-m", "grpcbridge.cli", "serve", "--help"],
                            capture_output=True, text=True, timeout=timing(30))
    text = " ".join(result.stdout.split())
    assert "--workers N|auto" in text
    assert "then hold per worker" in text
