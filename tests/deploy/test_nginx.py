"""grpcbridge behind nginx, as ``deploy/nginx.conf`` ships it: Debian's nginx (``.ci/run``
installs it; without it these tests are skipped, or fail under ``GRPCBRIDGE_REQUIRE_NGINX=1``
as in CI), started here with that file, its own prefix in ``tmp_path`` (pid, logs, temp
directories) and ``daemon off``, terminating TLS in front of two ``grpcbridge serve``
processes (``--trusted-proxy 127.0.0.1/32``). Clients are grpcio channels on a
``grpcbridge forward --tls`` to ``wss://`` nginx.

* every RPC kind (the checks of tests/test_e2e_grpc.py, ``rpc_checks``) passes through
  nginx, and least_conn puts two tunnels on two bridges;
* X-Forwarded-For: a bridge that trusts nginx names the real client (a client from
  127.0.0.2; a value the client forged itself is not believed), one that does not names
  nginx; the same-host Origin rule holds through nginx (Host is passed on);
* nginx's timeouts fit the bridge's keepalive (ping interval, idle timeout, drain);
* under load (a thread per channel making calls continuously), ``nginx -s reload`` and the
  restart of one bridge (SIGTERM, start again on its port): the clients reconnect, and every
  call started after the reconnect succeeds. "After the reconnect" is a moment the test
  observes: every tunnel that was cut is counted closed by the bridges, and as many tunnels
  as there are channels are open again (each channel has one connection, so each has its new
  tunnel). Calls that fail must have been in flight across the disruption (started before
  that moment, ended after the trigger); they are counted and reported.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import pytest
import rpc_checks
from rpc_checks import CALL_TIMEOUT, Stub
from todo_oracle import process as oracle_process
from websockets.asyncio.client import connect

from grpcbridge.cli import _bridge_config, build_parser
from grpcbridge.demo import todo_pb2

from support import (
    GRPC_OPTIONS,
    Process,
    accepts,
    free_port,
    skip_or_fail,
    snapshot,
    start_cli,
    timing,
    tls_files,
    wait_until,
)

DEPLOY_CONF = Path(__file__).resolve().parents[2] / "deploy" / "nginx.conf"
PLACEHOLDER = re.compile(r"@[A-Z0-9_]+@")
DEBIAN_NGINX = "/usr/sbin/nginx"  # not on every PATH
#: Channels (hence tunnels) kept busy by the load tests.
CHANNELS = 4
#: Calls each channel must make after the reconnect before a load test ends.
CALLS_AFTER = 20
#: Seconds each load thread waits between two calls (the pace of the load: up to 100 calls
#: per second and channel, without taking every cycle of the machine).
PACE = 0.01


def nginx_program() -> str:
    path = shutil.which("nginx") or (DEBIAN_NGINX if os.access(DEBIAN_NGINX, os.X_OK) else None)
    if path is None:
        skip_or_fail("nginx is not installed (apt-get install nginx; .ci/run does)",
                     "GRPCBRIDGE_REQUIRE_NGINX")  # set by .ci/run
    return path


def render(port: int, bridges: list[int], cert: Path, key: Path) -> str:
    """deploy/nginx.conf with its placeholders filled in, and nothing else changed."""
    values = {"@LISTEN@": f"127.0.0.1:{port}", "@SERVER_NAME@": "localhost 127.0.0.1",
              "@CERTIFICATE@": str(cert), "@CERTIFICATE_KEY@": str(key),
              **{f"@BRIDGE_{i}@": f"127.0.0.1:{p}" for i, p in enumerate(bridges, 1)}}
    text = DEPLOY_CONF.read_text()
    assert set(PLACEHOLDER.findall(text)) == set(values), "the placeholders changed"
    for name, value in values.items():
        text = text.replace(name, value)
    return text


class Nginx:
    """nginx in the foreground with its own prefix (pid, logs, temp directories) and config."""

    def __init__(self, program: str, prefix: Path, config: str, port: int) -> None:
        self.port = port
        self.prefix = prefix
        (prefix / "logs").mkdir(parents=True)
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(config)
        self.command = [program, "-p", f"{prefix}/", "-c", str(self.conf)]
        self.stderr = prefix / "stderr.log"
        with self.stderr.open("w") as out:
            self.popen = subprocess.Popen([*self.command, "-g", "daemon off;"],
                                          stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: self.popen.poll() is not None or accepts(port), 10,
                       message=lambda: f"nginx did not listen:\n{self.errors()}")
            assert self.popen.poll() is None, f"nginx exited:\n{self.errors()}"
        except BaseException:
            self.stop()
            raise

    def errors(self) -> str:
        logs = [self.stderr, self.prefix / "logs" / "error.log"]
        return "\n".join(path.read_text(errors="replace") for path in logs if path.exists())

    def access_log(self) -> list[str]:
        path = self.prefix / "logs" / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    def workers(self) -> list[psutil.Process]:
        """The master's worker processes still running (old ones exit after a reload)."""
        running = []
        for child in psutil.Process(self.popen.pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.status() != psutil.STATUS_ZOMBIE:
                    running.append(child)
        return running

    def reload(self) -> None:
        """``nginx -s reload``: the signal goes to the master named in the config's pid file."""
        done = subprocess.run([*self.command, "-s", "reload"], capture_output=True, text=True,
                              timeout=timing(10), check=False)
        assert done.returncode == 0, done.stderr

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()  # fast shutdown: the master stops its workers first
            try:
                self.popen.wait(timing(10))
            except subprocess.TimeoutExpired:
                for worker in self.workers():
                    worker.kill()
                self.popen.kill()
                self.popen.wait()


@dataclass
class Deployment:
    """Two bridges behind nginx, on one backend."""

    backend_port: int
    ca: Path
    nginx: Nginx
    bridges: list[Process]
    #: The options of each bridge besides --listen and --backend.
    options: list[list[str]]
    #: Bridge processes stopped by :meth:`restart_bridge` (their logs still count).
    retired: list[Process] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.nginx.port}/grpc"

    def restart_bridge(self, index: int) -> Process:
        """Start bridge ``index`` again on its port once it exited (0, after its drain)."""
        old = self.bridges[index]
        assert old.popen.wait(timing(15)) == 0, old.output()
        self.retired.append(old)
        self.bridges[index] = start_bridge(self.backend_port, self.options[index], old.port)
        return self.bridges[index]

    def tunnels(self) -> tuple[int, int]:
        """Tunnels opened and closed so far, over every bridge process."""
        processes = [*self.bridges, *self.retired]
        return (sum(count(p, "tunnel_opened") for p in processes),
                sum(count(p, "tunnel_closed") for p in processes))

    def active(self) -> int:
        opened, closed = self.tunnels()
        return opened - closed


