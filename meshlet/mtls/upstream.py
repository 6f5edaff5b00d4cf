"""Mesh mTLS for meshlet's own upstream client (routes with a `timeout` or `retries`).

mitmproxy's server side does mTLS through pyOpenSSL (meshlet.proxy.mitm.mtls); the pool in
meshlet.proxy.mitm.client is plain asyncio, which speaks the standard library's `ssl`. Both must
judge a peer alike: OpenSSL checks the chain against the mesh bundle and the validity dates
during the handshake, then the leaf's SPIFFE ID must be the backend's `identity` when it names
one. The results are the same labels `meshlet_mtls_handshakes_total` uses for the other path.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509

from meshlet.mtls.stdlib import client_context
from meshlet.mtls.verify import Result, judge_identity

__all__ = ["MeshHandshakeError", "UpstreamTls", "check_leaf", "classify", "client_context"]

# X509_V_ERR_* codes OpenSSL reports for dates (the rest of a failed verification is the CA's).
_CERT_NOT_YET_VALID, _CERT_HAS_EXPIRED = 9, 10


@dataclass(frozen=True)
class UpstreamTls:
    """How to reach one mesh backend: the client context, the identity it must prove, and where
    handshake results are counted. `pool_key` separates pooled connections by our certificate
    and the expected peer, so a rotated identity or a changed `identity` opens new ones."""

    context: ssl.SSLContext
    serial: str  # of our certificate
    expect: str | None
    record: Callable[[Result], None]

    @property
    def pool_key(self) -> tuple:
        return (self.serial, self.expect)


class MeshHandshakeError(Exception):
    def __init__(self, result: Result, detail: str):
        super().__init__(f"mTLS handshake refused ({result}): {detail}")
        self.result = result


def classify(error: ssl.SSLError) -> MeshHandshakeError:
    """A failed handshake as the metric label and a line for the 503 body."""
    if isinstance(error, ssl.SSLCertVerificationError):
        dated = error.verify_code in (_CERT_NOT_YET_VALID, _CERT_HAS_EXPIRED)
        return MeshHandshakeError("expired" if dated else "bad_ca", error.verify_message or str(error))
    return MeshHandshakeError("no_cert", error.reason or str(error))


def check_leaf(der: bytes | None, expect: str | None) -> MeshHandshakeError | None:
    """None when the verified peer's leaf names the expected SPIFFE ID (or any, with none expected)."""
    if der is None:
        return MeshHandshakeError("no_cert", "the backend sent no certificate")
    verdict = judge_identity(x509.load_der_x509_certificate(der), (expect,) if expect else ())
    return None if verdict.ok else MeshHandshakeError(verdict.result, verdict.detail)
