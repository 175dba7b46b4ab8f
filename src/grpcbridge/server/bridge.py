"""The bridge: a WebSocket server that hands each tunnel to a backend."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from ..backends import Backend, SocketBackend
from ..core.admission import AbuseLimiter, Rejection, select_subprotocol
from ..core.config import BackendLike, BridgeConfig
from ..core.errors import InvalidStateError
from ..core.limits import TOTAL_BUDGET_EXCEEDED, MemoryBudget
from ..core.stream import CloseCode
from ..core.target import host_port
from ..core.tunnel import CLOSE_TIMEOUT
from ..fastws import PicowsTunnel
from ..loops import loop_name
from ..observability import REQUEST_ID_HEADER, BridgeMetrics, log_event, new_request_id
from ..relay import Tunnel, WebSocketSide, keepalive_forever, websockets_logger
from ..sockets import Listener
from ..tracing import available as tracing_available
from .gate import Admitted, Gate, single_host
from .http import HttpServer, RequestHead, answer_malformed, probe_handler
from .session import TunnelSession
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


@dataclass(slots=True)
class _Session:
    """Bookkeeping of one accepted TCP connection on the bridge's listener."""

    peer: str
    #: Chosen once the request is read (its X-Request-Id, or a new one).
    request_id: str = ""
    admitted: Admitted | None = None
    #: Bytes the parsed request costs (its raw head plus :data:`PARSED_HEADER_BYTES` a
    #: line), charged with the early bytes to the handshake's account until the answer.
    request_bytes: int = 0
    #: Set once the 101 is sent: the tunnel's path from then on.
    tunnel: TunnelSession | None = None
    timer: asyncio.TimerHandle | None = None
    #: Answers the request (admission, upgrade, backend dial); None once done.
    task: asyncio.Task[None] | None = None

    def stop_timer(self) -> None:
        """Cancel the handshake deadline, if armed."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def opened(self, task: asyncio.Task[None]) -> None:
        """The request is answered: drop the task (and the request it holds)."""
        if self.task is task:
            self.task = None


class _ServerSide(WebSocketSide):
    """The bridge's protocol for one connection. Until the bridge has answered the HTTP
    request, bytes go to :meth:`Bridge._handshake_data`, which hands websockets the request
    up to its blank line only: whatever follows (a pipelined request, frames sent before
    the 101) stays unparsed in ``held`` until the answer, then reaches the tunnel (101) or
    is dropped (any other status)."""

    __slots__ = ("bridge", "eof", "handshaking", "head", "held", "held_bytes")

    tunnel: AnyTunnel  # type: ignore[assignment]

    def __init__(self, bridge: Bridge, tunnel: AnyTunnel, buffer_bytes: int) -> None:
        super().__init__(tunnel, buffer_bytes)  # type: ignore[arg-type]
        self.bridge = bridge
        self.handshaking = True
        self.head = RequestHead()
        self.eof = False
        self.held: list[bytes] = []
        self.held_bytes = 0

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


def _upgrade_requested(request: Request) -> bool:
    values = request.headers.get_all("Upgrade")
    return any("websocket" in value.lower() for value in values)


def make_backend(config: BridgeConfig) -> BackendLike:
    """The backend object for ``config.backend`` (a string means a :class:`SocketBackend`)."""
    if config.backend_address is not None:
        return SocketBackend(config.backend_address,
                             connect_timeout=config.backend_connect_timeout)
    assert not isinstance(config.backend, str)
    return config.backend


class Bridge:
    """Accepts WebSocket connections and hands each tunnel to the configured backend.

    Use it as an async context manager, or call :meth:`start` and :meth:`close`::

        async with Bridge(BridgeConfig(backend="127.0.0.1:50051", listen="127.0.0.1:8080")):
            await asyncio.Event().wait()
    """

    def __init__(self, config: BridgeConfig, *, metrics: BridgeMetrics | None = None) -> None:
        if not isinstance(config, BridgeConfig):
            raise TypeError("Bridge() takes a BridgeConfig")
        self.config = config
        self.metrics = metrics if metrics is not None else BridgeMetrics()
        self.gate = Gate(config, self.metrics)
        self.budget = MemoryBudget(per_client=config.client_memory_budget,
                                   total=config.memory_budget)
        self.backend = make_backend(config)
        self._sessions: dict[AnyTunnel, _Session] = {}
        self._listener = Listener(config.listen_address)
        self._metrics_server: HttpServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._ssl: ssl.SSLContext | None = None
        self._state = "new"
        self._closed = asyncio.Event()
        self._backend_started = False
        self.static = StaticSite(config.static) if config.static else None
        #: Bound ``(host, port)`` of the WebSocket listener (TCP only), after start.
        self.address: tuple[str, int] | None = None
        #: Bound ``(host, port)`` of the metrics listener, after start.
        self.metrics_address: tuple[str, int] | None = None

    @property
    def limiter(self) -> AbuseLimiter:
        """The abuse limiter (for inspection)."""
        return self.gate.limiter

    # ----------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        """The ``ws://`` / ``wss://`` URL of the tunnel endpoint (TCP listeners)."""
        if self.address is None:
            if self.config.listen_address.path is not None:
                raise InvalidStateError(
                    f"Bridge.url: the bridge listens on {self.config.listen}, a unix socket, "
                    "which has no ws:// URL; clients dial the socket path")
            raise InvalidStateError(
                f"Bridge.url is known once the bridge listens; it is {self._state}: "
                + ("await bridge.start() (or use 'async with Bridge(...)') first"
                   if self._state in ("new", "starting")
                   else "it never listened; create a new Bridge"))
        scheme = "wss" if self._ssl else "ws"
        return f"{scheme}://{host_port(*self.address)}{self.config.path}"

    @property
    def active_tunnels(self) -> int:
        """Tunnels currently accepted and not yet closed."""
        return sum(1 for session in self._sessions.values() if session.tunnel is not None)

    @property
    def connections(self) -> int:
        """Every connection the bridge holds state for (including handshakes)."""
        return len(self._sessions)

    async def start(self, *, sock: socket.socket | None = None) -> None:
        """Bind the listeners. Raises :class:`OSError` if an address is taken.

        ``sock``: serve this socket (bound to ``config.listen`` and listening already)
        instead of binding one; the bridge owns it from then on."""
        if self._state != "new":
            raise InvalidStateError(
                f"start() called on a bridge that is {self._state}; a Bridge starts once: "
                + ("it is already serving" if self._state in ("starting", "running")
                   else "create a new Bridge to serve again"))
        self._state = "starting"
        config = self.config
        loop = asyncio.get_running_loop()
        if config.certfile is not None:
            self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._ssl.load_cert_chain(config.certfile, config.keyfile)
        listen = config.listen_address
        tracing_available()  # import opentelemetry (when installed) now, not in a tunnel
        try:
            await self.backend.start()
            self._backend_started = True
            await self._listener.start(self._protocol_factory, ssl=self._ssl, sock=sock)
            self.address = self._listener.bound
            if config.metrics_address is not None:
                self._metrics_server = HttpServer(
                    probe_handler(self.metrics.registry, self._not_ready))
                metrics = config.metrics_address
                assert metrics.host is not None and metrics.port is not None
                self.metrics_address = await self._metrics_server.start(
                    metrics.host, metrics.port)
        except BaseException:
            await self._shutdown_listeners()
            self._state = "closed"
            self._closed.set()
            raise
        self._sweeper = loop.create_task(keepalive_forever(
            self._accepted_tunnels, config.ping_interval, config.idle_timeout,
            self._report_all_bytes))
        self._state = "running"
        log_event("bridge_started", listen=self.url if self.address else str(listen),
                  backend=str(self.backend), metrics=_format_address(self.metrics_address),
                  loop=loop_name(loop))

    async def serve_forever(self) -> None:
        """Wait until :meth:`close` finishes (starting the bridge first if needed)."""
        if self._state == "new":
            await self.start()
        await self._closed.wait()

    async def __aenter__(self) -> Bridge:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self, drain_timeout: float | None = None) -> None:
        """Stop accepting, let open tunnels finish for up to ``drain_timeout`` seconds
        (default: the config's), then close the rest with 1001. Idempotent and safe to call
        from several tasks at once: every caller returns once the bridge is closed."""
        if self._state in ("closing", "closed"):
            await self._closed.wait()
            return
        self._state = "closing"
        try:
            await self._drain(self.config.drain_timeout if drain_timeout is None
                              else drain_timeout)
        finally:
            await self._shutdown_listeners()
            self._state = "closed"
            self._closed.set()
            log_event("bridge_stopped")

    async def _drain(self, seconds: float) -> None:
        self._listener.stop_accepting()
        # Connections still in their handshake are not tunnels yet: drop them.
        for tunnel, session in list(self._sessions.items()):
            if session.tunnel is None:
                if session.task is not None:
                    session.task.cancel()
                tunnel.machine.abort()
        pending = [tunnel.closed for tunnel in self._sessions]
        if pending and seconds > 0:
            log_event("bridge_draining", tunnels=len(pending), timeout=seconds)
            await asyncio.wait(pending, timeout=seconds)
        for tunnel in list(self._sessions):
            tunnel.machine.close(CloseCode.GOING_AWAY, "server shutting down")
        pending = [tunnel.closed for tunnel in self._sessions]
        if pending:
            await asyncio.wait(pending, timeout=CLOSE_TIMEOUT + 1)
        for tunnel in list(self._sessions):
            tunnel.machine.abort()
        pending = [tunnel.closed for tunnel in self._sessions]
        if pending:
            await asyncio.wait(pending, timeout=1)
        tasks = [s.task for s in self._sessions.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _shutdown_listeners(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self._listener.close()
        if self._metrics_server is not None:
            await self._metrics_server.close()
            self._metrics_server = None
        if self._backend_started:
            self._backend_started = False
            await self.backend.close()

    # -------------------------------------------------------- connections

    def _protocol_factory(self) -> _ServerSide:
        config = self.config
        loop = asyncio.get_running_loop()
        gate = self.gate
        websocket = ServerProtocol(
            max_size=config.max_message_bytes,
            extensions=[ServerPerMessageDeflateFactory()] if config.compression else None,
            # The gate chose the subprotocol already; this only reports it to websockets.
            select_subprotocol=lambda protocol, offered: _chosen_subprotocol(gate, offered),
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
        if self._state != "running":
            tunnel.ws_transport.abort()
            return
        peername = tunnel.ws_transport.get_extra_info("peername")
        peer = peername[0] if isinstance(peername, tuple) else "unix"
        session = _Session(peer=peer)
        self._sessions[tunnel] = session
        # Until admission names the client, the handshake is charged to the peer address.
        tunnel.machine.account = self.budget.open(peer)
        session.timer = tunnel.loop.call_later(
            self.config.handshake_timeout, self._handshake_timed_out, side)
        tunnel.closed.add_done_callback(lambda _f: self._tunnel_finished(tunnel))

    def _handshake_timed_out(self, side: _ServerSide) -> None:
        """The handshake timeout passed before the request was answered: a client still
        sending its head is dropped (408 in the log); a request still in admission (a slow
        auth hook) has the hook cancelled and is answered 503."""
        tunnel = side.tunnel
        session = self._sessions.get(tunnel)
        if session is None or session.tunnel is not None:
            return
        session.timer = None
        if session.task is None:
            self.gate.rejected(Rejection(408, "handshake timeout", label="timeout"),
                               request_id=session.request_id or new_request_id(),
                               peer=session.peer)
            tunnel.machine.abort()
            return
        self._refuse(side, session, Rejection(
            503, f"admission did not finish within the handshake timeout "
            f"({self.config.handshake_timeout:g} s)", label="timeout"))

    def _charge_admission(self, side: _ServerSide, session: _Session) -> bool:
        """Charge the handshake's account with what its admission holds (the parsed
        request and the bytes sent after it); over budget: refuse it. False if refused."""
        account = side.tunnel.machine.account
        if account is None:
            return True
        reason = account.charge(session.request_bytes + side.held_bytes)
        if reason is None:
            return True
        status = 503 if reason.startswith(TOTAL_BUDGET_EXCEEDED) else 429
        self._refuse(side, session, Rejection(status, reason, label="memory"))
        return False

    def _refuse(self, side: _ServerSide, session: _Session, rejection: Rejection) -> None:
        """Answer a request whose admission the bridge ends itself (timeout, memory),
        cancelling the gate's check if it is still running (its slot is released)."""
        task, session.task = session.task, None
        if task is not None:
            task.cancel()
        self.gate.rejected(rejection, request_id=session.request_id, peer=session.peer)
        self._send_rejection(side.tunnel, rejection, session.request_id)
        self._answered(side, session)

    def _answered(self, side: _ServerSide, session: _Session) -> None:
        """The request was refused (or answered from the static site): the handshake
        timeout stops, the request and the early bytes are dropped and uncharged."""
        session.stop_timer()
        side.handshake_done()
        if side.tunnel.machine.account is not None:
            side.tunnel.machine.account.charge(0)

    def _handshake_data(self, side: _ServerSide, data: bytes) -> None:
        tunnel = side.tunnel
        session = self._sessions.get(tunnel)
        if session is None or tunnel.ws_transport is None:
            return
        if side.head.complete:
            side.held.append(data)
            side.held_bytes += len(data)
            if side.held_bytes > MAX_EARLY_BYTES:
                log_event("upgrade_aborted", request_id=session.request_id, peer=session.peer,
                          reason=f"over {MAX_EARLY_BYTES} bytes sent before the answer")
                tunnel.machine.abort()
            else:
                self._charge_admission(side, session)
            return
        head, rest = side.head.split(data)
        websocket = tunnel.websocket
        assert websocket is not None  # set until the handshake is answered
        websocket.receive_data(head)
        request = next((event for event in websocket.events_received()
                        if isinstance(event, Request)), None)
        if request is None:
            if websocket.handshake_exc is not None:
                self._malformed_request(tunnel, session)
                return
            tunnel.machine.charge()
            if tunnel.machine.close_code is not None:  # headers over the client's budget
                self.gate.rejected(Rejection(431, tunnel.machine.close_reason, label="memory"),
                                   request_id=new_request_id(), peer=session.peer)
                tunnel.machine.abort()
            return
        session.request_id = self.gate.request_id(request.headers.get_all(REQUEST_ID_HEADER),
                                                  peer=session.peer)
        if rest:
            side.held.append(rest)
            side.held_bytes = len(rest)
        # The handshake timeout keeps running until the answer: it bounds the admission too.
        lines = sum(1 for _ in request.headers.raw_items())
        session.request_bytes = side.head.size + PARSED_HEADER_BYTES * lines
        tunnel.machine.pause_websocket()  # until the backend is attached (or the dial fails)
        if not self._charge_admission(side, session):
            return
        session.task = tunnel.loop.create_task(self._open(side, session, request))
        session.task.add_done_callback(session.opened)

    def _malformed_request(self, tunnel: AnyTunnel, session: _Session) -> None:
        """websockets could not parse the request: answer 400 (or the 414/431 websockets
        wrote itself), log it, close."""
        websocket = tunnel.websocket
        assert isinstance(websocket, ServerProtocol)
        status, chunks, reason = answer_malformed(websocket)
        self.gate.rejected(Rejection(status, reason, label="malformed"),
                           request_id=new_request_id(), peer=session.peer)
        transport = tunnel.ws_transport
        assert transport is not None
        transport.writelines(chunks)
        transport.close()
        session.stop_timer()

    def _send_rejection(self, tunnel: AnyTunnel, rejection: Rejection, request_id: str) -> None:
        websocket = tunnel.websocket
        assert isinstance(websocket, ServerProtocol)
        response = websocket.reject(rejection.status, rejection.reason + "\n")
        for name, value in rejection.response_headers():
            response.headers[name] = value
        response.headers[REQUEST_ID_HEADER] = request_id
        websocket.send_response(response)
        tunnel.flush_websocket()

    def _send_static(self, tunnel: AnyTunnel, path: str, request: Request) -> bool:
        """Answer a plain GET from the static site; False if it has no such file."""
        if self.static is None or path == self.config.path:
            return False
        found = self.static.respond(path, request.headers.get("If-None-Match"))
        if found is None:
            return False
        websocket = tunnel.websocket
        assert isinstance(websocket, ServerProtocol)
        response = websocket.reject(found.status, "")
        response.body = found.body
        del response.headers["Content-Type"]
        del response.headers["Content-Length"]
        for name, value in found.headers:
            response.headers[name] = value
        response.headers["Content-Length"] = str(len(found.body))
        websocket.send_response(response)
        tunnel.flush_websocket()
        return True

    async def _open(self, side: _ServerSide, session: _Session, request: Request) -> None:
        tunnel = side.tunnel
        loop = tunnel.loop
        path, _, query = request.path.partition("?")
        headers: dict[str, list[str]] = {}
        for name, value in request.headers.raw_items():
            headers.setdefault(name.lower(), []).append(value)
        if (not _upgrade_requested(request)
                and self.config.host_policy.allows(single_host(headers))
                and self._send_static(tunnel, path, request)):
            self._answered(side, session)
            return
        decision = await self.gate.check(request_id=session.request_id, path=path,
                                         query=query, headers=headers, peer=session.peer,
                                         websocket=_upgrade_requested(request), now=loop.time())
        transport = tunnel.ws_transport
        if (self._sessions.get(tunnel) is not session or tunnel.machine.ws_lost
                or tunnel.machine.close_code is not None
                or transport is None or transport.is_closing()):
            # the client left during the check
            if not isinstance(decision, Rejection):
                self.gate.release(decision, loop.time())
            return
        if isinstance(decision, Rejection):
            self._send_rejection(tunnel, decision, session.request_id)
            self._answered(side, session)
            return
        session.admitted = decision
        websocket = tunnel.websocket
        assert isinstance(websocket, ServerProtocol)
        response = websocket.accept(request)
        if response.status_code != 101:
            body = (response.body or b"").decode(errors="replace").strip().replace("\n", " ")
            rejection = Rejection(response.status_code, body or "invalid WebSocket handshake",
                                  label="handshake")
            self.gate.rejected(rejection, request_id=session.request_id, peer=session.peer,
                               client=decision.client, path=path)
            self._send_rejection(tunnel, rejection, session.request_id)
            self._answered(side, session)
            return
        response.headers[REQUEST_ID_HEADER] = session.request_id
        session.stop_timer()
        # From here on the tunnel is charged to the client the gate identified (the
        # handshake's account, and the request's charge with it, is closed).
        session.tunnel = TunnelSession(self.gate, self.budget, decision, tunnel.machine,
                                       peer=session.peer, path=path,
                                       origin=request.headers.get("Origin", ""),
                                       headers=headers)
        # Open on the WebSocket side; reading stays paused until the backend is attached.
        try:
            side.handshake_done((request, response))
        except Exception as exc:  # a bug here must not leave the connection hanging
            log_event("upgrade_failed", logging.ERROR, request_id=session.request_id,
                      peer=session.peer, error=repr(exc))
            tunnel.machine.abort()
            raise
        await session.tunnel.connect_backend(self.backend, tunnel, self.config.buffer_bytes)

    def _tunnel_finished(self, tunnel: AnyTunnel) -> None:
        session = self._sessions.pop(tunnel, None)
        if session is None:
            return
        session.stop_timer()
        if session.tunnel is not None:
            session.tunnel.finish()
            return
        if session.task is not None:  # the client left during admission: stop the auth hook
            session.task.cancel()
        # The budget account (a handshake's, charged to its peer address) was closed by the
        # machine: ``closed`` resolves only after websocket_lost.
        if session.admitted is not None:  # admitted, then refused by the WebSocket checks
            self.gate.release(session.admitted, tunnel.loop.time())

    def _accepted_tunnels(self) -> list[AnyTunnel]:
        return [tunnel for tunnel, session in self._sessions.items()
                if session.tunnel is not None]

    def _report_all_bytes(self) -> None:
        for session in self._sessions.values():
            if session.tunnel is not None:
                session.tunnel.report_bytes()

    # -------------------------------------------------------------- probes

    async def backend_reachable(self) -> bool:
        """Whether a tunnel opened now would reach the backend."""
        return await self.backend.reachable()

    async def _not_ready(self) -> str | None:
        """Why ``/readyz`` answers 503, or None when it answers 200."""
        if self._state != "running":
            return "draining" if self._state == "closing" else f"bridge {self._state}"
        return None if await self.backend_reachable() else "backend unreachable"


def _chosen_subprotocol(gate: Gate, offered: Sequence[str]) -> Subprotocol | None:
    chosen = select_subprotocol(offered, gate.config.subprotocols)
    return None if chosen is None else Subprotocol(chosen)


def _format_address(address: Sequence[object] | None) -> str:
    return "" if address is None else host_port(str(address[0]), cast(int, address[1]))


__all__ = ["Backend", "Bridge", "make_backend"]
