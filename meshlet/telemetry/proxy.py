"""Every metric the sidecar exports, defined once.

Label values come only from policy names (route, backend, policy host) and status codes,
never from raw paths or header values, so cardinality is bounded by the policy.
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

# ~100µs to 10s: loopback hops are sub-millisecond, route timeouts go up to seconds.
DURATION_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
# Istio's default request-duration buckets, in milliseconds.
ISTIO_MS_BUCKETS: tuple[float, ...] = (
    1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000,
)
METRICS_COMPAT: tuple[str, ...] = ("none", "istio")
RENDER_ATTEMPTS = 3


class ProxyMetrics:
    """The sidecar's request and policy metrics; `compat="istio"` adds Istio's standard two."""

    def __init__(self, registry: CollectorRegistry, compat: str = "none", workload: str = "unknown"):
        self.registry = registry
        self.workload = workload
        self.requests = Counter(
            "meshlet_requests", "Requests proxied, by direction, route, backend, status code and gRPC status "
            "(empty for calls that are not gRPC).",
            ("direction", "route", "backend", "code", "grpc_status"), registry=registry,
        )
        self.duration = Histogram(
            "meshlet_request_duration_seconds", "Time from request headers to the end of the response.",
            ("direction", "route", "backend"), buckets=DURATION_BUCKETS, registry=registry,
        )
        self.generation = Gauge(
            "meshlet_policy_generation", "Generation of the routing table in use.", registry=registry,
            multiprocess_mode="max",
        )
        self.applies = Counter(
            "meshlet_policy_applies", "Policy applies, by result (ok, invalid).", ("result",), registry=registry,
        )
        # Label children by (direction, route, backend, code): `labels()` validates and locks on
        # every call (~1.5 µs each); the set is bounded by the policy's routes and backends.
        self._children: dict[tuple[str, str, str, int, int], tuple[Counter, Histogram]] = {}
        self.istio_requests: Counter | None = None
        self.istio_duration: Histogram | None = None
        if compat == "istio":
            labels = (
                "reporter", "source_workload", "destination_service", "destination_service_name",
                "destination_version", "destination_workload", "request_protocol", "response_code",
                "grpc_response_status",
            )
            self.istio_requests = Counter(
                "istio_requests", "Istio-compatible request count.", labels, registry=registry,
            )
            self.istio_duration = Histogram(
                "istio_request_duration_milliseconds", "Istio-compatible request duration.", labels,
                buckets=ISTIO_MS_BUCKETS, registry=registry,
            )

    def observe(
        self, direction: str, route: str, backend: str, code: int, seconds: float, service: str = "unknown",
        grpc_status: int = -1,
    ) -> None:
        """One finished request; `code` 0 means no response reached the client, `grpc_status` -1 that
        the request was not a gRPC call (or ended without a status)."""
        key = (direction, route, backend, code, grpc_status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(direction, route, backend, str(code), "" if grpc_status < 0 else str(grpc_status)),
                self.duration.labels(direction, route, backend),
            )
        count, duration = children
        count.inc()
        duration.observe(seconds)
        if self.istio_requests is not None and self.istio_duration is not None:
            reporter = "source" if direction == "outbound" else "destination"
            grpc = grpc_status >= 0
            labels = (reporter, self.workload, service, service.split(".")[0], backend, backend,
                      "grpc" if grpc else "http", str(code), str(grpc_status) if grpc else "")
            self.istio_requests.labels(*labels).inc()
            self.istio_duration.labels(*labels).observe(seconds * 1000.0)


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
