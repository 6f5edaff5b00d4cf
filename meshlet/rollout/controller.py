"""The rollouts of one sidecar: their states, their clock, their persistence.

The controller is the edge around the pure `machine`: it decides when an interval is over,
reads the canary's figures through an injected `read(route, backend) -> Snapshot`, feeds the
machine, saves every state change to a JSON file (so a restarted sidecar resumes from the last
recorded step), and exposes the canary weights the routing table must use (`overrides`).

A policy apply is reconciled, never silently merged: a rollout whose route still declares the
same canary and stable keeps going; any other is cancelled with a recorded reason, and
finished rollouts give their weights back to the newly applied policy.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from meshlet.policy.model import Rollout, Route, TrafficPolicy
from meshlet.rollout.analysis import AnalysisResult, Observation, Snapshot, judge, observe
from meshlet.rollout.machine import (
    Command,
    RolloutError,
    RolloutNotFound,
    RolloutState,
    Tick,
    Transition,
    advance,
    start,
)

log = logging.getLogger("meshlet.rollout")

Reader = Callable[[str, str], Snapshot]
ACTIONS: tuple[str, ...] = ("pause", "resume", "abort", "promote")


@dataclass
class _Entry:
    policy: str
    spec: Rollout
    state: RolloutState
    baseline: Snapshot | None = None  # figures at the start of the current interval
    due: float = 0.0  # when the current interval ends


def find_rollout(policies: Iterable[TrafficPolicy], policy_name: str, route_name: str | None) -> tuple[Route, Rollout]:
    """The route of `policy_name` that declares a rollout (or the named one). Raises RolloutError."""
    policy = next((p for p in policies if p.metadata.name == policy_name), None)
    if policy is None:
        raise RolloutNotFound(f"no policy named {policy_name!r} is loaded")
    candidates = [r for r in policy.routes if r.rollout and (route_name is None or r.name == route_name)]
    if not candidates:
        which = f"route {route_name!r} of " if route_name else ""
        raise RolloutNotFound(f"{which}policy {policy_name!r} declares no rollout section")
    if len(candidates) > 1:
        names = ", ".join(r.name for r in candidates)
        raise RolloutError(f"policy {policy_name!r} has several rollouts ({names}); name one with --route")
    route = candidates[0]
    assert route.rollout is not None
    return route, route.rollout


class RolloutController:
    def __init__(self, store: Path | None = None, clock: Callable[[], float] = time.time):
        self.store = store
        self.clock = clock
        self._entries: dict[str, _Entry] = {}
        self._saved: dict[str, dict] = self._load()

    # -- operator actions ------------------------------------------------------------------------

    def start(self, policies: Iterable[TrafficPolicy], policy_name: str, route_name: str | None = None) -> RolloutState:
        route, spec = find_rollout(policies, policy_name, route_name)
        current = self._entries.get(policy_name)
        if current is not None and current.state.active:
            raise RolloutError(f"a rollout of {policy_name!r} is already {current.state.phase}")
        now = self.clock()
        entry = _Entry(policy_name, spec, start(spec, route.name, now), due=now + spec.interval)
        self._entries[policy_name] = entry
        self._changed(entry)
        return entry.state

    def command(self, policy_name: str, action: str, reason: str = "") -> RolloutState:
        entry = self._entries.get(policy_name)
        if entry is None:
            hint = f"start one with `meshlet rollout start {policy_name}`"
            raise RolloutNotFound(f"no rollout of {policy_name!r}; {hint}")
        if action not in ACTIONS:
            raise RolloutError(f"unknown rollout action {action!r}; one of {', '.join(ACTIONS)}")
        entry.state = advance(entry.spec, entry.state, Command(self.clock(), action, reason))
        if action == "resume":
            entry.baseline, entry.due = None, self.clock() + entry.spec.interval
        self._changed(entry)
        return entry.state

    def status(self, policy_name: str | None = None) -> list[RolloutState]:
        return [state for _, _, state, _ in self.describe(policy_name)]

    def describe(self, policy_name: str | None = None) -> list[tuple[str, Rollout, RolloutState, float]]:
        """(policy, spec, state, end of the current interval) of every rollout, or of one."""
        if policy_name is not None and policy_name not in self._entries:
            raise RolloutNotFound(f"no rollout of {policy_name!r}")
        return [(name, e.spec, e.state, e.due) for name, e in self._entries.items() if policy_name in (None, name)]

    # -- the clock -------------------------------------------------------------------------------

    def tick(self, read: Reader) -> list[RolloutState]:
        """Analyse every rollout whose interval is over; returns the states that changed phase or step."""
        changed = []
        now = self.clock()
        for entry in self._entries.values():
            if entry.state.phase != "Progressing" or now < entry.due:
                continue
            snapshot = read(entry.state.route, entry.spec.canary)
            if entry.baseline is None:  # first interval after a start or restart: only take the baseline
                entry.baseline, entry.due = snapshot, now + entry.spec.interval
                continue
            result = judge(entry.spec.analysis, observe(entry.baseline, snapshot))
            before = entry.state
            entry.state = advance(entry.spec, before, Tick(now, result))
            entry.baseline, entry.due = snapshot, now + entry.spec.interval
            why = f": {'; '.join(result.reasons)}" if result.reasons else ""
            log.info("rollout %s/%s: analysis %s%s", entry.policy, entry.state.route, result.verdict, why)
            if entry.state.history != before.history:
                changed.append(entry.state)
                self._changed(entry)  # logs the transition
            else:
                self._save()  # failures and the last analysis, for status after a restart
        return changed

    def overrides(self) -> dict[tuple[str, str], tuple[Rollout, int]]:
        """(policy, route) → (spec, canary weight) for the routing table to apply."""
        return {(e.policy, e.state.route): (e.spec, e.state.weight) for e in self._entries.values()}

    # -- policy applies --------------------------------------------------------------------------

    def reconcile(self, policies: Iterable[TrafficPolicy]) -> list[str]:
        """After a policy apply: keep, cancel or drop each rollout. Returns one line per decision."""
        policies = tuple(policies)
        notes = []
        for name, entry in list(self._entries.items()):
            which = f"rollout of {name}/{entry.state.route}"
            try:
                spec: Rollout | None = find_rollout(policies, name, entry.state.route)[1]
            except RolloutError:
                spec = None
            if not entry.state.active:
                del self._entries[name]
                notes.append(f"{which} ({entry.state.phase}) ended: weights now come from the policy")
            elif spec is None or (spec.canary, spec.stable) != (entry.spec.canary, entry.spec.stable):
                cancel = Command(self.clock(), "abort", "cancelled by policy apply")
                entry.state = advance(entry.spec, entry.state, cancel)
                del self._entries[name]
                notes.append(f"{which} cancelled: the applied policy changed or removed its rollout")
            else:
                entry.spec = spec
                notes.append(f"{which} kept at {entry.state.weight}%")
        self._save()
        for note in notes:
            log.info("%s", note)
        return notes

    def resume_saved(self, policies: Iterable[TrafficPolicy]) -> list[RolloutState]:
        """At start-up: bring back the recorded rollouts whose routes still declare the same rollout.

        One whose canary, stable or steps changed while we were down is not resumed (as a policy
        apply would cancel it): its recorded step would mean another weight now.
        """
        resumed = []
        policies = tuple(policies)
        for name, saved in self._saved.items():
            try:
                _, spec = find_rollout(policies, name, saved["route"])
            except RolloutError:
                log.info("rollout of %s/%s not resumed: the policy no longer declares it", name, saved["route"])
                continue
            recorded = (saved.get("canary"), saved.get("stable"), saved.get("steps"))
            if recorded != (spec.canary, spec.stable, list(spec.steps)):
                log.info("rollout of %s/%s not resumed: its canary, stable or steps changed", name, saved["route"])
                continue
            state = _state_from_json(saved)
            self._entries[name] = _Entry(name, spec, state, due=self.clock() + spec.interval)
            resumed.append(state)
        return resumed

    def adopt(self, recorded: dict[str, dict], policies: Iterable[TrafficPolicy]) -> list[RolloutState]:
        """Drop our rollouts and continue from `recorded` (what another replica wrote down), as
        `resume_saved` does at start-up: a new leader takes over mid-rollout."""
        self._saved = dict(recorded)
        self._entries.clear()
        return self.resume_saved(policies)

    # -- persistence -----------------------------------------------------------------------------

    def _changed(self, entry: _Entry) -> None:
        last = entry.state.history[-1] if entry.state.history else None
        if last is not None:
            log.info("rollout %s/%s: %s weight=%d: %s", entry.policy, entry.state.route, last.phase, last.weight,
                     last.reason)
        self._save()

    def _save(self) -> None:
        if self.store is None:
            return
        doc = {name: {**_state_to_json(e.state), "canary": e.spec.canary, "stable": e.spec.stable,
                      "steps": list(e.spec.steps)} for name, e in self._entries.items()}
        tmp = self.store.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.store)  # atomic: a crash leaves the old file or the new one

    def _load(self) -> dict[str, dict]:
        if self.store is None or not self.store.exists():
            return {}
        try:
            return json.loads(self.store.read_text())
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable rollout state %s: %s", self.store, e)
            return {}


def _state_to_json(state: RolloutState) -> dict:
    doc = asdict(state)
    doc["last"] = None if state.last is None else {
        "verdict": state.last.verdict, "reasons": list(state.last.reasons), **asdict(state.last.observation),
    }
    return doc


def _state_from_json(doc: dict) -> RolloutState:
    last = doc.get("last")
    result = None
    if last:
        result = AnalysisResult(last["verdict"], Observation(last["requests"], last["errors"], last["p99"]),
                                tuple(last["reasons"]))
    history = tuple(Transition(t["at"], t["phase"], t["weight"], t["reason"]) for t in doc.get("history", ()))
    return RolloutState(doc["route"], doc["phase"], doc["step"], doc["weight"], doc.get("failures", 0), result, history)
