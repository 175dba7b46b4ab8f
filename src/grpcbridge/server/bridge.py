"""The bridge: a WebSocket server that hands each tunnel to a backend."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
from typing import cast

from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from ..backends import Backend
from ..core.admission import Rejection
from ..core.config import BridgeConfig
from ..core.errors import InvalidStateError
from ..core.limits import TOTAL_BUDGET_EXCEEDED
from ..core.target import host_port
from ..fastws import PicowsTunnel
from ..loops import loop_name
from ..observability import REQUEST_ID_HEADER, BridgeMetrics, log_event, new_request_id
from ..relay import Tunnel, WebSocketSide, websockets_logger
from ..sockets import ListeningServer
from ..tracing import available as tracing_available
from .gate import header_map, single_host
from .http import HttpServer, RequestHead, answer_malformed, send_response
from .session import TunnelServer, TunnelSession
from .static import StaticSite

#: Bytes a client may send after its upgrade request and before the answer (a pipelined
#: request, frames sent too early). Reading pauses once the request is in, so legitimate
#: clients send nothing here; past this the connection is dropped.
MAX_EARLY_BYTES = 256 * 1024
#: Bytes charged per header line of a parsed request on top of the head's raw size: the
#: Python objects websockets' ``Headers`` and the gate's header map keep for each line.
PARSED_HEADER_BYTES = 512


#: A bridge tunnel: on picows (the default), or on websockets' framing where picows cannot
#: serve (permessage-deflate, unix socket listeners).
AnyTunnel = PicowsTunnel | Tunnel


def endpoint(config: BridgeConfig, bound: tuple[str, int] | None) -> str:
    """Where clients connect: the ``ws://`` (``wss://`` with TLS) URL of a TCP listener
    bound to ``bound``, else the configured unix socket."""
    if bound is None:
        return str(config.listen_address)
    return f"{'wss' if config.certfile else 'ws'}://{host_port(*bound)}{config.path}"


class _ServerSide(WebSocketSide):
    """The bridge's protocol for one connection. Until the bridge has answered the HTTP
    request, bytes go to :meth:`Bridge._handshake_data`, which hands websockets the request
    up to its blank line only: whatever follows (a pipelined request, frames sent before
    the 101) stays unparsed in ``held`` until the answer, then reaches the tunnel (101) or
    is dropped (any other status)."""

    __slots__ = ("bridge", "client_request_id", "eof", "handshaking", "head", "held",
                 "held_bytes", "peer", "request_bytes", "request_id", "task", "timer")

    tunnel: AnyTunnel  # type: ignore[assignment]

    def __init__(self, bridge: Bridge, tunnel: AnyTunnel, buffer_bytes: int) -> None:
        super().__init__(tunnel, buffer_bytes)  # type: ignore[arg-type]
        self.bridge = bridge
        self.handshaking = True
        self.head = RequestHead()
        self.eof = False
        self.held: list[bytes] = []
        self.held_bytes = 0
        self.peer = ""
        #: Chosen once the request is read (its X-Request-Id, or a new one), and the
        #: client's X-Request-Id when that is not it (see :meth:`Gate.request_id`).
        self.request_id = ""
        self.client_request_id: str | None = None
        #: Bytes the parsed request costs (its raw head plus :data:`PARSED_HEADER_BYTES` a
        #: line), charged with the early bytes to the handshake's account until the answer.
        self.request_bytes = 0
        self.timer: asyncio.TimerHandle | None = None
        #: Answers the request (admission, upgrade, backend dial); None once done.
        self.task: asyncio.Task[None] | None = None

    def stop_timer(self) -> None:
        """Cancel the handshake deadline, if armed."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def opened(self, _task: asyncio.Task[None]) -> None:
        """The request is answered: drop the task (and the request it holds)."""
        self.task = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.bridge._connection_made(self)

    def data_received(self, data: bytes) -> None:
        if self.handshaking:
            self.bridge._handshake_data(self, data)
        else:
            cast(Tunnel, self.tunnel).ws_data(data)

    def eof_received(self) -> bool | None:
        if self.handshaking and self.head.complete:
            self.eof = True  # half-closed after its request: keep the socket to answer
            return True
        return super().eof_received()

    def handshake_done(self, accepted: tuple[Request, Response] | None = None) -> None:
        """The bridge answered: with ``accepted`` (the request and its 101), the WebSocket
        opens and the held bytes go to the tunnel; otherwise they are dropped."""
        self.handshaking = False
        held, self.held = self.held, []
        if accepted is None:
            return
        request, response = accepted
        tunnel = self.tunnel
        if isinstance(tunnel, PicowsTunnel):
            tunnel.upgrade(response.headers.raw_items(), request.headers["Sec-WebSocket-Key"],
                           held, self.eof)
            return
        assert isinstance(tunnel.websocket, ServerProtocol)
        tunnel.websocket.send_response(response)
        tunnel.flush_websocket()
        tunnel.machine.websocket_opened()
        for chunk in held:
            tunnel.ws_data(chunk)
        if self.eof:
            super().eof_received()


