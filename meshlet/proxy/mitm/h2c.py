"""Cleartext HTTP/2 on the mitmproxy engine, which cannot read it: relayed where it was going,
refused clearly where it was going nowhere else.

mitmproxy speaks HTTP/2 only over TLS. A prior-knowledge h2c client (plaintext gRPC) whose
connection an iptables REDIRECT sent to the outbound listener, or that opened a CONNECT
tunnel, has a destination of its own: its bytes are relayed there untouched at L4, with one log
line saying policy does not apply (nothing breaks; `--engine lean` routes h2c per stream). One
that connected to the listener itself, or to the inbound listener (relaying there would step
around inbound mTLS), gets an HTTP/2 SETTINGS frame and a GOAWAY with HTTP_1_1_REQUIRED and a
reason its library can show. An `Upgrade: h2c` request is served as plain HTTP/1.1 with the
upgrade headers removed (the client falls back, as RFC 9113 allows).
"""

from __future__ import annotations

import logging

from mitmproxy import http
from mitmproxy.proxy import commands, context, events, layer
from mitmproxy.proxy.mode_specs import RegularMode

from meshlet.proxy.h2c import GOODBYE, PREFACE
from meshlet.proxy.mitm.origdst import original_destination
from meshlet.proxy.mitm.tunnel import relay
from meshlet.telemetry.proxy import ProxyMetrics

log = logging.getLogger("meshlet.proxy")


class _Refuse(layer.Layer):
    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            yield commands.SendData(self.context.client, GOODBYE)
            yield commands.CloseConnection(self.context.client)


def own_destination(ctx: context.Context) -> tuple[str, int] | None:
    """Where an outbound connection was going before it reached us: its CONNECT target or,
    behind a redirect, SO_ORIGINAL_DST. None on the inbound listener and for direct clients."""
    if not isinstance(ctx.client.proxy_mode, RegularMode):
        return None
    return ctx.server.address or original_destination(ctx.client)


class H2c:
    """Must come before mitmproxy's NextLayer addon, which steps aside when a layer is set."""

    def __init__(self, metrics: ProxyMetrics | None = None) -> None:
        self.metrics = metrics

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if nextlayer.layer is not None or not nextlayer.data_client().startswith(PREFACE[:14]):
            return
        peer = nextlayer.context.client.peername
        destination = own_destination(nextlayer.context)
        if destination is None:
            log.warning("refused a cleartext HTTP/2 (prior knowledge) client from %s", peer)
            nextlayer.layer = _Refuse(nextlayer.context)
            return
        log.info("relaying cleartext HTTP/2 (h2c) from %s to %s:%d at L4: policy does not apply to it "
                 "(the mitmproxy engine reads HTTP/2 over TLS only; --engine lean routes h2c)", peer, *destination)
        relay(nextlayer, destination, self.metrics)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Raw fields: this runs on every request, and Headers.get decodes through a multidict.
        if any(n.lower() == b"upgrade" and v.strip().lower() == b"h2c" for n, v in flow.request.data.headers.fields):
            for name in ("upgrade", "connection", "http2-settings"):
                flow.request.headers.pop(name, None)
