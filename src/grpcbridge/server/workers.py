"""``grpcbridge serve --workers N``: a supervisor and N bridge processes on one listening socket.

The supervisor (the ``grpcbridge serve`` process itself) binds the listening socket once
(TCP or unix; TLS stays in the workers) and starts N workers, each ``python -m grpcbridge.cli
serve`` with the same arguments, a fresh process (no fork of a running event loop). A worker
inherits the listening socket and its end of a control socket pair (``pass_fds``, named in
``$GRPCBRIDGE_WORKER``); the kernel gives each new connection to whichever worker accepts it
first. Through the control pair a worker says it is ready; when the supervisor is gone
(killed), the worker reads end-of-file there and drains as on SIGTERM.

The supervisor restarts a worker that exits on its own (with backoff; after
:attr:`Supervisor.CRASH_LIMIT` exits within :attr:`Supervisor.CRASH_WINDOW` seconds it gives
up and exits 1), passes SIGTERM/SIGINT on to every worker (each drains for
``--drain-timeout``; a second signal kills them) and serves the one ``--metrics-listen``:
workers record into prometheus-client's multiprocess files in a directory the supervisor
creates (``PROMETHEUS_MULTIPROC_DIR``, in the worker's environment before it imports
prometheus-client) and removes at exit (or, killed, the next supervisor does).

Per-client limits (tunnels, upgrades per minute, memory budgets) are kept by each worker for
the connections it accepted: they hold per worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from ..backends import SocketBackend
from ..core.config import BridgeConfig
from ..core.target import SocketAddress, host_port
from ..loops import loop_name
from ..observability import log_event
from ..sockets import remove_stale_socket
from .bridge import Bridge, endpoint
from .http import HttpServer

#: Environment variable naming a worker's inherited descriptors: ``LISTEN_FD,CONTROL_FD,INDEX``.
WORKER_ENV = "GRPCBRIDGE_WORKER"
_READY = b"ready\n"


_METRICS_PREFIX = "grpcbridge-metrics-"


def remove_stale_metrics_dirs() -> None:
    """Remove the metrics directories of supervisors that died without removing them
    (SIGKILL): ``grpcbridge-metrics-<pid>-*`` in the temporary directory, ours, with no
    process ``<pid>``."""
    root = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            pid = entry.name.removeprefix(_METRICS_PREFIX).partition("-")[0]
            if (entry.name.startswith(_METRICS_PREFIX) and pid.isdigit()
                    and entry.is_dir(follow_symlinks=False)
                    and entry.stat(follow_symlinks=False).st_uid == os.getuid()
                    and not _alive(int(pid))):
                shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        pass
    return True


def parse_workers(value: str) -> int:
    """``--workers``: a whole number >= 1, or ``auto`` (the number of cores)."""
    if value.strip().lower() == "auto":
        return os.cpu_count() or 1
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(
            f"must be a whole number >= 1 or 'auto' (one per core), got {value!r}")
    return number


def bind_listener(address: SocketAddress) -> socket.socket:
    """A listening socket on ``address`` for the workers to share (the first address a host
    name resolves to). Raises :class:`OSError` if it is taken."""
    where: Any
    if address.path is not None:
        remove_stale_socket(address.path)
        family, where = socket.AF_UNIX, address.path
    else:
        family, _, _, _, where = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    try:  # SO_REUSEADDR, and IPV6_V6ONLY for IPv6 (as asyncio's servers)
        return socket.create_server(where, family=family, backlog=1024)
    except OSError as exc:  # the message asyncio's create_server gives (a single process)
        # create_server re-raises errors without an errno (AF_UNIX path too long) as its own.
        original = exc.__context__ if isinstance(exc.__context__, OSError) else exc
        reason = os.strerror(exc.errno) if exc.errno else str(original)
        raise OSError(exc.errno, f"error while attempting to bind on address {where!r}: "
                                 f"{reason.lower()}") from None


@dataclass
class WorkerLink:
    """A worker's side: the inherited listening socket and control socket."""

    index: int
    listen: socket.socket
    control: socket.socket
    #: Waits for the supervisor's end, once started.
    watcher: asyncio.Task[None] | None = None

    @classmethod
    def from_environment(cls) -> WorkerLink | None:
        """The link a supervisor gave this process, or None (not a worker)."""
        spec = os.environ.pop(WORKER_ENV, None)
        if spec is None:
            return None
        listen_fd, control_fd, index = (int(part) for part in spec.split(","))
        return cls(index, socket.socket(fileno=listen_fd), socket.socket(fileno=control_fd))

    async def start(self, bridge: Bridge) -> None:
        """Start ``bridge`` on the inherited socket, tell the supervisor, and drain (SIGTERM to
        ourselves) once the supervisor is gone."""
        await bridge.start(sock=self.listen)
        self.control.setblocking(False)
        self.control.send(_READY)
        self.watcher = asyncio.get_running_loop().create_task(self._watch_supervisor())

    async def _watch_supervisor(self) -> None:
        with contextlib.suppress(OSError):  # it sends nothing: what ends the wait is its end
            while await asyncio.get_running_loop().sock_recv(self.control, 64):
                pass
        log_event("supervisor_gone", logging.WARNING)
        os.kill(os.getpid(), signal.SIGTERM)

    async def close(self) -> None:
        if self.watcher is not None:  # its cancelled read lets go of the socket's fd first
            self.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watcher
        self.control.close()


