"""A scripted HTTP/1.1 backend for the conformance tests: answers chosen by path, every byte recorded.

The demo backends answer one way (Content-Length, keep-alive); the conformance tests need the
other framings a proxy must carry, and a record of exactly what reached the backend, to assert
that a refused request reached nothing. It is a real asyncio server on loopback, run in the
loop of sidecar_support.Backends; it parses only what it must (the head, a Content-Length or
chunked body).

Paths (any method; HEAD gets the head only):
  /cl/N        200, N pattern bytes, Content-Length
  /chunked/N   200, N pattern bytes in chunks of up to 1000, Transfer-Encoding: chunked
  /close/N     200, N pattern bytes, no framing: the end of the body is the end of the connection
  /big/N       200, N pattern bytes with Content-Length, written in 64 KiB pieces with backpressure
  /drip/N      200 chunked: one 1 KiB chunk every 10 ms, N chunks (a response that takes its time)
  /head        200 with `Content-Length: 1234`, and those bytes unless the method is HEAD
  /status/C    status C; 204 and 304 without a body, others with `C\n`
  /early       103 Early Hints, then 200 `early\n`
  /slow/MS     200 after MS milliseconds
  /smuggle     200 with both Content-Length and Transfer-Encoding (then the connection closes)
  /hop         200 with hop-by-hop fields (a Connection-listed one, Keep-Alive, Proxy-Connection)
  anything     200 with the request's body length and SHA-256 (`LENGTH SHA256\n`)
Every response carries `x-path` (the target received) and `x-seen` (this request's number), and
`fail_with=CODE` makes every request answer CODE (a backend a retry must move away from).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field

from sidecar_support import Backends

PATTERN = bytes(range(251))  # a prime period: a dropped, repeated or reordered byte shows
LIMIT = 1 << 20  # a head up to 1 MiB is read whole: a sidecar that forwards a huge head is seen doing so
REASONS = {100: "Continue", 103: "Early Hints", 200: "OK", 204: "No Content", 304: "Not Modified"}


def pattern(size: int, start: int = 0) -> bytes:
    """`size` bytes of the test pattern from offset `start` (what /cl, /big, ... send)."""
    offset = start % len(PATTERN)
    return (PATTERN * ((size + offset) // len(PATTERN) + 1))[offset:offset + size]


def summary(body: bytes) -> bytes:
    """What the backend answers for a body it received: `LENGTH SHA256\n`."""
    return b"%d %s\n" % (len(body), hashlib.sha256(body).hexdigest().encode())


@dataclass
class Seen:
    """One request as the backend received it."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    head: bytes  # the raw request line and fields
    body: bytes = b""

    def field(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n.lower() == name), None)

    def names(self) -> set[str]:
        return {n.lower() for n, _ in self.headers}