class Bridge(TunnelServer, ListeningServer):
    """Accepts WebSocket connections and hands each tunnel to the configured backend.

    Use it as an async context manager, or call :meth:`start` and :meth:`close`::

        async with Bridge(BridgeConfig(backend="127.0.0.1:50051", listen="127.0.0.1:8080")):
            await asyncio.Event().wait()
    """

    noun = "bridge"

    def __init__(self, config: BridgeConfig, *, metrics: BridgeMetrics | None = None) -> None:
        TunnelServer.__init__(self, config, metrics)
        ListeningServer.__init__(self, config.listen_address)
        #: Every connection's protocol, by its tunnel (accepted or in its handshake).
        self._sessions: dict[AnyTunnel, _ServerSide] = {}
        self._metrics_server: HttpServer | None = None
        self._backend_started = False
        self.static = StaticSite(config.static) if config.static else None
        #: Bound ``(host, port)`` of the metrics listener, after start.
        self.metrics_address: tuple[str, int] | None = None

    # ----------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        """The ``ws://`` / ``wss://`` URL of the tunnel endpoint (TCP listeners)."""
        if self.address is None:
            if self.config.listen_address.path is not None:
                raise InvalidStateError(
                    f"Bridge.url: the bridge listens on {self.config.listen}, a unix socket, "
                    "which has no ws:// URL; clients dial the socket path")
            raise self._not_listening("url")
        return endpoint(self.config, self.address)

    @property
    def active_tunnels(self) -> int:
        """Tunnels currently accepted and not yet closed."""
        return len(self._relaying)

    @property
    def connections(self) -> int:
        """Every connection the bridge holds state for (including handshakes)."""
        return len(self._sessions)

    async def start(self, *, sock: socket.socket | None = None) -> None:
        """Bind the listeners. Raises :class:`OSError` if an address is taken.

        ``sock``: serve this socket (bound to ``config.listen`` and listening already)
        instead of binding one; the bridge owns it from then on."""
        await self._start(functools.partial(self._begin, sock))

    async def _begin(self, sock: socket.socket | None = None) -> None:
        config = self.config
        context = None
        if config.certfile is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(config.certfile, config.keyfile)
        tracing_available()  # import opentelemetry (when installed) now, not in a tunnel
        await self.backend.start()
        self._backend_started = True
        await self._listen(self._protocol_factory, ssl=context, sock=sock)
        if config.metrics_address is not None:
            self._metrics_server = HttpServer(self.metrics.registry, self._not_ready)
            self.metrics_address = await self._metrics_server.start(config.metrics_address)
        self._ticker = self._keepalive(config.ping_interval, config.idle_timeout)
        log_event("bridge_started", listen=endpoint(config, self.address),
                  backend=str(self.backend),
                  metrics=host_port(*self.metrics_address) if self.metrics_address else "",
                  loop=loop_name(asyncio.get_running_loop()))

    async def close(self, drain_timeout: float | None = None) -> None:
        """Stop accepting, let open tunnels finish for up to ``drain_timeout`` seconds
        (default: the config's), then close the rest with 1001. Idempotent and safe to call
        from several tasks at once: every caller returns once the bridge is closed."""
        await self._close(functools.partial(self._drain, drain_timeout))

    async def _drain(self, drain_timeout: float | None = None) -> None:
        # Connections still in their handshake are not tunnels yet: drop them.
        for tunnel, side in list(self._sessions.items()):
            if tunnel not in self._relaying:
                if side.task is not None:
                    side.task.cancel()
                tunnel.machine.abort()
        await self._close_tunnels(drain_timeout,
                                  lambda: [tunnel.closed for tunnel in self._sessions])
        tasks = [side.task for side in self._sessions.values() if side.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _release(self) -> None:  # once: after close() or a start that failed
        if self._metrics_server is not None:
            await self._metrics_server.close()
        if self._backend_started:
            await self.backend.close()
        if self._state == "closing":  # not after a start that failed
            log_event("bridge_stopped")

    # -------------------------------------------------------- connections

    def _protocol_factory(self) -> _ServerSide:
        config = self.config
        loop = asyncio.get_running_loop()
        websocket = ServerProtocol(
            max_size=config.max_message_bytes,
            extensions=[ServerPerMessageDeflateFactory()] if config.compression else None,
            logger=websockets_logger,
        )
        tunnel: AnyTunnel
        if config.compression or config.listen_address.path is not None:
            tunnel = Tunnel(loop, websocket, stream_name="backend")
        else:
            tunnel = PicowsTunnel(loop, websocket, stream_name="backend",
                                  max_message_bytes=config.max_message_bytes)
        return _ServerSide(self, tunnel, config.buffer_bytes)

    def _connection_made(self, side: _ServerSide) -> None:
        tunnel = side.tunnel
        assert tunnel.ws_transport is not None
        if self._state != "running":  # accepted while running, connected (TLS) after closing
            tunnel.ws_transport.abort()
            return
        peername = tunnel.ws_transport.get_extra_info("peername")
        side.peer = peername[0] if isinstance(peername, tuple) else "unix"
        self._sessions[tunnel] = side
        # Until admission names the client, the handshake is charged to the peer address.
        tunnel.machine.account = self.budget.open(side.peer)
        side.timer = tunnel.loop.call_later(
            self.config.handshake_timeout, self._handshake_timed_out, side)
        tunnel.closed.add_done_callback(lambda _f: self._tunnel_finished(side))

    def _handshake_timed_out(self, side: _ServerSide) -> None:
        """The handshake timeout passed before the request was answered: a client still
        sending its head is dropped (408 in the log); a request still in admission (a slow
        auth hook) has the hook cancelled and is answered 503."""
        tunnel = side.tunnel
        if tunnel not in self._sessions or tunnel in self._relaying:
            return
        side.timer = None
        if side.task is None:
            self.gate.rejected(Rejection(408, "handshake timeout", label="timeout"),
                               request_id=side.request_id or new_request_id(),
                               peer=side.peer)
            tunnel.machine.abort()
            return
        self._refuse(side, Rejection(
            503, f"admission did not finish within the handshake timeout "
            f"({self.config.handshake_timeout:g} s)", label="timeout"))

    def _charge_admission(self, side: _ServerSide) -> bool:
        """Charge the handshake's account with what its admission holds (the parsed
        request and the bytes sent after it); over budget: refuse it. False if refused."""
        account = side.tunnel.machine.account
        if account is None:
            return True
        reason = account.charge(side.request_bytes + side.held_bytes)
        if reason is None:
            return True
        status = 503 if reason.startswith(TOTAL_BUDGET_EXCEEDED) else 429
        self._refuse(side, Rejection(status, reason, label="memory"))
        return False

    def _refuse(self, side: _ServerSide, rejection: Rejection) -> None:
        """Answer a request whose admission the bridge ends itself (timeout, memory),
        cancelling the gate's check if it is still running (its slot is released)."""
        task, side.task = side.task, None
        if task is not None:
            task.cancel()
        self.gate.rejected(rejection, request_id=side.request_id, peer=side.peer)
        self._send_rejection(side, rejection)

    def _answered(self, side: _ServerSide) -> None:
        """The request was refused (or answered from the static site): the handshake
        timeout stops, the request and the early bytes are dropped and uncharged."""
        side.stop_timer()
        side.handshake_done()
        if side.tunnel.machine.account is not None:
            side.tunnel.machine.account.charge(0)

    def _handshake_data(self, side: _ServerSide, data: bytes) -> None:
        tunnel = side.tunnel
        if tunnel not in self._sessions or (transport := tunnel.ws_transport) is None:
            return
        if side.head.complete:
            side.held.append(data)
            side.held_bytes += len(data)
            if side.held_bytes > MAX_EARLY_BYTES:
                log_event("upgrade_aborted", request_id=side.request_id, peer=side.peer,
                          reason=f"over {MAX_EARLY_BYTES} bytes sent before the answer")
                tunnel.machine.abort()
            else:
                self._charge_admission(side)
            return
        websocket = tunnel.websocket
        assert isinstance(websocket, ServerProtocol)  # set until the handshake is answered
        request, rest = side.head.feed(websocket, data)
        if request is None:
            if websocket.handshake_exc is not None:
                # Unparsable: answer 400 (or the 414/431 websockets wrote itself), close.
                status, chunks, reason = answer_malformed(websocket)
                self.gate.rejected(Rejection(status, reason, label="malformed"),
                                   request_id=new_request_id(), peer=side.peer)
                transport.writelines(chunks)
                transport.close()
                side.stop_timer()
                return
            tunnel.machine.charge()
            if tunnel.machine.close_code is not None:  # headers over the client's memory budget
                self.gate.rejected(Rejection(431, tunnel.machine.close_reason, label="memory"),
                                   request_id=new_request_id(), peer=side.peer)
                tunnel.machine.abort()
            return
        headers = header_map(request.headers.raw_items())
        side.request_id, side.client_request_id = self.gate.request_id(headers, peer=side.peer)
        if rest:
            side.held.append(rest)
            side.held_bytes = len(rest)
        # The handshake timeout keeps running until the answer: it bounds the admission too.
        side.request_bytes = side.head.size + PARSED_HEADER_BYTES * sum(map(len, headers.values()))
        tunnel.machine.pause_websocket()  # until the backend is attached (or the dial fails)
        if not self._charge_admission(side):
            return
        side.task = tunnel.loop.create_task(self._open(side, request, headers))
        side.task.add_done_callback(side.opened)

    def _send_rejection(self, side: _ServerSide, rejection: Rejection) -> None:
        """Answer the request with ``rejection`` (already counted and logged)."""
        tunnel = side.tunnel
        websocket = tunnel.websocket
        assert isinstance(websocket, ServerProtocol)
        response = websocket.reject(rejection.status, rejection.reason + "\n")
        for name, value in rejection.response_headers():
            response.headers[name] = value
        response.headers[REQUEST_ID_HEADER] = side.request_id
        websocket.send_response(response)
        tunnel.flush_websocket()
        self._answered(side)

    async def _open(self, side: _ServerSide, request: Request,
                    headers: dict[str, list[str]]) -> None:
        tunnel = side.tunnel
        loop = tunnel.loop
        websocket = tunnel.websocket
        assert isinstance(websocket, ServerProtocol)
        path, _, query = request.path.partition("?")
        upgrade = any("websocket" in value.lower() for value in headers.get("upgrade", ()))
        if (self.static is not None and not upgrade and path != self.config.path
                and self.config.host_policy.allows(single_host(headers))
                and (found := self.static.respond(
                    path, request.headers.get("If-None-Match"))) is not None):
            # A plain GET the static site answers.
            send_response(websocket, *found)
            tunnel.flush_websocket()
            self._answered(side)
            return
        decision = await self.gate.check(request_id=side.request_id,
                                         client_request_id=side.client_request_id,
                                         path=path, query=query, headers=headers,
                                         peer=side.peer, websocket=upgrade, now=loop.time())
        transport = tunnel.ws_transport
        if (tunnel not in self._sessions or tunnel.machine.ws_lost
                or tunnel.machine.close_code is not None
                or transport is None or transport.is_closing()):
            # the client left during the check
            if not isinstance(decision, Rejection):
                self.gate.limiter.release(decision.client, loop.time())
            return
        if isinstance(decision, Rejection):
            self._send_rejection(side, decision)
            return
        response = websocket.accept(request)
        if response.status_code != 101:
            body = (response.body or b"").decode(errors="replace").strip().replace("\n", " ")
            rejection = Rejection(response.status_code, body or "invalid WebSocket handshake",
                                  label="handshake")
            self.gate.rejected(rejection, request_id=side.request_id, peer=side.peer,
                               client=decision.client, path=path)
            self.gate.limiter.release(decision.client, loop.time())
            self._send_rejection(side, rejection)
            return
        if decision.subprotocol is not None:  # the gate's choice (websockets knows none)
            response.headers["Sec-WebSocket-Protocol"] = decision.subprotocol
        response.headers[REQUEST_ID_HEADER] = side.request_id
        side.stop_timer()
        # From here on the tunnel is charged to the client the gate identified (the
        # handshake's account, and the request's charge with it, is closed).
        try:
            accepted = TunnelSession(self, tunnel, decision, peer=side.peer, path=path,
                                     headers=headers)
        except BaseException:  # no session releases the gate's slot then: do it here
            self.gate.limiter.release(decision.client, loop.time())
            tunnel.machine.abort()
            raise
        self._relaying[tunnel] = accepted
        # Open on the WebSocket side; reading stays paused until the backend is attached.
        try:
            side.handshake_done((request, response))
        except Exception as exc:  # a bug here must not leave the connection hanging
            log_event("upgrade_failed", logging.ERROR, request_id=side.request_id,
                      peer=side.peer, error=repr(exc))
            tunnel.machine.abort()
            raise
        await accepted.connect_backend()

    def _tunnel_finished(self, side: _ServerSide) -> None:
        tunnel = side.tunnel
        if self._sessions.pop(tunnel, None) is None:
            return
        side.stop_timer()
        if (accepted := self._relaying.pop(tunnel, None)) is not None:
            accepted.finish()
            return
        if side.task is not None:  # the client left during admission: stop the auth hook
            side.task.cancel()
        # The budget account (a handshake's, charged to its peer address) was closed by the
        # machine: ``closed`` resolves only after websocket_lost.

    # -------------------------------------------------------------- probes

    async def _not_ready(self) -> str | None:
        """Why ``/readyz`` answers 503, or None when it answers 200."""
        if self._state != "running":
            return "draining" if self._state == "closing" else f"bridge {self._state}"
        return None if await self.backend.reachable() else "backend unreachable"


__all__ = ["Backend", "Bridge"]
