"""Shared test helpers: real subprocesses for the CLI, resource snapshots for leak checks."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import psutil

MiB = 1024 * 1024
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
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if regex.search(line):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r}; output:\n{self.output()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


def start_cli(args: Sequence[str], *, env: dict[str, str] | None = None,
              ready: bool = True, timeout: float = 15.0) -> Process:
    """Start ``grpcbridge <args>`` and wait until it logs that it listens."""
    popen = subprocess.Popen(
        [sys.executable, "-m", "grpcbridge.cli", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env={**os.environ, **(env or {})},
    )
    process = Process(popen)
    _PROCESSES.append(process)

    def pump() -> None:
        assert popen.stderr is not None
        for line in popen.stderr:
            process.lines.append(line.rstrip("\n"))
        popen.stderr.close()

    threading.Thread(target=pump, daemon=True).start()
    if ready:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(process.lines):
                match = _LISTEN_RE.search(line)
                if match:
                    process.listen = match.group(1)
                    return process
            if popen.poll() is not None:
                time.sleep(0.1)
                raise AssertionError(f"grpcbridge exited early:\n{process.output()}")
            time.sleep(0.02)
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


def wait_until(predicate: object, timeout: float = 10.0, interval: float = 0.02) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


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