@dataclass
class RawBackend:
    """`requests` and `received` fill as the sidecar sends; `reset()` between tests."""

    fail_with: int = 0
    requests: list[Seen] = field(default_factory=list)
    received: int = 0  # raw bytes read, all connections
    accepted: int = 0
    open: int = 0  # connections open now

    def start(self, backends: Backends, name: str) -> int:
        """Serve in `backends`' event loop (closed with it) as backend `name`; returns the port."""
        self.port = backends.serve(name, asyncio.start_server(self._serve, "127.0.0.1", 0, limit=LIMIT))
        return self.port

    def reset(self) -> None:
        self.requests.clear()
        self.received = 0

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Seen]:
        """The requests seen, once there are at least `count` (or the timeout passed)."""
        deadline = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.requests)

    # --- the server ----------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        wrapped = _Counting(reader, self)
        try:
            while await self._one(wrapped, writer):
                pass
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def _one(self, reader: _Counting, writer: asyncio.StreamWriter) -> bool:
        """Read one request, answer it; False when the connection should end."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
        headers = [(n, v.strip()) for n, _, v in (line.partition(":") for line in lines[1:])]
        seen = Seen(method, target, version, headers, head)
        if (seen.field("expect") or "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in (seen.field("transfer-encoding") or "").lower():
            seen.body = await _read_chunked(reader)
        else:
            seen.body = await reader.readexactly(int(seen.field("content-length") or 0))
        self.requests.append(seen)
        number = len(self.requests)
        tokens = {t.strip() for t in (seen.field("connection") or "").lower().split(",")}
        # HTTP/1.1 persists unless closed; HTTP/1.0 only when asked (RFC 9112 §9.3), as servers do.
        # Closing an HTTP/1.0 keep-alive connection right after answering would race a proxy that
        # forwards HTTP/1.0 as it came (mitmproxy) into reusing it.
        keep = "close" not in tokens if version == "HTTP/1.1" else "keep-alive" in tokens
        return await self._answer(seen, number, writer) and keep

    async def _answer(self, seen: Seen, number: int, writer: asyncio.StreamWriter) -> bool:
        parts = seen.target.split("/")
        kind, arg = parts[1], (parts[2] if len(parts) > 2 else "")
        size = int(arg) if arg.isdigit() else 0
        fields = [("x-path", seen.target), ("x-seen", str(number))]
        if seen.version != "HTTP/1.1" and kind != "close" and "keep-alive" in (seen.field("connection") or "").lower():
            fields.append(("Connection", "keep-alive"))  # how an HTTP/1.0 server says it keeps the connection
        send_body = seen.method != "HEAD"
        if self.fail_with:
            return await _reply(writer, self.fail_with, fields, b"%d\n" % self.fail_with, send_body)
        if kind == "cl":
            return await _reply(writer, 200, fields, pattern(size), send_body)
        if kind == "chunked":
            writer.write(_head(200, [*fields, ("Transfer-Encoding", "chunked")]))
            if send_body:
                for at in range(0, size, 1000):
                    writer.write(b"%x\r\n%s\r\n" % (min(1000, size - at), pattern(min(1000, size - at), at)))
                writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        if kind == "close":
            writer.write(_head(200, [*fields, ("Connection", "close")]) + (pattern(size) if send_body else b""))
            await writer.drain()
            return False
        if kind == "big":
            writer.write(_head(200, [*fields, ("Content-Length", str(size))]))
            for at in range(0, size if send_body else 0, 65536):
                writer.write(pattern(min(65536, size - at), at))
                await writer.drain()
            return True
        if kind == "drip":
            writer.write(_head(200, [*fields, ("Transfer-Encoding", "chunked")]))
            for i in range(size):
                writer.write(b"400\r\n%s\r\n" % pattern(1024, i * 1024))
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(b"0\r\n\r\n")
            return True
        if kind == "head":
            writer.write(_head(200, [*fields, ("Content-Length", "1234")]) + (pattern(1234) if send_body else b""))
            return True
        if kind == "status":
            code = int(arg)
            body = b"" if code in (204, 304) else b"%d\n" % code
            if code == 304:
                fields.append(("ETag", '"v1"'))
            writer.write(_head(code, fields + ([("Content-Length", str(len(body)))] if body else [])) + body)
            return True
        if kind == "early":
            writer.write(_head(103, [("Link", "</style.css>; rel=preload")]))
            await asyncio.sleep(0.05)
            return await _reply(writer, 200, fields, b"early\n", send_body)
        if kind == "slow":
            await asyncio.sleep(size / 1000)
            return await _reply(writer, 200, fields, b"slow\n", send_body)
        if kind == "smuggle":  # a response framed two ways: a proxy must not pass it on (RFC 9112 §6.3)
            writer.write(_head(200, [*fields, ("Content-Length", "5"), ("Transfer-Encoding", "chunked")]) +
                         b"5\r\nabcde\r\n0\r\n\r\n")
            return False
        if kind == "hop":
            fields += [("Connection", "x-backend-hop"), ("X-Backend-Hop", "1"), ("Keep-Alive", "timeout=5"),
                       ("Proxy-Connection", "keep-alive"), ("X-End-To-End", "kept")]
            return await _reply(writer, 200, fields, b"hop\n", send_body)
        return await _reply(writer, 200, fields, summary(seen.body), send_body)


class _Counting:
    """A StreamReader that counts what it read into the backend's `received`."""

    def __init__(self, reader: asyncio.StreamReader, backend: RawBackend) -> None:
        self.reader = reader
        self.backend = backend

    async def readuntil(self, separator: bytes) -> bytes:
        data = await self.reader.readuntil(separator)
        self.backend.received += len(data)
        return data

    async def readexactly(self, size: int) -> bytes:
        out = bytearray()
        while len(out) < size:  # in pieces, so `received` shows a body arriving while it streams
            piece = await self.reader.read(min(65536, size - len(out)))
            if not piece:
                raise asyncio.IncompleteReadError(bytes(out), size)
            self.backend.received += len(piece)
            out += piece
        return bytes(out)


async def _read_chunked(reader: _Counting) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields, then the end
                pass
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


def _head(status: int, fields: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}", *(f"{n}: {v}" for n, v in fields)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _reply(writer: asyncio.StreamWriter, status: int, fields: list[tuple[str, str]], body: bytes,
                 send_body: bool = True) -> bool:
    writer.write(_head(status, [*fields, ("Content-Length", str(len(body)))]) + (body if send_body else b""))
    await writer.drain()
    return True
