"""Telemetry across a mesh hop, beyond tests/integration/telemetry/test_telemetry_mesh.py: a route
with a deadline (the mitmproxy engine's own upstream client) learns its destination from peer
metadata too, and a peer that shows no certificate at all is a refusal counted as a 403.

client ──http──► sidecar A (frontend) ══mTLS══► sidecar B (reviews, STRICT, allows A) ──http──► raw app
"""

from __future__ import annotations

import http.client
import time

import pytest
from mesh_support import FRONTEND, RATINGS, REFUSED, REVIEWS, admin, make_mesh, run_sidecar, tls_context, traffic_policy
from prometheus_client.parser import text_string_to_metric_families
from raw_backend import RawBackend
from sidecar_support import Backends

pytestmark = pytest.mark.timeout(90)

HEADER = "x-meshlet-peer-metadata"
SERVICE = "reviews.default.svc.cluster.local"
TIMED = "timed.default"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    mesh = make_mesh(tmp_path_factory.mktemp("mesh"))
    mesh.identity("a", FRONTEND)
    mesh.identity("b", REVIEWS)
    mesh.identity("ratings", RATINGS)
    mesh.identity("stranger", FRONTEND, ca=mesh.other_ca)
    (mesh.root / "b-labels").write_text('app.kubernetes.io/name="reviews"\napp.kubernetes.io/version="v1"\n')
    return mesh


@pytest.fixture(scope="module")
def app():
    loop = Backends()
    backend = RawBackend()
    backend.start(loop, "app")
    yield backend
    loop.close()


@pytest.fixture(scope="module")
def pair(mesh, app, engine):
    b_policy = traffic_policy("self", "self", "127.0.0.1:9", mode="STRICT", allow=(FRONTEND,))
    istio = ("--metrics-compat", "istio", "--workload-namespace", "default")
    with run_sidecar(b_policy, "--identity", str(mesh.root / "b"), *istio, "--workload", "reviews-v1",
                     "--workload-labels", str(mesh.root / "b-labels"), app_port=app.port) as b:
        target = f"127.0.0.1:{b.inbound[1]}"
        a_policy = traffic_policy("reviews", SERVICE, target, tls="mesh", identity=REVIEWS) + "---\n" + traffic_policy(
            "timed", TIMED, target, tls="mesh", identity=REVIEWS, route="timeout: 5s")  # a deadline: buffered
        with run_sidecar(a_policy, "--identity", str(mesh.root / "a"), *istio, "--workload", "frontend") as a:
            yield a, b
            assert "Traceback" not in a.stderr() + b.stderr()


def series(sidecar, name: str, **labels: str) -> list:
    _, text = admin(sidecar, "GET", "/metrics")
    return [s for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name and labels.items() <= s.labels.items()]


def counted(sidecar, name: str, **labels: str) -> float:
    return sum(s.value for s in series(sidecar, name, **labels))


def eventually(check, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert check()


def workload(sample, side: str) -> tuple[str, ...]:
    return tuple(sample.labels[f"{side}_{name}"]
                 for name in ("workload", "workload_namespace", "principal", "app", "version"))


def test_a_route_with_a_deadline_learns_the_destination_too(pair):
    a, b = pair
    conn = http.client.HTTPConnection(*a.outbound, timeout=10)
    conn.request("GET", "/", headers={"Host": TIMED})
    response = conn.getresponse()
    response.read()
    conn.close()
    assert response.status == 200 and response.getheader(HEADER) is None
    source = series(a, "istio_requests_total", reporter="source", destination_service=TIMED)
    assert len(source) == 1 and workload(source[0], "destination") == ("reviews-v1", "default", REVIEWS, "reviews", "v1")
    destination = series(b, "istio_requests_total", reporter="destination", destination_service=TIMED)
    assert len(destination) == 1 and destination[0].labels["source_workload"] == "frontend"


def test_a_peer_without_a_certificate_is_refused_and_counted_as_403(pair, mesh):
    _, b = pair
    refused = {"direction": "inbound", "backend": "none", "code": "403", "response_flags": "UAEX"}
    before = counted(b, "meshlet_requests_total", **refused)
    with pytest.raises(REFUSED):
        conn = http.client.HTTPSConnection(*b.inbound, context=tls_context(None, mesh.root / "b"), timeout=10)
        conn.request("GET", "/", headers={"Host": "app"})
        conn.getresponse().read()
    eventually(lambda: counted(b, "meshlet_requests_total", **refused) == before + 1)
    assert counted(b, "istio_requests_total", reporter="destination", response_code="403", response_flags="UAEX",
                   source_principal="unknown", connection_security_policy="none") >= 1
