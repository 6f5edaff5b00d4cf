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

import asyncio
import time
from random import getrandbits
from typing import TYPE_CHECKING

from meshlet.mtls.inbound import PEER_IDENTITY_HEADER, inbound_mtls
from meshlet.policy.model import Backend, Route
from meshlet.proxy.lean.http1 import (
    CONTINUE,
    HOP_BY_HOP,
    LAST_CHUNK,
    REASONS,
    Header,
    chunk,
    connection_tokens,
    local_response,
    status_line,
)
from meshlet.proxy.lean.relay import relay_to, splice
from meshlet.proxy.lean.upstream import ConnectFailed, PoolKey, Upstream
from meshlet.proxy.lean.views import CookieView, HeaderView
from meshlet.proxy.tap import TapRecord
from meshlet.routing import Decision, RequestView, Unmatched, decide
from meshlet.routing.attempts import attempts_for, candidates, status_conditions
from meshlet.routing.hosts import host_key

if TYPE_CHECKING:
    from meshlet.proxy.lean.downstream import Downstream

MAX_REPLAY = 64 * 1024  # request body kept for a retry; a larger body is sent once
MAX_BACKLOG = 64 * 1024  # request body held while connecting before the client is paused
CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"

# Request fields the exchange looks at (the rest pass through untouched, in order).
_HOST, _LENGTH, _TE, _CONNECTION, _EXPECT, _REQUEST_ID, _IDENTITY, _UPGRADE, _HOP = range(9)
_SPECIAL = {
    b"host": _HOST, b"content-length": _LENGTH, b"transfer-encoding": _TE, b"connection": _CONNECTION,
    b"expect": _EXPECT, b"x-request-id": _REQUEST_ID, PEER_IDENTITY_HEADER.encode(): _IDENTITY,
    b"upgrade": _UPGRADE,
    **{name: _HOP for name in HOP_BY_HOP - {b"transfer-encoding", b"connection", b"upgrade"}},
}
_NO_BODY_STATUS = frozenset((204, 304))
_PLAIN_CONNECTION = frozenset((b"keep-alive", b"close", b"upgrade"))  # names no other field


def new_request_id() -> bytes:
    """A random (version 4) UUID, as Envoy generates for x-request-id."""
    b = getrandbits(128)
    return b"%08x-%04x-4%03x-%04x-%012x" % (
        b >> 96, (b >> 80) & 0xFFFF, (b >> 64) & 0xFFF, ((b >> 48) & 0x3FFF) | 0x8000, b & 0xFFFFFFFFFFFF,
    )


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """(authority, origin-form path) of a request target; authority is empty in origin form."""
    if target[:1] == b"/" or target == b"*":
        return b"", target
    scheme_end = target.find(b"://")
    if scheme_end > 0:  # absolute form, as HTTP_PROXY clients send it
        rest = target[scheme_end + 3:]
        slash = rest.find(b"/")
        query = rest.find(b"?")
        cut = min(i for i in (slash, query, len(rest)) if i >= 0)
        path = rest[cut:]
        return rest[:cut], path if path[:1] == b"/" else b"/" + path
    return target, b""  # authority form (CONNECT)


def parse_authority(authority: str, default_port: int = 80) -> tuple[str, int] | None:
    host = host_key(authority)
    colon = authority.rfind(":")
    if colon > authority.rfind("]"):
        port_text = authority[colon + 1:]
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            return None
        return host, int(port_text)
    return (host, default_port) if host else None


