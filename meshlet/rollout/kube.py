"""A rollout's state on its TrafficPolicy resource: a `Rollout` condition and `status.rollouts`.

`status.rollouts[ROUTE]` holds the state as the controller saves it to its JSON file (phase,
step, weight, failures, history, and the canary/stable/steps it was recorded for), so a
restarted sidecar, or the replica that takes the Lease over, resumes from the last recorded
step exactly as from `--state-dir`. The `Rollout` condition is what `kubectl get -o yaml` and
`kubectl wait --for=condition=Rollout` see. Building the status is pure; `write` and `read`
are the I/O edge over `meshlet.k8s.kube.Cluster`.

The status is written whole (other conditions, such as the watch's `Ready`, are carried over),
because a merge patch replaces a conditions list rather than merging it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterable

from meshlet.k8s.kube import GROUP, PLURALS, VERSION, Cluster, KubeError, api_call
from meshlet.k8s.lease import LeaseElector, micro_time
from meshlet.policy.model import Rollout
from meshlet.rollout.controller import _state_from_json, _state_to_json
from meshlet.rollout.machine import RolloutState

CONDITION = "Rollout"
LEASE_NAME = "meshlet-rollouts"  # one per namespace: the replicas watching it elect one driver
log = logging.getLogger("meshlet.rollout")
TIMEOUT = 5.0  # seconds per API call: the rollout clock waits on it


def condition(state: RolloutState, at: str, generation: int | None = None) -> dict:
    """True while the rollout progresses or is paused; reason is the phase, message the last transition."""
    last = state.history[-1].reason if state.history else ""
    out = {"type": CONDITION, "status": "True" if state.active else "False", "reason": state.phase,
           "message": f"canary at {state.weight}% (step {state.step + 1}): {last}", "lastTransitionTime": at}
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def record(spec: Rollout, state: RolloutState) -> dict:
    """The state as `status.rollouts[route]`: the controller's saved form, resumable."""
    return {**_state_to_json(state), "canary": spec.canary, "stable": spec.stable, "steps": list(spec.steps)}


def with_rollout(status: dict | None, spec: Rollout, state: RolloutState, at: str,
                 generation: int | None = None) -> dict:
    """`status` with this rollout recorded and its condition replaced; other keys and conditions kept.

    The condition's lastTransitionTime only moves when its status or reason changes, as
    Kubernetes conventions ask, so a step forward within Progressing keeps it.
    """
    status = dict(status or {})
    new = condition(state, at, generation)
    conditions = list(status.get("conditions") or [])
    old = next((c for c in conditions if c.get("type") == CONDITION), None)
    if old is not None and (old.get("status"), old.get("reason")) == (new["status"], new["reason"]):
        new["lastTransitionTime"] = old.get("lastTransitionTime", at)
    status["conditions"] = [c for c in conditions if c.get("type") != CONDITION] + [new]
    status["rollouts"] = {**(status.get("rollouts") or {}), state.route: record(spec, state)}
    return status


def recorded(objects: list[dict]) -> dict[str, dict]:
    """policy name → saved state, from resources' `status.rollouts` (the controller's `_saved` form).

    A controller holds one rollout per policy; of several recorded routes the active one wins,
    then the one with the latest transition.
    """
    out: dict[str, dict] = {}
    for obj in objects:
        rollouts = ((obj.get("status") or {}).get("rollouts") or {}).values()
        docs = [d for d in rollouts if isinstance(d, dict) and "route" in d]
        if docs:
            out[obj["metadata"]["name"]] = max(docs, key=_rank)
    return out


def state_of(doc: dict) -> RolloutState:
    return _state_from_json(doc)


def _rank(doc: dict) -> tuple[bool, float]:
    history = doc.get("history") or []
    return doc.get("phase") in ("Progressing", "Paused"), history[-1]["at"] if history else 0.0


# -- the I/O edge --------------------------------------------------------------------------------


def write(cluster: Cluster, namespace: str, policy: str, spec: Rollout, state: RolloutState, at: str) -> dict:
    """Record one transition on the TrafficPolicy `policy`; returns the stored object. Raises KubeError."""
    api = cluster.api
    target = (GROUP, VERSION, namespace, PLURALS["TrafficPolicy"], policy)
    with api_call(f"trafficpolicy.{GROUP}/{policy}: cannot record rollout"):
        obj = api.get_namespaced_custom_object(*target, _request_timeout=TIMEOUT)
        generation = (obj.get("metadata") or {}).get("generation")
        status = with_rollout(obj.get("status"), spec, state, at, generation)
        return api.patch_namespaced_custom_object_status(*target, {"status": status}, _request_timeout=TIMEOUT)


