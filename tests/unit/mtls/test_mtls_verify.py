"""verify_peer on real certificates: each result the handshake metric and the 403 depend on."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mtls_support import FRONTEND, NOW, REVIEWS, authority, workload

from meshlet.mtls.ca import issue_workload, new_authority
from meshlet.mtls.verify import identity_of, verify_peer

BUNDLE = (authority().cert,)


def test_mesh_certificate_is_ok_with_its_identity():
    verdict = verify_peer([workload(FRONTEND).cert], BUNDLE, NOW)
    assert verdict.ok and verdict.result == "ok"
    assert verdict.identity == FRONTEND


def test_allowed_identity_is_ok():
    assert verify_peer([workload(FRONTEND).cert], BUNDLE, NOW, allow=[FRONTEND, REVIEWS]).result == "ok"


def test_identity_not_in_allow_is_denied_but_named():
    verdict = verify_peer([workload(REVIEWS).cert], BUNDLE, NOW, allow=[FRONTEND])
    assert verdict.result == "denied"
    assert verdict.identity == REVIEWS


def test_no_chain_is_no_cert_and_none_is_plaintext():
    assert verify_peer([], BUNDLE, NOW).result == "no_cert"
    assert verify_peer(None, BUNDLE, NOW).result == "plaintext"


def test_certificate_from_another_ca_is_bad_ca():
    verdict = verify_peer([workload(FRONTEND, ca="other").cert], BUNDLE, NOW)
    assert verdict.result == "bad_ca"
    assert verdict.identity is None


def test_impostor_ca_with_the_same_name_is_bad_ca():
    """Same subject as the mesh CA, different key: the signature decides, not the name."""
    impostor = new_authority(NOW, name="meshlet mesh CA")
    assert impostor.cert.subject == authority().cert.subject
    forged = issue_workload(impostor, FRONTEND, NOW)
    assert verify_peer([forged.cert], BUNDLE, NOW).result == "bad_ca"


def test_expired_and_not_yet_valid_are_expired():
    expired = workload(FRONTEND, issued_at=NOW - dt.timedelta(hours=2), ttl=3600)
    assert verify_peer([expired.cert], BUNDLE, NOW).result == "expired"
    future = workload(FRONTEND, issued_at=NOW + dt.timedelta(hours=2), ttl=3600)
    assert verify_peer([future.cert], BUNDLE, NOW).result == "expired"


def test_expired_from_another_ca_is_bad_ca_first():
    old = workload(FRONTEND, ca="other", issued_at=NOW - dt.timedelta(hours=2), ttl=3600)
    assert verify_peer([old.cert], BUNDLE, NOW).result == "bad_ca"


def test_trusted_certificate_without_spiffe_id_is_denied():
    ca = authority()
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca.cert.subject)
        .public_key(key.public_key()).serial_number(7)
        .not_valid_before(NOW - dt.timedelta(hours=1)).not_valid_after(NOW + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("reviews")]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    verdict = verify_peer([cert], BUNDLE, NOW)
    assert verdict.result == "denied" and verdict.identity is None
    assert identity_of(cert) is None


def test_the_root_itself_is_not_a_workload():
    assert verify_peer([authority().cert], BUNDLE, NOW).result == "denied"


def test_chain_through_an_intermediate_reaches_the_root():
    root = authority()
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intermediate")])
    inter = (
        x509.CertificateBuilder().subject_name(inter_name).issuer_name(root.cert.subject)
        .public_key(inter_key.public_key()).serial_number(8)
        .not_valid_before(NOW - dt.timedelta(hours=1)).not_valid_after(NOW + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(root.key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(inter_name)
        .public_key(leaf_key.public_key()).serial_number(9)
        .not_valid_before(NOW - dt.timedelta(hours=1)).not_valid_after(NOW + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(REVIEWS)]), critical=True)
        .sign(inter_key, hashes.SHA256())
    )
    assert verify_peer([leaf, inter], BUNDLE, NOW).identity == REVIEWS
    assert verify_peer([leaf], BUNDLE, NOW).result == "bad_ca"  # the intermediate is not sent
    assert verify_peer([leaf, inter], BUNDLE, NOW + dt.timedelta(hours=2)).result == "expired"
