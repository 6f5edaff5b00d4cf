"""The identity service without its transport: one signing request in, (status, JSON body) out.

It follows the CA dir (a Secret volume in Kubernetes): a changed dir is read again at most once
a second, and a half-written one keeps the previous CAs, so `meshlet ca rotate` and the kubelet's
volume updates never interrupt signing. Which CA signs is decided per request by the clock
(meshlet.mtls.cadir), so every replica switches at the same moment after a rotation's grace period.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from meshlet.identity.ratelimit import RateLimiter
from meshlet.identity.signer import bearer, check_csr, sign, spiffe_id_for
from meshlet.k8s.kube import KubeError
from meshlet.k8s.tokenreview import Review
from meshlet.mtls.cadir import CA_DIR_FILES, CaState, read_ca_dir
from meshlet.mtls.files import IdentityError
from meshlet.mtls.rotation import signature
from meshlet.mtls.wire import Refusal, parse_sign_request, sign_response
from meshlet.telemetry.identity import IdentityMetrics

log = logging.getLogger("meshlet.identity")

RELOAD_SECONDS = 1.0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CaFollower:
    """The CA dir's current state; IdentityError at construction when it is unusable."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._signature = signature(directory, CA_DIR_FILES)
        self._state = read_ca_dir(directory)
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self) -> CaState:
        with self._lock:
            if time.monotonic() - self._checked >= RELOAD_SECONDS:
                self._checked = time.monotonic()
                self._reload()
            return self._state

    def _reload(self) -> None:
        sig = signature(self.directory, CA_DIR_FILES)
        if sig == self._signature:
            return
        try:
            state = read_ca_dir(self.directory)
        except IdentityError as e:  # mid-update: keep signing with what we had, look again next time
            log.warning("CA dir %s not reloaded, keeping the previous CAs: %s", self.directory, e)
            return
        self._signature, self._state = sig, state
        log.info("CA dir reloaded: %d CA(s) in the bundle%s", len(state.bundle),
                 f", the new one signs from {state.next_from.isoformat()}" if state.next_from else "")


class IdentityService:
    def __init__(self, cas: Callable[[], CaState], reviewer: Callable[[str], Review], metrics: IdentityMetrics,
                 *, ttl: float, trust_domain: str, limiter: RateLimiter,
                 now: Callable[[], dt.datetime] = _now) -> None:
        self.cas = cas
        self.reviewer = reviewer
        self.metrics = metrics
        self.ttl = ttl
        self.trust_domain = trust_domain
        self.limiter = limiter
        self._now = now

    def handle(self, authorization: str | None, body: bytes, peer: str = "") -> tuple[int, bytes, dict[str, str]]:
        """(status, JSON body, extra headers) for one `POST /v1/sign`."""
        try:
            return 200, self._sign(authorization, body), {}
        except Refusal as refusal:
            self.metrics.refused.labels(refusal.reason).inc()
            log.info("refused %s: %s", peer or "a caller", refusal)
            headers = {} if refusal.retry_after is None else {"Retry-After": str(max(1, round(refusal.retry_after)))}
            return refusal.status, refusal.body(), headers

    def _sign(self, authorization: str | None, body: bytes) -> bytes:
        token = bearer(authorization)
        try:
            review = self.reviewer(token)
        except KubeError as e:
            raise Refusal("review_failed", f"cannot review the token: {e}") from None
        spiffe_id = spiffe_id_for(review, self.trust_domain)
        wait = self.limiter.take(spiffe_id)
        if wait is not None:
            raise Refusal("rate_limited", f"{spiffe_id} asks too often; retry in {wait:.1f}s", wait)
        csr = check_csr(parse_sign_request(body), spiffe_id)
        now = self._now()
        authority = self.cas().signer(now)
        cert = sign(authority, csr, spiffe_id, now, self.ttl)
        self.metrics.issued.inc()
        self.metrics.signing_ca_expiry.set(authority.cert.not_valid_after_utc.timestamp())
        log.info("issued %s serial %x until %s", spiffe_id, cert.serial_number, cert.not_valid_after_utc.isoformat())
        return sign_response((cert,), spiffe_id, cert.not_valid_after_utc)
