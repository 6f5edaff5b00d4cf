"""A minimal asyncio HTTP/1.1 server for the admin API and the demo backends.

Both need a few routes, keep-alive (load tests send thousands of requests over a handful of
connections) and Content-Length bodies; neither needs chunked uploads or pipelining tricks,
so this stays a page of stdlib code instead of a framework dependency. One reply streams:
`GET /tap` answers a `Stream`, sent chunked for as long as the client stays (`read_chunks` is
the other end, for the supervisor reading its workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from meshlet.policy.model import Address
from meshlet.proxy.listen import bind_listeners

log = logging.getLogger("meshlet.proxy")
MAX_HEAD = 64 * 1024
MAX_BODY = 8 * 1024 * 1024
REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 411: "Length Required",
    413: "Content Too Large", 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str  # as sent: path and query
    headers: Mapping[str, str]  # lower-cased names
    body: bytes = b""

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: Mapping[str, str] = field(default_factory=dict)

    def encode(self, keep_alive: bool) -> bytes:
        framing = [f"Content-Length: {len(self.body)}"] + ([] if keep_alive else ["Connection: close"])
        return _head(self.status, self.content_type, self.headers, framing) + self.body


@dataclass(frozen=True, slots=True)
class Stream:
    """A 200 whose body is sent chunk by chunk as `chunks` yields, until it ends or the client
    goes away (closes, or sends anything); either way `chunks` is closed, so a subscription it
    holds ends with the connection. The connection is not kept alive after a stream."""

    chunks: AsyncGenerator[bytes, None]
    content_type: str = "application/x-ndjson"

    async def send(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_head(200, self.content_type, {}, ["Transfer-Encoding: chunked", "Connection: close"]))
        sending = asyncio.ensure_future(self._pump(writer))
        hangup = asyncio.ensure_future(reader.read(1))
        try:
            await asyncio.wait((sending, hangup), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sending.cancel()
            hangup.cancel()
            await asyncio.gather(sending, hangup, return_exceptions=True)
            await self.chunks.aclose()
        if not sending.cancelled() and isinstance(sending.exception(), Exception):
            error = sending.exception()
            if not isinstance(error, ConnectionError):
                log.error("stream failed: %s: %s", type(error).__name__, error)

    async def _pump(self, writer: asyncio.StreamWriter) -> None:
        async for chunk in self.chunks:
            if chunk:
                writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()


def _head(status: int, content_type: str, headers: Mapping[str, str], framing: list[str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}", f"Content-Type: {content_type}", *framing]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def read_chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The chunks of a chunked body, as a `Stream` sent them (after the response head); ends at
    the last chunk. ValueError on a malformed size; IncompleteReadError if the peer hangs up."""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return
        chunk = await reader.readexactly(size + 2)
        yield chunk[:-2]


Handler = Callable[[Request], Awaitable[Reply | Stream]]


async def _read_request(reader: asyncio.StreamReader) -> Request | Reply | None:
    """A parsed request, a Reply to send for a malformed one, or None at a clean end of stream."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError:
        return Reply(400, b"request head too large\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return Reply(400, b"malformed request line\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), value.strip())
    if "chunked" in headers.get("transfer-encoding", ""):
        return Reply(411, b"send a Content-Length body\n")
    length = headers.get("content-length", "0")
    if not length.isdigit():
        return Reply(400, b"bad Content-Length\n")
    if int(length) > MAX_BODY:
        return Reply(413, b"body too large\n")
    body = await reader.readexactly(int(length)) if int(length) else b""
    return Request(parts[0], parts[1], headers, body)


async def _serve_connection(handler: Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            request = await _read_request(reader)
            if request is None:
                return
            if isinstance(request, Reply):
                writer.write(request.encode(keep_alive=False))
                await writer.drain()
                return
            try:
                reply = await handler(request)
            except Exception as e:  # a handler bug must not kill the server, only this request
                log.exception("%s %s failed", request.method, request.target)
                reply = Reply(500, f"internal error: {type(e).__name__}: {e}\n".encode())
            if isinstance(reply, Stream):
                await reply.send(reader, writer)
                return
            keep_alive = request.headers.get("connection", "").lower() != "close"
            writer.write(reply.encode(keep_alive))
            await writer.drain()
            if not keep_alive:
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


@dataclass
class Listening:
    """The servers of one address (`localhost` is two sockets); quacks like `asyncio.Server`."""

    servers: list[asyncio.Server]

    @property
    def sockets(self) -> list[socket.socket]:
        return [sock for server in self.servers for sock in server.sockets]

    def close(self) -> None:
        for server in self.servers:
            server.close()


def _on_connect(handler: Handler) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # At shutdown the loop cancels idle keep-alive connections; ending quietly keeps
        # asyncio's stream callback from logging a CancelledError traceback for each.
        with contextlib.suppress(asyncio.CancelledError):
            await _serve_connection(handler, reader, writer)

    return on_connect


async def start(handler: Handler, host: str, port: int) -> Listening:
    """Listen on host:port (0 = ephemeral; read the bound port with `bound_port`), with the
    sidecar's listener options (meshlet.proxy.listen: SO_REUSEADDR, `::` dual stack)."""
    on_connect = _on_connect(handler)
    sockets = bind_listeners(Address(host, port))
    return Listening([await asyncio.start_server(on_connect, sock=sock, limit=MAX_HEAD) for sock in sockets])


async def start_unix(handler: Handler, path: str) -> asyncio.Server:
    """Listen on a Unix socket: reachable only through the file system, never the network."""
    return await asyncio.start_unix_server(_on_connect(handler), path, limit=MAX_HEAD)


async def connect(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection to `address`: a Unix socket path (a worker's private API) or `host:port`."""
    if address.startswith("/"):
        return await asyncio.open_unix_connection(address)
    host, _, port = address.rpartition(":")
    return await asyncio.open_connection(host.strip("[]"), int(port))


def bound_port(server: Listening) -> int:
    return server.sockets[0].getsockname()[1]
