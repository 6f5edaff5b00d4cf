"""Every metric the sidecar exports, defined once.

Label values come only from policy names (route, backend, policy host), status codes and
response flags, never from raw paths or header values, so cardinality is bounded by the policy.
`ProxyMetrics` takes a `registry` so tests use a private one.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector

from meshlet.telemetry.istio import IstioMetrics
from meshlet.telemetry.outcome import DOWNSTREAM_PROTOCOL_ERROR, NO_FLAGS, UNKNOWN, Outcome, Workload

# ~100µs to 10s: loopback hops are sub-millisecond, route timeouts go up to seconds.
DURATION_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
METRICS_COMPAT: tuple[str, ...] = ("none", "istio")
RENDER_ATTEMPTS = 3


class ProxyMetrics:
    """The sidecar's request, upstream-attempt and policy metrics; `compat="istio"` adds Istio's
    standard series (meshlet.telemetry.istio) for `me`, this workload.

    Two views of a request, because a retry makes them differ: `meshlet_requests_total` is what
    the client got (under the backend that gave it), `meshlet_upstream_requests_total` every
    attempt under the backend that made it. A canary's 5xx that a retry hid from the client
    still counts against the canary there, which is what rollout analysis reads.
    """

    def __init__(self, registry: CollectorRegistry, compat: str = "none", me: Workload | None = None):
        self.registry = registry
        self.me = me or Workload()
        self.requests = Counter(
            "meshlet_requests", "Requests proxied, by direction, route, backend, the status code the client got "
            "(0: none), gRPC status (empty for calls that are not gRPC) and Envoy response flags.",
            ("direction", "route", "backend", "code", "grpc_status", "response_flags"), registry=registry,
        )
        self.duration = Histogram(
            "meshlet_request_duration_seconds", "Time from request headers to the end of the response.",
            ("direction", "route", "backend"), buckets=DURATION_BUCKETS, registry=registry,
        )
        self.upstream_requests = Counter(
            "meshlet_upstream_requests", "Attempts sent to a backend (retries included), by the backend that "
            "took them, its status code (0: no answer) and Envoy response flags.",
            ("direction", "route", "backend", "code", "response_flags"), registry=registry,
        )
        self.upstream_duration = Histogram(
            "meshlet_upstream_request_duration_seconds", "Time from sending an attempt to the end of its answer.",
            ("direction", "route", "backend"), buckets=DURATION_BUCKETS, registry=registry,
        )
        self.generation = Gauge(
            "meshlet_policy_generation", "Generation of the routing table in use.", registry=registry,
            multiprocess_mode="max",
        )
        self.applies = Counter(
            "meshlet_policy_applies", "Policy applies, by result (ok, invalid).", ("result",), registry=registry,
        )
        # Label children cached by their values: `labels()` validates and locks on every call
        # (~1.5 µs each); the set is bounded by the policy's routes and backends.
        self._children: dict[tuple, tuple[Counter, Histogram]] = {}
        self._attempts: dict[tuple, tuple[Counter, Histogram]] = {}
        self.istio = IstioMetrics(registry, self.me) if compat == "istio" else None

    def observe(self, outcome: Outcome) -> None:
        """One finished request, as its client saw it."""
        o = outcome
        key = (o.direction, o.route, o.backend, o.code, o.grpc_status, o.flags)
        children = self._children.get(key)
        if children is None:
            grpc = "" if o.grpc_status < 0 else str(o.grpc_status)
            children = self._children[key] = (
                self.requests.labels(o.direction, o.route, o.backend, str(o.code), grpc, o.flags or NO_FLAGS),
                self.duration.labels(o.direction, o.route, o.backend),
            )
        count, duration = children
        count.inc()
        duration.observe(o.seconds)
        if self.istio is not None:
            self.istio.request(o)

    def attempt(self, direction: str, route: str, backend: str, code: int, flags: str, seconds: float) -> None:
        """One upstream attempt, against the backend that made it; `code` 0: it never answered."""
        key = (direction, route, backend, code, flags)
        children = self._attempts.get(key)
        if children is None:
            children = self._attempts[key] = (
                self.upstream_requests.labels(direction, route, backend, str(code), flags or NO_FLAGS),
                self.upstream_duration.labels(direction, route, backend),
            )
        count, duration = children
        count.inc()
        duration.observe(seconds)

    def tcp(self, direction: str, service: str, peer: Workload | None, mtls: bool, sent: int, received: int,
            flags: str = NO_FLAGS) -> None:
        """One connection relayed at L4 (WebSocket, CONNECT, a protocol not HTTP), at its close."""
        if self.istio is not None:
            self.istio.tcp(direction, service, peer, mtls, sent, received, flags)

    def invalid(self, direction: str, code: int) -> None:
        """A request too malformed to route: the sidecar answered `code` itself."""
        self.observe(Outcome(direction, "invalid", "none", UNKNOWN, code, DOWNSTREAM_PROTOCOL_ERROR))


def enable_multiprocess(directory: Path) -> None:
    """Make metrics created from now on in this process (and its children) write to `directory`.

    prometheus-client picks its value store when it is first imported; the CLI imports it
    before it knows about --workers, so the choice is made again here.
    """
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = values.get_value_class()


def multiprocess_render(directory: Path) -> Callable[[], bytes]:
    """The exposition of every process's metrics in `directory`, summed (gauges: max)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))

    def render() -> bytes:
        # A worker adding a label set grows its file while we read it; a second read is consistent.
        for attempt in range(RENDER_ATTEMPTS):
            try:
                return generate_latest(registry)
            except (ValueError, UnicodeDecodeError, struct.error, OSError):
                if attempt == RENDER_ATTEMPTS - 1:
                    raise
                time.sleep(0.01)
        raise AssertionError("unreachable")

    return render
