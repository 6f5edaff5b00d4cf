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
AGENT_POLICY_ERRORS = "meshlet_agent_policy_errors_total"
AGENT_HOOKED_CGROUPS = "meshlet_agent_hooked_cgroups"

_HISTOGRAMS: dict[str, tuple[str, str]] = {
    "connect_latency": (CONNECT_LATENCY, "TCP connect latency (SYN sent to established), measured in the kernel."),
    "srtt": (SRTT, "Smoothed TCP round-trip time per received segment, measured in the kernel."),
}
# `port` 0 (exported as "") is a known workload's traffic on ports no policy names; `namespace`
# and `workload` are "" where the socket belongs to no Pod the agent knows.
LABELS = ("port", "direction", "namespace", "workload")


@dataclass(frozen=True, slots=True)
class TcpHistogram:
    """One kernel histogram: counts per slot, in slot order, and the sum of observed values.

    `qos_class` is the class the workload's Pods were put in on this node (the QoS loop sums
    a class's histograms); it is not exported: the class is the policy's word, not the data's."""

    name: TcpHistogramName
    port: int
    direction: Direction
    counts: tuple[int, ...]
    sum_seconds: float
    namespace: str = ""
    workload: str = ""
    qos_class: str = ""

    @property
    def series(self) -> tuple[str, int, str, str, str, str]:
        """What tells this histogram from the others of a snapshot."""
        return self.name, self.port, self.direction, self.namespace, self.workload, self.qos_class

    @property
    def labels(self) -> list[str]:
        return _labels(self.port, self.direction, self.namespace, self.workload)


@dataclass(frozen=True, slots=True)
class TcpCounter:
    port: int
    direction: Direction
    value: int
    namespace: str = ""
    workload: str = ""

    @property
    def labels(self) -> list[str]:
        return _labels(self.port, self.direction, self.namespace, self.workload)


def _labels(port: int, direction: str, namespace: str, workload: str) -> list[str]:
    return [str(port) if port else "", direction, namespace, workload]


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
        merged: dict[tuple[str, tuple[str, ...]], tuple[tuple[int, ...], float]] = {}
        for h in snapshot.histograms:
            if len(h.counts) != len(self._les):
                log.warning("skipping %s port %d: %d slots, expected %d", h.name, h.port, len(h.counts), len(self._les))
                continue
            # A workload's Pods may sit in two classes for a moment (a label change): one series.
            key = (h.name, tuple(h.labels))
            counts, total = merged.get(key, ((0,) * len(h.counts), 0.0))
            merged[key] = (tuple(a + b for a, b in zip(counts, h.counts, strict=True)), total + h.sum_seconds)
        for (name, labels), (counts, total) in merged.items():
            families[name].add_metric(list(labels), self._cumulative(counts), total)
        yield from families.values()
        retransmits = self._retransmits()
        summed: dict[tuple[str, ...], int] = {}
        for c in snapshot.retransmits:
            summed[tuple(c.labels)] = summed.get(tuple(c.labels), 0) + c.value
        for labels, value in summed.items():
            retransmits.add_metric(list(labels), value)
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


class AgentMetrics:
    """What the agent could not do, and how far its hooks reach."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.policy_errors = Counter(
            AGENT_POLICY_ERRORS,
            "Policies the agent could not apply (invalid, unresolvable, or refused by the kernel); it kept what ran.",
            ["kind", "namespace", "policy"], registry=registry,
        )
        self.hooked_cgroups = Gauge(
            AGENT_HOOKED_CGROUPS, "Workload cgroups (a meshed Pod's, or --cgroup) the eBPF hooks are attached to.",
            registry=registry,
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
    port: int  # 0: any port of the workload
    direction: str
    count: int
    p50: float | None
    p90: float | None
    p99: float | None
    workload: str = ""  # NAMESPACE/NAME, "" for no known workload


def percentile_rows(exposition: str) -> list[PercentileRow]:
    """p50/p90/p99 of every TCP histogram in a /metrics page, sorted by port then workload."""
    from prometheus_client.parser import text_string_to_metric_families

    short = {CONNECT_LATENCY: "connect", SRTT: "srtt"}
    rows = []
    for family in text_string_to_metric_families(exposition):
        if family.name not in short:
            continue
        series: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                labels = sample.labels
                namespace, name = labels.get("namespace", ""), labels.get("workload", "")
                key = (labels["port"], labels["direction"], f"{namespace}/{name}" if name else "")
                series.setdefault(key, []).append((float(sample.labels["le"]), sample.value))
        for (port, direction, workload), buckets in series.items():
            buckets.sort()
            bounds = [le for le, _ in buckets]
            cumulative = [int(c) for _, c in buckets]
            counts = [c - p for c, p in zip(cumulative, [0, *cumulative[:-1]], strict=True)]
            p50, p90, p99 = (quantile(bounds, counts, q) for q in (0.5, 0.9, 0.99))
            rows.append(PercentileRow(short[family.name], int(port or 0), direction, cumulative[-1], p50, p90, p99,
                                      workload))
    return sorted(rows, key=lambda r: (r.port, r.workload, r.direction, r.metric))
