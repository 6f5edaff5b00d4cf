"""A CA dir over time: the CA that signs now, the one that takes over once a rotation's grace
period has passed, and the trust bundle that holds both meanwhile.

Files: `ca.pem`/`ca-key.pem` (signing), `bundle.pem` (every root sidecars must trust; `ca.pem`
alone when absent) and, after `meshlet ca rotate`, `next.pem`/`next-key.pem`/`next-from` (the
incoming CA and the RFC 3339 time from which it signs). The dir says *when* to switch instead of
being rewritten at switch time, so it works as a read-only Kubernetes Secret volume: every
identity-service replica switches by its clock, and nothing has to write at that moment.

Why a grace period: a sidecar trusts a certificate only once its bundle holds the issuing CA,
and the new bundle reaches sidecars with a delay (a ConfigMap volume syncs within about a minute,
then the sidecar's poll). Signing with the new CA before that would break their handshakes.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from meshlet.mtls.ca import Authority, new_authority
from meshlet.mtls.files import (
    CA_CERT,
    CA_KEY,
    IdentityError,
    certs_pem,
    key_pem,
    read_authority,
    read_bundle,
    write_file,
)

BUNDLE_FILE = "bundle.pem"
NEXT_CERT, NEXT_KEY, NEXT_FROM = "next.pem", "next-key.pem", "next-from"
CA_DIR_FILES = (CA_CERT, CA_KEY, BUNDLE_FILE, NEXT_CERT, NEXT_KEY, NEXT_FROM)


@dataclass(frozen=True)
class CaState:
    """What a CA dir holds; `signer(now)` is the CA that signs at `now`."""

    current: Authority
    bundle: tuple[x509.Certificate, ...]
    next: Authority | None = None
    next_from: dt.datetime | None = None

    def signer(self, now: dt.datetime) -> Authority:
        if self.next is not None and self.next_from is not None and now >= self.next_from:
            return self.next
        return self.current


def read_ca_dir(directory: Path) -> CaState:
    """IdentityError names the first unusable file (a half-written rotation is retried by callers)."""
    current = read_authority(directory)
    bundle = read_bundle(directory / BUNDLE_FILE) if (directory / BUNDLE_FILE).exists() else (current.cert,)
    if current.cert not in bundle:
        raise IdentityError(f"{directory / BUNDLE_FILE}: does not hold {CA_CERT}; its workloads would not be trusted")
    if not (directory / NEXT_FROM).exists():
        return CaState(current, bundle)
    incoming = read_authority(directory, NEXT_CERT, NEXT_KEY)
    if incoming.cert not in bundle:
        raise IdentityError(f"{directory / BUNDLE_FILE}: does not hold {NEXT_CERT}")
    return CaState(current, bundle, incoming, _read_time(directory / NEXT_FROM))


def rotate(directory: Path, now: dt.datetime, grace: dt.timedelta) -> CaState:
    """Add a new CA to the bundle now; it signs from `now + grace`. Refuses while a rotation is pending."""
    state = read_ca_dir(directory)
    if state.next is not None:
        raise IdentityError(f"{directory}: a rotation is already under way (the new CA signs from "
                            f"{state.next_from:%Y-%m-%dT%H:%M:%SZ}); finish it first with --finish")
    incoming = new_authority(now, name=f"meshlet mesh CA {now:%Y-%m-%dT%H:%M:%SZ}")
    bundle = (*state.bundle, incoming.cert)
    write_file(directory / NEXT_KEY, key_pem(incoming.key), 0o600)
    write_file(directory / NEXT_CERT, certs_pem(incoming.cert), 0o644)
    write_file(directory / BUNDLE_FILE, certs_pem(*bundle), 0o644)
    write_file(directory / NEXT_FROM, f"{(now + grace).isoformat()}\n".encode(), 0o644)  # last: it arms the switch
    return CaState(state.current, bundle, incoming, now + grace)


def finish_rotation(directory: Path, now: dt.datetime) -> CaState:
    """Make the new CA the only one: `ca.pem` becomes it and the old root leaves the bundle.

    Run it once every certificate the old CA signed has expired (one workload TTL after the
    switch): until then, peers still present them. Refused before the switch itself.
    """
    state = read_ca_dir(directory)
    if state.next is None or state.next_from is None:
        raise IdentityError(f"{directory}: no rotation under way (run `meshlet ca rotate` first)")
    if now < state.next_from:
        raise IdentityError(f"{directory}: the new CA signs only from {state.next_from:%Y-%m-%dT%H:%M:%SZ}; "
                            "finish after that and one workload certificate lifetime more")
    incoming = state.next
    write_file(directory / CA_KEY, key_pem(incoming.key), 0o600)
    write_file(directory / CA_CERT, certs_pem(incoming.cert), 0o644)
    write_file(directory / BUNDLE_FILE, certs_pem(incoming.cert), 0o644)
    for name in (NEXT_FROM, NEXT_CERT, NEXT_KEY):  # NEXT_FROM first: it disarms the switch
        os.unlink(directory / name)
    return CaState(incoming, (incoming.cert,))


def _read_time(path: Path) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(path.read_text().strip())
    except OSError as e:
        raise IdentityError(f"cannot read {path}: {e.strerror}") from None
    except ValueError:
        raise IdentityError(f"{path}: expected an RFC 3339 time, e.g. 2026-01-01T00:00:00+00:00") from None
    if when.tzinfo is None:
        raise IdentityError(f"{path}: the time needs a UTC offset")
    return when
