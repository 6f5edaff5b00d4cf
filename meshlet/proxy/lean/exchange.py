"""One request on the lean engine, from its parsed head to the end of its response.

The client connection (meshlet.proxy.lean.downstream) hands over the head llhttp parsed; the
exchange reads the running table once (`decide`), builds the head it sends upstream, takes a
pooled connection or opens one, streams the body both ways, and records the outcome once. It
keeps what a retry needs: the candidates in order, and the request body up to MAX_REPLAY bytes
(a retry must be able to send the request again; Envoy buffers for the same reason).

Everything is callbacks, not coroutines: a request on a pooled connection runs without creating
a task. Only opening a connection awaits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from meshlet.mtls.inbound import PEER_IDENTITY_HEADER
from meshlet.proxy.inbound import CALLER_ADDRESS_HEADERS
from meshlet.proxy.lean.http1 import (
    CONTINUE,
    HOP_BY_HOP,
    LAST_CHUNK,
    Header,
    chunk,
    connection_tokens,
    field_value,
    local_response,
    status_line,
)
from meshlet.proxy.lean.relay import relay_to, splice
from meshlet.proxy.lean.request import Request, new_request_id, parse_authority, split_target
from meshlet.proxy.lean.upstream import PoolKey, Upstream
from meshlet.proxy.peermeta import HEADER as PEER_METADATA
from meshlet.routing.attempts import status_conditions
from meshlet.telemetry.outcome import (
    DOWNSTREAM_DISCONNECT,
    DOWNSTREAM_PROTOCOL_ERROR,
    RETRIES_EXHAUSTED,
    UPSTREAM_CONNECT_FAILURE,
    UPSTREAM_CONNECTION_TERMINATION,
    UPSTREAM_TIMEOUT,
)

if TYPE_CHECKING:
    from meshlet.proxy.lean.downstream import Downstream

MAX_BACKLOG = 64 * 1024  # request body held while connecting before the client is paused
CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"

# Request fields the exchange looks at (the rest pass through untouched, in order).
_HOST, _LENGTH, _TE, _CONNECTION, _EXPECT, _REQUEST_ID, _IDENTITY, _UPGRADE, _HOP, _CALLER, _META = range(11)
_SPECIAL = {
    b"host": _HOST, b"content-length": _LENGTH, b"transfer-encoding": _TE, b"connection": _CONNECTION,
    b"expect": _EXPECT, b"x-request-id": _REQUEST_ID, PEER_IDENTITY_HEADER.encode(): _IDENTITY,
    b"upgrade": _UPGRADE, **{name.encode(): _CALLER for name in CALLER_ADDRESS_HEADERS},
    **{name: _HOP for name in HOP_BY_HOP - {b"transfer-encoding", b"connection", b"upgrade"}},
    PEER_METADATA: _META,
}
# Response fields never passed on: hop-by-hop ones, and the peer's metadata (read, then dropped).
_DROPPED = HOP_BY_HOP | {PEER_METADATA}
_NO_BODY_STATUS = frozenset((204, 304))
_PLAIN_CONNECTION = frozenset((b"keep-alive", b"close", b"upgrade"))  # names no other field


class Exchange(Request):
    """One HTTP/1.1 request and its response on a client connection (meshlet.proxy.lean.downstream)."""

    __slots__ = (
        "backlog_bytes", "chunked", "close_after", "continued", "expect", "head", "http10",
        "keep_alive", "no_body", "rechunk", "request_done", "response_started", "retrying", "stale_retried",
        "target", "until_eof", "upgrade", "upstream",
    )

    def __init__(
        self, downstream: Downstream, method: bytes, target: bytes, headers: list[Header], http10: bool,
        keep_alive: bool, upgrade: bool,
    ) -> None:
        super().__init__(downstream, method, headers)
        self.target = target
        self.http10 = http10
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.head = b""
        self.chunked = self.expect = self.continued = False
        self.request_done = self.response_started = False
        self.close_after = self.rechunk = self.until_eof = self.retrying = self.stale_retried = False
        self.no_body = method == b"HEAD"
        self.backlog_bytes = 0
        self.upstream: Upstream | None = None

    # --- the request ----------------------------------------------------------------------------
    def start(self) -> None:
        """Route the request; runs once it is the oldest unanswered request of its connection."""
        downstream = self.downstream
        lines: list[bytes] = []
        host: bytes | None = None
        length = b"0"
        te = None
        connection = None
        request_id = None
        metadata = None
        for name, value in self.fields:
            kind = _SPECIAL.get(name.lower())
            if kind is None:
                lines.append(b"%s: %s\r\n" % (name, value))
            elif kind == _HOST:  # written below, from the target when it names an authority
                if host is not None:  # RFC 9112 §3.2: which one would the backend believe?
                    self.flags = DOWNSTREAM_PROTOCOL_ERROR
                    self.answer(400, "meshlet: malformed request: more than one Host field", close=True)
                    return
                host = value
            elif kind == _LENGTH:
                length = value
                lines.append(b"%s: %s\r\n" % (name, value))
            elif kind == _REQUEST_ID:
                request_id = value
                lines.append(b"%s: %s\r\n" % (name, value))
            elif kind == _TE:  # repeated fields are one list (RFC 9110 §5.3)
                te = value if te is None else te + b"," + value
            elif kind == _CONNECTION:
                connection = value if connection is None else connection + b"," + value
            elif kind == _EXPECT:
                self.expect = value.strip().lower() == b"100-continue"
            elif kind == _CALLER and self.direction == "outbound":  # the app's own; inbound, the sidecar's
                lines.append(b"%s: %s\r\n" % (name, value))
            elif kind == _META:  # outbound, the app's: dropped; inbound, read (believed only with mTLS)
                metadata = value
            # _IDENTITY: set by the sidecar only, whatever the caller sent; _UPGRADE, _HOP: hop-by-hop
        if te is not None:
            if te.rsplit(b",", 1)[-1].strip().lower() != b"chunked":  # RFC 9112 §6.3: no framing, no request
                self.flags = DOWNSTREAM_PROTOCOL_ERROR
                self.answer(400, "meshlet: malformed request: Transfer-Encoding must end in chunked", close=True)
                return
            if te.strip().lower() != b"chunked":  # RFC 9112 §6.1: a coding we would have to undo
                self.flags = DOWNSTREAM_PROTOCOL_ERROR
                self.answer(501, f"meshlet: transfer coding {te.decode('latin-1')!r} is not supported; "
                            "send chunked or Content-Length", close=True)
                return
            self.chunked = True
        elif length.strip() == b"0":
            self.request_done = True  # no body: llhttp's message-complete follows, but answers need not wait
        if connection is not None:
            extra = connection_tokens(((b"connection", connection),)) - {b"close", b"keep-alive", b"upgrade"}
            if extra:  # fields named in Connection are hop-by-hop too (rare: filter again)
                lines = [line for line in lines if line.split(b":", 1)[0].lower() not in extra]
        self.request_id = request_id or new_request_id()
        if request_id is None:
            lines.append(b"x-request-id: %s\r\n" % self.request_id)
        authority, path = split_target(self.target)
        self.authority = authority or host or b""
        self.path = path
        if self.method == b"CONNECT":
            self._tunnel()
            return
        if self.upgrade and self._field(b"upgrade").strip().lower() == b"h2c" and self.request_done:
            settings = self._field(b"http2-settings")
            if settings:  # RFC 7540 §3.2: 101, then this request is answered as stream 1
                downstream.h2c = (settings, self)
                downstream.send(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
                return
        if self.upgrade and self._field(b"upgrade").strip().lower() == b"h2c":
            self.upgrade = False  # with a body it stays HTTP/1.1 (RFC 9113 lets a server ignore it)
        if self.direction == "inbound":
            if not self._authorize(metadata):
                return
            if self.peer_identity:
                lines.append(b"%s: %s\r\n" % (PEER_IDENTITY_HEADER.encode(), self.peer_identity.encode()))
            lines.append(b"x-forwarded-for: %s\r\n" % downstream.peer_ip.removeprefix("::ffff:").encode())
            self.destination = downstream.inbound_target
        elif not self._route():
            return
        # RFC 9112 §3.2: an HTTP/1.1 request has one Host; a proxy makes it from an absolute-form
        # target (§3.2.2), and from where it sends a request that had none (HTTP/1.0)
        if self.authority:
            lines.insert(0, b"Host: %s\r\n" % self.authority)
        elif self.destination is not None:
            where, port = self.destination
            lines.insert(0, b"Host: %s:%d\r\n" % ((f"[{where}]" if ":" in where else where).encode(), port))
        if self.chunked:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        if self.upgrade:
            protocol = self._field(b"upgrade")
            if protocol.strip().lower() == b"h2c":  # served as HTTP/1.1, as RFC 9113 lets a server:
                self.upgrade = False  # after a 101, requests would pass as bytes, past the policy
            else:
                lines.append(b"Connection: upgrade\r\nUpgrade: %s\r\n" % protocol)
        self.head = b"%s %s HTTP/1.1\r\n%s\r\n" % (self.method, path or b"/", b"".join(lines))
        self.start_timer(self.timed_out)
        self.dispatch()

    def as_h2_stream(self):
        """This request as the first stream of an `Upgrade: h2c` connection."""
        from meshlet.proxy.lean.stream import H2Exchange

        return H2Exchange.upgraded_from(self.downstream, self.method, self.fields, self.authority, self.path or b"/")

    def _field(self, wanted: bytes) -> bytes:
        return field_value(self.fields, wanted)

    def _tunnel(self) -> None:
        """CONNECT: a byte relay to the target (TLS the app originates stays end to end)."""
        downstream = self.downstream
        engine = downstream.engine
        self.route_name = self.backend = "passthrough"
        self.service = "unknown"
        destination = parse_authority(self.authority.decode("latin-1"), 443)
        if self.direction != "outbound" or destination is None or engine.is_own_address(destination):
            self.flags = DOWNSTREAM_PROTOCOL_ERROR
            self.answer(400, "meshlet: CONNECT needs host:port of another server, on the outbound listener",
                        close=True)
            return
        downstream.detach()
        engine.spawn(self._open_tunnel(destination))

    async def _open_tunnel(self, destination: tuple[str, int]) -> None:
        downstream = self.downstream
        engine = downstream.engine
        ok = await relay_to(downstream.transport, destination, downstream.take_pending, engine.relays,
                            CONNECT_ESTABLISHED, engine.relay_closed("outbound"))
        if ok:
            self.finish(200)
        else:
            downstream.send(local_response(503, f"meshlet: cannot connect to {destination[0]}:"
                                                           f"{destination[1]}", close=True))
            downstream.transport.close()
            self.flags = UPSTREAM_CONNECT_FAILURE
            self.finish(503)

    # --- upstream connection -----------------------------------------------------------------
    def dispatch(self) -> None:
        key, tls = self._pool_key()
        backend = self.backends[(self.attempt - 1) % len(self.backends)] if self.backends else None
        if backend is not None and backend.protocol == "http2":
            self.answer(502, f"meshlet: backend {backend.name!r} speaks HTTP/2 only (protocol: http2); "
                        "this sidecar relays HTTP/1.1 requests as HTTP/1.1: call it over HTTP/2 (h2c)")
            return
        self.attempt_begins(key)
        if key[2] == ():  # a mesh backend, and this sidecar has no identity
            self._failed("connect-failure", 503, "it needs mesh mTLS; this sidecar runs without --identity")
            return
        conn = self.downstream.engine.pool.take(key)
        if conn is not None:
            self.attach(conn)
        else:
            self.connecting = self.downstream.engine.spawn(self._connect(key, tls))

    async def _open(self, key: PoolKey, tls: Any, timeout: float | None) -> Upstream:
        return await self.engine.pool.connect(key, tls, timeout)

    def _unused(self, conn: Upstream) -> None:
        conn.close()

    def _attach_opened(self, conn: Upstream, tls: Any) -> None:
        self.attach(conn)

    def attach(self, conn: Upstream) -> None:
        self.upstream = conn
        conn.exchange = self
        head = self.head
        if self.mesh:  # the head ends in an empty line: this sidecar's metadata goes before it
            head = head[:-2] + self.engine.metadata_line(self.service) + b"\r\n"
        out = [head]
        if self.backlog:
            out += [chunk(piece) for piece in self.backlog] if self.chunked else self.backlog
            self.backlog = []
            self.backlog_bytes = 0
            self.downstream.release_hold(2)
        if self.request_done and self.chunked:
            out.append(LAST_CHUNK)
        conn.transport.write(b"".join(out) if len(out) > 1 else out[0])  # type: ignore[union-attr]
        if self.expect and not self.continued and not self.request_done:
            self.continued = True
            self.downstream.send(CONTINUE)

    def request_body(self, data: bytes) -> None:
        if self.finished:
            return
        self.bytes_in += len(data)
        self.keep(data)
        conn = self.upstream
        if conn is not None and not self.retrying:
            conn.transport.write(chunk(data) if self.chunked else data)  # type: ignore[union-attr]
            return
        self.backlog.append(data)
        self.backlog_bytes += len(data)
        if self.backlog_bytes > MAX_BACKLOG:
            self.downstream.hold(2)

    def request_complete(self) -> None:
        self.request_done = True
        conn = self.upstream
        if conn is not None and self.chunked and not self.finished:
            conn.transport.write(LAST_CHUNK)  # type: ignore[union-attr]

    # --- the response -----------------------------------------------------------------------------
    def response_head(self, conn: Upstream, status: int, reason: bytes, headers: list[Header]) -> None:
        if conn is not self.upstream or self.finished:
            return
        downstream = self.downstream
        if status == 101 and self.upgrade:  # the relay follows in `upgraded`, when llhttp stops parsing
            self.status = 101
            downstream.send(self._response_head(status, reason, headers))
            return
        if status < 200:
            if status != 100 and not self.http10:  # 100: answered ourselves (Expect)
                downstream.send(self._response_head(status, reason, headers, interim=True))
            return
        if status >= 500:
            conditions = status_conditions(status)
            if self._may_retry(conditions):
                self.retrying = True  # its body is read and dropped; the next attempt follows
                self.status = status
                self.attempt_done(status)
                return
            if self._exhausted(conditions):
                self.flags = RETRIES_EXHAUSTED
        self.status = status
        self.response_started = True
        downstream.send(self._response_head(status, reason, headers))
        if self.no_body:  # llhttp cannot know a HEAD response has no body: finish here
            conn.fresh_parser()
            self.response_complete(conn, _keeps_alive(headers))

    def _response_head(self, status: int, reason: bytes, headers: list[Header], interim: bool = False) -> bytes:
        lines = [status_line(status, reason)]
        has_length = chunked = False
        connection = None
        for name, value in headers:
            lname = name.lower()
            if lname in _DROPPED:
                chunked = chunked or lname == b"transfer-encoding"
                if lname == b"connection":
                    connection = value if connection is None else connection + b"," + value
                elif lname == PEER_METADATA and self.upstream is not None:
                    self.peer_answered(value, self.upstream.principal)
                continue
            if lname == b"content-length":
                has_length = True
            lines.append(b"%s: %s\r\n" % (name, value))
        if connection is not None and connection.lower() not in _PLAIN_CONNECTION:
            lines = _without_listed(lines, connection)
        if interim:
            return b"".join(lines) + b"\r\n"
        if self.direction == "inbound" and self.downstream.identity is not None:
            lines.append(self.engine.metadata_line())  # a verified caller learns who answered
        if status == 101:
            lines.append(b"Connection: upgrade\r\nUpgrade: %s\r\n" % field_value(headers, b"upgrade"))
            return b"".join(lines) + b"\r\n"
        downstream = self.downstream
        if not (self.no_body or status in _NO_BODY_STATUS or has_length):
            self.until_eof = not chunked
            if self.http10:
                self.close_after = True  # an HTTP/1.0 client reads to the end of the connection
            else:
                self.rechunk = True
                lines.append(b"Transfer-Encoding: chunked\r\n")
        if self.close_after or not self.keep_alive or downstream.engine.draining or not self.request_done:
            self.close_after = True  # not request_done: the client is still sending a body nobody reads
            lines.append(b"Connection: close\r\n")
        elif self.http10:
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def response_body(self, data: bytes) -> None:
        if self.retrying or self.finished:
            return
        self.bytes_out += len(data)
        self.downstream.send(chunk(data) if self.rechunk else data)

    def response_complete(self, conn: Upstream, keep_alive: bool) -> None:
        if conn is not self.upstream or (not self.response_started and not self.retrying) or self.status == 101:
            return  # an interim (1xx) response ended, a switch of protocols follows, or a stale event
        self.upstream = None
        if keep_alive and self.request_done and not self.until_eof:
            conn.exchange = None
            conn.reusable = True  # back to the pool once its parser returns (Upstream.data_received)
        else:
            conn.close()
        if self.retrying:
            self.retrying = False
            self._retry()
            return
        if self.rechunk:
            self.downstream.send(LAST_CHUNK)
        self.finish(self.status)

    def upstream_eof(self, conn: Upstream) -> None:
        """A close-delimited response ends with the connection."""
        if conn is self.upstream and self.response_started and self.until_eof:
            self.response_complete(conn, False)

    def upgraded(self, conn: Upstream, rest: bytes) -> None:
        """The backend switched protocols (101): from here on, bytes both ways."""
        if conn is not self.upstream or self.finished:
            return
        self.upstream = None
        conn.exchange = None
        downstream = self.downstream
        downstream.detach()
        engine = downstream.engine
        closed = engine.relay_closed(self.direction, self.service, self.other_side(), downstream.identity is not None)
        splice(downstream.transport, conn.transport, engine.relays, downstream.take_pending(), rest, closed)  # type: ignore[arg-type]
        self.finish(101)

    def upstream_failed(self, conn: Upstream, condition: str, detail: str) -> None:
        if conn is not self.upstream or self.finished:
            return
        self.upstream = None
        conn.close()
        if self.response_started:  # too late to answer: cut the client off, as the backend cut us
            self.close_after = True
            self.downstream.abort()
            self._cut(UPSTREAM_CONNECTION_TERMINATION, self.response_started)
            return
        if conn.used and not self.stale_retried and self.history is not None and not self.retrying:
            self.stale_retried = True  # a pooled connection the backend had closed: once more, fresh
            self.backlog = list(self.history)
            self.dispatch()
            return
        self.retrying = False
        self._failed(condition, 502, detail)

    def _failed(self, condition: str, status: int, detail: str) -> None:
        self.attempt_failed(condition)
        if self._may_retry((condition,)):
            self._retry()
            return
        if self.status >= 500:  # retries exhausted on 5xx answers: the client gets a 502 saying so
            detail = f"{detail}; last answer {self.status}"
        self._give_up(condition, status, detail)

    def timed_out(self) -> None:
        if self.finished:
            return
        self._drop_upstream()
        if self.response_started:
            self.close_after = True
            self.downstream.abort()
            self._cut(UPSTREAM_TIMEOUT, self.response_started)
            return
        self.attempt_done(0, UPSTREAM_TIMEOUT)
        self.flags = UPSTREAM_TIMEOUT
        route = self.route
        self.answer(504, f"meshlet: route {self.route_name!r} timed out after {route.timeout if route else 0:g}s")

    # --- the end ------------------------------------------------------------------------------------
    def answer(self, status: int, message: str, close: bool = False) -> None:
        """A response the sidecar makes itself."""
        self.close_after = close = close or not self.keep_alive or not self.request_done or \
            self.downstream.engine.draining
        response = local_response(status, message, close)
        self.bytes_out += len(message.encode("utf-8", "replace")) + 1  # the body of local_response
        self.downstream.send(response)
        self.finish(status)

    def client_lost(self) -> None:
        """The client went away first: the backend's connection cannot be reused mid-exchange."""
        if self.finished:
            return
        self._drop_upstream()
        self._cut(DOWNSTREAM_DISCONNECT, self.response_started, notify=False)

    def request_broken(self, status: int, message: str) -> None:
        """The request body broke its framing (a bad chunk size): the backend has at most part of a
        request, so its connection goes; the client gets `status`, or mid-response, a closed connection."""
        if self.finished:
            return
        self._drop_upstream()
        self.history = None
        self.retrying = False
        if self.response_started:
            self.close_after = True
            self.downstream.abort()
            self._cut(DOWNSTREAM_PROTOCOL_ERROR, self.response_started)
            return
        self.attempt_done(0, DOWNSTREAM_PROTOCOL_ERROR)
        self.flags = DOWNSTREAM_PROTOCOL_ERROR
        self.answer(status, message, close=True)

    def _drop_upstream(self) -> None:
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.close()
        if self.connecting is not None:
            self.connecting.cancel()

def _without_listed(lines: list[bytes], connection: bytes) -> list[bytes]:
    """RFC 9110 §7.6.1: fields a Connection field names are hop-by-hop too (rare: a second pass)."""
    listed = connection_tokens(((b"connection", connection),))
    return [line for line in lines if line.split(b":", 1)[0].lower() not in listed]


def _keeps_alive(headers: list[Header]) -> bool:
    return b"close" not in field_value(headers, b"connection").lower()


__all__ = ["Exchange"]
