"""Opening the WebSocket side of a client tunnel (shared by the forwarder and channels).

Every client tunnel (the forwarder's, so also the grpcio channels', and
:class:`~grpcbridge.Channel`'s) runs on picows (:class:`~grpcbridge.fastws.PicowsTunnel`).
The connection is made here (TCP, or a python-socks proxy socket, then TLS end to end),
the upgrade carries the settings' headers, and failures raise :class:`HandshakeError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from picows import WSHandshakeError, WSInvalidStatusError, WSUpgradeResponse
from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.asyncio import Proxy

from ..core.errors import HandshakeError
from ..core.proxy import ProxyURL, refusal_message
from ..core.stream import DEFAULT_BUFFER_BYTES, DEFAULT_MAX_MESSAGE_BYTES
from ..core.target import Target, host_port
from ..fastws import REFUSAL_BODY, ClientRequest, PicowsProtocol, PicowsTunnel
from ..loops import tune_allocator


@dataclass(frozen=True, kw_only=True)
class DialSettings:
    """How to open client tunnels to one target (already validated by the caller:
    :func:`~grpcbridge.core.config.check_dial_options`)."""

    target: Target
    ssl: ssl.SSLContext | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    bearer_token: str | None = None
    subprotocols: Sequence[str] = ()
    origin: str | None = None
    #: Proxy to dial through (already resolved: see :mod:`grpcbridge.core.proxy`), or None.
    proxy: ProxyURL | None = None
    handshake_timeout: float = 10.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    buffer_bytes: int = DEFAULT_BUFFER_BYTES

    def new_tunnel(self, loop: asyncio.AbstractEventLoop, stream_name: str) -> PicowsTunnel:
        """A tunnel whose WebSocket side is a picows client, not yet connected."""
        tunnel = PicowsTunnel(loop, None, stream_name=stream_name,
                              max_message_bytes=self.max_message_bytes)
        tunnel.machine.dialing = True
        return tunnel

    def upgrade_headers(self) -> list[tuple[str, str]]:
        """The headers a client adds to its upgrade request: Origin and
        Sec-WebSocket-Protocol, then ``headers`` (which replace them), then Authorization."""
        chosen: dict[str, tuple[str, str]] = {}
        if self.origin:
            chosen["origin"] = ("Origin", self.origin)
        if self.subprotocols:
            chosen["sec-websocket-protocol"] = ("Sec-WebSocket-Protocol",
                                                ", ".join(self.subprotocols))
        for name, value in self.headers.items():
            chosen[name.lower()] = (name, value)
        if self.bearer_token is not None:
            chosen["authorization"] = ("Authorization", f"Bearer {self.bearer_token}")
        return list(chosen.values())


async def open_websocket(tunnel: PicowsTunnel, settings: DialSettings) -> None:
    """Connect ``tunnel``'s WebSocket side and complete the opening handshake within
    ``settings.handshake_timeout`` seconds.

    Through ``settings.proxy`` when set (TLS, for wss://, is then end to end with the
    bridge); the timeout covers the proxy's CONNECT too.

    Raises :class:`HandshakeError` (refused, unreachable, TLS failure, proxy refusal or
    timeout); the tunnel is then already being torn down, so callers only report the error.
    """
    tune_allocator()  # a client streams large messages too (see there)
    target = settings.target
    within = settings.handshake_timeout
    protocol = PicowsProtocol(tunnel, request=_client_request(settings))
    try:
        async with asyncio.timeout(within):
            await _connect(tunnel, settings, within, protocol)
            await _answered(protocol, target)
    except TimeoutError:
        try:
            # A refusal whose body had not all come: picows has failed the handshake with it
            # once released, so nothing is waited for (and nothing raised if, against that,
            # it had not).
            if protocol.release_answer():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0):
                        await _answered(protocol, target)
        finally:
            _abandon(tunnel)
        via = f" through proxy {settings.proxy.address}" if settings.proxy else ""
        raise HandshakeError(
            f"no WebSocket handshake with {target.url}{via} within {within} s"
        ) from None
    except BaseException:  # HandshakeError, or cancellation
        _abandon(tunnel)
        raise
    tunnel.machine.dialing = False  # (picows' on_ws_connected opened the WebSocket side)


#: Most characters of a refusal's body quoted in a HandshakeError (and so in logs).
REASON_CHARS = 200


def _client_request(settings: DialSettings) -> ClientRequest:
    """The upgrade request of a picows client tunnel."""
    target = settings.target
    protocols = settings.subprotocols

    def check(answer: WSUpgradeResponse) -> None:
        """What websockets' client checks and picows does not: the server chose an offered
        subprotocol (or none) and no extension (none is offered)."""
        chosen = answer.headers.getall("Sec-WebSocket-Protocol", [])
        extensions = answer.headers.getall("Sec-WebSocket-Extensions", [])
        problem = (f"it chose subprotocol {', '.join(chosen)!r}, not one offered"
                   if len(chosen) > 1 or (chosen and chosen[0] not in protocols)
                   else f"it chose extensions {', '.join(extensions)!r}, none offered"
                   if extensions else None)
        if problem is not None:
            raise HandshakeError(f"{target.url} answered the WebSocket upgrade wrongly: "
                                 + problem, status=int(answer.status))

    return ClientRequest(authority=target.authority, resource=target.resource,
                         headers=settings.upgrade_headers(), check=check,
                         buffer_bytes=settings.buffer_bytes)


async def _answered(protocol: PicowsProtocol, target: Target) -> None:
    """Wait until picows has the upgrade answer; raise HandshakeError unless it opened
    the tunnel."""
    try:
        await protocol.wait_until_handshake_complete()
    except WSInvalidStatusError as exc:
        status = int(exc.response.status) if exc.response else 0
        body = exc.raw_body if protocol.refusal_body is None else protocol.refusal_body
        # The server's reason (the body), quoted on one line, printable and not too long.
        text = " ".join("".join(c if c.isprintable() else " " for c in
                                (body or b"")[:REFUSAL_BODY].decode(errors="replace")).split())
        if len(text) > REASON_CHARS:
            text = text[:REASON_CHARS - 3] + "..."
        raise HandshakeError(f"{target.url} refused the WebSocket upgrade: HTTP {status}"
                             + (f": {text}" if text else ""), status=status) from None
    except WSHandshakeError as exc:
        raise HandshakeError(f"{target.url} answered the WebSocket upgrade wrongly: {exc}",
                             status=int(exc.response.status) if exc.response else None
                             ) from None
    if protocol.tunnel.ws is None:
        raise HandshakeError(f"{target.url} closed the connection during the WebSocket "
                             "handshake")


async def _connect(tunnel: PicowsTunnel, settings: DialSettings, within: float,
                   protocol: PicowsProtocol) -> None:
    """Connect ``tunnel``'s WebSocket side (TCP, proxy, TLS) with ``protocol``."""
    target = settings.target
    sock = None
    if settings.proxy is not None:
        sock = await _proxy_socket(settings.proxy, target.host, target.port, within)

    tls, hostname = settings.ssl, target.host if settings.ssl else None
    try:
        if sock is None:
            await tunnel.loop.create_connection(lambda: protocol, target.host, target.port,
                                                ssl=tls, server_hostname=hostname)
        else:
            await tunnel.loop.create_connection(lambda: protocol, sock=sock, ssl=tls,
                                                server_hostname=hostname)
    except OSError as exc:
        via = f" through proxy {settings.proxy.address}" if settings.proxy else ""
        raise HandshakeError(f"cannot connect to {target.url}{via}: {exc}") from exc
    finally:
        if sock is not None and tunnel.ws_transport is None:
            sock.close()  # the TLS handshake failed, or was cancelled


