"""The HTTP/2 connection preface and a polite refusal of it, shared by both engines.

Cleartext HTTP/2 (h2c) begins with a fixed preface. Where an engine does not serve h2c, a
prior-knowledge client gets an HTTP/2 SETTINGS frame and a GOAWAY with HTTP_1_1_REQUIRED and a
reason its library can show, instead of a confusing error or a silent close.
"""

from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HTTP_1_1_REQUIRED = 0xD
REASON = b"meshlet: cleartext HTTP/2 (h2c) is not supported; use HTTP/1.1 or HTTP/2 over TLS"


def _frame(kind: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, 0]) + struct.pack(">I", 0) + payload


GOODBYE = _frame(0x4, b"") + _frame(0x7, struct.pack(">II", 0, HTTP_1_1_REQUIRED) + REASON)