def count(process: Process, event: str) -> int:
    pattern = re.compile(rf"\b{event}\b")
    return sum(1 for line in list(process.lines) if pattern.search(line))


def start_bridge(backend_port: int, options: list[str], port: int = 0) -> Process:
    # Stopped by its deployment, not after each test.
    process = start_cli(["serve", "--listen", f"127.0.0.1:{port}", "--backend",
                         f"127.0.0.1:{backend_port}", *options], outlives_test=True)
    return process


@contextlib.contextmanager
def deployed(directory: Path, backend_port: int, options: list[list[str]]) -> Iterator[Deployment]:
    """Bridges with these ``options`` each, behind nginx running deploy/nginx.conf."""
    program = nginx_program()
    ca, cert, key = tls_files(directory)
    bridges: list[Process] = []
    nginx: Nginx | None = None
    try:
        bridges.extend(start_bridge(backend_port, each) for each in options)
        port = free_port()  # nginx cannot pick one and tell
        nginx = Nginx(program, directory / "nginx",
                      render(port, [bridge.port for bridge in bridges], cert, key), port)
        yield Deployment(backend_port, ca, nginx, bridges, options)
    finally:
        if nginx is not None:
            nginx.stop()
        for bridge in bridges:
            bridge.stop()


def bridge_options(*, trusted: bool = True) -> list[str]:
    return ["--drain-timeout", "2", *(["--trusted-proxy", "127.0.0.1/32"] if trusted else [])]


# -------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def backend_port() -> Iterator[int]:
    with oracle_process() as (_, port):
        yield port


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory,
               backend_port: int) -> Iterator[Deployment]:
    with deployed(tmp_path_factory.mktemp("deploy"), backend_port,
                  [bridge_options(), bridge_options()]) as deployment:
        yield deployment
        errors = re.findall(r"^.*\[(?:alert|crit|emerg)\].*$", deployment.nginx.errors(), re.M)
        assert not errors, errors


@pytest.fixture(scope="module")
def forwarder(deployment: Deployment) -> Iterator[Process]:
    process = start_cli(["forward", "--listen", "127.0.0.1:0", "--target", deployment.url,
                         "--tls", "--cacert", str(deployment.ca)], outlives_test=True)
    try:
        yield process
    finally:
        process.stop()


