"""From two metric snapshots of a canary to one interval's verdict.

Pure functions: the caller reads counters and histogram buckets (from this sidecar's registry,
from all workers, or from Prometheus) at the start and end of an interval; this module only
subtracts and compares.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from meshlet.policy.model import Analysis

Verdict = Literal["pass", "fail", "hold"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Cumulative figures for one backend of one route at one instant."""

    requests: int  # attempts sent to the backend, retries included
    errors: int  # attempts answered 5xx or not at all (connect failure, reset, timeout)
    bucket_bounds: tuple[float, ...]  # histogram upper bounds in seconds, ascending, +Inf last
    bucket_counts: tuple[int, ...]  # cumulative counts per bound


@dataclass(frozen=True, slots=True)
class Observation:
    requests: int
    errors: int
    p99: float | None  # seconds; None when no request was seen

    @property
    def success_rate(self) -> float | None:
        return None if not self.requests else 100.0 * (self.requests - self.errors) / self.requests


@dataclass(frozen=True, slots=True)
class AnalysisResult:
    verdict: Verdict
    observation: Observation
    reasons: tuple[str, ...] = ()


def observe(before: Snapshot, after: Snapshot) -> Observation:
    """What happened between two snapshots. A counter that went down means a restart: start afresh."""
    if after.requests < before.requests or after.bucket_bounds != before.bucket_bounds:
        before = Snapshot(0, 0, after.bucket_bounds, tuple(0 for _ in after.bucket_counts))
    counts = tuple(a - b for a, b in zip(after.bucket_counts, before.bucket_counts, strict=True))
    return Observation(
        requests=after.requests - before.requests,
        errors=max(0, after.errors - before.errors),
        p99=histogram_quantile(0.99, after.bucket_bounds, counts),
    )


def histogram_quantile(q: float, bounds: Sequence[float], cumulative: Sequence[int]) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding the rank."""
    if not cumulative or cumulative[-1] <= 0:
        return None
    rank = q * cumulative[-1]
    for i, count in enumerate(cumulative):
        if count >= rank:
            upper = bounds[i]
            lower = bounds[i - 1] if i else 0.0
            if math.isinf(upper):
                return lower  # the +Inf bucket: the best known bound is the last finite one
            below = cumulative[i - 1] if i else 0
            in_bucket = count - below
            return lower + (upper - lower) * ((rank - below) / in_bucket if in_bucket else 1.0)
    return bounds[-2] if len(bounds) > 1 else None


def judge(analysis: Analysis, observation: Observation) -> AnalysisResult:
    """Pass, fail, or hold when there were too few requests to tell."""
    if observation.requests < analysis.min_requests:
        reason = f"{observation.requests} canary requests, fewer than min_requests {analysis.min_requests}"
        return AnalysisResult("hold", observation, (reason,))
    reasons = []
    rate = observation.success_rate
    if analysis.min_success_rate is not None and rate is not None and rate < analysis.min_success_rate:
        reasons.append(f"success rate {rate:.2f}% below {analysis.min_success_rate:g}%")
    p99 = observation.p99
    if analysis.max_p99 is not None and p99 is not None and p99 > analysis.max_p99:
        reasons.append(f"p99 {p99 * 1000:.1f}ms above {analysis.max_p99 * 1000:g}ms")
    return AnalysisResult("fail" if reasons else "pass", observation, tuple(reasons))
