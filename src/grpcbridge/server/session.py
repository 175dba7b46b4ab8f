"""One admitted tunnel's path from upgrade to end, the same under :class:`~grpcbridge.Bridge`
and :class:`~grpcbridge.BridgeApp`: admit (the :class:`~.gate.Gate` decided) -> open (log,
metrics, the client's share of the memory budget, the tunnel's span) -> connect the backend
(1011 when it fails) -> account (bytes reported as they flow) -> close (budget released by the
machine when the WebSocket is lost; slot released, one ``tunnel_closed`` line with the code,
duration and bytes, the span ended).
Every log line carries the upgrade's request id (``Admitted.request_id``).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import cast

from ..backends import SocketBackend
from ..core.admission import loggable_path
from ..core.age import jittered
from ..core.config import BackendLike, BridgeConfig
from ..core.limits import MemoryBudget
from ..core.stream import CloseCode
from ..observability import DIAL_ERROR, DIAL_REFUSED, DIAL_TIMEOUT, BridgeMetrics, log_event
from ..relay import StreamAdapter, keepalive_forever
from ..sockets import close_tunnels
from ..tracing import TunnelTrace, current_tunnel, end_tunnel, start_tunnel
from .gate import Admitted, Gate


class TunnelSession:
    """Bookkeeping of one admitted tunnel of ``server`` (``tunnel``: the adapter whose machine
    runs its rules). Create it once the upgrade is accepted; :meth:`finish` it once the
    tunnel has ended."""

    __slots__ = ("_reported", "admitted", "machine", "server", "trace", "tunnel")

    def __init__(self, server: TunnelServer, tunnel: StreamAdapter, admitted: Admitted, *,
                 peer: str, path: str, headers: Mapping[str, Sequence[str]]) -> None:
        self.server = server
        self.tunnel = tunnel
        self.admitted = admitted
        self.machine = machine = tunnel.machine
        machine.request_id = admitted.request_id
        if machine.account is not None:  # a handshake charged to the peer address so far
            machine.account.close()
        machine.account = server.budget.open(admitted.client)
        #: Bytes relayed (to the backend, to the client) as last reported to the metrics.
        self._reported = (0, 0)
        server.metrics.upgrades_accepted.inc()
        server.metrics.tunnels_active.inc()
        extra = ({} if admitted.client_request_id is None
                 else {"client_request_id": admitted.client_request_id})
        log_event("upgrade_accepted", request_id=admitted.request_id, peer=peer,
                  client=admitted.client, path=loggable_path(path),
                  origin=headers.get("origin", [""])[0],
                  subprotocol=admitted.subprotocol or "", **extra)
        self.trace: TunnelTrace = start_tunnel(
            request_id=admitted.request_id, client=admitted.client, peer=peer, path=path,
            subprotocol=admitted.subprotocol, backend=str(server.config.backend),
            headers=headers, trust_context=admitted.trust_trace_context,
            trust_rpc_context=server.config.trust_trace_context)
        max_age = server.config.max_tunnel_age
        if max_age:
            age = jittered(max_age, random.random())
            machine.retire_after(age, server.config.max_tunnel_age_grace,
                                 lambda: self._retiring(age))

    def _retiring(self, age: float) -> None:
        """The tunnel reached its maximum age: its client was sent a GOAWAY."""
        self.server.metrics.tunnels_retired.inc()
        log_event("tunnel_retiring", request_id=self.admitted.request_id,
                  client=self.admitted.client, age=round(age, 3),
                  grace=self.server.config.max_tunnel_age_grace)

    async def connect_backend(self) -> None:
        """Attach the backend's stream side to the tunnel's adapter. A backend
        that cannot be reached closes the tunnel with 1011 and a ``backend_dial_failed``
        line."""
        machine = self.machine
        metrics = self.server.metrics
        backend_name = str(self.server.config.backend)
        machine.dialing = True
        started = machine.clock()
        tunnel = current_tunnel.set(self.trace)  # for in-process backends' RPC spans
        try:
            await self.server.backend.connect(self.tunnel, self.server.config.buffer_bytes)
        except (OSError, TimeoutError) as exc:
            reason = (DIAL_TIMEOUT if isinstance(exc, TimeoutError)
                      else DIAL_REFUSED if isinstance(exc, ConnectionRefusedError)
                      else DIAL_ERROR)
            metrics.backend_dial_failures.labels(reason).inc()
            log_event("backend_dial_failed", request_id=self.admitted.request_id,
                      backend=backend_name, reason=reason, error=str(exc) or type(exc).__name__)
            machine.close(CloseCode.INTERNAL_ERROR, "backend unavailable")
            return
        finally:
            current_tunnel.reset(tunnel)
            machine.stream_never_attached()  # a no-op once the stream side is attached
        metrics.backend_dial_seconds.observe(machine.clock() - started)
        log_event("tunnel_opened", request_id=self.admitted.request_id,
                  client=self.admitted.client, backend=backend_name)

    def report_bytes(self) -> None:
        """Add the bytes relayed since the last report to the metrics."""
        relayed = self.machine.bytes_from_websocket, self.machine.bytes_to_websocket
        self.server.metrics.add_bytes(relayed[0] - self._reported[0],
                                      relayed[1] - self._reported[1])
        self._reported = relayed

    def finish(self) -> None:
        """The tunnel ended: release its slot, report it. (Its budget account is the
        machine's to close, in ``websocket_lost``, which every adapter calls before the
        tunnel ends; closing it here too, idempotently, keeps an adapter cut short by a
        cancellation from pinning the client's budget.)"""
        machine = self.machine
        if machine.account is not None:
            machine.account.close()
        now = machine.clock()
        self.server.gate.limiter.release(self.admitted.client, now)
        self.report_bytes()
        code = int(machine.close_code or CloseCode.ABNORMAL)
        duration = now - machine.opened_at
        metrics = self.server.metrics
        metrics.tunnels_active.dec()
        metrics.tunnels_closed.labels(str(code)).inc()
        metrics.tunnel_duration.observe(duration)
        relayed = {"bytes_to_backend": machine.bytes_from_websocket,
                   "bytes_to_client": machine.bytes_to_websocket}
        log_event("tunnel_closed", request_id=self.admitted.request_id,
                  client=self.admitted.client, code=code, reason=machine.close_reason,
                  duration=round(duration, 3), **relayed)
        end_tunnel(self.trace, code=code, reason=machine.close_reason, **relayed)


class TunnelServer:
    """What :class:`~grpcbridge.Bridge` and :class:`~grpcbridge.BridgeApp` share: the
    config, metrics, gate, memory budget and backend, and the sessions of accepted tunnels
    (reported and ticked by :meth:`_keepalive`)."""

    def __init__(self, config: BridgeConfig, metrics: BridgeMetrics | None) -> None:
        if not isinstance(config, BridgeConfig):
            raise TypeError(f"{type(self).__name__}() takes a BridgeConfig")
        self.config = config
        self.metrics = metrics if metrics is not None else BridgeMetrics()
        self.gate = Gate(config, self.metrics)
        self.budget = MemoryBudget(per_client=config.client_memory_budget,
                                   total=config.memory_budget)
        self.backend: BackendLike = (  # a string (parsed to backend_address): a SocketBackend
            SocketBackend(config.backend_address, connect_timeout=config.backend_connect_timeout)
            if config.backend_address is not None else cast(BackendLike, config.backend))
        #: The accepted tunnels' sessions.
        self._relaying: dict[StreamAdapter, TunnelSession] = {}

    async def _close_tunnels(self, drain_timeout: float | None,
                             pending: Callable[[], Collection[asyncio.Future[None]]]) -> None:
        """Shutdown, the same for both servers: let what ``pending()`` waits for finish for
        up to ``drain_timeout`` seconds (None: the config's), then
        :func:`~grpcbridge.sockets.close_tunnels` (1001)."""
        seconds = self.config.drain_timeout if drain_timeout is None else drain_timeout
        if (waiting := pending()) and seconds > 0:
            log_event("bridge_draining", tunnels=len(waiting), timeout=seconds)
            await asyncio.wait(waiting, timeout=seconds)
        await close_tunnels(self._relaying, "server shutting down", pending)

    def _keepalive(self, ping_interval: float, idle_timeout: float) -> asyncio.Task[None]:
        """Every second (or as often as the pings need): report the bytes every accepted
        tunnel relayed and tick its machine (see :func:`keepalive_forever`)."""
        return asyncio.get_running_loop().create_task(keepalive_forever(
            lambda: list(self._relaying), ping_interval, idle_timeout, self._report_bytes))

    def _report_bytes(self) -> None:
        for session in self._relaying.values():
            session.report_bytes()
