"""Classify a peer: (chain, trust bundle, now, allow list) → a result and the peer's SPIFFE ID.

Pure and synchronous so the rules are tested on real certificates without sockets, and so the
handshake callback, the metrics label and the 403 decision all agree on one answer.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from meshlet.policy.values import parse_spiffe_id

Result = Literal["ok", "no_cert", "bad_ca", "expired", "denied", "plaintext"]
RESULTS: tuple[Result, ...] = ("ok", "no_cert", "bad_ca", "expired", "denied", "plaintext")


@dataclass(frozen=True)
class Verdict:
    result: Result
    identity: str | None = None  # the SPIFFE ID, once the chain is trusted
    detail: str = ""  # why, for logs

    @property
    def ok(self) -> bool:
        return self.result == "ok"


def verify_peer(
    chain: Sequence[x509.Certificate] | None,
    bundle: Sequence[x509.Certificate],
    now: dt.datetime,
    allow: Collection[str] = (),
) -> Verdict:
    """Judge a peer's certificate chain (leaf first; None = the peer spoke plaintext).

    Checks, in the order a user debugging a refusal wants them: a chain exists, it leads to a
    root of the bundle, every link is within its validity, the leaf names exactly one SPIFFE ID,
    and that ID is in `allow` (empty `allow` = any identity the mesh CA vouches for).
    """
    if chain is None:
        return Verdict("plaintext", detail="no TLS")
    if not chain:
        return Verdict("no_cert", detail="the peer sent no certificate")
    path = _trusted_path(tuple(chain), tuple(bundle))
    if path is None:
        return Verdict("bad_ca", detail=f"issuer {chain[0].issuer.rfc4514_string()!r} is not in the mesh trust bundle")
    for cert in path:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            when = f"{cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}..{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
            return Verdict("expired", detail=f"certificate serial {cert.serial_number:x} valid only {when}")
    return judge_identity(chain[0], allow)


def judge_identity(leaf: x509.Certificate, allow: Collection[str] = ()) -> Verdict:
    """The last of `verify_peer`'s checks, alone, for a peer whose chain and dates were already
    verified (by OpenSSL, in meshlet's own upstream client): one SPIFFE ID, and in `allow`."""
    identity = identity_of(leaf)
    if identity is None:
        return Verdict("denied", detail="the certificate carries no single valid SPIFFE ID")
    if allow and identity not in allow:
        return Verdict("denied", identity, detail=f"{identity} is not allowed (expected {' or '.join(sorted(allow))})")
    return Verdict("ok", identity)


def identity_of(cert: x509.Certificate) -> str | None:
    """The certificate's SPIFFE ID: its one `spiffe://` URI SAN, or None (none, several, malformed)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = [uri for uri in san.get_values_for_type(x509.UniformResourceIdentifier) if uri.startswith("spiffe://")]
    if len(uris) != 1:
        return None
    try:
        return parse_spiffe_id(uris[0])
    except ValueError:
        return None


@functools.lru_cache(maxsize=256)
def _trusted_path(chain: tuple[x509.Certificate, ...], bundle: tuple[x509.Certificate, ...]) -> tuple | None:
    """`_path_to_root`, remembered: the signatures of a chain do not change, and every handshake of
    a peer (a resumed one too) presents the same certificate. Validity times are checked per call."""
    path = _path_to_root(chain, bundle)
    return None if path is None else tuple(path)


def _path_to_root(chain: Sequence[x509.Certificate], bundle: Sequence[x509.Certificate]) -> list | None:
    """The certificates from the leaf up to and including a bundle root, each signed by the next."""
    path = [chain[0]]
    candidates = list(chain[1:])
    for _ in range(len(chain) + 1):
        current = path[-1]
        root = _issuer_in(current, bundle)
        if root is not None:
            return [*path, root] if root is not current else path
        parent = _issuer_in(current, candidates, ca_only=True)
        if parent is None:
            return None
        candidates.remove(parent)
        path.append(parent)
    return None


def _issuer_in(cert: x509.Certificate, pool: Sequence[x509.Certificate], ca_only=False) -> x509.Certificate | None:
    for issuer in pool:
        if issuer.subject != cert.issuer:
            continue
        if ca_only and not _is_ca(issuer):
            continue
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return issuer
    return None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False
