"""The signing decision without a server: who a review names, what a CSR may ask, what is signed."""

from __future__ import annotations

import base64
import datetime as dt
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).parents[1] / "mtls"))
from mtls_support import NOW, authority

from meshlet.identity.signer import bearer, check_csr, sign, spiffe_id_for
from meshlet.k8s.tokenreview import Review
from meshlet.mtls.remote import new_csr
from meshlet.mtls.verify import identity_of, verify_peer
from meshlet.mtls.wire import Refusal

FRONTEND = "spiffe://cluster.local/ns/default/sa/frontend"
SA = Review(True, "system:serviceaccount:default:frontend", ("meshlet",))


def refused(reason: str):
    return pytest.raises(Refusal, match=rf"^{reason}: ")


def test_bearer_token():
    assert bearer("Bearer abc.def") == "abc.def"
    assert bearer("bearer  abc ") == "abc"
    for header in (None, "", "Basic dXNlcg==", "Bearer "):
        with refused("no_token"):
            bearer(header)


def test_the_spiffe_id_comes_from_the_review():
    assert spiffe_id_for(SA, "cluster.local") == FRONTEND
    assert spiffe_id_for(SA, "prod.example") == "spiffe://prod.example/ns/default/sa/frontend"


@pytest.mark.parametrize(("review", "reason", "says"), [
    (Review(False, error="token expired"), "unauthenticated", "token expired"),
    (Review(True, "system:serviceaccount:default:frontend", ("https://kubernetes.default.svc",)), "unauthenticated",
     "not valid for audience 'meshlet'"),
    (Review(True, "alice@example.com", ("meshlet",)), "not_service_account", "alice"),
    (Review(True, "system:node:worker-1", ("meshlet",)), "not_service_account", "system:node"),
    (Review(True, "system:serviceaccount:default", ("meshlet",)), "not_service_account", ""),
    (Review(True, "system:serviceaccount:default:a:b", ("meshlet",)), "not_service_account", ""),
])
def test_reviews_that_name_no_service_account_are_refused(review, reason, says):
    with refused(reason) as error:
        spiffe_id_for(review, "cluster.local")
    assert says in str(error.value)


def csr(*names: str, subject: x509.Name | None = None, key=None, extension: x509.ExtensionType | None = None):
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject or x509.Name([]))
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(n) for n in names]), critical=False)
    if extension is not None:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(key, hashes.SHA256())


def pem(request: x509.CertificateSigningRequest) -> bytes:
    return request.public_bytes(serialization.Encoding.PEM)


def test_the_sidecars_own_csr_and_one_naming_the_proven_identity_pass():
    for request in (new_csr(ec.generate_private_key(ec.SECP256R1())), csr(FRONTEND)):
        assert check_csr(pem(request), FRONTEND).public_key() == request.public_key()


@pytest.mark.parametrize(("request_", "reason"), [
    (csr("spiffe://cluster.local/ns/kube-system/sa/admin"), "identity_mismatch"),
    (csr(FRONTEND, "spiffe://cluster.local/ns/default/sa/reviews"), "identity_mismatch"),
    (csr(subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")])), "identity_mismatch"),
    (csr(extension=x509.BasicConstraints(ca=True, path_length=None)), "bad_csr"),
    (csr(extension=x509.KeyUsage(True, False, False, False, False, True, True, False, False)), "bad_csr"),
    (csr(key=rsa.generate_private_key(65537, 1024)), "bad_csr"),
    (csr(key=ec.generate_private_key(ec.SECP256K1())), "bad_csr"),
], ids=["another identity", "an extra identity", "a subject", "a CA", "key usage", "RSA-1024", "secp256k1"])
def test_a_csr_asking_for_anything_else_is_refused(request_, reason):
    with refused(reason):
        check_csr(pem(request_), FRONTEND)


def test_garbage_and_forged_csrs_are_refused():
    with refused("bad_csr"):
        check_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", FRONTEND)
    der = bytearray(csr().public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # one bit of the signature: it no longer proves possession of the key
    forged = b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(bytes(der)) + \
        b"-----END CERTIFICATE REQUEST-----\n"
    with refused("bad_csr"):
        check_csr(forged, FRONTEND)


def test_sign_names_only_the_reviewed_identity_for_the_ttl():
    request = check_csr(pem(csr()), FRONTEND)
    cert = sign(authority(), request, FRONTEND, NOW, 20)
    assert identity_of(cert) == FRONTEND
    assert cert.public_key() == request.public_key()
    assert cert.not_valid_after_utc == NOW + dt.timedelta(seconds=20)
    assert verify_peer([cert], [authority().cert], NOW + dt.timedelta(seconds=10)).ok
    assert verify_peer([cert], [authority().cert], NOW + dt.timedelta(seconds=21)).result == "expired"


def test_a_certificate_never_outlives_its_ca():
    ca = authority()
    request = check_csr(pem(csr()), FRONTEND)
    late = ca.cert.not_valid_after_utc - dt.timedelta(hours=1)
    cert = sign(ca, request, FRONTEND, late, 24 * 3600)
    assert cert.not_valid_after_utc < ca.cert.not_valid_after_utc
