"""TrafficPolicy custom resources → the sidecar's PolicySet: the pure core of `--watch-kube`.

Events in, decisions out; no API calls and no clock (the caller passes `now`). Each resource
is loaded with the same loader as a policy file. A resource that fails keeps its last good
version in the set: the sidecar goes on routing with the old table, and the resource's
`status.conditions` says why the new one was refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from meshlet.policy import PolicyInvalid, load_text
from meshlet.policy.checks import check_set
from meshlet.policy.model import PolicySet, TrafficPolicy

EventType = Literal["ADDED", "MODIFIED", "DELETED"]


@dataclass(frozen=True, slots=True)
class Condition:
    """A `Ready` condition in Kubernetes' metav1.Condition shape."""

    ready: bool
    reason: str
    message: str
    generation: int
    now: str  # RFC 3339

    def status_patch(self) -> dict:
        return {"status": {"observedGeneration": self.generation, "conditions": [{
            "type": "Ready", "status": "True" if self.ready else "False", "reason": self.reason,
            "message": self.message, "observedGeneration": self.generation, "lastTransitionTime": self.now,
        }]}}


@dataclass(frozen=True, slots=True)
class Step:
    """What one event asks of the edge: a new set to swap in, a status to write, a log line."""

    policies: PolicySet | None  # None: keep the current table
    name: str
    condition: Condition | None
    log: str


def where(obj: dict) -> str:
    """How errors and logs name a resource, in place of a file name."""
    meta = obj.get("metadata") or {}
    return f"trafficpolicy/{meta.get('namespace', '')}/{meta.get('name', '?')}"


def policy_text(obj: dict) -> str:
    """The resource as a policy document: only the fields a policy file may hold.

    JSON is YAML, and JSON keys cannot turn into booleans (YAML 1.1 reads a bare `on` as true).
    """
    meta = obj.get("metadata") or {}
    document = {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": {k: meta[k] for k in ("name", "namespace", "labels") if k in meta},
        "spec": obj.get("spec"),
    }
    return json.dumps(document, indent=1)


@dataclass
class Reconciler:
    """The last good TrafficPolicy of each resource name, and the set they make together."""

    good: dict[str, TrafficPolicy] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # the policy text of each good resource

    def policies(self) -> PolicySet:
        return PolicySet(traffic=tuple(self.good[name] for name in sorted(self.good)))

    def source(self) -> str:
        """The good resources as one multi-document policy, for a sidecar that applies text
        (`PUT /policy`, `PolicyState.apply`); empty when there are none."""
        return "---\n".join(self.sources[name] + "\n" for name in sorted(self.sources))

    def event(self, kind: EventType, obj: dict, now: str) -> Step:
        meta = obj.get("metadata") or {}
        name, generation = str(meta.get("name", "")), int(meta.get("generation") or 0)
        if kind == "DELETED":
            self.sources.pop(name, None)
            if self.good.pop(name, None) is None:
                return Step(None, name, None, f"{where(obj)}: deleted (it was never applied)")
            return Step(self.policies(), name, None, f"{where(obj)}: deleted")
        try:
            loaded = load_text(policy_text(obj), where(obj))
        except PolicyInvalid as e:
            return self._refuse(obj, name, generation, now, e)
        if len(loaded.traffic) != 1:
            return self._refuse(obj, name, generation, now, None, "not a single TrafficPolicy")
        new = loaded.traffic[0]
        # Warnings (a deprecated field) ride on the condition: `kubectl describe` is where they are read.
        in_use = "; ".join(["in use", *map(str, loaded.warnings)])
        if self.good.get(name) == new:
            return Step(None, name, Condition(True, "Applied", in_use, generation, now), f"{where(obj)}: unchanged")
        previous = self.good.get(name)
        self.good[name] = new
        errors = check_set(self.policies())
        if errors:
            if previous is None:
                del self.good[name]
            else:
                self.good[name] = previous
            return self._refuse(obj, name, generation, now, PolicyInvalid(errors))
        self.sources[name] = policy_text(obj)
        return Step(self.policies(), name, Condition(True, "Applied", in_use, generation, now),
                    f"{where(obj)}: applied generation {generation}")

    def resync(self, items: list[dict], now: str) -> list[Step]:
        """After a (re)list: forget resources that are gone, (re)load the others."""
        present = {str((obj.get("metadata") or {}).get("name", "")) for obj in items}
        gone = [{"metadata": {"name": name, "namespace": self.good[name].metadata.namespace}}
                for name in sorted(set(self.good) - present)]
        steps = [self.event("DELETED", obj, now) for obj in gone]
        steps += [self.event("ADDED", obj, now) for obj in items]
        return steps

    def _refuse(self, obj: dict, name: str, generation: int, now: str, error: PolicyInvalid | None,
                reason: str = "") -> Step:
        message = "; ".join(str(e) for e in error.errors) if error else f"{where(obj)}: {reason}"
        kept = "keeping the previous version" if name in self.good else "not applied"
        return Step(None, name, Condition(False, "Invalid", message, generation, now),
                    f"{where(obj)}: refused, {kept}: {message}")
