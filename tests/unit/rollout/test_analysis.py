from __future__ import annotations

import math
import random

import pytest

from meshlet.policy.model import Analysis
from meshlet.rollout.analysis import Observation, Snapshot, histogram_quantile, judge, observe

BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, math.inf)


def snapshot(latencies, errors=0):
    counts = tuple(sum(1 for x in latencies if x <= b) for b in BOUNDS)
    return Snapshot(len(latencies), errors, BOUNDS, counts)


def test_quantile_interpolates_inside_the_bucket_like_prometheus():
    # 100 observations evenly in (0.1, 0.25]: p99 is 99% of the way through that bucket.
    cumulative = (0, 0, 0, 0, 0, 100, 100, 100, 100)
    assert histogram_quantile(0.99, BOUNDS, cumulative) == pytest.approx(0.1 + 0.15 * 0.99)
    assert histogram_quantile(0.5, BOUNDS, (0,) * 9) is None
    assert histogram_quantile(0.99, BOUNDS, (0, 0, 0, 0, 0, 0, 0, 0, 10)) == 1.0


def test_quantile_lands_in_the_right_bucket_for_random_data():
    rng = random.Random(7)
    samples = [rng.expovariate(1 / 0.04) for _ in range(5000)]
    exact = sorted(samples)[int(0.99 * len(samples))]
    estimate = histogram_quantile(0.99, BOUNDS, snapshot(samples).bucket_counts)
    bucket = next(b for b in BOUNDS if exact <= b)
    lower = max([b for b in BOUNDS if b < bucket], default=0.0)
    assert lower <= estimate <= bucket


def test_observe_subtracts_and_survives_a_restart():
    before, after = snapshot([0.01] * 10, errors=1), snapshot([0.01] * 10 + [0.2] * 90, errors=4)
    obs = observe(before, after)
    assert (obs.requests, obs.errors) == (90, 3)
    assert 0.1 <= obs.p99 <= 0.25
    restarted = observe(after, snapshot([0.01] * 5))
    assert restarted.requests == 5


def test_judge():
    analysis = Analysis(min_success_rate=99.0, max_p99=0.3, min_requests=50)
    assert judge(analysis, Observation(49, 0, 0.01)).verdict == "hold"
    assert judge(analysis, Observation(100, 1, 0.29)).verdict == "pass"
    failed = judge(analysis, Observation(100, 2, 0.5))
    assert failed.verdict == "fail"
    assert failed.reasons == ("success rate 98.00% below 99%", "p99 500.0ms above 300ms")