_PROXY_TYPES = {"http": ProxyType.HTTP, "socks5": ProxyType.SOCKS5, "socks4": ProxyType.SOCKS4}


async def _proxy_socket(proxy: ProxyURL, host: str, port: int, within: float) -> socket.socket:
    """A socket connected to ``host:port`` through ``proxy`` (python-socks: HTTP CONNECT,
    SOCKS5 or SOCKS4). Messages name the proxy by address only: never its password."""
    dialer = Proxy(_PROXY_TYPES[proxy.kind], proxy.host, proxy.port, username=proxy.username,
                   password=proxy.password, rdns=proxy.remote_dns,
                   loop=asyncio.get_running_loop())
    try:
        return await dialer.connect(host, port, timeout=within)
    except ProxyConnectionError as exc:
        cause = exc.__cause__ or exc
        raise HandshakeError(
            f"cannot connect to proxy {proxy.address} (from {proxy.source}): {cause}"
        ) from None
    except ProxyTimeoutError:
        raise TimeoutError from None
    except ProxyError as exc:
        status = exc.error_code if proxy.kind == "http" else None
        if status is not None:
            reason = str(exc).removeprefix(str(status)).strip()
            message = refusal_message(proxy, status, reason, host, port)
        else:  # a SOCKS refusal, or an HTTP proxy that closed or answered garbage
            message = (f"{proxy.kind.upper()} proxy {proxy.address} opened no tunnel to "
                       f"{host_port(host, port)}: {exc}")
        raise HandshakeError(message, proxy_status=status) from None


def _abandon(tunnel: PicowsTunnel) -> None:
    # No longer dialing; a tunnel without a stream side ends once its connection is gone,
    # which may be already (picows drops the connection as soon as it refuses the answer).
    tunnel.machine.stream_never_attached()
    if tunnel.ws_transport is None:
        tunnel.ws_lost(None)  # never connected: let the tunnel finish
    else:
        tunnel.machine.abort()
