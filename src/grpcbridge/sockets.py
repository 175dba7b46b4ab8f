"""Socket helpers shared by the asyncio adapters: dialing an address, listening on one
(:class:`ListeningServer`, one lifecycle for the bridge and the forwarder), unix socket
files, and the last step of a server's shutdown (:func:`close_tunnels`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Collection, Iterable
from ssl import SSLContext
from typing import TYPE_CHECKING, Self, cast

from .core.errors import InvalidStateError
from .core.stream import CloseCode
from .core.target import SocketAddress
from .core.tunnel import CLOSE_TIMEOUT

if TYPE_CHECKING:
    from .relay import StreamAdapter


async def connect_address(
    address: SocketAddress, factory: Callable[[], asyncio.Protocol],
) -> tuple[asyncio.Transport, asyncio.Protocol]:
    """Connect to a TCP or unix socket address with ``factory``'s protocol."""
    loop = asyncio.get_running_loop()
    if address.path is not None:
        return await loop.create_unix_connection(factory, address.path)
    assert address.host is not None and address.port is not None
    return await loop.create_connection(factory, address.host, address.port)


def remove_stale_socket(path: str) -> None:
    """Remove a unix socket file left by a dead process; refuse anything else."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a unix socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a leftover from a crashed process
    else:
        raise OSError(f"{path} is in use by another process")
    finally:
        probe.close()


class ListeningServer:
    """The lifecycle the bridge and the forwarder share, on a TCP or unix listening socket:
    it starts once (a failed start releases what it opened and leaves it closed), and
    closing is idempotent and safe from several tasks at once (every caller returns once it
    is closed); misuse raises :class:`InvalidStateError`. A stale unix socket file is
    replaced (never another kind of file) and removed at close, except when ``sock=`` gave a
    socket bound already (a worker of ``grpcbridge serve --workers N`` gets it from its
    supervisor, who owns the file).

    A subclass opens what it serves in :meth:`_begin` (calling :meth:`_listen`), closes its
    connections in :meth:`_drain` (once the listener stopped accepting) and frees the rest
    in :meth:`_release` (after a failed start too), after its keepalive task ``_ticker``."""

    #: Seconds closing waits for the listening socket to close.
    CLOSE_WAIT = 5.0
    #: What error messages call it (``"bridge"``; capitalized, its class).
    noun = "server"

    def __init__(self, address: SocketAddress) -> None:
        self._listen_at = address
        self._server: asyncio.Server | None = None
        self._state = "new"
        self._started = asyncio.Event()
        self._closed = asyncio.Event()
        #: The keepalive task (see :func:`~grpcbridge.relay.keepalive_forever`), once started.
        self._ticker: asyncio.Task[None] | None = None
        #: The socket file of a unix listener, while it exists.
        self.unix_path: str | None = None
        #: Bound ``(host, port)`` of a TCP listener, after start.
        self.address: tuple[str, int] | None = None

    def _not_listening(self, what: str) -> InvalidStateError:
        """The error for reading ``what`` (known once listening) too early or too late."""
        noun, name = self.noun, self.noun.capitalize()
        return InvalidStateError(
            f"{name}.{what} is known once the {noun} listens; it is {self._state}: "
            + (f"await {noun}.start() (or use 'async with {name}(...)') first"
               if self._state in ("new", "starting")
               else f"it never listened; create a new {name}"))

    async def start(self) -> None:
        await self._start(self._begin)

    async def _start(self, opening: Callable[[], Awaitable[None]]) -> None:
        if self._state != "new":
            name = self.noun.capitalize()
            raise InvalidStateError(
                f"start() called on a {self.noun} that is {self._state}; a {name} starts "
                "once: " + ("it is already serving" if self._state in ("starting", "running")
                            else f"create a new {name} to serve again"))
        self._state = "starting"
        try:
            await opening()
        except BaseException:
            await self._shut()
            raise
        else:
            self._state = "running"
        finally:
            self._started.set()

    async def serve_forever(self) -> None:
        """Wait until closing finishes (starting first if needed)."""
        if self._state == "new":
            await self.start()
        await self._closed.wait()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._close(self._drain)

    async def _close(self, drain: Callable[[], Awaitable[None]]) -> None:
        if self._state == "starting":  # close what the start opens (a failed one shuts)
            await self._started.wait()
        if self._state in ("closing", "closed"):
            await self._closed.wait()
            return
        self._state = "closing"
        try:
            if self._server is not None:
                self._server.close()  # stop accepting; established connections stay
            await drain()
        finally:
            await self._shut()

    async def _shut(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), self.CLOSE_WAIT)
        path, self.unix_path = self.unix_path, None
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        try:
            await self._release()
        finally:
            self._state = "closed"
            self._closed.set()

    async def _begin(self) -> None:
        raise NotImplementedError

    async def _drain(self) -> None:
        raise NotImplementedError

    async def _release(self) -> None:
        pass

    async def _listen(self, serve: Callable[[], asyncio.BaseProtocol], *,
                      ssl: SSLContext | None = None, sock: socket.socket | None = None) -> None:
        """Listen; ``serve()`` makes the protocol of a connection accepted while running
        (one accepted while starting, or after closing began, is dropped at once)."""
        loop = asyncio.get_running_loop()
        address = self._listen_at

        def factory() -> asyncio.BaseProtocol:
            return serve() if self._state == "running" else _Refusing()

        if sock is not None:  # TCP or unix (whose file stays: create_server never removes it)
            self._server = await loop.create_server(factory, sock=sock, ssl=ssl, backlog=1024)
        elif address.path is not None:
            remove_stale_socket(address.path)
            self._server = await loop.create_unix_server(factory, address.path, ssl=ssl,
                                                         backlog=1024)
            self.unix_path = address.path
        else:
            assert address.port is not None
            self._server = await loop.create_server(factory, address.host, address.port,
                                                    ssl=ssl, backlog=1024, reuse_address=True)
        listening = self._server.sockets[0]
        if listening.family != socket.AF_UNIX:
            host, port = listening.getsockname()[:2]
            self.address = (host, port)


class _Refusing(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).abort()  # uvloop's transports are not subclasses


async def close_tunnels(tunnels: Iterable[StreamAdapter], reason: str,
                        pending: Callable[[], Collection[asyncio.Future[None]]]) -> None:
    """The end of a shutdown, the same for every server: close each of ``tunnels`` with 1001
    and ``reason``, let what ``pending()`` waits for finish within the close timeout (for
    the client's reply) and a second, abort what is left, and wait one more second."""
    for tunnel in list(tunnels):
        tunnel.machine.close(CloseCode.GOING_AWAY, reason)
    if waiting := pending():
        await asyncio.wait(waiting, timeout=CLOSE_TIMEOUT + 1)
    for tunnel in list(tunnels):
        tunnel.machine.abort()
    if waiting := pending():
        await asyncio.wait(waiting, timeout=1)
