"""Hand a private key to the standard library's `ssl` without writing it to any file system.

`SSLContext.load_cert_chain` reads paths only. A memfd is an anonymous file in memory: its
`/proc/self/fd/N` path works as a path, it exists on no disk (nor in /tmp, nor in a Pod's
writable layer) and vanishes when closed. Workload keys must never be stored, so this is the
one way meshlet loads a key into `ssl` (the identity service's own key too).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Sequence

from cryptography import x509

from meshlet.mtls.files import PrivateKey, certs_pem, key_pem


def load_key_and_chain(context: ssl.SSLContext, key: PrivateKey, chain: Sequence[x509.Certificate]) -> None:
    """`context.load_cert_chain` for a key and certificates (leaf first) held in memory."""
    fd = os.memfd_create("meshlet-identity", os.MFD_CLOEXEC)
    try:
        os.write(fd, key_pem(key) + certs_pem(*chain))
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
