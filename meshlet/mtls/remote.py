"""A workload identity from `meshlet identity serve`: key in memory, certificate fetched and renewed.

`meshlet run --identity-server URL --identity-token FILE --trust-bundle FILE`. The private key is
generated in this process for every certificate and lives only in memory (and, for the standard
library's `ssl`, in a memfd: meshlet.mtls.memkey); the CSR carries no name, because the service
names the certificate after the token's ServiceAccount. The token file is read for every request
(the kubelet rotates projected tokens), and the trust bundle file is followed like an identity dir,
so a CA rotation reaches running sidecars. A background thread renews at half the lifetime,
retrying with jittered exponential backoff; `poll()` on the engine's loop swaps in what it got.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import http.client
import logging
import random
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL

from meshlet.mtls.contexts import TlsContexts, build_contexts
from meshlet.mtls.files import Identity, IdentityError, certs_pem, describe, make_identity, read_bundle
from meshlet.mtls.reissue import renew_at
from meshlet.mtls.rotation import signature
from meshlet.mtls.verify import verify_peer
from meshlet.mtls.wire import SIGN_PATH, TRANSIENT, parse_refusal, parse_sign_response, sign_request

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0
BACKOFF_BASE, BACKOFF_CAP = 0.5, 30.0  # seconds


class IdentityRefused(IdentityError):
    """The service refused this workload (its token or its CSR): asking again gets the same answer."""


class Unavailable(Exception):
    """No certificate this time (service unreachable, rate limited, API server down): retry later."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def check_url(url: str) -> str:
    """ValueError unless an https:// URL with a host: a token must never travel in plaintext."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"--identity-server {url!r}: expected an https:// URL, e.g. https://meshlet-identity:15012")
    return url


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise IdentityError(f"cannot read {path}: {e.strerror}") from None
    if not token:
        raise IdentityError(f"{path}: the token file is empty")
    return token


def new_csr(key: ec.EllipticCurvePrivateKey) -> x509.CertificateSigningRequest:
    """A CSR that asks for nothing but a certificate for this key: no subject, no SAN."""
    return x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())


def fetch(url: str, token_file: Path, bundle_file: Path, now: dt.datetime,
          timeout: float = REQUEST_TIMEOUT) -> Identity:
    """One signing round trip with a fresh key. IdentityRefused (final), Unavailable (retry), or
    IdentityError for a local file that cannot be read."""
    token = read_token(token_file)
    bundle = read_bundle(bundle_file)
    key = ec.generate_private_key(ec.SECP256R1())
    parts = urlsplit(url)
    context = ssl.create_default_context(cadata=certs_pem(*bundle).decode())  # names the host: checked
    conn = http.client.HTTPSConnection(parts.hostname or "", parts.port or 443, context=context, timeout=timeout)
    try:
        conn.request("POST", parts.path.rstrip("/") + SIGN_PATH, body=sign_request(new_csr(key)),
                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        response = conn.getresponse()
        status, body = response.status, response.read()
    except (OSError, http.client.HTTPException) as e:
        raise Unavailable(f"cannot reach {url}: {getattr(e, 'reason', None) or e}") from None
    finally:
        conn.close()
    if status != 200:
        refusal = parse_refusal(status, body)
        if refusal is None or refusal.reason in TRANSIENT:
            raise Unavailable(f"{url} answered {status}: {refusal or body[:200].decode(errors='replace')}")
        raise IdentityRefused(f"identity server {url} refused this workload ({refusal.reason}): {refusal.message}")
    try:
        chain = parse_sign_response(body)
        identity = make_identity(chain, key, bundle, url)
    except (ValueError, IdentityError) as e:
        raise Unavailable(f"{url} answered with an unusable certificate: {e}") from None
    verdict = verify_peer(chain, bundle, now)
    if not verdict.ok:  # peers would refuse it too: e.g. signed by a CA our bundle does not hold yet
        raise Unavailable(f"{url} answered with a certificate {bundle_file} does not trust: {verdict.detail}")
    return identity


def retry_delay(failures: int, remaining: float | None, rand: Callable[[], float] = random.random) -> float:
    """Full-jitter exponential backoff (so a fleet that failed together does not retry together),
    never longer than a quarter of what is left of the current certificate's life."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(failures, 16))
    if remaining is not None:
        ceiling = min(ceiling, max(remaining / 4, BACKOFF_BASE))
    return max(0.05, ceiling * rand())


