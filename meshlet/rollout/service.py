"""The rollouts of one sidecar as its admin API drives them: controller, metric reader, gauges.

It lives in the process that owns the admin API (the supervisor with `--workers`), reads the
canary's figures through `read` (this process's registry, every worker's multiprocess files,
or Prometheus) and says which rollout weights the routing table must carry; the admin API
installs them with the same swap (and distribution to workers) as a PUT /policy.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

from meshlet.policy.model import Rollout, TrafficPolicy
from meshlet.rollout.controller import Reader, RolloutController
from meshlet.rollout.machine import RolloutError, RolloutState
from meshlet.rollout.source import snapshot
from meshlet.rollout.weights import rollout_weights

if TYPE_CHECKING:
    from meshlet.proxy.state import Applied
    from meshlet.rollout.kube import KubeRollouts
from meshlet.telemetry.rollout import RolloutMetrics

log = logging.getLogger("meshlet.rollout")
STATE_FILE = "rollouts.json"


@dataclass(frozen=True, slots=True)
class RolloutOptions:
    """`--state-dir` (None: state in memory only), `--prometheus` (None: read our own metrics) and,
    with `--watch-kube`, the Lease and resource status that make one replica drive (None: alone)."""

    state_dir: Path | None = None
    prometheus: str | None = None
    kube: KubeRollouts | None = None


class Rollouts:
    def __init__(self, controller: RolloutController, read: Reader, metrics: RolloutMetrics,
                 kube: KubeRollouts | None = None):
        self.controller = controller
        self.read = read
        self.metrics = metrics
        self.kube = kube
        self._took_over = False  # leader that has not yet adopted what the previous one recorded

    def weights(self, policies: Iterable[TrafficPolicy]) -> dict:
        return rollout_weights(policies, self.controller.overrides())

    def resume(self, policies: Iterable[TrafficPolicy]) -> None:
        for state in self.controller.resume_saved(policies):
            log.info("rollout of route %s resumed from the state file: %s at %d%%", state.route, state.phase,
                     state.weight)
        self._record()

    def reconcile(self, policies: Iterable[TrafficPolicy]) -> list[str]:
        notes = self.controller.reconcile(policies)
        self._record()
        self._publish()
        return notes

    def act(self, policies: Iterable[TrafficPolicy], policy: str, action: str, route: str | None) -> RolloutState:
        """start, or an operator command on a running rollout. Raises RolloutError."""
        if self.kube is not None and not self.kube.leader:
            raise RolloutError(f"this replica follows; the rollout leader (Lease holder) is "
                               f"{self.kube.holder or 'not elected yet'}: send the command there")
        if action == "start":
            state = self.controller.start(policies, policy, route)
        else:
            current = self.controller.status(policy)[0]
            if route is not None and current.route != route:
                raise RolloutError(f"the rollout of {policy!r} is on route {current.route!r}, not {route!r}")
            state = self.controller.command(policy, action, "by operator")
        self._record()
        self._publish()
        return state

    def tick(self, policies: Iterable[TrafficPolicy] = ()) -> bool:
        """One clock tick; True when a phase or weight changed.

        With a cluster only the Lease holder judges analyses; the others take, once per Lease
        period, the states it recorded. A new leader first adopts them, so it continues from the
        recorded step (once the watch has delivered the policies they belong to).
        """
        kube = self.kube
        if kube is not None:
            was = kube.leader
            if kube.elect() and not kube.leader:
                self._adopt(policies)
                return True
            self._took_over = self._took_over or (kube.leader and not was)
            if not kube.leader:
                return False
            policies = tuple(policies)
            if self._took_over and policies:
                self._adopt(policies)
                self._took_over = False
        changed = bool(self.controller.tick(self.read))
        if changed:
            self._record()
        self._publish()
        return changed

    def _adopt(self, policies: Iterable[TrafficPolicy]) -> None:
        """Replace our states by those recorded on the resources (the controller's resume path)."""
        assert self.kube is not None
        self.controller.adopt(self.kube.recorded(), policies)
        self._record()

    def _publish(self) -> None:
        if self.kube is not None and self.kube.leader:
            self.kube.publish(self.controller.describe())

    def status(self, policy: str | None = None) -> list[dict]:
        return [status_json(name, spec, state, due) for name, spec, state, due in self.controller.describe(policy)]

    def _record(self) -> None:
        for name, _, state, _ in self.controller.describe():
            self.metrics.record(name, state)



def status_json(policy: str, spec: Rollout, state: RolloutState, due: float) -> dict:
    """What GET /rollouts answers; `next_analysis` is the end of the current interval (epoch seconds)."""
    last = state.last
    observation = last.observation if last else None
    return {
        "policy": policy, "route": state.route, "phase": state.phase, "canary": spec.canary, "stable": spec.stable,
        "step": state.step + 1, "steps": list(spec.steps), "weight": state.weight,
        "failures": state.failures, "failure_limit": spec.failure_limit, "interval": spec.interval,
        "next_analysis": due if state.phase == "Progressing" else None,
        "last": None if last is None or observation is None else {
            "verdict": last.verdict, "requests": observation.requests, "errors": observation.errors,
            "success_rate": observation.success_rate,
            "p99_ms": None if observation.p99 is None else round(observation.p99 * 1000, 3),
            "reasons": list(last.reasons),
        },
        "history": [{"at": t.at, "phase": t.phase, "weight": t.weight, "reason": t.reason} for t in state.history],
    }


def make_rollouts(options: RolloutOptions, collector: Collector, registry: CollectorRegistry) -> Rollouts:
    """The rollouts of the admin-owning process; `collector` holds the request metrics of every worker."""
    store = None
    if options.state_dir is not None:
        store = options.state_dir / STATE_FILE
    if options.prometheus:
        from meshlet.rollout.prometheus import PrometheusReader

        read: Reader = PrometheusReader(options.prometheus)
    else:
        read = functools.partial(snapshot, collector)
    return Rollouts(RolloutController(store), read, RolloutMetrics(registry), options.kube)


def resume_rollouts(rollouts: Rollouts, applied: Applied) -> Applied:
    """At start-up: bring back recorded rollouts and compile their weights into the first table."""
    from meshlet.proxy.state import reweigh

    rollouts.resume(applied.policies)
    weights = rollouts.weights(applied.policies)
    return reweigh(applied, weights, applied.table.generation) if weights else applied
