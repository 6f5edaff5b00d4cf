"""TLS the app originates itself is relayed untouched, never intercepted.

An app reaching an HTTPS service through the sidecar as its HTTP proxy (`HTTP_PROXY`,
`HTTPS_PROXY`) opens a CONNECT tunnel and starts TLS inside it. mitmproxy would answer that
ClientHello with a certificate from its own CA, which no app trusts: the call fails. A sidecar
cannot see inside the app's TLS and must not pretend to, so the tunnel becomes a plain byte
relay to the CONNECT target: the app's certificate checks, ALPN (HTTP/2 included) and session
stay end to end. (Istio passes such traffic through at L4 too; policies route what the sidecar
can read: HTTP, and mesh mTLS it originates itself.)
"""

from __future__ import annotations

import logging

from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import layer, layers
from mitmproxy.proxy.mode_specs import RegularMode

log = logging.getLogger("meshlet.proxy")


class PassThroughTls:
    """Must come before mitmproxy's NextLayer addon, which steps aside when a layer is set."""

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        context = nextlayer.context
        if (
            nextlayer.layer is None
            and isinstance(context.client.proxy_mode, RegularMode)
            and context.server.address is not None  # inside a CONNECT tunnel: the target is known
            and starts_like_tls_record(nextlayer.data_client())
        ):
            host, port = context.server.address[:2]
            log.debug("passing the app's own TLS to %s:%d through untouched", host, port)
            nextlayer.layer = layers.TCPLayer(context, ignore=True)
