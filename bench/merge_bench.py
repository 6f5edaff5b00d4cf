#!/usr/bin/env python3
"""What merging the app's metrics costs the sidecar per scrape, side by side with what the app
itself spends writing the same page (prometheus_client's generate_latest).

The merge parses the app's page, leaves out names the sidecar owns and writes it again
(meshlet.telemetry.merge); it runs in a thread, so the event loop keeps serving, but it holds
the GIL while it parses. The page sizes: prometheus_client's default collectors (what
Bookinfo's productpage exports besides its own counter), and an app with N labelled series.
Figures only: nothing here is asserted.

examples:
  .venv/bin/python bench/merge_bench.py
  .venv/bin/python bench/merge_bench.py --series 1000 10000 50000
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest

from meshlet.telemetry.merge import merge, page_names, parse, render


def app_registry(series: int) -> CollectorRegistry:
    """An app with `series` counter series and a tenth as many histograms (12 buckets each)."""
    registry = CollectorRegistry()
    requests = Counter("app_requests", "Requests.", ("path", "code"), registry=registry)
    latency = Histogram("app_latency_seconds", "Latency.", ("path",), registry=registry)
    for i in range(series):
        requests.labels(f"/p{i}", "200").inc()
    for i in range(series // 10):
        latency.labels(f"/p{i}").observe(0.01)
    return registry


def median_ms(work: Callable[[], object], budget: float = 1.0) -> float:
    times: list[float] = []
    deadline = time.perf_counter() + budget
    while time.perf_counter() < deadline or len(times) < 3:
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, nargs="+", default=[1000, 10000], metavar="N")
    args = parser.parse_args()
    sidecar = generate_latest(app_registry(0))
    names = page_names(sidecar)
    pages = [("client defaults", REGISTRY)] + [(f"{n} series", app_registry(n)) for n in args.series]
    print(f"{'app page':>16} {'bytes':>10} {'app writes it':>14} {'sidecar merges it':>18}")
    for label, registry in pages:
        page = generate_latest(registry)
        write = median_ms(lambda r=registry: generate_latest(r))
        merged = median_ms(lambda p=page: render(merge(names, parse(p, "text/plain")).families))
        print(f"{label:>16} {len(page):>10} {write:>11.2f} ms {merged:>15.2f} ms")


if __name__ == "__main__":
    main()
