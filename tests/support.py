"""Shared test helpers: the suite's timing factor and its two waiting helpers, real
subprocesses for the CLI, resource snapshots for leak checks.

Time: every bound a test waits for is multiplied by :data:`TIMING` (environment variable
``GRPCBRIDGE_TEST_TIMING``, default 1; say 2 or 3 on a slow or busy machine), and so is
pytest-timeout's limit of each test (tests/conftest.py). A test waits for a condition with
:func:`wait_until` (sync) or :func:`eventually` (async), never with a bare sleep; a sleep that
remains is part of a scenario (idling on purpose, pacing a slow reader) and is not scaled.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import psutil

#: The repository's root.
ROOT = Path(__file__).resolve().parents[1]

#: Scales every time bound of the tests (waits, timeouts of calls that should succeed, the
#: per-test timeout): ``GRPCBRIDGE_TEST_TIMING``, default 1.0.
TIMING = float(os.environ.get("GRPCBRIDGE_TEST_TIMING") or "1.0")


def timing(seconds: float) -> float:
    """``seconds`` scaled by :data:`TIMING`."""
    return seconds * TIMING


Message = str | Callable[[], str]


def _timed_out(timeout: float, message: Message) -> AssertionError:
    text = message() if callable(message) else message
    return AssertionError(f"{text or 'condition not met'} (waited {timing(timeout):g} s)")


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, *,
               interval: float = 0.02, message: Message = "", fail: bool = True) -> bool:
    """Return True as soon as ``predicate()`` is true, checking every ``interval`` seconds
    for ``timeout`` seconds (scaled by :data:`TIMING`). Then raise AssertionError with
    ``message`` (a string or a function giving one), or with ``fail=False`` return False
    (the caller asserts, with its own diagnosis)."""
    deadline = time.monotonic() + timing(timeout)
    while not predicate():
        if time.monotonic() >= deadline:
            if fail:
                raise _timed_out(timeout, message)
            return False
        time.sleep(interval)
    return True


async def eventually(predicate: Callable[[], object | Awaitable[object]],
                     timeout: float = 10.0, *, interval: float = 0.01,  # noqa: ASYNC109
                     message: Message = "", fail: bool = True) -> bool:
    """:func:`wait_until` for async tests: the event loop keeps running while it waits, and
    ``predicate`` may be a coroutine function."""
    deadline = time.monotonic() + timing(timeout)
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return True
        if time.monotonic() >= deadline:
            if fail:
                raise _timed_out(timeout, message)
            return False
        await asyncio.sleep(interval)


MiB = 1024 * 1024
#: Settings of a bridge behind a proxy on this machine: it believes 127.0.0.1's headers.
BEHIND_PROXY: dict[str, Any] = {"trusted_proxies": ["127.0.0.1/32"]}
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 32 * MiB),
    ("grpc.max_send_message_length", 32 * MiB),
]

# Matches both log formats: `bridge_started listen=ws://...` and JSON `"listen": "ws://..."`.
_LISTEN_RE = re.compile(r'(?:bridge|forwarder)_started"?,? "?listen"?(?:=|: ")([^\s"]+)')


@dataclass
class Process:
    """A grpcbridge CLI subprocess and what it printed to stderr."""

    popen: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    listen: str = ""
    #: The thread that reads stderr into ``lines`` (ends at EOF).
    pump: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1].split("/", 1)[0])

    @property
    def url(self) -> str:
        return self.listen

    def output(self) -> str:
        return "\n".join(self.lines)

    def rss(self) -> int:
        return psutil.Process(self.pid).memory_info().rss

    def fds(self) -> int:
        return psutil.Process(self.pid).num_fds()

    def wait_for_line(self, pattern: str, timeout: float = 10.0) -> str:
        regex = re.compile(pattern)
        found: list[str] = []

        def seen() -> bool:
            found.extend(line for line in list(self.lines) if regex.search(line))
            return bool(found)

        wait_until(seen, timeout,
                   message=lambda: f"no line matching {pattern!r}; output:\n{self.output()}")
        return found[0]

    def started(self) -> bool:
        """Whether the process logged that it listens (then ``listen`` is set); an
        AssertionError with its output if it exited before."""
        if not self.listen:
            for line in list(self.lines):
                match = _LISTEN_RE.search(line)
                if match:
                    self.listen = match.group(1)
                    break
        if self.listen:
            return True
        if self.popen.poll() is not None:
            if self.pump is not None:
                self.pump.join(5)  # the rest of its output
            raise AssertionError(f"grpcbridge exited early:\n{self.output()}")
        return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timing(timeout))
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


def serve_args(backend: str, *extra: str, loop: str | None = None) -> list[str]:
    """``grpcbridge serve`` arguments on a free port in front of ``backend``; no drain on
    SIGTERM unless ``extra`` sets one (the last --drain-timeout wins), so stuck tunnels do not
    slow every teardown by 10 s."""
    return ["serve", "--listen", "127.0.0.1:0", "--backend", backend,
            *(("--loop", loop) if loop else ()), "--drain-timeout", "0", *extra]


def start_cli(args: Sequence[str], *, env: dict[str, str] | None = None,
              ready: bool = True, timeout: float = 15.0,
              outlives_test: bool = False) -> Process:
    """Start ``grpcbridge <args>`` and wait until it logs that it listens. conftest kills
    every process started here after each test, except with ``outlives_test``: a process of
    a module-scoped fixture, which stops it itself."""
    popen = subprocess.Popen(
        [sys.executable, "-m", "grpcbridge.cli", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env={**os.environ, **(env or {})},
    )
    process = Process(popen)
    if not outlives_test:
        _PROCESSES.append(process)

    def pump() -> None:
        assert popen.stderr is not None
        for line in popen.stderr:
            process.lines.append(line.rstrip("\n"))
        popen.stderr.close()

    process.pump = threading.Thread(target=pump, daemon=True)
    process.pump.start()
    if ready and not wait_until(process.started, timeout, fail=False):
        process.stop(signal.SIGKILL)
        raise AssertionError(f"grpcbridge did not start:\n{process.output()}")
    return process


_PROCESSES: list[Process] = []


def kill_all_processes() -> None:
    """Kill every CLI subprocess the tests started (also when a test failed)."""
    while _PROCESSES:
        _PROCESSES.pop().stop(signal.SIGKILL, timeout=5)


@contextlib.contextmanager
def cli(args: Sequence[str], **kwargs: object) -> Iterator[Process]:
    process = start_cli(args, **kwargs)  # type: ignore[arg-type]
    try:
        yield process
    finally:
        process.stop()
        if process in _PROCESSES:
            _PROCESSES.remove(process)


#: Debian's Chromium: the browser tests and benchmarks never use a downloaded browser.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def chromium_missing(*, playwright: bool = True) -> str | None:
    """Why the browser demo cannot run in headless Chromium here (None: it can): Chromium at
    :data:`CHROMIUM`, the playwright package (when ``playwright``), ``npm ci``'s Pyodide."""
    if not CHROMIUM.is_file():
        return f"Chromium is not installed at {CHROMIUM}: run `apt-get install -y chromium`"
    if playwright:
        try:
            import playwright.sync_api
        except ImportError:
            return ("the Python package playwright is missing: `pip install playwright` "
                    "(Debian's Chromium is used; never run `playwright install`)")
    if not (ROOT / "node_modules" / "pyodide" / "pyodide.mjs").is_file():
        return "node_modules/pyodide is missing: run `npm ci` in the repository root"
    return None


