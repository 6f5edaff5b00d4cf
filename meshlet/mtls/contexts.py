"""pyOpenSSL contexts for one identity: the inbound (server) and outbound (client) side of mTLS.

Built once per identity (and again on rotation), shared by every connection: a connection keeps
the context it started with, so rotating never breaks an established connection. Verification
callbacks are set per connection by the caller, because the expected peer differs per backend.
The server side issues TLS session tickets, so a sidecar reconnecting to a peer resumes instead
of repeating the signatures and chain checks of a full handshake (see meshlet.proxy.mitm.mtls).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL, crypto

from meshlet.mtls.files import Identity

SESSION_SECONDS = 300


@dataclass(frozen=True)
class TlsContexts:
    identity: Identity
    server: SSL.Context
    client: SSL.Context


def build_contexts(identity: Identity, alpn_select=None) -> TlsContexts:
    """Contexts presenting `identity` and trusting only its bundle; TLS 1.2 at least."""
    return TlsContexts(identity, _context(identity, SSL.TLS_SERVER_METHOD, alpn_select),
                       _context(identity, SSL.TLS_CLIENT_METHOD, None))


def _context(identity: Identity, method: int, alpn_select) -> SSL.Context:
    ctx = SSL.Context(method)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    ctx.use_certificate(identity.cert)
    for intermediate in identity.chain:
        ctx.add_extra_chain_cert(intermediate)
    ctx.use_privatekey(identity.key)
    ctx.check_privatekey()
    store = ctx.get_cert_store()
    assert store is not None
    for root in identity.bundle:
        store.add_cert(crypto.X509.from_cryptography(root))
    if method == SSL.TLS_SERVER_METHOD:
        ctx.set_client_ca_list([crypto.X509.from_cryptography(root).get_subject() for root in identity.bundle])
        # One session cache per context: a rotated identity starts fresh instead of resuming old sessions.
        ctx.set_session_id(identity.cert.fingerprint(hashes.SHA256())[:32])
        # Resumption skips the certificate exchange; the addon judges the remembered peer again, and
        # sessions outlive no more than this (OpenSSL's default is two hours).
        ctx.set_timeout(SESSION_SECONDS)
        if alpn_select is not None:
            ctx.set_alpn_select_callback(alpn_select)
    return ctx

