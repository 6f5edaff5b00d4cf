"""Checks that span several fields of a loaded policy: references, sums, order, exclusivity.

Pure functions over the model; each returns located errors rather than raising, so a caller
collects every problem of a file in one pass.
"""

from __future__ import annotations

from meshlet.policy.errors import PolicyError
from meshlet.policy.model import LabelSelector, Mark, PolicySet, QoSPolicy, Route, TrafficPolicy
from meshlet.policy.values import is_hostname


def check_policy(policy: TrafficPolicy | QoSPolicy) -> list[PolicyError]:
    if isinstance(policy, TrafficPolicy):
        return check_traffic(policy)
    return check_qos(policy)


def check_traffic(policy: TrafficPolicy) -> list[PolicyError]:
    errors: list[PolicyError] = []

    def error(mark: Mark, message: str) -> None:
        errors.append(PolicyError(mark, message))

    if not is_hostname(policy.metadata.name) or policy.metadata.name != policy.metadata.name.lower():
        error(policy.metadata.mark, f"metadata.name {policy.metadata.name!r} must be a lower-case DNS name")
    if not is_hostname(policy.host):
        error(policy.mark, f"host {policy.host!r} is not a valid DNS name")
    for backend in policy.backends:
        if backend.identity and backend.tls != "mesh":
            error(backend.mark, f"backend {backend.name!r}: identity is only checked with tls: mesh; add it")

    backend_names = {b.name for b in policy.backends}
    seen_routes: dict[str, Route] = {}
    default: Route | None = None
    for route in policy.routes:
        where = f"route {route.name!r}"
        if route.name in seen_routes:
            error(route.mark, f"{where}: duplicate route name (first at line {seen_routes[route.name].mark.line})")
        seen_routes.setdefault(route.name, route)
        if default is not None:
            error(
                route.mark,
                f"{where} can never match: route {default.name!r} (line {default.mark.line}) has no match "
                "and takes every request; put the default route last",
            )
        elif route.is_default:
            default = route
        errors.extend(_check_targets(route, backend_names))
        if route.rollout:
            errors.extend(_check_rollout(route))
        if policy.dataplane == "kernel":
            errors.extend(_check_kernel_route(route))
    if policy.dataplane == "kernel":
        for backend in policy.backends:
            if backend.tls == "mesh":
                error(backend.mark, f"backend {backend.name!r}: dataplane kernel cannot originate mesh TLS; "
                      "use dataplane: proxy or auto")
            if backend.protocol != "auto":
                error(backend.mark, f"backend {backend.name!r}: dataplane kernel passes the client's bytes as they "
                      f"are and cannot speak protocol {backend.protocol}; use protocol: auto, or dataplane: proxy")
    return errors


def _check_targets(route: Route, backend_names: set[str]) -> list[PolicyError]:
    where = f"route {route.name!r}"
    if not route.to:
        return [PolicyError(route.mark, f"{where}: 'to' is empty; name at least one backend")]
    errors = []
    seen: set[str] = set()
    for target in route.to:
        if target.backend not in backend_names:
            known = ", ".join(sorted(backend_names))
            errors.append(PolicyError(target.mark, f"{where}: unknown backend {target.backend!r} (backends: {known})"))
        if target.backend in seen:
            errors.append(PolicyError(target.mark, f"{where}: backend {target.backend!r} is listed twice"))
        seen.add(target.backend)
    total = sum(t.weight for t in route.to)
    if total != 100:
        errors.append(PolicyError(route.to[0].mark, f"{where}: weights sum to {total}, must be 100"))
    return errors


def _check_rollout(route: Route) -> list[PolicyError]:
    rollout = route.rollout
    assert rollout is not None
    where = f"route {route.name!r} rollout"
    in_route = [t.backend for t in route.to]
    errors = []
    for role, backend in (("canary", rollout.canary), ("stable", rollout.stable)):
        if backend not in in_route:
            errors.append(PolicyError(rollout.mark, f"{where}: {role} {backend!r} is not a backend of this route "
                                      f"(its backends: {', '.join(in_route)})"))
    if rollout.canary == rollout.stable:
        errors.append(PolicyError(rollout.mark, f"{where}: canary and stable are both {rollout.canary!r}"))
    if any(b >= a for a, b in zip(rollout.steps[1:], rollout.steps, strict=False)):
        steps = ", ".join(map(str, rollout.steps))
        errors.append(PolicyError(rollout.mark, f"{where}: steps must strictly ascend, got [{steps}]"))
    return errors