def own_channels(address: str, n: int) -> list[grpc.Channel]:
    """``n`` channels with a connection (hence a tunnel) each, connected one after the other
    (so that least_conn spreads them over the bridges)."""
    options = [*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.insecure_channel(address, options=options) for _ in range(n)]
    try:
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT)
    except BaseException:
        for channel in channels:
            channel.close()
        raise
    return channels


# ---------------------------------------------------------------- 1. every RPC kind


def test_every_rpc_kind_through_nginx(deployment: Deployment, forwarder: Process) -> None:
    settled(deployment, 0)
    accepted = [count(bridge, "upgrade_accepted") for bridge in deployment.bridges]
    channels = own_channels(forwarder.listen, 2)
    try:
        for channel in channels:
            for check in rpc_checks.RPC_KINDS.values():
                check(Stub(channel))
    finally:
        for channel in channels:
            channel.close()
    # least_conn: the second tunnel went to the bridge without one.
    assert [count(bridge, "upgrade_accepted") - before
            for bridge, before in zip(deployment.bridges, accepted, strict=True)] == [1, 1]
    # nginx logs each tunnel when it ends: switched (101), one on each bridge.
    upstreams = {f"upstream=127.0.0.1:{bridge.port} " for bridge in deployment.bridges}

    def logged() -> bool:
        return upstreams <= {match.group(0) for line in deployment.nginx.access_log()
                             if '" 101 ' in line
                             for match in [re.search(r"upstream=\S+ ", line)] if match}

    wait_until(logged, 10, message=lambda: "\n".join(deployment.nginx.access_log()))


def test_timeouts_fit_the_bridge_keepalive() -> None:
    """nginx cuts a tunnel whose bridge sent nothing for proxy_read_timeout, and closes what
    old workers hold worker_shutdown_timeout after a reload: against `grpcbridge serve`'s
    defaults, the bridge's keepalive must come first, and a reload bounded like a drain."""
    text = DEPLOY_CONF.read_text()

    def seconds(directive: str) -> float:
        (value,) = re.findall(rf"^\s*{directive}\s+(\d+)s;", text, re.M)
        return float(value)

    serve = _bridge_config(build_parser().parse_args(["serve", "--backend", "127.0.0.1:1"]))
    for directive in ("proxy_read_timeout", "proxy_send_timeout", "send_timeout"):
        assert seconds(directive) > serve.idle_timeout > serve.ping_interval > 0, directive
    assert seconds("worker_shutdown_timeout") == serve.drain_timeout


# ------------------------------------------------------------- 2. X-Forwarded-For


def peer_and_client(bridge: Process) -> tuple[str, ...]:
    """The socket peer and the client (the address limits and logs go by) of the first
    tunnel the bridge accepted."""
    accepted = r"\bupgrade_accepted\b.*\bpeer=(\S+) client=(\S+)"
    match = re.search(accepted, bridge.wait_for_line(accepted))
    assert match is not None
    return match.groups()


async def test_x_forwarded_for_is_believed_from_trusted_nginx_only(
    leak_check: None, tmp_path: Path, backend_port: int
) -> None:
    """Bridge 1 trusts nginx (--trusted-proxy 127.0.0.1/32), bridge 2 does not. A client on
    127.0.0.2 that forges X-Forwarded-For opens two tunnels; least_conn puts one on each."""
    with deployed(tmp_path, backend_port,
                  [bridge_options(trusted=True), bridge_options(trusted=False)]) as deployment:
        context = ssl.create_default_context(cafile=str(deployment.ca))
        origin = f"https://127.0.0.1:{deployment.nginx.port}"  # same host: allowed
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(2):
                await stack.enter_async_context(connect(
                    deployment.url, ssl=context, origin=origin,  # type: ignore[arg-type]
                    subprotocols=["grpcbridge"],  # type: ignore[list-item]
                    additional_headers={"X-Forwarded-For": "203.0.113.9"},
                    local_addr=("127.0.0.2", 0), open_timeout=timing(10)))
            trusting, other = deployment.bridges
            assert peer_and_client(trusting) == ("127.0.0.1", "127.0.0.2"), trusting.output()
            assert peer_and_client(other) == ("127.0.0.1", "127.0.0.1"), other.output()
        for bridge in deployment.bridges:
            assert count(bridge, "upgrade_accepted") == 1, bridge.output()
            assert "203.0.113.9" not in bridge.output()


