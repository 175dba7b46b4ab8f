"""Backpressure through a real ``grpcbridge serve`` process (and, at the end, through a
``grpcbridge forward`` process in front of it): 256 MiB each way between a fast and a slow
side, every byte delivered in order, and each process's memory stays flat.

The backend is ``tests/peer_stream.py`` in its own process (a raw TCP server told over the
tunnel what to do), the WebSocket client runs in the test process; the slow side of each
transfer reads at :data:`SLOW_RATE`, several times below what the bridge relays unthrottled
on a 2-core machine (~300 MiB/s), so without working flow control the bridge would take in
the surplus at hundreds of MiB per second.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from peer_stream import digest, payload
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError

from support import MiB, Process, cli, eventually, wait_until

TOTAL = 256 * MiB
#: Reading rate of the slow side (bytes/s): 256 MiB take ~6.4 s.
SLOW_RATE = 40 * MiB
#: Allowed growth of the bridge's RSS over its idle baseline (taken after warm-up tunnels
#: in both directions, so the allocator already holds what relaying big chunks needs).
#: What one tunnel may hold at once: per direction the transport write buffer up to its
#: high-water mark (--buffer-bytes, 256 KiB) plus the overshoot of the write that crossed it
#: (one 256 KiB socket read towards the client, or the frames decoded from one 256 KiB read
#: towards the backend), the websockets parser's partial frame (< 64 KiB messages here) and
#: the transient copies on the frame path (unmasking, frame encoding): about 2 MiB in all,
#: measured 1-2 MiB. 8 MiB leaves 4x that for allocator slack (glibc keeps freed chunks of
#: this size in the heap instead of returning them) while still catching any unbounded
#: buffering at once: the surplus would grow by hundreds of MiB per second.
RSS_BOUND = 8 * MiB

_PEER = Path(__file__).resolve().parents[1] / "peer_stream.py"
_HWM = re.compile(r"^VmHWM:\s+(\d+) kB", re.MULTILINE)


class Peer:
    """The peer_stream.py backend process and what it printed."""

    def __init__(self) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, str(_PEER)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            text=True)
        assert self.popen.stdout is not None
        first = self.popen.stdout.readline()
        assert first.startswith("listening "), first
        self.port = int(first.split()[1])
        self.lines: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.strip())

    def done_seconds(self, command: str, timeout: float = 10.0) -> float:
        """Seconds the peer spent on ``command`` (e.g. ``"SOURCE 268435456 7"``)."""
        prefix = f"done {command} seconds="
        done: list[str] = []

        def finished() -> bool:
            done.extend(line for line in list(self.lines) if line.startswith(prefix))
            return bool(done)

        wait_until(finished, timeout,
                   message=lambda: f"peer never finished {command!r}: {self.lines}")
        return float(done[0].rsplit("=", 1)[1])

    def stop(self) -> None:
        self.popen.kill()
        self.popen.wait()


@pytest.fixture(scope="module")
def peer() -> Iterator[Peer]:
    process = Peer()
    try:
        yield process
    finally:
        process.stop()


@contextmanager
def bridge_for(peer: Peer, *extra: str) -> Iterator[Process]:
    with cli(["serve", "--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{peer.port}",
              "--max-upgrades-per-minute", "0", *extra]) as process:
        yield process


class PeakRss:
    """Peak RSS of a process from now on: the kernel's high-water mark (VmHWM, reset through
    /proc/<pid>/clear_refs) where allowed, and in any case the maximum of samples taken
    every 5 ms by a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.process = psutil.Process(pid)
        self.sampled = 0
        self.exact = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            self.exact = False
        self.sampled = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.sampled = max(self.sampled, self.process.memory_info().rss)

    @property
    def peak(self) -> int:
        if not self.exact:
            return self.sampled
        match = _HWM.search(Path(f"/proc/{self.pid}/status").read_text())
        assert match is not None
        return max(self.sampled, int(match.group(1)) * 1024)


def ws_connect(url: str, **kwargs: object) -> connect:
    return connect(url, compression=None, max_size=None, proxy=None, open_timeout=10,
                   **kwargs)  # type: ignore[arg-type]


