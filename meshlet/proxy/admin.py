"""The admin API on 127.0.0.1:15000: read and replace the policy, health, readiness, metrics.

PUT /policy validates and compiles before anything changes, so a 400 leaves the running
table exactly as it was. With `--workers`, the supervisor runs this API: it validates once,
hands the accepted policy to every worker (`distribute`), then records it as current; each
worker runs the same API on a private loopback port and is told the generation to use.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from meshlet.policy import PolicyInvalid
from meshlet.proxy.httpserver import Reply, Request
from meshlet.proxy.state import Applied, PolicyState
from meshlet.telemetry.proxy import ProxyMetrics

POLICY_FILE = "policy"  # errors of a PUT read `policy:LINE:COL: message`
GENERATION_HEADER = "x-meshlet-generation"  # supervisor → worker: keep generations in step

Distribute = Callable[[Applied], Awaitable[None]]


class DistributionError(Exception):
    """Some worker did not take a validated policy (it died): the API answers 500."""


def _json(status: int, value: object) -> Reply:
    return Reply(status, (json.dumps(value, indent=2) + "\n").encode(), "application/json")


class AdminApi:
    """`ready` says whether the listeners are up; a policy is always loaded once we run."""

    def __init__(
        self, state: PolicyState, metrics: ProxyMetrics, ready: Callable[[], bool],
        distribute: Distribute | None = None, render_metrics: Callable[[], bytes] | None = None,
        certs: Callable[[], dict] | None = None,
    ):
        self.state = state
        self.metrics = metrics
        self.ready = ready
        self.distribute = distribute
        self.certs = certs  # the mTLS addon's view of the workload certificate (GET /certs)
        self.render_metrics = render_metrics or (lambda: generate_latest(metrics.registry))
        metrics.generation.set(state.generation)

    async def __call__(self, request: Request) -> Reply:
        path, method = request.path, request.method
        if path == "/policy" and method == "GET":
            return _json(200, {"generation": self.state.generation, "policy": self.state.current.source})
        if path == "/policy" and method == "PUT":
            return await self.put_policy(request)
        if path == "/healthz" and method == "GET":
            return Reply(200, b"ok\n")
        if path == "/readyz" and method == "GET":
            return Reply(200, b"ready\n") if self.ready() else Reply(503, b"not ready: listeners not up\n")
        if path == "/certs" and method == "GET" and self.certs is not None:
            return _json(200, self.certs())
        if path == "/metrics" and method == "GET":
            return Reply(200, self.render_metrics(), CONTENT_TYPE_LATEST)
        if path in ("/policy", "/healthz", "/readyz", "/metrics"):
            return Reply(405, f"method {method} not allowed on {path}\n".encode())
        return Reply(404, b"not found: try /policy /healthz /readyz /metrics\n")

    async def put_policy(self, request: Request) -> Reply:
        generation = request.headers.get(GENERATION_HEADER)
        # A worker told the generation by its supervisor does not count the apply: the supervisor did.
        counted = generation is None

        def count(result: str) -> None:
            if counted:
                self.metrics.applies.labels(result).inc()

        try:
            text = request.body.decode("utf-8")
            applied = self.state.prepare(text, POLICY_FILE, int(generation) if generation else None)
        except (UnicodeDecodeError, ValueError) as e:
            count("invalid")
            return _json(400, {"errors": [f"{POLICY_FILE}: {e}"]})
        except PolicyInvalid as e:
            count("invalid")
            return _json(400, {"errors": [str(error) for error in e.errors]})
        if self.distribute is not None:
            try:
                await self.distribute(applied)
            except DistributionError as e:
                count("error")
                return _json(500, {"errors": [str(e)]})
        self.state.swap(applied)
        count("ok")
        self.metrics.generation.set(applied.table.generation)
        return _json(200, {"generation": applied.table.generation})