class RemoteIdentity:
    """An `IdentitySource` (meshlet.mtls.source) backed by the identity service.

    `current` is None until the first certificate arrives (`ready()` is False meanwhile: the
    engine refuses mesh TLS and /readyz answers 503). `start()` makes the first request: a
    refusal raises IdentityRefused there, so `meshlet run` exits with that one line; an
    unreachable service is retried in the background like a renewal.
    """

    def __init__(self, url: str, token_file: Path, bundle_file: Path, alpn_select=None,
                 now: Callable[[], dt.datetime] = _now) -> None:
        self.url = check_url(url)
        self.token_file = token_file
        self.bundle_file = bundle_file
        self._alpn_select = alpn_select
        self._now = now
        self._bundle_signature = self._bundle_sig()
        read_bundle(bundle_file)  # IdentityError at start-up when unreadable
        self.current: TlsContexts | None = None
        # Built by the renewal thread, swapped in by poll(): a reference only the thread writes, and
        # one only poll() writes, so no renewal is lost between the two.
        self._latest: TlsContexts | None = None
        self._installed: TlsContexts | None = None
        self._identity: Identity | None = None  # the thread's latest, for its schedule
        self._failures = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._renew)
        except Unavailable as e:
            log.warning("no workload certificate yet (retrying): %s", e)
        self.poll()
        self._thread = threading.Thread(target=self._run, name="meshlet-identity", daemon=True)
        self._thread.start()

    def ready(self) -> bool:
        return self.current is not None

    def describe(self) -> dict:
        if self.current is None:
            return {"identity": None, "server": self.url, "error": self.last_error or "not fetched yet"}
        return {**describe(self.current.identity), "server": self.url}

    def close(self) -> None:
        self._stop.set()

    def poll(self) -> bool:
        """Swap in a renewed certificate or a changed trust bundle; True when swapped."""
        latest = self._latest
        swapped = latest is not self._installed
        if swapped:
            self.current = self._installed = latest
        sig = self._bundle_sig()
        if sig != self._bundle_signature and self.current is not None:
            swapped = self._rebundle() or swapped
            self._bundle_signature = sig
        return swapped

    def _rebundle(self) -> bool:
        assert self.current is not None
        try:
            bundle = read_bundle(self.bundle_file)
            identity = self.current.identity
            rebuilt = Identity(identity.cert, identity.key, bundle, identity.spiffe_id, identity.chain)
            self.current = build_contexts(rebuilt, self._alpn_select)
        except (IdentityError, SSL.Error) as e:  # half-written: keep the old bundle, retry at the next change
            log.warning("trust bundle %s not reloaded: %s", self.bundle_file, e)
            return False
        log.info("trust bundle reloaded: %d CA(s) from %s", len(bundle), self.bundle_file)
        return True

    def _bundle_sig(self) -> tuple:
        return signature(self.bundle_file.parent, (self.bundle_file.name,))

    def _renew(self) -> None:
        """One request; on success the new contexts wait in `_latest` for the next poll."""
        try:
            identity = fetch(self.url, self.token_file, self.bundle_file, self._now())
        except (Unavailable, IdentityError) as e:
            self._failures += 1
            self.last_error = str(e)
            raise
        self._failures, self.last_error = 0, ""
        self._identity = identity
        self._latest = build_contexts(identity, self._alpn_select)
        log.info("workload certificate %s serial %s until %s", identity.spiffe_id, identity.serial,
                 identity.not_after.isoformat())

    def _run(self) -> None:
        while not self._stop.wait(self._delay()):
            try:
                self._renew()
            except (Unavailable, IdentityError) as e:  # keep serving what we hold; retried with backoff
                log.warning("workload certificate not renewed (attempt %d, retrying): %s", self._failures, e)

    def _delay(self) -> float:
        """Seconds until the next request: half the lifetime after issue, or a backoff after a failure."""
        now = self._now()
        held = self._identity
        remaining = None if held is None else (held.not_after - now).total_seconds()
        if self._failures:
            return retry_delay(self._failures, remaining)
        assert held is not None
        return max(0.0, (renew_at(held.cert) - now).total_seconds())
