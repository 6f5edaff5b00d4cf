"""Node agent metrics: kernel TCP histograms as Prometheus families, and the QoS loop's gauges.

The TCP collector builds fresh families on every scrape from a swappable reader (the BPF map
reader in production, fixtures in tests), with bucket bounds handed over by the kernel side so
Prometheus buckets are exactly the kernel's slots. A failed read skips the metrics, never
fails the scrape.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

Direction = Literal["in", "out"]
TcpHistogramName = Literal["connect_latency", "srtt"]

CONNECT_LATENCY = "meshlet_tcp_connect_latency_seconds"
SRTT = "meshlet_tcp_srtt_seconds"
RETRANSMITS = "meshlet_tcp_retransmits_total"
MISSED = "meshlet_ebpf_missed_events_total"
QOS_RATE = "meshlet_qos_class_rate_bits"
QOS_ADJUSTMENTS = "meshlet_qos_adjustments_total"

_HISTOGRAMS: dict[str, tuple[str, str]] = {
    "connect_latency": (CONNECT_LATENCY, "TCP connect latency (SYN sent to established), measured in the kernel."),
    "srtt": (SRTT, "Smoothed TCP round-trip time per received segment, measured in the kernel."),
}
LABELS = ("port", "direction")


@dataclass(frozen=True, slots=True)
class TcpHistogram:
    """One kernel histogram: counts per slot, in slot order, and the sum of observed values."""

    name: TcpHistogramName
    port: int
    direction: Direction
    counts: tuple[int, ...]
    sum_seconds: float


@dataclass(frozen=True, slots=True)
class TcpCounter:
    port: int
    direction: Direction
    value: int


@dataclass(frozen=True, slots=True)
class ProgramMisses:
    """Events a tracepoint's program did not see (the kernel skipped it: see `bpfsys.ProgInfo`)."""

    tracepoint: str
    value: int


@dataclass(frozen=True, slots=True)
class TcpSnapshot:
    histograms: tuple[TcpHistogram, ...] = ()
    retransmits: tuple[TcpCounter, ...] = ()
    missed: tuple[ProgramMisses, ...] = ()


class TcpCollector(Collector):
    """Exports `meshlet_tcp_*` from whatever `read` returns at scrape time."""

    def __init__(
        self,
        read: Callable[[], TcpSnapshot],
        bounds: Sequence[float],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._read = read
        self._les = [_le(b) for b in bounds] + ["+Inf"]
        if registry is not None:
            registry.register(self)

    def describe(self) -> list[Metric]:
        # Describing without reading keeps registration free of kernel access.
        return [
            *(HistogramMetricFamily(n, d, labels=LABELS) for n, d in _HISTOGRAMS.values()),
            self._retransmits(),
            self._missed(),
        ]

    def collect(self) -> Iterator[Metric]:
        try:
            snapshot = self._read()
        except Exception as e:  # a scrape must not fail because the map read did
            log.warning("skipping TCP metrics: reading the kernel maps failed: %s", e)
            return
        families = {key: HistogramMetricFamily(n, d, labels=LABELS) for key, (n, d) in _HISTOGRAMS.items()}
        for h in snapshot.histograms:
            if len(h.counts) != len(self._les):
                log.warning("skipping %s port %d: %d slots, expected %d", h.name, h.port, len(h.counts), len(self._les))
                continue
            families[h.name].add_metric([str(h.port), h.direction], self._cumulative(h.counts), h.sum_seconds)
        yield from families.values()
        retransmits = self._retransmits()
        for c in snapshot.retransmits:
            retransmits.add_metric([str(c.port), c.direction], c.value)
        yield retransmits
        missed = self._missed()
        for m in snapshot.missed:
            missed.add_metric([m.tracepoint], m.value)
        yield missed

    def _cumulative(self, counts: Sequence[int]) -> list[tuple[str, float]]:
        total = 0
        buckets = []
        for le, count in zip(self._les, counts, strict=True):
            total += count
            buckets.append((le, float(total)))
        return buckets

    @staticmethod
    def _retransmits() -> CounterMetricFamily:
        return CounterMetricFamily(RETRANSMITS, "TCP segments retransmitted, seen in the kernel.", labels=LABELS)

    @staticmethod
    def _missed() -> CounterMetricFamily:
        return CounterMetricFamily(
            MISSED,
            "TCP events a tracepoint program skipped because another tracing program held the CPU.",
            labels=("tracepoint",),
        )


class QosMetrics:
    """What the QoS loop did: each class's current ceil and how often it moved."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.rate = Gauge(QOS_RATE, "Current HTB ceil per QoS class, bits/s.", ["class"], registry=registry)
        self.adjustments = Counter(
            QOS_ADJUSTMENTS, "QoS ceil changes made by the AIMD loop.", ["class", "direction"], registry=registry
        )


def quantile_range(bounds: Sequence[float], counts: Sequence[int], q: float) -> tuple[float, float] | None:
    """[lower, upper) of the bucket holding quantile `q`, for buckets with these upper bounds
    (the last one may be +Inf) and per-bucket (not cumulative) counts; None when empty."""
    total = sum(counts)
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen, lower = 0, 0.0
    for upper, count in zip(bounds, counts, strict=True):
        seen += count
        if seen >= rank:
            return lower, upper
        lower = upper
    raise AssertionError("unreachable: rank <= total")


def quantile(bounds: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """Point estimate of quantile `q`: the middle of its bucket (the lower end of an open one)."""
    found = quantile_range(bounds, counts, q)
    if found is None:
        return None
    lower, upper = found
    return lower if math.isinf(upper) else (lower + upper) / 2


def _le(bound: float) -> str:
    return f"{bound:.6f}".rstrip("0").rstrip(".")


@dataclass(frozen=True, slots=True)
class PercentileRow:
    metric: str  # "connect" | "srtt"
    port: int
    direction: str
    count: int
    p50: float | None
    p90: float | None
    p99: float | None


def percentile_rows(exposition: str) -> list[PercentileRow]:
    """p50/p90/p99 of every TCP histogram in a /metrics page, sorted by port."""
    from prometheus_client.parser import text_string_to_metric_families

    short = {CONNECT_LATENCY: "connect", SRTT: "srtt"}
    rows = []
    for family in text_string_to_metric_families(exposition):
        if family.name not in short:
            continue
        series: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                key = (sample.labels["port"], sample.labels["direction"])
                series.setdefault(key, []).append((float(sample.labels["le"]), sample.value))
        for (port, direction), buckets in series.items():
            buckets.sort()
            bounds = [le for le, _ in buckets]
            cumulative = [int(c) for _, c in buckets]
            counts = [c - p for c, p in zip(cumulative, [0, *cumulative[:-1]], strict=True)]
            p50, p90, p99 = (quantile(bounds, counts, q) for q in (0.5, 0.9, 0.99))
            rows.append(PercentileRow(short[family.name], int(port), direction, cumulative[-1], p50, p90, p99))
    return sorted(rows, key=lambda r: (r.port, r.direction, r.metric))
