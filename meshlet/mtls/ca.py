"""The mesh CA and workload certificates, as pure builders: keys and times in, certificates out.

No files here (see `meshlet.mtls.files`), so tests can mint any certificate they need — expired,
from another CA, with a chosen SPIFFE ID — from the same code production uses.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshlet.policy.values import parse_spiffe_id

ROOT_LIFETIME = dt.timedelta(days=3650)
DEFAULT_WORKLOAD_TTL = 24 * 3600.0  # seconds; Istio's default for workload certificates
# A certificate issued "now" must already be valid on a peer whose clock is slightly behind.
BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class Authority:
    """A CA: its self-signed root and the key that signs workload certificates."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Issued:
    """A workload certificate and its key, as `meshlet cert issue` writes them."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def new_authority(now: dt.datetime, name: str = "meshlet mesh CA") -> Authority:
    """A 10-year ECDSA P-256 root that may sign end-entity certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlet"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key)


def issue_workload(authority: Authority, spiffe_id: str, now: dt.datetime, ttl: float = DEFAULT_WORKLOAD_TTL) -> Issued:
    """A new key and a certificate whose only name is the SPIFFE ID (URI SAN), good for both ends of mTLS.

    Raises ValueError for a malformed SPIFFE ID, a non-positive ttl, or a lifetime reaching past
    the CA's own expiry (peers would refuse the chain before the leaf expires).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    return Issued(sign_workload(authority, key.public_key(), spiffe_id, now, ttl), key)


def sign_workload(authority: Authority, public_key: CertificatePublicKeyTypes, spiffe_id: str, now: dt.datetime,
                  ttl: float = DEFAULT_WORKLOAD_TTL) -> x509.Certificate:
    """`issue_workload` for a key held elsewhere: the identity service signs a sidecar's public
    key and never sees the private one. The same ValueErrors."""
    parse_spiffe_id(spiffe_id)
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)])
    usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    return _leaf(authority, public_key, san, usage, now, ttl)


def issue_server(authority: Authority, names: Sequence[str], now: dt.datetime, ttl: float) -> Issued:
    """A TLS server certificate for the identity service itself, naming `names` (IP SANs for IP
    literals, DNS SANs otherwise), so sidecars that trust only the mesh bundle can check the host."""
    if not names:
        raise ValueError("a server certificate needs at least one name")
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf(authority, key.public_key(), x509.SubjectAlternativeName(sans), [ExtendedKeyUsageOID.SERVER_AUTH],
                 now, ttl)
    return Issued(cert, key)


def _leaf(authority: Authority, public_key: CertificatePublicKeyTypes, san: x509.SubjectAlternativeName,
          usage: list[x509.ObjectIdentifier], now: dt.datetime, ttl: float) -> x509.Certificate:
    if ttl <= 0:
        raise ValueError(f"bad ttl {ttl}: must be greater than zero")
    not_after = now + dt.timedelta(seconds=ttl)
    if not_after > authority.cert.not_valid_after_utc:
        raise ValueError(
            f"ttl reaches past the CA's expiry ({authority.cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC); "
            "issue a shorter ttl"
        )
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlet")]))
        .issuer_name(authority.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .add_extension(san, critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()), critical=False)
        .sign(authority.key, hashes.SHA256())
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False,
    )
