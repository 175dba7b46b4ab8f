"""The forwarder: a local TCP or unix listener whose every connection is carried through its
own WebSocket tunnel to a bridge, so grpcio and any gRPC tool can use a tunnel unchanged."""

from __future__ import annotations

import asyncio
import ssl

from ..core.config import ForwarderConfig
from ..core.errors import HandshakeError
from ..core.target import host_port
from ..core.tunnel import TunnelState
from ..fastws import PicowsTunnel
from ..loops import loop_name
from ..observability import log_event
from ..relay import StreamSide, keepalive_forever
from ..sockets import ListeningServer, close_tunnels
from .dial import DialSettings, open_websocket


class Forwarder(ListeningServer):
    """Accepts local gRPC connections and relays each through a new WebSocket tunnel.
    Closing stops accepting and closes every tunnel (1001).

    ::

        async with Forwarder(ForwarderConfig(target="ws://host:8080/grpc",
                                             listen="127.0.0.1:50052")):
            ...  # point any gRPC client at 127.0.0.1:50052
    """

    noun = "forwarder"

    def __init__(self, config: ForwarderConfig) -> None:
        if not isinstance(config, ForwarderConfig):
            raise TypeError("Forwarder() takes a ForwarderConfig")
        super().__init__(config.listen_address)
        self.config = config
        target = config.parsed_target
        self._dial_settings = DialSettings(
            target=target,
            ssl=ssl.create_default_context(cafile=config.cacert) if target.secure else None,
            headers=config.headers, bearer_token=config.bearer_token,
            subprotocols=config.subprotocols, origin=config.origin, proxy=config.parsed_proxy,
            handshake_timeout=config.handshake_timeout,
            max_message_bytes=config.max_message_bytes, buffer_bytes=config.buffer_bytes)
        self._tunnels: dict[PicowsTunnel, asyncio.Task[None] | None] = {}

    @property
    def target(self) -> str:
        """``host:port`` (or ``unix:/path``) for gRPC clients to dial, once started."""
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        if self.address is None:
            raise self._not_listening("target")
        return host_port(*self.address)

    @property
    def active_tunnels(self) -> int:
        return len(self._tunnels)

    async def _begin(self) -> None:
        loop = asyncio.get_running_loop()
        await self._listen(self._accept)
        self._ticker = loop.create_task(keepalive_forever(
            lambda: [t for t in self._tunnels if t.machine.state is TunnelState.OPEN],
            self.config.ping_interval, self.config.idle_timeout))
        proxy = self.config.parsed_proxy
        log_event("forwarder_started", listen=self.target,
                  target=self.config.parsed_target.url, loop=loop_name(loop),
                  **({"proxy": str(proxy), "proxy_from": proxy.source} if proxy else {}))

    async def _drain(self) -> None:
        tasks = [task for task in self._tunnels.values() if task is not None]
        for task in tasks:
            task.cancel()
        await close_tunnels(self._tunnels, "forwarder shutting down",
                            lambda: [tunnel.closed for tunnel in self._tunnels])
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------

    def _accept(self) -> asyncio.Protocol:
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

