"""Helpers for the hostile-client tests (tests/server/test_hostile.py): raw WebSocket clients on
plain sockets driven by websockets' sans-I/O protocol, misbehaving backends, and a flooder
that runs as its own process (``python tests/hostile.py flood ...``) so that its CPU use
does not blur what the test process measures.

Frames are built by websockets (``Frame(...).serialize(mask=True)`` or
``ClientProtocol.send_*``); only truncating a serialized frame (an incomplete message) is
done by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

MiB = 1024 * 1024

#: Duration of test_soak_mixed_abuse.
SOAK_SECONDS = float(os.environ.get("GRPCBRIDGE_SOAK_SECONDS") or "60")

#: What must never appear in a bridge's stderr.
CRASH_MARKERS = ("Traceback", "Task exception", "AssertionError", "Fatal error on transport",
                 "RuntimeError", "Exception in callback", "was never retrieved")

#: Environment for a bridge whose RSS is measured: glibc's malloc then serves every block
#: above 128 KiB with its own mmap and unmaps it on free (no dynamic threshold), so RSS
#: follows what the bridge still references instead of what the allocator kept cached.
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def crash_lines(lines: Sequence[str]) -> list[str]:
    return [line for line in lines if any(marker in line for marker in CRASH_MARKERS)]


def log_count(lines: Sequence[str], event: str, **fields: str) -> int:
    """How many ``event`` log lines (key=value format) carry all of ``fields``."""
    wanted = {f"{key}={value}" for key, value in fields.items()}
    return sum(1 for line in lines
               if event in (tokens := set(line.split())) and wanted <= tokens)


# ------------------------------------------------------------------------ frames


def binary_frame(payload: bytes) -> bytes:
    """One complete masked binary frame (a whole message)."""
    return Frame(Opcode.BINARY, payload).serialize(mask=True)


def empty_frames(count: int) -> bytes:
    """``count`` masked empty binary frames (6 bytes each)."""
    return b"".join(Frame(Opcode.BINARY, b"").serialize(mask=True) for _ in range(count))


def ping_frames(count: int) -> bytes:
    """``count`` masked empty pings (6 bytes each)."""
    return b"".join(Frame(Opcode.PING, b"").serialize(mask=True) for _ in range(count))


def incomplete_frame(size: int, sent: int) -> tuple[bytes, bytes]:
    """A masked binary frame of ``size`` payload bytes split after its header and ``sent``
    payload bytes: (what to send now, the rest)."""
    frame = Frame(Opcode.BINARY, os.urandom(size)).serialize(mask=True)
    header = len(frame) - size
    return frame[:header + sent], frame[header + sent:]


# --------------------------------------------------------------- raw WebSocket


class Rejected(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"upgrade refused with HTTP {status}: {body[:200]!r}")
        self.status = status
        self.body = body


@dataclass(eq=False)
class RawWebSocket:
    """A client WebSocket on a non-blocking socket, in the running asyncio loop.

    A reader task parses what the server sends (with websockets' ClientProtocol): it counts
    pongs, notes the close frame's code, and (with ``reply``) answers the closing
    handshake. Writes are raw: whole serialized frames, or any prefix of them."""

    sock: socket.socket
    protocol: ClientProtocol
    source: str
    reply: bool = True
    close_code: int | None = None
    close_reason: str = ""
    pongs: int = 0
    received: int = 0
    eof: bool = False
    sent: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, url: str, *, source: str = "127.0.0.1",
                      headers: Sequence[tuple[str, str]] = (), within: float = 5.0,
                      reply: bool = True) -> RawWebSocket:
        """Open a tunnel; raises :class:`Rejected` if the server answers anything but 101."""
        loop = asyncio.get_running_loop()
        uri = parse_uri(url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.bind((source, 0))
            await asyncio.wait_for(loop.sock_connect(sock, (uri.host, uri.port)), within)
            protocol = ClientProtocol(uri, max_size=None)
            request = protocol.connect()
            for name, value in headers:
                request.headers[name] = value
            protocol.send_request(request)
            await loop.sock_sendall(sock, b"".join(protocol.data_to_send()))
            response: Response | None = None
            async with asyncio.timeout(within):
                while response is None:
                    data = await loop.sock_recv(sock, 65536)
                    if data:
                        protocol.receive_data(data)
                    else:
                        protocol.receive_eof()
                    for event in protocol.events_received():
                        if isinstance(event, Response):
                            response = event
                    if not data and response is None:
                        raise ConnectionError("connection closed during the upgrade")
            if response.status_code != 101:
                raise Rejected(response.status_code, response.body or b"")
            if protocol.handshake_exc is not None:
                raise protocol.handshake_exc
        except BaseException:
            sock.close()
            raise
        ws = cls(sock, protocol, source, reply=reply)
        ws._reader = loop.create_task(ws._read())
        return ws

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        protocol = self.protocol
        try:
            while True:
                data = await loop.sock_recv(self.sock, 262144)
                if not data:
                    self.eof = True
                    with contextlib.suppress(Exception):
                        protocol.receive_eof()
                    break
                self.received += len(data)
                protocol.receive_data(data)
                for event in protocol.events_received():
                    if isinstance(event, Frame):
                        if event.opcode is Opcode.PONG:
                            self.pongs += 1
                        elif event.opcode is Opcode.CLOSE and self.close_code is None:
                            rcvd = protocol.close_rcvd
                            self.close_code = rcvd.code if rcvd is not None else 1005
                            self.close_reason = rcvd.reason if rcvd is not None else ""
                            self.done.set()
                replies = protocol.data_to_send()
                if self.reply:
                    for chunk in replies:
                        if chunk:
                            await loop.sock_sendall(self.sock, chunk)
        except OSError:
            self.eof = True
        finally:
            self.done.set()

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)
        self.sent += len(data)

    async def push_until_blocked(self, message: bytes, stall: float = 0.5,
                                 limit: int | None = None) -> int:
        """Send ``message`` over and over until no byte leaves for ``stall`` seconds (the
        peer stopped reading), the server closed, or ``limit`` bytes went. Returns bytes
        sent; stops at a message boundary only by chance."""
        view = memoryview(message)
        offset = 0
        pushed = 0
        last = time.monotonic()
        while not self.done.is_set() and (limit is None or pushed < limit):
            try:
                n = self.sock.send(view[offset:])
            except BlockingIOError:
                n = 0
            except OSError:
                break
            if n:
                pushed += n
                offset = (offset + n) % len(message)
                last = time.monotonic()
                await asyncio.sleep(0)
            elif time.monotonic() - last > stall:
                break
            else:
                await asyncio.sleep(0.005)
        self.sent += pushed
        return pushed

    async def wait_closed(self, within: float) -> int | None:
        """Wait until the server sent a close frame or dropped the connection; the code
        (None: dropped without one, or still open after ``within`` seconds)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), within)
        return self.close_code

    async def _stop_reader(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None

    async def close(self) -> None:
        """Close the socket (FIN), no closing handshake."""
        await self._stop_reader()
        self.sock.close()

    async def abort(self) -> None:
        """Reset the connection (SO_LINGER 0: RST)."""
        await self._stop_reader()
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


async def upgrade_status(url: str, *, source: str = "127.0.0.1",
                         headers: Sequence[tuple[str, str]] = ()) -> int:
    """The HTTP status of one upgrade attempt (the tunnel, if any, is closed at once)."""
    try:
        ws = await RawWebSocket.connect(url, source=source, headers=headers)
    except Rejected as exc:
        return exc.status
    await ws.abort()
    return 101


async def raw_exchange(port: int, data: bytes, *, source: str = "127.0.0.1",
                       within: float = 5.0) -> tuple[bytes, bool]:
    """Send ``data`` in one write, read until the server closes. Returns (everything
    received, whether the server closed within ``within`` seconds)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    received = bytearray()
    closed = False
    try:
        sock.setblocking(False)
        sock.bind((source, 0))
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, data)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while True:
                    try:
                        chunk = await loop.sock_recv(sock, 65536)
                    except ConnectionResetError:
                        chunk = b""
                    if not chunk:
                        closed = True
                        break
                    received += chunk
    finally:
        sock.close()
    return bytes(received), closed


def statuses(data: bytes) -> list[int]:
    """Status codes of the HTTP responses in ``data``."""
    return [int(code) for code in re.findall(rb"(?m)^HTTP/1\.1 (\d{3}) ", data)]


# -------------------------------------------------------------------- backends


class _Held(asyncio.Protocol):
    def __init__(self, owner: ScriptedBackend) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.owner.connections.append(self)
        if self.owner.mode == "stuck":
            transport.pause_reading()  # type: ignore[attr-defined]
        self.owner.changed.set()

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.owner.mode == "reset" and self.received >= self.owner.reset_after:
            assert self.transport is not None
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()
            self.owner.resets += 1
        self.owner.changed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.lost += 1
        self.owner.changed.set()


class ScriptedBackend:
    """A TCP backend in the test's loop. ``mode``: ``stuck`` accepts and never reads,
    ``reset`` reads ``reset_after`` bytes then resets the connection (RST), ``sink`` reads
    and discards everything."""

    def __init__(self, mode: str, reset_after: int = 64 * 1024) -> None:
        self.mode = mode
        self.reset_after = reset_after
        self.connections: list[_Held] = []
        self.resets = 0
        self.lost = 0
        self.changed = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> ScriptedBackend:
        self.server = await asyncio.get_running_loop().create_server(
            lambda: _Held(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for connection in self.connections:
            if connection.transport is not None:
                connection.transport.abort()
        await asyncio.sleep(0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.server.wait_closed(), 5)


@contextlib.contextmanager
def todo_service() -> Iterator[int]:
    """The grpcio Todo service (the test oracle) in its own process; yields its port."""
    from todo_oracle import process  # imports grpc: not needed in the flooder process

    with process() as (_, port):
        yield port


# --------------------------------------------------------------------- flooder


@dataclass
class FloodReport:
    tunnels: int = 0
    codes: list[int | None] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    bytes_sent: int = 0
    pongs: int = 0
    first_close_after: float | None = None


async def flood(url: str, kind: str, seconds: float, source: str) -> FloodReport:
    """Flood ``url`` with masked empty binary frames (``empty``) or pings (``ping``, pongs
    read) for ``seconds``; when the bridge closes the tunnel, open another."""
    report = FloodReport()
    blob = (empty_frames if kind == "empty" else ping_frames)(16384)  # 96 KiB a write
    started = time.monotonic()
    deadline = started + seconds
    loop = asyncio.get_running_loop()
    while time.monotonic() < deadline:
        try:
            ws = await RawWebSocket.connect(url, source=source)
        except Rejected as exc:
            report.rejected.append(exc.status)
            await asyncio.sleep(0.1)
            continue
        except OSError:
            await asyncio.sleep(0.1)
            continue
        report.tunnels += 1
        try:
            while time.monotonic() < deadline and not ws.done.is_set():
                send = loop.sock_sendall(ws.sock, blob)
                try:
                    await asyncio.wait_for(send, max(0.01, deadline - time.monotonic()))
                except TimeoutError:
                    break
                except OSError:
                    break
                report.bytes_sent += len(blob)
            if not ws.done.is_set() and time.monotonic() < deadline:
                await ws.wait_closed(max(0.01, deadline - time.monotonic()))
        finally:
            report.pongs += ws.pongs
            report.codes.append(ws.close_code)
            if ws.close_code is not None and report.first_close_after is None:
                report.first_close_after = round(time.monotonic() - started, 3)
            await ws.abort()
    return report


def start_flooder(url: str, kind: str, seconds: float, source: str) -> subprocess.Popen[str]:
    """``flood`` in its own process; :func:`flooder_report` collects what it saw."""
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "flood", url, "--kind", kind,
         "--seconds", str(seconds), "--source", source],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def flooder_report(popen: subprocess.Popen[str], timeout: float) -> FloodReport:
    try:
        out, err = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        popen.kill()
        out, err = popen.communicate()
        raise AssertionError(f"flooder did not finish: {err}") from None
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert popen.returncode == 0 and lines, f"flooder failed ({popen.returncode}): {err}"
    return FloodReport(**json.loads(lines[-1]))


@contextlib.contextmanager
def flooding(url: str, kind: str, seconds: float, source: str) -> Iterator[subprocess.Popen[str]]:
    popen = start_flooder(url, kind, seconds, source)
    try:
        yield popen
    finally:
        if popen.poll() is None:
            popen.kill()
        popen.communicate()


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("flood")
    cmd.add_argument("url")
    cmd.add_argument("--kind", choices=["empty", "ping"], default="empty")
    cmd.add_argument("--seconds", type=float, default=8.0)
    cmd.add_argument("--source", default="127.0.0.1")
    args = parser.parse_args(argv)
    report = asyncio.run(flood(args.url, args.kind, args.seconds, args.source))
    print(json.dumps(report.__dict__), flush=True)
    return 0


# ------------------------------------------------------------- soak abusers
#
# Each runs until ``until`` (loop.time() of the test's loop is not used: time.monotonic())
# or until cancelled, closes every socket it opened, and returns what it did.

UPGRADE_HEAD = ("GET /grpc HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n")


async def _raw_connect(port: int, source: str) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    try:
        sock.setblocking(False)
        sock.bind((source, 0))
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 5)
    except BaseException:
        sock.close()
        raise
    return sock


async def abuse_slowloris(port: int, source: str, until: float, connections: int = 10
                          ) -> dict[str, int]:
    """Connections that send an upgrade request a byte every 0.5 s, forever (reopened
    when the bridge drops them)."""
    loop = asyncio.get_running_loop()
    head = (UPGRADE_HEAD.format(host=f"127.0.0.1:{port}") + "X-Slow: " + "a" * 4000).encode()
    stats = {"opened": 0, "dropped": 0}

    async def one() -> None:
        while time.monotonic() < until:
            try:
                sock = await _raw_connect(port, source)
            except OSError:
                await asyncio.sleep(0.2)
                continue
            stats["opened"] += 1
            try:
                for i in range(len(head)):
                    if time.monotonic() >= until:
                        return
                    await loop.sock_sendall(sock, head[i:i + 1])
                    await asyncio.sleep(0.5)
            except OSError:
                stats["dropped"] += 1
            finally:
                sock.close()

    await asyncio.gather(*(one() for _ in range(connections)))
    return stats


PIPELINED = [
    b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 2,
    UPGRADE_HEAD.format(host="127.0.0.1").encode() + b"\r\n" + b"GET /x HTTP/1.1\r\n\r\n",
    b"HELLO WORLD\r\n\r\n",
    b"GET /grpc HTTP/1.1\nHost: 127.0.0.1\n\n",
    b"GET /grpc HTTP/1.1\r\nHost 127.0.0.1\r\n\r\n",
    b"GET /grpc HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\x00b\r\n\r\n",
]


async def abuse_pipelining(port: int, source: str, until: float) -> dict[str, int]:
    """Pipelined and malformed HTTP requests, one connection each, back to back."""
    stats = {"requests": 0, "answered": 0}
    i = 0
    while time.monotonic() < until:
        try:
            data, _ = await raw_exchange(port, PIPELINED[i % len(PIPELINED)], source=source,
                                         within=2)
        except OSError:
            data = b""
        stats["requests"] += 1
        stats["answered"] += bool(data)
        i += 1
        await asyncio.sleep(0.05)
    return stats


async def abuse_resets(url: str, source: str, until: float) -> dict[str, int]:
    """Tunnels reset (RST) in the middle of a message, some right after the upgrade."""
    payload = binary_frame(os.urandom(256 * 1024))
    stats = {"tunnels": 0, "rejected": 0}
    i = 0
    while time.monotonic() < until:
        try:
            ws = await RawWebSocket.connect(url, source=source)
        except Rejected:
            stats["rejected"] += 1
            await asyncio.sleep(0.2)
            continue
        except OSError:
            await asyncio.sleep(0.2)
            continue
        stats["tunnels"] += 1
        try:
            if i % 2:
                with contextlib.suppress(OSError, TimeoutError):
                    await asyncio.wait_for(ws.send(payload[:100_000 + i % 1000]), 2)
        finally:
            await ws.abort()
        i += 1
        await asyncio.sleep(0.1)
    return stats


async def abuse_trickle(url: str, source: str, until: float, parallel: int = 2,
                        size: int = 15 * MiB) -> dict[str, Any]:
    """Tunnels that send the header and ``size`` bytes of a 16 MiB message at once, then a
    byte a second; reopened when the bridge closes them."""
    head, rest = incomplete_frame(16 * MiB, size)
    stats: dict[str, Any] = {"tunnels": 0, "codes": []}

    async def one() -> None:
        while time.monotonic() < until:
            try:
                ws = await RawWebSocket.connect(url, source=source, reply=False)
            except (Rejected, OSError):
                await asyncio.sleep(0.5)
                continue
            stats["tunnels"] += 1
            try:
                await asyncio.wait_for(ws.send(head), 10)
                i = 0
                while time.monotonic() < until and not ws.done.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(ws.done.wait(), 1.0)
                    if not ws.done.is_set():
                        await ws.send(rest[i:i + 1])
                        i += 1
            except (OSError, TimeoutError):
                pass
            finally:
                stats["codes"].append(ws.close_code)
                await ws.abort()

    await asyncio.gather(*(one() for _ in range(parallel)))
    return stats


async def abuse_idle(url: str, port: int, source: str, until: float, count: int = 5
                     ) -> dict[str, int]:
    """``count`` TCP connections that never send a byte and ``count`` tunnels that go
    silent and never read (their write side shut: half-open), kept until ``until``."""
    stats = {"silent_connections": 0, "half_open_tunnels": 0}
    sockets: list[socket.socket] = []
    tunnels: list[RawWebSocket] = []
    try:
        while time.monotonic() < until:
            sockets = [s for s in sockets if s.fileno() != -1]
            while len(sockets) < count:
                try:
                    sockets.append(await _raw_connect(port, source))
                    stats["silent_connections"] += 1
                except OSError:
                    break
            alive = []
            for ws in tunnels:
                if ws.done.is_set():
                    await ws.abort()
                else:
                    alive.append(ws)
            tunnels = alive
            while len(tunnels) < count:
                try:
                    ws = await RawWebSocket.connect(url, source=source)
                except (Rejected, OSError):
                    break
                await ws._stop_reader()  # never reads again
                ws.done = asyncio.Event()
                with contextlib.suppress(OSError):
                    ws.sock.shutdown(socket.SHUT_WR)
                tunnels.append(ws)
                stats["half_open_tunnels"] += 1
            await asyncio.sleep(min(1.0, max(0.0, until - time.monotonic())))
            # Connections the bridge dropped (handshake timeout) read as EOF: replace them.
            for sock in sockets:
                try:
                    if sock.recv(1, socket.MSG_PEEK) == b"":
                        sock.close()
                except BlockingIOError:
                    pass
                except OSError:
                    sock.close()
    finally:
        for sock in sockets:
            sock.close()
        for ws in tunnels:
            await ws.abort()
    return stats


if __name__ == "__main__":
    sys.exit(_main())
