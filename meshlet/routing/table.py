"""The compiled routing table and `decide()`, the pure function the proxy calls per request.

`compile_table` does all the work a policy allows in advance: host names into one dict,
regexes compiled, cumulative weights summed, sticky hashers keyed, and every possible
`Decision` built. `decide` then only looks up, tests and picks: it returns one of those
prebuilt results, allocates only transient values (the lower-cased host, the path without its
query when a route tests the path, the sticky key's hash), takes no lock and does no I/O.
A table is immutable: the proxy swaps in a new one by one reference assignment, and a request
in flight keeps the table it started with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from meshlet.policy.model import Route, Sticky, TrafficPolicy
from meshlet.routing.hosts import CLUSTER_DOMAIN, derived_names, explicit_names, host_key
from meshlet.routing.match import CompiledMatch, compile_match
from meshlet.routing.request import Decision, RequestView, Unmatched
from meshlet.routing.split import WeightedSplit, compile_split

StickyKey = Callable[[RequestView], "str | None"]
_MAPPED_V4 = "::ffff:"


def _source_ip(request: RequestView) -> str:
    """A v4 client seen through a dual-stack socket (`::ffff:10.0.0.7`) hashes as `10.0.0.7`."""
    ip = request.source_ip
    if ip.startswith(_MAPPED_V4) and "." in ip:
        return ip[len(_MAPPED_V4):]
    return ip


def _sticky_key(sticky: Sticky | None) -> StickyKey | None:
    if sticky is None:
        return None
    if sticky.header is not None:
        name = sticky.header.lower()
        return lambda request: request.headers.get(name)
    if sticky.cookie is not None:
        cookie = sticky.cookie
        return lambda request: request.cookies.get(cookie)
    if sticky.source_ip:
        return _source_ip
    return None


@dataclass(frozen=True, slots=True, eq=False)
class _CompiledRoute:
    match: CompiledMatch | None  # None: the default route
    split: WeightedSplit[Decision]
    sticky_key: StickyKey | None

    def choose(self, request: RequestView) -> Decision:
        """Sticky by the key when the request carries one (non-empty), else by the edge's entropy."""
        if self.sticky_key is not None:
            key = self.sticky_key(request)
            if key:
                return self.split.by_key(key.encode("utf-8", "surrogatepass"))
        return self.split.by_entropy(request.entropy)


@dataclass(frozen=True, slots=True, eq=False)
class _CompiledPolicy:
    policy: TrafficPolicy
    routes: tuple[_CompiledRoute, ...]
    unmatched: Unmatched
    matches_path: bool  # any route tests the path: only then is the query string cut off


def _compile_route(policy: TrafficPolicy, route: Route) -> _CompiledRoute:
    backends = {backend.name: backend for backend in policy.backends}
    choices = []
    for target in route.to:
        backend = backends.get(target.backend)
        if backend is None:
            raise ValueError(f"{target.mark}: route {route.name!r}: unknown backend {target.backend!r}")
        choices.append((target.backend, target.weight, Decision(policy, route, backend)))
    try:
        split = compile_split(choices)
    except ValueError as e:
        raise ValueError(f"{route.mark}: route {route.name!r}: {e}") from None
    return _CompiledRoute(compile_match(route.match), split, _sticky_key(route.sticky))


def _compile_policy(policy: TrafficPolicy) -> _CompiledPolicy:
    routes = tuple(_compile_route(policy, route) for route in policy.routes)
    matches_path = any(route.match is not None and route.match.path is not None for route in routes)
    return _CompiledPolicy(policy, routes, Unmatched(policy), matches_path)


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """Immutable; build it with `compile_table`. `generation` counts applies, for /policy and metrics."""

    generation: int
    policies: tuple[TrafficPolicy, ...]
    _hosts: Mapping[str, _CompiledPolicy] = field(repr=False, compare=False)

    def policy_for(self, authority: str) -> TrafficPolicy | None:
        compiled = self._hosts.get(host_key(authority))
        return compiled.policy if compiled is not None else None


def compile_table(
    policies: Iterable[TrafficPolicy], generation: int = 0, *, cluster_domain: str = CLUSTER_DOMAIN
) -> RoutingTable:
    """Compile validated policies. Raises ValueError (with the position) on what validation forbids.

    When two policies claim one name, a host as written beats a derived Kubernetes name, and
    then the earlier policy wins: `reviews.prod` as someone's explicit host is not taken over
    by the short host `reviews` of namespace `prod`, and two namespaces' `reviews` resolve
    the bare name to the first one loaded.
    """
    ordered = tuple(policies)
    compiled = [_compile_policy(policy) for policy in ordered]
    hosts: dict[str, _CompiledPolicy] = {}
    for entry in compiled:
        for name in explicit_names(entry.policy):
            hosts.setdefault(name, entry)
    for entry in compiled:
        for name in derived_names(entry.policy, cluster_domain):
            hosts.setdefault(name, entry)
    return RoutingTable(generation, ordered, MappingProxyType(hosts))


def decide(table: RoutingTable, request: RequestView) -> Decision | Unmatched | None:
    """None: no policy governs the host (pass through). Unmatched: governed, no route matched (404)."""
    entry = table._hosts.get(host_key(request.authority))
    if entry is None:
        return None
    path = request.path
    if entry.matches_path:
        query = path.find("?")
        if query >= 0:
            path = path[:query]
    for route in entry.routes:
        if route.match is None or route.match.matches(request, path):
            return route.choose(request)
    return entry.unmatched
