"""The identity service's HTTPS edge: its own certificate, the sign endpoint, health.

Its serving certificate comes from the mesh CA, so sidecars need nothing but the mesh trust
bundle to check they talk to the real signer before they send their token. It names the
`--listen` host (an IP SAN for an IP) and every `--san` (the chart passes the Service's DNS
names), is renewed at half its lifetime, and is re-issued by the new CA when a rotation switches
signers. Its key, like the workloads', lives in memory only (meshlet.mtls.memkey).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import sys
from collections.abc import Callable, Sequence

from meshlet.identity.service import IdentityService
from meshlet.k8s.server import Handler, TlsServer
from meshlet.mtls.ca import Authority, issue_server
from meshlet.mtls.cadir import CaState
from meshlet.mtls.memkey import load_key_and_chain
from meshlet.mtls.reissue import renew_at
from meshlet.mtls.wire import MAX_BODY, SIGN_PATH


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def serving_names(listen_host: str, sans: Sequence[str]) -> list[str]:
    """The names the serving certificate carries: the listen host unless it is a wildcard address."""
    names = list(dict.fromkeys(sans))
    try:
        wildcard = ipaddress.ip_address(listen_host).is_unspecified
    except ValueError:
        wildcard = False
    if listen_host and not wildcard and listen_host not in names:
        names.insert(0, listen_host)
    if not names:
        raise ValueError(f"--listen {listen_host} names no host: give the names sidecars use with --san NAME")
    return names


class ServingTls:
    """The TLS context for the next connection, re-issued when due or when the signer changed."""

    def __init__(self, names: Sequence[str], ttl: float, cas: Callable[[], CaState],
                 now: Callable[[], dt.datetime] = _now) -> None:
        self.names, self.ttl, self.cas, self._now = tuple(names), ttl, cas, now
        self._signer: Authority | None = None
        self._renew_at = dt.datetime.min.replace(tzinfo=dt.UTC)
        self._context: ssl.SSLContext | None = None
        self()  # a CA that cannot sign for these names fails at start-up

    def __call__(self) -> ssl.SSLContext:
        now = self._now()
        signer = self.cas().signer(now)
        if self._context is None or self._signer is None or signer.cert != self._signer.cert or now >= self._renew_at:
            until_ca_expiry = (signer.cert.not_valid_after_utc - now).total_seconds() - 60
            issued = issue_server(signer, self.names, now, max(1.0, min(self.ttl, until_ca_expiry)))
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            load_key_and_chain(context, issued.key, (issued.cert,))
            self._context, self._signer, self._renew_at = context, signer, renew_at(issued.cert)
        return self._context


def make_server(address: tuple[str, int], service: IdentityService, tls: Callable[[], ssl.SSLContext],
                log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> TlsServer:
    """Bind (port 0 picks a free one); `serve_forever()` serves."""

    class Identity(Handler):
        server_version = "meshlet-identity"

        def do_GET(self) -> None:
            if self.path == "/healthz":
                self.send_body(200, b"ok\n", "text/plain")
            else:
                self.send_body(404, f"not found; POST CSRs to {SIGN_PATH}\n".encode(), "text/plain")

        def do_POST(self) -> None:
            if self.path.split("?", 1)[0] != SIGN_PATH:
                self.send_body(404, f"not found; POST CSRs to {SIGN_PATH}\n".encode(), "text/plain")
                return
            body = self.read_body(MAX_BODY)
            if body is None:
                return
            status, answer, headers = service.handle(self.headers.get("Authorization"), body, self.client_address[0])
            self.send_body(status, answer, "application/json", headers)

    return TlsServer(address, Identity, tls, log, "identity")