@dataclass(eq=False)
class _Worker:
    index: int
    process: asyncio.subprocess.Process
    control: socket.socket
    ready: bool = False


class Supervisor:
    """Runs ``workers`` bridge processes for ``config`` (``argv``: the ``serve`` command line,
    which each worker runs again) until SIGTERM/SIGINT; :meth:`run` returns the exit code."""

    #: A worker exiting this many times within :attr:`CRASH_WINDOW` seconds: give up.
    CRASH_LIMIT = 5
    CRASH_WINDOW = 60.0
    #: Seconds past the drain timeout after which workers still running are killed.
    STOP_GRACE = 30.0

    def __init__(self, config: BridgeConfig, argv: Sequence[str], workers: int) -> None:
        self.config = config
        #: What /readyz dials to tell whether the backend is reachable.
        self._backend_probe = SocketBackend(str(config.backend_address),
                                            connect_timeout=config.backend_connect_timeout)
        self.argv = list(argv)
        self.count = workers
        self._workers: dict[int, _Worker] = {}
        #: When workers exited on their own, within the last CRASH_WINDOW seconds.
        self._crashes: list[float] = []
        self._stop = asyncio.Event()
        #: Set once every worker is ready, or on a stop, whichever comes first.
        self._settled = asyncio.Event()
        self._ready = 0  # workers serving
        self._exit_code = 0
        self._signals = 0
        self._sock: socket.socket | None = None
        self._metrics_dir = ""
        self._kill_timer: asyncio.TimerHandle | None = None
        self.registry = CollectorRegistry()
        self._running = Gauge("grpcbridge_workers_ready", "Worker processes serving.",
                              registry=self.registry)
        self._restarts = Counter("grpcbridge_worker_restarts",
                                 "Workers restarted after exiting on their own.",
                                 registry=self.registry)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._sock = bind_listener(self.config.listen_address)
        remove_stale_metrics_dirs()
        self._metrics_dir = tempfile.mkdtemp(prefix=f"{_METRICS_PREFIX}{os.getpid()}-")
        MultiProcessCollector(self.registry, path=self._metrics_dir)  # type: ignore[no-untyped-call]
        metrics_server: HttpServer | None = None
        slots: list[asyncio.Task[None]] = []
        try:
            metrics_address = None
            if self.config.metrics_address is not None:
                metrics_server = HttpServer(self.registry, self._not_ready)
                metrics_address = await metrics_server.start(self.config.metrics_address)
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._signalled, signal.Signals(signum).name)
            slots = [loop.create_task(self._slot(index)) for index in range(self.count)]
            await self._settled.wait()
            if not self._stop.is_set():
                bound = (None if self.config.listen_address.path is not None
                         else self._sock.getsockname()[:2])
                log_event("bridge_started", listen=endpoint(self.config, bound),
                          backend=str(self.config.backend_address),
                          metrics="" if metrics_address is None else host_port(*metrics_address),
                          loop=loop_name(loop), workers=self.count)
            await asyncio.gather(*slots)
            log_event("bridge_stopped", workers=self.count)
            return self._exit_code
        finally:
            for task in slots:
                task.cancel()
            self._signal_all(signal.SIGKILL)  # left only after a failure in the supervisor
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            if self._kill_timer is not None:
                self._kill_timer.cancel()
            if metrics_server is not None:
                await metrics_server.close()
            self._sock.close()
            if self.config.listen_address.path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.config.listen_address.path)
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    # ------------------------------------------------------------- workers

    async def _slot(self, index: int) -> None:
        """Keep worker ``index`` running until the supervisor stops."""
        while not self._stop.is_set():
            worker = await self._spawn(index)
            code = await self._watch(worker)
            if self._stop.is_set():
                return
            if not self._settled.is_set() and not worker.ready:  # a first start failed
                self._fail(code if code > 0 else 1, "worker_failed_to_start", worker=index,
                           pid=worker.process.pid, code=code)
                return
            now = time.monotonic()
            self._crashes = [t for t in self._crashes if now - t < self.CRASH_WINDOW] + [now]
            if len(self._crashes) >= self.CRASH_LIMIT:
                self._fail(1, "workers_gave_up", worker=index, exits=self.CRASH_LIMIT,
                           window=self.CRASH_WINDOW)
                return
            backoff = min(0.2 * 2.0 ** (len(self._crashes) - 1), 5.0)
            self._restarts.inc()
            log_event("worker_restarting", logging.WARNING, worker=index, backoff=backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), backoff)

    async def _spawn(self, index: int) -> _Worker:
        assert self._sock is not None
        mine, theirs = socket.socketpair()
        listen_fd, control_fd = self._sock.fileno(), theirs.fileno()
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir,
               WORKER_ENV: f"{listen_fd},{control_fd},{index}"}
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "grpcbridge.cli", *self.argv, stdin=subprocess.DEVNULL,
                pass_fds=(listen_fd, control_fd), env=env)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        mine.setblocking(False)
        worker = _Worker(index, process, mine)
        self._workers[index] = worker
        log_event("worker_started", worker=index, pid=process.pid)
        return worker

    async def _watch(self, worker: _Worker) -> int:
        """Wait for the worker's "ready", then for its exit; its exit code (-N: signal N)."""
        loop = asyncio.get_running_loop()
        try:
            if await loop.sock_recv(worker.control, len(_READY)) == _READY:
                worker.ready = True
                self._ready_changed()
            code = await worker.process.wait()
        finally:
            worker.control.close()
            del self._workers[worker.index]
        mark_process_dead(worker.process.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
        self._ready_changed()
        how = (f"signal {signal.Signals(-code).name}"
               if code < 0 and -code in signal.valid_signals() else f"code {code}")
        level = logging.INFO if self._stop.is_set() and code == 0 else logging.WARNING
        log_event("worker_exited", level, worker=worker.index, pid=worker.process.pid,
                  exit=how)
        return code

    def _ready_changed(self) -> None:
        self._ready = sum(1 for worker in self._workers.values() if worker.ready)
        self._running.set(self._ready)
        if self._ready == self.count:
            self._settled.set()

    # ------------------------------------------------------------ stopping

    def _signalled(self, signame: str) -> None:
        self._signals += 1
        if self._signals == 1:
            log_event("supervisor_stopping", signal=signame, workers=len(self._workers))
            self._begin_stop()
        else:
            log_event("supervisor_killing", logging.WARNING, signal=signame,
                      workers=len(self._workers))
            self._signal_all(signal.SIGKILL)

    def _fail(self, exit_code: int, event: str, **fields: object) -> None:
        log_event(event, logging.ERROR, **fields)
        if not self._stop.is_set():
            self._exit_code = exit_code
            self._begin_stop()

    def _begin_stop(self) -> None:
        """SIGTERM to every worker (each drains), SIGKILL to those left after the grace."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._settled.set()
        self._signal_all(signal.SIGTERM)
        # No worker starts after a stop: drop this copy of the listening socket, so that it
        # closes (and new connections are refused, not queued unanswered) as soon as every
        # draining worker has closed its own.
        if self._sock is not None:
            self._sock.close()
        self._kill_timer = asyncio.get_running_loop().call_later(
            self.config.drain_timeout + self.STOP_GRACE, self._signal_all, signal.SIGKILL)

    def _signal_all(self, signum: int) -> None:
        for worker in list(self._workers.values()):
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signum)

    # ---------------------------------------------------------------- probe

    async def _not_ready(self) -> str | None:
        if self._stop.is_set():
            return "shutting down"
        if self._ready < self.count:
            return f"{self._ready} of {self.count} workers ready"
        if not await self._backend_probe.reachable():
            return "backend unreachable"
        return None
