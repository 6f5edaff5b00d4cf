"""What every request on the lean engine shares, whatever its framing (HTTP/1.1 or an HTTP/2
stream): routing by the running table, inbound authorization, which backend each attempt goes
to, the retry rules, and the records of what happened: one per upstream attempt, against the
backend that made it, and one `Outcome` of the request as its client saw it (metrics, access
log, tap).

The framings (meshlet.proxy.lean.exchange, meshlet.proxy.lean.stream) subclass `Request`; they
call `answer` for what the sidecar says itself and `finish` once, when the client has its answer.
Before either they set `flags` (Envoy's response flags) when the request ended badly, and they
close each attempt that ended other than with its response (`attempt_done`).
"""

from __future__ import annotations

import asyncio
import time
from random import getrandbits
from typing import TYPE_CHECKING, Any

from meshlet.mtls.inbound import inbound_mtls
from meshlet.policy.model import Backend, Route
from meshlet.proxy.inbound import APP_BACKEND, INBOUND_ROUTE, REFUSED_BACKEND
from meshlet.proxy.lean.http1 import Header
from meshlet.proxy.lean.upstream import ConnectFailed, PoolKey
from meshlet.proxy.lean.views import CookieView, HeaderView
from meshlet.proxy.peermeta import believed
from meshlet.proxy.tap import TapRecord
from meshlet.routing import Decision, RequestView, Unmatched, decide
from meshlet.routing.attempts import attempts_for, candidates
from meshlet.routing.hosts import host_key
from meshlet.telemetry.outcome import (
    NO_FLAGS,
    NO_ROUTE,
    RETRIES_EXHAUSTED,
    UNAUTHORIZED,
    UNKNOWN,
    UPSTREAM_CONNECT_FAILURE,
    UPSTREAM_CONNECTION_TERMINATION,
    Outcome,
    Workload,
    with_flag,
)

if TYPE_CHECKING:
    from meshlet.proxy.lean.engine import LeanEngine


MAX_REPLAY = 64 * 1024  # request body kept for a retry; a larger body is sent once
# The response flag of each failure condition an attempt can end with.
FAILURE_FLAGS = {"connect-failure": UPSTREAM_CONNECT_FAILURE, "reset": UPSTREAM_CONNECTION_TERMINATION}


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


