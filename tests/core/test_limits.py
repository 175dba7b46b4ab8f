"""The sans-I/O bounds of grpcbridge.core.limits: frame rate and memory budget, with a fake
clock and random interleavings (Hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grpcbridge.core.config import BridgeConfig
from grpcbridge.core.errors import ConfigError
from grpcbridge.core.limits import FrameRate, MemoryBudget


def test_frame_rate_allows_burst_then_refuses_until_refilled() -> None:
    rate = FrameRate(0.0, rate=10.0, burst=5)
    assert all(rate.allow(0.0) for _ in range(5))
    assert not rate.allow(0.0)
    assert not rate.allow(0.05)  # half a token back: still refused
    assert rate.allow(0.2)  # two tokens back
    assert rate.allow(0.2)
    assert not rate.allow(0.2)
    # A long quiet spell refills to the burst, never beyond it.
    assert sum(rate.allow(100.0) for _ in range(10)) == 5


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=0.5), max_size=400))
def test_frame_rate_never_exceeds_rate_times_time_plus_burst(gaps: list[float]) -> None:
    rate, burst = 20.0, 10
    limiter = FrameRate(0.0, rate=rate, burst=burst)
    now = 0.0
    allowed = 0
    for gap in gaps:
        now += gap
        allowed += limiter.allow(now)
    assert allowed <= burst + rate * now + 1e-9


def test_budget_per_client_and_total() -> None:
    budget = MemoryBudget(per_client=100, total=150)
    a1, a2 = budget.open("a"), budget.open("a")
    b = budget.open("b")
    assert a1.charge(60) is None
    reason = a2.charge(41)
    assert reason is not None and reason.startswith("client memory budget exceeded")
    assert budget.held_by("a") == 101
    assert a2.charge(0) is None  # shrinking is always fine
    assert b.charge(90) is None  # b within its own budget, total 150
    reason = b.charge(91)
    assert reason is not None and reason.startswith("bridge memory budget exceeded")
    for account in (a1, a2, b):
        account.close()
        account.close()  # idempotent
    assert budget.held == 0 and budget.tracked_clients == 0
    assert a1.charge(10**9) is None  # after close: a no-op
    assert budget.held == 0


def test_budget_zero_disables() -> None:
    budget = MemoryBudget(per_client=0, total=0)
    account = budget.open("x")
    assert account.charge(10**12) is None
    account.close()


def test_bad_budget_limits_are_refused_by_the_config() -> None:
    with pytest.raises(ConfigError, match="client_memory_budget"):
        BridgeConfig(backend="127.0.0.1:50051", client_memory_budget=-1)
    with pytest.raises(ConfigError, match="memory_budget"):
        BridgeConfig(backend="127.0.0.1:50051", memory_budget=True)


_actions = st.lists(
    st.tuples(st.sampled_from(["charge", "close", "open"]), st.integers(0, 5),
              st.sampled_from(["a", "b", "c"]), st.integers(0, 300)),
    max_size=200)


@settings(max_examples=300, deadline=None)
@given(_actions)
def test_budget_accounting_invariants(actions: list[tuple[str, int, str, int]]) -> None:
    """Whatever the order of opens, charges and closes: the totals are the sums of what
    open accounts hold, an over-budget answer comes only from growth past a limit, and
    closing everything leaves no state."""
    budget = MemoryBudget(per_client=400, total=700)
    accounts = [budget.open(client) for client in ("a", "b", "c")]
    for action, index, client, amount in actions:
        account = accounts[index % len(accounts)]
        if action == "open":
            accounts.append(budget.open(client))
        elif action == "close":
            account.close()
        else:
            before_total = budget.held
            reason = account.charge(amount)
            if reason is not None:
                assert not account.closed
                grew = budget.held > before_total
                assert grew and (budget.held_by(account.client) > 400 or budget.held > 700)
            elif not account.closed and budget.held > before_total:
                assert budget.held_by(account.client) <= 400 and budget.held <= 700
        live = [a for a in accounts if not a.closed]
        assert budget.held == sum(a.held for a in live)
        for name in ("a", "b", "c"):
            assert budget.held_by(name) == sum(a.held for a in live if a.client == name)
    for account in accounts:
        account.close()
    assert budget.held == 0 and budget.tracked_clients == 0
