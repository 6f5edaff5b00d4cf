"""meshlet's own upstream client over mesh mTLS: real handshakes on loopback against a stdlib TLS
server holding certificates from the production CA code, one per way a peer can be wrong."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from mitmproxy import http
from mtls_support import FRONTEND, REVIEWS, authority
from mtls_support import workload as issue

from meshlet.mtls.files import read_identity, write_identity
from meshlet.mtls.upstream import UpstreamTls, client_context
from meshlet.mtls.verify import identity_of
from meshlet.proxy.upstream import UpstreamError, UpstreamPool

RATINGS = "spiffe://cluster.local/ns/default/sa/ratings"
NOW = dt.datetime.now(dt.UTC)


@contextmanager
def tls_backend(tmp_path: Path, issued, peers: list[str | None]) -> Iterator[int]:
    """A one-connection HTTPS server presenting `issued`, requiring a mesh client certificate;
    appends the client's SPIFFE ID (None when the handshake failed) to `peers`."""
    directory = tmp_path / "server"
    write_identity(directory, issued, authority().cert)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    context.load_verify_locations(directory / "ca.pem")
    context.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with context.wrap_socket(conn, server_side=True) as tls:
                der = tls.getpeercert(binary_form=True)
                peers.append(identity_of(x509.load_der_x509_certificate(der)) if der else None)
                tls.recv(65536)
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (OSError, ssl.SSLError):
            peers.append(None)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        thread.join(10)
        listener.close()


def mesh_tls(tmp_path: Path, expect: str | None, results: list[str]) -> UpstreamTls:
    directory = tmp_path / "client"
    write_identity(directory, issue(FRONTEND, issued_at=NOW), authority().cert)
    identity = read_identity(directory)
    return UpstreamTls(client_context(identity), identity.serial, expect, results.append)


def get(port: int, tls: UpstreamTls) -> http.Response:
    request = http.Request.make("GET", f"http://127.0.0.1:{port}/", headers={"host": "reviews"})
    return asyncio.run(UpstreamPool().send(("127.0.0.1", port), request, 10.0, tls))


def test_a_mesh_peer_with_the_expected_identity_is_served_and_sees_ours(tmp_path):
    results: list[str] = []
    peers: list[str | None] = []
    with tls_backend(tmp_path, issue(REVIEWS, issued_at=NOW), peers) as port:
        response = get(port, mesh_tls(tmp_path, REVIEWS, results))
    assert (response.status_code, response.content) == (200, b"ok")
    assert results == ["ok"] and peers == [FRONTEND]


@pytest.mark.parametrize(
    ("peer", "expect", "result"),
    [
        (lambda: issue(REVIEWS, issued_at=NOW - dt.timedelta(hours=3), ttl=3600), REVIEWS, "expired"),
        (lambda: issue(REVIEWS, ca="foreign", issued_at=NOW), REVIEWS, "bad_ca"),
        (lambda: issue(RATINGS, issued_at=NOW), REVIEWS, "denied"),
    ],
    ids=["expired", "foreign-ca", "other-identity"],
)
def test_a_wrong_peer_is_refused_as_a_connect_failure_and_counted(tmp_path, peer, expect, result):
    results: list[str] = []
    with tls_backend(tmp_path, peer(), []) as port, pytest.raises(UpstreamError) as refused:
        get(port, mesh_tls(tmp_path, expect, results))
    assert refused.value.condition == "connect-failure"
    assert results == [result]
    assert result in str(refused.value)
