"""Where a request may go again after a failure, and how many times: the retry rules both
engines apply to a `Decision` (Envoy's vocabulary: a retry goes to another host when it can)."""

from __future__ import annotations

from meshlet.policy.model import IDEMPOTENT_METHODS, Backend, Route
from meshlet.routing.request import Decision

GATEWAY_ERRORS = frozenset({502, 503, 504})


def candidates(decision: Decision) -> list[Backend]:
    """The chosen backend first, then the route's other backends by weight: where retries go."""
    others = sorted(decision.route.to, key=lambda target: -target.weight)
    chosen = decision.backend
    return [chosen] + [decision.policy.backend(t.backend) for t in others if t.backend != chosen.name]


def attempts_for(route: Route, method: str, condition: str) -> int:
    """How many attempts in all a failure of kind `condition` allows (1: no retry)."""
    retries = route.retries
    if retries is None or method not in IDEMPOTENT_METHODS or condition not in retries.on:
        return 1
    return 1 + retries.attempts


def status_conditions(code: int) -> tuple[str, ...]:
    """The retry conditions a response status matches."""
    if code in GATEWAY_ERRORS:
        return ("5xx", "gateway-error")
    return ("5xx",) if code >= 500 else ()


# gRPC status codes a retry condition names (grpc/doc/statuscodes.md), as Envoy's retry_on does.
GRPC_RETRY_CONDITIONS = {1: "cancelled", 4: "deadline-exceeded", 8: "resource-exhausted", 13: "internal",
                         14: "unavailable"}


def grpc_conditions(grpc_status: int) -> tuple[str, ...]:
    """The retry conditions a gRPC status (in trailers, or a trailers-only response) matches."""
    condition = GRPC_RETRY_CONDITIONS.get(grpc_status)
    return (condition,) if condition else ()
