"""The admin API on 127.0.0.1:15000: read and replace the policy, health, readiness, metrics,
and `GET /tap`, the live requests as JSON lines (meshlet.proxy.tap).

It changes what the sidecar does, so it listens on loopback only (SidecarConfig checks);
`read_only` is the same API cut down to /healthz, /readyz and /metrics for the `--health`
port on the Pod IP, where the kubelet and Prometheus reach it.

PUT /policy validates and compiles before anything changes, so a 400 leaves the running
table exactly as it was. With `--workers`, the supervisor runs this API: it validates once,
hands the accepted policy to every worker (`distribute`), then records it as current; each
worker runs the same API on a private Unix socket (`internal`), the only place where the
generation and rollout-weight headers are obeyed: a client of the public API cannot set them.

Rollouts live where this API lives (`rollouts`): their weights are an overlay compiled into
the table and installed by the same swap and distribution as a PUT, under one lock so an
apply and a rollout step never interleave; workers receive the overlay in a header.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from meshlet.policy import PolicyInvalid
from meshlet.policy.errors import PolicyWarning
from meshlet.proxy.httpserver import Handler, Reply, Request, Stream
from meshlet.proxy.state import Applied, PolicyState, reweigh
from meshlet.rollout.api import BadCall, parse_call
from meshlet.rollout.machine import RolloutError, RolloutNotFound
from meshlet.rollout.service import Rollouts
from meshlet.rollout.weights import check_weights
from meshlet.telemetry.proxy import ProxyMetrics

log = logging.getLogger("meshlet.rollout")

POLICY_FILE = "policy"  # errors of a PUT read `policy:LINE:COL: message`
GENERATION_HEADER = "x-meshlet-generation"  # supervisor → worker: keep generations in step
WEIGHTS_HEADER = "x-meshlet-weights"  # supervisor → worker: the rollout overlay, JSON
TICK_SECONDS = 1.0  # how often rollouts are looked at; each has its own interval
HEALTH_PATHS: frozenset[str] = frozenset({"/healthz", "/readyz", "/metrics"})

Distribute = Callable[[Applied], Awaitable[None]]


class DistributionError(Exception):
    """Some worker did not take a validated policy (it died): the API answers 500."""


def _json(status: int, value: object) -> Reply:
    return Reply(status, (json.dumps(value, indent=2) + "\n").encode(), "application/json")


def read_only(handler: Handler, metrics: Handler | None = None) -> Handler:
    """Only GET /healthz, /readyz and /metrics of `handler`: what the `--health` port serves.
    `metrics`, when given, answers /metrics instead (the page with the app's metrics merged in)."""

    async def handle(request: Request) -> Reply | Stream:
        if request.path not in HEALTH_PATHS:
            return Reply(404, b"not found: this port serves /healthz /readyz /metrics\n")
        if request.method != "GET":
            return Reply(405, f"method {request.method} not allowed on {request.path}\n".encode())
        if request.path == "/metrics" and metrics is not None:
            return await metrics(request)
        return await handler(request)

    return handle


def _warnings(warnings: tuple[PolicyWarning, ...]) -> dict[str, list[str]]:
    """`{"warnings": ["policy:LINE:COL: warning: message", ...]}`, or nothing when there are none."""
    return {"warnings": [str(w) for w in warnings]} if warnings else {}


class AdminApi:
    """`ready` says whether the listeners are up; a policy is always loaded once we run.
    `internal`: a worker's private API, told generations and rollout weights by its supervisor."""

    def __init__(
        self, state: PolicyState, metrics: ProxyMetrics, ready: Callable[[], bool],
        distribute: Distribute | None = None, render_metrics: Callable[[], bytes] | None = None,
        certs: Callable[[], dict] | None = None, rollouts: Rollouts | None = None,
        tap: Callable[[], AsyncGenerator[bytes, None]] | None = None, internal: bool = False,
    ):
        self.internal = internal
        self.state = state
        self.metrics = metrics
        self.ready = ready
        self.distribute = distribute
        self.certs = certs  # the mTLS addon's view of the workload certificate (GET /certs)
        self.render_metrics = render_metrics or (lambda: generate_latest(metrics.registry))
        self.rollouts = rollouts
        self.tap = tap  # a new stream of tap lines per `GET /tap`
        self.lock = asyncio.Lock()  # one apply (PUT, rollout step, command) at a time
        metrics.generation.set(state.generation)

    async def __call__(self, request: Request) -> Reply | Stream:
        path, method = request.path, request.method
        if path == "/policy" and method == "GET":
            return _json(200, {"generation": self.state.generation, "policy": self.state.current.source})
        if path == "/policy" and method == "PUT":
            return await self.put_policy(request)
        if path == "/healthz" and method == "GET":
            return Reply(200, b"ok\n")
        if path == "/readyz" and method == "GET":
            if self.ready():
                return Reply(200, b"ready\n")
            return Reply(503, b"not ready: listeners not up, or no workload certificate yet\n")
        if path == "/certs" and method == "GET" and self.certs is not None:
            return _json(200, self.certs())
        if (path == "/rollouts" or path.startswith("/rollouts/")) and self.rollouts is not None:
            return await self.rollout_request(request)
        if path == "/metrics" and method == "GET":
            return Reply(200, self.render_metrics(), CONTENT_TYPE_LATEST)
        if path == "/tap" and method == "GET" and self.tap is not None:
            return Stream(self.tap())
        if path in ("/policy", "/healthz", "/readyz", "/metrics", "/tap"):
            return Reply(405, f"method {method} not allowed on {path}\n".encode())
        return Reply(404, b"not found: try /policy /healthz /readyz /metrics /tap\n")

    async def put_policy(self, request: Request) -> Reply:
        # Only the supervisor, on a worker's private socket, sets these; from anyone else they are ignored.
        generation = request.headers.get(GENERATION_HEADER) if self.internal else None
        overlay = request.headers.get(WEIGHTS_HEADER) if self.internal else None
        # A worker told the generation by its supervisor does not count the apply: the supervisor did.
        counted = generation is None

        def count(result: str) -> None:
            if counted:
                self.metrics.applies.labels(result).inc()

        async with self.lock:
            try:
                text = request.body.decode("utf-8")
                weights = check_weights(json.loads(overlay)) if overlay else None
                applied = self.state.prepare(text, POLICY_FILE, int(generation) if generation else None, weights)
            except (UnicodeDecodeError, ValueError) as e:
                count("invalid")
                return _json(400, {"errors": [f"{POLICY_FILE}: {e}"]})
            except PolicyInvalid as e:
                count("invalid")
                return _json(400, {"errors": [str(error) for error in e.errors], **_warnings(e.warnings)})
            notes: list[str] = []
            if self.rollouts is not None:  # keep or cancel each rollout, then compile its weights in
                notes = self.rollouts.reconcile(applied.policies)
                applied = reweigh(applied, self.rollouts.weights(applied.policies), applied.table.generation)
            try:
                await self.install(applied)
            except DistributionError as e:
                count("error")
                return _json(500, {"errors": [str(e)]})
        count("ok")
        # "rollouts": what the apply did to running rollouts (kept, cancelled, ended), when any ran;
        # "warnings": what the loader said of the text (deprecated fields), when it said anything
        return _json(200, {"generation": applied.table.generation, **({"rollouts": notes} if notes else {}),
                           **_warnings(applied.warnings)})

    async def install(self, applied: Applied) -> None:
        """Hand to every worker (raises DistributionError), then swap here: the one way in."""
        if self.distribute is not None:
            await self.distribute(applied)
        self.state.swap(applied)
        self.metrics.generation.set(applied.table.generation)

    async def install_rollout_weights(self) -> None:
        """Recompile the running policy with the rollouts' weights when they changed (caller holds the lock)."""
        assert self.rollouts is not None
        current = self.state.current
        weights = self.rollouts.weights(current.policies)
        if weights != current.weights:
            await self.install(reweigh(current, weights, current.table.generation + 1))

    async def rollout_request(self, request: Request) -> Reply:
        assert self.rollouts is not None
        try:
            call = parse_call(request.method, request.target)
        except BadCall as e:
            return _json(e.status, {"errors": [str(e)]})
        async with self.lock:
            try:
                if call.action is not None:
                    self.rollouts.act(self.state.current.policies, call.policy or "", call.action, call.route)
                    await self.install_rollout_weights()
                status = self.rollouts.status(call.policy)
            except RolloutNotFound as e:
                return _json(404, {"errors": [str(e)]})
            except RolloutError as e:
                return _json(409, {"errors": [str(e)]})
            except DistributionError as e:
                return _json(500, {"errors": [str(e)]})
        return _json(200, status[0] if call.policy is not None else {"rollouts": status})

    async def run_rollouts(self) -> None:
        """The rollouts' clock, in this API's event loop, until cancelled."""
        assert self.rollouts is not None
        rollouts = self.rollouts
        while True:
            await asyncio.sleep(TICK_SECONDS)
            async with self.lock:
                try:
                    # the reader (and, with --watch-kube, the Lease and status) may do file or network I/O
                    await asyncio.to_thread(rollouts.tick, self.state.current.policies)
                    await self.install_rollout_weights()
                except Exception as e:  # a failed read or worker must not stop the clock: next tick retries
                    log.warning("rollout tick failed (retrying next tick): %s: %s", type(e).__name__, e)
