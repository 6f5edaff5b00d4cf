"""meshlet's own HTTP/1.1 upstream client, for routes with a `timeout` or `retries`.

mitmproxy's server side cannot be cut short with a chosen status or replayed against another
backend, so a route that asks for a deadline (504) or retries sends its request here instead:
one bounded exchange over a pooled keep-alive connection. Bodies are buffered, which retries
need anyway (a request can only be sent again if it is still at hand). A `tls: mesh` backend is
reached over mTLS (meshlet.mtls.upstream); the deadline covers the handshake too, and each
reply names the SPIFFE ID the backend's certificate proved (for peer metadata).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import defaultdict
from typing import NamedTuple

from cryptography import x509
from mitmproxy import http
from mitmproxy.net.http import http1

from meshlet.mtls.upstream import UpstreamTls, check_leaf, classify
from meshlet.mtls.verify import identity_of

Address = tuple[str, int]
HOP_BY_HOP = ("connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade", "trailer")
MAX_IDLE_PER_BACKEND = 64
MAX_HEAD = 64 * 1024


class UpstreamError(Exception):
    """The exchange failed before a response; `condition` is the retry condition it matches."""

    def __init__(self, condition: str, message: str):
        super().__init__(message)
        self.condition = condition  # "connect-failure" | "reset"


class _Stale(Exception):
    """A pooled connection the backend had closed: retry once on a fresh one, not a policy retry."""


def _request_head(request: http.Request) -> bytes:
    lines = [f"{request.method} {request.path or '/'} HTTP/1.1"]
    for name, value in request.headers.items(multi=True):
        if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
            lines.append(f"{name}: {value}")
    if "host" not in request.headers:
        lines.append(f"Host: {request.host_header or request.pretty_host}")
    body = request.raw_content or b""
    if body or request.method not in ("GET", "HEAD", "DELETE", "OPTIONS", "TRACE"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers are dropped
                pass
            return b"".join(chunks)
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)


PoolKey = tuple[Address, tuple | None]  # the address, and for mTLS our certificate and the expected peer
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter, str]  # and the peer's verified SPIFFE ID ("": none)


class Reply(NamedTuple):
    response: http.Response
    identity: str  # the SPIFFE ID the backend proved over mesh mTLS; "" over plain TCP


class UpstreamPool:
    """Keep-alive connections per backend address (and TLS identity); one exchange per connection at a time."""

    def __init__(self) -> None:
        self._idle: dict[PoolKey, list[Connection]] = defaultdict(list)
        self._tls_in_use: dict[Address, tuple] = {}  # per mesh address, the TLS key its pooled connections have

    async def send(
        self, address: Address, request: http.Request, timeout: float | None, tls: UpstreamTls | None = None
    ) -> Reply:
        """The backend's complete response; UpstreamError or TimeoutError otherwise."""
        key = (address, tls.pool_key if tls else None)
        if tls is not None:
            previous = self._tls_in_use.get(address, tls.pool_key)
            if previous != tls.pool_key:
                self._discard((address, previous))  # made with our previous certificate
            self._tls_in_use[address] = tls.pool_key
        async with asyncio.timeout(timeout):
            while self._idle[key]:
                conn = self._idle[key].pop()
                if conn[0].at_eof() or conn[1].is_closing():
                    conn[1].close()
                    continue
                with contextlib.suppress(_Stale):
                    return await self._exchange(key, conn, request, reused=True)
            return await self._exchange(key, await _connect(address, tls), request, reused=False)

    async def _exchange(self, key: PoolKey, conn: Connection, request: http.Request, reused: bool) -> Reply:
        address = key[0]
        reader, writer, identity = conn
        keep = False
        try:
            writer.write(_request_head(request) + (request.raw_content or b""))
            await writer.drain()
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as e:
                if reused and not e.partial:
                    raise _Stale from None
                raise
            response = http1.read_response_head(head.split(b"\r\n")[:-2])
            size = http1.expected_http_body_size(request, response)
            if size is None:
                body = await _read_chunked(reader)
            elif size == -1:
                body = await reader.read()
            else:
                body = await reader.readexactly(size)
            keep = size != -1 and not http1.connection_close(response.data.http_version, response.headers)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            if isinstance(e, ConnectionError) and reused:
                raise _Stale from None
            raise UpstreamError("reset", f"{address[0]}:{address[1]} closed or garbled the response: {e}") from None
        finally:
            if keep:
                idle = self._idle[key]
                if len(idle) < MAX_IDLE_PER_BACKEND:
                    idle.append(conn)
                else:
                    writer.close()
            else:
                writer.close()
        for name in HOP_BY_HOP:
            response.headers.pop(name, None)
        response.raw_content = body
        if size != 0:  # bodiless answers (HEAD, 204, 304) keep their headers as sent
            response.headers["content-length"] = str(len(body))
        return Reply(response, identity)

    def _discard(self, key: PoolKey) -> None:
        for _, writer, _ in self._idle.pop(key, ()):
            writer.close()

    def close(self) -> None:
        for key in list(self._idle):
            self._discard(key)
        self._tls_in_use.clear()


async def _connect(address: Address, tls: UpstreamTls | None) -> Connection:
    """A new connection; with `tls`, an mTLS one whose peer proved the expected mesh identity."""
    where = f"{address[0]}:{address[1]}"
    try:
        reader, writer = await asyncio.open_connection(
            *address, limit=MAX_HEAD, ssl=tls.context if tls else None, server_hostname="" if tls else None,
        )
    except ssl.SSLError as e:
        assert tls is not None
        refused = classify(e)
        tls.record(refused.result)
        raise UpstreamError("connect-failure", f"{where}: {refused}") from None
    except OSError as e:
        raise UpstreamError("connect-failure", f"cannot connect to {where}: {e}") from None
    if tls is None:
        return reader, writer, ""
    peer = writer.get_extra_info("ssl_object")
    der = peer.getpeercert(binary_form=True) if peer else None
    refused = check_leaf(der, tls.expect)
    tls.record(refused.result if refused else "ok")
    if refused is not None or der is None:
        writer.close()
        raise UpstreamError("connect-failure", f"{where}: {refused}")
    return reader, writer, identity_of(x509.load_der_x509_certificate(der)) or ""