def _check_kernel_route(route: Route) -> list[PolicyError]:
    """`dataplane: kernel` splits connections in a connect() hook: it cannot see requests."""
    needs = []
    if not route.is_default:
        needs.append("a request match")
    if route.retries:
        needs.append("retries")
    if route.timeout:
        needs.append("a timeout")
    if route.sticky and not route.sticky.source_ip:
        needs.append("header/cookie stickiness")
    if route.rollout:
        needs.append("a rollout, analysed per request")
    if not needs:
        return []
    return [PolicyError(
        route.mark,
        f"route {route.name!r} needs L7 ({', '.join(needs)}), which dataplane kernel cannot do; "
        "use dataplane: proxy or auto",
    )]


def check_qos(policy: QoSPolicy) -> list[PolicyError]:
    errors: list[PolicyError] = []
    port_owner: dict[int, str] = {}
    for cls in policy.classes:
        if cls.rate > cls.ceil:
            message = f"class {cls.name!r}: rate {cls.rate} bit/s is above ceil {cls.ceil} bit/s"
            errors.append(PolicyError(cls.mark, message))
        for port in cls.ports:
            owner = port_owner.setdefault(port, cls.name)
            if owner != cls.name:
                errors.append(PolicyError(cls.mark, f"class {cls.name!r}: port {port} is already in class {owner!r}; "
                                          "a port belongs to one class"))
    return errors


def check_set(policies: PolicySet) -> list[PolicyError]:
    """Checks across documents (and files): names and hosts are unique per namespace."""
    errors: list[PolicyError] = []
    names: dict[tuple[str, str, str], Mark] = {}
    hosts: dict[tuple[str, str], Mark] = {}
    interfaces: dict[tuple[str, object], Mark] = {}
    peer_auth: dict[tuple[str, LabelSelector | None], Mark] = {}
    for policy in policies:
        meta = policy.metadata
        key = (policy.kind, meta.namespace, meta.name)
        if key in names:
            errors.append(PolicyError(meta.mark, f"{policy.kind} {meta.namespace}/{meta.name} is defined twice "
                                      f"(first at {names[key]})"))
        names.setdefault(key, meta.mark)
        if isinstance(policy, TrafficPolicy):
            host_key = (meta.namespace, policy.host.lower())
            if host_key in hosts:
                errors.append(PolicyError(policy.mark, f"host {policy.host!r} is already governed by the policy at "
                                          f"{hosts[host_key]}; one policy per host"))
            hosts.setdefault(host_key, policy.mark)
            if policy.mtls is not None:
                errors.extend(_check_mtls_scope(policy, peer_auth))
        else:
            # Policies for other nodes (another nodeSelector) may name the same interface.
            shaped = (policy.interface, policy.node_selector)
            if shaped in interfaces:
                errors.append(PolicyError(policy.mark, f"interface {policy.interface!r} already has a QoSPolicy "
                                          f"for the same nodes (at {interfaces[shaped]})"))
            interfaces.setdefault(shaped, policy.mark)
    return errors


def _check_mtls_scope(policy: TrafficPolicy, seen: dict[tuple[str, LabelSelector | None], Mark]) -> list[PolicyError]:
    """One namespace default, and one mtls section per selector: never "whichever came first"."""
    assert policy.mtls is not None
    key = (policy.metadata.namespace, policy.mtls.selector)
    if key not in seen:
        seen[key] = policy.mtls.mark
        return []
    first = seen[key]
    if policy.mtls.selector is None:
        message = (f"mtls: namespace {policy.metadata.namespace!r} already has a default mtls section (at {first}); "
                   "keep one, or give this one a selector: {matchLabels: {...}} naming its workloads")
    else:
        message = f"mtls.selector {policy.mtls.selector} is already used by the mtls section at {first}; keep one"
    return [PolicyError(policy.mtls.mark, message)]
