"""The rollout controller around the pure machine: intervals, real metric snapshots, persistence,
policy applies. The clock is a variable; the metrics are a real prometheus registry fed through
the sidecar's own ProxyMetrics, read back by `snapshot`."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry

from meshlet.policy import load_text
from meshlet.rollout.controller import RolloutController
from meshlet.rollout.machine import RolloutError
from meshlet.rollout.source import snapshot
from meshlet.telemetry.proxy import ProxyMetrics

POLICY = """\
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews}
spec:
  host: reviews
  backends:
    v1: {address: "127.0.0.1:9081"}
    v2: {address: "127.0.0.1:9082"}
  routes:
    - name: canary
      to: [{backend: v1, weight: 100}, {backend: v2, weight: 0}]
      rollout:
        canary: v2
        stable: v1
        steps: [10, 50, 100]
        interval: 30s
        analysis: {success_rate: {min: 99}, p99: {max: 100ms}, min_requests: 20}
        failure_limit: 2
"""


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    clock: Clock
    metrics: ProxyMetrics
    controller: RolloutController
    policies: tuple


@pytest.fixture
def world(tmp_path):
    clock = Clock()
    return World(clock, ProxyMetrics(CollectorRegistry()), RolloutController(tmp_path / "rollouts.json", clock),
                 load_text(POLICY).traffic)


def interval(world, n, code=200, seconds=0.01):
    """n canary attempts, then the clock moves past one 30s interval and the controller ticks."""
    for _ in range(n):
        world.metrics.attempt("outbound", "canary", "v2", code, "-", seconds)
    world.clock.now += 30
    return world.controller.tick(functools.partial(snapshot, world.metrics.registry))


def test_steps_through_on_healthy_canary_traffic(world):
    controller, policies = world.controller, world.policies
    assert controller.start(policies, "reviews").weight == 10
    interval(world, 0)  # first interval end: takes the baseline
    weights = []
    for _ in range(3):
        interval(world, 50)
        weights.append(controller.status("reviews")[0].weight)
    assert weights == [50, 100, 100]
    assert controller.status("reviews")[0].phase == "Succeeded"
    assert controller.overrides()[("reviews", "canary")][1] == 100


def test_holds_on_low_traffic_and_rolls_back_on_errors(world):
    controller, policies = world.controller, world.policies
    controller.start(policies, "reviews")
    interval(world, 0)
    interval(world, 5)
    assert controller.status()[0].last.verdict == "hold"
    interval(world, 50, code=503)
    interval(world, 50, code=503)
    state = controller.status("reviews")[0]
    assert (state.phase, state.weight) == ("RolledBack", 0)
    assert "success rate 0.00% below 99%" in state.history[-1].reason


def test_slow_canary_fails_on_p99(world):
    controller, policies = world.controller, world.policies
    controller.start(policies, "reviews")
    interval(world, 0)
    interval(world, 50, seconds=0.4)
    assert controller.status()[0].last.reasons[0].startswith("p99 ")


def test_restart_resumes_from_the_recorded_step(world, tmp_path):
    controller, policies = world.controller, world.policies
    controller.start(policies, "reviews")
    interval(world, 0)
    interval(world, 50)
    assert controller.status()[0].weight == 50
    again = RolloutController(tmp_path / "rollouts.json", world.clock)
    (state,) = again.resume_saved(policies)
    assert (state.phase, state.step, state.weight) == ("Progressing", 1, 50)
    assert [t.weight for t in state.history] == [10, 50]


def test_a_new_leader_adopts_what_the_old_one_recorded_and_drops_its_own(world, tmp_path):
    controller, policies = world.controller, world.policies
    controller.start(policies, "reviews")
    interval(world, 0)
    interval(world, 50)
    recorded = json.loads((tmp_path / "rollouts.json").read_text())
    follower = RolloutController(None, world.clock)
    follower.start(policies, "reviews")  # a stale view of its own, at step 1
    (state,) = follower.adopt(recorded, policies)
    assert (state.phase, state.step, state.weight) == ("Progressing", 1, 50)
    assert follower.adopt({}, policies) == [] and follower.status() == []


def test_apply_keeps_a_rollout_of_the_same_route_and_cancels_a_changed_one(world):
    controller, policies = world.controller, world.policies
    controller.start(policies, "reviews")
    assert controller.reconcile(load_text(POLICY.replace("interval: 30s", "interval: 10s")).traffic) == [
        "rollout of reviews/canary kept at 10%"]
    assert controller.overrides()[("reviews", "canary")][0].interval == 10.0
    changed = POLICY.replace("canary: v2", "canary: v1").replace("stable: v1", "stable: v2")
    (note,) = controller.reconcile(load_text(changed).traffic)
    assert "cancelled" in note
    assert controller.overrides() == {}


def test_operator_errors_are_clear(world):
    controller, policies = world.controller, world.policies
    with pytest.raises(RolloutError, match="no policy named 'ratings'"):
        controller.start(policies, "ratings")
    with pytest.raises(RolloutError, match="no rollout of 'reviews'"):
        controller.command("reviews", "pause")
    controller.start(policies, "reviews")
    with pytest.raises(RolloutError, match="already Progressing"):
        controller.start(policies, "reviews")
    with pytest.raises(RolloutError, match="unknown rollout action 'stop'"):
        controller.command("reviews", "stop")
    assert controller.command("reviews", "abort").weight == 0
