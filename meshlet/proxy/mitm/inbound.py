"""The inbound addon: each connection of the reverse-mode listener goes to the Pod's own address.

The decision is meshlet.proxy.inbound's (shared with the lean engine); this addon asks it once
per connection, closes a refused connection before any byte is read (before TLS, too), and
sets each request's destination and `x-forwarded-for`. Must come before the mTLS addon, whose
own refusals are per mode, and before NextLayer, which steps aside when a layer is set.
"""

from __future__ import annotations

import logging

from mitmproxy import connection, http
from mitmproxy.proxy import commands, layer
from mitmproxy.proxy.mode_specs import ReverseMode

from meshlet.proxy.config import SidecarConfig
from meshlet.proxy.inbound import CALLER_ADDRESS_HEADERS, FORWARDED_FOR, Refused, forwarded_for, inbound_target
from meshlet.proxy.mitm.origdst import original_destination

log = logging.getLogger("meshlet.proxy")


class Refuse(layer.Layer):
    """Closes the client connection without a byte (a refused destination, plaintext on STRICT)."""

    closed = False

    def _handle_event(self, event):
        if not self.closed:
            self.closed = True
            yield commands.CloseConnection(self.context.client)


def is_inbound(client: connection.Client) -> bool:
    return isinstance(client.proxy_mode, ReverseMode)  # the sidecar's one reverse listener: inbound


class Inbound:
    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self.targets: dict[str, tuple[str, int] | Refused] = {}  # client id → where its requests go

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        client = nextlayer.context.client
        if nextlayer.layer is not None or not is_inbound(client):
            return
        target = self._target(client)
        if isinstance(target, Refused):
            log.info("inbound %s refused: %s", client.peername, target.reason)
            nextlayer.layer = Refuse(nextlayer.context)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or not is_inbound(flow.client_conn):
            return
        target = self._target(flow.client_conn)
        if isinstance(target, Refused):  # not reached: the connection was closed at next_layer
            flow.kill()
            return
        request = flow.request
        request.data.host, request.data.port = target
        for name in CALLER_ADDRESS_HEADERS:
            request.headers.pop(name, None)
        request.headers[FORWARDED_FOR] = forwarded_for(flow.client_conn.peername)

    def client_disconnected(self, client: connection.Client) -> None:
        self.targets.pop(client.id, None)

    def _target(self, client: connection.Client) -> tuple[str, int] | Refused:
        target = self.targets.get(client.id)
        if target is None:
            try:
                local = client.sockname or (self.config.inbound.host, self.config.inbound.port)
                target = inbound_target(self.config, original_destination(client), local)
            except Exception as e:  # fail closed: an error here must not fall back to mitmproxy's reverse target
                target = Refused(f"cannot tell where it was going: {type(e).__name__}: {e}")
            self.targets[client.id] = target
        return target