async def push(ws: ClientConnection, total: int, seed: int) -> str:
    """Send payload(total, seed) as one message per chunk; return its sha256."""
    sha = hashlib.sha256()
    for chunk in payload(total, seed):
        sha.update(chunk)
        await ws.send(chunk)
    return sha.hexdigest()


async def paced(chunks: AsyncIterator[bytes], rate: float) -> tuple[int, str]:
    """Take ``chunks`` at most ``rate`` bytes/s (0: as fast as they come); return (byte
    count, sha256)."""
    sha = hashlib.sha256()
    count = 0
    started = time.monotonic()
    async for chunk in chunks:
        sha.update(chunk)
        count += len(chunk)
        if rate:
            ahead = count / rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
    return count, sha.hexdigest()


async def pull(ws: ClientConnection, rate: float = 0) -> tuple[int, str]:
    """Receive until the bridge closes, at most ``rate`` bytes/s (0: as fast as it comes);
    return (byte count, sha256)."""

    async def messages() -> AsyncIterator[bytes]:
        with contextlib.suppress(ConnectionClosedError):  # the caller checks ws.close_code
            async for message in ws:
                assert isinstance(message, bytes), "the bridge sends binary messages only"
                yield message

    return await paced(messages(), rate)


async def warm_up(url: str) -> None:
    """One tunnel each way at full speed, so the baseline includes the allocator's growth."""
    size = 16 * MiB
    async with ws_connect(url) as ws:
        await ws.send(f"SINK {size} 0\n".encode())
        sent = await push(ws, size, seed=1)
        assert await ws.recv() == f"{size} {sent}\n".encode()
    async with ws_connect(url) as ws:
        await ws.send(f"SOURCE {size} 2\n".encode())
        assert await pull(ws) == (size, digest(size, 2))


async def settled_rss(*processes: Process) -> list[int]:
    """RSS of ``processes``, idle again: the caller has waited for their tunnels to end.
    What remains is the allocator handing the freed buffers back to the OS, which nothing
    signals and RSS polling cannot tell from noise, so a short settle time is unavoidable
    here. It cannot make a test flaky: measured early, the baseline is only higher and the
    growth checked against it smaller."""
    await asyncio.sleep(0.3)
    return [process.rss() for process in processes]


async def idle_baseline(bridge: Process) -> int:
    await warm_up(bridge.url)
    bridge.wait_for_line(r"tunnel_closed .*bytes_to_client=16777216")
    return (await settled_rss(bridge))[0]


def report(name: str, baseline: int, peak: PeakRss, seconds: float,
           process: str = "bridge") -> None:
    print(f"\n{name}: {TOTAL / MiB:.0f} MiB in {seconds:.1f} s ({TOTAL / MiB / seconds:.1f} MiB/s);"
          f" {process} RSS baseline {baseline / MiB:.1f} MiB, peak {peak.peak / MiB:.1f} MiB"
          f" (+{(peak.peak - baseline) / MiB:.2f} MiB; sampled +"
          f"{(peak.sampled - baseline) / MiB:.2f} MiB, exact={peak.exact})")


# The relay must hold its bounds and lose nothing on both event loops the CLI offers
# (uvloop keeps references to written buffers and ignores some pauses; asyncio copies).
LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


@LOOPS
async def test_client_to_slow_backend(peer: Peer, loop: str) -> None:
    """A client pushing 256 MiB at a backend that reads at 40 MiB/s: the bridge stops reading
    the WebSocket while the backend lags, the client is held back, nothing is lost."""
    with bridge_for(peer, "--loop", loop) as bridge:
        baseline = await idle_baseline(bridge)
        with PeakRss(bridge.pid) as peak:
            started = time.monotonic()
            async with ws_connect(bridge.url) as ws:
                await ws.send(f"SINK {TOTAL} {SLOW_RATE}\n".encode())
                sent = await push(ws, TOTAL, seed=7)
                send_seconds = time.monotonic() - started
                reply = await asyncio.wait_for(ws.recv(), 30)
            seconds = time.monotonic() - started
        report("client -> slow backend", baseline, peak, seconds)
        assert peak.peak - baseline <= RSS_BOUND, (
            f"bridge RSS grew by {(peak.peak - baseline) / MiB:.1f} MiB")
        count, received = reply.split()
        assert (int(count), received) == (TOTAL, sent.encode())
        assert peer.done_seconds(f"SINK {TOTAL} {SLOW_RATE}") >= TOTAL / SLOW_RATE * 0.95
        # The sender was held back by the slow reader end to end: unthrottled it would be
        # done in ~1 s; with flow control it can only be ahead by what the socket buffers
        # and the bridge's bounded buffers hold (a few MiB, far below half the stream).
        assert send_seconds >= 0.5 * TOTAL / SLOW_RATE, send_seconds
        command = f"SINK {TOTAL} {SLOW_RATE}\n"
        bridge.wait_for_line(rf"tunnel_closed .*bytes_to_backend={TOTAL + len(command)} ")


