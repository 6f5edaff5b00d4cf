"""Which request authorities a policy governs.

A policy names a host the way the application dials it. Inside Kubernetes the same Service is
reached as `reviews`, `reviews.default`, `reviews.default.svc` or the fully qualified name, so
a short host claims all of those at compile time; the request path then needs one dict get.
"""

from __future__ import annotations

from meshlet.policy.model import TrafficPolicy

CLUSTER_DOMAIN = "cluster.local"


def host_key(authority: str) -> str:
    """`Reviews:9080` → `reviews`, `[::1]:80` → `::1`: the form `governed_names` produces.

    A bare IPv6 literal without brackets (several colons) has no port to strip and is kept.
    """
    host = authority.lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    colon = host.find(":")
    if colon >= 0 and host.find(":", colon + 1) < 0:
        return host[:colon]
    return host


def explicit_names(policy: TrafficPolicy) -> tuple[str, ...]:
    """The host as written, plus its absolute (trailing-dot) form."""
    host = policy.host.lower().rstrip(".")
    return host, host + "."


def derived_names(policy: TrafficPolicy, cluster_domain: str = CLUSTER_DOMAIN) -> tuple[str, ...]:
    """The Kubernetes names of a short host; a host with a dot (or an IP) names only itself."""
    host = policy.host.lower().rstrip(".")
    if "." in host or ":" in host:
        return ()
    base = f"{host}.{policy.metadata.namespace.lower()}"
    names = (base, f"{base}.svc", f"{base}.svc.{cluster_domain}")
    return names + tuple(name + "." for name in names)
