"""Two real sidecars: the client side originates mTLS for `tls: mesh` backends, the server side is STRICT.

app client ──http──► sidecar A (frontend) ══mTLS══► sidecar B (reviews, STRICT) ──http──► echo app
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from mesh_support import (
    FRONTEND,
    RATINGS,
    REVIEWS,
    Client,
    EchoApp,
    admin,
    http_get,
    load,
    make_mesh,
    now,
    run_sidecar,
    traffic_policy,
)
from prometheus_client.parser import text_string_to_metric_families

from meshlet.mtls.ca import issue_workload
from meshlet.mtls.files import write_identity


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    mesh = make_mesh(tmp_path_factory.mktemp("mesh"))
    mesh.identity("a", FRONTEND)
    mesh.identity("b", REVIEWS)
    return mesh


@pytest.fixture(scope="module")
def app():
    app = EchoApp()
    yield app
    app.close()


@pytest.fixture(scope="module")
def pair(mesh, app, engine):
    b_policy = traffic_policy("self", "self", "127.0.0.1:9", mode="STRICT", allow=(FRONTEND,))
    with run_sidecar(b_policy, "--identity", str(mesh.root / "b"), app_port=app.port) as b:
        target = f"127.0.0.1:{b.inbound[1]}"
        with run_sidecar(to_b(target), "--identity", str(mesh.root / "a")) as a:
            yield a, b, target
            assert "Traceback" not in a.stderr() + b.stderr()


def to_b(target: str, identity: str | None = REVIEWS, tls: str = "mesh", route: str = "") -> str:
    return traffic_policy("reviews", "reviews", target, tls=tls, identity=identity, route=route)


@pytest.fixture
def a_policy(pair):
    a, _, target = pair

    def apply(text: str) -> None:
        status, body = admin(a, "PUT", "/policy", text.encode())
        assert status == 200, body

    yield apply
    apply(to_b(target))


def outbound_results(sidecar) -> dict[str, float]:
    _, text = admin(sidecar, "GET", "/metrics")
    return {
        s.labels["result"]: s.value
        for f in text_string_to_metric_families(text) if f.name == "meshlet_mtls_handshakes"
        for s in f.samples if s.name.endswith("_total") and s.labels["direction"] == "outbound"
    }


def test_outbound_mesh_backend_goes_over_mtls_with_the_callers_identity(pair):
    a, _, _ = pair
    assert http_get(a.outbound, host="reviews") == (200, f"app {FRONTEND}\n")
    assert outbound_results(a).get("ok", 0) >= 1


def resumed(sidecar, direction: str) -> float:
    _, text = admin(sidecar, "GET", "/metrics")
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == "meshlet_mtls_resumed"
               for s in f.samples if s.name.endswith("_total") and s.labels == {"direction": direction})


@pytest.mark.engines("mitmproxy")  # the lean engine keeps mesh connections pooled instead (next test)
def test_reconnecting_to_a_peer_resumes_the_session_and_keeps_the_identity(pair):
    a, b, _ = pair
    before = resumed(a, "outbound"), resumed(b, "inbound")
    for _ in range(3):  # a new client connection each: a new upstream connection, resumed after the first
        assert http_get(a.outbound, host="reviews") == (200, f"app {FRONTEND}\n")
    assert resumed(a, "outbound") >= before[0] + 2
    assert resumed(b, "inbound") >= before[1] + 2


@pytest.mark.engines("lean")
def test_new_client_connections_reuse_the_pooled_mtls_connection(pair):
    a, _, _ = pair
    assert http_get(a.outbound, host="reviews") == (200, f"app {FRONTEND}\n")
    before = outbound_results(a).get("ok", 0)
    for _ in range(3):  # a new client connection each, one mTLS connection to the peer for all
        assert http_get(a.outbound, host="reviews") == (200, f"app {FRONTEND}\n")
    assert outbound_results(a).get("ok", 0) == before


def test_outbound_refuses_a_peer_with_another_identity(pair, a_policy, engine):
    a, _, target = pair
    before = outbound_results(a).get("denied", 0)
    a_policy(to_b(target, identity=RATINGS))
    status, body = http_get(a.outbound, host="reviews")
    assert status == (503 if engine == "lean" else 502)  # lean: Envoy's UF, an upstream connect failure
    assert "app" not in body
    assert outbound_results(a).get("denied", 0) == before + 1


def test_outbound_without_identity_accepts_any_mesh_peer(pair, a_policy):
    a, _, target = pair
    a_policy(to_b(target, identity=None))
    assert http_get(a.outbound, host="reviews") == (200, f"app {FRONTEND}\n")


def test_plain_backend_to_a_strict_sidecar_is_refused(pair, a_policy):
    a, _, target = pair
    a_policy(to_b(target, identity=None, tls="none"))
    status, _ = http_get(a.outbound, host="reviews")
    assert status in (502, 503)


# Routes with a deadline or retries go through meshlet's own upstream client, not mitmproxy's:
# the same mTLS, identity check and metrics must hold there.
DEADLINE = 'timeout: 500ms\n      retries: {attempts: 2, retryOn: [5xx]}'


def test_route_timeout_and_retries_hold_over_mtls(pair, a_policy, app):
    a, _, target = pair
    a_policy(to_b(target, route=DEADLINE))
    assert http_get(a.outbound, host="reviews") == (200, f"app {FRONTEND}\n")  # B saw A's identity
    assert outbound_results(a).get("ok", 0) >= 1  # and the handshake was counted
    started = time.monotonic()
    status, body = http_get(a.outbound, path="/sleep/3", host="reviews")
    assert (status, time.monotonic() - started < 2.5) == (504, True), body
    seen = app.seen["/status/503"]
    status, _ = http_get(a.outbound, path="/status/503", host="reviews")
    assert (status, app.seen["/status/503"] - seen) == (503, 3)  # the first try and two retries


def test_the_upstream_client_refuses_a_peer_with_another_identity(pair, a_policy):
    a, _, target = pair
    before = outbound_results(a).get("denied", 0)
    a_policy(to_b(target, identity=RATINGS, route=DEADLINE))
    status, body = http_get(a.outbound, host="reviews")
    assert status == 503 and "app" not in body and RATINGS in body, body
    assert outbound_results(a).get("denied", 0) == before + 1


def serial(sidecar) -> str:
    status, certs = admin(sidecar, "GET", "/certs")
    assert status == 200
    return certs["serial"]


def test_rotating_both_identities_mid_load_fails_no_request(pair, mesh):
    a, b, _ = pair
    old = serial(a), serial(b)
    established = Client(a.outbound)  # a keep-alive connection, and A's mTLS connection behind it
    assert established.request().body == f"app {FRONTEND}\n"
    sock = established.conn.sock
    stop = threading.Event()
    results = []

    def keep_loading() -> None:
        while not stop.is_set():
            results.extend(load(a.outbound, 40, connections=2))

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(keep_loading)
        try:
            time.sleep(0.5)
            for name, spiffe_id in (("a", FRONTEND), ("b", REVIEWS)):
                write_identity(mesh.root / name, issue_workload(mesh.ca, spiffe_id, now(), 3600), mesh.ca.cert)
            deadline = time.monotonic() + 15
            while serial(a) == old[0] or serial(b) == old[1]:
                assert time.monotonic() < deadline, "rotation not picked up within 15s"
                time.sleep(0.2)
            time.sleep(0.5)  # keep loading on the new identities
        finally:
            stop.set()
            running.result(60)
    failures = [r for r in results if isinstance(r, Exception) or r.status != 200]
    assert len(results) >= 80
    assert failures == []
    assert {r.body for r in results} == {f"app {FRONTEND}\n"}
    # the connection from before the rotation still works, on the same socket
    assert established.request().body == f"app {FRONTEND}\n"
    assert established.conn.sock is sock
    established.close()
