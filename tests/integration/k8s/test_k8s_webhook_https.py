"""`meshlet webhook` as a real process serving real TLS on loopback, as the API server calls it.

No kube-apiserver can run on this machine, so the test plays its part: it POSTs an
AdmissionReview over HTTPS, trusting only the webhook's self-signed certificate (as the
MutatingWebhookConfiguration's caBundle does), and applies the returned JSONPatch.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.client
import ipaddress
import json
import os
import re
import ssl
import subprocess
import sys
from pathlib import Path

import jsonpatch
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshlet.k8s.inject import inject_pod
from meshlet.k8s.sidecar import InjectConfig

MESHLET = Path(sys.executable).parent / "meshlet"
POD = {
    "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "reviews", "namespace": "default"},
    "spec": {"containers": [{"name": "reviews", "image": "reviews:1", "ports": [{"containerPort": 9080}]}]},
}


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshlet-webhook.meshlet.svc")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("meshlet-webhook.meshlet.svc"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def webhook(tmp_path):
    cert, key = self_signed(tmp_path)
    with start_webhook(cert, key) as port:
        context = ssl.create_default_context(cafile=str(cert))
        yield lambda: http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)


@contextlib.contextmanager
def start_webhook(cert: Path, key: Path):
    proc = subprocess.Popen(
        [str(MESHLET), "webhook", "--tls-cert", str(cert), "--tls-key", str(key), "--host", "127.0.0.1",
         "--port", "0", "--image", "reg.example/meshlet:test"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stderr.readline()  # the server prints its address once it listens
        match = re.search(r"https://127\.0\.0\.1:(\d+)/mutate", line)
        assert match, f"webhook did not start: {line!r}"
        yield int(match.group(1))
    finally:
        proc.terminate()
        try:
            assert proc.wait(timeout=10) == 0, "webhook did not exit cleanly on SIGTERM"
        finally:
            proc.kill()
            proc.stderr.close()


def post(connect, body: bytes) -> tuple[int, bytes]:
    conn = connect()
    try:
        conn.request("POST", "/mutate", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_review_round_trip_over_https(webhook):
    review = {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "e911857d-c318-11e8-bbad-025000000001", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "namespace": "default", "operation": "CREATE", "object": POD},
    }
    status, body = post(webhook, json.dumps(review).encode())
    assert status == 200
    answer = json.loads(body)
    assert answer["response"]["uid"] == review["request"]["uid"]
    assert answer["response"]["allowed"] is True
    patch = json.loads(base64.b64decode(answer["response"]["patch"]))
    expected = inject_pod(POD, InjectConfig(image="reg.example/meshlet:test")).obj
    assert jsonpatch.apply_patch(POD, patch) == expected


def test_malformed_review_is_http_400_with_reason_and_server_survives(webhook):
    status, body = post(webhook, b'{"apiVersion": "v1", "kind": "Pod"}')
    assert status == 400
    assert body.startswith(b"bad AdmissionReview: expected apiVersion admission.k8s.io/v1")
    conn = webhook()
    try:
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_plaintext_client_is_refused_and_server_survives(webhook):
    conn = webhook()
    port = conn.port
    conn.close()
    plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        plain.request("GET", "/healthz")
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            plain.getresponse()
    finally:
        plain.close()
    assert post(webhook, b"[]")[0] == 400


def test_bad_certificate_path_is_one_line(tmp_path):
    result = subprocess.run(
        [str(MESHLET), "webhook", "--tls-cert", str(tmp_path / "nope.crt"), "--tls-key", str(tmp_path / "nope.key")],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"meshlet: cannot load TLS certificate {tmp_path / 'nope.crt'}")
    assert len(result.stderr.splitlines()) == 1


def test_rotated_certificate_is_served_without_restart(tmp_path):
    cert, key = self_signed(tmp_path)
    with start_webhook(cert, key) as port:
        def healthz(trusted: Path) -> int:
            conn = http.client.HTTPSConnection(
                "127.0.0.1", port, context=ssl.create_default_context(cafile=str(trusted)), timeout=10)
            try:
                conn.request("GET", "/healthz")
                return conn.getresponse().status
            finally:
                conn.close()

        assert healthz(cert) == 200
        old_ca = tmp_path / "old-ca.pem"
        old_ca.write_bytes(cert.read_bytes())
        new_dir = tmp_path / "rotated"
        new_dir.mkdir()
        new_cert, new_key = self_signed(new_dir)
        trusted_new = tmp_path / "new-ca.pem"
        trusted_new.write_bytes(new_cert.read_bytes())
        os.replace(new_key, key)  # as a Secret volume update swaps files under the running process
        os.replace(new_cert, cert)
        assert healthz(trusted_new) == 200
        with pytest.raises(ssl.SSLCertVerificationError):
            healthz(old_ca)
