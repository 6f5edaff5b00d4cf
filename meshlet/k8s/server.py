"""The webhook's HTTPS edge: TLS, HTTP framing and logging around `admission.review`.

The standard library's threading HTTP server is enough: the API server sends one small
review per Pod creation and closes. Bodies are bounded so a client cannot exhaust memory.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from meshlet.k8s import admission
from meshlet.k8s.sidecar import InjectConfig

MAX_BODY = 8 * 1024 * 1024  # the API server's own request limit is 3 MiB


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """Raises OSError/ssl.SSLError naming the problem; the command turns it into one line."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


class ReloadingContext:
    """The TLS context for the certificate files as they are now.

    cert-manager and Secret volume updates replace the files under a running webhook; checking
    their stat on each new connection picks up the new certificate without a restart. A
    half-written pair fails to load and the previous context stays in use.
    """

    def __init__(self, cert: str, key: str, log: Callable[[str], None] = lambda line: None):
        self.cert, self.key, self.log = cert, key, log
        self._stamp = self._stat()
        self._context = tls_context(cert, key)  # the first load's errors go to the caller

    def _stat(self) -> tuple:
        try:
            return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in map(os.stat, (self.cert, self.key)))
        except OSError:
            return ()

    def __call__(self) -> ssl.SSLContext:
        stamp = self._stat()
        if stamp and stamp != self._stamp:
            try:
                self._context = tls_context(self.cert, self.key)
                self.log(f"webhook: reloaded TLS certificate {self.cert}")
            except (OSError, ssl.SSLError) as e:
                self.log(f"webhook: keeping the previous certificate, cannot load {self.cert}: {e}")
            self._stamp = stamp
        return self._context


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with bounded bodies and no stock access log (callers log one line per request)."""

    protocol_version = "HTTP/1.1"
    timeout = 30  # a client that stalls mid-request loses its thread, not the server

    def read_body(self, limit: int) -> bytes | None:
        """The request body, or None after answering 411/413 for a missing or oversized one."""
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            self.send_body(411, b"Content-Length required\n", "text/plain")
            return None
        if int(length) > limit:
            self.send_body(413, f"body over {limit} bytes\n".encode(), "text/plain")
            self.close_connection = True
            return None
        return self.rfile.read(int(length))

    def send_body(self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class TlsServer(ThreadingHTTPServer):
    """A threading HTTPS server that asks `context()` for the TLS context at each connection
    (so a renewed certificate serves the next one) and does the handshake in the handler's thread."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[Handler], context: Callable[[], ssl.SSLContext],
                 log: Callable[[str], None], name: str) -> None:
        self.context, self.log, self.name = context, log, name
        super().__init__(address, handler)

    def get_request(self):
        sock, addr = super().get_request()
        # Headers and body go out as separate writes; without this, Nagle plus the client's
        # delayed ACK add ~40 ms to every answer.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.context().wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        self.log(f"{self.name}: connection from {client_address[0]} failed: {exc!r}")


def make_server(
    address: tuple[str, int], context: Callable[[], ssl.SSLContext], cfg: InjectConfig, *, fail_open: bool = True,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> ThreadingHTTPServer:
    """Bind (port 0 picks a free one) and return the server; call `serve_forever()` to serve.

    `context` is asked for the TLS context at each connection (a `ReloadingContext`).
    """

    class Webhook(Handler):
        server_version = "meshlet-webhook"

        def do_GET(self) -> None:
            if self.path == "/healthz":
                self.send_body(200, b"ok\n", "text/plain")
            else:
                self.send_body(404, b"not found\n", "text/plain")

        def do_POST(self) -> None:
            if self.path.split("?", 1)[0] != "/mutate":
                self.send_body(404, b"not found; POST AdmissionReviews to /mutate\n", "text/plain")
                return
            body = self.read_body(MAX_BODY)
            if body is None:
                return
            try:
                request = admission.parse(body)["request"]
            except admission.WebhookError as e:
                log(f"webhook: 400 from {self.client_address[0]}: {e}")
                self.send_body(400, f"bad AdmissionReview: {e}\n".encode(), "text/plain")
                return
            answer = admission.review(request, cfg, fail_open=fail_open)
            response = answer["response"]
            verdict = "patched" if "patch" in response else "allowed" if response["allowed"] else "denied"
            log(f"webhook: {verdict} {request.get('namespace', '')} uid={request['uid']}"
                + "".join(f"; {w}" for w in response.get("warnings", [])))
            self.send_body(200, json.dumps(answer).encode(), "application/json")

    return TlsServer(address, Webhook, context, log, "webhook")


def serve_until_signalled(server: ThreadingHTTPServer, name: str, banner: str) -> None:
    """Serve in a thread until SIGTERM or SIGINT, saying `name: serving https://HOST:PORT<banner>`
    on stderr once listening (what tests and operators wait for), then shut down cleanly."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    host, port = server.server_address[:2]
    print(f"{name}: serving https://{host}:{port}{banner}", file=sys.stderr, flush=True)
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
