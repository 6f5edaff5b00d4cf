"""Where an iptables-redirected connection was going (SO_ORIGINAL_DST).

In a Pod, the init container's rules REDIRECT outbound TCP to :15001 and inbound TCP to :15006;
the kernel remembers each connection's original destination on its socket. mitmproxy's
transparent mode reads it, but the sidecar's listeners are regular (outbound: Host-header and
HTTP_PROXY requests) and reverse (inbound) modes, so this reads it from the client socket that
mitmproxy's connection handler holds (internals; the sidecar tests fail loudly if they move).
"""

from __future__ import annotations

import socket

from mitmproxy import connection, ctx, platform


def original_destination(client: connection.Client) -> tuple[str, int] | None:
    """The redirected connection's original address; None when it came to the listener directly."""
    master = getattr(ctx, "master", None)  # absent outside a running proxy (unit tests of the addons)
    proxyserver = master.addons.get("proxyserver") if master else None
    handler = proxyserver.connections.get(client.id) if proxyserver else None
    io = handler.transports.get(client) if handler else None
    sock: socket.socket | None = io.writer.get_extra_info("socket") if io and io.writer else None
    if sock is None or platform.original_addr is None:
        return None
    try:
        host, port, *_ = platform.original_addr(sock)
    except OSError:  # no NAT record: a direct connection
        return None
    if (host, port) == tuple(sock.getsockname()[:2]):
        return None
    return host, port
