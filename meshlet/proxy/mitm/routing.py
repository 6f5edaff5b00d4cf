"""The routing addon: asks the routing table where each request goes and rewrites the upstream.

Two ways to the backend. Routes without `timeout` or body-replaying `retries` stay on
mitmproxy's own streaming path (bodies streamed, WebSocket and HTTP/2 upstreams work); the
addon only rewrites the destination, after checking that a backend nobody is connected to
accepts connections (503 or a connect-failure retry instead of mitmproxy's generic 502).
Routes with a deadline or 5xx/reset retries go through `UpstreamPool`, which can stop at the
deadline (504) and send the request again. Either way the table is read once per request, so
a request finishes on the table it started with.

With users' addon scripts (`--addon`) nothing is streamed by this addon: their `request` and
`response` hooks see and may change whole messages, as under mitmproxy itself (bodies over
mitmproxy's `stream_large_bodies` still stream).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Callable

from mitmproxy import connection, http, tcp
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.mode_specs import ReverseMode

from meshlet.mtls.upstream import UpstreamTls
from meshlet.policy.model import Backend
from meshlet.proxy import peermeta
from meshlet.proxy.inbound import APP_BACKEND, INBOUND_ROUTE, REFUSED_BACKEND
from meshlet.proxy.mitm import metadata, responses
from meshlet.proxy.mitm.client import UpstreamError, UpstreamPool
from meshlet.proxy.mitm.exchange import KEY, REFUSED, Exchange, failure, outcome, tap_record
from meshlet.proxy.state import PolicyState
from meshlet.proxy.tap import TapHub
from meshlet.routing import Decision, RequestView, Unmatched, decide, parse_cookies
from meshlet.routing.attempts import attempts_for, candidates, status_conditions
from meshlet.telemetry.accesslog import AccessLog
from meshlet.telemetry.outcome import (
    NO_FLAGS,
    NO_ROUTE,
    RETRIES_EXHAUSTED,
    UNAUTHORIZED,
    UNKNOWN,
    UPSTREAM_CONNECT_FAILURE,
    UPSTREAM_CONNECTION_TERMINATION,
    UPSTREAM_TIMEOUT,
    Outcome,
    with_flag,
)
from meshlet.telemetry.proxy import ProxyMetrics

__all__ = ["KEY", "Exchange", "Routing", "attempts_for", "candidates", "needs_pool"]

REPLAYS = frozenset({"reset", "5xx", "gateway-error"})  # retry conditions that send a request again
PROBE_TIMEOUT = 1.0
log = logging.getLogger("meshlet.proxy")


def request_view(flow: http.HTTPFlow) -> RequestView:
    """What `decide()` sees, read from the raw header fields in one pass (mitmproxy's Headers API
    decodes through a multidict per call: ~5 µs of a ~7 µs view). Names and values decode as
    mitmproxy decodes them; repeated Cookie fields are joined (HTTP/2 splits cookies)."""
    request = flow.request
    headers: dict[str, str] = {}
    cookies: list[str] = []
    for raw_name, raw_value in request.data.headers.fields:
        name = raw_name.decode("utf-8", "surrogateescape").lower()
        value = raw_value.decode("utf-8", "surrogateescape")
        if name == "cookie":
            cookies.append(value)
        if name not in headers:
            headers[name] = value
    # HTTP/2's :authority, else Host. (mitmproxy's regular mode clears an HTTP/1.1 absolute-form
    # target's authority before any hook, so a Host contradicting the target wins here: README.)
    authority = request.authority or headers.get("host")
    peer = flow.client_conn.peername
    return RequestView(
        request.method, authority or request.pretty_host, request.path, headers,
        parse_cookies("; ".join(cookies)) if cookies else {}, peer[0] if peer else "", random.getrandbits(64),
    )


def needs_pool(decision: Decision) -> bool:
    """Deadlines and replays need meshlet's client (which speaks mesh mTLS too). It is HTTP/1.1
    only: gRPC's retry conditions are the lean engine's, and buffering would not serve them."""
    route = decision.route
    replays = route.retries is not None and REPLAYS.intersection(route.retries.on)
    return route.timeout is not None or bool(replays)


async def probe(backend: Backend, timeout: float) -> str | None:
    """None when the backend accepts a connection, else why not."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(backend.address.host, backend.address.port), timeout)
    except (OSError, TimeoutError) as e:
        return f"cannot connect to {backend.address}: {e or 'timed out'}"
    writer.close()
    return None


