"""Acceleration metrics: sockets in the sockhash, bytes the kernel redirected, kernel-split connections.

All three are counted in the kernel (bpf/sockmap_redirect.c, bpf/connect4_split.c); this
collector only reads them at scrape time through swappable readers (the BPF maps in
production, fixtures in tests). A failed read skips that metric, never fails the scrape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

T = TypeVar("T")

ACCEL_SOCKETS = "meshlet_accel_sockets"
ACCEL_REDIRECTED_BYTES = "meshlet_accel_redirected_bytes_total"
KERNEL_CONNECTIONS = "meshlet_kernel_connections_total"


@dataclass(frozen=True, slots=True)
class SockmapReading:
    sockets: int
    redirected_bytes: int


class AccelCollector(Collector):
    """Exports whichever of the two accelerations is on (a reader of None means off)."""

    def __init__(
        self,
        sockmap: Callable[[], SockmapReading] | None = None,
        kernel_connections: Callable[[], Mapping[tuple[str, str, str], int]] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._sockmap = sockmap
        self._kernel_connections = kernel_connections
        if registry is not None:
            registry.register(self)

    def describe(self) -> list[Metric]:
        return list(self._families().values())  # no kernel access at registration

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        if self._sockmap is not None and (reading := _read(self._sockmap, "sockmap")) is not None:
            families["sockets"].add_metric([], reading.sockets)
            families["bytes"].add_metric([], reading.redirected_bytes)
            yield families["sockets"]
            yield families["bytes"]
        if self._kernel_connections is not None and (counts := _read(self._kernel_connections, "split")) is not None:
            for labels, value in sorted(counts.items()):
                families["connections"].add_metric(list(labels), value)
            yield families["connections"]

    def _families(self) -> dict[str, Metric]:
        families: dict[str, Metric] = {}
        if self._sockmap is not None:
            families["sockets"] = GaugeMetricFamily(
                ACCEL_SOCKETS, "App<->sidecar sockets currently redirected by sockmap."
            )
            families["bytes"] = CounterMetricFamily(
                ACCEL_REDIRECTED_BYTES.removesuffix("_total"), "Bytes sk_msg handed straight to the peer socket."
            )
        if self._kernel_connections is not None:
            families["connections"] = CounterMetricFamily(
                KERNEL_CONNECTIONS.removesuffix("_total"),
                "Connections the connect4 hook sent to a backend (dataplane kernel), by the policy's namespace.",
                labels=("namespace", "route", "backend"),
            )
        return families


def _read(reader: Callable[[], T], what: str) -> T | None:
    try:
        return reader()
    except Exception as e:  # a scrape must not fail because a map read did
        log.warning("skipping %s metrics: reading the kernel maps failed: %s", what, e)
        return None
