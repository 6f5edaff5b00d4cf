"""Strict HTTP/1.1 on the mitmproxy engine: what mitmproxy's own parser lets through, refused.

mitmproxy already answers 400 for what RFC 9112 §6.3 names as smuggling risks (Content-Length
with Transfer-Encoding, differing or malformed Content-Length, chunked not last, whitespace
before the colon). It joins obs-fold lines into the value, keeps NUL and bare CR in values,
bounds neither the request target nor the header section, and passes two Host fields and
`gzip, chunked` on. This
addon refuses those before routing, with the lean engine's limits and statuses
(meshlet.proxy.lean.http1), so both engines pass one conformance suite.
"""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ReverseMode

from meshlet.proxy.lean.http1 import MAX_HEAD_BYTES, MAX_HEADERS, MAX_TARGET_BYTES
from meshlet.telemetry.proxy import ProxyMetrics

_BAD_IN_VALUE = (b"\r", b"\n", b"\x00")  # RFC 9110 §5.5; an obs-fold arrives here as CR LF SP


def refusal(request: http.Request) -> tuple[int, str] | None:
    """(status, reason) when the request must not be forwarded, else None."""
    if len(request.data.authority) + len(request.data.path) > MAX_TARGET_BYTES:
        return 414, f"request target longer than {MAX_TARGET_BYTES} bytes"
    fields = request.data.headers.fields
    if len(fields) > MAX_HEADERS or sum(len(n) + len(v) + 4 for n, v in fields) > MAX_HEAD_BYTES:
        return 431, f"request header section over {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} fields"
    hosts = 0
    for name, value in fields:
        if any(bad in value for bad in _BAD_IN_VALUE):
            return 400, f"malformed request: obs-fold, CR, LF or NUL in the value of {name.decode('latin-1')}"
        lname = name.lower()
        if lname == b"transfer-encoding" and value.strip().lower() != b"chunked":
            return 501, f"transfer coding {value.decode('latin-1')!r} is not supported; send chunked or Content-Length"
        hosts += lname == b"host"
    if hosts > 1:  # RFC 9112 §3.2: the sidecar would route by one, the backend might believe the other
        return 400, "malformed request: more than one Host field"
    return None


class Strict:
    """Runs first among the request hooks: a refused request reaches no other addon."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self.metrics = metrics

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or flow.request.is_http2:
            return
        refused = refusal(flow.request)
        if refused is None:
            return
        status, reason = refused
        flow.response = http.Response.make(status, f"meshlet: {reason}\n".encode(), {
            "content-type": "text/plain; charset=utf-8", "x-meshlet": "local", "connection": "close"})
        direction = "inbound" if isinstance(flow.client_conn.proxy_mode, ReverseMode) else "outbound"
        self.metrics.invalid(direction, status)