def skip_or_fail(reason: str, require: str) -> NoReturn:
    """Skip the test loudly because ``reason`` (a missing prerequisite), or fail it when the
    environment variable ``require`` is ``1`` (CI, where the prerequisite must be there)."""
    import warnings

    import pytest

    if os.environ.get(require) == "1":
        pytest.fail(f"{require}=1 but {reason}", pytrace=False)
    message = f"SKIPPED (set {require}=1 to fail instead): {reason}"
    warnings.warn(message, stacklevel=2)
    print(f"\n*** {message} ***", file=sys.stderr)
    pytest.skip(message)


def build_browser_bundle() -> None:
    """Build build/browser (the wheels Pyodide installs) when it is missing or older than the
    sources, so a browser never runs stale code; a quick no-op otherwise."""
    build = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_browser_bundle.py")],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, f"bundle build failed:\n{build.stdout}{build.stderr}"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for programs that cannot pick their own (port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def warm_up_grpc_and_uvloop() -> None:
    """grpcio creates process-wide threads and descriptors on first use, and so does uvloop
    (libuv keeps two descriptors for the process): call this (in a module-scoped fixture)
    before any ``leak_check`` snapshot is taken."""
    import grpc

    from grpcbridge.loops import loop_factory

    loop_factory("uvloop")().close()
    executor = ThreadPoolExecutor(2)
    server = grpc.server(executor)
    server.add_insecure_port("127.0.0.1:0")
    server.start()
    server.stop(None).wait()
    executor.shutdown()


def tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A fresh trustme CA and a certificate it signed for 127.0.0.1 and localhost, written to
    ``directory``: ``(ca.pem, cert.pem, key.pem)``."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    ca_pem, cert_pem, key_pem = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    for i, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(cert_pem), append=i > 0)
    leaf.private_key_pem.write_to_path(str(key_pem))
    return ca_pem, cert_pem, key_pem


@dataclass(frozen=True)
class Snapshot:
    fds: int
    threads: set[str]
    children: set[int]


def snapshot() -> Snapshot:
    me = psutil.Process()
    return Snapshot(
        fds=me.num_fds(),
        threads={t.name for t in threading.enumerate()},
        children={child.pid for child in me.children(recursive=True)},
    )


async def asgi_upgrade(app: object, *, path: str = "/grpc",
                       headers: Sequence[tuple[bytes, bytes]] = ((b"host", b"bridge.test"),),
                       ) -> list[dict[str, object]]:
    """Call an ASGI app (``BridgeApp``) with one WebSocket upgrade, as a server supporting
    the ``websocket.http.response`` extension would; the messages the app sent back."""
    assert callable(app)
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(dict(message))

    scope = {"type": "websocket", "path": path, "query_string": b"", "headers": list(headers),
             "client": ("192.0.2.1", 5), "extensions": {"websocket.http.response": {}}}
    await app(scope, receive, send)
    return sent


class RawBackend:
    """An asyncio TCP server that records what it receives and can write back."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.writers: list[asyncio.StreamWriter] = []
        self.accepted = 0
        self.eofs = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.append(writer)
        try:
            while chunk := await reader.read(65536):
                self.received += chunk
        except ConnectionError:
            pass
        self.eofs += 1
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            await self.server.wait_closed()



def sample(bridge: Any, name: str, **labels: str) -> float:
    """A metric sample of an in-process bridge (0 when absent)."""
    value = bridge.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def http_request(port: int, request: str, within: float = 5.0, *,
                       host: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    """Send a raw HTTP/1.1 request and read the response until the server closes (every
    grpcbridge listener answers one request per connection): ``(status, headers, body)``,
    header names in lower case. A repeated ``Content-Length`` fails the test."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request.encode())
        async with asyncio.timeout(timing(within)):
            data = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        assert not (name == "content-length" and name in headers), f"two {name}: {head!r}"
        headers[name] = value.strip()
    return int(lines[0].split()[1]), headers, body


async def http_get(port: int, path: str, headers: dict[str, str] | None = None, *,
                   host: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    """``GET path`` with ``headers``: :func:`http_request`'s ``(status, headers, body)``."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return await http_request(port, "\r\n".join(lines) + "\r\n\r\n", host=host)


class Metrics:
    """Scrapes the /metrics of a ``grpcbridge serve`` subprocess (of its supervisor under
    ``--workers N``: the line that names a metrics port)."""

    def __init__(self, bridge: Process) -> None:
        line = bridge.wait_for_line(r"bridge_started .*metrics=\S+:\d+")
        host, port = re.search(r"metrics=(\S+):(\d+)", line).groups()  # type: ignore[union-attr]
        self.host, self.port = host, int(port)

    async def scrape(self) -> dict[str, float]:
        status, headers, body = await http_get(self.port, "/metrics", host=self.host)
        assert status == 200, (status, body)
        assert int(headers["content-length"]) == len(body), headers
        text = body.decode()
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    async def settled(self, tunnels: int) -> dict[str, float]:
        """The metrics once no tunnel is active and ``tunnels`` have been counted as closed
        (or as they are after 15 s)."""
        samples: dict[str, float] = {}

        async def done() -> bool:
            nonlocal samples
            samples = await self.scrape()
            return samples.get("grpcbridge_tunnels_active") == 0 and closed(samples) == tunnels

        await eventually(done, 15, interval=0.1, fail=False)
        return samples


def closed(samples: dict[str, float]) -> int:
    """Tunnels counted as closed, over all close codes."""
    return int(sum(value for name, value in samples.items()
                   if name.startswith("grpcbridge_tunnels_closed_total{")))