class Request:
    """Routing and accounting of one request. `downstream` is its client connection (either framing),
    `fields` its header fields with lower-case names for HTTP/2 and as sent for HTTP/1.1."""

    __slots__ = (
        "attempt", "attempt_started", "authority", "backend", "backends", "backlog", "bytes_in", "bytes_out",
        "connecting", "decision", "destination", "direction", "downstream", "fields", "finished", "flags",
        "grpc_status", "history", "mesh", "method", "path", "peer", "peer_identity", "request_id", "route",
        "route_name", "service", "started", "status", "timer", "upstream_host",
    )
    protocol = "HTTP/1.1"  # as the access log names it (the HTTP/2 framing overrides it)

    def __init__(self, downstream: Any, method: bytes, fields: list[Header]) -> None:
        self.downstream = downstream
        self.direction: str = downstream.direction
        self.method = method
        self.fields = fields
        self.started = time.perf_counter()
        self.route_name = self.backend = self.service = "none"
        self.route: Route | None = None
        self.decision: Decision | None = None
        self.backends: list[Backend] = []
        self.destination: tuple[str, int] | None = None  # passthrough and inbound: where it goes
        self.attempt = 1
        self.authority = self.path = b""
        self.request_id = b""
        self.peer_identity: str = downstream.identity or ""
        self.finished = False
        self.history: list[bytes] | None = []  # the request body, kept for a retry up to MAX_REPLAY
        self.backlog: list[bytes] = []  # request body not yet sent to this attempt's backend
        self.connecting: asyncio.Task | None = None  # opening this attempt's connection
        self.timer: asyncio.TimerHandle | None = None
        self.status = 0
        self.grpc_status = -1  # a gRPC call's status, once known
        self.flags = NO_FLAGS  # Envoy's response flags of the outcome, set where it goes wrong
        self.bytes_in = self.bytes_out = 0  # body bytes from the client, and to it
        self.attempt_started = 0.0  # perf_counter() when the attempt in flight began; 0: none
        self.upstream_host: PoolKey | None = None  # of the last attempt
        self.mesh = False  # the attempt in flight is mesh mTLS (peer metadata goes both ways)
        self.peer: Workload | None = None  # the other side of the hop, once known

    @property
    def engine(self) -> LeanEngine:
        return self.downstream.engine

    def answer(self, status: int, message: str, close: bool = False) -> None:
        raise NotImplementedError

    def dispatch(self) -> None:
        """Send this attempt to its backend (the framing's)."""
        raise NotImplementedError

    async def _connect(self, key: PoolKey, tls: Any) -> None:
        """Open this attempt's connection (the route's timeout bounds it), then attach to it;
        a failure is a `connect-failure` (retried where the route allows, else 503)."""
        route = self.route
        try:
            conn = await self._open(key, tls, route.timeout if route else None)
        except (ConnectFailed, TimeoutError) as e:
            self.connecting = None
            if not self.finished:
                self._failed("connect-failure", 503, str(e) or "connect timed out")
            return
        self.connecting = None
        if self.finished:
            self._unused(conn)
            return
        self._attach_opened(conn, tls)

    async def _open(self, key: PoolKey, tls: Any, timeout: float | None) -> Any:
        raise NotImplementedError

    def _unused(self, conn: Any) -> None:
        """A connection opened for an exchange that ended meanwhile."""

    def _attach_opened(self, conn: Any, tls: Any) -> None:
        raise NotImplementedError

    def _failed(self, condition: str, status: int, detail: str) -> None:
        """The attempt in flight failed before any response (`condition`: connect-failure, reset)."""
        raise NotImplementedError

    def _retry(self) -> None:
        """The next attempt, to the next candidate, with the body kept so far."""
        self.attempt += 1
        self.backlog = list(self.history or ())
        self.dispatch()

    def _give_up(self, condition: str, status: int, detail: str) -> None:
        self.flags = FAILURE_FLAGS.get(condition, NO_FLAGS)
        if self._exhausted((condition,)):
            self.flags = with_flag(self.flags, RETRIES_EXHAUSTED)
        what = "unavailable" if status == 503 else "failed"
        self.answer(status, f"meshlet: backend {self.backend!r} {what}: {detail}")

    # --- attempts ----------------------------------------------------------------------------
    def attempt_begins(self, key: PoolKey) -> None:
        """An attempt goes to `key` (a stale pooled connection tried again is the same attempt)."""
        if not self.attempt_started:
            self.attempt_started = time.perf_counter()
        self.upstream_host = key
        self.mesh = key[2] is not None

    def attempt_done(self, code: int, flags: str = NO_FLAGS) -> None:
        """The attempt in flight ended: counted against its own backend, so a canary's 5xx that a
        retry hides from the client still counts against the canary. `code` 0: no answer."""
        started = self.attempt_started
        if started:
            self.attempt_started = 0.0
            self.downstream.engine.metrics.attempt(self.direction, self.route_name, self.backend, code, flags,
                                                   time.perf_counter() - started)

    def attempt_failed(self, condition: str) -> None:
        self.attempt_done(0, FAILURE_FLAGS.get(condition, NO_FLAGS))

    def _cut(self, flag: str, began: bool, notify: bool = True) -> None:
        """The request ends without (the rest of) its response: the attempt in flight and the outcome
        get `flag`, and the status of the response if it `began`, else 0 (none reached the client)."""
        status = self.status if began else 0
        self.attempt_done(status, flag)
        self.flags = flag
        self.finish(status, notify)

    def _exhausted(self, conditions: tuple[str, ...]) -> bool:
        """The route retries on one of `conditions`, and its attempts ran out (Envoy's URX)."""
        route = self.route
        if route is None or route.retries is None or self.history is None:
            return False
        method = self.method.decode("latin-1")
        return any(1 < attempts_for(route, method, c) <= self.attempt for c in conditions)

    def _route(self) -> bool:
        """Outbound: the policy's decision. False when answered here."""
        downstream = self.downstream
        engine = downstream.engine
        view = RequestView(
            self.method.decode("latin-1"), self.authority.decode("utf-8", "surrogateescape"),
            self.path.decode("utf-8", "surrogateescape"), HeaderView(self.fields), CookieView(self.fields),
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
            self.flags = NO_ROUTE
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
        self.flags = NO_ROUTE  # for the refusals below; cleared when it goes on
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
        self.flags = NO_FLAGS
        self.destination = destination
        return True

    def _authorize(self, metadata: bytes | None) -> bool:
        """Inbound: the caller's mesh identity against this workload's mTLS mode and allow list
        (a refusal is a 403 counted with backend `none`). The framing passes a verified identity
        on in PEER_IDENTITY_HEADER (`peer_identity`) and the caller's address in x-forwarded-for.
        `metadata` is the caller's x-meshlet-peer-metadata, believed only with a verified identity."""
        downstream = self.downstream
        mtls = inbound_mtls(downstream.engine.state.table.policies, downstream.engine.workload_labels)
        identity = downstream.identity
        self.route_name, self.backend, self.service = INBOUND_ROUTE, APP_BACKEND, UNKNOWN
        if identity is not None:
            self.peer, self.service = believed(metadata or b"", identity)
        if identity is None and mtls.mode == "STRICT":  # plaintext accepted before the policy became STRICT
            refusal = "mTLS required"
        elif identity is not None and mtls.allow and identity not in mtls.allow:
            refusal = f"peer identity {identity} is not allowed"
        else:
            return True
        self.backend = REFUSED_BACKEND
        self.flags = UNAUTHORIZED
        self.answer(403, f"meshlet: {refusal}")
        return False

    def _pool_key(self, h2: bool = False) -> tuple[PoolKey, object]:
        """This attempt's backend (named in `backend`) as a pool key, and its mesh TLS if any. A key
        whose TLS part is `()` names a mesh backend this sidecar cannot reach (no identity)."""
        engine = self.downstream.engine
        if self.destination is not None:
            return (self.destination[0], self.destination[1], None), None
        backend = self.backends[(self.attempt - 1) % len(self.backends)]
        self.backend = backend.name
        address = backend.address
        if backend.tls != "mesh":
            return (address.host, address.port, None), None
        tls = engine.upstream_tls(backend, h2)
        return (address.host, address.port, tls.pool_key if tls is not None else ()), tls

    def _may_retry(self, conditions: tuple[str, ...]) -> bool:
        route = self.route
        if route is None or route.retries is None or self.history is None:
            return False
        method = self.method.decode("latin-1")
        return any(self.attempt < attempts_for(route, method, c) for c in conditions)

    def keep(self, data: bytes) -> None:
        """Remember a piece of the request body for a retry, while the whole fits MAX_REPLAY."""
        history = self.history
        if history is not None:
            history.append(data)
            if sum(map(len, history)) > MAX_REPLAY:
                self.history = None

    def start_timer(self, on_timeout) -> None:
        route = self.route
        if route is not None and route.timeout is not None:
            self.timer = self.engine.loop.call_later(route.timeout, on_timeout)

    def peer_answered(self, metadata: bytes, principal: str) -> None:
        """Outbound: the x-meshlet-peer-metadata of a mesh-mTLS attempt's response, believed as far
        as `principal` (the SPIFFE ID its certificate proved) vouches for it. Without one, the
        backend's declaration stands (`other_side`)."""
        if self.mesh:
            self.peer = believed(metadata, principal)[0]

    def other_side(self) -> Workload | None:
        """The peer of this hop: what its metadata or certificate said, else what the last
        attempt's backend declares (None: nothing known)."""
        backends = self.backends
        if self.peer is None and backends:
            return self.downstream.engine.declared(backends[(self.attempt - 1) % len(backends)])
        return self.peer

    def finish(self, code: int, notify: bool = True) -> None:
        """The client has its answer (`code`; 0: none reached it): the one record of the request.
        Its text (method, authority, path, ids, the upstream host) is decoded only for a reader of
        it, the access log or a tap: metrics need none of it."""
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
        downstream = self.downstream
        engine = downstream.engine
        metrics = engine.metrics
        now = time.perf_counter()
        started = self.attempt_started
        if started:  # the attempt whose response the client got (attempt_done, inlined: every request)
            self.attempt_started = 0.0
            metrics.attempt(self.direction, self.route_name, self.backend, self.status, NO_FLAGS, now - started)
        outcome = Outcome(
            self.direction, self.route_name, self.backend, self.service, code, self.flags, now - self.started, 0.0,
            "", "", "", self.protocol, self.grpc_status, self.bytes_in, self.bytes_out, "", "", self.peer_identity,
            self.other_side() if engine.labels_peers else self.peer, downstream.identity is not None,
        )
        metrics.observe(outcome)
        log = engine.access_log
        if log is not None or engine.tap.active:
            self._describe(outcome)
            if log is not None:
                log.write(outcome)
            if engine.tap.active:
                engine.tap.publish(TapRecord(
                    outcome.start, outcome.direction, outcome.method, outcome.authority, outcome.path, outcome.route,
                    outcome.backend, code, outcome.seconds, outcome.peer_identity, outcome.request_id,
                ))
        if notify:
            downstream.exchange_done(self)

    def _describe(self, outcome: Outcome) -> None:
        """The request's text in its outcome, for the access log and tap."""
        outcome.start = time.time() - outcome.seconds
        outcome.method = self.method.decode("latin-1")
        outcome.authority = self.authority.decode("latin-1")
        outcome.path = self.path.decode("latin-1")
        outcome.request_id = self.request_id.decode("latin-1")
        host = self.upstream_host
        if host is not None:
            outcome.upstream_host = f"[{host[0]}]:{host[1]}" if ":" in host[0] else f"{host[0]}:{host[1]}"


