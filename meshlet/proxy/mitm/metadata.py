"""Peer metadata exchange (meshlet.proxy.peermeta) on mitmproxy's messages.

The header is read and written on the raw fields: it is looked for on every request and every
response, and mitmproxy's `Headers` API decodes through a multidict per call. A message that
carries the header twice is read as carrying none (whoever sent it is not a sidecar).
"""

from __future__ import annotations

from mitmproxy import http

from meshlet.proxy import peermeta
from meshlet.proxy.peermeta import HEADER
from meshlet.telemetry.outcome import Workload


def take(message: http.Message) -> bytes | None:
    """Remove the header from `message`; its value when it was there exactly once."""
    headers = message.data.headers
    found = [value for name, value in headers.fields if name.lower() == HEADER]
    if not found:
        return None
    headers.fields = tuple((name, value) for name, value in headers.fields if name.lower() != HEADER)
    return found[0] if len(found) == 1 else None


def put(message: http.Message, value: bytes) -> None:
    """Set the header to `value`, replacing whatever was there."""
    take(message)
    message.data.headers.fields += ((HEADER, value),)


def vouched(said: bytes | None, identity: str) -> Workload | None:
    """Who answered, as its metadata says, when its certificate (`identity`, "" without mesh mTLS)
    vouches for it; None otherwise (then the policy's declaration of the backend stands)."""
    decoded = peermeta.decode(said) if said and identity else None
    return None if decoded is None else peermeta.trusted(decoded, identity)[0]
