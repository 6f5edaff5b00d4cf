"""Refuse cleartext HTTP/2 clearly instead of with a confusing error or a silent close.

mitmproxy speaks HTTP/2 only over TLS. A prior-knowledge h2c client sends the HTTP/2
preface; it gets an HTTP/2 SETTINGS frame and a GOAWAY with HTTP_1_1_REQUIRED and a reason
its library can show. An `Upgrade: h2c` request is served as plain HTTP/1.1 with the upgrade
headers removed (the client falls back, as RFC 9113 allows).
"""

from __future__ import annotations

import logging

from mitmproxy import http
from mitmproxy.proxy import commands, events, layer

from meshlet.proxy.h2c import GOODBYE, PREFACE

log = logging.getLogger("meshlet.proxy")


class _Refuse(layer.Layer):
    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            yield commands.SendData(self.context.client, GOODBYE)
            yield commands.CloseConnection(self.context.client)


class RefuseH2c:
    """Must come before mitmproxy's NextLayer addon, which steps aside when a layer is set."""

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if nextlayer.layer is None and nextlayer.data_client().startswith(PREFACE[:14]):
            peer = nextlayer.context.client.peername
            log.warning("refused a cleartext HTTP/2 (prior knowledge) client from %s", peer)
            nextlayer.layer = _Refuse(nextlayer.context)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Raw fields: this runs on every request, and Headers.get decodes through a multidict.
        if any(n.lower() == b"upgrade" and v.strip().lower() == b"h2c" for n, v in flow.request.data.headers.fields):
            for name in ("upgrade", "connection", "http2-settings"):
                flow.request.headers.pop(name, None)
