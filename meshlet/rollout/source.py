"""Reading a canary's cumulative figures out of a Prometheus registry.

Works on the sidecar's own registry and on a multiprocess registry alike (both are
`Collector`s), so a rollout sees the requests of every worker.
"""

from __future__ import annotations

import math

from prometheus_client.registry import Collector

# The canary's own attempts, not what clients got: a canary 5xx that a retry hid from the client
# still counts against the canary (meshlet.telemetry.proxy).
REQUESTS = "meshlet_upstream_requests"
DURATION = "meshlet_upstream_request_duration_seconds"


def snapshot(registry: Collector, route: str, backend: str, direction: str = "outbound"):
    """Attempts sent to `backend` on `route`, those answered 5xx or not at all, and their duration buckets."""
    from meshlet.rollout.analysis import Snapshot

    requests = errors = 0
    buckets: dict[float, float] = {}
    for family in registry.collect():
        if family.name not in (REQUESTS, DURATION):
            continue
        for sample in family.samples:
            labels = sample.labels
            if labels.get("route") != route or labels.get("backend") != backend or labels.get("direction") != direction:
                continue
            if sample.name == f"{REQUESTS}_total":
                requests += int(sample.value)
                code = labels.get("code", "")
                if code.startswith("5") or code == "0":  # 0: it never answered
                    errors += int(sample.value)
            elif sample.name == f"{DURATION}_bucket":
                bound = float(labels["le"])
                buckets[bound] = buckets.get(bound, 0) + sample.value
    bounds = tuple(sorted(buckets)) or (math.inf,)
    counts = tuple(int(buckets.get(b, 0)) for b in bounds)
    return Snapshot(requests, errors, bounds, counts)
