"""The signing decision, pure: (review, CSR, CA, now) → a certificate, or a Refusal with its reason.

The certificate's only name is the SPIFFE ID of the ServiceAccount the API server vouched for.
Nothing the caller writes into the CSR can change that: a CSR asking for a name, a subject or an
extension is refused, not trimmed, so a compromised workload asking for another identity shows
up in `meshlet_identity_requests_refused_total{reason="identity_mismatch"}`.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshlet.k8s.tokenreview import Review
from meshlet.mtls.ca import Authority, sign_workload
from meshlet.mtls.wire import AUDIENCE, Refusal
from meshlet.policy.values import parse_spiffe_id

SA_PREFIX = "system:serviceaccount:"
MIN_RSA_BITS = 2048
CURVES = (ec.SECP256R1, ec.SECP384R1)
CA_MARGIN = dt.timedelta(minutes=1)  # a certificate never outlives its CA


def bearer(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer ...` header; Refusal(no_token) without one."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Refusal("no_token", "send the projected ServiceAccount token as Authorization: Bearer <token>")
    return token.strip()


def spiffe_id_for(review: Review, trust_domain: str, audience: str = AUDIENCE) -> str:
    """`spiffe://<trust domain>/ns/<namespace>/sa/<name>` for an authenticated ServiceAccount token."""
    if not review.authenticated:
        raise Refusal("unauthenticated", f"the API server did not authenticate the token: "
                                         f"{review.error or 'no reason given'}")
    if audience not in review.audiences:
        raise Refusal("unauthenticated", f"the token is not valid for audience {audience!r} "
                                         f"(valid for: {', '.join(review.audiences) or 'none'})")
    parts = review.username.split(":")
    if not review.username.startswith(SA_PREFIX) or len(parts) != 4 or not all(parts[2:]):
        raise Refusal("not_service_account", f"{review.username!r} is not a ServiceAccount")
    try:
        return parse_spiffe_id(f"spiffe://{trust_domain}/ns/{parts[2]}/sa/{parts[3]}")
    except ValueError as e:
        raise Refusal("not_service_account", str(e)) from None


def check_csr(pem: bytes, spiffe_id: str) -> x509.CertificateSigningRequest:
    """A CSR with a valid self-signature, an acceptable key, and no request beyond `spiffe_id`."""
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError:
        raise Refusal("bad_csr", "not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise Refusal("bad_csr", "the CSR's signature does not verify: it was not made with its key")
    _check_key(csr.public_key())
    if len(csr.subject):
        raise Refusal("identity_mismatch", f"the CSR asks for subject {csr.subject.rfc4514_string()!r}; "
                                           "leave it empty, certificates are named by the token")
    for extension in csr.extensions:
        if not isinstance(extension.value, x509.SubjectAlternativeName):
            raise Refusal("bad_csr", f"the CSR asks for extension {extension.oid.dotted_string} "
                                     f"({getattr(extension.oid, '_name', 'unknown')}), which is never granted")
        names = [str(name.value) for name in extension.value]
        if names != [spiffe_id]:
            raise Refusal("identity_mismatch", f"the CSR asks for {', '.join(names) or 'no name'}, "
                                               f"but the token proves {spiffe_id}")
    return csr


def _check_key(key: object) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, CURVES):
        return
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= MIN_RSA_BITS:
        return
    raise Refusal("bad_csr", f"unsupported key: use ECDSA P-256 or P-384, or RSA of {MIN_RSA_BITS} bits or more")


def sign(authority: Authority, csr: x509.CertificateSigningRequest, spiffe_id: str, now: dt.datetime,
         ttl: float) -> x509.Certificate:
    """The workload certificate: `ttl` long, or shorter when the CA expires sooner."""
    until_ca_expiry = (authority.cert.not_valid_after_utc - CA_MARGIN - now).total_seconds()
    return sign_workload(authority, csr.public_key(), spiffe_id, now, min(ttl, until_ca_expiry))
