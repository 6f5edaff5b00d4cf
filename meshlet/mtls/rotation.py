"""Follow an identity dir: reload certificate and key when the files change, keep the old on error.

Polling file signatures (inode, size, mtime) rather than inotify because Kubernetes updates
Secret and CSI volumes by swapping a symlinked directory, which stat sees and inotify on the
files does not. A reload that fails (a half-rotated dir: new cert, old key) keeps serving the
previous identity and is retried on the next poll, so rotation never takes the sidecar down.
In local mode (`--ca`) the poll first reissues the certificate when half its lifetime has passed.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from OpenSSL import SSL

from meshlet.mtls.contexts import TlsContexts, build_contexts
from meshlet.mtls.files import LAYOUTS, IdentityError, describe, read_identity
from meshlet.mtls.reissue import Reissuer

log = logging.getLogger(__name__)

Signature = tuple[tuple[int, int, int], ...]
ALL_IDENTITY_FILES = tuple(name for names in LAYOUTS for name in names)


def signature(directory: Path, names: Iterable[str] = ALL_IDENTITY_FILES) -> Signature:
    """What changes when any of the files is replaced or rewritten; missing files count as (0, 0, 0)."""
    sig = []
    for name in names:
        try:
            st = os.stat(directory / name)
        except OSError:
            sig.append((0, 0, 0))
        else:
            sig.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(sig)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class IdentityWatcher:
    """Holds the current `TlsContexts`; `poll()` swaps in new ones after the files changed.

    The swap is one attribute assignment: handshakes starting afterwards use the new identity,
    connections already established keep theirs until they close. An `IdentitySource`
    (meshlet.mtls.source): ready from construction, since the files are read there.
    """

    def __init__(self, directory: Path, alpn_select=None, reissuer: Reissuer | None = None) -> None:
        self.directory = directory
        self._alpn_select = alpn_select
        self.reissuer = reissuer
        self._reissue_error = ""
        self._signature = signature(directory)
        self.current: TlsContexts = self._load()  # IdentityError at start-up: the caller refuses to run
        self.reload_failures = 0

    async def start(self) -> None:
        """Nothing to fetch: the identity was read at construction."""

    def ready(self) -> bool:
        return True

    def describe(self) -> dict:
        return {**describe(self.current.identity), "dir": str(self.directory)}

    def close(self) -> None:
        """Nothing runs in the background."""

    def poll(self, now: dt.datetime | None = None) -> bool:
        """Reload if the files changed since the last successful load; True when swapped."""
        if self.reissuer is not None:
            self._reissue(self.reissuer, now or _now())
        sig = signature(self.directory)
        if sig == self._signature:
            return False
        try:
            contexts = self._load()
        except (IdentityError, ValueError, SSL.Error) as e:  # OpenSSL refusing a pair caught mid-rotation
            self.reload_failures += 1
            log.warning("identity %s not reloaded, keeping serial %s: %s", self.directory,
                        self.current.identity.serial, e)
            return False
        self._signature = sig
        self.current = contexts
        log.info("identity reloaded: %s serial %s until %s", contexts.identity.spiffe_id,
                 contexts.identity.serial, contexts.identity.not_after.isoformat())
        return True

    def _reissue(self, reissuer: Reissuer, now: dt.datetime) -> None:
        if not reissuer.due(self.current.identity.cert, now):
            return
        try:  # a P-256 key and a signature: about a millisecond, so no thread is needed
            reissuer.reissue_if_due(now)
        except (IdentityError, ValueError, OSError) as e:  # keep serving the current certificate; retried next poll
            if str(e) != self._reissue_error:
                log.warning("cannot reissue the workload certificate (retrying): %s", e)
            self._reissue_error = str(e)
        else:
            self._reissue_error = ""

    def _load(self) -> TlsContexts:
        return build_contexts(read_identity(self.directory), self._alpn_select)