def read(cluster: Cluster, namespace: str) -> dict[str, dict]:
    """The recorded rollouts of the namespace's TrafficPolicies (see `recorded`). Raises KubeError."""
    with api_call(f"cannot list trafficpolicies.{GROUP}"):
        listing = cluster.api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS["TrafficPolicy"],
                                                           _request_timeout=TIMEOUT)
    return recorded(listing.get("items") or [])



class KubeRollouts:
    """One replica's rollouts in a cluster: the Lease decides who drives, the status carries the state.

    `elect()` runs once per Lease period (a third of its duration). The leader ticks analyses
    and `publish`es each changed state to its TrafficPolicy; every other replica `recorded()`
    reads those states back each period and serves their weights, so all replicas split alike.
    """

    def __init__(self, cluster: Cluster, namespace: str, elector: LeaseElector, clock: Callable[[], float] = time.time):
        self.cluster, self.namespace, self.elector, self.clock = cluster, namespace, elector, clock
        self.next_election = 0.0
        self.published: dict[tuple[str, str], dict] = {}  # (policy, route) → the record last written

    @property
    def leader(self) -> bool:
        return self.elector.leader

    @property
    def holder(self) -> str | None:
        return self.elector.holder

    def elect(self) -> bool:
        """Step the Lease when a period is over; True when it was stepped (followers then re-read)."""
        now = self.clock()
        if now < self.next_election:
            return False
        self.next_election = now + self.elector.period
        if not self.elector.step():
            self.published.clear()  # a later term re-writes everything it leads with
        return True

    def recorded(self) -> dict[str, dict]:
        return read(self.cluster, self.namespace)

    def publish(self, rollouts: Iterable[tuple[str, Rollout, RolloutState, float]]) -> None:
        """Write the states that changed since last written; a failed write is retried next time."""
        stamp = micro_time(self.clock())
        for policy, spec, state, _ in rollouts:
            doc = record(spec, state)
            if self.published.get((policy, state.route)) == doc:
                continue
            try:
                write(self.cluster, self.namespace, policy, spec, state, stamp)
            except KubeError as e:
                log.warning("rollout %s/%s: %s (retrying next tick)", policy, state.route, e)
                continue
            self.published[(policy, state.route)] = doc

    def release(self) -> None:
        self.elector.release()


def coordinate(cluster: Cluster, namespace: str | None, duration: int) -> KubeRollouts:
    """`meshlet run --watch-kube`: the Lease `meshlet-rollouts` in the watched namespace, named after this Pod."""
    from meshlet.k8s.lease import elector

    ns = namespace or cluster.namespace
    identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    lease_log = logging.getLogger("meshlet.kube").info
    chosen = elector(Cluster(cluster.api, ns), LEASE_NAME, identity, duration, log=lease_log)
    return KubeRollouts(cluster, ns, chosen)


def status_from(obj: dict, route: str | None = None) -> dict:
    """`meshlet rollout status --kube`: the recorded state in the shape GET /rollouts/POLICY answers.

    The thresholds (interval, failure limit) come from the resource's spec, loaded as a policy.
    Raises RolloutNotFound when the resource records no rollout (or none on `route`).
    """
    from meshlet.k8s.reconcile import policy_text, where
    from meshlet.policy import load_text
    from meshlet.rollout.controller import find_rollout
    from meshlet.rollout.machine import RolloutNotFound
    from meshlet.rollout.service import status_json

    name = obj["metadata"]["name"]
    saved = recorded([obj]).get(name)
    if route is not None:
        saved = ((obj.get("status") or {}).get("rollouts") or {}).get(route)
    if saved is None:
        raise RolloutNotFound(f"{where(obj)} records no rollout{f' on route {route!r}' if route else ''} "
                              "in its status (none was started while a sidecar followed it)")
    _, spec = find_rollout(load_text(policy_text(obj), where(obj)).traffic, name, saved["route"])
    return status_json(name, spec, state_of(saved), 0.0)


def get_policy(cluster: Cluster, namespace: str | None, name: str) -> dict:
    """One TrafficPolicy as stored, status included. Raises KubeError."""
    target = (GROUP, VERSION, namespace or cluster.namespace, PLURALS["TrafficPolicy"], name)
    with api_call(f"trafficpolicy.{GROUP}/{name}"):
        return cluster.api.get_namespaced_custom_object(*target, _request_timeout=TIMEOUT)
