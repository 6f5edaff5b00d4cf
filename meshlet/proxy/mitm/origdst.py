"""SO_ORIGINAL_DST for a mitmproxy client connection.

The sidecar's mitmproxy listeners are regular (outbound: Host-header and HTTP_PROXY requests)
and reverse (inbound) modes, so the socket is found through the connection handler that
mitmproxy's proxyserver holds (internals; the sidecar tests fail loudly if they move).
"""

from __future__ import annotations

import socket

from mitmproxy import connection, ctx

from meshlet.proxy.origdst import original_destination_of


def original_destination(client: connection.Client) -> tuple[str, int] | None:
    """The redirected connection's original address; None when it came to the listener directly."""
    master = getattr(ctx, "master", None)  # absent outside a running proxy (unit tests of the addons)
    proxyserver = master.addons.get("proxyserver") if master else None
    handler = proxyserver.connections.get(client.id) if proxyserver else None
    io = handler.transports.get(client) if handler else None
    sock: socket.socket | None = io.writer.get_extra_info("socket") if io and io.writer else None
    return None if sock is None else original_destination_of(sock)
