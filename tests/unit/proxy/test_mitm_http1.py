"""The mitmproxy engine's HTTP/1.1 addons (strict parsing, forwarding), on test flows: no sockets.

The same behaviour end to end, on both engines: tests/integration/sidecar/test_http1_*.py.
"""

from __future__ import annotations

import pytest
from mitmproxy.test import tflow
from prometheus_client import CollectorRegistry

from meshlet.proxy.mitm.forwarding import Forwarding, without_hop_by_hop
from meshlet.proxy.mitm.strict import Strict, refusal
from meshlet.telemetry.proxy import ProxyMetrics


def flow(*fields: tuple[bytes, bytes], path: bytes = b"/", version: str = "HTTP/1.1"):
    f = tflow.tflow(resp=True)
    f.request.data.headers.fields = ((b"host", b"reviews"), *fields)
    f.request.data.path = path
    f.request.http_version = version
    return f


class TestStrict:
    @pytest.mark.parametrize("fields,status", [
        (((b"x-folded", b"one\r\n two"),), 400),
        (((b"x-nul", b"o\x00ne"),), 400),
        (((b"x-cr", b"o\rne"),), 400),
        (((b"host", b"other"),), 400),
        (((b"transfer-encoding", b"gzip, chunked"),), 501),
        (tuple((b"x-%d" % i, b"1") for i in range(100)), 431),
        (((b"x-big", b"a" * 65_536),), 431),
    ])
    def test_refused(self, fields, status):
        assert refusal(flow(*fields).request)[0] == status

    def test_target_over_16_kib(self):
        assert refusal(flow(path=b"/" + b"a" * 16_384).request)[0] == 414

    def test_an_ordinary_request_passes(self):
        assert refusal(flow((b"transfer-encoding", b"Chunked"), (b"x-a", b"b\tc"), path=b"/" + b"a" * 16_000).request) is None

    def test_the_hook_answers_closes_and_counts(self):
        registry = CollectorRegistry()
        f = flow((b"x-nul", b"\x00"))
        f.response = None
        Strict(ProxyMetrics(registry)).requestheaders(f)
        assert (f.response.status_code, f.response.headers["connection"]) == (400, "close")
        assert registry.get_sample_value("meshlet_requests_total", {
            "direction": "outbound", "route": "invalid", "backend": "none", "code": "400", "grpc_status": "",
            "response_flags": "DPE"}) == 1


class TestForwarding:
    def test_nothing_to_drop_makes_no_copy(self):
        assert without_hop_by_hop(((b"host", b"a"), (b"connection", b"keep-alive"))) is None

    def test_hop_by_hop_and_listed_fields_go_own_tokens_stay(self):
        fields = ((b"Connection", b"Keep-Alive, X-Hop"), (b"X-Hop", b"1"), (b"Keep-Alive", b"timeout=5"), (b"TE", b"trailers"),
                  (b"Trailer", b"x"), (b"Proxy-Connection", b"keep-alive"), (b"Upgrade", b"websocket"), (b"X-E2e", b"1"))
        assert without_hop_by_hop(fields) == ((b"Connection", b"keep-alive"), (b"X-E2e", b"1"))

    def test_framing_fields_stay_even_when_listed(self):
        fields = ((b"connection", b"content-length, transfer-encoding, host"), (b"host", b"a"),
                  (b"content-length", b"3"))
        assert without_hop_by_hop(fields) == ((b"host", b"a"), (b"content-length", b"3"))

    def test_an_upgrade_keeps_its_upgrade(self):
        fields = ((b"connection", b"Upgrade"), (b"upgrade", b"websocket"))
        assert without_hop_by_hop(fields) == ((b"connection", b"upgrade"), (b"upgrade", b"websocket"))

    def test_request_gets_an_id_and_the_target_host(self):
        f = flow((b"x-hop", b"1"), (b"connection", b"x-hop"))
        f.response = None
        f.request.data.authority = b"reviews:80"
        f.request.host_header = "elsewhere"
        Forwarding().requestheaders(f)
        assert f.request.headers["host"] == "reviews:80"
        assert "x-hop" not in f.request.headers and "connection" not in f.request.headers
        assert len(f.request.headers["x-request-id"]) == 36

    def test_the_callers_request_id_is_kept(self):
        f = flow((b"X-Request-Id", b"mine"))
        f.response = None
        Forwarding().requestheaders(f)
        assert f.request.headers.get_all("x-request-id") == ["mine"]

    def test_an_http10_client_gets_no_chunked(self):
        f = flow(version="HTTP/1.0")
        f.response.headers["transfer-encoding"] = "chunked"
        Forwarding().responseheaders(f)
        assert "transfer-encoding" not in f.response.headers
