"""What an apply changes: policies, backends, routes and weights added, removed or changed.

Pure: two `PolicySet`s in, human-readable lines out (`+` added, `-` removed, `~` changed),
so `meshlet apply` can show the change before making it and tests need no sidecar.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

from meshlet.policy.model import Backend, PolicySet, Route, TrafficPolicy

T = TypeVar("T")


def _by(items: Iterable[T], key) -> dict[str, T]:
    return {key(item): item for item in items}


def _backend_text(backend: Backend) -> str:
    extra = f" tls={backend.tls}" if backend.tls != "none" else ""
    extra += f" protocol={backend.protocol}" if backend.protocol != "auto" else ""
    return f"{backend.address}{extra}"


def _weights(route: Route) -> dict[str, int]:
    return {target.backend: target.weight for target in route.to}


def _route_changes(old: Route, new: Route) -> list[str]:
    changes = []
    before, after = _weights(old), _weights(new)
    for name in sorted(before.keys() | after.keys()):
        if before.get(name, 0) != after.get(name, 0):
            changes.append(f"{name} {before.get(name, 0)}→{after.get(name, 0)}")
    for attr in ("match", "sticky", "timeout", "retries", "rollout"):
        if getattr(old, attr) != getattr(new, attr):
            changes.append(f"{attr} changed")
    return changes


def _diff_named(kind: str, old: Mapping[str, T], new: Mapping[str, T], describe, compare) -> list[str]:
    lines = []
    for name in old.keys() - new.keys():
        lines.append(f"- {kind} {name}")
    for name in new:
        if name not in old:
            lines.append(f"+ {kind} {name} ({describe(new[name])})")
        elif changes := compare(old[name], new[name]):
            lines.append(f"~ {kind} {name}: {', '.join(changes)}")
    return sorted(lines, key=lambda line: (line[2:], line[0]))


def _policy_changes(old: TrafficPolicy, new: TrafficPolicy) -> list[str]:
    lines = []
    if old.host != new.host:
        lines.append(f"~ host {old.host} → {new.host}")
    lines += _diff_named(
        "backend", _by(old.backends, lambda b: b.name), _by(new.backends, lambda b: b.name), _backend_text,
        lambda a, b: [] if a == b else [f"{_backend_text(a)} → {_backend_text(b)}"],
    )
    lines += _diff_named(
        "route", _by(old.routes, lambda r: r.name), _by(new.routes, lambda r: r.name),
        lambda r: ", ".join(f"{k} {v}" for k, v in _weights(r).items()), _route_changes,
    )
    if [r.name for r in old.routes if r.name in {n.name for n in new.routes}] != [
        r.name for r in new.routes if r.name in {o.name for o in old.routes}
    ]:
        lines.append("~ route order changed")
    for attr in ("dataplane", "mtls", "qos_class"):
        if getattr(old, attr) != getattr(new, attr):
            lines.append(f"~ {attr} changed")
    return lines


def diff(old: PolicySet, new: PolicySet) -> list[str]:
    """Lines describing the change from `old` to `new`; empty when they are equivalent."""

    def key(policy: TrafficPolicy) -> str:
        return f"{policy.metadata.namespace}/{policy.metadata.name}"

    before, after = _by(old.traffic, key), _by(new.traffic, key)
    lines = [f"- TrafficPolicy {name}" for name in sorted(before.keys() - after.keys())]
    for name, policy in after.items():
        if name not in before:
            lines.append(f"+ TrafficPolicy {name} (host {policy.host}, {len(policy.routes)} routes)")
        elif changes := _policy_changes(before[name], policy):
            lines.append(f"~ TrafficPolicy {name}:")
            lines += [f"    {line}" for line in changes]
    return lines
