"""Local mode: a sidecar given the CA dir (`meshlet run --ca DIR`) reissues its own certificate.

Where no control plane rotates identity dirs (a laptop, a VM, the demo), the sidecar renews its
workload certificate itself once half of its lifetime has passed — Istio's default grace ratio —
keeping the SPIFFE ID and the lifetime, and writes it into its identity dir. The rotation watcher
then loads it like any other rotation: new handshakes present the new certificate, established
connections keep theirs. A lock file makes the `--workers` processes reissue once, not N times
(two writers could otherwise leave one's certificate next to the other's key).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
from pathlib import Path

from cryptography import x509

from meshlet.mtls.ca import BACKDATE, Authority, Issued, issue_workload
from meshlet.mtls.files import IdentityError, read_authority, read_identity, write_identity

log = logging.getLogger(__name__)

RENEW_RATIO = 0.5  # renew once this share of the lifetime has passed (Istio: SECRET_GRACE_PERIOD_RATIO)
LOCK = ".reissue.lock"


def lifetime(cert: x509.Certificate) -> dt.timedelta:
    """The lifetime the certificate was issued for (its not-before is backdated for clock skew)."""
    return cert.not_valid_after_utc - (cert.not_valid_before_utc + BACKDATE)


def renew_at(cert: x509.Certificate, ratio: float = RENEW_RATIO) -> dt.datetime:
    return cert.not_valid_before_utc + BACKDATE + lifetime(cert) * ratio


class Reissuer:
    """Renews the certificate in `identity_dir` from the CA in `ca_dir` when it is due.

    Raises IdentityError at construction when the CA is unreadable or is not the CA the identity's
    trust bundle names (peers would refuse what it issues), so `meshlet run` refuses to start.
    """

    def __init__(self, identity_dir: Path, ca_dir: Path, ratio: float = RENEW_RATIO) -> None:
        self.identity_dir = identity_dir
        self.ratio = ratio
        self.authority: Authority = read_authority(ca_dir)
        if self.authority.cert not in read_identity(identity_dir).bundle:
            raise IdentityError(f"{ca_dir}: this CA is not in {identity_dir / 'ca.pem'}; "
                                "peers would not trust what it issues")

    def due(self, cert: x509.Certificate, now: dt.datetime) -> bool:
        return now >= renew_at(cert, self.ratio)

    def reissue_if_due(self, now: dt.datetime) -> Issued | None:
        """Under the dir's lock, renew if the certificate on disk is (still) due; the new one or None."""
        fd = os.open(self.identity_dir / LOCK, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            identity = read_identity(self.identity_dir)  # another worker may have renewed it already
            if not self.due(identity.cert, now):
                return None
            ttl = lifetime(identity.cert).total_seconds()
            issued = issue_workload(self.authority, identity.spiffe_id, now, ttl)
            write_identity(self.identity_dir, issued, self.authority.cert)
        finally:
            os.close(fd)  # releases the lock
        log.info("reissued %s: serial %x until %s", identity.spiffe_id, issued.cert.serial_number,
                 issued.cert.not_valid_after_utc.isoformat())
        return issued
