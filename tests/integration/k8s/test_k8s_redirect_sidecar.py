"""A real sidecar behind the injected iptables redirect: what a Pod's app sends anywhere still arrives.

The Pod namespace runs `meshlet run` as the sidecar's UID (so its own connections are not
captured) and the init container's script; the peer namespace runs a TLS server offering
HTTP/2, a byte-echo server standing in for a database, and a plain HTTP server. The app's
connections are redirected to the outbound listener like in a Pod: HTTP is routed by Host,
TLS and other protocols are relayed to their original destination (SO_ORIGINAL_DST) untouched.
"""

from __future__ import annotations

import datetime as dt
import sys
import tempfile
from pathlib import Path

import pytest
from podnet_support import NEEDS, PEER_IP, POD_IP, pod_network, sh

from meshlet.mtls.ca import issue_workload, new_authority
from meshlet.mtls.files import write_identity

pytestmark = [*NEEDS, pytest.mark.timeout(120)]
SERVER_ID = "spiffe://example.test/ns/ext/sa/payments"
POLICY = (  # HTTP for `reviews` goes to the peer's 8080, like any other host would
    "apiVersion: meshlet.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: reviews}\n"
    'spec: {host: reviews, backends: {v1: {address: "192.0.2.2:8080"}}, routes: [{name: all, to: [{backend: v1}]}]}\n'
)

PEER = r"""
import socket, ssl, sys, threading
cert, key = sys.argv[1:3]
tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); tls.load_cert_chain(cert, key); tls.set_alpn_protocols(["h2", "http/1.1"])
def listen(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", port)); s.listen(16)
    return s
def serve(port, handle):
    s = listen(port)
    def loop():
        while True:
            c, _ = s.accept()
            threading.Thread(target=handle, args=(c,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()
def https(c):
    with tls.wrap_socket(c, server_side=True) as t:
        if t.selected_alpn_protocol() == "http/1.1" and t.recv(4096):
            t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\npayments")
def echo(c):
    with c:
        c.sendall(b"echo:" + c.recv(4096))
def http(c):
    with c:
        c.recv(4096)
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\npeer")
serve(443, https); serve(5432, echo); serve(8080, http)
print("ready", flush=True)
sys.stdin.read()
"""
APP = r"""
import socket, sys, threading
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", port)); s.listen(16)
    def loop():
        while True:
            c, _ = s.accept()
            with c:
                c.recv(4096)
                body = f"app:{port}".encode()
                c.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    threading.Thread(target=loop, daemon=True).start()
for port in sys.argv[1:]:
    serve(int(port))
print("ready", flush=True)
sys.stdin.read()
"""
TLS_CLIENT = r"""
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[1]); ctx.check_hostname = False; ctx.set_alpn_protocols(sys.argv[2].split(","))
with ctx.wrap_socket(socket.create_connection(("192.0.2.2", 443), timeout=10)) as t:
    print(t.selected_alpn_protocol(), t.getpeercert(binary_form=True).hex())
    if t.selected_alpn_protocol() == "http/1.1":
        t.sendall(b"GET / HTTP/1.1\r\nHost: payments\r\n\r\n")
        answer = b""
        while chunk := t.recv(4096):
            answer += chunk
        print(answer.decode().split("\r\n\r\n")[-1])
"""
RAW_CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
c.sendall(bytes.fromhex(sys.argv[3]))
data = b""
while chunk := c.recv(4096):
    data += chunk
print(data.decode("latin-1"))
"""


@pytest.fixture(scope="module")
def pod():
    now = dt.datetime.now(dt.UTC)
    authority = new_authority(now - dt.timedelta(minutes=5), name="example CA")
    with tempfile.TemporaryDirectory(prefix="meshlet-podnet-") as tmp, pod_network() as net:
        work = Path(tmp)
        write_identity(work / "tls", issue_workload(authority, SERVER_ID, now), authority.cert)
        net.start(net.peer, PEER, str(work / "tls" / "cert.pem"), str(work / "tls" / "key.pem"))
        net.start(net.pod, APP, "8080", "9090")  # the app: two ports, `--app` names only the first
        log = net.run_sidecar(work, POLICY)
        net.install_redirect()
        yield net, work / "tls" / "ca.pem", log


def app(net, script: str, *args: str) -> str:
    """Run `script` as the app would: root in the Pod namespace, so iptables redirects it."""
    result = sh("ip", "netns", "exec", net.pod, sys.executable, "-c", script, *args, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_https_to_an_outside_server_keeps_its_certificate_and_http2(pod):
    from cryptography import x509

    from meshlet.mtls.verify import identity_of

    net, trust, log = pod
    alpn, der = app(net, TLS_CLIENT, str(trust), "h2,http/1.1").split()
    assert alpn == "h2"
    assert identity_of(x509.load_der_x509_certificate(bytes.fromhex(der))) == SERVER_ID
    assert app(net, TLS_CLIENT, str(trust), "http/1.1").splitlines()[-1] == "payments"
    assert "TLS handshake failed" not in log.read_text()


def test_a_non_http_protocol_reaches_its_server(pod):
    net, _, _ = pod
    startup = "0000000804d2162f"  # PostgreSQL's SSLRequest: binary, client speaks first
    assert app(net, RAW_CLIENT, PEER_IP, "5432", startup).encode("latin-1") == b"echo:" + bytes.fromhex(startup)


def test_http_is_still_routed_by_policy_and_unknown_hosts_pass_through(pod):
    net, _, log = pod
    for host in ("reviews", f"{PEER_IP}:8080"):
        request = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode().hex()
        answer = app(net, RAW_CLIENT, PEER_IP, "8080", request)
        assert answer.startswith("HTTP/1.1 200") and answer.endswith("peer"), (host, answer)
    assert "Traceback" not in log.read_text()


def test_inbound_requests_reach_the_app_port_they_were_sent_to(pod):
    net, _, log = pod
    for port in (8080, 9090):
        request = f"GET / HTTP/1.1\r\nHost: {POD_IP}:{port}\r\nConnection: close\r\n\r\n".encode().hex()
        result = sh("ip", "netns", "exec", net.peer, sys.executable, "-c", RAW_CLIENT, POD_IP, str(port), request)
        assert result.stdout.strip().endswith(f"app:{port}"), (port, result.stdout, log.read_text()[-2000:])
