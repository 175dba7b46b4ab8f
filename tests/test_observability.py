"""grpcbridge.observability: the request id chosen for an upgrade request."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from grpcbridge.observability import MAX_REQUEST_ID, choose_request_id

SAFE = re.compile(rf"[A-Za-z0-9._:@+/=-]{{1,{MAX_REQUEST_ID}}}")
GENERATED = re.compile(r"[0-9a-f]{32}")


def test_a_well_formed_client_id_is_kept() -> None:
    for value in ("abc", "0f8fad5b-d9cb-469f-a165-70867728950e", "Root=1-5759e988/x+y:z@q",
                  "a" * MAX_REQUEST_ID):
        assert choose_request_id([value]) == (value, None)


def test_none_given_is_generated_silently() -> None:
    request_id, problem = choose_request_id([])
    assert GENERATED.fullmatch(request_id) and problem is None
    assert choose_request_id([])[0] != request_id


def test_bad_ones_are_replaced_with_a_reason() -> None:
    cases = {"": "empty", "a b": "characters outside", "a\nb": "characters outside",
             "é": "characters outside", "x" * (MAX_REQUEST_ID + 1): "over 128 characters (129)"}
    for value, why in cases.items():
        request_id, problem = choose_request_id([value])
        assert GENERATED.fullmatch(request_id), value
        assert problem is not None and why in problem, (value, problem)
    request_id, problem = choose_request_id(["a", "b"])
    assert GENERATED.fullmatch(request_id) and problem == "2 X-Request-Id headers"


@given(st.lists(st.text(max_size=200), max_size=3))
def test_whatever_the_client_sends_the_id_is_safe_and_bounded(values: list[str]) -> None:
    request_id, problem = choose_request_id(values)
    assert SAFE.fullmatch(request_id)
    assert (problem is None) == (request_id in values or not values)
    assert problem is None or len(problem) < 80
