"""A mesh for the mTLS tests: a CA, identity dirs, an app that echoes the peer identity, raw TLS clients.

The sidecars are real `meshlet run` processes, started with the sidecar tests' `run_sidecar`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import http.client
import socket
import ssl
import sys
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "sidecar"))

from sidecar_support import MESHLET, Client, Tap, admin, load, run_sidecar

from meshlet.mtls.ca import Authority, issue_workload, new_authority
from meshlet.mtls.files import write_identity
from meshlet.proxy import httpserver
from meshlet.proxy.httpserver import Reply, Request

__all__ = ["MESHLET", "Client", "Tap", "admin", "load", "run_sidecar"]

FRONTEND = "spiffe://cluster.local/ns/default/sa/frontend"
REVIEWS = "spiffe://cluster.local/ns/default/sa/reviews"
RATINGS = "spiffe://cluster.local/ns/default/sa/ratings"
HEADER = "x-meshlet-peer-identity"
REFUSED = (ssl.SSLError, ConnectionError, http.client.HTTPException, TimeoutError)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Mesh:
    root: Path
    ca: Authority
    other_ca: Authority

    def identity(self, name: str, spiffe_id: str, *, ca: Authority | None = None,
                 issued_at: dt.datetime | None = None, ttl: float = 3600.0) -> Path:
        """An identity dir as `meshlet cert issue` writes it (bundle = the mesh CA)."""
        issued = issue_workload(ca or self.ca, spiffe_id, issued_at or now(), ttl)
        directory = self.root / name
        write_identity(directory, issued, self.ca.cert)
        return directory


def make_mesh(root: Path) -> Mesh:
    return Mesh(root, new_authority(now()), new_authority(now(), name="another CA"))


class EchoApp:
    """The app behind the inbound sidecar: answers `NAME <identity header or ->`."""

    def __init__(self, name: str = "app") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(httpserver.start(self._handle, "127.0.0.1", 0), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]
        self.name = name
        self.seen: Counter[str] = Counter()

    async def _handle(self, request: Request) -> Reply:
        """`/sleep/SECONDS` answers late, `/status/CODE` with that code; every path is counted."""
        self.seen[request.path] += 1
        kind, _, value = request.path.strip("/").partition("/")
        if kind == "sleep":
            await asyncio.sleep(float(value))
        code = int(value) if kind == "status" else 200
        return Reply(code, f"{self.name} {request.headers.get(HEADER, '-')}\n".encode())

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def tls_context(identity: Path | None, trust: Path) -> ssl.SSLContext:
    """A raw client: presents `identity` (None = no certificate), trusts `trust`'s ca.pem, no hostname."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(trust / "ca.pem")
    if identity is not None:
        ctx.load_cert_chain(identity / "cert.pem", identity / "key.pem")
    return ctx


def https_get(address: tuple[str, int], ctx: ssl.SSLContext, headers: Mapping[str, str] | None = None,
              path: str = "/") -> tuple[int, str]:
    conn = http.client.HTTPSConnection(*address, context=ctx, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": "app", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def http_get(address: tuple[str, int], headers: Mapping[str, str] | None = None, host: str = "app",
             path: str = "/") -> tuple[int, str]:
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host, **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def plaintext_answer(address: tuple[str, int]) -> bytes:
    """Send a plaintext request on a raw socket; return whatever comes back before the close."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        return data


def traffic_policy(name: str, host: str, backend: str, *, tls: str = "none", identity: str | None = None,
                   mode: str | None = None, allow: tuple[str, ...] = (), route: str = "") -> str:
    """One backend `b`, one route `all`; `route` adds fields to it (flow style, e.g. `timeout: 1s`)."""
    extra = f", tls: {tls}" + (f', identity: "{identity}"' if identity else "")
    text = (
        f"apiVersion: meshlet.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}}}\nspec:\n"
        f"  host: {host}\n  backends:\n    b: {{address: \"{backend}\"{extra}}}\n"
        "  routes:\n    - name: all\n      to: [{backend: b, weight: 100}]\n"
        + (f"      {route}\n" if route else "")
    )
    if mode:
        text += f"  mtls: {{mode: {mode}, allow: [{', '.join(repr(a) for a in allow)}]}}\n"
    return text
