"""Istio's standard metrics, so Flagger, Kiali and Grafana dashboards written for Istio read a
meshlet sidecar unchanged (https://istio.io/latest/docs/reference/config/metrics/).

Each request is reported by the sidecar that saw it: `reporter="source"` on the caller's
outbound side, `reporter="destination"` on the callee's inbound side, each with this workload
on its own side and the peer (learned from peer metadata and the peer's certificate,
meshlet.proxy.peermeta) on the other. Label values come from workload names, SPIFFE IDs and
policy hosts, never from raw request data, so cardinality is bounded by the mesh.
"""

from __future__ import annotations

from ipaddress import ip_address

from prometheus_client import CollectorRegistry, Counter, Histogram

from meshlet.telemetry.outcome import NO_FLAGS, UNKNOWN, Outcome, Workload

# Istio's default request-duration buckets, in milliseconds.
DURATION_MS_BUCKETS: tuple[float, ...] = (
    1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000,
)
# Istio's size buckets: powers of ten from 1 byte to 100 MB.
BYTES_BUCKETS: tuple[float, ...] = tuple(float(10 ** i) for i in range(9))

PEER_LABELS = ("workload", "workload_namespace", "principal", "app", "version")
REQUEST_LABELS: tuple[str, ...] = (
    "reporter",
    *(f"source_{name}" for name in PEER_LABELS),
    *(f"destination_{name}" for name in PEER_LABELS),
    "destination_service", "destination_service_name", "destination_service_namespace",
    "request_protocol", "response_code", "grpc_response_status", "response_flags", "connection_security_policy",
)
TCP_LABELS: tuple[str, ...] = tuple(n for n in REQUEST_LABELS if n not in ("response_code", "grpc_response_status"))
_NOBODY = Workload()


def service_parts(service: str, own_namespace: str) -> tuple[str, str]:
    """(destination_service_name, destination_service_namespace) of a host as Kubernetes DNS reads
    it: `name` (this namespace), `name.ns`, `name.ns.svc[.cluster.local]`; other hosts have no namespace."""
    if not service or service == UNKNOWN:
        return UNKNOWN, UNKNOWN
    try:
        ip_address(service.strip("[]"))
        return service, UNKNOWN
    except ValueError:
        pass
    labels = service.split(".")
    if len(labels) == 1:
        return labels[0], own_namespace
    if len(labels) == 2 or labels[2] == "svc":
        return labels[0], labels[1]
    return labels[0], UNKNOWN


class IstioMetrics:
    """istio_requests_total, istio_request_duration_milliseconds, istio_request_bytes,
    istio_response_bytes, and the istio_tcp_* series of connections relayed at L4."""

    def __init__(self, registry: CollectorRegistry, me: Workload):
        self.me = me  # this workload; the engine fills in its principal once it has an identity
        self.requests = Counter("istio_requests", "Requests, as Istio counts them.", REQUEST_LABELS,
                                registry=registry)
        self.duration = Histogram("istio_request_duration_milliseconds", "Request duration, as Istio measures it.",
                                  REQUEST_LABELS, buckets=DURATION_MS_BUCKETS, registry=registry)
        self.request_bytes = Histogram("istio_request_bytes", "Request body sizes.", REQUEST_LABELS,
                                       buckets=BYTES_BUCKETS, registry=registry)
        self.response_bytes = Histogram("istio_response_bytes", "Response body sizes.", REQUEST_LABELS,
                                        buckets=BYTES_BUCKETS, registry=registry)
        self.tcp_opened = Counter("istio_tcp_connections_opened", "Connections relayed at L4, opened.", TCP_LABELS,
                                  registry=registry)
        self.tcp_closed = Counter("istio_tcp_connections_closed", "Connections relayed at L4, closed.", TCP_LABELS,
                                  registry=registry)
        self.tcp_sent = Counter("istio_tcp_sent_bytes", "Bytes sent to the client of an L4 relay (the "
                                "response direction).", TCP_LABELS, registry=registry)
        self.tcp_received = Counter("istio_tcp_received_bytes", "Bytes received from the client of an L4 relay "
                                    "(the request direction).", TCP_LABELS, registry=registry)
        self._children: dict[tuple[str, ...], tuple] = {}
        self._services: dict[str, tuple[str, str]] = {}

    def _common(self, direction: str, service: str, peer: Workload | None, mtls: bool
                ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, str, str]]:
        """(reporter and source labels, destination labels, service labels) of one hop."""
        me, other = self.me, peer or _NOBODY
        if direction == "outbound":
            reporter, source, destination, policy = "source", me, other, UNKNOWN  # Istio: unknown at the source
        else:
            reporter, source, destination, policy = "destination", other, me, "mutual_tls" if mtls else "none"
        parts = self._services.get(service)
        if parts is None:
            parts = self._services[service] = service_parts(service, me.namespace)
        head = (reporter, source.workload, source.namespace, source.principal, source.app, source.version)
        tail = (destination.workload, destination.namespace, destination.principal, destination.app,
                destination.version)
        return head + tail, (policy,), (service or UNKNOWN, *parts)

    def request(self, o: Outcome) -> None:
        sides, (policy,), service = self._common(o.direction, o.service, o.peer, o.mtls)
        grpc = o.grpc_status >= 0
        key = (*sides, *service, "grpc" if grpc else "http", str(o.code), str(o.grpc_status) if grpc else "",
               o.flags or NO_FLAGS, policy)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(*key), self.duration.labels(*key),
                self.request_bytes.labels(*key), self.response_bytes.labels(*key),
            )
        count, duration, request_bytes, response_bytes = children
        count.inc()
        duration.observe(o.seconds * 1000.0)
        request_bytes.observe(o.bytes_received)
        response_bytes.observe(o.bytes_sent)

    def tcp(self, direction: str, service: str, peer: Workload | None, mtls: bool, sent: int, received: int,
            flags: str = NO_FLAGS) -> None:
        sides, (policy,), service_labels = self._common(direction, service, peer, mtls)
        key = (*sides, *service_labels, "tcp", flags or NO_FLAGS, policy)
        self.tcp_opened.labels(*key).inc()
        self.tcp_closed.labels(*key).inc()
        self.tcp_sent.labels(*key).inc(sent)
        self.tcp_received.labels(*key).inc(received)
