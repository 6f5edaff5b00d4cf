"""Istio's labels on both reporters, from a real mesh hop: two `meshlet run` over mTLS exchange
workload metadata, each sidecar labels the other side of the hop with it, and neither app can
forge it. Inbound refusals (mTLS mode, handshake, allow list) are counted as 403 UAEX.

app client ──► A (frontend) ══mTLS, metadata══► B (reviews, STRICT, allows frontend) ──► app
"""

from __future__ import annotations

import http.client

import pytest
from mesh_support import RATINGS, REFUSED, http_get, https_get, tls_context
from sidecar_support import Backends, admin
from telemetry_support import (
    FORGED,
    FRONTEND_SIDE,
    METADATA,
    REVIEWS_SIDE,
    inbound_policy,
    mesh_pair,
    samples,
    side,
    start_metadata_app,
    total,
    wait_total,
)

pytestmark = pytest.mark.timeout(120)
ISTIO = "istio_requests_total"


@pytest.fixture(scope="module")
def pair(identities, engine):
    servers = Backends()
    try:
        with mesh_pair(identities.root, start_metadata_app(servers)) as pair:
            yield pair
    finally:
        servers.close()


def call(a, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection(*a.outbound, timeout=10)
    conn.request("GET", "/", headers={"Host": "reviews", **(headers or {})})
    response = conn.getresponse()
    response.body = response.read()  # type: ignore[attr-defined]
    conn.close()
    return response


def test_each_reporter_labels_the_other_side_from_the_mesh_hop(pair):
    a, b = pair
    for _ in range(3):
        assert call(a).status == 200
    for sidecar, reporter, policy in ((a, "source", "unknown"), (b, "destination", "mutual_tls")):
        [seen] = samples(sidecar, ISTIO, reporter=reporter, response_code="200")
        assert seen.value == 3
        assert seen.labels == {
            "reporter": reporter, **side("source", FRONTEND_SIDE), **side("destination", REVIEWS_SIDE),
            "destination_service": "reviews", "destination_service_name": "reviews",
            "destination_service_namespace": "default", "request_protocol": "http", "response_code": "200",
            "grpc_response_status": "", "response_flags": "-", "connection_security_policy": policy,
        }


def test_apps_cannot_forge_peer_metadata(pair):
    a, b = pair
    before_a = total(a, ISTIO, reporter="source", destination_workload="reviews")
    before_b = total(b, ISTIO, reporter="destination", source_workload="frontend")
    response = call(a, {METADATA: FORGED})
    assert response.status == 200
    # B's app got B's caller's metadata from nobody: B read and dropped it; A dropped the app's
    assert response.body == b"-\n"  # type: ignore[attr-defined]
    # B's app forged metadata on its answer: B dropped it (and sent its own), A dropped B's
    assert response.getheader(METADATA) is None
    assert total(a, ISTIO, reporter="source", destination_workload="reviews") == before_a + 1
    assert total(b, ISTIO, reporter="destination", source_workload="frontend") == before_b + 1
    assert total(a, ISTIO, destination_workload="evil") + total(b, ISTIO, source_workload="evil") == 0


def test_plaintext_callers_metadata_is_not_believed(pair):
    _, b = pair
    status, body = admin(b, "PUT", "/policy", inbound_policy("PERMISSIVE").encode())
    assert status == 200, body
    try:
        assert http_get(b.inbound, {METADATA: FORGED}) == (200, "-\n")
    finally:
        status, body = admin(b, "PUT", "/policy", inbound_policy().encode())
        assert status == 200, body
    plain = samples(b, ISTIO, reporter="destination", connection_security_policy="none", response_code="200")
    assert [(s.labels["source_workload"], s.labels["source_principal"], s.labels["destination_service"])
            for s in plain] == [("unknown", "unknown", "unknown")]


def test_refusals_are_403_uaex_on_both_metric_families(pair, identities):
    _, b = pair
    refused = {"direction": "inbound", "route": "inbound", "backend": "none", "code": "403",
               "response_flags": "UAEX"}
    before = total(b, "meshlet_requests_total", **refused)
    before_istio = total(b, ISTIO, reporter="destination", response_code="403", response_flags="UAEX")
    # plaintext on a STRICT port: refused before any byte, as a connection
    conn = http.client.HTTPConnection(*b.inbound, timeout=10)
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        conn.request("GET", "/", headers={"Host": "app"})
        conn.getresponse()
    conn.close()
    # a certificate from another CA: refused in the handshake
    with pytest.raises(REFUSED):
        https_get(b.inbound, tls_context(identities.root / "impostor", identities.root / "b"))
    # a mesh identity the allow list does not name: a 403 answer
    status, _ = https_get(b.inbound, tls_context(identities.root / "ratings", identities.root / "b"))
    assert status == 403
    assert wait_total(b, "meshlet_requests_total", before + 3, **refused) == before + 3
    assert total(b, ISTIO, reporter="destination", response_code="403", response_flags="UAEX") == before_istio + 3
    denied = samples(b, ISTIO, reporter="destination", response_code="403", source_principal=RATINGS)
    assert [(s.value, s.labels["connection_security_policy"]) for s in denied] == [(1, "mutual_tls")]


def test_the_allowed_caller_still_gets_through(pair, identities):
    _, b = pair
    status, body = https_get(b.inbound, tls_context(identities.root / "frontend", identities.root / "b"))
    assert (status, body) == (200, "-\n")  # a caller without metadata: its identity still admits it
