"""Traffic the sidecar cannot read is relayed untouched, never intercepted or refused.

Two ways such traffic reaches the outbound listener:
- An app reaching an HTTPS service with the sidecar as its HTTP proxy (`HTTPS_PROXY`) opens a
  CONNECT tunnel and starts TLS inside it. mitmproxy would answer that ClientHello with a
  certificate from its own CA, which no app trusts, and the call would fail.
- In a Pod, the init container's iptables rules redirect all outbound TCP here: TLS to an
  external API, a database protocol. They arrive with no CONNECT and no Host header; where they
  were going is the socket's SO_ORIGINAL_DST (what mitmproxy's transparent mode reads).
Either way the connection becomes a plain byte relay to its real destination: the app's
certificate checks, ALPN (HTTP/2 included) and sessions stay end to end. Istio passes such
traffic through at L4 too; policies route what the sidecar can read: HTTP, and mesh mTLS it
originates itself. Server-first protocols (the server speaks before the client) are not
detected: a redirected connection must send its first bytes before the relay starts.
"""

from __future__ import annotations

import logging

from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import layer, layers
from mitmproxy.proxy.mode_specs import RegularMode

from meshlet.proxy.mitm.origdst import original_destination

log = logging.getLogger("meshlet.proxy")


def relay(nextlayer: layer.NextLayer, destination: tuple[str, int]) -> None:
    """From here on the connection is a byte relay to `destination`: nothing reads it."""
    nextlayer.context.server.address = destination
    nextlayer.layer = layers.TCPLayer(nextlayer.context, ignore=True)


def looks_like_http(data: bytes) -> bool:
    """An HTTP/1 request starts with its method, an upper-case token (`GET`, `CONNECT`, ...)."""
    return not starts_like_tls_record(data) and data[:1].isupper()


class PassThrough:
    """Must come before mitmproxy's NextLayer addon, which steps aside when a layer is set."""

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        context = nextlayer.context
        if nextlayer.layer is not None or not isinstance(context.client.proxy_mode, RegularMode):
            return
        data = nextlayer.data_client()
        if context.server.address is not None:  # inside a CONNECT tunnel: the target is known
            if starts_like_tls_record(data):
                relay(nextlayer, context.server.address)
            return
        if looks_like_http(data):
            return  # a Host-header or absolute-form request: routed by policy
        destination = original_destination(context.client)
        if destination is None:
            return  # sent to the listener itself: mitmproxy answers that it is not HTTP
        log.debug("relaying a non-HTTP connection to %s:%d untouched", *destination)
        relay(nextlayer, destination)
