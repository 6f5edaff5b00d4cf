"""HTTP/1.1 limits and framing rules both engines enforce alike (one conformance suite).

The lean engine applies them while it feeds httptools (meshlet.proxy.lean.http1); the mitmproxy
engine after mitmproxy parsed a head (meshlet.proxy.mitm.strict, meshlet.proxy.mitm.forwarding).
"""

from __future__ import annotations

MAX_HEAD_BYTES = 64 * 1024  # the whole header section (431 beyond; Envoy's default is 60 KiB)
MAX_HEADERS = 100  # header fields per message (431 beyond; Envoy's default)
MAX_TARGET_BYTES = 16 * 1024  # the request target (414 beyond)

# Fields a message is framed and routed by: never dropped for being listed in Connection.
FRAMING = frozenset((b"content-length", b"transfer-encoding", b"host"))
