"""meshlet's own upstream client over mesh mTLS: real handshakes on loopback against a stdlib TLS
server holding certificates from the production CA code, one per way a peer can be wrong."""

from __future__ import annotations

import asyncio
import contextlib
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
from meshlet.proxy.mitm.client import Reply, UpstreamError, UpstreamPool

RATINGS = "spiffe://cluster.local/ns/default/sa/ratings"
NOW = dt.datetime.now(dt.UTC)


@contextmanager
def tls_backend(tmp_path: Path, issued, peers: list[str | None], connections: int = 1) -> Iterator[int]:
    """An HTTPS server presenting `issued` and requiring a mesh client certificate, for
    `connections` connections of one request each; appends to `peers` the client's SPIFFE ID
    (None when the handshake failed), and "closed" when the client closes a served connection."""
    directory = tmp_path / "server"
    write_identity(directory, issued, authority().cert)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    context.load_verify_locations(directory / "ca.pem")
    context.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def handle(conn: socket.socket) -> None:
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                der = tls.getpeercert(binary_form=True)
                peers.append(identity_of(x509.load_der_x509_certificate(der)) if der else None)
                tls.recv(65536)
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                if tls.recv(65536) == b"":
                    peers.append("closed")
        except (OSError, ssl.SSLError):
            peers.append(None)

    def serve() -> None:
        handlers = []
        for _ in range(connections):
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                conn.settimeout(10)
                handlers.append(threading.Thread(target=handle, args=(conn,), daemon=True))
                handlers[-1].start()
        for handler in handlers:
            handler.join(10)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        thread.join(15)
        listener.close()


def mesh_tls(tmp_path: Path, expect: str | None, results: list[str], name: str = "client") -> UpstreamTls:
    directory = tmp_path / name
    write_identity(directory, issue(FRONTEND, issued_at=NOW), authority().cert)
    identity = read_identity(directory)
    return UpstreamTls(client_context(identity), identity.serial, expect, results.append)


def request() -> http.Request:
    return http.Request.make("GET", "http://reviews/", headers={"host": "reviews"})


def get(port: int, tls: UpstreamTls) -> Reply:
    async def once() -> Reply:
        pool = UpstreamPool()
        try:
            return await pool.send(("127.0.0.1", port), request(), 10.0, tls)
        finally:
            pool.close()

    return asyncio.run(once())


def test_a_mesh_peer_with_the_expected_identity_is_served_and_sees_ours(tmp_path):
    results: list[str] = []
    peers: list[str | None] = []
    with tls_backend(tmp_path, issue(REVIEWS, issued_at=NOW), peers) as port:
        response, identity = get(port, mesh_tls(tmp_path, REVIEWS, results))
    assert (response.status_code, response.content) == (200, b"ok")
    assert identity == REVIEWS  # whose peer metadata the sidecar may believe
    assert results == ["ok"] and peers == [FRONTEND, "closed"]


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


def test_connections_made_with_a_rotated_out_certificate_are_not_reused(tmp_path):
    results: list[str] = []
    peers: list[str | None] = []
    before, after = mesh_tls(tmp_path, REVIEWS, results, "old"), mesh_tls(tmp_path, REVIEWS, results, "new")
    assert before.serial != after.serial

    async def rotate(port: int) -> None:
        pool = UpstreamPool()
        assert (await pool.send(("127.0.0.1", port), request(), 10.0, before)).response.status_code == 200
        assert (await pool.send(("127.0.0.1", port), request(), 10.0, after)).response.status_code == 200
        await asyncio.sleep(0.2)  # the old connection's close reaches the server
        pool.close()

    with tls_backend(tmp_path, issue(REVIEWS, issued_at=NOW), peers, connections=2) as port:
        asyncio.run(rotate(port))
    assert results == ["ok", "ok"]  # two handshakes: the second certificate did not ride the first connection
    assert peers[:3] == [FRONTEND, "closed", FRONTEND]  # the first was closed as soon as the new one was needed