@LOOPS
async def test_backend_to_slow_client(peer: Peer, loop: str) -> None:
    """A backend writing 256 MiB as fast as it can to a client reading at 40 MiB/s: the
    bridge stops reading from the backend while the client lags, nothing is lost."""
    with bridge_for(peer, "--loop", loop) as bridge:
        baseline = await idle_baseline(bridge)
        expected = digest(TOTAL, 7)
        with PeakRss(bridge.pid) as peak:
            started = time.monotonic()
            async with ws_connect(bridge.url, max_queue=4) as ws:
                await ws.send(f"SOURCE {TOTAL} 7\n".encode())
                count, received = await pull(ws, SLOW_RATE)
            seconds = time.monotonic() - started
        report("backend -> slow client", baseline, peak, seconds)
        assert peak.peak - baseline <= RSS_BOUND, (
            f"bridge RSS grew by {(peak.peak - baseline) / MiB:.1f} MiB")
        assert (count, received) == (TOTAL, expected)
        assert ws.close_code == 1000, (ws.close_code, ws.close_reason)
        # The backend was held back too: it could write 256 MiB in well under a second.
        assert peer.done_seconds(f"SOURCE {TOTAL} 7") >= 0.5 * TOTAL / SLOW_RATE


async def test_slow_reader_gets_the_tail_after_the_backend_closed(peer: Peer) -> None:
    """The backend writes 20 MiB and closes at once; the bridge (with room for all of it in
    --buffer-bytes) queues its close frame behind the data. A client that keeps reading,
    slowly, must still get every byte and the normal close: the closing-handshake timeout
    (2 s) may only drop a peer that stopped reading, not one still draining the data."""
    size = 20 * MiB
    with bridge_for(peer, "--buffer-bytes", str(32 * MiB)) as bridge:
        sock = socket.socket()
        # A small receive buffer keeps the kernel from taking the data off the bridge's hands.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.connect(("127.0.0.1", bridge.port))
        sock.setblocking(False)
        async with ws_connect(bridge.url, sock=sock, max_queue=1) as ws:
            await ws.send(f"SOURCE {size} 5\n".encode())
            count, received = await pull(ws, rate=6 * MiB)  # ~3.3 s
            code = ws.close_code
        assert (count, received, code) == (size, digest(size, 5), 1000)
        line = bridge.wait_for_line(r"tunnel_closed .*bytes_to_client=20971520")
        assert "code=1000" in line, line


# ------------------------------------------------------------------ through a forwarder
# The same transfers with a ``grpcbridge forward`` process (picows client framing) between a
# raw local TCP client and the bridge: every byte in order, and neither process's memory
# grows with the surplus of the fast side.


@contextmanager
def forwarder_for(bridge: Process, loop: str) -> Iterator[Process]:
    with cli(["forward", "--listen", "127.0.0.1:0", "--target", bridge.url,
              "--loop", loop]) as process:
        yield process