async def test_one_request_id_in_nginx_and_bridge_logs(
    leak_check: None, tmp_path: Path, backend_port: int
) -> None:
    """nginx's $request_id replaces the client's X-Request-Id: the 101 echoes it, and the
    access log line and every bridge line of the tunnel carry it."""
    with deployed(tmp_path, backend_port, [bridge_options(), bridge_options()]) as deployment:
        context = ssl.create_default_context(cafile=str(deployment.ca))
        async with connect(deployment.url, ssl=context, open_timeout=timing(10),
                           additional_headers={"X-Request-Id": "forged-by-client"}) as ws:
            request_id = ws.response.headers["X-Request-Id"]
        assert re.fullmatch(r"[0-9a-f]{32}", request_id), request_id
        wait_until(lambda: sum(count(bridge, "tunnel_closed")
                               for bridge in deployment.bridges) == 1, timing(10))
        wait_until(lambda: any(f"request_id={request_id}" in line
                               for line in deployment.nginx.access_log()), timing(10))
    lines = [line for bridge in deployment.bridges for line in bridge.lines
             if "upgrade_" in line or "tunnel_" in line]
    assert len(lines) == 3 and all(f"request_id={request_id}" in line for line in lines), lines
    assert not any("forged-by-client" in bridge.output() for bridge in deployment.bridges)


# ------------------------------------------------------------------- 3. under load


@dataclass(frozen=True)
class Call:
    channel: int
    start: float
    end: float
    code: grpc.StatusCode


class Load:
    """Calls made continuously on :data:`CHANNELS` channels to the forwarder, one thread per
    channel at :data:`PACE`: each creates a todo, then deletes it, and so on. Every call is
    recorded."""

    def __init__(self, address: str) -> None:
        self.channels = own_channels(address, CHANNELS)
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(CHANNELS, thread_name_prefix="load")
        self._runs: list[Future[None]] = [self._pool.submit(self._run, i)
                                          for i in range(CHANNELS)]

    def _call(self, index: int, method: object, request: object) -> object | None:
        start = time.monotonic()
        try:
            reply: object = method(request, timeout=CALL_TIMEOUT)  # type: ignore[operator]
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            reply, code = None, error.code()  # type: ignore[attr-defined]
        with self._lock:
            self.calls.append(Call(index, start, time.monotonic(), code))
        return reply

    def _run(self, index: int) -> None:
        stub = Stub(self.channels[index])
        n = 0
        while not self._stop.wait(PACE):
            n += 1
            todo = self._call(index, stub.CreateTodo,
                              todo_pb2.CreateTodoRequest(text=f"load-{index}-{n}"))
            if isinstance(todo, todo_pb2.Todo):
                self._call(index, stub.DeleteTodo, todo_pb2.DeleteTodoRequest(id=todo.id))

    def started_after(self, moment: float) -> list[Call]:
        with self._lock:
            return [call for call in self.calls if call.start >= moment]

    def each_channel_made(self, calls: int, after: float) -> bool:
        made = [0] * CHANNELS
        for call in self.started_after(after):
            made[call.channel] += 1
        return min(made) >= calls

    def stop(self) -> None:
        self._stop.set()
        for run in self._runs:
            run.result(timeout=CALL_TIMEOUT)
        self._pool.shutdown()
        for channel in self.channels:
            channel.close()


@contextlib.contextmanager
def load(address: str) -> Iterator[Load]:
    running = Load(address)
    try:
        yield running
    finally:
        running.stop()


