"""HTTP/1.1 on the wire for the lean engine: hop-by-hop rules, heads and local answers (the limits
both engines share are meshlet.proxy.http1rules).

Parsing is llhttp's (httptools), which already refuses what RFC 9112 says a proxy must not pass:
Content-Length with Transfer-Encoding, duplicate or malformed Content-Length, bad chunk sizes,
obs-fold, NUL/CR/LF in field values and whitespace before the colon. What llhttp leaves to its
user is here: size limits, transfer codings other than `chunked`, and what a proxy strips.
Everything works on bytes: names are compared lower-cased, values are passed on untouched.
"""

from __future__ import annotations

from collections.abc import Iterable

from meshlet.proxy.http1rules import FRAMING

# RFC 9110 §7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"transfer-encoding", b"upgrade",
))
Header = tuple[bytes, bytes]

REASONS = {
    100: b"Continue", 101: b"Switching Protocols", 200: b"OK", 204: b"No Content", 304: b"Not Modified",
    400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found", 408: b"Request Timeout",
    414: b"URI Too Long", 431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    501: b"Not Implemented", 502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"


class Refusal(Exception):
    """A request the sidecar answers itself with `status` and closes: raised from parser callbacks."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def connection_tokens(headers: Iterable[Header]) -> frozenset[bytes]:
    """Field names listed in Connection (RFC 9110 §7.6.1): hop-by-hop too, but for those the
    message is framed and routed by: a client listing Content-Length must not get its body
    read by the backend as another request."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b","))
    return frozenset(tokens) - FRAMING


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def status_line(status: int, reason: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, reason or REASONS.get(status, b"Status"))


def local_response(status: int, message: str, close: bool, extra: bytes = b"") -> bytes:
    """An answer the sidecar makes itself: short, plain text, saying what happened and what to do."""
    body = (message + "\n").encode("utf-8", "replace")
    return b"%sContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\nX-Meshlet: local\r\n%s%s\r\n%s" % (
        status_line(status), len(body), extra, b"Connection: close\r\n" if close else b"", body,
    )


def field_value(fields: Iterable[Header], wanted: bytes) -> bytes:
    """The first value of a field, by its lower-case name; empty when absent."""
    for name, value in fields:
        if name.lower() == wanted:
            return value
    return b""