async def local_push(port: int, total: int, seed: int, rate: int) -> tuple[str, bytes, float]:
    """Over a local connection: ``SINK``, then payload(total, seed) as fast as the connection
    takes it; return (its sha256, the peer's answer, seconds spent sending)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        started = time.monotonic()
        writer.write(f"SINK {total} {rate}\n".encode())
        sha = hashlib.sha256()
        for chunk in payload(total, seed):
            sha.update(chunk)
            writer.write(chunk)
            await writer.drain()
        sent = time.monotonic() - started
        answer = await asyncio.wait_for(reader.readline(), 30)
        return sha.hexdigest(), answer, sent
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def local_pull(port: int, total: int, seed: int, rate: float) -> tuple[int, str]:
    """Over a local connection: ``SOURCE``, then read until the forwarder closes, at most
    ``rate`` bytes/s (0: as fast as it comes); return (byte count, sha256)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=64 * 1024)

    async def chunks() -> AsyncIterator[bytes]:
        while chunk := await reader.read(64 * 1024):
            yield chunk

    try:
        writer.write(f"SOURCE {total} {seed}\n".encode())
        return await paced(chunks(), rate)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def forwarded_baseline(bridge: Process, forwarder: Process) -> tuple[int, int]:
    """Idle RSS of (bridge, forwarder) after one full-speed transfer each way."""
    size = 16 * MiB
    idle_fds = forwarder.fds()
    sent, answer, _ = await local_push(forwarder.port, size, 1, 0)
    assert answer == f"{size} {sent}\n".encode()
    assert await local_pull(forwarder.port, size, 2, 0) == (size, digest(size, 2))
    pushed = size + len(f"SINK {size} 0\n")  # local_push's command, then the payload
    bridge.wait_for_line(rf"tunnel_closed .*bytes_to_backend={pushed}\b")
    bridge.wait_for_line(r"tunnel_closed .*bytes_to_client=16777216")
    # The forwarder logs no tunnel ends: its sockets for them are gone once it is idle.
    await eventually(lambda: forwarder.fds() <= idle_fds,
                     message="the forwarder kept its tunnels' sockets")
    bridge_rss, forwarder_rss = await settled_rss(bridge, forwarder)
    return bridge_rss, forwarder_rss


def check_growth(name: str, baselines: tuple[int, int], peaks: tuple[PeakRss, PeakRss],
                 seconds: float) -> None:
    for process, baseline, peak in zip(("bridge", "forwarder"), baselines, peaks, strict=True):
        report(name, baseline, peak, seconds, process)
        assert peak.peak - baseline <= RSS_BOUND, (
            f"{process} RSS grew by {(peak.peak - baseline) / MiB:.1f} MiB")


@LOOPS
async def test_forwarded_client_to_slow_backend(peer: Peer, loop: str) -> None:
    """A local client pushing 256 MiB through the forwarder and the bridge at a backend that
    reads at 40 MiB/s: the forwarder stops reading its local client while the tunnel is
    held back, nothing is lost."""
    with bridge_for(peer, "--loop", loop) as bridge, forwarder_for(bridge, loop) as forwarder:
        baselines = await forwarded_baseline(bridge, forwarder)
        with PeakRss(bridge.pid) as bridge_peak, PeakRss(forwarder.pid) as forwarder_peak:
            started = time.monotonic()
            sent, answer, send_seconds = await local_push(forwarder.port, TOTAL, 7, SLOW_RATE)
            seconds = time.monotonic() - started
        check_growth("forwarded client -> slow backend", baselines,
                     (bridge_peak, forwarder_peak), seconds)
        assert answer == f"{TOTAL} {sent}\n".encode()
        assert peer.done_seconds(f"SINK {TOTAL} {SLOW_RATE}") >= TOTAL / SLOW_RATE * 0.95
        assert send_seconds >= 0.5 * TOTAL / SLOW_RATE, send_seconds


@LOOPS
async def test_backend_to_slow_forwarded_client(peer: Peer, loop: str) -> None:
    """A backend writing 256 MiB as fast as it can, through the bridge and the forwarder, to
    a local client reading at 40 MiB/s: nothing is lost, the backend is held back."""
    with bridge_for(peer, "--loop", loop) as bridge, forwarder_for(bridge, loop) as forwarder:
        baselines = await forwarded_baseline(bridge, forwarder)
        with PeakRss(bridge.pid) as bridge_peak, PeakRss(forwarder.pid) as forwarder_peak:
            started = time.monotonic()
            count, received = await local_pull(forwarder.port, TOTAL, 7, SLOW_RATE)
            seconds = time.monotonic() - started
        check_growth("backend -> slow forwarded client", baselines,
                     (bridge_peak, forwarder_peak), seconds)
        assert (count, received) == (TOTAL, digest(TOTAL, 7))
        assert peer.done_seconds(f"SOURCE {TOTAL} 7") >= 0.5 * TOTAL / SLOW_RATE
        line = bridge.wait_for_line(rf"tunnel_closed .*bytes_to_client={TOTAL}\b")
        assert "code=1000" in line, line
