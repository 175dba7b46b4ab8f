"""Bounds on what one WebSocket peer can make a relay spend, sans-I/O.

* :class:`FrameRate` - a token bucket for frames that carry no stream bytes (pings, pongs,
  empty data frames): legitimate peers send a few per minute, a flood of them costs parsing
  and replies for nothing, so a peer that exceeds the rate is closed with 1008.
* :class:`MemoryBudget` - bytes a bridge holds on behalf of clients (incomplete WebSocket
  messages and the write buffers of both directions), per client and in total. A tunnel
  whose growth takes its client (or the bridge) over budget is closed with 1008, so one
  address cannot pin more than its share of memory, whatever it sends or refuses to read.

Both take clock readings and byte counts as arguments; nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024

#: Frames without stream bytes (ping, pong, close, empty data) a peer may send per second,
#: sustained, and in one burst. The Go client and browsers send a ping every few seconds at
#: most; these leave two orders of magnitude of headroom.
CONTROL_FRAMES_PER_SECOND = 100.0
CONTROL_FRAME_BURST = 500
#: Data frames processed for one connection before it yields the event loop to the others
#: (reading pauses until the loop's next iteration): bounds the work one read can cause.
FRAMES_PER_TURN = 256
#: Bytes a partial frame must grow by to count as activity for the idle timeout (complete
#: frames always count): a peer trickling bytes into a large frame is idle.
PROGRESS_BYTES = 64 * 1024
#: Bytes one client (address, or forwarded address behind a trusted proxy) may make the
#: bridge hold in incomplete messages and buffers, and the bridge in total. 48 MiB counted
#: keeps what one address can pin below 64 MiB of process memory, with the allocator's
#: slack on growing buffers and the fixed cost of its tunnels (about 10 KiB each).
DEFAULT_CLIENT_MEMORY_BUDGET = 48 * MiB
DEFAULT_MEMORY_BUDGET = 2048 * MiB
#: How a refusal over the bridge-wide budget begins (the per-client one says "client ...").
TOTAL_BUDGET_EXCEEDED = "bridge memory budget exceeded"


class FrameRate:
    """Token bucket: ``allow(now)`` is False once the peer has sent more than ``burst``
    frames beyond ``rate`` per second."""

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, now: float, rate: float = CONTROL_FRAMES_PER_SECOND,
                 burst: int = CONTROL_FRAME_BURST) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = now

    def allow(self, now: float) -> bool:
        tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        allowed = tokens >= 1.0
        self._tokens = tokens - 1.0 if allowed else tokens
        return allowed


@dataclass(slots=True)
class _Holder:
    held: int = 0
    accounts: int = 0


class MemoryBudget:
    """Bytes held for clients, per client and in total (limits of 0 are disabled; both are
    validated by :class:`~grpcbridge.core.config.BridgeConfig`).

    Each tunnel opens a :class:`BudgetAccount` for its client and reports what it holds
    with :meth:`BudgetAccount.charge`; a charge that takes the client or the bridge over its
    limit returns the reason to close that tunnel. State exists only for clients with open
    accounts, so memory does not grow with distinct clients.
    """

    __slots__ = ("_clients", "held", "per_client", "total")

    def __init__(self, *, per_client: int = DEFAULT_CLIENT_MEMORY_BUDGET,
                 total: int = DEFAULT_MEMORY_BUDGET) -> None:
        self.per_client = per_client
        self.total = total
        self.held = 0
        self._clients: dict[str, _Holder] = {}

    def open(self, client: str) -> BudgetAccount:
        holder = self._clients.setdefault(client, _Holder())
        holder.accounts += 1
        return BudgetAccount(self, client, holder)

    def held_by(self, client: str) -> int:
        """Bytes currently charged to ``client`` (0 for unknown clients)."""
        holder = self._clients.get(client)
        return 0 if holder is None else holder.held

    @property
    def tracked_clients(self) -> int:
        return len(self._clients)


class BudgetAccount:
    """One tunnel's share of a :class:`MemoryBudget`. Close it when the tunnel ends."""

    __slots__ = ("_budget", "_holder", "client", "closed", "held")

    def __init__(self, budget: MemoryBudget, client: str, holder: _Holder) -> None:
        self._budget = budget
        self._holder = holder
        self.client = client
        self.held = 0
        self.closed = False

    def charge(self, held: int) -> str | None:
        """Record that the tunnel now holds ``held`` bytes. Returns why the tunnel must be
        closed when this growth exceeds a budget, else None."""
        delta = held - self.held
        if not delta or self.closed:
            return None
        self.held = held
        holder = self._holder
        holder.held += delta
        budget = self._budget
        budget.held += delta
        if delta < 0:
            return None
        if budget.per_client and holder.held > budget.per_client:
            return (f"client memory budget exceeded ({holder.held} bytes held in unfinished "
                    f"messages and buffers, limit {budget.per_client})")
        if budget.total and budget.held > budget.total:
            return f"{TOTAL_BUDGET_EXCEEDED} ({budget.held} bytes, limit {budget.total})"
        return None

    def close(self) -> None:
        """Release what the tunnel held. Idempotent."""
        if self.closed:
            return
        self.charge(0)
        self.closed = True
        holder = self._holder
        holder.accounts -= 1
        if not holder.accounts:
            del self._budget._clients[self.client]
