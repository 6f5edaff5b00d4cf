"""HTTPS the app originates through the sidecar (HTTP_PROXY / CONNECT) reaches the real server:
its certificate, its ALPN (HTTP/2 included), end to end, never mitmproxy's own CA."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from sidecar_support import free_port, policy, run_sidecar

from meshlet.mtls.ca import issue_workload, new_authority
from meshlet.mtls.files import write_identity
from meshlet.mtls.verify import identity_of

pytestmark = pytest.mark.timeout(60)
SERVER_ID = "spiffe://example.test/ns/ext/sa/payments"  # the name in the server's own certificate
ROUTES = "    - name: all\n      to: [{backend: v1}]\n"


@pytest.fixture(scope="module")
def https_server(tmp_path_factory) -> Iterator[tuple[int, Path, list[str]]]:
    """A TLS server offering h2 and http/1.1; logs each negotiated ALPN, answers HTTP/1.1."""
    directory = tmp_path_factory.mktemp("https")
    now = dt.datetime.now(dt.UTC)
    authority = new_authority(now - dt.timedelta(minutes=5), name="example CA")
    write_identity(directory, issue_workload(authority, SERVER_ID, now), authority.cert)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    context.set_alpn_protocols(["h2", "http/1.1"])
    listener = socket.create_server(("127.0.0.1", 0))
    negotiated: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    negotiated.append(tls.selected_alpn_protocol() or "")
                    if negotiated[-1] == "http/1.1" and tls.recv(65536):
                        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\npayments")
            except (OSError, ssl.SSLError):
                negotiated.append("failed")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], directory / "ca.pem", negotiated
    finally:
        stop.set()
        thread.join(5)
        listener.close()


@pytest.fixture(scope="module")
def sidecar(engine):
    with run_sidecar(policy("reviews", {"v1": 9}, ROUTES)) as s:
        yield s


@contextmanager
def through_proxy(sidecar, port: int, trust: Path, alpn: list[str]) -> Iterator[ssl.SSLSocket]:
    """CONNECT through the sidecar's outbound listener, then TLS to the server inside the tunnel."""
    raw = socket.create_connection(sidecar.outbound, timeout=10)
    raw.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = raw.recv(4096)
        assert chunk, head
        head += chunk
    assert head.split(b"\r\n")[0].split(b" ")[1] == b"200", head
    context = ssl.create_default_context(cafile=str(trust))
    context.check_hostname = False  # the server is named by a URI SAN, as a mesh peer would be
    context.set_alpn_protocols(alpn)
    with context.wrap_socket(raw) as tls:
        yield tls


def test_the_apps_tls_reaches_the_server_with_its_certificate_and_http2(sidecar, https_server):
    port, trust, negotiated = https_server
    with through_proxy(sidecar, port, trust, ["h2", "http/1.1"]) as tls:
        assert tls.selected_alpn_protocol() == "h2"
        assert identity_of(x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))) == SERVER_ID
    deadline = time.monotonic() + 5
    while "h2" not in negotiated:  # the server's side of the same handshake, logged by its thread
        assert time.monotonic() < deadline, negotiated
        time.sleep(0.02)


def test_https_requests_flow_through_the_tunnel(sidecar, https_server):
    port, trust, _ = https_server
    with through_proxy(sidecar, port, trust, ["http/1.1"]) as tls:
        tls.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"payments")
    assert "TLS handshake failed" not in sidecar.stderr()


def test_plaintext_grpc_through_the_sidecar_as_http_proxy_reaches_its_server(sidecar, engine):
    """grpcio with `http_proxy` set opens a CONNECT tunnel and speaks h2c inside it: both engines
    relay it to the tunnel's target (the mitmproxy engine, which cannot read h2c, untouched)."""
    grpc = pytest.importorskip("grpc", reason="needs grpcio (the test extra of pyproject.toml)")
    from concurrent import futures

    echo = grpc.method_handlers_generic_handler("meshlet.test.Echo", {
        "Say": grpc.unary_unary_rpc_method_handler(lambda request, context: b"echo:" + request)})
    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[echo])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    def call(proxy: str) -> bytes:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.http_proxy", proxy)]) as channel:
            return channel.unary_unary("/meshlet.test.Echo/Say")(b"hi", timeout=10)

    try:
        with pytest.raises(grpc.RpcError):  # proof that the channel goes through its proxy, loopback or not
            call(f"http://127.0.0.1:{free_port()}")
        assert call(f"http://{sidecar.outbound[0]}:{sidecar.outbound[1]}") == b"echo:hi"
    finally:
        server.stop(None)
    if engine == "mitmproxy":
        assert f"to 127.0.0.1:{port} at L4: policy does not apply to it" in sidecar.stderr()
