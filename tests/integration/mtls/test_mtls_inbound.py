"""Inbound mTLS on a real `meshlet run`: raw `ssl` clients against STRICT, PERMISSIVE and DISABLE.

One sidecar for the module; the mode changes by PUT /policy, as an operator would change it.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl

import pytest
from mesh_support import (
    FRONTEND,
    HEADER,
    REFUSED,
    REVIEWS,
    EchoApp,
    admin,
    http_get,
    https_get,
    make_mesh,
    now,
    plaintext_answer,
    run_sidecar,
    tls_context,
    traffic_policy,
)
from prometheus_client.parser import text_string_to_metric_families

from meshlet.mtls.files import read_identity


def strict(allow=(FRONTEND,)) -> str:
    return traffic_policy("self", "self", "127.0.0.1:9", mode="STRICT", allow=allow)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    mesh = make_mesh(tmp_path_factory.mktemp("mesh"))
    mesh.identity("server", REVIEWS)
    mesh.identity("frontend", FRONTEND)
    mesh.identity("reviews", REVIEWS)
    mesh.identity("impostor", FRONTEND, ca=mesh.other_ca)
    mesh.identity("expired", FRONTEND, issued_at=now() - dt.timedelta(hours=3), ttl=3600)
    return mesh


@pytest.fixture(scope="module")
def sidecar(mesh, engine):
    app = EchoApp()
    try:
        with run_sidecar(strict(), "--identity", str(mesh.root / "server"), app_port=app.port) as sidecar:
            yield sidecar
            assert "Traceback" not in sidecar.stderr()
    finally:
        app.close()


@pytest.fixture
def mode(sidecar):
    """Set the inbound mode for one test; STRICT (allow: frontend) again afterwards."""

    def apply(text: str) -> None:
        status, body = admin(sidecar, "PUT", "/policy", text.encode())
        assert status == 200, body

    yield apply
    apply(strict())


def client(mesh, name: str | None) -> ssl.SSLContext:
    return tls_context(mesh.root / name if name else None, mesh.root / "server")


def handshakes(sidecar) -> dict[str, float]:
    status, text = admin(sidecar, "GET", "/metrics")
    assert status == 200
    return {
        sample.labels["result"]: sample.value
        for family in text_string_to_metric_families(text) if family.name == "meshlet_mtls_handshakes"
        for sample in family.samples if sample.name.endswith("_total") and sample.labels["direction"] == "inbound"
    }


def test_strict_accepts_the_allowed_identity_and_tells_the_app(sidecar, mesh):
    status, body = https_get(sidecar.inbound, client(mesh, "frontend"))
    assert (status, body) == (200, f"app {FRONTEND}\n")


def test_strict_server_presents_its_spiffe_identity(sidecar, mesh):
    ctx = client(mesh, "frontend")
    with socket.create_connection(sidecar.inbound, timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        san = tls.getpeercert()["subjectAltName"]
    assert san == (("URI", REVIEWS),)


@pytest.mark.engines("mitmproxy")  # the lean engine speaks HTTP/1.1 only (README: engine differences)
def test_http2_is_negotiated_over_mtls(sidecar, mesh):
    ctx = client(mesh, "frontend")
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(sidecar.inbound, timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        assert tls.selected_alpn_protocol() == "h2"


@pytest.mark.parametrize("who", [None, "impostor", "expired"], ids=["no-cert", "other-ca", "expired"])
def test_strict_refuses_at_the_handshake(sidecar, mesh, who):
    with pytest.raises(REFUSED):
        https_get(sidecar.inbound, client(mesh, who))


def test_strict_refuses_plaintext_without_a_byte(sidecar):
    assert plaintext_answer(sidecar.inbound) == b""


def test_strict_answers_403_to_a_mesh_identity_not_allowed(sidecar, mesh):
    status, body = https_get(sidecar.inbound, client(mesh, "reviews"))
    assert status == 403
    assert REVIEWS in body and "not allowed" in body


def test_empty_allow_admits_any_mesh_identity(sidecar, mesh, mode):
    mode(strict(allow=()))
    assert https_get(sidecar.inbound, client(mesh, "reviews")) == (200, f"app {REVIEWS}\n")
    with pytest.raises(REFUSED):
        https_get(sidecar.inbound, client(mesh, "impostor"))


def test_identity_header_cannot_be_spoofed(sidecar, mesh, mode):
    forged = {"X-Meshlet-Peer-Identity": "spiffe://cluster.local/ns/default/sa/admin"}
    assert https_get(sidecar.inbound, client(mesh, "frontend"), forged) == (200, f"app {FRONTEND}\n")
    mode(traffic_policy("self", "self", "127.0.0.1:9", mode="PERMISSIVE"))
    assert http_get(sidecar.inbound, forged) == (200, "app -\n")


def test_permissive_serves_mtls_and_plaintext_on_one_port(sidecar, mesh, mode):
    mode(traffic_policy("self", "self", "127.0.0.1:9", mode="PERMISSIVE"))
    assert http_get(sidecar.inbound) == (200, "app -\n")
    assert https_get(sidecar.inbound, client(mesh, "frontend")) == (200, f"app {FRONTEND}\n")
    with pytest.raises(REFUSED):  # TLS on the mesh port is still mutual and mesh-only
        https_get(sidecar.inbound, client(mesh, "impostor"))


def test_disable_serves_plaintext_only(sidecar, mesh, mode):
    mode(traffic_policy("self", "self", "127.0.0.1:9", mode="DISABLE"))
    assert http_get(sidecar.inbound, {HEADER: FRONTEND}) == (200, "app -\n")
    with pytest.raises(REFUSED):
        https_get(sidecar.inbound, client(mesh, "frontend"))


def test_handshake_metrics_count_each_result(sidecar, mesh):
    before = handshakes(sidecar)
    https_get(sidecar.inbound, client(mesh, "frontend"))
    https_get(sidecar.inbound, client(mesh, "reviews"))
    for who in (None, "impostor", "expired"):
        with pytest.raises(REFUSED):
            https_get(sidecar.inbound, client(mesh, who))
    plaintext_answer(sidecar.inbound)
    after = handshakes(sidecar)
    delta = {result: after.get(result, 0) - before.get(result, 0) for result in after}
    assert delta == {"ok": 1, "denied": 1, "no_cert": 1, "bad_ca": 1, "expired": 1, "plaintext": 1}


def test_certs_endpoint_and_expiry_gauge_describe_the_workload_certificate(sidecar, mesh):
    identity = read_identity(mesh.root / "server")
    status, certs = admin(sidecar, "GET", "/certs")
    assert status == 200
    assert certs["identity"] == REVIEWS
    assert certs["serial"] == identity.serial
    assert dt.datetime.fromisoformat(certs["not_after"]) == identity.not_after
    _, text = admin(sidecar, "GET", "/metrics")
    expiry = [s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == "meshlet_cert_expiry_timestamp_seconds"]
    assert expiry == [identity.not_after.timestamp()]


def raw_get(address: tuple[str, int], ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
            ) -> tuple[bytes, ssl.SSLSession | None, bool]:
    """One request on a new TLS connection, offering `session`: (response, its session, whether resumed)."""
    with socket.create_connection(address, timeout=10) as raw, ctx.wrap_socket(raw, session=session) as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        data = b""
        for _ in range(100):
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
        return data, tls.session, tls.session_reused


def resumed(sidecar) -> float:
    _, text = admin(sidecar, "GET", "/metrics")
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == "meshlet_mtls_resumed"
               for s in f.samples if s.name.endswith("_total") and s.labels == {"direction": "inbound"})


def test_a_resumed_session_still_identifies_and_authorizes_the_peer(sidecar, mesh):
    before = resumed(sidecar)
    frontend, reviews = client(mesh, "frontend"), client(mesh, "reviews")
    first, session, reused = raw_get(sidecar.inbound, frontend)
    assert not reused and first.endswith(f"app {FRONTEND}\n".encode())
    second, _, reused = raw_get(sidecar.inbound, frontend, session)
    assert reused, "the sidecar did not resume the session it issued"
    assert second.startswith(b"HTTP/1.1 200") and second.endswith(f"app {FRONTEND}\n".encode())
    assert resumed(sidecar) == before + 1
    _, session, _ = raw_get(sidecar.inbound, reviews)  # not in allow: 403, resumed or not
    denied, _, reused = raw_get(sidecar.inbound, reviews, session)
    assert reused and denied.startswith(b"HTTP/1.1 403")
