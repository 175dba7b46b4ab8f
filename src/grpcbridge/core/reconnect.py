"""Connection attempts under a :class:`~grpcbridge.ReconnectPolicy` (sans-I/O).

Both channels (CPython and browser) dial lazily, on the next RPC. After a failed attempt the
next one waits for the policy's backoff; RPCs made meanwhile fail fast, as gRPC channels in
TRANSIENT_FAILURE do, with a message naming the last error and the time left.
"""

from __future__ import annotations

from .config import ReconnectPolicy


class Backoff:
    """Tracks consecutive failures of one channel; times are caller-supplied seconds."""

    __slots__ = ("_failures", "_last_error", "_policy", "_retry_at", "_target")

    def __init__(self, policy: ReconnectPolicy, target: str) -> None:
        self._policy = policy
        self._target = target
        self._failures = 0
        self._retry_at = 0.0
        self._last_error = ""

    def refusal(self, now: float) -> str | None:
        """Why an attempt may not start yet, or ``None`` if it may."""
        wait = self._retry_at - now
        if wait <= 0:
            return None
        return (f"tunnel to {self._target} is down ({self._last_error}); "
                f"next attempt in {wait:.1f} s")

    def failed(self, now: float, error: str, random_unit: float) -> None:
        """Record a failed attempt (``random_unit`` in [0, 1) spreads the delay)."""
        self._failures += 1
        self._last_error = error
        self._retry_at = now + self._policy.delay(self._failures, random_unit)

    def succeeded(self) -> None:
        self._failures = 0
        self._retry_at = 0.0
