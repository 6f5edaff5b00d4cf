"""Follow an identity dir: reload certificate and key when the files change, keep the old on error.

Polling file signatures (inode, size, mtime) rather than inotify because Kubernetes updates
Secret volumes by swapping a symlinked directory, which stat sees and inotify on the files does not.
A reload that fails (a half-rotated dir: new cert, old key) keeps serving the previous identity
and is retried on the next poll, so rotation never takes the sidecar down.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from OpenSSL import SSL

from meshlet.mtls.contexts import TlsContexts, build_contexts
from meshlet.mtls.files import IDENTITY_FILES, IdentityError, read_identity

log = logging.getLogger(__name__)

Signature = tuple[tuple[int, int, int], ...]


def signature(directory: Path) -> Signature:
    """What changes when any identity file is replaced or rewritten; missing files count as (0, 0, 0)."""
    sig = []
    for name in IDENTITY_FILES:
        try:
            st = os.stat(directory / name)
        except OSError:
            sig.append((0, 0, 0))
        else:
            sig.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(sig)


class IdentityWatcher:
    """Holds the current `TlsContexts`; `poll()` swaps in new ones after the files changed.

    The swap is one attribute assignment: handshakes starting afterwards use the new identity,
    connections already established keep theirs until they close.
    """

    def __init__(self, directory: Path, alpn_select=None,
                 on_change: Callable[[TlsContexts], None] | None = None) -> None:
        self.directory = directory
        self._alpn_select = alpn_select
        self._on_change = on_change
        self._signature = signature(directory)
        self.current = self._load()  # IdentityError at start-up: the caller refuses to run
        self.reload_failures = 0

    def poll(self) -> bool:
        """Reload if the files changed since the last successful load; True when swapped."""
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

    def _load(self) -> TlsContexts:
        contexts = build_contexts(read_identity(self.directory), self._alpn_select)
        if self._on_change is not None:
            self._on_change(contexts)
        return contexts
