"""mTLS metrics, defined once: handshake outcomes, session resumptions and the workload certificate's expiry."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

DIRECTIONS = ("inbound", "outbound")


class MtlsMetrics:
    """The two mTLS metric families, registered in `registry` (a private one in tests)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.handshakes = Counter(
            "meshlet_mtls_handshakes_total",
            "mTLS handshakes by direction and result: ok, no_cert, bad_ca, expired, denied (valid mesh "
            "certificate, identity not allowed), plaintext (no TLS: refused when STRICT, served otherwise).",
            ["direction", "result"],
            registry=registry,
        )
        self.resumed = Counter(
            "meshlet_mtls_resumed_total",
            "mTLS handshakes (counted ok above) that resumed an earlier session instead of exchanging certificates.",
            ["direction"],
            registry=registry,
        )
        self.cert_expiry = Gauge(
            "meshlet_cert_expiry_timestamp_seconds",
            "Unix time at which the sidecar's current workload certificate expires.",
            registry=registry,
            multiprocess_mode="min",  # with --workers: the worker holding the oldest certificate
        )

    def handshake(self, direction: str, result: str) -> None:
        self.handshakes.labels(direction=direction, result=result).inc()


_default: MtlsMetrics | None = None


def default_metrics() -> MtlsMetrics:
    """The process-wide instance in prometheus_client's default registry (created on first use)."""
    global _default
    if _default is None:
        _default = MtlsMetrics()
    return _default
