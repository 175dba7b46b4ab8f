"""One admitted tunnel's path from upgrade to end, the same under :class:`~grpcbridge.Bridge`
and :class:`~grpcbridge.BridgeApp`: admit (the :class:`~.gate.Gate` decided) -> open (log,
metrics, the client's share of the memory budget, the tunnel's span) -> connect the backend
(1011 when it fails) -> account (bytes reported as they flow) -> close (budget released by the
machine when the WebSocket is lost; slot released, one ``tunnel_closed`` line with the code,
duration and bytes, the span ended).
Every log line carries the upgrade's request id (``Admitted.request_id``).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from ..core.age import jittered
from ..core.limits import MemoryBudget
from ..core.stream import CloseCode
from ..core.tunnel import TunnelMachine
from ..tracing import TunnelTrace, current_tunnel, end_tunnel, start_tunnel
from .gate import Admitted, Gate


class TunnelSession:
    """Bookkeeping of one admitted tunnel whose rules run in ``machine``. Create it once the
    upgrade is accepted; :meth:`finish` it exactly once when the tunnel has ended (later
    calls are no-ops)."""

    __slots__ = ("_finished", "_reported_to_backend", "_reported_to_client", "admitted",
                 "gate", "machine", "trace")

    def __init__(self, gate: Gate, budget: MemoryBudget, admitted: Admitted,
                 machine: TunnelMachine, *, peer: str, path: str, origin: str,
                 headers: Mapping[str, Sequence[str]]) -> None:
        self.gate = gate
        self.admitted = admitted
        self.machine = machine
        machine.request_id = admitted.request_id
        if machine.account is not None:  # a handshake charged to the peer address so far
            machine.account.close()
        machine.account = budget.open(admitted.client)
        self._reported_to_backend = 0
        self._reported_to_client = 0
        self._finished = False
        gate.opened(admitted, peer=peer, path=path, origin=origin)
        self.trace: TunnelTrace = start_tunnel(
            request_id=admitted.request_id, client=admitted.client, peer=peer, path=path,
            subprotocol=admitted.subprotocol, backend=str(gate.config.backend),
            headers=headers, trust_context=admitted.trust_trace_context,
            trust_rpc_context=gate.config.trust_trace_context)
        max_age = gate.config.max_tunnel_age
        if max_age:
            age = jittered(max_age, random.random())
            machine.retire_after(age, gate.config.max_tunnel_age_grace,
                                 lambda: gate.retiring(admitted, age))

    async def connect_backend(self, backend: Any, stream_owner: Any, buffer_bytes: int) -> None:
        """Attach the backend's stream side to ``stream_owner`` (the adapter). A backend
        that cannot be reached closes the tunnel with 1011 and a ``backend_dial_failed``
        line."""
        machine = self.machine
        machine.dialing = True
        started = machine.clock()
        tunnel = current_tunnel.set(self.trace)  # for in-process backends' RPC spans
        try:
            await backend.connect(stream_owner, buffer_bytes)
        except (OSError, TimeoutError) as exc:
            self.gate.backend_failed(self.admitted, exc)
            machine.close(CloseCode.INTERNAL_ERROR, "backend unavailable")
            return
        finally:
            current_tunnel.reset(tunnel)
            machine.stream_never_attached()  # a no-op once the stream side is attached
        self.gate.backend_connected(self.admitted, machine.clock() - started)

    def report_bytes(self) -> None:
        """Add the bytes relayed since the last report to the metrics."""
        machine = self.machine
        to_backend = machine.bytes_from_websocket - self._reported_to_backend
        to_client = machine.bytes_to_websocket - self._reported_to_client
        self._reported_to_backend = machine.bytes_from_websocket
        self._reported_to_client = machine.bytes_to_websocket
        self.gate.metrics.add_bytes(to_backend, to_client)

    def finish(self) -> None:
        """The tunnel ended: release its slot, report it. (Its budget account is the
        machine's to close, in ``websocket_lost``, which every adapter calls before the
        tunnel ends; closing it here too, idempotently, keeps an adapter cut short by a
        cancellation from pinning the client's budget.)"""
        if self._finished:
            return
        self._finished = True
        machine = self.machine
        if machine.account is not None:
            machine.account.close()
        now = machine.clock()
        self.gate.release(self.admitted, now)
        self.report_bytes()
        code = int(machine.close_code or CloseCode.ABNORMAL)
        self.gate.closed(self.admitted, code=code,
                         reason=machine.close_reason, duration=now - machine.opened_at,
                         bytes_to_backend=machine.bytes_from_websocket,
                         bytes_to_client=machine.bytes_to_websocket)
        end_tunnel(self.trace, code=code, reason=machine.close_reason,
                   bytes_to_backend=machine.bytes_from_websocket,
                   bytes_to_client=machine.bytes_to_websocket)
