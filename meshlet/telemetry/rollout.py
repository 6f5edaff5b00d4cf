"""Rollout metrics: the canary's weight and the phase of every rollout, per policy and route.

Set from the process that owns the rollout controller (the one with the admin API), so with
`--workers` a single writer exists and multiprocess mode "max" reads back its value.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from meshlet.rollout.machine import PHASES, RolloutState


class RolloutMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.weight = Gauge(
            "meshlet_rollout_weight", "Canary weight (percent of the canary+stable share) of a rollout.",
            ("policy", "route"), registry=registry, multiprocess_mode="max",
        )
        self.phase = Gauge(
            "meshlet_rollout_phase", "1 for the rollout's current phase, 0 for the others.",
            ("policy", "route", "phase"), registry=registry, multiprocess_mode="max",
        )

    def record(self, policy: str, state: RolloutState) -> None:
        self.weight.labels(policy, state.route).set(state.weight)
        for phase in PHASES:
            self.phase.labels(policy, state.route, phase).set(1 if phase == state.phase else 0)
