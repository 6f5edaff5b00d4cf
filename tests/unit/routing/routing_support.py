"""Builders shared by the routing tests: request views and split policies from the model."""

from __future__ import annotations

from collections.abc import Mapping

from meshlet.policy.model import Address, Backend, Metadata, Route, Sticky, TrafficPolicy, WeightedBackend
from meshlet.routing import RequestView


def view(
    authority: str = "reviews",
    path: str = "/",
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    cookies: Mapping[str, str] | None = None,
    source_ip: str = "10.0.0.1",
    entropy: int = 0,
) -> RequestView:
    return RequestView(method, authority, path, headers or {}, cookies or {}, source_ip, entropy)


def split_policy(weights: Mapping[str, int], sticky: Sticky | None = None, host: str = "reviews") -> TrafficPolicy:
    """One default route splitting across `weights` (name → weight), in that order."""
    backends = tuple(Backend(name, Address("127.0.0.1", 9081 + i)) for i, name in enumerate(weights))
    route = Route("split", tuple(WeightedBackend(name, w) for name, w in weights.items()), sticky=sticky)
    return TrafficPolicy(Metadata("reviews"), host, backends, (route,))
