"""The forwarder: a local TCP or unix listener whose every connection is carried through its
own WebSocket tunnel to a bridge, so grpcio and any gRPC tool can use a tunnel unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import cast

from ..core.config import ForwarderConfig
from ..core.errors import HandshakeError, InvalidStateError
from ..core.stream import CloseCode
from ..core.target import host_port
from ..core.tunnel import CLOSE_TIMEOUT, TunnelState
from ..fastws import PicowsTunnel
from ..loops import loop_name
from ..observability import log_event
from ..relay import StreamSide, keepalive_forever
from ..sockets import Listener
from .dial import DialSettings, open_websocket


class Forwarder:
    """Accepts local gRPC connections and relays each through a new WebSocket tunnel.

    ::

        async with Forwarder(ForwarderConfig(target="ws://host:8080/grpc",
                                             listen="127.0.0.1:50052")):
            ...  # point any gRPC client at 127.0.0.1:50052
    """

    def __init__(self, config: ForwarderConfig) -> None:
        if not isinstance(config, ForwarderConfig):
            raise TypeError("Forwarder() takes a ForwarderConfig")
        self.config = config
        target = config.parsed_target
        self._dial_settings = DialSettings(
            target=target,
            ssl=ssl.create_default_context(cafile=config.cacert) if target.secure else None,
            headers=config.headers, bearer_token=config.bearer_token,
            subprotocols=config.subprotocols, origin=config.origin, proxy=config.parsed_proxy,
            handshake_timeout=config.handshake_timeout,
            max_message_bytes=config.max_message_bytes, buffer_bytes=config.buffer_bytes)
        self._listener = Listener(config.listen_address)
        self._tunnels: dict[PicowsTunnel, asyncio.Task[None] | None] = {}
        self._keepalive: asyncio.Task[None] | None = None
        self._state = "new"
        self._closed = asyncio.Event()
        #: Bound ``(host, port)`` after :meth:`start` (TCP listeners).
        self.address: tuple[str, int] | None = None

    @property
    def target(self) -> str:
        """``host:port`` (or ``unix:/path``) for gRPC clients to dial, once started."""
        if self._listener.unix_path is not None:
            return f"unix:{self._listener.unix_path}"
        if self.address is None:
            raise InvalidStateError(
                f"Forwarder.target is known once the forwarder listens; it is {self._state}: "
                + ("await forwarder.start() (or use 'async with Forwarder(...)') first"
                   if self._state in ("new", "running")
                   else "it never listened; create a new Forwarder"))
        return host_port(*self.address)

    @property
    def active_tunnels(self) -> int:
        return len(self._tunnels)

    async def start(self) -> None:
        if self._state != "new":
            raise InvalidStateError(
                f"start() called on a forwarder that is {self._state}; a Forwarder starts "
                "once: " + ("it is already listening" if self._state == "running"
                            else "create a new Forwarder to listen again"))
        self._state = "running"
        loop = asyncio.get_running_loop()
        try:
            await self._listener.start(self._accept)
            self.address = self._listener.bound
        except BaseException:
            self._state = "closed"
            self._closed.set()
            raise
        self._keepalive = loop.create_task(keepalive_forever(
            lambda: [t for t in self._tunnels if t.machine.state is TunnelState.OPEN],
            self.config.ping_interval, self.config.idle_timeout))
        proxy = self.config.parsed_proxy
        log_event("forwarder_started", listen=self.target,
                  target=self.config.parsed_target.url, loop=loop_name(loop),
                  **({"proxy": str(proxy), "proxy_from": proxy.source} if proxy else {}))

    async def serve_forever(self) -> None:
        if self._state == "new":
            await self.start()
        await self._closed.wait()

    async def __aenter__(self) -> Forwarder:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop accepting and close every tunnel (1001). Idempotent."""
        if self._state in ("closing", "closed"):
            await self._closed.wait()
            return
        self._state = "closing"
        try:
            self._listener.stop_accepting()
            for tunnel, task in list(self._tunnels.items()):
                if task is not None:
                    task.cancel()
                tunnel.machine.close(CloseCode.GOING_AWAY, "forwarder shutting down")
            # Closing handshakes get their deadline; then what is left is aborted.
            for timeout in (CLOSE_TIMEOUT + 1, 1):
                pending = [tunnel.closed for tunnel in self._tunnels]
                if pending:
                    await asyncio.wait(pending, timeout=timeout)
                for tunnel in list(self._tunnels):
                    tunnel.machine.abort()
            tasks = [task for task in self._tunnels.values() if task is not None]
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            if self._keepalive is not None:
                self._keepalive.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._keepalive
            await self._listener.close()
            self._state = "closed"
            self._closed.set()

    # ------------------------------------------------------------------

    def _accept(self) -> asyncio.Protocol:
        if self._state != "running":
            return _Refusing()
        tunnel = self._dial_settings.new_tunnel(asyncio.get_running_loop(), "client")
        self._tunnels[tunnel] = tunnel.loop.create_task(self._dial(tunnel))
        tunnel.closed.add_done_callback(lambda _f: self._tunnels.pop(tunnel, None))
        return StreamSide(tunnel, self.config.buffer_bytes)

    async def _dial(self, tunnel: PicowsTunnel) -> None:
        url = self.config.parsed_target.url
        try:
            await open_websocket(tunnel, self._dial_settings)
        except HandshakeError as exc:
            log_event("tunnel_dial_failed", target=url, error=str(exc))
            return
        finally:
            if tunnel in self._tunnels:
                self._tunnels[tunnel] = None
        log_event("tunnel_opened", target=url)


class _Refusing(asyncio.Protocol):
    """Accepted while shutting down: close at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).abort()  # uvloop's transports are not subclasses
