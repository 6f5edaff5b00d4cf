"""Mesh identity for the lean engine: standard-library contexts that follow the identity dir.

The contexts are rebuilt when the identity changes (rotation, local reissue) and swapped by one
assignment: handshakes starting afterwards present the new certificate, connections already
established keep theirs. Inbound, the handshake is the server context's (a client certificate
chaining to the mesh bundle is required); the SPIFFE ID is judged after it, so metrics and the
403 decision share meshlet.mtls.verify's answer with the mitmproxy engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable

from cryptography import x509

from meshlet.mtls.source import POLL_SECONDS, IdentitySource
from meshlet.mtls.stdlib import client_context, server_context
from meshlet.mtls.upstream import UpstreamTls, classify
from meshlet.mtls.verify import Verdict, identity_of, judge_identity
from meshlet.policy.model import Backend
from meshlet.telemetry.mtls import MtlsMetrics
from meshlet.telemetry.outcome import Workload

log = logging.getLogger("meshlet.proxy")


class LeanIdentity:
    """This workload's certificate as standard-library contexts, from the shared identity source
    (an identity dir, local reissue, or the identity service: meshlet.mtls.source). Until the
    source holds a certificate the contexts are None: inbound TLS is refused, mesh backends fail."""

    def __init__(self, source: IdentitySource, metrics: MtlsMetrics, me: Workload) -> None:
        self.source = source
        self.metrics = metrics
        self.me = me  # this workload in telemetry: its principal is the certificate's SPIFFE ID
        self.server: ssl.SSLContext | None = None
        self.client: ssl.SSLContext | None = None
        self.client_h2: ssl.SSLContext | None = None
        self.serial = ""
        self._poller: asyncio.Task | None = None
        self._build()

    def _build(self) -> None:
        contexts = self.source.current
        if contexts is None:
            return
        identity = contexts.identity
        self.server = server_context(identity, ("h2", "http/1.1"))  # HTTP/2 between sidecars when both speak it
        self.client = client_context(identity)
        self.client_h2 = client_context(identity, ("h2",))
        self.serial = identity.serial
        self.me.principal = identity.spiffe_id
        self.metrics.cert_expiry.set(identity.not_after.timestamp())

    async def start(self) -> None:
        """The first certificate request (IdentityError when refused for good), then the follower."""
        await self.source.start()
        self._build()
        self._poller = asyncio.get_running_loop().create_task(self._follow())

    def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        self.source.close()

    def ready(self) -> bool:
        return self.source.ready()

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            if self.source.poll():
                self._build()

    def certs(self) -> dict:
        return self.source.describe()

    def upstream(self, backend: Backend, h2: bool = False) -> UpstreamTls | None:
        """How to reach a `tls: mesh` backend with the current certificate (ALPN `h2` for HTTP/2);
        None while no certificate is held."""
        if self.client is None or self.client_h2 is None:
            return None
        if h2:
            return UpstreamTls(self.client_h2, self.serial + "/h2", backend.identity or None, self._outbound)
        return UpstreamTls(self.client, self.serial, backend.identity or None, self._outbound)

    def _outbound(self, result: str) -> None:
        self.metrics.handshake("outbound", result)

    async def accept(
        self, sock: socket.socket, protocol_factory: Callable[[], asyncio.Protocol], timeout: float,
    ) -> bool:
        """The TLS handshake of an accepted inbound socket; False when it failed (counted by
        reason and logged). On success the protocol judges the peer in `connection_made`
        (application data can arrive in the same turn of the loop as the end of the handshake)."""
        loop = asyncio.get_running_loop()
        assert self.server is not None  # the engine refuses TLS before a certificate is held
        try:
            await loop.connect_accepted_socket(
                protocol_factory, sock, ssl=self.server, ssl_handshake_timeout=timeout,
            )
        except ssl.SSLError as e:
            refused = classify(e)
            self.metrics.handshake("inbound", refused.result)
            log.info("inbound mTLS handshake refused: %s", refused)
            return False
        except (OSError, TimeoutError, ConnectionError) as e:
            self.metrics.handshake("inbound", "no_cert")
            log.info("inbound mTLS handshake failed: %s", e or type(e).__name__)
            with contextlib.suppress(OSError):
                sock.close()
            return False
        return True


def spiffe_id_of(der: bytes | None) -> str:
    """The SPIFFE ID of a certificate OpenSSL verified (and check_leaf judged), "" if none."""
    return (identity_of(x509.load_der_x509_certificate(der)) or "") if der else ""


def peer_verdict(transport: asyncio.BaseTransport) -> Verdict:
    """The verified peer's SPIFFE ID (OpenSSL already checked chain and dates)."""
    ssl_object = transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if der is None:
        return Verdict("no_cert", detail="the peer sent no certificate")
    return judge_identity(x509.load_der_x509_certificate(der))

