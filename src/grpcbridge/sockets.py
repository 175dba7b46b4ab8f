"""Socket helpers shared by the asyncio adapters: dialing an address, listening on one
(:class:`Listener`, one lifecycle for the bridge and the forwarder), unix socket files."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from collections.abc import Callable
from ssl import SSLContext

from .core.target import SocketAddress


async def connect_address(
    loop: asyncio.AbstractEventLoop,
    address: SocketAddress,
    factory: Callable[[], asyncio.Protocol],
) -> tuple[asyncio.Transport, asyncio.Protocol]:
    """Connect to a TCP or unix socket address with ``factory``'s protocol."""
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


class Listener:
    """A listening socket on a TCP or unix :class:`SocketAddress`, as the bridge and the
    forwarder use it: a stale unix socket file is replaced (never another kind of file), the
    bound TCP address is known after :meth:`start`, and :meth:`close` stops accepting, waits
    (bounded) for the server to close and removes the unix socket file. Closing is
    idempotent.

    ``start(sock=...)`` serves a socket bound and listening already (a worker of
    ``grpcbridge serve --workers N`` gets it from its supervisor): the listener owns it from
    then on, but never removes its unix socket file, which the supervisor owns."""

    #: Seconds :meth:`close` waits for the server to finish closing.
    CLOSE_WAIT = 5.0

    def __init__(self, address: SocketAddress) -> None:
        self.address = address
        self._server: asyncio.Server | None = None
        #: The socket file of a unix listener, while it exists.
        self.unix_path: str | None = None
        #: Bound ``(host, port)`` of a TCP listener, after :meth:`start`.
        self.bound: tuple[str, int] | None = None

    async def start(self, factory: Callable[[], asyncio.BaseProtocol], *,
                    ssl: SSLContext | None = None, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        address = self.address
        if sock is not None and sock.family == socket.AF_UNIX:
            self._server = await loop.create_unix_server(factory, sock=sock, ssl=ssl,
                                                         backlog=1024)
        elif sock is not None:
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
            self.bound = (host, port)

    def stop_accepting(self) -> None:
        """Stop accepting new connections (established ones are not touched)."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), self.CLOSE_WAIT)
        path, self.unix_path = self.unix_path, None
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
