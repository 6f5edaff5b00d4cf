"""Where a request may go again after a failure, and how many times: the retry rules both
engines apply to a `Decision` (Envoy's vocabulary: a retry goes to another host when it can)."""

from __future__ import annotations

from meshlet.policy.model import GRPC_RETRY_CONDITIONS, IDEMPOTENT_METHODS, Backend, Route
from meshlet.routing.request import Decision

GATEWAY_ERRORS = frozenset({502, 503, 504})
GRPC_CONDITIONS = frozenset(GRPC_RETRY_CONDITIONS.values())


def candidates(decision: Decision) -> list[Backend]:
    """The chosen backend first, then the route's other backends by weight: where retries go."""
    others = sorted(decision.route.to, key=lambda target: -target.weight)
    chosen = decision.backend
    return [chosen] + [decision.policy.backend(t.backend) for t in others if t.backend != chosen.name]


def attempts_for(route: Route, method: str, condition: str) -> int:
    """How many attempts in all a failure of kind `condition` allows (1: no retry).

    HTTP conditions retry idempotent methods only. gRPC's apply to any: every gRPC call is a
    POST, and the user chose which statuses are safe to retry by listing them (as in Istio).
    """
    retries = route.retries
    if retries is None or condition not in retries.on:
        return 1
    if method not in IDEMPOTENT_METHODS and condition not in GRPC_CONDITIONS:
        return 1
    return 1 + retries.attempts


def status_conditions(code: int) -> tuple[str, ...]:
    """The retry conditions a response status matches."""
    if code in GATEWAY_ERRORS:
        return ("5xx", "gateway-error")
    return ("5xx",) if code >= 500 else ()


def grpc_conditions(grpc_status: int) -> tuple[str, ...]:
    """The retry conditions a gRPC status matches, from the response trailers or a trailers-only
    response (gRPC answers errors with HTTP 200, so `5xx` never sees them)."""
    condition = GRPC_RETRY_CONDITIONS.get(grpc_status)
    return (condition,) if condition else ()
