"""Standard-library `ssl` contexts for one identity, for the asyncio clients and the lean engine.

The mitmproxy engine speaks pyOpenSSL (meshlet.mtls.contexts); asyncio's transports (uvloop's
too) speak the standard library's `ssl`. Both judge a peer alike: OpenSSL checks the chain against
the mesh bundle and the validity dates during the handshake, then the leaf's SPIFFE ID is judged
by meshlet.mtls.verify. Peers are named by SPIFFE ID, not DNS, so hostname checks are off.
"""

from __future__ import annotations

import ssl

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshlet.mtls.files import Identity
from meshlet.mtls.memkey import load_key_and_chain


def client_context(identity: Identity, alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
    """A TLS >= 1.2 client context presenting `identity` and trusting only its bundle."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=_pem(*identity.bundle))
    context.check_hostname = False
    return _present(context, identity, alpn)


def server_context(identity: Identity, alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
    """A TLS >= 1.2 server context presenting `identity` that requires a client certificate
    chaining to its bundle: a mesh peer proves its identity at the handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_verify_locations(cadata=_pem(*identity.bundle))
    return _present(context, identity, alpn)


def _present(context: ssl.SSLContext, identity: Identity, alpn: tuple[str, ...]) -> ssl.SSLContext:
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(list(alpn))
    load_key_and_chain(context, identity.key, (identity.cert, *identity.chain))  # the key never touches disk
    return context


def _pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)
