"""ProxyMetrics and its Istio series: what a dashboard or Flagger query reads from an Outcome."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from meshlet.telemetry.istio import REQUEST_LABELS, service_parts
from meshlet.telemetry.outcome import Outcome, Workload, with_flag
from meshlet.telemetry.proxy import ProxyMetrics

ME = Workload("frontend", "shop", "spiffe://cluster.local/ns/shop/sa/frontend", "frontend", "v1")
REVIEWS = Workload("reviews-v2", "books", "spiffe://cluster.local/ns/books/sa/reviews", "reviews", "v2")


def istio_sample(registry: CollectorRegistry, name: str = "istio_requests_total") -> dict[str, str]:
    samples = [s for m in registry.collect() for s in m.samples if s.name == name]
    assert len(samples) == 1, samples
    return samples[0].labels


def test_client_view_and_attempts_are_counted_apart():
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    metrics.attempt("outbound", "canary", "v2", 503, "-", 0.001)  # the canary failed, the retry went to v1
    metrics.attempt("outbound", "canary", "v1", 200, "-", 0.001)
    metrics.observe(Outcome("outbound", "canary", "v1", "reviews", 200, seconds=0.0002))
    attempt = {"direction": "outbound", "route": "canary", "response_flags": "-"}
    assert registry.get_sample_value("meshlet_upstream_requests_total", {**attempt, "backend": "v2", "code": "503"}) == 1
    assert registry.get_sample_value("meshlet_upstream_requests_total", {**attempt, "backend": "v1", "code": "200"}) == 1
    labels = {"direction": "outbound", "route": "canary", "backend": "v1"}
    assert registry.get_sample_value("meshlet_requests_total", {
        **labels, "code": "200", "grpc_status": "", "response_flags": "-"}) == 1
    assert registry.get_sample_value("meshlet_request_duration_seconds_bucket", {**labels, "le": "0.00025"}) == 1
    assert registry.get_sample_value("meshlet_request_duration_seconds_bucket", {**labels, "le": "0.0001"}) == 0
    assert registry.get_sample_value("istio_requests_total", {}) is None


def test_no_response_is_code_zero_with_its_flag():
    registry = CollectorRegistry()
    ProxyMetrics(registry).observe(Outcome("outbound", "r", "v1", "svc", 0, "DC", 0.5))
    assert registry.get_sample_value("meshlet_requests_total", {
        "direction": "outbound", "route": "r", "backend": "v1", "code": "0", "grpc_status": "",
        "response_flags": "DC"}) == 1


def test_source_reporter_names_this_workload_as_source_and_the_peer_as_destination():
    registry = CollectorRegistry()
    ProxyMetrics(registry, "istio", ME).observe(Outcome(
        "outbound", "canary", "v2", "reviews.books.svc.cluster.local", 503, "URX,UF", 0.02,
        bytes_received=10, bytes_sent=2000, peer=REVIEWS))
    labels = istio_sample(registry)
    assert tuple(labels) == REQUEST_LABELS
    assert labels == {
        "reporter": "source",
        "source_workload": "frontend", "source_workload_namespace": "shop",
        "source_principal": "spiffe://cluster.local/ns/shop/sa/frontend", "source_app": "frontend", "source_version": "v1",
        "destination_workload": "reviews-v2", "destination_workload_namespace": "books",
        "destination_principal": "spiffe://cluster.local/ns/books/sa/reviews", "destination_app": "reviews",
        "destination_version": "v2",
        "destination_service": "reviews.books.svc.cluster.local", "destination_service_name": "reviews",
        "destination_service_namespace": "books",
        "request_protocol": "http", "response_code": "503", "grpc_response_status": "", "response_flags": "URX,UF",
        "connection_security_policy": "unknown",
    }
    assert registry.get_sample_value("istio_request_duration_milliseconds_sum", labels) == pytest.approx(20.0)
    assert registry.get_sample_value("istio_request_bytes_sum", labels) == 10
    assert registry.get_sample_value("istio_response_bytes_sum", labels) == 2000


def test_destination_reporter_names_this_workload_as_destination():
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry, "istio", REVIEWS)
    metrics.observe(Outcome("inbound", "inbound", "app", "unknown", 200, grpc_status=0, peer=ME, mtls=True))
    labels = istio_sample(registry)
    assert (labels["reporter"], labels["source_workload"], labels["destination_workload"]) == \
        ("destination", "frontend", "reviews-v2")
    assert labels["destination_workload_namespace"] == "books"
    assert labels["connection_security_policy"] == "mutual_tls"
    assert (labels["request_protocol"], labels["grpc_response_status"]) == ("grpc", "0")


def test_a_caller_nobody_vouches_for_is_unknown_and_plaintext():
    registry = CollectorRegistry()
    ProxyMetrics(registry, "istio", REVIEWS).observe(Outcome("inbound", "inbound", "none", "unknown", 403, "UAEX"))
    labels = istio_sample(registry)
    assert labels["source_workload"] == labels["source_principal"] == "unknown"
    assert (labels["connection_security_policy"], labels["response_code"], labels["response_flags"]) == \
        ("none", "403", "UAEX")


def test_a_principal_learned_later_shows_in_new_series():
    me = Workload("frontend", "shop")
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry, "istio", me)
    me.principal = "spiffe://cluster.local/ns/shop/sa/frontend"  # the engine got its certificate
    metrics.observe(Outcome("outbound", "r", "v1", "svc", 200))
    assert istio_sample(registry)["source_principal"] == "spiffe://cluster.local/ns/shop/sa/frontend"


def test_tcp_relays_count_bytes_each_way():
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry, "istio", ME)
    metrics.tcp("outbound", "db.data", REVIEWS, False, sent=300, received=40)
    metrics.tcp("outbound", "db.data", REVIEWS, False, sent=1, received=2)
    labels = istio_sample(registry, "istio_tcp_sent_bytes_total")
    assert labels["request_protocol"] == "tcp" and "response_code" not in labels
    assert registry.get_sample_value("istio_tcp_sent_bytes_total", labels) == 301
    assert registry.get_sample_value("istio_tcp_received_bytes_total", labels) == 42
    assert registry.get_sample_value("istio_tcp_connections_closed_total", labels) == 2


def test_tcp_is_istio_only():
    registry = CollectorRegistry()
    ProxyMetrics(registry).tcp("outbound", "db", None, False, 1, 1)
    assert not [s for m in registry.collect() for s in m.samples if s.name.startswith("istio_")]


def test_malformed_requests_are_counted_with_their_flag():
    registry = CollectorRegistry()
    ProxyMetrics(registry).invalid("inbound", 400)
    assert registry.get_sample_value("meshlet_requests_total", {
        "direction": "inbound", "route": "invalid", "backend": "none", "code": "400", "grpc_status": "",
        "response_flags": "DPE"}) == 1


@pytest.mark.parametrize(("host", "parts"), [
    ("reviews", ("reviews", "shop")),
    ("reviews.books", ("reviews", "books")),
    ("reviews.books.svc.cluster.local", ("reviews", "books")),
    ("api.example.com", ("api", "unknown")),
    ("10.0.0.7", ("10.0.0.7", "unknown")),
    ("[fd00::1]", ("[fd00::1]", "unknown")),
    ("unknown", ("unknown", "unknown")),
])
def test_service_name_and_namespace_read_as_kubernetes_dns(host, parts):
    assert service_parts(host, "shop") == parts


def test_flags_join_as_envoy_prints_them():
    assert with_flag("-", "UF") == "UF"
    assert with_flag("UF", "URX") == "UF,URX"
    assert with_flag("UF,URX", "URX") == "UF,URX"
