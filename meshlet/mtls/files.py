"""The on-disk layout of a CA dir and an identity dir, read and written atomically.

CA dir: `ca.pem`, `ca-key.pem` (0600), and during a CA rotation more (meshlet.mtls.cadir).
Identity dir: `cert.pem`, `key.pem` (0600), `ca.pem` (the trust bundle) as `meshlet cert issue`
writes them; the same dir may instead hold what cert-manager's csi-driver-spiffe mounts
(`tls.crt`, `tls.key`, `ca.crt`) or what SPIRE's spiffe-helper writes (`svid.pem`,
`svid_key.pem`, `svid_bundle.pem`), whose certificate file may carry intermediates after the leaf.
Writes go to a temporary file renamed into place, so a sidecar watching the dir never reads half a key.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshlet.mtls.ca import Authority, Issued
from meshlet.mtls.errors import IdentityError
from meshlet.mtls.verify import identity_of

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"
CERT, KEY, BUNDLE = "cert.pem", "key.pem", "ca.pem"
IDENTITY_FILES = (CERT, KEY, BUNDLE)
CSI_SPIFFE_FILES = ("tls.crt", "tls.key", "ca.crt")  # cert-manager csi-driver-spiffe
SPIFFE_HELPER_FILES = ("svid.pem", "svid_key.pem", "svid_bundle.pem")  # SPIRE spiffe-helper's defaults
LAYOUTS: tuple[tuple[str, str, str], ...] = (IDENTITY_FILES, CSI_SPIFFE_FILES, SPIFFE_HELPER_FILES)




@dataclass(frozen=True)
class Identity:
    """A workload's certificate, key and trust bundle, checked to belong together."""

    cert: x509.Certificate
    key: PrivateKey
    bundle: tuple[x509.Certificate, ...]
    spiffe_id: str
    chain: tuple[x509.Certificate, ...] = ()  # intermediates presented after the leaf (SPIRE's, cert-manager's)

    @property
    def serial(self) -> str:
        return f"{self.cert.serial_number:x}"

    @property
    def not_after(self) -> dt.datetime:
        return self.cert.not_valid_after_utc


def describe(identity: Identity) -> dict[str, str]:
    """What `GET /certs` shows about the certificate a sidecar presents."""
    return {
        "identity": identity.spiffe_id,
        "serial": identity.serial,
        "not_before": identity.cert.not_valid_before_utc.isoformat(),
        "not_after": identity.not_after.isoformat(),
        "issuer": identity.cert.issuer.rfc4514_string(),
    }


def write_authority(directory: Path, authority: Authority) -> None:
    """Create a CA dir; refuses to overwrite an existing CA (its workloads would stop trusting each other)."""
    if (directory / CA_CERT).exists() or (directory / CA_KEY).exists():
        raise IdentityError(f"{directory} already holds a CA ({CA_CERT}); refusing to overwrite it")
    directory.mkdir(parents=True, exist_ok=True)
    write_file(directory / CA_KEY, key_pem(authority.key), 0o600)
    write_file(directory / CA_CERT, certs_pem(authority.cert), 0o644)


def read_authority(directory: Path, cert_name: str = CA_CERT, key_name: str = CA_KEY) -> Authority:
    cert = _read_certs(directory / cert_name)[0]
    key = _read_key(directory / key_name)
    if cert.public_key() != key.public_key():
        raise IdentityError(f"{directory / key_name}: key does not match {directory / cert_name}")
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{directory / key_name}: expected an ECDSA key")
    return Authority(cert, key)


def write_identity(directory: Path, issued: Issued, bundle: x509.Certificate | Sequence[x509.Certificate]) -> None:
    """Write key, bundle, then cert — each atomically — into an identity dir."""
    directory.mkdir(parents=True, exist_ok=True)
    roots = (bundle,) if isinstance(bundle, x509.Certificate) else tuple(bundle)
    write_file(directory / KEY, key_pem(issued.key), 0o600)
    write_file(directory / BUNDLE, certs_pem(*roots), 0o644)
    write_file(directory / CERT, certs_pem(issued.cert), 0o644)


def layout(directory: Path) -> tuple[str, str, str]:
    """The file names an identity dir uses: the first layout whose certificate file exists (meshlet's
    own when none does, so the error names cert.pem)."""
    return next((names for names in LAYOUTS if (directory / names[0]).exists()), IDENTITY_FILES)


def read_identity(directory: Path) -> Identity:
    """Load and cross-check an identity dir; IdentityError names the first problem found."""
    cert_name, key_name, bundle_name = layout(directory)
    certs = _read_certs(directory / cert_name)
    key = _read_key(directory / key_name)
    bundle = read_bundle(directory / bundle_name)
    return make_identity(certs, key, bundle, directory / cert_name, directory / key_name)


def make_identity(certs: list[x509.Certificate], key: PrivateKey, bundle: tuple[x509.Certificate, ...],
                  where: Path | str, key_where: Path | str = "the private key") -> Identity:
    """Cross-check a certificate chain (leaf first) against its key; `where` names the source in errors."""
    cert = certs[0]
    if cert.public_key() != key.public_key():
        raise IdentityError(f"{key_where}: key does not match {where}")
    spiffe_id = identity_of(cert)
    if spiffe_id is None:
        raise IdentityError(f"{where}: no single valid SPIFFE ID in the URI SAN")
    return Identity(cert, key, bundle, spiffe_id, tuple(certs[1:]))


def read_bundle(path: Path) -> tuple[x509.Certificate, ...]:
    """A trust bundle: one or more PEM CA certificates."""
    return tuple(_read_certs(path))


def _read_certs(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as e:
        raise IdentityError(f"cannot read {path}: {e.strerror}") from None
    except ValueError:
        raise IdentityError(f"{path}: not a PEM certificate") from None
    return certs


def _read_key(path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as e:
        raise IdentityError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, TypeError):
        raise IdentityError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise IdentityError(f"{path}: expected an ECDSA or RSA key")
    return key


def certs_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Atomically: readers see the old content or the new, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask and ignored for an existing file
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)
