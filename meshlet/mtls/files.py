"""The on-disk layout of a CA dir and an identity dir, read and written atomically.

CA dir: `ca.pem`, `ca-key.pem` (0600). Identity dir: `cert.pem`, `key.pem` (0600), `ca.pem` (the
trust bundle) — the same three files a Kubernetes Secret or projected volume mounts. Writes go
to a temporary file renamed into place, so a sidecar watching the dir never reads half a key.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshlet.mtls.ca import Authority, Issued
from meshlet.mtls.errors import IdentityError
from meshlet.mtls.verify import identity_of

CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"
CERT, KEY, BUNDLE = "cert.pem", "key.pem", "ca.pem"
IDENTITY_FILES = (CERT, KEY, BUNDLE)




@dataclass(frozen=True)
class Identity:
    """A workload's certificate, key and trust bundle, checked to belong together."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    bundle: tuple[x509.Certificate, ...]
    spiffe_id: str

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


def identity_certs(directory: Path | None) -> Callable[[], dict] | None:
    """`GET /certs` for a process that does not hold the TLS contexts (the --workers supervisor):
    what the identity dir holds now, which the workers load within their poll interval."""
    if directory is None:
        return None

    def view() -> dict:
        try:
            return {**describe(read_identity(directory)), "dir": str(directory)}
        except IdentityError as e:
            return {"error": str(e), "dir": str(directory)}

    return view


def write_authority(directory: Path, authority: Authority) -> None:
    """Create a CA dir; refuses to overwrite an existing CA (its workloads would stop trusting each other)."""
    if (directory / CA_CERT).exists() or (directory / CA_KEY).exists():
        raise IdentityError(f"{directory} already holds a CA ({CA_CERT}); refusing to overwrite it")
    directory.mkdir(parents=True, exist_ok=True)
    _write(directory / CA_KEY, _key_pem(authority.key), 0o600)
    _write(directory / CA_CERT, _cert_pem(authority.cert), 0o644)


def read_authority(directory: Path) -> Authority:
    cert = _read_certs(directory / CA_CERT)[0]
    key = _read_key(directory / CA_KEY)
    if cert.public_key() != key.public_key():
        raise IdentityError(f"{directory / CA_KEY}: key does not match {directory / CA_CERT}")
    return Authority(cert, key)


def write_identity(directory: Path, issued: Issued, bundle: x509.Certificate) -> None:
    """Write cert, bundle, then key — each atomically — into an identity dir."""
    directory.mkdir(parents=True, exist_ok=True)
    _write(directory / KEY, _key_pem(issued.key), 0o600)
    _write(directory / BUNDLE, _cert_pem(bundle), 0o644)
    _write(directory / CERT, _cert_pem(issued.cert), 0o644)


def read_identity(directory: Path) -> Identity:
    """Load and cross-check an identity dir; IdentityError names the first problem found."""
    certs = _read_certs(directory / CERT)
    key = _read_key(directory / KEY)
    bundle = tuple(_read_certs(directory / BUNDLE))
    cert = certs[0]
    if cert.public_key() != key.public_key():
        raise IdentityError(f"{directory / KEY}: key does not match {directory / CERT}")
    spiffe_id = identity_of(cert)
    if spiffe_id is None:
        raise IdentityError(f"{directory / CERT}: no single valid SPIFFE ID in the URI SAN")
    return Identity(cert, key, bundle, spiffe_id)


def _read_certs(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as e:
        raise IdentityError(f"cannot read {path}: {e.strerror}") from None
    except ValueError:
        raise IdentityError(f"{path}: not a PEM certificate") from None
    return certs


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as e:
        raise IdentityError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, TypeError):
        raise IdentityError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{path}: expected an ECDSA key")
    return key


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask and ignored for an existing file
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)
