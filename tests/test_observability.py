"""grpcbridge.observability: the request id an upgrade request brings, and the labelled
counters that exist from the start."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from grpcbridge.observability import (
    DIAL_FAILURE_REASONS,
    DIRECTIONS,
    MAX_REQUEST_ID,
    PRESET_CLOSE_CODES,
    REJECTION_REASONS,
    BridgeMetrics,
    client_request_id,
)

SAFE = re.compile(rf"[A-Za-z0-9._:@+/=-]{{1,{MAX_REQUEST_ID}}}")


def test_a_well_formed_client_id_is_kept() -> None:
    for value in ("abc", "0f8fad5b-d9cb-469f-a165-70867728950e", "Root=1-5759e988/x+y:z@q",
                  "a" * MAX_REQUEST_ID):
        assert client_request_id([value]) == (value, None)


def test_none_given_is_no_problem() -> None:
    assert client_request_id([]) == (None, None)


def test_bad_ones_are_refused_with_a_reason() -> None:
    cases = {"": "empty", "a b": "characters outside", "a\nb": "characters outside",
             "é": "characters outside", "x" * (MAX_REQUEST_ID + 1): "over 128 characters (129)"}
    for value, why in cases.items():
        request_id, problem = client_request_id([value])
        assert request_id is None, value
        assert problem is not None and why in problem, (value, problem)
    assert client_request_id(["a", "b"]) == (None, "2 X-Request-Id headers")


@given(st.lists(st.text(max_size=200), max_size=3))
def test_whatever_the_client_sends_the_id_is_safe_and_bounded(values: list[str]) -> None:
    request_id, problem = client_request_id(values)
    assert request_id is None or SAFE.fullmatch(request_id)
    assert (problem is None) == (request_id in values or not values)
    assert problem is None or len(problem) < 80


def test_labelled_counters_start_with_every_known_value_at_zero() -> None:
    # So that increase()/rate() see the first refusal, dial failure or close after a start.
    registry = BridgeMetrics().registry
    expected = (
        [("grpcbridge_upgrades_rejected_total", {"reason": r}) for r in REJECTION_REASONS]
        + [("grpcbridge_backend_dial_failures_total", {"reason": r})
           for r in DIAL_FAILURE_REASONS]
        + [("grpcbridge_tunnels_closed_total", {"code": str(c)}) for c in PRESET_CLOSE_CODES]
        + [("grpcbridge_bytes_total", {"direction": d}) for d in DIRECTIONS])
    for name, labels in expected:
        assert registry.get_sample_value(name, labels) == 0, (name, labels)
    assert {1008, 1011} <= set(PRESET_CLOSE_CODES)  # the alert rules' codes
