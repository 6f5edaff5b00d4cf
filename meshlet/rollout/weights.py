"""Rollout weights as data: what the routing table must use instead of the policy's own split.

The running policy text never changes during a rollout (GET /policy shows what was applied);
the weights are a separate overlay, `{policy: {route: {backend: weight}}}`, compiled into the
table with the policy. Being plain JSON, the overlay travels to `--workers` processes with the
policy and survives a worker restart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

from meshlet.policy.model import Rollout, TrafficPolicy, WeightedBackend
from meshlet.rollout.machine import weighted_route

Weights = Mapping[str, Mapping[str, Mapping[str, int]]]


Overrides = Mapping[tuple[str, str], tuple[Rollout, int]]


def rollout_weights(policies: Iterable[TrafficPolicy], overrides: Overrides) -> dict:
    """The overlay for the controller's `overrides()` on the policies as written."""
    weights: dict[str, dict[str, dict[str, int]]] = {}
    for policy in policies:
        for route in policy.routes:
            override = overrides.get((policy.metadata.name, route.name))
            if override is not None:
                spec, canary_weight = override
                to = weighted_route(route, spec, canary_weight).to
                weights.setdefault(policy.metadata.name, {})[route.name] = {t.backend: t.weight for t in to}
    return weights


def apply_weights(policies: Iterable[TrafficPolicy], weights: Weights) -> tuple[TrafficPolicy, ...]:
    """The policies with the overlay's weights; routes and backends it does not name are untouched."""
    out = []
    for policy in policies:
        routes = weights.get(policy.metadata.name)
        if routes:
            policy = replace(policy, routes=tuple(
                replace(r, to=tuple(
                    WeightedBackend(t.backend, routes[r.name].get(t.backend, t.weight), mark=t.mark) for t in r.to
                )) if r.name in routes else r
                for r in policy.routes
            ))
        out.append(policy)
    return tuple(out)


def check_weights(value: object) -> Weights:
    """Validate an overlay received as JSON (from the supervisor); raises ValueError."""
    ok = isinstance(value, dict) and all(
        isinstance(routes, dict) and all(
            isinstance(backends, dict) and all(isinstance(w, int) and w >= 0 for w in backends.values())
            for backends in routes.values()
        ) for routes in value.values()
    )
    if not ok:
        raise ValueError("bad rollout weights: expected {policy: {route: {backend: weight}}}")
    return value  # type: ignore[return-value]
