"""The identity service's HTTP API, as both ends speak it.

`POST /v1/sign` with `Authorization: Bearer <ServiceAccount token, audience meshlet>` and
`{"csr": "<PEM CSR>"}` → 200 `{"certificate": "<PEM leaf>", "spiffe_id": ..., "not_after": ...}`,
or an error status with `{"reason": ..., "message": ...}`. The reasons are the label values of
`meshlet_identity_refused_total`, and tell a sidecar whether retrying can help: a refused token
or CSR will be refused again (the sidecar stops with that line), a rate limit or an unreachable
API server will not last (it retries with backoff).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

SIGN_PATH = "/v1/sign"
AUDIENCE = "meshlet"  # of the projected ServiceAccount token a sidecar presents
DEFAULT_PORT = 15012
MAX_BODY = 64 * 1024  # a CSR is well under 2 KiB

Reason = Literal["no_token", "unauthenticated", "not_service_account", "bad_request", "bad_csr",
                 "identity_mismatch", "rate_limited", "review_failed"]
REASONS: tuple[Reason, ...] = ("no_token", "unauthenticated", "not_service_account", "bad_request", "bad_csr",
                               "identity_mismatch", "rate_limited", "review_failed")
STATUS: dict[Reason, int] = {
    "no_token": 401, "unauthenticated": 401, "not_service_account": 403, "bad_request": 400, "bad_csr": 400,
    "identity_mismatch": 403, "rate_limited": 429, "review_failed": 503,
}
TRANSIENT: frozenset[Reason] = frozenset({"rate_limited", "review_failed"})  # worth retrying


@dataclass(frozen=True)
class Refusal(Exception):
    """Why a signing request was not granted; `message` is one line for the caller's log."""

    reason: Reason
    message: str
    retry_after: float | None = None  # seconds, with rate_limited

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"

    @property
    def status(self) -> int:
        return STATUS[self.reason]

    def body(self) -> bytes:
        return json.dumps({"reason": self.reason, "message": self.message}).encode()


def sign_request(csr: x509.CertificateSigningRequest) -> bytes:
    return json.dumps({"csr": csr.public_bytes(serialization.Encoding.PEM).decode()}).encode()


def parse_sign_request(body: bytes) -> bytes:
    """The CSR's PEM bytes; Refusal(bad_request) for anything else."""
    try:
        value = json.loads(body)
        csr = value["csr"]
    except (ValueError, TypeError, KeyError):
        raise Refusal("bad_request", 'expected a JSON object {"csr": "<PEM certificate signing request>"}') from None
    if not isinstance(csr, str):
        raise Refusal("bad_request", '"csr" must be a PEM string')
    return csr.encode()


def sign_response(chain: tuple[x509.Certificate, ...], spiffe_id: str, not_after: dt.datetime) -> bytes:
    pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in chain)
    return json.dumps({"certificate": pem, "spiffe_id": spiffe_id, "not_after": not_after.isoformat()}).encode()


def parse_sign_response(body: bytes) -> list[x509.Certificate]:
    """The certificate chain, leaf first; ValueError when the answer is not one."""
    try:
        return x509.load_pem_x509_certificates(json.loads(body)["certificate"].encode())
    except (TypeError, KeyError, AttributeError):
        raise ValueError("the answer holds no certificate") from None


def parse_refusal(status: int, body: bytes) -> Refusal | None:
    """The service's refusal, or None when the error did not come from it (a proxy, a crash)."""
    try:
        value = json.loads(body)
        reason, message = value["reason"], str(value["message"])
    except (ValueError, TypeError, KeyError):
        return None
    if reason not in STATUS or STATUS[reason] != status:
        return None
    return Refusal(reason, message)
