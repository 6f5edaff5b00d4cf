"""The node collector fed fixtures instead of BPF maps, and the percentile maths `meshlet stats` uses."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from meshlet.ebpf import hist
from meshlet.telemetry.node import (
    ProgramMisses,
    TcpCollector,
    TcpCounter,
    TcpHistogram,
    TcpSnapshot,
    percentile_rows,
    quantile,
    quantile_range,
)

BOUNDS = (*hist.bounds_seconds(), math.inf)


def counts(values_us: list[int]) -> tuple[int, ...]:
    out = [0] * hist.SLOTS
    for v in values_us:
        out[hist.slot_of(v)] += 1
    return tuple(out)


LATENCIES = [100] * 50 + [1000] * 40 + [20_000] * 10  # µs
SNAPSHOT = TcpSnapshot(
    histograms=(TcpHistogram("connect_latency", 9081, "out", counts(LATENCIES), sum(LATENCIES) / 1e6),),
    retransmits=(TcpCounter(9081, "in", 7),),
    missed=(ProgramMisses("tcp:tcp_probe", 3),),
)


def collector(read) -> CollectorRegistry:
    registry = CollectorRegistry()
    TcpCollector(read, hist.bounds_seconds(), registry=registry)
    return registry


def test_histogram_buckets_are_the_kernel_slots_cumulated():
    registry = collector(lambda: SNAPSHOT)
    labels = {"port": "9081", "direction": "out", "namespace": "", "workload": ""}
    get = registry.get_sample_value
    assert get("meshlet_tcp_connect_latency_seconds_count", labels) == 100
    assert get("meshlet_tcp_connect_latency_seconds_sum", labels) == pytest.approx(sum(LATENCIES) / 1e6)
    # 100 µs lies in [96, 112) µs: the bucket le=0.000112 holds it, le=0.000096 does not.
    assert get("meshlet_tcp_connect_latency_seconds_bucket", {**labels, "le": "0.000096"}) == 0
    assert get("meshlet_tcp_connect_latency_seconds_bucket", {**labels, "le": "0.000112"}) == 50
    assert get("meshlet_tcp_connect_latency_seconds_bucket", {**labels, "le": "+Inf"}) == 100
    assert get("meshlet_tcp_retransmits_total", {**labels, "direction": "in"}) == 7
    assert get("meshlet_ebpf_missed_events_total", {"tracepoint": "tcp:tcp_probe"}) == 3


def test_a_failed_map_read_skips_the_metrics_instead_of_failing_the_scrape():
    def broken() -> TcpSnapshot:
        raise OSError("map gone")

    registry = collector(broken)
    assert b"meshlet_tcp" not in generate_latest(registry)


def test_series_with_the_wrong_slot_count_are_skipped():
    bad = TcpSnapshot((TcpHistogram("srtt", 1, "in", (1, 2, 3), 0.0),))
    labels = {"port": "1", "direction": "in", "namespace": "", "workload": ""}
    assert collector(lambda: bad).get_sample_value("meshlet_tcp_srtt_seconds_count", labels) is None


def test_a_workloads_series_carry_its_names_and_pool_its_classes():
    """Port 0 is the workload's traffic on ports no policy names; the QoS class is not a label,
    so a workload whose Pods sit in two classes (a label change rolling out) is one series."""
    one = TcpHistogram("srtt", 0, "out", counts([1000] * 3), 0.003, "shop", "checkout", "latency")
    two = TcpHistogram("srtt", 0, "out", counts([1000] * 2), 0.002, "shop", "checkout", "")
    snapshot = TcpSnapshot((one, two), (TcpCounter(0, "out", 4, "shop", "checkout"),))
    registry = collector(lambda: snapshot)
    labels = {"port": "", "direction": "out", "namespace": "shop", "workload": "checkout"}
    assert registry.get_sample_value("meshlet_tcp_srtt_seconds_count", labels) == 5
    assert registry.get_sample_value("meshlet_tcp_srtt_seconds_sum", labels) == pytest.approx(0.005)
    assert registry.get_sample_value("meshlet_tcp_retransmits_total", labels) == 4
    (row,) = percentile_rows(generate_latest(registry).decode())
    assert (row.port, row.workload, row.count) == (0, "shop/checkout", 5)


def test_quantiles_land_in_the_right_slot():
    c = counts(LATENCIES)
    assert quantile_range(BOUNDS, c, 0.5) == (96e-6, 112e-6)
    assert quantile_range(BOUNDS, c, 0.9) == (896e-6, 1024e-6)
    assert quantile_range(BOUNDS, c, 0.99) == (16384e-6, 20480e-6)
    assert quantile(BOUNDS, c, 0.5) == pytest.approx(104e-6)
    assert quantile(BOUNDS, [0] * hist.SLOTS, 0.5) is None


def test_stats_rows_read_back_from_the_exposition_text():
    text = generate_latest(collector(lambda: SNAPSHOT)).decode()
    (row,) = percentile_rows(text)
    assert (row.metric, row.port, row.direction, row.count) == ("connect", 9081, "out", 100)
    assert row.p50 == pytest.approx(104e-6)
    assert 16.384e-3 <= row.p99 <= 20.48e-3
