"""Reading a canary's figures from Prometheus: the sum over every replica that it scrapes.

With many replicas of a sidecar, one replica's own counters see only its share of the
canary's traffic; `sum by` over Prometheus' latest samples sees them all. Two instant queries
per analysis (requests by code, duration buckets by `le`) give the same cumulative `Snapshot`
as the local registry, so `observe` and `judge` are unchanged. A replica restarting makes the
sum go down; `observe` then starts the interval afresh, as for a local restart.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request

from meshlet.rollout.analysis import Snapshot
from meshlet.rollout.source import DURATION, REQUESTS

TIMEOUT = 5.0


class PrometheusError(Exception):
    """Prometheus unreachable or answering an error: the tick is retried, nothing is judged."""


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


class PrometheusReader:
    def __init__(self, url: str, direction: str = "outbound"):
        self.url = url.rstrip("/")
        self.direction = direction

    def __call__(self, route: str, backend: str) -> Snapshot:
        selector = (f'direction="{_quote(self.direction)}",route="{_quote(route)}",'
                    f'backend="{_quote(backend)}"')
        requests = errors = 0
        for labels, value in self.query(f"sum by (code) ({REQUESTS}_total{{{selector}}})"):
            code = labels.get("code", "")
            requests += int(value)
            if code.startswith("5") or code == "0":  # the same rule as the local source
                errors += int(value)
        buckets = {float(labels["le"]): value for labels, value in
                   self.query(f"sum by (le) ({DURATION}_bucket{{{selector}}})") if "le" in labels}
        bounds = tuple(sorted(buckets)) or (math.inf,)
        return Snapshot(requests, errors, bounds, tuple(int(buckets.get(b, 0)) for b in bounds))

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
                doc = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise PrometheusError(f"Prometheus at {self.url}: {getattr(e, 'reason', e)}") from None
        if doc.get("status") != "success":
            raise PrometheusError(f"Prometheus at {self.url}: {doc.get('error', 'query failed')}")
        return [(item["metric"], float(item["value"][1])) for item in doc["data"]["result"]]
