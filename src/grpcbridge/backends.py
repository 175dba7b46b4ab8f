"""Where a bridge sends each tunnel's byte stream.

* :class:`SocketBackend` - relay to a gRPC server over TCP or a unix socket (what a string
  ``backend`` in :class:`~grpcbridge.BridgeConfig` means).
* :class:`GrpclibBackend` - serve grpclib handlers in process: each tunnel feeds grpclib's
  HTTP/2 protocol directly, with no socket at all.
* :class:`GrpcioBackend` - relay to an existing grpcio server (sync or aio) through a private
  unix socket the backend adds to it; see :func:`grpcbridge.attach_grpcio`.

A backend's :meth:`~Backend.connect` attaches the stream side of a tunnel (a
:class:`~grpcbridge.relay.StreamAdapter`: the asyncio bridge's and the ASGI app's tunnels
alike) or raises ``OSError``/``TimeoutError``.
"""

from __future__ import annotations

import abc
import asyncio
import os
import shutil
import tempfile
from collections.abc import Collection
from typing import Any

from ._grpclib_compat import advertise_max_frame_size, server_handlers, server_protocol
from .core.config import check_positive
from .core.errors import ConfigError
from .core.target import SocketAddress, parse_address
from .framesize import fit_frame_size, max_frame_size_for
from .pipe import Pipe
from .relay import StreamSide
from .sockets import connect_address
from .tracing import TUNNEL_EXTRA, current_tunnel, trace_rpcs


class Backend(abc.ABC):
    """Base class of backend objects accepted by ``BridgeConfig(backend=...)``."""

    async def start(self) -> None:  # noqa: B027 - an optional hook
        """Called once when the bridge starts."""

    async def close(self) -> None:  # noqa: B027 - an optional hook
        """Called once when the bridge has closed its tunnels."""

    @abc.abstractmethod
    async def connect(self, tunnel: Any, buffer_bytes: int) -> None:
        """Attach ``tunnel``'s stream side, or raise ``OSError``/``TimeoutError``."""

    @abc.abstractmethod
    async def reachable(self) -> bool:
        """Whether a tunnel opened now would reach the backend (``/readyz``)."""


class SocketBackend(Backend):
    """Relay each tunnel to its own connection to ``address`` (``host:port``/``unix:/path``)."""

    def __init__(self, address: str | SocketAddress, *, connect_timeout: float = 10.0) -> None:
        self.address = (address if isinstance(address, SocketAddress)
                        else parse_address(address, what="backend"))
        check_positive("connect_timeout", connect_timeout)
        self.connect_timeout = connect_timeout

    def __str__(self) -> str:
        return str(self.address)

    async def connect(self, tunnel: Any, buffer_bytes: int) -> None:
        await asyncio.wait_for(
            connect_address(self.address, lambda: StreamSide(tunnel, buffer_bytes)),
            self.connect_timeout)

    async def reachable(self) -> bool:
        try:
            transport, _ = await asyncio.wait_for(
                connect_address(self.address, asyncio.Protocol),
                min(1.0, self.connect_timeout))
        except (OSError, TimeoutError):
            return False
        transport.close()
        return True


class GrpclibBackend(Backend):
    """Serve grpclib ``handlers`` (generated ``*Base`` service implementations, reflection,
    health...) over each tunnel in process. grpclib's HTTP/2 protocol is fed straight from
    the WebSocket; its writes go straight into it, with backpressure through
    ``pause_writing``/``resume_writing``.

    ``max_frame_size``: the largest HTTP/2 frame accepted from clients (SETTINGS_MAX_FRAME_SIZE;
    default 1 MiB, kept below the bridge's ``max_message_bytes``; see
    :mod:`grpcbridge.framesize`). ``server_options`` go to ``grpclib.server.Server``.

    With ``opentelemetry-api`` installed and a tracer provider set, each RPC gets a span
    linked to its tunnel's, continuing the caller's trace context when the tunnel trusts it
    (:mod:`grpcbridge.tracing`)."""

    def __init__(self, handlers: Collection[Any], *, max_frame_size: int | None = None,
                 **server_options: Any) -> None:
        if not handlers:
            raise ConfigError("GrpclibBackend needs at least one handler (service instance)")
        #: Validated now, fitted to each tunnel's message limit in connect().
        self._max_frame_size = max_frame_size_for(max_frame_size, None)
        self._handlers = list(handlers)
        self._options = server_options
        #: grpclib's Server, from start() until close().
        self._server: Any = None

    def __str__(self) -> str:
        names = ", ".join(type(handler).__name__ for handler in self._handlers)
        return f"grpclib in process ({names})"

    async def start(self) -> None:
        from grpclib.server import Server  # created inside the running loop, as grpclib wants

        self._server = Server(self._handlers, **self._options)

    async def connect(self, tunnel: Any, buffer_bytes: int) -> None:
        if self._server is None:
            raise ConnectionRefusedError("the in-process grpclib server is not running")
        trace_rpcs(self._server)  # RPC spans, once a tracer provider is set
        protocol = server_protocol(self._server)
        extra = {"peername": ("grpcbridge", 0), TUNNEL_EXTRA: current_tunnel.get()}
        Pipe(tunnel, protocol, extra)
        # Clients' frames arrive in this tunnel's WebSocket messages: keep them within its limit.
        advertise_max_frame_size(protocol, fit_frame_size(self._max_frame_size,
                                                          tunnel.max_message_bytes))

    async def reachable(self) -> bool:
        return self._server is not None

    async def close(self) -> None:
        """Close every connection handler (grpclib's ``Server.close`` needs ``start()``,
        which a WebSocket-only server never calls)."""
        server, self._server = self._server, None
        if server is None:
            return
        handlers = server_handlers(server)
        for handler in handlers:
            handler.close()
        for handler in handlers:
            await handler.wait_closed()


class GrpcioBackend(SocketBackend):
    """Relay to a grpcio server through a private unix socket added to it.

    The socket lives in a fresh directory only this user can enter (0700); the directory is
    removed when the bridge closes. Create it before ``server.start()`` (grpcio only accepts
    new ports then)::

        server = grpc.server(...)            # or grpc.aio.server()
        backend = GrpcioBackend(server)      # adds unix:/tmp/grpcbridge-.../grpc.sock
        server.start()
    """

    def __init__(self, server: Any, *, connect_timeout: float = 10.0) -> None:
        directory = tempfile.mkdtemp(prefix="grpcbridge-")  # 0700
        path = os.path.join(directory, "grpc.sock")
        try:
            if server.add_insecure_port(f"unix:{path}") == 0:  # grpcio may refuse this way
                raise ConfigError("the grpcio server refused the unix port; attach it before "
                                  "server.start()")
        except Exception:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        self.directory = directory
        super().__init__(SocketAddress(path=path), connect_timeout=connect_timeout)

    def __str__(self) -> str:
        return f"grpcio via {self.address}"

    async def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
