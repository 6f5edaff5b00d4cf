"""The values that cross the boundary between the proxy edge and the routing core.

The edge (the mitmproxy addon) reduces a request to a `RequestView` and gets back a
`Decision`, an `Unmatched` or None. Both results carry the policy model's own objects, so the
edge reads addresses, TLS settings, timeouts and retries from the policy it was given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from meshlet.policy.model import Backend, Route, TrafficPolicy


@dataclass(frozen=True, slots=True)
class RequestView:
    """What routing may look at, and nothing more: keeping it small keeps `decide()` pure.

    `headers` maps lower-cased names to their first value; `cookies` is what `parse_cookies`
    returned for the Cookie header. `entropy` is a random 64-bit draw made by the edge per
    request: non-sticky splits consume it, so the same view always gets the same answer.
    """

    method: str
    authority: str
    path: str
    headers: Mapping[str, str]
    cookies: Mapping[str, str]
    source_ip: str
    entropy: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    """Send the request to `backend`, under the timeout and retries of `route`."""

    policy: TrafficPolicy
    route: Route
    backend: Backend


@dataclass(frozen=True, slots=True)
class Unmatched:
    """The host is governed by `policy` but none of its routes matched: the proxy answers 404."""

    policy: TrafficPolicy
