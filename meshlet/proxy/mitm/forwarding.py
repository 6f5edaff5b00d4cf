"""What a proxy changes in what it forwards, on the mitmproxy engine (the lean engine does the
same as it builds each head, meshlet.proxy.lean.exchange).

- Hop-by-hop fields stay on their hop (RFC 9110 §7.6.1). mitmproxy forwards what it parsed,
  Keep-Alive and Connection-listed fields included: an interception tool shows the wire as it
  was. Two stay because mitmproxy itself frames and keeps connections by them:
  Transfer-Encoding, and in Connection the tokens `close`, `keep-alive` and `upgrade` (a
  WebSocket upgrade keeps its Upgrade field too).
- An absolute-form request (HTTP_PROXY clients) is routed and forwarded with the Host its
  target names, not the client's Host field (RFC 9112 §3.2.2: the two may disagree).
- Every request carries an x-request-id: the caller's, or a new random UUID.
- An HTTP/1.0 client cannot read chunked: its response loses the coding, and the end of the
  body is the end of the connection (RFC 9112 §6.1).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from mitmproxy import http

from meshlet.proxy.http1rules import FRAMING  # never dropped: the body would reach the backend unframed

Fields = Sequence[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset((b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization", b"te",
                        b"trailer", b"upgrade"))
OWN_TOKENS = (b"close", b"keep-alive", b"upgrade")  # what mitmproxy reads in Connection


def without_hop_by_hop(fields: Fields) -> tuple[tuple[bytes, bytes], ...] | None:
    """`fields` without hop-by-hop ones, or None when nothing needs to go (the usual case: no copy)."""
    listed: set[bytes] = set()
    for name, value in fields:
        if name.lower() == b"connection":
            listed.update(token.strip().lower() for token in value.split(b","))
    drop = HOP_BY_HOP | (listed - FRAMING)
    if b"upgrade" in listed:
        drop = drop - {b"upgrade"}
    own = b", ".join(token for token in OWN_TOKENS if token in listed)
    kept: list[tuple[bytes, bytes]] = []
    changed = False
    for name, value in fields:
        lname = name.lower()
        if lname == b"connection":
            changed = changed or value != own
            if own:
                kept.append((name, own))
        elif lname in drop:
            changed = True
        else:
            kept.append((name, value))
    return tuple(kept) if changed else None


class Forwarding:
    """Before the routing addon: routes see the Host the request is forwarded with."""

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error:
            return
        request = flow.request
        headers = request.data.headers
        if (kept := without_hop_by_hop(headers.fields)) is not None:
            headers.fields = kept
        if request.data.authority and not request.is_http2 and request.method != "CONNECT":
            request.host_header = request.authority
        if b"x-request-id" not in (name.lower() for name, _ in headers.fields):
            headers.fields += ((b"x-request-id", str(uuid.uuid4()).encode()),)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or response.status_code == 101:
            return
        headers = response.data.headers
        if (kept := without_hop_by_hop(headers.fields)) is not None:
            headers.fields = kept
        if flow.request.http_version == "HTTP/1.0" and "transfer-encoding" in headers:
            del headers["transfer-encoding"]
