"""One HTTP/2 stream on the lean engine: a request routed by itself and relayed as a stream.

The stream's request is routed like any other (meshlet.proxy.lean.request) and relayed on a
stream of the backend's multiplexed connection (meshlet.proxy.lean.h2client), headers, data
and trailers alike, so gRPC calls of every shape (unary, client-, server- and bidi-streaming)
pass with their trailers. Data a side relayed is acknowledged to its sender only once the other
side took it, so HTTP/2 flow control carries a slow reader's pace back to the writer.

gRPC calls get gRPC answers from the sidecar itself: a trailers-only response with
`grpc-status` (DEADLINE_EXCEEDED for a route timeout, UNAVAILABLE for a backend that cannot be
reached) rather than an HTTP error a gRPC client would report as a protocol failure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from h2.errors import ErrorCodes

from meshlet.mtls.inbound import PEER_IDENTITY_HEADER
from meshlet.proxy.inbound import CALLER_ADDRESS_HEADERS
from meshlet.proxy.lean.http1 import HOP_BY_HOP, LAST_CHUNK, Header, chunk, field_value
from meshlet.proxy.lean.request import Request, new_request_id
from meshlet.proxy.lean.upstream import PoolKey, Upstream
from meshlet.proxy.peermeta import HEADER as PEER_METADATA
from meshlet.routing.attempts import grpc_conditions, status_conditions
from meshlet.telemetry.outcome import (
    DOWNSTREAM_DISCONNECT,
    RETRIES_EXHAUSTED,
    UPSTREAM_CONNECTION_TERMINATION,
    UPSTREAM_TIMEOUT,
)

if TYPE_CHECKING:
    from meshlet.proxy.lean.h2client import H2Upstream
    from meshlet.proxy.lean.h2server import H2Downstream

GRPC = b"application/grpc"
# https://github.com/grpc/grpc/blob/master/doc/http-grpc-status-mapping.md, and a route timeout is a deadline
HTTP_TO_GRPC = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 4}
GRPC_UNKNOWN = 2
_IDENTITY = PEER_IDENTITY_HEADER.encode()
# HTTP/2 allows TE only as `te: trailers`, which gRPC requires end to end (RFC 9113 §8.2.2).
_NOT_FORWARDED = (HOP_BY_HOP - {b"te"}) | {b"host", b"http2-settings", _IDENTITY, PEER_METADATA}
_DROPPED = HOP_BY_HOP | {PEER_METADATA}  # response fields never passed on (the peer's metadata is read)
_CALLER = frozenset(name.encode() for name in CALLER_ADDRESS_HEADERS)  # inbound: only the sidecar's


def grpc_message(text: str) -> bytes:
    """Percent-encoding of `grpc-message` (gRPC over HTTP/2: printable ASCII except `%` is kept)."""
    return b"".join(bytes((c,)) if 0x20 <= c <= 0x7E and c != 0x25 else b"%%%02X" % c for c in text.encode())


class H2Exchange(Request):
    protocol = "HTTP/2"
    __slots__ = (
        "chunked", "grpc", "h1", "headers_sent", "owed_client", "owed_upstream",
        "request_done", "request_trailers_", "stream_id", "up_fields", "up_stream", "upstream",
    )

    def __init__(self, downstream: Any, method: bytes, fields: list[Header]) -> None:
        super().__init__(downstream, method, fields)
        self.stream_id = 0
        self.grpc = field_value(fields, b"content-type").startswith(GRPC)
        self.request_done = self.headers_sent = False
        self.request_trailers_: list[Header] | None = None
        self.up_fields: list[Header] = []
        self.upstream: H2Upstream | None = None
        self.up_stream = 0
        self.owed_client = self.owed_upstream = 0  # flow-controlled bytes relayed but not yet acknowledged
        self.h1 = False  # the backend of this attempt speaks HTTP/1.1 (`upstream` is an Upstream)
        self.chunked = False

    @classmethod
    def from_headers(cls, downstream: H2Downstream, stream_id: int, headers: list[Header], ended: bool) -> H2Exchange:
        pseudo: dict[bytes, bytes] = {}
        fields: list[Header] = []
        for name, value in headers:
            if name[:1] == b":":
                pseudo[name] = value
            else:
                fields.append((name, value))
        exchange = cls(downstream, pseudo.get(b":method", b"GET"), fields)
        exchange.stream_id = stream_id
        exchange.authority = pseudo.get(b":authority") or field_value(fields, b"host")
        exchange.path = pseudo.get(b":path", b"/")
        exchange.request_done = ended
        return exchange

    @classmethod
    def upgraded_from(cls, downstream: Any, method: bytes, fields: list[Header], authority: bytes,
                      path: bytes) -> H2Exchange:
        """The HTTP/1.1 request of an `Upgrade: h2c` as stream 1 (it carried no body)."""
        exchange = cls(downstream, method, [(name.lower(), value) for name, value in fields])
        exchange.authority = authority
        exchange.path = path
        exchange.request_done = True
        return exchange

    def bind(self, downstream: H2Downstream, stream_id: int) -> None:
        self.downstream = downstream
        self.stream_id = stream_id

    # --- the request ------------------------------------------------------------------------
    def start(self) -> None:
        if self.method == b"CONNECT":
            self.answer(405, "meshlet: CONNECT over HTTP/2 is not supported")
            return
        if self.direction == "inbound":
            verified = self.downstream.identity is not None
            if not self._authorize(field_value(self.fields, PEER_METADATA) if verified else None):
                return
            self.destination = self.downstream.inbound_target
        elif not self._route():
            return
        inbound = self.direction == "inbound"
        fields = [(name, value) for name, value in self.fields
                  if name not in _NOT_FORWARDED and (name != b"te" or value.strip().lower() == b"trailers")
                  and not (inbound and name in _CALLER)]
        request_id = field_value(self.fields, b"x-request-id")
        if not request_id:
            request_id = new_request_id()
            fields.append((b"x-request-id", request_id))
        self.request_id = request_id
        if inbound:
            if self.peer_identity:
                fields.append((_IDENTITY, self.peer_identity.encode()))
            fields.append((b"x-forwarded-for", self.downstream.peer_ip.removeprefix("::ffff:").encode()))
        self.up_fields = fields
        self.start_timer(self.timed_out)
        self.dispatch()

    def dispatch(self) -> None:
        h2 = self._wants_h2()
        key, tls = self._pool_key(h2)
        self.attempt_begins(key)
        if key[2] == ():
            self._failed("connect-failure", 503, "it needs mesh mTLS; this sidecar runs without --identity")
            return
        pool = self.engine.pool
        self.h1 = not h2
        if h2:
            conn = pool.take_h2(key)
            if conn is not None:
                self.attach(conn, tls is not None)
                return
        else:
            conn1 = pool.take(key)
            if conn1 is not None:
                self.attach_h1(conn1)
                return
        self.connecting = self.engine.spawn(self._connect(key, tls))

    def _wants_h2(self) -> bool:
        """`protocol: http2|http1` as the backend says; `auto` keeps HTTP/2 for gRPC (which needs it end
        to end) and for mesh peers (ALPN settles it), and speaks HTTP/1.1 to other plaintext backends."""
        backend = self.backends[(self.attempt - 1) % len(self.backends)] if self.backends else None
        protocol = backend.protocol if backend is not None else "auto"
        if protocol != "auto":
            return protocol == "http2"
        return self.grpc or (backend is not None and backend.tls == "mesh")

    async def _open(self, key: PoolKey, tls: Any, timeout: float | None) -> Upstream | H2Upstream:
        pool = self.engine.pool
        return await (pool.connect(key, tls, timeout) if self.h1 else pool.connect_h2(key, tls, timeout))

    def _unused(self, conn: Upstream | H2Upstream) -> None:
        if self.h1:  # an HTTP/2 connection went to the pool, other streams may use it
            conn.close()

    def _attach_opened(self, conn: Upstream | H2Upstream, tls: Any) -> None:
        if self.h1:
            self.attach_h1(conn)  # type: ignore[arg-type]
        else:
            self.attach(conn, tls is not None)  # type: ignore[arg-type]

    def attach(self, conn: H2Upstream, secure: bool) -> None:
        self.upstream = conn
        headers = [
            (b":method", self.method), (b":scheme", b"https" if secure else b"http"),
            (b":authority", self.authority), (b":path", self.path), *self.up_fields,
        ]
        if self.mesh:
            headers.append((PEER_METADATA, self.engine.metadata_value(self.service)))
        body, self.backlog = b"".join(self.backlog), []
        trailers = self.request_trailers_
        self.up_stream = conn.open(self, headers, self.request_done and not body and trailers is None)
        if body or (self.request_done and trailers is not None):
            conn.send_body(self.up_stream, body, end=self.request_done and trailers is None)
            if trailers is not None:
                conn.send_end(self.up_stream, trailers)
        conn.write_out()
        self._ack_client()

    def request_data(self, data: bytes, flow_length: int) -> None:
        if self.finished:
            self.downstream.acknowledge(self.stream_id, flow_length)
            return
        self.bytes_in += len(data)
        self.keep(data)
        self.owed_client += flow_length
        conn = self.upstream
        if conn is None:
            self.backlog.append(data)
            return
        if self.h1:
            conn.transport.write(chunk(data) if self.chunked else data)
        else:
            conn.send_body(self.up_stream, data)
            conn.write_out()
        self._ack_client()

    def request_end(self) -> None:
        self.request_done = True
        conn = self.upstream
        if conn is None or self.finished:
            return
        if self.h1:
            if self.chunked:
                conn.transport.write(LAST_CHUNK)
        else:
            conn.send_end(self.up_stream)
            conn.write_out()

    def request_trailers(self, trailers: list[Header]) -> None:
        if self.h1:  # HTTP/1.1 backends get no request trailers (no gRPC client sends them)
            self.request_end()
            return
        self.request_done = True
        self.request_trailers_ = trailers
        conn = self.upstream
        if conn is not None and not self.finished:
            conn.send_end(self.up_stream, trailers)
            conn.write_out()

    def _ack_client(self) -> None:
        conn = self.upstream
        if self.owed_client and conn is not None and (self.h1 or not conn.waiting(self.up_stream)):
            self.downstream.acknowledge(self.stream_id, self.owed_client)
            self.owed_client = 0
            self.downstream.write_out()

    def upstream_drained(self) -> None:
        self._ack_client()

    # --- the response ------------------------------------------------------------------------------
    def response_headers(self, conn: H2Upstream, headers: list[Header], ended: bool) -> None:
        if conn is not self.upstream or self.finished:
            return
        status = int(field_value(headers, b":status") or 0)
        grpc_status = field_value(headers, b"grpc-status") if ended else b""
        conditions = status_conditions(status)
        if grpc_status.isdigit():
            conditions += grpc_conditions(int(grpc_status))
        if conditions and self.request_done and self._may_retry(conditions):
            self.attempt_done(status)
            self._drop_upstream(reset=not ended)
            self.status = status
            self._retry()
            return
        if conditions and self._exhausted(conditions):
            self.flags = RETRIES_EXHAUSTED
        self.status = status
        self.headers_sent = True
        if grpc_status.isdigit():
            self.grpc_status = int(grpc_status)
        if self.mesh and (metadata := field_value(headers, PEER_METADATA)):
            self.peer_answered(metadata, conn.principal)
        downstream = self.downstream
        downstream.send_headers(self.stream_id, self._answer_fields(headers), ended)
        downstream.write_out()
        if ended:
            self._drop_upstream(reset=False)
            self.finish(status)

    def response_data(self, conn: H2Upstream, data: bytes, flow_length: int) -> None:
        if conn is not self.upstream or self.finished:
            conn.acknowledge(self.up_stream, flow_length)
            return
        downstream = self.downstream
        self.bytes_out += len(data)
        downstream.send_body(self.stream_id, data)
        downstream.write_out()
        self.owed_upstream += flow_length
        self._ack_upstream()

    def _ack_upstream(self) -> None:
        conn = self.upstream
        if self.owed_upstream and conn is not None and not self.h1 and not self.downstream.waiting(self.stream_id):
            conn.acknowledge(self.up_stream, self.owed_upstream)
            self.owed_upstream = 0
            conn.write_out()

    def client_drained(self) -> None:
        conn = self.upstream
        if self.h1 and conn is not None and conn.paused:
            conn.paused = False
            conn.transport.resume_reading()
            return
        self._ack_upstream()

    def response_trailers(self, conn: H2Upstream, trailers: list[Header]) -> None:
        if conn is not self.upstream or self.finished:
            return
        grpc_status = field_value(trailers, b"grpc-status")
        if grpc_status.isdigit():
            self.grpc_status = int(grpc_status)
        self.downstream.send_end(self.stream_id, trailers)
        self.downstream.write_out()
        self._drop_upstream(reset=False)
        self.finish(self.status)

    def response_end(self, conn: H2Upstream) -> None:
        if conn is not self.upstream or self.finished:
            return
        self.downstream.send_end(self.stream_id)
        self.downstream.write_out()
        self._drop_upstream(reset=False)
        self.finish(self.status)

    def _drop_upstream(self, reset: bool) -> None:
        """Done with the backend's stream: acknowledge what it sent (the connection's window is shared)."""
        conn, self.upstream = self.upstream, None
        if conn is None:
            return
        if self.h1:  # mid-exchange: the HTTP/1.1 connection cannot be reused
            conn.close()
            return
        conn.acknowledge(self.up_stream, self.owed_upstream)
        self.owed_upstream = 0
        if reset:
            conn.reset(self.up_stream)
        conn.close_stream(self.up_stream)
        conn.write_out()

    # --- a backend that speaks HTTP/1.1 (the Upstream protocol calls these) ------------------------------
    def attach_h1(self, conn: Upstream) -> None:
        self.upstream = conn  # type: ignore[assignment]
        conn.exchange = self  # type: ignore[assignment]
        lines = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (self.method, self.path, self.authority)]
        if self.mesh:
            lines.append(self.engine.metadata_line(self.service))
        has_length = False
        for name, value in self.up_fields:
            if name != b"te":
                has_length = has_length or name == b"content-length"
                lines.append(b"%s: %s\r\n" % (name, value))
        body, self.backlog = b"".join(self.backlog), []
        self.chunked = not has_length and not (self.request_done and not body)
        if self.chunked:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        lines.append(b"\r\n")
        if body:
            lines.append(chunk(body) if self.chunked else body)
        if self.chunked and self.request_done:
            lines.append(LAST_CHUNK)
        conn.transport.write(b"".join(lines))  # type: ignore[union-attr]
        self._ack_client()

    def response_head(self, conn: Upstream, status: int, reason: bytes, headers: list[Header]) -> None:
        if conn is not self.upstream or self.finished or status < 200:
            return  # 1xx: HTTP/2 has no use for a relayed 100 here
        conditions = status_conditions(status)
        if self.request_done and self._may_retry(conditions):
            self.attempt_done(status)
            self._drop_upstream(reset=False)
            self.status = status
            self._retry()
            return
        if conditions and self._exhausted(conditions):
            self.flags = RETRIES_EXHAUSTED
        self.status = status
        self.headers_sent = True
        fields = [(name.lower(), value) for name, value in headers]
        if self.mesh and (metadata := field_value(fields, PEER_METADATA)):
            self.peer_answered(metadata, conn.principal)
        fields = [(b":status", b"%d" % status), *self._answer_fields(fields)]
        bodiless = self.method == b"HEAD" or status in (204, 304)
        self.downstream.send_headers(self.stream_id, fields, bodiless)
        self.downstream.write_out()
        if bodiless:  # llhttp would wait for a HEAD response's body: this connection is done
            self._drop_upstream(reset=False)
            self.finish(status)

    def response_body(self, data: bytes) -> None:
        if self.finished or not self.headers_sent:
            return
        downstream = self.downstream
        self.bytes_out += len(data)
        downstream.send_body(self.stream_id, data)
        conn = self.upstream
        if downstream.waiting(self.stream_id) and conn is not None and not conn.paused:
            conn.paused = True  # the client's window is shut: stop reading the backend until it opens
            conn.transport.pause_reading()

    def response_complete(self, conn: Upstream, keep_alive: bool) -> None:
        if conn is not self.upstream or self.finished or not self.headers_sent:
            return
        self.upstream = None
        if keep_alive and self.request_done:
            conn.exchange = None
            conn.reusable = True  # back to the pool once its parser returns
        else:
            conn.close()
        self.downstream.send_end(self.stream_id)
        self.downstream.write_out()
        self.finish(self.status)

    def upstream_eof(self, conn: Upstream) -> None:
        if conn is self.upstream and self.headers_sent:  # a close-delimited body ends with the connection
            self.response_complete(conn, False)

    def upgraded(self, conn: Upstream, rest: bytes) -> None:
        self.upstream_failed(conn, "reset", "the backend switched protocols on an HTTP/2 stream")

    # --- failures ------------------------------------------------------------------------------------
    def upstream_failed(self, conn: H2Upstream, condition: str, detail: str) -> None:
        if conn is not self.upstream or self.finished:
            return
        self._drop_upstream(reset=False)
        if self.headers_sent:  # too late to answer: end the client's stream as the backend ended ours
            self.downstream.reset(self.stream_id, ErrorCodes.INTERNAL_ERROR)
            self.downstream.write_out()
            self._cut(UPSTREAM_CONNECTION_TERMINATION, self.headers_sent)
            return
        self._failed(condition, 502, detail)

    def _failed(self, condition: str, status: int, detail: str) -> None:
        self.attempt_failed(condition)
        if self.request_done and self._may_retry((condition,)):
            self._retry()
            return
        self._give_up(condition, status, detail)

    def _answer_fields(self, fields: list[Header]) -> list[Header]:
        """A response's fields for the client: hop-by-hop ones and the peer's metadata dropped; a
        caller verified by mTLS learns, in this sidecar's own metadata, who answered."""
        fields = [(n, v) for n, v in fields if n not in _DROPPED]
        if self.direction == "inbound" and self.downstream.identity is not None:
            fields.append((PEER_METADATA, self.engine.metadata_value()))
        return fields

    def timed_out(self) -> None:
        if self.finished:
            return
        self._drop_upstream(reset=True)
        if self.connecting is not None:
            self.connecting.cancel()
        timeout = self.route.timeout if self.route else 0
        message = f"meshlet: route {self.route_name!r} timed out after {timeout:g}s"
        self.attempt_done(self.status if self.headers_sent else 0, UPSTREAM_TIMEOUT)
        self.flags = UPSTREAM_TIMEOUT
        if not self.headers_sent:
            self.answer(504, message)
            return
        if self.grpc:  # the call began: end it with its trailers, as a deadline ends a call
            self.grpc_status = 4
            self.downstream.send_end(self.stream_id, [(b"grpc-status", b"4"), (b"grpc-message", grpc_message(message))])
        else:
            self.downstream.reset(self.stream_id, ErrorCodes.CANCEL)
        self.downstream.write_out()
        self.finish(self.status)

    def client_reset(self) -> None:
        if self.finished:
            return
        self._drop_upstream(reset=True)
        if self.connecting is not None:
            self.connecting.cancel()
        self.downstream.acknowledge(self.stream_id, self.owed_client)
        self.downstream.forget(self.stream_id)
        self._cut(DOWNSTREAM_DISCONNECT, self.headers_sent)

    def answer(self, status: int, message: str, close: bool = False) -> None:
        """What the sidecar says itself: gRPC calls get a trailers-only gRPC status."""
        downstream = self.downstream
        if self.grpc:
            self.grpc_status = HTTP_TO_GRPC.get(status, GRPC_UNKNOWN)
            downstream.send_headers(self.stream_id, [
                (b":status", b"200"), (b"content-type", GRPC), (b"grpc-status", b"%d" % self.grpc_status),
                (b"grpc-message", grpc_message(message)), (b"x-meshlet", b"local"),
            ], True)
            code = 200
        else:
            body = (message + "\n").encode()
            downstream.send_headers(self.stream_id, [
                (b":status", b"%d" % status), (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", b"%d" % len(body)), (b"x-meshlet", b"local"),
            ])
            downstream.send_body(self.stream_id, body, end=True)
            self.bytes_out += len(body)
            code = status
        if not self.request_done:  # nobody reads the rest of the request body
            downstream.acknowledge(self.stream_id, self.owed_client)
            self.owed_client = 0
        downstream.write_out()
        self.status = code
        self.finish(code)
