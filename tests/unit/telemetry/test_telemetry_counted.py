"""`counted` records exactly what prometheus_client's own `inc` and `observe` would: it reaches
into the children's value objects, so a prometheus_client that changes them fails here."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from meshlet.telemetry.proxy import DURATION_BUCKETS, counted

SECONDS = (0.0, 0.00005, 0.0001, 0.00011, 0.003, 1.0, 2.4999, 10.0, 10.5, 3600.0)


def values(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    """Every sample but the creation times (which differ between two registries)."""
    return [(s.name, s.labels, s.value) for family in registry.collect() for s in family.samples
            if not s.name.endswith("_created")]


def pair(registry: CollectorRegistry) -> tuple[Counter, Histogram]:
    count = Counter("c", "count", ("route",), registry=registry)
    duration = Histogram("d_seconds", "duration", ("route",), buckets=DURATION_BUCKETS, registry=registry)
    return count, duration


@pytest.mark.parametrize("seconds", SECONDS)
def test_counted_is_inc_and_observe(seconds):
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    count, duration = pair(ours)
    record = counted(count.labels("a"), duration.labels("a"))
    record(seconds)
    record(seconds)
    count, duration = pair(theirs)
    for _ in range(2):
        count.labels("a").inc()
        duration.labels("a").observe(seconds)
    assert values(ours) == values(theirs)
    assert ours.get_sample_value("d_seconds_count", {"route": "a"}) == 2
