"""Traffic the sidecar cannot read is relayed untouched, never intercepted or refused.

Two ways such traffic reaches the outbound listener:
- An app reaching an HTTPS service with the sidecar as its HTTP proxy (`HTTPS_PROXY`) opens a
  CONNECT tunnel and starts TLS inside it. mitmproxy would answer that ClientHello with a
  certificate from its own CA, which no app trusts, and the call would fail. Any other protocol
  in a tunnel (not HTTP, which is routed by policy) is relayed the same way.
- In a Pod, the init container's iptables rules redirect all outbound TCP here: TLS to an
  external API, a database protocol. They arrive with no CONNECT and no Host header; where they
  were going is the socket's SO_ORIGINAL_DST (what mitmproxy's transparent mode reads).
Either way the connection becomes a plain byte relay to its real destination: the app's
certificate checks, ALPN (HTTP/2 included) and sessions stay end to end. Istio passes such
traffic through at L4 too; policies route what the sidecar can read: HTTP, and mesh mTLS it
originates itself. Server-first protocols (the server speaks before the client) are not
detected: a redirected connection must send its first bytes before the relay starts.

A relayed connection is counted once, at its close, with the bytes it carried each way
(Istio's istio_tcp_* series, meshlet.telemetry.istio).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import events, layer, layers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.mode_specs import RegularMode
from mitmproxy.proxy.utils import expect

from meshlet.proxy.mitm.origdst import original_destination
from meshlet.telemetry.outcome import NO_FLAGS, UNKNOWN, UPSTREAM_CONNECT_FAILURE
from meshlet.telemetry.proxy import ProxyMetrics

log = logging.getLogger("meshlet.proxy")


Closed = Callable[[int, int, str], None]  # (bytes sent to the client, bytes received from it, response flags)


class Relay(layers.TCPLayer):
    """mitmproxy's TCP layer without flows or hooks (`ignore`), counting the bytes each way and
    telling `closed` once, when both sides are done (or the destination refused to connect)."""

    def __init__(self, ctx: Context, closed: Closed) -> None:
        super().__init__(ctx, ignore=True)
        self.closed: Closed | None = closed
        self.sent = self.received = 0

    @expect(events.Start)
    def start(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield from super().start(event)
        if self._handle_event == self.done:
            self._report(UPSTREAM_CONNECT_FAILURE)

    _handle_event = start

    def relay_messages(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.DataReceived):
            if event.connection == self.context.client:
                self.received += len(event.data)
            else:
                self.sent += len(event.data)
        yield from super().relay_messages(event)
        if self._handle_event == self.done:
            self._report(NO_FLAGS)

    def _report(self, flags: str) -> None:
        if self.closed is not None:
            self.closed(self.sent, self.received, flags)
            self.closed = None


def relay(nextlayer: layer.NextLayer, destination: tuple[str, int], metrics: ProxyMetrics | None) -> None:
    """From here on the connection is a byte relay to `destination`: nothing reads it."""
    nextlayer.context.server.address = destination

    def closed(sent: int, received: int, flags: str) -> None:  # no policy governs it: no service to name
        if metrics is not None:
            metrics.tcp("outbound", UNKNOWN, None, False, sent, received, flags)

    nextlayer.layer = Relay(nextlayer.context, closed)


def looks_like_http(data: bytes) -> bool:
    """An HTTP/1 request starts with its method, an upper-case token (`GET`, `CONNECT`, ...)."""
    return not starts_like_tls_record(data) and data[:1].isupper()


class PassThrough:
    """Must come before mitmproxy's NextLayer addon, which steps aside when a layer is set."""

    def __init__(self, metrics: ProxyMetrics | None = None) -> None:
        self.metrics = metrics

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        context = nextlayer.context
        if nextlayer.layer is not None or not isinstance(context.client.proxy_mode, RegularMode):
            return
        data = nextlayer.data_client()
        if context.server.address is not None:  # inside a CONNECT tunnel: the target is known
            if not looks_like_http(data):  # TLS, or another protocol: HTTP inside is routed by policy
                relay(nextlayer, context.server.address, self.metrics)
            return
        if looks_like_http(data):
            return  # a Host-header or absolute-form request: routed by policy
        destination = original_destination(context.client)
        if destination is None:
            return  # sent to the listener itself: mitmproxy answers that it is not HTTP
        log.debug("relaying a non-HTTP connection to %s:%d untouched", *destination)
        relay(nextlayer, destination, self.metrics)
