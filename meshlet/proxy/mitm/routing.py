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
from dataclasses import dataclass, field

from mitmproxy import connection, http
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.mode_specs import ReverseMode

from meshlet.mtls.upstream import UpstreamTls
from meshlet.policy.model import Backend
from meshlet.proxy.inbound import APP_BACKEND, INBOUND_ROUTE, REFUSED_BACKEND
from meshlet.proxy.mitm import responses
from meshlet.proxy.mitm.client import UpstreamError, UpstreamPool
from meshlet.proxy.state import PolicyState
from meshlet.proxy.tap import TapHub, TapRecord
from meshlet.routing import Decision, RequestView, Unmatched, decide, parse_cookies
from meshlet.routing.attempts import attempts_for, candidates, status_conditions
from meshlet.telemetry.outcome import Outcome
from meshlet.telemetry.proxy import ProxyMetrics

KEY = "meshlet"
REPLAYS = frozenset({"reset", "5xx", "gateway-error"})  # retry conditions that send a request again
PROBE_TIMEOUT = 1.0
log = logging.getLogger("meshlet.proxy")


@dataclass(slots=True)
class Exchange:
    """Per-request bookkeeping kept in `flow.metadata[KEY]`, dropped with the flow."""

    direction: str
    route: str
    backend: str
    service: str
    started: float
    decision: Decision | None = None
    buffered: bool = False
    done: bool = False
    tried: list[str] = field(default_factory=list)


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


def tap_record(flow: http.HTTPFlow, exchange: Exchange, code: int, elapsed: float, peer_identity: str) -> TapRecord:
    """What `meshlet tap` shows of a finished flow: the authority the client asked for (the
    upstream address was rewritten; the Host header was kept)."""
    request = flow.request
    return TapRecord(
        time.time() - elapsed, exchange.direction, request.method, request.host_header or request.pretty_host,
        request.path, exchange.route, exchange.backend, code, elapsed, peer_identity,
        request.headers.get("x-request-id", ""),
    )


class Routing:
    """One instance per process; shares the `PolicyState` with the admin API. `stream` is False
    when users' addons must see whole messages; `tap` gets a record per finished request while
    someone listens."""

    def __init__(
        self, state: PolicyState, metrics: ProxyMetrics, strict_hosts: bool = False, tap: TapHub | None = None,
        stream: bool = True,
    ):
        self.state = state
        self.metrics = metrics
        self.strict_hosts = strict_hosts
        self.tap = tap or TapHub()
        self.stream = stream
        self.pool = UpstreamPool()
        # Set by the mTLS addon: how the pool reaches a `tls: mesh` backend (None: no --identity),
        # and the SPIFFE ID it verified on an inbound client connection ("" when none).
        self.upstream_tls: Callable[[Backend], UpstreamTls | None] = lambda backend: None
        self.peer_identity: Callable[[connection.Client], str] = lambda client: ""
        self.open_upstreams: Counter[tuple[str, int]] = Counter()
        self.in_flight = 0

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if KEY in flow.metadata:
            return
        if isinstance(flow.client_conn.proxy_mode, ReverseMode):  # to the app (meshlet.proxy.mitm.inbound)
            self.in_flight += 1
            # Counted also when the mTLS addon answered already (403): refusals show in the metrics.
            backend = REFUSED_BACKEND if flow.response else APP_BACKEND
            flow.metadata[KEY] = Exchange("inbound", INBOUND_ROUTE, backend, "app", time.perf_counter())
            flow.request.stream = self.stream and flow.response is None
            return
        if flow.response:
            return
        self.in_flight += 1
        await self._route(flow, decide(self.state.table, request_view(flow)))

    async def _route(self, flow: http.HTTPFlow, decision: Decision | Unmatched | None) -> None:
        if decision is None:
            flow.metadata[KEY] = Exchange("outbound", "passthrough", "passthrough", "unknown", time.perf_counter())
            if self.strict_hosts:
                flow.response = responses.no_policy(flow.request.host_header or flow.request.pretty_host)
            else:
                if self.stream:
                    flow.request.stream = True
            return
        service = decision.policy.host
        if isinstance(decision, Unmatched):
            flow.metadata[KEY] = Exchange("outbound", "unmatched", "none", service, time.perf_counter())
            flow.response = responses.no_route(flow.request.host_header or flow.request.pretty_host)
            return
        exchange = Exchange("outbound", decision.route.name, decision.backend.name, service, time.perf_counter())
        exchange.decision = decision
        flow.metadata[KEY] = exchange
        if needs_pool(decision):
            exchange.buffered = True  # the `request` hook sends it once the body is in
            return
        await self._stream_to(flow, exchange, decision)

    async def _stream_to(self, flow: http.HTTPFlow, exchange: Exchange, decision: Decision) -> None:
        """Pick a backend that accepts connections (probing only one nobody is connected to)."""
        tries = attempts_for(decision.route, flow.request.method, "connect-failure")
        why = ""
        for backend in candidates(decision)[:tries] if tries > 1 else (decision.backend,):
            address = (backend.address.host, backend.address.port)
            if self.open_upstreams[address] <= 0 and (why := await probe(backend, PROBE_TIMEOUT) or ""):
                continue
            exchange.backend = backend.name
            flow.request.data.host, flow.request.data.port = address
            flow.request.scheme = "https" if backend.tls == "mesh" else "http"
            if self.stream:
                flow.request.stream = True
            return
        flow.response = responses.unavailable(exchange.backend, why)

    async def request(self, flow: http.HTTPFlow) -> None:
        exchange = flow.metadata.get(KEY)
        if flow.response or exchange is None or not exchange.buffered or exchange.decision is None:
            return
        flow.response = await self._send_buffered(flow.request, exchange, exchange.decision)

    async def _send_buffered(self, request: http.Request, exchange: Exchange, decision: Decision) -> http.Response:
        route, timeout = decision.route, decision.route.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        backends = candidates(decision)
        attempt = 0
        while True:
            backend = backends[attempt % len(backends)]
            exchange.backend = backend.name
            attempt += 1
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            tls = None
            if backend.tls == "mesh" and (tls := self.upstream_tls(backend)) is None:
                return responses.unavailable(backend.name, "it needs mesh mTLS; this sidecar runs without --identity")
            try:
                response = await self.pool.send((backend.address.host, backend.address.port), request, remaining, tls)
            except TimeoutError:
                return responses.timed_out(route.name, timeout or 0.0)
            except UpstreamError as e:
                if attempt < attempts_for(route, request.method, e.condition):
                    continue
                make = responses.unavailable if e.condition == "connect-failure" else responses.bad_gateway
                return make(backend.name, str(e))
            conditions = status_conditions(response.status_code)
            if not any(attempt < attempts_for(route, request.method, c) for c in conditions):
                return response

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and self.stream:
            flow.response.stream = True

    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow, flow.response.status_code if flow.response else 502)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow, flow.response.status_code if flow.response else 502)

    def _finish(self, flow: http.HTTPFlow, code: int) -> None:
        exchange = flow.metadata.get(KEY)
        if exchange is None or exchange.done:
            return
        exchange.done = True
        self.in_flight -= 1
        elapsed = time.perf_counter() - exchange.started
        self.metrics.observe(Outcome(exchange.direction, exchange.route, exchange.backend, exchange.service, code,
                                     seconds=elapsed))
        if self.tap.active:
            peer = self.peer_identity(flow.client_conn) if exchange.direction == "inbound" else ""
            self.tap.publish(tap_record(flow, exchange, code, elapsed, peer))

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