class Routing:
    """One instance per process; shares the `PolicyState` with the admin API. `stream` is False
    when users' addons must see whole messages. Every request ends as one `Outcome`, given to the
    metrics, the access log (when on) and tap (while someone listens)."""

    def __init__(
        self, state: PolicyState, metrics: ProxyMetrics, strict_hosts: bool = False, tap: TapHub | None = None,
        stream: bool = True, access_log: AccessLog | None = None,
    ):
        self.state = state
        self.metrics = metrics
        self.strict_hosts = strict_hosts
        self.tap = tap or TapHub()
        self.stream = stream
        self.access_log = access_log
        self.pool = UpstreamPool()
        # Set by the mTLS addon: how the pool reaches a `tls: mesh` backend (None: no --identity),
        # and the SPIFFE ID it verified on an inbound client or an outbound server connection ("": none).
        self.upstream_tls: Callable[[Backend], UpstreamTls | None] = lambda backend: None
        self.peer_identity: Callable[[connection.Client], str] = lambda client: ""
        self.server_identity: Callable[[connection.Server], str] = lambda server: ""
        self.open_upstreams: Counter[tuple[str, int]] = Counter()
        self.in_flight = 0
        self._metadata: dict[str, bytes] = {}  # service → this workload's peer metadata naming it
        self._upgraded: dict[str, Exchange] = {}  # client id → the request whose 101 made it a byte relay

    # --- requests ----------------------------------------------------------------------------
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if KEY in flow.metadata:  # routed already, or refused as malformed (meshlet.proxy.mitm.strict)
            return
        if isinstance(flow.client_conn.proxy_mode, ReverseMode):  # to the app (meshlet.proxy.mitm.inbound)
            self._inbound(flow)
            return
        if flow.response:
            return
        self.in_flight += 1
        metadata.take(flow.request)  # the app's own: only this sidecar speaks for this workload
        await self._route(flow, decide(self.state.table, request_view(flow)))

    def _inbound(self, flow: http.HTTPFlow) -> None:
        """Counted also when the mTLS addon answered already (403): refusals show in the metrics."""
        self.in_flight += 1
        request = flow.request
        exchange = Exchange("inbound", INBOUND_ROUTE, APP_BACKEND, UNKNOWN, time.perf_counter(), time.time())
        flow.metadata[KEY] = exchange
        said = metadata.take(request)  # never reaches the app; believed only from a verified caller
        identity = self.peer_identity(flow.client_conn)
        if identity:
            exchange.mtls = True
            exchange.peer, exchange.service = peermeta.believed(said or b"", identity)
        if flow.response is not None:
            exchange.backend = REFUSED_BACKEND
            exchange.flags = UNAUTHORIZED if flow.metadata.get(REFUSED) else NO_FLAGS
            return
        exchange.begin((request.host, request.port))
        if self.stream:
            request.stream = exchange.request_chunk

    async def _route(self, flow: http.HTTPFlow, decision: Decision | Unmatched | None) -> None:
        now, wall = time.perf_counter(), time.time()
        request = flow.request
        if decision is None:
            exchange = flow.metadata[KEY] = Exchange("outbound", "passthrough", "passthrough", UNKNOWN, now, wall)
            if self.strict_hosts:
                exchange.flags = NO_ROUTE
                flow.response = responses.no_policy(request.host_header or request.pretty_host)
            else:
                exchange.begin((request.host, request.port))
                if self.stream:
                    request.stream = exchange.request_chunk
            return
        service = decision.policy.host
        if isinstance(decision, Unmatched):
            exchange = flow.metadata[KEY] = Exchange("outbound", "unmatched", "none", service, now, wall)
            exchange.flags = NO_ROUTE
            flow.response = responses.no_route(request.host_header or request.pretty_host)
            return
        exchange = Exchange("outbound", decision.route.name, decision.backend.name, service, now, wall, decision)
        flow.metadata[KEY] = exchange
        if needs_pool(decision):
            exchange.buffered = True  # the `request` hook sends it once the body is in
            return
        await self._stream_to(flow, exchange, decision)

    async def _stream_to(self, flow: http.HTTPFlow, exchange: Exchange, decision: Decision) -> None:
        """Pick a backend that accepts connections (probing only one nobody is connected to); a
        refused probe is an attempt that failed to connect."""
        request = flow.request
        tries = attempts_for(decision.route, request.method, "connect-failure")
        backends = candidates(decision)
        why = ""
        for attempt in range(tries):
            backend = backends[attempt % len(backends)]
            address = self._aim(exchange, backend)
            began = time.perf_counter()
            if self.open_upstreams[address] <= 0 and (why := await probe(backend, PROBE_TIMEOUT) or ""):
                self._attempt(exchange, 0, UPSTREAM_CONNECT_FAILURE, began)
                continue
            request.data.host, request.data.port = address
            request.scheme = "https" if backend.tls == "mesh" else "http"
            self._offer_metadata(request, backend, decision.policy.host)
            exchange.begin(address)
            if self.stream:
                request.stream = exchange.request_chunk
            return
        flag = UPSTREAM_CONNECT_FAILURE
        exchange.flags = with_flag(flag, RETRIES_EXHAUSTED) if tries > 1 else flag  # as Envoy orders them
        flow.response = responses.unavailable(exchange.backend, why)

    async def request(self, flow: http.HTTPFlow) -> None:
        exchange = flow.metadata.get(KEY)
        if flow.response or exchange is None or not exchange.buffered or exchange.decision is None:
            return
        flow.response = await self._send_buffered(flow.request, exchange, exchange.decision)

    async def _send_buffered(self, request: http.Request, exchange: Exchange, decision: Decision) -> http.Response:
        """Attempts until one may stand: each is counted against its backend as it ends, and the
        last one's backend is the request's."""
        route, timeout = decision.route, decision.route.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        backends = candidates(decision)
        attempt = 0
        while True:
            backend = backends[attempt % len(backends)]
            address = self._aim(exchange, backend)
            attempt += 1
            tls = None
            if backend.tls == "mesh" and (tls := self.upstream_tls(backend)) is None:
                exchange.flags = UPSTREAM_CONNECT_FAILURE
                return responses.unavailable(backend.name, "it needs mesh mTLS; this sidecar runs without --identity")
            self._offer_metadata(request, backend, decision.policy.host)
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            began = time.perf_counter()
            try:
                response, identity = await self.pool.send(address, request, remaining, tls)
            except TimeoutError:
                self._attempt(exchange, 0, UPSTREAM_TIMEOUT, began)
                exchange.flags = UPSTREAM_TIMEOUT
                return responses.timed_out(route.name, timeout or 0.0)
            except UpstreamError as e:
                connect = e.condition == "connect-failure"
                flag = UPSTREAM_CONNECT_FAILURE if connect else UPSTREAM_CONNECTION_TERMINATION
                self._attempt(exchange, 0, flag, began)
                allowed = attempts_for(route, request.method, e.condition)
                if attempt < allowed:
                    continue
                exchange.flags = with_flag(flag, RETRIES_EXHAUSTED) if allowed > 1 else flag
                return (responses.unavailable if connect else responses.bad_gateway)(backend.name, str(e))
            self._attempt(exchange, response.status_code, NO_FLAGS, began)
            conditions = status_conditions(response.status_code)
            allowed = max((attempts_for(route, request.method, c) for c in conditions), default=1)
            if attempt < allowed:
                continue
            if allowed > 1:
                exchange.flags = RETRIES_EXHAUSTED
            exchange.peer = metadata.vouched(metadata.take(response), identity)
            return response

    def _aim(self, exchange: Exchange, backend: Backend) -> tuple[str, int]:
        """The next attempt goes to `backend`: until its own metadata says otherwise, the
        destination is what the policy declares."""
        exchange.backend, exchange.last, exchange.peer = backend.name, backend, None
        address = backend.address.host, backend.address.port
        exchange.upstream = f"{address[0]}:{address[1]}"
        return address

    def _attempt(self, exchange: Exchange, code: int, flags: str, began: float) -> None:
        self.metrics.attempt(exchange.direction, exchange.route, exchange.backend, code, flags,
                             time.perf_counter() - began)

    def _offer_metadata(self, request: http.Request, backend: Backend, service: str) -> None:
        """Only a mesh-mTLS attempt carries this workload's metadata: the peer can tell who sent it."""
        if backend.tls == "mesh":
            metadata.put(request, self._own_metadata(service))
        else:
            metadata.take(request)

    def _own_metadata(self, service: str = "") -> bytes:
        value = self._metadata.get(service)
        if value is None:
            value = self._metadata[service] = peermeta.encode(self.metrics.me, service)
        return value

    # --- responses -----------------------------------------------------------------------------
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        exchange = flow.metadata.get(KEY)
        response = flow.response
        if exchange is None or response is None:
            return
        if exchange.attempting and not exchange.upstream_code:
            exchange.upstream_code = response.status_code
        if exchange.direction == "outbound":
            said = metadata.take(response)  # never reaches the app
            backend = exchange.last
            if exchange.attempting and backend is not None and backend.tls == "mesh":
                exchange.peer = metadata.vouched(said, self.server_identity(flow.server_conn))
        elif exchange.mtls:  # a verified caller's sidecar learns who answered
            metadata.put(response, self._own_metadata())
        else:
            metadata.take(response)
        if self.stream and response.data.content is None:
            response.stream = exchange.response_chunk

    def response(self, flow: http.HTTPFlow) -> None:
        exchange = flow.metadata.get(KEY)
        if exchange is not None and flow.response is not None:
            if flow.response.status_code == 101 and flow.websocket is None:  # mitmproxy relays it as TCP next
                self._upgraded[flow.client_conn.id] = exchange
            self._finish(flow, exchange, flow.response.status_code, exchange.flags)

    def error(self, flow: http.HTTPFlow) -> None:
        exchange = flow.metadata.get(KEY)
        if exchange is not None:
            self._finish(flow, exchange, *failure(flow))

    # --- connections relayed by mitmproxy itself --------------------------------------------------
    def websocket_end(self, flow: http.HTTPFlow) -> None:
        """With addon scripts, a WebSocket is read as messages (mitmproxy's WebSocket API): counted
        as a relayed connection at its close, with the messages' payloads."""
        exchange, websocket = flow.metadata.get(KEY), flow.websocket
        if exchange is None or websocket is None:
            return
        received = sum(len(m.content) for m in websocket.messages if m.from_client)
        sent = sum(len(m.content) for m in websocket.messages if not m.from_client)
        self.metrics.tcp(exchange.direction, exchange.service, exchange.other_side(), exchange.mtls, sent, received)

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        """A connection mitmproxy relays as bytes: after a 101 (a WebSocket without addon
        scripts, another upgrade), or what its own NextLayer could not read."""
        flow.metadata[KEY] = [self._upgraded.pop(flow.client_conn.id, None), 0, 0]

    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        """Counted and let go: a TCP flow would otherwise keep every chunk it relayed (unless addon
        scripts may read them: then they are counted at the end)."""
        counts = flow.metadata.get(KEY)
        if counts is not None and flow.messages and self.stream:
            message = flow.messages.pop()
            counts[1 + message.from_client] += len(message.content)

    def tcp_end(self, flow: tcp.TCPFlow) -> None:
        counts = flow.metadata.pop(KEY, None)
        if counts is None:
            return
        for message in flow.messages:
            counts[1 + message.from_client] += len(message.content)
        exchange, sent, received = counts
        connected = flow.server_conn.timestamp_tcp_setup is not None
        flags = NO_FLAGS if connected else UPSTREAM_CONNECT_FAILURE
        if exchange is None:
            direction = "inbound" if isinstance(flow.client_conn.proxy_mode, ReverseMode) else "outbound"
            self.metrics.tcp(direction, UNKNOWN, None, False, sent, received, flags)
        else:
            self.metrics.tcp(exchange.direction, exchange.service, exchange.other_side(), exchange.mtls, sent,
                             received, flags)

    tcp_error = tcp_end

    def client_disconnected(self, client: connection.Client) -> None:
        self._upgraded.pop(client.id, None)  # a 101 whose relay never started

    def _finish(self, flow: http.HTTPFlow, exchange: Exchange, code: int, flags: str) -> None:
        if exchange.done:
            return
        exchange.done = True
        self.in_flight -= 1
        now = time.perf_counter()
        if exchange.attempting:
            self.metrics.attempt(exchange.direction, exchange.route, exchange.backend, exchange.upstream_code, flags,
                                 now - exchange.attempt_started)
        identity = self.peer_identity(flow.client_conn) if exchange.direction == "inbound" else ""
        self.record(outcome(flow, exchange, code, flags, now - exchange.started, identity,
                            self.metrics.istio is not None))

    def record(self, finished: Outcome) -> None:
        self.metrics.observe(finished)
        if self.access_log is not None:
            self.access_log.write(finished)
        if self.tap.active:
            self.tap.publish(tap_record(finished))

    def refused_connection(self) -> None:
        """An inbound connection the mTLS addon refused before any request (meshlet.proxy.mitm.mtls):
        counted as the 403 it stands for."""
        self.record(Outcome("inbound", INBOUND_ROUTE, REFUSED_BACKEND, UNKNOWN, 403, UNAUTHORIZED, start=time.time()))

    # --- connections -------------------------------------------------------------------------------
    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.server.address:
            self.open_upstreams[data.server.address] += 1

    def server_disconnected(self, data: server_hooks.ServerConnectionHookData) -> None:
        address = data.server.address
        if address in self.open_upstreams:
            self.open_upstreams[address] -= 1
            if self.open_upstreams[address] <= 0:
                del self.open_upstreams[address]  # pass-through destinations must not pile up

    def done(self) -> None:
        self.pool.close()