class Disruption:
    """What the bridges' logs tell of tunnels cut and replaced from the moment it is created
    (the trigger), with the moments the test observed: the first tunnel closed (``cut``),
    and every cut tunnel replaced (``reconnected``: all of them counted closed, and one
    tunnel open per channel again). Observed moments come after the events themselves, so
    calls started after ``reconnected`` did start after the reconnect."""

    def __init__(self, deployment: Deployment, running: Load) -> None:
        self.deployment = deployment
        self.running = running
        self.closed_before = deployment.tunnels()[1]
        self.triggered = time.monotonic()
        self.cut = self.reconnected = 0.0

    def closed(self) -> int:
        return self.deployment.tunnels()[1] - self.closed_before

    def wait_reconnected(self, tunnels: int, timeout: float) -> None:
        """Wait until ``tunnels`` tunnels were cut and every channel has one open again."""
        wait_until(lambda: self.closed() >= 1, timeout, interval=0.005,
                   message="no tunnel was cut")
        self.cut = time.monotonic()
        wait_until(lambda: self.closed() >= tunnels and self.deployment.active() == CHANNELS,
                   timeout, interval=0.005,
                   message=lambda: f"tunnels (opened, closed): {self.deployment.tunnels()}")
        self.reconnected = time.monotonic()

    def check(self, name: str) -> None:
        """After :data:`CALLS_AFTER` calls per channel started after the reconnect: all of
        them succeeded; the calls that failed were in flight across the disruption (started
        before the reconnect, ended after the trigger) and failed with UNAVAILABLE. Reports
        the counts."""
        wait_until(lambda: self.running.each_channel_made(CALLS_AFTER, self.reconnected), 30)
        calls = list(self.running.calls)
        after = [call for call in calls if call.start >= self.reconnected]
        broken = [call for call in after if call.code != grpc.StatusCode.OK]
        assert not broken, f"{name}: calls started after the reconnect failed: {broken}"
        failed = [call for call in calls if call.code != grpc.StatusCode.OK]
        outside = [call for call in failed
                   if call.start >= self.reconnected or call.end < self.triggered]
        assert not outside, f"{name}: calls failed outside the disruption: {outside}"
        assert {call.code for call in failed} <= {grpc.StatusCode.UNAVAILABLE}, failed
        in_flight = [call for call in calls
                     if call.start < self.reconnected and call.end >= self.cut]
        print(f"{name}: {len(calls)} calls; tunnels cut {self.cut - self.triggered:.2f} s "
              f"after the trigger and replaced {self.reconnected - self.cut:.2f} s later; "
              f"{len(in_flight)} calls in flight meanwhile, {len(failed)} failed "
              f"(UNAVAILABLE); {len(after)} started after the reconnect, all succeeded")


def settled(deployment: Deployment, tunnels: int) -> None:
    wait_until(lambda: deployment.active() == tunnels, 15,
               message=lambda: f"want {tunnels} open tunnels, have {deployment.active()}")


def test_nginx_reload_under_load(deployment: Deployment, forwarder: Process) -> None:
    settled(deployment, 0)
    old_workers = {worker.pid for worker in deployment.nginx.workers()}
    with leak_checked(deployment), load(forwarder.listen) as running:
        settled(deployment, CHANNELS)
        disruption = Disruption(deployment, running)
        deployment.nginx.reload()
        # The old workers keep their tunnels until worker_shutdown_timeout (10 s), then close
        # them; the channels reconnect through the new workers.
        disruption.wait_reconnected(CHANNELS, 30)
        disruption.check("nginx -s reload")
    wait_until(lambda: not old_workers & {w.pid for w in deployment.nginx.workers()}, 10,
               message="the old nginx workers are still there")


def test_bridge_restart_under_load(deployment: Deployment, forwarder: Process) -> None:
    settled(deployment, 0)
    with leak_checked(deployment), load(forwarder.listen) as running:
        settled(deployment, CHANNELS)
        old = deployment.bridges[1]
        disruption = Disruption(deployment, running)
        old.popen.send_signal(signal.SIGTERM)
        # least_conn gave it half of the tunnels: it stops accepting, drains them (2 s) and
        # closes them with 1001; the channels reconnect through nginx to the other bridge.
        drained = re.search(r"tunnels=(\d+)", old.wait_for_line(r"\bbridge_draining\b"))
        assert drained and int(drained.group(1)) >= 1, old.output()
        disruption.wait_reconnected(int(drained.group(1)), 30)
        deployment.restart_bridge(1)
        disruption.check("bridge restart")
    assert re.search(r"\btunnel_closed\b.*\bcode=1001\b", old.output()), old.output()


@contextlib.contextmanager
def leak_checked(deployment: Deployment) -> Iterator[None]:
    """conftest's ``leak_check`` for a test that replaces nginx workers or bridges: no file
    descriptor, thread or child process left, besides the deployment's own processes."""
    before = snapshot()
    yield

    def ours() -> set[int]:
        return {deployment.nginx.popen.pid, *(w.pid for w in deployment.nginx.workers()),
                *(bridge.pid for bridge in deployment.bridges)}

    def clean() -> bool:
        after = snapshot()
        pumps = {bridge.pump.name for bridge in deployment.bridges if bridge.pump is not None}
        return (after.fds <= before.fds and not after.threads - before.threads - pumps
                and not after.children - before.children - ours())

    wait_until(clean, 10, interval=0.05,
               message=lambda: f"leaked: {before} -> {snapshot()} (ours: {ours()})")
