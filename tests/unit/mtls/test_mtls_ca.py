"""The mesh CA and workload certificates: the properties peers and Kubernetes tooling rely on."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from mtls_support import FRONTEND, NOW, authority

from meshlet.mtls.ca import DEFAULT_WORKLOAD_TTL, issue_workload, new_authority


def test_root_is_a_ten_year_p256_ca_that_signs_itself():
    root = new_authority(NOW)
    cert = root.cert
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert (cert.not_valid_after_utc - NOW).days == 3650
    cert.verify_directly_issued_by(cert)


def test_workload_cert_names_only_the_spiffe_id_and_serves_both_ends():
    ca = authority()
    issued = issue_workload(ca, FRONTEND, NOW)
    cert = issued.cert
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [FRONTEND]
    assert san.value.get_values_for_type(x509.DNSName) == []
    usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_after_utc - NOW == dt.timedelta(seconds=DEFAULT_WORKLOAD_TTL) == dt.timedelta(hours=24)
    assert cert.not_valid_before_utc < NOW  # backdated for peers with a slow clock
    assert cert.public_key() == issued.key.public_key()
    cert.verify_directly_issued_by(ca.cert)


def test_serials_differ_between_issues():
    ca = authority()
    assert issue_workload(ca, FRONTEND, NOW).cert.serial_number != issue_workload(ca, FRONTEND, NOW).cert.serial_number


@pytest.mark.parametrize("bad", [
    "spiffe://Cluster.local/ns/a",  # upper-case trust domain
    "spiffe://cluster.local/",  # trailing slash, no path
    "spiffe://cluster.local",  # no path
    "https://cluster.local/ns/a",
    "spiffe://cluster.local/ns/../sa/x",
])
def test_malformed_spiffe_id_is_refused(bad):
    with pytest.raises(ValueError, match="bad SPIFFE ID"):
        issue_workload(authority(), bad, NOW)


def test_lifetime_past_the_ca_is_refused():
    with pytest.raises(ValueError, match="past the CA's expiry"):
        issue_workload(authority(), FRONTEND, NOW, ttl=3651 * 86400.0)


def test_non_positive_ttl_is_refused():
    with pytest.raises(ValueError, match="ttl"):
        issue_workload(authority(), FRONTEND, NOW, ttl=0)
