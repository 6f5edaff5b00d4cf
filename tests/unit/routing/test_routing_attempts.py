"""Retry rules both engines share: which conditions a gRPC status or an HTTP status matches,
and how many attempts a route allows for each."""

from __future__ import annotations

import pytest

from meshlet.policy.model import RETRY_CONDITIONS, Retries, Route, WeightedBackend
from meshlet.routing.attempts import attempts_for, grpc_conditions, status_conditions


@pytest.mark.parametrize(("grpc_status", "conditions"), [
    (14, ("unavailable",)),
    (8, ("resource-exhausted",)),
    (1, ("cancelled",)),
    (4, ("deadline-exceeded",)),
    (13, ("internal",)),
    (0, ()),  # OK
    (2, ()),  # UNKNOWN: not retried (Istio neither)
    (5, ()),  # NOT_FOUND: the answer, not a failure to get one
    (16, ()),
    (-1, ()),
])
def test_grpc_conditions(grpc_status, conditions):
    assert grpc_conditions(grpc_status) == conditions


def test_every_grpc_condition_is_a_policy_condition():
    matched = {c for status in range(17) for c in grpc_conditions(status)}
    assert matched == {"unavailable", "resource-exhausted", "cancelled", "deadline-exceeded", "internal"}
    assert matched <= set(RETRY_CONDITIONS)


def test_a_grpc_error_is_not_an_http_5xx():
    assert status_conditions(200) == ()  # gRPC answers its errors with HTTP 200 and a grpc-status


def route(*conditions: str) -> Route:
    return Route("r", (WeightedBackend("a", 100),), retries=Retries(2, conditions))


@pytest.mark.parametrize(("method", "condition", "expected"), [
    ("POST", "unavailable", 3),  # every gRPC call is a POST: gRPC conditions ignore the method
    ("POST", "deadline-exceeded", 3),
    ("POST", "internal", 1),  # not listed
    ("POST", "5xx", 1),  # HTTP conditions still retry idempotent methods only
    ("GET", "5xx", 3),
])
def test_grpc_conditions_retry_any_method_http_ones_idempotent_only(method, condition, expected):
    assert attempts_for(route("unavailable", "deadline-exceeded", "5xx"), method, condition) == expected


def test_no_retries_no_second_attempt():
    assert attempts_for(Route("r", (WeightedBackend("a", 100),)), "POST", "unavailable") == 1
