"""A raw HTTP/1.1 client for the conformance tests: exact bytes out, responses parsed back in turn.

http.client normalises what these tests look at (framing, interim responses, pipelining) and
buffers past the end of a response, so the tests speak through a socket and this small reader,
which says how each response was framed and whether the connection was closed after it.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

NO_BODY = (204, 304)


@dataclass(frozen=True)
class Response:
    version: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    framing: str  # length | chunked | close | none

    def field(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n.lower() == name), None)

    def names(self) -> set[str]:
        return {n.lower() for n, _ in self.headers}


class Wire:
    """One client connection; `response()` reads the next response (interim ones included)."""

    def __init__(self, address: tuple[str, int], timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.buf = bytearray()
        self.eof = False

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(262144)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _until(self, marker: bytes) -> bytes:
        while (at := self.buf.find(marker)) < 0:
            if not self._fill():
                raise EOFError(f"connection closed before {marker!r}; got {bytes(self.buf[:200])!r}")
        out = bytes(self.buf[:at])
        del self.buf[:at + len(marker)]
        return out

    def _exactly(self, size: int) -> bytes:
        while len(self.buf) < size:
            if not self._fill():
                raise EOFError(f"connection closed after {len(self.buf)} of {size} body bytes")
        out = bytes(self.buf[:size])
        del self.buf[:size]
        return out

    def response(self, method: str = "GET") -> Response:
        head = self._until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        version, status, _ = (head[0] + " ").split(" ", 2)
        headers = [(n, v.strip()) for n, _, v in (line.partition(":") for line in head[1:])]
        code = int(status)
        fields = {n.lower(): v for n, v in headers}
        if method == "HEAD" or code < 200 or code in NO_BODY:
            return Response(version, code, headers, b"", "none")
        if "chunked" in fields.get("transfer-encoding", "").lower():
            body = bytearray()
            while size := int(self._until(b"\r\n").split(b";")[0], 16):
                body += self._exactly(size)
                self._exactly(2)
            while self._until(b"\r\n"):  # trailer fields
                pass
            return Response(version, code, headers, bytes(body), "chunked")
        if "content-length" in fields:
            return Response(version, code, headers, self._exactly(int(fields["content-length"])), "length")
        while self._fill():
            pass
        body, self.buf = bytes(self.buf), bytearray()
        return Response(version, code, headers, body, "close")

    def some(self, size: int) -> bytes:
        """The first `size` bytes received, unparsed (a response still streaming)."""
        while len(self.buf) < size and self._fill():
            pass
        return bytes(self.buf[:size])

    def final(self, method: str = "GET") -> Response:
        """The next final (non-1xx) response."""
        while (answer := self.response(method)).status < 200:
            pass
        return answer

    def closed(self, timeout: float = 3.0) -> bool:
        """True once the server closed the connection (EOF or reset) with nothing more to read."""
        deadline = time.monotonic() + timeout
        while not self.buf and not self.eof and time.monotonic() < deadline:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                self._fill()
            except TimeoutError:
                break
        return self.eof and not self.buf

    def rest(self, timeout: float = 3.0) -> bytes:
        """Everything until the server closes (or `timeout`): for answers that may not parse."""
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                self._fill()
            except TimeoutError:
                break
        return bytes(self.buf)


def request(address: tuple[str, int], data: bytes, method: str = "GET") -> Response:
    """Send `data` on a new connection; the final response."""
    with Wire(address) as wire:
        wire.send(data)
        return wire.final(method)


def refused(address: tuple[str, int], data: bytes) -> tuple[Response, bool]:
    """Send `data` on a new connection: (the final response, whether the server then closed)."""
    with Wire(address) as wire:
        wire.send(data)
        answer = wire.final()
        return answer, wire.closed()