class Exchange:
    __slots__ = (
        "attempt",
        "authority",
        "backend",
        "backends",
        "backlog",
        "backlog_bytes",
        "chunked",
        "close_after",
        "connecting",
        "continued",
        "decision",
        "destination",
        "direction",
        "downstream",
        "expect",
        "finished",
        "head",
        "headers",
        "history",
        "http10",
        "keep_alive",
        "method",
        "no_body",
        "path",
        "peer_identity",
        "rechunk",
        "request_done",
        "request_id",
        "response_started",
        "retrying",
        "route",
        "route_name",
        "service",
        "stale_retried",
        "started",
        "status",
        "target",
        "timer",
        "until_eof",
        "upgrade",
        "upstream",
    )

    def __init__(
        self, downstream: Downstream, method: bytes, target: bytes, headers: list[Header], http10: bool,
        keep_alive: bool, upgrade: bool,
    ) -> None:
        self.downstream = downstream
        self.direction = downstream.direction
        self.method = method
        self.target = target
        self.headers = headers
        self.http10 = http10
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.started = time.perf_counter()
        self.route_name = self.backend = self.service = "none"
        self.route: Route | None = None
        self.decision: Decision | None = None
        self.backends: list[Backend] = []
        self.destination: tuple[str, int] | None = None  # passthrough and inbound: where it goes
        self.attempt = 1
        self.head = b""
        self.authority = self.path = b""
        self.request_id = b""
        self.peer_identity = downstream.identity or ""
        self.chunked = self.expect = self.continued = False
        self.request_done = self.finished = self.response_started = False
        self.close_after = self.rechunk = self.until_eof = self.retrying = self.stale_retried = False
        self.no_body = method == b"HEAD"
        self.history: list[bytes] | None = []
        self.backlog: list[bytes] = []
        self.backlog_bytes = 0
        self.upstream: Upstream | None = None
        self.connecting: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.status = 0

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
        for name, value in self.headers:
            kind = _SPECIAL.get(name.lower())
            if kind is None:
                lines.append(b"%s: %s\r\n" % (name, value))
            elif kind == _HOST:  # written below, from the target when it names an authority
                if host is not None:  # RFC 9112 §3.2: which one would the backend believe?
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
            # _IDENTITY: set by the sidecar only, whatever the caller sent; _UPGRADE, _HOP: hop-by-hop
        if te is not None:
            if te.rsplit(b",", 1)[-1].strip().lower() != b"chunked":  # RFC 9112 §6.3: no framing, no request
                self.answer(400, "meshlet: malformed request: Transfer-Encoding must end in chunked", close=True)
                return
            if te.strip().lower() != b"chunked":  # RFC 9112 §6.1: a coding we would have to undo
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
        if self.direction == "inbound":
            if not self._authorize(lines):
                return
            self.destination = downstream.inbound_target
            self.route_name, self.backend, self.service = "inbound", "app", "app"
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
        route = self.route
        if route is not None and route.timeout is not None:
            self.timer = downstream.engine.loop.call_later(route.timeout, self.timed_out)
        self.dispatch()

    def _field(self, wanted: bytes) -> bytes:
        return next((value for name, value in self.headers if name.lower() == wanted), b"")

    def _route(self) -> bool:
        """Outbound: the policy's decision. False when answered here."""
        downstream = self.downstream
        engine = downstream.engine
        view = RequestView(
            self.method.decode("latin-1"), self.authority.decode("utf-8", "surrogateescape"),
            self.path.decode("utf-8", "surrogateescape"), HeaderView(self.headers), CookieView(self.headers),
            downstream.peer_ip, getrandbits(64),
        )
        decision = decide(engine.state.table, view)
        if decision is None:
            self.route_name = self.backend = "passthrough"
            self.service = "unknown"
            return self._passthrough(view.authority)
        self.service = decision.policy.host
        if isinstance(decision, Unmatched):
            self.route_name = "unmatched"
            self.answer(404, f"meshlet: no route for host {view.authority!r} in the current policy")
            return False
        self.decision = decision
        self.route = decision.route
        self.route_name = decision.route.name
        self.backend = decision.backend.name
        self.backends = candidates(decision) if decision.route.retries is not None else [decision.backend]
        return True

    def _passthrough(self, authority: str) -> bool:
        """A host no policy governs goes where it was sent: the redirected connection's original
        destination, else the authority (HTTP_PROXY and Host-header clients)."""
        engine = self.downstream.engine
        if engine.config.strict_hosts:
            self.answer(404, f"meshlet: no policy governs host {authority!r} (--strict-hosts)")
            return False
        destination = self.downstream.original_destination or parse_authority(authority)
        if destination is None:
            self.answer(400, f"meshlet: cannot tell where to send a request for {authority!r}")
            return False
        if engine.is_own_address(destination):
            self.answer(400, f"meshlet: refusing a request addressed to the sidecar itself ({authority})")
            return False
        self.destination = destination
        return True

    def _authorize(self, lines: list[bytes]) -> bool:
        """Inbound: the caller's mesh identity against the policy's mTLS mode and allow list."""
        downstream = self.downstream
        mtls = inbound_mtls(downstream.engine.state.table.policies)
        identity = downstream.identity
        self.route_name, self.backend, self.service = "inbound", "app", "app"
        if identity is None:
            if mtls.mode == "STRICT":  # a plaintext connection accepted before the policy became STRICT
                self.answer(403, "meshlet: mTLS required")
                return False
            return True
        if mtls.allow and identity not in mtls.allow:
            self.answer(403, f"meshlet: peer identity {identity} is not allowed")
            return False
        lines.append(b"%s: %s\r\n" % (PEER_IDENTITY_HEADER.encode(), identity.encode()))
        return True

    def _tunnel(self) -> None:
        """CONNECT: a byte relay to the target (TLS the app originates stays end to end)."""
        downstream = self.downstream
        engine = downstream.engine
        self.route_name = self.backend = "passthrough"
        self.service = "unknown"
        destination = parse_authority(self.authority.decode("latin-1"), 443)
        if self.direction != "outbound" or destination is None or engine.is_own_address(destination):
            self.answer(400, "meshlet: CONNECT needs host:port of another server, on the outbound listener",
                        close=True)
            return
        downstream.detach()
        engine.spawn(self._open_tunnel(destination))

    async def _open_tunnel(self, destination: tuple[str, int]) -> None:
        downstream = self.downstream
        engine = downstream.engine
        ok = await relay_to(downstream.transport, destination, downstream.take_pending, engine.relays,
                            CONNECT_ESTABLISHED)
        if ok:
            self.finish(200)
        else:
            downstream.send(local_response(503, f"meshlet: cannot connect to {destination[0]}:"
                                                           f"{destination[1]}", close=True))
            downstream.transport.close()
            self.finish(503)

    # --- upstream connection -----------------------------------------------------------------
    def _pool_key(self) -> tuple[PoolKey, object]:
        engine = self.downstream.engine
        if self.destination is not None:
            return (self.destination[0], self.destination[1], None), None
        backend = self.backends[(self.attempt - 1) % len(self.backends)]
        self.backend = backend.name
        address = backend.address
        if backend.tls != "mesh":
            return (address.host, address.port, None), None
        tls = engine.upstream_tls(backend)
        return (address.host, address.port, tls.pool_key if tls is not None else ()), tls

    def dispatch(self) -> None:
        key, tls = self._pool_key()
        if key[2] == ():  # a mesh backend, and this sidecar has no identity
            self._failed("connect-failure", 503, "it needs mesh mTLS; this sidecar runs without --identity")
            return
        conn = self.downstream.engine.pool.take(key)
        if conn is not None:
            self.attach(conn)
        else:
            self.connecting = self.downstream.engine.spawn(self._connect(key, tls))

    async def _connect(self, key: PoolKey, tls) -> None:
        route = self.route
        try:
            conn = await self.downstream.engine.pool.connect(key, tls, route.timeout if route else None)
        except (ConnectFailed, TimeoutError) as e:
            self.connecting = None
            if not self.finished:
                self._failed("connect-failure", 503, str(e) or "connect timed out")
            return
        self.connecting = None
        if self.finished:
            conn.close()
            return
        self.attach(conn)

    def attach(self, conn: Upstream) -> None:
        self.upstream = conn
        conn.exchange = self
        out = [self.head]
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
        history = self.history
        if history is not None:
            history.append(data)
            if sum(map(len, history)) > MAX_REPLAY:
                self.history = None
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
        if status >= 500 and self._may_retry(status_conditions(status)):
            self.retrying = True  # its body is read and dropped; the next attempt follows
            self.status = status
            return
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
            if lname in HOP_BY_HOP:
                chunked = chunked or lname == b"transfer-encoding"
                if lname == b"connection":
                    connection = value if connection is None else connection + b"," + value
                continue
            if lname == b"content-length":
                has_length = True
            lines.append(b"%s: %s\r\n" % (name, value))
        if connection is not None and connection.lower() not in _PLAIN_CONNECTION:
            lines = _without_listed(lines, connection)
        if interim:
            return b"".join(lines) + b"\r\n"
        if status == 101:
            lines.append(b"Connection: upgrade\r\nUpgrade: %s\r\n" % _value(headers, b"upgrade"))
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
        splice(downstream.transport, conn.transport, engine.relays, downstream.take_pending(), rest)  # type: ignore[arg-type]
        self.finish(101)

    def upstream_failed(self, conn: Upstream, condition: str, detail: str) -> None:
        if conn is not self.upstream or self.finished:
            return
        self.upstream = None
        conn.close()
        if self.response_started:  # too late to answer: cut the client off, as the backend cut us
            self.close_after = True
            self.downstream.abort()
            self.finish(self.status)
            return
        if conn.used and not self.stale_retried and self.history is not None and not self.retrying:
            self.stale_retried = True  # a pooled connection the backend had closed: once more, fresh
            self.backlog = list(self.history)
            self.dispatch()
            return
        self.retrying = False
        self._failed(condition, 502, detail)

    def _failed(self, condition: str, status: int, detail: str) -> None:
        if self._may_retry((condition,)):
            self._retry()
            return
        if self.status >= 500:  # retries exhausted on 5xx answers: the client gets a 502 saying so
            detail = f"{detail}; last answer {self.status}"
        what = "unavailable" if status == 503 else "failed"
        self.answer(status, f"meshlet: backend {self.backend!r} {what}: {detail}")

    def _may_retry(self, conditions: tuple[str, ...]) -> bool:
        route = self.route
        if route is None or route.retries is None or self.history is None:
            return False
        method = self.method.decode("latin-1")
        return any(self.attempt < attempts_for(route, method, c) for c in conditions)

    def _retry(self) -> None:
        self.attempt += 1
        self.backlog = list(self.history or ())
        self.dispatch()

    def timed_out(self) -> None:
        if self.finished:
            return
        self._drop_upstream()
        if self.response_started:
            self.close_after = True
            self.downstream.abort()
            self.finish(self.status)
            return
        route = self.route
        self.answer(504, f"meshlet: route {self.route_name!r} timed out after {route.timeout if route else 0:g}s")

    # --- the end ------------------------------------------------------------------------------------
    def answer(self, status: int, message: str, close: bool = False) -> None:
        """A response the sidecar makes itself."""
        self.close_after = close = close or not self.keep_alive or not self.request_done or \
            self.downstream.engine.draining
        self.downstream.send(local_response(status, message, close))
        self.finish(status)

    def client_lost(self) -> None:
        """The client went away first: the backend's connection cannot be reused mid-exchange."""
        if self.finished:
            return
        self._drop_upstream()
        self.finish(0, notify=False)

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
            self.finish(self.status)
            return
        self.answer(status, message, close=True)

    def _drop_upstream(self) -> None:
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.close()
        if self.connecting is not None:
            self.connecting.cancel()

    def finish(self, code: int, notify: bool = True) -> None:
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
        downstream = self.downstream
        engine = downstream.engine
        seconds = time.perf_counter() - self.started
        engine.metrics.observe(self.direction, self.route_name, self.backend, code, seconds, self.service)
        if engine.tap.active:
            engine.tap.publish(TapRecord(
                time.time() - seconds, self.direction, self.method.decode("latin-1"),
                self.authority.decode("latin-1"), self.path.decode("latin-1"), self.route_name, self.backend,
                code, seconds, self.peer_identity, self.request_id.decode("latin-1"),
            ))
        if notify:
            downstream.exchange_done(self)


def _without_listed(lines: list[bytes], connection: bytes) -> list[bytes]:
    """RFC 9110 §7.6.1: fields a Connection field names are hop-by-hop too (rare: a second pass)."""
    listed = connection_tokens(((b"connection", connection),))
    return [line for line in lines if line.split(b":", 1)[0].lower() not in listed]


def _value(headers: list[Header], wanted: bytes) -> bytes:
    return next((value for name, value in headers if name.lower() == wanted), b"")


def _keeps_alive(headers: list[Header]) -> bool:
    return b"close" not in _value(headers, b"connection").lower()


__all__ = ["REASONS", "Exchange"]
