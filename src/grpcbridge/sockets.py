"""Socket helpers shared by the asyncio adapters: dialing an address, unix socket files."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import Callable

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
