"""The acceleration collector: names, labels, values from fixtures, and degrading on read errors."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from meshlet.telemetry.accel import AccelCollector, SockmapReading


def test_sockmap_and_split_values_are_exported_with_their_labels():
    registry = CollectorRegistry()
    AccelCollector(
        sockmap=lambda: SockmapReading(sockets=4, redirected_bytes=2048),
        kernel_connections=lambda: {("shop", "canary", "v1"): 90, ("shop", "canary", "v2"): 10},
        registry=registry,
    )
    assert registry.get_sample_value("meshlet_accel_sockets") == 4
    assert registry.get_sample_value("meshlet_accel_redirected_bytes_total") == 2048
    labels = {"namespace": "shop", "route": "canary", "backend": "v2"}
    assert registry.get_sample_value("meshlet_kernel_connections_total", labels) == 10


def test_a_failing_reader_skips_its_metrics_and_keeps_the_others():
    def broken() -> SockmapReading:
        raise OSError("map gone")

    registry = CollectorRegistry()
    AccelCollector(sockmap=broken, kernel_connections=lambda: {("n", "r", "b"): 1}, registry=registry)
    assert registry.get_sample_value("meshlet_accel_sockets") is None
    labels = {"namespace": "n", "route": "r", "backend": "b"}
    assert registry.get_sample_value("meshlet_kernel_connections_total", labels) == 1


def test_an_acceleration_that_is_off_exports_nothing():
    registry = CollectorRegistry()
    AccelCollector(kernel_connections=lambda: {}, registry=registry)
    assert registry.get_sample_value("meshlet_accel_sockets") is None
    assert registry.get_sample_value("meshlet_accel_redirected_bytes_total") is None
