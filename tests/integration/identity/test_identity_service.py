"""`meshlet identity serve` as sidecars meet it: TokenReviews through the fake API server (which
stands in for kube-apiserver, see identity_support), real HTTPS, real certificates.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from identity_support import FakeApiServer, identity_server, kubeconfig, make_ca, token_file

from meshlet.mtls.files import certs_pem, read_authority
from meshlet.mtls.remote import IdentityRefused, Unavailable, fetch
from meshlet.mtls.verify import verify_peer
from meshlet.mtls.wire import sign_request

FRONTEND = "spiffe://cluster.local/ns/default/sa/frontend"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    with FakeApiServer() as api:
        config = kubeconfig(root / "kubeconfig", {"test": api}, "test")
        ca_dir = make_ca(root / "ca")
        with identity_server(ca_dir, config, "--san", "meshlet-identity.meshlet-system.svc", ttl="90s",
                             ) as server:
            yield root, api, ca_dir, server


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def post(cluster, token: str | None, body: bytes) -> tuple[int, dict]:
    """A raw request, as a misbehaving or compromised workload would send it."""
    _, _, ca_dir, server = cluster
    host, _, port = server.url.split("//")[1].rpartition(":")
    context = ssl.create_default_context(cadata=certs_pem(read_authority(ca_dir).cert).decode())
    conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=10)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request("POST", "/v1/sign", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_a_service_account_token_gets_a_certificate_naming_its_spiffe_id(cluster):
    root, api, ca_dir, server = cluster
    before = server.metric("meshlet_identity_certificates_issued_total")
    token = token_file(root, api, "default", "frontend")
    identity = fetch(server.url, token, ca_dir / "ca.pem", now())
    assert identity.spiffe_id == FRONTEND
    assert verify_peer([identity.cert], (read_authority(ca_dir).cert,), now()).ok
    assert identity.not_after - now() <= dt.timedelta(seconds=90)
    assert identity.not_after - now() > dt.timedelta(seconds=80)
    # the API server was asked, for audience meshlet, about exactly that token
    assert api.reviews[-1]["audiences"] == ["meshlet"]
    assert api.reviews[-1]["token"] == token.read_text()
    assert server.metric("meshlet_identity_certificates_issued_total") == before + 1


def test_the_serving_certificate_names_the_listen_host_and_the_sans(cluster):
    _, _, _ca_dir, server = cluster
    host, _, port = server.url.split("//")[1].rpartition(":")
    pem = ssl.get_server_certificate((host, int(port)))
    names = x509.load_pem_x509_certificate(pem.encode()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["meshlet-identity.meshlet-system.svc"]


@pytest.mark.parametrize(("case", "reason"), [
    ("unknown token", "unauthenticated"),
    ("revoked token", "unauthenticated"),
    ("wrong audience", "unauthenticated"),
])
def test_refused_tokens_are_final_and_counted_by_reason(cluster, case, reason):
    root, api, ca_dir, server = cluster
    before = server.metric("meshlet_identity_requests_refused_total", reason=reason)
    if case == "unknown token":
        path = root / "forged"
        path.write_text("forged-token")
    elif case == "revoked token":
        path = token_file(root, api, "default", "deleted")
        api.revoke(path.read_text())
    else:
        path = token_file(root, api, "default", "frontend", audiences=("https://kubernetes.default.svc",))
    with pytest.raises(IdentityRefused, match=rf"refused this workload \({reason}\): ") as refused:
        fetch(server.url, path, ca_dir / "ca.pem", now())
    if case == "wrong audience":  # the API server's own words reach the sidecar's log
        assert "is invalid for the target audiences ['meshlet']" in str(refused.value)
    assert server.metric("meshlet_identity_requests_refused_total", reason=reason) == before + 1


def csr(*names: str, subject: x509.Name | None = None, ca: bool = False) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject or x509.Name([]))
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(n) for n in names]), critical=False)
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return builder.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())


@pytest.mark.parametrize(("request_", "reason"), [
    (csr("spiffe://cluster.local/ns/kube-system/sa/admin"), "identity_mismatch"),
    (csr(FRONTEND, "spiffe://cluster.local/ns/default/sa/reviews"), "identity_mismatch"),
    (csr(ca=True), "bad_csr"),
], ids=["another identity", "an extra identity", "a CA"])
def test_a_csr_asking_for_anything_but_the_tokens_identity_is_refused(cluster, request_, reason):
    root, api, _, server = cluster
    token = token_file(root, api, "default", "frontend").read_text()
    before = server.metric("meshlet_identity_requests_refused_total", reason=reason)
    status, answer = post(cluster, token, sign_request(request_))
    assert (status, answer["reason"]) == (403 if reason == "identity_mismatch" else 400, reason)
    assert "certificate" not in answer
    assert server.metric("meshlet_identity_requests_refused_total", reason=reason) == before + 1


def test_a_csr_naming_its_own_identity_is_granted(cluster):
    root, api, _, _server = cluster
    token = token_file(root, api, "default", "frontend").read_text()
    status, answer = post(cluster, token, sign_request(csr(FRONTEND)))
    assert status == 200 and answer["spiffe_id"] == FRONTEND


def test_no_token_is_401(cluster):
    _, _, _, _server = cluster
    status, answer = post(cluster, None, sign_request(csr()))
    assert (status, answer["reason"]) == (401, "no_token")


def test_rate_limit_per_identity(tmp_path):
    with FakeApiServer() as api:
        config = kubeconfig(tmp_path / "kubeconfig", {"test": api}, "test")
        ca_dir = make_ca(tmp_path / "ca")
        with identity_server(ca_dir, config, "--rate-limit", "2/m") as server:
            hog = token_file(tmp_path, api, "default", "hog")
            for _ in range(2):
                fetch(server.url, hog, ca_dir / "ca.pem", now())
            with pytest.raises(Unavailable, match=r"429.*rate_limited"):  # worth retrying later, not fatal
                fetch(server.url, hog, ca_dir / "ca.pem", now())
            # another identity has its own budget
            assert fetch(server.url, token_file(tmp_path, api, "default", "other"), ca_dir / "ca.pem", now())
            assert server.metric("meshlet_identity_requests_refused_total", reason="rate_limited") == 1


def test_an_unreachable_api_server_is_503_review_failed(tmp_path):
    with FakeApiServer() as api:
        config = kubeconfig(tmp_path / "kubeconfig", {"test": api}, "test")
        token = token_file(tmp_path, api, "default", "frontend")
    ca_dir = make_ca(tmp_path / "ca")  # the API server is gone now
    with identity_server(ca_dir, config) as server:
        with pytest.raises(Unavailable, match=r"503.*review_failed.*cannot reach the Kubernetes API"):
            fetch(server.url, token, ca_dir / "ca.pem", now())
        assert server.metric("meshlet_identity_requests_refused_total", reason="review_failed") == 1
