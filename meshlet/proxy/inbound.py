"""Where an inbound connection goes, and what the app is told about its caller: one decision for
both engines, pure functions of the config and the connection's addresses.

The Pod's own address, never loopback. A redirected connection goes on to its original
destination (SO_ORIGINAL_DST: the Pod IP and the port the caller chose), so a service the app
bound to 127.0.0.1 stays unreachable from the network, as it is without a sidecar. Istio
stopped forwarding inbound to localhost in 1.10 for this reason. The connection to the app comes
from the Pod IP, not 127.0.0.1, so an app that trusts loopback callers trusts no peer, and the
caller's address is in `x-forwarded-for`, set by the sidecar (whatever the caller sent in
x-forwarded-for, forwarded or x-real-ip is dropped first).

A connection whose original destination is one of the sidecar's own ports is refused: the
redirect sends every inbound port through the inbound listener, so without this a peer would
reach the control API (15000) or the outbound listener (15001) through it.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshlet.proxy.config import SidecarConfig
from meshlet.proxy.listen import is_loopback

FORWARDED_FOR = "x-forwarded-for"
# Client-address headers an app may believe; only the sidecar sets one, after dropping all three.
CALLER_ADDRESS_HEADERS: tuple[str, ...] = (FORWARDED_FOR, "forwarded", "x-real-ip")
# meshlet_requests_total labels of inbound requests: to the app, or answered by the sidecar (403).
INBOUND_ROUTE = "inbound"
APP_BACKEND = "app"
REFUSED_BACKEND = "none"


@dataclass(frozen=True, slots=True)
class Refused:
    """An inbound connection to close without forwarding a byte; `reason` is for the log."""

    reason: str


def plain_host(host: str) -> str:
    """`::ffff:192.0.2.1` (IPv4 on a dual-stack socket) as `192.0.2.1`; brackets dropped."""
    host = host.strip("[]")
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def inbound_target(
    config: SidecarConfig, original_dst: tuple[str, int] | None, local_addr: tuple[str, int]
) -> tuple[str, int] | Refused:
    """Where to forward an inbound connection that arrived at `local_addr` (the listener's side
    of the accepted socket) and was redirected from `original_dst` (None: sent to the inbound
    port itself, then it goes to `--app`'s port).

    A direct connection arriving on a non-loopback address goes to that same address with the
    app's port, never to a loopback `--app` host: the caller reaches only what it could reach
    without a sidecar.
    """
    if original_dst is not None:
        host, port = plain_host(original_dst[0]), original_dst[1]
    else:
        local = plain_host(local_addr[0])
        host = local if is_loopback(config.app.host) and not is_loopback(local) else config.app.host
        port = config.app.port
    if port in config.own_ports:
        return Refused(f"its destination port {port} is the sidecar's own")
    return host, port


def forwarded_for(peer: tuple[str, int] | None) -> str:
    """The `x-forwarded-for` value for a caller at `peer` (the accepted socket's peer address)."""
    return plain_host(peer[0]) if peer else "unknown"
