"""A minimal asyncio HTTP/1.1 server for the admin API and the demo backends.

Both need a few routes, keep-alive (load tests send thousands of requests over a handful of
connections) and Content-Length bodies; neither needs chunked uploads or pipelining tricks,
so this stays a page of stdlib code instead of a framework dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
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
        lines = [f"HTTP/1.1 {self.status} {REASONS.get(self.status, 'Status')}",
                 f"Content-Type: {self.content_type}", f"Content-Length: {len(self.body)}"]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        if not keep_alive:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


Handler = Callable[[Request], Awaitable[Reply]]


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


def bound_port(server: Listening) -> int:
    return server.sockets[0].getsockname()[1]
